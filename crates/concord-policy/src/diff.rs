//! What changes when one policy replaces another (pure): per entity and system, which fields it
//! starts or stops seeing (read) or owning (write) and whether it gains or loses the right to
//! create or delete records; systems and entities added or removed; entities whose message
//! changed; fields whose merge rule or owner priority changed; and which copies need a resync
//! once the new policy is in force.
//!
//! The two policies are matched by name: systems, entities and fields (each policy has its own
//! system indices and its own schema). An absent system or entity holds no right, so a new
//! system gains everything the new policy grants it and a removed one loses everything it had.
//! The fields of an entity whose message changed are other fields, whatever their names: its
//! readers and owners lose every old field and gain every new one.
//! Schema changes (a field renumbered under the same policy) are not this module's: see
//! `concord_schema::diff::for_policy`.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{EntityPolicy, FieldRule, MergeRule, Policy};
use crate::sets::SystemId;

/// A right a system holds on an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Right {
    /// Sees fields: the router sends them to the system.
    Read,
    /// Owns fields: the router accepts the system's changes to them.
    Write,
    /// May create records (the entity's `create` list).
    Create,
    /// May delete records (the entity's `delete` list).
    Delete,
}

impl Right {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Create => "create",
            Right::Delete => "delete",
        }
    }

    /// Whether the right is held on fields (read, write) rather than on records.
    pub fn is_per_field(self) -> bool {
        matches!(self, Right::Read | Right::Write)
    }
}

/// Whether a right was gained or lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    Gained,
    Lost,
}

impl Change {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Gained => "gained",
            Change::Lost => "lost",
        }
    }

    /// The same change seen from the other policy.
    pub fn reversed(self) -> Change {
        match self {
            Change::Gained => Change::Lost,
            Change::Lost => Change::Gained,
        }
    }
}

/// One system gaining or losing one right on one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessChange {
    pub entity: String,
    pub system: String,
    pub right: Right,
    pub change: Change,
    /// The fields, in name order, for [`Right::Read`] and [`Right::Write`]; empty for
    /// [`Right::Create`] and [`Right::Delete`].
    pub fields: Vec<String>,
}

/// How a field's owners' writes are merged, as far as it decides who wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// One owner: nothing to merge (whatever `merge` says).
    SingleOwner,
    /// Several owners; the latest write wins (the owners' order does not matter).
    Lww,
    /// Several owners; the highest owner's write wins. Owners by name, highest first.
    Priority(Vec<String>),
}

impl Merge {
    fn of(policy: &Policy, rule: &FieldRule) -> Merge {
        match (rule.owners.len(), rule.merge) {
            (0 | 1, _) => Merge::SingleOwner,
            (_, MergeRule::Lww) => Merge::Lww,
            (_, MergeRule::Priority) => Merge::Priority(
                rule.owners
                    .iter()
                    .map(|o| policy.system_name(*o).to_owned())
                    .collect(),
            ),
        }
    }
}

/// A field kept by both policies whose merge rule or owner priority changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeChange {
    pub entity: String,
    pub field: String,
    pub old: Merge,
    pub new: Merge,
}

/// An entity kept by both policies whose protobuf message changed (full names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageChange {
    pub entity: String,
    pub old: String,
    pub new: String,
}

/// A system's copies of an entity that need a resync once the new policy is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    pub system: String,
    pub entity: String,
    /// The fields to send again, in name order.
    pub fields: Vec<String>,
}

/// The changes from one policy to another. Every list is sorted: names in name order, access
/// changes by entity, system, right ([`Right`]'s order) and gained before lost, merge changes
/// by entity and field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    pub systems_added: Vec<String>,
    pub systems_removed: Vec<String>,
    pub entities_added: Vec<String>,
    pub entities_removed: Vec<String>,
    pub messages: Vec<MessageChange>,
    pub access: Vec<AccessChange>,
    pub merges: Vec<MergeChange>,
}

impl PolicyDiff {
    /// Whether the two policies grant the same rights with the same merge rules.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of changes: systems and entities added or removed, messages changed, access
    /// changes (one per entity, system, right and direction) and merge changes.
    pub fn len(&self) -> usize {
        self.systems_added.len()
            + self.systems_removed.len()
            + self.entities_added.len()
            + self.entities_removed.len()
            + self.messages.len()
            + self.access.len()
            + self.merges.len()
    }

