//! The database: one pool of PostgreSQL, MariaDB/MySQL or SQLite connections, statements
//! ([`Stmt`]) bound and run the way each driver wants, rows decoded into [`SqlValue`]s, the live
//! schema read, and errors classified (worth retrying or not).

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, Postgres};
use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Connection, Database, Executor, Pool, Row, Transaction, TypeInfo, ValueRef};
use time::{Date, OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::config::Family;
use crate::convert::SqlValue;
use crate::dialect::{Bind, Dialect, Stmt};
use crate::key::KeyPart;
use crate::schema::{self, ColumnKind, Table};

/// How long a statement may wait for a free connection (a database that does not answer makes
/// calls fail after this, and `/readyz` reports it).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection pool to the system's database.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(Pool<Postgres>),
    MySql(Pool<MySql>, Dialect),
    Sqlite(Pool<Sqlite>),
}

/// How a result column is decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A column value, decoded as its kind wants.
    Value(ColumnKind),
    /// A 64-bit integer.
    Int,
    /// Text.
    Text,
}

/// A decoded row: one cell per column, each decoded or not (why).
pub type Cells = Vec<Result<SqlValue, String>>;

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database is down, busy, read-only, timed out, a lock conflicted, or its schema does
    /// not match (an operator fixes it): retry.
    Transient,
    /// The database refuses this change for good (a constraint, a value out of range).
    Permanent,
}

/// The class of a database error (see [`ErrorClass`]).
pub fn classify(e: &sqlx::Error) -> ErrorClass {
    let sqlx::Error::Database(db) = e else {
        return match e {
            sqlx::Error::Encode(_) => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        };
    };
    use sqlx::error::ErrorKind;
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) {
        return ErrorClass::Permanent;
    }
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        // Data too long, out of range, incorrect value, truncated, constraint failed.
        return match my.number() {
            1048 | 1062 | 1264 | 1265 | 1292 | 1366 | 1406 | 1451 | 1452 | 1690 | 3819 | 4025 => {
                ErrorClass::Permanent
            }
            _ if code.starts_with("22") || code.starts_with("23") => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        };
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Extended result codes: the primary code is the low byte. 18 TOOBIG, 19 CONSTRAINT,
        // 20 MISMATCH; BUSY, LOCKED, READONLY, IOERR, FULL... are worth retrying.
        let primary = code.parse::<i64>().map(|c| c & 0xff).unwrap_or(0);
        return if matches!(primary, 18..=20) {
            ErrorClass::Permanent
        } else {
            ErrorClass::Transient
        };
    }
    // PostgreSQL SQLSTATE: class 22 data exception, 23 integrity constraint violation.
    if code.starts_with("22") || code.starts_with("23") {
        ErrorClass::Permanent
    } else {
        ErrorClass::Transient
    }
}

impl Db {
    /// Connects to the database at `url` (`max` connections at most).
    pub async fn connect(url: &str, max: u32) -> Result<Db, sqlx::Error> {
        match Family::of(url) {
            Some(Family::Postgres) => {
                let options = PgConnectOptions::from_str(url)?;
                let pool = PgPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?;
                Ok(Db::Postgres(pool))
            }
            Some(Family::MySql) => {
                let url = match url.strip_prefix("mariadb:") {
                    Some(rest) => format!("mysql:{rest}"),
                    None => url.to_owned(),
                };
                let options = MySqlConnectOptions::from_str(&url)?;
                let pool = MySqlPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // Refuse what does not fit instead of truncating it.
                            conn.execute(
                                "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'STRICT_ALL_TABLES')",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await?;
                let version: String = sqlx::query_scalar("SELECT VERSION()")
                    .fetch_one(&pool)
                    .await?;
                Ok(Db::MySql(
                    pool,
                    Dialect::MySql {
                        mariadb: version.to_ascii_lowercase().contains("mariadb"),
                        returning: mariadb_returning(&version),
                    },
                ))
            }
            Some(Family::Sqlite) => {
                let options =
                    SqliteConnectOptions::from_str(url)?.busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?;
                Ok(Db::Sqlite(pool))
            }
            None => Err(sqlx::Error::Configuration(
                format!("unsupported database URL scheme in {url:?}").into(),
            )),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Postgres(_) => Dialect::Postgres,
            Db::MySql(_, d) => *d,
            Db::Sqlite(_) => Dialect::Sqlite,
        }
    }

    pub fn family(&self) -> Family {
        match self {
            Db::Postgres(_) => Family::Postgres,
            Db::MySql(..) => Family::MySql,
            Db::Sqlite(_) => Family::Sqlite,
        }
    }

    pub async fn close(&self) {
        match self {
            Db::Postgres(p) => p.close().await,
            Db::MySql(p, _) => p.close().await,
            Db::Sqlite(p) => p.close().await,
        }
    }

    /// A connection of the pool.
    pub async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        Ok(match self {
            Db::Postgres(p) => Conn::Postgres(p.acquire().await?),
            Db::MySql(p, _) => Conn::MySql(p.acquire().await?),
            Db::Sqlite(p) => Conn::Sqlite(p.acquire().await?),
        })
    }

