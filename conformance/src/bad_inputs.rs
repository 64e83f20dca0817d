//! Every misuse in the catalog (`docs/BAD_INPUTS.md`) that involves a
//! mirror: each ends in a typed error (or a documented degradation), never
//! a panic, a hang or lost data.

use std::sync::Arc;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::backend::{BackendError, MAX_INVOCATIONS};
use hmm_core::mirror::{AccessError, Mirror, MirrorConfig, MirrorError};
use hmm_core::notifier::EventKind;
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

use crate::support::{
    device_copy, events_available, launch, setup, small_cfg, zero_copy, TestMap, WPP,
};
use crate::{TestKernel, TestKernels};

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
    use hmm_core::addr::USER_VA_END;
    use hmm_core::RangeError;
    let (_h, m) = setup(b, small_cfg());
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    let r = launch(&m, &k, 0, [0, 0]).expect("an empty launch");
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
        hmm_core::addr::USER_VA_END,
        0xffff_ffff_ffff_f000,
        u64::MAX - 3,
    ] {
        expect_fault(
            device_copy(&m, at, &out, 1),
            at,
            false,
            AccessError::Unmapped,
        );
        expect_fault(
            launch(&m, &fill, 1, [at, 0]),
            at,
            true,
            AccessError::Unmapped,
        );
    }
    assert_eq!(m.stats().pool_used, 0);
    // The mirror is still usable.
    let src = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    src.write_word(3, 33);
    device_copy(&m, src.addr(), &out, WPP).expect("launch");
    assert_eq!(out.read_word(3), 33);
}

/// Misaligned 32- and 64-bit accesses end the launch with the same typed
/// error on every driver — `DeviceFault { reason: Misaligned }` naming the
/// exact address, read or write — never a silent access to other bytes
/// (GPUs ignore the low address bits), and nothing is written. The
/// mirror stays usable.
pub fn misaligned_accesses_are_typed_faults<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let src = TestMap::anon(1, rw);
    src.fill(|i| i as u32 + 1);
    let out = TestMap::anon(1, rw);
    let copy = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    let exact = |r: Result<_, MirrorError>, at: u64, write: bool| match r {
        Err(MirrorError::DeviceFault {
            addr,
            write: w,
            reason: AccessError::Misaligned,
        }) => assert_eq!((addr, w), (VirtAddr(at), write), "misaligned fault"),
        other => panic!("expected a misaligned fault at {at:#x}, got {other:?}"),
    };
    for off in 1..4 {
        exact(
            launch(&m, &copy, 4, [src.addr() + off, out.addr()]),
            src.addr() + off,
            false,
        );
        exact(
            launch(&m, &copy, 4, [src.addr(), out.addr() + off]),
            out.addr() + off,
            true,
        );
    }
    assert!(
        (0..WPP).all(|i| out.read_word(i) == 0),
        "nothing was written"
    );
    // A 64-bit load 4- but not 8-aligned (a list head).
    let list = m
        .backend()
        .test_kernel(TestKernel::ListSum)
        .expect("kernel");
    // Which field a driver's kernel reads first differs: the fault names
    // one of the head node's two misaligned words.
    match launch(&m, &list, 1, [src.addr() + 4, out.addr()]) {
        Err(MirrorError::DeviceFault {
            addr,
            write: false,
            reason: AccessError::Misaligned,
        }) => assert!(
            [src.addr() + 4, src.addr() + 12].contains(&addr.0),
            "misaligned list head: fault at {addr}"
        ),
        other => panic!("expected a misaligned read of the list head, got {other:?}"),
    }
    device_copy(&m, src.addr(), &out, WPP).expect("the mirror still works");
    assert!((0..WPP).all(|i| out.read_word(i) == i as u32 + 1));
}

