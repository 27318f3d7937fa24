//! Integration tests against the real broker (`AMQP_URI`, default the local RabbitMQ).
//! Every test works in its own namespace and deletes what it declared.
//! Timeouts are safety nets only; nothing sleeps to synchronise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use common::*;
use concord_amqp::{
    AckBatcher, AmqpError, ConnectOptions, Connection, Delivery, MessageProps, PublishError,
    Publisher, PublisherOptions, QueueType, Topology, connect_with, connection_name, consume,
    queue_message_count,
};
use futures::{FutureExt, StreamExt, future::join_all};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

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
    let topology = topology(unique_ns(test));
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

async fn next_delivery(stream: &mut concord_amqp::Consumer, what: &str) -> Delivery {
    within(what, stream.next())
        .await
        .unwrap_or_else(|| panic!("stream ended: {what}"))
        .unwrap_or_else(|e| panic!("stream error ({what}): {e}"))
}

async fn count(connection: &Connection, queue: &str) -> u32 {
    // A scratch channel: a passive declare of a missing queue would close it.
    let channel = connection.open_channel().await.expect("channel");
    let n = queue_message_count(&channel, queue)
        .await
        .expect("passive declare");
    channel.close().await.expect("close");
    n
}

/// Declares `queue` without Concord's arguments, below the API (on a raw lapin channel).
async fn declare_with_plain_args(
    channel: &lapin::Channel,
    queue: &str,
) -> Result<(), lapin::Error> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .map(|_| ())
}

// ---------------------------------------------------------------------------------------

