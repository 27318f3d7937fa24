//! Adding a system at runtime: with the router and the seed adapters running throughout, a
//! fourth system (billing) is added to the policy, the router reloads, billing's broker user is
//! added, its adapter starts, and `concord resync` (its library function) backfills it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use concord_adapter::testkit::{MemorySystem, text};
use concord_it::*;
use concord_proto::v1::ResyncRequest;
use concord_router::ReloadOutcome;
use prost_reflect::Value;

/// The seed policy with billing added: it sees the name, what was paid and the delivery status,
/// nothing else, and owns nothing.
fn with_billing(seed: &str) -> String {
    let replace = |s: String, from: &str, to: &str| {
        assert!(s.contains(from), "{from}");
        s.replace(from, to)
    };
    let mut s = seed.to_owned();
    s = replace(
        s,
        "[systems.delivery]",
        "[systems.billing]\ndescription = \"Invoicing\"\n\n[systems.delivery]",
    );
    s = replace(
        s,
        r#"name = { owner = "orders", visible = ["support", "delivery"] }"#,
        r#"name = { owner = "orders", visible = ["support", "delivery", "billing"] }"#,
    );
    s = replace(
        s,
        r#"amount_paid = { owner = "orders", visible = ["support"] }"#,
        r#"amount_paid = { owner = "orders", visible = ["support", "billing"] }"#,
    );
    replace(
        s,
        r#"delivery_status = { owner = "delivery", visible = ["orders", "support"] }"#,
        r#"delivery_status = { owner = "delivery", visible = ["orders", "support", "billing"] }"#,
    )
}

