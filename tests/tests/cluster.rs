//! Beyond one broker: a three-node RabbitMQ cluster of the test's own
//! (`tests/scripts/rabbit-cluster.sh`: concord-c1..c3@localhost on AMQP ports 5681-5683), loaded
//! with the definitions `concord broker-defs` writes (users, permissions and the quorum-queue
//! topology, imported with `rabbitmqctl import_definitions`). Two router processes share a
//! partitioned input of quorum queues; the seed adapters connect with the list of the three
//! nodes. Mid-stream, the node every client is connected to is killed (`kill -9`); later, a
//! second node closes every connection. Syncing goes on while a majority is up, every change
//! is applied once and in per-record order, and the killed node rejoins at the end. (Messages a
//! queue had handed to a consumer on the killed node may come back after newer ones of their
//! record: the adapters count them as stale and never apply them. The test checks the order of
//! the applies, which is what a system sees.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use concord_adapter::testkit::MemorySystem;
use concord_admin::definitions::{Spec, SystemUser};
use concord_admin::{password, scratch::amqp_uri};
use concord_it::*;
use concord_router::{QueueType, RouterConfig};
use serde_json::Value;

/// AMQP ports of nodes 1, 2 and 3.
const AMQP_PORTS: [u16; 3] = [5681, 5682, 5683];
const PARTITIONS: u16 = 4;
const REPLICAS: usize = 2;
const RECORDS: usize = 30;
/// The last round of edits with all nodes up.
const R_UP: usize = 3;
/// The last round of the burst across which node 1 is killed.
const R_KILL: usize = 8;
/// The last round with node 1 down.
const R_DOWN: usize = 12;
/// The last round published before node 2 closes every connection.
const R_CLOSE: usize = 16;
/// The last round (published after the connections were closed).
const R_LAST: usize = 20;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbit-cluster.sh")
}

/// Node `i` (1..=3).
fn node(i: usize) -> String {
    format!("concord-c{i}@localhost")
}

