//! Change capture: a change made while the adapter is stopped is published once when it comes
//! back; rows handed out but never confirmed are reported again by the next run; install and
//! uninstall are idempotent, and uninstall removes exactly what install created.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{TestDb, adapter, config, seed, settle};
use concord_adapter::SystemAdapter;
use concord_adapter::testkit::{MemorySystem, TestBus};
use concord_sql::SqlSystem;
use concord_sql::config::Family;
use futures::StreamExt;

const SCHEMA_PG: &str =
    "CREATE TABLE clients (id BIGSERIAL PRIMARY KEY, full_name TEXT, email TEXT, phone TEXT)";
const SCHEMA_MY: &str = "CREATE TABLE clients (id BIGINT AUTO_INCREMENT PRIMARY KEY, full_name VARCHAR(100), email VARCHAR(100), phone VARCHAR(40))";
const SCHEMA_LITE: &str =
    "CREATE TABLE clients (id INTEGER PRIMARY KEY, full_name TEXT, email TEXT, phone TEXT)";

const ORDERS: &str = r#"
[entities.customer]
table = "clients"
key = "id"
[entities.customer.fields]
name = "full_name"
email = "email"
phone = "phone"
"#;

fn schema(family: Family) -> &'static str {
    match family {
        Family::Postgres => SCHEMA_PG,
        Family::MySql => SCHEMA_MY,
        Family::Sqlite => SCHEMA_LITE,
    }
}

/// Orders on `family`, support in memory; orders' SDK state in a file that outlives its runs.
struct Run {
    bus: TestBus,
    support: MemorySystem,
    state: tempfile::TempDir,
    db: TestDb,
}

impl Run {
    async fn start(family: Family, tag: &str) -> anyhow::Result<(Run, SqlSystem)> {
        let (policy, entities) = seed();
        let db = TestDb::new(family, tag).await?;
        db.exec(schema(family)).await?;
        let orders = adapter(&db, ORDERS, &entities).await?;
        let state = tempfile::tempdir()?;
        let mut bus = TestBus::new(policy);
        bus.add_with_state(
            "orders",
            orders.clone(),
            &state.path().join("orders.sqlite"),
        )
        .await?;
        let support = MemorySystem::new("support");
        bus.add("support", support.clone()).await?;
        Ok((
            Run {
                bus,
                support,
                state,
                db,
            },
            orders,
        ))
    }

    /// Starts orders again (a new process: a new adapter, the same SDK state).
    async fn restart(&mut self) -> anyhow::Result<SqlSystem> {
        let (_, entities) = seed();
        let orders = SqlSystem::connect(&config(&self.db, ORDERS), &entities).await?;
        self.bus
            .add_with_state(
                "orders",
                orders.clone(),
                &self.state.path().join("orders.sqlite"),
            )
            .await?;
        Ok(orders)
    }

    fn phone_in_support(&self) -> Option<String> {
        let id = self.support.find("customer", "name", "Ada")?;
        match self.support.field("customer", &id, "phone")? {
            prost_reflect::Value::String(s) => Some(s),
            _ => None,
        }
    }
}

async fn stopped_adapter_catches_up(family: Family) -> anyhow::Result<()> {
    let (mut run, orders) = Run::start(family, "stopped").await?;
    run.db
        .exec(
            "INSERT INTO clients (full_name, email, phone) VALUES ('Ada', 'ada@example.com', '1')",
        )
        .await?;
    settle(&mut run.bus, &[&orders]).await?;
    assert_eq!(run.phone_in_support().as_deref(), Some("1"));
    assert_eq!(run.bus.published("orders").len(), 1);

    // The adapter stops; the system's users go on.
    run.bus.remove("orders").await?;
    orders.close().await;
    run.db.exec("UPDATE clients SET phone = '2'").await?;
    assert_eq!(run.phone_in_support().as_deref(), Some("1"));

    let orders = run.restart().await?;
    settle(&mut run.bus, &[&orders]).await?;
    assert_eq!(run.phone_in_support().as_deref(), Some("2"));
    assert_eq!(
        run.bus.published("orders").len(),
        1,
        "published once by the new run"
    );
    assert_eq!(run.support.applied().len(), 2, "applied once each");
    assert_eq!(orders.pending_changes().await?, 0);
    orders.close().await;
    Ok(())
}

