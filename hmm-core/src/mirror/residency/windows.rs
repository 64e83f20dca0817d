//! Zero-copy mode: a mirrored page is the CPU's own page, seen by the
//! device through a *host window* (an import: `VK_EXT_external_memory_host`
//! on a GPU, `CpuDevice::zero_copy` in the reference driver).
//!
//! - **Regions are window-sized:** the CPU mapping clipped to the
//!   window-sized aligned block around the fault and to the neighbouring
//!   regions — not the aligned power-of-two chunk copy mode uses, which
//!   would cut an unaligned buffer into many regions, each costing a window.
//! - **Install** binds the region's whole range to a free window the first
//!   time the region faults, then writes leaf entries naming that window's
//!   pages. No copy, no twin, no write-protection re-arming; read faults map
//!   writable wherever the CPU page is.
//! - **Windows are few** (each is a shader binding on a GPU: at most 29 on
//!   lavapipe, 8 by default). When all are bound, the one least recently
//!   used by an *earlier* fault-service round is evicted whole. A round
//!   never evicts its own windows and binds at most half of them (the rest
//!   fault again on replay), and faults are served lowest invocation first:
//!   serving in address order livelocked a saxpy (`x` and `y` evicted each
//!   other every round), and without the half budget a round of many small
//!   regions bound every window and the next round had to evict the windows
//!   its own replays needed.
//! - **Invalidations:** CPU writes need none. Protection, coherence and
//!   clear events zap entries and keep the window. Destructive events zap
//!   the whole region's entries and *detach* its window without waiting; a
//!   detached window is unbound by the next flush, after its entries are
//!   confirmed cleared, so an import never outlives the device's last use
//!   of it. A remove detaches too: a GPU driver's import pins the old pages,
//!   which the CPU no longer has. A window whose unbind fails stays
//!   detached and unusable until a later flush unbinds it.
//! - **No write-back, no pool, no pinning** (pinning copies).
//!
//! The contract moves to the user: a device that dereferences host pointers
//! itself faults the process if a kernel touches memory another thread
//! unmapped during the launch (userfaultfd reports an unmap only after it
//! happened), so zero-copy backends are created through `unsafe`
//! constructors carrying CUDA's `cudaHostRegister` rule.

use std::collections::{BTreeMap, HashMap};

use super::{Install, Residency};
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::cpu::range_fault::PageState;
use crate::mirror::backend::{self, Backend, BackendError, InvocationSet};
use crate::mirror::config::MirrorConfig;
use crate::mirror::error::MirrorError;
use crate::mirror::faults::{PageFault, Run};
use crate::mirror::format::Pte;
use crate::mirror::host_side::{HostSide, WriteTracking};
use crate::mirror::state::{flush, mark_dead, region_of, zap, Cx, RegionKey, RegionSlot};
use crate::mirror::stats::Counters;
use crate::notifier::Attempt;

/// One host window.
#[derive(Clone, Copy, Debug, Default)]
struct WindowState {
    /// The region instance the window is bound to, and its range (kept
    /// here: the region may leave the map before it is released, and its
    /// entries must still be found).
    region: Option<(RegionKey, VaRange)>,
    /// Detached from its region, still bound: unbound by the next flush,
    /// when its entries are confirmed cleared and no submission can use it.
    releasing: bool,
    /// The fault-service round that last mapped pages through it.
    round: u64,
}

/// The zero-copy residency.
pub(crate) struct HostWindows {
    hw: backend::HostWindows,
    windows: Vec<WindowState>,
    /// Window bound to each region instance, by region id ([`RegionKey`]:
    /// never by start, which a successor region may share).
    by_region: HashMap<u64, u32>,
    /// Detached windows waiting to be unbound (reserved, so the monitor
    /// thread does not allocate).
    unbind_queue: Vec<u32>,
    /// Fault-service rounds so far (eviction order).
    round: u64,
    /// Windows bound in the current round.
    bound_this_round: u32,
}

