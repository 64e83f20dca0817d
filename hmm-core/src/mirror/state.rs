//! The driver lock and what it guards ([`Dev`]), the mirror's shared state
//! ([`Inner`]), and the two operations every path uses to take entries off
//! the device: [`zap`] and [`flush`].
//!
//! # Entry writes are ordered, and memory is freed only after them
//!
//! Entries leave the shadow table at once; their clearing writes go to the
//! `deferred` queue, and [`flush`] writes the queue (driver lock held, no
//! submission of this mirror running). Only when the backend confirms the
//! writes does the residency release the memory they named
//! ([`Residency::entries_cleared`]). A failed flush leaves both queued and
//! is retried by the next flush; three failures in a row — or a backend
//! reporting itself lost — mark the device lost ([`Health`]). Paths that
//! write *new* entries flush first and stop on failure, so a retried clear
//! never lands after (and erases) a newer entry for the same slot of the
//! table.

use std::collections::BTreeMap;

use super::backend::{Backend, BackendError, PteLoc, PteWrite, SubmissionId};
use super::config::MirrorConfig;
use super::error::MirrorError;
use super::format::{Pte, ACCESSED};
use super::host_side::{HostSide, WriteTracking};
use super::invalidate::Region;
use super::pagetable::ShadowTable;
use super::residency::Residency;
use super::stats::Counters;
use crate::addr::{VaRange, VirtAddr};
use crate::notifier::{OwnerTag, Subscription};
use crate::sync::channel::Sender;
use crate::sync::{lock, try_lock, Arc, Mutex, MutexGuard};

/// Consecutive failed flushes after which the device is declared lost.
pub(crate) const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// Names one region *instance*: its start (the key of the region map) and
/// a number no other region of the mirror ever had. A region released and
/// another registered at the same start are different regions; anything
/// that outlives a region's stay in the map (a queued destructive zap, a
/// window's owner, the release worker's message) names it by both, so it
/// can never act on the successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RegionKey {
    pub start: u64,
    pub id: u64,
}

/// One region of this mirror (a registered, watched range).
pub(crate) struct RegionSlot<B: Backend, H: HostSide> {
    pub id: u64,
    pub range: VaRange,
    pub sub: Option<Subscription<Region<B, H>>>,
    pub dead: bool,
    /// The region has taken a write fault: its read faults map writable
    /// pages writable (saving upgrade faults); until then they map
    /// read-only, which needs no twin.
    pub written: bool,
    /// The host watch succeeded for the range: only then is there a watch
    /// of ours to end.
    pub watched: bool,
}

/// Pages mapped by [`Mirror::pin`](super::Mirror::pin).
pub(crate) struct PinnedRange {
    pub range: VaRange,
    pub locked: bool,
}

/// Whether the device can still be trusted with entries.
#[derive(Default)]
pub(crate) struct Health {
    failures: u32,
    lost: Option<String>,
}

impl Health {
    /// `Err(DeviceLost)` once the device was declared lost.
    pub fn check(&self) -> Result<(), MirrorError> {
        match &self.lost {
            Some(why) => Err(MirrorError::DeviceLost(why.clone())),
            None => Ok(()),
        }
    }

    /// Whether the device was declared lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    /// A device call that keeps state consistent failed while doing `what`.
    pub fn failed(&mut self, what: &str, e: BackendError) -> MirrorError {
        self.failures += 1;
        if matches!(e, BackendError::DeviceLost(_)) || self.failures >= MAX_CONSECUTIVE_FAILURES {
            return self.lose(format!("{what} failed {} time(s): {e}", self.failures));
        }
        MirrorError::Backend(e)
    }

    /// A flush went through.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Declares the device lost (the first reason is kept).
    pub fn lose(&mut self, why: String) -> MirrorError {
        let why = self.lost.get_or_insert(why).clone();
        MirrorError::DeviceLost(why)
    }
}

