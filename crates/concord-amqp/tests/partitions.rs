//! The partitioned router input against the real broker (`AMQP_URI`, default the local
//! RabbitMQ, with the plugin `rabbitmq_consistent_hash_exchange`). Every test works in its own
//! namespace and deletes what it declared. Timeouts are safety nets only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    panic::AssertUnwindSafe,
};

use common::*;
use concord_amqp::{
    AckBatcher, AmqpError, Connection, Delivery, MessageProps, PARTITION_HASH_HEADER, Publisher,
    PublisherOptions, QueueType, Topology, consume, queue_message_count,
};
use futures::{FutureExt, StreamExt};

/// Runs `body` on a declared partitioned topology, then deletes it even if `body` panicked.
async fn with_partitions<F, Fut>(test: &str, topology: Topology, body: F)
where
    F: FnOnce(Topology, Connection) -> Fut,
    Fut: Future<Output = ()>,
{
    let topology = Topology::new(unique_ns(test))
        .with_queue_type(topology.queue_type())
        .with_partitions(topology.partitions());
    let conn = connect_test(test).await;
    let channel = conn.open_channel().await.unwrap();
    within("declare", topology.declare_router(&channel, &[]))
        .await
        .expect("declare the partitioned topology");
    let outcome = AssertUnwindSafe(body(topology.clone(), conn))
        .catch_unwind()
        .await;
    let admin = connect_test("test-cleanup").await;
    let channel = admin.open_channel().await.unwrap();
    within("cleanup", topology.delete_all(&channel, &[]))
        .await
        .expect("cleanup");
    admin.close().await.unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn count(conn: &Connection, queue: &str) -> Result<u32, AmqpError> {
    // A scratch channel: a passive declare of a missing queue closes it.
    let channel = conn.open_channel().await?;
    let n = queue_message_count(&channel, queue).await;
    if channel.is_connected() {
        let _ = channel.close().await;
    }
    n
}

async fn counts(conn: &Connection, topology: &Topology) -> Vec<u32> {
    let mut out = Vec::new();
    for queue in topology.router_queues() {
        out.push(count(conn, &queue).await.expect("partition queue exists"));
    }
    out
}

async fn next(stream: &mut concord_amqp::Consumer, what: &str) -> Delivery {
    within(what, stream.next())
        .await
        .unwrap_or_else(|| panic!("stream ended: {what}"))
        .unwrap_or_else(|e| panic!("stream error ({what}): {e}"))
}

/// Publishes `body` to the ingress exchange like an adapter, with `key` as the partition
/// header if given; returns once the broker confirmed (the message is enqueued).
async fn publish(publisher: &Publisher, topology: &Topology, key: Option<&str>, body: &str) {
    let mut props = MessageProps::new();
    if let Some(key) = key {
        props = props.header(PARTITION_HASH_HEADER, key);
    }
    publisher
        .publish_confirmed(
            &topology.ingress_exchange(),
            "crm.customer",
            body.as_bytes(),
            props,
        )
        .await
        .expect("publish");
}

#[tokio::test]
async fn keys_spread_over_partitions_and_each_key_sticks_to_one() {
    const PARTITIONS: u16 = 4;
    const KEYS: usize = 64;
    const ROUNDS: usize = 3;
    with_partitions(
        "spread",
        Topology::default().with_partitions(PARTITIONS),
        |topology, conn| async move {
            assert_eq!(topology.router_queues().len(), usize::from(PARTITIONS));
            // Declaring again (as every replica does) is idempotent and keeps the mapping.
            let channel = conn.open_channel().await.unwrap();
            topology.declare_router(&channel, &[]).await.unwrap();
            // The single-queue topology is not declared alongside.
            assert_eq!(
                count(&conn, &topology.router_queue())
                    .await
                    .expect_err("no {ns}.router queue")
                    .reply_code(),
                Some(404)
            );

            let publisher = Publisher::open(&conn, PublisherOptions::default())
                .await
                .unwrap();
            for round in 0..ROUNDS {
                for k in 0..KEYS {
                    let key = format!("customer/k{k}");
                    publish(&publisher, &topology, Some(&key), &format!("k{k} r{round}")).await;
                }
            }
            let per_queue = counts(&conn, &topology).await;
            assert_eq!(
                per_queue.iter().sum::<u32>() as usize,
                KEYS * ROUNDS,
                "every message lands in exactly one partition: {per_queue:?}"
            );
            assert!(
                per_queue.iter().all(|n| *n > 0),
                "{KEYS} keys spread over every partition: {per_queue:?}"
            );

            // Drain every partition: each key is in one partition only, in publish order.
            let mut partition_of: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
            let mut rounds_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (p, queue) in topology.router_queues().iter().enumerate() {
                let channel = conn.open_channel().await.unwrap();
                let mut consumer = consume(&channel, queue, &format!("drain-{p}"), 500)
                    .await
                    .unwrap();
                let mut batcher = AckBatcher::new(1000);
                for _ in 0..per_queue[p] {
                    let d = next(&mut consumer, queue).await;
                    let body = String::from_utf8(d.body.clone()).unwrap();
                    let (key, round) = body.split_once(' ').unwrap();
                    assert_eq!(
                        d.header_str(PARTITION_HASH_HEADER),
                        Some(format!("customer/{key}").as_str())
                    );
                    partition_of.entry(key.to_owned()).or_default().insert(p);
                    rounds_of
                        .entry(key.to_owned())
                        .or_default()
                        .push(round.to_owned());
                    batcher.ack(&d).await.unwrap();
                }
                batcher.flush().await.unwrap();
            }
            assert_eq!(partition_of.len(), KEYS);
            for (key, partitions) in &partition_of {
                assert_eq!(partitions.len(), 1, "{key} landed in {partitions:?}");
                let want: Vec<String> = (0..ROUNDS).map(|r| format!("r{r}")).collect();
                assert_eq!(rounds_of[key], want, "{key} out of order");
            }

            // A message without the header is not dropped: all of them go to one partition.
            for i in 0..5 {
                publish(&publisher, &topology, None, &format!("headerless {i}")).await;
            }
            let per_queue = counts(&conn, &topology).await;
            let mut sorted = per_queue.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                [0, 0, 0, 5],
                "header-less messages share one partition: {per_queue:?}"
            );

            // delete_all removes the partition queues and the partition exchange.
            let admin = conn.open_channel().await.unwrap();
            topology.delete_all(&admin, &[]).await.unwrap();
            for queue in topology.router_queues() {
                assert_eq!(
                    count(&conn, &queue).await.unwrap_err().reply_code(),
                    Some(404),
                    "{queue} deleted"
                );
            }
        },
    )
    .await;
}

