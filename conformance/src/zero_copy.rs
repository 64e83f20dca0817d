//! Scenarios only a zero-copy device
//! ([`host_windows`](hmm_core::mirror::backend::Backend::host_windows))
//! runs: pinning is a typed error, the device shares the CPU's pages,
//! windows are evicted and reused, one invocation can use every window at
//! once, and memory is unmapped and removed beside running launches.

use std::sync::Arc;

use hmm_core::mirror::{MirrorConfig, MirrorError};
use hmm_core::notifier::EventKind;
use hmm_core::PAGE_SIZE;

use crate::support::{
    device_copy, events_available, launch, setup, small_cfg, spawn, zero_copy, TestMap, WPP,
};
use crate::{TestKernel, TestKernels};

/// Zero-copy: pinning copies into a pool, which a zero-copy device does
/// not have: a typed error, and the mirror keeps working.
pub fn zero_copy_pin_is_unsupported<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    assert!(zero_copy(&m), "a zero-copy device offers host windows");
    let src = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 8);
    match m.pin(src.range()) {
        Err(MirrorError::Unsupported(_)) => {}
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let out = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    device_copy(&m, src.addr(), &out, 2 * WPP).expect("launch");
    assert_eq!(out.read_word(WPP + 1), 8);
}

/// Zero-copy: the device uses the CPU's own pages. Nothing is copied in or
/// written back; a CPU write between launches is seen without the page
/// faulting in again (nothing stale was dropped, nothing needed to be);
/// device writes are in the CPU's memory when the launch returns.
pub fn zero_copy_shares_the_cpu_pages<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32);
    let r1 = device_copy(&m, src.addr(), &out, 8 * WPP).expect("launch 1");
    assert!(r1.faults > 0 && r1.pages_in > 0, "first touch maps: {r1:?}");
    assert_eq!(out.read_word(8 * WPP - 1), (8 * WPP - 1) as u32);
    src.fill(|i| 3 * i as u32);
    let r2 = device_copy(&m, src.addr(), &out, 8 * WPP).expect("launch 2");
    assert_eq!(
        (r2.faults, r2.pages_in, r2.pages_out, r2.submissions),
        (0, 0, 0, 1),
        "the CPU's write needed no invalidation and nothing moved"
    );
    assert_eq!(out.read_word(8 * WPP - 1), 3 * (8 * WPP - 1) as u32);
    let st = m.stats();
    assert_eq!(
        (st.pages_out, st.pool_used),
        (0, 0),
        "no write-back, no pool"
    );
    // "This range was recycled": the window goes too, and the next launch
    // maps (and, on a pinning GPU, imports) whatever is there now.
    h.space().invalidate(src.range(), EventKind::Clear);
    src.fill(|i| 5 * i as u32);
    let r3 = device_copy(&m, src.addr(), &out, 8 * WPP).expect("launch 3");
    assert!(r3.faults > 0, "the cleared range faults in again");
    assert_eq!(out.read_word(8 * WPP - 1), 5 * (8 * WPP - 1) as u32);
}

/// Zero-copy: more regions than windows, one per launch: windows are
/// evicted (oldest first) and bound again; every result stays right.
pub fn zero_copy_window_eviction<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let windows = m.backend().host_windows().expect("zero-copy").count as usize;
    // Separate mappings (with guard pages): one region each.
    let maps: Vec<TestMap> = (0..windows + 3)
        .map(|j| {
            let t = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
            t.fill(|i| (j * 10_000 + i) as u32);
            t
        })
        .collect();
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    for round in 0..2 {
        for (j, t) in maps.iter().enumerate() {
            device_copy(&m, t.addr(), &out, WPP).expect("launch");
            assert_eq!(
                out.read_word(5),
                (j * 10_000 + 5) as u32,
                "round {round} map {j}"
            );
        }
    }
    assert!(m.stats().evictions > 0, "windows were evicted");
}

