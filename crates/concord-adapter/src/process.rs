//! An adapter as a process of its own: [`main`] reads the command line, the environment and the
//! config file (the runner's settings and the adapter's own `[adapter]` table), sets up logging,
//! builds the adapter, serves `/healthz`, `/readyz` and `/metrics`, runs until SIGTERM or
//! Ctrl-C, and then drains (acknowledgements flushed, connection closed) before it exits.
//!
//! ```no_run
//! use concord_adapter::{Adapter, AdapterError, Applied, Apply, SystemAdapter};
//!
//! #[derive(serde::Deserialize)]
//! struct Settings {
//!     greeting: String,
//! }
//!
//! struct Printer(String);
//!
//! impl SystemAdapter for Printer {
//!     async fn apply(&self, change: &Apply) -> Result<Applied, AdapterError> {
//!         println!("{} {:?}", self.0, change.fields);
//!         Ok(Applied::to(change.local_id.clone().unwrap_or_else(|| change.key.clone())))
//!     }
//! }
//!
//! impl Adapter for Printer {
//!     type Config = Settings;
//!     async fn build(settings: Settings, _: &concord_adapter::Context) -> Result<Printer, AdapterError> {
//!         Ok(Printer(settings.greeting))
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     concord_adapter::main::<Printer>()
//! }
//! ```
//!
//! The config file (`--config`, or `CONCORD_CONFIG`):
//!
//! ```toml
//! system = "printer"
//! amqp_uri = "amqp://printer:secret@127.0.0.1:5672/concord"  # or CONCORD_AMQP_URI
//! state = "/var/lib/concord/printer.sqlite"
//! # ... every other setting of `RunnerConfig`, and:
//! http_listen = "0.0.0.0:9465"   # /healthz /readyz /metrics (default 127.0.0.1:9465)
//!
//! [adapter]                      # the adapter's own settings (`Adapter::Config`)
//! greeting = "hello"
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};
use clap::{Parser, ValueEnum};
use prost_reflect::MessageDescriptor;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tracing::{error, info};

use crate::adapter::{AdapterError, SystemAdapter};
use crate::config::RunnerConfig;
use crate::http::{self, HttpState};

/// An adapter that runs as a process of its own (see [`main`]).
pub trait Adapter: SystemAdapter + Sized {
    /// The adapter's own settings: the `[adapter]` table of the config file.
    type Config: DeserializeOwned + Send;

    /// The `prefetch` when the config file sets none: the most incoming messages handed to
    /// [`SystemAdapter::apply_batch`] at once. An adapter that writes a batch in one
    /// transaction gains from a larger one; memory grows with it (up to `prefetch` ×
    /// `max_message_bytes` of message bodies).
    const PREFETCH: u16 = crate::config::DEFAULT_PREFETCH;

    /// Builds the adapter from its settings (e.g. connects to the system). An error stops the
    /// process before it touches the broker.
    fn build(
        config: Self::Config,
        context: &Context,
    ) -> impl Future<Output = Result<Self, AdapterError>> + Send;
}

/// What an adapter is built for: its system and the deployment's canonical entities.
#[derive(Debug, Clone)]
pub struct Context {
    /// This system's name, as in the policy.
    pub system: String,
    /// Entity name → its protobuf message (from the deployment's schema).
    pub entities: BTreeMap<String, MessageDescriptor>,
}

impl Context {
    /// The protobuf message of `entity`.
    pub fn message(&self, entity: &str) -> Option<&MessageDescriptor> {
        self.entities.get(entity)
    }
}

/// Where the endpoints listen when the config file does not say.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9465";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// The command line of an adapter process.
#[derive(Debug, Clone, Parser)]
#[command(version, about = "A Concord adapter")]
pub struct Args {
    /// The config file (TOML): the runner's settings and the `[adapter]` table.
    #[arg(long, env = "CONCORD_CONFIG")]
    pub config: PathBuf,
    /// The broker; overrides `amqp_uri` of the config file (keep credentials out of files).
    #[arg(long, env = "CONCORD_AMQP_URI", hide_env_values = true)]
    pub amqp_uri: Option<String>,
    /// Log format.
    #[arg(long, value_enum, env = "CONCORD_LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,
    /// Validate the config file (and build the adapter) and exit.
    #[arg(long)]
    pub check: bool,
}

/// A process's configuration: the runner's, where the endpoints listen, and the adapter's own.
#[derive(Debug)]
pub struct ProcessConfig<C> {
    pub runner: RunnerConfig,
    pub http_listen: SocketAddr,
    pub adapter: C,
}

impl<C: DeserializeOwned> ProcessConfig<C> {
    /// Parses a config file's text (`file` names it in errors); `amqp_uri` overrides the file's.
    pub fn parse(text: &str, file: &str, amqp_uri: Option<String>) -> anyhow::Result<Self> {
        Self::parse_with(text, file, amqp_uri, &toml::Table::new())
    }

