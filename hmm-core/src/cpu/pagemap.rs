//! Page-table state of this process: `PAGEMAP_SCAN`, or `/proc/self/pagemap`.
//!
//! # The two kernel interfaces
//!
//! `/proc/self/pagemap` has one 64-bit entry per virtual page: bit 63
//! present, 62 swapped, 61 file-backed or shared-anonymous, 57 uffd
//! write-protected, 56 exclusively mapped, 55 soft-dirty, and (with
//! `CAP_SYS_ADMIN`) the physical frame number in bits 0..55. Reading it
//! costs 8 bytes of copy-out per page, so 1 GiB is 2 MiB of entries.
//!
//! Linux 6.7 added the `PAGEMAP_SCAN` ioctl on the same file. It walks the
//! page tables of a range and returns *runs* of pages (`page_region`: start,
//! end, category bits) whose categories match a filter: present, swapped,
//! file, zero-pfn, huge, soft-dirty, uffd-wp-allowed, written. Adjacent
//! pages with equal (masked) categories are merged into one region, so a
//! fully populated gigabyte comes back as a handful of regions instead of
//! 262144 entries. It can also atomically write-protect what it reports
//! (`PM_SCAN_WP_MATCHING`), which the CPU-write tracker uses.
//!
//! The ioctl stops early in two ways the caller must handle: when the
//! output vector is full, and when `max_pages` pages were reported. Either
//! way it stores where it stopped in `walk_end`; [`Pagemap::scan_with`]
//! continues from there until the range is done or the page budget spent,
//! merging regions that were split across calls.
//!
//! # Fallback
//!
//! On kernels without the ioctl (ENOTTY or EINVAL from a probe at open),
//! [`Pagemap`] reads the 8-byte entries with `pread` in large batches and
//! computes the same categories itself: present, swapped, file, soft-dirty,
//! and zero-pfn (by comparing with the shared zero page's frame, learned
//! once by reading a fresh anonymous page; this needs `CAP_SYS_ADMIN` to see
//! frame numbers, and without it zero-page mappings are reported as plain
//! present pages). It cannot compute huge, wp-allowed or written, nor
//! write-protect, and says so with [`PagemapError::FallbackUnsupported`].
//! Two known differences remain: the ioctl skips holes between mappings and
//! `VM_PFNMAP` areas entirely, while the fallback reports them as pages with
//! no category; scan one mapping at a time (as `range_fault` does) and they
//! do not matter. Huge zero pages are reported as present file pages.
//!
//! # Fork
//!
//! An open `/proc/self/pagemap` refers to the process that opened it; a
//! child that inherits the descriptor would read its *parent's* page
//! tables. [`Pagemap`] remembers the opener's pid and refuses to work in
//! another process ([`PagemapError::WrongProcess`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::cpu::sys::{
    self, pm_scan_arg, PM_FILE_OR_SHARED_ANON, PM_PFN_MASK, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAPPED,
};
use crate::error::RangeError;

/// The scan's output type and bits, with the kernel's names
/// (`linux/fs.h`): [`page_region`] is what [`Pagemap::pagemap_scan`]
/// returns; `PAGE_IS_*` are the category bits of [`ScanArgs`] and of
/// `page_region::categories`; `PM_SCAN_*` are the [`ScanArgs::flags`].
pub use crate::cpu::sys::{
    page_region, PAGE_IS_FILE, PAGE_IS_HUGE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SOFT_DIRTY,
    PAGE_IS_SWAPPED, PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
};

/// Categories the `pread` fallback can compute.
pub const FALLBACK_CATEGORIES: u64 =
    PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE | PAGE_IS_PFNZERO | PAGE_IS_SOFT_DIRTY;

/// Every category bit the kernel defines (`PM_SCAN_CATEGORIES`).
pub const ALL_CATEGORIES: u64 = (1 << 8) - 1;

