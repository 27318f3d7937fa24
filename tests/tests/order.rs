//! A second entity that no Rust code knows: the shop's Order (`examples/order/order.proto`,
//! `shop.v1.Order`), routed by the router and applied by SDK adapters that both get it from the
//! policy's schema at run time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use anyhow::Context;
use concord_adapter::testkit::{MemorySystem, text};
use concord_it::*;
use prost::Message;
use prost_reflect::{DynamicMessage, Value};

/// The field names of a record.
fn names(node: &Node, id: &str) -> BTreeSet<String> {
    node.memory
        .get("order", id)
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default()
}

/// The encodings of the messages of a list value.
fn encoded(list: Option<Value>) -> Vec<Vec<u8>> {
    match list {
        Some(Value::List(items)) => items
            .iter()
            .map(|v| match v {
                Value::Message(m) => m.encode_to_vec(),
                other => panic!("not a message: {other:?}"),
            })
            .collect(),
        other => panic!("not a list: {other:?}"),
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_edit_is_routed_and_applied_with_only_the_visible_fields() -> anyhow::Result<()> {
    let env = Env::seed("order")?;
    let state = tempfile::tempdir()?;
    let policy = order_policy();
    // The only way to build an order line: its descriptor, from the schema the policy names.
    let schema = concord_schema::Deployment::load(&policy)?.schema;
    let line_desc = schema
        .pool()
        .get_message_by_name("shop.v1.Line")
        .context("shop.v1.Line in the order schema")?;
    let router = start_router(&env, &policy).await?;
    let mut nodes = Vec::new();
    for system in SEED_SYSTEMS {
        let memory = MemorySystem::new(system);
        nodes.push(Node::start_with_policy(&env, system, memory, state.path(), &policy).await?);
    }
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];

    // The salesperson places an order.
    let mut line = DynamicMessage::new(line_desc);
    line.set_field_by_name("sku", Value::String("TEA-01".into()));
    line.set_field_by_name("quantity", Value::U32(2));
    line.set_field_by_name("unit_price_cents", Value::I64(2495));
    let lines = Value::List(vec![Value::Message(line)]);
    let oid = orders.memory.create(
        "order",
        [
            ("customer_key", text("c-1")),
            ("status", Some(Value::EnumNumber(1))),
            ("total_cents", Some(Value::I64(4990))),
            ("currency", text("EUR")),
            ("lines", Some(lines.clone())),
            ("gift", Some(Value::Bool(true))),
            ("discount_rate", Some(Value::F64(0.1))),
        ],
    );
    let find = |n: &Node| n.memory.find("order", "customer_key", "c-1");
    converge(
        &[support, delivery],
        30,
        "the order at support and delivery",
        || find(support).is_some() && find(delivery).is_some(),
    )
    .await?;
    let sid = find(support).context("support's order")?;
    let did = find(delivery).context("delivery's order")?;
    // Each system holds exactly the fields it may see, with the values orders wrote.
    assert_eq!(
        names(support, &sid),
        set(&["currency", "customer_key", "lines", "status", "total_cents"])
    );
    assert_eq!(
        names(delivery, &did),
        set(&["customer_key", "gift", "lines", "status"])
    );
    assert_eq!(
        support.memory.field("order", &sid, "total_cents"),
        Some(Value::I64(4990))
    );
    assert_eq!(
        delivery.memory.field("order", &did, "status"),
        Some(Value::EnumNumber(1))
    );
    // (Compared encoded: the adapter's descriptors come from its own load of the schema.)
    assert_eq!(
        encoded(delivery.memory.field("order", &did, "lines")),
        encoded(Some(lines))
    );
    assert_eq!(
        delivery.memory.field("order", &did, "gift"),
        Some(Value::Bool(true))
    );

    // The driver agrees a slot and ships: sales and support see both, the slot only from its
    // owner.
    delivery.memory.edit(
        "order",
        &did,
        [
            ("delivery_slot", text("2024-05-01T14:00/16:00")),
            ("status", Some(Value::EnumNumber(3))),
        ],
    );
    converge(
        &[orders, support],
        30,
        "the slot at orders and support",
        || {
            orders
                .memory
                .field("order", &oid, "delivery_slot")
                .is_some()
                && support.memory.field("order", &sid, "status") == Some(Value::EnumNumber(3))
        },
    )
    .await?;
    assert_eq!(
        orders.memory.field("order", &oid, "delivery_slot"),
        Some(Value::String("2024-05-01T14:00/16:00".into()))
    );
    assert_eq!(
        orders.memory.field("order", &oid, "status"),
        Some(Value::EnumNumber(3))
    );
    // Nothing was refused or dead-lettered anywhere.
    for n in &nodes {
        assert_eq!(n.metrics().dead_lettered, 0, "{}", n.system);
    }
    for reason in [
        concord_policy::DeadLetterReason::UnknownField,
        concord_policy::DeadLetterReason::InvalidRecord,
    ] {
        assert_eq!(
            router.metrics().dead_lettered_total(reason),
            0,
            "{reason:?}"
        );
    }
    for n in nodes {
        n.runner.shutdown().await?;
    }
    router.shutdown().await
}
