//! hmm-rs for applications: one entry point over every driver.
//!
//! ```
//! use hmm::{Device, In, InOut, MirrorConfig};
//!
//! // y = a * x + y: each parameter named and typed once; WGSL for the GPU
//! // drivers, the same steps in Rust for the cpu driver (optional).
//! hmm::kernel! {
//!     const SAXPY: saxpy(x: In<f32>, y: InOut<f32>, a: f32)
//!         .wgsl(r#"
//! fn hmm_kernel(i: u32) {
//!     let yp = hmm_index(args.y, i, 4u);
//!     hmm_store_f32(yp, args.a * hmm_load_f32(hmm_index(args.x, i, 4u)) + hmm_load_f32(yp));
//! }"#)
//!         .cpu(|lane, i, (x, y, a)| {
//!             let v = a * lane.load_f32(x.at(i))? + lane.load_f32(y.at(i))?;
//!             lane.store_f32(y.at(i), v)
//!         });
//! }
//!
//! let opened = Device::open(None).unwrap(); // the best device; cpu if no GPU
//! let mirror = hmm::mirror(opened.device, MirrorConfig::default()).unwrap();
//! let saxpy = mirror.backend().kernel(&SAXPY).unwrap();
//! let x = vec![1.0f32; 1000];
//! let mut y = vec![2.0f32; 1000];
//! // Checked by the compiler: `&x` passes the Vec's data, `3.0` is an f32.
//! mirror.run(&saxpy, 1000, (&x, &mut y, 3.0)).unwrap();
//! assert!(y.iter().all(|&v| v == 5.0));
//! ```
//!
//! Kernels, their parameters, structs shared with kernels and the WGSL
//! helpers: the [`kernel`](mod@kernel) module. A user's guide (first kernel, arguments
//! and structs, the replay contract, limits, zero-copy, non-blocking
//! launches, statistics): the [`guide`] module (`docs/GUIDE.md`).
//!
//! [`Device::open`] with `None` picks the best available driver and says
//! which and why ([`Opened::note`]): a GPU adapter through wgpu (Mesa's
//! lavapipe counts), else a Vulkan device through the `vulkan` driver
//! (ash), else the `cpu` driver. `Driver::Vulkan` opens the Vulkan driver
//! with its defaults (copy mode; `HMM_VK_MODE=zero-copy` selects the
//! zero-copy mode where the device supports it, `HMM_VK_DEVICE` and
//! `HMM_VK_VALIDATION` as documented in `hmm_driver_vulkan`).

use std::sync::Arc;

use hmm_core::mirror::backend::{
    Backend, BackendInfo, DeviceConfig, DeviceToHost, HostToDevice, HostWindows, Invocations,
    LaunchOutcome, PteLoc, PteWrite, SubmissionId,
};
use hmm_core::mirror::format::{PoolSlot, Pte};

pub use hmm_core::cpu::host::HostSpace;
pub use hmm_core::mirror::backend::BackendError;
pub use hmm_core::mirror::params::{
    DevPtr, In, InOut, Param, ParamKind, Params, Ptr, PtrMut, Signature, Typed,
};
pub use hmm_core::mirror::{
    AccessError, Advice, CpuWrites, ForeignWriters, LaunchPhases, LaunchReport, Mirror,
    MirrorConfig, MirrorError, MirrorStats,
};
pub use hmm_core::notifier::EventKind;
pub use kernel::{CpuFn, DeviceField, DeviceStruct, KernelError, KernelSource, StructLayout};

pub mod kernel;

#[doc = include_str!("../../docs/GUIDE.md")]
pub mod guide {}
pub use hmm_core::{VaRange, VirtAddr};
pub use hmm_driver_cpu::{CpuDevice, CpuKernel, Lane, LaneFault};
#[cfg(feature = "vulkan")]
pub use hmm_driver_vulkan::{VulkanDevice, VulkanKernel};
#[cfg(feature = "wgpu")]
pub use hmm_driver_wgpu::{WgpuDevice, WgpuKernel};

/// Runs `$body` with `$d` bound to the wrapped driver of whichever variant
/// `$dev` is; arms for drivers this build leaves out do not exist.
macro_rules! on_device {
    ($dev:expr, $d:ident => $body:expr) => {
        match $dev {
            Device::Cpu($d) => $body,
            #[cfg(feature = "wgpu")]
            Device::Wgpu($d) => $body,
            #[cfg(feature = "vulkan")]
            Device::Vulkan($d) => $body,
        }
    };
}

/// A driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Driver {
    /// The reference driver: kernels are Rust closures on CPU threads,
    /// through the same page table and pool as a GPU.
    Cpu,
    /// A GPU (or lavapipe) through wgpu; kernels are WGSL.
    Wgpu,
    /// A Vulkan device (or lavapipe) through ash; kernels are the same
    /// WGSL, compiled to SPIR-V.
    Vulkan,
}

