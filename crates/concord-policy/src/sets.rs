//! Small fixed-size bit sets: the decision hot path works on bits, not strings.

/// Index of a system in a [`crate::Policy`] (at most [`SystemSet::CAPACITY`] systems).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SystemId(pub(crate) u8);

impl SystemId {
    /// The position of the system in the policy's system list.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A set of systems of one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct SystemSet(pub(crate) u64);

impl SystemSet {
    /// The most systems one policy may declare.
    pub const CAPACITY: usize = 64;

    pub fn contains(self, s: SystemId) -> bool {
        self.0 & (1u64 << s.0) != 0
    }
    pub fn insert(&mut self, s: SystemId) {
        self.0 |= 1u64 << s.0;
    }
    pub fn remove(&mut self, s: SystemId) {
        self.0 &= !(1u64 << s.0);
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    /// Members in index order.
    pub fn iter(self) -> impl Iterator<Item = SystemId> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            Some(SystemId(i as u8))
        })
    }
}

/// A set of fields of one entity, by their position in the entity's field list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct FieldSet(pub(crate) u128);

impl FieldSet {
    /// The most fields one entity may declare in a policy.
    pub const CAPACITY: usize = 128;

    pub fn contains(self, i: usize) -> bool {
        i < Self::CAPACITY && self.0 & (1u128 << i) != 0
    }
    pub fn insert(&mut self, i: usize) {
        if i < Self::CAPACITY {
            self.0 |= 1u128 << i;
        }
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    pub fn intersect(self, other: FieldSet) -> FieldSet {
        FieldSet(self.0 & other.0)
    }
    pub fn union(self, other: FieldSet) -> FieldSet {
        FieldSet(self.0 | other.0)
    }
    pub fn difference(self, other: FieldSet) -> FieldSet {
        FieldSet(self.0 & !other.0)
    }
    /// Members in ascending order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            Some(i as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_iterate_in_order() {
        let mut f = FieldSet::default();
        for i in [127, 3, 64, 0] {
            f.insert(i);
        }
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![0, 3, 64, 127]);
        let mut s = SystemSet::default();
        s.insert(SystemId(63));
        s.insert(SystemId(1));
        assert_eq!(
            s.iter().map(SystemId::index).collect::<Vec<_>>(),
            vec![1, 63]
        );
        s.remove(SystemId(1));
        assert_eq!(s.len(), 1);
    }
}
