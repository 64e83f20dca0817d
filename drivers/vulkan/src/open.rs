//! Instance and device selection, validation layers, and the shared
//! Vulkan context every other object keeps alive.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use ash::vk;
use hmm_core::mirror::backend::HostWindows;

use crate::device::VulkanDevice;
use crate::validation::{on_message, Validation};

/// The Khronos validation layer (Debian: `vulkan-validationlayers`).
pub const VALIDATION_LAYER: &CStr = c"VK_LAYER_KHRONOS_validation";

/// How the device sees mirrored memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Device-private pool pages: mirrored pages are copied into the pool
    /// and dirty ones copied back (the default; works everywhere).
    #[default]
    Copy,
    /// The device reads and writes the CPU's own pages, imported with
    /// `VK_EXT_external_memory_host` into host windows
    /// ([`Backend::host_windows`](hmm_core::mirror::backend::Backend::host_windows)).
    /// Opening in this mode needs the caller's `unsafe` opt-in
    /// ([`OpenOptions::zero_copy`], [`ZeroCopyOptIn`]); without it, or
    /// without the extension, opening fails with a typed error. See the
    /// [crate docs](crate#zero-copy-mode).
    ZeroCopy,
}

/// The caller's acceptance of zero-copy mode's contract: proof, for
/// [`OpenOptions::zero_copy_opt_in`], that whoever opens the device took
/// the `unsafe` step ([`ZeroCopyOptIn::new`]). Without it a device whose
/// mode comes out as [`Mode::ZeroCopy`] (from [`OpenOptions::mode`] or
/// `HMM_VK_MODE=zero-copy`) is refused with
/// [`OpenError::ZeroCopyNotOptedIn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroCopyOptIn(());

impl ZeroCopyOptIn {
    /// Accepts zero-copy mode's contract for every device opened with it.
    ///
    /// # Safety
    ///
    /// The `cudaHostRegister` rule: memory that a launch on a zero-copy
    /// device may touch — every page the mirror may map for it, i.e. the
    /// memory its pointer arguments reach — must not be unmapped (`munmap`,
    /// `mremap` away, a `MAP_FIXED` over it, or freed back to the system
    /// by an allocator) while that launch may still run. A device that
    /// dereferences the imported host pointer itself (Mesa's lavapipe, any
    /// `PHYSICAL_DEVICE_TYPE_CPU` device) would otherwise fault the whole
    /// process; the mirror learns of an unmap only after it happened, too
    /// late to stop the kernel. (A GPU whose driver pins imported pages
    /// merely keeps reading the old pages.) Memory the launch may write
    /// must also be writable for as long. Between launches, an `mprotect`
    /// that narrows access to mirrored memory needs an explicit
    /// `EventKind::Protection` invalidation of the range before the next
    /// launch: the kernel reports none, and the device's entries would
    /// still allow the old access.
    pub unsafe fn new() -> ZeroCopyOptIn {
        ZeroCopyOptIn(())
    }
}

