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

hmm_core::conformance_tests!(zero_copy optional device());

/// Region sizes larger than the device's host windows are refused when
/// the mirror is made, not at the first fault.
#[test]
fn zero_copy_configs_are_checked() {
    use hmm_core::cpu::host::HostSpace;
    use hmm_core::mirror::{Mirror, MirrorConfig, MirrorError};
    let host = std::sync::Arc::new(HostSpace::new().expect("host"));
    let too_big = u64::from(hmm_driver_cpu::WINDOW_PAGES) * 4096 * 2;
    let cfg = MirrorConfig {
        chunk_sizes: vec![too_big, 4096],
        ..MirrorConfig::default()
    };
    match Mirror::new(host, device().expect("device"), cfg) {
        Err(MirrorError::Config(msg)) => assert!(msg.contains("host windows"), "{msg}"),
        other => panic!("expected a Config error, got {other:?}"),
    }
}
