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
/// Header of a resync input (on `{ns}.resync`): the one system its copies go to.
pub const HEADER_RESYNC_TARGET: &str = "concord-resync-target";
/// Header of a control message (never applied as data): `resync` (router → an owner's inbox)
/// or `progress` (an adapter → the router, on `{ns}.resync`).
pub const HEADER_CONTROL: &str = "concord-control";
/// Routing key of the operator's requests on `{ns}.control`.
pub const CONTROL_REQUEST_KEY: &str = "request";
/// Prefix of the routing key of the router's replies on `{ns}.control` (`reply.<request id>`).
pub const CONTROL_REPLY_PREFIX: &str = "reply.";
/// The header the partition exchange hashes: the record key.
pub const PARTITION_HASH_HEADER: &str = HEADER_KEY;
/// Largest number of router partitions (queue names stay short, the broker stays sane).
pub const MAX_PARTITIONS: u16 = 1024;
/// Exchange type of the partition exchange (plugin `rabbitmq_consistent_hash_exchange`).
const CONSISTENT_HASH: &str = "x-consistent-hash";

/// A queue or exchange argument value (the AMQP field types Concord uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// A long string.
    Text(String),
    /// A signed 32-bit integer.
    Int(i32),
    /// A boolean.
    Bool(bool),
}

impl Arg {
    fn text(s: &str) -> Arg {
        Arg::Text(s.to_owned())
    }
}

/// Arguments by name, in name order.
pub type Arguments = std::collections::BTreeMap<String, Arg>;

/// A durable exchange to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangePlan {
    pub name: String,
    /// `topic`, `direct` or `x-consistent-hash`.
    pub kind: String,
    pub arguments: Arguments,
}

/// A durable queue to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePlan {
    pub name: String,
    pub arguments: Arguments,
}

/// A binding from exchange `source` to a queue or exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingPlan {
    pub source: String,
    pub destination: String,
    pub destination_is_exchange: bool,
    pub routing_key: String,
}

/// A namespace's exchanges, queues and bindings as data ([`Topology::plan`]): one description
/// for the declarations and for the broker definitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub exchanges: Vec<ExchangePlan>,
    pub queues: Vec<QueuePlan>,
    /// In declaration order (the partition queues' order is their partition order).
    pub bindings: Vec<BindingPlan>,
}

fn field_table(arguments: &Arguments) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        let value = match value {
            Arg::Text(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Arg::Int(i) => AMQPValue::LongInt(*i),
            Arg::Bool(b) => AMQPValue::Boolean(*b),
        };
        table.insert(name.as_str().into(), value);
    }
    table
}

