//! The adapter's local state store: an embedded SQLite database (WAL) that survives restarts.
//!
//! It holds, per (entity, key, field), the value and stamp this replica keeps; the mapping
//! between canonical keys and the system's local ids; tombstones; the merge rank of this system
//! per field; the ids of processed incoming events; the change-feed cursor; and the outbox:
//! change events committed together with the stamps and cursor they stand for, kept until the
//! broker confirmed them (so a retry republishes the identical bytes, never a rebuilt event).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use concord_policy::Stamp;
use concord_policy::replica::{Echo, FieldState, Held, Ranks, RecordState};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::transport::Outgoing;

/// A state store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("state store: {0}")]
    Sql(#[from] sqlx::Error),
    /// The store was written by a newer release.
    #[error(
        "state store schema version {found} is newer than this release supports ({supported}): \
         run the release that wrote it, or start from a new state file"
    )]
    NewerSchema { found: i64, supported: i64 },
}

/// The version of the store's schema this build writes (SQLite `PRAGMA user_version`).
/// 1: the first release; 2: echoes carry the record version of the write they expect.
pub const SCHEMA_VERSION: i64 = 2;

/// The schema of a new store (version [`SCHEMA_VERSION`]).
const SCHEMA: &[&str] = &[
    "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    "CREATE TABLE seen (event_id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL)",
    "CREATE INDEX seen_at ON seen(at_ms)",
    "CREATE TABLE fields (
        entity TEXT NOT NULL, key TEXT NOT NULL, field TEXT NOT NULL,
        value BLOB, rank INTEGER NOT NULL, hlc INTEGER NOT NULL, system TEXT NOT NULL,
        pending INTEGER NOT NULL,
        PRIMARY KEY (entity, key, field)) WITHOUT ROWID",
    // Below a field's winner, the latest later write of each lower rank (`replica::Held`).
    "CREATE TABLE shadows (
        entity TEXT NOT NULL, key TEXT NOT NULL, field TEXT NOT NULL, rank INTEGER NOT NULL,
        value BLOB, hlc INTEGER NOT NULL, system TEXT NOT NULL,
        PRIMARY KEY (entity, key, field, rank)) WITHOUT ROWID",
    "CREATE TABLE records (
        entity TEXT NOT NULL, key TEXT NOT NULL, local_id TEXT, live INTEGER NOT NULL,
        tomb_hlc INTEGER, tomb_system TEXT,
        PRIMARY KEY (entity, key))",
    "CREATE UNIQUE INDEX records_local ON records(entity, local_id)",
    // Reports of the adapter's own writes the change feed is expected to make
    // (`replica::Echo`): by value (`version` NULL), or by record version (one row per written
    // field, and a row with `field` NULL for a delete).
    "CREATE TABLE echoes (
        id INTEGER PRIMARY KEY, entity TEXT NOT NULL, key TEXT NOT NULL, field TEXT,
        value BLOB, at_ms INTEGER NOT NULL, version INTEGER)",
    "CREATE INDEX echoes_record ON echoes(entity, key)",
    "CREATE INDEX echoes_at ON echoes(at_ms)",
    "CREATE TABLE ranks (
        entity TEXT NOT NULL, field TEXT NOT NULL, rank INTEGER NOT NULL,
        PRIMARY KEY (entity, field))",
    // Events to publish, and local changes that cannot be published, parked for the system's
    // dead-letter queue (`reason` set).
    "CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, routing_key TEXT NOT NULL,
        body BLOB NOT NULL, concord_key TEXT NOT NULL, user_id TEXT, reason TEXT, detail TEXT)",
];

/// From version 1 (whose `echoes` had no `version` and a non-null `field`) to 2.
const MIGRATE_1_TO_2: &[&str] = &[
    "CREATE TABLE echoes_v2 (
        id INTEGER PRIMARY KEY, entity TEXT NOT NULL, key TEXT NOT NULL, field TEXT,
        value BLOB, at_ms INTEGER NOT NULL, version INTEGER)",
    "INSERT INTO echoes_v2 (id, entity, key, field, value, at_ms)
        SELECT id, entity, key, field, value, at_ms FROM echoes",
    "DROP TABLE echoes",
    "ALTER TABLE echoes_v2 RENAME TO echoes",
    "CREATE INDEX echoes_record ON echoes(entity, key)",
    "CREATE INDEX echoes_at ON echoes(at_ms)",
    "ALTER TABLE outbox ADD COLUMN reason TEXT",
    "ALTER TABLE outbox ADD COLUMN detail TEXT",
];

