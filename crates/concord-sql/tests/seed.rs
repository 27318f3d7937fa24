//! The seed scenario on three real databases whose schemas differ as real systems' do: orders
//! in PostgreSQL, support in MariaDB, delivery in SQLite, each a `concord-sql` adapter on the
//! SDK's test bus (the real engine and the real router, in memory). Edits are made with plain
//! SQL, as the systems' own applications would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestDb, adapter, seed, settle};
use concord_adapter::testkit::TestBus;
use concord_sql::SqlSystem;

const ORDERS_SCHEMA: &str = "
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

const ORDERS: &str = r#"
[entities.customer]
table = "clients"
key = "id"
[entities.customer.fields]
name = "full_name"
email = "email"
phone = "phone"
address = "address"
tier = "tier"
amount_paid = { column = "paid", scale = 2 }
language = "lang"
delivery_status = "delivery_state"
open_tickets = "tickets"
support_agent = "agent"
"#;

const SUPPORT_SCHEMA: &str = "
CREATE TABLE customers (
  cust_no INT AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(200),
  email VARCHAR(200),
  phone VARCHAR(50),
  address JSON,
  tier ENUM('B', 'S', 'G'),
  amount DECIMAL(12, 2),
  language VARCHAR(10),
  status VARCHAR(40),
  tickets INT UNSIGNED,
  agent VARCHAR(100),
  notes TEXT
)";

const SUPPORT: &str = r#"
[entities.customer]
table = "customers"
key = "cust_no"
match = ["email"]
[entities.customer.fields]
name = "name"
email = "email"
phone = "phone"
address = "address"
tier = { column = "tier", values = { bronze = "B", silver = "S", gold = "G" } }
amount_paid = { column = "amount", scale = 2 }
language = "language"
delivery_status = "status"
open_tickets = "tickets"
support_agent = "agent"
delivery_notes = "notes"
"#;

const DELIVERY_SCHEMA: &str = "
CREATE TABLE stops (
  stop_id TEXT PRIMARY KEY,
  customer_name TEXT,
  addr TEXT,
  phone TEXT,
  language TEXT,
  status TEXT,
  warehouse TEXT,
  notes TEXT
)";

const DELIVERY: &str = r#"
[entities.customer]
table = "stops"
key = "stop_id"
key_source = "canonical"
[entities.customer.fields]
name = "customer_name"
address = "addr"
phone = "phone"
language = "language"
delivery_status = "status"
warehouse = "warehouse"
delivery_notes = "notes"
"#;

/// Three databases, their adapters, the bus. Fields drop in reverse order: the adapters close
/// before their databases are dropped.
struct Seed {
    bus: TestBus,
    orders: SqlSystem,
    support: SqlSystem,
    delivery: SqlSystem,
    orders_db: TestDb,
    support_db: TestDb,
    delivery_db: TestDb,
}

impl Seed {
    async fn start(tag: &str) -> anyhow::Result<Seed> {
        let (policy, entities) = seed();
        let orders_db = TestDb::postgres(tag).await?;
        let support_db = TestDb::mariadb(tag).await?;
        let delivery_db = TestDb::sqlite(tag).await?;
        orders_db.exec(ORDERS_SCHEMA).await?;
        support_db.exec(SUPPORT_SCHEMA).await?;
        delivery_db.exec(DELIVERY_SCHEMA).await?;
        let orders = adapter(&orders_db, ORDERS, &entities).await?;
        let support = adapter(&support_db, SUPPORT, &entities).await?;
        let delivery = adapter(&delivery_db, DELIVERY, &entities).await?;
        let mut bus = TestBus::new(policy);
        bus.add("orders", orders.clone()).await?;
        bus.add("support", support.clone()).await?;
        bus.add("delivery", delivery.clone()).await?;
        Ok(Seed {
            bus,
            orders,
            support,
            delivery,
            orders_db,
            support_db,
            delivery_db,
        })
    }

    async fn settle(&mut self) -> anyhow::Result<()> {
        let (o, s, d) = (
            self.orders.clone(),
            self.support.clone(),
            self.delivery.clone(),
        );
        settle(&mut self.bus, &[&o, &s, &d]).await
    }

