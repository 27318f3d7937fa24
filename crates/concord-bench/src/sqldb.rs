//! The databases of `concord-bench sql`: each created fresh under a unique name (a SQLite file
//! in a temporary directory), used with plain SQL as the systems' own applications would, and
//! dropped at the end.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection as _, Executor as _, Row as _};

/// A database family the benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Postgres,
    MariaDb,
    Sqlite,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Postgres => "postgres",
            Family::MariaDb => "mariadb",
            Family::Sqlite => "sqlite",
        }
    }

    /// The benchmark's table: a generated key and the four mapped columns (`ref` indexed, for
    /// the observer's queries).
    pub fn create_table(self) -> &'static str {
        match self {
            Family::Postgres => {
                "CREATE TABLE items (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                 ref BIGINT NOT NULL, seq BIGINT NOT NULL, name TEXT, note TEXT); \
                 CREATE INDEX items_ref ON items (ref)"
            }
            Family::MariaDb => {
                "CREATE TABLE items (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
                 ref BIGINT NOT NULL, seq BIGINT NOT NULL, name VARCHAR(200), note TEXT, \
                 KEY items_ref (ref))"
            }
            Family::Sqlite => {
                "CREATE TABLE items (id INTEGER PRIMARY KEY, \
                 ref INTEGER NOT NULL, seq INTEGER NOT NULL, name TEXT, note TEXT); \
                 CREATE INDEX items_ref ON items (ref)"
            }
        }
    }
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
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

#[derive(Debug, Clone)]
enum Pool {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
    Lite(sqlx::SqlitePool),
}

/// How the database goes away at the end.
#[derive(Debug)]
enum Owner {
    /// `DROP DATABASE name` through the server's administrative URL.
    Server { admin: String, name: String },
    /// The temporary directory holding the SQLite file.
    Dir(tempfile::TempDir),
}

/// A fresh database of the benchmark; [`BenchDb::drop_database`] removes it.
#[derive(Debug)]
pub struct BenchDb {
    pub family: Family,
    /// The URL the adapter connects with.
    pub url: String,
    pool: Pool,
    owner: Owner,
}

/// A handle on the same database for another task (the observer).
#[derive(Debug, Clone)]
pub struct DbHandle {
    pool: Pool,
}

const POOL: u32 = 4;

impl BenchDb {
    /// Creates database `name` on the server of `admin` (PostgreSQL or MariaDB), or a SQLite
    /// file in a temporary directory.
    pub async fn create(family: Family, admin: &str, name: &str) -> anyhow::Result<BenchDb> {
        match family {
            Family::Postgres => {
                let mut c = sqlx::PgConnection::connect(admin)
                    .await
                    .with_context(|| format!("connecting to PostgreSQL at {admin}"))?;
                c.execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .with_context(|| format!("creating PostgreSQL database {name}"))?;
                let _ = c.close().await;
                let (url, owner, pool) = server_pool(family, admin, name).await?;
                Ok(BenchDb {
                    family,
                    url,
                    pool: Pool::Pg(pool),
                    owner,
                })
            }
            Family::MariaDb => {
                let mut c = sqlx::MySqlConnection::connect(admin)
                    .await
                    .with_context(|| format!("connecting to MariaDB at {admin}"))?;
                c.execute(
                    format!(
                        "CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                    )
                    .as_str(),
                )
                .await
                .with_context(|| format!("creating MariaDB database {name}"))?;
                let _ = c.close().await;
                let (url, owner, pool) = server_pool(family, admin, name).await?;
                Ok(BenchDb {
                    family,
                    url,
                    pool: Pool::My(pool),
                    owner,
                })
            }
            Family::Sqlite => {
                let dir = tempfile::tempdir().context("creating a temporary directory")?;
                let path = dir.path().join(format!("{name}.sqlite"));
                let url = format!("sqlite://{}", path.display());
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                    .with_context(|| format!("the SQLite URL {url}"))?
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(30));
                let pool = sqlx::pool::PoolOptions::new()
                    .max_connections(POOL)
                    .connect_with(options)
                    .await
                    .with_context(|| format!("opening {url}"))?;
                Ok(BenchDb {
                    family,
                    url,
                    pool: Pool::Lite(pool),
                    owner: Owner::Dir(dir),
                })
            }
        }
    }

    pub fn handle(&self) -> DbHandle {
        DbHandle {
            pool: self.pool.clone(),
        }
    }

