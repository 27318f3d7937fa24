//! `route::process` on single messages: one test per dead-letter reason, the seed scenario end to
//! end on the decoded projections, and the unknown-field leak test.

// Test code: a panic is how a broken fixture or a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use concord_policy::route::{self, DeadLetterReason as R, Input, Outcome, Routed, RouterSettings};
use concord_policy::{Op, Policy, value};
use concord_proto::v1::{ChangeEvent, FieldClock};
use concord_seed_model::seed::v1::{Address, Customer};
use prost::Message;
use prost_reflect::{DynamicMessage, ReflectMessage};

fn settings() -> RouterSettings {
    RouterSettings::default()
}

fn run_with(p: &Policy, s: &RouterSettings, key: &str, body: &[u8], user: Option<&str>) -> Outcome {
    route::process(
        p,
        s,
        NOW_MS,
        Input {
            routing_key: key,
            body,
            user_id: user,
            concord_key: None,
        },
    )
}

/// Routes `ev` under its own routing key, published by its source.
fn run(ev: &ChangeEvent) -> Outcome {
    let key = format!("{}.{}", ev.source, ev.entity);
    run_with(
        &seed_policy(),
        &settings(),
        &key,
        &ev.encode_to_vec(),
        Some(&ev.source),
    )
}

#[track_caller]
fn dead_letter(o: Outcome) -> (R, String) {
    match o {
        Outcome::DeadLetter(d) => (d.reason, d.detail),
        Outcome::Routed(r) => panic!("expected a dead letter, got {r:#?}"),
    }
}

#[track_caller]
fn routed(o: Outcome) -> Routed {
    match o {
        Outcome::Routed(r) => r,
        Outcome::DeadLetter(d) => panic!("expected routed, got {d:?}"),
    }
}

#[track_caller]
fn assert_dead(o: Outcome, reason: R, detail_part: &str) {
    let (r, detail) = dead_letter(o);
    assert_eq!(r, reason, "detail: {detail}");
    assert!(
        detail.contains(detail_part),
        "{detail:?} should mention {detail_part:?}"
    );
}

fn valid() -> ChangeEvent {
    let rec = Customer {
        name: Some("Ada".into()),
        ..Default::default()
    };
    event("orders", &["name"], rec.encode_to_vec(), clock_now())
}

fn clock_now() -> u64 {
    NOW_MS << 16
}

