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

#[test]
fn docker_compose_is_consistent() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    for name in ["rabbitmq", "router", "seed-demo"] {
        assert!(services.contains_key(name), "service {name}");
    }
    // Every bind-mounted file and the Dockerfile exist.
    for (_, svc) in services {
        if let Some(vols) = svc["volumes"].as_sequence() {
            for v in vols {
                let host = v.as_str().unwrap().split(':').next().unwrap();
                assert!(root().join(host).exists(), "mounted {host} missing");
            }
        }
        if let Some(df) = svc["build"]["dockerfile"].as_str() {
            assert!(root().join(df).exists(), "{df}");
        }
    }
    let router = &doc["services"]["router"];
    let cmd: Vec<&str> = router["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(cmd[0], "router");
    // The schema the policy names is mounted next to it.
    let mounts: Vec<(String, String)> = router["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| {
            let mut parts = v.as_str().unwrap().split(':');
            let host = parts.next().unwrap().to_owned();
            (host, parts.next().unwrap().to_owned())
        })
        .collect();
    let policy_at = cmd[cmd.iter().position(|a| *a == "--policy").unwrap() + 1];
    let (policy_host, _) = mounts.iter().find(|(_, c)| c == policy_at).unwrap();
    let policy_host = root().join(policy_host);
    let deployment = concord_schema::Deployment::load(&policy_host).unwrap();
    let host_dir = policy_host.parent().unwrap().canonicalize().unwrap();
    let container_dir = Path::new(policy_at).parent().unwrap();
    for source in deployment.schema.sources() {
        let relative = source.strip_prefix(&host_dir).unwrap();
        let expected = container_dir.join(relative);
        assert!(
            mounts.iter().any(|(h, c)| Path::new(c) == expected
                && root().join(h).canonicalize().unwrap() == *source),
            "{} is not mounted at {}",
            source.display(),
            expected.display()
        );
    }
    // The router's metrics port is published and matches the config it mounts.
    let cfg = std::fs::read_to_string(root().join("deploy/router.toml")).unwrap();
    let cfg = concord_router::RouterConfig::from_toml(&cfg, "deploy/router.toml").unwrap();
    let port = cfg.http_listen.rsplit(':').next().unwrap().to_owned();
    let ports: Vec<&str> = router["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{port}"))),
        "{ports:?} vs {port}"
    );
    // The broker gets the plugins Concord uses.
    let plugins = std::fs::read_to_string(root().join("deploy/rabbitmq/enabled_plugins")).unwrap();
    for p in ["rabbitmq_management", "rabbitmq_consistent_hash_exchange"] {
        assert!(plugins.contains(p), "{p}");
    }
}

#[test]
fn dockerfile_builds_the_binaries_the_compose_file_runs() {
    let df = std::fs::read_to_string(root().join("deploy/docker/Dockerfile")).unwrap();
    for bin in ["concord", "concord-seed-demo"] {
        assert!(
            df.contains(&format!("-p {bin}")),
            "Dockerfile does not build {bin}"
        );
        assert!(
            df.contains(&format!("/usr/local/bin/{bin}")),
            "Dockerfile does not install {bin}"
        );
    }
    for copied in [
        "examples/seed/policy.toml",
        "examples/seed/customer.proto",
        "deploy/router.toml",
    ] {
        assert!(
            df.contains(copied) && root().join(copied).exists(),
            "{copied}"
        );
    }
}
