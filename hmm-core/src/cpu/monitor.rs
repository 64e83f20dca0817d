//! The event monitor: kernel address-space changes → invalidations.
//!
//! # What it does
//!
//! [`EventMonitor`] owns one userfaultfd initialised with the
//! non-cooperative events `EVENT_UNMAP | EVENT_REMOVE | EVENT_REMAP`
//! (`EVENT_FORK` only on request, see "Fork" below; plus `WP_ASYNC | WP_UNPOPULATED` when offered, so the
//! [`WriteTracker`] can use the same fd — a mapping can be registered on
//! one userfaultfd only), a thread that `poll`s that fd and a shutdown
//! `eventfd` and reads events, and a thread that handles them. Every
//! event read becomes a call to [`InvalidationSink::invalidate`]:
//!
//! | kernel event | cause | sink call |
//! |---|---|---|
//! | `UNMAP` | `munmap`, shrinking `mremap`, `mmap(MAP_FIXED)` over the range | `invalidate(range, Unmap)` — the range given to `munmap`, which may reach past the watched part |
//! | `REMOVE` | `madvise(DONTNEED / REMOVE / FREE)` | `invalidate(range, Remove)` — clipped to one mapping |
//! | `REMAP` | `mremap` that moves | `invalidate(old, Remap)` then `remapped(from, to, len)`; the kernel then also sends `UNMAP` of the old range (checked on 6.18), which arrives as a second `invalidate(old, Unmap)` |
//! | `FORK` (opt-in) | `fork`/`clone` without `CLONE_VM` | none: the child's userfaultfd is closed at once, so **the child has no mirror** and its copy of the ranges is unregistered |
//! | page fault | a write to a page someone write-protected *without* `WP_ASYNC` | `invalidate(page, CpuWrite)`, then the page is un-protected (which wakes the writer) |
//!
//! `mprotect` produces **no** event (the kernel has none for it), nor do
//! swap-out, KSM merging or migration: a mirror is valid as of the last
//! sync point, and protection changes must come through the explicit API.
//!
//! # Registering without becoming the fault handler
//!
//! [`EventMonitor::watch`] registers a range in **write-protect mode with
//! nothing protected**. Non-cooperative events are delivered for any
//! registered range whatever its mode, while faults are delivered only for
//! what the mode claims: in WP mode only writes to *protected* pages, and
//! registering protects nothing. So ordinary first-touch faults never reach
//! us (checked by a test: a thread touching a never-populated watched page
//! completes at once). `MISSING` mode, by contrast, would make this process
//! the handler of every first touch: the touching thread sleeps until the
//! fault is resolved through the fd (also checked by a test, with a raw
//! userfaultfd). With `WP_ASYNC`, writes to pages the tracker protected are
//! resolved by the kernel and never delivered either.
//!
//! # Timing — what is guaranteed and what is not
//!
//! - `REMOVE` is delivered **before** the pages are zapped; `UNMAP` and
//!   `REMAP` **after** the old range is gone.
//! - In all three cases the thread that caused the event sleeps until the
//!   event is **read** from the fd — not until our invalidation finishes.
//!   Once `read(2)` returns, the unmapping thread may run on (zap, reuse the
//!   address range for a new mapping) concurrently with the sink.
//! - Events are read by one thread (`hmm-uffd-monitor`) and handled by
//!   another (`hmm-uffd-handler`), in order, through a preallocated queue
//!   (`handoff`): the reader never allocates and never waits for a sink,
//!   so a thread that caused an event is released at once whatever the
//!   sinks are doing.
//! - The handler calls [`InvalidationSink::invalidate`] first, before
//!   anything else is done with an event (only the in-place edit of the
//!   watch set comes before it: after the invalidation a new mapping at
//!   the same addresses may be registered, and a later edit would drop
//!   that registration from the set); an event counts as in flight from
//!   before the `read(2)` until its handler returned, so a sync point —
//!   and a mirror before each submission (`HostSpace::settle`) — can
//!   wait for it ([`EventMonitor::quiesce`]); and a consumer that writes
//!   device data back to CPU memory must re-check its invalidation
//!   sequence under its own lock right before the write: the sequence
//!   advanced by `invalidate` is what closes the window between "the
//!   kernel changed the mapping" and "the device stopped using it".
//!
//! # Rules for sinks (and why reading and handling are two threads)
//!
//! A sink that waited for a thread which is itself waiting for an event to
//! be read would deadlock if the sink ran on the reading thread. That is
//! easy to reach:
//!
//! - A thread calling `free()` can hold a malloc arena lock while glibc
//!   trims the heap with `madvise(MADV_DONTNEED)` / `brk` / `munmap` — and
//!   if that memory is watched, it then waits for its event to be read. A
//!   sink that allocates waits for that lock. The mirror's sinks allocate
//!   (zap lists, the dead-region channel, the mapping cache), and
//!   `hmm-fuzz` hung this way on the cpu driver when one thread did both.
//!   Now the reader reads the trimming thread's event while the handler
//!   waits for the lock, the trim completes, and the handler goes on.
//! - A sink that unmaps, `madvise`s or `mremap`s a *watched* range causes
//!   an event of its own; the reader reads it, so this no longer
//!   deadlocks, but a sink should still only update bookkeeping.
//!
//! The one bound: the queue holds 4,096 events; a reader that finds it
//! full waits for the handler (`handoff`, "The one bound").
//!
//! # Shutdown
//!
//! The reader unregisters every watched range, reads what is left, and
//! then reads on until the handler has handled everything queued; only
//! then does it stop the queue and wait for the handler. The handler may
//! be waiting for a device whose threads wait for an event of ours to be
//! read — lavapipe's worker freeing memory in a watched range while the
//! handler waits for a copy that worker runs (the handler serves CPU
//! faults on migrated memory itself, `cpu::migration`) — and an event
//! made after the last read of `stop` is still delivered to the fd. A
//! reader that waited for the handler first left such an event unread and
//! the fd open for ever (CI hung so); `tests/loom.rs`,
//! `monitor_shutdown_reads_on_until_handled`, has the model.
//!
//! A panicking sink is caught and counted ([`EventCounts::sink_panics`]);
//! the thread carries on so no unmapper is left waiting.
//!
//! # Fork
//!
//! Without `EVENT_FORK` the kernel silently drops the child's copy of the
//! registrations at fork: the child runs unmonitored and has no mirror,
//! and `fork()` never waits for us. With `EVENT_FORK`
//! ([`MonitorOptions::fork_events`], needs `CAP_SYS_PTRACE`) the kernel
//! instead creates a userfaultfd for the child, hands it to us in a `FORK`
//! message, and **`fork()` sleeps inside the kernel until the monitor
//! reads that message**. glibc's `fork()` takes every malloc arena lock
//! (its atfork handler) *before* entering the kernel, so if the monitor
//! thread is at that moment inside `malloc`/`free` — in a sink, or while
//! exiting — neither side can proceed. We observed exactly this hang in
//! this crate's own tests (a monitor thread blocked in the allocator, the
//! forking thread in `userfaultfd_event_wait_completion`). Since the event
//! buys nothing (we close the child's fd at once, which is what the kernel
//! does by itself without the feature), it is off by default. The parent's
//! mirror stays valid across fork: pages pinned for a device are copied
//! for the child eagerly, and everything else is reached by address.
//! (With the option on, `start` returns only after both monitor threads
//! are past their allocating start-up, shutdown unregisters every range
//! before the reader exits, and the reader never allocates, so a `FORK`
//! message is read whatever the handler thread's sinks are doing.)
//!
//! # The watch set
//!
//! The kernel drops the registration of a range when it is unmapped and
//! carries it along when a mapping moves; the monitor keeps its own watch
//! set ([`EventMonitor::watched`]) in step (an unmapped range leaves it, a
//! moved one follows to its new address). A message that cannot be
//! decoded might have been about any watched range, so all of them are
//! invalidated with [`EventKind::Clear`].
//!
//! Dropping the monitor stops and joins the thread, then closes the fd,
//! which unregisters every range (and clears any write protection).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread::JoinHandle;

