//! The conformance suite every backend runs, including the port of the
//! Linux kernel's HMM selftests (`tools/testing/selftests/mm/hmm-tests.c`,
//! run there against the `dmirror` test device of `lib/test_hmm.c`).
//!
//! A driver implements [`TestKernels`] (a handful of tiny kernels in its
//! own kernel language) and instantiates the suite in one line:
//!
//! ```text
//! hmm_core::conformance_tests!(hmm_driver_cpu::CpuDevice::new());
//! ```
//!
//! which expands to one `#[test]` per scenario, named after the kernel
//! test it ports (`anon_read`, `anon_write_prot`, …).
//!
//! # What carries over from the kernel tests, and what does not
//!
//! `dmirror` reads and writes through ioctls that fault pages into the
//! device; here the same accesses come from device kernels whose faults the
//! mirror services, and the kernel's `cpages`/`faults` counters become the
//! mirror's `pages_in`/`fault_batches`. `mixedmap` maps the dmirror device
//! file itself (`VM_MIXEDMAP`); no such file exists in userspace, so the
//! port reads one kernel launch across mappings of different kinds (private
//! anonymous, shared file, read-only) instead. The fork tests check that
//! the child, which has no mirror (documented), cannot disturb the parent's
//! device view. `migrate`/`exclusive` tests need device-private struct
//! pages and are not ported.

use std::sync::Arc;

use super::backend::{Backend, BackendError};
use super::error::{AccessError, MirrorError};
use super::{Advice, Mirror, MirrorConfig};
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::cpu::host::HostSpace;
use crate::notifier::EventKind;

/// The kernels the suite needs, which each backend writes in its own
/// kernel language. Arguments are 64-bit words; pointers are CPU
/// addresses; every access goes through the device page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKernel {
    /// `out[i] = src[i]` as `u32`; args `[src, out]`.
    CopyU32,
    /// `dst[i] = base + i` as `u32`; args `[dst, base]`.
    FillU32,
    /// `p[i] = p[i] + 1` as `u32` (plain load then store); args `[p]`.
    IncrementU32,
    /// Sums a linked list on the device: each node is
    /// `{ next: u64, value: u64 }`; invocation 0 walks from `head` and
    /// stores the sum at `out`; args `[head, out]`.
    ListSum,
}

/// A backend that can build the suite's kernels.
pub trait TestKernels: Backend {
    /// Builds one of the suite's kernels.
    fn test_kernel(&self, k: TestKernel) -> Result<Box<Self::Kernel>, BackendError>;
}

/// Fails a test with a clear line when userfaultfd is missing and
/// `HMM_REQUIRE_UFFD=1`; otherwise returns whether events are available.
pub fn events_available(host: &HostSpace) -> bool {
    let ok = matches!(
        host.event_source(),
        crate::cpu::host::EventSource::Userfaultfd
    );
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
    len: usize,
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

fn setup<B: TestKernels>(backend: B, cfg: MirrorConfig) -> (Arc<HostSpace>, Mirror<B>) {
    let host = Arc::new(HostSpace::new().expect("host space"));
    let m = Mirror::new(Arc::clone(&host), backend, cfg).expect("mirror");
    (host, m)
}

fn small_cfg() -> MirrorConfig {
    MirrorConfig {
        pool_slots: 4096,
        table_pages: 512,
        ..MirrorConfig::default()
    }
}

/// Words per page.
const WPP: usize = PAGE_SIZE as usize / 4;

/// Kernel test `open_close`: a mirror can be created and dropped.
pub fn open_close<B: TestKernels>(b: B) {
    let (host, m) = setup(b, small_cfg());
    assert_eq!(m.stats().pool_used, 0);
    drop(m);
    assert!(host.space().subscribed_ranges().is_empty());
}

/// Device reads of `pages` pages of `src` into `out`; returns the report.
fn device_copy<B: TestKernels>(
    m: &Mirror<B>,
    src: u64,
    out: &TestMap,
    words: usize,
) -> Result<super::LaunchReport, MirrorError> {
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    m.launch(&k, words as u32, [src, out.addr()])
}

/// Kernel test `anon_read`: the device reads anonymous memory the CPU
/// wrote; every page is copied in once.
pub fn anon_read<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let pages = 16;
    let src = TestMap::anon(pages, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(pages, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32 ^ 0x5a5a_0000);
    let r = device_copy(&m, src.addr(), &out, pages * WPP).expect("launch");
    for i in 0..pages * WPP {
        assert_eq!(out.read_word(i), i as u32 ^ 0x5a5a_0000, "word {i}");
    }
    assert_eq!(
        r.pages_in,
        2 * pages as u64,
        "each page of src and out copied in once"
    );
    let st = m.stats();
    // (A zero-copy device maps the CPU's pages: no pool.)
    let pool = if zero_copy(&m) { 0 } else { 2 * pages as u64 };
    assert_eq!(st.pool_used, pool);
    // The kernel test expects one fault for the whole range; here: one
    // batch per round (the src pages, then — on replay — the out pages).
    assert_eq!(st.fault_batches, 2, "one fault batch per range");
    assert!(st.faults > 0 && st.replays >= 1);
    // A second read of the same data faults nothing in.
    let r2 = device_copy(&m, src.addr(), &out, pages * WPP).expect("launch");
    assert_eq!(r2.pages_in, 0);
    assert_eq!(r2.submissions, 1);
}

/// Kernel test `anon_read_prot`: reading `PROT_NONE` memory is an error
/// naming the address; after `mprotect(PROT_READ)` (and the explicit
/// invalidation the kernel gives no event for) it reads.
pub fn anon_read_prot<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    src.write_word(0, 42);
    src.protect(libc::PROT_NONE);
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    match device_copy(&m, src.addr(), &out, 4 * WPP) {
        Err(MirrorError::DeviceFault {
            addr,
            write: false,
            reason: AccessError::NoAccess,
        }) => {
            assert_eq!(addr.page_down(), VirtAddr(src.addr()).page_down());
        }
        other => panic!("expected a NoAccess device fault, got {other:?}"),
    }
    src.protect(libc::PROT_READ);
    h.maps().invalidate(src.range());
    h.space().invalidate(src.range(), EventKind::Protection);
    device_copy(&m, src.addr(), &out, 4 * WPP).expect("readable now");
    assert_eq!(out.read_word(0), 42);
}

/// Kernel test `anon_write`: the device writes anonymous memory; the CPU
/// sees it when the launch returns.
pub fn anon_write<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let pages = 16;
    let dst = TestMap::anon(pages, libc::PROT_READ | libc::PROT_WRITE);
    let k = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    m.launch(&k, (pages * WPP) as u32, [dst.addr(), 1000])
        .expect("launch");
    for i in 0..pages * WPP {
        assert_eq!(dst.read_word(i), 1000 + i as u32);
    }
    // Zero-copy: the device wrote the CPU's own pages; nothing to write back.
    let want = if zero_copy(&m) { 0 } else { pages as u64 };
    assert_eq!(m.stats().pages_out, want, "every page written back once");
}