/// How to pick and open the device.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Use only a device whose name contains this (case-insensitive).
    /// Default: the `HMM_VK_DEVICE` environment variable, else the first
    /// discrete GPU, then integrated, virtual, CPU (lavapipe) device.
    pub device_name: Option<String>,
    /// Copy or zero-copy mirroring. Default: the `HMM_VK_MODE`
    /// environment variable (`copy` or `zero-copy`), else copy. Any other
    /// value of the variable is an [`OpenError::BadMode`].
    pub mode: Option<Mode>,
    /// Enable `VK_LAYER_KHRONOS_validation` with a messenger recording
    /// every error ([`VulkanDevice::validation_errors`]). Default: the
    /// `HMM_VK_VALIDATION=1` environment variable. Requested but not
    /// installed is an [`OpenError::NoValidationLayer`].
    pub validation: Option<bool>,
    /// Keep the pool and page table in memory the host never maps, going
    /// through a staging buffer and `vkCmdCopyBuffer` as on a discrete GPU
    /// without host-visible device memory. On devices where all memory is
    /// host-visible (lavapipe, integrated GPUs) this is how the staging
    /// path gets tested.
    pub force_staging: bool,
    /// Permission to open in [`Mode::ZeroCopy`]: without it, a mode that
    /// comes out as zero-copy (from `mode` or from `HMM_VK_MODE`) is an
    /// [`OpenError::ZeroCopyNotOptedIn`]. With it, the mode is still
    /// `mode` or the environment's: a harness that honours
    /// `HMM_VK_MODE` sets this (an `unsafe` step, [`ZeroCopyOptIn::new`])
    /// and leaves `mode` at `None`. [`OpenOptions::zero_copy`] sets both.
    pub zero_copy_opt_in: Option<ZeroCopyOptIn>,
    /// Zero-copy mode: how many host windows (pool bindings) kernels get;
    /// default [`DEFAULT_WINDOWS`], at most what the device's binding
    /// limits allow (29 on lavapipe). Fewer is faster per access (a kernel
    /// selects its binding with a `switch` over them, which lavapipe runs
    /// arm by arm); more lets a launch use more regions at once.
    pub zero_copy_windows: Option<u32>,
    /// Zero-copy mode: pages per host window (a region's largest size);
    /// default [`DEFAULT_WINDOW_PAGES`] (32 MiB), rounded down to a power
    /// of two one storage binding holds. Larger windows cover more memory
    /// with few bindings; on a GPU that pins imports, each region pins
    /// that much of the CPU mapping at once.
    pub zero_copy_window_pages: Option<u32>,
}

impl OpenOptions {
    /// These options in [`Mode::ZeroCopy`], with the opt-in.
    ///
    /// # Safety
    ///
    /// The contract of [`ZeroCopyOptIn::new`]: memory a launch on the
    /// device may touch must not be unmapped while the launch may run.
    #[must_use]
    pub unsafe fn zero_copy(self) -> OpenOptions {
        OpenOptions {
            mode: Some(Mode::ZeroCopy),
            // SAFETY: this function's contract is the opt-in's.
            zero_copy_opt_in: Some(unsafe { ZeroCopyOptIn::new() }),
            ..self
        }
    }
}

/// Why no device could be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No Vulkan loader (`libvulkan.so.1`).
    #[error(
        "no Vulkan loader ({0}); on Debian/Ubuntu `apt-get install libvulkan1 mesa-vulkan-drivers`"
    )]
    NoLoader(String),
    /// The loader found no usable device.
    #[error("no usable Vulkan device: {0}; on Debian/Ubuntu `apt-get install mesa-vulkan-drivers` provides lavapipe")]
    NoDevice(String),
    /// Validation was requested but the layer is not installed.
    #[error("validation requested but {VALIDATION_LAYER:?} is not installed (Debian: `apt-get install vulkan-validationlayers`)")]
    NoValidationLayer,
    /// `HMM_VK_MODE` is neither `copy` nor `zero-copy`.
    #[error("HMM_VK_MODE={0:?}: expected copy or zero-copy")]
    BadMode(String),
    /// Zero-copy mode was asked for (`mode`, or `HMM_VK_MODE=zero-copy`)
    /// without the caller's `unsafe` opt-in ([`OpenOptions::zero_copy`],
    /// [`OpenOptions::zero_copy_opt_in`]).
    #[error(
        "zero-copy mode needs the caller's unsafe opt-in (OpenOptions::zero_copy or \
         zero_copy_opt_in; memory a launch may touch must not be unmapped while it runs); \
         HMM_VK_MODE=zero-copy alone does not open it"
    )]
    ZeroCopyNotOptedIn,
    /// The chosen device lacks something the requested mode needs.
    #[error("device {device} does not support {what}")]
    Unsupported {
        /// The device, in words.
        device: String,
        /// What is missing.
        what: String,
    },
    /// A Vulkan call failed.
    #[error("{what}: {result}")]
    Vk {
        /// The call.
        what: &'static str,
        /// Its result.
        result: vk::Result,
    },
}

