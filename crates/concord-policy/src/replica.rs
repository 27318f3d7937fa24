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
//!   rank from `receiver_ranks` (absent = 0), unless [`predates`] hand the write (value encoded
//!   with [`crate::value::encode_field`], the incoming stamp, `pending: true`) to the field's
//!   [`Held`]: if it wins ([`incoming_wins`]) it becomes the stored value; apply the
//!   winners to the system, clear `pending`, then acknowledge. A crash in between leaves the
//!   fields pending, so the redelivered message is applied again.
//! - **Deletes** order against field writes by their clocks alone (`(hlc, system)`, ranks play no
//!   part): a record exists as long as one of its fields was written after its last delete.
//!   A field write not newer than the tombstone is [`predates`] and ignored; a delete that is
//!   [`delete_is_new`] makes every field drop the writes made before it ([`Held::apply_delete`]): the
//!   greatest write made after it wins, and the record goes only if no field has one left. For
//!   that a replica keeps, per field, the winner and the latest later write of each lower rank
//!   ([`Held`]; only `priority` fields have any). A local delete clears every stored field (its
//!   clock is newer than all of them). So a delete and concurrent edits leave every copy with the
//!   same record, whichever arrives first.
//! - **Echoes**: the system reports applied values back as local changes; they classify as
//!   [`LocalWrite::Unchanged`] provided they are reported before a newer value of the same
//!   field is applied. An echo that arrives after a newer value was applied no longer equals
//!   the stored value and would be published as a new write, resurrecting the older value:
//!   adapters whose change feed lags behind their writes must recognise and drop echoes of
//!   values they applied themselves.

use crate::clock::Stamp;

mod record;

pub use record::{
    ApplyOp, ApplyPlan, CopyError, DEFAULT_CLOCK_SKEW_MS, DecodedCopy, DeleteStamp, Echo, Echoes,
    Incoming, IncomingField, IncomingStep, LocalEdit, LocalOp, LocalStep, Publish, PublishedField,
    Ranks, RecordState, Replica, Value, change_event, decode_copy,
};

/// What a replica holds for one field of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldState {
    /// The encoded value (see [`crate::value::encode_field`]); `None` when the field is cleared.
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
    let held = effective_stamp(s, self_system, self_rank);
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
/// (its tombstone): it was made before the delete and must be ignored.
pub fn predates(hlc: u64, system: &str, delete: Option<(u64, &str)>) -> bool {
    delete.is_some_and(|t| (hlc, system) <= t)
}

/// Whether a delete stamped `delete` (its record clock, `(hlc, system)`) is newer than the
/// `tombstone` a replica holds for the record; an older one changes nothing.
pub fn delete_is_new(tombstone: Option<(u64, &str)>, delete: (u64, &str)) -> bool {
    tombstone.is_none_or(|t| delete > t)
}

/// What a replica keeps of one field of one record: the winning write and, below it, the
/// latest write of each lower rank made after the winner (`shadows`). Only a `priority` field
/// has writers of different ranks, so only it ever has shadows. They are the writes a delete
/// can bring back: a delete clears the winner when it was made before the delete, and the
/// greatest write made after the delete must then win. Any other write is beaten by the winner
/// whenever it survives a delete (an older one of a lower rank, or one of the winner's rank),
/// so nothing else needs keeping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub winner: Option<FieldState>,
    /// Highest rank first; each of a rank below the winner's and later than the winner.
    pub shadows: Vec<FieldState>,
}

impl Held {
    /// A routed write that is not [`predates`]; returns whether it became the winner (then it is
    /// stored with `incoming.pending`, to be applied).
    pub fn receive(&mut self, incoming: FieldState, self_system: &str, self_rank: u32) -> bool {
        let won = incoming_wins(
            self.winner.as_ref(),
            &incoming.stamp,
            self_system,
            self_rank,
        );
        // A shadow is not applied to the system: it is never pending.
        if won {
            if let Some(old) = self.winner.replace(incoming) {
                self.shadows.push(FieldState {
                    pending: false,
                    ..effective(old, self_system, self_rank)
                });
            }
        } else {
            self.shadows.push(FieldState {
                pending: false,
                ..incoming
            });
        }
        self.prune(self_system, self_rank);
        won
    }