impl Driver {
    /// Every driver, best first (built into this crate or not: see
    /// [`Driver::is_built`]).
    pub const ALL: [Driver; 3] = [Driver::Wgpu, Driver::Vulkan, Driver::Cpu];

    /// Whether this build of `hmm` contains the driver (the `wgpu` and
    /// `vulkan` Cargo features, both on by default; `cpu` always).
    pub const fn is_built(self) -> bool {
        match self {
            Driver::Cpu => true,
            Driver::Wgpu => cfg!(feature = "wgpu"),
            Driver::Vulkan => cfg!(feature = "vulkan"),
        }
    }

    /// The Cargo feature of `hmm` that builds the driver (`None` for the
    /// cpu driver, which is always built).
    pub const fn feature(self) -> Option<&'static str> {
        match self {
            Driver::Cpu => None,
            Driver::Wgpu => Some("wgpu"),
            Driver::Vulkan => Some("vulkan"),
        }
    }

    /// The name used on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Cpu => "cpu",
            Driver::Wgpu => "wgpu",
            Driver::Vulkan => "vulkan",
        }
    }
}

/// A driver name that is not one of [`Driver::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown backend {0:?}: expected cpu, wgpu, vulkan or auto")]
pub struct UnknownDriver(pub String);

impl core::str::FromStr for Driver {
    type Err = UnknownDriver;
    fn from_str(s: &str) -> Result<Driver, UnknownDriver> {
        match s {
            "cpu" => Ok(Driver::Cpu),
            "wgpu" => Ok(Driver::Wgpu),
            "vulkan" => Ok(Driver::Vulkan),
            _ => Err(UnknownDriver(s.to_string())),
        }
    }
}

/// Parses a `--backend` value: `auto` (or nothing) means the best available.
pub fn parse_backend(s: Option<&str>) -> Result<Option<Driver>, UnknownDriver> {
    match s {
        None | Some("auto") => Ok(None),
        Some(s) => s.parse().map(Some),
    }
}

/// Why a requested driver could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The wgpu driver found no adapter.
    #[cfg(feature = "wgpu")]
    #[error(transparent)]
    Wgpu(#[from] hmm_driver_wgpu::OpenError),
    /// The vulkan driver found no usable device (or not the mode asked for).
    #[cfg(feature = "vulkan")]
    #[error(transparent)]
    Vulkan(#[from] hmm_driver_vulkan::OpenError),
    /// The driver exists in the project but this build of `hmm` leaves it
    /// out: rebuild with the named Cargo feature.
    #[error(
        "the {driver} driver is not built into this binary (enable hmm's `{feature}` feature)"
    )]
    NotBuilt {
        /// The driver asked for (its command-line name).
        driver: &'static str,
        /// The `hmm` feature that builds it.
        feature: &'static str,
    },
    /// The driver has no zero-copy mode ([`Device::open_zero_copy`]).
    #[error("the {0} driver has no zero-copy mode (the cpu and vulkan drivers do)")]
    NoZeroCopy(&'static str),
}

/// A device of any driver. Implements [`Backend`] by delegation.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process; boxing buys nothing
pub enum Device {
    /// The cpu driver.
    Cpu(CpuDevice),
    /// The wgpu driver.
    #[cfg(feature = "wgpu")]
    Wgpu(WgpuDevice),
    /// The vulkan driver.
    #[cfg(feature = "vulkan")]
    Vulkan(VulkanDevice),
}

/// An opened device and the line that says which one and why.
#[derive(Debug)]
pub struct Opened {
    /// The device.
    pub device: Device,
    /// E.g. `backend: wgpu (llvmpipe …), the best available`.
    pub note: String,
}

