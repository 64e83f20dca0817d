//! A small launch's write-back costs no submission of its own: the few
//! writable pages it compares with their twins come back with the launch
//! (`Backend::read_back_with_next_launch`), and the data written back is
//! the launch's.

#![allow(missing_docs)]

use hmm_conformance::{TestKernel, TestKernels};
use hmm_core::mirror::{Mirror, MirrorConfig};

mod common;

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

mod after_later_work {
    //! Launches from several threads overlap: a launch whose outcome is
    //! taken after later device work was issued must not hand over its
    //! staged pages as current (`hmm-stress` on wgpu read stale words when
    //! it did). Driven through the `Backend` trait, one slot mapped at `VA`.

    use hmm_conformance::{TestKernel, TestKernels};
    use hmm_core::mirror::backend::{Backend, DeviceConfig, HostToDevice, Invocations, PteWrite};
    use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage};
    use hmm_driver_wgpu::{WgpuDevice, WgpuKernel};

    const VA: u64 = 0x4000_0000;
    const SLOT: PoolSlot = PoolSlot(5);

    /// A device with `VA` mapped writable to `SLOT` (table pages 1..=3
    /// hold its directory chain), and the fill kernel.
    fn device() -> Option<(WgpuDevice, Box<WgpuKernel>)> {
        let d = hmm_driver_wgpu::test_device()?;
        d.init(DeviceConfig {
            pool_slots: 16,
            table_pages: 8,
        })
        .expect("init");
        let mut w: Vec<PteWrite> = (2..=4)
            .rev()
            .map(|level| PteWrite {
                table: TablePage(4 - level),
                index: level_index(VA, level) as u16,
                pte: Pte::table(TablePage(5 - level)),
            })
            .collect();
        w.push(PteWrite {
            table: TablePage(3),
            index: level_index(VA, 1) as u16,
            pte: Pte::leaf(SLOT, true),
        });
        d.write_ptes(&w).expect("map");
        let k = d.test_kernel(TestKernel::FillU32).expect("kernel");
        Some((d, k))
    }

    fn launch_fill(
        d: &WgpuDevice,
        k: &WgpuKernel,
        base: u32,
    ) -> hmm_core::mirror::backend::SubmissionId {
        d.launch(k, Invocations::All(1024), &[VA, u64::from(base)])
            .expect("launch")
    }

    fn finish(d: &WgpuDevice, id: hmm_core::mirror::backend::SubmissionId) {
        assert!(d.wait(id, None).expect("wait"));
        assert!(d.take_outcome(id).expect("outcome").incomplete.is_empty());
    }

    #[test]
    fn a_launch_taken_after_a_later_launch_does_not_serve_its_pages() {
        let Some((d, k)) = device() else {
            return;
        };
        d.read_back_with_next_launch(&[SLOT]);
        let first = launch_fill(&d, &k, 1000);
        // Issued before the first outcome is taken; it overwrites the slot
        // after the first launch copied it out.
        let second = launch_fill(&d, &k, 5000);
        finish(&d, first);
        finish(&d, second);
        let words = crate::common::slot_words(&d, SLOT);
        for (i, w) in words.iter().enumerate() {
            assert_eq!(*w, 5000 + i as u32, "word {i}: the later launch's value");
        }
    }

    #[test]
    fn a_launch_taken_after_a_later_copy_does_not_serve_its_pages() {
        let Some((d, k)) = device() else {
            return;
        };
        d.read_back_with_next_launch(&[SLOT]);
        let first = launch_fill(&d, &k, 1000);
        let sevens = vec![7u8; 4096];
        // SAFETY: `sevens` is 4096 readable bytes for the call; the slot is
        // the test's own.
        unsafe {
            d.copy_to_device(&[HostToDevice {
                slot: SLOT,
                src: sevens.as_ptr(),
            }])
        }
        .expect("copy in");
        finish(&d, first);
        let words = crate::common::slot_words(&d, SLOT);
        assert!(
            words.iter().all(|&w| w == 0x0707_0707),
            "the copy made after the launch was issued is what the slot holds"
        );
        // And with nothing issued after it, a launch's pages are served:
        // the cached path still works (no submission for the copy-out).
        d.read_back_with_next_launch(&[SLOT]);
        finish(&d, launch_fill(&d, &k, 9000));
        let before = d.submissions();
        let words = crate::common::slot_words(&d, SLOT);
        assert_eq!(d.submissions(), before, "served from the launch's copy");
        for (i, w) in words.iter().enumerate() {
            assert_eq!(*w, 9000 + i as u32, "word {i}");
        }
    }
}
