//! Dead letters as an operator sees them, and where `concord dlq redrive` may send one (pure).
//!
//! Two kinds of dead-letter queues exist:
//!
//! - `{ns}.dlq.<system>`: what `<system>`'s adapter could not apply (a routed copy, published by
//!   the router; the adapter adds `concord-reason` and `concord-detail`), and the local changes
//!   it could not publish (parked: a JSON description, not a change event);
//! - `{ns}.dlq.router`: inputs the router could not process (the original body; the router adds
//!   `concord-reason`, `concord-detail` and `concord-routing-key`, the routing key the input was
//!   published with). The original publisher's `user_id` is not kept.
//!
//! Redrive never sends a message anywhere but back where it came from:
//!
//! - a system's dead letter goes back into that system's inbox only: published to
//!   `{ns}.routed` with routing key `<system>` as the **router's user** (adapters apply only
//!   what the router's user published, so redriving needs the router's credentials, exactly
//!   as routing does), with the change event's id as `message_id`. Not redriven: bodies that
//!   are no change event (parked local changes: fix them at the source, whose next change
//!   publishes the record again) and events whose source is the system itself (never routed to
//!   it);
//! - a router dead letter goes back to `{ns}.ingress` with its original routing key, published
//!   as **its source system's user**, so that the router validates the publisher's identity as
//!   it did the first time (the router trusts no one to speak for a system): redriving needs
//!   that system's credentials and moves only the dead letters whose routing key names it.
//!
//! A redriven message keeps its bytes and its event id: if a redrive is interrupted between the
//! confirmed publish and the ack of the dead letter, the next redrive sends it again and the
//! receiving adapter's deduplication (by event id) drops the second copy.

use concord_proto::v1::ChangeEvent;
use prost::Message as _;
use serde::Serialize;

/// Header of a redriven message: the dead-letter queue it came from.
pub const HEADER_REDRIVEN_FROM: &str = "concord-redriven-from";

/// Which dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dlq {
    /// `{ns}.dlq.<system>`.
    System(String),
    /// `{ns}.dlq.router`.
    Router,
}

impl Dlq {
    /// `router` names the router's DLQ, anything else a system's.
    pub fn parse(s: &str) -> Dlq {
        if s == "router" {
            Dlq::Router
        } else {
            Dlq::System(s.to_owned())
        }
    }

    /// The queue name in namespace `ns`.
    pub fn queue(&self, ns: &str) -> String {
        match self {
            Dlq::System(s) => format!("{ns}.dlq.{s}"),
            Dlq::Router => format!("{ns}.dlq.router"),
        }
    }
}

/// One dead letter: what the broker holds, and the change event in it if it is one.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: Option<String>,
    pub detail: Option<String>,
    /// `concord-routing-key` (router dead letters).
    pub routing_key: Option<String>,
    /// `concord-key` header, if the message carries one.
    pub key_header: Option<String>,
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch (when it was dead-lettered).
    pub timestamp: Option<u64>,
    pub body: Vec<u8>,
    /// The body decoded as a change event (`None`: it is not one).
    pub event: Option<ChangeEvent>,
}

/// What `concord dlq list` prints of a dead letter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub reason: String,
    pub detail: String,
    /// `<entity>/<key>` of the record.
    pub key: Option<String>,
    pub event_id: Option<String>,
    pub source: Option<String>,
    pub routing_key: Option<String>,
    /// Seconds since the Unix epoch.
    pub time: Option<u64>,
    pub bytes: usize,
}

impl DeadLetter {
    /// A dead letter from its headers and body; the body is decoded if it is a change event.
    pub fn new(
        header: impl Fn(&str) -> Option<String>,
        message_id: Option<String>,
        timestamp: Option<u64>,
        body: Vec<u8>,
    ) -> DeadLetter {
        let event = ChangeEvent::decode(body.as_slice())
            .ok()
            .filter(|e| !e.event_id.is_empty() && !e.entity.is_empty());
        DeadLetter {
            reason: header(concord_amqp::HEADER_REASON),
            detail: header(concord_amqp::HEADER_DETAIL),
            routing_key: header(concord_amqp::HEADER_ROUTING_KEY),
            key_header: header(concord_amqp::HEADER_KEY),
            message_id,
            timestamp,
            body,
            event,
        }
    }

    /// `<entity>/<key>` of the record: the `concord-key` header, else the decoded event's.
    pub fn record_key(&self) -> Option<String> {
        self.key_header.clone().or_else(|| {
            self.event
                .as_ref()
                .map(|e| format!("{}/{}", e.entity, e.key))
        })
    }

    /// The event id: the decoded event's, else the `message_id`.
    pub fn event_id(&self) -> Option<String> {
        self.event
            .as_ref()
            .map(|e| e.event_id.clone())
            .or_else(|| self.message_id.clone())
    }

    /// Whether `--reason` selects it (no filter selects everything).
    pub fn has_reason(&self, reason: Option<&str>) -> bool {
        reason.is_none_or(|r| self.reason.as_deref() == Some(r))
    }

    /// The line of `concord dlq list`.
    pub fn summary(&self) -> Summary {
        Summary {
            reason: self.reason.clone().unwrap_or_else(|| "unknown".to_owned()),
            detail: self.detail.clone().unwrap_or_default(),
            key: self.record_key(),
            event_id: self.event_id(),
            source: self.event.as_ref().map(|e| e.source.clone()),
            routing_key: self.routing_key.clone(),
            time: self.timestamp,
            bytes: self.body.len(),
        }
    }
}

