//! The seed scenario on the SQL adapter, runnable: orders, support and delivery each keep their
//! customers in a database of their own, with their own table, columns and key type; a
//! `concord-sql` adapter process per system and the router sync them through RabbitMQ, and the
//! demo edits the tables with plain SQL, as the systems' own applications would, printing the
//! tables as they converge.
//!
//! ```sh
//! cargo run -p concord-seed-demo                       # three SQLite files: needs only RabbitMQ
//! cargo run -p concord-seed-demo -- \
//!     --orders-db postgres://postgres@127.0.0.1:5432/postgres \
//!     --support-db mysql://root@127.0.0.1:3306/mysql   # orders on PostgreSQL, support on MariaDB
//! ```
//!
//! The demo provisions its own virtual host and broker users through the management API
//! (`CONCORD_MANAGEMENT_URL`, `CONCORD_ADMIN_USER`, `CONCORD_ADMIN_PASSWORD`, `CONCORD_AMQP_ADDR`;
//! default: the local broker as guest), creates the databases (SQLite files in a temporary
//! directory; on a server, a database of its own), installs change capture (what `concord-sql
//! install` does), starts the router in-process and the three adapters as processes, runs the
//! scripted edits, and then keeps printing the tables when they change until Ctrl-C; with
//! `--once` it exits once the edits converged. At the end it removes everything it created
//! (`--keep` keeps the vhost, its users and the databases).

mod adapter;
mod app;
mod systems;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use concord_admin::scratch::{Broker, ScratchVhost};
use concord_sql::config::Family;
use concord_sql::{SqlConfig, SqlSystem};
use prost_reflect::MessageDescriptor;

use crate::app::{App, ServerDb};
use crate::systems::{AdapterSettings, DbRef, Rows, Spec, cell, family_name, render};

#[derive(Debug, Parser)]
#[command(
    about = "The seed scenario: orders, support and delivery sync their own SQL tables through Concord"
)]
struct Cli {
    /// Run orders on this PostgreSQL server (a URL of any database there, e.g.
    /// postgres://postgres@127.0.0.1:5432/postgres): the demo creates a database of its own on
    /// it and drops it at the end. Default: a SQLite file.
    #[arg(long, env = "CONCORD_DEMO_ORDERS_DB", hide_env_values = true)]
    orders_db: Option<String>,
    /// Run support on this MariaDB/MySQL server (e.g. mysql://root@127.0.0.1:3306/mysql), in a
    /// database of its own. Default: a SQLite file.
    #[arg(long, env = "CONCORD_DEMO_SUPPORT_DB", hide_env_values = true)]
    support_db: Option<String>,
    /// The broker's virtual host (and namespace) the demo creates, with its users.
    #[arg(long, default_value = "concord-demo")]
    vhost: String,
    /// Exit once the scripted edits converged (after printing the final tables).
    #[arg(long)]
    once: bool,
    /// Keep the vhost, its users (their passwords are printed) and the databases at the end.
    #[arg(long)]
    keep: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// (internal) Runs one adapter: what `concord-sql run --config FILE` runs.
    #[command(hide = true)]
    Adapter {
        #[arg(long)]
        config: PathBuf,
    },
}

