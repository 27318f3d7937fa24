//! Applying incoming changes on the three databases: exactly once per event even when the SDK
//! calls again after a crash (the event-id table), creates with a generated, canonical or
//! natural key, links by match fields, a refused write is permanent and names the record, a
//! database that is gone is transient.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{TestDb, adapter, seed};
use concord_adapter::{Applied, Apply, ApplyOp, Fields, SystemAdapter};
use concord_sql::SqlSystem;
use concord_sql::config::Family;
use prost_reflect::{MessageDescriptor, Value};

const FAMILIES: [Family; 3] = [Family::Postgres, Family::MySql, Family::Sqlite];

fn schema(family: Family) -> &'static str {
    match family {
        Family::Postgres => {
            "CREATE TABLE clients (id SERIAL PRIMARY KEY, full_name TEXT NOT NULL, email TEXT UNIQUE, phone TEXT CHECK (length(phone) <= 8));
             CREATE TABLE contacts (region TEXT NOT NULL, number INTEGER NOT NULL, full_name TEXT, PRIMARY KEY (region, number));
             CREATE TABLE cards (card TEXT PRIMARY KEY, full_name TEXT)"
        }
        Family::MySql => {
            "CREATE TABLE clients (id INT AUTO_INCREMENT PRIMARY KEY, full_name VARCHAR(100) NOT NULL, email VARCHAR(100) UNIQUE, phone VARCHAR(8));
             CREATE TABLE contacts (region VARCHAR(10) NOT NULL, number INT NOT NULL, full_name VARCHAR(100), PRIMARY KEY (region, number));
             CREATE TABLE cards (card VARCHAR(64) PRIMARY KEY, full_name VARCHAR(100))"
        }
        Family::Sqlite => {
            "CREATE TABLE clients (id INTEGER PRIMARY KEY, full_name TEXT NOT NULL, email TEXT UNIQUE, phone TEXT CHECK (length(phone) <= 8));
             CREATE TABLE contacts (region TEXT NOT NULL, number INTEGER NOT NULL, full_name TEXT, PRIMARY KEY (region, number));
             CREATE TABLE cards (card TEXT PRIMARY KEY, full_name TEXT)"
        }
    }
}

/// One table per kind of key: generated (`clients`), canonical, natural and composite. The
/// entities are named as the policy's single entity would be, one adapter each.
fn config(table: &str) -> String {
    match table {
        "clients" => r#"
[entities.customer]
table = "clients"
key = "id"
match = ["email"]
[entities.customer.fields]
name = "full_name"
email = "email"
phone = "phone"
"#
        .into(),
        "contacts" => r#"
[entities.customer]
table = "contacts"
key = ["region", "number"]
key_source = "fields"
[entities.customer.fields]
language = "region"
open_tickets = "number"
name = "full_name"
"#
        .into(),
        _ => r#"
[entities.customer]
table = "cards"
key = "card"
key_source = "canonical"
[entities.customer.fields]
name = "full_name"
"#
        .into(),
    }
}

fn message(entities: &BTreeMap<String, MessageDescriptor>) -> MessageDescriptor {
    entities.get("customer").unwrap().clone()
}

fn change(
    m: &MessageDescriptor,
    event: &str,
    key: &str,
    local_id: Option<&str>,
    fields: &[(&str, Option<Value>)],
) -> Apply {
    Apply {
        entity: "customer".into(),
        key: key.into(),
        local_id: local_id.map(str::to_owned),
        op: ApplyOp::Upsert,
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<Fields>(),
        event_id: event.into(),
        origin: "orders".into(),
        message: m.clone(),
    }
}

fn text(s: &str) -> Option<Value> {
    Some(Value::String(s.into()))
}

async fn count(db: &TestDb, table: &str) -> anyhow::Result<String> {
    Ok(db
        .value(&format!(
            "SELECT CAST(COUNT(*) AS {}) FROM {table}",
            db.text_type()
        ))
        .await?
        .unwrap_or_default())
}

