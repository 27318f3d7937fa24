//! The deployment files (`docker-compose.yml`, `deploy/`) against the code: every binary a
//! container runs is built by the Dockerfile and ships in its image, every config file it is
//! given is parsed by the real config types, every environment variable it is given is one it
//! reads, every port and probe matches the config's `http_listen`, every Kubernetes manifest
//! parses and every file a kustomization names exists, and the dashboard and the Prometheus
//! configuration use only the metrics the router and the adapters really export (read from
//! their `/metrics` endpoints).
//!
//! No container engine runs here: the compose file and the manifests are interpreted, not run.
//! The shell snippets they hold are run with the host's `sh`/`bash` where they compute
//! something (the router replica's config, the healthcheck probe).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use concord_router::RouterConfig;
use concord_sql::SqlConfig;
use serde::Deserialize;

type Yaml = serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every document of a YAML file, with `<<` merge keys applied (as Compose and Kubernetes do).
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    let mut docs = Vec::new();
    for de in serde_norway::Deserializer::from_str(&text) {
        let mut doc = Yaml::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", rel(path)));
        doc.apply_merge()
            .unwrap_or_else(|e| panic!("{}: {e}", rel(path)));
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    docs
}

fn yaml(path: &Path) -> Yaml {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", rel(path));
    docs.remove(0)
}

fn text(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// A list of strings (a command line); `None` when absent.
fn words(v: &Yaml) -> Option<Vec<String>> {
    match v {
        Yaml::Null => None,
        Yaml::Sequence(items) => Some(items.iter().map(text).collect()),
        other => panic!("write command lines as lists, not {other:?}"),
    }
}

fn seq(v: &Yaml) -> Vec<Yaml> {
    v.as_sequence().cloned().unwrap_or_default()
}

/// `KEY=VALUE` lines (comments and blank lines skipped), as Compose's `env_file` and
/// Kustomize's `envs` read them.
fn env_file(path: &Path) -> BTreeMap<String, String> {
    read(path)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not KEY=VALUE: {l}", rel(path)));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The value of the argument after `flag`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The port of an address like `0.0.0.0:9464`.
fn port_of(listen: &str) -> u16 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The workspace: its binaries and the environment variables they read.

#[derive(Debug, Clone)]
struct Workspace {
    /// Binary name → its package.
    binaries: BTreeMap<String, String>,
    /// Package → the directories of its sources and of the workspace crates it depends on.
    sources: BTreeMap<String, Vec<PathBuf>>,
}

fn workspace() -> Workspace {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let mut binaries = BTreeMap::new();
    let mut dirs = BTreeMap::new();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in packages {
        let name = p["name"].as_str().unwrap().to_owned();
        for t in p["targets"].as_array().unwrap() {
            if t["kind"].as_array().unwrap().iter().any(|k| k == "bin") {
                binaries.insert(t["name"].as_str().unwrap().to_owned(), name.clone());
            }
        }
        let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap());
        dirs.insert(name.clone(), manifest.parent().unwrap().join("src"));
        deps.insert(
            name,
            p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["path"].is_string() && d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_owned())
                .collect(),
        );
    }
    let sources = deps
        .keys()
        .map(|package| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![package.clone()];
            while let Some(p) = todo.pop() {
                if seen.insert(p.clone()) {
                    todo.extend(deps.get(&p).cloned().unwrap_or_default());
                }
            }
            (
                package.clone(),
                seen.iter().filter_map(|p| dirs.get(p).cloned()).collect(),
            )
        })
        .collect();
    Workspace { binaries, sources }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every string literal following `marker` in `text` (e.g. `env = "` or `env::var("`).
fn literals_after(text: &str, marker: &str) -> Vec<String> {
    text.match_indices(marker)
        .filter_map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            rest.find('"').map(|end| rest[..end].to_owned())
        })
        .collect()
}

impl Workspace {
    /// The environment variables binary `bin` reads: clap's `env = "..."`, `env::var("...")`,
    /// and RUST_LOG where tracing's filter comes from the environment.
    fn env_read_by(&self, bin: &str) -> BTreeSet<String> {
        let package = self
            .binaries
            .get(bin)
            .unwrap_or_else(|| panic!("no package builds a binary {bin}"));
        let mut files = Vec::new();
        for dir in &self.sources[package] {
            rust_files(dir, &mut files);
        }
        let mut vars = BTreeSet::new();
        for f in files {
            // Not test code: test modules (files named *tests.rs, `#[cfg(test)]` sections).
            if f.file_stem()
                .is_some_and(|s| s.to_string_lossy().ends_with("tests"))
            {
                continue;
            }
            let whole = read(&f);
            let t = whole.split("#[cfg(test)]").next().unwrap();
            for line in t.lines().filter(|l| l.contains("#[arg(")) {
                vars.extend(literals_after(line, " env = \""));
            }
            vars.extend(literals_after(t, "env::var(\""));
            if t.contains("EnvFilter::try_from_default_env") {
                vars.insert("RUST_LOG".to_owned());
            }
        }
        assert!(!vars.is_empty(), "{bin} reads no environment variable?");
        vars
    }
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile.

#[derive(Debug, Clone)]
struct Instr {
    op: String,
    args: String,
}

#[derive(Debug, Clone)]
struct Stage {
    name: String,
    base: String,
    instrs: Vec<Instr>,
}

#[derive(Debug, Clone)]
struct Dockerfile {
    path: PathBuf,
    args: BTreeMap<String, String>,
    stages: Vec<Stage>,
}

fn dockerfile(path: &Path) -> Dockerfile {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in read(path).lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(t);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut df = Dockerfile {
        path: path.to_owned(),
        args: BTreeMap::new(),
        stages: Vec::new(),
    };
    for l in logical {
        let (op, args) = l.split_once(' ').unwrap_or((&l, ""));
        let (op, args) = (op.to_uppercase(), args.trim().to_owned());
        if op == "FROM" {
            let parts: Vec<&str> = args.split_whitespace().collect();
            assert!(
                parts.len() == 3 && parts[1].eq_ignore_ascii_case("as"),
                "{}: name every stage: FROM {args}",
                rel(path)
            );
            df.stages.push(Stage {
                name: parts[2].to_owned(),
                base: parts[0].to_owned(),
                instrs: Vec::new(),
            });
        } else if let Some(stage) = df.stages.last_mut() {
            stage.instrs.push(Instr { op, args });
        } else if op == "ARG" {
            let (k, v) = args.split_once('=').unwrap_or((&args, ""));
            df.args.insert(k.to_owned(), v.to_owned());
        }
    }
    df
}

/// An exec-form (JSON array) instruction's words.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| panic!("use the exec form: {args}"))
}

/// `--flag=value` options of COPY, then its sources and destination.
fn copy_parts(args: &str) -> (BTreeMap<String, String>, Vec<String>, String) {
    let mut options = BTreeMap::new();
    let mut rest = Vec::new();
    for w in args.split_whitespace() {
        match w.strip_prefix("--") {
            Some(o) => {
                let (k, v) = o.split_once('=').unwrap_or((o, ""));
                options.insert(k.to_owned(), v.to_owned());
            }
            None => rest.push(w.to_owned()),
        }
    }
    let dest = rest.pop().unwrap();
    (options, rest, dest)
}

impl Dockerfile {
    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{}: no stage {name}", rel(&self.path)))
    }

    /// The stage and the stages it builds on, the stage itself last.
    fn chain(&self, name: &str) -> Vec<&Stage> {
        let mut chain = vec![self.stage(name)];
        while let Some(parent) = self.stages.iter().find(|s| s.name == chain[0].base) {
            chain.insert(0, parent);
        }
        chain
    }

    /// The base image of a stage, its ARG default substituted.
    fn base_image(&self, name: &str) -> String {
        let base = &self.chain(name)[0].base;
        match base.strip_prefix("${").and_then(|b| b.strip_suffix('}')) {
            Some(arg) => self.args[arg].clone(),
            None => base.clone(),
        }
    }

    fn last(&self, name: &str, op: &str) -> Option<String> {
        self.chain(name)
            .iter()
            .flat_map(|s| &s.instrs)
            .rfind(|i| i.op == op)
            .map(|i| i.args.clone())
    }

    fn entrypoint(&self, stage: &str) -> Vec<String> {
        self.last(stage, "ENTRYPOINT")
            .map(|a| exec_form(&a))
            .unwrap_or_default()
    }

    fn cmd(&self, stage: &str) -> Vec<String> {
        self.last(stage, "CMD")
            .map(|a| exec_form(&a))
            .unwrap_or_default()
    }

    /// Files the stage (with its parents) copies in, by destination: (source stage, source).
    fn copied(&self, stage: &str) -> BTreeMap<String, (Option<String>, String)> {
        let mut out = BTreeMap::new();
        for s in self.chain(stage) {
            for i in s.instrs.iter().filter(|i| i.op == "COPY") {
                let (options, sources, dest) = copy_parts(&i.args);
                for src in sources {
                    out.insert(dest.clone(), (options.get("from").cloned(), src));
                }
            }
        }
        out
    }

    /// The image's binary for `name` (a command run through PATH): installed in /usr/local/bin.
    fn installs(&self, stage: &str, bin: &str) -> bool {
        self.copied(stage)
            .contains_key(&format!("/usr/local/bin/{bin}"))
    }
}

// ---------------------------------------------------------------------------------------------
// What a container runs: the binary, its arguments, and what a shell wrapper adds.

#[derive(Debug, Clone, Default)]
struct Invocation {
    /// The program run in the end (`None`: a shell script that runs none of ours).
    binary: Option<String>,
    args: Vec<String>,
    /// The shell script wrapping it, if any.
    script: Option<String>,
    /// Variables the script exports (name → value, before expansion).
    exports: BTreeMap<String, String>,
    /// Variables the script reads.
    script_vars: BTreeSet<String>,
}

