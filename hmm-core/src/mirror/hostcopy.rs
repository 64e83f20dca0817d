//! Copies between CPU memory and staging buffers that survive the CPU page
//! disappearing underneath.
//!
//! The kernel delivers userfaultfd `UNMAP` events *after* the pages are
//! gone, so between an application's `munmap` and the invalidation that
//! follows, a fault service may try to read a page `range_fault` saw a
//! moment ago, and a write-back may target one. A plain `memcpy` would
//! raise SIGSEGV there. Two ways to copy anyway, same results:
//!
//! - the recoverable copy ([`crate::cpu::safecopy`]): an exception-table
//!   `rep movsb` whose faults on the application's side become errors with
//!   exact progress. Used whenever [`Recoverable::check`] allows it for the
//!   batch (checked once per call of these functions), for every page the
//!   caller's `plain` says is ordinary memory
//!   ([`crate::cpu::maps::Mapping::plain_copy_ok`]);
//! - `process_vm_readv` / `process_vm_writev` on our own pid: the kernel
//!   does the copy and reports `EFAULT` for a missing page. Used for the
//!   rest: I/O / PFN mappings and secret memory (which the kernel refuses,
//!   so such a page reads as failed), and whole batches when the
//!   recoverable copy is off (`HMM_SAFE_COPY=syscall`, another fault
//!   handler, blocked signals, not x86-64). Each call moves up to `IOV_MAX`
//!   (1024) pages; the kernel stops at the first bad page and reports how
//!   many bytes it moved, so the copy is resumed after the bad page and
//!   every bad page is reported.
//!
//! Either way a page that cannot be read is reported (`ok[k] = false`,
//! its destination zeroed); a run that cannot be written is skipped if its
//! memory is gone and reported as refused if its memory is still there
//! but not writable ([`RunFate`]: the caller keeps such data); a hardware
//! memory error in a page counts as a page that cannot be read.
//!
//! Gone or refused is decided after the failure, by a fresh look at the
//! mappings (the caller's `refused`; for [`HostSpace`] the mapping cache
//! forced to re-read `/proc/self/maps` for that page): a mapping that
//! still covers the address and lacks `PROT_WRITE` refuses; no mapping
//! (or one that is writable, i.e. a file page past the end of its file)
//! means the memory is gone. The fault handler's `si_code`
//! (`SEGV_ACCERR` vs `SEGV_MAPERR`) would tell the same for the
//! recoverable copy, but not for `process_vm_writev`, which says `EFAULT`
//! for both; one rule for both paths, paid only when a write fails.
//!
//! [`HostSpace`]: crate::cpu::host::HostSpace
//!
//! Which mappings are ordinary comes from the mapping cache, so it is as
//! fresh as the cache: in the residual window the `residency::copy` docs
//! describe (memory unmapped and mapped again by another thread before
//! the unmap event is read) a new mapping is copied the way the old one
//! was classified.

use crate::addr::{VirtAddr, PAGE_SIZE};
use crate::cpu::safecopy::Recoverable;

const IOV_MAX: usize = 1024;
const PAGE: usize = PAGE_SIZE as usize;

/// Reads the pages at `srcs` (page-aligned CPU addresses) into consecutive
/// 4 KiB chunks of `staging` (which must hold `srcs.len()` pages). Returns,
/// per page, whether it was read; an unreadable page's chunk is zeroed.
/// `plain(a)`: whether the page at `a` may be read by a plain CPU copy.
pub(crate) fn read_pages(
    srcs: &[VirtAddr],
    staging: &mut [u8],
    ok: &mut Vec<bool>,
    plain: &mut dyn FnMut(VirtAddr) -> bool,
) {
    let staging = &mut staging[..srcs.len() * PAGE];
    let dsts: Vec<*mut u8> = staging
        .chunks_exact_mut(PAGE)
        .map(|c| c.as_mut_ptr())
        .collect();
    // SAFETY: each pointer is a distinct 4 KiB chunk of `staging`, which we
    // borrow mutably for the call and do not touch otherwise meanwhile.
    unsafe { read_pages_to(srcs, &dsts, ok, plain) }
}

