//! The shader library every GPU kernel of hmm-rs includes, and the host-side
//! layout that goes with it. Both GPU drivers (`drivers/wgpu`, and
//! `drivers/vulkan` through naga's SPIR-V output) build their pipelines
//! from this one source, so there is no second copy to keep in step.
//!
//! # Writing a kernel
//!
//! A kernel is WGSL defining `fn hmm_kernel(i: u32)`; [`compose`] puts it
//! after the library. Arguments are the 64-bit words of the launch —
//! CPU pointers and scalars — read with `hmm_arg_ptr(k)`, `hmm_arg_u32(k)`,
//! `hmm_arg_f32(k)`. Pointers are `vec2<u32>` (low, high word); CPU memory
//! is accessed only through the library:
//!
//! ```wgsl
//! fn hmm_kernel(i: u32) {
//!     let x = hmm_arg_ptr(0u);
//!     let y = hmm_arg_ptr(1u);
//!     let a = hmm_arg_f32(2u);
//!     let xi = hmm_load_f32(hmm_index(x, i, 4u));
//!     let yp = hmm_index(y, i, 4u);
//!     hmm_store_f32(yp, a * xi + hmm_load_f32(yp));
//! }
//! ```
//!
//! | function | does |
//! |---|---|
//! | `hmm_load_u32/i32/f32(p)`, `hmm_store_…(p, v)` | 4-byte access |
//! | `hmm_load_u64(p)`, `hmm_load_ptr(p)`, `hmm_store_u64(p, v)` | 8-byte access (e.g. a `next` pointer) |
//! | `hmm_atomic_{add,min,max,or,and,exchange}_u32(p, v)`, `hmm_atomic_cas_u32(p, e, v)`, `hmm_atomic_add_f32(p, v)` | atomics on CPU memory |
//! | `hmm_add(p, bytes)`, `hmm_index(p, i, stride)`, `hmm_is_null(p)` | pointer arithmetic without 32-bit overflow |
//! | `hmm_faulted()` | the invocation faulted: stop loops driven by loaded data |
//!
//! # Faults and replay
//!
//! Each access walks the device page table (`shaders/PAGE_TABLE.md`; the
//! constants are generated here from `hmm_core::mirror::format`, so the
//! two cannot disagree), sets `ACCESSED`/`DIRTY` with an atomic OR, and
//! reads or writes the pool. A missing or read-only entry makes the
//! invocation record `(invocation, flags, address)` in the control buffer,
//! set its bit in the incomplete bitmap, and carry on with loads returning
//! 0 and stores dropped; the host maps the page and replays exactly the
//! invocations whose bits are set ("The replay contract" in
//! `hmm_core::mirror`: only the last, fault-free run may have effects that
//! must not repeat).
//!
//! # Control buffer
//!
//! `u32` words: `[0]` fault count (may exceed the capacity), then
//! `fault_cap` records of 4 words in [`RawFaultRecord`] order, then a
//! `2^DEDUP_BITS`-slot hash table that keeps a page from being recorded
//! more than once per dispatch, then one word counting invocations that
//! completed with their loops cut short by the adapter (see below), then
//! the incomplete bitmap (bit `i` = invocation `i`). [`ControlLayout`] gives
//! the offsets and [`ControlLayout::parse`] turns the words into a
//! [`LaunchOutcome`].
//!
//! # Pool bindings
//!
//! The pool bindings (`hmm_pool0 ..`, from [`binding::POOL0`]) and the
//! functions that dispatch on them are generated from one template for a
//! count per driver: [`compose`] and [`build`] use [`POOL_BINDINGS`] (the
//! wgpu driver's layout), [`compose_with`] and [`build_with`] any count
//! in `1..=`[`MAX_POOL_BINDINGS`] (the Vulkan driver's zero-copy mode,
//! where each binding is a window onto host memory). Slot `s` lives in
//! binding `s / chunk_slots` at page `s % chunk_slots` ([`Params`]).
//!
//! # Loop budget
//!
//! Mesa's llvmpipe (lavapipe) silently ends every loop of an invocation
//! that has run 65535 loop iterations in all. The library keeps loops off
//! its hot paths (the page walk is unrolled) and checks for the budget
//! after every kernel ([`LOOP_PROBE_ITERS`]); a driver that finds
//! [`ControlLayout::loop_limit_hits`] nonzero fails the launch with
//! [`loop_limit_message`]. A kernel that needs more iterations should
//! spread its work over more invocations.

use core::fmt::Write as _;

pub mod test_kernels;

