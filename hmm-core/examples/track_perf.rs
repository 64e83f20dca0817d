//! Printed measurements for issue 15 (not a benchmark harness, no asserts
//! on time): `cargo run -p hmm-core --release --example track_perf [reps]`.
//!
//! - populate: µs per page to populate 256 scattered resident pages of a
//!   256 MiB mapping, batched (`process_madvise`) and per range (`madvise`
//!   each), for read and for write.
//!
//! - snapshot: ms per GiB for a `PAGEMAP_SCAN` of 256 MiB populated, with
//!   and without `PAGE_IS_FILE` in the return mask (`range_fault` now asks
//!   for it only in private file mappings).
//! - arm: µs per 2 MiB to write-protect 256 MiB of populated memory
//!   (first arm after a disarm, and re-arm of the armed range) and of
//!   never-touched memory, with `PAGEMAP_SCAN` and with
//!   `UFFDIO_WRITEPROTECT`.
//! - watch: µs per populated 2 MiB region to start tracking it, armed
//!   whole (`HostSpace::watch`), against watching it for events only and
//!   arming 1 or 5 scattered pages one by one (0.2 % or 1 % of the
//!   region, what a sparse device read copies): the cost of issue 15's
//!   per-run "hybrid" arming, which `write_track`'s docs decline.
//!
//! Each figure is the median over `reps` repetitions with [min - max]; the
//! two methods alternate within each repetition.

use std::sync::Arc;
use std::time::Instant;

use hmm_core::cpu::host::HostSpace;
use hmm_core::cpu::monitor::{EventMonitor, InvalidationSink};
use hmm_core::cpu::pagemap::{
    Pagemap, ScanArgs, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED,
};
use hmm_core::cpu::range_fault::RangeFaulter;
use hmm_core::cpu::write_track::{ArmMethod, TrackMode};
use hmm_core::notifier::EventKind;
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

fn snapshot(reps: usize) {
    const LEN: usize = 256 << 20;
    let m = Anon::new(LEN, true);
    let r = VaRange::from_start_len(VirtAddr(m.p as u64), LEN as u64).unwrap();
    let pm = Pagemap::open().unwrap();
    let base = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO;
    println!("## PAGEMAP_SCAN of 256 MiB populated (ms per GiB)");
    let mut t = [vec![], vec![]];
    for _ in 0..reps {
        for (k, mask) in [base, base | PAGE_IS_FILE].into_iter().enumerate() {
            let t0 = Instant::now();
            let n = pm.pagemap_scan(r, &ScanArgs::report(mask)).unwrap().len();
            t[k].push(t0.elapsed().as_secs_f64() * 1e3 * 4.0);
            assert!(n >= 1);
        }
    }
    row("return PRESENT|SWAPPED|PFNZERO", &mut t[0], "ms/GiB");
    row("  same + PAGE_IS_FILE", &mut t[1], "ms/GiB");
}

struct NoSink;
impl InvalidationSink for NoSink {
    fn invalidate(&self, _: VaRange, _: EventKind) {}
    fn remapped(&self, _: VirtAddr, _: VirtAddr, _: u64) {}
}

