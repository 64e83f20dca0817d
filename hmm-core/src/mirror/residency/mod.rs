//! Residency: where a mirrored page lives on the device, and how it gets
//! there and back.
//!
//! Everything else in the mirror — launches, fault batching, regions, the
//! invalidation protocol, pinning's bookkeeping, statistics — is shared and
//! asks a [`Residency`] the mode-specific questions. The implementation is
//! chosen once, in [`Mirror::new`](super::Mirror::new), from what the
//! backend offers:
//!
//! | implementation | backend | a mirrored page is… |
//! |---|---|---|
//! | [`copy::CopyPool`] | a pool of device slots | a copy in a pool slot, with a twin for byte-exact write-back |
//! | [`windows::HostWindows`] | [`host_windows`](super::backend::Backend::host_windows) is `Some` | the CPU's own page, seen through an imported window (zero-copy) |
//!
//! # The contract
//!
//! The shared code owns the shadow page table and the order of entry
//! writes; a residency owns the device memory the entries name. The one
//! rule that keeps a device from reading another page's data:
//!
//! > Device memory an entry named is released (a slot freed for reuse, a
//! > window unbound) only in [`Residency::entries_cleared`], which the
//! > shared `flush` calls after the backend confirmed (`Ok` from
//! > `write_ptes`) that every entry removed so far is cleared on the device.
//!
//! So when entries leave the shadow table (`zap`, a destructive
//! invalidation, eviction), the shared code queues their clearing writes
//! and hands the removed entries to [`Residency::retire`], which may only
//! *quarantine* their memory. If the backend fails to clear them, the
//! writes stay queued, the memory stays quarantined, and the next flush
//! retries; a backend that keeps failing (3 times in a row) or reports
//! itself lost is declared lost and every later call returns
//! [`MirrorError::DeviceLost`]. Writes of new entries are refused while
//! older clearing writes are still queued, so a retried clear can never
//! overwrite a newer entry.
//!
//! Write-back ([`Residency::write_back`]) returns how many pages it wrote
//! or an error; a residency that cannot read its own dirty data declares
//! the device lost (the data is gone, and saying so is the only honest
//! answer) instead of freeing it silently.
//!
//! # Migrated pages, and adding a third residency
//!
//! Device-private migration (the device holds the only copy; a CPU touch
//! brings it back, `mirror::migrate`) is not a third residency but a mark
//! on copy mode's pages: a migrated page is a pool slot like any other,
//! and only the write-back, eviction and discard rules change
//! (`copy::migrated`). The questions it added are trait methods with
//! defaults that refuse it (`check_migrate`, `adopt_migrated`,
//! `migrated_in`, `give_back`, `discarded`, `moved`), so the windows
//! residency answers `MigrationUnsupported`. To add a third residency:
//!
//! 1. a module beside `copy` and `windows` with a type implementing
//!    [`Residency`] — its own state (slots, windows, migrated pages) lives
//!    in that type, never in [`Dev`](super::state::Dev);
//! 2. a branch in [`choose`], the only place that looks at what the backend
//!    offers;
//! 3. the conformance suite run with it (`hmm-conformance`).
//!
//! Shared code must not learn which residency it talks to: a new question
//! becomes a trait method with a default that describes today's behaviour.

pub(crate) mod copy;
pub(crate) mod windows;

use std::collections::BTreeMap;

use super::backend::{Backend, BackendError, InvocationSet};
use super::config::MirrorConfig;
use super::error::MirrorError;
use super::faults::{PageFault, Run};
use super::format::Pte;
use super::host_side::{HostSide, WriteTracking};
use super::state::{Cx, RegionKey, RegionSlot};
use crate::addr::{VaRange, VirtAddr};
use crate::cpu::range_fault::PageState;
use crate::notifier::Attempt;

