//! [`SqlSystem`]: a database as a Concord system (the SDK's `Adapter` and `SystemAdapter`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use concord_adapter::{
    Adapter, AdapterError, Applied, Apply, Context, Echoes, LocalChange, SystemAdapter,
};
use futures::Stream;
use prost_reflect::MessageDescriptor;
use tokio::sync::{Notify, oneshot};
use tracing::warn;

use crate::capture::{self, Captured};
use crate::config::{Family, SqlConfig};
use crate::db::Db;
use crate::mapping::{self, Mapping, Visibility};
use crate::problem::{self, Problem};

/// Why the adapter could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlError {
    /// The configuration does not fit the schemas; one line per problem.
    #[error("{}", problem::lines(.0))]
    Problems(Vec<Problem>),
    /// The database URL could not be resolved (an environment variable is missing).
    #[error("{0}")]
    Url(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The change feed is not running or failed.
    #[error("change feed: {0}")]
    Feed(String),
}

impl SqlError {
    /// Whether trying again later may help (the database is down).
    pub fn is_transient(&self) -> bool {
        match self {
            SqlError::Database(e) => crate::db::classify(e) == crate::db::ErrorClass::Transient,
            _ => false,
        }
    }
}

/// A database as a Concord system: its mapped tables' changes (captured by triggers into the
/// change log) are its feed, and incoming changes are applied in transactions its triggers skip.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqlSystem {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) mapping: Mapping,
    pub(crate) prefix: String,
    pub(crate) poll: Duration,
    pub(crate) listen_poll: Duration,
    pub(crate) batch: usize,
    pub(crate) retention: Duration,
    /// Names this instance's feed positions: cursors of an earlier run are not this run's.
    pub(crate) run: String,
    pub(crate) state: Mutex<CaptureState>,
    /// Wakes the change feed's reader (a notification, a re-read, a caller waiting).
    pub(crate) wake: Arc<Notify>,
    pub(crate) last_prune: Mutex<Option<Instant>>,
}

/// What the change feed and the applies share.
#[derive(Debug, Default)]
pub(crate) struct CaptureState {
    /// The current feed (each call of `changes` starts a new one).
    pub(crate) epoch: u64,
    /// Whether the current feed's reader runs.
    pub(crate) reader: bool,
    /// Change-log rows read and queued, not yet handed to the SDK.
    pub(crate) in_flight: HashSet<i64>,
    /// Change-log rows handed to the SDK, by feed position, until it confirms them.
    pub(crate) handed: BTreeMap<u64, Vec<i64>>,
    pub(crate) handed_ids: HashSet<i64>,
    pub(crate) next_seq: u64,
    /// Applies so far, and the last one that wrote each row (entity index, local id).
    pub(crate) generation: u64,
    pub(crate) touched: HashMap<(usize, String), u64>,
    /// Items whose values an apply changed after they were read: read again.
    pub(crate) rereads: Vec<Captured>,
    /// The reader left rows unread because the queue was full.
    pub(crate) starved: bool,
    /// Callers waiting for the next read of the change log.
    pub(crate) waiters: Vec<oneshot::Sender<Result<usize, String>>>,
}

impl Inner {
    pub(crate) fn state(&self) -> MutexGuard<'_, CaptureState> {
        // The state is a set of ids and counters: a panic elsewhere leaves it usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An apply wrote these rows (after its commit).
    pub(crate) fn touch(&self, entity: usize, local_ids: &[String]) {
        let mut st = self.state();
        st.generation += 1;
        let g = st.generation;
        for id in local_ids {
            st.touched.insert((entity, id.clone()), g);
        }
    }
}

/// Reads the live schema of the configured tables.
async fn tables(
    db: &Db,
    config: &SqlConfig,
) -> Result<BTreeMap<String, Option<crate::schema::Table>>, sqlx::Error> {
    let mut out = BTreeMap::new();
    for e in config.entities.values() {
        out.insert(e.table.clone(), db.table(&e.table).await?);
    }
    Ok(out)
}

impl SqlSystem {
    /// Connects to the configured database and resolves the mapping of the canonical
    /// `entities` (entity name → message) onto its live tables. Errors name every problem.
    pub async fn connect(
        config: &SqlConfig,
        entities: &BTreeMap<String, MessageDescriptor>,
    ) -> Result<SqlSystem, SqlError> {
        let problems: Vec<Problem> = config
            .validate()
            .into_iter()
            .filter(Problem::is_error)
            .collect();
        if !problems.is_empty() {
            return Err(SqlError::Problems(problems));
        }
        let url = config
            .resolve_url(|v| std::env::var(v).ok())
            .map_err(SqlError::Url)?;
        let db = Db::connect(&url, config.max_connections).await?;
        let live = tables(&db, config).await?;
        let (mapping, problems) = mapping::resolve(config, db.family(), entities, &live, None);
        let Some(mapping) = mapping else {
            db.close().await;
            return Err(SqlError::Problems(
                problems.into_iter().filter(Problem::is_error).collect(),
            ));
        };
        for p in problems {
            warn!("{p}");
        }
        Ok(SqlSystem {
            inner: Arc::new(Inner {
                db,
                mapping,
                prefix: config.prefix.clone(),
                poll: Duration::from_millis(config.poll_ms),
                listen_poll: Duration::from_millis(config.listen_poll_ms),
                batch: config.batch,
                retention: Duration::from_secs(config.applied_retention_hours.saturating_mul(3600)),
                run: uuid::Uuid::now_v7().simple().to_string(),
                state: Mutex::new(CaptureState::default()),
                wake: Arc::new(Notify::new()),
                last_prune: Mutex::new(None),
            }),
        })
    }

