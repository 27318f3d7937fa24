//! Runs the `concord-bench` binary end to end with a tiny workload against the real broker
//! (`CONCORD_AMQP_URI`, default the local RabbitMQ): the router and the forwarder children
//! start, every event reaches every inbox, the JSON report is complete, and every namespace
//! the run declared is deleted afterwards; and `concord-bench sql` with tiny sizes (the
//! `concord-sql` binary built next to it). No timing is asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use concord_amqp::{Topology, connect, queue_message_count};
use serde_json::Value;

const POSITIVE: [&str; 17] = [
    "events",
    "fanout",
    "message_bytes",
    "router_events_per_s",
    "baseline_events_per_s",
    "ratio",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "baseline_p50_ms",
    "baseline_p99_ms",
    "baseline_max_ms",
    "offered_rate_per_s",
    "router_peak_rss_mib",
    "prefetch",
    "confirm_window",
    "ack_batch",
];

fn uri() -> String {
    std::env::var("CONCORD_AMQP_URI")
        .or_else(|_| std::env::var("AMQP_URI"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn number(report: &Value, key: &str) -> f64 {
    report
        .get(key)
        .unwrap_or_else(|| panic!("key {key} missing in {report}"))
        .as_f64()
        .unwrap_or_else(|| panic!("key {key} is not a number in {report}"))
}

#[test]
fn tiny_run_reports_every_figure_and_cleans_up() {
    let output = Command::new(env!("CARGO_BIN_EXE_concord-bench"))
        .args([
            "--events",
            "300",
            "--fanout",
            "2",
            "--rounds",
            "1",
            "--backlog",
            "300",
            "--amqp-uri",
            &uri(),
        ])
        .output()
        .expect("running concord-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "concord-bench failed:\n{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last = stdout.lines().last().expect("no output on stdout");
    let report: Value = serde_json::from_str(last).expect("the last line is not JSON");

    for key in POSITIVE {
        let value = number(&report, key);
        assert!(value > 0.0, "{key} = {value} in {report}");
    }
    assert_eq!(number(&report, "events"), 300.0);
    assert_eq!(number(&report, "fanout"), 2.0);
    assert_eq!(number(&report, "backlog_events"), 300.0);
    assert!(number(&report, "router_backlog_peak_rss_mib") > 0.0);
    assert!(number(&report, "router_cpu_us_per_event") >= 0.0);
    assert!(number(&report, "p99_ms") >= number(&report, "p50_ms"));
    assert!(number(&report, "max_ms") >= number(&report, "p99_ms"));
    assert!(report.get("p99_added_ms").is_some_and(Value::is_number));
    let machine = report.get("machine").expect("machine");
    assert!(machine.get("nproc").and_then(Value::as_u64).unwrap() >= 1);
    assert!(
        !machine
            .get("cpu_model")
            .and_then(Value::as_str)
            .unwrap()
            .is_empty()
    );
    // Progress went to stderr, one line per round.
    assert!(stderr.contains("throughput 0 router"), "{stderr}");
    assert!(stderr.contains("latency 0 forwarder"), "{stderr}");

    // Every namespace of the run is gone: a passive declare of its queues fails with 404.
    let base = report.get("namespace").and_then(Value::as_str).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = tokio::time::timeout(Duration::from_secs(30), connect(&uri(), "bench-test"))
            .await
            .expect("connect timed out")
            .expect("connect");
        for label in ["fwd-t0", "rtr-t0", "fwd-l0", "rtr-l0", "backlog"] {
            let topology = Topology::new(format!("{base}.{label}"));
            for queue in [topology.router_queue(), topology.inbox("sub1")] {
                let channel = conn.open_channel().await.unwrap();
                let err = queue_message_count(&channel, &queue)
                    .await
                    .expect_err(&format!("{queue} still exists"));
                assert!(err.is_not_found(), "{queue}: {err}");
            }
        }
        conn.close().await.unwrap();
    });
}

/// Every figure of one pair of `concord-bench sql`'s report.
const SQL_POSITIVE: [&str; 17] = [
    "rate_per_s",
    "achieved_rate_per_s",
    "seconds",
    "edits",
    "records",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "poll_ms",
    "bulk_rows",
    "bulk_tx_rows",
    "bulk_rows_per_s",
    "bulk_insert_rows_per_s",
    "bulk_seconds",
    "source_adapter_peak_rss_mib",
    "target_adapter_peak_rss_mib",
];

/// Builds the `concord-sql` binary next to this package's `concord-bench` (same profile):
/// `concord-bench sql` runs it from there.
fn build_concord_sql() {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_concord-bench"));
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args([
        "build",
        "--quiet",
        "-p",
        "concord-sql",
        "--bin",
        "concord-sql",
    ]);
    if bench.parent().and_then(|d| d.file_name()) == Some(std::ffi::OsStr::new("release")) {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("running cargo build -p concord-sql");
    assert!(status.success(), "cargo build -p concord-sql failed");
    assert!(
        bench.with_file_name("concord-sql").is_file(),
        "concord-sql is not next to {}",
        bench.display()
    );
}

#[test]
fn tiny_sql_run_reports_every_figure_of_both_pairs_and_cleans_up() {
    build_concord_sql();
    let output = Command::new(env!("CARGO_BIN_EXE_concord-bench"))
        .args([
            "sql",
            "--pair",
            "all",
            "--rate",
            "40",
            "--seconds",
            "1",
            "--records",
            "7",
            "--rows",
            "250",
            "--tx-rows",
            "100",
            "--adapter-poll-ms",
            "20",
        ])
        .output()
        .expect("running concord-bench sql");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "concord-bench sql failed:\n{stderr}"
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last = stdout.lines().last().expect("no output on stdout");
    let report: Value = serde_json::from_str(last).expect("the last line is not JSON");

    assert_eq!(report["benchmark"], "sql");
    for (pair, source, target) in [
        ("pg_mariadb", "postgres", "mariadb"),
        ("sqlite_sqlite", "sqlite", "sqlite"),
    ] {
        let r = report.get(pair).unwrap_or_else(|| panic!("{pair} missing"));
        assert_eq!(r["source"], source, "{r}");
        assert_eq!(r["target"], target, "{r}");
        for key in SQL_POSITIVE {
            let value = number(r, key);
            assert!(value > 0.0, "{pair}: {key} = {value} in {r}");
        }
        assert_eq!(number(r, "edits"), 40.0);
        assert_eq!(number(r, "records"), 7.0);
        assert_eq!(number(r, "bulk_rows"), 250.0);
        assert_eq!(number(r, "bulk_tx_rows"), 100.0);
        assert_eq!(number(r, "adapter_poll_ms"), 20.0);
        assert!(r["adapter_batch"].is_null(), "{r}");
        assert!(number(r, "p99_ms") >= number(r, "p50_ms"), "{r}");
        assert!(number(r, "max_ms") >= number(r, "p99_ms"), "{r}");
        assert!(number(r, "source_adapter_cpu_us_per_row") >= 0.0, "{r}");
        assert!(number(r, "target_adapter_cpu_us_per_row") >= 0.0, "{r}");
        assert!(r["bulk_published_s"].is_number() || r["bulk_published_s"].is_null());
    }
    let machine = report.get("machine").expect("machine");
    assert!(machine.get("nproc").and_then(Value::as_u64).unwrap() >= 1);
    assert!(report["load_avg_at_start"].is_number(), "{report}");
    // Progress went to stderr, a latency and a bulk line per pair.
    assert_eq!(
        stderr.matches("latency at 40 edits/s").count(),
        2,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("rows visible in the target").count(),
        2,
        "{stderr}"
    );

    // Every vhost, user and database of the run is gone.
    let prefix = report["namespace"].as_str().unwrap().to_owned();
    let management = concord_admin::scratch::Broker::from_env().management;
    for what in ["vhosts", "users"] {
        let listed: Vec<Value> = management.get(what).unwrap();
        let left: Vec<&str> = listed
            .iter()
            .filter_map(|v| v["name"].as_str())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "{what} left: {left:?}");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use sqlx::Connection as _;
        let pattern = format!("{prefix}%");
        let mut pg = sqlx::PgConnection::connect(
            &std::env::var("CONCORD_BENCH_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        )
        .await
        .unwrap();
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname LIKE $1")
                .bind(&pattern)
                .fetch_one(&mut pg)
                .await
                .unwrap();
        assert_eq!(left, 0, "PostgreSQL databases left");
        let mut my = sqlx::MySqlConnection::connect(
            &std::env::var("CONCORD_BENCH_MARIADB")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".into()),
        )
        .await
        .unwrap();
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name LIKE ?",
        )
        .bind(&pattern)
        .fetch_one(&mut my)
        .await
        .unwrap();
        assert_eq!(left, 0, "MariaDB databases left");
    });
}