/// One install request: map `todo` (page, writable) of region `key`
/// (covering `region`), driver lock held, no submission
/// of this mirror running, the sequence checked by the caller.
pub(crate) struct Install<'a> {
    pub key: RegionKey,
    pub region: VaRange,
    pub todo: &'a [(VirtAddr, bool)],
    /// The fault was a write.
    pub write: bool,
    /// Copies that failed during this fault's attempts (a page that keeps
    /// failing to copy while still mapped cannot be mirrored).
    pub copy_failures: &'a std::cell::Cell<u32>,
}

/// Where mirrored pages live; see the module docs for the contract.
///
/// Every method runs with the driver lock held. Methods that take a
/// [`Cx`] may call the backend; the others must not (they run on the event
/// monitor's thread, which must never wait).
pub(crate) trait Residency<B: Backend, H: HostSide>: Send {
    /// How regions are watched: whether CPU writes make device copies
    /// stale.
    fn writes(&self) -> WriteTracking;

    /// Read faults may map writable pages writable at no extra cost (no
    /// twin to keep).
    fn read_faults_map_writable(&self) -> bool;

    /// The pool the backend is initialised with, in slots (0: none).
    fn pool_slots(&self) -> u32;

    /// The region to register around a fault at `at`, inside `mapping`,
    /// overlapping none of `regions`; `None` if a (dead) region still
    /// covers `at`.
    fn choose_region(
        &self,
        at: VirtAddr,
        mapping: VaRange,
        regions: &BTreeMap<u64, RegionSlot<B, H>>,
        cfg: &MirrorConfig,
    ) -> Option<VaRange>;

    /// The most pages one install may take (a run is split into pieces of
    /// at most this many).
    fn piece_pages(&self, cfg: &MirrorConfig) -> u64;

    /// How many more pages could be made resident now without evicting
    /// anything, less a reserve: the most a fetch policy may speculate
    /// (`policy`). Default 0: no speculation.
    fn spare_pages(&self) -> u64 {
        0
    }

    /// A fault-service round (or a prefetch) begins.
    fn begin_round(&mut self);

    /// Pool slots free now (default: as many as wanted — a residency
    /// without a pool never makes room).
    fn free_slots(&self) -> u64 {
        u64::MAX
    }

    /// Frees room for `pages` more pages before a round (or a prefetch)
    /// installs them, in one bulk eviction where the residency evicts
    /// (issue #16: entries cleared in one page-table write, dirty pages
    /// written back in one batch), so the round's installs find free
    /// slots instead of evicting page by page. Returns pages evicted.
    /// Default: nothing to make room in.
    fn make_room(&mut self, cx: &mut Cx<'_, B, H>, pages: u64) -> Result<u64, MirrorError> {
        let _ = (cx, pages);
        Ok(0)
    }

    /// Chooses the faults this round serves, from `pf` (one per page,
    /// sorted by page, each carrying the lowest invocation that faulted
    /// on it; left sorted by page). The rest fault again on replay.
    /// `incomplete`: the invocations the round's replay will run.
    fn plan_round(&mut self, pf: &mut Vec<PageFault>, incomplete: &InvocationSet);

    /// A launch begins or ends: state kept across its rounds (copy mode's
    /// protected pages) is dropped.
    fn launch_boundary(&mut self) {}

    /// Orders a batch's runs for service (default: address order).
    fn order_runs(&self, runs: &mut [Run], batch: &[PageFault]) {
        let _ = (runs, batch);
    }

    /// Makes `req.todo` resident and writes their entries.
    /// [`MirrorError::PoolExhausted`] means this round can take no more;
    /// the caller ends the round if it made progress.
    fn install(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        req: Install<'_>,
    ) -> Result<Attempt<u64>, MirrorError>;

    /// Writes the device-dirty pages among `pages` (mapped entries) back to
    /// the CPU; returns pages written. The device is idle for them. A page
    /// whose CPU memory refuses the write keeps its data and stays dirty
    /// (it is remembered: [`Residency::refused`]); the others are written,
    /// and the first refusal is returned as
    /// [`MirrorError::WriteBackRefused`].
    fn write_back(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        pages: &[(VirtAddr, Pte)],
    ) -> Result<u64, MirrorError>;

