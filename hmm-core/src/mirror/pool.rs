//! The device page pool: which 4 KiB device pages (slots) hold which CPU
//! page, and which one to evict when none is free.
//!
//! # Structure
//!
//! - A reverse map `slot → VirtAddr` (`Vec<Option<VirtAddr>>`), so the
//!   eviction path knows which PTE to zap and where to write back.
//! - A free stack of released slots, reused before fresh ones. The reverse
//!   map grows lazily up to the capacity, so a pool sized for a large device
//!   costs memory only for slots ever handed out.
//! - A CLOCK hand for second-chance eviction ([`PagePool::pick_victim`]):
//!   it sweeps the slots in order, asking the caller whether each page was
//!   accessed since the last look (the caller reads and clears the device
//!   `ACCESSED` bit); an accessed page is spared this time round, the
//!   first unaccessed one is the victim.
//!
//! # Costs
//!
//! `alloc`, `free`, `owner`: O(1). `pick_victim`: O(slots passed over),
//! at most two sweeps of the slots ever handed out; typically a few steps,
//! since the hand keeps its position between calls.
//!
//! Bad input never panics: freeing a slot that is not allocated (double
//! free, or a slot number past the capacity) returns `None`.

use std::collections::HashSet;

use super::format::PoolSlot;
use crate::addr::VirtAddr;

/// Slot allocator with reverse map and CLOCK eviction; see the module docs
/// (`hmm-core/src/mirror/pool.rs`).
#[derive(Clone, Debug)]
pub struct PagePool {
    /// Most slots.
    capacity: u32,
    /// Owner of every slot handed out so far (`None`: free). Its length
    /// only grows, up to `capacity`.
    owners: Vec<Option<VirtAddr>>,
    /// Freed slots below `owners.len()`, reused last-in first-out.
    free: Vec<u32>,
    /// Allocated slots.
    used: u32,
    /// The CLOCK hand: next slot to look at (`< owners.len()` when any).
    hand: u32,
}

impl PagePool {
    /// A pool of `slots` slots, all free. Zero slots is allowed: every
    /// allocation then fails.
    pub fn new(slots: u32) -> Self {
        PagePool {
            capacity: slots,
            owners: Vec::new(),
            free: Vec::new(),
            used: 0,
            hand: 0,
        }
    }

    /// Allocates a slot to back the CPU page at `va`; `None` when full.
    pub fn alloc(&mut self, va: VirtAddr) -> Option<PoolSlot> {
        let slot = match self.free.pop() {
            Some(s) => {
                self.owners[s as usize] = Some(va);
                s
            }
            None if (self.owners.len() as u64) < u64::from(self.capacity) => {
                self.owners.push(Some(va));
                (self.owners.len() - 1) as u32
            }
            None => return None,
        };
        self.used += 1;
        Some(PoolSlot(slot))
    }

    /// Frees `slot`, returning the page it backed; `None` (and no change)
    /// if it was not allocated.
    pub fn free(&mut self, slot: PoolSlot) -> Option<VirtAddr> {
        let va = self.owners.get_mut(slot.0 as usize)?.take()?;
        self.free.push(slot.0);
        self.used -= 1;
        Some(va)
    }

    /// The page `slot` backs, if allocated.
    pub fn owner(&self, slot: PoolSlot) -> Option<VirtAddr> {
        self.owners.get(slot.0 as usize).copied().flatten()
    }

