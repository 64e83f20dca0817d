// hmm.wgsl: the device side of hmm-rs, included by every kernel.
//
// A kernel is an ordinary WGSL function `fn hmm_kernel(i: u32)` whose
// arguments are CPU pointers and scalars (`hmm_arg_ptr`, `hmm_arg_u32`,
// `hmm_arg_f32`). Every access to CPU memory goes through this library:
// the address is translated by walking the device page table (layout:
// shaders/PAGE_TABLE.md, constants generated from hmm_core::mirror::format
// and prepended by `hmm_shaders::compose`), the accessed/dirty bits are set
// with an atomic OR, and the data lives in the pool buffers.
//
// A translation that fails (no entry, or a read-only entry for a store or
// an atomic) is a *fault*: the invocation records (invocation, flags,
// address) in the fault buffer, marks itself incomplete, and from then on
// every load returns 0 and every store or atomic is dropped. The host
// services the fault and replays the invocation from its start. Loops whose
// trip count depends on loaded data must stop on `hmm_faulted()`.
//
// Pointers are `vec2<u32>` (x = low word, y = high word of the 64-bit CPU
// virtual address), so the library needs no SHADER_INT64. Accesses must be
// naturally aligned (4 bytes for u32/f32, 8 for u64 pointers); the low
// address bits of a misaligned access are ignored, as most GPUs do for
// storage buffers.

struct HmmParams {
    // invocations in this dispatch
    n: u32,
    // nonzero: dispatch thread t runs invocation hmm_replay[t]
    replay: u32,
    // capacity of the fault-record array
    fault_cap: u32,
    // word offset of the incomplete-invocation bitmap in hmm_ctl; the
    // loop-limit counter is the word before it
    bitmap_off: u32,
    // pool slots per pool binding
    chunk_slots: u32,
    // threads per row of the dispatch grid (workgroups in x * 64)
    row_threads: u32,
    // trip count of the loop-budget probe (LOOP_PROBE_ITERS in hmm-shaders)
    loop_probe: u32,
    _pad: u32,
    // kernel arguments: 64-bit words as (lo, hi) pairs, two per vec4
    args: array<vec4<u32>, 8>,
}

@group(0) @binding(0) var<uniform> hmm_params: HmmParams;
@group(0) @binding(1) var<storage, read_write> hmm_pt: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read_write> hmm_ctl: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read> hmm_replay: array<u32>;
@group(0) @binding(4) var<storage, read_write> hmm_pool0: array<atomic<u32>>;
@group(0) @binding(5) var<storage, read_write> hmm_pool1: array<atomic<u32>>;
@group(0) @binding(6) var<storage, read_write> hmm_pool2: array<atomic<u32>>;
@group(0) @binding(7) var<storage, read_write> hmm_pool3: array<atomic<u32>>;

// ---- per-invocation state ----

var<private> hmm_inv: u32;
var<private> hmm_fault: bool;
// One-entry translation cache: the page last translated, its pool slot,
// and whether it was translated for writing (D set, WRITABLE checked).
var<private> hmm_tlb_valid: bool;
var<private> hmm_tlb_page: vec2<u32>;
var<private> hmm_tlb_slot: u32;
var<private> hmm_tlb_dirty: bool;

// ---- pointers ----

// Whether the invocation faulted (its results will be discarded and it
// will be run again). Loops driven by loaded data should test this.
fn hmm_faulted() -> bool {
    return hmm_fault;
}

fn hmm_null() -> vec2<u32> {
    return vec2<u32>(0u, 0u);
}

fn hmm_is_null(p: vec2<u32>) -> bool {
    return p.x == 0u && p.y == 0u;
}

// p + bytes (64-bit add with carry)
fn hmm_add(p: vec2<u32>, bytes: u32) -> vec2<u32> {
    let lo = p.x + bytes;
    let carry = select(0u, 1u, lo < p.x);
    return vec2<u32>(lo, p.y + carry);
}

// The full 64-bit product a * b as (lo, hi).
fn hmm_mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let lo = (p00 & 0xffffu) | (mid << 16u);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

