//! Devices: opening one by driver name, its driver and note, freeing it.

use super::*;

/// An opened device (opaque). From [`hmm_device_open`]; consumed by
/// [`hmm_mirror_new`] or freed with [`hmm_device_free`].
pub struct hmm_device {
    pub(crate) device: Device,
    note: CString,
}

/// A C string of `s` (interior NULs dropped).
fn c_string(s: String) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// The driver's name as a static C string.
pub(crate) fn driver_name(d: Driver) -> &'static CStr {
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
