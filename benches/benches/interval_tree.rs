//! Interval tree: `hmm_core`'s hand-written augmented AVL tree against
//! `iset::IntervalMap` and a naive `Vec` scan.
//!
//! Cases: (a) insert + remove one interval among 100k; (b) an overlap query
//! hitting 1 interval among 1, 1k and 100k; (c) a query hitting 100 among
//! 100k. Before the timings, the number of heap allocations per query is
//! printed for each implementation (counted by a wrapping global allocator).
//!
//! Data: disjoint intervals `[16 i, 16 i + 8)` inserted in a shuffled order.
//! Query positions vary per iteration (a fixed LCG) so one cached path does
//! not flatter any implementation. `iset` holds duplicates via
//! `force_insert` with the entry id as its value and removes one entry by
//! `remove_where` on that id.
//!
//! Run: `cargo bench -p hmm-bench --bench interval_tree`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion};
use hmm_core::notifier::interval_tree::IntervalTree;
use iset::IntervalMap;

/// Global allocator that counts allocations (for the allocation report).
struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counter has no effect
// on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's (non-zero size layout).
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr`/`layout` came from this allocator, i.e. `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const STRIDE: u64 = 16;
const LEN: u64 = 8;

/// Small fixed LCG (Knuth's MMIX constants); no `rand` dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Indices `0..n` in a shuffled order (Fisher–Yates).
fn shuffled(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut rng = Lcg(42);
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// The three implementations behind one interface for the benchmark.
trait Impl {
    const NAME: &'static str;
    fn build(n: u64) -> Self;
    /// Inserts then removes `[s, e)`.
    fn insert_remove(&mut self, s: u64, e: u64);
    /// Sum of values overlapping `[s, e)` (forces full iteration).
    fn query(&self, s: u64, e: u64) -> u64;
}

impl Impl for IntervalTree<u64> {
    const NAME: &'static str = "hand-written";
    fn build(n: u64) -> Self {
        let mut t = IntervalTree::new();
        for i in shuffled(n) {
            t.insert(i * STRIDE, i * STRIDE + LEN, i);
        }
        t
    }
    fn insert_remove(&mut self, s: u64, e: u64) {
        let id = self.insert(s, e, 0);
        black_box(self.remove(id));
    }
    fn query(&self, s: u64, e: u64) -> u64 {
        self.overlapping(s, e).map(|(_, _, _, v)| *v).sum()
    }
}

/// `iset` with duplicates allowed: value = (entry id, payload).
struct Iset {
    map: IntervalMap<u64, (u64, u64)>,
    next_id: u64,
}

impl Impl for Iset {
    const NAME: &'static str = "iset";
    fn build(n: u64) -> Self {
        let mut map = IntervalMap::new();
        for i in shuffled(n) {
            map.force_insert(i * STRIDE..i * STRIDE + LEN, (i, i));
        }
        Iset { map, next_id: n }
    }
    fn insert_remove(&mut self, s: u64, e: u64) {
        let id = self.next_id;
        self.next_id += 1;
        self.map.force_insert(s..e, (id, 0));
        black_box(self.map.remove_where(s..e, |v| v.0 == id));
    }
    fn query(&self, s: u64, e: u64) -> u64 {
        self.map.values(s..e).map(|v| v.1).sum()
    }
}

/// Naive: unsorted `Vec`, linear scans, removal by id via scan.
struct Naive {
    items: Vec<(u64, u64, u64, u64)>,
    next_id: u64,
}

impl Impl for Naive {
    const NAME: &'static str = "naive-vec";
    fn build(n: u64) -> Self {
        let items = shuffled(n)
            .into_iter()
            .map(|i| (i, i * STRIDE, i * STRIDE + LEN, i))
            .collect();
        Naive { items, next_id: n }
    }
    fn insert_remove(&mut self, s: u64, e: u64) {
        let id = self.next_id;
        self.next_id += 1;
        self.items.push((id, s, e, 0));
        let pos = self.items.iter().position(|x| x.0 == id).expect("present");
        black_box(self.items.swap_remove(pos));
    }
    fn query(&self, s: u64, e: u64) -> u64 {
        // Unsorted scan; the sum is order-independent, so no sort is needed
        // here (a real caller wanting (start, id) order would also sort).
        self.items
            .iter()
            .filter(|x| x.1 < e && s < x.2)
            .map(|x| x.3)
            .sum()
    }
}

/// A query hitting exactly `hits` intervals, starting at interval `k`.
fn query_range(k: u64, hits: u64) -> (u64, u64) {
    (k * STRIDE + 1, (k + hits - 1) * STRIDE + 2)
}

fn bench_impl<T: Impl>(c: &mut Criterion) {
    let mut g = c.benchmark_group("interval_tree");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);

    // (a) insert + remove one among 100k.
    let n = 100_000;
    let mut t = T::build(n);
    let mut rng = Lcg(7);
    g.bench_function(
        BenchmarkId::new(format!("{}/insert_remove", T::NAME), n),
        |b| {
            b.iter(|| {
                let k = rng.next() % n;
                // Overlaps two existing intervals and duplicates neither.
                t.insert_remove(black_box(k * STRIDE + 4), black_box(k * STRIDE + 20));
            })
        },
    );

    // (b) query hitting 1 among 1, 1k, 100k.
    for n in [1u64, 1_000, 100_000] {
        let t = T::build(n);
        let mut rng = Lcg(9);
        g.bench_function(
            BenchmarkId::new(format!("{}/query_hit1", T::NAME), n),
            |b| {
                b.iter(|| {
                    let (s, e) = query_range(rng.next() % n, 1);
                    black_box(t.query(black_box(s), black_box(e)))
                })
            },
        );
    }

    // (c) query hitting 100 among 100k.
    let n = 100_000;
    let t = T::build(n);
    let mut rng = Lcg(11);
    g.bench_function(
        BenchmarkId::new(format!("{}/query_hit100", T::NAME), n),
        |b| {
            b.iter(|| {
                let (s, e) = query_range(rng.next() % (n - 100), 100);
                black_box(t.query(black_box(s), black_box(e)))
            })
        },
    );
    g.finish();
}