impl HostWindows {
    /// The residency for a device offering `hw`.
    pub fn new(hw: backend::HostWindows) -> Result<Self, MirrorError> {
        if hw.count == 0 || !hw.pages.is_power_of_two() {
            return Err(MirrorError::Config(format!(
                "the device offers unusable host windows ({hw:?})"
            )));
        }
        // Slots (`PoolSlot`, a `u32`) name window pages.
        if u64::from(hw.count) * u64::from(hw.pages) > 1 << 32 {
            return Err(MirrorError::Config(format!(
                "the device's host windows ({hw:?}) name more pages than an entry can"
            )));
        }
        Ok(HostWindows {
            hw,
            windows: vec![WindowState::default(); hw.count as usize],
            by_region: HashMap::new(),
            unbind_queue: Vec::with_capacity(hw.count as usize),
            round: 0,
            bound_this_round: 0,
        })
    }

    fn round_full(&self) -> MirrorError {
        MirrorError::PoolExhausted {
            needed: 1,
            capacity: self.hw.count,
        }
    }

    /// Detaches window `w` from its region; the next flush unbinds it.
    fn detach(&mut self, w: u32) {
        if let Some(ws) = self.windows.get_mut(w as usize) {
            if let Some((key, _)) = ws.region.take() {
                self.by_region.remove(&key.id);
            }
            if !ws.releasing {
                ws.releasing = true;
                self.unbind_queue.push(w);
            }
        }
    }

    /// A window to bind for a region (no submission running): a free one,
    /// or the one least recently used by an earlier round, whose region
    /// loses its entries. A round binds at most half the windows.
    fn take_window<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
    ) -> Result<u32, MirrorError> {
        if self.bound_this_round >= (self.hw.count / 2).max(1) {
            return Err(self.round_full());
        }
        self.bound_this_round += 1;
        if let Some(w) = self
            .windows
            .iter()
            .position(|ws| ws.region.is_none() && !ws.releasing)
        {
            return Ok(w as u32);
        }
        let round = self.round;
        let victim = self
            .windows
            .iter()
            .enumerate()
            .filter(|(_, ws)| ws.region.is_some() && ws.round != round)
            .min_by_key(|(_, ws)| ws.round)
            .and_then(|(w, ws)| Some((w as u32, ws.region?.1)));
        let Some((w, range)) = victim else {
            return Err(self.round_full());
        };
        // The owner's entries go first, found by the range kept with the
        // window (its region may already be out of the map, on its way to
        // the release worker).
        zap(cx, self, range, false)?;
        self.detach(w);
        flush(cx, self)?;
        Counters::add(&cx.counters.evictions, 1);
        if self.windows[w as usize].releasing {
            // Its unbind failed: not reusable yet (the flush latched it).
            return Err(self.round_full());
        }
        Ok(w)
    }

    /// The window bound to the region being installed, binding one if it
    /// has none.
    fn window_for<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        key: RegionKey,
        range: VaRange,
    ) -> Result<u32, MirrorError> {
        if let Some(&w) = self.by_region.get(&key.id) {
            return Ok(w);
        }
        let w = self.take_window(cx)?;
        // SAFETY: `w` is free (neither bound nor releasing: `take_window`
        // returns only such a window) and below `hw.count`; the region's
        // range is page-aligned, at most `hw.pages` pages (`choose_region`
        // clips it to one window-sized block) and was part of one readable
        // mapping when the region was chosen, with the fault path's
        // `read_retry` passed since. Entries naming `w` are written only
        // while it is bound; whoever detaches it clears them first
        // (`destructive`, `take_window`, `recycled`, the release path).
        let bound = unsafe {
            cx.backend
                .bind_window(w, range.start().as_mut_ptr().cast(), range.len() as usize)
        };
        if let Err(e) = bound {
            // The import covers the whole region, which may include memory
            // the kernel never touches: if the mapping changed shape since
            // the region was chosen (a neighbour freed, part of it
            // protected), choose again (`RegionReleased`, retried by the
            // caller, bounded); if it is intact, the device cannot import
            // it.
            cx.host.forget_mappings(range);
            let intact = cx
                .host
                .lookup(range.start())
                .ok()
                .flatten()
                .is_some_and(|m| {
                    m.read && m.range.start() <= range.start() && range.end() <= m.range.end()
                });
            if intact {
                return Err(e.into());
            }
            mark_dead(cx, key);
            return Err(MirrorError::RegionReleased {
                addr: range.start(),
            });
        }
        self.windows[w as usize] = WindowState {
            region: Some((key, range)),
            releasing: false,
            round: self.round,
        };
        self.by_region.insert(key.id, w);
        Ok(w)
    }
}

