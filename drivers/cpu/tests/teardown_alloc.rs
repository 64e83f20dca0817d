//! Teardown of an address space under a live mirror — the process-exit
//! path: every live region's notifier gets the `Release` invalidation once,
//! every whole-space notifier's `release` runs once, the in-flight device
//! submission is waited for, and the tearing-down thread allocates nothing.
//!
//! A counting global allocator proves the last part. It counts only the
//! thread that runs the teardown (a thread-local switch): the launch thread
//! and the device's workers allocate concurrently, and they are not on the
//! exit path. This file holds one test so nothing else runs in between.
//!
//! What this does *not* prove, stated honestly: the regions here hold no
//! mapped pages when the teardown runs (their pages were invalidated
//! first). A region that still maps pages zaps them in its `Release`
//! callback — reading accessed/dirty bits, writing dirty pages back,
//! clearing entries — and that path collects its batches in heap vectors:
//! it allocates, a few times per region, independent of the number of
//! pages (see `docs/BAD_INPUTS.md`, "Teardown").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm_conformance::{TestKernel, TestKernels, TestMap};
use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{Mirror, MirrorConfig};
use hmm_core::notifier::SpaceNotifier;
use hmm_core::VaRange;
use hmm_driver_cpu::{CpuDevice, CpuKernel};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNT_HERE.with(|c| c.get()) {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
    }
}

// SAFETY: forwards every call unchanged to the system allocator; counting
// has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System.alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Rel(AtomicUsize);
impl SpaceNotifier for Rel {
    fn release(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

static HOLD: AtomicBool = AtomicBool::new(true);
static STARTED: AtomicBool = AtomicBool::new(false);
static FINISHED: AtomicBool = AtomicBool::new(false);

#[test]
fn teardown_under_a_live_mirror_waits_for_work_and_allocates_nothing() {
    const REGIONS: usize = 48;
    let host = Arc::new(HostSpace::new().expect("host"));
    let cfg = MirrorConfig {
        pool_slots: 256,
        table_pages: 64,
        ..MirrorConfig::default()
    };
    let m = Arc::new(Mirror::new(Arc::clone(&host), CpuDevice::with_threads(2), cfg).expect("m"));
    let rels: Vec<Arc<Rel>> = (0..8).map(|_| Arc::new(Rel(AtomicUsize::new(0)))).collect();
    for r in &rels {
        host.space().register_notifier(r.clone()).expect("register");
    }
    // One region per one-page mapping (guard pages keep them apart).
    let maps: Vec<TestMap> = (0..REGIONS)
        .map(|_| TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE))
        .collect();
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let copy = m.backend().test_kernel(TestKernel::CopyU32).expect("k");
    for (i, t) in maps.iter().enumerate() {
        t.write_word(0, i as u32);
        m.launch(&copy, 1, [t.addr(), out.addr()]).expect("launch");
        assert_eq!(out.read_word(0), i as u32);
    }
    let regions = m.regions().len();
    assert_eq!(regions, REGIONS + 1, "one region per mapping, plus out");
    // Drop the device copies; the regions (subscriptions) stay live.
    host.space()
        .invalidate(VaRange::everything(), hmm_core::notifier::EventKind::Clear);
    assert_eq!(m.stats().mapped_pages, 0);
    assert_eq!(host.space().subscribed_ranges().len(), regions);

    // Work in flight: a kernel that holds its submission open until told.
    let hold = CpuKernel::new(|_lane, _i| {
        STARTED.store(true, Ordering::SeqCst);
        while HOLD.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        FINISHED.store(true, Ordering::SeqCst);
        Ok(())
    });
    let launcher = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || m.launch(&hold, 1, []).map(|_| ()))
    };
    while !STARTED.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let releaser = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(40));
        HOLD.store(false, Ordering::SeqCst);
    });

    let t0 = Instant::now();
    COUNT_HERE.with(|c| c.set(true));
    host.space().teardown();
    COUNT_HERE.with(|c| c.set(false));
    let took = t0.elapsed();

    assert_eq!(ALLOCS.load(Ordering::SeqCst), 0, "teardown allocated");
    assert!(
        FINISHED.load(Ordering::SeqCst),
        "teardown returned while the device submission still ran"
    );
    assert!(took >= Duration::from_millis(30), "it waited ({took:?})");
    let st = m.stats();
    assert_eq!(
        st.invalidations[6], regions as u64,
        "every region got the Release invalidation exactly once"
    );
    assert!(rels.iter().all(|r| r.0.load(Ordering::SeqCst) == 1));
    releaser.join().expect("releaser");
    launcher
        .join()
        .expect("launcher")
        .expect("the in-flight launch completed");
    // After teardown: new regions are refused with a typed error, and the
    // mirror still drops cleanly, removing every subscription.
    let fresh = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    assert!(matches!(
        m.launch(&copy, 1, [fresh.addr(), out.addr()]),
        Err(hmm_core::mirror::MirrorError::TornDown)
    ));
    let m = Arc::into_inner(m).expect("sole owner");
    drop(m);
    assert!(host.space().subscribed_ranges().is_empty());
    assert!(rels.iter().all(|r| r.0.load(Ordering::SeqCst) == 1));
}