use thiserror::Error;

mod range_set;
use range_set::RangeSet;

use super::handoff::EventQueue;
use super::probe::Capabilities;
use super::sys;
use super::uffd::{Features, OpenMode, RegisterMode, UffdError, UffdEvent, Userfaultfd};
use super::write_track::WriteTracker;
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::notifier::EventKind;

mod answer;
mod migration;

/// Receives the invalidations the monitor derives from kernel events.
pub trait InvalidationSink: Send + Sync + 'static {
    /// Called on the monitor's handler thread, in event order, for every
    /// kernel event, BEFORE anything else is done with the event.
    fn invalidate(&self, range: VaRange, kind: EventKind);

    /// Called after the `invalidate(old, Remap)` of a moving `mremap`:
    /// `[from, from + len)` now lives at `[to, to + len)`. Lets a mapping
    /// cache follow. Default: nothing.
    fn remapped(&self, from: VirtAddr, to: VirtAddr, len: u64) {
        let _ = (from, to, len);
    }

    /// A thread touched `page`, a missing page of a range armed with
    /// [`EventMonitor::arm_missing`] (device-private migration), and
    /// sleeps until someone resolves the fault ([`EventMonitor::copy_in`],
    /// [`EventMonitor::poison`]). Called on the handler thread, which
    /// must not wait: hand the fault to a thread that may. Return `false`
    /// if nobody will resolve it: the monitor then resolves it with a
    /// zero page (what the CPU reads from an anonymous hole). Default:
    /// `false`.
    fn missing_fault(&self, page: VirtAddr) -> bool {
        let _ = page;
        false
    }

    /// [`InvalidationSink::missing_fault`] on the monitor's *reader*
    /// thread, the moment the fault is read, when no event read before it
    /// is still unhandled: resolve it only if that needs no waiting at all
    /// — no lock that is not try-locked, no device work, no retry of a
    /// refused `UFFDIO_COPY` (a layout event only this thread can read
    /// makes the kernel refuse; [`on_reader`] says where a call runs), and
    /// no `malloc` or `free` (a thread trimming the heap holds the
    /// allocator's lock while it waits for its event to be read: see
    /// "Rules for sinks") — else return [`FaultNow::Left`], leaving the
    /// fault untouched for the handler (`missing_fault`). Saves the wake-up of the handler thread,
    /// which on a VM costs more than the answer (the `fault_floor` figures
    /// of `hmm-bench`). Default: `false`.
    fn missing_fault_now(&self, page: VirtAddr) -> FaultNow {
        let _ = page;
        FaultNow::Left
    }
}