/// `${NAME}` and `$NAME` references in a shell script (`$@`, `$1` and `${NAME##...}`'s operator
/// are not names).
fn shell_vars(script: &str) -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    let bytes = script.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let start = if bytes.get(i + 1) == Some(&b'{') {
                i + 2
            } else {
                i + 1
            };
            let end = script[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(script.len(), |e| start + e);
            let name = &script[start..end];
            if !name.is_empty() && !name.as_bytes()[0].is_ascii_digit() {
                vars.insert(name.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    vars
}

/// Interprets `argv` (entrypoint and command together): a program, or `sh -c SCRIPT $0 ARGS`
/// whose script ends in `exec PROGRAM "$@"`.
fn invocation(argv: &[String]) -> Invocation {
    assert!(!argv.is_empty(), "nothing to run");
    let shell = matches!(argv[0].as_str(), "/bin/sh" | "sh" | "/bin/bash" | "bash");
    if !shell {
        return Invocation {
            binary: Some(argv[0].clone()),
            args: argv[1..].to_vec(),
            ..Invocation::default()
        };
    }
    assert_eq!(argv.get(1).map(String::as_str), Some("-c"), "{argv:?}");
    let script = argv[2].clone();
    let mut inv = Invocation {
        script_vars: shell_vars(&script),
        ..Invocation::default()
    };
    for stmt in script.split([';', '\n']).flat_map(|s| s.split("&&")) {
        let stmt = stmt.trim();
        if let Some(rest) = stmt.strip_prefix("export ") {
            let (k, v) = rest.split_once('=').unwrap();
            inv.exports
                .insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
        } else if let Some(rest) = stmt.strip_prefix("exec ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(
                words.get(1).copied(),
                Some("\"$@\""),
                "the wrapper must pass its arguments on: {stmt}"
            );
            inv.binary = Some(words[0].to_owned());
            // argv[3] is the script's $0; the rest is "$@".
            inv.args = argv.get(4..).map(<[String]>::to_vec).unwrap_or_default();
        }
    }
    inv.script_vars.retain(|v| !inv.exports.contains_key(v));
    inv.script = Some(script);
    inv
}

// ---------------------------------------------------------------------------------------------
// Config files, parsed by the real types.

type AdapterConfig = concord_adapter::ProcessConfig<SqlConfig>;

fn router_config(path: &Path) -> RouterConfig {
    RouterConfig::from_toml(&read(path), &rel(path)).unwrap_or_else(|e| panic!("{e}"))
}

fn adapter_config(path: &Path) -> AdapterConfig {
    AdapterConfig::parse(&read(path), &rel(path), None).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The environment variables an adapter config makes `concord-sql` read: its `url_env`, or the
/// `${VAR}`s of its `url`.
fn sql_config_env(c: &SqlConfig) -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    if let Some(v) = &c.url_env {
        vars.insert(v.clone());
    }
    if let Some(url) = &c.url {
        vars.extend(literals_after_braces(url));
    }
    vars
}

fn literals_after_braces(text: &str) -> Vec<String> {
    text.match_indices("${")
        .map(|(i, _)| {
            let rest = &text[i + 2..];
            rest[..rest.find('}').unwrap()].to_owned()
        })
        .collect()
}

/// The user and the password part of an `amqp://user:password@host:port/vhost` URI.
fn amqp_login(uri: &str) -> (String, String, String) {
    let rest = uri
        .strip_prefix("amqp://")
        .unwrap_or_else(|| panic!("{uri}"));
    let (login, host) = rest.split_once('@').unwrap_or_else(|| panic!("{uri}"));
    let (user, password) = login.split_once(':').unwrap_or((login, ""));
    let host = host.split([':', '/']).next().unwrap();
    (user.to_owned(), password.to_owned(), host.to_owned())
}

/// The broker users Concord defines for a policy: one per system, `router`, `operator`.
fn broker_users(policy: &Path) -> BTreeSet<String> {
    let d = concord_schema::Deployment::load(policy).unwrap_or_else(|e| panic!("{e}"));
    let mut users: BTreeSet<String> = d.policy.systems().iter().cloned().collect();
    users.insert("router".to_owned());
    users.insert("operator".to_owned());
    users
}

/// `concord broker-defs`' environment contract: the password of user `u` is in
/// CONCORD_BROKER_PASSWORD_<U> (upper-cased, '-' as '_').
fn password_var(user: &str) -> String {
    format!(
        "CONCORD_BROKER_PASSWORD_{}",
        user.to_uppercase().replace('-', "_")
    )
}

/// The administrator's credentials `concord broker-defs --load` uses: the names the project's
/// management-API tooling reads (concord-admin). An assumption of these files while the command
/// is written elsewhere: `compose_broker_setup_loads_the_definitions_with_the_documented_contract`
/// checks them against its source once it is in the tree.
const BROKER_ADMIN_VARS: [&str; 2] = ["CONCORD_ADMIN_USER", "CONCORD_ADMIN_PASSWORD"];

fn seed_policy() -> PathBuf {
    root().join("examples/seed/policy.toml")
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml

fn compose() -> Yaml {
    yaml(&root().join("docker-compose.yml"))
}

/// A service's mounts: (host path for a bind mount | named volume, container path).
#[derive(Debug, Clone)]
enum Source {
    Host(PathBuf),
    Volume(String),
}

fn compose_mounts(svc: &Yaml) -> Vec<(Source, String)> {
    seq(&svc["volumes"])
        .iter()
        .map(|v| {
            let v = text(v);
            let mut parts = v.split(':');
            let (src, dst) = (parts.next().unwrap(), parts.next().unwrap().to_owned());
            let src = if src.starts_with("./") || src.starts_with('/') {
                Source::Host(root().join(src))
            } else {
                Source::Volume(src.to_owned())
            };
            (src, dst)
        })
        .collect()
}

/// The host file mounted at `path` in the service's container.
fn compose_host_file(svc: &Yaml, path: &str) -> PathBuf {
    compose_mounts(svc)
        .into_iter()
        .find_map(|(src, dst)| match src {
            Source::Host(h) if dst == path => Some(h),
            Source::Host(h) => Path::new(path)
                .strip_prefix(&dst)
                .ok()
                .map(|rest| h.join(rest)),
            Source::Volume(_) => None,
        })
        .filter(|h| h.is_file())
        .unwrap_or_else(|| panic!("no host file is mounted at {path}"))
}

/// The named volume holding `path` in the service's container.
fn compose_volume(svc: &Yaml, path: &str) -> Option<String> {
    compose_mounts(svc)
        .into_iter()
        .find_map(|(src, dst)| match src {
            Source::Volume(v) if Path::new(path).starts_with(&dst) => Some(v),
            _ => None,
        })
}

/// The environment a service's container starts with: its env_file(s) and `environment`.
fn compose_env(svc: &Yaml) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let files = match &svc["env_file"] {
        Yaml::Null => Vec::new(),
        Yaml::String(f) => vec![f.clone()],
        other => seq(other).iter().map(text).collect(),
    };
    for f in files {
        env.extend(env_file(&root().join(f)));
    }
    if let Some(m) = svc["environment"].as_mapping() {
        for (k, v) in m {
            env.insert(text(k), text(v));
        }
    }
    env
}

/// Compose's `$$` (a literal `$`) in a value.
fn unescape(s: &str) -> String {
    s.replace("$$", "$")
}

/// The policy a container is given (`path` inside it), loaded from the host files mounted there;
/// every schema file it names must be mounted at the same place relative to it.
fn check_compose_policy(name: &str, svc: &Yaml, path: &str) -> PathBuf {
    let host = compose_host_file(svc, path);
    let d = concord_schema::Deployment::load(&host).unwrap_or_else(|e| panic!("{name}: {e}"));
    let host_dir = host.parent().unwrap().canonicalize().unwrap();
    let dir = Path::new(path).parent().unwrap();
    for source in d.schema.sources() {
        let inside = dir.join(source.strip_prefix(&host_dir).unwrap());
        let mounted = compose_host_file(svc, inside.to_str().unwrap());
        assert_eq!(
            mounted.canonicalize().unwrap(),
            *source,
            "{name}: the schema file {} is not mounted at {}",
            source.display(),
            inside.display()
        );
    }
    host
}

/// The port a compose healthcheck (`concord-probe PORT PATH`) probes, checking the probe is in
/// the image.
fn compose_probe(name: &str, svc: &Yaml, df: &Dockerfile, stage: &str) -> u16 {
    let test =
        words(&svc["healthcheck"]["test"]).unwrap_or_else(|| panic!("{name}: no healthcheck"));
    assert_eq!(test[0], "CMD", "{name}: {test:?}");
    assert_eq!(test[1], "concord-probe", "{name}: {test:?}");
    assert!(
        df.installs(stage, "concord-probe"),
        "{name}: no concord-probe in {stage}"
    );
    assert_eq!(test[3], "/readyz", "{name}: {test:?}");
    test[2].parse().unwrap()
}

fn published_container_ports(svc: &Yaml) -> Vec<u16> {
    seq(&svc["ports"])
        .iter()
        .map(|p| text(p).rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

/// What one compose service built from our Dockerfile runs, checked against the code.
struct ComposeRun {
    binary: String,
    args: Vec<String>,
    /// Where its container connects to the broker: (user, password part, host).
    amqp: Option<(String, String, String)>,
    system: Option<String>,
}

fn check_compose_service(ws: &Workspace, name: &str, svc: &Yaml) -> ComposeRun {
    let build = &svc["build"];
    let df = dockerfile(&root().join(text(&build["dockerfile"])));
    assert_eq!(
        text(&build["context"]),
        ".",
        "{name}: build from the repository root"
    );
    let stage = text(&build["target"]);
    df.stage(&stage);
    let entrypoint = words(&svc["entrypoint"]);
    let command = words(&svc["command"]).unwrap_or_else(|| {
        if entrypoint.is_some() {
            Vec::new()
        } else {
            df.cmd(&stage)
        }
    });
    let argv: Vec<String> = entrypoint
        .unwrap_or_else(|| df.entrypoint(&stage))
        .into_iter()
        .chain(command)
        .map(|w| unescape(&w))
        .collect();
    let inv = invocation(&argv);
    let binary = inv
        .binary
        .clone()
        .unwrap_or_else(|| panic!("{name}: runs none of ours"));
    assert!(
        ws.binaries.contains_key(&binary),
        "{name}: {binary} is no binary of the workspace"
    );
    assert!(
        df.installs(&stage, &binary),
        "{name}: {binary} is not in the image {stage}"
    );

    let env = compose_env(svc);
    let mut read = ws.env_read_by(&binary);
    if binary == "concord-sql" {
        let config = adapter_config(&compose_host_file(
            svc,
            flag(&inv.args, "--config").unwrap(),
        ));
        read.extend(sql_config_env(&config.adapter));
    }
    let mut available: BTreeSet<String> = env.keys().cloned().collect();
    available.extend(inv.exports.keys().cloned());
    if let Some(m) = svc["environment"].as_mapping() {
        for k in m.keys().map(text) {
            assert!(
                read.contains(&k) || inv.script_vars.contains(&k),
                "{name}: {binary} does not read {k} (it reads {read:?})"
            );
        }
    }
    for k in inv.exports.keys() {
        assert!(read.contains(k), "{name}: {binary} does not read {k}");
    }
    for v in &inv.script_vars {
        assert!(
            available.contains(v),
            "{name}: the script reads {v}, which is not set"
        );
    }
    let amqp = inv.exports.get("CONCORD_AMQP_URI").map(|u| amqp_login(u));

    let mut system = None;
    match (binary.as_str(), inv.args[0].as_str()) {
        ("concord", sub @ ("router" | "broker-defs")) => {
            let policy = flag(&inv.args, "--policy").unwrap();
            check_compose_policy(name, svc, policy);
            let config = router_config(&compose_host_file(
                svc,
                flag(&inv.args, "--config").unwrap(),
            ));
            if sub == "router" {
                let port = port_of(&config.http_listen);
                assert_eq!(
                    compose_probe(name, svc, &df, &stage),
                    port,
                    "{name}: probe port"
                );
                assert_eq!(published_container_ports(svc), vec![port], "{name}: ports");
                assert_eq!(df.last(&stage, "EXPOSE").unwrap(), port.to_string());
                let (user, password, _) = amqp.clone().expect("the router's URI");
                assert_eq!(user, "router");
                assert_eq!(password, format!("${{{}}}", password_var("router")));
                assert!(config.require_user_id, "{name}: require_user_id");
            }
        }
        ("concord-sql", sub @ ("run" | "install")) => {
            let config_path = flag(&inv.args, "--config").unwrap();
            let config = adapter_config(&compose_host_file(svc, config_path));
            let runner = &config.runner;
            check_compose_policy(name, svc, runner.policy.to_str().unwrap());
            let users = broker_users(&compose_host_file(svc, runner.policy.to_str().unwrap()));
            assert!(
                users.contains(&runner.system),
                "{name}: {} is not in the policy",
                runner.system
            );
            for v in sql_config_env(&config.adapter) {
                assert!(
                    available.contains(&v),
                    "{name}: the config reads {v}, which is not set"
                );
            }
            if let Some(db) = config
                .adapter
                .url
                .as_deref()
                .and_then(|u| u.strip_prefix("sqlite://"))
            {
                assert!(
                    compose_volume(svc, db).is_some(),
                    "{name}: the SQLite database {db} is on no volume"
                );
                if let Some(script) = inv.script.as_ref().filter(|s| s.contains("sqlite3 ")) {
                    // The tables are created with sqlite3 from a mounted .sql file.
                    let sql = script
                        .split("sqlite3 ")
                        .nth(1)
                        .map(|r| r.split("&&").next().unwrap().trim().to_owned())
                        .unwrap_or_else(|| panic!("{name}: {script}"));
                    let (file, ddl) = sql.split_once(" < ").unwrap();
                    assert_eq!(file, db, "{name}: sqlite3 creates another database");
                    let ddl = compose_host_file(svc, ddl);
                    assert_eq!(
                        ddl,
                        root().join(format!("deploy/sql/{}.sql", runner.system)),
                        "{name}"
                    );
                }
            }
            if sub == "run" {
                assert!(
                    compose_volume(svc, runner.state.to_str().unwrap()).is_some(),
                    "{name}: the state store is on no volume"
                );
                let port = config.http_listen.port();
                assert_eq!(
                    compose_probe(name, svc, &df, &stage),
                    port,
                    "{name}: probe port"
                );
                assert_eq!(df.last(&stage, "EXPOSE").unwrap(), port.to_string());
                assert!(
                    svc["ports"].is_null() || published_container_ports(svc) == vec![port],
                    "{name}: ports"
                );
                let (user, password, _) = amqp.clone().expect("the adapter's URI");
                assert_eq!(user, runner.system, "{name}: the broker user is the system");
                assert_eq!(password, format!("${{{}}}", password_var(&runner.system)));
                assert!(runner.publish_user_id, "{name}: publish_user_id");
                assert_eq!(runner.router_user, "router");
            }
            system = Some(runner.system.clone());
        }
        (b, sub) => panic!("{name}: what is `{b} {sub}`?"),
    }
    ComposeRun {
        binary,
        args: inv.args,
        amqp,
        system,
    }
}

#[test]
fn compose_services_run_the_real_binaries_with_valid_configs() {
    let ws = workspace();
    let doc = compose();
    let services = doc["services"].as_mapping().unwrap();
    let mut runs = BTreeMap::new();
    for (name, svc) in services {
        let name = text(name);
        if !svc["build"].is_null() {
            runs.insert(name.clone(), check_compose_service(&ws, &name, svc));
        }
        for (src, dst) in compose_mounts(svc) {
            match src {
                Source::Host(h) => assert!(h.exists(), "{name}: mounted {} is missing", rel(&h)),
                Source::Volume(v) => assert!(
                    doc["volumes"]
                        .as_mapping()
                        .unwrap()
                        .contains_key(v.as_str()),
                    "{name}: volume {v} ({dst}) is not declared"
                ),
            }
        }
    }
    // The seed scenario: the router, the broker definitions, and each system installed and run
    // by `concord-sql` with its own config.
    let policy_systems = broker_users(&seed_policy());
    let run_systems: BTreeSet<String> = runs
        .values()
        .filter(|r| r.binary == "concord-sql" && r.args[0] == "run")
        .filter_map(|r| r.system.clone())
        .collect();
    let installed: BTreeSet<String> = runs
        .values()
        .filter(|r| r.binary == "concord-sql" && r.args[0] == "install")
        .filter_map(|r| r.system.clone())
        .collect();
    let systems: BTreeSet<String> = policy_systems
        .iter()
        .filter(|u| !matches!(u.as_str(), "router" | "operator"))
        .cloned()
        .collect();
    assert_eq!(run_systems, systems, "one adapter per system");
    assert_eq!(installed, systems, "one install step per system");
    let commands: Vec<String> = runs
        .values()
        .filter(|r| r.binary == "concord")
        .map(|r| r.args[0].clone())
        .collect();
    assert!(commands.contains(&"router".to_owned()), "{commands:?}");
    assert!(commands.contains(&"broker-defs".to_owned()), "{commands:?}");
    // Every broker URI names the broker service.
    for (name, r) in &runs {
        if let Some((_, _, host)) = &r.amqp {
            assert!(
                services.contains_key(host.as_str()),
                "{name}: broker {host}"
            );
            assert_eq!(host, "rabbitmq");
        }
    }
}

#[test]
fn compose_broker_setup_loads_the_definitions_with_the_documented_contract() {
    let ws = workspace();
    let doc = compose();
    let svc = &doc["services"]["broker-setup"];
    let run = check_compose_service(&ws, "broker-setup", svc);
    assert_eq!(
        run.args,
        [
            "broker-defs",
            "--policy",
            "/etc/concord/policy.toml",
            "--config",
            "/etc/concord/router.toml",
            "--load",
            "http://rabbitmq:15672",
        ]
    );
    // The management API of the broker service.
    let conf = read(&root().join("deploy/rabbitmq/rabbitmq.conf"));
    assert!(
        conf.lines()
            .any(|l| l.trim() == "management.tcp.port = 15672")
    );
    assert!(doc["services"]["rabbitmq"].is_mapping());
    // Every user's password and the administrator's credentials, from the environment.
    let env = compose_env(svc);
    for user in broker_users(&seed_policy()) {
        assert!(
            env.contains_key(&password_var(&user)),
            "no password for {user}"
        );
    }
    for v in BROKER_ADMIN_VARS {
        assert!(env.contains_key(v), "{v}");
    }
    // The administrator is the one the broker image creates.
    let demo = env_file(&root().join("deploy/demo.env"));
    assert_eq!(demo["CONCORD_ADMIN_USER"], demo["RABBITMQ_DEFAULT_USER"]);
    assert_eq!(
        demo["CONCORD_ADMIN_PASSWORD"],
        demo["RABBITMQ_DEFAULT_PASS"]
    );
    // Once `concord broker-defs` is in this tree, it must read the variables given here.
    let sources = ws.sources["concord"]
        .iter()
        .flat_map(|d| {
            let mut f = Vec::new();
            rust_files(d, &mut f);
            f
        })
        .map(|f| read(&f))
        .collect::<String>();
    if sources.contains("\"broker-defs\"") || sources.contains("BrokerDefs") {
        assert!(
            sources.contains("CONCORD_BROKER_PASSWORD_"),
            "`concord broker-defs` does not read CONCORD_BROKER_PASSWORD_<USER>"
        );
        for v in BROKER_ADMIN_VARS {
            assert!(
                sources.contains(v),
                "`concord broker-defs` does not read {v}"
            );
        }
    }
}

#[test]
fn compose_identity_is_one_broker_user_per_system_and_no_guest() {
    let doc = compose();
    let demo_path = root().join("deploy/demo.env");
    let demo_text = read(&demo_path);
    assert!(
        demo_text.lines().next().unwrap().contains("DEMO ONLY"),
        "deploy/demo.env must say it is for the demo only, first"
    );
    let demo = env_file(&demo_path);
    let users = broker_users(&seed_policy());
    let password_vars: BTreeSet<String> = demo
        .keys()
        .filter(|k| k.starts_with("CONCORD_BROKER_PASSWORD_"))
        .cloned()
        .collect();
    assert_eq!(
        password_vars,
        users.iter().map(|u| password_var(u)).collect(),
        "one password per broker user"
    );
    assert!(!users.contains("guest"));
    assert_ne!(demo["RABBITMQ_DEFAULT_USER"], "guest");
    // Passwords go into URIs as they are.
    for (k, v) in &demo {
        if k.contains("PASS") {
            assert!(
                !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c)),
                "{k} is not URI-safe"
            );
        }
    }
    // The broker keeps guest's default (localhost only) and creates no guest at all.
    let conf = read(&root().join("deploy/rabbitmq/rabbitmq.conf"));
    assert!(!conf.contains("loopback_users"), "guest must stay local");
    assert_eq!(
        compose_env(&doc["services"]["rabbitmq"])["RABBITMQ_DEFAULT_USER"],
        demo["RABBITMQ_DEFAULT_USER"]
    );
    // No service connects as guest, and every demo variable is used by some service.
    let services = doc["services"].as_mapping().unwrap();
    let whole = read(&root().join("docker-compose.yml"));
    assert!(
        !whole
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("guest")),
        "docker-compose.yml uses guest"
    );
    let mut used = BTreeSet::new();
    let image_env = [
        "RABBITMQ_DEFAULT_USER",
        "RABBITMQ_DEFAULT_PASS",
        "POSTGRES_PASSWORD",
        "MARIADB_ROOT_PASSWORD",
        "MARIADB_PASSWORD",
    ];
    for (_, svc) in services {
        let scripts: String = words(&svc["entrypoint"]).unwrap_or_default().join(" ");
        used.extend(shell_vars(&unescape(&scripts)));
    }
    used.extend(BROKER_ADMIN_VARS.iter().map(|s| (*s).to_owned()));
    used.extend(users.iter().map(|u| password_var(u)));
    for f in ["orders", "support", "delivery"] {
        let c = adapter_config(&root().join(format!("deploy/sql/{f}.toml")));
        used.extend(sql_config_env(&c.adapter));
    }
    for k in demo.keys() {
        assert!(
            used.contains(k) || image_env.contains(&k.as_str()),
            "deploy/demo.env: nothing reads {k}"
        );
    }
    // The databases' passwords the adapters put in their URLs are the ones the images set.
    let orders = adapter_config(&root().join("deploy/sql/orders.toml"));
    assert!(orders.adapter.url.unwrap().contains("${POSTGRES_PASSWORD}"));
    let support = adapter_config(&root().join("deploy/sql/support.toml"));
    assert!(support.adapter.url.unwrap().contains("${MARIADB_PASSWORD}"));
}