/// Kernel test `anon_write_prot`: writing read-only memory is an error
/// naming the address; after `mprotect(PROT_READ|PROT_WRITE)` it works.
pub fn anon_write_prot<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let dst = TestMap::anon(2, libc::PROT_READ);
    let k = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    match m.launch(&k, (2 * WPP) as u32, [dst.addr(), 7]) {
        Err(MirrorError::DeviceFault {
            write: true,
            reason: AccessError::ReadOnly,
            addr,
        }) => {
            assert!(dst.range().contains(addr));
        }
        other => panic!("expected a ReadOnly device fault, got {other:?}"),
    }
    dst.protect(libc::PROT_READ | libc::PROT_WRITE);
    h.maps().invalidate(dst.range());
    h.space().invalidate(dst.range(), EventKind::Protection);
    m.launch(&k, (2 * WPP) as u32, [dst.addr(), 7])
        .expect("writable now");
    assert_eq!(dst.read_word(5), 12);
}

fn fork_and_write(map: &TestMap, value: u32) {
    // SAFETY: the child only writes to memory and calls _exit, both
    // async-signal-safe, so forking a multi-threaded test process is fine.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let p = map.addr() as *mut u32;
        for i in 0..map.len / 4 {
            // SAFETY: the child's copy of the live, writable mapping.
            unsafe { p.add(i).write_volatile(value) };
        }
        // SAFETY: terminating the child without running the parent's
        // destructors (they belong to the parent).
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}

/// Kernel test `anon_write_child`: a forked child (which has no mirror)
/// writes its copy of private memory; the parent's device view and memory
/// are unchanged, and the parent's device keeps working.
pub fn anon_write_child<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let src = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 1);
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch");
    fork_and_write(&src, 2);
    device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch after fork");
    assert_eq!(
        out.read_word(3),
        1,
        "the child's private writes are invisible to the parent"
    );
    assert_eq!(src.read_word(3), 1);
}

/// Kernel test `anon_write_child_shared`: with a shared mapping the
/// child's writes are the parent's too; the kernel sends the parent no
/// event for them, so the parent's device sees them after an explicit
/// invalidation (documented: valid as of the last sync point).
pub fn anon_write_child_shared<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::shared_anon(4);
    src.fill(|_| 1);
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch");
    fork_and_write(&src, 2);
    assert_eq!(src.read_word(3), 2, "shared memory");
    h.space().invalidate(src.range(), EventKind::Clear);
    device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch after fork");
    assert_eq!(out.read_word(3), 2);
}

/// Kernel test `anon_write_huge`: a 2 MiB-aligned (transparent huge page
/// eligible) range is written by the device and registered as one 2 MiB
/// region.
pub fn anon_write_huge<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let big = TestMap::anon(1024, libc::PROT_READ | libc::PROT_WRITE); // 4 MiB
    let start = (big.addr() + 0x1f_ffff) & !0x1f_ffff;
    // SAFETY: advice on our own mapping; failure only loses huge pages.
    unsafe { libc::madvise(start as *mut libc::c_void, 0x20_0000, libc::MADV_HUGEPAGE) };
    let k = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    m.launch(&k, 0x20_0000 / 4, [start, 0]).expect("launch");
    let off = ((start - big.addr()) / 4) as usize;
    for i in (0..0x20_0000 / 4).step_by(997) {
        assert_eq!(big.read_word(off + i), i as u32);
    }
    assert!(
        m.regions()
            .iter()
            .any(|r| r.start().0 == start && r.len() == 0x20_0000),
        "one 2 MiB region: {:?}",
        m.regions()
    );
}

fn temp_file(pages: usize, fill: u8) -> std::fs::File {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!(
        "hmm-conf-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    f.write_all(&vec![fill; pages * PAGE_SIZE as usize])
        .expect("write");
    let _ = std::fs::remove_file(&path);
    f
}

/// Kernel test `file_read`: the device reads a file-backed mapping.
pub fn file_read<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let f = temp_file(4, 0x11);
    let src = TestMap::file(&f, 4, libc::PROT_READ, libc::MAP_PRIVATE);
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch");
    assert_eq!(out.read_word(100), 0x1111_1111);
}

/// Kernel test `file_write`: the device writes a shared file mapping; the
/// data reaches the file.
pub fn file_write<B: TestKernels>(b: B) {
    use std::io::{Read, Seek};
    let (_h, m) = setup(b, small_cfg());
    let mut f = temp_file(4, 0);
    let dst = TestMap::file(&f, 4, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    let k = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    m.launch(&k, (4 * WPP) as u32, [dst.addr(), 0x100])
        .expect("launch");
    f.rewind().expect("seek");
    let mut buf = vec![0u8; 4 * PAGE_SIZE as usize];
    f.read_exact(&mut buf).expect("read");
    assert_eq!(
        u32::from_ne_bytes(buf[40..44].try_into().expect("4 bytes")),
        0x100 + 10
    );
}

/// Kernel test `anon_read_multiple`: repeated device reads see each CPU
/// update made between launches (the sync point invalidates CPU-written
/// pages).
pub fn anon_read_multiple<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    let tracked = events_available(&h);
    for round in 0..5u32 {
        src.fill(|_| round);
        if !tracked {
            h.space().invalidate(src.range(), EventKind::CpuWrite);
        }
        device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch");
        assert_eq!(out.read_word(1000), round, "round {round}");
    }
}

