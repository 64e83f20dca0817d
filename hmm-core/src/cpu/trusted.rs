//! The mapping cache's trusted ranges: the watched ranges whose changes
//! events report, so cached mappings inside them may be served without a
//! fresh read (`maps` module docs).

use crate::addr::VaRange;

/// The trusted ranges (they may overlap), sorted by start, with the
/// running maximum of their ends: an address is in some range iff the
/// greatest end among the ranges starting at or below it lies above it —
/// one binary search instead of a walk over every watched region (a
/// sparse launch looks an address up per faulted page, with hundreds of
/// regions watched).
#[derive(Default)]
pub(crate) struct Trusted {
    ranges: Vec<VaRange>,
    /// `max_end[i]`: the greatest end among `ranges[..=i]`.
    max_end: Vec<u64>,
}

impl Trusted {
    pub(crate) fn contains(&self, a: u64) -> bool {
        let n = self.ranges.partition_point(|r| r.start().0 <= a);
        n > 0 && self.max_end[n - 1] > a
    }

    /// Adds `range` unless one range already covers it.
    pub(crate) fn add(&mut self, range: VaRange) {
        if self.ranges.iter().any(|r| r.covers(range)) {
            return;
        }
        let at = self.ranges.partition_point(|r| r.start() <= range.start());
        self.ranges.insert(at, range);
        self.reindex(at);
    }

    /// Drops every range that overlaps `range`.
    pub(crate) fn drop_overlapping(&mut self, range: VaRange) {
        let before = self.ranges.len();
        self.ranges.retain(|r| !r.overlaps(range));
        if self.ranges.len() != before {
            self.reindex(0);
        }
    }

    fn reindex(&mut self, from: usize) {
        self.max_end.truncate(from);
        let mut m = from.checked_sub(1).map_or(0, |i| self.max_end[i]);
        for r in &self.ranges[from..] {
            m = m.max(r.end().0);
            self.max_end.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Trusted;
    use crate::addr::{VaRange, VirtAddr};
    use proptest::prelude::*;

    fn range(start: u64, len: u64) -> VaRange {
        VaRange::new(VirtAddr(start * 4096), VirtAddr((start + len) * 4096)).unwrap()
    }

    proptest! {
        /// Against the walk it replaced: the same ranges kept (add
        /// skips a covered range, drop removes every overlapping one)
        /// and the same answer for every address near their edges.
        #[test]
        fn trusted_answers_as_a_walk_does(
            ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..24), 1..40),
        ) {
            let mut t = Trusted::default();
            let mut naive: Vec<VaRange> = Vec::new();
            for (add, start, len) in ops {
                let r = range(start, len);
                if add {
                    t.add(r);
                    if !naive.iter().any(|n| n.covers(r)) {
                        naive.push(r);
                    }
                } else {
                    t.drop_overlapping(r);
                    naive.retain(|n| !n.overlaps(r));
                }
                prop_assert_eq!(t.ranges.len(), naive.len());
                for page in 0..96u64 {
                    for a in [page * 4096, page * 4096 + 4095] {
                        let want = naive.iter().any(|n| n.contains(VirtAddr(a)));
                        prop_assert_eq!(t.contains(a), want, "address {:#x}", a);
                    }
                }
            }
        }
    }
}
