//! `check` names every problem of a mapping against the live database and the canonical schema
//! (table, column, field, why); the `concord-sql` binary installs, checks, uninstalls, and
//! refuses a bad config file or a database without capture.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use common::{TestDb, config, seed_policy_path};
use concord_sql::config::Family;
use prost_reflect::MessageDescriptor;
use tokio::process::Command;

fn entities() -> BTreeMap<String, MessageDescriptor> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let schema =
        concord_schema::Schema::compile(&[dir.join("types.proto")], &[dir.as_path()]).unwrap();
    ["Sample", "Part"]
        .iter()
        .map(|m| {
            (
                m.to_lowercase(),
                schema
                    .pool()
                    .get_message_by_name(&format!("sqltest.v1.{m}"))
                    .unwrap(),
            )
        })
        .collect()
}

fn table(family: Family) -> &'static str {
    match family {
        Family::Postgres => {
            "CREATE TABLE things (id INTEGER NOT NULL PRIMARY KEY, flag DATE, cents NUMERIC(10, 1), level TEXT, label TEXT NOT NULL, status_col TEXT, doc BYTEA, extra TEXT)"
        }
        Family::MySql => {
            "CREATE TABLE things (id INT NOT NULL PRIMARY KEY, flag DATE, cents DECIMAL(10, 1), level TEXT, label TEXT NOT NULL, status_col ENUM('O', 'C'), doc BLOB, extra TEXT)"
        }
        Family::Sqlite => {
            "CREATE TABLE things (id TEXT NOT NULL PRIMARY KEY, flag DATE, cents DECIMAL(10, 1), level TEXT, label TEXT NOT NULL, status_col TEXT, doc BLOB, extra TEXT)"
        }
    }
}

const MAPPING: &str = r#"
[entities.sample]
table = "things"
key = "id"
[entities.sample.fields]
flag = "flag"
cents = { column = "cents", scale = 2 }
text = "missing_col"
nofield = "extra"
level = "level"
status = { column = "status_col", values = { open = "X", closed = "C" } }
doc = "doc"

[entities.part]
table = "missing_table"
key = "id"
[entities.part.fields]
sku = "sku"

[entities.nope]
table = "nope_table"
key = "id"
[entities.nope.fields]
"#;

async fn problems_named(family: Family) -> anyhow::Result<()> {
    let db = TestDb::new(family, "check").await?;
    db.exec(table(family)).await?;
    let problems = concord_sql::check(&config(&db, MAPPING), &entities(), None).await?;
    let all = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let mut expected = vec![
        "error: entity `nope`, table `nope_table`: the policy has no entity `nope` (it has: part, sample)",
        "error: entity `part`, table `missing_table`: no such table in the database",
        "error: entity `sample`, table `things`, column `id`: key_source = \"generated\", but the database does not fill this column",
        "error: entity `sample`, table `things`, column `flag`, field `flag`: cannot store bool in a date column",
        "error: entity `sample`, table `things`, column `cents`, field `cents`: the column keeps 1 decimals: amounts with 2 would be rounded",
        "error: entity `sample`, table `things`, column `missing_col`, field `text`: no such column in the table",
        "error: entity `sample`, table `things`, column `extra`, field `nofield`: sqltest.v1.Sample has no field `nofield`",
        "error: entity `sample`, table `things`, column `doc`, field `doc`: cannot store string in a binary column",
        "warning: entity `sample`, table `things`, column `label`: NOT NULL without a default and not mapped",
    ];
    if family == Family::MySql {
        expected.push("column `status_col`, field `status`: `values`: \"X\" (for \"open\") is not a label of the column (O, C)");
    }
    for e in expected {
        assert!(all.contains(e), "{family:?}: missing\n  {e}\nin\n{all}");
    }
    assert!(
        problems.iter().filter(|p| p.is_error()).count() >= 8,
        "{all}"
    );
    Ok(())
}

#[tokio::test]
async fn check_names_every_problem_on_each_database() -> anyhow::Result<()> {
    for family in [Family::Postgres, Family::MySql, Family::Sqlite] {
        problems_named(family).await?;
    }
    Ok(())
}

const EXE: &str = env!("CARGO_BIN_EXE_concord-sql");

const DELIVERY_SCHEMA: &str = "CREATE TABLE stops (stop_id TEXT PRIMARY KEY, customer_name TEXT, addr TEXT, phone TEXT, language TEXT, status TEXT, warehouse TEXT, notes TEXT)";

fn delivery_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
system = "delivery"
policy = "{policy}"
state = "{state}"
http_listen = "127.0.0.1:0"

[adapter]
url_env = "DELIVERY_DB_URL"
{extra}
[adapter.entities.customer]
table = "stops"
key = "stop_id"
key_source = "canonical"
[adapter.entities.customer.fields]
name = "customer_name"
address = "addr"
phone = "phone"
language = "language"
delivery_status = "status"
warehouse = "warehouse"
delivery_notes = "notes"
"#,
        policy = seed_policy_path().display(),
        state = dir.join("delivery.sqlite").display(),
    );
    let path = dir.join("delivery.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn run(args: &[&str], config: &Path, db: &TestDb) -> anyhow::Result<Output> {
    Ok(Command::new(EXE)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("DELIVERY_DB_URL", &db.url)
        .env("CONCORD_AMQP_URI", "amqp://127.0.0.1:1/%2f")
        .env("RUST_LOG", "warn")
        .output()
        .await?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn the_binary_installs_checks_and_uninstalls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = TestDb::sqlite("cli").await?;
    db.exec(DELIVERY_SCHEMA).await?;
    let config = delivery_config(dir.path(), "");

    let check = run(&["check"], &config, &db).await?;
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("capture trigger `concord_ins_stops` is missing"),
        "{}",
        text(&check)
    );
    // The process refuses to run without capture (before it touches the broker).
    let started = run(&["run"], &config, &db).await?;
    assert_eq!(started.status.code(), Some(1), "{}", text(&started));
    assert!(
        text(&started).contains("change capture is not installed"),
        "{}",
        text(&started)
    );

    for _ in 0..2 {
        let install = run(&["install"], &config, &db).await?;
        assert!(install.status.success(), "{}", text(&install));
    }
    let check = run(&["check"], &config, &db).await?;
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("0 error(s), 0 warning(s)"),
        "{}",
        text(&check)
    );

    let uninstall = run(&["uninstall"], &config, &db).await?;
    assert!(uninstall.status.success(), "{}", text(&uninstall));
    let check = run(&["check"], &config, &db).await?;
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    Ok(())
}

#[tokio::test]
async fn the_binary_refuses_a_bad_config_naming_the_problem() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = TestDb::sqlite("cli-bad").await?;
    db.exec(DELIVERY_SCHEMA).await?;
    for (extra, expect) in [
        ("pol_ms = 5\n", "pol_ms"),
        ("prefix = \"Bad\"\n", "`prefix` \"Bad\""),
    ] {
        let config = delivery_config(dir.path(), extra);
        for cmd in ["check", "install", "run"] {
            let out = run(&[cmd], &config, &db).await?;
            let t = text(&out);
            assert_ne!(out.status.code(), Some(0), "{cmd}: {t}");
            assert!(
                t.contains(expect) && t.contains("delivery.toml"),
                "{cmd}: {t}"
            );
        }
    }
    // A secret that is not in the environment is named.
    let config = delivery_config(dir.path(), "");
    let out = Command::new(EXE)
        .args(["install", "--config"])
        .arg(&config)
        .env_remove("DELIVERY_DB_URL")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("DELIVERY_DB_URL"), "{}", text(&out));
    Ok(())
}
