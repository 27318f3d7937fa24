//! The phases of a run and the report.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use concord_amqp::{Connection, Publisher, PublisherOptions, Topology, connect, connection_name};
use concord_policy::route::{self, Input, Outcome};
use concord_router::RouterConfig;
use serde::Serialize;

use crate::child::{ChildProc, Role};
use crate::event::{self, EventFactory};
use crate::load::{self, Pace, Percentiles, SendClock};
use crate::procfs::{self, Machine};
use crate::roles::ChildArgs;
use crate::{Cli, Tuning};

/// The JSON object printed as the last line of stdout. Keys are stable: later runs are
/// compared against them. Figures of a kind are the best of its rounds: throughput is the
/// highest events/s; latency is the round with the lowest p99 (its p50 and max with it).
#[derive(Debug, Serialize)]
pub struct Report {
    pub events: u64,
    pub fanout: usize,
    /// Encoded size of one input event.
    pub message_bytes: usize,
    /// How rounds are combined: `best`.
    pub aggregate: &'static str,
    pub rounds: usize,
    pub publishers: usize,
    pub keys: u64,
    /// Events/s: N / (first publish → last message received in the last of the K inboxes).
    pub router_events_per_s: f64,
    pub baseline_events_per_s: f64,
    /// router / baseline.
    pub ratio: f64,
    /// End-to-end latency (publish → subscriber receipt, per delivery) through the router at
    /// `offered_rate_per_s`.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub baseline_p50_ms: f64,
    pub baseline_p99_ms: f64,
    pub baseline_max_ms: f64,
    /// Router p99 − baseline p99.
    pub p99_added_ms: f64,
    /// Median over rounds of the router's p99 − median of the baseline's: less sensitive than
    /// the best round to one lucky round of either kind.
    pub p99_added_median_ms: f64,
    /// Half the router's measured maximum.
    pub offered_rate_per_s: f64,
    pub latency_events: u64,
    /// Peak RSS of the router child over the throughput and latency rounds.
    pub router_peak_rss_mib: f64,
    pub baseline_peak_rss_mib: f64,
    /// CPU time (user + system) of the child per event, in the best throughput round.
    pub router_cpu_us_per_event: f64,
    pub baseline_cpu_us_per_event: f64,
    /// CPU time of the broker (`beam.smp`) per event in those rounds, if found.
    pub broker_cpu_us_per_event_router: Option<f64>,
    pub broker_cpu_us_per_event_baseline: Option<f64>,
    /// CPU time of the load generator and subscribers (this process) per event.
    pub loadgen_cpu_us_per_event_router: f64,
    pub loadgen_cpu_us_per_event_baseline: f64,
    pub router_rounds_events_per_s: Vec<f64>,
    pub baseline_rounds_events_per_s: Vec<f64>,
    pub router_rounds_p99_ms: Vec<f64>,
    pub baseline_rounds_p99_ms: Vec<f64>,
    /// With `--backlog M`: M, the router's peak RSS while draining it, and the drain rate.
    pub backlog_events: Option<u64>,
    pub router_backlog_peak_rss_mib: Option<f64>,
    pub backlog_fill_events_per_s: Option<f64>,
    pub backlog_drain_events_per_s: Option<f64>,
    pub prefetch: u16,
    pub confirm_window: usize,
    pub ack_batch: usize,
    /// Async runtime worker threads of the router and the forwarder.
    pub worker_threads: usize,
    pub machine: Machine,
    /// 1-minute load average when the run started.
    pub load_avg_at_start: Option<f64>,
    /// The most CPU (in cores, averaged over a round) that other processes of the machine used
    /// during any round: above ~0.1 the figures are disturbed by something else running.
    pub background_cpu_cores_max: f64,
    /// Rounds during which the broker raised a resource alarm (their figures are unusable).
    pub alarm_rounds: usize,
    /// Prefix of every namespace the run declared (all deleted at the end).
    pub namespace: String,
}

