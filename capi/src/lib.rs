//! hmm-rs for C and C++ programs: a C API over the [`hmm`] facade.
//!
//! Built as `libhmm_capi.so` (cdylib) and `libhmm_capi.a` (staticlib); the
//! header is `capi/include/hmm.h`, generated from this file by cbindgen
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
            MirrorError::Unsupported(_) => HMM_UNSUPPORTED,
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

// ---------------------------------------------------------------------------
// Device
// ---------------------------------------------------------------------------

/// An opened device (opaque). From [`hmm_device_open`]; consumed by
/// [`hmm_mirror_new`] or freed with [`hmm_device_free`].
pub struct hmm_device {
    device: Device,
    note: CString,
}

/// A C string of `s` (interior NULs dropped).
fn c_string(s: String) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// The driver's name as a static C string.
fn driver_name(d: Driver) -> &'static CStr {
    match d {
        Driver::Cpu => c"cpu",
        Driver::Wgpu => c"wgpu",
        Driver::Vulkan => c"vulkan",
    }
}

/// Opens a device: `driver` is `"cpu"`, `"wgpu"`, `"vulkan"`, or `"auto"`
/// / `NULL` for the best available (wgpu, else vulkan, else cpu;
/// [`hmm_device_note`] says which and why). Returns `NULL` on error:
/// `HMM_INVALID_ARGUMENT` for an unknown name, `HMM_NO_DEVICE` when the
/// named driver has no device here. Selects the syscall copy path unless
/// [`hmm_use_fast_copy`]`(1)` was called.
///
/// # Safety
///
/// `driver` is `NULL` or a NUL-terminated string; `st` is `NULL` or valid
/// for writing an `hmm_status`.
#[no_mangle]
pub unsafe extern "C" fn hmm_device_open(
    driver: *const c_char,
    st: *mut hmm_status,
) -> *mut hmm_device {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard(st, core::ptr::null_mut(), || {
        apply_copy_path();
        // SAFETY: the caller's contract on `driver`.
        let name = unsafe { str_arg(driver, "driver") }?;
        let want = hmm::parse_backend(name).map_err(|e| Error::invalid(e.to_string()))?;
        let opened = Device::open(want).map_err(|e| Error::new(HMM_NO_DEVICE, e.to_string()))?;
        Ok(Box::into_raw(Box::new(hmm_device {
            device: opened.device,
            note: c_string(opened.note),
        })))
    })
}

/// Which driver `dev` is (`"cpu"`, `"wgpu"` or `"vulkan"`), a static
/// string; `NULL` for a `NULL` device.
///
/// # Safety
///
/// `dev` is `NULL` or a live handle from [`hmm_device_open`].
#[no_mangle]
pub unsafe extern "C" fn hmm_device_driver(dev: *const hmm_device) -> *const c_char {
    // SAFETY: the caller's contract.
    match unsafe { dev.as_ref() } {
        Some(d) => driver_name(d.device.driver()).as_ptr(),
        None => core::ptr::null(),
    }
}

/// The line that says which device was opened and why (e.g. `backend:
/// wgpu on llvmpipe (…) (best available)`), valid until the device is
/// freed or consumed; `NULL` for a `NULL` device.
///
/// # Safety
///
/// `dev` is `NULL` or a live handle from [`hmm_device_open`].
#[no_mangle]
pub unsafe extern "C" fn hmm_device_note(dev: *const hmm_device) -> *const c_char {
    // SAFETY: the caller's contract.
    match unsafe { dev.as_ref() } {
        Some(d) => d.note.as_ptr(),
        None => core::ptr::null(),
    }
}

/// Frees a device that was not given to [`hmm_mirror_new`]. `NULL` does
/// nothing.
///
/// # Safety
///
/// `dev` is `NULL` or a live handle from [`hmm_device_open`], not used
/// again.
#[no_mangle]
pub unsafe extern "C" fn hmm_device_free(dev: *mut hmm_device) {
    if dev.is_null() {
        return;
    }
    // SAFETY: the caller's contract: a live handle from `Box::into_raw`.
    let d = unsafe { Box::from_raw(dev) };
    // A driver's drop must not unwind into C.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(d)));
}