async fn topology_roundtrip(queue_type: QueueType) {
    let name = match queue_type {
        QueueType::Classic => "topo-classic",
        QueueType::Quorum => "topo-quorum",
    };
    with_namespace(
        name,
        |ns| {
            Topology::new(ns)
                .with_queue_type(queue_type)
                .with_delivery_limit(2)
        },
        &["crm", "erp"],
        |topology, systems| async move {
            let conn = connect_test("test-topology").await;
            let router_side = conn.open_channel().await.unwrap();
            let adapter_side = conn.open_channel().await.unwrap();

            // Idempotent, from both sides, in any order.
            topology.declare_inbox(&adapter_side, "crm").await.unwrap();
            topology
                .declare_router(&router_side, &systems)
                .await
                .unwrap();
            topology
                .declare_router(&router_side, &systems)
                .await
                .unwrap();
            topology.declare_inbox(&adapter_side, "crm").await.unwrap();
            topology.declare_inbox(&adapter_side, "erp").await.unwrap();

            for queue in [
                topology.router_queue(),
                topology.router_dlq(),
                topology.inbox("crm"),
                topology.dlq("crm"),
                topology.inbox("erp"),
                topology.dlq("erp"),
            ] {
                assert_eq!(count(&conn, &queue).await, 0, "{queue}");
            }

            // The arguments really are on the queues: a declaration without them is
            // refused as inequivalent.
            let raw = raw_connect("test-topology-raw").await;
            let scratch = raw.create_channel().await.unwrap();
            let refused = declare_with_plain_args(&scratch, &topology.inbox("crm"))
                .await
                .expect_err("inequivalent declaration must fail");
            assert_eq!(AmqpError::from(refused).reply_code(), Some(406));
            raw.close(200, "OK".into()).await.unwrap();

            let publisher = Publisher::open(&conn, PublisherOptions::default())
                .await
                .unwrap();

            // Router queue: a rejected message lands in dlq("router").
            publisher
                .publish_confirmed(
                    &topology.ingress_exchange(),
                    "crm.customer",
                    b"to-router",
                    MessageProps::new(),
                )
                .await
                .unwrap();
            let work = conn.open_channel().await.unwrap();
            let mut router = consume(&work, &topology.router_queue(), "router", 10)
                .await
                .unwrap();
            let d = next_delivery(&mut router, "router delivery").await;
            assert_eq!(d.body, b"to-router");
            assert_eq!(d.routing_key, "crm.customer");
            assert_eq!(d.exchange, topology.ingress_exchange());
            let mut batcher = AckBatcher::new(10);
            batcher.reject(&d, false).await.unwrap();

            let dlq_channel = conn.open_channel().await.unwrap();
            let mut dlq = consume(&dlq_channel, &topology.router_dlq(), "dlq-router", 10)
                .await
                .unwrap();
            let dead = next_delivery(&mut dlq, "router DLQ").await;
            assert_eq!(dead.body, b"to-router");
            assert_eq!(dead.header_str("x-first-death-reason"), Some("rejected"));
            assert_eq!(
                dead.header_str("x-first-death-queue"),
                Some(topology.router_queue().as_str())
            );
            let mut dlq_batcher = AckBatcher::new(1);
            dlq_batcher.ack(&dead).await.unwrap();

            // Inbox: dead-letters go to its own DLQ. Classic: reject. Quorum: exceed the
            // delivery limit by requeueing (broker-side dead-lettering).
            publisher
                .publish_confirmed(
                    &topology.routed_exchange(),
                    "crm",
                    b"to-crm",
                    MessageProps::new(),
                )
                .await
                .unwrap();
            let inbox_channel = conn.open_channel().await.unwrap();
            let mut inbox = consume(&inbox_channel, &topology.inbox("crm"), "crm", 10)
                .await
                .unwrap();
            let mut inbox_batcher = AckBatcher::new(10);
            let dlq_crm_channel = conn.open_channel().await.unwrap();
            let mut dlq_crm = consume(&dlq_crm_channel, &topology.dlq("crm"), "dlq-crm", 10)
                .await
                .unwrap();
            let expected_reason = match queue_type {
                QueueType::Classic => {
                    let d = next_delivery(&mut inbox, "crm inbox").await;
                    assert_eq!(d.body, b"to-crm");
                    inbox_batcher.reject(&d, false).await.unwrap();
                    "rejected"
                }
                QueueType::Quorum => {
                    // Keep requeueing until the broker dead-letters it (limit 2).
                    let requeue_loop = async {
                        let mut deliveries = 0;
                        while let Some(Ok(d)) = inbox.next().await {
                            deliveries += 1;
                            inbox_batcher.nack(&d, true).await.unwrap();
                        }
                        deliveries
                    };
                    let dead = tokio::select! {
                        dead = next_delivery(&mut dlq_crm, "crm DLQ (delivery limit)") => dead,
                        n = requeue_loop => panic!("inbox ended after {n} deliveries"),
                    };
                    assert_eq!(dead.body, b"to-crm");
                    assert_eq!(
                        dead.header_str("x-first-death-reason"),
                        Some("delivery_limit")
                    );
                    dlq_batcher = AckBatcher::new(1);
                    dlq_batcher.ack(&dead).await.unwrap();
                    "delivery_limit"
                }
            };
            if queue_type == QueueType::Classic {
                let dead = next_delivery(&mut dlq_crm, "crm DLQ").await;
                assert_eq!(dead.body, b"to-crm");
                assert_eq!(
                    dead.header_str("x-first-death-reason"),
                    Some(expected_reason)
                );
                assert_eq!(
                    dead.header_str("x-first-death-queue"),
                    Some(topology.inbox("crm").as_str())
                );
                let mut b = AckBatcher::new(1);
                b.ack(&dead).await.unwrap();
            }
            // erp's DLQ stayed empty: dead-letters are keyed per queue.
            assert_eq!(count(&conn, &topology.dlq("erp")).await, 0);
            conn.close().await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_topology_is_idempotent_and_dead_letters_per_queue() {
    topology_roundtrip(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_topology_is_idempotent_and_dead_letters_per_queue() {
    topology_roundtrip(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publish_then_batched_consume() {
    const N: usize = 2_000;
    with_namespace("pipeline", Topology::new, &[], |topology, systems| async move {
        let publish_conn = connect_test("test-publisher").await;
        let consume_conn = connect_test("test-consumer").await;
        let setup = consume_conn.open_channel().await.unwrap();
        topology.declare_router(&setup, &systems).await.unwrap();

        let publisher = Publisher::open(&publish_conn, PublisherOptions::default()).await.unwrap();
        let started = Instant::now();
        let mut pending = Vec::with_capacity(N);
        for i in 0..N {
            let props = MessageProps::new()
                .header("concord-origin", "crm")
                .message_id(format!("m-{i}"))
                .timestamp_now();
            let body = format!("payload-{i}");
            pending.push(
                publisher
                    .publish(&topology.ingress_exchange(), "crm.customer", body.as_bytes(), props)
                    .await
                    .unwrap(),
            );
            assert!(publisher.in_flight() <= publisher.window());
        }
        let results = within("confirms", join_all(pending)).await;
        let confirmed = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(confirmed, N, "{:?}", results.iter().find(|r| r.is_err()));
        let publish_time = started.elapsed();
        // The window slot of the last confirm is released right after its future resolves.
        within("idle", publisher.wait_idle()).await.unwrap();
        assert_eq!(publisher.in_flight(), 0);
        assert_eq!(count(&consume_conn, &topology.router_queue()).await, N as u32);

        let started = Instant::now();
        let channel = consume_conn.open_channel().await.unwrap();
        let mut stream = consume(&channel, &topology.router_queue(), "router", 200).await.unwrap();
        let mut batcher = AckBatcher::new(50);
        for i in 0..N {
            let d = next_delivery(&mut stream, "router delivery").await;
            assert_eq!(d.body, format!("payload-{i}").as_bytes());
            assert_eq!(d.message_id(), Some(format!("m-{i}").as_str()));
            assert_eq!(d.header_str("concord-origin"), Some("crm"));
            assert_eq!(d.content_type(), Some(concord_amqp::CONTENT_TYPE));
            assert!(d.timestamp().is_some());
            assert!(!d.redelivered);
            batcher.ack(&d).await.unwrap();
        }
        batcher.flush().await.unwrap();
        assert_eq!(batcher.stale(), 0);
        let consume_time = started.elapsed();
        stream.cancel().await.unwrap();
        assert!(within("stream end", stream.next()).await.is_none());
        channel.close().await.unwrap();
        // Anything left unacked would be back in the queue now.
        assert_eq!(count(&consume_conn, &topology.router_queue()).await, 0);
        eprintln!(
            "{N} messages: publish+confirm {publish_time:?} ({:.0} msg/s), consume+ack {consume_time:?} ({:.0} msg/s)",
            N as f64 / publish_time.as_secs_f64(),
            N as f64 / consume_time.as_secs_f64()
        );
        publisher.close().await.unwrap();
        publish_conn.close().await.unwrap();
        consume_conn.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_returned_not_delivered() {
    with_namespace(
        "returned",
        Topology::new,
        &["crm"],
        |topology, systems| async move {
            let conn = connect_test("test-returned").await;
            let setup = conn.open_channel().await.unwrap();
            topology.declare_router(&setup, &systems).await.unwrap();
            let publisher = Publisher::open(&conn, PublisherOptions::default())
                .await
                .unwrap();

            let outcome = publisher
                .publish_confirmed(
                    &topology.routed_exchange(),
                    "nobody-home",
                    b"lost?",
                    MessageProps::new(),
                )
                .await;
            match outcome {
                Err(PublishError::Returned {
                    reply_code,
                    reply_text,
                }) => {
                    assert_eq!(reply_code, 312);
                    assert_eq!(reply_text, "NO_ROUTE");
                }
                other => panic!("expected Returned, got {other:?}"),
            }
            publisher
                .publish_confirmed(
                    &topology.routed_exchange(),
                    "crm",
                    b"ok",
                    MessageProps::new(),
                )
                .await
                .unwrap();
            assert_eq!(count(&conn, &topology.inbox("crm")).await, 1);
            conn.close().await.unwrap();
        },
    )
    .await;
}

/// lapin attaches a returned message to whichever confirm it resolves next; under
/// pipelining that is often another message's. The publisher must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_mix_of_routable_and_unroutable_is_attributed_exactly() {
    const TASKS: usize = 3;
    const PER_TASK: usize = 1_500;
    with_namespace(
        "mixed",
        Topology::new,
        &["crm"],
        |topology, systems| async move {
            let conn = connect_test("test-mixed").await;
            let setup = conn.open_channel().await.unwrap();
            topology.declare_router(&setup, &systems).await.unwrap();
            let publisher = Publisher::open(&conn, PublisherOptions { window: 256 })
                .await
                .unwrap();

            let tasks = (0..TASKS).map(|task| {
                let publisher = publisher.clone();
                let exchange = topology.routed_exchange();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    for i in 0..PER_TASK {
                        let unroutable = (i + task) % 3 == 0;
                        let key = if unroutable { "ghost" } else { "crm" };
                        let confirm = publisher
                            .publish(
                                &exchange,
                                key,
                                format!("{task}-{i}").as_bytes(),
                                MessageProps::new(),
                            )
                            .await
                            .unwrap();
                        pending.push((unroutable, confirm));
                    }
                    let mut wrong = 0;
                    let mut routed = 0u32;
                    for (unroutable, confirm) in pending {
                        match (unroutable, confirm.await) {
                            (false, Ok(())) => routed += 1,
                            (true, Err(PublishError::Returned { .. })) => {}
                            (_, other) => {
                                wrong += 1;
                                eprintln!("unroutable={unroutable} got {other:?}");
                            }
                        }
                    }
                    (wrong, routed)
                })
            });
            let results = within("mixed publishes", join_all(tasks)).await;
            let mut routed_total = 0;
            for result in results {
                let (wrong, routed) = result.unwrap();
                assert_eq!(wrong, 0, "misattributed confirms");
                routed_total += routed;
            }
            assert_eq!(count(&conn, &topology.inbox("crm")).await, routed_total);
            conn.close().await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_deliveries_are_redelivered_after_channel_close() {
    const N: usize = 10;
    with_namespace(
        "redeliver",
        Topology::new,
        &["crm"],
        |topology, _systems| async move {
            let conn = connect_test("test-redeliver").await;
            let setup = conn.open_channel().await.unwrap();
            topology.declare_inbox(&setup, "crm").await.unwrap();
            let publisher = Publisher::open(&conn, PublisherOptions::default())
                .await
                .unwrap();
            for i in 0..N {
                publisher
                    .publish_confirmed(
                        &topology.routed_exchange(),
                        "crm",
                        format!("{i}").as_bytes(),
                        MessageProps::new(),
                    )
                    .await
                    .unwrap();
            }

            let first_channel = conn.open_channel().await.unwrap();
            let mut first = consume(&first_channel, &topology.inbox("crm"), "first", 50)
                .await
                .unwrap();
            let mut unacked = Vec::new();
            for _ in 0..N {
                let d = next_delivery(&mut first, "first consumer").await;
                assert!(!d.redelivered);
                unacked.push(d);
            }
            first_channel.close().await.unwrap();
            // The closed consumer's stream ends; it was closed by us, on purpose, but the
            // consumer itself was not cancelled by us, so it reports the cancellation.
            match within("first stream end", first.next()).await {
                Some(Err(AmqpError::ConsumerCancelled { .. })) | None => {}
                other => panic!("unexpected {other:?}"),
            }

            // Stale acks on the dead channel: logged and counted, never a panic, nothing acked.
            let mut stale = AckBatcher::new(100);
            for d in &unacked {
                stale.ack(d).await.unwrap();
            }
            stale.flush().await.unwrap();
            assert_eq!(stale.stale(), N as u64);

            let second_channel = conn.open_channel().await.unwrap();
            let mut second = consume(&second_channel, &topology.inbox("crm"), "second", 50)
                .await
                .unwrap();
            let mut batcher = AckBatcher::new(4);
            let mut bodies = Vec::new();
            for _ in 0..N {
                let d = next_delivery(&mut second, "second consumer").await;
                assert!(d.redelivered, "redelivery must be flagged");
                bodies.push(String::from_utf8(d.body.clone()).unwrap());
                batcher.ack(&d).await.unwrap();
            }
            batcher.flush().await.unwrap();
            bodies.sort_by_key(|b| b.parse::<u32>().unwrap());
            assert_eq!(bodies, (0..N).map(|i| i.to_string()).collect::<Vec<_>>());
            second.cancel().await.unwrap();
            second_channel.close().await.unwrap();
            assert_eq!(count(&conn, &topology.inbox("crm")).await, 0);
            conn.close().await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_fails_consumers_and_publishers() {
    with_namespace(
        "close",
        Topology::new,
        &["crm"],
        |topology, _systems| async move {
            let conn = connect_test("test-close").await;
            let setup = conn.open_channel().await.unwrap();
            topology.declare_inbox(&setup, "crm").await.unwrap();
            let blocked = conn.watch_blocked().unwrap();
            assert!(blocked.borrow().is_none());

            let consumer_channel = conn.open_channel().await.unwrap();
            let mut stream = consume(&consumer_channel, &topology.inbox("crm"), "crm", 10)
                .await
                .unwrap();
            let waiting = tokio::spawn(async move {
                let first = stream.next().await;
                let after = stream.next().await;
                (first, after)
            });

            let publisher = Publisher::open(&conn, PublisherOptions::default())
                .await
                .unwrap();
            // Some confirms are still pending when the connection goes away.
            let mut pending = Vec::new();
            for i in 0..200 {
                pending.push(
                    publisher
                        .publish(
                            &topology.routed_exchange(),
                            "ghost",
                            format!("{i}").as_bytes(),
                            MessageProps::new(),
                        )
                        .await
                        .unwrap(),
                );
            }
            conn.close().await.unwrap();
            assert!(!conn.is_connected());

            // Every pending confirm resolves (none hangs), and none counts as delivered:
            // they were unroutable, or the connection is gone.
            for outcome in within("pending confirms", join_all(pending)).await {
                assert!(outcome.is_err(), "{outcome:?}");
            }
            let err = within(
                "publish after close",
                publisher.publish(
                    &topology.routed_exchange(),
                    "crm",
                    b"x",
                    MessageProps::new(),
                ),
            )
            .await
            .expect_err("publish on a closed connection must fail");
            eprintln!("publish after close: {err}");
            let confirmed = within(
                "publish_confirmed after close",
                publisher.publish_confirmed(
                    &topology.routed_exchange(),
                    "crm",
                    b"x",
                    MessageProps::new(),
                ),
            )
            .await;
            assert!(
                matches!(confirmed, Err(PublishError::Connection(_))),
                "{confirmed:?}"
            );

            let (first, after) = within("consumer stream after close", waiting)
                .await
                .unwrap();
            match first {
                Some(Err(e)) => eprintln!("consumer stream after close: {e}"),
                other => panic!("expected an error from the consumer stream, got {other:?}"),
            }
            assert!(after.is_none(), "stream must end after the error");
            assert!(conn.open_channel().await.is_err());
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_raw_lapin_channel_is_still_possible_for_tests() {
    // The integration tests may use lapin directly, on connections of their own (the crate
    // hands out no lapin type).
    let conn = raw_connect("test-raw").await;
    let channel = conn.create_channel().await.unwrap();
    let confirm = channel
        .basic_publish(
            "".into(),
            "amq.no-such-queue".into(),
            BasicPublishOptions::default(),
            b"x",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::NotRequested);
    conn.close(200, "OK".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_retries_are_bounded() {
    let options = ConnectOptions {
        max_attempts: 3,
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(20),
        ..ConnectOptions::default()
    };
    let started = Instant::now();
    let err = within(
        "bounded connect",
        connect_with(
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "test-refused",
            &options,
        ),
    )
    .await
    .expect_err("nothing listens on port 1");
    match &err {
        AmqpError::Connect {
            attempts, endpoint, ..
        } => {
            assert_eq!(*attempts, 3);
            assert_eq!(endpoint, "127.0.0.1:1//");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    // Bad credentials are not retried.
    let err = within(
        "bad credentials",
        connect_with(
            "amqp://guest:wrong@127.0.0.1:5672/%2f",
            "test-badauth",
            &options,
        ),
    )
    .await
    .expect_err("wrong password");
    eprintln!("bad credentials: {err:?}");
    assert!(
        matches!(err, AmqpError::Connect { attempts: 1, .. }),
        "{err:?}"
    );

    assert!(matches!(
        connect_with("not a uri", "x", &options).await,
        Err(AmqpError::InvalidUri(_))
    ));
}

/// `uri` with its host and port replaced by `127.0.0.1:{port}` (same user and vhost).
fn on_port(uri: &str, port: u16) -> String {
    let (scheme, rest) = uri.split_once("://").expect("scheme");
    let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    let user = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    format!("{scheme}://{user}127.0.0.1:{port}{path}")
}

/// A local port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A URI setting may list the nodes of a cluster: one attempt goes down the list to the first
/// node that accepts, so nodes that are down cost no retry; with none up, the error names
/// every node (never the credentials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_uris_connects_to_the_first_node_that_is_up() {
    let live = uri();
    let dead = [closed_port(), closed_port()].map(|p| on_port(&live, p));
    let once = ConnectOptions {
        max_attempts: 1,
        ..ConnectOptions::default()
    };
    let list = format!("{},{},{live}", dead[0], dead[1]);
    let conn = within(
        "connect to a list",
        connect_with(&list, &connection_name("test-list"), &once),
    )
    .await
    .expect("the third node is up");
    assert!(conn.is_connected());
    conn.close().await.expect("close");

    let err = within(
        "connect to dead nodes",
        connect_with(&dead.join(","), &connection_name("test-list-dead"), &once),
    )
    .await
    .expect_err("no node is up");
    match &err {
        AmqpError::Connect {
            endpoint, attempts, ..
        } => {
            assert_eq!(*attempts, 1);
            assert_eq!(endpoint.matches("127.0.0.1:").count(), 2, "{endpoint}");
            assert!(!endpoint.contains("guest:"), "{endpoint}");
        }
        other => panic!("unexpected error {other:?}"),
    }
}
