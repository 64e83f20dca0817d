//! The conformance suite's kernels, as Rust closures over the emulated MMU.

use hmm_conformance::{TestKernel, TestKernels};
use hmm_core::mirror::backend::BackendError;

use crate::{CpuDevice, CpuKernel};

impl TestKernels for CpuDevice {
    fn test_kernel(&self, k: TestKernel) -> Result<Box<CpuKernel>, BackendError> {
        Ok(Box::new(match k {
            TestKernel::CopyU32 => CpuKernel::new(|lane, i| {
                let (src, out) = (lane.args()[0], lane.args()[1]);
                let off = u64::from(i) * 4;
                let v = lane.load_u32(src + off)?;
                lane.store_u32(out + off, v)
            }),
            TestKernel::FillU32 => CpuKernel::new(|lane, i| {
                let (dst, base) = (lane.args()[0], lane.args()[1]);
                lane.store_u32(dst + u64::from(i) * 4, (base as u32).wrapping_add(i))
            }),
            TestKernel::IncrementU32 => CpuKernel::new(|lane, i| {
                let p = lane.args()[0] + u64::from(i) * 4;
                let v = lane.load_u32(p)?;
                lane.store_u32(p, v.wrapping_add(1))
            }),
            TestKernel::ListSum => CpuKernel::new(|lane, i| {
                if i != 0 {
                    return Ok(());
                }
                let (mut node, out) = (lane.args()[0], lane.args()[1]);
                let mut sum = 0u64;
                while node != 0 {
                    sum = sum.wrapping_add(lane.load_u64(node + 8)?);
                    node = lane.load_u64(node)?;
                }
                lane.store_u64(out, sum)
            }),
            TestKernel::GatherSum => CpuKernel::new(|lane, i| {
                let (src, out) = (lane.args()[0], lane.args()[1]);
                let base = u64::from(i / 128 * 8192 + i % 128);
                let mut sum = 0u32;
                for j in 0..64 {
                    sum = sum.wrapping_add(lane.load_u32(src + (base + 128 * j) * 4)?);
                }
                lane.store_u32(out + u64::from(i) * 4, sum)
            }),
        }))
    }
}