use hmm_core::mirror::backend::{
    BackendError, DeviceConfig, InvocationSet, Invocations, LaunchOutcome, PteLoc, RawFaultRecord,
    FAULT_ATOMIC, FAULT_MISALIGNED, FAULT_WRITE,
};
use hmm_core::mirror::format;

/// The library (`wgsl/hmm.wgsl`), without the generated constants.
pub const LIBRARY: &str = include_str!("../wgsl/hmm.wgsl");

/// The page-table operations shader (`wgsl/pt_ops.wgsl`).
pub const PT_OPS: &str = include_str!("../wgsl/pt_ops.wgsl");

/// Entry point of every composed kernel.
pub const KERNEL_ENTRY: &str = "hmm_main";

/// Entry point of the page-table AND/gather operation in [`PT_OPS`].
pub const PT_AND_ENTRY: &str = "pt_and";

/// log2 of the fault-dedup hash table's slots in the control buffer.
pub const DEDUP_BITS: u32 = 10;

/// Trip count of the loop every invocation runs after its kernel, to find
/// out whether the adapter cut its loops short.
///
/// Mesa's llvmpipe (lavapipe) ends every loop of an invocation once the
/// invocation has run 65535 loop iterations in all (gallivm's
/// `LP_MAX_TGSI_LOOP_ITERATIONS`, shared between all loops of a shader);
/// after that each loop runs its body at most once. Nothing in SPIR-V says
/// so, and the kernel's results are then silently wrong. The probe is a
/// loop of this many iterations, bounded by a uniform so it cannot be
/// unrolled: if it completes fewer, the budget was spent and the
/// invocation bumps the control buffer's loop-limit counter, which a
/// driver turns into an error. Other adapters have no such budget and the
/// probe costs two iterations.
pub const LOOP_PROBE_ITERS: u32 = 2;

/// What a driver says when [`ControlLayout::loop_limit_hits`] is nonzero:
/// `hits` invocations of a launch on `adapter` had their loops cut short.
pub fn loop_limit_message(hits: u32, adapter: &str) -> String {
    format!(
        "{hits} invocation(s) ran out of {adapter}'s loop-iteration budget, so their loops may \
         have stopped early and their results are discarded (lavapipe allows 65535 loop \
         iterations per invocation, all loops together): split the work over more invocations"
    )
}

/// Threads per workgroup of every shader here.
pub const WORKGROUP: u32 = 64;

/// [`Params::replay`]: a first launch, thread `t` runs invocation `t`.
pub const REPLAY_NONE: u32 = 0;
/// [`Params::replay`]: the replay buffer lists the invocations, ascending.
pub const REPLAY_LIST: u32 = 1;
/// [`Params::replay`]: the replay buffer is a bitmap of the invocations
/// (chosen when it is smaller than the list, so a replay's buffer is never
/// more than `n / 8` bytes, however many invocations it replays).
pub const REPLAY_BITMAP: u32 = 2;

/// The most invocations one launch may have on any driver
/// ([`hmm_core::mirror::backend::MAX_INVOCATIONS`], `2^31`): the WGSL
/// numbers a thread `x + y * row_threads` in a `u32`, exact up to
/// `65535 * 64 * 513 > 2^31` threads but not to `u32::MAX`.
pub const MAX_INVOCATIONS: u32 = hmm_core::mirror::backend::MAX_INVOCATIONS;

/// The most invocations a GPU driver can run in one launch when its
/// control buffer (fault records for `fault_cap` faults, then the
/// incomplete bitmap) must fit one storage binding of `binding_bytes`
/// bytes: at most [`MAX_INVOCATIONS`].
pub fn max_invocations(fault_cap: u32, binding_bytes: u64) -> u32 {
    let layout = ControlLayout {
        fault_cap,
        bitmap_bits: 0,
    };
    let words = (binding_bytes / 4).saturating_sub(u64::from(layout.bitmap_off()));
    (words.saturating_mul(32)).min(u64::from(MAX_INVOCATIONS)) as u32
}

/// Kernel arguments a launch can pass (64-bit words).
pub const MAX_ARGS: usize = 16;

/// Pool bindings of [`compose`] and [`build`] (the wgpu driver's layout,
/// and the Vulkan driver's in copy mode); a pool larger than one binding
/// allows is split across them. [`compose_with`] takes another count.
pub const POOL_BINDINGS: u32 = 4;

/// Most pool bindings [`compose_with`] generates: 32 storage buffers per
/// shader stage (lavapipe's `maxPerStageDescriptorStorageBuffers`, a
/// common GPU minimum too) minus the page table, control buffer and replay
/// list.
pub const MAX_POOL_BINDINGS: u32 = 29;

