//! Conversions between canonical field values (`prost_reflect::Value`, typed by the deployment's
//! `.proto` files) and column values ([`SqlValue`], independent of the database). Pure: which
//! conversion a field and a column call for ([`plan`]), and the conversion of one value each way
//! ([`to_sql`], [`from_sql`]).

use std::collections::BTreeMap;
use std::str::FromStr;

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, SerializeOptions, Value,
};
use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::config::{FieldConfig, MapValue};
use crate::schema::{Column, ColumnKind};

/// A column value, whatever the database.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal(Decimal),
    Text(String),
    Bytes(Vec<u8>),
    Json(serde_json::Value),
    /// A date and time in UTC.
    Timestamp(PrimitiveDateTime),
    Date(Date),
}

impl SqlValue {
    /// A short description for messages (the value, cut to 60 characters).
    pub fn show(&self) -> String {
        let s = match self {
            SqlValue::Null => "NULL".to_owned(),
            SqlValue::Bool(b) => b.to_string(),
            SqlValue::Int(i) => i.to_string(),
            SqlValue::Float(f) => f.to_string(),
            SqlValue::Decimal(d) => d.to_string(),
            SqlValue::Text(s) => format!("{s:?}"),
            SqlValue::Bytes(b) => format!("{} bytes", b.len()),
            SqlValue::Json(j) => j.to_string(),
            SqlValue::Timestamp(t) => t.to_string(),
            SqlValue::Date(d) => d.to_string(),
        };
        if s.chars().count() > 60 {
            format!("{}...", s.chars().take(60).collect::<String>())
        } else {
            s
        }
    }
}

/// Why a value cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConvertError> {
    Err(ConvertError(msg.into()))
}

/// How a canonical field and a column convert into each other.
#[derive(Debug, Clone, PartialEq)]
pub enum Conversion {
    /// string ↔ text (also a uuid or enum column, as text).
    Text,
    /// integer ↔ integer (or a decimal/float column holding whole numbers).
    Integer,
    /// integer in minor units ↔ decimal amount with `scale` decimals.
    Minor { scale: u32 },
    /// decimal string (`"12.50"`) ↔ decimal.
    DecimalText,
    /// double/float ↔ float or decimal.
    Float,
    /// bool ↔ boolean (or 0/1).
    Bool,
    /// `google.protobuf.Timestamp` ↔ timestamp.
    Timestamp,
    /// RFC 3339 string ↔ timestamp.
    TimestampText,
    /// `YYYY-MM-DD` string ↔ date.
    DateText,
    /// enum ↔ text holding the value's name.
    EnumName,
    /// enum ↔ integer holding the value's number.
    EnumNumber,
    /// canonical value ↔ column value, through the configured `values` map.
    Mapped(ValueMap),
    /// message, list or map ↔ JSON (a JSON column, or text holding JSON), in the protobuf JSON
    /// mapping with the `.proto` field names.
    Json,
    /// string holding a JSON document ↔ JSON column.
    JsonText,
    /// bytes ↔ binary.
    Bytes,
}

/// A configured `values` map: canonical value (as text) ↔ column value.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueMap {
    pub to_column: BTreeMap<String, SqlValue>,
}

impl ValueMap {
    fn canonical_of(&self, v: &SqlValue) -> Option<&str> {
        self.to_column
            .iter()
            .find(|(_, c)| same(c, v))
            .map(|(k, _)| k.as_str())
    }
}

/// Whether two column values are the same value (an integer column may hold a boolean as 0/1, a
/// decimal may be a whole number).
fn same(a: &SqlValue, b: &SqlValue) -> bool {
    match (a, b) {
        (SqlValue::Bool(x), SqlValue::Int(i)) | (SqlValue::Int(i), SqlValue::Bool(x)) => {
            i64::from(*x) == *i
        }
        (SqlValue::Int(i), SqlValue::Decimal(d)) | (SqlValue::Decimal(d), SqlValue::Int(i)) => {
            Decimal::from(*i) == *d
        }
        _ => a == b,
    }
}

const TIMESTAMP: &str = "google.protobuf.Timestamp";

