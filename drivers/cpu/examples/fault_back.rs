//! What a CPU read of device-private memory costs, fault by fault.
//!
//! Migrates a buffer to the cpu driver's device (`Mirror::migrate_to_device`),
//! then reads one word from 1 % of its pages, spread at random, and times
//! each read. Every read that faults is served by the fault-back path
//! (`hmm_core::cpu::migration`): the event monitor's reader answers it
//! the moment it reads it (the cpu driver's copies are host code), or the
//! handler or the server gives the page and its neighbourhood back with
//! `UFFDIO_COPY`; the reading thread then resumes. Prints how many faults
//! the reader answered, the median and the 90th percentile per faulting
//! read, and the mirror's own service time per fault-back.
//!
//! ```text
//! cargo run --release -p hmm-driver-cpu --example fault_back -- [MiB] [runs]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm_core::cpu::host::{EventSource, HostSpace};
use hmm_core::mirror::{Mirror, MirrorConfig};
use hmm_core::{VaRange, VirtAddr};
use hmm_driver_cpu::CpuDevice;

const PAGE: usize = 4096;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let host = match HostSpace::new() {
        Ok(h) => Arc::new(h),
        Err(e) => {
            println!("skipped: no host space ({e})");
            return;
        }
    };
    if !matches!(host.event_source(), EventSource::Userfaultfd) {
        println!("skipped: no userfaultfd events ({:?})", host.event_source());
        return;
    }
    let pages = mib * 256;
    let len = pages * PAGE;
    let cfg = MirrorConfig {
        pool_slots: pages as u32 + 64,
        ..MirrorConfig::default()
    };
    let m = match Mirror::new(Arc::clone(&host), CpuDevice::with_threads(1), cfg) {
        Ok(m) => m,
        Err(e) => {
            println!("skipped: no mirror ({e})");
            return;
        }
    };
    // SAFETY: a fresh private anonymous mapping; unmapped at the end.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "mmap failed");
    let words = base.cast::<u64>();
    let range = VaRange::from_start_len(VirtAddr(base as u64), len as u64).expect("range");
    // A fixed pseudo-random choice of 1 % of the pages.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut pick: Vec<usize> = Vec::new();
    let mut seen = vec![false; pages];
    while pick.len() < (pages / 100).max(1) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % pages as u64) as usize;
        if !seen[p] {
            seen[p] = true;
            pick.push(p);
        }
    }
    println!("{mib} MiB migrated, {} pages read per run", pick.len());
    for run in 0..runs {
        for p in 0..pages {
            // SAFETY: word 0 of page `p` of our own mapping.
            unsafe {
                words
                    .add(p * PAGE / 8)
                    .write_volatile(p as u64 ^ run as u64)
            };
        }
        m.migrate_to_device(range).expect("migrate");
        let before = m.stats();
        let mut per: Vec<Duration> = Vec::with_capacity(pick.len());
        let t = Instant::now();
        for &p in &pick {
            let t0 = Instant::now();
            // SAFETY: as above.
            let v = unsafe { words.add(p * PAGE / 8).read_volatile() };
            per.push(t0.elapsed());
            assert_eq!(v, p as u64 ^ run as u64, "page {p} read back wrong");
        }
        let total = t.elapsed();
        let s = m.stats();
        let fb = s.fault_backs - before.fault_backs;
        let svc = s.fault_back_time.saturating_sub(before.fault_back_time);
        per.sort();
        let slow: Vec<Duration> = per.iter().copied().filter(|d| d.as_micros() >= 2).collect();
        let q = |f: f64| {
            slow.get(((slow.len() as f64 - 1.0) * f) as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "run {run}: {fb} fault-backs ({} answered on the monitor's reader), {:.1} µs per fault-back over the run; faulting reads: median {:.1} µs, p90 {:.1} µs; service {:.1} µs per fault-back",
            s.fault_backs_on_reader - before.fault_backs_on_reader,
            total.as_secs_f64() * 1e6 / fb.max(1) as f64,
            q(0.5).as_secs_f64() * 1e6,
            q(0.9).as_secs_f64() * 1e6,
            svc.as_secs_f64() * 1e6 / fb.max(1) as f64,
        );
        m.migrate_to_host(range).expect("migrate back");
    }
    drop(m);
    // SAFETY: our mapping, nothing refers to it any more.
    unsafe { libc::munmap(base, len) };
}
