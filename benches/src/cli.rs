//! Command line.

use clap::{Parser, Subcommand, ValueEnum};

/// `hmm-bench`'s arguments.
#[derive(Parser, Debug)]
#[command(
    name = "hmm-bench",
    about = "hmm-rs: userspace heterogeneous memory management — mirror-vs-pin harness and machine report"
)]
pub struct Cli {
    /// What to do (default: `run`).
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    /// Short run (well under a minute on 2 cores), for CI smoke tests.
    #[arg(long, global = true)]
    pub quick: bool,
    /// Which backend runs the scenarios.
    #[arg(long, global = true, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Size of the large buffer (sparse, dense, setup) in MiB
    /// (default: 1024; 256 with `--quick`).
    #[arg(long, global = true)]
    pub size_mib: Option<u64>,
    /// Repetitions per figure; medians are reported (default: 5; 3 with `--quick`).
    #[arg(long, global = true)]
    pub reps: Option<usize>,
    /// Run only the scenarios whose name contains one of these
    /// (sparse, dense, churn, cpu-writes, oversub, setup); repeatable.
    #[arg(long = "only", global = true)]
    pub only: Vec<String>,
    /// Where `results.csv` and the plots go.
    #[arg(long, global = true, default_value = "target/hmm-bench")]
    pub out_dir: std::path::PathBuf,
    /// No progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,

    /// What a fault-service round fetches beyond the faulted pages: `auto`
    /// (the default: adaptive on the GPU drivers, exact on the cpu
    /// driver), `adaptive` (occupancy and stream prefetch, ping-pong refresh) or `exact`
    /// (only the faulted pages)
    #[arg(long, global = true, value_enum, default_value_t = PolicyChoice::Auto)]
    pub policy: PolicyChoice,
    /// Show the library's diagnostics (`tracing` events at warn and
    /// above; `-vv`: everything) on stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Subcommands.
#[derive(Subcommand, Debug, Clone, Copy)]
pub enum Cmd {
    /// The machine report, then every scenario for mirror and pin (default).
    Run,
    /// Only the machine report: kernel capabilities, degradations, backends.
    Info,
}

/// `--policy`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChoice {
    /// Adaptive where the device's rounds are costly (GPU drivers), else
    /// exact.
    Auto,
    /// Occupancy-tree and stream prefetch (`hmm_core::mirror::policy`).
    Adaptive,
    /// Exactly the pages that faulted.
    Exact,
}

/// `--backend`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The best backend built in and usable here (a GPU driver first).
    Auto,
    /// The software device (`drivers/cpu`).
    Cpu,
    /// The wgpu driver (WGSL kernels; lavapipe counts).
    Wgpu,
    /// The Vulkan driver (copy mode, with a zero-copy arm where the device imports host memory).
    Vulkan,
}

/// Sizes and counts every scenario derives from.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Short run.
    pub quick: bool,
    /// Large buffer, bytes.
    pub size: u64,
    /// Repetitions per figure.
    pub reps: usize,
    /// Scenario name filters (empty: all).
    pub only: Vec<String>,
    /// Show progress bars.
    pub progress: bool,
    /// The mirrors' fetch policy.
    pub fetch: hmm_core::mirror::FetchPolicy,
}

impl Plan {
    /// The plan for these arguments.
    pub fn from_cli(cli: &Cli) -> Plan {
        let mib = cli
            .size_mib
            .unwrap_or(if cli.quick { 256 } else { 1024 })
            .max(4);
        Plan {
            quick: cli.quick,
            size: mib << 20,
            reps: cli.reps.unwrap_or(if cli.quick { 3 } else { 5 }).max(1),
            only: cli.only.clone(),
            progress: !cli.no_progress,
            fetch: match cli.policy {
                PolicyChoice::Auto => hmm_core::mirror::FetchPolicy::Auto,
                PolicyChoice::Adaptive => hmm_core::mirror::FetchPolicy::Adaptive,
                PolicyChoice::Exact => hmm_core::mirror::FetchPolicy::Exact,
            },
        }
    }

    /// Whether scenario `name` runs.
    pub fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }
}
