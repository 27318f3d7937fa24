//! Error types.

use std::{fmt, time::Duration};

use lapin::{ErrorKind, protocol::AMQPErrorKind};

/// Reply code of an AMQP `NOT_FOUND` (404) channel error.
pub const REPLY_NOT_FOUND: u16 = 404;

/// Everything that can go wrong talking to the broker.
///
/// Any variant coming out of a consumer stream, a publisher or a channel operation
/// means the channel (or connection) is no longer trustworthy: supervisors should tear
/// down and reconnect.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The AMQP URI could not be parsed.
    #[error("invalid AMQP URI: {0}")]
    InvalidUri(String),

    /// A name (exchange, queue, routing key, header, ...) is not acceptable to AMQP.
    #[error("invalid AMQP name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// The initial connection could not be established within the retry budget.
    #[error("could not connect to {endpoint} after {attempts} attempt(s)")]
    Connect {
        /// `host:port/vhost` (never the credentials).
        endpoint: String,
        /// Number of attempts made.
        attempts: usize,
        /// The last attempt's error.
        #[source]
        source: Box<AmqpError>,
    },

    /// An operation did not complete in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),

    /// An error reported by the AMQP client (I/O, protocol, closed channel/connection).
    #[error("AMQP: {0}")]
    Client(#[source] ClientError),

    /// The consumer was cancelled without us asking: channel or connection closed,
    /// queue deleted, or a broker-side cancel.
    #[error("consumer {consumer_tag:?} on queue {queue:?} was cancelled")]
    ConsumerCancelled {
        /// Queue that was consumed.
        queue: String,
        /// Consumer tag.
        consumer_tag: String,
    },

    /// The publisher's background confirm tracker is gone (publisher dropped).
    #[error("publisher is closed")]
    PublisherClosed,

    /// [`crate::AckBatcher`] was fed a delivery tag that is not greater than the previous
    /// one: its callers broke the in-order contract.
    #[error("delivery tag {tag} fed to the ack batcher after tag {last}")]
    AckOutOfOrder {
        /// The tag that was fed.
        tag: u64,
        /// The previous tag.
        last: u64,
    },

    /// A function that needs a Tokio runtime was called outside of one.
    #[error("no Tokio runtime available")]
    NoRuntime,

    /// The broker kept refusing publishes (nacks or returns) although every queue was
    /// re-declared between attempts: the session is given up, so that its channels are opened
    /// anew (a channel opened while a quorum queue elected its leader was seen nacking that
    /// queue's messages for good).
    #[error("the broker refused {count} publishes in a row (last: {last})")]
    PublishesRefused {
        /// Refusals in a row.
        count: u32,
        /// The last refusal.
        last: String,
    },
}

impl AmqpError {
    /// The AMQP reply code if this is a broker-reported protocol error (e.g. 404, 406).
    #[must_use]
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            AmqpError::Client(e) => match e.0.kind() {
                ErrorKind::ProtocolError(p) => Some(p.get_id()),
                _ => None,
            },
            AmqpError::Connect { source, .. } => source.reply_code(),
            _ => None,
        }
    }

    /// True for a broker `NOT_FOUND` (404) error.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        self.reply_code() == Some(REPLY_NOT_FOUND)
    }

    /// True if retrying the initial connect cannot help (bad credentials, unknown vhost,
    /// bad URI).
    pub(crate) fn is_permanent_connect_error(&self) -> bool {
        match self {
            AmqpError::InvalidUri(_) | AmqpError::InvalidName { .. } | AmqpError::NoRuntime => true,
            AmqpError::Client(e) => match e.0.kind() {
                ErrorKind::ProtocolError(p) => matches!(
                    p.kind(),
                    AMQPErrorKind::Hard(lapin::protocol::AMQPHardError::NOTALLOWED)
                        | AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED)
                ),
                ErrorKind::AuthProviderError(_) | ErrorKind::InvalidProtocolVersion(_) => true,
                _ => false,
            },
            _ => false,
        }
    }
}

/// An error of the AMQP client library, opaque to callers (see [`AmqpError::reply_code`] for
/// the broker's reply code).
#[derive(Debug, Clone)]
pub struct ClientError(lapin::Error);

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// For this crate's calls into lapin (and tests that poke the broker with lapin directly).
impl From<lapin::Error> for AmqpError {
    fn from(e: lapin::Error) -> Self {
        AmqpError::Client(ClientError(e))
    }
}

/// Why a published message was not confirmed as delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker nacked the message (e.g. `x-overflow = reject-publish` on a full quorum
    /// queue, or an internal error). Retrying later is reasonable.
    #[error("the broker nacked the message")]
    Nacked,

    /// The message was unroutable (`mandatory` publish that matched no queue) and was
    /// returned. RabbitMQ still *acks* such messages; they are nevertheless NOT delivered.
    #[error("the message was returned as unroutable: {reply_code} {reply_text}")]
    Returned {
        /// AMQP reply code (312 `NO_ROUTE`).
        reply_code: u16,
        /// Broker-provided reason.
        reply_text: String,
    },

    /// The channel or connection failed before the broker confirmed the message; whether
    /// it was enqueued is unknown (republish: delivery is at-least-once).
    #[error("connection lost before confirmation: {0}")]
    Connection(#[source] AmqpError),
}

impl PublishError {
    /// Whether publishing the same message again may succeed (`Nacked`, `Connection`).
    /// A `Returned` message will be returned again until the topology changes.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        !matches!(self, PublishError::Returned { .. })
    }
}

/// Convert a string into an AMQP short string (max 255 bytes) without panicking.
pub(crate) fn short(name: &str) -> Result<lapin::types::ShortString, AmqpError> {
    lapin::types::ShortString::try_new(name).map_err(|_| AmqpError::InvalidName {
        name: name.chars().take(64).collect(),
        reason: "longer than 255 bytes",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_rejects_long_names_without_panicking() {
        assert!(short("ok").is_ok());
        let long = "x".repeat(256);
        assert!(matches!(short(&long), Err(AmqpError::InvalidName { .. })));
    }

    #[test]
    fn returned_is_not_retryable() {
        assert!(PublishError::Nacked.is_retryable());
        assert!(
            !PublishError::Returned {
                reply_code: 312,
                reply_text: "NO_ROUTE".into()
            }
            .is_retryable()
        );
    }
}
