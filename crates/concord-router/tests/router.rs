//! The router against the real broker (`CONCORD_AMQP_URI` / `AMQP_URI`, default the local
//! RabbitMQ). Every test works in its own namespace and deletes what it declared, even when it
//! fails. Timeouts are safety nets only: nothing sleeps to synchronise; conditions that have no
//! event to await (metrics, broker-side queue state) are polled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use concord_amqp::{
    AckBatcher, Consumer, Delivery, MessageProps, Topology, consume, queue_message_count,
};
use concord_policy::DeadLetterReason;
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use concord_router::{ReloadOutcome, ReloadResultLabel, RouterConfig, RouterHandle};
use concord_seed_model::seed::v1::Customer;
use futures::StreamExt;
use prost::Message;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn seed_policy() -> String {
    concord_seed_model::POLICY.to_owned()
}

/// The seed policy plus a `billing` system that sees what was paid.
fn policy_with_billing() -> String {
    seed_policy()
        .replace(
            "[entities.customer]",
            "[systems.billing]\ndescription = \"Invoicing\"\n\n[entities.customer]",
        )
        .replace(
            "amount_paid = { owner = \"orders\", visible = [\"support\"] }",
            "amount_paid = { owner = \"orders\", visible = [\"support\", \"billing\"] }",
        )
}

/// Writes `text` to `path` atomically (like an editor's rename-replace).
fn write_policy(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A change event of `source` for customer `key`, setting `fields` of `record`.
fn event(source: &str, key: &str, record: &Customer, fields: &[&str]) -> ChangeEvent {
    let hlc = now_ms() << 16;
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: source.into(),
        entity: "customer".into(),
        key: key.into(),
        op: Op::Upsert as i32,
        record: record.encode_to_vec(),
        field_mask: fields.iter().map(|f| (*f).to_owned()).collect(),
        clocks: fields
            .iter()
            .map(|f| {
                (
                    (*f).to_owned(),
                    FieldClock {
                        hlc,
                        system: source.into(),
                        rank: 0,
                    },
                )
            })
            .collect(),
        schema_version: concord_proto::SCHEMA_VERSION,
        observed_at_ms: now_ms(),
        ..ChangeEvent::default()
    }
}

fn delivery_status_event(key: &str) -> ChangeEvent {
    let record = Customer {
        delivery_status: Some("out_for_delivery".into()),
        warehouse: Some("W7".into()),
        ..Customer::default()
    };
    event("delivery", key, &record, &["delivery_status", "warehouse"])
}

fn payment_event(key: &str, cents: i64) -> ChangeEvent {
    let record = Customer {
        amount_paid: Some(cents),
        ..Customer::default()
    };
    event("orders", key, &record, &["amount_paid"])
}

/// One test's world: a namespace, a policy file, a client connection.
impl World {
    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    fn config(&self) -> RouterConfig {
        self.router.clone()
    }

    async fn start(&self, config: RouterConfig) -> RouterHandle {
        let router = concord_router::Router::start(config, self.policy_path())
            .await
            .unwrap();
        within("router ready", router.wait_ready()).await.unwrap();
        router
    }

    async fn publish(&self, ev: &ChangeEvent) {
        let rk = format!("{}.{}", ev.source, ev.entity);
        self.publish_raw(&rk, &ev.encode_to_vec()).await;
    }

    async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        within(
            "publish",
            self.publisher.publish_confirmed(
                &self.topology.ingress_exchange(),
                routing_key,
                body,
                MessageProps::new(),
            ),
        )
        .await
        .unwrap();
    }

    async fn consumer(&self, queue: &str) -> Consumer {
        let channel = self.client.open_channel().await.unwrap();
        consume(&channel, queue, &format!("it-{queue}"), 500)
            .await
            .unwrap()
    }

    /// A consumer of `queue` once it exists (someone else declares it).
    async fn consumer_when_declared(&self, queue: &str) -> Consumer {
        eventually("queue declared", async || self.count(queue).await.is_some()).await;
        self.consumer(queue).await
    }

    /// Ready messages of `queue`; `None` if it does not exist.
    async fn count(&self, queue: &str) -> Option<u32> {
        // A scratch channel: a passive declare of a missing queue closes it.
        let channel = self.client.open_channel().await.unwrap();
        let n = queue_message_count(&channel, queue).await.ok();
        if n.is_some() {
            let _ = channel.close().await;
        }
        n
    }
}