/// Prints a line (a closed stdout, e.g. `| head`, is not an error of the demo).
fn say(s: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{s}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Adapter { config }) = cli.command {
        return adapter::main(config);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One system as the demo holds it: its database, its application's connection, the
/// adapter's view of the database (capture installed, change log), and what was printed last.
struct System {
    spec: Spec,
    family: Family,
    app: App,
    capture: SqlSystem,
    /// Where the database is, for the reader (a file, or a database on a server).
    location: String,
    url: String,
    shown: Option<Rows>,
}

/// Everything the demo created, removed by [`Demo::shutdown`] whatever happened.
#[derive(Default)]
struct Demo {
    dir: Option<tempfile::TempDir>,
    vhost: Option<ScratchVhost>,
    server_dbs: Vec<ServerDb>,
    systems: Vec<System>,
    router: Option<concord_router::RouterHandle>,
    adapters: Vec<adapter::Process>,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut demo = Demo::default();
    let result = tokio::select! {
        r = script(&cli, &mut demo) => r,
        r = tokio::signal::ctrl_c() => {
            say("\nCtrl-C: stopping.");
            r.context("waiting for Ctrl-C")
        }
    };
    let stopped = demo.shutdown(cli.keep).await;
    result.and(stopped)
}

/// A name no other run uses, for the databases the demo creates on a server.
fn unique_db_name(system: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("concord_demo_{system}_{}_{nanos}", std::process::id())
}

async fn script(cli: &Cli, demo: &mut Demo) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("concord-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let root = dir.path().to_path_buf();
    demo.dir = Some(dir);
    let policy = concord_seed_model::write_seed(&root).context("writing the seed policy")?;
    let entities = entities(&policy)?;

    // The broker: a vhost of the demo's own, one user per system, the router's, an operator.
    let name = cli.vhost.clone();
    let vhost = tokio::task::spawn_blocking(move || {
        ScratchVhost::create(
            Broker::from_env(),
            &name,
            &[ORDERS.name, SUPPORT.name, DELIVERY.name],
        )
    })
    .await?
    .context("creating the demo's vhost and users through the management API (is RabbitMQ running, with the management plugin? scripts/services)")?;
    let management =
        std::env::var("CONCORD_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    say(&format!(
        "Broker: vhost {:?} with users {}, {} and {}.",
        vhost.name(),
        [ORDERS, SUPPORT, DELIVERY]
            .map(|s| vhost.system_user(s.name))
            .join(", "),
        vhost.router_user(),
        vhost.operator_user()
    ));
    say(&format!(
        "Watch the queues in the management UI at {management} (vhost {:?}): log in as {} with password {}",
        vhost.name(),
        vhost.operator_user(),
        vhost.password(vhost.operator_user()).unwrap_or_default()
    ));
    demo.vhost = Some(vhost);
    let vhost = demo.vhost.as_ref().context("the vhost")?;

    // The router declares the inboxes the adapters wait for.
    demo.router = Some(start_router(vhost, &policy).await?);

    // The databases, their tables, capture installed, and the adapters.
    for spec in SYSTEMS {
        let server = match spec.name {
            "orders" => cli.orders_db.as_deref(),
            "support" => cli.support_db.as_deref(),
            _ => None,
        };
        let (url, family, location, db) = match server {
            None => {
                let path = root.join(format!("{}.db", spec.name));
                let url = app::create_sqlite(&path).await?;
                let db = DbRef::Url(url.clone());
                (url, Family::Sqlite, path.display().to_string(), db)
            }
            Some(server) => {
                let family = Family::of(server)
                    .ok_or_else(|| anyhow!("{}: not a database URL", spec.name))?;
                if !spec.families.contains(&family) {
                    bail!(
                        "the demo runs {} on {}, not {}",
                        spec.name,
                        spec.families
                            .iter()
                            .map(|f| family_name(*f))
                            .collect::<Vec<_>>()
                            .join(" or "),
                        family_name(family)
                    );
                }
                let db = ServerDb::create(server, &unique_db_name(spec.name))
                    .await
                    .with_context(|| format!("{}: creating its database", spec.name))?;
                let url = db.url.clone();
                let location = format!("{} database {}", family_name(family), db.name);
                demo.server_dbs.push(db);
                // The URL (it may hold a password) reaches the adapter in its environment.
                (url, family, location, DbRef::Env(db_env(spec.name)))
            }
        };
        let app = App::connect(&url)
            .await
            .with_context(|| format!("{}: connecting to {location}", spec.name))?;
        app.exec(spec.schema(family)?)
            .await
            .with_context(|| format!("{}: creating table {}", spec.name, spec.table))?;
        let (config, http) = adapter_config(spec, &root, &policy, vhost, &db)?;
        let path = root.join(format!("{}.toml", spec.name));
        std::fs::write(&path, &config)?;
        // `concord-sql install`: the change log and the capture triggers.
        let mut sql = sql_config(&config)?;
        sql.url = Some(url.clone());
        sql.url_env = None;
        let capture = SqlSystem::connect(&sql, &entities)
            .await
            .with_context(|| format!("{}: the mapping", spec.name))?;
        capture
            .install()
            .await
            .with_context(|| format!("{}: installing change capture", spec.name))?;
        say(&format!(
            "{}: table {} in {location}, change capture installed.",
            spec.name, spec.table
        ));
        demo.systems.push(System {
            spec,
            family,
            app,
            capture,
            location,
            url: url.clone(),
            shown: None,
        });
        demo.adapters.push(adapter::Process::spawn(
            spec.name,
            &path,
            http,
            &[
                ("CONCORD_AMQP_URI".into(), vhost.system_uri(spec.name)),
                (db_env(spec.name), url),
            ],
        )?);
    }
    for a in &mut demo.adapters {
        a.wait_ready().await?;
    }
    say(&format!(
        "Router and adapters ready after {:.1} s (inboxes {}.inbox.<system>).\n",
        started.elapsed().as_secs_f64(),
        vhost.name()
    ));
    demo.watch(started, "", |_| true, false).await?;

    // The scripted edits, each with plain SQL in the system's own database.
    let t0 = Instant::now();
    say("\n1. The salesperson signs Ada up in orders.");
    demo.exec(
        0,
        "INSERT INTO clients (full_name, email, phone, address, tier, paid, lang) VALUES \
         ('Ada Lovelace', 'ada@example.com', '+44 20 7946 0000', \
          '{\"street\": \"12 St James''s Square\", \"city\": \"London\"}', 'gold', 1299.00, 'en')",
    )
    .await?;
    let took = demo
        .watch(
            started,
            "Ada to reach support and delivery",
            |[_, s, d]| {
                cell(s, "email", ADA, "tier") == Some("G")
                    && cell(d, "customer_name", "Ada Lovelace", "addr").is_some()
            },
            false,
        )
        .await?;
    say(&format!(
        "   Ada reached support and delivery {:.2} s after the commit in orders.",
        took.as_secs_f64()
    ));
    let ada = demo.systems[1]
        .shown
        .as_ref()
        .and_then(|s| cell(s, "email", ADA, "cust_no"))
        .context("Ada's number in support")?
        .to_owned();

    say("\n2. The driver marks Ada's order out for delivery from warehouse W1.");
    demo.exec(
        2,
        "UPDATE stops SET status = 'out_for_delivery', warehouse = 'W1' \
         WHERE customer_name = 'Ada Lovelace'",
    )
    .await?;
    say(
        "3. Support logs a ticket, assigns agent grace, takes delivery notes and a new phone number.",
    );
    demo.exec(
        1,
        &format!(
            "UPDATE customers SET tickets = 1, agent = 'grace', \
             notes = 'Leave at the back door', phone = '{PHONE}' WHERE cust_no = {ada}"
        ),
    )
    .await?;
    say("4. Support (wrongly) edits the email, which only orders may change.");
    demo.exec(
        1,
        &format!("UPDATE customers SET email = 'ada.typo@example.com' WHERE cust_no = {ada}"),
    )
    .await?;
    let took = demo
        .watch(
            started,
            "the updates to spread and the email to be written back",
            |[o, s, d]| {
                let o = |c| cell(o, "email", ADA, c);
                let s = |c| cell(s, "cust_no", &ada, c);
                let d = |c| cell(d, "customer_name", "Ada Lovelace", c);
                o("delivery_state") == Some("out_for_delivery")
                    && o("tickets") == Some("1")
                    && o("agent") == Some("grace")
                    && o("phone") == Some(PHONE)
                    && s("status") == Some("out_for_delivery")
                    && s("email") == Some(ADA)
                    && d("notes") == Some(NOTES)
                    && d("phone") == Some(PHONE)
            },
            false,
        )
        .await?;
    say(&format!(
        "   Converged {:.2} s after the last commit: support's email edit was overruled and orders' value written back.",
        took.as_secs_f64()
    ));

    say(
        "\n5. The driver amends the delivery notes; support's notes win (priority) and are written back.",
    );
    demo.exec(
        2,
        "UPDATE stops SET notes = 'Ring twice' WHERE customer_name = 'Ada Lovelace'",
    )
    .await?;
    let took = demo
        .watch(
            started,
            "the driver's notes to be overruled",
            |[_, _, d]| cell(d, "customer_name", "Ada Lovelace", "notes") == Some(NOTES),
            true,
        )
        .await?;
    say(&format!(
        "   Written back {:.2} s after the commit in delivery.",
        took.as_secs_f64()
    ));

    say(&format!(
        "\nConverged in {:.2} s from the first edit (every change log drained).",
        t0.elapsed().as_secs_f64()
    ));
    say("\nFinal tables:\n");
    for s in &demo.systems {
        if let Some(rows) = &s.shown {
            say(&render(&s.spec, s.family, rows));
        }
    }
    say("Each system holds only the fields it may see, in its own columns: orders sees the");
    say("delivery status but not the warehouse or the notes; delivery sees the name, address and");
    say(
        "phone but never the email, the tier or what was paid; support sees all but the warehouse.",
    );
    if cli.once {
        return Ok(());
    }
    say("\nWatching the tables: edit them yourself, as the systems' applications would, e.g.");
    for s in &demo.systems {
        say(&format!("  {}", s.edit_hint()));
    }
    say("Ctrl-C stops the demo and removes what it created.");
    demo.watch(started, "", |_| false, false).await?;
    Ok(())
}

