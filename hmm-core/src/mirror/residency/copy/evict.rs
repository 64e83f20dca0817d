//! Making room in the pool: a bulk eviction before a round installs
//! ([`CopyPool::evict_batch`]: victims by CLOCK with their `ACCESSED` bits
//! read and cleared in batches, written back in one batch, their entries
//! cleared in one write) and the per-page path for what that leaves short
//! ([`CopyPool::alloc_slot`]).

use super::*;

/// Eviction candidates whose `ACCESSED` bits are read (and cleared) in one
/// device call ([`CopyPool::evict_batch`]), at least.
const EVICT_BATCH: usize = 64;

/// What eviction must pass over now: pinned, kept (`keep`: the slots of
/// the pages being installed), quarantined (an entry may still name
/// them), the round's focus pages, and pages whose write-back was refused.
struct Spared<'a> {
    pinned: &'a HashSet<PoolSlot>,
    keep: &'a FastSet<PoolSlot>,
    quarantine: &'a HashSet<PoolSlot>,
    focus: &'a FastSet<VirtAddr>,
    refused: &'a BTreeSet<VirtAddr>,
}

impl Spared<'_> {
    fn contains(&self, slot: PoolSlot, owner: VirtAddr) -> bool {
        self.pinned.contains(&slot)
            || self.keep.contains(&slot)
            || self.quarantine.contains(&slot)
            || self.focus.contains(&owner)
            || self.refused.contains(&owner)
    }
}

impl CopyPool {
    pub(super) fn exhausted(&self, needed: u64) -> MirrorError {
        MirrorError::PoolExhausted {
            needed,
            capacity: self.pool.capacity(),
        }
    }

    /// A free slot for `va`, evicting if the pool is full. `keep`: slots
    /// eviction must not pick (those of the pages being installed now).
    pub(super) fn alloc_slot<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        va: VirtAddr,
        keep: &FastSet<PoolSlot>,
    ) -> Result<PoolSlot, MirrorError> {
        if let Some(s) = self.pool.alloc(va) {
            return Ok(s);
        }
        // A victim whose write-back is refused stays (its data has nowhere
        // else to go; `refused` remembers it for the next launch to
        // report): pick another. Each refusal removes one candidate, so
        // this ends.
        loop {
            let (table, backend) = (&*cx.table, cx.backend);
            let spared = Spared {
                pinned: &self.pinned,
                keep,
                quarantine: &self.quarantine,
                focus: &self.focus_pages,
                refused: &self.refused,
            };
            let victim = self.pool.pick_victim(
                |_slot, owner| {
                    let Some(loc) = table.leaf_loc(owner) else {
                        return false;
                    };
                    let mut old = Vec::with_capacity(1);
                    // An unreadable bit reads as "not young": CLOCK is advice.
                    backend.clear_pte_bits(&[loc], ACCESSED, &mut old).is_ok()
                        && old.first().is_some_and(|p| p.accessed())
                },
                |slot, owner| spared.contains(slot, owner),
            );
            let owner = victim.and_then(|v| self.pool.owner(v));
            let Some(owner) = owner else {
                return Err(self.exhausted(1));
            };
            let page = VaRange::from_start_len(owner, PAGE_SIZE)?;
            match zap(cx, self, page, true) {
                Ok(()) => break,
                Err(MirrorError::WriteBackRefused { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Counters::add(&cx.counters.evictions, 1);
        self.pool.alloc(va).ok_or_else(|| self.exhausted(1))
    }

    /// Frees room for `want` more pages at once: victims chosen by
    /// [`PagePool::pick_victims`] (their `ACCESSED` bits read and cleared
    /// in batches of [`EVICT_BATCH`], one device call each), written back
    /// in one batch, their entries cleared in one flush
    /// (`state::zap_pages`). The per-page path
    /// ([`CopyPool::alloc_slot`]) stays for what this leaves short (a
    /// refused write-back keeps its page). `keep`: slots not to evict.
    /// Returns the pages evicted.
    pub(super) fn evict_batch<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        want: u64,
        keep: &FastSet<PoolSlot>,
    ) -> Result<u64, MirrorError> {
        let victims: Vec<VirtAddr> = {
            let (table, backend) = (&*cx.table, cx.backend);
            let spared = Spared {
                pinned: &self.pinned,
                keep,
                quarantine: &self.quarantine,
                focus: &self.focus_pages,
                refused: &self.refused,
            };
            let slots = self.pool.pick_victims(
                usize::try_from(want).unwrap_or(usize::MAX),
                EVICT_BATCH.max(usize::try_from(want).unwrap_or(usize::MAX)),
                |cands| {
                    let locs: Vec<Option<PteLoc>> =
                        cands.iter().map(|&(_, va)| table.leaf_loc(va)).collect();
                    let present: Vec<PteLoc> = locs.iter().flatten().copied().collect();
                    let mut old = Vec::with_capacity(present.len());
                    // An unreadable bit reads as "not young": CLOCK is advice.
                    let ok = present.is_empty()
                        || backend.clear_pte_bits(&present, ACCESSED, &mut old).is_ok();
                    let mut bits = old.iter();
                    locs.iter()
                        .map(|l| ok && l.is_some() && bits.next().is_some_and(|p| p.accessed()))
                        .collect()
                },
                |slot, owner| spared.contains(slot, owner),
            );
            slots.iter().filter_map(|&s| self.pool.owner(s)).collect()
        };
        if victims.is_empty() {
            return Ok(0);
        }
        let n = zap_pages(cx, self, &victims)?;
        Counters::add(&cx.counters.evictions, n);
        Ok(n)
    }
}