impl<B: Backend, H: HostSide> Residency<B, H> for HostWindows {
    fn writes(&self) -> WriteTracking {
        WriteTracking::Untracked
    }

    fn read_faults_map_writable(&self) -> bool {
        true
    }

    fn pool_slots(&self) -> u32 {
        0
    }

    fn choose_region(
        &self,
        at: VirtAddr,
        mapping: VaRange,
        regions: &BTreeMap<u64, RegionSlot<B, H>>,
        _cfg: &MirrorConfig,
    ) -> Option<VaRange> {
        // As large as a window allows: the mapping clipped to the
        // window-sized aligned block around `at` and to the regions on
        // either side.
        let block = u64::from(self.hw.pages) * PAGE_SIZE;
        let b0 = at.0 & !(block - 1);
        let mut lo = b0.max(mapping.start().0);
        let mut hi = b0.saturating_add(block).min(mapping.end().0);
        if let Some((_, r)) = regions.range(..=at.0).next_back() {
            lo = lo.max(r.range.end().0);
        }
        if let Some((&s, _)) = regions.range(at.0 + 1..).next() {
            hi = hi.min(s);
        }
        if lo <= at.0 && at.0 < hi {
            VaRange::new(VirtAddr(lo), VirtAddr(hi)).ok()
        } else {
            // A (dead) region still covers `at`.
            None
        }
    }

    fn piece_pages(&self, _cfg: &MirrorConfig) -> u64 {
        // No pool: a piece is at most a window (a region).
        u64::from(self.hw.pages).max(1)
    }

    fn begin_round(&mut self) {
        self.round += 1;
        self.bound_this_round = 0;
    }

    fn plan_round(&mut self, pf: &mut Vec<PageFault>, _incomplete: &InvocationSet) {
        // An invocation needs all of its regions at once (a replay restarts
        // it): serve the lowest invocations first, with at most half the
        // windows' worth of window-sized blocks per round; the next round
        // finds the other half free for those invocations' next regions.
        // (Each page carries the lowest invocation that faulted on it, so
        // the blocks are met in the order of their lowest invocation.)
        let block = u64::from(self.hw.pages) * PAGE_SIZE;
        let cap = (self.hw.count as usize / 2).max(1);
        pf.sort_by_key(|f| f.invocation);
        let mut blocks: Vec<u64> = Vec::with_capacity(cap);
        pf.retain(|f| {
            let b = f.page.0 / block;
            if blocks.contains(&b) {
                return true;
            }
            if blocks.len() < cap {
                blocks.push(b);
                return true;
            }
            false
        });
        pf.sort_unstable_by_key(|f| f.page);
    }

    fn order_runs(&self, runs: &mut [Run], batch: &[PageFault]) {
        // The runs of the lowest invocations first (not the lowest
        // addresses), so the regions one invocation needs next are bound
        // before the round's window budget goes to invocations that cannot
        // complete this round.
        runs.sort_by_cached_key(|r| {
            batch
                .iter()
                .filter(|f| r.range.contains(f.page))
                .map(|f| f.invocation)
                .min()
                .unwrap_or(u32::MAX)
        });
    }