    /// Picks an eviction victim by second-chance CLOCK.
    ///
    /// The hand advances over allocated slots, skipping those for which
    /// `pinned(slot)` is true. For each other slot it calls
    /// `young(slot, va)`, which says whether the page was accessed since the
    /// last look (the caller reads **and clears** the device `ACCESSED`
    /// bit, so a page left alone is old at the next look). A young slot is
    /// spared; the first old one is returned, still allocated: the caller
    /// writes it back if dirty, zaps its PTE, then [`PagePool::free`]s it.
    /// The hand stops just past the victim.
    ///
    /// Terminates after at most two sweeps. If every unpinned slot was
    /// still young at its second look (the device keeps touching all of
    /// them), the first unpinned slot met is returned anyway so eviction
    /// makes progress. Returns `None` only if the pool holds no allocated
    /// slot or every allocated slot is pinned. `pinned(slot, owner)`: the
    /// slot may not be evicted now.
    pub fn pick_victim(
        &mut self,
        mut young: impl FnMut(PoolSlot, VirtAddr) -> bool,
        mut pinned: impl FnMut(PoolSlot, VirtAddr) -> bool,
    ) -> Option<PoolSlot> {
        let n = self.owners.len() as u32;
        if self.used == 0 {
            return None;
        }
        let mut fallback = None;
        for _ in 0..2 * u64::from(n) {
            let s = self.hand;
            self.hand = if s + 1 == n { 0 } else { s + 1 };
            let Some(va) = self.owners[s as usize] else {
                continue;
            };
            let slot = PoolSlot(s);
            if pinned(slot, va) {
                continue;
            }
            fallback.get_or_insert(slot);
            if !young(slot, va) {
                return Some(slot);
            }
        }
        if let Some(PoolSlot(f)) = fallback {
            self.hand = if f + 1 == n { 0 } else { f + 1 };
        }
        fallback
    }

    /// Picks up to `want` eviction victims by second-chance CLOCK, asking
    /// about candidates in batches rather than one at a time (one device
    /// call per batch instead of per slot).
    ///
    /// The hand gathers up to `batch` allocated slots that are not
    /// `pinned` and not already chosen; `young` answers for the whole
    /// batch at once (it reads **and clears** each page's `ACCESSED` bit,
    /// like [`PagePool::pick_victim`]'s), one `bool` per candidate in
    /// order. Old ones become victims, in hand order, until `want` are
    /// chosen; the hand stops just past the last slot looked at. After two
    /// sweeps without enough old pages, the young candidates met are taken
    /// in hand order so eviction makes progress. Returns fewer than `want`
    /// only when fewer unpinned slots are allocated; victims stay
    /// allocated (the caller writes them back, zaps and frees them).
    pub fn pick_victims(
        &mut self,
        want: usize,
        batch: usize,
        mut young: impl FnMut(&[(PoolSlot, VirtAddr)]) -> Vec<bool>,
        mut pinned: impl FnMut(PoolSlot, VirtAddr) -> bool,
    ) -> Vec<PoolSlot> {
        let n = self.owners.len() as u32;
        let mut victims: Vec<PoolSlot> = Vec::new();
        if self.used == 0 || want == 0 {
            return victims;
        }
        let batch = batch.max(1);
        // Sets, not `n`-long vectors: a pool may have millions of slots and
        // a call looks at a few batches.
        let mut chosen: HashSet<u32, foldhash::fast::RandomState> = HashSet::default();
        let mut spared: Vec<PoolSlot> = Vec::new();
        let mut spared_set: HashSet<u32, foldhash::fast::RandomState> = HashSet::default();
        let mut looked = 0u64;
        let mut cands: Vec<(PoolSlot, VirtAddr)> = Vec::with_capacity(batch);
        while victims.len() < want && looked < 2 * u64::from(n) {
            cands.clear();
            // At most one revolution per batch, so no slot is asked about
            // twice in one batch.
            let mut this_batch = 0u32;
            while cands.len() < batch && looked < 2 * u64::from(n) && this_batch < n {
                this_batch += 1;
                let s = self.hand;
                self.hand = if s + 1 == n { 0 } else { s + 1 };
                looked += 1;
                let Some(va) = self.owners[s as usize] else {
                    continue;
                };
                let slot = PoolSlot(s);
                if chosen.contains(&s) || pinned(slot, va) {
                    continue;
                }
                cands.push((slot, va));
            }
            if cands.is_empty() {
                break;
            }
            let answers = young(&cands);
            for (i, &(slot, _)) in cands.iter().enumerate() {
                // A missing answer reads as "not young", as an unreadable
                // bit does.
                if victims.len() < want && !answers.get(i).copied().unwrap_or(false) {
                    chosen.insert(slot.0);
                    victims.push(slot);
                } else if spared_set.insert(slot.0) {
                    spared.push(slot);
                }
            }
        }
        // Every candidate stayed young for two sweeps: take them anyway.
        for slot in spared {
            if victims.len() >= want {
                break;
            }
            if chosen.insert(slot.0) {
                victims.push(slot);
            }
        }
        victims
    }

