//! `results.csv`: one line per row, raw numbers.

use std::fmt::Write as _;
use std::path::Path;

use super::derive;
use crate::scenarios::Row;

/// The CSV text.
pub fn render(rows: &[Row], memcpy_bw: f64) -> String {
    let mut t = String::from(
        "scenario,case,backend,strategy,reps,total_s,setup_s,bytes_in,bytes_out,device_bytes,touched_bytes,\
faults,fault_batches,fault_runs,retries,invalidations,evictions,replays,cpu_s,memcpy_bytes_per_s,copy_efficiency,submissions,speculated_bytes,speculated_used_bytes,\
sync_s,will_need_s,submit_s,wait_s,read_back_s,service_s,copy_in_s,page_table_s,write_back_s\n",
    );
    for r in rows {
        let d = derive(r, memcpy_bw);
        let s = &r.sample;
        let ph = &s.stats.phases;
        let _ = writeln!(
            t,
            "{},{},{},{},{},{:.6},{:.6},{},{},{},{},{},{},{},{},{},{},{},{:.6},{:.0},{:.4},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6}",
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
            ph.sync_point.as_secs_f64(),
            ph.will_need.as_secs_f64(),
            ph.submit.as_secs_f64(),
            ph.wait.as_secs_f64(),
            ph.read_back.as_secs_f64(),
            ph.service.as_secs_f64(),
            ph.copy_in.as_secs_f64(),
            ph.page_table.as_secs_f64(),
            ph.write_back.as_secs_f64(),
        );
    }
    t
}

/// Writes `results.csv` into `dir`.
pub fn write(dir: &Path, rows: &[Row], memcpy_bw: f64) -> std::io::Result<()> {
    std::fs::write(dir.join("results.csv"), render(rows, memcpy_bw))
}
