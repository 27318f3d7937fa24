//! Helpers shared by the router's broker tests.

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use concord_admin::scratch::{Broker, ScratchVhost};
use concord_amqp::{Connection, Publisher, PublisherOptions, Topology, connect};
use futures::FutureExt;

/// How long any wait may take before the test fails (a safety net, never synchronisation).
pub const SAFETY_NET: Duration = Duration::from_secs(60);
pub const SEED_SYSTEMS: [&str; 3] = ["orders", "support", "delivery"];

/// A throw-away vhost named `ns` (the namespace of its exchanges and queues) with the users of
/// `systems`, the router's and the operator's, deleted when dropped.
pub fn scratch(ns: &str, systems: &[&str]) -> ScratchVhost {
    ScratchVhost::create(Broker::from_env(), ns, systems).unwrap()
}

/// The router's settings in `vhost`. The tests publish as the operator, for any system, so the
/// router does not require `user_id` here (what the broker and the router enforce about
/// identities is tested end to end in the `concord-it` package).
pub fn router_config(vhost: &ScratchVhost) -> concord_router::RouterConfig {
    concord_router::RouterConfig {
        amqp_uri: vhost.router_uri(),
        namespace: vhost.name().to_owned(),
        http_listen: "127.0.0.1:0".into(),
        watch_policy: false,
        require_user_id: false,
        ..concord_router::RouterConfig::default()
    }
}

/// A namespace no other test (or run) uses.
pub fn unique_ns(test: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "it-router-{}-{}-{test}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Awaits `fut`, failing the test after [`SAFETY_NET`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(SAFETY_NET, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Polls `cond` until it holds (for state that has no event to await: metrics, broker-side
/// queue state).
pub async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + SAFETY_NET;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wall-clock milliseconds, for event clocks.
pub use concord_amqp::now_ms;

/// A fresh namespace for one test, in its own vhost: the seed policy and its schema in `dir`
/// (`policy.toml`, `customer.proto`), a client connection (as the operator) and its publisher.
pub struct World {
    pub topology: Topology,
    pub dir: tempfile::TempDir,
    pub client: Connection,
    pub publisher: Publisher,
    /// The router's settings for this world.
    pub router: concord_router::RouterConfig,
}

/// Declares `topology` for the seed systems (adapters declare the exchanges and their inboxes
/// too; the tests publish before the router may have declared anything), runs `body` in it,
/// then deletes the namespace, with the inboxes of `later_systems` the test adds, even if
/// `body` panicked.
pub async fn in_namespace<F, Fut>(topology: Topology, later_systems: &[&str], body: F)
where
    F: FnOnce(World) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut users: Vec<&str> = SEED_SYSTEMS.to_vec();
    users.extend_from_slice(later_systems);
    // Deleted (with every queue and exchange in it) when dropped, also after a panic.
    let vhost = scratch(topology.namespace(), &users);
    let dir = tempfile::tempdir().unwrap();
    concord_seed_model::write_seed(dir.path()).unwrap();
    let client = within(
        "connect",
        connect(
            &vhost.operator_uri(),
            &format!("it-client/{}", topology.namespace()),
        ),
    )
    .await
    .unwrap();
    let publisher = Publisher::open(&client, PublisherOptions::default())
        .await
        .unwrap();
    let channel = client.open_channel().await.unwrap();
    let systems: Vec<String> = SEED_SYSTEMS.iter().map(|s| (*s).to_owned()).collect();
    topology.declare_router(&channel, &systems).await.unwrap();
    let world = World {
        topology: topology.clone(),
        dir,
        client,
        publisher,
        router: router_config(&vhost),
    };
    let outcome = AssertUnwindSafe(body(world)).catch_unwind().await;
    drop(vhost);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
