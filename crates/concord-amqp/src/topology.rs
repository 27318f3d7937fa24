//! Names and declaration of Concord's exchanges and queues.
//!
//! ```text
//! adapters ──(rk <system>.<entity>)──▶ {ns}.ingress (topic) ──#──▶ {ns}.router (queue)
//! router ──(rk <target system>)──▶ {ns}.routed (direct) ──<system>──▶ {ns}.inbox.<system>
//! every queue ──dead-letter──▶ {ns}.dlx (direct) ──<key>──▶ {ns}.dlq.<key>
//! ```
//!
//! The router's DLQ is `dlq("router")`, each system's DLQ is `dlq(system)`. Both sides
//! (router and adapters) declare with the very same arguments (built by one private
//! function), so declaration is idempotent from anywhere.
//!
//! # Partitioned router input
//!
//! With [`Topology::with_partitions`] `P > 1` the single router queue is replaced by `P`
//! partition queues, so that several router replicas share the work without breaking
//! per-record order:
//!
//! ```text
//! {ns}.ingress (topic) ──#──▶ {ns}.partition (x-consistent-hash, hash-header = concord-key)
//!     ──"1"──▶ {ns}.router.p0 … {ns}.router.p{P-1}   (x-single-active-consumer = true)
//! ```
//!
//! The consistent-hash exchange (plugin `rabbitmq_consistent_hash_exchange`) hashes the
//! [`PARTITION_HASH_HEADER`] header (`<entity>/<key>`), so every event of one record lands
//! in the same partition queue; every queue is bound with weight `"1"` (equal shares). Each
//! partition queue has a single active consumer: any number of routers may subscribe to it,
//! the broker delivers to one of them at a time, and promotes the next one when the active
//! consumer's channel or connection goes away.
//!
//! The exchange hashes the header's AMQP type together with its value: publish it as a
//! (long) string, as every client does by default. A message **without** the header is
//! hashed as "no value": every such message goes to one and the same partition (it is never
//! dropped), but then not necessarily to the partition of the other events of its record,
//! so publishers of a partitioned deployment must always set the header.
//!
//! The key → partition mapping depends on the number of partition queues and on the order
//! in which they were bound (the broker rebuilds it from the bindings when it restarts).
//! Changing `P`, or deleting a partition queue, re-maps keys: do it with the router input
//! drained. Events of a record queued in two partitions around such a change may be routed
//! out of order; the receivers' per-field clocks still make the newest value win.

use lapin::{
    ExchangeKind,
    options::{
        ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use tracing::{debug, warn};

use crate::{
    channel::Channel,
    error::{AmqpError, short},
};

/// Default namespace of every name.
pub const DEFAULT_NAMESPACE: &str = "concord";
/// Default `x-delivery-limit` of quorum queues.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;
/// Dead-letter key (and DLQ suffix) of the router queue.
pub const ROUTER_DLQ_KEY: &str = "router";
/// Header naming the record of a message: `<entity>/<key>` (set by publishers; the partition
/// exchange hashes it).
pub const HEADER_KEY: &str = "concord-key";
/// Header of a routed copy: the system the change comes from.
pub const HEADER_ORIGIN: &str = "concord-origin";
/// Header of a dead letter: the reason code.
pub const HEADER_REASON: &str = "concord-reason";
/// Header of a dead letter: what was wrong, for people.
pub const HEADER_DETAIL: &str = "concord-detail";
/// Header of a router dead letter: the routing key the message was published with.
pub const HEADER_ROUTING_KEY: &str = "concord-routing-key";
/// The header the partition exchange hashes: the record key.
pub const PARTITION_HASH_HEADER: &str = HEADER_KEY;
/// Largest number of router partitions (queue names stay short, the broker stays sane).
pub const MAX_PARTITIONS: u16 = 1024;
/// Exchange type of the partition exchange (plugin `rabbitmq_consistent_hash_exchange`).
const CONSISTENT_HASH: &str = "x-consistent-hash";

/// Kind of the work queues (router queue and inboxes). DLQs are always plain durable
/// classic queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Durable classic queue, `x-queue-version = 2`.
    #[default]
    Classic,
    /// Quorum queue with `x-delivery-limit`, at-least-once dead-lettering and
    /// `x-overflow = reject-publish`.
    Quorum,
}

/// The names and declarations of one Concord namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    ns: String,
    queue_type: QueueType,
    delivery_limit: u32,
    partitions: u16,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new(DEFAULT_NAMESPACE)
    }
}

