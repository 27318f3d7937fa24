//! Helpers shared by the router's broker tests.

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use concord_amqp::{Connection, Publisher, PublisherOptions, Topology, connect};
use futures::FutureExt;

/// How long any wait may take before the test fails (a safety net, never synchronisation).
pub const SAFETY_NET: Duration = Duration::from_secs(60);
pub const SEED_SYSTEMS: [&str; 3] = ["orders", "support", "delivery"];

/// The broker (`CONCORD_AMQP_URI` / `AMQP_URI`, default the local RabbitMQ).
pub fn uri() -> String {
    std::env::var("CONCORD_AMQP_URI")
        .or_else(|_| std::env::var("AMQP_URI"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
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

/// A fresh namespace for one test: the seed policy and its schema in `dir` (`policy.toml`,
/// `customer.proto`), a client
/// connection and its publisher.
pub struct World {
    pub topology: Topology,
    pub dir: tempfile::TempDir,
    pub client: Connection,
    pub publisher: Publisher,
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
    let dir = tempfile::tempdir().unwrap();
    concord_seed_model::write_seed(dir.path()).unwrap();
    let client = within(
        "connect",
        connect(&uri(), &format!("it-client/{}", topology.namespace())),
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
    };
    let outcome = AssertUnwindSafe(body(world)).catch_unwind().await;
    let admin = connect(&uri(), "it-cleanup").await.unwrap();
    let channel = admin.open_channel().await.unwrap();
    let mut all = systems;
    all.extend(later_systems.iter().map(|s| (*s).to_owned()));
    within("cleanup", topology.delete_all(&channel, &all))
        .await
        .unwrap();
    admin.close().await.unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
