//! The router's work on one message, as a pure function: decode and validate the envelope,
//! decide, and re-encode one projection per target system.
//!
//! A projection is rebuilt field by field from the fields its target may see, never copied from
//! the input bytes, so no hidden field and no protobuf unknown field ever reaches a system that
//! may not see it.

use concord_proto::v1::{ChangeEvent, FieldClock};
use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage, Value};

use crate::Op;
use crate::clock::physical_ms;
use crate::decide::Rejection;
use crate::model::{EntityPolicy, Policy};
use crate::sets::{FieldSet, SystemId};
use crate::wire::{self, WireFields, read_varint};

/// Limits the router enforces on every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSettings {
    /// Largest accepted message body, in bytes.
    pub max_message_bytes: usize,
    /// How far a field clock may be ahead of the router's clock, in milliseconds.
    pub clock_skew_ms: u64,
    /// Refuse messages without a broker-validated `user_id` property.
    pub require_user_id: bool,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            max_message_bytes: 1024 * 1024,
            clock_skew_ms: 60_000,
            require_user_id: false,
        }
    }
}

/// Longest accepted canonical record key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// One message as the router received it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub routing_key: &'a str,
    pub body: &'a [u8],
    /// The AMQP `user_id` property (validated by the broker against the connection's user).
    pub user_id: Option<&'a str>,
}

/// Why a message goes to a dead-letter queue: the codes of header `concord-reason`, for the
/// router's dead letters and the adapters'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    TooLarge,
    Undecodable,
    UnsupportedSchemaVersion,
    InvalidEventId,
    RoutingKeyMismatch,
    UnknownSystem,
    UnknownEntity,
    UserIdMismatch,
    MissingUserId,
    InvalidKey,
    InvalidOp,
    DuplicateField,
    FieldMaskTooLarge,
    MissingClock,
    ClockSkew,
    InvalidRecord,
    UnknownField,
    /// An adapter's system refused to apply the change (a permanent error of the adapter).
    ApplyFailed,
    /// An adapter could not write a higher-priority owner's value back over a local edit.
    WriteBackFailed,
}

impl DeadLetterReason {
    /// The snake_case code carried in the `concord-reason` header and in metrics.
    pub fn as_str(self) -> &'static str {
        use DeadLetterReason::*;
        match self {
            TooLarge => "too_large",
            Undecodable => "undecodable",
            UnsupportedSchemaVersion => "unsupported_schema_version",
            InvalidEventId => "invalid_event_id",
            RoutingKeyMismatch => "routing_key_mismatch",
            UnknownSystem => "unknown_system",
            UnknownEntity => "unknown_entity",
            UserIdMismatch => "user_id_mismatch",
            MissingUserId => "missing_user_id",
            InvalidKey => "invalid_key",
            InvalidOp => "invalid_op",
            DuplicateField => "duplicate_field",
            FieldMaskTooLarge => "field_mask_too_large",
            MissingClock => "missing_clock",
            ClockSkew => "clock_skew",
            InvalidRecord => "invalid_record",
            UnknownField => "unknown_field",
            ApplyFailed => "apply_failed",
            WriteBackFailed => "write_back_failed",
        }
    }
}

/// A message (or the part of it) that cannot be processed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    /// Human-readable detail naming what was wrong.
    pub detail: String,
}

fn dead(reason: DeadLetterReason, detail: impl Into<String>) -> DeadLetter {
    DeadLetter {
        reason,
        detail: detail.into(),
    }
}

/// One projection for one target system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub system: String,
    /// Number of fields in the projection.
    pub fields: usize,
    /// The encoded `ChangeEvent` to publish to the system's inbox.
    pub body: Vec<u8>,
}

/// A processed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub event_id: String,
    pub source: String,
    pub entity: String,
    pub key: String,
    pub op: Op,
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
    pub deliveries: Vec<Delivery>,
    pub observed_at_ms: u64,
    /// Set when part of the event could not be processed (unknown fields): the original message
    /// also goes to the dead-letter queue with this reason, while the rest is routed.
    pub dead_letter: Option<DeadLetter>,
}

