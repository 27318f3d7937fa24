//! The control path (`proto/concord/v1/control.proto`): the operator's requests and the
//! adapters' progress reports, never applied as data.
//!
//! - An operator's [`ResyncRequest`] arrives on `{ns}.router.control` (only the operator may
//!   publish to `{ns}.control`; the router also checks the broker-validated `user_id` is its
//!   `operator_user`). The router forwards it, as its own user and with header
//!   `concord-control = resync`, to the inbox of each system that must publish snapshots
//!   ([`route::resync_sources`]), and answers on `{ns}.control` with key `reply.<id>`.
//! - An adapter's [`ResyncProgress`] arrives on the resync lane with header `concord-control`;
//!   the router sets its `system` from the publisher's validated user and passes it on to
//!   `reply.<id>`.
//!
//! [`request_resync`] is the operator's side (`concord resync`).

use std::time::{Duration, Instant};

use concord_amqp::{
    AmqpError, CONTROL_REPLY_PREFIX, CONTROL_REQUEST_KEY, Connection, Consumer, Delivery,
    HEADER_CONTROL, MessageProps, Publisher, PublisherOptions, Topology,
};
use concord_policy::DeadLetter;
use concord_policy::route::{self, DeadLetterReason};
use concord_proto::v1::{Accepted, ControlReply, ResyncProgress, ResyncRequest, control_reply};
use futures::StreamExt;
use prost::Message;
use tracing::{info, warn};

use crate::session::{Pending, dead_letter};
use crate::state::Shared;

/// Value of header `concord-control` on a resync request forwarded to an adapter.
pub const CONTROL_RESYNC: &str = "resync";
/// Value of header `concord-control` on an adapter's progress report.
pub const CONTROL_PROGRESS: &str = "progress";
/// Largest control message the router reads, in bytes.
const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// Whether `id` can name a request (it becomes part of a routing key and a queue name).
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn invalid(detail: impl Into<String>) -> DeadLetter {
    DeadLetter {
        reason: DeadLetterReason::InvalidControl,
        detail: detail.into(),
    }
}

/// What the router does with an operator's request: the reply, and the systems to forward it
/// to (pure).
fn decide(policy: &concord_policy::Policy, request: &ResyncRequest) -> Result<Vec<String>, String> {
    if request.target.is_empty() {
        return Err("no target system".to_owned());
    }
    if !request.key.is_empty() && request.entity.is_empty() {
        return Err("a key needs an entity".to_owned());
    }
    let entity = (!request.entity.is_empty()).then_some(request.entity.as_str());
    if let Some(e) = entity
        && policy.entity(e).is_none()
    {
        return Err(format!("entity {e:?} is not in the policy"));
    }
    route::resync_sources(policy, &request.target, entity)
        .ok_or_else(|| format!("system {:?} is not in the policy", request.target))
}

/// Processes one message of `{ns}.router.control`.
pub(crate) async fn handle(
    publisher: &Publisher,
    shared: &Shared,
    input: usize,
    delivery: Delivery,
) -> Result<Pending, AmqpError> {
    let started = Instant::now();
    let mut confirms = Vec::new();
    let dlx = shared.topology.dlx();
    let checked = check_request(shared, &delivery);
    match checked {
        Err(dead) => {
            warn!(reason = dead.reason.as_str(), detail = %dead.detail, "refusing a control message");
            confirms.push(dead_letter(publisher, shared, &dlx, &delivery, &dead).await?);
        }
        Ok(request) => {
            let state = shared.policy.load_full();
            let reply = match decide(state.policy(), &request) {
                Ok(systems) => {
                    info!(id = %request.id, target = %request.target, entity = %request.entity,
                        key = %request.key, sources = ?systems, "resync requested");
                    let body = request.encode_to_vec();
                    for system in &systems {
                        let props = MessageProps::new()
                            .header(HEADER_CONTROL, CONTROL_RESYNC)
                            .message_id(request.id.as_str())
                            .user_id(&shared.login);
                        let confirm = publisher
                            .publish(&shared.topology.routed_exchange(), system, &body, props)
                            .await?;
                        confirms.push((confirm, None));
                    }
                    control_reply::Reply::Accepted(Accepted { systems })
                }
                Err(why) => {
                    warn!(id = %request.id, %why, "resync request refused");
                    control_reply::Reply::Refused(why)
                }
            };
            let reply = ControlReply {
                id: request.id.clone(),
                reply: Some(reply),
            };
            publish_reply(publisher, shared, &reply).await?;
        }
    }
    Ok(Pending {
        input,
        ack: delivery.ack_handle(),
        confirms,
        started,
    })
}

