//! Kernel event → every invalidate callback returned, through the whole
//! host stack (`HostSpace` → userfaultfd monitor → sink → `AddressSpace`
//! walk → subscriptions), and the cost of a sync point.
//!
//! (a) `munmap` of a mirrored 2 MiB range. Each iteration maps a fresh
//!     2 MiB range (populated or not), inserts 1 subscription over all of
//!     it or 100 overlapping 20 KiB pieces, watches it, then times from
//!     just before `munmap` until the last callback has bumped an atomic
//!     counter the unmapping thread spins on. Issue target: median
//!     ≤ 20 µs (anchor: a userfaultfd write-protect round trip is ~5 µs).
//!     A plain loop of 2000 iterations per variant prints median and p99;
//!     criterion's `iter_custom` figures follow. Baselines in the same run:
//!     `munmap` of an unwatched range, and of a watched range with no
//!     subscription (timed until the monitor has counted the event).
//! (b) `HostSpace::sync_point` over 1 GiB watched with one subscription
//!     over all of it: no writes, and after 1000 scattered CPU writes (only
//!     the sync point is timed; it includes the `CpuWrite` callbacks).
//!
//! Without userfaultfd the benchmark prints why and measures nothing.

mod common;

use common::map;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hmm_core::cpu::host::{EventSource, HostSpace};
use hmm_core::notifier::{EventKind, Interval, IntervalNotifier, NotifierRange, Seq, Subscription};
use hmm_core::{VaRange, VirtAddr};

const PS: usize = 4096;
const TWO_MIB: usize = 2 << 20;
const GIB: usize = 1 << 30;
const SAMPLES: usize = 2000;

/// A callback that does the protocol's minimum and signals `Unmap`s.
struct Count(Arc<AtomicU64>);

impl IntervalNotifier for Count {
    fn invalidate(&self, interval: &Interval, range: &NotifierRange, cur_seq: Seq) -> bool {
        interval.set_seq(cur_seq);
        if range.event == EventKind::Unmap {
            // Release: the spinning unmapper's Acquire load then sees the
            // whole callback done.
            self.0.fetch_add(1, Ordering::Release);
        }
        true
    }
}

fn populate(a: usize, len: usize) {
    for off in (0..len).step_by(PS) {
        // SAFETY: inside a fresh read-write mapping of `len` bytes.
        unsafe { ((a + off) as *mut u8).write_volatile(1) };
    }
}

fn unmap(a: usize, len: usize) {
    // SAFETY: unmaps a mapping this file made; nothing references it.
    unsafe { libc::munmap(a as *mut libc::c_void, len) };
}

fn range(addr: usize, len: usize) -> VaRange {
    VaRange::user_pages(VirtAddr(addr as u64), len as u64).expect("page-aligned mapping")
}

/// The subscriptions of one iteration: one over the whole range, or 100
/// consecutive 20 KiB pieces (500 of its 512 pages).
fn subscribe(
    host: &HostSpace,
    a: usize,
    subs: usize,
    hits: &Arc<AtomicU64>,
) -> Vec<Subscription<Count>> {
    if subs == 1 {
        let s = host
            .space()
            .insert(range(a, TWO_MIB), Count(Arc::clone(hits)));
        return vec![s.expect("insert")];
    }
    (0..subs)
        .map(|i| {
            let r = range(a + i * 5 * PS, 5 * PS);
            host.space()
                .insert(r, Count(Arc::clone(hits)))
                .expect("insert")
        })
        .collect()
}

/// One mirrored munmap: the time from just before `munmap` until every
/// subscription's callback has returned.
fn one_unmap(host: &HostSpace, subs: usize, populated: bool, hits: &Arc<AtomicU64>) -> Duration {
    let a = map(TWO_MIB);
    if populated {
        populate(a, TWO_MIB);
    }
    let held = subscribe(host, a, subs, hits);
    host.watch(range(a, TWO_MIB)).expect("watch");
    let want = hits.load(Ordering::Acquire) + subs as u64;
    let t0 = Instant::now();
    unmap(a, TWO_MIB);
    while hits.load(Ordering::Acquire) < want {
        std::hint::spin_loop();
    }
    let t = t0.elapsed();
    drop(held);
    t
}

/// A watched munmap with no subscription, until the monitor counted it.
fn one_unmap_no_subs(host: &HostSpace, populated: bool) -> Duration {
    let a = map(TWO_MIB);
    if populated {
        populate(a, TWO_MIB);
    }
    host.watch(range(a, TWO_MIB)).expect("watch");
    let want = host.event_counts().unmap + 1;
    let t0 = Instant::now();
    unmap(a, TWO_MIB);
    while host.event_counts().unmap < want {
        std::hint::spin_loop();
    }
    t0.elapsed()
}

