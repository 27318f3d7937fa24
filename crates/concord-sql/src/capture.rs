//! Change capture: installing the triggers that record every change of a mapped table in the
//! change log (in the same transaction, unless the adapter's own apply made it), and the change
//! feed that reports each logged row with its current values.
//!
//! The feed's reader task reads the change log (woken by PostgreSQL notifications, or every
//! poll interval), reads the current values of the rows it names, and queues them. The stream
//! the SDK reads hands them out one by one, each with a feed position (`<run>:<seq>`); a row an
//! apply wrote after it was read is read again first, so the SDK never sees values older than
//! its own writes. Change-log rows are deleted only when the SDK confirms their position
//! (`published`), exactly those handed out up to it. Rows are never skipped because a higher id
//! was seen (ids can commit out of order): a row is left out of a read only while it is queued
//! or handed out.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use concord_adapter::{AdapterError, Fields, LocalChange, LocalOp};
use futures::Stream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::convert::{self, SqlValue};
use crate::db::{Db, Shape};
use crate::dialect::{Dialect, TriggerOp};
use crate::key::{self, Key, KeyPart};
use crate::mapping::{EntityMap, Mapping};
use crate::problem::Problem;
use crate::system::Inner;

/// Most keys read in one statement.
const READ_CHUNK: usize = 200;
/// Most change-log ids deleted in one statement.
const DELETE_CHUNK: usize = 500;

/// A changed row, read: what the feed hands out.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    pub(crate) entity: usize,
    pub(crate) key: Key,
    pub(crate) local_id: String,
    /// The change-log rows it stands for.
    pub(crate) ids: Vec<i64>,
    /// One of them is an insert.
    pub(crate) created: bool,
    /// The apply generation before its values were read.
    pub(crate) read_gen: u64,
    /// The row's current values (`None`: the row is gone) and what could not be converted.
    pub(crate) values: Option<(Fields, Vec<String>)>,
}

type Item = Result<Captured, AdapterError>;

// ---- install / uninstall ----

pub(crate) async fn install(db: &Db, prefix: &str, mapping: &Mapping) -> Result<(), sqlx::Error> {
    let d = db.dialect();
    let mut script = d.install_common(prefix);
    for e in &mapping.entities {
        let key: Vec<String> = e.key.iter().map(|c| c.name.clone()).collect();
        script.extend(d.install_triggers(prefix, &e.table, &key));
    }
    db.run_script(&script).await
}

pub(crate) async fn uninstall(db: &Db, prefix: &str) -> Result<(), sqlx::Error> {
    let d = db.dialect();
    let mut script: Vec<String> = triggers(db, prefix)
        .await?
        .iter()
        .map(|(name, table, _)| d.drop_trigger(name, table))
        .collect();
    script.extend(d.uninstall_common(prefix));
    db.run_script(&script).await
}

/// The capture triggers in the database: (trigger, table, definition).
async fn triggers(db: &Db, prefix: &str) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    let stmt = crate::dialect::Stmt {
        sql: db.dialect().list_triggers(prefix),
        binds: Vec::new(),
    };
    let rows = db
        .fetch(&stmt, &[Shape::Text, Shape::Text, Shape::Text])
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match (r.first(), r.get(1), r.get(2)) {
            (
                Some(Ok(SqlValue::Text(n))),
                Some(Ok(SqlValue::Text(t))),
                Some(Ok(SqlValue::Text(def))),
            ) => Some((n.clone(), t.clone(), def.clone())),
            _ => None,
        })
        .collect())
}

/// What is missing of the capture, per table.
pub(crate) async fn installed(
    db: &Db,
    prefix: &str,
    mapping: &Mapping,
) -> Result<Vec<Problem>, sqlx::Error> {
    let d = db.dialect();
    let mut problems = Vec::new();
    for t in d.own_tables(prefix) {
        let stmt = crate::dialect::Stmt {
            sql: d.table_exists(&t),
            binds: Vec::new(),
        };
        if db.fetch(&stmt, &[Shape::Int]).await?.is_empty() {
            problems.push(
                Problem::error("the adapter's table is missing: run `concord-sql install`")
                    .table(&t),
            );
        }
    }
    let present: HashMap<(String, String), String> = triggers(db, prefix)
        .await?
        .into_iter()
        .map(|(n, t, def)| ((n, t), def))
        .collect();
    for e in &mapping.entities {
        let ops: &[TriggerOp] = if d == Dialect::Postgres {
            &[TriggerOp::Insert]
        } else {
            &TriggerOp::ALL
        };
        let key: Vec<String> = e.key.iter().map(|c| c.name.clone()).collect();
        for op in ops {
            let name = d.trigger_name(prefix, &e.table, *op);
            let why = match present.get(&(name.clone(), e.table.clone())) {
                None => "is missing",
                Some(def) if !def.contains(&d.trigger_signature(prefix, &e.table, &key, *op)) => {
                    "records other key columns than the configured ones"
                }
                Some(_) => continue,
            };
            problems.push(
                Problem::error(format!(
                    "capture trigger `{name}` {why}: run `concord-sql install`"
                ))
                .entity(&e.name)
                .table(&e.table),
            );
        }
    }
    Ok(problems)
}

