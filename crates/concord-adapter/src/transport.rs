//! The messaging the engine needs, abstracted so the same engine runs over AMQP
//! ([`crate::amqp::AmqpTransport`]) or in memory ([`crate::testkit::TestBus`]).

use std::future::Future;

use futures::stream::BoxStream;

/// A transport failure. Either way the runner tears the connection down, waits for the next
/// reconnect delay and starts over: nothing unconfirmed or unacknowledged is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The connection or channel is gone (or never came up).
    #[error("connection: {0}")]
    Connection(String),
    /// The broker refused a publish (nacked it, or returned it as unroutable, e.g. while the
    /// router's queue is not declared yet).
    #[error("publish refused: {0}")]
    Refused(String),
}

impl TransportError {
    pub fn connection(e: impl std::fmt::Display) -> TransportError {
        TransportError::Connection(e.to_string())
    }
    pub fn refused(e: impl std::fmt::Display) -> TransportError {
        TransportError::Refused(e.to_string())
    }
}

/// One change event to publish to the ingress exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// `{system}.{entity}`.
    pub routing_key: String,
    /// The encoded `ChangeEvent`.
    pub body: Vec<u8>,
    /// The event id (AMQP `message_id`).
    pub event_id: String,
    /// `{entity}/{key}` (header `concord-key`).
    pub concord_key: String,
    /// The AMQP `user_id` property, when configured.
    pub user_id: Option<String>,
    /// A resync snapshot for this one system (header `concord-resync-target`), published on the
    /// resync lane (`{ns}.resync`) instead of the ingress.
    pub resync_target: Option<String>,
    /// A control message (header `concord-control`, e.g. `progress`), on the resync lane.
    pub control: Option<String>,
}

impl Outgoing {
    /// Whether it goes to the resync lane.
    pub fn on_resync_lane(&self) -> bool {
        self.resync_target.is_some() || self.control.is_some()
    }
}

/// One message from the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub body: Vec<u8>,
    /// Identifies the message for [`Link::ack`].
    pub tag: u64,
    /// The broker delivered it before (informational: deduplication uses event ids).
    pub redelivered: bool,
    /// The broker user that published it (`user_id`, validated by the broker).
    pub user_id: Option<String>,
    /// Header `concord-control`: a control message (e.g. `resync`), never data.
    pub control: Option<String>,
}

/// The inbox of a connection: ends (or yields an error) when the connection is lost.
pub type Inbox = BoxStream<'static, Result<Incoming, TransportError>>;

/// Opens connections.
pub trait Transport: Send + Sync + 'static {
    type Link: Link;
    /// Connects, declares what the adapter needs (idempotently) and starts consuming the inbox.
    fn connect(&self) -> impl Future<Output = Result<(Self::Link, Inbox), TransportError>> + Send;
}

/// The sending side of a connection.
pub trait Link: Send + Sync + 'static {
    /// Publishes events persistently and returns once the broker confirmed every one.
    fn publish(
        &self,
        events: &[Outgoing],
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Publishes an incoming message this system cannot process to the dead-letter exchange
    /// (routing key = this system), with headers `concord-reason` and `concord-detail`, and
    /// returns once the broker confirmed it.
    fn dead_letter(
        &self,
        body: &[u8],
        reason: &str,
        detail: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Acknowledges an inbox message (possibly batched).
    fn ack(&self, tag: u64) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Sends acknowledgements still held back by batching.
    fn flush(&self) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Flushes acknowledgements and closes the connection gracefully.
    fn close(&self) -> impl Future<Output = ()> + Send;
    /// Messages ready (not delivered) in the inbox, as the broker counts them; `None` when the
    /// transport cannot tell (the runner's stalled-consumer check is then off).
    fn inbox_ready(&self) -> impl Future<Output = Result<Option<u64>, TransportError>> + Send {
        async { Ok(None) }
    }
}
