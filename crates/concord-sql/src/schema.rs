//! The live schema of a table, as conversions see it: each column's kind, whether it may be
//! NULL, whether the database fills it. Pure: the introspection queries' rows are classified
//! here, per database family.

use crate::config::Family;

/// What a column holds, as far as conversions care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnKind {
    /// Character data (`text`, `varchar`, `char`, ...).
    Text,
    /// An integer of `bits` bits.
    Integer {
        bits: u8,
        unsigned: bool,
    },
    /// An exact decimal with `scale` decimals when declared (`numeric(p, s)`).
    Decimal {
        scale: Option<u32>,
    },
    /// A binary floating-point number (`real`, `double`, `float`).
    Float {
        bits: u8,
    },
    Bool,
    /// A date and time; `tz`: the database stores an instant (`timestamptz`, MySQL `TIMESTAMP`).
    Timestamp {
        tz: bool,
    },
    Date,
    /// A JSON document (`json`, `jsonb`, MySQL `JSON`).
    Json,
    /// Binary data (`bytea`, `blob`).
    Bytes,
    /// PostgreSQL `uuid` (read and written as text).
    Uuid,
    /// An enumerated type: PostgreSQL `CREATE TYPE ... AS ENUM` (its name) or MySQL `ENUM(...)`.
    Enum {
        type_name: Option<String>,
        values: Vec<String>,
    },
    /// Anything else: the declared type.
    Other(String),
}

impl ColumnKind {
    /// A name for messages.
    pub fn describe(&self) -> String {
        match self {
            ColumnKind::Text => "text".into(),
            ColumnKind::Integer { bits, unsigned } => {
                format!(
                    "{}{bits}-bit integer",
                    if *unsigned { "unsigned " } else { "" }
                )
            }
            ColumnKind::Decimal { scale: Some(s) } => format!("decimal with {s} decimals"),
            ColumnKind::Decimal { scale: None } => "decimal".into(),
            ColumnKind::Float { bits } => format!("{bits}-bit float"),
            ColumnKind::Bool => "boolean".into(),
            ColumnKind::Timestamp { tz: true } => "timestamp with time zone".into(),
            ColumnKind::Timestamp { tz: false } => "timestamp".into(),
            ColumnKind::Date => "date".into(),
            ColumnKind::Json => "json".into(),
            ColumnKind::Bytes => "binary".into(),
            ColumnKind::Uuid => "uuid".into(),
            ColumnKind::Enum { values, .. } => format!("enum({})", values.join(", ")),
            ColumnKind::Other(t) => t.clone(),
        }
    }

    /// Whether a key column of this kind is supported (keys are integers or text).
    pub fn is_key_kind(&self) -> bool {
        matches!(
            self,
            ColumnKind::Text | ColumnKind::Integer { .. } | ColumnKind::Uuid
        )
    }

    /// Whether key values of this kind are integers (else text).
    pub fn is_integer(&self) -> bool {
        matches!(self, ColumnKind::Integer { .. })
    }
}

/// One column of a live table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
    pub nullable: bool,
    /// The database fills it when an insert does not (a default, identity, auto-increment,
    /// rowid alias).
    pub has_default: bool,
    /// The database generates its value (identity, serial, auto-increment, rowid alias).
    pub generated: bool,
    /// The declared type, as the database names it.
    pub declared: String,
}

/// A live table: its columns in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A row of PostgreSQL's `information_schema.columns` (and the enum labels of its type).
#[derive(Debug, Clone, Default)]
pub struct PgColumnRow {
    pub name: String,
    pub data_type: String,
    pub udt_name: String,
    pub nullable: bool,
    pub default: Option<String>,
    pub identity: bool,
    pub numeric_scale: Option<i64>,
    pub enum_labels: Vec<String>,
}

