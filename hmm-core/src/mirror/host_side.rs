//! [`HostSide`]: what a mirror needs from the CPU side, and nothing more.
//!
//! The mirror is generic over it so that the whole device-side protocol —
//! fault service, every invalidation path including the destructive one
//! that never waits, write-back and deferred release — can run against
//! something other than the real process: an in-memory fake under `loom`
//! (`tests/loom_mirror.rs`), where no userfaultfd, `/proc` or
//! `process_vm_*` exists. [`HostSpace`] is the real implementation.
//!
//! The trait is consumer-shaped (rust-vmm's rule: small traits for
//! consumers): each method is one thing the mirror does with the CPU side,
//! named for what the mirror wants, not for how `HostSpace` does it.

use crate::addr::{VaRange, VirtAddr};
use crate::cpu::host::{GiveBack, HostError, HostSpace};
use crate::cpu::maps::{Mapping, MappingCache};
use crate::cpu::migration::{Detached, FaultBack};
use crate::cpu::range_fault::{FaultError, FaultFlags, PageState};
use crate::notifier::AddressSpace;

pub use super::hostcopy::RunFate;

/// Whether a watch asks for CPU writes to be tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteTracking {
    /// CPU writes become `CpuWrite` invalidations at the next sync point
    /// (device copies go stale when the CPU writes).
    Tracked,
    /// Kernel events only (the device reads the CPU's own pages).
    Untracked,
    /// Kernel events only, but the device holds copies: CPU writes are
    /// found by hashing at sync points
    /// ([`CpuWrites::Hash`](super::CpuWrites::Hash)) and reach the
    /// mirror as `CpuWrite` invalidations, which drop those copies.
    Hashed,
}

