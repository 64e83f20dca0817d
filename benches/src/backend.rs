//! Backend selection: the one place that knows which drivers exist.
//!
//! Built in: the `cpu` driver, the `wgpu` driver (any adapter wgpu's
//! Vulkan backend finds; Mesa's lavapipe counts) and the `vulkan` driver
//! (ash, copy mode). The cpu and vulkan drivers also run the `zero-copy`
//! strategy on a zero-copy device of the same driver (the harness's
//! buffers are never unmapped or touched during a launch, which is that
//! mode's contract). `auto` probes wgpu, then vulkan, and falls back to
//! cpu, saying why — the same order as `hmm::Device::open`.
//!
//! A driver plugs in by (1) implementing [`crate::kernels::BenchKernels`]
//! for its device type, (2) adding a [`Selected`] variant and its probe in
//! [`select`] (a usable adapter wins over cpu for `auto`), (3) adding the
//! variant's arm in [`Selected::run`], [`Selected::describe`] and
//! [`available`]. GPU variants share [`Selected::fit`]: their pool is
//! limited by the largest storage binding.

use hmm_core::mirror::backend::{Backend, BackendError};
use hmm_driver_cpu::CpuDevice;
use hmm_driver_vulkan::VulkanDevice;
use hmm_driver_wgpu::WgpuDevice;

use crate::cli::{BackendChoice, Plan};
use crate::scenarios::Res;

/// The backend chosen for this run, and why.
pub enum Selected {
    /// The software device.
    Cpu {
        /// Why this backend was chosen, in words.
        why: String,
    },
    /// A GPU adapter (a real GPU, or lavapipe) through a GPU driver.
    Gpu {
        /// Which driver.
        driver: GpuDriver,
        /// Why this backend was chosen, in words.
        why: String,
        /// The adapter, in words.
        adapter: String,
        /// Largest pool one device holds, in 4 KiB slots.
        max_pool_slots: u32,
    },
}

/// The GPU drivers the harness runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuDriver {
    /// `drivers/wgpu`.
    Wgpu,
    /// `drivers/vulkan` (copy mode).
    Vulkan,
}

impl GpuDriver {
    fn name(self) -> &'static str {
        match self {
            GpuDriver::Wgpu => "wgpu",
            GpuDriver::Vulkan => "vulkan",
        }
    }

    /// Opens a device and describes it: `(adapter, max_pool_slots)`.
    fn probe(self) -> Result<(String, u32), String> {
        match self {
            GpuDriver::Wgpu => WgpuDevice::open()
                .map(|d| (d.adapter_name().to_owned(), d.info().max_pool_slots))
                .map_err(|e| e.to_string()),
            GpuDriver::Vulkan => VulkanDevice::open()
                .map(|d| (d.device_name().to_owned(), d.info().max_pool_slots))
                .map_err(|e| e.to_string()),
        }
    }

    fn selected(self, why: &str) -> Result<Selected, String> {
        let (adapter, max_pool_slots) = self.probe()?;
        Ok(Selected::Gpu {
            driver: self,
            why: why.into(),
            adapter,
            max_pool_slots,
        })
    }
}

/// Opens a wgpu device, as a backend error.
fn wgpu_device() -> Result<WgpuDevice, BackendError> {
    WgpuDevice::open().map_err(|e| BackendError::Other(e.to_string()))
}

/// Opens a vulkan device, as a backend error.
fn vulkan_device() -> Result<VulkanDevice, BackendError> {
    VulkanDevice::open().map_err(|e| BackendError::Other(e.to_string()))
}

/// Opens a zero-copy vulkan device (`VK_EXT_external_memory_host`), as a
/// backend error.
fn vulkan_zc_device() -> Result<VulkanDevice, BackendError> {
    // SAFETY: the harness never unmaps, protects or touches from another
    // thread a buffer while a launch that uses it runs: every scenario
    // launches from this thread and frees or rewrites its buffers only
    // after the launch returned.
    unsafe { VulkanDevice::open_zero_copy() }.map_err(|e| BackendError::Other(e.to_string()))
}

/// Picks the backend for `choice`; an explicit choice that is not built in
/// (or finds no device) is an error.
pub fn select(choice: BackendChoice) -> Result<Selected, String> {
    match choice {
        BackendChoice::Auto => {
            let mut why_not = Vec::new();
            for d in [GpuDriver::Wgpu, GpuDriver::Vulkan] {
                match d.selected(
                    "best available: a GPU adapter opened; --backend cpu for the software device",
                ) {
                    Ok(s) => return Ok(s),
                    Err(e) => why_not.push(format!("{}: {e}", d.name())),
                }
            }
            println!(
                "note: no GPU adapter ({}); falling back to the cpu driver",
                why_not.join("; ")
            );
            Ok(Selected::Cpu {
                why: "fallback: no GPU adapter found".into(),
            })
        }
        BackendChoice::Cpu => Ok(Selected::Cpu {
            why: "asked for with --backend cpu".into(),
        }),
        BackendChoice::Wgpu => GpuDriver::Wgpu
            .selected("asked for with --backend wgpu")
            .map_err(|e| format!("--backend wgpu: {e}")),
        BackendChoice::Vulkan => GpuDriver::Vulkan
            .selected("asked for with --backend vulkan")
            .map_err(|e| format!("--backend vulkan: {e}")),
    }
}

