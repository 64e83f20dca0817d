//! Mirrors: configuration, creation over a device, freeing, limits.

use super::*;

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
    pub(crate) mirror: Arc<Mirror<Device>>,
    pub(crate) driver: Driver,
}

/// Borrows a mirror handle.
///
/// # Safety
///
/// `m` is `NULL` or a live handle from [`hmm_mirror_new`].
pub(crate) unsafe fn mirror_ref<'a>(m: *const hmm_mirror) -> Result<&'a hmm_mirror, Error> {
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