#[test]
fn compose_services_start_in_order() {
    let doc = compose();
    let services = doc["services"].as_mapping().unwrap();
    for (name, svc) in services {
        let name = text(name);
        let Some(deps) = svc["depends_on"].as_mapping() else {
            continue;
        };
        for (dep, cond) in deps {
            let dep = text(dep);
            let target = &services[dep.as_str()];
            assert!(target.is_mapping(), "{name} depends on unknown {dep}");
            match text(&cond["condition"]).as_str() {
                "service_healthy" => assert!(
                    !target["healthcheck"].is_null(),
                    "{name} waits for {dep} to be healthy: it has no healthcheck"
                ),
                "service_completed_successfully" => assert_eq!(
                    text(&target["restart"]),
                    "no",
                    "{name} waits for {dep} to complete: it must be one-shot"
                ),
                other => panic!("{name}: condition {other}"),
            }
        }
    }
    let deps = |s: &str| -> BTreeSet<String> {
        services[s]["depends_on"]
            .as_mapping()
            .map(|m| m.keys().map(text).collect())
            .unwrap_or_default()
    };
    // The broker's users and topology exist before the router connects; the adapters start once
    // their capture is installed and the router is ready.
    assert!(deps("router").contains("broker-setup"));
    assert!(deps("broker-setup").contains("rabbitmq"));
    for system in ["orders", "support", "delivery"] {
        let d = deps(system);
        assert!(d.contains(&format!("{system}-install")), "{system}: {d:?}");
        assert!(d.contains("router"), "{system}: {d:?}");
    }
    assert!(deps("orders-install").contains("postgres"));
    assert!(deps("support-install").contains("mariadb"));
    // The databases run their DDL from their init directories.
    for (db, system) in [("postgres", "orders"), ("mariadb", "support")] {
        let mounted = compose_host_file(
            &services[db],
            &format!("/docker-entrypoint-initdb.d/{system}.sql"),
        );
        assert_eq!(mounted, root().join(format!("deploy/sql/{system}.sql")));
    }
}

