//! Device-private migration (issue 17): the kernel's `migrate*` tests,
//! ported under their names, and the mirror's own cases around them.
//!
//! The kernel tests migrate through `dmirror`'s `HMM_DMIRROR_MIGRATE_TO_DEV`
//! ioctl and check that a CPU access brings the data back through
//! `migrate_to_ram`; here [`Mirror::migrate_to_device`] moves the pages out
//! and a CPU access waits while the mirror gives them back. Each scenario
//! prints a `SKIP` line and returns where the host cannot migrate
//! ([`Mirror::migrate_to_device`] then returns a typed
//! [`MirrorError::MigrationUnsupported`], which is checked), unless
//! `HMM_REQUIRE_UFFD=1`.
//!
//! The huge-page tests are in `migration_huge`, the `exclusive*` tests in
//! `exclusive`. Tests that fork hold the suite's fork gate alone, the
//! others share it (`support::forking`): a fork gives back every migrated
//! page of the process.

use hmm_core::mirror::{Mirror, MirrorConfig, MirrorError};

use crate::support::{
    device_copy, fork_child, forking, launch, migrating, setup, small_cfg, spawn, zero_copy,
    TestMap, WPP,
};
use crate::{TestKernel, TestKernels};

/// Whether `m` can migrate here (then the fork gate, held shared for the
/// test: see `support::migrating`); prints the skip line if not.
pub(crate) fn can_migrate<B: TestKernels>(
    m: &Mirror<B>,
    test: &str,
) -> Option<std::sync::RwLockReadGuard<'static, ()>> {
    migration_available(m, test).then(migrating)
}

/// [`can_migrate`] for a test that forks: the gate held alone.
pub(crate) fn can_migrate_and_fork<B: TestKernels>(
    m: &Mirror<B>,
    test: &str,
) -> Option<std::sync::RwLockWriteGuard<'static, ()>> {
    migration_available(m, test).then(forking)
}

fn migration_available<B: TestKernels>(m: &Mirror<B>, test: &str) -> bool {
    if zero_copy(m) {
        eprintln!("SKIP {test}: zero-copy device (migration is a typed Unsupported there)");
        return false;
    }
    match hmm_core::mirror::HostSide::migration_support(&**m.host()) {
        Ok(_) => true,
        Err(why) => {
            assert!(
                std::env::var("HMM_REQUIRE_UFFD").as_deref() != Ok("1"),
                "{test}: HMM_REQUIRE_UFFD=1 but migration is unavailable: {why}"
            );
            eprintln!("SKIP {test}: migration unavailable: {why}");
            false
        }
    }
}

/// The suite's `IncrementU32` kernel on `m`'s device.
pub(crate) fn increment_kernel<B: TestKernels>(m: &Mirror<B>) -> Box<B::Kernel> {
    m.backend()
        .test_kernel(TestKernel::IncrementU32)
        .expect("kernel")
}

pub(crate) fn rw() -> i32 {
    libc::PROT_READ | libc::PROT_WRITE
}

/// Kernel test `migrate`: anonymous memory migrated to the device is read
/// there, and the CPU reads it back intact.
pub fn migrate<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate") else {
        return;
    };
    let pages = 16;
    let src = TestMap::anon(pages, rw());
    src.fill(|i| i as u32 ^ 0x1717_0000);
    let n = m.migrate_to_device(src.range()).expect("migrate");
    assert_eq!(n, pages as u64);
    let st = m.stats();
    assert_eq!(st.migrated_out, pages as u64);
    // The device reads the migrated pages without a fault or a copy.
    let out = TestMap::anon(pages, rw());
    let r = device_copy(&m, src.addr(), &out, pages * WPP).expect("launch");
    for i in 0..pages * WPP {
        assert_eq!(out.read_word(i), i as u32 ^ 0x1717_0000, "device word {i}");
    }
    assert_eq!(r.pages_in, pages as u64, "only `out` is copied in");
    // The CPU's reads bring the pages back.
    for i in 0..pages * WPP {
        assert_eq!(src.read_word(i), i as u32 ^ 0x1717_0000, "CPU word {i}");
    }
    let st = m.stats();
    assert_eq!(st.migrated_in, pages as u64);
    assert!(st.fault_backs >= 1, "the reads faulted back: {st:?}");
}