    /// Runs `stmt` on a connection of the pool; returns the rows affected.
    pub async fn execute(&self, stmt: &Stmt) -> Result<u64, sqlx::Error> {
        self.acquire().await?.execute(stmt).await
    }

    /// Runs query `stmt` on a connection of the pool.
    pub async fn fetch(&self, stmt: &Stmt, shape: &[Shape]) -> Result<Vec<Cells>, sqlx::Error> {
        self.acquire().await?.fetch(stmt, shape).await
    }

    /// Runs statements that take no parameters (DDL), one after the other, in one transaction
    /// where the database has transactional DDL (PostgreSQL, SQLite).
    pub async fn run_script(&self, statements: &[String]) -> Result<(), sqlx::Error> {
        let mut conn = self.acquire().await?;
        if matches!(self, Db::MySql(..)) {
            for s in statements {
                conn.raw(s).await?;
            }
            return Ok(());
        }
        let mut tx = conn.begin().await?;
        for s in statements {
            tx.raw(s).await?;
        }
        tx.commit().await
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.acquire().await?.simple("SELECT 1").await
    }

    /// The live schema of `table` (`None`: no such table).
    pub async fn table(&self, table: &str) -> Result<Option<Table>, sqlx::Error> {
        let columns = match self {
            Db::Postgres(pool) => {
                let rows = sqlx::query(
                    "SELECT c.column_name::text, c.data_type::text, c.udt_name::text, c.is_nullable::text = 'YES', c.column_default::text, c.is_identity::text = 'YES', c.numeric_scale::int8, \
                     COALESCE((SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid WHERE t.typname = c.udt_name), ARRAY[]::text[]) \
                     FROM information_schema.columns c WHERE c.table_schema = current_schema() AND c.table_name = $1 ORDER BY c.ordinal_position",
                )
                .bind(table)
                .fetch_all(pool)
                .await?;
                let mut out = Vec::new();
                for r in rows {
                    out.push(schema::pg_column(schema::PgColumnRow {
                        name: r.try_get(0)?,
                        data_type: r.try_get(1)?,
                        udt_name: r.try_get(2)?,
                        nullable: r.try_get(3)?,
                        default: r.try_get(4)?,
                        identity: r.try_get(5)?,
                        numeric_scale: r.try_get(6)?,
                        enum_labels: r.try_get(7)?,
                    }));
                }
                out
            }
            Db::MySql(pool, _) => {
                let rows = sqlx::query(
                    "SELECT CAST(c.COLUMN_NAME AS CHAR), CAST(c.DATA_TYPE AS CHAR), CAST(c.COLUMN_TYPE AS CHAR), c.IS_NULLABLE = 'YES', CAST(c.COLUMN_DEFAULT AS CHAR), CAST(c.EXTRA AS CHAR), CAST(c.NUMERIC_SCALE AS SIGNED), \
                     EXISTS (SELECT 1 FROM information_schema.CHECK_CONSTRAINTS k WHERE k.CONSTRAINT_SCHEMA = c.TABLE_SCHEMA AND k.TABLE_NAME = c.TABLE_NAME AND k.CHECK_CLAUSE LIKE CONCAT('%json_valid(`', c.COLUMN_NAME, '`)%')) \
                     FROM information_schema.COLUMNS c WHERE c.TABLE_SCHEMA = DATABASE() AND c.TABLE_NAME = ? ORDER BY c.ORDINAL_POSITION",
                )
                .bind(table)
                .fetch_all(pool)
                .await?;
                let mut out = Vec::new();
                for r in rows {
                    out.push(schema::mysql_column(schema::MySqlColumnRow {
                        name: r.try_get(0)?,
                        data_type: r.try_get(1)?,
                        column_type: r.try_get(2)?,
                        nullable: r.try_get::<i64, _>(3)? != 0,
                        default: r.try_get(4)?,
                        extra: r.try_get::<Option<String>, _>(5)?.unwrap_or_default(),
                        numeric_scale: r.try_get(6)?,
                        json_check: r.try_get::<i64, _>(7)? != 0,
                    }));
                }
                out
            }
            Db::Sqlite(pool) => {
                let rows = sqlx::query(
                    "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?) ORDER BY cid",
                )
                .bind(table)
                .fetch_all(pool)
                .await?;
                let mut raw = Vec::new();
                for r in rows {
                    raw.push(schema::SqliteColumnRow {
                        name: r.try_get(0)?,
                        declared: r.try_get(1)?,
                        not_null: r.try_get::<i64, _>(2)? != 0,
                        default: r.try_get(3)?,
                        pk: r.try_get(4)?,
                    });
                }
                schema::sqlite_columns(raw)
            }
        };
        Ok((!columns.is_empty()).then(|| Table {
            name: table.to_owned(),
            columns,
        }))
    }
}

