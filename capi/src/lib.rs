//! hmm-rs for C and C++ programs: a C API over the [`hmm`] facade.
//!
//! Built as `libhmm_capi.so` (cdylib) and `libhmm_capi.a` (staticlib); the
//! header is `capi/include/hmm.h`, generated from this crate by cbindgen
//! (`capi/cbindgen.toml`; CI regenerates it and fails on drift). A C
//! program opens a device, mirrors its own address space on it, builds a
//! kernel and launches it on plain `malloc`'d pointers:
//!
//! ```c
//! hmm_status st;
//! hmm_device *dev = hmm_device_open("auto", &st);          // or "cpu", "wgpu", "vulkan"
//! hmm_mirror *m = hmm_mirror_new(dev, NULL, &st);          // consumes dev
//! hmm_kernel *k = hmm_kernel_new(m, SAXPY_WGSL, saxpy_cpu, NULL, &st);
//! hmm_arg args[] = { hmm_arg_ptr(x), hmm_arg_ptr(y), hmm_arg_f32(2.5f) };
//! if (hmm_launch(m, k, n, args, 3, NULL, &st) != HMM_OK)
//!     fprintf(stderr, "%s: %s\n", hmm_status_code_name(st.code), st.message);
//! hmm_kernel_free(k);
//! hmm_mirror_free(m);
//! ```
//!
//! (`capi/examples/saxpy.c` is the whole program; `capi/examples/build.sh`
//! builds it with the system `cc`.)
//!
//! # Rules every function follows
//!
//! - **Errors are codes plus a message.** Every fallible function takes a
//!   `hmm_status *` (may be `NULL`) and fills it: `code` (an
//!   [`hmm_status_code`]) and `message`, a NUL-terminated string in a
//!   fixed buffer inside the struct (truncated to fit; the caller owns the
//!   struct, nothing is allocated for it). Functions that return a handle
//!   return `NULL` on error; the others return the code.
//! - **`NULL` handles are `HMM_INVALID_ARGUMENT`**, never undefined
//!   behaviour; `*_free(NULL)` does nothing.
//! - **No panic crosses the boundary**: every entry point runs under
//!   `catch_unwind`, and a panic (a bug in hmm-rs) is `HMM_PANIC` with the
//!   panic's message.
//! - **Nothing is printed**: diagnostics are `tracing` events, which a C
//!   program does not see unless a Rust subscriber is installed.
//! - **Fault-recoverable copies are off unless asked for.** hmm-core's fast
//!   copy between application memory and the device pool recovers from
//!   faults with a `SIGSEGV`/`SIGBUS` handler (`hmm_core::cpu::safecopy`).
//!   A C program's runtime may own those signals (a JVM, Go, sanitizers,
//!   its own handler), so [`hmm_device_open`] and [`hmm_mirror_new`]
//!   select the `process_vm_readv`/`writev` copy path
//!   (`safecopy::force_syscall(true)`, process-wide) unless the program
//!   called [`hmm_use_fast_copy`]`(1)` first.
//!
//! # Kernels
//!
//! GPU drivers (`wgpu`, `vulkan`) run WGSL that defines
//! `fn hmm_kernel(i: u32)` against the shader library (`hmm_arg_ptr(k)`,
//! `hmm_arg_f32(k)`, `hmm_index(p, i, size)`, `hmm_load_f32(p)`,
//! `hmm_store_f32(p, v)`, … — see the `hmm_shaders` crate). The `cpu`
//! driver runs a C callback ([`hmm_cpu_kernel_fn`]) once per invocation,
//! on several threads at once; it reaches memory only through the
//! `hmm_lane_*` accessors, whose non-`HMM_OK` result (usually a page fault
//! the library services before running the invocation again) the callback
//! returns at once. WGSL given to the cpu driver is still validated.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use hmm::{
    Advice, BackendError, CpuKernel, CpuWrites, Device, Driver, ForeignWriters, Kernel, Lane,
    LaneFault, LaunchReport, Mirror, MirrorConfig, MirrorError, VaRange, VirtAddr,
};
use hmm_core::cpu::safecopy;

