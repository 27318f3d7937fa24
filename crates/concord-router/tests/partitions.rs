//! The partitioned router input against the real broker: replicas subscribe to their preferred
//! partitions first, stand by for the others, and take over a partition when its router stops,
//! keeping per-record order. Every test works in its own namespace and deletes it at the end.
//! Timeouts are safety nets only; broker-side state (queue lengths) is polled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Instant;

use concord_amqp::{
    AckBatcher, MessageProps, PARTITION_HASH_HEADER, Topology, consume, queue_message_count,
};
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use concord_router::{QueueType, RouterConfig, RouterHandle};
use concord_seed_model::seed::v1::Customer;
use futures::StreamExt;
use prost::Message;

use common::*;

const PARTITIONS: u16 = 4;
const KEYS: usize = 24;
/// Rounds of payments (one per key each) in the replicas scenario.
const ROUNDS: usize = 8;

/// An `orders` payment of `cents` for customer `key` (support is the only other system that
/// sees it: one delivery per event).
fn payment(key: &str, cents: i64) -> ChangeEvent {
    let record = Customer {
        amount_paid: Some(cents),
        ..Customer::default()
    };
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        entity: "customer".into(),
        key: key.into(),
        op: Op::Upsert as i32,
        record: record.encode_to_vec(),
        field_mask: vec!["amount_paid".into()],
        clocks: [(
            "amount_paid".to_owned(),
            FieldClock {
                hlc: now_ms() << 16,
                system: "orders".into(),
                rank: 0,
            },
        )]
        .into(),
        schema_version: concord_proto::SCHEMA_VERSION,
        observed_at_ms: now_ms(),
        ..ChangeEvent::default()
    }
}

impl World {
    fn config(&self, replica_index: u16) -> RouterConfig {
        RouterConfig {
            partitions: PARTITIONS,
            replicas: Some(2),
            replica_index: Some(replica_index),
            queue_type: match self.topology.queue_type() {
                concord_amqp::QueueType::Classic => QueueType::Classic,
                concord_amqp::QueueType::Quorum => QueueType::Quorum,
            },
            prefetch: 16,
            ack_batch: 4,
            ..self.router.clone()
        }
    }

    async fn start(&self, config: RouterConfig) -> RouterHandle {
        let router = concord_router::Router::start(config, self.dir.path().join("policy.toml"))
            .await
            .unwrap();
        within("router ready", router.wait_ready()).await.unwrap();
        router
    }

    /// Publishes like an adapter: routing key `<source>.<entity>`, header `concord-key`.
    async fn publish(&self, ev: &ChangeEvent) {
        let props = MessageProps::new()
            .header(PARTITION_HASH_HEADER, format!("{}/{}", ev.entity, ev.key))
            .message_id(ev.event_id.as_str());
        within(
            "publish",
            self.publisher.publish_confirmed(
                &self.topology.ingress_exchange(),
                &format!("{}.{}", ev.source, ev.entity),
                &ev.encode_to_vec(),
                props,
            ),
        )
        .await
        .unwrap();
    }

    async fn publish_round(&self, round: i64) {
        for k in 0..KEYS {
            self.publish(&payment(&format!("k{k}"), round)).await;
        }
    }

    /// Ready messages of `queue`.
    async fn count(&self, queue: &str) -> u32 {
        let channel = self.client.open_channel().await.unwrap();
        let n = queue_message_count(&channel, queue).await.unwrap();
        let _ = channel.close().await;
        n
    }

    async fn wait_inbox(&self, system: &str, n: u32) {
        let inbox = self.topology.inbox(system);
        eventually(&format!("{n} messages in {inbox}"), async || {
            self.count(&inbox).await >= n
        })
        .await;
    }
}

async fn with_world<F, Fut>(test: &str, queue_type: QueueType, body: F)
where
    F: FnOnce(World) -> Fut,
    Fut: Future<Output = ()>,
{
    let topology = Topology::new(unique_ns(test))
        .with_partitions(PARTITIONS)
        .with_queue_type(match queue_type {
            QueueType::Classic => concord_amqp::QueueType::Classic,
            QueueType::Quorum => concord_amqp::QueueType::Quorum,
        });
    in_namespace(topology, &[], body).await;
}

fn partition_events(router: &RouterHandle) -> Vec<u64> {
    (0..PARTITIONS)
        .map(|p| router.metrics().partition_events_total(p))
        .collect()
}

#[tokio::test]
async fn replicas_share_partitions_and_take_over_on_shutdown_in_order() {
    replicas_share_partitions(QueueType::Classic).await;
}

#[tokio::test]
async fn replicas_share_quorum_partitions_and_take_over_on_shutdown_in_order() {
    replicas_share_partitions(QueueType::Quorum).await;
}