/// Zero-copy: memory is unmapped, `MADV_DONTNEED`ed and mapped again
/// *beside* running launches — by a thread whose own launches on it have
/// returned, which the zero-copy contract allows — while another thread
/// launches on memory of its own. Windows are detached by the destructive
/// events while fault service binds others; every result stays right and
/// every dead region is released.
pub fn zero_copy_unmaps_beside_a_launch<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let m = Arc::new(m);
    const ROUNDS: u32 = 60;
    let steady = {
        let m = Arc::clone(&m);
        spawn(move || {
            let src = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
            let out = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
            for r in 0..ROUNDS {
                src.fill(|i| i as u32 ^ r);
                device_copy(&m, src.addr(), &out, 8 * WPP).expect("steady launch");
                assert_eq!(out.read_word(8 * WPP - 3), (8 * WPP - 3) as u32 ^ r);
            }
        })
    };
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    for r in 0..ROUNDS {
        let map = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
        map.fill(|i| i as u32 + r);
        device_copy(&m, map.addr(), &out, 4 * WPP).expect("churn launch");
        assert_eq!(out.read_word(WPP + 1), WPP as u32 + 1 + r);
        // SAFETY: the first page of our own mapping; no launch uses it
        // now (ours returned; the other thread's never touches it).
        let rc = unsafe {
            libc::madvise(
                map.addr() as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
        if !events_available(&h) {
            h.space().invalidate(map.range(), EventKind::Remove);
        }
        device_copy(&m, map.addr(), &out, 4 * WPP).expect("launch after the remove");
        assert_eq!(out.read_word(5), 0, "the removed page reads as zeros");
        assert_eq!(out.read_word(WPP + 1), WPP as u32 + 1 + r);
        if !events_available(&h) {
            h.space().invalidate(map.range(), EventKind::Unmap);
        }
        drop(map); // unmapped while the other thread's launches run
    }
    steady.join().expect("steady thread");
    if events_available(&h) {
        assert!(m.stats().invalidations[0] > 0, "unmaps were seen");
    }
    assert!(m.flush_releases(), "dead regions released");
}

/// A linked list with one node at the start of each of `maps`; returns
/// the sum of its values.
fn list_across(maps: &[TestMap]) -> u64 {
    let mut want = 0u64;
    for (j, t) in maps.iter().enumerate() {
        let next = maps.get(j + 1).map_or(0, |n| n.addr());
        let value = 7 * j as u64 + 1;
        want += value;
        t.write_word(0, next as u32);
        t.write_word(1, (next >> 32) as u32);
        t.write_word(2, value as u32);
        t.write_word(3, 0);
    }
    want
}

/// Zero-copy: one launch whose single invocation needs every window at
/// once (a list through `windows - 1` separate mappings, plus the output),
/// after earlier launches filled the windows with other regions: each
/// fault-service round evicts only windows of earlier rounds, so the walk
/// keeps what it mapped and the sum is right. One node more than the
/// windows can hold cannot work — the invocation restarts from its first
/// node on every replay, as on a GPU — and is the typed `NoProgress`,
/// not a hang (the copy-mode analogue: an invocation touching more pages
/// than the pool).
pub fn zero_copy_one_launch_fills_every_window<B: TestKernels>(b: B) {
    let cfg = MirrorConfig {
        max_replays: 300,
        ..small_cfg()
    };
    let (_h, m) = setup(b, cfg);
    let windows = m.backend().host_windows().expect("zero-copy").count as usize;
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let filler: Vec<TestMap> = (0..windows)
        .map(|_| TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE))
        .collect();
    for t in &filler {
        device_copy(&m, t.addr(), &out, 1).expect("filler launch");
    }
    let k = m
        .backend()
        .test_kernel(TestKernel::ListSum)
        .expect("kernel");
    let maps: Vec<TestMap> = (0..windows - 1)
        .map(|_| TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE))
        .collect();
    let want = list_across(&maps);
    let evicted = m.stats().evictions;
    launch(&m, &k, 1, [maps[0].addr(), out.addr()]).expect("launch");
    let got = u64::from(out.read_word(0)) | (u64::from(out.read_word(1)) << 32);
    assert_eq!(got, want);
    assert!(
        m.stats().evictions > evicted,
        "windows were evicted during the walk"
    );
    let more: Vec<TestMap> = (0..windows + 1)
        .map(|_| TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE))
        .collect();
    list_across(&more);
    match launch(&m, &k, 1, [more[0].addr(), out.addr()]) {
        Err(MirrorError::NoProgress { .. }) => {}
        other => panic!("expected NoProgress, got {other:?}"),
    }
}
