//! The pure core must stay pure: its normal dependency tree holds no async runtime, broker
//! client, network or database crate.

// Test code: a panic is how a broken fixture or a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

const FORBIDDEN: [&str; 6] = ["tokio", "lapin", "mio", "socket2", "hyper", "sqlx"];

/// Names of every package reachable from `concord-policy` through normal dependencies only
/// (no dev or build edges, at any depth).
fn normal_dependency_closure() -> BTreeSet<String> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--manifest-path",
            manifest,
        ])
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let root = names
        .iter()
        .find(|(_, n)| **n == "concord-policy")
        .map(|(id, _)| *id)
        .expect("concord-policy is in the workspace");
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let normal = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap();
            if normal && seen.insert(dep_id) {
                todo.push(dep_id);
            }
        }
    }
    seen.into_iter().map(|id| names[id].to_owned()).collect()
}

#[test]
fn no_runtime_broker_network_or_database_crates() {
    let deps = normal_dependency_closure();
    // The walk does reach the real dependencies (guards against a vacuous pass).
    for expected in ["concord-proto", "prost", "prost-reflect", "toml", "uuid"] {
        assert!(deps.contains(expected), "{expected} missing from {deps:?}");
    }
    let found: Vec<&str> = FORBIDDEN
        .iter()
        .copied()
        .filter(|f| deps.contains(*f))
        .collect();
    assert!(
        found.is_empty(),
        "concord-policy depends on {found:?}; full tree: {deps:?}"
    );
}
