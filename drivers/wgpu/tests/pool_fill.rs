//! The pool is made so that wgpu does not zero-fill it on first use
//! (issue #16: that fill was lavapipe's ≈70–140 ms first launch on wgpu,
//! growing with the pool). The mirror writes every slot whole before an
//! entry names it, so launches still read only data they were given.

#![allow(missing_docs)]

use hmm_conformance::{TestKernel, TestKernels};
use hmm_core::mirror::backend::{Backend, DeviceConfig};
use hmm_core::mirror::{Mirror, MirrorConfig};

type WgpuMirror = Mirror<hmm_driver_wgpu::WgpuDevice, hmm_core::cpu::host::HostSpace>;

/// A mirror of `pool_slots` slots and `table_pages` table pages on `d`,
/// with the suite's word-copy kernel (`[src, out]`).
fn copy_mirror(
    d: hmm_driver_wgpu::WgpuDevice,
    pool_slots: u32,
    table_pages: u32,
) -> (WgpuMirror, Box<hmm_driver_wgpu::WgpuKernel>) {
    let host = hmm_core::cpu::host::HostSpace::new().expect("host");
    let cfg = MirrorConfig {
        pool_slots,
        table_pages,
        ..MirrorConfig::default()
    };
    let m = Mirror::new(std::sync::Arc::new(host), d, cfg).expect("mirror");
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    (m, k)
}

#[test]
fn pool_bindings_skip_wgpus_zero_fill() {
    let Some(d) = hmm_driver_wgpu::test_device() else {
        return;
    };
    assert_eq!(d.pool_zero_filled(), None, "no memory before init");
    d.init(DeviceConfig {
        pool_slots: 4096,
        table_pages: 64,
    })
    .expect("init");
    // This build enables only wgpu's Vulkan backend, so the pool must
    // have come from wgpu-hal.
    assert_eq!(d.pool_zero_filled(), Some(false));
}

#[test]
fn slots_reused_without_zero_fill_hold_only_written_data() {
    let Some(d) = hmm_driver_wgpu::test_device() else {
        return;
    };
    // A pool of 64 slots, three times over: each round's buffer is fresh
    // CPU memory with a distinct pattern, so a slot read before it was
    // written (old data, or whatever the device memory held) shows up as
    // a wrong word.
    let (m, k) = copy_mirror(d, 64, MirrorConfig::default().table_pages);
    for round in 0..3u32 {
        let words = 48 * 1024;
        let src: Vec<u32> = (0..words).map(|i| i ^ (round << 28)).collect();
        let mut dst = vec![0u32; words as usize];
        m.launch(
            &*k,
            words,
            &[src.as_ptr() as u64, dst.as_mut_ptr() as u64][..],
        )
        .expect("launch");
        assert!(dst == src, "round {round}: wrong words");
    }
}

#[test]
fn the_table_is_zeroed_page_by_page_not_filled() {
    let Some(d) = hmm_driver_wgpu::test_device() else {
        return;
    };
    d.init(DeviceConfig {
        pool_slots: 64,
        table_pages: 64,
    })
    .expect("init");
    assert_eq!(d.table_zeroed_lazily(), Some(true));
}

#[test]
fn mappings_spread_over_many_table_pages_read_right() {
    let Some(d) = hmm_driver_wgpu::test_device() else {
        return;
    };
    // One page in each of 24 separate 1 GiB reservations: each needs its
    // own lower-level table pages, zeroed on first write. With the table
    // poisoned in debug builds, a page walked before it was zeroed would
    // send the walk to a garbage slot and the words would come out wrong.
    let (m, k) = copy_mirror(d, 256, 128);
    const GIB: usize = 1 << 30;
    let mut areas = Vec::new();
    for i in 0..24u32 {
        // SAFETY: a fresh private anonymous reservation; nothing else
        // refers to it, and it is unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GIB,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        areas.push(p);
        let want: Vec<u32> = (0..1024).map(|w| w * 7 + i).collect();
        // SAFETY: the first page of the reservation is ours and writable.
        unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), p.cast::<u32>(), 1024) };
        let mut dst = vec![0u32; 1024];
        m.launch(&*k, 1024, &[p as u64, dst.as_mut_ptr() as u64][..])
            .expect("launch");
        assert!(dst == want, "area {i}: wrong words");
    }
    // Every area again, all mapped at once.
    for (i, &p) in areas.iter().enumerate() {
        let want: Vec<u32> = (0..1024).map(|w| w * 7 + i as u32).collect();
        let mut dst = vec![0u32; 1024];
        m.launch(&*k, 1024, &[p as u64, dst.as_mut_ptr() as u64][..])
            .expect("launch");
        assert!(dst == want, "area {i} (second pass): wrong words");
    }
    drop(m);
    for p in areas {
        // SAFETY: unmapping our own reservation, no longer used.
        unsafe { libc::munmap(p, GIB) };
    }
}
