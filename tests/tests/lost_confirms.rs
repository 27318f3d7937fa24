//! A batch whose publisher confirms were lost with the connection must be republished with the
//! SAME event ids and clocks (from the adapter's outbox), so receivers deduplicate it and an
//! older last-writer-wins value never overwrites a newer one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, ensure};
use concord_adapter::testkit::{MemorySystem, text};
use concord_it::proxy::Proxy;
use concord_it::*;

/// concord-adapter: a batch whose publisher confirms were lost with the connection used to be
/// published again under NEW event ids and NEW clocks, so it was applied twice, and an older
/// LWW value overwrote a newer one. Now it is republished identically from the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_confirms_republish_under_new_ids() -> anyhow::Result<()> {
    let env = Env::seed("repro-confirms")?;
    let dir = tempfile::tempdir()?;
    let _router = start_router(&env, &seed_policy()).await?;
    let proxy = Proxy::start(broker_addr()?).await?;
    let orders = Node::start_with(
        fault_runner_config(&env, "orders", dir.path(), Some(proxy.addr())),
        MemorySystem::new("orders"),
    )
    .await?;
    let support = Node::start_with(
        fault_runner_config(&env, "support", dir.path(), None),
        MemorySystem::new("support"),
    )
    .await?;
    let oid = orders
        .memory
        .create("customer", [("name", text("Ada")), ("phone", text("p0"))]);
    support
        .wait(30, "the customer", |m| m.incoming_applied >= 1)
        .await?;
    let sid = support
        .memory
        .find("customer", "name", "Ada")
        .context("support has Ada")?;
    // The broker gets orders' publish and routes it, but its confirm never reaches orders.
    proxy.hold_replies();
    orders
        .memory
        .edit("customer", &oid, [("phone", text("orders-first"))]);
    support
        .wait(30, "orders-first", |m| m.incoming_applied >= 2)
        .await?;
    // Later, the customer gives support a newer number (phone is last-writer-wins).
    support
        .memory
        .edit("customer", &sid, [("phone", text("support-later"))]);
    // Orders' connection drops; it reconnects and republishes its unconfirmed batch.
    proxy.cut().await;
    proxy.release_replies();
    orders
        .wait(30, "the republish", |m| m.published >= 2 && m.incoming >= 1)
        .await?;
    orders
        .memory
        .edit("customer", &oid, [("name", text("Ada 2"))]);
    converge(&[&support], 30, "the last edit", || {
        support.memory.find("customer", "name", "Ada 2").is_some()
    })
    .await?;
    let firsts = support
        .memory
        .applied()
        .iter()
        .filter(|a| a.fields.get("phone") == Some(&text("orders-first")))
        .count();
    ensure!(
        firsts == 1,
        "support applied the same change {firsts} times"
    );
    ensure!(
        support.text(&sid, "phone").as_deref() == Some("support-later"),
        "the later write was overwritten by the older one: {:?}",
        support.text(&sid, "phone")
    );
    Ok(())
}
