//! The projections of a record: the accepted fields cut once from the record, then one
//! projection per field set a target may see.
//!
//! A projection is rebuilt field by field from the fields its target may see, never copied from
//! the input bytes, so no hidden field and no protobuf unknown field ever reaches a system that
//! may not see it. The wire-level scan ([`crate::wire`]) cuts the accepted fields straight from
//! the record's bytes when its result is byte-identical to the reflective path ([`project()`]),
//! which otherwise does the work and reports an invalid record.

use prost::Message;
use prost_reflect::DynamicMessage;

use super::{DeadLetter, DeadLetterReason, dead};
use crate::model::EntityPolicy;
use crate::sets::FieldSet;
use crate::value::strip_unknown_value;
use crate::wire::{self, WireFields, read_varint};

/// Cuts the projections of one record.
pub(super) enum Projector {
    /// The accepted fields encoded once, with unknown fields stripped at every depth, and the
    /// byte range of each: a projection is the concatenation of its fields' ranges.
    Cut(WireFields),
    /// The decoded record, projected and encoded field by field (never expected: only when the
    /// reflective encoding could not be split).
    Reflect(DynamicMessage),
}

impl Projector {
    /// The accepted fields of `record`: cut straight from its bytes on the wire-level fast path
    /// ([`wire::filter`], which answers only when its result is identical), otherwise decoded,
    /// projected and re-encoded through the descriptor, which also reports an invalid record.
    pub(super) fn new(
        entity: &EntityPolicy,
        record: &[u8],
        accepted: FieldSet,
    ) -> Result<Self, DeadLetter> {
        if let Some(cut) = wire::filter(&entity.record_plan, record, accepted) {
            return Ok(Projector::Cut(cut));
        }
        let decoded = DynamicMessage::decode(entity.message.clone(), record).map_err(|e| {
            dead(
                DeadLetterReason::InvalidRecord,
                format!("record is not a valid {}: {e}", entity.message.full_name()),
            )
        })?;
        Ok(match split(&decoded, entity, accepted) {
            Some(cut) => Projector::Cut(cut),
            None => Projector::Reflect(decoded),
        })
    }

    /// The encoded record holding only `fields` (a subset of the accepted fields).
    pub(super) fn projection(&self, entity: &EntityPolicy, fields: FieldSet) -> Vec<u8> {
        match self {
            Projector::Cut(cut) => cut.projection(fields),
            Projector::Reflect(record) => project(record, entity, fields).encode_to_vec(),
        }
    }
}

/// The accepted fields of a decoded record, encoded once and split into one byte range per
/// encoded field (in field-number order, which is exactly how any projection encodes). `None`
/// if the bytes cannot be split (never expected: they are our own encoding).
fn split(record: &DynamicMessage, entity: &EntityPolicy, accepted: FieldSet) -> Option<WireFields> {
    let bytes = project(record, entity, accepted).encode_to_vec();
    let mut parts = Vec::with_capacity(accepted.len());
    let mut pos = 0;
    while pos < bytes.len() {
        let start = pos;
        let key = read_varint(&bytes, &mut pos)?;
        let number = u32::try_from(key >> 3).ok()?;
        let len = match key & 7 {
            0 => read_varint(&bytes, &mut pos).map(|_| 0)?,
            1 => 8,
            2 => usize::try_from(read_varint(&bytes, &mut pos)?).ok()?,
            5 => 4,
            _ => return None,
        };
        pos = pos.checked_add(len).filter(|end| *end <= bytes.len())?;
        let index = accepted.iter().find(|i| {
            entity
                .fields
                .get(*i)
                .is_some_and(|f| f.descriptor.number() == number)
        })?;
        parts.push((index, start..pos));
    }
    Some(WireFields { bytes, parts })
}

/// A copy of `record` holding only `fields`, with every unknown field removed at every depth.
pub fn project(record: &DynamicMessage, entity: &EntityPolicy, fields: FieldSet) -> DynamicMessage {
    let mut out = DynamicMessage::new(entity.message.clone());
    for i in fields.iter() {
        let Some(rule) = entity.fields.get(i) else {
            continue;
        };
        if record.has_field(&rule.descriptor) {
            let mut value = record.get_field(&rule.descriptor).into_owned();
            strip_unknown_value(&mut value);
            out.set_field(&rule.descriptor, value);
        }
    }
    out
}