/// The result of one round.
#[derive(Debug, Clone)]
struct Round {
    events_per_s: f64,
    child_cpu: Duration,
    broker_cpu: Option<Duration>,
    loadgen_cpu: Duration,
    /// CPU cores used by other processes of the machine (not the child, the broker or this
    /// process) during the round, on average: noise that biases the figures.
    background_cores: f64,
    /// The broker raised a resource alarm during the round.
    alarm: bool,
    peak_rss_kib: u64,
    latency: Option<Percentiles>,
}

/// Shared state of a run.
struct Ctx {
    uri: String,
    /// The broker user the load generator publishes as.
    login: String,
    base: String,
    fanout: usize,
    tuning: Tuning,
    systems: Vec<String>,
    policy_path: PathBuf,
    factory: Arc<EventFactory>,
    admin: Connection,
    sink_conn: Connection,
    pub_conn: Connection,
    publishers: Vec<Publisher>,
    broker_pid: Option<u32>,
    /// Set whenever the broker blocks the load generator's publishing connection (memory or
    /// disk alarm); a round during which it was set is disturbed.
    alarm: Arc<AtomicBool>,
    /// Namespaces declared and not deleted yet.
    live: Arc<Mutex<Vec<Topology>>>,
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn per_event_us(cpu: Duration, events: u64) -> f64 {
    round2(cpu.as_secs_f64() * 1e6 / events.max(1) as f64)
}

impl Ctx {
    fn subscribers_inboxes(&self, topology: &Topology) -> Vec<String> {
        event::subscribers(self.fanout)
            .iter()
            .map(|s| topology.inbox(s))
            .collect()
    }

    async fn declare(&self, namespace: String) -> anyhow::Result<Topology> {
        let topology = Topology::new(namespace);
        if let Ok(mut live) = self.live.lock() {
            live.push(topology.clone());
        }
        let channel = self.admin.open_channel().await?;
        topology
            .declare_router(&channel, &self.systems)
            .await
            .with_context(|| format!("declaring namespace {}", topology.namespace()))?;
        let _ = channel.close().await;
        Ok(topology)
    }

    async fn delete(&self, topology: &Topology) -> anyhow::Result<()> {
        let channel = self.admin.open_channel().await?;
        topology.delete_all(&channel, &self.systems).await?;
        let _ = channel.close().await;
        if let Ok(mut live) = self.live.lock() {
            live.retain(|t| t != topology);
        }
        Ok(())
    }

    fn child_args(&self, topology: &Topology) -> Vec<String> {
        ChildArgs {
            amqp_uri: self.uri.clone(),
            namespace: topology.namespace().to_owned(),
            policy: Some(self.policy_path.clone()),
            fanout: self.fanout,
            prefetch: self.tuning.prefetch,
            confirm_window: self.tuning.confirm_window,
            ack_batch: self.tuning.ack_batch,
            worker_threads: self.tuning.worker_threads,
        }
        .to_args()
    }

    fn broker_cpu(&self) -> Option<Duration> {
        self.broker_pid.and_then(procfs::cpu_time)
    }

