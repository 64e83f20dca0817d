//! The generic conformance suite (with the port of the kernel's HMM
//! selftests) on the Vulkan driver in zero-copy mode
//! (`VK_EXT_external_memory_host`): device page-table entries point into
//! the CPU's own pages. Without a device each test prints a skip line;
//! `HMM_REQUIRE_GPU=1` makes that a failure (and `HMM_REQUIRE_ZERO_COPY=1`
//! a device without the extension).

/// A zero-copy device, or `None` with the skip line printed.
fn device() -> Option<hmm_driver_vulkan::VulkanDevice> {
    // SAFETY: the zero-copy suite never unmaps, downgrades or touches from
    // another thread memory that a running launch of its own uses
    // (`anon_teardown`, which unmaps during launches, is not part of it).
    unsafe { hmm_driver_vulkan::test_device_zero_copy() }
}

hmm_conformance::conformance_tests!(zero_copy optional device());
