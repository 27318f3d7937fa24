//! The operator commands against the real broker, router and adapters, each test in its own
//! vhost as the users of a real deployment: `concord status`, `concord dlq list|show|redrive`
//! (dead letters produced for real: permanent apply failures in a system, an input for an entity
//! the router's policy does not know yet) and `concord pause|resume`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use concord_adapter::AdapterError;
use concord_adapter::testkit::{MemorySystem, text};
use concord_admin::management::Management;
use concord_amqp::{MessageProps, Publisher, PublisherOptions};
use concord_it::{Env, Node, converge, order_policy, seed_policy, start_router};

/// Runs `concord args`; returns (exit code, stdout, stderr).
async fn concord(args: &[String]) -> anyhow::Result<(i32, String, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .env_remove("CONCORD_AMQP_URI")
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn management_url() -> String {
    std::env::var("CONCORD_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// `command` with the operator's connection flags of `env`.
fn op(env: &Env, command: &[&str]) -> Vec<String> {
    let v = env.vhost();
    let mut args: Vec<String> = command.iter().map(|s| (*s).to_owned()).collect();
    args.extend([
        "--management-url".into(),
        management_url(),
        "--user".into(),
        v.operator_user().to_owned(),
        "--password".into(),
        v.password(v.operator_user()).unwrap_or_default().to_owned(),
        "--vhost".into(),
        env.ns().to_owned(),
        "--namespace".into(),
        env.ns().to_owned(),
    ]);
    args
}

/// `command` with an administrator's connection flags (pause and resume).
fn admin(env: &Env, command: &[&str]) -> Vec<String> {
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| "guest".into());
    let mut args: Vec<String> = command.iter().map(|s| (*s).to_owned()).collect();
    args.extend([
        "--management-url".into(),
        management_url(),
        "--user".into(),
        var("CONCORD_ADMIN_USER"),
        "--password".into(),
        var("CONCORD_ADMIN_PASSWORD"),
        "--vhost".into(),
        env.ns().to_owned(),
        "--namespace".into(),
        env.ns().to_owned(),
    ]);
    args
}

/// Runs `args` until `done` holds for (exit code, stdout): the management API's statistics are
/// sampled (every 5 s by default), so what it reports lags the broker.
async fn until(
    args: &[String],
    what: &str,
    done: impl Fn(i32, &serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = concord(args).await?;
        let json: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("{what}: {out} {err}"))?;
        if done(code, &json) {
            return Ok(json);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: timed out; last answer (exit {code}): {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// System `name`'s entry of a `concord status --json` answer.
fn sys<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["systems"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["system"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// Ready messages in `queue`, read as the operator over AMQP.
async fn depth(env: &Env, queue: &str) -> anyhow::Result<u32> {
    let conn = concord_amqp::connect(&env.operator_uri(), "it-depth").await?;
    let channel = conn.open_channel().await?;
    let n = concord_amqp::queue_message_count(&channel, queue).await?;
    conn.close().await?;
    Ok(n)
}

/// How many times `node` applied each record (by canonical key).
fn applies(node: &Node, entity: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in node.memory.applied() {
        if a.entity == entity {
            *m.entry(a.key).or_insert(0) += 1;
        }
    }
    m
}

async fn seed_nodes(env: &Env, dir: &Path, policy: &Path) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for system in concord_it::SEED_SYSTEMS {
        nodes.push(
            Node::start_with_policy(env, system, MemorySystem::new(system), dir, policy).await?,
        );
    }
    Ok(nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_reported_listed_shown_and_redriven_once() -> anyhow::Result<()> {
    let env = Env::seed("ops-dlq")?;
    let dir = tempfile::tempdir()?;
    let router = start_router(&env, &seed_policy()).await?;
    let nodes = seed_nodes(&env, dir.path(), &seed_policy()).await?;
    let [_delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    // Support's system refuses the first two changes for good: they are dead-lettered.
    support.memory.fail_next_applies([
        AdapterError::permanent("support: customer table locked by an audit"),
        AdapterError::permanent("support: customer table locked by an audit"),
    ]);
    for name in ["Ada", "Grace", "Edsger"] {
        orders.memory.create(
            "customer",
            [("name", text(name)), ("email", text(&format!("{name}@x")))],
        );
    }
    support
        .wait(30, "two dead letters and one apply", |m| {
            m.dead_lettered == 2 && m.incoming_applied == 1
        })
        .await?;

    // status: support has two dead letters, apply_failed; exit status 1.
    let metrics = format!("http://{}/metrics", router.http_addr());
    let status = op(
        &env,
        &[
            "status",
            "--json",
            "--policy",
            seed_policy().to_str().context("path")?,
            "--router-metrics",
            &metrics,
        ],
    );
    // (The management API samples consumers and depths every 5 s: wait for a sample that has
    // them all.)
    let s = until(&status, "status with support's dead letters", |code, s| {
        code == 1
            && sys(s, "support")["dead_letters"]["count"] == 2
            && sys(s, "support")["inbox"]["consumers"] == 1
            && s["router"]["queues"][0]["consumers"] == 1
    })
    .await?;
    assert_eq!(sys(&s, "support")["system"], "support");
    assert_eq!(
        sys(&s, "support")["dead_letters"]["by_reason"]["apply_failed"],
        2
    );
    assert_eq!(sys(&s, "support")["inbox"]["consumers"], 1);
    assert!(s["router"]["lag"]["events"].as_u64() >= Some(3), "{s:#}");
    assert_eq!(s["router"]["queues"][0]["consumers"], 1);
    let attention = s["attention"].as_array().context("attention")?;
    assert_eq!(attention.len(), 1, "{s:#}");
    assert!(
        attention[0]
            .as_str()
            .is_some_and(|a| a.contains("system support: 2 dead letter(s)")),
        "{s:#}"
    );
    // The table says the same.
    let (code, table, _) = concord(&op(&env, &["status"])).await?;
    assert_eq!(code, 1, "{table}");
    assert!(table.contains("2 (apply_failed: 2)"), "{table}");

    // list: reason, record key, event id.
    let (code, out, err) =
        concord(&op(&env, &["dlq", "list", "--system", "support", "--json"])).await?;
    assert_eq!(code, 0, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(list.len(), 2, "{out}");
    for d in &list {
        assert_eq!(d["reason"], "apply_failed");
        assert!(
            d["detail"]
                .as_str()
                .is_some_and(|s| s.contains("locked by an audit")),
            "{d}"
        );
        assert!(
            d["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("customer/")),
            "{d}"
        );
        assert_eq!(d["source"], "orders");
    }
    let (code, out, _) = concord(&op(
        &env,
        &[
            "dlq",
            "list",
            "--system",
            "support",
            "--reason",
            "too_large",
            "--json",
        ],
    ))
    .await?;
    assert_eq!((code, out.trim()), (0, "[]"));

    // show: the envelope, its record decoded with the policy's message.
    let (code, out, err) = concord(&op(
        &env,
        &[
            "dlq",
            "show",
            "--system",
            "support",
            "--limit",
            "1",
            "--policy",
            seed_policy().to_str().context("path")?,
        ],
    ))
    .await?;
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(shown["event"]["source"], "orders");
    assert_eq!(shown["event"]["entity"], "customer");
    assert_eq!(shown["event"]["record_message"], "seed.v1.Customer");
    assert_eq!(shown["event"]["record"]["name"], "Ada", "{shown:#}");
    assert_eq!(shown["event"]["record"]["email"], "Ada@x", "{shown:#}");
    assert_eq!(shown["event"]["eventId"], list[0]["event_id"], "{shown:#}");
    // Listing and showing consumed nothing.
    let dlq = format!("{}.dlq.support", env.ns());
    assert_eq!(depth(&env, &dlq).await?, 2);

    // Redrive without the router's credentials is refused, before anything moves.
    let mut redrive = op(&env, &["dlq", "redrive", "--system", "support"]);
    redrive.extend(["--amqp-uri".into(), env.operator_uri()]);
    let (code, _, err) = concord(&redrive).await?;
    assert_eq!(code, 2);
    assert!(err.contains("router's AMQP URI"), "{err}");
    redrive.extend(["--router-uri".into(), env.router_uri()]);

    // An interrupted redrive: the first dead letter was published again (as the router would)
    // but not acked. Redriving it then sends a second copy, which the adapter drops.
    let management = Management::new(
        &management_url(),
        env.vhost().operator_user(),
        env.vhost()
            .password(env.vhost().operator_user())
            .unwrap_or_default(),
    );
    let first = management.peek(env.ns(), &dlq, 1)?;
    let body = first[0].body().context("body")?;
    let conn = concord_amqp::connect(&env.router_uri(), "it-half-redrive").await?;
    let publisher = Publisher::open(&conn, PublisherOptions::default()).await?;
    publisher
        .publish_confirmed(
            &format!("{}.routed", env.ns()),
            "support",
            &body,
            MessageProps::new().user_id(env.vhost().router_user()),
        )
        .await?;
    conn.close().await?;
    support
        .wait(30, "the half-redriven copy applied", |m| {
            m.incoming_applied == 2
        })
        .await?;

    // The cause is fixed (no more failures injected): redrive one, then the rest.
    let mut one = redrive.clone();
    one.extend(["--limit".into(), "1".into(), "--json".into()]);
    let (code, out, err) = concord(&one).await?;
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        report["moved"].as_array().map(Vec::len),
        Some(1),
        "{report:#}"
    );
    assert_eq!(report["moved"][0]["event_id"], list[0]["event_id"]);
    support
        .wait(30, "the second copy dropped as a duplicate", |m| {
            m.incoming_duplicate == 1
        })
        .await?;
    assert_eq!(depth(&env, &dlq).await?, 1);
    let mut rest = redrive.clone();
    rest.extend(["--rate".into(), "50".into()]);
    let (code, out, err) = concord(&rest).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("moved 1 of 1 dead letter(s)"), "{out}");
    converge(&[support], 30, "every customer at support", || {
        support.memory.ids("customer").len() == 3
    })
    .await?;
    assert_eq!(depth(&env, &dlq).await?, 0);
    // Each record applied exactly once at support, and only support got anything again.
    let once = applies(support, "customer");
    assert_eq!(once.len(), 3, "{once:?}");
    assert!(once.values().all(|n| *n == 1), "{once:?}");
    assert_eq!(applies(&nodes[0], "customer").values().sum::<usize>(), 3);
    for name in ["Ada", "Grace", "Edsger"] {
        let id = support
            .memory
            .find("customer", "name", name)
            .with_context(|| format!("{name} at support"))?;
        assert_eq!(support.text(&id, "email"), Some(format!("{name}@x")));
    }

    // All well again.
    until(&status, "status all well", |code, s| {
        code == 0 && sys(s, "support")["dead_letters"]["count"] == 0
    })
    .await?;
    router.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_dead_letters_are_redriven_as_their_source_after_the_policy_is_fixed()
-> anyhow::Result<()> {
    let env = Env::seed("ops-router-dlq")?;
    let dir = tempfile::tempdir()?;
    // The router runs the seed policy, which has no Order yet; the adapters already know it.
    let router = start_router(&env, &seed_policy()).await?;
    let nodes = seed_nodes(&env, dir.path(), &order_policy()).await?;
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    orders.memory.create(
        "order",
        [("customer_key", text("c-1")), ("currency", text("EUR"))],
    );
    orders.memory.create("customer", [("name", text("Ada"))]);
    converge(&[support], 30, "the customer at support", || {
        support.memory.find("customer", "name", "Ada").is_some()
    })
    .await?;
    let dlq = format!("{}.dlq.router", env.ns());
    let (code, out, err) =
        concord(&op(&env, &["dlq", "list", "--system", "router", "--json"])).await?;
    assert_eq!(code, 0, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!(list[0]["reason"], "unknown_entity");
    assert_eq!(list[0]["routing_key"], "orders.order");
    assert!(
        list[0]["key"]
            .as_str()
            .is_some_and(|k| k.starts_with("order/")),
        "{out}"
    );

    // The policy with the Order is loaded (the router restarted on it).
    router.shutdown().await?;
    let router = start_router(&env, &order_policy()).await?;

    // Redriving needs the source's identity; as another system, nothing moves.
    let mut redrive = op(&env, &["dlq", "redrive", "--system", "router", "--json"]);
    redrive.extend(["--amqp-uri".into(), env.operator_uri()]);
    let mut as_support = redrive.clone();
    as_support.extend([
        "--source".into(),
        "support".into(),
        "--source-uri".into(),
        env.system_uri("support"),
    ]);
    let (code, out, err) = concord(&as_support).await?;
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        report["moved"].as_array().map(Vec::len),
        Some(0),
        "{report:#}"
    );
    assert_eq!(report["skipped"][0]["skip"], "other_source");
    assert_eq!(depth(&env, &dlq).await?, 1);

    redrive.extend([
        "--source".into(),
        "orders".into(),
        "--source-uri".into(),
        env.system_uri("orders"),
    ]);
    let (code, out, err) = concord(&redrive).await?;
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        report["moved"].as_array().map(Vec::len),
        Some(1),
        "{report:#}"
    );
    converge(
        &[support, delivery],
        30,
        "the order at support and delivery",
        || {
            support
                .memory
                .find("order", "customer_key", "c-1")
                .is_some()
                && delivery
                    .memory
                    .find("order", "customer_key", "c-1")
                    .is_some()
        },
    )
    .await?;
    assert_eq!(depth(&env, &dlq).await?, 0);
    // Applied once, with what orders wrote.
    assert_eq!(applies(support, "order").values().sum::<usize>(), 1);
    router.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_system_accumulates_its_inbox_and_catches_up_when_resumed() -> anyhow::Result<()> {
    let env = Env::seed("ops-pause")?;
    let dir = tempfile::tempdir()?;
    let router = start_router(&env, &seed_policy()).await?;
    let nodes = seed_nodes(&env, dir.path(), &seed_policy()).await?;
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    orders.memory.create("customer", [("name", text("before"))]);
    converge(&[support], 30, "the first customer at support", || {
        support.memory.ids("customer").len() == 1
    })
    .await?;

    let (code, out, err) =
        concord(&admin(&env, &["pause", "--system", "support", "--json"])).await?;
    assert_eq!(code, 0, "{err}");
    let outcome: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(outcome["user"], env.vhost().system_user("support"));
    assert_eq!(outcome["before"], "running");
    assert!(
        outcome["closed_connections"].as_u64() >= Some(1),
        "{outcome}"
    );
    let mut ready = support.runner.ready_watch();
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| !*r))
        .await
        .context("support still consuming after the pause")??;
    // Pausing again is harmless.
    let (code, _, err) = concord(&admin(&env, &["pause", "--system", "support"])).await?;
    assert_eq!(code, 0, "{err}");

    let applied_before = support.metrics().incoming_applied;
    const N: usize = 20;
    for i in 0..N {
        orders
            .memory
            .create("customer", [("name", text(&format!("paused-{i}")))]);
    }
    // Delivery keeps syncing; support's copies wait in its inbox.
    converge(&[delivery], 60, "delivery has every customer", || {
        delivery.memory.ids("customer").len() == N + 1
    })
    .await?;
    let inbox = format!("{}.inbox.support", env.ns());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while router.metrics().deliveries_total("support") < (N + 1) as u64 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "router never delivered to support"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth(&env, &inbox).await?, N as u32);
    assert_eq!(support.metrics().incoming_applied, applied_before);
    assert!(!support.runner.is_ready());
    // status says so: no consumer on support's inbox, whose oldest message has waited since
    // the router routed it (its timestamp).
    let s = until(
        &op(&env, &["status", "--json"]),
        "status sees the paused inbox",
        |code, s| {
            let inbox = &sys(s, "support")["inbox"];
            code == 1 && inbox["consumers"] == 0 && inbox["oldest_ready_secs"].is_u64()
        },
    )
    .await?;
    let waited = sys(&s, "support")["inbox"]["oldest_ready_secs"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(waited < 600, "{s:#}");
    assert!(
        sys(&s, "delivery")["inbox"]["oldest_ready_secs"].is_null(),
        "{s:#}"
    );
    assert!(
        s["attention"][0]
            .as_str()
            .is_some_and(|a| a.contains("system support: no consumer on its inbox")),
        "{s:#}"
    );

    let (code, out, err) =
        concord(&admin(&env, &["resume", "--system", "support", "--json"])).await?;
    assert_eq!(code, 0, "{err}");
    let outcome: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(outcome["before"], "paused");
    converge(&[support], 60, "support caught up", || {
        support.memory.ids("customer").len() == N + 1
    })
    .await?;
    let once = applies(support, "customer");
    assert_eq!(once.len(), N + 1);
    assert!(once.values().all(|n| *n == 1), "{once:?}");
    assert_eq!(depth(&env, &inbox).await?, 0);
    router.shutdown().await?;
    Ok(())
}
