//! The seed scenario `docker compose up` runs (deploy/sql): each system's tables as its
//! `deploy/sql/<system>.sql` creates them, mapped by `deploy/sql/<system>.toml`, on a real
//! database of the family its URL names (orders on PostgreSQL, support on MariaDB, delivery on
//! SQLite). The capture installs, `check` finds nothing wrong with the mapping, and the
//! customers orders.sql inserts reach support and delivery through orders' first-start snapshot
//! (the SDK's test bus with the real router in between), with only the fields each may see.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{TestDb, seed, settle};
use concord_adapter::ProcessConfig;
use concord_adapter::testkit::TestBus;
use concord_policy::{Policy, SystemId};
use concord_sql::config::Family;
use concord_sql::mapping::Visibility;
use concord_sql::{SqlConfig, SqlSystem};
use prost_reflect::MessageDescriptor;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/sql")
        .join(file)
}

/// What the policy lets a system see (as `concord-sql check` asks it).
struct PolicyView<'a> {
    policy: &'a Policy,
    system: SystemId,
}

impl Visibility for PolicyView<'_> {
    fn sees(&self, entity: &str, field: &str) -> bool {
        self.seen(entity).iter().any(|f| f == field)
    }

    fn seen(&self, entity: &str) -> Vec<String> {
        let Some(e) = self.policy.entity(entity) else {
            return Vec::new();
        };
        let mut names: Vec<String> = e
            .names(e.visible_to(self.system))
            .chain(e.names(e.owned_by(self.system)))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// One system of the deployment: its database (created by its .sql file), its settings and its
/// adapter, installed and checked.
struct System {
    db: TestDb,
    adapter: SqlSystem,
    snapshot_on_first_start: bool,
}

async fn system(
    name: &str,
    policy: &Policy,
    entities: &BTreeMap<String, MessageDescriptor>,
) -> anyhow::Result<System> {
    let path = deploy(&format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)?;
    // As `concord-sql run` reads it: with concord-sql's own defaults.
    let config = ProcessConfig::<SqlConfig>::parse_with(
        &text,
        &path.display().to_string(),
        None,
        &concord_adapter::process::defaults::<SqlSystem>(),
    )?;
    assert_eq!(config.runner.system, name);
    // concord-sql applies a batch in one transaction: it takes 256 at a time unless told.
    assert_eq!(config.runner.prefetch, 256);
    let told = ProcessConfig::<SqlConfig>::parse_with(
        &format!("prefetch = 32\n{text}"),
        &path.display().to_string(),
        None,
        &concord_adapter::process::defaults::<SqlSystem>(),
    )?;
    assert_eq!(told.runner.prefetch, 32);
    let url = config.adapter.url.clone().expect("a database URL");
    let family = Family::of(&url).expect("a database family");
    let db = TestDb::new(family, &format!("deploy_{name}")).await?;
    db.exec(&std::fs::read_to_string(deploy(&format!("{name}.sql")))?)
        .await?;
    // The deployment's mapping, on this test's database.
    let mut sql = config.adapter.clone();
    sql.url = Some(db.url.clone());
    sql.url_env = None;
    let adapter = SqlSystem::connect(&sql, entities).await?;
    adapter.install().await?;
    let view = PolicyView {
        policy,
        system: policy.system_id(name).expect("in the policy"),
    };
    let problems = concord_sql::check(&sql, entities, Some(&view)).await?;
    assert!(
        problems.iter().all(|p| !p.is_error()),
        "{name}: {}",
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(System {
        db,
        adapter,
        snapshot_on_first_start: config.runner.snapshot_on_first_start,
    })
}

#[tokio::test]
async fn the_deployed_systems_sync_the_seeded_customers() -> anyhow::Result<()> {
    let (policy, entities) = seed();
    let orders = system("orders", &policy, &entities).await?;
    let support = system("support", &policy, &entities).await?;
    let delivery = system("delivery", &policy, &entities).await?;
    assert_eq!(orders.db.family, Family::Postgres);
    assert_eq!(support.db.family, Family::MySql);
    assert_eq!(delivery.db.family, Family::Sqlite);

    let mut bus = TestBus::new(policy.clone());
    let all = [
        ("orders", &orders),
        ("support", &support),
        ("delivery", &delivery),
    ];
    for (name, s) in all {
        bus.add(name, s.adapter.clone()).await?;
    }
    // What the runner does on the first start of a system configured so (its copies wait in
    // the other systems' inboxes, which the router declares for every system of the policy).
    for (name, _) in all.iter().filter(|(_, s)| s.snapshot_on_first_start) {
        let creator = policy.system_id(name).unwrap();
        assert!(
            policy.entity("customer").unwrap().create.contains(creator),
            "{name} snapshots on its first start but may not create customers"
        );
        assert_eq!(bus.snapshot(name).await?, 2, "{name}: the seeded customers");
    }
    let systems = [&orders.adapter, &support.adapter, &delivery.adapter];
    settle(&mut bus, &systems).await?;

    // Support holds both customers in its own columns and codes, the amount paid included.
    let rows = support
        .db
        .rows("SELECT name, email, tier, CAST(amount AS CHAR) FROM customers ORDER BY name")
        .await?;
    let rows: Vec<Vec<Option<&str>>> = rows
        .iter()
        .map(|r| r.iter().map(Option::as_deref).collect())
        .collect();
    assert_eq!(
        rows,
        [
            [
                Some("Ada Lovelace"),
                Some("ada@example.com"),
                Some("G"),
                Some("125.50")
            ],
            [
                Some("Grace Hopper"),
                Some("grace@example.com"),
                Some("S"),
                Some("48.00")
            ],
        ]
    );
    // The driver gets the names and addresses, keyed by the canonical key, never the email or
    // the amount (its table has no such column: the mapping cannot even hold them).
    let stops = delivery
        .db
        .rows("SELECT customer_name, addr, warehouse FROM stops ORDER BY customer_name")
        .await?;
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert_eq!(stops[0][0].as_deref(), Some("Ada Lovelace"));
    assert!(
        stops[0][1]
            .as_deref()
            .unwrap_or_default()
            .contains("London"),
        "{stops:?}"
    );
    assert_eq!(stops[0][2], None, "warehouse is delivery's own");
    for s in systems {
        s.close().await;
    }
    Ok(())
}
