//! Copy mode: a mirrored page is a copy in a device pool slot.
//!
//! - **Install** copies the CPU pages into fresh slots, keeps a *twin* of
//!   every page mapped writable, and writes the entries. Room is made
//!   before a round installs ([`Residency::make_room`]): one bulk eviction
//!   by CLOCK over accessed bits (read and cleared in batches, one device
//!   call each), the victims' dirty pages written back in one batch and
//!   their entries cleared in one write; an install that still finds the
//!   pool full evicts in bulk again, or page by page for the rest.
//! - **Write-back** stores only the byte runs where the device copy differs
//!   from its twin (the twin/diff technique of software distributed shared
//!   memory, TreadMarks), so CPU writes to other bytes of the same page made
//!   during a launch are never overwritten with stale data. Writes go
//!   through the host's fault-proof copy, so a page the kernel already
//!   unmapped is skipped rather than faulted on. A page whose memory is
//!   still there but refuses the write (made read-only behind the mirror's
//!   back) is *not* skipped: it stays mapped and dirty with its twin,
//!   eviction passes it over, and the refusal is reported
//!   ([`MirrorError::WriteBackRefused`]) — by the caller's call, or by the
//!   next launch, which tries it again first.
//! - **Oversubscription** ([`Residency::plan_round`]): each round serves the
//!   lowest invocations and keeps the pages brought in for them from
//!   eviction until they complete, so some invocation always progresses.
//! - **Foreign writers** ([`ForeignWriters::Check`]): a page of a mapping
//!   that can change without a write through this process's page tables
//!   (shared, file-backed) gets a hash of the bytes copied at install;
//!   [`Residency::foreign_changed`] re-hashes the CPU pages at the sync
//!   point and names those that changed (`mirror::foreign`).
//! - **Slots are freed only after their entries are confirmed cleared**
//!   ([`Residency::retire`] quarantines, [`Residency::entries_cleared`]
//!   frees; see the `residency` module docs).
//!
//! **Residual window, stated honestly:** userfaultfd reports an unmap only
//! after it happened, and the unmapping thread resumes when the event is
//! read. Between the kernel's unmap and our reading of the event, another
//! thread could map new memory at the same address; a write-back in that
//! window (which needs a launch that is still writing memory the
//! application is freeing — a use-after-free in the application) could
//! land there. The unmapping thread itself cannot: it is blocked until the
//! event is read, and the invalidation starts immediately after.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::{Install, Residency};
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::cpu::chunk::choose_chunk;
use crate::cpu::host::GiveBack;
use crate::cpu::range_fault::PageState;
use crate::mirror::backend::{
    Backend, BackendError, DeviceToHost, HostToDevice, InvocationSet, PteLoc, PteWrite,
    READ_BACK_WITH_LAUNCH,
};
use crate::mirror::config::{CpuWrites, ForeignWriters, MirrorConfig};
use crate::mirror::error::{AccessError, MirrorError};
use crate::mirror::faults::PageFault;
use crate::mirror::foreign::{page_hash, PageHashes};
use crate::mirror::format::{PoolSlot, Pte, ACCESSED, DIRTY};
use crate::mirror::host_side::{HostSide, RunFate, WriteTracking};
use crate::mirror::hostcopy;
use crate::mirror::pagetable::ShadowTable;
use crate::mirror::pool::PagePool;
use crate::mirror::state::{zap, zap_pages, Cx, RegionKey, RegionSlot};
use crate::mirror::stats::Counters;
use crate::mirror::twins::Twins;
use crate::notifier::Attempt;

mod evict;
mod migrated;
mod write_back;

/// A hash set for the per-page bookkeeping of fault service: foldhash
/// instead of SipHash (keys are addresses and slot numbers chosen by the
/// process and the kernel, not by an adversary who could flood a bucket).
type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

const PAGE: usize = PAGE_SIZE as usize;

/// Pages moved per copy batch. Staging buffers are allocated once at this
/// size and never grow: invalidation callbacks must not free heap memory
/// other threads allocated (see `twins`), and a buffer that never grows is
/// never reallocated.
pub(crate) const STAGE_PAGES: usize = 512;

