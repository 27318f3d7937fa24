//! The Concord adapter SDK: what a business system implements ([`SystemAdapter`]) to take part
//! in Concord, and everything it gets for free from the generic runner ([`run`], [`start`]):
//! publishing local changes as canonical `ChangeEvent`s with publisher confirms, consuming its
//! inbox with batched acknowledgements, retries with backoff, dead-lettering, event-id
//! deduplication, per-field stamps and merge, echo suppression, priority corrections, the hybrid
//! logical clock, local id ↔ canonical key mapping, tombstones and cursor persistence, all kept
//! in an embedded SQLite state store. [`testkit`] runs the same engine on an in-memory bus with
//! the real router in the middle.
//!
//! This crate must never decide routing or ownership (that is the router's, from the policy)
//! and never re-implement merge decisions: it is the I/O shell around `concord-policy`'s pure
//! replica functions. It must never depend on lapin directly (AMQP goes through
//! `concord-amqp`), and never acknowledge an incoming message before it is applied, recorded
//! or dead-lettered.

pub mod adapter;
pub mod amqp;
pub mod config;
pub mod engine;
mod http;
pub mod metrics;
pub mod process;
pub mod runner;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod transport;

pub use adapter::{
    AdapterError, Applied, Apply, ApplyOp, BoxError, Echoes, Fields, LocalChange, LocalOp,
    SystemAdapter,
};
pub use amqp::AmqpTransport;
pub use config::{RetryConfig, RunnerConfig};
pub use engine::{EngineError, IncomingError, Processed};
pub use metrics::{Metrics, MetricsSnapshot};
pub use process::{Adapter, Args, Context, ProcessConfig, main, main_with, run_process};
pub use runner::{RunError, RunnerHandle, run, start, start_with};
pub use store::{Store, StoreError};
pub use transport::{Incoming, Link, Outgoing, Transport, TransportError};