/// Whether a MariaDB/MySQL `VERSION()` has `INSERT ... RETURNING` (MariaDB 10.5 and later).
pub fn mariadb_returning(version: &str) -> bool {
    if !version.to_ascii_lowercase().contains("mariadb") {
        return false;
    }
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (10, 5)
}

/// A connection taken from the pool.
#[derive(Debug)]
pub enum Conn {
    Postgres(PoolConnection<Postgres>),
    MySql(PoolConnection<MySql>),
    Sqlite(PoolConnection<Sqlite>),
}

/// A transaction on a [`Conn`]; dropped without a commit, it rolls back.
#[derive(Debug)]
pub enum Tx<'c> {
    Postgres(Transaction<'c, Postgres>),
    MySql(Transaction<'c, MySql>),
    Sqlite(Transaction<'c, Sqlite>),
}

macro_rules! each {
    ($e:expr, $x:ident => $body:expr) => {
        match $e {
            Conn::Postgres($x) => {
                #[allow(dead_code)]
                type DbT = Postgres;
                $body
            }
            Conn::MySql($x) => {
                #[allow(dead_code)]
                type DbT = MySql;
                $body
            }
            Conn::Sqlite($x) => {
                #[allow(dead_code)]
                type DbT = Sqlite;
                $body
            }
        }
    };
}

macro_rules! each_tx {
    ($e:expr, $x:ident => $body:expr) => {
        match $e {
            Tx::Postgres($x) => {
                #[allow(dead_code)]
                type DbT = Postgres;
                $body
            }
            Tx::MySql($x) => {
                #[allow(dead_code)]
                type DbT = MySql;
                $body
            }
            Tx::Sqlite($x) => {
                #[allow(dead_code)]
                type DbT = Sqlite;
                $body
            }
        }
    };
}

impl Conn {
    pub async fn begin(&mut self) -> Result<Tx<'_>, sqlx::Error> {
        Ok(match self {
            Conn::Postgres(c) => Tx::Postgres(c.begin().await?),
            Conn::MySql(c) => Tx::MySql(c.begin().await?),
            // Take the write lock at once: a deferred transaction that reads first and writes
            // later can fail to upgrade its lock when another connection writes.
            Conn::Sqlite(c) => {
                Tx::Sqlite(Connection::begin_with(&mut **c, "BEGIN IMMEDIATE").await?)
            }
        })
    }

    pub async fn execute(&mut self, stmt: &Stmt) -> Result<u64, sqlx::Error> {
        Ok(each!(self, c => query(stmt).execute(&mut **c).await?.rows_affected()))
    }

    pub async fn fetch(&mut self, stmt: &Stmt, shape: &[Shape]) -> Result<Vec<Cells>, sqlx::Error> {
        each!(self, c => {
            let rows = query(stmt).fetch_all(&mut **c).await?;
            Ok(decode_rows::<DbT>(&rows, shape))
        })
    }

    /// Runs a statement without parameters, as a prepared statement.
    pub async fn simple(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let stmt = Stmt {
            sql: sql.to_owned(),
            binds: Vec::new(),
        };
        self.execute(&stmt).await.map(drop)
    }

    /// Runs a statement without parameters, as text (DDL).
    pub async fn raw(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        each!(self, c => sqlx::raw_sql(sql).execute(&mut **c).await.map(drop))
    }

    /// Closes the connection instead of returning it to the pool (its session state is unknown).
    pub fn discard(self) {
        match self {
            Conn::Postgres(mut c) => c.close_on_drop(),
            Conn::MySql(mut c) => c.close_on_drop(),
            Conn::Sqlite(mut c) => c.close_on_drop(),
        }
    }
}

impl Tx<'_> {
    pub async fn execute(&mut self, stmt: &Stmt) -> Result<u64, sqlx::Error> {
        Ok(each_tx!(self, t => query(stmt).execute(&mut **t).await?.rows_affected()))
    }

    pub async fn fetch(&mut self, stmt: &Stmt, shape: &[Shape]) -> Result<Vec<Cells>, sqlx::Error> {
        each_tx!(self, t => {
            let rows = query(stmt).fetch_all(&mut **t).await?;
            Ok(decode_rows::<DbT>(&rows, shape))
        })
    }

    /// Runs a statement without parameters, as a prepared statement.
    pub async fn simple(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let stmt = Stmt {
            sql: sql.to_owned(),
            binds: Vec::new(),
        };
        self.execute(&stmt).await.map(drop)
    }

    /// Runs a statement without parameters, as text (DDL).
    pub async fn raw(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        each_tx!(self, t => sqlx::raw_sql(sql).execute(&mut **t).await.map(drop))
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        each_tx!(self, t => t.commit().await)
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        each_tx!(self, t => t.rollback().await)
    }

    /// MySQL: the id the last insert generated on this connection.
    pub async fn last_insert_id(&mut self) -> Result<i64, sqlx::Error> {
        let stmt = Stmt {
            sql: "SELECT CAST(LAST_INSERT_ID() AS SIGNED)".into(),
            binds: Vec::new(),
        };
        let rows = self.fetch(&stmt, &[Shape::Int]).await?;
        match rows.first().and_then(|r| r.first()) {
            Some(Ok(SqlValue::Int(i))) => Ok(*i),
            _ => Err(sqlx::Error::Protocol(
                "LAST_INSERT_ID() returned no id".into(),
            )),
        }
    }
}