/// Checks a pool-binding count for [`compose_with`]: `1..=`
/// [`MAX_POOL_BINDINGS`], else [`ShaderError::PoolBindings`].
pub fn check_pool_bindings(pool_bindings: u32) -> Result<u32, ShaderError> {
    if (1..=MAX_POOL_BINDINGS).contains(&pool_bindings) {
        Ok(pool_bindings)
    } else {
        Err(ShaderError::PoolBindings(pool_bindings))
    }
}

/// Binding numbers (group 0) of a kernel.
pub mod binding {
    /// `uniform` [`super::Params`].
    pub const PARAMS: u32 = 0;
    /// The page table, `array<atomic<u32>>`.
    pub const PAGE_TABLE: u32 = 1;
    /// The control buffer (fault records and incomplete bitmap).
    pub const CONTROL: u32 = 2;
    /// The replay list or bitmap (`array<u32>`, read only; see
    /// [`super::Params::replay`]).
    pub const REPLAY: u32 = 3;
    /// The first pool binding; pools are `POOL0 .. POOL0 + n` for the
    /// `n` pool bindings the kernel was composed with
    /// ([`super::POOL_BINDINGS`] by default, [`super::compose_with`]).
    pub const POOL0: u32 = 4;
}

/// Binding numbers (group 0) of [`PT_OPS`].
pub mod pt_binding {
    /// `uniform` [`super::PtParams`].
    pub const PARAMS: u32 = 0;
    /// The page table.
    pub const PAGE_TABLE: u32 = 1;
    /// Word indices of the entries' low words.
    pub const LIST: u32 = 2;
    /// `(lo, hi)` of each entry before the operation.
    pub const OUT: u32 = 3;
}

/// The kernel uniform block (`HmmParams` in the WGSL), 160 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct Params {
    /// Invocations in this dispatch.
    pub n: u32,
    /// How the dispatch picks its invocations: [`REPLAY_NONE`] (thread
    /// `t` runs invocation `t`), [`REPLAY_LIST`] (thread `t` runs
    /// invocation `replay[t]`) or [`REPLAY_BITMAP`] (thread `t` runs
    /// invocation `t` if bit `t` of the replay buffer is set).
    pub replay: u32,
    /// Fault records the control buffer holds.
    pub fault_cap: u32,
    /// Word offset of the incomplete bitmap in the control buffer.
    pub bitmap_off: u32,
    /// Pool slots per pool binding.
    pub chunk_slots: u32,
    /// Threads per row of the dispatch grid.
    pub row_threads: u32,
    /// Trip count of the loop-budget probe every invocation runs last
    /// ([`LOOP_PROBE_ITERS`]; a uniform, so no compiler can unroll it).
    pub loop_probe: u32,
    /// Padding.
    pub pad: u32,
    /// The arguments' 64-bit words as (lo, hi) pairs.
    pub args: [u32; 2 * MAX_ARGS],
}

/// The page-table operation's uniform block (`PtParams`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct PtParams {
    /// Entries listed.
    pub count: u32,
    /// Mask ANDed into each low word; `u32::MAX` reads without writing.
    pub keep: u32,
    /// Threads per row of the dispatch grid.
    pub row_threads: u32,
    /// Padding.
    pub pad: u32,
}

/// Errors building a kernel from WGSL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShaderError {
    /// The kernel passes more arguments than the library carries.
    #[error("{0} kernel arguments; at most {MAX_ARGS} fit")]
    TooManyArgs(usize),
    /// WGSL that does not parse (the message points into the kernel).
    #[error("kernel does not parse:\n{0}")]
    Parse(String),
    /// WGSL that parses but does not validate.
    #[error("kernel does not validate:\n{0}")]
    Validate(String),
    /// The source lacks `fn hmm_kernel(i: u32)`.
    #[error("kernel source must define `fn hmm_kernel(i: u32)`")]
    NoKernelFn,
    /// A pool-binding count outside `1..=MAX_POOL_BINDINGS`.
    #[error("{0} pool bindings; the library generates 1 to {MAX_POOL_BINDINGS}")]
    PoolBindings(u32),
}