const ORDERS: Spec = systems::ORDERS;
const SUPPORT: Spec = systems::SUPPORT;
const DELIVERY: Spec = systems::DELIVERY;
const SYSTEMS: [Spec; 3] = systems::SYSTEMS;
/// How often the demo reads the tables (the resolution of the times it prints).
const POLL: Duration = Duration::from_millis(50);
const ADA: &str = "ada@example.com";
const PHONE: &str = "+44 7700 900123";
const NOTES: &str = "Leave at the back door";

/// The environment variable that gives a system's adapter its database URL.
fn db_env(system: &str) -> String {
    format!("CONCORD_DEMO_{}_DB_URL", system.to_ascii_uppercase())
}

/// The policy's entities and their messages.
fn entities(policy: &std::path::Path) -> anyhow::Result<BTreeMap<String, MessageDescriptor>> {
    let deployment = concord_schema::Deployment::load(policy).context("the seed policy")?;
    Ok(deployment
        .policy
        .entities()
        .iter()
        .map(|e| (e.name.clone(), e.message.clone()))
        .collect())
}

/// A system's adapter config file and where its endpoints listen.
fn adapter_config(
    spec: Spec,
    root: &std::path::Path,
    policy: &std::path::Path,
    vhost: &ScratchVhost,
    db: &DbRef,
) -> anyhow::Result<(String, std::net::SocketAddr)> {
    let http = adapter::free_port()?;
    let broker = &vhost.broker().amqp;
    let settings = AdapterSettings {
        policy: policy.display().to_string(),
        state: root
            .join(format!("{}.state", spec.name))
            .display()
            .to_string(),
        amqp_uri: concord_admin::scratch::amqp_uri(
            broker,
            &vhost.system_user(spec.name),
            "",
            vhost.name(),
        ),
        namespace: vhost.name().to_owned(),
        router_user: vhost.router_user().to_owned(),
        http_listen: http.to_string(),
    };
    Ok((spec.adapter_config(&settings, db)?, http))
}

