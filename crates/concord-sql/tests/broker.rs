//! The real `concord-sql` binary against the real broker and router: orders on PostgreSQL and
//! support on MariaDB, each a `concord-sql run` process logged in as its own broker user and
//! trusting only the router's, with the router in-process on the test's own vhost. Edits are
//! made with plain SQL, as the systems' own applications would.
//!
//! - The support adapter killed (SIGKILL) at random moments (seeded, the seed is printed;
//!   `CONCORD_TEST_SEED` replays one) while edits continue in both databases and while it
//!   applies: after its restart everything is published and applied exactly once (no row twice,
//!   every last value everywhere, both change logs drained).
//! - The support database unreachable for a while (a TCP proxy in front of MariaDB, cut):
//!   `/readyz` says not ready, the applies are retried, and once it is back every change is
//!   applied once and `/readyz` says ready.
//! - Concurrent edits of a field two systems own (`merge = "lww"`) in both databases converge
//!   to the same value in both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use common::TestDb;
use concord_it::proxy::Proxy;
use concord_it::{Env, eventually, start_router};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const EXE: &str = env!("CARGO_BIN_EXE_concord-sql");
/// A safety net only: every wait ends as soon as its condition holds.
const DEADLINE: Duration = Duration::from_secs(40);

/// Two systems of the seed schema: orders creates customers and owns their names, support owns
/// its ticket counts, and both own the phone (last writer wins).
fn policy() -> String {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed");
    format!(
        r#"
[schema]
files = ["{proto}"]
include = ["{seed}"]

[systems.orders]
[systems.support]

[entities.customer]
message = "seed.v1.Customer"
create = ["orders"]
delete = ["orders"]

[entities.customer.fields]
name = {{ owner = "orders", visible = ["support"] }}
email = {{ owner = "orders", visible = ["support"] }}
phone = {{ owners = ["orders", "support"], merge = "lww" }}
open_tickets = {{ owner = "support", visible = ["orders"] }}
"#,
        proto = seed.join("customer.proto").display(),
        seed = seed.display(),
    )
}

const ORDERS_SCHEMA: &str = "CREATE TABLE clients (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  full_name TEXT,
  email TEXT UNIQUE,
  phone TEXT,
  tickets INTEGER)";

const ORDERS: &str = r#"
[adapter.entities.customer]
table = "clients"
key = "id"
[adapter.entities.customer.fields]
name = "full_name"
email = "email"
phone = "phone"
open_tickets = "tickets"
"#;

const SUPPORT_SCHEMA: &str = "CREATE TABLE customers (
  cust_no INT AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(200),
  email VARCHAR(200),
  phone VARCHAR(50),
  tickets INT)";

const SUPPORT: &str = r#"
[adapter.entities.customer]
table = "customers"
key = "cust_no"
match = ["email"]
[adapter.entities.customer.fields]
name = "name"
email = "email"
phone = "phone"
open_tickets = "tickets"
"#;

/// A seeded generator (xorshift64*), enough to pick moments and rows reproducibly.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// The seed of the test's random choices: `CONCORD_TEST_SEED`, or the clock. Printed.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("CONCORD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{test}: CONCORD_TEST_SEED={seed}");
    seed
}

/// A `concord-sql` process and the address of its endpoints.
struct Process {
    child: Child,
    http: SocketAddr,
}

impl Process {
    /// Starts `concord-sql run` and waits until `/readyz` answers 200.
    async fn start(config: &Path, uri: &str) -> anyhow::Result<Process> {
        let mut child = Command::new(EXE)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("CONCORD_AMQP_URI", uri)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting concord-sql")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let http = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("http="))
                {
                    return Ok::<_, anyhow::Error>(at.parse()?);
                }
            }
            bail!("concord-sql exited before it listened")
        })
        .await
        .context("concord-sql did not start listening")??;
        // Keep reading its log so it never blocks on a full pipe.
        let log = config.with_extension("log");
        tokio::spawn(async move {
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .ok();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(f) = out.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let p = Process { child, http };
        eventually(DEADLINE, "the adapter to be ready", async || {
            Ok(p.get("/readyz").await?.0 == 200)
        })
        .await?;
        Ok(p)
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        concord_it::http_get_at(self.http, path)
            .await
            .with_context(|| format!("no answer to GET {path}"))
    }

    /// The value of counter `concord_adapter_<name>_total` on `/metrics`.
    async fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let (_, body) = self.get("/metrics").await?;
        concord_it::adapter_counter(&body, name)
    }

    /// SIGKILL: no drain, no flush, nothing.
    async fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM; the process drains and exits 0.
    async fn terminate(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("already exited")?;
        let kill = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(kill.success(), "kill -TERM failed");
        let status = tokio::time::timeout(DEADLINE, self.child.wait()).await??;
        anyhow::ensure!(status.success(), "concord-sql exited with {status}");
        Ok(())
    }
}

