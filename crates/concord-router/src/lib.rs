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
//! The policy and the schema it names (the canonical model: `.proto` files or a descriptor set)
//! are loaded at start with `concord-schema`, and reloaded together on SIGHUP and when one of
//! their files changes; a reload whose schema breaks fields the policy in force uses is refused.
//! It also serves `/healthz`, `/readyz` and `/metrics` and reconnects by itself after any
//! connection loss.
//!
//! This crate must never talk to the broker other than through `concord-amqp` (no `lapin`),
//! make routing decisions itself (they belong to `concord-policy`), acknowledge an input
//! before all of its publishes are confirmed, or read the wall clock anywhere but in one
//! function.

pub mod config;
pub mod control;
mod http;
pub mod metrics;
mod policy_file;
mod reload;
mod service;
mod session;
mod state;

pub use concord_schema::LoadError as PolicyLoadError;
pub use config::{ConfigError, QueueType, RouterConfig};
pub use metrics::{Metrics, ReloadResultLabel};
pub use service::{Router, RouterError, RouterHandle, run, run_blocking, run_until_signalled};
pub use session::{
    DEAD_LETTER_KEY, HEADER_DETAIL, HEADER_KEY, HEADER_ORIGIN, HEADER_REASON, HEADER_ROUTING_KEY,
};
pub use state::ReloadOutcome;
