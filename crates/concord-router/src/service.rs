//! The router service: start-up, the handle, the reconnecting supervisor, shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use concord_amqp::{AmqpError, BackoffBuilder, Topology};
use concord_policy::Policy;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::RouterConfig;
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::policy_file::{self, DeploymentWatcher};
use crate::reload::reload;
use crate::session::{Session, SessionEnd};
use crate::state::{Control, PolicyState, Readiness, ReloadOutcome, Shared};

/// A session that lasted this long counts as healthy: the reconnect backoff starts over.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Largest delay between reconnection rounds when the backoff gives none.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

/// Errors of a [`RouterHandle`] request.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The router is not running any more.
    #[error("the router has stopped")]
    Stopped,
}

/// Starts routers (see [`Router::start`]).
#[derive(Debug)]
pub struct Router;

impl Router {
    /// Validates `config`, loads the policy and the schema it names (failing with every
    /// problem found), binds the HTTP endpoints and starts routing in the background. Connecting to the broker happens
    /// in the background too (with retries): await [`RouterHandle::wait_ready`].
    pub async fn start(config: RouterConfig, policy_path: PathBuf) -> anyhow::Result<RouterHandle> {
        config.validate("router configuration")?;
        let deployment = policy_file::load(&policy_path).map_err(|e| {
            if e.is_unreadable_policy() {
                anyhow::Error::new(e)
            } else {
                anyhow::anyhow!("invalid policy {}:\n{e}", policy_path.display())
            }
        })?;
        let http_addr = config.http_addr()?;
        let listener = TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("cannot listen on {http_addr} (`http_listen`)"))?;
        let http_addr = listener
            .local_addr()
            .context("reading the bound HTTP address")?;

        let metrics = Arc::new(Metrics::new());
        let topology = config.topology();
        let role = format!("concord-router/{}", config.namespace);
        let connection_names = [
            concord_amqp::connection_name(&format!("{role}/consume")),
            concord_amqp::connection_name(&format!("{role}/publish")),
        ];
        let ready = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = watch::channel(Readiness::NotReady);
        let watched = deployment.watched_paths().to_vec();
        let state = PolicyState {
            handles: metrics.handles(&deployment.policy),
            deployment,
        };
        info!(
            policy = %policy_path.display(),
            schema = ?state.deployment.schema.sources(),
            systems = ?state.policy().systems(),
            namespace = %config.namespace,
            %http_addr,
            "router starting"
        );
        let login = concord_amqp::login_of(&config.amqp_uri).context("the router's AMQP URI")?;
        let tls = match &config.tls {
            Some(files) => Some(files.load().map_err(anyhow::Error::msg)?),
            None => None,
        };
        let connect_options = concord_amqp::ConnectOptions {
            tls,
            ..concord_amqp::ConnectOptions::default()
        };
        let shared = Arc::new(Shared {
            login,
            connect_options,
            settings: config.settings(),
            config,
            topology,
            connection_names,
            policy_path,
            policy: ArcSwap::from_pointee(state),
            metrics: metrics.clone(),
            ready: ready.clone(),
            ready_tx,
            sessions: watch::Sender::new(0),
            reloads_applied: watch::Sender::new(0),
            watcher: Mutex::new(None),
        });

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (control_tx, control_rx) = mpsc::channel(16);

        let mut http_shutdown = shutdown_rx.clone();
        let http_task = tokio::spawn(http::serve(
            listener,
            HttpState { ready, metrics },
            async move {
                let _ = http_shutdown.wait_for(|stop| *stop).await;
            },
        ));

        if shared.config.watch_policy {
            let watcher =
                DeploymentWatcher::start(&watched, control_tx.clone(), || Control::Reload(None))
                    .with_context(|| {
                        format!(
                            "cannot watch policy file {} and its schema",
                            shared.policy_path.display()
                        )
                    })?;
            if let Ok(mut slot) = shared.watcher.lock() {
                *slot = Some(watcher);
            }
        }

