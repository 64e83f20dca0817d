//! One invocation doing tens of thousands of page walks, then a store.
//!
//! Regression test for a liveness bug: the page walk used to be a WGSL
//! `loop`, and on lavapipe a long-running invocation eventually left that
//! loop through the iteration bound naga inserts into every SPIR-V loop
//! (`force_loop_bounding`) instead of through its own `return`. The walk
//! then reported "not mapped" for a page whose entry was valid, the host
//! found nothing to do, and the launch replayed the same fault until
//! `max_replays`. A pointer chase over a 6000-node tree hit it; this test
//! does the same number of walks without the allocator's randomness.

use std::sync::Arc;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{Mirror, MirrorConfig};

/// Reads word 0 of page `(k * 97) % pages` of `base` for `k` in
/// `0..pages * rounds` — each read on another page than the last, so
/// each misses the one-entry translation cache and walks the table — then
/// stores the sum. The CPU's sum must come back.
const STRIDED_SUM: &str = r#"
fn hmm_kernel(i: u32) {
    let base = hmm_arg_ptr(0u);
    let pages = hmm_arg_u32(2u);
    let total = pages * hmm_arg_u32(3u);
    var sum = 0u;
    for (var k = 0u; k < total; k++) {
        sum += hmm_load_u32(hmm_index(base, (k * 97u) % pages, 4096u));
        if hmm_faulted() {
            break;
        }
    }
    hmm_store_u32(hmm_arg_ptr(1u), sum);
}
"#;

#[test]
fn a_long_invocation_keeps_translating() {
    let Some(dev) = hmm_driver_wgpu::test_device() else {
        return;
    };
    let kernel = dev.kernel(STRIDED_SUM).expect("kernel builds");
    let host = Arc::new(HostSpace::new().expect("host space"));
    let cfg = MirrorConfig {
        max_replays: 4096,
        ..MirrorConfig::default()
    };
    let m = Mirror::new(host, dev, cfg).expect("mirror");
    let pages = 256u32;
    let rounds = 200u32; // 51 200 walks in one invocation
    let data: Vec<u32> = (0..pages * 1024)
        .map(|w| w.wrapping_mul(2_654_435_761))
        .collect();
    // Fault the data in with a separate launch, so the long invocation
    // below runs in one round: the bug needed no fault to show.
    m.prefetch(hmm_core::VaRange::of_slice(&data).expect("range"), false)
        .expect("prefetch");
    let want = (0..pages * rounds)
        .map(|k| data[(((k * 97) % pages) * 1024) as usize])
        .fold(0u32, u32::wrapping_add);
    let mut out = vec![0u32; 1];
    let r = m
        .launch(&kernel, 1, (data.as_ptr(), out.as_mut_ptr(), pages, rounds))
        .expect("the launch completes");
    assert_eq!(out[0], want, "device sum");
    // The output page is the only one left to fault in.
    assert!(r.submissions <= 2, "{} submissions", r.submissions);
}

/// Counts to `n` in a loop and stores the count.
const COUNT_TO: &str = r#"
fn hmm_kernel(i: u32) {
    let n = hmm_arg_u32(1u);
    var c = 0u;
    for (var k = 0u; k < n; k++) {
        c += 1u;
    }
    hmm_store_u32(hmm_arg_ptr(0u), c);
}
"#;

/// An adapter that cuts loops short (lavapipe: 65535 iterations per
/// invocation) gives a typed error, never a wrong count; any other gives
/// the count.
#[test]
fn loops_cut_short_by_the_adapter_are_an_error() {
    let Some(dev) = hmm_driver_wgpu::test_device() else {
        return;
    };
    let budgeted = dev.adapter_name().contains("llvmpipe");
    let kernel = dev.kernel(COUNT_TO).expect("kernel builds");
    let host = Arc::new(HostSpace::new().expect("host space"));
    let m = Mirror::new(host, dev, MirrorConfig::default()).expect("mirror");
    let mut out = vec![0u32; 1];
    m.launch(&kernel, 1, (out.as_mut_ptr(), 1000u32))
        .expect("a short loop runs anywhere");
    assert_eq!(out[0], 1000);

    out[0] = 0;
    let n = 200_000u32;
    match m.launch(&kernel, 1, (out.as_mut_ptr(), n)) {
        Ok(_) => {
            assert!(!budgeted, "lavapipe cut the loop short without an error");
            assert_eq!(out[0], n);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(budgeted, "unexpected error: {msg}");
            assert!(msg.contains("loop-iteration budget"), "{msg}");
        }
    }
}
