//! Two schema versions live at once. The router and two adapters run v2 of the seed schema (a
//! field added to the Customer), a third adapter still runs v1: it keeps syncing, applying the
//! fields it knows and skipping the new one without dead-lettering. The router moved from v1 to
//! v2 by a reload, without a restart; reloads that renumber or retype a field the policy uses
//! are refused and routing goes on with the schema in force.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use anyhow::Context;
use concord_adapter::testkit::{MemorySystem, text};
use concord_it::*;
use concord_router::{ReloadOutcome, ReloadResultLabel};
use prost_reflect::Value;

/// v2 of the seed schema: `loyalty_id` (13) added to the Customer.
fn schema_v2() -> String {
    let end = "  optional string language = 12;\n}";
    assert!(concord_seed_model::CUSTOMER_PROTO.contains(end));
    concord_seed_model::CUSTOMER_PROTO.replace(
        end,
        "  optional string language = 12;\n  // Loyalty programme membership.\n  optional string loyalty_id = 13;\n}",
    )
}

/// The seed policy for v2: orders owns `loyalty_id`, support and delivery see it.
fn policy_v2() -> String {
    let anchor = "tier = { owner";
    assert!(concord_seed_model::POLICY.contains(anchor));
    concord_seed_model::POLICY.replace(
        anchor,
        "loyalty_id = { owner = \"orders\", visible = [\"support\", \"delivery\"] }\ntier = { owner",
    )
}

/// Writes the v2 deployment into `dir`; returns the policy's path.
fn write_v2(dir: &Path) -> std::path::PathBuf {
    std::fs::write(dir.join("customer.proto"), schema_v2()).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, policy_v2()).unwrap();
    policy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_adapter_keeps_syncing_with_a_v2_router_and_breaking_reloads_are_refused()
-> anyhow::Result<()> {
    let env = Env::seed("schema-versions")?;
    let dirs = tempfile::tempdir()?;
    let (v1, v2, at_router) = (
        dirs.path().join("v1"),
        dirs.path().join("v2"),
        dirs.path().join("router"),
    );
    for d in [&v1, &v2, &at_router] {
        std::fs::create_dir(d)?;
    }
    let v1_policy = concord_seed_model::write_seed(&v1)?;
    let v2_policy = write_v2(&v2);
    let router_policy = concord_seed_model::write_seed(&at_router)?;

    // The router starts on v1 and moves to v2 by a reload: no restart.
    let router = start_router(&env, &router_policy).await?;
    write_v2(&at_router);
    let outcome = router.reload().await?;
    assert!(
        matches!(outcome, ReloadOutcome::Applied { .. }),
        "{outcome:?}"
    );
    assert_eq!(router.sessions_started(), 1);
    let in_force = router.policy();
    let customer = &in_force.entity("customer").unwrap().message;
    assert!(customer.get_field_by_name("loyalty_id").is_some());

    let state = tempfile::tempdir()?;
    let start = |system: &'static str, policy: std::path::PathBuf| {
        let (env, state) = (&env, state.path().to_owned());
        async move {
            Node::start_with_policy(env, system, MemorySystem::new(system), &state, &policy).await
        }
    };
    let orders = start("orders", v2_policy.clone()).await?;
    let support = start("support", v2_policy).await?;
    let delivery = start("delivery", v1_policy).await?;

    // orders (v2) signs a customer up with the new field.
    let oid = orders.memory.create(
        "customer",
        [("name", text("Ada Lovelace")), ("loyalty_id", text("L-1"))],
    );
    let find = |n: &Node| n.memory.find("customer", "name", "Ada Lovelace");
    converge(
        &[&support, &delivery],
        30,
        "the customer at support and delivery",
        || find(&support).is_some() && find(&delivery).is_some(),
    )
    .await?;
    let sid = find(&support).context("support's copy")?;
    let did = find(&delivery).context("delivery's copy")?;
    assert_eq!(
        support.memory.field("customer", &sid, "loyalty_id"),
        Some(Value::String("L-1".into()))
    );
    // delivery (v1) applied the name and skipped the field it does not know.
    assert_eq!(delivery.memory.field("customer", &did, "loyalty_id"), None);
    assert_eq!(delivery.metrics().dead_lettered, 0);

    // delivery (v1) keeps publishing: its status reaches the v2 systems.
    delivery
        .memory
        .edit("customer", &did, [("delivery_status", text("packed"))]);
    converge(
        &[&orders, &support],
        30,
        "delivery's status at orders and support",
        || {
            orders.text(&oid, "delivery_status").as_deref() == Some("packed")
                && support.text(&sid, "delivery_status").as_deref() == Some("packed")
        },
    )
    .await?;

    // A change of only the new field reaches delivery too, which finds nothing to apply.
    let stale = delivery.metrics().incoming_stale;
    orders
        .memory
        .edit("customer", &oid, [("loyalty_id", text("L-2"))]);
    delivery
        .wait(30, "the copy of the new field", |m| {
            m.incoming_stale == stale + 1
        })
        .await?;
    converge(&[&support], 30, "the new value at support", || {
        support.text(&sid, "loyalty_id").as_deref() == Some("L-2")
    })
    .await?;
    assert_eq!(delivery.metrics().dead_lettered, 0);

    // Renumbering or retyping a field the policy uses is refused; v2 stays in force.
    for (from, to) in [
        ("warehouse = 7;", "warehouse = 70;"),
        (
            "optional int64 amount_paid = 8;",
            "optional double amount_paid = 8;",
        ),
    ] {
        std::fs::write(
            at_router.join("customer.proto"),
            schema_v2().replace(from, to),
        )?;
        match router.reload().await? {
            ReloadOutcome::Refused(problems) => {
                assert!(problems.contains("breaking schema change"), "{problems}");
            }
            other => panic!("{from} -> {to}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        router
            .metrics()
            .policy_reloads_total(ReloadResultLabel::Breaking),
        2
    );
    assert_eq!(router.sessions_started(), 1);
    orders.memory.edit(
        "customer",
        &oid,
        [
            ("name", text("Ada King")),
            ("loyalty_id", text("L-3")),
            ("amount_paid", Some(Value::I64(1250))),
        ],
    );
    converge(
        &[&support, &delivery],
        30,
        "routing on the schema in force",
        || {
            support.text(&sid, "loyalty_id").as_deref() == Some("L-3")
                && support.memory.field("customer", &sid, "amount_paid") == Some(Value::I64(1250))
                && delivery.text(&did, "name").as_deref() == Some("Ada King")
        },
    )
    .await?;
    assert_eq!(delivery.memory.field("customer", &did, "amount_paid"), None);
    for n in [&orders, &support, &delivery] {
        assert_eq!(n.metrics().dead_lettered, 0, "{}", n.system);
    }

    for n in [orders, support, delivery] {
        n.runner.shutdown().await?;
    }
    router.shutdown().await
}
