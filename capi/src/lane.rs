//! A CPU kernel's lane: typed loads, stores and atomics on mirrored memory, and its arguments.

use super::*;

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
