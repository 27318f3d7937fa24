//! The SDK's ergonomics for adapter authors: typed access to an incoming change, adapters that
//! implement only their half (a sink, a source), and the process config file with its
//! `[adapter]` table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use concord_adapter::testkit::{MemorySystem, TestBus, text};
use concord_adapter::{AdapterError, Applied, Apply, LocalChange, ProcessConfig, SystemAdapter};
use concord_policy::Policy;
use concord_seed_model::seed::v1::{Address, Customer};
use futures::Stream;
use prost_reflect::Value;

const CUSTOMER: &str = "customer";

fn seed_policy() -> Policy {
    let pool =
        prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET).unwrap();
    Policy::from_toml(concord_seed_model::POLICY, "policy.toml", &pool).unwrap()
}

/// A sink that reads every incoming change as the generated `Customer` type.
#[derive(Debug, Clone, Default)]
struct TypedSink {
    received: Arc<Mutex<Vec<Customer>>>,
}

impl SystemAdapter for TypedSink {
    async fn apply(&self, change: &Apply) -> Result<Applied, AdapterError> {
        let customer: Customer = change.record()?;
        self.received.lock().unwrap().push(customer);
        Ok(Applied::to(
            change
                .local_id
                .clone()
                .unwrap_or_else(|| change.key.clone()),
        ))
    }
}

/// A source: it only reports changes (from a `MemorySystem`), and implements no `apply`.
#[derive(Debug, Clone)]
struct Source(MemorySystem);

impl SystemAdapter for Source {
    fn changes(
        &self,
        cursor: Option<String>,
    ) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
        self.0.changes(cursor)
    }
}

#[tokio::test]
async fn a_sink_reads_changes_as_generated_types_and_a_source_needs_no_apply() {
    let orders = MemorySystem::new("orders");
    let support = TypedSink::default();
    let delivery = MemorySystem::new("delivery");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", Source(orders.clone())).await.unwrap();
    bus.add("support", support.clone()).await.unwrap();
    bus.add("delivery", delivery.clone()).await.unwrap();

    let address = {
        let desc = seed_policy()
            .entity(CUSTOMER)
            .unwrap()
            .message
            .get_field_by_name("address")
            .unwrap()
            .kind()
            .as_message()
            .unwrap()
            .clone();
        let mut m = prost_reflect::DynamicMessage::new(desc);
        m.set_field_by_name("city", Value::String("London".into()));
        Value::Message(m)
    };
    orders.edit(
        CUSTOMER,
        "o-1",
        [
            ("name", text("Ada")),
            ("amount_paid", Some(Value::I64(12_500))),
            ("address", Some(address)),
        ],
    );
    bus.run_until_quiet().await.unwrap();
    // Support receives the fields it may see, typed.
    let received = support.received.lock().unwrap().clone();
    assert_eq!(
        received,
        [Customer {
            name: Some("Ada".into()),
            address: Some(Address {
                city: Some("London".into()),
                ..Address::default()
            }),
            amount_paid: Some(12_500),
            ..Customer::default()
        }]
    );

    // Delivery edits the delivery status, which orders sees: the source implements no `apply`,
    // so the change is dead-lettered there (`apply_failed`), naming the record.
    let id = delivery.ids(CUSTOMER)[0].clone();
    delivery.edit(CUSTOMER, &id, [("delivery_status", text("shipped"))]);
    bus.run_until_quiet().await.unwrap();
    let dead = bus.dead_lettered("orders");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "apply_failed");
    assert!(
        dead[0].detail.contains("applies no changes"),
        "{}",
        dead[0].detail
    );
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    path: String,
    #[serde(default)]
    batch: u32,
}

const CONFIG: &str = r#"
system = "orders"
policy = "policy.toml"
state = "orders.sqlite"
amqp_uri = "amqp://from-the-file"
http_listen = "0.0.0.0:9470"

[adapter]
path = "/var/lib/orders"
batch = 7
"#;