    /// [`ProcessConfig::parse`], with `defaults` for the runner settings the file does not set.
    pub fn parse_with(
        text: &str,
        file: &str,
        amqp_uri: Option<String>,
        defaults: &toml::Table,
    ) -> anyhow::Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).with_context(|| format!("{file}: not valid TOML"))?;
        for (k, v) in defaults {
            table.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let adapter = table
            .remove("adapter")
            .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
        let http_listen = match table.remove("http_listen") {
            None => DEFAULT_HTTP_LISTEN.to_owned(),
            Some(toml::Value::String(s)) => s,
            Some(other) => {
                return Err(anyhow!(
                    "{file}: http_listen must be a string like \"127.0.0.1:9465\", not {other}"
                ));
            }
        };
        let http_listen: SocketAddr = http_listen
            .parse()
            .with_context(|| format!("{file}: http_listen {http_listen:?} is not an address"))?;
        if let Some(uri) = amqp_uri {
            table.insert("amqp_uri".into(), toml::Value::String(uri));
        }
        let runner: RunnerConfig = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("{file}: invalid runner settings"))?;
        runner.validate().map_err(|e| anyhow!("{file}: {e}"))?;
        let adapter: C = adapter
            .try_into()
            .with_context(|| format!("{file}: invalid [adapter] table"))?;
        Ok(ProcessConfig {
            runner,
            http_listen,
            adapter,
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path, amqp_uri: Option<String>) -> anyhow::Result<Self> {
        Self::load_with(path, amqp_uri, &toml::Table::new())
    }

    /// [`ProcessConfig::load`], with `defaults` for the runner settings the file does not set.
    pub fn load_with(
        path: &Path,
        amqp_uri: Option<String>,
        defaults: &toml::Table,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse_with(&text, &path.display().to_string(), amqp_uri, defaults)
    }
}

/// Runs adapter `A` as a process: see the module docs. Returns the process's exit code: 0 after
/// a graceful stop, 1 when it could not run, 2 for a bad command line or config.
pub fn main<A: Adapter>() -> ExitCode {
    main_with::<A>(Args::parse())
}

/// [`main`] with a command line parsed by the caller (e.g. a subcommand of its own CLI).
pub fn main_with<A: Adapter>(args: Args) -> ExitCode {
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_process::<A>(args, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            if e.is::<ConfigProblem>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The runner settings adapter `A` changes when the config file does not set them.
pub fn defaults<A: Adapter>() -> toml::Table {
    let mut t = toml::Table::new();
    t.insert(
        "prefetch".into(),
        toml::Value::Integer(i64::from(A::PREFETCH)),
    );
    t
}

/// A bad config file (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct ConfigProblem(anyhow::Error);

/// Runs adapter `A` with `args` until `shutdown` completes (the body of [`main`]).
pub async fn run_process<A: Adapter>(
    args: Args,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config =
        ProcessConfig::<A::Config>::load_with(&args.config, args.amqp_uri, &defaults::<A>())
            .map_err(|e| anyhow::Error::new(ConfigProblem(e)))?;
    let system = config.runner.system.clone();
    // A deployment that does not load is a configuration problem too.
    let deployment = crate::runner::load_deployment(&config.runner)
        .map_err(|e| anyhow::Error::new(ConfigProblem(e.into())))?;
    let context = Context {
        system: system.clone(),
        entities: crate::runner::entities(&deployment.policy)
            .into_iter()
            .collect(),
    };
    let adapter = A::build(config.adapter, &context)
        .await
        .with_context(|| format!("cannot build the adapter of system {system}"))?;
    if args.check {
        info!(%system, "configuration valid");
        return Ok(());
    }
    let listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let http = listener.local_addr().context("the endpoints' address")?;
    info!(%system, %http, "adapter starting");
    let adapter = std::sync::Arc::new(adapter);
    let mut runner = crate::runner::start(adapter.clone(), config.runner);
    let check: crate::http::Check = std::sync::Arc::new(move || {
        let adapter = adapter.clone();
        Box::pin(async move { adapter.check().await.map_err(|e| e.to_string()) })
    });
    let state = HttpState::new(
        &system,
        runner.ready_watch(),
        runner.metrics_handle(),
        check,
    );
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, state, async move {
        let _ = http_stopped.await;
    }));
    tokio::select! {
        () = shutdown => info!(%system, "stopping: draining"),
        r = runner.wait_stopped() => {
            let _ = stop_http.send(());
            let _ = server.await;
            return r.map_err(anyhow::Error::from).context("the runner stopped");
        }
    }
    let result = runner.shutdown().await;
    let _ = stop_http.send(());
    let _ = server.await;
    result.context("the runner failed")?;
    info!(%system, "stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