fn check_request(shared: &Shared, delivery: &Delivery) -> Result<ResyncRequest, DeadLetter> {
    match delivery.user_id() {
        Some(user) if user == shared.config.operator_user => {}
        other => {
            return Err(invalid(format!(
                "control requests are taken from the operator ({}) only, not from {other:?}",
                shared.config.operator_user
            )));
        }
    }
    if delivery.body.len() > MAX_CONTROL_BYTES {
        return Err(invalid(format!("{} bytes", delivery.body.len())));
    }
    match delivery.header_str(HEADER_CONTROL) {
        Some(CONTROL_RESYNC) => {}
        other => return Err(invalid(format!("unknown control command {other:?}"))),
    }
    let request = ResyncRequest::decode(delivery.body.as_slice())
        .map_err(|e| invalid(format!("not a concord.v1.ResyncRequest: {e}")))?;
    if !valid_request_id(&request.id) {
        return Err(invalid(format!("invalid request id {:?}", request.id)));
    }
    Ok(request)
}

/// Publishes a reply to the operator, best effort: its confirm is not awaited, since nobody may
/// be listening (the operator did not wait, or left) and an unroutable reply is no failure.
async fn publish_reply(
    publisher: &Publisher,
    shared: &Shared,
    reply: &ControlReply,
) -> Result<(), AmqpError> {
    let props = MessageProps::new()
        .header(HEADER_CONTROL, "reply")
        .user_id(&shared.login);
    let confirm = publisher
        .publish(
            &shared.topology.control_exchange(),
            &format!("{CONTROL_REPLY_PREFIX}{}", reply.id),
            &reply.encode_to_vec(),
            props,
        )
        .await?;
    drop(confirm);
    Ok(())
}

/// Processes an adapter's progress report (a control message on the resync lane).
pub(crate) async fn progress(
    publisher: &Publisher,
    shared: &Shared,
    input: usize,
    delivery: Delivery,
) -> Result<Pending, AmqpError> {
    let started = Instant::now();
    let mut confirms = Vec::new();
    match check_progress(shared, &delivery) {
        Ok(progress) => {
            let reply = ControlReply {
                id: progress.id.clone(),
                reply: Some(control_reply::Reply::Progress(progress)),
            };
            publish_reply(publisher, shared, &reply).await?;
        }
        Err(dead) => {
            let dlx = shared.topology.dlx();
            confirms.push(dead_letter(publisher, shared, &dlx, &delivery, &dead).await?);
        }
    }
    Ok(Pending {
        input,
        ack: delivery.ack_handle(),
        confirms,
        started,
    })
}

fn check_progress(shared: &Shared, delivery: &Delivery) -> Result<ResyncProgress, DeadLetter> {
    if delivery.header_str(HEADER_CONTROL) != Some(CONTROL_PROGRESS) {
        return Err(invalid(format!(
            "unknown control message {:?} on the resync lane",
            delivery.header_str(HEADER_CONTROL)
        )));
    }
    let Some(user) = delivery.user_id() else {
        return Err(invalid("a progress report without a user_id"));
    };
    let system = shared.settings.system_of(user).to_owned();
    let mut progress = ResyncProgress::decode(delivery.body.as_slice())
        .map_err(|e| invalid(format!("not a concord.v1.ResyncProgress: {e}")))?;
    if !valid_request_id(&progress.id) {
        return Err(invalid(format!("invalid request id {:?}", progress.id)));
    }
    // Who reports is the broker's word, not the message's.
    progress.system = system;
    Ok(progress)
}