#[test]
fn the_process_config_holds_the_runner_settings_and_the_adapters_own_table() {
    let c = ProcessConfig::<Settings>::parse(CONFIG, "orders.toml", None).unwrap();
    assert_eq!(c.runner.system, "orders");
    assert_eq!(c.runner.amqp_uri, "amqp://from-the-file");
    assert_eq!(c.http_listen.to_string(), "0.0.0.0:9470");
    assert_eq!(
        (c.adapter.path.as_str(), c.adapter.batch),
        ("/var/lib/orders", 7)
    );
    // The environment's broker URI wins over the file's (credentials stay out of files).
    let c =
        ProcessConfig::<Settings>::parse(CONFIG, "orders.toml", Some("amqp://env".into())).unwrap();
    assert_eq!(c.runner.amqp_uri, "amqp://env");

    // Every problem names the file and the key.
    for (text, expect) in [
        (CONFIG.replace("state =", "stat ="), "stat"),
        (
            CONFIG.replace("batch = 7", "batch = 7\ncolour = 1"),
            "colour",
        ),
        (CONFIG.replace("path = \"/var/lib/orders\"", ""), "path"),
        (CONFIG.replace("0.0.0.0:9470", "nowhere"), "http_listen"),
        (CONFIG.replace("\"orders\"", "\"Orders\""), "system"),
    ] {
        let e = ProcessConfig::<Settings>::parse(&text, "orders.toml", None)
            .map(|_| ())
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("orders.toml") && e.contains(expect), "{e}");
    }
}

/// A state store whose clock was poisoned (by an earlier release that adopted a forged record
/// clock, and stamped the system's own writes with it) recovers: the next local write is stamped
/// with the wall clock and routed, not dead-lettered as `clock_skew`.
#[tokio::test]
async fn an_adapter_with_a_poisoned_clock_recovers_at_its_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("support.sqlite");
    // The poisoned state: support's own earlier write, stamped ten days ahead.
    concord_adapter::Store::open(&state)
        .await
        .unwrap()
        .close()
        .await;
    let far = (concord_amqp::now_ms() + 10 * 24 * 3_600_000) << 16;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", state.display()))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO fields (entity, key, field, value, rank, hlc, system, pending)
         VALUES ('customer', 'k-1', 'support_agent', NULL, 1, ?, 'support', 0)",
    )
    .bind(i64::try_from(far).unwrap())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let orders = MemorySystem::new("orders");
    let support = MemorySystem::new("support");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", orders.clone()).await.unwrap();
    bus.add_with_state("support", support.clone(), &state)
        .await
        .unwrap();
    orders.edit(CUSTOMER, "o-1", [("name", text("Ada"))]);
    bus.run_until_quiet().await.unwrap();
    let id = support.find(CUSTOMER, "name", "Ada").unwrap();
    support.edit(CUSTOMER, &id, [("support_agent", text("Grace"))]);
    bus.run_until_quiet().await.unwrap();
    assert!(
        bus.router_dead_letters().is_empty(),
        "{:?}",
        bus.router_dead_letters()
    );
    assert_eq!(bus.metrics("support").clock_resets, 1);
    let ev = &bus.published("support")[0];
    assert!(ev.clocks["support_agent"].hlc < far);
    assert!(orders.find(CUSTOMER, "support_agent", "Grace").is_some());
}

/// An event dead-lettered for a field the policy did not have (`unknown_field`: the rest was
/// routed) and replayed after the policy adds it delivers that field too: deduplication knows a
/// copy by its event id and the fields it carries, so the replayed copy is not taken for the
/// one already applied.
#[tokio::test]
async fn a_dead_letter_replayed_after_a_policy_fix_delivers_every_field_it_carried() {
    let pool =
        prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET).unwrap();
    let without_tier = concord_seed_model::POLICY
        .lines()
        .filter(|l| !l.starts_with("tier ="))
        .collect::<Vec<_>>()
        .join("\n");
    let v1 = Policy::from_toml(&without_tier, "policy.toml", &pool).unwrap();
    let v2 = seed_policy();
    let orders = MemorySystem::new("orders");
    let support = MemorySystem::new("support");
    let mut bus = TestBus::new(v1);
    bus.add("orders", orders.clone()).await.unwrap();
    bus.add("support", support.clone()).await.unwrap();
    orders.edit(
        CUSTOMER,
        "o-1",
        [("name", text("Ada")), ("tier", text("gold"))],
    );
    bus.run_until_quiet().await.unwrap();
    let id = support.find(CUSTOMER, "name", "Ada").unwrap();
    assert_eq!(support.field(CUSTOMER, &id, "tier"), None);
    let dead = bus.router_dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter.reason.as_str(), "unknown_field");

    bus.set_policy(v2);
    assert_eq!(bus.replay_router_dead_letters(), 1);
    bus.run_until_quiet().await.unwrap();
    assert!(bus.router_dead_letters().is_empty());
    assert_eq!(
        support.field(CUSTOMER, &id, "tier"),
        Some(Value::String("gold".into()))
    );
    // The same copy again is a duplicate.
    let last = bus.delivered("support").last().cloned().unwrap();
    bus.inject("support", &last).unwrap();
    bus.run_until_quiet().await.unwrap();
    assert_eq!(bus.metrics("support").incoming_duplicate, 1);
}

