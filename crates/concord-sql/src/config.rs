//! The adapter's settings: the `[adapter]` table of the process config file. Pure: parsing,
//! validation (every problem at once) and the resolution of secrets from the environment (given
//! as a lookup function).
//!
//! ```toml
//! [adapter]
//! url_env = "ORDERS_DB_URL"          # or url = "postgres://orders:${ORDERS_DB_PASSWORD}@db/orders"
//! poll_ms = 100                      # MariaDB/MySQL and SQLite: change-log poll interval
//!
//! [adapter.entities.customer]
//! table = "customers"
//! key = "id"                         # or ["region", "number"]
//! key_source = "generated"           # "generated" | "canonical" | "fields"
//! match = ["email"]                  # link an existing row on first sight
//!
//! [adapter.entities.customer.fields]
//! name = "full_name"                                   # a column, conversion from the types
//! amount_paid = { column = "paid", scale = 2 }          # minor units <-> DECIMAL(_, 2)
//! tier = { column = "tier", values = { gold = "G", silver = "S" } }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::problem::Problem;

/// The `[adapter]` table. Deserializing it validates it ([`SqlConfig::validate`]): a config file
/// with a problem is refused when it is read, naming every problem.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct SqlConfig {
    /// The database URL (`postgres://`, `mysql://` or `mariadb://`, `sqlite://`); `${VAR}` is
    /// replaced by the environment variable `VAR`.
    #[serde(default)]
    pub url: Option<String>,
    /// The environment variable holding the database URL (instead of `url`).
    #[serde(default)]
    pub url_env: Option<String>,
    /// MariaDB/MySQL and SQLite: how often the change log is read, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// PostgreSQL: how often the change log is read when no notification woke the adapter, in
    /// milliseconds (a safety net: notifications wake it at once).
    #[serde(default = "default_listen_poll_ms")]
    pub listen_poll_ms: u64,
    /// Most change-log rows read and not yet handed to the SDK at once.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Prefix of everything `install` creates in the database (tables, triggers, function, the
    /// origin setting): `[a-z_][a-z0-9_]*`, at most 24 characters.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long the ids of applied incoming events are kept (exactly-once apply), in hours.
    #[serde(default = "default_applied_retention_hours")]
    pub applied_retention_hours: u64,
    /// Most connections to the database.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Per entity of the policy (by its name there): where and how it is stored.
    pub entities: BTreeMap<String, EntityConfig>,
}

/// The `[adapter]` table as written, before validation (the fields of [`SqlConfig`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    #[serde(default = "default_listen_poll_ms")]
    pub listen_poll_ms: u64,
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_applied_retention_hours")]
    pub applied_retention_hours: u64,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    pub entities: BTreeMap<String, EntityConfig>,
}

impl TryFrom<RawConfig> for SqlConfig {
    type Error = String;

    fn try_from(r: RawConfig) -> Result<SqlConfig, String> {
        let config = SqlConfig {
            url: r.url,
            url_env: r.url_env,
            poll_ms: r.poll_ms,
            listen_poll_ms: r.listen_poll_ms,
            batch: r.batch,
            prefix: r.prefix,
            applied_retention_hours: r.applied_retention_hours,
            max_connections: r.max_connections,
            entities: r.entities,
        };
        let problems: Vec<Problem> = config
            .validate()
            .into_iter()
            .filter(Problem::is_error)
            .collect();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(crate::problem::lines(&problems))
        }
    }
}

fn default_poll_ms() -> u64 {
    100
}
fn default_listen_poll_ms() -> u64 {
    2_000
}
fn default_batch() -> usize {
    500
}
fn default_prefix() -> String {
    "concord".to_owned()
}
fn default_applied_retention_hours() -> u64 {
    24 * 7
}
fn default_max_connections() -> u32 {
    4
}

/// Where an entity's records are, and how.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// The table (in the connection's default schema).
    pub table: String,
    /// The key column(s): `"id"` or `["a", "b"]`.
    #[serde(deserialize_with = "one_or_many")]
    pub key: Vec<String>,
    /// Where the key of a row created for a record of another system comes from.
    #[serde(default)]
    pub key_source: KeySource,
    /// Canonical fields that identify a record already present (e.g. `email`): a record first
    /// seen from another system is linked to the row with the same values instead of being
    /// inserted again.
    #[serde(default, rename = "match")]
    pub match_fields: Vec<String>,
    /// Canonical field → column (and conversion).
    pub fields: BTreeMap<String, FieldConfig>,
}

