//! [`Mirror`]: the handle users hold — creation, advice, statistics and
//! teardown. Launches, fault service, regions, invalidation and pinning
//! live in their own modules.

use std::collections::BTreeMap;
use std::time::Duration;

use super::backend::{Backend, DeviceConfig};
use super::config::{Advice, MirrorConfig};
use super::error::MirrorError;
use super::host_side::HostSide;
use super::invalidate::Young;
use super::pagetable::ShadowTable;
use super::regions::release_worker;
use super::residency;
use super::state::{Dev, Health, Inner, PinnedRange, RegionSlot, ReleaseMsg};
use super::stats::{Counters, MirrorStats};
use crate::addr::VaRange;
use crate::cpu::host::HostSpace;
use crate::notifier::{EventKind, NotifierHandle, NotifierRange, OwnerTag};
use crate::sync::thread::{spawn_named, JoinHandle};
use crate::sync::{Arc, Mutex};

static NEXT_OWNER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One device's mirror of a process address space.
///
/// Created over a host (the CPU side: [`HostSpace`] unless a test gives a
/// fake [`HostSide`]) and a [`Backend`]; faults register regions on demand,
/// invalidations zap them, a worker thread releases dead ones. Launches on
/// one mirror are serialised.
pub struct Mirror<B: Backend, H: HostSide = HostSpace> {
    pub(super) inner: Arc<Inner<B, H>>,
    worker: Option<JoinHandle<()>>,
    young: Option<NotifierHandle>,
    /// The process that created the mirror. A forked child inherits the
    /// value but none of the threads (release worker, event monitor, the
    /// backend's own) the mirror needs: it gets
    /// [`MirrorError::WrongProcess`] instead of a hang.
    pid: u32,
}

