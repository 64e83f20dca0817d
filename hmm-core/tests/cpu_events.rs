//! Kernel-event tests for the userfaultfd monitor and the write tracker,
//! with real syscalls.
//!
//! If userfaultfd cannot be opened on a machine, each test prints a `SKIP`
//! line naming why and passes — unless `HMM_REQUIRE_UFFD=1`, in which case
//! a missing userfaultfd fails the test (CI sets it: the CI machines have
//! it).

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hmm_core::cpu::monitor::{EventCounts, EventMonitor, InvalidationSink, MonitorOptions};
use hmm_core::cpu::probe::{Capabilities, UffdAvailability};
use hmm_core::cpu::uffd::{Features, RegisterMode, UffdEvent, Userfaultfd};
use hmm_core::cpu::write_track::{ArmMethod, TrackError, TrackMode};
use hmm_core::notifier::EventKind;
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

const PS: usize = PAGE_SIZE as usize;
const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------- helpers

fn require_uffd(test: &str) -> bool {
    let caps = Capabilities::get();
    if let UffdAvailability::Absent { detail, .. } = &caps.uffd {
        if std::env::var("HMM_REQUIRE_UFFD").as_deref() == Ok("1") {
            panic!("{test}: HMM_REQUIRE_UFFD=1 but userfaultfd is unavailable: {detail}");
        }
        eprintln!("SKIP {test}: userfaultfd unavailable: {detail}");
        return false;
    }
    true
}

/// An anonymous private mapping; unmapped on drop unless already gone.
struct Mapping {
    addr: usize,
    len: usize,
    mapped: bool,
}

