//! What every example shares: the `--backend` flag, opening a mirror on
//! the chosen device, and printing its counters.

use hmm::{Device, Mirror, MirrorConfig};

/// `--backend cpu|wgpu|vulkan|auto` (default `auto`: the best available).
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArg {
    /// Driver to run on: cpu, wgpu, vulkan, or auto (the best available).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Zero-copy mode (cpu and vulkan drivers): the device uses the CPU's
    /// own pages instead of copies.
    #[arg(long)]
    pub zero_copy: bool,
}

/// Why an example could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for StartError {}

/// Opens the chosen device, prints which one it is, and wraps it in a mirror.
pub fn open(arg: &BackendArg, cfg: MirrorConfig) -> Result<Mirror<Device>, StartError> {
    let want = hmm::parse_backend(Some(&arg.backend)).map_err(|e| StartError(e.to_string()))?;
    let opened = if arg.zero_copy {
        // SAFETY: every example launches from its main thread and unmaps,
        // protects or touches its buffers only after the launch returned
        // (zero-copy mode's contract).
        unsafe { Device::open_zero_copy(want) }
    } else {
        Device::open(want)
    }
    .map_err(|e| StartError(e.to_string()))?;
    println!("{}", opened.note);
    hmm::mirror(opened.device, cfg).map_err(|e| StartError(e.to_string()))
}

/// Prints the mirror's counters under a heading.
pub fn print_counters(m: &Mirror<Device>) {
    println!("mirror counters:\n{}", m.stats());
}