/// The outcome for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Routed(Routed),
    DeadLetter(DeadLetter),
}

/// Processes one message at router time `now_ms`.
pub fn process(
    policy: &Policy,
    settings: &RouterSettings,
    now_ms: u64,
    input: Input<'_>,
) -> Outcome {
    match try_process(policy, settings, now_ms, input) {
        Ok(r) => Outcome::Routed(r),
        Err(d) => Outcome::DeadLetter(d),
    }
}

fn try_process(
    policy: &Policy,
    settings: &RouterSettings,
    now_ms: u64,
    input: Input<'_>,
) -> Result<Routed, DeadLetter> {
    use DeadLetterReason as R;
    if input.body.len() > settings.max_message_bytes {
        return Err(dead(
            R::TooLarge,
            format!(
                "{} bytes, limit {}",
                input.body.len(),
                settings.max_message_bytes
            ),
        ));
    }
    let ev = ChangeEvent::decode(input.body)
        .map_err(|e| dead(R::Undecodable, format!("not a concord.v1.ChangeEvent: {e}")))?;
    if ev.schema_version != concord_proto::SCHEMA_VERSION {
        return Err(dead(
            R::UnsupportedSchemaVersion,
            format!(
                "schema_version {} (supported: {})",
                ev.schema_version,
                concord_proto::SCHEMA_VERSION
            ),
        ));
    }
    if uuid::Uuid::parse_str(&ev.event_id).is_err() {
        return Err(dead(
            R::InvalidEventId,
            format!("event_id {:?} is not a UUID", truncate(&ev.event_id)),
        ));
    }
    let expected_key = format!("{}.{}", ev.source, ev.entity);
    if input.routing_key != expected_key {
        return Err(dead(
            R::RoutingKeyMismatch,
            format!(
                "routing key {:?} but envelope says source {:?}, entity {:?}",
                truncate(input.routing_key),
                truncate(&ev.source),
                truncate(&ev.entity)
            ),
        ));
    }
    let source = policy.system_id(&ev.source).ok_or_else(|| {
        dead(
            R::UnknownSystem,
            format!("system {:?} is not in the policy", truncate(&ev.source)),
        )
    })?;
    let entity = policy.entity(&ev.entity).ok_or_else(|| {
        dead(
            R::UnknownEntity,
            format!("entity {:?} is not in the policy", truncate(&ev.entity)),
        )
    })?;
    match input.user_id {
        Some(u) if u != ev.source => {
            return Err(dead(
                R::UserIdMismatch,
                format!(
                    "published by user {:?} for source {:?}",
                    truncate(u),
                    ev.source
                ),
            ));
        }
        None if settings.require_user_id => {
            return Err(dead(R::MissingUserId, "no user_id property"));
        }
        _ => {}
    }
    if ev.key.is_empty() || ev.key.len() > MAX_KEY_BYTES {
        return Err(dead(
            R::InvalidKey,
            format!("key must be 1..={MAX_KEY_BYTES} bytes, is {}", ev.key.len()),
        ));
    }
    let op = Op::from_wire(ev.op).ok_or_else(|| dead(R::InvalidOp, format!("op {}", ev.op)))?;
    let n_message_fields = entity.message.fields().len();
    if ev.field_mask.len() > n_message_fields {
        return Err(dead(
            R::FieldMaskTooLarge,
            format!(
                "{} names, message has {} fields",
                ev.field_mask.len(),
                n_message_fields
            ),
        ));
    }
    let mut changed = FieldSet::default();
    // Unknown names as given (for the duplicate check; at most one per message field) and as
    // reported (truncated).
    let mut unknown_names: Vec<&str> = Vec::new();
    let mut unknown = Vec::new();
    let limit = now_ms.saturating_add(settings.clock_skew_ms);
    let twice = |name: &str| {
        dead(
            R::DuplicateField,
            format!("field {:?} named twice", truncate(name)),
        )
    };
    for name in &ev.field_mask {
        match entity.field_index(name) {
            Some(i) => {
                if changed.contains(i) {
                    return Err(twice(name));
                }
                let clock = ev
                    .clocks
                    .get(name)
                    .ok_or_else(|| dead(R::MissingClock, format!("no clock for field {name:?}")))?;
                check_skew(clock, limit, name)?;
                changed.insert(i);
            }
            None => {
                if unknown_names.contains(&name.as_str()) {
                    return Err(twice(name));
                }
                unknown_names.push(name);
                unknown.push(truncate(name).to_owned());
            }
        }
    }
    if op == Op::Delete {
        let clock = ev
            .record_clock
            .as_ref()
            .ok_or_else(|| dead(R::MissingClock, "a delete needs record_clock"))?;
        check_skew(clock, limit, "record_clock")?;
    }
    let verdict = policy.decide_set(entity, source, op, changed);
    let rejected = verdict.rejections(entity, changed, &unknown);
    let record = if verdict.accepted.is_empty() {
        None
    } else {
        Some(Projector::new(entity, &ev.record, verdict.accepted)?)
    };
    let clocks = changed_clocks(&ev, entity, changed);
    let mut deliveries: Vec<Delivery> = Vec::new();
    // Targets that receive the same fields with the same own ranks get identical bytes: encode
    // each distinct projection once (`shapes[i]` describes `deliveries[i]`).
    let mut shapes: Vec<(FieldSet, Vec<u32>)> = Vec::new();
    for (target, fields) in verdict.deliveries(entity) {
        let ranks: Vec<u32> = fields
            .iter()
            .map(|i| entity.fields.get(i).map_or(0, |rule| rule.rank_of(target)))
            .collect();
        let body = match shapes.iter().position(|(f, r)| *f == fields && *r == ranks) {
            Some(same) => deliveries
                .get(same)
                .map(|d| d.body.clone())
                .unwrap_or_default(),
            None => {
                let record = record
                    .as_ref()
                    .map(|r| r.projection(entity, fields))
                    .unwrap_or_default();
                let copy = Copy {
                    ev: &ev,
                    entity,
                    source,
                    target,
                    fields,
                    record: &record,
                    clocks: &clocks,
                };
                copy.encode()
            }
        };
        deliveries.push(Delivery {
            system: policy.system_name(target).to_owned(),
            fields: fields.len(),
            body,
        });
        shapes.push((fields, ranks));
    }
    let dead_letter = (!unknown.is_empty()).then(|| {
        dead(
            R::UnknownField,
            format!(
                "entity {:?} has no field(s) {}",
                ev.entity,
                unknown.join(", ")
            ),
        )
    });
    Ok(Routed {
        event_id: ev.event_id,
        source: ev.source,
        entity: ev.entity,
        key: ev.key,
        op,
        accepted: verdict.accepted.len(),
        rejected,
        deliveries,
        observed_at_ms: ev.observed_at_ms,
        dead_letter,
    })
}

