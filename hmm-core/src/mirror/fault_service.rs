//! Fault service: from validated fault records to device entries.
//!
//! 1. **Plan the round.** One entry per page (the write wins, the lowest
//!    invocation is kept); the residency chooses which pages this round
//!    serves ([`Residency::plan_round`]: copy mode the lowest invocations'
//!    pages, new ones within half the evictable pool, and it keeps the
//!    pages of those invocations from eviction until they complete;
//!    zero-copy the lowest invocations' blocks within half the windows).
//!    The rest fault again on replay.
//! 2. **Batches** of `MirrorConfig::fault_batch` (256, UVM's), each sorted
//!    and coalesced into runs.
//! 3. **Each run** is split at region boundaries ([`Mirror::region_for`]
//!    registers regions on demand) and into pieces the residency can take
//!    at once; each piece runs the `hmm_range_fault` loop:
//!    `read_begin` → `range_fault` → take the driver lock → `read_retry`
//!    → install ([`Mirror::commit`]). A sequence that moved starts the
//!    piece over (bounded by `MirrorConfig::retry_timeout`).
//! 4. A residency that can take no more this round
//!    ([`MirrorError::PoolExhausted`] after progress) ends the round; the
//!    replay brings the rest back.

use super::backend::{Backend, InvocationSet};
use super::config::Advice;
use super::error::{AccessError, MirrorError};
use super::faults::{self, PageFault, Run};
use super::handle::Mirror;
use super::host_side::HostSide;
use super::invalidate::Region;
use super::policy::Adaptive;
use super::residency::Install;
use super::state::{RegionKey, RegionSlot};
use super::stats::Counters;
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::cpu::maps::{Mapping, MappingKind};
use crate::cpu::mirror_fault::{fault_and_commit_with, FaultLoopStats, MirrorFaultError};
use crate::cpu::range_fault::{FaultFlags, PageState};
use crate::notifier::{Attempt, EventKind, Interval, NotifierRange, Seq, SubscriptionRef};
use crate::sync::lock;

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// Services validated faults; returns pages made resident.
    /// `incomplete`: the invocations the next replay runs; `round`: this
    /// launch's fault-service rounds before this one.
    pub(super) fn service(
        &self,
        pf: &[PageFault],
        incomplete: &InvocationSet,
        round: u32,
    ) -> Result<u64, MirrorError> {
        let inner = &*self.inner;
        // One copy-path check for the round (`safecopy` module docs): no
        // user code runs on this thread until the round ends.
        let _checked = crate::cpu::safecopy::CheckScope::open();
        let mut pf = pf.to_vec();
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
        {
            let mut dev = inner.lock();
            dev.res.begin_round();
            dev.res.plan_round(&mut pf, incomplete);
            if inner.ping_pong_threshold() > 0 {
                for f in &pf {
                    dev.ping_pong.faulted(f.page, f.write);
                }
            }
            // Room for the whole round in one bulk eviction (the pages
            // are counted only when the pool might be short).
            let fresh = if dev.res.free_slots() < pf.len() as u64 {
                pf.iter()
                    .filter(|f| dev.table.lookup(f.page).is_none())
                    .count()
            } else {
                0
            };
            let (mut cx, res) = dev.parts(inner);
            res.make_room(&mut cx, fresh as u64)?;
        }
        // One fresh read of the CPU mappings per fault-service round.
        let epoch = inner.host.new_epoch();
        let mut pages_in = 0;
        let mut demanded = Vec::new();
        let cap = inner.lock().res.piece_pages(&inner.cfg);
        for batch in pf.chunks(inner.cfg.fault_batch) {
            Counters::add(&inner.counters.fault_batches, 1);
            let mut batch = batch.to_vec();
            let mut runs = Vec::new();
            faults::coalesce(&mut batch, &mut runs);
            inner.lock().res.order_runs(&mut runs, &batch);
            // Runs one after another in one live region are serviced as
            // one group (one fault loop, one commit, one install): a
            // sparse batch has several single pages per region, and each
            // paid the whole per-run path. A group that fails with nothing
            // installed (a full pool, a region released meanwhile) is
            // serviced run by run below, which handles both.
            let mut i = 0;
            let mut single_until = 0;
            while i < runs.len() {
                if i >= single_until {
                    if let Some((sub, n)) = self.group_at(&runs[i..], cap) {
                        match self.service_pieces(&sub, &runs[i..i + n]) {
                            Ok(k) => {
                                Counters::add(&inner.counters.fault_runs, n as u64);
                                pages_in += k;
                                demanded.extend_from_slice(&runs[i..i + n]);
                                i += n;
                                continue;
                            }
                            Err(
                                MirrorError::PoolExhausted { .. }
                                | MirrorError::RegionReleased { .. },
                            ) => single_until = i + n,
                            Err(e) => return Err(e),
                        }
                    }
                }
                let run = runs[i];
                i += 1;
                Counters::add(&inner.counters.fault_runs, 1);
                match self.service_run(run, epoch) {
                    Ok(n) => pages_in += n,
                    // The residency can take no more this round, and the
                    // round made progress: the rest fault again on replay,
                    // when older memory can be evicted. No speculation in
                    // a round that could not take its own pages.
                    Err(MirrorError::PoolExhausted { .. }) if pages_in > 0 => return Ok(pages_in),
                    Err(e) => return Err(e),
                }
                demanded.push(run);
            }
        }
        if let Some(policy) = inner.cfg.fetch.adaptive(inner.backend.rounds_are_costly()) {
            let t = std::time::Instant::now();
            let n = self.speculate(&policy, demanded, round, epoch)?;
            tracing::debug!(
                target: "hmm_rs",
                round,
                pages = n,
                us = t.elapsed().as_micros() as u64,
                "speculated"
            );
            pages_in += n;
        }
        Ok(pages_in)
    }

    /// The fetch policy's pages after a round that served `demanded`
    /// (`policy` module docs): never evicting, inside the faulting page's
    /// anonymous, readable CPU mapping; a failed speculative fetch is
    /// dropped. Returns pages made resident.
    fn speculate(
        &self,
        policy: &Adaptive,
        mut demanded: Vec<Run>,
        round: u32,
        epoch: u64,
    ) -> Result<u64, MirrorError> {
        let inner = &*self.inner;
        if demanded.is_empty() {
            return Ok(0);
        }
        demanded.sort_unstable_by_key(|r| r.range.start());
        // Runs of different batches may touch or overlap: merge them.
        let mut merged: Vec<Run> = Vec::with_capacity(demanded.len());
        for r in demanded {
            match merged.last_mut() {
                Some(last) if last.range.end() >= r.range.start() => {
                    let end = last.range.end().max(r.range.end());
                    last.range = VaRange::new(last.range.start(), end).unwrap_or(last.range);
                    last.write |= r.write;
                }
                _ => merged.push(r),
            }
        }
        let extra = {
            let dev = inner.lock();
            let budget = dev.res.spare_pages();
            if budget == 0 {
                return Ok(0);
            }
            let resident_in = |r: VaRange, out: &mut Vec<u64>| {
                out.extend(dev.table.mapped_in(r).map(|(va, _)| va.0 / PAGE_SIZE));
            };
            // Advice: faults in `Random` ranges predict nothing; faults in
            // `Sequential` ranges are streams whatever their length.
            let advised = |r: &Run, a: Advice| {
                dev.fetch_advice
                    .iter()
                    .any(|(ar, k)| *k == a && ar.overlaps(r.range))
            };
            merged.retain(|r| !advised(r, Advice::Random));
            let (seq, plain): (Vec<Run>, Vec<Run>) =
                merged.iter().partition(|r| advised(r, Advice::Sequential));
            let mut extra = policy.speculate(&plain, round, &resident_in, budget);
            if !seq.is_empty() {
                let left = budget - extra.iter().map(|r| r.len() / PAGE_SIZE).sum::<u64>();
                let eager = Adaptive {
                    min_stream_pages: 1,
                    ..*policy
                };
                extra.extend(eager.speculate(&seq, round, &resident_in, left));
                extra.sort_unstable_by_key(|r| r.start());
            }
            // Nothing speculative lands in a `Random` range.
            let random: Vec<VaRange> = dev
                .fetch_advice
                .iter()
                .filter(|(_, k)| *k == Advice::Random)
                .map(|(r, _)| *r)
                .collect();
            if !random.is_empty() {
                extra = extra
                    .into_iter()
                    .flat_map(|r| subtract(r, &random))
                    .collect();
            }
            tracing::debug!(
                target: "hmm_rs",
                round,
                demanded_runs = merged.len(),
                budget,
                speculated_runs = extra.len(),
                speculated_pages = extra.iter().map(|r| r.len() / PAGE_SIZE).sum::<u64>(),
                "fetch policy"
            );
            extra
        };
        // The mappings the round's faults are in — anonymous memory the
        // process can read, nothing else. Speculation stays inside them:
        // never into a neighbouring mapping, a guard page or a file.
        let mut mappings: Vec<Mapping> = Vec::new();
        for d in &merged {
            if mappings.iter().any(|m| m.range.contains(d.range.start())) {
                continue;
            }
            let Ok(Some(m)) = inner.host.lookup_in_epoch(d.range.start(), epoch) else {
                continue;
            };
            let plain = match &m.kind {
                MappingKind::Anonymous => true,
                MappingKind::Special(name) => name == "[heap]" || name.starts_with("[anon:"),
                _ => false,
            };
            if m.read && plain {
                mappings.push(m);
            }
        }
        let mut pages = 0;
        for (r, m) in extra
            .iter()
            .flat_map(|r| mappings.iter().map(move |m| (r, m)))
        {
            let Some(piece) = r.intersect(m.range) else {
                continue;
            };
            // Fetched for write where the faults before it were writes (a
            // sweep that stores keeps storing) and the CPU may write: one
            // upgrade fault per page saved. "Before it" in its own mapping:
            // the runs are sorted by address across mappings, and an output
            // buffer's write faults below an input buffer say nothing about
            // the input (they made its speculated pages writable, with
            // twins, until `speculation_write_flag.rs` in the cpu driver's
            // tests caught it).
            let k = merged.partition_point(|d| d.range.start() <= piece.start());
            let write = m.write
                && merged[..k]
                    .iter()
                    .rev()
                    .find(|d| m.range.contains(d.range.start()))
                    .is_some_and(|d| d.write);
            // In runs of one fault batch, as demanded faults are serviced:
            // measured on the cpu driver (1 GiB dense saxpy), speculation
            // in one run per range took 2.7 s against 2.1 s in 256-page
            // runs. Cause not yet attributed.
            let step = inner.cfg.fault_batch.max(1) as u64;
            let mut at = piece.start();
            let mut failed = None;
            while at < piece.end() {
                let end = VirtAddr(at.0.saturating_add(step * PAGE_SIZE)).min(piece.end());
                let Ok(sub) = VaRange::new(at, end) else {
                    break;
                };
                let run = Run {
                    range: sub,
                    write,
                    first_addr: sub.start(),
                };
                match self.service_run(run, epoch) {
                    Ok(n) => {
                        pages += n;
                        if n > 0 {
                            inner.lock().spec_runs.push(sub);
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                at = end;
            }
            match failed {
                None => {}
                // Speculation only: what cannot be fetched now is left to
                // fault if it is ever used.
                Some(
                    MirrorError::PoolExhausted { .. }
                    | MirrorError::DeviceFault { .. }
                    | MirrorError::RetryTimeout { .. }
                    | MirrorError::RegionReleased { .. },
                ) => break,
                Some(e) => return Err(e),
            }
        }
        Counters::add(&inner.counters.speculated, pages);
        Ok(pages)
    }

    /// Makes `range` resident for read (or write) without a device fault:
    /// the user's way to turn faults into one bulk copy. Returns pages
    /// made resident.
    pub fn prefetch(&self, range: VaRange, write: bool) -> Result<u64, MirrorError> {
        self.same_process()?;
        let range = range.page_cover()?.user()?;
        let _serial = lock(&self.inner.launch);
        let _checked = crate::cpu::safecopy::CheckScope::open();
        {
            let mut dev = self.inner.lock();
            dev.health.check()?;
            dev.res.begin_round();
        }
        let epoch = self.inner.host.new_epoch();
        self.fetch(range, write, epoch)
    }

    /// Makes `range` resident (room made in one bulk eviction first),
    /// counted as prefetched: [`Mirror::prefetch`] and the launch's
    /// will-need fetch, inside a round the caller began.
    pub(super) fn fetch(
        &self,
        range: VaRange,
        write: bool,
        epoch: u64,
    ) -> Result<u64, MirrorError> {
        {
            let mut dev = self.inner.lock();
            let fresh = if dev.res.free_slots() < range.pages() {
                range.pages() - dev.table.mapped_in(range).count() as u64
            } else {
                0
            };
            let (mut cx, res) = dev.parts(&self.inner);
            res.make_room(&mut cx, fresh)?;
        }
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

    /// Fetches the ranges advised [`Advice::WillNeed`](super::Advice::WillNeed)
    /// since the last launch, for reading, before the first round (the
    /// caller, a launch, holds the launch lock). A range is fetched up to
    /// the first page that cannot be read any more (unmapped, protected):
    /// the kernel then faults on the rest, as it would without the advice.
    /// Anything else (a device error, a full pool) ends the launch.
    pub(super) fn fetch_will_need(
        &self,
        report: &mut super::config::LaunchReport,
    ) -> Result<(), MirrorError> {
        let ranges = std::mem::take(&mut self.inner.lock().will_need);
        if ranges.is_empty() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let res = self.fetch_ranges(ranges, report);
        report.phases.will_need = t.elapsed();
        res
    }

    /// Refreshes, before the first round, the pages the ping-pong detector
    /// expects the device to need again (`ping_pong` module), within the
    /// pool's free slots. A refresh is a prediction: one that cannot be
    /// made (unmapped or protected meanwhile, a full pool, a region
    /// released) is dropped, and the page faults as it would have; only a
    /// device error ends the launch.
    pub(super) fn refresh_ping_pong(
        &self,
        report: &mut super::config::LaunchReport,
    ) -> Result<(), MirrorError> {
        let inner = &*self.inner;
        let threshold = inner.ping_pong_threshold();
        let runs = {
            let mut dev = inner.lock();
            let budget = dev.res.spare_pages();
            dev.ping_pong.launch_start(threshold, budget)
        };
        if runs.is_empty() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let _checked = crate::cpu::safecopy::CheckScope::open();
        inner.lock().res.begin_round();
        let epoch = inner.host.new_epoch();
        let mut pages = 0;
        for (range, write) in runs {
            let run = Run {
                range,
                write,
                first_addr: range.start(),
            };
            match self.service_run(run, epoch) {
                Ok(n) => pages += n,
                Err(
                    MirrorError::PoolExhausted { .. }
                    | MirrorError::DeviceFault { .. }
                    | MirrorError::RetryTimeout { .. }
                    | MirrorError::RegionReleased { .. },
                ) => continue,
                Err(e) => return Err(e),
            }
        }
        Counters::add(&inner.counters.refreshed, pages);
        report.pages_in += pages;
        report.phases.will_need += t.elapsed();
        Ok(())
    }

    /// [`Mirror::fetch_will_need`]'s fetches, range by range.
    fn fetch_ranges(
        &self,
        ranges: Vec<VaRange>,
        report: &mut super::config::LaunchReport,
    ) -> Result<(), MirrorError> {
        let _checked = crate::cpu::safecopy::CheckScope::open();
        self.inner.lock().res.begin_round();
        let epoch = self.inner.host.new_epoch();
        for r in ranges {
            let Ok(range) = r.page_cover().and_then(|c| c.user()) else {
                continue;
            };
            // Mapping by mapping, up to the first hole or unreadable one.
            let mut at = range.start();
            while at < range.end() {
                let Some(m) = self.inner.host.lookup_in_epoch(at, epoch)? else {
                    break;
                };
                if !m.read || m.range.end() <= at {
                    break;
                }
                let end = VirtAddr(m.range.end().0.min(range.end().0));
                match self.fetch(VaRange::new(at, end)?, false, epoch) {
                    Ok(n) => report.pages_in += n,
                    // Unreadable after all (changed since the lookup).
                    Err(MirrorError::DeviceFault { .. }) => break,
                    Err(e) => return Err(e),
                }
                at = end;
            }
        }
        Ok(())
    }

    /// Services one run: splits it at region boundaries (creating regions
    /// for pages no region covers) and runs the fault loop on each piece.
    pub(super) fn service_run(&self, run: Run, epoch: u64) -> Result<u64, MirrorError> {
        if run.range.end().0 > crate::addr::USER_VA_END {
            // Kernel half (or a wild pointer): nothing can be mapped there.
            return Err(MirrorError::DeviceFault {
                addr: run.first_addr,
                write: run.write,
                reason: AccessError::Unmapped,
            });
        }
        let inner = &*self.inner;
        let cap = inner.lock().res.piece_pages(&inner.cfg) * PAGE_SIZE;
        let mut pages_in = 0;
        let mut at = run.range.start();
        let mut released = 0;
        while at < run.range.end() {
            let (region_range, sub_ref) = match self.region_for(at, run.write, epoch) {
                Ok(r) => r,
                // The region chosen for `at` lost part of its mapping before
                // it was watched, and registration released it: choose again
                // (bounded, sharing the budget below). Propagating the error
                // failed a launch whose pages were mapped all along
                // (`tests/loom_mirror.rs`).
                Err(MirrorError::RegionReleased { .. }) if released < 8 => {
                    released += 1;
                    continue;
                }
                // The lookup names the page it was asked about; the error
                // names the address the kernel used, when it is in that
                // page (found by hmm-fuzz: a fault on `p = page + 0x5c4`
                // was reported at `page`, below the kernel's pointer).
                Err(MirrorError::DeviceFault {
                    addr,
                    write,
                    reason,
                }) if addr == run.range.start()
                    && run.first_addr.page_down() == addr.page_down() =>
                {
                    return Err(MirrorError::DeviceFault {
                        addr: run.first_addr,
                        write,
                        reason,
                    })
                }
                Err(e) => return Err(e),
            };
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
            let one = Run {
                range: piece,
                write: run.write,
                first_addr: first,
            };
            match self.service_pieces(&sub_ref, std::slice::from_ref(&one)) {
                Ok(n) => {
                    pages_in += n;
                    at = end;
                }
                // The round can take no more. What the run made resident so
                // far counts; the rest faults again on replay
                // (`Mirror::service` stops the round).
                Err(MirrorError::PoolExhausted { .. }) if pages_in > 0 => return Ok(pages_in),
                // The region died under us: find (or make) the one that
                // covers `at` now. Bounded, like every retry here.
                Err(MirrorError::RegionReleased { .. }) if released < 8 => released += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(pages_in)
    }

    /// Runs at the start of `runs` that can be serviced as one group: at
    /// least two, one after another, all inside one live region that
    /// exists already, with the same access, at most `cap` pages in all.
    fn group_at(&self, runs: &[Run], cap: u64) -> Option<(SubscriptionRef<Region<B, H>>, usize)> {
        let first = runs.first()?;
        let dev = self.inner.lock();
        let (_, slot) = dev.regions.range(..=first.range.start().0).next_back()?;
        if slot.dead || !slot.range.covers(first.range) {
            return None;
        }
        let sub = slot.sub.as_ref()?.ops_arc();
        let (mut pages, mut n) = (0u64, 0usize);
        for r in runs {
            pages += r.range.pages();
            if r.write != first.write || !slot.range.covers(r.range) || pages > cap {
                break;
            }
            n += 1;
        }
        (n >= 2).then_some((sub, n))
    }

    /// The fault loop for pieces of one region (each inside it, all with
    /// the same access, at most one install's worth of pages): one
    /// sequence read, a snapshot of every piece, one commit.
    fn service_pieces(
        &self,
        sub: &SubscriptionRef<Region<B, H>>,
        runs: &[Run],
    ) -> Result<u64, MirrorError> {
        let inner = &*self.inner;
        let Some(write) = runs.first().map(|r| r.write) else {
            return Ok(0);
        };
        let (runs, read_mostly): (Vec<Run>, bool) = {
            // Already resident with the access needed (another run of this
            // launch got there first): nothing to do, and no populate —
            // which would count as a CPU write at the next sync point.
            let dev = inner.lock();
            let need: Vec<Run> = runs
                .iter()
                .filter(|r| {
                    !r.range
                        .page_addrs()
                        .all(|va| dev.table.lookup(va).is_some_and(|p| p.writable() || !write))
                })
                .copied()
                .collect();
            if need.is_empty() {
                return Ok(0);
            }
            let rm = dev
                .read_mostly
                .iter()
                .any(|m| need.iter().any(|r| m.overlaps(r.range)));
            (need, rm)
        };
        let pieces: Vec<VaRange> = runs.iter().map(|r| r.range).collect();
        let Some(&lo) = pieces.first() else {
            return Ok(0);
        };
        // The pieces in any order (a residency may order runs by
        // invocation); the span only names the group to the fault loop.
        let start = pieces.iter().map(|p| p.start()).min().unwrap_or(lo.start());
        let end = pieces.iter().map(|p| p.end()).max().unwrap_or(lo.end());
        let span = VaRange::new(start, end)?;
        let multi = inner.host.mirrors_attached() > 1;
        if multi && (write || !read_mostly) {
            // Single writer: drop every other device's copy first (ours are
            // skipped by owner tag). They write back dirty data on it.
            for p in &pieces {
                if let Ok(g) = inner.host.space().invalidate_start(
                    NotifierRange::new(*p, EventKind::Coherence).with_owner(inner.owner),
                ) {
                    drop(g);
                }
            }
        }
        // Pieces of a range armed for migration: a hole there (a page
        // discarded since it was migrated, or never touched) would fail the
        // snapshot's populate (a kernel-mode fault on a user-mode-only
        // userfaultfd), so it is filled first — with the page's data if a
        // moved migrated page waits for it there, else with zeros, what the
        // CPU would read.
        if pieces.iter().any(|p| inner.host.is_armed(*p)) {
            let mut dev = inner.lock();
            for p in pieces.iter().filter(|p| inner.host.is_armed(**p)) {
                let (mut cx, res) = dev.parts(inner);
                // Moved (orphaned) pages go back; mapped migrated ones stay
                // (the device has them: they do not fault).
                let moved: Vec<VirtAddr> = res
                    .migrated_in(*p)
                    .into_iter()
                    .filter(|va| cx.table.lookup(*va).is_none())
                    .collect();
                if !moved.is_empty() {
                    res.give_back(&mut cx, &moved)?;
                }
                // The holes between the mapped migrated pages are nobody's.
                let mut at = p.start();
                for va in res
                    .migrated_in(*p)
                    .into_iter()
                    .chain(std::iter::once(p.end()))
                {
                    if let Ok(gap) = VaRange::new(at, va) {
                        inner.host.fill_holes(gap);
                    }
                    at = VirtAddr(va.0.saturating_add(crate::addr::PAGE_SIZE));
                }
            }
        }
        let flags = if write {
            FaultFlags::WRITE
        } else {
            FaultFlags::READ
        };
        let mut st = FaultLoopStats::default();
        let copy_failures = std::cell::Cell::new(0u32);
        let host = &*inner.host;
        // Which piece the snapshot was taking when it failed: the error
        // names that run's faulting address.
        let failing = std::cell::Cell::new(0usize);
        let mut one = Vec::new();
        let res = fault_and_commit_with(
            |_span, f, out| {
                if let [p] = pieces.as_slice() {
                    return host.range_fault_into(*p, f, out);
                }
                out.clear();
                // Scattered write faults: one batched populate for every
                // piece (`process_madvise` where the kernel has it), then a
                // snapshot of each. If it fails, each piece takes the
                // ordinary path, whose errors name the exact run.
                let populated = write && host.populate_runs(&pieces, true).is_ok();
                for (k, p) in pieces.iter().enumerate() {
                    failing.set(k);
                    one.clear();
                    if populated {
                        host.range_fault_populated_into(*p, f, &mut one)?;
                    } else {
                        host.range_fault_into(*p, f, &mut one)?;
                    }
                    out.extend_from_slice(&one);
                }
                Ok(())
            },
            sub.interval(),
            span,
            flags,
            inner.cfg.retry_timeout,
            &mut st,
            |seq, states| {
                self.commit(Commit {
                    region: sub.key,
                    interval: sub.interval(),
                    seq,
                    pieces: &pieces,
                    write,
                    multi,
                    states,
                    copy_failures: &copy_failures,
                })
            },
        );
        Counters::add(&inner.counters.retries, st.busy + st.refused);
        match res {
            Ok(n) => Ok(n),
            Err(MirrorFaultError::Fault(e)) => {
                let first_addr = runs.get(failing.get()).map_or(lo.start(), |r| r.first_addr);
                Err(MirrorError::from_fault(e, first_addr, write))
            }
            Err(MirrorFaultError::Commit(e)) => Err(e),
            Err(MirrorFaultError::Timeout { attempts, .. }) => Err(MirrorError::RetryTimeout {
                addr: lo.start(),
                attempts,
            }),
            Err(MirrorFaultError::Busy) => Err(MirrorError::RetryTimeout {
                addr: lo.start(),
                attempts: st.attempts,
            }),
        }
    }

    /// Under the driver lock: check the sequence, decide each page's
    /// access, and let the residency install them. Returns pages installed.
    fn commit(&self, c: Commit<'_>) -> Result<Attempt<u64>, MirrorError> {
        let inner = &*self.inner;
        let mut dev = inner.lock();
        // Entries of zapped pages are cleared, and their memory released,
        // before anything new is written: a clear retried later must never
        // land after a newer entry.
        inner.flush_or_fail(&mut dev)?;
        if c.interval.read_retry(c.seq) {
            return Ok(Attempt::Retry);
        }
        // A region that died (and may already be released: then no
        // invalidation can reach it and read_retry stays quiet) must not
        // get new entries.
        let live = |r: &&mut RegionSlot<B, H>| !r.dead && r.id == c.region.id;
        let Some(region) = dev.regions.get_mut(&c.region.start).filter(live) else {
            return Err(MirrorError::RegionReleased {
                addr: c.pieces.first().map_or(VirtAddr(0), |p| p.start()),
            });
        };
        let region_range = region.range;
        // Read faults map writable only in regions that have been written
        // by the device: data a kernel only reads then needs no twin, while
        // a region a kernel writes pays one upgrade fault per page at most
        // once, then maps writable straight away.
        region.written |= c.write;
        let region_written = region.written || dev.res.read_faults_map_writable();
        let read_mostly = dev
            .read_mostly
            .iter()
            .any(|r| c.pieces.iter().any(|p| r.overlaps(*p)));
        // Pages to install: not mapped, or mapped read-only but wanted for write.
        let mut todo: Vec<(VirtAddr, bool)> = Vec::new();
        let pages = c.pieces.iter().flat_map(|p| p.page_addrs());
        if c.pieces.iter().map(|p| p.pages()).sum::<u64>() != c.states.len() as u64 {
            // A snapshot that does not match the pieces page for page
            // cannot be trusted: take it again.
            return Ok(Attempt::Retry);
        }
        for (va, st) in pages.zip(c.states) {
            let cpu_writable = match st {
                PageState::Valid { writable } => *writable,
                // Reads as zeros; its mapping may be read-only, and a write
                // fault will upgrade it (with the permission check).
                PageState::Zero => false,
                // After a fault request every page is present or an error
                // was returned; anything else means it vanished: retry.
                _ => return Ok(Attempt::Retry),
            };
            let writable = if c.write {
                true
            } else {
                cpu_writable && region_written && !read_mostly && !c.multi
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
        let (mut cx, res) = dev.parts(inner);
        res.install(
            &mut cx,
            Install {
                key: c.region,
                region: region_range,
                todo: &todo,
                write: c.write,
                copy_failures: c.copy_failures,
            },
        )
    }
}

/// One commit attempt of [`Mirror::commit`].
struct Commit<'a> {
    region: RegionKey,
    interval: &'a Interval,
    seq: Seq,
    /// The pieces serviced, in the order of `states`.
    pieces: &'a [VaRange],
    write: bool,
    multi: bool,
    states: &'a [PageState],
    copy_failures: &'a std::cell::Cell<u32>,
}

/// `r` less every range of `holes`, in order.
fn subtract(r: VaRange, holes: &[VaRange]) -> Vec<VaRange> {
    let mut out = vec![r];
    for h in holes {
        out = out
            .into_iter()
            .flat_map(|p| {
                let mut v = Vec::new();
                if p.start() < h.start() {
                    if let Ok(a) = VaRange::new(p.start(), p.end().min(h.start())) {
                        v.push(a);
                    }
                }
                if p.end() > h.end() {
                    if let Ok(b) = VaRange::new(p.start().max(h.end()), p.end()) {
                        v.push(b);
                    }
                }
                v
            })
            .collect();
    }
    out
}
