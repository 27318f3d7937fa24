//! The policy: systems, entities and, per field, who owns it and who sees it.
//!
//! A policy is read from TOML once, validated against the protobuf descriptors of the canonical
//! model (the schema its `[schema]` table names, loaded by the caller) and compiled into bit
//! sets for the decision hot path. Everything not declared is invisible and unowned (fail
//! closed).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use prost_reflect::{DescriptorPool, FieldDescriptor, MessageDescriptor};
use serde::Deserialize;

use crate::schema::{RawSchema, SchemaSource, message_location};
use crate::sets::{FieldSet, SystemId, SystemSet};

/// System names the router reserves: `router` names the router's own dead-letter queue
/// (`{ns}.dlq.router`, routing key `router` on `{ns}.dlx`).
pub const RESERVED_SYSTEM_NAMES: [&str; 1] = ["router"];

/// The policy as written in TOML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    schema: Option<RawSchema>,
    systems: BTreeMap<String, RawSystem>,
    #[serde(default)]
    entities: BTreeMap<String, RawEntity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSystem {
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    message: String,
    #[serde(default)]
    create: Vec<String>,
    #[serde(default)]
    delete: Vec<String>,
    #[serde(default)]
    fields: BTreeMap<String, RawField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    owner: Option<String>,
    owners: Option<Vec<String>>,
    merge: Option<MergeRule>,
    #[serde(default)]
    visible: Vec<String>,
}

/// How a field written by several owners is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeRule {
    /// The write with the greatest field clock wins.
    Lww,
    /// The write of the highest-priority owner wins (owners are listed highest first); among
    /// writes of one owner the latest wins.
    Priority,
}

impl MergeRule {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeRule::Lww => "lww",
            MergeRule::Priority => "priority",
        }
    }
}

/// One problem found in a policy, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub entity: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(e) = &self.entity {
            write!(f, ": entity `{e}`")?;
        }
        if let Some(x) = &self.field {
            write!(f, ", field `{x}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A policy that could not be loaded; lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        write!(f, "{}", lines.join("\n"))
    }
}

/// The rule for one field of an entity.
#[derive(Debug, Clone)]
pub struct FieldRule {
    pub name: String,
    pub descriptor: FieldDescriptor,
    /// Owners, highest priority first for [`MergeRule::Priority`].
    pub owners: Vec<SystemId>,
    pub merge: MergeRule,
    /// Systems that receive the field (always includes the owners).
    pub visible: SystemSet,
}

impl FieldRule {
    /// The merge rank of `system` for this field: 0 when it does not own the field; 1 for the
    /// owners of a single-owner or last-writer-wins field; for a priority field
    /// `owners.len() - position` (the highest owner gets the greatest rank).
    ///
    /// Every accepted write carries its writer's rank (at least 1), and a replica ranks its own
    /// earlier writes with its own rank, so an owner's write always beats a value a non-owner
    /// wrote locally (which the router rejected): copies converge on the owners' values.
    pub fn rank_of(&self, system: SystemId) -> u32 {
        match self.owners.iter().position(|o| *o == system) {
            Some(p) if self.merge == MergeRule::Priority => (self.owners.len() - p) as u32,
            Some(_) => 1,
            None => 0,
        }
    }
}

/// FNV-1a, for the field-name index on the decision hot path: field names are short, and
/// SipHash costs more than the rest of a decision. The map's keys come from the policy, so
/// names taken from messages can only look up, never flood, it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The compiled policy of one entity.
#[derive(Debug, Clone)]
pub struct EntityPolicy {
    pub name: String,
    pub message: MessageDescriptor,
    pub fields: Vec<FieldRule>,
    field_index: HashMap<String, usize, BuildHasherDefault<Fnv1a>>,
    /// Per system (by index), the fields it may see.
    pub(crate) visible_to: Vec<FieldSet>,
    /// Per system (by index), the fields it owns.
    pub(crate) owned_by: Vec<FieldSet>,
    pub create: SystemSet,
    pub delete: SystemSet,
    /// Systems that see at least one field of the entity.
    pub readers: SystemSet,
    /// How the router cuts the entity's records at the wire level (see [`crate::wire`]).
    pub(crate) record_plan: crate::wire::RecordPlan,
}