/// Of two consumers of a partition queue only the first gets messages; when its channel
/// closes, the second takes over, starting with the unacknowledged messages, in order.
async fn single_active_consumer_takes_over(queue_type: QueueType) {
    with_partitions(
        match queue_type {
            QueueType::Classic => "sac-classic",
            QueueType::Quorum => "sac-quorum",
        },
        Topology::default()
            .with_partitions(2)
            .with_queue_type(queue_type),
        |topology, conn| async move {
            let queue = topology.partition_queue(1);
            let first_channel = conn.open_channel().await.unwrap();
            let mut first = consume(&first_channel, &queue, "first", 1).await.unwrap();
            let second_channel = conn.open_channel().await.unwrap();
            let mut second = consume(&second_channel, &queue, "second", 1).await.unwrap();

            // Straight to the partition queue (default exchange), in a known order.
            let publisher = Publisher::open(&conn, PublisherOptions::default())
                .await
                .unwrap();
            for i in 0..6 {
                publisher
                    .publish_confirmed("", &queue, format!("m{i}").as_bytes(), MessageProps::new())
                    .await
                    .unwrap();
            }
            // With prefetch 1 and two plain consumers the broker would alternate; here the
            // first consumer gets m0, m1, m2 (m2 left unacknowledged).
            let mut batcher = AckBatcher::new(1);
            for i in 0..3 {
                let d = next(&mut first, "first consumer").await;
                assert_eq!(d.body, format!("m{i}").as_bytes());
                if i < 2 {
                    batcher.ack(&d).await.unwrap();
                }
            }
            assert!(
                second.next().now_or_never().is_none(),
                "the standby consumer got nothing"
            );
            // The active consumer goes away: the standby takes over at m2.
            first_channel.close().await.unwrap();
            let mut batcher = AckBatcher::new(1);
            for i in 2..6 {
                let d = next(&mut second, "second consumer").await;
                assert_eq!(d.body, format!("m{i}").as_bytes());
                assert_eq!(d.redelivered, i == 2, "m{i}");
                batcher.ack(&d).await.unwrap();
            }
            assert_eq!(count(&conn, &queue).await.unwrap(), 0);
        },
    )
    .await;
}

#[tokio::test]
async fn classic_partitions_have_a_single_active_consumer() {
    single_active_consumer_takes_over(QueueType::Classic).await;
}

#[tokio::test]
async fn quorum_partitions_have_a_single_active_consumer() {
    single_active_consumer_takes_over(QueueType::Quorum).await;
}
