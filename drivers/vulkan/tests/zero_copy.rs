//! Zero-copy mode through the `Backend` calls the mirror core makes: host
//! windows bound to the test's own anonymous mappings, leaf entries naming
//! window pages (`HostWindows::slot`), kernels reading and writing the
//! CPU's pages with no copy. Without a device (or without
//! `VK_EXT_external_memory_host`) each test prints a skip line;
//! `HMM_REQUIRE_GPU=1` (`HMM_REQUIRE_ZERO_COPY=1`) makes that a failure.
//!
//! Every test keeps its mappings alive until the launches using them
//! completed (`take_outcome` waits): the rule zero-copy's unsafe opt-in
//! asks for.

use std::collections::HashMap;

use hmm_conformance::{TestKernel, TestKernels};
use hmm_core::mirror::backend::{
    Backend, BackendError, DeviceConfig, HostToDevice, HostWindows, Invocations, LaunchOutcome,
    PteLoc, PteWrite,
};
use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage};
use hmm_driver_vulkan::{Mode, OpenError, OpenOptions, VulkanDevice};

const PAGE: usize = 4096;
const WPP: usize = PAGE / 4;
const CFG: DeviceConfig = DeviceConfig {
    pool_slots: 0,
    table_pages: 32,
};

/// A zero-copy device, or `None` with a skip line.
fn device() -> Option<VulkanDevice> {
    // SAFETY: every test here keeps the memory its launches touch mapped
    // until those launches completed (each takes its outcomes, which
    // waits, before its `Map`s drop), and unmaps nothing else.
    unsafe { hmm_driver_vulkan::test_device_zero_copy() }
}

