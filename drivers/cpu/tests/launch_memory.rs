//! Host memory per launch is bounded by the launch size, not by how many
//! invocations fault (issue #19, finding 7: about 70 bytes were kept per
//! faulting invocation — 1.5 GiB at 2^24 of them). A counting global
//! allocator tracks the live heap bytes and their peak; this file holds a
//! single test so no other test's allocations are counted.

#![allow(missing_docs)]

use std::sync::Arc;

use hmm_conformance::heap::{launch_heap_is_bounded, peak_growth, Counting};

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{Mirror, MirrorConfig};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One test (the counter is global): 2^20 invocations that all read one
/// page — every one of them faults in the first round, and all are
/// replayed in the second — then the suite's scenario shared with the GPU
/// drivers.
#[test]
fn launch_memory_does_not_grow_with_faulting_invocations() {
    one_page_read_by_all();
    launch_heap_is_bounded(CpuDevice::new(), 1 << 20, 8 << 20);
}

fn one_page_read_by_all() {
    const N: u32 = 1 << 20;
    let host = Arc::new(HostSpace::new().expect("host space"));
    let m = Mirror::new(host, CpuDevice::new(), MirrorConfig::default()).expect("mirror");
    let data = vec![7u32; 1024];
    let k = CpuKernel::new(|lane, _| {
        let v = lane.load_u32(lane.args()[0])?;
        assert_eq!(v, 7);
        Ok(())
    });
    // A warm-up launch on another buffer sets up the mirror's own
    // structures (threads, pools, caches) outside the measurement.
    let warm = vec![7u32; 1024];
    m.launch(&k, 64, (warm.as_ptr(),)).expect("warm-up launch");

    let mut report = None;
    let peak = peak_growth(|| report = Some(m.launch(&k, N, (data.as_ptr(),)).expect("launch")));
    let report = report.expect("ran");
    println!(
        "launch of {N} invocations, {} faulted: peak heap growth {} KiB ({:.2} bytes per invocation)",
        report.faults,
        peak / 1024,
        peak as f64 / f64::from(N)
    );
    // Round one: every invocation faults on the one page (only the
    // fault buffer's worth carry a record); round two replays them all.
    assert!(
        report.submissions >= 2 && report.faults > 0,
        "the launch faulted and replayed: {report:?}"
    );
    // The bound: the replay set (n / 8 bytes) and the incomplete set of
    // the outcome (n / 8), plus a constant — the fault buffer (65,536
    // records) and the mirror's per-record service state. 70 bytes per
    // faulting invocation (before) would be 70 MiB here.
    let bound = 2 * (N as usize / 8) + (12 << 20);
    assert!(
        peak <= bound,
        "peak heap growth {peak} bytes for {N} faulting invocations (bound {bound})"
    );
}