impl Device {
    /// Opens `driver`, or with `None` the best available: the vulkan
    /// driver if a device opens, else wgpu if an adapter opens, else the
    /// cpu driver (the note says why). Drivers this build leaves out are
    /// skipped by `None` (the note names them) and refused by name with
    /// [`OpenError::NotBuilt`].
    ///
    /// Why vulkan before wgpu, on evidence: every fault round is a
    /// submission, a wait and a read-back, and the vulkan driver's are
    /// cheaper. `cargo run --release -p hmm --example fault_service --
    /// vulkan|wgpu 1024` on one device (lavapipe, 2-core VM, 2026-12-06):
    /// one resident launch of 1 invocation (a replay round's floor) 92 µs
    /// on vulkan against 453 µs on wgpu, and 10 against 200 host µs per
    /// faulted page at fault batch 256. wgpu stays the fallback for
    /// adapters the vulkan driver cannot open.
    pub fn open(driver: Option<Driver>) -> Result<Opened, OpenError> {
        match driver {
            Some(Driver::Cpu) => Ok(Opened {
                note: "backend: cpu (as requested)".into(),
                device: Device::Cpu(CpuDevice::new()),
            }),
            Some(Driver::Wgpu) => open_wgpu().map(|(device, name)| Opened {
                note: format!("backend: wgpu on {name} (as requested)"),
                device,
            }),
            Some(Driver::Vulkan) => open_vulkan().map(|(device, what)| Opened {
                note: format!("backend: vulkan on {what}, as requested)"),
                device,
            }),
            None => match open_vulkan() {
                Ok((device, what)) => Ok(Opened {
                    note: format!(
                        "backend: vulkan on {what}; best available: a lower per-round cost than wgpu)"
                    ),
                    device,
                }),
                Err(ve) => match open_wgpu() {
                    Ok((device, name)) => Ok(Opened {
                        note: format!("backend: wgpu on {name} (vulkan driver: {ve})"),
                        device,
                    }),
                    Err(we) => Ok(Opened {
                        note: format!("backend: cpu (fallback: vulkan: {ve}; wgpu: {we})"),
                        device: Device::Cpu(CpuDevice::new()),
                    }),
                },
            },
        }
    }

    /// Opens `driver` (or, with `None`, the best driver that has one) in
    /// its **zero-copy mode**: the device reads and writes the CPU's own
    /// pages — nothing is copied in or written back (the `cpu` driver's
    /// [`CpuDevice::zero_copy`], the `vulkan` driver's
    /// `VK_EXT_external_memory_host` import). wgpu has no host-memory
    /// import: [`OpenError::NoZeroCopy`].
    ///
    /// # Safety
    ///
    /// Zero-copy mode's contract (`hmm_core::mirror`, "Zero-copy devices";
    /// CUDA's `cudaHostRegister` rule): while a launch runs, memory it may
    /// touch is not unmapped, not made inaccessible or read-only
    /// (`mprotect`), and not accessed non-atomically by other threads. A
    /// device that runs on the CPU (lavapipe, the cpu driver) would
    /// otherwise fault the process or race with it. Between launches
    /// unmaps, remaps and writes are fine, as in copy mode; an `mprotect`
    /// that narrows access to mirrored memory needs an explicit
    /// `Protection` invalidation of the range before the next launch (the
    /// kernel reports none).
    pub unsafe fn open_zero_copy(driver: Option<Driver>) -> Result<Opened, OpenError> {
        let vulkan = || -> Result<Opened, OpenError> {
            #[cfg(feature = "vulkan")]
            {
                // SAFETY: the caller's contract is the vulkan opt-in's.
                let d = unsafe { VulkanDevice::open_zero_copy() }?;
                Ok(Opened {
                    note: format!("backend: vulkan on {} (zero-copy mode)", d.device_name()),
                    device: Device::Vulkan(d),
                })
            }
            #[cfg(not(feature = "vulkan"))]
            Err(not_built(Driver::Vulkan))
        };
        let cpu = |why: String| Opened {
            note: format!("backend: cpu (zero-copy mode{why})"),
            // SAFETY: the caller's contract is the cpu driver's.
            device: Device::Cpu(unsafe { CpuDevice::new().zero_copy() }),
        };
        match driver {
            Some(Driver::Cpu) => Ok(cpu(", as requested".into())),
            Some(Driver::Vulkan) => vulkan(),
            Some(Driver::Wgpu) => Err(OpenError::NoZeroCopy("wgpu")),
            None => match vulkan() {
                Ok(o) => Ok(o),
                Err(e) => Ok(cpu(format!("; fallback: vulkan: {e}"))),
            },
        }
    }

    /// Which driver this is.
    pub fn driver(&self) -> Driver {
        match self {
            Device::Cpu(_) => Driver::Cpu,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(_) => Driver::Wgpu,
            #[cfg(feature = "vulkan")]
            Device::Vulkan(_) => Driver::Vulkan,
        }
    }
}

#[cfg(not(all(feature = "wgpu", feature = "vulkan")))]
fn not_built(driver: Driver) -> OpenError {
    OpenError::NotBuilt {
        driver: driver.name(),
        feature: driver.feature().unwrap_or("none"),
    }
}

/// The wgpu driver's device and adapter name.
fn open_wgpu() -> Result<(Device, String), OpenError> {
    #[cfg(feature = "wgpu")]
    {
        let d = WgpuDevice::open()?;
        let name = d.adapter_name().to_string();
        Ok((Device::Wgpu(d), name))
    }
    #[cfg(not(feature = "wgpu"))]
    Err(not_built(Driver::Wgpu))
}

