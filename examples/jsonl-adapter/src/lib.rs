//! A complete small adapter, built step by step in `docs/writing-an-adapter.md`: a business
//! system that keeps its records in a JSON-lines change log, one change per line:
//!
//! ```json
//! {"seq":7,"entity":"customer","id":"c-1","op":"upsert","fields":{"name":"Ada","tier":null},"by":"app"}
//! ```
//!
//! `seq` numbers the lines (1, 2, ...), `fields` holds the changed fields in the protobuf JSON
//! mapping of the entity's message (`null` clears a field), `op` is `upsert` or `delete`, and
//! `by` says who wrote the line (`app` for the system's own users, `concord` for the adapter).
//! The file is the system's data (a record is the fold of its lines) and its change feed.
//!
//! The adapter reports each line as a local change, with the line's `seq` as the feed cursor and
//! as the record's version; it applies an incoming change by appending a line and returns that
//! line's `seq`, so the SDK recognises its own lines exactly when the feed reports them.
//!
//! This crate must never write a line except through [`ChangeLog::append`] (which holds the
//! file's lock), so that `seq` stays the line number.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use concord_adapter::{
    Adapter, AdapterError, Applied, Apply, ApplyOp, Context, Fields, LocalChange, SystemAdapter,
};
use futures::Stream;
use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub seq: u64,
    pub entity: String,
    pub id: String,
    pub op: Op,
    #[serde(default)]
    pub fields: Map<String, Json>,
    pub by: String,
}

/// What a line does to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Upsert,
    Delete,
}

/// The records of the log: per (entity, id), their fields.
pub type Records = BTreeMap<(String, String), Map<String, Json>>;

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {source}")]
    Parse {
        path: PathBuf,
        line: u64,
        #[source]
        source: serde_json::Error,
    },
}

/// The JSON-lines change log of the system.
#[derive(Debug, Clone)]
pub struct ChangeLog {
    path: PathBuf,
}

impl ChangeLog {
    /// The log at `path` (created empty when missing).
    pub fn open(path: impl Into<PathBuf>) -> Result<ChangeLog, LogError> {
        let log = ChangeLog { path: path.into() };
        log.file(true)?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> LogError {
        LogError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn file(&self, write: bool) -> Result<File, LogError> {
        OpenOptions::new()
            .read(true)
            .append(write)
            .create(write)
            .open(&self.path)
            .map_err(|e| self.io(e))
    }

    /// Appends a change of record `id` (a new id when `None`), holding the file's lock so that
    /// concurrent writers (the system's users, the adapter) number their lines in turn.
    /// Returns the line's `seq` and the record's id.
    pub fn append(
        &self,
        entity: &str,
        id: Option<&str>,
        op: Op,
        fields: Map<String, Json>,
        by: &str,
    ) -> Result<(u64, String), LogError> {
        let mut file = self.file(true)?;
        file.lock().map_err(|e| self.io(e))?;
        let result = (|| {
            let seq = self.read_after(0, &mut file)?.last().map_or(0, |l| l.seq) + 1;
            let id = id.map_or_else(|| format!("{entity}-{seq}"), str::to_owned);
            let line = Line {
                seq,
                entity: entity.to_owned(),
                id: id.clone(),
                op,
                fields,
                by: by.to_owned(),
            };
            let mut text = serde_json::to_string(&line).map_err(|e| LogError::Parse {
                path: self.path.clone(),
                line: seq,
                source: e,
            })?;
            text.push('\n');
            // One write of a whole line, at the end (append mode).
            file.write_all(text.as_bytes()).map_err(|e| self.io(e))?;
            file.sync_data().map_err(|e| self.io(e))?;
            Ok((seq, id))
        })();
        file.unlock().map_err(|e| self.io(e))?;
        result
    }

    /// Every complete line with a `seq` greater than `after`, in order.
    pub fn lines_after(&self, after: u64) -> Result<Vec<Line>, LogError> {
        let mut file = self.file(false)?;
        self.read_after(after, &mut file)
    }

    fn read_after(&self, after: u64, file: &mut File) -> Result<Vec<Line>, LogError> {
        file.seek(SeekFrom::Start(0)).map_err(|e| self.io(e))?;
        let mut lines = Vec::new();
        let mut reader = BufReader::new(file);
        let mut buf = String::new();
        let mut n = 0;
        loop {
            buf.clear();
            let read = reader.read_line(&mut buf).map_err(|e| self.io(e))?;
            // A line still being written (no newline yet) is read next time.
            if read == 0 || !buf.ends_with('\n') {
                return Ok(lines);
            }
            n += 1;
            let line: Line = serde_json::from_str(&buf).map_err(|e| LogError::Parse {
                path: self.path.clone(),
                line: n,
                source: e,
            })?;
            if line.seq > after {
                lines.push(line);
            }
        }
    }

    /// The records: per (entity, id), the fold of their lines (deleted records are absent).
    pub fn records(&self) -> Result<Records, LogError> {
        let mut records = Records::new();
        for line in self.lines_after(0)? {
            let rk = (line.entity, line.id);
            match line.op {
                Op::Delete => {
                    records.remove(&rk);
                }
                Op::Upsert => {
                    let record = records.entry(rk).or_default();
                    for (k, v) in line.fields {
                        if v.is_null() {
                            record.remove(&k);
                        } else {
                            record.insert(k, v);
                        }
                    }
                }
            }
        }
        Ok(records)
    }
}

/// The adapter's settings: the `[adapter]` table of its config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The change log.
    pub path: PathBuf,
    /// How often the log is read for new lines, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    100
}

/// The adapter.
#[derive(Debug, Clone)]
pub struct JsonlSystem {
    log: ChangeLog,
    entities: Arc<BTreeMap<String, MessageDescriptor>>,
    poll: Duration,
}

impl Adapter for JsonlSystem {
    type Config = Settings;

