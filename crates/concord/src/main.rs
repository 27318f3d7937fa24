//! `concord`: the command line of Concord.
//!
//! - `concord router --policy FILE [--config FILE]` runs the router service;
//! - `concord explain --policy FILE --event FILE.json` dry-runs one event through the policy;
//! - `concord check --policy FILE` validates a policy and prints its ownership/visibility matrix.
//!
//! This binary only parses arguments, reads files and prints; all decisions come from
//! `concord-policy` and all broker work from `concord-router`.

mod explain;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "concord",
    version,
    about = "Bi-directional sync between business systems over RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the router: consume change events, enforce the policy, fan projections out.
    Router {
        /// The policy file (TOML).
        #[arg(long)]
        policy: PathBuf,
        /// Router settings (TOML); defaults apply when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
        /// AMQP URI; overrides `amqp_uri` of the config file.
        #[arg(long, env = "CONCORD_AMQP_URI")]
        amqp_uri: Option<String>,
        /// Log format.
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
    },
    /// Dry-run one change event (JSON) through the policy; no broker involved.
    Explain {
        #[arg(long)]
        policy: PathBuf,
        /// The event as JSON: {"source","entity","key","op","fields":{...}}.
        #[arg(long)]
        event: PathBuf,
    },
    /// Validate a policy and print who owns and who sees every field.
    Check {
        #[arg(long)]
        policy: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Router {
            policy,
            config,
            amqp_uri,
            log_format,
        } => {
            init_tracing(log_format);
            match run_router(&policy, config.as_deref(), amqp_uri) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("concord router: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain { policy, event } => report(explain::explain(&policy, &event)),
        Command::Check { policy } => report(explain::check(&policy)),
    }
}

/// Prints the output on stdout, or the error on stderr with exit code 2 (bad input).
fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(out) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run_router(
    policy: &Path,
    config: Option<&Path>,
    amqp_uri: Option<String>,
) -> anyhow::Result<()> {
    let mut cfg = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            concord_router::RouterConfig::from_toml(&text, &path.display().to_string())?
        }
        None => concord_router::RouterConfig::default(),
    };
    if let Some(uri) = amqp_uri {
        cfg.amqp_uri = uri;
    }
    concord_router::run_blocking(cfg, policy.to_path_buf())
}
