//! Exclusive device access (issue 17): the kernel's `exclusive*` tests,
//! ported under their names.
//!
//! The kernel tests take exclusive access through `dmirror`'s
//! `HMM_DMIRROR_EXCLUSIVE` ioctl (`make_device_exclusive`) and check with
//! `HMM_DMIRROR_CHECK_EXCLUSIVE` that a CPU access revoked it; here
//! [`Mirror::make_exclusive`](hmm_core::mirror::Mirror::make_exclusive)
//! takes it and
//! [`Mirror::exclusive_in`](hmm_core::mirror::Mirror::exclusive_in)
//! checks it. Each scenario skips, with the migration scenarios' named
//! reason, where the host cannot migrate.

use hmm_core::mirror::{AccessError, MirrorError};

use crate::migration::{can_migrate, can_migrate_and_fork, increment_kernel, rw};
use crate::support::{device_copy, fork_child, launch, setup, small_cfg, TestMap, WPP};
use crate::TestKernels;

/// Kernel test `exclusive`: the device reads (and here also updates) the
/// pages it holds exclusively; the CPU's accesses see the device's data,
/// revoke the device's access page by page, and the device's next read
/// faults and fetches what the CPU wrote.
pub fn exclusive<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "exclusive") else {
        return;
    };
    let pages = 8;
    let n = pages * WPP;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32);
    assert_eq!(
        m.make_exclusive(p.range()).expect("exclusive"),
        pages as u64
    );
    assert_eq!(m.exclusive_in(p.range()).expect("check"), pages as u64);
    // Check what the device read.
    let out = TestMap::anon(pages, rw());
    device_copy(&m, p.addr(), &out, n).expect("device read");
    for i in 0..n {
        assert_eq!(out.read_word(i), i as u32, "device word {i}");
    }
    // Device updates while it holds the pages (what exclusivity is for).
    let inc = increment_kernel(&m);
    launch(&m, &inc, n as u32, [p.addr()]).expect("device increment");
    assert_eq!(m.exclusive_in(p.range()).expect("check"), pages as u64);
    // Fault pages back to system memory and check them (`ptr[i]++`).
    for i in 0..n {
        assert_eq!(p.read_word(i), i as u32 + 1, "CPU word {i}");
        p.write_word(i, i as u32 + 2);
        if i == 0 {
            // One page touched: only it lost its exclusivity.
            assert_eq!(
                m.exclusive_in(p.range()).expect("check"),
                pages as u64 - 1,
                "a touch revokes its page alone"
            );
        }
    }
    for i in 0..n {
        assert_eq!(p.read_word(i), i as u32 + 2, "CPU word {i} after the write");
    }
    // Check atomic access revoked.
    assert_eq!(m.exclusive_in(p.range()).expect("check"), 0);
    let st = m.stats();
    assert_eq!(st.exclusive_revoked, pages as u64, "{st:?}");
    // Revoked means the device's entries are gone: its next read faults
    // the pages in again, and sees the CPU's writes.
    let r = device_copy(&m, p.addr(), &out, n).expect("device read after the revocation");
    assert!(
        r.pages_in >= pages as u64,
        "the device fetched the revoked pages again: {r:?}"
    );
    for i in 0..n {
        assert_eq!(out.read_word(i), i as u32 + 2, "device word {i} after");
    }
    // A CPU *read* revokes too (no write to invalidate the page anyway):
    // the device fetches an exclusive page the CPU read, and not a
    // migrated one (which stays on the device as a copy).
    let ex = TestMap::anon(1, rw());
    let mig = TestMap::anon(1, rw());
    ex.fill(|i| i as u32 + 100);
    mig.fill(|i| i as u32 + 200);
    m.make_exclusive(ex.range()).expect("exclusive");
    m.migrate_to_device(mig.range()).expect("migrate");
    assert_eq!(ex.read_word(3), 103);
    assert_eq!(mig.read_word(3), 203);
    let r = device_copy(&m, mig.addr(), &out, WPP).expect("device read of the migrated page");
    assert_eq!(
        r.pages_in, 0,
        "a migrated page read back stays on the device: {r:?}"
    );
    assert_eq!(out.read_word(3), 203);
    let r = device_copy(&m, ex.addr(), &out, WPP).expect("device read of the revoked page");
    assert_eq!(r.pages_in, 1, "a revoked page is fetched again: {r:?}");
    assert_eq!(out.read_word(3), 103);
}

/// Kernel test `exclusive_mprotect`: pages held exclusively, then made
/// read-only: the protection change revokes the device's access (giving
/// its data back), and a device write is refused with a typed fault (the
/// kernel test's `-EPERM`).
pub fn exclusive_mprotect<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "exclusive_mprotect") else {
        return;
    };
    let pages = 8;
    let n = pages * WPP;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32 ^ 0x5a00_0000);
    m.make_exclusive(p.range()).expect("exclusive");
    let out = TestMap::anon(pages, rw());
    device_copy(&m, p.addr(), &out, n).expect("device read");
    for i in 0..n {
        assert_eq!(out.read_word(i), i as u32 ^ 0x5a00_0000, "device word {i}");
    }
    p.protect(libc::PROT_READ);
    m.protection_changed(p.range()).expect("protection change");
    assert_eq!(m.exclusive_in(p.range()).expect("check"), 0, "revoked");
    let inc = increment_kernel(&m);
    match launch(&m, &inc, n as u32, [p.addr()]) {
        Err(MirrorError::DeviceFault {
            write: true,
            reason: AccessError::ReadOnly,
            addr,
        }) => assert!(p.range().contains(addr), "fault at {addr}"),
        other => panic!("a device write to read-only memory: {other:?}"),
    }
    for i in 0..n {
        assert_eq!(p.read_word(i), i as u32 ^ 0x5a00_0000, "CPU word {i}");
    }
}

/// Kernel test `exclusive_cow`: pages held exclusively, then `fork()`:
/// the fork revokes the device's access (the prepare-fork handler gives
/// the pages back), and parent and child each increment their own
/// copy-on-write copy.
pub fn exclusive_cow<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate_and_fork(&m, "exclusive_cow") else {
        return;
    };
    let pages = 8;
    let n = pages * WPP;
    let p = TestMap::anon(pages, rw());
    p.fill(|i| i as u32);
    m.make_exclusive(p.range()).expect("exclusive");
    let code = fork_child(|| {
        for i in 0..n {
            if p.read_word(i) != i as u32 {
                return 1;
            }
            p.write_word(i, i as u32 + 10);
        }
        for i in 0..n {
            if p.read_word(i) != i as u32 + 10 {
                return 2;
            }
        }
        0
    });
    assert_eq!(
        code, 0,
        "the child saw its data (1: before, 2: after its writes)"
    );
    assert_eq!(
        m.exclusive_in(p.range()).expect("check"),
        0,
        "fork revoked it"
    );
    // Fault pages back to system memory and check them (`ptr[i]++`).
    for i in 0..n {
        assert_eq!(p.read_word(i), i as u32, "parent word {i}: not the child's");
        p.write_word(i, i as u32 + 1);
    }
    let out = TestMap::anon(pages, rw());
    device_copy(&m, p.addr(), &out, n).expect("device read after the fork");
    for i in 0..n {
        assert_eq!(out.read_word(i), i as u32 + 1, "device word {i}");
    }
}
