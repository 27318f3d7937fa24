//! The trait a business system implements, and the values it exchanges with the SDK.

use std::collections::BTreeMap;
use std::future::Future;

use futures::Stream;
use prost_reflect::Value;

/// The value of each changed field by protobuf field name; `None` clears the field.
pub type Fields = BTreeMap<String, Option<Value>>;

/// What an adapter reports went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// Worth retrying: the system is unreachable, busy, timed out, a lock conflicted...
    /// The SDK retries with exponential backoff and never drops the change.
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying will not help: the system refuses the change (validation, constraint...).
    /// An incoming change that fails this way is dead-lettered.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl AdapterError {
    /// A [`AdapterError::Transient`] error.
    pub fn transient(e: impl std::fmt::Display) -> AdapterError {
        AdapterError::Transient(e.to_string())
    }
    /// A [`AdapterError::Permanent`] error.
    pub fn permanent(e: impl std::fmt::Display) -> AdapterError {
        AdapterError::Permanent(e.to_string())
    }
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, AdapterError::Transient(_))
    }
}

/// The kind of a local change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalOp {
    /// Some fields of a record changed (or a record appeared: a record the SDK has never seen is
    /// given a new canonical key either way).
    Upsert,
    /// A record was created in the system (published as `OP_CREATE`: only systems the policy lets
    /// create records of the entity may send it).
    Create,
    /// The record was deleted.
    Delete,
}

/// A change that happened in the system, as its change feed reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalChange {
    /// The entity as named in the policy, e.g. `customer`.
    pub entity: String,
    /// The record's id in the system (its primary key).
    pub local_id: String,
    pub op: LocalOp,
    /// The changed fields (all fields are fine: unchanged values are not published).
    pub fields: Fields,
    /// Position of this change in the feed. The SDK persists it once the change is safely
    /// published and passes it back to [`SystemAdapter::changes`] after a restart.
    pub cursor: Option<String>,
}

impl LocalChange {
    /// A change of `fields` of record `local_id`.
    pub fn upsert(
        entity: impl Into<String>,
        local_id: impl Into<String>,
        fields: Fields,
    ) -> LocalChange {
        LocalChange {
            entity: entity.into(),
            local_id: local_id.into(),
            op: LocalOp::Upsert,
            fields,
            cursor: None,
        }
    }
}

/// The kind of an incoming change to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApplyOp {
    /// Set the given fields, creating the record when `local_id` is `None`.
    Upsert,
    /// Delete the record.
    Delete,
}

/// A change the system must apply: the fields of an incoming change that won the merge (or, when
/// `origin` is this system, a correction writing back a value a higher-priority owner holds).
#[derive(Debug, Clone, PartialEq)]
pub struct Apply {
    pub entity: String,
    /// The canonical key of the record.
    pub key: String,
    /// The record's id in the system; `None` when the system does not have it yet: create it and
    /// return its new id.
    pub local_id: Option<String>,
    pub op: ApplyOp,
    /// Fields to set (`None` clears the field). Empty for a delete.
    pub fields: Fields,
    /// Id of the incoming event (for logs and idempotency keys).
    pub event_id: String,
    /// The system the change comes from.
    pub origin: String,
}

/// The result of a successful [`SystemAdapter::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The id of the record in the system (new when it was created).
    pub local_id: String,
}

/// What a business system implements to take part in Concord. The SDK's runner does the rest:
/// publishing, consuming, acknowledgements, retries, dead-lettering, deduplication, merge,
/// echo suppression, id mapping and cursor persistence.
///
/// Streams must own what they need (`'static`): clone a connection pool or an `Arc` into them.
pub trait SystemAdapter: Send + Sync + 'static {
    /// Local changes after `cursor` (the last one the SDK persisted; `None` on first start).
    ///
    /// The stream is expected to stay open and wait for new changes. An `Err(Transient)` item
    /// makes the SDK reopen the stream from the last persisted cursor after a backoff; an
    /// `Err(Permanent)` item is logged and skipped.
    ///
    /// Applying incoming changes shows up here too (as a real change feed would report it); the
    /// SDK recognises those echoes and publishes nothing for them.
    fn changes(
        &self,
        cursor: Option<String>,
    ) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static;

    /// Every record, for a backfill; published as `OP_SNAPSHOT`. The `cursor` of the items is
    /// ignored. Ends when every record has been listed.
    fn snapshot(&self) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static;

    /// Applies an incoming change. Must be idempotent: the same `Apply` may come twice (after a
    /// crash between applying it and recording that it was applied).
    fn apply(&self, change: &Apply) -> impl Future<Output = Result<Applied, AdapterError>> + Send;
}