    /// The diff from the new policy back to the old one.
    pub fn reversed(&self) -> PolicyDiff {
        let mut access: Vec<AccessChange> = self
            .access
            .iter()
            .map(|a| AccessChange {
                change: a.change.reversed(),
                ..a.clone()
            })
            .collect();
        access.sort_by(|a, b| access_key(a).cmp(&access_key(b)));
        PolicyDiff {
            systems_added: self.systems_removed.clone(),
            systems_removed: self.systems_added.clone(),
            entities_added: self.entities_removed.clone(),
            entities_removed: self.entities_added.clone(),
            messages: self
                .messages
                .iter()
                .map(|m| MessageChange {
                    entity: m.entity.clone(),
                    old: m.new.clone(),
                    new: m.old.clone(),
                })
                .collect(),
            access,
            merges: self
                .merges
                .iter()
                .map(|m| MergeChange {
                    entity: m.entity.clone(),
                    field: m.field.clone(),
                    old: m.new.clone(),
                    new: m.old.clone(),
                })
                .collect(),
        }
    }

    /// The copies to resync once the new policy is in force, by system then entity: every
    /// system that gains sight of fields (a new system included; every reader of an entity
    /// whose message changed) needs the values it has never been sent.
    pub fn resyncs(&self) -> Vec<Resync> {
        let mut wanted: BTreeMap<(&str, &str), &[String]> = BTreeMap::new();
        for a in &self.access {
            if a.right == Right::Read && a.change == Change::Gained {
                wanted.insert((a.system.as_str(), a.entity.as_str()), &a.fields);
            }
        }
        wanted
            .into_iter()
            .map(|((system, entity), fields)| Resync {
                system: system.to_owned(),
                entity: entity.to_owned(),
                fields: fields.to_vec(),
            })
            .collect()
    }

    /// The systems that stop seeing fields: the router no longer sends them, and their copies
    /// keep the values they hold (Concord erases nothing).
    pub fn kept(&self) -> impl Iterator<Item = &AccessChange> {
        self.access
            .iter()
            .filter(|a| a.right == Right::Read && a.change == Change::Lost)
    }
}

fn access_key(a: &AccessChange) -> (&str, &str, Right, Change) {
    (&a.entity, &a.system, a.right, a.change)
}

/// What one system holds on one entity under one policy (nothing when either is absent).
#[derive(Debug, Default)]
struct Held<'p> {
    read: BTreeSet<&'p str>,
    write: BTreeSet<&'p str>,
    create: bool,
    delete: bool,
}

impl<'p> Held<'p> {
    fn of(entity: Option<&'p EntityPolicy>, system: Option<SystemId>) -> Held<'p> {
        let (Some(e), Some(s)) = (entity, system) else {
            return Held::default();
        };
        Held {
            read: e.names(e.visible_to(s)).collect(),
            write: e.names(e.owned_by(s)).collect(),
            create: e.create.contains(s),
            delete: e.delete.contains(s),
        }
    }
}

/// The changes from `old` to `new`.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let names = |p: &Policy| -> BTreeSet<String> { p.systems().iter().cloned().collect() };
    let (old_systems, new_systems) = (names(old), names(new));
    let entity_names =
        |p: &Policy| -> BTreeSet<String> { p.entities().iter().map(|e| e.name.clone()).collect() };
    let (old_entities, new_entities) = (entity_names(old), entity_names(new));
    let systems: BTreeSet<&String> = old_systems.union(&new_systems).collect();
    let entities: BTreeSet<&String> = old_entities.union(&new_entities).collect();