impl EntityPolicy {
    /// Position of a field in [`EntityPolicy::fields`].
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.field_index.get(name).copied()
    }
    /// Fields `system` may see.
    pub fn visible_to(&self, system: SystemId) -> FieldSet {
        self.visible_to
            .get(system.index())
            .copied()
            .unwrap_or_default()
    }
    /// Fields `system` owns.
    pub fn owned_by(&self, system: SystemId) -> FieldSet {
        self.owned_by
            .get(system.index())
            .copied()
            .unwrap_or_default()
    }
    /// Field names of a set, in field order.
    pub fn names(&self, set: FieldSet) -> impl Iterator<Item = &str> {
        set.iter()
            .filter_map(|i| self.fields.get(i).map(|f| f.name.as_str()))
    }
}

/// A validated, compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    systems: Vec<String>,
    descriptions: Vec<String>,
    system_index: HashMap<String, SystemId>,
    entities: Vec<EntityPolicy>,
    entity_index: HashMap<String, usize>,
    schema: Option<SchemaSource>,
}

impl Policy {
    /// Parses and validates a policy against the messages of `pool` (the schema the policy's
    /// `[schema]` table names: `concord-schema` loads both together); `file` names the source
    /// in error messages. The `[schema]` table is checked but optional here.
    pub fn from_toml(text: &str, file: &str, pool: &DescriptorPool) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError {
            problems: vec![Problem {
                file: file.to_owned(),
                entity: None,
                field: None,
                message: e.to_string().trim_end().replace('\n', " "),
            }],
        })?;
        Builder::new(file).build(raw, pool)
    }

    /// The policy's `[schema]` table, if it has one.
    pub fn schema_source(&self) -> Option<&SchemaSource> {
        self.schema.as_ref()
    }

    pub fn system_id(&self, name: &str) -> Option<SystemId> {
        self.system_index.get(name).copied()
    }
    /// The name of a system of this policy.
    pub fn system_name(&self, id: SystemId) -> &str {
        self.systems.get(id.index()).map_or("", String::as_str)
    }
    pub fn system_description(&self, id: SystemId) -> &str {
        self.descriptions.get(id.index()).map_or("", String::as_str)
    }
    /// All system names, in policy order (sorted by name).
    pub fn systems(&self) -> &[String] {
        &self.systems
    }
    pub fn system_ids(&self) -> impl Iterator<Item = SystemId> + '_ {
        (0..self.systems.len()).map(|i| SystemId(i as u8))
    }
    pub fn entity(&self, name: &str) -> Option<&EntityPolicy> {
        self.entity_index
            .get(name)
            .and_then(|i| self.entities.get(*i))
    }
    pub fn entities(&self) -> &[EntityPolicy] {
        &self.entities
    }
}

struct Builder {
    file: String,
    problems: Vec<Problem>,
}