/// What [`InvalidationSink::missing_fault_now`] did with a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultNow {
    /// Nothing: the fault goes to the handler as any other event.
    Left,
    /// Resolved (the thread is woken); the handler never sees it.
    Resolved,
    /// Resolved, and the handler should see it too (the sink has more to
    /// do for it, off the reader).
    ResolvedTellHandler,
}

std::thread_local! {
    /// Set on a monitor's reader thread (for [`on_reader`]).
    static ON_READER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is an event monitor's reader: code that may
/// run there ([`InvalidationSink::missing_fault_now`]) must never wait for
/// another event to be read — it is the thread that would read it.
pub fn on_reader() -> bool {
    ON_READER.with(|r| r.get())
}

/// Errors of the monitor.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// The userfaultfd could not be opened or used.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// Creating the shutdown eventfd or the thread failed.
    #[error("starting the monitor failed: {0}")]
    Start(#[source] io::Error),
    /// The monitor thread stopped after an unrecoverable read error; every
    /// watched range was unregistered.
    #[error("the monitor thread has stopped after a fatal error")]
    Stopped,
}

/// Events handled so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// `UNMAP` events.
    pub unmap: u64,
    /// `REMOVE` events.
    pub remove: u64,
    /// `REMAP` events.
    pub remap: u64,
    /// `FORK` events.
    pub fork: u64,
    /// Write-protect faults handled (only without `WP_ASYNC`).
    pub wp_faults: u64,
    /// Other page faults (woken; should never happen).
    pub unexpected_faults: u64,
    /// Missing-page faults in ranges armed for migration
    /// ([`EventMonitor::arm_missing`]).
    pub missing_faults: u64,
    /// Of those, faults the reader resolved the moment it read them
    /// ([`InvalidationSink::missing_fault_now`]).
    pub missing_faults_on_reader: u64,
    /// `REMAP` events the monitor's own migration caused
    /// ([`EventMonitor::expect_own_remap`]), consumed without an
    /// invalidation.
    pub own_remaps: u64,
    /// Messages that could not be decoded.
    pub bad_messages: u64,
    /// Sink calls that panicked.
    pub sink_panics: u64,
}

#[derive(Default)]
struct Counters {
    unmap: AtomicU64,
    remove: AtomicU64,
    remap: AtomicU64,
    fork: AtomicU64,
    wp_faults: AtomicU64,
    unexpected_faults: AtomicU64,
    missing_faults: AtomicU64,
    missing_faults_on_reader: AtomicU64,
    own_remaps: AtomicU64,
    bad_messages: AtomicU64,
    sink_panics: AtomicU64,
}

fn bump(c: &AtomicU64) {
    // Relaxed: an event counter; nothing is published through it.
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    uffd: Arc<Userfaultfd>,
    sink: Arc<dyn InvalidationSink>,
    watched: Mutex<RangeSet>,
    /// Whole mappings registered by [`EventMonitor::watch_within`], edited
    /// by events like `watched`. Lock order: `watched`, then `spans`.
    spans: Mutex<RangeSet>,
    /// Ranges registered `MISSING | WP` for migration
    /// ([`EventMonitor::arm_missing`]): a registration of a watched range
    /// or span never drops their `MISSING` mode. Lock order: after
    /// `watched` and `spans`.
    missing: Mutex<RangeSet>,
    /// `REMAP` events this process's migration is about to cause:
    /// `(from, to, len)`, consumed by the handler without an invalidation
    /// ([`EventMonitor::expect_own_remap`]).
    own_remaps: Mutex<Vec<(u64, u64, u64)>>,
    /// `missing_faults_on_reader` when the reader last lingered
    /// (`Shared::linger`).
    lingered: AtomicU64,
    /// More than one CPU: lingering cannot keep the faulting thread off
    /// the only one.
    may_linger: bool,
    counters: Counters,
    failed: AtomicBool,
    /// Events read and not yet handled: the reader (the monitor thread)
    /// pushes, the handler thread pops and runs the sinks (`handoff`).
    queue: EventQueue<Result<UffdEvent, super::uffd::DecodeError>>,
}