/// The conversion between `field` and `column` that `spec` asks for, or why there is none.
pub fn plan(
    field: &FieldDescriptor,
    column: &Column,
    spec: &FieldConfig,
) -> Result<Conversion, String> {
    let kind = field.kind();
    let col = &column.kind;
    let cannot = || {
        Err(format!(
            "cannot store {} in a {} column",
            describe_field(field),
            col.describe()
        ))
    };
    if field.is_list() || field.is_map() {
        if spec.scale.is_some() || spec.values.is_some() {
            return Err("`scale` and `values` apply to single values, not lists or maps".into());
        }
        return match col {
            ColumnKind::Json | ColumnKind::Text => Ok(Conversion::Json),
            _ => cannot(),
        };
    }
    if let Some(scale) = spec.scale {
        if !is_integer(&kind) {
            return Err(format!(
                "`scale` converts integers in minor units, and this field is {}",
                describe_field(field)
            ));
        }
        return match col {
            ColumnKind::Decimal { scale: Some(s) } if *s < scale => Err(format!(
                "the column keeps {s} decimals: amounts with {scale} would be rounded"
            )),
            ColumnKind::Decimal { .. } | ColumnKind::Float { .. } => {
                Ok(Conversion::Minor { scale })
            }
            _ => Err(format!(
                "`scale` needs a decimal column, and this one is {}",
                col.describe()
            )),
        };
    }
    if let Some(values) = &spec.values {
        return value_map(field, column, values).map(Conversion::Mapped);
    }
    match kind {
        Kind::String => match col {
            ColumnKind::Text | ColumnKind::Uuid | ColumnKind::Enum { .. } => Ok(Conversion::Text),
            ColumnKind::Decimal { .. } => Ok(Conversion::DecimalText),
            ColumnKind::Timestamp { .. } => Ok(Conversion::TimestampText),
            ColumnKind::Date => Ok(Conversion::DateText),
            ColumnKind::Json => Ok(Conversion::JsonText),
            _ => cannot(),
        },
        k if is_integer(&k) => match col {
            ColumnKind::Integer { .. } => Ok(Conversion::Integer),
            ColumnKind::Decimal {
                scale: None | Some(0),
            } => Ok(Conversion::Integer),
            _ => cannot(),
        },
        Kind::Double | Kind::Float => match col {
            ColumnKind::Float { .. } | ColumnKind::Decimal { .. } => Ok(Conversion::Float),
            _ => cannot(),
        },
        Kind::Bool => match col {
            ColumnKind::Bool | ColumnKind::Integer { .. } => Ok(Conversion::Bool),
            _ => cannot(),
        },
        Kind::Bytes => match col {
            ColumnKind::Bytes => Ok(Conversion::Bytes),
            _ => cannot(),
        },
        Kind::Enum(e) => match col {
            ColumnKind::Text => Ok(Conversion::EnumName),
            ColumnKind::Enum { values, .. } => {
                let missing: Vec<String> = e
                    .values()
                    .filter(|v| v.number() != 0 && !values.iter().any(|l| l == v.name()))
                    .map(|v| v.name().to_owned())
                    .collect();
                if missing.is_empty() {
                    Ok(Conversion::EnumName)
                } else {
                    Err(format!(
                        "the column's labels lack {} of {}: map them with `values`",
                        missing.join(", "),
                        e.full_name()
                    ))
                }
            }
            ColumnKind::Integer { .. } => Ok(Conversion::EnumNumber),
            _ => cannot(),
        },
        Kind::Message(m) if m.full_name() == TIMESTAMP => match col {
            ColumnKind::Timestamp { .. } => Ok(Conversion::Timestamp),
            _ => cannot(),
        },
        Kind::Message(_) => match col {
            ColumnKind::Json | ColumnKind::Text => Ok(Conversion::Json),
            _ => cannot(),
        },
        _ => cannot(),
    }
}

fn is_integer(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Int32
            | Kind::Int64
            | Kind::Uint32
            | Kind::Uint64
            | Kind::Sint32
            | Kind::Sint64
            | Kind::Fixed32
            | Kind::Fixed64
            | Kind::Sfixed32
            | Kind::Sfixed64
    )
}