impl Builder {
    fn new(file: &str) -> Builder {
        Builder {
            file: file.to_owned(),
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, entity: Option<&str>, field: Option<&str>, message: String) {
        self.problems.push(Problem {
            file: self.file.clone(),
            entity: entity.map(str::to_owned),
            field: field.map(str::to_owned),
            message,
        });
    }

    fn build(mut self, raw: RawPolicy, pool: &DescriptorPool) -> Result<Policy, PolicyError> {
        let schema = match raw.schema {
            Some(s) => {
                let mut problems = Vec::new();
                let source = s.resolve(|m| problems.push(m));
                for m in problems {
                    self.problem(None, None, m);
                }
                source
            }
            None => None,
        };
        if raw.systems.is_empty() {
            self.problem(None, None, "no systems declared under [systems]".into());
        }
        if raw.systems.len() > SystemSet::CAPACITY {
            self.problem(
                None,
                None,
                format!(
                    "{} systems declared; at most {} are supported",
                    raw.systems.len(),
                    SystemSet::CAPACITY
                ),
            );
        }
        let mut systems = Vec::new();
        let mut descriptions = Vec::new();
        let mut system_index = HashMap::new();
        for (name, sys) in raw.systems.iter().take(SystemSet::CAPACITY) {
            if !valid_name(name) {
                self.problem(
                    None,
                    None,
                    format!("system name `{name}` must match [a-z0-9_-]+ (it names queues and routing keys)"),
                );
            }
            if RESERVED_SYSTEM_NAMES.contains(&name.as_str()) {
                self.problem(
                    None,
                    None,
                    format!(
                        "system name `{name}` is reserved: it names the router's dead-letter queue"
                    ),
                );
            }
            system_index.insert(name.clone(), SystemId(systems.len() as u8));
            systems.push(name.clone());
            descriptions.push(sys.description.clone());
        }
        let n_systems = systems.len();
        let mut entities = Vec::new();
        let mut entity_index = HashMap::new();
        for (ename, ent) in &raw.entities {
            if !valid_name(ename) {
                self.problem(
                    Some(ename),
                    None,
                    "entity name must match [a-z0-9_-]+ (it is part of routing keys)".into(),
                );
            }
            let Some(message) = pool.get_message_by_name(&ent.message) else {
                self.problem(
                    Some(ename),
                    None,
                    format!(
                        "unknown protobuf message `{}`: the schema ({}) does not declare it",
                        ent.message,
                        schema_files(pool)
                    ),
                );
                continue;
            };
            let declared = message_location(&message);
            if ent.fields.len() > FieldSet::CAPACITY {
                self.problem(
                    Some(ename),
                    None,
                    format!(
                        "{} fields listed for message `{}` ({declared}); at most {} fields per entity are supported",
                        ent.fields.len(),
                        ent.message,
                        FieldSet::CAPACITY
                    ),
                );
                continue;
            }
            let create = self.system_list(&system_index, ename, None, "create", &ent.create);
            let delete = self.system_list(&system_index, ename, None, "delete", &ent.delete);
            let mut fields = Vec::new();
            let mut field_index = HashMap::default();
            let mut visible_to = vec![FieldSet::default(); n_systems];
            let mut owned_by = vec![FieldSet::default(); n_systems];
            let mut readers = SystemSet::default();
            for (fname, rf) in &ent.fields {
                let Some(descriptor) = message.get_field_by_name(fname) else {
                    self.problem(
                        Some(ename),
                        Some(fname),
                        format!(
                            "message `{}` ({declared}) has no field `{fname}`",
                            ent.message
                        ),
                    );
                    continue;
                };
                let owner_names: Vec<String> = match (&rf.owner, &rf.owners) {
                    (Some(o), None) => vec![o.clone()],
                    (None, Some(os)) if !os.is_empty() => os.clone(),
                    (None, Some(_)) | (None, None) => {
                        self.problem(
                            Some(ename),
                            Some(fname),
                            "no owner: set `owner = \"<system>\"` or `owners = [...]` with `merge`"
                                .into(),
                        );
                        continue;
                    }
                    (Some(_), Some(_)) => {
                        self.problem(
                            Some(ename),
                            Some(fname),
                            "set either `owner` or `owners`, not both".into(),
                        );
                        continue;
                    }
                };
                let merge = match (owner_names.len(), rf.merge) {
                    (1, m) => m.unwrap_or(MergeRule::Lww),
                    (_, Some(m)) => m,
                    (_, None) => {
                        self.problem(
                            Some(ename),
                            Some(fname),
                            "several owners need a merge rule: `merge = \"lww\"` or `merge = \"priority\"`".into(),
                        );
                        continue;
                    }
                };
                let owner_set =
                    self.system_list(&system_index, ename, Some(fname), "owners", &owner_names);
                let owners: Vec<SystemId> = owner_names
                    .iter()
                    .filter_map(|n| system_index.get(n).copied())
                    .collect();
                let mut visible = if rf.visible.iter().any(|v| v == "*") {
                    if rf.visible.len() > 1 {
                        self.problem(
                            Some(ename),
                            Some(fname),
                            "`visible = [\"*\"]` means every system; list nothing else with it"
                                .into(),
                        );
                    }
                    let mut all = SystemSet::default();
                    for i in 0..n_systems {
                        all.insert(SystemId(i as u8));
                    }
                    all
                } else {
                    self.system_list(&system_index, ename, Some(fname), "visible", &rf.visible)
                };
                for o in owner_set.iter() {
                    if rf.visible.iter().any(|v| system_index.get(v) == Some(&o)) {
                        self.problem(
                            Some(ename),
                            Some(fname),
                            format!(
                                "`visible` names owner `{}`: owners always see their fields, list only other readers",
                                systems.get(o.index()).map_or("", String::as_str)
                            ),
                        );
                    }
                }
                visible = SystemSet(visible.0 | owner_set.0);
                let idx = fields.len();
                for s in visible.iter() {
                    if let Some(v) = visible_to.get_mut(s.index()) {
                        v.insert(idx);
                    }
                }
                for s in owner_set.iter() {
                    if let Some(v) = owned_by.get_mut(s.index()) {
                        v.insert(idx);
                    }
                }
                readers = SystemSet(readers.0 | visible.0);
                field_index.insert(fname.clone(), idx);
                fields.push(FieldRule {
                    name: fname.clone(),
                    descriptor,
                    owners,
                    merge,
                    visible,
                });
            }
            let record_plan = crate::wire::RecordPlan::new(
                &message,
                fields.iter().map(|rule| &rule.descriptor).enumerate(),
            );
            entity_index.insert(ename.clone(), entities.len());
            entities.push(EntityPolicy {
                name: ename.clone(),
                message,
                fields,
                field_index,
                visible_to,
                owned_by,
                create,
                delete,
                readers,
                record_plan,
            });
        }
        if self.problems.is_empty() {
            Ok(Policy {
                systems,
                descriptions,
                system_index,
                entities,
                entity_index,
                schema,
            })
        } else {
            Err(PolicyError {
                problems: self.problems,
            })
        }
    }

    /// Resolves a list of system names, reporting unknown and repeated names.
    fn system_list(
        &mut self,
        index: &HashMap<String, SystemId>,
        entity: &str,
        field: Option<&str>,
        key: &str,
        names: &[String],
    ) -> SystemSet {
        let mut set = SystemSet::default();
        for n in names {
            match index.get(n) {
                None => self.problem(
                    Some(entity),
                    field,
                    format!("`{key}` names unknown system `{n}`"),
                ),
                Some(id) if set.contains(*id) => self.problem(
                    Some(entity),
                    field,
                    format!("`{key}` names system `{n}` twice"),
                ),
                Some(id) => set.insert(*id),
            }
        }
        set
    }
}

/// The schema's files, for a message that names none of its messages.
fn schema_files(pool: &DescriptorPool) -> String {
    let files: Vec<String> = pool
        .files()
        .map(|f| f.name().to_owned())
        .filter(|n| !n.starts_with("google/protobuf/"))
        .collect();
    if files.is_empty() {
        "no file".to_owned()
    } else {
        files.join(", ")
    }
}

/// Whether `s` is a valid system or entity name: `[a-z0-9_-]+` (names are parts of queue names
/// and routing keys).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
        [systems.orders]
        [systems.support]
        [systems.delivery]