/// Most write-back runs held at once (about 1.5 MB of run lists and
/// iovecs): a chunk whose diff has more is written in several batches.
const RUN_BATCH: usize = 1 << 15;
/// Write-backs of at most this many writable pages, each with a twin,
/// compare every page with its twin instead of reading DIRTY first
/// (`write_back_chunk`): 32 pages read back cost less than the device
/// round trip that reading DIRTY is on a GPU driver.
const COMPARE_ALL_PAGES: usize = 32;

/// Pages read and hashed per batch by the foreign-writer check (256 KiB:
/// read, then hashed while still in the L2 cache).
const HASH_BATCH: usize = 64;

/// The copy-mode residency.
pub(crate) struct CopyPool {
    pool: PagePool,
    /// Slots of pinned pages: never evicted, never freed by a zap.
    pinned: HashSet<PoolSlot>,
    /// Slots whose entries left the shadow table but are not yet confirmed
    /// cleared on the device: not free, not evictable.
    quarantine: HashSet<PoolSlot>,
    /// For every slot mapped writable: the page as the device got it (or
    /// as last written back).
    twins: Twins,
    staging: Vec<u8>,
    ok: Vec<bool>,
    /// Scratch for write-back verification (preallocated, never grows).
    verify: Vec<u8>,
    /// During a launch: the invocations the last round served, each with
    /// the pages brought in (or found held) for it ([`Residency::plan_round`]),
    /// as `(invocation, page)` sorted by invocation.
    focus: Vec<(u32, VirtAddr)>,
    /// The pages of `focus`: eviction leaves them alone.
    focus_pages: FastSet<VirtAddr>,
    /// Pages whose write-back the CPU memory refused: their entries stay,
    /// still dirty, until a write-back gets through (or their memory goes
    /// away); eviction passes them over.
    refused: BTreeSet<VirtAddr>,
    /// Hashes of the slots that back pages of mappings other writers can
    /// change (`mirror::foreign`).
    hashes: PageHashes,
    /// [`CpuWrites::Hash`]: every copied page is hashed and nothing is
    /// write-protected.
    hash_all: bool,
    /// Mapped pages whose slot holds the only copy (migrated to the
    /// device; `migrated`).
    migrated: BTreeSet<VirtAddr>,
    /// Migrated pages an `mremap` moved: no entry any more, the slot kept
    /// (not free, not quarantined) until the CPU gets the data back at
    /// the page's new address (`migrated`).
    orphans: BTreeMap<VirtAddr, PoolSlot>,
    /// The slots of `orphans`.
    orphan_slots: HashSet<PoolSlot>,
}

impl CopyPool {
    /// A pool of `slots`, checked against the device's `max` (also
    /// reserving address space for the twins).
    pub fn new(
        slots: u32,
        max: u32,
        foreign: ForeignWriters,
        cpu_writes: CpuWrites,
    ) -> Result<Self, MirrorError> {
        let hash_all = cpu_writes == CpuWrites::Hash;
        if slots > max {
            return Err(MirrorError::Config(format!(
                "pool of {slots} slots exceeds the device's {max}"
            )));
        }
        Ok(CopyPool {
            pool: PagePool::new(slots),
            pinned: HashSet::new(),
            quarantine: HashSet::new(),
            twins: Twins::new(slots).ok_or_else(|| {
                MirrorError::Config("cannot reserve address space for twin pages".into())
            })?,
            staging: vec![0; STAGE_PAGES * PAGE],
            ok: Vec::with_capacity(STAGE_PAGES),
            verify: vec![0; STAGE_PAGES * PAGE],
            focus: Vec::new(),
            focus_pages: FastSet::default(),
            refused: BTreeSet::new(),
            hashes: PageHashes::new(foreign == ForeignWriters::Check || hash_all),
            hash_all,
            migrated: BTreeSet::new(),
            orphans: BTreeMap::new(),
            orphan_slots: HashSet::new(),
        })
    }

