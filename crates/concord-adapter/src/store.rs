//! The adapter's local state store: an embedded SQLite database (WAL) that survives restarts.
//!
//! It holds, per (entity, key, field), the value and stamp this replica keeps; the mapping
//! between canonical keys and the system's local ids; tombstones; the merge rank of this system
//! per field; the ids of processed incoming events; the change-feed cursor; and the outbox:
//! change events committed together with the stamps and cursor they stand for, kept until the
//! broker confirmed them (so a retry republishes the identical bytes, never a rebuilt event).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use concord_policy::Stamp;
use concord_policy::replica::{FieldState, Held};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::transport::Outgoing;

/// A state store failure.
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(#[from] sqlx::Error);

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS seen_at ON seen(at_ms)",
    "CREATE TABLE IF NOT EXISTS fields (
        entity TEXT NOT NULL, key TEXT NOT NULL, field TEXT NOT NULL,
        value BLOB, rank INTEGER NOT NULL, hlc INTEGER NOT NULL, system TEXT NOT NULL,
        pending INTEGER NOT NULL,
        PRIMARY KEY (entity, key, field)) WITHOUT ROWID",
    // Below a field's winner, the latest later write of each lower rank (`replica::Held`).
    "CREATE TABLE IF NOT EXISTS shadows (
        entity TEXT NOT NULL, key TEXT NOT NULL, field TEXT NOT NULL, rank INTEGER NOT NULL,
        value BLOB, hlc INTEGER NOT NULL, system TEXT NOT NULL,
        PRIMARY KEY (entity, key, field, rank)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS records (
        entity TEXT NOT NULL, key TEXT NOT NULL, local_id TEXT, live INTEGER NOT NULL,
        tomb_hlc INTEGER, tomb_system TEXT,
        PRIMARY KEY (entity, key))",
    "CREATE UNIQUE INDEX IF NOT EXISTS records_local ON records(entity, local_id)",
    "CREATE TABLE IF NOT EXISTS echoes (
        id INTEGER PRIMARY KEY, entity TEXT NOT NULL, key TEXT NOT NULL, field TEXT NOT NULL,
        value BLOB, at_ms INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS echoes_field ON echoes(entity, key, field)",
    "CREATE INDEX IF NOT EXISTS echoes_at ON echoes(at_ms)",
    "CREATE TABLE IF NOT EXISTS ranks (
        entity TEXT NOT NULL, field TEXT NOT NULL, rank INTEGER NOT NULL,
        PRIMARY KEY (entity, field))",
    "CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, routing_key TEXT NOT NULL,
        body BLOB NOT NULL, concord_key TEXT NOT NULL, user_id TEXT)",
];

