//! The router's work on one message, as a pure function: decode and validate the envelope
//! (`validate`), decide, cut the projections of the record (`project`) and encode one routed
//! copy per target system (`encode`).
//!
//! A projection is rebuilt field by field from the fields its target may see, never copied from
//! the input bytes, so no hidden field and no protobuf unknown field ever reaches a system that
//! may not see it.

mod encode;
mod project;
mod validate;

pub use project::{bench_filter, project};

use crate::Op;
use crate::decide::Rejection;
use crate::model::Policy;
use project::Projector;
use validate::Envelope;

/// Limits and identity rules the router enforces on every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSettings {
    /// Largest accepted message body, in bytes.
    pub max_message_bytes: usize,
    /// How far a clock (field or record clock) may be ahead of the router's clock, in
    /// milliseconds.
    pub clock_skew_ms: u64,
    /// Refuse messages without a broker-validated `user_id` property (the default: the source
    /// of a change is the broker user that published it).
    pub require_user_id: bool,
    /// Broker user → the system it publishes as, for deployments whose broker user names differ
    /// from the system names; a user not listed publishes as the system of its own name.
    pub users: std::collections::BTreeMap<String, String>,
    /// Check the `concord-key` header against the envelope (the partitioned router input is
    /// split by that header, so per-record order depends on it).
    pub check_key_header: bool,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            max_message_bytes: 1024 * 1024,
            clock_skew_ms: crate::replica::DEFAULT_CLOCK_SKEW_MS,
            require_user_id: true,
            users: std::collections::BTreeMap::new(),
            check_key_header: false,
        }
    }
}

impl RouterSettings {
    /// The system broker user `user` publishes as.
    pub fn system_of<'a>(&'a self, user: &'a str) -> &'a str {
        self.users.get(user).map_or(user, String::as_str)
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
    /// The `concord-key` header (`<entity>/<key>`).
    pub concord_key: Option<&'a str>,
}

impl<'a> Input<'a> {
    /// A message published with `routing_key` by broker user `user_id`, without a
    /// `concord-key` header.
    pub fn new(routing_key: &'a str, body: &'a [u8], user_id: Option<&'a str>) -> Input<'a> {
        Input {
            routing_key,
            body,
            user_id,
            concord_key: None,
        }
    }
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
    /// The `concord-key` header does not name the envelope's record (partitioned input).
    KeyHeaderMismatch,
    /// `derived_from` is not an event id.
    InvalidDerivedFrom,
    /// A message in an adapter's inbox that the router did not publish.
    UntrustedPublisher,
    /// A resync input without a valid target system (header `concord-resync-target`), or not
    /// an `OP_SNAPSHOT`.
    InvalidResync,
    /// A control message the router or an adapter cannot act on (not from the operator, or
    /// not understood).
    InvalidControl,
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
            KeyHeaderMismatch => "key_header_mismatch",
            InvalidDerivedFrom => "invalid_derived_from",
            UntrustedPublisher => "untrusted_publisher",
            InvalidResync => "invalid_resync",
            InvalidControl => "invalid_control",
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
    match try_process(policy, settings, now_ms, input, None) {
        Ok(r) => Outcome::Routed(r),
        Err(d) => Outcome::DeadLetter(d),
    }
}

/// Processes one input of the resync lane (a backfill): like [`process`], but the copies go to
/// `target` only (header `concord-resync-target`), with the fields `target` may see, and only
/// an `OP_SNAPSHOT` is accepted. A missing or unknown target, or another op, is dead-lettered
/// as `invalid_resync`; a target that may see none of the accepted fields gets nothing.
pub fn process_resync(
    policy: &Policy,
    settings: &RouterSettings,
    now_ms: u64,
    input: Input<'_>,
    target: Option<&str>,
) -> Outcome {
    let target = match target {
        None => {
            return Outcome::DeadLetter(dead(
                DeadLetterReason::InvalidResync,
                "a resync input without a concord-resync-target header",
            ));
        }
        Some(t) => match policy.system_id(t) {
            Some(id) => id,
            None => {
                return Outcome::DeadLetter(dead(
                    DeadLetterReason::InvalidResync,
                    format!("resync target {t:?} is not a system of the policy"),
                ));
            }
        },
    };
    match try_process(policy, settings, now_ms, input, Some(target)) {
        Ok(r) => Outcome::Routed(r),
        Err(d) => Outcome::DeadLetter(d),
    }
}

fn try_process(
    policy: &Policy,
    settings: &RouterSettings,
    now_ms: u64,
    input: Input<'_>,
    resync_target: Option<crate::sets::SystemId>,
) -> Result<Routed, DeadLetter> {
    let ev = validate::decode(settings, input.body)?;
    let Envelope { source, entity, op } = validate::envelope(policy, settings, input, &ev)?;
    if resync_target.is_some() && op != Op::Snapshot {
        return Err(dead(
            DeadLetterReason::InvalidResync,
            format!("a resync input must be a snapshot, not {}", op.as_str()),
        ));
    }
    let changes = validate::changes(entity, settings, now_ms, op, &ev)?;
    let verdict = policy.decide_set(entity, source, op, changes.known);
    let rejected = verdict.rejections(entity, changes.known, &changes.unknown);
    let projector = (!verdict.accepted.is_empty())
        .then(|| Projector::new(entity, &ev.record, verdict.accepted))
        .transpose()?;
    let deliveries = encode::deliveries(
        policy,
        entity,
        &ev,
        source,
        &verdict,
        changes.known,
        projector.as_ref(),
        resync_target,
    );
    Ok(Routed {
        dead_letter: changes.dead_letter(&ev.entity),
        event_id: ev.event_id,
        source: ev.source,
        entity: ev.entity,
        key: ev.key,
        op,
        accepted: verdict.accepted.len(),
        rejected,
        deliveries,
        observed_at_ms: ev.observed_at_ms,
    })
}

/// Which systems a resync of `target` (optionally one entity) asks for snapshots: per entity
/// `target` sees, the owners of the fields it may see and the systems that may create records
/// (a record appears in `target` only through a creator's copy), `target` itself excepted. In
/// policy order; empty when `target` sees nothing. `None` when `target` or `entity` is unknown.
pub fn resync_sources(policy: &Policy, target: &str, entity: Option<&str>) -> Option<Vec<String>> {
    let target = policy.system_id(target)?;
    let entities: Vec<&crate::model::EntityPolicy> = match entity {
        Some(name) => vec![policy.entity(name)?],
        None => policy.entities().iter().collect(),
    };
    let mut sources = crate::sets::SystemSet::default();
    for e in entities {
        let visible = e.visible_to(target);
        if visible.is_empty() {
            continue;
        }
        for i in visible.iter() {
            if let Some(rule) = e.fields.get(i) {
                for owner in &rule.owners {
                    sources.insert(*owner);
                }
            }
        }
        for creator in e.create.iter() {
            sources.insert(creator);
        }
    }
    sources.remove(target);
    Some(
        policy
            .system_ids()
            .filter(|s| sources.contains(*s))
            .map(|s| policy.system_name(s).to_owned())
            .collect(),
    )
}