/// The constants the library uses, generated from `hmm_core::mirror::format`
/// and the fault flags.
pub fn prelude() -> String {
    let mut s =
        String::from("// generated by hmm_shaders::prelude from hmm_core::mirror::format\n");
    let consts: [(&str, u64); 11] = [
        ("HMM_DEDUP_BITS", u64::from(DEDUP_BITS)),
        ("HMM_VALID", format::VALID),
        ("HMM_WRITABLE", format::WRITABLE),
        ("HMM_ACCESSED", format::ACCESSED),
        ("HMM_DIRTY", format::DIRTY),
        ("HMM_INDEX_SHIFT", u64::from(format::INDEX_SHIFT)),
        ("HMM_ENTRIES", format::ENTRIES as u64),
        ("HMM_PAGE_BYTES", format::TABLE_PAGE_BYTES),
        ("HMM_FAULT_WRITE", u64::from(FAULT_WRITE)),
        ("HMM_FAULT_ATOMIC", u64::from(FAULT_ATOMIC)),
        ("HMM_FAULT_MISALIGNED", u64::from(FAULT_MISALIGNED)),
    ];
    for (name, v) in consts {
        let _ = writeln!(s, "const {name}: u32 = {v}u;");
    }
    s
}

/// The pool part of the library for `n` pool bindings (`1..=`
/// [`MAX_POOL_BINDINGS`], checked by the callers): the bindings
/// `hmm_pool0 .. hmm_pool{n-1}` at `binding::POOL0 ..`, and
/// `hmm_pool_ptr_load`, `hmm_pool_store`, `hmm_pool_rmw` (with one
/// `hmm_rmw{k}` per binding) and `hmm_pool_cas`, each a `switch` with one
/// arm per binding, all from the templates below. Loop-free, like the rest
/// of the library's hot paths (see [`LOOP_PROBE_ITERS`]).
///
/// `slot / chunk_slots` picks the binding and `slot % chunk_slots` the
/// page in it; a chunk past the last binding takes the `default` arm (the
/// last binding), where bounds checks clamp it.
fn pool_wgsl(n: u32) -> String {
    let mut s = format!(
        "\n// ---- the pool: {n} binding(s), generated by hmm_shaders::compose_with ----\n\n"
    );
    for k in 0..n {
        let _ = writeln!(
            s,
            "@group(0) @binding({}) var<storage, read_write> hmm_pool{k}: array<atomic<u32>>;",
            binding::POOL0 + k
        );
    }
    // One `switch chunk` over the bindings; `arm(k)` is binding k's body.
    let switch = |s: &mut String, arm: &dyn Fn(u32) -> String| {
        s.push_str("    switch chunk {\n");
        for k in 0..n {
            let label = if k + 1 == n {
                "default".to_string()
            } else {
                format!("case {k}u")
            };
            let _ = writeln!(s, "        {label}: {{ {} }}", arm(k));
        }
        s.push_str("    }\n}\n\n");
    };
    let head = "    let chunk = slot / hmm_params.chunk_slots;\n    \
                let i = (slot % hmm_params.chunk_slots) * 1024u + word;\n";
    s.push_str("\nfn hmm_pool_ptr_load(slot: u32, word: u32) -> u32 {\n");
    s.push_str(head);
    switch(&mut s, &|k| format!("return atomicLoad(&hmm_pool{k}[i]);"));
    s.push_str("fn hmm_pool_store(slot: u32, word: u32, v: u32) {\n");
    s.push_str(head);
    switch(&mut s, &|k| format!("atomicStore(&hmm_pool{k}[i], v);"));
    s.push_str(
        "// Atomic read-modify-write on a pool word; `op`: 0 add, 1 min, 2 max,\n\
         // 3 or, 4 and, 5 exchange. Returns the old value.\n\
         fn hmm_pool_rmw(slot: u32, word: u32, op: u32, v: u32) -> u32 {\n",
    );
    s.push_str(head);
    switch(&mut s, &|k| format!("return hmm_rmw{k}(i, op, v);"));
    for k in 0..n {
        let _ = write!(
            s,
            "fn hmm_rmw{k}(i: u32, op: u32, v: u32) -> u32 {{\n    \
             switch op {{\n        \
             case 0u: {{ return atomicAdd(&hmm_pool{k}[i], v); }}\n        \
             case 1u: {{ return atomicMin(&hmm_pool{k}[i], v); }}\n        \
             case 2u: {{ return atomicMax(&hmm_pool{k}[i], v); }}\n        \
             case 3u: {{ return atomicOr(&hmm_pool{k}[i], v); }}\n        \
             case 4u: {{ return atomicAnd(&hmm_pool{k}[i], v); }}\n        \
             default: {{ return atomicExchange(&hmm_pool{k}[i], v); }}\n    \
             }}\n}}\n\n"
        );
    }
    s.push_str("fn hmm_pool_cas(slot: u32, word: u32, expected: u32, v: u32) -> u32 {\n");
    s.push_str(head);
    switch(&mut s, &|k| {
        format!("return atomicCompareExchangeWeak(&hmm_pool{k}[i], expected, v).old_value;")
    });
    s
}

