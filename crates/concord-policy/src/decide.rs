//! The decision for one change event: which changed fields are accepted (the source owns them),
//! which are rejected and why, and which projection each other system receives.

use crate::Op;
use crate::model::{EntityPolicy, Policy};
use crate::sets::{FieldSet, SystemId};

/// Why a changed field was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The source system does not own the field.
    NotOwner,
    /// The entity has no such field in the policy (or the message has none).
    UnknownField,
    /// The source may not create records of this entity.
    CreateNotAllowed,
    /// The source may not delete records of this entity.
    DeleteNotAllowed,
}

impl RejectReason {
    /// The snake_case code used in metrics, logs and `concord explain`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotOwner => "not_owner",
            RejectReason::UnknownField => "unknown_field",
            RejectReason::CreateNotAllowed => "create_not_allowed",
            RejectReason::DeleteNotAllowed => "delete_not_allowed",
        }
    }
}

/// A rejected field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub field: String,
    pub reason: RejectReason,
}

/// The decision for one event, as bit sets over the entity's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub source: SystemId,
    pub op: Op,
    /// Changed fields the source owns.
    pub accepted: FieldSet,
    /// Changed fields the source does not own.
    pub not_owner: FieldSet,
    /// When the whole operation is refused (create or delete not allowed).
    pub refused: Option<RejectReason>,
}

impl Verdict {
    /// Per target system, the accepted fields it may see. Never yields the source; never yields
    /// a system with nothing to receive. A delete and a create go to every other system that
    /// sees the entity (a create with the fields each may see, possibly none).
    pub fn deliveries<'a>(
        &'a self,
        entity: &'a EntityPolicy,
    ) -> impl Iterator<Item = (SystemId, FieldSet)> + 'a {
        let mut targets = entity.readers;
        targets.remove(self.source);
        let refused = self.refused.is_some();
        targets.iter().filter_map(move |s| {
            if refused {
                return None;
            }
            if self.op == Op::Delete {
                return Some((s, FieldSet::default()));
            }
            let fields = self.accepted.intersect(entity.visible_to(s));
            // A created record appears in every system that sees any field of the entity, even
            // with none of the fields set.
            (!fields.is_empty() || self.op == Op::Create).then_some((s, fields))
        })
    }
}

impl Policy {
    /// Decides on an event whose changed fields are given by position in the entity.
    /// Allocation-free: this is the router's hot path.
    pub fn decide_set(
        &self,
        entity: &EntityPolicy,
        source: SystemId,
        op: Op,
        changed: FieldSet,
    ) -> Verdict {
        let refused = match op {
            Op::Create if !entity.create.contains(source) => Some(RejectReason::CreateNotAllowed),
            Op::Delete if !entity.delete.contains(source) => Some(RejectReason::DeleteNotAllowed),
            _ => None,
        };
        let (accepted, not_owner) = match (refused, op) {
            (Some(_), _) | (None, Op::Delete) => (FieldSet::default(), FieldSet::default()),
            (None, _) => {
                let owned = entity.owned_by(source);
                (changed.intersect(owned), changed.difference(owned))
            }
        };
        Verdict {
            source,
            op,
            accepted,
            not_owner,
            refused,
        }
    }

    /// Decides on an event given field names; unknown names come back as rejections.
    pub fn decide_names<'n>(
        &self,
        entity: &EntityPolicy,
        source: SystemId,
        op: Op,
        changed: impl IntoIterator<Item = &'n str>,
    ) -> (Verdict, Vec<Rejection>) {
        let mut set = FieldSet::default();
        let mut unknown = Vec::new();
        for name in changed {
            match entity.field_index(name) {
                Some(i) => set.insert(i),
                None => unknown.push(name.to_owned()),
            }
        }
        let verdict = self.decide_set(entity, source, op, set);
        let rejections = verdict.rejections(entity, set, &unknown);
        (verdict, rejections)
    }
}

