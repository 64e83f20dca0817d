//! Kernels: CPU callbacks (`hmm_lane`, `hmm_cpu_kernel_fn`) and WGSL for the GPU drivers.

use super::*;

/// One invocation's view of the device, handed to a cpu-driver callback
/// (opaque). Valid only during the callback that received it.
pub struct hmm_lane {
    /// The `hmm::Lane` of the running invocation.
    pub(crate) lane: *mut c_void,
    /// The first access that failed, returned to the driver.
    pub(crate) fault: Option<LaneFault>,
}

/// A cpu-driver kernel: called once per invocation `i` with the lane and
/// the `ctx` given to [`hmm_kernel_new`]. It reads and writes memory only
/// through the `hmm_lane_*` accessors and returns 0, or — as soon as an
/// accessor returns something other than `HMM_OK` — nonzero. A failed
/// access is usually a page fault: the library services it and calls the
/// callback again for the same `i` (stores of the stopped run are
/// dropped), so a callback must not have side effects outside the lane.
/// Called from several threads at once. Must not unwind (C++ exceptions
/// must not leave it).
pub type hmm_cpu_kernel_fn =
    Option<unsafe extern "C" fn(lane: *mut hmm_lane, i: u32, ctx: *mut c_void) -> c_int>;

/// A kernel built for one mirror's driver (opaque). From
/// [`hmm_kernel_new`]; freed with [`hmm_kernel_free`].
pub struct hmm_kernel {
    pub(crate) kernel: Arc<Kernel>,
    /// The declared parameters ([`hmm_kernel_new_with_params`]), which
    /// every launch's arguments must match.
    pub(crate) params: Option<params::Declared>,
}

/// The C callback and its context, called from the cpu driver's threads.
struct CpuCallback {
    f: unsafe extern "C" fn(*mut hmm_lane, u32, *mut c_void) -> c_int,
    ctx: *mut c_void,
}

// SAFETY: `hmm_kernel_new`'s contract: `ctx` may be used from any thread,
// concurrently, for as long as the kernel lives; `f` is a plain function.
unsafe impl Send for CpuCallback {}
// SAFETY: as for `Send`.
unsafe impl Sync for CpuCallback {}

