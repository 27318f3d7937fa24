//! Type round trips on the three databases: a record with a value for every supported
//! conversion (text, integers of every width, decimals as minor units and as text, floats,
//! booleans, timestamps as `google.protobuf.Timestamp` and as RFC 3339 text, dates, enums by
//! name and by number, value maps, JSON columns holding messages and lists, JSON text, bytes) is
//! applied through the adapter and read back through its feed's reader (a snapshot) unchanged;
//! every column cleared reads back cleared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;

use common::{TestDb, adapter};
use concord_adapter::{Apply, ApplyOp, Fields, SystemAdapter};
use concord_sql::SqlSystem;
use concord_sql::config::Family;
use futures::StreamExt;
use proptest::prelude::*;
use prost_reflect::{DynamicMessage, MessageDescriptor, Value};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn sample() -> MessageDescriptor {
    static M: std::sync::OnceLock<MessageDescriptor> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let schema =
            concord_schema::Schema::compile(&[dir.join("types.proto")], &[dir.as_path()]).unwrap();
        schema
            .pool()
            .get_message_by_name("sqltest.v1.Sample")
            .unwrap()
    })
    .clone()
}

fn schema(family: Family) -> &'static str {
    match family {
        Family::Postgres => {
            r#"CREATE TABLE samples (id BIGSERIAL PRIMARY KEY, text TEXT, i32 INTEGER, i64 BIGINT,
               u32 BIGINT, u64 NUMERIC(20, 0), flag BOOLEAN, "real" DOUBLE PRECISION, real32 REAL,
               cents NUMERIC(18, 2), amount NUMERIC(18, 4), at TIMESTAMPTZ, at_text TIMESTAMP,
               day DATE, level TEXT, level_code SMALLINT, status TEXT, active CHAR(1), part JSONB,
               parts JSON, blob BYTEA, doc JSONB)"#
        }
        Family::MySql => {
            r#"CREATE TABLE samples (id BIGINT AUTO_INCREMENT PRIMARY KEY, text TEXT, i32 INT, i64 BIGINT,
               u32 INT UNSIGNED, u64 BIGINT UNSIGNED, flag BOOLEAN, `real` DOUBLE, real32 FLOAT,
               cents DECIMAL(18, 2), amount DECIMAL(18, 4), at DATETIME(6), at_text TIMESTAMP(6) NULL,
               day DATE, level ENUM('LOW', 'HIGH'), level_code TINYINT, status CHAR(1), active CHAR(1),
               part JSON, parts LONGTEXT, `blob` BLOB, doc JSON)"#
        }
        Family::Sqlite => {
            r#"CREATE TABLE samples (id INTEGER PRIMARY KEY, text TEXT, i32 INTEGER, i64 INTEGER,
               u32 INTEGER, u64 INTEGER, flag BOOLEAN, "real" REAL, real32 REAL,
               cents DECIMAL(18, 2), amount DECIMAL(18, 4), at DATETIME, at_text TIMESTAMP,
               day DATE, level TEXT, level_code INTEGER, status TEXT, active TEXT, part JSON,
               parts TEXT, blob BLOB, doc JSON)"#
        }
    }
}

const CONFIG: &str = r#"
[entities.sample]
table = "samples"
key = "id"
[entities.sample.fields]
text = "text"
i32 = "i32"
i64 = "i64"
u32 = "u32"
u64 = "u64"
flag = "flag"
real = "real"
real32 = "real32"
cents = { column = "cents", scale = 2 }
amount = "amount"
at = "at"
at_text = "at_text"
day = "day"
level = "level"
level_code = "level_code"
status = { column = "status", values = { open = "O", closed = "C" } }
active = { column = "active", values = { "true" = "Y", "false" = "N" } }
part = "part"
parts = "parts"
blob = "blob"
doc = "doc"
"#;

/// One generated record, in plain values.
#[derive(Debug, Clone)]
struct Record {
    text: String,
    i32: i32,
    i64: i64,
    u32: u32,
    u64: u64,
    flag: bool,
    real: f64,
    real32: f32,
    cents: i64,
    amount: (i64, u16),
    at_micros: i64,
    at_text_secs: i64,
    day: i32,
    level: i32,
    level_code: i32,
    status: bool,
    active: bool,
    parts: Vec<(String, u32, i64)>,
    blob: Vec<u8>,
    doc: BTreeMap<String, i64>,
}

