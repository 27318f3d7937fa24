//! Applying incoming changes: one database transaction per batch the runner holds (or per
//! change), marked as the adapter's (the capture triggers skip it), that records each event's id
//! with the row it wrote, so a change applied before a crash (and redelivered) is recognised and
//! not applied twice.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use concord_adapter::{AdapterError, Applied, Apply, ApplyOp};
use tracing::warn;

use crate::capture::key_part;
use crate::config::KeySource;
use crate::convert::{self, SqlValue};
use crate::db::{self, ErrorClass, Shape, Tx};
use crate::dialect::fnv;
use crate::key::{self, Key};
use crate::mapping::EntityMap;
use crate::schema::Column;
use crate::system::Inner;

/// How often old ids of applied events are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Why an incoming change was not applied, naming the row and the record.
#[derive(Debug, thiserror::Error)]
#[error("table {table}, key {key} (record {record}, event {event}): {reason}")]
pub struct ApplyError {
    pub table: String,
    /// The row's local id, or `new` for a row not created yet.
    pub key: String,
    /// The record's canonical key.
    pub record: String,
    pub event: String,
    pub reason: String,
    #[source]
    pub cause: Option<sqlx::Error>,
}

/// What went wrong inside the transaction.
enum Failure {
    /// No connection could be had.
    Unavailable(sqlx::Error),
    Db(sqlx::Error),
    /// The change cannot be applied as it is (no key value, an ambiguous match...).
    Refused(String),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Db(e)
    }
}

/// What the transaction did.
struct Outcome {
    local_id: String,
    /// The rows it wrote (local ids), for the feed.
    touched: Vec<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What identifies the content of an apply of one event: a redelivered copy with the same
/// fields is the same apply (skipped); one with other fields (an event replayed after a policy
/// change) is applied.
fn digest(change: &Apply) -> String {
    let mut names: Vec<&str> = change.fields.keys().map(String::as_str).collect();
    names.sort_unstable();
    let text = format!(
        "{:?}\0{}\0{}\0{}",
        change.op,
        change.entity,
        change.key,
        names.join("\0")
    );
    format!("{:016x}", fnv(text.as_bytes()))
}

/// An incoming change ready to be written: its table, its row (if known) and its values.
struct Planned<'a> {
    /// The entity's index in the mapping.
    ei: usize,
    e: &'a EntityMap,
    change: &'a Apply,
    target: Option<Key>,
    values: Vec<(usize, SqlValue)>,
    digest: String,
}

impl Planned<'_> {
    fn error(&self, reason: String, cause: Option<sqlx::Error>) -> ApplyError {
        error(self.e, self.change, reason, cause)
    }

    /// What the SDK is told about a failure of this change.
    fn failed(&self, f: Failure) -> AdapterError {
        match f {
            Failure::Refused(why) => AdapterError::permanent(self.error(why, None)),
            Failure::Unavailable(err) => {
                AdapterError::transient(self.error("database unavailable".into(), Some(err)))
            }
            Failure::Db(err) => {
                let reason = err.to_string();
                match db::classify(&err) {
                    ErrorClass::Permanent => AdapterError::permanent(self.error(reason, Some(err))),
                    ErrorClass::Transient => AdapterError::transient(self.error(reason, Some(err))),
                }
            }
        }
    }
}

fn error(e: &EntityMap, change: &Apply, reason: String, cause: Option<sqlx::Error>) -> ApplyError {
    ApplyError {
        table: e.table.clone(),
        key: change.local_id.clone().unwrap_or_else(|| "new".into()),
        record: change.key.clone(),
        event: change.event_id.clone(),
        reason,
        cause,
    }
}