/// One entry of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxEntry {
    /// A change event for the ingress exchange.
    Publish(Outgoing),
    /// A local change that cannot be published, for the system's dead-letter queue.
    Park(Parked),
}

/// A local change that cannot be published (an entity not in the policy, a field its message
/// does not have, a value that does not fit it, a write-back the system refused): parked in the
/// system's dead-letter queue, never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// What the change was (JSON: entity, local id, canonical key if known, fields).
    pub body: Vec<u8>,
    /// The code for header `concord-reason`.
    pub reason: String,
    /// What exactly is wrong.
    pub detail: String,
}

/// Creates the schema of a new store, or brings an older one up to [`SCHEMA_VERSION`], in one
/// transaction.
async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *tx)
        .await?;
    let has_tables: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'meta')")
            .fetch_one(&mut *tx)
            .await?;
    // Version 1 did not set user_version.
    let version = if version == 0 && has_tables {
        1
    } else {
        version
    };
    let steps: &[&str] = match version {
        0 => SCHEMA,
        1 => MIGRATE_1_TO_2,
        SCHEMA_VERSION => &[],
        found => {
            return Err(StoreError::NewerSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
    };
    for stmt in steps {
        sqlx::query(stmt).execute(&mut *tx).await?;
    }
    sqlx::query(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

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
        migrate(&pool).await?;
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
            "SELECT MAX(m) FROM (SELECT MAX(hlc) AS m FROM fields UNION ALL SELECT MAX(hlc) FROM shadows
             UNION ALL SELECT MAX(tomb_hlc) FROM records)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?.map_or(0, to_u64))
    }

    /// Forgets at most `batch` processed event ids, oldest first: those recorded before
    /// `before_ms`, and those beyond the newest `max_entries`. Returns how many it forgot (less
    /// than `batch`: nothing more to forget now). One short transaction: applying never waits
    /// long for pruning.
    pub async fn prune_seen(
        &self,
        before_ms: u64,
        max_entries: u64,
        batch: u32,
    ) -> Result<u64, StoreError> {
        // Ids are appended in processing order, so rowids count them (`INSERT OR IGNORE`).
        let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(rowid) FROM seen")
            .fetch_one(&self.pool)
            .await?;
        let Some(newest) = newest else {
            return Ok(0);
        };
        let beyond_cap = newest.saturating_sub(to_i64(max_entries));
        let r = sqlx::query(
            "DELETE FROM seen WHERE rowid IN (
                SELECT rowid FROM seen WHERE rowid <= ?1 OR at_ms < ?2 ORDER BY rowid LIMIT ?3)",
        )
        .bind(beyond_cap)
        .bind(to_i64(before_ms))
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Number of processed event ids kept.
    pub async fn seen_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(n))
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

    /// The outbox: entries committed but not yet confirmed by the broker, in insertion order,
    /// each with its sequence number.
    pub async fn outbox(&self) -> Result<Vec<(i64, OutboxEntry)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, event_id, routing_key, body, concord_key, user_id, reason, detail
             FROM outbox ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let seq = r.try_get::<i64, _>(0)?;
                let entry = match r.try_get::<Option<String>, _>(6)? {
                    Some(reason) => OutboxEntry::Park(Parked {
                        body: r.try_get(3)?,
                        reason,
                        detail: r.try_get::<Option<String>, _>(7)?.unwrap_or_default(),
                    }),
                    None => OutboxEntry::Publish(Outgoing {
                        event_id: r.try_get(1)?,
                        routing_key: r.try_get(2)?,
                        body: r.try_get(3)?,
                        concord_key: r.try_get(4)?,
                        user_id: r.try_get(5)?,
                        resync_target: None,
                        control: None,
                    }),
                };
                Ok((seq, entry))
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
/// The resyncs to do (JSON, see `runner::ResyncJob`): kept until done, so that a restart
/// resumes them.
pub(crate) const RESYNC_JOBS: &str = "resync_jobs";

/// One record of a resync: its entity, key and the fields this system wrote last (name, value,
/// clock).
pub(crate) type ResyncRecord = (String, String, Vec<(String, Option<Vec<u8>>, u64)>);