    /// Undoes a partial install of `todo` into `slots`: zaps (without
    /// write-back: nothing ran on them) the pages of this attempt that got
    /// mapped, frees the fresh slots that did not, drops their twins.
    fn undo_install<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        todo: &[(VirtAddr, bool)],
        slots: &[PoolSlot],
    ) {
        for ((va, _), s) in todo.iter().zip(slots) {
            match cx.table.lookup(*va) {
                Some(p) if p.slot() == *s => {
                    if let Ok(page) = VaRange::from_start_len(*va, PAGE_SIZE) {
                        // Its clear stays queued if it fails (latched).
                        let _ = zap(cx, self, page, false);
                    }
                }
                _ => {
                    // Never named by any entry this attempt wrote.
                    self.twins.remove(*s);
                    self.hashes.forget(*s);
                    self.pool.free(*s);
                }
            }
        }
    }
}

impl<B: Backend, H: HostSide> Residency<B, H> for CopyPool {
    fn writes(&self) -> WriteTracking {
        if self.hash_all {
            WriteTracking::Hashed
        } else {
            WriteTracking::Tracked
        }
    }

    fn read_faults_map_writable(&self) -> bool {
        false
    }

    fn pool_slots(&self) -> u32 {
        self.pool.capacity()
    }

    fn choose_region(
        &self,
        at: VirtAddr,
        mapping: VaRange,
        regions: &BTreeMap<u64, RegionSlot<B, H>>,
        cfg: &MirrorConfig,
    ) -> Option<VaRange> {
        choose_chunk(at, mapping, &cfg.chunk_sizes, |cand| {
            regions
                .range(..cand.end().0)
                .next_back()
                .is_some_and(|(_, r)| r.range.overlaps(cand))
                || regions.range(cand.start().0..cand.end().0).next().is_some()
        })
        .ok()
    }

    fn piece_pages(&self, cfg: &MirrorConfig) -> u64 {
        // One install must fit the pool with room to evict: half the pool,
        // at most one staging batch, at least one page.
        u64::from(cfg.pool_slots / 2).min(STAGE_PAGES as u64).max(1)
    }

    fn begin_round(&mut self) {}

    fn spare_pages(&self) -> u64 {
        // The free slots: speculation takes nothing from a page in use. A
        // later round that needs room evicts like any round (speculated
        // pages the device never touched are as old as any); a reserve
        // here cost the dense sweep a round per reserved stretch.
        u64::from(self.pool.capacity()).saturating_sub(u64::from(self.pool.used()))
    }

