//! Memory discarded during a launch is never read through its old copy by
//! a later round of that launch.
//!
//! The thread that discards memory (`madvise(MADV_DONTNEED)`) resumes as
//! soon as its userfaultfd event is *read*; the invalidation that drops the
//! device's copy runs afterwards, on the event monitor's handler thread.
//! Before each submission the mirror now waits until every event read so
//! far has been handled (`HostSpace::settle`). Without that wait, a round
//! submitted in between read the discarded page's old contents — and on
//! the GPU drivers, whose launches are long, `hmm-stress` found words torn
//! between old bytes and zeros: a fault-service copy had raced the zap, and
//! the launch ran before the event's invalidation dropped the torn copy.
//!
//! The test makes the gap wide and certain: the handler thread is kept
//! busy for a while with an earlier event (a slow notifier on another
//! watched range), so the discard's own event waits, read but unhandled,
//! while the launch moves on to its next round.

#![allow(missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmm_core::cpu::host::{EventSource, HostSpace};
use hmm_core::mirror::{Mirror, MirrorConfig};
use hmm_core::notifier::{EventKind, Interval, IntervalNotifier, NotifierRange, Seq};
use hmm_core::{VaRange, VirtAddr};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

const PAGE: usize = 4096;
/// How long the slow notifier keeps the handler thread: far longer than a
/// round of a one-invocation launch, well inside `settle`'s 1 s bound.
const HOLD: Duration = Duration::from_millis(300);

/// Private anonymous pages, unmapped on drop.
struct Pages {
    base: *mut libc::c_void,
    len: usize,
}

impl Pages {
    /// `n` pages with protection `prot`, word 0 of each set to `v` where
    /// writable.
    fn new(n: usize, prot: libc::c_int, v: u32) -> Pages {
        let len = n * PAGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers
        // to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let pages = Pages { base, len };
        if prot & libc::PROT_WRITE != 0 {
            for i in 0..n {
                pages.set(i, v);
            }
        }
        pages
    }

    fn addr(&self, i: usize) -> u64 {
        self.base as u64 + (i * PAGE) as u64
    }

