//! `concord-sql`: the SQL adapter's command line.
//!
//! ```sh
//! concord-sql install   --config support.toml   # change log + capture triggers (idempotent)
//! concord-sql check     --config support.toml   # the mapping against the live schemas
//! concord-sql run       --config support.toml   # the adapter process (until SIGTERM)
//! concord-sql uninstall --config support.toml   # removes what install created
//! ```
//!
//! The config file is the SDK's process config (`system`, `policy`, `state`, ...,
//! `http_listen`) with the adapter's `[adapter]` table (see `concord_sql::config`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};
use concord_adapter::process::LogFormat;
use concord_policy::{Policy, SystemId};
use concord_sql::mapping::Visibility;
use concord_sql::{SqlConfig, SqlSystem};
use prost_reflect::MessageDescriptor;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Concord's SQL adapter: a PostgreSQL, MariaDB/MySQL or SQLite database as a Concord system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the adapter until SIGTERM or Ctrl-C (serves /healthz, /readyz, /metrics).
    Run {
        /// The config file: the runner's settings and the `[adapter]` table.
        #[arg(long, env = "CONCORD_CONFIG")]
        config: PathBuf,
        /// The broker; overrides `amqp_uri` of the config file.
        #[arg(long, env = "CONCORD_AMQP_URI", hide_env_values = true)]
        amqp_uri: Option<String>,
        #[arg(long, value_enum, env = "CONCORD_LOG_FORMAT", default_value = "human")]
        log_format: LogFormat,
    },
    /// Creates the change log, the applied-events table and the capture triggers (idempotent).
    Install {
        #[arg(long, env = "CONCORD_CONFIG")]
        config: PathBuf,
    },
    /// Removes everything `install` created, and nothing else.
    Uninstall {
        #[arg(long, env = "CONCORD_CONFIG")]
        config: PathBuf,
    },
    /// Checks the mapping against the live database schema and the canonical schema, names
    /// every problem, and exits 1 if there is any error.
    Check {
        #[arg(long, env = "CONCORD_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, action) = match cli.command {
        Command::Run {
            config,
            amqp_uri,
            log_format,
        } => {
            return concord_adapter::main_with::<SqlSystem>(concord_adapter::Args {
                config,
                amqp_uri,
                log_format,
                check: false,
            });
        }
        Command::Install { config } => (config, Action::Install),
        Command::Uninstall { config } => (config, Action::Uninstall),
        Command::Check { config } => (config, Action::Check),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match load(&config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(act(action, &loaded)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Install,
    Uninstall,
    Check,
}

/// What the config file says.
struct Loaded {
    file: String,
    sql: SqlConfig,
    system: String,
    policy: Policy,
    entities: BTreeMap<String, MessageDescriptor>,
}

fn load(path: &Path) -> anyhow::Result<Loaded> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {file}"))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{file}: not valid TOML"))?;
    let adapter = table
        .remove("adapter")
        .ok_or_else(|| anyhow!("{file}: no [adapter] table"))?;
    let sql: SqlConfig = adapter
        .try_into()
        .with_context(|| format!("{file}: invalid [adapter] table"))?;
    let text_key = |key: &str| -> anyhow::Result<String> {
        match table.get(key) {
            Some(toml::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(anyhow!("{file}: `{key}` must be a string")),
            None => Err(anyhow!("{file}: `{key}` is missing")),
        }
    };
    let system = text_key("system")?;
    let policy_path = PathBuf::from(text_key("policy")?);
    let deployment = concord_schema::Deployment::load(&policy_path)
        .with_context(|| format!("{file}: the policy {}", policy_path.display()))?;
    let policy = deployment.policy;
    if policy.system_id(&system).is_none() {
        return Err(anyhow!(
            "{file}: system {system:?} is not in policy {}",
            policy_path.display()
        ));
    }
    let entities = policy
        .entities()
        .iter()
        .map(|e| (e.name.clone(), e.message.clone()))
        .collect();
    Ok(Loaded {
        file,
        sql,
        system,
        policy,
        entities,
    })
}

/// What the policy lets the system see.
struct PolicyView<'a> {
    policy: &'a Policy,
    system: SystemId,
}

impl Visibility for PolicyView<'_> {
    fn sees(&self, entity: &str, field: &str) -> bool {
        self.seen(entity).iter().any(|f| f == field)
    }

    fn seen(&self, entity: &str) -> Vec<String> {
        let Some(e) = self.policy.entity(entity) else {
            return Vec::new();
        };
        let mut names: Vec<String> = e
            .names(e.visible_to(self.system))
            .chain(e.names(e.owned_by(self.system)))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

async fn act(action: Action, l: &Loaded) -> anyhow::Result<ExitCode> {
    match action {
        Action::Check => {
            let system = l
                .policy
                .system_id(&l.system)
                .ok_or_else(|| anyhow!("system {} is not in the policy", l.system))?;
            let view = PolicyView {
                policy: &l.policy,
                system,
            };
            let problems = concord_sql::check(&l.sql, &l.entities, Some(&view))
                .await
                .with_context(|| format!("{}: checking", l.file))?;
            for p in &problems {
                println!("{p}");
            }
            let errors = problems.iter().filter(|p| p.is_error()).count();
            println!(
                "{}: {errors} error(s), {} warning(s)",
                l.file,
                problems.len() - errors
            );
            Ok(if errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Action::Install | Action::Uninstall => {
            let system = SqlSystem::connect(&l.sql, &l.entities)
                .await
                .with_context(|| format!("{}: cannot use the database", l.file))?;
            let result = if matches!(action, Action::Install) {
                system.install().await.map(|()| "installed")
            } else {
                system.uninstall().await.map(|()| "uninstalled")
            };
            system.close().await;
            let done = result.with_context(|| format!("{}: {action:?} failed", l.file))?;
            println!("{}: change capture {done}", l.file);
            Ok(ExitCode::SUCCESS)
        }
    }
}