/// The full shader for a kernel with [`POOL_BINDINGS`] pool bindings (the
/// wgpu driver's layout): [`compose_with`] that count.
pub fn compose(kernel: &str) -> String {
    compose_unchecked(kernel, POOL_BINDINGS)
}

/// The full shader for a kernel: generated constants, the library, its
/// pool part for `pool_bindings` bindings (`1..=`[`MAX_POOL_BINDINGS`],
/// else [`ShaderError::PoolBindings`]), then `kernel` (which must define
/// `fn hmm_kernel(i: u32)`).
pub fn compose_with(kernel: &str, pool_bindings: u32) -> Result<String, ShaderError> {
    Ok(compose_unchecked(
        kernel,
        check_pool_bindings(pool_bindings)?,
    ))
}

/// Everything [`compose`] puts before the kernel.
fn compose_prefix(pool_bindings: u32) -> String {
    let mut s = prelude();
    s.push_str(LIBRARY);
    s.push_str(&pool_wgsl(pool_bindings));
    s.push_str("\n// ---- kernel ----\n");
    s
}

fn compose_unchecked(kernel: &str, pool_bindings: u32) -> String {
    let mut s = compose_prefix(pool_bindings);
    s.push_str(kernel);
    if !kernel.contains(ARGS_INIT) {
        // After the kernel, so its lines keep their numbers.
        let _ = write!(s, "\n{ARGS_INIT}() {{}}\n");
    }
    s
}

/// The function the entry point calls before each invocation's
/// `hmm_kernel`: a typed kernel's generated prelude defines it to fill its
/// named parameters (`args.x`); [`compose`] adds an empty one to a kernel
/// without it.
pub const ARGS_INIT: &str = "fn hmm_init_args";

/// A WGSL error, located in the kernel's own source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgslError {
    /// 1-based line in the kernel as its author wrote it (`None`: no
    /// location, or one inside the library).
    pub line: Option<u32>,
    /// 1-based column (bytes) on that line.
    pub column: Option<u32>,
    /// naga's report, its positions relabelled to the kernel's lines.
    pub report: String,
    /// Whether it failed to parse (else it failed validation).
    pub parse: bool,
}

impl core::fmt::Display for WgslError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let what = if self.parse {
            "does not parse"
        } else {
            "does not validate"
        };
        match (self.line, self.column) {
            (Some(l), Some(c)) => {
                write!(f, "kernel {what} at line {l}, column {c}:\n{}", self.report)
            }
            _ => write!(f, "kernel {what}:\n{}", self.report),
        }
    }
}

impl std::error::Error for WgslError {}

/// Parses and validates `kernel` as [`build`] does, on any machine (no
/// device needed): what `hmm` runs at `kernel()` time on every driver. The
/// error names the line and column in `kernel` itself.
pub fn check(kernel: &str) -> Result<(), WgslError> {
    if !kernel.contains("fn hmm_kernel") {
        return Err(WgslError {
            line: None,
            column: None,
            report: ShaderError::NoKernelFn.to_string(),
            parse: false,
        });
    }
    let src = compose_unchecked(kernel, POOL_BINDINGS);
    let off = line_offset(POOL_BINDINGS) as u32;
    let locate = |loc: Option<naga::SourceLocation>| match loc {
        Some(l) if l.line_number > off => (Some(l.line_number - off), Some(l.line_position)),
        _ => (None, None),
    };
    let module = match naga::front::wgsl::parse_str(&src) {
        Ok(m) => m,
        Err(e) => {
            let (line, column) = locate(e.location(&src));
            return Err(WgslError {
                line,
                column,
                report: relabel(&e.emit_to_string(&src), off as usize),
                parse: true,
            });
        }
    };
    if let Err(e) = validate_module(&module) {
        // The narrowest span in the kernel: the expression at fault rather
        // than the whole function around it.
        let narrowest = e
            .spans()
            .map(|(span, _)| span.location(&src))
            .filter(|l| l.line_number > off)
            .min_by_key(|l| l.length);
        let (line, column) = locate(narrowest.or_else(|| e.location(&src)));
        return Err(WgslError {
            line,
            column,
            report: relabel(&e.emit_to_string(&src), off as usize),
            parse: false,
        });
    }
    Ok(())
}

