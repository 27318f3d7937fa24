//! Hybrid logical clocks and field stamps.
//!
//! An HLC value keeps physical milliseconds in its high 48 bits and a logical counter in its low
//! 16 bits, so it stays close to wall time yet never goes backwards and always moves past every
//! clock it has observed. The current wall time is always passed in.

use std::cmp::Ordering;

/// Bits of an HLC value that hold the logical counter.
pub const LOGICAL_BITS: u32 = 16;

/// The physical milliseconds part of an HLC value.
pub fn physical_ms(hlc: u64) -> u64 {
    hlc >> LOGICAL_BITS
}

/// The HLC value for a wall time, with a zero logical counter.
pub fn from_ms(ms: u64) -> u64 {
    ms << LOGICAL_BITS
}

/// A hybrid logical clock owned by one writer (an adapter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A clock that has issued or observed nothing greater than `last`.
    pub fn starting_at(last: u64) -> Hlc {
        Hlc { last }
    }

    /// Issues a new stamp value for a local write at wall time `now_ms`: greater than every
    /// value issued or observed before.
    pub fn tick(&mut self, now_ms: u64) -> u64 {
        self.last = (self.last.saturating_add(1)).max(from_ms(now_ms));
        self.last
    }

    /// Records a value seen on an incoming change so later local writes order after it.
    pub fn observe(&mut self, remote: u64) {
        self.last = self.last.max(remote);
    }

    /// The greatest value issued or observed.
    pub fn last(&self) -> u64 {
        self.last
    }
}

/// The stamp of one field value: who wrote it, when (HLC) and with which merge rank.
///
/// Stamps are totally ordered by (`rank`, `hlc`, `system`); every replica keeps the value with
/// the greatest stamp, which is why all copies converge whatever the delivery order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Stamp {
    pub rank: u32,
    pub hlc: u64,
    pub system: String,
}

impl Stamp {
    pub fn new(rank: u32, hlc: u64, system: impl Into<String>) -> Stamp {
        Stamp {
            rank,
            hlc,
            system: system.into(),
        }
    }
}

impl Ord for Stamp {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.rank, self.hlc, self.system.as_str()).cmp(&(
            other.rank,
            other.hlc,
            other.system.as_str(),
        ))
    }
}

impl PartialOrd for Stamp {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tick_follows_wall_time_and_never_goes_back() {
        let mut c = Hlc::default();
        let a = c.tick(1_000);
        assert_eq!(physical_ms(a), 1_000);
        let b = c.tick(900); // wall clock stepped back
        assert!(b > a);
        c.observe(from_ms(5_000));
        let d = c.tick(1_001);
        assert!(d > from_ms(5_000));
    }

    #[test]
    fn rank_dominates_then_hlc_then_system() {
        let lo = Stamp::new(0, 10, "b");
        assert!(Stamp::new(1, 1, "a") > lo);
        assert!(Stamp::new(0, 11, "a") > lo);
        assert!(Stamp::new(0, 10, "c") > lo);
    }

    proptest! {
        #[test]
        fn ticks_are_strictly_increasing(walls in proptest::collection::vec(0u64..1_000_000, 1..50),
                                         seen in proptest::collection::vec(any::<u32>(), 0..10)) {
            let mut c = Hlc::default();
            let mut prev = 0;
            for (i, w) in walls.iter().enumerate() {
                if let Some(s) = seen.get(i) { c.observe(u64::from(*s)); }
                let t = c.tick(*w);
                prop_assert!(t > prev);
                prop_assert!(t >= c.last());
                prev = t;
            }
        }
    }
}