/// A driver: how values are bound and decoded.
trait Backend: Database {
    fn bind<'q>(
        q: Query<'q, Self, <Self as Database>::Arguments<'q>>,
        b: &Bind,
    ) -> Query<'q, Self, <Self as Database>::Arguments<'q>>;

    fn cell(row: &Self::Row, i: usize, shape: &Shape) -> Result<SqlValue, String>;
}

fn query<'q, DB: Backend>(stmt: &'q Stmt) -> Query<'q, DB, <DB as Database>::Arguments<'q>> {
    let mut q = sqlx::query::<DB>(&stmt.sql);
    for b in &stmt.binds {
        q = DB::bind(q, b);
    }
    q
}

fn decode_rows<DB: Backend>(rows: &[DB::Row], shape: &[Shape]) -> Vec<Cells> {
    rows.iter()
        .map(|r| {
            shape
                .iter()
                .enumerate()
                .map(|(i, s)| DB::cell(r, i, s))
                .collect()
        })
        .collect()
}

/// Decodes column `i` of `row` as `T` (NULL: `None`).
fn get<'r, DB, T>(row: &'r DB::Row, i: usize) -> Result<Option<T>, String>
where
    DB: Database,
    T: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    row.try_get::<Option<T>, _>(i).map_err(|e| e.to_string())
}