/// Kernel test `anon_teardown`: memory is unmapped while device reads of
/// it run in other threads; every launch either completes or fails with a
/// typed device fault, nothing hangs, and the dead regions are released.
pub fn anon_teardown<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let m = Arc::new(m);
    for _ in 0..20 {
        let mut src = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
        src.fill(|_| 3);
        let out = Arc::new(TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE));
        let (m2, o2, a) = (Arc::clone(&m), Arc::clone(&out), src.addr());
        let t = std::thread::spawn(move || device_copy(&m2, a, &o2, 8 * WPP));
        std::thread::yield_now();
        src.unmap();
        // Completed before the unmap, or ended with a typed device fault
        // naming the address (Unmapped — or, if another thread's mmap
        // reused the freed addresses meanwhile, whatever that mapping
        // allows).
        match t.join().expect("launch thread") {
            Ok(_) | Err(MirrorError::DeviceFault { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    if events_available(&h) {
        assert!(m.flush_releases(), "dead regions released");
        assert!(m.stats().deferred_releases > 0 || m.stats().invalidations[0] == 0);
    }
}

/// Kernel test `mixedmap` (ported, see the module docs): one launch reads
/// across a private anonymous page, a shared file page and a read-only
/// page.
pub fn mixedmap<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let a = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    a.fill(|_| 1);
    let f = temp_file(1, 2);
    let s = TestMap::file(&f, 1, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    let r = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    r.fill(|_| 3);
    r.protect(libc::PROT_READ);
    for (src, want) in [(&a, 1u32), (&s, 0x0202_0202), (&r, 3)] {
        device_copy(&m, src.addr(), &out, WPP).expect("launch");
        assert_eq!(out.read_word(7), want);
    }
}

/// Kernel test `snapshot`: the page-state snapshot distinguishes
/// populated, untouched (zero), read-only and inaccessible pages.
pub fn snapshot<B: TestKernels>(b: B) {
    use crate::cpu::range_fault::{FaultFlags, PageState};
    let (h, _m) = setup(b, small_cfg());
    let map = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    map.write_word(0, 1); // page 0 populated
    let st = h
        .faulter()
        .range_fault(map.range(), FaultFlags::SNAPSHOT)
        .expect("snapshot");
    assert_eq!(st[0], PageState::Valid { writable: true });
    assert_eq!(st[1], PageState::Zero);
    let ro = TestMap::anon(1, libc::PROT_READ);
    let st = h
        .faulter()
        .range_fault(ro.range(), FaultFlags::READ)
        .expect("snapshot");
    assert!(matches!(
        st[0],
        PageState::Zero | PageState::Valid { writable: false }
    ));
    let none = TestMap::anon(1, libc::PROT_NONE);
    let st = h
        .faulter()
        .range_fault(none.range(), FaultFlags::SNAPSHOT)
        .expect("snapshot");
    assert_eq!(st[0], PageState::Error);
}

/// Kernel test `double_map`: two mirrors (devices) read the same range;
/// a write by one collapses the other's copy, which then reads the new
/// data.
pub fn double_map<B: TestKernels>(b1: B, b2: B) {
    let host = Arc::new(HostSpace::new().expect("host"));
    let m1 = Mirror::new(Arc::clone(&host), b1, small_cfg()).expect("mirror 1");
    let m2 = Mirror::new(Arc::clone(&host), b2, small_cfg()).expect("mirror 2");
    let src = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 5);
    let out1 = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    let out2 = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    device_copy(&m1, src.addr(), &out1, 2 * WPP).expect("m1 read");
    device_copy(&m2, src.addr(), &out2, 2 * WPP).expect("m2 read");
    assert_eq!((out1.read_word(9), out2.read_word(9)), (5, 5));
    let inc = m1
        .backend()
        .test_kernel(TestKernel::IncrementU32)
        .expect("kernel");
    m1.launch(&inc, (2 * WPP) as u32, [src.addr()])
        .expect("m1 write");
    assert_eq!(src.read_word(9), 6);
    device_copy(&m2, src.addr(), &out2, 2 * WPP).expect("m2 re-read");
    assert_eq!(
        out2.read_word(9),
        6,
        "m2's stale copy was collapsed by m1's write"
    );
    assert!(
        m2.stats().invalidations[5] > 0,
        "migrate invalidation reached m2"
    );
}

/// Eviction under a pool smaller than the working set: results stay
/// right and no slot leaks.
pub fn eviction_under_a_small_pool<B: TestKernels>(b: B) {
    let cfg = MirrorConfig {
        pool_slots: 8,
        table_pages: 64,
        ..MirrorConfig::default()
    };
    let (_h, m) = setup(b, cfg);
    let src = TestMap::anon(32, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32);
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    for p in 0..32u64 {
        m.launch(&k, WPP as u32, [src.addr() + p * PAGE_SIZE, out.addr()])
            .expect("launch");
        assert_eq!(out.read_word(17), (p as usize * WPP + 17) as u32);
    }
    let st = m.stats();
    assert!(st.evictions > 0);
    assert!(st.pool_used <= 8);
}

/// A pool of zero pages is a typed error at the first fault, not a panic
/// or a hang.
pub fn zero_page_pool<B: TestKernels>(b: B) {
    let cfg = MirrorConfig {
        pool_slots: 0,
        table_pages: 16,
        ..MirrorConfig::default()
    };
    let (_h, m) = setup(b, cfg);
    let src = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    assert!(matches!(
        device_copy(&m, src.addr(), &out, 4),
        Err(MirrorError::PoolExhausted { .. })
    ));
}

/// Device writes survive eviction (dirty pages are written back first).
pub fn dirty_pages_survive_eviction<B: TestKernels>(b: B) {
    let cfg = MirrorConfig {
        pool_slots: 4,
        table_pages: 64,
        ..MirrorConfig::default()
    };
    let (_h, m) = setup(b, cfg);
    let dst = TestMap::anon(16, libc::PROT_READ | libc::PROT_WRITE);
    let k = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    m.launch(&k, (16 * WPP) as u32, [dst.addr(), 9])
        .expect("launch");
    for i in (0..16 * WPP).step_by(101) {
        assert_eq!(dst.read_word(i), 9 + i as u32);
    }
}

/// Pointer chasing: the device follows the CPU's own `Box` pointers.
pub fn linked_list<B: TestKernels>(b: B) {
    #[repr(C)]
    struct Node {
        next: u64,
        value: u64,
    }
    let (_h, m) = setup(b, small_cfg());
    let mut head = 0u64;
    let mut nodes = Vec::new();
    let mut want = 0u64;
    for v in 1..=500u64 {
        let n = Box::new(Node {
            next: head,
            value: v * 3,
        });
        head = &*n as *const Node as u64;
        want += v * 3;
        nodes.push(n);
    }
    let out = Box::new(0u64);
    let outp = &*out as *const u64 as u64;
    let k = m
        .backend()
        .test_kernel(TestKernel::ListSum)
        .expect("kernel");
    m.launch(&k, 1, [head, outp]).expect("launch");
    // SAFETY: `out` is live; volatile so the device's write-back is read.
    assert_eq!(unsafe { std::ptr::read_volatile(outp as *const u64) }, want);
    drop(nodes);
}

/// The pinning baseline and its hazard: after a CPU write (or an unmap) the
/// device keeps reading the pinned copy; the on-demand mirror does not.
pub fn pinning_hazard_is_real<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 1);
    let out = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    let pin = m.pin(src.range()).expect("pin");
    device_copy(&m, src.addr(), &out, 2 * WPP).expect("launch");
    assert_eq!(out.read_word(3), 1);
    src.fill(|_| 2);
    device_copy(&m, src.addr(), &out, 2 * WPP).expect("launch");
    assert_eq!(
        out.read_word(3),
        1,
        "pinned: the device still sees the old data"
    );
    m.unpin(pin).expect("unpin");
    if !events_available(&h) {
        h.space().invalidate(src.range(), EventKind::CpuWrite);
    }
    device_copy(&m, src.addr(), &out, 2 * WPP).expect("launch");
    assert_eq!(
        out.read_word(3),
        2,
        "mirrored on demand: the device sees the CPU write"
    );
}

