//! `range_fault` under the notifier sequence (`cpu::mirror_fault`), on real
//! mappings.

use std::sync::Mutex;
use std::time::Duration;

use hmm_core::cpu::mirror_fault::{
    fault_and_commit, range_fault_checked, FaultLoopStats, MirrorFaultError,
};
use hmm_core::cpu::range_fault::{FaultError, FaultFlags, PageState, RangeFaulter};
use hmm_core::notifier::{
    AddressSpace, Attempt, EventKind, Interval, IntervalNotifier, NotifierRange, Seq,
};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

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

struct Map(*mut libc::c_void, usize);
impl Map {
    fn anon(pages: usize, prot: libc::c_int) -> Map {
        let len = pages * PAGE_SIZE as usize;
        // SAFETY: anonymous private mapping at a kernel-chosen address;
        // nothing else refers to it.
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
        assert_ne!(p, libc::MAP_FAILED);
        Map(p, len)
    }
    fn range(&self) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.0 as u64), self.1 as u64).unwrap()
    }
}
impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing borrows it any more.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn region() -> Region {
    Region {
        lock: Mutex::new(Vec::new()),
    }
}

#[test]
fn fault_and_commit_installs_a_clean_snapshot() {
    let m = Map::anon(8, libc::PROT_READ | libc::PROT_WRITE);
    let space = AddressSpace::new();
    let sub = space.insert(m.range(), region()).unwrap();
    let f = RangeFaulter::new().unwrap();
    let mut st = FaultLoopStats::default();
    let n = fault_and_commit(
        &f,
        sub.interval(),
        m.range(),
        FaultFlags::WRITE,
        Duration::from_secs(1),
        &mut st,
        |seq, pages| {
            let mut ptes = sub.lock.lock().unwrap();
            if sub.interval().read_retry(seq) {
                return Ok::<_, ()>(Attempt::Retry);
            }
            ptes.extend_from_slice(pages);
            Ok(Attempt::Done(pages.len()))
        },
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
    assert!(sub
        .lock
        .lock()
        .unwrap()
        .iter()
        .all(|p| *p == PageState::Valid { writable: true }));
}

#[test]
fn snapshot_during_an_invalidation_reports_busy() {
    let m = Map::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    let space = AddressSpace::new();
    let sub = space.insert(m.range(), region()).unwrap();
    let f = RangeFaulter::new().unwrap();
    let seq = sub.interval().read_begin();
    space.invalidate(m.range(), EventKind::Remove);
    let mut out = Vec::new();
    let r = range_fault_checked(
        &f,
        sub.interval(),
        seq,
        m.range(),
        FaultFlags::READ,
        &mut out,
    );
    assert!(matches!(r, Err(MirrorFaultError::Busy)));
    // A fresh sequence is clean.
    let seq = sub.interval().read_begin();
    range_fault_checked(
        &f,
        sub.interval(),
        seq,
        m.range(),
        FaultFlags::READ,
        &mut out,
    )
    .unwrap();
    assert_eq!(out.len(), 2);
}

#[test]
fn a_commit_refused_under_the_lock_starts_over() {
    let m = Map::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    let space = AddressSpace::new();
    let sub = space.insert(m.range(), region()).unwrap();
    let f = RangeFaulter::new().unwrap();
    let mut st = FaultLoopStats::default();
    let mut first = true;
    fault_and_commit(
        &f,
        sub.interval(),
        m.range(),
        FaultFlags::READ,
        Duration::from_secs(1),
        &mut st,
        |seq, pages| {
            if first {
                // An invalidation lands between the snapshot and the lock.
                first = false;
                space.invalidate(m.range(), EventKind::CpuWrite);
            }
            let mut ptes = sub.lock.lock().unwrap();
            if sub.interval().read_retry(seq) {
                return Ok::<_, ()>(Attempt::Retry);
            }
            ptes.extend_from_slice(pages);
            Ok(Attempt::Done(()))
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
    let m = Map::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let space = AddressSpace::new();
    let sub = space.insert(m.range(), region()).unwrap();
    let f = RangeFaulter::new().unwrap();
    let mut st = FaultLoopStats::default();
    let r = fault_and_commit(
        &f,
        sub.interval(),
        m.range(),
        FaultFlags::READ,
        Duration::from_millis(20),
        &mut st,
        |_, _| Ok::<Attempt<()>, ()>(Attempt::Retry),
    );
    match r {
        Err(MirrorFaultError::Timeout { attempts, elapsed }) => {
            assert!(attempts >= 1);
            assert!(elapsed >= Duration::from_millis(20));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn protection_errors_end_the_loop_at_once() {
    let m = Map::anon(2, libc::PROT_NONE);
    let space = AddressSpace::new();
    let sub = space.insert(m.range(), region()).unwrap();
    let f = RangeFaulter::new().unwrap();
    let mut st = FaultLoopStats::default();
    let r = fault_and_commit(
        &f,
        sub.interval(),
        m.range(),
        FaultFlags::READ,
        Duration::from_secs(1),
        &mut st,
        |_, _| Ok::<Attempt<()>, ()>(Attempt::Done(())),
    );
    assert!(
        matches!(r, Err(MirrorFaultError::Fault(FaultError::NoAccess { .. }))),
        "{r:?}"
    );
    assert_eq!(st.attempts, 1);
}
