//! Allocation churn: many malloc / fill / launch / free cycles of
//! mid-size buffers (1–4 MiB); the allocator hands the same addresses out
//! again, so a mirror's regions (its registration cache: notifiers,
//! event watches, page-table pages) keep serving, while CPU writes
//! invalidate the stale copies.
//!
//! - **mirror**: one mirror for all cycles; each cycle just launches.
//! - **pin-per-use**: one mirror; each cycle pins the buffer and the
//!   output, launches, unpins — a pinning user without a cache.
//! - **zero-copy** (where the driver has it): one zero-copy mirror; CPU
//!   writes need no invalidation at all.
//!
//! The timed loop includes the allocation and the CPU's fill (the mirror's
//! write tracking makes those CPU writes cost something); verification is
//! off the clock.

use super::{pattern, pin_all, range_of, unpin_all, verify, Ctx, PageBuf, Res, Rng, Row};
use crate::kernels::{chunk_sums, BenchKernels};
use crate::measure::Meter;

/// Runs the scenario, appending rows.
pub fn run<B: BenchKernels>(cx: &Ctx<B>, rows: &mut Vec<Row>) -> Res<()> {
    let cycles: u64 = if cx.plan.quick { 40 } else { 200 };
    let max_mib = 4u64;
    let arms = cx.arms(&["mirror", "pin-per-use"]);
    let bar = cx.bar("churn", (arms.len() * cx.plan.reps) as u64);
    // The same sequence of sizes for both strategies.
    let mut rng = Rng::new(0xc4u64);
    let sizes: Vec<u64> = (0..cycles)
        .map(|_| (1 + rng.below(max_mib)) << 20)
        .collect();
    // The working set resident at once: the largest buffer and its output.
    let touched = (max_mib << 20) + 4096;
    let pool = (((2 * max_mib) << 20) / 4096 + 256) as u32;
    let case = format!("{cycles}x1-{max_mib}MiB");
    let r = cx.interleaved("churn", &case, &arms, touched, &bar, |strategy| {
        let m = cx.mirror(strategy, pool, 1 << 30)?;
        let k = m.backend().chunk_sum()?;
        let w = u64::from(m.backend().words_per_invocation());
        let mut meter = Meter::start(&m);
        for (c, &bytes) in sizes.iter().enumerate() {
            let n = bytes / 4;
            let mut buf: Vec<u32> = Vec::with_capacity(n as usize);
            buf.extend((0..n).map(|j| pattern(j, 100 + c as u64)));
            let chunks = n.div_ceil(w);
            let mut out = PageBuf::zeroed(chunks as usize);
            let pins = if strategy == "pin-per-use" {
                let r = [range_of(&buf)?, range_of(&out)?];
                meter.setup(|| pin_all(&m, &r))?
            } else {
                Vec::new()
            };
            let args = [buf.as_ptr() as u64, out.as_mut_ptr() as u64, n, w];
            m.launch(&k, chunks as u32, args)?;
            meter.note(&m);
            unpin_all(&m, pins)?;
            meter.off_clock(|| {
                verify(
                    &format!("churn {strategy} cycle {c}"),
                    std::hint::black_box(&out),
                    &chunk_sums(&buf, w as usize),
                )
            })?;
            drop(out);
            drop(buf);
        }
        Ok(meter.finish(&m))
    })?;
    rows.extend(r);
    bar.finish_and_clear();
    Ok(())
}