/// The CPU side of a mirror: notifier registry, mappings, page snapshots,
/// kernel-event watches, write tracking and the copies to and from CPU
/// memory.
///
/// Every method may be called with the mirror's driver lock held, except
/// [`HostSide::sync_point`], [`HostSide::watch`] and [`HostSide::unwatch`],
/// which the mirror calls without it (they may wait for the event monitor,
/// whose invalidations take that lock).
pub trait HostSide: Send + Sync + 'static {
    /// The interval-notifier registry regions subscribe to.
    fn space(&self) -> &AddressSpace;

    /// The start-of-launch sync point: CPU writes to tracked ranges since
    /// the last one become `CpuWrite` invalidations. Returns the pages
    /// invalidated.
    fn sync_point(&self) -> Result<u64, HostError>;

    /// Waits (bounded) until every kernel event caused so far has been
    /// handled, its invalidation included; returns whether that happened.
    /// The mirror calls it, without the driver lock, before every
    /// submission: a page discarded while fault service copied it may hold
    /// a torn copy until its invalidation runs ([`HostSpace::settle`]).
    fn settle(&self) -> bool;

    /// Starts delivering kernel events (unmap, remap, remove) for `range`
    /// as invalidations, and tracking CPU writes there if asked.
    fn watch(&self, range: VaRange, writes: WriteTracking) -> Result<(), HostError>;

    /// Ends one [`HostSide::watch`] of exactly `range` made with the same
    /// `writes`.
    fn unwatch(&self, range: VaRange, writes: WriteTracking) -> Result<(), HostError>;

    /// Re-arms write tracking of `pages` (sorted, page-aligned): the mirror
    /// is about to copy them, or has just written them itself, and a CPU
    /// write from now on must be reported by the next sync point.
    fn rearm(&self, pages: &[VirtAddr]) -> Result<(), HostError>;

    /// The mapping containing `addr`, read fresh where the cache is not
    /// trusted.
    fn lookup(&self, addr: VirtAddr) -> Result<Option<Mapping>, HostError>;

    /// Starts a fault-service round: mapping lookups with the returned
    /// epoch are at least as fresh as this call.
    fn new_epoch(&self) -> u64;

    /// The mapping containing `addr`, read during epoch `epoch` or later.
    fn lookup_in_epoch(&self, addr: VirtAddr, epoch: u64) -> Result<Option<Mapping>, HostError>;

    /// Forgets what is known about the mappings of `range` (the next lookup
    /// reads them again): the mirror saw evidence they changed.
    fn forget_mappings(&self, range: VaRange);

    /// One `range_fault` snapshot of `range` (the `hmm_range_fault`
    /// analogue), written into `out` (cleared first).
    fn range_fault_into(
        &self,
        range: VaRange,
        flags: FaultFlags,
        out: &mut Vec<PageState>,
    ) -> Result<(), FaultError>;

    /// Populates every run for write (or read) in as few system calls as
    /// the kernel allows ([`RangeFaulter::populate_runs`]); an error names
    /// the first run that failed. The default populates nothing: the
    /// snapshot that follows populates what it needs.
    ///
    /// [`RangeFaulter::populate_runs`]: crate::cpu::range_fault::RangeFaulter::populate_runs
    fn populate_runs(&self, runs: &[VaRange], write: bool) -> Result<(), FaultError> {
        let _ = (runs, write);
        Ok(())
    }

    /// [`HostSide::range_fault_into`] for a range just populated by
    /// [`HostSide::populate_runs`] (the same result; a write fault's
    /// first populate is skipped).
    fn range_fault_populated_into(
        &self,
        range: VaRange,
        flags: FaultFlags,
        out: &mut Vec<PageState>,
    ) -> Result<(), FaultError> {
        self.range_fault_into(range, flags, out)
    }

    /// How many mirrors follow this host now.
    fn mirrors_attached(&self) -> usize;
    /// A mirror starts following this host.
    fn attach_mirror(&self);
    /// A mirror stops following this host.
    fn detach_mirror(&self);

    /// Reads the pages at `srcs` into consecutive 4 KiB chunks of `staging`
    /// (which holds at least `srcs.len()` pages); `ok[k]` tells whether page
    /// `k` was read (a page that vanished is not, and its chunk is zeroed).
    /// Never faults the process.
    fn read_pages(&self, srcs: &[VirtAddr], staging: &mut [u8], ok: &mut Vec<bool>);

    /// [`HostSide::read_pages`] into the 4 KiB at each `dsts[k]`.
    ///
    /// # Safety
    ///
    /// Every `dsts[k]` is valid for writes of 4096 bytes, the destinations
    /// are pairwise disjoint and disjoint from every source page, and
    /// nothing else reads or writes them during the call.
    unsafe fn read_pages_to(&self, srcs: &[VirtAddr], dsts: &[*mut u8], ok: &mut Vec<bool>);

    /// Writes each `(dst, bytes)` run to CPU memory, skipping runs whose
    /// pages are gone; returns how many runs were written. Never faults the
    /// process.
    fn write_runs(&self, runs: &[(VirtAddr, &[u8])]) -> usize;

    /// [`HostSide::write_runs`], saying per run what became of it
    /// (`fates`, cleared first, one per run): written, skipped because its
    /// memory is gone, or refused because its memory exists but is not
    /// writable (the mirror keeps such data and reports the refusal). The
    /// default writes the runs one at a time through
    /// [`HostSide::write_runs`] and calls every failure gone: right for a
    /// host whose memory cannot be write-protected.
    fn write_runs_checked(&self, runs: &[(VirtAddr, &[u8])], fates: &mut Vec<RunFate>) {
        fates.clear();
        for r in runs {
            fates.push(if self.write_runs(std::slice::from_ref(r)) == 1 {
                RunFate::Written
            } else {
                RunFate::Gone
            });
        }
    }

    /// Whether device-private migration works on this host: `Ok(None)`
    /// fully, `Ok(Some(why))` with the stated degradation, `Err(why)` not
    /// at all. Default: not at all (the host cannot trap CPU accesses).
    fn migration_support(&self) -> Result<Option<&'static str>, String> {
        Err("this host cannot trap CPU accesses".into())
    }

    /// Moves the CPU's copy of `range` out of the process and returns it;
    /// a CPU access there then waits for `owner`
    /// ([`HostSpace::detach_for_migration`]). Default: unsupported.
    fn detach_for_migration(
        &self,
        range: VaRange,
        owner: std::sync::Weak<dyn FaultBack>,
    ) -> Result<Detached, HostError> {
        let _ = (range, owner);
        Err(HostError::Migration(
            "this host cannot trap CPU accesses".into(),
        ))
    }

    /// Gives migrated pages back: `data` (whole pages) installed at `at`
    /// ([`HostSpace::give_back`]). Never faults the process. Default:
    /// nothing was ever detached, so there is nowhere to give back to.
    fn give_back(&self, at: VirtAddr, data: &[u8]) -> GiveBack {
        let _ = (at, data);
        GiveBack::Gone
    }

    /// Whether some page of `range` is armed for migration (a hole there
    /// faults to the mirror, and a kernel-mode populate fails). Default:
    /// no.
    fn is_armed(&self, range: VaRange) -> bool {
        let _ = range;
        false
    }

    /// Installs a zero page at every hole of `range` (armed for
    /// migration; the caller knows no page there is migrated): what the
    /// CPU reads from an anonymous hole, made present so a device fault
    /// can copy it. Never faults the process. Default: nothing.
    fn fill_holes(&self, range: VaRange) {
        let _ = range;
    }

    /// Poisons the missing pages of `range` (a CPU access gets `SIGBUS`);
    /// returns whether it was done. Default: no.
    fn poison(&self, range: VaRange) -> bool {
        let _ = range;
        false
    }

    /// No page of `range` is migrated any more: CPU accesses to holes
    /// there are ordinary faults again. A CPU write to `range` during the
    /// call may go unseen: the caller drops its device copies of `range`
    /// afterwards. Default: nothing.
    fn disarm(&self, range: VaRange) {
        let _ = range;
    }
}