#[tokio::test]
async fn a_change_made_while_the_adapter_is_stopped_is_published_once_when_it_is_back()
-> anyhow::Result<()> {
    for family in [Family::Postgres, Family::MySql, Family::Sqlite] {
        stopped_adapter_catches_up(family).await?;
    }
    Ok(())
}

#[tokio::test]
async fn rows_handed_out_but_never_confirmed_are_reported_again_by_the_next_run()
-> anyhow::Result<()> {
    let (mut run, orders) = Run::start(Family::Postgres, "handed").await?;
    run.db
        .exec(
            "INSERT INTO clients (full_name, email, phone) VALUES ('Ada', 'ada@example.com', '1')",
        )
        .await?;
    settle(&mut run.bus, &[&orders]).await?;
    run.bus.remove("orders").await?;
    orders.close().await;

    // A run reads the change, hands it out... and dies before the SDK commits it.
    run.db.exec("UPDATE clients SET phone = '2'").await?;
    let (_, entities) = seed();
    let doomed = SqlSystem::connect(&config(&run.db, ORDERS), &entities).await?;
    let mut feed = Box::pin(doomed.changes(None));
    let handed = feed.next().await.unwrap()?;
    assert_eq!(handed.local_id, "1");
    drop(feed);
    doomed.close().await;

    let orders = run.restart().await?;
    assert_eq!(
        orders.pending_changes().await?,
        1,
        "not deleted: never confirmed"
    );
    settle(&mut run.bus, &[&orders]).await?;
    assert_eq!(run.phone_in_support().as_deref(), Some("2"));
    assert_eq!(run.bus.published("orders").len(), 1);
    assert_eq!(orders.pending_changes().await?, 0);
    orders.close().await;
    Ok(())
}

/// Every object of the test database (tables, triggers, functions), by kind and name.
async fn objects(db: &TestDb) -> anyhow::Result<BTreeSet<String>> {
    let sql = match db.family {
        Family::Postgres => {
            "SELECT 'table ' || table_name::text FROM information_schema.tables WHERE table_schema = current_schema()
             UNION ALL SELECT 'trigger ' || tgname::text || ' on ' || tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal
             UNION ALL SELECT 'function ' || proname::text FROM pg_proc WHERE pronamespace = current_schema()::regnamespace
             UNION ALL SELECT 'index ' || indexname::text FROM pg_indexes WHERE schemaname = current_schema()"
        }
        Family::MySql => {
            "SELECT CAST(CONCAT('table ', TABLE_NAME) AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()
             UNION ALL SELECT CAST(CONCAT('trigger ', TRIGGER_NAME) AS CHAR) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
        }
        Family::Sqlite => "SELECT type || ' ' || name FROM sqlite_master",
    };
    Ok(db
        .rows(sql)
        .await?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect())
}

async fn install_uninstall(family: Family) -> anyhow::Result<()> {
    let (_, entities) = seed();
    let db = TestDb::new(family, "install").await?;
    db.exec(schema(family)).await?;
    // The system's own audit trigger: uninstall must leave it alone.
    let audit = match family {
        Family::Postgres => {
            "CREATE TABLE audit (n INT); CREATE FUNCTION audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit VALUES (1); RETURN NULL; END $$; CREATE TRIGGER concord_audit AFTER INSERT ON clients FOR EACH ROW EXECUTE FUNCTION audit_fn()"
        }
        Family::MySql => {
            "CREATE TABLE audit (n INT); CREATE TRIGGER concord_audit AFTER INSERT ON clients FOR EACH ROW INSERT INTO audit VALUES (1)"
        }
        Family::Sqlite => {
            "CREATE TABLE audit (n INT); CREATE TRIGGER concord_audit AFTER INSERT ON clients BEGIN INSERT INTO audit VALUES (1); END"
        }
    };
    db.exec(audit).await?;
    let before = objects(&db).await?;
    let system = SqlSystem::connect(&config(&db, ORDERS), &entities).await?;
    assert!(!system.installed().await?.is_empty(), "not installed yet");
    system.install().await?;
    let installed = objects(&db).await?;
    system.install().await?;
    assert_eq!(
        objects(&db).await?,
        installed,
        "installing twice changes nothing"
    );
    assert_eq!(system.installed().await?, Vec::new());
    assert!(installed.len() > before.len());
    assert!(installed.is_superset(&before));

    db.exec("INSERT INTO clients (full_name) VALUES ('Ada')")
        .await?;
    db.exec("UPDATE clients SET phone = '1'").await?;
    assert_eq!(system.pending_changes().await?, 2, "captured");
    // Configured with other key columns than installed: the capture must be installed again.
    let rekeyed = ORDERS.replace("key = \"id\"", "key = \"email\"\nkey_source = \"fields\"");
    let rekeyed = SqlSystem::connect(&config(&db, &rekeyed), &entities).await?;
    let stale = rekeyed.installed().await?;
    assert!(
        !stale.is_empty()
            && stale
                .iter()
                .all(|p| p.to_string().contains("records other key columns")),
        "{stale:?}"
    );
    rekeyed.close().await;

    system.uninstall().await?;
    assert_eq!(
        objects(&db).await?,
        before,
        "exactly what install created is gone"
    );
    system.uninstall().await?;
    assert_eq!(objects(&db).await?, before);
    let missing = system.installed().await?;
    assert!(
        missing
            .iter()
            .any(|p| p.to_string().contains("run `concord-sql install`")),
        "{missing:?}"
    );
    db.exec("INSERT INTO clients (full_name) VALUES ('Grace')")
        .await?;
    assert_eq!(
        db.value(&format!(
            "SELECT CAST(COUNT(*) AS {}) FROM audit",
            db.text_type()
        ))
        .await?
        .as_deref(),
        Some("2"),
        "the system's own trigger still works"
    );
    system.close().await;
    Ok(())
}

