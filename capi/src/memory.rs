//! Prefetch, advice and statistics.

use super::*;

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

/// The migration calls' common part: `f` on the range, its page count to
/// `*pages` if not `NULL`.
///
/// # Safety
///
/// As for [`hmm_migrate_to_device`].
unsafe fn migration_call(
    m: *const hmm_mirror,
    ptr: *const c_void,
    len: usize,
    pages: *mut u64,
    st: *mut hmm_status,
    f: impl FnOnce(&Mirror<Device>, VaRange) -> Result<u64, MirrorError>,
) -> hmm_status_code {
    // SAFETY: the caller's contract on `st`.
    let st = unsafe { StatusOut::new(st) };
    guard_code(st, || {
        // SAFETY: the caller's contract on `m`.
        let m = unsafe { mirror_ref(m) }?;
        let n = f(&m.mirror, range(ptr, len)?)?;
        if !pages.is_null() {
            // SAFETY: the caller's contract on `pages`.
            unsafe { pages.write(n) };
        }
        Ok(())
    })
}

/// Migrates `[ptr, ptr + len)` to the device (device-private migration):
/// afterwards the device holds the only copy, launches neither scan nor
/// write it back, and the first CPU access to a page (any thread) waits
/// while the mirror gives it back. The pages migrated go to `*pages` if
/// not `NULL`. `HMM_UNSUPPORTED` where it cannot (no userfaultfd support,
/// shared or file memory, a zero-copy device, several mirrors; nothing is
/// moved), `HMM_OUT_OF_MEMORY` for a range larger than the pool,
/// `HMM_DEVICE_FAULT` for unmapped memory. A `read(2)` into migrated
/// memory may fail with `EFAULT` (`hmm-bench info` says whether).
///
/// # Safety
///
/// `m` is `NULL` or a live mirror; `pages` is `NULL` or writable; `st` is
/// `NULL` or valid for writing an `hmm_status`. `ptr` is not dereferenced.
#[no_mangle]
pub unsafe extern "C" fn hmm_migrate_to_device(
    m: *const hmm_mirror,
    ptr: *const c_void,
    len: usize,
    pages: *mut u64,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { migration_call(m, ptr, len, pages, st, |m, r| m.migrate_to_device(r)) }
}

/// Brings the migrated pages of `[ptr, ptr + len)` back to the CPU (they
/// stay on the device as copies). The pages brought back go to `*pages`
/// if not `NULL`.
///
/// # Safety
///
/// As for [`hmm_migrate_to_device`].
#[no_mangle]
pub unsafe extern "C" fn hmm_migrate_to_host(
    m: *const hmm_mirror,
    ptr: *const c_void,
    len: usize,
    pages: *mut u64,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { migration_call(m, ptr, len, pages, st, |m, r| m.migrate_to_host(r)) }
}

/// Makes `[ptr, ptr + len)` exclusive to the device, for device atomics:
/// migrated as by [`hmm_migrate_to_device`], and the first CPU access to
/// a page revokes the device's access to it (the device faults and
/// fetches the CPU's copy next time). Errors as for
/// [`hmm_migrate_to_device`].
///
/// # Safety
///
/// As for [`hmm_migrate_to_device`].
#[no_mangle]
pub unsafe extern "C" fn hmm_make_exclusive(
    m: *const hmm_mirror,
    ptr: *const c_void,
    len: usize,
    pages: *mut u64,
    st: *mut hmm_status,
) -> hmm_status_code {
    // SAFETY: the caller's contract, passed on.
    unsafe { migration_call(m, ptr, len, pages, st, |m, r| m.make_exclusive(r)) }
}

/// The pages of `[ptr, ptr + len)` the device holds exclusively now, to
/// `*pages` (not `NULL`).
///
/// # Safety
///
/// As for [`hmm_migrate_to_device`].
#[no_mangle]
pub unsafe extern "C" fn hmm_exclusive_pages(
    m: *const hmm_mirror,
    ptr: *const c_void,
    len: usize,
    pages: *mut u64,
    st: *mut hmm_status,
) -> hmm_status_code {
    if pages.is_null() {
        // SAFETY: the caller's contract on `st`.
        let st = unsafe { StatusOut::new(st) };
        return guard_code(st, || Err(Error::invalid("pages is NULL")));
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { migration_call(m, ptr, len, pages, st, |m, r| m.exclusive_in(r)) }
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
    /// Prefer the device (CUDA's preferred location): pages of the range
    /// resident on the device when a launch ends migrate there, as by
    /// [`hmm_migrate_to_device`]; memory that cannot migrate stays (counted
    /// in `hmm_stats.preferred_refused`).
    HMM_ADVICE_PREFER_DEVICE = 5,
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
            5 => Advice::PreferDevice,
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
    /// Pages migrated to the device ([`hmm_migrate_to_device`]).
    pub migrated_out: u64,
    /// Migrated pages given back to the CPU.
    pub migrated_in: u64,
    /// CPU faults on migrated pages served.
    pub fault_backs: u64,
    /// Exclusive pages a CPU touch revoked ([`hmm_make_exclusive`]).
    pub exclusive_revoked: u64,
    /// Runs advised `HMM_ADVICE_PREFER_DEVICE` that could not migrate.
    pub preferred_refused: u64,
    /// Of `fault_backs`, faults answered by the event monitor's reader the
    /// moment it read them (no thread hand-off; the `cpu` driver).
    pub fault_backs_on_reader: u64,
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
            migrated_out: s.migrated_out,
            migrated_in: s.migrated_in,
            fault_backs: s.fault_backs,
            exclusive_revoked: s.exclusive_revoked,
            preferred_refused: s.preferred_refused,
            fault_backs_on_reader: s.fault_backs_on_reader,
        };
        // SAFETY: the caller's contract on `out`.
        unsafe { out.write(v) };
        Ok(())
    })
}