mod params;

// ---------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------

/// What a call ended with.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum hmm_status_code {
    /// Success.
    HMM_OK = 0,
    /// A `NULL` handle or pointer where one is required, a string that is
    /// not UTF-8, an unknown driver name or argument kind, a bad range or
    /// mirror configuration.
    HMM_INVALID_ARGUMENT = 1,
    /// The driver asked for has no device here (or is not built in).
    HMM_NO_DEVICE = 2,
    /// A device access that no CPU mapping allows (unmapped or freed
    /// memory, `PROT_NONE`, a write to read-only memory, a misaligned
    /// access); the launch ended, the mirror stays usable.
    HMM_DEVICE_FAULT = 3,
    /// Device memory, the pool or the page-table budget is exhausted.
    HMM_OUT_OF_MEMORY = 4,
    /// A launch of more invocations than the device allows
    /// (`hmm_mirror_max_invocations`); nothing ran.
    HMM_TOO_MANY_INVOCATIONS = 5,
    /// A kernel could not be built (WGSL errors, with line and column) or
    /// failed as a whole (a cpu callback that returned nonzero without a
    /// failed access).
    HMM_KERNEL = 6,
    /// The device driver failed otherwise.
    HMM_BACKEND = 7,
    /// The device was lost; every later call on the mirror returns this.
    HMM_DEVICE_LOST = 8,
    /// Not possible on this driver (e.g. a WGSL-only kernel on the cpu
    /// driver).
    HMM_UNSUPPORTED = 9,
    /// Any other mirror error (the message says which).
    HMM_MIRROR = 10,
    /// A panic inside hmm-rs (a bug), caught at the boundary.
    HMM_PANIC = 11,
}

use hmm_status_code::*;

/// Bytes of [`hmm_status::message`], the terminating NUL included.
pub const HMM_STATUS_MESSAGE_LEN: usize = 1024;

/// A call's outcome: `code`, and for errors a message (a NUL-terminated
/// string, truncated to fit; empty for `HMM_OK`). Owned by the caller;
/// nothing in it needs freeing.
#[repr(C)]
pub struct hmm_status {
    /// What the call ended with.
    pub code: hmm_status_code,
    /// Why, in words.
    pub message: [c_char; HMM_STATUS_MESSAGE_LEN],
}

/// An error on its way to an `hmm_status`.
#[derive(Debug)]
struct Error {
    code: hmm_status_code,
    message: String,
}

impl Error {
    fn new(code: hmm_status_code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Error::new(HMM_INVALID_ARGUMENT, message)
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        Error::new(Error::from_backend_code(&e), e.to_string())
    }
}

impl From<MirrorError> for Error {
    fn from(e: MirrorError) -> Self {
        let code = match &e {
            MirrorError::DeviceFault { .. } => HMM_DEVICE_FAULT,
            MirrorError::TooManyInvocations { .. } => HMM_TOO_MANY_INVOCATIONS,
            MirrorError::PoolExhausted { .. } | MirrorError::Table(_) => HMM_OUT_OF_MEMORY,
            MirrorError::Range(_) | MirrorError::Config(_) => HMM_INVALID_ARGUMENT,
            MirrorError::DeviceLost(_) => HMM_DEVICE_LOST,
            MirrorError::Unsupported(_) | MirrorError::MigrationUnsupported(_) => HMM_UNSUPPORTED,
            MirrorError::Backend(b) => {
                return Error::new(Error::from_backend_code(b), e.to_string())
            }
            _ => HMM_MIRROR,
        };
        Error::new(code, e.to_string())
    }
}

impl Error {
    fn from_backend_code(e: &BackendError) -> hmm_status_code {
        match e {
            BackendError::OutOfMemory(_) => HMM_OUT_OF_MEMORY,
            BackendError::DeviceLost(_) => HMM_DEVICE_LOST,
            BackendError::Kernel(_) => HMM_KERNEL,
            BackendError::Unsupported(_) => HMM_UNSUPPORTED,
            _ => HMM_BACKEND,
        }
    }
}

