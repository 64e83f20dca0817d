//! Reporting: derived figures, the table, `results.csv`, SVG plots and
//! the closing speed-up line.

pub mod csv;
pub mod plots;
pub mod table;

use crate::scenarios::{Row, ZERO_COPY};

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
    // A zero-copy device's `pages_in` counts pages mapped, not copied.
    let copied = r.strategy != ZERO_COPY;
    let bytes_in = if copied { s.stats.pages_in * 4096 } else { 0 };
    let bytes_out = if copied { s.stats.pages_out * 4096 } else { 0 };
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
    for r in rows
        .iter()
        .filter(|r| !is_pin(r.strategy) && r.strategy != ZERO_COPY)
    {
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

/// The zero-copy line, where a zero-copy arm ran: per case, copy-mode
/// mirror time / zero-copy time and pin time / zero-copy time
/// (`zero-copy: sparse1%=2.10x/25.00x …`, above 1 = zero-copy faster).
pub fn zero_copy_line(rows: &[Row]) -> Option<String> {
    let time = |r: &Row| r.sample.total.as_secs_f64().max(1e-9);
    let parts: Vec<String> = rows
        .iter()
        .filter(|z| z.strategy == ZERO_COPY)
        .filter_map(|z| {
            let same = |r: &&Row| r.scenario == z.scenario && r.case == z.case;
            let copy = rows.iter().filter(same).find(|r| r.strategy == "mirror")?;
            let pin = rows.iter().filter(same).find(|r| is_pin(r.strategy))?;
            Some(format!(
                "{}{}={:.2}x/{:.2}x",
                z.scenario,
                short_case(z.scenario, &z.case),
                time(copy) / time(z),
                time(pin) / time(z)
            ))
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "zero-copy-vs-copy/pin: {} (copy-mode mirror time / zero-copy time, pin time / zero-copy time)",
            parts.join(" ")
        )
    })
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
        assert_eq!(zero_copy_line(&rows), None);
    }

    #[test]
    fn the_phase_table_shows_each_phase_and_the_time_outside_launches() {
        let mut r = row("dense", "saxpy", "mirror", 10);
        r.sample.stats.phases = hmm_core::mirror::LaunchPhases {
            wait: Duration::from_millis(4),
            service: Duration::from_millis(3),
            copy_in: Duration::from_millis(2),
            write_back: Duration::from_millis(1),
            ..Default::default()
        };
        let t = table::render_phases(&[r]);
        let line = t.lines().nth(2).expect("a row");
        assert_eq!(
            line,
            "| dense | saxpy | mirror | 0.00 | 0.00 | 0.00 | 4.00 | 0.00 | 3.00 | 2.00 | 0.00 | 1.00 | 2.00 |"
        );
    }

    #[test]
    fn zero_copy_rows_get_their_own_line() {
        let rows = vec![
            row("sparse", "1%", "mirror", 10),
            row("sparse", "1%", "pin", 200),
            row("sparse", "1%", "zero-copy", 5),
            row("churn", "40x1-4MiB", "mirror", 30),
            row("churn", "40x1-4MiB", "pin-per-use", 30),
            row("churn", "40x1-4MiB", "zero-copy", 60),
        ];
        assert_eq!(
            speedup_line(&rows),
            "mirror-vs-pin: sparse1%=20.00x churn=1.00x"
        );
        assert_eq!(
            zero_copy_line(&rows).as_deref(),
            Some(
                "zero-copy-vs-copy/pin: sparse1%=2.00x/40.00x churn=0.50x/0.50x \
                 (copy-mode mirror time / zero-copy time, pin time / zero-copy time)"
            )
        );
    }
}