/// The column a PostgreSQL introspection row describes.
pub fn pg_column(r: PgColumnRow) -> Column {
    let dt = r.data_type.as_str();
    let kind = match dt {
        "text" | "character varying" | "character" | "name" | "citext" => ColumnKind::Text,
        "smallint" => ColumnKind::Integer {
            bits: 16,
            unsigned: false,
        },
        "integer" => ColumnKind::Integer {
            bits: 32,
            unsigned: false,
        },
        "bigint" => ColumnKind::Integer {
            bits: 64,
            unsigned: false,
        },
        "numeric" => ColumnKind::Decimal {
            scale: r.numeric_scale.and_then(|s| u32::try_from(s).ok()),
        },
        "real" => ColumnKind::Float { bits: 32 },
        "double precision" => ColumnKind::Float { bits: 64 },
        "boolean" => ColumnKind::Bool,
        "timestamp without time zone" => ColumnKind::Timestamp { tz: false },
        "timestamp with time zone" => ColumnKind::Timestamp { tz: true },
        "date" => ColumnKind::Date,
        "json" | "jsonb" => ColumnKind::Json,
        "bytea" => ColumnKind::Bytes,
        "uuid" => ColumnKind::Uuid,
        "USER-DEFINED" if !r.enum_labels.is_empty() => ColumnKind::Enum {
            type_name: Some(r.udt_name.clone()),
            values: r.enum_labels.clone(),
        },
        "USER-DEFINED" => ColumnKind::Other(r.udt_name.clone()),
        other => ColumnKind::Other(other.to_owned()),
    };
    let serial = r
        .default
        .as_deref()
        .is_some_and(|d| d.starts_with("nextval("));
    Column {
        declared: if dt == "USER-DEFINED" {
            r.udt_name
        } else {
            r.data_type.clone()
        },
        name: r.name,
        kind,
        nullable: r.nullable,
        has_default: r.default.is_some() || r.identity,
        generated: r.identity || serial,
    }
}

/// A row of MySQL's/MariaDB's `information_schema.columns`.
#[derive(Debug, Clone, Default)]
pub struct MySqlColumnRow {
    pub name: String,
    /// `DATA_TYPE`, e.g. `int`, `varchar`.
    pub data_type: String,
    /// `COLUMN_TYPE`, e.g. `int(10) unsigned`, `tinyint(1)`, `enum('a','b')`.
    pub column_type: String,
    pub nullable: bool,
    pub default: Option<String>,
    /// `EXTRA`, e.g. `auto_increment`.
    pub extra: String,
    pub numeric_scale: Option<i64>,
    /// The column has a `CHECK (json_valid(...))` (MariaDB's JSON).
    pub json_check: bool,
}

/// The column a MySQL/MariaDB introspection row describes.
pub fn mysql_column(r: MySqlColumnRow) -> Column {
    let dt = r.data_type.to_ascii_lowercase();
    let ct = r.column_type.to_ascii_lowercase();
    let unsigned = ct.contains("unsigned");
    let int = |bits| ColumnKind::Integer { bits, unsigned };
    let kind = match dt.as_str() {
        "tinyint" if ct.starts_with("tinyint(1)") => ColumnKind::Bool,
        "bool" | "boolean" => ColumnKind::Bool,
        "tinyint" => int(8),
        "smallint" => int(16),
        "mediumint" => int(24),
        "int" | "integer" => int(32),
        "bigint" => int(64),
        "decimal" | "numeric" => ColumnKind::Decimal {
            scale: r.numeric_scale.and_then(|s| u32::try_from(s).ok()),
        },
        "float" => ColumnKind::Float { bits: 32 },
        "double" | "real" => ColumnKind::Float { bits: 64 },
        "datetime" => ColumnKind::Timestamp { tz: false },
        "timestamp" => ColumnKind::Timestamp { tz: true },
        "date" => ColumnKind::Date,
        "json" => ColumnKind::Json,
        "longtext" if r.json_check => ColumnKind::Json,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => ColumnKind::Text,
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            ColumnKind::Bytes
        }
        "enum" => ColumnKind::Enum {
            type_name: None,
            values: mysql_enum_values(&r.column_type),
        },
        _ => ColumnKind::Other(r.column_type.clone()),
    };
    let generated = r.extra.to_ascii_lowercase().contains("auto_increment");
    Column {
        name: r.name,
        kind,
        nullable: r.nullable,
        // MariaDB reports "NULL" (a text) as the default of nullable columns without one.
        has_default: generated || r.default.as_deref().is_some_and(|d| d != "NULL"),
        generated,
        declared: r.column_type,
    }
}

