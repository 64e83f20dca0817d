//! End-to-end kernel-event tests through the whole host stack:
//! `HostSpace::new()` → userfaultfd monitor → sink → `AddressSpace`
//! invalidation → a subscription's callback, over real mappings.
//!
//! Each test maps its own range between two `PROT_NONE` guard pages (tests
//! run in parallel threads of one process; without guards the kernel could
//! merge neighbouring VMAs, and one test's unmap would then be another's
//! event), subscribes a recorder to it, watches it, performs one kernel
//! operation and checks exactly which invalidations reached the callback.
//!
//! Without userfaultfd each test prints a skip line naming why and passes,
//! unless `HMM_REQUIRE_UFFD=1` (CI), in which case it fails.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hmm_core::cpu::host::{EventSource, HostSpace};
use hmm_core::cpu::probe::Capabilities;
use hmm_core::notifier::{EventKind, Interval, IntervalNotifier, NotifierRange, Seq, Subscription};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

const PS: usize = PAGE_SIZE as usize;
/// How long to wait for an event that must come.
const WAIT: Duration = Duration::from_secs(5);
/// How long to listen for events that must not come.
const QUIET: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------- helpers

/// Fails the test with a clear line when userfaultfd is missing and
/// `HMM_REQUIRE_UFFD=1`; otherwise returns whether events are available.
fn events_available(host: &HostSpace) -> bool {
    let ok = matches!(host.event_source(), EventSource::Userfaultfd);
    assert!(
        ok || std::env::var("HMM_REQUIRE_UFFD").as_deref() != Ok("1"),
        "HMM_REQUIRE_UFFD=1 but userfaultfd is unavailable: {:?}",
        host.event_source()
    );
    ok
}

/// The host space, or `None` (after a skip line) without userfaultfd.
/// `events_available` fails the test instead when `HMM_REQUIRE_UFFD=1`.
fn host(test: &str) -> Option<HostSpace> {
    let host = HostSpace::new().expect("HostSpace::new");
    if events_available(&host) {
        Some(host)
    } else {
        eprintln!("skip {test}: {:?}", host.event_source());
        None
    }
}

/// Whether CPU-write tracking is precise here (`WP_ASYNC` + `PAGEMAP_SCAN`).
fn precise_tracking() -> bool {
    let caps = Capabilities::get();
    caps.wp_async_usable() && caps.pagemap_scan.is_ok()
}

type Event = (VaRange, EventKind);

/// What a recorder's callbacks saw.
#[derive(Default)]
struct Log {
    events: Mutex<Vec<Event>>,
    cv: Condvar,
}

impl Log {
    fn snapshot(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Waits up to [`WAIT`] until `done(events)`; returns the events then
    /// (the caller asserts on them, so a timeout fails with context).
    fn wait_until(&self, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + WAIT;
        let mut ev = self.events.lock().unwrap();
        while !done(&ev) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            ev = self.cv.wait_timeout(ev, left).unwrap().0;
        }
        ev.clone()
    }

    /// Waits for at least `n` events, then listens [`QUIET`] longer so that
    /// any extra (wrong) event is caught too.
    fn settle(&self, n: usize) -> Vec<Event> {
        self.wait_until(|e| e.len() >= n);
        std::thread::sleep(QUIET);
        self.snapshot()
    }

    /// Listens [`QUIET`] for events that must not come.
    fn quiet(&self) -> Vec<Event> {
        std::thread::sleep(QUIET);
        self.snapshot()
    }
}

/// A subscription's callbacks: record, and optionally panic on `Unmap`.
struct Recorder {
    log: Arc<Log>,
    panic_on_unmap: bool,
}

impl IntervalNotifier for Recorder {
    fn invalidate(&self, interval: &Interval, range: &NotifierRange, cur_seq: Seq) -> bool {
        // The "driver lock" is the log's mutex.
        let mut ev = self.log.events.lock().unwrap();
        interval.set_seq(cur_seq);
        ev.push((range.range, range.event));
        drop(ev);
        self.log.cv.notify_all();
        if self.panic_on_unmap && range.event == EventKind::Unmap {
            panic!("test callback panics on Unmap (expected)");
        }
        true
    }
}