/// The `[adapter]` table of a config file.
fn sql_config(text: &str) -> anyhow::Result<SqlConfig> {
    let mut t: toml::Table = toml::from_str(text)?;
    let adapter = t.remove("adapter").context("no [adapter] table")?;
    adapter
        .try_into()
        .map_err(|e| anyhow!("the [adapter] table: {e}"))
}

async fn start_router(
    vhost: &ScratchVhost,
    policy: &std::path::Path,
) -> anyhow::Result<concord_router::RouterHandle> {
    let config = concord_router::RouterConfig {
        amqp_uri: vhost.router_uri(),
        namespace: vhost.name().to_owned(),
        http_listen: "127.0.0.1:0".into(),
        watch_policy: false,
        users: vhost.users(),
        ..Default::default()
    };
    let router = concord_router::Router::start(config, policy.to_path_buf()).await?;
    tokio::time::timeout(Duration::from_secs(30), router.wait_ready())
        .await
        .context("the router is not ready after 30 s")??;
    Ok(router)
}

impl System {
    /// A command that edits the table, for the reader.
    fn edit_hint(&self) -> String {
        let sql = match self.spec.name {
            "orders" => "UPDATE clients SET tier = 'silver', paid = 15.00 WHERE id = 1",
            "support" => {
                "UPDATE customers SET phone = '+1 555 0100', tickets = 0 WHERE cust_no = 1"
            }
            _ => "UPDATE stops SET status = 'delivered', warehouse = 'W2'",
        };
        match self.family {
            Family::Sqlite => format!("sqlite3 {} \"{sql}\"", self.location),
            Family::Postgres => format!("psql \"{}\" -c \"{sql}\"", self.url),
            Family::MySql => {
                let path = self.url.split('?').next().unwrap_or_default();
                let db = path.rsplit('/').next().unwrap_or_default();
                format!("mariadb {db} -e \"{sql}\"")
            }
        }
    }
}