/// Teardown with live regions: dropping the mirror removes every
/// subscription and frees every slot; the space is clean.
pub fn teardown_with_live_regions<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32 + 1);
    device_copy(&m, src.addr(), &out, 8 * WPP).expect("launch");
    assert!(!h.space().subscribed_ranges().is_empty());
    // Invalidating everything frees every slot (no leak)…
    h.space()
        .invalidate(VaRange::everything(), EventKind::Clear);
    let st = m.stats();
    assert_eq!((st.pool_used, st.mapped_pages), (0, 0), "every slot free");
    let want = if zero_copy(&m) { 0 } else { 8 };
    assert_eq!(
        st.pages_out, want,
        "the launch wrote its 8 output pages back"
    );
    assert_eq!(out.read_word(8 * WPP - 1), (8 * WPP) as u32);
    // …and dropping the mirror removes every notifier.
    drop(m);
    assert!(
        h.space().subscribed_ranges().is_empty(),
        "every region's notifier removed"
    );
}

/// Concurrent launches and invalidations from several threads: no panic,
/// no deadlock, results right.
pub fn concurrent_launches_and_invalidations<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let m = Arc::new(m);
    let src = Arc::new(TestMap::anon(16, libc::PROT_READ | libc::PROT_WRITE));
    src.fill(|_| 4);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inval = {
        let (h, src, stop) = (Arc::clone(&h), Arc::clone(&src), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = n % 16;
                let r = VaRange::from_start_len(VirtAddr(src.addr() + p * PAGE_SIZE), PAGE_SIZE)
                    .expect("range");
                h.space().invalidate(r, EventKind::Clear);
                n += 1;
                std::thread::yield_now();
            }
            n
        })
    };
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (m, src) = (Arc::clone(&m), Arc::clone(&src));
            std::thread::spawn(move || {
                let out = TestMap::anon(16, libc::PROT_READ | libc::PROT_WRITE);
                for _ in 0..20 {
                    device_copy(&m, src.addr(), &out, 16 * WPP).expect("launch");
                    assert_eq!(out.read_word(16 * WPP - 1), 4);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(inval.join().expect("invalidator") > 0);
}

/// Accessed bits reach the whole-space notifier: after a device read the
/// range is young; `clear_young` reports and clears it; the next device
/// access sets it again.
pub fn accessed_bits_feed_young<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    assert!(!h.space().test_young(src.range()), "nothing mirrored yet");
    device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch");
    assert!(h.space().test_young(src.range()));
    assert!(h.space().clear_young(src.range()));
    assert!(!h.space().test_young(src.range()));
    assert!(!h.space().clear_young(src.range()));
    let r = device_copy(&m, src.addr(), &out, 4 * WPP).expect("launch");
    assert_eq!(r.faults, 0, "still mirrored");
    assert!(h.space().test_young(src.range()), "accessed again");
}

/// Prefetch turns faults into one bulk copy: a launch over prefetched
/// memory faults nothing in.
pub fn prefetch_replaces_faults<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let src = TestMap::anon(64, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32);
    let out = TestMap::anon(64, libc::PROT_READ | libc::PROT_WRITE);
    assert_eq!(m.prefetch(src.range(), false).expect("prefetch"), 64);
    assert_eq!(m.prefetch(out.range(), true).expect("prefetch"), 64);
    let r = device_copy(&m, src.addr(), &out, 64 * WPP).expect("launch");
    assert_eq!((r.faults, r.submissions, r.pages_in), (0, 1, 0));
    assert_eq!(out.read_word(64 * WPP - 1), (64 * WPP - 1) as u32);
    assert_eq!(m.stats().prefetched, 128);
    assert!(matches!(
        m.prefetch(
            VaRange::from_start_len(VirtAddr(0xffff_8000_0000_0000), 4096).expect("range"),
            false
        ),
        Err(MirrorError::Range(_))
    ));
}

/// Read-mostly duplication: two devices keep read-only copies of the same
/// pages side by side (neither read disturbs the other), until one writes.
pub fn read_mostly_duplication<B: TestKernels>(b1: B, b2: B) {
    let host = Arc::new(HostSpace::new().expect("host"));
    let m1 = Mirror::new(Arc::clone(&host), b1, small_cfg()).expect("mirror 1");
    let m2 = Mirror::new(Arc::clone(&host), b2, small_cfg()).expect("mirror 2");
    let src = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 8);
    for m in [&m1, &m2] {
        m.advise(src.range(), Advice::ReadMostly);
    }
    // Separate outputs: a shared one would be written by both devices,
    // and each write rightly collapses the other's copy of it.
    let out1 = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    let out2 = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    device_copy(&m1, src.addr(), &out1, 4 * WPP).expect("m1 read");
    device_copy(&m2, src.addr(), &out2, 4 * WPP).expect("m2 read");
    let again = device_copy(&m1, src.addr(), &out1, 4 * WPP).expect("m1 re-read");
    assert_eq!(
        again.faults, 0,
        "m1's copy survived m2's read: duplicated, not migrated"
    );
    assert_eq!(out2.read_word(5), 8);
    let inc = m2
        .backend()
        .test_kernel(TestKernel::IncrementU32)
        .expect("kernel");
    m2.launch(&inc, (4 * WPP) as u32, [src.addr()])
        .expect("m2 write");
    device_copy(&m1, src.addr(), &out1, 4 * WPP).expect("m1 read after write");
    assert_eq!(out1.read_word(5), 9, "the write collapsed m1's copy");
}

// ------------------------------------------------------------ bad inputs
//
// Every misuse in the catalog (`docs/BAD_INPUTS.md`) that involves a
// mirror: each ends in a typed error (or a documented degradation), never
// a panic, a hang or lost data.

fn expect_fault<T: std::fmt::Debug>(
    r: Result<T, MirrorError>,
    at: u64,
    write: bool,
    reason: AccessError,
) {
    match r {
        Err(MirrorError::DeviceFault {
            addr,
            write: w,
            reason: got,
        }) => {
            assert_eq!(
                (addr.page_down(), w, got),
                (VirtAddr(at).page_down(), write, reason),
                "device fault at {addr}"
            );
        }
        other => panic!("expected a {reason:?} device fault at {at:#x}, got {other:?}"),
    }
}

