//! Runs the `concord-bench` binary end to end with a tiny workload against the real broker
//! (`CONCORD_AMQP_URI`, default the local RabbitMQ): the router and the forwarder children
//! start, every event reaches every inbox, the JSON report is complete, and every namespace
//! the run declared is deleted afterwards. No timing is asserted.

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
