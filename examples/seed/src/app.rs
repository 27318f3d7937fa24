//! The systems' own applications: plain SQL on their databases (their own connections, never
//! the adapter's), and the databases the demo creates for them on a server and drops again.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context as _;
use concord_sql::config::Family;
use sqlx::{Connection, Executor, Row};

/// A database the demo created on a PostgreSQL or MariaDB server: dropped (connections
/// forced out) with this guard, unless kept.
#[derive(Debug)]
pub struct ServerDb {
    pub family: Family,
    /// The URL of the created database.
    pub url: String,
    pub name: String,
    admin: String,
    pub keep: bool,
}

impl ServerDb {
    /// Creates database `name` on the server of `admin` (a URL of any database there).
    pub async fn create(admin: &str, name: &str) -> anyhow::Result<ServerDb> {
        let family = Family::of(admin).context("not a database URL")?;
        match family {
            Family::Postgres => {
                let mut c = sqlx::PgConnection::connect(admin)
                    .await
                    .context("connecting to PostgreSQL")?;
                c.execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .with_context(|| format!("creating database {name}"))?;
                c.close().await?;
            }
            Family::MySql => {
                let mut c = sqlx::MySqlConnection::connect(admin)
                    .await
                    .context("connecting to MariaDB")?;
                c.execute(
                    format!(
                        "CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                    )
                    .as_str(),
                )
                .await
                .with_context(|| format!("creating database {name}"))?;
                c.close().await?;
            }
            Family::Sqlite => anyhow::bail!("SQLite has no server"),
        }
        Ok(ServerDb {
            family,
            url: crate::systems::with_database(admin, name),
            name: name.to_owned(),
            admin: admin.to_owned(),
            keep: false,
        })
    }

    async fn drop_database(family: Family, admin: &str, name: &str) -> anyhow::Result<()> {
        match family {
            Family::Postgres => {
                let mut c = sqlx::PgConnection::connect(admin).await?;
                c.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await?;
                c.close().await?;
            }
            Family::MySql => {
                let mut c = sqlx::MySqlConnection::connect(admin).await?;
                c.execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                    .await?;
                c.close().await?;
            }
            Family::Sqlite => {}
        }
        Ok(())
    }
}

impl Drop for ServerDb {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let (family, admin, name) = (self.family, self.admin.clone(), self.name.clone());
        // Dropped from async code: run the DROP on a runtime of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(ServerDb::drop_database(family, &admin, &name))
                .with_context(|| format!("dropping database {name}"))
        });
        match done.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: {e:#}"),
            Err(_) => eprintln!("warning: dropping database {} failed", self.name),
        }
    }
}

/// A SQLite database file, created (in WAL mode) when missing.
pub async fn create_sqlite(path: &Path) -> anyhow::Result<String> {
    let url = format!("sqlite://{}", path.display());
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?.create_if_missing(true);
    let mut c = sqlx::SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    c.execute("PRAGMA journal_mode = WAL").await?;
    c.close().await?;
    Ok(url)
}

/// One system's application: a connection to its database, as its own code would have.
#[derive(Debug)]
pub enum App {
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
    Sqlite(sqlx::SqlitePool),
}

/// One connection: the application's.
fn pool<D: sqlx::Database>() -> sqlx::pool::PoolOptions<D> {
    sqlx::pool::PoolOptions::new().max_connections(1)
}

impl App {
    pub async fn connect(url: &str) -> anyhow::Result<App> {
        let family = Family::of(url).context("not a database URL")?;
        Ok(match family {
            Family::Postgres => App::Postgres(pool().connect(url).await?),
            Family::MySql => App::MySql(pool().connect(url).await?),
            Family::Sqlite => App::Sqlite(pool().connect(url).await?),
        })
    }

    /// Runs statements (a script: several separated by `;` are fine).
    pub async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        match self {
            App::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            App::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            App::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        }
        .with_context(|| sql.trim().to_owned())
    }

    /// The rows of a query whose columns are all text, NULL as `None`.
    pub async fn text_rows(&self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        fn text<R: Row>(r: &R) -> Result<Vec<Option<String>>, sqlx::Error>
        where
            for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            (0..r.len())
                .map(|i| r.try_get::<Option<String>, _>(i))
                .collect()
        }
        let rows: Result<Vec<_>, sqlx::Error> = match self {
            App::Postgres(p) => sqlx::query(sql)
                .fetch_all(p)
                .await?
                .iter()
                .map(text)
                .collect(),
            App::MySql(p) => sqlx::query(sql)
                .fetch_all(p)
                .await?
                .iter()
                .map(text)
                .collect(),
            App::Sqlite(p) => sqlx::query(sql)
                .fetch_all(p)
                .await?
                .iter()
                .map(text)
                .collect(),
        };
        rows.with_context(|| sql.to_owned())
    }

    pub async fn close(&self) {
        match self {
            App::Postgres(p) => p.close().await,
            App::MySql(p) => p.close().await,
            App::Sqlite(p) => p.close().await,
        }
    }
}