impl Verdict {
    /// All rejections, sorted by field name: fields of a refused operation, fields the source
    /// does not own and unknown field names.
    pub fn rejections(
        &self,
        entity: &EntityPolicy,
        changed: FieldSet,
        unknown: &[String],
    ) -> Vec<Rejection> {
        let mut out: Vec<Rejection> = Vec::new();
        let (set, reason) = match self.refused {
            Some(r) => (changed, r),
            None => (self.not_owner, RejectReason::NotOwner),
        };
        out.extend(entity.names(set).map(|f| Rejection {
            field: f.to_owned(),
            reason,
        }));
        out.extend(unknown.iter().map(|f| Rejection {
            field: f.clone(),
            reason: RejectReason::UnknownField,
        }));
        out.sort_by(|a, b| a.field.cmp(&b.field));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Policy {
        let text = include_str!("../../../examples/seed/policy.toml");
        Policy::from_toml(text, "policy.toml", &crate::seed_pool()).unwrap()
    }

    /// Accepted fields, rejections (field, reason) and deliveries (system, fields).
    type Outcome = (
        Vec<String>,
        Vec<(String, &'static str)>,
        Vec<(String, Vec<String>)>,
    );

    fn run(p: &Policy, source: &str, op: Op, fields: &[&str]) -> Outcome {
        let e = p.entity("customer").unwrap();
        let src = p.system_id(source).unwrap();
        let (v, rej) = p.decide_names(e, src, op, fields.iter().copied());
        let accepted = e.names(v.accepted).map(str::to_owned).collect();
        let rejected = rej
            .iter()
            .map(|r| (r.field.clone(), r.reason.as_str()))
            .collect();
        let deliveries = v
            .deliveries(e)
            .map(|(s, f)| {
                (
                    p.system_name(s).to_owned(),
                    e.names(f).map(str::to_owned).collect(),
                )
            })
            .collect();
        (accepted, rejected, deliveries)
    }

    #[test]
    fn seed_scenario_ownership_and_visibility() {
        let p = seed();
        let (acc, rej, del) = run(
            &p,
            "orders",
            Op::Upsert,
            &["name", "warehouse", "amount_paid", "bogus"],
        );
        assert_eq!(acc, ["amount_paid", "name"]);
        assert_eq!(
            rej,
            [
                ("bogus".into(), "unknown_field"),
                ("warehouse".into(), "not_owner")
            ]
        );
        // delivery sees the name but never what the customer paid.
        assert!(del.iter().any(|(s, f)| s == "delivery" && f == &["name"]));
        assert!(del.iter().all(|(s, _)| s != "orders"));

        let (acc, _, del) = run(
            &p,
            "delivery",
            Op::Upsert,
            &["delivery_status", "warehouse"],
        );
        assert_eq!(acc, ["delivery_status", "warehouse"]);
        // orders sees the delivery status but never the warehouse.
        let orders = del.iter().find(|(s, _)| s == "orders").unwrap();
        assert_eq!(orders.1, ["delivery_status"]);
    }

    #[test]
    fn nothing_visible_means_no_delivery() {
        let p = seed();
        let (acc, _, del) = run(&p, "delivery", Op::Upsert, &["warehouse"]);
        assert_eq!(acc, ["warehouse"]);
        assert!(del.is_empty(), "{del:?}");
    }

    #[test]
    fn create_and_delete_permissions() {
        let p = seed();
        let (acc, rej, del) = run(&p, "support", Op::Create, &["open_tickets"]);
        assert!(acc.is_empty() && del.is_empty());
        assert_eq!(rej, [("open_tickets".into(), "create_not_allowed")]);
        let (_, _, del) = run(&p, "orders", Op::Delete, &[]);
        let targets: Vec<_> = del.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(targets, ["delivery", "support"]);
        let (_, _, del) = run(&p, "delivery", Op::Delete, &[]);
        assert!(del.is_empty());
    }
}