    async fn build(settings: Settings, context: &Context) -> Result<JsonlSystem, AdapterError> {
        Ok(JsonlSystem {
            log: ChangeLog::open(&settings.path).map_err(AdapterError::permanent)?,
            entities: Arc::new(context.entities.clone()),
            poll: Duration::from_millis(settings.poll_ms.max(1)),
        })
    }
}

impl JsonlSystem {
    /// A line as a local change (its fields read through the entity's message).
    fn local_change(&self, line: Line) -> Result<LocalChange, AdapterError> {
        let change = match line.op {
            Op::Delete => LocalChange::delete(&line.entity, &line.id),
            Op::Upsert => {
                let message = self.entities.get(&line.entity).ok_or_else(|| {
                    AdapterError::permanent(format!(
                        "line {}: entity {:?} is not in the policy",
                        line.seq, line.entity
                    ))
                })?;
                let fields = from_json(message, line.fields)
                    .map_err(|e| AdapterError::permanent(format!("line {}: {e}", line.seq)))?;
                LocalChange::upsert(&line.entity, &line.id, fields)
            }
        };
        Ok(change.at(line.seq.to_string()).with_version(line.seq))
    }
}

impl SystemAdapter for JsonlSystem {
    fn changes(
        &self,
        cursor: Option<String>,
    ) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
        let after = cursor.and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
        let me = self.clone();
        let pending: Vec<Line> = Vec::new();
        futures::stream::unfold(
            (me, after, pending),
            |(me, mut after, mut pending)| async move {
                loop {
                    if !pending.is_empty() {
                        let line = pending.remove(0);
                        after = line.seq;
                        let change = me.local_change(line);
                        return Some((change, (me, after, pending)));
                    }
                    let log = me.log.clone();
                    match tokio::task::spawn_blocking(move || log.lines_after(after)).await {
                        Ok(Ok(lines)) if !lines.is_empty() => pending = lines,
                        Ok(Ok(_)) => tokio::time::sleep(me.poll).await,
                        // Unreadable now: the SDK reopens the feed after a backoff.
                        Ok(Err(e)) => {
                            return Some((Err(AdapterError::transient(e)), (me, after, pending)));
                        }
                        Err(e) => {
                            return Some((Err(AdapterError::transient(e)), (me, after, pending)));
                        }
                    }
                }
            },
        )
    }

    fn snapshot(&self) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
        let items: Vec<Result<LocalChange, AdapterError>> = match self.log.records() {
            Err(e) => vec![Err(AdapterError::transient(e))],
            Ok(records) => records
                .into_iter()
                .map(|((entity, id), fields)| {
                    let message = self.entities.get(&entity).ok_or_else(|| {
                        AdapterError::permanent(format!("entity {entity:?} is not in the policy"))
                    })?;
                    let fields = from_json(message, fields).map_err(AdapterError::permanent)?;
                    Ok(LocalChange::upsert(entity, id, fields))
                })
                .collect(),
        };
        futures::stream::iter(items)
    }

    async fn apply(&self, change: &Apply) -> Result<Applied, AdapterError> {
        let (op, fields) = match change.op {
            ApplyOp::Delete => (Op::Delete, Map::new()),
            ApplyOp::Upsert => (Op::Upsert, to_json(&change.message, &change.fields)?),
        };
        let log = self.log.clone();
        let (entity, id) = (change.entity.clone(), change.local_id.clone());
        let (seq, id) = tokio::task::spawn_blocking(move || {
            log.append(&entity, id.as_deref(), op, fields, "concord")
        })
        .await
        .map_err(AdapterError::transient)?
        .map_err(AdapterError::transient)?;
        Ok(Applied::to(id).with_version(seq))
    }
}

/// JSON fields (protobuf JSON mapping; `null` clears) as SDK fields.
pub fn from_json(message: &MessageDescriptor, fields: Map<String, Json>) -> Result<Fields, String> {
    let mut out = Fields::new();
    let mut set = Map::new();
    for (name, value) in fields {
        let Some(fd) = message.get_field_by_name(&name) else {
            return Err(format!("{} has no field {name:?}", message.full_name()));
        };
        if value.is_null() {
            out.insert(fd.name().to_owned(), None);
        } else {
            set.insert(name, value);
        }
    }
    let decoded = DynamicMessage::deserialize(message.clone(), Json::Object(set))
        .map_err(|e| format!("not a valid {}: {e}", message.full_name()))?;
    for (fd, value) in decoded.fields() {
        out.insert(fd.name().to_owned(), Some(value.clone()));
    }
    Ok(out)
}

/// SDK fields as JSON fields (protobuf JSON mapping with proto field names; `null` clears).
pub fn to_json(
    message: &MessageDescriptor,
    fields: &Fields,
) -> Result<Map<String, Json>, AdapterError> {
    let mut record = DynamicMessage::new(message.clone());
    let mut out = Map::new();
    for (name, value) in fields {
        match (message.get_field_by_name(name), value) {
            (Some(fd), Some(v)) => record
                .try_set_field(&fd, v.clone())
                .map_err(|e| AdapterError::permanent(format!("field {name}: {e}")))?,
            (Some(_), None) => {
                out.insert(name.clone(), Json::Null);
            }
            (None, _) => {
                return Err(AdapterError::permanent(format!(
                    "{} has no field {name:?}",
                    message.full_name()
                )));
            }
        }
    }
    let options = SerializeOptions::new().use_proto_field_name(true);
    let json = record
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(AdapterError::permanent)?;
    if let Json::Object(set) = json {
        out.extend(set);
    }
    Ok(out)
}
