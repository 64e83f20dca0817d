//! The port of the Linux kernel's HMM selftests
//! (`tools/testing/selftests/mm/hmm-tests.c`): one scenario per kernel
//! test, named after it (see the crate docs for what carries over).

use std::sync::Arc;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{AccessError, Mirror, MirrorError};
use hmm_core::notifier::EventKind;
use hmm_core::{VirtAddr, PAGE_SIZE};

use crate::support::{
    device_copy, events_available, launch, setup, small_cfg, spawn, zero_copy, TestMap, WPP,
};
use crate::{TestKernel, TestKernels};

/// Kernel test `open_close`: a mirror can be created and dropped.
pub fn open_close<B: TestKernels>(b: B) {
    let (host, m) = setup(b, small_cfg());
    assert_eq!(m.stats().pool_used, 0);
    drop(m);
    assert!(host.space().subscribed_ranges().is_empty());
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
    launch(&m, &k, (pages * WPP) as u32, [dst.addr(), 1000]).expect("launch");
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
    match launch(&m, &k, (2 * WPP) as u32, [dst.addr(), 7]) {
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
    launch(&m, &k, (2 * WPP) as u32, [dst.addr(), 7]).expect("writable now");
    assert_eq!(dst.read_word(5), 12);
}

fn fork_and_write(map: &TestMap, value: u32) {
    let _gate = crate::support::forking();
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
/// event for them. An explicit invalidation always refreshes the device's
/// view (as here); by default the sync point's hash check catches them
/// without it (`foreign_shared_anon_child_write`).
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
    launch(&m, &k, 0x20_0000 / 4, [start, 0]).expect("launch");
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
    launch(&m, &k, (4 * WPP) as u32, [dst.addr(), 0x100]).expect("launch");
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
        let t = spawn(move || device_copy(&m2, a, &o2, 8 * WPP));
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
    use hmm_core::cpu::range_fault::{FaultFlags, PageState};
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
    launch(&m1, &inc, (2 * WPP) as u32, [src.addr()]).expect("m1 write");
    assert_eq!(src.read_word(9), 6);
    device_copy(&m2, src.addr(), &out2, 2 * WPP).expect("m2 re-read");
    assert_eq!(
        out2.read_word(9),
        6,
        "m2's stale copy was collapsed by m1's write"
    );
    assert!(
        m2.stats().invalidations[5] > 0,
        "the coherence invalidation reached m2"
    );
}