/// Everything the driver lock guards.
pub(crate) struct Dev<B: Backend, H: HostSide> {
    pub table: ShadowTable,
    /// This mirror's regions, by start; they never overlap.
    pub regions: BTreeMap<u64, RegionSlot<B, H>>,
    pub pinned: BTreeMap<u64, PinnedRange>,
    pub read_mostly: Vec<VaRange>,
    /// Ranges advised [`Advice::Sequential`] or [`Advice::Random`]
    /// (the fetch policy honours them).
    ///
    /// [`Advice::Sequential`]: super::Advice::Sequential
    /// [`Advice::Random`]: super::Advice::Random
    pub fetch_advice: Vec<(VaRange, super::Advice)>,
    /// Ranges advised [`Advice::WillNeed`] since the last launch, fetched
    /// (and forgotten) when the next one starts.
    ///
    /// [`Advice::WillNeed`]: super::Advice::WillNeed
    pub will_need: Vec<VaRange>,
    /// Ranges advised [`Advice::PreferDevice`]: pages a launch touched
    /// there migrate when it ends (`mirror::migrate`).
    ///
    /// [`Advice::PreferDevice`]: super::Advice::PreferDevice
    pub prefer_device: Vec<VaRange>,
    /// Runs the fetch policy brought in during the running launch; their
    /// `ACCESSED` bits are read when it ends
    /// ([`MirrorStats::speculated_used`](super::MirrorStats::speculated_used)).
    pub spec_runs: Vec<VaRange>,
    /// Pages the CPU and the device take turns on (`ping_pong`).
    pub ping_pong: super::ping_pong::PingPong,
    /// The device submission running now, if any (launches are serialised).
    pub inflight: Option<SubmissionId>,
    /// Clearing writes not yet confirmed by the backend (see the module
    /// docs), oldest first.
    pub deferred: Vec<PteWrite>,
    pub health: Health,
    /// The id the next region gets ([`RegionKey`]).
    pub next_region_id: u64,
    /// Dead regions taken out of `regions` whose release
    /// (`regions::release_taken`) has not finished: `flush_releases` waits
    /// for them too.
    pub releasing: usize,
    /// Ranges armed for device-private migration (`mirror::migrate`),
    /// disarmed when nothing in them is migrated any more.
    pub armed: Vec<VaRange>,
    /// Pages made exclusive ([`Mirror::make_exclusive`]): migrated pages
    /// whose device entries a CPU touch revokes. A mark is meaningful only
    /// while its page is migrated (others are stale, pruned now and then).
    ///
    /// [`Mirror::make_exclusive`]: super::Mirror::make_exclusive
    pub exclusive: std::collections::BTreeSet<VirtAddr>,
    /// Per 2 MiB block (by start address), the 64 KiB blocks where CPU faults
    /// brought back since it was last migrated: the density that sizes
    /// the next fault-back's neighbourhood (`mirror::migrate`).
    pub faulted_back: std::collections::HashMap<u64, super::migrate::FaultMarks>,
    /// CPU faults the event monitor's reader answered and nobody settled
    /// yet (`mirror::migrate`, `Inner::answer_now`): the page and the
    /// neighbourhood chosen. Its room is reserved at creation
    /// (`ANSWERED_CAP`): the reader never grows it.
    pub answered: Vec<(VirtAddr, VaRange)>,
    /// One page, allocated at creation: where the reader reads a page
    /// out of its slot to answer a fault (`Inner::answer_now`).
    pub answer_page: Box<[u8]>,
    pub res: Box<dyn Residency<B, H>>,
}

impl<B: Backend, H: HostSide> RegionSlot<B, H> {
    /// This region's key.
    pub fn key(&self) -> RegionKey {
        RegionKey {
            start: self.range.start().0,
            id: self.id,
        }
    }
}

/// The live instance `key` names, if it is still in the map.
pub(crate) fn region_of<B: Backend, H: HostSide>(
    regions: &BTreeMap<u64, RegionSlot<B, H>>,
    key: RegionKey,
) -> Option<&RegionSlot<B, H>> {
    regions.get(&key.start).filter(|r| r.id == key.id)
}