/// Where the key of a new row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The database generates it (identity, serial, auto-increment, rowid).
    #[default]
    Generated,
    /// The single key column holds the record's canonical key.
    Canonical,
    /// Every key column is a mapped field (a natural key); its values come with the record.
    Fields,
}

/// How one canonical field is stored: `"column"` or a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldConfig {
    pub column: String,
    /// The canonical integer is in minor units and the column holds the decimal amount with
    /// this many decimals (e.g. 2: 1250 ↔ 12.50).
    pub scale: Option<u32>,
    /// Canonical value → column value, both ways (enums, codes, flags).
    pub values: Option<BTreeMap<String, MapValue>>,
}

/// A column value in a `values` map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
pub enum MapValue {
    Text(String),
    Int(i64),
    Bool(bool),
}

impl fmt::Display for MapValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapValue::Text(s) => write!(f, "{s:?}"),
            MapValue::Int(i) => write!(f, "{i}"),
            MapValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldTable {
    column: String,
    #[serde(default)]
    scale: Option<u32>,
    #[serde(default)]
    values: Option<BTreeMap<String, MapValue>>,
}

impl<'de> Deserialize<'de> for FieldConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FieldConfig, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a column name, or a table { column = \"...\", scale = 2, values = { ... } }",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldConfig, E> {
                Ok(FieldConfig {
                    column: s.to_owned(),
                    scale: None,
                    values: None,
                })
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<FieldConfig, M::Error> {
                let t = FieldTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FieldConfig {
                    column: t.column,
                    scale: t.scale,
                    values: t.values,
                })
            }
        }
        d.deserialize_any(V)
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a column name or a list of column names")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            Ok(vec![s.to_owned()])
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Vec<String>, S::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// The database family a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Postgres,
    MySql,
    Sqlite,
}

impl Family {
    /// The family of `url`, from its scheme.
    pub fn of(url: &str) -> Option<Family> {
        let scheme = url.split_once(':')?.0;
        match scheme {
            "postgres" | "postgresql" => Some(Family::Postgres),
            "mysql" | "mariadb" => Some(Family::MySql),
            "sqlite" => Some(Family::Sqlite),
            _ => None,
        }
    }
}

impl SqlConfig {
    /// Every problem of the settings that can be seen without the database or the schema.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        match (&self.url, &self.url_env) {
            (Some(_), Some(_)) => problems.push(Problem::error(
                "both `url` and `url_env` are set: give the database URL one way",
            )),
            (None, None) => problems.push(Problem::error(
                "no database: set `url` (e.g. \"postgres://user@host/db\", with ${VAR} for secrets) or `url_env` (the environment variable holding it)",
            )),
            (Some(url), None) => {
                if Family::of(url).is_none() {
                    problems.push(Problem::error(format!(
                        "`url` must start with postgres://, mysql://, mariadb:// or sqlite:, not {:?}",
                        url.split(':').next().unwrap_or_default()
                    )));
                }
            }
            (None, Some(var)) => {
                if var.is_empty() {
                    problems.push(Problem::error("`url_env` is empty"));
                }
            }
        }
        if self.poll_ms == 0 || self.listen_poll_ms == 0 {
            problems.push(Problem::error(
                "`poll_ms` and `listen_poll_ms` must be at least 1",
            ));
        }
        if !(1..=100_000).contains(&self.batch) {
            problems.push(Problem::error("`batch` must be between 1 and 100000"));
        }
        if self.max_connections < 2 {
            problems.push(Problem::error(
                "`max_connections` must be at least 2 (the change feed and the applies)",
            ));
        }
        if self.applied_retention_hours == 0 {
            problems.push(Problem::error(
                "`applied_retention_hours` must be at least 1",
            ));
        }
        if !valid_prefix(&self.prefix) {
            problems.push(Problem::error(format!(
                "`prefix` {:?} must match [a-z_][a-z0-9_]* and be at most 24 characters",
                self.prefix
            )));
        }
        if self.entities.is_empty() {
            problems.push(Problem::error(
                "no entity: add [adapter.entities.<entity>] tables",
            ));
        }
        let mut tables = BTreeMap::new();
        for (name, e) in &self.entities {
            if let Some(other) = tables.insert(e.table.as_str(), name.as_str()) {
                problems.push(
                    Problem::error(format!("table also mapped by entity `{other}`"))
                        .entity(name)
                        .table(&e.table),
                );
            }
            e.validate(name, &mut problems);
        }
        problems
    }

    /// The database URL, secrets filled in from the environment (`lookup(VAR)`).
    pub fn resolve_url(&self, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
        match (&self.url, &self.url_env) {
            (_, Some(var)) => lookup(var)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("environment variable {var} (`url_env`) is not set")),
            (Some(url), None) => expand(url, lookup),
            (None, None) => Err("no database URL configured".to_owned()),
        }
    }
}