// ---------------------------------------------------------------------------
// Mirror
// ---------------------------------------------------------------------------

/// How a mirror is sized. A zero field means the default, so
/// `hmm_mirror_config cfg = {0};` (or a `NULL` config) is the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct hmm_mirror_config {
    /// Device pool size in 4 KiB slots (default 65536 = 256 MiB).
    pub pool_slots: u32,
    /// Device page-table budget in 4 KiB table pages (default 4096).
    pub table_pages: u32,
    /// Faults serviced per batch (default 256).
    pub fault_batch: u32,
    /// Replays of one launch before giving up (default 1000).
    pub max_replays: u32,
    /// Bound on one run's fault-retry loop, milliseconds (default 1000).
    pub retry_timeout_ms: u32,
    /// Nonzero: learn of CPU writes by hashing device-resident pages at
    /// each launch instead of write-protecting them (keeps transparent
    /// huge pages whole; `CpuWrites::Hash`). Default 0 (`Protect`).
    pub hash_cpu_writes: u32,
    /// Nonzero: trust that no other process or syscall writes mirrored
    /// shared or file-backed memory (`ForeignWriters::Trust`: no re-check
    /// at sync points). Default 0 (`Check`).
    pub trust_foreign_writers: u32,
}

impl hmm_mirror_config {
    fn to_config(self) -> MirrorConfig {
        let d = MirrorConfig::default();
        let or = |v: u32, dflt: u32| if v == 0 { dflt } else { v };
        MirrorConfig {
            pool_slots: or(self.pool_slots, d.pool_slots),
            table_pages: or(self.table_pages, d.table_pages),
            fault_batch: if self.fault_batch == 0 {
                d.fault_batch
            } else {
                self.fault_batch as usize
            },
            max_replays: or(self.max_replays, d.max_replays),
            retry_timeout: if self.retry_timeout_ms == 0 {
                d.retry_timeout
            } else {
                std::time::Duration::from_millis(u64::from(self.retry_timeout_ms))
            },
            cpu_writes: if self.hash_cpu_writes != 0 {
                CpuWrites::Hash
            } else {
                CpuWrites::Protect
            },
            foreign_writers: if self.trust_foreign_writers != 0 {
                ForeignWriters::Trust
            } else {
                ForeignWriters::Check
            },
            ..d
        }
    }
}

/// A mirror of this process's address space on a device (opaque). From
/// [`hmm_mirror_new`]; freed with [`hmm_mirror_free`]. Calls on one mirror
/// may come from any thread; launches and prefetches on it run one at a
/// time.
pub struct hmm_mirror {
    mirror: Arc<Mirror<Device>>,
    driver: Driver,
}

/// Borrows a mirror handle.
///
/// # Safety
///
/// `m` is `NULL` or a live handle from [`hmm_mirror_new`].
unsafe fn mirror_ref<'a>(m: *const hmm_mirror) -> Result<&'a hmm_mirror, Error> {
    // SAFETY: the caller's contract.
    unsafe { m.as_ref() }.ok_or_else(|| Error::invalid("mirror is NULL"))
}

/// Mirrors this process on `dev`, which is consumed (freed, also on
/// error). `cfg` may be `NULL` (defaults). Returns `NULL` on error.
/// Selects the syscall copy path unless [`hmm_use_fast_copy`]`(1)` was
/// called.
///
/// # Safety
///
/// `dev` is `NULL` or a live handle from [`hmm_device_open`], not used
/// again; `cfg` is `NULL` or valid for reading; `st` is `NULL` or valid
/// for writing an `hmm_status`.
#[no_mangle]
pub unsafe extern "C" fn hmm_mirror_new(
    dev: *mut hmm_device,
    cfg: *const hmm_mirror_config,
    st: *mut hmm_status,
) -> *mut hmm_mirror {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard(st, core::ptr::null_mut(), || {
        apply_copy_path();
        if dev.is_null() {
            return Err(Error::invalid("device is NULL"));
        }
        // SAFETY: the caller's contract: a live handle, consumed here.
        let dev = unsafe { Box::from_raw(dev) };
        // SAFETY: the caller's contract on `cfg`.
        let cfg = unsafe { cfg.as_ref() }.copied().unwrap_or_default();
        let driver = dev.device.driver();
        let mirror = hmm::mirror(dev.device, cfg.to_config())?;
        Ok(Box::into_raw(Box::new(hmm_mirror {
            mirror: Arc::new(mirror),
            driver,
        })))
    })
}

