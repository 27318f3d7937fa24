//! Scale-out: three router processes share a partitioned input (6 partitions, 3 replicas); one
//! hangs mid-stream (SIGSTOP, so that it surely holds unacknowledged inputs) and is then killed
//! (SIGKILL). Every event is delivered, per-record order is kept, nothing is applied twice, and
//! the survivors take over the dead router's partitions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use concord_it::*;

const PARTITIONS: usize = 6;
const REPLICAS: usize = 3;
/// The router that is killed.
const VICTIM: usize = 1;
const RECORDS: usize = 30;
const ROUNDS: usize = 20;

/// What a router's `/metrics` tells about the partitions.
#[derive(Debug, Clone, Default, PartialEq)]
struct Partitions {
    /// `concord_router_partition_events_total{partition}`.
    events: [u64; PARTITIONS],
    /// `concord_router_partition_subscribed{partition}`.
    subscribed: [bool; PARTITIONS],
    /// `concord_router_redelivered_total`.
    redelivered: u64,
}

impl Partitions {
    fn total(&self) -> u64 {
        self.events.iter().sum()
    }
}

fn parse_partitions(metrics: &str) -> Partitions {
    let mut out = Partitions::default();
    for line in metrics.lines() {
        if let Some(value) = line.strip_prefix("concord_router_redelivered_total ") {
            out.redelivered = value.trim().parse().unwrap_or(0);
            continue;
        }
        let (name, rest) = match line.split_once("{partition=\"") {
            Some(split) => split,
            None => continue,
        };
        let Some((partition, value)) = rest.split_once("\"} ") else {
            continue;
        };
        let Ok(p) = partition.parse::<usize>() else {
            continue;
        };
        if p >= PARTITIONS {
            continue;
        }
        let value: u64 = value.trim().parse().unwrap_or(0);
        match name {
            "concord_router_partition_events_total" => out.events[p] = value,
            "concord_router_partition_subscribed" => out.subscribed[p] = value == 1,
            _ => {}
        }
    }
    out
}