impl CpuCallback {
    /// Runs invocation `i` on `lane`.
    fn call(&self, lane: &mut Lane<'_>, i: u32) -> Result<(), LaneFault> {
        let mut h = hmm_lane {
            lane: (lane as *mut Lane<'_>).cast(),
            fault: None,
        };
        // SAFETY: `hmm_kernel_new`'s contract on `f` and `ctx`; `h` lives
        // for the call and the accessors only use it during it.
        let rc = unsafe { (self.f)(&mut h, i, self.ctx) };
        match (h.fault, rc) {
            // A failed access stops the invocation even if the callback
            // ignored it: its stores did not happen.
            (Some(f), _) => Err(f),
            (None, 0) => Ok(()),
            // The cpu driver catches this and ends the launch with
            // `BackendError::Kernel`; `resume_unwind` runs no panic hook,
            // so nothing is printed.
            (None, rc) => std::panic::resume_unwind(Box::new(format!(
                "the C kernel callback returned {rc} for invocation {i} without a failed hmm_lane_* access"
            ))),
        }
    }
}

/// Builds a kernel for `m`'s driver. GPU drivers compile `wgsl` (required;
/// errors are `HMM_KERNEL` naming line and column). The cpu driver runs
/// `cpu_fn` (required there: `NULL` is `HMM_UNSUPPORTED`) with `cpu_ctx`,
/// and still validates `wgsl` when given, so a WGSL typo surfaces on every
/// driver. `cpu_fn` is ignored by GPU drivers. Returns `NULL` on error.
/// The kernel reads its arguments by position (`hmm_arg_ptr(0u)`); see
/// [`hmm_kernel_new_with_params`] for named, checked ones.
///
/// # Safety
///
/// `m` is `NULL` or a live mirror; `wgsl` is `NULL` or a NUL-terminated
/// string; `cpu_fn`, if not `NULL`, follows [`hmm_cpu_kernel_fn`]'s rules,
/// and `cpu_ctx` is usable from any thread concurrently for as long as the
/// kernel lives; `st` is `NULL` or valid for writing an `hmm_status`.
#[no_mangle]
pub unsafe extern "C" fn hmm_kernel_new(
    m: *const hmm_mirror,
    wgsl: *const c_char,
    cpu_fn: hmm_cpu_kernel_fn,
    cpu_ctx: *mut c_void,
    st: *mut hmm_status,
) -> *mut hmm_kernel {
    // SAFETY: the caller's contract, passed on unchanged (no parameters).
    unsafe { hmm_kernel_new_with_params(m, core::ptr::null(), wgsl, cpu_fn, cpu_ctx, st) }
}

/// [`hmm_kernel_new`] with declared parameters: `params` is
/// `"name: kind, ..."` (kinds `ptr`, `u32`, `i32`, `f32`, `u64`, as the
/// `hmm_arg_*` constructors make them; `NULL` or blank for none). The WGSL
/// reads them by name (`args.x`, `args.n`: pointers and `u64`s are
/// `vec2<u32>`), and every launch is checked against the declaration: a
/// wrong count or an argument of another kind is `HMM_INVALID_ARGUMENT`
/// naming it, before anything runs. A malformed declaration is
/// `HMM_INVALID_ARGUMENT`.
///
/// # Safety
///
/// As [`hmm_kernel_new`]; `params` is `NULL` or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hmm_kernel_new_with_params(
    m: *const hmm_mirror,
    params: *const c_char,
    wgsl: *const c_char,
    cpu_fn: hmm_cpu_kernel_fn,
    cpu_ctx: *mut c_void,
    st: *mut hmm_status,
) -> *mut hmm_kernel {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard(st, core::ptr::null_mut(), || {
        // SAFETY: the caller's contract on `m`.
        let m = unsafe { mirror_ref(m) }?;
        // SAFETY: the caller's contract on `wgsl`.
        let wgsl = unsafe { str_arg(wgsl, "wgsl") }?;
        // SAFETY: the caller's contract on `params`.
        let decl = unsafe { str_arg(params, "params") }?;
        let declared = decl.map(params::parse).transpose()?;
        // The kernel as written, then its generated parameters (after it:
        // its line numbers stay its own).
        let full = wgsl.map(|w| match &declared {
            Some((_, prelude)) => format!("{w}\n{prelude}"),
            None => w.to_string(),
        });
        let kernel = match m.mirror.backend() {
            Device::Cpu(_) => {
                if let Some(w) = &full {
                    hmm_shaders::build(w).map_err(|e| Error::new(HMM_KERNEL, e.to_string()))?;
                }
                let f = cpu_fn.ok_or_else(|| {
                    Error::new(
                        HMM_UNSUPPORTED,
                        "the cpu driver runs kernels as C callbacks: cpu_fn is NULL \
                         (a WGSL-only kernel runs on the wgpu and vulkan drivers)",
                    )
                })?;
                let cb = CpuCallback { f, ctx: cpu_ctx };
                Kernel::Cpu(CpuKernel::new(move |lane, i| cb.call(lane, i)))
            }
            gpu => {
                let w = full.ok_or_else(|| {
                    Error::invalid(format!(
                        "the {} driver needs WGSL: wgsl is NULL",
                        gpu.driver().name()
                    ))
                })?;
                gpu_kernel(gpu, &w)?
            }
        };
        Ok(Box::into_raw(Box::new(hmm_kernel {
            kernel: Arc::new(kernel),
            params: declared.map(|(d, _)| d),
        })))
    })
}

/// Builds `wgsl` on a GPU device.
fn gpu_kernel(dev: &Device, wgsl: &str) -> Result<Kernel, Error> {
    match dev {
        Device::Wgpu(d) => Ok(Kernel::Wgpu(d.kernel(wgsl)?)),
        Device::Vulkan(d) => Ok(Kernel::Vulkan(d.kernel(wgsl)?)),
        Device::Cpu(_) => Err(Error::invalid("not a GPU device")),
    }
}

/// Frees a kernel. `NULL` does nothing. A non-blocking launch in flight
/// keeps the kernel alive until it is waited for.
///
/// # Safety
///
/// `k` is `NULL` or a live handle from [`hmm_kernel_new`], not used again.
#[no_mangle]
pub unsafe extern "C" fn hmm_kernel_free(k: *mut hmm_kernel) {
    if k.is_null() {
        return;
    }
    // SAFETY: the caller's contract: a live handle from `Box::into_raw`.
    let k = unsafe { Box::from_raw(k) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(k)));
}
