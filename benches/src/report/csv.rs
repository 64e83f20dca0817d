//! `results.csv`: one line per row, raw numbers.

use std::fmt::Write as _;
use std::path::Path;

use super::derive;
use crate::scenarios::Row;

/// The CSV text.
pub fn render(rows: &[Row], memcpy_bw: f64) -> String {
    let mut t = String::from(
        "scenario,case,backend,strategy,reps,total_s,setup_s,bytes_in,bytes_out,device_bytes,touched_bytes,\
faults,fault_batches,fault_runs,retries,invalidations,evictions,replays,cpu_s,memcpy_bytes_per_s,copy_efficiency,submissions,speculated_bytes,speculated_used_bytes\n",
    );
    for r in rows {
        let d = derive(r, memcpy_bw);
        let s = &r.sample;
        let _ = writeln!(
            t,
            "{},{},{},{},{},{:.6},{:.6},{},{},{},{},{},{},{},{},{},{},{},{:.6},{:.0},{:.4},{},{},{}",
            r.scenario,
            r.case,
            r.backend,
            r.strategy,
            r.reps,
            s.total.as_secs_f64(),
            s.setup.as_secs_f64(),
            d.bytes_in,
            d.bytes_out,
            s.device_bytes,
            r.touched,
            s.stats.faults,
            s.stats.fault_batches,
            s.stats.fault_runs,
            s.stats.retries,
            s.stats.invalidations_total(),
            s.stats.evictions,
            s.stats.replays,
            s.cpu.as_secs_f64(),
            memcpy_bw,
            d.copy_eff,
            s.stats.submissions,
            s.stats.speculated * 4096,
            s.stats.speculated_used * 4096,
        );
    }
    t
}

/// Writes `results.csv` into `dir`.
pub fn write(dir: &Path, rows: &[Row], memcpy_bw: f64) -> std::io::Result<()> {
    std::fs::write(dir.join("results.csv"), render(rows, memcpy_bw))
}