impl Store {
    /// How many live records hold a field `system` wrote last (in `entity`, with `key`).
    pub(crate) async fn resync_count(
        &self,
        system: &str,
        entity: Option<&str>,
        key: Option<&str>,
    ) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM records r WHERE r.live = 1
               AND (?1 IS NULL OR r.entity = ?1) AND (?2 IS NULL OR r.key = ?2)
               AND EXISTS (SELECT 1 FROM fields f
                           WHERE f.entity = r.entity AND f.key = r.key AND f.system = ?3)",
        )
        .bind(entity)
        .bind(key)
        .bind(system)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// The next `limit` live records after `after` (entity, key order) holding fields `system`
    /// wrote last, with those fields' values and clocks: what a resync publishes, in pages.
    pub(crate) async fn resync_page(
        &self,
        system: &str,
        entity: Option<&str>,
        key: Option<&str>,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<ResyncRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.entity, r.key FROM records r WHERE r.live = 1
               AND (?1 IS NULL OR r.entity = ?1) AND (?2 IS NULL OR r.key = ?2)
               AND (r.entity > ?3 OR (r.entity = ?3 AND r.key > ?4))
               AND EXISTS (SELECT 1 FROM fields f
                           WHERE f.entity = r.entity AND f.key = r.key AND f.system = ?5)
             ORDER BY r.entity, r.key LIMIT ?6",
        )
        .bind(entity)
        .bind(key)
        .bind(after.0)
        .bind(after.1)
        .bind(system)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut page = Vec::with_capacity(rows.len());
        for row in rows {
            let (entity, key): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let fields = sqlx::query(
                "SELECT field, value, hlc FROM fields
                 WHERE entity = ?1 AND key = ?2 AND system = ?3 ORDER BY field",
            )
            .bind(&entity)
            .bind(&key)
            .bind(system)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|f| {
                let hlc: i64 = f.try_get(2)?;
                Ok((
                    f.try_get::<String, _>(0)?,
                    f.try_get::<Option<Vec<u8>>, _>(1)?,
                    u64::try_from(hlc).unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
            page.push((entity, key, fields));
        }
        Ok(page)
    }
}

/// Adds an event to the outbox (in the caller's transaction).
/// Parks a local change that cannot be published (in the caller's transaction).
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

/// Which of `event_ids` were processed already.
pub(crate) async fn seen_among(
    c: &mut SqliteConnection,
    event_ids: &[&str],
) -> Result<HashSet<String>, StoreError> {
    let mut seen = HashSet::new();
    for ids in event_ids.chunks(KEYS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT event_id FROM seen WHERE event_id IN (",
        );
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        q.push(")");
        for r in q.build().fetch_all(&mut *c).await? {
            seen.insert(r.try_get(0)?);
        }
    }
    Ok(seen)
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

/// Everything the store keeps about one record, as the replica machine sees it.
pub(crate) async fn load_record(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
) -> Result<RecordState, StoreError> {
    let mut loaded = load_records(c, entity, &[key]).await?;
    Ok(loaded.remove(key).unwrap_or_default())
}

/// Keys looked up by one statement of [`load_records`].
const KEYS_PER_STATEMENT: usize = 500;

/// Everything the store keeps about several records of `entity` (by key; a key the store knows
/// nothing of is absent), in four statements per [`KEYS_PER_STATEMENT`] keys.
pub(crate) async fn load_records(
    c: &mut SqliteConnection,
    entity: &str,
    keys: &[&str],
) -> Result<HashMap<String, RecordState>, StoreError> {
    let mut states: HashMap<String, RecordState> = HashMap::new();
    for keys in keys.chunks(KEYS_PER_STATEMENT) {
        load_some(c, entity, keys, &mut states).await?;
    }
    Ok(states)
}

/// `SELECT {columns} FROM {table} WHERE entity = ? AND key IN (…keys) {order}`.
fn select_keys<'a>(
    columns_from: &str,
    entity: &'a str,
    keys: &[&'a str],
    order: &str,
) -> sqlx::QueryBuilder<'a, sqlx::Sqlite> {
    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(columns_from);
    q.push(" WHERE entity = ")
        .push_bind(entity)
        .push(" AND key IN (");
    let mut list = q.separated(", ");
    for key in keys {
        list.push_bind(*key);
    }
    q.push(") ").push(order);
    q
}

async fn load_some(
    c: &mut SqliteConnection,
    entity: &str,
    keys: &[&str],
    states: &mut HashMap<String, RecordState>,
) -> Result<(), StoreError> {
    let rows = select_keys(
        "SELECT key, local_id, live, tomb_hlc, tomb_system FROM records",
        entity,
        keys,
        "",
    )
    .build()
    .fetch_all(&mut *c)
    .await?;
    for r in &rows {
        let row = record_row(r)?;
        let state = states.entry(row.key).or_default();
        state.known = true;
        state.local_id = row.local_id;
        state.live = row.live;
        state.tombstone = row.tombstone;
    }
    // The winners, then the shadows (highest rank first).
    for (sql, order, shadow) in [
        (
            "SELECT key, field, value, rank, hlc, system, pending FROM fields",
            "",
            false,
        ),
        (
            "SELECT key, field, value, rank, hlc, system, 0 FROM shadows",
            "ORDER BY key, field, rank DESC",
            true,
        ),
    ] {
        let rows = select_keys(sql, entity, keys, order)
            .build()
            .fetch_all(&mut *c)
            .await?;
        for r in &rows {
            let state = states.entry(r.try_get(0)?).or_default();
            state.known = true;
            let held = state.fields.entry(r.try_get(1)?).or_default();
            let f = field_state(r, 2)?;
            if shadow {
                held.shadows.push(f);
            } else {
                held.winner = Some(f);
            }
        }
    }
    let rows = select_keys(
        "SELECT key, field, value, at_ms, version FROM echoes",
        entity,
        keys,
        "ORDER BY key, id",
    )
    .build()
    .fetch_all(&mut *c)
    .await?;
    for r in &rows {
        let key: String = r.try_get(0)?;
        let field: Option<String> = r.try_get(1)?;
        let value: Option<Vec<u8>> = r.try_get(2)?;
        let at_ms = to_u64(r.try_get(3)?);
        let version = r.try_get::<Option<i64>, _>(4)?.map(to_u64);
        // Echoes alone do not make a record known (as before: only a record row or fields do).
        let echoes = &mut states.entry(key).or_default().echoes;
        match (version, field) {
            (None, Some(field)) => echoes.push(Echo::Value {
                field,
                value,
                at_ms,
            }),
            (None, None) => {}
            (Some(version), field) => {
                let same = matches!(echoes.last(), Some(Echo::Version { version: v, .. }) if *v == version);
                if !same {
                    echoes.push(Echo::Version {
                        version,
                        fields: Vec::new(),
                        deleted: false,
                        at_ms,
                    });
                }
                if let Some(Echo::Version {
                    fields, deleted, ..
                }) = echoes.last_mut()
                {
                    match field {
                        Some(f) => fields.push((f, value)),
                        None => *deleted = true,
                    }
                }
            }
        }
    }
    Ok(())
}

/// The canonical keys and states of the records of `entity` the system knows by these local
/// ids (a local id the store does not know is absent).
pub(crate) async fn load_records_by_local(
    c: &mut SqliteConnection,
    entity: &str,
    local_ids: &[&str],
) -> Result<HashMap<String, (String, RecordState)>, StoreError> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for ids in local_ids.chunks(KEYS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT local_id, key FROM records WHERE entity = ",
        );
        q.push_bind(entity).push(" AND local_id IN (");
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        q.push(")");
        for r in q.build().fetch_all(&mut *c).await? {
            keys.push((r.try_get(0)?, r.try_get(1)?));
        }
    }
    let key_refs: Vec<&str> = keys.iter().map(|(_, k)| k.as_str()).collect();
    let mut states = load_records(c, entity, &key_refs).await?;
    Ok(keys
        .into_iter()
        .map(|(local_id, key)| {
            let state = states.remove(&key).unwrap_or_default();
            (local_id, (key, state))
        })
        .collect())
}

