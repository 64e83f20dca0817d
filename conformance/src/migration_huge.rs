//! Device-private migration of transparent huge pages (issue 17): the
//! kernel's `migrate_anon_huge_*`, `migrate_partial_unmap_fault` and
//! `migrate_remap_fault` tests, ported under their names.
//!
//! Each buffer is a 2 MiB-aligned block advised `MADV_HUGEPAGE` (and, in
//! the tests that loop over it as the kernel's do, `MADV_NOHUGEPAGE`).
//! The mirror's device memory is 4 KiB slots, so a huge page migrates as
//! 512 small ones and comes back as small pages; the tests check the data
//! on both sides. Not ported: `migrate_anon_huge_err` and
//! `migrate_anon_huge_zero_err`, which make the test driver fail to
//! allocate a *huge* device page — there is no huge device allocation
//! here to fail.
//!
//! Unmapping inside a test's buffer leaves a hole another test in the
//! process may map into, so a buffer with a hole is never unmapped whole
//! (`unmap_around`).

use hmm_core::{VaRange, VirtAddr};

use crate::migration::{can_migrate, rw};
use crate::support::{device_copy, setup, small_cfg, TestMap, WPP};
use crate::TestKernels;

const HUGE: usize = 2 << 20;
const MEG: usize = 1 << 20;
/// The kernel tests' offsets into the block.
const OFFSETS: [usize; 3] = [0, 512 << 10, MEG];

/// A mapping of `blocks` + 1 huge pages and the 2 MiB-aligned start of
/// `blocks` of them inside it, advised huge (or not).
fn block(blocks: usize, huge: bool) -> (TestMap, u64) {
    let map = TestMap::anon((blocks + 1) * HUGE / 4096, rw());
    let start = (map.addr() + HUGE as u64 - 1) & !(HUGE as u64 - 1);
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: advice on our own mapping; it changes no contents.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, blocks * HUGE, advice) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    (map, start)
}

fn range(start: u64, len: usize) -> VaRange {
    VaRange::from_start_len(VirtAddr(start), len as u64).expect("range")
}

fn read(at: u64, i: usize) -> u32 {
    // SAFETY: callers pass an address inside a live, readable mapping of
    // theirs, 4-byte aligned.
    unsafe { std::ptr::read_volatile((at as *const u32).add(i)) }
}

fn write(at: u64, i: usize, v: u32) {
    // SAFETY: as `read`, writable.
    unsafe { std::ptr::write_volatile((at as *mut u32).add(i), v) }
}

/// Unmaps `map` except `[hole, hole + len)` (already unmapped, and maybe
/// someone else's by now).
fn unmap_around(map: TestMap, hole: u64, len: usize) {
    let (base, end) = (map.addr(), map.addr() + map.len as u64);
    std::mem::forget(map);
    for (a, b) in [(base, hole), (hole + len as u64, end)] {
        if b > a {
            // SAFETY: our own mapping's pieces, outside the hole; no
            // reference into them is live.
            unsafe { libc::munmap(a as *mut libc::c_void, (b - a) as usize) };
        }
    }
}

/// Checks the device reads `want(i)` at word `i` of the block at `start`.
fn device_reads<B: TestKernels>(
    m: &hmm_core::mirror::Mirror<B>,
    start: u64,
    want: impl Fn(usize) -> u32,
    case: &str,
) {
    let out = TestMap::anon(HUGE / 4096, rw());
    device_copy(m, start, &out, HUGE / 4).expect("device read");
    for i in (0..HUGE / 4).step_by(WPP / 4) {
        assert_eq!(out.read_word(i), want(i), "{case}: device word {i}");
    }
}

/// Kernel test `migrate_anon_huge_empty`: a huge-page block nobody
/// touched migrates, and both sides read zeros.
pub fn migrate_anon_huge_empty<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_anon_huge_empty") else {
        return;
    };
    let (_map, start) = block(1, true);
    let n = m.migrate_to_device(range(start, HUGE)).expect("migrate");
    assert_eq!(n, (HUGE / 4096) as u64);
    device_reads(&m, start, |_| 0, "empty");
    for i in 0..HUGE / 4 {
        assert_eq!(read(start, i), 0, "CPU word {i}");
    }
}

/// Kernel test `migrate_anon_huge_zero`: a block read first (the huge zero
/// page) migrates; both sides read zeros, and CPU writes afterwards stick.
pub fn migrate_anon_huge_zero<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_anon_huge_zero") else {
        return;
    };
    let (_map, start) = block(1, true);
    for i in (0..HUGE / 4).step_by(WPP) {
        assert_eq!(read(start, i), 0);
    }
    m.migrate_to_device(range(start, HUGE)).expect("migrate");
    device_reads(&m, start, |_| 0, "zero");
    for i in 0..HUGE / 4 {
        assert_eq!(read(start, i), 0, "CPU word {i}");
        write(start, i, i as u32);
    }
    for i in 0..HUGE / 4 {
        assert_eq!(read(start, i), i as u32, "CPU word {i} after the write");
    }
}