/// Runs `f` once; returns its result and the heap allocations it made.
fn count_allocs<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCS.load(Ordering::Relaxed);
    let r = black_box(f());
    (r, ALLOCS.load(Ordering::Relaxed) - before)
}

/// Checks every implementation returns the same sums, and prints the heap
/// allocations one query costs each of them.
fn report_allocations() {
    let n = 1_000;
    let ours = IntervalTree::<u64>::build(n);
    let iset = Iset::build(n);
    let naive = Naive::build(n);
    for hits in [1, 100] {
        let (s, e) = query_range(500, hits);
        let expected: u64 = (500..500 + hits).sum();
        let mut line = format!("allocations per query hitting {hits:>3}:");
        for (name, (sum, allocs)) in [
            (IntervalTree::<u64>::NAME, count_allocs(|| ours.query(s, e))),
            (Iset::NAME, count_allocs(|| iset.query(s, e))),
            (Naive::NAME, count_allocs(|| naive.query(s, e))),
        ] {
            assert_eq!(sum, expected, "{name} returned a wrong result");
            line += &format!("  {name} {allocs}");
        }
        println!("{line}");
    }
    let (hit_a, a) = count_allocs(|| ours.any_overlap(8001, 8002));
    let (hit_b, b) = count_allocs(|| iset.map.has_overlap(8001..8002));
    assert!(hit_a && hit_b);
    println!("allocations per any_overlap / has_overlap:  hand-written {a}  iset {b}");
}

fn all(c: &mut Criterion) {
    bench_impl::<IntervalTree<u64>>(c);
    bench_impl::<Iset>(c);
    bench_impl::<Naive>(c);
}

criterion_group!(benches, all);

fn main() {
    report_allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