fn vkerr(what: &'static str) -> impl Fn(vk::Result) -> OpenError {
    move |result| OpenError::Vk { what, result }
}

/// The instance, the logical device and what was learned about it. Shared
/// (`Arc`) by every object that must destroy Vulkan handles, so the device
/// outlives them all.
pub(crate) struct Ctx {
    _entry: ash::Entry,
    instance: ash::Instance,
    debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    pub(crate) validation: Option<Box<Validation>>,
    pub(crate) device: ash::Device,
    pub(crate) mem_props: vk::PhysicalDeviceMemoryProperties,
    pub(crate) limits: vk::PhysicalDeviceLimits,
    pub(crate) queue_family: u32,
    /// The device, in words.
    pub(crate) name: String,
    /// `sparseBinding` and `sparseResidencyBuffer`, probed.
    pub(crate) sparse: (bool, bool),
    /// `minImportedHostPointerAlignment` when the device supports
    /// `VK_EXT_external_memory_host` (probed in either mode; enabled in
    /// zero-copy mode only).
    pub(crate) host_import: Option<u64>,
    /// Zero-copy mode: the extension's functions and the host windows.
    pub(crate) zero_copy: Option<ZeroCopyCtx>,
    pub(crate) force_staging: bool,
    pub(crate) mode: Mode,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: every object created from the device holds an `Arc<Ctx>`,
        // so none is left when this runs; waiting idle first makes the
        // destruction legal even if work were still queued.
        unsafe {
            let _ = self.device.device_wait_idle();
            self.device.destroy_device(None);
        }
        if let Some((loader, messenger)) = self.debug.take() {
            // SAFETY: the messenger was created from this instance and is
            // destroyed once, before the instance.
            unsafe { loader.destroy_debug_utils_messenger(messenger, None) };
        }
        // SAFETY: the device and messenger, the instance's only children,
        // are gone.
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// What zero-copy mode learned and loaded at open.
pub(crate) struct ZeroCopyCtx {
    /// `VK_EXT_external_memory_host`'s device functions.
    pub(crate) ext: ash::ext::external_memory_host::Device,
    /// `minImportedHostPointerAlignment`.
    pub(crate) align: u64,
    /// Windows (= pool bindings) and pages per window.
    pub(crate) windows: HostWindows,
}

/// Pages per host window: `want` (a power of two, at least 512 so the
/// core's 2 MiB regions fit), rounded down to a power of two that one
/// storage binding holds (`maxStorageBufferRange`, at least 128 MiB on a
/// conformant device).
pub(crate) fn window_pages(limits: &vk::PhysicalDeviceLimits, want: u32) -> u32 {
    let fit =
        (u64::from(limits.max_storage_buffer_range) / 4096).clamp(1, u64::from(want.max(1))) as u32;
    1 << (31 - fit.leading_zeros())
}

/// Host windows a kernel can bind besides params, page table, control
/// and replay: each of them is a pool binding of the composed kernel.
pub(crate) fn window_count(limits: &vk::PhysicalDeviceLimits) -> u32 {
    let other_storage = binding_count_besides_pool() - 1; // minus the uniform
    hmm_shaders::MAX_POOL_BINDINGS
        .min(
            limits
                .max_per_stage_descriptor_storage_buffers
                .saturating_sub(other_storage),
        )
        .min(
            limits
                .max_descriptor_set_storage_buffers
                .saturating_sub(other_storage),
        )
        .min(
            limits
                .max_per_stage_resources
                .saturating_sub(binding_count_besides_pool()),
        )
}

/// Host windows a zero-copy device offers unless told otherwise
/// ([`OpenOptions::zero_copy_windows`]).
pub const DEFAULT_WINDOWS: u32 = 8;
/// Pages per host window unless told otherwise
/// ([`OpenOptions::zero_copy_window_pages`]): 32 MiB.
pub const DEFAULT_WINDOW_PAGES: u32 = 8192;

/// Bindings of a kernel before the pool: params, table, control, replay.
const fn binding_count_besides_pool() -> u32 {
    hmm_shaders::binding::POOL0
}

fn device_kind_rank(t: vk::PhysicalDeviceType) -> u32 {
    match t {
        vk::PhysicalDeviceType::DISCRETE_GPU => 0,
        vk::PhysicalDeviceType::INTEGRATED_GPU => 1,
        vk::PhysicalDeviceType::VIRTUAL_GPU => 2,
        vk::PhysicalDeviceType::CPU => 3,
        _ => 4,
    }
}

fn env_on(name: &str) -> bool {
    std::env::var(name).as_deref() == Ok("1")
}

impl VulkanDevice {
    /// Opens the preferred device in copy mode (validation per
    /// `HMM_VK_VALIDATION`).
    pub fn open() -> Result<VulkanDevice, OpenError> {
        Self::open_with(&OpenOptions::default())
    }