impl Topology {
    /// Topology of namespace `ns` with classic queues.
    #[must_use]
    pub fn new(ns: impl Into<String>) -> Self {
        Self {
            ns: ns.into(),
            queue_type: QueueType::default(),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            partitions: 1,
        }
    }

    /// Split the router input into `partitions` queues (see the module docs). `1` (the
    /// default; `0` counts as `1`) keeps the single `{ns}.router` queue. Values above
    /// [`MAX_PARTITIONS`] are capped.
    #[must_use]
    pub fn with_partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions.clamp(1, MAX_PARTITIONS);
        self
    }

    /// Number of router input queues (1: the single `{ns}.router` queue).
    #[must_use]
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Whether the router input is partitioned (more than one partition).
    #[must_use]
    pub fn is_partitioned(&self) -> bool {
        self.partitions > 1
    }

    /// Choose the work queue type.
    #[must_use]
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// `x-delivery-limit` of quorum work queues (ignored for classic queues).
    #[must_use]
    pub fn with_delivery_limit(mut self, delivery_limit: u32) -> Self {
        self.delivery_limit = delivery_limit;
        self
    }

    /// The namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The work queue type.
    #[must_use]
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    /// `{ns}.ingress`: durable topic exchange adapters publish to with routing key
    /// `<system>.<entity>`.
    #[must_use]
    pub fn ingress_exchange(&self) -> String {
        format!("{}.ingress", self.ns)
    }

    /// `{ns}.router`: the router's durable queue, bound to the ingress exchange with `#`.
    #[must_use]
    pub fn router_queue(&self) -> String {
        format!("{}.router", self.ns)
    }

    /// `{ns}.partition`: durable consistent-hash exchange bound to the ingress exchange with
    /// `#`, hashing the [`PARTITION_HASH_HEADER`] header (partitioned topologies only).
    #[must_use]
    pub fn partition_exchange(&self) -> String {
        format!("{}.partition", self.ns)
    }

    /// `{ns}.router.p{index}`: partition queue `index` (partitioned topologies only).
    #[must_use]
    pub fn partition_queue(&self, index: u16) -> String {
        format!("{}.router.p{index}", self.ns)
    }

    /// The router's input queues: `[{ns}.router]`, or the `P` partition queues in partition
    /// order (index `i` of the list is partition `i`).
    #[must_use]
    pub fn router_queues(&self) -> Vec<String> {
        if self.is_partitioned() {
            (0..self.partitions)
                .map(|i| self.partition_queue(i))
                .collect()
        } else {
            vec![self.router_queue()]
        }
    }

    /// `{ns}.routed`: durable direct exchange the router publishes to; routing key =
    /// target system.
    #[must_use]
    pub fn routed_exchange(&self) -> String {
        format!("{}.routed", self.ns)
    }

    /// `{ns}.inbox.{system}`: a system's durable inbox, bound to the routed exchange with
    /// routing key `system`.
    #[must_use]
    pub fn inbox(&self, system: &str) -> String {
        format!("{}.inbox.{system}", self.ns)
    }

    /// `{ns}.dlx`: durable topic dead-letter exchange (each DLQ bound with its exact name).
    #[must_use]
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.ns)
    }

    /// `{ns}.dlq.{name}`: a dead-letter queue, bound to the DLX with routing key `name`.
    #[must_use]
    pub fn dlq(&self, name: &str) -> String {
        format!("{}.dlq.{name}", self.ns)
    }

    /// The router's dead-letter queue, `dlq("router")`.
    #[must_use]
    pub fn router_dlq(&self) -> String {
        self.dlq(ROUTER_DLQ_KEY)
    }

    /// THE arguments of every work queue, used by both router and adapters so that
    /// re-declaration from either side is always equivalent.
    fn queue_arguments(&self, dead_letter_key: &str) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        args.insert("x-dead-letter-exchange".into(), text(&self.dlx()));
        args.insert("x-dead-letter-routing-key".into(), text(dead_letter_key));
        match self.queue_type {
            QueueType::Classic => {
                args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
            }
            QueueType::Quorum => {
                args.insert("x-queue-type".into(), text("quorum"));
                let limit = i32::try_from(self.delivery_limit).unwrap_or(i32::MAX);
                args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
                args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
                args.insert("x-overflow".into(), text("reject-publish"));
            }
        }
        args
    }

    fn validate_system(&self, system: &str) -> Result<(), AmqpError> {
        let invalid = |reason| {
            Err(AmqpError::InvalidName {
                name: system.to_owned(),
                reason,
            })
        };
        if system.is_empty() {
            return invalid("empty system name");
        }
        if system == ROUTER_DLQ_KEY {
            return invalid("\"router\" is reserved (it names the router's DLQ)");
        }
        // Checks that every derived name fits an AMQP short string.
        short(&self.inbox(system))?;
        short(&self.dlq(system))?;
        Ok(())
    }

    /// The arguments of a partition queue: those of the router queue plus a single active
    /// consumer.
    fn partition_queue_arguments(&self) -> FieldTable {
        let mut args = self.queue_arguments(ROUTER_DLQ_KEY);
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args
    }

    /// The arguments of the partition exchange.
    fn partition_exchange_arguments() -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "hash-header".into(),
            AMQPValue::LongString(LongString::from(PARTITION_HASH_HEADER)),
        );
        args
    }

    async fn declare_exchange(
        &self,
        channel: &Channel,
        name: &str,
        kind: ExchangeKind,
    ) -> Result<(), AmqpError> {
        self.declare_exchange_with(channel, name, kind, FieldTable::default())
            .await
    }

    async fn declare_exchange_with(
        &self,
        channel: &Channel,
        name: &str,
        kind: ExchangeKind,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .lapin()
            .exchange_declare(short(name)?, kind, options, arguments)
            .await?;
        Ok(())
    }

    async fn declare_exchanges(&self, channel: &Channel) -> Result<(), AmqpError> {
        self.declare_exchange(channel, &self.ingress_exchange(), ExchangeKind::Topic)
            .await?;
        self.declare_exchange(channel, &self.routed_exchange(), ExchangeKind::Direct)
            .await?;
        // A topic exchange, so that topic permissions can limit each system to dead-lettering
        // under its own name (bindings use exact keys, as on a direct exchange).
        self.declare_exchange(channel, &self.dlx(), ExchangeKind::Topic)
            .await
    }

    async fn declare_bound_queue(
        &self,
        channel: &Channel,
        queue: &str,
        arguments: FieldTable,
        exchange: &str,
        binding_key: &str,
    ) -> Result<(), AmqpError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .lapin()
            .queue_declare(short(queue)?, options, arguments)
            .await?;
        channel
            .lapin()
            .queue_bind(
                short(queue)?,
                short(exchange)?,
                short(binding_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        debug!(queue, exchange, binding_key, "declared queue");
        Ok(())
    }

    /// A DLQ: plain durable classic queue, no dead-lettering of its own.
    async fn declare_dlq(&self, channel: &Channel, key: &str) -> Result<(), AmqpError> {
        self.declare_bound_queue(
            channel,
            &self.dlq(key),
            FieldTable::default(),
            &self.dlx(),
            key,
        )
        .await
    }

    async fn declare_system(&self, channel: &Channel, system: &str) -> Result<(), AmqpError> {
        self.declare_dlq(channel, system).await?;
        self.declare_bound_queue(
            channel,
            &self.inbox(system),
            self.queue_arguments(system),
            &self.routed_exchange(),
            system,
        )
        .await
    }

    /// Declare everything the router side needs: the three exchanges, the router queue
    /// and its DLQ, and one inbox + DLQ per system. Idempotent.
    pub async fn declare_router(
        &self,
        channel: &Channel,
        systems: &[String],
    ) -> Result<(), AmqpError> {
        for system in systems {
            self.validate_system(system)?;
        }
        self.declare_exchanges(channel).await?;
        self.declare_dlq(channel, ROUTER_DLQ_KEY).await?;
        if self.is_partitioned() {
            self.declare_partitions(channel).await?;
        } else {
            self.declare_bound_queue(
                channel,
                &self.router_queue(),
                self.queue_arguments(ROUTER_DLQ_KEY),
                &self.ingress_exchange(),
                "#",
            )
            .await?;
        }
        for system in systems {
            self.declare_system(channel, system).await?;
        }
        Ok(())
    }

    /// The partition exchange, its binding to the ingress exchange and the partition queues
    /// (bound in partition order, each with weight 1).
    async fn declare_partitions(&self, channel: &Channel) -> Result<(), AmqpError> {
        let exchange = self.partition_exchange();
        if let Err(e) = self
            .declare_exchange_with(
                channel,
                &exchange,
                ExchangeKind::Custom(CONSISTENT_HASH.to_owned()),
                Self::partition_exchange_arguments(),
            )
            .await
        {
            warn!(
                exchange,
                error = %e,
                "declaring the partition exchange failed: is the RabbitMQ plugin \
                 rabbitmq_consistent_hash_exchange enabled?"
            );
            return Err(e);
        }
        channel
            .lapin()
            .exchange_bind(
                short(&exchange)?,
                short(&self.ingress_exchange())?,
                short("#")?,
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for i in 0..self.partitions {
            self.declare_bound_queue(
                channel,
                &self.partition_queue(i),
                self.partition_queue_arguments(),
                &exchange,
                "1",
            )
            .await?;
        }
        Ok(())
    }

    /// Declare what one adapter needs: the ingress and routed exchanges, the DLX, its
    /// inbox (bound to routed with key `system`) and its DLQ. Idempotent, and
    /// equivalent to what [`Topology::declare_router`] declares.
    pub async fn declare_inbox(&self, channel: &Channel, system: &str) -> Result<(), AmqpError> {
        self.validate_system(system)?;
        self.declare_exchanges(channel).await?;
        self.declare_system(channel, system).await
    }

    /// Checks, without declaring anything (no permission needed), that `system`'s inbox exists:
    /// the router declares it (or the broker definitions do). Fails with the broker's 404 while
    /// it does not (the channel is then closed).
    pub async fn check_inbox(&self, channel: &Channel, system: &str) -> Result<(), AmqpError> {
        self.validate_system(system)?;
        queue_message_count(channel, &self.inbox(system))
            .await
            .map(drop)
    }

    /// Delete every queue and exchange of the namespace (for tests' cleanup): the router
    /// queue, the partition exchange and this topology's partition queues (whatever the
    /// partition count, `{ns}.router` and `{ns}.partition` are deleted too), the router DLQ
    /// and each system's inbox and DLQ. Missing entities are ignored (RabbitMQ's deletes are
    /// idempotent; a 404 is also tolerated).
    pub async fn delete_all(&self, channel: &Channel, systems: &[String]) -> Result<(), AmqpError> {
        let mut queues = vec![self.router_queue(), self.router_dlq()];
        if self.is_partitioned() {
            queues.extend((0..self.partitions).map(|i| self.partition_queue(i)));
        }
        for system in systems {
            queues.push(self.inbox(system));
            queues.push(self.dlq(system));
        }
        for queue in queues {
            let result = channel
                .lapin()
                .queue_delete(short(&queue)?, QueueDeleteOptions::default())
                .await;
            ignore_not_found(result.map(|_| ()))?;
        }
        for exchange in [
            self.partition_exchange(),
            self.ingress_exchange(),
            self.routed_exchange(),
            self.dlx(),
        ] {
            let result = channel
                .lapin()
                .exchange_delete(short(&exchange)?, ExchangeDeleteOptions::default())
                .await;
            ignore_not_found(result)?;
        }
        Ok(())
    }
}

fn ignore_not_found(result: lapin::Result<()>) -> Result<(), AmqpError> {
    match result.map_err(AmqpError::from) {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// Number of ready messages in `queue` (passive declare). A missing queue is a 404
/// error, which also closes `channel`: use a scratch channel.
pub async fn queue_message_count(channel: &Channel, queue: &str) -> Result<u32, AmqpError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .lapin()
        .queue_declare(short(queue)?, options, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg<'a>(args: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
        args.inner().get(key)
    }

    fn text(value: &str) -> AMQPValue {
        AMQPValue::LongString(value.into())
    }

    #[test]
    fn names() {
        let t = Topology::default();
        assert_eq!(t.ingress_exchange(), "concord.ingress");
        assert_eq!(t.router_queue(), "concord.router");
        assert_eq!(t.routed_exchange(), "concord.routed");
        assert_eq!(t.inbox("crm"), "concord.inbox.crm");
        assert_eq!(t.dlx(), "concord.dlx");
        assert_eq!(t.dlq("crm"), "concord.dlq.crm");
        assert_eq!(t.router_dlq(), "concord.dlq.router");
        assert_eq!(Topology::new("t1").inbox("erp"), "t1.inbox.erp");
    }

    #[test]
    fn classic_arguments() {
        let args = Topology::new("ns").queue_arguments("crm");
        assert_eq!(arg(&args, "x-dead-letter-exchange"), Some(&text("ns.dlx")));
        assert_eq!(arg(&args, "x-dead-letter-routing-key"), Some(&text("crm")));
        assert_eq!(arg(&args, "x-queue-version"), Some(&AMQPValue::LongInt(2)));
        assert_eq!(arg(&args, "x-queue-type"), None);
        assert_eq!(args.inner().len(), 3);
    }

    #[test]
    fn quorum_arguments() {
        let t = Topology::new("ns")
            .with_queue_type(QueueType::Quorum)
            .with_delivery_limit(7);
        let args = t.queue_arguments("router");
        assert_eq!(arg(&args, "x-queue-type"), Some(&text("quorum")));
        assert_eq!(arg(&args, "x-delivery-limit"), Some(&AMQPValue::LongInt(7)));
        assert_eq!(
            arg(&args, "x-dead-letter-strategy"),
            Some(&text("at-least-once"))
        );
        assert_eq!(arg(&args, "x-overflow"), Some(&text("reject-publish")));
        assert_eq!(
            arg(&args, "x-dead-letter-routing-key"),
            Some(&text("router"))
        );
        assert_eq!(arg(&args, "x-queue-version"), None);
        assert_eq!(
            Topology::default()
                .with_queue_type(QueueType::Quorum)
                .queue_arguments("x")
                .inner()
                .get("x-delivery-limit"),
            Some(&AMQPValue::LongInt(20))
        );
    }

    #[test]
    fn partition_names() {
        let single = Topology::new("ns");
        assert_eq!(single.partitions(), 1);
        assert!(!single.is_partitioned());
        assert_eq!(single.router_queues(), vec!["ns.router".to_owned()]);
        assert_eq!(single.clone().with_partitions(0), single);
        assert_eq!(single.clone().with_partitions(1), single);

        let t = Topology::new("ns").with_partitions(3);
        assert!(t.is_partitioned());
        assert_eq!(t.partition_exchange(), "ns.partition");
        assert_eq!(t.partition_queue(2), "ns.router.p2");
        assert_eq!(
            t.router_queues(),
            vec!["ns.router.p0", "ns.router.p1", "ns.router.p2"]
        );
        assert_eq!(
            Topology::new("ns").with_partitions(u16::MAX).partitions(),
            MAX_PARTITIONS
        );
    }

    #[test]
    fn partition_arguments() {
        let args = Topology::new("ns")
            .with_partitions(4)
            .partition_queue_arguments();
        assert_eq!(
            arg(&args, "x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        assert_eq!(arg(&args, "x-dead-letter-exchange"), Some(&text("ns.dlx")));
        assert_eq!(
            arg(&args, "x-dead-letter-routing-key"),
            Some(&text("router"))
        );
        assert_eq!(arg(&args, "x-queue-version"), Some(&AMQPValue::LongInt(2)));

        let quorum = Topology::new("ns")
            .with_partitions(4)
            .with_queue_type(QueueType::Quorum)
            .partition_queue_arguments();
        assert_eq!(arg(&quorum, "x-queue-type"), Some(&text("quorum")));
        assert_eq!(
            arg(&quorum, "x-delivery-limit"),
            Some(&AMQPValue::LongInt(20))
        );
        assert_eq!(
            arg(&quorum, "x-dead-letter-strategy"),
            Some(&text("at-least-once"))
        );
        assert_eq!(arg(&quorum, "x-overflow"), Some(&text("reject-publish")));
        assert_eq!(
            arg(&quorum, "x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );

        let exchange = Topology::partition_exchange_arguments();
        assert_eq!(arg(&exchange, "hash-header"), Some(&text("concord-key")));
        assert_eq!(exchange.inner().len(), 1);
    }

    #[test]
    fn system_names_are_validated() {
        let t = Topology::default();
        assert!(t.validate_system("crm").is_ok());
        assert!(t.validate_system("").is_err());
        assert!(t.validate_system("router").is_err());
        assert!(t.validate_system(&"s".repeat(250)).is_err());
    }
}