/// An unwatched munmap (kernel cost only).
fn one_unmap_unwatched(populated: bool) -> Duration {
    let a = map(TWO_MIB);
    if populated {
        populate(a, TWO_MIB);
    }
    let t0 = Instant::now();
    unmap(a, TWO_MIB);
    t0.elapsed()
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    println!(
        "{name}: n={} median {:.1} us, p99 {:.1} us, min {:.1} us, max {:.1} us",
        v.len(),
        q(0.5),
        q(0.99),
        q(0.0),
        q(1.0)
    );
}

fn host_or_skip() -> Option<HostSpace> {
    let host = HostSpace::new().expect("HostSpace::new");
    match host.event_source() {
        EventSource::Userfaultfd => Some(host),
        EventSource::ExplicitOnly(why) => {
            println!("host_events: skipped: {why}");
            None
        }
    }
}

fn label(populated: bool) -> &'static str {
    if populated {
        "populated"
    } else {
        "unpopulated"
    }
}

fn bench_unmap(c: &mut Criterion) {
    let Some(host) = host_or_skip() else {
        return;
    };
    let hits = Arc::new(AtomicU64::new(0));
    // Warm up page tables, the allocator and the monitor thread.
    for _ in 0..200 {
        one_unmap(&host, 100, true, &hits);
    }
    for populated in [false, true] {
        let l = label(populated);
        for subs in [1, 100] {
            let v = (0..SAMPLES)
                .map(|_| one_unmap(&host, subs, populated, &hits))
                .collect();
            report(
                &format!("munmap 2 MiB mirrored, {subs} subs ({l}) -> all callbacks returned"),
                v,
            );
        }
        let v = (0..SAMPLES)
            .map(|_| one_unmap_no_subs(&host, populated))
            .collect();
        report(
            &format!("munmap 2 MiB watched, 0 subs ({l}) -> monitor counted it"),
            v,
        );
        let v = (0..SAMPLES)
            .map(|_| one_unmap_unwatched(populated))
            .collect();
        report(&format!("munmap 2 MiB unwatched ({l}, baseline)"), v);
    }
    let mut g = c.benchmark_group("host_events");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for populated in [false, true] {
        for subs in [1, 100] {
            g.bench_function(
                format!(
                    "munmap_2MiB_{}_{subs}subs_until_callbacks",
                    label(populated)
                ),
                |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| one_unmap(&host, subs, populated, &hits))
                            .sum()
                    })
                },
            );
        }
    }
    g.finish();
}

fn bench_sync_point(c: &mut Criterion) {
    let Some(host) = host_or_skip() else {
        return;
    };
    for populated in [false, true] {
        let l = label(populated);
        let a = map(GIB);
        if populated {
            populate(a, GIB);
        }
        let r = range(a, GIB);
        let sub = host
            .space()
            .insert(r, Count(Arc::new(AtomicU64::new(0))))
            .expect("insert");
        let t0 = Instant::now();
        host.watch(r).expect("watch");
        println!(
            "watch (register + arm) 1 GiB {l}: {:.2} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
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
        let first = host.sync_point().expect("sync");
        assert_eq!(first, 0, "nothing written since watch");
        let mut none = Vec::new();
        let mut some = Vec::new();
        let mut written = 0;
        for _ in 0..50 {
            let t0 = Instant::now();
            black_box(host.sync_point().expect("sync"));
            none.push(t0.elapsed());
            scatter();
            let t0 = Instant::now();
            written = host.sync_point().expect("sync");
            some.push(t0.elapsed());
        }
        report(&format!("sync_point 1 GiB watched ({l}), no writes"), none);
        report(
            &format!(
                "sync_point 1 GiB watched ({l}), after 1000 scattered writes ({written} pages)"
            ),
            some,
        );
        let mut g = c.benchmark_group("host_events");
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        g.bench_function(format!("sync_point_1GiB_{l}_no_writes"), |b| {
            b.iter(|| black_box(host.sync_point().expect("sync")))
        });
        g.bench_function(format!("sync_point_1GiB_{l}_1000_scattered_writes"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    scatter();
                    let t0 = Instant::now();
                    black_box(host.sync_point().expect("sync"));
                    total += t0.elapsed();
                }
                total
            })
        });
        g.finish();
        drop(sub);
        host.unwatch(r).expect("unwatch");
        unmap(a, GIB);
    }
}

criterion_group!(benches, bench_unmap, bench_sync_point);
criterion_main!(benches);
