//! CPU writes between launches: before every launch but the first, the
//! CPU rewrites a fraction of the buffer's pages — random ones, or in the
//! `hot` case the same ones every time; each launch sums every chunk of
//! the buffer and must see the CPU's latest data.
//!
//! - **mirror**: one mirror; the sync point at each launch invalidates
//!   exactly the pages the CPU wrote, and only those fault in again.
//! - **re-pin**: a pinned copy does not follow CPU writes (that hazard is
//!   what `pinning_hazard_is_real` shows), so a pinning user re-uploads
//!   before each launch: unpin, pin again. Pinning once would fail
//!   verification.
//! - **zero-copy** (where the driver has it): the device reads the CPU's
//!   own pages, so a CPU write invalidates nothing and nothing faults in
//!   again.
//!
//! The CPU's writes are on the clock for both; verification is not.

use super::{pages, pattern, pin_all, range_of, unpin_all, verify, Ctx, PageBuf, Res, Rng, Row};
use crate::kernels::{chunk_sums, BenchKernels};
use crate::measure::Meter;

/// Fractions of pages rewritten before each launch, and whether they are
/// the same pages every time ("hot": an iterative program's host-updated
/// block, which the adaptive policy's ping-pong detection refreshes when
/// a launch begins instead of faulting it back; `hmm_core::mirror`'s
/// `ping_pong` module) or fresh random ones.
pub const FRACTIONS: [(f64, &str, bool); 3] = [
    (0.01, "1%", false),
    (0.1, "10%", false),
    (0.01, "hot1%", true),
];

/// Runs the scenario, appending rows.
pub fn run<B: BenchKernels>(cx: &Ctx<B>, rows: &mut Vec<Row>) -> Res<()> {
    let size = (cx.plan.size / 4).max(4 << 20);
    let launches: u64 = if cx.plan.quick { 4 } else { 8 };
    let n = size / 4;
    let npages = n / 1024;
    let arms = cx.arms(&["mirror", "re-pin"]);
    let bar = cx.bar(
        "cpu-writes",
        (FRACTIONS.len() * arms.len() * cx.plan.reps) as u64,
    );
    let mut data: Vec<u32> = vec![0; n as usize];
    for (frac, case, hot) in FRACTIONS {
        let k_pages = ((npages as f64 * frac).round() as u64).max(1);
        let pool = (npages + pages(n.div_ceil(1024) * 4) + 64) as u32;
        let touched = size + pages(n.div_ceil(1024) * 4) * 4096;
        let case = format!("{case}x{launches}");
        let r = cx.interleaved("cpu-writes", &case, &arms, touched, &bar, |strategy| {
            for (j, v) in data.iter_mut().enumerate() {
                *v = pattern(j as u64, 4);
            }
            let mut rng = Rng::new(0x3417);
            let m = cx.mirror(strategy, pool, size)?;
            let k = m.backend().chunk_sum()?;
            let w = u64::from(m.backend().words_per_invocation());
            let chunks = n.div_ceil(w);
            let mut out = PageBuf::zeroed(chunks as usize);
            let mut meter = Meter::start(&m);
            for l in 0..launches {
                if l > 0 {
                    let pick = if hot {
                        Rng::new(0x407).distinct(npages, k_pages)
                    } else {
                        rng.distinct(npages, k_pages)
                    };
                    for p in pick {
                        let page = &mut data[(p * 1024) as usize..((p + 1) * 1024) as usize];
                        for (i, v) in page.iter_mut().enumerate() {
                            *v = pattern(p * 1024 + i as u64, 10 + l);
                        }
                    }
                }
                let pins = if strategy == "re-pin" {
                    let r = [range_of(&data)?, range_of(&out)?];
                    meter.setup(|| pin_all(&m, &r))?
                } else {
                    Vec::new()
                };
                let args = [data.as_ptr() as u64, out.as_mut_ptr() as u64, n, w];
                m.launch(&k, chunks as u32, args)?;
                meter.note(&m);
                unpin_all(&m, pins)?;
                meter.off_clock(|| {
                    verify(
                        &format!("cpu-writes {case} {strategy} launch {l}"),
                        std::hint::black_box(&out),
                        &chunk_sums(&data, w as usize),
                    )
                })?;
            }
            Ok(meter.finish(&m))
        })?;
        rows.extend(r);
    }
    bar.finish_and_clear();
    Ok(())
}
