//! Notifier micro-benchmarks (issue: "read_begin + read_retry ≤ 10 ns",
//! "insert + remove among 100k", "invalidate hitting 1 / 100 among 1, 1k,
//! 100k; 100k/1-hit ≤ 1 µs, growing as log n").

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hmm_core::notifier::{
    AddressSpace, EventKind, Interval, IntervalNotifier, NotifierRange, Seq, Subscription,
};
use hmm_core::{VaRange, VirtAddr};

/// The minimum a real driver callback does: record the sequence.
struct Minimal;
impl IntervalNotifier for Minimal {
    fn invalidate(&self, i: &Interval, _r: &NotifierRange, s: Seq) -> bool {
        i.set_seq(s);
        true
    }
}

const PAGE: u64 = 0x1000;

fn page_range(i: u64, pages: u64) -> VaRange {
    VaRange::from_start_len(VirtAddr(0x1000_0000 + i * PAGE), pages * PAGE).unwrap()
}

/// `n` one-page subscriptions on consecutive pages.
fn populated(n: u64) -> (AddressSpace, Vec<Subscription<Minimal>>) {
    let space = AddressSpace::new();
    let subs = (0..n)
        .map(|i| space.insert(page_range(i, 1), Minimal).unwrap())
        .collect();
    (space, subs)
}

fn read_side(c: &mut Criterion) {
    let (space, subs) = populated(1);
    let itv = subs[0].interval();
    c.bench_function("read_begin+read_retry (uncontended)", |b| {
        b.iter(|| {
            let s = itv.read_begin();
            black_box(itv.read_retry(black_box(s)))
        })
    });
    drop(subs);
    drop(space);
}

fn insert_remove(c: &mut Criterion) {
    let (space, subs) = populated(100_000);
    c.bench_function("insert+remove among 100k", |b| {
        b.iter(|| {
            let s = space.insert(page_range(50_000, 1), Minimal).unwrap();
            s.remove().unwrap();
        })
    });
    drop(subs);
}

fn invalidate(c: &mut Criterion) {
    let mut g = c.benchmark_group("invalidate");
    for &n in &[1u64, 1_000, 100_000] {
        let (space, subs) = populated(n);
        let mid = n / 2;
        g.bench_with_input(BenchmarkId::new("1 hit", n), &n, |b, _| {
            let r = page_range(mid, 1);
            b.iter(|| space.invalidate(black_box(r), EventKind::Clear))
        });
        if n >= 100 {
            g.bench_with_input(BenchmarkId::new("100 hits", n), &n, |b, _| {
                let r = page_range(mid - 50, 100);
                b.iter(|| space.invalidate(black_box(r), EventKind::Clear))
            });
        }
        g.bench_with_input(BenchmarkId::new("0 hits", n), &n, |b, _| {
            let r = page_range(n + 10, 1);
            b.iter(|| space.invalidate(black_box(r), EventKind::Clear))
        });
        drop(subs);
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = read_side, insert_remove, invalidate }
criterion_main!(benches);
