//! One connected session of the router: the consume → process → publish → confirm → ack
//! pipeline, from connecting until the connection is lost or the router drains and stops.

use std::pin::Pin;
use std::sync::Arc;
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

use crate::service::{Control, PolicyState, Shared, now_ms};

/// Header naming the system a routed change comes from.
pub const HEADER_ORIGIN: &str = "concord-origin";
/// Header naming the record of a routed change: `<entity>/<key>`.
pub const HEADER_KEY: &str = "concord-key";
/// Header of a dead-lettered message: the reason code ([`DeadLetterReason::as_str`]).
pub const HEADER_REASON: &str = "concord-reason";
/// Header of a dead-lettered message: what exactly was wrong.
pub const HEADER_DETAIL: &str = "concord-detail";
/// Header of a dead-lettered message: the routing key it was published with.
pub const HEADER_ROUTING_KEY: &str = "concord-routing-key";
/// Routing key of the router's dead letters on the dead-letter exchange.
pub const DEAD_LETTER_KEY: &str = concord_amqp::topology::ROUTER_DLQ_KEY;

/// How long a graceful drain may wait for outstanding confirms before giving up (the broker
/// then redelivers whatever was not acknowledged).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// First delay before requeueing an input whose publish was nacked or returned.
const FAILURE_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Largest such delay.
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bound of closing a connection or channel during teardown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    consumer: Consumer,
    publisher: Publisher,
    consume_events: Events,
    publish_events: Events,
}

/// One input in flight: its publishes, awaited in order.
struct Pending {
    ack: AckHandle,
    confirms: Vec<(PendingConfirm, Option<Counter>)>,
    started: Instant,
}

/// The outcome of one input's publishes.
struct Settled {
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
        let consume_conn = concord_amqp::connect(uri, &shared.connection_names[0]).await?;
        let publish_conn = match concord_amqp::connect(uri, &shared.connection_names[1]).await {
            Ok(c) => c,
            Err(e) => {
                close_connection(&consume_conn).await;
                return Err(e);
            }
        };
        let opened = Session::start(shared, &consume_conn, &publish_conn).await;
        match opened {
            Ok((consumer, publisher)) => Ok(Session {
                consume_events: Box::pin(consume_conn.events()),
                publish_events: Box::pin(publish_conn.events()),
                consume_conn,
                publish_conn,
                consumer,
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
    ) -> Result<(Consumer, Publisher), AmqpError> {
        let state = shared.policy.load_full();
        declare(shared, publish_conn, &state).await?;
        let publisher = Publisher::open(
            publish_conn,
            PublisherOptions {
                window: shared.config.confirm_window,
            },
        )
        .await?;
        let channel = consume_conn.open_channel().await?;
        let consumer = consume(
            &channel,
            &shared.topology.router_queue(),
            &shared.connection_names[0],
            shared.config.prefetch,
        )
        .await?;
        Ok((consumer, publisher))
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
        self.teardown(result.is_ok()).await;
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
        let mut batcher = AckBatcher::new(config.ack_batch);
        let mut in_flight = FuturesOrdered::new();
        // Publishes whose confirm is outstanding.
        let mut outstanding = 0usize;
        let mut consuming = true;
        let mut draining = false;
        let mut drain_deadline = tokio::time::Instant::now();
        let mut failures = 0u32;
        let mut control_open = true;
        if *shutdown.borrow() {
            self.consumer.cancel().await?;
            draining = true;
            drain_deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        }
        loop {
            if draining && !consuming && in_flight.is_empty() {
                batcher.flush().await?;
                return Ok(SessionEnd::Drained);
            }
            tokio::select! {
                biased;
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    let done: Settled = done;
                    outstanding -= done.publishes;
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
                            if let Err(e) = declare(shared, &self.publish_conn, &state).await {
                                warn!(error = %e, "re-declaring the topology failed");
                                if !self.publish_conn.is_connected() {
                                    return Err(e);
                                }
                            }
                            batcher.nack(done.ack, true).await?;
                        }
                    }
                    if in_flight.is_empty() {
                        batcher.flush().await?;
                    }
                }
                delivery = self.consumer.next(), if consuming && outstanding < config.confirm_window => {
                    match delivery {
                        Some(Ok(delivery)) => {
                            let pending =
                                handle(&self.publisher, shared, &routed_exchange, &dlx, delivery)
                                    .await?;
                            outstanding += pending.confirms.len();
                            in_flight.push_back(settle(pending));
                        }
                        Some(Err(e)) => return Err(e),
                        None => {
                            consuming = false;
                            if !draining {
                                return Err(AmqpError::ConsumerCancelled {
                                    queue: shared.topology.router_queue(),
                                    consumer_tag: shared.connection_names[0].clone(),
                                });
                            }
                        }
                    }
                }
                cmd = control.recv(), if control_open => match cmd {
                    Some(Control::Reload(reply)) => {
                        let outcome = shared.reload(Some(&self.publish_conn)).await;
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
                            self.begin_drain(&mut batcher).await?;
                        }
                    }
                },
                changed = shutdown.changed(), if !draining => {
                    if changed.is_err() || *shutdown.borrow() {
                        info!(in_flight = in_flight.len(), "draining: no new inputs, settling those in flight");
                        draining = true;
                        drain_deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                        self.begin_drain(&mut batcher).await?;
                    }
                }
                () = tokio::time::sleep_until(drain_deadline), if draining => {
                    warn!(
                        in_flight = in_flight.len(),
                        "drain timed out; the broker redelivers inputs not acknowledged"
                    );
                    batcher.flush().await?;
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

    async fn begin_drain(&mut self, batcher: &mut AckBatcher) -> Result<(), AmqpError> {
        batcher.flush().await?;
        // After the cancel the broker sends nothing more; what it sent before is still
        // yielded by the stream, which then ends.
        self.consumer.cancel().await
    }
}

/// Processes one input and publishes its results; returns the confirms to await.
async fn handle(
    publisher: &Publisher,
    shared: &Shared,
    routed_exchange: &str,
    dlx: &str,
    delivery: Delivery,
) -> Result<Pending, AmqpError> {
    let state: Arc<PolicyState> = shared.policy.load_full();
    let now = now_ms();
    state.handles.event_in(&delivery.routing_key);
    let outcome = route::process(
        &state.policy,
        &shared.settings,
        now,
        Input {
            routing_key: &delivery.routing_key,
            body: &delivery.body,
            user_id: delivery.user_id(),
        },
    );
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
                shared.metrics.observe_lag(lag_ms as f64 / 1000.0);
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
            for d in &routed.deliveries {
                let props = MessageProps::new()
                    .header(HEADER_ORIGIN, routed.source.as_str())
                    .header(HEADER_KEY, record.as_str())
                    .message_id(routed.event_id.as_str());
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
        ack: delivery.ack_handle(),
        confirms,
        started,
    })
}

/// Publishes the original input to the dead-letter exchange.
async fn dead_letter(
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
        .header(HEADER_ROUTING_KEY, delivery.routing_key.as_str());
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

/// Declares the whole router topology for `state`'s systems on a scratch channel of `conn`.
pub(crate) async fn declare(
    shared: &Shared,
    conn: &Connection,
    state: &PolicyState,
) -> Result<(), AmqpError> {
    let channel = conn.open_channel().await?;
    let result = shared
        .topology
        .declare_router(&channel, state.policy.systems())
        .await;
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "OK".into())).await;
    }
    result
}

async fn close_connection(conn: &Connection) {
    match tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(connection = conn.name(), error = %e, "closing the connection failed"),
        Err(_) => debug!(connection = conn.name(), "closing the connection timed out"),
    }
}
