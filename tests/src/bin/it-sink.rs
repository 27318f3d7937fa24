//! A sink-only adapter as a separate process, for tests that kill it:
//! `it-sink AMQP_URI NAMESPACE SYSTEM STATE_DB OUT_DIR`.
//!
//! The "business system" is an append-only file of JSON lines, `OUT_DIR/applied.jsonl`: one
//! line `{"event_id", "key", "fields"}` per applied change, written with a single `write` and
//! fsynced before `apply` returns. Its change feed is empty (nothing is ever published).
//!
//! `apply` is idempotent the way a real system makes it so: the event id is its idempotency
//! key, stored in the same atomic append as the data. An `Apply` whose event id is already in
//! the file is not applied again; it is recorded in `OUT_DIR/replays.jsonl` instead, so tests
//! can see how often the SDK re-applied a change (it does after a crash between the system's
//! write and its state-store commit, which cannot be one atomic step).
//!
//! Progress goes to stdout, one line per event, for tests to wait on: `ready` once consuming,
//! `applied <event_id>`, `replayed <event_id>`. SIGTERM stops it gracefully.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use concord_adapter::{AdapterError, Applied, Apply, ApplyOp, RunnerConfig, SystemAdapter};

/// One line of `applied.jsonl` / `replays.jsonl`.
fn line(change: &Apply) -> String {
    let fields: serde_json::Map<String, serde_json::Value> = change
        .fields
        .iter()
        .map(|(name, value)| {
            let v = match value {
                None => serde_json::Value::Null,
                Some(prost_reflect::Value::String(s)) => serde_json::Value::String(s.clone()),
                Some(prost_reflect::Value::I64(n)) => serde_json::Value::from(*n),
                Some(prost_reflect::Value::U32(n)) => serde_json::Value::from(*n),
                Some(other) => serde_json::Value::String(format!("{other:?}")),
            };
            (name.clone(), v)
        })
        .collect();
    let mut text = serde_json::json!({
        "event_id": change.event_id,
        "key": change.key,
        "op": if change.op == ApplyOp::Delete { "delete" } else { "upsert" },
        "fields": fields,
    })
    .to_string();
    text.push('\n');
    text
}

#[derive(Debug)]
struct Files {
    applied: File,
    replays: File,
    ids: HashSet<String>,
}

/// Appends `text` in one `write` and makes it durable.
fn append(file: &mut File, text: &str) -> std::io::Result<()> {
    file.write_all(text.as_bytes())?;
    file.sync_data()
}

/// Opens `path` for appending, dropping a torn last line (none is expected: each line is one
/// small `write`, which a SIGKILL cannot split), and returns the event ids it holds.
fn open_log(path: &Path) -> anyhow::Result<(File, HashSet<String>)> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("read {}", path.display()))?;
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        file.set_len(complete as u64)?;
        file.seek(SeekFrom::End(0))?;
    }
    let mut ids = HashSet::new();
    for l in text[..complete].lines() {
        let v: serde_json::Value = serde_json::from_str(l).context("a line of the sink file")?;
        if let Some(id) = v.get("event_id").and_then(|id| id.as_str()) {
            ids.insert(id.to_owned());
        }
    }
    Ok((file, ids))
}

/// The sink system (see the module docs).
#[derive(Debug, Clone)]
struct FileSink {
    files: Arc<Mutex<Files>>,
}

impl FileSink {
    fn open(dir: &Path) -> anyhow::Result<FileSink> {
        std::fs::create_dir_all(dir)?;
        let (applied, ids) = open_log(&dir.join("applied.jsonl"))?;
        let (replays, _) = open_log(&dir.join("replays.jsonl"))?;
        Ok(FileSink {
            files: Arc::new(Mutex::new(Files {
                applied,
                replays,
                ids,
            })),
        })
    }
}

/// A sink: it implements only `apply` (no change feed, no snapshot).
impl SystemAdapter for FileSink {
    async fn apply(&self, change: &Apply) -> Result<Applied, AdapterError> {
        let files = self.files.clone();
        let change = change.clone();
        tokio::task::spawn_blocking(move || {
            let mut files = files.lock().unwrap_or_else(PoisonError::into_inner);
            let text = line(&change);
            let replay = files.ids.contains(&change.event_id);
            if replay {
                append(&mut files.replays, &text).map_err(AdapterError::transient)?;
                println!("replayed {}", change.event_id);
            } else {
                append(&mut files.applied, &text).map_err(AdapterError::transient)?;
                files.ids.insert(change.event_id.clone());
                println!("applied {}", change.event_id);
            }
            // The record's id in this system is its canonical key.
            Ok(Applied::to(
                change
                    .local_id
                    .clone()
                    .unwrap_or_else(|| change.key.clone()),
            ))
        })
        .await
        .map_err(AdapterError::transient)?
    }
}

fn main() -> anyhow::Result<()> {
    let usage = "usage: it-sink AMQP_URI NAMESPACE SYSTEM STATE_DB OUT_DIR ROUTER_USER";
    let mut args = std::env::args().skip(1);
    let mut arg = || args.next().context(usage);
    let (uri, namespace, system, state, out) = (arg()?, arg()?, arg()?, arg()?, arg()?);
    let router_user = arg()?;
    let sink = FileSink::open(&PathBuf::from(out))?;
    let mut config = RunnerConfig::new(system, uri, state, concord_it::seed_policy());
    config.namespace = namespace;
    config.router_user = router_user;
    config.reconnect = concord_adapter::RetryConfig {
        min_delay_ms: 100,
        max_delay_ms: 2_000,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async move {
            let mut runner = concord_adapter::start(sink, config);
            runner.wait_ready().await.context("the runner stopped")?;
            println!("ready");
            // Runs until killed, or stopped gracefully by SIGTERM.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            term.recv().await;
            runner.shutdown().await.context("the runner failed")?;
            Ok(())
        })
}
