//! The generic conformance suite (with the port of the kernel's HMM
//! selftests) on the wgpu driver. Without an adapter each test prints a
//! skip line; `HMM_REQUIRE_GPU=1` makes that a failure.

hmm_conformance::conformance_tests!(optional hmm_driver_wgpu::test_device());