    pub fn family(&self) -> Family {
        self.inner.db.family()
    }

    /// The resolved mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.inner.mapping
    }

    /// Creates (idempotently) the change log, the applied-events table and the capture
    /// triggers of every mapped table.
    pub async fn install(&self) -> Result<(), SqlError> {
        Ok(capture::install(&self.inner.db, &self.inner.prefix, &self.inner.mapping).await?)
    }

    /// Removes everything [`SqlSystem::install`] created (the triggers on every table, also
    /// tables no longer mapped, and the adapter's tables and function), and nothing else.
    pub async fn uninstall(&self) -> Result<(), SqlError> {
        Ok(capture::uninstall(&self.inner.db, &self.inner.prefix).await?)
    }

    /// What is missing of the capture (empty: installed).
    pub async fn installed(&self) -> Result<Vec<Problem>, SqlError> {
        Ok(capture::installed(&self.inner.db, &self.inner.prefix, &self.inner.mapping).await?)
    }

    /// Change-log rows not yet confirmed published (they are deleted once the broker confirmed
    /// their changes).
    pub async fn pending_changes(&self) -> Result<i64, SqlError> {
        Ok(capture::pending(&self.inner.db, &self.inner.prefix).await?)
    }

    /// Waits until the change feed has read the change log once more (from a read that started
    /// after this call) and queued what it found; returns how many changes it queued. Fails
    /// when no feed runs. For tests and tools that must know the feed has seen a commit.
    pub async fn caught_up(&self) -> Result<usize, SqlError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.state();
            if !st.reader {
                return Err(SqlError::Feed("no change feed is running".into()));
            }
            st.waiters.push(tx);
        }
        self.inner.wake.notify_one();
        match rx.await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(SqlError::Feed(format!("reading the change log: {e}"))),
            Err(_) => Err(SqlError::Feed("the change feed stopped".into())),
        }
    }

    /// Closes the connections.
    pub async fn close(&self) {
        self.inner.db.close().await;
    }
}

/// Problems of the configuration against the live database and the deployment: the mapping,
/// and whether capture is installed. `visibility` adds warnings about fields the system cannot
/// see or does not store.
pub async fn check(
    config: &SqlConfig,
    entities: &BTreeMap<String, MessageDescriptor>,
    visibility: Option<&dyn Visibility>,
) -> Result<Vec<Problem>, SqlError> {
    let problems = config.validate();
    if problems.iter().any(Problem::is_error) {
        return Ok(problems);
    }
    let url = config
        .resolve_url(|v| std::env::var(v).ok())
        .map_err(SqlError::Url)?;
    let db = Db::connect(&url, 2).await?;
    let live = tables(&db, config).await?;
    let (mapping, mut problems) =
        mapping::resolve(config, db.family(), entities, &live, visibility);
    if let Some(mapping) = &mapping {
        problems.extend(capture::installed(&db, &config.prefix, mapping).await?);
    }
    if let Some(v) = visibility {
        let configured: BTreeSet<&str> = config.entities.keys().map(String::as_str).collect();
        for e in entities.keys() {
            if !configured.contains(e.as_str()) && !v.seen(e).is_empty() {
                problems.push(
                    Problem::warning(
                        "the system sees this entity in the policy, but no table stores it: its changes will be dead-lettered",
                    )
                    .entity(e),
                );
            }
        }
    }
    db.close().await;
    Ok(problems)
}

impl Adapter for SqlSystem {
    type Config = SqlConfig;

    /// A batch is applied in one database transaction: 256 changes per batch took a bulk load
    /// PostgreSQL → MariaDB from about 1,900 to 2,400 rows/s (`concord-bench sql`).
    const PREFETCH: u16 = 256;

    async fn build(config: SqlConfig, context: &Context) -> Result<SqlSystem, AdapterError> {
        let mut delays = concord_adapter::RetryConfig {
            min_delay_ms: 500,
            max_delay_ms: 30_000,
        }
        .delays();
        let system = loop {
            match SqlSystem::connect(&config, &context.entities).await {
                Ok(s) => break s,
                Err(e) if e.is_transient() => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    warn!(system = %context.system, error = %e, ?delay, "the database is not reachable; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(AdapterError::permanent(e)),
            }
        };
        let missing = system.installed().await.map_err(AdapterError::permanent)?;
        if !missing.is_empty() {
            return Err(AdapterError::permanent(format!(
                "change capture is not installed (run `concord-sql install --config ...`):\n{}",
                problem::lines(&missing)
            )));
        }
        Ok(system)
    }
}

impl SystemAdapter for SqlSystem {
    fn changes(
        &self,
        _cursor: Option<String>,
    ) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
        // Every change-log row not confirmed yet is read again, whatever an earlier run handed
        // out: reporting a row twice publishes nothing twice (current values, unchanged).
        capture::feed(self.inner.clone())
    }

    fn snapshot(&self) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
        capture::snapshot(self.inner.clone())
    }

    async fn apply(&self, change: &Apply) -> Result<Applied, AdapterError> {
        crate::apply::apply(&self.inner, change).await
    }

    /// The changes the runner holds, in one database transaction (see [`crate::apply`]).
    async fn apply_batch(&self, changes: &[Apply]) -> Vec<Result<Applied, AdapterError>> {
        crate::apply::apply_batch(&self.inner, changes).await
    }

    async fn published(&self, cursor: &str) -> Result<(), AdapterError> {
        capture::published(&self.inner, cursor).await
    }

    fn echoes(&self) -> Echoes {
        Echoes::NotReported
    }

    async fn check(&self) -> Result<(), AdapterError> {
        self.inner.db.ping().await.map_err(AdapterError::transient)
    }
}
