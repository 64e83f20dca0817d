//! What every scenario shares: test mappings, the mirror set-up, and the
//! userfaultfd check. [`TestMap`] and [`events_available`] are public for
//! drivers' own tests.

use std::sync::Arc;

use hmm_core::cpu::host::{EventSource, HostSpace};
use hmm_core::mirror::backend::Backend;
use hmm_core::mirror::{LaunchReport, Mirror, MirrorConfig, MirrorError};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

use crate::{TestKernel, TestKernels};

/// Fails a test with a clear line when userfaultfd is missing and
/// `HMM_REQUIRE_UFFD=1`; otherwise returns whether events are available.
pub fn events_available(host: &HostSpace) -> bool {
    let ok = matches!(host.event_source(), EventSource::Userfaultfd);
    if !ok {
        assert!(
            std::env::var("HMM_REQUIRE_UFFD").as_deref() != Ok("1"),
            "HMM_REQUIRE_UFFD=1 but userfaultfd is unavailable: {:?}",
            host.event_source()
        );
        eprintln!(
            "skip: userfaultfd unavailable ({:?}); event-driven checks skipped",
            host.event_source()
        );
    }
    ok
}

/// An `mmap`ed region for tests; unmapped on drop unless already gone.
#[derive(Debug)]
pub struct TestMap {
    ptr: *mut u8,
    pub(crate) len: usize,
    live: bool,
}

// SAFETY: the mapping is plain memory owned by this value; moving the
// owner between threads is fine (accesses are the tests' business).
unsafe impl Send for TestMap {}
// SAFETY: as above; shared access only hands out addresses.
unsafe impl Sync for TestMap {}

impl TestMap {
    /// A private anonymous mapping of `pages` pages with `prot`.
    pub fn anon(pages: usize, prot: i32) -> TestMap {
        Self::map(pages, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }
    /// A shared anonymous mapping.
    pub fn shared_anon(pages: usize) -> TestMap {
        Self::map(
            pages,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
        )
    }
    /// A mapping of `file` (`flags` = `MAP_SHARED` or `MAP_PRIVATE`).
    pub fn file(file: &std::fs::File, pages: usize, prot: i32, flags: i32) -> TestMap {
        use std::os::fd::AsRawFd;
        Self::map(pages, prot, flags, file.as_raw_fd())
    }
    /// Maps `pages` between two `PROT_NONE` guard pages, so the kernel
    /// cannot merge the mapping with a neighbour's into one VMA (tests run
    /// in parallel threads of one process; merged neighbours would see each
    /// other's unmaps).
    fn map(pages: usize, prot: i32, flags: i32, fd: i32) -> TestMap {
        let len = pages * PAGE_SIZE as usize;
        let pg = PAGE_SIZE as usize;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: reserves fresh address space at a kernel-chosen address;
        // nothing else refers to it.
        let guard = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + 2 * pg,
                libc::PROT_NONE,
                anon,
                -1,
                0,
            )
        };
        assert_ne!(
            guard,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let want = (guard as usize + pg) as *mut libc::c_void;
        // SAFETY: MAP_FIXED over the middle of our own reservation only.
        let p = unsafe { libc::mmap(want, len, prot, flags | libc::MAP_FIXED, fd, 0) };
        assert_eq!(p, want, "mmap: {}", std::io::Error::last_os_error());
        TestMap {
            ptr: p.cast(),
            len,
            live: true,
        }
    }
    /// First address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    /// The range.
    pub fn range(&self) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.addr()), self.len as u64).expect("mapping range")
    }
    /// Writes word `i` (the mapping must be writable).
    pub fn write_word(&self, i: usize, v: u32) {
        assert!(i < self.len / 4);
        // SAFETY: in bounds of the live mapping, which tests only write
        // while it is writable; volatile so the store is not elided or
        // cached across device launches. No Rust reference to the memory
        // exists.
        unsafe { self.ptr.cast::<u32>().add(i).write_volatile(v) }
    }
    /// Writes every word: word `i` becomes `f(i)`.
    pub fn fill(&self, f: impl Fn(usize) -> u32) {
        for i in 0..self.len / 4 {
            self.write_word(i, f(i));
        }
    }
    /// Reads word `i` without needing write permission.
    pub fn read_word(&self, i: usize) -> u32 {
        assert!(i < self.len / 4);
        // SAFETY: in bounds of the live mapping; volatile so the compiler
        // cannot cache it across device launches.
        unsafe { self.ptr.cast::<u32>().add(i).read_volatile() }
    }
    /// `mprotect` the whole mapping.
    pub fn protect(&self, prot: i32) {
        // SAFETY: changes protection of our own mapping only; no Rust
        // reference into it exists.
        let r = unsafe { libc::mprotect(self.ptr.cast(), self.len, prot) };
        assert_eq!(r, 0);
    }
    /// `munmap` it now.
    pub fn unmap(&mut self) {
        if self.live {
            let pg = PAGE_SIZE as usize;
            // SAFETY: our own mapping and its two guard pages, unmapped once.
            unsafe { libc::munmap(self.ptr.sub(pg).cast(), self.len + 2 * pg) };
            self.live = false;
        }
    }
}

impl Drop for TestMap {
    fn drop(&mut self) {
        self.unmap();
    }
}

pub(crate) fn setup<B: TestKernels>(backend: B, cfg: MirrorConfig) -> (Arc<HostSpace>, Mirror<B>) {
    let host = Arc::new(HostSpace::new().expect("host space"));
    let m = Mirror::new(Arc::clone(&host), backend, cfg).expect("mirror");
    (host, m)
}

pub(crate) fn small_cfg() -> MirrorConfig {
    MirrorConfig {
        pool_slots: 4096,
        table_pages: 512,
        ..MirrorConfig::default()
    }
}

/// Words per page.
pub(crate) const WPP: usize = PAGE_SIZE as usize / 4;

/// Device reads of `pages` pages of `src` into `out`; returns the report.
pub(crate) fn device_copy<B: TestKernels>(
    m: &Mirror<B>,
    src: u64,
    out: &TestMap,
    words: usize,
) -> Result<LaunchReport, MirrorError> {
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    m.launch(&k, words as u32, [src, out.addr()])
}

/// Whether the mirror's device is a zero-copy one.
pub(crate) fn zero_copy<B: Backend>(m: &Mirror<B>) -> bool {
    m.backend().host_windows().is_some()
}