fn record(family: Family) -> impl Strategy<Value = Record> {
    let sqlite = family == Family::Sqlite;
    let mysql = family == Family::MySql;
    // SQLite keeps decimals in 15 significant digits and integers in 64 signed bits; MySQL's
    // TIMESTAMP ends in 2038.
    let cents = if sqlite {
        10_i64.pow(13)
    } else {
        10_i64.pow(15)
    };
    let u64_max = if sqlite { i64::MAX as u64 } else { u64::MAX };
    let at_text_max = if mysql { 2_147_483_000 } else { 4_102_444_800 };
    let part = ("[a-zA-Z0-9 -]{0,12}", any::<u32>(), any::<i64>());
    (
        (
            "[^\u{0}]{0,40}",
            any::<i32>(),
            any::<i64>(),
            any::<u32>(),
            0..=u64_max,
            any::<bool>(),
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
            any::<f32>().prop_filter("finite", |f| f.is_finite()),
            -cents..cents,
            (-999_999_999_i64..999_999_999, 0_u16..10_000),
        ),
        (
            // 1900-01-01 .. 2200-01-01, microseconds.
            -2_208_988_800_000_000_i64..7_258_118_400_000_000,
            86_400_i64..at_text_max,
            // 1900 .. 2100, days from the epoch.
            -25_567_i32..47_482,
            1_i32..=2,
            0_i32..=2,
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(part, 0..3),
            proptest::collection::vec(any::<u8>(), 0..32),
            proptest::collection::btree_map("[a-z]{1,5}", any::<i64>(), 0..4),
        ),
    )
        .prop_map(
            |(
                (text, i32, i64, u32, u64, flag, real, real32, cents, amount),
                (at_micros, at_text_secs, day, level, level_code, status, active, parts, blob, doc),
            )| Record {
                text,
                i32,
                i64,
                u32,
                u64,
                flag,
                real,
                real32,
                cents,
                amount,
                at_micros,
                at_text_secs,
                day,
                level,
                level_code,
                status,
                active,
                parts,
                blob,
                doc,
            },
        )
}

fn message_value(m: &MessageDescriptor, field: &str, set: &[(&str, Value)]) -> Value {
    let kind = m.get_field_by_name(field).unwrap().kind();
    let mut msg = DynamicMessage::new(kind.as_message().unwrap().clone());
    for (k, v) in set {
        msg.set_field_by_name(k, v.clone());
    }
    Value::Message(msg)
}

fn fields(r: &Record) -> Fields {
    let m = sample();
    let s = |v: &str| Some(Value::String(v.to_owned()));
    let at = message_value(
        &m,
        "at",
        &[
            ("seconds", Value::I64(r.at_micros.div_euclid(1_000_000))),
            (
                "nanos",
                Value::I32(i32::try_from(r.at_micros.rem_euclid(1_000_000) * 1000).unwrap()),
            ),
        ],
    );
    let at_text = OffsetDateTime::from_unix_timestamp(r.at_text_secs)
        .unwrap()
        .format(&Rfc3339)
        .unwrap();
    let day = (time::Date::from_calendar_date(1970, time::Month::January, 1).unwrap()
        + time::Duration::days(i64::from(r.day)))
    .to_string();
    let parts: Vec<Value> = r
        .parts
        .iter()
        .map(|(sku, q, p)| {
            message_value(
                &m,
                "part",
                &[
                    ("sku", Value::String(sku.clone())),
                    ("quantity", Value::U32(*q)),
                    ("price", Value::I64(*p)),
                ],
            )
        })
        .collect();
    let part = parts
        .first()
        .cloned()
        .unwrap_or_else(|| message_value(&m, "part", &[]));
    let mut out = Fields::new();
    out.insert("text".into(), s(&r.text));
    out.insert("i32".into(), Some(Value::I32(r.i32)));
    out.insert("i64".into(), Some(Value::I64(r.i64)));
    out.insert("u32".into(), Some(Value::U32(r.u32)));
    out.insert("u64".into(), Some(Value::U64(r.u64)));
    out.insert("flag".into(), Some(Value::Bool(r.flag)));
    out.insert("real".into(), Some(Value::F64(r.real)));
    out.insert("real32".into(), Some(Value::F32(r.real32)));
    out.insert("cents".into(), Some(Value::I64(r.cents)));
    let (int, frac) = r.amount;
    out.insert("amount".into(), s(&format!("{int}.{frac:04}")));
    out.insert("at".into(), Some(at));
    out.insert("at_text".into(), s(&at_text));
    out.insert("day".into(), s(&day));
    out.insert("level".into(), Some(Value::EnumNumber(r.level)));
    out.insert("level_code".into(), Some(Value::EnumNumber(r.level_code)));
    out.insert("status".into(), s(if r.status { "open" } else { "closed" }));
    out.insert("active".into(), Some(Value::Bool(r.active)));
    out.insert("part".into(), Some(part));
    out.insert("parts".into(), Some(Value::List(parts)));
    out.insert("blob".into(), Some(Value::Bytes(r.blob.clone().into())));
    out.insert("doc".into(), s(&serde_json::to_string(&r.doc).unwrap()));
    out
}

