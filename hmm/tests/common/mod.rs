//! Kernels the `hmm` facade's tests share.

use hmm::KernelSource;

/// `p[i] += 1` over `u32`s at `args[0]`, for every driver.
pub const ADD_ONE: KernelSource = KernelSource {
    name: "add_one",
    wgsl: r#"
fn hmm_kernel(i: u32) {
    let p = hmm_index(hmm_arg_ptr(0u), i, 4u);
    hmm_store_u32(p, hmm_load_u32(p) + 1u);
}"#,
    cpu: |lane, i| {
        let p = lane.args()[0] + u64::from(i) * 4;
        let v = lane.load_u32(p)?;
        lane.store_u32(p, v + 1)
    },
};