/// Nothing is dropped on the way out either: a local change naming a field the entity does not
/// have, or a value of the wrong type, publishes its valid fields and is parked in the system's
/// dead-letter queue with the reason and the record; so is a write-back the system refuses.
#[tokio::test]
async fn local_changes_that_cannot_be_published_are_parked_not_dropped() {
    let orders = MemorySystem::new("orders");
    let support = MemorySystem::new("support");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", orders.clone()).await.unwrap();
    bus.add("support", support.clone()).await.unwrap();
    orders.edit(
        CUSTOMER,
        "o-1",
        [
            ("name", text("Ada")),
            ("nickname", text("A.")),
            ("amount_paid", text("a lot")),
        ],
    );
    bus.run_until_quiet().await.unwrap();
    assert!(support.find(CUSTOMER, "name", "Ada").is_some());
    let parked = bus.dead_lettered("orders");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].reason, "unknown_field");
    assert!(
        parked[0].detail.contains("nickname") && parked[0].detail.contains("amount_paid"),
        "{}",
        parked[0].detail
    );
    let body: serde_json::Value = serde_json::from_slice(&parked[0].body).unwrap();
    assert_eq!(body["local_id"], "o-1");
    assert_eq!(
        body["key"],
        bus.key_of("orders", CUSTOMER, "o-1")
            .await
            .unwrap()
            .unwrap()
            .as_str()
    );
    assert_eq!(bus.metrics("orders").local_invalid, 1);

    // Support renames the customer (orders owns the name): the write-back fails for good.
    let id = support.find(CUSTOMER, "name", "Ada").unwrap();
    support.fail_next_applies([AdapterError::permanent("read-only record")]);
    support.edit(CUSTOMER, &id, [("name", text("Eve"))]);
    bus.run_until_quiet().await.unwrap();
    let parked = bus.dead_lettered("support");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].reason, "write_back_failed");
    assert!(
        parked[0].detail.contains("read-only record"),
        "{}",
        parked[0].detail
    );
}

/// An incoming message larger than the limit is dead-lettered (`too_large`) without being
/// decoded; the next one is processed.
#[tokio::test]
async fn an_oversized_incoming_message_is_dead_lettered_undecoded() {
    let support = MemorySystem::new("support");
    let mut bus = TestBus::new(seed_policy());
    bus.add("support", support.clone()).await.unwrap();
    bus.inject_raw("support", vec![0xff; 1024 * 1024 + 1])
        .unwrap();
    bus.run_until_quiet().await.unwrap();
    let dead = bus.dead_lettered("support");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "too_large");
    assert_eq!(dead[0].body.len(), 1024 * 1024 + 1);
}

/// The adapter learns up to which feed position its changes are published and confirmed (to
/// forget them, e.g. delete change-log rows); a restart tells it again.
#[tokio::test]
async fn the_adapter_is_told_which_changes_are_published() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("orders.sqlite");
    let orders = MemorySystem::new("orders");
    let mut bus = TestBus::new(seed_policy());
    bus.add_with_state("orders", orders.clone(), &state)
        .await
        .unwrap();
    orders.edit(CUSTOMER, "o-1", [("name", text("Ada"))]);
    orders.edit(CUSTOMER, "o-2", [("name", text("Grace"))]);
    bus.run_until_quiet().await.unwrap();
    assert_eq!(
        orders.published_cursors().last().map(String::as_str),
        Some("2")
    );
    bus.remove("orders").await.unwrap();
    let again = MemorySystem::new("orders");
    bus.add_with_state("orders", again.clone(), &state)
        .await
        .unwrap();
    bus.run_until_quiet().await.unwrap();
    assert_eq!(again.published_cursors(), ["2"]);
}

/// `create = ["orders"]` holds whatever op a system uses: support's upsert (or snapshot) of a
/// key nobody created makes no record appear in orders or delivery. (Their values are kept and
/// come with the record if a creator ever creates it: `only_a_creator_makes_a_record_appear...`.)
#[tokio::test]
async fn a_system_that_may_not_create_records_makes_none_appear() {
    let orders = MemorySystem::new("orders");
    let support = MemorySystem::new("support");
    let delivery = MemorySystem::new("delivery");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", orders.clone()).await.unwrap();
    bus.add("support", support.clone()).await.unwrap();
    bus.add("delivery", delivery.clone()).await.unwrap();
    // Support's users make a record of their own and set fields support owns (orders sees
    // `support_agent`, delivery sees `delivery_notes`).
    support.edit(
        CUSTOMER,
        "s-1",
        [
            ("support_agent", text("Grace")),
            ("delivery_notes", text("ring twice")),
        ],
    );
    bus.run_until_quiet().await.unwrap();
    assert!(support.ids(CUSTOMER).len() == 1);
    assert!(
        orders.ids(CUSTOMER).is_empty(),
        "{:?}",
        orders.ids(CUSTOMER)
    );
    assert!(delivery.ids(CUSTOMER).is_empty());
    // A snapshot does not either.
    bus.snapshot("support").await.unwrap();
    bus.run_until_quiet().await.unwrap();
    assert!(orders.ids(CUSTOMER).is_empty() && delivery.ids(CUSTOMER).is_empty());
}