    /// One round: fresh namespace, subscribers, the child, the load, teardown.
    async fn round(
        &self,
        role: Role,
        label: &str,
        n: u64,
        pace: Pace,
        measure_latency: bool,
    ) -> anyhow::Result<Round> {
        let topology = self.declare(format!("{}.{label}", self.base)).await?;
        let clock = measure_latency.then(|| SendClock::new(n));
        let sinks = load::spawn_sinks(
            &self.sink_conn,
            &self.subscribers_inboxes(&topology),
            n,
            self.tuning.prefetch,
            self.tuning.ack_batch,
            clock.clone(),
        )
        .await?;
        let child = ChildProc::spawn(role, &self.child_args(&topology)).await?;
        let me = std::process::id();
        let cpu0 = child.cpu();
        let broker0 = self.broker_cpu();
        let loadgen0 = procfs::cpu_time(me).unwrap_or_default();
        let busy0 = procfs::machine_busy();
        self.alarm
            .store(self.pub_conn.is_blocked(), Ordering::Relaxed);
        let start = Instant::now();
        load::publish(
            &self.publishers,
            &self.factory,
            &topology.ingress_exchange(),
            &self.login,
            n,
            pace,
            clock,
        )
        .await?;
        let reports = load::join_sinks(sinks).await?;
        let end = reports.iter().map(|r| r.last_at).max().unwrap_or(start);
        let child_cpu = child.cpu().saturating_sub(cpu0);
        let broker_cpu = self
            .broker_cpu()
            .zip(broker0)
            .map(|(b1, b0)| b1.saturating_sub(b0));
        let loadgen_cpu = procfs::cpu_time(me)
            .unwrap_or_default()
            .saturating_sub(loadgen0);
        let busy = procfs::machine_busy()
            .zip(busy0)
            .map(|(b1, b0)| b1.saturating_sub(b0));
        let peak_rss_kib = child.peak_rss_kib();
        let alarm = self.alarm.load(Ordering::Relaxed);
        child.stop().await?;
        self.delete(&topology).await?;
        let elapsed = end.saturating_duration_since(start).as_secs_f64().max(1e-6);
        let background_cores = busy.map_or(0.0, |busy| {
            let ours = child_cpu + broker_cpu.unwrap_or_default() + loadgen_cpu;
            busy.saturating_sub(ours).as_secs_f64() / start.elapsed().as_secs_f64().max(1e-6)
        });
        let latency = measure_latency.then(|| {
            Percentiles::of(
                reports
                    .into_iter()
                    .flat_map(|r| r.latencies_us.into_iter())
                    .collect(),
            )
        });
        Ok(Round {
            events_per_s: n as f64 / elapsed,
            child_cpu,
            broker_cpu,
            loadgen_cpu,
            background_cores,
            alarm,
            peak_rss_kib,
            latency,
        })
    }

    /// Fills the router queue with `m` events with no router running, then starts the
    /// router and records its peak RSS while it drains them to the (consumed) inboxes.
    async fn backlog(&self, m: u64) -> anyhow::Result<(u64, f64, f64)> {
        let topology = self.declare(format!("{}.backlog", self.base)).await?;
        eprintln!(
            "backlog: filling {} with {m} events",
            topology.router_queue()
        );
        let fill_start = Instant::now();
        load::publish(
            &self.publishers,
            &self.factory,
            &topology.ingress_exchange(),
            &self.login,
            m,
            Pace::Flat,
            None,
        )
        .await?;
        let fill_rate = m as f64 / fill_start.elapsed().as_secs_f64().max(1e-6);
        eprintln!("backlog: filled at {fill_rate:.0} events/s; starting the router");
        let sinks = load::spawn_sinks(
            &self.sink_conn,
            &self.subscribers_inboxes(&topology),
            m,
            self.tuning.prefetch,
            self.tuning.ack_batch,
            None,
        )
        .await?;
        let child = ChildProc::spawn(Role::Router, &self.child_args(&topology)).await?;
        let start = Instant::now();
        let reports = load::join_sinks(sinks).await?;
        let end = reports.iter().map(|r| r.last_at).max().unwrap_or(start);
        let peak = child.peak_rss_kib();
        child.stop().await?;
        self.delete(&topology).await?;
        let drain_rate = m as f64 / end.saturating_duration_since(start).as_secs_f64().max(1e-6);
        eprintln!(
            "backlog: drained at {drain_rate:.0} events/s, router peak RSS {:.1} MiB",
            mib(peak)
        );
        Ok((peak, fill_rate, drain_rate))
    }
}

/// A flag set whenever the broker blocks `conn` (resource alarm).
fn watch_alarm(conn: &Connection) -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(conn.is_blocked()));
    let mut blocked = conn.watch_blocked()?;
    let set = flag.clone();
    tokio::spawn(async move {
        while blocked.changed().await.is_ok() {
            if let Some(reason) = blocked.borrow_and_update().as_ref() {
                eprintln!("WARNING: the broker blocks publishing ({reason}): figures disturbed");
                set.store(true, Ordering::Relaxed);
            }
        }
    });
    Ok(flag)
}

