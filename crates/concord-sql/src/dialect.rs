//! The SQL the adapter runs, per database family. Pure: statements are built as text with the
//! values to bind ([`Stmt`]), so they can be read and tested without a database.

use std::fmt::Write as _;

use crate::convert::SqlValue;
use crate::key::{Key, KeyPart};
use crate::schema::{Column, ColumnKind};

/// The SQL dialect of a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    /// MariaDB or MySQL; `returning`: the server has `INSERT ... RETURNING` (MariaDB ≥ 10.5).
    MySql {
        mariadb: bool,
        returning: bool,
    },
    Sqlite,
}

/// A value to bind to a statement's parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    /// A column value, bound as the column's type wants.
    Value(SqlValue, ColumnKind),
    Key(KeyPart),
    Int(i64),
    Text(String),
}

/// A statement and the values of its parameters, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    pub sql: String,
    pub binds: Vec<Bind>,
}

/// One of the three row triggers of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerOp {
    Insert,
    Update,
    Delete,
}

impl TriggerOp {
    pub const ALL: [TriggerOp; 3] = [TriggerOp::Insert, TriggerOp::Update, TriggerOp::Delete];

    fn short(self) -> &'static str {
        match self {
            TriggerOp::Insert => "ins",
            TriggerOp::Update => "upd",
            TriggerOp::Delete => "del",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            TriggerOp::Insert => "INSERT",
            TriggerOp::Update => "UPDATE",
            TriggerOp::Delete => "DELETE",
        }
    }
}

/// Builds a statement, numbering its parameters.
struct Builder {
    dialect: Dialect,
    sql: String,
    binds: Vec<Bind>,
}

impl Builder {
    fn new(dialect: Dialect) -> Builder {
        Builder {
            dialect,
            sql: String::new(),
            binds: Vec::new(),
        }
    }

    fn push(&mut self, s: &str) -> &mut Builder {
        self.sql.push_str(s);
        self
    }

    /// A parameter placeholder bound to `bind`; `cast`: PostgreSQL casts it to this type.
    fn param(&mut self, bind: Bind, cast: Option<&str>) -> &mut Builder {
        self.binds.push(bind);
        let n = self.binds.len();
        match (self.dialect, cast) {
            (Dialect::Postgres, Some(t)) => {
                let _ = write!(self.sql, "CAST(${n} AS {t})");
            }
            (Dialect::Postgres, None) => {
                let _ = write!(self.sql, "${n}");
            }
            _ => self.sql.push('?'),
        }
        self
    }

    fn value(&mut self, v: SqlValue, column: &Column) -> &mut Builder {
        let cast = self.dialect.cast(column);
        self.param(Bind::Value(v, column.kind.clone()), cast.as_deref())
    }

    fn key(&mut self, part: &KeyPart, column: &Column) -> &mut Builder {
        let cast = self.dialect.cast(column);
        self.param(Bind::Key(part.clone()), cast.as_deref())
    }

    /// `k1 = ? AND k2 = ?`
    fn key_match(&mut self, columns: &[Column], key: &Key) -> &mut Builder {
        for (i, (c, part)) in columns.iter().zip(key).enumerate() {
            if i > 0 {
                self.push(" AND ");
            }
            let q = self.dialect.quote(&c.name);
            self.push(&q).push(" = ");
            self.key(part, c);
        }
        self
    }

    fn done(self) -> Stmt {
        Stmt {
            sql: self.sql,
            binds: self.binds,
        }
    }
}

impl Dialect {
    /// `ident` quoted as an identifier.
    pub fn quote(self, ident: &str) -> String {
        match self {
            Dialect::MySql { .. } => format!("`{}`", ident.replace('`', "``")),
            _ => format!("\"{}\"", ident.replace('"', "\"\"")),
        }
    }

    /// `text` as a string literal.
    pub fn literal(self, text: &str) -> String {
        match self {
            Dialect::MySql { .. } => {
                format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
            }
            _ => format!("'{}'", text.replace('\'', "''")),
        }
    }