/// The field's type for messages, e.g. `int64`, `enum shop.v1.Status`, `message seed.v1.X`.
pub fn describe_field(field: &FieldDescriptor) -> String {
    let base = match field.kind() {
        Kind::Double => "double".to_owned(),
        Kind::Float => "float".to_owned(),
        Kind::Int32 => "int32".to_owned(),
        Kind::Int64 => "int64".to_owned(),
        Kind::Uint32 => "uint32".to_owned(),
        Kind::Uint64 => "uint64".to_owned(),
        Kind::Sint32 => "sint32".to_owned(),
        Kind::Sint64 => "sint64".to_owned(),
        Kind::Fixed32 => "fixed32".to_owned(),
        Kind::Fixed64 => "fixed64".to_owned(),
        Kind::Sfixed32 => "sfixed32".to_owned(),
        Kind::Sfixed64 => "sfixed64".to_owned(),
        Kind::Bool => "bool".to_owned(),
        Kind::String => "string".to_owned(),
        Kind::Bytes => "bytes".to_owned(),
        Kind::Message(m) => format!("message {}", m.full_name()),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
    };
    if field.is_map() {
        "a map".to_owned()
    } else if field.is_list() {
        format!("repeated {base}")
    } else {
        base
    }
}

/// The `values` map of `field` and `column`, checked both ways.
fn value_map(
    field: &FieldDescriptor,
    column: &Column,
    values: &BTreeMap<String, MapValue>,
) -> Result<ValueMap, String> {
    let mut to_column = BTreeMap::new();
    let mut problems = Vec::new();
    for (canonical, local) in values {
        if let Err(e) = canonical_value(field, canonical) {
            problems.push(e.0);
        }
        let v = match (local, &column.kind) {
            (MapValue::Text(s), ColumnKind::Enum { values, .. }) => {
                if !values.contains(s) {
                    problems.push(format!(
                        "{s:?} (for {canonical:?}) is not a label of the column ({})",
                        values.join(", ")
                    ));
                }
                SqlValue::Text(s.clone())
            }
            (MapValue::Text(s), ColumnKind::Text | ColumnKind::Uuid) => SqlValue::Text(s.clone()),
            (MapValue::Int(i), ColumnKind::Integer { .. } | ColumnKind::Decimal { .. }) => {
                SqlValue::Int(*i)
            }
            (MapValue::Int(i @ (0 | 1)), ColumnKind::Bool) => SqlValue::Bool(*i == 1),
            (MapValue::Bool(b), ColumnKind::Bool | ColumnKind::Integer { .. }) => {
                SqlValue::Bool(*b)
            }
            (other, kind) => {
                problems.push(format!(
                    "{other} (for {canonical:?}) cannot be stored in a {} column",
                    kind.describe()
                ));
                continue;
            }
        };
        to_column.insert(canonical.clone(), v);
    }
    if problems.is_empty() {
        Ok(ValueMap { to_column })
    } else {
        Err(format!("`values`: {}", problems.join("; ")))
    }
}

/// A canonical value of `field` given as text (a `values` key): an enum value's name, `true` or
/// `false`, a number, a string.
fn canonical_value(field: &FieldDescriptor, text: &str) -> Result<Value, ConvertError> {
    match field.kind() {
        Kind::String => Ok(Value::String(text.to_owned())),
        Kind::Bool => match text {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => err(format!("{text:?} is not a bool (true or false)")),
        },
        Kind::Enum(e) => e
            .get_value_by_name(text)
            .map(|v| Value::EnumNumber(v.number()))
            .ok_or_else(|| ConvertError(format!("{text:?} is not a value of {}", e.full_name()))),
        k if is_integer(&k) => {
            let n: i128 = text
                .parse()
                .map_err(|_| ConvertError(format!("{text:?} is not an integer")))?;
            integer(field, n)
        }
        _ => err(format!(
            "`values` maps strings, enums, bools and integers, not {}",
            describe_field(field)
        )),
    }
}

/// The text form of a canonical value, as `values` keys name it.
fn canonical_text(field: &FieldDescriptor, v: &Value) -> Result<String, ConvertError> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::EnumNumber(n) => match field.kind() {
            Kind::Enum(e) => e
                .get_value(*n)
                .map(|v| v.name().to_owned())
                .unwrap_or_else(|| n.to_string()),
            _ => n.to_string(),
        },
        Value::I32(i) => i.to_string(),
        Value::I64(i) => i.to_string(),
        Value::U32(i) => i.to_string(),
        Value::U64(i) => i.to_string(),
        other => return err(format!("unexpected value {other:?}")),
    })
}

