//! What changed between two schemas, and whether it breaks running deployments (pure: no I/O).
//!
//! A change is **breaking** when data encoded with one schema is not read the same with the
//! other: a message or field removed, a field renamed (the policy names fields by name) or
//! renumbered (the wire names them by number), a field's type or cardinality changed, an enum
//! value removed or renumbered. Adding messages and fields is not breaking: adapters on the old
//! schema skip fields they do not know. [`for_policy`] looks only at what a policy uses (its
//! entities' messages and their fields, with every field of the messages those fields hold);
//! [`schemas`] at every message.

use std::collections::HashSet;
use std::fmt;

use concord_policy::{Location, Policy, field_location, message_location};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

/// What kind of change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// The message is gone. Breaking.
    MessageRemoved,
    /// The field is gone (no field has its name or its number). Breaking.
    FieldRemoved,
    /// The field's number now has another name. Breaking.
    FieldRenamed { to: String },
    /// The field has another number. Breaking.
    FieldRenumbered { from: u32, to: u32 },
    /// The field has another type (scalar type, message or enum). Breaking.
    TypeChanged { from: String, to: String },
    /// The field changed between `optional`, `singular` (implicit presence), `repeated` and
    /// `map`. Breaking.
    CardinalityChanged {
        from: &'static str,
        to: &'static str,
    },
    /// A value of the field's enum was removed or renumbered. Breaking.
    EnumChanged { detail: String },
    /// A new message. Not breaking.
    MessageAdded,
    /// A new field. Not breaking.
    FieldAdded { number: u32 },
}

impl ChangeKind {
    /// Whether data written with one schema is not read the same with the other.
    pub fn is_breaking(&self) -> bool {
        !matches!(
            self,
            ChangeKind::MessageAdded | ChangeKind::FieldAdded { .. }
        )
    }
}

/// One change, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The policy entity it concerns ([`for_policy`] only).
    pub entity: Option<String>,
    /// The message (full name).
    pub message: String,
    /// The field, for field changes.
    pub field: Option<String>,
    pub kind: ChangeKind,
    /// Where the message or field is declared: in the old schema for what changed or went, in
    /// the new one for what was added.
    pub at: Location,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.entity {
            write!(f, "entity `{e}`: ")?;
        }
        match &self.field {
            Some(field) => write!(f, "field `{}.{field}` ({})", self.message, self.at)?,
            None => write!(f, "message `{}` ({})", self.message, self.at)?,
        }
        match &self.kind {
            ChangeKind::MessageRemoved => write!(f, " was removed"),
            ChangeKind::FieldRemoved => write!(f, " was removed"),
            ChangeKind::FieldRenamed { to } => {
                write!(f, " was renamed to `{to}` (same number)")
            }
            ChangeKind::FieldRenumbered { from, to } => {
                write!(f, " was renumbered from {from} to {to}")
            }
            ChangeKind::TypeChanged { from, to } => {
                write!(f, " changed type from {from} to {to}")
            }
            ChangeKind::CardinalityChanged { from, to } => {
                write!(f, " changed cardinality from {from} to {to}")
            }
            ChangeKind::EnumChanged { detail } => write!(f, ": {detail}"),
            ChangeKind::MessageAdded => write!(f, " was added"),
            ChangeKind::FieldAdded { number } => write!(f, " was added (number {number})"),
        }
    }
}

/// The changes between two schemas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaDiff {
    /// Changes that break running deployments, in message and field order.
    pub breaking: Vec<Change>,
    /// Messages and fields added.
    pub additions: Vec<Change>,
}

impl SchemaDiff {
    /// Whether any change is breaking.
    pub fn is_breaking(&self) -> bool {
        !self.breaking.is_empty()
    }

    fn push(&mut self, change: Change) {
        if change.kind.is_breaking() {
            self.breaking.push(change);
        } else {
            self.additions.push(change);
        }
    }
}

/// The changes from `old` to `new` for every message of `old` (and every message `new` adds).
/// Messages of package `google.protobuf` and map entries are not compared on their own.
pub fn schemas(old: &DescriptorPool, new: &DescriptorPool) -> SchemaDiff {
    let mut diff = SchemaDiff::default();
    for om in user_messages(old) {
        let Some(nm) = new.get_message_by_name(om.full_name()) else {
            diff.push(Change {
                entity: None,
                message: om.full_name().to_owned(),
                field: None,
                kind: ChangeKind::MessageRemoved,
                at: message_location(&om),
            });
            continue;
        };
        let mut nested = Vec::new();
        for of in om.fields() {
            compare_field(None, &of, &nm, &mut diff, &mut nested);
        }
        added_fields(None, &om, &nm, &mut diff);
    }
    added_messages(Some(old), new, &mut diff);
    diff
}

/// The changes from the schema `policy` was validated against to `new`, for what `policy`
/// uses: its entities' messages, their fields the policy lists, and every field of the
/// messages (and enums) those fields hold, at any depth. This is the router's reload check:
/// a reload with breaking changes is refused.
pub fn for_policy(policy: &Policy, new: &DescriptorPool) -> SchemaDiff {
    let mut diff = SchemaDiff::default();
    for entity in policy.entities() {
        let e = Some(entity.name.as_str());
        let om = &entity.message;
        let Some(nm) = new.get_message_by_name(om.full_name()) else {
            diff.push(Change {
                entity: e.map(str::to_owned),
                message: om.full_name().to_owned(),
                field: None,
                kind: ChangeKind::MessageRemoved,
                at: message_location(om),
            });
            continue;
        };
        let mut nested = Vec::new();
        for rule in &entity.fields {
            compare_field(e, &rule.descriptor, &nm, &mut diff, &mut nested);
        }
        added_fields(e, om, &nm, &mut diff);
        let mut seen: HashSet<String> = HashSet::new();
        while let Some((o, n)) = nested.pop() {
            if !seen.insert(o.full_name().to_owned()) {
                continue;
            }
            for of in o.fields() {
                compare_field(e, &of, &n, &mut diff, &mut nested);
            }
            added_fields(e, &o, &n, &mut diff);
        }
    }
    added_messages(policy_pool(policy).as_ref(), new, &mut diff);
    diff
}

