//! The seed scenario end to end over the real broker: orders, support and delivery adapters
//! (SDK runner over in-memory systems) and the router, each test in its own namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Context;
use concord_adapter::testkit::text;
use concord_it::*;
use prost_reflect::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_ownership_visibility_and_no_echo() -> anyhow::Result<()> {
    let run = SeedRun::start("seed").await?;
    let (router, nodes) = (&run.router, &run.nodes);
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];

    // The salesperson signs up a customer.
    let oid = orders.memory.create(
        "customer",
        [
            ("name", text("Ada Lovelace")),
            ("email", text("ada@example.com")),
            ("amount_paid", Some(Value::I64(1250))),
            ("phone", text("+44 20 7946 0000")),
        ],
    );
    support
        .wait(30, "the new customer", |m| m.incoming_applied >= 1)
        .await?;
    delivery
        .wait(30, "the new customer", |m| m.incoming_applied >= 1)
        .await?;
    let sid = support
        .memory
        .find("customer", "name", "Ada Lovelace")
        .expect("support has the customer");
    let did = delivery
        .memory
        .find("customer", "name", "Ada Lovelace")
        .expect("delivery has the customer");
    assert_eq!(
        support.text(&sid, "email").as_deref(),
        Some("ada@example.com")
    );
    assert_eq!(
        support.memory.field("customer", &sid, "amount_paid"),
        Some(Value::I64(1250))
    );
    // The driver sees the customer's name and phone, but never what they paid nor the email.
    assert_eq!(
        delivery.text(&did, "phone").as_deref(),
        Some("+44 20 7946 0000")
    );
    assert_eq!(delivery.memory.field("customer", &did, "amount_paid"), None);
    assert_eq!(delivery.memory.field("customer", &did, "email"), None);

    // The driver's app reports progress and the warehouse.
    delivery.memory.edit(
        "customer",
        &did,
        [
            ("delivery_status", text("out_for_delivery")),
            ("warehouse", text("W1")),
        ],
    );
    orders
        .wait(30, "the delivery status", |m| m.incoming_applied >= 1)
        .await?;
    support
        .wait(30, "the delivery status", |m| m.incoming_applied >= 2)
        .await?;
    // The salesperson sees the delivery status but not the warehouse.
    assert_eq!(
        orders.text(&oid, "delivery_status").as_deref(),
        Some("out_for_delivery")
    );
    assert_eq!(orders.memory.field("customer", &oid, "warehouse"), None);
    assert_eq!(support.memory.field("customer", &sid, "warehouse"), None);

    // Support edits the email, which orders owns: support holds orders' value, and the router
    // told it its rank for the field (0: not an owner), so the edit is overruled on the spot and
    // orders' value is written back; nothing is published.
    support.memory.edit(
        "customer",
        &sid,
        [("email", text("someone-else@example.com"))],
    );
    support
        .wait(30, "the correction", |m| m.corrections >= 1)
        .await?;
    assert_eq!(
        support.text(&sid, "email").as_deref(),
        Some("ada@example.com")
    );
    // Support edits the warehouse, which it neither owns nor sees: published, and rejected by
    // the router. Then a field it owns (open_tickets): on the same record, it arrives after the
    // rejected one was decided.
    support
        .memory
        .edit("customer", &sid, [("warehouse", text("W9"))]);
    support
        .memory
        .edit("customer", &sid, [("open_tickets", Some(Value::U32(2)))]);
    orders
        .wait(30, "the open tickets", |m| m.incoming_applied >= 2)
        .await?;
    assert_eq!(
        orders.memory.field("customer", &oid, "open_tickets"),
        Some(Value::U32(2))
    );
    assert_eq!(
        orders.text(&oid, "email").as_deref(),
        Some("ada@example.com")
    );
    assert_eq!(
        delivery.text(&did, "warehouse").as_deref(),
        Some("W1"),
        "a non-owner's change spread"
    );
    let metrics = router.metrics().encode();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("concord_router_fields_total")
                && l.contains("decision=\"rejected\"")
                && l.contains("not_owner")
                && !l.ends_with(" 0")),
        "rejection not counted:\n{metrics}"
    );

    // Nothing any system received ever contained a field it may not see.
    for apply in delivery.memory.applied() {
        for hidden in ["amount_paid", "email", "warehouse", "tier", "open_tickets"] {
            assert!(
                !apply.fields.contains_key(hidden),
                "delivery received {hidden}: {apply:?}"
            );
        }
    }
    for apply in orders.memory.applied() {
        assert!(
            !apply.fields.contains_key("warehouse"),
            "orders received the warehouse: {apply:?}"
        );
        assert!(
            !apply.fields.contains_key("email"),
            "the rejected email reached orders"
        );
    }

    // No echo: every user edit was published exactly once, applying a change published nothing.
    // (A publish counts once its confirm is processed, which may come after the copies were
    // applied elsewhere: wait for the counts, then check they are exact.)
    for (node, n) in [(orders, 1), (delivery, 1), (support, 2)] {
        node.wait(30, "the publishes confirmed", |m| m.published >= n)
            .await?;
    }
    assert_eq!(orders.metrics().published, 1);
    assert_eq!(delivery.metrics().published, 1);
    assert_eq!(support.metrics().published, 2);
    assert!(
        support.metrics().local_echoes >= 1,
        "the applied changes were not seen as echoes"
    );
    assert_eq!(router.metrics().events_in_sum(), 4);
    // One more round trip: the counts move by exactly that one edit.
    orders
        .memory
        .edit("customer", &oid, [("name", text("Ada King"))]);
    delivery
        .wait(30, "the new name", |m| m.incoming_applied >= 2)
        .await?;
    support
        .wait(30, "the new name", |m| m.incoming_applied >= 3)
        .await?;
    assert_eq!(delivery.text(&did, "name").as_deref(), Some("Ada King"));
    orders
        .wait(30, "the publish confirmed", |m| m.published >= 2)
        .await?;
    assert_eq!(
        [
            orders.metrics().published,
            delivery.metrics().published,
            support.metrics().published
        ],
        [2, 1, 2]
    );
    assert_eq!(router.metrics().events_in_sum(), 5);

    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_of_a_shared_field_converge() -> anyhow::Result<()> {
    let run = SeedRun::start("lww").await?;
    let nodes = &run.nodes;
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    let oid = orders
        .memory
        .create("customer", [("name", text("Grace")), ("phone", text("1"))]);
    support
        .wait(30, "the customer", |m| m.incoming_applied >= 1)
        .await?;
    let sid = support
        .memory
        .find("customer", "name", "Grace")
        .expect("support has it");
    // Both owners of `phone` change it at once, several times.
    for i in 0..20 {
        orders
            .memory
            .edit("customer", &oid, [("phone", text(&format!("orders-{i}")))]);
        support
            .memory
            .edit("customer", &sid, [("phone", text(&format!("support-{i}")))]);
    }
    // Wait until the three copies agree (each wakes on every applied change).
    let agreed = || {
        let o = orders.text(&oid, "phone");
        let s = support.text(&sid, "phone");
        let d = delivery
            .memory
            .find("customer", "name", "Grace")
            .and_then(|id| delivery.text(&id, "phone"));
        o.is_some() && o == s && o == d
    };
    converge(
        &[orders, support, delivery],
        30,
        "the three copies of the phone to agree",
        agreed,
    )
    .await
    .with_context(|| {
        format!(
            "orders {:?}, support {:?}, delivery {:?}",
            orders.text(&oid, "phone"),
            support.text(&sid, "phone"),
            delivery
                .memory
                .find("customer", "name", "Grace")
                .and_then(|id| delivery.text(&id, "phone"))
        )
    })?;
    let winner = orders.text(&oid, "phone").unwrap_or_default();
    assert!(
        winner.ends_with("-19"),
        "the last writer's value wins: {winner}"
    );
    run.shutdown().await
}