impl<B: Backend, H: HostSide> std::fmt::Debug for Mirror<B, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("backend", &self.inner.backend.info())
            .finish()
    }
}

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// A mirror of `host` on `backend`, sized by `cfg`.
    pub fn new(host: Arc<H>, backend: B, cfg: MirrorConfig) -> Result<Self, MirrorError> {
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
        let res = residency::choose::<B, H>(&backend, &cfg)?;
        backend.init(DeviceConfig {
            pool_slots: res.pool_slots(),
            table_pages: cfg.table_pages,
        })?;
        let table = ShadowTable::new(cfg.table_pages)?;
        let (tx, rx) = crate::sync::channel::unbounded();
        let inner = Arc::new(Inner {
            backend,
            host: Arc::clone(&host),
            // Relaxed: a unique-id dispenser; no other memory depends on it.
            owner: OwnerTag(NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            writes: res.writes(),
            dev: Mutex::new(Dev {
                table,
                regions: BTreeMap::new(),
                pinned: BTreeMap::new(),
                read_mostly: Vec::new(),
                fetch_advice: Vec::new(),
                will_need: Vec::new(),
                prefer_device: Vec::new(),
                spec_runs: Vec::new(),
                ping_pong: Default::default(),
                inflight: None,
                deferred: Vec::new(),
                health: Health::default(),
                next_region_id: 0,
                releasing: 0,
                armed: Vec::new(),
                exclusive: std::collections::BTreeSet::new(),
                faulted_back: std::collections::HashMap::new(),
                answered: Vec::with_capacity(super::migrate::ANSWERED_CAP),
                answer_page: vec![0; crate::addr::PAGE_SIZE as usize].into_boxed_slice(),
                res,
            }),
            // Reserved so the monitor thread does not allocate while it lasts.
            pending: Mutex::new(Vec::with_capacity(64)),
            launch: Mutex::new(()),
            counters: Counters::default(),
            release_tx: tx,
            cfg,
        });
        let weak = Arc::downgrade(&inner);
        let worker = spawn_named("hmm-release", move || release_worker(weak, rx))
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
    pub fn host(&self) -> &Arc<H> {
        &self.inner.host
    }

    /// `Err(WrongProcess)` in a forked child. Checked before any lock is
    /// taken: a lock another thread held at `fork` stays held in the child.
    pub(super) fn same_process(&self) -> Result<(), MirrorError> {
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
        match advice {
            Advice::ReadMostly => {
                dev.read_mostly.retain(|r| !r.overlaps(range));
                dev.read_mostly.push(range);
            }
            Advice::Sequential | Advice::Random => {
                dev.fetch_advice.retain(|(r, _)| !r.overlaps(range));
                dev.fetch_advice.push((range, advice));
            }
            Advice::WillNeed => dev.will_need.push(range),
            Advice::PreferDevice => {
                dev.prefer_device.retain(|r| !r.overlaps(range));
                dev.prefer_device.push(range);
            }
            Advice::Default => {
                dev.prefer_device.retain(|r| !r.overlaps(range));
                dev.read_mostly.retain(|r| !r.overlaps(range));
                dev.fetch_advice.retain(|(r, _)| !r.overlaps(range));
                dev.will_need.retain(|r| !r.overlaps(range));
            }
        }
    }

    /// `Err(DeviceLost)` once the device was declared lost: it could not
    /// clear entries naming memory the mirror freed, or could not give back
    /// data it holds. Every call that uses the device returns it from then
    /// on.
    pub fn health(&self) -> Result<(), MirrorError> {
        self.same_process()?;
        self.inner.lock().health.check()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MirrorStats {
        let c = &self.inner.counters;
        let g = Counters::get;
        let dev = self.inner.lock();
        let (pool_used, pool_capacity) = dev.res.usage();
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
            speculated: g(&c.speculated),
            speculated_used: g(&c.speculated_used),
            refreshed: g(&c.refreshed),
            refreshed_used: g(&c.refreshed_used),
            device_errors: g(&c.device_errors),
            mapped_pages: dev.table.mapped_pages(),
            pool_used,
            pool_capacity,
            table_pages_used: u64::from(dev.table.table_pages_used()),
            foreign_checked_pages: g(&c.foreign_checked_pages),
            foreign_changed_pages: g(&c.foreign_changed_pages),
            migrated_out: g(&c.migrated_out),
            migrated_in: g(&c.migrated_in),
            fault_backs: g(&c.fault_backs),
            fault_backs_on_reader: g(&c.fault_backs_on_reader),
            exclusive_revoked: g(&c.exclusive_revoked),
            fault_back_span: g(&c.fault_back_span),
            preferred_refused: g(&c.preferred_refused),
            fault_back_time: Counters::duration(&c.fault_back_ns),
            phases: c.phases(),
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

    /// Tells the mirror that the protection of `range` changed
    /// (`mprotect`, narrowing or widening): the kernel reports no event for
    /// it, so without this call the device keeps the access it had. After
    /// it returns, every later launch sees the protection the CPU has now:
    /// a device write to memory made read-only is a typed
    /// [`MirrorError::DeviceFault`], and a write to memory made writable
    /// again succeeds.
    ///
    /// It drops the host's cached view of the mappings in `range` (their
    /// permissions included) and invalidates `range` as
    /// [`EventKind::Protection`] on the whole address space, so every
    /// mirror of it — not just this one — refaults the range. Errors:
    /// [`MirrorError::WrongProcess`] in a forked child.
    pub fn protection_changed(&self, range: VaRange) -> Result<(), MirrorError> {
        self.same_process()?;
        let host = &self.inner.host;
        host.forget_mappings(range);
        host.space().invalidate(range, EventKind::Protection);
        Ok(())
    }

    /// Waits (up to 10 s) until every region that died so far is
    /// released — by the deferred-release worker, or by a fault that met it
    /// first — including releases already under way; returns whether they
    /// were. For tests and orderly shutdown. False at once in a forked
    /// child.
    pub fn flush_releases(&self) -> bool {
        if self.same_process().is_err() {
            return false;
        }
        let t0 = std::time::Instant::now();
        loop {
            {
                let dev = self.inner.lock();
                // A region the worker has taken out of the map is no longer
                // marked dead there, but its release is still running.
                if dev.releasing == 0 && !dev.regions.values().any(|r| r.dead) {
                    return true;
                }
            }
            if t0.elapsed() >= Duration::from_secs(10) {
                return false;
            }
            // Under loom a sleep would not let the model schedule the
            // worker; yielding does.
            #[cfg(hmm_loom)]
            crate::sync::thread::yield_now();
            #[cfg(not(hmm_loom))]
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl<B: Backend, H: HostSide> Drop for Mirror<B, H> {
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
        // Every migrated page back to the CPU first, while its region is
        // still watched and the device still holds it; unmaps that
        // returned are handled before (their armed ranges are then not
        // disarmed: the addresses may hold another mapping by now).
        let _ = inner.host.settle();
        inner.give_everything_back();
        // Fails only if the worker already ended.
        let _ = inner.release_tx.send(ReleaseMsg::Shutdown);
        if let Some(w) = self.worker.take() {
            // A worker that panicked has nothing left to release.
            let _ = w.join();
        }
        if let Some(h) = self.young.take() {
            // Only fails if the space is already torn down.
            let _ = h.unregister();
        }
        // Remove every region (blocking: waits out running callbacks), then
        // free the device memory they held.
        let slots: Vec<RegionSlot<B, H>> = std::mem::take(&mut inner.lock().regions)
            .into_values()
            .collect();
        for mut s in slots {
            if s.watched {
                // Teardown: a watch that cannot be ended is ended with the
                // host's own teardown.
                let _ = inner.host.unwatch(s.range, inner.writes);
            }
            if let Some(sub) = s.sub.take() {
                // Not inside a callback: waits until none can run.
                let _ = sub.remove();
            }
        }
        let mut dev = inner.lock_idle();
        let pins: Vec<PinnedRange> = std::mem::take(&mut dev.pinned).into_values().collect();
        dev.res.teardown();
        // Nothing is written back at teardown (as before: the user dropped
        // the mirror); entries are cleared and memory released through the
        // usual path, and a failure is latched with nobody left to tell.
        inner.zap_quietly(&mut dev, VaRange::everything(), false);
        inner.flush_quietly(&mut dev);
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
