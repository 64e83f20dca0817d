//! `LaunchReport::phases` on a real mirror (cpu driver): a faulting launch
//! accounts its time to submission, waits, read-backs, fault service,
//! copies and entry writes, the top-level phases within the launch's wall
//! time; a launch with everything resident services nothing and copies
//! nothing; a launch that wrote pages spends time writing them back.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm_conformance::TestMap;
use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{Mirror, MirrorConfig};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// Invocation `i` reads word 0 of page `i` of `src` into `out[i]`.
fn touch_pages() -> CpuKernel {
    CpuKernel::new(|lane, i| {
        let (src, out) = (lane.args()[0], lane.args()[1]);
        let v = lane.load_u32(src + u64::from(i) * 4096)?;
        lane.store_u32(out + 4 * u64::from(i), v)
    })
}

#[test]
fn a_launch_accounts_its_time_phase_by_phase() {
    let host = Arc::new(HostSpace::new().expect("host space"));
    let cfg = MirrorConfig {
        fault_batch: 64,
        ..MirrorConfig::default()
    };
    let m = Mirror::new(host, CpuDevice::with_threads(2), cfg).expect("mirror");
    let pages = 256u32;
    let src = TestMap::anon(pages as usize, RW);
    src.fill(|w| w as u32);
    let out = TestMap::anon(1, RW);

    let t = Instant::now();
    let r = m
        .launch(&touch_pages(), pages, [src.addr(), out.addr()])
        .expect("faulting launch");
    let wall = t.elapsed();
    for i in 0..pages as usize {
        assert_eq!(out.read_word(i), (i as u32) << 10);
    }
    let p = r.phases;
    assert!(r.submissions > 1, "the launch faulted: {r:?}");
    // Every phase a faulting launch goes through took time.
    for (name, d) in [
        ("submit", p.submit),
        ("wait", p.wait),
        ("read_back", p.read_back),
        ("service", p.service),
        ("copy_in", p.copy_in),
        ("page_table", p.page_table),
        ("write_back", p.write_back),
    ] {
        assert!(d > Duration::ZERO, "{name} is zero: {p:?}");
    }
    assert_eq!(p.will_need, Duration::ZERO, "no advice given: {p:?}");
    // The phases do not overlap, and copies and entry writes lie inside
    // them.
    assert!(p.total() <= wall, "{p:?} sums past the wall time {wall:?}");
    assert!(
        p.copy_in + p.page_table <= p.total(),
        "parts exceed the whole: {p:?}"
    );

    // Everything resident: one round, nothing serviced or copied.
    let r2 = m
        .launch(&touch_pages(), pages, [src.addr(), out.addr()])
        .expect("resident launch");
    assert_eq!(r2.submissions, 1);
    let p2 = r2.phases;
    assert_eq!(
        (p2.service, p2.copy_in, p2.read_back > Duration::ZERO),
        (Duration::ZERO, Duration::ZERO, true),
        "{p2:?}"
    );
    assert!(p2.wait > Duration::ZERO, "{p2:?}");
}
