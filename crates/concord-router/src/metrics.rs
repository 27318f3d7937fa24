//! Prometheus metrics of the router, with bounded label sets: only systems and entities of the
//! current policy and fixed reason codes ever become label values; anything else is `unknown`.

use std::collections::HashMap;
use std::fmt;

use concord_policy::{DeadLetterReason, Policy, RejectReason};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Label value for sources, entities and targets the policy does not know.
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceEntity {
    source: String,
    entity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: String,
}

/// The buckets of the end-to-end lag: 1 ms to about 9 minutes.
fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decision {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Target {
    target: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Partition {
    partition: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadResult {
    result: &'static str,
}

/// The `result` of a policy reload, as counted in `concord_router_policy_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResultLabel {
    /// The new policy was valid and is in force.
    Applied,
    /// The file holds the policy already in force.
    Unchanged,
    /// The new policy or schema is invalid; the old ones keep running.
    Invalid,
    /// The new schema breaks fields the policy in force uses (renumbered, retyped, renamed,
    /// removed); the old policy and schema keep running.
    Breaking,
    /// The file could not be read, or the new inboxes could not be declared.
    Error,
}

impl ReloadResultLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResultLabel::Applied => "applied",
            ReloadResultLabel::Unchanged => "unchanged",
            ReloadResultLabel::Invalid => "invalid",
            ReloadResultLabel::Breaking => "breaking",
            ReloadResultLabel::Error => "error",
        }
    }
}

/// Label value of accepted fields in `concord_router_fields_total`.
const ACCEPTED_REASON: &str = "owner";