    /// orders signs up Ada with plain SQL; returns her id in orders.
    async fn sign_up_ada(&mut self) -> anyhow::Result<String> {
        self.orders_db
            .exec(
                r#"INSERT INTO clients (full_name, email, phone, address, tier, paid, lang)
                   VALUES ('Ada Lovelace', 'ada@example.com', '+44 1', '{"street": "1 Main St", "city": "London"}', 'gold', 125.50, 'en')"#,
            )
            .await?;
        self.settle().await?;
        Ok(self
            .orders_db
            .value("SELECT CAST(id AS TEXT) FROM clients WHERE email = 'ada@example.com'")
            .await?
            .unwrap())
    }

    async fn close(self) {
        self.orders.close().await;
        self.support.close().await;
        self.delivery.close().await;
    }
}

#[tokio::test]
async fn an_edit_in_postgres_reaches_mariadb_and_sqlite_with_only_the_visible_fields()
-> anyhow::Result<()> {
    let mut s = Seed::start("visible").await?;
    s.sign_up_ada().await?;

    // Support (MariaDB) sees everything orders holds, in its own columns and codes.
    let row = s
        .support_db
        .rows("SELECT name, email, phone, CAST(address AS CHAR), tier, CAST(amount AS CHAR), language FROM customers")
        .await?;
    assert_eq!(row.len(), 1, "{row:?}");
    let r = &row[0];
    assert_eq!(r[0].as_deref(), Some("Ada Lovelace"));
    assert_eq!(r[1].as_deref(), Some("ada@example.com"));
    assert_eq!(r[2].as_deref(), Some("+44 1"));
    let address: serde_json::Value = serde_json::from_str(r[3].as_deref().unwrap())?;
    assert_eq!(
        address,
        serde_json::json!({"street": "1 Main St", "city": "London"})
    );
    assert_eq!(r[4].as_deref(), Some("G"), "gold through the values map");
    assert_eq!(r[5].as_deref(), Some("125.50"), "minor units and back");
    assert_eq!(r[6].as_deref(), Some("en"));

    // Delivery (SQLite) gets the name, the address and the phone, never the email or the
    // amount (it has no such columns, and the router never sends them), keyed by the canonical key.
    let row = s
        .delivery_db
        .rows("SELECT stop_id, customer_name, addr, phone, warehouse FROM stops")
        .await?;
    assert_eq!(row.len(), 1, "{row:?}");
    let key = row[0][0].clone().unwrap();
    assert_eq!(key.len(), 36, "a canonical key: {key}");
    assert_eq!(row[0][1].as_deref(), Some("Ada Lovelace"));
    assert!(row[0][2].as_deref().unwrap().contains("London"));
    assert_eq!(row[0][3].as_deref(), Some("+44 1"));
    assert_eq!(row[0][4], None);
    let to_delivery = s.bus.delivered("delivery");
    assert!(
        to_delivery.iter().all(|ev| !ev
            .field_mask
            .iter()
            .any(|f| f == "email" || f == "amount_paid")),
        "delivery never receives the email or the amount"
    );

    // A later edit in orders follows; an edit of a field nobody else sees stays in orders.
    s.orders_db
        .exec("UPDATE clients SET phone = '+44 2', updated_at = now() WHERE email = 'ada@example.com'")
        .await?;
    s.settle().await?;
    assert_eq!(
        s.support_db
            .value("SELECT phone FROM customers")
            .await?
            .as_deref(),
        Some("+44 2")
    );
    assert_eq!(
        s.delivery_db
            .value("SELECT phone FROM stops")
            .await?
            .as_deref(),
        Some("+44 2")
    );
    s.close().await;
    Ok(())
}

