//! Test harness: a database of its own per test on the shared PostgreSQL and MariaDB servers
//! (or a SQLite file), dropped at the end even when the test fails; the seed deployment; and
//! waiting until every SQL adapter on a test bus has nothing left to do.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};
use concord_adapter::testkit::TestBus;
use concord_sql::config::Family;
use concord_sql::{SqlConfig, SqlSystem};
use prost_reflect::MessageDescriptor;
use sqlx::{Connection, Executor, Row};

/// The PostgreSQL server (`CONCORD_TEST_POSTGRES`): a URL of a database the tests may connect
/// to, to create their own.
pub fn postgres_admin() -> String {
    std::env::var("CONCORD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The MariaDB/MySQL server (`CONCORD_TEST_MARIADB`).
pub fn mariadb_admin() -> String {
    std::env::var("CONCORD_TEST_MARIADB")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A database name no other test (or run) uses.
fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "concord_t_{tag}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > base.find("//").map_or(0, |j| j + 1) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A test's own database; dropped when this guard is.
#[derive(Debug)]
pub struct TestDb {
    pub family: Family,
    pub url: String,
    name: String,
    admin: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(family: Family, tag: &str) -> anyhow::Result<TestDb> {
        match family {
            Family::Postgres => TestDb::postgres(tag).await,
            Family::MySql => TestDb::mariadb(tag).await,
            Family::Sqlite => TestDb::sqlite(tag).await,
        }
    }

    pub async fn postgres(tag: &str) -> anyhow::Result<TestDb> {
        let admin = postgres_admin();
        let name = unique(tag);
        let mut c = sqlx::PgConnection::connect(&admin)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {admin} (scripts/services)"))?;
        c.execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        c.close().await?;
        Ok(TestDb {
            family: Family::Postgres,
            url: with_database(&admin, &name),
            name,
            admin,
            _dir: None,
        })
    }

    pub async fn mariadb(tag: &str) -> anyhow::Result<TestDb> {
        let admin = mariadb_admin();
        let name = unique(tag);
        let mut c = sqlx::MySqlConnection::connect(&admin)
            .await
            .with_context(|| format!("connecting to MariaDB at {admin} (scripts/services)"))?;
        c.execute(
            format!("CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
                .as_str(),
        )
        .await?;
        c.close().await?;
        Ok(TestDb {
            family: Family::MySql,
            url: with_database(&admin, &name),
            name,
            admin,
            _dir: None,
        })
    }

    pub async fn sqlite(tag: &str) -> anyhow::Result<TestDb> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(format!("{tag}.sqlite"));
        let url = format!("sqlite://{}", path.display());
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?.create_if_missing(true);
        let mut c = sqlx::SqliteConnection::connect_with(&options).await?;
        c.execute("PRAGMA journal_mode = WAL").await?;
        c.close().await?;
        Ok(TestDb {
            family: Family::Sqlite,
            url,
            name: String::new(),
            admin: String::new(),
            _dir: Some(dir),
        })
    }

    /// Runs SQL as the system's own application would (its own connection, no marker).
    pub async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        match self.family {
            Family::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await?;
                sqlx::raw_sql(sql)
                    .execute(&mut c)
                    .await
                    .with_context(|| sql.to_owned())?;
                c.close().await?;
            }
            Family::MySql => {
                let mut c = sqlx::MySqlConnection::connect(&self.url).await?;
                sqlx::raw_sql(sql)
                    .execute(&mut c)
                    .await
                    .with_context(|| sql.to_owned())?;
                c.close().await?;
            }
            Family::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await?;
                sqlx::raw_sql(sql)
                    .execute(&mut c)
                    .await
                    .with_context(|| sql.to_owned())?;
                c.close().await?;
            }
        }
        Ok(())
    }

    /// The rows of a query whose columns are all text (cast them in the query), NULL as `None`.
    pub async fn rows(&self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        fn text<R: Row>(r: &R) -> Vec<Option<String>>
        where
            for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            (0..r.len())
                .map(|i| r.try_get::<Option<String>, _>(i).unwrap())
                .collect()
        }
        Ok(match self.family {
            Family::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await?;
                let rows = sqlx::query(sql)
                    .fetch_all(&mut c)
                    .await
                    .with_context(|| sql.to_owned())?;
                c.close().await?;
                rows.iter().map(text).collect()
            }
            Family::MySql => {
                let mut c = sqlx::MySqlConnection::connect(&self.url).await?;
                let rows = sqlx::query(sql)
                    .fetch_all(&mut c)
                    .await
                    .with_context(|| sql.to_owned())?;
                c.close().await?;
                rows.iter().map(text).collect()
            }
            Family::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await?;
                let rows = sqlx::query(sql)
                    .fetch_all(&mut c)
                    .await
                    .with_context(|| sql.to_owned())?;
                c.close().await?;
                rows.iter().map(text).collect()
            }
        })
    }

    /// The single text value of a query (`None`: NULL or no row).
    pub async fn value(&self, sql: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .rows(sql)
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// The type to cast to text in this database's SQL.
    pub fn text_type(&self) -> &'static str {
        match self.family {
            Family::MySql => "CHAR",
            _ => "TEXT",
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.family == Family::Sqlite {
            return;
        }
        let (family, admin, name) = (self.family, self.admin.clone(), self.name.clone());
        // Dropped from async tests: run the DROP on a runtime of its own.
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                match family {
                    Family::Postgres => {
                        if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                            let _ = c
                                .execute(
                                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                                )
                                .await;
                        }
                    }
                    Family::MySql => {
                        if let Ok(mut c) = sqlx::MySqlConnection::connect(&admin).await {
                            let _ = c
                                .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                                .await;
                        }
                    }
                    Family::Sqlite => {}
                }
            });
        });
        let _ = done.join();
    }
}

/// The seed deployment (`examples/seed`): the policy and the entities of its schema.
pub fn seed() -> (concord_policy::Policy, BTreeMap<String, MessageDescriptor>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed/policy.toml");
    let d = concord_schema::Deployment::load(&path).unwrap();
    let entities = d
        .policy
        .entities()
        .iter()
        .map(|e| (e.name.clone(), e.message.clone()))
        .collect();
    (d.policy, entities)
}

/// The path of the seed policy.
pub fn seed_policy_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed/policy.toml")
}

/// An adapter `[adapter]` table (TOML) for `db`, with its entities' text.
pub fn config(db: &TestDb, entities: &str) -> SqlConfig {
    let text = format!(
        "url = {:?}\npoll_ms = 20\nlisten_poll_ms = 200\n{entities}",
        db.url
    );
    toml::from_str(&text).unwrap()
}

/// Connects and installs an adapter for `db`.
pub async fn adapter(
    db: &TestDb,
    entities_toml: &str,
    entities: &BTreeMap<String, MessageDescriptor>,
) -> anyhow::Result<SqlSystem> {
    let s = SqlSystem::connect(&config(db, entities_toml), entities).await?;
    s.install().await?;
    Ok(s)
}

/// Runs the bus until every SQL adapter's change log is read, published and confirmed, and
/// nothing moves any more.
pub async fn settle(bus: &mut TestBus, systems: &[&SqlSystem]) -> anyhow::Result<()> {
    for _ in 0..500 {
        let mut queued = 0;
        for s in systems {
            queued += s.caught_up().await?;
        }
        let quiet = bus.run_until_quiet().await?;
        let mut pending = 0;
        for s in systems {
            pending += s.pending_changes().await?;
        }
        if queued == 0 && quiet.messages == 0 && pending == 0 {
            return Ok(());
        }
    }
    bail!("the bus did not settle")
}