/// Errors of the page-state readers.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PagemapError {
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap: {0}")]
    Open(#[source] io::Error),
    /// The range is unusable (unaligned start, kernel half).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The `PAGEMAP_SCAN` ioctl failed.
    #[error("PAGEMAP_SCAN over {range} failed: {source}")]
    Scan {
        /// The part of the range still to be walked.
        range: VaRange,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Reading pagemap entries failed.
    #[error("reading /proc/self/pagemap at {addr} failed: {source}")]
    Read {
        /// First address of the failed batch.
        addr: VirtAddr,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The request needs something only the ioctl provides.
    #[error(
        "the /proc/self/pagemap fallback cannot provide {what} (needs PAGEMAP_SCAN, Linux 6.7+)"
    )]
    FallbackUnsupported {
        /// What was asked for.
        what: &'static str,
    },
    /// Flags or category bits the kernel does not define.
    #[error("unknown PAGEMAP_SCAN flags or categories: {bits:#x}")]
    UnknownBits {
        /// The offending bits.
        bits: u64,
    },
    /// The descriptor was opened by another process (inherited over fork).
    #[error("pagemap opened by pid {opened_by} used in pid {current}; open a new one after fork")]
    WrongProcess {
        /// Process that opened the file.
        opened_by: u32,
        /// Current process.
        current: u32,
    },
}

/// The filter and output selection of one scan, as in `struct pm_scan_arg`.
///
/// A page is reported when `(categories ^ category_inverted)` contains all
/// of `category_mask` and, if `category_anyof_mask` is non-zero, at least
/// one of its bits. Reported regions carry `categories & return_mask`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanArgs {
    /// `PM_SCAN_*` flags (write-protect matching; ioctl only).
    pub flags: u64,
    /// Categories that must all be set (after inversion).
    pub category_mask: u64,
    /// Categories of which at least one must be set (0: no condition).
    pub category_anyof_mask: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories to report.
    pub return_mask: u64,
    /// Stop after this many pages were reported (0: no limit).
    pub max_pages: u64,
}

impl ScanArgs {
    /// Report every page with the given categories, no filter.
    pub const fn report(return_mask: u64) -> Self {
        ScanArgs {
            flags: 0,
            category_mask: 0,
            category_anyof_mask: 0,
            category_inverted: 0,
            return_mask,
            max_pages: 0,
        }
    }

    fn interesting(&self, cats: u64) -> bool {
        let c = cats ^ self.category_inverted;
        (c & self.category_mask) == self.category_mask
            && (self.category_anyof_mask == 0 || c & self.category_anyof_mask != 0)
    }
}

/// An open `/proc/self/pagemap` and the method used to read it.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    pid: u32,
    scan_ioctl: bool,
    /// Frame of the shared zero page, 0 when unknown.
    zero_pfn: u64,
    /// Output vector capacity of one ioctl call (regions).
    vec_cap: usize,
}

/// Output vector capacity of one ioctl call (regions); 12 KiB. At most
/// 512: a call that produced more than 512 regions (the kernel's internal
/// bounce buffer) and then finished returns a stale `walk_end`, short of
/// the end, and resuming from it re-scans and reports pages twice
/// (Linux 6.18; perf-lab `walkend_quirk`,
/// `more_than_512_regions_in_one_scan_are_counted_once`). With at most
/// 512 per call the vector fills before the bounce buffer wraps.
const SCAN_VEC: usize = 512;
/// Entries per `pread` in the fallback; 128 KiB.
const READ_BATCH: usize = 16 * 1024;

/// Merges adjacent equal regions before handing them to `sink`.
struct Merger<'a> {
    pending: Option<page_region>,
    sink: &'a mut dyn FnMut(page_region),
}

impl Merger<'_> {
    fn push(&mut self, r: page_region) {
        match &mut self.pending {
            Some(p) if p.end == r.start && p.categories == r.categories => p.end = r.end,
            p => {
                if let Some(done) = p.replace(r) {
                    (self.sink)(done);
                }
            }
        }
    }
    fn finish(mut self) {
        if let Some(p) = self.pending.take() {
            (self.sink)(p);
        }
    }
}

