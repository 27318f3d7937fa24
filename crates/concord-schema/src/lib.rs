//! The canonical model as run-time configuration.
//!
//! Concord's libraries know no entity: the protobuf messages of the entities (the *schema*) are
//! `.proto` files (compiled in-process with protox, no `protoc`) or an encoded
//! `google.protobuf.FileDescriptorSet`, named by the policy's `[schema]` table. This crate
//! loads them:
//!
//! - [`Schema`]: a compiled schema (a descriptor pool, with source info when compiled from
//!   `.proto` files, so that messages and fields can be located by file and line);
//! - [`Deployment`]: a policy file and the schema it names, loaded and validated together, the
//!   unit the router, the CLI and the adapter runner start from and reload;
//! - [`diff`]: the changes between two schemas, breaking or not, for every message or only for
//!   the fields a policy uses (pure: no I/O).
//!
//! This crate must never route, decide ownership or merges (that is `concord-policy`'s), talk
//! to the broker, or hold an entity of its own. File I/O happens only in [`Schema::compile`],
//! [`Schema::read_descriptor_set`], [`Schema::load`] and [`Deployment::load`].

mod deployment;
pub mod diff;
mod schema;

pub use deployment::{Deployment, LoadError};
pub use diff::{Change, ChangeKind, SchemaDiff};
pub use schema::{Schema, SchemaError};