impl Demo {
    /// Runs `sql` as system `i`'s application.
    async fn exec(&self, i: usize, sql: &str) -> anyhow::Result<()> {
        let s = &self.systems[i];
        s.app
            .exec(sql)
            .await
            .with_context(|| format!("{}: editing its table", s.spec.name))
    }

    /// Reads the tables every [`POLL`], printing each one that changed, until `done` holds for
    /// the tables of orders, support and delivery (and, if `drained`, every change log is
    /// empty); returns how long that took. Fails after 2 minutes (never, if `what` is empty
    /// and `done` never holds: the demo's watch mode), or if an adapter exited.
    async fn watch(
        &mut self,
        started: Instant,
        what: &str,
        done: impl Fn([&Rows; 3]) -> bool,
        drained: bool,
    ) -> anyhow::Result<Duration> {
        let since = Instant::now();
        loop {
            for s in &mut self.systems {
                let cells = s.app.text_rows(&s.spec.select(s.family)).await?;
                let rows = systems::rows(&s.spec, cells);
                if s.shown.as_ref() != Some(&rows) {
                    say(&format!(
                        "[+{:.2}s] {}",
                        started.elapsed().as_secs_f64(),
                        render(&s.spec, s.family, &rows)
                    ));
                    s.shown = Some(rows);
                }
            }
            let tables = [0, 1, 2].map(|i| self.systems[i].shown.as_ref());
            if let [Some(o), Some(s), Some(d)] = tables
                && done([o, s, d])
                && (!drained || self.drained().await?)
            {
                return Ok(since.elapsed());
            }
            for a in &mut self.adapters {
                a.check_running()?;
            }
            if !what.is_empty() && since.elapsed() > Duration::from_secs(120) {
                bail!("timed out after 2 minutes waiting for {what}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether every change log is empty (every captured change published).
    async fn drained(&self) -> anyhow::Result<bool> {
        for s in &self.systems {
            if s.capture.pending_changes().await? > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Stops the adapters and the router, then removes the vhost with its users and the
    /// databases (unless `keep`).
    async fn shutdown(mut self, keep: bool) -> anyhow::Result<()> {
        let mut result = Ok(());
        for a in self.adapters.drain(..) {
            if let Err(e) = a.stop().await {
                result = Err(e);
            }
        }
        if let Some(router) = self.router.take()
            && let Err(e) = router.shutdown().await
        {
            result = Err(e.context("stopping the router"));
        }
        for s in self.systems.drain(..) {
            s.capture.close().await;
            s.app.close().await;
        }
        if keep {
            if let Some(vhost) = self.vhost.take() {
                say(&format!("Kept vhost {:?} and its users:", vhost.name()));
                for user in vhost
                    .users()
                    .keys()
                    .map(String::as_str)
                    .chain([vhost.router_user(), vhost.operator_user()])
                {
                    say(&format!(
                        "  {user}  {}",
                        vhost.password(user).unwrap_or_default()
                    ));
                }
                // Not dropped: its Drop would delete it.
                std::mem::forget(vhost);
            }
            for db in &mut self.server_dbs {
                db.keep = true;
                say(&format!("Kept database {} ({})", db.name, db.url));
            }
            if let Some(dir) = self.dir.take() {
                say(&format!("Kept {}", dir.keep().display()));
            }
        } else {
            if let Some(vhost) = self.vhost.take() {
                tokio::task::spawn_blocking(move || drop(vhost)).await?;
            }
            self.server_dbs.clear();
            self.dir.take();
        }
        result
    }
}