/// What a residency and the shared table operations work with: the driver
/// lock's state minus the residency itself, plus the mirror's fixed parts.
pub(crate) struct Cx<'a, B: Backend, H: HostSide> {
    pub table: &'a mut ShadowTable,
    pub deferred: &'a mut Vec<PteWrite>,
    pub regions: &'a mut BTreeMap<u64, RegionSlot<B, H>>,
    pub health: &'a mut Health,
    pub backend: &'a B,
    pub host: &'a H,
    pub counters: &'a Counters,
    pub release_tx: &'a Sender<ReleaseMsg>,
    /// Destructive invalidations queued while the driver lock is held
    /// ([`Inner::pending`]): a give-back of a migrated page holds this lock
    /// across its install and skips pages a queued zap covers, so memory
    /// the program discarded never gets the old data back.
    pub pending: &'a Mutex<Vec<PendingZap>>,
}

impl<B: Backend, H: HostSide> Dev<B, H> {
    /// Splits the guarded state into a [`Cx`] and the residency.
    pub fn parts<'a>(
        &'a mut self,
        inner: &'a Inner<B, H>,
    ) -> (Cx<'a, B, H>, &'a mut dyn Residency<B, H>) {
        (
            Cx {
                table: &mut self.table,
                deferred: &mut self.deferred,
                regions: &mut self.regions,
                health: &mut self.health,
                backend: &inner.backend,
                host: &inner.host,
                counters: &inner.counters,
                release_tx: &inner.release_tx,
                pending: &inner.pending,
            },
            &mut *self.res,
        )
    }
}

/// An `mremap` moved `old` to `to`: answered faults there follow it.
fn rekey_answered(answered: &mut [(VirtAddr, VaRange)], old: VaRange, to: VirtAddr) {
    let shift = |va: VirtAddr| VirtAddr(to.0.wrapping_add(va.0 - old.start().0));
    for (page, block) in answered.iter_mut() {
        if old.contains(*page) {
            *page = shift(*page);
            // The neighbourhood, clipped to what moved.
            if let Some(b) = block.intersect(old) {
                if let Ok(r) = VaRange::from_start_len(shift(b.start()), b.len()) {
                    *block = r;
                }
            }
        }
    }
}

/// A destructive invalidation waiting for the driver lock.
pub(crate) struct PendingZap {
    pub range: VaRange,
    pub region: RegionKey,
    /// Unmap or remap: the region dies.
    pub dead: bool,
    /// Remap: the memory moved elsewhere (migrated pages keep their data,
    /// `Residency::discarded`).
    pub moved: bool,
    /// Not a zap: an `mremap` moved `range` to this address
    /// ([`Inner::moved`]). Queued with the zaps, in event order: the
    /// kernel's `UNMAP` of the old range follows a move's `REMAP`, and
    /// applying it before the move would discard migrated data that the
    /// move re-keys to the new address.
    pub move_to: Option<VirtAddr>,
}

/// Work for the deferred-release worker.
pub(crate) enum ReleaseMsg {
    Region(RegionKey),
    Shutdown,
}

/// The mirror's shared state.
pub(crate) struct Inner<B: Backend, H: HostSide> {
    pub backend: B,
    pub host: Arc<H>,
    pub owner: OwnerTag,
    pub cfg: MirrorConfig,
    /// How this mirror's regions are watched (from the residency).
    pub writes: WriteTracking,
    /// The driver lock (see the module docs of `mirror`).
    pub dev: Mutex<Dev<B, H>>,
    /// Destructive invalidations that found the driver lock held
    /// ([`Inner::apply_zap`]); a leaf lock, never held across anything.
    pub pending: Mutex<Vec<PendingZap>>,
    pub launch: Mutex<()>,
    pub counters: Counters,
    pub release_tx: Sender<ReleaseMsg>,
}