async fn exactly_once(family: Family) -> anyhow::Result<()> {
    let (_, entities) = seed();
    let m = message(&entities);
    let db = TestDb::new(family, "once").await?;
    db.exec(schema(family)).await?;
    let sys = adapter(&db, &config("clients"), &entities).await?;

    let create = change(
        &m,
        "e-1",
        "k-1",
        None,
        &[("name", text("Ada")), ("email", text("ada@x"))],
    );
    let Applied { local_id, .. } = sys.apply(&create).await?;
    // The SDK crashed before recording the apply: it calls again with the same change.
    let again = sys.apply(&create).await?;
    assert_eq!(again.local_id, local_id, "{family:?}");
    assert_eq!(
        count(&db, "clients").await?,
        "1",
        "{family:?}: not created twice"
    );
    // Another event creating another record does create.
    let other = change(
        &m,
        "e-2",
        "k-2",
        None,
        &[("name", text("Grace")), ("email", text("grace@x"))],
    );
    let grace = sys.apply(&other).await?.local_id;
    assert_ne!(grace, local_id);
    assert_eq!(count(&db, "clients").await?, "2");
    // The same event replayed with more fields (after a policy change) applies them, to the
    // same row.
    let more = change(
        &m,
        "e-1",
        "k-1",
        None,
        &[
            ("name", text("Ada")),
            ("email", text("ada@x")),
            ("phone", text("1")),
        ],
    );
    assert_eq!(sys.apply(&more).await?.local_id, local_id);
    assert_eq!(count(&db, "clients").await?, "2");
    assert_eq!(
        db.value(&format!("SELECT phone FROM clients WHERE id = {local_id}"))
            .await?
            .as_deref(),
        Some("1")
    );
    // A record first seen from another system with a known email links to that row.
    let linked = change(
        &m,
        "e-3",
        "k-3",
        None,
        &[("name", text("Grace H.")), ("email", text("grace@x"))],
    );
    assert_eq!(sys.apply(&linked).await?.local_id, grace);
    assert_eq!(count(&db, "clients").await?, "2");
    // A delete, twice.
    let mut delete = change(&m, "e-4", "k-2", Some(&grace), &[]);
    delete.op = ApplyOp::Delete;
    sys.apply(&delete).await?;
    sys.apply(&delete).await?;
    assert_eq!(count(&db, "clients").await?, "1");
    // An update of a row deleted locally (not reported yet) writes nothing: the delete wins.
    let late = change(&m, "e-5", "k-2", Some(&grace), &[("phone", text("2"))]);
    assert_eq!(sys.apply(&late).await?.local_id, grace);
    assert_eq!(count(&db, "clients").await?, "1");
    // None of it was captured.
    assert_eq!(sys.pending_changes().await?, 0);
    sys.close().await;
    Ok(())
}

#[tokio::test]
async fn an_event_applied_before_a_crash_is_applied_once() -> anyhow::Result<()> {
    for family in FAMILIES {
        exactly_once(family).await?;
    }
    Ok(())
}

