//! [`RangeSet`]: the monitor's sets of watched, whole-mapping and armed
//! ranges, edited in place by events (split from `monitor.rs`).

use crate::addr::{VaRange, VirtAddr};

/// Sorted, disjoint, non-adjacent ranges. Edited in place so that the
/// monitor thread allocates nothing while spare capacity lasts (see
/// "Allocation" in `monitor`'s module docs); `watch` keeps spare capacity.
#[derive(Default, Debug)]
pub(super) struct RangeSet(pub(super) Vec<VaRange>);

impl RangeSet {
    pub(super) const SPARE: usize = 16;

    pub(super) fn reserve_spare(&mut self) {
        if self.0.capacity() - self.0.len() < Self::SPARE {
            self.0.reserve(2 * Self::SPARE);
        }
    }

    pub(super) fn remove(&mut self, r: VaRange) {
        // At most one element strictly contains `r` and leaves two pieces.
        let mut extra = None;
        self.0.retain_mut(|w| {
            if !w.overlaps(r) {
                return true;
            }
            let left = VaRange::new(w.start(), r.start()).ok();
            let right = VaRange::new(r.end(), w.end()).ok();
            match (left, right) {
                (Some(l), Some(rt)) => {
                    *w = l;
                    extra = Some(rt);
                    true
                }
                (Some(x), None) | (None, Some(x)) => {
                    *w = x;
                    true
                }
                (None, None) => false,
            }
        });
        if let Some(x) = extra {
            self.0.push(x);
            self.0.sort_unstable();
        }
    }

    pub(super) fn insert(&mut self, r: VaRange) {
        self.0.push(r);
        self.normalize();
    }

    /// Sorts and merges overlapping or adjacent ranges, in place.
    pub(super) fn normalize(&mut self) {
        self.0.sort_unstable();
        self.0.dedup_by(|next, prev| {
            if next.start() <= prev.end() {
                if let Ok(m) = VaRange::new(prev.start(), prev.end().max(next.end())) {
                    *prev = m;
                }
                true
            } else {
                false
            }
        });
    }

    /// The parts inside `[from, from + len)` move to `to`.
    pub(super) fn shift(&mut self, old: VaRange, to: VirtAddr) {
        let n = self.0.len();
        for i in 0..n {
            let Some(inside) = self.0[i].intersect(old) else {
                continue;
            };
            let off = inside.start().get() - old.start().get();
            if let Ok(moved) =
                VaRange::from_start_len(VirtAddr(to.get().wrapping_add(off)), inside.len())
            {
                self.0.push(moved);
            }
        }
        // The moved copies do not overlap `old` (mremap never moves onto
        // an overlapping destination), so this only trims the originals.
        self.remove(old);
        self.normalize();
    }

    /// Whether one element contains all of `r`.
    pub(super) fn covers(&self, r: VaRange) -> bool {
        self.0
            .iter()
            .any(|w| w.start() <= r.start() && r.end() <= w.end())
    }

    pub(super) fn overlapping(&self, r: VaRange) -> Vec<VaRange> {
        self.0.iter().filter_map(|w| w.intersect(r)).collect()
    }

    /// The parts of `r` no element covers, in order.
    pub(super) fn gaps(&self, r: VaRange) -> Vec<VaRange> {
        let mut out = Vec::new();
        let mut at = r.start();
        for w in self.overlapping(r) {
            if w.start() > at {
                out.extend(VaRange::new(at, w.start()).ok());
            }
            at = at.max(w.end());
        }
        if at < r.end() {
            out.extend(VaRange::new(at, r.end()).ok());
        }
        out
    }
}