#[test]
fn the_broker_takes_what_concord_sends() {
    let conf = read(&root().join("deploy/rabbitmq/rabbitmq.conf"));
    let max: usize = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("max_message_size = "))
        .expect("max_message_size")
        .parse()
        .unwrap();
    assert_eq!(max, 2 * 1024 * 1024, "the documented 2 MiB broker limit");
    let router = router_config(&root().join("deploy/router.toml"));
    assert!(router.max_message_bytes <= max);
    for f in ["orders", "support", "delivery"] {
        let c = adapter_config(&root().join(format!("deploy/sql/{f}.toml")));
        assert!(c.runner.max_message_bytes <= max, "{f}");
    }
    let plugins = read(&root().join("deploy/rabbitmq/enabled_plugins"));
    for p in [
        "rabbitmq_management",
        "rabbitmq_consistent_hash_exchange",
        "rabbitmq_prometheus",
    ] {
        assert!(plugins.contains(p), "{p}");
    }
    // The same limit and plugin on Kubernetes.
    let cluster = yaml(&root().join("deploy/k8s/base/rabbitmq/rabbitmqcluster.yaml"));
    let extra = text(&cluster["spec"]["rabbitmq"]["additionalConfig"]);
    assert!(
        extra
            .lines()
            .any(|l| l.trim() == format!("max_message_size = {max}"))
    );
    let k8s_router = router_config(&root().join("deploy/k8s/base/router/router.toml"));
    assert!(k8s_router.max_message_bytes <= max);
    assert!(
        seq(&cluster["spec"]["rabbitmq"]["additionalPlugins"])
            .iter()
            .any(|p| text(p) == "rabbitmq_consistent_hash_exchange")
    );
    assert_eq!(cluster["spec"]["replicas"].as_u64(), Some(3));
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile.

/// The images the deployment files run, by Dockerfile target.
const TARGETS: [&str; 2] = ["router", "sql"];

/// The unprivileged user every image runs as.
const UID: u64 = 10001;

