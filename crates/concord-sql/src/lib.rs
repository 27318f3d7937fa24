//! `concord-sql`: Concord's generic SQL adapter. A PostgreSQL, MariaDB/MySQL or SQLite database
//! becomes a Concord system by configuration, not code: per entity of the deployment's policy, a
//! table, its key columns and the mapping of canonical fields (the protobuf messages of the
//! deployment's `.proto` files, known only at run time) onto columns, with conversions.
//!
//! - **Capture** ([`SqlSystem::install`]): triggers record the key of every inserted, updated or
//!   deleted row of a mapped table in a change-log table, in the same transaction, except for
//!   the adapter's own applies, which run in transactions the triggers recognise (PostgreSQL: a
//!   transaction-local setting; MariaDB/MySQL: a session variable set for the transaction;
//!   SQLite: a marker row inside the transaction). The feed reports each logged row with its
//!   current values and deletes change-log rows only once the SDK confirms they are published.
//! - **Apply**: one transaction per incoming change, recording the event's id so a change is
//!   applied once even across crashes; creates rows (the key generated, the canonical key, or
//!   natural key fields), links existing rows by match fields, updates, deletes.
//! - **Check** ([`check`]): the mapping against the live schema and the canonical schema, every
//!   problem named (table, column, field, why).
//!
//! The pure core — configuration ([`config`]), column classification ([`schema`]), conversions
//! ([`convert`]), keys ([`key`]), the mapping ([`mapping`]) and the SQL text ([`dialect`]) — does
//! no I/O; [`db`], [`SqlSystem`] and the binary do.
//!
//! This crate must never name an entity or a field in code (they come from the deployment),
//! never decide what syncs (that is the policy's, through the SDK and the router), never write a
//! mapped table outside a transaction marked as the adapter's, and never delete a change-log row
//! before the SDK confirmed its change published.

mod apply;
mod capture;
pub mod config;
pub mod convert;
pub mod db;
pub mod dialect;
pub mod key;
pub mod mapping;
pub mod problem;
pub mod schema;
mod system;

pub use apply::ApplyError;
pub use config::SqlConfig;
pub use problem::{Problem, Severity};
pub use system::{SqlError, SqlSystem, check};