/// Every metric of the router, registered in one registry.
pub struct Metrics {
    registry: Registry,
    events_in: Family<SourceEntity, Counter>,
    fields: Family<Decision, Counter>,
    deliveries: Family<Target, Counter>,
    dead_lettered: Family<Reason, Counter>,
    publish_confirm: Histogram,
    lag: Family<Source, Histogram, fn() -> Histogram>,
    reloads: Family<ReloadResult, Counter>,
    connected: Gauge,
    partition_events: Family<Partition, Counter>,
    partition_subscribed: Family<Partition, Gauge>,
    redelivered: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("concord_router");
        let m = Metrics {
            registry: Registry::default(),
            events_in: Family::default(),
            fields: Family::default(),
            deliveries: Family::default(),
            dead_lettered: Family::default(),
            publish_confirm: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            lag: Family::new_with_constructor(lag_histogram),
            reloads: Family::default(),
            connected: Gauge::default(),
            partition_events: Family::default(),
            partition_subscribed: Family::default(),
            redelivered: Counter::default(),
        };
        registry.register(
            "events_in",
            "Input change events received, by source system and entity",
            m.events_in.clone(),
        );
        registry.register(
            "fields",
            "Changed fields of input events, accepted (the source owns them) or rejected",
            m.fields.clone(),
        );
        registry.register(
            "deliveries",
            "Projections published to a system's inbox and confirmed",
            m.deliveries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Input messages (or parts of them) sent to the dead-letter queue, by reason",
            m.dead_lettered.clone(),
        );
        registry.register_with_unit(
            "publish_confirm",
            "Time from publishing an input's messages until the broker confirmed all of them",
            Unit::Seconds,
            m.publish_confirm.clone(),
        );
        registry.register_with_unit(
            "end_to_end_lag",
            "Time from the source system observing a change until the router processed it, by source system",
            Unit::Seconds,
            m.lag.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy reloads, by result",
            m.reloads.clone(),
        );
        registry.register(
            "connected",
            "1 while the router is connected to the broker and consuming, else 0",
            m.connected.clone(),
        );
        registry.register(
            "partition_events",
            "Input messages received from each partition queue (partitioned input only): the \
             partitions this replica is the active consumer of",
            m.partition_events.clone(),
        );
        registry.register(
            "partition_subscribed",
            "1 while this replica has a consumer (active or standby) on the partition queue, else 0 \
             (partitioned input only)",
            m.partition_subscribed.clone(),
        );
        registry.register(
            "redelivered",
            "Input messages the broker delivered again: inputs a router received but did not \
             acknowledge before its connection was lost (after a reconnect, or taken over from \
             another replica)",
            m.redelivered.clone(),
        );
        // Fixed label values are created up front so that dashboards see zeros, not gaps.
        for r in [
            ReloadResultLabel::Applied,
            ReloadResultLabel::Unchanged,
            ReloadResultLabel::Invalid,
            ReloadResultLabel::Breaking,
            ReloadResultLabel::Error,
        ] {
            drop(
                m.reloads
                    .get_or_create(&ReloadResult { result: r.as_str() }),
            );
        }
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Hot-path handles for the label values of `policy`.
    pub(crate) fn handles(&self, policy: &Policy) -> Handles {
        let mut events_in: HashMap<String, HashMap<String, Counter>> = HashMap::new();
        for system in policy.systems() {
            let per_entity = events_in.entry(system.clone()).or_default();
            for entity in policy.entities() {
                per_entity.insert(
                    entity.name.clone(),
                    self.events_in.get_or_create_owned(&SourceEntity {
                        source: system.clone(),
                        entity: entity.name.clone(),
                    }),
                );
            }
            per_entity.insert(
                UNKNOWN.to_owned(),
                self.events_in.get_or_create_owned(&SourceEntity {
                    source: system.clone(),
                    entity: UNKNOWN.to_owned(),
                }),
            );
        }
        let deliveries = policy
            .systems()
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    self.deliveries
                        .get_or_create_owned(&Target { target: s.clone() }),
                )
            })
            .collect();
        let lag = policy
            .systems()
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    self.lag.get_or_create_owned(&Source { source: s.clone() }),
                )
            })
            .collect();
        Handles {
            events_in,
            lag,
            lag_unknown: self.lag.get_or_create_owned(&Source {
                source: UNKNOWN.to_owned(),
            }),
            events_in_unknown: self.events_in.get_or_create_owned(&SourceEntity {
                source: UNKNOWN.to_owned(),
                entity: UNKNOWN.to_owned(),
            }),
            deliveries,
            deliveries_unknown: self.deliveries.get_or_create_owned(&Target {
                target: UNKNOWN.to_owned(),
            }),
            accepted: self.fields.get_or_create_owned(&Decision {
                decision: "accepted",
                reason: ACCEPTED_REASON,
            }),
        }
    }

    pub(crate) fn rejected_field(&self, reason: RejectReason) {
        self.fields
            .get_or_create(&Decision {
                decision: "rejected",
                reason: reason.as_str(),
            })
            .inc();
    }

    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        self.dead_lettered
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub(crate) fn observe_confirm(&self, seconds: f64) {
        self.publish_confirm.observe(seconds);
    }

    pub(crate) fn reload(&self, result: ReloadResultLabel) {
        self.reloads
            .get_or_create(&ReloadResult {
                result: result.as_str(),
            })
            .inc();
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// The counter of inputs received from partition `partition`.
    pub(crate) fn partition_counter(&self, partition: u16) -> Counter {
        self.partition_events
            .get_or_create_owned(&Partition { partition })
    }

    pub(crate) fn set_partition_subscribed(&self, partition: u16, subscribed: bool) {
        self.partition_subscribed
            .get_or_create(&Partition { partition })
            .set(i64::from(subscribed));
    }

    pub(crate) fn redelivered(&self) {
        self.redelivered.inc();
    }

    /// Current value of `concord_router_redelivered_total`.
    pub fn redelivered_total(&self) -> u64 {
        self.redelivered.get()
    }

    /// Current value of `concord_router_partition_events_total{partition}`.
    pub fn partition_events_total(&self, partition: u16) -> u64 {
        self.partition_events
            .get(&Partition { partition })
            .map_or(0, |c| c.get())
    }

    /// Whether this replica currently has a consumer on partition `partition`
    /// (`concord_router_partition_subscribed{partition}`).
    pub fn partition_subscribed(&self, partition: u16) -> bool {
        self.partition_subscribed
            .get(&Partition { partition })
            .is_some_and(|g| g.get() == 1)
    }

    /// Current value of `concord_router_events_in_total{source,entity}`.
    pub fn events_in_total(&self, source: &str, entity: &str) -> u64 {
        self.events_in
            .get(&SourceEntity {
                source: source.to_owned(),
                entity: entity.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// Sum of `concord_router_events_in_total` over every label set.
    pub fn events_in_sum(&self) -> u64 {
        let mut sum = 0;
        // Family has no iterator; the text exposition is the only complete view.
        for line in self.encode().lines() {
            if let Some(rest) = line.strip_prefix("concord_router_events_in_total{")
                && let Some((_, v)) = rest.rsplit_once(' ')
            {
                sum += v.parse::<u64>().unwrap_or(0);
            }
        }
        sum
    }

    /// Current value of `concord_router_deliveries_total{target}`.
    pub fn deliveries_total(&self, target: &str) -> u64 {
        self.deliveries
            .get(&Target {
                target: target.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// Current value of `concord_router_dead_lettered_total{reason}`.
    pub fn dead_lettered_total(&self, reason: DeadLetterReason) -> u64 {
        self.dead_lettered
            .get(&Reason {
                reason: reason.as_str(),
            })
            .map_or(0, |c| c.get())
    }

    /// Current value of `concord_router_policy_reloads_total{result}`.
    pub fn policy_reloads_total(&self, result: ReloadResultLabel) -> u64 {
        self.reloads
            .get(&ReloadResult {
                result: result.as_str(),
            })
            .map_or(0, |c| c.get())
    }

    /// Current value of `concord_router_connected`.
    pub fn connected(&self) -> bool {
        self.connected.get() == 1
    }
}

/// Counters for the label values of one policy, looked up without locks on the hot path.
#[derive(Debug, Clone)]
pub(crate) struct Handles {
    events_in: HashMap<String, HashMap<String, Counter>>,
    /// The end-to-end lag by source system.
    lag: HashMap<String, Histogram>,
    lag_unknown: Histogram,
    events_in_unknown: Counter,
    deliveries: HashMap<String, Counter>,
    deliveries_unknown: Counter,
    accepted: Counter,
}

impl Handles {
    /// Counts an input by its routing key `<source>.<entity>`.
    pub(crate) fn event_in(&self, routing_key: &str) {
        let (source, entity) = routing_key.split_once('.').unwrap_or((routing_key, ""));
        match self.events_in.get(source) {
            Some(per_entity) => match per_entity.get(entity).or_else(|| per_entity.get(UNKNOWN)) {
                Some(c) => c.inc(),
                None => self.events_in_unknown.inc(),
            },
            None => self.events_in_unknown.inc(),
        };
    }

    /// The counter of confirmed deliveries to `target`.
    pub(crate) fn delivery_counter(&self, target: &str) -> Counter {
        self.deliveries
            .get(target)
            .unwrap_or(&self.deliveries_unknown)
            .clone()
    }

    pub(crate) fn accepted(&self, n: usize) {
        self.accepted.inc_by(n as u64);
    }

    /// Observes the end-to-end lag of an event from `source`.
    pub(crate) fn observe_lag(&self, source: &str, seconds: f64) {
        self.lag
            .get(source)
            .unwrap_or(&self.lag_unknown)
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [systems.orders]
        [systems.delivery]
        [entities.customer]
        message = "seed.v1.Customer"
        [entities.customer.fields]
        name = { owner = "orders", visible = ["delivery"] }
    "#;

    #[test]
    fn labels_stay_within_the_policy() {
        let m = Metrics::new();
        let pool =
            prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET).unwrap();
        let policy = Policy::from_toml(POLICY, "p.toml", &pool).unwrap();
        let h = m.handles(&policy);
        h.event_in("orders.customer");
        h.event_in("orders.invoice");
        h.event_in("intruder.customer");
        h.event_in("garbage");
        h.delivery_counter("delivery").inc();
        h.accepted(3);
        m.rejected_field(RejectReason::NotOwner);
        m.dead_lettered(DeadLetterReason::Undecodable);
        m.reload(ReloadResultLabel::Invalid);
        m.set_connected(true);
        m.partition_counter(3).inc();
        m.redelivered();
        assert_eq!(m.redelivered_total(), 1);
        m.set_partition_subscribed(3, true);
        m.set_partition_subscribed(4, false);
        assert_eq!(m.partition_events_total(3), 1);
        assert_eq!(m.partition_events_total(4), 0);
        assert!(m.partition_subscribed(3));
        assert!(!m.partition_subscribed(4));
        assert_eq!(m.events_in_total("orders", "customer"), 1);
        assert_eq!(m.events_in_total("orders", UNKNOWN), 1);
        assert_eq!(m.events_in_total(UNKNOWN, UNKNOWN), 2);
        assert_eq!(m.events_in_total("intruder", "customer"), 0);
        assert_eq!(m.events_in_sum(), 4);
        assert_eq!(m.deliveries_total("delivery"), 1);
        assert_eq!(m.dead_lettered_total(DeadLetterReason::Undecodable), 1);
        assert_eq!(m.policy_reloads_total(ReloadResultLabel::Invalid), 1);
        assert!(m.connected());
        let text = m.encode();
        for needle in [
            "concord_router_events_in_total{source=\"orders\",entity=\"customer\"} 1",
            "concord_router_fields_total{decision=\"accepted\",reason=\"owner\"} 3",
            "concord_router_fields_total{decision=\"rejected\",reason=\"not_owner\"} 1",
            "concord_router_deliveries_total{target=\"delivery\"} 1",
            "concord_router_dead_lettered_total{reason=\"undecodable\"} 1",
            "concord_router_policy_reloads_total{result=\"invalid\"} 1",
            "concord_router_policy_reloads_total{result=\"applied\"} 0",
            "concord_router_policy_reloads_total{result=\"breaking\"} 0",
            "concord_router_connected 1",
            "concord_router_partition_events_total{partition=\"3\"} 1",
            "concord_router_redelivered_total 1",
            "concord_router_partition_subscribed{partition=\"3\"} 1",
            "concord_router_partition_subscribed{partition=\"4\"} 0",
            "# TYPE concord_router_publish_confirm_seconds histogram",
            "# TYPE concord_router_end_to_end_lag_seconds histogram",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains("intruder"));
    }
}