#[test]
fn the_dockerfile_builds_every_binary_it_ships_and_runs_them_unprivileged() {
    let ws = workspace();
    let df = dockerfile(&root().join("deploy/docker/Dockerfile"));
    let build = df.stage("build");
    let cargo = build
        .instrs
        .iter()
        .find(|i| i.op == "RUN" && i.args.contains("cargo build"))
        .expect("cargo build");
    let words: Vec<&str> = cargo.args.split_whitespace().collect();
    assert!(words.contains(&"--locked"), "build exactly Cargo.lock");
    assert!(words.contains(&"--release"));
    // Cache-friendly: the registry and the target directory in cache mounts.
    for target in ["/usr/local/cargo/registry", "/src/target"] {
        assert!(
            words
                .iter()
                .any(|w| w.starts_with("--mount=type=cache")
                    && w.contains(&format!("target={target}"))),
            "no cache mount for {target}"
        );
    }
    let build_command: Vec<&str> = cargo
        .args
        .split("&&")
        .find(|c| c.contains("cargo build"))
        .unwrap()
        .split_whitespace()
        .collect();
    let packages: BTreeSet<&str> = build_command
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    for p in &packages {
        assert!(ws.sources.contains_key(*p), "no package {p}");
    }
    // The binaries copied out of the cache mount are binaries of the packages built.
    let out: BTreeSet<String> = words
        .iter()
        .filter_map(|w| w.strip_prefix("target/release/"))
        .map(str::to_owned)
        .collect();
    assert!(!out.is_empty());
    for bin in &out {
        let package = ws
            .binaries
            .get(bin)
            .unwrap_or_else(|| panic!("no binary {bin}"));
        assert!(
            packages.contains(package.as_str()),
            "{bin}: -p {package} is missing"
        );
    }
    assert!(cargo.args.contains("/out/"));

    // Every file copied from the build context exists and is not left out of it.
    let ignored: Vec<String> = read(&root().join("deploy/docker/Dockerfile.dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for stage in &df.stages {
        for i in stage.instrs.iter().filter(|i| i.op == "COPY") {
            let (options, sources, _) = copy_parts(&i.args);
            if let Some(from) = options.get("from") {
                df.stage(from);
                continue;
            }
            for src in sources {
                if src == "." {
                    continue;
                }
                assert!(root().join(&src).exists(), "COPY {src}: missing");
                assert!(
                    !ignored.iter().any(|p| src.starts_with(p.as_str())),
                    "COPY {src}: excluded by the .dockerignore"
                );
            }
        }
    }

    for target in TARGETS {
        let entrypoint = df.entrypoint(target);
        assert_eq!(entrypoint.len(), 1, "{target}: {entrypoint:?}");
        let bin = &entrypoint[0];
        assert!(out.contains(bin), "{target}: {bin} is not built");
        assert_eq!(
            df.copied(target)[&format!("/usr/local/bin/{bin}")],
            (Some("build".to_owned()), format!("/out/{bin}")),
            "{target}"
        );
        // Small runtime images, an unprivileged numeric user.
        let base = df.base_image(target);
        assert!(
            base.contains("-slim") || base.contains("distroless"),
            "{target}: {base}"
        );
        assert_eq!(
            df.last(target, "USER").as_deref(),
            Some(format!("{UID}:{UID}").as_str()),
            "{target}"
        );
        let last_user = df.stage(target).instrs.iter().rposition(|i| i.op == "USER");
        let last_run = df.stage(target).instrs.iter().rposition(|i| i.op == "RUN");
        assert!(last_user > last_run, "{target}: USER after the last RUN");
    }
    // The router image's default command is the router with the mounted deployment.
    let cmd = df.cmd("router");
    assert_eq!(cmd[0], "router");
    assert_eq!(flag(&cmd, "--policy"), Some("/etc/concord/policy.toml"));
    assert_eq!(flag(&cmd, "--config"), Some("/etc/concord/router.toml"));
    assert_eq!(df.cmd("sql"), ["run"]);
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: the kustomizations, interpreted (resources, generators, images, patches).

#[derive(Debug, Clone, Default)]
struct Build {
    /// Every object, with the file it comes from.
    objects: Vec<(PathBuf, Yaml)>,
    /// Generated ConfigMaps: name → key → the file.
    config_maps: BTreeMap<String, BTreeMap<String, PathBuf>>,
    /// Generated Secrets: name → key → value.
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    namespace: Option<String>,
    /// Every file the build read.
    files: BTreeSet<PathBuf>,
}

/// Kustomize's strategic merge, as far as these files need it: maps merge, lists of named
/// items merge by name, anything else is replaced.
fn merge(base: &mut Yaml, patch: &Yaml) {
    match (base, patch) {
        (Yaml::Mapping(b), Yaml::Mapping(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Yaml::Sequence(b), Yaml::Sequence(p))
            if p.iter().all(|i| i["name"].is_string())
                && b.iter().all(|i| i["name"].is_string()) =>
        {
            for item in p {
                match b.iter_mut().find(|i| i["name"] == item["name"]) {
                    Some(existing) => merge(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn kustomize(dir: &Path) -> Build {
    let file = dir.join("kustomization.yaml");
    let k = yaml(&file);
    assert_eq!(text(&k["kind"]), "Kustomization", "{}", rel(&file));
    assert_eq!(text(&k["apiVersion"]), "kustomize.config.k8s.io/v1beta1");
    let mut b = Build::default();
    b.files.insert(file.clone());
    for r in seq(&k["resources"]).iter().map(text) {
        let path = dir.join(&r);
        if path.is_dir() {
            let sub = kustomize(&path);
            b.objects.extend(sub.objects);
            b.config_maps.extend(sub.config_maps);
            b.secrets.extend(sub.secrets);
            b.files.extend(sub.files);
        } else {
            assert!(path.is_file(), "{}: resource {r} is missing", rel(&file));
            for doc in yaml_docs(&path) {
                b.objects.push((path.clone(), doc));
            }
            b.files.insert(path);
        }
    }
    for g in seq(&k["configMapGenerator"]) {
        let mut files = BTreeMap::new();
        for f in seq(&g["files"]).iter().map(text) {
            let (key, f) = f.split_once('=').map_or_else(
                || {
                    (
                        Path::new(&f)
                            .file_name()
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                        f.clone(),
                    )
                },
                |(k, f)| (k.to_owned(), f.to_owned()),
            );
            let path = dir.join(&f);
            assert!(
                path.is_file(),
                "{}: configMapGenerator file {f} is missing",
                rel(&file)
            );
            b.files.insert(path.clone());
            files.insert(key, path);
        }
        b.config_maps.insert(text(&g["name"]), files);
    }
    for g in seq(&k["secretGenerator"]) {
        let mut keys = BTreeMap::new();
        for f in seq(&g["envs"]).iter().map(text) {
            let path = dir.join(&f);
            assert!(
                path.is_file(),
                "{}: secretGenerator envs {f} is missing",
                rel(&file)
            );
            keys.extend(env_file(&path));
            b.files.insert(path);
        }
        for l in seq(&g["literals"]).iter().map(text) {
            let (k, v) = l.split_once('=').unwrap();
            keys.insert(k.to_owned(), v.to_owned());
        }
        b.secrets.insert(text(&g["name"]), keys);
    }
    for p in seq(&k["patches"]) {
        let path = dir.join(text(&p["path"]));
        assert!(
            path.is_file(),
            "{}: patch {} is missing",
            rel(&file),
            rel(&path)
        );
        b.files.insert(path.clone());
        let patch = yaml(&path);
        let target = b
            .objects
            .iter_mut()
            .find(|(_, o)| {
                o["kind"] == patch["kind"] && o["metadata"]["name"] == patch["metadata"]["name"]
            })
            .unwrap_or_else(|| panic!("{}: patches nothing", rel(&path)));
        merge(&mut target.1, &patch);
    }
    for image in seq(&k["images"]) {
        let name = text(&image["name"]);
        for (_, o) in &mut b.objects {
            for c in pod_containers_mut(o) {
                if c["image"].as_str() == Some(name.as_str()) {
                    let new_name = image["newName"].as_str().unwrap_or(&name).to_owned();
                    let tag = image["newTag"]
                        .as_str()
                        .map(|t| format!(":{t}"))
                        .unwrap_or_default();
                    c["image"] = Yaml::String(format!("{new_name}{tag}"));
                }
            }
        }
    }
    if let Some(ns) = k["namespace"].as_str() {
        b.namespace = Some(ns.to_owned());
    }
    b
}

fn pod_spec(o: &Yaml) -> Option<&Yaml> {
    matches!(
        o["kind"].as_str(),
        Some("Deployment" | "StatefulSet" | "Job")
    )
    .then(|| &o["spec"]["template"]["spec"])
}

fn pod_containers_mut(o: &mut Yaml) -> Vec<&mut Yaml> {
    if !matches!(
        o["kind"].as_str(),
        Some("Deployment" | "StatefulSet" | "Job")
    ) {
        return Vec::new();
    }
    let spec = &mut o["spec"]["template"]["spec"];
    let mut out = Vec::new();
    let Yaml::Mapping(m) = spec else {
        return out;
    };
    for (k, v) in m.iter_mut() {
        if matches!(k.as_str(), Some("containers" | "initContainers"))
            && let Yaml::Sequence(items) = v
        {
            out.extend(items.iter_mut());
        }
    }
    out
}

/// Init containers first, as they run.
fn containers(spec: &Yaml) -> Vec<Yaml> {
    let mut all = seq(&spec["initContainers"]);
    all.extend(seq(&spec["containers"]));
    all
}

impl Build {
    fn of_kind(&self, kind: &str) -> Vec<&Yaml> {
        self.objects
            .iter()
            .map(|(_, o)| o)
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    }

    fn named(&self, kind: &str, name: &str) -> &Yaml {
        self.of_kind(kind)
            .into_iter()
            .find(|o| o["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    fn rabbitmq(&self) -> String {
        let clusters = self.of_kind("RabbitmqCluster");
        assert_eq!(clusters.len(), 1);
        text(&clusters[0]["metadata"]["name"])
    }
}

/// What is mounted at `path` in a container of pod `spec`.
#[derive(Debug, Clone, PartialEq)]
enum Mounted {
    /// A file of a generated ConfigMap.
    File(PathBuf),
    EmptyDir(String),
    Claim(String),
}

fn k8s_mounted(b: &Build, spec: &Yaml, container: &Yaml, path: &str) -> Option<Mounted> {
    for m in seq(&container["volumeMounts"]) {
        let mount = text(&m["mountPath"]);
        let Ok(rest) = Path::new(path).strip_prefix(&mount) else {
            continue;
        };
        let volume = seq(&spec["volumes"])
            .into_iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {:?}", m["name"]));
        if !volume["emptyDir"].is_null() {
            return Some(Mounted::EmptyDir(text(&volume["name"])));
        }
        if !volume["persistentVolumeClaim"].is_null() {
            return Some(Mounted::Claim(text(
                &volume["persistentVolumeClaim"]["claimName"],
            )));
        }
        let sources: Vec<Yaml> = if volume["projected"].is_null() {
            vec![volume.clone()]
        } else {
            seq(&volume["projected"]["sources"])
        };
        for s in sources {
            let name = text(&s["configMap"]["name"]);
            let files = b
                .config_maps
                .get(&name)
                .unwrap_or_else(|| panic!("no ConfigMap {name} is generated"));
            let items: Vec<(String, String)> = match s["configMap"]["items"].as_sequence() {
                Some(items) => items
                    .iter()
                    .map(|i| (text(&i["key"]), text(&i["path"])))
                    .collect(),
                None => files.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, at) in items {
                let file = files
                    .get(&key)
                    .unwrap_or_else(|| panic!("ConfigMap {name} has no key {key}"));
                if Path::new(&at) == rest {
                    return Some(Mounted::File(file.clone()));
                }
            }
        }
    }
    None
}

fn k8s_file(b: &Build, spec: &Yaml, container: &Yaml, path: &str) -> PathBuf {
    match k8s_mounted(b, spec, container, path) {
        Some(Mounted::File(f)) => f,
        other => panic!(
            "{}: {path} is {other:?}, not a file",
            text(&container["name"])
        ),
    }
}

/// The policy at `path` in a container, loaded from the files mounted there, every schema file
/// it names mounted at the same place relative to it.
fn check_k8s_policy(b: &Build, spec: &Yaml, c: &Yaml, path: &str) -> PathBuf {
    let host = k8s_file(b, spec, c, path);
    let d = concord_schema::Deployment::load(&host).unwrap_or_else(|e| panic!("{e}"));
    let host_dir = host.parent().unwrap().canonicalize().unwrap();
    let dir = Path::new(path).parent().unwrap();
    for source in d.schema.sources() {
        let inside = dir.join(source.strip_prefix(&host_dir).unwrap());
        let mounted = k8s_file(b, spec, c, inside.to_str().unwrap());
        assert_eq!(
            mounted.canonicalize().unwrap(),
            *source,
            "{}",
            inside.display()
        );
    }
    host
}

/// The Secrets these files expect to exist without generating them, documented in the base.
fn documented_secret(b: &Build, name: &str, key: &str) -> bool {
    if name == format!("{}-default-user", b.rabbitmq()) {
        return matches!(key, "username" | "password");
    }
    let doc = read(&root().join("deploy/k8s/base/kustomization.yaml"));
    doc.contains(name) && doc.contains(key)
}

/// A container's environment: name → (literal value | where it comes from).
fn k8s_env(b: &Build, c: &Yaml, what: &str) -> BTreeMap<String, Option<String>> {
    let mut env = BTreeMap::new();
    for e in seq(&c["env"]) {
        let name = text(&e["name"]);
        let value = e["value"].as_str().map(str::to_owned);
        // $(NAME) refers to a variable defined before.
        if let Some(v) = &value {
            for (i, _) in v.match_indices("$(") {
                let r = &v[i + 2..i + 2 + v[i + 2..].find(')').unwrap()];
                assert!(
                    env.contains_key(r),
                    "{what}: {name} refers to $({r}), defined after it or never"
                );
            }
        }
        let secret = &e["valueFrom"]["secretKeyRef"];
        if !secret.is_null() {
            let (s, k) = (text(&secret["name"]), text(&secret["key"]));
            match b.secrets.get(&s) {
                Some(keys) => assert!(keys.contains_key(&k), "{what}: Secret {s} has no key {k}"),
                None => assert!(
                    documented_secret(b, &s, &k),
                    "{what}: Secret {s} ({k}) is neither generated nor documented"
                ),
            }
        }
        env.insert(name, value);
    }
    for from in seq(&c["envFrom"]) {
        let s = text(&from["secretRef"]["name"]);
        let prefix = from["prefix"].as_str().unwrap_or_default().to_owned();
        match b.secrets.get(&s) {
            Some(keys) => {
                for k in keys.keys() {
                    env.insert(format!("{prefix}{k}"), None);
                }
            }
            None => assert!(
                documented_secret(b, &s, ""),
                "{what}: Secret {s} is neither generated nor documented"
            ),
        }
    }
    env
}

fn k8s_port(c: &Yaml, name: &str) -> u16 {
    seq(&c["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .map(|p| p["containerPort"].as_u64().unwrap() as u16)
        .unwrap_or_else(|| panic!("{}: no port {name}", text(&c["name"])))
}

fn check_k8s_probes(c: &Yaml, what: &str) {
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{what}: {probe}");
        assert_eq!(get["port"].as_str(), Some("http"), "{what}: {probe}");
    }
}

/// Memory in MiB from a Kubernetes quantity (`Mi` or `Gi`).
fn mebibytes(q: &str) -> u64 {
    if let Some(n) = q.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = q.strip_suffix("Gi") {
        n.parse::<u64>().unwrap() * 1024
    } else {
        panic!("write memory in Mi or Gi: {q}")
    }
}

/// The image target of one of our images (`None`: someone else's image).
fn our_target(image: &str) -> Option<&'static str> {
    let name = image.rsplit('/').next().unwrap().split(':').next().unwrap();
    match name {
        "concord-router" => Some("router"),
        "concord-sql" => Some("sql"),
        _ => None,
    }
}

/// Everything the workloads of one build run, checked against the code. Returns the systems
/// whose adapter runs (`concord-sql run`).
fn check_k8s_build(ws: &Workspace, b: &Build, overlay: bool) -> BTreeSet<String> {
    let df = dockerfile(&root().join("deploy/docker/Dockerfile"));
    let cluster = b.rabbitmq();
    let mut running = BTreeSet::new();
    for o in b.objects.iter().map(|(_, o)| o) {
        let Some(spec) = pod_spec(o) else { continue };
        let workload = text(&o["metadata"]["name"]);
        if !containers(spec)
            .iter()
            .any(|c| our_target(&text(&c["image"])).is_some())
        {
            continue;
        }
        let pod = &spec["securityContext"];
        assert_eq!(pod["runAsNonRoot"].as_bool(), Some(true), "{workload}");
        assert_eq!(
            pod["runAsUser"].as_u64(),
            Some(UID),
            "{workload}: the image's user"
        );
        for v in seq(&spec["volumes"]) {
            if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                b.named("PersistentVolumeClaim", claim);
            }
        }
        for c in containers(spec) {
            let what = format!("{workload}/{}", text(&c["name"]));
            let image = text(&c["image"]);
            let Some(stage) = our_target(&image) else {
                continue;
            };
            assert_eq!(
                image.contains(':'),
                overlay,
                "{what}: {image}: overlays set the tag"
            );
            let security = &c["securityContext"];
            assert_eq!(
                security["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{what}"
            );
            assert_eq!(
                security["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{what}"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{what}: memory limit"
            );
            let command = words(&c["command"]);
            let args = words(&c["args"]).unwrap_or_else(|| {
                if command.is_some() {
                    Vec::new()
                } else {
                    df.cmd(stage)
                }
            });
            let argv: Vec<String> = command
                .unwrap_or_else(|| df.entrypoint(stage))
                .into_iter()
                .chain(args)
                .collect();
            let inv = invocation(&argv);
            let env = k8s_env(b, &c, &what);
            let refs: BTreeSet<String> = env
                .values()
                .flatten()
                .flat_map(|v| {
                    v.match_indices("$(")
                        .map(|(i, _)| v[i + 2..i + 2 + v[i + 2..].find(')').unwrap()].to_owned())
                        .collect::<Vec<_>>()
                })
                .collect();
            let Some(binary) = inv.binary.clone() else {
                // A script: it reads what it is given, and is given what it reads.
                let script = inv.script.clone().unwrap();
                for v in &inv.script_vars {
                    assert!(
                        env.contains_key(v),
                        "{what}: the script reads {v}, which is not set"
                    );
                }
                for v in env.keys() {
                    assert!(
                        inv.script_vars.contains(v),
                        "{what}: the script does not read {v}"
                    );
                }
                if let Some(sql) = script.strip_prefix("sqlite3 ") {
                    let (db, ddl) = sql.split_once(" < ").unwrap();
                    let ddl = k8s_file(b, spec, &c, ddl.trim());
                    assert_eq!(read(&ddl), read(&root().join("deploy/sql/delivery.sql")));
                    assert!(
                        matches!(k8s_mounted(b, spec, &c, db), Some(Mounted::Claim(_))),
                        "{what}: {db}"
                    );
                }
                continue;
            };
            assert!(ws.binaries.contains_key(&binary), "{what}: {binary}");
            assert!(
                df.installs(stage, &binary),
                "{what}: {binary} is not in {stage}"
            );
            let mut read_env = ws.env_read_by(&binary);
            if binary == "concord-sql" {
                let config =
                    adapter_config(&k8s_file(b, spec, &c, flag(&inv.args, "--config").unwrap()));
                read_env.extend(sql_config_env(&config.adapter));
            }
            for name in env.keys() {
                assert!(
                    read_env.contains(name)
                        || refs.contains(name)
                        || binary == "concord" && inv.args[0] == "broker-defs",
                    "{what}: {binary} does not read {name}"
                );
            }
            let amqp = env
                .get("CONCORD_AMQP_URI")
                .map(|u| amqp_login(u.as_deref().unwrap()));
            match (binary.as_str(), inv.args[0].as_str()) {
                ("concord", "router") => {
                    check_k8s_policy(b, spec, &c, flag(&inv.args, "--policy").unwrap());
                    let config_path = flag(&inv.args, "--config").unwrap();
                    // Written by an init container of the pod from the ConfigMap's file.
                    let template = match k8s_mounted(b, spec, &c, config_path) {
                        Some(Mounted::File(f)) => f,
                        Some(Mounted::EmptyDir(_)) => {
                            let writer = seq(&spec["initContainers"])
                                .into_iter()
                                .find(|i| {
                                    words(&i["command"]).is_some_and(|w| {
                                        w.iter().any(|w| w.contains(&format!("> {config_path}")))
                                    })
                                })
                                .unwrap_or_else(|| panic!("{what}: nothing writes {config_path}"));
                            let script = &words(&writer["command"]).unwrap()[2];
                            let source = script
                                .split_whitespace()
                                .skip_while(|w| *w != "cat")
                                .nth(1)
                                .unwrap();
                            k8s_file(b, spec, &writer, source)
                        }
                        other => panic!("{what}: {config_path} is {other:?}"),
                    };
                    let config = router_config(&template);
                    assert!(
                        config.replicas.is_none() && config.replica_index.is_none(),
                        "{}: set per replica",
                        rel(&template)
                    );
                    assert_eq!(k8s_port(&c, "http"), port_of(&config.http_listen), "{what}");
                    check_k8s_probes(&c, &what);
                    let limit = mebibytes(&text(&c["resources"]["limits"]["memory"]));
                    assert!(
                        limit >= config.memory_budget_mib + 48,
                        "{what}: memory limit {limit} Mi below the budget + 48 Mi"
                    );
                    assert!(config.require_user_id);
                    assert!(
                        config.watch_policy,
                        "{what}: a ConfigMap update of the policy is reloaded in place"
                    );
                    let (user, password, host) = amqp.clone().expect("CONCORD_AMQP_URI");
                    assert_eq!((user.as_str(), host.as_str()), ("router", cluster.as_str()));
                    assert_eq!(password, format!("$({})", password_var("router")));
                    let service = b.named("Service", &text(&o["spec"]["serviceName"]));
                    assert_eq!(
                        service["spec"]["clusterIP"].as_str(),
                        Some("None"),
                        "headless"
                    );
                }
                ("concord", "broker-defs") => {
                    check_k8s_policy(b, spec, &c, flag(&inv.args, "--policy").unwrap());
                    router_config(&k8s_file(b, spec, &c, flag(&inv.args, "--config").unwrap()));
                    assert_eq!(
                        flag(&inv.args, "--load"),
                        Some(format!("http://{cluster}:15672").as_str())
                    );
                    for v in BROKER_ADMIN_VARS {
                        assert!(env.contains_key(v), "{what}: {v}");
                    }
                    let from = &seq(&c["envFrom"])[0];
                    assert_eq!(from["prefix"].as_str(), Some("CONCORD_BROKER_PASSWORD_"));
                    let secret = text(&from["secretRef"]["name"]);
                    if let Some(keys) = b.secrets.get(&secret) {
                        let users = broker_users(&seed_policy());
                        assert_eq!(
                            keys.keys()
                                .map(|k| format!("CONCORD_BROKER_PASSWORD_{k}"))
                                .collect::<BTreeSet<_>>(),
                            users.iter().map(|u| password_var(u)).collect(),
                            "{what}: one password per broker user"
                        );
                    }
                }
                ("concord-sql", sub @ ("run" | "install")) => {
                    let config = adapter_config(&k8s_file(
                        b,
                        spec,
                        &c,
                        flag(&inv.args, "--config").unwrap(),
                    ));
                    let runner = &config.runner;
                    let policy = check_k8s_policy(b, spec, &c, runner.policy.to_str().unwrap());
                    assert!(broker_users(&policy).contains(&runner.system));
                    for v in sql_config_env(&config.adapter) {
                        assert!(
                            env.contains_key(&v),
                            "{what}: the config reads {v}, which is not set"
                        );
                    }
                    if let Some(db) = config
                        .adapter
                        .url
                        .as_deref()
                        .and_then(|u| u.strip_prefix("sqlite://"))
                    {
                        assert!(
                            matches!(k8s_mounted(b, spec, &c, db), Some(Mounted::Claim(_))),
                            "{what}: {db}"
                        );
                    }
                    if sub == "run" {
                        assert!(
                            matches!(
                                k8s_mounted(b, spec, &c, runner.state.to_str().unwrap()),
                                Some(Mounted::Claim(_))
                            ),
                            "{what}: the state store must persist"
                        );
                        assert_eq!(k8s_port(&c, "http"), config.http_listen.port(), "{what}");
                        check_k8s_probes(&c, &what);
                        let (user, password, host) = amqp.clone().expect("CONCORD_AMQP_URI");
                        assert_eq!(user, runner.system, "{what}: the broker user is the system");
                        assert_eq!(host, cluster);
                        assert_eq!(password, format!("$({})", password_var(&runner.system)));
                        assert_eq!(o["kind"].as_str(), Some("Deployment"));
                        assert_eq!(
                            o["spec"]["replicas"].as_u64(),
                            Some(1),
                            "{what}: one process per system"
                        );
                        assert_eq!(
                            o["spec"]["strategy"]["type"].as_str(),
                            Some("Recreate"),
                            "{what}"
                        );
                        assert!(
                            running.insert(runner.system.clone()),
                            "{what}: a second adapter of {}",
                            runner.system
                        );
                    } else {
                        assert!(
                            seq(&spec["initContainers"])
                                .iter()
                                .any(|i| i["name"] == c["name"]),
                            "{what}: install before the adapter starts"
                        );
                    }
                }
                (b, sub) => panic!("{what}: what is `{b} {sub}`?"),
            }
        }
    }
    running
}

fn k8s_builds() -> Vec<(String, Build)> {
    let k8s = root().join("deploy/k8s");
    let mut builds = vec![("base".to_owned(), kustomize(&k8s.join("base")))];
    for overlay in std::fs::read_dir(k8s.join("overlays")).unwrap() {
        let dir = overlay.unwrap().path();
        builds.push((
            dir.file_name().unwrap().to_string_lossy().into_owned(),
            kustomize(&dir),
        ));
    }
    builds
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_parses_and_every_kustomization_names_files_that_exist() {
    let builds = k8s_builds();
    let names: Vec<&str> = builds.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"dev") && names.contains(&"production"),
        "{names:?}"
    );
    let mut all = Vec::new();
    yaml_files(&root().join("deploy/k8s"), &mut all);
    let used: BTreeSet<PathBuf> = builds
        .iter()
        .flat_map(|(_, b)| b.files.iter().cloned())
        .collect();
    let mut documents = 0;
    for f in &all {
        // No stray manifest: every file is part of a build.
        assert!(used.contains(f), "{} is in no kustomization", rel(f));
        for doc in yaml_docs(f) {
            for key in ["apiVersion", "kind"] {
                assert!(doc[key].is_string(), "{}: no {key}", rel(f));
            }
            if doc["kind"] != "Kustomization" {
                assert!(doc["metadata"]["name"].is_string(), "{}: no name", rel(f));
            }
            documents += 1;
        }
    }
    assert!(documents >= 15, "{documents} documents");
    // Every generated file is one the code reads (or a DDL file, or the policy's schema).
    for (name, b) in &builds {
        for (cm, files) in &b.config_maps {
            for (key, f) in files {
                let ok = match f.extension().and_then(|e| e.to_str()) {
                    Some("toml") if key == "router.toml" => {
                        router_config(f);
                        true
                    }
                    Some("toml") if key == "policy.toml" => {
                        concord_schema::Deployment::load(f).is_ok()
                    }
                    Some("toml") => {
                        adapter_config(f);
                        true
                    }
                    Some("proto" | "sql") => true,
                    _ => false,
                };
                assert!(ok, "{name}: ConfigMap {cm}: what is {key}?");
            }
        }
        if name != "base" {
            assert!(b.namespace.is_some(), "{name}: set the namespace");
            let ns = b.named("Namespace", b.namespace.as_deref().unwrap());
            assert!(ns.is_mapping());
        }
    }
}

#[test]
fn k8s_workloads_run_the_real_binaries_with_valid_configs() {
    let ws = workspace();
    let systems: BTreeSet<String> = broker_users(&seed_policy())
        .into_iter()
        .filter(|u| !matches!(u.as_str(), "router" | "operator"))
        .collect();
    for (name, b) in k8s_builds() {
        let running = check_k8s_build(&ws, &b, name != "base");
        assert_eq!(
            running, systems,
            "{name}: one adapter Deployment per system"
        );
        let sts = b.named("StatefulSet", "concord-router");
        let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
        for selector in [
            &sts["spec"]["selector"]["matchLabels"],
            &b.named("PodDisruptionBudget", "concord-router")["spec"]["selector"]["matchLabels"],
            &b.named("Service", "concord-router")["spec"]["selector"],
        ] {
            for (k, v) in selector.as_mapping().unwrap() {
                assert_eq!(
                    &pod_labels[k.as_str().unwrap()],
                    v,
                    "{name}: selector {k:?}"
                );
            }
        }
        b.named("Job", "concord-broker-setup");
        if name != "base" {
            // The Secrets the workloads read exist: generated (dev) or documented (production).
            assert!(
                b.secrets.contains_key("concord-broker-users")
                    || documented_secret(&b, "concord-broker-users", "ROUTER"),
                "{name}"
            );
        }
    }
}

#[test]
fn router_replicas_take_their_index_from_the_pod_name() {
    for (name, b) in k8s_builds() {
        let sts = b.named("StatefulSet", "concord-router");
        let spec = &sts["spec"]["template"]["spec"];
        let replicas = sts["spec"]["replicas"].as_u64().unwrap();
        let init = seq(&spec["initContainers"])
            .into_iter()
            .find(|c| c["name"] == "replica-config")
            .expect("the init container replica-config");
        let router = seq(&spec["containers"])
            .into_iter()
            .find(|c| c["name"] == "router")
            .unwrap();
        let command = words(&init["command"]).unwrap();
        assert_eq!(command[..2], ["/bin/sh", "-c"]);
        // Its mounts on temporary directories, with the ConfigMaps' files.
        let dir = tempfile::tempdir().unwrap();
        let mut script = command[2].clone();
        let mut config_at = flag(&words(&router["args"]).unwrap(), "--config")
            .unwrap()
            .to_owned();
        for m in seq(&init["volumeMounts"]) {
            let mount = text(&m["mountPath"]);
            let local = dir.path().join(text(&m["name"]));
            std::fs::create_dir_all(&local).unwrap();
            let volume = seq(&spec["volumes"])
                .into_iter()
                .find(|v| v["name"] == m["name"])
                .unwrap();
            for s in seq(&volume["projected"]["sources"]) {
                for (key, file) in &b.config_maps[&text(&s["configMap"]["name"])] {
                    std::fs::copy(file, local.join(key)).unwrap();
                }
            }
            script = script.replace(&mount, local.to_str().unwrap());
            config_at = config_at.replace(&mount, local.to_str().unwrap());
        }
        let env: BTreeMap<String, Yaml> = seq(&init["env"])
            .into_iter()
            .map(|e| (text(&e["name"]), e))
            .collect();
        assert_eq!(
            env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some("metadata.name"),
            "{name}: the pod name, from the downward API"
        );
        let declared: u64 = text(&env["CONCORD_ROUTER_REPLICAS"]["value"])
            .parse()
            .unwrap();
        assert_eq!(
            declared, replicas,
            "{name}: CONCORD_ROUTER_REPLICAS must equal spec.replicas"
        );
        let mut preferred = BTreeMap::new();
        let mut partitions = 0;
        for i in 0..replicas {
            let pod = format!("{}-{i}", text(&sts["metadata"]["name"]));
            let out = Command::new("sh")
                .args(["-c", &script])
                .env("POD_NAME", &pod)
                .env("CONCORD_ROUTER_REPLICAS", declared.to_string())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let config = RouterConfig::from_toml(&read(Path::new(&config_at)), &pod)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.replicas, Some(replicas as u16), "{pod}");
            assert_eq!(config.replica_index, Some(i as u16), "{pod}");
            partitions = config.partitions;
            for p in config.preferred_partitions() {
                assert!(
                    preferred.insert(p, i).is_none(),
                    "{pod}: partition {p} preferred twice"
                );
            }
        }
        assert!(partitions > 1, "{name}: replicas share a partitioned input");
        assert_eq!(
            preferred.len(),
            usize::from(partitions),
            "{name}: every partition has a replica"
        );
    }
}

#[test]
fn k8s_copies_and_mappings_match_the_compose_ones() {
    let k8s = root().join("deploy/k8s");
    for (copy, source) in [
        ("base/deployment/policy.toml", "examples/seed/policy.toml"),
        (
            "base/deployment/customer.proto",
            "examples/seed/customer.proto",
        ),
        ("base/adapters/delivery.sql", "deploy/sql/delivery.sql"),
        ("overlays/dev/orders.sql", "deploy/sql/orders.sql"),
        ("overlays/dev/support.sql", "deploy/sql/support.sql"),
    ] {
        assert_eq!(
            read(&k8s.join(copy)),
            read(&root().join(source)),
            "deploy/k8s/{copy} is a copy of {source} (kustomize reads no file outside its directory)"
        );
    }
    for system in ["orders", "support", "delivery"] {
        let compose = adapter_config(&root().join(format!("deploy/sql/{system}.toml")));
        let k = adapter_config(&k8s.join(format!("base/adapters/{system}.toml")));
        assert_eq!(k.runner.system, compose.runner.system);
        assert_eq!(
            k.adapter.entities, compose.adapter.entities,
            "{system}: the same mapping"
        );
        assert_eq!(k.runner.policy, compose.runner.policy);
        assert_eq!(k.runner.state, compose.runner.state);
        assert_eq!(
            k.runner.snapshot_on_first_start,
            compose.runner.snapshot_on_first_start
        );
        assert_eq!(k.http_listen, compose.http_listen);
    }
    // The dev overlay's demo credentials agree with each other and with docker-compose's.
    let dev = kustomize(&k8s.join("overlays/dev"));
    let db = &dev.secrets["concord-databases"];
    for (url, password) in [
        ("ORDERS_DB_URL", "ORDERS_DB_PASSWORD"),
        ("SUPPORT_DB_URL", "SUPPORT_DB_PASSWORD"),
    ] {
        let u = &db[url];
        let login = u.split("://").nth(1).unwrap().split('@').next().unwrap();
        assert_eq!(
            login.split(':').nth(1),
            Some(db[password].as_str()),
            "{url}"
        );
        let host = u.split('@').nth(1).unwrap().split(':').next().unwrap();
        dev.named("Service", host);
    }
    let demo = env_file(&root().join("deploy/demo.env"));
    for (k, v) in &dev.secrets["concord-broker-users"] {
        assert_eq!(&demo[&format!("CONCORD_BROKER_PASSWORD_{k}")], v, "{k}");
    }
    for f in ["broker-users.env", "databases.env"] {
        assert!(
            read(&k8s.join("overlays/dev").join(f)).starts_with("# DEMO ONLY"),
            "{f}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics: what the router and the adapters export, read from their /metrics endpoints.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:port: (status, body), retried until the server answers.
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    for _ in 0..200 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
            let mut response = String::new();
            if s.read_to_string(&mut response).is_ok() && !response.is_empty() {
                let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
                let body = response
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default();
                return (status, body);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing answers on port {port}")
}

/// A `concord router` process with no broker to reach: it serves its endpoints anyway.
struct RouterProcess {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RouterProcess {
    fn start() -> RouterProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // The deployment's router config, on a local port and a broker nobody listens on.
        let mut config: toml::Table =
            toml::from_str(&read(&root().join("deploy/router.toml"))).unwrap();
        config.insert("http_listen".into(), format!("127.0.0.1:{port}").into());
        config.insert("amqp_uri".into(), "amqp://router@127.0.0.1:1/%2f".into());
        let path = dir.path().join("router.toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_concord"))
            .args(["router", "--policy"])
            .arg(seed_policy())
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "error")
            .env_remove("CONCORD_AMQP_URI")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let _ = http_get(port, "/healthz");
        RouterProcess {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An adapter with nothing to do: the SDK's process shell around it serves the adapters'
/// metrics.
struct Idle;

impl concord_adapter::SystemAdapter for Idle {}

impl concord_adapter::Adapter for Idle {
    type Config = toml::Table;

    async fn build(
        _: toml::Table,
        _: &concord_adapter::Context,
    ) -> Result<Idle, concord_adapter::AdapterError> {
        Ok(Idle)
    }
}

/// The adapter SDK's /metrics, from its process shell run in-process with a deployment config.
async fn adapter_metrics() -> String {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config: toml::Table =
        toml::from_str(&read(&root().join("deploy/sql/delivery.toml"))).unwrap();
    config.insert("http_listen".into(), format!("127.0.0.1:{port}").into());
    config.insert("amqp_uri".into(), "amqp://delivery@127.0.0.1:1/%2f".into());
    config.insert("policy".into(), seed_policy().display().to_string().into());
    config.insert(
        "state".into(),
        dir.path().join("state.sqlite").display().to_string().into(),
    );
    let path = dir.path().join("delivery.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let process = tokio::spawn(concord_adapter::run_process::<Idle>(
        concord_adapter::Args {
            config: path,
            amqp_uri: None,
            log_format: concord_adapter::process::LogFormat::Human,
            check: false,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let _ = stop.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), process).await;
    body
}

/// The series names an OpenMetrics exposition defines (from its `# TYPE` lines: counters as
/// `_total`, histograms as `_bucket`, `_sum` and `_count`).
fn series(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The series the router registers, from its source: `registry.register*("name", ..,
/// m.field.clone())` with the field's type (counter, gauge, histogram) and unit. A family
/// without any label set yet is not in the exposition at all (no dead letter so far: no
/// `concord_router_dead_lettered_total`), so the live exposition alone is not the whole list.
fn router_registered_series() -> BTreeSet<String> {
    let source = read(&root().join("crates/concord-router/src/metrics.rs"));
    let prefix = literals_after(&source, "Registry::with_prefix(\"")[0].clone();
    let fields = source.split("pub struct Metrics {").nth(1).unwrap();
    let fields: BTreeMap<&str, &str> = fields[..fields.find("\n}").unwrap()]
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').split_once(": "))
        .collect();
    let mut out = String::new();
    for call in source.split("registry.register").skip(1) {
        let call = &call[..call.find(");").unwrap()];
        let name = &literals_after(call, "\"")[0];
        let unit = if call.contains("Unit::Seconds") {
            "_seconds"
        } else {
            ""
        };
        let field = call
            .rsplit(" m.")
            .next()
            .unwrap()
            .split('.')
            .next()
            .unwrap();
        let ty = fields[field];
        let kind = if ty.contains("Histogram") {
            "histogram"
        } else if ty.contains("Gauge") {
            "gauge"
        } else if ty.contains("Counter") {
            "counter"
        } else {
            panic!("{field}: {ty}")
        };
        out.push_str(&format!("# TYPE {prefix}_{name}{unit} {kind}\n"));
    }
    series(&out)
}

/// RabbitMQ's own metrics the dashboard shows (plugin rabbitmq_prometheus, core collector:
/// `queue_coarse_metrics`, `queue_consumer_count` and the totals; RabbitMQ 3.9 and later).
const RABBITMQ_METRICS: [&str; 5] = [
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
    "rabbitmq_connections",
];

/// Identifiers of a PromQL expression outside its string literals.
fn promql_identifiers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_string = false;
    let mut prev = ' ';
    for ch in expr.chars() {
        if ch == '"' && prev != '\\' {
            in_string = !in_string;
        } else if !in_string && (ch.is_ascii_alphanumeric() || ch == '_') {
            current.push(ch);
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
        prev = ch;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The label names of a PromQL expression: in `{...}` matchers and in `by`/`on` clauses.
fn promql_labels(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for clause in ["by (", "on (", "without (", "ignoring ("] {
        for (i, _) in expr.match_indices(clause) {
            let list = &expr[i + clause.len()..];
            labels.extend(
                list[..list.find(')').unwrap()]
                    .split(',')
                    .map(|l| l.trim().to_owned()),
            );
        }
    }
    let mut rest = expr;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').unwrap() + start;
        for matcher in rest[start + 1..end].split(',') {
            let name = matcher.split(['=', '!', '~']).next().unwrap().trim();
            if !name.is_empty() {
                labels.insert(name.to_owned());
            }
        }
        rest = &rest[end + 1..];
    }
    labels
}

/// The label names of the router's metrics, from the label sets its source declares.
fn router_label_names() -> BTreeSet<String> {
    let source = read(&root().join("crates/concord-router/src/metrics.rs"));
    let mut names = BTreeSet::new();
    for block in source.split("EncodeLabelSet)]").skip(1) {
        let body = &block[block.find('{').unwrap() + 1..block.find('}').unwrap()];
        for field in body.split(',') {
            if let Some((name, _)) = field.split_once(':') {
                names.insert(name.trim().to_owned());
            }
        }
    }
    assert!(names.contains("reason"), "{names:?}");
    names
}

fn dashboard_targets(panels: &[serde_json::Value], out: &mut Vec<(String, String)>) {
    for p in panels {
        if let Some(inner) = p["panels"].as_array() {
            dashboard_targets(inner, out);
        }
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no query", p["title"]));
        assert!(!targets.is_empty(), "{}: no query", p["title"]);
        for t in targets {
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
        out.push((
            p["title"].as_str().unwrap().to_owned(),
            format!(
                "description: {}",
                p["description"].as_str().unwrap_or_default()
            ),
        ));
    }
}

#[tokio::test]
async fn the_dashboard_uses_only_metrics_the_code_exports() {
    let router = tokio::task::spawn_blocking(|| {
        let r = RouterProcess::start();
        http_get(r.port, "/metrics")
    })
    .await
    .unwrap();
    assert_eq!(router.0, 200);
    let adapter = adapter_metrics().await;
    let live = series(&router.1);
    let registered = router_registered_series();
    assert!(live.is_subset(&registered), "{live:?} vs {registered:?}");
    let mut exported = registered;
    exported.extend(series(&adapter));
    for sure in [
        "concord_router_connected",
        "concord_adapter_connected",
        "concord_router_deliveries_total",
    ] {
        assert!(exported.contains(sure), "{sure} not in {exported:?}");
    }

    let path = root().join("deploy/grafana/concord.json");
    let dash: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
    let mut targets = Vec::new();
    dashboard_targets(dash["panels"].as_array().unwrap(), &mut targets);
    let mut allowed_labels = router_label_names();
    // The adapters' own label, RabbitMQ's, the scrape's (deploy/prometheus/prometheus.yml),
    // the histograms' bucket bound.
    allowed_labels.extend(
        [
            "system",
            "queue",
            "vhost",
            "namespace",
            "pod",
            "job",
            "instance",
            "le",
        ]
        .map(str::to_owned),
    );
    let mut used = BTreeSet::new();
    for (title, expr) in &targets {
        let description = expr.starts_with("description: ");
        let mut known = 0;
        for id in promql_identifiers(expr) {
            if id.starts_with("concord_") {
                // Descriptions may name a histogram by its name.
                let histogram = description && exported.contains(&format!("{id}_bucket"));
                assert!(
                    exported.contains(&id) || histogram,
                    "{title}: {id} is not exported (exported: {exported:?})"
                );
                used.insert(id);
                known += 1;
            } else if id.starts_with("rabbitmq_") {
                assert!(
                    RABBITMQ_METRICS.contains(&id.as_str()),
                    "{title}: {id} is not a RabbitMQ metric we know"
                );
                used.insert(id);
                known += 1;
            }
        }
        if !description {
            assert!(known > 0, "{title}: {expr} queries no metric");
            for l in promql_labels(expr) {
                assert!(
                    allowed_labels.contains(&l),
                    "{title}: no metric has the label {l}"
                );
            }
        }
    }
    // What the dashboard is for: lag per system, routed / rejected / dead-lettered by reason,
    // confirm latency, inbox depth next to RabbitMQ's own gauges.
    for needed in [
        "concord_router_end_to_end_lag_seconds_bucket",
        "concord_adapter_incoming_total",
        "concord_router_deliveries_total",
        "concord_router_fields_total",
        "concord_router_dead_lettered_total",
        "concord_adapter_dead_lettered_total",
        "concord_router_publish_confirm_seconds_bucket",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    // Every variable it uses is defined; the queue prefix defaults to the deployments' namespace.
    let vars: BTreeMap<String, serde_json::Value> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
        .collect();
    let whole = read(&path);
    for (i, _) in whole.match_indices('$') {
        let name: String = whole[i + 1..]
            .trim_start_matches('{')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !name.chars().next().unwrap().is_ascii_digit() {
            assert!(
                vars.contains_key(&name),
                "${name} is not a dashboard variable"
            );
        }
    }
    assert_eq!(
        vars["ns"]["query"],
        router_config(&root().join("deploy/router.toml")).namespace
    );
    assert_eq!(
        vars["ns"]["query"],
        router_config(&root().join("deploy/k8s/base/router/router.toml")).namespace
    );
    assert_eq!(vars["datasource"]["query"], "prometheus");
}

#[test]
fn the_probe_tells_a_live_router_from_a_ready_one() {
    let router = RouterProcess::start();
    let probe = |path: &str| {
        Command::new("bash")
            .arg(root().join("deploy/docker/concord-probe"))
            .arg(router.port.to_string())
            .arg(path)
            .output()
            .unwrap()
            .status
            .success()
    };
    // Alive at once; not ready without a broker; the endpoints answer as the probe expects.
    assert_eq!(http_get(router.port, "/healthz").0, 200);
    assert_eq!(http_get(router.port, "/readyz").0, 503);
    assert!(probe("/healthz"), "the probe fails a healthy router");
    assert!(
        !probe("/readyz"),
        "the probe passes a router that is not ready"
    );
    assert!(!probe("/nothing-here"));
    let closed = free_port();
    let down = Command::new("bash")
        .arg(root().join("deploy/docker/concord-probe"))
        .arg(closed.to_string())
        .output()
        .unwrap();
    assert!(
        !down.status.success(),
        "the probe passes when nothing listens"
    );
}

#[test]
fn prometheus_scrapes_the_pods_the_manifests_label() {
    let prom = yaml(&root().join("deploy/prometheus/prometheus.yml"));
    let b = kustomize(&root().join("deploy/k8s/base"));
    let jobs: BTreeMap<String, Yaml> = seq(&prom["scrape_configs"])
        .into_iter()
        .map(|j| (text(&j["job_name"]), j))
        .collect();
    let sanitize = |l: &str| l.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    // Which workloads' pods a job's `keep` rules select (label values and container port names).
    let selected = |job: &Yaml| -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for o in b.objects.iter().map(|(_, o)| o) {
            let Some(spec) = pod_spec(o) else { continue };
            let labels = &o["spec"]["template"]["metadata"]["labels"];
            let ports: Vec<String> = containers(spec)
                .iter()
                .flat_map(|c| seq(&c["ports"]))
                .map(|p| text(&p["name"]))
                .collect();
            let keep = seq(&job["relabel_configs"])
                .into_iter()
                .filter(|r| r["action"] == "keep")
                .all(|r| {
                    let regex = text(&r["regex"]);
                    assert!(
                        !regex.contains(['*', '+', '|', '(', '[', '.']),
                        "use literal regexes: {regex}"
                    );
                    let values: Vec<Vec<String>> = seq(&r["source_labels"])
                        .iter()
                        .map(|s| {
                            let s = text(s);
                            if s == "__meta_kubernetes_pod_container_port_name" {
                                ports.clone()
                            } else {
                                let label = s.strip_prefix("__meta_kubernetes_pod_label_").unwrap();
                                labels
                                    .as_mapping()
                                    .unwrap()
                                    .iter()
                                    .filter(|(k, _)| sanitize(k.as_str().unwrap()) == label)
                                    .map(|(_, v)| text(v))
                                    .collect()
                            }
                        })
                        .collect();
                    // Any combination of the sources' values joined with ';' matches.
                    let mut joined = vec![String::new()];
                    for (i, vs) in values.iter().enumerate() {
                        joined = joined
                            .iter()
                            .flat_map(|j| {
                                vs.iter().map(move |v| {
                                    if i == 0 {
                                        v.clone()
                                    } else {
                                        format!("{j};{v}")
                                    }
                                })
                            })
                            .collect();
                    }
                    joined.contains(&regex)
                });
            if keep {
                out.insert(text(&o["metadata"]["name"]));
            }
        }
        out
    };
    assert_eq!(
        selected(&jobs["concord-router"]),
        BTreeSet::from(["concord-router".to_owned()])
    );
    assert_eq!(
        selected(&jobs["concord-adapter"]),
        ["concord-orders", "concord-support", "concord-delivery"]
            .map(str::to_owned)
            .into()
    );
    for job in ["concord-router", "concord-adapter"] {
        assert!(jobs[job]["metrics_path"].is_null(), "{job}: /metrics");
    }
    let rabbitmq = &jobs["rabbitmq"];
    assert_eq!(
        text(&rabbitmq["metrics_path"]),
        "/metrics/per-object",
        "per-queue series"
    );
    let rules = seq(&rabbitmq["relabel_configs"]);
    assert!(rules.iter().any(|r| r["source_labels"][0]
        == "__meta_kubernetes_pod_label_app_kubernetes_io_name"
        && text(&r["regex"]) == b.rabbitmq()));
    assert!(rules.iter().any(|r| r["source_labels"][0]
        == "__meta_kubernetes_pod_container_port_name"
        && r["regex"] == "prometheus"));
    // The labels the dashboard selects on are set on every job.
    for (name, job) in &jobs {
        let targets: BTreeSet<String> = seq(&job["relabel_configs"])
            .iter()
            .filter_map(|r| r["target_label"].as_str().map(str::to_owned))
            .collect();
        for l in ["namespace", "pod"] {
            assert!(targets.contains(l), "{name}: no {l} label");
        }
    }
}

/// The deployment's ConfigMap keeps its name, so the kubelet updates the router's mounted
/// policy in place (which its `watch_policy` follows: `concord-router`'s
/// `a_policy_mounted_from_a_config_map_is_reloaded_when_the_map_changes`); a hashed name would
/// make every policy change a new ConfigMap, mounted only by restarted pods.
#[test]
fn the_policy_config_map_is_updated_in_place() {
    let path = root().join("deploy/k8s/base/kustomization.yaml");
    let k = yaml_docs(&path).remove(0);
    let generators = seq(&k["configMapGenerator"]);
    let deployment = generators
        .iter()
        .find(|g| text(&g["name"]) == "concord-deployment")
        .expect("the concord-deployment ConfigMap");
    assert_eq!(
        deployment["options"]["disableNameSuffixHash"].as_bool(),
        Some(true),
        "{}",
        rel(&path)
    );
}
