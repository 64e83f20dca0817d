//! The adaptive fetch policy on a real mirror (cpu driver, policy chosen
//! explicitly: `Auto` is exact on this driver): a sweep's faults bring the
//! pages after them, inside the faulting mapping only and never beyond the
//! pool's free slots; `Advice::Random` stops it, `Advice::Sequential`
//! reads ahead of short runs too; `Exact` fetches only what faulted.

#![allow(missing_docs)]

use std::sync::Arc;

use hmm_conformance::TestMap;
use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{Advice, FetchPolicy, LaunchReport, Mirror, MirrorConfig};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

fn mirror(fetch: FetchPolicy, pool_slots: u32) -> Mirror<CpuDevice> {
    let host = Arc::new(HostSpace::new().expect("host space"));
    let cfg = MirrorConfig {
        pool_slots,
        fetch,
        ..MirrorConfig::default()
    };
    Mirror::new(host, CpuDevice::with_threads(2), cfg).expect("mirror")
}

/// Invocation `i` reads word 0 of page `first + i` of `src` into `out[i]`.
fn touch_pages() -> CpuKernel {
    CpuKernel::new(|lane, i| {
        let (src, first, out) = (lane.args()[0], lane.args()[1], lane.args()[2]);
        let v = lane.load_u32(src + (first + u64::from(i)) * 4096)?;
        lane.store_u32(out + 4 * u64::from(i), v)
    })
}

/// Launches `n` invocations over pages `first..first + n` of `src`;
/// returns (pages the policy speculated, pages copied in) for it, and
/// checks the words read.
fn sweep(m: &Mirror<CpuDevice>, src: &TestMap, first: u64, n: u32) -> (u64, u64) {
    let out = TestMap::anon(1, RW);
    let before = m.stats().speculated;
    let r = m
        .launch(&touch_pages(), n, [src.addr(), first, out.addr()])
        .expect("launch");
    for i in 0..n as usize {
        assert_eq!(
            out.read_word(i),
            (first as u32 + i as u32) << 10,
            "page {}",
            first as usize + i
        );
    }
    (m.stats().speculated - before, r.pages_in)
}

fn source(pages: usize) -> TestMap {
    let src = TestMap::anon(pages, RW);
    src.fill(|w| w as u32);
    src
}

#[test]
fn a_sweep_brings_the_pages_after_it_inside_its_mapping_only() {
    let m = mirror(FetchPolicy::Adaptive, 4096);
    let src = source(600);
    // 32 pages fault in round 0: a stream, whose look-ahead is 32 × 8.
    let (spec, _) = sweep(&m, &src, 0, 32);
    assert_eq!(spec, 256);
    // Those pages were right: the next sweep over them copies in only its
    // new output page.
    let (spec, pages_in) = sweep(&m, &src, 32, 256);
    assert_eq!((spec, pages_in), (0, 1));

    // In a 100-page mapping the look-ahead stops at its end.
    let m = mirror(FetchPolicy::Adaptive, 4096);
    let src = source(100);
    let (spec, _) = sweep(&m, &src, 0, 32);
    assert_eq!(spec, 68, "the rest of the mapping, nothing past it");
    // Nothing outside the source and the output pages was fetched (the
    // outputs may already be unmapped and released).
    let (_, pages_in) = sweep(&m, &src, 32, 68);
    assert_eq!(pages_in, 1);
    let mapped = m.stats().mapped_pages;
    assert!((100..=102).contains(&mapped), "{mapped} pages mapped");
}

#[test]
fn exact_fetches_only_what_faulted() {
    let m = mirror(FetchPolicy::Exact, 4096);
    let src = source(300);
    let (spec, pages_in) = sweep(&m, &src, 0, 32);
    assert_eq!((spec, pages_in), (0, 33), "32 source pages and the output");
    let (_, pages_in) = sweep(&m, &src, 32, 32);
    assert_eq!(pages_in, 33);
}

#[test]
fn speculation_never_takes_more_than_the_free_slots() {
    // 64 slots: after the 32 faulted source pages at most 32 are free;
    // the look-ahead (256 pages) is cut to what is free.
    let m = mirror(FetchPolicy::Adaptive, 64);
    let src = source(300);
    let (spec, _) = sweep(&m, &src, 0, 32);
    assert!((1..=32).contains(&spec), "{spec} pages speculated");
    assert!(m.stats().pool_used <= 64);
}

#[test]
fn random_advice_stops_speculation_and_sequential_reads_ahead_of_short_runs() {
    let m = mirror(FetchPolicy::Adaptive, 4096);
    let src = source(300);
    m.advise(src.range(), Advice::Random);
    let (spec, pages_in) = sweep(&m, &src, 0, 32);
    assert_eq!((spec, pages_in), (0, 33), "Random: only what faulted");

    // 4 faulting pages are no stream by themselves...
    let m = mirror(FetchPolicy::Adaptive, 4096);
    let src = source(300);
    let (spec, _) = sweep(&m, &src, 100, 4);
    assert_eq!(spec, 0);
    // ...but are under Sequential advice: 4 × 8 pages after them.
    m.advise(src.range(), Advice::Sequential);
    let (spec, _) = sweep(&m, &src, 200, 4);
    assert_eq!(spec, 32);
    // Default forgets it.
    m.advise(src.range(), Advice::Default);
    let (spec, _) = sweep(&m, &src, 50, 4);
    assert_eq!(spec, 0);
}

