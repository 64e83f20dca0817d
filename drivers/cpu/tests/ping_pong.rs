//! Ping-pong detection on a real mirror (cpu driver, the adaptive fetch
//! policy forced on): pages the CPU rewrites before every launch and the
//! kernel reads every time are refreshed when a launch begins — no fault
//! round, the CPU's latest data — once they have ping-ponged twice; a
//! refreshed page the kernel stops reading stops being refreshed; the
//! exact policy never refreshes.

#![allow(missing_docs)]

use std::sync::Arc;

use hmm_conformance::TestMap;
use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{FetchPolicy, Mirror, MirrorConfig};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const PAGES: u32 = 64;
/// The pages the CPU rewrites before each launch.
const HOT: [usize; 3] = [5, 6, 40];

/// Invocation `i` reads word 0 of page `i` of `src` into `out[i]`.
fn touch_pages() -> CpuKernel {
    CpuKernel::new(|lane, i| {
        let (src, out) = (lane.args()[0], lane.args()[1]);
        let v = lane.load_u32(src + u64::from(i) * 4096)?;
        lane.store_u32(out + 4 * u64::from(i), v)
    })
}

fn mirror(fetch: FetchPolicy) -> Mirror<CpuDevice, HostSpace> {
    let host = Arc::new(HostSpace::new().expect("host space"));
    let cfg = MirrorConfig {
        fetch,
        ..MirrorConfig::default()
    };
    Mirror::new(host, CpuDevice::with_threads(2), cfg).expect("mirror")
}

/// Rewrites the hot pages with values of launch `l`, launches over the
/// first `n` pages, checks the output; returns (submissions, refreshed
/// pages so far).
fn round(
    m: &Mirror<CpuDevice, HostSpace>,
    src: &TestMap,
    out: &TestMap,
    l: u32,
    n: u32,
) -> (u32, u64) {
    for p in HOT {
        src.write_word(p * 1024, 1_000_000 * (l + 1) + p as u32);
    }
    let r = m
        .launch(&touch_pages(), n, [src.addr(), out.addr()])
        .expect("launch");
    for i in 0..n as usize {
        let want = if HOT.contains(&i) {
            1_000_000 * (l + 1) + i as u32
        } else {
            i as u32
        };
        assert_eq!(out.read_word(i), want, "launch {l}, page {i}: stale data");
    }
    (r.submissions, m.stats().refreshed)
}

fn buffers() -> (TestMap, TestMap) {
    let src = TestMap::anon(PAGES as usize, RW);
    src.fill(|w| if w % 1024 == 0 { (w / 1024) as u32 } else { 0 });
    (src, TestMap::anon(1, RW))
}

#[test]
fn pages_the_cpu_rewrites_every_launch_are_refreshed_not_faulted() {
    let m = mirror(FetchPolicy::Adaptive);
    let (src, out) = buffers();
    m.launch(&touch_pages(), PAGES, [src.addr(), out.addr()])
        .expect("first launch");
    // Launches 1 and 2: the CPU's writes drop the hot pages, the kernel
    // faults them back: two rounds each, and the streak builds.
    for l in 1..3 {
        let (subs, refreshed) = round(&m, &src, &out, l, PAGES);
        assert!(subs >= 2, "launch {l} faulted the hot pages back: {subs}");
        assert_eq!(refreshed, 0, "launch {l}: no streak yet");
    }
    // From launch 3 on they come in before the first round.
    for l in 3..7 {
        let (subs, refreshed) = round(&m, &src, &out, l, PAGES);
        assert_eq!(subs, 1, "launch {l}: refreshed, nothing faulted");
        assert_eq!(refreshed, HOT.len() as u64 * u64::from(l - 2));
    }
    let s = m.stats();
    assert_eq!(
        s.refreshed_used, s.refreshed,
        "every refreshed page was read"
    );
}

#[test]
fn a_refreshed_page_the_kernel_stops_reading_stops_being_refreshed() {
    let m = mirror(FetchPolicy::Adaptive);
    let (src, out) = buffers();
    m.launch(&touch_pages(), PAGES, [src.addr(), out.addr()])
        .expect("first launch");
    for l in 1..3 {
        round(&m, &src, &out, l, PAGES);
    }
    // Launch 3 reads only pages 0..8: the refresh brings all three hot
    // pages, the kernel reads two (5 and 6).
    let (subs, refreshed) = round(&m, &src, &out, 3, 8);
    assert_eq!((subs, refreshed), (1, 3));
    assert_eq!(m.stats().refreshed_used, 2);
    // Launch 4 reads everything again: 5 and 6 are refreshed; 40, unread
    // by launch 3, faults.
    let (subs, refreshed) = round(&m, &src, &out, 4, PAGES);
    assert_eq!(refreshed, 5, "pages 5 and 6 only");
    assert!(subs >= 2, "page 40 faulted: {subs}");
}

#[test]
fn the_exact_policy_never_refreshes() {
    let m = mirror(FetchPolicy::Exact);
    let (src, out) = buffers();
    m.launch(&touch_pages(), PAGES, [src.addr(), out.addr()])
        .expect("first launch");
    for l in 1..6 {
        let (subs, refreshed) = round(&m, &src, &out, l, PAGES);
        assert!(subs >= 2, "launch {l}: the hot pages fault: {subs}");
        assert_eq!(refreshed, 0);
    }
}
