//! Faulting pages in: `MADV_POPULATE_*` one range at a time, batched with
//! `process_madvise` where the kernel allows it, and the fallback for
//! kernels without either (the parent module's docs say how each works
//! and when it is chosen).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{check_access, FaultError, FaultFlags, RangeFaulter};
use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::cpu::sys;
use crate::error::RangeError;
use crate::sync::Ordering;

/// A pidfd of this process for `process_madvise`, and the pid it names:
/// after `fork` the descriptor still names the parent, so a child must not
/// use it (it would populate the parent's pages).
#[derive(Debug)]
pub(super) struct BatchPopulate {
    pidfd: OwnedFd,
    pid: u32,
}

/// Most iovecs one `process_madvise` call takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

impl BatchPopulate {
    /// Opens a pidfd of this process and tries `process_madvise` with
    /// `MADV_POPULATE_READ` and `MADV_POPULATE_WRITE` on two scattered
    /// scratch pages. `None` where the kernel lacks either syscall
    /// (before 5.3 / 5.10) or refuses the advice through it (before 6.13
    /// only a few advices were allowed).
    pub(super) fn probe() -> Result<Self, String> {
        let pid = std::process::id();
        // SAFETY: `pidfd_open` takes a pid and flags and returns a new
        // descriptor or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(format!("pidfd_open: {}", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a descriptor just returned to us and owned by
        // nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let b = BatchPopulate { pidfd, pid };
        let m = crate::cpu::scratch::ScratchMap::new(3).map_err(|e| format!("mmap failed: {e}"))?;
        let iov = [
            libc::iovec {
                iov_base: m.ptr(),
                iov_len: PAGE_SIZE as usize,
            },
            libc::iovec {
                iov_base: m.ptr().wrapping_byte_add(2 * PAGE_SIZE as usize),
                iov_len: PAGE_SIZE as usize,
            },
        ];
        for (advice, name) in [
            (sys::MADV_POPULATE_READ, "MADV_POPULATE_READ"),
            (sys::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE"),
        ] {
            match b.call(&iov, advice) {
                Ok(n) if n == 2 * PAGE_SIZE as usize => {}
                Ok(n) => return Err(format!("process_madvise({name}) advised {n} of 8192 bytes")),
                Err(e) => {
                    return Err(format!(
                        "process_madvise({name}): {}",
                        io::Error::from_raw_os_error(e)
                    ))
                }
            }
        }
        Ok(b)
    }

    /// One `process_madvise` call: the bytes advised, or the error.
    fn call(&self, iov: &[libc::iovec], advice: libc::c_int) -> Result<usize, i32> {
        // SAFETY: `iov` holds `iov.len()` initialised iovecs the kernel only
        // reads; the advice is MADV_POPULATE_*, which faults pages in as an
        // access would (errors returned, no signal) and never changes
        // memory contents Rust can see; `self.pidfd` names this process
        // (checked by the caller after a fork).
        let r = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                self.pidfd.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                advice,
                0u32,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r as usize)
        }
    }
}

