//! Long-running invocations: tens of thousands of page walks in one, and
//! lavapipe's loop budget (checks shared with the wgpu driver, in
//! `hmm_shaders::test_kernels::long_invocation`).

use hmm_driver_vulkan::{test_device, VulkanDevice};
use hmm_shaders::test_kernels::long_invocation;

#[test]
fn a_long_invocation_keeps_translating() {
    let Some(dev) = test_device() else { return };
    long_invocation::keeps_translating(dev, VulkanDevice::kernel);
}

#[test]
fn loops_cut_short_by_the_adapter_are_an_error() {
    let Some(dev) = test_device() else { return };
    let budgeted = dev.device_name().contains("llvmpipe");
    long_invocation::loops_cut_short_are_an_error(dev, budgeted, VulkanDevice::kernel);
}
