//! `hmm-bench`: the project's main binary.
//!
//! - `hmm-bench` (or `hmm-bench run`): the machine report, then the
//!   mirror-vs-pin harness on the best available backend: six scenarios
//!   (sparse, dense, churn, CPU writes, oversubscription, setup), each for
//!   on-demand mirroring and for pinning, interleaved in one process; a
//!   table on stdout, `results.csv` and SVG plots under
//!   `target/hmm-bench/`, and a last line `mirror-vs-pin: …`. `--quick`
//!   is the CI smoke run. Any kernel result that differs from the CPU's
//!   is a failure (non-zero exit), not a figure.
//! - `hmm-bench info`: what this machine's kernel offers (userfaultfd,
//!   `PAGEMAP_SCAN`, write tracking), how hmm-rs degrades without it, and
//!   which backends this build has.
//!
//! Layout: [`cli`] (arguments, plan), [`backend`] (selection — the one
//! place that knows the drivers), [`kernels`] (the kernels a backend
//! provides: [`kernels::BenchKernels`]), [`harness`] (the run),
//! [`scenarios`] (one module each, generic over the backend),
//! [`measure`] (samples, `getrusage`), [`memcpy`] (the bandwidth
//! reference), [`report`] (table, CSV, plots, speed-up line).

use std::process::ExitCode;

use clap::Parser;

mod backend;
mod cli;
mod fault_floor;
mod harness;
mod kernels;
mod measure;
mod memcpy;
mod report;
mod scenarios;

use cli::{Cli, Cmd, Plan};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.verbose > 0 {
        // The library prints nothing itself: its diagnostics are `tracing`
        // events, shown here on request.
        let level = if cli.verbose > 1 {
            tracing_subscriber::filter::LevelFilter::TRACE
        } else {
            tracing_subscriber::filter::LevelFilter::WARN
        };
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Info => {
            info();
            ExitCode::SUCCESS
        }
        Cmd::Run => {
            info();
            println!();
            run(&cli)
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
    // Device-private migration (issue #17): what `Mirror::migrate_to_device`
    // can do on this kernel.
    match hmm_core::cpu::host::HostSpace::new().map(|h| h.migration_support()) {
        Ok(Ok(None)) => println!("device-private migration: yes"),
        Ok(Ok(Some(why))) => println!("device-private migration: yes, degraded: {why}"),
        Ok(Err(why)) => println!(
            "device-private migration: no ({why}); Mirror::migrate_to_device returns MigrationUnsupported"
        ),
        Err(e) => println!("device-private migration: no (the CPU side did not start: {e})"),
    }
    println!("backends in this build:");
    for b in backend::available() {
        println!("  {b}");
    }
}

fn run(cli: &Cli) -> ExitCode {
    let sel = match backend::select(cli.backend) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{}", sel.describe());
    let mut plan = Plan::from_cli(cli);
    sel.fit(&mut plan, cli.size_mib.is_some());
    match sel.run(&plan, &cli.out_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
