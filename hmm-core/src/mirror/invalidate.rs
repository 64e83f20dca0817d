//! Invalidation: a region's interval-notifier callback, the destructive
//! path that never waits, and the whole-space accessed-bit notifier.
//!
//! # The callback, step by step ([`Region::invalidate`])
//!
//! 1. An invalidation this mirror caused itself (owner tag, coherence
//!    event) is skipped: a write fault collapsing other devices' copies must
//!    not make its own fault retry forever.
//! 2. A CPU write where the residency does not track CPU writes (the device
//!    reads the CPU's own pages) only advances the sequence.
//! 3. **Destructive events** (unmap, remap, remove) advance the sequence and
//!    then *never wait*: if the driver lock is free they drop the shadow
//!    entries at once ([`Inner::apply_zap`]), else they queue the work for
//!    the lock's next holder (every acquisition drains the queue). See
//!    below for why.
//! 4. Every other event takes the driver lock (a non-blockable
//!    invalidation gives up instead of waiting), waits — without the lock —
//!    for the submission in flight (it may hold translations), flushes the
//!    queued entry writes, records the sequence, then writes device-dirty
//!    pages back and zaps the invalidated pages. A `Clear` or `Release`
//!    also tells the residency the memory was recycled.
//!
//! # Why destructive events never wait
//!
//! They arrive on the event monitor, the only reader of the userfaultfd. A
//! device whose work runs on this process's own threads (lavapipe, the cpu
//! driver) can itself `munmap` memory a region covers — the kernel merges
//! neighbouring anonymous mappings into one VMA, so a 64 KiB or 2 MiB
//! region can span a driver's private pages (lavapipe's LLVM JIT maps and
//! unmaps single pages while it runs a submission) — and that thread sleeps
//! until the monitor reads its event. A monitor waiting for that submission,
//! or for the driver lock held by a thread waiting for a copy queued behind
//! it, never reads it: a deadlock (seen in `anon_teardown` on lavapipe).
//! Waiting would buy nothing either: the kernel does not wait for us, and
//! the data is discarded, not written back.
//!
//! What keeps not waiting safe: a running submission may still reach the
//! old memory through the not-yet-cleared entries, and nothing reuses that
//! memory before the entries are confirmed cleared — [`Residency::retire`]
//! only quarantines, and the queued clears are written by the next flush,
//! which runs only while no submission does (`state` module docs). A
//! commit that passed its `read_retry` before the sequence advanced may
//! still map pages of the range; the zap queued behind it removes them
//! before the table is used again.

use std::sync::Weak;

use super::backend::Backend;
use super::host_side::{HostSide, WriteTracking};
use super::state::{mark_dead, unmap_deferred, Dev, Inner, PendingZap, RegionKey};
use super::stats::Counters;
use crate::addr::{VaRange, VirtAddr};
use crate::notifier::{EventKind, Interval, IntervalNotifier, NotifierRange, Seq, SpaceNotifier};
use crate::sync::{lock, try_lock};

/// The interval-notifier callbacks of one region.
pub(crate) struct Region<B: Backend, H: HostSide> {
    pub owner: Weak<Inner<B, H>>,
    pub key: RegionKey,
}

