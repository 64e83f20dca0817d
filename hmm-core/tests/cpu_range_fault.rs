//! `range_fault` against real mappings (mmap / mprotect / munmap), named
//! after the kernel's HMM selftests (`tools/testing/selftests/mm/hmm-tests.c`)
//! where they test the same thing.
//!
//! Each test creates its mappings before its `RangeFaulter`, so the
//! faulter's mapping cache is filled after they exist. The tests hold one
//! lock while they run: several punch holes with `munmap`, and a parallel
//! test's `mmap` could otherwise land in the hole.

use std::io::Write;
use std::sync::Arc;

use hmm_core::cpu::maps::MappingCache;
use hmm_core::cpu::pagemap::{Pagemap, ScanArgs};
use hmm_core::cpu::pagemap::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT};
use hmm_core::cpu::range_fault::{FaultError, FaultFlags, PageState, PopulateMethod, RangeFaulter};
use hmm_core::{RangeError, VaRange, VirtAddr, PAGE_SIZE};

const PS: usize = PAGE_SIZE as usize;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An owned mapping, unmapped on drop (pages already unmapped by the test
/// are harmless to unmap again).
struct Map {
    p: *mut u8,
    len: usize,
}

impl Map {
    fn new(pages: usize, prot: i32, flags: i32, fd: i32) -> Map {
        let len = pages * PS;
        // SAFETY: a fresh mapping chosen by the kernel; checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // Keep THP out of the picture: tests reason about 4 KiB pages.
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Map { p: p.cast(), len }
    }
    fn anon(pages: usize, prot: i32) -> Map {
        Map::new(pages, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }
    fn range(&self) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.p as u64), self.len as u64).unwrap()
    }
    fn page(&self, i: usize) -> VirtAddr {
        VirtAddr(self.p as u64 + (i * PS) as u64)
    }
    fn pages(&self, a: usize, b: usize) -> VaRange {
        VaRange::new(self.page(a), self.page(b)).unwrap()
    }
    fn write(&self, i: usize, v: u8) {
        // SAFETY: page `i` of our own mapping, which the test made writable.
        unsafe { self.p.add(i * PS).write_volatile(v) }
    }
    fn read(&self, i: usize) -> u8 {
        // SAFETY: page `i` of our own mapping, which the test made readable.
        unsafe { self.p.add(i * PS).read_volatile() }
    }
    fn protect(&self, a: usize, b: usize, prot: i32) {
        // SAFETY: changing protection of part of our own mapping; no Rust
        // reference points into it.
        let rc = unsafe { libc::mprotect(self.p.add(a * PS).cast(), (b - a) * PS, prot) };
        assert_eq!(rc, 0);
    }
    fn unmap(&self, a: usize, b: usize) {
        // SAFETY: unmapping part of our own mapping; no reference into it.
        let rc = unsafe { libc::munmap(self.p.add(a * PS).cast(), (b - a) * PS) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.p.cast(), self.len) };
    }
}

/// Pages (indices relative to `r`) the scan reports present, and which of
/// them map the zero page.
fn present(r: VaRange) -> (Vec<usize>, Vec<usize>) {
    let pm = Pagemap::open().unwrap();
    let regs = pm
        .pagemap_scan(
            r,
            &ScanArgs {
                category_mask: PAGE_IS_PRESENT,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                ..Default::default()
            },
        )
        .unwrap();
    let mut all = Vec::new();
    let mut zero = Vec::new();
    for g in regs {
        for a in (g.start..g.end).step_by(PS) {
            let i = ((a - r.start().get()) / PAGE_SIZE) as usize;
            all.push(i);
            if g.categories & PAGE_IS_PFNZERO != 0 {
                zero.push(i);
            }
        }
    }
    (all, zero)
}

