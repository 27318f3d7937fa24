//! The transactional outbox, over an in-memory transport whose broker "accepts" a publish but
//! whose confirm is lost (the connection fails before it arrives): the runner must republish the
//! identical events (same ids, same bytes, same stamps), in order, on the next session or after
//! a restart, and count them as published once only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use concord_adapter::testkit::{MemorySystem, text};
use concord_adapter::transport::Inbox;
use concord_adapter::{Link, Outgoing, RunnerConfig, RunnerHandle, Transport, TransportError};
use concord_proto::v1::ChangeEvent;
use futures::StreamExt;
use prost::Message;
use tokio::sync::watch;

/// What the fake broker accepted, and how many more publishes lose their confirm.
#[derive(Clone)]
struct Broker {
    accepted: Arc<watch::Sender<Vec<Outgoing>>>,
    lose_confirms: Arc<AtomicUsize>,
}

impl Broker {
    fn new(lose_confirms: usize) -> Broker {
        Broker {
            accepted: Arc::new(watch::channel(Vec::new()).0),
            lose_confirms: Arc::new(AtomicUsize::new(lose_confirms)),
        }
    }

    fn accepted(&self) -> Vec<Outgoing> {
        self.accepted.borrow().clone()
    }

    async fn wait_accepted(&self, n: usize) {
        let mut rx = self.accepted.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.len() >= n))
            .await
            .expect("timed out waiting for publishes")
            .expect("broker gone");
    }
}

struct FlakyLink(Broker);

impl Link for FlakyLink {
    async fn publish(&self, events: &[Outgoing]) -> Result<(), TransportError> {
        // The broker takes (and routes) every event...
        self.0.accepted.send_modify(|v| v.extend_from_slice(events));
        // ...but the confirms may be lost with the connection.
        let lost = self
            .0
            .lose_confirms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost {
            return Err(TransportError::connection(
                "connection lost before the confirms",
            ));
        }
        Ok(())
    }
    async fn dead_letter(&self, _: &[u8], _: &str, _: &str) -> Result<(), TransportError> {
        Ok(())
    }
    async fn ack(&self, _: u64) -> Result<(), TransportError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn close(&self) {}
}

impl Transport for Broker {
    type Link = FlakyLink;
    async fn connect(&self) -> Result<(FlakyLink, Inbox), TransportError> {
        Ok((FlakyLink(self.clone()), futures::stream::pending().boxed()))
    }
}

fn config(state: &std::path::Path) -> RunnerConfig {
    common::orders_config(state)
}

async fn wait_published(runner: &RunnerHandle, n: u64) {
    tokio::time::timeout(
        Duration::from_secs(10),
        runner.wait_until(|m| m.published >= n),
    )
    .await
    .expect("timed out waiting for the published counter");
}

fn decode(o: &Outgoing) -> ChangeEvent {
    ChangeEvent::decode(o.body.as_slice()).unwrap()
}

#[tokio::test]
async fn a_batch_whose_confirm_was_lost_is_republished_identically() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::new(1);
    let memory = MemorySystem::new("orders");
    let runner = concord_adapter::start_with(memory.clone(), config(dir.path()), broker.clone());
    memory.create("customer", [("name", text("Ada")), ("phone", text("p0"))]);
    wait_published(&runner, 1).await;
    let m = runner.metrics();
    assert_eq!(m.published, 1, "counted once, when confirmed");
    assert_eq!(m.connections, 2);
    let accepted = broker.accepted();
    assert_eq!(accepted.len(), 2, "published, then republished once");
    assert_eq!(
        accepted[0], accepted[1],
        "same event id, routing key, headers and bytes"
    );
    let ev = decode(&accepted[0]);
    assert_eq!(ev.event_id, accepted[0].event_id);
    assert!(ev.clocks.contains_key("phone"));

    // The next change is a new event, published once, after the republished one.
    let id = memory.find("customer", "name", "Ada").unwrap();
    memory.edit("customer", &id, [("phone", text("p1"))]);
    wait_published(&runner, 2).await;
    let accepted = broker.accepted();
    assert_eq!(accepted.len(), 3);
    let next = decode(&accepted[2]);
    assert_ne!(next.event_id, ev.event_id);
    assert_eq!(next.key, ev.key);
    assert!(next.clocks["phone"].hlc > ev.clocks["phone"].hlc);
    runner.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unconfirmed_batch_is_republished_identically_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let memory = MemorySystem::new("orders");
    let id = memory.create("customer", [("name", text("Ada"))]);
    memory.edit("customer", &id, [("name", text("Ada L."))]);
    // Every confirm is lost: the process stops with its first batch committed but unconfirmed
    // (it retries that batch forever and reads nothing else meanwhile).
    let lossy = Broker::new(usize::MAX);
    let first = concord_adapter::start_with(memory.clone(), config(dir.path()), lossy.clone());
    lossy.wait_accepted(2).await;
    let read_first = first.metrics().local_changes;
    assert_eq!(first.metrics().published, 0);
    first.shutdown().await.unwrap();
    let mut distinct: Vec<Outgoing> = Vec::new();
    for o in lossy.accepted() {
        if let Some(d) = distinct.iter().find(|d| d.event_id == o.event_id) {
            assert_eq!(*d, o, "every retry sends the same bytes");
        } else {
            distinct.push(o);
        }
    }
    assert!(!distinct.is_empty());

    let broker = Broker::new(0);
    let second = concord_adapter::start_with(memory.clone(), config(dir.path()), broker.clone());
    wait_published(&second, 2).await;
    let again = broker.accepted();
    assert_eq!(
        again[..distinct.len()],
        distinct[..],
        "the same events first, byte for byte, in order"
    );
    // The feed resumed after the committed batch: nothing of it was rebuilt under new ids.
    assert_eq!(second.metrics().local_changes + read_first, 2);
    assert_eq!(again.len(), 2, "one event per change, none twice");
    second.shutdown().await.unwrap();
}