/// Frees a mirror. Its device copies are written back by the launches
/// that made them, so nothing is lost. A non-blocking launch still in
/// flight keeps what it needs alive until [`hmm_launch_wait`]. `NULL` does
/// nothing.
///
/// # Safety
///
/// `m` is `NULL` or a live handle from [`hmm_mirror_new`], not used again.
#[no_mangle]
pub unsafe extern "C" fn hmm_mirror_free(m: *mut hmm_mirror) {
    if m.is_null() {
        return;
    }
    // SAFETY: the caller's contract: a live handle from `Box::into_raw`.
    let m = unsafe { Box::from_raw(m) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(m)));
}

/// The mirror's driver (`"cpu"`, `"wgpu"` or `"vulkan"`), a static
/// string; `NULL` for a `NULL` mirror.
///
/// # Safety
///
/// `m` is `NULL` or a live handle from [`hmm_mirror_new`].
#[no_mangle]
pub unsafe extern "C" fn hmm_mirror_driver(m: *const hmm_mirror) -> *const c_char {
    // SAFETY: the caller's contract.
    match unsafe { m.as_ref() } {
        Some(m) => driver_name(m.driver).as_ptr(),
        None => core::ptr::null(),
    }
}

/// The most invocations one launch may have on this mirror (at most
/// 2^31); 0 for a `NULL` mirror.
///
/// # Safety
///
/// `m` is `NULL` or a live handle from [`hmm_mirror_new`].
#[no_mangle]
pub unsafe extern "C" fn hmm_mirror_max_invocations(m: *const hmm_mirror) -> u32 {
    // SAFETY: the caller's contract.
    match unsafe { m.as_ref() } {
        Some(m) => catch_unwind(AssertUnwindSafe(|| m.mirror.max_invocations())).unwrap_or(0),
        None => 0,
    }
}

// ---------------------------------------------------------------------------
// Kernels and lanes
// ---------------------------------------------------------------------------

/// One invocation's view of the device, handed to a cpu-driver callback
/// (opaque). Valid only during the callback that received it.
pub struct hmm_lane {
    /// The `hmm::Lane` of the running invocation.
    lane: *mut c_void,
    /// The first access that failed, returned to the driver.
    fault: Option<LaneFault>,
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
    kernel: Arc<Kernel>,
    /// The declared parameters ([`hmm_kernel_new_with_params`]), which
    /// every launch's arguments must match.
    params: Option<params::Declared>,
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

/// Runs `f` on the lane behind `lane`, recording a failed access.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
unsafe fn on_lane<T>(
    lane: *mut hmm_lane,
    f: impl FnOnce(&mut Lane<'_>) -> Result<T, LaneFault>,
) -> Result<T, hmm_status_code> {
    // SAFETY: the caller's contract.
    let Some(h) = (unsafe { lane.as_mut() }) else {
        return Err(HMM_INVALID_ARGUMENT);
    };
    // SAFETY: `h.lane` is the `&mut Lane` of the invocation whose callback
    // is running (set in `CpuCallback::call`, which outlives the callback),
    // and no other reference to it is live during the callback.
    let l = unsafe { &mut *h.lane.cast::<Lane<'_>>() };
    match catch_unwind(AssertUnwindSafe(|| f(l))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(fault)) => {
            h.fault.get_or_insert(fault);
            Err(HMM_DEVICE_FAULT)
        }
        Err(_) => Err(HMM_PANIC),
    }
}

/// A load through the lane into `*out`.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback; `out`
/// is `NULL` or valid for writing.
unsafe fn lane_load<T>(
    lane: *mut hmm_lane,
    out: *mut T,
    f: impl FnOnce(&mut Lane<'_>) -> Result<T, LaneFault>,
) -> hmm_status_code {
    if out.is_null() {
        return HMM_INVALID_ARGUMENT;
    }
    // SAFETY: the caller's contract on `lane`.
    match unsafe { on_lane(lane, f) } {
        Ok(v) => {
            // SAFETY: non-null and writable (the caller's contract).
            unsafe { out.write(v) };
            HMM_OK
        }
        Err(c) => c,
    }
}

/// A store through the lane.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
unsafe fn lane_store(
    lane: *mut hmm_lane,
    f: impl FnOnce(&mut Lane<'_>) -> Result<(), LaneFault>,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `lane`.
    match unsafe { on_lane(lane, f) } {
        Ok(()) => HMM_OK,
        Err(c) => c,
    }
}

/// Loads a `uint32_t` at CPU address `addr` (4-byte aligned) into `*out`.
/// Returns `HMM_OK`; `HMM_DEVICE_FAULT` when the access could not complete
/// (usually a page fault the library will service: return nonzero from
/// the callback at once); `HMM_INVALID_ARGUMENT` for a `NULL` pointer.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback; `out` is
/// `NULL` or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_load_u32(
    lane: *mut hmm_lane,
    addr: u64,
    out: *mut u32,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_load(lane, out, |l| l.load_u32(addr)) }
}

/// Stores a `uint32_t` `v` at CPU address `addr` (4-byte aligned); buffered, it
/// reaches memory when the invocation completes. Returns as the loads do.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_store_u32(
    lane: *mut hmm_lane,
    addr: u64,
    v: u32,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_store(lane, |l| l.store_u32(addr, v)) }
}

