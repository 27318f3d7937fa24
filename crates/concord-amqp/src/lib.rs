//! `concord-amqp` is Concord's one and only door to RabbitMQ: the only crate of the
//! workspace that depends on `lapin`. It connects (with a named connection and bounded
//! retries), declares the Concord topology (ingress / router / routed / inboxes /
//! dead-lettering), publishes with pipelined publisher confirms, consumes with bounded
//! prefetch and batched acknowledgements, and surfaces connection failures as errors so
//! that service supervisors can reconnect.
//!
//! What this crate must never do:
//!
//! * **never decide routing policy** — it moves bytes to the exchange and routing key it
//!   is told to use; which system a message goes to is decided by `concord-policy` and
//!   the router, never here;
//! * **never parse payloads** — message bodies are opaque `&[u8]` / `Vec<u8>` in both
//!   directions; headers are only carried, never interpreted (apart from the private
//!   [`publisher::CONFIRM_SEQ_HEADER`] used to correlate returned messages).
//!
//! Other crates must not depend on `lapin`, and nothing here hands them a lapin type: they
//! work with this crate's own [`Connection`], [`Channel`], [`Consumer`], [`Delivery`] (with its
//! [`Properties`]), [`Publisher`] and [`AmqpError`] (whose client errors are opaque
//! [`ClientError`]s); lapin stays an implementation detail.
//!
//! # Throughput design
//!
//! * one connection for consuming and one for publishing per process (each lapin
//!   connection owns an OS thread for its I/O loop);
//! * [`Publisher`] pipelines publisher confirms behind a bounded in-flight window: callers
//!   never await confirms one by one;
//! * [`consume`] sets a bounded prefetch, and [`AckBatcher`] acknowledges cumulatively
//!   with `multiple = true`.
//!
//! # Supervising
//!
//! Nothing here reconnects behind the caller's back (lapin auto-recovery is not used).
//! A service supervisor loops `connect` → declare → run; any error from the consumer
//! stream, the publisher or a pending confirm means "tear down and start over", waiting
//! for the next delay of [`backoff()`] in between.

pub mod ack;
pub mod channel;
pub mod connection;
pub mod consumer;
pub mod error;
pub mod publisher;
pub mod topology;

#[cfg(test)]
mod broker_tests;

pub use ack::{AckBatcher, AckHandle};
pub use channel::{Channel, QueueDeleteOptions};
pub use connection::{
    CLOSE_TIMEOUT, ClientCertificate, ConnectOptions, Connection, ConnectionEvent, Tls, TlsFiles,
    backoff, connect, connect_with, connection_name, login_of, split_uris,
};
pub use consumer::{Consumer, Delivery, Properties, consume};
pub use error::{AmqpError, ClientError, PublishError};
pub use publisher::{CONTENT_TYPE, MessageProps, PendingConfirm, Publisher, PublisherOptions};
pub use topology::{
    Arg, Arguments, BindingPlan, CONTROL_REPLY_PREFIX, CONTROL_REQUEST_KEY, ExchangePlan,
    HEADER_CONTROL, HEADER_DETAIL, HEADER_KEY, HEADER_ORIGIN, HEADER_REASON, HEADER_RESYNC_TARGET,
    HEADER_ROUTING_KEY, PARTITION_HASH_HEADER, Plan, QueuePlan, QueueType, Topology,
    queue_message_count,
};

/// The wall clock in milliseconds since the Unix epoch: the one clock read the services and
/// tools share (the pure core takes time as a parameter). 0 before 1970, saturating far ahead.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Re-exported so that callers never need a direct `backon` dependency to drive
/// [`backoff()`] (`backoff().build()` yields the delays).
pub use backon::{BackoffBuilder, ExponentialBuilder};