/// Reads the page at `srcs[k]` into the 4 KiB at `dsts[k]` (for example a
/// host-addressable pool slot). Returns, per page, whether it was read; an
/// unreadable page's destination is zeroed. `plain` as for [`read_pages`].
///
/// # Safety
///
/// Every `dsts[k]` is valid for writes of 4096 bytes, the destinations are
/// pairwise disjoint and disjoint from every source page, and nothing else
/// reads or writes them during the call.
pub(crate) unsafe fn read_pages_to(
    srcs: &[VirtAddr],
    dsts: &[*mut u8],
    ok: &mut Vec<bool>,
    plain: &mut dyn FnMut(VirtAddr) -> bool,
) {
    ok.clear();
    ok.resize(srcs.len(), false);
    let Ok(rc) = Recoverable::check() else {
        // SAFETY: the caller's contract is `sys_read_pages_to`'s.
        unsafe { sys_read_pages_to(srcs, dsts, ok) };
        return;
    };
    let mut slow = Vec::new();
    let mut i = 0;
    while i < srcs.len() {
        if !plain(srcs[i]) {
            slow.push(i);
            i += 1;
            continue;
        }
        // One copy for a run of pages consecutive on both sides.
        let mut j = i + 1;
        while j < srcs.len()
            && srcs[j].0 == srcs[j - 1].0 + PAGE_SIZE
            && dsts[j] == dsts[j - 1].wrapping_add(PAGE)
            && plain(srcs[j])
        {
            j += 1;
        }
        // SAFETY: `dsts[i..j]` are consecutive, so `dsts[i]` is valid for
        // `(j - i) * 4096` bytes of writes nothing else touches (caller);
        // the sources are disjoint from them (caller) and ordinary memory
        // or unmapped (`plain`).
        let r = unsafe { rc.copy_in(dsts[i], srcs[i].0 as usize as *const u8, (j - i) * PAGE) };
        match r {
            Ok(()) => {
                ok[i..j].fill(true);
                i = j;
            }
            Err(e) => {
                // Pages before the one that failed are whole; that one
                // (perhaps partly copied) is reported and zeroed.
                let bad = i + e.copied() / PAGE;
                ok[i..bad].fill(true);
                // SAFETY: `dsts[bad]` is valid for 4096 bytes of writes.
                unsafe { std::ptr::write_bytes(dsts[bad], 0, PAGE) };
                i = bad + 1;
            }
        }
    }
    if !slow.is_empty() {
        let s: Vec<VirtAddr> = slow.iter().map(|&k| srcs[k]).collect();
        let d: Vec<*mut u8> = slow.iter().map(|&k| dsts[k]).collect();
        let mut o = Vec::with_capacity(slow.len());
        // SAFETY: a subset of the caller's pages and destinations, under
        // the same contract.
        unsafe { sys_read_pages_to(&s, &d, &mut o) };
        for (x, &k) in slow.iter().enumerate() {
            ok[k] = o[x];
        }
    }
}