impl Pagemap {
    /// Opens `/proc/self/pagemap` and probes for `PAGEMAP_SCAN`; falls back
    /// to reading entries when the kernel lacks it.
    pub fn open() -> Result<Self, PagemapError> {
        Self::open_inner(false)
    }

    /// Opens `/proc/self/pagemap` and always uses the `pread` fallback
    /// (for tests and comparisons).
    pub fn open_fallback() -> Result<Self, PagemapError> {
        Self::open_inner(true)
    }

    fn open_inner(force_fallback: bool) -> Result<Self, PagemapError> {
        let file = File::open("/proc/self/pagemap").map_err(PagemapError::Open)?;
        let mut pm = Pagemap {
            file,
            pid: std::process::id(),
            scan_ioctl: false,
            zero_pfn: 0,
            vec_cap: SCAN_VEC,
        };
        if !force_fallback {
            pm.scan_ioctl = pm.probe_scan();
        }
        if !pm.scan_ioctl {
            pm.zero_pfn = pm.probe_zero_pfn();
        }
        Ok(pm)
    }

    /// Whether scans use the `PAGEMAP_SCAN` ioctl (else the `pread`
    /// fallback).
    pub fn uses_scan_ioctl(&self) -> bool {
        self.scan_ioctl
    }

    /// Whether the fallback knows the zero page's frame (it needs
    /// `CAP_SYS_ADMIN`); always true with the ioctl, which reports
    /// `PAGE_IS_PFNZERO` itself.
    pub fn knows_zero_page(&self) -> bool {
        self.scan_ioctl || self.zero_pfn != 0
    }

    /// An empty scan: succeeds (returns 0) on kernels with the ioctl.
    fn probe_scan(&self) -> bool {
        let mut arg = pm_scan_arg {
            size: core::mem::size_of::<pm_scan_arg>() as u64,
            return_mask: PAGE_IS_PRESENT,
            ..Default::default()
        };
        // SAFETY: `self.file` is an open pagemap descriptor; `arg` is a
        // valid, writable `pm_scan_arg` whose `size` says so; the range is
        // empty and `vec`/`vec_len` are 0, so the kernel writes nothing but
        // `arg.walk_end`.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), sys::PAGEMAP_SCAN as _, &mut arg) };
        rc >= 0
    }

    /// Reads the frame of the shared zero page by mapping one private
    /// anonymous page, reading it (which maps the zero page) and looking at
    /// its pagemap entry. 0 when frames are hidden (no `CAP_SYS_ADMIN`).
    fn probe_zero_pfn(&self) -> u64 {
        let Ok(m) = super::scratch::ScratchMap::new(1) else {
            return 0;
        };
        // SAFETY: `m` is a readable mapping of one page we own; volatile so
        // the read (which maps the zero page) is not optimised away.
        let _ = unsafe { core::ptr::read_volatile(m.ptr().cast::<u8>()) };
        let mut e = [0u8; 8];
        let off = (m.base() >> PAGE_SHIFT) * 8;
        match self.file.read_exact_at(&mut e, off) {
            Ok(()) => {
                let v = u64::from_ne_bytes(e);
                if v & PM_PRESENT != 0 && v & PM_FILE_OR_SHARED_ANON == 0 {
                    v & PM_PFN_MASK
                } else {
                    0
                }
            }
            Err(_) => 0,
        }
    }

    /// Shrinks the ioctl's output vector (to exercise partial walks).
    #[cfg(test)]
    pub(crate) fn set_vec_cap(&mut self, n: usize) {
        self.vec_cap = n.min(SCAN_VEC);
    }

    fn check_pid(&self) -> Result<(), PagemapError> {
        let current = std::process::id();
        if current != self.pid {
            return Err(PagemapError::WrongProcess {
                opened_by: self.pid,
                current,
            });
        }
        Ok(())
    }

