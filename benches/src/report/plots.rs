//! SVG plots (plotters' SVG backend only): one chart per scenario (total
//! time per case, one line per strategy, log scale), one of the speed-ups,
//! and one of the mirror's device rounds per scenario and case.

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::scenarios::Row;

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// One line chart: categories on x, a log-scale y, one series per name.
fn chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    cats: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> Result<(), Box<dyn Error>> {
    let vals = series.iter().flat_map(|(_, v)| v.iter().flatten().copied());
    let (lo, hi) = vals.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi || lo <= 0.0 {
        return Ok(());
    }
    let root = SVGBackend::new(path, (860, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = cats.len().max(1);
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (lo / 2.0..hi * 2.0).log_scale())?;
    let fmt = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            cats.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    c.configure_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&fmt)
        .y_desc(y_desc)
        .disable_x_mesh()
        .draw()?;
    for (k, (name, v)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter_map(|(i, y)| y.map(|y| (i as f64, y)))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `<scenario>.svg` for every scenario, `rounds.svg` and
/// `speedup.svg`; returns the files written.
pub fn write(dir: &Path, rows: &[Row]) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    let mut scenarios: Vec<&str> = rows.iter().map(|r| r.scenario).collect();
    scenarios.dedup();
    for sc in scenarios {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.scenario == sc).collect();
        let mut cats: Vec<String> = rs.iter().map(|r| r.case.clone()).collect();
        cats.dedup();
        let mut strategies: Vec<&str> = Vec::new();
        for r in &rs {
            if !strategies.contains(&r.strategy) {
                strategies.push(r.strategy);
            }
        }
        let series: Vec<(String, Vec<Option<f64>>)> = strategies
            .iter()
            .map(|s| {
                let v = cats
                    .iter()
                    .map(|c| {
                        rs.iter()
                            .find(|r| &r.case == c && r.strategy == *s)
                            .map(|r| r.sample.total.as_secs_f64() * 1e3)
                    })
                    .collect();
                (s.to_string(), v)
            })
            .collect();
        let path = dir.join(format!("{sc}.svg"));
        chart(
            &path,
            &format!("{sc}: end-to-end time"),
            "ms (log)",
            &cats,
            &series,
        )?;
        files.push(path);
    }
    // Device rounds (submissions) of the mirror arm, every scenario/case.
    let mirror_rows: Vec<&Row> = rows.iter().filter(|r| r.strategy == "mirror").collect();
    if !mirror_rows.is_empty() {
        let cats: Vec<String> = mirror_rows
            .iter()
            .map(|r| format!("{} {}", r.scenario, r.case))
            .collect();
        let series = vec![(
            "mirror: device rounds (submissions)".to_owned(),
            mirror_rows
                .iter()
                .map(|r| Some(r.sample.stats.submissions.max(1) as f64))
                .collect(),
        )];
        let path = dir.join("rounds.svg");
        chart(
            &path,
            "fault-service rounds",
            "rounds (log)",
            &cats,
            &series,
        )?;
        files.push(path);
    }
    let sp = super::speedups(rows);
    if !sp.is_empty() {
        let cats: Vec<String> = sp.iter().map(|(k, _)| k.clone()).collect();
        let series = vec![
            (
                "pin time / mirror time".to_owned(),
                sp.iter().map(|(_, x)| Some(*x)).collect(),
            ),
            (
                "1x (parity)".to_owned(),
                sp.iter().map(|_| Some(1.0)).collect(),
            ),
        ];
        let path = dir.join("speedup.svg");
        chart(&path, "mirror vs pin: speed-up", "x (log)", &cats, &series)?;
        files.push(path);
    }
    Ok(files)
}