/// The vulkan driver's device and "NAME (MODE mode" for the note.
fn open_vulkan() -> Result<(Device, String), OpenError> {
    #[cfg(feature = "vulkan")]
    {
        let d = VulkanDevice::open()?;
        let what = format!("{} ({:?} mode", d.device_name(), d.mode());
        Ok((Device::Vulkan(d), what))
    }
    #[cfg(not(feature = "vulkan"))]
    Err(not_built(Driver::Vulkan))
}

/// A kernel built for one [`Device`].
#[derive(Debug)]
pub enum Kernel {
    /// For the cpu driver.
    Cpu(CpuKernel),
    /// For the wgpu driver.
    #[cfg(feature = "wgpu")]
    Wgpu(WgpuKernel),
    /// For the vulkan driver.
    #[cfg(feature = "vulkan")]
    Vulkan(VulkanKernel),
}

/// A mirror of this process on `device`.
pub fn mirror(device: Device, cfg: MirrorConfig) -> Result<Mirror<Device>, MirrorError> {
    let host = Arc::new(HostSpace::new()?);
    Mirror::new(host, device, cfg)
}

fn mismatch() -> BackendError {
    BackendError::Kernel("kernel was built for another driver".into())
}

// SAFETY: every method delegates to the wrapped driver, whose own `Backend`
// implementation upholds the contract; nothing here touches host memory.
unsafe impl Backend for Device {
    type Kernel = Kernel;

    fn info(&self) -> BackendInfo {
        on_device!(self, d => d.info())
    }
    fn init(&self, config: DeviceConfig) -> Result<(), BackendError> {
        on_device!(self, d => d.init(config))
    }
    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError> {
        on_device!(self, d => {
            // SAFETY: the caller's guarantees are passed on unchanged.
            unsafe { d.copy_to_device(batch) }
        })
    }
    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError> {
        on_device!(self, d => {
            // SAFETY: the caller's guarantees are passed on unchanged.
            unsafe { d.copy_to_host(batch) }
        })
    }
    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError> {
        on_device!(self, d => d.write_ptes(batch))
    }
    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError> {
        on_device!(self, d => d.read_ptes(locs, out))
    }
    fn clear_pte_bits(
        &self,
        locs: &[PteLoc],
        bits: u64,
        old: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        on_device!(self, d => d.clear_pte_bits(locs, bits, old))
    }
    fn launch(
        &self,
        kernel: &Kernel,
        invocations: Invocations<'_>,
        args: &[u64],
    ) -> Result<SubmissionId, BackendError> {
        match (self, kernel) {
            (Device::Cpu(d), Kernel::Cpu(k)) => d.launch(k, invocations, args),
            #[cfg(feature = "wgpu")]
            (Device::Wgpu(d), Kernel::Wgpu(k)) => d.launch(k, invocations, args),
            #[cfg(feature = "vulkan")]
            (Device::Vulkan(d), Kernel::Vulkan(k)) => d.launch(k, invocations, args),
            // Only reachable when a GPU driver is built.
            #[allow(unreachable_patterns)]
            _ => Err(mismatch()),
        }
    }
    fn wait(
        &self,
        id: SubmissionId,
        timeout: Option<core::time::Duration>,
    ) -> Result<bool, BackendError> {
        on_device!(self, d => d.wait(id, timeout))
    }
    fn is_complete(&self, id: SubmissionId) -> bool {
        on_device!(self, d => d.is_complete(id))
    }
    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        on_device!(self, d => d.take_outcome(id))
    }
    fn max_invocations(&self) -> u32 {
        on_device!(self, d => d.max_invocations())
    }
    fn rounds_are_costly(&self) -> bool {
        on_device!(self, d => d.rounds_are_costly())
    }
    fn read_back_with_next_launch(&self, slots: &[PoolSlot]) {
        on_device!(self, d => d.read_back_with_next_launch(slots))
    }
    fn host_slot(&self, slot: PoolSlot) -> Option<core::ptr::NonNull<u8>> {
        on_device!(self, d => d.host_slot(slot))
    }
    fn host_windows(&self) -> Option<HostWindows> {
        on_device!(self, d => d.host_windows())
    }
    unsafe fn bind_window(
        &self,
        window: u32,
        addr: *mut u8,
        len: usize,
    ) -> Result<(), BackendError> {
        on_device!(self, d => {
            // SAFETY: the caller's guarantees are passed on unchanged.
            unsafe { d.bind_window(window, addr, len) }
        })
    }
    fn unbind_window(&self, window: u32) -> Result<(), BackendError> {
        on_device!(self, d => d.unbind_window(window))
    }
}