    /// Scans `range` (start page aligned; the end is rounded up to a page)
    /// and returns the matching regions, adjacent equal regions merged.
    ///
    /// This is the safe form of `ioctl(PAGEMAP_SCAN)`: the arguments are
    /// those of `struct pm_scan_arg` (see [`ScanArgs`]).
    pub fn pagemap_scan(
        &self,
        range: VaRange,
        args: &ScanArgs,
    ) -> Result<Vec<page_region>, PagemapError> {
        let mut out = Vec::new();
        self.scan_with(range, args, &mut |r| out.push(r))?;
        Ok(out)
    }

    /// Like [`Pagemap::pagemap_scan`] but hands each region to `sink`
    /// instead of collecting them. Returns the number of pages reported.
    pub fn scan_with(
        &self,
        range: VaRange,
        args: &ScanArgs,
        sink: &mut dyn FnMut(page_region),
    ) -> Result<u64, PagemapError> {
        self.check_pid()?;
        let range = range.user()?;
        if !range.start().is_page_aligned() {
            return Err(RangeError::Unaligned {
                start: range.start().0,
                end: range.end().0,
            }
            .into());
        }
        let range = range.page_cover()?;
        let unknown = (args.flags & !(sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC))
            | ((args.category_mask
                | args.category_anyof_mask
                | args.category_inverted
                | args.return_mask)
                & !ALL_CATEGORIES);
        if unknown != 0 {
            return Err(PagemapError::UnknownBits { bits: unknown });
        }
        let mut merger = Merger {
            pending: None,
            sink,
        };
        let n = if self.scan_ioctl {
            self.scan_ioctl(range, args, &mut merger)?
        } else {
            self.scan_pread(range, args, &mut merger)?
        };
        merger.finish();
        Ok(n)
    }

    fn scan_ioctl(
        &self,
        range: VaRange,
        args: &ScanArgs,
        out: &mut Merger<'_>,
    ) -> Result<u64, PagemapError> {
        let cap = (range.pages() as usize).clamp(1, self.vec_cap.max(1));
        let mut buf: Vec<page_region> = Vec::with_capacity(cap);
        let budget = if args.max_pages == 0 {
            u64::MAX
        } else {
            args.max_pages
        };
        let mut reported = 0u64;
        let mut start = range.start().0;
        let end = range.end().0;
        while start < end && reported < budget {
            buf.clear();
            let mut arg = pm_scan_arg {
                size: core::mem::size_of::<pm_scan_arg>() as u64,
                flags: args.flags,
                start,
                end,
                walk_end: 0,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.capacity() as u64,
                max_pages: budget - reported,
                category_inverted: args.category_inverted,
                category_mask: args.category_mask,
                category_anyof_mask: args.category_anyof_mask,
                return_mask: args.return_mask,
            };
            // SAFETY: `self.file` is an open pagemap descriptor (pid checked
            // above). `arg` is a valid `pm_scan_arg` of the size stated in
            // `arg.size`. `arg.vec` points to `buf`'s allocation, which has
            // room for `arg.vec_len == buf.capacity()` `page_region`s and is
            // not otherwise accessed until the call returns. `start` is page
            // aligned and `[start, end)` is a user range; the kernel only
            // reads page tables there, it does not access the memory.
            let rc =
                unsafe { libc::ioctl(self.file.as_raw_fd(), sys::PAGEMAP_SCAN as _, &mut arg) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(PagemapError::Scan {
                    range: VaRange::new(VirtAddr(start), VirtAddr(end)).unwrap_or(range),
                    source: e,
                });
            }
            let n = (rc as usize).min(buf.capacity());
            // SAFETY: the kernel wrote `rc` initialised `page_region`s (plain
            // integers) to the start of `buf`; `n <= capacity`.
            unsafe { buf.set_len(n) };
            for r in &buf {
                reported += (r.end - r.start) >> PAGE_SHIFT;
                out.push(*r);
            }
            if arg.walk_end <= start || arg.walk_end > end {
                // No progress (or nonsense): stop rather than loop forever.
                break;
            }
            start = arg.walk_end;
        }
        Ok(reported)
    }

