//! `range_fault` throughput in pages per second.
//!
//! One buffer of `HMM_BENCH_BYTES` (default 1 GiB) of private anonymous
//! memory, measured as:
//!
//! - `snapshot_populated`: no fault, every page present (one PAGEMAP_SCAN);
//! - `read_fault_populated` / `write_fault_populated`: fault requested on
//!   pages that already satisfy it (read: scan only; write: one
//!   `MADV_POPULATE_WRITE` walk plus a scan);
//! - `write_fault_unpopulated`: the buffer is emptied with `MADV_DONTNEED`
//!   before each iteration (not timed), then write-faulted;
//! - `madv_populate_write_*`: the bare `madvise` on the same buffer, the
//!   floor `range_fault` adds its bookkeeping to.

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm_core::cpu::range_fault::{FaultFlags, PageState, RangeFaulter};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};
use libc::MADV_POPULATE_WRITE;

struct Buf {
    p: *mut libc::c_void,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        Buf {
            p: common::map(len) as *mut libc::c_void,
            len,
        }
    }
    fn range(&self) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.p as u64), self.len as u64).expect("range")
    }
    fn advise(&self, advice: i32) {
        // SAFETY: advice on our own mapping; no Rust reference into it.
        let rc = unsafe { libc::madvise(self.p, self.len, advice) };
        assert_eq!(rc, 0, "madvise({advice})");
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.p, self.len) };
    }
}

fn bytes() -> usize {
    std::env::var("HMM_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|b| (b / PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize)
        .unwrap_or(1 << 30)
}

fn bench(c: &mut Criterion) {
    let len = bytes();
    let pages = (len / PAGE_SIZE as usize) as u64;
    let buf = Buf::new(len);
    let f = RangeFaulter::new().expect("RangeFaulter");
    let mut out: Vec<PageState> = Vec::new();

    let mut g = c.benchmark_group(format!("range_fault_{}MiB", len >> 20));
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(pages));

    buf.advise(MADV_POPULATE_WRITE);
    g.bench_function("snapshot_populated", |b| {
        b.iter(|| {
            f.range_fault_into(buf.range(), FaultFlags::SNAPSHOT, &mut out)
                .expect("snapshot")
        })
    });
    g.bench_function("read_fault_populated", |b| {
        b.iter(|| {
            f.range_fault_into(buf.range(), FaultFlags::READ, &mut out)
                .expect("read fault")
        })
    });
    g.bench_function("write_fault_populated", |b| {
        b.iter(|| {
            f.range_fault_into(buf.range(), FaultFlags::WRITE, &mut out)
                .expect("write fault")
        })
    });
    g.bench_function("madv_populate_write_populated", |b| {
        b.iter(|| buf.advise(MADV_POPULATE_WRITE))
    });
    g.bench_function("write_fault_unpopulated", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                buf.advise(libc::MADV_DONTNEED);
                let s = Instant::now();
                f.range_fault_into(buf.range(), FaultFlags::WRITE, &mut out)
                    .expect("write fault");
                t += s.elapsed();
            }
            t
        })
    });
    g.bench_function("madv_populate_write_unpopulated", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                buf.advise(libc::MADV_DONTNEED);
                let s = Instant::now();
                buf.advise(MADV_POPULATE_WRITE);
                t += s.elapsed();
            }
            t
        })
    });
    g.bench_function("snapshot_unpopulated", |b| {
        buf.advise(libc::MADV_DONTNEED);
        b.iter(|| {
            f.range_fault_into(buf.range(), FaultFlags::SNAPSHOT, &mut out)
                .expect("snapshot")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
