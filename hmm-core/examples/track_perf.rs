//! Printed measurements for issue 15 (not a benchmark harness, no asserts
//! on time): `cargo run -p hmm-core --release --example track_perf [reps]`.
//!
//! - populate: µs per page to populate 256 scattered resident pages of a
//!   256 MiB mapping, batched (`process_madvise`) and per range (`madvise`
//!   each), for read and for write.
//!
//! Each figure is the median over `reps` repetitions with [min - max]; the
//! two methods alternate within each repetition.

use std::time::Instant;

use hmm_core::cpu::range_fault::RangeFaulter;
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

const PS: usize = PAGE_SIZE as usize;

/// An anonymous private mapping of `len` bytes, unmapped on drop.
struct Anon {
    p: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize, populate: bool) -> Anon {
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: advice on our own mapping: 4 KiB pages only.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        let a = Anon { p: p.cast(), len };
        if populate {
            for i in (0..len).step_by(PS) {
                // SAFETY: inside our own read-write mapping.
                unsafe { a.p.add(i).write_volatile(1) };
            }
        }
        a
    }
    fn page(&self, i: usize) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.p as u64 + (i * PS) as u64), PAGE_SIZE).unwrap()
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.p.cast(), self.len) };
    }
}

/// A small xorshift generator (no dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// `n` distinct sorted indices below `max`.
    fn pages(&mut self, n: usize, max: usize) -> Vec<usize> {
        let mut v = std::collections::BTreeSet::new();
        while v.len() < n {
            v.insert((self.next() % max as u64) as usize);
        }
        v.into_iter().collect()
    }
}

fn row(name: &str, v: &mut [f64], unit: &str) {
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<64} {:>8.3} {unit}  [{:.3} - {:.3}]",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    );
}

fn populate(reps: usize, rng: &mut Rng) {
    const N: usize = 256;
    let len = 256 << 20;
    let m = Anon::new(len, true);
    let batched = RangeFaulter::new().unwrap();
    let per_range = RangeFaulter::new().unwrap();
    per_range.force_per_range_populate();
    println!(
        "## populate {N} scattered resident pages of 256 MiB (µs/page); batch available: {}",
        batched.batch_populate()
    );
    let mut t = [vec![], vec![], vec![], vec![]];
    for _ in 0..reps {
        for (k, (f, write)) in [
            (&batched, false),
            (&per_range, false),
            (&batched, true),
            (&per_range, true),
        ]
        .into_iter()
        .enumerate()
        {
            let runs: Vec<VaRange> = rng
                .pages(N, len / PS)
                .into_iter()
                .map(|i| m.page(i))
                .collect();
            let t0 = Instant::now();
            f.populate_runs(&runs, write).unwrap();
            t[k].push(t0.elapsed().as_secs_f64() * 1e6 / N as f64);
        }
    }
    row(
        "read,  process_madvise batch (one call)",
        &mut t[0],
        "µs/page",
    );
    row("read,  madvise per page", &mut t[1], "µs/page");
    row(
        "write, process_madvise batch (one call)",
        &mut t[2],
        "µs/page",
    );
    row("write, madvise per page", &mut t[3], "µs/page");
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    populate(reps, &mut rng);
}