fn integer_of(v: &Value) -> Option<i128> {
    match v {
        Value::I32(i) => Some(i128::from(*i)),
        Value::I64(i) => Some(i128::from(*i)),
        Value::U32(i) => Some(i128::from(*i)),
        Value::U64(i) => Some(i128::from(*i)),
        _ => None,
    }
}

/// `n` as a value of integer field `field`, if it fits.
fn integer(field: &FieldDescriptor, n: i128) -> Result<Value, ConvertError> {
    let fits = || ConvertError(format!("{n} does not fit {}", describe_field(field)));
    Ok(match field.kind() {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(i32::try_from(n).map_err(|_| fits())?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(i64::try_from(n).map_err(|_| fits())?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(u32::try_from(n).map_err(|_| fits())?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(u64::try_from(n).map_err(|_| fits())?),
        _ => return Err(fits()),
    })
}

fn sql_integer(n: i128) -> SqlValue {
    match i64::try_from(n) {
        Ok(i) => SqlValue::Int(i),
        Err(_) => SqlValue::Decimal(Decimal::from_i128_with_scale(n, 0)),
    }
}

/// A whole number held by a column value.
fn whole(v: &SqlValue) -> Result<i128, ConvertError> {
    match v {
        SqlValue::Int(i) => Ok(i128::from(*i)),
        SqlValue::Bool(b) => Ok(i128::from(*b)),
        SqlValue::Decimal(d) if d.fract().is_zero() => d
            .to_i128()
            .ok_or_else(|| ConvertError(format!("{d} is out of range"))),
        SqlValue::Float(f) if f.fract() == 0.0 && f.is_finite() && f.abs() < 1e36 => Ok(*f as i128),
        other => err(format!("{} is not a whole number", other.show())),
    }
}

/// A decimal held by a column value.
fn decimal(v: &SqlValue) -> Result<Decimal, ConvertError> {
    match v {
        SqlValue::Decimal(d) => Ok(*d),
        SqlValue::Int(i) => Ok(Decimal::from(*i)),
        SqlValue::Float(f) => Decimal::from_f64(*f)
            .ok_or_else(|| ConvertError(format!("{f} is not a decimal number"))),
        SqlValue::Text(s) => Decimal::from_str(s.trim())
            .or_else(|_| Decimal::from_scientific(s.trim()))
            .map_err(|_| ConvertError(format!("{s:?} is not a decimal number"))),
        other => err(format!("{} is not a decimal number", other.show())),
    }
}

fn json_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
}

/// The column value for canonical value `value` of `field` (`None`: the field is cleared).
pub fn to_sql(
    conv: &Conversion,
    field: &FieldDescriptor,
    value: Option<&Value>,
) -> Result<SqlValue, ConvertError> {
    let Some(v) = value else {
        return Ok(SqlValue::Null);
    };
    let wrong = || err(format!("{v:?} is not a value of {}", describe_field(field)));
    match conv {
        Conversion::Text => match v {
            Value::String(s) => Ok(SqlValue::Text(s.clone())),
            _ => wrong(),
        },
        Conversion::Integer => match integer_of(v) {
            Some(n) => Ok(sql_integer(n)),
            None => wrong(),
        },
        Conversion::Minor { scale } => match integer_of(v) {
            Some(n) => Decimal::try_from_i128_with_scale(n, *scale)
                .map(SqlValue::Decimal)
                .map_err(|e| ConvertError(format!("{n} minor units: {e}"))),
            None => wrong(),
        },
        Conversion::DecimalText => match v {
            Value::String(s) => decimal(&SqlValue::Text(s.clone())).map(SqlValue::Decimal),
            _ => wrong(),
        },
        Conversion::Float => match v {
            Value::F64(f) => Ok(SqlValue::Float(*f)),
            Value::F32(f) => Ok(SqlValue::Float(f64::from(*f))),
            _ => wrong(),
        },
        Conversion::Bool => match v {
            Value::Bool(b) => Ok(SqlValue::Bool(*b)),
            _ => wrong(),
        },
        Conversion::Timestamp => match v {
            Value::Message(m) => {
                let seconds = match m.get_field_by_name("seconds").as_deref() {
                    Some(Value::I64(s)) => *s,
                    _ => 0,
                };
                let nanos = match m.get_field_by_name("nanos").as_deref() {
                    Some(Value::I32(n)) => *n,
                    _ => 0,
                };
                let at = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
                let t = OffsetDateTime::from_unix_timestamp_nanos(at)
                    .map_err(|e| ConvertError(format!("timestamp {seconds}s {nanos}ns: {e}")))?;
                Ok(SqlValue::Timestamp(utc(t)))
            }
            _ => wrong(),
        },
        Conversion::TimestampText => match v {
            Value::String(s) => OffsetDateTime::parse(s, &Rfc3339)
                .map(|t| SqlValue::Timestamp(utc(t)))
                .map_err(|e| ConvertError(format!("{s:?} is not an RFC 3339 timestamp: {e}"))),
            _ => wrong(),
        },
        Conversion::DateText => match v {
            Value::String(s) => Date::parse(s, format_description!("[year]-[month]-[day]"))
                .map(SqlValue::Date)
                .map_err(|e| ConvertError(format!("{s:?} is not a date (YYYY-MM-DD): {e}"))),
            _ => wrong(),
        },
        Conversion::EnumName => match (v, field.kind()) {
            (Value::EnumNumber(n), Kind::Enum(e)) => e
                .get_value(*n)
                .map(|v| SqlValue::Text(v.name().to_owned()))
                .ok_or_else(|| ConvertError(format!("{n} is not a value of {}", e.full_name()))),
            _ => wrong(),
        },
        Conversion::EnumNumber => match v {
            Value::EnumNumber(n) => Ok(SqlValue::Int(i64::from(*n))),
            _ => wrong(),
        },
        Conversion::Mapped(map) => {
            let text = canonical_text(field, v)?;
            map.to_column.get(&text).cloned().ok_or_else(|| {
                ConvertError(format!(
                    "{text:?} has no column value in `values` ({})",
                    map.to_column.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })
        }
        Conversion::Json => {
            let mut m = DynamicMessage::new(field.parent_message().clone());
            m.try_set_field(field, v.clone())
                .map_err(|e| ConvertError(e.to_string()))?;
            let json = m
                .serialize_with_options(serde_json::value::Serializer, &json_options())
                .map_err(|e| ConvertError(e.to_string()))?;
            let empty = if field.is_list() {
                serde_json::Value::Array(Vec::new())
            } else {
                serde_json::Value::Object(serde_json::Map::new())
            };
            Ok(SqlValue::Json(
                json.get(field.name()).cloned().unwrap_or(empty),
            ))
        }
        Conversion::JsonText => match v {
            Value::String(s) => serde_json::from_str(s)
                .map(SqlValue::Json)
                .map_err(|e| ConvertError(format!("not a JSON document: {e}"))),
            _ => wrong(),
        },
        Conversion::Bytes => match v {
            Value::Bytes(b) => Ok(SqlValue::Bytes(b.to_vec())),
            _ => wrong(),
        },
    }
}

fn utc(t: OffsetDateTime) -> PrimitiveDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    PrimitiveDateTime::new(t.date(), t.time())
}

/// The canonical value of `field` for column value `v` (`None`: NULL, the field is cleared).
pub fn from_sql(
    conv: &Conversion,
    field: &FieldDescriptor,
    v: SqlValue,
) -> Result<Option<Value>, ConvertError> {
    if v == SqlValue::Null {
        return Ok(None);
    }
    let wrong = |v: &SqlValue| {
        err(format!(
            "{} cannot be read as {}",
            v.show(),
            describe_field(field)
        ))
    };
    let value = match conv {
        Conversion::Text => match v {
            SqlValue::Text(s) => Value::String(s),
            other => return wrong(&other),
        },
        Conversion::Integer => integer(field, whole(&v)?)?,
        Conversion::Minor { scale } => {
            let d = decimal(&v)?;
            let factor = Decimal::from_i128_with_scale(10_i128.pow(*scale), 0);
            let minor = d
                .checked_mul(factor)
                .ok_or_else(|| ConvertError(format!("{d} is out of range")))?;
            if !minor.fract().is_zero() {
                return err(format!("{d} has more than {scale} decimals"));
            }
            integer(field, whole(&SqlValue::Decimal(minor))?)?
        }
        Conversion::DecimalText => match v {
            SqlValue::Text(s) => Value::String(decimal(&SqlValue::Text(s))?.to_string()),
            other => Value::String(decimal(&other)?.to_string()),
        },
        Conversion::Float => {
            let f = match v {
                SqlValue::Float(f) => f,
                SqlValue::Int(i) => i as f64,
                SqlValue::Decimal(d) => d
                    .to_f64()
                    .ok_or_else(|| ConvertError(format!("{d} is not a float")))?,
                other => return wrong(&other),
            };
            match field.kind() {
                Kind::Float => Value::F32(f as f32),
                _ => Value::F64(f),
            }
        }
        Conversion::Bool => match v {
            SqlValue::Bool(b) => Value::Bool(b),
            SqlValue::Int(0) => Value::Bool(false),
            SqlValue::Int(1) => Value::Bool(true),
            SqlValue::Text(s) => match s.as_str() {
                "true" | "t" | "1" => Value::Bool(true),
                "false" | "f" | "0" => Value::Bool(false),
                _ => return wrong(&SqlValue::Text(s)),
            },
            other => return wrong(&other),
        },
        Conversion::Timestamp => {
            let t = timestamp(v)?.assume_utc();
            let Kind::Message(m) = field.kind() else {
                return err("not a timestamp field");
            };
            let mut msg = DynamicMessage::new(m);
            let nanos = t.unix_timestamp_nanos();
            let seconds = i64::try_from(nanos.div_euclid(1_000_000_000))
                .map_err(|_| ConvertError("timestamp out of range".into()))?;
            let sub = i32::try_from(nanos.rem_euclid(1_000_000_000))
                .map_err(|_| ConvertError("timestamp out of range".into()))?;
            msg.set_field_by_name("seconds", Value::I64(seconds));
            msg.set_field_by_name("nanos", Value::I32(sub));
            Value::Message(msg)
        }
        Conversion::TimestampText => {
            let t = timestamp(v)?.assume_utc();
            Value::String(
                t.format(&Rfc3339)
                    .map_err(|e| ConvertError(format!("timestamp {t}: {e}")))?,
            )
        }
        Conversion::DateText => {
            let d = match v {
                SqlValue::Date(d) => d,
                SqlValue::Timestamp(t) => t.date(),
                SqlValue::Text(s) => {
                    Date::parse(&s, format_description!("[year]-[month]-[day]"))
                        .map_err(|e| ConvertError(format!("{s:?} is not a date: {e}")))?
                }
                other => return wrong(&other),
            };
            Value::String(
                d.format(format_description!("[year]-[month]-[day]"))
                    .map_err(|e| ConvertError(format!("date {d}: {e}")))?,
            )
        }
        Conversion::EnumName => match (v, field.kind()) {
            (SqlValue::Text(s), Kind::Enum(e)) => match e.get_value_by_name(&s) {
                Some(ev) => Value::EnumNumber(ev.number()),
                None => return err(format!("{s:?} is not a value of {}", e.full_name())),
            },
            (other, _) => return wrong(&other),
        },
        Conversion::EnumNumber => {
            let n = whole(&v)?;
            let Kind::Enum(e) = field.kind() else {
                return err("not an enum field");
            };
            match i32::try_from(n).ok().and_then(|n| e.get_value(n)) {
                Some(ev) => Value::EnumNumber(ev.number()),
                None => return err(format!("{n} is not a value of {}", e.full_name())),
            }
        }
        Conversion::Mapped(map) => match map.canonical_of(&v) {
            Some(text) => canonical_value(field, text)?,
            None => {
                return err(format!("{} has no canonical value in `values`", v.show()));
            }
        },
        Conversion::Json => {
            let json = match v {
                SqlValue::Json(j) => j,
                SqlValue::Text(s) => serde_json::from_str(&s)
                    .map_err(|e| ConvertError(format!("not a JSON document: {e}")))?,
                other => return wrong(&other),
            };
            if json.is_null() {
                return Ok(None);
            }
            let mut object = serde_json::Map::new();
            object.insert(field.name().to_owned(), json);
            let m = DynamicMessage::deserialize_with_options(
                field.parent_message().clone(),
                serde_json::Value::Object(object),
                &DeserializeOptions::new().deny_unknown_fields(false),
            )
            .map_err(|e| ConvertError(format!("not a valid {}: {e}", describe_field(field))))?;
            m.get_field(field).into_owned()
        }
        Conversion::JsonText => match v {
            SqlValue::Json(j) => Value::String(j.to_string()),
            SqlValue::Text(s) => Value::String(s),
            other => return wrong(&other),
        },
        Conversion::Bytes => match v {
            SqlValue::Bytes(b) => Value::Bytes(b.into()),
            SqlValue::Text(s) => Value::Bytes(s.into_bytes().into()),
            other => return wrong(&other),
        },
    };
    Ok(Some(value))
}

/// `v` as the one type the driver binds for a column of `kind` (a statement keeps its
/// parameters' types: PostgreSQL prepares it once per text).
pub fn for_column(v: SqlValue, kind: &ColumnKind) -> Result<SqlValue, ConvertError> {
    if v == SqlValue::Null {
        return Ok(v);
    }
    let cannot = |v: &SqlValue| {
        err(format!(
            "{} cannot be stored in a {} column",
            v.show(),
            kind.describe()
        ))
    };
    Ok(match kind {
        ColumnKind::Integer {
            bits: 64,
            unsigned: true,
        } => SqlValue::Decimal(Decimal::from_i128_with_scale(whole(&v)?, 0)),
        ColumnKind::Integer { .. } => {
            let n = whole(&v)?;
            SqlValue::Int(i64::try_from(n).map_err(|_| {
                ConvertError(format!("{n} does not fit a {} column", kind.describe()))
            })?)
        }
        ColumnKind::Decimal { .. } => SqlValue::Decimal(decimal(&v)?),
        ColumnKind::Float { .. } => match v {
            SqlValue::Float(f) => SqlValue::Float(f),
            SqlValue::Int(i) => SqlValue::Float(i as f64),
            SqlValue::Decimal(d) => SqlValue::Float(
                d.to_f64()
                    .ok_or_else(|| ConvertError(format!("{d} is not a float")))?,
            ),
            other => return cannot(&other),
        },
        ColumnKind::Bool => match v {
            SqlValue::Bool(b) => SqlValue::Bool(b),
            SqlValue::Int(i) => SqlValue::Bool(i != 0),
            other => return cannot(&other),
        },
        ColumnKind::Timestamp { .. } => match v {
            SqlValue::Timestamp(t) => SqlValue::Timestamp(t),
            SqlValue::Date(d) => SqlValue::Timestamp(d.midnight()),
            other => return cannot(&other),
        },
        ColumnKind::Date => match v {
            SqlValue::Date(d) => SqlValue::Date(d),
            SqlValue::Timestamp(t) => SqlValue::Date(t.date()),
            other => return cannot(&other),
        },
        ColumnKind::Bytes => match v {
            SqlValue::Bytes(b) => SqlValue::Bytes(b),
            SqlValue::Text(s) => SqlValue::Bytes(s.into_bytes()),
            other => return cannot(&other),
        },
        ColumnKind::Json
        | ColumnKind::Text
        | ColumnKind::Uuid
        | ColumnKind::Enum { .. }
        | ColumnKind::Other(_) => SqlValue::Text(match v {
            SqlValue::Text(s) => s,
            SqlValue::Json(j) => j.to_string(),
            SqlValue::Int(i) => i.to_string(),
            SqlValue::Decimal(d) => d.to_string(),
            SqlValue::Float(f) => f.to_string(),
            SqlValue::Bool(b) => b.to_string(),
            other => return cannot(&other),
        }),
    })
}

fn timestamp(v: SqlValue) -> Result<PrimitiveDateTime, ConvertError> {
    match v {
        SqlValue::Timestamp(t) => Ok(t),
        SqlValue::Date(d) => Ok(d.midnight()),
        SqlValue::Text(s) => OffsetDateTime::parse(&s, &Rfc3339)
            .map(utc)
            .map_err(|e| ConvertError(format!("{s:?} is not an RFC 3339 timestamp: {e}"))),
        other => err(format!("{} is not a timestamp", other.show())),
    }
}

#[cfg(test)]
mod tests;