/// Events the reader may hold ahead of the handler (`handoff`, "The one
/// bound").
const QUEUE_EVENTS: usize = 4096;

impl Shared {
    fn watched(&self) -> MutexGuard<'_, RangeSet> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spans(&self) -> MutexGuard<'_, RangeSet> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn missing(&self) -> MutexGuard<'_, RangeSet> {
        self.missing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `range` in write-protect mode, and in missing mode too
    /// where it overlaps a range armed for migration: one VMA has one
    /// mode, and the armed pieces must keep theirs. (The kernel skips a
    /// registration whose modes the VMA already has, so `WP` over an armed
    /// range would change nothing today; registering the pieces says what
    /// is meant instead of relying on that.)
    fn register_wp(&self, range: VaRange) -> Result<(), UffdError> {
        let armed: Vec<VaRange> = self.missing().overlapping(range);
        if armed.is_empty() {
            return self.uffd.register(range, RegisterMode::WP).map(|_| ());
        }
        let both = RegisterMode(RegisterMode::MISSING.0 | RegisterMode::WP.0);
        let mut at = range.start();
        for a in armed {
            if a.start() > at {
                if let Ok(gap) = VaRange::new(at, a.start()) {
                    self.uffd.register(gap, RegisterMode::WP)?;
                }
            }
            self.uffd.register(a, both)?;
            at = a.end();
        }
        if at < range.end() {
            if let Ok(gap) = VaRange::new(at, range.end()) {
                self.uffd.register(gap, RegisterMode::WP)?;
            }
        }
        Ok(())
    }

    fn call_sink(&self, range: VaRange, kind: EventKind) {
        if catch_unwind(AssertUnwindSafe(|| self.sink.invalidate(range, kind))).is_err() {
            bump(&self.counters.sink_panics);
        }
    }

    fn handle(&self, ev: Result<UffdEvent, super::uffd::DecodeError>) {
        match ev {
            Ok(UffdEvent::Unmap { range }) => {
                // The set edit comes first (a short in-place edit under a
                // mutex): once the sink's invalidation has ended, a new
                // region may register the same addresses (a new mapping
                // there), and removing the range after that would drop the
                // new registration from the set — no sync point would scan
                // it again, and CPU writes to it would go unseen (found by
                // `hmm-stress`).
                self.watched().remove(range);
                self.spans().remove(range);
                self.missing().remove(range);
                self.call_sink(range, EventKind::Unmap);
                bump(&self.counters.unmap);
            }
            Ok(UffdEvent::Remove { range }) => {
                self.call_sink(range, EventKind::Remove);
                bump(&self.counters.remove);
            }
            Ok(UffdEvent::Remap { from, to, len }) => {
                // `decode` checked that both ends form valid ranges.
                let Ok(old) = VaRange::from_start_len(from, len) else {
                    bump(&self.counters.bad_messages);
                    return;
                };
                // Our own migration's move of a range's pages out: the
                // old range stays mapped and registered, and what moved is
                // the mirror's to handle — no invalidation (it would free
                // the slots that now hold the only copy).
                {
                    let mut own = self.own_remaps.lock().unwrap_or_else(|p| p.into_inner());
                    let key = (from.get(), to.get(), len);
                    if let Some(i) = own.iter().position(|o| *o == key) {
                        own.swap_remove(i);
                        bump(&self.counters.own_remaps);
                        return;
                    }
                }
                // Set edit first, as for `Unmap`.
                self.watched().shift(old, to);
                self.spans().shift(old, to);
                // A registration moves with its mapping.
                self.missing().shift(old, to);
                self.call_sink(old, EventKind::Remap);
                if catch_unwind(AssertUnwindSafe(|| self.sink.remapped(from, to, len))).is_err() {
                    bump(&self.counters.sink_panics);
                }
                bump(&self.counters.remap);
            }
            Ok(UffdEvent::Fork { child }) => {
                // Closing the child's fd unregisters its copy of our ranges:
                // the child runs without a mirror.
                drop(child);
                bump(&self.counters.fork);
            }
            Ok(UffdEvent::Pagefault { addr, wp, .. }) => {
                let Ok(page) = VaRange::from_start_len(addr.page_down(), PAGE_SIZE) else {
                    bump(&self.counters.bad_messages);
                    return;
                };
                if wp {
                    self.call_sink(page, EventKind::CpuWrite);
                    bump(&self.counters.wp_faults);
                    // Un-protecting wakes the writer.
                    if self.uffd.write_protect(page, false).is_err() {
                        let _ = self.uffd.wake(page);
                    }
                } else if self.missing().covers(page) {
                    bump(&self.counters.missing_faults);
                    match catch_unwind(AssertUnwindSafe(|| self.sink.missing_fault(page.start()))) {
                        Ok(true) => {}
                        Ok(false) => self.zero_fill(page),
                        Err(_) => {
                            // Never a zero page: the page may be migrated
                            // data. The thread faults again.
                            bump(&self.counters.sink_panics);
                            let _ = self.uffd.wake(page);
                        }
                    }
                } else {
                    bump(&self.counters.unexpected_faults);
                    let _ = self.uffd.wake(page);
                }
            }
            Err(_) => {
                bump(&self.counters.bad_messages);
                let all = self.watched().0.clone();
                for r in all {
                    self.call_sink(r, EventKind::Clear);
                }
            }
        }
    }