fn or_null<T>(v: Option<T>, f: impl FnOnce(T) -> SqlValue) -> SqlValue {
    v.map_or(SqlValue::Null, f)
}

fn utc(t: OffsetDateTime) -> PrimitiveDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    PrimitiveDateTime::new(t.date(), t.time())
}

fn key_bind<'q, DB>(
    q: Query<'q, DB, <DB as Database>::Arguments<'q>>,
    k: &KeyPart,
) -> Query<'q, DB, <DB as Database>::Arguments<'q>>
where
    DB: Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    match k {
        KeyPart::Int(i) => q.bind(*i),
        KeyPart::Text(s) => q.bind(s.clone()),
    }
}

impl Backend for Postgres {
    fn bind<'q>(
        q: Query<'q, Self, <Self as Database>::Arguments<'q>>,
        b: &Bind,
    ) -> Query<'q, Self, <Self as Database>::Arguments<'q>> {
        let (v, kind) = match b {
            Bind::Int(i) => return q.bind(*i),
            Bind::Text(s) => return q.bind(s.clone()),
            Bind::Key(k) => return key_bind(q, k),
            Bind::Value(v, kind) => (v, kind),
        };
        match (v, kind) {
            (SqlValue::Null, k) => match k {
                ColumnKind::Integer { .. } => q.bind(None::<i64>),
                ColumnKind::Decimal { .. } => q.bind(None::<Decimal>),
                ColumnKind::Float { .. } => q.bind(None::<f64>),
                ColumnKind::Bool => q.bind(None::<bool>),
                ColumnKind::Timestamp { tz: true } => q.bind(None::<OffsetDateTime>),
                ColumnKind::Timestamp { tz: false } => q.bind(None::<PrimitiveDateTime>),
                ColumnKind::Date => q.bind(None::<Date>),
                ColumnKind::Bytes => q.bind(None::<Vec<u8>>),
                _ => q.bind(None::<String>),
            },
            (SqlValue::Bool(b), ColumnKind::Integer { .. }) => q.bind(i64::from(*b)),
            (SqlValue::Bool(b), _) => q.bind(*b),
            (SqlValue::Int(i), ColumnKind::Bool) => q.bind(*i != 0),
            (SqlValue::Int(i), _) => q.bind(*i),
            (SqlValue::Float(f), _) => q.bind(*f),
            (SqlValue::Decimal(d), _) => q.bind(*d),
            (SqlValue::Text(s), _) => q.bind(s.clone()),
            (SqlValue::Bytes(b), _) => q.bind(b.clone()),
            (SqlValue::Json(j), _) => q.bind(j.to_string()),
            (SqlValue::Timestamp(t), ColumnKind::Timestamp { tz: true }) => q.bind(t.assume_utc()),
            (SqlValue::Timestamp(t), ColumnKind::Date) => q.bind(t.date()),
            (SqlValue::Timestamp(t), _) => q.bind(*t),
            (SqlValue::Date(d), _) => q.bind(*d),
        }
    }

    fn cell(row: &Self::Row, i: usize, shape: &Shape) -> Result<SqlValue, String> {
        type P = Postgres;
        let kind = match shape {
            Shape::Int => return Ok(or_null(get::<P, i64>(row, i)?, SqlValue::Int)),
            Shape::Text => return Ok(or_null(get::<P, String>(row, i)?, SqlValue::Text)),
            Shape::Value(k) => k,
        };
        Ok(match kind {
            ColumnKind::Integer { bits: 16, .. } => {
                or_null(get::<P, i16>(row, i)?, |v| SqlValue::Int(i64::from(v)))
            }
            ColumnKind::Integer { bits: 32, .. } => {
                or_null(get::<P, i32>(row, i)?, |v| SqlValue::Int(i64::from(v)))
            }
            ColumnKind::Integer { .. } => or_null(get::<P, i64>(row, i)?, SqlValue::Int),
            ColumnKind::Decimal { .. } => or_null(get::<P, Decimal>(row, i)?, SqlValue::Decimal),
            ColumnKind::Float { bits: 32 } => {
                or_null(get::<P, f32>(row, i)?, |v| SqlValue::Float(f64::from(v)))
            }
            ColumnKind::Float { .. } => or_null(get::<P, f64>(row, i)?, SqlValue::Float),
            ColumnKind::Bool => or_null(get::<P, bool>(row, i)?, SqlValue::Bool),
            ColumnKind::Timestamp { tz: true } => or_null(get::<P, OffsetDateTime>(row, i)?, |t| {
                SqlValue::Timestamp(utc(t))
            }),
            ColumnKind::Timestamp { tz: false } => {
                or_null(get::<P, PrimitiveDateTime>(row, i)?, SqlValue::Timestamp)
            }
            ColumnKind::Date => or_null(get::<P, Date>(row, i)?, SqlValue::Date),
            ColumnKind::Json => or_null(get::<P, serde_json::Value>(row, i)?, SqlValue::Json),
            ColumnKind::Bytes => or_null(get::<P, Vec<u8>>(row, i)?, SqlValue::Bytes),
            ColumnKind::Text
            | ColumnKind::Uuid
            | ColumnKind::Enum { .. }
            | ColumnKind::Other(_) => or_null(get::<P, String>(row, i)?, SqlValue::Text),
        })
    }
}