async fn keys(family: Family) -> anyhow::Result<()> {
    let (_, entities) = seed();
    let m = message(&entities);
    let db = TestDb::new(family, "keys").await?;
    db.exec(schema(family)).await?;

    // A composite natural key: the local id is a JSON array, and it follows its fields.
    let contacts = adapter(&db, &config("contacts"), &entities).await?;
    let create = change(
        &m,
        "e-1",
        "k-1",
        None,
        &[
            ("language", text("eu")),
            ("open_tickets", Some(Value::U32(7))),
            ("name", text("Ada")),
        ],
    );
    let id = contacts.apply(&create).await?.local_id;
    assert_eq!(id, r#"["eu",7]"#);
    let moved = change(
        &m,
        "e-2",
        "k-1",
        Some(&id),
        &[("open_tickets", Some(Value::U32(8)))],
    );
    assert_eq!(contacts.apply(&moved).await?.local_id, r#"["eu",8]"#);
    // A record without a value for a key column cannot be created: permanent, named.
    let keyless = change(&m, "e-3", "k-2", None, &[("name", text("Grace"))]);
    let e = contacts.apply(&keyless).await.unwrap_err();
    assert!(!e.is_transient());
    let msg = e.to_string();
    assert!(
        msg.contains("table contacts")
            && msg.contains("record k-2")
            && msg.contains("key column region"),
        "{msg}"
    );
    contacts.close().await;

    // The canonical key as the key.
    let cards = adapter(&db, &config("cards"), &entities).await?;
    let create = change(&m, "e-1", "0190-abc", None, &[("name", text("Ada"))]);
    assert_eq!(cards.apply(&create).await?.local_id, "0190-abc");
    assert_eq!(
        db.value("SELECT full_name FROM cards WHERE card = '0190-abc'")
            .await?
            .as_deref(),
        Some("Ada")
    );
    cards.close().await;
    Ok(())
}

#[tokio::test]
async fn rows_are_created_with_generated_canonical_and_natural_keys() -> anyhow::Result<()> {
    for family in FAMILIES {
        keys(family).await?;
    }
    Ok(())
}

async fn refusals(family: Family) -> anyhow::Result<()> {
    let (_, entities) = seed();
    let m = message(&entities);
    let db = TestDb::new(family, "refused").await?;
    db.exec(schema(family)).await?;
    let sys = adapter(&db, &config("clients"), &entities).await?;
    let ada = sys
        .apply(&change(
            &m,
            "e-1",
            "k-1",
            None,
            &[("name", text("Ada")), ("email", text("ada@x"))],
        ))
        .await?
        .local_id;

    // A constraint the database enforces: NOT NULL.
    let cleared = change(&m, "e-2", "k-1", Some(&ada), &[("name", None)]);
    let e = sys.apply(&cleared).await.unwrap_err();
    assert!(!e.is_transient(), "{family:?}: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains("table clients")
            && msg.contains(&format!("key {ada}"))
            && msg.contains("record k-1"),
        "{msg}"
    );
    // A value the column cannot hold (too long for MariaDB's VARCHAR(8), a CHECK elsewhere).
    let bad = change(
        &m,
        "e-3",
        "k-1",
        Some(&ada),
        &[("phone", text("+44 20 7946 0000"))],
    );
    let e = sys.apply(&bad).await.unwrap_err();
    assert!(!e.is_transient(), "{family:?}: {e}");
    // The adapter goes on: the next change applies (and is not captured), a write of the
    // system's users is.
    sys.apply(&change(
        &m,
        "e-4",
        "k-1",
        Some(&ada),
        &[("phone", text("1"))],
    ))
    .await?;
    db.exec("UPDATE clients SET phone = '2'").await?;
    assert_eq!(sys.pending_changes().await?, 1);

    // The database gone: transient (the SDK retries, acks nothing), and /readyz says so.
    sys.close().await;
    let e = sys
        .apply(&change(
            &m,
            "e-5",
            "k-1",
            Some(&ada),
            &[("phone", text("3"))],
        ))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(sys.check().await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_refused_write_is_permanent_and_named_a_database_gone_is_transient() -> anyhow::Result<()>
{
    for family in FAMILIES {
        refusals(family).await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_unknown_entity_or_an_unconvertible_value_is_permanent() -> anyhow::Result<()> {
    let (_, entities) = seed();
    let m = message(&entities);
    let db = TestDb::sqlite("unknown").await?;
    db.exec(schema(Family::Sqlite)).await?;
    let sys: SqlSystem = adapter(&db, &config("contacts"), &entities).await?;
    let mut other = change(&m, "e-1", "k-1", None, &[]);
    other.entity = "order".into();
    let e = sys.apply(&other).await.unwrap_err();
    assert!(
        !e.is_transient() && e.to_string().contains("not mapped"),
        "{e}"
    );
    // open_tickets is a uint32: a string is not one of its values.
    let wrong = change(
        &m,
        "e-2",
        "k-1",
        None,
        &[("language", text("eu")), ("open_tickets", text("seven"))],
    );
    let e = sys.apply(&wrong).await.unwrap_err();
    assert!(
        !e.is_transient() && e.to_string().contains("field open_tickets"),
        "{e}"
    );
    sys.close().await;
    Ok(())
}

async fn batches(family: Family) -> anyhow::Result<()> {
    let (_, entities) = seed();
    let m = message(&entities);
    let db = TestDb::new(family, "batch").await?;
    db.exec(schema(family)).await?;
    let sys = adapter(&db, &config("clients"), &entities).await?;

    // Five changes the runner holds: the third breaks a constraint (the phone is too long), the
    // fourth names a row id that is no id of this table (refused before any write).
    let batch = vec![
        change(&m, "b-1", "k-1", None, &[("name", text("Ada"))]),
        change(&m, "b-2", "k-2", None, &[("name", text("Grace"))]),
        change(
            &m,
            "b-3",
            "k-3",
            None,
            &[("name", text("Edsger")), ("phone", text("+31 20 000 0000"))],
        ),
        change(
            &m,
            "b-4",
            "k-4",
            Some("not-a-number"),
            &[("name", text("Alan"))],
        ),
        change(&m, "b-5", "k-5", None, &[("name", text("Barbara"))]),
    ];
    let results = sys.apply_batch(&batch).await;
    assert_eq!(results.len(), 5, "{family:?}: {results:?}");
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(
        ok,
        [true, true, false, false, true],
        "{family:?}: {results:?}"
    );
    for r in &results {
        if let Err(e) = r {
            assert!(!e.is_transient(), "{family:?}: refused for good: {e}");
        }
    }
    assert!(
        results[2].as_ref().unwrap_err().to_string().contains("k-3"),
        "{family:?}: the refusal names the record"
    );
    assert_eq!(count(&db, "clients").await?, "3", "{family:?}");
    let ids: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|a| a.local_id.clone()))
        .collect();

    // The SDK crashed before recording the batch: the same batch again writes nothing twice.
    let again = sys.apply_batch(&batch).await;
    let again_ids: Vec<String> = again
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|a| a.local_id.clone()))
        .collect();
    assert_eq!(again_ids, ids, "{family:?}");
    assert_eq!(
        count(&db, "clients").await?,
        "3",
        "{family:?}: exactly once"
    );

    // A batch without a refused change is one transaction (PostgreSQL shows it: every row it
    // wrote carries the same transaction id).
    let good: Vec<Apply> = (6..=9)
        .map(|i| {
            change(
                &m,
                &format!("b-{i}"),
                &format!("k-{i}"),
                None,
                &[("name", text(&format!("n{i}")))],
            )
        })
        .collect();
    let results = sys.apply_batch(&good).await;
    assert!(results.iter().all(Result::is_ok), "{family:?}: {results:?}");
    assert_eq!(count(&db, "clients").await?, "7", "{family:?}");
    if family == Family::Postgres {
        let xids = db
            .value("SELECT CAST(COUNT(DISTINCT CAST(xmin AS TEXT)) AS TEXT) FROM clients WHERE full_name LIKE 'n%'")
            .await?;
        assert_eq!(xids.as_deref(), Some("1"), "one transaction");
    }
    // Applied by the batch, never captured as local edits.
    assert_eq!(sys.pending_changes().await?, 0, "{family:?}: no echo");

    // The database gone: the first change reports a transient failure, nothing else is tried.
    sys.close().await;
    let results = sys.apply_batch(&good).await;
    assert_eq!(results.len(), 1, "{family:?}");
    assert!(
        results[0].as_ref().unwrap_err().is_transient(),
        "{family:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_batch_is_one_transaction_and_a_refused_change_fails_alone() -> anyhow::Result<()> {
    for family in FAMILIES {
        batches(family).await?;
    }
    Ok(())
}
