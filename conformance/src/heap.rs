//! Host memory per launch (issue 19, finding 7): a counting global
//! allocator a driver's test binary installs, and the scenario that
//! measures a launch's peak heap growth with it.
//!
//! A test binary that uses it holds that one test, so no other test's
//! allocations are counted:
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: hmm_conformance::heap::Counting = hmm_conformance::heap::Counting;
//!
//! // What a closure allocates at its peak is seen:
//! let grew = hmm_conformance::heap::peak_growth(|| {
//!     let v = vec![1u8; 1 << 20];
//!     std::hint::black_box(&v);
//! });
//! assert!(grew >= 1 << 20, "{grew}");
//! ```
//!
//! What it counts is the Rust heap: a GPU driver's device memory (which on
//! lavapipe is host memory too, allocated by Mesa) is the device's, sized
//! by the same plan (`n / 8` bytes of incomplete bitmap and at most as
//! much replay bitmap), and not seen here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use hmm_core::mirror::MirrorConfig;

use crate::support::{launch, setup, with_launch_mode, LaunchMode};
use crate::{TestKernel, TestKernels};

/// A global allocator that forwards to [`System`] and tracks the live
/// heap bytes and their peak.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    // SeqCst: simple and test-only; the peak must see every increase.
    let now = LIVE.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: forwards every call unchanged to the system allocator; the
// counters have no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
        // SAFETY: `p` came from `System.alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let q = unsafe { System.realloc(p, l, n) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::SeqCst);
            grew(n);
        }
        q
    }
}

/// Runs `f` and returns its peak heap growth in bytes (0 unless
/// [`Counting`] is the global allocator).
pub fn peak_growth(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}

/// A launch of `n` invocations of which every one faults in the first
/// round (each writes its own word of a buffer the device has never
/// seen, so up to 1024 share a page) and most are replayed: its peak heap
/// growth must stay within `n / 8` bytes per incomplete-invocation set
/// the core and driver hold at once (five: the replay set, the outcome's
/// set, the driver's replay bitmap, its zeroed control buffer and its
/// read-back) plus `constant` bytes. It used to be ≈70 bytes per faulting
/// invocation on the cpu driver and 16 bytes (a replay list and its
/// copies) on the GPU drivers. Needs [`Counting`] installed.
pub fn launch_heap_is_bounded<B: TestKernels>(b: B, n: u32, constant: usize) {
    let pages = (n as usize * 4).div_ceil(hmm_core::PAGE_SIZE as usize);
    let cfg = MirrorConfig {
        pool_slots: (pages as u32 + 64).next_power_of_two(),
        table_pages: 512,
        ..MirrorConfig::default()
    };
    let (_h, m) = setup(b, cfg);
    let fill = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    // Warm-up on another buffer: the mirror's own structures (threads,
    // pools, caches, per-launch device resources) are set up outside the
    // measurement.
    let mut warm = vec![0u32; n as usize];
    launch(&m, &fill, n, [warm.as_mut_ptr() as u64, 1]).expect("warm-up launch");
    // Both ways of launching: the non-blocking path (a scope, a thread,
    // a result slot) may add a constant, never a per-invocation cost.
    for mode in [LaunchMode::Blocking, LaunchMode::NonBlocking] {
        let mut dst = vec![0u32; n as usize];
        let mut report = None;
        let (peak, _) = with_launch_mode(mode, || {
            peak_growth(|| {
                report = Some(launch(&m, &fill, n, [dst.as_mut_ptr() as u64, 5]).expect("launch"));
            })
        });
        let report = report.expect("ran");
        println!(
            "{} ({mode:?}): launch of {n} invocations, {} faults, {} submissions: peak heap growth {} KiB ({:.2} bytes per invocation)",
            m.backend().info().driver,
            report.faults,
            report.submissions,
            peak / 1024,
            peak as f64 / f64::from(n)
        );
        assert!(
            report.submissions >= 2 && report.faults > 0,
            "the launch faulted and replayed: {report:?}"
        );
        assert!(
            dst.iter().enumerate().all(|(i, &v)| v == 5 + i as u32),
            "every invocation ran once"
        );
        let bound = 5 * (n as usize / 8) + constant;
        assert!(
            peak <= bound,
            "{mode:?}: peak heap growth {peak} bytes for {n} faulting invocations (bound {bound})"
        );
    }
    drop(warm);
}