impl EntityConfig {
    fn validate(&self, name: &str, problems: &mut Vec<Problem>) {
        let here = |p: Problem| p.entity(name).table(&self.table);
        if self.table.is_empty() {
            problems.push(Problem::error("`table` is empty").entity(name));
        }
        if self.key.is_empty() {
            problems.push(here(Problem::error("`key` names no column")));
        }
        let mut seen = BTreeSet::new();
        for k in &self.key {
            if !seen.insert(k) {
                problems.push(here(Problem::error("key column named twice")).column(k));
            }
        }
        let mapped: BTreeMap<&str, &str> = self
            .fields
            .iter()
            .map(|(f, c)| (c.column.as_str(), f.as_str()))
            .collect();
        match self.key_source {
            KeySource::Fields => {
                for k in &self.key {
                    if !mapped.contains_key(k.as_str()) {
                        problems.push(
                            here(Problem::error(
                                "key_source = \"fields\": every key column must be a mapped field",
                            ))
                            .column(k),
                        );
                    }
                }
            }
            KeySource::Generated | KeySource::Canonical => {
                for k in &self.key {
                    if let Some(f) = mapped.get(k.as_str()) {
                        problems.push(
                            here(Problem::error(format!(
                                "a key column the {} cannot be a mapped field (use key_source = \"fields\")",
                                if self.key_source == KeySource::Generated {
                                    "database generates"
                                } else {
                                    "canonical key fills"
                                }
                            )))
                            .column(k)
                            .field(f),
                        );
                    }
                }
                if self.key_source == KeySource::Canonical && self.key.len() != 1 {
                    problems.push(here(Problem::error(
                        "key_source = \"canonical\" needs exactly one key column",
                    )));
                }
            }
        }
        let mut columns = BTreeMap::new();
        for (field, c) in &self.fields {
            if c.column.is_empty() {
                problems.push(here(Problem::error("empty column name")).field(field));
            }
            if let Some(other) = columns.insert(c.column.as_str(), field.as_str()) {
                problems.push(
                    here(Problem::error(format!(
                        "column also mapped to field `{other}`"
                    )))
                    .column(&c.column)
                    .field(field),
                );
            }
            if let Some(scale) = c.scale
                && scale > 18
            {
                problems.push(
                    here(Problem::error(format!("scale {scale} is above 18")))
                        .column(&c.column)
                        .field(field),
                );
            }
            if c.scale.is_some() && c.values.is_some() {
                problems.push(
                    here(Problem::error("`scale` and `values` cannot be combined"))
                        .column(&c.column)
                        .field(field),
                );
            }
            if let Some(values) = &c.values {
                if values.is_empty() {
                    problems.push(
                        here(Problem::error("`values` is empty"))
                            .column(&c.column)
                            .field(field),
                    );
                }
                let mut back = BTreeMap::new();
                for (canonical, local) in values {
                    if let Some(other) = back.insert(local, canonical) {
                        problems.push(
                            here(Problem::error(format!(
                                "`values` maps both {other:?} and {canonical:?} to {local}: the column value would not tell them apart"
                            )))
                            .column(&c.column)
                            .field(field),
                        );
                    }
                }
            }
        }
        for m in &self.match_fields {
            if !self.fields.contains_key(m) {
                problems.push(here(Problem::error("a `match` field must be mapped")).field(m));
            }
        }
    }
}

/// Whether `prefix` may prefix the names of the adapter's objects.
pub fn valid_prefix(prefix: &str) -> bool {
    let mut bytes = prefix.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && prefix.len() <= 24
}