impl HostSide for HostSpace {
    fn space(&self) -> &AddressSpace {
        HostSpace::space(self)
    }
    fn migration_support(&self) -> Result<Option<&'static str>, String> {
        HostSpace::migration_support(self)
    }
    fn detach_for_migration(
        &self,
        range: VaRange,
        owner: std::sync::Weak<dyn FaultBack>,
    ) -> Result<Detached, HostError> {
        HostSpace::detach_for_migration(self, range, owner)
    }
    fn give_back(&self, at: VirtAddr, data: &[u8]) -> GiveBack {
        HostSpace::give_back(self, at, data)
    }
    fn poison(&self, range: VaRange) -> bool {
        HostSpace::poison(self, range)
    }
    fn is_armed(&self, range: VaRange) -> bool {
        HostSpace::is_armed(self, range)
    }
    fn fill_holes(&self, range: VaRange) {
        HostSpace::fill_holes(self, range)
    }
    fn disarm(&self, range: VaRange) {
        HostSpace::disarm(self, range)
    }

    fn sync_point(&self) -> Result<u64, HostError> {
        HostSpace::sync_point(self)
    }

    fn settle(&self) -> bool {
        HostSpace::settle(self)
    }

    fn watch(&self, range: VaRange, writes: WriteTracking) -> Result<(), HostError> {
        match writes {
            WriteTracking::Tracked => HostSpace::watch(self, range),
            WriteTracking::Untracked | WriteTracking::Hashed => self.watch_untracked(range),
        }
    }

    fn unwatch(&self, range: VaRange, writes: WriteTracking) -> Result<(), HostError> {
        match writes {
            WriteTracking::Tracked => HostSpace::unwatch(self, range),
            WriteTracking::Untracked | WriteTracking::Hashed => self.unwatch_untracked(range),
        }
    }

    fn rearm(&self, pages: &[VirtAddr]) -> Result<(), HostError> {
        self.rearm_after_writeback(pages)
    }

    fn lookup(&self, addr: VirtAddr) -> Result<Option<Mapping>, HostError> {
        HostSpace::lookup(self, addr)
    }

    fn new_epoch(&self) -> u64 {
        self.maps().new_epoch()
    }

    fn lookup_in_epoch(&self, addr: VirtAddr, epoch: u64) -> Result<Option<Mapping>, HostError> {
        Ok(self.maps().lookup_in_epoch(addr, epoch)?)
    }

    fn forget_mappings(&self, range: VaRange) {
        self.maps().invalidate(range)
    }

    fn range_fault_into(
        &self,
        range: VaRange,
        flags: FaultFlags,
        out: &mut Vec<PageState>,
    ) -> Result<(), FaultError> {
        self.faulter().range_fault_into(range, flags, out)
    }

    fn populate_runs(&self, runs: &[VaRange], write: bool) -> Result<(), FaultError> {
        self.faulter().populate_runs(runs, write)
    }

    fn range_fault_populated_into(
        &self,
        range: VaRange,
        flags: FaultFlags,
        out: &mut Vec<PageState>,
    ) -> Result<(), FaultError> {
        self.faulter().range_fault_populated_into(range, flags, out)
    }

    fn mirrors_attached(&self) -> usize {
        HostSpace::mirrors_attached(self)
    }

    fn attach_mirror(&self) {
        HostSpace::attach_mirror(self)
    }

    fn detach_mirror(&self) {
        HostSpace::detach_mirror(self)
    }

    fn read_pages(&self, srcs: &[VirtAddr], staging: &mut [u8], ok: &mut Vec<bool>) {
        let mut route = PlainRoute::new(self.maps());
        super::hostcopy::read_pages(srcs, staging, ok, &mut |a| route.allows(a))
    }

    unsafe fn read_pages_to(&self, srcs: &[VirtAddr], dsts: &[*mut u8], ok: &mut Vec<bool>) {
        let mut route = PlainRoute::new(self.maps());
        // SAFETY: the caller upholds `read_pages_to`'s contract, which is
        // this method's.
        unsafe { super::hostcopy::read_pages_to(srcs, dsts, ok, &mut |a| route.allows(a)) }
    }

    fn write_runs(&self, runs: &[(VirtAddr, &[u8])]) -> usize {
        let mut fates = Vec::with_capacity(runs.len());
        self.write_runs_checked(runs, &mut fates);
        fates.iter().filter(|f| **f == RunFate::Written).count()
    }

    fn write_runs_checked(&self, runs: &[(VirtAddr, &[u8])], fates: &mut Vec<RunFate>) {
        let maps = self.maps();
        let mut route = PlainRoute::new(maps);
        // A failed write: gone or refused? A fresh look at the mapping
        // (the cache forced to re-read it): still mapped without write
        // permission is a refusal; no mapping is memory that is gone. A
        // writable mapping that failed a write is a file page past the end
        // of its file (SIGBUS): gone too. (`hostcopy` module docs.)
        let mut refused = |a: VirtAddr| {
            if let Ok(page) = VaRange::from_start_len(a.page_down(), crate::addr::PAGE_SIZE) {
                maps.invalidate(page);
            }
            matches!(maps.lookup(a), Ok(Some(m)) if !m.write)
        };
        super::hostcopy::write_runs(runs, &mut |a| route.allows(a), &mut refused, fates)
    }
}

