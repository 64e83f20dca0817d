//! The CPU side of one process, wired together: the notifier registry,
//! the mapping cache, the kernel-event monitor that keeps both current, CPU
//! write tracking, and `range_fault`.
//!
//! [`HostSpace`] is what a device mirror holds. Its event sink does, for
//! every kernel event and before anything else, the one thing that closes
//! the window the kernel leaves open (the unmapping thread runs on as soon
//! as the event is *read*): it starts the invalidation, which advances the
//! space sequence, runs every overlapping subscription's callback, and ends
//! it; only then does it update the mapping cache. A device write-back to
//! CPU memory must therefore re-check, under the driver lock right before
//! writing, that no invalidation reached the pages (the mirror checks that
//! their entries are still present). That closes the window for the
//! unmapping thread itself, which stays blocked until its event is read.
//! It cannot close it for *another* thread that maps new memory at the
//! freed address before the event is read: userspace learns of an unmap
//! only afterwards. `hmm_core::mirror` states what that leaves open.
//!
//! Sync points ([`HostSpace::sync_point`]) turn CPU writes to watched
//! ranges into [`EventKind::CpuWrite`] invalidations of exactly the written
//! pages (`WP_ASYNC` + `PAGEMAP_SCAN`); where the kernel lacks them, every
//! watched range counts as written, and the degradation is reported.

use std::sync::Arc;

use super::maps::{Mapping, MappingCache, MapsError};
use super::migration::{Detached, FaultBack, Migration};
use super::monitor::{EventCounts, EventMonitor, InvalidationSink, MonitorError};
use super::probe::Capabilities;
use super::range_fault::{FaultError, RangeFaulter};
use super::write_track::{TrackError, TrackMode, WriteTracker};
use crate::addr::{VaRange, VirtAddr};
use crate::notifier::{AddressSpace, EventKind, NotifierHandle, NotifierRange, SpaceNotifier};

/// Errors of the host space.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// Event monitor failure.
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    /// Write tracking failure.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// Reading the memory map failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// Setting up `range_fault` failed.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// Device-private migration is unavailable, or moving pages out failed
    /// (nothing was moved).
    #[error("migration: {0}")]
    Migration(String),
}

/// What became of a page given back to the CPU ([`HostSpace::give_back`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveBack {
    /// Installed (write-protected: the next CPU write is tracked).
    Installed,
    /// A page is already there (someone gave it back first).
    Present,
    /// The memory is gone (unmapped, or no longer armed): nothing to give
    /// back to.
    Gone,
    /// Not installed, and the page is still missing: the kernel refused
    /// for now (a layout change is pending: `EAGAIN`) and the caller may
    /// not wait — it runs on the event monitor's reader, the thread that
    /// must read that change first ([`on_reader`](super::monitor::on_reader)).
    /// The page's data is still the caller's to give back later.
    Busy,
}

/// Turns kernel events into invalidations, then cache updates.
struct Sink {
    /// Not an [`AddressSpace`] handle: the sink must not keep the space
    /// alive (teardown runs when the user's last handle drops). It holds a
    /// clone taken by [`HostSpace::new`], released when the monitor stops.
    space: AddressSpace,
    maps: Arc<MappingCache>,
    /// Set once the monitor runs (the server needs its userfaultfd).
    migration: Arc<std::sync::OnceLock<Arc<Migration>>>,
}

impl InvalidationSink for Sink {
    fn invalidate(&self, range: VaRange, kind: EventKind) {
        // First: the invalidation (sequence advance + callbacks). A callback
        // that panics must not leave the cache believing in a mapping the
        // kernel removed: finish the bookkeeping, then let the monitor see
        // the panic (it counts it and carries on).
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.space.invalidate(range, kind)
        }));
        // Then the bookkeeping. REMOVE discards pages, the mapping stays.
        if matches!(kind, EventKind::Unmap | EventKind::Remap | EventKind::Clear) {
            self.maps.untrust(range);
            self.maps.invalidate(range);
        }
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }

    fn remapped(&self, from: VirtAddr, to: VirtAddr, len: u64) {
        if let Ok(old) = VaRange::from_start_len(from, len) {
            self.maps.remap(old, to);
            if let Some(m) = self.migration.get() {
                m.remapped(old, to);
            }
        }
    }

    fn missing_fault(&self, page: VirtAddr) -> bool {
        self.migration.get().is_some_and(|m| m.serve_or_queue(page))
    }

    fn missing_fault_now(&self, page: VirtAddr) -> super::monitor::FaultNow {
        match self.migration.get() {
            Some(m) => m.serve_now(page),
            None => super::monitor::FaultNow::Left,
        }
    }
}

