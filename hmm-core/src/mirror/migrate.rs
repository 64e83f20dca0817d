//! Device-private migration (issue 17): the device holds the only copy
//! of a range, and a CPU touch brings it back.
//!
//! [`Mirror::migrate_to_device`] makes a range resident (a prefetch for
//! writing), has the host move the CPU's pages out
//! ([`HostSide::detach_for_migration`]: `cpu::migration` has the kernel
//! side and the deadlock argument), copies the bytes as of the move into
//! the pages' slots and marks them migrated (`residency::copy::migrated`
//! says what the mark changes). From then on no launch writes those pages
//! back and no sync point scans them: iterative device work on them costs
//! what it costs on pinned device buffers.
//!
//! A CPU access to a migrated page — any thread, read or write — waits in
//! the kernel until the host's event monitor or fault-back server calls
//! [`FaultBack`] here: on a host-synchronous device the monitor's reader
//! answers at once with the page alone ([`Inner::answer_now`], which must
//! neither wait nor allocate, and leaves the books to the next holder of
//! the driver lock); otherwise the handler or the server waits for the
//! running launch and gives back the page and the migrated pages of its
//! neighbourhood (the page alone for an isolated fault, 64 KiB to 2 MiB
//! by fault density: `neighbourhood`) with `UFFDIO_COPY`, write-protected
//! so write tracking sees the next CPU write, and lets the access
//! proceed. The pages stay on the device as ordinary copies.
//! [`Mirror::migrate_to_host`] does the same for a range, eviction gives a
//! migrated page back before its slot is reused, dropping the mirror
//! gives every page back, and so does a `fork()`
//! ([`FaultBack::before_fork`], `cpu::fork_prep`).
//!
//! [`Mirror::make_exclusive`] migrates with a mark: a CPU touch of an
//! exclusive page brings back that page alone and drops its device entry
//! (the device's next access faults and fetches the CPU's copy).
//! [`Advice::PreferDevice`](super::Advice::PreferDevice) migrates the
//! advised pages resident when a launch ends (`migrate_preferred`).
//!
//! What is not built yet is listed in `cpu::migration` and
//! `docs/MIGRATION.md`.

use std::time::Instant;

use super::backend::{Backend, DeviceToHost};
use super::error::MirrorError;
use super::handle::Mirror;
use super::host_side::HostSide;
use super::state::{Dev, Inner};
use super::stats::Counters;
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::cpu::host::GiveBack;
use crate::cpu::maps::MappingKind;
use crate::cpu::migration::{FaultBack, FaultBackOutcome};
use crate::sync::{lock, MutexGuard};

/// The smallest neighbourhood a CPU fault on a migrated page brings back:
/// the migrated pages of its aligned block of this many pages (64 KiB).
const FAULT_BACK_PAGES: u64 = 16;
/// Neighbourhoods never cross an aligned block of this many pages (2 MiB).
const FAULT_BACK_MAX_PAGES: u64 = 512;

/// What CPU faults have brought back in one 2 MiB block since it was
/// last migrated, one bit per 64 KiB block: the density that sizes the
/// next fault-back's neighbourhood ([`neighbourhood`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct FaultMarks {
    /// Blocks brought back whole (as part of a neighbourhood).
    pub whole: u32,
    /// Blocks where an isolated fault brought back its page alone.
    pub single: u32,
}