/// The deliveries of a routed event, decoded, by target system.
fn decoded(r: &Routed) -> BTreeMap<String, ChangeEvent> {
    r.deliveries
        .iter()
        .map(|d| {
            (
                d.system.clone(),
                ChangeEvent::decode(d.body.as_slice()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn valid_event_is_routed() {
    let r = routed(run(&valid()));
    assert_eq!(
        (r.source.as_str(), r.entity.as_str(), r.key.as_str()),
        ("orders", "customer", "c-1")
    );
    assert_eq!(r.op, Op::Upsert);
    assert_eq!(r.accepted, 1);
    assert!(r.rejected.is_empty() && r.dead_letter.is_none());
    let targets: Vec<_> = r.deliveries.iter().map(|d| d.system.as_str()).collect();
    assert_eq!(targets, ["delivery", "support"]);
}

#[test]
fn too_large() {
    let ev = valid();
    let body = ev.encode_to_vec();
    let s = RouterSettings {
        max_message_bytes: body.len() - 1,
        ..settings()
    };
    let o = run_with(&seed_policy(), &s, "orders.customer", &body, Some("orders"));
    assert_dead(o, R::TooLarge, "limit");
    // Exactly at the limit is fine.
    let s = RouterSettings {
        max_message_bytes: body.len(),
        ..settings()
    };
    routed(run_with(
        &seed_policy(),
        &s,
        "orders.customer",
        &body,
        Some("orders"),
    ));
}

#[test]
fn random_bytes_are_undecodable() {
    // A field key with wire type 7 (invalid), then garbage.
    let body = [0x0f, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff];
    let o = run_with(&seed_policy(), &settings(), "orders.customer", &body, None);
    assert_dead(o, R::Undecodable, "ChangeEvent");
    // An overlong varint.
    let o = run_with(
        &seed_policy(),
        &settings(),
        "orders.customer",
        &[0xff; 11],
        None,
    );
    assert_eq!(dead_letter(o).0, R::Undecodable);
}

#[test]
fn truncated_protobuf_is_undecodable() {
    let mut ev = valid();
    // Make the last encoded field a long string so a cut lands inside it.
    ev.derived_from = "x".repeat(100);
    ev.observed_at_ms = 0;
    let body = ev.encode_to_vec();
    for cut in [1, 10, 50, 99] {
        let o = run_with(
            &seed_policy(),
            &settings(),
            "orders.customer",
            &body[..body.len() - cut],
            None,
        );
        assert_eq!(dead_letter(o).0, R::Undecodable, "cut {cut}");
    }
}

#[test]
fn wrong_schema_version() {
    for v in [0, 2, u32::MAX] {
        let mut ev = valid();
        ev.schema_version = v;
        assert_dead(
            run(&ev),
            R::UnsupportedSchemaVersion,
            &format!("schema_version {v}"),
        );
    }
}

#[test]
fn bad_event_id() {
    for id in ["", "not-a-uuid", "0190b9a4-6a3e-7cc1-9a6e-1d2f3a4b5c6"] {
        let mut ev = valid();
        ev.event_id = id.into();
        assert_eq!(dead_letter(run(&ev)).0, R::InvalidEventId, "{id:?}");
    }
}

#[test]
fn routing_key_contradicting_the_envelope() {
    let body = valid().encode_to_vec();
    let p = seed_policy();
    for key in [
        "support.customer",
        "orders.order",
        "orders",
        "orders.customer.x",
        "",
    ] {
        let o = run_with(&p, &settings(), key, &body, None);
        assert_dead(o, R::RoutingKeyMismatch, "routing key");
    }
}

#[test]
fn unknown_system_and_entity() {
    let mut ev = valid();
    ev.source = "billing".into();
    assert_dead(run(&ev), R::UnknownSystem, "billing");
    let mut ev = valid();
    ev.entity = "invoice".into();
    assert_dead(run(&ev), R::UnknownEntity, "invoice");
}

#[test]
fn user_id_mismatch_and_missing() {
    let p = seed_policy();
    let body = valid().encode_to_vec();
    let o = run_with(&p, &settings(), "orders.customer", &body, Some("support"));
    assert_dead(o, R::UserIdMismatch, "support");
    let strict = RouterSettings {
        require_user_id: true,
        ..settings()
    };
    let o = run_with(&p, &strict, "orders.customer", &body, None);
    assert_eq!(dead_letter(o).0, R::MissingUserId);
    // A mismatch is a mismatch whether or not the id is required.
    let o = run_with(&p, &strict, "orders.customer", &body, Some("delivery"));
    assert_eq!(dead_letter(o).0, R::UserIdMismatch);
    routed(run_with(
        &p,
        &strict,
        "orders.customer",
        &body,
        Some("orders"),
    ));
    // Without the requirement (a broker where every publisher is trusted), no id is fine.
    let lenient = RouterSettings {
        require_user_id: false,
        ..settings()
    };
    routed(run_with(&p, &lenient, "orders.customer", &body, None));
    // A broker user mapped to a system publishes as that system.
    let mapped = RouterSettings {
        users: [("sales-app".to_owned(), "orders".to_owned())].into(),
        ..settings()
    };
    routed(run_with(
        &p,
        &mapped,
        "orders.customer",
        &body,
        Some("sales-app"),
    ));
    let o = run_with(
        &p,
        &mapped,
        "orders.customer",
        &body,
        Some("orders-impostor"),
    );
    assert_eq!(dead_letter(o).0, R::UserIdMismatch);
}

#[test]
fn empty_or_overlong_key() {
    let mut ev = valid();
    ev.key = String::new();
    assert_dead(run(&ev), R::InvalidKey, "is 0");
    ev.key = "k".repeat(route::MAX_KEY_BYTES + 1);
    assert_eq!(dead_letter(run(&ev)).0, R::InvalidKey);
    ev.key = "k".repeat(route::MAX_KEY_BYTES);
    routed(run(&ev));
}

#[test]
fn unspecified_or_unknown_op() {
    for op in [0, 5, -1] {
        let mut ev = valid();
        ev.op = op;
        assert_dead(run(&ev), R::InvalidOp, &format!("op {op}"));
    }
}

#[test]
fn duplicate_field_in_mask() {
    let mut ev = valid();
    ev.field_mask.push("name".into());
    assert_dead(run(&ev), R::DuplicateField, "name");
    // Unknown names count too.
    let mut ev = valid();
    ev.field_mask.extend(["bogus".into(), "bogus".into()]);
    assert_eq!(dead_letter(run(&ev)).0, R::DuplicateField);
}

#[test]
fn mask_longer_than_the_message() {
    let mut ev = valid();
    ev.field_mask = (0..13).map(|i| format!("f{i}")).collect();
    assert_dead(run(&ev), R::FieldMaskTooLarge, "13 names");
}

#[test]
fn missing_clock() {
    let mut ev = valid();
    ev.clocks.clear();
    assert_dead(run(&ev), R::MissingClock, "name");
    // A delete needs the record clock.
    let mut ev = event("orders", &[], Vec::new(), clock_now());
    ev.op = concord_proto::v1::Op::Delete as i32;
    assert_dead(run(&ev), R::MissingClock, "record_clock");
}

#[test]
fn clock_ahead_of_the_skew() {
    let skew = settings().clock_skew_ms;
    let mut ev = valid();
    ev.clocks
        .insert("name".into(), clock((NOW_MS + skew + 1) << 16, "orders"));
    assert_dead(run(&ev), R::ClockSkew, "name");
    // Exactly at the limit (any logical counter) is accepted.
    ev.clocks.insert(
        "name".into(),
        clock(((NOW_MS + skew) << 16) | 0xffff, "orders"),
    );
    routed(run(&ev));
    // Far in the past is fine.
    ev.clocks.insert("name".into(), clock(1, "orders"));
    routed(run(&ev));
    // The record clock of a delete is checked too.
    let mut ev = event("orders", &[], Vec::new(), clock_now());
    ev.op = concord_proto::v1::Op::Delete as i32;
    ev.record_clock = Some(clock((NOW_MS + skew + 1) << 16, "orders"));
    assert_dead(run(&ev), R::ClockSkew, "record_clock");
}

#[test]
fn record_of_wrong_wire_types_is_invalid() {
    // `name` (field 1, a string) sent as a varint.
    let mut bad = Vec::new();
    push_varint(&mut bad, 1 << 3);
    push_varint(&mut bad, 42);
    let ev = event("orders", &["name"], bad, clock_now());
    assert_dead(run(&ev), R::InvalidRecord, "seed.v1.Customer");
    // `amount_paid` (field 8, int64) sent as a string.
    let mut bad = Vec::new();
    append_unknown(&mut bad, 8, "12");
    let ev = event("orders", &["amount_paid"], bad, clock_now());
    assert_eq!(dead_letter(run(&ev)).0, R::InvalidRecord);
    // A string field holding invalid UTF-8.
    let mut bad = Vec::new();
    push_varint(&mut bad, 1 << 3 | 2);
    bad.extend_from_slice(&[2, 0xff, 0xfe]);
    let ev = event("orders", &["name"], bad, clock_now());
    assert_eq!(dead_letter(run(&ev)).0, R::InvalidRecord);
    // Not decoded at all when nothing is accepted: the fields are just rejected.
    let mut bad = Vec::new();
    push_varint(&mut bad, 6 << 3);
    push_varint(&mut bad, 1);
    let ev = event("orders", &["delivery_status"], bad, clock_now());
    let r = routed(run(&ev));
    assert_eq!(r.accepted, 0);
    assert!(r.deliveries.is_empty());
}

#[test]
fn unknown_field_name_is_routed_and_dead_lettered() {
    let mut ev = valid();
    ev.field_mask.push("favourite_colour".into());
    let r = routed(run(&ev));
    assert_eq!(r.accepted, 1);
    let dl = r.dead_letter.clone().unwrap();
    assert_eq!(dl.reason, R::UnknownField);
    assert!(dl.detail.contains("favourite_colour"), "{}", dl.detail);
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].field, "favourite_colour");
    assert_eq!(r.rejected[0].reason.as_str(), "unknown_field");
    // The known part is still delivered, without the unknown name.
    for (_, d) in decoded(&r) {
        assert_eq!(d.field_mask, ["name"]);
    }
    // A name the message has but the policy does not declare is unknown to the router as well.
    let text = "[systems.a]\n[systems.b]\n[entities.customer]\nmessage = \"seed.v1.Customer\"\n\
                [entities.customer.fields]\nname = { owner = \"a\", visible = [\"b\"] }\n";
    let p = Policy::from_toml(text, "p.toml", &seed_pool()).unwrap();
    let mut ev = event(
        "a",
        &["name", "email"],
        Customer::default().encode_to_vec(),
        clock_now(),
    );
    ev.clocks.remove("email");
    let r = routed(run_with(
        &p,
        &settings(),
        "a.customer",
        &ev.encode_to_vec(),
        Some("a"),
    ));
    assert_eq!(r.dead_letter.map(|d| d.reason), Some(R::UnknownField));
    assert_eq!(r.deliveries.len(), 1);
}

/// Every dead-letter reason has a distinct code (they name metrics and headers).
#[test]
fn dead_letter_codes_are_distinct() {
    let all = [
        R::TooLarge,
        R::Undecodable,
        R::UnsupportedSchemaVersion,
        R::InvalidEventId,
        R::RoutingKeyMismatch,
        R::UnknownSystem,
        R::UnknownEntity,
        R::UserIdMismatch,
        R::MissingUserId,
        R::InvalidKey,
        R::InvalidOp,
        R::DuplicateField,
        R::FieldMaskTooLarge,
        R::MissingClock,
        R::ClockSkew,
        R::InvalidRecord,
        R::UnknownField,
        R::ApplyFailed,
        R::WriteBackFailed,
        R::KeyHeaderMismatch,
        R::InvalidDerivedFrom,
        R::UntrustedPublisher,
    ];
    let codes: std::collections::BTreeSet<_> = all.iter().map(|r| r.as_str()).collect();
    assert_eq!(codes.len(), all.len());
}

/// A record clock far ahead is refused on every operation, not only on deletes: forwarded, it
/// would raise the receivers' clocks (and poison their later edits).
#[test]
fn a_record_clock_beyond_the_skew_is_refused_whatever_the_op() {
    for op in [Op::Upsert, Op::Create, Op::Snapshot, Op::Delete] {
        let mut ev = valid();
        ev.op = op.to_wire() as i32;
        ev.record_clock = Some(clock((NOW_MS + 3_600_000) << 16, "orders"));
        assert_dead(run(&ev), R::ClockSkew, "record_clock");
        ev.record_clock = Some(clock(clock_now(), "orders"));
        routed(run(&ev));
    }
}

/// `derived_from` is an event id or nothing.
#[test]
fn derived_from_must_be_an_event_id() {
    let mut ev = valid();
    ev.derived_from = "x".repeat(10_000);
    assert_dead(run(&ev), R::InvalidDerivedFrom, "derived_from");
    ev.derived_from = "0190b9a4-6a3e-7cc1-9a6e-1d2f3a4b5c6e".into();
    routed(run(&ev));
}

/// With a partitioned input, the `concord-key` header (which the partition exchange hashes)
/// must name the envelope's record, so per-record order does not depend on publishers.
#[test]
fn the_partition_key_header_must_name_the_record() {
    let p = seed_policy();
    let s = RouterSettings {
        check_key_header: true,
        ..settings()
    };
    let ev = valid();
    let body = ev.encode_to_vec();
    let input = |key| Input {
        routing_key: "orders.customer",
        body: &body,
        user_id: Some("orders"),
        concord_key: key,
    };
    let good = format!("customer/{}", ev.key);
    routed(route::process(&p, &s, NOW_MS, input(Some(&good))));
    for bad in [None, Some("customer/other"), Some("order/c-1")] {
        assert_dead(
            route::process(&p, &s, NOW_MS, input(bad)),
            R::KeyHeaderMismatch,
            "concord-key",
        );
    }
}

fn full_customer() -> Customer {
    Customer {
        name: Some("Ada Lovelace".into()),
        email: Some("ada@example.org".into()),
        phone: Some("+44 20 1234".into()),
        address: Some(Address {
            street: Some("1 St James's Sq".into()),
            city: Some("London".into()),
            postal_code: Some("SW1Y".into()),
            country: Some("GB".into()),
        }),
        tier: Some("gold".into()),
        delivery_status: Some("out_for_delivery".into()),
        warehouse: Some("north".into()),
        amount_paid: Some(12_345),
        open_tickets: Some(2),
        delivery_notes: Some("ring twice".into()),
        support_agent: Some("grace".into()),
        language: Some("en-GB".into()),
    }
}

#[test]
fn seed_scenario_routing() {
    let hlc = clock_now() - 77;

    // Sales changes everything it can see, plus two fields it does not own.
    let mask = [
        "name",
        "email",
        "phone",
        "address",
        "tier",
        "amount_paid",
        "language",
        "warehouse",
        "delivery_notes",
    ];
    let mut ev = event("orders", &mask, full_customer().encode_to_vec(), hlc);
    // Publishers cannot choose their rank or impersonate another writer.
    for c in ev.clocks.values_mut() {
        *c = FieldClock {
            hlc,
            system: "support".into(),
            rank: 9,
        };
    }
    ev.record_clock = Some(FieldClock {
        hlc,
        system: "zzz".into(),
        rank: 9,
    });
    ev.derived_from = "0190b9a4-0000-7000-8000-000000000000".into();
    let r = routed(run(&ev));
    assert_eq!(r.accepted, 7);
    let rejected: Vec<_> = r
        .rejected
        .iter()
        .map(|x| (x.field.as_str(), x.reason.as_str()))
        .collect();
    assert_eq!(
        rejected,
        [("delivery_notes", "not_owner"), ("warehouse", "not_owner")]
    );
    let d = decoded(&r);
    assert!(!d.contains_key("orders"), "no delivery to the source");
    let support = &d["support"];
    let delivery = &d["delivery"];
    // Projections name their fields in the policy's (alphabetical) field order.
    assert_eq!(
        support.field_mask,
        [
            "address",
            "amount_paid",
            "email",
            "language",
            "name",
            "phone",
            "tier"
        ]
    );
    // The driver gets the name but never what was paid.
    assert_eq!(
        delivery.field_mask,
        ["address", "language", "name", "phone"]
    );
    let drec = Customer::decode(delivery.record.as_slice()).unwrap();
    assert_eq!(drec.name.as_deref(), Some("Ada Lovelace"));
    assert_eq!(drec.amount_paid, None);
    assert_eq!(drec.email, None);
    assert_eq!(drec.tier, None);
    assert_eq!(drec.warehouse, None);
    assert_eq!(drec.delivery_notes, None);
    assert_eq!(drec.address, full_customer().address);
    let srec = Customer::decode(support.record.as_slice()).unwrap();
    assert_eq!(srec.amount_paid, Some(12_345));
    assert_eq!(srec.warehouse, None, "rejected fields are never delivered");
    for (copy, co_owned) in [(support, &["language", "phone"][..]), (delivery, &[][..])] {
        assert_eq!(copy.event_id, ev.event_id);
        assert_eq!(copy.origin, "orders");
        assert_eq!(copy.source, "orders");
        assert_eq!(copy.derived_from, ev.derived_from);
        assert_eq!(copy.schema_version, concord_proto::SCHEMA_VERSION);
        assert_eq!(copy.op, ev.op);
        let names: Vec<_> = copy.clocks.keys().cloned().collect();
        assert_eq!(
            names, copy.field_mask,
            "one clock per delivered field, no more"
        );
        for c in copy.clocks.values() {
            assert_eq!((c.hlc, c.system.as_str(), c.rank), (hlc, "orders", 1));
        }
        let rc = copy.record_clock.as_ref().unwrap();
        assert_eq!((rc.hlc, rc.system.as_str(), rc.rank), (hlc, "orders", 0));
        // The receiver learns its own non-zero ranks (absent = 0: it does not own the field).
        // Support co-owns phone and language with sales (last writer wins: rank 1).
        let expected: BTreeMap<String, u32> = copy
            .field_mask
            .iter()
            .filter(|f| co_owned.contains(&f.as_str()))
            .map(|f| (f.clone(), 1))
            .collect();
        assert_eq!(copy.receiver_ranks, expected);
    }

    // The driver reports progress: sales sees the status but never the warehouse.
    let mask = ["delivery_status", "warehouse", "delivery_notes"];
    let ev = event("delivery", &mask, full_customer().encode_to_vec(), hlc);
    let r = routed(run(&ev));
    assert_eq!(r.accepted, 3);
    let d = decoded(&r);
    assert_eq!(d.keys().collect::<Vec<_>>(), ["orders", "support"]);
    assert_eq!(d["orders"].field_mask, ["delivery_status"]);
    let orec = Customer::decode(d["orders"].record.as_slice()).unwrap();
    assert_eq!(orec.delivery_status.as_deref(), Some("out_for_delivery"));
    assert_eq!(orec.warehouse, None);
    assert_eq!(
        d["support"].field_mask,
        ["delivery_notes", "delivery_status"]
    );
    // delivery_notes is merged by priority: support (rank 2) over delivery (rank 1).
    let notes = &d["support"].clocks["delivery_notes"];
    assert_eq!((notes.system.as_str(), notes.rank), ("delivery", 1));
    assert_eq!(d["support"].clocks["delivery_status"].rank, 1);
    assert_eq!(
        d["support"].receiver_ranks,
        BTreeMap::from([("delivery_notes".to_owned(), 2)])
    );
    assert!(d["orders"].receiver_ranks.is_empty(), "orders owns none");

    // Support's notes reach the driver with support's rank, and the driver learns its own.
    let ev = event(
        "support",
        &["delivery_notes", "open_tickets"],
        full_customer().encode_to_vec(),
        hlc,
    );
    let r = routed(run(&ev));
    let d = decoded(&r);
    assert_eq!(d["delivery"].field_mask, ["delivery_notes"]);
    assert_eq!(d["delivery"].clocks["delivery_notes"].rank, 2);
    assert_eq!(d["delivery"].receiver_ranks["delivery_notes"], 1);
    assert_eq!(d["orders"].field_mask, ["open_tickets"]);
}

#[test]
fn a_field_named_but_absent_from_the_record_is_delivered_as_a_clear() {
    let ev = event(
        "orders",
        &["name", "email"],
        Customer::default().encode_to_vec(),
        clock_now(),
    );
    let r = routed(run(&ev));
    let d = decoded(&r);
    assert_eq!(d["support"].field_mask, ["email", "name"]);
    assert_eq!(
        Customer::decode(d["support"].record.as_slice()).unwrap(),
        Customer::default()
    );
}

#[test]
fn fields_set_but_not_named_are_ignored() {
    let ev = event(
        "orders",
        &["name"],
        full_customer().encode_to_vec(),
        clock_now(),
    );
    let r = routed(run(&ev));
    for (_, d) in decoded(&r) {
        let rec = Customer::decode(d.record.as_slice()).unwrap();
        let expect = Customer {
            name: Some("Ada Lovelace".into()),
            ..Default::default()
        };
        assert_eq!(rec, expect);
    }
}

#[test]
fn deletes_and_creates() {
    let mut del = event("orders", &[], full_customer().encode_to_vec(), 0);
    del.op = concord_proto::v1::Op::Delete as i32;
    del.record_clock = Some(clock(clock_now(), "orders"));
    let r = routed(run(&del));
    assert_eq!(r.op, Op::Delete);
    let d = decoded(&r);
    assert_eq!(d.keys().collect::<Vec<_>>(), ["delivery", "support"]);
    for copy in d.values() {
        assert!(copy.record.is_empty(), "a delete carries no record");
        assert!(copy.field_mask.is_empty() && copy.clocks.is_empty());
        assert_eq!(copy.record_clock.as_ref().unwrap().hlc, clock_now());
    }
    // Only sales deletes customers.
    let mut del = del.clone();
    del.source = "support".into();
    let r = routed(run(&del));
    assert!(r.deliveries.is_empty());
    // Support may not create: every field is rejected and nothing is delivered.
    let mut create = event(
        "support",
        &["open_tickets"],
        full_customer().encode_to_vec(),
        clock_now(),
    );
    create.op = concord_proto::v1::Op::Create as i32;
    let r = routed(run(&create));
    assert_eq!(r.accepted, 0);
    assert!(r.deliveries.is_empty());
    assert_eq!(r.rejected[0].reason.as_str(), "create_not_allowed");
}

/// The projected bytes never carry hidden fields, top-level unknown fields or unknown fields
/// nested inside a visible message field.
#[test]
fn unknown_fields_never_leak() {
    let p = seed_policy();
    let customer_desc = customer();
    // The address with an unknown field 999 inside it.
    let mut addr = Address {
        street: Some("Baker St".into()),
        city: Some("London".into()),
        ..Default::default()
    }
    .encode_to_vec();
    append_unknown(&mut addr, 999, "LEAK-NESTED-999");
    append_unknown(&mut addr, 5, "LEAK-NESTED-5");
    let rec = Customer {
        name: Some("Sherlock".into()),
        email: Some("LEAK-HIDDEN-email".into()),
        tier: Some("LEAK-HIDDEN-tier".into()),
        amount_paid: Some(4242),
        ..Default::default()
    };
    let mut bytes = rec.encode_to_vec();
    // address (field 4), length-delimited, holding the crafted bytes.
    push_varint(&mut bytes, 4 << 3 | 2);
    push_varint(&mut bytes, addr.len() as u64);
    bytes.extend_from_slice(&addr);
    // Unknown top-level fields, one of them a number the Customer will one day use.
    append_unknown(&mut bytes, 999, "LEAK-TOP-999");
    append_unknown(&mut bytes, 13, "LEAK-TOP-13");
    // A field set in the record but not named in the mask.
    bytes.extend(
        Customer {
            warehouse: Some("LEAK-UNNAMED-warehouse".into()),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    // The input does hold everything (the test would be vacuous otherwise).
    let parsed = DynamicMessage::decode(customer_desc.clone(), bytes.as_slice()).unwrap();
    assert_eq!(parsed.unknown_fields().count(), 2);
    assert!(contains(&bytes, b"LEAK-NESTED-999") && contains(&bytes, b"LEAK-TOP-999"));

    let ev = event(
        "orders",
        &["name", "address", "email", "tier", "amount_paid"],
        bytes,
        clock_now(),
    );
    let r = routed(run_with(
        &p,
        &settings(),
        "orders.customer",
        &ev.encode_to_vec(),
        Some("orders"),
    ));
    let d = decoded(&r);
    assert_eq!(d.len(), 2);
    for delivery in &r.deliveries {
        let body = &delivery.body;
        for m in ["LEAK-NESTED", "LEAK-TOP", "LEAK-UNNAMED"] {
            assert!(
                !contains(body, m.as_bytes()),
                "{m} leaked to {}",
                delivery.system
            );
        }
        let copy = ChangeEvent::decode(body.as_slice()).unwrap();
        let rec = DynamicMessage::decode(customer_desc.clone(), copy.record.as_slice()).unwrap();
        assert_eq!(
            rec.unknown_fields().count(),
            0,
            "top-level unknown fields reached {}",
            delivery.system
        );
        let address = rec.get_field_by_name("address").unwrap();
        let address = address.as_message().unwrap();
        assert_eq!(
            address.unknown_fields().count(),
            0,
            "nested unknown fields reached {}",
            delivery.system
        );
        assert_eq!(
            address.get_field_by_name("city").unwrap().as_str(),
            Some("London")
        );
        let set: Vec<String> = rec.fields().map(|(f, _)| f.name().to_owned()).collect();
        let target = p.system_id(&delivery.system).unwrap();
        let visible: Vec<&str> = p
            .entity("customer")
            .unwrap()
            .names(p.entity("customer").unwrap().visible_to(target))
            .collect();
        for f in &set {
            assert!(
                visible.contains(&f.as_str()),
                "{f} is invisible to {}",
                delivery.system
            );
        }
        assert_eq!(rec.descriptor().full_name(), "seed.v1.Customer");
    }
    // The driver sees neither the hidden strings nor what was paid.
    let to_delivery = &r
        .deliveries
        .iter()
        .find(|d| d.system == "delivery")
        .unwrap()
        .body;
    assert!(!contains(to_delivery, b"LEAK-HIDDEN"));
    let copy = ChangeEvent::decode(to_delivery.as_slice()).unwrap();
    assert_eq!(
        Customer::decode(copy.record.as_slice())
            .unwrap()
            .amount_paid,
        None
    );
    assert_eq!(copy.field_mask, ["address", "name"]);
    // Support does see email and tier, and still no unknown field.
    let to_support = &r
        .deliveries
        .iter()
        .find(|d| d.system == "support")
        .unwrap()
        .body;
    assert!(contains(to_support, b"LEAK-HIDDEN-email"));
}

#[test]
fn encode_and_decode_field_round_trip_and_strip_unknown_fields() {
    let desc = customer();
    let mut addr = Address {
        city: Some("Paris".into()),
        ..Default::default()
    }
    .encode_to_vec();
    append_unknown(&mut addr, 999, "LEAK");
    let mut bytes = Vec::new();
    push_varint(&mut bytes, 4 << 3 | 2);
    push_varint(&mut bytes, addr.len() as u64);
    bytes.extend_from_slice(&addr);
    let rec = DynamicMessage::decode(desc.clone(), bytes.as_slice()).unwrap();
    let f = field("address");
    let enc = value::encode_field(&rec, &f).unwrap();
    assert!(!contains(&enc, b"LEAK"));
    let v = value::decode_field(&desc, &f, &enc).unwrap();
    assert_eq!(
        v.as_message()
            .unwrap()
            .get_field_by_name("city")
            .unwrap()
            .as_str(),
        Some("Paris")
    );
    assert_eq!(value::encode_field(&rec, &field("name")), None);
    assert_eq!(value::decode_field(&desc, &field("name"), &enc), None);
    // Equal values encode equally whatever the input looked like: replicas compare bytes.
    let plain = Customer {
        address: Some(Address {
            city: Some("Paris".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let plain = DynamicMessage::decode(desc, plain.encode_to_vec().as_slice()).unwrap();
    assert_eq!(value::encode_field(&plain, &f).unwrap(), enc);
}

/// Routes `ev` on the resync lane for `target`.
fn resync(ev: &ChangeEvent, target: Option<&str>) -> Outcome {
    let key = format!("{}.{}", ev.source, ev.entity);
    let body = ev.encode_to_vec();
    route::process_resync(
        &seed_policy(),
        &settings(),
        NOW_MS,
        Input::new(&key, &body, Some(&ev.source)),
        target,
    )
}

fn snapshot_of(fields: &[&str]) -> ChangeEvent {
    let rec = record_with(fields, 7);
    let mut ev = event("orders", fields, rec.encode_to_vec(), clock_now());
    ev.op = concord_proto::v1::Op::Snapshot as i32;
    ev
}

#[test]
fn a_resync_input_goes_to_its_target_only_with_the_fields_it_may_see() {
    let ev = snapshot_of(&["name", "email", "amount_paid"]);
    let r = routed(resync(&ev, Some("delivery")));
    assert_eq!(r.deliveries.len(), 1);
    let d = &r.deliveries[0];
    assert_eq!(d.system, "delivery");
    let copy = ChangeEvent::decode(d.body.as_slice()).unwrap();
    assert_eq!(copy.field_mask, ["name"], "delivery sees the name only");
    assert!(copy.may_create, "orders may create customers");
    // The same input on the live lane goes to every system that sees a field.
    assert_eq!(routed(run(&ev)).deliveries.len(), 2);
}

#[test]
fn a_resync_input_without_a_valid_target_or_not_a_snapshot_is_dead_lettered() {
    let ev = snapshot_of(&["name"]);
    assert_eq!(dead_letter(resync(&ev, None)).0, R::InvalidResync);
    assert_eq!(
        dead_letter(resync(&ev, Some("billing"))).0,
        R::InvalidResync
    );
    let mut upsert = ev.clone();
    upsert.op = concord_proto::v1::Op::Upsert as i32;
    assert_eq!(
        dead_letter(resync(&upsert, Some("support"))).0,
        R::InvalidResync
    );
    // To its own source: nothing to send.
    assert!(routed(resync(&ev, Some("orders"))).deliveries.is_empty());
}

#[test]
fn a_resync_asks_the_owners_of_what_the_target_sees_and_the_creators() {
    let p = seed_policy();
    // Delivery sees orders' name, address, phone, language and its own fields; support owns
    // phone, language and delivery_notes.
    assert_eq!(
        route::resync_sources(&p, "delivery", None).unwrap(),
        ["orders", "support"]
    );
    // Orders sees delivery's status and support's fields; it creates records itself.
    assert_eq!(
        route::resync_sources(&p, "orders", Some("customer")).unwrap(),
        ["delivery", "support"]
    );
    assert!(route::resync_sources(&p, "billing", None).is_none());
    assert!(route::resync_sources(&p, "orders", Some("invoice")).is_none());
}
