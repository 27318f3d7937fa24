//! The router's work on one message, as a pure function: decode and validate the envelope,
//! decide, and re-encode one projection per target system.
//!
//! A projection is rebuilt field by field from the fields its target may see, never copied from
//! the input bytes, so no hidden field and no protobuf unknown field ever reaches a system that
//! may not see it.

use std::collections::BTreeMap;
use std::ops::Range;

use concord_proto::v1::{ChangeEvent, FieldClock};
use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage, Value};

use crate::Op;
use crate::clock::physical_ms;
use crate::decide::Rejection;
use crate::model::{EntityPolicy, Policy};
use crate::sets::FieldSet;

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

/// Why a message goes to the dead-letter queue.
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
        let record =
            DynamicMessage::decode(entity.message.clone(), ev.record.as_slice()).map_err(|e| {
                dead(
                    R::InvalidRecord,
                    format!("record is not a valid {}: {e}", entity.message.full_name()),
                )
            })?;
        // The accepted fields, re-encoded once; each projection is cut from these bytes.
        let accepted = AcceptedFields::encode(&record, entity, verdict.accepted);
        Some((record, accepted))
    };
    let mut deliveries: Vec<Delivery> = Vec::new();
    // Targets that receive the same fields with the same own ranks get identical bytes: encode
    // each distinct projection once (`shapes[i]` describes `deliveries[i]`).
    let mut shapes: Vec<(FieldSet, Vec<u32>)> = Vec::new();
    for (target, fields) in verdict.deliveries(entity) {
        let ranks: Vec<u32> = fields
            .iter()
            .map(|i| entity.fields.get(i).map_or(0, |rule| rule.rank_of(target)))
            .collect();
        if let Some(same) = shapes.iter().position(|(f, r)| *f == fields && *r == ranks) {
            let body = deliveries
                .get(same)
                .map(|d| d.body.clone())
                .unwrap_or_default();
            deliveries.push(Delivery {
                system: policy.system_name(target).to_owned(),
                fields: fields.len(),
                body,
            });
            shapes.push((fields, ranks));
            continue;
        }
        let mut copy = ChangeEvent {
            event_id: ev.event_id.clone(),
            source: ev.source.clone(),
            entity: ev.entity.clone(),
            key: ev.key.clone(),
            op: ev.op,
            record: Vec::new(),
            field_mask: Vec::with_capacity(fields.len()),
            clocks: BTreeMap::new(),
            derived_from: ev.derived_from.clone(),
            schema_version: concord_proto::SCHEMA_VERSION,
            origin: ev.source.clone(),
            observed_at_ms: ev.observed_at_ms,
            // Like the field clocks, the record clock is the source's: a publisher cannot
            // impersonate another writer or choose a rank.
            record_clock: ev.record_clock.as_ref().map(|c| FieldClock {
                hlc: c.hlc,
                system: ev.source.clone(),
                rank: 0,
            }),
            receiver_ranks: BTreeMap::new(),
        };
        match &record {
            Some((_, Some(accepted))) => copy.record = accepted.projection(fields),
            Some((record, None)) => copy.record = project(record, entity, fields).encode_to_vec(),
            None => {}
        }
        for i in fields.iter() {
            let Some(rule) = entity.fields.get(i) else {
                continue;
            };
            copy.field_mask.push(rule.name.clone());
            if let Some(c) = ev.clocks.get(&rule.name) {
                copy.clocks.insert(
                    rule.name.clone(),
                    FieldClock {
                        hlc: c.hlc,
                        system: ev.source.clone(),
                        rank: rule.rank_of(source),
                    },
                );
            }
            copy.receiver_ranks
                .insert(rule.name.clone(), rule.rank_of(target));
        }
        deliveries.push(Delivery {
            system: policy.system_name(target).to_owned(),
            fields: fields.len(),
            body: copy.encode_to_vec(),
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

/// The accepted fields of a record encoded once, with unknown fields stripped at every depth,
/// and the byte range of each encoded field: a projection is the concatenation of its fields'
/// ranges, in field-number order, which is exactly how the projected message encodes.
struct AcceptedFields {
    bytes: Vec<u8>,
    /// Per encoded field (a repeated field may occur several times): its position in the
    /// entity's field list and its bytes (key and value).
    parts: Vec<(usize, Range<usize>)>,
}

impl AcceptedFields {
    /// `None` if the re-encoded bytes cannot be split (never expected: they are our own
    /// encoding); the caller then projects field by field.
    fn encode(
        record: &DynamicMessage,
        entity: &EntityPolicy,
        accepted: FieldSet,
    ) -> Option<AcceptedFields> {
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
        Some(AcceptedFields { bytes, parts })
    }

    /// The encoded record holding only `fields` (a subset of the accepted fields).
    fn projection(&self, fields: FieldSet) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len());
        for (i, range) in &self.parts {
            if fields.contains(*i) {
                out.extend_from_slice(self.bytes.get(range.clone()).unwrap_or_default());
            }
        }
        out
    }
}

fn read_varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(value);
        }
    }
    None
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