/// A record orders creates appears in every system that sees any field of the entity, even
/// when none of the fields it was created with is visible there.
#[tokio::test]
async fn a_created_record_appears_in_every_system_that_sees_the_entity() {
    let orders = MemorySystem::new("orders");
    let support = MemorySystem::new("support");
    let delivery = MemorySystem::new("delivery");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", orders.clone()).await.unwrap();
    bus.add("support", support.clone()).await.unwrap();
    bus.add("delivery", delivery.clone()).await.unwrap();
    // Only support sees what was paid; delivery sees nothing of this creation.
    orders.create(CUSTOMER, [("amount_paid", Some(Value::I64(100)))]);
    bus.run_until_quiet().await.unwrap();
    assert_eq!(support.ids(CUSTOMER).len(), 1);
    assert_eq!(delivery.ids(CUSTOMER).len(), 1);
    let id = delivery.ids(CUSTOMER)[0].clone();
    assert_eq!(delivery.get(CUSTOMER, &id), Some(Default::default()));
}

/// Only what the router published is applied: a copy put in the inbox by anyone else — with a
/// field the system may not see, a value of a field it owns, and forged ranks — is
/// dead-lettered as `untrusted_publisher`, and nothing of it reaches the system or its state.
#[tokio::test]
async fn a_copy_the_router_did_not_publish_is_never_applied() {
    use concord_proto::v1::{ChangeEvent, FieldClock, Op};
    use prost::Message;
    let orders = MemorySystem::new("orders");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", orders.clone()).await.unwrap();
    orders.edit(CUSTOMER, "o-1", [("name", text("Ada"))]);
    bus.run_until_quiet().await.unwrap();
    let key = bus
        .key_of("orders", CUSTOMER, "o-1")
        .await
        .unwrap()
        .unwrap();
    let record = Customer {
        name: Some("written by support".into()),
        warehouse: Some("W1".into()),
        ..Customer::default()
    };
    let far = (concord_amqp::now_ms() + 3_600_000) << 16;
    let clock = |system: &str| FieldClock {
        hlc: far,
        system: system.into(),
        rank: 9,
    };
    let forged = ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "support".into(),
        origin: "support".into(),
        entity: CUSTOMER.into(),
        key: key.clone(),
        op: Op::Upsert as i32,
        record: prost::Message::encode_to_vec(&record),
        field_mask: vec!["name".into(), "warehouse".into()],
        clocks: [
            ("name".into(), clock("support")),
            ("warehouse".into(), clock("delivery")),
        ]
        .into(),
        receiver_ranks: [("name".into(), 0)].into(),
        schema_version: concord_proto::SCHEMA_VERSION,
        ..ChangeEvent::default()
    };
    for publisher in [Some("support"), Some("operator"), None] {
        bus.inject_as("orders", publisher, forged.encode_to_vec())
            .unwrap();
    }
    bus.run_until_quiet().await.unwrap();
    let dead = bus.dead_lettered("orders");
    assert_eq!(dead.len(), 3);
    assert!(
        dead.iter().all(|d| d.reason == "untrusted_publisher"),
        "{dead:?}"
    );
    assert_eq!(
        orders.field(CUSTOMER, "o-1", "name"),
        Some(Value::String("Ada".into()))
    );
    assert_eq!(orders.field(CUSTOMER, "o-1", "warehouse"), None);
    let state = bus.state("orders").unwrap();
    assert_eq!(state.rank(CUSTOMER, "name").await.unwrap(), 0);
    assert_eq!(
        state.field(CUSTOMER, &key, "warehouse").await.unwrap(),
        None
    );
    // The system's own later edit of its field is published, not taken for overruled.
    orders.edit(CUSTOMER, "o-1", [("name", text("Ada L."))]);
    bus.run_until_quiet().await.unwrap();
    assert_eq!(bus.published("orders").len(), 2);
}