fn apply(key: &str, event: &str, local_id: Option<String>, op: ApplyOp, fields: Fields) -> Apply {
    Apply {
        entity: "sample".into(),
        key: key.into(),
        local_id,
        op,
        fields,
        event_id: event.into(),
        origin: "elsewhere".into(),
        message: sample(),
    }
}

/// The record the adapter reads back for `local_id` (a snapshot reads every row).
async fn read_back(sys: &SqlSystem, local_id: &str) -> Fields {
    let items: Vec<_> = sys.snapshot().collect().await;
    let mut found = None;
    for item in items {
        let c = item.unwrap();
        if c.local_id == local_id {
            found = Some(c.fields);
        }
    }
    found.unwrap()
}

/// Decimals compare by value where the database does not keep the text (SQLite).
fn same(family: Family, sent: &Fields, got: &Fields) -> Result<(), TestCaseError> {
    for (name, value) in sent {
        let back = got.get(name).cloned().flatten();
        if family == Family::Sqlite
            && name == "amount"
            && let (Some(Value::String(a)), Some(Value::String(b))) = (value, &back)
        {
            prop_assert_eq!(Decimal::from_str(a).unwrap(), Decimal::from_str(b).unwrap());
            continue;
        }
        prop_assert_eq!(value, &back, "field {}", name);
    }
    Ok(())
}

fn round_trips(family: Family) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (db, sys) = rt.block_on(async {
        let db = TestDb::new(family, "types").await.unwrap();
        db.exec(schema(family)).await.unwrap();
        let entities = BTreeMap::from([("sample".to_owned(), sample())]);
        let sys = adapter(&db, CONFIG, &entities).await.unwrap();
        (db, sys)
    });
    let counter = std::sync::atomic::AtomicU32::new(0);
    let config = ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(r in record(family))| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sent = fields(&r);
        rt.block_on(async {
            let id = sys
                .apply(&apply("k", &format!("create-{n}"), None, ApplyOp::Upsert, sent.clone()))
                .await
                .unwrap()
                .local_id;
            same(family, &sent, &read_back(&sys, &id).await)?;
            // Every column cleared reads back cleared.
            let cleared: Fields = sent.keys().map(|k| (k.clone(), None)).collect();
            sys.apply(&apply("k", &format!("clear-{n}"), Some(id.clone()), ApplyOp::Upsert, cleared))
                .await
                .unwrap();
            let got = read_back(&sys, &id).await;
            for (name, value) in &got {
                let empty = match value {
                    None => true,
                    Some(Value::List(l)) => l.is_empty(),
                    _ => false,
                };
                prop_assert!(empty, "{} = {:?} after clearing", name, value);
            }
            sys.apply(&apply("k", &format!("delete-{n}"), Some(id), ApplyOp::Delete, Fields::new()))
                .await
                .unwrap();
            Ok(())
        })?;
    });
    rt.block_on(async {
        assert_eq!(sys.pending_changes().await.unwrap(), 0);
        sys.close().await;
    });
    drop(db);
}

#[test]
fn every_conversion_round_trips_on_postgres() {
    round_trips(Family::Postgres);
}

#[test]
fn every_conversion_round_trips_on_mariadb() {
    round_trips(Family::MySql);
}

#[test]
fn every_conversion_round_trips_on_sqlite() {
    round_trips(Family::Sqlite);
}
