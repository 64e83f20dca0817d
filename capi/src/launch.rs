//! Launches: typed arguments, reports, synchronous and asynchronous launches.

use super::*;

/// Which member of [`hmm_arg_value`] an [`hmm_arg`] carries.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum hmm_arg_kind {
    /// `ptr`: a CPU pointer, passed as its address (never dereferenced on
    /// the host; the device translates it through the mirror).
    HMM_ARG_PTR = 0,
    /// `u32`, zero-extended.
    HMM_ARG_U32 = 1,
    /// `i32`, sign-extended.
    HMM_ARG_I32 = 2,
    /// `f32`, its IEEE bits in the low word (WGSL `hmm_arg_f32`).
    HMM_ARG_F32 = 3,
    /// `u64`.
    HMM_ARG_U64 = 4,
    /// `i64`.
    HMM_ARG_I64 = 5,
    /// `f64`, its IEEE bits.
    HMM_ARG_F64 = 6,
}

/// An argument's value; the member named by [`hmm_arg::kind`] is the one
/// read.
#[repr(C)]
#[derive(Clone, Copy)]
pub union hmm_arg_value {
    /// `HMM_ARG_PTR`.
    pub ptr: *const c_void,
    /// `HMM_ARG_U32`.
    pub u32: u32,
    /// `HMM_ARG_I32`.
    pub i32: i32,
    /// `HMM_ARG_F32`.
    pub f32: f32,
    /// `HMM_ARG_U64`.
    pub u64: u64,
    /// `HMM_ARG_I64`.
    pub i64: i64,
    /// `HMM_ARG_F64`.
    pub f64: f64,
}

/// One launch argument: a kind (an [`hmm_arg_kind`] value) and the value
/// of that type. Build them with the header's `hmm_arg_ptr(p)`,
/// `hmm_arg_u32(v)`, `hmm_arg_f32(v)`, … so a scalar always carries its
/// type.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hmm_arg {
    /// An [`hmm_arg_kind`] value; anything else is `HMM_INVALID_ARGUMENT`.
    pub kind: u32,
    /// The value; the member `kind` names must have been written.
    pub value: hmm_arg_value,
}

/// The 64-bit words of `args`, checked against `declared` when the kernel
/// has declared parameters.
///
/// # Safety
///
/// `args` is valid for reading `n` `hmm_arg`s (or `n` is 0), each with the
/// member its kind names written.
unsafe fn arg_words(
    args: *const hmm_arg,
    n: usize,
    declared: Option<&params::Declared>,
) -> Result<Vec<u64>, Error> {
    let args = if n == 0 {
        &[][..]
    } else if args.is_null() {
        return Err(Error::invalid(format!("args is NULL but nargs is {n}")));
    } else {
        // SAFETY: the caller's contract.
        unsafe { core::slice::from_raw_parts(args, n) }
    };
    if let Some(d) = declared {
        let kinds: Vec<u32> = args.iter().map(|a| a.kind).collect();
        params::check(d, &kinds)?;
    }
    args.iter()
        .enumerate()
        .map(|(i, a)| {
            // SAFETY: the caller's contract: the member `kind` names was
            // written; each is plain data.
            let w = unsafe {
                match a.kind {
                    0 => a.value.ptr as usize as u64,
                    1 => u64::from(a.value.u32),
                    2 => a.value.i32 as i64 as u64,
                    3 => u64::from(a.value.f32.to_bits()),
                    4 => a.value.u64,
                    5 => a.value.i64 as u64,
                    6 => a.value.f64.to_bits(),
                    k => {
                        return Err(Error::invalid(format!(
                            "argument {i} has unknown kind {k} (expected an hmm_arg_kind)"
                        )))
                    }
                }
            };
            Ok(w)
        })
        .collect()
}

/// What one launch did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct hmm_launch_report {
    /// Device submissions (1 + replays).
    pub submissions: u32,
    /// Valid faults serviced.
    pub faults: u64,
    /// Pages copied in while servicing them.
    pub pages_in: u64,
    /// Dirty pages written back at the end.
    pub pages_out: u64,
    /// CPU-written pages invalidated at the start (sync point).
    pub cpu_written_pages: u64,
    /// Pages of shared or file-backed mappings found changed by another
    /// writer at the start, and invalidated.
    pub foreign_changed_pages: u64,
}

impl From<LaunchReport> for hmm_launch_report {
    fn from(r: LaunchReport) -> Self {
        hmm_launch_report {
            submissions: r.submissions,
            faults: r.faults,
            pages_in: r.pages_in,
            pages_out: r.pages_out,
            cpu_written_pages: r.cpu_written_pages,
            foreign_changed_pages: r.foreign_changed_pages,
        }
    }
}

/// Checks the handles of a launch.
///
/// # Safety
///
/// `m` and `k` are `NULL` or live handles.
unsafe fn launch_handles<'a>(
    m: *const hmm_mirror,
    k: *const hmm_kernel,
) -> Result<(&'a hmm_mirror, &'a hmm_kernel), Error> {
    // SAFETY: the caller's contract on `m`.
    let m = unsafe { mirror_ref(m) }?;
    // SAFETY: the caller's contract on `k`.
    let k = unsafe { k.as_ref() }.ok_or_else(|| Error::invalid("kernel is NULL"))?;
    Ok((m, k))
}

/// Writes `r` to `out` if not `NULL`.
///
/// # Safety
///
/// `out` is `NULL` or valid for writing.
unsafe fn put_report(out: *mut hmm_launch_report, r: LaunchReport) {
    if !out.is_null() {
        // SAFETY: the caller's contract.
        unsafe { out.write(r.into()) };
    }
}

