//! Harness for Concord's end-to-end tests against a real RabbitMQ broker.
//!
//! Every test gets its own virtual host with its own users ([`Env`]): the systems, the router
//! and the operator connect as the users of a real deployment, with the permissions
//! `concord broker-defs` grants, and the vhost and users are deleted at the end, so tests share
//! one broker without seeing each other. Waits are event-driven: they wake on the
//! adapters' metric changes and check a condition, with a deadline only as a safety net.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use concord_adapter::testkit::{MemorySystem, text};
use concord_adapter::{MetricsSnapshot, RunnerConfig, RunnerHandle};
use concord_admin::scratch::{Broker, ScratchVhost};
use concord_router::{Router, RouterConfig, RouterHandle};

pub mod proxy;

/// The broker the tests use: its management API as an administrator and its AMQP listener
/// (`CONCORD_MANAGEMENT_URL`, `CONCORD_ADMIN_USER`, `CONCORD_ADMIN_PASSWORD`,
/// `CONCORD_AMQP_ADDR`; defaults: the local RabbitMQ's guest account, which only creates and
/// deletes the tests' virtual hosts and users).
pub fn broker() -> Broker {
    Broker::from_env()
}

/// An administrator's AMQP URI on the default vhost (`CONCORD_ADMIN_AMQP_URI`, default the
/// local guest account): for probes of the broker as a whole (alarms), never for Concord's
/// traffic.
pub fn admin_uri() -> String {
    std::env::var("CONCORD_ADMIN_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A name no other test (or test run) uses.
pub fn unique_namespace(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "it-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's broker: its own virtual host (whose namespace has the same name) with a user per
/// system, a router user and an operator user, and the permissions `concord broker-defs`
/// grants; everything runs as those users, never as an administrator. The vhost (with every
/// queue and exchange in it) and the users are deleted when the `Env` is dropped, also when
/// the test fails.
#[derive(Debug)]
pub struct Env {
    vhost: ScratchVhost,
}

impl Env {
    /// A fresh vhost named after `test` with users for `systems`.
    pub fn new(test: &str, systems: &[&str]) -> anyhow::Result<Env> {
        let name = unique_namespace(test);
        let vhost = ScratchVhost::create(broker(), &name, systems)
            .with_context(|| format!("creating the test vhost {name}"))?;
        Ok(Env { vhost })
    }

    /// A fresh vhost with users for the seed systems.
    pub fn seed(test: &str) -> anyhow::Result<Env> {
        Env::new(test, &SEED_SYSTEMS)
    }

    /// The namespace (= the vhost's name).
    pub fn ns(&self) -> &str {
        self.vhost.name()
    }

    /// The vhost with its users.
    pub fn vhost(&self) -> &ScratchVhost {
        &self.vhost
    }

    /// Adds a system's user and permissions.
    pub fn add_system(&mut self, system: &str) -> anyhow::Result<()> {
        Ok(self.vhost.add_system(system)?)
    }

    /// `system`'s AMQP URI.
    pub fn system_uri(&self, system: &str) -> String {
        self.vhost.system_uri(system)
    }

    /// The router's AMQP URI.
    pub fn router_uri(&self) -> String {
        self.vhost.router_uri()
    }

    /// The operator's AMQP URI (may read and write everything in the namespace).
    pub fn operator_uri(&self) -> String {
        self.vhost.operator_uri()
    }

    /// Router settings for this vhost (as the router user, with the user-to-system map; free
    /// HTTP port, no file watching).
    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            amqp_uri: self.router_uri(),
            namespace: self.ns().to_owned(),
            http_listen: "127.0.0.1:0".to_owned(),
            watch_policy: false,
            users: self.vhost.users(),
            ..RouterConfig::default()
        }
    }

    /// The configuration file of a router process for this vhost listening on `http_listen`:
    /// the settings of [`Env::router_config`] then `extra` (more top-level keys).
    pub fn router_toml(&self, http_listen: &str, extra: &str) -> String {
        let mut toml = format!(
            "amqp_uri = {:?}\nnamespace = {:?}\nhttp_listen = {http_listen:?}\nwatch_policy = false\n{extra}\n[users]\n",
            self.router_uri(),
            self.ns(),
        );
        for (user, system) in self.vhost.users() {
            toml.push_str(&format!("{user:?} = {system:?}\n"));
        }
        toml
    }

    /// Adapter settings for `system` in this vhost (as its user, trusting the router user),
    /// with the deployment of `policy` and its state under `dir`.
    pub fn runner_config(&self, system: &str, dir: &Path, policy: &Path) -> RunnerConfig {
        let mut config = RunnerConfig::new(
            system,
            self.system_uri(system),
            dir.join(format!("{system}.sqlite")),
            policy,
        );
        config.namespace = self.ns().to_owned();
        config.router_user = self.vhost.router_user().to_owned();
        config
    }
}

/// The seed policy file (its schema, `customer.proto`, is next to it).
pub fn seed_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed/policy.toml")
}