/// Kernel test `migrate_anon_huge_free`: a migrated block freed with
/// `MADV_FREE` (the program no longer needs its contents): nothing hangs,
/// and a read sees either the data or zeros, as `MADV_FREE` allows.
pub fn migrate_anon_huge_free<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_anon_huge_free") else {
        return;
    };
    let (_map, start) = block(1, true);
    for i in 0..HUGE / 4 {
        write(start, i, i as u32);
    }
    m.migrate_to_device(range(start, HUGE)).expect("migrate");
    device_reads(&m, start, |i| i as u32, "free");
    // SAFETY: advice on our own block; no reference into it is live.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, HUGE, libc::MADV_FREE) };
    assert_eq!(r, 0, "MADV_FREE: {}", std::io::Error::last_os_error());
    assert!(h.settle());
    for i in (0..HUGE / 4).step_by(97) {
        let v = read(start, i);
        assert!(v == i as u32 || v == 0, "word {i} after MADV_FREE: {v:#x}");
    }
    m.health().expect("healthy");
}

/// Kernel test `migrate_anon_huge_fault`: a written huge-page block
/// migrates, the device reads it, and CPU reads fault it back intact.
pub fn migrate_anon_huge_fault<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_anon_huge_fault") else {
        return;
    };
    let (_map, start) = block(1, true);
    for i in 0..HUGE / 4 {
        write(start, i, i as u32);
    }
    m.migrate_to_device(range(start, HUGE)).expect("migrate");
    device_reads(&m, start, |i| i as u32, "fault");
    for i in 0..HUGE / 4 {
        assert_eq!(read(start, i), i as u32, "CPU word {i}");
    }
    assert_eq!(m.stats().migrated_in, (HUGE / 4096) as u64);
}

/// Kernel test `migrate_partial_unmap_fault`: a migrated block (huge or
/// not) loses 1 MiB at each of the kernel's offsets to `munmap`; the rest
/// faults back intact.
pub fn migrate_partial_unmap_fault<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_partial_unmap_fault") else {
        return;
    };
    for huge in [false, true] {
        for off in OFFSETS {
            let case = format!("huge {huge} offset {off}");
            let (map, start) = block(1, huge);
            for i in 0..HUGE / 4 {
                write(start, i, i as u32);
            }
            m.migrate_to_device(range(start, HUGE)).expect("migrate");
            device_reads(&m, start, |i| i as u32, &case);
            let hole = start + off as u64;
            // SAFETY: 1 MiB of our own block; no reference into it is live.
            let r = unsafe { libc::munmap(hole as *mut libc::c_void, MEG) };
            assert_eq!(r, 0);
            assert!(h.settle());
            for i in 0..HUGE / 4 {
                if i * 4 < off || i * 4 >= off + MEG {
                    assert_eq!(
                        read(start, i),
                        i as u32,
                        "huge {huge} offset {off} word {i}"
                    );
                }
            }
            unmap_around(map, hole, MEG);
        }
    }
}