/// The neighbourhood a CPU fault on `page` brings back, chosen by how
/// densely the CPU has been faulting around it.
///
/// - An *isolated* fault — nothing brought back in its 64 KiB block yet,
///   and no whole block just below it — brings back its page alone: a
///   sparse reader pays for the page it reads and nothing else (the
///   `iterate` scenario's 1 % read).
/// - A second fault in a block, or one just above blocks brought back
///   whole, brings back blocks: `run` is the number of 64 KiB blocks
///   immediately below the faulting one that earlier faults brought back
///   whole (in its 2 MiB block, and on into the 2 MiB block below,
///   `below`, when every block under it in its own was), and the
///   neighbourhood is the faulting block and the next ones, `run + 1`
///   rounded up to a power of two of them, within the 2 MiB block.
///
/// A reader sweeping a migrated buffer brings back a page, then 64 KiB,
/// 128 KiB, 256 KiB, … 1 MiB (7 faults for its first 2 MiB instead of
/// 512), then each further 2 MiB block whole (1 fault each). (NVIDIA UVM
/// grows its prefetch region from the occupancy of a bitmap tree,
/// `uvm_perf_prefetch.c`; a CPU faults one page at a time, so the density
/// of *earlier faults* is the signal here.) Returns the range and the
/// 2 MiB block's marks with the range's added.
fn neighbourhood(page: VirtAddr, marks: FaultMarks, below: u32) -> Option<(VaRange, FaultMarks)> {
    let big = FAULT_BACK_MAX_PAGES * PAGE_SIZE;
    let small = FAULT_BACK_PAGES * PAGE_SIZE;
    let base = page.0 & !(big - 1);
    let sub = ((page.0 - base) / small) as u32;
    let faulted = marks.whole;
    let mut run = 0;
    while run < sub && faulted & (1 << (sub - 1 - run)) != 0 {
        run += 1;
    }
    if run == sub {
        // Every block under it in its own 2 MiB block: go on below.
        run += below.leading_ones();
    }
    if run == 0 && (marks.single | marks.whole) & (1 << sub) == 0 {
        // Isolated: the page alone.
        let r = VaRange::from_start_len(page.page_down(), PAGE_SIZE).ok()?;
        return Some((
            r,
            FaultMarks {
                single: marks.single | 1 << sub,
                ..marks
            },
        ));
    }
    let blocks = (run + 1).next_power_of_two().min(32 - sub);
    let r = VaRange::from_start_len(
        VirtAddr(base + u64::from(sub) * small),
        u64::from(blocks) * small,
    )
    .ok()?;
    let mask = if blocks >= 32 {
        u32::MAX
    } else {
        ((1u32 << blocks) - 1) << sub
    };
    Some((
        r,
        FaultMarks {
            whole: faulted | mask,
            ..marks
        },
    ))
}

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// Migrates `range` to the device: afterwards the device holds the
    /// only copy of its pages, launches neither scan nor write them back,
    /// and the first CPU access to a page (any thread, read or write)
    /// waits while the mirror gives it back. Returns pages migrated.
    ///
    /// Errors, with nothing moved: [`MirrorError::MigrationUnsupported`]
    /// where the kernel lacks what it needs (no userfaultfd, no
    /// `EVENT_REMAP` or `WP_ASYNC`), for memory other than private
    /// anonymous memory (shared memory keeps its pages when the CPU's copy
    /// is discarded, as in the kernel's `migrate_shared`), for a zero-copy
    /// device, with several mirrors attached, or for a range the pool
    /// cannot hold ([`MirrorError::PoolExhausted`]);
    /// [`MirrorError::WrongProcess`] in a forked child.
    ///
    /// ```no_run
    /// # use hmm_core::mirror::{Mirror, MirrorConfig};
    /// # fn demo<B: hmm_core::mirror::backend::Backend>(m: &Mirror<B>, data: &mut Vec<f32>) -> Result<(), hmm_core::mirror::MirrorError> {
    /// let range = hmm_core::VaRange::of_slice(data.as_slice())?;
    /// m.migrate_to_device(range)?; // the device holds the only copy
    /// // ... launches on `data` ...
    /// let first = data[0]; // this read brings its page back
    /// m.migrate_to_host(range)?; // or bring it all back at once
    /// # let _ = first; Ok(()) }
    /// ```
    pub fn migrate_to_device(&self, range: VaRange) -> Result<u64, MirrorError> {
        self.migrate(range, false)
    }

    /// Makes `range` exclusive to the device, for device atomics (the
    /// kernel's `make_device_exclusive`): its pages are migrated as by
    /// [`Mirror::migrate_to_device`], so no CPU access can see a value
    /// older than the device's, and the first CPU access to a page — any
    /// thread, read or write — *revokes* the device's access to that page:
    /// the device's data comes back to the CPU, the device's entry for the
    /// page is invalidated (its next access faults and fetches the CPU's
    /// copy), and only then does the CPU access proceed. Other exclusive
    /// pages nearby stay exclusive. A protection change
    /// ([`Mirror::protection_changed`]) and `fork()` revoke too, as in
    /// the kernel. Returns pages made exclusive; errors as
    /// [`Mirror::migrate_to_device`] (zero-copy devices: nothing can trap
    /// reads of present pages there, so [`MirrorError::MigrationUnsupported`]).
    ///
    /// ```no_run
    /// # use hmm_core::mirror::Mirror;
    /// # fn demo<B: hmm_core::mirror::backend::Backend>(m: &Mirror<B>, counters: &mut Vec<u32>) -> Result<(), hmm_core::mirror::MirrorError> {
    /// let range = hmm_core::VaRange::of_slice(counters.as_slice())?;
    /// m.make_exclusive(range)?;
    /// // ... launches doing atomics on `counters` ...
    /// assert_eq!(m.exclusive_in(range)?, range.pages());
    /// let total: u32 = counters[..1024].iter().sum(); // revokes the first page
    /// assert_eq!(m.exclusive_in(range)?, range.pages() - 1);
    /// # let _ = total; Ok(()) }
    /// ```
    pub fn make_exclusive(&self, range: VaRange) -> Result<u64, MirrorError> {
        self.migrate(range, true)
    }

    /// Pages of `range` the device holds exclusively now
    /// ([`Mirror::make_exclusive`]; the kernel test's
    /// `HMM_DMIRROR_CHECK_EXCLUSIVE` asks the same). Errors:
    /// [`MirrorError::WrongProcess`] in a forked child, a typed error for a
    /// bad range.
    pub fn exclusive_in(&self, range: VaRange) -> Result<u64, MirrorError> {
        self.same_process()?;
        let range = range.page_cover()?;
        let dev = self.inner.lock();
        Ok(dev
            .exclusive
            .range(range.start()..range.end())
            .filter(|va| is_migrated(&*dev.res, **va))
            .count() as u64)
    }

    /// [`Mirror::migrate_to_device`], or [`Mirror::make_exclusive`].
    fn migrate(&self, range: VaRange, exclusive: bool) -> Result<u64, MirrorError> {
        let pieces = self.migration_pieces(range)?;
        let _serial = lock(&self.inner.launch);
        let mut n = 0;
        for piece in pieces {
            n += self.migrate_piece(piece, exclusive)?;
        }
        Ok(n)
    }

    /// After a launch (the launch lock held): the pages it touched in
    /// ranges advised [`Advice::PreferDevice`](super::Advice::PreferDevice)
    /// migrate, run by run; a run that cannot is counted and named in a
    /// warning, and stays where it is.
    pub(super) fn migrate_preferred(&self) {
        let runs: Vec<VaRange> = {
            let dev = self.inner.lock();
            if dev.prefer_device.is_empty() {
                return;
            }
            let mut runs: Vec<VaRange> = Vec::new();
            for r in &dev.prefer_device {
                for (va, _) in dev.table.mapped_in(*r) {
                    if is_migrated(&*dev.res, va) {
                        continue;
                    }
                    match runs.last_mut() {
                        Some(last) if last.end() == va => {
                            if let Ok(longer) =
                                VaRange::new(last.start(), VirtAddr(va.0 + PAGE_SIZE))
                            {
                                *last = longer;
                            }
                        }
                        _ => runs.extend(VaRange::from_start_len(va, PAGE_SIZE)),
                    }
                }
            }
            runs
        };
        for run in runs {
            let r = self.migration_pieces(run).and_then(|pieces| {
                pieces
                    .into_iter()
                    .try_for_each(|p| self.migrate_piece(p, false).map(|_| ()))
            });
            if let Err(e) = r {
                Counters::add(&self.inner.counters.preferred_refused, 1);
                tracing::warn!(target: "hmm_rs", "{run:?} is advised PreferDevice but stays on the CPU: {e}");
            }
        }
    }

    /// The checks of [`Mirror::migrate_to_device`]; `range` split at
    /// mapping boundaries.
    fn migration_pieces(&self, range: VaRange) -> Result<Vec<VaRange>, MirrorError> {
        self.same_process()?;
        let range = range.page_cover()?.user()?;
        let inner = &*self.inner;
        // Events the kernel posted before this call (an `munmap` that
        // returned, whose event is read but not yet handled) are handled
        // first: one handled after the move would take the range for the
        // old mapping's and discard the only copy of the new one's pages
        // (conformance `migrate_remap_fault`, a fresh mapping at the
        // address of one just unmapped).
        if !inner.host.settle() {
            return Err(MirrorError::MigrationUnsupported(
                "the kernel's events were not handled within a second; nothing moved".into(),
            ));
        }
        inner
            .host
            .migration_support()
            .map_err(MirrorError::MigrationUnsupported)?;
        if inner.host.mirrors_attached() > 1 {
            return Err(MirrorError::MigrationUnsupported(
                "several mirrors are attached: a migrated page can have one owner".into(),
            ));
        }
        {
            let dev = inner.lock();
            dev.health.check()?;
            dev.res.check_migrate()?;
            let (_, capacity) = dev.res.usage();
            if range.pages() > capacity {
                return Err(MirrorError::PoolExhausted {
                    needed: range.pages(),
                    capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
                });
            }
        }
        // One mapping at a time (an `mremap` moves within one VMA).
        inner.host.forget_mappings(range);
        let mut pieces = Vec::new();
        let mut at = range.start();
        while at < range.end() {
            let m = inner.host.lookup(at)?.ok_or(MirrorError::DeviceFault {
                addr: at,
                write: true,
                reason: super::AccessError::Unmapped,
            })?;
            let anon = match &m.kind {
                MappingKind::Anonymous => true,
                MappingKind::Special(s) => s == "[heap]" || s.starts_with("[anon:"),
                MappingKind::File { .. } => false,
            };
            if m.shared || !anon {
                return Err(MirrorError::MigrationUnsupported(format!(
                    "{at} is not private anonymous memory ({}{:?}): shared and file pages keep their CPU copy",
                    if m.shared { "shared " } else { "" },
                    m.kind
                )));
            }
            if !(m.read && m.write) {
                return Err(MirrorError::MigrationUnsupported(format!(
                    "{at} is not readable and writable"
                )));
            }
            let end = m.range.end().min(range.end());
            pieces.push(VaRange::new(at, end)?);
            at = end;
        }
        Ok(pieces)
    }

    /// [`Mirror::migrate_to_device`] of a range within one mapping (the
    /// launch lock held).
    fn migrate_piece(&self, range: VaRange, exclusive: bool) -> Result<u64, MirrorError> {
        let inner = &*self.inner;
        {
            let _checked = crate::cpu::safecopy::CheckScope::open();
            inner.lock().res.begin_round();
            let epoch = inner.host.new_epoch();
            self.fetch(range, true, epoch)?;
        }
        // No fork between the move and the marks: the prepare-fork handler
        // gives back what is marked (`cpu::fork_prep`). Taken before the
        // driver lock, as the handler does.
        let _no_fork = crate::cpu::fork_prep::NoFork::hold();
        let mut dev = inner.lock_idle();
        // Under the driver lock from here to the marks: no entry of the
        // range can leave meanwhile (destructive events queue behind it).
        let resident = dev
            .table
            .mapped_in(range)
            .filter(|(_, p)| p.writable())
            .count() as u64;
        if resident != range.pages() {
            return Err(MirrorError::MigrationUnsupported(format!(
                "{} of {} pages of {range:?} could not be made resident writable",
                range.pages() - resident,
                range.pages()
            )));
        }
        let owner: std::sync::Weak<dyn FaultBack> =
            std::sync::Arc::downgrade(&self.inner) as std::sync::Weak<dyn FaultBack>;
        let detached = inner.host.detach_for_migration(range, owner)?;
        if !dev.armed.contains(&range) {
            dev.armed.push(range);
        }
        let (mut cx, res) = dev.parts(inner);
        match res.adopt_migrated(&mut cx, range, detached.bytes()) {
            Ok(n) => {
                Counters::add(&inner.counters.migrated_out, n);
                // Fault density starts afresh in the 2 MiB blocks touched.
                let big = FAULT_BACK_MAX_PAGES * PAGE_SIZE;
                let (lo, hi) = (range.start().0 & !(big - 1), range.end().0);
                dev.faulted_back.retain(|b, _| *b < lo || *b >= hi);
                // Every block's entry exists from now on: the event
                // monitor's reader edits marks in place, never inserts.
                for b in (lo..hi).step_by(big as usize) {
                    dev.faulted_back.insert(b, FaultMarks::default());
                }
                let held = dev.res.migrated_in(range);
                let old: Vec<VirtAddr> = dev
                    .exclusive
                    .range(range.start()..range.end())
                    .copied()
                    .collect();
                for va in old {
                    dev.exclusive.remove(&va);
                }
                if exclusive {
                    let stale: Vec<VirtAddr> = dev
                        .exclusive
                        .iter()
                        .copied()
                        .filter(|va| !is_migrated(&*dev.res, *va))
                        .collect();
                    for va in stale {
                        dev.exclusive.remove(&va);
                    }
                    dev.exclusive.extend(held);
                }
                Ok(n)
            }
            Err(e) => {
                // The bytes moved out are the only copy of the pages not
                // migrated before: back they go (the others were holes,
                // and their data is on the device).
                for (k, va) in range.page_addrs().enumerate() {
                    let page = VaRange::from_start_len(va, PAGE_SIZE)?;
                    if res.migrated_in(page).is_empty() {
                        let bytes =
                            &detached.bytes()[k * PAGE_SIZE as usize..][..PAGE_SIZE as usize];
                        let _ = inner.host.give_back(va, bytes);
                    }
                }
                Err(e)
            }
        }
    }

    /// Brings the migrated pages of `range` back to the CPU (they stay on
    /// the device as ordinary copies). Returns pages given back. Waits for
    /// a running launch. Errors: [`MirrorError::DeviceLost`] if the device
    /// cannot give its data back (those pages stay migrated, and a CPU
    /// access to them is poisoned); [`MirrorError::WrongProcess`] in a
    /// forked child.
    pub fn migrate_to_host(&self, range: VaRange) -> Result<u64, MirrorError> {
        self.same_process()?;
        let range = range.page_cover()?;
        let inner = &*self.inner;
        // Unmaps that returned are handled first, so the armed ranges they
        // took are no longer armed when the disarming below looks (best
        // effort: `disarm` touches only what is still armed anyway).
        let _ = inner.host.settle();
        let _serial = lock(&inner.launch);
        let mut dev = inner.lock_idle();
        let (mut cx, res) = dev.parts(inner);
        let pages = res.migrated_in(range);
        let n = if pages.is_empty() {
            0
        } else {
            res.give_back(&mut cx, &pages)?
        };
        // Pages brought back here stay on the device as ordinary copies,
        // exclusive or not.
        let marks: Vec<VirtAddr> = dev
            .exclusive
            .range(range.start()..range.end())
            .copied()
            .collect();
        for va in marks {
            if !is_migrated(&*dev.res, va) {
                dev.exclusive.remove(&va);
            }
        }
        // Armed ranges with nothing migrated left: ordinary memory again
        // (a CPU write while one is re-registered may go unseen, so the
        // device's copies there are dropped, device writes written back).
        let armed = std::mem::take(&mut dev.armed);
        let mut result = Ok(n);
        for a in armed {
            if a.overlaps(range) && dev.res.migrated_in(a).is_empty() {
                inner.host.disarm(a);
                let (mut cx, res) = dev.parts(inner);
                if let Err(e) = super::state::zap(&mut cx, res, a, true) {
                    result = result.and(Err(e));
                }
            } else {
                dev.armed.push(a);
            }
        }
        result
    }
}