    fn plan_round(&mut self, pf: &mut Vec<PageFault>, incomplete: &InvocationSet) {
        // Oversubscription. A replay restarts an invocation, so it
        // completes only in a round where *all* its pages are resident at
        // once — and a device that reports one fault per invocation per
        // round (the cpu driver stops an invocation at its first fault; the
        // GPU drivers record only the first) reveals them one round at a
        // time. Choosing pages by address (as this once did) let every
        // round's installs evict the pages earlier rounds brought in for
        // the same invocations — all of them looked equally young, since
        // every replayed invocation touches what it has — and a kernel
        // that loads from several pages and stores afterwards livelocked
        // from 2x oversubscription on (issue 19, finding 6).
        //
        // So invocations are served in ascending order, and the pages
        // brought in for the ones served stay out of eviction's reach
        // (`focus`) until they complete or fall out of the plan. A round
        // takes invocations while the pages they hold plus the ones they
        // need fit the evictable pool and the new ones fit half of it
        // (the other half is what eviction takes from); the lowest
        // incomplete invocation is always taken. It keeps its pages from
        // round to round and gains at least one each round, so it
        // completes once the pool can hold its pages: every round moves
        // some invocation forward.
        //
        // The walk is over flat vectors sorted by invocation, with a
        // foldhash set of held pages: per-invocation maps and vectors with
        // SipHash cost 0.55 µs per faulted page on a dense round (a third
        // of the fault service; `examples/fault_service`), this a tenth.
        let evictable = (self.pool.capacity() as usize).saturating_sub(self.pinned.len());
        let new_cap = (evictable / 2).max(1);
        let old = std::mem::take(&mut self.focus);
        // The faults by invocation, ascending; within one, in `pf` order.
        let mut order: Vec<(u32, usize)> = pf
            .iter()
            .enumerate()
            .map(|(k, f)| (f.invocation, k))
            .collect();
        order.sort_unstable();
        let mut held: FastSet<VirtAddr> = FastSet::default();
        held.reserve(pf.len() + old.len());
        let mut take = vec![false; pf.len()];
        let mut new = 0usize;
        // Cursors into `old` (invocations no longer incomplete skipped)
        // and `order`; each step takes the lowest invocation in either.
        let (mut a, mut b) = (0usize, 0usize);
        loop {
            while a < old.len() && !incomplete.contains(old[a].0) {
                a += 1;
            }
            let id = match (old.get(a), order.get(b)) {
                (None, None) => break,
                (Some(o), None) => o.0,
                (None, Some(f)) => f.0,
                (Some(o), Some(f)) => o.0.min(f.0),
            };
            let a_end = a + old[a..].iter().take_while(|e| e.0 == id).count();
            let b_end = b + order[b..].iter().take_while(|e| e.0 == id).count();
            let had = &old[a..a_end];
            let faults = &order[b..b_end];
            let more_held = had.iter().filter(|e| !held.contains(&e.1)).count();
            let more_new = faults
                .iter()
                .filter(|&&(_, k)| !held.contains(&pf[k].page))
                .count();
            if !self.focus.is_empty()
                && (held.len() + more_held + more_new > evictable || new + more_new > new_cap)
            {
                break;
            }
            for &(_, va) in had {
                self.focus.push((id, va));
                held.insert(va);
            }
            for &(_, k) in faults {
                let page = pf[k].page;
                take[k] = true;
                self.focus.push((id, page));
                new += usize::from(held.insert(page));
            }
            a = a_end;
            b = b_end;
        }
        let mut k = 0;
        pf.retain(|_| {
            k += 1;
            take[k - 1]
        });
        self.focus_pages = held;
    }

    fn launch_boundary(&mut self) {
        self.focus.clear();
        self.focus_pages.clear();
    }

    fn free_slots(&self) -> u64 {
        u64::from(self.pool.capacity() - self.pool.used())
    }

    fn make_room(&mut self, cx: &mut Cx<'_, B, H>, pages: u64) -> Result<u64, MirrorError> {
        let free = <Self as Residency<B, H>>::free_slots(self);
        if pages <= free {
            return Ok(0);
        }
        self.evict_batch(cx, pages - free, &FastSet::default())
    }

