//! The generic conformance suite (including the port of the kernel's HMM
//! selftests) on the cpu driver.

hmm_core::conformance_tests!(hmm_driver_cpu::CpuDevice::with_threads(2));