    /// Opens the preferred device in zero-copy mode (validation per
    /// `HMM_VK_VALIDATION`): [`OpenOptions::zero_copy`] of the defaults.
    ///
    /// # Safety
    ///
    /// The contract of [`ZeroCopyOptIn::new`]: memory a launch on the
    /// device may touch must not be unmapped while the launch may run.
    pub unsafe fn open_zero_copy() -> Result<VulkanDevice, OpenError> {
        // SAFETY: this function's contract is the opt-in's.
        Self::open_with(&unsafe { OpenOptions::default().zero_copy() })
    }

    /// Opens a device chosen by `opts`.
    pub fn open_with(opts: &OpenOptions) -> Result<VulkanDevice, OpenError> {
        let ctx = open_ctx(opts)?;
        VulkanDevice::new(Arc::new(ctx)).map_err(|e| OpenError::NoDevice(e.to_string()))
    }
}

fn open_ctx(opts: &OpenOptions) -> Result<Ctx, OpenError> {
    let mode = match opts.mode {
        Some(m) => m,
        None => Mode::from_env()?,
    };
    if mode == Mode::ZeroCopy && opts.zero_copy_opt_in.is_none() {
        return Err(OpenError::ZeroCopyNotOptedIn);
    }
    // SAFETY: loads the system Vulkan loader; its initialisation has no
    // preconditions beyond being a well-formed library.
    let entry = unsafe { ash::Entry::load() }.map_err(|e| OpenError::NoLoader(e.to_string()))?;
    let validation_on = opts
        .validation
        .unwrap_or_else(|| env_on("HMM_VK_VALIDATION"));
    let validation = validation_on.then(|| Box::new(Validation::default()));
    let mut layers: Vec<*const std::ffi::c_char> = Vec::new();
    let mut exts: Vec<*const std::ffi::c_char> = Vec::new();
    if validation_on {
        // SAFETY: a plain query of the loader.
        let have = unsafe { entry.enumerate_instance_layer_properties() }
            .map_err(vkerr("vkEnumerateInstanceLayerProperties"))?;
        if !have
            .iter()
            .any(|l| l.layer_name_as_c_str().ok() == Some(VALIDATION_LAYER))
        {
            return Err(OpenError::NoValidationLayer);
        }
        layers.push(VALIDATION_LAYER.as_ptr());
        exts.push(ash::ext::debug_utils::NAME.as_ptr());
    }
    let app = vk::ApplicationInfo::default()
        .application_name(c"hmm-rs")
        .api_version(vk::API_VERSION_1_2);
    let user = validation.as_deref().map_or(std::ptr::null_mut(), |v| {
        v as *const Validation as *mut c_void
    });
    let mut messenger_info = vk::DebugUtilsMessengerCreateInfoEXT::default()
        .message_severity(
            vk::DebugUtilsMessageSeverityFlagsEXT::ERROR
                | vk::DebugUtilsMessageSeverityFlagsEXT::WARNING,
        )
        .message_type(
            vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                | vk::DebugUtilsMessageTypeFlagsEXT::GENERAL
                | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE,
        )
        .pfn_user_callback(Some(on_message))
        .user_data(user);
    let mut info = vk::InstanceCreateInfo::default()
        .application_info(&app)
        .enabled_layer_names(&layers)
        .enabled_extension_names(&exts);
    if validation_on {
        // Also report messages from instance creation itself.
        info = info.push_next(&mut messenger_info);
    }
    // SAFETY: `info` and everything it points to live across the call.
    let instance = unsafe { entry.create_instance(&info, None) }.map_err(|r| {
        if r == vk::Result::ERROR_INCOMPATIBLE_DRIVER {
            OpenError::NoDevice("no Vulkan 1.2 driver (ERROR_INCOMPATIBLE_DRIVER)".into())
        } else {
            OpenError::Vk {
                what: "vkCreateInstance",
                result: r,
            }
        }
    })?;
    // From here on, `Guard` destroys the instance on early return.
    struct Guard(Option<ash::Instance>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(i) = self.0.take() {
                // SAFETY: nothing created from the instance survives an
                // early return (the messenger is destroyed before it).
                unsafe { i.destroy_instance(None) };
            }
        }
    }
    let mut guard = Guard(Some(instance.clone()));
    let debug = if validation_on {
        let loader = ash::ext::debug_utils::Instance::new(&entry, &instance);
        // SAFETY: `messenger_info` is valid; its user data outlives the
        // messenger (boxed in the returned Ctx, destroyed after it).
        let m = unsafe { loader.create_debug_utils_messenger(&messenger_info, None) }
            .map_err(vkerr("vkCreateDebugUtilsMessengerEXT"))?;
        Some((loader, m))
    } else {
        None
    };
    let destroy_debug =
        |debug: &Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>| {
            if let Some((l, m)) = debug {
                // SAFETY: created above from this instance, destroyed once.
                unsafe { l.destroy_debug_utils_messenger(*m, None) };
            }
        };
    match select_and_create(&instance, opts, mode) {
        Ok(d) => {
            guard.0 = None;
            Ok(Ctx {
                _entry: entry,
                instance,
                debug,
                validation,
                device: d.device,
                mem_props: d.mem_props,
                limits: d.limits,
                queue_family: d.queue_family,
                name: d.name,
                sparse: d.sparse,
                host_import: d.host_import,
                zero_copy: d.zero_copy,
                force_staging: opts.force_staging,
                mode,
            })
        }
        Err(e) => {
            destroy_debug(&debug);
            Err(e)
        }
    }
}