impl<B: Backend, H: HostSide> Inner<B, H> {
    /// Teardown: every migrated page goes back to the CPU; one that cannot
    /// (a lost device) is poisoned, never left to read as zeros.
    pub(super) fn give_everything_back(&self) {
        self.give_all_back(true);
    }

    /// Gives every migrated page back (poisoning those that cannot come
    /// back); at teardown (`teardown`) disarms every armed range, before a
    /// fork revokes the device's exclusive pages.
    fn give_all_back(&self, teardown: bool) {
        let mut dev = self.lock_idle();
        let exclusive = std::mem::take(&mut dev.exclusive);
        let (mut cx, res) = dev.parts(self);
        let all = res.migrated_in(VaRange::everything());
        if !all.is_empty() && res.give_back(&mut cx, &all).is_err() {
            for va in res.migrated_in(VaRange::everything()) {
                if let Ok(p) = VaRange::from_start_len(va, PAGE_SIZE) {
                    let _ = self.host.poison(p);
                }
            }
        }
        if teardown {
            for a in std::mem::take(&mut dev.armed) {
                self.host.disarm(a);
            }
            return;
        }
        let revoke: Vec<VirtAddr> = exclusive
            .into_iter()
            .filter(|va| all.binary_search(va).is_ok() && !is_migrated(&*dev.res, *va))
            .collect();
        if !revoke.is_empty() {
            let (mut cx, res) = dev.parts(self);
            if let Err(e) = super::state::zap_pages(&mut cx, res, &revoke) {
                // The pages are back on the CPU; entries left on the device
                // are ordinary copies, which write tracking keeps honest.
                tracing::error!(target: "hmm_rs", "revoking exclusive pages before fork failed: {e}");
            }
        }
    }
}