/// The canonical key and state of the record the system knows as `local_id`, if any.
pub(crate) async fn load_record_by_local(
    c: &mut SqliteConnection,
    entity: &str,
    local_id: &str,
) -> Result<Option<(String, RecordState)>, StoreError> {
    let Some(row) = record_by_local(c, entity, local_id).await? else {
        return Ok(None);
    };
    let state = load_record(c, entity, &row.key).await?;
    Ok(Some((row.key, state)))
}

/// Writes what changed from `before` (as loaded) to `after` of one record.
pub(crate) async fn save_record(
    c: &mut SqliteConnection,
    entity: &str,
    key: &str,
    before: &RecordState,
    after: &RecordState,
) -> Result<(), StoreError> {
    let mut w = Writes::default();
    w.record(entity, key, before, after);
    w.write(c).await
}

/// Rows written by one multi-row statement: at most 8 bound variables each stays well within
/// SQLite's limit (32,766).
const ROWS_PER_STATEMENT: usize = 1000;

/// Store writes collected for several records (of one batch) and written with a few
/// multi-row statements, instead of several statements per record: every statement is a
/// round trip to sqlx's SQLite worker thread, which is what bounds an adapter's throughput.
///
/// Each record must be given at most once per flush: the writes of two steps of one record
/// would not be applied in order (deletions go before insertions). A caller that may meet a
/// record again flushes first ([`Writes::has`]).
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// The records given since the last flush.
    given: HashSet<(String, String)>,
    /// (entity, local id, key): other keys that held this local id lose it (the system merged
    /// the records). Written first: `records_local` is unique.
    unmap: Vec<(String, String, String)>,
    /// (entity, the record's row).
    records: Vec<(String, RecordRow)>,
    /// (entity, key, field, winner).
    winners: Vec<(String, String, String, FieldState)>,
    /// (entity, key, field) whose winner is gone.
    no_winner: Vec<(String, String, String)>,
    /// (entity, key, field, shadows), replacing the field's shadows.
    shadows: Vec<(String, String, String, Vec<FieldState>)>,
    /// (entity, key) → its echoes, replacing the record's.
    echoes: HashMap<(String, String), Vec<Echo>>,
    /// Events processed.
    seen: Vec<(String, u64)>,
    /// Entries appended to the outbox, in order.
    outbox: Vec<OutboxEntry>,
}