        [entities.customer]
        message = "seed.v1.Customer"
        create = ["orders"]
        delete = ["orders"]

        [entities.customer.fields]
        name = { owner = "orders", visible = ["support", "delivery"] }
        warehouse = { owner = "delivery" }
        phone = { owners = ["orders", "support"], merge = "lww", visible = ["delivery"] }
        tier = { owners = ["orders", "support"], merge = "priority" }
    "#;

    use crate::seed_pool;

    fn load(text: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml(text, "policy.toml", &seed_pool())
    }

    fn problems(text: &str) -> Vec<String> {
        load(text)
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn compiles_ownership_and_visibility() {
        let p = load(OK).unwrap();
        let c = p.entity("customer").unwrap();
        let orders = p.system_id("orders").unwrap();
        let delivery = p.system_id("delivery").unwrap();
        let names = |s| c.names(s).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            names(c.visible_to(delivery)),
            ["name", "phone", "warehouse"]
        );
        assert_eq!(names(c.owned_by(orders)), ["name", "phone", "tier"]);
        let tier = &c.fields[c.field_index("tier").unwrap()];
        assert_eq!(tier.rank_of(orders), 2);
        assert_eq!(tier.rank_of(p.system_id("support").unwrap()), 1);
        assert_eq!(tier.rank_of(delivery), 0);
    }

