//! The replica logic every adapter runs on its own copy of the data: which incoming field values
//! win over the stored ones, and which local writes are new, echoes or overruled.
//!
//! Each replica keeps, per record field, the value it holds and the stamp of the write that
//! produced it. Because stamps are totally ordered and every replica keeps the greatest, copies
//! converge whatever the order, duplication or delay of deliveries.

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
    /// A higher-priority owner's value stands for this field: publish nothing and write that
    /// value back to the system.
    Overruled,
}

/// Classifies a local write of `value` to a field for which the replica holds `stored`.
/// `own_rank` is the replica's merge rank for the field (0 when unknown or last-writer-wins).
pub fn classify_local(stored: Option<&FieldState>, value: Option<&[u8]>, self_system: &str, own_rank: u32) -> LocalWrite {
    match stored {
        None if value.is_none() => LocalWrite::Unchanged,
        None => LocalWrite::Publish,
        Some(s) if s.value.as_deref() == value => LocalWrite::Unchanged,
        Some(s) if s.stamp.system != self_system && s.stamp.rank > own_rank => LocalWrite::Overruled,
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
        assert!(incoming_wins(Some(&held), &Stamp::new(0, 11, "support"), "delivery", 0));
        assert!(!incoming_wins(Some(&held), &Stamp::new(0, 9, "support"), "delivery", 0));
        assert!(!incoming_wins(Some(&held), &held.stamp, "delivery", 0));
        let pending = FieldState { pending: true, ..held.clone() };
        assert!(incoming_wins(Some(&pending), &held.stamp, "delivery", 0));
        assert!(incoming_wins(None, &held.stamp, "delivery", 0));
    }

    #[test]
    fn own_writes_are_reranked() {
        // delivery wrote locally before knowing its rank (0); its true rank is 1, support's 2.
        let own = st("mine", 0, 50, "delivery");
        assert!(incoming_wins(Some(&own), &Stamp::new(2, 10, "support"), "delivery", 1));
        // A lower-ranked writer never wins against a higher-ranked own write.
        let own = st("mine", 0, 5, "support");
        assert!(!incoming_wins(Some(&own), &Stamp::new(1, 99, "delivery"), "support", 2));
    }

    #[test]
    fn local_writes() {
        let held = st("a", 2, 10, "support");
        assert_eq!(classify_local(Some(&held), Some(b"a"), "delivery", 1), LocalWrite::Unchanged);
        assert_eq!(classify_local(Some(&held), Some(b"b"), "delivery", 1), LocalWrite::Overruled);
        assert_eq!(classify_local(Some(&held), Some(b"b"), "orders", 3), LocalWrite::Publish);
        assert_eq!(classify_local(None, None, "orders", 0), LocalWrite::Unchanged);
        assert_eq!(classify_local(None, Some(b"x"), "orders", 0), LocalWrite::Publish);
        let own = st("a", 0, 10, "delivery");
        assert_eq!(classify_local(Some(&own), None, "delivery", 0), LocalWrite::Publish);
    }
}