/// What the store knows about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRow {
    pub key: String,
    pub local_id: Option<String>,
    /// Whether the record exists in the system (false after a delete).
    pub live: bool,
    /// `(hlc, system)` of the latest delete.
    pub tombstone: Option<(u64, String)>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The state store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating when missing) the store at `path`.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        Store::with_options(opts).await
    }

    /// Opens a store that lives in memory only (for tests).
    pub async fn in_memory() -> Result<Store, StoreError> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?;
        Store::with_options(opts).await
    }

    async fn with_options(opts: SqliteConnectOptions) -> Result<Store, StoreError> {
        // One connection: the engine works sequentially.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        Ok(Store { pool })
    }

    /// Starts a transaction.
    pub(crate) async fn begin(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// Closes the store (waits for the connection to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The greatest HLC value stored (own writes, received writes and tombstones).
    pub async fn max_hlc(&self) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT MAX(m) FROM (SELECT MAX(hlc) AS m FROM fields UNION ALL SELECT MAX(tomb_hlc) FROM records)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?.map_or(0, to_u64))
    }

    /// Forgets processed event ids older than `before_ms`.
    pub async fn prune_seen(&self, before_ms: u64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM seen WHERE at_ms < ?")
            .bind(to_i64(before_ms))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Forgets expected echoes recorded before `before_ms` (the feed never reported them).
    pub async fn prune_echoes(&self, before_ms: u64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM echoes WHERE at_ms < ?")
            .bind(to_i64(before_ms))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// A value of the `meta` table.
    pub async fn meta(&self, k: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.pool.acquire().await?;
        get_meta(&mut c, k).await
    }

    /// Sets a value of the `meta` table.
    pub async fn set_meta(&self, k: &str, v: &str) -> Result<(), StoreError> {
        let mut c = self.pool.acquire().await?;
        set_meta(&mut c, k, v).await
    }

    /// The persisted change-feed cursor.
    pub async fn cursor(&self) -> Result<Option<String>, StoreError> {
        self.meta(CURSOR).await
    }

    /// Whether an incoming event was processed.
    pub async fn seen(&self, event_id: &str) -> Result<bool, StoreError> {
        let mut c = self.pool.acquire().await?;
        is_seen(&mut c, event_id).await
    }

    /// The stored state of one field.
    pub async fn field(
        &self,
        entity: &str,
        key: &str,
        field: &str,
    ) -> Result<Option<FieldState>, StoreError> {
        let mut c = self.pool.acquire().await?;
        get_field(&mut c, entity, key, field).await
    }

    /// What the store knows about the record with canonical key `key`.
    pub async fn record(&self, entity: &str, key: &str) -> Result<Option<RecordRow>, StoreError> {
        let mut c = self.pool.acquire().await?;
        record_by_key(&mut c, entity, key).await
    }

    /// The canonical key of a local record.
    pub async fn key_of(&self, entity: &str, local_id: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.pool.acquire().await?;
        Ok(record_by_local(&mut c, entity, local_id)
            .await?
            .map(|r| r.key))
    }

    /// The outbox: events committed but not yet confirmed by the broker, in insertion order,
    /// each with its sequence number.
    pub async fn outbox(&self) -> Result<Vec<(i64, Outgoing)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, event_id, routing_key, body, concord_key, user_id FROM outbox ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>(0)?,
                    Outgoing {
                        event_id: r.try_get(1)?,
                        routing_key: r.try_get(2)?,
                        body: r.try_get(3)?,
                        concord_key: r.try_get(4)?,
                        user_id: r.try_get(5)?,
                    },
                ))
            })
            .collect()
    }

    /// Removes the outbox entries up to and including `seq` (the broker confirmed them).
    pub async fn outbox_done(&self, seq: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM outbox WHERE seq <= ?")
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// This system's merge rank for a field, as the router last told it.
    pub async fn rank(&self, entity: &str, field: &str) -> Result<u32, StoreError> {
        let mut c = self.pool.acquire().await?;
        get_rank(&mut c, entity, field).await
    }
}

pub(crate) const CURSOR: &str = "cursor";

/// Adds an event to the outbox (in the caller's transaction).
pub(crate) async fn push_outbox(c: &mut SqliteConnection, ev: &Outgoing) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO outbox (event_id, routing_key, body, concord_key, user_id) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(&ev.event_id)
    .bind(&ev.routing_key)
    .bind(&ev.body)
    .bind(&ev.concord_key)
    .bind(ev.user_id.as_deref())
    .execute(&mut *c)
    .await?;
    Ok(())
}
pub(crate) const SNAPSHOT_DONE: &str = "snapshot_done";

pub(crate) async fn get_meta(
    c: &mut SqliteConnection,
    k: &str,
) -> Result<Option<String>, StoreError> {
    let row = sqlx::query("SELECT v FROM meta WHERE k = ?")
        .bind(k)
        .fetch_optional(&mut *c)
        .await?;
    Ok(match row {
        Some(r) => Some(r.try_get::<String, _>(0)?),
        None => None,
    })
}