impl<B: Backend, H: HostSide> Inner<B, H> {
    /// Whether a queued destructive event (discarded, unmapped or moved
    /// away while the driver lock was held) covers `page`: it then reads
    /// as zeros, said without waiting for that lock. Its holder may be the
    /// thread waiting on this very fault — a launch's write-back storing
    /// into a page the program discarded during the launch, in a range
    /// armed for migration (`discard_during_launch.rs` hung here). The
    /// monitor's handler queued the event before it passed this fault on,
    /// so the check cannot miss it.
    fn zap_queued(&self, page: VirtAddr) -> bool {
        lock(&self.pending).iter().any(|z| z.range.contains(page))
    }

    /// [`FaultBack::fault_back`] once the driver lock is held with the
    /// device idle: gives `page` back first (its `UFFDIO_COPY` wakes the
    /// waiting thread), then the rest of its neighbourhood
    /// ([`neighbourhood`]). `t`: when the request arrived, for the
    /// latency counter.
    fn serve_fault(
        &self,
        mut dev: MutexGuard<'_, Dev<B, H>>,
        page: VirtAddr,
        t: Instant,
    ) -> FaultBackOutcome {
        let big = page.0 & !(FAULT_BACK_MAX_PAGES * PAGE_SIZE - 1);
        let faulted = dev.faulted_back.get(&big).copied().unwrap_or_default();
        let below = big
            .checked_sub(FAULT_BACK_MAX_PAGES * PAGE_SIZE)
            .and_then(|b| dev.faulted_back.get(&b))
            .map_or(0, |m| m.whole);
        let Some((block, faulted)) = neighbourhood(page, faulted, below) else {
            return FaultBackOutcome::NotHeld;
        };
        // An exclusive page comes back alone and is revoked; exclusive
        // neighbours stay exclusive (the kernel revokes page by page).
        let exclusive: Vec<VirtAddr> = dev
            .exclusive
            .range(block.start()..block.end())
            .copied()
            .collect();
        let revoke = exclusive.contains(&page);
        let (mut cx, res) = dev.parts(self);
        let held = res.migrated_in(block);
        if !held.contains(&page) {
            return FaultBackOutcome::NotHeld;
        }
        // The faulting page alone first: the thread waiting on it resumes
        // while its neighbours are read back and installed.
        if res.give_back(&mut cx, &[page]).is_err() {
            return FaultBackOutcome::Lost;
        }
        let Ok(p) = VaRange::from_start_len(page, PAGE_SIZE) else {
            return FaultBackOutcome::Lost;
        };
        if !dev.res.migrated_in(p).is_empty() {
            // Skipped: a destructive event queued meanwhile covers it.
            // Applied now, it drops the page (discarded: a zero page is
            // what the CPU reads), or re-keys it elsewhere (moved).
            self.drain_pending(&mut dev);
            if !dev.res.migrated_in(p).is_empty() {
                return FaultBackOutcome::Lost;
            }
            return FaultBackOutcome::NotHeld;
        }
        if !revoke {
            let rest: Vec<VirtAddr> = held
                .into_iter()
                .filter(|va| *va != page && !exclusive.contains(va))
                .collect();
            if !rest.is_empty() {
                let (mut cx, res) = dev.parts(self);
                // A failure here is latched (the device is lost); the
                // pages stay held and their own faults are answered
                // `Lost` (poisoned), never zero-filled.
                let _ = res.give_back(&mut cx, &rest);
            }
            dev.faulted_back.insert(big, faulted);
        } else {
            // The device's entry goes: its next access faults and fetches
            // the CPU's copy (which write tracking follows from here).
            dev.exclusive.remove(&page);
            let (mut cx, res) = dev.parts(self);
            if let Err(e) = super::state::zap_pages(&mut cx, res, &[page]) {
                // The page is back on the CPU either way; an entry left on
                // the device is an ordinary copy that write tracking keeps
                // honest.
                tracing::error!(target: "hmm_rs", "revoking exclusive page {page} failed: {e}");
            }
            Counters::add(&self.counters.exclusive_revoked, 1);
        }
        Counters::add(&self.counters.fault_backs, 1);
        Counters::add(&self.counters.fault_back_span, block.pages());
        Counters::add_since(&self.counters.fault_back_ns, t);
        FaultBackOutcome::Served
    }
}

