//! Scenarios beyond the kernel's selftests: eviction and the pool,
//! pointer chasing, the pinning baseline, teardown, concurrency, accessed
//! bits, prefetch and read-mostly duplication.

use std::sync::Arc;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{Advice, Mirror, MirrorConfig, MirrorError};
use hmm_core::notifier::EventKind;
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

use crate::support::{
    device_copy, events_available, launch, setup, small_cfg, spawn, zero_copy, TestMap, WPP,
};
use crate::{TestKernel, TestKernels};

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
        launch(&m, &k, WPP as u32, [src.addr() + p * PAGE_SIZE, out.addr()]).expect("launch");
        assert_eq!(out.read_word(17), (p as usize * WPP + 17) as u32);
    }
    let st = m.stats();
    assert!(st.evictions > 0);
    assert!(st.pool_used <= 8);
}

/// Oversubscription with a kernel that follows the replay contract but
/// does not touch its output for writing first: every invocation loads 64
/// words spread over 8 pages, then stores their sum
/// ([`TestKernel::GatherSum`]). The data is `factor` times the pool (256
/// slots, 1 MiB). Every launch must finish with every sum right — issue 19
/// finding 6: on the cpu driver 2× and more ended in
/// `NoProgress { replays: 1000 }`, every invocation faulting in every round.
fn oversubscribed_load_then_store<B: TestKernels>(b: B, factor: usize) {
    const POOL: usize = 256;
    let cfg = MirrorConfig {
        pool_slots: POOL as u32,
        ..MirrorConfig::default()
    };
    let (_h, m) = setup(b, cfg);
    let pages = POOL * factor;
    let src = TestMap::anon(pages, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32);
    let n = pages * WPP / 64;
    let out = TestMap::anon(
        (n * 4).div_ceil(PAGE_SIZE as usize),
        libc::PROT_READ | libc::PROT_WRITE,
    );
    let k = m
        .backend()
        .test_kernel(TestKernel::GatherSum)
        .expect("kernel");
    let r = launch(&m, &k, n as u32, [src.addr(), out.addr()]);
    let r = r.unwrap_or_else(|e| panic!("{factor}x oversubscription: {e}"));
    assert!(
        r.pages_in as usize > pages,
        "{factor}x: the pool was oversubscribed ({r:?})"
    );
    for i in 0..n {
        let base = (i / 128 * 8192 + i % 128) as u32;
        let want = (0..64u32).fold(0u32, |s, j| s.wrapping_add(base + 128 * j));
        assert_eq!(out.read_word(i), want, "{factor}x: out[{i}]");
    }
}

/// A pool oversubscribed 2× by a load-then-store kernel (see the
/// module's `oversubscribed_load_then_store`): every result right.
pub fn oversubscribed_load_then_store_2x<B: TestKernels>(b: B) {
    oversubscribed_load_then_store(b, 2);
}

/// A pool oversubscribed 4× by a load-then-store kernel (see the
/// module's `oversubscribed_load_then_store`): every result right.
pub fn oversubscribed_load_then_store_4x<B: TestKernels>(b: B) {
    oversubscribed_load_then_store(b, 4);
}

/// A pool oversubscribed 8× by a load-then-store kernel (see the
/// module's `oversubscribed_load_then_store`): every result right.
pub fn oversubscribed_load_then_store_8x<B: TestKernels>(b: B) {
    oversubscribed_load_then_store(b, 8);
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
    launch(&m, &k, (16 * WPP) as u32, [dst.addr(), 9]).expect("launch");
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
    launch(&m, &k, 1, [head, outp]).expect("launch");
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
            spawn(move || {
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
    launch(&m2, &inc, (4 * WPP) as u32, [src.addr()]).expect("m2 write");
    device_copy(&m1, src.addr(), &out1, 4 * WPP).expect("m1 read after write");
    assert_eq!(out1.read_word(5), 9, "the write collapsed m1's copy");
}
