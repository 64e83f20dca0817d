//! The generic conformance suite (including the port of the kernel's HMM
//! selftests) on the cpu driver, plus checks that need its fault-injection
//! hooks.

use std::sync::Arc;

use hmm_conformance::{TestKernel, TestKernels, TestMap};
use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::backend::RawFaultRecord;
use hmm_core::mirror::{AccessError, LaunchReport, Mirror, MirrorConfig, MirrorError};
use hmm_driver_cpu::CpuDevice;

hmm_conformance::conformance_tests!(hmm_driver_cpu::CpuDevice::with_threads(2));

/// A small mirror on a device whose fault records pass through `mangle`,
/// running the copy kernel over `n` invocations from one page into another.
fn copy_with_mangled_faults(
    n: u32,
    mangle: impl Fn(&mut RawFaultRecord) + Send + Sync + 'static,
) -> (Mirror<CpuDevice>, Result<LaunchReport, MirrorError>) {
    let dev = CpuDevice::with_threads(2);
    dev.set_fault_record_mangler(mangle);
    let host = Arc::new(HostSpace::new().expect("host"));
    let cfg = MirrorConfig {
        pool_slots: 64,
        table_pages: 64,
        ..MirrorConfig::default()
    };
    let m = Mirror::new(host, dev, cfg).expect("mirror");
    let src = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(1, libc::PROT_READ | libc::PROT_WRITE);
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    let r = m.launch(&k, n, [src.addr(), out.addr()]);
    (m, r)
}

/// A device that writes garbage into its fault buffer: records with
/// unknown flags are rejected, not trusted, and the launch ends with a
/// typed error instead of mapping anything or spinning.
#[test]
fn garbage_fault_records_are_rejected() {
    let (m, r) = copy_with_mangled_faults(16, |r| r.flags |= 0x8000_0000);
    match r {
        Err(MirrorError::UnusableFaults {
            incomplete,
            garbage,
        }) => {
            assert_eq!(incomplete, 16);
            assert_eq!(garbage, 16);
        }
        other => panic!("expected UnusableFaults, got {other:?}"),
    }
    assert_eq!(m.stats().pool_used, 0, "nothing was mapped on garbage");
}

/// A device that reports a wrong address for a real fault: the address is
/// looked up, not trusted; an unmapped one ends the launch with a typed
/// error naming it.
#[test]
fn a_lying_fault_address_is_a_typed_error() {
    let (_m, r) = copy_with_mangled_faults(4, |r| {
        r.addr_lo = 0x1000;
        r.addr_hi = 0;
    });
    match r {
        Err(MirrorError::DeviceFault {
            addr,
            reason: AccessError::Unmapped,
            ..
        }) => assert_eq!(addr.0, 0x1000),
        other => panic!("expected a DeviceFault at 0x1000, got {other:?}"),
    }
}