// &p[i] for elements of `stride` bytes, without 32-bit overflow.
fn hmm_index(p: vec2<u32>, i: u32, stride: u32) -> vec2<u32> {
    let off = hmm_mul_wide(i, stride);
    let lo = p.x + off.x;
    let carry = select(0u, 1u, lo < p.x);
    return vec2<u32>(lo, p.y + off.y + carry);
}

// ---- arguments ----

fn hmm_arg_u64(i: u32) -> vec2<u32> {
    let v = hmm_params.args[i / 2u];
    if (i % 2u) == 0u {
        return v.xy;
    }
    return v.zw;
}

fn hmm_arg_ptr(i: u32) -> vec2<u32> {
    return hmm_arg_u64(i);
}

fn hmm_arg_u32(i: u32) -> u32 {
    return hmm_arg_u64(i).x;
}

fn hmm_arg_i32(i: u32) -> i32 {
    return bitcast<i32>(hmm_arg_u64(i).x);
}

fn hmm_arg_f32(i: u32) -> f32 {
    return bitcast<f32>(hmm_arg_u64(i).x);
}

// ---- the page walk ----

// Records a fault for the current invocation (first fault only) and
// switches it to "discard everything".
fn hmm_record_fault(p: vec2<u32>, flags: u32) {
    if hmm_fault {
        return;
    }
    hmm_fault = true;
    // Deduplicate: thousands of invocations usually fault on the same few
    // pages. A page (with its access kind) whose key is already in its
    // hash slot was recorded by another invocation of this dispatch; this
    // one is still marked incomplete and replayed. Two pages sharing a
    // key (2^31 pages apart) only cost an extra round: the first is
    // mapped, the other records next time.
    let raw = ((((p.x >> 12u) | (p.y << 20u)) << 1u) | select(0u, 1u, flags != 0u)) + 1u;
    // 0 marks an empty slot: a key that wrapped to 0 becomes 1 (sharing
    // a key only costs a round, as above).
    let key = select(raw, 1u, raw == 0u);
    let h = (key * 2654435761u) >> (32u - HMM_DEDUP_BITS);
    if atomicExchange(&hmm_ctl[1u + 4u * hmm_params.fault_cap + h], key) == key {
        return;
    }
    let k = atomicAdd(&hmm_ctl[0], 1u);
    if k < hmm_params.fault_cap {
        let base = 1u + 4u * k;
        atomicStore(&hmm_ctl[base], hmm_inv);
        atomicStore(&hmm_ctl[base + 1u], flags);
        atomicStore(&hmm_ctl[base + 2u], p.x);
        atomicStore(&hmm_ctl[base + 3u], p.y);
    }
}

// Next-level index (table page or pool slot) of an entry.
fn hmm_entry_index(lo: u32, hi: u32) -> u32 {
    return (lo >> HMM_INDEX_SHIFT) | (hi << (32u - HMM_INDEX_SHIFT));
}

// Walks the table for the page of `p`; returns the leaf entry's low word
// and its word position in hmm_pt (x = entry lo word, y = word index), or
// x = 0 when some level is not valid.
//
// Unrolled, with no loop: lavapipe gives each invocation a budget of
// 65535 loop iterations in all (see LOOP_PROBE_ITERS in hmm-shaders), and
// a walk written as a loop spent it four iterations per translation — a
// long pointer chase then saw valid entries as "not mapped" and faulted on
// a resident page forever. The library's only loop is the bounded CAS
// loop of hmm_atomic_add_f32.
fn hmm_walk(p: vec2<u32>) -> vec2<u32> {
    // 48-bit addresses: anything above is never mapped.
    if (p.y >> 16u) != 0u {
        return vec2<u32>(0u, 0u);
    }
    var t = hmm_walk_step(0u, (p.y >> 7u) & 511u);
    if t.x == 0u {
        return vec2<u32>(0u, 0u);
    }
    t = hmm_walk_step(t.y, ((p.x >> 30u) | (p.y << 2u)) & 511u);
    if t.x == 0u {
        return vec2<u32>(0u, 0u);
    }
    t = hmm_walk_step(t.y, (p.x >> 21u) & 511u);
    if t.x == 0u {
        return vec2<u32>(0u, 0u);
    }
    let w = (t.y * HMM_ENTRIES + ((p.x >> 12u) & 511u)) * 2u;
    let lo = atomicLoad(&hmm_pt[w]);
    if (lo & HMM_VALID) == 0u {
        return vec2<u32>(0u, 0u);
    }
    return vec2<u32>(lo, w);
}