/// Drops the cached mappings of a range whose protection changed. The
/// kernel reports no `mprotect`; the explicit [`EventKind::Protection`]
/// invalidation (however it is made: `Mirror::protection_changed` or
/// [`AddressSpace::invalidate`]) is the only word of it, and the cached
/// permissions must not outlive it — narrowing or widening — or the next
/// device fault is judged by the old ones.
struct ForgetProtection {
    maps: Arc<MappingCache>,
}

impl SpaceNotifier for ForgetProtection {
    fn invalidate_range_start(&self, range: &NotifierRange) -> bool {
        if range.event == EventKind::Protection {
            self.maps.invalidate(range.range);
        }
        true
    }
}

/// How the host learns about CPU-side changes on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventSource {
    /// userfaultfd events (munmap, madvise, mremap, fork) are delivered.
    Userfaultfd,
    /// No userfaultfd: only explicit [`AddressSpace::invalidate`] calls keep
    /// device copies coherent. The string says why.
    ExplicitOnly(String),
}

/// The CPU side of a process, for device mirrors to build on.
pub struct HostSpace {
    // Field order is drop order: the monitor thread (and its sink's space
    // handle) must be gone before the space itself.
    monitor: Option<EventMonitor>,
    tracker: Option<WriteTracker>,
    /// [`ForgetProtection`]'s registration (unregistered before the space
    /// handle below drops).
    _protection: Option<NotifierHandle>,
    space: AddressSpace,
    maps: Arc<MappingCache>,
    faulter: RangeFaulter,
    source: EventSource,
    /// Device mirrors attached (coherence between devices needs to know).
    mirrors: std::sync::atomic::AtomicUsize,
    /// Every `watch` not yet matched by an `unwatch` (a multiset: regions
    /// of several mirrors may watch the same or overlapping ranges). The
    /// kernel registration of a page is dropped only when no entry covers
    /// it any more. The flag: the watch wants CPU-write tracking (zero-copy
    /// mirrors do not: their device reads the CPU's pages).
    watches: std::sync::Mutex<Vec<(VaRange, bool)>>,
    /// Device-private migration: owners of migrated ranges and the
    /// fault-back server (`None` without userfaultfd).
    migration: Arc<std::sync::OnceLock<Arc<Migration>>>,
}

impl std::fmt::Debug for HostSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSpace")
            .field("space", &self.space)
            .field("source", &self.source)
            .finish()
    }
}

impl HostSpace {
    /// Starts the CPU side. Without userfaultfd it still works, in
    /// explicit-invalidation mode, and says so on stderr once.
    pub fn new() -> Result<Self, HostError> {
        Self::with_space(AddressSpace::new())
    }