    fn range(&self, i: usize) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.addr(i)), PAGE as u64).unwrap()
    }

    fn set(&self, i: usize, v: u32) {
        // SAFETY: word 0 of page `i` of our own writable mapping.
        unsafe { std::ptr::write_volatile(self.addr(i) as *mut u32, v) };
    }

    fn get(&self, i: usize) -> u32 {
        // SAFETY: word 0 of page `i` of our own mapping.
        unsafe { std::ptr::read_volatile(self.addr(i) as *const u32) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The tests take turns: each has a host of its own (a userfaultfd of its
/// own), and a mapping of one placed next to one of the other's may merge
/// with it and be registered by the other's host first (`EBUSY`).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Discards `addr`'s page (private anonymous memory then reads as zeros).
fn discard(addr: u64) {
    // SAFETY: a page of ours (captured by address); no Rust reference into
    // it is alive while a kernel runs.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// Keeps the monitor's handler thread busy on `Remove` events.
struct Slow;

impl IntervalNotifier for Slow {
    fn invalidate(&self, interval: &Interval, range: &NotifierRange, cur_seq: Seq) -> bool {
        interval.set_seq(cur_seq);
        if range.event == EventKind::Remove {
            std::thread::sleep(HOLD);
        }
        true
    }
}

#[test]
fn a_round_after_a_discard_returned_reads_zeros_not_the_old_copy() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let host = Arc::new(HostSpace::new().expect("host space"));
    if !matches!(host.event_source(), EventSource::Userfaultfd) {
        assert_ne!(
            std::env::var("HMM_REQUIRE_UFFD").as_deref(),
            Ok("1"),
            "HMM_REQUIRE_UFFD=1 but userfaultfd is unavailable: {:?}",
            host.event_source()
        );
        println!("skipped: no userfaultfd events ({:?})", host.event_source());
        return;
    }
    // Page 0: the data page, resident before the launch; page 1: in the
    // same region, not resident (the fault that ends round 1). No new
    // region may be needed during the launch: a region registered during
    // an invalidation waits for it to end, which would end the stall.
    let input = Pages::new(2, libc::PROT_READ | libc::PROT_WRITE, 7);
    input.set(0, 0xAAAA);
    let out = Pages::new(1, libc::PROT_READ | libc::PROT_WRITE, 0x5555);
    // A watched page with the slow notifier: its event holds the handler.
    // It lies 2 MiB inside a `PROT_NONE` reservation, out of reach of the
    // mirror's regions: a fault in a region the stalled invalidation
    // reached would rightly wait for it to end.
    let reservation = Pages::new(1024, libc::PROT_NONE, 0);
    let stall_at = reservation.addr(512);
    // SAFETY: one page of our own reservation.
    let r = unsafe { libc::mprotect(stall_at as *mut libc::c_void, PAGE, libc::PROT_READ) };
    assert_eq!(r, 0);
    let stall = reservation.range(512);
    host.watch(stall).expect("watch the stall page");
    let _slow = host.space().insert(stall, Slow).expect("notifier");

    let m = Mirror::new(
        Arc::clone(&host),
        CpuDevice::with_threads(1),
        MirrorConfig::default(),
    )
    .expect("mirror");
    // Both input pages resident in one region; then a CPU write to page 1,
    // whose copy the launch's sync point drops: round 1 faults on it
    // inside the existing region.
    let both = VaRange::new(VirtAddr(input.addr(0)), VirtAddr(input.addr(2))).unwrap();
    m.prefetch(both, false).expect("prefetch the input pages");
    input.set(1, 7);
    m.prefetch(out.range(0), true)
        .expect("prefetch the output page");

    // Round 1: the invocation stalls the handler (the first discard
    // returns once its event is read; handling it takes `HOLD`), discards
    // the data page (returns once read: queued behind the stall), then
    // reads a page that is not resident, which ends the round. Round 2
    // (the replay) reads the data page — discarded before it was
    // submitted — and stores what it read.
    let discarded = Arc::new(AtomicBool::new(false));
    let data_at = input.addr(0);
    let d = Arc::clone(&discarded);
    let k = CpuKernel::new(move |lane, _| {
        if !d.swap(true, Ordering::SeqCst) {
            discard(stall_at);
            discard(data_at);
        }
        let (src, other, dst) = (lane.args()[0], lane.args()[1], lane.args()[2]);
        let o = lane.load_u32(other)?;
        let v = lane.load_u32(src)?;
        lane.store_u32(dst, v.wrapping_add(o - 7))
    });
    let report = m
        .launch(&k, 1, [input.addr(0), input.addr(1), out.addr(0)])
        .expect("launch");
    assert!(discarded.load(Ordering::SeqCst));
    assert!(
        report.submissions >= 2,
        "the launch must take a second round ({} submissions)",
        report.submissions
    );
    assert_eq!(
        input.get(0),
        0,
        "the CPU page reads as zeros after the discard"
    );
    assert_eq!(
        out.get(0),
        0,
        "a round submitted after the discard returned read the page's old copy ({:#x})",
        out.get(0)
    );
}

/// The same stall over memory armed for migration (migrated, then given
/// back by a CPU read: present, and still registered for missing-page
/// faults). The kernel writes the page and the CPU discards it during the
/// launch, its event read but not yet handled; the launch's write-back
/// (under the driver lock) then stores into the hole, which is a
/// missing-page fault the fault-back server must resolve *without* that
/// lock (the discard's queued zap covers the page: zeros are its data).
/// Waiting for the lock there deadlocked the write-back with the server.
#[test]
fn a_write_back_into_armed_memory_discarded_during_the_launch_does_not_hang() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let host = Arc::new(HostSpace::new().expect("host space"));
    if !matches!(host.event_source(), EventSource::Userfaultfd)
        || hmm_core::mirror::HostSide::migration_support(&*host).is_err()
    {
        assert_ne!(
            std::env::var("HMM_REQUIRE_UFFD").as_deref(),
            Ok("1"),
            "HMM_REQUIRE_UFFD=1 but migration is unavailable"
        );
        println!("skipped: no userfaultfd migration here");
        return;
    }
    let data = Pages::new(1, libc::PROT_READ | libc::PROT_WRITE, 0x1234);
    let reservation = Pages::new(1024, libc::PROT_NONE, 0);
    let stall_at = reservation.addr(512);
    // SAFETY: one page of our own reservation.
    let r = unsafe { libc::mprotect(stall_at as *mut libc::c_void, PAGE, libc::PROT_READ) };
    assert_eq!(r, 0);
    let stall = reservation.range(512);
    host.watch(stall).expect("watch the stall page");
    let _slow = host.space().insert(stall, Slow).expect("notifier");
    let m = Arc::new(
        Mirror::new(
            Arc::clone(&host),
            CpuDevice::with_threads(1),
            MirrorConfig::default(),
        )
        .expect("mirror"),
    );
    m.migrate_to_device(data.range(0)).expect("migrate");
    assert_eq!(data.get(0), 0x1234, "given back by this read; still armed");
    let data_at = data.addr(0);
    let discarded = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&discarded);
    let k = CpuKernel::new(move |lane, _| {
        lane.store_u32(lane.args()[0], 0x5678)?;
        if !d.swap(true, Ordering::SeqCst) {
            discard(stall_at);
            discard(data_at);
        }
        Ok(())
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = Arc::clone(&m);
    std::thread::spawn(move || {
        let r = m2.launch(&k, 1, [data_at]).map(|_| ());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(r) => r.expect("launch"),
        Err(_) => panic!("the launch's write-back hung on a discarded armed page"),
    }
    assert!(discarded.load(Ordering::SeqCst));
    let v = data.get(0);
    assert!(
        v == 0 || v == 0x5678,
        "the page reads as the discard's zeros or the device's later write, not {v:#x}"
    );
    m.health().expect("healthy");
}