fn recorder() -> (Recorder, Arc<Log>) {
    let log = Arc::new(Log::default());
    (
        Recorder {
            log: Arc::clone(&log),
            panic_on_unmap: false,
        },
        log,
    )
}

/// A recorder subscribed to `range`, with `range` watched for events.
fn watched(host: &HostSpace, range: VaRange) -> (Subscription<Recorder>, Arc<Log>) {
    let (rec, log) = recorder();
    let sub = host.space().insert(range, rec).unwrap();
    host.watch(range).unwrap();
    (sub, log)
}

/// `pages` read-write private anonymous pages between two `PROT_NONE`
/// guard pages. Drop unmaps the guards and whatever the test left mapped
/// of the middle, page run by page run, never a hole another thread may
/// have mapped meanwhile.
struct Guarded {
    base: usize,
    pages: usize,
    mapped: Vec<bool>,
}

impl Guarded {
    fn new(pages: usize) -> Guarded {
        let len = pages * PS;
        // SAFETY: reserves fresh address space at a kernel-chosen address;
        // nothing else refers to it.
        let guard = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + 2 * PS,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            guard,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let want = (guard as usize + PS) as *mut libc::c_void;
        // SAFETY: MAP_FIXED over the middle of our own reservation only.
        let p = unsafe {
            libc::mmap(
                want,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_eq!(p, want, "mmap: {}", std::io::Error::last_os_error());
        Guarded {
            base: want as usize,
            pages,
            mapped: vec![true; pages],
        }
    }

    fn addr(&self, page: usize) -> u64 {
        (self.base + page * PS) as u64
    }

    fn pages(&self, first: usize, n: usize) -> VaRange {
        VaRange::user_pages(VirtAddr(self.addr(first)), (n * PS) as u64).unwrap()
    }

    fn range(&self) -> VaRange {
        self.pages(0, self.pages)
    }

    fn write(&self, page: usize, v: u8) {
        assert!(self.mapped[page]);
        // SAFETY: a page of our own read-write mapping, still mapped; no
        // Rust reference into it exists.
        unsafe { ((self.base + page * PS) as *mut u8).write_volatile(v) }
    }

    fn read(&self, page: usize) -> u8 {
        assert!(self.mapped[page]);
        // SAFETY: as in `write`, reading.
        unsafe { ((self.base + page * PS) as *const u8).read_volatile() }
    }

    fn populate(&self) {
        for p in 0..self.pages {
            self.write(p, 1);
        }
    }

    /// `munmap` of pages `[first, first + n)`.
    fn unmap(&mut self, first: usize, n: usize) {
        assert!(self.mapped[first..first + n].iter().all(|&m| m));
        // SAFETY: pages of our own mapping, still mapped; no Rust
        // reference into them exists.
        let r = unsafe { libc::munmap((self.base + first * PS) as *mut libc::c_void, n * PS) };
        assert_eq!(r, 0, "munmap: {}", std::io::Error::last_os_error());
        self.forget(first, n);
    }

    /// Records that pages `[first, first + n)` are no longer ours.
    fn forget(&mut self, first: usize, n: usize) {
        self.mapped[first..first + n].fill(false);
    }

    fn madvise(&self, first: usize, n: usize, advice: i32) {
        // SAFETY: pages of our own mapping; discarding their contents is
        // what the test wants, and nothing holds a reference into them.
        let r = unsafe {
            libc::madvise(
                (self.base + first * PS) as *mut libc::c_void,
                n * PS,
                advice,
            )
        };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    }

    fn mprotect(&self, prot: i32) {
        // SAFETY: changes protection of our own mapping only.
        let r = unsafe { libc::mprotect(self.base as *mut libc::c_void, self.pages * PS, prot) };
        assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let unmap = |page: usize, n: usize| {
            // SAFETY: pages of our own reservation that are still ours
            // (guards, or middle pages the test did not give up).
            unsafe { libc::munmap((self.base + page * PS) as *mut libc::c_void, n * PS) };
        };
        // The guards sit just outside the middle.
        // SAFETY: our own guard pages.
        unsafe {
            libc::munmap((self.base - PS) as *mut libc::c_void, PS);
            libc::munmap((self.base + self.pages * PS) as *mut libc::c_void, PS);
        }
        let mut p = 0;
        while p < self.pages {
            if !self.mapped[p] {
                p += 1;
                continue;
            }
            let start = p;
            while p < self.pages && self.mapped[p] {
                p += 1;
            }
            unmap(start, p - start);
        }
    }
}

/// Waits up to [`WAIT`] for `f()`; returns its last value.
fn poll_until(f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Looks `addr` up twice; the second lookup must be a cache hit, proving
/// the mapping is cached and trusted (so a stale entry would be served).
fn assert_cached(host: &HostSpace, addr: u64) {
    let m = host.lookup(VirtAddr(addr)).unwrap();
    assert!(m.is_some(), "{addr:#x} should be mapped");
    let hits = host.maps().stats().hits;
    assert_eq!(host.lookup(VirtAddr(addr)).unwrap(), m);
    assert_eq!(
        host.maps().stats().hits,
        hits + 1,
        "{addr:#x} should be served from the trusted cache"
    );
}

// ------------------------------------------------------------------ tests

#[test]
fn munmap_of_whole_range_sends_exactly_one_unmap_and_the_cache_follows() {
    let Some(host) = host("munmap_of_whole_range") else {
        return;
    };
    let mut m = Guarded::new(8);
    m.populate();
    let (_sub, log) = watched(&host, m.range());
    assert_cached(&host, m.addr(3));

    let r = m.range();
    m.unmap(0, 8);
    let ev = log.settle(1);
    assert_eq!(ev, vec![(r, EventKind::Unmap)]);
    assert_eq!(host.event_counts().unmap, 1);
    for p in [0, 3, 7] {
        assert_eq!(host.lookup(VirtAddr(m.addr(p))).unwrap(), None, "page {p}");
    }
}

#[test]
fn munmap_of_one_middle_page_sends_unmap_of_that_page_only() {
    let Some(host) = host("munmap_of_one_middle_page") else {
        return;
    };
    let mut m = Guarded::new(8);
    m.populate();
    let (_sub, log) = watched(&host, m.range());
    assert_cached(&host, m.addr(3));

    m.unmap(3, 1);
    let ev = log.settle(1);
    assert_eq!(ev, vec![(m.pages(3, 1), EventKind::Unmap)]);
    assert_eq!(host.lookup(VirtAddr(m.addr(3))).unwrap(), None);
    // The neighbours are still mapped, split at the hole.
    let left = host
        .lookup(VirtAddr(m.addr(2)))
        .unwrap()
        .expect("page 2 mapped");
    assert_eq!(left.range, m.pages(0, 3));
    let right = host
        .lookup(VirtAddr(m.addr(4)))
        .unwrap()
        .expect("page 4 mapped");
    assert_eq!(right.range, m.pages(4, 4));
    // The rest is still watched: unmapping it is reported too.
    m.unmap(4, 4);
    let ev = log.settle(2);
    assert_eq!(
        ev,
        vec![
            (m.pages(3, 1), EventKind::Unmap),
            (m.pages(4, 4), EventKind::Unmap)
        ]
    );
}

#[test]
fn madvise_dontneed_sends_remove_and_keeps_the_mapping() {
    let Some(host) = host("madvise_dontneed") else {
        return;
    };
    let m = Guarded::new(8);
    m.populate();
    let (_sub, log) = watched(&host, m.range());

    m.madvise(2, 3, libc::MADV_DONTNEED);
    let ev = log.settle(1);
    assert_eq!(ev, vec![(m.pages(2, 3), EventKind::Remove)]);
    assert_eq!(host.event_counts().remove, 1);
    // The pages were discarded (private anonymous: zero), the mapping stays.
    assert_eq!(m.read(2), 0);
    assert_eq!(m.read(1), 1);
    let map = host
        .lookup(VirtAddr(m.addr(2)))
        .unwrap()
        .expect("still mapped");
    assert_eq!(map.range, m.range());
}

#[test]
fn moving_mremap_sends_remap_of_the_old_range_and_the_cache_follows() {
    let Some(host) = host("moving_mremap") else {
        return;
    };
    let mut src = Guarded::new(8);
    let mut dst = Guarded::new(8);
    src.populate();
    src.write(5, 42);
    let (_sub, log) = watched(&host, src.range());
    assert_cached(&host, src.addr(0));
    // Nothing written since `watch` armed tracking: a clean start.
    assert_eq!(host.sync_point().unwrap(), 0);

    let old = src.range();
    let new = dst.range();
    // SAFETY: moves our own mapping onto the middle of our own second
    // reservation (MREMAP_FIXED replaces what is there); nothing holds a
    // reference into either.
    let p = unsafe {
        libc::mremap(
            src.base as *mut libc::c_void,
            8 * PS,
            8 * PS,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.base as *mut libc::c_void,
        )
    };
    assert_eq!(
        p as usize,
        dst.base,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
    src.forget(0, 8);

    let ev = log.wait_until(|e| !e.is_empty());
    assert_eq!(ev.first(), Some(&(old, EventKind::Remap)), "{ev:?}");
    std::thread::sleep(QUIET);
    let ev = log.snapshot();
    // The kernel follows REMAP with UNMAP of the old range (see the monitor
    // docs); nothing else may arrive.
    assert!(
        ev[1..].iter().all(|&e| e == (old, EventKind::Unmap)) && ev.len() <= 2,
        "{ev:?}"
    );
    assert_eq!(host.event_counts().remap, 1);

    // The cache knows the new address, and the old one is gone.
    let moved = host
        .lookup(VirtAddr(dst.addr(0)))
        .unwrap()
        .expect("moved mapping");
    assert_eq!(moved.range, new);
    // Nothing of the moved mapping is left at the old address. (Tests run
    // in parallel threads: another test's mapping may already sit in the
    // freed range — the cache must then show that one, not ours.)
    if let Some(m) = host.lookup(VirtAddr(old.start().get())).unwrap() {
        assert!(
            !(m.range == old && m.read && m.write),
            "the cache still shows the moved mapping at its old address: {m:?}"
        );
    }
    assert_eq!(dst.read(5), 42);
    // The watch followed the mapping: a CPU write at the new address is
    // seen by the next sync point.
    dst.write(6, 7);
    let expect = if precise_tracking() { 1 } else { 8 };
    assert_eq!(host.sync_point().unwrap(), expect);
    // …and unmapping it is reported, at its new address.
    dst.unmap(0, 8);
    assert!(
        poll_until(|| host.event_counts().unmap == ev.len() as u64),
        "{:?}",
        host.event_counts()
    );
}

#[test]
fn mprotect_sends_nothing_but_an_explicit_protection_invalidation_arrives() {
    let Some(host) = host("mprotect") else {
        return;
    };
    let m = Guarded::new(4);
    m.populate();
    let (_sub, log) = watched(&host, m.range());

    m.mprotect(libc::PROT_READ);
    assert_eq!(log.quiet(), vec![], "the kernel has no event for mprotect");
    host.space().invalidate(m.range(), EventKind::Protection);
    // `invalidate` is synchronous: the callback has returned already.
    assert_eq!(log.snapshot(), vec![(m.range(), EventKind::Protection)]);
    m.mprotect(libc::PROT_READ | libc::PROT_WRITE);
}

#[test]
fn cpu_writes_become_cpu_write_invalidations_of_exactly_the_written_pages() {
    let Some(host) = host("cpu_writes") else {
        return;
    };
    let m = Guarded::new(16);
    // Half populated before watching, half never touched: both must be
    // tracked (WP on present PTEs and WP_UNPOPULATED markers).
    for p in 0..8 {
        m.write(p, 1);
    }
    let (_sub, log) = watched(&host, m.range());
    assert_eq!(host.sync_point().unwrap(), 0, "no writes yet");
    assert_eq!(log.snapshot(), vec![]);

    let written = [1, 3, 4, 9, 12, 13, 14];
    for &p in &written {
        m.write(p, 2);
    }
    let n = host.sync_point().unwrap();
    // `sync_point` is synchronous: every callback has returned.
    let ev = log.snapshot();
    if precise_tracking() {
        assert_eq!(n, written.len() as u64);
        assert_eq!(
            ev,
            vec![
                (m.pages(1, 1), EventKind::CpuWrite),
                (m.pages(3, 2), EventKind::CpuWrite),
                (m.pages(9, 1), EventKind::CpuWrite),
                (m.pages(12, 3), EventKind::CpuWrite),
            ]
        );
        assert_eq!(host.sync_point().unwrap(), 0, "no writes since");
        assert_eq!(log.snapshot().len(), 4);
        // Reads do not count.
        assert_eq!(m.read(5), 1);
        assert_eq!(host.sync_point().unwrap(), 0);
    } else {
        eprintln!("cpu_writes: write tracking degraded; checking the whole-range fallback");
        assert_eq!(n, 16);
        assert_eq!(ev, vec![(m.range(), EventKind::CpuWrite)]);
    }
    // The writes went through: tracking never blocks a writer.
    assert_eq!(m.read(9), 2);
    assert_eq!(host.event_counts().wp_faults, 0);
}

#[test]
fn untracked_watches_get_events_but_no_cpu_write_scans() {
    let Some(host) = host("untracked") else {
        return;
    };
    let mut m = Guarded::new(8);
    let (rec, log) = recorder();
    let _sub = host.space().insert(m.range(), rec).unwrap();
    host.watch_untracked(m.range()).unwrap();
    m.write(2, 1);
    assert_eq!(host.sync_point().unwrap(), 0, "untracked: nothing scanned");
    assert_eq!(log.snapshot(), vec![]);
    // A tracked watch of part of the range (another mirror's region) gets
    // that part scanned again.
    let half = m.pages(0, 4);
    host.watch(half).unwrap();
    m.write(1, 2);
    m.write(6, 2);
    if precise_tracking() {
        assert_eq!(host.sync_point().unwrap(), 1);
        assert_eq!(log.snapshot(), vec![(m.pages(1, 1), EventKind::CpuWrite)]);
    } else {
        assert_eq!(host.sync_point().unwrap(), 4);
    }
    host.unwatch(half).unwrap();
    // A tracked and an untracked watch of the same range (a copy-mode and
    // a zero-copy mirror): ending the untracked one keeps the scan.
    host.watch(half).unwrap();
    host.unwatch_untracked(m.range()).unwrap();
    host.watch_untracked(m.range()).unwrap();
    host.watch_untracked(half).unwrap();
    host.unwatch_untracked(half).unwrap();
    let seen = log.snapshot().len();
    m.write(2, 3);
    if precise_tracking() {
        assert_eq!(
            host.sync_point().unwrap(),
            1,
            "the tracked watch is still scanned"
        );
        assert_eq!(
            log.snapshot()[seen..],
            [(m.pages(2, 1), EventKind::CpuWrite)]
        );
    } else {
        assert_eq!(host.sync_point().unwrap(), 4);
    }
    host.unwatch(half).unwrap();
    // Events still arrive for the untracked watch.
    let before = log.snapshot().len();
    m.unmap(5, 1);
    assert!(poll_until(|| log.snapshot().len() > before));
    assert_eq!(
        log.snapshot()[before..],
        [(m.pages(5, 1), EventKind::Unmap)]
    );
}

#[test]
fn fork_sends_the_parent_nothing_and_the_subscription_keeps_working() {
    let Some(host) = host("fork") else {
        return;
    };
    let mut m = Guarded::new(8);
    m.populate();
    let (_sub, log) = watched(&host, m.range());
    assert_eq!(host.sync_point().unwrap(), 0);

    let base = m.base;
    // SAFETY: the child only does async-signal-safe things: volatile stores
    // to its private copy of the mapping, then `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        for p in 0..8 {
            // SAFETY: the child's copy of the parent's mapping.
            unsafe { ((base + p * PS) as *mut u8).write_volatile(9) };
        }
        // SAFETY: ends the child at once, running no destructors.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a live c_int.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );

    // No spurious invalidation: no event, no CPU write seen by the parent.
    assert_eq!(log.quiet(), vec![]);
    assert_eq!(
        host.sync_point().unwrap(),
        0,
        "the child's writes are not the parent's"
    );
    assert_eq!(log.snapshot(), vec![]);
    assert_eq!(m.read(0), 1, "the child wrote its own copy");

    // The parent's subscription and watch still work.
    m.write(2, 5);
    let expect = if precise_tracking() { 1 } else { 8 };
    assert_eq!(host.sync_point().unwrap(), expect);
    m.unmap(6, 1);
    let ev = log.settle(2);
    assert_eq!(
        ev.last(),
        Some(&(m.pages(6, 1), EventKind::Unmap)),
        "{ev:?}"
    );
    assert_eq!(ev.len(), 2, "{ev:?}");
    if precise_tracking() {
        assert_eq!(ev[0], (m.pages(2, 1), EventKind::CpuWrite));
    }
}

#[test]
fn a_panicking_callback_does_not_stop_the_monitor_or_wedge_the_space() {
    let Some(host) = host("panicking_callback") else {
        return;
    };
    let mut a = Guarded::new(4);
    let mut b = Guarded::new(4);
    let panicky_log = Arc::new(Log::default());
    let panicky = Recorder {
        log: Arc::clone(&panicky_log),
        panic_on_unmap: true,
    };
    let psub = host.space().insert(a.range(), panicky).unwrap();
    let (rec, log) = recorder();
    let sub = host.space().insert(b.range(), rec).unwrap();
    host.watch(a.range()).unwrap();
    host.watch(b.range()).unwrap();

    a.unmap(0, 4);
    assert!(
        poll_until(|| host.event_counts().sink_panics == 1),
        "{:?}",
        host.event_counts()
    );
    assert_eq!(
        panicky_log.snapshot(),
        vec![(a.pages(0, 4), EventKind::Unmap)]
    );

    // The monitor carries on: the next event is delivered.
    b.unmap(1, 1);
    assert_eq!(log.settle(1), vec![(b.pages(1, 1), EventKind::Unmap)]);
    assert_eq!(host.event_counts().unmap, 2);
    assert_eq!(host.event_counts().sink_panics, 1);

    // The space is not wedged: its sequence is even again (no invalidation
    // left open), a fault can begin, and explicit invalidations work.
    assert_eq!(host.space().current_seq() & 1, 0);
    let seq = sub
        .interval()
        .read_begin_timeout(WAIT)
        .expect("read_begin must not wait for a dead invalidation");
    assert!(!sub.interval().read_retry(seq));
    host.space().invalidate(b.pages(2, 1), EventKind::Clear);
    assert_eq!(
        log.snapshot().last(),
        Some(&(b.pages(2, 1), EventKind::Clear))
    );
    // The panicking subscription can still be removed.
    psub.remove().unwrap();
    sub.remove().unwrap();
}

#[test]
fn unwatched_ranges_send_nothing() {
    let Some(host) = host("unwatched") else {
        return;
    };
    // Never watched.
    let mut a = Guarded::new(4);
    a.populate();
    let (rec, log) = recorder();
    let _sub = host.space().insert(a.range(), rec).unwrap();
    a.unmap(0, 4);
    assert_eq!(log.quiet(), vec![]);
    // Watched, then unwatched.
    let mut b = Guarded::new(4);
    b.populate();
    let (rec_b, log_b) = recorder();
    let _sub_b = host.space().insert(b.range(), rec_b).unwrap();
    host.watch(b.range()).unwrap();
    host.unwatch(b.range()).unwrap();
    b.write(0, 3);
    b.madvise(1, 1, libc::MADV_DONTNEED);
    b.unmap(0, 4);
    assert_eq!(log_b.quiet(), vec![]);
    assert_eq!(host.sync_point().unwrap(), 0);
    let c = host.event_counts();
    assert_eq!((c.unmap, c.remove, c.remap), (0, 0, 0), "{c:?}");
}