/// The clocks of the `changed` fields of `ev` in name order (the order the copies' maps encode
/// in), with their field index: shared by every copy of one input.
fn changed_clocks<'a>(
    ev: &'a ChangeEvent,
    entity: &EntityPolicy,
    changed: FieldSet,
) -> Vec<(&'a str, u64, usize)> {
    ev.clocks
        .iter()
        .filter_map(|(name, c)| {
            let i = entity.field_index(name)?;
            changed.contains(i).then_some((name.as_str(), c.hlc, i))
        })
        .collect()
}

/// One routed copy of an input, encoded straight from the decoded input: the bytes are exactly
/// `ChangeEvent::encode_to_vec` of the copy (see the tests), without building the copy's maps
/// and strings first.
///
/// The copy carries the input's identity, the projected record, the mask and clocks of
/// `fields` (each clock re-stamped with the source as writer and the source's rank: a publisher
/// cannot impersonate another writer or choose a rank), the record clock likewise, and the
/// receiver's own non-zero ranks (absent means 0).
struct Copy<'a> {
    ev: &'a ChangeEvent,
    entity: &'a EntityPolicy,
    source: SystemId,
    target: SystemId,
    fields: FieldSet,
    record: &'a [u8],
    /// The input's clocks of changed fields, in name order, with their field index.
    clocks: &'a [(&'a str, u64, usize)],
}

