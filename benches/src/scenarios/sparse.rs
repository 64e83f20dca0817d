//! Sparse: random reads of a fraction of the pages of a large malloc'd
//! buffer (`out[i] = data[idx[i]]`, one word on each chosen page).
//!
//! - **mirror**: launch; the pages read fault in on demand.
//! - **pin**: pin `data`, `idx` and `out` (setup), launch, unpin — what a
//!   pinning user does: the whole buffer is made device-resident first.
//! - **zero-copy** (where the driver has it): launch on a zero-copy
//!   device; the regions read are bound as host windows, nothing copied.

use super::{pages, pattern, pin_all, range_of, unpin_all, verify, Ctx, PageBuf, Res, Rng, Row};
use crate::kernels::BenchKernels;
use crate::measure::Meter;

/// Access densities (fraction of pages read).
pub const DENSITIES: [(f64, &str); 4] =
    [(0.001, "0.1%"), (0.01, "1%"), (0.1, "10%"), (1.0, "100%")];

/// Runs the scenario, appending rows.
pub fn run<B: BenchKernels>(cx: &Ctx<B>, rows: &mut Vec<Row>) -> Res<()> {
    let size = cx.plan.size;
    let words = size / 4;
    let npages = words / 1024;
    let arms = cx.arms(&["mirror", "pin"]);
    let bar = cx.bar(
        "sparse",
        (DENSITIES.len() * arms.len() * cx.plan.reps) as u64,
    );
    bar.set_message("filling the buffer");
    let data: Vec<u32> = (0..words).map(|j| pattern(j, 1)).collect();
    let mut rng = Rng::new(0x5eed);
    for (density, case) in DENSITIES {
        let n = ((npages as f64 * density).round() as u64).max(1);
        let idx_v: Vec<u32> = rng
            .distinct(npages, n)
            .into_iter()
            .map(|p| (p * 1024 + rng.below(1024)) as u32)
            .collect();
        let mut idx = PageBuf::zeroed(idx_v.len());
        idx.copy_from_slice(&idx_v);
        let want: Vec<u32> = idx.iter().map(|&i| data[i as usize]).collect();
        let mut out = PageBuf::zeroed(n as usize);
        let pool = (npages + 2 * pages(n * 4) + 64) as u32;
        let touched = (n + 2 * pages(n * 4)) * 4096;
        let r = cx.interleaved("sparse", case, &arms, touched, &bar, |strategy| {
            out.fill(0);
            let m = cx.mirror(strategy, pool, size)?;
            let k = m.backend().gather()?;
            let args = [
                data.as_ptr() as u64,
                idx.as_ptr() as u64,
                out.as_mut_ptr() as u64,
            ];
            let ranges = [range_of(&data)?, range_of(&idx)?, range_of(&out)?];
            let mut meter = Meter::start(&m);
            let pins = if strategy == "pin" {
                meter.setup(|| pin_all(&m, &ranges))?
            } else {
                Vec::new()
            };
            m.launch(&k, n as u32, args)?;
            meter.note(&m);
            unpin_all(&m, pins)?;
            let s = meter.finish(&m);
            verify(
                &format!("sparse {case} {strategy}"),
                std::hint::black_box(&out),
                &want,
            )?;
            Ok(s)
        })?;
        rows.extend(r);
    }
    bar.finish_and_clear();
    Ok(())
}