/// Most CPU faults the event monitor's reader answers
/// ([`Inner::answer_now`]) before a holder of the driver lock settles them
/// ([`Inner::settle_answered`]); with that many waiting, faults go the
/// handler's way.
pub(super) const ANSWERED_CAP: usize = 256;

impl<B: Backend, H: HostSide> Inner<B, H> {
    /// [`FaultBack::fault_back_now`]: on the event monitor's *reader*, as
    /// it reads the fault, with no event before it unhandled. Installs the
    /// faulting page from its pool slot and nothing else, touching only
    /// what needs neither waiting nor the allocator:
    ///
    /// - the reader reads the events every other thread waits on, so every
    ///   lock here is try-locked, and the device must be host-synchronous
    ///   ([`Backend::host_synchronous`]): the page is read from its slot
    ///   into a buffer of the mirror's own (`Dev::answer_page`), with no
    ///   submission running;
    /// - it must not call `malloc` or `free` either: a thread trimming the
    ///   heap holds an allocator lock while it waits for its `munmap` /
    ///   `madvise` event to be read (`cpu::handoff`, "Why two threads").
    ///   So the mirror's books — the page's migrated mark, its twin, the
    ///   rest of its neighbourhood — are left to the next holder of the
    ///   driver lock ([`Inner::settle_answered`], run by every acquisition
    ///   after the queued zaps and moves), through a list whose room was
    ///   reserved up front (`Dev::answered`, [`ANSWERED_CAP`]), and the
    ///   density marks are edited in place (their 2 MiB entries exist
    ///   from the migration on).
    ///
    /// Until then the page is on the CPU *and* still marked migrated. That
    /// is safe because nothing acts on the mark before settling: every
    /// submission, migration, give-back, eviction and teardown takes the
    /// driver lock, which settles first; a discard or unmap of the page is
    /// applied (or queued) before the list is settled, and a settled entry
    /// whose page is no longer marked is skipped; a move re-keys the list.
    ///
    /// `None` leaves everything as it was: the fault goes on to the
    /// handler. `Some((Served, more))`: the thread is woken; `more` asks
    /// the handler to see the fault too, so the neighbourhood comes back
    /// soon (the settling does it) rather than at the next acquisition.
    fn answer_now(&self, page: VirtAddr) -> Option<(FaultBackOutcome, bool)> {
        if !self.backend.host_synchronous() {
            return None;
        }
        let t = Instant::now();
        let mut dev = crate::sync::try_lock(&self.dev)?;
        if dev.inflight.is_some_and(|s| !self.backend.is_complete(s))
            || dev.answered.len() >= dev.answered.capacity()
            || dev.exclusive.contains(&page)
        {
            return None;
        }
        let big = page.0 & !(FAULT_BACK_MAX_PAGES * PAGE_SIZE - 1);
        let marks = *dev.faulted_back.get(&big)?;
        let below = big
            .checked_sub(FAULT_BACK_MAX_PAGES * PAGE_SIZE)
            .and_then(|b| dev.faulted_back.get(&b))
            .map_or(0, |m| m.whole);
        let (block, marks) = neighbourhood(page, marks, below)?;
        let slot = dev.res.migrated_slot(&dev.table, page)?;
        let batch = [DeviceToHost {
            slot,
            dst: dev.answer_page.as_mut_ptr(),
        }];
        // SAFETY: `dst` is the mirror's own 4 KiB answer buffer, held
        // mutably (under the driver lock) and alive for the call; no
        // submission runs (checked above, under the driver lock, which no
        // new submission starts without). The device is host-synchronous:
        // the copy is host code on this thread.
        unsafe { self.backend.copy_to_host(&batch) }.ok()?;
        let data = &dev.answer_page[..];
        // Held across the install, as in a give-back under the lock: a
        // discard or move of the page handled meanwhile queued its zap
        // here (the driver lock is held), and the page must then not be
        // given back from this copy.
        let queued = crate::sync::try_lock(&self.pending)?;
        if queued.iter().any(|z| z.range.contains(page)) {
            return None;
        }
        match self.host.give_back(page, data) {
            GiveBack::Installed | GiveBack::Present => {}
            // Refused for now (a layout event this thread must read
            // first), or the memory is gone: the handler's turn.
            GiveBack::Busy | GiveBack::Gone => return None,
        }
        drop(queued);
        if let Some(m) = dev.faulted_back.get_mut(&big) {
            *m = marks;
        }
        // Within the capacity reserved at creation: no allocation.
        dev.answered.push((page, block));
        Counters::add(&self.counters.fault_backs, 1);
        Counters::add(&self.counters.fault_backs_on_reader, 1);
        Counters::add(&self.counters.fault_back_span, block.pages());
        Counters::add_since(&self.counters.fault_back_ns, t);
        Some((FaultBackOutcome::Served, block.pages() > 1))
    }