/// The change's table, row and values (pure): fields this table does not store are not this
/// system's. An error names every value that cannot be written.
fn plan<'a>(inner: &'a Inner, change: &'a Apply) -> Result<Planned<'a>, AdapterError> {
    let Some((ei, e)) = inner.mapping.entity(&change.entity) else {
        return Err(AdapterError::permanent(format!(
            "entity {} (record {}, event {}) is not mapped to a table by this adapter's configuration",
            change.entity, change.key, change.event_id
        )));
    };
    let target = match change.local_id.as_deref().map(|id| e.parse_local_id(id)) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(why)) => return Err(AdapterError::permanent(error(e, change, why, None))),
    };
    let mut values: Vec<(usize, SqlValue)> = Vec::new();
    let mut problems = Vec::new();
    for (name, v) in &change.fields {
        let Some(fi) = e.fields.iter().position(|f| f.field.name() == name) else {
            continue;
        };
        let Some(f) = e.fields.get(fi) else { continue };
        match convert::to_sql(&f.conv, &f.field, v.as_ref())
            .and_then(|sql| convert::for_column(sql, &f.column.kind))
        {
            Ok(sql) => values.push((fi, sql)),
            Err(err) => problems.push(format!("field {name} (column {}): {err}", f.column.name)),
        }
    }
    if !problems.is_empty() {
        return Err(AdapterError::permanent(error(
            e,
            change,
            problems.join("; "),
            None,
        )));
    }
    Ok(Planned {
        ei,
        e,
        change,
        target,
        values,
        digest: digest(change),
    })
}

/// Applies one incoming change in its own transaction.
pub(crate) async fn apply(inner: &Inner, change: &Apply) -> Result<Applied, AdapterError> {
    let p = plan(inner, change)?;
    let outcomes = transaction(inner, &[&p])
        .await
        .map_err(|(_, f)| p.failed(f))?;
    let local_id = outcomes.into_iter().next().map(|o| {
        inner.touch(p.ei, &o.touched);
        o.local_id
    });
    prune(inner).await;
    local_id
        .map(Applied::to)
        .ok_or_else(|| AdapterError::permanent(p.error("nothing was written".into(), None)))
}

