//! A wire-level fast path for the record projection: the accepted fields of a record are cut
//! from its protobuf bytes by scanning them once, without decoding into a `DynamicMessage`.
//!
//! The reflective path (`DynamicMessage::decode`, [`crate::route::project`], `encode_to_vec`)
//! stays the reference. [`filter`] answers only when its output is byte-identical to it, and
//! returns `None` for anything it does not follow (malformed input, groups, maps, packed or
//! repeated scalars, non-canonical varints, values the decoder would truncate, ...); the caller
//! then takes the reflective path, which also reports the errors.
//!
//! What the reflective path does, and this module reproduces:
//! - fields are re-encoded in field-number order, whatever their order in the input;
//! - a singular scalar, string or bytes field given several times keeps its last value; the
//!   elements of a repeated string, bytes or message field are kept in order;
//! - a singular message field given several times is merged (here: not followed);
//! - unknown fields are dropped at every depth, so nested messages get a new length prefix;
//! - a field with implicit presence (proto3 without `optional`) holding its default value is
//!   not encoded;
//! - at the top level only the policy's fields are kept; nested messages keep all their known
//!   fields.
//!
//! Canonical (shortest) varints re-encode to the same bytes, so a known field whose key and
//! value are canonical and in range is copied as it is.

use std::collections::HashMap;
use std::ops::Range;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};

use crate::model::{EntityPolicy, FieldRule};
use crate::sets::FieldSet;

/// Deepest message nesting the fast path follows (prost's decoder stops at 100).
const MAX_DEPTH: usize = 32;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// How the records of one entity are filtered: built once per entity from its message type and
/// its policy fields.
#[derive(Debug, Clone)]
pub(crate) struct RecordPlan {
    /// The record's message type (index 0) and every message type reachable from it, each
    /// once: a self-recursive type refers to its own index.
    messages: Vec<MessagePlan>,
    /// For each field of `messages[0]` (same order): its position in the entity's field list,
    /// or `None` when the policy does not declare it (it is then never emitted).
    entity_index: Vec<Option<usize>>,
}

/// The known fields of one message type.
#[derive(Debug, Clone)]
struct MessagePlan {
    /// Sorted by field number.
    fields: Vec<FieldPlan>,
    /// Numbers of the extensions of this message known to the descriptor pool: the decoder
    /// keeps them (they are not unknown fields), so the fast path does not follow them.
    extensions: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct FieldPlan {
    number: u32,
    class: Class,
    /// Implicit presence (proto3 without `optional`, outside a oneof): a default value is
    /// not encoded.
    implicit: bool,
    repeated: bool,
    /// The (non-synthetic) oneof holding the field, by position in the message's oneofs.
    oneof: Option<usize>,
}

/// What a field's values look like on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Varint(VarintRange),
    /// fixed32, sfixed32, float.
    Fixed32 {
        float: bool,
    },
    /// fixed64, sfixed64, double.
    Fixed64 {
        float: bool,
    },
    String,
    Bytes,
    /// A message field, by index into [`RecordPlan::messages`].
    Message(usize),
    /// Maps, groups and repeated scalars: a record holding one is not followed.
    Unsupported,
}

/// The varint values that decode and re-encode to the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarintRange {
    /// int32 and enums: decoded as 32 bits and re-encoded sign-extended to 64 bits, so only
    /// sign-extended 32-bit values round-trip.
    Int32,
    /// uint32 and sint32: decoded as the low 32 bits.
    Uint32,
    /// Decoded as `value != 0`.
    Bool,
    /// int64, uint64, sint64: every value round-trips.
    Any64,
}

impl RecordPlan {
    /// The plan for records of `message` whose policy declares `rules`.
    pub(crate) fn new(message: &MessageDescriptor, rules: &[FieldRule]) -> RecordPlan {
        let mut table = TypeTable::default();
        table.index_of(message);
        let mut messages = Vec::new();
        // `index_of` appends the message types it meets: plan them in turn until none is new.
        while let Some(desc) = table.types.get(messages.len()).cloned() {
            messages.push(MessagePlan::new(&desc, &mut table));
        }
        let entity_index = messages
            .first()
            .map(|top| {
                top.fields
                    .iter()
                    .map(|f| rules.iter().position(|r| r.descriptor.number() == f.number))
                    .collect()
            })
            .unwrap_or_default();
        RecordPlan {
            messages,
            entity_index,
        }
    }
}

