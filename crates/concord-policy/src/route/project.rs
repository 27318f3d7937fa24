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
mod tests;
