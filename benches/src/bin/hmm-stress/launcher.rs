//! A launcher thread: launches the copy kernel over random page ranges of
//! the arena and checks every word the device read against what the CPU
//! held (the invariant in the binary's docs).

use std::sync::atomic::Ordering;

use hmm_conformance::{TestKernels, TestMap};
use hmm_core::mirror::{AccessError, Mirror, MirrorError};
use hmm_driver_cpu::FaultInjector;

use super::arena::{add, Arena, Rng};
use super::{PAGE, SENTINEL, WPP};

/// Per page of a launch: what the CPU held at the sync point.
#[derive(Clone, Copy)]
pub(crate) struct Before {
    pub(crate) floor: u32,
    pub(crate) remaps: u32,
}

pub(crate) fn launcher<B: TestKernels>(
    a: &Arena,
    m: &Mirror<B>,
    k: &B::Kernel,
    max_pages: usize,
    seed: u64,
) {
    let mut rng = Rng::new(seed, 1);
    let out = TestMap::anon(max_pages, libc::PROT_READ | libc::PROT_WRITE);
    let mut before = Vec::with_capacity(max_pages);
    while !a.stop.load(Ordering::Relaxed) {
        let n = 1 + rng.below(max_pages.min(a.pages));
        let first = rng.below(a.pages - n + 1);
        before.clear();
        for p in first..first + n {
            // remaps first: an even count here and the same count after the
            // launch means no remap overlapped it.
            let remaps = a.remaps[p].load(Ordering::SeqCst);
            let s = a.stamp[p].load(Ordering::Acquire);
            let f = a.floor[p].load(Ordering::SeqCst);
            before.push(Before {
                floor: s.max(f),
                remaps,
            });
        }
        if a.poison_out {
            for i in 0..n * WPP {
                out.write_word(i, SENTINEL);
            }
        }
        let src = a.base + (first * PAGE) as u64;
        let gate = a
            .zero_copy
            .then(|| a.unmap_gate.read().unwrap_or_else(|e| e.into_inner()));
        let r = m.launch(k, (n * WPP) as u32, [src, out.addr()]);
        drop(gate);
        add(&a.c.launches, 1);
        add(&a.c.ops, 1);
        let raced = |p: usize, b: &Before| {
            b.remaps % 2 == 1 || a.remaps[p].load(Ordering::SeqCst) != b.remaps
        };
        let report = match r {
            Ok(report) => report,
            Err(MirrorError::DeviceFault { addr, reason, .. }) => {
                // Only acceptable at a page that was being remapped (the
                // memory vanished under the launch: unmapped, replaced by
                // the remapper's `PROT_NONE` placeholder, or it kept
                // vanishing while being populated).
                let p = (addr.0.wrapping_sub(a.base) as usize) / PAGE;
                let raced_here = (first..first + n).contains(&p) && raced(p, &before[p - first]);
                if raced_here
                    && matches!(
                        reason,
                        AccessError::Unmapped | AccessError::NoAccess | AccessError::BadPage
                    )
                {
                    add(&a.c.launch_faults, 1);
                } else {
                    println!("UNEXPECTED: device fault at {addr} ({reason}; remapped meanwhile: {raced_here})");
                    add(&a.c.unexpected, 1);
                }
                continue;
            }
            // Bounded give-ups under churn: the fault loop's retry timeout,
            // and a region whose memory kept changing shape while it was
            // being set up (the remapper hammers the same addresses).
            Err(MirrorError::RetryTimeout { .. } | MirrorError::RegionReleased { .. }) => {
                add(&a.c.launch_timeouts, 1);
                continue;
            }
            Err(MirrorError::Backend(ref e)) if a.injecting && FaultInjector::is_injected(e) => {
                add(&a.c.injected_errors, 1);
                continue;
            }
            Err(e) => {
                println!("UNEXPECTED launch error: {e}");
                add(&a.c.unexpected, 1);
                continue;
            }
        };
        // What the launch left, read at once: nothing may change the
        // output after the launch returned (checked at the end).
        let seen: Vec<u32> = (0..before.len() * WPP).map(|i| out.read_word(i)).collect();
        let mut checked = 0;
        for (i, b) in before.iter().enumerate() {
            let p = first + i;
            let after = a.stamp[p]
                .load(Ordering::Acquire)
                .max(a.writing[p].load(Ordering::SeqCst));
            let zero_ok = raced(p, b);
            for w in 0..WPP {
                let v = seen[i * WPP + w];
                checked += 1;
                if v == 0 && zero_ok {
                    add(&a.c.zeros_accepted, 1);
                    continue;
                }
                if v < b.floor || v > after {
                    let n = a.c.violations.fetch_add(1, Ordering::Relaxed);
                    if n < 10 {
                        println!(
                            "VIOLATION: page {p} word {w}: device read {v:#x}, CPU held {:#x}..={after:#x} (remaps {} → {}); launch of pages {first}..{}: {} submissions, {} pages in, {} out",
                            b.floor,
                            b.remaps,
                            a.remaps[p].load(Ordering::SeqCst),
                            first + before.len(),
                            report.submissions,
                            report.pages_in,
                            report.pages_out,
                        );
                    }
                }
            }
        }
        add(&a.c.words_checked, checked);
        // The output is this launcher's own: no later launch, write-back or
        // eviction may write it.
        let changed: Vec<usize> = (0..seen.len())
            .filter(|&i| out.read_word(i) != seen[i])
            .collect();
        if let Some(&i) = changed.first() {
            let n =
                a.c.violations
                    .fetch_add(changed.len() as u64, Ordering::Relaxed);
            if n < 10 {
                println!(
                    "VIOLATION: {} output words changed after their launch returned (first: word {} of page {}, {:#x} → {:#x})",
                    changed.len(),
                    i % WPP,
                    first + i / WPP,
                    seen[i],
                    out.read_word(i)
                );
            }
        }
    }
}
