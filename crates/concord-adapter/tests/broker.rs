//! The runner against the real broker (the local RabbitMQ, see `concord_admin::scratch::Broker`).
//! Each test runs in its own vhost with the users of a real deployment: the runner as its
//! system's user, the test as the router (publishing to inboxes) and as the operator (declaring,
//! deleting, reading any queue). The vhost is deleted at the end.
// Test helpers outside `#[test]` functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use concord_adapter::testkit::{MemorySystem, text};
use concord_adapter::{AdapterError, RunnerConfig, RunnerHandle};
use concord_admin::scratch::{Broker, ScratchVhost};
use concord_amqp::{
    Channel, Connection, Consumer, Delivery, MessageProps, Publisher, PublisherOptions, Topology,
};
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use futures::{FutureExt, StreamExt};
use prost::Message;
use prost_reflect::{DynamicMessage, Value};

const LIMIT: Duration = Duration::from_secs(20);

fn namespace() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "it-adapter-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A namespace with the router side declared (so the ingress is bound), removed at the end
/// even if the test fails.
struct Ns {
    topo: Topology,
    systems: Vec<String>,
    /// The operator's connection and a channel on it.
    conn: Connection,
    ch: Channel,
    /// The router's connection (what it publishes, the runner trusts).
    router: Connection,
    dir: tempfile::TempDir,
    vhost: ScratchVhost,
}

impl Ns {
    async fn new(systems: &[&str]) -> Ns {
        let topo = Topology::new(namespace());
        let vhost = ScratchVhost::create(Broker::from_env(), topo.namespace(), systems).unwrap();
        let conn = concord_amqp::connect(&vhost.operator_uri(), "concord-adapter-tests")
            .await
            .unwrap();
        let router = concord_amqp::connect(&vhost.router_uri(), "concord-adapter-tests-router")
            .await
            .unwrap();
        let ch = conn.open_channel().await.unwrap();
        let systems: Vec<String> = systems.iter().map(|s| (*s).to_owned()).collect();
        topo.declare_router(&ch, &systems).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The seed deployment, with every system of the test in it.
        let mut policy = concord_seed_model::POLICY.to_owned();
        for s in &systems {
            if !policy.contains(&format!("[systems.{s}]")) {
                policy.push_str(&format!("\n[systems.{s}]\n"));
            }
        }
        concord_seed_model::write_deployment(dir.path(), &policy).unwrap();
        Ns {
            topo,
            systems,
            conn,
            ch,
            router,
            dir,
            vhost,
        }
    }

    fn config(&self, system: &str) -> RunnerConfig {
        let mut c = RunnerConfig::new(
            system,
            self.vhost.system_uri(system),
            self.dir.path().join(format!("{system}.sqlite")),
            self.dir.path().join("policy.toml"),
        );
        c.namespace = self.topo.namespace().to_owned();
        c.router_user = self.vhost.router_user().to_owned();
        c.prefetch = 16;
        c.retry.min_delay_ms = 10;
        c.retry.max_delay_ms = 50;
        c.reconnect.min_delay_ms = 10;
        c.reconnect.max_delay_ms = 200;
        c
    }

    async fn consume(&self, queue: &str) -> Consumer {
        let ch = self.conn.open_channel().await.unwrap();
        concord_amqp::consume(&ch, queue, &format!("test-{}", uuid::Uuid::now_v7()), 16)
            .await
            .unwrap()
    }

    /// Publishes to `system`'s inbox as the router does.
    async fn publish_to_inbox(&self, system: &str, body: &[u8]) {
        let p = Publisher::open(&self.router, PublisherOptions::default())
            .await
            .unwrap();
        p.publish_confirmed(
            &self.topo.routed_exchange(),
            system,
            body,
            MessageProps::new().user_id(self.vhost.router_user()),
        )
        .await
        .unwrap();
    }