    /// Closes the connections and drops the database (deletes the SQLite file). Errors are
    /// reported on stderr: the run's figures are still good.
    pub async fn drop_database(self) {
        match &self.pool {
            Pool::Pg(p) => p.close().await,
            Pool::My(p) => p.close().await,
            Pool::Lite(p) => p.close().await,
        }
        match self.owner {
            owner @ Owner::Server { .. } => drop_server_db(self.family, &owner).await,
            Owner::Dir(dir) => {
                if let Err(e) = dir.close() {
                    eprintln!("cleanup: cannot remove the SQLite directory: {e}");
                }
            }
        }
    }
}

/// A pool on the database `name` just created on the server of `admin` (dropped again when
/// no connection can be had).
async fn server_pool<DB: sqlx::Database>(
    family: Family,
    admin: &str,
    name: &str,
) -> anyhow::Result<(String, Owner, sqlx::Pool<DB>)> {
    let url = with_database(admin, name);
    let owner = Owner::Server {
        admin: admin.to_owned(),
        name: name.to_owned(),
    };
    match sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(POOL)
        .connect(&url)
        .await
    {
        Ok(pool) => Ok((url, owner, pool)),
        Err(e) => {
            drop_server_db(family, &owner).await;
            Err(e).with_context(|| format!("connecting to {url}"))
        }
    }
}

async fn drop_server_db(family: Family, owner: &Owner) {
    let Owner::Server { admin, name } = owner else {
        return;
    };
    let result = match family {
        Family::Postgres => match sqlx::PgConnection::connect(admin).await {
            Ok(mut c) => {
                let r = c
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
                let _ = c.close().await;
                r.map(drop)
            }
            Err(e) => Err(e),
        },
        Family::MariaDb => match sqlx::MySqlConnection::connect(admin).await {
            Ok(mut c) => {
                let r = c
                    .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                    .await;
                let _ = c.close().await;
                r.map(drop)
            }
            Err(e) => Err(e),
        },
        Family::Sqlite => Ok(()),
    };
    if let Err(e) = result {
        eprintln!("cleanup: cannot drop database {name}: {e}");
    }
}

impl DbHandle {
    /// Runs SQL (one or more statements) in autocommit mode.
    pub async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        match &self.pool {
            Pool::Pg(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Pool::My(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Pool::Lite(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        }
        .with_context(|| abbreviated(sql))
    }

    /// Runs `statements` in one transaction.
    pub async fn transaction(&self, statements: &[String]) -> anyhow::Result<()> {
        macro_rules! tx {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.context("BEGIN")?;
                for s in statements {
                    sqlx::raw_sql(s)
                        .execute(&mut *tx)
                        .await
                        .with_context(|| abbreviated(s))?;
                }
                tx.commit().await.context("COMMIT")?;
            }};
        }
        match &self.pool {
            Pool::Pg(p) => tx!(p),
            Pool::My(p) => tx!(p),
            Pool::Lite(p) => tx!(p),
        }
        Ok(())
    }

    /// The rows of a query whose columns are all integers.
    pub async fn ints(&self, sql: &str) -> anyhow::Result<Vec<Vec<i64>>> {
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(sql)
                    .fetch_all($pool)
                    .await
                    .with_context(|| abbreviated(sql))?;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.try_get::<i64, _>(i))
                            .collect::<Result<Vec<i64>, _>>()
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("{}: not integers", abbreviated(sql)))?
            }};
        }
        Ok(match &self.pool {
            Pool::Pg(p) => fetch!(p),
            Pool::My(p) => fetch!(p),
            Pool::Lite(p) => fetch!(p),
        })
    }

    /// The single integer of a query (`COUNT(*)`).
    pub async fn int(&self, sql: &str) -> anyhow::Result<i64> {
        self.ints(sql)
            .await?
            .first()
            .and_then(|r| r.first().copied())
            .with_context(|| format!("{} returned no value", abbreviated(sql)))
    }
}

fn abbreviated(sql: &str) -> String {
    if sql.len() <= 120 {
        return sql.to_owned();
    }
    let mut end = 120;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &sql[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306", "b"),
            "mysql://root@127.0.0.1:3306/b"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "b"),
            "postgres://u@h/b?sslmode=disable"
        );
    }

    #[test]
    fn long_statements_are_abbreviated_in_errors() {
        assert_eq!(abbreviated("SELECT 1"), "SELECT 1");
        let long = "x".repeat(500);
        assert_eq!(abbreviated(&long).len(), 123);
    }
}