/// Deletes every namespace still declared (after an error or an interrupt).
async fn cleanup(uri: &str, systems: &[String], live: &Mutex<Vec<Topology>>) {
    let left: Vec<Topology> = match live.lock() {
        Ok(mut live) => std::mem::take(&mut *live),
        Err(_) => return,
    };
    if left.is_empty() {
        return;
    }
    let Ok(conn) = connect(uri, &connection_name("concord-bench/cleanup")).await else {
        eprintln!("cleanup: cannot connect; namespaces left: {left:?}");
        return;
    };
    for topology in left {
        let deleted = match conn.open_channel().await {
            Ok(channel) => topology.delete_all(&channel, systems).await.is_ok(),
            Err(_) => false,
        };
        if !deleted {
            eprintln!(
                "cleanup: could not delete namespace {}",
                topology.namespace()
            );
        }
    }
    let _ = conn.close().await;
}

fn best_throughput(rounds: &[Round]) -> Option<&Round> {
    rounds
        .iter()
        .max_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s))
}

/// The median of the rounds' p99 (the mean of the middle two for an even count).
fn median_p99(rounds: &[Round]) -> f64 {
    let mut p99: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.latency)
        .map(|l| l.p99_ms)
        .collect();
    p99.sort_by(f64::total_cmp);
    match p99.len() {
        0 => 0.0,
        n if n % 2 == 1 => p99[n / 2],
        n => (p99[n / 2 - 1] + p99[n / 2]) / 2.0,
    }
}

fn best_latency(rounds: &[Round]) -> Percentiles {
    rounds
        .iter()
        .filter_map(|r| r.latency)
        .min_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
        .unwrap_or_default()
}