/// Bad ranges at the mirror's API: a launch of zero invocations does
/// nothing; a zero-length range cannot be built; ranges reaching into the
/// kernel half or past the end of the 64-bit space are `RangeError`s; an
/// unaligned prefetch is rounded out to the pages it touches; a prefetch
/// of unmapped memory is an `Unmapped` device fault. Nothing is mapped by
/// any failure.
pub fn bad_ranges_are_typed_errors<B: TestKernels>(b: B) {
    use crate::addr::USER_VA_END;
    use crate::error::RangeError;
    let (_h, m) = setup(b, small_cfg());
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    let r = m.launch(&k, 0, [0, 0]).expect("an empty launch");
    assert_eq!((r.faults, r.pages_in, r.pages_out), (0, 0, 0));
    assert!(matches!(
        VaRange::from_start_len(VirtAddr(0x10000), 0),
        Err(RangeError::Empty { .. })
    ));
    assert!(matches!(
        VaRange::from_start_len(VirtAddr(u64::MAX - 10), 100),
        Err(RangeError::Overflow { .. })
    ));
    let kernel_half = VaRange::from_start_len(VirtAddr(0xffff_8000_0000_0000), 4096).expect("r");
    let straddling =
        VaRange::new(VirtAddr(USER_VA_END - 4096), VirtAddr(USER_VA_END + 4096)).expect("r");
    for r in [kernel_half, straddling] {
        assert!(matches!(
            m.prefetch(r, false),
            Err(MirrorError::Range(RangeError::KernelHalf { .. }))
        ));
        assert!(matches!(
            m.pin(r),
            Err(MirrorError::Range(RangeError::KernelHalf { .. }))
        ));
    }
    // The last bytes of the space: rounding up to a page end overflows.
    let top = VaRange::new(VirtAddr(u64::MAX - 10), VirtAddr(u64::MAX)).expect("r");
    assert!(matches!(
        m.prefetch(top, true),
        Err(MirrorError::Range(RangeError::Overflow { .. }))
    ));
    // Page zero is never mapped (mmap_min_addr).
    let low = VaRange::from_start_len(VirtAddr(0), 4096).expect("r");
    expect_fault(m.prefetch(low, false), 0, false, AccessError::Unmapped);
    assert_eq!(m.stats().pool_used, 0, "no failure mapped anything");
    let map = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    let unaligned = VaRange::from_start_len(VirtAddr(map.addr() + 100), 4096).expect("r");
    assert_eq!(m.prefetch(unaligned, false).expect("prefetch"), 2);
}

/// Wild device pointers — null, low memory, the first kernel-half byte,
/// the last page and the last word of the 64-bit space — end the launch
/// with a typed `Unmapped` device fault naming the address, for reads and
/// for writes.
pub fn wild_device_pointers_are_typed_faults<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let fill = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    for at in [
        0,
        0x1000,
        crate::addr::USER_VA_END,
        0xffff_ffff_ffff_f000,
        u64::MAX - 3,
    ] {
        expect_fault(
            device_copy(&m, at, &out, 1),
            at,
            false,
            AccessError::Unmapped,
        );
        expect_fault(m.launch(&fill, 1, [at, 0]), at, true, AccessError::Unmapped);
    }
    assert_eq!(m.stats().pool_used, 0);
    // The mirror is still usable.
    let src = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    src.write_word(3, 33);
    device_copy(&m, src.addr(), &out, WPP).expect("launch");
    assert_eq!(out.read_word(3), 33);
}

/// Protection misuse through prefetch (the launch forms are
/// `anon_read_prot` / `anon_write_prot`): a write prefetch of read-only
/// memory is a `ReadOnly` fault, any prefetch of `PROT_NONE` memory a
/// `NoAccess` fault; a read prefetch of read-only memory works.
pub fn prefetch_respects_protection<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let ro = TestMap::anon(2, libc::PROT_READ);
    expect_fault(
        m.prefetch(ro.range(), true),
        ro.addr(),
        true,
        AccessError::ReadOnly,
    );
    let none = TestMap::anon(1, libc::PROT_NONE);
    for w in [false, true] {
        expect_fault(
            m.prefetch(none.range(), w),
            none.addr(),
            w,
            AccessError::NoAccess,
        );
    }
    assert_eq!(m.stats().pool_used, 0);
    assert_eq!(m.prefetch(ro.range(), false).expect("read prefetch"), 2);
}

/// Mappings that cannot be mirrored, or not watched: `[vvar]` (an
/// I/O / PFN mapping the kernel refuses to register and whose pages no one
/// may copy) is a `BadPage` device fault; `memfd_secret` memory (mapped,
/// present, but unreadable to anyone else — where the kernel offers it) is
/// a `BadPage` device fault at once, not a retry loop until the timeout;
/// `[vdso]` cannot be registered with userfaultfd but is readable: it is
/// mirrored and counted in `unwatched_regions` (explicit invalidation only,
/// said once on stderr).
pub fn unmirrorable_mappings_are_typed<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let start_of = |name: &str| {
        maps.lines()
            .find(|l| l.ends_with(name))
            .and_then(|l| l.split('-').next())
            .and_then(|a| u64::from_str_radix(a, 16).ok())
    };
    let vvar = start_of("[vvar]").expect("a [vvar] mapping");
    expect_fault(
        device_copy(&m, vvar, &out, 1),
        vvar,
        false,
        AccessError::BadPage,
    );
    let t0 = std::time::Instant::now();
    // SAFETY: memfd_secret(0) creates a new fd or fails; no memory is
    // touched.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, 0) } as i32;
    if fd >= 0 {
        // SAFETY: sizing and mapping our own new fd; the mapping is ours
        // until the munmap below.
        let p = unsafe {
            libc::ftruncate(fd, 4096);
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the fresh 4 KiB mapping above.
        unsafe { p.cast::<u32>().write_volatile(7) };
        let r = device_copy(&m, p as u64, &out, 1);
        if zero_copy(&m) {
            // A zero-copy device reads the pages itself, no system call in
            // between: a device on this process's own threads can (and
            // does), a GPU driver's import of secret memory fails.
            match r {
                Ok(_) => assert_eq!(out.read_word(0), 7),
                Err(MirrorError::Backend(_)) => {}
                Err(e) => expect_fault(Err::<(), _>(e), p as u64, false, AccessError::BadPage),
            }
        } else {
            expect_fault(r, p as u64, false, AccessError::BadPage);
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_millis(900),
            "typed at once, not after the retry timeout"
        );
        // SAFETY: unmapping and closing what we created above.
        unsafe {
            libc::munmap(p, 4096);
            libc::close(fd);
        }
    } else {
        eprintln!("note: memfd_secret unavailable here; that case is not checked");
    }
    let vdso = start_of("[vdso]").expect("a [vdso] mapping");
    device_copy(&m, vdso, &out, 1).expect("the vdso is readable");
    assert_eq!(out.read_word(0), 0x464c_457f, "the vdso's ELF magic");
    if events_available(&h) {
        assert!(
            m.stats().unwatched_regions >= 1,
            "vdso counted as unwatched"
        );
    }
}