/// Message types met while planning, by full name.
#[derive(Default)]
struct TypeTable {
    types: Vec<MessageDescriptor>,
    by_name: HashMap<String, usize>,
}

impl TypeTable {
    fn index_of(&mut self, message: &MessageDescriptor) -> usize {
        if let Some(i) = self.by_name.get(message.full_name()) {
            return *i;
        }
        let i = self.types.len();
        self.by_name.insert(message.full_name().to_owned(), i);
        self.types.push(message.clone());
        i
    }
}

impl MessagePlan {
    fn new(message: &MessageDescriptor, table: &mut TypeTable) -> MessagePlan {
        let mut fields: Vec<FieldPlan> = message
            .fields()
            .map(|f| FieldPlan::new(message, &f, table))
            .collect();
        fields.sort_by_key(|f| f.number);
        let mut extensions: Vec<u32> = message.extensions().map(|e| e.number()).collect();
        extensions.sort_unstable();
        MessagePlan { fields, extensions }
    }

    fn find(&self, number: u32) -> Option<usize> {
        self.fields.binary_search_by_key(&number, |f| f.number).ok()
    }
}

impl FieldPlan {
    fn new(
        message: &MessageDescriptor,
        field: &FieldDescriptor,
        table: &mut TypeTable,
    ) -> FieldPlan {
        let repeated = field.is_list();
        let class = if field.is_map() || field.is_group() {
            Class::Unsupported
        } else {
            match field.kind() {
                Kind::Int32 | Kind::Enum(_) => Class::Varint(VarintRange::Int32),
                Kind::Uint32 | Kind::Sint32 => Class::Varint(VarintRange::Uint32),
                Kind::Int64 | Kind::Uint64 | Kind::Sint64 => Class::Varint(VarintRange::Any64),
                Kind::Bool => Class::Varint(VarintRange::Bool),
                Kind::Fixed32 | Kind::Sfixed32 => Class::Fixed32 { float: false },
                Kind::Float => Class::Fixed32 { float: true },
                Kind::Fixed64 | Kind::Sfixed64 => Class::Fixed64 { float: false },
                Kind::Double => Class::Fixed64 { float: true },
                Kind::String => Class::String,
                Kind::Bytes => Class::Bytes,
                Kind::Message(m) => Class::Message(table.index_of(&m)),
            }
        };
        // Repeated scalars are accepted packed or not and re-encoded as the descriptor says:
        // not followed.
        let class = match class {
            Class::String | Class::Bytes | Class::Message(_) => class,
            _ if repeated => Class::Unsupported,
            _ => class,
        };
        let oneof = field
            .containing_oneof()
            .filter(|o| !o.is_synthetic())
            .and_then(|o| {
                message
                    .oneofs()
                    .position(|x| x.full_name() == o.full_name())
            });
        FieldPlan {
            number: field.number(),
            class,
            implicit: !field.supports_presence() && !field.is_list() && !field.is_map(),
            repeated,
            oneof,
        }
    }
}

/// The accepted fields of a record, encoded as the reflective path encodes them, and the byte
/// range of each encoded field (a repeated field has one range per element).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireFields {
    pub(crate) bytes: Vec<u8>,
    /// Per encoded field, in field-number order: its position in the entity's field list and
    /// its bytes (key and value).
    pub(crate) parts: Vec<(usize, Range<usize>)>,
}

impl WireFields {
    /// The encoded record holding only `fields` (a subset of the accepted fields).
    pub(crate) fn projection(&self, fields: FieldSet) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len());
        for (i, range) in &self.parts {
            if fields.contains(*i) {
                out.extend_from_slice(self.bytes.get(range.clone()).unwrap_or_default());
            }
        }
        out
    }
}

