//! The pure core of Concord: the policy model and its validation, per-event routing decisions
//! (ownership and visibility), field clocks, merge rules, the replica logic every adapter
//! shares, and what changes when one policy replaces another (`diff`).
//!
//! This crate must never perform I/O, read a clock, spawn tasks or depend on tokio or lapin:
//! every function is a pure function of its inputs (time is passed in as milliseconds). That is
//! what lets the property tests and the deterministic convergence simulation exercise the exact
//! code the router and the adapters run.

pub mod clock;
pub mod decide;
pub mod diff;
pub mod model;
pub mod replica;
pub mod route;
pub mod schema;
pub mod sets;
pub mod value;
pub(crate) mod wire;

pub use clock::{Hlc, Stamp};
pub use decide::{RejectReason, Rejection, Verdict};
pub use model::{
    EntityPolicy, FieldRule, MergeRule, Policy, PolicyError, Problem, RESERVED_SYSTEM_NAMES,
    valid_name,
};
#[doc(hidden)]
pub use route::bench_filter;
pub use route::{DeadLetter, DeadLetterReason, Outcome, Routed, RouterSettings};
pub use schema::{Location, SchemaSource, field_location, message_location, parse_schema_section};
pub use sets::{FieldSet, SystemId, SystemSet};

/// The operation of a change, as the pure core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Upsert,
    Create,
    Delete,
    Snapshot,
}

impl Op {
    /// The lowercase name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Create => "create",
            Op::Delete => "delete",
            Op::Snapshot => "snapshot",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "upsert" => Some(Op::Upsert),
            "create" => Some(Op::Create),
            "delete" => Some(Op::Delete),
            "snapshot" => Some(Op::Snapshot),
            _ => None,
        }
    }

    /// Converts from the wire enum; `None` for `OP_UNSPECIFIED` or an unknown value.
    pub fn from_wire(op: i32) -> Option<Op> {
        use concord_proto::v1::Op as W;
        match W::try_from(op).ok()? {
            W::Upsert => Some(Op::Upsert),
            W::Create => Some(Op::Create),
            W::Delete => Some(Op::Delete),
            W::Snapshot => Some(Op::Snapshot),
            W::Unspecified => None,
        }
    }

    /// Converts to the wire enum.
    pub fn to_wire(self) -> concord_proto::v1::Op {
        use concord_proto::v1::Op as W;
        match self {
            Op::Upsert => W::Upsert,
            Op::Create => W::Create,
            Op::Delete => W::Delete,
            Op::Snapshot => W::Snapshot,
        }
    }
}

/// The seed scenario's schema (`examples/seed/customer.proto`), for the unit tests: the library
/// itself knows no entity.
#[cfg(test)]
pub(crate) fn seed_pool() -> prost_reflect::DescriptorPool {
    // Decoded once: descriptors of different pools never compare equal.
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    #[allow(clippy::expect_used)]
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET)
            .expect("the seed model embeds a valid descriptor set")
    })
    .clone()
}