/// A pointer into freed memory: after `munmap` the device gets a typed
/// `Unmapped` fault — unless another thread mapped something at the same
/// address meanwhile (tests run in parallel), in which case the device
/// reads what is there now, exactly as a CPU use-after-free would, and
/// never the freed data.
pub fn freed_memory_is_an_unmapped_fault<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let out = TestMap::anon(13, libc::PROT_READ | libc::PROT_WRITE);
    let mut src = TestMap::anon(13, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 0xdead_0001);
    device_copy(&m, src.addr(), &out, 13 * WPP).expect("launch");
    let addr = src.addr();
    src.unmap();
    if !events_available(&h) {
        h.space().invalidate(src.range(), EventKind::Unmap);
    }
    match device_copy(&m, addr, &out, 13 * WPP) {
        // At the first page — or at a later one when another thread
        // (tests run in parallel) mapped something at the first pages
        // meanwhile; that mapping may also be one the device may not read
        // (a guard page, a PROT_NONE test mapping).
        Err(MirrorError::DeviceFault {
            reason: AccessError::Unmapped | AccessError::NoAccess,
            addr: a,
            ..
        }) => assert!(
            (addr..addr + 13 * PAGE_SIZE).contains(&a.0),
            "fault at {a} outside the freed range at {addr:#x}"
        ),
        Ok(_) => {
            assert!(
                h.lookup(VirtAddr(addr)).expect("maps").is_some(),
                "a launch over freed memory succeeded though nothing is mapped there"
            );
            assert_ne!(out.read_word(5), 0xdead_0001, "the freed data was read");
        }
        other => panic!("expected an Unmapped device fault, got {other:?}"),
    }
}

/// A launch after the mirror is dropped cannot be written: `launch`
/// borrows the mirror. What can happen instead is a kernel handle
/// outliving its mirror and backend, then used on a new mirror over
/// another backend: it must work or be a typed `Backend` error.
pub fn kernel_outliving_its_mirror<B: TestKernels>(b1: B, b2: B) {
    let (_h, m1) = setup(b1, small_cfg());
    let k = m1
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    drop(m1);
    let (_h2, m2) = setup(b2, small_cfg());
    let src = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32);
    match m2.launch(&k, WPP as u32, [src.addr(), out.addr()]) {
        Ok(_) => assert_eq!(out.read_word(77), 77),
        Err(MirrorError::Backend(e)) => eprintln!("foreign kernel refused: {e}"),
        Err(e) => panic!("expected success or a backend error, got {e}"),
    }
    drop(m2);
    drop(k);
}

/// A backend reused — already initialised (by hand, or by another mirror's
/// `Mirror::new`) — is refused by `Mirror::new` with a typed `Backend`
/// error; bad sizes are `Config` errors (a pool of zero slots is allowed
/// and fails at the first fault: `zero_page_pool`).
pub fn reused_backend_and_bad_configs_are_refused<B: TestKernels>(make: impl Fn() -> B) {
    use super::backend::DeviceConfig;
    let host = Arc::new(HostSpace::new().expect("host"));
    let max = make().info().max_pool_slots;
    for bad in [
        MirrorConfig {
            pool_slots: max.saturating_add(1),
            ..small_cfg()
        },
        MirrorConfig {
            table_pages: 0,
            ..small_cfg()
        },
        MirrorConfig {
            fault_batch: 0,
            ..small_cfg()
        },
        MirrorConfig {
            chunk_sizes: Vec::new(),
            ..small_cfg()
        },
    ] {
        if bad.pool_slots == max {
            continue; // the device takes every u32: nothing is too big
        }
        if bad.pool_slots > max && make().host_windows().is_some() {
            continue; // a zero-copy device ignores the pool size
        }
        match Mirror::new(Arc::clone(&host), make(), bad) {
            Err(MirrorError::Config(_)) => {}
            other => panic!("expected a Config error, got {other:?}"),
        }
    }
    let b = make();
    // (A zero-copy device has no pool: the core initialises it with 0.)
    let pool_slots = if b.host_windows().is_some() { 0 } else { 8 };
    b.init(DeviceConfig {
        pool_slots,
        table_pages: 8,
    })
    .expect("first init");
    match Mirror::new(host, b, small_cfg()) {
        Err(MirrorError::Backend(BackendError::NotInitialised(_))) => {}
        other => panic!("expected a backend-initialised error, got {other:?}"),
    }
}

/// Two userfaultfd owners of one range: two `HostSpace`s in one process
/// (a misuse — mirrors should share one) each with a mirror reading the
/// same memory. The kernel lets one userfaultfd register a range; the
/// second mirror's region cannot be watched (`EBUSY`), so it is mirrored
/// in explicit-invalidation mode: counted in `unwatched_regions`, said once
/// on stderr, still correct after an explicit invalidation. The first
/// mirror keeps its events and write tracking.
pub fn two_userfaultfd_owners_of_one_range<B: TestKernels>(b1: B, b2: B) {
    let (h1, m1) = setup(b1, small_cfg());
    let (h2, m2) = setup(b2, small_cfg());
    let src = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    let out1 = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    let out2 = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 1);
    device_copy(&m1, src.addr(), &out1, 2 * WPP).expect("m1 read");
    device_copy(&m2, src.addr(), &out2, 2 * WPP).expect("m2 read");
    assert_eq!((out1.read_word(9), out2.read_word(9)), (1, 1));
    let uffd = events_available(&h1) && events_available(&h2);
    if uffd {
        assert_eq!(m1.stats().unwatched_regions, 0, "the first owner watches");
        assert!(
            m2.stats().unwatched_regions >= 1,
            "the second owner cannot register the range"
        );
    }
    src.fill(|_| 2);
    if !uffd {
        h1.space().invalidate(src.range(), EventKind::CpuWrite);
    }
    h2.space().invalidate(src.range(), EventKind::CpuWrite);
    device_copy(&m1, src.addr(), &out1, 2 * WPP).expect("m1 read");
    device_copy(&m2, src.addr(), &out2, 2 * WPP).expect("m2 read");
    assert_eq!((out1.read_word(9), out2.read_word(9)), (2, 2));
}