/// [`read_pages_to`] through `process_vm_readv`, `IOV_MAX` pages per
/// system call.
///
/// # Safety
///
/// As for [`read_pages_to`].
unsafe fn sys_read_pages_to(srcs: &[VirtAddr], dsts: &[*mut u8], ok: &mut Vec<bool>) {
    ok.clear();
    ok.resize(srcs.len(), false);
    let mut i = 0;
    while i < srcs.len() {
        let n = (srcs.len() - i).min(IOV_MAX);
        let local = coalesce(dsts[i..i + n].iter().map(|d| (d.cast(), PAGE)));
        let remote = coalesce(srcs[i..i + n].iter().map(|a| (a.as_mut_ptr(), PAGE)));
        // SAFETY: `local` describes `n` disjoint writable 4 KiB
        // destinations nothing else touches (caller); `remote` names
        // addresses in our own process that the kernel validates itself (a
        // missing page is an EFAULT, not a crash).
        let got = unsafe {
            libc::process_vm_readv(
                libc::getpid(),
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        let full = if got < 0 { 0 } else { got as usize / PAGE };
        for k in 0..full {
            ok[i + k] = true;
        }
        if full < n {
            // Page i+full is bad (or the copy was cut short inside it).
            let bad = i + full;
            // SAFETY: `dsts[bad]` is valid for 4096 bytes of writes (caller).
            unsafe { std::ptr::write_bytes(dsts[bad], 0, PAGE) };
            i = bad + 1;
        } else {
            i += n;
        }
    }
}

/// `(address, len)` pieces as iovecs, adjacent pieces merged: the kernel
/// pins the remote pages of one iovec under one `mmap_lock` round trip,
/// so a run of consecutive pages costs one lookup instead of one per page
/// (half the time of a large copy went to per-iovec overhead). Both sides
/// of a `process_vm_*` call are consumed in order, byte by byte, so
/// merging either side leaves the byte count returned — and what it says
/// about which pieces were moved — unchanged.
fn coalesce(pieces: impl Iterator<Item = (*mut libc::c_void, usize)>) -> Vec<libc::iovec> {
    let mut v: Vec<libc::iovec> = Vec::new();
    for (base, len) in pieces {
        if let Some(last) = v.last_mut() {
            if (last.iov_base as usize).wrapping_add(last.iov_len) == base as usize {
                last.iov_len += len;
                continue;
            }
        }
        v.push(libc::iovec {
            iov_base: base,
            iov_len: len,
        });
    }
    v
}

/// The byte runs where `new` differs from `old` (equal lengths), as
/// `(offset, len)`, appended to `out`. Works a 64-bit word at a time: a
/// word whose bytes all compare equal (or all differ) extends or skips the
/// current state without a byte loop, so an unchanged page costs about a
/// `memcmp` and a wholly rewritten page not much more; only words mixing
/// equal and different bytes are looked at byte by byte.
pub(crate) fn diff_runs(old: &[u8], new: &[u8], out: &mut Vec<(usize, usize)>) {
    const HI: u64 = 0x8080_8080_8080_8080;
    let n = old.len().min(new.len());
    let words = n / 8;
    let mut run: Option<usize> = None;
    let word = |b: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(w)
    };
    let mut i = 0;
    while i < words {
        if run.is_none() {
            // Skip equal 64-byte blocks wholesale.
            let blk = (i * 8 + 64).min(words * 8);
            if old[i * 8..blk] == new[i * 8..blk] {
                i = blk / 8;
                continue;
            }
        }
        let x = word(old, i) ^ word(new, i);
        // Exact "some byte of x is zero" test: no carries cross bytes.
        let some_equal = ((x & !HI).wrapping_add(!HI) | x) & HI != HI;
        if x == 0 {
            if let Some(s) = run.take() {
                out.push((s, i * 8 - s));
            }
        } else if !some_equal {
            run.get_or_insert(i * 8);
        } else {
            byte_runs(old, new, i * 8, i * 8 + 8, &mut run, out);
        }
        i += 1;
    }
    byte_runs(old, new, words * 8, n, &mut run, out);
    if let Some(s) = run {
        out.push((s, n - s));
    }
}

/// [`diff_runs`]' byte loop over `from..to`, continuing `run`.
fn byte_runs(
    old: &[u8],
    new: &[u8],
    from: usize,
    to: usize,
    run: &mut Option<usize>,
    out: &mut Vec<(usize, usize)>,
) {
    for k in from..to {
        match (old[k] != new[k], *run) {
            (true, None) => *run = Some(k),
            (false, Some(s)) => {
                out.push((s, k - s));
                *run = None;
            }
            _ => {}
        }
    }
}

/// Writes each `(dst, bytes)` run to CPU memory and says, per run, what
/// became of it (`fates`, cleared first, one per run): written, skipped
/// because its memory is gone, or refused. `plain` as for [`read_pages`].
/// `refused(addr)` is asked about the first byte a failed run could not
/// write: whether that memory exists but refuses the write (the caller
/// looks it up fresh); if not, the memory is gone and the run is skipped,
/// as an unmapped page must be. The caller checked under the driver lock
/// that the runs belong to the mirrored range, and no run overlaps the
/// bytes of another. A refused run may have been written in part (up to
/// the page that refused); writing it again writes the same bytes.
pub(crate) fn write_runs(
    runs: &[(VirtAddr, &[u8])],
    plain: &mut dyn FnMut(VirtAddr) -> bool,
    refused: &mut dyn FnMut(VirtAddr) -> bool,
    fates: &mut Vec<RunFate>,
) {
    fates.clear();
    let mut failed: Vec<Option<VirtAddr>> = vec![None; runs.len()];
    match Recoverable::check() {
        Err(_) => sys_write_runs(runs, &mut failed),
        Ok(rc) => {
            let mut slow = Vec::new();
            for (k, (dst, bytes)) in runs.iter().enumerate() {
                let pages = dst.page_down().0..dst.0 + bytes.len() as u64;
                if !pages.step_by(PAGE).all(|p| plain(VirtAddr(p))) {
                    slow.push(k);
                    continue;
                }
                // SAFETY: the source is a borrowed byte slice (our staging,
                // pool or twin memory), not CPU memory of the mirrored
                // range; the destination is application memory in ordinary
                // mappings (`plain`) that the mirror is allowed to
                // overwrite (caller), and may vanish or be protected under
                // the copy (then the copy stops and says where).
                let r =
                    unsafe { rc.copy_out(dst.0 as usize as *mut u8, bytes.as_ptr(), bytes.len()) };
                if let Err(e) = r {
                    failed[k] = Some(VirtAddr(dst.0 + e.copied() as u64));
                }
            }
            let s: Vec<(VirtAddr, &[u8])> = slow.iter().map(|&k| runs[k]).collect();
            let mut f = vec![None; s.len()];
            sys_write_runs(&s, &mut f);
            for (x, &k) in slow.iter().enumerate() {
                failed[k] = f[x];
            }
        }
    }
    fates.extend(failed.iter().map(|f| match f {
        None => RunFate::Written,
        Some(at) if refused(*at) => RunFate::Refused(*at),
        Some(_) => RunFate::Gone,
    }));
}

/// What became of one run `write_runs` was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunFate {
    /// Every byte reached CPU memory.
    Written,
    /// Its memory is gone (unmapped, or a file page past the end of its
    /// file): skipped, as a write to memory no one can read any more.
    Gone,
    /// Its memory exists but refused the write at this address (a mapping
    /// made read-only, or `PROT_NONE`): nothing may be dropped.
    Refused(VirtAddr),
}

