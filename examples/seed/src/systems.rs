//! The three systems of the seed scenario as the demo sets them up: each one's own table (its
//! own name, columns and key type, in the SQL of the database it runs on), the mapping of
//! `deploy/sql/<system>.toml` (the one `docker compose up` runs), the adapter's config file,
//! and how the demo prints a table. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context as _, anyhow, bail};
use concord_sql::config::Family;

/// One system: its name, table, the columns the demo shows, and how its table is created.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub table: &'static str,
    /// The key column, then every mapped column, in the table's order.
    pub columns: &'static [&'static str],
    /// The `deploy/sql/<name>.toml` of the compose deployment: its `[adapter.entities]` is the
    /// mapping the demo's adapter runs with.
    pub deploy_toml: &'static str,
    /// The families the system may run on.
    pub families: &'static [Family],
}

/// The salesperson's system: customers in `clients`, keyed by a generated integer.
pub const ORDERS: Spec = Spec {
    name: "orders",
    table: "clients",
    columns: &[
        "id",
        "full_name",
        "email",
        "phone",
        "address",
        "tier",
        "paid",
        "lang",
        "delivery_state",
        "tickets",
        "agent",
    ],
    deploy_toml: include_str!("../../../deploy/sql/orders.toml"),
    families: &[Family::Sqlite, Family::Postgres],
};

/// The support desk: customers in `customers`, keyed by an auto-increment number, tiers coded.
pub const SUPPORT: Spec = Spec {
    name: "support",
    table: "customers",
    columns: &[
        "cust_no", "name", "email", "phone", "address", "tier", "amount", "language", "status",
        "tickets", "agent", "notes",
    ],
    deploy_toml: include_str!("../../../deploy/sql/support.toml"),
    families: &[Family::Sqlite, Family::MySql],
};

/// The driver's app: stops in `stops`, keyed by the canonical customer key (text).
pub const DELIVERY: Spec = Spec {
    name: "delivery",
    table: "stops",
    columns: &[
        "stop_id",
        "customer_name",
        "addr",
        "phone",
        "language",
        "status",
        "warehouse",
        "notes",
    ],
    deploy_toml: include_str!("../../../deploy/sql/delivery.toml"),
    families: &[Family::Sqlite],
};

pub const SYSTEMS: [Spec; 3] = [ORDERS, SUPPORT, DELIVERY];

