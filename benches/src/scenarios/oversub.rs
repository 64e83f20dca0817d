//! Oversubscription: a working set 1.5× and 3× the device pool, summed
//! chunk by chunk in two passes.
//!
//! - **mirror**: launch over the whole working set; faults fill the pool
//!   and CLOCK evicts (dirty pages written back first).
//! - **pin-tiled**: what a pinning user must do when the data does not
//!   fit: pin a pool-sized tile, launch over it, unpin, next tile.
//! - **zero-copy** (where the driver has it): launch; no pool to
//!   oversubscribe — the device reads the CPU's pages through its host
//!   windows, which are evicted and rebound as the launch moves on.

use super::{pages, pattern, range_of, verify, Ctx, PageBuf, Res, Row};
use crate::kernels::{chunk_sums, BenchKernels};
use crate::measure::Meter;
use hmm_core::VaRange;

/// Working set / pool.
pub const FACTORS: [(f64, &str); 2] = [(1.5, "1.5x"), (3.0, "3x")];
const PASSES: u64 = 2;

/// Runs the scenario, appending rows.
pub fn run<B: BenchKernels>(cx: &Ctx<B>, rows: &mut Vec<Row>) -> Res<()> {
    // The pool: a sixteenth of the large buffer (64 MiB for 1 GiB).
    let pool_bytes = (cx.plan.size / 16).max(2 << 20);
    let pool = (pool_bytes / 4096) as u32;
    let arms = cx.arms(&["mirror", "pin-tiled"]);
    let bar = cx.bar(
        "oversub",
        (FACTORS.len() * arms.len() * cx.plan.reps) as u64,
    );
    for (factor, case) in FACTORS {
        let size = ((pool_bytes as f64 * factor) as u64) & !0xfff;
        let n = size / 4;
        let mut data = PageBuf::zeroed(n as usize);
        for (j, v) in data.iter_mut().enumerate() {
            *v = pattern(j as u64, 5);
        }
        // The working set; the device holds at most the pool of it.
        let touched = size;
        let case = format!("{case} of {} MiB", pool_bytes >> 20);
        let r = cx.interleaved("oversub", &case, &arms, touched, &bar, |strategy| {
            let m = cx.mirror(strategy, pool, size)?;
            let k = m.backend().chunk_sum()?;
            let w = u64::from(m.backend().words_per_invocation());
            let chunks = n.div_ceil(w);
            let mut out = PageBuf::zeroed(chunks as usize);
            let want = chunk_sums(&data, w as usize);
            let mut meter = Meter::start(&m);
            for pass in 0..PASSES {
                if strategy != "pin-tiled" {
                    let args = [data.as_ptr() as u64, out.as_mut_ptr() as u64, n, w];
                    m.launch(&k, chunks as u32, args)?;
                    meter.note(&m);
                } else {
                    let ro = range_of(&out)?;
                    let out_pin = meter.setup(|| m.pin(ro))?;
                    // A tile: what fits next to the pinned output (whole chunks).
                    let tile_words = ((u64::from(pool) - pages(chunks * 4) - 16) * 1024 / w) * w;
                    let mut at = 0;
                    while at < n {
                        let len = tile_words.min(n - at);
                        let base = data.as_ptr() as u64 + at * 4;
                        let tile = VaRange::from_start_len(hmm_core::VirtAddr(base), len * 4)?;
                        let p = meter.setup(|| m.pin(tile))?;
                        let outp = out.as_mut_ptr() as u64 + (at / w) * 4;
                        m.launch(&k, len.div_ceil(w) as u32, [base, outp, len, w])?;
                        meter.note(&m);
                        m.unpin(p)?;
                        at += len;
                    }
                    m.unpin(out_pin)?;
                }
                meter.off_clock(|| {
                    verify(
                        &format!("oversub {case} {strategy} pass {pass}"),
                        std::hint::black_box(&out),
                        &want,
                    )
                })?;
                meter.off_clock(|| out.fill(0));
            }
            Ok(meter.finish(&m))
        })?;
        rows.extend(r);
    }
    bar.finish_and_clear();
    Ok(())
}