impl Writes {
    /// What changed from `before` (as loaded) to `after` of one record.
    pub(crate) fn record(
        &mut self,
        entity: &str,
        key: &str,
        before: &RecordState,
        after: &RecordState,
    ) {
        self.given.insert((entity.to_owned(), key.to_owned()));
        let row = |s: &RecordState| (s.local_id.clone(), s.live, s.tombstone.clone());
        let needs_row = after.local_id.is_some() || after.live || after.tombstone.is_some();
        if row(before) != row(after) && needs_row {
            if let Some(local_id) = &after.local_id {
                self.unmap
                    .push((entity.to_owned(), local_id.clone(), key.to_owned()));
            }
            self.records.push((
                entity.to_owned(),
                RecordRow {
                    key: key.to_owned(),
                    local_id: after.local_id.clone(),
                    live: after.live,
                    tombstone: after.tombstone.clone(),
                },
            ));
        }
        let empty = Held::default();
        let names: std::collections::BTreeSet<&String> =
            before.fields.keys().chain(after.fields.keys()).collect();
        for name in names {
            let old = before.fields.get(name).unwrap_or(&empty);
            let new = after.fields.get(name).unwrap_or(&empty);
            if old.winner != new.winner {
                let at = (entity.to_owned(), key.to_owned(), name.clone());
                match &new.winner {
                    Some(w) => self.winners.push((at.0, at.1, at.2, w.clone())),
                    None => self.no_winner.push(at),
                }
            }
            if old.shadows != new.shadows {
                self.shadows.push((
                    entity.to_owned(),
                    key.to_owned(),
                    name.clone(),
                    new.shadows.clone(),
                ));
            }
        }
        if before.echoes != after.echoes {
            self.echoes
                .insert((entity.to_owned(), key.to_owned()), after.echoes.clone());
        }
    }

    /// Whether the record was given since the last flush.
    pub(crate) fn has(&self, entity: &str, key: &str) -> bool {
        self.given.contains(&(entity.to_owned(), key.to_owned()))
    }

    /// The event with dedup key `event_id` was processed at `now_ms`.
    pub(crate) fn seen(&mut self, event_id: String, now_ms: u64) {
        self.seen.push((event_id, now_ms));
    }

    /// An event to publish, after the outbox's entries so far.
    pub(crate) fn publish(&mut self, ev: Outgoing) {
        self.outbox.push(OutboxEntry::Publish(ev));
    }

    /// A local change that cannot be published, for the system's dead-letter queue, after the
    /// outbox's entries so far.
    pub(crate) fn park(&mut self, p: Parked) {
        self.outbox.push(OutboxEntry::Park(p));
    }

    /// Writes everything collected (and forgets it), in the transaction `c`.
    pub(crate) async fn flush(&mut self, c: &mut SqliteConnection) -> Result<(), StoreError> {
        let w = std::mem::take(self);
        w.write(c).await
    }