/// The test's cluster: stopped, and its directory removed, when dropped (also when the test
/// fails).
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("concord-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = Cluster { dir };
        cluster.script(&["start"]).await?;
        Ok(cluster)
    }

    /// `rabbit-cluster.sh CMD DIR ARGS...`.
    async fn script(&self, args: &[&str]) -> anyhow::Result<()> {
        let (cmd, rest) = args.split_first().context("no command")?;
        let status = tokio::process::Command::new(script())
            .arg(cmd)
            .arg(&self.dir)
            .args(rest)
            .status()
            .await
            .context("running rabbit-cluster.sh")?;
        anyhow::ensure!(status.success(), "rabbit-cluster.sh {args:?} failed");
        Ok(())
    }

    /// `rabbitmqctl -q -n NODE ARGS...` on node `i`; its output.
    async fn ctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &node(i)])
            .args(args)
            .output()
            .await
            .context("running rabbitmqctl")?;
        anyhow::ensure!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?}: {}",
            node(i),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The running nodes, as node `i` sees them.
    async fn running(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let status: Value = serde_json::from_str(
            &self
                .ctl(i, &["cluster_status", "--formatter", "json"])
                .await?,
        )?;
        let mut nodes: Vec<String> = status["running_nodes"]
            .as_array()
            .context("no running_nodes")?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    /// The queues of `vhost` as node `i` lists them: name → (type, members, online members).
    async fn queues(
        &self,
        i: usize,
        vhost: &str,
    ) -> anyhow::Result<BTreeMap<String, (String, usize, usize)>> {
        let text = self
            .ctl(
                i,
                &[
                    "list_queues",
                    "-p",
                    vhost,
                    "name",
                    "type",
                    "members",
                    "online",
                    "--formatter",
                    "json",
                ],
            )
            .await?;
        let list: Vec<Value> = serde_json::from_str(&text)?;
        let count = |v: &Value| v.as_array().map_or(0, Vec::len);
        Ok(list
            .iter()
            .map(|q| {
                (
                    q["name"].as_str().unwrap_or_default().to_owned(),
                    (
                        q["type"].as_str().unwrap_or_default().to_owned(),
                        count(&q["members"]),
                        count(&q["online"]),
                    ),
                )
            })
            .collect())
    }

    /// What the nodes say of `vhost`'s queues: printed when a wait fails, so a failed run
    /// shows the broker's side of it.
    async fn diagnose(&self, vhost: &str) -> String {
        let mut out = String::new();
        for i in 1..=3 {
            let args = [
                "list_queues",
                "-p",
                vhost,
                "name",
                "type",
                "leader",
                "online",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ];
            match tokio::time::timeout(Duration::from_secs(20), self.ctl(i, &args)).await {
                Ok(Ok(text)) => out.push_str(&format!("queues as {} lists them:\n{text}", node(i))),
                Ok(Err(e)) => out.push_str(&format!("{}: {e:#}\n", node(i))),
                Err(_) => out.push_str(&format!("{}: no answer in 20 s\n", node(i))),
            }
        }
        out
    }

    /// `result`, with the nodes' view of `vhost`'s queues added to its error.
    async fn explained<T>(&self, vhost: &str, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            Ok(t) => Ok(t),
            Err(e) => anyhow::bail!("{e:#}\n{}", self.diagnose(vhost).await),
        }
    }

    /// The server ports of `vhost`'s client connections (which node each is on).
    async fn connection_ports(&self, i: usize, vhost: &str) -> anyhow::Result<Vec<u16>> {
        let text = self
            .ctl(
                i,
                &["list_connections", "vhost", "port", "--formatter", "json"],
            )
            .await?;
        let list: Vec<Value> = serde_json::from_str(&text)?;
        Ok(list
            .iter()
            .filter(|c| c["vhost"].as_str() == Some(vhost))
            .filter_map(|c| c["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
            .collect())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// The test's users on the cluster (what `concord broker-defs` would name for the vhost), with
/// their passwords.
struct Users {
    spec: Spec,
    passwords: BTreeMap<String, String>,
}

impl Users {
    fn new(namespace: &str) -> Users {
        let spec = Spec {
            vhost: namespace.to_owned(),
            namespace: namespace.to_owned(),
            systems: SEED_SYSTEMS
                .iter()
                .map(|s| SystemUser {
                    system: (*s).to_owned(),
                    user: format!("{namespace}.{s}"),
                })
                .collect(),
            router_user: format!("{namespace}.router"),
            operator_user: format!("{namespace}.operator"),
        };
        let mut passwords = BTreeMap::new();
        for s in &spec.systems {
            passwords.insert(s.user.clone(), password::generate());
        }
        passwords.insert(spec.router_user.clone(), password::generate());
        passwords.insert(spec.operator_user.clone(), password::generate());
        Users { spec, passwords }
    }

    /// `user`'s URIs of the three nodes, as one setting (node 1 first).
    fn uris(&self, user: &str) -> String {
        let password = self.passwords.get(user).map_or("", String::as_str);
        AMQP_PORTS
            .map(|port| {
                amqp_uri(
                    &format!("amqp://127.0.0.1:{port}"),
                    user,
                    password,
                    &self.spec.vhost,
                )
            })
            .join(",")
    }

    fn user_map(&self) -> BTreeMap<String, String> {
        self.spec
            .systems
            .iter()
            .map(|s| (s.user.clone(), s.system.clone()))
            .collect()
    }
}

/// The names of `node`'s applied events, per record: asserts that no event was applied twice
/// and that each record's rounds only increase; returns the number of records seen.
fn assert_once_in_order(node: &Node) -> anyhow::Result<usize> {
    let applied = node.memory.applied();
    let ids: HashSet<&str> = applied.iter().map(|a| a.event_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        applied.len(),
        "{}: an event was applied twice",
        node.system
    );
    let mut rounds: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for a in &applied {
        if let Some(Some(prost_reflect::Value::String(name))) = a.fields.get("name") {
            let (_, round) =
                parse_name(name).with_context(|| format!("unexpected name {name:?}"))?;
            rounds.entry(a.key.as_str()).or_default().push(round);
        }
    }
    for (key, r) in &rounds {
        assert!(
            r.windows(2).all(|w| w[0] < w[1]),
            "{}: record {key} applied out of order: {r:?}",
            node.system
        );
    }
    Ok(rounds.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_syncing_while_a_majority_is_up() -> anyhow::Result<()> {
    test_log();
    let t0 = Instant::now();
    let cluster = Cluster::start().await?;
    assert_eq!(cluster.running(1).await?, [node(1), node(2), node(3)]);
    eprintln!("cluster: three nodes up after {:?}", t0.elapsed());

    // The definitions of `concord broker-defs` for two router replicas on quorum partitions,
    // imported into the cluster.
    let namespace = unique_namespace("cluster");
    let users = Users::new(&namespace);
    let router_config = RouterConfig {
        namespace: namespace.clone(),
        queue_type: QueueType::Quorum,
        partitions: PARTITIONS,
        users: users.user_map(),
        ..RouterConfig::default()
    };
    let systems: Vec<String> = SEED_SYSTEMS.iter().map(|s| (*s).to_owned()).collect();
    let plan = router_config.topology().plan(&systems)?;
    let definitions = users.spec.definitions(&plan, &users.passwords);
    let file = cluster.dir.join("definitions.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&definitions)?)?;
    cluster
        .script(&["import", &file.display().to_string()])
        .await?;
    // Every queue (partitions, inboxes and DLQs) is a quorum queue with a member on each node.
    let queues = cluster.queues(2, &namespace).await?;
    assert_eq!(queues.len(), definitions.queues.len(), "{queues:?}");
    for (name, (kind, members, online)) in &queues {
        assert_eq!(
            (kind.as_str(), *members, *online),
            ("quorum", 3, 3),
            "queue {name}"
        );
    }
    eprintln!(
        "cluster: definitions imported ({} queues) after {:?}",
        queues.len(),
        t0.elapsed()
    );

    // Two router processes and the seed adapters, each given the three nodes (node 1 first).
    let dir = tempfile::tempdir()?;
    let ports = free_ports(REPLICAS)?;
    let mut routers = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let config = dir.path().join(format!("router-{index}.toml"));
        let mut toml = format!(
            "amqp_uri = {:?}\nnamespace = {namespace:?}\nhttp_listen = \"127.0.0.1:{port}\"\n\
             watch_policy = false\nqueue_type = \"quorum\"\nprefetch = 64\n\
             partitions = {PARTITIONS}\nreplicas = {REPLICAS}\nreplica_index = {index}\n\
             standby_delay_ms = 2000\n[users]\n",
            users.uris(&users.spec.router_user),
        );
        for (user, system) in users.user_map() {
            toml.push_str(&format!("{user:?} = {system:?}\n"));
        }
        std::fs::write(&config, toml)?;
        routers.push(RouterProcess::spawn(
            env!("CARGO_BIN_EXE_it-router"),
            &seed_policy(),
            &config,
        )?);
    }
    for &port in &ports {
        poll_until(60, &format!("router on port {port} ready"), async || {
            Ok(http_get(port, "/readyz")
                .await
                .is_some_and(|(s, _)| s == 200))
        })
        .await?;
    }
    let mut nodes = Vec::new();
    for system in SEED_SYSTEMS {
        let user = format!("{namespace}.{system}");
        let mut config = concord_adapter::RunnerConfig::new(
            system,
            users.uris(&user),
            dir.path().join(format!("{system}.sqlite")),
            seed_policy(),
        );
        config.namespace = namespace.clone();
        config.router_user = users.spec.router_user.clone();
        config.reconnect = concord_adapter::RetryConfig {
            min_delay_ms: 100,
            max_delay_ms: 1_000,
        };
        config.retry = concord_adapter::RetryConfig {
            min_delay_ms: 100,
            max_delay_ms: 1_000,
        };
        // A consumer the broker keeps registered but stops delivering to (seen once after the
        // node kill) is found out within 10 s and reopened.
        config.inbox_check_secs = 5;
        nodes.push(Node::start_with(config, MemorySystem::new(system)).await?);
    }
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    // Every client went to node 1, the first of its list.
    let on = cluster.connection_ports(2, &namespace).await?;
    assert!(
        !on.is_empty() && on.iter().all(|p| *p == AMQP_PORTS[0]),
        "{on:?}"
    );
    eprintln!(
        "cluster: routers and adapters up after {:?} ({} connections on node 1)",
        t0.elapsed(),
        on.len()
    );

    // All three nodes up.
    let stream = EditStream::create(orders, RECORDS);
    for round in 1..=R_UP {
        stream.round(orders, round);
    }
    stream.await_names([support, delivery], R_UP, 60).await?;
    eprintln!("cluster: round {R_UP} synced after {:?}", t0.elapsed());

    // A burst of edits; node 1 (every client's, and the first leader of every queue) is killed
    // while it is being routed and applied.
    let applied_before = support.metrics().incoming_applied;
    for round in R_UP + 1..=R_KILL {
        stream.round(orders, round);
    }
    support
        .wait(60, "the burst under way", |m| {
            m.incoming_applied >= applied_before + RECORDS as u64
        })
        .await?;
    let applied_at_kill = support.metrics().incoming_applied - applied_before;
    cluster.script(&["kill", "1"]).await?;
    let killed_at = t0.elapsed();
    // The edits go on while the clients fail over and the queues elect new leaders.
    for round in R_KILL + 1..=R_DOWN {
        stream.round(orders, round);
    }
    let waited = stream.await_names([support, delivery], R_DOWN, 120).await;
    let took = cluster.explained(&namespace, waited).await?;
    assert_eq!(cluster.running(2).await?, [node(2), node(3)]);
    let on = cluster.connection_ports(2, &namespace).await?;
    assert!(
        !on.is_empty() && on.iter().all(|p| *p == AMQP_PORTS[1]),
        "every client moved to node 2: {on:?}"
    );
    eprintln!(
        "cluster: node 1 killed at {killed_at:?}, {applied_at_kill} of {} support events into \
         the burst; round {R_DOWN} synced on two nodes {took:?} later",
        (R_KILL - R_UP) * RECORDS
    );

    // More edits; node 2 closes every connection while they are under way.
    for round in R_DOWN + 1..=R_CLOSE {
        stream.round(orders, round);
    }
    cluster
        .ctl(
            2,
            &["close_all_connections", "--global", "concord cluster test"],
        )
        .await?;
    for round in R_CLOSE + 1..=R_LAST {
        stream.round(orders, round);
    }
    let waited = stream.await_names([support, delivery], R_LAST, 120).await;
    let took = cluster.explained(&namespace, waited).await?;
    for n in [delivery, orders, support] {
        // Connected to node 1, then (after the kill and the close) twice more at least.
        assert!(
            n.metrics().connections >= 3,
            "{}: {:?}",
            n.system,
            n.metrics()
        );
    }
    eprintln!("cluster: connections closed on node 2; round {R_LAST} synced {took:?} later");

    // Every change applied once, in per-record order; the final values are the last round's.
    stream.assert_emails([support, delivery], R_LAST);
    for n in [support, delivery] {
        assert_eq!(assert_once_in_order(n)?, RECORDS, "{}", n.system);
        eprintln!("cluster: {} {:?}", n.system, n.metrics());
    }
    assert_eq!(
        orders.metrics().published as usize,
        RECORDS * (R_LAST + 1),
        "{:?}",
        orders.metrics()
    );

    // Node 1 comes back and rejoins: three nodes, every queue member online again, and syncing
    // goes on.
    cluster.script(&["restart", "1"]).await?;
    cluster.script(&["await", "3"]).await?;
    assert_eq!(cluster.running(1).await?, [node(1), node(2), node(3)]);
    poll_until(60, "every quorum member online again", async || {
        let queues = cluster.queues(1, &namespace).await?;
        Ok(queues
            .values()
            .all(|(_, members, online)| *online == 3 && *members == 3))
    })
    .await?;
    stream.round(orders, R_LAST + 1);
    stream
        .await_names([support, delivery], R_LAST + 1, 60)
        .await?;
    for n in [support, delivery] {
        assert_once_in_order(n)?;
    }
    eprintln!("cluster: node 1 rejoined; total {:?}", t0.elapsed());

    for n in nodes {
        n.runner.shutdown().await?;
    }
    drop(routers);
    drop(cluster);
    Ok(())
}
