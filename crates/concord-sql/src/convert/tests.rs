#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use proptest::prelude::*;
use prost_reflect::{DescriptorPool, MessageDescriptor};

use super::*;
use crate::config::FieldConfig;
use crate::schema::Column;

fn pool() -> DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("types.proto");
        std::fs::write(&path, include_str!("../../tests/fixtures/types.proto")).unwrap();
        concord_schema::Schema::compile(&[&path], &[dir.path()])
            .unwrap()
            .pool()
            .clone()
    })
    .clone()
}

fn sample() -> MessageDescriptor {
    pool().get_message_by_name("sqltest.v1.Sample").unwrap()
}

fn field(name: &str) -> FieldDescriptor {
    sample().get_field_by_name(name).unwrap()
}

fn column(kind: ColumnKind) -> Column {
    Column {
        name: "c".into(),
        kind,
        nullable: true,
        has_default: false,
        generated: false,
        declared: String::new(),
    }
}

fn spec() -> FieldConfig {
    FieldConfig {
        column: "c".into(),
        scale: None,
        values: None,
    }
}

fn plan_for(name: &str, kind: ColumnKind, spec: FieldConfig) -> Conversion {
    plan(&field(name), &column(kind), &spec).unwrap()
}

const INT64: ColumnKind = ColumnKind::Integer {
    bits: 64,
    unsigned: false,
};

/// `value` goes to the column and comes back unchanged; returns the column value.
fn round_trip(name: &str, conv: &Conversion, value: Value) -> SqlValue {
    let f = field(name);
    let sql = to_sql(conv, &f, Some(&value)).unwrap();
    let back = from_sql(conv, &f, sql.clone()).unwrap();
    assert_eq!(back, Some(value), "{name} via {sql:?}");
    sql
}

#[test]
fn conversions_are_chosen_from_the_field_and_the_column() {
    assert_eq!(plan_for("text", ColumnKind::Text, spec()), Conversion::Text);
    assert_eq!(plan_for("i32", INT64, spec()), Conversion::Integer);
    assert_eq!(
        plan_for("amount", ColumnKind::Decimal { scale: Some(2) }, spec()),
        Conversion::DecimalText
    );
    assert_eq!(
        plan_for("at", ColumnKind::Timestamp { tz: true }, spec()),
        Conversion::Timestamp
    );
    assert_eq!(
        plan_for("at_text", ColumnKind::Timestamp { tz: false }, spec()),
        Conversion::TimestampText
    );
    assert_eq!(
        plan_for("day", ColumnKind::Date, spec()),
        Conversion::DateText
    );
    assert_eq!(
        plan_for("level", ColumnKind::Text, spec()),
        Conversion::EnumName
    );
    assert_eq!(
        plan_for("level_code", INT64, spec()),
        Conversion::EnumNumber
    );
    assert_eq!(plan_for("part", ColumnKind::Json, spec()), Conversion::Json);
    assert_eq!(
        plan_for("parts", ColumnKind::Text, spec()),
        Conversion::Json
    );
    assert_eq!(
        plan_for("doc", ColumnKind::Json, spec()),
        Conversion::JsonText
    );
    assert_eq!(plan_for("flag", ColumnKind::Bool, spec()), Conversion::Bool);
    assert_eq!(
        plan_for("blob", ColumnKind::Bytes, spec()),
        Conversion::Bytes
    );
    let minor = FieldConfig {
        scale: Some(2),
        ..spec()
    };
    assert_eq!(
        plan_for(
            "cents",
            ColumnKind::Decimal { scale: Some(2) },
            minor.clone()
        ),
        Conversion::Minor { scale: 2 }
    );
    // What cannot work is refused, saying why.
    let e = plan(&field("flag"), &column(ColumnKind::Date), &spec()).unwrap_err();
    assert_eq!(e, "cannot store bool in a date column");
    let e = plan(
        &field("cents"),
        &column(ColumnKind::Decimal { scale: Some(1) }),
        &minor,
    )
    .unwrap_err();
    assert!(e.contains("keeps 1 decimals"), "{e}");
    let e = plan(
        &field("text"),
        &column(ColumnKind::Decimal { scale: None }),
        &minor,
    )
    .unwrap_err();
    assert!(e.contains("`scale` converts integers"), "{e}");
    let e = plan(
        &field("level"),
        &column(ColumnKind::Enum {
            type_name: None,
            values: vec!["LOW".into()],
        }),
        &spec(),
    )
    .unwrap_err();
    assert!(e.contains("lack HIGH"), "{e}");
    let bad_values = FieldConfig {
        values: Some(
            [
                ("LOUD".to_owned(), MapValue::Text("l".into())),
                ("LOW".to_owned(), MapValue::Int(1)),
            ]
            .into(),
        ),
        ..spec()
    };
    let e = plan(&field("level"), &column(ColumnKind::Text), &bad_values).unwrap_err();
    assert!(
        e.contains("\"LOUD\" is not a value of sqltest.v1.Level"),
        "{e}"
    );
    assert!(
        e.contains("1 (for \"LOW\") cannot be stored in a text column"),
        "{e}"
    );
}