/// Kernel test `migrate_fault`: migrate, touch from the CPU, migrate again;
/// the data survives every trip, and CPU writes made between trips reach
/// the device.
pub fn migrate_fault<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_fault") else {
        return;
    };
    let pages = 8;
    let src = TestMap::anon(pages, rw());
    src.fill(|i| i as u32);
    let out = TestMap::anon(pages, rw());
    for round in 0..4u32 {
        m.migrate_to_device(src.range()).expect("migrate");
        device_copy(&m, src.addr(), &out, pages * WPP).expect("launch");
        for i in (0..pages * WPP).step_by(97) {
            assert_eq!(out.read_word(i), i as u32 + round, "round {round} word {i}");
        }
        // CPU reads fault the pages back, then a write the next trip carries.
        for i in 0..pages * WPP {
            assert_eq!(
                src.read_word(i),
                i as u32 + round,
                "round {round} CPU word {i}"
            );
            src.write_word(i, i as u32 + round + 1);
        }
    }
    assert_eq!(m.stats().migrated_out, 4 * pages as u64);
}

/// Kernel test `migrate_release`: migrated memory unmapped while the
/// device holds it: the pages are simply gone, their slots freed, and
/// nothing is given back.
pub fn migrate_release<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_release") else {
        return;
    };
    let pages = 16;
    let mut src = TestMap::anon(pages, rw());
    src.fill(|i| i as u32);
    m.migrate_to_device(src.range()).expect("migrate");
    let used = m.stats().pool_used;
    assert!(used >= pages as u64);
    src.unmap();
    // The unmap's event is read before `munmap` returns, handled after.
    assert!(h.settle(), "the unmap's event is handled");
    assert!(m.flush_releases(), "the dead region is released");
    let st = m.stats();
    assert_eq!(st.migrated_in, 0, "nothing given back to unmapped memory");
    assert_eq!(st.pool_used, used - pages as u64, "their slots are free");
}

/// Kernel test `migrate_shared`: shared memory cannot migrate (it keeps
/// its pages when the CPU's copy is discarded): a typed error, nothing
/// moved.
pub fn migrate_shared<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_shared") else {
        return;
    };
    let src = TestMap::shared_anon(4);
    src.write_word(0, 99);
    match m.migrate_to_device(src.range()) {
        Err(MirrorError::MigrationUnsupported(why)) => assert!(why.contains("shared"), "{why}"),
        other => panic!("expected MigrationUnsupported, got {other:?}"),
    }
    assert_eq!(src.read_word(0), 99);
    assert_eq!(m.stats().migrated_out, 0);
}

/// Kernel test `migrate_multiple`: many migrations back and forth, with
/// explicit [`Mirror::migrate_to_host`] and device writes in between.
pub fn migrate_multiple<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_multiple") else {
        return;
    };
    let pages = 4;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32);
    let inc = increment_kernel(&m);
    for k in 1..=10u32 {
        m.migrate_to_device(p.range()).expect("migrate");
        launch(&m, &inc, (pages * WPP) as u32, [p.addr()]).expect("increment");
        assert_eq!(
            m.migrate_to_host(p.range()).expect("back"),
            pages as u64,
            "trip {k}"
        );
        for i in (0..pages * WPP).step_by(61) {
            assert_eq!(p.read_word(i), i as u32 + k, "trip {k} word {i}");
        }
    }
    assert_eq!(
        m.stats().fault_backs,
        0,
        "explicit trips fault nothing back"
    );
}

