//! [`Mirror`]: one device's view of a process address space.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::backend::{
    Backend, DeviceConfig, DeviceToHost, HostToDevice, HostWindows, Invocations, PteLoc, PteWrite,
    SubmissionId,
};
use super::error::{AccessError, MirrorError};
use super::faults::{self, PageFault, Run};
use super::format::{PoolSlot, Pte, ACCESSED, DIRTY};
use super::hostcopy;
use super::pagetable::ShadowTable;
use super::pool::PagePool;
use super::stats::{Counters, MirrorStats};
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::cpu::chunk::{choose_chunk, DEFAULT_CHUNK_SIZES};
use crate::cpu::host::HostSpace;
use crate::cpu::mirror_fault::{fault_and_commit, FaultLoopStats, MirrorFaultError};
use crate::cpu::range_fault::{FaultFlags, PageState};
use crate::notifier::{
    Attempt, EventKind, Interval, IntervalNotifier, NotifierHandle, NotifierRange, OwnerTag, Seq,
    SpaceNotifier, Subscription,
};
use crate::sync::Arc;

const PAGE: usize = PAGE_SIZE as usize;

/// Pages moved per copy batch. Staging buffers are allocated once at this
/// size and never grow: invalidation callbacks must not free heap memory
/// other threads allocated (see `twins`), and a buffer that never grows is
/// never reallocated.
const STAGE_PAGES: usize = 512;

/// How a mirror is sized and behaves.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// Device pool size in 4 KiB slots (default 65536 = 256 MiB).
    pub pool_slots: u32,
    /// Device page-table budget in 4 KiB table pages (default 4096).
    pub table_pages: u32,
    /// Region sizes tried on a device fault, largest first (default
    /// 2 MiB, 64 KiB, 4 KiB).
    pub chunk_sizes: Vec<u64>,
    /// Faults serviced per batch (default 256, UVM's).
    pub fault_batch: usize,
    /// Replays of one launch before giving up (default 1000).
    pub max_replays: u32,
    /// Bound on one run's fault-retry loop (default 1 s).
    pub retry_timeout: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            pool_slots: 65536,
            table_pages: 4096,
            chunk_sizes: DEFAULT_CHUNK_SIZES.to_vec(),
            fault_batch: 256,
            max_replays: 1000,
            retry_timeout: Duration::from_secs(1),
        }
    }
}

/// What one launch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchReport {
    /// Device submissions (1 + replays).
    pub submissions: u32,
    /// Valid faults serviced.
    pub faults: u64,
    /// Pages copied in while servicing them (a zero-copy device: pages
    /// mapped, nothing copied).
    pub pages_in: u64,
    /// Dirty pages written back at the end.
    pub pages_out: u64,
    /// CPU-written pages invalidated at the start (sync point).
    pub cpu_written_pages: u64,
}

/// Advice on how a range is used ([`Mirror::advise`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Mostly read, by several devices: read faults map read-only copies on
    /// every mirror that wants one; a write collapses them.
    ReadMostly,
    /// Forget earlier advice for the range.
    Default,
}

struct RegionSlot<B: Backend> {
    range: VaRange,
    sub: Option<Subscription<Region<B>>>,
    dead: bool,
    /// The region has taken a write fault: its read faults map writable
    /// pages writable (saving upgrade faults); until then they map
    /// read-only, which needs no twin.
    written: bool,
    /// Zero-copy devices: the host window bound to the region's range.
    window: Option<u32>,
    /// `HostSpace::watch` (or `watch_untracked`) succeeded for the range:
    /// only then is there a watch of ours to end.
    watched: bool,
}

/// One host window of a zero-copy device (see "Zero-copy devices" in the
/// module docs of `mirror`).
#[derive(Clone, Copy, Debug, Default)]
struct WindowState {
    /// The region (by start) the window is bound to.
    region: Option<u64>,
    /// Detached from its region, still bound: unbound by the next
    /// [`Inner::flush_deferred`], when no submission can use it.
    releasing: bool,
    /// The fault-service round that last mapped pages through it. Eviction
    /// takes the oldest, never one of the current round (which would make
    /// a round evict its own windows: a livelock).
    round: u64,
}

/// Pages mapped by [`Mirror::pin`].
struct PinnedRange {
    range: VaRange,
    locked: bool,
}

/// Everything the driver lock guards.
struct Dev<B: Backend> {
    table: ShadowTable,
    pool: PagePool,
    /// This mirror's regions, by start; they never overlap.
    regions: BTreeMap<u64, RegionSlot<B>>,
    pinned: BTreeMap<u64, PinnedRange>,
    pinned_slots: HashSet<PoolSlot>,
    read_mostly: Vec<VaRange>,
    /// The device submission running now, if any (launches are serialised).
    inflight: Option<SubmissionId>,
    /// Entry updates of destructive invalidations ([`Inner::apply_zap`]),
    /// written before the next submission or slot allocation.
    deferred_ptes: Vec<PteWrite>,
    staging: Vec<u8>,
    ok: Vec<bool>,
    /// For every slot mapped writable: the page as the device got it (or
    /// as last written back). Write-back stores only the bytes the device
    /// changed relative to it (the twin/diff technique of software DSM,
    /// e.g. TreadMarks), so CPU writes to other bytes of the same page made
    /// during a launch are never overwritten with stale data.
    twins: super::twins::Twins,
    /// Scratch for write-back verification (preallocated, never grows).
    verify: Vec<u8>,
    /// Zero-copy devices: the state of every host window.
    windows: Vec<WindowState>,
    /// Windows detached by a destructive invalidation, unbound at the next
    /// flush point (reserved, so the monitor thread does not allocate).
    unbind_queue: Vec<u32>,
    /// Fault-service rounds so far (window eviction order).
    round: u64,
    /// Windows bound in the current round (at most half of them per
    /// round; see `Inner::take_window`).
    bound_this_round: u32,
}

pub(crate) struct Inner<B: Backend> {
    backend: B,
    /// `Some` for a zero-copy device ([`Backend::host_windows`]).
    zc: Option<HostWindows>,
    host: Arc<HostSpace>,
    owner: OwnerTag,
    cfg: MirrorConfig,
    /// The driver lock (see the module docs of `mirror`).
    dev: Mutex<Dev<B>>,
    /// Destructive invalidations that found the driver lock held
    /// ([`Inner::apply_zap`]); a leaf lock, never held across anything.
    pending: Mutex<Vec<PendingZap>>,
    launch: Mutex<()>,
    counters: Counters,
    release_tx: Sender<ReleaseMsg>,
}

/// A destructive invalidation waiting for the driver lock.
struct PendingZap {
    range: VaRange,
    region_start: u64,
    /// Unmap or remap: the region dies.
    dead: bool,
}

enum ReleaseMsg {
    Region(u64),
    Shutdown,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static NEXT_OWNER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The interval-notifier callbacks of one region.
pub(crate) struct Region<B: Backend> {
    owner: Weak<Inner<B>>,
    start: u64,
}

fn event_index(e: EventKind) -> usize {
    match e {
        EventKind::Unmap => 0,
        EventKind::Remove => 1,
        EventKind::Remap => 2,
        EventKind::Protection => 3,
        EventKind::CpuWrite => 4,
        EventKind::Coherence => 5,
        EventKind::Release => 6,
        EventKind::Clear => 7,
    }
}

impl<B: Backend> IntervalNotifier for Region<B> {
    fn invalidate(&self, interval: &Interval, nr: &NotifierRange, cur_seq: Seq) -> bool {
        let Some(inner) = self.owner.upgrade() else {
            // The mirror is gone; nothing of it is on any device.
            interval.set_seq(cur_seq);
            return true;
        };
        // Our own coherence invalidations (another region's upgrade) must
        // not make our own fault retry forever.
        if nr.owner == Some(inner.owner) && nr.event == EventKind::Coherence {
            return true;
        }
        // A zero-copy device reads the CPU's own pages: a CPU write leaves
        // nothing stale to drop.
        if inner.zc.is_some() && nr.event == EventKind::CpuWrite {
            interval.set_seq(cur_seq);
            Counters::add(&inner.counters.invalidations[event_index(nr.event)], 1);
            return true;
        }
        // Destructive events (unmap, remap, remove) never wait — not for
        // the device, not even for the driver lock; see `Inner::apply_zap`.
        if matches!(
            nr.event,
            EventKind::Unmap | EventKind::Remap | EventKind::Remove
        ) {
            interval.set_seq(cur_seq);
            Counters::add(&inner.counters.invalidations[event_index(nr.event)], 1);
            if let Some(range) = nr.range.intersect(interval.range()) {
                let z = PendingZap {
                    range,
                    region_start: self.start,
                    dead: matches!(nr.event, EventKind::Unmap | EventKind::Remap),
                };
                match inner.dev.try_lock() {
                    Ok(mut dev) => inner.apply_zap(&mut dev, z),
                    Err(std::sync::TryLockError::Poisoned(p)) => {
                        inner.apply_zap(&mut p.into_inner(), z)
                    }
                    // The holder (or the next one) applies it before doing
                    // anything else with the table: every acquisition of
                    // the driver lock drains the queue (`Inner::lock`).
                    Err(std::sync::TryLockError::WouldBlock) => relock(&inner.pending).push(z),
                }
            }
            return true;
        }
        let mut dev = if nr.blockable {
            inner.lock()
        } else {
            match inner.dev.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return false,
            }
        };
        inner.drain_pending(&mut dev);
        // Device work that may hold translations must finish first. The
        // wait happens without the driver lock: a destructive invalidation
        // may need it meanwhile (see `Inner::apply_zap`).
        while let Some(s) = dev.inflight.filter(|s| !inner.backend.is_complete(*s)) {
            if !nr.blockable {
                return false;
            }
            drop(dev);
            let waited = inner.backend.wait(s, None);
            dev = inner.lock();
            if waited.is_err() {
                // A lost device runs nothing any more.
                break;
            }
        }
        inner.flush_deferred(&mut dev);
        interval.set_seq(cur_seq);
        Counters::add(&inner.counters.invalidations[event_index(nr.event)], 1);
        let Some(r) = nr.range.intersect(interval.range()) else {
            return true;
        };
        inner.zap(&mut dev, r, true);
        if inner.zc.is_some() && matches!(nr.event, EventKind::Clear | EventKind::Release) {
            // "The range was recycled" (an application's explicit `Clear`,
            // or the monitor's when it lost track of events): the memory
            // behind the window may not be what was imported — a GPU
            // driver's import pins the pages it saw. Drop the whole
            // region's entries and its window (the device is idle here);
            // the next fault binds whatever is there now.
            let region = dev
                .regions
                .get_mut(&self.start)
                .map(|s| (s.range, s.window.take()));
            if let Some((range, Some(w))) = region {
                inner.zap(&mut dev, range, false);
                Inner::detach_window(&mut dev, w);
                inner.flush_deferred(&mut dev);
            }
        }
        true
    }
}

