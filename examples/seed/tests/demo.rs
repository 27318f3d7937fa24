//! The demo binary end to end against the local broker: the scripted edits converge, each
//! system's final table holds only the fields it may see, and everything the demo created is
//! removed at the end (with `--once`, and on Ctrl-C).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Command, Stdio};

use concord_admin::scratch::Broker;
use sqlx::{Connection, Row};

const DEMO: &str = env!("CARGO_BIN_EXE_concord-seed-demo");

/// A vhost name of this test run's own.
fn vhost(test: &str) -> String {
    format!("it-demo-{test}-{}", std::process::id())
}

fn run_once(vhost: &str, args: &[&str]) -> String {
    let out = Command::new(DEMO)
        .args(["--once", "--vhost", vhost])
        .args(args)
        .env_remove("CONCORD_DEMO_ORDERS_DB")
        .env_remove("CONCORD_DEMO_SUPPORT_DB")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The final tables as printed: system → rows (column → value, `NULL` kept), the key first.
type Tables = BTreeMap<String, Vec<BTreeMap<String, String>>>;

fn final_tables(stdout: &str) -> (Tables, BTreeMap<String, String>) {
    let text = stdout
        .split_once("\nFinal tables:\n")
        .expect("no final tables")
        .1;
    let mut tables = Tables::new();
    let mut headers = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(col_value) = line.strip_prefix("    ") {
            let (col, value) = col_value.split_once("  ").unwrap();
            let rows = tables.get_mut(current.as_ref().unwrap()).unwrap();
            let row: &mut BTreeMap<_, _> = rows.last_mut().unwrap();
            row.insert(col.to_owned(), value.trim_start().to_owned());
        } else if let Some(key) = line.strip_prefix("  ") {
            let (col, value) = key.split_once(' ').unwrap();
            let rows = tables.get_mut(current.as_ref().unwrap()).unwrap();
            rows.push(BTreeMap::from([(col.to_owned(), value.to_owned())]));
        } else if let Some((system, header)) = line.split_once(": ")
            && header.contains(", table ")
        {
            current = Some(system.to_owned());
            tables.insert(system.to_owned(), Vec::new());
            headers.insert(system.to_owned(), header.to_owned());
        } else {
            break;
        }
    }
    (tables, headers)
}

fn columns(row: &BTreeMap<String, String>) -> BTreeSet<&str> {
    row.keys().map(String::as_str).collect()
}

/// Every system converged on Ada, each with only its own columns and the fields it may see.
fn assert_converged(stdout: &str) {
    let (tables, _) = final_tables(stdout);
    assert_eq!(
        tables.keys().map(String::as_str).collect::<Vec<_>>(),
        ["delivery", "orders", "support"],
        "{stdout}"
    );
    for (system, rows) in &tables {
        assert_eq!(rows.len(), 1, "{system}: {rows:?}");
    }
    let orders = &tables["orders"][0];
    let support = &tables["support"][0];
    let delivery = &tables["delivery"][0];

    // Orders: everything it owns, the delivery status and support's data; never the
    // warehouse or the delivery notes (it has no columns for them, and never got them).
    assert_eq!(
        columns(orders),
        BTreeSet::from([
            "id",
            "full_name",
            "email",
            "phone",
            "address",
            "tier",
            "paid",
            "lang",
            "delivery_state",
            "tickets",
            "agent"
        ])
    );
    assert_eq!(orders["full_name"], "Ada Lovelace");
    assert_eq!(orders["email"], "ada@example.com");
    assert_eq!(orders["phone"], "+44 7700 900123", "support's phone (lww)");
    assert_eq!(orders["tier"], "gold");
    assert_eq!(orders["delivery_state"], "out_for_delivery");
    assert_eq!(orders["tickets"], "1");
    assert_eq!(orders["agent"], "grace");
    assert!(orders["address"].contains("London"));

    // Support: all but the warehouse, its tier coded; the email it edited without owning it
    // is orders' again.
    assert_eq!(
        columns(support),
        BTreeSet::from([
            "cust_no", "name", "email", "phone", "address", "tier", "amount", "language", "status",
            "tickets", "agent", "notes"
        ])
    );
    assert_eq!(support["name"], "Ada Lovelace");
    assert_eq!(support["email"], "ada@example.com", "written back");
    assert_eq!(support["tier"], "G");
    assert!(support["amount"].starts_with("1299"), "{support:?}");
    assert_eq!(support["status"], "out_for_delivery");
    assert_eq!(support["notes"], "Leave at the back door");

    // Delivery: the name, address, phone, language, status, the warehouse it owns and the
    // notes; never the email, the tier, the amount, the tickets or the agent.
    assert_eq!(
        columns(delivery),
        BTreeSet::from([
            "stop_id",
            "customer_name",
            "addr",
            "phone",
            "language",
            "status",
            "warehouse",
            "notes"
        ])
    );
    assert_eq!(delivery["stop_id"].len(), 36, "the canonical key");
    assert_eq!(delivery["customer_name"], "Ada Lovelace");
    assert_eq!(delivery["phone"], "+44 7700 900123");
    assert_eq!(delivery["language"], "en");
    assert_eq!(delivery["status"], "out_for_delivery");
    assert_eq!(delivery["warehouse"], "W1");
    assert_eq!(
        delivery["notes"], "Leave at the back door",
        "support's notes win over the driver's"
    );
    assert!(delivery["addr"].contains("London"));

    // And the values of what a system may not see appear nowhere in its table.
    let shown = |row: &BTreeMap<String, String>| row.values().cloned().collect::<Vec<_>>();
    for hidden in ["W1", "Leave at the back door"] {
        assert!(!shown(orders).iter().any(|v| v == hidden), "{orders:?}");
    }
    assert!(!shown(support).iter().any(|v| v == "W1"), "{support:?}");
    for hidden in ["ada@example.com", "gold", "G", "grace", "1"] {
        assert!(!shown(delivery).iter().any(|v| v == hidden), "{delivery:?}");
    }
}

