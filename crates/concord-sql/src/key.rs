//! Row keys: the values of a row's key columns, as the change log records them (a JSON array
//! written by the capture triggers) and as the SDK knows them (the local id: the value itself for
//! a one-column key, a JSON array for a composite key). Pure.

use std::fmt;

/// One key column's value: keys are integers or text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyPart {
    Int(i64),
    Text(String),
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::Int(i) => write!(f, "{i}"),
            KeyPart::Text(s) => f.write_str(s),
        }
    }
}

impl KeyPart {
    fn json(&self) -> serde_json::Value {
        match self {
            KeyPart::Int(i) => serde_json::Value::from(*i),
            KeyPart::Text(s) => serde_json::Value::from(s.as_str()),
        }
    }
}

/// A row's key: one part per key column, in the configured order.
pub type Key = Vec<KeyPart>;

/// The local id of a row with key `key`: `42`, `c-1`, or `[7,"eu"]` for a composite key.
pub fn local_id(key: &[KeyPart]) -> String {
    match key {
        [one] => one.to_string(),
        parts => serde_json::Value::Array(parts.iter().map(KeyPart::json).collect()).to_string(),
    }
}

/// The key as the change log records it (a JSON array of the key columns' values).
pub fn logged(key: &[KeyPart]) -> String {
    serde_json::Value::Array(key.iter().map(KeyPart::json).collect()).to_string()
}

/// The key of local id `id` for key columns whose values are integers (`true`) or text.
pub fn parse_local_id(id: &str, integer_columns: &[bool]) -> Result<Key, String> {
    match integer_columns {
        [integer] => Ok(vec![part_of_text(id, *integer)?]),
        columns => {
            let values: Vec<serde_json::Value> = serde_json::from_str(id)
                .map_err(|_| format!("local id {id:?} is not a JSON array of key values"))?;
            if values.len() != columns.len() {
                return Err(format!(
                    "local id {id:?} has {} values for {} key columns",
                    values.len(),
                    columns.len()
                ));
            }
            values
                .iter()
                .zip(columns)
                .map(|(v, integer)| part_of_json(v, *integer))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("local id {id:?}: {e}"))
        }
    }
}

fn part_of_text(text: &str, integer: bool) -> Result<KeyPart, String> {
    if integer {
        text.parse()
            .map(KeyPart::Int)
            .map_err(|_| format!("local id {text:?} is not an integer key"))
    } else {
        Ok(KeyPart::Text(text.to_owned()))
    }
}

fn part_of_json(v: &serde_json::Value, integer: bool) -> Result<KeyPart, String> {
    match v {
        serde_json::Value::Number(n) if integer => n
            .as_i64()
            .map(KeyPart::Int)
            .ok_or_else(|| format!("{n} is not a 64-bit integer")),
        serde_json::Value::String(s) if integer => s
            .parse()
            .map(KeyPart::Int)
            .map_err(|_| format!("{s:?} is not an integer")),
        serde_json::Value::String(s) => Ok(KeyPart::Text(s.clone())),
        serde_json::Value::Number(n) => Ok(KeyPart::Text(n.to_string())),
        other => Err(format!("{other} is not a key value")),
    }
}

/// The key the capture triggers recorded (`row_key`: a JSON array of the key columns' values).
pub fn parse_logged(row_key: &str, integer_columns: &[bool]) -> Result<Key, String> {
    let values: Vec<serde_json::Value> = serde_json::from_str(row_key)
        .map_err(|_| format!("{row_key:?} is not a JSON array of key values"))?;
    if values.len() != integer_columns.len() {
        return Err(format!(
            "{row_key:?} has {} values for {} key columns",
            values.len(),
            integer_columns.len()
        ));
    }
    values
        .iter()
        .zip(integer_columns)
        .map(|(v, integer)| part_of_json(v, *integer))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn local_ids_read_naturally() {
        assert_eq!(local_id(&[KeyPart::Int(42)]), "42");
        assert_eq!(local_id(&[KeyPart::Text("c-1".into())]), "c-1");
        assert_eq!(
            local_id(&[KeyPart::Int(7), KeyPart::Text("eu".into())]),
            r#"[7,"eu"]"#
        );
    }

    #[test]
    fn logged_keys_parse_whatever_their_spacing() {
        assert_eq!(
            parse_logged(r#"[7, "eu"]"#, &[true, false]).unwrap(),
            vec![KeyPart::Int(7), KeyPart::Text("eu".into())]
        );
        assert!(parse_logged("[1]", &[true, false]).is_err());
        assert!(parse_logged("[1.5]", &[true]).is_err());
        assert!(parse_logged("{}", &[true]).is_err());
        assert!(parse_logged("[null]", &[false]).is_err());
        assert!(parse_local_id("x", &[true]).is_err());
        assert!(parse_local_id("[1]", &[true, true]).is_err());
    }

    fn part() -> impl Strategy<Value = (KeyPart, bool)> {
        prop_oneof![
            any::<i64>().prop_map(|i| (KeyPart::Int(i), true)),
            ".*".prop_map(|s| (KeyPart::Text(s), false)),
        ]
    }

    proptest! {
        #[test]
        fn local_ids_and_logged_keys_round_trip(parts in proptest::collection::vec(part(), 1..4)) {
            let key: Key = parts.iter().map(|(p, _)| p.clone()).collect();
            let integer: Vec<bool> = parts.iter().map(|(_, i)| *i).collect();
            prop_assert_eq!(parse_local_id(&local_id(&key), &integer).unwrap(), key.clone());
            let logged = serde_json::Value::Array(key.iter().map(KeyPart::json).collect()).to_string();
            prop_assert_eq!(parse_logged(&logged, &integer).unwrap(), key);
        }
    }
}
