//! The seed scenario, runnable: a router and three adapters (orders, support, delivery) over
//! in-memory systems, syncing a Customer through the real broker.
//!
//! `cargo run -p concord-seed-demo` runs its own router in namespace `concord-demo` and deletes
//! the namespace at the end (`--keep` leaves the queues for the management UI);
//! `--external-router` uses a router that is already running in namespace `concord` (not the
//! one of `docker compose up`, which runs `concord-sql` adapters with a broker user per system).
//! The broker is `CONCORD_AMQP_URI`, by default the local guest.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use concord_adapter::testkit::{MemorySystem, text};
use concord_adapter::{RunnerConfig, RunnerHandle};
use prost_reflect::Value;

const SYSTEMS: [&str; 3] = ["orders", "support", "delivery"];
use concord_seed_model::CUSTOMER_FIELDS as FIELDS;

struct Node {
    name: &'static str,
    memory: MemorySystem,
    runner: RunnerHandle,
}

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    for a in &args {
        if !matches!(a.as_str(), "--external-router" | "--keep") {
            bail!("unknown argument {a:?} (expected --external-router and/or --keep)");
        }
    }
    let external = args.iter().any(|a| a == "--external-router");
    let keep = args.iter().any(|a| a == "--keep");
    let uri = std::env::var("CONCORD_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let namespace = if external { "concord" } else { "concord-demo" };
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.toml");
    let state = tempfile::tempdir()?;

    let router = if external {
        None
    } else {
        let config = concord_router::RouterConfig {
            amqp_uri: uri.clone(),
            namespace: namespace.into(),
            http_listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        let router = concord_router::Router::start(config, policy.clone()).await?;
        tokio::time::timeout(Duration::from_secs(30), router.wait_ready())
            .await
            .context("router not ready")??;
        say(&format!(
            "router up in namespace {namespace:?}; metrics at http://{}/metrics",
            router.http_addr()
        ));
        Some(router)
    };
    let mut nodes = Vec::new();
    for name in SYSTEMS {
        let memory = MemorySystem::new(name);
        let mut config = RunnerConfig::new(
            name,
            uri.clone(),
            state.path().join(format!("{name}.sqlite")),
            policy.clone(),
        );
        config.namespace = namespace.into();
        let mut runner = concord_adapter::start(memory.clone(), config);
        tokio::time::timeout(Duration::from_secs(30), runner.wait_ready())
            .await
            .context("adapter not ready")??;
        nodes.push(Node {
            name,
            memory,
            runner,
        });
    }
    say(&format!(
        "adapters up: {} (inboxes {namespace}.inbox.<system>)",
        SYSTEMS.join(", ")
    ));
    let [orders, support, delivery] = [&nodes[0], &nodes[1], &nodes[2]];

    say(
        "\n1. The salesperson signs Ada up in the order system (name, email, phone, tier, amount paid).",
    );
    let oid = orders.memory.create(
        "customer",
        [
            ("name", text("Ada Lovelace")),
            ("email", text("ada@example.com")),
            ("phone", text("+44 20 7946 0000")),
            ("tier", text("gold")),
            ("amount_paid", Some(Value::I64(129_900))),
        ],
    );
    let find = |n: &Node| n.memory.find("customer", "name", "Ada Lovelace");
    wait(&nodes, "Ada to reach support and delivery", || {
        find(support).is_some() && find(delivery).is_some()
    })
    .await?;
    let sid = find(support).context("support copy")?;
    let did = find(delivery).context("delivery copy")?;

    say("2. The driver's app marks the order out for delivery from warehouse W1.");
    delivery.memory.edit(
        "customer",
        &did,
        [
            ("delivery_status", text("out_for_delivery")),
            ("warehouse", text("W1")),
        ],
    );
    say(
        "3. Support logs a ticket, takes delivery instructions, and (wrongly) edits the email it does not own.",
    );
    support.memory.edit(
        "customer",
        &sid,
        [
            ("open_tickets", Some(Value::U32(1))),
            ("delivery_notes", text("Leave at the back door")),
        ],
    );
    support
        .memory
        .edit("customer", &sid, [("email", text("typo@example.com"))]);
    support
        .memory
        .edit("customer", &sid, [("support_agent", text("grace"))]);
    wait(&nodes, "the updates to arrive", || {
        support.runner.metrics().corrections >= 1
            && orders
                .memory
                .field("customer", &oid, "support_agent")
                .is_some()
            && orders
                .memory
                .field("customer", &oid, "delivery_status")
                .is_some()
            && delivery
                .memory
                .field("customer", &did, "delivery_notes")
                .is_some()
    })
    .await?;
    say(
        "4. The driver amends the delivery notes; support's notes win (priority merge) and are written back.",
    );
    delivery
        .memory
        .edit("customer", &did, [("delivery_notes", text("Ring twice"))]);
    wait(&nodes, "the driver's note to be overruled", || {
        delivery.runner.metrics().corrections >= 1
    })
    .await?;

    say("\nWhat each system holds for Ada (- = the system never received the field):\n");
    let mut header = format!("{:16}", "field");
    for n in &nodes {
        header.push_str(&format!(" | {:26}", n.name));
    }
    say(&header);
    say(&"-".repeat(header.len()));
    let ids = [oid.as_str(), sid.as_str(), did.as_str()];
    for field in FIELDS {
        let mut row = format!("{field:16}");
        for (n, id) in nodes.iter().zip(ids) {
            let v = match n.memory.field("customer", id, field) {
                Some(Value::String(s)) => s,
                Some(Value::I64(i)) => i.to_string(),
                Some(Value::U32(i)) => i.to_string(),
                Some(other) => format!("{other:?}"),
                None => "-".into(),
            };
            row.push_str(&format!(" | {v:26}"));
        }
        say(&row);
    }
    say("\n- orders sees the delivery status but never the warehouse;");
    say("- delivery sees the name and phone but never the amount paid or the email;");
    say("- support's edit of the email (owned by orders) was overruled by its adapter and orders'");
    say(
        "  value written back: it never left support (an edit of a field a system has not received",
    );
    say("  yet is published and rejected by the router instead);");
    say(
        "- the driver's later note lost to support's (priority merge) and was written back in delivery.",
    );
    let published: Vec<String> = nodes
        .iter()
        .map(|n| format!("{} {}", n.name, n.runner.metrics().published))
        .collect();
    say(&format!(
        "events published per system: {} (applied changes are never re-published: no echo)",
        published.join(", ")
    ));

    for n in nodes {
        n.runner.shutdown().await?;
    }
    if let Some(r) = router {
        r.shutdown().await?;
        if !keep {
            let conn = concord_amqp::connect(&uri, "concord-seed-demo-cleanup").await?;
            let ch = conn.open_channel().await?;
            let systems: Vec<String> = SYSTEMS.iter().map(|s| (*s).to_owned()).collect();
            concord_amqp::Topology::new(namespace)
                .delete_all(&ch, &systems)
                .await?;
        }
    }
    Ok(())
}

/// Waits until `cond` holds, re-checking whenever an adapter's counters change.
async fn wait(nodes: &[Node], what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    let cond = &cond;
    tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            let waits = nodes
                .iter()
                .map(|n| Box::pin(n.runner.wait_until(move |_| cond())));
            futures::future::select_all(waits).await;
        }
    })
    .await
    .with_context(|| format!("timed out waiting for {what}"))
}