/// Where a redriven dead letter goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    /// `concord-key` to set (the partition exchange hashes it).
    pub key_header: Option<String>,
}

/// Why a dead letter is not redriven.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// `--reason` does not select it.
    OtherReason,
    /// Not a change event (a parked local change, or bytes the router could not decode).
    NotAChangeEvent,
    /// A change of the system itself (a parked local change): never routed to its own inbox.
    OwnChange,
    /// A router dead letter without its original routing key.
    NoRoutingKey,
    /// A router dead letter published under another system's routing key than the one whose
    /// credentials redrive it.
    OtherSource,
}

impl Skip {
    /// For people.
    pub fn describe(&self) -> &'static str {
        match self {
            Skip::OtherReason => "another reason than --reason",
            Skip::NotAChangeEvent => {
                "not a change event (a parked local change: fix it at the source, whose next change publishes the record again)"
            }
            Skip::OwnChange => "a change of the system itself (parked local change)",
            Skip::NoRoutingKey => "no concord-routing-key header",
            Skip::OtherSource => "published by another system than --source",
        }
    }
}

/// Where `dead` goes when dead-letter queue `dlq` of namespace `ns` is redriven with `--reason
/// reason` (and, for the router's, as system `source`'s user): back into the one system's
/// inbox, or to the router's input under its original routing key.
pub fn destination(
    ns: &str,
    dlq: &Dlq,
    dead: &DeadLetter,
    reason: Option<&str>,
    source: Option<&str>,
) -> Result<Destination, Skip> {
    if !dead.has_reason(reason) {
        return Err(Skip::OtherReason);
    }
    match dlq {
        Dlq::System(system) => {
            let event = dead.event.as_ref().ok_or(Skip::NotAChangeEvent)?;
            if event.source == *system {
                return Err(Skip::OwnChange);
            }
            Ok(Destination {
                exchange: format!("{ns}.routed"),
                routing_key: system.clone(),
                message_id: Some(event.event_id.clone()),
                key_header: dead.record_key(),
            })
        }
        Dlq::Router => {
            let routing_key = dead.routing_key.clone().ok_or(Skip::NoRoutingKey)?;
            let publisher = routing_key.split('.').next().unwrap_or_default();
            if source != Some(publisher) {
                return Err(Skip::OtherSource);
            }
            Ok(Destination {
                exchange: format!("{ns}.ingress"),
                routing_key,
                message_id: dead.event_id(),
                key_header: dead.record_key(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn event(source: &str) -> ChangeEvent {
        ChangeEvent {
            event_id: "e1".into(),
            source: source.into(),
            entity: "customer".into(),
            key: "k1".into(),
            ..Default::default()
        }
    }

    fn dead(headers: &[(&str, &str)], body: Vec<u8>) -> DeadLetter {
        let h: BTreeMap<String, String> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        DeadLetter::new(|n| h.get(n).cloned(), None, Some(7), body)
    }

    #[test]
    fn a_systems_dead_letter_goes_back_to_its_inbox_only() {
        let d = dead(
            &[("concord-reason", "apply_failed")],
            event("orders").encode_to_vec(),
        );
        let s = d.summary();
        assert_eq!(s.key.as_deref(), Some("customer/k1"));
        assert_eq!(s.event_id.as_deref(), Some("e1"));
        assert_eq!(s.reason, "apply_failed");
        let to = destination("ns", &Dlq::parse("support"), &d, None, None).unwrap();
        assert_eq!(
            to,
            Destination {
                exchange: "ns.routed".into(),
                routing_key: "support".into(),
                message_id: Some("e1".into()),
                key_header: Some("customer/k1".into()),
            }
        );
        assert_eq!(
            destination(
                "ns",
                &Dlq::parse("support"),
                &d,
                Some("untrusted_publisher"),
                None
            ),
            Err(Skip::OtherReason)
        );
        // Its own change, or a parked local change, never goes to its inbox.
        assert_eq!(
            destination("ns", &Dlq::parse("orders"), &d, None, None),
            Err(Skip::OwnChange)
        );
        let parked = dead(&[], br#"{"system":"support","entity":"customer"}"#.to_vec());
        assert!(parked.event.is_none());
        assert_eq!(
            destination("ns", &Dlq::parse("support"), &parked, None, None),
            Err(Skip::NotAChangeEvent)
        );
    }

    #[test]
    fn a_router_dead_letter_goes_back_to_the_ingress_as_its_source() {
        let d = dead(
            &[
                ("concord-reason", "unknown_entity"),
                ("concord-routing-key", "orders.customer"),
            ],
            event("orders").encode_to_vec(),
        );
        let to = destination("ns", &Dlq::Router, &d, None, Some("orders")).unwrap();
        assert_eq!(to.exchange, "ns.ingress");
        assert_eq!(to.routing_key, "orders.customer");
        assert_eq!(to.key_header.as_deref(), Some("customer/k1"));
        assert_eq!(
            destination("ns", &Dlq::Router, &d, None, Some("support")),
            Err(Skip::OtherSource)
        );
        assert_eq!(
            destination("ns", &Dlq::Router, &d, None, None),
            Err(Skip::OtherSource)
        );
        let garbage = dead(&[("concord-reason", "undecodable")], vec![0xff, 0xff]);
        assert_eq!(
            destination("ns", &Dlq::Router, &garbage, None, Some("orders")),
            Err(Skip::NoRoutingKey)
        );
        assert_eq!(Dlq::Router.queue("ns"), "ns.dlq.router");
        assert_eq!(Dlq::parse("crm").queue("ns"), "ns.dlq.crm");
    }
}
