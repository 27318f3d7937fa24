//! The replica logic every adapter runs on its own copy of the data: which incoming field values
//! win over the stored ones, and which local writes are new, echoes or overruled.
//!
//! Each replica keeps, per record field, the value it holds and the stamp of the write that
//! produced it. Because stamps are totally ordered and every replica keeps the greatest, copies
//! converge whatever the order, duplication or delay of deliveries.
//!
//! # How an adapter uses this module
//!
//! `tests/convergence.rs` simulates exactly these rules under delays, reordering, duplicates,
//! crashes and skewed clocks, and checks that the copies converge without echo traffic.
//!
//! - **Local change** of a field: [`classify_local`] against the stored state, with the merge
//!   rank the adapter last learned for the field (0 until it learns one).
//!   [`LocalWrite::Unchanged`]: publish nothing. [`LocalWrite::Overruled`]: publish nothing and
//!   write the stored value back to the system (a higher-ranked owner's value stands: this is how
//!   a non-owner's edit of an owned field, or a lower-priority owner's edit, is corrected).
//!   [`LocalWrite::Publish`]: stamp the published fields with one [`crate::Hlc::tick`], publish
//!   them and store value and stamp in the replica. A non-owner's write that the router rejects
//!   stays stored only until the next owner write arrives: the router stamps owners' writes with
//!   a rank of at least 1, and [`incoming_wins`] ranks the replica's own writes with its own rank
//!   for the field (0 for a non-owner), so the owner's write wins whatever the clocks say. The
//!   adapter needs no copy of the policy for this: the router tells each receiver its rank.
//! - **Delivery**: for each field of the mask, [`crate::Hlc::observe`] its clock, remember the
//!   rank from `receiver_ranks` (absent = 0), and if [`incoming_wins`] store the value
//!   ([`crate::route::encode_field`]) with the incoming stamp and `pending: true`; apply the
//!   winners to the system, clear `pending`, then acknowledge. A crash in between leaves the
//!   fields pending, so the redelivered message is applied again.
//! - **Deletes** order against field writes by their clocks alone (`(hlc, system)`, ranks play no
//!   part): a record exists as long as one of its fields was written after its last delete.
//!   A field write not newer than the tombstone is [`buried`] and ignored; [`on_delete`] says
//!   which stored fields a delete clears (those written before it) and whether the record goes
//!   (no field was written after it) or stays with the later fields only. A local delete clears
//!   every stored field (its clock is newer than all of them). So a delete and a concurrent later
//!   update leave every copy with the same record, whichever arrives first — for fields whose
//!   accepted writes all carry one rank (single-owner and `lww` fields). For a `priority` field a
//!   replica keeps only the highest-ranked write, so a lower-priority write made after a delete
//!   but received before it (and lost to an earlier higher-priority value) is not restored when
//!   the delete clears that value; exactness there needs the latest write per rank.
//! - **Echoes**: the system reports applied values back as local changes; they classify as
//!   [`LocalWrite::Unchanged`] provided they are reported before a newer value of the same
//!   field is applied. An echo that arrives after a newer value was applied no longer equals
//!   the stored value and would be published as a new write, resurrecting the older value:
//!   adapters whose change feed lags behind their writes must recognise and drop echoes of
//!   values they applied themselves.

use crate::clock::Stamp;

/// What a replica holds for one field of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldState {
    /// The encoded value (see [`crate::route::encode_field`]); `None` when the field is cleared.
    pub value: Option<Vec<u8>>,
    pub stamp: Stamp,
    /// Recorded before the value was applied to the system and not yet confirmed applied: an
    /// incoming change with the same stamp is applied again.
    pub pending: bool,
}

/// Whether an incoming write with `incoming` stamp replaces what the replica holds.
///
/// `self_system` and `self_rank` (the receiving system's current merge rank for the field, as the
/// router told it) re-rank the replica's own earlier local writes, which were stamped before the
/// replica knew its rank.
pub fn incoming_wins(
    stored: Option<&FieldState>,
    incoming: &Stamp,
    self_system: &str,
    self_rank: u32,
) -> bool {
    let Some(s) = stored else {
        return true;
    };
    let mut held = s.stamp.clone();
    if held.system == self_system {
        held.rank = self_rank;
    }
    *incoming > held || (*incoming == held && s.pending)
}

/// What to do with a change the system reported locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalWrite {
    /// The value equals what the replica holds (typically the echo of a change it applied):
    /// publish nothing.
    Unchanged,
    /// A new value: stamp it and publish it.
    Publish,
    /// A higher-ranked owner's value stands for this field (the system does not own it, or owns it
    /// with a lower priority): publish nothing and write that value back to the system.
    Overruled,
}