impl Mapping {
    fn new(pages: usize) -> Mapping {
        Self::with_prot(pages, libc::PROT_READ | libc::PROT_WRITE)
    }
    fn with_prot(pages: usize, prot: libc::c_int) -> Mapping {
        let len = pages * PS;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap failed");
        Mapping {
            addr: p as usize,
            len,
            mapped: true,
        }
    }
    fn range(&self) -> VaRange {
        VaRange::user_pages(VirtAddr(self.addr as u64), self.len as u64).unwrap()
    }
    fn pages(&self, first: usize, n: usize) -> VaRange {
        VaRange::user_pages(VirtAddr((self.addr + first * PS) as u64), (n * PS) as u64).unwrap()
    }
    fn page_ptr(&self, i: usize) -> *mut u8 {
        (self.addr + i * PS) as *mut u8
    }
    fn write(&self, page: usize, v: u8) {
        assert!(page * PS < self.len);
        // SAFETY: inside our own read-write mapping, still mapped.
        unsafe { self.page_ptr(page).write_volatile(v) }
    }
    fn unmap_pages(&mut self, first: usize, n: usize) {
        // SAFETY: unmaps pages of our own mapping; no Rust reference
        // points into it.
        let r = unsafe { libc::munmap(self.page_ptr(first).cast(), n * PS) };
        assert_eq!(r, 0);
        if first == 0 && n * PS == self.len {
            self.mapped = false;
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: our own mapping (munmap tolerates holes).
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

#[derive(Default)]
struct RecordingSink {
    events: Mutex<Vec<(VaRange, EventKind)>>,
    remaps: Mutex<Vec<(VirtAddr, VirtAddr, u64)>>,
    cv: Condvar,
}

impl InvalidationSink for RecordingSink {
    fn invalidate(&self, range: VaRange, kind: EventKind) {
        self.events.lock().unwrap().push((range, kind));
        self.cv.notify_all();
    }
    fn remapped(&self, from: VirtAddr, to: VirtAddr, len: u64) {
        self.remaps.lock().unwrap().push((from, to, len));
        self.cv.notify_all();
    }
}

impl RecordingSink {
    /// Waits until at least `n` events were recorded; returns them.
    fn wait_events(&self, n: usize, timeout: Duration) -> Vec<(VaRange, EventKind)> {
        let deadline = Instant::now() + timeout;
        let mut g = self.events.lock().unwrap();
        while g.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
        g.clone()
    }
    fn take(&self) -> Vec<(VaRange, EventKind)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

fn monitor(test: &str) -> Option<(EventMonitor, Arc<RecordingSink>)> {
    if !require_uffd(test) {
        return None;
    }
    let sink = Arc::new(RecordingSink::default());
    let m = EventMonitor::start(Arc::clone(&sink)).expect("monitor starts");
    Some((m, sink))
}

/// Waits until the monitor's counters satisfy `f` (they are bumped after
/// the sink call and the watch-set update, so the set is settled then).
fn wait_counts(mon: &EventMonitor, f: impl Fn(EventCounts) -> bool) -> EventCounts {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = mon.counts();
        if f(c) || Instant::now() >= deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `f` on a thread; true if it finished within `timeout`.
fn finishes_within(timeout: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(timeout).is_ok()
}

// ------------------------------------------------------------------ tests

#[test]
fn probe_reports_this_machine() {
    let caps = Capabilities::get();
    let text = caps.to_string();
    eprintln!("{text}");
    assert!(text.contains("userfaultfd"));
    assert!(caps.page_size_ok(), "page size {}", caps.page_size);
    if require_uffd("probe_reports_this_machine") {
        let off = caps.offered();
        assert!(off.contains(Features::EVENTS), "offered {off}");
        // This project's machines have PAGEMAP_SCAN and WP_ASYNC (6.7+);
        // elsewhere the degradation line must say so.
        if caps.wp_async_usable() {
            assert!(caps.pagemap_scan.is_ok());
        } else {
            assert!(caps
                .degradations()
                .iter()
                .any(|d| d.contains("CPU writes are not tracked")));
        }
    } else {
        assert!(caps
            .degradations()
            .iter()
            .any(|d| d.starts_with("no userfaultfd")));
    }
}

#[test]
fn munmap_whole_range_and_one_middle_page() {
    let Some((mon, sink)) = monitor("munmap_whole_range_and_one_middle_page") else {
        return;
    };
    let mut a = Mapping::new(8);
    let mut b = Mapping::new(4);
    mon.watch(a.range()).unwrap();
    mon.watch(b.range()).unwrap();
    a.write(0, 1);

    let mid = a.pages(3, 1);
    a.unmap_pages(3, 1);
    let ev = sink.wait_events(1, WAIT);
    assert_eq!(ev, vec![(mid, EventKind::Unmap)]);
    assert_eq!(wait_counts(&mon, |c| c.unmap == 1).unmap, 1);
    assert!(!mon.watched().iter().any(|w| w.overlaps(mid)));
    // (a and b may be adjacent, and the set coalesces adjacent ranges.)
    let covered = |r: VaRange| mon.watched().iter().any(|w| w.covers(r));
    assert!(covered(a.pages(0, 3)) && covered(a.pages(4, 4)));
    sink.take();

    let whole = b.range();
    b.unmap_pages(0, 4);
    let ev = sink.wait_events(1, WAIT);
    assert_eq!(ev, vec![(whole, EventKind::Unmap)]);
    assert_eq!(wait_counts(&mon, |c| c.unmap == 2).unmap, 2);
    assert!(!mon.watched().iter().any(|w| w.overlaps(whole)));
}

/// `watch_within` registers the whole mapping and watches only the range:
/// the mapping stays one VMA (an `mremap` of all of it succeeds, where a
/// registration of part of it made the kernel refuse with `EFAULT`), only
/// the range is in the watch set, events come from all of the mapping,
/// and `unwatch_within` ends the watch but keeps the registration.
#[test]
fn watch_within_registers_the_whole_mapping() {
    let Some((mon, sink)) = monitor("watch_within_registers_the_whole_mapping") else {
        return;
    };
    let mut m = Mapping::new(16);
    for i in 0..16 {
        m.write(i, 1);
    }
    let watched = m.pages(4, 4);
    mon.watch_within(watched, m.range()).unwrap();
    assert_eq!(mon.watched(), vec![watched]);
    // An event outside the watched range, inside the mapping.
    let outside = m.pages(12, 1);
    // SAFETY: discards a page of our own mapping; nothing refers to it.
    let rc = unsafe { libc::madvise(m.page_ptr(12).cast(), PS, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(
        sink.wait_events(1, WAIT),
        vec![(outside, EventKind::Remove)]
    );
    sink.take();
    // Ending the watch keeps the registration: still events, no split.
    mon.unwatch_within(watched).unwrap();
    assert_eq!(mon.watched(), vec![]);
    // SAFETY: as above.
    let rc = unsafe { libc::madvise(m.page_ptr(5).cast(), PS, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(
        sink.wait_events(1, WAIT),
        vec![(m.pages(5, 1), EventKind::Remove)]
    );
    // Watch again, then grow the whole buffer: one VMA, so it may move.
    mon.watch_within(watched, m.range()).unwrap();
    let old = m.range();
    // SAFETY: growing our own mapping, allowed to move; `m` is updated to
    // the new place and the old range is not used afterwards.
    let p = unsafe {
        libc::mremap(
            m.addr as *mut libc::c_void,
            16 * PS,
            32 * PS,
            libc::MREMAP_MAYMOVE,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
    m.addr = p as usize;
    m.len = 32 * PS;
    if m.range().start() != old.start() {
        // The watch moved with the memory.
        let c = wait_counts(&mon, |c| c.remap == 1);
        assert_eq!(c.remap, 1);
        assert_eq!(mon.watched(), vec![m.pages(4, 4)]);
    }
    // The range alone still works where no whole mapping is given.
    let other = Mapping::new(4);
    mon.watch_within(other.pages(1, 1), other.pages(1, 1))
        .unwrap();
    mon.unwatch_within(other.pages(1, 1)).unwrap();
    m.unmap_pages(0, 32);
}

#[test]
fn madvise_dontneed_is_remove() {
    let Some((mon, sink)) = monitor("madvise_dontneed_is_remove") else {
        return;
    };
    let m = Mapping::new(8);
    mon.watch(m.range()).unwrap();
    for i in 0..8 {
        m.write(i, 7);
    }
    let r = m.pages(2, 3);
    // SAFETY: discards pages of our own mapping; no references into it.
    let rc = unsafe { libc::madvise(m.page_ptr(2).cast(), 3 * PS, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(sink.wait_events(1, WAIT), vec![(r, EventKind::Remove)]);
    assert_eq!(wait_counts(&mon, |c| c.remove == 1).remove, 1);
    // The mapping stays watched and the pages read back as zero.
    assert_eq!(mon.watched(), vec![m.range()]);
    // SAFETY: inside our own mapping.
    assert_eq!(unsafe { m.page_ptr(3).read_volatile() }, 0);
}

#[test]
fn mremap_move_is_remap_of_old_range() {
    let Some((mon, sink)) = monitor("mremap_move_is_remap_of_old_range") else {
        return;
    };
    let mut m = Mapping::new(4);
    let old = m.range();
    mon.watch(old).unwrap();
    m.write(1, 42);
    // A reserved, unwatched destination.
    let mut dst = Mapping::with_prot(4, libc::PROT_NONE);
    let to = dst.range();
    // SAFETY: moves our own mapping onto our own reserved destination;
    // neither is referenced by Rust values.
    let p = unsafe {
        libc::mremap(
            m.addr as *mut libc::c_void,
            m.len,
            dst.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.addr as *mut libc::c_void,
        )
    };
    assert_eq!(p as usize, dst.addr);
    m.mapped = false;
    // Finding (Linux 6.18): a moving mremap sends REMAP of the old range
    // and then UNMAP of the old range (the move unmaps the source through
    // the ordinary munmap path), in that order.
    let ev = sink.wait_events(2, WAIT);
    assert_eq!(
        ev,
        vec![(old, EventKind::Remap), (old, EventKind::Unmap)],
        "events: {ev:?}"
    );
    std::thread::sleep(QUIET);
    let all = sink.events.lock().unwrap().clone();
    assert_eq!(all.len(), 2, "no other event: {all:?}");
    let c = wait_counts(&mon, |c| c.remap == 1 && c.unmap == 1);
    assert_eq!((c.remap, c.unmap), (1, 1));
    assert_eq!(
        *sink.remaps.lock().unwrap(),
        vec![(old.start(), to.start(), old.len())]
    );
    assert_eq!(mon.watched(), vec![to]);
    // SAFETY: the moved page, inside the destination mapping.
    assert_eq!(unsafe { dst.page_ptr(1).read_volatile() }, 42);
    // The destination is still registered: unmapping it is seen.
    sink.take();
    dst.unmap_pages(0, 4);
    assert_eq!(sink.wait_events(1, WAIT), vec![(to, EventKind::Unmap)]);
    let c = wait_counts(&mon, |c| c.unmap == 2);
    assert_eq!((c.remap, c.unmap), (1, 2));
}

#[test]
fn mprotect_sends_no_event() {
    let Some((mon, sink)) = monitor("mprotect_sends_no_event") else {
        return;
    };
    let m = Mapping::new(4);
    mon.watch(m.range()).unwrap();
    m.write(0, 1);
    // SAFETY: changes protection of our own mapping; restored below before
    // anything writes to it.
    let rc = unsafe { libc::mprotect(m.page_ptr(0).cast(), 2 * PS, libc::PROT_READ) };
    assert_eq!(rc, 0);
    std::thread::sleep(QUIET);
    assert_eq!(
        sink.take(),
        vec![],
        "the kernel sends no event for mprotect"
    );
    // SAFETY: as above.
    let rc = unsafe {
        libc::mprotect(
            m.page_ptr(0).cast(),
            2 * PS,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    assert_eq!(rc, 0);
    assert_eq!(mon.counts(), Default::default());
}

/// Forks; the child writes to, reads and unmaps `[addr, addr + len)` and
/// exits 0 on success. Fails the test if the child does not exit in time.
fn fork_child_touching(addr: usize, len: usize) {
    // SAFETY: the child only writes to its copy of the mapping, unmaps it
    // and calls _exit: no allocation, no locks (async-signal-safe).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: child side, see above.
        unsafe {
            (addr as *mut u8).write_volatile(9);
            let ok = (addr as *const u8).read_volatile() == 9;
            let rc = libc::munmap(addr as *mut libc::c_void, len);
            libc::_exit(if ok && rc == 0 { 0 } else { 1 });
        }
    }
    let deadline = Instant::now() + WAIT;
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        assert!(r == 0, "waitpid failed");
        assert!(Instant::now() < deadline, "child did not exit (hang)");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}

/// The fork tests run one at a time: a monitor with `EVENT_FORK` makes
/// *every* fork in the process wait until that monitor reads the event and
/// hands the child a copy of its userfaultfd; a second test forking at the
/// same time then depends on the first test's monitor (and its child's
/// munmap on an event nobody reads), which deadlocked a CI run.
static FORK_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn fork_without_fork_events_never_waits_for_us() {
    let _serial = FORK_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let Some((mon, sink)) = monitor("fork_without_fork_events_never_waits_for_us") else {
        return;
    };
    let m = Mapping::new(4);
    mon.watch(m.range()).unwrap();
    m.write(0, 5);
    fork_child_touching(m.addr, m.len);
    // The child's unmap of its copy is not ours to see; nothing reported.
    std::thread::sleep(QUIET);
    assert_eq!(sink.take(), vec![]);
    assert_eq!(mon.counts().fork, 0);
    // The parent's copy is untouched by the child's write and still watched.
    // SAFETY: inside our own mapping.
    assert_eq!(unsafe { m.page_ptr(0).read_volatile() }, 5);
    assert_eq!(mon.watched(), vec![m.range()]);
}

#[test]
fn fork_events_are_handled_without_hang() {
    let _serial = FORK_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    if !require_uffd("fork_events_are_handled_without_hang") {
        return;
    }
    let sink = Arc::new(RecordingSink::default());
    let mon = EventMonitor::start_with(sink.clone(), MonitorOptions { fork_events: true }).unwrap();
    let m = Mapping::new(4);
    mon.watch(m.range()).unwrap();
    m.write(0, 5);
    fork_child_touching(m.addr, m.len);
    if mon.missing_events().0 != 0 {
        eprintln!(
            "note: EVENT_FORK not granted (no CAP_SYS_PTRACE): {}",
            mon.missing_events()
        );
        assert_eq!(mon.counts().fork, 0);
    } else {
        // Other tests of this binary may fork concurrently: each fork of
        // the process is reported.
        assert!(wait_counts(&mon, |c| c.fork >= 1).fork >= 1);
    }
    std::thread::sleep(QUIET);
    assert_eq!(
        sink.take(),
        vec![],
        "a fork invalidates nothing in the parent"
    );
    // SAFETY: inside our own mapping.
    assert_eq!(unsafe { m.page_ptr(0).read_volatile() }, 5);
    assert_eq!(mon.watched(), vec![m.range()]);
}

#[test]
fn first_touch_of_watched_page_does_not_block() {
    let Some((mon, sink)) = monitor("first_touch_of_watched_page_does_not_block") else {
        return;
    };
    let m = Mapping::new(4);
    mon.watch(m.range()).unwrap();
    let base = m.addr;
    let done = finishes_within(WAIT, move || {
        // SAFETY: pages 0 and 1 of the watched mapping, alive until the
        // check below returns.
        unsafe {
            ((base + PS) as *const u8).read_volatile();
            (base as *mut u8).write_volatile(1);
        }
    });
    assert!(done, "first touch of a WP-registered page blocked");
    let c = mon.counts();
    assert_eq!((c.wp_faults, c.unexpected_faults), (0, 0));
    assert_eq!(sink.take(), vec![]);
}

#[test]
fn missing_mode_makes_us_the_fault_handler() {
    if !require_uffd("missing_mode_makes_us_the_fault_handler") {
        return;
    }
    // A raw userfaultfd with no events (so no other test's fork or unmap
    // can wait on it).
    let (uffd, _) = Userfaultfd::open(Features::NONE).unwrap();
    let m = Mapping::new(1);
    uffd.register(m.range(), RegisterMode::MISSING).unwrap();
    let base = m.addr;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: the mapping outlives this thread's access: the test waits
        // for `rx` before dropping it.
        let v = unsafe { (base as *const u8).read_volatile() };
        let _ = tx.send(v);
    });
    assert!(
        rx.recv_timeout(QUIET).is_err(),
        "in MISSING mode the toucher must wait for us"
    );
    let mut evs = Vec::new();
    let deadline = Instant::now() + WAIT;
    while evs.is_empty() && Instant::now() < deadline {
        uffd.read_events(&mut evs).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    match evs.pop() {
        Some(Ok(UffdEvent::Pagefault { addr, write, wp })) => {
            assert_eq!(addr, VirtAddr(base as u64));
            assert!(!write && !wp);
        }
        other => panic!("expected a page fault, got {other:?}"),
    }
    // Unregistering wakes the toucher, which then faults normally.
    uffd.unregister(m.range()).unwrap();
    assert_eq!(rx.recv_timeout(WAIT), Ok(0));
}

#[test]
fn write_tracking_reports_exactly_the_written_pages() {
    for method in [ArmMethod::Scan, ArmMethod::Ioctl] {
        write_tracking_exact(method);
    }
}

fn write_tracking_exact(method: ArmMethod) {
    let Some((mon, sink)) = monitor("write_tracking_reports_exactly_the_written_pages") else {
        return;
    };
    let m = Mapping::new(64);
    // Half populated before watching, half never touched.
    for i in 0..32 {
        m.write(i, 1);
    }
    mon.watch(m.range()).unwrap();
    let t = mon.write_tracker();
    t.set_arm_method(method);
    assert_eq!(t.arm_method(), method);
    if let TrackMode::Degraded(why) = t.mode() {
        assert!(!Capabilities::get().wp_async_usable());
        eprintln!("write tracking degraded: {why}");
        t.arm(m.range()).unwrap();
        assert_eq!(t.collect(m.range()).unwrap(), vec![m.range()]);
        return;
    }
    t.arm(m.range()).unwrap();
    assert_eq!(t.collect(m.range()).unwrap(), vec![], "nothing written yet");
    // 3 scattered pages: populated, populated, never touched.
    for p in [3, 17, 40] {
        m.write(p, 2);
    }
    let got = t.collect(m.range()).unwrap();
    assert_eq!(got, vec![m.pages(3, 1), m.pages(17, 1), m.pages(40, 1)]);
    assert_eq!(t.collect(m.range()).unwrap(), vec![], "second collect");
    // Adjacent writes come back as one run; reads are not writes.
    m.write(50, 1);
    m.write(51, 1);
    m.write(3, 3);
    // SAFETY: inside our own mapping.
    unsafe { m.page_ptr(60).read_volatile() };
    assert_eq!(
        t.collect(m.range()).unwrap(),
        vec![m.pages(3, 1), m.pages(50, 2)]
    );
    // Re-armed after a write (the mirror's own write-back): the write is
    // dropped; written again after the re-arm: reported. Re-arming an
    // armed, unwritten page changes nothing.
    m.write(5, 2);
    t.arm(m.pages(5, 1)).unwrap();
    m.write(6, 2);
    t.arm(m.pages(6, 1)).unwrap();
    m.write(6, 3);
    t.arm(m.pages(30, 4)).unwrap();
    assert_eq!(t.collect(m.range()).unwrap(), vec![m.pages(6, 1)]);
    // A sub-range collect leaves the rest pending.
    m.write(10, 1);
    m.write(20, 1);
    assert_eq!(t.collect(m.pages(0, 16)).unwrap(), vec![m.pages(10, 1)]);
    assert_eq!(t.collect(m.range()).unwrap(), vec![m.pages(20, 1)]);
    // Writes were resolved by the kernel: no fault reached the monitor.
    let c = mon.counts();
    assert_eq!((c.wp_faults, c.unexpected_faults), (0, 0));
    assert_eq!(sink.take(), vec![]);
    // Typed errors, no panic: arming or collecting an unwatched range,
    // an unaligned range.
    let other = Mapping::new(2);
    assert!(
        matches!(
            (method, t.arm(other.range())),
            (ArmMethod::Scan, Err(TrackError::Scan { .. }))
                | (ArmMethod::Ioctl, Err(TrackError::Protect(_)))
        ),
        "{method:?}"
    );
    assert!(matches!(
        t.collect(other.range()),
        Err(TrackError::Scan { .. })
    ));
    let unaligned =
        VaRange::new(VirtAddr(m.addr as u64 + 1), VirtAddr(m.addr as u64 + 10)).unwrap();
    assert!(matches!(
        t.collect(unaligned),
        Err(TrackError::Unaligned(_))
    ));
}

/// `len` bytes of fresh read-write anonymous memory at a 1 GiB-aligned
/// address, inside a 3 GiB `PROT_NONE` reservation (no page table of any
/// level exists there until something is touched). Returns the mapping
/// and the reservation, to unmap after it.
fn mapping_in_empty_gigabyte(pages: usize) -> (Mapping, Mapping) {
    const GIB: usize = 1 << 30;
    let res = Mapping::with_prot(3 * GIB / PS, libc::PROT_NONE);
    let at = (res.addr + GIB - 1) & !(GIB - 1);
    // SAFETY: replaces part of our own PROT_NONE reservation, which
    // nothing uses, with a read-write mapping.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            pages * PS,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, at);
    // SAFETY: advice on our own mapping: 4 KiB pages, so "never touched"
    // stays a page-table hole.
    unsafe { libc::madvise(p, pages * PS, libc::MADV_NOHUGEPAGE) };
    let m = Mapping {
        addr: at,
        len: pages * PS,
        mapped: true,
    };
    (m, res)
}

/// Settles whether arming write-protects page-table holes on this kernel,
/// whether a never-touched page lay where no PMD table existed at all,
/// where the PMD table had no PTE table for it, or where the PTE table
/// had an empty entry. A written one must be reported — and a *read* one
/// must not: that is what tells a marker from a hole left alone, since a
/// read maps the zero page, which without a marker has no uffd-wp bit and
/// reads as written (so would a `MADV_POPULATE_READ` by a device fault).
/// Both arming methods.
#[test]
fn write_tracking_covers_page_table_holes() {
    for method in [ArmMethod::Scan, ArmMethod::Ioctl] {
        let Some((mon, _sink)) = monitor("write_tracking_covers_page_table_holes") else {
            return;
        };
        let t = mon.write_tracker();
        if t.mode() != &TrackMode::Precise {
            eprintln!("SKIP write_tracking_covers_page_table_holes: tracking degraded");
            return;
        }
        t.set_arm_method(method);
        // 4 MiB in an untouched gigabyte: no PMD table.
        let (m, _res) = mapping_in_empty_gigabyte(1024);
        mon.watch(m.range()).unwrap();
        t.arm(m.range()).unwrap();
        m.write(700, 1);
        // SAFETY: pages of our own readable mapping.
        unsafe {
            (
                m.page_ptr(701).read_volatile(),
                m.page_ptr(100).read_volatile(),
            )
        };
        assert_eq!(
            t.collect(m.range()).unwrap(),
            vec![m.pages(700, 1)],
            "{method:?}: no PMD table"
        );
        // Page 0 touched: a PMD table, a PTE table for the first 2 MiB with
        // empty entries around page 0, and none for the second 2 MiB.
        let (m, _res) = mapping_in_empty_gigabyte(1024);
        m.write(0, 1);
        mon.watch(m.range()).unwrap();
        t.arm(m.range()).unwrap();
        m.write(3, 1);
        m.write(600, 1);
        // SAFETY: pages of our own readable mapping.
        unsafe {
            (
                m.page_ptr(4).read_volatile(),
                m.page_ptr(601).read_volatile(),
            )
        };
        assert_eq!(
            t.collect(m.range()).unwrap(),
            vec![m.pages(3, 1), m.pages(600, 1)],
            "{method:?}: empty PTE, no PTE table"
        );
        assert_eq!(t.collect(m.range()).unwrap(), vec![], "{method:?}");
    }
}

#[test]
fn unwatched_ranges_produce_no_events() {
    let Some((mon, sink)) = monitor("unwatched_ranges_produce_no_events") else {
        return;
    };
    let mut a = Mapping::new(4);
    let mut b = Mapping::new(4);
    mon.watch(a.range()).unwrap();
    a.write(0, 1);
    b.write(0, 1);
    // SAFETY: discards pages of our own mapping.
    unsafe { libc::madvise(b.page_ptr(0).cast(), b.len, libc::MADV_DONTNEED) };
    b.unmap_pages(0, 4);
    // Unwatch a, then its munmap is not seen either.
    mon.unwatch(a.range()).unwrap();
    assert_eq!(mon.watched(), vec![]);
    a.unmap_pages(0, 4);
    std::thread::sleep(QUIET);
    assert_eq!(sink.take(), vec![]);
    assert_eq!(mon.counts(), Default::default());
}

#[test]
fn drop_joins_the_thread_and_releases_the_fd() {
    let Some((mon, sink)) = monitor("drop_joins_the_thread_and_releases_the_fd") else {
        return;
    };
    let mut m = Mapping::new(4);
    mon.watch(m.range()).unwrap();
    let t = mon.write_tracker();
    assert_eq!(Arc::strong_count(&sink), 2);
    drop(mon);
    // The thread has exited and released its reference to the sink.
    assert_eq!(Arc::strong_count(&sink), 1);
    assert!(
        matches!(t.arm(m.range()), Err(TrackError::MonitorGone)) || t.mode() != &TrackMode::Precise
    );
    // The fd is closed: unmapping a formerly watched range does not wait.
    let (addr, len) = (m.addr, m.len);
    m.mapped = false;
    let done = finishes_within(WAIT, move || {
        // SAFETY: our own mapping, no longer used by anyone.
        unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    });
    assert!(done, "munmap after monitor drop blocked");
    assert_eq!(sink.take(), vec![]);
}

/// A sink that waits for a lock held by a thread which is itself waiting
/// for its next event to be read — glibc's `free()` trimming a watched
/// heap while holding the malloc arena lock, with a sink that allocates
/// (found as a hang by `hmm-fuzz`). With one thread reading events and
/// running sinks this deadlocked: the reader sat in the sink. Events are
/// now read by one thread and handled by another (`cpu::handoff`).
#[test]
fn a_sink_waiting_for_an_unmapper_does_not_deadlock() {
    if !require_uffd("a_sink_waiting_for_an_unmapper_does_not_deadlock") {
        return;
    }
    /// Stands in for the arena lock: the sink takes it on every event.
    struct LockingSink {
        arena: Arc<Mutex<()>>,
        seen: Mutex<usize>,
    }
    impl InvalidationSink for LockingSink {
        fn invalidate(&self, _range: VaRange, _kind: EventKind) {
            let _g = self.arena.lock().unwrap();
            *self.seen.lock().unwrap() += 1;
        }
    }
    let arena = Arc::new(Mutex::new(()));
    let sink = Arc::new(LockingSink {
        arena: Arc::clone(&arena),
        seen: Mutex::new(0),
    });
    let mon = EventMonitor::start(Arc::clone(&sink)).expect("monitor starts");
    let mut a = Mapping::new(2);
    let mut b = Mapping::new(2);
    mon.watch(a.range()).unwrap();
    mon.watch(b.range()).unwrap();
    let (ra, rb) = (a.range(), b.range());
    // The "trimming thread": holds the arena lock across two unmaps of
    // watched memory. The first event's sink blocks on the lock; the
    // second unmap waits for its event to be read.
    let held = Arc::clone(&arena);
    let done = finishes_within(Duration::from_secs(10), move || {
        let _g = held.lock().unwrap();
        // SAFETY: our own mappings (the `Mapping`s below are marked
        // unmapped, so their drop does not unmap again).
        unsafe {
            libc::munmap(ra.start().0 as *mut libc::c_void, ra.len() as usize);
            std::thread::sleep(Duration::from_millis(50));
            libc::munmap(rb.start().0 as *mut libc::c_void, rb.len() as usize);
        }
    });
    a.mapped = false;
    b.mapped = false;
    if !done {
        // Leave the wedged monitor alone: dropping it would join a thread
        // that never returns.
        std::mem::forget(mon);
        panic!("deadlock: the unmapping thread still waits for its event to be read after 10 s");
    }
    assert!(mon.quiesce(WAIT), "both events handled");
    assert_eq!(*sink.seen.lock().unwrap(), 2);
}

/// Disarming an armed range touches only what is still armed: a part the
/// program unmapped (its `UNMAP` event took it out of the armed set) may
/// hold another mapping by now, owned by another userfaultfd, and
/// unregistering it would take that one's registration. (A mirror's
/// teardown disarmed such a range, and conformance `exclusive_cow` in
/// another test thread then failed with `EBUSY`.)
#[test]
fn disarming_skips_a_range_unmapped_since() {
    let Some((mon, _sink)) = monitor("disarming_skips_a_range_unmapped_since") else {
        return;
    };
    let mut a = Mapping::new(4);
    let old = a.pages(1, 2);
    mon.watch(a.range()).unwrap();
    mon.arm_missing(old).unwrap();
    a.unmap_pages(1, 2);
    assert_eq!(wait_counts(&mon, |c| c.unmap == 1).unmap, 1);
    assert!(!mon.is_armed(old), "the unmap disarmed the range");
    // A new mapping at the same addresses, registered on another
    // userfaultfd (another library's, or another `HostSpace`'s).
    // SAFETY: MAP_FIXED over the two pages just unmapped from our own
    // mapping; nothing else can hold them.
    let p = unsafe {
        libc::mmap(
            old.start().get() as *mut libc::c_void,
            old.len() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, old.start().get(), "remap the hole");
    let (other, _) = Userfaultfd::open(Features::NONE).expect("a second userfaultfd");
    other
        .register(old, RegisterMode::WP)
        .expect("the other registers it");
    let parts = mon
        .disarm_missing(old)
        .expect("disarming a range unmapped since");
    assert!(parts.is_empty(), "disarmed {parts:?}");
    // The other userfaultfd still owns the mapping (an unregistered one
    // would refuse with ENOENT).
    other
        .write_protect(old, true)
        .expect("the other userfaultfd's registration survives");
    other.unregister(old).unwrap();
    // SAFETY: our own two pages, mapped above; nothing refers to them.
    unsafe { libc::munmap(p, old.len() as usize) };
}
