//! `y = a·x + y` on the device over two plain `Vec<f32>`s; the CPU checks y.
//!
//! `cargo run --release --example saxpy -- [--backend cpu|wgpu|auto] [--n N]`

use clap::Parser;
use hmm::{In, InOut, MirrorConfig};
use hmm_examples::{open, print_counters, BackendArg};

hmm::kernel! {
    /// Parameters declared once: the WGSL reads them as `args.x`, `args.y`,
    /// `args.a`; the cpu closure gets them typed; the launch below is checked
    /// against them by the compiler.
    const SAXPY: saxpy(x: In<f32>, y: InOut<f32>, a: f32)
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    let yp = hmm_index(args.y, i, 4u);
    let xi = hmm_load_f32(hmm_index(args.x, i, 4u));
    hmm_store_f32(yp, args.a * xi + hmm_load_f32(yp));
}
"#,
        )
        .cpu(|lane, i, (x, y, a)| {
            let v = a * lane.load_f32(x.at(i))? + lane.load_f32(y.at(i))?;
            lane.store_f32(y.at(i), v)
        });
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    backend: BackendArg,
    /// Elements of x and y.
    #[arg(long, default_value_t = 1 << 20)]
    n: u32,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mirror = open(&args.backend, MirrorConfig::default())?;
    let kernel = mirror.backend().kernel(&SAXPY)?;

    let n = args.n as usize;
    let a = 2.5f32;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let y0 = y.clone();

    let t = std::time::Instant::now();
    let report = mirror.run(&kernel, args.n, (&x, &mut y, a))?;
    println!(
        "saxpy over {n} elements: {:.2} ms, {} pages in, {} pages out, {} submissions",
        t.elapsed().as_secs_f64() * 1e3,
        report.pages_in,
        report.pages_out,
        report.submissions
    );

    // The device may fuse a*x+y into one FMA; allow one rounding step.
    let bad = (0..n)
        .filter(|&i| {
            let want = a * x[i] + y0[i];
            (y[i] - want).abs() > want.abs() * 1e-6 + 1e-6
        })
        .count();
    print_counters(&mirror);
    if bad != 0 {
        return Err(format!("saxpy: {bad} of {n} elements wrong").into());
    }
    println!("saxpy: all {n} elements correct");
    Ok(())
}