    fn scan_pread(
        &self,
        range: VaRange,
        args: &ScanArgs,
        out: &mut Merger<'_>,
    ) -> Result<u64, PagemapError> {
        if args.flags != 0 {
            return Err(PagemapError::FallbackUnsupported {
                what: "write-protect matching",
            });
        }
        if (args.category_mask
            | args.category_anyof_mask
            | args.category_inverted
            | args.return_mask)
            & !FALLBACK_CATEGORIES
            != 0
        {
            return Err(PagemapError::FallbackUnsupported {
                what: "the huge, wp-allowed or written categories",
            });
        }
        let budget = if args.max_pages == 0 {
            u64::MAX
        } else {
            args.max_pages
        };
        let mut reported = 0u64;
        let mut buf = vec![0u8; READ_BATCH.min(range.pages() as usize) * 8];
        let mut vpn = range.start().vpn();
        let end_vpn = range.end().vpn();
        while vpn < end_vpn && reported < budget {
            let n = ((end_vpn - vpn) as usize).min(READ_BATCH);
            let bytes = &mut buf[..n * 8];
            self.file
                .read_exact_at(bytes, vpn * 8)
                .map_err(|source| PagemapError::Read {
                    addr: VirtAddr(vpn << PAGE_SHIFT),
                    source,
                })?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(e);
                let cats = self.categories(u64::from_ne_bytes(a));
                if !args.interesting(cats) {
                    continue;
                }
                let addr = (vpn + i as u64) << PAGE_SHIFT;
                out.push(page_region {
                    start: addr,
                    end: addr + PAGE_SIZE,
                    categories: cats & args.return_mask,
                });
                reported += 1;
                if reported == budget {
                    break;
                }
            }
            vpn += n as u64;
        }
        Ok(reported)
    }

    /// `PAGE_IS_*` categories of one pagemap entry.
    fn categories(&self, e: u64) -> u64 {
        let mut c = 0;
        if e & PM_PRESENT != 0 {
            c |= PAGE_IS_PRESENT;
            if self.zero_pfn != 0 && e & PM_PFN_MASK == self.zero_pfn {
                c |= PAGE_IS_PFNZERO;
            }
        }
        if e & PM_SWAPPED != 0 {
            c |= PAGE_IS_SWAPPED;
        }
        if e & PM_FILE_OR_SHARED_ANON != 0 {
            c |= PAGE_IS_FILE;
        }
        if e & PM_SOFT_DIRTY != 0 {
            c |= PAGE_IS_SOFT_DIRTY;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Anon {
        p: *mut libc::c_void,
        len: usize,
    }
    impl Anon {
        fn new(pages: usize) -> Self {
            let len = pages * PAGE_SIZE as usize;
            // SAFETY: fresh private anonymous mapping.
            let p = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Anon { p, len }
        }
        fn range(&self) -> VaRange {
            VaRange::from_start_len(VirtAddr(self.p as u64), self.len as u64).unwrap()
        }
        fn touch(&self, page: usize) {
            // SAFETY: inside our own writable mapping.
            unsafe {
                self.p
                    .cast::<u8>()
                    .add(page * PAGE_SIZE as usize)
                    .write_volatile(1)
            };
        }
    }
    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping.
            unsafe { libc::munmap(self.p, self.len) };
        }
    }

    fn present_pages(pm: &Pagemap, r: VaRange) -> Vec<u64> {
        let regs = pm
            .pagemap_scan(
                r,
                &ScanArgs {
                    category_mask: PAGE_IS_PRESENT,
                    return_mask: PAGE_IS_PRESENT,
                    ..Default::default()
                },
            )
            .unwrap();
        regs.iter()
            .flat_map(|g| (g.start..g.end).step_by(PAGE_SIZE as usize))
            .map(|a| (a - r.start().0) / PAGE_SIZE)
            .collect()
    }

    #[test]
    fn both_paths_find_touched_pages() {
        let a = Anon::new(64);
        for p in [0, 1, 2, 10, 40, 63] {
            a.touch(p);
        }
        let scan = Pagemap::open().unwrap();
        let fb = Pagemap::open_fallback().unwrap();
        assert!(!fb.uses_scan_ioctl());
        assert_eq!(present_pages(&fb, a.range()), vec![0, 1, 2, 10, 40, 63]);
        assert_eq!(
            present_pages(&scan, a.range()),
            present_pages(&fb, a.range())
        );
    }

    #[test]
    fn more_than_512_regions_in_one_scan_are_counted_once() {
        // PAGEMAP_SCAN returns a stale `walk_end` when one call produced
        // more than 512 regions and then finished (perf-lab
        // `walkend_quirk`): a caller resuming from it re-scans and counts
        // pages twice. 700 separate regions (every other page touched)
        // in one range, scanned with the default output vector: one call
        // that produces them all.
        let a = Anon::new(1400);
        for p in (0..1400).step_by(2) {
            a.touch(p);
        }
        let pm = Pagemap::open().unwrap();
        let mut pages = 0u64;
        let mut last_end = 0u64;
        let present = ScanArgs {
            category_mask: PAGE_IS_PRESENT,
            return_mask: PAGE_IS_PRESENT,
            ..Default::default()
        };
        let n = pm
            .scan_with(a.range(), &present, &mut |r| {
                assert!(
                    r.start >= last_end,
                    "overlapping regions: {r:?} after {last_end:#x}"
                );
                last_end = r.end;
                pages += (r.end - r.start) >> PAGE_SHIFT;
            })
            .unwrap();
        assert_eq!((n, pages), (700, 700), "every touched page once");
    }

    #[test]
    fn partial_walks_are_continued_and_merged() {
        // Every other page touched: 64 regions; force tiny output budgets
        // through max_pages and check the page-budget stop.
        let a = Anon::new(128);
        for p in (0..128).step_by(2) {
            a.touch(p);
        }
        let mut small = Pagemap::open().unwrap();
        small.set_vec_cap(3);
        for pm in [
            small,
            Pagemap::open().unwrap(),
            Pagemap::open_fallback().unwrap(),
        ] {
            let all = pm
                .pagemap_scan(a.range(), &ScanArgs::report(PAGE_IS_PRESENT))
                .unwrap();
            assert_eq!(
                all.len(),
                128,
                "alternating regions (ioctl: {})",
                pm.uses_scan_ioctl()
            );
            let limited = pm
                .pagemap_scan(
                    a.range(),
                    &ScanArgs {
                        category_mask: PAGE_IS_PRESENT,
                        return_mask: PAGE_IS_PRESENT,
                        max_pages: 5,
                        ..Default::default()
                    },
                )
                .unwrap();
            let pages: u64 = limited.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum();
            assert_eq!(pages, 5);
        }
    }

    #[test]
    fn fallback_refuses_what_it_cannot_compute() {
        let a = Anon::new(1);
        let fb = Pagemap::open_fallback().unwrap();
        assert!(matches!(
            fb.pagemap_scan(a.range(), &ScanArgs::report(sys::PAGE_IS_WRITTEN)),
            Err(PagemapError::FallbackUnsupported { .. })
        ));
        let pm = Pagemap::open().unwrap();
        assert!(matches!(
            pm.pagemap_scan(a.range(), &ScanArgs::report(1 << 20)),
            Err(PagemapError::UnknownBits { .. })
        ));
        let unaligned = VaRange::from_start_len(VirtAddr(a.p as u64 + 1), 10).unwrap();
        assert!(matches!(
            pm.pagemap_scan(unaligned, &ScanArgs::report(PAGE_IS_PRESENT)),
            Err(PagemapError::Range(RangeError::Unaligned { .. }))
        ));
    }
}