    /// Resolves a missing-page fault nobody else will with a zero page,
    /// write-protected so write tracking sees the next write (`EEXIST`:
    /// someone resolved it meanwhile; any other failure wakes the thread,
    /// which faults again or, if the range is gone, gets what the kernel
    /// gives it).
    fn zero_fill(&self, page: VaRange) {
        static ZERO: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        // SAFETY: `page` is missing (a fault waits on it); installing a
        // zero page there is what the kernel would do without us, and no
        // Rust reference of ours covers it.
        if unsafe { self.uffd.copy_in(page.start(), &ZERO, true) }.is_err() {
            let _ = self.uffd.wake(page);
        }
    }

    /// Reads everything pending, one batch per `read(2)`, and queues it
    /// for the handler thread. `buf` has room for a batch and the queue is
    /// preallocated, so the reader allocates nothing (`handoff`). Err on an
    /// unrecoverable error.
    fn drain(&self, buf: &mut Vec<Result<UffdEvent, super::uffd::DecodeError>>) -> Result<(), ()> {
        loop {
            buf.clear();
            // From before the read until the batch is queued: the thread
            // that caused an event resumes when it is read, and `quiesce`
            // must then find the event in flight (`handoff`).
            self.queue.begin_read();
            let r = self.uffd.read_events(buf);
            let r = match r {
                Ok(0) => Ok(true),
                Ok(_) => {
                    for ev in buf.drain(..) {
                        if !self.resolved_now(&ev) {
                            self.queue.push(ev);
                        }
                    }
                    Ok(false)
                }
                Err(UffdError::ShortRead(_)) => {
                    bump(&self.counters.bad_messages);
                    Ok(false)
                }
                Err(_) => Err(()),
            };
            self.queue.end_read();
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(()) => return Err(()),
            }
        }
    }

    /// Shutdown: unregister everything (no new event can then wait for a
    /// reader), then read what is already queued.
    fn stop(&self, buf: &mut Vec<Result<UffdEvent, super::uffd::DecodeError>>) {
        {
            let w = self.watched();
            for &r in &w.0 {
                let _ = self.uffd.unregister(r);
            }
            for &r in &self.spans().0 {
                let _ = self.uffd.unregister(r);
            }
        }
        let _ = self.drain(buf);
    }

    /// The handler thread: runs the sinks for every queued event, in
    /// order, until the queue stops.
    fn handle_events(&self, ready: &Barrier) {
        ready.wait();
        while let Some(ev) = self.queue.pop() {
            // `handle` catches sink panics; anything else it might raise
            // must not leave the event counted as pending forever.
            if catch_unwind(AssertUnwindSafe(|| self.handle(ev))).is_err() {
                bump(&self.counters.sink_panics);
            }
            self.queue.done();
        }
    }

    /// The reader thread: reads events until shutdown or a fatal error,
    /// then stops the handler and waits for it (it handles what was read).
    ///
    /// At shutdown it reads on until the handler has handled everything
    /// queued, and only then waits for it: a handler may be waiting for a
    /// device whose threads wait for an event of ours to be *read* —
    /// lavapipe's worker freeing memory in a watched range (`madvise`
    /// from `free`) while the handler waits for a copy that worker is to
    /// run. A reader waiting for that handler instead would leave the
    /// event unread, and the fd open, forever (seen in CI once the
    /// handler began serving faults itself). An event made after `stop`'s
    /// final read is still delivered to the fd; reading on answers it too.
    fn run(&self, shutdown: &OwnedFd, ready: &Barrier, handler: JoinHandle<()>) {
        if self.read_events(shutdown, ready) {
            let mut buf = Vec::with_capacity(Userfaultfd::READ_BATCH);
            while !self.queue.handled_all() {
                let mut fd = libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the fd stays open (owned by
                // `self`). A timeout, not a wake-up: the handler finishing
                // is not an fd event.
                unsafe { libc::poll(&mut fd, 1, 5) };
                if self.drain(&mut buf).is_err() {
                    break;
                }
            }
        }
        self.queue.stop();
        let _ = handler.join();
    }

    /// Reads until shutdown (`true`, after [`Shared::stop`]) or a fatal
    /// error (`false`, after [`Shared::fail`]).
    fn read_events(&self, shutdown: &OwnedFd, ready: &Barrier) -> bool {
        ON_READER.with(|r| r.set(true));
        let mut buf = Vec::with_capacity(Userfaultfd::READ_BATCH);
        // Thread start-up allocates; `start` returns only once we are past
        // it (see "Fork" in the module docs).
        ready.wait();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: shutdown.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds; both fds stay
            // open for the call (owned by `self` / the caller).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.fail();
                return false;
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                && (self.drain(&mut buf).is_err()
                    || fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0)
            {
                self.fail();
                return false;
            }
            if fds[1].revents != 0 {
                self.stop(&mut buf);
                return true;
            }
            if self.linger(&mut buf).is_err() {
                self.fail();
                return false;
            }
        }
    }

    /// Fatal error: stop delivering events by unregistering everything, so
    /// no unmapper waits for a reader that is gone.
    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        let mut w = self.watched();
        for r in std::mem::take(&mut self.spans().0) {
            let _ = self.uffd.unregister(r);
        }
        for r in std::mem::take(&mut w.0) {
            let _ = self.uffd.unregister(r);
            self.call_sink(r, EventKind::Clear);
        }
    }
}