fn assert_vhost_deleted(vhost: &str) {
    let m = Broker::from_env().management;
    let err = m
        .get::<serde_json::Value>(&format!("vhosts/{vhost}"))
        .expect_err("the vhost is deleted");
    assert!(err.to_string().contains("404"), "{err}");
    let users: Vec<serde_json::Value> = m.get("users").unwrap();
    let left: Vec<&str> = users
        .iter()
        .filter_map(|u| u["name"].as_str())
        .filter(|n| n.starts_with(&format!("{vhost}.")))
        .collect();
    assert!(left.is_empty(), "users left: {left:?}");
}

/// The temporary directory the demo printed (it holds the SQLite files).
fn temp_dir(stdout: &str) -> std::path::PathBuf {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("delivery: table stops in "))
        .unwrap();
    let path = line
        .trim_start_matches("delivery: table stops in ")
        .split(',')
        .next()
        .unwrap();
    std::path::Path::new(path).parent().unwrap().to_path_buf()
}

#[test]
fn the_demo_on_sqlite_converges_with_only_the_visible_fields_and_cleans_up() {
    let vhost = vhost("sqlite");
    let stdout = run_once(&vhost, &[]);
    assert_converged(&stdout);
    let (_, headers) = final_tables(&stdout);
    assert!(
        headers.values().all(|h| h.starts_with("SQLite")),
        "{headers:?}"
    );
    assert!(
        stdout.contains("http://127.0.0.1:15672") && stdout.contains(&format!("{vhost}.operator")),
        "where to watch the queues:\n{stdout}"
    );
    assert_vhost_deleted(&vhost);
    assert!(!temp_dir(&stdout).exists());
}

fn postgres_server() -> String {
    std::env::var("CONCORD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn mariadb_server() -> String {
    std::env::var("CONCORD_TEST_MARIADB")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// The name of the database the demo printed it created for `system`.
fn database(stdout: &str, system: &str, family: &str) -> String {
    let marker = format!(" in {family} database ");
    stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{system}: ")))
        .find_map(|l| l.split_once(&marker))
        .map(|(_, rest)| rest.split(',').next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no {system} database in:\n{stdout}"))
}

#[tokio::test]
async fn the_demo_on_postgres_and_mariadb_converges_and_drops_its_databases() {
    let vhost = vhost("servers");
    let (pg, my) = (postgres_server(), mariadb_server());
    let stdout = tokio::task::spawn_blocking({
        let vhost = vhost.clone();
        move || run_once(&vhost, &["--orders-db", &pg, "--support-db", &my])
    })
    .await
    .unwrap();
    assert_converged(&stdout);
    let (_, headers) = final_tables(&stdout);
    assert!(headers["orders"].starts_with("PostgreSQL"), "{headers:?}");
    assert!(headers["support"].starts_with("MariaDB"), "{headers:?}");
    assert!(headers["delivery"].starts_with("SQLite"), "{headers:?}");
    assert_vhost_deleted(&vhost);

    let orders_db = database(&stdout, "orders", "PostgreSQL");
    let mut c = sqlx::PgConnection::connect(&postgres_server())
        .await
        .unwrap();
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
        .bind(&orders_db)
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "{orders_db} dropped");
    let support_db = database(&stdout, "support", "MariaDB");
    let mut c = sqlx::MySqlConnection::connect(&mariadb_server())
        .await
        .unwrap();
    let n: i64 =
        sqlx::query("SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = ?")
            .bind(&support_db)
            .fetch_one(&mut c)
            .await
            .unwrap()
            .get(0);
    assert_eq!(n, 0, "{support_db} dropped");
}

#[test]
fn ctrl_c_stops_the_demo_and_removes_what_it_created() {
    let vhost = vhost("ctrl-c");
    let mut child = Command::new(DEMO)
        .args(["--vhost", &vhost])
        .env_remove("CONCORD_DEMO_ORDERS_DB")
        .env_remove("CONCORD_DEMO_SUPPORT_DB")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // The demo watches the tables once the scripted edits converged.
    loop {
        let mut line = String::new();
        assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "{seen}");
        seen.push_str(&line);
        if line.starts_with("Ctrl-C stops the demo") {
            break;
        }
    }
    assert_converged(&seen);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    stdout.read_to_string(&mut seen).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}\n{seen}");
    assert!(seen.contains("Ctrl-C: stopping."), "{seen}");
    assert_vhost_deleted(&vhost);
    assert!(!temp_dir(&seen).exists());
}