    async fn write(self, c: &mut SqliteConnection) -> Result<(), StoreError> {
        for (entity, local_id, key) in &self.unmap {
            sqlx::query(
                "UPDATE records SET local_id = NULL WHERE entity = ? AND local_id = ? AND key <> ?",
            )
            .bind(entity)
            .bind(local_id)
            .bind(key)
            .execute(&mut *c)
            .await?;
        }
        for rows in self.records.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO records (entity, key, local_id, live, tomb_hlc, tomb_system) ",
            );
            q.push_values(rows, |mut b, (entity, r)| {
                b.push_bind(entity.as_str())
                    .push_bind(r.key.as_str())
                    .push_bind(r.local_id.as_deref())
                    .push_bind(r.live)
                    .push_bind(r.tombstone.as_ref().map(|(h, _)| to_i64(*h)))
                    .push_bind(r.tombstone.as_ref().map(|(_, s)| s.as_str()));
            });
            q.push(
                " ON CONFLICT(entity, key) DO UPDATE SET local_id = excluded.local_id,
                   live = excluded.live, tomb_hlc = excluded.tomb_hlc,
                   tomb_system = excluded.tomb_system",
            );
            q.build().execute(&mut *c).await?;
        }
        for (entity, key, field) in &self.no_winner {
            delete_field(c, entity, key, field).await?;
        }
        for rows in self.winners.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO fields (entity, key, field, value, rank, hlc, system, pending) ",
            );
            q.push_values(rows, |mut b, (entity, key, field, state)| {
                b.push_bind(entity.as_str())
                    .push_bind(key.as_str())
                    .push_bind(field.as_str())
                    .push_bind(state.value.as_deref())
                    .push_bind(i64::from(state.stamp.rank))
                    .push_bind(to_i64(state.stamp.hlc))
                    .push_bind(state.stamp.system.as_str())
                    .push_bind(i64::from(state.pending));
            });
            q.push(
                " ON CONFLICT(entity, key, field) DO UPDATE SET value = excluded.value,
                   rank = excluded.rank, hlc = excluded.hlc, system = excluded.system,
                   pending = excluded.pending",
            );
            q.build().execute(&mut *c).await?;
        }
        for (entity, key, field, shadows) in &self.shadows {
            set_shadows(c, entity, key, field, shadows).await?;
        }
        if !self.echoes.is_empty() {
            let records: Vec<&(String, String)> = self.echoes.keys().collect();
            for records in records.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "DELETE FROM echoes WHERE (entity, key) IN (VALUES ",
                );
                let mut list = q.separated(", ");
                for (entity, key) in records {
                    list.push("(")
                        .push_bind_unseparated(entity.as_str())
                        .push_unseparated(", ")
                        .push_bind_unseparated(key.as_str())
                        .push_unseparated(")");
                }
                q.push(")");
                q.build().execute(&mut *c).await?;
            }
            insert_echoes(c, &self.echoes).await?;
        }
        for rows in self.seen.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT OR IGNORE INTO seen (event_id, at_ms) ",
            );
            q.push_values(rows, |mut b, (event_id, at_ms)| {
                b.push_bind(event_id.as_str()).push_bind(to_i64(*at_ms));
            });
            q.build().execute(&mut *c).await?;
        }
        for rows in self.outbox.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO outbox (event_id, routing_key, body, concord_key, user_id, reason, detail) ",
            );
            q.push_values(rows, |mut b, entry| match entry {
                OutboxEntry::Publish(ev) => {
                    b.push_bind(ev.event_id.as_str())
                        .push_bind(ev.routing_key.as_str())
                        .push_bind(ev.body.as_slice())
                        .push_bind(ev.concord_key.as_str())
                        .push_bind(ev.user_id.as_deref())
                        .push_bind(None::<&str>)
                        .push_bind(None::<&str>);
                }
                // Parked: no event, the change's description as the body.
                OutboxEntry::Park(p) => {
                    b.push_bind("")
                        .push_bind("")
                        .push_bind(p.body.as_slice())
                        .push_bind("")
                        .push_bind(None::<&str>)
                        .push_bind(p.reason.as_str())
                        .push_bind(p.detail.as_str());
                }
            });
            q.build().execute(&mut *c).await?;
        }
        Ok(())
    }
}