/// Loads a `uint64_t` at CPU address `addr` (8-byte aligned) into `*out`.
/// Returns `HMM_OK`; `HMM_DEVICE_FAULT` when the access could not complete
/// (usually a page fault the library will service: return nonzero from
/// the callback at once); `HMM_INVALID_ARGUMENT` for a `NULL` pointer.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback; `out` is
/// `NULL` or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_load_u64(
    lane: *mut hmm_lane,
    addr: u64,
    out: *mut u64,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_load(lane, out, |l| l.load_u64(addr)) }
}

/// Stores a `uint64_t` `v` at CPU address `addr` (8-byte aligned); buffered, it
/// reaches memory when the invocation completes. Returns as the loads do.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_store_u64(
    lane: *mut hmm_lane,
    addr: u64,
    v: u64,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_store(lane, |l| l.store_u64(addr, v)) }
}

/// Loads a `float` at CPU address `addr` (4-byte aligned) into `*out`.
/// Returns `HMM_OK`; `HMM_DEVICE_FAULT` when the access could not complete
/// (usually a page fault the library will service: return nonzero from
/// the callback at once); `HMM_INVALID_ARGUMENT` for a `NULL` pointer.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback; `out` is
/// `NULL` or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_load_f32(
    lane: *mut hmm_lane,
    addr: u64,
    out: *mut f32,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_load(lane, out, |l| l.load_f32(addr)) }
}

/// Stores a `float` `v` at CPU address `addr` (4-byte aligned); buffered, it
/// reaches memory when the invocation completes. Returns as the loads do.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_store_f32(
    lane: *mut hmm_lane,
    addr: u64,
    v: f32,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_store(lane, |l| l.store_f32(addr, v)) }
}

/// Loads a `double` at CPU address `addr` (8-byte aligned) into `*out`.
/// Returns `HMM_OK`; `HMM_DEVICE_FAULT` when the access could not complete
/// (usually a page fault the library will service: return nonzero from
/// the callback at once); `HMM_INVALID_ARGUMENT` for a `NULL` pointer.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback; `out` is
/// `NULL` or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_load_f64(
    lane: *mut hmm_lane,
    addr: u64,
    out: *mut f64,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_load(lane, out, |l| l.load_f64(addr)) }
}

/// Stores a `double` `v` at CPU address `addr` (8-byte aligned); buffered, it
/// reaches memory when the invocation completes. Returns as the loads do.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_store_f64(
    lane: *mut hmm_lane,
    addr: u64,
    v: f64,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { lane_store(lane, |l| l.store_f64(addr, v)) }
}