/// Kind of the queues: the work queues (router queue and inboxes) and the DLQs (which have no
/// dead-lettering or delivery limit of their own). Quorum queues are replicated on a cluster:
/// with them, every queue survives the loss of a minority of its nodes (a classic DLQ would
/// not, and while its node is down nobody could declare the topology).
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

    /// `{ns}.resync`: durable topic exchange the owners' adapters publish resync snapshots (and
    /// their progress) to, with routing key `<system>.<entity>`: the backfill lane.
    #[must_use]
    pub fn resync_exchange(&self) -> String {
        format!("{}.resync", self.ns)
    }

    /// `{ns}.router.resync`: the router's resync input, bound to the resync exchange with `#`
    /// (never partitioned: a resync carries the field stamps, so its order does not matter).
    #[must_use]
    pub fn resync_queue(&self) -> String {
        format!("{}.router.resync", self.ns)
    }

    /// `{ns}.control`: durable direct exchange of the operator's requests (key `request`) and
    /// of the router's replies (key `reply.<request id>`).
    #[must_use]
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.ns)
    }

    /// `{ns}.router.control`: the router's queue of operator requests.
    #[must_use]
    pub fn control_queue(&self) -> String {
        format!("{}.router.control", self.ns)
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

    /// THE arguments of every work queue, used by both router and adapters (and by the broker
    /// definitions) so that re-declaration from anywhere is always equivalent.
    fn queue_arguments(&self, dead_letter_key: &str) -> Arguments {
        let mut args = Arguments::new();
        args.insert("x-dead-letter-exchange".into(), Arg::text(&self.dlx()));
        args.insert(
            "x-dead-letter-routing-key".into(),
            Arg::text(dead_letter_key),
        );
        match self.queue_type {
            QueueType::Classic => {
                args.insert("x-queue-version".into(), Arg::Int(2));
            }
            QueueType::Quorum => {
                args.insert("x-queue-type".into(), Arg::text("quorum"));
                let limit = i32::try_from(self.delivery_limit).unwrap_or(i32::MAX);
                args.insert("x-delivery-limit".into(), Arg::Int(limit));
                args.insert("x-dead-letter-strategy".into(), Arg::text("at-least-once"));
                args.insert("x-overflow".into(), Arg::text("reject-publish"));
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
    fn partition_queue_arguments(&self) -> Arguments {
        let mut args = self.queue_arguments(ROUTER_DLQ_KEY);
        args.insert("x-single-active-consumer".into(), Arg::Bool(true));
        args
    }

    /// The three exchanges every deployment has.
    fn plan_exchanges(&self, plan: &mut Plan) {
        let exchange = |name: String, kind: &str| ExchangePlan {
            name,
            kind: kind.to_owned(),
            arguments: Arguments::new(),
        };
        plan.exchanges
            .push(exchange(self.ingress_exchange(), "topic"));
        plan.exchanges
            .push(exchange(self.routed_exchange(), "direct"));
        // A topic exchange, so that topic permissions can limit each system to dead-lettering
        // under its own name (bindings use exact keys, as on a direct exchange).
        plan.exchanges.push(exchange(self.dlx(), "topic"));
        plan.exchanges
            .push(exchange(self.resync_exchange(), "topic"));
        plan.exchanges
            .push(exchange(self.control_exchange(), "direct"));
    }

    fn plan_bound_queue(
        plan: &mut Plan,
        queue: String,
        arguments: Arguments,
        exchange: String,
        routing_key: &str,
    ) {
        plan.bindings.push(BindingPlan {
            source: exchange,
            destination: queue.clone(),
            destination_is_exchange: false,
            routing_key: routing_key.to_owned(),
        });
        plan.queues.push(QueuePlan {
            name: queue,
            arguments,
        });
    }

    /// A DLQ: a durable queue of the topology's type, no dead-lettering of its own.
    fn plan_dlq(&self, plan: &mut Plan, key: &str) {
        let mut arguments = Arguments::new();
        if self.queue_type == QueueType::Quorum {
            arguments.insert("x-queue-type".into(), Arg::text("quorum"));
        }
        Self::plan_bound_queue(plan, self.dlq(key), arguments, self.dlx(), key);
    }

    fn plan_system(&self, plan: &mut Plan, system: &str) {
        self.plan_dlq(plan, system);
        Self::plan_bound_queue(
            plan,
            self.inbox(system),
            self.queue_arguments(system),
            self.routed_exchange(),
            system,
        );
    }

    /// Everything the router side needs, as data: the exchanges, the router queue (or the
    /// partition exchange and queues, bound in partition order, each with weight 1) and its DLQ,
    /// and one inbox + DLQ per system. What [`Topology::declare_router`] declares and what the
    /// broker definitions (`concord broker-defs`) hold.
    pub fn plan(&self, systems: &[String]) -> Result<Plan, AmqpError> {
        for system in systems {
            self.validate_system(system)?;
        }
        let mut plan = Plan::default();
        self.plan_exchanges(&mut plan);
        self.plan_dlq(&mut plan, ROUTER_DLQ_KEY);
        if self.is_partitioned() {
            let exchange = self.partition_exchange();
            let mut arguments = Arguments::new();
            arguments.insert("hash-header".into(), Arg::text(PARTITION_HASH_HEADER));
            plan.exchanges.push(ExchangePlan {
                name: exchange.clone(),
                kind: CONSISTENT_HASH.to_owned(),
                arguments,
            });
            plan.bindings.push(BindingPlan {
                source: self.ingress_exchange(),
                destination: exchange.clone(),
                destination_is_exchange: true,
                routing_key: "#".to_owned(),
            });
            for i in 0..self.partitions {
                Self::plan_bound_queue(
                    &mut plan,
                    self.partition_queue(i),
                    self.partition_queue_arguments(),
                    exchange.clone(),
                    "1",
                );
            }
        } else {
            Self::plan_bound_queue(
                &mut plan,
                self.router_queue(),
                self.queue_arguments(ROUTER_DLQ_KEY),
                self.ingress_exchange(),
                "#",
            );
        }
        // The backfill lane and the operator's requests: one queue each, whatever the
        // partitioning.
        Self::plan_bound_queue(
            &mut plan,
            self.resync_queue(),
            self.queue_arguments(ROUTER_DLQ_KEY),
            self.resync_exchange(),
            "#",
        );
        Self::plan_bound_queue(
            &mut plan,
            self.control_queue(),
            self.queue_arguments(ROUTER_DLQ_KEY),
            self.control_exchange(),
            CONTROL_REQUEST_KEY,
        );
        for system in systems {
            self.plan_system(&mut plan, system);
        }
        Ok(plan)
    }

    /// Declares `plan`: exchanges, then queues, then bindings in order. Idempotent.
    async fn declare_plan(&self, channel: &Channel, plan: &Plan) -> Result<(), AmqpError> {
        let lapin = channel.lapin();
        for e in &plan.exchanges {
            let options = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            let kind = match e.kind.as_str() {
                "topic" => ExchangeKind::Topic,
                "direct" => ExchangeKind::Direct,
                "fanout" => ExchangeKind::Fanout,
                "headers" => ExchangeKind::Headers,
                other => ExchangeKind::Custom(other.to_owned()),
            };
            let declared = lapin
                .exchange_declare(short(&e.name)?, kind, options, field_table(&e.arguments))
                .await;
            if let Err(err) = declared {
                if e.kind == CONSISTENT_HASH {
                    warn!(
                        exchange = e.name,
                        error = %err,
                        "declaring the partition exchange failed: is the RabbitMQ plugin \
                         rabbitmq_consistent_hash_exchange enabled?"
                    );
                }
                return Err(err.into());
            }
        }
        for q in &plan.queues {
            let options = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            lapin
                .queue_declare(short(&q.name)?, options, field_table(&q.arguments))
                .await?;
        }
        for b in &plan.bindings {
            if b.destination_is_exchange {
                lapin
                    .exchange_bind(
                        short(&b.destination)?,
                        short(&b.source)?,
                        short(&b.routing_key)?,
                        ExchangeBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            } else {
                lapin
                    .queue_bind(
                        short(&b.destination)?,
                        short(&b.source)?,
                        short(&b.routing_key)?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            debug!(
                destination = b.destination,
                source = b.source,
                key = b.routing_key,
                "declared binding"
            );
        }
        Ok(())
    }

    /// Declare everything the router side needs ([`Topology::plan`]). Idempotent.
    pub async fn declare_router(
        &self,
        channel: &Channel,
        systems: &[String],
    ) -> Result<(), AmqpError> {
        let plan = self.plan(systems)?;
        self.declare_plan(channel, &plan).await
    }

    /// Declare what one adapter needs: the ingress and routed exchanges, the DLX, its
    /// inbox (bound to routed with key `system`) and its DLQ. Idempotent, and
    /// equivalent to what [`Topology::declare_router`] declares.
    pub async fn declare_inbox(&self, channel: &Channel, system: &str) -> Result<(), AmqpError> {
        self.validate_system(system)?;
        let mut plan = Plan::default();
        self.plan_exchanges(&mut plan);
        self.plan_system(&mut plan, system);
        self.declare_plan(channel, &plan).await
    }

    /// Declares the operator's reply queue of control request `id`: `{ns}.control.reply.<id>`,
    /// exclusive to this connection and deleted with it, bound to the control exchange with
    /// `reply.<id>`. Returns its name.
    pub async fn declare_reply_queue(
        &self,
        channel: &Channel,
        id: &str,
    ) -> Result<String, AmqpError> {
        let queue = format!("{}.control.reply.{id}", self.ns);
        let key = format!("{CONTROL_REPLY_PREFIX}{id}");
        let lapin = channel.lapin();
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        lapin
            .queue_declare(short(&queue)?, options, FieldTable::default())
            .await?;
        lapin
            .queue_bind(
                short(&queue)?,
                short(&self.control_exchange())?,
                short(&key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(queue)
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
        let mut queues = vec![
            self.router_queue(),
            self.router_dlq(),
            self.resync_queue(),
            self.control_queue(),
        ];
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
            self.resync_exchange(),
            self.control_exchange(),
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

    fn arg<'a>(args: &'a Arguments, key: &str) -> Option<&'a Arg> {
        args.get(key)
    }

    fn text(value: &str) -> Arg {
        Arg::Text(value.into())
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
        assert_eq!(arg(&args, "x-queue-version"), Some(&Arg::Int(2)));
        assert_eq!(arg(&args, "x-queue-type"), None);
        assert_eq!(args.len(), 3);
    }

    #[test]
    fn quorum_arguments() {
        let t = Topology::new("ns")
            .with_queue_type(QueueType::Quorum)
            .with_delivery_limit(7);
        let args = t.queue_arguments("router");
        assert_eq!(arg(&args, "x-queue-type"), Some(&text("quorum")));
        assert_eq!(arg(&args, "x-delivery-limit"), Some(&Arg::Int(7)));
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
                .get("x-delivery-limit"),
            Some(&Arg::Int(20))
        );
    }

    #[test]
    fn dlqs_have_the_queue_type_of_the_topology() {
        let systems = ["crm".to_owned()];
        for (queue_type, expected) in [
            (QueueType::Classic, None),
            (QueueType::Quorum, Some(text("quorum"))),
        ] {
            let plan = Topology::new("ns")
                .with_queue_type(queue_type)
                .plan(&systems)
                .unwrap();
            for name in ["ns.dlq.router", "ns.dlq.crm"] {
                let dlq = plan.queues.iter().find(|q| q.name == name).unwrap();
                assert_eq!(
                    dlq.arguments.get("x-queue-type"),
                    expected.as_ref(),
                    "{name}"
                );
                // No dead-lettering or delivery limit of their own.
                assert_eq!(
                    dlq.arguments.len(),
                    usize::from(expected.is_some()),
                    "{name}"
                );
            }
        }
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
            Some(&Arg::Bool(true))
        );
        assert_eq!(arg(&args, "x-dead-letter-exchange"), Some(&text("ns.dlx")));
        assert_eq!(
            arg(&args, "x-dead-letter-routing-key"),
            Some(&text("router"))
        );
        assert_eq!(arg(&args, "x-queue-version"), Some(&Arg::Int(2)));

        let quorum = Topology::new("ns")
            .with_partitions(4)
            .with_queue_type(QueueType::Quorum)
            .partition_queue_arguments();
        assert_eq!(arg(&quorum, "x-queue-type"), Some(&text("quorum")));
        assert_eq!(arg(&quorum, "x-delivery-limit"), Some(&Arg::Int(20)));
        assert_eq!(
            arg(&quorum, "x-dead-letter-strategy"),
            Some(&text("at-least-once"))
        );
        assert_eq!(arg(&quorum, "x-overflow"), Some(&text("reject-publish")));
        assert_eq!(
            arg(&quorum, "x-single-active-consumer"),
            Some(&Arg::Bool(true))
        );

        let plan = Topology::new("ns").with_partitions(4).plan(&[]).unwrap();
        let exchange = plan
            .exchanges
            .iter()
            .find(|e| e.name == "ns.partition")
            .unwrap();
        assert_eq!(exchange.kind, "x-consistent-hash");
        assert_eq!(
            arg(&exchange.arguments, "hash-header"),
            Some(&text("concord-key"))
        );
        assert_eq!(exchange.arguments.len(), 1);
        let bound: Vec<&str> = plan
            .bindings
            .iter()
            .filter(|b| b.source == "ns.partition")
            .map(|b| b.destination.as_str())
            .collect();
        assert_eq!(
            bound,
            [
                "ns.router.p0",
                "ns.router.p1",
                "ns.router.p2",
                "ns.router.p3"
            ],
            "bound in partition order"
        );
    }

    #[test]
    fn the_plan_has_every_queue_bound_once() {
        let systems = ["crm".to_owned(), "erp".to_owned()];
        let plan = Topology::new("ns").plan(&systems).unwrap();
        let queues: Vec<&str> = plan.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            queues,
            [
                "ns.dlq.router",
                "ns.router",
                "ns.router.resync",
                "ns.router.control",
                "ns.dlq.crm",
                "ns.inbox.crm",
                "ns.dlq.erp",
                "ns.inbox.erp"
            ]
        );
        for q in &plan.queues {
            assert_eq!(
                plan.bindings
                    .iter()
                    .filter(|b| b.destination == q.name)
                    .count(),
                1,
                "{}",
                q.name
            );
        }
        assert!(Topology::new("ns").plan(&["router".to_owned()]).is_err());
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