/// Classifies a local write of `value` to a field for which the replica holds `stored`.
/// `own_rank` is the replica's merge rank for the field as the router last told it (0 when the
/// system does not own the field, or before it has learned its rank).
pub fn classify_local(
    stored: Option<&FieldState>,
    value: Option<&[u8]>,
    self_system: &str,
    own_rank: u32,
) -> LocalWrite {
    match stored {
        None if value.is_none() => LocalWrite::Unchanged,
        None => LocalWrite::Publish,
        Some(s) if s.value.as_deref() == value => LocalWrite::Unchanged,
        Some(s) if s.stamp.system != self_system && s.stamp.rank > own_rank => {
            LocalWrite::Overruled
        }
        Some(_) => LocalWrite::Publish,
    }
}

/// Whether a field write stamped `(hlc, system)` is not newer than the record's delete
/// `tombstone`: it was made before the delete and must be ignored.
pub fn buried(hlc: u64, system: &str, tombstone: Option<(u64, &str)>) -> bool {
    tombstone.is_some_and(|t| (hlc, system) <= t)
}

/// What a delete does to a replica's record (see [`on_delete`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// Stored fields written before the delete: cleared (from the system and the replica).
    pub cleared: Vec<String>,
    /// Whether the record itself goes: no stored field was written after the delete. Otherwise
    /// it stays, holding only the later fields.
    pub remove_record: bool,
}

