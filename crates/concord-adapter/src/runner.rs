//! The runner: owns the connection, the consume/publish loop, acknowledgements, retries,
//! dead-lettering and reconnection, around one engine (see [`crate::engine`]).
//!
//! One task does everything, in order: an incoming message is applied (or recorded, or
//! dead-lettered) and acknowledged before the next one is looked at, and a batch of local
//! changes is published, confirmed and recorded before the next batch is read. That keeps the
//! state store consistent without locks and preserves the order of every inbox.
//!
//! **Transient failures** of `apply` are retried in place with exponential backoff (capped at
//! `retry.max_delay_ms`), forever: the message is neither acknowledged, nor nacked, nor
//! dead-lettered, so a system that is down for hours loses nothing and receives its changes in
//! order when it comes back (messages behind it wait in the inbox). If the process stops
//! meanwhile, the broker redelivers the unacknowledged message. (RabbitMQ's `consumer_timeout`,
//! 30 min by default, may close the channel of a delivery unacknowledged for that long: the
//! runner then reconnects and the message is redelivered, so raise it for systems with long
//! outages to avoid the churn.)
//!
//! **Permanent failures** (undecodable message, unknown entity, `AdapterError::Permanent`) are
//! published to `{ns}.dlx` with routing key = this system and headers `concord-reason` /
//! `concord-detail`, confirmed, then acknowledged.
//!
//! **Connection loss**: the runner waits for the next reconnect delay, reconnects, declares its
//! inbox again and carries on. Unacknowledged messages are redelivered by the broker and
//! deduplicated by event id. Local changes go through a transactional outbox: a batch's events
//! are committed together with their stamps and the cursor, then published, and removed only
//! once confirmed. Events whose confirms were lost (with the connection, or because the process
//! died) are republished first on the next session, byte for byte: same event ids, same stamps,
//! in order, so receivers deduplicate them and a stale write never gets a newer stamp. A batch
//! whose commit failed is processed again (nothing of it was recorded).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_policy::route::DeadLetterReason;
use futures::stream::{BoxStream, ReadyChunks};
use futures::{FutureExt, StreamExt};
use prost_reflect::MessageDescriptor;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::adapter::{AdapterError, LocalChange, SystemAdapter};
use crate::amqp::AmqpTransport;
use crate::config::{RetryConfig, RunnerConfig};
use crate::engine::{Engine, EngineError, EngineSettings, IncomingError, now_ms};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::store::{self, Store, StoreError};
use crate::transport::{Inbox, Incoming, Link, Transport, TransportError};

/// Why the runner stopped (other than being asked to).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The policy file or the schema it names could not be loaded.
    #[error("cannot load the policy and its schema: {0}")]
    Deployment(concord_schema::LoadError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runner task panicked or was aborted.
    #[error("runner task failed: {0}")]
    Task(String),
}

/// Processed event ids forgotten per pruning batch (one short transaction).
const PRUNE_BATCH: u32 = 2_000;
/// Pause between pruning batches while there is more to prune: the inbox and the feed are served
/// in between.
const PRUNE_PAUSE: Duration = Duration::from_millis(20);

/// How long closing a session's link may take. Closing is best effort (what it leaves, the
/// broker redelivers and the outbox publishes again), and a connection whose peer died unnoticed
/// never answers: waiting on it would keep the runner from ever reconnecting.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `link`, giving up after [`CLOSE_TIMEOUT`] (the link is then dropped).
async fn close_link<L: Link>(system: &str, link: &L) {
    if tokio::time::timeout(CLOSE_TIMEOUT, link.close())
        .await
        .is_err()
    {
        warn!(%system, timeout = ?CLOSE_TIMEOUT, "the connection did not close in time; dropping it");
    }
}

