//! Kernels: the shared WGSL library plus a kernel, compiled to SPIR-V by
//! naga, built into compute pipelines.

use std::sync::Arc;

use ash::vk;
use hmm_core::mirror::backend::BackendError;

use crate::mem::vk_err;
use crate::open::Ctx;
use crate::VulkanDevice;

/// A descriptor-set layout and the pipeline layout over it; destroyed when
/// the last pipeline or device using them is gone.
pub(crate) struct Layouts {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) set: vk::DescriptorSetLayout,
    pub(crate) pipeline: vk::PipelineLayout,
}

impl Layouts {
    /// `uniform` at binding 0 (if `uniform0`), storage buffers at the rest
    /// of `0..bindings`.
    pub(crate) fn new(ctx: &Arc<Ctx>, bindings: u32) -> Result<Layouts, BackendError> {
        let entries: Vec<_> = (0..bindings)
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(if b == 0 {
                        vk::DescriptorType::UNIFORM_BUFFER
                    } else {
                        vk::DescriptorType::STORAGE_BUFFER
                    })
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let d = &ctx.device;
        // SAFETY: valid create info; destroyed in Drop.
        let set = unsafe {
            d.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&entries),
                None,
            )
        }
        .map_err(vk_err("vkCreateDescriptorSetLayout"))?;
        let sets = [set];
        // SAFETY: valid create info over a live set layout.
        let pipeline = match unsafe {
            d.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default().set_layouts(&sets),
                None,
            )
        } {
            Ok(p) => p,
            Err(r) => {
                // SAFETY: the set layout has no other user.
                unsafe { d.destroy_descriptor_set_layout(set, None) };
                return Err(vk_err("vkCreatePipelineLayout")(r));
            }
        };
        Ok(Layouts {
            ctx: Arc::clone(ctx),
            set,
            pipeline,
        })
    }
}

impl Drop for Layouts {
    fn drop(&mut self) {
        // SAFETY: every pipeline built over these layouts holds an `Arc` to
        // them, so none is left; destroyed once.
        unsafe {
            self.ctx.device.destroy_pipeline_layout(self.pipeline, None);
            self.ctx
                .device
                .destroy_descriptor_set_layout(self.set, None);
        }
    }
}

/// A compute pipeline; destroyed when the last holder (kernel handle or
/// in-flight submission) lets go.
pub(crate) struct Pipeline {
    pub(crate) layouts: Arc<Layouts>,
    pub(crate) pipeline: vk::Pipeline,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // SAFETY: submissions using the pipeline hold an `Arc` to it until
        // their outcome is taken (after completion) or the device waited
        // idle; destroyed once.
        unsafe {
            self.layouts
                .ctx
                .device
                .destroy_pipeline(self.pipeline, None)
        };
    }
}

/// Compiles a validated naga module to SPIR-V for Vulkan 1.2.
pub(crate) fn spirv(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
) -> Result<Vec<u32>, BackendError> {
    let mut opts = naga::back::spv::Options {
        lang_version: (1, 3),
        flags: naga::back::spv::WriterFlags::empty(),
        // No binding map: every resource's WGSL `@group`/`@binding` becomes
        // its SPIR-V descriptor set/binding unchanged (what "fake" means
        // in naga), which is the layout `hmm_shaders::binding` states.
        fake_missing_bindings: true,
        ..Default::default()
    };
    // Garbage entries can make a kernel index past a pool binding: clamp
    // (naga's `Restrict`) rather than rely on robustBufferAccess.
    opts.bounds_check_policies = naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Restrict,
        buffer: naga::proc::BoundsCheckPolicy::Restrict,
        image_load: naga::proc::BoundsCheckPolicy::Restrict,
        binding_array: naga::proc::BoundsCheckPolicy::Restrict,
    };
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.into(),
    };
    naga::back::spv::write_vec(module, info, &opts, Some(&pipeline))
        .map_err(|e| BackendError::Kernel(format!("SPIR-V output: {e}")))
}

/// Builds a compute pipeline from SPIR-V over `layouts`.
pub(crate) fn pipeline(
    layouts: &Arc<Layouts>,
    words: &[u32],
    entry: &std::ffi::CStr,
) -> Result<Pipeline, BackendError> {
    let d = &layouts.ctx.device;
    // SAFETY: `words` is a complete SPIR-V module from naga; destroyed
    // below once the pipeline holds what it needs.
    let module =
        unsafe { d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(words), None) }
            .map_err(|r| BackendError::Kernel(format!("vkCreateShaderModule: {r}")))?;
    let stage = vk::PipelineShaderStageCreateInfo::default()
        .stage(vk::ShaderStageFlags::COMPUTE)
        .module(module)
        .name(entry);
    let info = [vk::ComputePipelineCreateInfo::default()
        .stage(stage)
        .layout(layouts.pipeline)];
    // SAFETY: valid create info over a live module and layout.
    let made = unsafe { d.create_compute_pipelines(vk::PipelineCache::null(), &info, None) };
    // SAFETY: the module is no longer needed once creation returned.
    unsafe { d.destroy_shader_module(module, None) };
    let pipeline = made
        .map_err(|(_, r)| BackendError::Kernel(format!("vkCreateComputePipelines: {r}")))?
        .into_iter()
        .next()
        .ok_or_else(|| BackendError::Kernel("no pipeline created".into()))?;
    Ok(Pipeline {
        layouts: Arc::clone(layouts),
        pipeline,
    })
}

/// A kernel built for one [`VulkanDevice`] (its pipeline belongs to that
/// device).
#[derive(Clone)]
pub struct VulkanKernel {
    pub(crate) pipeline: Arc<Pipeline>,
}

impl core::fmt::Debug for VulkanKernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VulkanKernel").finish_non_exhaustive()
    }
}

impl VulkanDevice {
    /// Builds a kernel from WGSL that defines `fn hmm_kernel(i: u32)` using
    /// the shader library (see [`hmm_shaders`]): naga parses and validates
    /// the composed source and writes SPIR-V, the same source the wgpu
    /// driver builds from (with [`VulkanDevice::pool_bindings`] pool
    /// bindings: 4 in copy mode, one per host window in zero-copy mode).
    /// A kernel that does not parse or validate is a
    /// [`BackendError::Kernel`] whose message points at the kernel's own
    /// lines.
    pub fn kernel(&self, wgsl: &str) -> Result<VulkanKernel, BackendError> {
        // Its own validation messages only (see `validation.rs`).
        self.scoped(|| {
            let (module, info) = hmm_shaders::build_with(wgsl, self.pool_bindings())
                .map_err(|e| BackendError::Kernel(e.to_string()))?;
            let words = spirv(&module, &info, hmm_shaders::KERNEL_ENTRY)?;
            let entry = std::ffi::CString::new(hmm_shaders::KERNEL_ENTRY)
                .map_err(|e| BackendError::Kernel(e.to_string()))?;
            let p = pipeline(&self.kernel_layouts, &words, &entry)?;
            Ok(VulkanKernel {
                pipeline: Arc::new(p),
            })
        })
    }
}
