//! `concord-bench`: measures the Concord router end to end on the real broker, against a plain
//! AMQP forwarder written with the same client, the same guarantees and the same tuning.
//!
//! ```text
//! concord-bench --events N [--fanout K] [--size BYTES] [--backlog M] [--amqp-uri URI]
//! concord-bench sql [--pair pg-mariadb|sqlite-sqlite|all] [--rate R] [--seconds S] [--rows M]
//! ```
//!
//! `concord-bench sql` measures the SQL adapter end to end (`sql.rs`): `concord-sql run`
//! processes on real databases, the router in process, each as its own broker user in a
//! scratch virtual host.
//!
//! Human-readable progress goes to stderr; the last line of stdout is one JSON object (see
//! `bench::Report`; its keys are stable, later runs are compared against them).
//!
//! The router and the forwarder run as child processes (this binary with a hidden `--role`)
//! so that their CPU time and memory are measured apart from the load generator.
//!
//! This binary must never be pointed at a production broker (it declares and deletes its own
//! uniquely named namespaces, but it saturates the broker), never measure anything but the
//! real router (`concord_router::Router`, exactly as `concord router` runs it), and never
//! talk to the broker other than through `concord-amqp`.

mod bench;
mod child;
mod event;
mod load;
mod procfs;
mod roles;
mod sql;
mod sqldb;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use concord_router::RouterConfig;

use crate::child::Role;

/// Router vs. plain-forwarder benchmark on the real broker.
#[derive(Debug, Parser)]
#[command(
    name = "concord-bench",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Another benchmark than the router's.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Change events per throughput round (and per latency round unless --latency-events).
    /// (Required without a subcommand.)
    #[arg(long, required = true)]
    pub events: Option<u64>,
    /// Subscriber systems every event fans out to.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub fanout: u16,
    /// Approximate encoded size of an input event in bytes (`delivery_notes` is padded);
    /// default: the natural size of the 12-field record with its 12 clocks (about 730 bytes).
    #[arg(long)]
    pub size: Option<usize>,
    /// Also measure the router's peak RSS while draining a backlog of this many events.
    #[arg(long)]
    pub backlog: Option<u64>,
    /// Broker to use.
    #[arg(long, env = "CONCORD_AMQP_URI", default_value = concord_router::config::DEFAULT_AMQP_URI)]
    pub amqp_uri: String,
    /// Rounds of each kind; rounds alternate baseline, router, baseline, router, ...
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub rounds: u16,
    /// Events per latency round (default: --events).
    #[arg(long)]
    pub latency_events: Option<u64>,
    /// Publishing channels of the load generator (each with its own confirm window).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publishers: u16,
    /// Distinct record keys the events are spread over.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Prefetch of the router, the forwarder and the subscribers (default: the router's).
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// Publisher confirm window of the router and the forwarder (default: the router's).
    #[arg(long)]
    pub confirm_window: Option<usize>,
    /// Deliveries per cumulative ack, everywhere (default: the router's).
    #[arg(long)]
    pub ack_batch: Option<usize>,
    /// Async runtime worker threads of the router and the forwarder (default: the router's).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: Option<u16>,

    /// Internal: run as a measured child process.
    #[arg(long, hide = true)]
    pub role: Option<Role>,
    /// Internal: the child's namespace.
    #[arg(long, hide = true)]
    pub namespace: Option<String>,
    /// Internal: the router child's policy file.
    #[arg(long, hide = true)]
    pub policy: Option<PathBuf>,
}

/// The other benchmarks.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The SQL adapter end to end: commit-to-visible latency, bulk throughput, adapter memory.
    Sql(sql::SqlArgs),
}

/// Prefetch, confirm window and ack batch, identical for router, forwarder and subscribers.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub prefetch: u16,
    pub confirm_window: usize,
    pub ack_batch: usize,
    pub worker_threads: usize,
}

impl Cli {
    fn tuning(&self) -> Tuning {
        let defaults = RouterConfig::default();
        Tuning {
            prefetch: self.prefetch.unwrap_or(defaults.prefetch),
            confirm_window: self.confirm_window.unwrap_or(defaults.confirm_window),
            ack_batch: self.ack_batch.unwrap_or(defaults.ack_batch),
            worker_threads: self
                .worker_threads
                .map_or(defaults.worker_threads, usize::from),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (&cli.command, cli.role) {
        (Some(Command::Sql(args)), _) => run_sql(args),
        (None, Some(role)) => run_child(role, &cli),
        (None, None) => run_parent(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("concord-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime `concord router` builds with `worker_threads` (children), or tokio's default
/// (the load generator).
fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_child(role: Role, cli: &Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let tuning = cli.tuning();
    let args = roles::ChildArgs {
        amqp_uri: cli.amqp_uri.clone(),
        namespace: cli
            .namespace
            .clone()
            .context("a child role needs --namespace")?,
        policy: cli.policy.clone(),
        fanout: usize::from(cli.fanout),
        prefetch: tuning.prefetch,
        confirm_window: tuning.confirm_window,
        ack_batch: tuning.ack_batch,
        worker_threads: tuning.worker_threads,
    };
    let rt = runtime(Some(tuning.worker_threads))?;
    match role {
        Role::Router => rt.block_on(roles::router(args)),
        Role::Forwarder => rt.block_on(roles::forwarder(args)),
    }
}

fn run_sql(args: &sql::SqlArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = runtime(None)?;
    let report = rt.block_on(sql::run(args))?;
    let json = serde_json::to_string(&report).context("encoding the report")?;
    println!("{json}");
    Ok(())
}

fn run_parent(cli: Cli) -> anyhow::Result<()> {
    if cli.events.unwrap_or(0) == 0 {
        anyhow::bail!("--events must be at least 1");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let tuning = cli.tuning();
    let rt = runtime(None)?;
    let report = rt.block_on(bench::run(&cli, tuning))?;
    let json = serde_json::to_string(&report).context("encoding the report")?;
    println!("{json}");
    Ok(())
}
