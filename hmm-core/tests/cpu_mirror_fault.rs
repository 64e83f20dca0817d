//! `range_fault` under the notifier sequence (`cpu::mirror_fault`), on real
//! mappings.

use std::sync::Mutex;
use std::time::Duration;

use hmm_core::cpu::mirror_fault::{
    fault_and_commit, range_fault_checked, FaultLoopStats, MirrorFaultError,
};
use hmm_core::cpu::range_fault::{FaultError, FaultFlags, PageState, RangeFaulter};
use hmm_core::notifier::{
    AddressSpace, Attempt, EventKind, Interval, IntervalNotifier, NotifierRange, Seq, Subscription,
};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

/// A private anonymous mapping between two `PROT_NONE` guard pages (tests
/// run in parallel threads; the guards keep the kernel from merging
/// neighbouring mappings into one VMA); unmapped on drop.
struct TestMap {
    ptr: *mut u8,
    len: usize,
}

impl TestMap {
    fn anon(pages: usize, prot: libc::c_int) -> TestMap {
        let pg = PAGE_SIZE as usize;
        let len = pages * pg;
        // SAFETY: reserves fresh address space at a kernel-chosen address;
        // nothing else refers to it.
        let guard = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + 2 * pg,
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
        let want = (guard as usize + pg) as *mut libc::c_void;
        // SAFETY: MAP_FIXED over the middle of our own reservation only.
        let p = unsafe {
            libc::mmap(
                want,
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_eq!(p, want, "mmap: {}", std::io::Error::last_os_error());
        TestMap { ptr: p.cast(), len }
    }

    fn range(&self) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.ptr as u64), self.len as u64).expect("range")
    }
}

impl Drop for TestMap {
    fn drop(&mut self) {
        let pg = PAGE_SIZE as usize;
        // SAFETY: our own mapping and its two guard pages, unmapped once.
        unsafe { libc::munmap(self.ptr.sub(pg).cast(), self.len + 2 * pg) };
    }
}

struct Region {
    lock: Mutex<Vec<PageState>>,
}

impl IntervalNotifier for Region {
    fn invalidate(&self, i: &Interval, _r: &NotifierRange, s: Seq) -> bool {
        let mut ptes = self.lock.lock().unwrap();
        i.set_seq(s);
        ptes.clear();
        true
    }
}

/// A mapping, a subscription over it, and a faulter.
struct Rig {
    m: TestMap,
    space: AddressSpace,
    sub: Subscription<Region>,
    f: RangeFaulter,
}

impl Rig {
    fn new(pages: usize, prot: libc::c_int) -> Rig {
        let m = TestMap::anon(pages, prot);
        let space = AddressSpace::new();
        let sub = space
            .insert(
                m.range(),
                Region {
                    lock: Mutex::new(Vec::new()),
                },
            )
            .unwrap();
        let f = RangeFaulter::new().unwrap();
        Rig { m, space, sub, f }
    }

    /// `fault_and_commit` over the whole mapping.
    fn fault<T, E>(
        &self,
        flags: FaultFlags,
        timeout: Duration,
        st: &mut FaultLoopStats,
        commit: impl FnMut(Seq, &[PageState]) -> Result<Attempt<T>, E>,
    ) -> Result<T, MirrorFaultError<E>> {
        fault_and_commit(
            &self.f,
            self.sub.interval(),
            self.m.range(),
            flags,
            timeout,
            st,
            commit,
        )
    }

    /// The driver's side of a commit: under the region lock, retry if the
    /// sequence moved, else install the snapshot.
    fn install(&self, seq: Seq, pages: &[PageState]) -> Result<Attempt<usize>, ()> {
        let mut ptes = self.sub.lock.lock().unwrap();
        if self.sub.interval().read_retry(seq) {
            return Ok(Attempt::Retry);
        }
        ptes.extend_from_slice(pages);
        Ok(Attempt::Done(pages.len()))
    }
}

#[test]
fn fault_and_commit_installs_a_clean_snapshot() {
    let r = Rig::new(8, libc::PROT_READ | libc::PROT_WRITE);
    let mut st = FaultLoopStats::default();
    let n = r
        .fault(
            FaultFlags::WRITE,
            Duration::from_secs(1),
            &mut st,
            |seq, pages| r.install(seq, pages),
        )
        .unwrap();
    assert_eq!(n, 8);
    assert_eq!(
        st,
        FaultLoopStats {
            attempts: 1,
            busy: 0,
            refused: 0
        }
    );
    assert!(r
        .sub
        .lock
        .lock()
        .unwrap()
        .iter()
        .all(|p| *p == PageState::Valid { writable: true }));
}

#[test]
fn snapshot_during_an_invalidation_reports_busy() {
    let r = Rig::new(2, libc::PROT_READ | libc::PROT_WRITE);
    let snapshot = |seq: Seq, out: &mut Vec<PageState>| {
        range_fault_checked(
            &r.f,
            r.sub.interval(),
            seq,
            r.m.range(),
            FaultFlags::READ,
            out,
        )
    };
    let mut out = Vec::new();
    let stale = r.sub.interval().read_begin();
    r.space.invalidate(r.m.range(), EventKind::Remove);
    assert!(matches!(
        snapshot(stale, &mut out),
        Err(MirrorFaultError::Busy)
    ));
    // A fresh sequence is clean.
    snapshot(r.sub.interval().read_begin(), &mut out).unwrap();
    assert_eq!(out.len(), 2);
}

#[test]
fn a_commit_refused_under_the_lock_starts_over() {
    let r = Rig::new(4, libc::PROT_READ | libc::PROT_WRITE);
    let mut st = FaultLoopStats::default();
    let mut first = true;
    r.fault(
        FaultFlags::READ,
        Duration::from_secs(1),
        &mut st,
        |seq, pages| {
            if first {
                // An invalidation lands between the snapshot and the lock.
                first = false;
                r.space.invalidate(r.m.range(), EventKind::CpuWrite);
            }
            r.install(seq, pages)
        },
    )
    .unwrap();
    assert_eq!(
        st,
        FaultLoopStats {
            attempts: 2,
            busy: 0,
            refused: 1
        }
    );
}

#[test]
fn the_loop_is_bounded_by_its_timeout() {
    let r = Rig::new(1, libc::PROT_READ | libc::PROT_WRITE);
    let mut st = FaultLoopStats::default();
    let res = r.fault(
        FaultFlags::READ,
        Duration::from_millis(20),
        &mut st,
        |_, _| Ok::<Attempt<()>, ()>(Attempt::Retry),
    );
    match res {
        Err(MirrorFaultError::Timeout { attempts, elapsed }) => {
            assert!(attempts >= 1);
            assert!(elapsed >= Duration::from_millis(20));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn protection_errors_end_the_loop_at_once() {
    let r = Rig::new(2, libc::PROT_NONE);
    let mut st = FaultLoopStats::default();
    let res = r.fault(FaultFlags::READ, Duration::from_secs(1), &mut st, |_, _| {
        Ok::<Attempt<()>, ()>(Attempt::Done(()))
    });
    assert!(
        matches!(
            res,
            Err(MirrorFaultError::Fault(FaultError::NoAccess { .. }))
        ),
        "{res:?}"
    );
    assert_eq!(st.attempts, 1);
}
