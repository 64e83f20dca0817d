//! The conformance suite's kernels: the WGSL sources shared by every GPU
//! driver ([`hmm_shaders::test_kernels`]).

use hmm_core::mirror::backend::BackendError;
use hmm_core::mirror::conformance::{TestKernel, TestKernels};

use crate::{WgpuDevice, WgpuKernel};

impl TestKernels for WgpuDevice {
    fn test_kernel(&self, k: TestKernel) -> Result<Box<WgpuKernel>, BackendError> {
        self.kernel(hmm_shaders::test_kernels::source(k))
            .map(Box::new)
    }
}