/// [`write_runs`] through `process_vm_writev`, `IOV_MAX` runs per system
/// call: `failed[k]` is set to the first address run `k` could not write.
fn sys_write_runs(runs: &[(VirtAddr, &[u8])], failed: &mut [Option<VirtAddr>]) {
    let mut i = 0;
    while i < runs.len() {
        let n = (runs.len() - i).min(IOV_MAX);
        let local = coalesce(
            runs[i..i + n]
                .iter()
                .map(|(_, b)| (b.as_ptr().cast_mut().cast(), b.len())),
        );
        let remote = coalesce(
            runs[i..i + n]
                .iter()
                .map(|(a, b)| (a.as_mut_ptr(), b.len())),
        );
        // SAFETY: `local` only describes the borrowed byte slices, which the
        // kernel reads; the remote side is our own address space, checked
        // by the kernel (EFAULT for missing or read-only pages); the caller
        // checked under the driver lock that the runs belong to the
        // mirrored range.
        let put = unsafe {
            libc::process_vm_writev(
                libc::getpid(),
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        // Count whole runs moved; resume after the run that failed.
        let mut left = if put < 0 { 0 } else { put as usize };
        let mut k = 0;
        while k < n && left >= runs[i + k].1.len() {
            left -= runs[i + k].1.len();
            k += 1;
        }
        if k < n {
            failed[i + k] = Some(VirtAddr(runs[i + k].0 .0 + left as u64));
        }
        i += if k < n { k + 1 } else { n };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn diff_finds_exact_changed_runs() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[0] = 1;
        new[100..108].fill(2);
        new[4095] = 3;
        let mut runs = Vec::new();
        super::diff_runs(&old, &new, &mut runs);
        assert_eq!(runs, vec![(0, 1), (100, 8), (4095, 1)]);
        runs.clear();
        super::diff_runs(&old, &old, &mut runs);
        assert!(runs.is_empty());
    }

    use super::*;

    /// The byte-by-byte definition `diff_runs` must agree with.
    fn naive(old: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut run = None;
        byte_runs(old, new, 0, old.len(), &mut run, &mut out);
        if let Some(s) = run {
            out.push((s, old.len() - s));
        }
        out
    }

    #[test]
    fn diff_agrees_with_the_byte_loop() {
        // Deterministic pseudo-random pages: unchanged, wholly rewritten,
        // sparse bytes, runs crossing words and blocks, odd lengths, and
        // bytes whose xor has its high bit set (the zero-byte test's trap).
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..400 {
            let len = if case % 7 == 0 {
                4096 - (case % 13)
            } else {
                4096
            };
            let old: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let mut new = old.clone();
            match case % 5 {
                0 => {}
                1 => new.iter_mut().for_each(|b| *b = !*b),
                2 => {
                    for _ in 0..(rnd() % 50) {
                        let k = (rnd() as usize) % len;
                        new[k] ^= 0x80 | (rnd() as u8);
                    }
                }
                3 => {
                    for _ in 0..(rnd() % 6) {
                        let a = (rnd() as usize) % len;
                        let b = (a + (rnd() as usize) % 300).min(len);
                        for byte in &mut new[a..b] {
                            *byte = byte.wrapping_add(1 + (rnd() as u8) % 255);
                        }
                    }
                }
                _ => {
                    for (k, byte) in new.iter_mut().enumerate() {
                        if (k / 3 + case) % 4 == 0 {
                            *byte ^= 0x80;
                        }
                    }
                }
            }
            let mut got = Vec::new();
            diff_runs(&old, &new, &mut got);
            assert_eq!(got, naive(&old, &new), "case {case}");
        }
    }

    /// Three pages, the middle one unmapped: read and written with
    /// `plain` answering `route(page index)`; checks the documented
    /// results. Returns the mapping's base (pages 0 and 2 still mapped).
    fn three_pages_one_gone(route: &dyn Fn(usize) -> bool) {
        let len = 3 * PAGE;
        // SAFETY: fresh private anonymous mapping owned by this test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        // SAFETY: the mapping is ours and 3 pages long.
        unsafe {
            std::ptr::write_bytes(p.cast::<u8>(), 7, len);
            libc::munmap((base + PAGE as u64) as *mut libc::c_void, PAGE);
        }
        let addrs = [
            VirtAddr(base),
            VirtAddr(base + PAGE as u64),
            VirtAddr(base + 2 * PAGE as u64),
        ];
        let mut plain = |a: VirtAddr| route(((a.0 - base) / PAGE as u64) as usize);
        let mut staging = vec![1u8; 3 * PAGE];
        let mut ok = Vec::new();
        read_pages(&addrs, &mut staging, &mut ok, &mut plain);
        assert_eq!(ok, [true, false, true]);
        assert!(staging[..PAGE].iter().all(|&b| b == 7));
        assert!(staging[PAGE..2 * PAGE].iter().all(|&b| b == 0));
        assert!(staging[2 * PAGE..].iter().all(|&b| b == 7));
        staging.fill(9);
        let mut runs: Vec<(VirtAddr, &[u8])> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (*a, &staging[i * PAGE..(i + 1) * PAGE]))
            .collect();
        // A run crossing from page 0 into the hole, and a short one.
        runs.push((VirtAddr(base + PAGE as u64 - 8), &staging[..16]));
        runs.push((VirtAddr(base + 2 * PAGE as u64 + 8), &staging[..8]));
        let mut fates = Vec::new();
        write_runs(&runs, &mut plain, &mut |_| false, &mut fates);
        assert_eq!(
            fates,
            [
                RunFate::Written,
                RunFate::Gone,
                RunFate::Written,
                RunFate::Gone,
                RunFate::Written
            ],
            "runs touching the unmapped page are skipped"
        );
        // SAFETY: pages 0 and 2 are still mapped.
        unsafe {
            assert_eq!(*((base + 2 * PAGE as u64) as *const u8), 9);
            assert_eq!(*(base as *const u8), 9);
        }
        // SAFETY: unmapping what is left of our mapping.
        unsafe {
            libc::munmap(p, PAGE);
            libc::munmap((base + 2 * PAGE as u64) as *mut libc::c_void, PAGE);
        }
    }

    /// A read-only page refuses the write: the run is `Refused` at the
    /// page's first byte (when `refused` says so) and the memory is left
    /// as it was, on both copy paths; `Gone` when `refused` says no.
    #[test]
    fn refused_writes_are_told_from_gone_ones() {
        for plain in [true, false] {
            // SAFETY: fresh private anonymous mapping owned by this test.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    2 * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            let base = p as u64;
            let ro = base + PAGE as u64;
            // SAFETY: our mapping; the second page becomes read-only.
            unsafe {
                std::ptr::write_bytes(p.cast::<u8>(), 7, 2 * PAGE);
                assert_eq!(
                    libc::mprotect(ro as *mut libc::c_void, PAGE, libc::PROT_READ),
                    0
                );
            }
            let data = [9u8; 64];
            let runs: Vec<(VirtAddr, &[u8])> =
                vec![(VirtAddr(base), &data[..]), (VirtAddr(ro + 8), &data[..])];
            let mut asked = Vec::new();
            let mut fates = Vec::new();
            write_runs(
                &runs,
                &mut |_| plain,
                &mut |a| {
                    asked.push(a);
                    true
                },
                &mut fates,
            );
            assert_eq!(
                fates,
                [RunFate::Written, RunFate::Refused(VirtAddr(ro + 8))],
                "plain {plain}"
            );
            assert_eq!(asked, [VirtAddr(ro + 8)]);
            write_runs(&runs, &mut |_| plain, &mut |_| false, &mut fates);
            assert_eq!(fates, [RunFate::Written, RunFate::Gone], "plain {plain}");
            // SAFETY: both pages are still mapped readable.
            unsafe {
                assert_eq!(*(base as *const u8), 9);
                assert_eq!(*((ro + 8) as *const u8), 7, "the refused page is unchanged");
                libc::munmap(p, 2 * PAGE);
            }
        }
    }

    #[test]
    fn unmapped_pages_are_reported_not_fatal() {
        // Recoverable where available, the syscall path for all pages, and
        // a mix (page 2 "special").
        three_pages_one_gone(&|_| true);
        three_pages_one_gone(&|_| false);
        three_pages_one_gone(&|i| i != 2);
    }

    /// With our handler replaced by someone else's, copies fall back to
    /// `process_vm_*` (the foreign handler never runs), report the same
    /// results, and the path says why. Runs in a child process (this test
    /// binary, only this test) since it changes process-wide handlers.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn copies_fall_back_when_our_handler_is_replaced() {
        use crate::cpu::safecopy::{self, CopyPath, SyscallReason};
        const NAME: &str = "mirror::hostcopy::tests::copies_fall_back_when_our_handler_is_replaced";
        const CHILD: &str = "HMM_HOSTCOPY_CHILD";
        extern "C" fn foreign(_: libc::c_int) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(99) };
        }
        if std::env::var(CHILD).as_deref() == Ok(NAME) {
            assert_eq!(safecopy::active_path(), CopyPath::Recoverable);
            let (before, _) = safecopy::recovered_faults();
            three_pages_one_gone(&|_| true);
            let (mid, _) = safecopy::recovered_faults();
            assert!(mid > before, "the recoverable path met the hole");
            for sig in [libc::SIGSEGV, libc::SIGBUS] {
                // SAFETY: plain-data struct, zero is valid; installing a
                // one-argument handler for a valid signal.
                unsafe {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = foreign as *const () as libc::sighandler_t;
                    assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
                }
            }
            assert_eq!(
                safecopy::active_path(),
                CopyPath::Syscall(SyscallReason::Displaced)
            );
            three_pages_one_gone(&|_| true);
            assert_eq!(safecopy::recovered_faults().0, mid, "no fault taken");
            println!("fell back");
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, NAME)
            .env_remove("HMM_SAFE_COPY")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("fell back"),
            "{out:?}"
        );
    }
}