/// Watches ranges for unmap / remove / remap / fork and reports them to an
/// [`InvalidationSink`] (see the module docs).
pub struct EventMonitor {
    shared: Arc<Shared>,
    shutdown: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    mode: OpenMode,
    wanted_events: Features,
    /// A page never registered on the userfaultfd, for
    /// [`EventMonitor::layout_changing`] (`None` if it could not be mapped:
    /// the check then answers `false`).
    probe: Option<super::scratch::ScratchMap>,
}

/// Monitor options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorOptions {
    /// Ask for `EVENT_FORK` (needs `CAP_SYS_PTRACE`). Off by default: see
    /// "Fork" in the module docs — it buys nothing but a way to deadlock
    /// `fork()`.
    pub fork_events: bool,
}

impl std::fmt::Debug for EventMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventMonitor")
            .field("mode", &self.mode)
            .field("features", &self.shared.uffd.features())
            .field("watched", &self.shared.watched().0)
            .finish()
    }
}

impl EventMonitor {
    /// Opens the userfaultfd and starts the monitor thread, with default
    /// options (no fork events).
    pub fn start<S: InvalidationSink>(sink: Arc<S>) -> Result<EventMonitor, MonitorError> {
        Self::start_with(sink, MonitorOptions::default())
    }

    /// [`EventMonitor::start`] with options.
    pub fn start_with(
        sink: Arc<dyn InvalidationSink>,
        options: MonitorOptions,
    ) -> Result<EventMonitor, MonitorError> {
        let mut events = Features(
            sys::UFFD_FEATURE_EVENT_UNMAP
                | sys::UFFD_FEATURE_EVENT_REMOVE
                | sys::UFFD_FEATURE_EVENT_REMAP,
        );
        if options.fork_events {
            events = events.union(Features(sys::UFFD_FEATURE_EVENT_FORK));
        }
        // POISON: a page whose only copy was on a lost device becomes a
        // SIGBUS, never a zero page (migration; granted where offered).
        let (uffd, mode) = Userfaultfd::open(
            events
                .union(Features::WP_TRACKING)
                .union(Features(sys::UFFD_FEATURE_POISON)),
        )?;
        // SAFETY: eventfd takes no pointers and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(MonitorError::Start(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd from the kernel; we are its only owner.
        let shutdown = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let mut set = RangeSet::default();
        set.reserve_spare();
        let mut spans = RangeSet::default();
        spans.reserve_spare();
        let shared = Arc::new(Shared {
            uffd: Arc::new(uffd),
            sink,
            watched: Mutex::new(set),
            spans: Mutex::new(spans),
            missing: Mutex::new(RangeSet::default()),
            own_remaps: Mutex::new(Vec::new()),
            lingered: AtomicU64::new(0),
            may_linger: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
            counters: Counters::default(),
            failed: AtomicBool::new(false),
            queue: EventQueue::new(QUEUE_EVENTS),
        });
        // Both threads pass their allocating start-up before `start`
        // returns (see "Fork" in the module docs).
        let ready = Arc::new(Barrier::new(3));
        let (h, hr) = (Arc::clone(&shared), Arc::clone(&ready));
        let handler = std::thread::Builder::new()
            .name("hmm-uffd-handler".into())
            .spawn(move || h.handle_events(&hr))
            .map_err(MonitorError::Start)?;
        let (s, sd, r) = (
            Arc::clone(&shared),
            Arc::clone(&shutdown),
            Arc::clone(&ready),
        );
        let thread = match std::thread::Builder::new()
            .name("hmm-uffd-monitor".into())
            .spawn(move || s.run(&sd, &r, handler))
        {
            Ok(t) => t,
            Err(e) => {
                // The handler waits at the barrier: it is left parked (a
                // thread that could not start is rare enough not to need
                // more); report the failure.
                return Err(MonitorError::Start(e));
            }
        };
        ready.wait();
        Ok(EventMonitor {
            shared,
            shutdown,
            thread: Some(thread),
            mode,
            wanted_events: events,
            probe: super::scratch::ScratchMap::new(1).ok(),
        })
    }

