//! The guide's example adapter (`docs/writing-an-adapter.md`) as its own process against the
//! real broker and router: a line written by the system's users reaches the other system, a
//! change from the other system becomes a line of the log, the adapter's own lines are not
//! published again, `/readyz` and `/metrics` answer, SIGTERM drains and exits 0, a restart
//! publishes nothing twice, and `--check` validates the config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use concord_adapter::testkit::MemorySystem;
use concord_it::{Env, Node, converge, eventually, start_router};
use concord_jsonl_adapter::{ChangeLog, Op};
use serde_json::{Map, Value as Json, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const EXE: &str = env!("CARGO_BIN_EXE_concord-jsonl-adapter");
const DEADLINE: Duration = Duration::from_secs(30);

/// The test's policy: the seed schema, two systems.
fn policy() -> String {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../seed");
    format!(
        r#"
[schema]
files = ["{proto}"]
include = ["{seed}"]

[systems.shop]
description = "The web shop: its records live in a JSON-lines change log"
[systems.crm]

[entities.customer]
message = "seed.v1.Customer"
create = ["shop"]

[entities.customer.fields]
name = {{ owner = "shop", visible = ["crm"] }}
email = {{ owners = ["shop", "crm"], merge = "lww", visible = ["*"] }}
tier = {{ owner = "crm", visible = ["shop"] }}
amount_paid = {{ owner = "shop" }}
"#,
        proto = seed.join("customer.proto").display(),
        seed = seed.display(),
    )
}

fn config(dir: &Path, env: &Env) -> String {
    format!(
        r#"
system = "shop"
policy = "{policy}"
namespace = "{namespace}"
router_user = "{router_user}"
state = "{state}"
http_listen = "127.0.0.1:0"
[reconnect]
min_delay_ms = 50
max_delay_ms = 500
[adapter]
path = "{log}"
poll_ms = 10
"#,
        policy = dir.join("policy.toml").display(),
        namespace = env.ns(),
        router_user = env.vhost().router_user(),
        state = dir.join("shop.sqlite").display(),
        log = dir.join("shop.jsonl").display(),
    )
}

/// The adapter process and the address of its endpoints.
struct Shop {
    child: Child,
    http: std::net::SocketAddr,
}

impl Shop {
    /// Starts the adapter and waits until `/readyz` answers 200.
    async fn start(config: &Path, uri: &str) -> anyhow::Result<Shop> {
        let mut child = Command::new(EXE)
            .arg("--config")
            .arg(config)
            .env("CONCORD_AMQP_URI", uri)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the adapter")?;
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
            bail!("the adapter exited before it listened")
        })
        .await
        .context("the adapter did not start listening")??;
        // Keep reading its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let shop = Shop { child, http };
        eventually(DEADLINE, "the adapter to be ready", async || {
            Ok(shop.get("/readyz").await?.0 == 200)
        })
        .await?;
        Ok(shop)
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

    /// Sends SIGTERM and returns the exit status.
    async fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("already exited")?;
        let kill = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(kill.success(), "kill -TERM failed");
        Ok(tokio::time::timeout(DEADLINE, self.child.wait()).await??)
    }
}

fn fields(v: Json) -> Map<String, Json> {
    match v {
        Json::Object(m) => m,
        _ => Map::new(),
    }
}

