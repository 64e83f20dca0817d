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
        let instance = compute_instance().unwrap_or_else(|_| {
            // No loader we can open ourselves: wgpu's own instance (it
            // reports the missing adapter the usual way).
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
            desc.backends = wgpu::Backends::VULKAN;
            wgpu::Instance::new(desc)
        });
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

/// A wgpu instance for compute only. `wgpu::Instance::new` enables every
/// window-system surface extension the loader offers (xlib, xcb, wayland,
/// …) whether or not anything will be presented, and Mesa's device-select
/// layer reacts to the Wayland one by connecting to a display — on a root
/// shell without `XDG_RUNTIME_DIR` libwayland then prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` for
/// every instance, which a newcomer reads as a failure (issue #18). This
/// instance is created here with no surface extension (only
/// `VK_KHR_get_physical_device_properties2`, which wgpu-hal uses when
/// offered) and handed to wgpu through its HAL. A library cannot set the
/// variable instead: `set_var` in a multithreaded process is undefined
/// behaviour.
fn compute_instance() -> Result<wgpu::Instance, String> {
    use ash::vk;
    use wgpu::hal::{api::Vulkan, vulkan};
    // SAFETY: loads the system's Vulkan loader library; its initialisation
    // has no preconditions we could violate, and `entry` keeps it loaded
    // for as long as the instance (which owns `entry`) lives.
    let entry = unsafe { ash::Entry::load() }.map_err(|e| e.to_string())?;
    // SAFETY: a global query; no preconditions.
    let version = unsafe { entry.try_enumerate_instance_version() }
        .ok()
        .flatten()
        .unwrap_or(vk::API_VERSION_1_0);
    let api = version.min(vk::API_VERSION_1_3);
    // SAFETY: a global query; no preconditions.
    let available = unsafe { entry.enumerate_instance_extension_properties(None) }
        .map_err(|e| e.to_string())?;
    let p2 = ash::khr::get_physical_device_properties2::NAME;
    let extensions: Vec<&'static std::ffi::CStr> = available
        .iter()
        .any(|e| e.extension_name_as_c_str() == Ok(p2))
        .then_some(p2)
        .into_iter()
        .collect();
    let names: Vec<*const std::ffi::c_char> = extensions.iter().map(|e| e.as_ptr()).collect();
    let app = vk::ApplicationInfo::default()
        .application_name(c"hmm-rs")
        .api_version(api);
    let info = vk::InstanceCreateInfo::default()
        .application_info(&app)
        .enabled_extension_names(&names);
    // SAFETY: `info` and everything it points to (`app`, `names`, the
    // static extension names) outlive the call; no allocator callbacks.
    let raw = unsafe { entry.create_instance(&info, None) }.map_err(|e| e.to_string())?;
    // SAFETY: `raw` was created from `entry` with API version `api` and
    // exactly `extensions` enabled, as `from_raw` requires; with no drop
    // callback wgpu-hal owns `raw` and destroys it when the instance goes.
    let hal = unsafe {
        vulkan::Instance::from_raw(
            entry,
            raw,
            api,
            0,
            None,
            extensions,
            wgpu::InstanceFlags::empty(),
            Default::default(),
            false,
            None,
        )
    }
    .map_err(|e| e.to_string())?;
    // SAFETY: a HAL instance of the Vulkan backend this wgpu is built with.
    Ok(unsafe { wgpu::Instance::from_hal::<Vulkan>(hal) })
}

/// A device for tests: `Some` when an adapter opens; otherwise prints a
/// skip line naming why and returns `None` — unless `HMM_REQUIRE_GPU=1`,
/// which turns a missing adapter into a test failure (CI sets it).
pub fn test_device() -> Option<WgpuDevice> {
    hmm_conformance::skip::open_or_skip("no wgpu device", "HMM_REQUIRE_GPU", WgpuDevice::open())
}