/// Why [`request_resync`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("the broker refused the request: {0}")]
    Publish(#[from] concord_amqp::PublishError),
    #[error("the router refused the request: {0}")]
    Refused(String),
    #[error(
        "no answer from the router within {0:?} (is it running, with operator_user set to this user?)"
    )]
    NoAnswer(Duration),
    #[error("the reply stream ended")]
    Ended,
}

/// A resync in progress, as the operator follows it.
#[derive(Debug)]
pub struct ResyncWatch {
    conn: Connection,
    consumer: Consumer,
    /// The systems publishing snapshots (from the router's answer).
    pub systems: Vec<String>,
    /// The request's id.
    pub id: String,
}

impl ResyncWatch {
    /// The next progress report (`None` once every system reported it finished).
    pub async fn next(
        &mut self,
        finished: &std::collections::BTreeSet<String>,
    ) -> Result<Option<ResyncProgress>, ControlError> {
        if self.systems.iter().all(|s| finished.contains(s)) {
            return Ok(None);
        }
        loop {
            let delivery = self.consumer.next().await.ok_or(ControlError::Ended)??;
            delivery.ack().await?;
            if let Ok(ControlReply {
                reply: Some(control_reply::Reply::Progress(p)),
                ..
            }) = ControlReply::decode(delivery.body.as_slice())
            {
                return Ok(Some(p));
            }
        }
    }

    /// Closes the connection (the reply queue goes with it).
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// Asks the router (as the operator, on `amqp_uri`) to resync `request.target` and waits up to
/// `timeout` for its answer: the systems that will publish snapshots. Follow their progress
/// with [`ResyncWatch::next`].
pub async fn request_resync(
    amqp_uri: &str,
    options: &concord_amqp::ConnectOptions,
    topology: &Topology,
    request: ResyncRequest,
    timeout: Duration,
) -> Result<ResyncWatch, ControlError> {
    if !valid_request_id(&request.id) {
        return Err(ControlError::Refused(format!(
            "invalid request id {:?}",
            request.id
        )));
    }
    let name = concord_amqp::connection_name("concord-resync");
    let conn = concord_amqp::connect_with(amqp_uri, &name, options).await?;
    let channel = conn.open_channel().await?;
    let queue = topology.declare_reply_queue(&channel, &request.id).await?;
    let mut consumer = concord_amqp::consume(&channel, &queue, &name, 64).await?;
    let publisher = Publisher::open(&conn, PublisherOptions::default()).await?;
    let login = concord_amqp::login_of(amqp_uri).unwrap_or_default();
    let props = MessageProps::new()
        .header(HEADER_CONTROL, CONTROL_RESYNC)
        .message_id(request.id.as_str())
        .user_id(login);
    publisher
        .publish_confirmed(
            &topology.control_exchange(),
            CONTROL_REQUEST_KEY,
            &request.encode_to_vec(),
            props,
        )
        .await?;
    let answer = tokio::time::timeout(timeout, async {
        loop {
            let delivery = consumer.next().await.ok_or(ControlError::Ended)??;
            delivery.ack().await?;
            if let Ok(reply) = ControlReply::decode(delivery.body.as_slice()) {
                match reply.reply {
                    Some(control_reply::Reply::Accepted(a)) => return Ok(a.systems),
                    Some(control_reply::Reply::Refused(why)) => {
                        return Err(ControlError::Refused(why));
                    }
                    _ => {}
                }
            }
        }
    })
    .await
    .map_err(|_| ControlError::NoAnswer(timeout))?;
    let systems = match answer {
        Ok(s) => s,
        Err(e) => {
            let _ = conn.close().await;
            return Err(e);
        }
    };
    Ok(ResyncWatch {
        conn,
        consumer,
        systems,
        id: request.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_safe_in_names() {
        assert!(valid_request_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a.b"));
        assert!(!valid_request_id("a#"));
        assert!(!valid_request_id(&"a".repeat(65)));
    }
}