/// The fields of `record` in `accepted`, cut at the wire level, or `None` when the result might
/// differ from the reflective path's or the record might not decode (the caller then takes the
/// reflective path).
///
/// `Some(w)` implies that `DynamicMessage::decode` of the record succeeds and that for every
/// `F ⊆ accepted`, `w.projection(F)` equals `route::project(&decoded, entity, F).encode_to_vec()`.
pub(crate) fn filter(plan: &RecordPlan, record: &[u8], accepted: FieldSet) -> Option<WireFields> {
    let top = plan.messages.first()?;
    let mut f = Filter {
        plan,
        occurrences: Vec::with_capacity(top.fields.len() + 4),
        out: Vec::with_capacity(record.len()),
    };
    let mut parts = Vec::with_capacity(accepted.len());
    let occurrences = f.scan(top, record)?;
    for i in occurrences.clone() {
        let occ = *f.occurrences.get(i)?;
        if f.superseded(top, i, occurrences.end)? {
            continue;
        }
        let field = top.fields.get(occ.field)?;
        let index = plan
            .entity_index
            .get(occ.field)
            .copied()
            .flatten()
            .filter(|e| accepted.contains(*e));
        let start = f.out.len();
        match index {
            Some(e) => {
                f.emit(field, &occ, record, 1)?;
                if f.out.len() > start {
                    parts.push((e, start..f.out.len()));
                }
            }
            // Not emitted, but a message must still decode for the record to decode.
            None if matches!(field.class, Class::Message(_)) => {
                f.emit(field, &occ, record, 1)?;
                f.out.truncate(start);
            }
            None => {}
        }
    }
    Some(WireFields {
        bytes: f.out,
        parts,
    })
}

/// Benchmark hook, **for benches only** (not part of the API): the wire-level projection of
/// `record` onto `accepted`, as the router would cut it, or `None` off the fast path.
#[doc(hidden)]
pub fn bench_filter(entity: &EntityPolicy, record: &[u8], accepted: FieldSet) -> Option<Vec<u8>> {
    filter(&entity.record_plan, record, accepted).map(|w| w.projection(accepted))
}

/// One known field found in a message's bytes.
#[derive(Debug, Clone, Copy)]
struct Occurrence {
    /// Position in the message plan's fields.
    field: usize,
    number: u32,
    /// Where the field starts (its key).
    start: usize,
    /// Where the key ends.
    key_end: usize,
    /// Where the value starts (after the length prefix of a length-delimited value).
    value_start: usize,
    /// Where the field ends.
    end: usize,
    /// The value is its type's default (zero, empty).
    default: bool,
}

/// The state of one [`filter`] call: the occurrences of every message being filtered (a stack:
/// a nested message's occurrences follow its parent's) and the output.
struct Filter<'p> {
    plan: &'p RecordPlan,
    occurrences: Vec<Occurrence>,
    out: Vec<u8>,
}

impl<'p> Filter<'p> {
    /// Scans `bytes` as a `message`, validating every field (unknown ones are skipped), and
    /// pushes its known fields' occurrences sorted by field number, then by position.
    fn scan(&mut self, message: &MessagePlan, bytes: &[u8]) -> Option<Range<usize>> {
        let base = self.occurrences.len();
        let mut pos = 0;
        let mut last_number = 0;
        let mut sorted = true;
        // Per oneof seen in this message: the member it holds (a message has few oneofs).
        let mut oneofs: Vec<(usize, u32)> = Vec::new();
        while pos < bytes.len() {
            let start = pos;
            let (number, wire_type) = read_key(bytes, &mut pos)?;
            let Some(slot) = message.find(number) else {
                skip_unknown(message, number, wire_type, bytes, &mut pos)?;
                continue;
            };
            let field = message.fields.get(slot)?;
            let key_end = pos;
            let (value_start, default) = read_value(field, wire_type, bytes, &mut pos)?;
            if let Some(oneof) = field.oneof {
                // Two members of one oneof: the decoder keeps the last one only.
                match oneofs.iter().find(|(o, _)| *o == oneof) {
                    Some((_, member)) if *member != number => return None,
                    Some(_) => {}
                    None => oneofs.push((oneof, number)),
                }
            }
            sorted &= number >= last_number;
            last_number = number;
            self.occurrences.push(Occurrence {
                field: slot,
                number,
                start,
                key_end,
                value_start,
                end: pos,
                default,
            });
        }
        let found = self.occurrences.get_mut(base..)?;
        if !sorted {
            // The encoder writes fields in number order; the elements of a repeated field keep
            // their input order.
            found.sort_unstable_by_key(|o| (o.number, o.start));
        }
        Some(base..self.occurrences.len())
    }