/// Lines [`compose`] puts before the kernel's first line.
pub fn kernel_line_offset() -> usize {
    line_offset(POOL_BINDINGS)
}

fn line_offset(pool_bindings: u32) -> usize {
    compose_prefix(pool_bindings).lines().count()
}

/// Parses and validates a composed kernel with naga ([`POOL_BINDINGS`]
/// pool bindings), returning the module and its validation info. Error
/// messages name lines of the kernel as the user wrote it.
pub fn build(kernel: &str) -> Result<(naga::Module, naga::valid::ModuleInfo), ShaderError> {
    build_with(kernel, POOL_BINDINGS)
}

/// [`build`] for a kernel composed with `pool_bindings` pool bindings
/// ([`compose_with`]): what the Vulkan driver feeds to the SPIR-V writer.
pub fn build_with(
    kernel: &str,
    pool_bindings: u32,
) -> Result<(naga::Module, naga::valid::ModuleInfo), ShaderError> {
    if !kernel.contains("fn hmm_kernel") {
        return Err(ShaderError::NoKernelFn);
    }
    let src = compose_with(kernel, pool_bindings)?;
    let off = line_offset(pool_bindings);
    let module = naga::front::wgsl::parse_str(&src)
        .map_err(|e| ShaderError::Parse(relabel(&e.emit_to_string(&src), off)))?;
    let info = validate_module(&module)
        .map_err(|e| ShaderError::Validate(relabel(&e.emit_to_string(&src), off)))?;
    Ok((module, info))
}

/// Validates a parsed module with every capability the library uses.
pub fn validate_module(
    module: &naga::Module,
) -> Result<naga::valid::ModuleInfo, Box<naga::WithSpan<naga::valid::ValidationError>>> {
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(module)
    .map_err(Box::new)
}