/// A forked child using its parent's mirror: the child inherits the
/// memory but none of the threads and kernel registrations the mirror runs
/// on. Every `Result` method returns `MirrorError::WrongProcess` at once
/// (checked before any lock, so a lock held at `fork` cannot hang it), and
/// dropping the mirror in the child leaks instead of joining threads that
/// do not exist there. The parent's mirror is unaffected.
pub fn forked_child_gets_a_typed_error<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let src = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 4);
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    device_copy(&m, src.addr(), &out, WPP).expect("parent launch");
    let args = [src.addr(), out.addr()];
    let range = src.range();
    let m = std::mem::ManuallyDrop::new(m);
    // SAFETY: the child calls only the mirror's fork-checked entry points
    // (a getpid and a comparison, no allocation, no lock) and the drop
    // that leaks, then `_exit`s without running the parent's destructors.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let wrong = |r: Result<(), MirrorError>| matches!(r, Err(MirrorError::WrongProcess { .. }));
        let ok = wrong(m.launch(&k, WPP as u32, args).map(|_| ()))
            && wrong(m.prefetch(range, false).map(|_| ()))
            && wrong(m.pin(range).map(|_pin| ()))
            && !m.flush_releases();
        let mut m = m;
        // SAFETY: dropped once, here, in the child (leaks by design).
        unsafe { std::mem::ManuallyDrop::drop(&mut m) };
        // SAFETY: ends the child without the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let t0 = std::time::Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: polling our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if t0.elapsed() > std::time::Duration::from_secs(10) {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the forked child hung using the parent's mirror");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child got something other than WrongProcess (status {status:#x})"
    );
    let m = std::mem::ManuallyDrop::into_inner(m);
    src.fill(|_| 5);
    device_copy(&m, src.addr(), &out, WPP).expect("parent launch after the fork");
    assert_eq!(out.read_word(0), 5);
}

/// Whether the mirror's device is a zero-copy one.
fn zero_copy<B: Backend>(m: &Mirror<B>) -> bool {
    m.backend().host_windows().is_some()
}

/// Zero-copy: pinning copies into a pool, which a zero-copy device does
/// not have: a typed error, and the mirror keeps working.
pub fn zero_copy_pin_is_unsupported<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    assert!(zero_copy(&m), "a zero-copy device offers host windows");
    let src = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|_| 8);
    match m.pin(src.range()) {
        Err(MirrorError::Unsupported(_)) => {}
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let out = TestMap::anon(2, libc::PROT_READ | libc::PROT_WRITE);
    device_copy(&m, src.addr(), &out, 2 * WPP).expect("launch");
    assert_eq!(out.read_word(WPP + 1), 8);
}

/// Zero-copy: the device uses the CPU's own pages. Nothing is copied in or
/// written back; a CPU write between launches is seen without the page
/// faulting in again (nothing stale was dropped, nothing needed to be);
/// device writes are in the CPU's memory when the launch returns.
pub fn zero_copy_shares_the_cpu_pages<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let src = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32);
    let r1 = device_copy(&m, src.addr(), &out, 8 * WPP).expect("launch 1");
    assert!(r1.faults > 0 && r1.pages_in > 0, "first touch maps: {r1:?}");
    assert_eq!(out.read_word(8 * WPP - 1), (8 * WPP - 1) as u32);
    src.fill(|i| 3 * i as u32);
    let r2 = device_copy(&m, src.addr(), &out, 8 * WPP).expect("launch 2");
    assert_eq!(
        (r2.faults, r2.pages_in, r2.pages_out, r2.submissions),
        (0, 0, 0, 1),
        "the CPU's write needed no invalidation and nothing moved"
    );
    assert_eq!(out.read_word(8 * WPP - 1), 3 * (8 * WPP - 1) as u32);
    let st = m.stats();
    assert_eq!(
        (st.pages_out, st.pool_used),
        (0, 0),
        "no write-back, no pool"
    );
    // "This range was recycled": the window goes too, and the next launch
    // maps (and, on a pinning GPU, imports) whatever is there now.
    h.space().invalidate(src.range(), EventKind::Clear);
    src.fill(|i| 5 * i as u32);
    let r3 = device_copy(&m, src.addr(), &out, 8 * WPP).expect("launch 3");
    assert!(r3.faults > 0, "the cleared range faults in again");
    assert_eq!(out.read_word(8 * WPP - 1), 5 * (8 * WPP - 1) as u32);
}

/// Zero-copy: more regions than windows, one per launch: windows are
/// evicted (oldest first) and bound again; every result stays right.
pub fn zero_copy_window_eviction<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let windows = m.backend().host_windows().expect("zero-copy").count as usize;
    // Separate mappings (with guard pages): one region each.
    let maps: Vec<TestMap> = (0..windows + 3)
        .map(|j| {
            let t = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
            t.fill(|i| (j * 10_000 + i) as u32);
            t
        })
        .collect();
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    for round in 0..2 {
        for (j, t) in maps.iter().enumerate() {
            device_copy(&m, t.addr(), &out, WPP).expect("launch");
            assert_eq!(
                out.read_word(5),
                (j * 10_000 + 5) as u32,
                "round {round} map {j}"
            );
        }
    }
    assert!(m.stats().evictions > 0, "windows were evicted");
}

