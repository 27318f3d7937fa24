//! Harness for Concord's end-to-end tests against a real RabbitMQ broker.
//!
//! Every test gets its own namespace (exchange and queue prefix) and deletes it at the end, so
//! tests share one broker without seeing each other. Waits are event-driven: they wake on the
//! adapters' metric changes and check a condition, with a deadline only as a safety net.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use concord_adapter::testkit::{MemorySystem, text};
use concord_adapter::{MetricsSnapshot, RunnerConfig, RunnerHandle};
use concord_amqp::Topology;
use concord_router::{Router, RouterConfig, RouterHandle};

pub mod proxy;

/// The broker the tests use (`CONCORD_AMQP_URI`, default the local guest account).
pub fn amqp_uri() -> String {
    std::env::var("CONCORD_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A namespace no other test (or test run) uses.
pub fn unique_namespace(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "it-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
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

/// Router settings for a test namespace (free HTTP port, no file watching).
pub fn router_config(namespace: &str) -> RouterConfig {
    RouterConfig {
        amqp_uri: amqp_uri(),
        namespace: namespace.to_owned(),
        http_listen: "127.0.0.1:0".to_owned(),
        watch_policy: false,
        ..RouterConfig::default()
    }
}

/// Starts an in-process router and waits until it consumes.
pub async fn start_router(namespace: &str, policy: &Path) -> anyhow::Result<RouterHandle> {
    let router = Router::start(router_config(namespace), policy.to_path_buf()).await?;
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
        namespace: &str,
        system: &str,
        memory: MemorySystem,
        dir: &Path,
    ) -> anyhow::Result<Node> {
        Node::start_with_policy(namespace, system, memory, dir, &seed_policy()).await
    }

    /// Starts the SDK runner for `system` over `memory` with the deployment of `policy` (the
    /// policy and the schema it names), with its state under `dir`.
    pub async fn start_with_policy(
        namespace: &str,
        system: &str,
        memory: MemorySystem,
        dir: &Path,
        policy: &Path,
    ) -> anyhow::Result<Node> {
        let mut config = RunnerConfig::new(
            system,
            amqp_uri(),
            dir.join(format!("{system}.sqlite")),
            policy,
        );
        config.namespace = namespace.to_owned();
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
pub async fn start_seed_nodes(namespace: &str, dir: &Path) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for system in SEED_SYSTEMS {
        nodes.push(Node::start(namespace, system, MemorySystem::new(system), dir).await?);
    }
    Ok(nodes)
}

/// Deletes every queue and exchange of a namespace.
pub async fn delete_namespace(namespace: &str, systems: &[&str]) -> anyhow::Result<()> {
    let conn = concord_amqp::connect(&amqp_uri(), &format!("it-cleanup-{namespace}")).await?;
    let channel = conn.open_channel().await?;
    let systems: Vec<String> = systems.iter().map(|s| (*s).to_owned()).collect();
    Topology::new(namespace)
        .delete_all(&channel, &systems)
        .await?;
    Ok(())
}

/// Deletes the namespace when dropped, so a failing test cleans up too.
#[derive(Debug)]
pub struct Cleanup {
    pub namespace: String,
    pub systems: Vec<&'static str>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ns = self.namespace.clone();
        let systems = self.systems.clone();
        // Runs on its own thread and runtime: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(delete_namespace(&ns, &systems));
            }
        })
        .join();
    }
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

/// `host:port` of the broker of [`amqp_uri`] (for a proxy in front of it).
pub fn broker_addr() -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let uri = amqp_uri();
    let rest = uri.split_once("://").map_or(uri.as_str(), |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    host_port
        .to_socket_addrs()
        .with_context(|| format!("resolving the broker address {host_port:?}"))?
        .next()
        .with_context(|| format!("no address for {host_port:?}"))
}

/// [`amqp_uri`] with its host and port replaced by `addr` (e.g. a proxy's).
pub fn amqp_uri_via(addr: std::net::SocketAddr) -> String {
    let uri = amqp_uri();
    let (scheme, rest) = uri.split_once("://").unwrap_or(("amqp", uri.as_str()));
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

/// Settings of an in-process adapter for fault tests: broker URI (possibly a proxy's) and short
/// reconnect and retry backoffs, so that a test is not spent waiting out a long delay.
pub fn fault_runner_config(namespace: &str, system: &str, dir: &Path, uri: &str) -> RunnerConfig {
    let mut config = RunnerConfig::new(
        system,
        uri,
        dir.join(format!("{system}.sqlite")),
        seed_policy(),
    );
    config.namespace = namespace.to_owned();
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

/// Starts one node per seed system connecting to `uri`, with the settings of
/// [`fault_runner_config`].
pub async fn start_seed_nodes_via(
    namespace: &str,
    dir: &Path,
    uri: &str,
) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for system in SEED_SYSTEMS {
        let config = fault_runner_config(namespace, system, dir, uri);
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
    pub namespace: String,
    pub router: RouterHandle,
    pub nodes: Vec<Node>,
    _state: tempfile::TempDir,
    _cleanup: Cleanup,
}

impl SeedRun {
    pub async fn start(test: &str) -> anyhow::Result<SeedRun> {
        let namespace = unique_namespace(test);
        let cleanup = Cleanup {
            namespace: namespace.clone(),
            systems: SEED_SYSTEMS.to_vec(),
        };
        let state = tempfile::tempdir()?;
        let router = start_router(&namespace, &seed_policy()).await?;
        let nodes = start_seed_nodes(&namespace, state.path()).await?;
        Ok(SeedRun {
            namespace,
            router,
            nodes,
            _state: state,
            _cleanup: cleanup,
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
