//! The run: memcpy bandwidth, every scenario for mirror and pin, then the
//! table, `results.csv`, the plots and the speed-up line.

use std::path::Path;
use std::sync::Arc;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::backend::BackendError;

use crate::cli::Plan;
use crate::kernels::BenchKernels;
use crate::report;
use crate::scenarios::{self, Ctx, Res, Row};

/// Runs every scenario the plan wants on backend `B`.
pub fn run<B: BenchKernels>(
    make: &dyn Fn() -> Result<B, BackendError>,
    make_zc: Option<&dyn Fn() -> Result<B, BackendError>>,
    backend: &str,
    plan: &Plan,
    out_dir: &Path,
) -> Res<()> {
    let t0 = std::time::Instant::now();
    let bw = crate::memcpy::bandwidth(if plan.quick { 64 << 20 } else { 256 << 20 }, 7);
    println!(
        "memcpy bandwidth: {:.2} GiB/s (copy_from_slice, out of cache, median of 7) — the physical limit for copy efficiency",
        bw / f64::from(1u32 << 30)
    );
    println!(
        "plan: {} mode, large buffer {} MiB, {} repetition(s) per figure (median), mirror and pin interleaved",
        if plan.quick { "quick" } else { "full" },
        plan.size >> 20,
        plan.reps
    );
    // The zero-copy arm runs where the driver can open a zero-copy device.
    let make_zc = match make_zc.map(|z| z().map(|_| z)) {
        Some(Ok(z)) => {
            println!("zero-copy arm: yes (the same driver, its CPU-pages mode)");
            Some(z)
        }
        Some(Err(e)) => {
            println!("zero-copy arm: no ({e})");
            None
        }
        None => {
            println!("zero-copy arm: no (this driver has no zero-copy mode)");
            None
        }
    };
    let cx = Ctx {
        make,
        make_zc,
        host: Arc::new(HostSpace::new()?),
        plan,
        backend: backend.to_owned(),
    };
    type Scenario<B> = fn(&Ctx<B>, &mut Vec<Row>) -> Res<()>;
    let all: [(&str, Scenario<B>); 7] = [
        ("sparse", scenarios::sparse::run::<B>),
        ("dense", scenarios::dense::run::<B>),
        ("churn", scenarios::churn::run::<B>),
        ("cpu-writes", scenarios::cpu_writes::run::<B>),
        ("oversub", scenarios::oversub::run::<B>),
        ("setup", scenarios::setup::run::<B>),
        ("iterate", scenarios::iterate::run::<B>),
    ];
    let mut rows = Vec::new();
    for (name, f) in all {
        if plan.wants(name) {
            let t = std::time::Instant::now();
            f(&cx, &mut rows)?;
            eprintln!("  {name}: {:.1} s", t.elapsed().as_secs_f64());
        }
    }
    println!();
    print!("{}", report::table::render(&rows, bw));
    println!();
    print!("{}", report::table::render_phases(&rows));
    std::fs::create_dir_all(out_dir)?;
    report::csv::write(out_dir, &rows, bw)?;
    let plots = report::plots::write(out_dir, &rows)?;
    println!(
        "\nwrote results.csv and {} plot(s) under {} ({:.1} s in all)",
        plots.len(),
        out_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", report::speedup_line(&rows));
    if let Some(line) = report::zero_copy_line(&rows) {
        println!("{line}");
    }
    Ok(())
}
