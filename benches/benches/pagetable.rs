//! The device-mirror data structures: the host's shadow page table and the
//! page pool.
//!
//! Cases: map 262144 consecutive pages (1 GiB) into an empty table; zap
//! them with one `unmap_range`; map three pages spread over the 47-bit
//! space and zap the whole space (both timed together);
//! look up random pages of the mapped 1 GiB; alloc + free of one
//! slot in an almost full 262144-slot pool; `pick_victim` on a full
//! 262144-slot pool where half the pages are young (pseudo-random), and
//! where every page is young (the two-sweep worst case).
//!
//! Run: `cargo bench -p hmm-bench --bench pagetable`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hmm_core::internal::pagetable::ShadowTable;
use hmm_core::internal::pool::PagePool;
use hmm_core::mirror::format::{PoolSlot, Pte};
use hmm_core::{VaRange, VirtAddr};

/// Pages in 1 GiB.
const PAGES: u64 = 262_144;
/// Where the mapped gigabyte starts (not 1 GiB aligned, so it spans two
/// level-3 entries as a real heap range would).
const BASE: u64 = 0x7f12_3450_0000;

/// Small deterministic generator for query positions.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn mapped_gib() -> ShadowTable {
    let mut t = ShadowTable::new(1024).expect("budget");
    let mut w = Vec::new();
    for i in 0..PAGES {
        t.map(
            VirtAddr(BASE + i * 4096),
            Pte::leaf(PoolSlot(i as u32), true),
            &mut w,
        )
        .expect("map");
        w.clear();
    }
    t
}

fn bench_table(c: &mut Criterion) {
    let mut g = c.benchmark_group("pagetable");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let gib = VaRange::from_start_len(VirtAddr(BASE), PAGES * 4096).expect("range");

    g.throughput(Throughput::Elements(PAGES));
    g.bench_function("map_1GiB", |b| {
        b.iter_batched(
            || {
                (
                    ShadowTable::new(1024).expect("budget"),
                    Vec::with_capacity(PAGES as usize + 1024),
                )
            },
            |(mut t, mut w)| {
                for i in 0..PAGES {
                    t.map(
                        VirtAddr(BASE + i * 4096),
                        Pte::leaf(PoolSlot(i as u32), true),
                        &mut w,
                    )
                    .expect("map");
                }
                (t, w)
            },
            BatchSize::LargeInput,
        )
    });

    let full = mapped_gib();
    g.bench_function("unmap_range_1GiB", |b| {
        b.iter_batched(
            || {
                (
                    full.clone(),
                    Vec::with_capacity(PAGES as usize + 1024),
                    Vec::with_capacity(PAGES as usize),
                )
            },
            |(mut t, mut w, mut r)| {
                t.unmap_range(gib, &mut w, &mut r);
                (t, w, r)
            },
            BatchSize::LargeInput,
        )
    });

    g.throughput(Throughput::Elements(1));
    let mut sparse = ShadowTable::new(64).expect("budget");
    let mut w = Vec::new();
    let user = VaRange::from_start_len(VirtAddr(0), 1 << 47).expect("range");
    g.bench_function("map_3_then_unmap_range_47bit", |b| {
        let mut removed = Vec::new();
        b.iter(|| {
            for (i, va) in [0x1000u64, 0x5555_0000_0000, 0x7fff_ffff_f000]
                .into_iter()
                .enumerate()
            {
                sparse
                    .map(VirtAddr(va), Pte::leaf(PoolSlot(i as u32), true), &mut w)
                    .expect("map");
            }
            w.clear();
            removed.clear();
            sparse.unmap_range(user, &mut w, &mut removed);
            black_box(removed.len())
        })
    });

    let mut rng = Lcg(11);
    g.bench_function("lookup_random_in_1GiB", |b| {
        b.iter(|| {
            let va = BASE + (rng.next() % PAGES) * 4096;
            black_box(full.lookup(VirtAddr(black_box(va))))
        })
    });
    g.finish();
}

fn bench_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let n = PAGES as u32;

    let mut p = PagePool::new(n);
    for i in 0..n - 1 {
        p.alloc(VirtAddr(u64::from(i) << 12)).expect("alloc");
    }
    g.bench_function("alloc_free_262144", |b| {
        b.iter(|| {
            let s = p.alloc(VirtAddr(black_box(0x1000))).expect("room");
            black_box(p.free(s))
        })
    });

    let mut p = PagePool::new(n);
    for i in 0..n {
        p.alloc(VirtAddr(u64::from(i) << 12)).expect("alloc");
    }
    let mut rng = Lcg(5);
    g.bench_function("pick_victim_full_262144_half_young", |b| {
        b.iter(|| p.pick_victim(|_, _| rng.next() & 1 == 1, |_, _| false))
    });
    g.throughput(Throughput::Elements(2 * PAGES));
    g.bench_function("pick_victim_full_262144_all_young", |b| {
        b.iter(|| p.pick_victim(|_, _| true, |_, _| false))
    });
    g.finish();
}

criterion_group!(benches, bench_table, bench_pool);
criterion_main!(benches);