    /// Settles the faults the reader answered ([`Inner::answer_now`]): for
    /// each, gives back what is still migrated in its neighbourhood — the
    /// page itself first, which is found present and so only has its mark
    /// and twin updated — except exclusive pages. Run by every holder of
    /// the driver lock, after the queued zaps and moves
    /// ([`Inner::drain_pending`]): a page discarded since is no longer
    /// marked and is skipped; a moved one was re-keyed.
    pub(super) fn settle_answered(&self, dev: &mut Dev<B, H>) {
        let answered: Vec<(VirtAddr, VaRange)> = dev.answered.drain(..).collect();
        for (page, block) in answered {
            {
                let (mut cx, res) = dev.parts(self);
                if res.settle_given(&mut cx, page).is_err() {
                    // The twin could not be read: the usual give-back
                    // (the page is found present; it retries the read and
                    // latches a lost device).
                    let _ = res.give_back(&mut cx, &[page]);
                }
            }
            if block.pages() <= 1 {
                continue;
            }
            let held: Vec<VirtAddr> = dev
                .res
                .migrated_in(block)
                .into_iter()
                .filter(|va| !dev.exclusive.contains(va))
                .collect();
            if held.is_empty() {
                continue;
            }
            let (mut cx, res) = dev.parts(self);
            // A failure is latched (the device is lost); the pages stay
            // held and their faults are answered `Lost` (poisoned).
            let _ = res.give_back(&mut cx, &held);
        }
    }
}