/// The order example's policy (`examples/order`): the seed Customer and the shop's Order, two
/// schema files no Rust code knows.
pub fn order_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/order/policy.toml")
}

/// The systems of the seed policy.
pub const SEED_SYSTEMS: [&str; 3] = ["delivery", "orders", "support"];

/// Starts an in-process router in `env` and waits until it consumes.
pub async fn start_router(env: &Env, policy: &Path) -> anyhow::Result<RouterHandle> {
    start_router_with(env.router_config(), policy).await
}

/// Starts an in-process router with `config` and waits until it consumes.
pub async fn start_router_with(
    config: RouterConfig,
    policy: &Path,
) -> anyhow::Result<RouterHandle> {
    let router = Router::start(config, policy.to_path_buf()).await?;
    tokio::time::timeout(Duration::from_secs(30), router.wait_ready())
        .await
        .context("router not ready in 30 s")??;
    Ok(router)
}

/// One adapter of a test: an in-memory system behind the SDK runner.
#[derive(Debug)]
pub struct Node {
    pub system: String,
    pub memory: MemorySystem,
    pub runner: RunnerHandle,
    pub config: RunnerConfig,
}

impl Node {
    /// Starts the SDK runner for `system` over `memory` with the seed policy, with its state
    /// under `dir`.
    pub async fn start(
        env: &Env,
        system: &str,
        memory: MemorySystem,
        dir: &Path,
    ) -> anyhow::Result<Node> {
        Node::start_with_policy(env, system, memory, dir, &seed_policy()).await
    }

    /// Starts the SDK runner for `system` over `memory` with the deployment of `policy` (the
    /// policy and the schema it names), with its state under `dir`.
    pub async fn start_with_policy(
        env: &Env,
        system: &str,
        memory: MemorySystem,
        dir: &Path,
        policy: &Path,
    ) -> anyhow::Result<Node> {
        let config = env.runner_config(system, dir, policy);
        let mut runner = concord_adapter::start(memory.clone(), config.clone());
        tokio::time::timeout(Duration::from_secs(30), runner.wait_ready())
            .await
            .context("adapter not ready in 30 s")??;
        Ok(Node {
            system: system.to_owned(),
            memory,
            runner,
            config,
        })
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.runner.metrics()
    }

    /// Waits (event-driven) until `done` holds, or fails after `secs` seconds.
    pub async fn wait(
        &self,
        secs: u64,
        what: &str,
        done: impl Fn(&MetricsSnapshot) -> bool,
    ) -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(secs), self.runner.wait_until(done))
            .await
            .with_context(|| {
                format!(
                    "{}: timed out waiting for {what}; metrics {:?}",
                    self.system,
                    self.metrics()
                )
            })
    }

    /// The text value of a field of the record with local id `id`.
    pub fn text(&self, id: &str, field: &str) -> Option<String> {
        match self.memory.field("customer", id, field) {
            Some(prost_reflect::Value::String(s)) => Some(s),
            Some(other) => Some(format!("{other:?}")),
            None => None,
        }
    }
}

/// Starts one node per seed system, each over a fresh `MemorySystem`.
pub async fn start_seed_nodes(env: &Env, dir: &Path) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for system in SEED_SYSTEMS {
        nodes.push(Node::start(env, system, MemorySystem::new(system), dir).await?);
    }
    Ok(nodes)
}

/// Waits until `cond` holds, re-checking whenever any of `nodes` changes a counter (every apply,
/// publish or echo does); fails after `secs` seconds.
pub async fn converge(
    nodes: &[&Node],
    secs: u64,
    what: &str,
    cond: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let cond = &cond;
    tokio::time::timeout(Duration::from_secs(secs), async {
        while !cond() {
            let waits = nodes
                .iter()
                .map(|n| Box::pin(n.runner.wait_until(move |_| cond())));
            futures::future::select_all(waits).await;
        }
    })
    .await
    .with_context(|| format!("timed out waiting for {what}"))
}