/// Runs `body` in a fresh namespace with the seed policy (the tests add `billing`), then
/// deletes the namespace even if `body` panicked.
async fn with_world<F, Fut>(test: &str, body: F)
where
    F: FnOnce(World) -> Fut,
    Fut: Future<Output = ()>,
{
    in_namespace(Topology::new(unique_ns(test)), &["billing"], body).await;
}

async fn next(consumer: &mut Consumer, what: &str) -> Delivery {
    within(what, consumer.next())
        .await
        .unwrap_or_else(|| panic!("stream ended: {what}"))
        .unwrap_or_else(|e| panic!("stream error ({what}): {e}"))
}

async fn ack(d: &Delivery) {
    AckBatcher::new(1).ack(d).await.unwrap();
}

fn decode(d: &Delivery) -> (ChangeEvent, Customer) {
    let ev = ChangeEvent::decode(d.body.as_slice()).unwrap();
    let record = Customer::decode(ev.record.as_slice()).unwrap();
    (ev, record)
}

/// Runs `rabbitmqctl -q ARGS...`, which must succeed.
async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

/// Messages of `queue` not acknowledged yet, from `rabbitmqctl` (the AMQP protocol only tells
/// the ready ones).
async fn unacked(vhost: &str, queue: &str) -> u64 {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .output()
        .await
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl list_queues failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(queue)).then(|| parts.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("queue {queue} not listed"))
}

/// Closes, from the broker side, every connection whose name contains `needle`; returns how
/// many were closed.
async fn close_connections(needle: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl list_connections failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<String> = text
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for pid in &pids {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                pid,
                "test: simulated connection loss",
            ])
            .output()
            .await
            .expect("rabbitmqctl");
        assert!(
            status.status.success(),
            "rabbitmqctl close_connection {pid} failed"
        );
    }
    pids.len()
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("http response", stream.read_to_end(&mut response))
        .await
        .unwrap();
    let text = String::from_utf8(response).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[tokio::test]