/// Whether `va`'s page is migrated (held only on the device).
fn is_migrated<B: Backend, H: HostSide>(
    res: &dyn super::residency::Residency<B, H>,
    va: VirtAddr,
) -> bool {
    VaRange::from_start_len(va, PAGE_SIZE).is_ok_and(|p| !res.migrated_in(p).is_empty())
}

impl<B: Backend, H: HostSide> FaultBack for Inner<B, H> {
    fn fault_back(&self, page: VirtAddr) -> FaultBackOutcome {
        let t = Instant::now();
        let page = page.page_down();
        if self.zap_queued(page) {
            return FaultBackOutcome::NotHeld;
        }
        // Waits for a running launch: the device may be writing the page.
        let dev = self.lock_idle();
        self.serve_fault(dev, page, t)
    }

    fn try_fault_back(&self, page: VirtAddr) -> Option<FaultBackOutcome> {
        let t = Instant::now();
        let page = page.page_down();
        if self.zap_queued(page) {
            return Some(FaultBackOutcome::NotHeld);
        }
        let dev = self.try_lock_idle()?;
        Some(self.serve_fault(dev, page, t))
    }

    fn fault_back_now(&self, page: VirtAddr) -> Option<(FaultBackOutcome, bool)> {
        self.answer_now(page.page_down())
    }

    fn before_fork(&self) {
        self.give_all_back(false);
    }