/// Rewrites `wgsl:LINE:COL` positions in a naga message so that lines in
/// the kernel part (after `off` lines) are numbered from the kernel's own
/// first line.
fn relabel(msg: &str, off: usize) -> String {
    let mut out = String::with_capacity(msg.len());
    for line in msg.lines() {
        let mut l = line.to_string();
        if let Some(pos) = l.find("wgsl:") {
            let rest = &line[pos + 5..];
            let num: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = num.parse::<usize>() {
                let label = if n > off {
                    format!("kernel:{}", n - off)
                } else {
                    format!("hmm.wgsl(library):{n}")
                };
                l = format!("{}{}{}", &line[..pos], label, &rest[num.len()..]);
            }
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Dispatch grid for `threads` threads of [`WORKGROUP`]: `(x, y,
/// row_threads)` with `x` within the 65535-workgroup limit per dimension.
pub fn grid(threads: u32) -> (u32, u32, u32) {
    let groups = threads.div_ceil(WORKGROUP).max(1);
    let x = groups.min(65_535);
    let y = groups.div_ceil(x);
    (x, y, x * WORKGROUP)
}

/// Everything a GPU driver needs to dispatch one launch: the uniform
/// block, the control-buffer layout, the replay list and the grid. Both
/// GPU drivers build it here, so a field of [`Params`] cannot be set by
/// one and forgotten by the other.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// The uniform block (`HmmParams`).
    pub params: Params,
    /// The control buffer this launch needs.
    pub layout: ControlLayout,
    /// The replay buffer's words (empty for a first launch): the ids to
    /// replay, ascending, or their bitmap ([`Params::replay`] says which).
    pub replay: Vec<u32>,
    /// Workgroups in x.
    pub groups_x: u32,
    /// Workgroups in y.
    pub groups_y: u32,
}

impl Dispatch {
    /// Plans a launch of `invocations` with `args` on a device holding
    /// `chunk_slots` pool slots per binding and `fault_cap` fault records;
    /// more than [`MAX_ARGS`] arguments is a [`BackendError::Kernel`].
    pub fn plan(
        invocations: Invocations<'_>,
        args: &[u64],
        fault_cap: u32,
        chunk_slots: u32,
    ) -> Result<Self, BackendError> {
        if args.len() > MAX_ARGS {
            return Err(BackendError::Kernel(
                ShaderError::TooManyArgs(args.len()).to_string(),
            ));
        }
        let (threads, bitmap_bits, mode, replay): (u32, u32, u32, Vec<u32>) = match invocations {
            Invocations::All(n) => (n, n, REPLAY_NONE, Vec::new()),
            Invocations::Only(v) => {
                let count = v.len();
                let top = v.iter().last().map_or(0, |m| m.saturating_add(1));
                // The smaller of a list (a word per id) and a bitmap (a
                // word per 32 ids below the highest): a dense replay of a
                // huge launch costs n / 8 bytes, not 4 per invocation.
                let bitmap_words = top.div_ceil(32) as usize;
                if count <= bitmap_words {
                    (count as u32, top, REPLAY_LIST, v.iter().collect())
                } else {
                    let mut words = vec![0u32; bitmap_words];
                    for id in v.iter() {
                        words[(id / 32) as usize] |= 1 << (id % 32);
                    }
                    (top, top, REPLAY_BITMAP, words)
                }
            }
        };
        let layout = ControlLayout {
            fault_cap,
            bitmap_bits: bitmap_bits.max(1),
        };
        let (groups_x, groups_y, row_threads) = grid(threads);
        let mut params = Params {
            n: threads,
            replay: mode,
            fault_cap,
            bitmap_off: layout.bitmap_off(),
            chunk_slots,
            row_threads,
            loop_probe: LOOP_PROBE_ITERS,
            ..Params::default()
        };
        for (i, a) in args.iter().enumerate() {
            params.args[2 * i] = *a as u32;
            params.args[2 * i + 1] = (*a >> 32) as u32;
        }
        Ok(Dispatch {
            params,
            layout,
            replay,
            groups_x,
            groups_y,
        })
    }

    /// Whether per-launch resources made for `bitmap_bits` invocations
    /// and `replay_cap` replay words serve this launch (drivers keep a free
    /// list of them).
    pub fn fits(&self, bitmap_bits: u32, replay_cap: u32) -> bool {
        bitmap_bits >= self.layout.bitmap_bits && replay_cap >= self.replay.len() as u32
    }

    /// `(bitmap_bits, replay_cap)` to make new per-launch resources with:
    /// powers of two, at least 1024, so they serve later launches too —
    /// or exactly what this launch needs where the next power of two does
    /// not fit a `u32` (above 2^31 invocations: rounding up must not wrap
    /// to 0 and size the buffers for 1024).
    pub fn capacity(&self) -> (u32, u32) {
        let round = |n: u32| n.checked_next_power_of_two().unwrap_or(n).max(1024);
        (
            round(self.layout.bitmap_bits),
            round(self.replay.len() as u32),
        )
    }
}

/// How a GPU driver lays out a mirror's memory in storage bindings: the
/// page table in one, the pool over [`POOL_BINDINGS`] of at most
/// `slots_per_binding` slots each. Shared by both GPU drivers' `init`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Bytes of the page-table buffer.
    pub table_bytes: u64,
    /// Pool slots per binding (a slot `s` lives in binding
    /// `s / chunk_slots`).
    pub chunk_slots: u32,
    /// Slots of each of the [`POOL_BINDINGS`] pool buffers (an unused
    /// binding gets a one-page placeholder).
    pub binding_slots: [u32; POOL_BINDINGS as usize],
}

impl MemoryPlan {
    /// Plans `config` on a device whose storage bindings hold
    /// `slots_per_binding` pool pages and `max_binding_bytes` bytes; a
    /// pool or table that does not fit is [`BackendError::OutOfMemory`].
    pub fn new(
        config: DeviceConfig,
        slots_per_binding: u32,
        max_binding_bytes: u64,
    ) -> Result<Self, BackendError> {
        let per = slots_per_binding;
        if per == 0 {
            return Err(BackendError::OutOfMemory(
                "storage bindings below one page".into(),
            ));
        }
        let chunks = config.pool_slots.div_ceil(per).max(1);
        if chunks > POOL_BINDINGS {
            return Err(BackendError::OutOfMemory(format!(
                "pool of {} slots needs {chunks} bindings of at most {per} slots; the library has {POOL_BINDINGS}",
                config.pool_slots
            )));
        }
        let table_bytes = u64::from(config.table_pages.max(1)) * format::TABLE_PAGE_BYTES;
        if table_bytes > max_binding_bytes {
            return Err(BackendError::OutOfMemory(format!(
                "page table of {} pages exceeds one storage binding",
                config.table_pages
            )));
        }
        let chunk_slots = config.pool_slots.min(per).max(1);
        let mut binding_slots = [1; POOL_BINDINGS as usize];
        for (c, slots) in binding_slots.iter_mut().enumerate().take(chunks as usize) {
            *slots = (config.pool_slots - c as u32 * chunk_slots)
                .min(chunk_slots)
                .max(1);
        }
        Ok(MemoryPlan {
            table_bytes,
            chunk_slots,
            binding_slots,
        })
    }
}

/// One dispatch of the page-table operation (`pt_ops.wgsl`) over at most
/// 65536 entries: their word positions, the uniform block and the grid.
#[derive(Clone, Debug)]
pub struct PtBatch {
    /// Word index in the page-table buffer of each entry's low word.
    pub words: Vec<u32>,
    /// The uniform block.
    pub params: PtParams,
    /// Workgroups in x.
    pub groups_x: u32,
    /// Workgroups in y.
    pub groups_y: u32,
}

impl PtBatch {
    /// Entries one batch covers at most.
    pub const MAX: usize = 1 << 16;

    /// `Err` naming the first of `locs` outside a table of `table_pages`.
    pub fn check(locs: &[PteLoc], table_pages: u32) -> Result<(), BackendError> {
        match locs
            .iter()
            .find(|l| l.table.0 >= table_pages || usize::from(l.index) >= format::ENTRIES)
        {
            Some(bad) => Err(BackendError::Other(format!(
                "entry {:?}/{} outside the table",
                bad.table, bad.index
            ))),
            None => Ok(()),
        }
    }

    /// The entries the operation read back: `(low, high)` word pairs.
    pub fn ptes(pairs: &[u32]) -> impl Iterator<Item = format::Pte> + '_ {
        pairs
            .chunks_exact(2)
            .map(|p| format::Pte(u64::from(p[0]) | (u64::from(p[1]) << 32)))
    }

    /// Plans one dispatch over `locs` (at most [`PtBatch::MAX`]) that
    /// ANDs `keep` into each low word (`u32::MAX`: read only).
    pub fn plan(locs: &[PteLoc], keep: u32) -> Self {
        let n = locs.len() as u32;
        let words = locs
            .iter()
            .map(|l| (l.table.0 * format::ENTRIES as u32 + u32::from(l.index)) * 2)
            .collect();
        let (groups_x, groups_y, row_threads) = grid(n);
        PtBatch {
            words,
            params: PtParams {
                count: n,
                keep,
                row_threads,
                pad: 0,
            },
            groups_x,
            groups_y,
        }
    }
}