    fn install(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        req: Install<'_>,
    ) -> Result<Attempt<u64>, MirrorError> {
        let w = self.window_for(cx, req.key, req.region)?;
        self.windows[w as usize].round = self.round;
        let mut writes = Vec::with_capacity(req.todo.len());
        let mut failed = None;
        for (va, writable) in req.todo {
            let page = ((va.0 - req.region.start().0) / PAGE_SIZE) as u32;
            if let Err(e) = cx.table.map(
                *va,
                Pte::leaf(self.hw.slot(w, page), *writable),
                &mut writes,
            ) {
                failed = Some(MirrorError::from(e));
                break;
            }
        }
        let wrote = Counters::timed(&cx.counters.page_table_ns, || {
            cx.backend.write_ptes(&writes)
        });
        match wrote {
            Ok(()) if !writes.is_empty() => cx.health.succeeded(),
            Ok(()) => {}
            Err(e) => {
                Counters::add(&cx.counters.device_errors, 1);
                failed.get_or_insert(e.into());
            }
        }
        if let Some(e) = failed {
            // Leave nothing half-installed (nothing ran on these entries;
            // their clears are queued, the device may hold part of them).
            for (va, _) in req.todo {
                if let Ok(page) = VaRange::from_start_len(*va, PAGE_SIZE) {
                    let _ = zap(cx, self, page, false);
                }
            }
            return Err(e);
        }
        Counters::add(&cx.counters.pages_in, req.todo.len() as u64);
        Ok(Attempt::Done(req.todo.len() as u64))
    }

    fn write_back(
        &mut self,
        _cx: &mut Cx<'_, B, H>,
        _pages: &[(VirtAddr, Pte)],
    ) -> Result<u64, MirrorError> {
        // The device wrote the CPU's own pages.
        Ok(0)
    }

    fn retire(&mut self, _removed: &[(VirtAddr, Pte)]) {
        // Window pages, not pool slots: nothing to free (the window stays
        // bound to its region until the region goes).
    }

    fn entries_cleared(&mut self, backend: &B) -> Result<bool, BackendError> {
        // Entries naming a detached window are confirmed gone: no later
        // submission can reach it. A window whose unbind fails stays
        // queued (and `releasing`, so nothing binds it).
        let called = !self.unbind_queue.is_empty();
        while let Some(&w) = self.unbind_queue.last() {
            backend.unbind_window(w)?;
            self.unbind_queue.pop();
            if let Some(ws) = self.windows.get_mut(w as usize) {
                ws.releasing = false;
            }
        }
        Ok(called)
    }

    fn destructive(
        &mut self,
        regions: &BTreeMap<u64, RegionSlot<B, H>>,
        key: RegionKey,
        hit: VaRange,
    ) -> VaRange {
        // The whole region loses its entries and its window is detached;
        // the next fault binds a fresh window to whatever memory is there.
        // (An instance that left the map already lost its entries, except
        // those of a window it still holds, found by the window's range.)
        let mut range = region_of(regions, key).map_or(hit, |r| r.range);
        if let Some(&w) = self.by_region.get(&key.id) {
            if let Some((_, r)) = self.windows[w as usize].region {
                range = r;
            }
            self.detach(w);
        }
        range
    }

    fn recycled(&mut self, cx: &mut Cx<'_, B, H>, key: RegionKey) -> Result<(), MirrorError> {
        // The memory behind the window may not be what was imported — a
        // GPU driver's import pins the pages it saw. Drop the whole
        // region's entries and its window (the device is idle here).
        let Some(&w) = self.by_region.get(&key.id) else {
            return Ok(());
        };
        if let Some((_, range)) = self.windows[w as usize].region {
            zap(cx, self, range, false)?;
        }
        self.detach(w);
        flush(cx, self)
    }

    fn region_released(&mut self, key: RegionKey) {
        if let Some(&w) = self.by_region.get(&key.id) {
            self.detach(w);
        }
    }

    fn check_pin(&self) -> Result<(), MirrorError> {
        Err(MirrorError::Unsupported(
            "pinning copies pages into a device pool, and a zero-copy device has none \
             (pin on a copy-mode device to compare)",
        ))
    }

    fn pin(
        &mut self,
        _cx: &mut Cx<'_, B, H>,
        _range: VaRange,
        _states: &[PageState],
        _writable: bool,
    ) -> Result<(), MirrorError> {
        <Self as Residency<B, H>>::check_pin(self)
    }

    fn usage(&self) -> (u64, u64) {
        (0, 0)
    }

    fn teardown(&mut self) {
        for w in 0..self.windows.len() as u32 {
            if self.windows[w as usize].region.is_some() {
                self.detach(w);
            }
        }
    }
}