    fn moved(&self, old: VaRange, to: VirtAddr) {
        Inner::moved(self, old, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: u64 = FAULT_BACK_MAX_PAGES * PAGE_SIZE;
    const SMALL: u64 = FAULT_BACK_PAGES * PAGE_SIZE;

    /// Sub-block `k` of the 2 MiB block at `base`: (start, 64 KiB blocks)
    /// of the neighbourhood of a fault on page `page`, with only whole
    /// blocks marked before.
    fn hood(base: u64, page: u64, faulted: u32) -> (u64, u64, u32) {
        hood_below(base, page, faulted, 0)
    }

    fn marks(whole: u32) -> FaultMarks {
        FaultMarks { whole, single: 0 }
    }

    fn hood_below(base: u64, page: u64, faulted: u32, below: u32) -> (u64, u64, u32) {
        let (r, f) =
            neighbourhood(VirtAddr(base + page * PAGE_SIZE), marks(faulted), below).expect("range");
        assert!(r.len() >= SMALL, "a page alone: {r:?}");
        ((r.start().0 - base) / SMALL, r.len() / SMALL, f.whole)
    }

    #[test]
    fn a_sweep_doubles_the_neighbourhood_within_its_2mib_block() {
        let base = 0x7f00_0000_0000 + 5 * BIG;
        // The sweep's first fault is isolated: its page alone.
        let (r, m) =
            neighbourhood(VirtAddr(base + 3 * PAGE_SIZE), FaultMarks::default(), 0).expect("range");
        assert_eq!(
            r,
            VaRange::from_start_len(VirtAddr(base + 3 * PAGE_SIZE), PAGE_SIZE).unwrap()
        );
        assert_eq!(
            m,
            FaultMarks {
                whole: 0,
                single: 1
            }
        );
        // The next, in the same 64 KiB block: blocks from there on.
        let (r, m) = neighbourhood(VirtAddr(base + 4 * PAGE_SIZE), m, 0).expect("range");
        assert_eq!((r.start().0, r.len()), (base, SMALL));
        let mut faulted = m.whole;
        let mut page = FAULT_BACK_PAGES;
        let mut got = Vec::new();
        while page < FAULT_BACK_MAX_PAGES {
            let (start, blocks, f) = hood(base, page, faulted);
            got.push((start, blocks));
            faulted = f;
            page = (start + blocks) * FAULT_BACK_PAGES;
        }
        assert_eq!(got, [(1, 2), (3, 4), (7, 8), (15, 16), (31, 1)]);
        assert_eq!(faulted, u32::MAX);
        // The next 2 MiB block, its lower neighbour swept: whole at once.
        assert_eq!(hood_below(base + BIG, 9, 0, faulted), (0, 32, u32::MAX));
        // Only the top blocks of the one below: their count carries over.
        let (start, blocks, _) = hood_below(base + BIG, 0, 0, 0b11 << 30);
        assert_eq!((start, blocks), (0, 4));
        // A gap in the block's own bitmap stops the run there.
        assert_eq!(
            hood_below(base + BIG, 2 * FAULT_BACK_PAGES, 0b10, u32::MAX).1,
            2
        );
    }

    #[test]
    fn sparse_faults_bring_back_their_page_alone() {
        let base = 0x10_0000_0000;
        let mut m = FaultMarks::default();
        // Every other 64 KiB block: nothing just below was brought back.
        for k in (0..32u64).step_by(2) {
            let at = VirtAddr(base + (k * FAULT_BACK_PAGES + 7) * PAGE_SIZE);
            let (r, next) = neighbourhood(at, m, 0).expect("range");
            assert_eq!(
                r,
                VaRange::from_start_len(at, PAGE_SIZE).unwrap(),
                "block {k}"
            );
            m = next;
        }
        assert_eq!(
            m,
            FaultMarks {
                whole: 0,
                single: 0x5555_5555
            }
        );
        // A second fault in one of those blocks: the block.
        let (r, m) = neighbourhood(VirtAddr(base + 2 * SMALL + PAGE_SIZE), m, 0).expect("range");
        assert_eq!((r.start().0, r.len()), (base + 2 * SMALL, SMALL));
        // A fault just above it: run 1 (only the block directly below
        // counts, and 1 below it is not whole).
        let (start, blocks, _) = hood(base, 3 * FAULT_BACK_PAGES, m.whole);
        assert_eq!((start, blocks), (3, 2));
    }

    #[test]
    fn the_last_block_of_a_2mib_block_never_crosses_it() {
        let base = 0x20_0000_0000;
        let (start, blocks, f) = hood(base, 511, (1 << 31) - 1);
        assert_eq!((start, blocks), (31, 1));
        assert_eq!(f, u32::MAX);
        // Address-space top: no overflow, still one 2 MiB block's worth.
        let top = !(BIG - 1) - BIG;
        assert!(neighbourhood(VirtAddr(top + BIG - 1), FaultMarks::default(), u32::MAX).is_some());
        assert!(neighbourhood(VirtAddr(top + BIG - 1), FaultMarks::default(), 0).is_some());
    }
}
