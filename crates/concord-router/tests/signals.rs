//! `run_until_signalled` with real signals: SIGHUP reloads the policy, SIGTERM drains and
//! returns `Ok`. A binary of its own, because the signal handlers are process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use concord_amqp::{Topology, connect, queue_message_count};
use concord_router::RouterConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

async fn status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

async fn signal(name: &str) {
    let out = tokio::process::Command::new("kill")
        .args([&format!("-{name}"), &std::process::id().to_string()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "kill -{name} failed");
}

async fn queue_exists(vhost: &ScratchVhost, queue: &str) -> bool {
    let conn = connect(&vhost.operator_uri(), "it-signals-probe")
        .await
        .unwrap();
    let channel = conn.open_channel().await.unwrap();
    let exists = queue_message_count(&channel, queue).await.is_ok();
    conn.close().await.unwrap();
    exists
}

#[tokio::test]
async fn sighup_reloads_and_sigterm_drains_and_returns_ok() {
    let ns = format!("it-router-signals-{}", std::process::id());
    let vhost = scratch(&ns, &["orders", "support", "delivery", "billing"]);
    let dir = tempfile::tempdir().unwrap();
    let seed = concord_seed_model::POLICY;
    let policy = concord_seed_model::write_seed(dir.path()).unwrap();
    // A free port for the HTTP endpoints (run_until_signalled does not expose the address).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = RouterConfig {
        http_listen: addr.clone(),
        ..router_config(&vhost)
    };
    let router = tokio::spawn(concord_router::run_until_signalled(config, policy.clone()));
    eventually("router ready", async || {
        status(&addr, "/readyz").await == Some(200)
    })
    .await;

    let topology = Topology::new(ns.clone());
    let billing = topology.inbox("billing");
    assert!(!queue_exists(&vhost, &billing).await);
    let with_billing = seed.replace(
        "[entities.customer]",
        "[systems.billing]\n\n[entities.customer]",
    );
    std::fs::write(&policy, with_billing).unwrap();
    signal("HUP").await;
    eventually("billing inbox declared after SIGHUP", async || {
        queue_exists(&vhost, &billing).await
    })
    .await;

    signal("TERM").await;
    let result = tokio::time::timeout(SAFETY_NET, router)
        .await
        .expect("router stops after SIGTERM")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        status(&addr, "/healthz").await,
        None,
        "HTTP endpoints closed"
    );

    drop(vhost);
}
