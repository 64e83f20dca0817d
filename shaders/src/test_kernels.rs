//! The conformance suite's kernels
//! ([`TestKernel`]), in WGSL
//! against the library: one source for every GPU driver.

use hmm_conformance::TestKernel;

/// `out[i] = src[i]` (u32).
pub const COPY_U32: &str = r#"
fn hmm_kernel(i: u32) {
    let v = hmm_load_u32(hmm_index(hmm_arg_ptr(0u), i, 4u));
    hmm_store_u32(hmm_index(hmm_arg_ptr(1u), i, 4u), v);
}
"#;

/// `dst[i] = base + i`.
pub const FILL_U32: &str = r#"
fn hmm_kernel(i: u32) {
    hmm_store_u32(hmm_index(hmm_arg_ptr(0u), i, 4u), hmm_arg_u32(1u) + i);
}
"#;

/// `p[i] += 1`.
pub const INCREMENT_U32: &str = r#"
fn hmm_kernel(i: u32) {
    let p = hmm_index(hmm_arg_ptr(0u), i, 4u);
    let v = hmm_load_u32(p);
    hmm_store_u32(p, v + 1u);
}
"#;

/// Invocation 0 walks `struct Node { next: *Node, value: u64 }` from
/// `args[0]` and stores the wrapping sum of `value` at `args[1]`.
pub const LIST_SUM: &str = r#"
fn hmm_kernel(i: u32) {
    if i != 0u {
        return;
    }
    var node = hmm_arg_ptr(0u);
    var sum = vec2<u32>(0u, 0u);
    loop {
        if hmm_is_null(node) || hmm_faulted() {
            break;
        }
        let v = hmm_load_u64(hmm_add(node, 8u));
        let lo = sum.x + v.x;
        sum = vec2<u32>(lo, sum.y + v.y + select(0u, 1u, lo < sum.x));
        node = hmm_load_ptr(node);
    }
    hmm_store_u64(hmm_arg_ptr(1u), sum);
}
"#;

/// Invocation `i` sums `src[(i / 128) * 8192 + i % 128 + 128 * j]` for
/// `j` in `0..64` and stores the sum at `out[i]` (loads, then the store).
pub const GATHER_SUM: &str = r#"
fn hmm_kernel(i: u32) {
    let src = hmm_arg_ptr(0u);
    let base = (i / 128u) * 8192u + i % 128u;
    var sum = 0u;
    for (var j = 0u; j < 64u; j++) {
        sum += hmm_load_u32(hmm_index(src, base + 128u * j, 4u));
        if hmm_faulted() {
            break;
        }
    }
    hmm_store_u32(hmm_index(hmm_arg_ptr(1u), i, 4u), sum);
}
"#;

/// The WGSL source of one of the suite's kernels.
pub fn source(k: TestKernel) -> &'static str {
    match k {
        TestKernel::CopyU32 => COPY_U32,
        TestKernel::FillU32 => FILL_U32,
        TestKernel::IncrementU32 => INCREMENT_U32,
        TestKernel::ListSum => LIST_SUM,
        TestKernel::GatherSum => GATHER_SUM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_kernel_builds() {
        for k in [
            TestKernel::CopyU32,
            TestKernel::FillU32,
            TestKernel::IncrementU32,
            TestKernel::ListSum,
            TestKernel::GatherSum,
        ] {
            crate::build(source(k)).unwrap_or_else(|e| panic!("{k:?}: {e}"));
            for n in [1, crate::MAX_POOL_BINDINGS] {
                crate::build_with(source(k), n).unwrap_or_else(|e| panic!("{k:?}, {n}: {e}"));
            }
        }
    }
}

/// Reads word 0 of page `(k * 97) % pages` of `args[0]` for `k` in
/// `0..pages * rounds` (`args[2]`, `args[3]`) — each read on another page
/// than the last, so each misses the one-entry translation cache and walks
/// the table — then stores the wrapping sum at `args[1]`.
pub const STRIDED_SUM: &str = r#"
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