struct Selected {
    device: ash::Device,
    mem_props: vk::PhysicalDeviceMemoryProperties,
    limits: vk::PhysicalDeviceLimits,
    queue_family: u32,
    name: String,
    sparse: (bool, bool),
    host_import: Option<u64>,
    zero_copy: Option<ZeroCopyCtx>,
}

fn select_and_create(
    instance: &ash::Instance,
    opts: &OpenOptions,
    mode: Mode,
) -> Result<Selected, OpenError> {
    let want = opts
        .device_name
        .clone()
        .or_else(|| std::env::var("HMM_VK_DEVICE").ok())
        .map(|s| s.to_lowercase());
    // SAFETY: a plain query of a valid instance.
    let pds = unsafe { instance.enumerate_physical_devices() }
        .map_err(vkerr("vkEnumeratePhysicalDevices"))?;
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for pd in pds {
        // SAFETY: `pd` was enumerated from this instance.
        let props = unsafe { instance.get_physical_device_properties(pd) };
        let name = props
            .device_name_as_c_str()
            .map_or_else(|_| "?".into(), |n| n.to_string_lossy().into_owned());
        if want
            .as_ref()
            .is_some_and(|w| !name.to_lowercase().contains(w))
        {
            rejected.push(format!("{name}: not named like {want:?}"));
            continue;
        }
        if props.api_version < vk::API_VERSION_1_2 {
            rejected.push(format!(
                "{name}: Vulkan {}.{} < 1.2",
                vk::api_version_major(props.api_version),
                vk::api_version_minor(props.api_version)
            ));
            continue;
        }
        // SAFETY: as above.
        let families = unsafe { instance.get_physical_device_queue_family_properties(pd) };
        let Some(qf) = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
        else {
            rejected.push(format!("{name}: no compute queue"));
            continue;
        };
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut v12);
        // SAFETY: `f2` chains only structures this Vulkan 1.2 device knows.
        unsafe { instance.get_physical_device_features2(pd, &mut f2) };
        let features = f2.features;
        if v12.timeline_semaphore == vk::FALSE {
            rejected.push(format!("{name}: no timelineSemaphore"));
            continue;
        }
        candidates.push((
            device_kind_rank(props.device_type),
            pd,
            props,
            qf as u32,
            name,
            features,
        ));
    }
    candidates.sort_by_key(|c| c.0);
    let Some((_, pd, props, qf, name, features)) = candidates.into_iter().next() else {
        return Err(OpenError::NoDevice(if rejected.is_empty() {
            "the loader lists no physical device".into()
        } else {
            rejected.join("; ")
        }));
    };
    // SAFETY: a plain query of the chosen physical device.
    let dev_exts = unsafe { instance.enumerate_device_extension_properties(pd) }
        .map_err(vkerr("vkEnumerateDeviceExtensionProperties"))?;
    let has_ext = |n: &CStr| {
        dev_exts
            .iter()
            .any(|e| e.extension_name_as_c_str().ok() == Some(n))
    };
    let host_ext = has_ext(ash::ext::external_memory_host::NAME);
    let mut host_align = None;
    if host_ext {
        let mut hp = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut hp);
        // SAFETY: the extension is supported, so its property struct may
        // be chained.
        unsafe { instance.get_physical_device_properties2(pd, &mut p2) };
        host_align = Some(hp.min_imported_host_pointer_alignment);
    }
    let mut ext_names: Vec<*const std::ffi::c_char> = Vec::new();
    let mut windows = None;
    if mode == Mode::ZeroCopy {
        let Some(align) = host_align else {
            return Err(OpenError::Unsupported {
                device: name,
                what: "VK_EXT_external_memory_host, which zero-copy mirroring needs".into(),
            });
        };
        let count =
            window_count(&props.limits).min(opts.zero_copy_windows.unwrap_or(DEFAULT_WINDOWS));
        if count == 0 {
            return Err(OpenError::Unsupported {
                device: name,
                what: format!(
                    "zero-copy mirroring: no storage-buffer binding is left for a host window \
                     (maxPerStageDescriptorStorageBuffers {}, maxDescriptorSetStorageBuffers {}, \
                     maxPerStageResources {})",
                    props.limits.max_per_stage_descriptor_storage_buffers,
                    props.limits.max_descriptor_set_storage_buffers,
                    props.limits.max_per_stage_resources
                ),
            });
        }
        let pages = window_pages(
            &props.limits,
            opts.zero_copy_window_pages.unwrap_or(DEFAULT_WINDOW_PAGES),
        );
        // The mirror's regions are page-aligned (a mapping clipped to a
        // window-sized block): a coarser import granularity would make
        // their imports fail at the first fault instead of here.
        if align == 0 || !align.is_power_of_two() || align > 4096 {
            return Err(OpenError::Unsupported {
                device: name,
                what: format!(
                    "zero-copy mirroring: minImportedHostPointerAlignment {align} (hmm-rs \
                     imports page-aligned regions: 4096 at most)"
                ),
            });
        }
        ext_names.push(ash::ext::external_memory_host::NAME.as_ptr());
        windows = Some((align, HostWindows { count, pages }));
    }
    let prio = [1.0f32];
    let queues = [vk::DeviceQueueCreateInfo::default()
        .queue_family_index(qf)
        .queue_priorities(&prio)];
    let mut v12 = vk::PhysicalDeviceVulkan12Features::default().timeline_semaphore(true);
    let info = vk::DeviceCreateInfo::default()
        .queue_create_infos(&queues)
        .enabled_extension_names(&ext_names)
        .push_next(&mut v12);
    // SAFETY: `info` and what it points to live across the call; the
    // requested feature and extensions were checked above.
    let device =
        unsafe { instance.create_device(pd, &info, None) }.map_err(vkerr("vkCreateDevice"))?;
    let zero_copy = windows.map(|(align, windows)| ZeroCopyCtx {
        ext: ash::ext::external_memory_host::Device::new(instance, &device),
        align,
        windows,
    });
    // SAFETY: a plain query of the chosen physical device.
    let mem_props = unsafe { instance.get_physical_device_memory_properties(pd) };
    let kind = format!("{:?}", props.device_type);
    Ok(Selected {
        device,
        mem_props,
        limits: props.limits,
        queue_family: qf,
        name: format!(
            "{name} ({kind}, Vulkan {}.{})",
            vk::api_version_major(props.api_version),
            vk::api_version_minor(props.api_version)
        ),
        sparse: (
            features.sparse_binding == vk::TRUE,
            features.sparse_residency_buffer == vk::TRUE,
        ),
        host_import: host_align,
        zero_copy,
    })
}