/// Kernel test `migrate_remap_fault`: a block (huge or not) moved with
/// `mremap` (with and without `MREMAP_DONTUNMAP`) to each of the kernel's
/// offsets past it, before or after its migration; the CPU reads it back
/// intact at the new address.
pub fn migrate_remap_fault<B: TestKernels>(b: B) {
    let (h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_remap_fault") else {
        return;
    };
    for before in [false, true] {
        for dont_unmap in [false, true] {
            for huge in [false, true] {
                for off in OFFSETS {
                    let case =
                        format!("before {before} dont_unmap {dont_unmap} huge {huge} offset {off}");
                    // Room for the block and its destination, both inside
                    // our own mapping (the kernel test unmaps the
                    // destination first; here `MREMAP_FIXED` replaces it).
                    let (map, start) = block(3, huge);
                    for i in 0..HUGE / 4 {
                        write(start, i, i as u32);
                    }
                    let dest = start + (HUGE + off) as u64;
                    let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                    if dont_unmap {
                        flags |= libc::MREMAP_DONTUNMAP;
                    }
                    let remap = || {
                        // SAFETY: moving our own block onto another part of
                        // our own mapping; no reference into either is live.
                        let to = unsafe {
                            libc::mremap(
                                start as *mut libc::c_void,
                                HUGE,
                                HUGE,
                                flags,
                                dest as *mut libc::c_void,
                            )
                        };
                        assert_ne!(to, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
                        assert!(h.settle());
                    };
                    let at = if before {
                        remap();
                        m.migrate_to_device(range(dest, HUGE)).expect("migrate");
                        device_reads(&m, dest, |i| i as u32, &case);
                        dest
                    } else {
                        m.migrate_to_device(range(start, HUGE)).expect("migrate");
                        device_reads(&m, start, |i| i as u32, &case);
                        remap();
                        dest
                    };
                    for i in 0..HUGE / 4 {
                        assert_eq!(
                            read(at, i),
                            i as u32,
                            "before {before} dont_unmap {dont_unmap} huge {huge} offset {off} word {i}"
                        );
                    }
                    if dont_unmap {
                        drop(map);
                    } else {
                        unmap_around(map, start, HUGE);
                    }
                }
            }
        }
    }
}

/// The fault-back neighbourhood follows density: a CPU sweeping migrated
/// memory brings its first 2 MiB block back in 7 faults (a page, then
/// 64 KiB, 128 KiB, … 1 MiB, then the last 64 KiB) and the next block
/// whole in one; a CPU touching every other 64 KiB block brings back the
/// page it touches alone, and a second touch in one of those blocks the
/// block; and nothing outside the neighbourhoods comes back.
pub fn migrate_fault_back_neighbourhood<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_fault_back_neighbourhood") else {
        return;
    };
    let (_map, start) = block(3, false);
    for i in 0..3 * HUGE / 4 {
        write(start, i, i as u32);
    }
    m.migrate_to_device(range(start, 3 * HUGE))
        .expect("migrate");
    let s0 = m.stats();
    for i in 0..2 * HUGE / 4 {
        assert_eq!(read(start, i), i as u32, "sweep word {i}");
    }
    let s1 = m.stats();
    assert_eq!(s1.fault_backs - s0.fault_backs, 8, "a 4 MiB sweep: {s1:?}");
    assert_eq!(s1.migrated_in - s0.migrated_in, 1024);
    // The third block: every other 64 KiB, from its second one (the
    // sweep's density below does not reach past a gap).
    let sparse = start + 2 * HUGE as u64;
    for k in (1..32).step_by(2) {
        let i = k * (64 << 10) / 4 + 5;
        assert_eq!(read(sparse, i), (HUGE / 2 + i) as u32, "sparse word {i}");
    }
    let s2 = m.stats();
    assert_eq!(s2.fault_backs - s1.fault_backs, 16, "sparse: {s2:?}");
    assert_eq!(s2.migrated_in - s1.migrated_in, 16, "a page each");
    assert_eq!(
        s2.fault_back_span - s1.fault_back_span,
        16,
        "the neighbourhoods chosen"
    );
    // A second touch in one of those blocks: the rest of the block.
    let i = 3 * (64 << 10) / 4 + 1029;
    assert_eq!(read(sparse, i), (HUGE / 2 + i) as u32, "dense word {i}");
    let s3 = m.stats();
    assert_eq!(s3.fault_backs - s2.fault_backs, 1, "{s3:?}");
    assert_eq!(
        s3.migrated_in - s2.migrated_in,
        15,
        "the block's other pages"
    );
    // Where the device's copies are host code, the event monitor's reader
    // served faults the moment it read them (nothing else runs here: no
    // launch, no event before them); elsewhere it never may.
    let on_reader = s3.fault_backs_on_reader - s0.fault_backs_on_reader;
    if m.backend().host_synchronous() {
        assert!(on_reader > 0, "no fault served on the reader: {s3:?}");
    } else {
        assert_eq!(on_reader, 0, "{s3:?}");
    }
}

/// Pages faulted back one by one (on the cpu driver the event monitor's
/// reader answers them, and the mirror settles its books at its next
/// acquisition of the driver lock): a launch right after must see the
/// CPU's writes to them, and its own writes to them must reach the CPU —
/// neither may be taken for a page still migrated. Pages not touched stay
/// migrated and carry the device's writes until the CPU reads them.
pub fn migrate_fault_back_then_launch<B: TestKernels>(b: B) {
    let (_h, m) = setup(b, small_cfg());
    let Some(_gate) = can_migrate(&m, "migrate_fault_back_then_launch") else {
        return;
    };
    let pages = 64;
    let src = TestMap::anon(pages, rw());
    src.fill(|i| i as u32 + 1000);
    let out = TestMap::anon(pages, rw());
    out.fill(|i| i as u32);
    m.migrate_to_device(src.range()).expect("migrate src");
    m.migrate_to_device(out.range()).expect("migrate out");
    // Isolated faults: each brings back its page alone.
    for p in (0..pages).step_by(8) {
        let i = p * WPP + 3;
        assert_eq!(out.read_word(i), i as u32, "out word {i}");
        assert_eq!(src.read_word(i), i as u32 + 1000, "src word {i}");
    }
    let written = |i: usize| i % (16 * WPP) == 5;
    for i in (0..pages * WPP).filter(|&i| written(i)) {
        src.write_word(i, 7_000_000 + i as u32);
    }
    device_copy(&m, src.addr(), &out, pages * WPP).expect("launch");
    for i in 0..pages * WPP {
        let want = if written(i) {
            7_000_000 + i as u32
        } else {
            i as u32 + 1000
        };
        assert_eq!(out.read_word(i), want, "out word {i} after the launch");
    }
}
