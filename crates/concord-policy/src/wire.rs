//! A wire-level fast path for the record projection: the accepted fields of a record are cut
//! from its protobuf bytes by scanning them once, without decoding into a `DynamicMessage`.
//!
//! The reflective path (`DynamicMessage::decode`, [`crate::route::project()`], `encode_to_vec`)
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

use crate::sets::FieldSet;

/// Deepest message nesting the fast path follows (prost's decoder stops at 100).
pub(crate) const MAX_DEPTH: usize = 32;

/// Protobuf wire types.
pub(crate) const VARINT: u8 = 0;
pub(crate) const FIXED64: u8 = 1;
pub(crate) const LEN: u8 = 2;
pub(crate) const FIXED32: u8 = 5;

/// How the records of one entity are filtered: built once per entity from its message type and
/// the fields its policy declares.
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
    /// The plan for records of `message` whose policy declares `declared`: each field with
    /// its position in the entity's field list.
    pub(crate) fn new<'f>(
        message: &MessageDescriptor,
        declared: impl IntoIterator<Item = (usize, &'f FieldDescriptor)>,
    ) -> RecordPlan {
        let declared: Vec<(usize, u32)> = declared
            .into_iter()
            .map(|(index, field)| (index, field.number()))
            .collect();
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
                    .map(|f| {
                        declared
                            .iter()
                            .find(|(_, number)| *number == f.number)
                            .map(|(index, _)| *index)
                    })
                    .collect()
            })
            .unwrap_or_default();
        RecordPlan {
            messages,
            entity_index,
        }
    }

    /// How many message types the plan follows (the record's and those reachable from it).
    #[cfg(test)]
    pub(crate) fn message_types(&self) -> usize {
        self.messages.len()
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
/// `F ⊆ accepted`, `w.projection(F)` equals `route::project(&decoded, entity, F).encode_to_vec()`
/// (`crate::route::project`'s tests check it).
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
pub(crate) fn read_key(bytes: &[u8], pos: &mut usize) -> Option<(u32, u8)> {
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
pub(crate) fn read_fixed<'b>(bytes: &'b [u8], pos: &mut usize, n: usize) -> Option<&'b [u8]> {
    let end = pos.checked_add(n)?;
    let value = bytes.get(*pos..end)?;
    *pos = end;
    Some(value)
}

/// Reads a length prefix and returns the range of the value it delimits.
pub(crate) fn read_len(bytes: &[u8], pos: &mut usize) -> Option<Range<usize>> {
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
