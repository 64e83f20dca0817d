//! The conformance suite's kernels: the WGSL sources shared by every GPU
//! driver ([`hmm_shaders::test_kernels`]), compiled to SPIR-V.

use hmm_conformance::{TestKernel, TestKernels};
use hmm_core::mirror::backend::BackendError;

use crate::{VulkanDevice, VulkanKernel};

impl TestKernels for VulkanDevice {
    fn test_kernel(&self, k: TestKernel) -> Result<Box<VulkanKernel>, BackendError> {
        self.kernel(hmm_shaders::test_kernels::source(k))
            .map(Box::new)
    }
}