/// Writes `code` and `message` to `st` (if not `NULL`).
///
/// # Safety
///
/// `st` is `NULL` or valid for writing an `hmm_status`.
unsafe fn set_status(st: *mut hmm_status, code: hmm_status_code, message: &str) {
    if st.is_null() {
        return;
    }
    // SAFETY: non-null, and the caller's contract makes it writable. Raw
    // field writes: the struct may be uninitialised.
    unsafe {
        core::ptr::addr_of_mut!((*st).code).write(code);
        let buf = core::ptr::addr_of_mut!((*st).message).cast::<u8>();
        let mut n = message.len().min(HMM_STATUS_MESSAGE_LEN - 1);
        // Cut at a character boundary, and never copy a NUL from inside
        // the message (it would hide the rest).
        while !message.is_char_boundary(n) {
            n -= 1;
        }
        let bytes = &message.as_bytes()[..n];
        let n = bytes.iter().position(|&b| b == 0).unwrap_or(n);
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, n);
        buf.add(n).write(0);
    }
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn core::any::Any + Send)) -> String {
    let what = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    };
    format!("panic inside hmm-rs (a bug; please report it): {what}")
}

/// Where a call's status goes: `NULL` or a writable `hmm_status`.
#[derive(Clone, Copy)]
struct StatusOut(*mut hmm_status);

impl StatusOut {
    /// Wraps `st`.
    ///
    /// # Safety
    ///
    /// `st` is `NULL` or valid for writing an `hmm_status` while this
    /// value lives.
    unsafe fn new(st: *mut hmm_status) -> Self {
        StatusOut(st)
    }

    fn set(self, code: hmm_status_code, message: &str) {
        // SAFETY: promised to `StatusOut::new`.
        unsafe { set_status(self.0, code, message) }
    }
}

/// Runs `f` under `catch_unwind` and reports its outcome in `st`: the value,
/// or `fallback` after an error or a panic.
fn guard<T>(st: StatusOut, fallback: T, f: impl FnOnce() -> Result<T, Error>) -> T {
    guard_full(st, fallback, f).0
}

/// [`guard`], also returning the code.
fn guard_full<T>(
    st: StatusOut,
    fallback: T,
    f: impl FnOnce() -> Result<T, Error>,
) -> (T, hmm_status_code) {
    let (value, code, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => (v, HMM_OK, String::new()),
        Ok(Err(e)) => (fallback, e.code, e.message),
        Err(payload) => (fallback, HMM_PANIC, panic_message(&*payload)),
    };
    st.set(code, &message);
    (value, code)
}

/// [`guard`] for functions that return their code.
fn guard_code(st: StatusOut, f: impl FnOnce() -> Result<(), Error>) -> hmm_status_code {
    guard_full(st, (), f).1
}

/// The name of a status code (`"HMM_OK"`, `"HMM_DEVICE_FAULT"`, …), a
/// static string; `"HMM_UNKNOWN"` for a value that is not a code.
#[no_mangle]
pub extern "C" fn hmm_status_code_name(code: u32) -> *const c_char {
    let s: &'static CStr = match code {
        0 => c"HMM_OK",
        1 => c"HMM_INVALID_ARGUMENT",
        2 => c"HMM_NO_DEVICE",
        3 => c"HMM_DEVICE_FAULT",
        4 => c"HMM_OUT_OF_MEMORY",
        5 => c"HMM_TOO_MANY_INVOCATIONS",
        6 => c"HMM_KERNEL",
        7 => c"HMM_BACKEND",
        8 => c"HMM_DEVICE_LOST",
        9 => c"HMM_UNSUPPORTED",
        10 => c"HMM_MIRROR",
        11 => c"HMM_PANIC",
        _ => c"HMM_UNKNOWN",
    };
    s.as_ptr()
}

/// A `&str` from a C string.
///
/// # Safety
///
/// `p` is `NULL` or a NUL-terminated string valid for the call.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|e| Error::invalid(format!("{what} is not UTF-8: {e}")))
}