/// Device writes to migrated pages stay on the device across launches (no
/// write-back, no sync-point work) until the CPU touches them.
pub fn migrate_device_writes_stay_until_touched<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_device_writes_stay_until_touched") else {
        return;
    };
    let pages = 8;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32 * 3);
    m.migrate_to_device(p.range()).expect("migrate");
    let inc = increment_kernel(&m);
    let before = m.stats().pages_out;
    for _ in 0..5 {
        let r = launch(&m, &inc, (pages * WPP) as u32, [p.addr()]).expect("increment");
        assert_eq!(r.pages_in, 0, "resident: nothing copied in");
    }
    assert_eq!(m.stats().pages_out, before, "nothing written back");
    for i in 0..pages * WPP {
        assert_eq!(p.read_word(i), i as u32 * 3 + 5, "word {i}");
    }
}

/// A migrated page evicted under pool pressure goes back to the CPU
/// before its slot is reused: nothing is lost.
pub fn migrate_evicted_under_pool_pressure<B: TestKernels>(b: B) {
    let cfg = MirrorConfig {
        pool_slots: 24,
        ..small_cfg()
    };
    let (_h, m) = setup(b, cfg);
    let Some(_gate) = can_migrate(&m, "migrate_evicted_under_pool_pressure") else {
        return;
    };
    let pages = 16;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32 ^ 0xdead_0000);
    m.migrate_to_device(p.range()).expect("migrate");
    let inc = increment_kernel(&m);
    launch(&m, &inc, (pages * WPP) as u32, [p.addr()]).expect("increment");
    // Another 16 pages through a 24-slot pool: migrated pages are evicted.
    let other = TestMap::anon(16, rw());
    other.fill(|i| i as u32);
    let out = TestMap::anon(16, rw());
    device_copy(&m, other.addr(), &out, 16 * WPP).expect("launch");
    let st = m.stats();
    assert!(st.evictions > 0, "the pool was pressed: {st:?}");
    assert!(st.migrated_in > 0, "evicted migrated pages were given back");
    for i in 0..pages * WPP {
        assert_eq!(p.read_word(i), (i as u32 ^ 0xdead_0000) + 1, "word {i}");
    }
}

/// A CPU thread reading migrated pages while launches run on them gets
/// every value a launch left, never a torn or zero page.
pub fn migrate_cpu_read_during_launch<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_cpu_read_during_launch") else {
        return;
    };
    let pages = 8;
    let p = std::sync::Arc::new(TestMap::anon(pages, rw()));
    p.fill(|_| 1000);
    let inc = increment_kernel(&m);
    let m = std::sync::Arc::new(m);
    let (m2, p2) = (std::sync::Arc::clone(&m), std::sync::Arc::clone(&p));
    let reader = spawn(move || {
        let mut last = 1000;
        for k in 0..200 {
            let w = p2.read_word((k * 331) % (pages * WPP));
            assert!((1000..=1010).contains(&w), "read {w}");
            last = last.max(w);
            std::thread::yield_now();
        }
        let _ = m2.stats();
        last
    });
    for _ in 0..10 {
        m.migrate_to_device(p.range()).expect("migrate");
        launch(&m, &inc, (pages * WPP) as u32, [p.addr()]).expect("increment");
    }
    reader.join().expect("reader");
    for i in 0..pages * WPP {
        assert_eq!(p.read_word(i), 1010, "word {i}");
    }
}

/// Dropping the mirror gives every migrated page back first.
pub fn migrate_drop_gives_back<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_drop_gives_back") else {
        return;
    };
    let pages = 8;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32 + 7);
    m.migrate_to_device(p.range()).expect("migrate");
    let inc = increment_kernel(&m);
    launch(&m, &inc, (pages * WPP) as u32, [p.addr()]).expect("increment");
    drop(m);
    for i in 0..pages * WPP {
        assert_eq!(p.read_word(i), i as u32 + 8, "word {i}");
    }
}