impl Copy<'_> {
    fn encode(&self) -> Vec<u8> {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

        fn len_field(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(bytes.len() as u64, buf);
            buf.extend_from_slice(bytes);
        }
        // A proto3 string/bytes field: omitted when empty.
        fn implicit(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
            if !bytes.is_empty() {
                len_field(tag, bytes, buf);
            }
        }
        fn varint_field(tag: u32, value: u64, buf: &mut Vec<u8>) {
            if value != 0 {
                encode_key(tag, WireType::Varint, buf);
                encode_varint(value, buf);
            }
        }
        fn varint_len(tag: u32, value: u64) -> usize {
            if value == 0 {
                0
            } else {
                key_len(tag) + encoded_len_varint(value)
            }
        }
        fn str_len(tag: u32, s: &str) -> usize {
            if s.is_empty() {
                0
            } else {
                key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
            }
        }
        // `FieldClock { hlc, system, rank }` as a length-delimited field `tag`.
        fn clock(tag: u32, hlc: u64, system: &str, rank: u32, buf: &mut Vec<u8>) {
            let len = varint_len(1, hlc) + str_len(2, system) + varint_len(3, u64::from(rank));
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(len as u64, buf);
            varint_field(1, hlc, buf);
            implicit(2, system.as_bytes(), buf);
            varint_field(3, u64::from(rank), buf);
        }
        fn clock_len(tag: u32, hlc: u64, system: &str, rank: u32) -> usize {
            let len = varint_len(1, hlc) + str_len(2, system) + varint_len(3, u64::from(rank));
            key_len(tag) + encoded_len_varint(len as u64) + len
        }

        let ev = self.ev;
        let source = ev.source.as_str();
        let mut buf = Vec::with_capacity(
            ev.event_id.len()
                + 2 * source.len()
                + ev.entity.len()
                + ev.key.len()
                + ev.derived_from.len()
                + self.record.len()
                + self.clocks.len() * (2 * 24 + source.len())
                + 64,
        );
        implicit(1, ev.event_id.as_bytes(), &mut buf);
        implicit(2, source.as_bytes(), &mut buf);
        implicit(3, ev.entity.as_bytes(), &mut buf);
        implicit(4, ev.key.as_bytes(), &mut buf);
        // The enum as int32: negative values are sign-extended to 64 bits on the wire.
        varint_field(5, i64::from(ev.op) as u64, &mut buf);
        implicit(6, self.record, &mut buf);
        for i in self.fields.iter() {
            if let Some(rule) = self.entity.fields.get(i) {
                len_field(7, rule.name.as_bytes(), &mut buf);
            }
        }
        let in_copy = |&&(_, _, i): &&(&str, u64, usize)| self.fields.contains(i);
        let rank = |i: usize, system: SystemId| {
            self.entity
                .fields
                .get(i)
                .map_or(0, |rule| rule.rank_of(system))
        };
        // map<string, FieldClock> clocks = 8: one entry (key = 1, value = 2) per field.
        for &(name, hlc, i) in self.clocks.iter().filter(in_copy) {
            let source_rank = rank(i, self.source);
            let len = str_len(1, name) + clock_len(2, hlc, source, source_rank);
            encode_key(8, WireType::LengthDelimited, &mut buf);
            encode_varint(len as u64, &mut buf);
            implicit(1, name.as_bytes(), &mut buf);
            clock(2, hlc, source, source_rank, &mut buf);
        }
        implicit(9, ev.derived_from.as_bytes(), &mut buf);
        varint_field(10, u64::from(concord_proto::SCHEMA_VERSION), &mut buf);
        implicit(11, source.as_bytes(), &mut buf);
        varint_field(12, ev.observed_at_ms, &mut buf);
        if let Some(c) = &ev.record_clock {
            clock(13, c.hlc, source, 0, &mut buf);
        }
        // map<string, uint32> receiver_ranks = 14: the receiver's non-zero ranks.
        for &(name, _, i) in self.clocks.iter().filter(in_copy) {
            let own = rank(i, self.target);
            if own != 0 {
                let len = str_len(1, name) + varint_len(2, u64::from(own));
                encode_key(14, WireType::LengthDelimited, &mut buf);
                encode_varint(len as u64, &mut buf);
                implicit(1, name.as_bytes(), &mut buf);
                varint_field(2, u64::from(own), &mut buf);
            }
        }
        buf
    }
}

