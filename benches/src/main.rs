//! `hmm-bench`: the project's main binary.
//!
//! - `hmm-bench` (or `hmm-bench run`): the main job: on-demand mirroring
//!   against pinning on the best available backend (today the `cpu`
//!   driver; the full scenario harness is issue #7).
//! - `hmm-bench info`: what this machine's kernel offers (userfaultfd,
//!   `PAGEMAP_SCAN`, write tracking) and how hmm-rs degrades without it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use hmm_core::VaRange;

#[derive(Parser)]
#[command(
    name = "hmm-bench",
    about = "hmm-rs: userspace heterogeneous memory management — main job and machine report"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Short run (a few seconds), for CI smoke tests.
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the main job (default).
    Run,
    /// Print the machine's capabilities and how hmm-rs degrades without them.
    Info,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Info => {
            info();
            ExitCode::SUCCESS
        }
        Cmd::Run => {
            info();
            println!();
            run(cli.quick)
        }
    }
}

fn info() {
    println!("hmm-rs machine report");
    println!("{}", hmm_core::cpu::probe::Capabilities::get());
    let d = hmm_core::cpu::probe::Capabilities::get().degradations();
    if d.is_empty() {
        println!("degradations: none (every kernel feature hmm-rs uses is available)");
    } else {
        for line in d {
            println!("degradation: {line}");
        }
    }
}

fn run(quick: bool) -> ExitCode {
    println!("backend: cpu — no GPU backend is built yet (the wgpu and vulkan drivers are issues #5/#6),");
    println!("         so the software device (drivers/cpu, an emulated MMU on host threads) runs the job.");
    let mib: u64 = if quick { 64 } else { 1024 };
    match mirror_vs_pin(mib) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sparse reads over a malloc'd buffer: every `stride`-th page is read once
/// by the device. On demand, only those pages are copied; pinned, all are.
fn mirror_vs_pin(mib: u64) -> Result<(), Box<dyn std::error::Error>> {
    use hmm_core::cpu::host::HostSpace;
    use hmm_core::mirror::{Mirror, MirrorConfig};
    use hmm_driver_cpu::{CpuDevice, CpuKernel};

    let words = (mib << 20) as usize / 4;
    let pages = words / 1024;
    let stride = 100; // 1 % of the pages
    let probes = (pages / stride) as u32;
    println!(
        "\nmirror vs pin — sparse reads (1 % of pages) over a {mib} MiB Vec<u32>, {probes} probes"
    );
    let data: Vec<u32> = (0..words as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let mut out = vec![0u32; probes as usize];
    let want: Vec<u32> = (0..probes as usize)
        .map(|i| data[i * stride * 1024 + 7])
        .collect();
    let kernel = CpuKernel::new(move |lane, i| {
        let (base, outp) = (lane.args()[0], lane.args()[1]);
        let v = lane.load_u32(base + (u64::from(i) * stride as u64 * 1024 + 7) * 4)?;
        lane.store_u32(outp + u64::from(i) * 4, v)
    });
    let cfg = MirrorConfig {
        pool_slots: (pages as u32 + 4096).max(65536),
        table_pages: 8192,
        ..MirrorConfig::default()
    };
    let host = Arc::new(HostSpace::new()?);
    let args = [data.as_ptr() as u64, out.as_mut_ptr() as u64];
    let data_range = VaRange::of_slice(&data)?;
    let mut rows = Vec::new();
    for strategy in ["mirror", "pin"] {
        out.fill(0);
        let m = Mirror::new(Arc::clone(&host), CpuDevice::new(), cfg.clone())?;
        let t0 = Instant::now();
        let pin = if strategy == "pin" {
            Some(m.pin(data_range)?)
        } else {
            None
        };
        let setup = t0.elapsed();
        m.launch(&kernel, probes, args)?;
        let total = t0.elapsed();
        if let Some(p) = pin {
            m.unpin(p)?;
        }
        // The device wrote `out` through the mirror; compare with the CPU.
        let ok = std::hint::black_box(&out) == &want;
        let st = m.stats();
        println!("  {strategy:<6} total {:>9.2} ms  setup {:>9.2} ms  pages in {:>8}  out {:>6}  faults {:>7}  device MiB {:>7.1}  {}",
            total.as_secs_f64() * 1e3, setup.as_secs_f64() * 1e3, st.pages_in, st.pages_out, st.faults,
            (st.pages_in.max(st.pool_used) * 4096) as f64 / (1 << 20) as f64, if ok { "result ok" } else { "RESULT WRONG" });
        if !ok {
            return Err("device result differs from the CPU's".into());
        }
        println!("{}", indent(&st.to_string()));
        rows.push(total.as_secs_f64());
    }
    println!("mirror-vs-pin: sparse1%={:.1}x", rows[1] / rows[0]);
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("         {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_owned()
}
