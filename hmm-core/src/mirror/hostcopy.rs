//! Copies between CPU memory and staging buffers that survive the CPU page
//! disappearing underneath.
//!
//! The kernel delivers userfaultfd `UNMAP` events *after* the pages are
//! gone, so between an application's `munmap` and the invalidation that
//! follows, a fault service may try to read a page `range_fault` saw a
//! moment ago, and a write-back may target one. A plain `memcpy` would
//! raise SIGSEGV there. `process_vm_readv` / `process_vm_writev` on our own
//! pid do the same copies inside the kernel and report `EFAULT` for a
//! missing page instead, so the mirror treats the page as gone.
//!
//! Each call moves up to `IOV_MAX` (1024) pages; the kernel stops at the
//! first bad page and reports how many bytes it moved, so the copy is
//! resumed after the bad page and every bad page is reported.

use crate::addr::{VirtAddr, PAGE_SIZE};

const IOV_MAX: usize = 1024;
const PAGE: usize = PAGE_SIZE as usize;

/// Reads the pages at `srcs` (page-aligned CPU addresses) into consecutive
/// 4 KiB chunks of `staging` (which must hold `srcs.len()` pages). Returns,
/// per page, whether it was read; an unreadable page's chunk is zeroed.
pub(crate) fn read_pages(srcs: &[VirtAddr], staging: &mut [u8], ok: &mut Vec<bool>) {
    ok.clear();
    ok.resize(srcs.len(), false);
    let staging = &mut staging[..srcs.len() * PAGE];
    let mut i = 0;
    while i < srcs.len() {
        let n = (srcs.len() - i).min(IOV_MAX);
        let local: Vec<libc::iovec> = (i..i + n)
            .map(|k| libc::iovec {
                iov_base: staging[k * PAGE..].as_mut_ptr().cast(),
                iov_len: PAGE,
            })
            .collect();
        let remote: Vec<libc::iovec> = srcs[i..i + n]
            .iter()
            .map(|a| libc::iovec {
                iov_base: a.as_mut_ptr(),
                iov_len: PAGE,
            })
            .collect();
        // SAFETY: `local` describes `n` disjoint 4 KiB chunks of `staging`,
        // which we borrow mutably for the call; `remote` names addresses in
        // our own process that the kernel validates itself (a missing page
        // is an EFAULT, not a crash). Nothing else aliases `staging`.
        let got = unsafe {
            libc::process_vm_readv(
                libc::getpid(),
                local.as_ptr(),
                n as libc::c_ulong,
                remote.as_ptr(),
                n as libc::c_ulong,
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
            staging[bad * PAGE..(bad + 1) * PAGE].fill(0);
            i = bad + 1;
        } else {
            i += n;
        }
    }
}

/// The byte runs where `new` differs from `old` (equal lengths), as
/// `(offset, len)`, appended to `out`. Compares 64-byte blocks first, so
/// an unchanged page costs about a `memcmp`.
pub(crate) fn diff_runs(old: &[u8], new: &[u8], out: &mut Vec<(usize, usize)>) {
    let n = old.len().min(new.len());
    let mut i = 0;
    let mut run: Option<usize> = None;
    while i < n {
        let blk = (n - i).min(64);
        if run.is_none() && old[i..i + blk] == new[i..i + blk] {
            i += blk;
            continue;
        }
        for k in i..i + blk {
            match (old[k] != new[k], run) {
                (true, None) => run = Some(k),
                (false, Some(s)) => {
                    out.push((s, k - s));
                    run = None;
                }
                _ => {}
            }
        }
        i += blk;
    }
    if let Some(s) = run {
        out.push((s, n - s));
    }
}

/// Writes each `(dst, bytes)` run to CPU memory, skipping runs whose pages
/// are gone; returns how many runs were written.
pub(crate) fn write_runs(runs: &[(VirtAddr, &[u8])]) -> usize {
    let mut written = 0;
    let mut i = 0;
    while i < runs.len() {
        let n = (runs.len() - i).min(IOV_MAX);
        let local: Vec<libc::iovec> = runs[i..i + n]
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            })
            .collect();
        let remote: Vec<libc::iovec> = runs[i..i + n]
            .iter()
            .map(|(a, b)| libc::iovec {
                iov_base: a.as_mut_ptr(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: `local` only describes the borrowed byte slices, which the
        // kernel reads; the remote side is our own address space, checked
        // by the kernel (EFAULT for missing pages); the caller checked
        // under the driver lock that the runs belong to the mirrored range.
        let put = unsafe {
            libc::process_vm_writev(
                libc::getpid(),
                local.as_ptr(),
                n as libc::c_ulong,
                remote.as_ptr(),
                n as libc::c_ulong,
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
        written += k;
        i += if k < n { k + 1 } else { n };
    }
    written
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

    #[test]
    fn unmapped_pages_are_reported_not_fatal() {
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
        let mut staging = vec![1u8; 3 * PAGE];
        let mut ok = Vec::new();
        read_pages(&addrs, &mut staging, &mut ok);
        assert_eq!(ok, [true, false, true]);
        assert!(staging[..PAGE].iter().all(|&b| b == 7));
        assert!(staging[PAGE..2 * PAGE].iter().all(|&b| b == 0));
        staging.fill(9);
        let runs: Vec<(VirtAddr, &[u8])> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (*a, &staging[i * PAGE..(i + 1) * PAGE]))
            .collect();
        assert_eq!(write_runs(&runs), 2, "the unmapped page is skipped");
        // SAFETY: page 2 is still mapped.
        assert_eq!(unsafe { *((base + 2 * PAGE as u64) as *const u8) }, 9);
        // SAFETY: unmapping what is left of our mapping.
        unsafe {
            libc::munmap(p, PAGE);
            libc::munmap((base + 2 * PAGE as u64) as *mut libc::c_void, PAGE);
        }
    }
}
