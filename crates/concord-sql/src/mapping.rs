//! The mapping of the deployment's entities onto live tables: the configuration resolved against
//! the canonical schema (the entities' protobuf messages) and the live database schema. Pure:
//! [`resolve`] returns the mapping or names every problem (what `check` prints).

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{FieldDescriptor, MessageDescriptor};

use crate::config::{Family, KeySource, SqlConfig};
use crate::convert::{self, Conversion};
use crate::key::{self, Key};
use crate::problem::Problem;
use crate::schema::{Column, Table};

/// One canonical field stored in one column.
#[derive(Debug, Clone)]
pub struct FieldMap {
    pub field: FieldDescriptor,
    pub column: Column,
    pub conv: Conversion,
}

/// One entity stored in one table.
#[derive(Debug, Clone)]
pub struct EntityMap {
    /// The entity's name in the policy.
    pub name: String,
    pub table: String,
    pub message: MessageDescriptor,
    /// The key columns, in order.
    pub key: Vec<Column>,
    pub key_source: KeySource,
    pub fields: Vec<FieldMap>,
    /// Indices into `fields` of the match fields.
    pub match_fields: Vec<usize>,
}

impl EntityMap {
    /// Whether each key column holds integers.
    pub fn integer_key(&self) -> Vec<bool> {
        self.key.iter().map(|c| c.kind.is_integer()).collect()
    }

    pub fn field(&self, name: &str) -> Option<&FieldMap> {
        self.fields.iter().find(|f| f.field.name() == name)
    }

    /// The mapped columns, in field order.
    pub fn columns(&self) -> Vec<Column> {
        self.fields.iter().map(|f| f.column.clone()).collect()
    }

    /// The key of local id `id`.
    pub fn parse_local_id(&self, id: &str) -> Result<Key, String> {
        key::parse_local_id(id, &self.integer_key())
    }
}

/// Every mapped entity.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub entities: Vec<EntityMap>,
}

impl Mapping {
    pub fn entity(&self, name: &str) -> Option<(usize, &EntityMap)> {
        self.entities
            .iter()
            .enumerate()
            .find(|(_, e)| e.name == name)
    }

    pub fn by_table(&self, table: &str) -> Option<(usize, &EntityMap)> {
        self.entities
            .iter()
            .enumerate()
            .find(|(_, e)| e.table == table)
    }
}

/// What the policy lets this system do with an entity's fields (for warnings): `None` when
/// unknown.
pub trait Visibility {
    /// Whether the system sees (or owns) `field` of `entity`.
    fn sees(&self, entity: &str, field: &str) -> bool;
    /// The fields of `entity` the system sees.
    fn seen(&self, entity: &str) -> Vec<String>;
}