    /// Like [`HostSpace::new`] around an existing address space.
    pub fn with_space(space: AddressSpace) -> Result<Self, HostError> {
        let maps = Arc::new(MappingCache::new());
        // Only watched ranges are kept current by events.
        maps.require_trust();
        let faulter = RangeFaulter::with_parts(
            Arc::clone(&maps),
            super::pagemap::Pagemap::open().map_err(FaultError::from)?,
        );
        let caps = Capabilities::get();
        let migration = Arc::new(std::sync::OnceLock::new());
        let (monitor, source) = if caps.uffd_available() {
            let sink = Arc::new(Sink {
                space: space.clone(),
                maps: Arc::clone(&maps),
                migration: Arc::clone(&migration),
            });
            let m = EventMonitor::start(sink)?;
            let _ = migration.set(Arc::new(Migration::new(&m.uffd())));
            (Some(m), EventSource::Userfaultfd)
        } else {
            let why = caps
                .degradations()
                .into_iter()
                .next()
                .unwrap_or_else(|| "userfaultfd unavailable".to_owned());
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| tracing::warn!(target: "hmm_rs", "{why}; mirrors follow explicit invalidation only"));
            (None, EventSource::ExplicitOnly(why))
        };
        let tracker = monitor.as_ref().map(EventMonitor::write_tracker);
        if let Some(TrackMode::Degraded(why)) = tracker.as_ref().map(WriteTracker::mode) {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(
                || tracing::warn!(target: "hmm_rs", "CPU-write tracking degraded: {why}"),
            );
        }
        // Fails only on a torn-down space, whose invalidations reach no one.
        let protection = space
            .register_notifier(Arc::new(ForgetProtection {
                maps: Arc::clone(&maps),
            }))
            .ok();
        Ok(HostSpace {
            monitor,
            tracker,
            _protection: protection,
            space,
            maps,
            faulter,
            source,
            mirrors: std::sync::atomic::AtomicUsize::new(0),
            watches: std::sync::Mutex::new(Vec::new()),
            migration,
        })
    }

    /// The notifier registry.
    pub fn space(&self) -> &AddressSpace {
        &self.space
    }

    /// The mapping cache (kept current by events).
    pub fn maps(&self) -> &Arc<MappingCache> {
        &self.maps
    }

    /// The page-state snapshotter.
    pub fn faulter(&self) -> &RangeFaulter {
        &self.faulter
    }

    /// How many device mirrors are attached to this space.
    pub fn mirrors_attached(&self) -> usize {
        // Relaxed: a hint for coherence policy; the invalidations that
        // policy issues are themselves synchronised by the notifier.
        self.mirrors.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn attach_mirror(&self) {
        // Relaxed: see `mirrors_attached`.
        self.mirrors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn detach_mirror(&self) {
        // Relaxed: see `mirrors_attached`.
        self.mirrors
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where invalidations come from on this machine.
    pub fn event_source(&self) -> &EventSource {
        &self.source
    }

    /// Events handled so far (all zero without userfaultfd).
    pub fn event_counts(&self) -> EventCounts {
        self.monitor
            .as_ref()
            .map(EventMonitor::counts)
            .unwrap_or_default()
    }

    /// The mapping containing `addr`, if any.
    pub fn lookup(&self, addr: VirtAddr) -> Result<Option<Mapping>, HostError> {
        Ok(self.maps.lookup(addr)?)
    }

    /// The CPU-write tracker, where this space has an event monitor.
    pub fn write_tracker(&self) -> Option<&WriteTracker> {
        self.tracker.as_ref()
    }

    /// Starts watching `range` (page aligned, inside one or more mappings)
    /// for kernel events and CPU writes. Call it when a region becomes
    /// mirrored. Without userfaultfd, does nothing.
    pub fn watch(&self, range: VaRange) -> Result<(), HostError> {
        self.watch_with(range, true)
    }

    /// [`HostSpace::watch`] for kernel events only: CPU writes to `range`
    /// are not tracked on this watch's behalf (no write protection armed,
    /// nothing scanned at sync points) — for a zero-copy mirror, whose
    /// device reads the CPU's own pages. Another watch of the same pages
    /// that wants tracking still gets it.
    pub fn watch_untracked(&self, range: VaRange) -> Result<(), HostError> {
        self.watch_with(range, false)
    }

    fn watch_with(&self, range: VaRange, track: bool) -> Result<(), HostError> {
        if let Some(m) = &self.monitor {
            {
                // Register and record under one lock, the lock `unwatch`
                // holds while it computes and unregisters what no watch
                // covers: otherwise an `unwatch` of an overlapping (dead)
                // range could run between the two, unregister the range we
                // just registered, and leave it mirrored with neither
                // events nor write tracking (found by `hmm-stress`).
                let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
                // The whole mapping is registered where it can be (an
                // `mremap` of a buffer split by a partial registration
                // fails with EFAULT; `EventMonitor::watch_within`).
                // The latest read of the maps serves: the span is only a
                // hint (a stale one fails to register, and `range` alone
                // is registered instead).
                let cached = self
                    .maps
                    .lookup_in_epoch(range.start(), self.maps.current_epoch());
                let span = match cached {
                    Ok(Some(mp))
                        if mp.range.start() <= range.start() && range.end() <= mp.range.end() =>
                    {
                        mp.range
                    }
                    _ => range,
                };
                m.watch_within(range, span)?;
                w.push((range, track));
            }
            if let Some(t) = self.tracker.as_ref().filter(|_| track) {
                if let Err(e) = arm_retrying(t, range) {
                    // Registered but not armed (typically: the memory was
                    // replaced between the two, so the scan finds a VMA
                    // that is not registered): a watch that tracks nothing
                    // must not stay, or a mirror would hold copies whose
                    // CPU writes go unseen. End it; the caller decides.
                    let _ = self.unwatch_with(range, track);
                    return Err(e);
                }
            }
            // Events cover it from now on: trust the cache there. (Callers
            // choose regions from a fresh read of the maps, so what is
            // cached for the range is current.)
            self.maps.trust(range);
        }
        Ok(())
    }

    /// Stops watching `range` (one [`HostSpace::watch`] of exactly it).
    pub fn unwatch(&self, range: VaRange) -> Result<(), HostError> {
        self.unwatch_with(range, true)
    }

    /// Ends one [`HostSpace::watch_untracked`] of exactly `range`.
    pub fn unwatch_untracked(&self, range: VaRange) -> Result<(), HostError> {
        self.unwatch_with(range, false)
    }

    /// Ends the watch `(range, track)`: the flag must match, or a copy-mode
    /// mirror's tracked watch of the same range could be the one removed,
    /// leaving its CPU writes unscanned.
    fn unwatch_with(&self, range: VaRange, track: bool) -> Result<(), HostError> {
        let Some(m) = &self.monitor else {
            return Ok(());
        };
        // Drop one matching watch, then unregister only the parts of
        // `range` no remaining watch covers.
        // Held until the kernel registrations are dropped (see `watch`).
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let uncovered = {
            if let Some(i) = w.iter().position(|&(r, t)| r == range && t == track) {
                w.swap_remove(i);
            }
            let mut covers: Vec<VaRange> =
                w.iter().filter_map(|(r, _)| r.intersect(range)).collect();
            covers.sort();
            let mut out = Vec::new();
            let mut at = range.start();
            for c in covers {
                if c.start() > at {
                    if let Ok(gap) = VaRange::new(at, c.start()) {
                        out.push(gap);
                    }
                }
                at = at.max(c.end());
            }
            if at < range.end() {
                if let Ok(gap) = VaRange::new(at, range.end()) {
                    out.push(gap);
                }
            }
            out
        };
        for piece in uncovered {
            self.maps.untrust(piece);
            m.unwatch_within(piece)?;
        }
        drop(w);
        Ok(())
    }

    /// Tells write tracking that `pages` were just written by the mirror
    /// itself (a device write-back), so the next sync point does not report
    /// them as CPU writes and drop the device copies that are now equal to
    /// them. Callers must protect *before* they copy the pages or check
    /// them: a CPU write that lands before the protection is then in what
    /// they copied (or shows as a difference when they verify), and one
    /// after it is reported by the next sync point. Protecting after
    /// copying would swallow a CPU write landing in between.
    ///
    /// Runs are armed, not whole 2 MiB blocks, even in memory backed by
    /// transparent huge pages. The watch armed the whole block (a region
    /// is one block, so arming splits nothing: `hmm_conformance`'s
    /// `huge_pages_the_device_never_touched_stay_huge` checks it); under
    /// `WP_ASYNC` the kernel splits an armed huge page at its first write,
    /// so by the time a write-back re-arms, its own stores have split the
    /// block. Arming the rest of the block as well would re-protect pages
    /// the CPU wrote since the last sync point and lose those writes.
    pub fn rearm_after_writeback(&self, pages: &[VirtAddr]) -> Result<(), HostError> {
        let Some(t) = &self.tracker else {
            return Ok(());
        };
        let mut i = 0;
        while i < pages.len() {
            let start = pages[i];
            let mut end = start.0 + crate::addr::PAGE_SIZE;
            i += 1;
            while i < pages.len() && pages[i].0 == end {
                end += crate::addr::PAGE_SIZE;
                i += 1;
            }
            if let Ok(r) = VaRange::new(start, VirtAddr(end)) {
                t.arm(r)?;
            }
        }
        Ok(())
    }

    /// A sync point before a device launch: every CPU write to a watched
    /// page since the last sync point becomes a [`EventKind::CpuWrite`]
    /// invalidation of exactly the written pages (degraded: of each whole
    /// watched range). Returns the number of pages invalidated.
    ///
    /// After the scan it waits (bounded, 1 s) until the monitor has read
    /// and handled every pending kernel event: an `munmap`/`madvise` that
    /// returned before (or ran during) the scan has had its event read,
    /// but maybe not yet its invalidation — and the scan cannot report
    /// writes to pages that are gone.
    pub fn sync_point(&self) -> Result<u64, HostError> {
        let Some(m) = &self.monitor else {
            return Ok(0);
        };
        let mut runs = Vec::new();
        for w in self
            .tracker
            .as_ref()
            .map_or(Vec::new(), |_| self.tracked(m.watched()))
        {
            let Some(t) = &self.tracker else { break };
            if t.collect_into(w, &mut runs).is_err() {
                // The kernel refuses to scan a range whose mapping changed
                // under us (EPERM: no longer registered, e.g. unmapped and
                // mapped again before the event was read). Its event will
                // invalidate it; meanwhile drop the device copies of all of
                // it — always safe, merely conservative.
                runs.push(w);
            }
        }
        // An `munmap` or `mremap` clears page tables before it posts its
        // event: one that overlapped the scan hid the CPU writes to the
        // pages it was discarding (gone when the scan looked), and its
        // event was not there yet for `quiesce` to wait for — the launch
        // would then read the device's older copy of pages the CPU had
        // rewritten (found by `hmm-stress` with a small arena, where it
        // happened in most runs). Such an operation counts itself on the
        // userfaultfd until its event is read: wait for that (bounded),
        // then for its invalidation. One that starts after the scan is a
        // race in the program, as the README says.
        if !self.settle() {
            // Proceeding is the lesser harm (an event handler stuck behind
            // a slow notifier must not hang every launch), but it is not
            // silent: a page discarded meanwhile may be read as it was.
            tracing::warn!(
                target: "hmm_rs",
                "sync point: kernel events still unhandled after 1 s; proceeding"
            );
        }
        let mut pages = 0;
        for r in runs {
            pages += r.pages();
            self.space.invalidate(r, EventKind::CpuWrite);
        }
        Ok(pages)
    }
}

/// Device-private migration (`cpu::migration` has the protocol).
impl HostSpace {
    /// Whether migration works here: `Ok(None)` fully, `Ok(Some(why))`
    /// with the stated degradation, `Err(why)` not at all.
    pub fn migration_support(&self) -> Result<Option<&'static str>, String> {
        let Some(m) = &self.monitor else {
            return Err(match &self.source {
                EventSource::ExplicitOnly(why) => why.clone(),
                EventSource::Userfaultfd => "no event monitor".into(),
            });
        };
        super::migration::support(&m.uffd())
    }

    /// Moves the pages of `range` (page aligned, mapped, private
    /// anonymous, within one mapping, watched) out of the process and
    /// returns them; from now on a CPU access there waits for `owner`'s
    /// [`FaultBack::fault_back`]. Steps and guarantees: `cpu::migration`.
    pub fn detach_for_migration(
        &self,
        range: VaRange,
        owner: std::sync::Weak<dyn FaultBack>,
    ) -> Result<Detached, HostError> {
        let (Some(m), Some(mig)) = (&self.monitor, self.migration.get()) else {
            return Err(HostError::Migration("no userfaultfd monitor".into()));
        };
        self.migration_support().map_err(HostError::Migration)?;
        m.arm_missing(range)?;
        super::fork_prep::watch(&owner);
        mig.add_owner(range, owner).map_err(|e| {
            HostError::Migration(format!("cannot start the fault-back server: {e}"))
        })?;
        let len = range.len();
        super::migration::move_out(
            range,
            |to| m.expect_own_remap(range.start(), to, len),
            |to| m.forget_own_remap(range.start(), to, len),
            |d| m.is_registered(d),
            |d| m.unregister_scratch(d).map_err(std::io::Error::other),
            |d| m.forget_scratch(d),
        )
        .map_err(|e| HostError::Migration(format!("moving {range:?} out failed: {e}")))
    }

    /// Gives a migrated page back: installs `data` (one or more whole
    /// pages) at `at`, write-protected, and wakes threads waiting there.
    /// Retries (bounded, 1 s) while a layout change elsewhere makes the
    /// kernel refuse (`EAGAIN`) — except on the event monitor's reader,
    /// which must read that change itself: there a refusal is
    /// [`GiveBack::Busy`] at once.
    pub fn give_back(&self, at: VirtAddr, data: &[u8]) -> GiveBack {
        let Some(m) = &self.monitor else {
            return GiveBack::Gone;
        };
        let t0 = std::time::Instant::now();
        loop {
            // SAFETY: `at` is a missing page of an armed range (the
            // mirror's own migrated page); no Rust reference covers it.
            match unsafe { m.copy_in(at, data) } {
                Ok(_) => return GiveBack::Installed,
                Err(MonitorError::Uffd(crate::cpu::uffd::UffdError::Ioctl { source, .. })) => {
                    match source.raw_os_error() {
                        Some(libc::EEXIST) => {
                            if let Ok(r) = VaRange::from_start_len(at, data.len() as u64) {
                                m.wake(r);
                            }
                            return GiveBack::Present;
                        }
                        Some(libc::EAGAIN) if super::monitor::on_reader() => {
                            return GiveBack::Busy;
                        }
                        Some(libc::EAGAIN) if t0.elapsed() < std::time::Duration::from_secs(1) => {
                            std::thread::yield_now();
                        }
                        e => {
                            tracing::debug!(
                                target: "hmm_rs",
                                "give-back of {} bytes at {at}: errno {e:?}",
                                data.len()
                            );
                            return GiveBack::Gone;
                        }
                    }
                }
                Err(_) => return GiveBack::Gone,
            }
        }
    }

    /// Whether some page of `range` is armed for migration.
    pub fn is_armed(&self, range: VaRange) -> bool {
        self.monitor.as_ref().is_some_and(|m| m.is_armed(range))
    }

    /// Installs a zero page (write-protected) at every hole of `range`, an
    /// armed range none of whose pages is migrated (`UFFDIO_COPY`; a
    /// present page is left alone).
    pub fn fill_holes(&self, range: VaRange) {
        static ZERO: [u8; crate::addr::PAGE_SIZE as usize] = [0; crate::addr::PAGE_SIZE as usize];
        for p in range.page_addrs() {
            let _ = self.give_back(p, &ZERO);
        }
    }

    /// Poisons the missing pages of `range`: a CPU access gets `SIGBUS`
    /// (their only copy was on a device that is lost). Returns whether
    /// the kernel did it.
    pub fn poison(&self, range: VaRange) -> bool {
        self.monitor
            .as_ref()
            .is_some_and(|m| m.poison(range).is_ok())
    }

    /// Ends the arming of `range` ([`EventMonitor::disarm_missing`]): no
    /// page of it is migrated any more. Its write protection is re-armed,
    /// and a CPU write made while it was briefly unregistered may have
    /// gone unseen: the caller drops its device copies of `range`.
    pub fn disarm(&self, range: VaRange) {
        if let Some(m) = &self.monitor {
            if let Ok(parts) = m.disarm_missing(range) {
                if let Some(t) = &self.tracker {
                    for p in parts {
                        let _ = arm_retrying(t, p);
                    }
                }
            }
        }
    }
}

impl HostSpace {
    /// Waits (bounded: 1 s in all) until every kernel event caused so far
    /// has been read *and handled*: first until no `munmap`/`mremap`/
    /// `madvise` of a watched range is between changing page tables and
    /// having its event read ([`EventMonitor::layout_changing`]), then
    /// until nothing read is unhandled ([`EventMonitor::quiesce`]). Returns
    /// whether that happened (always `true` without userfaultfd).
    ///
    /// Why a mirror needs it before every submission, not only at the sync
    /// point: the thread that discards memory resumes as soon as its event
    /// is *read* and then zaps the pages, while the invalidation runs on
    /// the monitor's handler thread. A fault-service copy made in between
    /// can read the page half before and half after the zap — a word torn
    /// between old bytes and zeros — and pass its sequence check, because
    /// the handler has not bumped the sequence yet. Its entry is dropped
    /// as soon as the handler runs; a submission must not come first
    /// (`hmm-stress` with a small arena read such torn words on the GPU
    /// drivers, whose launches take long enough to hit the gap).
    ///
    /// Must not be called from an invalidation sink, nor with a lock held
    /// that a sink may take (the handler thread would wait for itself).
    pub fn settle(&self) -> bool {
        let Some(m) = &self.monitor else {
            return true;
        };
        let limit = std::time::Duration::from_secs(1);
        let t0 = std::time::Instant::now();
        let mut laid = true;
        while m.layout_changing() {
            if t0.elapsed() >= limit {
                laid = false;
                break;
            }
            std::thread::yield_now();
        }
        // Even after a timeout above: whatever was read gets handled.
        m.quiesce(limit.saturating_sub(t0.elapsed())) && laid
    }

    /// What a sync point scans: the watched ranges (as the monitor has
    /// them: a remap moves a watch to its new address) less the parts only
    /// untracked watches cover ([`HostSpace::watch_untracked`]).
    fn tracked(&self, watched: Vec<VaRange>) -> Vec<VaRange> {
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let untracked: Vec<VaRange> = w.iter().filter(|(_, t)| !*t).map(|(r, _)| *r).collect();
        if untracked.is_empty() {
            return watched;
        }
        let tracked: Vec<VaRange> = w.iter().filter(|(_, t)| *t).map(|(r, _)| *r).collect();
        drop(w);
        subtract(watched, &subtract(untracked, &tracked))
    }
}

/// `a` less every range of `b`.
fn subtract(a: Vec<VaRange>, b: &[VaRange]) -> Vec<VaRange> {
    let mut out = a;
    for s in b {
        out = out
            .into_iter()
            .flat_map(|r| {
                let mut keep = Vec::with_capacity(2);
                if r.overlaps(*s) {
                    if r.start() < s.start() {
                        keep.extend(VaRange::new(r.start(), s.start()));
                    }
                    if s.end() < r.end() {
                        keep.extend(VaRange::new(s.end(), r.end()));
                    }
                } else {
                    keep.push(r);
                }
                keep
            })
            .collect();
    }
    out
}

/// Arms write tracking of a freshly watched range. The kernel refuses
/// `UFFDIO_WRITEPROTECT` with `EAGAIN` while a non-cooperative event (an
/// `munmap` or `madvise` anywhere in the process) waits to be read; the
/// monitor thread reads it promptly, so retry for a bounded time instead of
/// giving the range up as unwatched (found by `hmm-stress`). Callers hold
/// no lock the monitor's sink could need.
fn arm_retrying(t: &WriteTracker, range: VaRange) -> Result<(), HostError> {
    let t0 = std::time::Instant::now();
    loop {
        match t.arm(range) {
            Err(crate::cpu::write_track::TrackError::Protect(
                crate::cpu::uffd::UffdError::Ioctl { ref source, .. },
            )) if source.raw_os_error() == Some(libc::EAGAIN)
                && t0.elapsed() < std::time::Duration::from_secs(1) =>
            {
                std::thread::yield_now();
            }
            r => return Ok(r?),
        }
    }
}