/// The statistics slot of an event kind.
pub(crate) fn event_index(e: EventKind) -> usize {
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

impl<B: Backend, H: HostSide> IntervalNotifier for Region<B, H> {
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
        let count = || Counters::add(&inner.counters.invalidations[event_index(nr.event)], 1);
        // A device that reads the CPU's own pages has no copy a CPU write
        // could make stale.
        if inner.writes == WriteTracking::Untracked && nr.event == EventKind::CpuWrite {
            interval.set_seq(cur_seq);
            count();
            return true;
        }
        if matches!(
            nr.event,
            EventKind::Unmap | EventKind::Remap | EventKind::Remove
        ) {
            interval.set_seq(cur_seq);
            count();
            if let Some(range) = nr.range.intersect(interval.range()) {
                let z = PendingZap {
                    range,
                    region: self.key,
                    dead: matches!(nr.event, EventKind::Unmap | EventKind::Remap),
                    moved: nr.event == EventKind::Remap,
                    move_to: None,
                };
                match try_lock(&inner.dev) {
                    // What earlier events queued goes first: a move queued
                    // before this zap must re-key migrated data before an
                    // unmap of the old range discards what is still there.
                    Some(mut dev) => inner.drain_pending_then(&mut dev, Some(z)),
                    // The holder (or the next one) applies it before doing
                    // anything else with the table: every acquisition of
                    // the driver lock drains the queue (`Inner::lock`).
                    None => lock(&inner.pending).push(z),
                }
            }
            return true;
        }
        let mut dev = if nr.blockable {
            inner.lock()
        } else {
            match try_lock(&inner.dev) {
                Some(mut g) => {
                    inner.drain_pending(&mut g);
                    g
                }
                None => return false,
            }
        };
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
        // A failure here stays queued and latched (`Health`); the callback
        // must still stop device use of the range, which the shadow table
        // and the queued writes do.
        inner.flush_quietly(&mut dev);
        interval.set_seq(cur_seq);
        count();
        let Some(r) = nr.range.intersect(interval.range()) else {
            return true;
        };
        if nr.event == EventKind::CpuWrite {
            // A migrated page cannot have been written by the CPU: its CPU
            // side is a hole, and any access gives it back (unmarking it)
            // first. The sync point reports such holes as written all the
            // same; their device copy, the only one, stays.
            let migrated = dev.res.migrated_in(r);
            if !migrated.is_empty() {
                let mut at = r.start();
                for va in migrated.into_iter().chain(std::iter::once(r.end())) {
                    if let Ok(gap) = VaRange::new(at, va) {
                        self.cpu_written(&inner, &mut dev, gap);
                    }
                    at = VirtAddr(va.0.saturating_add(crate::addr::PAGE_SIZE));
                }
                return true;
            }
            self.cpu_written(&inner, &mut dev, r);
            return true;
        }
        inner.zap_quietly(&mut dev, r, true);
        if matches!(nr.event, EventKind::Clear | EventKind::Release) {
            // "The range was recycled" (an application's explicit `Clear`,
            // or the monitor's when it lost track of events).
            let (mut cx, res) = dev.parts(&inner);
            let _ = res.recycled(&mut cx, self.key);
        }
        true
    }
}

impl<B: Backend, H: HostSide> Region<B, H> {
    /// The CPU wrote `r`: the device copies there are stale.
    fn cpu_written(&self, inner: &Inner<B, H>, dev: &mut Dev<B, H>, r: VaRange) {
        if inner.ping_pong_threshold() > 0 {
            let dropped: Vec<_> = dev.table.mapped_in(r).map(|(va, _)| va).collect();
            dev.ping_pong.cpu_dropped(dropped);
        }
        inner.zap_quietly(dev, r, true);
    }
}

/// Accessed bits for the whole-space notifier's `clear_young`/`test_young`.
pub(crate) struct Young<B: Backend, H: HostSide>(pub Weak<Inner<B, H>>);

impl<B: Backend, H: HostSide> SpaceNotifier for Young<B, H> {
    fn clear_young(&self, range: VaRange) -> bool {
        self.0.upgrade().is_some_and(|i| i.young(range, true))
    }
    fn test_young(&self, range: VaRange) -> bool {
        self.0.upgrade().is_some_and(|i| i.young(range, false))
    }
}

impl<B: Backend, H: HostSide> Inner<B, H> {
    /// A destructive invalidation (unmap, remap, remove) of `z.range`
    /// (driver lock held). It never calls the backend and never waits: the
    /// shadow table forgets the pages (the residency may widen the range:
    /// host windows drop the whole region), their clearing writes are
    /// queued and their memory quarantined ([`Residency::retire`]) until the
    /// next flush confirms the clears; an unmapped region goes to the
    /// release worker, which writes the rest of it back once the device is
    /// idle (only part of a merged VMA may be gone). See the module docs for
    /// why it must not wait.
    pub fn apply_zap(&self, dev: &mut Dev<B, H>, z: PendingZap) {
        let (mut cx, res) = dev.parts(self);
        let range = res.destructive(cx.regions, z.region, z.range);
        // Migrated pages there: gone with their memory, or kept for where
        // an `mremap` moved them (before their entries go).
        res.discarded(cx.table, range, z.moved);
        let removed = unmap_deferred(&mut cx, range);
        res.retire(&removed);
        if z.dead {
            mark_dead(&mut cx, z.region);
        }
    }
}