#[test]
fn values_convert_both_ways() {
    round_trip("text", &Conversion::Text, Value::String("héllo".into()));
    assert_eq!(
        round_trip("u64", &Conversion::Integer, Value::U64(u64::MAX)),
        SqlValue::Decimal(Decimal::from(u64::MAX))
    );
    let minor = Conversion::Minor { scale: 2 };
    assert_eq!(
        round_trip("cents", &minor, Value::I64(12_550)),
        SqlValue::Decimal(Decimal::new(12_550, 2))
    );
    round_trip("cents", &minor, Value::I64(-1));
    round_trip(
        "amount",
        &Conversion::DecimalText,
        Value::String("12.50".into()),
    );
    round_trip("real", &Conversion::Float, Value::F64(0.1));
    round_trip("real32", &Conversion::Float, Value::F32(1.5));
    round_trip("flag", &Conversion::Bool, Value::Bool(true));
    round_trip(
        "at_text",
        &Conversion::TimestampText,
        Value::String("2024-05-01T14:00:00.25Z".into()),
    );
    round_trip(
        "day",
        &Conversion::DateText,
        Value::String("2024-02-29".into()),
    );
    assert_eq!(
        round_trip("level", &Conversion::EnumName, Value::EnumNumber(2)),
        SqlValue::Text("HIGH".into())
    );
    round_trip("level_code", &Conversion::EnumNumber, Value::EnumNumber(1));
    round_trip(
        "blob",
        &Conversion::Bytes,
        Value::Bytes(vec![0, 255].into()),
    );
    round_trip(
        "doc",
        &Conversion::JsonText,
        Value::String(r#"{"a":[1,2]}"#.into()),
    );

    let part = pool().get_message_by_name("sqltest.v1.Part").unwrap();
    let mut p = DynamicMessage::new(part);
    p.set_field_by_name("sku", Value::String("A-1".into()));
    p.set_field_by_name("price", Value::I64(250));
    let sql = round_trip("part", &Conversion::Json, Value::Message(p.clone()));
    assert_eq!(
        sql,
        SqlValue::Json(serde_json::json!({"sku": "A-1", "price": 250}))
    );
    let sql = round_trip(
        "parts",
        &Conversion::Json,
        Value::List(vec![Value::Message(p.clone()), Value::Message(p)]),
    );
    assert!(matches!(sql, SqlValue::Json(serde_json::Value::Array(a)) if a.len() == 2));
    // A JSON column stored as text reads back the same; unknown keys are ignored.
    let back = from_sql(
        &Conversion::Json,
        &field("part"),
        SqlValue::Text(r#"{"sku":"A-1","extra":true}"#.into()),
    )
    .unwrap();
    assert!(matches!(back, Some(Value::Message(_))));

    let ts = DynamicMessage::new(field("at").kind().as_message().unwrap().clone());
    let mut ts = ts;
    ts.set_field_by_name("seconds", Value::I64(-86_400));
    ts.set_field_by_name("nanos", Value::I32(5_000));
    round_trip("at", &Conversion::Timestamp, Value::Message(ts));
}

#[test]
fn value_maps_convert_both_ways_and_refuse_what_they_lack() {
    let values = |pairs: &[(&str, MapValue)]| FieldConfig {
        values: Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ),
        ..spec()
    };
    let conv = plan_for(
        "status",
        ColumnKind::Text,
        values(&[
            ("open", MapValue::Text("O".into())),
            ("closed", MapValue::Text("C".into())),
        ]),
    );
    assert_eq!(
        round_trip("status", &conv, Value::String("closed".into())),
        SqlValue::Text("C".into())
    );
    let e = to_sql(&conv, &field("status"), Some(&Value::String("lost".into()))).unwrap_err();
    assert!(e.0.contains("\"lost\" has no column value"), "{e}");
    let e = from_sql(&conv, &field("status"), SqlValue::Text("X".into())).unwrap_err();
    assert!(e.0.contains("\"X\" has no canonical value"), "{e}");

    let flags = plan_for(
        "active",
        ColumnKind::Text,
        values(&[
            ("true", MapValue::Text("Y".into())),
            ("false", MapValue::Text("N".into())),
        ]),
    );
    round_trip("active", &flags, Value::Bool(false));
    let levels = plan_for(
        "level",
        INT64,
        values(&[("LOW", MapValue::Int(10)), ("HIGH", MapValue::Int(20))]),
    );
    assert_eq!(
        round_trip("level", &levels, Value::EnumNumber(2)),
        SqlValue::Int(20)
    );
    // A boolean column read as 0/1 (MySQL's tinyint(1), SQLite) matches a boolean entry.
    let on_off = plan_for(
        "status",
        ColumnKind::Bool,
        values(&[("on", MapValue::Bool(true)), ("off", MapValue::Bool(false))]),
    );
    assert_eq!(
        from_sql(&on_off, &field("status"), SqlValue::Int(1)).unwrap(),
        Some(Value::String("on".into()))
    );
}

#[test]
fn unconvertible_values_say_why() {
    let e = from_sql(&Conversion::Integer, &field("i32"), SqlValue::Int(1 << 40)).unwrap_err();
    assert_eq!(e.0, "1099511627776 does not fit int32");
    let e = from_sql(&Conversion::Integer, &field("u32"), SqlValue::Int(-1)).unwrap_err();
    assert_eq!(e.0, "-1 does not fit uint32");
    let e = from_sql(
        &Conversion::Minor { scale: 2 },
        &field("cents"),
        SqlValue::Decimal(Decimal::new(12_345, 3)),
    )
    .unwrap_err();
    assert_eq!(e.0, "12.345 has more than 2 decimals");
    let e = to_sql(
        &Conversion::TimestampText,
        &field("at_text"),
        Some(&Value::String("yesterday".into())),
    )
    .unwrap_err();
    assert!(e.0.contains("not an RFC 3339 timestamp"), "{e}");
    let e = to_sql(
        &Conversion::DecimalText,
        &field("amount"),
        Some(&Value::String("12,5".into())),
    )
    .unwrap_err();
    assert!(e.0.contains("not a decimal"), "{e}");
    let e = from_sql(
        &Conversion::EnumName,
        &field("level"),
        SqlValue::Text("MEDIUM".into()),
    )
    .unwrap_err();
    assert!(
        e.0.contains("\"MEDIUM\" is not a value of sqltest.v1.Level"),
        "{e}"
    );
    let e = from_sql(&Conversion::Bool, &field("flag"), SqlValue::Int(7)).unwrap_err();
    assert!(e.0.contains("7 cannot be read as bool"), "{e}");
    let e = from_sql(
        &Conversion::Json,
        &field("part"),
        SqlValue::Text("{".into()),
    )
    .unwrap_err();
    assert!(e.0.contains("not a JSON document"), "{e}");
    // NULL clears, whatever the conversion.
    assert_eq!(
        from_sql(&Conversion::Integer, &field("i32"), SqlValue::Null).unwrap(),
        None
    );
    assert_eq!(
        to_sql(&Conversion::Integer, &field("i32"), None).unwrap(),
        SqlValue::Null
    );
}

#[test]
fn column_values_of_other_storage_classes_read_back() {
    // SQLite keeps a DECIMAL as an integer or a real, MySQL a boolean as 0/1.
    assert_eq!(
        from_sql(
            &Conversion::Minor { scale: 2 },
            &field("cents"),
            SqlValue::Float(12.34)
        )
        .unwrap(),
        Some(Value::I64(1234))
    );
    assert_eq!(
        from_sql(
            &Conversion::Minor { scale: 2 },
            &field("cents"),
            SqlValue::Int(12)
        )
        .unwrap(),
        Some(Value::I64(1200))
    );
    assert_eq!(
        from_sql(&Conversion::Bool, &field("flag"), SqlValue::Int(0)).unwrap(),
        Some(Value::Bool(false))
    );
    assert_eq!(
        from_sql(&Conversion::Integer, &field("i64"), SqlValue::Float(3.0)).unwrap(),
        Some(Value::I64(3))
    );
    assert_eq!(
        from_sql(
            &Conversion::DateText,
            &field("day"),
            SqlValue::Text("2024-01-31".into())
        )
        .unwrap(),
        Some(Value::String("2024-01-31".into()))
    );
}

proptest! {
    #[test]
    fn integers_round_trip(v in any::<i64>(), w in any::<u32>(), x in any::<i32>(), y in any::<u64>()) {
        round_trip("i64", &Conversion::Integer, Value::I64(v));
        round_trip("u32", &Conversion::Integer, Value::U32(w));
        round_trip("i32", &Conversion::Integer, Value::I32(x));
        round_trip("u64", &Conversion::Integer, Value::U64(y));
    }

    #[test]
    fn minor_units_round_trip(v in -(10_i64.pow(15))..10_i64.pow(15), scale in 0_u32..=6) {
        round_trip("cents", &Conversion::Minor { scale }, Value::I64(v));
        // And through a float column (SQLite's REAL) for amounts a double holds exactly.
        let d = Decimal::new(v, scale);
        if let Some(f) = d.to_f64() && v.abs() < 1 << 40 {
            prop_assert_eq!(
                from_sql(&Conversion::Minor { scale }, &field("cents"), SqlValue::Float(f)).unwrap(),
                Some(Value::I64(v))
            );
        }
    }

    #[test]
    fn timestamps_round_trip(secs in -62_135_596_800_i64..253_402_300_799, nanos in 0_i32..1_000_000_000) {
        let mut ts = DynamicMessage::new(field("at").kind().as_message().unwrap().clone());
        ts.set_field_by_name("seconds", Value::I64(secs));
        ts.set_field_by_name("nanos", Value::I32(nanos));
        round_trip("at", &Conversion::Timestamp, Value::Message(ts));
        let t = OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let text = t.format(&Rfc3339).unwrap();
        round_trip("at_text", &Conversion::TimestampText, Value::String(text));
    }

    #[test]
    fn strings_and_floats_round_trip(s in ".*", f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
        round_trip("text", &Conversion::Text, Value::String(s));
        round_trip("real", &Conversion::Float, Value::F64(f));
    }
}

#[test]
fn values_take_the_one_type_their_column_binds() {
    let unsigned = ColumnKind::Integer {
        bits: 64,
        unsigned: true,
    };
    assert_eq!(
        for_column(SqlValue::Int(5), &unsigned).unwrap(),
        SqlValue::Decimal(Decimal::from(5))
    );
    assert_eq!(
        for_column(SqlValue::Decimal(Decimal::from(7)), &INT64).unwrap(),
        SqlValue::Int(7)
    );
    let e = for_column(SqlValue::Decimal(Decimal::from(u64::MAX)), &INT64).unwrap_err();
    assert!(e.0.contains("does not fit a 64-bit integer column"), "{e}");
    assert_eq!(
        for_column(SqlValue::Int(3), &ColumnKind::Decimal { scale: None }).unwrap(),
        SqlValue::Decimal(Decimal::from(3))
    );
    assert_eq!(
        for_column(
            SqlValue::Json(serde_json::json!({"a": 1})),
            &ColumnKind::Json
        )
        .unwrap(),
        SqlValue::Text(r#"{"a":1}"#.into())
    );
    assert_eq!(
        for_column(SqlValue::Bool(true), &INT64).unwrap(),
        SqlValue::Int(1)
    );
    assert_eq!(
        for_column(SqlValue::Null, &ColumnKind::Date).unwrap(),
        SqlValue::Null
    );
    assert!(for_column(SqlValue::Text("x".into()), &ColumnKind::Bool).is_err());
}