/// The pool the policy's descriptors come from (any entity's; all share one).
fn policy_pool(policy: &Policy) -> Option<DescriptorPool> {
    policy
        .entities()
        .first()
        .map(|e| e.message.parent_pool().clone())
}

fn user_messages(pool: &DescriptorPool) -> impl Iterator<Item = MessageDescriptor> + '_ {
    pool.all_messages()
        .filter(|m| !m.is_map_entry() && m.package_name() != "google.protobuf")
}

fn added_messages(old: Option<&DescriptorPool>, new: &DescriptorPool, diff: &mut SchemaDiff) {
    for nm in user_messages(new) {
        let known = old.is_some_and(|o| o.get_message_by_name(nm.full_name()).is_some());
        if !known {
            diff.push(Change {
                entity: None,
                message: nm.full_name().to_owned(),
                field: None,
                kind: ChangeKind::MessageAdded,
                at: message_location(&nm),
            });
        }
    }
}

fn added_fields(
    entity: Option<&str>,
    old: &MessageDescriptor,
    new: &MessageDescriptor,
    diff: &mut SchemaDiff,
) {
    for nf in new.fields() {
        let by_name = old.get_field_by_name(nf.name()).is_some();
        let by_number = old.get_field(nf.number()).is_some();
        if !by_name && !by_number {
            diff.push(Change {
                entity: entity.map(str::to_owned),
                message: new.full_name().to_owned(),
                field: Some(nf.name().to_owned()),
                kind: ChangeKind::FieldAdded {
                    number: nf.number(),
                },
                at: field_location(&nf),
            });
        }
    }
}

/// Compares field `old` with the field of `new` of the same name; messages both hold are
/// queued on `nested`.
fn compare_field(
    entity: Option<&str>,
    old: &FieldDescriptor,
    new: &MessageDescriptor,
    diff: &mut SchemaDiff,
    nested: &mut Vec<(MessageDescriptor, MessageDescriptor)>,
) {
    let mut push = |kind| {
        diff.push(Change {
            entity: entity.map(str::to_owned),
            message: old.parent_message().full_name().to_owned(),
            field: Some(old.name().to_owned()),
            kind,
            at: field_location(old),
        });
    };
    let Some(nf) = new.get_field_by_name(old.name()) else {
        match new.get_field(old.number()) {
            Some(other) => push(ChangeKind::FieldRenamed {
                to: other.name().to_owned(),
            }),
            None => push(ChangeKind::FieldRemoved),
        }
        return;
    };
    if nf.number() != old.number() {
        push(ChangeKind::FieldRenumbered {
            from: old.number(),
            to: nf.number(),
        });
    }
    let (from, to) = (type_name(old), type_name(&nf));
    if from != to {
        push(ChangeKind::TypeChanged { from, to });
        return;
    }
    let (from, to) = (cardinality(old), cardinality(&nf));
    if from != to {
        push(ChangeKind::CardinalityChanged { from, to });
        return;
    }
    // Same type: compare what it holds.
    let (ok, nk) = if old.is_map() {
        match (old.kind(), nf.kind()) {
            (Kind::Message(o), Kind::Message(n)) => (
                o.map_entry_value_field().kind(),
                n.map_entry_value_field().kind(),
            ),
            (o, n) => (o, n),
        }
    } else {
        (old.kind(), nf.kind())
    };
    match (ok, nk) {
        (Kind::Message(o), Kind::Message(n)) => nested.push((o, n)),
        (Kind::Enum(o), Kind::Enum(n)) => {
            for ov in o.values() {
                match n.get_value_by_name(ov.name()) {
                    None => push(ChangeKind::EnumChanged {
                        detail: format!("enum `{}` lost value `{}`", o.full_name(), ov.name()),
                    }),
                    Some(nv) if nv.number() != ov.number() => push(ChangeKind::EnumChanged {
                        detail: format!(
                            "enum `{}`: value `{}` was renumbered from {} to {}",
                            o.full_name(),
                            ov.name(),
                            ov.number(),
                            nv.number()
                        ),
                    }),
                    Some(_) => {}
                }
            }
        }
        _ => {}
    }
}

/// The field's cardinality: `map`, `repeated`, `optional` (explicit presence) or `singular`.
fn cardinality(f: &FieldDescriptor) -> &'static str {
    if f.is_map() {
        "map"
    } else if f.is_list() {
        "repeated"
    } else if f.supports_presence() {
        "optional"
    } else {
        "singular"
    }
}

/// The field's type as written in a `.proto` file (`map<K, V>` for maps).
fn type_name(f: &FieldDescriptor) -> String {
    if f.is_map()
        && let Kind::Message(entry) = f.kind()
    {
        return format!(
            "map<{}, {}>",
            kind_name(&entry.map_entry_key_field().kind()),
            kind_name(&entry.map_entry_value_field().kind())
        );
    }
    kind_name(&f.kind())
}

fn kind_name(k: &Kind) -> String {
    match k {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
    }
}