    /// The slots a launch's write-back will read back whole, if they are
    /// few: passed to [`Backend::read_back_with_next_launch`] before each
    /// submission, so a driver whose read-back is a device round trip can
    /// bring them back with the launch. Default: none.
    fn read_back_candidates(&self) -> Vec<crate::mirror::format::PoolSlot> {
        Vec::new()
    }

    /// The start-of-launch check for writers write tracking cannot see
    /// (`mirror::foreign`): the device-resident pages, sorted, whose CPU
    /// page no longer matches the device's copy. The caller invalidates
    /// them as CPU writes. Default: none (a residency whose device reads
    /// the CPU's own pages holds no copy to go stale).
    fn foreign_changed(&mut self, cx: &mut Cx<'_, B, H>) -> Vec<VirtAddr> {
        let _ = cx;
        Vec::new()
    }

    /// The pages in `r` whose write-back was refused and not yet retried
    /// successfully, sorted: their entries must stay (a `zap` keeps them),
    /// since they hold the only copy of device writes.
    fn refused(&self, r: VaRange) -> Vec<VirtAddr> {
        let _ = r;
        Vec::new()
    }

    /// Whether some page's write-back was refused and is still pending
    /// (the next launch tries it first and reports a refusal).
    fn has_refused(&self) -> bool {
        false
    }

    /// Entries `removed` left the shadow table and their clearing writes
    /// are queued: quarantine what they named. Must not call the backend.
    fn retire(&mut self, removed: &[(VirtAddr, Pte)]);

    /// Every queued clearing write has been confirmed: release what
    /// [`Residency::retire`] and detaching quarantined. Returns whether it
    /// called the device (a confirmed call ends a run of failures).
    fn entries_cleared(&mut self, backend: &B) -> Result<bool, BackendError>;

    /// A destructive invalidation (unmap, remap, remove) hit `hit` of
    /// region `key` (which may have left the map since): returns the range
    /// whose entries must go (the residency may widen it). Must not call
    /// the backend.
    fn destructive(
        &mut self,
        regions: &BTreeMap<u64, RegionSlot<B, H>>,
        key: RegionKey,
        hit: VaRange,
    ) -> VaRange;

    /// The region's memory was recycled (`Clear`, `Release`): drop
    /// whatever depends on what the memory was (the device is idle).
    fn recycled(&mut self, cx: &mut Cx<'_, B, H>, key: RegionKey) -> Result<(), MirrorError> {
        let _ = (cx, key);
        Ok(())
    }

    /// Region `key` is being released (its entries are gone): drop what
    /// belongs to that instance. Must not call the backend.
    fn region_released(&mut self, key: RegionKey) {
        let _ = key;
    }

    /// Whether [`Mirror::pin`](super::Mirror::pin) can work at all
    /// (checked before anything is populated or locked).
    fn check_pin(&self) -> Result<(), MirrorError> {
        Ok(())
    }

    /// The device side of [`Mirror::pin`](super::Mirror::pin): make every
    /// page of `range` resident for good and map it (`states` from a fresh
    /// `range_fault`).
    fn pin(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        range: VaRange,
        states: &[PageState],
        writable: bool,
    ) -> Result<(), MirrorError>;

    /// Pinned `pages` become ordinary (evictable) again.
    fn unpin(&mut self, pages: &[(VirtAddr, Pte)]) {
        let _ = pages;
    }

    /// Whether pages can migrate to the device here (`mirror::migrate`):
    /// the device must hold copies it can keep as the only one. Default:
    /// no (a residency whose device reads the CPU's own pages cannot trap
    /// reads of present pages).
    fn check_migrate(&self) -> Result<(), MirrorError> {
        Err(MirrorError::MigrationUnsupported(
            "zero-copy residency: the device reads the CPU's own pages, and nothing can trap CPU reads of present pages".into(),
        ))
    }