/// Launch sizes past the device's limit (issue 19, finding 1: `n` above
/// 2^31 used to size per-launch buffers for 1024 invocations and then
/// write hundreds of MB into them — SIGSEGV on vulkan, a panic on wgpu,
/// unbounded memory on the cpu driver): every `n` above
/// `Mirror::max_invocations()` is `TooManyInvocations` naming `n` and the
/// limit, before anything is submitted; `n = 0` runs nothing; the mirror
/// works afterwards.
pub fn oversized_launches_are_typed_errors<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let src = TestMap::anon(1, rw);
    src.fill(|i| i as u32 + 1);
    let out = TestMap::anon(1, rw);
    let copy = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    let max = m.max_invocations();
    assert!(
        (1 << 20..=MAX_INVOCATIONS).contains(&max),
        "limit {max} outside 2^20..=2^31"
    );
    println!("{}: invocation limit {max}", m.backend().info().driver);
    let before = m.stats();
    for n in [max + 1, MAX_INVOCATIONS + 1, u32::MAX - 1, u32::MAX] {
        if n <= max {
            continue;
        }
        match launch(&m, &copy, n, [src.addr(), out.addr()]) {
            Err(MirrorError::TooManyInvocations { n: got, max: limit }) => {
                assert_eq!((got, limit), (n, max))
            }
            other => panic!("a launch of {n} invocations (limit {max}): {other:?}"),
        }
    }
    let report = launch(&m, &copy, 0, [src.addr(), out.addr()]).expect("a launch of nothing");
    assert_eq!((report.submissions, report.faults), (1, 0));
    let after = m.stats();
    assert_eq!(
        (after.faults, after.pages_in, after.regions_created),
        (before.faults, before.pages_in, before.regions_created),
        "refused launches must touch nothing"
    );
    assert!((0..WPP).all(|i| out.read_word(i) == 0), "nothing ran");
    device_copy(&m, src.addr(), &out, WPP).expect("the mirror still works");
    assert!((0..WPP).all(|i| out.read_word(i) == i as u32 + 1));
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