/// Zero-copy: memory is unmapped, `MADV_DONTNEED`ed and mapped again
/// *beside* running launches — by a thread whose own launches on it have
/// returned, which the zero-copy contract allows — while another thread
/// launches on memory of its own. Windows are detached by the destructive
/// events while fault service binds others; every result stays right and
/// every dead region is released.
pub fn zero_copy_unmaps_beside_a_launch<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let m = Arc::new(m);
    const ROUNDS: u32 = 60;
    let steady = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || {
            let src = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
            let out = TestMap::anon(8, libc::PROT_READ | libc::PROT_WRITE);
            for r in 0..ROUNDS {
                src.fill(|i| i as u32 ^ r);
                device_copy(&m, src.addr(), &out, 8 * WPP).expect("steady launch");
                assert_eq!(out.read_word(8 * WPP - 3), (8 * WPP - 3) as u32 ^ r);
            }
        })
    };
    let out = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
    for r in 0..ROUNDS {
        let map = TestMap::anon(4, libc::PROT_READ | libc::PROT_WRITE);
        map.fill(|i| i as u32 + r);
        device_copy(&m, map.addr(), &out, 4 * WPP).expect("churn launch");
        assert_eq!(out.read_word(WPP + 1), WPP as u32 + 1 + r);
        // SAFETY: the first page of our own mapping; no launch uses it
        // now (ours returned; the other thread's never touches it).
        let rc = unsafe {
            libc::madvise(
                map.addr() as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
        if !events_available(&h) {
            h.space().invalidate(map.range(), EventKind::Remove);
        }
        device_copy(&m, map.addr(), &out, 4 * WPP).expect("launch after the remove");
        assert_eq!(out.read_word(5), 0, "the removed page reads as zeros");
        assert_eq!(out.read_word(WPP + 1), WPP as u32 + 1 + r);
        if !events_available(&h) {
            h.space().invalidate(map.range(), EventKind::Unmap);
        }
        drop(map); // unmapped while the other thread's launches run
    }
    steady.join().expect("steady thread");
    if events_available(&h) {
        assert!(m.stats().invalidations[0] > 0, "unmaps were seen");
    }
    assert!(m.flush_releases(), "dead regions released");
}

/// A linked list with one node at the start of each of `maps`; returns
/// the sum of its values.
fn list_across(maps: &[TestMap]) -> u64 {
    let mut want = 0u64;
    for (j, t) in maps.iter().enumerate() {
        let next = maps.get(j + 1).map_or(0, |n| n.addr());
        let value = 7 * j as u64 + 1;
        want += value;
        t.write_word(0, next as u32);
        t.write_word(1, (next >> 32) as u32);
        t.write_word(2, value as u32);
        t.write_word(3, 0);
    }
    want
}

/// Zero-copy: one launch whose single invocation needs every window at
/// once (a list through `windows - 1` separate mappings, plus the output),
/// after earlier launches filled the windows with other regions: each
/// fault-service round evicts only windows of earlier rounds, so the walk
/// keeps what it mapped and the sum is right. One node more than the
/// windows can hold cannot work — the invocation restarts from its first
/// node on every replay, as on a GPU — and is the typed `NoProgress`,
/// not a hang (the copy-mode analogue: an invocation touching more pages
/// than the pool).
pub fn zero_copy_one_launch_fills_every_window<B: TestKernels>(b: B) {
    let cfg = MirrorConfig {
        max_replays: 300,
        ..small_cfg()
    };
    let (_h, m) = setup(b, cfg);
    let windows = m.backend().host_windows().expect("zero-copy").count as usize;
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let filler: Vec<TestMap> = (0..windows)
        .map(|_| TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE))
        .collect();
    for t in &filler {
        device_copy(&m, t.addr(), &out, 1).expect("filler launch");
    }
    let k = m
        .backend()
        .test_kernel(TestKernel::ListSum)
        .expect("kernel");
    let maps: Vec<TestMap> = (0..windows - 1)
        .map(|_| TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE))
        .collect();
    let want = list_across(&maps);
    let evicted = m.stats().evictions;
    m.launch(&k, 1, [maps[0].addr(), out.addr()])
        .expect("launch");
    let got = u64::from(out.read_word(0)) | (u64::from(out.read_word(1)) << 32);
    assert_eq!(got, want);
    assert!(
        m.stats().evictions > evicted,
        "windows were evicted during the walk"
    );
    let more: Vec<TestMap> = (0..windows + 1)
        .map(|_| TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE))
        .collect();
    list_across(&more);
    match m.launch(&k, 1, [more[0].addr(), out.addr()]) {
        Err(MirrorError::NoProgress { .. }) => {}
        other => panic!("expected NoProgress, got {other:?}"),
    }
}

/// Expands to one `#[test]` per conformance scenario for the backend
/// built by `$make` (an expression evaluated once per test).
///
/// `conformance_tests!(optional $make)` takes an `Option` instead: a test
/// whose backend is `None` returns at once (the maker prints the skip line
/// naming why, and fails the test itself when the environment requires
/// the device, e.g. `HMM_REQUIRE_GPU=1`).
///
/// `conformance_tests!(zero_copy optional $make)` is the suite for a
/// zero-copy device ([`host_windows`](crate::mirror::backend::Backend::host_windows)): every scenario except the
/// four that cannot apply — `anon_teardown` unmaps memory while a launch
/// reads it, which the zero-copy contract forbids (a device that
/// dereferences host pointers would fault the process);
/// `pinning_hazard_is_real`, `eviction_under_a_small_pool` and
/// `zero_page_pool` are about the pool a zero-copy device does not have —
/// plus the zero-copy scenarios (`zero_copy_*`): pinning is a typed
/// error, the device shares the CPU's pages, windows are evicted and
/// reused, one invocation can use every window at once (one more is
/// `NoProgress`), and memory is unmapped and removed beside running
/// launches.
#[macro_export]
macro_rules! conformance_tests {
    (optional $make:expr) => {
        $crate::conformance_tests!(@optional $make;
            open_close, anon_read, anon_read_prot, anon_write, anon_write_prot,
            anon_write_child, anon_write_child_shared, anon_write_huge, file_read,
            file_write, anon_read_multiple, anon_teardown, mixedmap, snapshot,
            eviction_under_a_small_pool, zero_page_pool, dirty_pages_survive_eviction,
            linked_list, pinning_hazard_is_real, teardown_with_live_regions,
            concurrent_launches_and_invalidations, accessed_bits_feed_young,
            prefetch_replaces_faults, bad_ranges_are_typed_errors,
            wild_device_pointers_are_typed_faults, prefetch_respects_protection,
            unmirrorable_mappings_are_typed, freed_memory_is_an_unmapped_fault,
            forked_child_gets_a_typed_error);
        $crate::conformance_tests!(@common $make);
    };
    // The scenarios both flavours share beyond the one-device list: those
    // on two devices, and the reused-backend check.
    (@common $make:expr) => {
        $crate::conformance_tests!(@optional2 $make;
            kernel_outliving_its_mirror, two_userfaultfd_owners_of_one_range,
            double_map, read_mostly_duplication);
        #[test]
        fn reused_backend_and_bad_configs_are_refused() {
            if $make.is_none() {
                return;
            }
            $crate::mirror::conformance::reused_backend_and_bad_configs_are_refused(|| {
                $make.expect("the device opened a moment ago")
            });
        }
    };
    (@optional $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let Some(b) = $make else { return };
                $crate::mirror::conformance::$name(b);
            }
        )*
    };
    (@optional2 $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let (Some(a), Some(b)) = ($make, $make) else { return };
                $crate::mirror::conformance::$name(a, b);
            }
        )*
    };
    ($make:expr) => {
        $crate::conformance_tests!(optional Some($make));
    };
    (zero_copy optional $make:expr) => {
        $crate::conformance_tests!(@optional $make;
            open_close, anon_read, anon_read_prot, anon_write, anon_write_prot,
            anon_write_child, anon_write_child_shared, anon_write_huge, file_read,
            file_write, anon_read_multiple, mixedmap, snapshot,
            dirty_pages_survive_eviction,
            linked_list, teardown_with_live_regions,
            concurrent_launches_and_invalidations, accessed_bits_feed_young,
            prefetch_replaces_faults, bad_ranges_are_typed_errors,
            wild_device_pointers_are_typed_faults, prefetch_respects_protection,
            unmirrorable_mappings_are_typed, freed_memory_is_an_unmapped_fault,
            forked_child_gets_a_typed_error,
            zero_copy_pin_is_unsupported, zero_copy_shares_the_cpu_pages,
            zero_copy_window_eviction, zero_copy_one_launch_fills_every_window,
            zero_copy_unmaps_beside_a_launch);
        $crate::conformance_tests!(@common $make);
    };
}
