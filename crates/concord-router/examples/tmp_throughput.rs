#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TEMPORARY: router vs plain forwarder throughput on the local broker.
use std::time::{Duration, Instant};

use concord_amqp::*;
use concord_proto::v1::{ChangeEvent, Customer, FieldClock, Op};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use prost::Message;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn body(i: usize) -> Vec<u8> {
    let record = Customer { open_tickets: Some(i as u32), ..Customer::default() };
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "support".into(),
        entity: "customer".into(),
        key: format!("c-{i}"),
        op: Op::Upsert as i32,
        record: record.encode_to_vec(),
        field_mask: vec!["open_tickets".into()],
        clocks: [("open_tickets".to_owned(), FieldClock { hlc: now_ms() << 16, system: "support".into(), rank: 0 })].into_iter().collect(),
        schema_version: 1,
        observed_at_ms: now_ms(),
        ..ChangeEvent::default()
    }
    .encode_to_vec()
}

async fn prefill(t: &Topology, n: usize) {
    let conn = connect(URI, "bench-fill").await.unwrap();
    let ch = conn.open_channel().await.unwrap();
    let systems: Vec<String> = ["orders", "support", "delivery"].iter().map(|s| s.to_string()).collect();
    t.declare_router(&ch, &systems).await.unwrap();
    let p = Publisher::open(&conn, PublisherOptions { window: 2000 }).await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..n {
        confirms.push(p.publish(&t.ingress_exchange(), "support.customer", &body(i), MessageProps::new()).await.unwrap());
        if confirms.len() >= 1000 {
            for c in confirms.drain(..) { c.await.unwrap(); }
        }
    }
    for c in confirms.drain(..) { c.await.unwrap(); }
    conn.close().await.unwrap();
}

async fn wait_count(t: &Topology, n: u32) {
    let conn = connect(URI, "bench-wait").await.unwrap();
    loop {
        let ch = conn.open_channel().await.unwrap();
        let c = queue_message_count(&ch, &t.inbox("orders")).await.unwrap();
        let _ = ch.close(200, "OK".into()).await;
        if c >= n { break; }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.close().await.unwrap();
}

async fn cleanup(t: &Topology) {
    let conn = connect(URI, "bench-clean").await.unwrap();
    let ch = conn.open_channel().await.unwrap();
    let systems: Vec<String> = ["orders", "support", "delivery"].iter().map(|s| s.to_string()).collect();
    t.delete_all(&ch, &systems).await.unwrap();
    conn.close().await.unwrap();
}

async fn forwarder(t: Topology, stop: tokio::sync::watch::Receiver<bool>) {
    let cc = connect(URI, "fwd-consume").await.unwrap();
    let pc = connect(URI, "fwd-publish").await.unwrap();
    let publisher = Publisher::open(&pc, PublisherOptions { window: 512 }).await.unwrap();
    let ch = cc.open_channel().await.unwrap();
    let mut consumer = consume(&ch, &t.router_queue(), "fwd", 256).await.unwrap();
    let mut batcher = AckBatcher::new(32);
    let mut inflight = FuturesOrdered::new();
    let routed = t.routed_exchange();
    loop {
        if *stop.borrow() { break; }
        tokio::select! {
            biased;
            Some((h, r)) = inflight.next(), if !inflight.is_empty() => {
                let r: Result<(), PublishError> = r;
                r.unwrap();
                batcher.ack(h).await.unwrap();
                if inflight.is_empty() { batcher.flush().await.unwrap(); }
            }
            d = consumer.next(), if inflight.len() < 512 => {
                let d = d.unwrap().unwrap();
                let c = publisher.publish(&routed, "orders", &d.body, MessageProps::new().header("concord-origin", "support").message_id("x")).await.unwrap();
                let h = d.ack_handle();
                inflight.push_back(async move { (h, c.await) });
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    cc.close().await.unwrap();
    pc.close().await.unwrap();
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(30000);
    let policy = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed/policy.toml"));
    for round in 0..2 {
        // forwarder
        let t = Topology::new(format!("bench-fwd-{}-{round}", std::process::id()));
        prefill(&t, n).await;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let start = Instant::now();
        let task = tokio::spawn(forwarder(t.clone(), rx));
        wait_count(&t, n as u32).await;
        let fwd = start.elapsed();
        tx.send(true).unwrap();
        task.await.unwrap();
        cleanup(&t).await;
        // router
        let t = Topology::new(format!("bench-rtr-{}-{round}", std::process::id()));
        prefill(&t, n).await;
        let config = concord_router::RouterConfig { namespace: t.namespace().into(), http_listen: "127.0.0.1:0".into(), watch_policy: false, ..Default::default() };
        let start = Instant::now();
        let h = concord_router::Router::start(config, policy.clone()).await.unwrap();
        wait_count(&t, n as u32).await;
        let rtr = start.elapsed();
        h.shutdown().await.unwrap();
        cleanup(&t).await;
        let f = n as f64 / fwd.as_secs_f64();
        let r = n as f64 / rtr.as_secs_f64();
        println!("round {round}: forwarder {f:.0}/s, router {r:.0}/s, ratio {:.2}", r / f);
    }
}
