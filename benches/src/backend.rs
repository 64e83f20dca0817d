//! Backend selection: the one place that knows which drivers exist.
//!
//! Built in: the `cpu` driver and the `wgpu` driver (any adapter wgpu's
//! Vulkan backend finds; Mesa's lavapipe counts). `auto` probes wgpu first
//! and falls back to cpu, saying why.
//!
//! A driver plugs in by (1) implementing [`crate::kernels::BenchKernels`]
//! for its device type, (2) adding a [`Selected`] variant and its probe in
//! [`select`] (probe first for `auto`: a usable adapter wins over cpu),
//! (3) adding the variant's arm in [`Selected::run`], [`Selected::describe`]
//! and [`available`]. The **vulkan** arm goes exactly there: once
//! `drivers/vulkan` is merged (`hmm::Driver::Vulkan` exists), add
//! `Selected::Vulkan`, probe it before wgpu for `auto`, and give its
//! device the same [`Selected::fit`] treatment (its pool is limited by
//! `maxStorageBufferRange` like wgpu's).

use hmm_core::mirror::backend::{Backend, BackendError};
use hmm_driver_cpu::CpuDevice;
use hmm_driver_wgpu::WgpuDevice;

use crate::cli::{BackendChoice, Plan};
use crate::scenarios::Res;

/// Why `--backend vulkan` cannot run in this build.
const VULKAN_MISSING: &str = "the vulkan driver (drivers/vulkan, issue #6) is not merged into \
     this build (hmm::Driver has no Vulkan variant yet); --backend wgpu runs the same WGSL \
     kernels through wgpu's Vulkan backend, --backend cpu on the software device";

/// The backend chosen for this run, and why.
pub enum Selected {
    /// The software device.
    Cpu {
        /// Why this backend was chosen, in words.
        why: String,
    },
    /// A wgpu adapter (a GPU, or lavapipe).
    Wgpu {
        /// Why this backend was chosen, in words.
        why: String,
        /// The adapter, in words.
        adapter: String,
        /// Largest pool one device holds, in 4 KiB slots.
        max_pool_slots: u32,
    },
}

/// Opens a wgpu device, as a backend error.
fn wgpu_device() -> Result<WgpuDevice, BackendError> {
    WgpuDevice::open().map_err(|e| BackendError::Other(e.to_string()))
}

/// The `Selected::Wgpu` for an adapter that opened.
fn wgpu_selected(d: &WgpuDevice, why: &str) -> Selected {
    Selected::Wgpu {
        why: why.into(),
        adapter: d.adapter_name().to_owned(),
        max_pool_slots: d.info().max_pool_slots,
    }
}

/// Picks the backend for `choice`; an explicit choice that is not built in
/// (or finds no device) is an error.
pub fn select(choice: BackendChoice) -> Result<Selected, String> {
    match choice {
        BackendChoice::Auto => match WgpuDevice::open() {
            // (vulkan, once merged, is probed here first.)
            Ok(d) => Ok(wgpu_selected(
                &d,
                "best available: a wgpu adapter opened; --backend cpu for the software device",
            )),
            Err(e) => {
                println!("note: no wgpu adapter ({e}); falling back to the cpu driver");
                Ok(Selected::Cpu {
                    why: "fallback: no GPU adapter found".into(),
                })
            }
        },
        BackendChoice::Cpu => Ok(Selected::Cpu {
            why: "asked for with --backend cpu".into(),
        }),
        BackendChoice::Wgpu => match WgpuDevice::open() {
            Ok(d) => Ok(wgpu_selected(&d, "asked for with --backend wgpu")),
            Err(e) => Err(format!("--backend wgpu: {e}")),
        },
        BackendChoice::Vulkan => Err(VULKAN_MISSING.into()),
    }
}

/// One line per backend this build knows, with whether it is usable here.
pub fn available() -> Vec<String> {
    let wgpu = match WgpuDevice::open() {
        Ok(d) => format!(
            "wgpu    yes ({}; pool up to {} MiB)",
            d.adapter_name(),
            u64::from(d.info().max_pool_slots) >> 8
        ),
        Err(e) => format!("wgpu    no adapter: {e}"),
    };
    vec![
        format!("cpu     yes ({})", CpuDevice::new().info().device),
        wgpu,
        "vulkan  not built in (drivers/vulkan not merged yet, issue #6)".into(),
    ]
}

/// A fresh `cpu` device; its pool is made resident at init, like GPU memory.
fn cpu_device() -> Result<CpuDevice, BackendError> {
    Ok(CpuDevice::new().with_resident_pool())
}

/// Whether a large buffer of `mib` MiB fits a pool of `slots` slots in
/// every scenario: sparse at 100 % needs the buffer, its index and output
/// (0.2 % more) and slack; dense and setup need the buffer and slack.
fn fits(mib: u64, slots: u32) -> bool {
    let pages = mib << 8;
    pages + pages / 256 + 256 <= u64::from(slots)
}

impl Selected {
    /// `backend: <name> (<why>)`.
    pub fn describe(&self) -> String {
        match self {
            Selected::Cpu { why } => {
                format!("backend: cpu ({why}); {}", CpuDevice::new().info().device)
            }
            Selected::Wgpu { why, adapter, .. } => format!("backend: wgpu on {adapter} ({why})"),
        }
    }

    /// Adjusts `plan` to this backend, saying what it changed: a device
    /// pool smaller than the large buffer (lavapipe: 4 bindings × 128 MiB)
    /// scales the buffer down to the largest power of two that fits, so
    /// every strategy — pinning included — runs in one launch; and a
    /// software GPU (lavapipe) gets smaller `--quick` sizes.
    pub fn fit(&self, plan: &mut Plan, size_explicit: bool) {
        let Selected::Wgpu {
            adapter,
            max_pool_slots,
            ..
        } = self
        else {
            return;
        };
        let software = adapter.to_lowercase().contains("llvmpipe");
        if plan.quick && software && !size_explicit {
            plan.size = plan.size.min(64 << 20);
            println!(
                "note: {adapter} is a software GPU: --quick uses a {} MiB large buffer",
                plan.size >> 20
            );
        }
        let mib = plan.size >> 20;
        if fits(mib, *max_pool_slots) {
            return;
        }
        let mut m = 4;
        while fits(m * 2, *max_pool_slots) {
            m *= 2;
        }
        plan.size = m << 20;
        println!(
            "note: this device's pool holds at most {} MiB (max_storage_buffer_binding_size × {} bindings); \
             the large buffer is scaled from {mib} MiB to {m} MiB so pinning fits in one launch",
            u64::from(*max_pool_slots) >> 8,
            hmm_shaders::POOL_BINDINGS
        );
    }

    /// Runs the harness on this backend.
    pub fn run(&self, plan: &Plan, out_dir: &std::path::Path) -> Res<()> {
        match self {
            Selected::Cpu { .. } => crate::harness::run(&cpu_device, "cpu", plan, out_dir),
            Selected::Wgpu { .. } => crate::harness::run(&wgpu_device, "wgpu", plan, out_dir),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_leaves_room_for_index_output_and_slack() {
        // lavapipe: 4 × 128 MiB = 131072 slots.
        assert!(fits(256, 131_072));
        assert!(!fits(512, 131_072));
        assert!(fits(1024, 300_000));
    }

    #[test]
    fn vulkan_says_why_it_cannot_run() {
        let Err(e) = select(BackendChoice::Vulkan) else {
            panic!("vulkan selected in a build without the driver");
        };
        assert!(e.contains("not merged"), "{e}");
    }
}