    /// The CPU's copy of `range` (every page mapped writable here) has
    /// left the process: `bytes` (the pages as of the move, in order)
    /// become the device's copy, which is now the only one — except for
    /// pages already migrated, whose CPU side was a hole (their device
    /// data stays). On an error nothing is marked, and the caller gives
    /// `bytes` back where no page was migrated before.
    fn adopt_migrated(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        range: VaRange,
        bytes: &[u8],
    ) -> Result<u64, MirrorError> {
        let _ = (cx, range, bytes);
        self.check_migrate().map(|_| 0)
    }

    /// The pages in `r` whose only copy is here (migrated, mapped or moved
    /// away by an `mremap`), sorted.
    fn migrated_in(&self, r: VaRange) -> Vec<VirtAddr> {
        let _ = r;
        Vec::new()
    }

    /// The pool slot holding the only copy of `va`, if `va` is migrated
    /// and mapped (not moved away by an `mremap`). Asked on the event
    /// monitor's reader: must not allocate, free, wait or call the
    /// backend. Default: `None`.
    fn migrated_slot(
        &self,
        table: &super::pagetable::ShadowTable,
        va: VirtAddr,
    ) -> Option<crate::mirror::format::PoolSlot> {
        let _ = (table, va);
        None
    }

    /// `va` was given back by the event monitor's reader straight from its
    /// slot ([`Residency::migrated_slot`]) and is on the CPU: record it
    /// as given back (no longer migrated; an ordinary copy). `Ok(false)`
    /// if it is not migrated any more (discarded or moved since). An error
    /// leaves it migrated (the caller then gives it back the usual way).
    /// Default: `Ok(false)`.
    fn settle_given(&mut self, cx: &mut Cx<'_, B, H>, va: VirtAddr) -> Result<bool, MirrorError> {
        let _ = (cx, va);
        Ok(false)
    }

    /// Gives the migrated pages among `pages` back to the CPU (device
    /// idle for them); they stay mapped as ordinary copies. A page that
    /// could not be given back stays migrated; the error says why.
    /// Returns pages given back.
    fn give_back(&mut self, cx: &mut Cx<'_, B, H>, pages: &[VirtAddr]) -> Result<u64, MirrorError> {
        let _ = (cx, pages);
        Ok(0)
    }

    /// A destructive event took `range` (`moved`: an `mremap` moved it
    /// elsewhere) while `table` still has its entries: migrated pages
    /// there are gone with their memory, or — moved — keep their data
    /// until [`Residency::moved`] says where it went. Must not call the
    /// backend.
    fn discarded(&mut self, table: &super::pagetable::ShadowTable, range: VaRange, moved: bool) {
        let _ = (table, range, moved);
    }

    /// An `mremap` moved `old` to `to` (after [`Residency::discarded`] of
    /// it): migrated data kept from `old` now belongs at `to`.
    fn moved(&mut self, old: VaRange, to: VirtAddr) {
        let _ = (old, to);
    }

    /// Device memory in use and available, in pages.
    fn usage(&self) -> (u64, u64);

    /// The mirror is going away: forget pins, detach everything (its
    /// entries are zapped by the caller, which flushes after).
    fn teardown(&mut self);
}

/// The residency for `backend`: host windows where it offers them, a copy
/// pool otherwise. The only place that looks at the mode.
pub(crate) fn choose<B: Backend, H: HostSide>(
    backend: &B,
    cfg: &MirrorConfig,
) -> Result<Box<dyn Residency<B, H>>, MirrorError> {
    match backend.host_windows() {
        Some(hw) => Ok(Box::new(windows::HostWindows::new(hw)?)),
        None => Ok(Box::new(copy::CopyPool::new(
            cfg.pool_slots,
            backend.info().max_pool_slots,
            cfg.foreign_writers,
            cfg.cpu_writes,
        )?)),
    }
}