impl Mode {
    /// The mode `HMM_VK_MODE` asks for (`copy`, `zero-copy`), else copy.
    /// A zero-copy answer opens a device only with the caller's opt-in
    /// ([`OpenOptions::zero_copy_opt_in`]); otherwise opening is
    /// [`OpenError::ZeroCopyNotOptedIn`].
    pub fn from_env() -> Result<Mode, OpenError> {
        std::env::var("HMM_VK_MODE").map_or(Ok(Mode::Copy), |v| Mode::parse(&v))
    }

    /// `copy` (or empty) or `zero-copy`.
    pub fn parse(v: &str) -> Result<Mode, OpenError> {
        match v {
            "" | "copy" => Ok(Mode::Copy),
            "zero-copy" | "zerocopy" => Ok(Mode::ZeroCopy),
            _ => Err(OpenError::BadMode(v.to_string())),
        }
    }
}

/// A device for tests, opened with `opts`: `Some` when a device opens;
/// otherwise prints a skip line naming why and returns `None` — unless
/// `HMM_REQUIRE_GPU=1`, which turns a missing device into a test failure
/// (CI sets it).
pub fn test_device_with(opts: &OpenOptions) -> Option<VulkanDevice> {
    hmm_conformance::skip::open_or_skip(
        "no Vulkan device opened",
        "HMM_REQUIRE_GPU",
        VulkanDevice::open_with(opts),
    )
}

