//! Setup: the time to make N bytes of populated CPU memory resident on
//! the device.
//!
//! - **mirror+prefetch**: `prefetch(range)` — the mirror's way to make a
//!   range resident up front. (On demand, a mirror needs no setup at all:
//!   the first fault does the work; the other scenarios measure that.)
//! - **pin**: `pin(range)`.
//!
//! Both release the memory afterwards (off the clock: dropping the mirror).

use super::{range_of, Ctx, Res, Row, Wrong};
use crate::kernels::BenchKernels;
use crate::measure::Meter;

/// Runs the scenario, appending rows.
pub fn run<B: BenchKernels>(cx: &Ctx<B>, rows: &mut Vec<Row>) -> Res<()> {
    let sizes = [cx.plan.size / 4, cx.plan.size];
    let bar = cx.bar("setup", (sizes.len() * 2 * cx.plan.reps) as u64);
    for size in sizes {
        let data: Vec<u8> = (0..size).map(|i| (i >> 12) as u8).collect();
        let case = if size >= 1 << 30 {
            format!("{} GiB", size as f64 / f64::from(1u32 << 30))
        } else {
            format!("{} MiB", size >> 20)
        };
        let pool = (size / 4096 + 64) as u32;
        let r = cx.interleaved(
            "setup",
            &case,
            &["mirror+prefetch", "pin"],
            size,
            &bar,
            |strategy| {
                let m = cx.mirror(strategy, pool, size)?;
                let r = range_of(&data)?;
                let mut meter = Meter::start(&m);
                let pin = meter.setup(|| -> Res<_> {
                    if strategy == "pin" {
                        Ok(Some(m.pin(r)?))
                    } else {
                        m.prefetch(r, false)?;
                        Ok(None)
                    }
                })?;
                meter.note(&m);
                let s = meter.finish(&m);
                let resident = s.stats.mapped_pages;
                if let Some(p) = pin {
                    m.unpin(p)?;
                }
                if resident < size / 4096 {
                    return Err(Box::new(Wrong(format!(
                        "setup {case} {strategy}: {resident} pages resident, expected {}",
                        size / 4096
                    ))));
                }
                Ok(s)
            },
        )?;
        rows.extend(r);
    }
    bar.finish_and_clear();
    Ok(())
}