async fn routes_an_event_only_to_the_systems_that_may_see_its_fields() {
    with_world("route", |w| async move {
        let t0 = Instant::now();
        let router = w.start(w.config()).await;
        let ev = delivery_status_event("c-1");
        w.publish(&ev).await;

        let mut orders = w.consumer(&w.topology.inbox("orders")).await;
        let d = next(&mut orders, "orders inbox").await;
        let (got, record) = decode(&d);
        assert_eq!(got.event_id, ev.event_id);
        assert_eq!(got.origin, "delivery");
        assert_eq!(got.field_mask, ["delivery_status"]);
        assert_eq!(record.delivery_status.as_deref(), Some("out_for_delivery"));
        assert_eq!(record.warehouse, None, "orders must not see the warehouse");
        assert_eq!(d.header_str("concord-origin"), Some("delivery"));
        assert_eq!(d.header_str("concord-key"), Some("customer/c-1"));
        assert_eq!(d.message_id(), Some(ev.event_id.as_str()));
        assert_eq!(d.routing_key, "orders");
        ack(&d).await;

        let mut support = w.consumer(&w.topology.inbox("support")).await;
        let (got, record) = decode(&next(&mut support, "support inbox").await);
        assert_eq!(got.event_id, ev.event_id);
        assert_eq!(record.warehouse, None);

        // The input is acknowledged (not merely delivered) without any further traffic, and
        // the source gets nothing back.
        let router_queue = w.topology.router_queue();
        eventually("router input acked", async || {
            unacked(w.topology.namespace(), &router_queue).await == 0
        })
        .await;
        assert_eq!(w.count(&router_queue).await, Some(0));
        assert_eq!(w.count(&w.topology.inbox("delivery")).await, Some(0));
        assert_eq!(w.count(&w.topology.router_dlq()).await, Some(0));

        let m = router.metrics();
        assert_eq!(m.events_in_total("delivery", "customer"), 1);
        assert_eq!(m.deliveries_total("orders"), 1);
        assert_eq!(m.deliveries_total("support"), 1);
        assert_eq!(m.deliveries_total("delivery"), 0);
        router.shutdown().await.unwrap();
        eprintln!("route: {:?}", t0.elapsed());
    })
    .await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_routing_goes_on() {
    with_world("poison", |w| async move {
        let router = w.start(w.config()).await;
        let garbage: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(151).wrapping_add(7))
            .collect();
        w.publish_raw("delivery.customer", &garbage).await;
        let ev = delivery_status_event("c-2");
        w.publish(&ev).await;

        let mut dlq = w.consumer(&w.topology.router_dlq()).await;
        let d = next(&mut dlq, "router dlq").await;
        assert_eq!(d.body, garbage);
        assert_eq!(d.header_str("concord-reason"), Some("undecodable"));
        assert_eq!(
            d.header_str("concord-routing-key"),
            Some("delivery.customer")
        );
        assert!(
            d.header_str("concord-detail")
                .is_some_and(|s| s.contains("ChangeEvent")),
            "{:?}",
            d.header_str("concord-detail")
        );
        ack(&d).await;

        let mut orders = w.consumer(&w.topology.inbox("orders")).await;
        let (got, _) = decode(&next(&mut orders, "orders inbox").await);
        assert_eq!(got.event_id, ev.event_id);
        assert_eq!(
            router
                .metrics()
                .dead_lettered_total(DeadLetterReason::Undecodable),
            1
        );
        router.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn reload_declares_new_inboxes_and_refuses_invalid_policies() {
    with_world("reload", |w| async move {
        let router = w.start(w.config()).await;
        let billing = w.topology.inbox("billing");
        assert_eq!(w.count(&billing).await, None, "no billing inbox yet");

        write_policy(&w.policy_path(), &policy_with_billing());
        let outcome = within("reload", router.reload()).await.unwrap();
        assert!(
            matches!(&outcome, ReloadOutcome::Applied { systems } if systems.contains(&"billing".to_owned())),
            "{outcome:?}"
        );
        assert_eq!(w.count(&billing).await, Some(0), "billing inbox declared");
        let paid = payment_event("c-3", 4200);
        w.publish(&paid).await;
        let mut inbox = w.consumer(&billing).await;
        let (got, record) = decode(&next(&mut inbox, "billing inbox").await);
        assert_eq!(got.event_id, paid.event_id);
        assert_eq!(record.amount_paid, Some(4200));

        // An invalid policy is refused with its problems; the old one keeps routing.
        let broken = policy_with_billing().replace("owner = \"delivery\" }", "owner = \"nobody\" }");
        write_policy(&w.policy_path(), &broken);
        let outcome = within("reload", router.reload()).await.unwrap();
        match &outcome {
            ReloadOutcome::Refused(problems) => {
                assert!(problems.contains("unknown system `nobody`"), "{problems}");
                assert!(problems.contains("policy.toml"), "{problems}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(router.metrics().policy_reloads_total(ReloadResultLabel::Invalid), 1);
        assert_eq!(router.metrics().policy_reloads_total(ReloadResultLabel::Applied), 1);
        assert!(router.systems().contains(&"billing".to_owned()));
        let paid = payment_event("c-4", 99);
        w.publish(&paid).await;
        let (got, _) = decode(&next(&mut inbox, "billing inbox after refusal").await);
        assert_eq!(got.event_id, paid.event_id);

        // Restoring the policy in force changes nothing.
        write_policy(&w.policy_path(), &policy_with_billing());
        assert_eq!(router.reload().await.unwrap(), ReloadOutcome::Unchanged);
        router.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_changed_policy_file_is_reloaded_by_itself() {
    with_world("watch", |w| async move {
        let router = w
            .start(RouterConfig {
                watch_policy: true,
                ..w.config()
            })
            .await;
        write_policy(&w.policy_path(), &policy_with_billing());
        within(
            "policy reloaded from the file",
            router.wait_reloads_applied(1),
        )
        .await;
        assert!(router.systems().contains(&"billing".to_owned()));
        assert_eq!(w.count(&w.topology.inbox("billing")).await, Some(0));
        router.shutdown().await.unwrap();
    })
    .await;
}

/// The policy and schema mounted as Kubernetes mounts a ConfigMap: each file a link through
/// `..data`, a link to the directory of the current version; an update writes a new version's
/// directory and renames a new `..data` link over the old one. The router's watch follows it.
#[cfg(unix)]
#[tokio::test]
async fn a_policy_mounted_from_a_config_map_is_reloaded_when_the_map_changes() {
    use std::os::unix::fs::symlink;
    with_world("configmap", |w| async move {
        let mount = tempfile::tempdir().unwrap();
        let m = mount.path();
        let version = |name: &str, policy: &str| {
            std::fs::create_dir(m.join(name)).unwrap();
            concord_seed_model::write_deployment(&m.join(name), policy).unwrap();
        };
        version("..2026_12_01_v1", &seed_policy());
        symlink("..2026_12_01_v1", m.join("..data")).unwrap();
        for file in ["policy.toml", "customer.proto"] {
            symlink(format!("..data/{file}"), m.join(file)).unwrap();
        }
        let router = concord_router::Router::start(
            RouterConfig {
                watch_policy: true,
                ..w.config()
            },
            m.join("policy.toml"),
        )
        .await
        .unwrap();
        within("router ready", router.wait_ready()).await.unwrap();
        assert!(!router.systems().contains(&"billing".to_owned()));
        // The kubelet's update.
        version("..2026_12_01_v2", &policy_with_billing());
        symlink("..2026_12_01_v2", m.join("..data_tmp")).unwrap();
        std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
        // (The kubelet removes the old version's directory afterwards: the swap alone must do.)
        within(
            "policy reloaded after the ConfigMap update",
            router.wait_reloads_applied(1),
        )
        .await;
        std::fs::remove_dir_all(m.join("..2026_12_01_v1")).unwrap();
        assert!(router.systems().contains(&"billing".to_owned()));
        assert_eq!(w.count(&w.topology.inbox("billing")).await, Some(0));
        router.shutdown().await.unwrap();
    })
    .await;
}

/// The seed schema with `loyalty_id` (number 13) added to the Customer.
fn schema_with_loyalty() -> String {
    let end = "  optional string language = 12;\n}";
    assert!(concord_seed_model::CUSTOMER_PROTO.contains(end));
    concord_seed_model::CUSTOMER_PROTO.replace(
        end,
        "  optional string language = 12;\n  optional string loyalty_id = 13;\n}",
    )
}

/// The seed policy with `loyalty_id` owned by orders and visible to support.
fn policy_with_loyalty() -> String {
    seed_policy().replace(
        "tier = { owner",
        "loyalty_id = { owner = \"orders\", visible = [\"support\"] }\ntier = { owner",
    )
}

/// An orders event setting `loyalty_id` (encoded by hand: no Rust type knows the field).
fn loyalty_event(key: &str, id: &str) -> ChangeEvent {
    let mut ev = event("orders", key, &Customer::default(), &["loyalty_id"]);
    ev.record = [&[13 << 3 | 2, id.len() as u8][..], id.as_bytes()].concat();
    ev
}

#[tokio::test]
async fn a_schema_change_is_reloaded_with_the_policy_unless_it_breaks_a_used_field() {
    with_world("schema-reload", |w| async move {
        let router = w.start(w.config()).await;
        let proto = w.dir.path().join("customer.proto");
        let mut support = w.consumer(&w.topology.inbox("support")).await;

        // A new field, in the schema and the policy: accepted without a restart.
        write_policy(&proto, &schema_with_loyalty());
        write_policy(&w.policy_path(), &policy_with_loyalty());
        let outcome = within("reload", router.reload()).await.unwrap();
        assert!(matches!(outcome, ReloadOutcome::Applied { .. }), "{outcome:?}");
        let ev = loyalty_event("c-21", "L-1");
        w.publish(&ev).await;
        let d = next(&mut support, "the new field routed").await;
        let got = ChangeEvent::decode(d.body.as_slice()).unwrap();
        assert_eq!(got.event_id, ev.event_id);
        assert_eq!(got.field_mask, ["loyalty_id"]);
        assert_eq!(got.record, ev.record);
        ack(&d).await;

        // Renumbering or retyping a field the policy uses is refused: the old schema stays.
        for (from, to, problem) in [
            (
                "warehouse = 7;",
                "warehouse = 17;",
                "field `seed.v1.Customer.warehouse` (customer.proto:27) was renumbered from 7 to 17",
            ),
            (
                "optional int64 amount_paid = 8;",
                "optional string amount_paid = 8;",
                "field `seed.v1.Customer.amount_paid` (customer.proto:29) changed type from int64 to string",
            ),
        ] {
            write_policy(&proto, &schema_with_loyalty().replace(from, to));
            match within("reload", router.reload()).await.unwrap() {
                ReloadOutcome::Refused(problems) => {
                    assert!(problems.contains("breaking schema change"), "{problems}");
                    assert!(problems.contains(problem), "{problems}");
                    assert!(problems.contains("policy.toml"), "{problems}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(router.metrics().policy_reloads_total(ReloadResultLabel::Breaking), 2);
        assert_eq!(router.metrics().policy_reloads_total(ReloadResultLabel::Applied), 1);
        let in_force = router.policy();
        let amount = in_force
            .entity("customer")
            .unwrap()
            .message
            .get_field_by_name("amount_paid")
            .unwrap();
        assert_eq!(amount.kind(), prost_reflect::Kind::Int64);
        // Routing goes on with the schema in force: amount_paid is still an int64.
        let paid = payment_event("c-22", 4200);
        w.publish(&paid).await;
        let (got, record) = decode(&next(&mut support, "routing after the refusal").await);
        assert_eq!(got.event_id, paid.event_id);
        assert_eq!(record.amount_paid, Some(4200));

        // Back to the schema in force: nothing to do.
        write_policy(&proto, &schema_with_loyalty());
        assert_eq!(router.reload().await.unwrap(), ReloadOutcome::Unchanged);
        router.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_changed_schema_file_is_reloaded_by_itself() {
    with_world("watch-schema", |w| async move {
        let router = w
            .start(RouterConfig {
                watch_policy: true,
                ..w.config()
            })
            .await;
        write_policy(&w.dir.path().join("customer.proto"), &schema_with_loyalty());
        within(
            "schema reloaded from the file",
            router.wait_reloads_applied(1),
        )
        .await;
        let policy = router.policy();
        let customer = &policy.entity("customer").unwrap().message;
        assert!(customer.get_field_by_name("loyalty_id").is_some());
        router.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn http_endpoints_report_health_readiness_and_metrics() {
    with_world("http", |w| async move {
        // Not connected (nothing listens on port 1): alive but not ready.
        let offline = concord_router::Router::start(
            RouterConfig {
                amqp_uri: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
                ..w.config()
            },
            w.policy_path(),
        )
        .await
        .unwrap();
        assert_eq!(http_get(offline.http_addr(), "/healthz").await.0, 200);
        let (status, body) = http_get(offline.http_addr(), "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(!offline.is_ready());
        within("offline shutdown", offline.shutdown())
            .await
            .unwrap();

        let router = w.start(w.config()).await;
        let addr = router.http_addr();
        assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(http_get(addr, "/readyz").await.0, 200);
        w.publish(&delivery_status_event("c-5")).await;
        w.publish_raw("intruder.customer", b"\x00\x01").await;
        let mut orders = w.consumer(&w.topology.inbox("orders")).await;
        next(&mut orders, "orders inbox").await;
        // Deliveries are counted once confirmed, which may be after the inbox has the message.
        eventually("both inputs settled", async || {
            let m = router.metrics();
            m.events_in_sum() == 2
                && m.deliveries_total("orders") == 1
                && m.deliveries_total("support") == 1
                && m.dead_lettered_total(DeadLetterReason::Undecodable) == 1
        })
        .await;
        let (status, metrics) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        for needle in [
            "concord_router_connected 1",
            "concord_router_events_in_total{source=\"delivery\",entity=\"customer\"} 1",
            "concord_router_events_in_total{source=\"unknown\",entity=\"unknown\"} 1",
            "concord_router_fields_total{decision=\"accepted\",reason=\"owner\"} 2",
            "concord_router_deliveries_total{target=\"orders\"} 1",
            "concord_router_policy_reloads_total{result=\"invalid\"} 0",
            "concord_router_publish_confirm_seconds_count",
            "concord_router_end_to_end_lag_seconds_count{source=\"delivery\"} 1",
        ] {
            assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
        }
        assert!(
            !metrics.contains("intruder"),
            "unbounded label value leaked:\n{metrics}"
        );
        assert_eq!(http_get(addr, "/nope").await.0, 404);
        router.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn shutdown_settles_every_input_received() {
    with_world("drain", |w| async move {
        const N: usize = 400;
        let router = w.start(w.config()).await;
        let events: Vec<ChangeEvent> = (0..N)
            .map(|i| delivery_status_event(&format!("c-{i}")))
            .collect();
        let exchange = w.topology.ingress_exchange();
        let mut confirms = Vec::with_capacity(N);
        for ev in &events {
            let confirm = w
                .publisher
                .publish(
                    &exchange,
                    "delivery.customer",
                    &ev.encode_to_vec(),
                    MessageProps::new(),
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for c in confirms {
            within("publish confirm", c).await.unwrap();
        }
        // Shut down as soon as every input was received; many are still being published,
        // confirmed or acknowledged then.
        eventually("all inputs received", async || {
            router.metrics().events_in_total("delivery", "customer") >= N as u64
        })
        .await;
        within("drain", router.shutdown()).await.unwrap();

        // Nothing left in the router queue: after the router's connections closed, an
        // unacknowledged input would be ready again.
        assert_eq!(w.count(&w.topology.router_queue()).await, Some(0));
        assert_eq!(w.count(&w.topology.inbox("orders")).await, Some(N as u32));
        assert_eq!(w.count(&w.topology.inbox("support")).await, Some(N as u32));
        let mut orders = w.consumer(&w.topology.inbox("orders")).await;
        let mut seen = HashSet::new();
        for _ in 0..N {
            let d = next(&mut orders, "orders inbox").await;
            seen.insert(decode(&d).0.event_id);
        }
        let expected: HashSet<String> = events.into_iter().map(|e| e.event_id).collect();
        assert_eq!(seen, expected);
    })
    .await;
}

#[tokio::test]
async fn reconnects_by_itself_and_loses_nothing_when_the_broker_drops_it() {
    with_world("reconnect", |w| async move {
        /// Events published after the router is back, so that some flow through the new session.
        const AFTER_CUT: usize = 500;
        const CHUNK: usize = 50;
        let router = w.start(w.config()).await;
        let exchange = w.topology.ingress_exchange();
        let cut_done = std::sync::atomic::AtomicBool::new(false);

        // Publish continuously, in confirmed chunks, until the cut is over and more events
        // went out after it.
        let publish = async {
            let mut published = HashSet::new();
            let mut after_cut = 0;
            let mut i = 0usize;
            while after_cut < AFTER_CUT {
                let was_cut = cut_done.load(Ordering::SeqCst);
                let mut confirms = Vec::with_capacity(CHUNK);
                for _ in 0..CHUNK {
                    let ev = delivery_status_event(&format!("c-{i}"));
                    i += 1;
                    let body = ev.encode_to_vec();
                    let c = w
                        .publisher
                        .publish(&exchange, "delivery.customer", &body, MessageProps::new())
                        .await
                        .unwrap();
                    confirms.push(c);
                    published.insert(ev.event_id);
                }
                for c in confirms {
                    within("publish confirm", c).await.unwrap();
                }
                if was_cut {
                    after_cut += CHUNK;
                }
                assert!(i < 200_000, "the cut never completed");
            }
            published
        };
        let cut = async {
            // Mid-stream: once events are flowing through the router.
            eventually("first events routed", async || {
                router.metrics().deliveries_total("orders") >= 200
            })
            .await;
            let at_cut = router.metrics().events_in_total("delivery", "customer");
            let name = format!("concord-router/{}/", w.topology.namespace());
            assert_eq!(close_connections(&name).await, 2, "both router connections closed");
            within("router reconnected", router.wait_sessions(2)).await;
            cut_done.store(true, Ordering::SeqCst);
            at_cut
        };
        let (expected, at_cut) = tokio::join!(publish, cut);

        // Every event reaches the inbox (duplicates allowed).
        let mut orders = w.consumer(&w.topology.inbox("orders")).await;
        let mut seen = HashSet::new();
        let mut received = 0usize;
        let mut acks = AckBatcher::new(100);
        while !expected.is_subset(&seen) {
            let d = next(&mut orders, "orders inbox").await;
            received += 1;
            let id = decode(&d).0.event_id;
            assert!(expected.contains(&id), "unexpected event {id}");
            seen.insert(id);
            acks.ack(&d).await.unwrap();
        }
        acks.flush().await.unwrap();
        assert!(router.is_ready());
        let n = expected.len();
        eprintln!(
            "reconnect: {n} events, cut after {at_cut} inputs, {received} deliveries ({} duplicates), {} sessions",
            received - n,
            router.sessions_started()
        );
        router.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_invalid_policy_stops_the_start_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    let broken = seed_policy()
        .replace("owner = \"delivery\" }", "owner = \"nobody\" }")
        .replace("email = { owner", "emial = { owner");
    concord_seed_model::write_deployment(dir.path(), &broken).unwrap();
    let config = RouterConfig {
        http_listen: "127.0.0.1:0".into(),
        ..RouterConfig::default()
    };
    let err = concord_router::Router::start(config, path.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown system `nobody`"), "{err}");
    assert!(err.contains("has no field `emial`"), "{err}");
    // The problem about a field names where its message is declared.
    assert!(
        err.contains("`seed.v1.Customer` (customer.proto:17)"),
        "{err}"
    );
    assert!(err.lines().count() >= 3, "one line per problem:\n{err}");

    // A policy may not name a system `router`: that name is the router's dead-letter queue.
    std::fs::write(
        &path,
        seed_policy().replace("[systems.support]", "[systems.router]\n[systems.support]"),
    )
    .unwrap();
    let err = concord_router::Router::start(
        RouterConfig {
            http_listen: "127.0.0.1:0".into(),
            ..RouterConfig::default()
        },
        path,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("`router` is reserved"), "{err}");

    let err = concord_router::Router::start(
        RouterConfig {
            prefetch: 0,
            ..RouterConfig::default()
        },
        dir.path().join("policy.toml"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("`prefetch` must be at least 2"), "{err}");
}

#[tokio::test]
async fn refused_credentials_stop_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let path = concord_seed_model::write_seed(dir.path()).unwrap();
    let bad =
        concord_admin::scratch::amqp_uri(&Broker::from_env().amqp, "concord-nobody", "wrong", "/");
    let router = concord_router::Router::start(
        RouterConfig {
            amqp_uri: bad,
            http_listen: "127.0.0.1:0".into(),
            watch_policy: false,
            ..RouterConfig::default()
        },
        path,
    )
    .await
    .unwrap();
    assert!(
        within("router gives up", router.wait_ready())
            .await
            .is_err()
    );
    let err = within("shutdown", router.shutdown()).await.unwrap_err();
    assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
}

#[tokio::test]
async fn an_inbox_deleted_under_the_router_is_declared_again_and_nothing_is_lost() {
    with_world("redeclare", |w| async move {
        let router = w.start(w.config()).await;
        let inbox = w.topology.inbox("orders");
        rabbitmqctl(&["delete_queue", "-p", w.topology.namespace(), &inbox]).await;
        assert_eq!(w.count(&inbox).await, None, "inbox deleted");

        // The projection for orders is returned as unroutable: the input is requeued (never
        // acknowledged as delivered), the topology declared again, and the retry gets through.
        let ev = delivery_status_event("c-9");
        w.publish(&ev).await;
        let mut orders = w.consumer_when_declared(&inbox).await;
        let (got, _) = decode(&next(&mut orders, "orders inbox, declared again").await);
        assert_eq!(got.event_id, ev.event_id);
        let router_queue = w.topology.router_queue();
        eventually("input acked after the retry", async || {
            unacked(w.topology.namespace(), &router_queue).await == 0
        })
        .await;
        assert_eq!(w.count(&router_queue).await, Some(0));
        assert_eq!(router.metrics().deliveries_total("orders"), 1);
        router.shutdown().await.unwrap();
    })
    .await;
}

/// An inbox that keeps refusing the router's publishes (here a broker policy makes it full:
/// `max-length` 0 with `reject-publish`; in a cluster, a channel opened while a quorum queue
/// elected its leader was seen nacking for good) makes the router give up its session after a
/// run of refusals and reopen it on fresh channels; the input is requeued, never lost, and
/// delivered once the inbox takes it.
#[tokio::test]
async fn an_inbox_that_keeps_refusing_publishes_makes_the_router_reopen_its_session() {
    with_world("refused", |w| async move {
        let router = w.start(w.config()).await;
        let vhost = w.topology.namespace();
        let inbox = w.topology.inbox("orders");
        rabbitmqctl(&[
            "set_policy",
            "-p",
            vhost,
            "--apply-to",
            "queues",
            "refuse",
            &format!("^{}$", inbox.replace('.', "\\.")),
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
        ])
        .await;
        let ev = delivery_status_event("c-1");
        w.publish(&ev).await;
        within("the session reopened", router.wait_sessions(2)).await;
        rabbitmqctl(&["clear_policy", "-p", vhost, "refuse"]).await;

        let mut orders = w.consumer(&inbox).await;
        let (got, _) = decode(&next(&mut orders, "orders inbox, once it takes messages").await);
        assert_eq!(got.event_id, ev.event_id);
        let router_queue = w.topology.router_queue();
        eventually("input acked", async || {
            unacked(vhost, &router_queue).await == 0
        })
        .await;
        assert_eq!(w.count(&router_queue).await, Some(0));
        router.shutdown().await.unwrap();
    })
    .await;
}
