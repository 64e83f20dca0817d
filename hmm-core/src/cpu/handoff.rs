//! The event monitor's hand-off from the thread that *reads* userfaultfd
//! events to the thread that *handles* them.
//!
//! # Why two threads
//!
//! A thread that causes a non-cooperative event (`munmap`, `madvise`,
//! `mremap`, `brk`) sleeps in the kernel until the event is **read**. If
//! the same thread that reads events also runs the invalidation sinks, a
//! sink that waits for anything that thread holds deadlocks. glibc makes
//! that easy: `free()` can trim the heap (`brk`, `madvise`) while holding
//! a malloc arena lock, and a sink that allocates then waits for that lock
//! while the trimming thread waits for its event to be read — found by the
//! API fuzzer (`hmm-fuzz`) as a hang of the cpu driver. `fork()` with
//! `EVENT_FORK` is the same shape (glibc takes every arena lock before the
//! kernel waits for the `FORK` message to be read).
//!
//! So the reader only reads: into a preallocated buffer, then into this
//! queue, whose ring is allocated once, up front — it never calls the
//! allocator, takes no lock a sink can hold, and every event it reads
//! releases its causing thread at once. A second thread pops events and
//! runs the sinks, which may allocate (a thread they wait for is no longer
//! waiting for a read).
//!
//! # What a sync point can rely on
//!
//! [`EventQueue::quiet`] is true only when the reader holds nothing
//! (`busy` even: it makes `busy` odd *before* each `read(2)` and even
//! again once what it read is queued), nothing is queued or being handled
//! (`pending`, incremented before an event is queued, decremented after
//! its handler returned), and the kernel has nothing to read — checked
//! between two loads of `busy` that must agree, so a read that started in
//! between is waited for too. A thread that caused an event resumes when
//! the event is read; once it then sees `quiet`, its event has been
//! handled. All of it is `SeqCst`: a handful of operations per event, and
//! the argument above is about one total order. Model-checked in
//! `tests/loom.rs` (`monitor_handoff_*`).
//!
//! # The one bound
//!
//! The ring holds [`EventQueue::new`]'s `cap` events. If the handler falls
//! that far behind, the reader waits for room — and only then could the
//! deadlock above return (a handler waiting for a lock held by a thread
//! whose event is not read yet). The monitor sizes the ring at 4,096
//! events; a handler is blocked only until the reader reads the event of
//! the thread it waits for, which with room in the ring is at once.

use std::collections::VecDeque;

use crate::sync::{lock, AtomicU64, Condvar, Mutex, Ordering};

/// A bounded, preallocated queue from one reader to one handler, with the
/// bookkeeping a sync point needs (see the module docs).
pub struct EventQueue<T> {
    state: Mutex<State<T>>,
    /// Signalled when an item is queued or the queue stops.
    ready: Condvar,
    /// Signalled when an item is taken.
    room: Condvar,
    /// Odd while the reader holds items not yet queued.
    busy: AtomicU64,
    /// Items queued or being handled.
    pending: AtomicU64,
    cap: usize,
}

struct State<T> {
    items: VecDeque<T>,
    stopping: bool,
}

impl<T> EventQueue<T> {
    /// A queue of at most `cap` (at least 1) items, allocated now: pushing
    /// never allocates.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        EventQueue {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(cap),
                stopping: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            busy: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            cap,
        }
    }

    /// Reader: about to read from the kernel (before the `read(2)`).
    pub fn begin_read(&self) {
        // SeqCst: see the module docs (one total order for quiet()).
        self.busy.fetch_add(1, Ordering::SeqCst);
    }

    /// Reader: queues one item read since [`EventQueue::begin_read`];
    /// waits for room if the ring is full. Never allocates.
    pub fn push(&self, item: T) {
        // SeqCst: counted before it is visible to the handler, so
        // `pending` never reads 0 while the item is in flight.
        self.pending.fetch_add(1, Ordering::SeqCst);
        let mut s = lock(&self.state);
        while s.items.len() >= self.cap {
            s = self.room.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        // Within the capacity reserved in `new`: no reallocation.
        s.items.push_back(item);
        drop(s);
        self.ready.notify_one();
    }

    /// Reader: what was read is queued.
    pub fn end_read(&self) {
        // SeqCst: see the module docs.
        self.busy.fetch_add(1, Ordering::SeqCst);
    }

    /// Handler: the next item, waiting for one; `None` once the queue was
    /// stopped and is empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = lock(&self.state);
        loop {
            if let Some(item) = s.items.pop_front() {
                drop(s);
                self.room.notify_one();
                return Some(item);
            }
            if s.stopping {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Handler: the item last popped has been handled.
    pub fn done(&self) {
        // SeqCst: after the handler's effects, for quiet().
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether every item pushed so far has been handled (none queued,
    /// none being handled). The reader asks it at shutdown, reading on
    /// until it holds ([`super::monitor`], "Shutdown").
    pub fn handled_all(&self) -> bool {
        // SeqCst: `pending` is decremented (SeqCst) after the handler's
        // effects; see the module docs.
        self.pending.load(Ordering::SeqCst) == 0
    }

    /// No more items will be pushed: [`EventQueue::pop`] returns `None`
    /// once the queue is empty.
    pub fn stop(&self) {
        lock(&self.state).stopping = true;
        self.ready.notify_all();
    }

    /// Whether nothing is in flight: the reader holds nothing, nothing is
    /// queued or being handled, and `kernel_has_events` (asked in between)
    /// says nothing waits to be read.
    pub fn quiet(&self, kernel_has_events: impl FnOnce() -> bool) -> bool {
        // SeqCst throughout: see the module docs.
        let s = self.busy.load(Ordering::SeqCst);
        s.is_multiple_of(2)
            && self.pending.load(Ordering::SeqCst) == 0
            && !kernel_has_events()
            && self.busy.load(Ordering::SeqCst) == s
    }
}