/// The two systems' databases, their config files and the broker: installed, router running.
struct Deployment {
    env: Env,
    dir: tempfile::TempDir,
    orders_db: TestDb,
    support_db: TestDb,
    router: Option<concord_router::RouterHandle>,
}

impl Deployment {
    /// `support_url`: how the support adapter reaches its database (e.g. through a proxy).
    async fn start(
        test: &str,
        support_url: impl FnOnce(&TestDb) -> String,
    ) -> anyhow::Result<Deployment> {
        let env = Env::new(test, &["orders", "support"])?;
        let dir = tempfile::tempdir()?;
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, self::policy())?;
        let orders_db = TestDb::postgres(test).await?;
        let support_db = TestDb::mariadb(test).await?;
        orders_db.exec(ORDERS_SCHEMA).await?;
        support_db.exec(SUPPORT_SCHEMA).await?;
        let d = Deployment {
            env,
            dir,
            router: None,
            orders_db,
            support_db,
        };
        d.write_config("orders", &d.orders_db.url.clone(), ORDERS)?;
        d.write_config("support", &support_url(&d.support_db), SUPPORT)?;
        for system in ["orders", "support"] {
            let out = Command::new(EXE)
                .arg("install")
                .arg("--config")
                .arg(d.config(system))
                .output()
                .await?;
            anyhow::ensure!(
                out.status.success(),
                "concord-sql install ({system}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let router = start_router(&d.env, &policy).await?;
        Ok(Deployment {
            router: Some(router),
            ..d
        })
    }

    fn config(&self, system: &str) -> PathBuf {
        self.dir.path().join(format!("{system}.toml"))
    }

    fn write_config(&self, system: &str, url: &str, mapping: &str) -> anyhow::Result<()> {
        let text = format!(
            r#"system = "{system}"
policy = "{policy}"
namespace = "{namespace}"
router_user = "{router_user}"
state = "{state}"
http_listen = "127.0.0.1:0"
[reconnect]
min_delay_ms = 50
max_delay_ms = 500
[retry]
min_delay_ms = 20
max_delay_ms = 300
[adapter]
url = "{url}"
poll_ms = 20
{mapping}"#,
            policy = self.dir.path().join("policy.toml").display(),
            namespace = self.env.ns(),
            router_user = self.env.vhost().router_user(),
            state = self.dir.path().join(format!("{system}.sqlite")).display(),
        );
        std::fs::write(self.config(system), text)?;
        Ok(())
    }

    async fn run(&self, system: &str) -> anyhow::Result<Process> {
        Process::start(&self.config(system), &self.env.system_uri(system)).await
    }

    /// Orders' customers: email → (name, phone, tickets).
    async fn orders_rows(&self) -> anyhow::Result<Rows> {
        rows(
            &self.orders_db,
            "SELECT email, full_name, phone, CAST(tickets AS TEXT) FROM clients",
        )
        .await
    }

    /// Support's customers: email → (name, phone, tickets).
    async fn support_rows(&self) -> anyhow::Result<Rows> {
        rows(
            &self.support_db,
            "SELECT email, name, phone, CAST(tickets AS CHAR) FROM customers",
        )
        .await
    }

    /// Change-log rows not yet confirmed published, in both databases.
    async fn pending(&self) -> anyhow::Result<u64> {
        let o = self
            .orders_db
            .value("SELECT CAST(COUNT(*) AS TEXT) FROM concord_changes")
            .await?;
        let s = self
            .support_db
            .value("SELECT CAST(COUNT(*) AS CHAR) FROM concord_changes")
            .await?;
        Ok([o, s]
            .iter()
            .map(|v| {
                v.as_deref()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(r) = self.router.take() {
            r.shutdown().await?;
        }
        Ok(())
    }
}

/// Customers by email: (name, phone, tickets), and how many rows there are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Rows {
    by_email: BTreeMap<String, [Option<String>; 3]>,
    count: usize,
}

async fn rows(db: &TestDb, sql: &str) -> anyhow::Result<Rows> {
    let all = db.rows(sql).await?;
    let count = all.len();
    let by_email = all
        .into_iter()
        .map(|r| {
            let email = r.first().cloned().flatten().unwrap_or_default();
            let f = |i: usize| r.get(i).cloned().flatten();
            (email, [f(1), f(2), f(3)])
        })
        .collect();
    Ok(Rows { by_email, count })
}

/// Runs an edit as an application does: again when the database chose it as a deadlock's
/// victim (MariaDB may, when the adapter writes the same row at the same time).
async fn edit(db: &TestDb, sql: &str) -> anyhow::Result<()> {
    loop {
        match db.exec(sql).await {
            Err(e) if format!("{e:#}").contains("Deadlock") => continue,
            r => return r,
        }
    }
}

fn email(i: u64) -> String {
    format!("c{i:03}@example.com")
}

#[tokio::test]
async fn a_killed_adapter_restarted_publishes_and_applies_everything_exactly_once()
-> anyhow::Result<()> {
    let seed = seed("kill9");
    let mut rng = Rng::new(seed);
    let d = Deployment::start("kill9", |db| db.url.clone()).await?;
    let orders = d.run("orders").await?;
    let mut support = Some(d.run("support").await?);

    // The systems' users edit while the support adapter is killed and restarted: orders signs
    // up customers and renames them, support updates ticket counts of those it has.
    const CUSTOMERS: u64 = 30;
    const ROUNDS: u64 = 120;
    let mut edit_rng = Rng::new(rng.next());
    let (orders_db, support_db) = (&d.orders_db, &d.support_db);
    let edits = async {
        let (orders, support) = (orders_db, support_db);
        let mut names = BTreeMap::new();
        for r in 0..ROUNDS {
            if r < CUSTOMERS {
                edit(
                    orders,
                    &format!(
                        "INSERT INTO clients (full_name, email) VALUES ('n{r}-0', '{}')",
                        email(r)
                    ),
                )
                .await?;
                names.insert(email(r), format!("n{r}-0"));
            }
            let i = edit_rng.range(0, r.min(CUSTOMERS - 1) + 1);
            let name = format!("n{i}-{r}");
            edit(
                orders,
                &format!(
                    "UPDATE clients SET full_name = '{name}' WHERE email = '{}'",
                    email(i)
                ),
            )
            .await?;
            names.insert(email(i), name);
            let j = edit_rng.range(0, r.min(CUSTOMERS - 1) + 1);
            edit(
                support,
                &format!(
                    "UPDATE customers SET tickets = {r} WHERE email = '{}'",
                    email(j)
                ),
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        Ok::<_, anyhow::Error>(names)
    };

    // Killed at random moments (while it applies orders' stream and while support's users edit),
    // restarted after a random pause (the edits go on meanwhile).
    let kills = async {
        for kill in 1..=3 {
            tokio::time::sleep(Duration::from_millis(rng.range(300, 1200))).await;
            let p = support.take().context("support runs")?;
            p.kill9().await?;
            let down = rng.range(50, 600);
            println!("kill {kill}: support killed, down for {down} ms");
            tokio::time::sleep(Duration::from_millis(down)).await;
            support = Some(d.run("support").await?);
        }
        Ok::<_, anyhow::Error>(())
    };
    let (names, killed) = tokio::join!(edits, kills);
    killed?;
    let names = names?;

    // Every last value everywhere, every row once, both change logs drained.
    let mut last = (Rows::default(), Rows::default());
    let converged = eventually(DEADLINE, "both databases to converge", async || {
        let (o, s) = (d.orders_rows().await?, d.support_rows().await?);
        let same = o == s && o.count == CUSTOMERS as usize;
        let named = names
            .iter()
            .all(|(e, n)| s.by_email.get(e).and_then(|r| r[0].as_deref()) == Some(n.as_str()));
        let pending = d.pending().await?;
        Ok(same && named && pending == 0)
    })
    .await;
    if converged.is_err() {
        last = (d.orders_rows().await?, d.support_rows().await?);
    }
    converged.with_context(|| format!("seed {seed}: orders {:?}\nsupport {:?}", last.0, last.1))?;
    let s = d.support_rows().await?;
    assert_eq!(
        s.count,
        s.by_email.len(),
        "seed {seed}: a customer created twice in support"
    );
    assert!(
        s.by_email.values().any(|r| r[2].is_some()),
        "seed {seed}: support's ticket counts reached orders"
    );
    support.take().context("support runs")?.terminate().await?;
    orders.terminate().await?;
    d.stop().await
}

#[tokio::test]
async fn a_database_cut_off_for_a_while_gets_every_change_once_and_readiness_tells()
-> anyhow::Result<()> {
    let mariadb: SocketAddr = "127.0.0.1:3306".parse()?;
    let proxy = Proxy::start(mariadb).await?;
    let at = proxy.addr();
    let d = Deployment::start("dbcut", |db| {
        db.url.replacen("127.0.0.1:3306", &at.to_string(), 1)
    })
    .await?;
    let orders = d.run("orders").await?;
    let support = d.run("support").await?;

    let insert = async |from: u64, to: u64| -> anyhow::Result<()> {
        for i in from..to {
            d.orders_db
                .exec(&format!(
                    "INSERT INTO clients (full_name, email) VALUES ('n{i}', '{}')",
                    email(i)
                ))
                .await?;
        }
        Ok(())
    };
    insert(0, 10).await?;
    eventually(
        DEADLINE,
        "support to have the first customers",
        async || Ok(d.support_rows().await?.count == 10),
    )
    .await?;

    // The database goes away (every connection reset, new ones refused) while changes flow.
    proxy.pause();
    proxy.cut().await;
    let retries = support.counter("retries").await?;
    insert(10, 20).await?;
    for i in 0..10 {
        d.orders_db
            .exec(&format!(
                "UPDATE clients SET full_name = 'renamed{i}' WHERE email = '{}'",
                email(i)
            ))
            .await?;
    }
    eventually(DEADLINE, "/readyz to say not ready", async || {
        let (status, body) = support.get("/readyz").await?;
        Ok(status == 503 && body.contains("the system"))
    })
    .await?;
    eventually(DEADLINE, "the applies to be retried", async || {
        Ok(support.counter("retries").await? > retries)
    })
    .await?;
    assert_eq!(
        d.support_rows().await?.count,
        10,
        "nothing applied while cut off"
    );

    // Back: every change applied once, ready again.
    proxy.resume();
    eventually(DEADLINE, "/readyz to say ready", async || {
        Ok(support.get("/readyz").await?.0 == 200)
    })
    .await?;
    eventually(DEADLINE, "every change to be applied", async || {
        let (o, s) = (d.orders_rows().await?, d.support_rows().await?);
        Ok(o == s && s.count == 20 && d.pending().await? == 0)
    })
    .await?;
    let s = d.support_rows().await?;
    assert_eq!(s.count, s.by_email.len(), "a customer created twice");
    for i in 0..10 {
        assert_eq!(
            s.by_email[&email(i)][0].as_deref(),
            Some(format!("renamed{i}").as_str())
        );
    }
    support.terminate().await?;
    orders.terminate().await?;
    d.stop().await
}

#[tokio::test]
async fn concurrent_edits_of_a_shared_field_in_two_databases_converge() -> anyhow::Result<()> {
    let seed = seed("lww");
    let mut rng = Rng::new(seed);
    let d = Deployment::start("lww", |db| db.url.clone()).await?;
    let orders = d.run("orders").await?;
    let support = d.run("support").await?;
    const CUSTOMERS: u64 = 5;
    for i in 0..CUSTOMERS {
        d.orders_db
            .exec(&format!(
                "INSERT INTO clients (full_name, email) VALUES ('n{i}', '{}')",
                email(i)
            ))
            .await?;
    }
    eventually(DEADLINE, "support to have the customers", async || {
        Ok(d.support_rows().await?.count == CUSTOMERS as usize)
    })
    .await?;

    // Both systems' users change the same phones at the same time, over and over.
    for r in 0..30 {
        let i = rng.range(0, CUSTOMERS);
        let o = format!(
            "UPDATE clients SET phone = 'o{r}' WHERE email = '{}'",
            email(i)
        );
        let s = format!(
            "UPDATE customers SET phone = 's{r}' WHERE email = '{}'",
            email(i)
        );
        let (a, b) = tokio::join!(edit(&d.orders_db, &o), edit(&d.support_db, &s));
        a?;
        b?;
    }
    let converged = eventually(DEADLINE, "the phones to converge", async || {
        let (o, s) = (d.orders_rows().await?, d.support_rows().await?);
        Ok(o == s && d.pending().await? == 0)
    })
    .await;
    if converged.is_err() {
        let (o, s, p) = (
            d.orders_rows().await?,
            d.support_rows().await?,
            d.pending().await?,
        );
        converged
            .with_context(|| format!("seed {seed}: orders {o:?}\nsupport {s:?}\npending {p}"))?;
    }
    let s = d.support_rows().await?;
    for (e, r) in &s.by_email {
        let phone = r[1].as_deref().unwrap_or_default();
        assert!(
            phone.is_empty() || phone.starts_with('o') || phone.starts_with('s'),
            "seed {seed}: {e} has {phone:?}"
        );
    }
    support.terminate().await?;
    orders.terminate().await?;
    d.stop().await
}