/// Benchmark hook, **for benches only** (not part of the API): the wire-level projection of
/// `record` onto `accepted`, as the router would cut it, or `None` off the fast path.
#[doc(hidden)]
pub fn bench_filter(entity: &EntityPolicy, record: &[u8], accepted: FieldSet) -> Option<Vec<u8>> {
    wire::filter(&entity.record_plan, record, accepted).map(|w| w.projection(accepted))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use concord_seed_model::seed::v1::{Address, Customer};
    use proptest::prelude::*;
    use prost::Message;
    use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, Value};

    use super::*;
    use crate::model::Policy;
    use crate::wire::{
        FIXED32, FIXED64, LEN, MAX_DEPTH, VARINT, filter, read_fixed, read_key, read_len,
    };

    /// The seed policy: it declares all 12 Customer fields.
    const CUSTOMER_POLICY: &str = include_str!("../../../../examples/seed/policy.toml");

    /// A test-only schema covering what the Customer does not: implicit presence, every scalar
    /// type, repeated strings/bytes/messages, a packed repeated scalar, a map, a oneof, an enum,
    /// a self-recursive message; and a proto2 message with a group, an unpacked repeated scalar
    /// and an extension.
    const RICH_PROTO: &str = r#"
        syntax = "proto3";
        package wiretest.v1;

        enum Colour { COLOUR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }

        message Leaf {
          string label = 1;
          optional int32 weight = 2;
          bytes data = 3;
        }

        message Node {
          string name = 1;
          Node child = 2;
          repeated Node children = 3;
          sint64 value = 4;
        }

        message Rich {
          int32 i32 = 1;
          optional int32 opt_i32 = 2;
          uint32 u32 = 3;
          sint32 s32 = 4;
          int64 i64 = 5;
          uint64 u64 = 6;
          sint64 s64 = 7;
          bool flag = 8;
          fixed32 fx32 = 9;
          sfixed64 sfx64 = 10;
          double dbl = 11;
          float flt = 12;
          string text = 13;
          bytes blob = 14;
          Colour colour = 15;
          optional string opt_text = 16;
          repeated string tags = 17;
          repeated Leaf leaves = 18;
          repeated int32 numbers = 19;
          map<string, int32> counts = 20;
          oneof choice {
            string choice_text = 21;
            int64 choice_num = 22;
            Leaf choice_leaf = 23;
          }
          Node tree = 24;
          Leaf leaf = 25;
          fixed64 fx64 = 26;
          sfixed32 sfx32 = 27;
          optional double opt_dbl = 28;
          uint32 undeclared = 29;
          repeated bytes blobs = 30;
          optional bool opt_flag = 31;
          int32 far = 100000;
        }
    "#;

    const LEGACY_PROTO: &str = r#"
        syntax = "proto2";
        package wiretest.v1;

        message Legacy {
          optional int32 a = 1;
          optional group Grp = 2 { optional int32 x = 1; }
          repeated int32 plain = 3;
          extensions 100 to 199;
        }

        extend Legacy { optional int32 ext = 100; }
    "#;

    /// Every field of `Rich` but `undeclared`, all owned by one system.
    const RICH_FIELDS: [&str; 31] = [
        "i32",
        "opt_i32",
        "u32",
        "s32",
        "i64",
        "u64",
        "s64",
        "flag",
        "fx32",
        "sfx64",
        "dbl",
        "flt",
        "text",
        "blob",
        "colour",
        "opt_text",
        "tags",
        "leaves",
        "numbers",
        "counts",
        "choice_text",
        "choice_num",
        "choice_leaf",
        "tree",
        "leaf",
        "fx64",
        "sfx32",
        "opt_dbl",
        "blobs",
        "opt_flag",
        "far",
    ];

    struct Sources;

    impl protox::file::FileResolver for Sources {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            match name {
                "wiretest/rich.proto" => protox::file::File::from_source(name, RICH_PROTO),
                "wiretest/legacy.proto" => protox::file::File::from_source(name, LEGACY_PROTO),
                _ => Err(protox::Error::file_not_found(name)),
            }
        }
    }

    fn test_pool() -> DescriptorPool {
        let mut compiler = protox::Compiler::with_file_resolver(Sources);
        compiler
            .open_files(["wiretest/rich.proto", "wiretest/legacy.proto"])
            .unwrap();
        compiler.descriptor_pool()
    }

    fn customer_policy() -> Policy {
        Policy::from_toml(CUSTOMER_POLICY, "customer.toml", &crate::seed_pool()).unwrap()
    }

    fn rich_policy() -> Policy {
        let mut toml = String::from(
            "[systems.a]\n[entities.rich]\nmessage = \"wiretest.v1.Rich\"\n\
             [entities.legacy]\nmessage = \"wiretest.v1.Legacy\"\n\
             [entities.legacy.fields]\na = { owner = \"a\" }\ngrp = { owner = \"a\" }\n\
             plain = { owner = \"a\" }\n[entities.rich.fields]\n",
        );
        for f in RICH_FIELDS {
            toml.push_str(&format!("{f} = {{ owner = \"a\" }}\n"));
        }
        Policy::from_toml(&toml, "rich.toml", &test_pool()).unwrap()
    }

    fn all_fields(entity: &EntityPolicy) -> FieldSet {
        let mut all = FieldSet::default();
        (0..entity.fields.len()).for_each(|i| all.insert(i));
        all
    }

    /// The reflective path's bytes for `fields`, or `None` if the record does not decode.
    fn reflective(entity: &EntityPolicy, record: &[u8], fields: FieldSet) -> Option<Vec<u8>> {
        let decoded = DynamicMessage::decode(entity.message.clone(), record).ok()?;
        Some(project(&decoded, entity, fields).encode_to_vec())
    }

    /// Checks the contract of [`filter`] on one input: `None`, or the reflective result for
    /// `accepted`, each of `subsets` (intersected with `accepted`) and the empty set. Returns
    /// whether the fast path answered.
    fn check(
        entity: &EntityPolicy,
        record: &[u8],
        accepted: FieldSet,
        subsets: &[FieldSet],
    ) -> Result<bool, TestCaseError> {
        let Some(wire) = filter(&entity.record_plan, record, accepted) else {
            return Ok(false);
        };
        let decoded = DynamicMessage::decode(entity.message.clone(), record);
        prop_assert!(decoded.is_ok(), "fast path on an undecodable record");
        let mut sets = vec![accepted, FieldSet::default()];
        sets.extend(subsets.iter().map(|s| s.intersect(accepted)));
        for f in sets {
            let expect = reflective(entity, record, f).unwrap_or_default();
            prop_assert_eq!(
                wire.projection(f),
                expect,
                "fields {:?} of record {:02x?}",
                f,
                record
            );
        }
        Ok(true)
    }

    // ---- A small wire-format model, to build and mutate records field by field. ----

    /// One encoded field.
    #[derive(Debug, Clone, PartialEq)]
    enum Item {
        Varint(u32, u64),
        Fixed64(u32, u64),
        Len(u32, Vec<u8>),
        Fixed32(u32, u32),
        Group(u32, Vec<Item>),
        /// Bytes written as they are (non-canonical encodings).
        Raw(Vec<u8>),
    }

    impl Item {
        fn number(&self) -> u32 {
            match self {
                Item::Varint(n, _)
                | Item::Fixed64(n, _)
                | Item::Len(n, _)
                | Item::Fixed32(n, _)
                | Item::Group(n, _) => *n,
                Item::Raw(_) => 0,
            }
        }
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn put_key(out: &mut Vec<u8>, number: u32, wire_type: u8) {
        put_varint(out, (u64::from(number) << 3) | u64::from(wire_type));
    }

    fn encode(items: &[Item]) -> Vec<u8> {
        let mut out = Vec::new();
        for item in items {
            match item {
                Item::Varint(n, v) => {
                    put_key(&mut out, *n, 0);
                    put_varint(&mut out, *v);
                }
                Item::Fixed64(n, v) => {
                    put_key(&mut out, *n, 1);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Item::Len(n, b) => {
                    put_key(&mut out, *n, 2);
                    put_varint(&mut out, b.len() as u64);
                    out.extend_from_slice(b);
                }
                Item::Fixed32(n, v) => {
                    put_key(&mut out, *n, 5);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Item::Group(n, inner) => {
                    put_key(&mut out, *n, 3);
                    out.extend_from_slice(&encode(inner));
                    put_key(&mut out, *n, 4);
                }
                Item::Raw(b) => out.extend_from_slice(b),
            }
        }
        out
    }

    /// Splits an encoder's output into items.
    fn parse(bytes: &[u8]) -> Vec<Item> {
        try_parse(bytes).expect("well-formed bytes")
    }

    /// Splits bytes into items; `None` if they are not well-formed.
    fn try_parse(bytes: &[u8]) -> Option<Vec<Item>> {
        let mut pos = 0;
        parse_until(bytes, &mut pos, None)
    }

    /// Parses items up to the end of `bytes` or to the end of group `group`.
    fn parse_until(bytes: &[u8], pos: &mut usize, group: Option<u32>) -> Option<Vec<Item>> {
        let mut items = Vec::new();
        while *pos < bytes.len() {
            let (n, wt) = read_key(bytes, pos)?;
            items.push(match wt {
                VARINT => Item::Varint(n, read_varint(bytes, pos)?),
                FIXED64 => Item::Fixed64(
                    n,
                    u64::from_le_bytes(read_fixed(bytes, pos, 8)?.try_into().ok()?),
                ),
                LEN => Item::Len(n, bytes.get(read_len(bytes, pos)?)?.to_vec()),
                FIXED32 => Item::Fixed32(
                    n,
                    u32::from_le_bytes(read_fixed(bytes, pos, 4)?.try_into().ok()?),
                ),
                3 => Item::Group(n, parse_until(bytes, pos, Some(n))?),
                4 if group == Some(n) => return Some(items),
                _ => return None,
            });
        }
        group.is_none().then_some(items)
    }

    /// A field `number` with an over-long varint value (`value` padded with a zero group).
    fn overlong(number: u32, value: u64) -> Item {
        let mut out = Vec::new();
        put_key(&mut out, number, 0);
        let mut v = Vec::new();
        put_varint(&mut v, value);
        if let Some(last) = v.last_mut() {
            *last |= 0x80;
        }
        v.push(0);
        out.extend_from_slice(&v);
        Item::Raw(out)
    }

    // ---- Strategies. ----

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-zA-Z0-9 ]{1,12}",
            "\\PC{1,6}",
            Just("Ünïcödé – 日本語 🦀".to_owned()),
        ]
    }

    fn address() -> impl Strategy<Value = Address> {
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        )
            .prop_map(|(street, city, postal_code, country)| Address {
                street,
                city,
                postal_code,
                country,
            })
    }

    fn customer() -> impl Strategy<Value = Customer> {
        let strings = proptest::collection::vec(proptest::option::of(text()), 9);
        let amount = prop_oneof![
            Just(0i64),
            Just(-1),
            Just(i64::MIN),
            Just(i64::MAX),
            any::<i64>()
        ];
        let tickets = prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()];
        (
            strings,
            proptest::option::of(address()),
            proptest::option::of(amount),
            proptest::option::of(tickets),
        )
            .prop_map(|(s, address, amount_paid, open_tickets)| Customer {
                name: s[0].clone(),
                email: s[1].clone(),
                phone: s[2].clone(),
                address,
                tier: s[3].clone(),
                delivery_status: s[4].clone(),
                warehouse: s[5].clone(),
                amount_paid,
                open_tickets,
                delivery_notes: s[6].clone(),
                support_agent: s[7].clone(),
                language: s[8].clone(),
            })
    }

    /// An unknown field numbered from `numbers`; groups only if `groups`.
    fn unknown_item(
        numbers: impl Strategy<Value = u32> + Clone + 'static,
        groups: bool,
    ) -> BoxedStrategy<Item> {
        let plain = prop_oneof![
            (numbers.clone(), any::<u64>()).prop_map(|(n, v)| Item::Varint(n, v)),
            (numbers.clone(), any::<u64>()).prop_map(|(n, v)| Item::Fixed64(n, v)),
            (
                numbers.clone(),
                proptest::collection::vec(any::<u8>(), 0..8)
            )
                .prop_map(|(n, b)| Item::Len(n, b)),
            (numbers.clone(), any::<u32>()).prop_map(|(n, v)| Item::Fixed32(n, v)),
        ];
        if groups {
            prop_oneof![
                3 => plain.clone(),
                1 => (numbers, proptest::collection::vec(plain, 0..3))
                    .prop_map(|(n, inner)| Item::Group(n, inner)),
            ]
            .boxed()
        } else {
            plain.boxed()
        }
    }

    fn customer_unknown_number() -> impl Strategy<Value = u32> + Clone {
        prop_oneof![13u32..40, Just(1000u32), Just((1u32 << 29) - 1)]
    }

    /// A valid (decodable, canonical) value for a Customer field other than `address`.
    fn customer_override() -> impl Strategy<Value = Item> {
        prop_oneof![
            (prop_oneof![1u32..=3, 5u32..=7, 10u32..=12], text())
                .prop_map(|(n, s)| Item::Len(n, s.into_bytes())),
            any::<i64>().prop_map(|v| Item::Varint(8, v as u64)),
            any::<u32>().prop_map(|v| Item::Varint(9, u64::from(v))),
        ]
    }

    /// A value for a Customer field that may be malformed, out of range or non-canonical.
    fn customer_junk() -> impl Strategy<Value = Item> {
        // Mostly the two varint fields (amount_paid, open_tickets), where a bad value may still
        // decode.
        let number = prop_oneof![3 => 8u32..=9, 1 => 1u32..=12];
        prop_oneof![
            (
                number.clone(),
                prop_oneof![
                    any::<u64>(),
                    Just(2u64),
                    Just(u64::from(u32::MAX) + 1),
                    Just(u64::MAX)
                ]
            )
                .prop_map(|(n, v)| Item::Varint(n, v)),
            (number.clone(), any::<u64>()).prop_map(|(n, v)| Item::Fixed64(n, v)),
            (number.clone(), any::<u32>()).prop_map(|(n, v)| Item::Fixed32(n, v)),
            (number.clone(), proptest::collection::vec(any::<u8>(), 0..6))
                .prop_map(|(n, b)| Item::Len(n, b)),
            (number.clone(), prop_oneof![0u64..300, any::<u64>()])
                .prop_map(|(n, v)| overlong(n, v)),
            number.prop_map(|n| Item::Group(n, Vec::new())),
            // A second address: the decoder merges the two.
            address().prop_map(|a| Item::Len(4, a.encode_to_vec())),
        ]
    }

    /// How a Customer record is changed before filtering. The first group keeps the record
    /// well-formed (the fast path must answer); the second may break it.
    #[derive(Debug, Clone)]
    enum Mutation {
        /// Swap two fields (reorder).
        Swap(usize, usize),
        /// Repeat a non-message field somewhere (the last occurrence wins).
        RepeatScalar(usize, usize),
        /// Set a field again, to another valid value (the last occurrence wins).
        Override(usize, Item),
        /// Insert an unknown field (not a group).
        Unknown(usize, Item),
        /// Insert an unknown field (not a group) into `address`, if set.
        UnknownInAddress(usize, Item),
        // Possibly breaking:
        /// Repeat any field, `address` included.
        RepeatAny(usize, usize),
        /// Insert an unknown field that may be a group, at the top or in `address`.
        UnknownGroup(usize, Item, bool),
        /// Insert a known field number with a malformed or non-canonical value.
        Junk(usize, Item),
        /// Cut the encoded record.
        Truncate(usize),
        /// Flip bits of one byte of the encoded record.
        Flip(usize, u8),
    }

    impl Mutation {
        fn keeps_well_formed(&self) -> bool {
            matches!(
                self,
                Mutation::Swap(..)
                    | Mutation::RepeatScalar(..)
                    | Mutation::Override(..)
                    | Mutation::Unknown(..)
                    | Mutation::UnknownInAddress(..)
            )
        }
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let i = any::<usize>();
        prop_oneof![
            4 => (i, i).prop_map(|(a, b)| Mutation::Swap(a, b)),
            2 => (i, i).prop_map(|(a, b)| Mutation::RepeatScalar(a, b)),
            2 => (i, customer_override()).prop_map(|(a, x)| Mutation::Override(a, x)),
            2 => (i, unknown_item(customer_unknown_number(), false))
                .prop_map(|(a, x)| Mutation::Unknown(a, x)),
            2 => (i, unknown_item(5u32..40, false))
                .prop_map(|(a, x)| Mutation::UnknownInAddress(a, x)),
            1 => (i, i).prop_map(|(a, b)| Mutation::RepeatAny(a, b)),
            1 => (i, unknown_item(5u32..40, true), any::<bool>())
                .prop_map(|(a, x, nested)| Mutation::UnknownGroup(a, x, nested)),
            1 => (i, customer_junk()).prop_map(|(a, x)| Mutation::Junk(a, x)),
            1 => i.prop_map(Mutation::Truncate),
            1 => (i, 1u8..=255).prop_map(|(a, m)| Mutation::Flip(a, m)),
        ]
    }

    fn insert_at(items: &mut Vec<Item>, at: usize, item: Item) {
        let at = at % (items.len() + 1);
        items.insert(at, item);
    }

    /// Inserts `item` into the `address` field's content, if there is one.
    fn insert_in_address(items: &mut [Item], at: usize, item: Item) {
        if let Some(Item::Len(_, content)) = items.iter_mut().find(|x| x.number() == 4) {
            // A junk value may stand there: then nothing is inserted.
            if let Some(mut inner) = try_parse(content) {
                insert_at(&mut inner, at, item);
                *content = encode(&inner);
            }
        }
    }

    /// Applies the item-level mutations, encodes, then applies the byte-level ones.
    fn mutate(record: &[u8], mutations: &[Mutation]) -> Vec<u8> {
        let mut items = parse(record);
        for m in mutations {
            let n = items.len();
            match m.clone() {
                Mutation::Swap(a, b) if n > 0 => items.swap(a % n, b % n),
                Mutation::RepeatScalar(a, b) if n > 0 => {
                    let item = items[a % n].clone();
                    if item.number() != 4 {
                        insert_at(&mut items, b, item);
                    }
                }
                Mutation::RepeatAny(a, b) if n > 0 => {
                    let item = items[a % n].clone();
                    insert_at(&mut items, b, item);
                }
                Mutation::Override(a, item)
                | Mutation::Unknown(a, item)
                | Mutation::Junk(a, item)
                | Mutation::UnknownGroup(a, item, false) => insert_at(&mut items, a, item),
                Mutation::UnknownInAddress(a, item) | Mutation::UnknownGroup(a, item, true) => {
                    insert_in_address(&mut items, a, item)
                }
                _ => {}
            }
        }
        let mut bytes = encode(&items);
        for m in mutations {
            match *m {
                Mutation::Truncate(a) => bytes.truncate(a % (bytes.len() + 1)),
                Mutation::Flip(a, mask) if !bytes.is_empty() => {
                    let i = a % bytes.len();
                    bytes[i] ^= mask;
                }
                _ => {}
            }
        }
        bytes
    }

    fn field_set(bits: u128) -> FieldSet {
        FieldSet(bits)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The main property, on the real Customer: the fast path is the reflective path or
        /// silent, and it answers for every well-formed record.
        #[test]
        fn customer_fast_path_matches_the_reflective_path(
            record in customer(),
            mutations in proptest::collection::vec(mutation(), 0..6),
            accepted in any::<u16>(),
            subsets in proptest::collection::vec(any::<u16>(), 3),
        ) {
            let policy = customer_policy();
            let entity = policy.entity("customer").unwrap();
            let bytes = mutate(&record.encode_to_vec(), &mutations);
            let accepted = field_set(u128::from(accepted & 0xfff));
            let subsets: Vec<FieldSet> =
                subsets.iter().map(|s| field_set(u128::from(*s))).collect();
            let answered = check(entity, &bytes, accepted, &subsets)?;
            if mutations.iter().all(Mutation::keeps_well_formed) {
                prop_assert!(answered, "no fast path for well-formed {:02x?}", bytes);
            }
        }

        /// Pure noise never produces a wrong answer.
        #[test]
        fn customer_random_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            accepted in any::<u16>(),
        ) {
            let policy = customer_policy();
            let entity = policy.entity("customer").unwrap();
            check(entity, &bytes, field_set(u128::from(accepted & 0xfff)), &[])?;
        }
    }

    // ---- The rich schema: values from a seeded generator, over the descriptor. ----

    /// SplitMix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
        fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
            xs[self.below(xs.len() as u64) as usize]
        }
    }

    fn random_string(rng: &mut Rng) -> String {
        let pieces = ["", "a", "Zz9", "é", "日本", "🦀", " ", "\u{0}"];
        (0..rng.below(4)).map(|_| rng.pick(&pieces)).collect()
    }

    fn random_bytes(rng: &mut Rng) -> Vec<u8> {
        (0..rng.below(5)).map(|_| rng.next() as u8).collect()
    }

    fn random_u64(rng: &mut Rng) -> u64 {
        let edges = [0, 1, 127, 128, u64::from(u32::MAX), u64::MAX, 1 << 63];
        if rng.chance(2) {
            rng.pick(&edges)
        } else {
            rng.next() >> rng.below(64)
        }
    }

    fn random_f64(rng: &mut Rng) -> f64 {
        let edges = [0.0, -0.0, 1.5, -2.25, f64::NAN, f64::INFINITY, f64::MIN];
        if rng.chance(2) {
            rng.pick(&edges)
        } else {
            f64::from_bits(rng.next())
        }
    }

    /// Whether a generated message holds something the fast path does not follow.
    #[derive(Default)]
    struct Unsupported(bool);

    fn random_value(rng: &mut Rng, kind: &Kind, depth: usize, flags: &mut Unsupported) -> Value {
        match kind {
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(random_u64(rng) as i32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(random_u64(rng) as i64),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(random_u64(rng) as u32),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(random_u64(rng)),
            Kind::Bool => Value::Bool(rng.chance(2)),
            Kind::Double => Value::F64(random_f64(rng)),
            Kind::Float => Value::F32(random_f64(rng) as f32),
            Kind::String => Value::String(random_string(rng)),
            Kind::Bytes => Value::Bytes(random_bytes(rng).into()),
            Kind::Enum(_) => Value::EnumNumber(rng.pick(&[0, 1, 2, 7, -1])),
            Kind::Message(m) => Value::Message(random_message(rng, m, depth + 1, flags)),
        }
    }

    fn random_message(
        rng: &mut Rng,
        desc: &MessageDescriptor,
        depth: usize,
        flags: &mut Unsupported,
    ) -> DynamicMessage {
        let mut m = DynamicMessage::new(desc.clone());
        for field in desc.fields() {
            let kind = field.kind();
            let is_message = matches!(kind, Kind::Message(_));
            if !rng.chance(2) || (is_message && depth >= 4) {
                continue;
            }
            if field.is_map() {
                // Rare: a record with a map is off the fast path.
                if rng.chance(6) {
                    let mut map = HashMap::new();
                    map.insert(
                        MapKey::String(random_string(rng)),
                        Value::I32(random_u64(rng) as i32),
                    );
                    flags.0 = true;
                    m.set_field(&field, Value::Map(map));
                }
            } else if field.is_list() {
                let packed = !matches!(kind, Kind::String | Kind::Bytes | Kind::Message(_));
                if packed && !rng.chance(6) {
                    continue;
                }
                let n = rng.below(4);
                let values: Vec<Value> = (0..n)
                    .map(|_| random_value(rng, &kind, depth, flags))
                    .collect();
                flags.0 |= packed && n > 0;
                m.set_field(&field, Value::List(values));
            } else {
                let value = random_value(rng, &kind, depth, flags);
                m.set_field(&field, value);
            }
        }
        m
    }

    /// Inserts `item` into the content of a message-typed top-level field of `desc`.
    fn insert_nested(rng: &mut Rng, desc: &MessageDescriptor, items: &mut [Item], item: Item) {
        let nested: Vec<usize> = items
            .iter()
            .enumerate()
            .filter(|(_, x)| {
                matches!(x, Item::Len(..))
                    && desc
                        .get_field(x.number())
                        .is_some_and(|f| matches!(f.kind(), Kind::Message(_)) && !f.is_map())
            })
            .map(|(i, _)| i)
            .collect();
        if nested.is_empty() {
            return;
        }
        let at = rng.pick(&nested);
        if let Item::Len(_, content) = &mut items[at] {
            // A junk value may stand there: then nothing is inserted.
            if let Some(mut inner) = try_parse(content) {
                let pos = rng.below(inner.len() as u64 + 1) as usize;
                inner.insert(pos, item);
                *content = encode(&inner);
            }
        }
    }

    fn random_unknown(rng: &mut Rng, number: u32, groups: bool) -> Item {
        match rng.below(if groups { 5 } else { 4 }) {
            0 => Item::Varint(number, random_u64(rng)),
            1 => Item::Fixed64(number, rng.next()),
            2 => Item::Len(number, random_bytes(rng)),
            3 => Item::Fixed32(number, rng.next() as u32),
            _ => Item::Group(number, vec![Item::Varint(1, 1)]),
        }
    }

    /// A known field number of `desc` with a value that may be of the wrong wire type, out of
    /// range, non-canonical or invalid UTF-8.
    fn random_junk(rng: &mut Rng, desc: &MessageDescriptor) -> Item {
        let numbers: Vec<u32> = desc.fields().map(|f| f.number()).collect();
        let n = rng.pick(&numbers);
        let varints = [
            2,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
            (-1i64) as u64,
            1 << 31,
        ];
        match rng.below(7) {
            0 => Item::Varint(n, rng.pick(&varints)),
            1 => overlong(n, random_u64(rng)),
            2 => Item::Len(n, vec![0xff, 0xfe]),
            3 => Item::Len(n, random_bytes(rng)),
            4 => {
                let any = rng.next();
                Item::Fixed64(n, rng.pick(&[0x8000_0000_0000_0000, 0, any]))
            }
            5 => {
                let any = rng.next() as u32;
                Item::Fixed32(n, rng.pick(&[0x8000_0000, 0, any]))
            }
            _ => Item::Varint(n, random_u64(rng)),
        }
    }

    /// One generated Rich case: the record, and whether the fast path must answer.
    fn rich_case(rng: &mut Rng, desc: &MessageDescriptor) -> (Vec<u8>, bool) {
        let mut flags = Unsupported::default();
        let message = random_message(rng, desc, 0, &mut flags);
        let mut items = parse(&message.encode_to_vec());
        let mut well_formed = !flags.0;
        for _ in 0..rng.below(5) {
            let n = items.len();
            match rng.below(10) {
                0 | 1 if n > 0 => {
                    items.swap(rng.below(n as u64) as usize, rng.below(n as u64) as usize)
                }
                2 if n > 0 => {
                    // Repeat a field: fine unless it is a singular message (merged).
                    let item = items[rng.below(n as u64) as usize].clone();
                    let singular_message = desc
                        .get_field(item.number())
                        .is_some_and(|f| matches!(f.kind(), Kind::Message(_)) && !f.is_list());
                    well_formed &= !singular_message;
                    let at = rng.below(n as u64 + 1) as usize;
                    items.insert(at, item);
                }
                3 => {
                    let number = rng.pick(&[32, 99, 5000, (1 << 29) - 1]);
                    let item = random_unknown(rng, number, false);
                    let at = rng.below(n as u64 + 1) as usize;
                    items.insert(at, item);
                }
                4 => {
                    let number = rng.pick(&[7, 40, 77]);
                    let item = random_unknown(rng, number, false);
                    insert_nested(rng, desc, &mut items, item);
                }
                5 => {
                    let item = random_unknown(rng, 33, true);
                    well_formed &= !matches!(item, Item::Group(..));
                    let at = rng.below(n as u64 + 1) as usize;
                    items.insert(at, item);
                }
                6 | 7 => {
                    well_formed = false;
                    let item = random_junk(rng, desc);
                    let at = rng.below(n as u64 + 1) as usize;
                    items.insert(at, item);
                }
                _ => {}
            }
        }
        let mut bytes = encode(&items);
        if rng.chance(8) && !bytes.is_empty() {
            well_formed = false;
            if rng.chance(2) {
                bytes.truncate(rng.below(bytes.len() as u64) as usize);
            } else {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] ^= (rng.below(255) + 1) as u8;
            }
        }
        (bytes, well_formed)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The property on a schema with every field shape the fast path may meet.
        #[test]
        fn rich_fast_path_matches_the_reflective_path(seed in any::<u64>()) {
            let policy = rich_policy();
            let entity = policy.entity("rich").unwrap();
            let mut rng = Rng(seed);
            let (bytes, well_formed) = rich_case(&mut rng, &entity.message);
            let width = entity.fields.len() as u32;
            let mask = |rng: &mut Rng| u128::from(rng.next()) & ((1u128 << width) - 1);
            let accepted = if rng.chance(3) { all_fields(entity) } else { field_set(mask(&mut rng)) };
            let subsets = [field_set(mask(&mut rng)), field_set(mask(&mut rng))];
            let answered = check(entity, &bytes, accepted, &subsets)?;
            if well_formed {
                prop_assert!(answered, "no fast path for well-formed {:02x?}", bytes);
            }
        }
    }

    // ---- Fixed cases. ----

    fn customer_entity_check(record: &[u8]) -> Option<WireFields> {
        let policy = customer_policy();
        let entity = policy.entity("customer").unwrap();
        let accepted = all_fields(entity);
        let answered = check(entity, record, accepted, &[]).unwrap();
        let wire = filter(&entity.record_plan, record, accepted);
        assert_eq!(answered, wire.is_some());
        wire
    }

    #[test]
    fn unknown_field_inside_address_is_dropped() {
        let clean = Customer {
            name: Some("Ada".into()),
            address: Some(Address {
                city: Some("London".into()),
                country: Some("GB".into()),
                ..Default::default()
            }),
            open_tickets: Some(3),
            ..Default::default()
        };
        let mut items = parse(&clean.encode_to_vec());
        insert_in_address(&mut items, 1, Item::Len(9, b"secret".to_vec()));
        insert_in_address(&mut items, 0, Item::Varint(77, 5));
        let record = encode(&items);
        assert_ne!(record, clean.encode_to_vec());
        let wire = customer_entity_check(&record).expect("on the fast path");
        assert_eq!(wire.bytes, clean.encode_to_vec());
        assert_eq!(wire.parts.len(), 3);
    }

    #[test]
    fn parts_follow_field_numbers_and_carry_entity_indices() {
        let policy = customer_policy();
        let entity = policy.entity("customer").unwrap();
        let record = encode(&[
            Item::Varint(9, 4),
            Item::Len(1, b"Ada".to_vec()),
            Item::Len(12, b"en".to_vec()),
            Item::Len(1, b"Grace".to_vec()),
        ]);
        let wire = filter(&entity.record_plan, &record, all_fields(entity)).unwrap();
        let names: Vec<&str> = wire
            .parts
            .iter()
            .map(|(i, _)| entity.fields[*i].name.as_str())
            .collect();
        assert_eq!(names, ["name", "open_tickets", "language"]);
        let expect = Customer {
            name: Some("Grace".into()),
            open_tickets: Some(4),
            language: Some("en".into()),
            ..Default::default()
        };
        assert_eq!(wire.bytes, expect.encode_to_vec());
    }

    /// Records that decode, but whose re-encoding differs from their bytes or that the fast
    /// path does not follow: it must stay silent.
    #[test]
    fn decodable_records_off_the_fast_path() {
        let policy = customer_policy();
        let entity = policy.entity("customer").unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("uint32 above 2^32", encode(&[Item::Varint(9, 1 << 32 | 5)])),
            ("over-long varint", encode(&[overlong(9, 5)])),
            ("over-long key", vec![0x8a, 0x00, 0x01, b'x']),
            (
                "address twice",
                encode(&[
                    Item::Len(4, encode(&[Item::Len(2, b"Paris".to_vec())])),
                    Item::Len(4, encode(&[Item::Len(4, b"FR".to_vec())])),
                ]),
            ),
            (
                "unknown group",
                encode(&[Item::Group(20, vec![Item::Varint(1, 1)])]),
            ),
            (
                "unknown group in address",
                encode(&[Item::Len(4, encode(&[Item::Group(9, vec![])]))]),
            ),
        ];
        for (what, record) in cases {
            assert!(
                DynamicMessage::decode(entity.message.clone(), record.as_slice()).is_ok(),
                "{what}: should decode"
            );
            assert!(
                filter(&entity.record_plan, &record, all_fields(entity)).is_none(),
                "{what}: should be off the fast path"
            );
        }
    }

    #[test]
    fn undecodable_records_are_off_the_fast_path() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("invalid UTF-8", encode(&[Item::Len(1, vec![0xc3, 0x28])])),
            ("wrong wire type", encode(&[Item::Fixed32(1, 7)])),
            (
                "truncated",
                encode(&[Item::Len(1, b"Ada".to_vec())])[..3].to_vec(),
            ),
            ("field zero", vec![0x00, 0x01]),
            ("wire type 6", vec![0x0e]),
            (
                "varint too long",
                vec![
                    0x48, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
                ],
            ),
        ];
        for (what, record) in cases {
            assert!(customer_entity_check(&record).is_none(), "{what}");
        }
    }

    /// Values the decoder changes (the encoder would write other bytes) and values it keeps.
    #[test]
    fn rich_value_ranges() {
        let policy = rich_policy();
        let entity = policy.entity("rich").unwrap();
        let all = all_fields(entity);
        let run = |items: &[Item]| {
            let record = encode(items);
            let answered = check(entity, &record, all, &[]).unwrap();
            assert!(
                DynamicMessage::decode(entity.message.clone(), record.as_slice()).is_ok(),
                "{items:?} should decode"
            );
            answered
        };
        let minus_one = (-1i64) as u64;
        // int32 / enum: sign-extended 32-bit values only.
        assert!(run(&[Item::Varint(1, minus_one)]));
        assert!(run(&[Item::Varint(15, minus_one)]));
        assert!(
            !run(&[Item::Varint(1, u64::from(u32::MAX))]),
            "int32 -1 in 5 bytes"
        );
        assert!(!run(&[Item::Varint(1, 1 << 31)]), "int32 2^31");
        assert!(!run(&[Item::Varint(15, 1 << 40)]), "enum above 32 bits");
        // uint32, sint32: 32 bits.
        assert!(run(&[Item::Varint(3, u64::from(u32::MAX))]));
        assert!(!run(&[Item::Varint(4, 1 << 32)]));
        // bool: 0 or 1.
        assert!(run(&[Item::Varint(8, 1)]));
        assert!(!run(&[Item::Varint(8, 2)]));
        // 64-bit varints: anything.
        assert!(run(&[Item::Varint(5, u64::MAX), Item::Varint(7, u64::MAX)]));
        // Implicit presence: a default is dropped; a float negative zero is not followed.
        assert!(run(&[
            Item::Varint(1, 0),
            Item::Len(13, Vec::new()),
            Item::Fixed64(11, 0)
        ]));
        assert!(!run(&[Item::Fixed64(11, (-0.0f64).to_bits())]));
        assert!(!run(&[Item::Fixed32(12, (-0.0f32).to_bits())]));
        // Explicit presence: a default or a negative zero is kept as it is.
        assert!(run(&[
            Item::Varint(2, 0),
            Item::Fixed64(28, (-0.0f64).to_bits())
        ]));
        // The last value of a singular field wins, also when it is the default.
        assert!(run(&[Item::Varint(3, 9), Item::Varint(3, 0)]));
        // One oneof member, twice: fine; two members: off the fast path.
        assert!(run(&[
            Item::Len(21, b"x".to_vec()),
            Item::Len(21, b"y".to_vec())
        ]));
        assert!(
            run(&[Item::Varint(22, 0)]),
            "a oneof member keeps its default"
        );
        assert!(!run(&[Item::Len(21, b"x".to_vec()), Item::Varint(22, 1)]));
        // Maps and packed scalars: off the fast path.
        assert!(!run(&[Item::Len(
            20,
            encode(&[Item::Len(1, b"k".to_vec()), Item::Varint(2, 1)])
        )]));
        assert!(!run(&[Item::Len(19, vec![1, 2, 3])]));
        assert!(!run(&[Item::Varint(19, 1)]));
        // A field the policy does not declare is validated but never emitted.
        assert!(run(&[Item::Varint(29, 5), Item::Varint(100_000, 1)]));
        let record = encode(&[Item::Varint(29, 5)]);
        let wire = filter(&entity.record_plan, &record, all).unwrap();
        assert!(wire.bytes.is_empty());
        // Repeated strings, bytes and messages keep every element, in order, even interleaved.
        let leaf = |label: &[u8]| {
            Item::Len(
                18,
                encode(&[Item::Len(1, label.to_vec()), Item::Varint(99, 1)]),
            )
        };
        assert!(run(&[
            Item::Len(17, b"b".to_vec()),
            leaf(b"one"),
            Item::Len(17, Vec::new()),
            Item::Len(30, Vec::new()),
            Item::Varint(1, 5),
            leaf(b""),
            Item::Len(17, b"a".to_vec()),
        ]));
    }

    fn nested_tree(depth: usize) -> Vec<u8> {
        let mut node = encode(&[Item::Len(1, b"leaf".to_vec()), Item::Varint(50, 1)]);
        for _ in 0..depth {
            node = encode(&[Item::Varint(4, 3), Item::Len(2, node)]);
        }
        encode(&[Item::Len(24, node)])
    }

    #[test]
    fn self_recursive_messages_are_followed_to_a_bounded_depth() {
        let policy = rich_policy();
        let entity = policy.entity("rich").unwrap();
        let all = all_fields(entity);
        let shallow = nested_tree(10);
        assert!(check(entity, &shallow, all, &[]).unwrap());
        let deep = nested_tree(MAX_DEPTH + 5);
        assert!(DynamicMessage::decode(entity.message.clone(), deep.as_slice()).is_ok());
        assert!(filter(&entity.record_plan, &deep, all).is_none());
        // Deeper than the decoder goes: it fails, and so must the fast path.
        let too_deep = nested_tree(120);
        assert!(DynamicMessage::decode(entity.message.clone(), too_deep.as_slice()).is_err());
        assert!(filter(&entity.record_plan, &too_deep, all).is_none());
        // The plan holds each message type once.
        assert_eq!(entity.record_plan.message_types(), 3);
    }

    #[test]
    fn proto2_groups_repeated_scalars_and_extensions() {
        let policy = rich_policy();
        let entity = policy.entity("legacy").unwrap();
        let all = all_fields(entity);
        let run = |items: &[Item]| check(entity, &encode(items), all, &[]).unwrap();
        assert!(
            run(&[Item::Varint(1, 0), Item::Varint(150, 1)]),
            "unknown in the extension range"
        );
        assert!(!run(&[Item::Group(2, vec![Item::Varint(1, 1)])]));
        assert!(!run(&[Item::Varint(3, 1)]));
        assert!(!run(&[Item::Varint(100, 1)]), "a known extension");
    }
}