impl RangeFaulter {
    /// Faults in every page of `runs` (each page aligned, user half, in any
    /// order) for reading, or for writing with `write`, as
    /// [`RangeFaulter::range_fault`]'s populate step would, without taking
    /// snapshots: for callers with many scattered pages (a batch of device
    /// faults), which then snapshot each run with nothing left to populate.
    ///
    /// Where the kernel allows `process_madvise(MADV_POPULATE_*)` on this
    /// process (Linux 6.13+), up to 1024 runs go in one call, one iovec
    /// each (0.34 µs per scattered resident page against 0.84 µs for one
    /// `madvise` each, `perf-lab/snap.c`). Otherwise, and for every run of
    /// a call that did not complete (an error, or fewer bytes than asked),
    /// each run is populated with the per-range path `range_fault` uses, so
    /// errors are exactly that path's: [`FaultError::Unmapped`],
    /// [`FaultError::ReadOnly`], [`FaultError::Populate`], … for the first
    /// failing run. No access check is made before populating: a run in a
    /// hole or a read-only mapping is simply the one that fails.
    pub fn populate_runs(&self, runs: &[VaRange], write: bool) -> Result<(), FaultError> {
        for r in runs {
            if !r.start().is_page_aligned() || !r.end().is_page_aligned() {
                return Err(RangeError::Unaligned {
                    start: r.start().0,
                    end: r.end().0,
                }
                .into());
            }
            r.user()?;
        }
        let batch = self
            .batch
            .as_ref()
            .filter(|b| self.batch_populate() && b.pid == std::process::id());
        let Some(b) = batch else {
            return runs.iter().try_for_each(|r| self.populate(*r, write));
        };
        let advice = if write {
            sys::MADV_POPULATE_WRITE
        } else {
            sys::MADV_POPULATE_READ
        };
        let mut iov = Vec::with_capacity(runs.len().min(IOV_MAX));
        for chunk in runs.chunks(IOV_MAX) {
            iov.clear();
            iov.extend(chunk.iter().map(|r| libc::iovec {
                iov_base: r.start().as_mut_ptr(),
                iov_len: r.len() as usize,
            }));
            let want: u64 = chunk.iter().map(|r| r.len()).sum();
            // Relaxed: a statistics counter.
            self.batch_calls.fetch_add(1, Ordering::Relaxed);
            let done = match b.call(&iov, advice) {
                Ok(n) => n as u64,
                Err(_) => 0,
            };
            if done == want {
                continue;
            }
            // Incomplete: the runs fully advised are done (iovecs are taken
            // in order); every other run of the chunk goes through the
            // per-range path, which retries what is transient and reports
            // what is not exactly as `range_fault` does.
            let mut left = done;
            for r in chunk {
                if left >= r.len() {
                    left -= r.len();
                    continue;
                }
                left = 0;
                self.populate(*r, write)?;
            }
        }
        Ok(())
    }