/// Accessed bits for the whole-space notifier's `clear_young`/`test_young`.
struct Young<B: Backend>(Weak<Inner<B>>);

impl<B: Backend> SpaceNotifier for Young<B> {
    fn clear_young(&self, range: VaRange) -> bool {
        self.0.upgrade().is_some_and(|i| i.young(range, true))
    }
    fn test_young(&self, range: VaRange) -> bool {
        self.0.upgrade().is_some_and(|i| i.young(range, false))
    }
}

impl<B: Backend> Inner<B> {
    /// Marks the region starting at `start` dead and hands it to the
    /// deferred-release worker (once).
    fn mark_dead(&self, dev: &mut Dev<B>, start: u64) {
        if let Some(slot) = dev.regions.get_mut(&start) {
            if !slot.dead {
                slot.dead = true;
                let _ = self.release_tx.send(ReleaseMsg::Region(start));
            }
        }
    }

    /// The driver lock, with every queued destructive invalidation applied
    /// ([`Inner::apply_zap`]). Every acquisition goes through here.
    fn lock(&self) -> MutexGuard<'_, Dev<B>> {
        let mut dev = relock(&self.dev);
        self.drain_pending(&mut dev);
        dev
    }

    /// Applies the destructive invalidations queued while the driver lock
    /// was held elsewhere.
    fn drain_pending(&self, dev: &mut Dev<B>) {
        let mut q = relock(&self.pending);
        for z in q.drain(..) {
            self.apply_zap(dev, z);
        }
    }

    /// A destructive invalidation (unmap, remap, remove) of `z.range`
    /// (driver lock held). It never calls the backend and never waits: the
    /// shadow table forgets the pages and their slots are freed now; the
    /// device's entries are cleared by [`Inner::flush_deferred`] before the
    /// next submission and before any slot is allocated again; an unmapped
    /// region goes to the release worker, which writes the rest of it back
    /// once the device is idle (the kernel merges neighbouring mappings
    /// into one VMA, so only part of a region may be gone).
    ///
    /// Why not wait, as every other invalidation does: these events come
    /// from the monitor thread, the only reader of the userfaultfd, and a
    /// device whose work runs on this process's own threads (lavapipe, the
    /// cpu driver) may itself `munmap` or `madvise` memory a region happens
    /// to cover — the kernel merges neighbouring anonymous mappings, so a
    /// 64 KiB or 2 MiB region can span a driver's private pages (lavapipe's
    /// LLVM JIT maps and unmaps single pages while it runs a submission).
    /// That thread then sleeps until the monitor reads its event; a monitor
    /// waiting for that submission — or for the driver lock, held by a
    /// thread waiting for a staging copy or an A/D-bit pass queued behind
    /// it — never reads it: a deadlock (seen in `anon_teardown` on
    /// lavapipe, copy and staging configurations). Waiting would buy
    /// nothing either: the kernel does not wait for us (an unmap has
    /// already happened, a remove proceeds once the event is read), and
    /// the data is discarded, not written back.
    ///
    /// What keeps this safe: a running submission may still reach the old
    /// slots through the not-yet-cleared entries, and nothing reuses them
    /// before it finishes — slots are allocated only by fault service,
    /// prefetch and pinning, which run under the launch lock after the
    /// running submission was waited for, and flush first. A commit that
    /// passed its `read_retry` before the sequence advanced may still map
    /// pages of the range; the zap queued behind it removes them before the
    /// table is used again (every lock acquisition drains the queue).
    fn apply_zap(&self, dev: &mut Dev<B>, z: PendingZap) {
        if self.zc.is_some() {
            self.apply_zap_windowed(dev, z);
            return;
        }
        let mut removed = Vec::new();
        let Dev {
            table,
            deferred_ptes,
            ..
        } = &mut *dev;
        table.unmap_range(z.range, deferred_ptes, &mut removed);
        for (_, pte) in removed {
            dev.twins.remove(pte.slot());
            if !dev.pinned_slots.contains(&pte.slot()) {
                dev.pool.free(pte.slot());
            }
        }
        if z.dead {
            self.mark_dead(dev, z.region_start);
        }
    }

    /// [`Inner::apply_zap`] on a zero-copy device: the whole region loses
    /// its entries and its window is detached, to be unbound (releasing
    /// the import, or the pages a GPU driver pinned for it) at the next
    /// flush point; the next fault binds a fresh window to whatever memory
    /// is there then. Also for a remove (`MADV_DONTNEED`), which keeps the
    /// mapping: a GPU driver's import pins the old pages, which the CPU no
    /// longer has.
    fn apply_zap_windowed(&self, dev: &mut Dev<B>, z: PendingZap) {
        let (range, window) = match dev.regions.get_mut(&z.region_start) {
            Some(r) => (r.range, r.window.take()),
            None => (z.range, None),
        };
        let mut removed = Vec::new();
        let Dev {
            table,
            deferred_ptes,
            ..
        } = &mut *dev;
        table.unmap_range(range, deferred_ptes, &mut removed);
        if let Some(w) = window {
            Self::detach_window(dev, w);
        }
        if z.dead {
            self.mark_dead(dev, z.region_start);
        }
    }

    /// Ends this mirror's watch of a region's `range` (tracked or not, as
    /// it was made).
    fn unwatch(&self, range: VaRange) -> Result<(), crate::cpu::host::HostError> {
        if self.zc.is_some() {
            self.host.unwatch_untracked(range)
        } else {
            self.host.unwatch(range)
        }
    }

    /// Detaches window `w` from its region; [`Inner::flush_deferred`]
    /// unbinds it.
    fn detach_window(dev: &mut Dev<B>, w: u32) {
        if let Some(ws) = dev.windows.get_mut(w as usize) {
            ws.region = None;
            if !ws.releasing {
                ws.releasing = true;
                dev.unbind_queue.push(w);
            }
        }
    }

    /// A window to bind for a region (zero-copy devices; driver lock held,
    /// no submission running): a free one, or the one least recently used
    /// by an earlier fault-service round, whose region loses its entries.
    ///
    /// A round binds at most half the windows (`PoolExhausted` then ends
    /// it; the rest fault again on replay): the windows the previous round
    /// bound — those its faulted invocations are about to use again when
    /// they fault on their next region — are then older than anything
    /// this round must evict only if nothing else is left. Without the cap
    /// a round of many small regions (`hmm-stress --zero-copy`, whose
    /// remapper splits its arena into many mappings) bound every window
    /// and the next round had to evict the windows its own replays needed.
    fn take_window(&self, dev: &mut Dev<B>, hw: HostWindows) -> Result<u32, MirrorError> {
        if dev.bound_this_round >= (hw.count / 2).max(1) {
            return Err(MirrorError::PoolExhausted {
                needed: 1,
                capacity: hw.count,
            });
        }
        dev.bound_this_round += 1;
        if let Some(w) = dev
            .windows
            .iter()
            .position(|ws| ws.region.is_none() && !ws.releasing)
        {
            return Ok(w as u32);
        }
        let round = dev.round;
        let victim = dev
            .windows
            .iter()
            .enumerate()
            .filter(|(_, ws)| ws.region.is_some() && ws.round != round)
            .min_by_key(|(_, ws)| ws.round)
            .map(|(w, ws)| (w as u32, ws.region));
        let Some((w, Some(start))) = victim else {
            return Err(MirrorError::PoolExhausted {
                needed: 1,
                capacity: hw.count,
            });
        };
        match dev.regions.get_mut(&start) {
            Some(r) => {
                r.window = None;
                let range = r.range;
                self.zap(dev, range, false);
            }
            // A released region detached its window first
            // (`release_slot`): none can own a bound window.
            None => debug_assert!(false, "window {w} bound to a released region"),
        }
        Self::detach_window(dev, w);
        self.flush_deferred(dev);
        Counters::add(&self.counters.evictions, 1);
        Ok(w)
    }

    /// The driver lock, with no submission of this mirror running and the
    /// held-back entry updates written: waits for a running submission
    /// without holding the lock (a destructive invalidation may need it
    /// meanwhile, see [`Inner::apply_zap`]).
    fn lock_idle(&self) -> MutexGuard<'_, Dev<B>> {
        loop {
            let mut dev = self.lock();
            match dev.inflight.filter(|s| !self.backend.is_complete(*s)) {
                Some(s) => {
                    drop(dev);
                    if self.backend.wait(s, None).is_err() {
                        // A lost device runs nothing any more.
                        let mut dev = self.lock();
                        self.flush_deferred(&mut dev);
                        return dev;
                    }
                }
                None => {
                    self.flush_deferred(&mut dev);
                    return dev;
                }
            }
        }
    }

    /// Writes the entry updates [`Inner::apply_zap`] held back (driver lock
    /// held, no submission of this mirror running).
    fn flush_deferred(&self, dev: &mut Dev<B>) {
        if !dev.deferred_ptes.is_empty() {
            let _ = self.backend.write_ptes(&dev.deferred_ptes);
            dev.deferred_ptes.clear();
        }
        // Entries naming a detached window are gone (above, or written when
        // it was detached): no later submission can reach it.
        while let Some(w) = dev.unbind_queue.pop() {
            let _ = self.backend.unbind_window(w);
            if let Some(ws) = dev.windows.get_mut(w as usize) {
                ws.releasing = false;
            }
        }
    }

    /// Zaps every mapped page of `r` (driver lock held, device idle for
    /// those pages): writes dirty pages back first if `writeback`, then
    /// clears the entries and frees the slots.
    fn zap(&self, dev: &mut Dev<B>, r: VaRange, writeback: bool) {
        let mapped: Vec<(VirtAddr, Pte)> = dev.table.mapped_in(r).collect();
        if mapped.is_empty() {
            return;
        }
        if writeback {
            self.write_back(dev, &mapped);
        }
        let mut writes = Vec::new();
        let mut removed = Vec::new();
        dev.table.unmap_range(r, &mut writes, &mut removed);
        let _ = self.backend.write_ptes(&writes);
        if self.zc.is_some() {
            // Window pages, not pool slots: nothing to free (the window
            // stays bound to its region until the region goes).
            return;
        }
        for (_, pte) in removed {
            dev.twins.remove(pte.slot());
            if !dev.pinned_slots.contains(&pte.slot()) {
                dev.pool.free(pte.slot());
            }
        }
    }

    /// Copies the device-dirty pages among `pages` back to the CPU and
    /// clears their DIRTY bits. Driver lock held.
    ///
    /// Every such write-back runs under the driver lock with the region's
    /// entries still present, so no invalidation callback for those pages
    /// has run yet (callbacks zap under this lock first); the copy uses
    /// `process_vm_writev`, so a page the kernel already unmapped (an
    /// `UNMAP` event not yet read) is skipped, not written.
    fn write_back(&self, dev: &mut Dev<B>, pages: &[(VirtAddr, Pte)]) -> u64 {
        if self.zc.is_some() {
            // The device wrote the CPU's own pages.
            return 0;
        }
        pages
            .chunks(STAGE_PAGES)
            .map(|c| self.write_back_chunk(dev, c))
            .sum()
    }

    /// [`Inner::write_back`] for at most `STAGE_PAGES` pages.
    fn write_back_chunk(&self, dev: &mut Dev<B>, pages: &[(VirtAddr, Pte)]) -> u64 {
        let cand: Vec<(VirtAddr, PteLoc)> = pages
            .iter()
            .filter(|(_, p)| p.writable())
            .filter_map(|(va, _)| dev.table.leaf_loc(*va).map(|l| (*va, l)))
            .collect();
        if cand.is_empty() {
            return 0;
        }
        let locs: Vec<PteLoc> = cand.iter().map(|c| c.1).collect();
        // Read DIRTY, copy, and only then clear it: a failed copy must not
        // leave the pages marked clean. (The device is idle here, so no
        // write can land between the copy and the clear.)
        let mut old = Vec::with_capacity(locs.len());
        if self.backend.read_ptes(&locs, &mut old).is_err() {
            return 0;
        }
        let dirty_locs: Vec<PteLoc> = cand
            .iter()
            .zip(&old)
            .filter(|(_, p)| p.dirty())
            .map(|(c, _)| c.1)
            .collect();
        let dirty: Vec<(VirtAddr, PoolSlot)> = cand
            .iter()
            .zip(&old)
            .filter(|(_, p)| p.dirty())
            .map(|((va, _), p)| (*va, p.slot()))
            .collect();
        if dirty.is_empty() {
            return 0;
        }
        let Dev {
            staging,
            twins,
            verify,
            ..
        } = dev;
        // A host-addressable pool is read in place; otherwise the pages
        // come out through the staging buffer.
        let direct: Option<Vec<*const u8>> = dirty
            .iter()
            .map(|(_, s)| self.backend.host_slot(*s).map(|p| p.as_ptr().cast_const()))
            .collect();
        if direct.is_none() {
            let batch: Vec<DeviceToHost> = dirty
                .iter()
                .enumerate()
                .map(|(i, (_, slot))| DeviceToHost {
                    slot: *slot,
                    dst: staging[i * PAGE..].as_mut_ptr(),
                })
                .collect();
            // SAFETY: each `dst` is a distinct 4 KiB chunk of `staging`,
            // which we hold mutably and which outlives the call; launches
            // are serialised and the device is idle for these slots
            // (callers waited for the in-flight submission or run between
            // submissions).
            if unsafe { self.backend.copy_to_host(&batch) }.is_err() {
                return 0;
            }
        }
        let staging = &*staging;
        let pages: Vec<&[u8]> = match &direct {
            Some(ptrs) => ptrs
                .iter()
                // SAFETY: 4 KiB per slot vouched for by the backend
                // (`host_slot`); the device is idle for these slots (as for
                // `copy_to_host` above), so nothing writes them while these
                // borrows live, which end before this function returns.
                .map(|p| unsafe { std::slice::from_raw_parts(*p, PAGE) })
                .collect(),
            None => staging.chunks_exact(PAGE).take(dirty.len()).collect(),
        };
        let mut cleared = Vec::with_capacity(dirty_locs.len());
        let _ = self
            .backend
            .clear_pte_bits(&dirty_locs, DIRTY, &mut cleared);
        // Only the bytes the device changed go back.
        let mut runs: Vec<(VirtAddr, &[u8])> = Vec::new();
        let mut diff = Vec::new();
        let mut touched: Vec<VirtAddr> = Vec::new();
        for (i, (va, slot)) in dirty.iter().enumerate() {
            let page = pages[i];
            diff.clear();
            match twins.get(*slot) {
                Some(t) => hostcopy::diff_runs(t, page, &mut diff),
                // No twin (pinned pages): the whole page.
                None => diff.push((0, PAGE)),
            }
            if !diff.is_empty() {
                touched.push(*va);
            }
            for (off, len) in &diff {
                runs.push((VirtAddr(va.0 + *off as u64), &page[*off..*off + *len]));
            }
        }
        hostcopy::write_runs(&runs);
        for (i, (_, slot)) in dirty.iter().enumerate() {
            if twins.get(*slot).is_some() {
                twins.set(*slot, pages[i]);
            }
        }
        // Our own write is not a CPU write: re-protect the pages so the next
        // sync point does not drop the copies it just made equal. Protect
        // first, then read the pages back: a CPU write after the protection
        // is reported by the next sync point anyway, and one that landed
        // between our write and the protection (the CPU wrote other bytes of
        // the page during the launch) shows as a difference — those device
        // copies are stale and are dropped right here. (Verifying before
        // protecting, as this code once did, lost a CPU write landing
        // between the two.)
        let mut idx: Vec<usize> = Vec::new();
        for (i, (va, _)) in dirty.iter().enumerate() {
            if touched.contains(va) {
                idx.push(i);
            }
        }
        let check: Vec<VirtAddr> = idx.iter().map(|&i| dirty[i].0).collect();
        let _ = self.host.rearm_after_writeback(&check);
        let mut vok = Vec::new();
        hostcopy::read_pages(&check, verify, &mut vok);
        let stale: Vec<VirtAddr> = idx
            .iter()
            .enumerate()
            .filter(|(k, &i)| !vok[*k] || verify[k * PAGE..(k + 1) * PAGE] != *pages[i])
            .map(|(_, &i)| dirty[i].0)
            .collect();
        for va in stale {
            if let Ok(page) = VaRange::from_start_len(va, PAGE_SIZE) {
                // Already written back: drop without writing again.
                self.zap(dev, page, false);
            }
        }
        let n = check.len() as u64;
        Counters::add(&self.counters.pages_out, n);
        n
    }

    fn young(&self, range: VaRange, clear: bool) -> bool {
        let dev = self.lock();
        let locs: Vec<PteLoc> = dev
            .table
            .mapped_in(range)
            .filter_map(|(va, _)| dev.table.leaf_loc(va))
            .collect();
        if locs.is_empty() {
            return false;
        }
        let mut old = Vec::with_capacity(locs.len());
        let r = if clear {
            self.backend.clear_pte_bits(&locs, ACCESSED, &mut old)
        } else {
            self.backend.read_ptes(&locs, &mut old)
        };
        r.is_ok() && old.iter().any(|p| p.accessed())
    }

    /// Undoes a partial install of `todo` into `slots`: zaps (without
    /// write-back: nothing ran on them) the pages of this attempt that got
    /// mapped, frees the fresh slots that did not, drops their twins.
    /// Pages that were already mapped read-only (upgrades) are zapped too,
    /// which is merely conservative.
    fn undo_install(&self, dev: &mut Dev<B>, todo: &[(VirtAddr, bool)], slots: &[PoolSlot]) {
        for ((va, _), s) in todo.iter().zip(slots) {
            match dev.table.lookup(*va) {
                Some(p) if p.slot() == *s => {
                    if let Ok(page) = VaRange::from_start_len(*va, PAGE_SIZE) {
                        self.zap(dev, page, false);
                    }
                }
                _ => {
                    dev.twins.remove(*s);
                    dev.pool.free(*s);
                }
            }
        }
    }

    /// [`Mirror::commit`]'s second half on a zero-copy device: binds the
    /// region's window if it has none (the import of the region's whole
    /// range), then maps `todo` to the window's pages. No copy, no twin.
    fn commit_windowed(
        &self,
        dev: &mut Dev<B>,
        hw: HostWindows,
        region_start: u64,
        todo: &[(VirtAddr, bool)],
    ) -> Result<Attempt<u64>, MirrorError> {
        let Some(region) = dev.regions.get(&region_start).map(|r| (r.range, r.window)) else {
            return Ok(Attempt::Retry);
        };
        let (range, window) = region;
        let w = match window {
            Some(w) => w,
            None => {
                let w = self.take_window(dev, hw)?;
                // SAFETY: `w` is free (neither bound nor releasing: the
                // flush in `take_window`/`commit` unbound every detached
                // window) and below `hw.count`; the region's range is
                // page-aligned, at most `hw.pages` pages (checked against
                // the chunk sizes in `Mirror::new`) and was part of one
                // readable mapping when the region was chosen, with the
                // fault path's `read_retry` passed since. Entries naming
                // `w` are written below, only while it is bound; whoever
                // detaches it clears them first (`apply_zap_windowed`,
                // `take_window`, `release_slot`).
                let bound = unsafe {
                    self.backend.bind_window(
                        w,
                        range.start().as_mut_ptr().cast(),
                        range.len() as usize,
                    )
                };
                if let Err(e) = bound {
                    // The import covers the whole region, which may include
                    // memory the kernel never touches: if the mapping
                    // changed shape since the region was chosen (a
                    // neighbour freed, part of it protected), choose again
                    // (`RegionReleased`, retried by the caller, bounded);
                    // if it is intact, the device cannot import it.
                    self.host.maps().invalidate(range);
                    let intact = self
                        .host
                        .lookup(range.start())
                        .ok()
                        .flatten()
                        .is_some_and(|m| {
                            m.read
                                && m.range.start() <= range.start()
                                && range.end() <= m.range.end()
                        });
                    if intact {
                        return Err(e.into());
                    }
                    self.mark_dead(dev, region_start);
                    return Err(MirrorError::RegionReleased {
                        addr: range.start(),
                    });
                }
                dev.windows[w as usize] = WindowState {
                    region: Some(region_start),
                    releasing: false,
                    round: dev.round,
                };
                if let Some(r) = dev.regions.get_mut(&region_start) {
                    r.window = Some(w);
                }
                w
            }
        };
        dev.windows[w as usize].round = dev.round;
        let mut writes = Vec::with_capacity(todo.len());
        let mut failed = None;
        for (va, writable) in todo {
            let page = ((va.0 - range.start().0) / PAGE_SIZE) as u32;
            if let Err(e) = dev
                .table
                .map(*va, Pte::leaf(hw.slot(w, page), *writable), &mut writes)
            {
                failed = Some(MirrorError::from(e));
                break;
            }
        }
        if let Err(e) = self.backend.write_ptes(&writes) {
            failed.get_or_insert(e.into());
        }
        if let Some(e) = failed {
            // Leave nothing half-installed (nothing ran on these entries).
            for (va, _) in todo {
                if let Ok(page) = VaRange::from_start_len(*va, PAGE_SIZE) {
                    self.zap(dev, page, false);
                }
            }
            return Err(e);
        }
        Counters::add(&self.counters.pages_in, todo.len() as u64);
        Ok(Attempt::Done(todo.len() as u64))
    }

    /// A free slot for `va`, evicting if the pool is full.
    /// `keep`: slots eviction must not pick (those of the pages being
    /// installed right now).
    fn alloc_slot(
        &self,
        dev: &mut Dev<B>,
        va: VirtAddr,
        keep: &HashSet<PoolSlot>,
    ) -> Result<PoolSlot, MirrorError> {
        if let Some(s) = dev.pool.alloc(va) {
            return Ok(s);
        }
        let Dev {
            pool,
            table,
            pinned_slots,
            ..
        } = &mut *dev;
        let backend = &self.backend;
        let victim = pool.pick_victim(
            |_slot, owner| {
                let Some(loc) = table.leaf_loc(owner) else {
                    return false;
                };
                let mut old = Vec::with_capacity(1);
                backend.clear_pte_bits(&[loc], ACCESSED, &mut old).is_ok()
                    && old.first().is_some_and(|p| p.accessed())
            },
            |slot| pinned_slots.contains(&slot) || keep.contains(&slot),
        );
        let Some(victim) = victim else {
            return Err(MirrorError::PoolExhausted {
                needed: 1,
                capacity: dev.pool.capacity(),
            });
        };
        let Some(owner) = dev.pool.owner(victim) else {
            return Err(MirrorError::PoolExhausted {
                needed: 1,
                capacity: dev.pool.capacity(),
            });
        };
        let page = VaRange::from_start_len(owner, PAGE_SIZE)?;
        self.zap(dev, page, true);
        Counters::add(&self.counters.evictions, 1);
        dev.pool.alloc(va).ok_or(MirrorError::PoolExhausted {
            needed: 1,
            capacity: dev.pool.capacity(),
        })
    }
}