        let supervised = shared.clone();
        let task = tokio::spawn(async move {
            let result = supervise(supervised.clone(), control_rx, shutdown_rx).await;
            if let Ok(mut watcher) = supervised.watcher.lock() {
                // Stop watching: nothing receives reloads any more.
                watcher.take();
            }
            supervised.set_stopped();
            result
        });
        Ok(RouterHandle {
            http_addr,
            shared,
            control: control_tx,
            shutdown: shutdown_tx,
            ready: ready_rx,
            task: Some(task),
            http_task: Some(http_task),
        })
    }
}

/// A running router.
#[derive(Debug)]
pub struct RouterHandle {
    http_addr: SocketAddr,
    shared: Arc<Shared>,
    control: mpsc::Sender<Control>,
    shutdown: watch::Sender<bool>,
    ready: watch::Receiver<Readiness>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    http_task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RouterHandle {
    /// The address the HTTP endpoints are bound to (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Waits until the router is connected, its topology declared and it consumes. Fails if
    /// the router stopped.
    pub async fn wait_ready(&self) -> Result<(), RouterError> {
        let mut ready = self.ready.clone();
        let state = ready
            .wait_for(|r| *r != Readiness::NotReady)
            .await
            .map(|r| *r)
            .map_err(|_| RouterError::Stopped)?;
        match state {
            Readiness::Ready => Ok(()),
            Readiness::NotReady | Readiness::Stopped => Err(RouterError::Stopped),
        }
    }

    /// Whether the router is connected and consuming right now (what `/readyz` reports).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() == Readiness::Ready
    }

    /// Reloads the policy file and its schema (what SIGHUP does) and returns the outcome.
    pub async fn reload(&self) -> Result<ReloadOutcome, RouterError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Reload(Some(tx)))
            .await
            .map_err(|_| RouterError::Stopped)?;
        rx.await.map_err(|_| RouterError::Stopped)
    }

    /// The router's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The systems of the policy in force.
    pub fn systems(&self) -> Vec<String> {
        self.shared.policy.load().policy().systems().to_vec()
    }

    /// The policy in force (its entities carry the descriptors of the schema in force).
    pub fn policy(&self) -> Policy {
        self.shared.policy.load().policy().clone()
    }

    /// The topology (names of exchanges and queues) the router uses.
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// How many times the router connected and started consuming (1 + reconnections).
    pub fn sessions_started(&self) -> u64 {
        *self.shared.sessions.borrow()
    }

    /// Waits until the router has started `n` sessions (`n - 1` reconnections).
    pub async fn wait_sessions(&self, n: u64) {
        // The sender lives as long as the handle: the wait only ends with the condition.
        let _ = self.shared.sessions.subscribe().wait_for(|s| *s >= n).await;
    }

    /// Waits until `n` policy reloads (by SIGHUP, file change or [`RouterHandle::reload`])
    /// have been applied.
    pub async fn wait_reloads_applied(&self, n: u64) {
        let _ = self
            .shared
            .reloads_applied
            .subscribe()
            .wait_for(|r| *r >= n)
            .await;
    }

    /// Names of the router's consuming and publishing connections.
    pub fn connection_names(&self) -> &[String; 2] {
        &self.shared.connection_names
    }

    /// Stops consuming, settles (publishes, confirms, acks) every input already received,
    /// closes the connections and the HTTP endpoints. With a partitioned input, the inputs
    /// received but not yet processed are handed back instead (the broker redelivers them, in
    /// order, to the standby that takes the partition over), so that two replicas never work on
    /// one partition at once.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.send_replace(true);
        self.wait_stopped().await
    }

    /// Waits until the router stops by itself (a fatal error) — it never does otherwise.
    async fn wait_stopped(&mut self) -> anyhow::Result<()> {
        let result = match self.task.take() {
            Some(task) => task.await.context("the router task panicked")?,
            None => Ok(()),
        };
        self.shutdown.send_replace(true);
        if let Some(http) = self.http_task.take() {
            match http.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "the HTTP server failed"),
                Err(e) => warn!(error = %e, "the HTTP server panicked"),
            }
        }
        result
    }

    /// Runs until `shutdown` completes (then drains) or the router fails.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stopped = {
            let task = self.task.as_mut();
            async move {
                match task {
                    Some(t) => Some(t.await),
                    None => None,
                }
            }
        };
        tokio::select! {
            () = shutdown => {}
            result = stopped => {
                self.task = None;
                self.shutdown.send_replace(true);
                return match result {
                    Some(r) => r.context("the router task panicked")?,
                    None => Ok(()),
                };
            }
        }
        self.shutdown().await
    }
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        // A dropped handle stops the router (after draining) instead of leaking it.
        self.shutdown.send_replace(true);
    }
}