#[tokio::test]
async fn install_and_uninstall_are_idempotent_and_complete() -> anyhow::Result<()> {
    for family in [Family::Postgres, Family::MySql, Family::Sqlite] {
        install_uninstall(family).await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_adapters_own_writes_are_not_captured_and_the_users_are() -> anyhow::Result<()> {
    // An apply is not in the change log; a write of the system's users is.
    for family in [Family::Postgres, Family::MySql, Family::Sqlite] {
        let (policy, entities) = seed();
        let db = TestDb::new(family, "origin").await?;
        db.exec(schema(family)).await?;
        let orders = adapter(&db, ORDERS, &entities).await?;
        let mut bus = TestBus::new(policy);
        let support = MemorySystem::new("support");
        bus.add("orders", orders.clone()).await?;
        bus.add("support", support.clone()).await?;
        db.exec("INSERT INTO clients (full_name, phone) VALUES ('Ada', '1')")
            .await?;
        settle(&mut bus, &[&orders]).await?;
        // Support changes the phone (both own it): applied to orders, not captured.
        let id = support.find("customer", "name", "Ada").unwrap();
        support.edit(
            "customer",
            &id,
            [("phone", Some(prost_reflect::Value::String("2".into())))],
        );
        bus.run_until_quiet().await?;
        assert_eq!(
            db.value("SELECT phone FROM clients").await?.as_deref(),
            Some("2")
        );
        assert_eq!(
            orders.pending_changes().await?,
            0,
            "{family:?}: not captured"
        );
        db.exec("UPDATE clients SET email = 'ada@example.com'")
            .await?;
        assert_eq!(orders.pending_changes().await?, 1, "{family:?}: captured");
        settle(&mut bus, &[&orders]).await?;
        orders.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_default_the_database_fills_in_on_a_create_is_published() -> anyhow::Result<()> {
    // Support (SQLite) receives Ada from orders without a phone; its column's default is the
    // support desk's value, and support owns the phone too: orders gets it.
    let (policy, entities) = seed();
    let db = TestDb::sqlite("defaults").await?;
    db.exec("CREATE TABLE people (id INTEGER PRIMARY KEY, full_name TEXT, phone TEXT NOT NULL DEFAULT 'ask the desk')")
        .await?;
    let support = adapter(
        &db,
        r#"
[entities.customer]
table = "people"
key = "id"
[entities.customer.fields]
name = "full_name"
phone = "phone"
"#,
        &entities,
    )
    .await?;
    let orders = MemorySystem::new("orders");
    let mut bus = TestBus::new(policy);
    bus.add("orders", orders.clone()).await?;
    bus.add("support", support.clone()).await?;
    let ada = orders.create(
        "customer",
        [("name", concord_adapter::testkit::text("Ada"))],
    );
    settle(&mut bus, &[&support]).await?;
    assert_eq!(
        db.rows("SELECT full_name, phone FROM people").await?,
        [[Some("Ada".into()), Some("ask the desk".into())]]
    );
    assert_eq!(
        orders.field("customer", &ada, "phone"),
        Some(prost_reflect::Value::String("ask the desk".into()))
    );
    assert_eq!(bus.published("support").len(), 1);
    support.close().await;
    Ok(())
}

#[tokio::test]
async fn a_row_an_apply_wrote_after_it_was_read_is_read_again_before_it_is_handed_out()
-> anyhow::Result<()> {
    let (_, entities) = seed();
    let db = TestDb::sqlite("reread").await?;
    db.exec(SCHEMA_LITE).await?;
    let orders = adapter(&db, ORDERS, &entities).await?;
    db.exec("INSERT INTO clients (full_name, phone) VALUES ('Ada', '1')")
        .await?;
    let mut feed = Box::pin(orders.changes(None));
    // The feed reads the row (phone 1) and queues it...
    assert_eq!(orders.caught_up().await?, 1);
    // ...then an incoming change writes the row before the SDK takes the queued values.
    let m = entities.get("customer").unwrap().clone();
    orders
        .apply(&concord_adapter::Apply {
            entity: "customer".into(),
            key: "k-1".into(),
            local_id: Some("1".into()),
            op: concord_adapter::ApplyOp::Upsert,
            fields: [(
                "phone".to_owned(),
                Some(prost_reflect::Value::String("2".into())),
            )]
            .into(),
            event_id: "e-1".into(),
            origin: "support".into(),
            message: m,
        })
        .await?;
    // The SDK gets the row as it is now: the apply's value, never the older one.
    let change = feed.next().await.unwrap()?;
    assert_eq!(
        change.fields.get("phone"),
        Some(&Some(prost_reflect::Value::String("2".into())))
    );
    orders.close().await;
    Ok(())
}

#[tokio::test]
async fn postgres_notifications_wake_the_feed_at_once_and_the_others_poll() -> anyhow::Result<()> {
    for family in [Family::Postgres, Family::MySql, Family::Sqlite] {
        let (_, entities) = seed();
        let db = TestDb::new(family, "wake").await?;
        db.exec(schema(family)).await?;
        // PostgreSQL reads the change log on its own only every minute: a notification must
        // wake it. The others poll every 20 ms.
        let mut c = config(&db, ORDERS);
        c.listen_poll_ms = 60_000;
        let orders = SqlSystem::connect(&c, &entities).await?;
        orders.install().await?;
        let mut feed = Box::pin(orders.changes(None));
        assert_eq!(orders.caught_up().await?, 0, "the first read found nothing");
        db.exec("INSERT INTO clients (full_name) VALUES ('Ada')")
            .await?;
        let change = tokio::time::timeout(std::time::Duration::from_secs(20), feed.next())
            .await
            .map_err(|_| anyhow::anyhow!("{family:?}: the feed was not woken"))?
            .unwrap()?;
        assert_eq!(change.op, concord_adapter::LocalOp::Create);
        orders.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_backlog_larger_than_the_batch_is_read_without_waiting_for_the_poll() -> anyhow::Result<()>
{
    for family in [Family::Postgres, Family::MySql, Family::Sqlite] {
        let (_, entities) = seed();
        let db = TestDb::new(family, "backlog").await?;
        db.exec(schema(family)).await?;
        // Reads of at most 4 rows, and no poll for a minute: after a read that took all it
        // could, the feed must read on by itself (a bulk load commits no more notifications).
        let mut c = config(&db, ORDERS);
        c.batch = 4;
        c.poll_ms = 60_000;
        c.listen_poll_ms = 60_000;
        let orders = SqlSystem::connect(&c, &entities).await?;
        orders.install().await?;
        let values: Vec<String> = (0..20).map(|i| format!("('c{i}')")).collect();
        db.exec(&format!(
            "INSERT INTO clients (full_name) VALUES {}",
            values.join(", ")
        ))
        .await?;
        let feed = orders.changes(None).take(20).collect::<Vec<_>>();
        let changes = tokio::time::timeout(std::time::Duration::from_secs(20), feed)
            .await
            .map_err(|_| anyhow::anyhow!("{family:?}: the feed waited for the poll"))?;
        let mut ids = BTreeSet::new();
        for c in changes {
            ids.insert(c?.local_id);
        }
        assert_eq!(ids.len(), 20, "{family:?}: {ids:?}");
        orders.close().await;
    }
    Ok(())
}