struct TempFile {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl TempFile {
    fn new(name: &str, pages: usize) -> TempFile {
        let path = std::env::temp_dir().join(format!("hmm-rf-{}-{name}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        for i in 0..pages {
            file.write_all(&vec![i as u8 + 1; PS]).unwrap();
        }
        file.sync_all().unwrap();
        TempFile { path, file }
    }
    fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const VALID_RW: PageState = PageState::Valid { writable: true };
const VALID_RO: PageState = PageState::Valid { writable: false };

#[test]
fn anon_read() {
    let _serial = serial();
    let m = Map::anon(8, RW);
    m.write(3, 7);
    let f = RangeFaulter::new().unwrap();
    // Snapshot: never-touched private anonymous pages read as zeros.
    let s = f.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap();
    let mut want = vec![PageState::Zero; 8];
    want[3] = VALID_RW;
    assert_eq!(s, want);
    assert_eq!(
        present(m.range()).0,
        vec![3],
        "a snapshot populates nothing"
    );
    // Read fault: everything readable; untouched pages now map the zero page.
    let s = f.range_fault(m.range(), FaultFlags::READ).unwrap();
    assert_eq!(s, want);
    assert!(s.iter().all(|p| p.is_readable()));
    let (all, zero) = present(m.range());
    assert_eq!(
        all,
        (0..8).collect::<Vec<_>>(),
        "read fault populated every page"
    );
    assert_eq!(zero, vec![0, 1, 2, 4, 5, 6, 7]);
    assert_eq!(m.read(0), 0);
    assert_eq!(m.read(3), 7);
}

#[test]
fn anon_write() {
    let _serial = serial();
    let m = Map::anon(16, RW);
    let f = RangeFaulter::new().unwrap();
    // Read fault first (zero pages), then a write fault must replace them.
    f.range_fault(m.pages(0, 8), FaultFlags::READ).unwrap();
    let s = f.range_fault(m.range(), FaultFlags::WRITE).unwrap();
    assert_eq!(s, vec![VALID_RW; 16]);
    let (all, zero) = present(m.range());
    assert_eq!(all, (0..16).collect::<Vec<_>>());
    assert!(zero.is_empty(), "write fault replaced zero pages: {zero:?}");
    // One populate for the single piece, one scan.
    let before = f.stats();
    f.range_fault(m.range(), FaultFlags::WRITE).unwrap();
    let after = f.stats();
    assert_eq!(
        (
            after.populates - before.populates,
            after.scans - before.scans
        ),
        (1, 1)
    );
}

#[test]
fn anon_read_prot() {
    let _serial = serial();
    let m = Map::anon(4, libc::PROT_NONE);
    let f = RangeFaulter::new().unwrap();
    for flags in [FaultFlags::READ, FaultFlags::WRITE] {
        match f.range_fault(m.range(), flags) {
            Err(FaultError::NoAccess { addr }) => assert_eq!(addr, m.page(0)),
            r => panic!("expected NoAccess, got {r:?}"),
        }
    }
    // Without a fault request: per-page errors, like HMM_PFN_ERROR.
    assert_eq!(
        f.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap(),
        vec![PageState::Error; 4]
    );
}

#[test]
fn anon_write_prot() {
    let _serial = serial();
    let m = Map::anon(4, libc::PROT_READ);
    let f = RangeFaulter::new().unwrap();
    match f.range_fault(m.range(), FaultFlags::WRITE) {
        Err(FaultError::ReadOnly { addr }) => assert_eq!(addr, m.page(0)),
        r => panic!("expected ReadOnly, got {r:?}"),
    }
    assert!(
        present(m.range()).0.is_empty(),
        "failed call populated nothing"
    );
    let s = f.range_fault(m.range(), FaultFlags::READ).unwrap();
    assert_eq!(s, vec![PageState::Zero; 4]);
    assert_eq!(present(m.range()).0.len(), 4);
    // A write request without a fault request is a snapshot (kernel:
    // REQ_WRITE needs REQ_FAULT).
    let s = f
        .range_fault(
            m.range(),
            FaultFlags {
                fault: false,
                write: true,
            },
        )
        .unwrap();
    assert_eq!(s, vec![PageState::Zero; 4]);
}

#[test]
fn anon_write_hole() {
    let _serial = serial();
    let m = Map::anon(6, RW);
    m.write(5, 1);
    m.unmap(2, 3);
    let f = RangeFaulter::new().unwrap();
    for flags in [FaultFlags::READ, FaultFlags::WRITE] {
        match f.range_fault(m.range(), flags) {
            Err(FaultError::Unmapped { addr }) => assert_eq!(addr, m.page(2)),
            r => panic!("expected Unmapped, got {r:?}"),
        }
    }
    assert!(
        present(m.pages(0, 2)).0.is_empty(),
        "access checks run before any populate"
    );
    let s = f.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap();
    assert_eq!(
        s,
        vec![
            PageState::Zero,
            PageState::Zero,
            PageState::Error,
            PageState::Zero,
            PageState::Zero,
            VALID_RW
        ]
    );
    // The part before the hole faults fine.
    assert_eq!(
        f.range_fault(m.pages(0, 2), FaultFlags::WRITE).unwrap(),
        vec![VALID_RW; 2]
    );
}

#[test]
fn file_read() {
    let _serial = serial();
    let t = TempFile::new("file_read", 4);
    let m = Map::new(4, RW, libc::MAP_PRIVATE, t.fd());
    let f = RangeFaulter::new().unwrap();
    let s = f.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap();
    assert!(
        s.iter().all(|p| *p == PageState::NotPresent),
        "untouched file pages: contents live in the file, not zeros: {s:?}"
    );
    // Read fault on a private file mapping: the page-cache page is mapped;
    // writing it would copy, so it is not writable.
    let s = f.range_fault(m.range(), FaultFlags::READ).unwrap();
    assert_eq!(s, vec![VALID_RO; 4]);
    assert_eq!(present(m.range()).0.len(), 4);
    assert_eq!((m.read(0), m.read(3)), (1, 4));
    // Write fault: private copies, writable; the file is unchanged.
    let s = f.range_fault(m.pages(1, 3), FaultFlags::WRITE).unwrap();
    assert_eq!(s, vec![VALID_RW; 2]);
    m.write(1, 99);
    let s = f.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap();
    assert_eq!(s, vec![VALID_RO, VALID_RW, VALID_RW, VALID_RO]);
    let data = std::fs::read(&t.path).unwrap();
    assert_eq!(data[PS], 2, "MAP_PRIVATE write did not reach the file");
}

#[test]
fn file_write() {
    let _serial = serial();
    let t = TempFile::new("file_write", 3);
    let m = Map::new(3, RW, libc::MAP_SHARED, t.fd());
    let f = RangeFaulter::new().unwrap();
    let s = f.range_fault(m.range(), FaultFlags::WRITE).unwrap();
    assert_eq!(s, vec![VALID_RW; 3]);
    assert_eq!(present(m.range()).0.len(), 3);
    m.write(2, 42);
    // SAFETY: our own mapping.
    assert_eq!(unsafe { libc::msync(m.p.cast(), m.len, libc::MS_SYNC) }, 0);
    assert_eq!(std::fs::read(&t.path).unwrap()[2 * PS], 42);
    // Shared file mapped read-only: read fault fine, write refused.
    let ro = Map::new(3, libc::PROT_READ, libc::MAP_SHARED, t.fd());
    let f = RangeFaulter::new().unwrap();
    assert_eq!(
        f.range_fault(ro.range(), FaultFlags::READ).unwrap(),
        vec![VALID_RO; 3]
    );
    assert!(matches!(
        f.range_fault(ro.range(), FaultFlags::WRITE),
        Err(FaultError::ReadOnly { .. })
    ));
}

#[test]
fn file_read_past_eof() {
    let _serial = serial();
    // One page of file, two pages of mapping: the second page would SIGBUS.
    let t = TempFile::new("past_eof", 1);
    let m = Map::new(2, RW, libc::MAP_SHARED, t.fd());
    let f = RangeFaulter::new().unwrap();
    assert_eq!(
        f.range_fault(m.pages(0, 1), FaultFlags::READ).unwrap(),
        vec![VALID_RW]
    );
    match f.range_fault(m.range(), FaultFlags::READ) {
        Err(FaultError::Populate { range, .. }) => assert!(range.contains(m.page(1))),
        r => panic!("expected Populate error, got {r:?}"),
    }
    let s = f.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap();
    assert_eq!(s, vec![VALID_RW, PageState::NotPresent]);
}

#[test]
fn anon_shared() {
    let _serial = serial();
    let m = Map::new(4, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
    m.write(0, 5);
    let f = RangeFaulter::new().unwrap();
    let s = f.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap();
    // Shared anonymous memory is shmem: an absent PTE says nothing about
    // the contents.
    assert_eq!(
        s,
        vec![
            VALID_RW,
            PageState::NotPresent,
            PageState::NotPresent,
            PageState::NotPresent
        ]
    );
    let s = f.range_fault(m.range(), FaultFlags::READ).unwrap();
    assert!(s.iter().all(|p| p.is_readable()), "{s:?}");
    let s = f.range_fault(m.range(), FaultFlags::WRITE).unwrap();
    assert_eq!(s, vec![VALID_RW; 4]);
    assert_eq!(present(m.range()).0.len(), 4);
}

#[test]
fn mixedmap() {
    let _serial = serial();
    // Eight pages, the last four read-only: two VMAs.
    let m = Map::anon(8, RW);
    m.protect(4, 8, libc::PROT_READ);
    let f = RangeFaulter::new().unwrap();
    let before = f.stats();
    let s = f.range_fault(m.range(), FaultFlags::READ).unwrap();
    let after = f.stats();
    assert_eq!(s, vec![PageState::Zero; 8]);
    assert_eq!(
        after.scans - before.scans,
        4,
        "scan, populate, rescan per piece"
    );
    assert_eq!(
        after.populates - before.populates,
        2,
        "one populate per piece"
    );
    // Already populated: read faults need one scan per piece and no populate.
    let before = f.stats();
    f.range_fault(m.range(), FaultFlags::READ).unwrap();
    let after = f.stats();
    assert_eq!(
        (
            after.scans - before.scans,
            after.populates - before.populates
        ),
        (2, 0)
    );
    match f.range_fault(m.range(), FaultFlags::WRITE) {
        Err(FaultError::ReadOnly { addr }) => assert_eq!(addr, m.page(4)),
        r => panic!("expected ReadOnly, got {r:?}"),
    }
    let s = f.range_fault(m.pages(2, 6), FaultFlags::SNAPSHOT).unwrap();
    assert_eq!(s, vec![PageState::Zero; 4]);
    let s = f.range_fault(m.pages(0, 4), FaultFlags::WRITE).unwrap();
    assert_eq!(s, vec![VALID_RW; 4]);
}

#[test]
fn bad_ranges() {
    let _serial = serial();
    let f = RangeFaulter::new().unwrap();
    let r = |start: u64, len: u64| f.range_fault_at(VirtAddr(start), len, FaultFlags::READ);
    assert!(matches!(
        r(0x10000, 0),
        Err(FaultError::Range(RangeError::Empty { .. }))
    ));
    assert!(matches!(
        r(0x10001, 4096),
        Err(FaultError::Range(RangeError::Unaligned { .. }))
    ));
    assert!(matches!(
        r(0x10000, 4097),
        Err(FaultError::Range(RangeError::Unaligned { .. }))
    ));
    assert!(matches!(
        r(u64::MAX - 0xfff, 0x2000),
        Err(FaultError::Range(RangeError::Overflow { .. }))
    ));
    assert!(matches!(
        r(0xffff_8000_0000_0000, 4096),
        Err(FaultError::Range(RangeError::KernelHalf { .. }))
    ));
    assert!(matches!(
        f.range_fault_at(VirtAddr(0xffff_8000_0000_0000), 4096, FaultFlags::SNAPSHOT),
        Err(FaultError::Range(RangeError::KernelHalf { .. }))
    ));
    // Page zero is never mapped.
    assert!(matches!(
        r(0, 4096),
        Err(FaultError::Unmapped { addr: VirtAddr(0) })
    ));
}

#[test]
fn pread_fallback_matches_scan() {
    let _serial = serial();
    let m = Map::anon(32, RW);
    for i in [1, 2, 3, 10, 31] {
        m.write(i, 1);
    }
    for i in [5, 6, 20] {
        let _ = m.read(i);
    }
    let t = TempFile::new("fallback", 4);
    let fm = Map::new(4, RW, libc::MAP_PRIVATE, t.fd());
    let _ = fm.read(0);
    fm.write(2, 9);
    let scan = RangeFaulter::new().unwrap();
    let fb = RangeFaulter::with_parts(
        Arc::new(MappingCache::new()),
        Pagemap::open_fallback().unwrap(),
    );
    assert!(
        scan.pagemap().uses_scan_ioctl(),
        "Linux 6.7+ has PAGEMAP_SCAN"
    );
    assert!(!fb.pagemap().uses_scan_ioctl());
    for r in [m.range(), fm.range()] {
        let a = scan.range_fault(r, FaultFlags::SNAPSHOT).unwrap();
        let mut b = fb.range_fault(r, FaultFlags::SNAPSHOT).unwrap();
        if !fb.pagemap().knows_zero_page() {
            // Without CAP_SYS_ADMIN the fallback cannot see the zero page's
            // frame and conservatively calls it a read-only valid page.
            for (x, y) in a.iter().zip(b.iter_mut()) {
                if *x == PageState::Zero && *y == VALID_RO {
                    *y = PageState::Zero;
                }
            }
        }
        assert_eq!(a, b, "snapshot of {r}");
    }
    let s = fb.range_fault(m.range(), FaultFlags::SNAPSHOT).unwrap();
    assert_eq!(s[1], VALID_RW);
    assert_eq!(s[0], PageState::Zero);
    // Faulting through the fallback reader works too.
    assert_eq!(
        fb.range_fault(m.range(), FaultFlags::WRITE).unwrap(),
        vec![VALID_RW; 32]
    );
}

/// The fallback's per-page touch is a real write in every build: a page
/// the read fault left on the shared zero page gets its own frame. (An
/// unused `fetch_add(0)` compiled to nothing in release, leaving the zero
/// page in place.)
#[test]
fn touch_write_takes_a_write_fault() {
    let _serial = serial();
    let m = Map::anon(2, RW);
    let f = RangeFaulter::new().unwrap();
    f.range_fault(m.pages(0, 2), FaultFlags::READ).unwrap();
    assert_eq!(present(m.pages(0, 2)).1, vec![0, 1], "read left zero pages");
    let p = m.pages(0, 1).start().get() as *mut u8;
    // SAFETY: `p` is the first byte of page 0 of `m`, which is mapped
    // readable and writable for the whole test and not unmapped by anyone.
    unsafe { hmm_core::cpu::range_fault::touch_write(p) };
    let (all, zero) = present(m.pages(0, 2));
    assert_eq!(all, vec![0, 1]);
    assert_eq!(zero, vec![1], "page 0 was written, page 1 was not");
    assert_eq!(m.read(0), 0, "the touch kept the contents");
}

#[test]
fn touch_populate_fallback() {
    let _serial = serial();
    let m = Map::anon(8, RW);
    m.write(0, 3);
    let ro = Map::anon(2, libc::PROT_READ);
    let none = Map::anon(2, libc::PROT_NONE);
    let f = RangeFaulter::new().unwrap();
    f.force_touch_populate();
    assert_eq!(f.populate_method(), PopulateMethod::Touch);
    let s = f.range_fault(m.pages(0, 4), FaultFlags::READ).unwrap();
    assert_eq!(
        s,
        vec![VALID_RW, PageState::Zero, PageState::Zero, PageState::Zero]
    );
    assert_eq!(
        present(m.pages(0, 4)).1,
        vec![1, 2, 3],
        "zero pages mapped by the read"
    );
    let s = f.range_fault(m.range(), FaultFlags::WRITE).unwrap();
    assert_eq!(s, vec![VALID_RW; 8]);
    assert_eq!(m.read(0), 3, "the no-op write kept the contents");
    assert!(matches!(
        f.range_fault(ro.range(), FaultFlags::WRITE),
        Err(FaultError::ReadOnly { .. })
    ));
    assert_eq!(
        f.range_fault(ro.range(), FaultFlags::READ).unwrap(),
        vec![PageState::Zero; 2]
    );
    assert!(matches!(
        f.range_fault(none.range(), FaultFlags::READ),
        Err(FaultError::NoAccess { .. })
    ));
    // Past EOF: the kernel refuses the read, no signal.
    let t = TempFile::new("touch_eof", 1);
    let fm = Map::new(2, RW, libc::MAP_SHARED, t.fd());
    let f = RangeFaulter::new().unwrap();
    f.force_touch_populate();
    assert!(matches!(
        f.range_fault(fm.range(), FaultFlags::WRITE),
        Err(FaultError::Populate { .. })
    ));
}

#[test]
fn stale_cache_still_reports_unmapped() {
    let _serial = serial();
    let m = Map::anon(4, RW);
    let f = RangeFaulter::new().unwrap();
    assert_eq!(
        f.range_fault(m.range(), FaultFlags::SNAPSHOT)
            .unwrap()
            .len(),
        4
    );
    let reads = f.maps().rereads();
    // Unmapped behind the cache's back (no event): the populate fails and
    // the refreshed map names the hole.
    m.unmap(1, 2);
    match f.range_fault(m.range(), FaultFlags::READ) {
        Err(FaultError::Unmapped { addr }) => assert_eq!(addr, m.page(1)),
        r => panic!("expected Unmapped, got {r:?}"),
    }
    assert!(f.maps().rereads() > reads);
}

#[test]
fn mapping_cache_invalidation() {
    let _serial = serial();
    let m = Map::anon(4, RW);
    let cache = MappingCache::new();
    let g0 = cache.generation();
    let at = m.page(0);
    assert!(cache.lookup(at).unwrap().unwrap().write);
    let reads = cache.rereads();
    assert!(cache.lookup(m.page(3)).unwrap().is_some());
    assert_eq!(cache.rereads(), reads, "hit");
    // mprotect gives no event: the cache is stale until invalidated.
    m.protect(0, 4, libc::PROT_READ);
    assert!(cache.lookup(at).unwrap().unwrap().write);
    cache.invalidate(m.range());
    assert!(cache.generation() > g0);
    let now = cache.lookup(at).unwrap().unwrap();
    assert!(!now.write && now.read);
    assert_eq!(cache.rereads(), reads + 1);
    // munmap + invalidate: the lookup re-reads and finds the hole.
    m.unmap(0, 4);
    cache.invalidate(m.range());
    assert!(cache.lookup(at).unwrap().is_none());
    assert_eq!(cache.rereads(), reads + 2);
}

#[test]
fn mapping_cache_remap() {
    let _serial = serial();
    // Reserve a destination, then move two pages there with mremap.
    let src = Map::anon(4, RW);
    let dst = Map::anon(4, libc::PROT_NONE);
    src.write(1, 11);
    let cache = MappingCache::new();
    assert!(cache.lookup(src.page(0)).unwrap().unwrap().write);
    assert!(!cache.lookup(dst.page(0)).unwrap().unwrap().read);
    // SAFETY: moving pages 1..3 of our own mapping onto our own reserved
    // destination (MREMAP_FIXED replaces it); no reference into either.
    let p = unsafe {
        libc::mremap(
            src.page(1).as_mut_ptr(),
            2 * PS,
            2 * PS,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.page(1).as_mut_ptr(),
        )
    };
    assert_eq!(p, dst.page(1).as_mut_ptr());
    cache.remap(src.pages(1, 3), dst.page(1));
    let reads = cache.rereads();
    let moved = cache.lookup(dst.page(2)).unwrap().unwrap();
    assert!(
        moved.read && moved.write,
        "moved knowledge answers without re-reading"
    );
    assert!(
        !cache.lookup(dst.page(0)).unwrap().unwrap().read,
        "rest of the reservation"
    );
    assert!(cache.lookup(src.page(3)).unwrap().unwrap().write);
    assert_eq!(cache.rereads(), reads);
    assert!(
        cache.lookup(src.page(1)).unwrap().is_none(),
        "old place is a hole"
    );
    assert_eq!(cache.rereads(), reads + 1);
    assert_eq!(dst.read(1), 11);
    // And range_fault agrees with the moved mapping.
    let f = RangeFaulter::new().unwrap();
    assert_eq!(
        f.range_fault(dst.pages(1, 3), FaultFlags::SNAPSHOT)
            .unwrap()[0],
        VALID_RW
    );
}

/// Kernel release as (major, minor).
fn kernel_version() -> (u32, u32) {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut it = rel
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// `populate_runs` populates exactly the runs asked, for read (zero pages
/// in anonymous memory) and for write, in one `process_madvise` call where
/// the kernel allows it (6.13+) and one `madvise` per run when forced to.
#[test]
fn populate_runs_batched_and_per_range() {
    let _serial = serial();
    let scattered = [1usize, 5, 9, 30, 31, 47, 63];
    for batched in [true, false] {
        let m = Map::anon(64, RW);
        let f = RangeFaulter::new().unwrap();
        assert_eq!(f.batch_populate(), kernel_version() >= (6, 13));
        let caps = hmm_core::cpu::probe::Capabilities::get();
        assert_eq!(caps.populate_batch.is_ok(), f.batch_populate(), "{caps}");
        if !batched {
            f.force_per_range_populate();
            assert!(!f.batch_populate());
        }
        let mut runs: Vec<VaRange> = scattered.iter().map(|&i| m.pages(i, i + 1)).collect();
        runs.push(m.pages(12, 15));
        let mut want: Vec<usize> = scattered.to_vec();
        want.extend(12..15);
        want.sort_unstable();
        f.populate_runs(&runs, false).unwrap();
        assert_eq!(
            present(m.range()),
            (want.clone(), want.clone()),
            "read: zero pages, batched {batched}"
        );
        let s0 = f.stats();
        f.populate_runs(&runs, true).unwrap();
        assert_eq!(
            present(m.range()),
            (want.clone(), vec![]),
            "write: real pages, batched {batched}"
        );
        let d = f.stats();
        let (calls, populates) = (d.batch_calls - s0.batch_calls, d.populates - s0.populates);
        if f.batch_populate() {
            assert_eq!((calls, populates), (1, 0), "one call for all runs");
        } else {
            assert_eq!(
                (calls, populates),
                (0, runs.len() as u64),
                "one madvise per run"
            );
        }
        // More runs than one call takes: split into calls of 1024.
        let big = Map::anon(2100, RW);
        let runs: Vec<VaRange> = (0..2100).step_by(2).map(|i| big.pages(i, i + 1)).collect();
        let s0 = f.stats();
        f.populate_runs(&runs, true).unwrap();
        let (all, zero) = present(big.range());
        assert_eq!(all, (0..2100).step_by(2).collect::<Vec<_>>());
        assert!(zero.is_empty());
        if f.batch_populate() {
            assert_eq!(f.stats().batch_calls - s0.batch_calls, 2);
        }
    }
}

/// A batch call that fails part-way falls back to the per-range path for
/// the runs not done, so the error is the one that path gives, and the
/// runs before the failing one are populated either way.
#[test]
fn populate_runs_errors_are_the_per_range_ones() {
    let _serial = serial();
    let t = TempFile::new("batch_eof", 1);
    let m = Map::anon(8, RW);
    let ro = Map::anon(2, libc::PROT_READ);
    let hole = Map::anon(3, RW);
    hole.unmap(1, 2);
    let eof = Map::new(2, RW, libc::MAP_SHARED, t.fd());
    let cases: Vec<(&str, Vec<VaRange>, bool)> = vec![
        (
            "read-only",
            vec![m.pages(1, 2), ro.pages(0, 1), m.pages(5, 6)],
            true,
        ),
        (
            "hole",
            vec![m.pages(1, 2), hole.pages(1, 2), m.pages(5, 6)],
            false,
        ),
        (
            "past EOF",
            vec![m.pages(1, 2), eof.pages(1, 2), m.pages(5, 6)],
            true,
        ),
    ];
    for (name, runs, write) in cases {
        let mut got = Vec::new();
        for batched in [true, false] {
            // SAFETY: discards pages of our own mapping.
            unsafe { libc::madvise(m.p.cast(), m.len, libc::MADV_DONTNEED) };
            let f = RangeFaulter::new().unwrap();
            if !batched {
                f.force_per_range_populate();
            }
            let e = f.populate_runs(&runs, write).unwrap_err();
            assert!(
                matches!(
                    (name, &e),
                    ("read-only", FaultError::ReadOnly { .. })
                        | ("hole", FaultError::Unmapped { .. })
                        | ("past EOF", FaultError::Populate { .. })
                ),
                "{name}: {e:?}"
            );
            assert_eq!(
                present(m.range()).0,
                vec![1],
                "{name}: run before the failure done"
            );
            got.push(e.to_string());
        }
        assert_eq!(got[0], got[1], "{name}: batched and per-range errors");
    }
    // Unaligned runs are refused before anything is populated.
    let f = RangeFaulter::new().unwrap();
    let bad = VaRange::new(m.page(0), VirtAddr(m.page(1).get() + 1)).unwrap();
    assert!(matches!(
        f.populate_runs(&[m.pages(2, 3), bad], false),
        Err(FaultError::Range(RangeError::Unaligned { .. }))
    ));
}

/// Whether page `i` of `m` is resident in this process (`mincore`).
fn resident(m: &Map, i: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: one page of our own mapping; `v` receives one byte.
    let rc = unsafe { libc::mincore(m.p.add(i * PS).cast(), PS, &mut v) };
    rc == 0 && v & 1 == 1
}

/// After `fork`, the pidfd the faulter opened still names the parent: a
/// child's `populate_runs` must populate the child's pages, never the
/// parent's. (The faulter checks the pid and goes per range; the kernel
/// would also refuse `MADV_POPULATE_*` on another process's memory with
/// `EINVAL` — checked on 6.18 with the pid check removed — and the failed
/// batch falls back per range. This test checks the outcome, either way.)
/// The child only makes syscalls (no allocation on this path) and reports
/// through its exit status.
#[test]
fn populate_runs_in_a_forked_child_populates_the_child() {
    let _serial = serial();
    let f = RangeFaulter::new().unwrap();
    let m = Map::anon(4, RW);
    let runs = [m.pages(1, 2), m.pages(3, 4)];
    // SAFETY: the child only calls populate_runs (madvise on its own copy
    // of `m`, no allocation on success), mincore and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let ok = f.populate_runs(&runs, true).is_ok()
            && resident(&m, 1)
            && resident(&m, 3)
            && !resident(&m, 0);
        // SAFETY: ends the child at once, running nothing of the parent's.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child: its own pages not populated (status {status:#x})"
    );
    assert!(
        !resident(&m, 1) && !resident(&m, 3),
        "the parent's pages were populated by the child's call"
    );
    // In the parent the batch path is used again.
    let before = f.stats().batch_calls;
    f.populate_runs(&runs, true).unwrap();
    assert!(resident(&m, 1) && resident(&m, 3));
    if f.batch_populate() {
        assert_eq!(f.stats().batch_calls, before + 1);
    }
}