/// A stop signal.
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `adapter` against RabbitMQ until `shutdown` completes (then flushes acknowledgements
/// and closes the connection) or an unrecoverable error occurs (bad configuration, state store
/// unusable). Connection failures are not errors: the runner reconnects.
pub async fn run<A: SystemAdapter>(
    adapter: A,
    config: RunnerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let transport = AmqpTransport::new(&config);
    let (ready, _) = watch::channel(false);
    serve(
        Arc::new(adapter),
        config,
        transport,
        Box::pin(shutdown),
        Arc::new(Metrics::default()),
        ready,
    )
    .await
}

/// Starts the runner on a task, against RabbitMQ.
pub fn start<A: SystemAdapter>(adapter: A, config: RunnerConfig) -> RunnerHandle {
    let transport = AmqpTransport::new(&config);
    start_with(adapter, config, transport)
}

/// Starts the runner on a task, over any transport.
pub fn start_with<A: SystemAdapter, T: Transport>(
    adapter: A,
    config: RunnerConfig,
    transport: T,
) -> RunnerHandle {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let shutdown: Shutdown = Box::pin(async move {
        // Resolves when asked to stop, or when the handle is dropped.
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    let join = tokio::spawn(serve(
        Arc::new(adapter),
        config,
        transport,
        shutdown,
        metrics.clone(),
        ready_tx,
    ));
    RunnerHandle {
        stop: stop_tx,
        ready: ready_rx,
        join: Some(join),
        metrics,
    }
}

/// A runner started with [`start`] or [`start_with`]. Dropping it stops the runner.
#[derive(Debug)]
pub struct RunnerHandle {
    stop: watch::Sender<bool>,
    ready: watch::Receiver<bool>,
    join: Option<JoinHandle<Result<(), RunError>>>,
    metrics: Arc<Metrics>,
}

impl RunnerHandle {
    /// Waits until the runner is connected, has declared its inbox and consumes it. Returns the
    /// runner's error if it stops first.
    pub async fn wait_ready(&mut self) -> Result<(), RunError> {
        loop {
            if *self.ready.borrow_and_update() {
                return Ok(());
            }
            if self.ready.changed().await.is_err() {
                return match self.join.take() {
                    Some(j) => match j.await {
                        Ok(Ok(())) => Err(RunError::Task("stopped before it was ready".into())),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(RunError::Task(e.to_string())),
                    },
                    None => Err(RunError::Task("already stopped".into())),
                };
            }
        }
    }

    /// Whether the runner is connected right now.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Follows whether the runner is connected (and consuming its inbox).
    pub fn ready_watch(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Waits until the runner stops by itself (an unrecoverable error: bad configuration, state
    /// store unusable) and returns how it ended; pending forever while it runs. Cancel-safe.
    pub async fn wait_stopped(&mut self) -> Result<(), RunError> {
        let Some(join) = self.join.as_mut() else {
            return Ok(());
        };
        let r = join.await;
        self.join = None;
        r.map_err(|e| RunError::Task(e.to_string()))?
    }

    /// The runner's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Waits until `done` holds for the runner's counters.
    pub async fn wait_until(&self, done: impl Fn(&MetricsSnapshot) -> bool) {
        self.metrics.wait_until(done).await;
    }

    /// The live counters (shared with the runner).
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Stops the runner gracefully and returns how it ended.
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        self.stop.send_replace(true);
        match self.join.take() {
            Some(j) => j.await.map_err(|e| RunError::Task(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunnerHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Why the inner loop stopped.
enum Stop {
    Shutdown,
    Transport(TransportError),
    Fatal(RunError),
}

impl From<TransportError> for Stop {
    fn from(e: TransportError) -> Self {
        Stop::Transport(e)
    }
}

type Changes = ReadyChunks<BoxStream<'static, Result<LocalChange, AdapterError>>>;

/// The whole life of one runner.
async fn serve<A: SystemAdapter, T: Transport>(
    adapter: Arc<A>,
    config: RunnerConfig,
    transport: T,
    mut shutdown: Shutdown,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
) -> Result<(), RunError> {
    config.validate().map_err(RunError::Config)?;
    let deployment = load_deployment(&config)?;
    let store = Store::open(&config.state).await?;
    store
        .prune_echoes(now_ms().saturating_sub(config.echo_window_secs.saturating_mul(1000)))
        .await?;
    let entities = entities(&deployment.policy);
    let mut engine = Engine::new(
        &config.system,
        adapter.clone(),
        store.clone(),
        entities,
        metrics.clone(),
        EngineSettings::of(&config),
    )
    .await?;
    let mut snapshot_pending =
        config.snapshot_on_first_start && store.meta(store::SNAPSHOT_DONE).await?.is_none();
    // Resyncs not finished before the last stop go on where they were.
    let mut resyncs = ResyncJobs::load(&store).await?;
    let open = |cursor: Option<String>| -> Changes {
        adapter
            .changes(cursor)
            .boxed()
            .ready_chunks(config.publish_batch)
    };
    let mut changes: Option<Changes> = Some(open(store.cursor().await?));
    let mut reopen_at: Option<Instant> = None;
    let mut feed_delays = config.retry.delays();
    let mut unpublished: Option<Vec<LocalChange>> = None;
    let mut reconnect_delays = config.reconnect.delays();
    info!(system = %config.system, "runner started");

    loop {
        let connected = tokio::select! {
            () = &mut shutdown => break,
            r = transport.connect() => r,
        };
        let (link, mut inbox) = match connected {
            Ok(x) => x,
            Err(e) => {
                warn!(system = %config.system, error = %e, "cannot connect");
                if sleep_or_stop(&mut shutdown, reconnect_delays.next()).await {
                    break;
                }
                continue;
            }
        };
        Metrics::inc(&metrics.connections);
        metrics.touch();
        ready.send_replace(true);
        let since = Instant::now();
        let stop = session(
            &mut engine,
            &link,
            &mut inbox,
            &mut changes,
            &mut reopen_at,
            &mut feed_delays,
            &mut unpublished,
            &mut snapshot_pending,
            &mut resyncs,
            &config,
            &open,
            &mut shutdown,
        )
        .await;
        ready.send_replace(false);
        match stop {
            Stop::Shutdown => {
                close_link(&config.system, &link).await;
                break;
            }
            Stop::Fatal(e) => {
                close_link(&config.system, &link).await;
                error!(system = %config.system, error = %e, "runner stopped");
                store.close().await;
                return Err(e);
            }
            Stop::Transport(e) => {
                warn!(system = %config.system, error = %e, "connection lost; reconnecting");
                drop(inbox);
                close_link(&config.system, &link).await;
                if since.elapsed() > Duration::from_secs(30) {
                    reconnect_delays = config.reconnect.delays();
                }
                if sleep_or_stop(&mut shutdown, reconnect_delays.next()).await {
                    break;
                }
            }
        }
    }
    info!(system = %config.system, "runner stopped");
    store.close().await;
    Ok(())
}

/// The deployment's entities: entity name → protobuf message.
pub(crate) fn entities(policy: &concord_policy::Policy) -> HashMap<String, MessageDescriptor> {
    policy
        .entities()
        .iter()
        .map(|e| (e.name.clone(), e.message.clone()))
        .collect()
}

/// Loads the deployment the config names (policy and schema) and checks the system is in it.
pub(crate) fn load_deployment(
    config: &RunnerConfig,
) -> Result<concord_schema::Deployment, RunError> {
    let deployment =
        concord_schema::Deployment::load(&config.policy).map_err(RunError::Deployment)?;
    if deployment.policy.system_id(&config.system).is_none() {
        return Err(RunError::Config(format!(
            "system {:?} is not in policy {}",
            config.system,
            config.policy.display()
        )));
    }
    Ok(deployment)
}

/// Sleeps for `delay` unless asked to stop first; returns whether to stop.
async fn sleep_or_stop(shutdown: &mut Shutdown, delay: Option<Duration>) -> bool {
    let delay = delay.unwrap_or(Duration::from_secs(30));
    tokio::select! {
        () = shutdown => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// One connected session; returns why it ended.
#[allow(clippy::too_many_arguments)]
async fn session<A: SystemAdapter, L: Link>(
    engine: &mut Engine<A>,
    link: &L,
    inbox: &mut Inbox,
    changes: &mut Option<Changes>,
    reopen_at: &mut Option<Instant>,
    feed_delays: &mut (impl Iterator<Item = Duration> + Send),
    unpublished: &mut Option<Vec<LocalChange>>,
    snapshot_pending: &mut bool,
    resyncs: &mut ResyncJobs,
    config: &RunnerConfig,
    open: &(impl Fn(Option<String>) -> Changes + Sync),
    shutdown: &mut Shutdown,
) -> Stop {
    // Events committed but not confirmed before the connection was lost (or the process
    // stopped) go first, identical, before anything else is published.
    if let Err(e) = engine.flush_outbox(link).await {
        return engine_stop(e);
    }
    if *snapshot_pending {
        match snapshot(engine, link, config.publish_batch).await {
            Ok(n) => {
                info!(system = %config.system, published = n, "snapshot published");
                if let Err(e) = engine
                    .store()
                    .set_meta(store::SNAPSHOT_DONE, &now_ms().to_string())
                    .await
                {
                    return Stop::Fatal(e.into());
                }
                *snapshot_pending = false;
            }
            Err(EngineError::Transport(e)) => return Stop::Transport(e),
            Err(e) => return Stop::Fatal(e.into()),
        }
    }
    // A batch read but not committed before the connection was lost goes next.
    if let Some(batch) = unpublished.take()
        && let Err(stop) = publish(engine, link, batch, unpublished).await
    {
        return stop;
    }
    let mut flush = tokio::time::interval(Duration::from_millis(50));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Pruning the state store goes in small batches between messages; while a batch comes back
    // full, the next one follows shortly.
    let every = Duration::from_secs(config.echo_window_secs.clamp(60, 3600));
    let mut prune_at = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut inbox_check = InboxCheck::new(Duration::from_secs(config.inbox_check_secs));
    loop {
        let reopen = async {
            match *reopen_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut *shutdown => {
                if let Err(e) = link.flush().await {
                    warn!(error = %e, "could not flush acknowledgements");
                }
                return Stop::Shutdown;
            }
            msg = inbox.next() => match msg.inspect(|_| inbox_check.delivered = true) {
                None => return Stop::Transport(TransportError::connection("inbox consumer ended")),
                Some(Err(e)) => return Stop::Transport(e),
                Some(Ok(m)) if m.control.is_some() => {
                    if let Err(stop) = control(engine, link, m, resyncs).await {
                        return stop;
                    }
                }
                Some(Ok(m)) => {
                    // What the prefetch already holds goes with it, as one batch.
                    let mut batch = vec![m];
                    let mut ended = None;
                    // A control message ends the batch; it is taken after it, in order.
                    let mut then_control = None;
                    while batch.len() < usize::from(config.prefetch) {
                        match inbox.next().now_or_never() {
                            Some(Some(Ok(m))) if m.control.is_some() => {
                                then_control = Some(m);
                                break;
                            }
                            Some(Some(Ok(m))) => batch.push(m),
                            Some(Some(Err(e))) => {
                                ended = Some(e);
                                break;
                            }
                            Some(None) => {
                                ended = Some(TransportError::connection("inbox consumer ended"));
                                break;
                            }
                            None => break,
                        }
                    }
                    if let Err(stop) = incoming_batch(engine, link, batch, &config.retry, shutdown).await {
                        return stop;
                    }
                    if let Some(m) = then_control
                        && let Err(stop) = control(engine, link, m, resyncs).await
                    {
                        return stop;
                    }
                    if let Some(e) = ended {
                        return Stop::Transport(e);
                    }
                }
            },
            // One page of a resync at a time, between the inbox and the feed (the select picks
            // among ready branches at random, so neither waits for the whole backfill).
            () = std::future::ready(()), if !resyncs.jobs.is_empty() => {
                if let Err(e) = resync_page(engine, link, resyncs, config.publish_batch).await {
                    return engine_stop(e);
                }
            }
            items = next_chunk(changes) => match items {
                None => {
                    info!(system = %config.system, "the change feed ended");
                    *changes = None;
                }
                Some(items) => {
                    let mut batch = Vec::with_capacity(items.len());
                    let mut broken = None;
                    for item in items {
                        match item {
                            Ok(c) => batch.push(c),
                            Err(AdapterError::Permanent(e)) => {
                                warn!(system = %config.system, error = %e, "change feed error: skipped");
                            }
                            Err(e) => {
                                broken = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(e) = broken {
                        // Reopen from the persisted cursor (after this batch) later.
                        let delay = feed_delays.next().unwrap_or(Duration::from_secs(30));
                        warn!(system = %config.system, error = %e, ?delay, "change feed failed; reopening");
                        Metrics::inc(&engine.metrics().retries);
                        *changes = None;
                        *reopen_at = Some(Instant::now() + delay);
                    }
                    if !batch.is_empty()
                        && let Err(stop) = publish(engine, link, batch, unpublished).await
                    {
                        return stop;
                    }
                }
            },
            () = reopen => {
                *reopen_at = None;
                match engine.store().cursor().await {
                    Ok(cursor) => *changes = Some(open(cursor)),
                    Err(e) => return Stop::Fatal(e.into()),
                }
            }
            () = tokio::time::sleep_until(prune_at) => {
                let now = now_ms();
                let seen = now.saturating_sub(config.dedup_retention_hours.saturating_mul(3_600_000));
                let echoes = now.saturating_sub(config.echo_window_secs.saturating_mul(1000));
                let store = engine.store();
                let more = match store.prune_seen(seen, config.dedup_max_entries, PRUNE_BATCH).await {
                    Ok(n) => n >= u64::from(PRUNE_BATCH),
                    Err(e) => {
                        warn!(error = %e, "pruning the state store failed");
                        false
                    }
                };
                if let Err(e) = store.prune_echoes(echoes).await {
                    warn!(error = %e, "pruning the state store failed");
                }
                prune_at = tokio::time::Instant::now() + if more { PRUNE_PAUSE } else { every };
            }
            _ = flush.tick() => {
                if let Err(e) = link.flush().await {
                    return Stop::Transport(e);
                }
            }
            _ = inbox_check.timer.tick() => {
                if let Err(e) = inbox_check.check(link).await {
                    Metrics::inc(&engine.metrics().inbox_stalls);
                    engine.metrics().touch();
                    warn!(system = %config.system, error = %e, "reopening the session");
                    return Stop::Transport(e);
                }
            }
        }
    }
}

/// The check that the inbox consumer still receives: the broker has been seen to keep a
/// consumer registered that no longer gets deliveries (once, after a cluster node failure),
/// which no connection-level signal reveals.
struct InboxCheck {
    timer: tokio::time::Interval,
    /// A message was delivered since the last check.
    delivered: bool,
    /// The last check found messages ready, none delivered.
    ready_before: bool,
}

impl InboxCheck {
    fn new(every: Duration) -> InboxCheck {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        InboxCheck {
            timer,
            delivered: false,
            ready_before: false,
        }
    }

    /// Fails when two checks in a row found messages ready in the inbox and none was
    /// delivered in between (acknowledgements are flushed every 50 ms, so none is held back:
    /// the prefetch window was open all along).
    async fn check<L: Link>(&mut self, link: &L) -> Result<(), TransportError> {
        if std::mem::take(&mut self.delivered) {
            self.ready_before = false;
            return Ok(());
        }
        // A connection whose peer died unnoticed never answers: within the period (at most
        // 10 s), or the session is reopened.
        let within = self.timer.period().min(Duration::from_secs(10));
        let ready = tokio::time::timeout(within, link.inbox_ready())
            .await
            .map_err(|_| {
                TransportError::connection(format!(
                    "the inbox check got no answer within {within:?}"
                ))
            })??
            .unwrap_or(0);
        if ready == 0 {
            self.ready_before = false;
            return Ok(());
        }
        if std::mem::replace(&mut self.ready_before, true) {
            return Err(TransportError::connection(format!(
                "inbox consumer stalled: {ready} messages ready and none delivered for {:?}",
                self.timer.period()
            )));
        }
        Ok(())
    }
}

/// The next chunk of the feed; pending forever when there is no feed.
async fn next_chunk(
    changes: &mut Option<Changes>,
) -> Option<Vec<Result<LocalChange, AdapterError>>> {
    match changes {
        Some(c) => c.next().await,
        None => futures::future::pending().await,
    }
}

/// Commits a batch to the outbox and publishes the outbox. If the commit fails, keeps the batch
/// in `unpublished` for the next session; once committed, the batch lives in the outbox and is
/// republished from there (never rebuilt from the change feed).
async fn publish<A: SystemAdapter, L: Link>(
    engine: &mut Engine<A>,
    link: &L,
    batch: Vec<LocalChange>,
    unpublished: &mut Option<Vec<LocalChange>>,
) -> Result<(), Stop> {
    if let Err(e) = engine.stage_local(&batch, false).await {
        *unpublished = Some(batch);
        return Err(engine_stop(e));
    }
    engine
        .flush_outbox(link)
        .await
        .map(drop)
        .map_err(engine_stop)
}

/// How the session ends after an engine failure.
fn engine_stop(e: EngineError) -> Stop {
    match e {
        EngineError::Transport(e) => Stop::Transport(e),
        // The state store failed (disk full, I/O): treat it like a lost connection, so the work
        // is retried after a backoff rather than dropped.
        EngineError::Store(e) => {
            Stop::Transport(TransportError::connection(format!("state store: {e}")))
        }
    }
}

/// Publishes a snapshot of every record.
async fn snapshot<A: SystemAdapter, L: Link>(
    engine: &mut Engine<A>,
    link: &L,
    batch: usize,
) -> Result<usize, EngineError> {
    let mut items = engine.adapter().snapshot().boxed().ready_chunks(batch);
    let mut total = 0;
    while let Some(chunk) = items.next().await {
        let chunk: Vec<LocalChange> = chunk
            .into_iter()
            .filter_map(|r| {
                r.map_err(|e| warn!(error = %e, "snapshot item skipped"))
                    .ok()
            })
            .collect();
        total += engine.handle_local(&chunk, true, link).await?;
    }
    Ok(total)
}

/// A resync this system publishes snapshots for (a request the router forwarded), with how far
/// it got: kept in the state store until done.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ResyncJob {
    id: String,
    target: String,
    entity: Option<String>,
    key: Option<String>,
    /// The last record published (entity, key).
    after: (String, String),
    done: u64,
    total: u64,
}

/// The resyncs to do, oldest first.
#[derive(Debug, Default)]
struct ResyncJobs {
    jobs: Vec<ResyncJob>,
}

impl ResyncJobs {
    async fn load(store: &Store) -> Result<ResyncJobs, StoreError> {
        let jobs = match store.meta(store::RESYNC_JOBS).await? {
            Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                warn!(error = %e, "unreadable resync state: the resyncs in progress are dropped");
                Vec::new()
            }),
            None => Vec::new(),
        };
        Ok(ResyncJobs { jobs })
    }

    async fn save(&self, store: &Store) -> Result<(), StoreError> {
        let json = serde_json::to_string(&self.jobs).unwrap_or_else(|_| "[]".to_owned());
        store.set_meta(store::RESYNC_JOBS, &json).await
    }
}

/// Header `concord-control` of a resync request.
const CONTROL_RESYNC: &str = "resync";

/// Takes a control message from the inbox: a resync request the router forwarded becomes a job
/// (saved, then acknowledged); anything else is dead-lettered, never applied.
async fn control<A: SystemAdapter, L: Link>(
    engine: &mut Engine<A>,
    link: &L,
    m: Incoming,
    resyncs: &mut ResyncJobs,
) -> Result<(), Stop> {
    use concord_policy::route::DeadLetterReason;
    use prost::Message;
    let refused = if m.user_id.as_deref() != Some(engine.router_user()) {
        Some((
            DeadLetterReason::UntrustedPublisher,
            format!(
                "a control message from {:?}, not from the router",
                m.user_id
            ),
        ))
    } else if m.control.as_deref() != Some(CONTROL_RESYNC) {
        Some((
            DeadLetterReason::InvalidControl,
            format!("unknown control message {:?}", m.control),
        ))
    } else {
        match concord_proto::v1::ResyncRequest::decode(m.body.as_slice()) {
            Err(e) => Some((
                DeadLetterReason::InvalidControl,
                format!("not a concord.v1.ResyncRequest: {e}"),
            )),
            Ok(request) => {
                let entity = (!request.entity.is_empty()).then_some(request.entity);
                let key = (!request.key.is_empty()).then_some(request.key);
                let system = engine.system().to_owned();
                let total = engine
                    .store()
                    .resync_count(&system, entity.as_deref(), key.as_deref())
                    .await
                    .map_err(|e| engine_stop(e.into()))?;
                info!(%system, id = %request.id, target = %request.target, ?entity, ?key, total,
                    "resync requested: publishing snapshots");
                Metrics::inc(&engine.metrics().resync_requests);
                Metrics::add(&engine.metrics().resync_records_total, total);
                resyncs.jobs.push(ResyncJob {
                    id: request.id,
                    target: request.target,
                    entity,
                    key,
                    after: (String::new(), String::new()),
                    done: 0,
                    total,
                });
                resyncs
                    .save(engine.store())
                    .await
                    .map_err(|e| engine_stop(e.into()))?;
                None
            }
        }
    };
    if let Some((reason, detail)) = refused {
        warn!(reason = reason.as_str(), %detail, "dead-lettering a control message");
        link.dead_letter(&m.body, reason.as_str(), &detail).await?;
        Metrics::inc(&engine.metrics().dead_lettered);
    }
    engine.metrics().touch();
    link.ack(m.tag).await?;
    Ok(())
}

/// Publishes the next page of the oldest resync on the resync lane (each record's fields this
/// system wrote last, with their own clocks, as `OP_SNAPSHOT` for the target only) and a
/// progress report, then saves how far it got; drops the job once done.
async fn resync_page<A: SystemAdapter, L: Link>(
    engine: &mut Engine<A>,
    link: &L,
    resyncs: &mut ResyncJobs,
    batch: usize,
) -> Result<(), EngineError> {
    let Some(job) = resyncs.jobs.first_mut() else {
        return Ok(());
    };
    let limit = u32::try_from(batch.max(1)).unwrap_or(u32::MAX);
    let page = engine
        .store()
        .resync_page(
            engine.system(),
            job.entity.as_deref(),
            job.key.as_deref(),
            (&job.after.0, &job.after.1),
            limit,
        )
        .await?;
    let finished = page.len() < batch.max(1);
    let mut out = Vec::with_capacity(page.len() + 1);
    for (entity, key, fields) in &page {
        if let Some(ev) = engine.resync_event(entity, key, fields, &job.target) {
            out.push(ev);
        }
    }
    let published = page.len() as u64;
    if let Some((entity, key, _)) = page.into_iter().last() {
        job.after = (entity, key);
    }
    job.done = job.done.saturating_add(published);
    out.push(engine.resync_progress(&job.id, &job.target, job.done, job.total, finished));
    link.publish(&out).await?;
    Metrics::add(&engine.metrics().resync_records_published, published);
    engine.metrics().touch();
    if finished {
        info!(system = %engine.system(), id = %job.id, target = %job.target, done = job.done, "resync published");
        resyncs.jobs.remove(0);
    }
    resyncs.save(engine.store()).await?;
    Ok(())
}

/// Processes inbox messages, in order, until each is acknowledged: those the engine takes
/// together (their applies in one [`SystemAdapter::apply_batch`]), then the rest one by one.
async fn incoming_batch<A: SystemAdapter, L: Link>(
    engine: &mut Engine<A>,
    link: &L,
    batch: Vec<Incoming>,
    retry: &RetryConfig,
    shutdown: &mut Shutdown,
) -> Result<(), Stop> {
    let results = if batch.len() > 1 {
        let messages: Vec<(&[u8], Option<&str>)> = batch
            .iter()
            .map(|m| (m.body.as_slice(), m.user_id.as_deref()))
            .collect();
        engine.handle_incoming_batch(&messages).await
    } else {
        Vec::new()
    };
    let mut results = results.into_iter();
    for m in batch {
        match results.next() {
            Some(Ok(_)) => link.ack(m.tag).await?,
            Some(Err(IncomingError::Permanent { reason, detail })) => {
                dead_letter(engine, link, &m, reason, &detail).await?;
            }
            // Left to be processed alone (the engine puts no transient failure in a batch's
            // results; one would be retried alone too).
            Some(Err(IncomingError::Transient(_))) | None => {
                results = Vec::new().into_iter();
                incoming(engine, link, m, retry, shutdown).await?;
            }
        }
    }
    Ok(())
}

/// Dead-letters an incoming message that failed permanently, then acknowledges it.
async fn dead_letter<A: SystemAdapter, L: Link>(
    engine: &Engine<A>,
    link: &L,
    m: &Incoming,
    reason: DeadLetterReason,
    detail: &str,
) -> Result<(), Stop> {
    warn!(reason = reason.as_str(), %detail, "dead-lettering an incoming message");
    link.dead_letter(&m.body, reason.as_str(), detail).await?;
    Metrics::inc(&engine.metrics().dead_lettered);
    engine.metrics().touch();
    link.ack(m.tag).await?;
    Ok(())
}

/// Processes one inbox message until it is acknowledged (applied, recorded, duplicate, stale or
/// dead-lettered). Transient failures are retried in place, forever.
async fn incoming<A: SystemAdapter, L: Link>(
    engine: &mut Engine<A>,
    link: &L,
    m: Incoming,
    retry: &RetryConfig,
    shutdown: &mut Shutdown,
) -> Result<(), Stop> {
    let mut delays = retry.delays();
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        match engine.handle_incoming(&m.body, m.user_id.as_deref()).await {
            Ok(_) => {
                link.ack(m.tag).await?;
                return Ok(());
            }
            Err(IncomingError::Permanent { reason, detail }) => {
                return dead_letter(engine, link, &m, reason, &detail).await;
            }
            Err(IncomingError::Transient(e)) => {
                Metrics::inc(&engine.metrics().retries);
                engine.metrics().touch();
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                warn!(attempt, error = %e, ?delay, "applying an incoming change failed; retrying");
                let stop = tokio::select! {
                    () = &mut *shutdown => true,
                    () = tokio::time::sleep(delay) => false,
                };
                if stop {
                    // Not acknowledged: the broker redelivers it.
                    return Err(Stop::Shutdown);
                }
            }
        }
    }
}
