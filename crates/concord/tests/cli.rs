//! The `concord explain` and `concord check` commands, run as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn seed_policy() -> PathBuf {
    root().join("examples/seed/policy.toml")
}

fn concord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .output()
        .expect("run concord")
}

fn explain_json(event: &str) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("event.json");
    std::fs::write(&path, event).unwrap();
    let out = concord(&[
        "explain",
        "--policy",
        seed_policy().to_str().unwrap(),
        "--event",
        path.to_str().unwrap(),
    ]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

#[test]
fn explain_prints_the_documented_shape() {
    let event = std::fs::read_to_string(
        root().join("examples/seed/events/orders-renames-and-moves-warehouse.json"),
    )
    .unwrap();
    let (out, json) = explain_json(&event);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["accepted"], serde_json::json!(["name"]));
    assert_eq!(
        json["rejected"],
        serde_json::json!([{"field": "warehouse", "reason": "not_owner"}])
    );
    assert_eq!(
        json["deliveries"],
        serde_json::json!([
            {"system": "delivery", "fields": ["name"]},
            {"system": "support", "fields": ["name"]}
        ])
    );
    // stdout is exactly one JSON object on one line.
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim_end().lines().count(), 1);
}

#[test]
fn explain_tells_who_does_not_see_what() {
    let (out, json) = explain_json(
        r#"{"source":"orders","entity":"customer","key":"c-1","op":"upsert","fields":{"amount_paid":1250,"name":"Ada","colour":"red"}}"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["accepted"], serde_json::json!(["amount_paid", "name"]));
    assert_eq!(
        json["rejected"],
        serde_json::json!([{"field": "colour", "reason": "unknown_field"}])
    );
    assert_eq!(
        json["deliveries"],
        serde_json::json!([
            {"system": "delivery", "fields": ["name"]},
            {"system": "support", "fields": ["amount_paid", "name"]}
        ])
    );
    assert_eq!(
        json["hidden"],
        serde_json::json!([{"system": "delivery", "fields": ["amount_paid"]}])
    );
}

#[test]
fn explain_warehouse_change_reaches_nobody_else() {
    let (out, json) = explain_json(
        r#"{"source":"delivery","entity":"customer","key":"c-1","op":"upsert","fields":{"warehouse":"W9","delivery_status":"packed"}}"#,
    );
    assert!(out.status.success());
    assert_eq!(
        json["deliveries"],
        serde_json::json!([
            {"system": "orders", "fields": ["delivery_status"]},
            {"system": "support", "fields": ["delivery_status"]}
        ])
    );
}

#[test]
fn malformed_events_exit_2_with_a_precise_message() {
    let cases = [
        ("{not json", "not a change event"),
        (
            r#"{"source":"orders","entity":"customer","fields":{},"extra":1}"#,
            "unknown field `extra`",
        ),
        (
            r#"{"source":"billing","entity":"customer","fields":{}}"#,
            "source `billing` is not a system",
        ),
        (
            r#"{"source":"orders","entity":"invoice","fields":{}}"#,
            "entity `invoice` is not in the policy",
        ),
        (
            r#"{"source":"orders","entity":"customer","op":"merge","fields":{}}"#,
            "op `merge`",
        ),
        (
            r#"{"source":"orders","entity":"customer","fields":{"amount_paid":"lots"}}"#,
            "do not fit concord.v1.Customer",
        ),
    ];
    for (event, expected) in cases {
        let (out, _) = explain_json(event);
        assert_eq!(out.status.code(), Some(2), "{event}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{event}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn an_invalid_policy_exits_2_naming_file_entity_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("bad.toml");
    std::fs::write(
        &policy,
        "[systems.orders]\n[entities.customer]\nmessage = \"concord.v1.Customer\"\n[entities.customer.fields]\nname = { owner = \"sales\" }\n",
    )
    .unwrap();
    let out = concord(&["check", "--policy", policy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "bad.toml: entity `customer`, field `name`: `owners` names unknown system `sales`"
        ),
        "{err}"
    );
}

#[test]
fn check_prints_the_matrix() {
    let out = concord(&["check", "--policy", seed_policy().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let row = |field: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(field))
            .unwrap_or_else(|| panic!("no row {field} in\n{text}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    // Columns are systems in name order: delivery, orders, support.
    assert_eq!(row("warehouse"), ["O", ".", "."]);
    assert_eq!(row("amount_paid"), [".", "O", "r"]);
    assert_eq!(row("delivery_status"), ["O", "r", "r"]);
    assert_eq!(row("phone"), ["r", "O*", "O*"]);
    assert_eq!(row("delivery_notes"), ["O2", ".", "O1"]);
    assert!(text.contains("create: orders"));
}
