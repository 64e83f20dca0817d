//! Dense streaming: one saxpy-like pass (`y = a*x + y`, `u32`) over the
//! whole buffer (`x` and `y` are half of it each).
//!
//! - **mirror**: launch; every page faults in, in batches.
//! - **mirror+prefetch**: `prefetch(x)`, `prefetch(y, write)` (setup), launch.
//! - **pin**: pin `x` and `y` (setup), launch, unpin (writes `y` back).
//! - **zero-copy** (where the driver has it): launch on a zero-copy
//!   device: no copy in, no write-back.

use super::{pattern, pin_all, range_of, unpin_all, Ctx, Res, Row, Wrong};
use crate::kernels::BenchKernels;
use crate::measure::Meter;

const A: u32 = 3;

/// Runs the scenario, appending rows.
pub fn run<B: BenchKernels>(cx: &Ctx<B>, rows: &mut Vec<Row>) -> Res<()> {
    let size = cx.plan.size;
    let n = size / 8; // words in each of x and y
    let strategies = cx.arms(&["mirror", "mirror+prefetch", "pin"]);
    let bar = cx.bar("dense", (strategies.len() * cx.plan.reps) as u64);
    bar.set_message("filling the buffers");
    let x: Vec<u32> = (0..n).map(|j| pattern(j, 2)).collect();
    let mut y: Vec<u32> = vec![0; n as usize];
    let pool = (size / 4096 + 64) as u32;
    let r = cx.interleaved("dense", "saxpy", &strategies, size, &bar, |strategy| {
        for (j, v) in y.iter_mut().enumerate() {
            *v = pattern(j as u64, 3);
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
            _ => {}
        }
        m.launch(&k, n.div_ceil(w) as u32, args)?;
        meter.note(&m);
        unpin_all(&m, pins)?;
        let s = meter.finish(&m);
        let y = std::hint::black_box(&y);
        if let Some(j) = (0..n as usize)
            .find(|&j| y[j] != A.wrapping_mul(x[j]).wrapping_add(pattern(j as u64, 3)))
        {
            return Err(Box::new(Wrong(format!(
                "dense {strategy}: y[{j}] = {:#x}",
                y[j]
            ))));
        }
        Ok(s)
    })?;
    rows.extend(r);
    bar.finish_and_clear();
    Ok(())
}