pub(crate) async fn set_meta(c: &mut SqliteConnection, k: &str, v: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
    )
    .bind(k)
    .bind(v)
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub(crate) async fn is_seen(c: &mut SqliteConnection, event_id: &str) -> Result<bool, StoreError> {
    let row = sqlx::query("SELECT 1 FROM seen WHERE event_id = ?")
        .bind(event_id)
        .fetch_optional(&mut *c)
        .await?;
    Ok(row.is_some())
}

pub(crate) async fn mark_seen(
    c: &mut SqliteConnection,
    event_id: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    sqlx::query("INSERT OR IGNORE INTO seen (event_id, at_ms) VALUES (?, ?)")
        .bind(event_id)
        .bind(to_i64(now_ms))
        .execute(&mut *c)
        .await?;
    Ok(())
}

pub(crate) async fn get_field(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
) -> Result<Option<FieldState>, StoreError> {
    let row = sqlx::query(
        "SELECT value, rank, hlc, system, pending FROM fields WHERE entity = ? AND key = ? AND field = ?",
    )
    .bind(entity)
    .bind(key)
    .bind(field)
    .fetch_optional(&mut *c)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(field_state(&r, 0)?))
}

/// The field state in columns `first..first + 5` (value, rank, hlc, system, pending) of `r`.
fn field_state(r: &SqliteRow, first: usize) -> Result<FieldState, sqlx::Error> {
    Ok(FieldState {
        value: r.try_get::<Option<Vec<u8>>, _>(first)?,
        stamp: Stamp {
            rank: u32::try_from(r.try_get::<i64, _>(first + 1)?).unwrap_or(0),
            hlc: to_u64(r.try_get::<i64, _>(first + 2)?),
            system: r.try_get::<String, _>(first + 3)?,
        },
        pending: r.try_get::<i64, _>(first + 4)? != 0,
    })
}