    /// How the userfaultfd was opened.
    pub fn open_mode(&self) -> OpenMode {
        self.mode
    }

    /// Features granted on the monitor's userfaultfd.
    pub fn features(&self) -> Features {
        self.shared.uffd.features()
    }

    /// Wanted event features the kernel did not grant (each one is an event
    /// class this monitor cannot see).
    pub fn missing_events(&self) -> Features {
        self.wanted_events.difference(self.features())
    }

    /// Starts watching `range` (page aligned, wholly mapped, anonymous or
    /// shmem): registers it in write-protect mode with nothing protected.
    pub fn watch(&self, range: VaRange) -> Result<(), MonitorError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(MonitorError::Stopped);
        }
        // Hold the set lock across the ioctl so an event for the range that
        // the thread handles right after registration finds it in the set.
        let mut w = self.shared.watched();
        self.shared.register_wp(range)?;
        w.insert(range);
        w.reserve_spare();
        Ok(())
    }

    /// [`EventMonitor::watch`] of `range`, registering the whole of `span`
    /// (which contains `range`: the mapping it lies in) with the kernel
    /// instead of `range` alone.
    ///
    /// Registering part of a mapping splits it into separate VMAs (their
    /// userfaultfd flags differ), and an `mremap` of a range that spans
    /// several VMAs fails with `EFAULT`: a program growing a buffer the
    /// mirror had partly registered got an error the mirror caused. A
    /// registration of the whole mapping keeps it one VMA; ranges of it
    /// watched later re-register only what the kernel does not already
    /// have (a registration of an already registered VMA with the same
    /// flags changes nothing). Only `range` is watched: sync points scan
    /// it, not the rest of `span`, whose pages are never armed. Where
    /// `span` cannot be registered (it has changed since the caller read
    /// it, or part of it cannot be) `range` alone is, as `watch` does.
    ///
    /// The registration of `span` stays until the memory is unmapped, the
    /// monitor stops, or the userfaultfd is closed:
    /// [`EventMonitor::unwatch_within`] ends the watch but not the
    /// registration (unregistering would split the mapping again). Until
    /// then `munmap`/`madvise(MADV_DONTNEED)`/`mremap` anywhere in `span`
    /// produce events, which the sink handles like any other (a range no
    /// mirror holds costs one invalidation that finds nothing).
    pub fn watch_within(&self, range: VaRange, span: VaRange) -> Result<(), MonitorError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(MonitorError::Stopped);
        }
        let mut w = self.shared.watched();
        let whole = span != range
            && span.start() <= range.start()
            && range.end() <= span.end()
            && self.shared.register_wp(span).is_ok();
        if whole {
            let mut s = self.shared.spans();
            s.insert(span);
            s.reserve_spare();
        } else {
            self.shared.register_wp(range)?;
        }
        w.insert(range);
        w.reserve_spare();
        Ok(())
    }

    /// Ends a watch started by [`EventMonitor::watch_within`]: `range` is
    /// no longer watched; its kernel registration ends only where it was
    /// registered alone (not inside a registered whole mapping, which
    /// stays one VMA; its pages keep whatever write protection they had,
    /// which costs a CPU write one fault the kernel resolves itself).
    pub fn unwatch_within(&self, range: VaRange) -> Result<(), MonitorError> {
        let mut w = self.shared.watched();
        if !self.shared.spans().covers(range) {
            self.unregister_unarmed(range)?;
        }
        w.remove(range);
        Ok(())
    }

    /// Stops watching `range` (also clears write protection there).
    pub fn unwatch(&self, range: VaRange) -> Result<(), MonitorError> {
        let mut w = self.shared.watched();
        self.unregister_unarmed(range)?;
        w.remove(range);
        Ok(())
    }

    /// Unregisters the parts of `range` not armed for migration. An armed
    /// range stays registered until it is disarmed
    /// ([`EventMonitor::disarm_missing`]) or its memory goes (its `UNMAP`
    /// or `REMAP` edits the armed set): an `unwatch` is often a dead
    /// region's late release, and memory mapped again at its addresses
    /// since may be armed and hold migrated holes — unregistered, a CPU
    /// read there would get a zero page instead of the device's data, and
    /// a migration between its arming and its move would find its move
    /// unregistered and give up (conformance `migrate_partial_unmap_fault`
    /// on the GPU drivers, 2 runs in 10).
    fn unregister_unarmed(&self, range: VaRange) -> Result<(), MonitorError> {
        let pieces = self.shared.missing().gaps(range);
        for p in pieces {
            self.shared.uffd.unregister(p)?;
        }
        Ok(())
    }

    /// Waits (up to `timeout`) until no event is waiting to be read and
    /// none is being handled; returns whether that happened. A thread that
    /// caused an event (`munmap`, `madvise`, `mremap`) resumes as soon as
    /// the event is *read*, before its invalidation ran; a sync point calls
    /// this after scanning for CPU writes, so every event caused before
    /// (or during) its scan has been through the sink before the launch
    /// that follows — that launch never runs on device copies such an
    /// invalidation was about to drop (found by `hmm-stress`). Must not be
    /// called from a sink (the handler thread would wait for itself).
    pub fn quiesce(&self, timeout: std::time::Duration) -> bool {
        let t0 = std::time::Instant::now();
        loop {
            // Nothing read and unhandled, nothing to read — checked so that
            // a read starting in between is waited for too (`handoff`).
            if self.shared.queue.quiet(|| self.readable()) {
                return true;
            }
            if t0.elapsed() > timeout || self.shared.failed.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Whether an `munmap`, `mremap` or `fork` touching a watched range is
    /// between clearing or moving page tables and having its event read
    /// ([`Userfaultfd::layout_changing`]). A sync point asks after its
    /// scan: such an operation may have hidden CPU writes from the scan
    /// (the pages were gone when it looked) while its event, posted only
    /// at its end, was not yet there for [`EventMonitor::quiesce`] to wait
    /// for.
    pub fn layout_changing(&self) -> bool {
        self.probe.as_ref().is_some_and(|p| {
            VaRange::from_start_len(VirtAddr(p.base()), p.len() as u64)
                .is_ok_and(|r| self.shared.uffd.layout_changing(r))
        })
    }

    /// Whether an event waits to be read (a zero-timeout `poll`).
    fn readable(&self) -> bool {
        let mut fd = libc::pollfd {
            fd: self.shared.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the fd stays open for the call (owned
        // by `self.shared`). A zero timeout never blocks.
        let r = unsafe { libc::poll(&mut fd, 1, 0) };
        r > 0 && fd.revents & libc::POLLIN != 0
    }

    /// The watched ranges, sorted and coalesced.
    pub fn watched(&self) -> Vec<VaRange> {
        self.shared.watched().0.clone()
    }

    /// Events handled so far.
    pub fn counts(&self) -> EventCounts {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EventCounts {
            unmap: l(&c.unmap),
            remove: l(&c.remove),
            remap: l(&c.remap),
            fork: l(&c.fork),
            wp_faults: l(&c.wp_faults),
            unexpected_faults: l(&c.unexpected_faults),
            missing_faults: l(&c.missing_faults),
            missing_faults_on_reader: l(&c.missing_faults_on_reader),
            own_remaps: l(&c.own_remaps),
            bad_messages: l(&c.bad_messages),
            sink_panics: l(&c.sink_panics),
        }
    }

    /// Whether the thread stopped after a fatal error.
    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// A CPU-write tracker on this monitor's userfaultfd. It only works on
    /// watched ranges and fails with `MonitorGone` once the monitor drops.
    pub fn write_tracker(&self) -> WriteTracker {
        WriteTracker::new(
            Arc::downgrade(&self.shared.uffd),
            self.features(),
            Capabilities::get().pagemap_scan.is_ok(),
        )
    }
}

impl Drop for EventMonitor {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.shutdown.as_raw_fd(),
                (&one as *const u64).cast(),
                core::mem::size_of::<u64>(),
            );
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // `shared` (and with it the last strong reference to the
        // userfaultfd, unless a tracker call is in flight) drops now,
        // closing the fd and unregistering everything.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> VaRange {
        VaRange::new(VirtAddr(a), VirtAddr(b)).unwrap()
    }

    #[test]
    fn range_set_tracks_holes_and_merges() {
        let mut s = RangeSet::default();
        s.insert(r(0x1000, 0x5000));
        s.insert(r(0x8000, 0x9000));
        s.remove(r(0x2000, 0x3000));
        assert_eq!(
            s.0,
            vec![r(0x1000, 0x2000), r(0x3000, 0x5000), r(0x8000, 0x9000)]
        );
        s.insert(r(0x2000, 0x3000));
        assert_eq!(s.0, vec![r(0x1000, 0x5000), r(0x8000, 0x9000)]);
        s.insert(r(0x5000, 0x8000));
        assert_eq!(s.0, vec![r(0x1000, 0x9000)]);
        assert_eq!(s.overlapping(r(0, 0x2000)), vec![r(0x1000, 0x2000)]);
        s.remove(r(0, u64::MAX));
        assert!(s.0.is_empty());
    }
}
