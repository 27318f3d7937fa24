//! The runner's check of its inbox consumer, over an in-memory transport: a consumer that
//! stays registered but gets no deliveries while the broker holds messages ready for it (seen
//! once after a cluster node failure) is found out and the session reopened; a consumer that is
//! merely idle, or that receives, is left alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use concord_adapter::testkit::MemorySystem;
use concord_adapter::transport::Inbox;
use concord_adapter::{
    Link, MetricsSnapshot, Outgoing, RunnerConfig, RunnerHandle, Transport, TransportError,
};
use futures::StreamExt;
use tokio::sync::watch;

/// A broker whose inbox never delivers and which reports `ready` messages waiting in it.
#[derive(Clone)]
struct Stalled {
    ready: Arc<AtomicU64>,
    /// The inbox check and the close never get an answer (a connection whose peer died
    /// unnoticed).
    mute: bool,
    /// Checks made so far.
    checks: Arc<watch::Sender<u64>>,
}

impl Stalled {
    fn new(ready: u64) -> Stalled {
        Stalled {
            ready: Arc::new(AtomicU64::new(ready)),
            mute: false,
            checks: Arc::new(watch::channel(0).0),
        }
    }

    async fn wait_checks(&self, n: u64) {
        let mut rx = self.checks.subscribe();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|c| *c >= n))
            .await
            .expect("timed out waiting for inbox checks")
            .expect("broker gone");
    }
}

struct StalledLink(Stalled);

impl Link for StalledLink {
    async fn publish(&self, _: &[Outgoing]) -> Result<(), TransportError> {
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
    async fn close(&self) {
        if self.0.mute {
            // Nor does it answer the close.
            std::future::pending::<()>().await;
        }
    }
    async fn inbox_ready(&self) -> Result<Option<u64>, TransportError> {
        self.0.checks.send_modify(|c| *c += 1);
        if self.0.mute {
            std::future::pending::<()>().await;
        }
        Ok(Some(self.0.ready.load(Ordering::SeqCst)))
    }
}

impl Transport for Stalled {
    type Link = StalledLink;
    async fn connect(&self) -> Result<(StalledLink, Inbox), TransportError> {
        Ok((
            StalledLink(self.clone()),
            futures::stream::pending().boxed(),
        ))
    }
}

fn config(state: &std::path::Path) -> RunnerConfig {
    let mut c = common::orders_config(state);
    c.inbox_check_secs = 1;
    c
}

/// A runner of the seed's orders over `broker` (its state in a directory of its own).
fn start(broker: &Stalled) -> (tempfile::TempDir, RunnerHandle) {
    let dir = tempfile::tempdir().unwrap();
    let runner = concord_adapter::start_with(
        MemorySystem::new("orders"),
        config(dir.path()),
        broker.clone(),
    );
    (dir, runner)
}

/// Waits until the runner's counters say `done`.
async fn until(runner: &RunnerHandle, what: &str, done: impl Fn(&MetricsSnapshot) -> bool) {
    tokio::time::timeout(Duration::from_secs(20), runner.wait_until(done))
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"));
}

#[tokio::test]
async fn a_consumer_that_gets_nothing_while_messages_wait_is_reopened() {
    let broker = Stalled::new(3);
    let (_dir, runner) = start(&broker);
    until(&runner, "the stalled consumer reopened", |m| {
        m.inbox_stalls >= 2 && m.connections >= 3
    })
    .await;
    // Found out on the second check in a row of each session, then reopened.
    assert!(*broker.checks.borrow() >= 4);
    runner.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_consumer_with_an_empty_inbox_is_left_alone() {
    let broker = Stalled::new(0);
    let (_dir, runner) = start(&broker);
    // Three checks of an empty inbox: no stall, the one session goes on.
    broker.wait_checks(3).await;
    let m = runner.metrics();
    assert_eq!(m.inbox_stalls, 0);
    assert_eq!(m.connections, 1);
    runner.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connection_that_never_answers_is_reopened_and_shut_down() {
    let broker = Stalled {
        mute: true,
        ..Stalled::new(0)
    };
    let (_dir, runner) = start(&broker);
    until(&runner, "the session on a mute connection reopened", |m| {
        m.inbox_stalls >= 1 && m.connections >= 2
    })
    .await;
    runner.shutdown().await.unwrap();
}
