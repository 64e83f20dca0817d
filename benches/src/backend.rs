//! Backend selection: the one place that knows which drivers exist.
//!
//! Today only the `cpu` driver is built in. A GPU driver plugs in by
//! (1) implementing [`crate::kernels::BenchKernels`] for its device type,
//! (2) adding a [`Selected`] variant and its probe in [`select`] (probe
//! first for `auto`: a usable adapter — lavapipe counts — wins over cpu),
//! (3) adding the variant's arm in [`Selected::run`] and [`available`].

use hmm_core::mirror::backend::Backend;
use hmm_driver_cpu::CpuDevice;

use crate::cli::{BackendChoice, Plan};
use crate::scenarios::Res;

/// The backend chosen for this run, and why.
pub enum Selected {
    /// The software device.
    Cpu {
        /// Why this backend was chosen, in words.
        why: String,
    },
}

/// Picks the backend for `choice`; an explicit choice that is not built in
/// (or finds no device) is an error.
pub fn select(choice: BackendChoice) -> Result<Selected, String> {
    match choice {
        BackendChoice::Auto => Ok(Selected::Cpu {
            why: "no GPU driver built in (wgpu and vulkan drivers: issues #5/#6)".into(),
        }),
        BackendChoice::Cpu => Ok(Selected::Cpu {
            why: "asked for with --backend cpu".into(),
        }),
        BackendChoice::Wgpu => {
            Err("the wgpu driver is not built into this hmm-bench (issue #5)".into())
        }
        BackendChoice::Vulkan => {
            Err("the vulkan driver is not built into this hmm-bench (issue #6)".into())
        }
    }
}

/// One line per backend this build knows, with whether it is usable here.
pub fn available() -> Vec<String> {
    vec![
        format!("cpu     yes ({})", CpuDevice::new().info().device),
        "wgpu    not built in (issue #5)".into(),
        "vulkan  not built in (issue #6)".into(),
    ]
}

/// A fresh `cpu` device; its pool is made resident at init, like GPU memory.
fn cpu_device() -> Result<CpuDevice, hmm_core::mirror::backend::BackendError> {
    Ok(CpuDevice::new().with_resident_pool())
}

impl Selected {
    /// `backend: <name> (<why>)`.
    pub fn describe(&self) -> String {
        match self {
            Selected::Cpu { why } => {
                format!("backend: cpu ({why}); {}", CpuDevice::new().info().device)
            }
        }
    }

    /// Runs the harness on this backend.
    pub fn run(&self, plan: &Plan, out_dir: &std::path::Path) -> Res<()> {
        match self {
            Selected::Cpu { .. } => crate::harness::run(&cpu_device, "cpu", plan, out_dir),
        }
    }
}