    /// Whether occurrence `i` is replaced by a later occurrence of the same singular field (the
    /// decoder keeps the last value); `None` for a singular message given twice (the decoder
    /// merges them).
    fn superseded(&self, message: &MessagePlan, i: usize, end: usize) -> Option<bool> {
        let occ = self.occurrences.get(i)?;
        let field = message.fields.get(occ.field)?;
        let again = i + 1 < end
            && self
                .occurrences
                .get(i + 1)
                .is_some_and(|next| next.number == occ.number);
        if !again || field.repeated {
            return Some(false);
        }
        match field.class {
            Class::Message(_) => None,
            _ => Some(true),
        }
    }

    /// Writes one occurrence as the encoder writes it. `depth` is the nesting depth of the
    /// message the occurrence's value would be.
    fn emit(
        &mut self,
        field: &FieldPlan,
        occ: &Occurrence,
        bytes: &[u8],
        depth: usize,
    ) -> Option<()> {
        match field.class {
            Class::Message(m) => {
                let key = bytes.get(occ.start..occ.key_end)?;
                let value = bytes.get(occ.value_start..occ.end)?;
                self.emit_message(m, key, value, depth)
            }
            _ if field.implicit && occ.default => Some(()),
            _ => {
                self.out.extend_from_slice(bytes.get(occ.start..occ.end)?);
                Some(())
            }
        }
    }

    /// Writes a message field: its key, then its known fields with a new length prefix.
    fn emit_message(&mut self, m: usize, key: &[u8], value: &[u8], depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let plan = self.plan;
        let message = plan.messages.get(m)?;
        self.out.extend_from_slice(key);
        let content_start = self.out.len();
        let occurrences = self.scan(message, value)?;
        for i in occurrences.clone() {
            let occ = *self.occurrences.get(i)?;
            if self.superseded(message, i, occurrences.end)? {
                continue;
            }
            self.emit(message.fields.get(occ.field)?, &occ, value, depth + 1)?;
        }
        self.occurrences.truncate(occurrences.start);
        // Prefix the content with its length: append the varint, then rotate it to the front.
        let len = u64::try_from(self.out.len() - content_start).ok()?;
        let mut prefix = [0u8; 10];
        let n = write_varint(len, &mut prefix);
        self.out.extend_from_slice(prefix.get(..n)?);
        self.out.get_mut(content_start..)?.rotate_right(n);
        Some(())
    }
}

/// Reads a field key: field number (at least 1) and wire type.
fn read_key(bytes: &[u8], pos: &mut usize) -> Option<(u32, u8)> {
    let key = u32::try_from(read_varint(bytes, pos)?).ok()?;
    let number = key >> 3;
    (number >= 1).then_some((number, (key & 7) as u8))
}

/// Skips an unknown field's value, validating it at least as strictly as the decoder (varints
/// must be canonical here too). Groups (wire types 3 and 4) are not followed, nor extensions
/// (the decoder keeps those).
fn skip_unknown(
    message: &MessagePlan,
    number: u32,
    wire_type: u8,
    bytes: &[u8],
    pos: &mut usize,
) -> Option<()> {
    if message.extensions.binary_search(&number).is_ok() {
        return None;
    }
    match wire_type {
        VARINT => read_varint(bytes, pos).map(drop),
        FIXED64 => read_fixed(bytes, pos, 8).map(drop),
        LEN => read_len(bytes, pos).map(drop),
        FIXED32 => read_fixed(bytes, pos, 4).map(drop),
        _ => None,
    }
}