    let mut out = PolicyDiff {
        systems_added: new_systems.difference(&old_systems).cloned().collect(),
        systems_removed: old_systems.difference(&new_systems).cloned().collect(),
        entities_added: new_entities.difference(&old_entities).cloned().collect(),
        entities_removed: old_entities.difference(&new_entities).cloned().collect(),
        ..PolicyDiff::default()
    };
    for entity in entities {
        let (oe, ne) = (old.entity(entity), new.entity(entity));
        // An entity whose message changed has other fields, whatever their names.
        let mut retyped = false;
        if let (Some(o), Some(n)) = (oe, ne) {
            if o.message.full_name() != n.message.full_name() {
                retyped = true;
                out.messages.push(MessageChange {
                    entity: entity.clone(),
                    old: o.message.full_name().to_owned(),
                    new: n.message.full_name().to_owned(),
                });
            }
            for rule in o.fields.iter().filter(|_| !retyped) {
                let Some(nr) = n.field_index(&rule.name).and_then(|i| n.fields.get(i)) else {
                    continue;
                };
                let (om, nm) = (Merge::of(old, rule), Merge::of(new, nr));
                if om != nm {
                    out.merges.push(MergeChange {
                        entity: entity.clone(),
                        field: rule.name.clone(),
                        old: om,
                        new: nm,
                    });
                }
            }
        }
        for system in &systems {
            let was = Held::of(oe, old.system_id(system));
            let is = Held::of(ne, new.system_id(system));
            let mut push = |right, change, fields: Vec<&str>| {
                out.access.push(AccessChange {
                    entity: entity.clone(),
                    system: (*system).clone(),
                    right,
                    change,
                    fields: fields.into_iter().map(str::to_owned).collect(),
                });
            };
            for (right, before, after) in [
                (Right::Read, &was.read, &is.read),
                (Right::Write, &was.write, &is.write),
            ] {
                let (gained, lost): (Vec<&str>, Vec<&str>) = if retyped {
                    (
                        after.iter().copied().collect(),
                        before.iter().copied().collect(),
                    )
                } else {
                    (
                        after.difference(before).copied().collect(),
                        before.difference(after).copied().collect(),
                    )
                };
                if !gained.is_empty() {
                    push(right, Change::Gained, gained);
                }
                if !lost.is_empty() {
                    push(right, Change::Lost, lost);
                }
            }
            for (right, before, after) in [
                (Right::Create, was.create, is.create),
                (Right::Delete, was.delete, is.delete),
            ] {
                match (before, after) {
                    (false, true) => push(right, Change::Gained, Vec::new()),
                    (true, false) => push(right, Change::Lost, Vec::new()),
                    _ => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::seed_pool;

    const SEED: &str = include_str!("../../../examples/seed/policy.toml");

    fn load(text: &str) -> Policy {
        Policy::from_toml(text, "policy.toml", &seed_pool()).unwrap()
    }

    /// The seed policy with each `(from, to)` replaced (each `from` must be there).
    fn seed_with(edits: &[(&str, &str)]) -> Policy {
        let mut text = SEED.to_owned();
        for (from, to) in edits {
            assert!(text.contains(from), "{from}");
            text = text.replace(from, to);
        }
        load(&text)
    }

    fn access(
        entity: &str,
        system: &str,
        right: Right,
        change: Change,
        fields: &[&str],
    ) -> AccessChange {
        AccessChange {
            entity: entity.into(),
            system: system.into(),
            right,
            change,
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_policy_against_itself_changes_nothing() {
        let d = diff(&load(SEED), &load(SEED));
        assert!(d.is_empty(), "{d:#?}");
        assert_eq!(d, PolicyDiff::default());
        assert!(d.resyncs().is_empty());
    }

    #[test]
    fn a_new_system_gains_what_it_sees_and_needs_a_resync() {
        let new = seed_with(&[
            (
                "[systems.delivery]",
                "[systems.billing]\n[systems.delivery]",
            ),
            (
                "amount_paid = { owner = \"orders\", visible = [\"support\"] }",
                "amount_paid = { owner = \"orders\", visible = [\"support\", \"billing\"] }",
            ),
            (
                "name = { owner = \"orders\", visible = [\"support\", \"delivery\"] }",
                "name = { owner = \"orders\", visible = [\"*\"] }",
            ),
        ]);
        let d = diff(&load(SEED), &new);
        assert_eq!(d.systems_added, ["billing"]);
        assert!(d.systems_removed.is_empty() && d.entities_added.is_empty());
        assert_eq!(
            d.access,
            [access(
                "customer",
                "billing",
                Right::Read,
                Change::Gained,
                &["amount_paid", "name"]
            )]
        );
        assert_eq!(d.len(), 2);
        assert_eq!(
            d.resyncs(),
            [Resync {
                system: "billing".into(),
                entity: "customer".into(),
                fields: strings(&["amount_paid", "name"]),
            }]
        );
        assert_eq!(d.kept().count(), 0);
        // Backwards: the system goes, with what it saw; nothing to resync.
        let back = diff(&new, &load(SEED));
        assert_eq!(back, d.reversed());
        assert_eq!(back.systems_removed, ["billing"]);
        assert!(back.resyncs().is_empty());
        assert_eq!(back.kept().collect::<Vec<_>>(), [&back.access[0]]);
    }

    #[test]
    fn losing_sight_of_fields_is_kept_not_resynced() {
        let new = seed_with(&[
            (
                "address = { owner = \"orders\", visible = [\"support\", \"delivery\"] }",
                "address = { owner = \"orders\", visible = [\"support\"] }",
            ),
            (
                "tier = { owner = \"orders\", visible = [\"support\"] }",
                "tier = { owner = \"orders\", visible = [\"delivery\"] }",
            ),
        ]);
        let d = diff(&load(SEED), &new);
        assert_eq!(
            d.access,
            [
                access(
                    "customer",
                    "delivery",
                    Right::Read,
                    Change::Gained,
                    &["tier"]
                ),
                access(
                    "customer",
                    "delivery",
                    Right::Read,
                    Change::Lost,
                    &["address"]
                ),
                access("customer", "support", Right::Read, Change::Lost, &["tier"]),
            ]
        );
        assert_eq!(
            d.resyncs(),
            [Resync {
                system: "delivery".into(),
                entity: "customer".into(),
                fields: strings(&["tier"]),
            }]
        );
        assert_eq!(
            d.kept().map(|a| a.system.as_str()).collect::<Vec<_>>(),
            ["delivery", "support"]
        );
    }

    #[test]
    fn ownership_create_and_delete_changes_are_listed() {
        // Warehouse moves from delivery to orders (delivery keeps seeing it); support may now
        // create records and orders may no longer delete them.
        let new = seed_with(&[
            (
                "warehouse = { owner = \"delivery\" }",
                "warehouse = { owner = \"orders\", visible = [\"delivery\"] }",
            ),
            (
                "create = [\"orders\"]",
                "create = [\"orders\", \"support\"]",
            ),
            ("delete = [\"orders\"]", "delete = []"),
        ]);
        let d = diff(&load(SEED), &new);
        assert_eq!(
            d.access,
            [
                access(
                    "customer",
                    "delivery",
                    Right::Write,
                    Change::Lost,
                    &["warehouse"]
                ),
                access(
                    "customer",
                    "orders",
                    Right::Read,
                    Change::Gained,
                    &["warehouse"]
                ),
                access(
                    "customer",
                    "orders",
                    Right::Write,
                    Change::Gained,
                    &["warehouse"]
                ),
                access("customer", "orders", Right::Delete, Change::Lost, &[]),
                access("customer", "support", Right::Create, Change::Gained, &[]),
            ]
        );
        assert!(d.merges.is_empty());
        assert_eq!(diff(&new, &load(SEED)), d.reversed());
    }

    #[test]
    fn merge_rule_and_priority_changes_are_listed() {
        let new = seed_with(&[
            (
                "phone = { owners = [\"orders\", \"support\"], merge = \"lww\"",
                "phone = { owners = [\"support\", \"orders\"], merge = \"priority\"",
            ),
            (
                "delivery_notes = { owners = [\"support\", \"delivery\"], merge = \"priority\" }",
                "delivery_notes = { owners = [\"delivery\", \"support\"], merge = \"priority\" }",
            ),
            // The owners' order does not matter to lww, nor the rule to a single owner.
            (
                "language = { owners = [\"orders\", \"support\"], merge = \"lww\"",
                "language = { owners = [\"support\", \"orders\"], merge = \"lww\"",
            ),
            (
                "tier = { owner = \"orders\",",
                "tier = { owner = \"orders\", merge = \"priority\",",
            ),
        ]);
        let d = diff(&load(SEED), &new);
        assert!(d.access.is_empty(), "{:#?}", d.access);
        assert_eq!(
            d.merges,
            [
                MergeChange {
                    entity: "customer".into(),
                    field: "delivery_notes".into(),
                    old: Merge::Priority(strings(&["support", "delivery"])),
                    new: Merge::Priority(strings(&["delivery", "support"])),
                },
                MergeChange {
                    entity: "customer".into(),
                    field: "phone".into(),
                    old: Merge::Lww,
                    new: Merge::Priority(strings(&["support", "orders"])),
                },
            ]
        );
        assert!(d.resyncs().is_empty());
    }

    #[test]
    fn entities_added_and_removed() {
        let address = "\n[entities.place]\nmessage = \"seed.v1.Address\"\ncreate = [\"orders\"]\n[entities.place.fields]\ncity = { owner = \"orders\", visible = [\"delivery\"] }\n";
        let old = load(SEED);
        let new = load(&format!("{SEED}{address}"));
        let d = diff(&old, &new);
        assert_eq!(d.entities_added, ["place"]);
        assert_eq!(
            d.access,
            [
                access("place", "delivery", Right::Read, Change::Gained, &["city"]),
                access("place", "orders", Right::Read, Change::Gained, &["city"]),
                access("place", "orders", Right::Write, Change::Gained, &["city"]),
                access("place", "orders", Right::Create, Change::Gained, &[]),
            ]
        );
        assert_eq!(
            d.resyncs()
                .iter()
                .map(|r| (r.system.as_str(), r.entity.as_str()))
                .collect::<Vec<_>>(),
            [("delivery", "place"), ("orders", "place")]
        );
        assert_eq!(diff(&new, &old).entities_removed, ["place"]);
    }

    struct TwoMessages;

    impl protox::file::FileResolver for TwoMessages {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            match name {
                "two.proto" => protox::file::File::from_source(
                    name,
                    "syntax = \"proto3\";\npackage two.v1;\n\
                     message Person { optional string name = 1; optional string note = 2; }\n\
                     message Firm { optional string name = 1; }\n",
                ),
                _ => Err(protox::Error::file_not_found(name)),
            }
        }
    }

    #[test]
    fn an_entity_on_another_message_has_other_fields_whatever_their_names() {
        let mut compiler = protox::Compiler::with_file_resolver(TwoMessages);
        compiler.open_files(["two.proto"]).unwrap();
        let pool = compiler.descriptor_pool();
        let policy = |message: &str, fields: &str| {
            let text = format!(
                "[systems.a]\n[systems.b]\n[entities.party]\nmessage = \"two.v1.{message}\"\n\
                 [entities.party.fields]\n{fields}"
            );
            Policy::from_toml(&text, "two.toml", &pool).unwrap()
        };
        let old = policy(
            "Person",
            "name = { owner = \"a\", visible = [\"b\"] }\nnote = { owner = \"a\" }\n",
        );
        let new = policy("Firm", "name = { owner = \"a\", visible = [\"b\"] }\n");
        let d = diff(&old, &new);
        assert_eq!(
            d.messages,
            [MessageChange {
                entity: "party".into(),
                old: "two.v1.Person".into(),
                new: "two.v1.Firm".into(),
            }]
        );
        assert_eq!(
            d.access,
            [
                access("party", "a", Right::Read, Change::Gained, &["name"]),
                access("party", "a", Right::Read, Change::Lost, &["name", "note"]),
                access("party", "a", Right::Write, Change::Gained, &["name"]),
                access("party", "a", Right::Write, Change::Lost, &["name", "note"]),
                access("party", "b", Right::Read, Change::Gained, &["name"]),
                access("party", "b", Right::Read, Change::Lost, &["name"]),
            ]
        );
        assert_eq!(
            d.resyncs()
                .iter()
                .map(|r| (r.system.as_str(), r.fields.clone()))
                .collect::<Vec<_>>(),
            [("a", strings(&["name"])), ("b", strings(&["name"]))]
        );
        assert_eq!(diff(&new, &old), d.reversed());
        // Under the same message, only `note` goes.
        let d = diff(
            &old,
            &policy("Person", "name = { owner = \"a\", visible = [\"b\"] }\n"),
        );
        assert_eq!(
            d.access,
            [
                access("party", "a", Right::Read, Change::Lost, &["note"]),
                access("party", "a", Right::Write, Change::Lost, &["note"]),
            ]
        );
    }

    // Random policies over the seed schema: systems from a fixed pool, an entity on the
    // Customer or the Address (so its message may change), another on the Address, each
    // present or not.

    const SYSTEMS: [&str; 4] = ["alpha", "beta", "delta", "gamma"];

    #[derive(Debug, Clone)]
    struct FieldSpec {
        include: bool,
        /// A permutation of the systems: the first `owners` own the field, highest first.
        order: Vec<usize>,
        owners: usize,
        merge: u8,
        readers: Vec<bool>,
        star: bool,
    }

    #[derive(Debug, Clone)]
    struct EntitySpec {
        name: &'static str,
        message: &'static str,
        fields: Vec<FieldSpec>,
        create: Vec<bool>,
        delete: Vec<bool>,
    }

    fn field_spec(n: usize) -> impl Strategy<Value = FieldSpec> {
        (
            prop::bool::weighted(0.7),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            1..=n.min(3),
            0u8..3,
            prop::collection::vec(any::<bool>(), n),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(include, order, owners, merge, readers, star)| FieldSpec {
                include,
                order,
                owners,
                merge,
                readers,
                star,
            })
    }

    fn entity_spec(
        n: usize,
        name: &'static str,
        messages: &'static [&'static str],
    ) -> impl Strategy<Value = Option<EntitySpec>> {
        (
            prop::bool::weighted(0.8),
            prop::sample::select(messages),
            prop::collection::vec(field_spec(n), 12),
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec(any::<bool>(), n),
        )
            .prop_map(move |(present, message, fields, create, delete)| {
                present.then_some(EntitySpec {
                    name,
                    message,
                    fields,
                    create,
                    delete,
                })
            })
    }

    /// A random policy's TOML text.
    fn policy_text() -> impl Strategy<Value = String> {
        prop::sample::subsequence(SYSTEMS.to_vec(), 1..=SYSTEMS.len()).prop_flat_map(|systems| {
            let n = systems.len();
            (
                Just(systems),
                entity_spec(n, "contact", &["seed.v1.Customer", "seed.v1.Address"]),
                entity_spec(n, "place", &["seed.v1.Address"]),
            )
                .prop_map(|(systems, a, b)| render(&systems, [a, b].iter().flatten()))
        })
    }

    fn render<'a>(systems: &[&str], entities: impl Iterator<Item = &'a EntitySpec>) -> String {
        use std::fmt::Write as _;
        let list = |ids: &mut dyn Iterator<Item = usize>| {
            let names: Vec<String> = ids.map(|i| format!("\"{}\"", systems[i])).collect();
            format!("[{}]", names.join(", "))
        };
        let chosen = |bits: &[bool]| (0..bits.len()).filter(|i| bits[*i]).collect::<Vec<_>>();
        let mut t = String::new();
        for s in systems {
            writeln!(t, "[systems.{s}]").unwrap();
        }
        for e in entities {
            writeln!(t, "[entities.{}]\nmessage = \"{}\"", e.name, e.message).unwrap();
            writeln!(t, "create = {}", list(&mut chosen(&e.create).into_iter())).unwrap();
            writeln!(t, "delete = {}", list(&mut chosen(&e.delete).into_iter())).unwrap();
            writeln!(t, "[entities.{}.fields]", e.name).unwrap();
            let message = seed_pool().get_message_by_name(e.message).unwrap();
            for (f, spec) in message.fields().zip(&e.fields) {
                if !spec.include {
                    continue;
                }
                let owners = &spec.order[..spec.owners];
                let merge = match (owners.len(), spec.merge) {
                    (1, 0) => "",
                    (_, 1) | (_, 0) => ", merge = \"lww\"",
                    _ => ", merge = \"priority\"",
                };
                let visible = if spec.star {
                    "[\"*\"]".to_owned()
                } else {
                    list(
                        &mut spec.order[spec.owners..]
                            .iter()
                            .copied()
                            .filter(|s| spec.readers[*s]),
                    )
                };
                writeln!(
                    t,
                    "{} = {{ owners = {}{merge}, visible = {visible} }}",
                    f.name(),
                    list(&mut owners.iter().copied())
                )
                .unwrap();
            }
        }
        t
    }

    /// Whether `system` holds `right` on `entity` (on `field` for read and write) in `p`.
    fn holds(p: &Policy, entity: &str, system: &str, right: Right, field: &str) -> bool {
        let (Some(e), Some(s)) = (p.entity(entity), p.system_id(system)) else {
            return false;
        };
        let in_set = |set: crate::FieldSet| e.names(set).any(|n| n == field);
        match right {
            Right::Read => in_set(e.visible_to(s)),
            Right::Write => in_set(e.owned_by(s)),
            Right::Create => e.create.contains(s),
            Right::Delete => e.delete.contains(s),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn diff_of_a_policy_with_itself_is_empty(text in policy_text()) {
            let a = load(&text);
            let d = diff(&a, &load(&text));
            prop_assert!(d.is_empty(), "{d:#?}");
            prop_assert!(d.resyncs().is_empty());
        }

        #[test]
        fn what_one_way_gains_the_other_way_loses(a in policy_text(), b in policy_text()) {
            let (a, b) = (load(&a), load(&b));
            let forth = diff(&a, &b);
            let back = diff(&b, &a);
            prop_assert_eq!(&back, &forth.reversed());
            let gains = |d: &PolicyDiff| d.access.iter().filter(|x| x.change == Change::Gained).map(|x| (x.entity.clone(), x.system.clone(), x.right, x.fields.clone())).collect::<Vec<_>>();
            let losses = |d: &PolicyDiff| d.access.iter().filter(|x| x.change == Change::Lost).map(|x| (x.entity.clone(), x.system.clone(), x.right, x.fields.clone())).collect::<Vec<_>>();
            prop_assert_eq!(gains(&forth), losses(&back));
            prop_assert_eq!(losses(&forth), gains(&back));
            prop_assert_eq!(&forth.systems_added, &back.systems_removed);
            prop_assert_eq!(&forth.entities_added, &back.entities_removed);
        }

        /// The old rights, less what the diff says is lost, plus what it says is gained, are
        /// exactly the new rights; and every system that gains sight of a field is resynced
        /// for it.
        #[test]
        fn old_rights_minus_losses_plus_gains_are_the_new_rights(a in policy_text(), b in policy_text()) {
            let (a, b) = (load(&a), load(&b));
            let d = diff(&a, &b);
            let listed = |entity: &str, system: &str, right: Right, change: Change, field: &str| {
                d.access.iter().any(|x| {
                    x.entity == entity
                        && x.system == system
                        && x.right == right
                        && x.change == change
                        && (!right.is_per_field() || x.fields.iter().any(|f| f == field))
                })
            };
            let resynced = d.resyncs();
            let fields: Vec<String> = seed_pool()
                .all_messages()
                .flat_map(|m| m.fields().map(|f| f.name().to_owned()).collect::<Vec<_>>())
                .collect();
            for entity in ["contact", "place"] {
                for system in SYSTEMS {
                    for right in [Right::Read, Right::Write, Right::Create, Right::Delete] {
                        for field in &fields {
                            let before = holds(&a, entity, system, right, field);
                            let after = holds(&b, entity, system, right, field);
                            let lost = listed(entity, system, right, Change::Lost, field);
                            let gained = listed(entity, system, right, Change::Gained, field);
                            prop_assert_eq!(
                                after,
                                (before && !lost) || gained,
                                "{} {} {:?} {}", entity, system, right, field
                            );
                            prop_assert!(!lost || before);
                            prop_assert!(!gained || after);
                            if right == Right::Read && gained {
                                prop_assert!(resynced.iter().any(|r| r.system == system
                                    && r.entity == entity
                                    && r.fields.contains(field)));
                            }
                        }
                    }
                }
            }
            for r in &resynced {
                for f in &r.fields {
                    prop_assert!(holds(&b, &r.entity, &r.system, Right::Read, f));
                }
            }
        }
    }
}