    /// A local write this system publishes: it replaces the winner, and every shadow is older.
    pub fn local(&mut self, state: FieldState) {
        self.winner = Some(state);
        self.shadows.clear();
    }

    /// A delete stamped `delete`: every write made before it goes, and the greatest write made
    /// after it (if any) wins. Returns whether the winner changed (to apply to the system; a
    /// write brought back from the shadows is not pending: the caller marks it if it needs to).
    pub fn apply_delete(&mut self, delete: (u64, &str), self_system: &str, self_rank: u32) -> bool {
        let before = self.winner.clone();
        let mut left: Vec<FieldState> = self
            .winner
            .take()
            .into_iter()
            .chain(self.shadows.drain(..))
            .filter(|w| !predates(w.stamp.hlc, &w.stamp.system, Some(delete)))
            .map(|w| effective(w, self_system, self_rank))
            .collect();
        left.sort_by(|a, b| b.stamp.cmp(&a.stamp));
        let mut left = left.into_iter();
        self.winner = left.next();
        self.shadows = left.collect();
        self.prune(self_system, self_rank);
        self.winner != before
    }

    /// Keeps only the shadows a delete could bring back: routed writes (rank at least 1; a
    /// replica's own rank-0 write was rejected by the router) of a rank below the winner's,
    /// made after it, the latest of each rank.
    fn prune(&mut self, self_system: &str, self_rank: u32) {
        let Some(w) = self
            .winner
            .as_ref()
            .map(|w| effective_stamp(w, self_system, self_rank))
        else {
            self.shadows.clear();
            return;
        };
        self.shadows.retain(|s| {
            s.stamp.rank >= 1
                && s.stamp.rank < w.rank
                && (s.stamp.hlc, s.stamp.system.as_str()) > (w.hlc, w.system.as_str())
        });
        self.shadows.sort_by(|a, b| b.stamp.cmp(&a.stamp));
        self.shadows
            .dedup_by(|later, earlier| later.stamp.rank == earlier.stamp.rank);
    }
}

/// The stamp a replica compares a held write by: its own writes carry its current rank.
fn effective_stamp(state: &FieldState, self_system: &str, self_rank: u32) -> Stamp {
    let mut stamp = state.stamp.clone();
    if stamp.system == self_system {
        stamp.rank = self_rank;
    }
    stamp
}