impl Backend for MySql {
    fn bind<'q>(
        q: Query<'q, Self, <Self as Database>::Arguments<'q>>,
        b: &Bind,
    ) -> Query<'q, Self, <Self as Database>::Arguments<'q>> {
        let v = match b {
            Bind::Int(i) => return q.bind(*i),
            Bind::Text(s) => return q.bind(s.clone()),
            Bind::Key(k) => return key_bind(q, k),
            Bind::Value(v, _) => v,
        };
        match v {
            SqlValue::Null => q.bind(None::<String>),
            SqlValue::Bool(b) => q.bind(*b),
            SqlValue::Int(i) => q.bind(*i),
            SqlValue::Float(f) => q.bind(*f),
            SqlValue::Decimal(d) => q.bind(*d),
            SqlValue::Text(s) => q.bind(s.clone()),
            SqlValue::Bytes(b) => q.bind(b.clone()),
            SqlValue::Json(j) => q.bind(j.to_string()),
            SqlValue::Timestamp(t) => q.bind(*t),
            SqlValue::Date(d) => q.bind(*d),
        }
    }

    fn cell(row: &Self::Row, i: usize, shape: &Shape) -> Result<SqlValue, String> {
        type M = MySql;
        let text = |row: &Self::Row| -> Result<SqlValue, String> {
            match get::<M, String>(row, i) {
                Ok(v) => Ok(or_null(v, SqlValue::Text)),
                // A binary collation: the bytes are still UTF-8 text.
                Err(_) => match get::<M, Vec<u8>>(row, i)? {
                    None => Ok(SqlValue::Null),
                    Some(b) => String::from_utf8(b)
                        .map(SqlValue::Text)
                        .map_err(|_| "not UTF-8 text".to_owned()),
                },
            }
        };
        let int = |row: &Self::Row| -> Result<SqlValue, String> {
            match get::<M, i64>(row, i) {
                Ok(v) => Ok(or_null(v, SqlValue::Int)),
                Err(_) => Ok(or_null(get::<M, u64>(row, i)?, |u| {
                    match i64::try_from(u) {
                        Ok(i) => SqlValue::Int(i),
                        Err(_) => SqlValue::Decimal(Decimal::from(u)),
                    }
                })),
            }
        };
        let kind = match shape {
            Shape::Int => return int(row),
            Shape::Text => return text(row),
            Shape::Value(k) => k,
        };
        match kind {
            ColumnKind::Integer { .. } | ColumnKind::Bool => int(row),
            ColumnKind::Decimal { .. } => {
                Ok(or_null(get::<M, Decimal>(row, i)?, SqlValue::Decimal))
            }
            ColumnKind::Float { bits: 32 } => Ok(or_null(get::<M, f32>(row, i)?, |v| {
                SqlValue::Float(f64::from(v))
            })),
            ColumnKind::Float { .. } => Ok(or_null(get::<M, f64>(row, i)?, SqlValue::Float)),
            ColumnKind::Timestamp { .. } => match get::<M, PrimitiveDateTime>(row, i) {
                Ok(v) => Ok(or_null(v, SqlValue::Timestamp)),
                Err(_) => Ok(or_null(get::<M, OffsetDateTime>(row, i)?, |t| {
                    SqlValue::Timestamp(utc(t))
                })),
            },
            ColumnKind::Date => Ok(or_null(get::<M, Date>(row, i)?, SqlValue::Date)),
            ColumnKind::Bytes => Ok(or_null(get::<M, Vec<u8>>(row, i)?, SqlValue::Bytes)),
            ColumnKind::Json
            | ColumnKind::Text
            | ColumnKind::Uuid
            | ColumnKind::Enum { .. }
            | ColumnKind::Other(_) => text(row),
        }
    }
}

