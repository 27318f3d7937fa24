//! Helpers shared by the router's broker tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