/// One line per backend this build knows, with whether it is usable here.
pub fn available() -> Vec<String> {
    let mut lines = vec![format!("cpu     yes ({})", CpuDevice::new().info().device)];
    for d in [GpuDriver::Wgpu, GpuDriver::Vulkan] {
        lines.push(match d.probe() {
            Ok((adapter, slots)) => format!(
                "{:<7} yes ({adapter}; pool up to {} MiB)",
                d.name(),
                u64::from(slots) >> 8
            ),
            Err(e) => format!("{:<7} no adapter: {e}", d.name()),
        });
    }
    lines
}

/// A fresh `cpu` device; its pool is made resident at init, like GPU memory.
fn cpu_device() -> Result<CpuDevice, BackendError> {
    Ok(CpuDevice::new().with_resident_pool())
}

/// A fresh zero-copy `cpu` device (the `zero-copy` strategy).
fn cpu_zc_device() -> Result<CpuDevice, BackendError> {
    // SAFETY: the harness never unmaps a buffer, nor touches it from
    // another thread, while a launch that uses it runs: every scenario
    // launches from this thread and frees or rewrites its buffers only
    // after the launch returned (the progress bar's thread touches none).
    Ok(unsafe { CpuDevice::new().zero_copy() })
}

/// Whether a large buffer of `mib` MiB fits a pool of `slots` slots in
/// every scenario: sparse at 100 % needs the buffer, its index and output
/// (0.2 % more) and slack; dense and setup need the buffer and slack.
/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

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
            Selected::Gpu {
                driver,
                why,
                adapter,
                ..
            } => format!("backend: {} on {adapter} ({why})", driver.name()),
        }
    }

    /// Adjusts `plan` to this backend, saying what it changed: a device
    /// pool smaller than the large buffer (lavapipe: 4 bindings × 128 MiB)
    /// scales the buffer down to the largest power of two that fits, so
    /// every strategy — pinning included — runs in one launch; and a
    /// software GPU (lavapipe) gets smaller `--quick` sizes. On the cpu
    /// driver the pool is host memory: the buffer is scaled down to what
    /// the host has available for the data, the pool and the twins (three
    /// copies of the large buffer at the peak).
    pub fn fit(&self, plan: &mut Plan, size_explicit: bool) {
        let (slots, what) = match self {
            Selected::Cpu { .. } => {
                let avail = mem_available_bytes().unwrap_or(u64::MAX) / 3 / 4096;
                let slots = u64::from(hmm_driver_cpu::host_pool_slots()).min(avail);
                (
                    slots.min(u64::from(u32::MAX)) as u32,
                    "a third of this host's available memory (MemAvailable): the data, \
                     the pool and the twins each hold a copy"
                        .to_string(),
                )
            }
            Selected::Gpu {
                adapter,
                max_pool_slots,
                ..
            } => {
                let software = adapter.to_lowercase().contains("llvmpipe");
                if plan.quick && software && !size_explicit {
                    plan.size = plan.size.min(64 << 20);
                    println!(
                        "note: {adapter} is a software GPU: --quick uses a {} MiB large buffer",
                        plan.size >> 20
                    );
                }
                (
                    *max_pool_slots,
                    format!(
                        "max_storage_buffer_binding_size × {} bindings",
                        hmm_shaders::POOL_BINDINGS
                    ),
                )
            }
        };
        let mib = plan.size >> 20;
        if fits(mib, slots) {
            return;
        }
        let mut m = 4;
        while fits(m * 2, slots) {
            m *= 2;
        }
        plan.size = m << 20;
        println!(
            "note: this device's pool holds at most {} MiB ({what}); \
             the large buffer is scaled from {mib} MiB to {m} MiB so pinning fits in one launch",
            u64::from(slots) >> 8,
        );
    }

    /// Runs the harness on this backend.
    pub fn run(&self, plan: &Plan, out_dir: &std::path::Path) -> Res<()> {
        match self {
            Selected::Cpu { .. } => {
                crate::harness::run(&cpu_device, Some(&cpu_zc_device), "cpu", plan, out_dir)
            }
            Selected::Gpu {
                driver: GpuDriver::Wgpu,
                ..
            } => crate::harness::run(&wgpu_device, None, "wgpu", plan, out_dir),
            Selected::Gpu {
                driver: GpuDriver::Vulkan,
                ..
            } => crate::harness::run(
                &vulkan_device,
                Some(&vulkan_zc_device),
                "vulkan",
                plan,
                out_dir,
            ),
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
}
