//! Kernels the `hmm` facade's tests share.

use hmm::PtrMut;

hmm::kernel! {
    /// `p[i] += 1` over `u32`s at `p`, for every driver.
    pub const ADD_ONE: add_one(p: PtrMut<u32>)
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    let p = hmm_index(args.p, i, 4u);
    hmm_store_u32(p, hmm_load_u32(p) + 1u);
}"#,
        )
        .cpu(|lane, i, (p,)| {
            let v = lane.load_u32(p.at(i))?;
            lane.store_u32(p.at(i), v + 1)
        });
}