/// Cuts the projections of one record.
enum Projector {
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
    fn new(entity: &EntityPolicy, record: &[u8], accepted: FieldSet) -> Result<Self, DeadLetter> {
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
    fn projection(&self, entity: &EntityPolicy, fields: FieldSet) -> Vec<u8> {
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

fn check_skew(clock: &FieldClock, limit_ms: u64, what: &str) -> Result<(), DeadLetter> {
    let at = physical_ms(clock.hlc);
    if at > limit_ms {
        return Err(dead(
            DeadLetterReason::ClockSkew,
            format!(
                "clock of {what:?} is at {at} ms, more than the allowed skew past the router's clock ({limit_ms} ms)"
            ),
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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

fn strip_unknown(msg: &mut DynamicMessage) {
    msg.take_unknown_fields().for_each(drop);
    for (_, v) in msg.fields_mut() {
        strip_unknown_value(v);
    }
}

fn strip_unknown_value(v: &mut Value) {
    match v {
        Value::Message(m) => strip_unknown(m),
        Value::List(items) => items.iter_mut().for_each(strip_unknown_value),
        Value::Map(map) => map.values_mut().for_each(strip_unknown_value),
        _ => {}
    }
}

/// The encoded form of one field value, as replicas store and compare it: a message of the
/// entity's type with only that field set. `None` when the field is not set.
pub fn encode_field(record: &DynamicMessage, field: &FieldDescriptor) -> Option<Vec<u8>> {
    if !record.has_field(field) {
        return None;
    }
    let mut one = DynamicMessage::new(record.descriptor());
    let mut value = record.get_field(field).into_owned();
    strip_unknown_value(&mut value);
    one.set_field(field, value);
    Some(one.encode_to_vec())
}

/// Decodes a value stored by [`encode_field`].
pub fn decode_field(
    message: &MessageDescriptor,
    field: &FieldDescriptor,
    bytes: &[u8],
) -> Option<Value> {
    let m = DynamicMessage::decode(message.clone(), bytes).ok()?;
    m.has_field(field).then(|| m.get_field(field).into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const POLICY: &str = r#"
        [systems.orders]
        [systems.support]
        [systems.delivery]
        [entities.customer]
        message = "seed.v1.Customer"
        [entities.customer.fields]
        name = { owner = "orders", visible = ["*"] }
        email = { owners = ["orders", "support"], merge = "lww", visible = ["*"] }
        phone = { owners = ["support", "orders", "delivery"], merge = "priority", visible = ["*"] }
        tier = { owner = "support", visible = ["*"] }
        warehouse = { owner = "delivery", visible = ["orders"] }
        language = { owners = ["delivery", "orders"], merge = "priority", visible = ["*"] }
    "#;

    /// The copy as a `ChangeEvent` value, the way the router described copies before encoding
    /// them directly: `Copy::encode` must produce exactly its prost encoding.
    fn reference(copy: &Copy<'_>) -> Vec<u8> {
        let ev = copy.ev;
        let mut out = ChangeEvent {
            event_id: ev.event_id.clone(),
            source: ev.source.clone(),
            entity: ev.entity.clone(),
            key: ev.key.clone(),
            op: ev.op,
            record: copy.record.to_vec(),
            field_mask: Vec::new(),
            clocks: BTreeMap::new(),
            derived_from: ev.derived_from.clone(),
            schema_version: concord_proto::SCHEMA_VERSION,
            origin: ev.source.clone(),
            observed_at_ms: ev.observed_at_ms,
            record_clock: ev.record_clock.as_ref().map(|c| FieldClock {
                hlc: c.hlc,
                system: ev.source.clone(),
                rank: 0,
            }),
            receiver_ranks: BTreeMap::new(),
        };
        for i in copy.fields.iter() {
            let rule = &copy.entity.fields[i];
            out.field_mask.push(rule.name.clone());
            if let Some(c) = ev.clocks.get(&rule.name) {
                out.clocks.insert(
                    rule.name.clone(),
                    FieldClock {
                        hlc: c.hlc,
                        system: ev.source.clone(),
                        rank: rule.rank_of(copy.source),
                    },
                );
            }
            let own = rule.rank_of(copy.target);
            if own != 0 {
                out.receiver_ranks.insert(rule.name.clone(), own);
            }
        }
        out.encode_to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn direct_encoding_equals_the_prost_encoding_of_the_copy(
            event_id in "[a-z0-9-]{0,40}",
            source in 0usize..3,
            target in 0usize..3,
            key in "\\PC{0,12}",
            op in -3i32..6,
            record in proptest::collection::vec(any::<u8>(), 0..40),
            derived_from in "[a-z0-9-]{0,8}",
            observed_at_ms in prop_oneof![Just(0u64), any::<u64>()],
            record_clock in proptest::option::of((prop_oneof![Just(0u64), any::<u64>()], "[a-z]{0,5}")),
            hlcs in proptest::collection::vec(prop_oneof![Just(0u64), any::<u64>()], 6),
            in_mask in any::<u8>(),
            in_copy in any::<u8>(),
        ) {
            let policy = Policy::from_toml(POLICY, "policy.toml", &crate::seed_pool()).unwrap();
            let entity = policy.entity("customer").unwrap();
            let systems = ["orders", "support", "delivery"];
            let mut ev = ChangeEvent {
                event_id,
                source: systems[source].to_owned(),
                entity: "customer".to_owned(),
                key,
                op,
                derived_from,
                observed_at_ms,
                record_clock: record_clock.map(|(hlc, system)| FieldClock { hlc, system, rank: 7 }),
                ..Default::default()
            };
            let mut changed = FieldSet::default();
            for (i, rule) in entity.fields.iter().enumerate() {
                if in_mask & (1 << i) != 0 {
                    changed.insert(i);
                    ev.clocks.insert(
                        rule.name.clone(),
                        FieldClock { hlc: hlcs[i], system: "forged".into(), rank: 9 },
                    );
                }
            }
            // A clock for something that is not a field is ignored.
            ev.clocks.insert("zzz".into(), FieldClock::default());
            let mut fields = FieldSet::default();
            for i in changed.iter() {
                if in_copy & (1 << i) != 0 {
                    fields.insert(i);
                }
            }
            let clocks = changed_clocks(&ev, entity, changed);
            let copy = Copy {
                ev: &ev,
                entity,
                source: policy.system_id(systems[source]).unwrap(),
                target: policy.system_id(systems[target]).unwrap(),
                fields,
                record: &record,
                clocks: &clocks,
            };
            prop_assert_eq!(copy.encode(), reference(&copy));
        }
    }
}
