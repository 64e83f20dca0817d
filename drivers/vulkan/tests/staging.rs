//! The conformance suite with the pool and page table in unmapped memory
//! (`OpenOptions::force_staging`): every copy goes through the staging
//! buffer and `vkCmdCopyBuffer`, the path a discrete GPU without
//! host-visible device memory takes.

hmm_conformance::conformance_tests!(optional hmm_driver_vulkan::test_device_with(
    &hmm_driver_vulkan::OpenOptions {
        force_staging: true,
        ..Default::default()
    }
));