#[tokio::test]
async fn the_example_adapter_syncs_through_the_router_as_its_own_process() -> anyhow::Result<()> {
    let env = Env::new("jsonl", &["shop", "crm"])?;
    let uri = env.system_uri("shop");
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, self::policy())?;
    let config = dir.path().join("shop.toml");
    std::fs::write(&config, self::config(dir.path(), &env))?;
    let router = start_router(&env, &policy).await?;
    let crm =
        Node::start_with_policy(&env, "crm", MemorySystem::new("crm"), dir.path(), &policy).await?;
    let log = ChangeLog::open(dir.path().join("shop.jsonl"))?;

    // `--check` validates the config without touching the broker.
    let check = Command::new(EXE)
        .args(["--check", "--config"])
        .arg(&config)
        .env("CONCORD_AMQP_URI", &uri)
        .output()
        .await?;
    assert!(check.status.success(), "{check:?}");

    let shop = Shop::start(&config, &uri).await?;
    // The shop's users create a customer: crm receives the fields it may see.
    log.append(
        "customer",
        Some("c-1"),
        Op::Upsert,
        fields(json!({"name": "Ada", "email": "ada@example.com", "amount_paid": "12500"})),
        "app",
    )?;
    converge(&[&crm], 30, "the customer in crm", || {
        crm.memory.find("customer", "name", "Ada").is_some()
    })
    .await?;
    let crm_id = crm.memory.find("customer", "name", "Ada").unwrap();
    assert_eq!(
        crm.text(&crm_id, "email").as_deref(),
        Some("ada@example.com")
    );
    assert_eq!(crm.memory.field("customer", &crm_id, "amount_paid"), None);

    // crm sets the tier: the adapter appends it to the shop's log.
    crm.memory
        .edit("customer", &crm_id, [("tier", Some(prost_value("gold")))]);
    eventually(DEADLINE, "the tier in the shop's log", async || {
        Ok(log
            .records()?
            .get(&("customer".into(), "c-1".into()))
            .and_then(|r| r.get("tier"))
            == Some(&json!("gold")))
    })
    .await?;
    let last = log.lines_after(0)?.pop().unwrap();
    assert_eq!((last.by.as_str(), last.id.as_str()), ("concord", "c-1"));
    // The adapter's own line came back on the feed as an echo: nothing more was published.
    eventually(DEADLINE, "the echo of the applied line", async || {
        Ok(shop.counter("local_echoes").await? >= 1)
    })
    .await?;
    assert_eq!(shop.counter("published").await?, 1);
    assert_eq!(shop.counter("incoming_applied").await?, 1);
    let (status, _) = shop.get("/healthz").await?;
    assert_eq!(status, 200);

    // SIGTERM drains and exits 0.
    let status = shop.terminate().await?;
    assert!(status.success(), "{status:?}");

    // A restart resumes from the persisted cursor: only the new line is published.
    let shop = Shop::start(&config, &uri).await?;
    log.append(
        "customer",
        Some("c-1"),
        Op::Upsert,
        fields(json!({"name": "Ada Lovelace"})),
        "app",
    )?;
    converge(&[&crm], 30, "the new name in crm", || {
        crm.text(&crm_id, "name").as_deref() == Some("Ada Lovelace")
    })
    .await?;
    eventually(DEADLINE, "the publish to be counted", async || {
        Ok(shop.counter("published").await? == 1)
    })
    .await?;
    assert_eq!(crm.metrics().incoming_applied, 2);
    assert!(shop.terminate().await?.success());

    crm.runner.shutdown().await?;
    router.shutdown().await?;
    Ok(())
}

fn prost_value(s: &str) -> prost_reflect::Value {
    prost_reflect::Value::String(s.to_owned())
}

/// A config with an unknown key or a bad `[adapter]` table is refused with exit status 2 and a
/// message naming the problem.
#[tokio::test]
async fn a_bad_config_is_refused_naming_the_problem() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("policy.toml"), policy())?;
    for (extra, adapter, expect) in [
        ("prefech = 3\n", "path = \"x.jsonl\"", "prefech"),
        ("", "path = \"x.jsonl\"\npoll = 5", "poll"),
        ("", "poll_ms = 5", "path"),
    ] {
        let text = format!(
            "system = \"shop\"\nstate = \"s.sqlite\"\npolicy = \"{}\"\n{extra}[adapter]\n{adapter}\n",
            dir.path().join("policy.toml").display()
        );
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text)?;
        let out = Command::new(EXE)
            .args(["--check", "--config"])
            .arg(&config)
            .env("CONCORD_AMQP_URI", "amqp://unused")
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(expect) && stderr.contains("bad.toml"),
            "{stderr}"
        );
    }
    Ok(())
}
