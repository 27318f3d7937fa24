//! The SDK engine on the in-memory test bus (no broker): the seed scenario across three
//! `MemorySystem`s routed by the real pure router.
// Test helpers outside `#[test]` functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use concord_adapter::testkit::{MemorySystem, TestBus, text};
use concord_adapter::{AdapterError, ApplyOp, Echoes, SystemAdapter};
use concord_policy::Policy;
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use prost::Message;
use prost_reflect::{DynamicMessage, Value};

const CUSTOMER: &str = "customer";

/// The seed scenario's schema (`examples/seed/customer.proto`).
/// (Decoded once: descriptors of different pools never compare equal.)
fn seed_pool() -> prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET).unwrap()
    })
    .clone()
}

fn seed_policy() -> Policy {
    Policy::from_toml(concord_seed_model::POLICY, "policy.toml", &seed_pool()).unwrap()
}

struct Seed {
    bus: TestBus,
    orders: MemorySystem,
    support: MemorySystem,
    delivery: MemorySystem,
}

async fn seed() -> Seed {
    seed_with(MemorySystem::new).await
}

/// The seed scenario with systems made by `system` (e.g. with versions, or a feed that skips
/// the adapter's own writes).
async fn seed_with(system: impl Fn(&str) -> MemorySystem) -> Seed {
    let orders = system("orders");
    let support = system("support");
    let delivery = system("delivery");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", orders.clone()).await.unwrap();
    bus.add("support", support.clone()).await.unwrap();
    bus.add("delivery", delivery.clone()).await.unwrap();
    Seed {
        bus,
        orders,
        support,
        delivery,
    }
}

fn address(city: &str) -> Option<Value> {
    let desc = seed_pool().get_message_by_name("seed.v1.Address").unwrap();
    let mut m = DynamicMessage::new(desc);
    m.set_field_by_name("city", Value::String(city.into()));
    m.set_field_by_name("street", Value::String("1 Main St".into()));
    Some(Value::Message(m))
}

impl Seed {
    /// orders signs up customer `o-1`; returns its canonical key.
    async fn sign_up(&mut self) -> String {
        self.orders.edit(
            CUSTOMER,
            "o-1",
            [
                ("name", text("Ada Lovelace")),
                ("email", text("ada@example.com")),
                ("address", address("London")),
                ("tier", text("gold")),
                ("amount_paid", Some(Value::I64(12_500))),
            ],
        );
        self.bus.run_until_quiet().await.unwrap();
        self.bus
            .key_of("orders", CUSTOMER, "o-1")
            .await
            .unwrap()
            .unwrap()
    }