#[tokio::test]
async fn mariadb_reaches_postgres_the_owner_wins_and_a_non_owners_edit_is_written_back()
-> anyhow::Result<()> {
    let mut s = Seed::start("owner").await?;
    let id = s.sign_up_ada().await?;

    // Support owns the tickets and the agent: they reach orders (PostgreSQL).
    s.support_db
        .exec("UPDATE customers SET tickets = 2, agent = 'Grace' WHERE email = 'ada@example.com'")
        .await?;
    // Delivery owns the status: it reaches orders and support.
    s.delivery_db
        .exec("UPDATE stops SET status = 'out_for_delivery', warehouse = 'W1'")
        .await?;
    s.settle().await?;
    let row = s
        .orders_db
        .rows(&format!(
            "SELECT CAST(tickets AS TEXT), agent, delivery_state FROM clients WHERE id = {id}"
        ))
        .await?;
    assert_eq!(
        row[0],
        [
            Some("2".into()),
            Some("Grace".into()),
            Some("out_for_delivery".into())
        ]
    );
    assert_eq!(
        s.support_db
            .value("SELECT status FROM customers")
            .await?
            .as_deref(),
        Some("out_for_delivery")
    );

    // Support edits the name, which orders owns: the edit does not spread, and support's row
    // gets the owner's value back.
    let published = s.bus.published("support").len();
    s.support_db
        .exec("UPDATE customers SET name = 'Ada L.' WHERE email = 'ada@example.com'")
        .await?;
    s.settle().await?;
    assert_eq!(
        s.support_db
            .value("SELECT name FROM customers")
            .await?
            .as_deref(),
        Some("Ada Lovelace"),
        "written back"
    );
    assert_eq!(
        s.orders_db
            .value(&format!("SELECT full_name FROM clients WHERE id = {id}"))
            .await?
            .as_deref(),
        Some("Ada Lovelace")
    );
    assert_eq!(
        s.delivery_db
            .value("SELECT customer_name FROM stops")
            .await?
            .as_deref(),
        Some("Ada Lovelace")
    );
    assert_eq!(s.bus.metrics("support").corrections, 1);
    assert!(s.bus.published("support").len() <= published + 1);

    // The phone has two owners, last writer wins: support's later edit reaches everyone.
    s.support_db
        .exec("UPDATE customers SET phone = '+44 9' WHERE email = 'ada@example.com'")
        .await?;
    s.settle().await?;
    assert_eq!(
        s.orders_db
            .value(&format!("SELECT phone FROM clients WHERE id = {id}"))
            .await?
            .as_deref(),
        Some("+44 9")
    );
    assert_eq!(
        s.delivery_db
            .value("SELECT phone FROM stops")
            .await?
            .as_deref(),
        Some("+44 9")
    );
    s.close().await;
    Ok(())
}

#[tokio::test]
async fn deletes_follow_the_policy() -> anyhow::Result<()> {
    let mut s = Seed::start("deletes").await?;
    let id = s.sign_up_ada().await?;
    s.orders_db
        .exec("INSERT INTO clients (full_name, email) VALUES ('Grace Hopper', 'grace@example.com')")
        .await?;
    s.settle().await?;
    assert_eq!(
        s.support_db
            .value("SELECT CAST(COUNT(*) AS CHAR) FROM customers")
            .await?
            .as_deref(),
        Some("2")
    );

    // Support may not delete customers: its delete does not spread.
    s.support_db
        .exec("DELETE FROM customers WHERE email = 'grace@example.com'")
        .await?;
    s.settle().await?;
    assert_eq!(
        s.orders_db
            .value("SELECT CAST(COUNT(*) AS TEXT) FROM clients")
            .await?
            .as_deref(),
        Some("2")
    );
    assert_eq!(
        s.delivery_db
            .value("SELECT CAST(COUNT(*) AS TEXT) FROM stops")
            .await?
            .as_deref(),
        Some("2")
    );

    // Orders may: Ada goes everywhere.
    s.orders_db
        .exec(&format!("DELETE FROM clients WHERE id = {id}"))
        .await?;
    s.settle().await?;
    assert_eq!(
        s.support_db
            .value("SELECT CAST(COUNT(*) AS CHAR) FROM customers WHERE email = 'ada@example.com'")
            .await?
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        s.delivery_db
            .value("SELECT CAST(COUNT(*) AS TEXT) FROM stops WHERE customer_name = 'Ada Lovelace'")
            .await?
            .as_deref(),
        Some("0")
    );
    s.close().await;
    Ok(())
}

#[tokio::test]
async fn a_record_first_seen_from_another_system_is_linked_by_its_email() -> anyhow::Result<()> {
    let mut s = Seed::start("match").await?;
    // Support already has Ada (entered by an agent before Concord was installed).
    s.support_db
        .exec("SET @concord_origin = 'sync'; INSERT INTO customers (name, email, notes) VALUES ('A. Lovelace', 'ada@example.com', 'VIP'); SET @concord_origin = NULL")
        .await?;
    s.sign_up_ada().await?;
    let rows = s
        .support_db
        .rows("SELECT name, notes FROM customers WHERE email = 'ada@example.com'")
        .await?;
    assert_eq!(
        rows,
        [[Some("Ada Lovelace".into()), Some("VIP".into())]],
        "linked, not inserted again"
    );
    s.close().await;
    Ok(())
}