/// Inserts the echoes of several records (each record's in order: they are read back by id).
async fn insert_echoes(
    c: &mut SqliteConnection,
    echoes: &HashMap<(String, String), Vec<Echo>>,
) -> Result<(), StoreError> {
    // (entity, key, field, value, at_ms, version) rows.
    type Row<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a [u8]>,
        u64,
        Option<u64>,
    );
    let mut rows: Vec<Row<'_>> = Vec::new();
    for ((entity, key), echoes) in echoes {
        for echo in echoes {
            match echo {
                Echo::Value {
                    field,
                    value,
                    at_ms,
                } => rows.push((entity, key, Some(field), value.as_deref(), *at_ms, None)),
                Echo::Version {
                    version,
                    fields,
                    deleted,
                    at_ms,
                } => {
                    for (field, value) in fields {
                        rows.push((
                            entity,
                            key,
                            Some(field),
                            value.as_deref(),
                            *at_ms,
                            Some(*version),
                        ));
                    }
                    if *deleted {
                        rows.push((entity, key, None, None, *at_ms, Some(*version)));
                    }
                }
            }
        }
    }
    for rows in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO echoes (entity, key, field, value, at_ms, version) ",
        );
        q.push_values(
            rows,
            |mut b, (entity, key, field, value, at_ms, version)| {
                b.push_bind(*entity)
                    .push_bind(*key)
                    .push_bind(*field)
                    .push_bind(*value)
                    .push_bind(to_i64(*at_ms))
                    .push_bind(version.map(to_i64));
            },
        );
        q.build().execute(&mut *c).await?;
    }
    Ok(())
}

/// This system's merge ranks for the fields of `entity`.
pub(crate) async fn load_ranks(
    c: &mut SqliteConnection,
    entity: &str,
) -> Result<Ranks, StoreError> {
    let rows = sqlx::query("SELECT field, rank FROM ranks WHERE entity = ?")
        .bind(entity)
        .fetch_all(&mut *c)
        .await?;
    let mut ranks = Ranks::new();
    for r in &rows {
        let rank = u32::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0);
        ranks.insert(r.try_get(0)?, rank);
    }
    Ok(ranks)
}