/// Which CPU pages a plain (recoverable) copy may touch, for one batch:
/// [`Mapping::plain_copy_ok`] of the mapping containing each page, from
/// the mapping cache. A batch lies mostly in one mapping, so the last
/// answer is kept with its range and a batch costs about one lookup. The
/// lookups are fresh as of the current epoch: served from the cache
/// inside ranges whose changes events report, or if the cache was read in
/// this epoch (the fault service that called us has just read it), else
/// after one re-read. A page in no mapping, or whose lookup fails, is
/// routed to the syscall path, which reports it as unreadable.
struct PlainRoute<'a> {
    maps: &'a MappingCache,
    epoch: u64,
    last: Option<(VaRange, bool)>,
}

impl<'a> PlainRoute<'a> {
    fn new(maps: &'a MappingCache) -> Self {
        PlainRoute {
            maps,
            epoch: maps.current_epoch(),
            last: None,
        }
    }

    fn allows(&mut self, a: VirtAddr) -> bool {
        if let Some((r, ok)) = self.last {
            if r.contains(a) {
                return ok;
            }
        }
        match self.maps.lookup_in_epoch(a, self.epoch) {
            Ok(Some(m)) => {
                let ok = m.plain_copy_ok();
                self.last = Some((m.range, ok));
                ok
            }
            _ => false,
        }
    }
}
