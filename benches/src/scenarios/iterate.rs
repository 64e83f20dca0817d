//! Iterate (issue #17): ten saxpy launches over the same buffers (`x` and
//! `y`, half the size each; 256 MiB in all on a GPU driver, the plan's
//! size — 1 GiB in full runs — on the cpu driver) with the CPU idle in
//! between, then the CPU reads one word in each of 1 % of `y`'s pages.
//!
//! - **pin**: pin `x` and `y` (setup), ten launches; the read first
//!   unpins (which writes all of `y` back), then reads.
//! - **mirror+prefetch** (copy mode): prefetch (setup), ten launches —
//!   each ends by writing `y`'s changes back — then the read.
//! - **migrated**: `migrate_to_device(x)`, `migrate_to_device(y)`
//!   (setup), ten launches — nothing is scanned or written back — then
//!   the read, whose every first touch of a page waits while the mirror
//!   gives back that page and the migrated pages of its neighbourhood
//!   (the page alone for reads this sparse, unless an earlier read landed
//!   in its 64 KiB block; it grows where faults are dense).
//!
//! Two rows per arm: case `10 launches` (setup and launches) and case
//! `CPU reads 1%` (from the last launch's end to the last word read).

use std::cell::RefCell;

use super::{pattern, pin_all, range_of, unpin_all, Ctx, PageBuf, Res, Row, Wrong};
use crate::kernels::BenchKernels;
use crate::measure::{median, Meter, Sample};

const A: u32 = 5;
const LAUNCHES: u32 = 10;

