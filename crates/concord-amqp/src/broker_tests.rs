//! Broker tests that must act below this crate's API on one of its own connections (the
//! integration tests in `tests/` can only use the API, or lapin connections of their own).
//! They need the broker at `AMQP_URI` (default the local RabbitMQ), work in their own namespace
//! and delete what they declared. Timeouts are safety nets only; nothing sleeps to synchronise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use futures::{FutureExt, StreamExt, future::join_all};
use lapin::types::FieldTable;

use crate::{
    Connection, ConnectionEvent, MessageProps, PublishError, Publisher, PublisherOptions, Topology,
    connect, connection_name, consume,
};

/// How long any wait may take before the test fails (a safety net, never synchronisation).
const SAFETY_NET: Duration = Duration::from_secs(60);

fn uri() -> String {
    std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Await `fut`, failing the test (instead of hanging) if it takes absurdly long.
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(SAFETY_NET, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

async fn connect_test(role: &str) -> Connection {
    within("connect", connect(&uri(), &connection_name(role)))
        .await
        .expect("connect")
}

/// Run `body` with a fresh namespace, then delete the namespace even if `body` panicked.
async fn with_namespace<F, Fut>(
    test: &str,
    topology: impl FnOnce(String) -> Topology,
    systems: &[&str],
    body: F,
) where
    F: FnOnce(Topology, Vec<String>) -> Fut,
    Fut: Future<Output = ()>,
{
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let ns = format!(
        "u{}-{}-{test}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let topology = topology(ns);
    let systems: Vec<String> = systems.iter().map(|s| (*s).to_owned()).collect();
    let outcome = AssertUnwindSafe(body(topology.clone(), systems.clone()))
        .catch_unwind()
        .await;
    let admin = connect_test("test-cleanup").await;
    let channel = admin.open_channel().await.expect("cleanup channel");
    within("cleanup", topology.delete_all(&channel, &systems))
        .await
        .expect("cleanup");
    admin.close().await.expect("close cleanup connection");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The broker closing the connection (here: a connection-level 503 COMMAND_INVALID for an
/// unknown exchange type, as a broker shutdown or forced close would) must surface as
/// errors on every consumer stream and publisher of that connection, without hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_side_connection_close_fails_consumers_and_publishers() {
    with_namespace(
        "srvclose",
        Topology::new,
        &["crm"],
        |topology, _systems| async move {
            let conn = connect_test("test-server-close").await;
            let setup = conn.open_channel().await.unwrap();
            topology.declare_inbox(&setup, "crm").await.unwrap();
            let mut events = Box::pin(conn.events());

            let consumer_channel = conn.open_channel().await.unwrap();
            let mut stream = consume(&consumer_channel, &topology.inbox("crm"), "crm", 10)
                .await
                .unwrap();
            let publisher = Publisher::open(&conn, PublisherOptions::default())
                .await
                .unwrap();
            let mut pending = Vec::new();
            for i in 0..100 {
                pending.push(
                    publisher
                        .publish(
                            &topology.routed_exchange(),
                            "crm",
                            format!("{i}").as_bytes(),
                            MessageProps::new(),
                        )
                        .await
                        .unwrap(),
                );
            }

            let offender = conn.open_channel().await.unwrap();
            let refused = offender
                .lapin()
                .exchange_declare(
                    format!("{}.bogus", topology.namespace()).as_str().into(),
                    lapin::ExchangeKind::Custom("no-such-exchange-type".into()),
                    lapin::options::ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await;
            assert!(refused.is_err());

            // Every message was delivered to the stream or the stream fails; it never hangs.
            let mut delivered = 0;
            let failure = loop {
                match within("consumer stream after server close", stream.next()).await {
                    Some(Ok(_)) => delivered += 1,
                    Some(Err(e)) => break e,
                    None => panic!("stream ended without an error"),
                }
            };
            eprintln!("consumer got {delivered} deliveries, then: {failure}");
            assert!(within("stream end", stream.next()).await.is_none());

            let outcomes = within("pending confirms", join_all(pending)).await;
            let failed = outcomes.iter().filter(|o| o.is_err()).count();
            eprintln!("{failed} of {} pending confirms failed", outcomes.len());
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, Ok(()) | Err(PublishError::Connection(_))))
            );
            assert!(
                publisher
                    .publish(
                        &topology.routed_exchange(),
                        "crm",
                        b"x",
                        MessageProps::new()
                    )
                    .await
                    .is_err()
            );
            assert!(!conn.is_connected());

            // The failure is also reported on the connection's event stream.
            loop {
                match within("connection error event", events.next()).await {
                    Some(ConnectionEvent::Error(e)) => {
                        assert_eq!(e.reply_code(), Some(503));
                        break;
                    }
                    Some(_) => {}
                    None => panic!("event stream ended without an error event"),
                }
            }
        },
    )
    .await;
}
