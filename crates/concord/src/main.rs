//! `concord`: the command line of Concord.
//!
//! - `concord router --policy FILE [--config FILE]` runs the router service;
//! - `concord explain --policy FILE --event FILE.json` dry-runs one event through the policy;
//! - `concord check --policy FILE [--against OLD_POLICY]` validates a policy with its schema and
//!   prints its ownership/visibility matrix (and the breaking schema changes against the policy
//!   in force);
//! - `concord schema diff OLD NEW [--policy FILE]` prints the changes between two schemas;
//! - `concord policy diff OLD NEW [--json]` prints what loading policy NEW in place of OLD
//!   changes: which systems gain or lose sight (read) or ownership (write) of which fields,
//!   create and delete rights, systems and entities added or removed, merge rules, the
//!   `concord resync --system S --entity E` commands to run for the systems that now see more,
//!   the copies no longer sent (they keep their values: Concord erases nothing), and the schema
//!   changes the router's reload refuses. Exit status 0 no change, 1 changes, 2 bad input;
//! - `concord broker-defs` writes (or loads) the RabbitMQ definitions;
//! - `concord resync --system S [--entity E] [--key K]` asks the router (as the operator) to
//!   backfill system S: the owners' adapters publish snapshots of their records, routed to S
//!   only, on the resync lane; prints each owner's progress (records done / total, rate, ETA);
//! - `concord status` reports per system its inbox (depth, consumers, rates) and dead letters by
//!   reason, the router's queues with their (single active) consumers, its dead letters and its
//!   end-to-end lag; exit status 1 when something needs attention;
//! - `concord dlq list|show|redrive --system S` lists, decodes and moves back dead letters (a
//!   system's into its inbox as the router; the router's into its input as their source
//!   system), move-then-ack, rate-limited, idempotent when interrupted;
//! - `concord pause|resume --system S` stops and resumes delivering to one system (its user may
//!   not consume its inbox while paused; the inbox accumulates).
//!
//! The operator commands reach the broker as the operator (`--management-url`, `--user`,
//! `--password`, `--vhost`, `--namespace`, or `CONCORD_MANAGEMENT_URL`,
//! `CONCORD_OPERATOR_USER`, `CONCORD_OPERATOR_PASSWORD`, `CONCORD_VHOST`,
//! `CONCORD_NAMESPACE`); README "Operating Concord" is their runbook.
//!
//! Every command loads the schema the policy names (its `[schema]` table). This binary only
//! parses arguments, reads files and prints; all decisions come from `concord-policy`, schemas
//! from `concord-schema`, the router from `concord-router` and the broker administration and
//! operation from `concord-admin`.

