//! The router process is killed (SIGKILL) mid-stream and restarted: every event is delivered,
//! none is applied twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use concord_it::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_mid_stream_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()> {
    let env = Env::seed("kill")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("router.toml");
    std::fs::write(&config, env.router_toml("127.0.0.1:0", "prefetch = 64"))?;
    let mut router =
        RouterProcess::spawn(env!("CARGO_BIN_EXE_it-router"), &seed_policy(), &config)?;
    let nodes = start_seed_nodes(&env, dir.path()).await?;
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];

    const RECORDS: usize = 20;
    const ROUNDS: usize = 15;
    let stream = EditStream::create(orders, RECORDS);
    for round in 1..=ROUNDS / 2 {
        stream.round(orders, round);
    }
    // Kill the router once it is visibly in the middle of the stream.
    support
        .wait(60, "the first deliveries", |m| m.incoming_applied >= 40)
        .await?;
    router.0.kill()?;
    router.0.wait()?;
    // Edits keep coming while no router runs: they wait in its durable input queue.
    for round in ROUNDS / 2 + 1..=ROUNDS {
        stream.round(orders, round);
    }
    let _router2 = RouterProcess::spawn(env!("CARGO_BIN_EXE_it-router"), &seed_policy(), &config)?;

    stream.await_names([support, delivery], ROUNDS, 120).await?;

    // Support sees name and email, delivery only the name: both got every event, once.
    let total_events = RECORDS * (ROUNDS + 1);
    assert_eq!(orders.metrics().published as usize, total_events);
    for node in [support, delivery] {
        let applied = node.memory.applied();
        let ids: HashSet<&str> = applied.iter().map(|a| a.event_id.as_str()).collect();
        assert_eq!(
            ids.len(),
            applied.len(),
            "{}: an event was applied twice",
            node.system
        );
        let m = node.metrics();
        eprintln!("{}: {m:?}", node.system);
    }
    stream.assert_emails([support, delivery], ROUNDS);
    for n in nodes {
        n.runner.shutdown().await?;
    }
    Ok(())
}