/// A delete stamped `delete` (its record clock, `(hlc, system)`) reaching a replica that holds
/// `tombstone` (the newest delete it has seen) and the stored `fields` of the record. `None`
/// when the delete is not newer than the tombstone (stale: nothing to do); the caller records
/// the new tombstone otherwise.
pub fn on_delete<'a>(
    tombstone: Option<(u64, &str)>,
    delete: (u64, &str),
    fields: impl IntoIterator<Item = (&'a str, &'a Stamp)>,
) -> Option<Deletion> {
    if tombstone.is_some_and(|t| delete <= t) {
        return None;
    }
    let mut cleared = Vec::new();
    let mut later = 0usize;
    for (name, stamp) in fields {
        if buried(stamp.hlc, &stamp.system, Some(delete)) {
            cleared.push(name.to_owned());
        } else {
            later += 1;
        }
    }
    Some(Deletion {
        cleared,
        remove_record: later == 0,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// One replica's record under the rules above: what it holds and what the system shows.
    #[derive(Debug, Default)]
    struct Replica {
        fields: BTreeMap<String, FieldState>,
        tombstone: Option<(u64, String)>,
        live: bool,
    }

    #[derive(Debug, Clone)]
    enum Change {
        Write {
            field: String,
            value: Vec<u8>,
            hlc: u64,
            system: String,
        },
        Delete {
            hlc: u64,
            system: String,
        },
    }

    impl Replica {
        fn receive(&mut self, change: &Change) {
            let tomb = self.tombstone.as_ref().map(|(h, s)| (*h, s.as_str()));
            match change {
                Change::Write {
                    field,
                    value,
                    hlc,
                    system,
                } => {
                    if buried(*hlc, system, tomb) {
                        return;
                    }
                    let stamp = Stamp::new(1, *hlc, system.clone());
                    if incoming_wins(self.fields.get(field), &stamp, "replica", 0) {
                        self.fields.insert(
                            field.clone(),
                            FieldState {
                                value: Some(value.clone()),
                                stamp,
                                pending: false,
                            },
                        );
                        self.live = true;
                    }
                }
                Change::Delete { hlc, system } => {
                    let fields = self.fields.iter().map(|(n, f)| (n.as_str(), &f.stamp));
                    let Some(d) = on_delete(tomb, (*hlc, system), fields) else {
                        return;
                    };
                    for name in &d.cleared {
                        self.fields.remove(name);
                    }
                    if d.remove_record {
                        self.live = false;
                    }
                    self.tombstone = Some((*hlc, system.clone()));
                }
            }
        }

        /// What the system shows: whether the record exists and its values.
        fn shown(&self) -> (bool, BTreeMap<String, Vec<u8>>) {
            let values = self
                .fields
                .iter()
                .filter_map(|(n, f)| Some((n.clone(), f.value.clone()?)))
                .collect();
            (self.live, values)
        }
    }

    fn change() -> impl Strategy<Value = Change> {
        let system = prop_oneof![Just("a".to_owned()), Just("b".to_owned())];
        prop_oneof![
            // A stamp identifies one write: the value follows from it.
            3 => ("[xyz]", 1u64..8, system.clone()).prop_map(|(field, hlc, system)| {
                let value = vec![u8::try_from(hlc).unwrap_or(0), system.as_bytes()[0]];
                Change::Write { field, value, hlc, system }
            }),
            1 => (1u64..8, system).prop_map(|(hlc, system)| Change::Delete { hlc, system }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// Whatever the order (and duplication) of writes and deletes, a replica ends with the
        /// same record: every copy converges. Every write carries one rank, as for single-owner
        /// and `lww` fields (see the module docs for `priority` fields).
        #[test]
        fn deletes_and_writes_commute(
            changes in proptest::collection::vec(change(), 1..8),
            order in Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()),
        ) {
            // A system's clock ticks for every change: a delete never shares a write's stamp.
            let stamp = |c: &Change| match c {
                Change::Write { hlc, system, .. } | Change::Delete { hlc, system } => (*hlc, system.clone()),
            };
            let deletes: Vec<_> = changes.iter().filter(|c| matches!(c, Change::Delete { .. })).map(stamp).collect();
            prop_assume!(!changes.iter().any(|c| matches!(c, Change::Write { .. }) && deletes.contains(&stamp(c))));
            let mut in_order = Replica::default();
            for c in &changes {
                in_order.receive(c);
            }
            // Another arrival order, with every change delivered twice.
            let mut shuffled: Vec<&Change> = changes.iter().chain(changes.iter()).collect();
            let mut seed = order;
            for i in (1..shuffled.len()).rev() {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let j = usize::try_from(seed >> 33).unwrap_or(0) % (i + 1);
                shuffled.swap(i, j);
            }
            let mut other = Replica::default();
            for c in shuffled {
                other.receive(c);
            }
            prop_assert_eq!(in_order.shown(), other.shown());
        }
    }

    #[test]
    fn a_delete_clears_older_fields_and_keeps_the_record_for_later_ones() {
        let older = Stamp::new(1, 3, "a");
        let later = Stamp::new(1, 5, "b");
        let d = on_delete(None, (4, "a"), [("x", &older), ("y", &later)]).unwrap();
        assert_eq!(d.cleared, ["x"]);
        assert!(!d.remove_record);
        let d = on_delete(None, (6, "a"), [("x", &older), ("y", &later)]).unwrap();
        assert_eq!(d.cleared, ["x", "y"]);
        assert!(d.remove_record);
        // Not newer than the tombstone: stale.
        assert_eq!(on_delete(Some((6, "a")), (6, "a"), [("y", &later)]), None);
        assert_eq!(on_delete(Some((6, "b")), (6, "a"), [("y", &later)]), None);
        assert!(buried(4, "a", Some((4, "a"))));
        assert!(!buried(4, "b", Some((4, "a"))));
        assert!(!buried(9, "a", None));
    }

    fn st(value: &str, rank: u32, hlc: u64, system: &str) -> FieldState {
        FieldState {
            value: Some(value.as_bytes().to_vec()),
            stamp: Stamp::new(rank, hlc, system),
            pending: false,
        }
    }

    #[test]
    fn newer_wins_older_and_duplicates_lose() {
        let held = st("a", 0, 10, "orders");
        assert!(incoming_wins(
            Some(&held),
            &Stamp::new(0, 11, "support"),
            "delivery",
            0
        ));
        assert!(!incoming_wins(
            Some(&held),
            &Stamp::new(0, 9, "support"),
            "delivery",
            0
        ));
        assert!(!incoming_wins(Some(&held), &held.stamp, "delivery", 0));
        let pending = FieldState {
            pending: true,
            ..held.clone()
        };
        assert!(incoming_wins(Some(&pending), &held.stamp, "delivery", 0));
        assert!(incoming_wins(None, &held.stamp, "delivery", 0));
    }

    #[test]
    fn own_writes_are_reranked() {
        // delivery wrote locally before knowing its rank (0); its true rank is 1, support's 2.
        let own = st("mine", 0, 50, "delivery");
        assert!(incoming_wins(
            Some(&own),
            &Stamp::new(2, 10, "support"),
            "delivery",
            1
        ));
        // A lower-ranked writer never wins against a higher-ranked own write.
        let own = st("mine", 0, 5, "support");
        assert!(!incoming_wins(
            Some(&own),
            &Stamp::new(1, 99, "delivery"),
            "support",
            2
        ));
    }

    #[test]
    fn local_writes() {
        let held = st("a", 2, 10, "support");
        assert_eq!(
            classify_local(Some(&held), Some(b"a"), "delivery", 1),
            LocalWrite::Unchanged
        );
        assert_eq!(
            classify_local(Some(&held), Some(b"b"), "delivery", 1),
            LocalWrite::Overruled
        );
        assert_eq!(
            classify_local(Some(&held), Some(b"b"), "orders", 3),
            LocalWrite::Publish
        );
        assert_eq!(
            classify_local(None, None, "orders", 0),
            LocalWrite::Unchanged
        );
        assert_eq!(
            classify_local(None, Some(b"x"), "orders", 0),
            LocalWrite::Publish
        );
        let own = st("a", 0, 10, "delivery");
        assert_eq!(
            classify_local(Some(&own), None, "delivery", 0),
            LocalWrite::Publish
        );
    }
}
