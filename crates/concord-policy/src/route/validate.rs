//! The envelope checks: what makes an input a change the router can decide on, each failure a
//! [`DeadLetter`] naming what was wrong. The checks run in a fixed order, so an input with
//! several problems always gets the same reason.

use concord_proto::v1::{ChangeEvent, FieldClock};
use prost::Message;

use super::{DeadLetter, DeadLetterReason as R, Input, MAX_KEY_BYTES, RouterSettings, dead};
use crate::Op;
use crate::clock::physical_ms;
use crate::model::{EntityPolicy, Policy};
use crate::sets::{FieldSet, SystemId};

/// Decodes the body as a `ChangeEvent` of the supported schema version with a UUID event id.
pub(super) fn decode(settings: &RouterSettings, body: &[u8]) -> Result<ChangeEvent, DeadLetter> {
    if body.len() > settings.max_message_bytes {
        return Err(dead(
            R::TooLarge,
            format!("{} bytes, limit {}", body.len(), settings.max_message_bytes),
        ));
    }
    let ev = ChangeEvent::decode(body)
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
    Ok(ev)
}

/// Who sent what: the event's source system and entity as the policy knows them, and its
/// operation.
pub(super) struct Envelope<'p> {
    pub(super) source: SystemId,
    pub(super) entity: &'p EntityPolicy,
    pub(super) op: Op,
}

/// Checks the envelope of `ev` against the message it came in (routing key, `user_id`) and the
/// policy (source system, entity), and its key and operation.
pub(super) fn envelope<'p>(
    policy: &'p Policy,
    settings: &RouterSettings,
    input: Input<'_>,
    ev: &ChangeEvent,
) -> Result<Envelope<'p>, DeadLetter> {
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
    // The source is the broker's validated identity of the publisher.
    match input.user_id {
        Some(u) if settings.system_of(u) != ev.source => {
            return Err(dead(
                R::UserIdMismatch,
                format!(
                    "published by user {:?} (system {:?}) for source {:?}",
                    truncate(u),
                    truncate(settings.system_of(u)),
                    truncate(&ev.source)
                ),
            ));
        }
        None if settings.require_user_id => {
            return Err(dead(
                R::MissingUserId,
                "no user_id property: the publisher's broker identity is required",
            ));
        }
        _ => {}
    }
    if ev.key.is_empty() || ev.key.len() > MAX_KEY_BYTES {
        return Err(dead(
            R::InvalidKey,
            format!("key must be 1..={MAX_KEY_BYTES} bytes, is {}", ev.key.len()),
        ));
    }
    if settings.check_key_header {
        let expected = format!("{}/{}", ev.entity, ev.key);
        if input.concord_key != Some(expected.as_str()) {
            return Err(dead(
                R::KeyHeaderMismatch,
                format!(
                    "header concord-key {:?}, the envelope's record is {:?}",
                    input.concord_key.map(truncate),
                    truncate(&expected)
                ),
            ));
        }
    }
    if !ev.derived_from.is_empty() && uuid::Uuid::parse_str(&ev.derived_from).is_err() {
        return Err(dead(
            R::InvalidDerivedFrom,
            format!(
                "derived_from {:?} is not an event id (a UUID)",
                truncate(&ev.derived_from)
            ),
        ));
    }
    let op = Op::from_wire(ev.op).ok_or_else(|| dead(R::InvalidOp, format!("op {}", ev.op)))?;
    Ok(Envelope { source, entity, op })
}

/// The fields an event says it changes.
pub(super) struct Changes {
    /// The entity's fields named by the field mask.
    pub(super) known: FieldSet,
    /// Names the entity does not have, as reported (truncated).
    pub(super) unknown: Vec<String>,
}

impl Changes {
    /// The dead letter of the unknown names, if any: the original message goes to the
    /// dead-letter queue with it, while the rest is routed.
    pub(super) fn dead_letter(&self, entity: &str) -> Option<DeadLetter> {
        (!self.unknown.is_empty()).then(|| {
            dead(
                R::UnknownField,
                format!(
                    "entity {entity:?} has no field(s) {}",
                    self.unknown.join(", ")
                ),
            )
        })
    }
}

/// Checks the field mask of `ev` (size, duplicates) and the clocks of its known fields (present,
/// not too far ahead of `now_ms`), and the record clock of a delete.
pub(super) fn changes(
    entity: &EntityPolicy,
    settings: &RouterSettings,
    now_ms: u64,
    op: Op,
    ev: &ChangeEvent,
) -> Result<Changes, DeadLetter> {
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
    let mut known = FieldSet::default();
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
                if known.contains(i) {
                    return Err(twice(name));
                }
                let clock = ev
                    .clocks
                    .get(name)
                    .ok_or_else(|| dead(R::MissingClock, format!("no clock for field {name:?}")))?;
                check_skew(clock, limit, name)?;
                known.insert(i);
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
    // The record clock, whatever the operation (a receiver's clock observes it).
    match &ev.record_clock {
        Some(clock) => check_skew(clock, limit, "record_clock")?,
        None if op == Op::Delete => {
            return Err(dead(R::MissingClock, "a delete needs record_clock"));
        }
        None => {}
    }
    Ok(Changes { known, unknown })
}

fn check_skew(clock: &FieldClock, limit_ms: u64, what: &str) -> Result<(), DeadLetter> {
    let at = physical_ms(clock.hlc);
    if at > limit_ms {
        return Err(dead(
            R::ClockSkew,
            format!(
                "clock of {what:?} is at {at} ms, more than the allowed skew past the router's clock ({limit_ms} ms)"
            ),
        ));
    }
    Ok(())
}

/// At most the first 64 bytes of `s`, for details that quote the input.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