/// One device's mirror of a process address space.
///
/// Created over a [`HostSpace`] and a [`Backend`]; faults register regions
/// on demand, invalidations zap them, a worker thread releases dead ones.
/// Launches on one mirror are serialised.
pub struct Mirror<B: Backend> {
    inner: Arc<Inner<B>>,
    worker: Option<JoinHandle<()>>,
    young: Option<NotifierHandle>,
    /// The process that created the mirror. A forked child inherits the
    /// value but none of the threads (release worker, event monitor, the
    /// backend's own) the mirror needs: it gets
    /// [`MirrorError::WrongProcess`] instead of a hang.
    pid: u32,
}

impl<B: Backend> std::fmt::Debug for Mirror<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("backend", &self.inner.backend.info())
            .finish()
    }
}

impl<B: Backend> Mirror<B> {
    /// A mirror of `host` on `backend`, sized by `cfg`.
    pub fn new(host: Arc<HostSpace>, backend: B, cfg: MirrorConfig) -> Result<Self, MirrorError> {
        if cfg.table_pages == 0 {
            return Err(MirrorError::Config(
                "table_pages must be at least 1 (the root)".into(),
            ));
        }
        if cfg.chunk_sizes.is_empty() || cfg.fault_batch == 0 {
            return Err(MirrorError::Config(
                "chunk_sizes and fault_batch must not be empty/zero".into(),
            ));
        }
        let info = backend.info();
        let zc = backend.host_windows();
        if let Some(hw) = zc {
            if hw.count == 0 || !hw.pages.is_power_of_two() {
                return Err(MirrorError::Config(format!(
                    "the device offers unusable host windows ({hw:?})"
                )));
            }
            // Slots (`PoolSlot`, a `u32`) name window pages.
            let slots = u64::from(hw.count) * u64::from(hw.pages);
            if slots > 1 << 32 {
                return Err(MirrorError::Config(format!(
                    "the device's host windows ({hw:?}) name more pages than an entry can"
                )));
            }
        } else if cfg.pool_slots > info.max_pool_slots {
            return Err(MirrorError::Config(format!(
                "pool of {} slots exceeds the device's {}",
                cfg.pool_slots, info.max_pool_slots
            )));
        }
        // A zero-copy device has no pool: `pool_slots` is ignored.
        let pool_slots = if zc.is_some() { 0 } else { cfg.pool_slots };
        backend.init(DeviceConfig {
            pool_slots,
            table_pages: cfg.table_pages,
        })?;
        let table = ShadowTable::new(cfg.table_pages)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            backend,
            zc,
            host: Arc::clone(&host),
            // Relaxed: a unique-id dispenser; no other memory depends on it.
            owner: OwnerTag(NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            dev: Mutex::new(Dev {
                table,
                pool: PagePool::new(pool_slots),
                regions: BTreeMap::new(),
                pinned: BTreeMap::new(),
                pinned_slots: HashSet::new(),
                read_mostly: Vec::new(),
                inflight: None,
                deferred_ptes: Vec::new(),
                staging: vec![0; STAGE_PAGES * PAGE],
                ok: Vec::with_capacity(STAGE_PAGES),
                twins: super::twins::Twins::new(pool_slots).ok_or_else(|| {
                    MirrorError::Config("cannot reserve address space for twin pages".into())
                })?,
                verify: vec![0; STAGE_PAGES * PAGE],
                windows: vec![WindowState::default(); zc.map_or(0, |hw| hw.count as usize)],
                unbind_queue: Vec::with_capacity(zc.map_or(0, |hw| hw.count as usize)),
                round: 0,
                bound_this_round: 0,
            }),
            // Reserved so the monitor thread does not allocate while it lasts.
            pending: Mutex::new(Vec::with_capacity(64)),
            launch: Mutex::new(()),
            counters: Counters::default(),
            release_tx: tx,
            cfg,
        });
        let weak = Arc::downgrade(&inner);
        let worker = std::thread::Builder::new()
            .name("hmm-release".into())
            .spawn(move || release_worker(weak, rx))
            .map_err(|e| MirrorError::Config(format!("cannot start the release worker: {e}")))?;
        let young = host
            .space()
            .register_notifier(std::sync::Arc::new(Young(Arc::downgrade(&inner))))
            .ok();
        // Count ourselves first, so no other mirror maps writable in the gap
        // between the collapse below and our attach.
        let earlier = host.mirrors_attached();
        host.attach_mirror();
        // A new device must not leave another device's writable copies
        // unseen: collapse them (our own callbacks skip owner-tagged ones).
        if earlier > 0 {
            if let Ok(g) = host.space().invalidate_start(
                NotifierRange::new(VaRange::everything(), EventKind::Coherence)
                    .with_owner(inner.owner),
            ) {
                drop(g);
            }
        }
        Ok(Mirror {
            inner,
            worker: Some(worker),
            young,
            pid: std::process::id(),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// The CPU side this mirror follows.
    pub fn host(&self) -> &Arc<HostSpace> {
        &self.inner.host
    }

    /// `Err(WrongProcess)` in a forked child. Checked before any lock is
    /// taken: a lock another thread held at `fork` stays held in the child.
    fn same_process(&self) -> Result<(), MirrorError> {
        let now = std::process::id();
        if now == self.pid {
            Ok(())
        } else {
            Err(MirrorError::WrongProcess {
                created_in: self.pid,
                used_in: now,
            })
        }
    }

    /// Gives advice for `range`. Ignored in a forked child.
    pub fn advise(&self, range: VaRange, advice: Advice) {
        if self.same_process().is_err() {
            return;
        }
        let mut dev = self.inner.lock();
        dev.read_mostly.retain(|r| !r.overlaps(range));
        if advice == Advice::ReadMostly {
            dev.read_mostly.push(range);
        }
    }

    /// Runs `kernel` over invocations `0..n` with `args`, servicing device
    /// faults and replaying the invocations that faulted until all have
    /// completed. On return the CPU sees every device write.
    ///
    /// Sync points: at the start, CPU writes since the last sync point are
    /// invalidated (device copies of those pages are dropped); at the end,
    /// device-dirty pages are written back.
    ///
    /// `args` are CPU pointers and scalars, e.g. `(x.as_ptr(),
    /// y.as_mut_ptr(), a)` (see [`KernelArgs`](super::args::KernelArgs)).
    pub fn launch(
        &self,
        kernel: &B::Kernel,
        n: u32,
        args: impl super::args::KernelArgs,
    ) -> Result<LaunchReport, MirrorError> {
        args.with_words(|words| self.launch_words(kernel, n, words))
    }

    fn launch_words(
        &self,
        kernel: &B::Kernel,
        n: u32,
        args: &[u64],
    ) -> Result<LaunchReport, MirrorError> {
        self.same_process()?;
        let inner = &*self.inner;
        let _serial = relock(&inner.launch);
        Counters::add(&inner.counters.launches, 1);
        let mut report = LaunchReport {
            cpu_written_pages: inner.host.sync_point()?,
            ..LaunchReport::default()
        };
        let res = self.launch_rounds(kernel, n, args, &mut report);
        // Whatever happened, invocations that completed may have left dirty
        // pages: the CPU must see them (and a later sync point must not
        // mistake them for stale copies).
        report.pages_out = self.write_back_all();
        res.map(|()| report)
    }

    fn launch_rounds(
        &self,
        kernel: &B::Kernel,
        n: u32,
        args: &[u64],
        report: &mut LaunchReport,
    ) -> Result<(), MirrorError> {
        let inner = &*self.inner;
        let mut replay: Vec<u32> = Vec::new();
        let mut first = true;
        let mut replays = 0u32;
        loop {
            let inv = if first {
                Invocations::All(n)
            } else {
                Invocations::Only(&replay)
            };
            let id = {
                let mut dev = inner.lock();
                inner.flush_deferred(&mut dev);
                let id = inner.backend.launch(kernel, inv, args)?;
                dev.inflight = Some(id);
                id
            };
            report.submissions += 1;
            Counters::add(&inner.counters.submissions, 1);
            let waited = inner.backend.wait(id, None);
            // Forget the submission before taking its outcome, so no
            // callback asks the backend about an id whose outcome is gone.
            {
                let mut dev = inner.lock();
                dev.inflight = None;
                inner.flush_deferred(&mut dev);
            }
            let outcome = inner.backend.take_outcome(id);
            waited?;
            let mut outcome = outcome?;
            if outcome.incomplete.is_empty() {
                break;
            }
            if replays >= inner.cfg.max_replays {
                return Err(MirrorError::NoProgress { replays });
            }
            // Replay only invocations that were submitted in this round: a
            // device reporting others (garbage) must not make us run
            // invocations twice or outside 0..n.
            let before = outcome.incomplete.len();
            outcome.incomplete.sort_unstable();
            outcome.incomplete.dedup();
            if first {
                outcome.incomplete.retain(|&i| i < n);
            } else {
                outcome
                    .incomplete
                    .retain(|i| replay.binary_search(i).is_ok());
            }
            let bogus_ids = (before - outcome.incomplete.len()) as u64;
            Counters::add(&inner.counters.garbage_faults, bogus_ids);
            if outcome.incomplete.is_empty() {
                break;
            }
            let mut pf = Vec::new();
            let garbage = faults::validate(&outcome.faults, &mut outcome.incomplete, &mut pf);
            Counters::add(&inner.counters.garbage_faults, garbage);
            if pf.is_empty() {
                return Err(MirrorError::UnusableFaults {
                    incomplete: outcome.incomplete.len(),
                    garbage,
                });
            }
            report.faults += pf.len() as u64;
            Counters::add(&inner.counters.faults, pf.len() as u64);
            report.pages_in += self.service(&mut pf)?;
            replay = outcome.incomplete;
            first = false;
            replays += 1;
            Counters::add(&inner.counters.replays, 1);
        }
        Ok(())
    }

    /// Writes every device-dirty page back (the end-of-launch sync point).
    fn write_back_all(&self) -> u64 {
        let inner = &*self.inner;
        let mut dev = inner.lock();
        let pages: Vec<(VirtAddr, Pte)> = dev
            .table
            .mapped_in(VaRange::everything())
            .filter(|(_, p)| p.writable())
            .collect();
        inner.write_back(&mut dev, &pages)
    }

    /// Services validated faults in batches; returns pages copied in.
    fn service(&self, pf: &mut [PageFault]) -> Result<u64, MirrorError> {
        let mut pages_in = 0;
        let mut pf = pf.to_vec();
        if let Some(hw) = self.inner.zc {
            // Windows are few, and an invocation needs all of its regions
            // at once (a replay restarts it). Serving faults in address
            // order thrashes: a round maps the `x` regions of a saxpy, the
            // next evicts them for `y`, the next for `x` again. So serve
            // the lowest invocations first, with at most half the windows'
            // worth of window-sized blocks per round: the next round then
            // finds the other half free for those invocations' next
            // regions, and evicts (oldest round first) only regions of
            // invocations that have completed by then.
            let block = u64::from(hw.pages) * PAGE_SIZE;
            let cap = (hw.count as usize / 2).max(1);
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
        }
        // One entry per page before batching: many invocations fault on the
        // same page, and a page must be serviced once, not once per batch.
        pf.sort_unstable_by_key(|f| (f.page, !f.write));
        pf.dedup_by(|later, kept| {
            let same = later.page == kept.page;
            if same {
                kept.write |= later.write;
                kept.invocation = kept.invocation.min(later.invocation);
            }
            same
        });
        // Oversubscription: a round that maps more pages than half the
        // evictable pool evicts its own earlier pages (they are not yet
        // accessed, so CLOCK takes them first) and the replay faults on
        // them again — a livelock once the faulting working set exceeds
        // the pool (3x did, every round). Service the lowest pages that
        // fit; the other invocations are in the replay list anyway and
        // fault again next round, so every round completes some.
        let zc = self.inner.zc.is_some();
        let evictable = {
            let mut dev = self.inner.lock();
            dev.round += 1;
            dev.bound_this_round = 0;
            (dev.pool.capacity() as usize).saturating_sub(dev.pinned_slots.len())
        };
        // A zero-copy device has no pool to overflow; its windows are
        // capped below instead.
        if !zc {
            pf.truncate((evictable / 2).max(1));
        }
        // One fresh read of the CPU mappings per fault-service round.
        let epoch = self.inner.host.maps().new_epoch();
        for batch in pf.chunks_mut(self.inner.cfg.fault_batch) {
            Counters::add(&self.inner.counters.fault_batches, 1);
            let mut runs = Vec::new();
            faults::coalesce(batch, &mut runs);
            if zc {
                // Windows: the runs of the lowest invocations first (not
                // the lowest addresses), so the regions one invocation
                // needs next are bound before the round's window budget
                // goes to invocations that cannot complete this round.
                runs.sort_by_cached_key(|r| {
                    batch
                        .iter()
                        .filter(|f| r.range.contains(f.page))
                        .map(|f| f.invocation)
                        .min()
                        .unwrap_or(u32::MAX)
                });
            }
            for run in runs {
                Counters::add(&self.inner.counters.fault_runs, 1);
                match self.service_run(run, epoch) {
                    Ok(n) => pages_in += n,
                    // Every window is in use by this round (the round
                    // mapped pages, or no window would be): the rest fault
                    // again on replay, when older windows can be evicted.
                    Err(MirrorError::PoolExhausted { .. }) if zc && pages_in > 0 => {
                        return Ok(pages_in)
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(pages_in)
    }

    /// Makes `range` resident for read (or write) without a device fault:
    /// the user's way to turn faults into one bulk copy. Returns pages
    /// copied in.
    pub fn prefetch(&self, range: VaRange, write: bool) -> Result<u64, MirrorError> {
        self.same_process()?;
        let range = range.page_cover()?.user()?;
        let _serial = relock(&self.inner.launch);
        {
            let mut dev = self.inner.lock();
            dev.round += 1;
            dev.bound_this_round = 0;
        }
        let epoch = self.inner.host.maps().new_epoch();
        let n = self.service_run(
            Run {
                range,
                write,
                first_addr: range.start(),
            },
            epoch,
        )?;
        Counters::add(&self.inner.counters.prefetched, n);
        Ok(n)
    }

    /// Services one run: splits it at region boundaries (creating regions
    /// for pages no region covers) and runs the fault loop on each piece.
    fn service_run(&self, run: Run, epoch: u64) -> Result<u64, MirrorError> {
        if run.range.end().0 > crate::addr::USER_VA_END {
            // Kernel half (or a wild pointer): nothing can be mapped there.
            return Err(MirrorError::DeviceFault {
                addr: run.first_addr,
                write: run.write,
                reason: AccessError::Unmapped,
            });
        }
        let mut pages_in = 0;
        let mut at = run.range.start();
        let mut released = 0;
        while at < run.range.end() {
            let (region_range, sub_ref) = self.region_for(at, run.write, epoch)?;
            // One commit must fit the pool with room to evict: cap a piece
            // at half the pool (at least one page).
            let cap = match self.inner.zc {
                // No pool: a piece is at most a window (a region).
                Some(hw) => u64::from(hw.pages),
                None => u64::from(self.inner.cfg.pool_slots / 2).min(STAGE_PAGES as u64),
            }
            .max(1)
                * PAGE_SIZE;
            let end = region_range
                .end()
                .min(run.range.end())
                .min(VirtAddr(at.0.saturating_add(cap)));
            let piece = VaRange::new(at, end)?;
            let first = if at == run.range.start() {
                run.first_addr
            } else {
                at
            };
            match self.service_piece(&sub_ref, piece, run.write, first) {
                Ok(n) => {
                    pages_in += n;
                    at = end;
                }
                // Zero-copy: this round may bind no more windows. What the
                // run mapped so far counts; the rest faults again on replay
                // (`Mirror::service` stops the round).
                Err(e @ MirrorError::PoolExhausted { .. })
                    if self.inner.zc.is_some() && pages_in > 0 =>
                {
                    let _ = e;
                    return Ok(pages_in);
                }
                // The region died under us: find (or make) the one that
                // covers `at` now. Bounded, like every retry here.
                Err(MirrorError::RegionReleased { .. }) if released < 8 => released += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(pages_in)
    }

    /// The region containing `at`, registering one (with its interval
    /// notifier and event watch) if none does.
    fn region_for(
        &self,
        at: VirtAddr,
        write: bool,
        epoch: u64,
    ) -> Result<(VaRange, crate::notifier::SubscriptionRef<Region<B>>), MirrorError> {
        let inner = &*self.inner;
        {
            let dev = inner.lock();
            if let Some((_, slot)) = dev.regions.range(..=at.0).next_back() {
                if slot.range.contains(at) && !slot.dead {
                    if let Some(sub) = &slot.sub {
                        return Ok((slot.range, sub.ops_arc()));
                    }
                }
            }
        }
        // A dead region still covering `at` is waiting for the release
        // worker; finish its job here (we are not inside a callback, so the
        // blocking remove is allowed) rather than fail the fault.
        self.reap_dead_at(at);
        // Addresses outside watched ranges produce no events, so a cached
        // mapping there may be stale (unmapped and mapped again by anyone):
        // use a read of the maps taken during this fault-service round.
        let mapping = inner
            .host
            .maps()
            .lookup_in_epoch(at, epoch)
            .map_err(|e| MirrorError::Host(e.into()))?
            .ok_or(MirrorError::DeviceFault {
                addr: at,
                write,
                reason: AccessError::Unmapped,
            })?;
        if !mapping.read {
            return Err(MirrorError::DeviceFault {
                addr: at,
                write,
                reason: AccessError::NoAccess,
            });
        }
        if write && !mapping.write {
            return Err(MirrorError::DeviceFault {
                addr: at,
                write,
                reason: AccessError::ReadOnly,
            });
        }
        let mut dev = inner.lock();
        // Reap dead regions overlapping the mapping lazily: the worker may
        // not have run yet; their notifier is still live, so keep them out
        // of the chunk choice by treating them as present.
        let regions = &dev.regions;
        let chosen = match inner.zc {
            // A zero-copy region costs a window, not a copy per page: make
            // it as large as a window allows — the mapping clipped to the
            // window-sized aligned block around `at` and to the regions on
            // either side — rather than the aligned power-of-two chunk,
            // which splits an unaligned 256 KiB buffer into a dozen
            // regions (and windows).
            Some(hw) => {
                let block = u64::from(hw.pages) * PAGE_SIZE;
                let b0 = at.0 & !(block - 1);
                let mut lo = b0.max(mapping.range.start().0);
                let mut hi = b0.saturating_add(block).min(mapping.range.end().0);
                if let Some((_, r)) = regions.range(..=at.0).next_back() {
                    lo = lo.max(r.range.end().0);
                }
                if let Some((&s, _)) = regions.range(at.0 + 1..).next() {
                    hi = hi.min(s);
                }
                if lo <= at.0 && at.0 < hi {
                    VaRange::new(VirtAddr(lo), VirtAddr(hi)).map_err(|_| ())
                } else {
                    // A (dead) region still covers `at`.
                    Err(())
                }
            }
            None => choose_chunk(at, mapping.range, &inner.cfg.chunk_sizes, |cand| {
                regions
                    .range(..cand.end().0)
                    .next_back()
                    .is_some_and(|(_, r)| r.range.overlaps(cand))
                    || regions.range(cand.start().0..cand.end().0).next().is_some()
            })
            .map_err(|_| ()),
        };
        let range = chosen.map_err(|_| MirrorError::DeviceFault {
            addr: at,
            write,
            reason: AccessError::BadPage,
        })?;
        let sub = inner
            .host
            .space()
            .insert(
                range,
                Region {
                    owner: Arc::downgrade(&self.inner),
                    start: range.start().0,
                },
            )
            .map_err(|_| MirrorError::TornDown)?;
        let sref = sub.ops_arc();
        dev.regions.insert(
            range.start().0,
            RegionSlot {
                range,
                sub: Some(sub),
                dead: false,
                written: false,
                window: None,
                watched: false,
            },
        );
        drop(dev);
        Counters::add(&inner.counters.regions_created, 1);
        // A watch can fail because the memory changed under us: a
        // concurrent munmap + mmap left a hole at the moment of
        // registering. The region has no pages yet, so trying again is
        // sound; giving up at once would leave it mirrored with no events
        // and no write tracking while its memory is ordinary (stale reads
        // found by `hmm-stress`).
        // A zero-copy device reads the CPU's own pages: events only, no
        // write tracking (no write protection to arm, nothing to scan).
        let watch = |r| {
            if inner.zc.is_some() {
                inner.host.watch_untracked(r)
            } else {
                inner.host.watch(r)
            }
        };
        let mut watched = watch(range);
        for _ in 0..3 {
            if watched.is_ok() {
                break;
            }
            inner.host.maps().invalidate(range);
            match inner.host.lookup(at)? {
                Some(m) if m.range.start() <= range.start() && range.end() <= m.range.end() => {
                    std::thread::yield_now();
                    watched = watch(range);
                }
                _ => break,
            }
        }
        if watched.is_ok() {
            if let Some(slot) = inner.lock().regions.get_mut(&range.start().0) {
                slot.watched = true;
            } else {
                // Released meanwhile (its release found no watch to end).
                let _ = inner.unwatch(range);
            }
        }
        if let Err(e) = watched {
            // The mapping may have gone in the meantime (then the fault is
            // an access to unmapped memory), or the kernel may refuse to
            // register this kind of mapping (then it stays mirrored, seen
            // only through explicit invalidation — said once).
            inner.host.maps().invalidate(range);
            let now = inner.host.lookup(at)?;
            let covered = now
                .as_ref()
                .is_some_and(|m| m.range.start() <= range.start() && range.end() <= m.range.end());
            if !covered {
                // Gone (an access to unmapped memory), or reshaped since
                // the region was chosen (choose again: the caller retries
                // on RegionReleased, bounded).
                let mut dev = inner.lock();
                if let Some(slot) = dev.regions.get_mut(&range.start().0) {
                    slot.dead = true;
                }
                drop(dev);
                let _ = inner.release_tx.send(ReleaseMsg::Region(range.start().0));
                return Err(match now {
                    None => MirrorError::DeviceFault {
                        addr: at,
                        write,
                        reason: AccessError::Unmapped,
                    },
                    Some(_) => MirrorError::RegionReleased { addr: at },
                });
            }
            Counters::add(&inner.counters.unwatched_regions, 1);
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("hmm-rs: cannot watch {range:?} for kernel events ({e}); such regions follow explicit invalidation only"));
        }
        Ok((range, sref))
    }

    /// Releases a dead region containing `at`, as the worker would.
    fn reap_dead_at(&self, at: VirtAddr) {
        let inner = &*self.inner;
        let slot = {
            let mut dev = inner.lock();
            let start = dev
                .regions
                .range(..=at.0)
                .next_back()
                .filter(|(_, r)| r.dead && r.range.contains(at))
                .map(|(k, _)| *k);
            start.and_then(|k| dev.regions.remove(&k))
        };
        if let Some(slot) = slot {
            release_slot(inner, slot);
        }
    }

    /// The fault loop for one piece of one region.
    fn service_piece(
        &self,
        sub: &crate::notifier::SubscriptionRef<Region<B>>,
        piece: VaRange,
        write: bool,
        first_addr: VirtAddr,
    ) -> Result<u64, MirrorError> {
        let inner = &*self.inner;
        {
            // Already resident with the access needed (another run of this
            // launch got there first): nothing to do, and no populate —
            // which would count as a CPU write at the next sync point.
            let dev = inner.lock();
            if piece
                .page_addrs()
                .all(|va| dev.table.lookup(va).is_some_and(|p| p.writable() || !write))
            {
                return Ok(0);
            }
        }
        let multi = inner.host.mirrors_attached() > 1;
        let read_mostly = inner.lock().read_mostly.iter().any(|r| r.overlaps(piece));
        if multi && (write || !read_mostly) {
            // Single writer: drop every other device's copy first (ours are
            // skipped by owner tag). They write back dirty data on Coherence.
            if let Ok(g) = inner.host.space().invalidate_start(
                NotifierRange::new(piece, EventKind::Coherence).with_owner(inner.owner),
            ) {
                drop(g);
            }
        }
        let flags = if write {
            FaultFlags::WRITE
        } else {
            FaultFlags::READ
        };
        let mut st = FaultLoopStats::default();
        let copy_failures = std::cell::Cell::new(0u32);
        let res = fault_and_commit(
            inner.host.faulter(),
            sub.interval(),
            piece,
            flags,
            inner.cfg.retry_timeout,
            &mut st,
            |seq, states| {
                self.commit(
                    sub.start,
                    sub.interval(),
                    seq,
                    piece,
                    write,
                    multi,
                    states,
                    &copy_failures,
                )
            },
        );
        Counters::add(&inner.counters.retries, st.busy + st.refused);
        match res {
            Ok(n) => Ok(n),
            Err(MirrorFaultError::Fault(e)) => Err(MirrorError::from_fault(e, first_addr, write)),
            Err(MirrorFaultError::Commit(e)) => Err(e),
            Err(MirrorFaultError::Timeout { attempts, .. }) => Err(MirrorError::RetryTimeout {
                addr: piece.start(),
                attempts,
            }),
            Err(MirrorFaultError::Busy) => Err(MirrorError::RetryTimeout {
                addr: piece.start(),
                attempts: st.attempts,
            }),
        }
    }

    /// Under the driver lock: check the sequence, copy the pages in, map
    /// them. Returns pages copied.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        region_start: u64,
        interval: &Interval,
        seq: Seq,
        piece: VaRange,
        write: bool,
        multi: bool,
        states: &[PageState],
        copy_failures: &std::cell::Cell<u32>,
    ) -> Result<Attempt<u64>, MirrorError> {
        let inner = &*self.inner;
        let mut dev = inner.lock();
        // Entries of zapped pages go before any slot is reused.
        inner.flush_deferred(&mut dev);
        if interval.read_retry(seq) {
            return Ok(Attempt::Retry);
        }
        // A region that died (and may already be released: then no
        // invalidation can reach it and read_retry stays quiet) must not
        // get new entries.
        if dev.regions.get(&region_start).is_none_or(|r| r.dead) {
            return Err(MirrorError::RegionReleased {
                addr: piece.start(),
            });
        }
        let read_mostly = dev.read_mostly.iter().any(|r| r.overlaps(piece));
        // Read faults map writable only in regions that have been written
        // by the device: data a kernel only reads then needs no twin (a
        // 4 KiB copy, and first-touch memory, per page), while a region a
        // kernel writes pays one upgrade fault per page at most once, then
        // maps writable straight away.
        // (A zero-copy device maps the CPU's own pages: no twin either way.)
        let region_written = match dev.regions.get_mut(&region_start) {
            Some(r) => {
                r.written |= write;
                r.written
            }
            None => false,
        } || inner.zc.is_some();
        // Pages to install: not mapped, or mapped read-only but wanted for write.
        let mut todo: Vec<(VirtAddr, bool)> = Vec::new();
        for (va, st) in piece.page_addrs().zip(states) {
            let cpu_writable = match st {
                PageState::Valid { writable } => *writable,
                // Reads as zeros; its mapping may be read-only, and a write
                // fault will upgrade it (with the permission check).
                PageState::Zero => false,
                // After a fault request every page is present or an error
                // was returned; anything else means it vanished: retry.
                _ => return Ok(Attempt::Retry),
            };
            let writable = if write {
                true
            } else {
                cpu_writable && region_written && !read_mostly && !multi
            };
            match dev.table.lookup(va) {
                Some(p) if p.writable() || !writable => {}
                _ => todo.push((va, writable)),
            }
        }
        if todo.is_empty() {
            // Nothing copied, so nothing re-armed: populating for write may
            // have resolved the pages' write protection, and the next sync
            // point then drops their device copies — conservative. Re-arming
            // here would also swallow a real CPU write made since the
            // device copies were taken (found by `hmm-stress`).
            return Ok(Attempt::Done(0));
        }
        if let Some(hw) = inner.zc {
            return inner.commit_windowed(&mut dev, hw, region_start, &todo);
        }
        // Slots (evicting if needed).
        // Slots eviction must leave alone: those of pages being upgraded and
        // those allocated for this run so far.
        let mut keep: HashSet<PoolSlot> = todo
            .iter()
            .filter_map(|(va, _)| dev.table.lookup(*va))
            .map(|p| p.slot())
            .collect();
        let mut slots = Vec::with_capacity(todo.len());
        let mut upgrades = false;
        for (va, _) in &todo {
            match dev.table.lookup(*va) {
                Some(p) => {
                    // read-only → writable upgrade reuses the slot
                    upgrades = true;
                    slots.push(p.slot());
                }
                None => match inner.alloc_slot(&mut dev, *va, &keep) {
                    Ok(s) => {
                        keep.insert(s);
                        slots.push(s);
                    }
                    Err(e) => {
                        for (s, (va, _)) in slots.iter().zip(&todo) {
                            if dev.table.lookup(*va).is_none() {
                                dev.pool.free(*s);
                            }
                        }
                        return Err(e);
                    }
                },
            }
        }
        // Write-protect the pages *before* copying them: populating for
        // write resolved their protection (the next sync point would take
        // it for a CPU write), and any CPU write from here on must be seen
        // by the next sync point. Protecting after the copy (as this code
        // once did) swallowed a CPU write landing between the copy and the
        // protection, leaving a stale device copy that no later sync point
        // dropped — `hmm-stress` found it. A failed protect leaves the pages
        // reported as written: conservative.
        //
        // A read fault populates for read, which leaves the protection
        // alone: its pages are still armed (by `watch`, or re-protected by
        // the last sync point's scan) unless the CPU wrote them since — and
        // such a page stays reported as written until the next sync point
        // drops its device copy, which is merely conservative. So only
        // write faults re-arm: one write-protect ioctl (and its TLB flush)
        // less per run of read-faulted pages, most of a sparse launch's
        // system calls.
        let addrs: Vec<VirtAddr> = todo.iter().map(|t| t.0).collect();
        if write {
            let _ = inner.host.rearm_after_writeback(&addrs);
        }
        // Copy in with `process_vm_readv`, which survives vanished pages:
        // straight into the slots when the pool is host memory and every
        // slot is fresh (a failed read then only spoils slots that are
        // freed again; an upgraded slot still backs a read-only entry),
        // else through the staging buffer.
        let direct: Option<Vec<*mut u8>> = if upgrades {
            None
        } else {
            slots
                .iter()
                .map(|s| inner.backend.host_slot(*s).map(|p| p.as_ptr()))
                .collect()
        };
        let Dev { staging, ok, .. } = &mut *dev;
        match &direct {
            // SAFETY: the backend vouches for 4 KiB of writable memory per
            // slot (`Backend::host_slot`); the slots are distinct, fresh and
            // unused by device work (none is in flight during fault
            // service), as `copy_to_device` requires; pool memory is never
            // a mirrored CPU page.
            Some(dsts) => unsafe { hostcopy::read_pages_to(&addrs, dsts, ok) },
            None => hostcopy::read_pages(&addrs, staging, ok),
        }
        if let Some(i) = ok.iter().position(|b| !*b) {
            // A page went away under us: its invalidation is on its way.
            inner.undo_install(&mut dev, &todo, &slots);
            // Unless it did not: memory the kernel lets no one else read
            // (`memfd_secret`) stays mapped and present but cannot be
            // copied. After a few failures, a fresh look at the mappings
            // tells the two apart: still mapped readable means the page
            // cannot be mirrored — a typed error now, not a retry loop
            // spinning until the timeout.
            copy_failures.set(copy_failures.get() + 1);
            if copy_failures.get() >= 3 {
                let va = addrs[i];
                if let Ok(page) = VaRange::from_start_len(va, PAGE_SIZE) {
                    inner.host.maps().invalidate(page);
                }
                if inner.host.lookup(va).ok().flatten().is_some_and(|m| m.read) {
                    return Err(MirrorError::DeviceFault {
                        addr: va,
                        write,
                        reason: AccessError::BadPage,
                    });
                }
            }
            return Ok(Attempt::Retry);
        }
        if direct.is_none() {
            let batch: Vec<HostToDevice> = slots
                .iter()
                .enumerate()
                .map(|(i, s)| HostToDevice {
                    slot: *s,
                    src: staging[i * PAGE..].as_ptr(),
                })
                .collect();
            // SAFETY: every `src` is a 4 KiB chunk of `staging`, alive and
            // unmodified for the call; the destination slots are freshly
            // allocated or belong to pages being upgraded, which no device
            // work uses (launches are serialised and none is in flight
            // during fault service).
            if let Err(e) = unsafe { inner.backend.copy_to_device(&batch) } {
                inner.undo_install(&mut dev, &todo, &slots);
                return Err(e.into());
            }
        }
        let Dev { staging, twins, .. } = &mut *dev;
        for (i, ((_, writable), s)) in todo.iter().zip(&slots).enumerate() {
            if *writable {
                match &direct {
                    // SAFETY: the slot's 4 KiB were just written by the
                    // read above and no device work touches them yet; the
                    // backend vouches for their validity (`host_slot`).
                    Some(d) => twins.set(*s, unsafe { std::slice::from_raw_parts(d[i], PAGE) }),
                    None => twins.set(*s, &staging[i * PAGE..(i + 1) * PAGE]),
                }
            }
        }
        let mut writes: Vec<PteWrite> = Vec::new();
        let mut failed = None;
        for ((va, writable), s) in todo.iter().zip(&slots) {
            if let Err(e) = dev.table.map(*va, Pte::leaf(*s, *writable), &mut writes) {
                failed = Some(MirrorError::from(e));
                break;
            }
        }
        if let Err(e) = inner.backend.write_ptes(&writes) {
            failed.get_or_insert(e.into());
        }
        if let Some(e) = failed {
            // Leave nothing half-installed: unmap what was mapped, free the
            // slots and twins this attempt took.
            inner.undo_install(&mut dev, &todo, &slots);
            return Err(e);
        }
        Counters::add(&inner.counters.pages_in, todo.len() as u64);
        Ok(Attempt::Done(todo.len() as u64))
    }

    /// The pinning baseline: registers `range` up front — locks the CPU
    /// pages (`mlock`, best effort), copies every page, maps every entry,
    /// installs **no** notifier. The device keeps reading these copies
    /// whatever the CPU does until [`Mirror::unpin`]: CPU writes after the
    /// pin are not seen, and an `munmap` leaves the device reading the old
    /// data. That hazard is the point of comparison.
    pub fn pin(&self, range: VaRange) -> Result<PinHandle, MirrorError> {
        self.same_process()?;
        let range = range.page_cover()?.user()?;
        let inner = &*self.inner;
        if inner.zc.is_some() {
            return Err(MirrorError::Unsupported(
                "pinning copies pages into a device pool, and a zero-copy device has none \
                 (pin on a copy-mode device to compare)",
            ));
        }
        let _serial = relock(&inner.launch);
        // Populate and check permissions exactly as a fault would.
        let mapping = inner.host.lookup(range.start())?;
        let writable = mapping
            .as_ref()
            .is_some_and(|m| m.write && m.range.covers(range));
        let flags = if writable {
            FaultFlags::WRITE
        } else {
            FaultFlags::READ
        };
        let states = inner
            .host
            .faulter()
            .range_fault(range, flags)
            .map_err(|e| MirrorError::from_fault(e, range.start(), false))?;
        // SAFETY: mlock only changes residency of our own pages.
        let locked = unsafe { libc::mlock(range.start().as_mut_ptr(), range.len() as usize) } == 0;
        let mut dev = inner.lock();
        inner.flush_deferred(&mut dev);
        let free = dev.pool.capacity() - dev.pool.used();
        if u64::from(free) < range.pages() {
            // Evict unpinned pages until enough slots are free: hold the
            // slots gained (alloc_slot evicts only when none is free), then
            // release them together.
            let mut held = Vec::new();
            let mut keep = HashSet::new();
            while u64::from(dev.pool.capacity() - dev.pool.used()) + (held.len() as u64)
                < range.pages()
            {
                match inner.alloc_slot(&mut dev, range.start(), &keep) {
                    Ok(s) => {
                        keep.insert(s);
                        held.push(s);
                    }
                    Err(_) => break,
                }
            }
            for s in held {
                dev.pool.free(s);
            }
        }
        if u64::from(dev.pool.capacity() - dev.pool.used()) < range.pages() {
            drop(dev);
            if locked {
                // SAFETY: undoing our own mlock.
                unsafe { libc::munlock(range.start().as_mut_ptr(), range.len() as usize) };
            }
            return Err(MirrorError::PoolExhausted {
                needed: range.pages(),
                capacity: inner.cfg.pool_slots,
            });
        }
        let addrs: Vec<VirtAddr> = range.page_addrs().collect();
        let mut slots = Vec::with_capacity(addrs.len());
        for va in &addrs {
            if let Some(old) = dev.table.lookup(*va) {
                // Already mirrored on demand: drop that copy first.
                let _ = old;
                let page = VaRange::from_start_len(*va, PAGE_SIZE)?;
                inner.zap(&mut dev, page, true);
            }
            let s = dev.pool.alloc(*va).ok_or(MirrorError::PoolExhausted {
                needed: 1,
                capacity: inner.cfg.pool_slots,
            })?;
            dev.pinned_slots.insert(s);
            slots.push(s);
        }
        for (addrs, slots) in addrs.chunks(STAGE_PAGES).zip(slots.chunks(STAGE_PAGES)) {
            let Dev { staging, ok, .. } = &mut *dev;
            let direct: Option<Vec<*mut u8>> = slots
                .iter()
                .map(|s| inner.backend.host_slot(*s).map(|p| p.as_ptr()))
                .collect();
            if let Some(dsts) = direct {
                // Host-addressable pool: one copy, straight into the slots.
                // SAFETY: 4 KiB per slot vouched for by the backend
                // (`host_slot`); the slots are distinct, freshly allocated
                // and unused by device work, as `copy_to_device` requires.
                unsafe { hostcopy::read_pages_to(addrs, &dsts, ok) };
                continue;
            }
            hostcopy::read_pages(addrs, staging, ok);
            let batch: Vec<HostToDevice> = slots
                .iter()
                .enumerate()
                .map(|(i, s)| HostToDevice {
                    slot: *s,
                    src: staging[i * PAGE..].as_ptr(),
                })
                .collect();
            // SAFETY: as in `commit`: staging chunks alive for the call,
            // slots fresh and unused by device work.
            unsafe { inner.backend.copy_to_device(&batch)? };
        }
        let mut writes = Vec::new();
        for ((va, s), st) in addrs.iter().zip(&slots).zip(&states) {
            let w = writable && st.is_writable();
            dev.table
                .map(*va, Pte::leaf(*s, w || writable), &mut writes)?;
        }
        inner.backend.write_ptes(&writes)?;
        Counters::add(&inner.counters.pages_in, addrs.len() as u64);
        dev.pinned
            .insert(range.start().0, PinnedRange { range, locked });
        Ok(PinHandle { range })
    }

    /// Ends a pin: writes device-dirty pages back (if the CPU range still
    /// exists), unmaps and frees everything, unlocks the CPU pages.
    pub fn unpin(&self, pin: PinHandle) -> Result<(), MirrorError> {
        self.same_process()?;
        let inner = &*self.inner;
        let _serial = relock(&inner.launch);
        let mut dev = inner.lock();
        let Some(p) = dev.pinned.remove(&pin.range.start().0) else {
            return Ok(());
        };
        let mapped: Vec<(VirtAddr, Pte)> = dev.table.mapped_in(p.range).collect();
        for (_, pte) in &mapped {
            dev.pinned_slots.remove(&pte.slot());
        }
        inner.zap(&mut dev, p.range, true);
        if p.locked {
            // SAFETY: undoing our own mlock; failure (range gone) is harmless.
            unsafe { libc::munlock(p.range.start().as_mut_ptr(), p.range.len() as usize) };
        }
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MirrorStats {
        let c = &self.inner.counters;
        let g = Counters::get;
        let dev = self.inner.lock();
        MirrorStats {
            launches: g(&c.launches),
            submissions: g(&c.submissions),
            replays: g(&c.replays),
            faults: g(&c.faults),
            garbage_faults: g(&c.garbage_faults),
            fault_batches: g(&c.fault_batches),
            fault_runs: g(&c.fault_runs),
            retries: g(&c.retries),
            regions_created: g(&c.regions_created),
            unwatched_regions: g(&c.unwatched_regions),
            deferred_releases: g(&c.deferred_releases),
            pages_in: g(&c.pages_in),
            pages_out: g(&c.pages_out),
            evictions: g(&c.evictions),
            invalidations: core::array::from_fn(|i| g(&c.invalidations[i])),
            prefetched: g(&c.prefetched),
            mapped_pages: dev.table.mapped_pages(),
            pool_used: u64::from(dev.pool.used()),
            pool_capacity: u64::from(dev.pool.capacity()),
            table_pages_used: u64::from(dev.table.table_pages_used()),
        }
    }

    /// Live (not dead) regions, in address order.
    pub fn regions(&self) -> Vec<VaRange> {
        self.inner
            .lock()
            .regions
            .values()
            .filter(|r| !r.dead)
            .map(|r| r.range)
            .collect()
    }

    /// Waits (up to 10 s) until the deferred-release worker has handled
    /// every region that died so far; returns whether it did. For tests
    /// and orderly shutdown.
    /// False at once in a forked child.
    pub fn flush_releases(&self) -> bool {
        if self.same_process().is_err() {
            return false;
        }
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if !self.inner.lock().regions.values().any(|r| r.dead) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// A range registered by [`Mirror::pin`].
#[derive(Debug)]
#[must_use = "a pin holds device memory until `Mirror::unpin`"]
pub struct PinHandle {
    range: VaRange,
}

impl PinHandle {
    /// The pinned range.
    pub fn range(&self) -> VaRange {
        self.range
    }
}

/// Removes a dead region's notifier (waiting out running callbacks) and
/// drops whatever it still maps. Not to be called from a callback.
fn release_slot<B: Backend>(inner: &Inner<B>, mut slot: RegionSlot<B>) {
    // Zap first, while the region is still watched and subscribed: a dead
    // region keeps the pages an unmap did not take (the kernel merges
    // neighbouring mappings, so only part of a region may be gone), and
    // until they are dropped, CPU writes and unmaps there must still reach
    // them. Unwatching first left a window in which a launch read those
    // pages with nothing tracking the CPU's writes to them (stale reads
    // found by `hmm-stress`). Nothing can map pages into the region after
    // this: it is out of `regions`, so faults there make a new one.
    {
        let mut dev = inner.lock_idle();
        inner.zap(&mut dev, slot.range, true);
        if let Some(w) = slot.window.take() {
            // Its entries are gone (above) and nothing runs: unbind now.
            Inner::detach_window(&mut dev, w);
            inner.flush_deferred(&mut dev);
        }
    }
    if slot.watched {
        let _ = inner.unwatch(slot.range);
    }
    if let Some(sub) = slot.sub.take() {
        // Not inside a callback: this waits until no invalidation can reach
        // the region any more.
        let _ = sub.remove();
    }
    Counters::add(&inner.counters.deferred_releases, 1);
}

fn release_worker<B: Backend>(owner: Weak<Inner<B>>, rx: Receiver<ReleaseMsg>) {
    while let Ok(msg) = rx.recv() {
        let ReleaseMsg::Region(start) = msg else {
            return;
        };
        let Some(inner) = owner.upgrade() else { return };
        let slot = {
            let mut dev = inner.lock();
            match dev.regions.get(&start) {
                Some(r) if r.dead => dev.regions.remove(&start),
                _ => None,
            }
        };
        if let Some(slot) = slot {
            release_slot(&inner, slot);
        }
    }
}

impl<B: Backend> Drop for Mirror<B> {
    fn drop(&mut self) {
        if self.same_process().is_err() {
            // A forked child: the threads to join and the locks to take may
            // not exist or be held forever here. Leak everything (the
            // parent owns it), so dropping cannot hang or free the
            // parent's state twice.
            if let Some(w) = self.worker.take() {
                std::mem::forget(w);
            }
            std::mem::forget(self.young.take());
            std::mem::forget(Arc::clone(&self.inner));
            return;
        }
        let inner = &*self.inner;
        let _ = inner.release_tx.send(ReleaseMsg::Shutdown);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        if let Some(h) = self.young.take() {
            let _ = h.unregister();
        }
        // Remove every region (blocking: waits out running callbacks), then
        // free the device memory they held.
        let slots: Vec<RegionSlot<B>> = std::mem::take(&mut inner.lock().regions)
            .into_values()
            .collect();
        for mut s in slots {
            if s.watched {
                let _ = inner.unwatch(s.range);
            }
            if let Some(sub) = s.sub.take() {
                let _ = sub.remove();
            }
        }
        let mut dev = inner.lock_idle();
        let pins: Vec<PinnedRange> = std::mem::take(&mut dev.pinned).into_values().collect();
        dev.pinned_slots.clear();
        inner.zap(&mut dev, VaRange::everything(), false);
        for w in 0..dev.windows.len() as u32 {
            if dev.windows[w as usize].region.is_some() {
                Inner::detach_window(&mut dev, w);
            }
        }
        inner.flush_deferred(&mut dev);
        for p in pins {
            if p.locked {
                // SAFETY: undoing our own mlock; harmless if the range is gone.
                unsafe { libc::munlock(p.range.start().as_mut_ptr(), p.range.len() as usize) };
            }
        }
        drop(dev);
        inner.host.detach_mirror();
    }
}
