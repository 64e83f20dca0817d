//! A launch, step by step ([`Mirror::launch`]).
//!
//! 1. **Sync point (start).** CPU writes to mirrored pages since the last
//!    sync point become `CpuWrite` invalidations of exactly those pages, so
//!    the device never reads a copy older than the CPU's data at launch.
//!    Then, with [`ForeignWriters::Check`](super::ForeignWriters::Check),
//!    the device-resident pages of shared and file-backed mappings are
//!    re-hashed, and those another writer changed (another process,
//!    `pwrite()`; write tracking cannot see them) become `CpuWrite`
//!    invalidations too (`mirror::foreign`).
//! 2. **Submit** every invocation (after the queued entry writes are
//!    flushed: a device that cannot clear entries runs nothing). An
//!    invocation that touches an address whose entry is missing (or
//!    read-only, for a write) stops and leaves a fault record.
//! 3. **Fault service** (`fault_service`) of the validated records.
//! 4. **Replay** only the invocations that faulted, until none does.
//! 5. **Sync point (end).** Device-dirty pages are written back, so when
//!    `launch` returns the CPU sees every device write — or the launch
//!    returns the error that kept it from doing so. Memory that is gone is
//!    skipped; memory that is there but refuses the write (read-only after
//!    an untold `mprotect`) is [`MirrorError::WriteBackRefused`], and the
//!    device keeps that data (entry, slot and twin) until a later
//!    write-back gets through: the next launch tries it before anything
//!    else, and so does [`Mirror::protection_changed`].
//!    [`LaunchReport::pages_out`] counts only pages that reached the CPU.

use std::time::Instant;