    /// Runs `test`, then deletes the vhost whatever happened.
    async fn run(self, test: impl AsyncFnOnce(&Ns)) {
        let outcome = AssertUnwindSafe(test(&self)).catch_unwind().await;
        let _ = self.conn.close().await;
        let _ = self.router.close().await;
        drop(self.vhost);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(LIMIT, consumer.next())
        .await
        .expect("timed out waiting for a message")
        .expect("consumer ended")
        .expect("consumer failed")
}

async fn ready(handle: &mut RunnerHandle) {
    tokio::time::timeout(LIMIT, handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
}

async fn until(
    handle: &RunnerHandle,
    what: &str,
    done: impl Fn(&concord_adapter::MetricsSnapshot) -> bool,
) {
    if tokio::time::timeout(LIMIT, handle.wait_until(done))
        .await
        .is_err()
    {
        panic!("timed out waiting for {what}: {:?}", handle.metrics());
    }
}

/// A routed copy of an `orders` change of the customer's name, as the router sends it (orders
/// may create customers, so the copy may create the record).
fn routed_name_change(key: &str, name: &str) -> ChangeEvent {
    let desc = prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET)
        .unwrap()
        .get_message_by_name(concord_seed_model::CUSTOMER)
        .unwrap();
    let mut rec = DynamicMessage::new(desc);
    rec.set_field_by_name("name", Value::String(name.into()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        entity: "customer".into(),
        key: key.into(),
        op: Op::Upsert as i32,
        record: rec.encode_to_vec(),
        field_mask: vec!["name".into()],
        clocks: [(
            "name".to_owned(),
            FieldClock {
                hlc: concord_policy::clock::from_ms(now),
                system: "orders".into(),
                rank: 0,
            },
        )]
        .into(),
        schema_version: concord_proto::SCHEMA_VERSION,
        origin: "orders".into(),
        observed_at_ms: now,
        may_create: true,
        ..ChangeEvent::default()
    }
}

#[tokio::test]
async fn a_local_change_is_published_to_the_ingress_with_headers() {
    Ns::new(&["orders"])
        .await
        .run(async |ns| {
            let mut router_queue = ns.consume(&ns.topo.router_queue()).await;
            let system = MemorySystem::new("orders");
            let mut handle = concord_adapter::start(system.clone(), ns.config("orders"));
            ready(&mut handle).await;
            system.edit(
                "customer",
                "g-1",
                [("name", text("Ada")), ("tier", text("gold"))],
            );

            let d = next(&mut router_queue).await;
            assert_eq!(d.exchange, ns.topo.ingress_exchange());
            assert_eq!(d.routing_key, "orders.customer");
            let ev = ChangeEvent::decode(d.body.as_slice()).unwrap();
            assert_eq!(ev.source, "orders");
            assert_eq!(ev.op, Op::Create as i32);
            assert_eq!(ev.schema_version, 1);
            assert_eq!(ev.field_mask, ["name", "tier"]);
            assert_eq!(ev.clocks["name"].system, "orders");
            assert_eq!(d.message_id(), Some(ev.event_id.as_str()));
            assert_eq!(
                d.header_str("concord-key"),
                Some(format!("customer/{}", ev.key).as_str())
            );
            // Published as its broker user (the broker checks it; the router takes it as the
            // source).
            let user = ns.vhost.system_user("orders");
            assert_eq!(d.user_id(), Some(user.as_str()));
            assert_eq!(*d.properties().delivery_mode(), Some(2));
            until(&handle, "the publish to be recorded", |m| m.published == 1).await;
            handle.shutdown().await.unwrap();

            // The cursor was persisted after the confirm: a restart publishes nothing again,
            // and the same record keeps its key.
            let mut handle = concord_adapter::start(system.clone(), ns.config("orders"));
            ready(&mut handle).await;
            system.edit("customer", "g-1", [("tier", text("silver"))]);
            let d = next(&mut router_queue).await;
            let again = ChangeEvent::decode(d.body.as_slice()).unwrap();
            assert_eq!(again.key, ev.key);
            assert_eq!(again.field_mask, ["tier"]);
            assert_eq!(again.op, Op::Upsert as i32);
            assert_eq!(d.user_id(), Some(user.as_str()));
            handle.shutdown().await.unwrap();
        })
        .await;
}

#[tokio::test]
async fn an_inbox_event_delivered_twice_is_applied_once() {
    Ns::new(&["support"])
        .await
        .run(async |ns| {
            let system = MemorySystem::new("support");
            let mut handle = concord_adapter::start(system.clone(), ns.config("support"));
            ready(&mut handle).await;
            let ev = routed_name_change("c-42", "Grace Hopper");
            let body = ev.encode_to_vec();
            ns.publish_to_inbox("support", &body).await;
            ns.publish_to_inbox("support", &body).await;
            until(&handle, "both deliveries", |m| {
                m.incoming_applied + m.incoming_duplicate == 2
            })
            .await;
            let m = handle.metrics();
            assert_eq!((m.incoming_applied, m.incoming_duplicate), (1, 1));
            assert_eq!(system.applied().len(), 1);
            let id = system.find("customer", "name", "Grace Hopper").unwrap();
            assert_eq!(system.applied()[0].key, "c-42");
            assert_eq!(system.applied()[0].origin, "orders");
            // The echo of the apply is not published back.
            until(&handle, "the echo", |m| m.local_echoes >= 1).await;
            assert_eq!(handle.metrics().published, 0);
            handle.shutdown().await.unwrap();
            // Everything was acknowledged.
            let count = concord_amqp::queue_message_count(&ns.ch, &ns.topo.inbox("support"))
                .await
                .unwrap();
            assert_eq!(count, 0);

            // After a restart, a redelivery is still recognised.
            let mut handle = concord_adapter::start(system.clone(), ns.config("support"));
            ready(&mut handle).await;
            ns.publish_to_inbox("support", &body).await;
            until(&handle, "the redelivery", |m| m.incoming_duplicate == 1).await;
            assert_eq!(handle.metrics().incoming, 1);
            assert_eq!(system.applied().len(), 1);
            assert_eq!(
                system.field("customer", &id, "name"),
                Some(Value::String("Grace Hopper".into()))
            );
            handle.shutdown().await.unwrap();
        })
        .await;
}

#[tokio::test]
async fn a_field_the_adapters_schema_does_not_know_is_skipped_and_the_rest_applied() {
    Ns::new(&["support"])
        .await
        .run(async |ns| {
            let system = MemorySystem::new("support");
            let mut handle = concord_adapter::start(system.clone(), ns.config("support"));
            ready(&mut handle).await;
            // A copy routed with a newer schema: field 13 (`loyalty_id`, a string) is unknown to
            // this adapter's schema.
            let mut ev = routed_name_change("c-7", "Ada");
            ev.record.extend_from_slice(&[13 << 3 | 2, 3]);
            ev.record.extend_from_slice(b"L-1");
            ev.field_mask.push("loyalty_id".into());
            let clock = ev.clocks["name"].clone();
            ev.clocks.insert("loyalty_id".into(), clock.clone());
            ns.publish_to_inbox("support", &ev.encode_to_vec()).await;
            until(&handle, "the newer copy", |m| m.incoming_applied == 1).await;
            let id = system.find("customer", "name", "Ada").unwrap();
            assert_eq!(system.field("customer", &id, "loyalty_id"), None);
            assert_eq!(system.applied().len(), 1);
            assert_eq!(
                system.applied()[0].fields.keys().collect::<Vec<_>>(),
                ["name"]
            );
            // A copy of only unknown fields changes nothing and is not dead-lettered either.
            let mut only_new = routed_name_change("c-7", "unused");
            only_new.record = vec![13 << 3 | 2, 3, b'L', b'-', b'2'];
            only_new.field_mask = vec!["loyalty_id".into()];
            only_new.clocks = [("loyalty_id".to_owned(), clock)].into();
            ns.publish_to_inbox("support", &only_new.encode_to_vec())
                .await;
            until(&handle, "the copy of unknown fields", |m| {
                m.incoming_stale == 1
            })
            .await;
            let m = handle.metrics();
            assert_eq!((m.dead_lettered, m.incoming_applied), (0, 1));
            handle.shutdown().await.unwrap();
        })
        .await;
}

#[tokio::test]
async fn a_permanent_apply_error_is_dead_lettered_with_its_reason() {
    Ns::new(&["support"])
        .await
        .run(async |ns| {
            let mut dlq = ns.consume(&ns.topo.dlq("support")).await;
            let system = MemorySystem::new("support");
            system.fail_next_applies([
                AdapterError::transient("db busy"),
                AdapterError::permanent("name too royal"),
            ]);
            let mut handle = concord_adapter::start(system.clone(), ns.config("support"));
            ready(&mut handle).await;
            let refused = routed_name_change("c-1", "Queen Victoria").encode_to_vec();
            let fine = routed_name_change("c-2", "Ada").encode_to_vec();
            ns.publish_to_inbox("support", &refused).await;
            ns.publish_to_inbox("support", &fine).await;

            let d = next(&mut dlq).await;
            assert_eq!(d.body, refused);
            assert_eq!(d.header_str("concord-reason"), Some("apply_failed"));
            assert!(
                d.header_str("concord-detail")
                    .unwrap()
                    .contains("name too royal")
            );
            assert_eq!(d.routing_key, "support");
            // The message behind it went through, after the retry and the dead-letter.
            until(&handle, "the second message", |m| m.incoming_applied == 1).await;
            let m = handle.metrics();
            assert_eq!((m.retries, m.dead_lettered), (1, 1));
            assert!(system.find("customer", "name", "Ada").is_some());
            assert!(system.find("customer", "name", "Queen Victoria").is_none());
            // Garbage goes the same way.
            ns.publish_to_inbox("support", b"not a change event").await;
            let d = next(&mut dlq).await;
            assert_eq!(d.header_str("concord-reason"), Some("undecodable"));
            handle.shutdown().await.unwrap();
        })
        .await;
}

#[tokio::test]
async fn the_runner_reconnects_after_losing_its_consumer_and_resumes_once_its_inbox_is_back() {
    Ns::new(&["support"])
        .await
        .run(async |ns| {
            let system = MemorySystem::new("support");
            let mut handle = concord_adapter::start(system.clone(), ns.config("support"));
            ready(&mut handle).await;
            // Deleting the inbox cancels the runner's consumer: it must reconnect (and wait for
            // its inbox, which only the router declares, to exist).
            let scratch = ns.conn.open_channel().await.unwrap();
            scratch
                .queue_delete(ns.topo.inbox("support").as_str().into(), Default::default())
                .await
                .unwrap();
            // The router declares it again; the cancelled runner reconnects to it.
            ns.topo.declare_router(&ns.ch, &ns.systems).await.unwrap();
            until(&handle, "the reconnection", |m| m.connections >= 2).await;
            ready(&mut handle).await;
            ns.publish_to_inbox(
                "support",
                &routed_name_change("c-9", "Alan").encode_to_vec(),
            )
            .await;
            until(&handle, "the apply", |m| m.incoming_applied == 1).await;
            assert!(system.find("customer", "name", "Alan").is_some());
            handle.shutdown().await.unwrap();
        })
        .await;
}

#[tokio::test]
async fn changes_published_while_nothing_routes_them_are_retried_not_lost() {
    Ns::new(&["orders"])
        .await
        .run(async |ns| {
            // No router queue: the ingress exchange routes nowhere and the broker returns
            // every publish.
            let scratch = ns.conn.open_channel().await.unwrap();
            scratch
                .queue_delete(ns.topo.router_queue().as_str().into(), Default::default())
                .await
                .unwrap();
            let system = MemorySystem::new("orders");
            let mut handle = concord_adapter::start(system.clone(), ns.config("orders"));
            ready(&mut handle).await;
            system.edit("customer", "o-1", [("name", text("Ada"))]);
            until(&handle, "a refused publish", |m| m.connections >= 2).await;
            assert_eq!(handle.metrics().published, 0);
            // The router comes up: the same change gets through, once it is routable.
            ns.topo.declare_router(&ns.ch, &ns.systems).await.unwrap();
            let mut router_queue = ns.consume(&ns.topo.router_queue()).await;
            let d = next(&mut router_queue).await;
            let ev = ChangeEvent::decode(d.body.as_slice()).unwrap();
            assert_eq!(ev.field_mask, ["name"]);
            until(&handle, "the publish", |m| m.published == 1).await;
            handle.shutdown().await.unwrap();
        })
        .await;
}
