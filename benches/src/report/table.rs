//! The results table on stdout.

use std::fmt::Write;

use super::derive;
use crate::scenarios::Row;

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// `used` of `speculated` pages as a percentage, `-` where nothing was
/// speculated.
fn spec_used(speculated: u64, used: u64) -> String {
    if speculated == 0 {
        "-".to_owned()
    } else {
        format!("{:.0}%", used as f64 * 100.0 / speculated as f64)
    }
}

/// Renders the table (markdown, so it pastes into the README).
pub fn render(rows: &[Row], memcpy_bw: f64) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| scenario | case | strategy | total ms | setup ms | in MiB | out MiB | device MiB | dev/touched | faults | batches | rounds | spec MiB | spec used | retries | invalidations | evictions | CPU ms | copy eff |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for r in rows {
        let d = derive(r, memcpy_bw);
        let s = &r.sample;
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.3} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {:.1} | {:.0}% |",
            r.scenario,
            r.case,
            r.strategy,
            s.total.as_secs_f64() * 1e3,
            s.setup.as_secs_f64() * 1e3,
            mib(d.bytes_in),
            mib(d.bytes_out),
            mib(s.device_bytes),
            d.dev_ratio,
            s.stats.faults,
            s.stats.fault_batches,
            s.stats.submissions,
            mib(s.stats.speculated * 4096),
            spec_used(s.stats.speculated, s.stats.speculated_used),
            s.stats.retries,
            s.stats.invalidations_total(),
            s.stats.evictions,
            s.cpu.as_secs_f64() * 1e3,
            d.copy_eff * 100.0,
        );
    }
    let _ = writeln!(
        t,
        "\nrounds: device submissions (one per fault-service round, plus the first); \
         spec MiB: what the fetch policy brought in beyond the faulted pages (`--policy`); \
         spec used: the share of it the device accessed before its launch ended (a lower bound)."
    );
    if rows
        .iter()
        .any(|r| r.strategy == crate::scenarios::ZERO_COPY)
    {
        let _ = writeln!(
            t,
            "\nzero-copy rows: the device uses the CPU's pages, so nothing is copied (in/out 0 MiB), \
             `evictions` counts host windows rebound, and device memory is the page table alone."
        );
    }
    t
}

/// Where each row's launch time went (`MirrorStats::phases` over the
/// run's launches, milliseconds): the breakdown that says what separates
/// one strategy from another. `outside` is the run's total less the
/// launches' phases: pinning, prefetching and host work between launches.
pub fn render_phases(rows: &[Row]) -> String {
    let mut t = String::from(
        "| scenario | case | strategy | sync | will-need | submit | wait | read-back | service | (copies) | (entries) | write-back | outside |\n\
         |---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    for r in rows {
        let p = &r.sample.stats.phases;
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.scenario,
            r.case,
            r.strategy,
            ms(p.sync_point),
            ms(p.will_need),
            ms(p.submit),
            ms(p.wait),
            ms(p.read_back),
            ms(p.service),
            ms(p.copy_in),
            ms(p.page_table),
            ms(p.write_back),
            ms(r.sample.total.saturating_sub(p.total())),
        );
    }
    let _ = writeln!(
        t,
        "\nlaunch phases, ms summed over the run's launches (`LaunchReport::phases`); copies and \
         entries are parts of service and will-need (and of pinning or prefetching, counted in outside)."
    );
    t
}
