//! The conformance suite in zero-copy mode (`CpuDevice::zero_copy`): the
//! core binds host windows instead of copying, and the device's kernels
//! read and write the CPU's own pages.

use hmm_driver_cpu::CpuDevice;

/// A zero-copy cpu device.
fn device() -> Option<CpuDevice> {
    // SAFETY: the zero-copy suite never unmaps memory while a launch may
    // use it, and no test thread accesses memory a running launch of its
    // own uses (`anon_teardown`, which unmaps during launches, is not part
    // of the zero-copy suite).
    Some(unsafe { CpuDevice::with_threads(2).zero_copy() })
}

hmm_conformance::conformance_tests!(zero_copy optional device());