/// `host:port` of the broker's AMQP listener (for a proxy in front of it).
pub fn broker_addr() -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let amqp = broker().amqp;
    let host_port = amqp
        .split_once("://")
        .map_or(amqp.as_str(), |(_, rest)| rest);
    let host_port = host_port.trim_end_matches('/');
    host_port
        .to_socket_addrs()
        .with_context(|| format!("resolving the broker address {host_port:?}"))?
        .next()
        .with_context(|| format!("no address for {host_port:?}"))
}

/// `uri` with its host and port replaced by `addr` (e.g. a proxy's).
pub fn uri_via(uri: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("amqp", uri));
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let userinfo = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{path}")
}

/// Settings of an in-process adapter for fault tests: the broker reached through `via` (a
/// proxy's address) or directly, and short reconnect and retry backoffs, so that a test is not
/// spent waiting out a long delay.
pub fn fault_runner_config(
    env: &Env,
    system: &str,
    dir: &Path,
    via: Option<std::net::SocketAddr>,
) -> RunnerConfig {
    let mut config = env.runner_config(system, dir, &seed_policy());
    if let Some(addr) = via {
        config.amqp_uri = uri_via(&config.amqp_uri, addr);
    }
    config.reconnect = concord_adapter::RetryConfig {
        min_delay_ms: 100,
        max_delay_ms: 2_000,
    };
    config.retry = concord_adapter::RetryConfig {
        min_delay_ms: 100,
        max_delay_ms: 1_000,
    };
    config
}

impl Node {
    /// Starts the SDK runner for `config.system` over `memory` and waits until it consumes.
    pub async fn start_with(config: RunnerConfig, memory: MemorySystem) -> anyhow::Result<Node> {
        let mut runner = concord_adapter::start(memory.clone(), config.clone());
        tokio::time::timeout(Duration::from_secs(30), runner.wait_ready())
            .await
            .context("adapter not ready in 30 s")??;
        Ok(Node {
            system: config.system.clone(),
            memory,
            runner,
            config,
        })
    }
}

/// Starts one node per seed system connecting through `via` (or directly), with the settings
/// of [`fault_runner_config`].
pub async fn start_seed_nodes_via(
    env: &Env,
    dir: &Path,
    via: Option<std::net::SocketAddr>,
) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for system in SEED_SYSTEMS {
        let config = fault_runner_config(env, system, dir, via);
        nodes.push(Node::start_with(config, MemorySystem::new(system)).await?);
    }
    Ok(nodes)
}

/// A router running as its own process (the package's `it-router` binary, whose path only the
/// test targets know: pass `env!("CARGO_BIN_EXE_it-router")`). Killed when dropped, so a failing
/// test leaves no router behind.
#[derive(Debug)]
pub struct RouterProcess(pub std::process::Child);