/// Launches `n` invocations over pages `0..n` of `src` (checking the words)
/// and returns the report and how many pages the mirror prefetched.
fn launch_over(m: &Mirror<CpuDevice>, src: &TestMap, n: u32) -> (LaunchReport, u64) {
    let out = TestMap::anon(1, RW);
    let before = m.stats().prefetched;
    let r = m
        .launch(&touch_pages(), n, [src.addr(), 0, out.addr()])
        .expect("launch");
    for i in 0..n as usize {
        assert_eq!(out.read_word(i), (i as u32) << 10, "page {i}");
    }
    (r, m.stats().prefetched - before)
}

/// `Advice::WillNeed`: the next launch fetches the range before its first
/// round, so its invocations fault only on their output page (two rounds
/// where the same launch without the advice takes three); the advice is
/// then spent; `Default` forgets it; a range whose tail was unmapped is
/// fetched up to the hole and the launch still succeeds.
#[test]
fn will_need_fetches_the_range_before_the_first_round() {
    let src = source(64);
    // One mirror at a time: each has its own host space, and a mapping is
    // registered with one userfaultfd only.
    {
        let control = mirror(FetchPolicy::Exact, 4096);
        let (r, fetched) = launch_over(&control, &src, 64);
        assert_eq!((r.submissions, r.pages_in, fetched), (3, 65, 0));
    }
    {
        let m = mirror(FetchPolicy::Exact, 4096);
        m.advise(src.range(), Advice::WillNeed);
        let (r, fetched) = launch_over(&m, &src, 64);
        assert_eq!((r.submissions, r.pages_in, fetched), (2, 65, 64));
        // Its time is the launch's will-need phase, copies included.
        let p = r.phases;
        assert!(
            p.will_need > std::time::Duration::ZERO && p.copy_in > std::time::Duration::ZERO,
            "{p:?}"
        );

        // Spent: after the CPU rewrites the source (the sync point drops
        // the device copies), the next launch faults again.
        src.fill(|w| w as u32);
        let (r, fetched) = launch_over(&m, &src, 64);
        assert_eq!((r.submissions, fetched), (3, 0));
        assert_eq!(r.phases.will_need, std::time::Duration::ZERO, "spent");

        // `Default` forgets it.
        src.fill(|w| w as u32);
        m.advise(src.range(), Advice::WillNeed);
        m.advise(src.range(), Advice::Default);
        let (r, fetched) = launch_over(&m, &src, 64);
        assert_eq!((r.submissions, fetched), (3, 0));
    }
    // The last 32 pages unmapped after the advice: the first 32 are
    // fetched, and the launch over them succeeds.
    let m = mirror(FetchPolicy::Exact, 4096);
    m.advise(src.range(), Advice::WillNeed);
    // SAFETY: the last 32 pages of our own mapping; nothing refers to them
    // (TestMap's drop unmaps the whole range, holes included).
    let rc = unsafe { libc::munmap((src.addr() + 32 * 4096) as *mut libc::c_void, 32 * 4096) };
    assert_eq!(rc, 0);
    let (r, fetched) = launch_over(&m, &src, 32);
    assert_eq!((r.submissions, fetched), (2, 32));
}

/// `MirrorStats::speculated_used`: invocation `i` reads page `i`, then
/// page `i + 32`. The 32 first reads fault together, a stream whose
/// look-ahead brings pages 32..288; the replay's second reads use 32 of
/// them. The counter reads the entries' accessed bits when the launch
/// ends, so it says 32 of 256.
#[test]
fn speculated_pages_the_device_used_are_counted() {
    let m = mirror(FetchPolicy::Adaptive, 4096);
    let src = source(600);
    let out = TestMap::anon(1, RW);
    let k = CpuKernel::new(|lane, i| {
        let (src, out) = (lane.args()[0], lane.args()[1]);
        let a = lane.load_u32(src + u64::from(i) * 4096)?;
        let b = lane.load_u32(src + u64::from(i + 32) * 4096)?;
        lane.store_u32(out + 4 * u64::from(i), a.wrapping_add(b))
    });
    m.launch(&k, 32, [src.addr(), out.addr()]).expect("launch");
    for i in 0..32usize {
        assert_eq!(
            out.read_word(i),
            ((i as u32) << 10) + (((i as u32) + 32) << 10)
        );
    }
    let s = m.stats();
    assert_eq!((s.speculated, s.speculated_used), (256, 32));
}
