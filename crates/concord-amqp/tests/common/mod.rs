//! Helpers shared by the AMQP layer's broker tests.
#![allow(dead_code, clippy::expect_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use concord_amqp::{Connection, connect, connection_name};

/// How long any wait may take before the test fails (a safety net, never synchronisation).
pub const SAFETY_NET: Duration = Duration::from_secs(60);

/// The broker (`AMQP_URI`, default the local RabbitMQ).
pub fn uri() -> String {
    std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A namespace no other test (or run) uses.
pub fn unique_ns(test: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t{}-{}-{test}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Await `fut`, failing the test (instead of hanging) if it takes absurdly long.
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(SAFETY_NET, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// A connection named after `role`.
pub async fn connect_test(role: &str) -> Connection {
    within("connect", connect(&uri(), &connection_name(role)))
        .await
        .expect("connect")
}

/// A lapin connection of the test's own, to poke the broker below this crate's API.
pub async fn raw_connect(role: &str) -> lapin::Connection {
    let properties =
        lapin::ConnectionProperties::default().with_connection_name(connection_name(role).into());
    within(
        "raw connect",
        lapin::Connection::connect(&uri(), properties),
    )
    .await
    .expect("raw connect")
}
