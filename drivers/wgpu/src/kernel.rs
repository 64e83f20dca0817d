//! Kernels: WGSL against the shader library, built into compute pipelines.

use hmm_core::mirror::backend::BackendError;

use crate::device::WgpuDevice;

/// A kernel built for one [`WgpuDevice`] (its pipeline belongs to that
/// device).
pub struct WgpuKernel {
    pub(crate) pipeline: wgpu::ComputePipeline,
    /// The [`WgpuDevice`] that built it (a pipeline of another device
    /// must never reach wgpu: it would panic).
    pub(crate) device_id: u64,
}

impl core::fmt::Debug for WgpuKernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WgpuKernel").finish_non_exhaustive()
    }
}

impl WgpuDevice {
    /// Builds a kernel from WGSL that defines `fn hmm_kernel(i: u32)` using
    /// the shader library (see [`hmm_shaders`]). A kernel that does not
    /// parse or validate is a [`BackendError::Kernel`] whose message points
    /// at the kernel's own lines.
    pub fn kernel(&self, wgsl: &str) -> Result<WgpuKernel, BackendError> {
        // naga first: its messages name the kernel's lines.
        hmm_shaders::build(wgsl).map_err(|e| BackendError::Kernel(e.to_string()))?;
        let src = hmm_shaders::compose(wgsl);
        // In this call's own error scopes: its errors are its own, and an
        // error of another call never fails it.
        self.scoped("kernel", BackendError::Kernel, || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some("hmm kernel"),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                });
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some("hmm kernel"),
                    layout: Some(&self.pipeline_layout),
                    module: &module,
                    entry_point: Some(hmm_shaders::KERNEL_ENTRY),
                    compilation_options: Default::default(),
                    cache: None,
                });
            Ok(WgpuKernel {
                pipeline,
                device_id: self.id,
            })
        })
    }
}
