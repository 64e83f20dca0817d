//! The conformance suite's kernels
//! ([`TestKernel`]), in WGSL
//! against the library: one source for every GPU driver.

use hmm_core::mirror::conformance::TestKernel;

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

/// The WGSL source of one of the suite's kernels.
pub fn source(k: TestKernel) -> &'static str {
    match k {
        TestKernel::CopyU32 => COPY_U32,
        TestKernel::FillU32 => FILL_U32,
        TestKernel::IncrementU32 => INCREMENT_U32,
        TestKernel::ListSum => LIST_SUM,
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
        ] {
            crate::build(source(k)).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        }
    }
}