async fn replicas_share_partitions(queue_type: QueueType) {
    let test = format!("replicas-{}", queue_type.as_str());
    with_world(&test, queue_type, |w| async move {
        let t0 = Instant::now();
        let keys = KEYS as u32;
        // Replica 0 alone, whose standby subscriptions are far away: it routes its preferred
        // partitions 0 and 2 only; the events of partitions 1 and 3 wait in their queues.
        let a = w
            .start(RouterConfig {
                standby_delay_ms: 3_600_000,
                ..w.config(0)
            })
            .await;
        assert!(a.metrics().partition_subscribed(0) && a.metrics().partition_subscribed(2));
        assert!(!a.metrics().partition_subscribed(1) && !a.metrics().partition_subscribed(3));
        w.publish_round(1).await;
        let waiting = w.count(&w.topology.partition_queue(1)).await
            + w.count(&w.topology.partition_queue(3)).await;
        assert!(
            0 < waiting && waiting < keys,
            "the keys spread over the partitions: {waiting} of {keys} wait in 1 and 3"
        );
        w.wait_inbox("support", keys - waiting).await;
        let by_a = partition_events(&a);
        assert_eq!(by_a[1] + by_a[3], 0, "{by_a:?}");
        assert_eq!(by_a[0] + by_a[2], u64::from(keys - waiting), "{by_a:?}");

        // Replica 1 takes its partitions 1 and 3 at once and stands by for 0 and 2.
        let b = w
            .start(RouterConfig {
                standby_delay_ms: 0,
                ..w.config(1)
            })
            .await;
        w.wait_inbox("support", keys).await;
        let by_b = partition_events(&b);
        assert_eq!(by_b[1] + by_b[3], u64::from(waiting), "{by_b:?}");
        eventually("b stands by for 0 and 2", async || {
            (0..PARTITIONS).all(|p| b.metrics().partition_subscribed(p))
        })
        .await;
        w.publish_round(2).await;
        w.wait_inbox("support", 2 * keys).await;
        assert_eq!(partition_events(&b)[0] + partition_events(&b)[2], 0);

        // Replica 0 drains and stops in the middle of a stream: it settles what it processes,
        // hands back what it received but did not process, and replica 1 takes over its
        // partitions from there.
        let a_before: u64 = partition_events(&a).iter().sum();
        let publish = async {
            for round in 3..=ROUNDS as i64 {
                w.publish_round(round).await;
            }
        };
        let stop = async {
            eventually("replica 0 working on the stream", async || {
                partition_events(&a).iter().sum::<u64>() >= a_before + 4
            })
            .await;
            a.shutdown().await.unwrap();
        };
        tokio::join!(publish, stop);
        w.wait_inbox("support", ROUNDS as u32 * keys).await;
        let by_b = partition_events(&b);
        assert!(by_b[0] + by_b[2] > 0, "{by_b:?}");
        for p in 0..PARTITIONS {
            assert_eq!(w.count(&w.topology.partition_queue(p)).await, 0);
        }
        b.shutdown().await.unwrap();

        // Every key's payments reached support once each (no replica processed an input the
        // other one did), in order.
        assert_eq!(
            w.count(&w.topology.inbox("support")).await,
            ROUNDS as u32 * keys
        );
        let channel = w.client.open_channel().await.unwrap();
        let mut inbox = consume(&channel, &w.topology.inbox("support"), "check", 500)
            .await
            .unwrap();
        let mut batcher = AckBatcher::new(1000);
        let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for _ in 0..ROUNDS as u32 * keys {
            let d = within("support inbox", inbox.next())
                .await
                .unwrap()
                .unwrap();
            let ev = ChangeEvent::decode(d.body.as_slice()).unwrap();
            let record = Customer::decode(ev.record.as_slice()).unwrap();
            seen.entry(ev.key)
                .or_default()
                .push(record.amount_paid.unwrap());
            batcher.ack(&d).await.unwrap();
        }
        batcher.flush().await.unwrap();
        assert_eq!(seen.len(), KEYS);
        for (key, rounds) in &seen {
            assert_eq!(rounds, &(1..=ROUNDS as i64).collect::<Vec<_>>(), "{key}");
        }
        eprintln!("replicas ({}): {:?}", queue_type.as_str(), t0.elapsed());
    })
    .await;
}

#[tokio::test]
async fn without_replica_settings_a_router_consumes_every_partition() {
    with_world("all-partitions", QueueType::Classic, |w| async move {
        let router = w
            .start(RouterConfig {
                replicas: None,
                replica_index: None,
                ..w.config(0)
            })
            .await;
        assert!((0..PARTITIONS).all(|p| router.metrics().partition_subscribed(p)));
        w.publish_round(1).await;
        w.wait_inbox("support", KEYS as u32).await;
        let per_partition = partition_events(&router);
        assert_eq!(per_partition.iter().sum::<u64>(), KEYS as u64);
        assert!(
            per_partition.iter().filter(|n| **n > 0).count() > 1,
            "{per_partition:?}"
        );
        let text = router.metrics().encode();
        assert!(text.contains("concord_router_partition_events_total{partition=\"0\"}"));
        router.shutdown().await.unwrap();
    })
    .await;
}