fn arm(reps: usize) {
    const LEN: usize = 256 << 20;
    let blocks = (LEN >> 21) as f64;
    let mon = match EventMonitor::start(Arc::new(NoSink)) {
        Ok(m) => m,
        Err(e) => {
            println!("## arm: no event monitor ({e}), skipped");
            return;
        }
    };
    let t = mon.write_tracker();
    if let TrackMode::Degraded(why) = t.mode() {
        println!("## arm: tracking degraded ({why}), skipped");
        return;
    }
    let m = Anon::new(LEN, true);
    let all = VaRange::from_start_len(VirtAddr(m.p as u64), LEN as u64).unwrap();
    mon.watch(all).unwrap();
    println!("## arm 256 MiB, 4 KiB pages (µs per 2 MiB)");
    let methods = [ArmMethod::Scan, ArmMethod::Ioctl];
    let mut t_first = [vec![], vec![]];
    let mut t_again = [vec![], vec![]];
    let mut t_fresh = [vec![], vec![]];
    for _ in 0..reps {
        for (k, method) in methods.into_iter().enumerate() {
            t.set_arm_method(method);
            t.disarm(all).unwrap();
            let t0 = Instant::now();
            t.arm(all).unwrap();
            t_first[k].push(t0.elapsed().as_secs_f64() * 1e6 / blocks);
            let t0 = Instant::now();
            t.arm(all).unwrap();
            t_again[k].push(t0.elapsed().as_secs_f64() * 1e6 / blocks);
            let fresh = Anon::new(LEN, false);
            let r = VaRange::from_start_len(VirtAddr(fresh.p as u64), LEN as u64).unwrap();
            mon.watch(r).unwrap();
            let t0 = Instant::now();
            t.arm(r).unwrap();
            t_fresh[k].push(t0.elapsed().as_secs_f64() * 1e6 / blocks);
            mon.unwatch(r).unwrap();
        }
    }
    for (k, name) in ["PAGEMAP_SCAN", "UFFDIO_WRITEPROTECT"].iter().enumerate() {
        row(
            &format!("populated, first arm, {name}"),
            &mut t_first[k],
            "µs/2MiB",
        );
        row(
            &format!("populated, re-arm of armed, {name}"),
            &mut t_again[k],
            "µs/2MiB",
        );
        row(
            &format!("never touched, arm, {name}"),
            &mut t_fresh[k],
            "µs/2MiB",
        );
    }
    mon.unwatch(all).unwrap();
}

fn watch(reps: usize, rng: &mut Rng) {
    const LEN: usize = 256 << 20;
    const REGION: usize = 2 << 20;
    let regions = LEN / REGION;
    let host = HostSpace::new().unwrap();
    let Some(tracker) = host
        .write_tracker()
        .filter(|t| t.mode() == &TrackMode::Precise)
    else {
        println!("## watch: tracking not precise here, skipped");
        return;
    };
    let m = Anon::new(LEN, true);
    let region = |i: usize| {
        VaRange::from_start_len(VirtAddr((m.p as usize + i * REGION) as u64), REGION as u64)
            .unwrap()
    };
    println!("## watch {regions} populated regions of 2 MiB (µs per region)");
    for density in [1, 5] {
        let mut t = [vec![], vec![]];
        for _ in 0..reps {
            let t0 = Instant::now();
            for i in 0..regions {
                host.watch(region(i)).unwrap();
            }
            t[0].push(t0.elapsed().as_secs_f64() * 1e6 / regions as f64);
            for i in 0..regions {
                host.unwatch(region(i)).unwrap();
            }
            let picks: Vec<Vec<VirtAddr>> = (0..regions)
                .map(|i| {
                    rng.pages(density, REGION / PS)
                        .into_iter()
                        .map(|p| VirtAddr(region(i).start().get() + (p * PS) as u64))
                        .collect()
                })
                .collect();
            let t0 = Instant::now();
            for (i, pages) in picks.iter().enumerate() {
                host.watch_untracked(region(i)).unwrap();
                for p in pages {
                    tracker
                        .arm(VaRange::from_start_len(*p, PS as u64).unwrap())
                        .unwrap();
                }
            }
            t[1].push(t0.elapsed().as_secs_f64() * 1e6 / regions as f64);
            for i in 0..regions {
                host.unwatch_untracked(region(i)).unwrap();
            }
        }
        row("watch, armed whole", &mut t[0], "µs/region");
        row(
            &format!("watch for events + arm {density} scattered pages"),
            &mut t[1],
            "µs/region",
        );
    }
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    populate(reps, &mut rng);
    snapshot(reps);
    arm(reps);
    watch(reps, &mut rng);
}