/// [`test_device_with`] the default options (copy mode).
pub fn test_device() -> Option<VulkanDevice> {
    test_device_with(&OpenOptions::default())
}

/// A zero-copy device for tests ([`VulkanDevice::open_zero_copy`]):
/// `None` with a skip line when no device opens (a failure under
/// `HMM_REQUIRE_GPU=1`) or when the device lacks what zero-copy needs
/// ([`OpenError::Unsupported`]; a failure under
/// `HMM_REQUIRE_ZERO_COPY=1`).
///
/// # Safety
///
/// The contract of [`ZeroCopyOptIn::new`]: memory a launch on the device
/// may touch must not be unmapped while the launch may run — a test must
/// keep its mappings alive until its launches completed.
pub unsafe fn test_device_zero_copy() -> Option<VulkanDevice> {
    // SAFETY: this function's contract is the opt-in's.
    let opened = unsafe { VulkanDevice::open_zero_copy() };
    let require = match &opened {
        Err(OpenError::Unsupported { .. }) => "HMM_REQUIRE_ZERO_COPY",
        _ => "HMM_REQUIRE_GPU",
    };
    hmm_conformance::skip::open_or_skip("no zero-copy Vulkan device", require, opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmm_vk_mode_values() {
        assert_eq!(Mode::parse("copy").ok(), Some(Mode::Copy));
        assert_eq!(Mode::parse("").ok(), Some(Mode::Copy));
        assert_eq!(Mode::parse("zero-copy").ok(), Some(Mode::ZeroCopy));
        let e = Mode::parse("zero").expect_err("not a mode");
        assert_eq!(
            e.to_string(),
            "HMM_VK_MODE=\"zero\": expected copy or zero-copy"
        );
    }
}