    async fn local(&self, system: &str, key: &str) -> String {
        self.bus
            .local_id_of(system, CUSTOMER, key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{system} has no record for {key}"))
    }
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn names(ev: &ChangeEvent) -> Vec<&str> {
    ev.field_mask.iter().map(String::as_str).collect()
}

fn record_fields(ev: &ChangeEvent) -> Vec<String> {
    let desc = seed_pool().get_message_by_name("seed.v1.Customer").unwrap();
    let m = DynamicMessage::decode(desc, ev.record.as_slice()).unwrap();
    m.fields().map(|(f, _)| f.name().to_owned()).collect()
}

#[tokio::test]
async fn edits_propagate_by_ownership_and_visibility() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    let del = t.local("delivery", &key).await;
    assert!(
        sup.starts_with("support-") && del.starts_with("delivery-"),
        "{sup} {del}"
    );

    let s_rec = t.support.get(CUSTOMER, &sup).unwrap();
    assert_eq!(s_rec.get("name"), Some(&s("Ada Lovelace")));
    assert_eq!(s_rec.get("email"), Some(&s("ada@example.com")));
    assert_eq!(s_rec.get("amount_paid"), Some(&Value::I64(12_500)));
    assert_eq!(s_rec.get("tier"), Some(&s("gold")));
    let d_rec = t.delivery.get(CUSTOMER, &del).unwrap();
    assert_eq!(d_rec.get("name"), Some(&s("Ada Lovelace")));
    assert_eq!(d_rec.get("address"), address("London").as_ref());
    // The driver never sees what was paid, nor the email or tier.
    let keys: Vec<&str> = d_rec.keys().map(String::as_str).collect();
    assert_eq!(keys, ["address", "name"]);

    // The driver reports progress; sales and support see the status, never the warehouse.
    t.delivery.edit(
        CUSTOMER,
        &del,
        [
            ("delivery_status", text("out_for_delivery")),
            ("warehouse", text("north")),
        ],
    );
    t.bus.run_until_quiet().await.unwrap();
    let o_rec = t.orders.get(CUSTOMER, "o-1").unwrap();
    assert_eq!(o_rec.get("delivery_status"), Some(&s("out_for_delivery")));
    assert!(!o_rec.contains_key("warehouse"));
    assert_eq!(
        t.support.field(CUSTOMER, &sup, "delivery_status"),
        Some(s("out_for_delivery"))
    );
    assert_eq!(t.support.field(CUSTOMER, &sup, "warehouse"), None);

    // Support edits what it owns; orders sees the ticket count, delivery does not.
    t.support
        .edit(CUSTOMER, &sup, [("open_tickets", Some(Value::U32(2)))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(
        t.orders.field(CUSTOMER, "o-1", "open_tickets"),
        Some(Value::U32(2))
    );
    assert_eq!(t.delivery.field(CUSTOMER, &del, "open_tickets"), None);

    // On the wire: nothing delivery must not see ever reached it, and the same for orders.
    for ev in t.bus.delivered("delivery") {
        assert!(!names(&ev).contains(&"amount_paid"), "{ev:?}");
        assert!(!record_fields(&ev).contains(&"amount_paid".to_owned()));
    }
    for ev in t.bus.delivered("orders") {
        assert!(!names(&ev).contains(&"warehouse"), "{ev:?}");
        assert!(!record_fields(&ev).contains(&"warehouse".to_owned()));
        assert_eq!(ev.origin, ev.source);
    }
    assert!(t.bus.router_dead_letters().is_empty());
    // The ids map both ways, consistently.
    assert_eq!(
        t.bus.key_of("support", CUSTOMER, &sup).await.unwrap(),
        Some(key.clone())
    );
    // The first event of a new record is a create, with one clock per masked field.
    let first = &t.bus.published("orders")[0];
    assert_eq!(first.op, Op::Create as i32);
    assert_eq!(first.key, key);
    assert_eq!(first.clocks.len(), first.field_mask.len());
    assert!(
        uuid::Uuid::parse_str(&first.event_id)
            .unwrap()
            .get_version_num()
            == 7
    );
}

#[tokio::test]
async fn a_non_owner_edit_does_not_spread() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let del = t.local("delivery", &key).await;
    let sup = t.local("support", &key).await;
    let before = t.bus.delivered("support").len();
    let published = t.bus.published("delivery").len();
    t.delivery.edit(CUSTOMER, &del, [("name", text("Mallory"))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(
        t.orders.field(CUSTOMER, "o-1", "name"),
        Some(s("Ada Lovelace"))
    );
    assert_eq!(
        t.support.field(CUSTOMER, &sup, "name"),
        Some(s("Ada Lovelace"))
    );
    assert_eq!(t.bus.delivered("support").len(), before);
    // The router told delivery its rank for `name` (0: not an owner) with the owner's value, so
    // the edit is overruled locally: not published, the owner's value written back.
    assert_eq!(t.bus.published("delivery").len(), published);
    assert_eq!(
        t.delivery.field(CUSTOMER, &del, "name"),
        Some(s("Ada Lovelace"))
    );
    assert_eq!(t.bus.metrics("delivery").corrections, 1);

    // A non-owner's edit of a field it never received is published, and the router refuses it.
    t.support.edit(CUSTOMER, &sup, [("warehouse", text("W9"))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(
        names(t.bus.published("support").last().unwrap()),
        ["warehouse"]
    );
    assert_eq!(t.delivery.field(CUSTOMER, &del, "warehouse"), None);
    assert_eq!(t.bus.delivered("support").len(), before);

    // The owner's next edit overwrites the local non-owner value everywhere.
    t.orders.edit(CUSTOMER, "o-1", [("name", text("Ada King"))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(
        t.delivery.field(CUSTOMER, &del, "name"),
        Some(s("Ada King"))
    );
}

#[tokio::test]
async fn no_echo_once_quiet() {
    no_echo_once_quiet_with(MemorySystem::new).await;
}

/// Echoes recognised exactly by record version.
#[tokio::test]
async fn no_echo_once_quiet_with_versions() {
    no_echo_once_quiet_with(|name| MemorySystem::new(name).versioned()).await;
}

/// Feeds that never report the adapter's own writes.
#[tokio::test]
async fn no_echo_once_quiet_with_feeds_that_skip_own_writes() {
    no_echo_once_quiet_with(|name| MemorySystem::new(name).skipping_own_writes()).await;
}

async fn no_echo_once_quiet_with(system: impl Fn(&str) -> MemorySystem) {
    let mut t = seed_with(&system).await;
    let reported = system("probe").echoes() == Echoes::Reported;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    t.support.edit(
        CUSTOMER,
        &sup,
        [("phone", text("+44 1")), ("language", text("en"))],
    );
    t.orders.edit(CUSTOMER, "o-1", [("phone", text("+44 2"))]);
    t.bus.run_until_quiet().await.unwrap();
    let settled = t.bus.message_count();
    let quiet = t.bus.run_until_quiet().await.unwrap();
    assert_eq!(quiet.messages, 0);
    assert_eq!(t.bus.message_count(), settled);
    // Applied changes came back through the feeds and were recognised as echoes (unless the
    // feeds never report them).
    assert_eq!(t.bus.metrics("support").local_echoes > 0, reported);
    assert_eq!(t.bus.metrics("delivery").local_echoes > 0, reported);
    // Each system published only its own users' edits: orders 2 (sign-up, phone), support 1.
    assert_eq!(t.bus.published("orders").len(), 2);
    assert_eq!(t.bus.published("support").len(), 1);
    assert!(t.bus.published("delivery").is_empty());
    // Everyone who sees the phone converged on the same value: the write with the greatest
    // stamp (the bus publishes orders' edit first, so support's later stamp wins).
    let del = t.local("delivery", &key).await;
    let phone = t.orders.field(CUSTOMER, "o-1", "phone");
    let stamp = |ev: &ChangeEvent| (ev.clocks["phone"].hlc, ev.source.clone());
    let winner = [
        &t.bus.published("orders")[1],
        &t.bus.published("support")[0],
    ]
    .into_iter()
    .max_by_key(|ev| stamp(ev))
    .unwrap()
    .clone();
    let want = if winner.source == "orders" {
        "+44 2"
    } else {
        "+44 1"
    };
    assert_eq!(phone, Some(s(want)));
    assert_eq!(t.support.field(CUSTOMER, &sup, "phone"), phone);
    assert_eq!(t.delivery.field(CUSTOMER, &del, "phone"), phone);
}

#[tokio::test]
async fn duplicated_and_stale_events_never_overwrite_newer_data() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    t.orders.edit(CUSTOMER, "o-1", [("tier", text("platinum"))]);
    t.bus.run_until_quiet().await.unwrap();
    let delivered = t.bus.delivered("support");
    let sign_up = delivered.first().unwrap().clone();
    let upgrade = delivered.last().unwrap().clone();
    let applies = t.support.applied().len();

    // A redelivery of both: acknowledged without applying again.
    t.bus.inject("support", &upgrade).unwrap();
    t.bus.inject("support", &sign_up).unwrap();
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(t.support.applied().len(), applies);
    assert_eq!(t.bus.metrics("support").incoming_duplicate, 2);

    // A different event carrying an older write of the tier: stale, not applied.
    let mut old = sign_up.clone();
    old.event_id = uuid::Uuid::now_v7().to_string();
    t.bus.inject("support", &old).unwrap();
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(t.support.field(CUSTOMER, &sup, "tier"), Some(s("platinum")));
    assert_eq!(t.support.applied().len(), applies);
    assert_eq!(t.bus.metrics("support").incoming_stale, 1);

    // A genuinely newer write does win.
    let mut newer = upgrade.clone();
    newer.event_id = uuid::Uuid::now_v7().to_string();
    for c in newer.clocks.values_mut() {
        c.hlc += 1;
    }
    let desc = seed_pool().get_message_by_name("seed.v1.Customer").unwrap();
    let mut rec = DynamicMessage::new(desc);
    rec.set_field_by_name("tier", s("silver"));
    newer.record = rec.encode_to_vec();
    t.bus.inject("support", &newer).unwrap();
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(t.support.field(CUSTOMER, &sup, "tier"), Some(s("silver")));
    // The untouched fields are still there.
    assert_eq!(
        t.support.field(CUSTOMER, &sup, "name"),
        Some(s("Ada Lovelace"))
    );
}

#[tokio::test]
async fn priority_owner_wins_and_overruled_local_edits_are_written_back() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    let del = t.local("delivery", &key).await;
    // Support (first in the owner list) sets the notes; the driver gets them.
    t.support
        .edit(CUSTOMER, &sup, [("delivery_notes", text("ring twice"))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(
        t.delivery.field(CUSTOMER, &del, "delivery_notes"),
        Some(s("ring twice"))
    );
    // The router told delivery its rank for the field (support 2, delivery 1).
    let rank = t
        .bus
        .state("delivery")
        .unwrap()
        .rank(CUSTOMER, "delivery_notes")
        .await
        .unwrap();
    assert_eq!(rank, 1);

    // The driver amends them later: support's word wins; the driver's copy is corrected.
    let published = t.bus.published("delivery").len();
    t.delivery
        .edit(CUSTOMER, &del, [("delivery_notes", text("leave at door"))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(
        t.delivery.field(CUSTOMER, &del, "delivery_notes"),
        Some(s("ring twice"))
    );
    assert_eq!(
        t.support.field(CUSTOMER, &sup, "delivery_notes"),
        Some(s("ring twice"))
    );
    assert_eq!(t.bus.published("delivery").len(), published);
    let m = t.bus.metrics("delivery");
    assert_eq!((m.local_overruled, m.corrections), (1, 1));
    let last = t.delivery.applied().pop().unwrap();
    assert_eq!(last.origin, "delivery");
    assert_eq!(
        last.fields.get("delivery_notes"),
        Some(&Some(s("ring twice")))
    );
}

#[tokio::test]
async fn failures_are_retried_in_order_or_dead_lettered() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;

    // Two transient failures, then it works: applied once, in order.
    t.support.fail_next_applies([
        AdapterError::transient("db down"),
        AdapterError::transient("db down"),
    ]);
    t.orders.edit(CUSTOMER, "o-1", [("tier", text("silver"))]);
    t.orders.edit(CUSTOMER, "o-1", [("tier", text("bronze"))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(t.support.field(CUSTOMER, &sup, "tier"), Some(s("bronze")));
    assert_eq!(t.bus.metrics("support").retries, 2);
    let tiers: Vec<_> = t
        .support
        .applied()
        .iter()
        .filter_map(|a| a.fields.get("tier").cloned().flatten())
        .collect();
    assert_eq!(tiers, [s("gold"), s("silver"), s("bronze")]);

    // A permanent refusal is dead-lettered with the reason, and the store does not pretend it
    // was applied: a later write still goes through.
    t.support
        .fail_next_applies([AdapterError::permanent("tier not allowed")]);
    t.orders.edit(CUSTOMER, "o-1", [("tier", text("iron"))]);
    t.bus.run_until_quiet().await.unwrap();
    let dead = t.bus.dead_lettered("support");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "apply_failed");
    assert!(dead[0].detail.contains("tier not allowed"));
    assert_eq!(t.support.field(CUSTOMER, &sup, "tier"), Some(s("bronze")));
    let stored = t
        .bus
        .state("support")
        .unwrap()
        .field(CUSTOMER, &key, "tier")
        .await
        .unwrap()
        .unwrap();
    assert!(!stored.pending);
    // Garbage is dead-lettered too.
    t.bus
        .inject_raw("support", b"\xffnot protobuf".to_vec())
        .unwrap();
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(t.bus.dead_lettered("support")[1].reason, "undecodable");
}

#[tokio::test]
async fn a_transient_failure_that_lasts_keeps_the_message_and_its_successors() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    t.support
        .fail_next_applies((0..100).map(|_| AdapterError::transient("down")));
    t.orders.edit(CUSTOMER, "o-1", [("tier", text("silver"))]);
    t.orders
        .edit(CUSTOMER, "o-1", [("email", text("ada@new.example"))]);
    let q = t.bus.run_until_quiet().await.unwrap();
    // Not dropped, not dead-lettered, not overtaken: both wait, in order.
    assert_eq!(q.stuck, 2);
    assert_eq!(t.bus.pending("support"), 2);
    assert_eq!(t.support.field(CUSTOMER, &sup, "tier"), Some(s("gold")));
    assert!(t.bus.dead_lettered("support").is_empty());
    // The system comes back: everything arrives.
    t.support.clear_failures();
    let q = t.bus.run_until_quiet().await.unwrap();
    assert_eq!(q.stuck, 0);
    assert_eq!(t.support.field(CUSTOMER, &sup, "tier"), Some(s("silver")));
    assert_eq!(
        t.support.field(CUSTOMER, &sup, "email"),
        Some(s("ada@new.example"))
    );
    assert!(t.bus.dead_lettered("support").is_empty());
}

#[tokio::test]
async fn deletes_propagate_and_stale_upserts_are_ignored() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    let del = t.local("delivery", &key).await;
    t.orders.edit(CUSTOMER, "o-1", [("tier", text("silver"))]);
    t.bus.run_until_quiet().await.unwrap();
    let late_upgrade = t.bus.delivered("support").last().unwrap().clone();

    t.orders.delete(CUSTOMER, "o-1");
    t.bus.run_until_quiet().await.unwrap();
    assert!(t.support.get(CUSTOMER, &sup).is_none());
    assert!(t.delivery.get(CUSTOMER, &del).is_none());
    let ev = t.bus.published("orders").last().unwrap().clone();
    assert_eq!(ev.op, Op::Delete as i32);
    assert!(ev.record_clock.is_some());
    // No echo of the delete.
    assert_eq!(t.bus.run_until_quiet().await.unwrap().messages, 0);

    // An upsert stamped before the delete arrives late (as a new event): ignored.
    let mut late = late_upgrade;
    late.event_id = uuid::Uuid::now_v7().to_string();
    t.bus.inject("support", &late).unwrap();
    t.bus.run_until_quiet().await.unwrap();
    assert!(
        t.support.ids(CUSTOMER).is_empty(),
        "{:?}",
        t.support.ids(CUSTOMER)
    );
    assert_eq!(t.bus.metrics("support").incoming_stale, 1);
    // A delete that is older than the tombstone changes nothing either.
    let mut old_delete = ev.clone();
    old_delete.event_id = uuid::Uuid::now_v7().to_string();
    old_delete.record_clock = Some(FieldClock {
        hlc: 1,
        system: "orders".into(),
        rank: 0,
    });
    t.bus.inject("support", &old_delete).unwrap();
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(t.bus.metrics("support").incoming_stale, 2);
    assert!(
        t.support
            .applied()
            .iter()
            .filter(|a| a.op == ApplyOp::Delete)
            .count()
            == 1
    );
}

#[tokio::test]
async fn snapshot_backfills_existing_records() {
    // Records that existed before the system joined Concord.
    let orders = MemorySystem::new("orders");
    orders.edit(
        CUSTOMER,
        "o-7",
        [
            ("name", text("Grace")),
            ("amount_paid", Some(Value::I64(5))),
        ],
    );
    let support = MemorySystem::new("support");
    let mut bus = TestBus::new(seed_policy());
    bus.add("orders", orders.clone()).await.unwrap();
    bus.add("support", support.clone()).await.unwrap();
    assert_eq!(bus.snapshot("orders").await.unwrap(), 1);
    bus.run_until_quiet().await.unwrap();
    let id = support.find(CUSTOMER, "name", "Grace").unwrap();
    assert_eq!(
        support.field(CUSTOMER, &id, "amount_paid"),
        Some(Value::I64(5))
    );
    let published = bus.published("orders");
    // The feed's copy of the same edit is recognised as already published.
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0].op, Op::Snapshot as i32);
}

#[tokio::test]
async fn state_survives_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = |s: &str| dir.path().join(format!("{s}.sqlite"));
    let orders = MemorySystem::new("orders");
    let support = MemorySystem::new("support");
    let mut bus = TestBus::new(seed_policy());
    bus.add_with_state("orders", orders.clone(), &path("orders"))
        .await
        .unwrap();
    bus.add_with_state("support", support.clone(), &path("support"))
        .await
        .unwrap();
    orders.edit(
        CUSTOMER,
        "o-1",
        [("name", text("Ada")), ("tier", text("gold"))],
    );
    bus.run_until_quiet().await.unwrap();
    let key = bus
        .key_of("orders", CUSTOMER, "o-1")
        .await
        .unwrap()
        .unwrap();
    let sup = bus
        .local_id_of("support", CUSTOMER, &key)
        .await
        .unwrap()
        .unwrap();
    let delivered = bus.delivered("support");
    let published = bus.published("orders").len();
    let hlc_before = bus
        .state("orders")
        .unwrap()
        .field(CUSTOMER, &key, "name")
        .await
        .unwrap()
        .unwrap()
        .stamp
        .hlc;
    bus.remove("orders").await.unwrap();
    bus.remove("support").await.unwrap();

    // Restart both (same systems, same state files).
    let mut bus = TestBus::new(seed_policy());
    bus.add_with_state("orders", orders.clone(), &path("orders"))
        .await
        .unwrap();
    bus.add_with_state("support", support.clone(), &path("support"))
        .await
        .unwrap();
    // The feed resumes after the persisted cursor: nothing is published again.
    assert_eq!(bus.run_until_quiet().await.unwrap().messages, 0);
    assert_eq!(
        bus.key_of("orders", CUSTOMER, "o-1").await.unwrap(),
        Some(key.clone())
    );
    assert_eq!(
        bus.local_id_of("support", CUSTOMER, &key).await.unwrap(),
        Some(sup.clone())
    );
    // Deduplication survives: a redelivered event is not applied again.
    let applies = support.applied().len();
    bus.inject("support", &delivered[0]).unwrap();
    bus.run_until_quiet().await.unwrap();
    assert_eq!(support.applied().len(), applies);
    assert_eq!(bus.metrics("support").incoming_duplicate, 1);
    // Stamps survive, and the clock continues after them.
    orders.edit(CUSTOMER, "o-1", [("name", text("Ada L."))]);
    bus.run_until_quiet().await.unwrap();
    assert_eq!(bus.published("orders").len(), 1);
    let ev = bus.published("orders")[0].clone();
    assert_eq!(ev.key, key);
    assert!(ev.clocks["name"].hlc > hlc_before);
    assert_eq!(support.field(CUSTOMER, &sup, "name"), Some(s("Ada L.")));
    assert_eq!(published, 1);
}

#[tokio::test]
async fn late_echoes_of_overtaken_values_are_not_published() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    // Support's feed lags: it reports the applies only after two newer values arrived.
    t.support.pause_feed();
    t.orders.edit(CUSTOMER, "o-1", [("phone", text("+1 111"))]);
    t.bus.run_until_quiet().await.unwrap();
    t.orders.edit(CUSTOMER, "o-1", [("phone", text("+1 222"))]);
    t.bus.run_until_quiet().await.unwrap();
    let published = t.bus.published("support").len();
    t.support.resume_feed();
    t.bus.run_until_quiet().await.unwrap();
    // The stale echo "+1 111" was recognised, not published as a new local write.
    assert_eq!(t.bus.published("support").len(), published);
    assert_eq!(t.support.field(CUSTOMER, &sup, "phone"), Some(s("+1 222")));
    assert_eq!(t.orders.field(CUSTOMER, "o-1", "phone"), Some(s("+1 222")));
}

/// With record versions, the SDK knows the agent's edit was overwritten by its apply before the
/// feed reported it: the report is superseded, nothing is published, every copy keeps orders'
/// value (which is what support's system shows).
#[tokio::test]
async fn with_versions_a_local_edit_overwritten_by_an_apply_is_superseded() {
    let mut t = seed_with(|name| MemorySystem::new(name).versioned()).await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    let del = t.local("delivery", &key).await;
    t.support.pause_feed();
    t.support
        .edit(CUSTOMER, &sup, [("phone", text("+2 agent"))]);
    t.orders
        .edit(CUSTOMER, "o-1", [("phone", text("+2 sales"))]);
    t.bus.run_until_quiet().await.unwrap();
    let published = t.bus.published("support").len();
    t.support.resume_feed();
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(t.bus.published("support").len(), published);
    assert_eq!(t.bus.metrics("support").local_superseded, 1);
    for phone in [
        t.support.field(CUSTOMER, &sup, "phone"),
        t.orders.field(CUSTOMER, "o-1", "phone"),
        t.delivery.field(CUSTOMER, &del, "phone"),
    ] {
        assert_eq!(phone, Some(s("+2 sales")));
    }
}

#[tokio::test]
async fn a_local_edit_overwritten_by_an_apply_before_the_feed_saw_it_converges_on_the_system_state()
{
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    let del = t.local("delivery", &key).await;
    // A support agent changes the phone, but the feed reports it only after the SDK applied
    // a phone change from orders on top of it: the system now holds orders' value.
    t.support.pause_feed();
    t.support
        .edit(CUSTOMER, &sup, [("phone", text("+2 agent"))]);
    t.orders
        .edit(CUSTOMER, "o-1", [("phone", text("+2 sales"))]);
    t.bus.run_until_quiet().await.unwrap();
    assert_eq!(
        t.support.field(CUSTOMER, &sup, "phone"),
        Some(s("+2 sales"))
    );
    t.support.resume_feed();
    t.bus.run_until_quiet().await.unwrap();
    // Whatever the order of events, every copy ends equal to what support's system holds.
    let held = t.support.field(CUSTOMER, &sup, "phone");
    assert_eq!(t.orders.field(CUSTOMER, "o-1", "phone"), held);
    assert_eq!(t.delivery.field(CUSTOMER, &del, "phone"), held);
    let stored = t
        .bus
        .state("support")
        .unwrap()
        .field(CUSTOMER, &key, "phone")
        .await
        .unwrap()
        .unwrap();
    let orders_stored = t
        .bus
        .state("orders")
        .unwrap()
        .field(CUSTOMER, &key, "phone")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.value, orders_stored.value);
    assert_eq!(stored.stamp, orders_stored.stamp);
}

/// What `system` shows for `entity`: every record's fields (local ids left out, they differ
/// between runs).
fn shown(system: &MemorySystem) -> Vec<Vec<(String, Value)>> {
    system
        .ids(CUSTOMER)
        .iter()
        .filter_map(|id| system.get(CUSTOMER, id))
        .map(|r| r.into_iter().collect())
        .collect()
}

/// orders' delete of `key` stamped `hlc`, as the router routes it.
fn routed_delete(key: &str, hlc: u64) -> ChangeEvent {
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        origin: "orders".into(),
        entity: CUSTOMER.into(),
        key: key.into(),
        op: Op::Delete as i32,
        record_clock: Some(FieldClock {
            hlc,
            system: "orders".into(),
            rank: 0,
        }),
        schema_version: concord_proto::SCHEMA_VERSION,
        ..Default::default()
    }
}

/// `source`'s write of one field of `key` (in `record`) stamped `hlc` with `rank`, as the
/// router routes it to a receiver whose own rank for the field is `own_rank`.
fn routed_write(
    source: &str,
    key: &str,
    field: &str,
    record: concord_seed_model::seed::v1::Customer,
    (hlc, rank): (u64, u32),
    own_rank: u32,
) -> ChangeEvent {
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: source.into(),
        origin: source.into(),
        entity: CUSTOMER.into(),
        key: key.into(),
        op: Op::Upsert as i32,
        record: record.encode_to_vec(),
        field_mask: vec![field.into()],
        clocks: [(
            field.to_owned(),
            FieldClock {
                hlc,
                system: source.into(),
                rank,
            },
        )]
        .into(),
        receiver_ranks: [(field.to_owned(), own_rank)]
            .into_iter()
            .filter(|(_, r)| *r != 0)
            .collect(),
        schema_version: concord_proto::SCHEMA_VERSION,
        ..Default::default()
    }
}

/// Injects `first` then `second` into support (or the other way round), and returns what
/// support then shows; applying them must not be reported back as support's own change.
async fn support_receives(
    t: &mut Seed,
    (first, second): (ChangeEvent, ChangeEvent),
    swap: bool,
) -> Vec<Vec<(String, Value)>> {
    let order = if swap {
        [second, first]
    } else {
        [first, second]
    };
    let published = t.bus.published("support").len();
    for ev in &order {
        t.bus.inject("support", ev).unwrap();
        t.bus.run_until_quiet().await.unwrap();
    }
    assert_eq!(
        t.bus.published("support").len(),
        published,
        "echo published"
    );
    shown(&t.support)
}

/// The signed-up customer's delete by orders stamped `delete_at`, and delivery's concurrent
/// `delivery_status` update stamped `update_at`, as support receives them (routed copies), in
/// the order given; returns what support then shows.
async fn delete_and_update(
    delete_at: u64,
    update_at: u64,
    delete_first: bool,
) -> Vec<Vec<(String, Value)>> {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let signed_up = t.bus.published("orders").last().unwrap().clone();
    let base = signed_up.clocks["name"].hlc;
    let delete = routed_delete(&key, base + delete_at);
    let update = routed_write(
        "delivery",
        &key,
        "delivery_status",
        concord_seed_model::seed::v1::Customer {
            delivery_status: Some("out_for_delivery".into()),
            ..Default::default()
        },
        (base + update_at, 1),
        0,
    );
    support_receives(&mut t, (update, delete), delete_first).await
}

#[tokio::test]
async fn a_delete_and_a_concurrent_update_converge_whatever_arrives_first() {
    // The update was made after the delete (a later clock): the record stays, holding only the
    // update, whichever the replica received first.
    let update_first = delete_and_update(100, 200, false).await;
    let delete_first = delete_and_update(100, 200, true).await;
    assert_eq!(update_first, delete_first);
    assert_eq!(
        update_first,
        [vec![(
            "delivery_status".to_owned(),
            Value::String("out_for_delivery".into())
        )]]
    );
    // The update was made before the delete: the record goes, whichever came first.
    assert!(delete_and_update(200, 100, false).await.is_empty());
    assert!(delete_and_update(200, 100, true).await.is_empty());
}

/// support (first priority for `delivery_notes`) writes a note; then delivery's later note
/// (second priority) and orders' delete made between the two reach support, in the order
/// given; returns what support then shows.
async fn delete_between_priority_writes(delete_first: bool) -> Vec<Vec<(String, Value)>> {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    t.support
        .edit(CUSTOMER, &sup, [("delivery_notes", text("ring twice"))]);
    t.bus.run_until_quiet().await.unwrap();
    let own = t.bus.published("support").last().unwrap().clone();
    let at = own.clocks["delivery_notes"].hlc;
    let delete = routed_delete(&key, at + 10);
    let note = routed_write(
        "delivery",
        &key,
        "delivery_notes",
        concord_seed_model::seed::v1::Customer {
            delivery_notes: Some("leave at the door".into()),
            ..Default::default()
        },
        (at + 20, 1),
        2,
    );
    support_receives(&mut t, (note, delete), delete_first).await
}

#[tokio::test]
async fn a_delete_brings_back_a_later_lower_priority_value_whatever_arrives_first() {
    // support's own note (priority 1) predates the delete; delivery's (priority 2) follows it:
    // delivery's note is what remains, whether it arrived before the delete (while support's
    // note still won) or after.
    let note_first = delete_between_priority_writes(false).await;
    let delete_first = delete_between_priority_writes(true).await;
    assert_eq!(note_first, delete_first);
    assert_eq!(
        note_first,
        [vec![(
            "delivery_notes".to_owned(),
            Value::String("leave at the door".into())
        )]]
    );
}

/// A change and then a delete of one record read by the feed together (one batch): the state
/// store ends as after the delete — no field left behind — and the delete propagates.
#[tokio::test]
async fn an_edit_and_a_delete_in_one_batch_leave_no_field_behind() {
    let mut t = seed().await;
    let key = t.sign_up().await;
    let sup = t.local("support", &key).await;
    // (The sign-up made the tier gold: a new value, so the edit writes it.)
    t.orders.edit(CUSTOMER, "o-1", [("tier", text("silver"))]);
    t.orders.delete(CUSTOMER, "o-1");
    t.bus.run_until_quiet().await.unwrap();
    let store = t.bus.state("orders").unwrap();
    for field in ["tier", "name", "amount_paid"] {
        assert_eq!(
            store.field(CUSTOMER, &key, field).await.unwrap(),
            None,
            "{field} left in the store after the delete"
        );
    }
    let row = store.record(CUSTOMER, &key).await.unwrap().unwrap();
    assert!(!row.live && row.tombstone.is_some(), "{row:?}");
    assert!(t.support.get(CUSTOMER, &sup).is_none());
}
