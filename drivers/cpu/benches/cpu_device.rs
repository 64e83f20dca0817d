//! `CpuDevice` micro-benchmarks: copy bandwidth (against a plain
//! `copy_from_slice` of the same size) and MMU-translated loads.

#![allow(missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm_core::mirror::backend::{
    Backend, DeviceConfig, DeviceToHost, HostToDevice, Invocations, PteWrite,
};
use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

const PAGES: usize = 1024;
const PAGE: usize = 4096;
const VA: u64 = 0x1000_0000;

/// Maps `pages` consecutive pages at `va` to slots 0.., allocating tables.
fn map_linear(dev: &CpuDevice, va: u64, pages: usize) {
    let mut next = 1u32;
    let mut dirs: HashMap<(u32, usize), u32> = HashMap::new();
    let mut writes = Vec::new();
    for p in 0..pages {
        let a = va + (p * PAGE) as u64;
        let mut table = 0u32;
        for level in (2..=4).rev() {
            let idx = level_index(a, level);
            table = *dirs.entry((table, idx)).or_insert_with(|| {
                let t = next;
                next += 1;
                writes.push(PteWrite {
                    table: TablePage(table),
                    index: idx as u16,
                    pte: Pte::table(TablePage(t)),
                });
                t
            });
        }
        writes.push(PteWrite {
            table: TablePage(table),
            index: level_index(a, 1) as u16,
            pte: Pte::leaf(PoolSlot(p as u32), true),
        });
    }
    dev.write_ptes(&writes).expect("write ptes");
}

fn device() -> CpuDevice {
    let dev = CpuDevice::new();
    dev.init(DeviceConfig {
        pool_slots: PAGES as u32,
        table_pages: 16,
    })
    .expect("init");
    dev
}

fn copies(c: &mut Criterion) {
    let dev = device();
    let src: Vec<u8> = (0..PAGES * PAGE).map(|i| i as u8).collect();
    let mut dst = vec![0u8; PAGES * PAGE];
    let to_dev: Vec<HostToDevice> = (0..PAGES)
        .map(|p| HostToDevice {
            slot: PoolSlot(p as u32),
            src: src[p * PAGE..].as_ptr(),
        })
        .collect();
    let mut g = c.benchmark_group("copy_1024_pages");
    g.throughput(Throughput::Bytes((PAGES * PAGE) as u64));
    g.bench_function("copy_to_device", |b| {
        // SAFETY: every `src` is 4096 readable bytes of `src`, alive for the
        // call; no device work is in flight.
        b.iter(|| unsafe { dev.copy_to_device(black_box(&to_dev)) }.expect("copy"))
    });
    let base = dst.as_mut_ptr();
    let to_host: Vec<DeviceToHost> = (0..PAGES)
        .map(|p| DeviceToHost {
            slot: PoolSlot(p as u32),
            dst: base.wrapping_add(p * PAGE),
        })
        .collect();
    g.bench_function("copy_to_host", |b| {
        // SAFETY: every `dst` is 4096 writable bytes of `dst`, disjoint,
        // not borrowed while the bench runs; no device work is in flight.
        b.iter(|| unsafe { dev.copy_to_host(black_box(&to_host)) }.expect("copy"))
    });
    g.bench_function("memcpy_reference", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.finish();
    black_box(&dst);
}

fn loads(c: &mut Criterion) {
    let dev = device();
    map_linear(&dev, VA, PAGES);
    // 1024 invocations × 1024 aligned u32 loads = 1M translated loads.
    let k = CpuKernel::new(|lane, i| {
        let page = lane.args()[0] + u64::from(i) * PAGE as u64;
        let mut sum = 0u32;
        for w in 0..1024u64 {
            sum = sum.wrapping_add(lane.load_u32(page + 4 * w)?);
        }
        black_box(sum);
        Ok(())
    });
    let mut g = c.benchmark_group("mmu");
    g.throughput(Throughput::Elements((PAGES * 1024) as u64));
    g.bench_function("1M_u32_loads", |b| {
        b.iter(|| {
            let id = dev
                .launch(&k, Invocations::All(PAGES as u32), &[VA])
                .expect("launch");
            dev.wait(id, None).expect("wait");
            let o = dev.take_outcome(id).expect("outcome");
            assert!(o.incomplete.is_empty());
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = copies, loads
}
criterion_main!(benches);