/// `mremap` of migrated memory: the data follows the move, and the CPU
/// reads it at the new address.
pub fn migrate_mremap<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_mremap") else {
        return;
    };
    let pages = 8;
    let len = pages * hmm_core::PAGE_SIZE as usize;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32 ^ 0x00ab_0000);
    m.migrate_to_device(p.range()).expect("migrate");
    // A destination, then the move (the old range is gone after it).
    let dst = TestMap::anon(pages, libc::PROT_NONE);
    // SAFETY: moving our own mapping onto our own reservation; nothing
    // holds a reference into either.
    let to = unsafe {
        libc::mremap(
            p.addr() as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.addr() as *mut libc::c_void,
        )
    };
    assert_ne!(to, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    std::mem::forget(p); // its range is gone; `dst` owns the new one
    for i in 0..pages * WPP {
        assert_eq!(
            dst.read_word(i),
            i as u32 ^ 0x00ab_0000,
            "word {i} at the new address"
        );
    }
    assert!(m.stats().migrated_in >= pages as u64);
}

/// Zero-copy devices: migration and exclusive access are typed errors,
/// nothing moved.
pub fn migrate_zero_copy_is_unsupported<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let p = TestMap::anon(2, rw());
    p.write_word(0, 5);
    match m.migrate_to_device(p.range()) {
        Err(MirrorError::MigrationUnsupported(_)) => {}
        other => panic!("expected MigrationUnsupported, got {other:?}"),
    }
    match m.make_exclusive(p.range()) {
        Err(MirrorError::MigrationUnsupported(_)) => {}
        other => panic!("make_exclusive: expected MigrationUnsupported, got {other:?}"),
    }
    assert_eq!(m.exclusive_in(p.range()).expect("a good range"), 0);
    assert_eq!(p.read_word(0), 5);
}

/// `fork()` with migrated pages: the prepare-fork handler gives them back
/// first, so the child reads the device's data (without it the child
/// reads zeros: `hmm-core/tests/migration_facts.rs`), and the parent's
/// copy is intact and no longer migrated.
pub fn migrate_fork<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate_and_fork(&m, "migrate_fork") else {
        return;
    };
    let pages = 8;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32 ^ 0x0f0f_0000);
    m.migrate_to_device(p.range()).expect("migrate");
    let inc = increment_kernel(&m);
    // Device writes, held only on the device.
    launch(&m, &inc, (pages * WPP) as u32, [p.addr()]).expect("increment");
    let want = |i: usize| (i as u32 ^ 0x0f0f_0000) + 1;
    let before = m.stats();
    let code = fork_child(|| {
        for i in 0..pages * WPP {
            if p.read_word(i) != want(i) {
                return 1;
            }
        }
        0
    });
    assert_eq!(code, 0, "the child read the device's data");
    let st = m.stats();
    assert_eq!(
        st.migrated_in,
        before.migrated_in + pages as u64,
        "the fork gave every page back: {st:?}"
    );
    assert_eq!(st.fault_backs, before.fault_backs, "before any CPU fault");
    for i in 0..pages * WPP {
        assert_eq!(p.read_word(i), want(i), "parent word {i}");
    }
}