/// Runs the scenario, appending rows.
pub fn run<B: BenchKernels>(cx: &Ctx<B>, rows: &mut Vec<Row>) -> Res<()> {
    let size = if cx.backend == "cpu" {
        cx.plan.size
    } else {
        cx.plan.size.min(256 << 20)
    };
    // Quick mode (CI's smoke run of the main job): a quarter of the size,
    // once — enough to run every arm and check its results.
    let (size, reps) = if cx.plan.quick {
        ((size / 4).max(4 << 20), 1)
    } else {
        (size, cx.plan.reps)
    };
    let plan = crate::cli::Plan {
        reps,
        ..cx.plan.clone()
    };
    let cx = &Ctx {
        make: cx.make,
        host: std::sync::Arc::clone(&cx.host),
        plan: &plan,
        backend: cx.backend.clone(),
        make_zc: cx.make_zc,
    };
    let n = size / 8; // words in each of x and y
    let strategies: [&'static str; 3] = ["pin", "mirror+prefetch", "migrated"];
    let bar = cx.bar("iterate", (strategies.len() * reps) as u64);
    bar.set_message("filling the buffers");
    // Pages of their own (`PageBuf`): pinning writes whole pages back at
    // `unpin`, and migration moves whole pages out — a buffer sharing a
    // page with malloc's metadata would have it overwritten by the pinned
    // copy, or made to fault (and a system call on it to fail) while
    // migrated. (A `Vec` here corrupted the heap in CI's smoke run.)
    let mut x = PageBuf::zeroed(n as usize);
    for (j, v) in x.iter_mut().enumerate() {
        *v = pattern(j as u64, 7);
    }
    let mut y = PageBuf::zeroed(n as usize);
    let pool = (size / 4096 + 64) as u32;
    let y_pages = (n * 4).div_ceil(4096);
    let read_pages: Vec<u64> = super::Rng::new(0x17).distinct(y_pages, (y_pages / 100).max(1));
    let reads: RefCell<Vec<Vec<Sample>>> = RefCell::new(vec![Vec::new(); strategies.len()]);
    let case = format!("{} MiB, 10 launches", size >> 20);
    let r = cx.interleaved("iterate", &case, &strategies, size, &bar, |strategy| {
        for (j, v) in y.iter_mut().enumerate() {
            *v = pattern(j as u64, 8);
        }
        let m = cx.mirror(strategy, pool, size)?;
        let k = m.backend().saxpy()?;
        let w = u64::from(m.backend().words_per_invocation());
        let args = [x.as_ptr() as u64, y.as_mut_ptr() as u64, u64::from(A), n, w];
        let (rx, ry) = (range_of(&x)?, range_of(&y)?);
        let mut meter = Meter::start(&m);
        let mut pins = Vec::new();
        match strategy {
            "pin" => pins = meter.setup(|| pin_all(&m, &[rx, ry]))?,
            "mirror+prefetch" => meter.setup(|| -> Res<()> {
                m.prefetch(rx, false)?;
                m.prefetch(ry, true)?;
                Ok(())
            })?,
            _ => meter.setup(|| -> Res<()> {
                m.migrate_to_device(rx)?;
                m.migrate_to_device(ry)?;
                Ok(())
            })?,
        }
        for _ in 0..LAUNCHES {
            m.launch(&k, n.div_ceil(w) as u32, args)?;
        }
        meter.note(&m);
        let launches = meter.finish(&m);
        // The read: what the CPU pays to look at 1 % of the result.
        let rm = Meter::start(&m);
        unpin_all(&m, pins)?;
        let yp = y.as_ptr();
        let mut got = Vec::with_capacity(read_pages.len());
        for &p in &read_pages {
            let j = (p * 1024) as usize;
            // SAFETY: `j` indexes `y` (a page of it); a volatile read so
            // the load happens here, where it is timed.
            got.push((j, unsafe { std::ptr::read_volatile(yp.add(j)) }));
        }
        // On the cpu driver the event monitor's reader answers the faults
        // and leaves the mirror's books to the next holder of its lock:
        // settled here, on the clock (any call that takes the lock does).
        let _ = m.stats();
        let read = rm.finish(&m);
        for (j, v) in got {
            let want = pattern(j as u64, 8)
                .wrapping_add(LAUNCHES.wrapping_mul(A).wrapping_mul(x[j]));
            if v != want {
                return Err(Box::new(Wrong(format!(
                    "iterate {strategy}: y[{j}] = {v:#x}, the CPU says {want:#x}"
                ))));
            }
        }
        if strategy == "migrated" {
            let s = read.stats;
            // Nothing beyond the neighbourhoods the faults chose came
            // back (the page alone where reads are sparse, as here; 64 KiB
            // or more only where an earlier fault landed close by).
            if s.migrated_in > s.fault_back_span {
                return Err(Box::new(Wrong(format!(
                    "iterate migrated: {} pages given back for {} fault-backs whose neighbourhoods hold {} pages",
                    s.migrated_in, s.fault_backs, s.fault_back_span
                ))));
            }
        }
        reads.borrow_mut()[strategies.iter().position(|s| *s == strategy).unwrap_or(0)]
            .push(read);
        // Everything else checked off the clock: the whole of `y`.
        let y = std::hint::black_box(&y);
        if let Some(j) = (0..n as usize).step_by(257).find(|&j| {
            y[j] != pattern(j as u64, 8).wrapping_add(LAUNCHES.wrapping_mul(A).wrapping_mul(x[j]))
        }) {
            return Err(Box::new(Wrong(format!(
                "iterate {strategy}: y[{j}] = {:#x}",
                y[j]
            ))));
        }
        Ok(launches)
    })?;
    rows.extend(r);
    let read_case = format!("{} MiB, CPU reads 1%", size >> 20);
    for (s, v) in strategies.iter().zip(reads.into_inner()) {
        let med = median(v);
        if *s == "migrated" && med.stats.fault_backs > 0 {
            let per = med.total.as_secs_f64() * 1e6 / med.stats.fault_backs as f64;
            eprintln!(
                "  iterate: the CPU's 1% read took {per:.1} µs per faulted-back page ({} fault-backs, {} answered by the event monitor's reader, {} pages given back, median of {} runs; service time {:.1} µs per fault-back)",
                med.stats.fault_backs,
                med.stats.fault_backs_on_reader,
                med.stats.migrated_in,
                reps,
                med.stats.fault_back_time.as_secs_f64() * 1e6 / med.stats.fault_backs as f64
            );
            // The yardstick, measured now: what a bare userfaultfd round
            // trip costs on this machine (`fault_floor`).
            match crate::fault_floor::measure(300) {
                Ok(f) => {
                    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
                    eprintln!(
                        "  iterate: a bare userfaultfd fault round trip here (median of 300): {:.1} µs answered by the reading thread on the faulting thread's CPU, {:.1} µs answering with 64 KiB, {:.1} µs unpinned, {:.1} µs with one hand-off (unpinned); the fault-back above is {:.2}× the first",
                        us(f.direct),
                        us(f.direct_64k),
                        us(f.direct_unpinned),
                        us(f.handoff),
                        per / us(f.direct)
                    );
                }
                Err(e) => eprintln!("  iterate: no userfaultfd round-trip floor ({e})"),
            }
        }
        rows.push(Row {
            scenario: "iterate",
            case: read_case.clone(),
            strategy: s,
            backend: cx.backend.clone(),
            sample: med,
            touched: (read_pages.len() as u64) * 4096,
            reps,
        });
    }
    bar.finish_and_clear();
    Ok(())
}
