//! One connected session of the router: the consume → process → publish → confirm → ack
//! pipeline, from connecting until the connection is lost or the router drains and stops.
//!
//! # Inputs
//!
//! The router consumes one input queue (`{ns}.router`) or, with `partitions` > 1, every
//! partition queue `{ns}.router.p{i}`, each on its own channel with its own in-order
//! [`AckBatcher`] (a `multiple` ack covers one channel only). All inputs share the pipeline:
//! one publisher, one confirm window, one ordered set of inputs in flight — acks therefore go
//! out in delivery order on every channel.
//!
//! Per-record order with several replicas: a record's events always hash to the same partition,
//! and each partition queue has a single active consumer, which processes it strictly in order.
//! A replica with `replicas`/`replica_index` subscribes to its preferred partitions at once and
//! to the others after `standby_delay_ms`, as a standby the broker promotes when the active
//! consumer's connection goes away (that is the takeover: its unacknowledged inputs are
//! requeued in order and go to the standby first).
//!
//! A partitioned router drains without cancelling: cancelling would promote a standby while
//! the deliveries already received were still being processed here (two routers working on one
//! partition at once). It stops taking deliveries, settles those in flight, acks them and
//! closes its channels; the broker requeues what was received but not processed, in order,
//! for the next active consumer.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use concord_amqp::{
    AckBatcher, AckHandle, AmqpError, Connection, ConnectionEvent, Consumer, Delivery,
    MessageProps, PendingConfirm, PublishError, Publisher, PublisherOptions, consume,
};
use concord_policy::DeadLetter;
use concord_policy::route::{self, Input, Outcome};
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::reload::reload;
use crate::state::{CLOSE_TIMEOUT, Control, PolicyState, Shared, now_ms};

pub use concord_amqp::{
    HEADER_CONTROL, HEADER_DETAIL, HEADER_KEY, HEADER_ORIGIN, HEADER_REASON, HEADER_RESYNC_TARGET,
    HEADER_ROUTING_KEY,
};
/// Routing key of the router's dead letters on the dead-letter exchange.
pub const DEAD_LETTER_KEY: &str = concord_amqp::topology::ROUTER_DLQ_KEY;

/// How long a graceful drain may wait for outstanding confirms before giving up (the broker
/// then redelivers whatever was not acknowledged).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// First delay before requeueing an input whose publish was nacked or returned.
const FAILURE_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Largest such delay.
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Publishes refused in a row (each retried after re-declaring the topology) after which the
/// session is given up and reopened on fresh connections and channels.
const REFUSALS_BEFORE_REOPEN: u32 = 8;

type Events = Pin<Box<dyn Stream<Item = ConnectionEvent> + Send>>;

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested and everything received was settled.
    Drained,
}

/// A connected router: one consuming and one publishing connection.
pub(crate) struct Session {
    consume_conn: Connection,
    publish_conn: Connection,
    inputs: Inputs,
    publisher: Publisher,
    consume_events: Events,
    publish_events: Events,
}

/// What an input queue carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Live changes: `{ns}.router` or a partition queue.
    Live,
    /// The operator's requests: `{ns}.router.control`.
    Control,
    /// Backfills: `{ns}.router.resync`, served only when no live input is ready.
    Resync,
}

/// One subscribed input queue: its consumer (on its own channel) and its ack batcher.
struct InputQueue {
    /// Index of the queue in `Topology::router_queues` (the partition; 0 for the other lanes).
    index: u16,
    lane: Lane,
    consumer: Consumer,
    batcher: AckBatcher,
    /// Still yielding deliveries (false once the stream ended during a drain).
    open: bool,
    /// `concord_router_partition_events_total{partition}`; `None` for the single queue.
    counter: Option<Counter>,
}

/// The subscribed input queues, polled round-robin.
struct Inputs {
    queues: Vec<InputQueue>,
    /// Partitions not subscribed yet (standby subscriptions due at `standby_at`).
    deferred: Vec<u16>,
    standby_at: tokio::time::Instant,
    /// Where the next poll starts, so that no queue starves the others.
    next: usize,
    partitioned: bool,
}