/// Applies incoming changes in ONE transaction (each recorded in the applied-events table in
/// it). A change that cannot be converted fails alone; when a write fails permanently (a
/// constraint), the transaction is rolled back and the changes are applied one by one, each in
/// its own transaction, so only the refused one fails. When the database fails transiently,
/// nothing is applied: the first change reports it (the SDK retries them one by one).
pub(crate) async fn apply_batch(
    inner: &Inner,
    changes: &[Apply],
) -> Vec<Result<Applied, AdapterError>> {
    let mut results: Vec<Option<Result<Applied, AdapterError>>> =
        changes.iter().map(|_| None).collect();
    let mut planned = Vec::with_capacity(changes.len());
    for (i, change) in changes.iter().enumerate() {
        match plan(inner, change) {
            Ok(p) => planned.push((i, p)),
            Err(e) => {
                if let Some(slot) = results.get_mut(i) {
                    *slot = Some(Err(e));
                }
            }
        }
    }
    if !planned.is_empty() {
        let writes: Vec<&Planned<'_>> = planned.iter().map(|(_, p)| p).collect();
        match transaction(inner, &writes).await {
            Ok(outcomes) => {
                for ((i, p), o) in planned.iter().zip(outcomes) {
                    inner.touch(p.ei, &o.touched);
                    if let Some(slot) = results.get_mut(*i) {
                        *slot = Some(Ok(Applied::to(o.local_id)));
                    }
                }
                prune(inner).await;
            }
            Err((at, f)) => {
                let failed = writes.get(at).or(writes.first()).map(|p| p.failed(f));
                match failed {
                    Some(e) if e.is_transient() => return vec![Err(e)],
                    _ => return one_by_one(inner, changes).await,
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(AdapterError::transient("not attempted"))))
        .collect()
}

/// Applies the changes one by one, stopping at the first transient failure.
async fn one_by_one(inner: &Inner, changes: &[Apply]) -> Vec<Result<Applied, AdapterError>> {
    let mut out = Vec::with_capacity(changes.len());
    for change in changes {
        let r = apply(inner, change).await;
        let transient = matches!(&r, Err(e) if e.is_transient());
        out.push(r);
        if transient {
            break;
        }
    }
    out
}

/// Rows per statement of the batch-wide statements (well within every database's limit of
/// bound parameters).
const ROWS_PER_STATEMENT: usize = 1000;

/// Writes `planned` in one transaction marked with the origin marker. Fails with the index of
/// the change whose write failed (0 for the transaction itself) and why; then nothing of it is
/// written.
async fn transaction(
    inner: &Inner,
    planned: &[&Planned<'_>],
) -> Result<Vec<Outcome>, (usize, Failure)> {
    let d = inner.db.dialect();
    let mut conn = inner
        .db
        .acquire()
        .await
        .map_err(|err| (0, Failure::Unavailable(err)))?;
    let result = match conn.begin().await {
        Err(err) => Err((0, Failure::Db(err))),
        Ok(mut tx) => match writes(&mut tx, inner, planned).await {
            Ok(outcomes) => tx
                .commit()
                .await
                .map(|()| outcomes)
                .map_err(|err| (0, Failure::Db(err))),
            Err(f) => {
                let _ = tx.rollback().await;
                Err(f)
            }
        },
    };
    if result.is_err()
        && matches!(inner.db, db::Db::MySql(..))
        && let Some(off) = d.origin_off(&inner.prefix)
    {
        // The mark is a session variable: a pooled connection must not keep it.
        if conn.simple(&off).await.is_err() {
            conn.discard();
        }
    } else {
        drop(conn);
    }
    result
}

/// The transaction's statements: the origin mark, the events applied before (one statement
/// for the batch), each change's write, the events applied (one statement), the mark cleared.
async fn writes(
    tx: &mut Tx<'_>,
    inner: &Inner,
    planned: &[&Planned<'_>],
) -> Result<Vec<Outcome>, (usize, Failure)> {
    let d = inner.db.dialect();
    let prefix = inner.prefix.as_str();
    let whole = |f: Failure| (0, f);
    tx.simple(&d.origin_on(prefix))
        .await
        .map_err(|e| whole(e.into()))?;
    // Exactly once: an event applied before (and not recorded by the SDK, e.g. after a crash)
    // is recognised by its id.
    let applied_keys: Vec<String> = planned
        .iter()
        .map(|p| format!("{}@{}", p.change.event_id, p.e.table))
        .collect();
    let mut prior: HashMap<String, (String, String)> = HashMap::new();
    let ids: Vec<&str> = applied_keys.iter().map(String::as_str).collect();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let rows = tx
            .fetch(
                &d.applied_get(prefix, chunk),
                &[Shape::Text, Shape::Text, Shape::Text],
            )
            .await
            .map_err(|e| whole(e.into()))?;
        for row in rows {
            if let (
                Some(Ok(SqlValue::Text(id))),
                Some(Ok(SqlValue::Text(local_id))),
                Some(Ok(SqlValue::Text(seen))),
            ) = (row.first(), row.get(1), row.get(2))
            {
                prior.insert(id.clone(), (local_id.clone(), seen.clone()));
            }
        }
    }
    let mut outcomes = Vec::with_capacity(planned.len());
    let mut record: Vec<(&str, String, &str)> = Vec::with_capacity(planned.len());
    for (i, (p, applied_key)) in planned.iter().zip(&applied_keys).enumerate() {
        let prior = prior.get(applied_key);
        if let Some((local_id, seen)) = prior
            && *seen == p.digest
        {
            // Applied already, exactly so.
            outcomes.push(Outcome {
                local_id: local_id.clone(),
                touched: Vec::new(),
            });
            continue;
        }
        let o = write(tx, inner, p, prior.map(|(id, _)| id.as_str()))
            .await
            .map_err(|f| (i, f))?;
        record.push((applied_key, o.local_id.clone(), &p.digest));
        outcomes.push(o);
    }
    let now = now_ms();
    for chunk in record.chunks(ROWS_PER_STATEMENT) {
        let rows: Vec<(&str, &str, &str)> = chunk
            .iter()
            .map(|(k, id, digest)| (*k, id.as_str(), *digest))
            .collect();
        tx.execute(&d.applied_put(prefix, &rows, now))
            .await
            .map_err(|e| whole(e.into()))?;
    }
    if let Some(off) = d.origin_off(prefix) {
        tx.simple(&off).await.map_err(|e| whole(e.into()))?;
    }
    Ok(outcomes)
}

/// One change's write (`applied_before`: the local id an earlier, different apply of the same
/// event wrote to).
async fn write(
    tx: &mut Tx<'_>,
    inner: &Inner,
    p: &Planned<'_>,
    applied_before: Option<&str>,
) -> Result<Outcome, Failure> {
    let d = inner.db.dialect();
    let (e, change) = (p.e, p.change);
    let mut target = p.target.clone();
    if target.is_none()
        && let Some(local_id) = applied_before
    {
        target = Some(e.parse_local_id(local_id).map_err(Failure::Refused)?);
    }
    let columns: Vec<(Column, SqlValue)> = p
        .values
        .iter()
        .filter_map(|(fi, v)| Some((e.fields.get(*fi)?.column.clone(), v.clone())))
        .collect();
    Ok(match change.op {
        ApplyOp::Delete => match target {
            Some(k) => {
                tx.execute(&d.delete(&e.table, &e.key, &k)).await?;
                let id = key::local_id(&k);
                Outcome {
                    local_id: id.clone(),
                    touched: vec![id],
                }
            }
            None => Outcome {
                local_id: change.key.clone(),
                touched: Vec::new(),
            },
        },
        ApplyOp::Upsert => {
            let target = match target {
                Some(k) => Some(k),
                None => find_match(tx, inner, e, &columns).await?,
            };
            match target {
                Some(k) => update(tx, inner, e, &k, &columns).await?,
                None => insert(tx, inner, e, change, &columns).await?,
            }
        }
    })
}

/// The row the match fields link a record first seen from another system to.
async fn find_match(
    tx: &mut Tx<'_>,
    inner: &Inner,
    e: &EntityMap,
    columns: &[(Column, SqlValue)],
) -> Result<Option<Key>, Failure> {
    if e.match_fields.is_empty() {
        return Ok(None);
    }
    let mut wanted = Vec::new();
    for fi in &e.match_fields {
        let Some(f) = e.fields.get(*fi) else {
            return Ok(None);
        };
        match columns.iter().find(|(c, _)| c.name == f.column.name) {
            Some((c, v)) if *v != SqlValue::Null => wanted.push((c.clone(), v.clone())),
            // A match field without a value identifies nothing.
            _ => return Ok(None),
        }
    }
    let shape: Vec<Shape> = e.key.iter().map(|c| Shape::Value(c.kind.clone())).collect();
    let rows = tx
        .fetch(&inner.db.dialect().find(&e.table, &e.key, &wanted), &shape)
        .await?;
    let keys: Vec<Key> = rows
        .into_iter()
        .filter_map(|cells| {
            cells
                .into_iter()
                .map(|c| key_part(c.ok()?))
                .collect::<Option<Key>>()
        })
        .collect();
    match keys.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        _ => Err(Failure::Refused(format!(
            "several rows have the same {}: cannot tell which one the record is",
            wanted
                .iter()
                .map(|(c, v)| format!("{} = {}", c.name, v.show()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

async fn update(
    tx: &mut Tx<'_>,
    inner: &Inner,
    e: &EntityMap,
    k: &Key,
    columns: &[(Column, SqlValue)],
) -> Result<Outcome, Failure> {
    let old = key::local_id(k);
    if !columns.is_empty() {
        let n = tx
            .execute(&inner.db.dialect().update(&e.table, &e.key, k, columns))
            .await?;
        if n == 0 {
            // The row was deleted locally and the feed has not reported it yet: the delete is
            // the later change; it is published when reported.
            return Ok(Outcome {
                local_id: old.clone(),
                touched: vec![old],
            });
        }
    }
    // A natural key may have changed with its fields.
    let mut new = k.clone();
    if e.key_source == KeySource::Fields {
        for (i, kc) in e.key.iter().enumerate() {
            if let Some((_, v)) = columns.iter().find(|(c, _)| c.name == kc.name)
                && let Some(part) = key_part(v.clone())
                && let Some(slot) = new.get_mut(i)
            {
                *slot = part;
            }
        }
    }
    let id = key::local_id(&new);
    Ok(Outcome {
        touched: if id == old {
            vec![id.clone()]
        } else {
            vec![old, id.clone()]
        },
        local_id: id,
    })
}

async fn insert(
    tx: &mut Tx<'_>,
    inner: &Inner,
    e: &EntityMap,
    change: &Apply,
    columns: &[(Column, SqlValue)],
) -> Result<Outcome, Failure> {
    let d = inner.db.dialect();
    let mut columns = columns.to_vec();
    let mut known: Option<Key> = None;
    match e.key_source {
        KeySource::Generated => {}
        KeySource::Canonical => {
            if let Some(kc) = e.key.first() {
                columns.push((kc.clone(), SqlValue::Text(change.key.clone())));
                known = Some(vec![key::KeyPart::Text(change.key.clone())]);
            }
        }
        KeySource::Fields => {
            let mut k = Key::new();
            for kc in &e.key {
                match columns
                    .iter()
                    .find(|(c, _)| c.name == kc.name)
                    .and_then(|(_, v)| key_part(v.clone()))
                {
                    Some(part) => k.push(part),
                    None => {
                        return Err(Failure::Refused(format!(
                            "the record has no value for key column {}: a row cannot be created",
                            kc.name
                        )));
                    }
                }
            }
            known = Some(k);
        }
    }
    let stmt = d.insert(&e.table, &e.key, &columns);
    let key = if d.returning() {
        let shape: Vec<Shape> = e.key.iter().map(|c| Shape::Value(c.kind.clone())).collect();
        let rows = tx.fetch(&stmt, &shape).await?;
        rows.into_iter()
            .next()
            .and_then(|cells| {
                cells
                    .into_iter()
                    .map(|c| key_part(c.ok()?))
                    .collect::<Option<Key>>()
            })
            .ok_or_else(|| Failure::Refused("the insert returned no key".into()))?
    } else {
        tx.execute(&stmt).await?;
        match known {
            Some(k) => k,
            None => vec![key::KeyPart::Int(tx.last_insert_id().await?)],
        }
    };
    // Mapped columns the insert left to the database's defaults hold the system's values: the
    // feed reports them.
    let defaulted = e
        .fields
        .iter()
        .any(|f| f.column.has_default && !columns.iter().any(|(c, _)| c.name == f.column.name));
    if defaulted {
        tx.execute(&d.log_change(&inner.prefix, &e.table, &key::logged(&key), "U"))
            .await?;
    }
    let id = key::local_id(&key);
    Ok(Outcome {
        local_id: id.clone(),
        touched: vec![id],
    })
}

/// Forgets the ids of events applied longer ago than the retention (at most every ten minutes).
async fn prune(inner: &Inner) {
    {
        let mut last = inner
            .last_prune
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        *last = Some(Instant::now());
    }
    let retention = i64::try_from(inner.retention.as_millis()).unwrap_or(i64::MAX);
    let before = now_ms().saturating_sub(retention);
    if let Err(e) = inner
        .db
        .execute(&inner.db.dialect().applied_prune(&inner.prefix, before))
        .await
    {
        warn!(error = %e, "pruning the applied events failed");
    }
}