    /// PostgreSQL: the type a text parameter is cast to for this column (the column's types
    /// that are bound as text).
    fn cast(self, column: &Column) -> Option<String> {
        if self != Dialect::Postgres {
            return None;
        }
        match &column.kind {
            ColumnKind::Uuid => Some("uuid".into()),
            ColumnKind::Json => Some(column.declared.clone()),
            ColumnKind::Enum {
                type_name: Some(t), ..
            } => Some(self.quote(t)),
            ColumnKind::Other(t) => Some(self.quote(t)),
            _ => None,
        }
    }

    /// How a column is read: PostgreSQL reads the types it binds as text as text.
    pub fn select_expr(self, column: &Column) -> String {
        let q = self.quote(&column.name);
        match (self, &column.kind) {
            (
                Dialect::Postgres,
                ColumnKind::Uuid | ColumnKind::Enum { .. } | ColumnKind::Other(_),
            ) => format!("CAST({q} AS text)"),
            (Dialect::MySql { .. }, ColumnKind::Json) => format!("CAST({q} AS CHAR)"),
            _ => q,
        }
    }

    fn columns(self, columns: &[&Column]) -> String {
        columns
            .iter()
            .map(|c| self.select_expr(c))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The rows with these keys: key columns, then `values` columns.
    pub fn select_rows(self, table: &str, key: &[Column], values: &[Column], keys: &[Key]) -> Stmt {
        let mut b = Builder::new(self);
        let all: Vec<&Column> = key.iter().chain(values).collect();
        let cols = self.columns(&all);
        b.push(&format!("SELECT {cols} FROM {} WHERE ", self.quote(table)));
        if let [k] = key {
            b.push(&self.quote(&k.name)).push(" IN (");
            for (i, one) in keys.iter().enumerate() {
                if i > 0 {
                    b.push(", ");
                }
                if let Some(part) = one.first() {
                    b.key(part, k);
                }
            }
            b.push(")");
        } else {
            for (i, one) in keys.iter().enumerate() {
                if i > 0 {
                    b.push(" OR ");
                }
                b.push("(").key_match(key, one).push(")");
            }
        }
        b.done()
    }

    /// A page of every row, in key order.
    pub fn select_page(
        self,
        table: &str,
        key: &[Column],
        values: &[Column],
        limit: i64,
        offset: i64,
    ) -> Stmt {
        let mut b = Builder::new(self);
        let all: Vec<&Column> = key.iter().chain(values).collect();
        let order = key
            .iter()
            .map(|c| self.quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        b.push(&format!(
            "SELECT {} FROM {} ORDER BY {order} LIMIT ",
            self.columns(&all),
            self.quote(table)
        ));
        b.param(Bind::Int(limit), None)
            .push(" OFFSET ")
            .param(Bind::Int(offset), None);
        b.done()
    }

    /// The keys of the rows whose `columns` hold `values` (at most two: one is a match, two are
    /// ambiguous).
    pub fn find(self, table: &str, key: &[Column], values: &[(Column, SqlValue)]) -> Stmt {
        let mut b = Builder::new(self);
        let keys: Vec<&Column> = key.iter().collect();
        b.push(&format!(
            "SELECT {} FROM {} WHERE ",
            self.columns(&keys),
            self.quote(table)
        ));
        for (i, (c, v)) in values.iter().enumerate() {
            if i > 0 {
                b.push(" AND ");
            }
            b.push(&self.quote(&c.name)).push(" = ");
            b.value(v.clone(), c);
        }
        b.push(" LIMIT 2");
        b.done()
    }

    /// Inserts a row; returns its key columns when the database can (`RETURNING`).
    pub fn insert(self, table: &str, key: &[Column], values: &[(Column, SqlValue)]) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!("INSERT INTO {} ", self.quote(table)));
        if values.is_empty() {
            b.push(match self {
                Dialect::MySql { .. } => "() VALUES ()",
                _ => "DEFAULT VALUES",
            });
        } else {
            let names = values
                .iter()
                .map(|(c, _)| self.quote(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            b.push(&format!("({names}) VALUES ("));
            for (i, (c, v)) in values.iter().enumerate() {
                if i > 0 {
                    b.push(", ");
                }
                b.value(v.clone(), c);
            }
            b.push(")");
        }
        if self.returning() {
            let keys: Vec<&Column> = key.iter().collect();
            b.push(" RETURNING ").push(&self.columns(&keys));
        }
        b.done()
    }

    /// Whether `INSERT ... RETURNING` is available.
    pub fn returning(self) -> bool {
        match self {
            Dialect::MySql { returning, .. } => returning,
            _ => true,
        }
    }

    /// Sets `values` of the row with `key`.
    pub fn update(
        self,
        table: &str,
        key_columns: &[Column],
        key: &Key,
        values: &[(Column, SqlValue)],
    ) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!("UPDATE {} SET ", self.quote(table)));
        for (i, (c, v)) in values.iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            b.push(&self.quote(&c.name)).push(" = ");
            b.value(v.clone(), c);
        }
        b.push(" WHERE ").key_match(key_columns, key);
        b.done()
    }

    pub fn delete(self, table: &str, key_columns: &[Column], key: &Key) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!("DELETE FROM {} WHERE ", self.quote(table)));
        b.key_match(key_columns, key);
        b.done()
    }

    pub fn exists(self, table: &str, key_columns: &[Column], key: &Key) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!("SELECT 1 FROM {} WHERE ", self.quote(table)));
        b.key_match(key_columns, key).push(" LIMIT 1");
        b.done()
    }

    // ---- the adapter's own tables ----

    /// The oldest `limit` change-log rows: `id, tbl, row_key, op`.
    pub fn read_changes(self, prefix: &str, limit: i64) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!(
            "SELECT id, tbl, row_key, op FROM {} ORDER BY id LIMIT ",
            self.quote(&format!("{prefix}_changes"))
        ));
        b.param(Bind::Int(limit), None);
        b.done()
    }

    pub fn delete_changes(self, prefix: &str, ids: &[i64]) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!(
            "DELETE FROM {} WHERE id IN (",
            self.quote(&format!("{prefix}_changes"))
        ));
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            b.param(Bind::Int(*id), None);
        }
        b.push(")");
        b.done()
    }

    pub fn count_changes(self, prefix: &str) -> Stmt {
        Stmt {
            sql: format!(
                "SELECT COUNT(*) FROM {}",
                self.quote(&format!("{prefix}_changes"))
            ),
            binds: Vec::new(),
        }
    }

    /// Records a change of a row in the change log (the adapter's own, for values the database
    /// filled in on an insert: defaults).
    pub fn log_change(self, prefix: &str, table: &str, row_key: &str, op: &str) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!(
            "INSERT INTO {} (tbl, row_key, op) VALUES (",
            self.quote(&format!("{prefix}_changes"))
        ));
        b.param(Bind::Text(table.to_owned()), None).push(", ");
        b.param(Bind::Text(row_key.to_owned()), None).push(", ");
        b.param(Bind::Text(op.to_owned()), None).push(")");
        b.done()
    }

    /// The recorded apply of an event: `local_id, digest`.
    /// What the applied-events table holds of these event ids: rows (event_id, local_id, digest).
    pub fn applied_get(self, prefix: &str, event_ids: &[&str]) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!(
            "SELECT event_id, local_id, digest FROM {} WHERE event_id IN (",
            self.quote(&format!("{prefix}_applied"))
        ));
        for (i, id) in event_ids.iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            b.param(Bind::Text((*id).to_owned()), None);
        }
        b.push(")");
        b.done()
    }

    /// Records events applied: (event id, local id, digest), all at `at_ms`; each event id at
    /// most once.
    pub fn applied_put(self, prefix: &str, applied: &[(&str, &str, &str)], at_ms: i64) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!(
            "INSERT INTO {} (event_id, local_id, digest, at) VALUES ",
            self.quote(&format!("{prefix}_applied"))
        ));
        for (i, (event_id, local_id, digest)) in applied.iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            b.push("(");
            b.param(Bind::Text((*event_id).to_owned()), None).push(", ");
            b.param(Bind::Text((*local_id).to_owned()), None).push(", ");
            b.param(Bind::Text((*digest).to_owned()), None).push(", ");
            b.param(Bind::Int(at_ms), None).push(")");
        }
        b.push(match self {
            Dialect::MySql { .. } => {
                " ON DUPLICATE KEY UPDATE local_id = VALUES(local_id), digest = VALUES(digest), at = VALUES(at)"
            }
            _ => {
                " ON CONFLICT (event_id) DO UPDATE SET local_id = excluded.local_id, digest = excluded.digest, at = excluded.at"
            }
        });
        b.done()
    }

    pub fn applied_prune(self, prefix: &str, before_ms: i64) -> Stmt {
        let mut b = Builder::new(self);
        b.push(&format!(
            "DELETE FROM {} WHERE at < ",
            self.quote(&format!("{prefix}_applied"))
        ));
        b.param(Bind::Int(before_ms), None);
        b.done()
    }

    /// Statements that mark the current transaction as the adapter's (its writes are not
    /// captured), run first in it.
    pub fn origin_on(self, prefix: &str) -> String {
        match self {
            Dialect::Postgres => format!("SELECT set_config('{prefix}.origin', 'sync', true)"),
            Dialect::MySql { .. } => format!("SET @{prefix}_origin = 'sync'"),
            Dialect::Sqlite => format!(
                "INSERT INTO {} (x) VALUES (1)",
                self.quote(&format!("{prefix}_origin"))
            ),
        }
    }

    /// The statement that clears the mark, run last in the transaction (and, for MySQL, again
    /// on the connection after a rollback); `None`: it ends with the transaction.
    pub fn origin_off(self, prefix: &str) -> Option<String> {
        match self {
            Dialect::Postgres => None,
            Dialect::MySql { .. } => Some(format!("SET @{prefix}_origin = NULL")),
            Dialect::Sqlite => Some(format!(
                "DELETE FROM {}",
                self.quote(&format!("{prefix}_origin"))
            )),
        }
    }

    /// The PostgreSQL channel the capture triggers notify.
    pub fn channel(prefix: &str) -> String {
        format!("{prefix}_changes")
    }

    // ---- install / uninstall ----

    /// The adapter's tables (and, PostgreSQL, the capture function), idempotent.
    pub fn install_common(self, prefix: &str) -> Vec<String> {
        let changes = self.quote(&format!("{prefix}_changes"));
        let applied = self.quote(&format!("{prefix}_applied"));
        let index = self.quote(&format!("{prefix}_applied_at"));
        match self {
            Dialect::Postgres => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {changes} (id BIGSERIAL PRIMARY KEY, tbl TEXT NOT NULL, row_key TEXT NOT NULL, op CHAR(1) NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now())"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {applied} (event_id TEXT PRIMARY KEY, local_id TEXT NOT NULL, digest TEXT NOT NULL, at BIGINT NOT NULL)"
                ),
                format!("CREATE INDEX IF NOT EXISTS {index} ON {applied} (at)"),
                self.pg_function(prefix),
            ],
            Dialect::MySql { .. } => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {changes} (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, tbl VARCHAR(255) NOT NULL, row_key TEXT NOT NULL, op CHAR(1) NOT NULL, at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {applied} (event_id VARCHAR(190) NOT NULL PRIMARY KEY, local_id TEXT NOT NULL, digest VARCHAR(64) NOT NULL, at BIGINT NOT NULL, INDEX {index} (at)) ENGINE=InnoDB"
                ),
            ],
            // A plain rowid (no AUTOINCREMENT, whose `sqlite_sequence` table could never be
            // dropped again): an id freed by a deleted row may come back, which is harmless, as
            // rows are only ever excluded while queued or handed out, never below an id.
            Dialect::Sqlite => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {changes} (id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, row_key TEXT NOT NULL, op TEXT NOT NULL, at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {applied} (event_id TEXT PRIMARY KEY, local_id TEXT NOT NULL, digest TEXT NOT NULL, at INTEGER NOT NULL)"
                ),
                format!("CREATE INDEX IF NOT EXISTS {index} ON {applied} (at)"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {} (x INTEGER)",
                    self.quote(&format!("{prefix}_origin"))
                ),
                // The mark lives only inside the adapter's transactions; never left behind.
                format!("DELETE FROM {}", self.quote(&format!("{prefix}_origin"))),
            ],
        }
    }

    /// The tables `install` creates.
    pub fn own_tables(self, prefix: &str) -> Vec<String> {
        let mut t = vec![format!("{prefix}_changes"), format!("{prefix}_applied")];
        if self == Dialect::Sqlite {
            t.push(format!("{prefix}_origin"));
        }
        t
    }

    /// PostgreSQL's capture function: the trigger's arguments are the table's name (as the
    /// configuration names it) and its key columns.
    fn pg_function(self, prefix: &str) -> String {
        let changes = self.quote(&format!("{prefix}_changes"));
        let function = self.quote(&format!("{prefix}_capture"));
        let channel = self.literal(&Dialect::channel(prefix));
        let setting = self.literal(&format!("{prefix}.origin"));
        format!(
            r#"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $concord$
DECLARE
  old_row jsonb;
  new_row jsonb;
  old_key jsonb := '[]'::jsonb;
  new_key jsonb := '[]'::jsonb;
  i int;
BEGIN
  IF current_setting({setting}, true) = 'sync' THEN
    RETURN NULL;
  END IF;
  IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;
  IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;
  FOR i IN 1 .. TG_NARGS - 1 LOOP
    IF old_row IS NOT NULL THEN old_key := old_key || jsonb_build_array(old_row -> TG_ARGV[i]); END IF;
    IF new_row IS NOT NULL THEN new_key := new_key || jsonb_build_array(new_row -> TG_ARGV[i]); END IF;
  END LOOP;
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND old_key <> new_key) THEN
    INSERT INTO {changes} (tbl, row_key, op) VALUES (TG_ARGV[0], old_key::text, 'D');
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO {changes} (tbl, row_key, op) VALUES (TG_ARGV[0], new_key::text, left(TG_OP, 1));
  END IF;
  PERFORM pg_notify({channel}, '');
  RETURN NULL;
END
$concord$"#
        )
    }

    /// The name of a capture trigger (PostgreSQL: one per table, the same name on each).
    pub fn trigger_name(self, prefix: &str, table: &str, op: TriggerOp) -> String {
        if self == Dialect::Postgres {
            return format!("{prefix}_capture");
        }
        let plain = table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let name = format!("{prefix}_{}_{table}", op.short());
        if plain && name.len() <= 64 {
            name
        } else {
            format!("{prefix}_{}_{:016x}", op.short(), fnv(table.as_bytes()))
        }
    }

    /// The statements installing the capture triggers of `table` (keyed by `key`), replacing
    /// those an earlier install made.
    pub fn install_triggers(self, prefix: &str, table: &str, key: &[String]) -> Vec<String> {
        let t = self.quote(table);
        let changes = self.quote(&format!("{prefix}_changes"));
        let tbl = self.literal(table);
        match self {
            Dialect::Postgres => {
                let name = self.quote(&self.trigger_name(prefix, table, TriggerOp::Insert));
                let args = std::iter::once(table)
                    .chain(key.iter().map(String::as_str))
                    .map(|a| self.literal(a))
                    .collect::<Vec<_>>()
                    .join(", ");
                vec![
                    format!("DROP TRIGGER IF EXISTS {name} ON {t}"),
                    format!(
                        "CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION {}({args})",
                        self.quote(&format!("{prefix}_capture"))
                    ),
                ]
            }
            Dialect::MySql { .. } | Dialect::Sqlite => {
                let mysql = self != Dialect::Sqlite;
                let array = |row: &str| self.key_array(row, key);
                let key_changed = key
                    .iter()
                    .map(|k| {
                        let k = self.quote(k);
                        if mysql {
                            format!("OLD.{k} <=> NEW.{k}")
                        } else {
                            format!("OLD.{k} IS NEW.{k}")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let insert = |row: &str, op: &str| {
                    format!(
                        "INSERT INTO {changes} (tbl, row_key, op) VALUES ({tbl}, {}, '{op}');",
                        array(row)
                    )
                };
                let mut out = Vec::new();
                for op in TriggerOp::ALL {
                    let name = self.quote(&self.trigger_name(prefix, table, op));
                    let body = match op {
                        TriggerOp::Insert => insert("NEW", "I"),
                        TriggerOp::Delete => insert("OLD", "D"),
                        TriggerOp::Update if mysql => format!(
                            "IF NOT ({key_changed}) THEN {} END IF; {}",
                            insert("OLD", "D"),
                            insert("NEW", "U")
                        ),
                        TriggerOp::Update => format!(
                            "INSERT INTO {changes} (tbl, row_key, op) SELECT {tbl}, {}, 'D' WHERE NOT ({key_changed}); {}",
                            array("OLD"),
                            insert("NEW", "U")
                        ),
                    };
                    if mysql {
                        let var = format!("@{prefix}_origin");
                        // MariaDB replaces a trigger at once; MySQL has a moment without it.
                        let create = if matches!(self, Dialect::MySql { mariadb: true, .. }) {
                            "CREATE OR REPLACE TRIGGER"
                        } else {
                            out.push(format!("DROP TRIGGER IF EXISTS {name}"));
                            "CREATE TRIGGER"
                        };
                        out.push(format!(
                            "{create} {name} AFTER {} ON {t} FOR EACH ROW BEGIN IF COALESCE({var}, '') <> 'sync' THEN {body} END IF; END",
                            op.sql()
                        ));
                    } else {
                        out.push(format!("DROP TRIGGER IF EXISTS {name}"));
                        out.push(format!(
                            "CREATE TRIGGER {name} AFTER {} ON {t} FOR EACH ROW WHEN NOT EXISTS (SELECT 1 FROM {}) BEGIN {body} END",
                            op.sql(),
                            self.quote(&format!("{prefix}_origin"))
                        ));
                    }
                }
                out
            }
        }
    }

    /// The key array a capture trigger records: `JSON_ARRAY(NEW.a, NEW.b)`.
    fn key_array(self, row: &str, key: &[String]) -> String {
        let cols = key
            .iter()
            .map(|k| format!("{row}.{}", self.quote(k)))
            .collect::<Vec<_>>()
            .join(", ");
        if self == Dialect::Sqlite {
            format!("json_array({cols})")
        } else {
            format!("JSON_ARRAY({cols})")
        }
    }

    /// What the definition of capture trigger `op` of `table` contains when it records the key
    /// columns `key` (an install for other key columns does not).
    pub fn trigger_signature(
        self,
        prefix: &str,
        table: &str,
        key: &[String],
        op: TriggerOp,
    ) -> String {
        match self {
            Dialect::Postgres => {
                let args = std::iter::once(table)
                    .chain(key.iter().map(String::as_str))
                    .map(|a| self.literal(a))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{prefix}_capture({args})")
            }
            _ => {
                let row = if op == TriggerOp::Delete {
                    "OLD"
                } else {
                    "NEW"
                };
                format!("{}, {}", self.literal(table), self.key_array(row, key))
            }
        }
    }

    /// The query listing the capture triggers `install` created (whatever tables they are on):
    /// rows of (trigger name, table name, definition).
    pub fn list_triggers(self, prefix: &str) -> String {
        let like = like_escape(&format!("{prefix}_changes"));
        match self {
            Dialect::Postgres => format!(
                "SELECT t.tgname::text, c.relname::text, pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid WHERE NOT t.tgisinternal AND p.proname = {} AND p.pronamespace = current_schema()::regnamespace AND c.relnamespace = current_schema()::regnamespace",
                self.literal(&format!("{prefix}_capture"))
            ),
            Dialect::MySql { .. } => format!(
                "SELECT CAST(TRIGGER_NAME AS CHAR), CAST(EVENT_OBJECT_TABLE AS CHAR), CAST(ACTION_STATEMENT AS CHAR) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() AND TRIGGER_NAME LIKE {} ESCAPE '!' AND ACTION_STATEMENT LIKE {} ESCAPE '!'",
                self.literal(&format!("{}!_%", like_escape(prefix))),
                self.literal(&format!("%{like}%"))
            ),
            Dialect::Sqlite => format!(
                "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE {} ESCAPE '!' AND sql LIKE {} ESCAPE '!'",
                self.literal(&format!("{}!_%", like_escape(prefix))),
                self.literal(&format!("%{like}%"))
            ),
        }
    }

    /// The statement dropping capture trigger `name` of `table`.
    pub fn drop_trigger(self, name: &str, table: &str) -> String {
        match self {
            Dialect::Postgres => format!(
                "DROP TRIGGER IF EXISTS {} ON {}",
                self.quote(name),
                self.quote(table)
            ),
            _ => format!("DROP TRIGGER IF EXISTS {}", self.quote(name)),
        }
    }

    /// The statements dropping the adapter's tables and function (after its triggers).
    pub fn uninstall_common(self, prefix: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .own_tables(prefix)
            .iter()
            .map(|t| format!("DROP TABLE IF EXISTS {}", self.quote(t)))
            .collect();
        if self == Dialect::Postgres {
            out.insert(
                0,
                format!(
                    "DROP FUNCTION IF EXISTS {}()",
                    self.quote(&format!("{prefix}_capture"))
                ),
            );
        }
        out
    }

    /// The query telling whether a table exists: one row if it does.
    pub fn table_exists(self, table: &str) -> String {
        match self {
            Dialect::Postgres => format!(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = {}",
                self.literal(table)
            ),
            Dialect::MySql { .. } => format!(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = {}",
                self.literal(table)
            ),
            Dialect::Sqlite => format!(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = {}",
                self.literal(table)
            ),
        }
    }
}

/// `text` for a LIKE pattern with `!` as the escape character.
fn like_escape(text: &str) -> String {
    text.replace('!', "!!")
        .replace('_', "!_")
        .replace('%', "!%")
}

/// FNV-1a, 64 bits: stable names and digests.
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, kind: ColumnKind) -> Column {
        Column {
            name: name.into(),
            kind,
            nullable: true,
            has_default: false,
            generated: false,
            declared: String::new(),
        }
    }

    const INT: ColumnKind = ColumnKind::Integer {
        bits: 64,
        unsigned: false,
    };

    #[test]
    fn statements_number_their_parameters_per_dialect() {
        let key = [col("id", INT)];
        let values = [(col("name", ColumnKind::Text), SqlValue::Text("Ada".into()))];
        let pg = Dialect::Postgres.update("t", &key, &vec![KeyPart::Int(1)], &values);
        assert_eq!(pg.sql, r#"UPDATE "t" SET "name" = $1 WHERE "id" = $2"#);
        assert_eq!(pg.binds.len(), 2);
        let my = Dialect::MySql {
            mariadb: true,
            returning: false,
        }
        .update("t", &key, &vec![KeyPart::Int(1)], &values);
        assert_eq!(my.sql, "UPDATE `t` SET `name` = ? WHERE `id` = ?");
        let ins = Dialect::MySql {
            mariadb: true,
            returning: false,
        }
        .insert("t", &key, &[]);
        assert_eq!(ins.sql, "INSERT INTO `t` () VALUES ()");
        let ins = Dialect::Sqlite.insert("t", &key, &values);
        assert_eq!(
            ins.sql,
            r#"INSERT INTO "t" ("name") VALUES (?) RETURNING "id""#
        );
    }

    #[test]
    fn postgres_casts_what_it_binds_as_text() {
        let key = [col("id", ColumnKind::Uuid)];
        let mut doc = col("doc", ColumnKind::Json);
        doc.declared = "jsonb".into();
        let s = Dialect::Postgres.select_rows(
            "t",
            &key,
            &[doc],
            &[
                vec![KeyPart::Text("a".into())],
                vec![KeyPart::Text("b".into())],
            ],
        );
        assert_eq!(
            s.sql,
            r#"SELECT CAST("id" AS text), "doc" FROM "t" WHERE "id" IN (CAST($1 AS uuid), CAST($2 AS uuid))"#
        );
        let key = [col("a", INT), col("b", ColumnKind::Text)];
        let s = Dialect::Sqlite.select_rows(
            "t",
            &key,
            &[],
            &[vec![KeyPart::Int(1), KeyPart::Text("x".into())]],
        );
        assert_eq!(
            s.sql,
            r#"SELECT "a", "b" FROM "t" WHERE ("a" = ? AND "b" = ?)"#
        );
    }

    #[test]
    fn identifiers_and_literals_are_escaped() {
        assert_eq!(Dialect::Postgres.quote(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(
            Dialect::MySql {
                mariadb: true,
                returning: true
            }
            .quote("a`b"),
            "`a``b`"
        );
        assert_eq!(
            Dialect::MySql {
                mariadb: true,
                returning: true
            }
            .literal(r"it's\"),
            r"'it''s\\'"
        );
        assert_eq!(Dialect::Sqlite.literal("it's"), "'it''s'");
        assert_eq!(like_escape("concord_x%"), "concord!_x!%");
    }

    #[test]
    fn trigger_names_fit_the_databases_limits() {
        let d = Dialect::MySql {
            mariadb: true,
            returning: true,
        };
        assert_eq!(
            d.trigger_name("concord", "orders", TriggerOp::Update),
            "concord_upd_orders"
        );
        let long = "x".repeat(70);
        let name = d.trigger_name("concord", &long, TriggerOp::Insert);
        assert!(
            name.len() <= 64 && name.starts_with("concord_ins_"),
            "{name}"
        );
        assert_eq!(
            d.trigger_name("concord", "odd name", TriggerOp::Delete),
            d.trigger_name("concord", "odd name", TriggerOp::Delete)
        );
        assert_eq!(
            Dialect::Postgres.trigger_name("concord", "orders", TriggerOp::Delete),
            "concord_capture"
        );
    }

    #[test]
    fn triggers_skip_the_adapters_own_writes() {
        let pg = Dialect::Postgres.install_common("concord").join("\n");
        assert!(pg.contains("current_setting('concord.origin', true) = 'sync'"));
        assert!(pg.contains("pg_notify('concord_changes', '')"));
        let my = Dialect::MySql {
            mariadb: true,
            returning: true,
        }
        .install_triggers("concord", "t", &["a".into(), "b".into()])
        .join("\n");
        assert!(my.contains("IF COALESCE(@concord_origin, '') <> 'sync'"));
        assert!(my.contains("JSON_ARRAY(NEW.`a`, NEW.`b`)"));
        assert!(my.contains("IF NOT (OLD.`a` <=> NEW.`a` AND OLD.`b` <=> NEW.`b`)"));
        let lite = Dialect::Sqlite
            .install_triggers("concord", "t", &["id".into()])
            .join("\n");
        assert!(lite.contains(r#"WHEN NOT EXISTS (SELECT 1 FROM "concord_origin")"#));
        assert_eq!(
            Dialect::Sqlite.origin_on("concord"),
            r#"INSERT INTO "concord_origin" (x) VALUES (1)"#
        );
    }
}