pub(crate) async fn put_field(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
    state: &FieldState,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO fields (entity, key, field, value, rank, hlc, system, pending)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT(entity, key, field) DO UPDATE SET value = excluded.value, rank = excluded.rank,
           hlc = excluded.hlc, system = excluded.system, pending = excluded.pending",
    )
    .bind(entity)
    .bind(key)
    .bind(field)
    .bind(state.value.as_deref())
    .bind(i64::from(state.stamp.rank))
    .bind(to_i64(state.stamp.hlc))
    .bind(&state.stamp.system)
    .bind(i64::from(state.pending))
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub(crate) async fn delete_field(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM fields WHERE entity = ? AND key = ? AND field = ?")
        .bind(entity)
        .bind(key)
        .bind(field)
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// Forgets every stored field (and shadow) of a record.
pub(crate) async fn delete_fields_of(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
) -> Result<(), StoreError> {
    for table in [
        "DELETE FROM fields WHERE entity = ? AND key = ?",
        "DELETE FROM shadows WHERE entity = ? AND key = ?",
    ] {
        sqlx::query(table)
            .bind(entity)
            .bind(key)
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// Names of the fields of a record the replica holds anything for (a winner or shadows).
pub(crate) async fn field_names_of(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query(
        "SELECT field FROM fields WHERE entity = ? AND key = ?
         UNION SELECT field FROM shadows WHERE entity = ? AND key = ?",
    )
    .bind(entity)
    .bind(key)
    .bind(entity)
    .bind(key)
    .fetch_all(&mut *c)
    .await?;
    let mut names = Vec::with_capacity(rows.len());
    for r in &rows {
        names.push(r.try_get::<String, _>(0)?);
    }
    Ok(names)
}

/// What the replica keeps of one field: its winner and shadows.
pub(crate) async fn held(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
) -> Result<Held, StoreError> {
    let winner = get_field(c, entity, key, field).await?;
    let rows = sqlx::query(
        "SELECT value, rank, hlc, system, 0 FROM shadows
         WHERE entity = ? AND key = ? AND field = ? ORDER BY rank DESC",
    )
    .bind(entity)
    .bind(key)
    .bind(field)
    .fetch_all(&mut *c)
    .await?;
    let mut shadows = Vec::with_capacity(rows.len());
    for r in &rows {
        shadows.push(field_state(r, 0)?);
    }
    Ok(Held { winner, shadows })
}

/// Stores what the replica keeps of one field (winner and shadows), replacing what it held.
/// With `before` (what it held, as read), only the parts that changed are written.
pub(crate) async fn keep(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
    held: &Held,
    before: Option<&Held>,
) -> Result<(), StoreError> {
    if before.is_none_or(|b| b.winner != held.winner) {
        match &held.winner {
            Some(w) => put_field(c, entity, key, field, w).await?,
            None => delete_field(c, entity, key, field).await?,
        }
    }
    if before.is_none_or(|b| b.shadows != held.shadows) {
        set_shadows(c, entity, key, field, &held.shadows).await?;
    }
    Ok(())
}

/// Replaces the shadows of one field.
pub(crate) async fn set_shadows(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
    shadows: &[FieldState],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM shadows WHERE entity = ? AND key = ? AND field = ?")
        .bind(entity)
        .bind(key)
        .bind(field)
        .execute(&mut *c)
        .await?;
    for s in shadows {
        sqlx::query(
            "INSERT OR REPLACE INTO shadows (entity, key, field, rank, value, hlc, system)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(entity)
        .bind(key)
        .bind(field)
        .bind(i64::from(s.stamp.rank))
        .bind(s.value.as_deref())
        .bind(to_i64(s.stamp.hlc))
        .bind(&s.stamp.system)
        .execute(&mut *c)
        .await?;
    }
    Ok(())
}

/// Clears the pending flag of a field if it still holds the write with `stamp`.
pub(crate) async fn clear_pending(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
    stamp: &Stamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE fields SET pending = 0
         WHERE entity = ? AND key = ? AND field = ? AND rank = ? AND hlc = ? AND system = ?",
    )
    .bind(entity)
    .bind(key)
    .bind(field)
    .bind(i64::from(stamp.rank))
    .bind(to_i64(stamp.hlc))
    .bind(&stamp.system)
    .execute(&mut *c)
    .await?;
    Ok(())
}

fn record_row(r: &sqlx::sqlite::SqliteRow) -> Result<RecordRow, StoreError> {
    let tomb_hlc: Option<i64> = r.try_get(3)?;
    let tomb_system: Option<String> = r.try_get(4)?;
    Ok(RecordRow {
        key: r.try_get(0)?,
        local_id: r.try_get(1)?,
        live: r.try_get::<i64, _>(2)? != 0,
        tombstone: match (tomb_hlc, tomb_system) {
            (Some(h), Some(s)) => Some((to_u64(h), s)),
            _ => None,
        },
    })
}

pub(crate) async fn record_by_key(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
) -> Result<Option<RecordRow>, StoreError> {
    record_where(c, entity, "key", key).await
}

pub(crate) async fn record_by_local(
    c: &mut SqliteConnection,
    entity: &str,
    local_id: &str,
) -> Result<Option<RecordRow>, StoreError> {
    record_where(c, entity, "local_id", local_id).await
}

/// The record of `entity` whose `column` (`key` or `local_id`) equals `value`.
async fn record_where(
    c: &mut SqliteConnection,
    entity: &str,
    column: &'static str,
    value: &str,
) -> Result<Option<RecordRow>, StoreError> {
    let sql = format!(
        "SELECT key, local_id, live, tomb_hlc, tomb_system FROM records WHERE entity = ? AND {column} = ?"
    );
    let row = sqlx::query(&sql)
        .bind(entity)
        .bind(value)
        .fetch_optional(&mut *c)
        .await?;
    row.as_ref().map(record_row).transpose()
}

/// Records that `key` is the local record `local_id` and that it exists. Another key mapped to
/// the same local id loses the mapping (the system merged the records).
pub(crate) async fn map_record(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    local_id: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE records SET local_id = NULL WHERE entity = ? AND local_id = ? AND key <> ?",
    )
    .bind(entity)
    .bind(local_id)
    .bind(key)
    .execute(&mut *c)
    .await?;
    sqlx::query(
        "INSERT INTO records (entity, key, local_id, live) VALUES (?, ?, ?, 1)
         ON CONFLICT(entity, key) DO UPDATE SET local_id = excluded.local_id, live = 1",
    )
    .bind(entity)
    .bind(key)
    .bind(local_id)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Records a delete of `key` stamped `(hlc, system)`. With `record_goes` the record no longer
/// exists locally; otherwise (fields were written after the delete) only the tombstone changes.
pub(crate) async fn set_tombstone(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    (hlc, system): (u64, &str),
    record_goes: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO records (entity, key, local_id, live, tomb_hlc, tomb_system) VALUES (?, ?, NULL, 0, ?, ?)
         ON CONFLICT(entity, key) DO UPDATE SET live = CASE WHEN ? THEN 0 ELSE live END,
           tomb_hlc = excluded.tomb_hlc, tomb_system = excluded.tomb_system",
    )
    .bind(entity)
    .bind(key)
    .bind(to_i64(hlc))
    .bind(system)
    .bind(record_goes)
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub(crate) async fn get_rank(
    c: &mut SqliteConnection,
    entity: &str,
    field: &str,
) -> Result<u32, StoreError> {
    let row = sqlx::query("SELECT rank FROM ranks WHERE entity = ? AND field = ?")
        .bind(entity)
        .bind(field)
        .fetch_optional(&mut *c)
        .await?;
    Ok(match row {
        Some(r) => u32::try_from(r.try_get::<i64, _>(0)?).unwrap_or(0),
        None => 0,
    })
}

pub(crate) async fn set_rank(
    c: &mut SqliteConnection,
    entity: &str,
    field: &str,
    rank: u32,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO ranks (entity, field, rank) VALUES (?, ?, ?)
         ON CONFLICT(entity, field) DO UPDATE SET rank = excluded.rank",
    )
    .bind(entity)
    .bind(field)
    .bind(i64::from(rank))
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Records that the change feed will report `field` = `value` because the SDK applied it.
pub(crate) async fn expect_echo(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
    value: Option<&[u8]>,
    now_ms: u64,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO echoes (entity, key, field, value, at_ms) VALUES (?, ?, ?, ?, ?)")
        .bind(entity)
        .bind(key)
        .bind(field)
        .bind(value)
        .bind(to_i64(now_ms))
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// Whether a local write of `field` = `value` is the (possibly late) echo of a value the SDK
/// applied. If so the expectation is consumed, together with the older ones of the field (the
/// feed is ordered: those will not come any more).
pub(crate) async fn take_echo(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
    value: Option<&[u8]>,
) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "SELECT id FROM echoes WHERE entity = ? AND key = ? AND field = ? AND value IS ? ORDER BY id LIMIT 1",
    )
    .bind(entity)
    .bind(key)
    .bind(field)
    .bind(value)
    .fetch_optional(&mut *c)
    .await?;
    let Some(row) = row else { return Ok(false) };
    let id: i64 = row.try_get(0)?;
    sqlx::query("DELETE FROM echoes WHERE entity = ? AND key = ? AND field = ? AND id <= ?")
        .bind(entity)
        .bind(key)
        .bind(field)
        .bind(id)
        .execute(&mut *c)
        .await?;
    Ok(true)
}

/// Forgets the expected echoes of a field: a local write of it was published, so the system
/// holds what its feed reports from now on.
pub(crate) async fn clear_echoes(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    field: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM echoes WHERE entity = ? AND key = ? AND field = ?")
        .bind(entity)
        .bind(key)
        .bind(field)
        .execute(&mut *c)
        .await?;
    Ok(())
}