/// Runs a router until `shutdown` completes, then drains and returns.
pub async fn run(
    config: RouterConfig,
    policy_path: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Router::start(config, policy_path)
        .await?
        .run_until(shutdown)
        .await
}

/// Builds the async runtime the configuration asks for (`worker_threads`) and runs
/// [`run_until_signalled`] on it: the whole `concord router` command once the configuration is
/// read. Validates the configuration first (the runtime is built before the router starts).
pub fn run_blocking(config: RouterConfig, policy_path: PathBuf) -> anyhow::Result<()> {
    config.validate("router configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_until_signalled(config, policy_path))
}

/// Runs a router until SIGTERM or SIGINT (then drains and returns `Ok`); SIGHUP reloads
/// the policy.
pub async fn run_until_signalled(config: RouterConfig, policy_path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let handle = Router::start(config, policy_path).await?;
    let control = handle.control.clone();
    let shutdown = async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: draining"); return; }
                _ = int.recv() => { info!("SIGINT: draining"); return; }
                _ = hup.recv() => {
                    info!("SIGHUP: reloading the policy and its schema");
                    // The outcome is logged and counted by the reload itself.
                    if control.send(Control::Reload(None)).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    handle.run_until(shutdown).await
}

/// Reconnects forever: connect, declare, route until the connection is lost, back off.
async fn supervise(
    shared: Arc<Shared>,
    mut control: mpsc::Receiver<Control>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut delays = concord_amqp::backoff().build();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let opened = {
            let open = Session::open(&shared);
            tokio::pin!(open);
            loop {
                tokio::select! {
                    s = &mut open => break Some(s),
                    Some(cmd) = control.recv() => reload_offline(&shared, cmd).await,
                    () = stopped(&mut shutdown) => break None,
                }
            }
        };
        let Some(opened) = opened else { return Ok(()) };
        let result = match opened {
            Ok(session) => {
                let started = tokio::time::Instant::now();
                shared.set_ready(true);
                info!(connections = ?shared.connection_names, "connected; routing");
                let result = session.run(&shared, &mut control, &mut shutdown).await;
                shared.set_ready(false);
                if started.elapsed() >= HEALTHY_SESSION {
                    delays = concord_amqp::backoff().build();
                }
                result
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(SessionEnd::Drained) => {
                info!("drained; stopped");
                return Ok(());
            }
            Err(e) if is_fatal(&e) => {
                error!(error = %e, "cannot connect to the broker; giving up");
                return Err(
                    anyhow::Error::new(e).context("the router cannot connect to the broker")
                );
            }
            Err(e) => {
                let delay = delays.next().unwrap_or(MAX_RECONNECT_DELAY);
                warn!(error = %e, ?delay, "not routing (broker connection or topology failed); retrying");
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        () = &mut sleep => break,
                        Some(cmd) = control.recv() => reload_offline(&shared, cmd).await,
                        () = stopped(&mut shutdown) => return Ok(()),
                    }
                }
            }
        }
    }
}

/// Completes once shutdown is requested (or every sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// A reload while disconnected: validated and swapped; the next session declares it.
async fn reload_offline(shared: &Shared, cmd: Control) {
    match cmd {
        Control::Reload(reply) => {
            let outcome = reload(shared, None).await;
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
    }
}

/// Errors retrying cannot fix: an unusable URI, or a connect refused at the first attempt
/// (bad credentials, unknown vhost: the connect helper does not retry those).
fn is_fatal(e: &AmqpError) -> bool {
    match e {
        AmqpError::InvalidUri(_) => true,
        AmqpError::Connect {
            attempts, source, ..
        } => *attempts <= 1 && !matches!(**source, AmqpError::Timeout(_)),
        _ => false,
    }
}