/// Runs `k` over invocations `0..n` with `args` and returns when the
/// device is done and its writes are visible to the CPU (faults are
/// serviced and the invocations that faulted run again). `n` above
/// [`hmm_mirror_max_invocations`] is `HMM_TOO_MANY_INVOCATIONS` (nothing
/// runs); `n = 0` runs nothing. A device access no CPU mapping allows
/// ends the launch with `HMM_DEVICE_FAULT` naming the address (writes of
/// invocations that completed may have reached the CPU). Alignment: 4
/// bytes for 32-bit values, 8 for 64-bit ones. `out_report` may be `NULL`.
///
/// # Safety
///
/// `m`, `k` are `NULL` or live handles; `args` is valid for reading
/// `nargs` `hmm_arg`s (may be `NULL` when `nargs` is 0), each with the
/// member its kind names written; `out_report` is `NULL` or writable; `st`
/// is `NULL` or valid for writing an `hmm_status`. Pointer arguments are
/// not dereferenced on the host, so any value is safe (a bad one is a
/// device fault).
#[no_mangle]
pub unsafe extern "C" fn hmm_launch(
    m: *const hmm_mirror,
    k: *const hmm_kernel,
    n: u32,
    args: *const hmm_arg,
    nargs: usize,
    out_report: *mut hmm_launch_report,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard_code(st, || {
        // SAFETY: the caller's contract on the handles.
        let (m, k) = unsafe { launch_handles(m, k) }?;
        // SAFETY: the caller's contract on `args`.
        let words = unsafe { arg_words(args, nargs, k.params.as_ref()) }?;
        let r = m.mirror.launch(&k.kernel, n, &words[..])?;
        // SAFETY: the caller's contract on `out_report`.
        unsafe { put_report(out_report, r) };
        Ok(())
    })
}

/// A launch in flight (opaque): from [`hmm_launch_async`], ended by
/// [`hmm_launch_wait`].
pub struct hmm_launch_handle {
    thread: JoinHandle<Result<LaunchReport, Error>>,
}

/// Starts [`hmm_launch`] on a thread of its own and returns at once; the
/// launch's outcome comes from [`hmm_launch_wait`], which every handle
/// must be given exactly once. The arguments are copied before it
/// returns. Until the wait returns, the CPU must not write memory the
/// kernel reads or writes, nor read memory it writes: the launch's
/// start-of-launch sync point may come after this call returns, and its
/// writes become visible only when the wait returns. Launches and
/// prefetches on one mirror run one at a time, so a blocking call on the
/// same mirror waits for this one. The mirror and kernel may be freed
/// while it runs (it keeps them alive). Returns `NULL` on error (bad
/// handles or arguments; the launch's own errors come from the wait).
///
/// # Safety
///
/// As [`hmm_launch`].
#[no_mangle]
pub unsafe extern "C" fn hmm_launch_async(
    m: *const hmm_mirror,
    k: *const hmm_kernel,
    n: u32,
    args: *const hmm_arg,
    nargs: usize,
    st: *mut hmm_status,
) -> *mut hmm_launch_handle {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard(st, core::ptr::null_mut(), || {
        // SAFETY: the caller's contract on the handles.
        let (m, k) = unsafe { launch_handles(m, k) }?;
        // SAFETY: the caller's contract on `args`.
        let words = unsafe { arg_words(args, nargs, k.params.as_ref()) }?;
        let (mirror, kernel) = (Arc::clone(&m.mirror), Arc::clone(&k.kernel));
        let thread = std::thread::Builder::new()
            .name("hmm-capi-launch".into())
            .spawn(move || -> Result<LaunchReport, Error> {
                match catch_unwind(AssertUnwindSafe(|| mirror.launch(&kernel, n, &words[..]))) {
                    Ok(r) => r.map_err(Error::from),
                    Err(p) => Err(Error::new(HMM_PANIC, panic_message(&*p))),
                }
            })
            .map_err(|e| Error::new(HMM_BACKEND, format!("cannot start the launch thread: {e}")))?;
        Ok(Box::into_raw(Box::new(hmm_launch_handle { thread })))
    })
}

/// Whether the launch behind `h` has finished (its wait will not block):
/// 1 if so, 0 if not or for a `NULL` handle.
///
/// # Safety
///
/// `h` is `NULL` or a handle from [`hmm_launch_async`] not yet waited for.
#[no_mangle]
pub unsafe extern "C" fn hmm_launch_is_done(h: *const hmm_launch_handle) -> c_int {
    // SAFETY: the caller's contract.
    match unsafe { h.as_ref() } {
        Some(h) => c_int::from(h.thread.is_finished()),
        None => 0,
    }
}

/// Waits for the launch behind `h`, frees the handle and returns the
/// launch's outcome, as [`hmm_launch`] would have (`out_report` may be
/// `NULL`). On return the CPU sees every device write of the launch.
///
/// # Safety
///
/// `h` is `NULL` or a handle from [`hmm_launch_async`], not used again;
/// `out_report` is `NULL` or writable; `st` is `NULL` or valid for
/// writing an `hmm_status`.
#[no_mangle]
pub unsafe extern "C" fn hmm_launch_wait(
    h: *mut hmm_launch_handle,
    out_report: *mut hmm_launch_report,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard_code(st, || {
        if h.is_null() {
            return Err(Error::invalid("launch handle is NULL"));
        }
        // SAFETY: the caller's contract: a live handle, consumed here.
        let h = unsafe { Box::from_raw(h) };
        let r = match h.thread.join() {
            Ok(r) => r?,
            Err(p) => return Err(Error::new(HMM_PANIC, panic_message(&*p))),
        };
        // SAFETY: the caller's contract on `out_report`.
        unsafe { put_report(out_report, r) };
        Ok(())
    })
}