// One directory level: entry `idx` of table page `table`; returns
// (1, next table page) or (0, 0) when the entry is not valid.
fn hmm_walk_step(table: u32, idx: u32) -> vec2<u32> {
    let w = (table * HMM_ENTRIES + idx) * 2u;
    let lo = atomicLoad(&hmm_pt[w]);
    if (lo & HMM_VALID) == 0u {
        return vec2<u32>(0u, 0u);
    }
    return vec2<u32>(1u, hmm_entry_index(lo, atomicLoad(&hmm_pt[w + 1u])));
}

// Translates `p` for an access; returns (pool slot, word in page) or
// records a fault and returns (0xffffffff, 0).
fn hmm_translate(p: vec2<u32>, flags: u32) -> vec2<u32> {
    let write = (flags & (HMM_FAULT_WRITE | HMM_FAULT_ATOMIC)) != 0u;
    let page = vec2<u32>(p.x & ~4095u, p.y);
    let word = (p.x & 4095u) >> 2u;
    if hmm_tlb_valid && all(page == hmm_tlb_page) && (!write || hmm_tlb_dirty) {
        return vec2<u32>(hmm_tlb_slot, word);
    }
    let leaf = hmm_walk(p);
    let lo = leaf.x;
    if (lo & HMM_VALID) == 0u || (write && (lo & HMM_WRITABLE) == 0u) {
        hmm_record_fault(p, flags);
        return vec2<u32>(0xffffffffu, 0u);
    }
    var bits = HMM_ACCESSED;
    if write {
        bits = bits | HMM_DIRTY;
    }
    if (lo & bits) != bits {
        atomicOr(&hmm_pt[leaf.y], bits);
    }
    let hi = atomicLoad(&hmm_pt[leaf.y + 1u]);
    let slot = hmm_entry_index(lo, hi);
    hmm_tlb_valid = true;
    hmm_tlb_page = page;
    hmm_tlb_slot = slot;
    hmm_tlb_dirty = write;
    return vec2<u32>(slot, word);
}

// ---- the pool ----

fn hmm_pool_ptr_load(slot: u32, word: u32) -> u32 {
    let chunk = slot / hmm_params.chunk_slots;
    let i = (slot % hmm_params.chunk_slots) * 1024u + word;
    switch chunk {
        case 0u: { return atomicLoad(&hmm_pool0[i]); }
        case 1u: { return atomicLoad(&hmm_pool1[i]); }
        case 2u: { return atomicLoad(&hmm_pool2[i]); }
        default: { return atomicLoad(&hmm_pool3[i]); }
    }
}

fn hmm_pool_store(slot: u32, word: u32, v: u32) {
    let chunk = slot / hmm_params.chunk_slots;
    let i = (slot % hmm_params.chunk_slots) * 1024u + word;
    switch chunk {
        case 0u: { atomicStore(&hmm_pool0[i], v); }
        case 1u: { atomicStore(&hmm_pool1[i], v); }
        case 2u: { atomicStore(&hmm_pool2[i], v); }
        default: { atomicStore(&hmm_pool3[i], v); }
    }
}

// Atomic read-modify-write on a pool word; `op`: 0 add, 1 min, 2 max,
// 3 or, 4 and, 5 exchange. Returns the old value.
fn hmm_pool_rmw(slot: u32, word: u32, op: u32, v: u32) -> u32 {
    let chunk = slot / hmm_params.chunk_slots;
    let i = (slot % hmm_params.chunk_slots) * 1024u + word;
    switch chunk {
        case 0u: { return hmm_rmw0(i, op, v); }
        case 1u: { return hmm_rmw1(i, op, v); }
        case 2u: { return hmm_rmw2(i, op, v); }
        default: { return hmm_rmw3(i, op, v); }
    }
}

fn hmm_rmw0(i: u32, op: u32, v: u32) -> u32 {
    switch op {
        case 0u: { return atomicAdd(&hmm_pool0[i], v); }
        case 1u: { return atomicMin(&hmm_pool0[i], v); }
        case 2u: { return atomicMax(&hmm_pool0[i], v); }
        case 3u: { return atomicOr(&hmm_pool0[i], v); }
        case 4u: { return atomicAnd(&hmm_pool0[i], v); }
        default: { return atomicExchange(&hmm_pool0[i], v); }
    }
}

