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

#[cfg(test)]
mod tests {
    use super::*;

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
