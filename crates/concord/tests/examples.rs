//! Every example and deployment file in the repository parses and is consistent with the code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml")
            && path.file_name().is_some_and(|n| n != "Cargo.toml")
        {
            out.push(path);
        }
    }
}

#[test]
fn every_example_policy_and_config_parses() {
    let mut files = Vec::new();
    toml_files(&root().join("examples"), &mut files);
    toml_files(&root().join("deploy"), &mut files);
    assert!(files.len() >= 2, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        if text.contains("[systems") {
            // A policy: it loads with the schema it names.
            let d = concord_schema::Deployment::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!d.policy.entities().is_empty(), "{name}: no entity");
        } else if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("router"))
        {
            concord_router::RouterConfig::from_toml(&text, &name)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        } else if text.contains("[adapter]") {
            // An adapter process's config: the SDK's settings and the SQL adapter's table.
            concord_adapter::ProcessConfig::<concord_sql::SqlConfig>::parse(&text, &name, None)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        } else {
            panic!(
                "{name}: no test knows what this file is; teach every_example_policy_and_config_parses"
            );
        }
    }
}

#[test]
fn every_example_event_is_explained() {
    let mut explained = 0;
    for example in std::fs::read_dir(root().join("examples")).unwrap() {
        let example = example.unwrap().path();
        let Ok(events) = std::fs::read_dir(example.join("events")) else {
            continue;
        };
        for entry in events {
            let path = entry.unwrap().path();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_concord"))
                .args(["explain", "--policy"])
                .arg(example.join("policy.toml"))
                .arg("--event")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            explained += 1;
        }
    }
    assert!(explained >= 3, "{explained} events");
}

#[test]
fn every_example_schema_file_is_named_by_a_policy() {
    // A .proto file under examples/ that no policy loads would be a stale copy.
    let mut protos = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "proto") {
                out.push(path.canonicalize().unwrap());
            }
        }
    }
    walk(&root().join("examples"), &mut protos);
    let mut policies = Vec::new();
    toml_files(&root().join("examples"), &mut policies);
    let loaded: Vec<PathBuf> = policies
        .iter()
        .filter(|p| std::fs::read_to_string(p).unwrap().contains("[schema]"))
        .flat_map(|p| {
            concord_schema::Deployment::load(p)
                .unwrap()
                .schema
                .sources()
                .to_vec()
        })
        .collect();
    assert!(protos.len() >= 2, "{protos:?}");
    for p in protos {
        assert!(loaded.contains(&p), "{} is named by no policy", p.display());
    }
}