/// Atomically adds `v` to the `uint32_t` at `addr` (applied at once, not
/// buffered: it is not undone if the invocation is run again); the old
/// value goes to `*old` if not `NULL`. Returns as the loads do.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback; `old` is
/// `NULL` or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_atomic_add_u32(
    lane: *mut hmm_lane,
    addr: u64,
    v: u32,
    old: *mut u32,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `lane`.
    match unsafe { on_lane(lane, |l| l.atomic_add_u32(addr, v)) } {
        Ok(prev) => {
            if !old.is_null() {
                // SAFETY: non-null and writable (the caller's contract).
                unsafe { old.write(prev) };
            }
            HMM_OK
        }
        Err(c) => c,
    }
}

/// The launch's argument `i` as its 64-bit word (a pointer's address, an
/// integer's value, a float's IEEE bits in the low word for `f32`); 0 past
/// the last argument or for a `NULL` lane.
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_arg(lane: *mut hmm_lane, i: u32) -> u64 {
    // SAFETY: the caller's contract on `lane`.
    unsafe { on_lane(lane, |l| Ok(l.args().get(i as usize).copied().unwrap_or(0))) }.unwrap_or(0)
}

/// How many arguments the launch has (0 for a `NULL` lane).
///
/// # Safety
///
/// `lane` is `NULL` or the handle passed to the running callback.
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_nargs(lane: *mut hmm_lane) -> u32 {
    // SAFETY: the caller's contract on `lane`.
    unsafe { on_lane(lane, |l| Ok(l.args().len() as u32)) }.unwrap_or(0)
}

/// Argument `i` read as an `f32` (`HMM_ARG_F32`).
///
/// # Safety
///
/// As [`hmm_lane_arg`].
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_arg_f32(lane: *mut hmm_lane, i: u32) -> f32 {
    // SAFETY: the caller's contract, passed on.
    f32::from_bits(unsafe { hmm_lane_arg(lane, i) } as u32)
}

/// Argument `i` read as an `f64` (`HMM_ARG_F64`).
///
/// # Safety
///
/// As [`hmm_lane_arg`].
#[no_mangle]
pub unsafe extern "C" fn hmm_lane_arg_f64(lane: *mut hmm_lane, i: u32) -> f64 {
    // SAFETY: the caller's contract, passed on.
    f64::from_bits(unsafe { hmm_lane_arg(lane, i) })
}

// ---------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Prefetch, advice, stats
// ---------------------------------------------------------------------------

/// The range `[ptr, ptr + len)`.
fn range(ptr: *const c_void, len: usize) -> Result<VaRange, Error> {
    VaRange::from_start_len(VirtAddr::from_ptr(ptr), len as u64)
        .map_err(|e| Error::invalid(e.to_string()))
}

/// Makes the pages of `[ptr, ptr + len)` resident on the device for
/// reading (or writing, `write` nonzero) without device faults: one bulk
/// copy instead of faults during the next launch. The number of pages made
/// resident goes to `*pages` if not `NULL`. Unmapped or protected memory
/// is `HMM_DEVICE_FAULT`; an empty or overflowing range
/// `HMM_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `m` is `NULL` or a live mirror; `pages` is `NULL` or writable; `st` is
/// `NULL` or valid for writing an `hmm_status`. `ptr` is not dereferenced
/// (any value is safe).
#[no_mangle]
pub unsafe extern "C" fn hmm_prefetch(
    m: *const hmm_mirror,
    ptr: *const c_void,
    len: usize,
    write: c_int,
    pages: *mut u64,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard_code(st, || {
        // SAFETY: the caller's contract on `m`.
        let m = unsafe { mirror_ref(m) }?;
        let n = m.mirror.prefetch(range(ptr, len)?, write != 0)?;
        if !pages.is_null() {
            // SAFETY: the caller's contract on `pages`.
            unsafe { pages.write(n) };
        }
        Ok(())
    })
}