use super::args::KernelArgs;
use super::backend::{Backend, InvocationSet, Invocations, PteLoc, MAX_INVOCATIONS};
use super::config::LaunchReport;
use super::error::{AccessError, MirrorError};
use super::faults;
use super::format::Pte;
use super::handle::Mirror;
use super::host_side::HostSide;
use super::stats::Counters;
use crate::addr::{VaRange, VirtAddr};
use crate::notifier::EventKind;
use crate::sync::lock;

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// Runs `kernel` over invocations `0..n` with `args`, servicing device
    /// faults and replaying the invocations that faulted until all have
    /// completed. On return the CPU sees every device write.
    ///
    /// Sync points: at the start, CPU writes since the last sync point are
    /// invalidated (device copies of those pages are dropped), and so are
    /// pages of shared or file-backed mappings that another process or a
    /// syscall changed (found by hash, [`ForeignWriters`]); at the end,
    /// device-dirty pages are written back.
    ///
    /// [`ForeignWriters`]: super::ForeignWriters
    ///
    /// `args` are CPU pointers and scalars, e.g. `(x.as_ptr(),
    /// y.as_mut_ptr(), a)` (see [`KernelArgs`]).
    ///
    /// To submit a launch and wait for it later, with the CPU working
    /// meanwhile: [`Mirror::scope`] ([`Scope::launch`](super::Scope::launch)).
    ///
    /// **Alignment**, the same on every driver: a kernel's 32-bit values
    /// (`u32`, `i32`, `f32`, atomics) must lie at addresses that are
    /// multiples of 4, its 64-bit values (`u64`, pointers) at multiples of
    /// 8. A misaligned access ends the launch with
    /// [`MirrorError::DeviceFault`] `{ reason: AccessError::Misaligned, .. }`
    /// naming its address (the lowest, if several invocations made one);
    /// writes of invocations that completed before it may have reached
    /// the CPU, as with any device fault.
    ///
    /// **Size**: `n` may be anything up to [`Mirror::max_invocations`]
    /// (at most `2^31`, [`MAX_INVOCATIONS`]); more is
    /// [`MirrorError::TooManyInvocations`] before anything is allocated.
    /// `n = 0` is `Ok` and runs nothing. Host memory per launch is about
    /// `n / 8` bytes (bitmaps of incomplete invocations) plus a constant,
    /// whatever the number of invocations that fault.
    pub fn launch(
        &self,
        kernel: &B::Kernel,
        n: u32,
        args: impl KernelArgs,
    ) -> Result<LaunchReport, MirrorError> {
        args.with_words(|words| self.launch_words(kernel, n, words))
    }

    /// The most invocations one [`launch`](Mirror::launch) may have here:
    /// the device's limit ([`Backend::max_invocations`]), at most
    /// [`MAX_INVOCATIONS`] (`2^31`).
    pub fn max_invocations(&self) -> u32 {
        self.inner.backend.max_invocations().min(MAX_INVOCATIONS)
    }

    /// Counts how many of the pages the launch that is ending brought in
    /// on a prediction were accessed by the device — the fetch policy's
    /// speculation
    /// ([`MirrorStats::speculated_used`](super::MirrorStats::speculated_used))
    /// and the ping-pong refresh
    /// ([`MirrorStats::refreshed_used`](super::MirrorStats::refreshed_used),
    /// which also decides whether each refreshed page stays refreshed) —
    /// with one read of their entries for both. The count is advice, not
    /// state: an entry the device cannot read back counts as unused (and a
    /// failing device reports itself through the calls that need it).
    fn count_predictions_used(&self) {
        let inner = &*self.inner;
        let dev = &mut *inner.lock();
        let runs = std::mem::take(&mut dev.spec_runs);
        let mut spec: Vec<VirtAddr> = runs
            .iter()
            .flat_map(|r| dev.table.mapped_in(*r).map(|(va, _)| va))
            .collect();
        spec.sort_unstable();
        spec.dedup();
        let refreshed = dev.ping_pong.refreshed().to_vec();
        // (index into `spec` then `refreshed`, entry) for mapped pages.
        let locs: Vec<(usize, PteLoc)> = spec
            .iter()
            .chain(&refreshed)
            .enumerate()
            .filter_map(|(i, &va)| dev.table.leaf_loc(va).map(|l| (i, l)))
            .collect();
        let mut accessed = vec![false; spec.len() + refreshed.len()];
        if !locs.is_empty() {
            let only: Vec<PteLoc> = locs.iter().map(|&(_, l)| l).collect();
            let mut ptes = Vec::with_capacity(only.len());
            match inner.backend.read_ptes(&only, &mut ptes) {
                Ok(()) => {
                    for (&(i, _), p) in locs.iter().zip(&ptes) {
                        accessed[i] = p.accessed();
                    }
                }
                Err(e) => tracing::debug!(
                    target: "hmm_rs",
                    error = %e,
                    "predicted pages' accessed bits unreadable; counted as unused"
                ),
            }
        }
        let spec_used = accessed[..spec.len()].iter().filter(|&&a| a).count() as u64;
        Counters::add(&inner.counters.speculated_used, spec_used);
        let refreshed_used = dev.ping_pong.launch_end(&accessed[spec.len()..]);
        Counters::add(&inner.counters.refreshed_used, refreshed_used);
    }

    fn launch_words(
        &self,
        kernel: &B::Kernel,
        n: u32,
        args: &[u64],
    ) -> Result<LaunchReport, MirrorError> {
        // A span per launch: the rounds' events below are inside it, so a
        // subscriber sees which launch each belongs to.
        let _span =
            tracing::debug_span!(target: "hmm_rs", "launch", n, args = args.len()).entered();
        self.same_process()?;
        let max = self.max_invocations();
        if n > max {
            return Err(MirrorError::TooManyInvocations { n, max });
        }
        let inner = &*self.inner;
        let _serial = lock(&inner.launch);
        inner.lock().health.check()?;
        // Mirror-wide time counters before the launch: their growth is the
        // launch's copy and entry-write time (`LaunchPhases` docs).
        let copy_in0 = Counters::duration(&inner.counters.copy_in_ns);
        let page_table0 = Counters::duration(&inner.counters.page_table_ns);
        let t_sync = Instant::now();
        // A write-back refused where no caller could be told (an
        // invalidation callback, an eviction) kept its data on the device:
        // try it again first, and report it while it is still refused —
        // before the kernel runs, so nothing is lost and nothing new is
        // written over it.
        if inner.lock().res.has_refused() {
            self.write_back_all()?;
        }
        Counters::add(&inner.counters.launches, 1);
        let mut report = LaunchReport {
            cpu_written_pages: inner.host.sync_point()?,
            ..LaunchReport::default()
        };
        report.foreign_changed_pages = self.foreign_check();
        report.phases.sync_point = t_sync.elapsed();
        inner.lock().res.launch_boundary();
        let res = self
            .fetch_will_need(&mut report)
            .and_then(|()| self.refresh_ping_pong(&mut report))
            .and_then(|()| self.launch_rounds(kernel, n, args, &mut report));
        inner.lock().res.launch_boundary();
        self.count_predictions_used();
        // Whatever happened, invocations that completed may have left dirty
        // pages: the CPU must see them (and a later sync point must not
        // mistake them for stale copies). A write-back failure outranks the
        // launch's own result: it means device writes did not reach the CPU.
        let t_back = Instant::now();
        let written = self.write_back_all();
        if res.is_ok() && written.is_ok() {
            self.migrate_preferred();
        }
        report.phases.write_back = t_back.elapsed();
        report.phases.copy_in =
            Counters::duration(&inner.counters.copy_in_ns).saturating_sub(copy_in0);
        report.phases.page_table =
            Counters::duration(&inner.counters.page_table_ns).saturating_sub(page_table0);
        inner.counters.add_phases(&report.phases);
        res.and(written.map(|n| {
            report.pages_out = n;
            report
        }))
    }

    fn launch_rounds(
        &self,
        kernel: &B::Kernel,
        n: u32,
        args: &[u64],
        report: &mut LaunchReport,
    ) -> Result<(), MirrorError> {
        let inner = &*self.inner;
        let mut replay = InvocationSet::new(0);
        let mut first = true;
        let mut replays = 0u32;
        loop {
            let inv = if first {
                Invocations::All(n)
            } else {
                Invocations::Only(&replay)
            };
            let t_round = Instant::now();
            // Every kernel event caused so far handled, and its zap queued,
            // before the device reads anything: a page discarded while this
            // launch's fault service copied it may hold a torn copy (old
            // bytes and zeros in one word) whose entry only the event's
            // invalidation drops (`HostSpace::settle`). Taking the driver
            // lock below then applies any zap the handler had to queue.
            if !inner.host.settle() {
                tracing::warn!(
                    target: "hmm_rs",
                    "kernel events still unhandled after 1 s; submitting anyway"
                );
            }
            let id = {
                let mut dev = inner.lock();
                inner.flush_or_fail(&mut dev)?;
                if inner.backend.rounds_are_costly() {
                    let slots = dev.res.read_back_candidates();
                    if !slots.is_empty() {
                        inner.backend.read_back_with_next_launch(&slots);
                    }
                }
                let id = inner.backend.launch(kernel, inv, args);
                report.phases.submit += t_round.elapsed();
                let id = id?;
                dev.inflight = Some(id);
                id
            };
            report.submissions += 1;
            Counters::add(&inner.counters.submissions, 1);
            let t_wait = Instant::now();
            let waited = inner.backend.wait(id, None);
            report.phases.wait += t_wait.elapsed();
            // Forget the submission before taking its outcome, so no
            // callback asks the backend about an id whose outcome is gone.
            {
                let mut dev = inner.lock();
                dev.inflight = None;
                // A failure stays queued; the next submission's flush stops
                // the launch if it persists.
                inner.flush_quietly(&mut dev);
            }
            let t_read = Instant::now();
            let outcome = inner.backend.take_outcome(id);
            report.phases.read_back += t_read.elapsed();
            waited?;
            let mut outcome = outcome?;
            if outcome.incomplete.is_empty() && outcome.incomplete.out_of_range() == 0 {
                break;
            }
            if replays >= inner.cfg.max_replays {
                return Err(MirrorError::NoProgress { replays });
            }
            // Replay only invocations that were submitted in this round: a
            // device reporting others (garbage) must not make us run
            // invocations twice or outside 0..n.
            let before = outcome.incomplete.len() as u64 + outcome.incomplete.out_of_range();
            if first {
                outcome.incomplete.retain(|i| i < n);
            } else {
                outcome.incomplete.retain(|i| replay.contains(i));
            }
            let bogus_ids = before - outcome.incomplete.len() as u64;
            Counters::add(&inner.counters.garbage_faults, bogus_ids);
            if outcome.incomplete.is_empty() {
                break;
            }
            let mut pf = Vec::new();
            let garbage = faults::validate(&outcome.faults, &outcome.incomplete, &mut pf);
            Counters::add(&inner.counters.garbage_faults, garbage);
            // A misaligned access is a kernel bug, not a page to map: the
            // launch ends naming the lowest such address.
            if let Some(f) = pf.iter().filter(|f| f.misaligned).min_by_key(|f| f.addr) {
                return Err(MirrorError::DeviceFault {
                    addr: f.addr,
                    write: f.write,
                    reason: AccessError::Misaligned,
                });
            }
            if pf.is_empty() {
                return Err(MirrorError::UnusableFaults {
                    incomplete: outcome.incomplete.len(),
                    garbage,
                });
            }
            report.faults += pf.len() as u64;
            Counters::add(&inner.counters.faults, pf.len() as u64);
            let t_service = Instant::now();
            let device = t_service - t_round;
            let pages = {
                let _round =
                    tracing::debug_span!(target: "hmm_rs", "fault_service_round", round = replays)
                        .entered();
                let serviced = self.service(&pf, &outcome.incomplete, replays);
                report.phases.service += t_service.elapsed();
                serviced?
            };
            report.pages_in += pages;
            tracing::debug!(
                target: "hmm_rs",
                round = replays,
                faults = pf.len(),
                pages,
                device_us = device.as_micros() as u64,
                service_us = t_service.elapsed().as_micros() as u64,
                "fault-service round"
            );
            replay = outcome.incomplete;
            first = false;
            replays += 1;
            Counters::add(&inner.counters.replays, 1);
        }
        Ok(())
    }

    /// The foreign-writer half of the start-of-launch sync point: pages
    /// whose device copy no longer matches the CPU page are invalidated as
    /// CPU writes. Returns how many.
    ///
    /// Ordering: the hashes are compared under the driver lock (no new
    /// protocol: installs, write-backs and `retire` change them under the
    /// same lock), and the invalidations are issued after it is dropped,
    /// because a blockable invalidation's callback takes it. Between the
    /// two nothing can make a changed page's copy current again — launches
    /// are serialised (`launch` lock held) — and invalidating a page that
    /// meanwhile left the device is a no-op. A store by this process
    /// racing the check is caught by write tracking; a foreign write after
    /// the check is caught by the next sync point.
    fn foreign_check(&self) -> u64 {
        let inner = &*self.inner;
        let changed = {
            let mut dev = inner.lock();
            let (mut cx, res) = dev.parts(inner);
            res.foreign_changed(&mut cx)
        };
        // Sorted: invalidate maximal runs of consecutive pages.
        let mut i = 0;
        while i < changed.len() {
            let mut j = i + 1;
            while j < changed.len() && changed[j].0 == changed[j - 1].0 + crate::addr::PAGE_SIZE {
                j += 1;
            }
            let len = (j - i) as u64 * crate::addr::PAGE_SIZE;
            if let Ok(r) = VaRange::from_start_len(changed[i], len) {
                inner.host.space().invalidate(r, EventKind::CpuWrite);
            }
            i = j;
        }
        changed.len() as u64
    }

    /// Writes every device-dirty page back (the end-of-launch sync point).
    fn write_back_all(&self) -> Result<u64, MirrorError> {
        let inner = &*self.inner;
        let mut dev = inner.lock();
        let pages: Vec<(VirtAddr, Pte)> = dev
            .table
            .mapped_in(VaRange::everything())
            .filter(|(_, p)| p.writable())
            .collect();
        let (mut cx, res) = dev.parts(inner);
        res.write_back(&mut cx, &pages)
    }
}