impl RouterProcess {
    pub fn spawn(exe: &str, policy: &Path, config: &Path) -> anyhow::Result<RouterProcess> {
        let child = std::process::Command::new(exe)
            .arg(policy)
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {exe}"))?;
        Ok(RouterProcess(child))
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The name orders gives customer `r` in round `round` (never used twice: one value, one change).
pub fn name_of(r: usize, round: usize) -> String {
    format!("c{r}-v{round}")
}

/// `(record, round)` of a name given by [`name_of`].
pub fn parse_name(name: &str) -> Option<(usize, usize)> {
    let (record, round) = name.strip_prefix('c')?.split_once("-v")?;
    Some((record.parse().ok()?, round.parse().ok()?))
}

/// The email orders gives customer `r` in round `round`.
pub fn email_of(r: usize, round: usize) -> String {
    format!("{r}@{round}")
}

/// Orders' side of a stream of changes: customers created in round 0, then renamed and given a
/// new email in every round.
#[derive(Debug)]
pub struct EditStream {
    pub ids: Vec<String>,
}

impl EditStream {
    /// Asserts that, for every customer, support holds round `round`'s email and delivery (which
    /// may not see it) none.
    pub fn assert_emails(&self, [support, delivery]: [&Node; 2], round: usize) {
        for r in 0..self.ids.len() {
            let name = name_of(r, round);
            let sid = support
                .memory
                .find("customer", "name", &name)
                .unwrap_or_default();
            assert_eq!(support.text(&sid, "email"), Some(email_of(r, round)));
            let did = delivery
                .memory
                .find("customer", "name", &name)
                .unwrap_or_default();
            assert_eq!(delivery.memory.field("customer", &did, "email"), None);
        }
    }

    /// Waits until `support` and `delivery` hold round `round`'s name of every customer;
    /// returns how long that took. Fails after `secs` seconds, with both nodes' counters.
    pub async fn await_names(
        &self,
        [support, delivery]: [&Node; 2],
        round: usize,
        secs: u64,
    ) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        let records = self.ids.len();
        let has_all = |node: &Node| {
            (0..records).all(|r| {
                node.memory
                    .find("customer", "name", &name_of(r, round))
                    .is_some()
            })
        };
        converge(
            &[support, delivery],
            secs,
            &format!("round {round} in support and delivery"),
            || has_all(support) && has_all(delivery),
        )
        .await
        .with_context(|| {
            format!(
                "support {:?}; delivery {:?}",
                support.metrics(),
                delivery.metrics()
            )
        })?;
        Ok(started.elapsed())
    }

    /// Round 0: orders creates `records` customers (name only).
    pub fn create(orders: &Node, records: usize) -> EditStream {
        let ids = (0..records)
            .map(|r| {
                orders
                    .memory
                    .create("customer", [("name", text(&name_of(r, 0)))])
            })
            .collect();
        EditStream { ids }
    }

    /// One round of edits: every customer gets a new name and email.
    pub fn round(&self, orders: &Node, round: usize) {
        for (r, id) in self.ids.iter().enumerate() {
            orders.memory.edit(
                "customer",
                id,
                [
                    ("name", text(&name_of(r, round))),
                    ("email", text(&email_of(r, round))),
                ],
            );
        }
    }
}

/// The seed scenario running in a fresh namespace: an in-process router and one node per seed
/// system (`nodes` in the order of [`SEED_SYSTEMS`]: delivery, orders, support). The namespace
/// is deleted when the run is dropped, also when the test fails.
#[derive(Debug)]
pub struct SeedRun {
    pub router: RouterHandle,
    pub nodes: Vec<Node>,
    _state: tempfile::TempDir,
    /// Dropped last (fields drop in declaration order): deletes the vhost.
    pub env: Env,
}

impl SeedRun {
    pub async fn start(test: &str) -> anyhow::Result<SeedRun> {
        let env = Env::seed(test)?;
        let state = tempfile::tempdir()?;
        let router = start_router(&env, &seed_policy()).await?;
        let nodes = start_seed_nodes(&env, state.path()).await?;
        Ok(SeedRun {
            router,
            nodes,
            _state: state,
            env,
        })
    }

    /// Stops the adapters, then the router, gracefully.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        for n in self.nodes {
            n.runner.shutdown().await?;
        }
        self.router.shutdown().await
    }
}

/// Picks `n` distinct free local ports (bound together, then released).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?)
}

/// A plain HTTP/1.1 GET of a local endpoint (a router's `/readyz`, `/metrics`); `None` while
/// nothing listens.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// `GET path` at `addr` (an adapter's or router's endpoints): status and body; `None` when it
/// does not answer within 5 s.
pub async fn http_get_at(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()?
        .ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

/// Polls until `cond` holds (router metrics have no event a test could await); fails after
/// `secs` seconds.
pub async fn poll_until(
    secs: u64,
    what: &str,
    mut cond: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if cond().await? {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the adapter counter `concord_adapter_<name>_total` in a `/metrics` body.
pub fn adapter_counter(metrics: &str, name: &str) -> anyhow::Result<u64> {
    let prefix = format!("concord_adapter_{name}_total");
    metrics
        .lines()
        .find(|l| {
            l.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {prefix} in\n{metrics}"))
}

/// Re-checks `done` (a state outside this process: a database, a file, an endpoint; an error
/// counts as "not yet") until it holds, or fails after `deadline`.
pub async fn eventually(
    deadline: Duration,
    what: &str,
    done: impl AsyncFn() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    tokio::time::timeout(deadline, async {
        loop {
            if matches!(done().await, Ok(true)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
    .with_context(|| format!("timed out waiting for {what}"))
}

/// Logs of the in-process services to the test's output, filtered by `CONCORD_TEST_LOG` (a
/// `RUST_LOG`-style filter, e.g. `concord_adapter=debug`); nothing when it is unset. For
/// diagnosing a failing run: `CONCORD_TEST_LOG=info cargo test --test cluster -- --nocapture`.
pub fn test_log() {
    if let Ok(filter) = std::env::var("CONCORD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}