/// The table of orders on PostgreSQL: `deploy/sql/orders.sql` without its sample rows.
const ORDERS_POSTGRES: &str = "
CREATE TABLE clients (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  full_name TEXT NOT NULL,
  email TEXT UNIQUE,
  phone TEXT,
  address JSONB,
  tier TEXT,
  paid NUMERIC(12, 2),
  lang TEXT,
  delivery_state TEXT,
  tickets INTEGER,
  agent TEXT,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// The same table on SQLite (the rowid is the generated key).
const ORDERS_SQLITE: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE clients (
  id INTEGER PRIMARY KEY,
  full_name TEXT NOT NULL,
  email TEXT UNIQUE,
  phone TEXT,
  address JSON,
  tier TEXT,
  paid NUMERIC(12, 2),
  lang TEXT,
  delivery_state TEXT,
  tickets INTEGER,
  agent TEXT,
  updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
)";

/// The table of support on MariaDB: `deploy/sql/support.sql`.
const SUPPORT_MARIADB: &str = include_str!("../../../deploy/sql/support.sql");

/// The same table on SQLite: the tier codes as a CHECK, the ticket count never negative.
const SUPPORT_SQLITE: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE customers (
  cust_no INTEGER PRIMARY KEY,
  name TEXT,
  email TEXT,
  phone TEXT,
  address JSON,
  tier TEXT CHECK (tier IN ('B', 'S', 'G')),
  amount NUMERIC(12, 2),
  language TEXT,
  status TEXT,
  tickets INTEGER CHECK (tickets >= 0),
  agent TEXT,
  notes TEXT
)";

/// The table of delivery on SQLite: `deploy/sql/delivery.sql`.
const DELIVERY_SQLITE: &str = include_str!("../../../deploy/sql/delivery.sql");

impl Spec {
    /// The SQL that creates the system's table on `family`.
    pub fn schema(&self, family: Family) -> anyhow::Result<&'static str> {
        Ok(match (self.name, family) {
            ("orders", Family::Postgres) => ORDERS_POSTGRES,
            ("orders", Family::Sqlite) => ORDERS_SQLITE,
            ("support", Family::MySql) => SUPPORT_MARIADB,
            ("support", Family::Sqlite) => SUPPORT_SQLITE,
            ("delivery", Family::Sqlite) => DELIVERY_SQLITE,
            (name, family) => bail!("the demo has no {} schema for {name}", family_name(family)),
        })
    }

    /// The query that reads the table as the demo shows it: every column as text, by key.
    pub fn select(&self, family: Family) -> String {
        let text = match family {
            Family::MySql => "CHAR",
            Family::Postgres | Family::Sqlite => "TEXT",
        };
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("CAST({c} AS {text})"))
            .collect();
        format!(
            "SELECT {} FROM {} ORDER BY {}",
            columns.join(", "),
            self.table,
            self.columns[0]
        )
    }

    /// The adapter's config file: the SDK's settings for this system in the demo's vhost and
    /// the `[adapter]` table of `deploy/sql/<name>.toml`, with the database at `db` (a URL, or
    /// the name of the environment variable that holds it: `url_env`). The broker URI (with
    /// its password) comes from the environment (`CONCORD_AMQP_URI`), not this file.
    pub fn adapter_config(&self, settings: &AdapterSettings, db: &DbRef) -> anyhow::Result<String> {
        let deploy: toml::Table = toml::from_str(self.deploy_toml)
            .with_context(|| format!("deploy/sql/{}.toml", self.name))?;
        let mut adapter = match deploy.get("adapter") {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => {
                return Err(anyhow!(
                    "deploy/sql/{}.toml has no [adapter] table",
                    self.name
                ));
            }
        };
        adapter.remove("url");
        adapter.remove("url_env");
        match db {
            DbRef::Url(url) => adapter.insert("url".into(), url.clone().into()),
            DbRef::Env(var) => adapter.insert("url_env".into(), var.clone().into()),
        };
        let mut file = toml::Table::new();
        let mut put = |k: &str, v: toml::Value| file.insert(k.to_owned(), v);
        put("system", self.name.into());
        put("policy", settings.policy.clone().into());
        put("state", settings.state.clone().into());
        put("amqp_uri", settings.amqp_uri.clone().into());
        put("namespace", settings.namespace.clone().into());
        put("router_user", settings.router_user.clone().into());
        put("http_listen", settings.http_listen.clone().into());
        put("adapter", toml::Value::Table(adapter));
        Ok(toml::to_string(&file)?)
    }
}

/// The SDK's settings of one adapter in the demo.
#[derive(Debug, Clone)]
pub struct AdapterSettings {
    pub policy: String,
    pub state: String,
    /// Without the password (the process gets the full URI in its environment).
    pub amqp_uri: String,
    pub namespace: String,
    pub router_user: String,
    pub http_listen: String,
}

/// Where an adapter finds its database.
#[derive(Debug, Clone)]
pub enum DbRef {
    Url(String),
    Env(String),
}

pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::Postgres => "PostgreSQL",
        Family::MySql => "MariaDB",
        Family::Sqlite => "SQLite",
    }
}

/// A table as read: one map column → value (NULL: `None`) per row, by key.
pub type Rows = Vec<BTreeMap<String, Option<String>>>;

/// Zips the text cells of a query made by [`Spec::select`] with the column names.
pub fn rows(spec: &Spec, cells: Vec<Vec<Option<String>>>) -> Rows {
    cells
        .into_iter()
        .map(|row| {
            spec.columns
                .iter()
                .map(|c| (*c).to_owned())
                .zip(row)
                .collect()
        })
        .collect()
}

/// The value of `column` in the row whose `by` column is `value`.
pub fn cell<'a>(rows: &'a Rows, by: &str, value: &str, column: &str) -> Option<&'a str> {
    rows.iter()
        .find(|r| r.get(by).and_then(Option::as_deref) == Some(value))
        .and_then(|r| r.get(column))
        .and_then(Option::as_deref)
}