fn hmm_rmw1(i: u32, op: u32, v: u32) -> u32 {
    switch op {
        case 0u: { return atomicAdd(&hmm_pool1[i], v); }
        case 1u: { return atomicMin(&hmm_pool1[i], v); }
        case 2u: { return atomicMax(&hmm_pool1[i], v); }
        case 3u: { return atomicOr(&hmm_pool1[i], v); }
        case 4u: { return atomicAnd(&hmm_pool1[i], v); }
        default: { return atomicExchange(&hmm_pool1[i], v); }
    }
}

fn hmm_rmw2(i: u32, op: u32, v: u32) -> u32 {
    switch op {
        case 0u: { return atomicAdd(&hmm_pool2[i], v); }
        case 1u: { return atomicMin(&hmm_pool2[i], v); }
        case 2u: { return atomicMax(&hmm_pool2[i], v); }
        case 3u: { return atomicOr(&hmm_pool2[i], v); }
        case 4u: { return atomicAnd(&hmm_pool2[i], v); }
        default: { return atomicExchange(&hmm_pool2[i], v); }
    }
}

fn hmm_rmw3(i: u32, op: u32, v: u32) -> u32 {
    switch op {
        case 0u: { return atomicAdd(&hmm_pool3[i], v); }
        case 1u: { return atomicMin(&hmm_pool3[i], v); }
        case 2u: { return atomicMax(&hmm_pool3[i], v); }
        case 3u: { return atomicOr(&hmm_pool3[i], v); }
        case 4u: { return atomicAnd(&hmm_pool3[i], v); }
        default: { return atomicExchange(&hmm_pool3[i], v); }
    }
}

fn hmm_pool_cas(slot: u32, word: u32, expected: u32, v: u32) -> u32 {
    let chunk = slot / hmm_params.chunk_slots;
    let i = (slot % hmm_params.chunk_slots) * 1024u + word;
    switch chunk {
        case 0u: { return atomicCompareExchangeWeak(&hmm_pool0[i], expected, v).old_value; }
        case 1u: { return atomicCompareExchangeWeak(&hmm_pool1[i], expected, v).old_value; }
        case 2u: { return atomicCompareExchangeWeak(&hmm_pool2[i], expected, v).old_value; }
        default: { return atomicCompareExchangeWeak(&hmm_pool3[i], expected, v).old_value; }
    }
}

// ---- loads and stores on CPU pointers ----

fn hmm_load_u32(p: vec2<u32>) -> u32 {
    if hmm_fault {
        return 0u;
    }
    let t = hmm_translate(p, 0u);
    if t.x == 0xffffffffu {
        return 0u;
    }
    return hmm_pool_ptr_load(t.x, t.y);
}

fn hmm_store_u32(p: vec2<u32>, v: u32) {
    if hmm_fault {
        return;
    }
    let t = hmm_translate(p, HMM_FAULT_WRITE);
    if t.x == 0xffffffffu {
        return;
    }
    hmm_pool_store(t.x, t.y, v);
}

fn hmm_load_i32(p: vec2<u32>) -> i32 {
    return bitcast<i32>(hmm_load_u32(p));
}

fn hmm_store_i32(p: vec2<u32>, v: i32) {
    hmm_store_u32(p, bitcast<u32>(v));
}

fn hmm_load_f32(p: vec2<u32>) -> f32 {
    return bitcast<f32>(hmm_load_u32(p));
}

fn hmm_store_f32(p: vec2<u32>, v: f32) {
    hmm_store_u32(p, bitcast<u32>(v));
}

// A 64-bit word (8-byte aligned, so both halves share a page), e.g. a
// pointer stored in CPU memory.
fn hmm_load_u64(p: vec2<u32>) -> vec2<u32> {
    let lo = hmm_load_u32(vec2<u32>(p.x & ~7u, p.y));
    let hi = hmm_load_u32(vec2<u32>((p.x & ~7u) + 4u, p.y));
    return vec2<u32>(lo, hi);
}