/// The labels of `enum('a','b''c')`.
fn mysql_enum_values(column_type: &str) -> Vec<String> {
    let Some(inner) = column_type
        .find('(')
        .and_then(|i| column_type.get(i + 1..column_type.len().saturating_sub(1)))
    else {
        return Vec::new();
    };
    let mut values = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if quoted && chars.peek() == Some(&'\'') => {
                chars.next();
                cur.push('\'');
            }
            '\'' if quoted => {
                quoted = false;
                values.push(std::mem::take(&mut cur));
            }
            '\'' => quoted = true,
            _ if quoted => cur.push(c),
            _ => {}
        }
    }
    values
}

/// A row of SQLite's `pragma_table_info`.
#[derive(Debug, Clone, Default)]
pub struct SqliteColumnRow {
    pub name: String,
    pub declared: String,
    pub not_null: bool,
    pub default: Option<String>,
    /// Position in the primary key (0: not in it).
    pub pk: i64,
}

/// The columns of a SQLite table from its `pragma_table_info` rows (a single `INTEGER PRIMARY
/// KEY` column is the rowid: generated).
pub fn sqlite_columns(rows: Vec<SqliteColumnRow>) -> Vec<Column> {
    let pk_columns = rows.iter().filter(|r| r.pk > 0).count();
    rows.into_iter()
        .map(|r| {
            let rowid = pk_columns == 1 && r.pk > 0 && r.declared.eq_ignore_ascii_case("INTEGER");
            Column {
                kind: sqlite_kind(&r.declared),
                nullable: !r.not_null && !rowid,
                has_default: r.default.is_some() || rowid,
                generated: rowid,
                name: r.name,
                declared: r.declared,
            }
        })
        .collect()
}

/// The kind of a SQLite column from its declared type (SQLite's affinity rules, refined by the
/// usual type names).
pub fn sqlite_kind(declared: &str) -> ColumnKind {
    let t = declared.to_ascii_uppercase();
    let base = t.split('(').next().unwrap_or_default().trim().to_owned();
    if base == "BOOLEAN" || base == "BOOL" {
        ColumnKind::Bool
    } else if base == "DATE" {
        ColumnKind::Date
    } else if base.contains("DATETIME") || base.contains("TIMESTAMP") {
        ColumnKind::Timestamp { tz: false }
    } else if base == "JSON" || base == "JSONB" {
        ColumnKind::Json
    } else if base.contains("INT") {
        ColumnKind::Integer {
            bits: 64,
            unsigned: false,
        }
    } else if base.contains("CHAR") || base.contains("CLOB") || base.contains("TEXT") {
        ColumnKind::Text
    } else if base.contains("BLOB") || base.is_empty() {
        ColumnKind::Bytes
    } else if base.contains("REAL") || base.contains("FLOA") || base.contains("DOUB") {
        ColumnKind::Float { bits: 64 }
    } else if base.contains("DEC") || base.contains("NUMERIC") {
        let scale = t
            .split_once('(')
            .and_then(|(_, args)| args.trim_end_matches(')').split(',').nth(1))
            .and_then(|s| s.trim().parse().ok());
        ColumnKind::Decimal { scale }
    } else {
        ColumnKind::Other(declared.to_owned())
    }
}