pub(crate) async fn pending(db: &Db, prefix: &str) -> Result<i64, sqlx::Error> {
    let rows = db
        .fetch(&db.dialect().count_changes(prefix), &[Shape::Int])
        .await?;
    match rows.first().and_then(|r| r.first()) {
        Some(Ok(SqlValue::Int(n))) => Ok(*n),
        _ => Err(sqlx::Error::Protocol("COUNT(*) returned no number".into())),
    }
}

// ---- the feed ----

/// A new change feed: starts its reader and returns the stream the SDK reads.
pub(crate) fn feed(
    inner: Arc<Inner>,
) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
    let (tx, rx) = mpsc::unbounded_channel();
    let epoch = {
        let mut st = inner.state();
        st.epoch += 1;
        // What an earlier feed queued or handed out may never have reached the SDK's outbox
        // (the SDK drops the rest of a batch when the feed fails): read all of it again.
        // Reporting a row twice publishes nothing twice.
        st.in_flight.clear();
        st.handed.clear();
        st.handed_ids.clear();
        st.rereads.clear();
        st.reader = true;
        st.epoch
    };
    tokio::spawn(reader(inner.clone(), epoch, tx));
    futures::stream::unfold(
        (inner, rx, VecDeque::new()),
        move |(inner, mut rx, mut ready)| async move {
            loop {
                if let Some(out) = ready.pop_front() {
                    return Some((out, (inner, rx, ready)));
                }
                match rx.recv().await? {
                    Err(e) => ready.push_back(Err(e)),
                    Ok(c) => ready.extend(hand_out(&inner, epoch, c)),
                }
            }
        },
    )
}

/// Hands a read row to the SDK, unless an apply wrote it since it was read (then it is read
/// again first) or the feed was replaced.
fn hand_out(inner: &Inner, epoch: u64, c: Captured) -> Vec<Result<LocalChange, AdapterError>> {
    let mut st = inner.state();
    if st.epoch != epoch {
        return Vec::new();
    }
    if st
        .touched
        .get(&(c.entity, c.local_id.clone()))
        .is_some_and(|g| *g > c.read_gen)
    {
        st.rereads.push(c);
        drop(st);
        inner.wake.notify_one();
        return Vec::new();
    }
    let seq = st.next_seq;
    st.next_seq += 1;
    for id in &c.ids {
        st.in_flight.remove(id);
        st.handed_ids.insert(*id);
    }
    st.handed.insert(seq, c.ids.clone());
    // The reader stopped reading while the queue was full: it may go on.
    let resume = st.starved && st.in_flight.len() <= inner.batch / 2;
    if resume {
        st.starved = false;
    }
    drop(st);
    if resume {
        inner.wake.notify_one();
    }
    let Some(e) = inner.mapping.entities.get(c.entity) else {
        return Vec::new();
    };
    let cursor = format!("{}:{seq}", inner.run);
    let mut out = Vec::new();
    let change = match c.values {
        None => LocalChange::delete(&e.name, &c.local_id),
        Some((fields, problems)) => {
            if !problems.is_empty() {
                out.push(Err(AdapterError::permanent(format!(
                    "table {}, key {}: values that cannot be published (the other fields are): {}",
                    e.table,
                    c.local_id,
                    problems.join("; ")
                ))));
            }
            LocalChange {
                op: if c.created {
                    LocalOp::Create
                } else {
                    LocalOp::Upsert
                },
                ..LocalChange::upsert(&e.name, &c.local_id, fields)
            }
        }
    };
    out.push(Ok(change.at(cursor)));
    out
}