fn hmm_load_ptr(p: vec2<u32>) -> vec2<u32> {
    return hmm_load_u64(p);
}

fn hmm_store_u64(p: vec2<u32>, v: vec2<u32>) {
    // Translate the page once for writing before storing either half, so a
    // fault cannot leave half a value behind.
    if hmm_fault {
        return;
    }
    let t = hmm_translate(vec2<u32>(p.x & ~7u, p.y), HMM_FAULT_WRITE);
    if t.x == 0xffffffffu {
        return;
    }
    hmm_pool_store(t.x, t.y, v.x);
    hmm_pool_store(t.x, t.y + 1u, v.y);
}

// ---- atomics on CPU memory (return the old value; 0 after a fault) ----

fn hmm_atomic(p: vec2<u32>, op: u32, v: u32) -> u32 {
    if hmm_fault {
        return 0u;
    }
    let t = hmm_translate(p, HMM_FAULT_WRITE | HMM_FAULT_ATOMIC);
    if t.x == 0xffffffffu {
        return 0u;
    }
    return hmm_pool_rmw(t.x, t.y, op, v);
}

fn hmm_atomic_add_u32(p: vec2<u32>, v: u32) -> u32 {
    return hmm_atomic(p, 0u, v);
}

fn hmm_atomic_min_u32(p: vec2<u32>, v: u32) -> u32 {
    return hmm_atomic(p, 1u, v);
}

fn hmm_atomic_max_u32(p: vec2<u32>, v: u32) -> u32 {
    return hmm_atomic(p, 2u, v);
}

fn hmm_atomic_or_u32(p: vec2<u32>, v: u32) -> u32 {
    return hmm_atomic(p, 3u, v);
}

fn hmm_atomic_and_u32(p: vec2<u32>, v: u32) -> u32 {
    return hmm_atomic(p, 4u, v);
}

fn hmm_atomic_exchange_u32(p: vec2<u32>, v: u32) -> u32 {
    return hmm_atomic(p, 5u, v);
}

// Compare-and-swap; returns the old value (the swap happened iff it equals
// `expected`). Weak: may fail spuriously, so use it in a loop.
fn hmm_atomic_cas_u32(p: vec2<u32>, expected: u32, v: u32) -> u32 {
    if hmm_fault {
        return 0u;
    }
    let t = hmm_translate(p, HMM_FAULT_WRITE | HMM_FAULT_ATOMIC);
    if t.x == 0xffffffffu {
        return 0u;
    }
    return hmm_pool_cas(t.x, t.y, expected, v);
}

// Adds a float atomically (compare-and-swap loop on the bit pattern).
fn hmm_atomic_add_f32(p: vec2<u32>, v: f32) -> f32 {
    var old = hmm_load_u32(p);
    for (var tries = 0u; tries < 1000000u; tries++) {
        if hmm_fault {
            return 0.0;
        }
        let new_bits = bitcast<u32>(bitcast<f32>(old) + v);
        let seen = hmm_atomic_cas_u32(p, old, new_bits);
        if seen == old {
            return bitcast<f32>(old);
        }
        old = seen;
    }
    return bitcast<f32>(old);
}

// ---- the entry point ----

@compute @workgroup_size(64)
fn hmm_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x + gid.y * hmm_params.row_threads;
    if t >= hmm_params.n {
        return;
    }
    var inv = t;
    if hmm_params.replay != 0u {
        inv = hmm_replay[t];
    }
    hmm_inv = inv;
    hmm_fault = false;
    hmm_tlb_valid = false;
    hmm_kernel(inv);
    if hmm_fault {
        atomicOr(&hmm_ctl[hmm_params.bitmap_off + inv / 32u], 1u << (inv % 32u));
        return;
    }
    // The loop-budget probe (see LOOP_PROBE_ITERS in hmm-shaders): on an
    // adapter that cuts an invocation's loops short once it has run its
    // iteration budget, this loop completes fewer than loop_probe trips.
    var trips = 0u;
    loop {
        if trips >= hmm_params.loop_probe {
            break;
        }
        trips += 1u;
    }
    if trips < hmm_params.loop_probe {
        atomicAdd(&hmm_ctl[hmm_params.bitmap_off - 1u], 1u);
    }
}
