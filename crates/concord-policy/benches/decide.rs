//! Benchmarks of the router's hot path: the decision for a 12-field Customer change from `orders`
//! with three subscribers (as bit sets and by field names), `route::process` end to end (decode,
//! validate, decide, project and re-encode three deliveries), the record projection (reflective
//! against the wire-level fast path) and the `ChangeEvent` codec.
//!
//! Run with `cargo bench -p concord-policy`; throughput is reported in decisions (events) per
//! second on one core.

use std::hint::black_box;

use concord_policy::route::{self, Input, Outcome, RouterSettings};
use concord_policy::{EntityPolicy, FieldSet, Op, Policy, SystemId};
use concord_proto::v1::{ChangeEvent, FieldClock};
use concord_seed_model::seed::v1::{Address, Customer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use prost_reflect::DynamicMessage;

/// Four systems: `orders` owns (or co-owns) all twelve Customer fields; the three others
/// subscribe to most of them.
const POLICY: &str = r#"
[systems.orders]
[systems.support]
[systems.delivery]
[systems.billing]

[entities.customer]
message = "seed.v1.Customer"
create = ["orders"]
delete = ["orders"]

[entities.customer.fields]
name = { owner = "orders", visible = ["*"] }
email = { owner = "orders", visible = ["support", "billing"] }
phone = { owners = ["orders", "support"], merge = "lww", visible = ["delivery", "billing"] }
address = { owner = "orders", visible = ["*"] }
tier = { owner = "orders", visible = ["support", "billing"] }
delivery_status = { owner = "orders", visible = ["support", "delivery"] }
warehouse = { owner = "orders", visible = ["delivery"] }
amount_paid = { owner = "orders", visible = ["support", "billing"] }
open_tickets = { owner = "orders", visible = ["support"] }
delivery_notes = { owners = ["support", "orders"], merge = "priority", visible = ["delivery"] }
support_agent = { owner = "orders", visible = ["support", "billing"] }
language = { owners = ["orders", "support"], merge = "lww", visible = ["*"] }
"#;

const NOW_MS: u64 = 1_700_000_000_000;

use concord_seed_model::CUSTOMER_FIELDS as FIELDS;

struct Setup {
    policy: Policy,
    source: SystemId,
    changed: FieldSet,
    body: Vec<u8>,
    event: ChangeEvent,
}

fn setup() -> Result<Setup, Box<dyn std::error::Error>> {
    let policy = Policy::from_toml(
        POLICY,
        "bench.toml",
        &prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET)?,
    )?;
    let entity = policy.entity("customer").ok_or("no customer entity")?;
    let source = policy.system_id("orders").ok_or("no orders system")?;
    let mut changed = FieldSet::default();
    for f in FIELDS {
        changed.insert(entity.field_index(f).ok_or("undeclared field")?);
    }
    let record = Customer {
        name: Some("Ada Lovelace".into()),
        email: Some("ada@example.org".into()),
        phone: Some("+44 20 7946 0000".into()),
        address: Some(Address {
            street: Some("12 St James's Square".into()),
            city: Some("London".into()),
            postal_code: Some("SW1Y 4LB".into()),
            country: Some("GB".into()),
        }),
        tier: Some("gold".into()),
        delivery_status: Some("out_for_delivery".into()),
        warehouse: Some("north-2".into()),
        amount_paid: Some(129_900),
        open_tickets: Some(1),
        delivery_notes: Some("Leave with the concierge".into()),
        support_agent: Some("grace".into()),
        language: Some("en-GB".into()),
    };
    let hlc = NOW_MS << 16;
    let event = ChangeEvent {
        event_id: "0190b9a4-6a3e-7cc1-9a6e-1d2f3a4b5c6d".into(),
        source: "orders".into(),
        entity: "customer".into(),
        key: "c-1042".into(),
        op: concord_proto::v1::Op::Upsert as i32,
        record: record.encode_to_vec(),
        field_mask: FIELDS.iter().map(|f| (*f).to_owned()).collect(),
        clocks: FIELDS
            .iter()
            .map(|f| {
                let c = FieldClock {
                    hlc,
                    system: "orders".into(),
                    rank: 0,
                };
                ((*f).to_owned(), c)
            })
            .collect(),
        schema_version: concord_proto::SCHEMA_VERSION,
        observed_at_ms: NOW_MS,
        ..Default::default()
    };
    let body = event.encode_to_vec();
    Ok(Setup {
        policy,
        source,
        changed,
        body,
        event,
    })
}

fn entity(p: &Policy) -> &EntityPolicy {
    match p.entity("customer") {
        Some(e) => e,
        None => unreachable!("checked in setup"),
    }
}

fn benches(c: &mut Criterion) {
    let s = match setup() {
        Ok(s) => s,
        Err(e) => panic!("bench setup: {e}"),
    };
    let e = entity(&s.policy);

    // Sanity: three subscribers, nothing rejected, and the router routes the event.
    let v = s.policy.decide_set(e, s.source, Op::Upsert, s.changed);
    assert_eq!(v.accepted.len(), 12);
    assert_eq!(v.deliveries(e).count(), 3);
    let settings = RouterSettings::default();
    let input = Input {
        routing_key: "orders.customer",
        body: &s.body,
        user_id: Some("orders"),
        concord_key: None,
    };
    match route::process(&s.policy, &settings, NOW_MS, input) {
        Outcome::Routed(r) => assert_eq!(r.deliveries.len(), 3),
        Outcome::DeadLetter(d) => panic!("bench event dead-lettered: {d:?}"),
    }

    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decide_set+deliveries", |b| {
        b.iter(|| {
            let v = s
                .policy
                .decide_set(e, black_box(s.source), Op::Upsert, black_box(s.changed));
            let mut n = 0;
            for (target, fields) in v.deliveries(e) {
                n += target.index() + fields.len();
            }
            black_box(n)
        });
    });
    g.bench_function("decide_names+deliveries", |b| {
        b.iter(|| {
            let names = black_box(&s.event.field_mask).iter().map(String::as_str);
            let (v, rejections) = s
                .policy
                .decide_names(e, black_box(s.source), Op::Upsert, names);
            let mut n = rejections.len();
            for (target, fields) in v.deliveries(e) {
                n += target.index() + fields.len();
            }
            black_box(n)
        });
    });
    g.finish();

    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(1));
    g.bench_function("process", |b| {
        b.iter(|| {
            black_box(route::process(
                &s.policy,
                &settings,
                NOW_MS,
                black_box(input),
            ))
        });
    });
    g.finish();

    // The record projection alone: the reflective path (decode, project, re-encode) against
    // the wire-level fast path, on the accepted fields of the 12-field Customer.
    let record = s.event.record.as_slice();
    let accepted = v.accepted;
    let reflective = || {
        DynamicMessage::decode(e.message.clone(), black_box(record))
            .map(|m| route::project(&m, e, accepted).encode_to_vec())
            .ok()
    };
    assert_eq!(
        concord_policy::bench_filter(e, record, accepted),
        reflective(),
        "the fast path must answer, with the reflective path's bytes"
    );
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("reflective", |b| b.iter(|| black_box(reflective())));
    g.bench_function("filter", |b| {
        b.iter(|| black_box(concord_policy::bench_filter(e, black_box(record), accepted)))
    });
    g.finish();

    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| black_box(black_box(&s.event).encode_to_vec()))
    });
    g.bench_function("decode", |b| {
        b.iter(|| black_box(ChangeEvent::decode(black_box(s.body.as_slice()))))
    });
    g.finish();
}

criterion_group!(decide, benches);
criterion_main!(decide);