/// A device fault names the address the kernel used — never the start of
/// its page, which lies below the pointer (found by `hmm-fuzz`: a read
/// 0x5c4 bytes into freed memory was reported at the page's first byte).
/// Reading freed memory (`Unmapped`), reading `PROT_NONE` memory
/// (`NoAccess`) and writing read-only memory (`ReadOnly`), each through a
/// pointer into the middle of a page: the address is inside the `n * 4`
/// bytes the kernel was given. The mirror stays usable.
pub fn device_faults_name_the_kernels_address<B: TestKernels>(b: B) {
    const OFF: u64 = 0x5c4;
    const N: usize = 16;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let (h, m) = setup(b, small_cfg());
    let out = TestMap::anon(1, rw);
    let fill = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    let inside = |r: Result<_, MirrorError>, at: u64, write: bool, reason: AccessError| match r {
        Err(MirrorError::DeviceFault {
            addr,
            write: w,
            reason: got,
        }) if (w, got) == (write, reason) => assert!(
            (at..at + 4 * N as u64).contains(&addr.0),
            "{reason:?} fault at {addr}, outside the kernel's pointer {at:#x} + {}",
            4 * N
        ),
        other => panic!("expected a {reason:?} device fault at {at:#x}, got {other:?}"),
    };

    let none = TestMap::anon(1, libc::PROT_NONE);
    inside(
        device_copy(&m, none.addr() + OFF, &out, N),
        none.addr() + OFF,
        false,
        AccessError::NoAccess,
    );
    let ro = TestMap::anon(1, libc::PROT_READ);
    let at = ro.addr() + OFF;
    inside(
        launch(&m, &fill, N as u32, [at, 0]),
        at,
        true,
        AccessError::ReadOnly,
    );
    // Freed memory far from where the kernel places mappings: tests run
    // in parallel threads, and a hole among their mappings can be filled
    // by another thread's mmap between the unmap and the launch (a launch
    // that then succeeded, over memory unmapped again before it could be
    // looked up, made this test flaky).
    let hint = 0x2100_0000_0000usize as *mut libc::c_void;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; the page is
    // unmapped at once and only the device is pointed at it.
    let base = unsafe {
        let p = libc::mmap(
            hint,
            PAGE_SIZE as usize,
            rw,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        assert_eq!(p, hint, "mmap: {}", std::io::Error::last_os_error());
        assert_eq!(libc::munmap(p, PAGE_SIZE as usize), 0);
        p as u64
    };
    let at = base + OFF;
    if !events_available(&h) {
        let page = VaRange::from_start_len(VirtAddr(base), PAGE_SIZE).expect("range");
        h.space().invalidate(page, EventKind::Unmap);
    }
    inside(
        device_copy(&m, at, &out, N),
        at,
        false,
        AccessError::Unmapped,
    );
    // Still usable.
    let src = TestMap::anon(1, rw);
    src.write_word(3, 33);
    device_copy(&m, src.addr(), &out, WPP).expect("launch");
    assert_eq!(out.read_word(3), 33);
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
    match launch(&m2, &k, WPP as u32, [src.addr(), out.addr()]) {
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
    use hmm_core::mirror::backend::DeviceConfig;
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
    let _gate = crate::support::forking();
    // SAFETY: the child calls only the mirror's fork-checked entry points
    // (a getpid and a comparison, no allocation, no lock) and the drop
    // that leaks, then `_exit`s without running the parent's destructors.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let wrong = |r: Result<(), MirrorError>| matches!(r, Err(MirrorError::WrongProcess { .. }));
        // Blocking on purpose, in every launch mode: a non-blocking launch
        // would start a thread (allocation, locks) in the forked child.
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

/// `mremap` of a buffer part of which the device mirrors (found by
/// `hmm-fuzz`). The mirror used to register only the faulted 2 MiB region
/// with the userfaultfd, which split the buffer's mapping in two, and the
/// kernel refused the `mremap` of a range spanning two mappings with
/// `EFAULT`. It now registers the whole mapping
/// (`EventMonitor::watch_within`, issue #15), so the `mremap` must
/// succeed: the data moves, the device reads it at the new address, and
/// the old address is a typed `Unmapped` fault.
pub fn mremap_of_a_mirrored_buffer<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    const PAGES: usize = 1024;
    let len = PAGES * PAGE_SIZE as usize;
    // SAFETY: a fresh private anonymous mapping; only this test uses it.
    let old = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            rw,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(old, libc::MAP_FAILED);
    // SAFETY: the mapping is ours, `len` bytes, readable and writable.
    let words = unsafe { std::slice::from_raw_parts_mut(old.cast::<u32>(), len / 4) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = i as u32 + 1;
    }
    let out = TestMap::anon(1, rw);
    device_copy(&m, old as u64, &out, WPP).expect("device reads the first page");
    assert!((0..WPP).all(|i| out.read_word(i) == i as u32 + 1));
    // SAFETY: growing our own mapping, allowed to move; the old slice is
    // not used after a successful move.
    let new = unsafe { libc::mremap(old, len, 2 * len, libc::MREMAP_MAYMOVE) };
    let err = std::io::Error::last_os_error();
    assert_ne!(
        new,
        libc::MAP_FAILED,
        "{}: mremap of a partly mirrored buffer was refused: {err}",
        m.backend().info().driver
    );
    let (base, size) = (new, 2 * len);
    // SAFETY: `base` is the live, moved mapping, `size` bytes.
    let now = unsafe { std::slice::from_raw_parts(base.cast::<u32>(), size / 4) };
    assert!(
        now[..len / 4]
            .iter()
            .enumerate()
            .all(|(i, &w)| w == i as u32 + 1),
        "the buffer's data survived"
    );
    let last = (PAGES - 1) * WPP;
    device_copy(&m, base as u64 + (last * 4) as u64, &out, WPP)
        .expect("device reads the last page");
    assert!((0..WPP).all(|i| out.read_word(i) == (last + i) as u32 + 1));
    device_copy(&m, base as u64, &out, WPP).expect("device reads the first page again");
    assert!((0..WPP).all(|i| out.read_word(i) == i as u32 + 1));
    if new != old {
        match device_copy(&m, old as u64, &out, WPP) {
            Err(MirrorError::DeviceFault {
                reason: AccessError::Unmapped,
                ..
            }) => {}
            // Another test's mapping may have landed at the old address
            // (tests run in parallel in one process): readable, or not
            // (`PROT_NONE`, found once in CI). Whatever the device met
            // must then be mapped there now; `msync` fails with `ENOMEM`
            // on an unmapped page.
            other => {
                // SAFETY: `msync` only asks about the page; it reads or
                // writes none of our memory.
                let mapped = unsafe { libc::msync(old, PAGE_SIZE as usize, libc::MS_ASYNC) } == 0;
                assert!(
                    mapped,
                    "the old address after the move, unmapped: {other:?}"
                );
            }
        }
    }
    // SAFETY: our own mapping, unmapped once.
    unsafe { libc::munmap(base, size) };
}