#[tokio::test]
async fn no_echo_after_a_burst_every_change_log_drains_and_nothing_more_is_published()
-> anyhow::Result<()> {
    let mut s = Seed::start("echo").await?;
    s.sign_up_ada().await?;
    for i in 0..10 {
        s.orders_db
            .exec(&format!(
                "UPDATE clients SET phone = '+1 {i}', lang = 'l{i}'; INSERT INTO clients (full_name, email) VALUES ('C{i}', 'c{i}@example.com')"
            ))
            .await?;
        s.support_db
            .exec(&format!(
                "UPDATE customers SET tickets = {i}, agent = 'a{i}'"
            ))
            .await?;
        s.delivery_db
            .exec(&format!("UPDATE stops SET status = 's{i}', notes = 'n{i}'"))
            .await?;
    }
    s.settle().await?;
    for (name, system) in [
        ("orders", &s.orders),
        ("support", &s.support),
        ("delivery", &s.delivery),
    ] {
        assert_eq!(
            system.pending_changes().await?,
            0,
            "{name}'s change log drained"
        );
    }
    let published: Vec<usize> = ["orders", "support", "delivery"]
        .iter()
        .map(|n| s.bus.published(n).len())
        .collect();
    // Another read of every change log, another run: nothing new.
    for system in [&s.orders, &s.support, &s.delivery] {
        assert_eq!(system.caught_up().await?, 0);
    }
    let quiet = s.bus.run_until_quiet().await?;
    assert_eq!(quiet.messages, 0);
    let after: Vec<usize> = ["orders", "support", "delivery"]
        .iter()
        .map(|n| s.bus.published(n).len())
        .collect();
    assert_eq!(published, after);
    for (name, system) in [
        ("orders", &s.orders),
        ("support", &s.support),
        ("delivery", &s.delivery),
    ] {
        assert_eq!(
            system.pending_changes().await?,
            0,
            "{name}'s change log stays empty"
        );
    }
    // Every system converged on the last values.
    assert_eq!(
        s.delivery_db
            .rows("SELECT phone, language FROM stops WHERE customer_name = 'Ada Lovelace'")
            .await?,
        [[Some("+1 9".into()), Some("l9".into())]]
    );
    assert_eq!(
        s.orders_db
            .rows("SELECT CAST(tickets AS TEXT), delivery_state FROM clients WHERE email = 'ada@example.com'")
            .await?,
        [[Some("9".into()), Some("s9".into())]]
    );
    assert_eq!(
        s.support_db
            .value("SELECT CAST(COUNT(*) AS CHAR) FROM customers")
            .await?
            .as_deref(),
        Some("11")
    );
    s.close().await;
    Ok(())
}

#[tokio::test]
async fn an_unconvertible_value_is_dead_lettered_naming_the_record_and_others_keep_syncing()
-> anyhow::Result<()> {
    let mut s = Seed::start("unconvertible").await?;
    s.sign_up_ada().await?;
    // Support's tier column knows bronze, silver and gold: not platinum.
    s.orders_db
        .exec("INSERT INTO clients (full_name, email, tier) VALUES ('Grace Hopper', 'grace@example.com', 'platinum'); INSERT INTO clients (full_name, email, tier) VALUES ('Alan Turing', 'alan@example.com', 'silver'); UPDATE clients SET tier = 'silver' WHERE email = 'ada@example.com'")
        .await?;
    s.settle().await?;
    let dead = s.bus.dead_lettered("support");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "apply_failed");
    let detail = &dead[0].detail;
    assert!(
        detail.contains("table customers")
            && detail.contains("field tier")
            && detail.contains("\"platinum\" has no column value"),
        "{detail}"
    );
    // The others synced: Alan arrived, Ada's tier changed, and Grace reached delivery.
    assert_eq!(
        s.support_db
            .rows("SELECT email, tier FROM customers ORDER BY email")
            .await?,
        [
            [Some("ada@example.com".into()), Some("S".into())],
            [Some("alan@example.com".into()), Some("S".into())],
        ]
    );
    assert_eq!(
        s.delivery_db
            .value("SELECT CAST(COUNT(*) AS TEXT) FROM stops")
            .await?
            .as_deref(),
        Some("3")
    );
    s.close().await;
    Ok(())
}