/// Marks region `key` dead and hands it to the deferred-release worker
/// (once); nothing if that instance is no longer in the map.
pub(crate) fn mark_dead<B: Backend, H: HostSide>(cx: &mut Cx<'_, B, H>, key: RegionKey) {
    if let Some(slot) = cx.regions.get_mut(&key.start).filter(|r| r.id == key.id) {
        if !slot.dead {
            slot.dead = true;
            // A send fails only when the worker is gone (mirror teardown),
            // which releases every region itself.
            let _ = cx.release_tx.send(ReleaseMsg::Region(key));
        }
    }
}

/// Removes every entry in `r` from the shadow table, queueing their
/// clearing writes; returns the removed entries.
pub(crate) fn unmap_deferred<B: Backend, H: HostSide>(
    cx: &mut Cx<'_, B, H>,
    r: VaRange,
) -> Vec<(VirtAddr, Pte)> {
    let mut removed = Vec::new();
    cx.table.unmap_range(r, cx.deferred, &mut removed);
    removed
}

/// Writes the queued clearing writes and lets the residency release what
/// they named (driver lock held, no submission of this mirror running).
/// See the module docs for what a failure does.
pub(crate) fn flush<B: Backend, H: HostSide>(
    cx: &mut Cx<'_, B, H>,
    res: &mut dyn Residency<B, H>,
) -> Result<(), MirrorError> {
    if cx.health.is_lost() {
        // Nothing runs on a lost device and nothing is freed for it; the
        // queue need not grow without bound.
        cx.deferred.clear();
        return cx.health.check();
    }
    let wrote = !cx.deferred.is_empty();
    if wrote {
        let wrote_ptes = Counters::timed(&cx.counters.page_table_ns, || {
            cx.backend.write_ptes(cx.deferred)
        });
        if let Err(e) = wrote_ptes {
            Counters::add(&cx.counters.device_errors, 1);
            return Err(cx.health.failed("clearing device page-table entries", e));
        }
        cx.deferred.clear();
    }
    let released = match res.entries_cleared(cx.backend) {
        Ok(called) => called,
        Err(e) => {
            Counters::add(&cx.counters.device_errors, 1);
            return Err(cx.health.failed("releasing device memory", e));
        }
    };
    // Only a call the device confirmed ends a run of failures: a flush
    // with nothing to do proves nothing about the device.
    if wrote || released {
        cx.health.succeeded();
    }
    Ok(())
}

/// [`zap`] for scattered single pages (bulk eviction): one write-back
/// batch for all of them, one queue of clearing writes, one flush. Pages
/// whose write-back was refused keep their entries (the residency
/// remembers them, as for [`zap`]); the refusal is not an error here —
/// the caller wanted room, and gets it from the others. Returns the pages
/// taken off the device.
pub(crate) fn zap_pages<B: Backend, H: HostSide>(
    cx: &mut Cx<'_, B, H>,
    res: &mut dyn Residency<B, H>,
    pages: &[VirtAddr],
) -> Result<u64, MirrorError> {
    let mapped: Vec<(VirtAddr, Pte)> = pages
        .iter()
        .filter_map(|&va| cx.table.lookup(va).map(|p| (va, p)))
        .collect();
    if mapped.is_empty() {
        return Ok(0);
    }
    // Migrated pages go back to the CPU first; one that cannot keeps its
    // entry (its slot holds the only copy).
    let migrated: Vec<VirtAddr> = mapped
        .iter()
        .map(|(va, _)| *va)
        .filter(|va| {
            VaRange::from_start_len(*va, crate::addr::PAGE_SIZE)
                .is_ok_and(|p| !res.migrated_in(p).is_empty())
        })
        .collect();
    if !migrated.is_empty() {
        res.give_back(cx, &migrated)?;
    }
    match res.write_back(cx, &mapped) {
        Ok(_) | Err(MirrorError::WriteBackRefused { .. }) => {}
        Err(e) => return Err(e),
    }
    let mut removed = Vec::new();
    for (va, _) in &mapped {
        let page = VaRange::from_start_len(*va, crate::addr::PAGE_SIZE)?;
        if res.refused(page).is_empty() && res.migrated_in(page).is_empty() {
            removed.extend(unmap_deferred(cx, page));
        }
    }
    let n = removed.len() as u64;
    res.retire(&removed);
    flush(cx, res)?;
    Ok(n)
}