    /// Slots in all.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Allocated slots.
    pub fn used(&self) -> u32 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn va(n: u64) -> VirtAddr {
        VirtAddr(n << 12)
    }

    #[test]
    fn zero_slots() {
        let mut p = PagePool::new(0);
        assert_eq!(p.alloc(va(1)), None);
        assert_eq!(p.free(PoolSlot(0)), None);
        assert_eq!(p.pick_victim(|_, _| false, |_, _| false), None);
        assert_eq!((p.capacity(), p.used()), (0, 0));
    }

    #[test]
    fn alloc_until_full_then_reuse() {
        let mut p = PagePool::new(3);
        let s: Vec<PoolSlot> = (0..3).map(|i| p.alloc(va(i)).unwrap()).collect();
        assert_eq!(s, vec![PoolSlot(0), PoolSlot(1), PoolSlot(2)]);
        assert_eq!(p.alloc(va(9)), None);
        assert_eq!(p.owner(PoolSlot(1)), Some(va(1)));
        assert_eq!(p.free(PoolSlot(1)), Some(va(1)));
        assert_eq!(p.owner(PoolSlot(1)), None);
        assert_eq!(p.used(), 2);
        assert_eq!(p.alloc(va(7)), Some(PoolSlot(1)));
        assert_eq!(p.owner(PoolSlot(1)), Some(va(7)));
    }

    #[test]
    fn double_free_and_bogus_slot_are_reported() {
        let mut p = PagePool::new(4);
        let s = p.alloc(va(5)).unwrap();
        assert_eq!(p.free(s), Some(va(5)));
        assert_eq!(p.free(s), None);
        assert_eq!(p.free(PoolSlot(3)), None, "never handed out");
        assert_eq!(p.free(PoolSlot(u32::MAX)), None);
        assert_eq!(p.used(), 0);
        // The double free did not put the slot on the free list twice.
        assert!(p.alloc(va(1)).is_some());
        assert!(p.alloc(va(2)).is_some());
        assert_ne!(p.owner(PoolSlot(0)), None);
        assert_ne!(p.owner(PoolSlot(1)), None);
    }

    #[test]
    fn clock_gives_second_chance() {
        let mut p = PagePool::new(4);
        for i in 0..4 {
            p.alloc(va(i));
        }
        // Slots 0 and 1 were accessed once; 2 never.
        let mut accessed = [true, true, false, false];
        let mut looked = Vec::new();
        let v = p.pick_victim(
            |s, a| {
                looked.push((s.0, a));
                core::mem::take(&mut accessed[s.0 as usize])
            },
            |_, _| false,
        );
        assert_eq!(v, Some(PoolSlot(2)));
        assert_eq!(looked, vec![(0, va(0)), (1, va(1)), (2, va(2))]);
        // The hand moved on: next look starts at 3, which is old.
        assert_eq!(p.pick_victim(|_, _| false, |_, _| false), Some(PoolSlot(3)));
        // Then 0, whose bit was cleared by its second chance.
        assert_eq!(
            p.pick_victim(|s, _| accessed[s.0 as usize], |_, _| false),
            Some(PoolSlot(0))
        );
    }

    #[test]
    fn clock_terminates_when_all_young() {
        let mut p = PagePool::new(5);
        for i in 0..5 {
            p.alloc(va(i));
        }
        p.free(PoolSlot(3));
        let mut calls = 0;
        let v = p.pick_victim(
            |_, _| {
                calls += 1;
                true
            },
            |s, _| s.0 == 0,
        );
        assert_eq!(v, Some(PoolSlot(1)), "first unpinned slot met");
        assert_eq!(calls, 6, "two looks at each of the 3 unpinned slots");
    }

    #[test]
    fn clock_returns_none_when_all_pinned_or_empty() {
        let mut p = PagePool::new(3);
        assert_eq!(p.pick_victim(|_, _| false, |_, _| false), None);
        for i in 0..3 {
            p.alloc(va(i));
        }
        let mut young_calls = 0;
        let v = p.pick_victim(
            |_, _| {
                young_calls += 1;
                false
            },
            |_, _| true,
        );
        assert_eq!(v, None);
        assert_eq!(young_calls, 0);
        for i in 0..3 {
            p.free(PoolSlot(i));
        }
        assert_eq!(p.pick_victim(|_, _| false, |_, _| false), None);
    }
}
