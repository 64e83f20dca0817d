//! userfaultfd event latency and write-tracking cost.
//!
//! (a) `munmap` of a watched 2 MiB range, timed in the unmapping thread
//!     from just before `munmap` until the sink's `invalidate` has returned
//!     (the sink bumps an atomic the unmapper spins on). Unpopulated and
//!     populated variants; besides criterion's figures, a plain loop of
//!     2000 iterations prints median and p99.
//! (b) `WriteTracker::collect` over 1 GiB watched: with no writes, and
//!     after 1000 scattered CPU writes (only the collect is timed).
//!
//! Without userfaultfd the benchmark prints why and measures nothing.

mod common;

use common::map;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hmm_core::cpu::monitor::{EventMonitor, InvalidationSink};
use hmm_core::cpu::probe::Capabilities;
use hmm_core::cpu::write_track::TrackMode;
use hmm_core::notifier::EventKind;
use hmm_core::{VaRange, VirtAddr};

const PS: usize = 4096;
const TWO_MIB: usize = 2 << 20;
const GIB: usize = 1 << 30;

struct Signal(AtomicU64);

impl InvalidationSink for Signal {
    fn invalidate(&self, _range: VaRange, kind: EventKind) {
        if kind == EventKind::Unmap {
            self.0.fetch_add(1, Ordering::Release);
        }
    }
}

fn range(addr: usize, len: usize) -> VaRange {
    VaRange::user_pages(VirtAddr(addr as u64), len as u64).expect("page-aligned mapping")
}

/// One watched munmap; returns the time until the sink has run.
fn one_unmap(mon: &EventMonitor, sig: &Signal, populate: bool) -> Duration {
    let a = map(TWO_MIB);
    if populate {
        for off in (0..TWO_MIB).step_by(PS) {
            // SAFETY: inside the fresh mapping.
            unsafe { ((a + off) as *mut u8).write_volatile(1) };
        }
    }
    mon.watch(range(a, TWO_MIB)).expect("watch");
    let before = sig.0.load(Ordering::Acquire);
    let t0 = Instant::now();
    // SAFETY: unmaps the mapping made above; nothing references it.
    unsafe { libc::munmap(a as *mut libc::c_void, TWO_MIB) };
    while sig.0.load(Ordering::Acquire) == before {
        std::hint::spin_loop();
    }
    t0.elapsed()
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    println!(
        "{name}: n={} median {:.1} us, p99 {:.1} us, min {:.1} us",
        v.len(),
        q(0.5),
        q(0.99),
        q(0.0)
    );
}

fn bench_unmap(c: &mut Criterion) {
    let caps = Capabilities::get();
    if !caps.uffd_available() {
        println!("uffd_events: skipped: {}", caps.degradations().join("; "));
        return;
    }
    let sig = Arc::new(Signal(AtomicU64::new(0)));
    let mon = EventMonitor::start(Arc::clone(&sig)).expect("monitor");
    for populate in [false, true] {
        let label = if populate { "populated" } else { "unpopulated" };
        let samples: Vec<Duration> = (0..2000).map(|_| one_unmap(&mon, &sig, populate)).collect();
        report(
            &format!("munmap 2 MiB watched ({label}) -> sink done"),
            samples,
        );
        let mut g = c.benchmark_group("uffd_events");
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        g.bench_function(format!("munmap_2MiB_{label}_until_invalidated"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| one_unmap(&mon, &sig, populate)).sum())
        });
        g.finish();
    }
    // Baselines: the same munmaps, unwatched.
    for populate in [false, true] {
        let base: Vec<Duration> = (0..2000)
            .map(|_| {
                let a = map(TWO_MIB);
                if populate {
                    for off in (0..TWO_MIB).step_by(PS) {
                        // SAFETY: inside the fresh mapping.
                        unsafe { ((a + off) as *mut u8).write_volatile(1) };
                    }
                }
                let t0 = Instant::now();
                // SAFETY: unmaps the mapping made just above.
                unsafe { libc::munmap(a as *mut libc::c_void, TWO_MIB) };
                t0.elapsed()
            })
            .collect();
        let label = if populate { "populated" } else { "unpopulated" };
        report(&format!("munmap 2 MiB unwatched ({label}, baseline)"), base);
    }
}

fn bench_collect(c: &mut Criterion) {
    let caps = Capabilities::get();
    if !caps.uffd_available() {
        return;
    }
    let sig = Arc::new(Signal(AtomicU64::new(0)));
    let mon = EventMonitor::start(Arc::clone(&sig)).expect("monitor");
    let a = map(GIB);
    let r = range(a, GIB);
    mon.watch(r).expect("watch");
    let t = mon.write_tracker();
    if let TrackMode::Degraded(why) = t.mode() {
        println!("write tracking degraded ({why}); collect is free and exact-less");
    }
    let t0 = Instant::now();
    t.arm(r).expect("arm");
    println!(
        "arm (UFFDIO_WRITEPROTECT) of 1 GiB: {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let t0 = Instant::now();
    let first = t.collect(r).expect("collect");
    println!(
        "first collect of 1 GiB after arm: {:.2} ms, {} runs",
        t0.elapsed().as_secs_f64() * 1e3,
        first.len()
    );
    let mut out = Vec::with_capacity(1024);
    let mut g = c.benchmark_group("uffd_events");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("collect_1GiB_no_writes", |b| {
        b.iter(|| {
            out.clear();
            t.collect_into(r, &mut out).expect("collect");
            black_box(out.len())
        })
    });
    let pages = GIB / PS;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut scatter = || {
        for _ in 0..1000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let p = (seed % pages as u64) as usize;
            // SAFETY: a page inside the watched 1 GiB mapping.
            unsafe { ((a + p * PS) as *mut u8).write_volatile(1) };
        }
    };
    let mut runs = 0;
    g.bench_function("collect_1GiB_after_1000_scattered_writes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                scatter();
                out.clear();
                let t0 = Instant::now();
                t.collect_into(r, &mut out).expect("collect");
                total += t0.elapsed();
                runs = out.len();
            }
            total
        })
    });
    g.finish();
    println!("last collect after 1000 scattered writes returned {runs} runs");
    // Plain-loop figures for the report.
    let mut none = Vec::new();
    let mut some = Vec::new();
    for _ in 0..50 {
        out.clear();
        let t0 = Instant::now();
        t.collect_into(r, &mut out).expect("collect");
        none.push(t0.elapsed());
        scatter();
        out.clear();
        let t0 = Instant::now();
        t.collect_into(r, &mut out).expect("collect");
        some.push(t0.elapsed());
    }
    report("collect 1 GiB, no writes", none);
    report("collect 1 GiB, after 1000 scattered writes", some);
    drop(mon);
    // SAFETY: unmaps the 1 GiB mapping made above; the monitor is gone.
    unsafe { libc::munmap(a as *mut libc::c_void, GIB) };
}

criterion_group!(benches, bench_unmap, bench_collect);
criterion_main!(benches);