    fn install(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        req: Install<'_>,
    ) -> Result<Attempt<u64>, MirrorError> {
        let todo = req.todo;
        // Slots eviction must leave alone: those of pages being upgraded and
        // those allocated for this run so far.
        let mut keep: FastSet<PoolSlot> = todo
            .iter()
            .filter_map(|(va, _)| cx.table.lookup(*va))
            .map(|p| p.slot())
            .collect();
        // Room for the whole batch at once where the pool is full: one
        // bulk eviction rather than one per page.
        let fresh = todo
            .iter()
            .filter(|(va, _)| cx.table.lookup(*va).is_none())
            .count() as u64;
        let free = u64::from(self.pool.capacity() - self.pool.used());
        if fresh > free {
            self.evict_batch(cx, fresh - free, &keep)?;
        }
        let mut slots = Vec::with_capacity(todo.len());
        let mut upgrades = false;
        for (va, _) in todo {
            match cx.table.lookup(*va) {
                Some(p) => {
                    // read-only → writable upgrade reuses the slot
                    upgrades = true;
                    slots.push(p.slot());
                }
                None => match self.alloc_slot(cx, *va, &keep) {
                    Ok(s) => {
                        keep.insert(s);
                        slots.push(s);
                    }
                    Err(e) => {
                        for (s, (va, _)) in slots.iter().zip(todo) {
                            if cx.table.lookup(*va).is_none() {
                                self.pool.free(*s);
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
        // by the next sync point. Protecting after the copy swallowed a CPU
        // write landing between the copy and the protection (`hmm-stress`
        // found it). A failed protect leaves the pages reported as written:
        // conservative.
        //
        // A read fault populates for read, which leaves the protection
        // alone: its pages are still armed unless the CPU wrote them since —
        // and such a page stays reported as written until the next sync
        // point drops its device copy, which is merely conservative. So only
        // write faults re-arm.
        let addrs: Vec<VirtAddr> = todo.iter().map(|t| t.0).collect();
        if req.write && !self.hash_all {
            let _ = cx.host.rearm(&addrs);
        }
        // Which pages other writers can change (their copies get a hash):
        // one mapping lookup per mapping the batch spans. A failed lookup
        // counts as such a page (checking costs time, not correctness).
        let checked: Vec<bool> = if self.hash_all {
            vec![true; addrs.len()]
        } else if self.hashes.enabled() {
            let mut last: Option<(VaRange, bool)> = None;
            addrs
                .iter()
                .map(|va| match last {
                    Some((r, f)) if r.contains(*va) => f,
                    _ => match cx.host.lookup(*va) {
                        Ok(Some(m)) => {
                            let f = m.may_change_unseen();
                            last = Some((m.range, f));
                            f
                        }
                        _ => true,
                    },
                })
                .collect()
        } else {
            vec![false; addrs.len()]
        };
        // Copy in: straight into the slots when the pool is host memory and
        // every slot is fresh (a failed read then only spoils slots that
        // are freed again; an upgraded slot still backs a read-only entry),
        // else through the staging buffer.
        let direct: Option<Vec<*mut u8>> = if upgrades {
            None
        } else {
            slots
                .iter()
                .map(|s| cx.backend.host_slot(*s).map(|p| p.as_ptr()))
                .collect()
        };
        Counters::timed(&cx.counters.copy_in_ns, || match &direct {
            // SAFETY: the backend vouches for 4 KiB of writable memory per
            // slot (`Backend::host_slot`); the slots are distinct, fresh and
            // unused by device work (none is in flight during fault
            // service); pool memory is never a mirrored CPU page.
            Some(dsts) => unsafe { cx.host.read_pages_to(&addrs, dsts, &mut self.ok) },
            None => cx.host.read_pages(&addrs, &mut self.staging, &mut self.ok),
        });
        if let Some(i) = self.ok.iter().position(|b| !*b) {
            // A page went away under us: its invalidation is on its way.
            self.undo_install(cx, todo, &slots);
            // Unless it did not: memory the kernel lets no one else read
            // (`memfd_secret`) stays mapped and present but cannot be
            // copied. After a few failures, a fresh look at the mappings
            // tells the two apart: still mapped readable means the page
            // cannot be mirrored — a typed error now, not a retry loop
            // spinning until the timeout.
            req.copy_failures.set(req.copy_failures.get() + 1);
            if req.copy_failures.get() >= 3 {
                let va = addrs[i];
                if let Ok(page) = VaRange::from_start_len(va, PAGE_SIZE) {
                    cx.host.forget_mappings(page);
                }
                if cx.host.lookup(va).ok().flatten().is_some_and(|m| m.read) {
                    return Err(MirrorError::DeviceFault {
                        addr: va,
                        write: req.write,
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
                    src: self.staging[i * PAGE..].as_ptr(),
                })
                .collect();
            let copied = Counters::timed(&cx.counters.copy_in_ns, || {
                // SAFETY: every `src` is a 4 KiB chunk of `staging`, alive
                // and unmodified for the call; the destination slots are
                // freshly allocated or belong to pages being upgraded,
                // which no device work uses (launches are serialised and
                // none is in flight during fault service).
                unsafe { cx.backend.copy_to_device(&batch) }
            });
            if let Err(e) = copied {
                self.undo_install(cx, todo, &slots);
                return Err(e.into());
            }
        }
        for (i, ((_, writable), s)) in todo.iter().zip(&slots).enumerate() {
            if !*writable && !checked[i] {
                // An upgrade's slot keeps no stale hash of another mapping.
                self.hashes.forget(*s);
                continue;
            }
            let copied: &[u8] = match &direct {
                // SAFETY: the slot's 4 KiB were just written by the read
                // above and no device work touches them yet; the backend
                // vouches for their validity (`host_slot`). The borrow ends
                // with this iteration.
                Some(d) => unsafe { std::slice::from_raw_parts(d[i], PAGE) },
                None => &self.staging[i * PAGE..(i + 1) * PAGE],
            };
            if *writable {
                self.twins.set(*s, copied);
            }
            // The hash of the bytes the device got, not of the CPU page
            // read again: a foreign write racing the copy then shows as a
            // change at the next sync point, never as a match.
            if checked[i] {
                self.hashes.set(*s, copied);
            } else {
                self.hashes.forget(*s);
            }
        }
        let mut writes: Vec<PteWrite> = Vec::new();
        let mut failed = None;
        for ((va, writable), s) in todo.iter().zip(&slots) {
            if let Err(e) = cx.table.map(*va, Pte::leaf(*s, *writable), &mut writes) {
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
            // Leave nothing half-installed: unmap what was mapped (its
            // clears queued: the device may hold part of the batch), free
            // the slots and twins this attempt took.
            self.undo_install(cx, todo, &slots);
            return Err(e);
        }
        Counters::add(&cx.counters.pages_in, todo.len() as u64);
        Ok(Attempt::Done(todo.len() as u64))
    }

    fn write_back(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        pages: &[(VirtAddr, Pte)],
    ) -> Result<u64, MirrorError> {
        // Migrated pages have no CPU copy to update (and touching their
        // CPU side from under the driver lock would wait on the fault-back
        // server, which needs the lock): skipped.
        let kept: Vec<(VirtAddr, Pte)>;
        let pages = if self.migrated.is_empty() {
            pages
        } else {
            kept = pages
                .iter()
                .filter(|(va, _)| !self.migrated.contains(va))
                .copied()
                .collect();
            &kept
        };
        let mut n = 0;
        let mut refused = None;
        for c in pages.chunks(STAGE_PAGES) {
            match self.write_back_chunk(cx, c) {
                Ok(k) => n += k,
                // The other chunks are still written: a refusal keeps its
                // own pages, not everyone's.
                Err(e @ MirrorError::WriteBackRefused { .. }) => {
                    refused.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        refused.map_or(Ok(n), Err)
    }

    fn read_back_candidates(&self) -> Vec<PoolSlot> {
        // The write-back compares every writable page with its twin when
        // there are at most `COMPARE_ALL_PAGES` of them (`write_back_chunk`):
        // those are the pages it reads whole. Writable pages have twins
        // (pinned ones excepted, which are then read only if dirty).
        let live = self.twins.twinned();
        if live.len() > COMPARE_ALL_PAGES.min(READ_BACK_WITH_LAUNCH) {
            return Vec::new();
        }
        live.iter().map(|&s| PoolSlot(s)).collect()
    }

    fn refused(&self, r: VaRange) -> Vec<VirtAddr> {
        self.refused.range(r.start()..r.end()).copied().collect()
    }

    fn foreign_changed(&mut self, cx: &mut Cx<'_, B, H>) -> Vec<VirtAddr> {
        if self.hashes.is_empty() {
            return Vec::new();
        }
        let mut pages: Vec<(VirtAddr, PoolSlot)> = self
            .hashes
            .slots()
            .filter_map(|s| self.pool.owner(s).map(|va| (va, s)))
            .collect();
        pages.sort_unstable_by_key(|p| p.0);
        let mut changed = Vec::new();
        let mut addrs = Vec::with_capacity(HASH_BATCH);
        // Small batches: the pages read are hashed while still in cache.
        for batch in pages.chunks(HASH_BATCH) {
            addrs.clear();
            addrs.extend(batch.iter().map(|p| p.0));
            let buf = &mut self.staging[..batch.len() * PAGE];
            // Fault-proof: a file page past a truncation reads as failed.
            cx.host.read_pages(&addrs, buf, &mut self.ok);
            for (k, (va, slot)) in batch.iter().enumerate() {
                let now = self.ok[k].then(|| page_hash(&buf[k * PAGE..(k + 1) * PAGE]));
                // Unreadable now (gone, or no longer readable): its event
                // is on its way; dropping the copy is conservative.
                if now.is_none() || now != self.hashes.get(*slot) {
                    changed.push(*va);
                }
            }
        }
        Counters::add(&cx.counters.foreign_checked_pages, pages.len() as u64);
        Counters::add(&cx.counters.foreign_changed_pages, changed.len() as u64);
        changed
    }

    fn has_refused(&self) -> bool {
        !self.refused.is_empty()
    }

    fn retire(&mut self, removed: &[(VirtAddr, Pte)]) {
        for (va, pte) in removed {
            self.refused.remove(va);
            self.twins.remove(pte.slot());
            self.hashes.forget(pte.slot());
            // A migrated page leaving without having been given back is
            // gone with its memory (a destructive event).
            self.migrated.remove(va);
            if !self.pinned.contains(&pte.slot()) && !self.orphan_slots.contains(&pte.slot()) {
                self.quarantine.insert(pte.slot());
            }
        }
    }

    fn entries_cleared(&mut self, _backend: &B) -> Result<bool, BackendError> {
        // Highest first: the free list hands slots out last-in first-out,
        // so a bulk eviction's slots are reused in ascending order and a
        // range installed after it lands on consecutive slots, as it did
        // when eviction freed one slot at a time (scattered slots made the
        // cpu driver's oversubscribed runs 8-11 % slower: `hmm-bench
        // --only oversub`).
        let mut freed: Vec<PoolSlot> = self.quarantine.drain().collect();
        freed.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        for s in freed {
            self.pool.free(s);
        }
        Ok(false)
    }

    fn destructive(
        &mut self,
        _regions: &BTreeMap<u64, RegionSlot<B, H>>,
        _key: RegionKey,
        hit: VaRange,
    ) -> VaRange {
        hit
    }

    fn pin(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        range: VaRange,
        states: &[PageState],
        writable: bool,
    ) -> Result<(), MirrorError> {
        let need = range.pages();
        let free = |p: &PagePool| u64::from(p.capacity() - p.used());
        if free(&self.pool) < need {
            // Room in one bulk eviction first, then page by page for what
            // that left short.
            let short = need - free(&self.pool);
            self.evict_batch(cx, short, &FastSet::default())?;
        }
        if free(&self.pool) < need {
            // Evict unpinned pages until enough slots are free: hold the
            // slots gained (alloc_slot evicts only when none is free), then
            // release them together.
            let mut held = Vec::new();
            let mut keep = FastSet::default();
            while free(&self.pool) + (held.len() as u64) < need {
                match self.alloc_slot(cx, range.start(), &keep) {
                    Ok(s) => {
                        keep.insert(s);
                        held.push(s);
                    }
                    Err(MirrorError::PoolExhausted { .. }) => break,
                    // A device error while evicting is the caller's to see,
                    // not a full pool.
                    Err(e) => {
                        for s in held {
                            self.pool.free(s);
                        }
                        return Err(e);
                    }
                }
            }
            for s in held {
                self.pool.free(s);
            }
        }
        if free(&self.pool) < need {
            return Err(self.exhausted(need));
        }
        let addrs: Vec<VirtAddr> = range.page_addrs().collect();
        let mut slots = Vec::with_capacity(addrs.len());
        for va in &addrs {
            if cx.table.lookup(*va).is_some() {
                // Already mirrored on demand: drop that copy first.
                zap(cx, self, VaRange::from_start_len(*va, PAGE_SIZE)?, true)?;
            }
            let s = self.pool.alloc(*va).ok_or_else(|| self.exhausted(1))?;
            // Pinning follows nothing, foreign writers included.
            self.hashes.forget(s);
            self.pinned.insert(s);
            slots.push(s);
        }
        for (addrs, slots) in addrs.chunks(STAGE_PAGES).zip(slots.chunks(STAGE_PAGES)) {
            let direct: Option<Vec<*mut u8>> = slots
                .iter()
                .map(|s| cx.backend.host_slot(*s).map(|p| p.as_ptr()))
                .collect();
            let t_copy = std::time::Instant::now();
            if let Some(dsts) = direct {
                // Host-addressable pool: one copy, straight into the slots.
                // SAFETY: 4 KiB per slot vouched for by the backend
                // (`host_slot`); the slots are distinct, freshly allocated
                // and unused by device work, as `copy_to_device` requires.
                unsafe { cx.host.read_pages_to(addrs, &dsts, &mut self.ok) };
                Counters::add_since(&cx.counters.copy_in_ns, t_copy);
                continue;
            }
            cx.host.read_pages(addrs, &mut self.staging, &mut self.ok);
            let batch: Vec<HostToDevice> = slots
                .iter()
                .enumerate()
                .map(|(i, s)| HostToDevice {
                    slot: *s,
                    src: self.staging[i * PAGE..].as_ptr(),
                })
                .collect();
            // SAFETY: as in `install`: staging chunks alive for the call,
            // slots fresh and unused by device work.
            let copied = unsafe { cx.backend.copy_to_device(&batch) };
            Counters::add_since(&cx.counters.copy_in_ns, t_copy);
            copied?;
        }
        let mut writes = Vec::new();
        for ((va, s), st) in addrs.iter().zip(&slots).zip(states) {
            let w = writable && st.is_writable();
            cx.table
                .map(*va, Pte::leaf(*s, w || writable), &mut writes)?;
        }
        let wrote = Counters::timed(&cx.counters.page_table_ns, || {
            cx.backend.write_ptes(&writes)
        });
        wrote?;
        Counters::add(&cx.counters.pages_in, addrs.len() as u64);
        Ok(())
    }

    fn unpin(&mut self, pages: &[(VirtAddr, Pte)]) {
        for (_, pte) in pages {
            self.pinned.remove(&pte.slot());
        }
    }

    fn usage(&self) -> (u64, u64) {
        (u64::from(self.pool.used()), u64::from(self.pool.capacity()))
    }

    fn check_migrate(&self) -> Result<(), MirrorError> {
        if self.hash_all {
            return Err(MirrorError::MigrationUnsupported(
                "CpuWrites::Hash: migration needs write-protect tracking of the pages it gives back".into(),
            ));
        }
        Ok(())
    }

    fn adopt_migrated(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        range: VaRange,
        bytes: &[u8],
    ) -> Result<u64, MirrorError> {
        self.adopt(cx, range, bytes)
    }

    fn migrated_in(&self, r: VaRange) -> Vec<VirtAddr> {
        self.migrated_pages(r)
    }

    fn give_back(&mut self, cx: &mut Cx<'_, B, H>, pages: &[VirtAddr]) -> Result<u64, MirrorError> {
        self.give_back_pages(cx, pages)
    }

    fn settle_given(&mut self, cx: &mut Cx<'_, B, H>, va: VirtAddr) -> Result<bool, MirrorError> {
        self.settle_given_page(cx, va)
    }

    fn migrated_slot(&self, table: &ShadowTable, va: VirtAddr) -> Option<PoolSlot> {
        if self.migrated.contains(&va) {
            table.lookup(va).map(|p| p.slot())
        } else {
            None
        }
    }

    fn discarded(&mut self, table: &ShadowTable, range: VaRange, moved: bool) {
        self.discard(table, range, moved)
    }

    fn moved(&mut self, old: VaRange, to: VirtAddr) {
        self.move_orphans(old, to)
    }

    fn teardown(&mut self) {
        self.pinned.clear();
    }
}