/// A table as the demo prints it: a header, then per row its key and every column (NULL as
/// `NULL`), one a line.
///
/// ```text
/// support: MariaDB, table customers
///   cust_no 1
///     name      Ada Lovelace
/// ```
pub fn render(spec: &Spec, family: Family, rows: &Rows) -> String {
    let mut out = format!(
        "{}: {}, table {}",
        spec.name,
        family_name(family),
        spec.table
    );
    if rows.is_empty() {
        out.push_str(" (empty)");
    }
    out.push('\n');
    let width = spec.columns.iter().map(|c| c.len()).max().unwrap_or(0);
    for row in rows {
        let value = |c: &str| row.get(c).cloned().flatten();
        let key = spec.columns[0];
        let _ = writeln!(
            out,
            "  {key} {}",
            value(key).unwrap_or_else(|| "NULL".into())
        );
        for c in &spec.columns[1..] {
            let _ = writeln!(
                out,
                "    {c:width$}  {}",
                value(c).unwrap_or_else(|| "NULL".into())
            );
        }
    }
    out
}

/// `url` with its database replaced by `db` (the query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("//").map_or(0, |i| i + 2);
    let base = match base[authority..].find('/') {
        Some(i) => &base[..authority + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_adapter_config_is_the_deploy_mapping_in_the_demo_vhost() {
        let settings = AdapterSettings {
            policy: "/tmp/d/policy.toml".into(),
            state: "/tmp/d/support.state".into(),
            amqp_uri: "amqp://concord-demo.support@127.0.0.1:5672/concord-demo".into(),
            namespace: "concord-demo".into(),
            router_user: "concord-demo.router".into(),
            http_listen: "127.0.0.1:4000".into(),
        };
        let text = SUPPORT
            .adapter_config(&settings, &DbRef::Env("DB".into()))
            .unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["system"].as_str(), Some("support"));
        assert_eq!(t["router_user"].as_str(), Some("concord-demo.router"));
        let adapter = t["adapter"].as_table().unwrap();
        assert_eq!(adapter["url_env"].as_str(), Some("DB"));
        assert!(adapter.get("url").is_none());
        let sql: concord_sql::SqlConfig = toml::Value::Table(adapter.clone()).try_into().unwrap();
        let customer = &sql.entities["customer"];
        assert_eq!(customer.table, SUPPORT.table);
        // Every mapped column is shown, and nothing else but the key.
        let mut mapped: Vec<&str> = customer
            .fields
            .values()
            .map(|f| f.column.as_str())
            .collect();
        mapped.extend(customer.key.iter().map(String::as_str));
        mapped.sort_unstable();
        let mut shown = SUPPORT.columns.to_vec();
        shown.sort_unstable();
        assert_eq!(mapped, shown);
    }

    #[test]
    fn every_system_shows_exactly_its_key_and_mapped_columns() {
        for spec in SYSTEMS {
            let t: toml::Table = toml::from_str(spec.deploy_toml).unwrap();
            let sql: concord_sql::SqlConfig = t["adapter"].clone().try_into().unwrap();
            let e = &sql.entities["customer"];
            assert_eq!(e.table, spec.table);
            assert_eq!(e.key, [spec.columns[0]], "{}", spec.name);
            let mut mapped: Vec<&str> = e.fields.values().map(|f| f.column.as_str()).collect();
            mapped.sort_unstable();
            let mut shown = spec.columns[1..].to_vec();
            shown.sort_unstable();
            assert_eq!(mapped, shown, "{}", spec.name);
            for family in spec.families {
                assert!(spec.schema(*family).unwrap().contains(spec.table));
            }
        }
    }

    #[test]
    fn rows_render_with_their_key_and_nulls() {
        let r = rows(
            &DELIVERY,
            vec![vec![
                Some("k1".into()),
                Some("Ada".into()),
                None,
                None,
                None,
                None,
                Some("W1".into()),
                None,
            ]],
        );
        assert_eq!(cell(&r, "customer_name", "Ada", "warehouse"), Some("W1"));
        let text = render(&DELIVERY, Family::Sqlite, &r);
        assert!(text.starts_with("delivery: SQLite, table stops\n  stop_id k1\n"));
        assert!(text.contains("\n    warehouse      W1\n"), "{text}");
        assert!(text.contains("\n    addr           NULL\n"), "{text}");
        assert!(render(&DELIVERY, Family::Sqlite, &Vec::new()).contains("(empty)"));
    }

    #[test]
    fn database_urls_get_their_database_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "d1"),
            "postgres://postgres@127.0.0.1:5432/d1"
        );
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306", "d1"),
            "mysql://root@127.0.0.1:3306/d1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/x?sslmode=disable", "d1"),
            "postgres://u:p@h/d1?sslmode=disable"
        );
    }
}