impl Backend for Sqlite {
    fn bind<'q>(
        q: Query<'q, Self, <Self as Database>::Arguments<'q>>,
        b: &Bind,
    ) -> Query<'q, Self, <Self as Database>::Arguments<'q>> {
        let v = match b {
            Bind::Int(i) => return q.bind(*i),
            Bind::Text(s) => return q.bind(s.clone()),
            Bind::Key(k) => return key_bind(q, k),
            Bind::Value(v, _) => v,
        };
        match v {
            SqlValue::Null => q.bind(None::<String>),
            SqlValue::Bool(b) => q.bind(*b),
            SqlValue::Int(i) => q.bind(*i),
            SqlValue::Float(f) => q.bind(*f),
            // SQLite has no decimal type: the text of the number (a NUMERIC column keeps it as
            // an integer or a real, 15 significant digits).
            SqlValue::Decimal(d) => q.bind(d.to_string()),
            SqlValue::Text(s) => q.bind(s.clone()),
            SqlValue::Bytes(b) => q.bind(b.clone()),
            SqlValue::Json(j) => q.bind(j.to_string()),
            SqlValue::Timestamp(t) => q.bind(*t),
            SqlValue::Date(d) => q.bind(*d),
        }
    }

    fn cell(row: &Self::Row, i: usize, shape: &Shape) -> Result<SqlValue, String> {
        type S = Sqlite;
        let raw = row.try_get_raw(i).map_err(|e| e.to_string())?;
        if raw.is_null() {
            return Ok(SqlValue::Null);
        }
        let storage = raw.type_info().name().to_owned();
        match (shape, storage.as_str()) {
            (Shape::Value(ColumnKind::Timestamp { .. }), "TEXT" | "INTEGER") => {
                match get::<S, OffsetDateTime>(row, i) {
                    Ok(v) => return Ok(or_null(v, |t| SqlValue::Timestamp(utc(t)))),
                    Err(_) => {
                        return Ok(or_null(
                            get::<S, PrimitiveDateTime>(row, i)?,
                            SqlValue::Timestamp,
                        ));
                    }
                }
            }
            (Shape::Value(ColumnKind::Date), "TEXT") => {
                return Ok(or_null(get::<S, Date>(row, i)?, SqlValue::Date));
            }
            _ => {}
        }
        Ok(match storage.as_str() {
            "INTEGER" => or_null(get::<S, i64>(row, i)?, SqlValue::Int),
            "REAL" => or_null(get::<S, f64>(row, i)?, SqlValue::Float),
            "BLOB" => or_null(get::<S, Vec<u8>>(row, i)?, SqlValue::Bytes),
            _ => or_null(get::<S, String>(row, i)?, SqlValue::Text),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_versions_with_returning() {
        assert!(mariadb_returning("10.11.19-MariaDB-0+deb12u1"));
        assert!(mariadb_returning("11.4.2-MariaDB"));
        assert!(!mariadb_returning("10.4.30-MariaDB"));
        assert!(!mariadb_returning("8.0.36"));
    }

    #[test]
    fn errors_that_cannot_heal_are_permanent() {
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), ErrorClass::Transient);
        assert_eq!(
            classify(&sqlx::Error::Io(std::io::Error::other("reset"))),
            ErrorClass::Transient
        );
    }
}