/// Takes every mapped page of `r` off the device (driver lock held, device
/// idle for those pages): writes dirty pages back first if `writeback`,
/// then clears the entries and releases their memory (through [`flush`]).
pub(crate) fn zap<B: Backend, H: HostSide>(
    cx: &mut Cx<'_, B, H>,
    res: &mut dyn Residency<B, H>,
    r: VaRange,
    writeback: bool,
) -> Result<(), MirrorError> {
    if cx.table.mapped_in(r).next().is_none() {
        return Ok(());
    }
    let wb = if writeback {
        // Migrated pages go back to the CPU first (their CPU side is a
        // hole the write-back skips).
        let migrated = res.migrated_in(r);
        let given = if migrated.is_empty() {
            Ok(0)
        } else {
            res.give_back(cx, &migrated)
        };
        let mapped: Vec<(VirtAddr, Pte)> = cx.table.mapped_in(r).collect();
        given.and(res.write_back(cx, &mapped)).map(|_| ())
    } else {
        Ok(())
    };
    // Pages whose write-back was refused hold the only copy of device
    // writes: their entries stay (the residency remembers them, and the
    // next launch reports the refusal); so do migrated pages that could
    // not be given back. A zap without write-back drops them with
    // everything else.
    let keep = if writeback {
        let mut k = res.refused(r);
        k.extend(
            res.migrated_in(r)
                .into_iter()
                .filter(|va| cx.table.lookup(*va).is_some()),
        );
        k.sort_unstable();
        k.dedup();
        k
    } else {
        Vec::new()
    };
    let mut removed = Vec::new();
    let mut at = r.start();
    for k in keep.iter().copied().chain(std::iter::once(r.end())) {
        if k > at {
            if let Ok(gap) = VaRange::new(at, k) {
                removed.extend(unmap_deferred(cx, gap));
            }
        }
        at = VirtAddr(k.0.saturating_add(crate::addr::PAGE_SIZE)).max(at);
    }
    res.retire(&removed);
    let flushed = flush(cx, res);
    wb.and(flushed)
}