/// Where things live in a control buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlLayout {
    /// Fault records it holds.
    pub fault_cap: u32,
    /// Invocation ids the bitmap covers (`0..bitmap_bits`).
    pub bitmap_bits: u32,
}

impl ControlLayout {
    /// Word offset of the loop-budget counter: invocations that completed
    /// but found the adapter's loop-iteration budget spent (see
    /// [`LOOP_PROBE_ITERS`]). The bitmap follows it.
    pub const fn loop_limit_off(&self) -> u32 {
        1 + 4 * self.fault_cap + (1 << DEDUP_BITS)
    }
    /// Word offset of the bitmap.
    pub const fn bitmap_off(&self) -> u32 {
        self.loop_limit_off() + 1
    }
    /// Invocations that completed after running into the adapter's loop
    /// budget: their loops may have stopped early, so their results are
    /// not to be trusted. 0 for a short buffer.
    pub fn loop_limit_hits(&self, words: &[u32]) -> u32 {
        words
            .get(self.loop_limit_off() as usize)
            .copied()
            .unwrap_or(0)
    }
    /// Total words.
    pub const fn words(&self) -> u32 {
        self.bitmap_off() + self.bitmap_bits.div_ceil(32)
    }
    /// Total bytes.
    pub const fn bytes(&self) -> u64 {
        self.words() as u64 * 4
    }
    /// Reads a control buffer's words into an outcome: at most `fault_cap`
    /// records (fewer than faulted invocations if the buffer overflowed)
    /// and the incomplete invocations, ascending. The records are passed
    /// on as written: the mirror core validates them.
    pub fn parse(&self, words: &[u32]) -> LaunchOutcome {
        let mut out = LaunchOutcome::default();
        if words.len() < self.words() as usize {
            return out;
        }
        let count = words[0].min(self.fault_cap) as usize;
        for r in words[1..1 + 4 * count].chunks_exact(4) {
            out.faults.push(RawFaultRecord {
                invocation: r[0],
                flags: r[1],
                addr_lo: r[2],
                addr_hi: r[3],
            });
        }
        let bitmap = &words[self.bitmap_off() as usize..self.words() as usize];
        out.incomplete = InvocationSet::from_bitmap_words(self.bitmap_bits, bitmap);
        out
    }
}

#[cfg(test)]
mod tests;