async fn partitions_of(port: u16) -> anyhow::Result<Partitions> {
    let (status, body) = http_get(port, "/metrics")
        .await
        .with_context(|| format!("GET /metrics of the router on port {port}"))?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(parse_partitions(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_routers_share_partitions_and_survive_a_kill() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let env = Env::seed("scaleout")?;
    let dir = tempfile::tempdir()?;
    let ports = free_ports(REPLICAS)?;
    let mut routers = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let config = dir.path().join(format!("router-{index}.toml"));
        std::fs::write(
            &config,
            env.router_toml(
                &format!("127.0.0.1:{port}"),
                &format!(
                    "prefetch = 64\npartitions = {PARTITIONS}\nreplicas = {REPLICAS}\n\
                     replica_index = {index}\nstandby_delay_ms = 2000"
                ),
            ),
        )?;
        routers.push(RouterProcess::spawn(
            env!("CARGO_BIN_EXE_it-router"),
            &seed_policy(),
            &config,
        )?);
    }
    // Ready = connected, topology declared, preferred partitions subscribed. Adapters publish
    // only after that (before the partition exchange exists, events would be unroutable).
    for &port in &ports {
        poll_until(60, &format!("router on port {port} ready"), async || {
            Ok(http_get(port, "/readyz")
                .await
                .is_some_and(|(s, _)| s == 200))
        })
        .await?;
    }
    let nodes = start_seed_nodes(&env, dir.path()).await?;
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    eprintln!("scaleout: routers and adapters up after {:?}", t0.elapsed());

    let stream = EditStream::create(orders, RECORDS);
    // Phase 1: the routers start working.
    for round in 1..=ROUNDS / 4 {
        stream.round(orders, round);
    }

    // Before the kill: every router works (on its own partitions), and every router has
    // subscribed to every partition (active or standby).
    let mut before = vec![Partitions::default(); REPLICAS];
    poll_until(
        60,
        "all three routers routing and standing by",
        async || {
            for (i, &port) in ports.iter().enumerate() {
                before[i] = partitions_of(port).await?;
            }
            Ok(before
                .iter()
                .all(|p| p.total() > 0 && p.subscribed.iter().all(|s| *s)))
        },
    )
    .await?;
    for (i, p) in before.iter().enumerate() {
        for (partition, events) in p.events.iter().enumerate() {
            if *events > 0 {
                assert_eq!(
                    partition % REPLICAS,
                    i,
                    "router {i} worked on partition {partition} before any failure: {before:?}"
                );
            }
        }
    }
    let victim_partitions: Vec<usize> = (0..PARTITIONS)
        .filter(|&p| before[VICTIM].events[p] > 0)
        .collect();
    eprintln!(
        "scaleout: before the kill ({:?}): {before:?}; support applied {}",
        t0.elapsed(),
        support.metrics().incoming_applied
    );

    // Phase 2: a burst of edits. The victim hangs (SIGSTOP) while it works through it...
    for round in ROUNDS / 4 + 1..=3 * ROUNDS / 4 {
        stream.round(orders, round);
    }
    let victim_port = ports[VICTIM];
    let victim_before = before[VICTIM].total();
    let mut victim_at_stop = 0;
    poll_until(60, "the victim working on the burst", async || {
        victim_at_stop = partitions_of(victim_port).await?.total();
        Ok(victim_at_stop >= victim_before + 5)
    })
    .await?;
    let stopped = Command::new("kill")
        .args(["-STOP", &routers[VICTIM].0.id().to_string()])
        .status()?;
    anyhow::ensure!(stopped.success(), "kill -STOP failed");
    eprintln!(
        "scaleout: router {VICTIM} hangs after {:?}, {} events into the burst; support applied {}",
        t0.elapsed(),
        victim_at_stop - victim_before,
        support.metrics().incoming_applied
    );
    // Phase 3: the stream goes on. The broker keeps pushing the hung router's partitions to it
    // (up to its prefetch, unacknowledged) while the others route theirs.
    for round in 3 * ROUNDS / 4 + 1..=ROUNDS {
        stream.round(orders, round);
    }
    let total_events = RECORDS * (ROUNDS + 1);
    orders
        .wait(60, "every event published", |m| {
            m.published as usize >= total_events
        })
        .await?;
    // ... and dies (SIGKILL): its unacknowledged inputs go back to their queues, in order, and
    // the survivors, standing by, take its partitions over.
    routers[VICTIM].0.kill()?;
    routers[VICTIM].0.wait()?;
    eprintln!("scaleout: router {VICTIM} killed after {:?}", t0.elapsed());

    stream.await_names([support, delivery], ROUNDS, 120).await?;
    eprintln!("scaleout: converged after {:?}", t0.elapsed());

    // Every event was published and delivered: the final values are the last writes.
    assert_eq!(orders.metrics().published as usize, total_events);
    stream.assert_emails([support, delivery], ROUNDS);

    for node in [support, delivery] {
        let applied = node.memory.applied();
        // Nothing applied twice.
        let ids: HashSet<&str> = applied.iter().map(|a| a.event_id.as_str()).collect();
        assert_eq!(
            ids.len(),
            applied.len(),
            "{}: an event was applied twice",
            node.system
        );
        // Per-record order: the versions of each record's name strictly increase.
        let mut versions: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for a in &applied {
            if let Some(Some(prost_reflect::Value::String(name))) = a.fields.get("name") {
                let (_, version) =
                    parse_name(name).with_context(|| format!("unexpected name {name:?}"))?;
                versions.entry(a.key.as_str()).or_default().push(version);
            }
        }
        assert_eq!(versions.len(), RECORDS, "{}", node.system);
        for (key, v) in &versions {
            assert!(
                v.windows(2).all(|w| w[0] < w[1]),
                "{}: record {key} applied out of order: {v:?}",
                node.system
            );
        }
        // No event arrived after a newer one of its record (the merge would have hidden it).
        let m = node.metrics();
        assert_eq!(m.incoming_stale, 0, "{}: {m:?}", node.system);
        eprintln!("scaleout: {} {m:?}", node.system);
    }

    // The survivors took over the dead router's partitions.
    let mut after = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        if i != VICTIM {
            after.push((i, partitions_of(port).await?));
        }
    }
    assert!(
        !victim_partitions.is_empty(),
        "the victim worked before: {before:?}"
    );
    for &p in &victim_partitions {
        let before_sum: u64 = after.iter().map(|(i, _)| before[*i].events[p]).sum();
        let after_sum: u64 = after.iter().map(|(_, a)| a.events[p]).sum();
        assert!(
            after_sum > before_sum,
            "partition {p} of the dead router was not taken over: before {before:?}, after {after:?}"
        );
    }
    // The hung router held inputs it never acknowledged: the survivors received them again.
    let redelivered: u64 = after.iter().map(|(_, a)| a.redelivered).sum();
    assert!(
        redelivered > 0,
        "no input of the hung router was redelivered to the survivors: {after:?}"
    );
    eprintln!(
        "scaleout: after the kill: {after:?}; victim's partitions {victim_partitions:?}; \
         {redelivered} redelivered; total {:?}",
        t0.elapsed()
    );

    for n in nodes {
        n.runner.shutdown().await?;
    }
    Ok(())
}
