//! A small launch's write-back costs no submission of its own: the few
//! writable pages it compares with their twins come back with the launch
//! (`Backend::read_back_with_next_launch`), and the data written back is
//! the launch's.

#![allow(missing_docs)]

use hmm_conformance::{TestKernel, TestKernels};
use hmm_core::mirror::{Mirror, MirrorConfig};

#[test]
fn a_resident_launch_and_its_write_back_are_one_submission() {
    let Some(d) = hmm_driver_wgpu::test_device() else {
        return;
    };
    let host = hmm_core::cpu::host::HostSpace::new().expect("host");
    let m = Mirror::new(
        std::sync::Arc::new(host),
        d,
        MirrorConfig {
            pool_slots: 256,
            ..MirrorConfig::default()
        },
    )
    .expect("mirror");
    let k = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    // The output on a page of its own (nothing else in this process
    // writes it between launches).
    // SAFETY: a fresh private anonymous page, unmapped at the end.
    let out = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(out, libc::MAP_FAILED);
    let read = |i: usize| {
        // SAFETY: word `i` (< 1024) of the page mapped above.
        unsafe { std::ptr::read_volatile(out.cast::<u32>().add(i)) }
    };
    for base in [0u32, 100, 7000, 123_456] {
        let before = m.backend().submissions();
        let r = m
            .launch(&*k, 1024, &[out as u64, u64::from(base)][..])
            .expect("launch");
        let subs = m.backend().submissions() - before;
        for i in 0..1024 {
            assert_eq!(read(i), base + i as u32, "base {base}, word {i}");
        }
        if base > 0 {
            assert_eq!(r.submissions, 1, "resident: one round");
            assert_eq!(
                subs, 1,
                "base {base}: the launch and its write-back in one submission"
            );
        }
    }
    drop(m);
    // SAFETY: our own page, no longer used.
    unsafe { libc::munmap(out, 4096) };
}