/// Every way `migrate_to_device` refuses is a typed error, with nothing
/// moved: a range larger than the pool, read-only memory, a file mapping,
/// unmapped memory.
pub fn migrate_typed_errors<B: TestKernels>(b: B) {
    let cfg = MirrorConfig {
        pool_slots: 8,
        ..small_cfg()
    };
    let (_h, m) = setup(b, cfg);
    let Some(_gate) = can_migrate(&m, "migrate_typed_errors") else {
        return;
    };
    let big = TestMap::anon(16, rw());
    big.write_word(0, 3);
    match m.migrate_to_device(big.range()) {
        Err(MirrorError::PoolExhausted { needed: 16, .. }) => {}
        other => panic!("16 pages into an 8-slot pool: {other:?}"),
    }
    assert_eq!(big.read_word(0), 3);
    let ro = TestMap::anon(2, rw());
    ro.write_word(0, 4);
    ro.protect(libc::PROT_READ);
    match m.migrate_to_device(ro.range()) {
        Err(MirrorError::MigrationUnsupported(why)) => assert!(why.contains("writable"), "{why}"),
        other => panic!("read-only memory: {other:?}"),
    }
    assert_eq!(ro.read_word(0), 4);
    let f = {
        use std::io::Write;
        let mut f = tempfile_in_tmp();
        f.write_all(&[7u8; 8192]).expect("write");
        f
    };
    let fm = TestMap::file(&f, 2, rw(), libc::MAP_PRIVATE);
    match m.migrate_to_device(fm.range()) {
        Err(MirrorError::MigrationUnsupported(why)) => assert!(why.contains("anonymous"), "{why}"),
        other => panic!("a file mapping: {other:?}"),
    }
    // Unmapped memory: the first pages of the address space, below
    // `mmap_min_addr` (memory this test unmapped itself could be mapped
    // again at once by a test running beside it).
    let r = hmm_core::VaRange::from_start_len(hmm_core::VirtAddr(0x1000), 0x2000).expect("range");
    match m.migrate_to_device(r) {
        Err(MirrorError::DeviceFault { .. }) => {}
        other => panic!("unmapped memory: {other:?}"),
    }
    assert_eq!(m.stats().migrated_out, 0);
}

/// An unlinked temporary file.
fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "hmm-migrate-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("temp file");
    let _ = std::fs::remove_file(&path);
    f
}

/// A page of a migrated range discarded (`MADV_DONTNEED`) and then read by
/// the device before the CPU touches it: the device reads zeros, as the
/// CPU would.
pub fn migrate_discarded_then_device_read<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_discarded_then_device_read") else {
        return;
    };
    let pages = 4;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32 + 1);
    m.migrate_to_device(p.range()).expect("migrate");
    // SAFETY: our own test mapping; no reference into it is live.
    let r = unsafe {
        libc::madvise(
            p.addr() as *mut libc::c_void,
            hmm_core::PAGE_SIZE as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    assert!(h.settle());
    let out = TestMap::anon(pages, rw());
    device_copy(&m, p.addr(), &out, pages * WPP).expect("device read after the discard");
    for i in 0..WPP {
        assert_eq!(out.read_word(i), 0, "discarded word {i}");
    }
    for i in WPP..pages * WPP {
        assert_eq!(out.read_word(i), i as u32 + 1, "word {i}");
        assert_eq!(p.read_word(i), i as u32 + 1, "CPU word {i}");
    }
    assert_eq!(p.read_word(0), 0);
}

/// `Advice::PreferDevice` (CUDA's preferred location): the pages a launch
/// touches in the advised range migrate when it ends; the next launch
/// writes nothing back for them, a CPU read brings the device's data back,
/// and pages no launch touched stay on the CPU.
pub fn migrate_preferred_location<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_preferred_location") else {
        return;
    };
    let pages = 8;
    let touched = 4;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32);
    m.advise(p.range(), hmm_core::mirror::Advice::PreferDevice);
    let inc = increment_kernel(&m);
    let n = (touched * WPP) as u32;
    let first = launch(&m, &inc, n, [p.addr()]).expect("first launch");
    assert_eq!(first.pages_out, touched as u64, "written back once");
    let st = m.stats();
    assert_eq!(
        st.migrated_out, touched as u64,
        "the touched pages migrated: {st:?}"
    );
    assert_eq!(st.preferred_refused, 0);
    let second = launch(&m, &inc, n, [p.addr()]).expect("second launch");
    assert_eq!(second.pages_out, 0, "migrated: nothing written back");
    for i in 0..pages * WPP {
        let want = if i < touched * WPP {
            i as u32 + 2
        } else {
            i as u32
        };
        assert_eq!(p.read_word(i), want, "CPU word {i}");
    }
    let st = m.stats();
    assert_eq!(
        st.migrated_in, touched as u64,
        "only the touched pages came back"
    );
    assert!(st.fault_backs >= 1);
    // Advice on memory that cannot migrate is counted, not an error.
    let shared = TestMap::shared_anon(1);
    m.advise(shared.range(), hmm_core::mirror::Advice::PreferDevice);
    launch(&m, &inc, WPP as u32, [shared.addr()]).expect("a launch on shared memory");
    assert_eq!(m.stats().preferred_refused, 1);
    assert_eq!(shared.read_word(5), 1, "written back as usual");
}