impl Family {
    /// The family's name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::Postgres => "PostgreSQL",
            Family::MySql => "MariaDB/MySQL",
            Family::Sqlite => "SQLite",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_types_are_classified() {
        let c = pg_column(PgColumnRow {
            name: "id".into(),
            data_type: "bigint".into(),
            identity: true,
            ..Default::default()
        });
        assert!(c.generated && c.has_default);
        assert_eq!(
            c.kind,
            ColumnKind::Integer {
                bits: 64,
                unsigned: false
            }
        );
        let c = pg_column(PgColumnRow {
            name: "id".into(),
            data_type: "integer".into(),
            default: Some("nextval('t_id_seq'::regclass)".into()),
            ..Default::default()
        });
        assert!(c.generated);
        let c = pg_column(PgColumnRow {
            data_type: "numeric".into(),
            numeric_scale: Some(2),
            ..Default::default()
        });
        assert_eq!(c.kind, ColumnKind::Decimal { scale: Some(2) });
        let c = pg_column(PgColumnRow {
            data_type: "USER-DEFINED".into(),
            udt_name: "tier".into(),
            enum_labels: vec!["gold".into()],
            ..Default::default()
        });
        assert_eq!(
            c.kind,
            ColumnKind::Enum {
                type_name: Some("tier".into()),
                values: vec!["gold".into()]
            }
        );
        assert_eq!(c.declared, "tier");
    }

    #[test]
    fn mysql_types_are_classified() {
        let row = |dt: &str, ct: &str| MySqlColumnRow {
            data_type: dt.into(),
            column_type: ct.into(),
            ..Default::default()
        };
        assert_eq!(
            mysql_column(row("tinyint", "tinyint(1)")).kind,
            ColumnKind::Bool
        );
        assert_eq!(
            mysql_column(row("int", "int(10) unsigned")).kind,
            ColumnKind::Integer {
                bits: 32,
                unsigned: true
            }
        );
        assert_eq!(
            mysql_column(row("enum", "enum('a','it''s')")).kind,
            ColumnKind::Enum {
                type_name: None,
                values: vec!["a".into(), "it's".into()]
            }
        );
        let mut json = row("longtext", "longtext");
        json.json_check = true;
        assert_eq!(mysql_column(json).kind, ColumnKind::Json);
        let mut ai = row("bigint", "bigint(20)");
        ai.extra = "auto_increment".into();
        let c = mysql_column(ai);
        assert!(c.generated && c.has_default);
        let mut nodefault = row("varchar", "varchar(10)");
        nodefault.default = Some("NULL".into());
        assert!(!mysql_column(nodefault).has_default);
    }

    #[test]
    fn sqlite_types_follow_affinity() {
        assert_eq!(sqlite_kind("VARCHAR(20)"), ColumnKind::Text);
        assert_eq!(
            sqlite_kind("DECIMAL(10, 2)"),
            ColumnKind::Decimal { scale: Some(2) }
        );
        assert_eq!(sqlite_kind("NUMERIC"), ColumnKind::Decimal { scale: None });
        assert_eq!(sqlite_kind("datetime"), ColumnKind::Timestamp { tz: false });
        assert_eq!(sqlite_kind("BOOLEAN"), ColumnKind::Bool);
        assert_eq!(sqlite_kind(""), ColumnKind::Bytes);
        assert_eq!(sqlite_kind("DOUBLE"), ColumnKind::Float { bits: 64 });
        let cols = sqlite_columns(vec![
            SqliteColumnRow {
                name: "id".into(),
                declared: "INTEGER".into(),
                pk: 1,
                ..Default::default()
            },
            SqliteColumnRow {
                name: "n".into(),
                declared: "TEXT".into(),
                not_null: true,
                ..Default::default()
            },
        ]);
        assert!(cols[0].generated && !cols[0].nullable);
        assert!(!cols[1].generated && !cols[1].nullable && !cols[1].has_default);
    }
}