impl Inputs {
    /// The next delivery of any open queue, with the queue's position; `None` in the item means
    /// that queue's stream ended. Pending while no queue has anything. Live queues come first
    /// (round-robin among them), then the operator's requests, then the resync lane: a backfill
    /// only takes what live traffic leaves.
    async fn next(&mut self) -> (usize, Option<Result<Delivery, AmqpError>>) {
        poll_fn(|cx| {
            let n = self.queues.len();
            for lane in [Lane::Live, Lane::Control, Lane::Resync] {
                for k in 0..n {
                    let pos = (self.next + k) % n;
                    let queue = &mut self.queues[pos];
                    if !queue.open || queue.lane != lane {
                        continue;
                    }
                    if let Poll::Ready(item) = queue.consumer.poll_next_unpin(cx) {
                        self.next = (pos + 1) % n;
                        return Poll::Ready((pos, item));
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    fn any_open(&self) -> bool {
        self.queues.iter().any(|q| q.open)
    }

    async fn flush(&mut self) -> Result<(), AmqpError> {
        for queue in &mut self.queues {
            queue.batcher.flush().await?;
        }
        Ok(())
    }
}

/// One input in flight: its publishes, awaited in order.
pub(crate) struct Pending {
    /// Position of its queue in [`Inputs::queues`].
    pub(crate) input: usize,
    pub(crate) ack: AckHandle,
    pub(crate) confirms: Vec<(PendingConfirm, Option<Counter>)>,
    pub(crate) started: Instant,
}

/// The outcome of one input's publishes.
struct Settled {
    input: usize,
    ack: AckHandle,
    publishes: usize,
    elapsed: Option<Duration>,
    result: Result<(), PublishError>,
}

async fn settle(p: Pending) -> Settled {
    let publishes = p.confirms.len();
    let mut result = Ok(());
    for (confirm, counter) in p.confirms {
        match confirm.await {
            Ok(()) => {
                if let Some(c) = counter {
                    c.inc();
                }
            }
            Err(e) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
    }
    Settled {
        input: p.input,
        ack: p.ack,
        publishes,
        elapsed: (publishes > 0).then(|| p.started.elapsed()),
        result,
    }
}

impl Session {
    /// Connects both connections, declares the topology of the current policy and starts
    /// consuming.
    pub(crate) async fn open(shared: &Shared) -> Result<Session, AmqpError> {
        let uri = &shared.config.amqp_uri;
        let options = &shared.connect_options;
        let consume_conn =
            concord_amqp::connect_with(uri, &shared.connection_names[0], options).await?;
        let publish_conn =
            match concord_amqp::connect_with(uri, &shared.connection_names[1], options).await {
                Ok(c) => c,
                Err(e) => {
                    close_connection(&consume_conn).await;
                    return Err(e);
                }
            };
        let opened = Session::start(shared, &consume_conn, &publish_conn).await;
        match opened {
            Ok((inputs, publisher)) => Ok(Session {
                consume_events: Box::pin(consume_conn.events()),
                publish_events: Box::pin(publish_conn.events()),
                consume_conn,
                publish_conn,
                inputs,
                publisher,
            }),
            Err(e) => {
                close_connection(&consume_conn).await;
                close_connection(&publish_conn).await;
                Err(e)
            }
        }
    }

    async fn start(
        shared: &Shared,
        consume_conn: &Connection,
        publish_conn: &Connection,
    ) -> Result<(Inputs, Publisher), AmqpError> {
        let state = shared.policy.load_full();
        shared.declare(publish_conn, &state).await?;
        let publisher = Publisher::open(
            publish_conn,
            PublisherOptions {
                window: shared.config.confirm_window,
            },
        )
        .await?;
        let config = &shared.config;
        let partitioned = shared.topology.is_partitioned();
        let preferred = config.preferred_partitions();
        let deferred: Vec<u16> = (0..shared.topology.partitions())
            .filter(|i| !preferred.contains(i))
            .collect();
        let mut inputs = Inputs {
            queues: Vec::with_capacity(usize::from(shared.topology.partitions())),
            deferred,
            standby_at: tokio::time::Instant::now()
                + Duration::from_millis(config.standby_delay_ms),
            next: 0,
            partitioned,
        };
        for index in preferred {
            subscribe(shared, consume_conn, &mut inputs, index).await?;
        }
        subscribe_lane(shared, consume_conn, &mut inputs, Lane::Control).await?;
        subscribe_lane(shared, consume_conn, &mut inputs, Lane::Resync).await?;
        if partitioned {
            info!(
                partitions = shared.topology.partitions(),
                active_first = ?inputs.queues.iter().map(|q| q.index).collect::<Vec<_>>(),
                standby_later = ?inputs.deferred,
                standby_delay_ms = config.standby_delay_ms,
                "subscribed to the preferred partitions"
            );
        }
        Ok((inputs, publisher))
    }

    /// Runs the pipeline until the connection fails (`Err`) or shutdown is requested and the
    /// drain completes.
    pub(crate) async fn run(
        mut self,
        shared: &Shared,
        control: &mut mpsc::Receiver<Control>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, AmqpError> {
        let result = self.pipeline(shared, control, shutdown).await;
        let subscribed: Vec<u16> = if self.inputs.partitioned {
            self.inputs
                .queues
                .iter()
                .filter(|q| q.lane == Lane::Live)
                .map(|q| q.index)
                .collect()
        } else {
            Vec::new()
        };
        self.teardown(result.is_ok()).await;
        for index in subscribed {
            shared.metrics.set_partition_subscribed(index, false);
        }
        result
    }

    async fn pipeline(
        &mut self,
        shared: &Shared,
        control: &mut mpsc::Receiver<Control>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, AmqpError> {
        let config = &shared.config;
        let routed_exchange = shared.topology.routed_exchange();
        let dlx = shared.topology.dlx();
        let mut in_flight = FuturesOrdered::new();
        // Publishes whose confirm is outstanding.
        let mut outstanding = 0usize;
        let mut consuming = true;
        let mut draining = false;
        let mut drain_deadline = tokio::time::Instant::now();
        let mut failures = 0u32;
        let mut control_open = true;
        if *shutdown.borrow() {
            draining = true;
            drain_deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
            consuming = self.begin_drain().await?;
        }
        loop {
            if draining && !consuming && in_flight.is_empty() {
                self.inputs.flush().await?;
                return Ok(SessionEnd::Drained);
            }
            let standby_at = self.inputs.standby_at;
            let standby_due = !draining && !self.inputs.deferred.is_empty();
            tokio::select! {
                biased;
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    let done: Settled = done;
                    outstanding -= done.publishes;
                    let batcher = &mut self.inputs.queues[done.input].batcher;
                    match done.result {
                        Ok(()) => {
                            failures = 0;
                            if let Some(elapsed) = done.elapsed {
                                shared.metrics.observe_confirm(elapsed.as_secs_f64());
                            }
                            batcher.ack(done.ack).await?;
                        }
                        Err(PublishError::Connection(e)) => {
                            // Whether the broker has the message is unknown: the input stays
                            // unacknowledged and is redelivered after the reconnect.
                            warn!(error = %e, "a publish was lost with the connection");
                            return Err(e);
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            if failures >= REFUSALS_BEFORE_REOPEN {
                                // The input stays unacknowledged: the broker requeues it (in
                                // order) when this session's channels close.
                                return Err(AmqpError::PublishesRefused {
                                    count: failures,
                                    last: e.to_string(),
                                });
                            }
                            let delay = FAILURE_BACKOFF_MIN
                                .saturating_mul(1 << failures.min(6))
                                .min(FAILURE_BACKOFF_MAX);
                            warn!(
                                error = %e,
                                delivery_tag = done.ack.delivery_tag(),
                                ?delay,
                                "a publish was not delivered; re-declaring the topology and requeueing the input"
                            );
                            batcher.flush().await?;
                            tokio::time::sleep(delay).await;
                            let state = shared.policy.load_full();
                            if let Err(e) = shared.declare(&self.publish_conn, &state).await {
                                warn!(error = %e, "re-declaring the topology failed");
                                if !self.publish_conn.is_connected() {
                                    return Err(e);
                                }
                            }
                            batcher.nack(done.ack, true).await?;
                        }
                    }
                    if in_flight.is_empty() {
                        self.inputs.flush().await?;
                    }
                }
                (input, delivery) = self.inputs.next(), if consuming && outstanding < config.confirm_window => {
                    match delivery {
                        Some(Ok(delivery)) => {
                            if let Some(counter) = &self.inputs.queues[input].counter {
                                counter.inc();
                            }
                            if delivery.redelivered {
                                shared.metrics.redelivered();
                            }
                            let lane = self.inputs.queues[input].lane;
                            let pending = match lane {
                                Lane::Live | Lane::Resync => handle(
                                    &self.publisher,
                                    shared,
                                    &routed_exchange,
                                    &dlx,
                                    input,
                                    delivery,
                                    lane == Lane::Resync,
                                )
                                .await?,
                                Lane::Control => {
                                    crate::control::handle(&self.publisher, shared, input, delivery)
                                        .await?
                                }
                            };
                            outstanding += pending.confirms.len();
                            in_flight.push_back(settle(pending));
                        }
                        Some(Err(e)) => return Err(e),
                        None => {
                            let queue = &mut self.inputs.queues[input];
                            queue.open = false;
                            if !draining {
                                return Err(AmqpError::ConsumerCancelled {
                                    queue: queue.consumer.queue().to_owned(),
                                    consumer_tag: queue.consumer.consumer_tag().to_owned(),
                                });
                            }
                            consuming = self.inputs.any_open();
                        }
                    }
                }
                // Lazy (an `async` block): select! builds the futures of disabled branches too,
                // and the single-queue hot path should not pay for a timer per delivery.
                () = async { tokio::time::sleep_until(standby_at).await }, if standby_due => {
                    let standby = std::mem::take(&mut self.inputs.deferred);
                    for &index in &standby {
                        subscribe(shared, &self.consume_conn, &mut self.inputs, index).await?;
                    }
                    info!(partitions = ?standby, "subscribed as a standby to the other partitions");
                }
                cmd = control.recv(), if control_open => match cmd {
                    Some(Control::Reload(reply)) => {
                        let outcome = reload(shared, Some(&self.publish_conn)).await;
                        if let Some(reply) = reply {
                            let _ = reply.send(outcome);
                        }
                    }
                    None => {
                        // Every sender is gone: the handle was dropped; stop like on shutdown.
                        control_open = false;
                        if !draining {
                            draining = true;
                            drain_deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                            consuming = self.begin_drain().await?;
                        }
                    }
                },
                changed = shutdown.changed(), if !draining => {
                    if changed.is_err() || *shutdown.borrow() {
                        info!(in_flight = in_flight.len(), "draining: no new inputs, settling those in flight");
                        draining = true;
                        drain_deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                        consuming = self.begin_drain().await?;
                    }
                }
                () = tokio::time::sleep_until(drain_deadline), if draining => {
                    warn!(
                        in_flight = in_flight.len(),
                        "drain timed out; the broker redelivers inputs not acknowledged"
                    );
                    self.inputs.flush().await?;
                    return Ok(SessionEnd::Drained);
                }
                Some(event) = self.publish_events.next() => {
                    connection_event("publish", &self.publish_conn, event)?;
                }
                Some(event) = self.consume_events.next() => {
                    connection_event("consume", &self.consume_conn, event)?;
                }
            }
        }
    }

    /// Starts draining; returns whether deliveries are still to be taken from the inputs.
    ///
    /// The single input queue is cancelled: what the broker sent before the cancel is still
    /// yielded (and processed), then the stream ends. Partition queues are not cancelled (that
    /// would promote a standby while this router still processes what it received): the router
    /// takes no more deliveries and settles those in flight; closing the channels then requeues
    /// the rest, in order, for the next active consumer.
    async fn begin_drain(&mut self) -> Result<bool, AmqpError> {
        self.inputs.flush().await?;
        self.inputs.deferred.clear();
        if self.inputs.partitioned {
            return Ok(false);
        }
        for queue in &mut self.inputs.queues {
            queue.consumer.cancel().await?;
        }
        Ok(self.inputs.any_open())
    }
}

/// Subscribes to input queue `index` of the topology on a new channel of `conn`.
async fn subscribe(
    shared: &Shared,
    conn: &Connection,
    inputs: &mut Inputs,
    index: u16,
) -> Result<(), AmqpError> {
    let topology = &shared.topology;
    let (queue, tag, counter) = if inputs.partitioned {
        (
            topology.partition_queue(index),
            format!("{}/p{index}", shared.connection_names[0]),
            Some(shared.metrics.partition_counter(index)),
        )
    } else {
        (
            topology.router_queue(),
            shared.connection_names[0].clone(),
            None,
        )
    };
    let channel = conn.open_channel().await?;
    let prefetch = shared.config.live_lane_prefetch();
    let consumer = consume(&channel, &queue, &tag, prefetch).await?;
    if inputs.partitioned {
        shared.metrics.set_partition_subscribed(index, true);
    }
    inputs.queues.push(InputQueue {
        index,
        lane: Lane::Live,
        consumer,
        batcher: AckBatcher::new(shared.config.ack_batch.min(usize::from(prefetch))),
        open: true,
        counter,
    });
    Ok(())
}

/// Subscribes to the control queue (prefetch 1) or the resync lane (its own small prefetch),
/// each on a new channel of `conn`.
async fn subscribe_lane(
    shared: &Shared,
    conn: &Connection,
    inputs: &mut Inputs,
    lane: Lane,
) -> Result<(), AmqpError> {
    let topology = &shared.topology;
    let (queue, suffix, prefetch) = match lane {
        Lane::Control => (topology.control_queue(), "control", 1),
        _ => (
            topology.resync_queue(),
            "resync",
            shared.config.resync_lane_prefetch(),
        ),
    };
    let channel = conn.open_channel().await?;
    let tag = format!("{}/{suffix}", shared.connection_names[0]);
    let consumer = consume(&channel, &queue, &tag, prefetch).await?;
    // A batch of half the prefetch, so that the broker never waits for acks held back.
    let batch = (usize::from(prefetch) / 2).clamp(1, shared.config.ack_batch);
    inputs.queues.push(InputQueue {
        index: 0,
        lane,
        consumer,
        batcher: AckBatcher::new(batch),
        open: true,
        counter: None,
    });
    Ok(())
}

/// Processes one input (of the live input, or of the resync lane: `resync`) and publishes its
/// results; returns the confirms to await.
async fn handle(
    publisher: &Publisher,
    shared: &Shared,
    routed_exchange: &str,
    dlx: &str,
    input: usize,
    delivery: Delivery,
    resync: bool,
) -> Result<Pending, AmqpError> {
    if resync && delivery.header_str(HEADER_CONTROL).is_some() {
        return crate::control::progress(publisher, shared, input, delivery).await;
    }
    let state: Arc<PolicyState> = shared.policy.load_full();
    let now = now_ms();
    state.handles.event_in(&delivery.routing_key);
    let message = Input {
        routing_key: &delivery.routing_key,
        body: &delivery.body,
        user_id: delivery.user_id(),
        concord_key: delivery.header_str(HEADER_KEY),
    };
    let outcome = if resync {
        route::process_resync(
            state.policy(),
            &shared.settings,
            now,
            message,
            delivery.header_str(HEADER_RESYNC_TARGET),
        )
    } else {
        route::process(state.policy(), &shared.settings, now, message)
    };
    let started = Instant::now();
    let mut confirms = Vec::new();
    match outcome {
        Outcome::Routed(routed) => {
            state.handles.accepted(routed.accepted);
            for r in &routed.rejected {
                shared.metrics.rejected_field(r.reason);
            }
            if routed.observed_at_ms > 0 {
                let lag_ms = now.saturating_sub(routed.observed_at_ms);
                state
                    .handles
                    .observe_lag(&routed.source, lag_ms as f64 / 1000.0);
            }
            debug!(
                event_id = %routed.event_id,
                source = %routed.source,
                entity = %routed.entity,
                key = %routed.key,
                accepted = routed.accepted,
                rejected = routed.rejected.len(),
                targets = routed.deliveries.len(),
                "routing"
            );
            confirms.reserve(routed.deliveries.len() + usize::from(routed.dead_letter.is_some()));
            let record = format!("{}/{}", routed.entity, routed.key);
            let now_secs = concord_amqp::now_ms() / 1000;
            for d in &routed.deliveries {
                // Published as the router's own broker user: adapters apply only what the
                // router published.
                let props = MessageProps::new()
                    .header(HEADER_ORIGIN, routed.source.as_str())
                    .header(HEADER_KEY, record.as_str())
                    .message_id(routed.event_id.as_str())
                    .user_id(&shared.login)
                    // When it was routed: `concord status` shows how long an inbox's oldest
                    // message has waited.
                    .timestamp(now_secs);
                let confirm = publisher
                    .publish(routed_exchange, &d.system, &d.body, props)
                    .await?;
                confirms.push((confirm, Some(state.handles.delivery_counter(&d.system))));
            }
            if let Some(dead) = &routed.dead_letter {
                confirms.push(dead_letter(publisher, shared, dlx, &delivery, dead).await?);
            }
        }
        Outcome::DeadLetter(dead) => {
            debug!(
                reason = dead.reason.as_str(),
                detail = %dead.detail,
                routing_key = %delivery.routing_key,
                "dead-lettering an input"
            );
            confirms.push(dead_letter(publisher, shared, dlx, &delivery, &dead).await?);
        }
    }
    Ok(Pending {
        input,
        ack: delivery.ack_handle(),
        confirms,
        started,
    })
}

/// Publishes the original input to the dead-letter exchange.
pub(crate) async fn dead_letter(
    publisher: &Publisher,
    shared: &Shared,
    dlx: &str,
    delivery: &Delivery,
    dead: &DeadLetter,
) -> Result<(PendingConfirm, Option<Counter>), AmqpError> {
    shared.metrics.dead_lettered(dead.reason);
    let props = MessageProps::new()
        .header(HEADER_REASON, dead.reason.as_str())
        .header(HEADER_DETAIL, dead.detail.as_str())
        .header(HEADER_ROUTING_KEY, delivery.routing_key.as_str())
        .timestamp_now();
    let confirm = publisher
        .publish(dlx, DEAD_LETTER_KEY, &delivery.body, props)
        .await?;
    Ok((confirm, None))
}

impl Session {
    async fn teardown(self, graceful: bool) {
        if graceful {
            // Every input is settled; this only closes the channel cleanly.
            match tokio::time::timeout(CLOSE_TIMEOUT, self.publisher.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "closing the publisher failed"),
                Err(_) => debug!("closing the publisher timed out"),
            }
        }
        close_connection(&self.consume_conn).await;
        close_connection(&self.publish_conn).await;
    }
}

/// Fails on the loss of `conn`; channel errors (also reported as connection events) surface
/// where the channel is used.
fn connection_event(
    which: &str,
    conn: &Connection,
    event: ConnectionEvent,
) -> Result<(), AmqpError> {
    match event {
        ConnectionEvent::Error(e) if !conn.is_connected() => {
            warn!(connection = which, error = %e, "connection lost");
            Err(e)
        }
        ConnectionEvent::Error(e) => {
            debug!(connection = which, error = %e, "channel error");
            Ok(())
        }
        ConnectionEvent::Blocked { reason } => {
            warn!(connection = which, %reason, "the broker blocks publishing (resource alarm)");
            Ok(())
        }
        ConnectionEvent::Unblocked => {
            info!(connection = which, "the broker unblocked publishing");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Closes `conn` (bounded by [`CLOSE_TIMEOUT`] in `Connection::close`).
async fn close_connection(conn: &Connection) {
    if let Err(e) = conn.close().await {
        debug!(connection = conn.name(), error = %e, "closing the connection failed");
    }
}