/// `text` with every `${VAR}` replaced by `lookup(VAR)`; an unset variable is an error naming it.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed ${{ in {text:?}"));
        };
        let var = &after[..end];
        if var.is_empty() {
            return Err("empty ${} in the database URL".to_owned());
        }
        let value = lookup(var)
            .ok_or_else(|| format!("environment variable {var} (in `url`) is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SqlConfig, toml::de::Error> {
        toml::from_str(text)
    }

    const GOOD: &str = r#"
url = "postgres://u:${PW}@localhost/db"
[entities.customer]
table = "customers"
key = "id"
match = ["email"]
[entities.customer.fields]
name = "full_name"
email = { column = "email" }
amount_paid = { column = "paid", scale = 2 }
tier = { column = "tier", values = { gold = "G", silver = "S" } }
"#;

    #[test]
    fn a_good_config_parses_and_validates() {
        let c = parse(GOOD).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let e = &c.entities["customer"];
        assert_eq!(e.key, ["id"]);
        assert_eq!(e.key_source, KeySource::Generated);
        assert_eq!(e.fields["name"].column, "full_name");
        assert_eq!(e.fields["amount_paid"].scale, Some(2));
        assert_eq!(
            e.fields["tier"].values.as_ref().unwrap()["gold"],
            MapValue::Text("G".into())
        );
        assert_eq!(c.poll_ms, 100);
        assert_eq!(c.prefix, "concord");
    }

    #[test]
    fn unknown_keys_are_refused_naming_them() {
        let bad = GOOD.replace("match = ", "matches = ");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("matches"), "{e}");
        let bad = GOOD.replace("scale = 2", "scael = 2");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("scael"), "{e}");
        let bad = format!("{GOOD}\npol_ms = 3\n");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("pol_ms") || e.contains("unknown"), "{e}");
    }

    #[test]
    fn every_problem_is_named() {
        let text = r#"
url = "oracle://x"
prefix = "Bad-Prefix"
batch = 0
[entities.customer]
table = "customers"
key = ["id", "id"]
key_source = "canonical"
match = ["phone"]
[entities.customer.fields]
id = "id"
name = "n"
email = "n"
tier = { column = "t", values = { gold = "G", silver = "G" } }
[entities.other]
table = "customers"
key = "k"
key_source = "fields"
[entities.other.fields]
"#;
        // Refused when read, naming every problem; `validate` names the same.
        let all = parse(text).unwrap_err().to_string();
        for expect in [
            "`url` must start with",
            "`prefix` \"Bad-Prefix\"",
            "`batch`",
            "table also mapped by entity `customer`",
            "column `id`: key column named twice",
            "column `id`, field `id`: a key column the canonical key fills",
            "needs exactly one key column",
            "column `n`, field `name`: column also mapped to field `email`",
            "maps both \"gold\" and \"silver\" to \"G\"",
            "field `phone`: a `match` field must be mapped",
            "entity `other`, table `customers`, column `k`: key_source = \"fields\"",
        ] {
            assert!(all.contains(expect), "missing {expect:?} in\n{all}");
        }
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let c = parse(GOOD).unwrap();
        let env = |v: &str| (v == "PW").then(|| "s3cret".to_owned());
        assert_eq!(
            c.resolve_url(env).unwrap(),
            "postgres://u:s3cret@localhost/db"
        );
        let e = c.resolve_url(|_| None).unwrap_err();
        assert!(e.contains("PW"), "{e}");
        let mut c = c;
        c.url = None;
        c.url_env = Some("DB_URL".into());
        assert_eq!(
            c.resolve_url(|v| (v == "DB_URL").then(|| "sqlite://x".into()))
                .unwrap(),
            "sqlite://x"
        );
        assert!(c.resolve_url(|_| None).unwrap_err().contains("DB_URL"));
        assert!(expand("a${B", |_| None).is_err());
        assert_eq!(expand("plain", |_| None).unwrap(), "plain");
    }

    #[test]
    fn families_come_from_the_scheme() {
        assert_eq!(Family::of("postgresql://x"), Some(Family::Postgres));
        assert_eq!(Family::of("mariadb://x"), Some(Family::MySql));
        assert_eq!(Family::of("sqlite:x.db"), Some(Family::Sqlite));
        assert_eq!(Family::of("oracle://x"), None);
        assert!(valid_prefix("concord"));
        assert!(valid_prefix("_c2"));
        assert!(!valid_prefix("2c"));
        assert!(!valid_prefix(""));
    }
}
