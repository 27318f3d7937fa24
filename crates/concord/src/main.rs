//! `concord`: the command line of Concord.
//!
//! - `concord router --policy FILE [--config FILE]` runs the router service;
//! - `concord explain --policy FILE --event FILE.json` dry-runs one event through the policy;
//! - `concord check --policy FILE [--against OLD_POLICY]` validates a policy with its schema and
//!   prints its ownership/visibility matrix (and the breaking schema changes against the policy
//!   in force);
//! - `concord schema diff OLD NEW [--policy FILE]` prints the changes between two schemas.
//!
//! Every command loads the schema the policy names (its `[schema]` table). This binary only
//! parses arguments, reads files and prints; all decisions come from `concord-policy`, schemas
//! from `concord-schema` and all broker work from `concord-router`.

mod explain;
mod schema_cmd;

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
    /// Validate a policy with its schema and print who owns and who sees every field.
    ///
    /// Exit status: 0 valid; 1 breaking schema changes against `--against`; 2 invalid.
    Check {
        #[arg(long)]
        policy: PathBuf,
        /// The policy in force: also list the schema changes that break the fields it uses
        /// (what the router's reload refuses).
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Work with schemas (the canonical model).
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SchemaCommand {
    /// Print the changes from OLD to NEW: breaking ones, then additions.
    ///
    /// OLD and NEW are each a policy file (`*.toml`: the schema it names), a `.proto` file, a
    /// directory (every `.proto` under it) or an encoded FileDescriptorSet (any other file).
    /// Exit status: 0 no breaking change; 1 breaking changes; 2 bad input.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// Only what this policy uses (validated against OLD): its entities' messages, the
        /// fields it lists and the messages those hold, as the router checks on reload.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Extra include (import) paths for `.proto` files and directories.
        #[arg(long, short = 'I')]
        include: Vec<PathBuf>,
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
        Command::Check { policy, against } => match explain::check(&policy, against.as_deref()) {
            Ok(r) => verdict(r.out, r.compatible),
            Err(e) => report(Err(e)),
        },
        Command::Schema {
            command:
                SchemaCommand::Diff {
                    old,
                    new,
                    policy,
                    include,
                },
        } => match schema_cmd::diff(&old, &new, policy.as_deref(), &include) {
            Ok(r) => verdict(r.out, r.compatible),
            Err(e) => report(Err(e)),
        },
    }
}

/// Prints `out` on stdout; exit code 1 when `ok` is false (breaking changes found).
fn verdict(out: String, ok: bool) -> ExitCode {
    let code = report(Ok(out));
    if ok { code } else { ExitCode::from(1) }
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