/// A private anonymous read-write mapping of `pages` pages whose start is
/// 2 MiB-aligned (so a window of up to 512 pages lies under one leaf
/// table page).
struct Map {
    base: *mut u8,
    total: usize,
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(pages: usize) -> Map {
        let len = pages * PAGE;
        let total = len + (2 << 20);
        // SAFETY: a fresh private anonymous mapping; no address hint.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        let base = base.cast::<u8>();
        let off = (base as usize).next_multiple_of(2 << 20) - base as usize;
        Map {
            base,
            total,
            // SAFETY: `off < 2 MiB`, so the range stays inside the mapping.
            ptr: unsafe { base.add(off) },
            len,
        }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn words(&self) -> usize {
        self.len / 4
    }
    fn write(&self, i: usize, v: u32) {
        assert!(i < self.words());
        // SAFETY: in bounds of the live mapping; volatile, so the store is
        // neither elided nor reordered past a launch.
        unsafe { self.ptr.cast::<u32>().add(i).write_volatile(v) }
    }
    fn read(&self, i: usize) -> u32 {
        assert!(i < self.words());
        // SAFETY: in bounds of the live mapping; volatile, so the load is
        // not cached across launches.
        unsafe { self.ptr.cast::<u32>().add(i).read_volatile() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once, after every launch that
        // used it completed (see the module docs).
        unsafe { libc::munmap(self.base.cast(), self.total) };
    }
}

/// Builds the device page table in the shared format
/// (`shaders/PAGE_TABLE.md`): directory pages allocated as needed.
#[derive(Default)]
struct Table {
    /// (level, VA bits above the level's index) → table page.
    dirs: HashMap<(u32, u64), u32>,
    next: u32,
}

impl Table {
    /// The leaf entry's location for `va`, writing any missing directory
    /// entries first.
    fn leaf(&mut self, d: &VulkanDevice, va: u64) -> PteLoc {
        if self.next == 0 {
            self.next = 1; // page 0 is the root
        }
        let mut table = 0u32;
        let mut writes = Vec::new();
        for level in [4u32, 3, 2] {
            let key = (level - 1, va >> (12 + 9 * (level - 1)));
            let next = match self.dirs.get(&key) {
                Some(&p) => p,
                None => {
                    let p = self.next;
                    self.next += 1;
                    self.dirs.insert(key, p);
                    writes.push(PteWrite {
                        table: TablePage(table),
                        index: level_index(va, level) as u16,
                        pte: Pte::table(TablePage(p)),
                    });
                    p
                }
            };
            table = next;
        }
        if !writes.is_empty() {
            d.write_ptes(&writes).expect("directory entries");
        }
        PteLoc {
            table: TablePage(table),
            index: level_index(va, 1) as u16,
        }
    }

    /// Maps page `p` of `map` (for `p` in `pages`) to page
    /// `p - pages.start` of window `w`.
    fn map_window(
        &mut self,
        d: &VulkanDevice,
        hw: HostWindows,
        map: &Map,
        pages: std::ops::Range<usize>,
        w: u32,
        writable: bool,
    ) {
        let first = pages.start;
        let writes: Vec<PteWrite> = pages
            .map(|p| {
                let loc = self.leaf(d, map.addr() + (p * PAGE) as u64);
                PteWrite {
                    table: loc.table,
                    index: loc.index,
                    pte: Pte::leaf(hw.slot(w, (p - first) as u32), writable),
                }
            })
            .collect();
        d.write_ptes(&writes).expect("leaf entries");
    }

    /// Clears the leaf entries of `pages` of `map`.
    fn unmap(&mut self, d: &VulkanDevice, map: &Map, pages: std::ops::Range<usize>) {
        let writes: Vec<PteWrite> = pages
            .map(|p| {
                let loc = self.leaf(d, map.addr() + (p * PAGE) as u64);
                PteWrite {
                    table: loc.table,
                    index: loc.index,
                    pte: Pte::EMPTY,
                }
            })
            .collect();
        d.write_ptes(&writes).expect("clear entries");
    }
}

/// Binds window `w` to pages `pages` of `map`.
fn bind(d: &VulkanDevice, w: u32, map: &Map, pages: std::ops::Range<usize>) {
    // SAFETY: `w < count` (callers); the window is not bound; the range is
    // page-aligned, non-empty, at most 512 pages, inside `map`, which
    // stays mapped (and readable and writable) until after the window is
    // unbound or the device dropped.
    unsafe {
        d.bind_window(
            w,
            map.ptr.add(pages.start * PAGE),
            (pages.end - pages.start) * PAGE,
        )
    }
    .expect("bind_window");
}

fn run(d: &VulkanDevice, k: TestKernel, n: u32, args: &[u64]) -> LaunchOutcome {
    let kernel = d.test_kernel(k).expect("kernel");
    let id = d
        .launch(&kernel, Invocations::All(n), args)
        .expect("launch");
    d.take_outcome(id).expect("outcome")
}

fn assert_clean(d: &VulkanDevice) {
    let errs = d.validation_errors();
    assert!(errs.is_empty(), "validation errors: {errs:?}");
}

#[test]
fn host_windows_follow_the_device_limits() {
    let Some(d) = device() else { return };
    let hw = d.host_windows().expect("zero-copy device has windows");
    assert!(
        hw.pages.is_power_of_two()
            && (512..=hmm_driver_vulkan::DEFAULT_WINDOW_PAGES).contains(&hw.pages),
        "{hw:?}"
    );
    assert!(
        (1..=hmm_driver_vulkan::DEFAULT_WINDOWS).contains(&hw.count),
        "{hw:?}"
    );
    assert_eq!(d.pool_bindings(), hw.count, "one pool binding per window");
    assert_eq!(d.mode(), Mode::ZeroCopy);
    if std::env::var("HMM_VK_VALIDATION").as_deref() == Ok("1") {
        assert!(
            d.validation_enabled(),
            "HMM_VK_VALIDATION=1 reaches zero-copy devices"
        );
    }
    let align = d.host_import_alignment().expect("extension present");
    assert!(align.is_power_of_two() && align <= 2 << 20, "{align}");
    let info = d.info();
    assert!(info.device.contains("ZeroCopy mode"), "{}", info.device);
    assert!(
        info.device
            .contains(&format!("{} host windows of {} pages", hw.count, hw.pages)),
        "{}",
        info.device
    );
    eprintln!("{info}");
}

/// The window shape is the caller's choice within the device's limits:
/// the count is capped at what the bindings allow, the size is rounded
/// down to a power of two.
#[test]
fn window_shape_follows_the_options() {
    let Some(first) = device() else { return };
    drop(first);
    let opts = |count, pages| {
        // SAFETY: as in `device`: nothing here launches at all.
        let o = unsafe { OpenOptions::default().zero_copy() };
        OpenOptions {
            zero_copy_windows: Some(count),
            zero_copy_window_pages: Some(pages),
            ..o
        }
    };
    let d = VulkanDevice::open_with(&opts(3, 1000)).expect("open");
    assert_eq!(
        d.host_windows(),
        Some(HostWindows {
            count: 3,
            pages: 512
        })
    );
    assert_eq!(d.pool_bindings(), 3);
    drop(d);
    let d = VulkanDevice::open_with(&opts(1000, 2048)).expect("open");
    let hw = d.host_windows().expect("windows");
    assert!(hw.count <= hmm_shaders::MAX_POOL_BINDINGS, "{hw:?}");
    assert_eq!(hw.pages, 2048);
    drop(d);
    match VulkanDevice::open_with(&opts(0, 512)) {
        Err(OpenError::Unsupported { what, .. }) => assert!(what.contains("window"), "{what}"),
        other => panic!("expected Unsupported for zero windows, got {other:?}"),
    }
}

#[test]
fn kernels_read_and_write_the_cpu_pages_with_no_copy() {
    let Some(d) = device() else { return };
    let hw = d.host_windows().expect("windows");
    d.init(CFG).expect("init with no pool");
    // One 2 MiB window: the first half is the source, the second the
    // destination.
    let m = Map::new(512);
    let half = m.words() / 2;
    for i in 0..half {
        m.write(i, (i as u32).wrapping_mul(3) ^ 0x5a5a_0000);
    }
    bind(&d, 0, &m, 0..512);
    let mut t = Table::default();
    t.map_window(&d, hw, &m, 0..512, 0, true);
    let o = run(
        &d,
        TestKernel::CopyU32,
        half as u32,
        &[m.addr(), m.addr() + (half * 4) as u64],
    );
    assert_eq!(o, LaunchOutcome::default(), "no faults");
    for i in (0..half).step_by(101).chain([half - 1]) {
        assert_eq!(
            m.read(half + i),
            (i as u32).wrapping_mul(3) ^ 0x5a5a_0000,
            "word {i}: the CPU sees the device's write with no copy"
        );
    }
    // A CPU write is seen by the next launch: no invalidation, no copy.
    m.write(5, 1000);
    let o = run(&d, TestKernel::IncrementU32, 8, &[m.addr()]);
    assert!(o.incomplete.is_empty());
    assert_eq!(m.read(5), 1001);
    assert_eq!(m.read(7), (7u32.wrapping_mul(3) ^ 0x5a5a_0000) + 1);
    // The device set accessed and dirty bits in the shared format.
    let locs = [
        t.leaf(&d, m.addr()),
        t.leaf(&d, m.addr() + (300 * PAGE) as u64),
    ];
    let mut ptes = Vec::new();
    d.read_ptes(&locs, &mut ptes).expect("read ptes");
    assert!(ptes[0].accessed() && ptes[0].dirty(), "{:?}", ptes[0]);
    assert!(ptes[1].accessed() && ptes[1].dirty(), "{:?}", ptes[1]);
    assert_eq!(ptes[1].slot(), hw.slot(0, 300));
    d.unbind_window(0).expect("unbind");
    assert_clean(&d);
}

#[test]
fn windows_unbind_rebind_and_reach_every_binding() {
    let Some(d) = device() else { return };
    let hw = d.host_windows().expect("windows");
    d.init(CFG).expect("init");
    let last = hw.count - 1;
    let a = Map::new(16);
    let b = Map::new(16);
    let mut t = Table::default();
    // The last window (the `default` arm of the generated switches) and a
    // middle one, over two separate mappings.
    let mid = hw.count / 2;
    bind(&d, last, &a, 0..16);
    t.map_window(&d, hw, &a, 0..16, last, true);
    if mid != last {
        bind(&d, mid, &b, 0..16);
        t.map_window(&d, hw, &b, 0..16, mid, true);
    }
    let words = (16 * WPP) as u32;
    let o = run(&d, TestKernel::FillU32, words, &[a.addr(), 100]);
    assert!(o.incomplete.is_empty() && o.faults.is_empty(), "{o:?}");
    assert_eq!(a.read(0), 100);
    assert_eq!(a.read(16 * WPP - 1), 100 + words - 1);
    if mid != last {
        let o = run(&d, TestKernel::FillU32, words, &[b.addr(), 7]);
        assert!(o.incomplete.is_empty(), "{o:?}");
        assert_eq!(b.read(1234), 7 + 1234);
    }

    // Unbinding while a launch whose descriptor set names the window may
    // still run (it does not reach it: its entries name `last` only): the
    // import must outlive that submission, validation-clean.
    let k = d.test_kernel(TestKernel::IncrementU32).expect("kernel");
    let id = d
        .launch(&k, Invocations::All(words), &[a.addr()])
        .expect("launch");
    if mid != last {
        t.unmap(&d, &b, 0..16);
        d.unbind_window(mid)
            .expect("unbind while another launch runs");
    }
    let o = d.take_outcome(id).expect("outcome");
    assert!(o.incomplete.is_empty(), "{o:?}");
    assert_eq!(a.read(3), 104);

    // Unbind, then bind the same window to other memory: entries naming
    // its slots now reach the new pages.
    t.unmap(&d, &a, 0..16);
    d.unbind_window(last).expect("unbind");
    let c = Map::new(8);
    for i in 0..c.words() {
        c.write(i, 1 << 20);
    }
    bind(&d, last, &c, 0..8);
    t.map_window(&d, hw, &c, 0..8, last, true);
    let o = run(&d, TestKernel::IncrementU32, (8 * WPP) as u32, &[c.addr()]);
    assert!(o.incomplete.is_empty(), "{o:?}");
    assert_eq!(c.read(0), (1 << 20) + 1);
    assert_eq!(c.read(8 * WPP - 1), (1 << 20) + 1);
    assert_eq!(a.read(3), 104, "the old window's pages are left alone");
    // The unmapped old range faults now (entries cleared).
    let o = run(&d, TestKernel::IncrementU32, 4, &[a.addr()]);
    assert_eq!(o.incomplete, vec![0, 1, 2, 3]);
    assert_eq!(o.faults[0].addr() & !0xfff, a.addr());
    d.unbind_window(last).expect("unbind");
    assert_clean(&d);
}

#[test]
fn a_window_partly_mapped_faults_on_the_rest_and_replays() {
    let Some(d) = device() else { return };
    let hw = d.host_windows().expect("windows");
    d.init(CFG).expect("init");
    let m = Map::new(4);
    bind(&d, 0, &m, 0..4);
    let mut t = Table::default();
    t.map_window(&d, hw, &m, 0..2, 0, true);
    let k = d.test_kernel(TestKernel::FillU32).expect("kernel");
    let id = d
        .launch(&k, Invocations::All((4 * WPP) as u32), &[m.addr(), 0])
        .expect("launch");
    let o = d.take_outcome(id).expect("outcome");
    assert_eq!(o.incomplete.len(), 2 * WPP, "pages 2 and 3 fault");
    assert!(o
        .faults
        .iter()
        .all(|f| f.addr() >= m.addr() + 2 * PAGE as u64));
    // Service the faults the way the core does: map the pages (window
    // pages 2 and 3), replay exactly the incomplete invocations.
    let writes: Vec<PteWrite> = (2..4)
        .map(|p| {
            let loc = t.leaf(&d, m.addr() + (p * PAGE) as u64);
            PteWrite {
                table: loc.table,
                index: loc.index,
                pte: Pte::leaf(hw.slot(0, p as u32), true),
            }
        })
        .collect();
    d.write_ptes(&writes).expect("map the rest");
    let id = d
        .launch(&k, Invocations::Only(&o.incomplete), &[m.addr(), 0])
        .expect("replay");
    let o = d.take_outcome(id).expect("outcome");
    assert!(o.incomplete.is_empty(), "{o:?}");
    for i in (0..4 * WPP).step_by(333).chain([4 * WPP - 1]) {
        assert_eq!(m.read(i), i as u32, "word {i}");
    }
    d.unbind_window(0).expect("unbind");
    assert_clean(&d);
}

#[test]
fn bad_bindings_and_copies_are_typed_errors() {
    let Some(d) = device() else { return };
    let hw = d.host_windows().expect("windows");
    let align = d.host_import_alignment().expect("alignment") as usize;
    assert!(
        matches!(
            d.init(DeviceConfig {
                pool_slots: 8,
                table_pages: 4
            }),
            Err(BackendError::Unsupported(_))
        ),
        "zero-copy init with a pool"
    );
    d.init(CFG)
        .expect("init with pool_slots 0 after the refusal");
    let m = Map::new(hw.pages as usize + 8);
    let bad = |w: u32, off: usize, len: usize| {
        // SAFETY: every call here is refused before anything is imported
        // (checked below); the range lies inside `m` anyway.
        let r = unsafe { d.bind_window(w, m.ptr.add(off), len) };
        match r {
            Err(BackendError::Other(msg)) => msg,
            other => panic!("bind_window({w}, +{off}, {len}): expected an error, got {other:?}"),
        }
    };
    if align > 8 {
        let msg = bad(0, 8, PAGE);
        assert!(msg.contains("minImportedHostPointerAlignment"), "{msg}");
        let msg = bad(0, 0, PAGE + 8);
        assert!(msg.contains("minImportedHostPointerAlignment"), "{msg}");
    }
    assert!(bad(0, 0, 0).contains("bytes"));
    assert!(bad(0, 0, (hw.pages as usize + 1) * PAGE).contains("a window holds"));
    assert!(bad(hw.count, 0, PAGE).contains("outside"));
    bind(&d, 1 % hw.count, &m, 0..1);
    assert!(bad(1 % hw.count, PAGE, PAGE).contains("already bound"));
    // Unbinding an unbound window is a no-op; one past the end an error.
    for w in 0..hw.count {
        if w != 1 % hw.count {
            d.unbind_window(w).expect("unbinding an unbound window");
        }
    }
    d.unbind_window(1 % hw.count).expect("unbind");
    d.unbind_window(1 % hw.count).expect("again: a no-op");
    assert!(matches!(
        d.unbind_window(hw.count),
        Err(BackendError::Other(_))
    ));
    // Copies have no pool to go to.
    let page = [0u8; PAGE];
    // SAFETY: `page` is readable for 4096 bytes during the call.
    let r = unsafe {
        d.copy_to_device(&[HostToDevice {
            slot: PoolSlot(0),
            src: page.as_ptr(),
        }])
    };
    assert!(matches!(r, Err(BackendError::Unsupported(_))), "{r:?}");
    // SAFETY: an empty batch names no host memory.
    let r = unsafe { d.copy_to_host(&[]) };
    assert!(matches!(r, Err(BackendError::Unsupported(_))), "{r:?}");
    // After all the refusals the window table still works.
    bind(&d, 0, &m, 8..16);
    let mut t = Table::default();
    t.map_window(&d, hw, &m, 8..16, 0, true);
    let o = run(
        &d,
        TestKernel::FillU32,
        4,
        &[m.addr() + (8 * PAGE) as u64, 9],
    );
    assert!(o.incomplete.is_empty(), "{o:?}");
    assert_eq!(m.read(8 * WPP + 3), 12);
    d.unbind_window(0).expect("unbind");
    assert_clean(&d);
}

#[test]
fn copy_mode_has_no_windows_and_zero_copy_needs_the_opt_in() {
    let Some(copy) = hmm_driver_vulkan::test_device() else {
        return;
    };
    assert_eq!(copy.host_windows(), None);
    assert_eq!(copy.pool_bindings(), hmm_shaders::POOL_BINDINGS);
    let m = Map::new(1);
    // SAFETY: refused (copy mode) before anything is imported.
    let r = unsafe { copy.bind_window(0, m.ptr, PAGE) };
    assert!(matches!(r, Err(BackendError::Unsupported(_))), "{r:?}");
    copy.unbind_window(0).expect("copy mode: a no-op");
    let e = VulkanDevice::open_with(&OpenOptions {
        mode: Some(Mode::ZeroCopy),
        ..Default::default()
    })
    .expect_err("no opt-in");
    assert!(matches!(e, OpenError::ZeroCopyNotOptedIn), "{e}");
}
