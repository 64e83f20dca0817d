//! The kernel `fault_service` and `thp_cost` share.

use hmm::{Ptr, PtrMut};

hmm::kernel! {
    /// One invocation per page: reads word 7 of page `i` of `src`, writes it
    /// to `out[i]`.
    pub const TOUCH: touch(src: Ptr<u8>, out: PtrMut<u32>)
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    let v = hmm_load_u32(hmm_add(hmm_index(args.src, i, 4096u), 28u));
    hmm_store_u32(hmm_index(args.out, i, 4u), v);
}
"#,
        )
        .cpu(|lane, i, (src, out)| {
            let v = lane.load_u32(src.byte_add(u64::from(i) * 4096 + 28))?;
            lane.store_u32(out.at(i), v)
        });
}
