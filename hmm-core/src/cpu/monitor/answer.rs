//! The reader's own answer to a missing-page fault
//! ([`InvalidationSink::missing_fault_now`]) and its lingering after one:
//! the two things the monitor's reader does besides reading and queueing.

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use super::{bump, FaultNow, Shared};
use crate::addr::{VaRange, PAGE_SIZE};
use crate::cpu::sys;
use crate::cpu::uffd::{Features, UffdEvent};

/// How long the reader keeps reading without sleeping after it answered a
/// fault itself (`Shared::linger`).
const LINGER: std::time::Duration = std::time::Duration::from_micros(50);

impl Shared {
    /// On the reader, as it reads `ev`: a missing-page fault in an armed
    /// range that the sink resolves at once
    /// ([`InvalidationSink::missing_fault_now`]) and keeps from the
    /// handler, counted as handled; `false` queues the event as any other.
    ///
    /// Only with nothing queued before it still unhandled: the reader is
    /// the queue's only producer, so once it sees every earlier event
    /// handled ([`EventQueue::handled_all`], whose counter the handler
    /// decrements after the sink returned), nothing it read before the
    /// fault — a discard or an unmap of the page, say — can still be on its
    /// way to the sink: the fault never overtakes one (the loom model
    /// `reader_serves_only_after_earlier_events`). Every lock on the way is
    /// try-locked.
    pub(super) fn resolved_now(
        &self,
        ev: &Result<UffdEvent, crate::cpu::uffd::DecodeError>,
    ) -> bool {
        let Ok(UffdEvent::Pagefault {
            addr, wp: false, ..
        }) = ev
        else {
            return false;
        };
        if !self.queue.handled_all() {
            return false;
        }
        // With `FORK` events the reader must never call the allocator (see
        // "Fork"). Serving avoids it, but the last reference to an owner
        // dropped here would free it: not worth the risk for an opt-in.
        if self
            .uffd
            .features()
            .contains(Features(sys::UFFD_FEATURE_EVENT_FORK))
        {
            return false;
        }
        let Ok(page) = VaRange::from_start_len(addr.page_down(), PAGE_SIZE) else {
            return false;
        };
        let armed = match self.missing.try_lock() {
            Ok(m) => m.covers(page),
            Err(_) => return false,
        };
        if !armed {
            return false;
        }
        match catch_unwind(AssertUnwindSafe(|| {
            self.sink.missing_fault_now(page.start())
        })) {
            Ok(FaultNow::Resolved) => {
                bump(&self.counters.missing_faults);
                bump(&self.counters.missing_faults_on_reader);
                true
            }
            Ok(FaultNow::ResolvedTellHandler) => {
                // Counted in `missing_faults` by the handler.
                bump(&self.counters.missing_faults_on_reader);
                false
            }
            Ok(FaultNow::Left) => false,
            Err(_) => {
                // The handler gets it next: it may still be unresolved.
                bump(&self.counters.sink_panics);
                false
            }
        }
    }

    /// After the reader answered a fault itself, it keeps reading without
    /// sleeping for a short while ([`LINGER`]), as long as it goes on
    /// answering: a thread reading sparse migrated memory faults again
    /// microseconds after it resumes, and on a VM a wake-up of a reader
    /// asleep in `poll(2)` on an idle vCPU costs tens of microseconds —
    /// more than the answer. Bounded: [`LINGER`] after the last fault
    /// answered here; events of other kinds are read and queued as usual
    /// meanwhile. Not on a machine with one CPU, where it would keep the
    /// faulting thread from running; it yields between reads.
    pub(super) fn linger(
        &self,
        buf: &mut Vec<Result<UffdEvent, crate::cpu::uffd::DecodeError>>,
    ) -> Result<(), ()> {
        let answered = || {
            self.counters
                .missing_faults_on_reader
                .load(Ordering::Relaxed)
        };
        if !self.may_linger {
            return Ok(());
        }
        let mut last = answered();
        if last == self.lingered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut until = std::time::Instant::now() + LINGER;
        while std::time::Instant::now() < until {
            // Polled first, read only when there is something: a read
            // marks the reader busy (`begin_read`), which a `quiesce`
            // waiting meanwhile must not see all the time.
            let mut fd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the fd stays open (owned by
            // `self`); a zero timeout never sleeps.
            if unsafe { libc::poll(&mut fd, 1, 0) } > 0 {
                self.drain(buf)?;
            }
            let now = answered();
            if now != last {
                last = now;
                until = std::time::Instant::now() + LINGER;
            }
            // Lets a thread runnable on this CPU (the faulting one, say)
            // run first.
            std::thread::yield_now();
        }
        // Relaxed: the reader's own bookkeeping (only it reads or writes
        // `lingered`).
        self.lingered.store(last, Ordering::Relaxed);
        Ok(())
    }
}
