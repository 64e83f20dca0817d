//! Finding an adapter and opening a device.

use crate::device::WgpuDevice;
use crate::errors::Shared;

/// Why no device could be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// wgpu found no adapter (no Vulkan driver: on Debian, lavapipe is in
    /// `mesa-vulkan-drivers`).
    #[error("no GPU adapter found by wgpu ({0}); on Debian/Ubuntu `apt-get install mesa-vulkan-drivers` provides lavapipe")]
    NoAdapter(String),
    /// The adapter refused to open a device.
    #[error("adapter {adapter} could not open a device: {why}")]
    Device {
        /// The adapter, in words.
        adapter: String,
        /// wgpu's reason.
        why: String,
    },
}

/// How to pick the adapter.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Use only an adapter whose name contains this (case-insensitive).
    /// Default: the `HMM_WGPU_ADAPTER` environment variable, else the
    /// high-performance adapter wgpu prefers.
    pub adapter_name: Option<String>,
}

impl WgpuDevice {
    /// Opens the preferred adapter.
    pub fn open() -> Result<WgpuDevice, OpenError> {
        Self::open_with(&OpenOptions::default())
    }

    /// Opens an adapter chosen by `opts`.
    pub fn open_with(opts: &OpenOptions) -> Result<WgpuDevice, OpenError> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::VULKAN;
        let instance = wgpu::Instance::new(desc);
        let want = opts
            .adapter_name
            .clone()
            .or_else(|| std::env::var("HMM_WGPU_ADAPTER").ok())
            .map(|s| s.to_lowercase());
        let adapter = match &want {
            Some(name) => pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN))
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(name))
                .ok_or_else(|| OpenError::NoAdapter(format!("none named like {name:?}")))?,
            None => pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            }))
            .map_err(|e| OpenError::NoAdapter(e.to_string()))?,
        };
        let info = adapter.get_info();
        let named = format!("{} ({:?}, {:?})", info.name, info.device_type, info.backend);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("hmm-rs"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| OpenError::Device {
            adapter: named.clone(),
            why: e.to_string(),
        })?;
        let shared = Shared::attach(&device);
        Ok(WgpuDevice::new(device, queue, named, limits, shared))
    }
}

/// A device for tests: `Some` when an adapter opens; otherwise prints a
/// skip line naming why and returns `None` — unless `HMM_REQUIRE_GPU=1`,
/// which turns a missing adapter into a test failure (CI sets it).
pub fn test_device() -> Option<WgpuDevice> {
    match WgpuDevice::open() {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("HMM_REQUIRE_GPU").as_deref() != Ok("1"),
                "HMM_REQUIRE_GPU=1 but no wgpu device: {e}"
            );
            eprintln!("skip: no wgpu device: {e}");
            None
        }
    }
}