/// Counts to `args[1]` in a loop and stores the count at `args[0]`.
pub const COUNT_TO: &str = r#"
fn hmm_kernel(i: u32) {
    let n = hmm_arg_u32(1u);
    var c = 0u;
    for (var k = 0u; k < n; k++) {
        c += 1u;
    }
    hmm_store_u32(hmm_arg_ptr(0u), c);
}
"#;

/// Checks for long-running invocations, shared by the GPU drivers' tests
/// (`build` turns WGSL into the driver's kernel; `budgeted`: the adapter
/// is llvmpipe, which cuts loops short after 65535 iterations).
pub mod long_invocation {
    use std::sync::Arc;

    use hmm_core::cpu::host::HostSpace;
    use hmm_core::mirror::backend::{Backend, BackendError};
    use hmm_core::mirror::{Mirror, MirrorConfig};
    use hmm_core::VaRange;

    /// One invocation doing 51 200 page walks, then a store, completes in
    /// one round with the right sum.
    ///
    /// Regression test: the walk used to be a WGSL `loop`, which spent
    /// lavapipe's loop budget four iterations per translation; a long
    /// pointer chase then saw valid entries as "not mapped" and faulted on
    /// a resident page until `max_replays`.
    pub fn keeps_translating<B: Backend>(
        dev: B,
        build: impl Fn(&B, &str) -> Result<B::Kernel, BackendError>,
    ) where
        B::Kernel: Sized,
    {
        let kernel = build(&dev, super::STRIDED_SUM).expect("kernel builds");
        let host = Arc::new(HostSpace::new().expect("host space"));
        let cfg = MirrorConfig {
            max_replays: 4096,
            ..MirrorConfig::default()
        };
        let m = Mirror::new(host, dev, cfg).expect("mirror");
        let (pages, rounds) = (256u32, 200u32);
        // Whole pages of their own: a heap page the data shared with other
        // allocations would be written by other threads now and then — a
        // true CPU write the sync point must report, which costs a refault.
        #[repr(C, align(4096))]
        struct Page([u32; 1024]);
        let data: Vec<Page> = (0..pages)
            .map(|p| {
                Page(core::array::from_fn(|w| {
                    (p * 1024 + w as u32).wrapping_mul(2_654_435_761)
                }))
            })
            .collect();
        // Fault the data in first, so the long invocation runs in one
        // round: the bug needed no fault to show.
        m.prefetch(VaRange::of_slice(&data).expect("range"), false)
            .expect("prefetch");
        let want = (0..pages * rounds)
            .map(|k| data[((k * 97) % pages) as usize].0[0])
            .fold(0u32, u32::wrapping_add);
        let mut out = vec![0u32; 1];
        let r = m
            .launch(
                &kernel,
                1,
                (data.as_ptr().cast::<u32>(), out.as_mut_ptr(), pages, rounds),
            )
            .expect("the launch completes");
        assert_eq!(out[0], want, "device sum");
        // The output page is the only one left to fault in — unless a
        // destructive event dropped prefetched pages: the kernel merges
        // neighbouring anonymous mappings, so a region of `data` can span
        // pages of another mapping, which the adapter's own JIT (lavapipe)
        // may unmap while the test runs (seen under load, 3 in 60 runs).
        let st = m.stats();
        let destructive: u64 = st.invalidations[..3].iter().sum();
        if destructive == 0 {
            assert!(
                r.submissions <= 2,
                "{} submissions; {r:?}; {st}",
                r.submissions
            );
        } else {
            eprintln!(
                "note: {destructive} unmap/remove/remap event(s) from a merged neighbour cost {} extra submission(s)",
                r.submissions.saturating_sub(2)
            );
        }
    }

    /// An adapter that cuts loops short gives a typed error, never a
    /// wrong count; any other gives the count.
    pub fn loops_cut_short_are_an_error<B: Backend>(
        dev: B,
        budgeted: bool,
        build: impl Fn(&B, &str) -> Result<B::Kernel, BackendError>,
    ) where
        B::Kernel: Sized,
    {
        let kernel = build(&dev, super::COUNT_TO).expect("kernel builds");
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
                assert!(!budgeted, "the loop was cut short without an error");
                assert_eq!(out[0], n);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(budgeted, "unexpected error: {msg}");
                assert!(msg.contains("loop-iteration budget"), "{msg}");
            }
        }
    }
}
