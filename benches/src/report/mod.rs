//! Reporting: derived figures, the table, `results.csv`, SVG plots and
//! the closing speed-up line.

pub mod csv;
pub mod plots;
pub mod table;

use crate::scenarios::Row;

/// Figures derived from a row.
pub struct Derived {
    /// Bytes copied CPU → device.
    pub bytes_in: u64,
    /// Bytes copied device → CPU.
    pub bytes_out: u64,
    /// Copy efficiency: bytes copied / total time / memcpy bandwidth.
    pub copy_eff: f64,
    /// Peak device memory / working set (`Row::touched`).
    pub dev_ratio: f64,
}

/// Derives the figures of `r` given the machine's memcpy bandwidth (B/s).
pub fn derive(r: &Row, memcpy_bw: f64) -> Derived {
    let s = &r.sample;
    let bytes_in = s.stats.pages_in * 4096;
    let bytes_out = s.stats.pages_out * 4096;
    let secs = s.total.as_secs_f64().max(1e-9);
    Derived {
        bytes_in,
        bytes_out,
        copy_eff: (bytes_in + bytes_out) as f64 / secs / memcpy_bw,
        dev_ratio: s.device_bytes as f64 / r.touched.max(1) as f64,
    }
}

/// The baseline strategy a row's mirror figure is compared against.
fn is_pin(strategy: &str) -> bool {
    strategy.starts_with("pin") || strategy == "re-pin"
}

/// `(key, pin time / mirror time)` per scenario case and mirror strategy.
pub fn speedups(rows: &[Row]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| !is_pin(r.strategy)) {
        let Some(p) = rows
            .iter()
            .find(|p| p.scenario == r.scenario && p.case == r.case && is_pin(p.strategy))
        else {
            continue;
        };
        let mut key = format!("{}{}", r.scenario, short_case(r.scenario, &r.case));
        if r.strategy != "mirror" && r.scenario != "setup" {
            key.push_str(r.strategy.trim_start_matches("mirror"));
        }
        let x = p.sample.total.as_secs_f64() / r.sample.total.as_secs_f64().max(1e-9);
        out.push((key, x));
    }
    out
}

/// A case label without spaces, for the speed-up line.
fn short_case(scenario: &str, case: &str) -> String {
    match scenario {
        "dense" | "churn" => String::new(),
        "cpu-writes" => case.split('x').next().unwrap_or(case).to_owned(),
        "oversub" => case.split(" of ").next().unwrap_or(case).to_owned(),
        _ => case.replace(' ', ""),
    }
}

/// The closing line: `mirror-vs-pin: <scenario>=<speedup>x ...`.
pub fn speedup_line(rows: &[Row]) -> String {
    let parts: Vec<String> = speedups(rows)
        .into_iter()
        .map(|(k, x)| format!("{k}={x:.2}x"))
        .collect();
    format!("mirror-vs-pin: {}", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::Sample;
    use std::time::Duration;

    fn row(scenario: &'static str, case: &str, strategy: &'static str, ms: u64) -> Row {
        Row {
            scenario,
            case: case.into(),
            strategy,
            backend: "cpu".into(),
            sample: Sample {
                total: Duration::from_millis(ms),
                ..Sample::default()
            },
            touched: 4096,
            reps: 1,
        }
    }

    #[test]
    fn speedup_line_is_pin_over_mirror_per_case() {
        let rows = vec![
            row("sparse", "1%", "mirror", 10),
            row("sparse", "1%", "pin", 200),
            row("dense", "saxpy", "mirror", 100),
            row("dense", "saxpy", "mirror+prefetch", 50),
            row("dense", "saxpy", "pin", 100),
            row("oversub", "3x of 64 MiB", "mirror", 100),
            row("oversub", "3x of 64 MiB", "pin-tiled", 50),
            row("setup", "1 GiB", "mirror+prefetch", 100),
            row("setup", "1 GiB", "pin", 100),
        ];
        assert_eq!(
            speedup_line(&rows),
            "mirror-vs-pin: sparse1%=20.00x dense=1.00x dense+prefetch=2.00x oversub3x=0.50x setup1GiB=1.00x"
        );
    }
}