mod broker_defs;
mod explain;
mod ops;
mod policy_cmd;
mod resync_cmd;
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
    /// Work with policies.
    /// Write the RabbitMQ definitions that make the broker enforce the policy's isolation.
    ///
    /// One broker user per system of the policy (named after the system, or by the router
    /// config's `[users]` map), one for the router and one for the operator, each with the
    /// permissions and topic permissions of the security model (README, "Security model"), and
    /// the exchanges, queues and bindings exactly as the router declares them. Passwords come
    /// from `CONCORD_BROKER_PASSWORD_<USER>` (upper-cased, other characters as `_`); a missing
    /// one is generated and printed once on stderr. Only password hashes are written.
    ///
    /// The JSON is for `rabbitmqctl import_definitions` or `POST /api/definitions`; `--load`
    /// posts it to a broker's management API as `CONCORD_ADMIN_USER` /
    /// `CONCORD_ADMIN_PASSWORD` (default guest/guest), creating the vhost first.
    BrokerDefs {
        /// The policy file (TOML): its systems get users and inboxes.
        #[arg(long)]
        policy: PathBuf,
        /// The router's settings: namespace, queue type, partitions, `[users]`, and the vhost
        /// (from `amqp_uri`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The vhost (default: that of the config's `amqp_uri`).
        #[arg(long)]
        vhost: Option<String>,
        /// The router's broker user.
        #[arg(long, default_value = "router")]
        router_user: String,
        /// The operator's broker user (may read the router's dead letters).
        #[arg(long, default_value = "operator")]
        operator_user: String,
        /// Write the JSON to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Load the definitions into the broker whose management API is at this URL
        /// (e.g. `http://127.0.0.1:15672`) instead of printing them.
        #[arg(long)]
        load: Option<String>,
    },
    /// Backfill a system: the owners' adapters publish their records to it, on the resync lane.
    ///
    /// Connects as the operator (the router acts only on requests of its `operator_user`),
    /// publishes the request to `{ns}.control`, and prints the router's answer (which systems
    /// publish snapshots: the owners of the fields S may see and the systems that may create
    /// its records) and then each one's progress on stderr: records done / total, rate, ETA.
    /// Each record goes with the clocks of its fields, so S keeps whatever is newer: running it
    /// again, or after an interruption, is harmless. Adapters resume an interrupted resync
    /// when they restart.
    ///
    /// Exit status: 0 every owner published its records; 2 refused, no answer, or failed.
    Resync {
        /// The system to backfill.
        #[arg(long)]
        system: String,
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
        /// Only this record key (needs --entity).
        #[arg(long, requires = "entity")]
        key: Option<String>,
        /// The operator's AMQP URI.
        #[arg(long, env = "CONCORD_AMQP_URI")]
        amqp_uri: String,
        /// The namespace (the router's `namespace`).
        #[arg(long, default_value = "concord")]
        namespace: String,
        /// Seconds to wait for the router's answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Return once the router accepted the request.
        #[arg(long)]
        no_wait: bool,
    },
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Per system: inbox depth, consumers, rates and dead letters by reason; the router's
    /// queues with their consumers (single active consumer: which connection), its dead
    /// letters and end-to-end lag.
    ///
    /// Read through the RabbitMQ management API as the operator (its statistics are sampled
    /// every 5 s by default); dead letters are counted by reason by peeking at most --peek
    /// messages of each dead-letter queue (read and put back, nothing consumed). Exit status:
    /// 0 all well; 1 something needs attention (an inbox or router queue without consumer, a
    /// paused system, a non-empty dead-letter queue, a depth above --max-depth, metrics
    /// unreadable); 2 the broker could not be read.
    Status {
        #[command(flatten)]
        broker: ops::Broker,
        /// The policy: its systems are reported (default: every system with an inbox).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// More ready messages than this in an inbox or router queue needs attention.
        #[arg(long)]
        max_depth: Option<u64>,
        /// An inbox whose oldest ready message has waited longer than this (seconds) needs
        /// attention: its system is behind.
        #[arg(long)]
        max_age: Option<u64>,
        /// The router's metrics endpoint (e.g. http://router:8080/metrics) for the end-to-end
        /// lag.
        #[arg(long, env = "CONCORD_ROUTER_METRICS_URL")]
        router_metrics: Option<String>,
        /// Most dead letters read per queue to count them by reason.
        #[arg(long, default_value_t = 1000)]
        peek: usize,
        /// One JSON object instead of the tables.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list, show (decoded), redrive (move back).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Stop delivering to a system: its inbox accumulates until `concord resume`.
    ///
    /// The system's broker user loses the right to consume its inbox (its read permission keeps
    /// its dead-letter queue only) and its connections are closed: the adapter reconnects and
    /// is refused until resumed, applying nothing (its own local changes wait in its change
    /// feed too). The router keeps routing to the inbox; nothing is lost. Needs a broker user
    /// with the `administrator` tag (--user/--password). Idempotent.
    Pause {
        #[command(flatten)]
        broker: ops::Broker,
        /// The system.
        #[arg(long)]
        system: String,
        /// Its broker user (default: the one user whose read permission is the system's).
        #[arg(long)]
        broker_user: Option<String>,
        /// Seconds to keep closing the user's connections and checking that its inbox has no
        /// consumer: more than the management API's statistics interval (5 s by default), as
        /// connections and consumers appear in the API only with its next sample.
        #[arg(long, default_value_t = 6)]
        settle_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Resume delivering to a paused system: its user may consume its inbox again, and its
    /// adapter catches up at its next reconnect (within its backoff, at most about 20 s).
    Resume {
        #[command(flatten)]
        broker: ops::Broker,
        #[arg(long)]
        system: String,
        #[arg(long)]
        broker_user: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One line per dead letter: reason, record (`entity/key`), event id, time (Unix seconds),
    /// detail. The queue is read through the management API and left as it was.
    List {
        #[command(flatten)]
        broker: ops::Broker,
        /// The system whose dead letters (`router`: the router's).
        #[arg(long)]
        system: String,
        /// Only this reason code (e.g. `apply_failed`).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Most messages read from the head of the queue.
        #[arg(long, default_value_t = 1000)]
        scan: usize,
        #[arg(long)]
        json: bool,
    },
    /// Each dead letter as one JSON object per line: reason, detail, and the change event
    /// decoded (`event`); with --policy, its record decoded with the message the policy names
    /// for its entity. A parked local change is shown as the JSON it is (`parked`), other bytes
    /// as `body_base64`.
    ///
    /// The record is shown whole, as the dead letter holds it: a router dead letter holds the
    /// source's complete input, fields hidden from every other system included. Only the
    /// operator may read the router's dead-letter queue (a system's holds only what the system
    /// may see), and hidden fields are shown here because the operator may read them.
    Show {
        #[command(flatten)]
        broker: ops::Broker,
        #[arg(long)]
        system: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long, default_value_t = 1000)]
        scan: usize,
        /// The policy (and its schema) to decode records with.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Move dead letters back where they came from, never elsewhere: a system's into its inbox
    /// (published to `{ns}.routed` with its name as routing key, as the router's user:
    /// --router-uri), the router's into its input (`{ns}.ingress`, original routing key, as
    /// their source system's user, so the router validates the identity again: --source S and
    /// --source-uri; only S's dead letters move).
    ///
    /// Move-then-ack: each is published and confirmed, then acknowledged. Interrupted, a
    /// redrive can leave a moved message in its DLQ too; redriving again sends it with the
    /// same event id and the adapter's deduplication drops the copy. Parked local changes and
    /// messages that are no change event stay. At most the messages in the queue at the start
    /// are looked at.
    Redrive {
        #[command(flatten)]
        broker: ops::Broker,
        #[arg(long)]
        system: String,
        #[arg(long)]
        reason: Option<String>,
        /// Move at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// At most this many per second.
        #[arg(long)]
        rate: Option<f64>,
        /// The operator's AMQP URI (reads and acks the dead letters).
        #[arg(long, env = "CONCORD_AMQP_URI", hide_env_values = true)]
        amqp_uri: String,
        /// The router's AMQP URI (a system's dead letters are published as the router).
        #[arg(long, env = "CONCORD_ROUTER_AMQP_URI", hide_env_values = true)]
        router_uri: Option<String>,
        /// Router dead letters: the system whose dead letters move.
        #[arg(long)]
        source: Option<String>,
        /// Router dead letters: that system's AMQP URI.
        #[arg(long, env = "CONCORD_SOURCE_AMQP_URI", hide_env_values = true)]
        source_uri: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Print what loading policy NEW in place of OLD (the policy in force) changes.
    ///
    /// OLD and NEW are policy files, each loaded with the schema its [schema] table names.
    /// Listed: systems and entities added or removed; entities whose message changed (their
    /// fields are other fields); per entity and system, the rights gained or lost: `read` and
    /// `write` of fields (seeing them, owning them), `create` and `delete` of records; fields
    /// whose merge rule or owner priority changed; the schema changes that break what OLD
    /// uses (the router refuses that reload, as `concord check --against` reports); for every
    /// system that now sees fields it was never sent (a new system included), the command to
    /// run once NEW is loaded: `concord resync --system S --entity E`; and the systems that no
    /// longer see fields: the router stops sending them, and their existing copies keep the
    /// values they hold (Concord erases nothing).
    ///
    /// Exit status: 0 no change (schema additions alone are no change); 1 policy changes or
    /// breaking schema changes; 2 bad input (a file unreadable, a policy or schema invalid).
    ///
    /// With --json, one JSON object on one line, in this shape (every list sorted: names by
    /// name; `access` by entity, system, right (read, write, create, delete), gained first;
    /// `resync` and `kept` by system then entity; `fields` by name):
    ///
    ///   {"changed": true,                      // the exit status is 1
    ///    "changes": 3,                         // policy changes (schema ones not counted)
    ///    "systems": {"added": ["billing"], "removed": []},
    ///    "entities": {"added": [], "removed": [],
    ///                 "message_changed": [{"entity": "e", "old": "p.v1.A", "new": "p.v1.B"}]},
    ///    "access": [{"entity": "customer", "system": "billing", "right": "read",
    ///                "change": "gained", "fields": ["name"]}],  // fields: [] for create/delete
    ///    "merge": [{"entity": "customer", "field": "phone",
    ///               "old": {"rule": "lww", "order": []},
    ///               "new": {"rule": "priority", "order": ["support", "orders"]}}],
    ///                                          // rule: single_owner, lww or priority
    ///    "resync": [{"system": "billing", "entity": "customer", "fields": ["name"],
    ///                "command": "concord resync --system billing --entity customer"}],
    ///    "kept": [{"system": "delivery", "entity": "customer", "fields": ["address"]}],
    ///    "schema": {"reload": "accepted",     // or "refused" (breaking changes)
    ///               "breaking": ["entity `customer`: field ..."], "additions": []}}
    #[command(verbatim_doc_comment)]
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The policy to load.
        new: PathBuf,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
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
        Command::BrokerDefs {
            policy,
            config,
            vhost,
            router_user,
            operator_user,
            out,
            load,
        } => {
            let request = broker_defs::Request {
                policy: &policy,
                config: config.as_deref(),
                vhost,
                router_user,
                operator_user,
            };
            report(run_broker_defs(&request, out.as_deref(), load.as_deref()))
        }
        Command::Resync {
            system,
            entity,
            key,
            amqp_uri,
            namespace,
            timeout,
            no_wait,
        } => report(resync_cmd::run(&resync_cmd::Request {
            amqp_uri,
            namespace,
            system,
            entity,
            key,
            timeout: std::time::Duration::from_secs(timeout),
            no_wait,
        })),
        Command::Policy {
            command: PolicyCommand::Diff { old, new, json },
        } => match policy_cmd::diff(&old, &new, json) {
            Ok(r) => verdict(r.out, r.unchanged),
            Err(e) => report(Err(e)),
        },
        Command::Status {
            broker,
            policy,
            max_depth,
            max_age,
            router_metrics,
            peek,
            json,
        } => match ops::status(
            &broker,
            policy.as_deref(),
            (max_depth, max_age),
            router_metrics,
            peek,
            json,
        ) {
            Ok((out, ok)) => verdict(out, ok),
            Err(e) => report(Err(e)),
        },
        Command::Dlq { command } => report(dlq(command)),
        Command::Pause {
            broker,
            system,
            broker_user,
            settle_secs,
            json,
        } => report(ops::pause_resume(
            &broker,
            &system,
            broker_user.as_deref(),
            settle_secs,
            true,
            json,
        )),
        Command::Resume {
            broker,
            system,
            broker_user,
            json,
        } => report(ops::pause_resume(
            &broker,
            &system,
            broker_user.as_deref(),
            0,
            false,
            json,
        )),
    }
}

fn dlq(command: DlqCommand) -> anyhow::Result<String> {
    match command {
        DlqCommand::List {
            broker,
            system,
            reason,
            limit,
            scan,
            json,
        } => ops::dlq_list(&broker, &system, reason.as_deref(), limit, scan, json),
        DlqCommand::Show {
            broker,
            system,
            reason,
            limit,
            scan,
            policy,
        } => ops::dlq_show(
            &broker,
            &system,
            reason.as_deref(),
            limit,
            scan,
            policy.as_deref(),
        ),
        DlqCommand::Redrive {
            broker,
            system,
            reason,
            limit,
            rate,
            amqp_uri,
            router_uri,
            source,
            source_uri,
            json,
        } => {
            let publisher = if system == "router" {
                source_uri
            } else {
                router_uri
            };
            ops::dlq_redrive(
                &broker, &system, reason, limit, rate, source, amqp_uri, publisher, json,
            )
        }
    }
}

/// Prints `out` on stdout; exit code 1 when `ok` is false (breaking changes or, for
/// `policy diff`, any change found).
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

/// Builds the definitions, prints the generated passwords on stderr, then writes or loads the
/// definitions; returns what to print on stdout.
fn run_broker_defs(
    request: &broker_defs::Request<'_>,
    out: Option<&Path>,
    load: Option<&str>,
) -> anyhow::Result<String> {
    let output = broker_defs::build(request)?;
    for (user, password) in &output.generated {
        eprintln!(
            "generated password for broker user {user:?} (set {} to choose it): {password}",
            broker_defs::password_variable(user)
        );
    }
    let json = serde_json::to_string_pretty(&output.definitions)?;
    if let Some(url) = load {
        broker_defs::load(url, &output.definitions)?;
        return Ok(format!(
            "loaded {} users and {} queues into {url}",
            output.definitions.users.len(),
            output.definitions.queues.len()
        ));
    }
    match out {
        Some(path) => {
            std::fs::write(path, format!("{json}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(format!("wrote {}", path.display()))
        }
        None => Ok(json),
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
