//! The Concord router service: consumes the change events adapters publish, enforces the
//! policy (per-field ownership and visibility, via the pure `concord-policy` core) and fans
//! the projections out to the inboxes of the systems that may see them, with at-least-once
//! delivery (an input is acknowledged only once every message it produced is confirmed).
//!
//! Several replicas share the work with a partitioned input (`partitions` > 1): the input is
//! split by record key into partition queues with a single active consumer each, every replica
//! subscribes to every partition (its preferred ones first), and a standby takes a partition over
//! when its active router goes away — per-record order is kept throughout.
//!
//! It also serves `/healthz`, `/readyz` and `/metrics`, reloads its policy on SIGHUP and on file
//! change, and reconnects by itself after any connection loss.
//!
//! This crate must never talk to the broker other than through `concord-amqp` (no `lapin`),
//! make routing decisions itself (they belong to `concord-policy`), acknowledge an input
//! before all of its publishes are confirmed, or read the wall clock anywhere but in one
//! function.

pub mod config;
mod http;
pub mod metrics;
mod policy_file;
mod service;
mod session;

pub use config::{ConfigError, QueueType, RouterConfig};
pub use metrics::{Metrics, ReloadResultLabel};
pub use policy_file::PolicyLoadError;
pub use service::{
    ReloadOutcome, Router, RouterError, RouterHandle, run, run_blocking, run_until_signalled,
};
pub use session::{
    DEAD_LETTER_KEY, HEADER_DETAIL, HEADER_KEY, HEADER_ORIGIN, HEADER_REASON, HEADER_ROUTING_KEY,
};