/// A system call reading or writing migrated memory (a kernel-mode
/// access: `write(2)` from it, `read(2)` into it). With a userfaultfd that
/// handles kernel-mode faults (what a privileged process gets) it brings
/// the pages back like any other access; with a user-mode-only one (the
/// unprivileged case, `HMM_UFFD_USER_MODE_ONLY=1`) it fails with `EFAULT`
/// — the degradation `hmm-bench info` states — and the data stays intact.
pub fn migrate_syscall_access<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_syscall_access") else {
        return;
    };
    let kernel_faults = matches!(
        hmm_core::mirror::HostSide::migration_support(&**m.host()),
        Ok(None)
    );
    let p = TestMap::anon(2, rw());
    p.fill(|i| i as u32 + 9);
    m.migrate_to_device(p.range()).expect("migrate");
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let page = hmm_core::PAGE_SIZE as usize;
    // write(2) from migrated page 0: the kernel reads it.
    // SAFETY: page 0 of our mapping, `page` bytes; the pipe is ours.
    let n = unsafe { libc::write(fds[1], p.addr() as *const libc::c_void, page) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    if kernel_faults {
        assert_eq!(n, page as isize, "write(2) from migrated memory: {errno:?}");
        let mut got = vec![0u32; page / 4];
        // SAFETY: reading `page` bytes into `got`, which has them.
        let r = unsafe { libc::read(fds[0], got.as_mut_ptr().cast(), page) };
        assert_eq!(r, page as isize);
        for (i, w) in got.iter().enumerate() {
            assert_eq!(*w, i as u32 + 9, "word {i} the kernel read");
        }
    } else {
        assert_eq!((n, errno), (-1, Some(libc::EFAULT)), "user-mode-only fd");
    }
    // read(2) into migrated page 1: the kernel writes it.
    let fill = vec![0xabu8; page];
    // SAFETY: writing `page` bytes of `fill` into our pipe.
    let wrote = unsafe { libc::write(fds[1], fill.as_ptr().cast(), page) };
    assert_eq!(wrote, page as isize);
    // SAFETY: page 1 of our mapping, `page` bytes; the pipe is ours.
    let n = unsafe {
        libc::read(
            fds[0],
            (p.addr() as usize + page) as *mut libc::c_void,
            page,
        )
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    if kernel_faults {
        assert_eq!(n, page as isize, "read(2) into migrated memory: {errno:?}");
        for i in WPP..2 * WPP {
            assert_eq!(p.read_word(i), 0xabab_abab, "word {i} the kernel wrote");
        }
        // And the device sees what the kernel wrote.
        let out = TestMap::anon(2, rw());
        device_copy(&m, p.addr(), &out, 2 * WPP).expect("device read");
        assert_eq!(out.read_word(WPP + 3), 0xabab_abab);
        assert_eq!(out.read_word(3), 12);
    } else {
        assert_eq!((n, errno), (-1, Some(libc::EFAULT)), "user-mode-only fd");
        for i in 0..2 * WPP {
            assert_eq!(p.read_word(i), i as u32 + 9, "word {i} intact");
        }
    }
    // SAFETY: our own descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}