/// Reads and validates a known field's value; returns where the value starts (after a length
/// prefix) and whether it is its type's default.
fn read_value(
    field: &FieldPlan,
    wire_type: u8,
    bytes: &[u8],
    pos: &mut usize,
) -> Option<(usize, bool)> {
    let start = *pos;
    let default = match (field.class, wire_type) {
        (Class::Varint(range), VARINT) => read_varint_value(range, bytes, pos)?,
        (Class::Fixed32 { float }, FIXED32) => {
            fixed_is_default(read_fixed(bytes, pos, 4)?, float, field.implicit)?
        }
        (Class::Fixed64 { float }, FIXED64) => {
            fixed_is_default(read_fixed(bytes, pos, 8)?, float, field.implicit)?
        }
        (Class::String, LEN) => {
            let value = read_len(bytes, pos)?;
            // The decoder refuses a string that is not UTF-8.
            std::str::from_utf8(bytes.get(value.clone())?).ok()?;
            return Some((value.start, value.is_empty()));
        }
        (Class::Bytes | Class::Message(_), LEN) => {
            let value = read_len(bytes, pos)?;
            return Some((value.start, value.is_empty()));
        }
        // A wrong wire type (the decoder fails) or a field the fast path does not follow.
        _ => return None,
    };
    Some((start, default))
}

/// Reads a varint value of a field; `Some(is zero)` when it re-encodes to the same bytes.
fn read_varint_value(range: VarintRange, bytes: &[u8], pos: &mut usize) -> Option<bool> {
    let v = read_varint(bytes, pos)?;
    let round_trips = match range {
        // The decoder keeps the low 32 bits and the encoder sign-extends them.
        VarintRange::Int32 => v as i64 == i64::from(v as i32),
        // The decoder truncates to 32 bits.
        VarintRange::Uint32 => v <= u64::from(u32::MAX),
        // The decoder reads `v != 0`, which encodes as 0 or 1.
        VarintRange::Bool => v <= 1,
        VarintRange::Any64 => true,
    };
    round_trips.then_some(v == 0)
}

/// Whether a fixed-width value is its type's default; `None` for a float negative zero with
/// implicit presence (the encoder compares it equal to the default and drops it: not followed).
fn fixed_is_default(value: &[u8], float: bool, implicit: bool) -> Option<bool> {
    // Little-endian: the sign bit is the top bit of the last byte.
    let (last, rest) = value.split_last()?;
    let rest_zero = rest.iter().all(|b| *b == 0);
    if float && implicit && rest_zero && *last == 0x80 {
        return None;
    }
    Some(rest_zero && *last == 0)
}

/// Reads `n` bytes.
fn read_fixed<'b>(bytes: &'b [u8], pos: &mut usize, n: usize) -> Option<&'b [u8]> {
    let end = pos.checked_add(n)?;
    let value = bytes.get(*pos..end)?;
    *pos = end;
    Some(value)
}

/// Reads a length prefix and returns the range of the value it delimits.
fn read_len(bytes: &[u8], pos: &mut usize) -> Option<Range<usize>> {
    let len = usize::try_from(read_varint(bytes, pos)?).ok()?;
    let start = *pos;
    let end = start.checked_add(len).filter(|end| *end <= bytes.len())?;
    *pos = end;
    Some(start..end)
}

/// Reads a varint in its shortest form, the only form the encoder writes: `None` for an
/// over-long encoding (a last byte of zero after the first), more than 64 bits or truncated
/// input.
pub(crate) fn read_varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            let overlong = b == 0 && i > 0;
            let overflow = i == 9 && b > 1;
            return (!overlong && !overflow).then_some(value);
        }
    }
    None
}

/// Writes `value` as a varint into `buf`; returns its length.
fn write_varint(mut value: u64, buf: &mut [u8; 10]) -> usize {
    let mut n = 0;
    for slot in buf.iter_mut() {
        n += 1;
        if value < 0x80 {
            *slot = value as u8;
            break;
        }
        *slot = (value as u8 & 0x7f) | 0x80;
        value >>= 7;
    }
    n
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use concord_seed_model::seed::v1::{Address, Customer};
    use proptest::prelude::*;
    use prost::Message;
    use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, Value};

    use super::*;
    use crate::model::Policy;
    use crate::route::project;

    /// The seed policy: it declares all 12 Customer fields.
    const CUSTOMER_POLICY: &str = include_str!("../../../examples/seed/policy.toml");

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
        assert_eq!(entity.record_plan.messages.len(), 3);
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