/// Ends the reader's life in the shared state when it stops.
struct ReaderGuard {
    inner: Arc<Inner>,
    epoch: u64,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        if st.epoch == self.epoch {
            st.reader = false;
            for w in st.waiters.drain(..) {
                let _ = w.send(Err("the change feed stopped".into()));
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn reader(inner: Arc<Inner>, epoch: u64, tx: mpsc::UnboundedSender<Item>) {
    let _guard = ReaderGuard {
        inner: inner.clone(),
        epoch,
    };
    let _listener = match &inner.db {
        Db::Postgres(pool) => Some(AbortOnDrop(tokio::spawn(listen(
            pool.clone(),
            Dialect::channel(&inner.prefix),
            inner.wake.clone(),
        )))),
        _ => None,
    };
    let interval = match inner.db {
        Db::Postgres(_) => inner.listen_poll,
        _ => inner.poll,
    };
    let mut again = true;
    let mut failures = 0u32;
    loop {
        if !again {
            let wait = if failures > 0 {
                (inner.poll * 2u32.saturating_pow(failures.min(8))).min(Duration::from_secs(30))
            } else {
                interval
            };
            tokio::select! {
                () = tx.closed() => return,
                () = inner.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        let waiters = {
            let mut st = inner.state();
            if st.epoch != epoch {
                return;
            }
            std::mem::take(&mut st.waiters)
        };
        match pass(&inner, epoch, &tx).await {
            Ok((sent, full)) => {
                failures = 0;
                again = full;
                for w in waiters {
                    let _ = w.send(Ok(sent));
                }
            }
            Err(e) => {
                failures += 1;
                again = false;
                warn!(error = %e, "reading the change log failed");
                for w in waiters {
                    let _ = w.send(Err(e.to_string()));
                }
                // The SDK reopens the feed after a backoff; until then, keep trying.
                if tx.send(Err(AdapterError::transient(e))).is_err() {
                    return;
                }
            }
        }
    }
}

/// Delays between reconnections of the notification listener (the reader polls meanwhile, so
/// nothing is missed).
const LISTEN_RETRY: concord_adapter::RetryConfig = concord_adapter::RetryConfig {
    min_delay_ms: 200,
    max_delay_ms: 10_000,
};

/// PostgreSQL: wakes the reader on every notification of the capture triggers (and after a
/// reconnection, when notifications may have been missed).
async fn listen(pool: sqlx::PgPool, channel: String, wake: Arc<tokio::sync::Notify>) {
    let mut delays = LISTEN_RETRY.delays();
    loop {
        match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(&channel).await {
                Ok(()) => {
                    delays = LISTEN_RETRY.delays();
                    wake.notify_one();
                    loop {
                        match listener.try_recv().await {
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                debug!(error = %e, "notification listener lost");
                                break;
                            }
                        }
                    }
                }
                Err(e) => debug!(error = %e, "LISTEN failed"),
            },
            Err(e) => debug!(error = %e, "notification listener cannot connect"),
        }
        if let Some(delay) = delays.next() {
            tokio::time::sleep(delay).await;
        }
    }
}

/// One read of the change log: queues the rows not queued or handed out yet, with their
/// current values. Returns how many were queued, and whether the read was full (read again at
/// once).
async fn pass(
    inner: &Inner,
    epoch: u64,
    tx: &mpsc::UnboundedSender<Item>,
) -> Result<(usize, bool), sqlx::Error> {
    let (rereads, exclude, room, read_gen) = {
        let mut st = inner.state();
        if st.in_flight.is_empty() && st.rereads.is_empty() {
            // Nothing read before now is waiting: no item can be older than any apply.
            st.touched.clear();
        }
        let rereads = std::mem::take(&mut st.rereads);
        let room = inner.batch.saturating_sub(st.in_flight.len());
        st.starved = room == 0;
        let exclude: HashSet<i64> = st.in_flight.union(&st.handed_ids).copied().collect();
        (rereads, exclude, room, st.generation)
    };
    let d = inner.db.dialect();
    // (entity, key) → (ids, created), in the order first seen.
    let mut groups: Vec<(usize, Key, Vec<i64>, bool)> = rereads
        .into_iter()
        .map(|c| (c.entity, c.key, c.ids, c.created))
        .collect();
    let mut full = false;
    if room > 0 {
        // One row more than can be taken: finding it tells that the read was full and the
        // log must be read again at once, not after the poll interval (when a bulk load has
        // committed, no notification comes any more).
        let limit = i64::try_from(room + exclude.len() + 1).unwrap_or(i64::MAX);
        let rows = inner
            .db
            .fetch(
                &d.read_changes(&inner.prefix, limit),
                &[Shape::Int, Shape::Text, Shape::Text, Shape::Text],
            )
            .await?;
        let mut index: BTreeMap<(usize, Key), usize> = groups
            .iter()
            .enumerate()
            .map(|(i, (e, k, _, _))| ((*e, k.clone()), i))
            .collect();
        let mut orphans = Vec::new();
        let mut taken = 0;
        for row in rows {
            let (
                Some(Ok(SqlValue::Int(id))),
                Some(Ok(SqlValue::Text(tbl))),
                Some(Ok(SqlValue::Text(row_key))),
                op,
            ) = (row.first(), row.get(1), row.get(2), row.get(3))
            else {
                continue;
            };
            if exclude.contains(id) {
                continue;
            }
            if taken == room {
                full = true;
                break;
            }
            taken += 1;
            let Some((ei, e)) = inner.mapping.by_table(tbl) else {
                warn!(table = %tbl, id, "change-log row of a table this adapter does not map: dropped");
                orphans.push(*id);
                continue;
            };
            let key = match key::parse_logged(row_key, &e.integer_key()) {
                Ok(k) => k,
                Err(why) => {
                    warn!(table = %tbl, id, %why, "change-log row with an unreadable key: dropped");
                    orphans.push(*id);
                    continue;
                }
            };
            let created = matches!(op, Some(Ok(SqlValue::Text(o))) if o.trim() == "I");
            match index.get(&(ei, key.clone())) {
                Some(&i) => {
                    if let Some(g) = groups.get_mut(i) {
                        g.2.push(*id);
                        g.3 |= created;
                    }
                }
                None => {
                    index.insert((ei, key.clone()), groups.len());
                    groups.push((ei, key, vec![*id], created));
                }
            }
        }
        for chunk in orphans.chunks(DELETE_CHUNK) {
            inner
                .db
                .execute(&d.delete_changes(&inner.prefix, chunk))
                .await?;
        }
    }
    if groups.is_empty() {
        return Ok((0, full));
    }
    // The current values of every named row, per entity.
    let mut values: BTreeMap<(usize, String), Vec<Result<SqlValue, String>>> = BTreeMap::new();
    for (ei, e) in inner.mapping.entities.iter().enumerate() {
        let keys: Vec<Key> = groups
            .iter()
            .filter(|g| g.0 == ei)
            .map(|g| g.1.clone())
            .collect();
        for chunk in keys.chunks(READ_CHUNK) {
            for (key, cells) in read_rows(&inner.db, e, chunk).await? {
                values.insert((ei, key::local_id(&key)), cells);
            }
        }
    }
    let items: Vec<Captured> = groups
        .into_iter()
        .filter_map(|(ei, key, ids, created)| {
            let e = inner.mapping.entities.get(ei)?;
            let local_id = key::local_id(&key);
            // `get`, not `remove`: a row may be named twice (read again, and logged again),
            // and each item must see it (a missing row is a delete).
            let values = values
                .get(&(ei, local_id.clone()))
                .map(|cells| convert_row(e, cells.clone()));
            Some(Captured {
                entity: ei,
                key,
                local_id,
                ids,
                created,
                read_gen,
                values,
            })
        })
        .collect();
    {
        let mut st = inner.state();
        if st.epoch != epoch {
            return Ok((0, false));
        }
        for c in &items {
            st.in_flight.extend(c.ids.iter().copied());
        }
    }
    let n = items.len();
    for c in items {
        if tx.send(Ok(c)).is_err() {
            break;
        }
    }
    Ok((n, full))
}

/// Reads the rows of `e` with these keys: (key, the mapped columns' cells).
async fn read_rows(
    db: &Db,
    e: &EntityMap,
    keys: &[Key],
) -> Result<Vec<(Key, Vec<Result<SqlValue, String>>)>, sqlx::Error> {
    let stmt = db
        .dialect()
        .select_rows(&e.table, &e.key, &e.columns(), keys);
    let shape: Vec<Shape> = e
        .key
        .iter()
        .chain(e.fields.iter().map(|f| &f.column))
        .map(|c| Shape::Value(c.kind.clone()))
        .collect();
    let rows = db.fetch(&stmt, &shape).await?;
    Ok(rows
        .into_iter()
        .filter_map(|mut cells| {
            let rest = cells.split_off(e.key.len());
            let key = cells
                .into_iter()
                .map(|c| key_part(c.ok()?))
                .collect::<Option<Key>>()?;
            Some((key, rest))
        })
        .collect())
}

/// A key column's value.
pub(crate) fn key_part(v: SqlValue) -> Option<KeyPart> {
    match v {
        SqlValue::Int(i) => Some(KeyPart::Int(i)),
        SqlValue::Text(s) => Some(KeyPart::Text(s)),
        _ => None,
    }
}

/// A row's cells as canonical fields, and what could not be converted.
fn convert_row(e: &EntityMap, cells: Vec<Result<SqlValue, String>>) -> (Fields, Vec<String>) {
    let mut fields = Fields::new();
    let mut problems = Vec::new();
    for (f, cell) in e.fields.iter().zip(cells) {
        let name = f.field.name();
        match cell.and_then(|v| convert::from_sql(&f.conv, &f.field, v).map_err(|e| e.0)) {
            Ok(v) => {
                fields.insert(name.to_owned(), v);
            }
            Err(why) => problems.push(format!("column {} (field {name}): {why}", f.column.name)),
        }
    }
    (fields, problems)
}

/// The SDK confirmed every change up to `cursor`: deletes exactly the change-log rows handed
/// out up to there.
pub(crate) async fn published(inner: &Inner, cursor: &str) -> Result<(), AdapterError> {
    let Some((run, seq)) = cursor.split_once(':') else {
        return Ok(());
    };
    // A position of an earlier run: its rows are read and handed out again by this one.
    let (true, Ok(seq)) = (run == inner.run, seq.parse::<u64>()) else {
        return Ok(());
    };
    let ids: Vec<i64> = {
        let st = inner.state();
        st.handed
            .range(..=seq)
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect()
    };
    let d = inner.db.dialect();
    for chunk in ids.chunks(DELETE_CHUNK) {
        inner
            .db
            .execute(&d.delete_changes(&inner.prefix, chunk))
            .await
            .map_err(AdapterError::transient)?;
    }
    let mut st = inner.state();
    let done: Vec<u64> = st.handed.range(..=seq).map(|(s, _)| *s).collect();
    for s in done {
        if let Some(ids) = st.handed.remove(&s) {
            for id in ids {
                st.handed_ids.remove(&id);
            }
        }
    }
    Ok(())
}

/// Every row of every mapped table, a page at a time.
pub(crate) fn snapshot(
    inner: Arc<Inner>,
) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
    futures::stream::unfold(
        (inner, 0usize, 0i64, VecDeque::new(), false),
        |(inner, mut entity, mut offset, mut ready, mut failed)| async move {
            loop {
                if let Some(out) = ready.pop_front() {
                    return Some((out, (inner, entity, offset, ready, failed)));
                }
                if failed {
                    return None;
                }
                let e = inner.mapping.entities.get(entity)?.clone();
                let page = i64::try_from(inner.batch).unwrap_or(500);
                let stmt =
                    inner
                        .db
                        .dialect()
                        .select_page(&e.table, &e.key, &e.columns(), page, offset);
                let shape: Vec<Shape> = e
                    .key
                    .iter()
                    .chain(e.fields.iter().map(|f| &f.column))
                    .map(|c| Shape::Value(c.kind.clone()))
                    .collect();
                match inner.db.fetch(&stmt, &shape).await {
                    Err(err) => {
                        ready.push_back(Err(AdapterError::transient(err)));
                        failed = true;
                    }
                    Ok(rows) => {
                        if (rows.len() as i64) < page {
                            entity += 1;
                            offset = 0;
                        } else {
                            offset += page;
                        }
                        for mut cells in rows {
                            let rest = cells.split_off(e.key.len());
                            let Some(key) = cells
                                .into_iter()
                                .map(|c| key_part(c.ok()?))
                                .collect::<Option<Key>>()
                            else {
                                continue;
                            };
                            let local_id = key::local_id(&key);
                            let (fields, problems) = convert_row(&e, rest);
                            if !problems.is_empty() {
                                ready.push_back(Err(AdapterError::permanent(format!(
                                    "table {}, key {local_id}: {}",
                                    e.table,
                                    problems.join("; ")
                                ))));
                            }
                            ready.push_back(Ok(LocalChange::upsert(&e.name, local_id, fields)));
                        }
                    }
                }
            }
        },
    )
}