/// Billing's records: name → (field → value), every field it holds.
fn holdings(billing: &Node) -> BTreeMap<String, BTreeMap<String, Value>> {
    billing
        .memory
        .ids("customer")
        .into_iter()
        .filter_map(|id| {
            let fields = billing.memory.get("customer", &id)?;
            let name = match fields.get("name") {
                Some(Value::String(s)) => s.clone(),
                _ => format!("<no name: {id}>"),
            };
            Some((name, fields))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_added_at_runtime_is_backfilled_without_restarting_anything() -> anyhow::Result<()>
{
    let mut env = Env::seed("onboard")?;
    let dir = tempfile::tempdir()?;
    let seed_dir = seed_policy().parent().unwrap().to_path_buf();
    std::fs::copy(
        seed_dir.join("customer.proto"),
        dir.path().join("customer.proto"),
    )?;
    let policy = dir.path().join("policy.toml");
    let seed = std::fs::read_to_string(seed_policy())?;
    std::fs::write(&policy, &seed)?;

    let mut config = env.router_config();
    config.operator_user = env.vhost().operator_user().to_owned();
    // Billing's broker user is named `<ns>.billing`: its [users] entry is in the router's
    // configuration from the start (the map is configuration, not policy).
    config
        .users
        .insert(format!("{}.billing", env.ns()), "billing".to_owned());
    let router = start_router_with(config, &policy).await?;
    let mut nodes = Vec::new();
    for system in SEED_SYSTEMS {
        nodes.push(
            Node::start_with_policy(&env, system, MemorySystem::new(system), dir.path(), &policy)
                .await?,
        );
    }
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];

    // Before: 30 customers, 10 of them on their way.
    const BEFORE: usize = 30;
    let mut oids = Vec::new();
    for i in 0..BEFORE {
        oids.push(orders.memory.create(
            "customer",
            [
                ("name", text(&format!("customer {i}"))),
                ("email", text(&format!("c{i}@example.com"))),
                ("amount_paid", Some(Value::I64(100 + i as i64))),
                ("phone", text("+1 555 0100")),
            ],
        ));
    }
    delivery
        .wait(60, "the customers", |m| m.incoming_applied >= BEFORE as u64)
        .await?;
    for i in 0..10 {
        let did = delivery
            .memory
            .find("customer", "name", &format!("customer {i}"))
            .unwrap();
        delivery.memory.edit(
            "customer",
            &did,
            [
                ("delivery_status", text("shipped")),
                ("warehouse", text("W1")),
            ],
        );
    }
    orders
        .wait(60, "the delivery statuses", |m| m.incoming_applied >= 10)
        .await?;
    support
        .wait(60, "everything", |m| {
            m.incoming_applied >= BEFORE as u64 + 10
        })
        .await?;
    let connections: Vec<u64> = nodes.iter().map(|n| n.metrics().connections).collect();

    // Add billing: its broker user, the policy, a reload; then its adapter.
    env.add_system("billing")?;
    std::fs::write(&policy, with_billing(&seed))?;
    match router.reload().await? {
        ReloadOutcome::Applied { systems } => assert!(systems.contains(&"billing".to_owned())),
        other => panic!("reload: {other:?}"),
    }
    let billing = Node::start_with_policy(
        &env,
        "billing",
        MemorySystem::new("billing"),
        dir.path(),
        &policy,
    )
    .await?;

    // During: new customers flow to billing live, before any resync.
    for i in BEFORE..BEFORE + 5 {
        oids.push(orders.memory.create(
            "customer",
            [
                ("name", text(&format!("customer {i}"))),
                ("email", text(&format!("c{i}@example.com"))),
                ("amount_paid", Some(Value::I64(100 + i as i64))),
            ],
        ));
    }
    billing
        .wait(60, "the new customers, live", |m| m.incoming_applied >= 5)
        .await?;
    let incoming_before = billing.metrics().incoming;

    // The backfill, as `concord resync --system billing` does it.
    let id = uuid::Uuid::now_v7().to_string();
    let mut watch = concord_router::control::request_resync(
        &env.operator_uri(),
        &concord_amqp::ConnectOptions::default(),
        &concord_amqp::Topology::new(env.ns()),
        ResyncRequest {
            id: id.clone(),
            target: "billing".to_owned(),
            ..ResyncRequest::default()
        },
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(watch.systems, ["delivery", "orders"], "owners and creators");
    // An edit while the resync runs: the newest value wins wherever it lands.
    orders.memory.edit(
        "customer",
        &oids[0],
        [("amount_paid", Some(Value::I64(999)))],
    );
    let mut finished = BTreeSet::new();
    let mut reports = Vec::new();
    let progress = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(p) = watch.next(&finished).await? {
            if p.finished {
                finished.insert(p.system.clone());
            }
            reports.push(p);
        }
        anyhow::Ok(())
    });
    progress.await??;
    watch.close().await;
    let last = |system: &str| reports.iter().rev().find(|p| p.system == system).unwrap();
    // Orders wrote name and amount_paid of all 35; delivery the status of 10.
    assert_eq!((last("orders").done, last("orders").total), (35, 35));
    assert_eq!((last("delivery").done, last("delivery").total), (10, 10));

    // Billing ends with exactly what it may see of every record.
    let mut expected: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for i in 0..BEFORE + 5 {
        let mut fields = BTreeMap::new();
        let name = format!("customer {i}");
        fields.insert("name".to_owned(), Value::String(name.clone()));
        let paid = if i == 0 { 999 } else { 100 + i as i64 };
        fields.insert("amount_paid".to_owned(), Value::I64(paid));
        if i < 10 {
            fields.insert(
                "delivery_status".to_owned(),
                Value::String("shipped".to_owned()),
            );
        }
        expected.insert(name, fields);
    }
    let all = [delivery, orders, support, &billing];
    let converged = converge(&all, 60, "billing holding exactly what it may see", || {
        holdings(&billing) == expected
    })
    .await;
    assert_eq!(holdings(&billing), expected, "{converged:?}");

    // Nothing else restarted, and the others' data is unchanged.
    assert_eq!(router.sessions_started(), 1, "the router kept its session");
    let after: Vec<u64> = nodes.iter().map(|n| n.metrics().connections).collect();
    assert_eq!(
        after, connections,
        "the seed adapters kept their connections"
    );
    assert_eq!(
        support.memory.ids("customer").len(),
        BEFORE + 5,
        "support has every customer"
    );
    // Every copy of the resync (35 from orders, 10 from delivery) and the live edit arrived:
    // only then are the counters the first resync's final ones.
    billing
        .wait(60, "the resync's 45 copies and the live edit", |m| {
            m.incoming >= incoming_before + 46
        })
        .await?;
    // Running it again changes nothing: every copy carries exactly the stamps billing already
    // holds, so each one is stale and nothing is written to billing's system.
    let before_again = billing.metrics();
    let incoming = before_again.incoming;
    let values = billing.memory.applied().len();
    let mut again = concord_router::control::request_resync(
        &env.operator_uri(),
        &concord_amqp::ConnectOptions::default(),
        &concord_amqp::Topology::new(env.ns()),
        ResyncRequest {
            id: uuid::Uuid::now_v7().to_string(),
            target: "billing".to_owned(),
            ..ResyncRequest::default()
        },
        Duration::from_secs(30),
    )
    .await?;
    let mut done = BTreeSet::new();
    while let Some(p) = again.next(&done).await? {
        if p.finished {
            done.insert(p.system);
        }
    }
    again.close().await;
    billing
        .wait(60, "the second resync's 45 copies", |m| {
            m.incoming >= incoming + 45
        })
        .await?;
    for a in &billing.memory.applied()[values..] {
        let name = a
            .fields
            .get("name")
            .and_then(|v| v.as_ref())
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        for (field, value) in &a.fields {
            let want = match expected.get(&name) {
                Some(fields) => fields.get(field).cloned(),
                // A copy without the name: delivery's status, the same everywhere.
                None => Some(Value::String("shipped".to_owned())),
            };
            assert_eq!(
                want.as_ref(),
                value.as_ref(),
                "the second resync changed {field} of {name:?}"
            );
        }
    }
    assert_eq!(holdings(&billing), expected);
    let after_again = billing.metrics();
    assert_eq!(
        billing.memory.applied().len(),
        values,
        "the second resync wrote to billing's system"
    );
    assert_eq!(after_again.incoming_applied, before_again.incoming_applied);
    assert!(
        after_again.incoming_stale >= before_again.incoming_stale + 45,
        "{before_again:?} then {after_again:?}"
    );

    billing.runner.shutdown().await?;
    for n in nodes {
        n.runner.shutdown().await?;
    }
    router.shutdown().await?;
    Ok(())
}