impl<B: Backend, H: HostSide> Inner<B, H> {
    /// The driver lock, with every queued destructive invalidation applied
    /// ([`Inner::apply_zap`]). Every acquisition goes through here.
    pub fn lock(&self) -> MutexGuard<'_, Dev<B, H>> {
        let mut dev = lock(&self.dev);
        self.drain_pending(&mut dev);
        dev
    }

    /// Applies the destructive invalidations queued while the driver lock
    /// was held elsewhere.
    pub fn drain_pending(&self, dev: &mut Dev<B, H>) {
        self.drain_pending_then(dev, None);
    }

    /// [`Inner::drain_pending`], then `then` (an invalidation or move
    /// found the lock free), then the faults the event monitor's reader
    /// answered are settled (`Inner::settle_answered`): after every zap
    /// and move, so a page discarded since is skipped and a moved one is
    /// settled at its new address.
    pub fn drain_pending_then(&self, dev: &mut Dev<B, H>, then: Option<PendingZap>) {
        {
            let mut q = lock(&self.pending);
            for z in q.drain(..).chain(then) {
                match z.move_to {
                    Some(to) => {
                        dev.res.moved(z.range, to);
                        rekey_answered(&mut dev.answered, z.range, to);
                    }
                    None => self.apply_zap(dev, z),
                }
            }
        }
        if !dev.answered.is_empty() {
            self.settle_answered(dev);
        }
    }

    /// An `mremap` moved `old` to `to` (reported after its destructive
    /// invalidation): migrated data kept from `old` now belongs at `to`.
    /// Never waits (the event monitor calls it): applied now if the driver
    /// lock is free, else by its next holder, in order with the zaps
    /// queued around it.
    pub fn moved(&self, old: VaRange, to: VirtAddr) {
        let z = PendingZap {
            range: old,
            // No region: a move is applied to the residency only.
            region: RegionKey {
                start: 0,
                id: u64::MAX,
            },
            dead: false,
            moved: false,
            move_to: Some(to),
        };
        match try_lock(&self.dev) {
            Some(mut dev) => self.drain_pending_then(&mut dev, Some(z)),
            None => lock(&self.pending).push(z),
        }
    }

    /// The driver lock, with no submission of this mirror running and the
    /// queued entry writes flushed (a failed flush stays queued and is
    /// latched in [`Health`]): waits for a running submission without
    /// holding the lock (a destructive invalidation may need it meanwhile,
    /// see [`Inner::apply_zap`]).
    pub fn lock_idle(&self) -> MutexGuard<'_, Dev<B, H>> {
        loop {
            let mut dev = self.lock();
            match dev.inflight.filter(|s| !self.backend.is_complete(*s)) {
                Some(s) => {
                    drop(dev);
                    if self.backend.wait(s, None).is_err() {
                        // A lost device runs nothing any more.
                        let mut dev = self.lock();
                        self.flush_quietly(&mut dev);
                        return dev;
                    }
                }
                None => {
                    self.flush_quietly(&mut dev);
                    return dev;
                }
            }
        }
    }

    /// [`Inner::lock_idle`] without waiting: `None` if another thread holds
    /// the driver lock or a submission of this mirror is still running.
    /// For callers that must never wait for either (the event monitor's
    /// handler serving a CPU fault, `mirror::migrate`).
    pub fn try_lock_idle(&self) -> Option<MutexGuard<'_, Dev<B, H>>> {
        let mut dev = try_lock(&self.dev)?;
        self.drain_pending(&mut dev);
        if dev.inflight.is_some_and(|s| !self.backend.is_complete(s)) {
            return None;
        }
        self.flush_quietly(&mut dev);
        Some(dev)
    }

    /// [`flush`] where no caller can be told of a failure: the writes stay
    /// queued and the failure counts toward declaring the device lost,
    /// which every later call reports.
    pub fn flush_quietly(&self, dev: &mut Dev<B, H>) {
        let (mut cx, res) = dev.parts(self);
        let _ = flush(&mut cx, res);
    }

    /// [`flush`] before new entries are written or a submission starts:
    /// a failure stops the caller.
    pub fn flush_or_fail(&self, dev: &mut Dev<B, H>) -> Result<(), MirrorError> {
        // A destructive invalidation may have queued a zap since this
        // holder took the lock (it found the lock held): apply it before
        // the entries are trusted for new writes or a submission.
        self.drain_pending(dev);
        let (mut cx, res) = dev.parts(self);
        flush(&mut cx, res)
    }

    /// [`zap`] where no caller can be told of a failure (an invalidation
    /// callback, a release): the failure is latched as for
    /// [`Inner::flush_quietly`].
    /// The ping-pong threshold in force (`ping_pong` module; 0: off, as
    /// under the exact fetch policy).
    pub fn ping_pong_threshold(&self) -> u32 {
        self.cfg
            .fetch
            .adaptive(self.backend.rounds_are_costly())
            .map_or(0, |a| a.ping_pong_launches)
    }

    pub fn zap_quietly(&self, dev: &mut Dev<B, H>, r: VaRange, writeback: bool) {
        let (mut cx, res) = dev.parts(self);
        let _ = zap(&mut cx, res, r, writeback);
    }

    /// The accessed bits of `range` for the whole-space notifier's
    /// `clear_young` / `test_young`.
    pub fn young(&self, range: VaRange, clear: bool) -> bool {
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
        // An unreadable bit reads as "not young": aging is advice.
        r.is_ok() && old.iter().any(|p| p.accessed())
    }
}