    pub(super) fn populate(&self, r: VaRange, write: bool) -> Result<(), FaultError> {
        // Relaxed: a statistics counter.
        self.populates.fetch_add(1, Ordering::Relaxed);
        // Relaxed: a once-set capability flag; a stale read only picks the slower fallback once.
        if self.madvise.load(Ordering::Relaxed) {
            let advice = if write {
                sys::MADV_POPULATE_WRITE
            } else {
                sys::MADV_POPULATE_READ
            };
            let mut retries = 0;
            loop {
                // SAFETY: `madvise` only changes page-table state of
                // `[r.start, r.end)`; with MADV_POPULATE_* it faults pages in
                // exactly as an access would, and reports failure by errno
                // instead of a signal. It does not touch Rust-visible memory
                // contents, so no aliasing rule is involved; the range is a
                // checked, page-aligned user range.
                let rc = unsafe { libc::madvise(r.start().as_mut_ptr(), r.len() as usize, advice) };
                if rc == 0 {
                    return Ok(());
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) if retries < 16 => retries += 1,
                    _ => return Err(self.explain(r, write, e)),
                }
            }
        } else {
            self.touch_populate(r, write)
        }
    }

    /// Turns a populate failure into the error the kernel's checks would
    /// give, after refreshing the (possibly stale) mapping knowledge.
    pub(super) fn explain(&self, r: VaRange, write: bool, e: io::Error) -> FaultError {
        if let Some(fe) = self.recheck(r, write) {
            return fe;
        }
        if e.raw_os_error() == Some(libc::EINVAL) {
            return FaultError::BadPage { addr: r.start() };
        }
        FaultError::Populate {
            range: r,
            source: e,
        }
    }

    /// Re-reads the map for `r` and returns the access error the kernel
    /// would report there, if any.
    pub(super) fn recheck(&self, r: VaRange, write: bool) -> Option<FaultError> {
        self.maps.invalidate(r);
        match self.maps.segments(r) {
            Ok(segs) => check_access(&segs, FaultFlags { fault: true, write }).err(),
            Err(me) => Some(me.into()),
        }
    }

    /// The fallback populate; see the module docs.
    pub(super) fn touch_populate(&self, r: VaRange, write: bool) -> Result<(), FaultError> {
        if write {
            // Never write through a stale permission: re-read the map.
            self.maps.invalidate(r);
            check_access(&self.maps.segments(r)?, FaultFlags::WRITE)?;
        }
        const BATCH: usize = 1024; // IOV_MAX
        let mut sink = [0u8; BATCH];
        let mut remote = [libc::iovec {
            iov_base: core::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        let mut addrs = r.page_addrs().peekable();
        while addrs.peek().is_some() {
            let mut n = 0;
            for a in addrs.by_ref().take(BATCH) {
                remote[n] = libc::iovec {
                    iov_base: a.as_mut_ptr(),
                    iov_len: 1,
                };
                n += 1;
            }
            let first = VirtAddr(remote[0].iov_base as u64);
            let local = libc::iovec {
                iov_base: sink.as_mut_ptr().cast(),
                iov_len: n,
            };
            // SAFETY: `local` describes `sink`, a live stack buffer of at
            // least `n` bytes that nothing else accesses during the call.
            // `remote` holds `n` initialised iovecs; the kernel only reads
            // through them (with fault handling, returning EFAULT on
            // failure), and it reads this process's own memory, which is
            // always permitted.
            let got = unsafe {
                libc::process_vm_readv(libc::getpid(), &local, 1, remote.as_ptr(), n as _, 0)
            };
            if got < 0 || (got as usize) < n {
                let done = got.max(0) as u64;
                let at = VirtAddr(first.0 + (done << PAGE_SHIFT));
                let e = if got < 0 {
                    io::Error::last_os_error()
                } else {
                    io::Error::from_raw_os_error(libc::EFAULT)
                };
                let piece = VaRange::new(at, r.end()).unwrap_or(r);
                return Err(self.explain(piece, write, e));
            }
            if write {
                for iov in &remote[..n] {
                    let p = iov.iov_base.cast::<u8>();
                    // SAFETY: `p` is in a mapping that a fresh read of
                    // /proc/self/maps showed readable and writable, and the
                    // kernel just read it successfully; `touch_write`'s
                    // contract. The caveat (a concurrent munmap/mprotect by
                    // another thread would raise SIGSEGV) is documented on
                    // the module.
                    unsafe { touch_write(p) };
                }
            }
        }
        Ok(())
    }
}

/// Writes the byte at `p` without changing it, in a way no compiler may
/// remove and no concurrent writer can lose: a locked `or` of 0 on x86-64,
/// a `compare_exchange(v, v)` loop elsewhere.
///
/// Why not `AtomicU8::fetch_add(0, Relaxed)`: its result is unused and its
/// value is unchanged, so LLVM folds it (at `-O`, not in debug) into a
/// compiler barrier or a plain load — no store, no write fault, and the
/// page never becomes writable (the release-only failure of
/// `touch_populate_fallback`). A compare-exchange that succeeds is a store
/// the optimiser must keep (its success depends on memory), and inline
/// assembly is opaque to it.
///
/// # Safety
///
/// `p` must point into a mapping that is readable and writable for the
/// whole call (another thread unmapping or write-protecting it raises
/// SIGSEGV, as any write would).
#[doc(hidden)]
pub unsafe fn touch_write(p: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a one-byte locked read-modify-write of `p`, which the
        // caller guarantees is mapped readable and writable; `or 0` leaves
        // the value as it was and the `lock` prefix makes the whole RMW
        // atomic, so a concurrent writer's store is never overwritten with
        // an older value. The asm touches no register but flags.
        unsafe {
            core::arch::asm!("lock or byte ptr [{p}], 0", p = in(reg) p, options(nostack));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use core::sync::atomic::{AtomicU8, Ordering};
        // SAFETY: the caller guarantees `p` is mapped readable and
        // writable; `AtomicU8` has the size and alignment of `u8`.
        let a = unsafe { AtomicU8::from_ptr(p) };
        // Relaxed: only the write access matters (it takes the fault and
        // dirties the page); no other memory is ordered by it.
        let mut v = a.load(Ordering::Relaxed);
        while let Err(now) = a.compare_exchange_weak(v, v, Ordering::Relaxed, Ordering::Relaxed) {
            v = now;
        }
    }
}

/// Whether `process_madvise(MADV_POPULATE_*)` works on this process
/// ([`RangeFaulter::populate_runs`]), or why not.
pub(crate) fn probe_populate_batch() -> Result<(), String> {
    BatchPopulate::probe().map(drop)
}

/// Whether `MADV_POPULATE_READ` exists: try it on a fresh page.
pub(super) fn probe_madvise_populate() -> bool {
    let Ok(m) = crate::cpu::scratch::ScratchMap::new(1) else {
        return false;
    };
    // SAFETY: advice on the scratch mapping we own, whole and nothing else.
    let rc = unsafe { libc::madvise(m.ptr(), m.len(), sys::MADV_POPULATE_READ) };
    rc == 0
}