fn effective(mut state: FieldState, self_system: &str, self_rank: u32) -> FieldState {
    state.stamp = effective_stamp(&state, self_system, self_rank);
    state
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// One replica's record under the rules above: what it holds and what the system shows.
    #[derive(Debug, Default)]
    struct Replica {
        fields: BTreeMap<String, Held>,
        tombstone: Option<(u64, String)>,
    }

    #[derive(Debug, Clone)]
    enum Change {
        Write {
            field: String,
            value: Vec<u8>,
            rank: u32,
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
                    rank,
                    hlc,
                    system,
                } => {
                    if predates(*hlc, system, tomb) {
                        return;
                    }
                    let incoming = FieldState {
                        value: Some(value.clone()),
                        stamp: Stamp::new(*rank, *hlc, system.clone()),
                        pending: false,
                    };
                    self.fields
                        .entry(field.clone())
                        .or_default()
                        .receive(incoming, "replica", 0);
                }
                Change::Delete { hlc, system } => {
                    if !delete_is_new(tomb, (*hlc, system)) {
                        return;
                    }
                    for held in self.fields.values_mut() {
                        held.apply_delete((*hlc, system), "replica", 0);
                    }
                    self.tombstone = Some((*hlc, system.clone()));
                }
            }
        }

        /// What the system shows: whether the record exists (a field has a winner) and its
        /// values.
        fn shown(&self) -> (bool, BTreeMap<String, Vec<u8>>) {
            let live = self.fields.values().any(|h| h.winner.is_some());
            let values = self
                .fields
                .iter()
                .filter_map(|(n, h)| Some((n.clone(), h.winner.as_ref()?.value.clone()?)))
                .collect();
            (live, values)
        }
    }

    /// What every copy must show: per field, the greatest write (by rank, then clock) made
    /// after the newest delete.
    fn expected(changes: &[Change]) -> BTreeMap<String, Vec<u8>> {
        let newest_delete = changes
            .iter()
            .filter_map(|c| match c {
                Change::Delete { hlc, system } => Some((*hlc, system.as_str())),
                Change::Write { .. } => None,
            })
            .max();
        let mut best: BTreeMap<String, (Stamp, Vec<u8>)> = BTreeMap::new();
        for c in changes {
            let Change::Write {
                field,
                value,
                rank,
                hlc,
                system,
            } = c
            else {
                continue;
            };
            if predates(*hlc, system, newest_delete) {
                continue;
            }
            let stamp = Stamp::new(*rank, *hlc, system.clone());
            match best.get(field) {
                Some((held, _)) if *held >= stamp => {}
                _ => {
                    best.insert(field.clone(), (stamp, value.clone()));
                }
            }
        }
        best.into_iter().map(|(f, (_, v))| (f, v)).collect()
    }

    fn change() -> impl Strategy<Value = Change> {
        let system = prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned())
        ];
        prop_oneof![
            // A stamp identifies one write: the value follows from it, and a system writes a
            // field with one rank (as a priority owner does).
            3 => ("[xyz]", 1u64..8, system.clone()).prop_map(|(field, hlc, system)| {
                let (f, s) = (field.as_bytes()[0], system.as_bytes()[0]);
                let value = vec![u8::try_from(hlc).unwrap_or(0), s];
                let rank = 1 + u32::from(f.wrapping_add(s) % 3);
                Change::Write { field, value, rank, hlc, system }
            }),
            1 => (1u64..8, system).prop_map(|(hlc, system)| Change::Delete { hlc, system }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]
        /// Whatever the order (and duplication) of writes and deletes, a replica ends with the
        /// same record, and it shows per field the greatest write made after the newest delete:
        /// every copy converges, also for fields whose writers have different ranks.
        #[test]
        fn deletes_and_writes_commute(
            changes in proptest::collection::vec(change(), 1..10),
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
            prop_assert_eq!(in_order.shown().1, expected(&changes));
        }
    }

    fn st(value: &str, rank: u32, hlc: u64, system: &str) -> FieldState {
        FieldState {
            value: Some(value.as_bytes().to_vec()),
            stamp: Stamp::new(rank, hlc, system),
            pending: false,
        }
    }

    #[test]
    fn a_delete_brings_back_a_later_lower_priority_write() {
        // support (priority 2) wrote at 3, delivery (priority 1) at 5: support's value wins.
        let mut held = Held::default();
        assert!(held.receive(st("support's", 2, 3, "support"), "orders", 0));
        assert!(!held.receive(st("delivery's", 1, 5, "delivery"), "orders", 0));
        assert_eq!(held.shadows.len(), 1);
        // A delete at 4 clears support's value; delivery's, made after it, now wins.
        assert!(held.apply_delete((4, "orders"), "orders", 0));
        assert_eq!(held.winner, Some(st("delivery's", 1, 5, "delivery")));
        assert!(held.shadows.is_empty());
        // A delete at 6 clears everything.
        assert!(held.apply_delete((6, "orders"), "orders", 0));
        assert_eq!(held, Held::default());
        // An older lower-priority write is never kept: the winner beats it whatever a delete
        // leaves.
        let mut held = Held::default();
        held.receive(st("support's", 2, 5, "support"), "orders", 0);
        held.receive(st("delivery's", 1, 3, "delivery"), "orders", 0);
        assert!(held.shadows.is_empty());
        assert!(delete_is_new(None, (1, "a")));
        assert!(delete_is_new(Some((1, "a")), (1, "b")));
        assert!(!delete_is_new(Some((1, "b")), (1, "b")));
        assert!(predates(4, "a", Some((4, "a"))));
        assert!(!predates(4, "b", Some((4, "a"))));
        assert!(!predates(9, "a", None));
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