/// Runs the whole benchmark; on error or Ctrl-C, children are killed and every namespace
/// declared is deleted.
pub async fn run(cli: &Cli, tuning: Tuning) -> anyhow::Result<Report> {
    let fanout = usize::from(cli.fanout);
    let systems = event::systems(fanout);
    let live = Arc::new(Mutex::new(Vec::new()));
    let result = tokio::select! {
        r = run_inner(cli, tuning, live.clone()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    cleanup(&cli.amqp_uri, &systems, &live).await;
    result
}

async fn run_inner(
    cli: &Cli,
    tuning: Tuning,
    live: Arc<Mutex<Vec<Topology>>>,
) -> anyhow::Result<Report> {
    let fanout = usize::from(cli.fanout);
    let n = cli.events.unwrap_or(1);
    let latency_n = cli.latency_events.unwrap_or(n).max(1);
    let rounds = usize::from(cli.rounds);
    let machine = procfs::machine();
    let load_avg_at_start = procfs::load_average();
    let base = format!(
        "concord-bench-{}-{}",
        std::process::id(),
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );

    // The policy, checked with the router's own core before anything runs.
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(dir.path().join("customer.proto"), event::SCHEMA)
        .context("writing the schema")?;
    std::fs::write(&policy_path, event::policy_toml(fanout)).context("writing the policy")?;
    let policy = concord_schema::Deployment::load(&policy_path)?.policy;
    let factory = Arc::new(EventFactory::new(cli.keys, cli.size));
    let sample = factory.encode(0, load::now_ms());
    match route::process(
        &policy,
        &RouterConfig::default().settings(),
        load::now_ms(),
        Input::new(event::ROUTING_KEY, &sample.body, Some(event::SOURCE)),
    ) {
        Outcome::Routed(r) if r.deliveries.len() == fanout && r.rejected.is_empty() => {}
        other => anyhow::bail!("the sample event does not fan out to {fanout}: {other:?}"),
    }
    let message_bytes = sample.body.len();

    let uri = cli.amqp_uri.clone();
    let admin = connect(&uri, &connection_name("concord-bench/admin")).await?;
    let sink_conn = connect(&uri, &connection_name("concord-bench/subscribers")).await?;
    let pub_conn = connect(&uri, &connection_name("concord-bench/publishers")).await?;
    let mut publishers = Vec::new();
    for _ in 0..cli.publishers {
        publishers.push(
            Publisher::open(
                &pub_conn,
                PublisherOptions {
                    window: tuning.confirm_window,
                },
            )
            .await?,
        );
    }
    let alarm = watch_alarm(&pub_conn)?;
    let ctx = Ctx {
        login: concord_amqp::login_of(&uri)?,
        uri,
        base: base.clone(),
        fanout,
        tuning,
        systems: event::systems(fanout),
        policy_path,
        factory,
        admin,
        sink_conn,
        pub_conn,
        publishers,
        broker_pid: procfs::broker_pid(),
        alarm,
        live,
    };
    eprintln!(
        "concord-bench: {n} events, fanout {fanout}, {message_bytes} B/event, {} publishers, \
         prefetch {}, confirm window {}, ack batch {}, {} worker thread(s); {} × {} core(s); \
         load average {:.2}; namespace {base}",
        cli.publishers,
        tuning.prefetch,
        tuning.confirm_window,
        tuning.ack_batch,
        tuning.worker_threads,
        machine.cpu_model,
        machine.nproc,
        load_avg_at_start.unwrap_or(f64::NAN)
    );

    // Phase 1: throughput, alternating baseline and router.
    let mut router_tp = Vec::new();
    let mut baseline_tp = Vec::new();
    for r in 0..rounds {
        for role in [Role::Forwarder, Role::Router] {
            let label = format!("{}-t{r}", short(role));
            let round = ctx.round(role, &label, n, Pace::Flat, false).await?;
            eprintln!(
                "throughput {r} {:<9}: {:>8.0} events/s  cpu {:>6.1} µs/event  broker {:>6.1} µs/event  loadgen {:>6.1} µs/event  peak RSS {:.1} MiB  background {:.2} cores",
                role.as_str(),
                round.events_per_s,
                per_event_us(round.child_cpu, n),
                round.broker_cpu.map_or(f64::NAN, |c| per_event_us(c, n)),
                per_event_us(round.loadgen_cpu, n),
                mib(round.peak_rss_kib),
                round.background_cores
            );
            if round.alarm {
                eprintln!("  (broker resource alarm during this round)");
            }
            match role {
                Role::Router => router_tp.push(round),
                Role::Forwarder => baseline_tp.push(round),
            }
        }
    }
    let best_router = best_throughput(&router_tp)
        .cloned()
        .context("no router round")?;
    let best_baseline = best_throughput(&baseline_tp)
        .cloned()
        .context("no baseline round")?;
    let offered = (best_router.events_per_s / 2.0).max(1.0);
    eprintln!(
        "throughput (best): router {:.0}/s, baseline {:.0}/s, ratio {:.3}",
        best_router.events_per_s,
        best_baseline.events_per_s,
        best_router.events_per_s / best_baseline.events_per_s
    );

    // Phase 2: latency at half the router's maximum, same alternation.
    let mut router_lat = Vec::new();
    let mut baseline_lat = Vec::new();
    for r in 0..rounds {
        for role in [Role::Forwarder, Role::Router] {
            let label = format!("{}-l{r}", short(role));
            let round = ctx
                .round(role, &label, latency_n, Pace::Rate(offered), true)
                .await?;
            let p = round.latency.unwrap_or_default();
            eprintln!(
                "latency {r} {:<9} at {offered:.0}/s: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} deliveries)  cpu {:.1} µs/event  peak RSS {:.1} MiB  background {:.2} cores",
                role.as_str(),
                p.p50_ms,
                p.p99_ms,
                p.max_ms,
                p.samples,
                per_event_us(round.child_cpu, latency_n),
                mib(round.peak_rss_kib),
                round.background_cores
            );
            if round.alarm {
                eprintln!("  (broker resource alarm during this round)");
            }
            match role {
                Role::Router => router_lat.push(round),
                Role::Forwarder => baseline_lat.push(round),
            }
        }
    }
    let router_p = best_latency(&router_lat);
    let baseline_p = best_latency(&baseline_lat);
    eprintln!(
        "latency (best): router p99 {:.2} ms, baseline p99 {:.2} ms, added {:.2} ms; \
         median of rounds: router {:.2} ms, baseline {:.2} ms",
        router_p.p99_ms,
        baseline_p.p99_ms,
        router_p.p99_ms - baseline_p.p99_ms,
        median_p99(&router_lat),
        median_p99(&baseline_lat)
    );

    // Phase 3: backlog.
    let backlog = match cli.backlog {
        Some(m) if m > 0 => Some((m, ctx.backlog(m).await?)),
        _ => None,
    };

    let peak = |rounds: &[&[Round]]| {
        mib(rounds
            .iter()
            .flat_map(|r| r.iter())
            .map(|r| r.peak_rss_kib)
            .max()
            .unwrap_or(0))
    };
    for p in &ctx.publishers {
        let _ = p.clone().close().await;
    }
    let _ = ctx.pub_conn.close().await;
    let _ = ctx.sink_conn.close().await;
    let _ = ctx.admin.close().await;
    drop(dir);

    Ok(Report {
        events: n,
        fanout,
        message_bytes,
        aggregate: "best",
        rounds,
        publishers: usize::from(cli.publishers),
        keys: cli.keys,
        router_events_per_s: best_router.events_per_s.round(),
        baseline_events_per_s: best_baseline.events_per_s.round(),
        ratio: (best_router.events_per_s / best_baseline.events_per_s * 1000.0).round() / 1000.0,
        p50_ms: router_p.p50_ms,
        p99_ms: router_p.p99_ms,
        max_ms: router_p.max_ms,
        baseline_p50_ms: baseline_p.p50_ms,
        baseline_p99_ms: baseline_p.p99_ms,
        baseline_max_ms: baseline_p.max_ms,
        p99_added_ms: round2(router_p.p99_ms - baseline_p.p99_ms),
        p99_added_median_ms: round2(median_p99(&router_lat) - median_p99(&baseline_lat)),
        offered_rate_per_s: offered.round(),
        latency_events: latency_n,
        router_peak_rss_mib: peak(&[&router_tp, &router_lat]),
        baseline_peak_rss_mib: peak(&[&baseline_tp, &baseline_lat]),
        router_cpu_us_per_event: per_event_us(best_router.child_cpu, n),
        baseline_cpu_us_per_event: per_event_us(best_baseline.child_cpu, n),
        broker_cpu_us_per_event_router: best_router.broker_cpu.map(|c| per_event_us(c, n)),
        broker_cpu_us_per_event_baseline: best_baseline.broker_cpu.map(|c| per_event_us(c, n)),
        loadgen_cpu_us_per_event_router: per_event_us(best_router.loadgen_cpu, n),
        loadgen_cpu_us_per_event_baseline: per_event_us(best_baseline.loadgen_cpu, n),
        router_rounds_events_per_s: router_tp.iter().map(|r| r.events_per_s.round()).collect(),
        baseline_rounds_events_per_s: baseline_tp.iter().map(|r| r.events_per_s.round()).collect(),
        router_rounds_p99_ms: router_lat
            .iter()
            .map(|r| r.latency.unwrap_or_default().p99_ms)
            .collect(),
        baseline_rounds_p99_ms: baseline_lat
            .iter()
            .map(|r| r.latency.unwrap_or_default().p99_ms)
            .collect(),
        backlog_events: backlog.map(|(m, _)| m),
        router_backlog_peak_rss_mib: backlog.map(|(_, (peak, _, _))| mib(peak)),
        backlog_fill_events_per_s: backlog.map(|(_, (_, fill, _))| fill.round()),
        backlog_drain_events_per_s: backlog.map(|(_, (_, _, drain))| drain.round()),
        prefetch: tuning.prefetch,
        confirm_window: tuning.confirm_window,
        ack_batch: tuning.ack_batch,
        worker_threads: tuning.worker_threads,
        machine,
        load_avg_at_start,
        background_cpu_cores_max: round2(
            [&router_tp, &baseline_tp, &router_lat, &baseline_lat]
                .iter()
                .flat_map(|r| r.iter())
                .map(|r| r.background_cores)
                .fold(0.0, f64::max),
        ),
        alarm_rounds: [&router_tp, &baseline_tp, &router_lat, &baseline_lat]
            .iter()
            .flat_map(|r| r.iter())
            .filter(|r| r.alarm)
            .count(),
        namespace: base,
    })
}

fn short(role: Role) -> &'static str {
    match role {
        Role::Router => "rtr",
        Role::Forwarder => "fwd",
    }
}