/// Advice on how a range is used ([`hmm_advise`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum hmm_advice {
    /// Forget earlier advice for the range.
    HMM_ADVICE_DEFAULT = 0,
    /// Mostly read, by several devices: read faults map read-only copies
    /// on every mirror that wants one; a write collapses them.
    HMM_ADVICE_READ_MOSTLY = 1,
    /// Accessed in order (`MADV_SEQUENTIAL`): where the fetch policy is
    /// adaptive (the GPU drivers), faults here read ahead.
    HMM_ADVICE_SEQUENTIAL = 2,
    /// Accessed in no order (`MADV_RANDOM`): nothing is fetched
    /// speculatively into or for the range.
    HMM_ADVICE_RANDOM = 3,
    /// Needed soon (`MADV_WILLNEED`): the next launch fetches the range
    /// for reading before its first round, then the advice is spent.
    HMM_ADVICE_WILL_NEED = 4,
}

/// Gives `advice` (an [`hmm_advice`] value) for `[ptr, ptr + len)`.
/// `HMM_INVALID_ARGUMENT` for an unknown advice or a bad range.
///
/// # Safety
///
/// `m` is `NULL` or a live mirror; `st` is `NULL` or valid for writing an
/// `hmm_status`. `ptr` is not dereferenced.
#[no_mangle]
pub unsafe extern "C" fn hmm_advise(
    m: *const hmm_mirror,
    ptr: *const c_void,
    len: usize,
    advice: u32,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard_code(st, || {
        // SAFETY: the caller's contract on `m`.
        let m = unsafe { mirror_ref(m) }?;
        let advice = match advice {
            0 => Advice::Default,
            1 => Advice::ReadMostly,
            2 => Advice::Sequential,
            3 => Advice::Random,
            4 => Advice::WillNeed,
            a => return Err(Error::invalid(format!("unknown advice {a}"))),
        };
        m.mirror.advise(range(ptr, len)?, advice);
        Ok(())
    })
}

/// A mirror's counters ([`hmm_mirror_stats`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct hmm_stats {
    /// Launches.
    pub launches: u64,
    /// Device submissions, replays included.
    pub submissions: u64,
    /// Replay submissions.
    pub replays: u64,
    /// Valid fault records received.
    pub faults: u64,
    /// Fault batches serviced.
    pub fault_batches: u64,
    /// Pages copied CPU → device (zero-copy: mapped).
    pub pages_in: u64,
    /// Pages copied device → CPU.
    pub pages_out: u64,
    /// Pages evicted from a full pool.
    pub evictions: u64,
    /// Pages mapped by prefetch.
    pub prefetched: u64,
    /// Invalidations that reached this mirror, all kinds.
    pub invalidations: u64,
    /// Device calls that failed where the mirror's state depends on them.
    pub device_errors: u64,
    /// Pages currently mapped on the device.
    pub mapped_pages: u64,
    /// Pool slots in use.
    pub pool_used: u64,
    /// Pool slots in all.
    pub pool_capacity: u64,
    /// Table pages in use.
    pub table_pages_used: u64,
}

/// Writes a snapshot of `m`'s counters to `*out`.
///
/// # Safety
///
/// `m` is `NULL` or a live mirror; `out` is `NULL` or writable; `st` is
/// `NULL` or valid for writing an `hmm_status`.
#[no_mangle]
pub unsafe extern "C" fn hmm_mirror_stats(
    m: *const hmm_mirror,
    out: *mut hmm_stats,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard_code(st, || {
        // SAFETY: the caller's contract on `m`.
        let m = unsafe { mirror_ref(m) }?;
        if out.is_null() {
            return Err(Error::invalid("out is NULL"));
        }
        let s = m.mirror.stats();
        let v = hmm_stats {
            launches: s.launches,
            submissions: s.submissions,
            replays: s.replays,
            faults: s.faults,
            fault_batches: s.fault_batches,
            pages_in: s.pages_in,
            pages_out: s.pages_out,
            evictions: s.evictions,
            prefetched: s.prefetched,
            invalidations: s.invalidations_total(),
            device_errors: s.device_errors,
            mapped_pages: s.mapped_pages,
            pool_used: s.pool_used,
            pool_capacity: s.pool_capacity,
            table_pages_used: s.table_pages_used,
        };
        // SAFETY: the caller's contract on `out`.
        unsafe { out.write(v) };
        Ok(())
    })
}

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