// ---------------------------------------------------------------------------
// Copy path
// ---------------------------------------------------------------------------

/// Whether the application opted in to the fault-recoverable copy.
static FAST_COPY: AtomicBool = AtomicBool::new(false);

/// Selects the copy path the application chose (syscall by default).
fn apply_copy_path() {
    // Relaxed: a preference, read and applied; nothing else depends on it.
    safecopy::force_syscall(!FAST_COPY.load(Ordering::Relaxed));
}

/// Opts in (`on` nonzero) to hmm-core's fault-recoverable fast copy, or
/// back out (`0`, the default). The fast copy installs a `SIGSEGV` and
/// `SIGBUS` handler that recovers faults in its own copy routine and
/// chains every other fault to the handler installed before it; opt in
/// only if nothing in the process installs such handlers later (a JVM, Go,
/// sanitizers, the program itself). Off, copies use `process_vm_readv` /
/// `process_vm_writev`: slower, no signal handler. Process-wide, and it
/// applies to copies that start after the call (also for mirrors that
/// already exist).
#[no_mangle]
pub extern "C" fn hmm_use_fast_copy(on: c_int) {
    // Relaxed: see `apply_copy_path`.
    FAST_COPY.store(on != 0, Ordering::Relaxed);
    apply_copy_path();
}

// One module per kind of handle, declared in the header's order: cbindgen
// emits items in source order, so moving a declaration reorders hmm.h.
mod device;
pub use device::*;
mod mirror;
pub use mirror::*;
mod kernel;
pub use kernel::*;
mod lane;
pub use lane::*;
mod launch;
pub use launch::*;
mod memory;
pub use memory::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> hmm_status {
        hmm_status {
            code: HMM_OK,
            message: [0; HMM_STATUS_MESSAGE_LEN],
        }
    }

    fn message(st: &hmm_status) -> String {
        // SAFETY: `set_status` always NUL-terminates inside the buffer.
        unsafe { CStr::from_ptr(st.message.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_is_caught_and_typed() {
        let mut st = status();
        // SAFETY: `st` is a live, writable status.
        let out = unsafe { StatusOut::new(&mut st) };
        let code = guard_code(out, || panic!("provoked"));
        assert_eq!(code, HMM_PANIC);
        assert_eq!(st.code, HMM_PANIC);
        assert!(message(&st).contains("provoked"), "{}", message(&st));
        // SAFETY: as above.
        let out = unsafe { StatusOut::new(&mut st) };
        let p: *mut u8 = guard(out, core::ptr::null_mut(), || panic!("again"));
        assert!(p.is_null());
        assert_eq!(st.code, HMM_PANIC);
    }

    #[test]
    fn long_and_odd_messages_are_cut_safely() {
        let mut st = status();
        let long = "é".repeat(HMM_STATUS_MESSAGE_LEN);
        // SAFETY: `st` is a live, writable status.
        unsafe { set_status(&mut st, HMM_KERNEL, &long) };
        let m = message(&st);
        assert!(m.len() < HMM_STATUS_MESSAGE_LEN && m.chars().all(|c| c == 'é'));
        // SAFETY: as above.
        unsafe { set_status(&mut st, HMM_KERNEL, "a\0b") };
        assert_eq!(message(&st), "a");
        // SAFETY: NULL is allowed.
        unsafe { set_status(core::ptr::null_mut(), HMM_KERNEL, "x") };
    }

    #[test]
    fn code_names_match_the_enum() {
        for (c, n) in [
            (HMM_OK, "HMM_OK"),
            (HMM_DEVICE_FAULT, "HMM_DEVICE_FAULT"),
            (HMM_PANIC, "HMM_PANIC"),
        ] {
            // SAFETY: a static NUL-terminated string.
            let s = unsafe { CStr::from_ptr(hmm_status_code_name(c as u32)) };
            assert_eq!(s.to_str().unwrap(), n);
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(hmm_status_code_name(99)) };
        assert_eq!(s.to_str().unwrap(), "HMM_UNKNOWN");
    }
}
