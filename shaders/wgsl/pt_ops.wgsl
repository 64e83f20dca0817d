// pt_ops.wgsl: host-requested page-table operations, run on the device's
// queue so they are atomic with respect to kernels that set accessed and
// dirty bits (hmm.wgsl only ever ORs those bits into an entry's low word).
//
// `pt_and`: for each listed entry (word index of its low word), atomically
// AND the low word with `keep` and write the old (lo, hi) pair to pt_out.
// With keep = 0xffffffff it is a plain gather.

struct PtParams {
    count: u32,
    keep: u32,
    row_threads: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> pt_params: PtParams;
@group(0) @binding(1) var<storage, read_write> pt: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read> pt_list: array<u32>;
@group(0) @binding(3) var<storage, read_write> pt_out: array<u32>;

@compute @workgroup_size(64)
fn pt_and(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x + gid.y * pt_params.row_threads;
    if t >= pt_params.count {
        return;
    }
    let w = pt_list[t];
    var lo: u32;
    if pt_params.keep == 0xffffffffu {
        lo = atomicLoad(&pt[w]);
    } else {
        lo = atomicAnd(&pt[w], pt_params.keep);
    }
    pt_out[2u * t] = lo;
    pt_out[2u * t + 1u] = atomicLoad(&pt[w + 1u]);
}