    #[test]
    fn field_index_finds_every_declared_field_and_nothing_else() {
        let p = load(include_str!("../../../examples/seed/policy.toml")).unwrap();
        let c = p.entity("customer").unwrap();
        assert_eq!(c.fields.len(), 12);
        for (i, f) in c.fields.iter().enumerate() {
            assert_eq!(c.field_index(&f.name), Some(i), "{}", f.name);
        }
        for name in ["", "nam", "namee", "Name", "zzz", "address.city", "a"] {
            assert_eq!(c.field_index(name), None, "{name:?}");
        }
    }

    #[test]
    fn reports_each_problem_with_file_entity_and_field() {
        let text = r#"
            [systems.orders]
            [systems.support]
            [entities.customer]
            message = "seed.v1.Customer"
            create = ["ordres"]
            [entities.customer.fields]
            nmae = { owner = "orders" }
            email = { visible = ["support"] }
            phone = { owner = "orders", visible = ["support", "support"] }
            tier = { owners = ["orders", "support"] }
            warehouse = { owner = "depot" }
        "#;
        let p = problems(text);
        let expect = [
            "policy.toml: entity `customer`: `create` names unknown system `ordres`",
            "policy.toml: entity `customer`, field `email`: no owner",
            "policy.toml: entity `customer`, field `nmae`: message `seed.v1.Customer` (customer.proto:17) has no field `nmae`",
            "policy.toml: entity `customer`, field `phone`: `visible` names system `support` twice",
            "policy.toml: entity `customer`, field `tier`: several owners need a merge rule",
            "policy.toml: entity `customer`, field `warehouse`: `owners` names unknown system `depot`",
        ];
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        for e in expect {
            assert!(
                p.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
    }

    #[test]
    fn unknown_entity_message_and_keys_are_refused() {
        let p = problems("[systems.a]\n[entities.x]\nmessage = \"seed.v1.Nope\"\n");
        assert_eq!(
            p,
            [
                "policy.toml: entity `x`: unknown protobuf message `seed.v1.Nope`: the schema (customer.proto) does not declare it"
            ]
        );
        let p = problems("[systems.a]\ncolour = 1\n");
        assert!(
            p[0].starts_with("policy.toml: ") && p[0].contains("colour"),
            "{p:?}"
        );
        let p = problems("[systems]\n");
        assert_eq!(p, ["policy.toml: no systems declared under [systems]"]);
    }

    #[test]
    fn owners_listed_as_readers_are_refused() {
        let p = problems(
            "[systems.a]\n[entities.c]\nmessage = \"seed.v1.Customer\"\n[entities.c.fields]\nname = { owner = \"a\", visible = [\"a\"] }\n",
        );
        assert!(p[0].contains("owners always see their fields"), "{p:?}");
    }

    #[test]
    fn names_are_lowercase_ascii_digits_underscores_and_dashes() {
        for ok in ["a", "orders", "crm-2", "big_erp", "0"] {
            assert!(valid_name(ok), "{ok:?}");
        }
        for bad in ["", "Orders", "a.b", "a b", "é", "a/b", "a*"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_router_name_is_reserved() {
        let p = problems("[systems.router]\n[systems.orders]\n");
        assert_eq!(
            p,
            [
                "policy.toml: system name `router` is reserved: it names the router's dead-letter queue"
            ]
        );
    }

    #[test]
    fn the_schema_table_is_parsed_and_checked() {
        let with = |table: &str| format!("{table}\n{OK}");
        let p = load(&with(
            "[schema]\nfiles = [\"customer.proto\", \"more/\"]\ninclude = [\".\", \"../common\"]",
        ))
        .unwrap();
        assert_eq!(
            p.schema_source(),
            Some(&SchemaSource::Files {
                files: vec!["customer.proto".into(), "more/".into()],
                include: vec![".".into(), "../common".into()],
            })
        );
        let p = load(&with("[schema]\ndescriptor_set = \"model.binpb\"")).unwrap();
        assert_eq!(
            p.schema_source(),
            Some(&SchemaSource::DescriptorSet("model.binpb".into()))
        );
        assert_eq!(load(OK).unwrap().schema_source(), None);
        for (table, expected) in [
            (
                "[schema]\nfiles = [\"a.proto\"]\ndescriptor_set = \"m.binpb\"",
                "policy.toml: [schema]: set either `files` or `descriptor_set`, not both",
            ),
            (
                "[schema]\n",
                "policy.toml: [schema]: name the schema with `files",
            ),
            (
                "[schema]\nfiles = []",
                "policy.toml: [schema]: `files` lists no file or directory",
            ),
            (
                "[schema]\ndescriptor_set = \"m.binpb\"\ninclude = [\".\"]",
                "policy.toml: [schema]: `include` applies to `files` only",
            ),
            ("[schema]\nfile = [\"a.proto\"]", "unknown field `file`"),
        ] {
            let p = problems(&with(table));
            assert_eq!(p.len(), 1, "{table}: {p:?}");
            assert!(p[0].contains(expected), "{table}: {p:?}");
            let alone = crate::schema::parse_schema_section(&with(table), "policy.toml")
                .unwrap_err()
                .to_string();
            assert!(alone.contains(expected), "{table}: {alone}");
        }
        assert_eq!(
            crate::schema::parse_schema_section(
                "[schema]\nfiles = [\"c.proto\"]\n[systems.a]\ncolour = 1\n",
                "p.toml"
            ),
            Ok(Some(SchemaSource::Files {
                files: vec!["c.proto".into()],
                include: vec![],
            }))
        );
        assert_eq!(crate::schema::parse_schema_section(OK, "p.toml"), Ok(None));
    }

    #[test]
    fn locations_come_from_the_source_info() {
        let pool = seed_pool();
        let customer = pool.get_message_by_name("seed.v1.Customer").unwrap();
        let at = crate::schema::message_location(&customer);
        assert_eq!(at.to_string(), "customer.proto:17");
        let warehouse = customer.get_field_by_name("warehouse").unwrap();
        assert_eq!(
            crate::schema::field_location(&warehouse).to_string(),
            "customer.proto:27"
        );
        // Without source info, the file alone.
        let mut set = pool.file_descriptor_protos().cloned().collect::<Vec<_>>();
        for f in &mut set {
            f.source_code_info = None;
        }
        let bare = DescriptorPool::from_file_descriptor_set(
            prost_reflect::prost_types::FileDescriptorSet { file: set },
        )
        .unwrap();
        let customer = bare.get_message_by_name("seed.v1.Customer").unwrap();
        assert_eq!(
            crate::schema::message_location(&customer).to_string(),
            "customer.proto"
        );
    }
}