/// Resolves the configuration against the canonical `entities` (entity name → message) and the
/// live `tables` (by name; `None`: missing). Returns the mapping when nothing is an error, and
/// every problem found (errors and warnings).
pub fn resolve(
    config: &SqlConfig,
    family: Family,
    entities: &BTreeMap<String, MessageDescriptor>,
    tables: &BTreeMap<String, Option<Table>>,
    visibility: Option<&dyn Visibility>,
) -> (Option<Mapping>, Vec<Problem>) {
    let mut problems = config.validate();
    let mut out = Vec::new();
    for (name, ec) in &config.entities {
        let here = |p: Problem| p.entity(name).table(&ec.table);
        let Some(message) = entities.get(name) else {
            problems.push(here(Problem::error(format!(
                "the policy has no entity `{name}` (it has: {})",
                entities.keys().cloned().collect::<Vec<_>>().join(", ")
            ))));
            continue;
        };
        let Some(Some(table)) = tables.get(&ec.table) else {
            problems.push(here(Problem::error("no such table in the database")));
            continue;
        };
        let mut key = Vec::new();
        for k in &ec.key {
            match table.column(k) {
                None => {
                    problems.push(here(Problem::error("key column not in the table")).column(k))
                }
                Some(c) if !c.kind.is_key_kind() => problems.push(
                    here(Problem::error(format!(
                        "key columns must hold integers or text, not {}",
                        c.kind.describe()
                    )))
                    .column(k),
                ),
                Some(c) => key.push(c.clone()),
            }
        }
        match ec.key_source {
            KeySource::Generated => {
                for c in &key {
                    if !c.has_default {
                        problems.push(
                            here(Problem::error(
                                "key_source = \"generated\", but the database does not fill this column (no identity, serial, auto-increment or default)",
                            ))
                            .column(&c.name),
                        );
                    }
                }
                if family == Family::MySql && ec.key.len() > 1 {
                    problems.push(here(Problem::error(
                        "MariaDB/MySQL can return only one generated key column: use key_source = \"fields\" or a single key column",
                    )));
                }
            }
            KeySource::Canonical => {
                for c in &key {
                    if c.kind.is_integer() {
                        problems.push(
                            here(Problem::error(
                                "key_source = \"canonical\" needs a text column (canonical keys are text)",
                            ))
                            .column(&c.name),
                        );
                    }
                }
            }
            KeySource::Fields => {}
        }
        let mut fields = Vec::new();
        for (fname, fc) in &ec.fields {
            let Some(field) = message.get_field_by_name(fname) else {
                problems.push(
                    here(Problem::error(format!(
                        "{} has no field `{fname}`",
                        message.full_name()
                    )))
                    .field(fname)
                    .column(&fc.column),
                );
                continue;
            };
            let Some(column) = table.column(&fc.column) else {
                problems.push(
                    here(Problem::error("no such column in the table"))
                        .column(&fc.column)
                        .field(fname),
                );
                continue;
            };
            match convert::plan(&field, column, fc) {
                Ok(conv) => fields.push(FieldMap {
                    field,
                    column: column.clone(),
                    conv,
                }),
                Err(why) => {
                    problems.push(here(Problem::error(why)).column(&fc.column).field(fname))
                }
            }
            if let Some(v) = visibility
                && !v.sees(name, fname)
            {
                problems.push(
                    here(Problem::warning(
                        "this system neither owns nor sees the field in the policy: it never syncs",
                    ))
                    .column(&fc.column)
                    .field(fname),
                );
            }
        }
        if let Some(v) = visibility {
            let mapped: BTreeSet<&str> = ec.fields.keys().map(String::as_str).collect();
            for f in v.seen(name) {
                if !mapped.contains(f.as_str()) {
                    problems.push(
                        here(Problem::warning(
                            "the system sees this field in the policy, but no column stores it",
                        ))
                        .field(&f),
                    );
                }
            }
        }
        // Creating a row for a record of another system fills the mapped columns and the key:
        // a NOT NULL column without a default outside them makes every such insert fail.
        let filled: BTreeSet<&str> = ec
            .fields
            .values()
            .map(|f| f.column.as_str())
            .chain(ec.key.iter().map(String::as_str))
            .collect();
        for c in &table.columns {
            if !c.nullable && !c.has_default && !filled.contains(c.name.as_str()) {
                problems.push(
                    here(Problem::warning(
                        "NOT NULL without a default and not mapped: rows created for records of other systems will be refused",
                    ))
                    .column(&c.name),
                );
            }
        }
        let match_fields = ec
            .match_fields
            .iter()
            .filter_map(|m| fields.iter().position(|f| f.field.name() == m))
            .collect();
        if key.len() == ec.key.len() {
            out.push(EntityMap {
                name: name.clone(),
                table: ec.table.clone(),
                message: message.clone(),
                key,
                key_source: ec.key_source,
                fields,
                match_fields,
            });
        }
    }
    let ok = !problems.iter().any(Problem::is_error);
    (ok.then_some(Mapping { entities: out }), problems)
}