/// Writes the ranks that changed from `before` to `after`.
pub(crate) async fn save_ranks(
    c: &mut SqliteConnection,
    entity: &str,
    before: &Ranks,
    after: &Ranks,
) -> Result<(), StoreError> {
    for (field, rank) in after {
        if before.get(field) != Some(rank) {
            sqlx::query(
                "INSERT INTO ranks (entity, field, rank) VALUES (?, ?, ?)
                 ON CONFLICT(entity, field) DO UPDATE SET rank = excluded.rank",
            )
            .bind(entity)
            .bind(field)
            .bind(i64::from(*rank))
            .execute(&mut *c)
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn seen_ids(store: &Store, n: u64, at_ms: u64) {
        let mut tx = store.begin().await.unwrap();
        let mut w = Writes::default();
        for i in 0..n {
            w.seen(format!("e-{at_ms}-{i}"), at_ms);
        }
        w.flush(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
    }

    fn state_of(n: u64) -> RecordState {
        let field = |v: &str, hlc: u64, pending: bool| FieldState {
            value: Some(v.as_bytes().to_vec()),
            stamp: concord_policy::clock::Stamp {
                rank: 1,
                hlc,
                system: "orders".into(),
            },
            pending,
        };
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "name".to_owned(),
            Held {
                winner: Some(field(&format!("n{n}"), n, false)),
                shadows: vec![field("old", n - 1, false)],
            },
        );
        fields.insert(
            "phone".to_owned(),
            Held {
                winner: Some(field(&format!("p{n}"), n, true)),
                shadows: Vec::new(),
            },
        );
        RecordState {
            known: true,
            local_id: Some(format!("l{n}")),
            live: true,
            tombstone: None,
            fields,
            echoes: vec![
                Echo::Value {
                    field: "phone".into(),
                    value: Some(b"v".to_vec()),
                    at_ms: n,
                },
                Echo::Version {
                    version: n,
                    fields: vec![("name".into(), Some(b"x".to_vec()))],
                    deleted: false,
                    at_ms: n,
                },
                Echo::Version {
                    version: n + 1,
                    fields: Vec::new(),
                    deleted: true,
                    at_ms: n,
                },
            ],
        }
    }

    /// What several records' writes flushed together hold is what loading them gives back,
    /// by key and by local id; a second flush replaces what changed.
    #[tokio::test]
    async fn records_written_together_read_back_alike() {
        let store = Store::in_memory().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let mut w = Writes::default();
        for n in 2..5 {
            w.record("e", &format!("k{n}"), &RecordState::default(), &state_of(n));
        }
        w.flush(&mut tx).await.unwrap();
        let loaded = load_records(&mut tx, "e", &["k2", "k3", "k4", "k9"])
            .await
            .unwrap();
        assert_eq!(loaded.len(), 3);
        for n in 2..5 {
            assert_eq!(loaded[&format!("k{n}")], state_of(n), "k{n}");
        }
        let by_local = load_records_by_local(&mut tx, "e", &["l3", "l8"])
            .await
            .unwrap();
        assert_eq!(by_local.len(), 1);
        assert_eq!(by_local["l3"], ("k3".to_owned(), state_of(3)));
        // k3 becomes k3 with the state of 7 (new values, echoes and local id).
        let mut w = Writes::default();
        w.record("e", "k3", &state_of(3), &state_of(7));
        w.flush(&mut tx).await.unwrap();
        assert_eq!(load_record(&mut tx, "e", "k3").await.unwrap(), state_of(7));
        assert_eq!(load_record(&mut tx, "e", "k2").await.unwrap(), state_of(2));
        tx.commit().await.unwrap();
    }

    /// The deduplication store stays bounded by count and by age, pruned in batches of at most
    /// `batch` rows (each one short transaction), oldest first.
    #[tokio::test]
    async fn processed_ids_are_pruned_in_batches_by_count_and_age() {
        let store = Store::in_memory().await.unwrap();
        seen_ids(&store, 1_000, 10).await; // old
        seen_ids(&store, 9_000, 1_000).await; // recent
        let mut batches = Vec::new();
        loop {
            let n = store.prune_seen(100, 5_000, 2_000).await.unwrap();
            batches.push(n);
            if n < 2_000 {
                break;
            }
        }
        assert_eq!(batches, [2_000, 2_000, 1_000]);
        assert_eq!(store.seen_count().await.unwrap(), 5_000);
        // The newest are kept, the oldest went first.
        assert!(store.seen("e-1000-8999").await.unwrap());
        assert!(!store.seen("e-1000-3999").await.unwrap());
        assert!(store.seen("e-1000-4000").await.unwrap());
        assert!(!store.seen("e-10-0").await.unwrap());
    }

    /// A store of the first release (no schema version, echoes without versions) is migrated
    /// with its data; a store of a newer release is refused with a clear message.
    #[tokio::test]
    async fn the_schema_is_versioned_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        {
            let opts = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new().connect_with(opts).await.unwrap();
            // Version 1's schema, as the first release created it.
            let v1 = SCHEMA
                .iter()
                .map(|stmt| {
                    if stmt.starts_with("CREATE TABLE echoes") {
                        "CREATE TABLE echoes (id INTEGER PRIMARY KEY, entity TEXT NOT NULL,
                            key TEXT NOT NULL, field TEXT NOT NULL, value BLOB,
                            at_ms INTEGER NOT NULL)"
                    } else if stmt.starts_with("CREATE TABLE outbox") {
                        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                            event_id TEXT NOT NULL, routing_key TEXT NOT NULL, body BLOB NOT NULL,
                            concord_key TEXT NOT NULL, user_id TEXT)"
                    } else if stmt.starts_with("CREATE INDEX echoes_record") {
                        "CREATE INDEX echoes_field ON echoes(entity, key, field)"
                    } else {
                        stmt
                    }
                })
                .chain([
                    "INSERT INTO echoes (entity, key, field, value, at_ms) VALUES ('e', 'k', 'f', x'01', 5)",
                ]);
            for stmt in v1 {
                sqlx::query(stmt).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let store = Store::open(&path).await.unwrap();
        let mut c = store.pool.acquire().await.unwrap();
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let state = load_record(&mut c, "e", "k").await.unwrap();
        assert_eq!(
            state.echoes,
            [Echo::Value {
                field: "f".into(),
                value: Some(vec![1]),
                at_ms: 5
            }]
        );
        drop(c);
        store.close().await;

        let path = dir.path().join("new.sqlite");
        let store = Store::open(&path).await.unwrap();
        let mut c = store.pool.acquire().await.unwrap();
        sqlx::query("PRAGMA user_version = 99")
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        store.close().await;
        let err = Store::open(&path).await.unwrap_err().to_string();
        assert!(
            err.contains("schema version 99") && err.contains("newer"),
            "{err}"
        );
    }
}
