//! Driver-specific tests: typed errors, per-submission timeline waits,
//! mode probing, and validation layers (clean runs and a recorded error).

use std::sync::Arc;

use hmm_conformance::{TestKernel, TestKernels, TestMap};
use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::backend::{
    Backend, BackendError, DeviceConfig, DeviceToHost, InvocationSet, Invocations, PteLoc,
    PteWrite, SubmissionId,
};
use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage};
use hmm_core::mirror::{Mirror, MirrorConfig};
use hmm_driver_vulkan::{test_device, Mode, OpenError, OpenOptions, VulkanDevice};

const CFG: DeviceConfig = DeviceConfig {
    pool_slots: 64,
    table_pages: 16,
};

#[test]
fn kernel_errors_are_typed_and_point_into_the_kernel() {
    let Some(d) = test_device() else { return };
    let e = d
        .kernel("fn hmm_kernel(i: u32) {\n    let x = nope;\n}\n")
        .unwrap_err();
    assert!(matches!(e, BackendError::Kernel(_)), "{e}");
    assert!(e.to_string().contains("kernel:2"), "{e}");
    assert!(matches!(
        d.kernel("fn main() {}"),
        Err(BackendError::Kernel(_))
    ));
}

#[test]
fn calls_before_init_and_unknown_submissions_are_errors() {
    let Some(d) = test_device() else { return };
    let k = d.test_kernel(TestKernel::FillU32).expect("kernel");
    assert!(matches!(
        d.launch(&k, Invocations::All(1), &[0, 0]),
        Err(BackendError::NotInitialised(_))
    ));
    d.init(CFG).expect("init");
    assert!(matches!(d.init(CFG), Err(BackendError::NotInitialised(_))));
    assert!(matches!(
        d.wait(SubmissionId(1 << 40), None),
        Err(BackendError::UnknownSubmission(_))
    ));
    assert!(matches!(
        d.take_outcome(SubmissionId(1 << 40)),
        Err(BackendError::UnknownSubmission(_))
    ));
    let too_many = [0u64; 17];
    assert!(matches!(
        d.launch(&k, Invocations::All(1), &too_many),
        Err(BackendError::Kernel(_))
    ));
}

#[test]
fn each_launch_has_its_own_timeline_value() {
    let Some(d) = test_device() else { return };
    d.init(CFG).expect("init");
    let k = d.test_kernel(TestKernel::FillU32).expect("kernel");
    // Nothing is mapped: every invocation faults (address 0x10000).
    let a = d
        .launch(&k, Invocations::All(100), &[0x10000, 7])
        .expect("launch a");
    let b = d
        .launch(
            &k,
            Invocations::Only(&InvocationSet::from_ids(u32::MAX, [3, 5])),
            &[0x10000, 7],
        )
        .expect("launch b");
    assert!(b > a, "ids increase");
    assert!(d.wait(a, None).expect("wait a"));
    assert!(d.is_complete(a));
    let oa = d.take_outcome(a).expect("outcome a");
    assert_eq!(oa.incomplete, (0..100).collect::<Vec<u32>>());
    assert_eq!(oa.faults.len(), 1, "deduplicated per page");
    // Whichever invocation recorded first names its own address; the page
    // is the same for all.
    assert_eq!(oa.faults[0].addr() & !0xfff, 0x10000);
    let ob = d.take_outcome(b).expect("outcome b");
    assert_eq!(ob.incomplete, vec![3, 5]);
    assert!(matches!(
        d.take_outcome(a),
        Err(BackendError::UnknownSubmission(_))
    ));
    assert!(d
        .wait(a, Some(std::time::Duration::ZERO))
        .expect("taken id waits"));
}

#[test]
fn info_names_the_driver_mode_and_sparse_support() {
    let Some(d) = test_device() else { return };
    let info = d.info();
    assert_eq!(info.driver, "vulkan");
    assert!(info.device.contains("Copy mode"), "{}", info.device);
    assert!(info.device.contains("sparse binding"), "{}", info.device);
    assert!(info.max_pool_slots > 0);
    assert_eq!(d.mode(), Mode::Copy);
    d.init(CFG).expect("init");
    assert!(d.pool_is_mapped().is_some());
}

#[test]
fn staging_mode_keeps_the_pool_unmapped() {
    let Some(d) = hmm_driver_vulkan::test_device_with(&OpenOptions {
        force_staging: true,
        ..Default::default()
    }) else {
        return;
    };
    d.init(CFG).expect("init");
    assert_eq!(d.pool_is_mapped(), Some(false));
}

/// A device with validation layers on, or `None` (with a skip line) when
/// the layer is not installed — unless `HMM_VK_VALIDATION=1` asks for it,
/// then that is a failure.
fn validated_device() -> Option<VulkanDevice> {
    let required = std::env::var("HMM_VK_VALIDATION").as_deref() == Ok("1");
    match VulkanDevice::open_with(&OpenOptions {
        validation: Some(true),
        ..Default::default()
    }) {
        Ok(d) => Some(d),
        Err(OpenError::NoValidationLayer) if !required => {
            eprintln!("skip: {}", OpenError::NoValidationLayer);
            None
        }
        Err(e) => {
            assert!(
                !required && std::env::var("HMM_REQUIRE_GPU").as_deref() != Ok("1"),
                "no validated Vulkan device: {e}"
            );
            eprintln!("skip: no Vulkan device: {e}");
            None
        }
    }
}

#[test]
fn validation_layer_records_errors_and_reports_them() {
    let Some(d) = validated_device() else { return };
    assert!(d.validation_enabled());
    assert!(
        d.validation_errors().is_empty(),
        "{:?}",
        d.validation_errors()
    );
    d.provoke_validation_error();
    let errs = d.validation_errors();
    assert!(
        errs.iter().any(|e| e.contains("usage")),
        "the messenger saw the invalid buffer: {errs:?}"
    );
    // No call owns it: it fails no init, page-table write or copy (and
    // skips none of their work)...
    d.init(CFG)
        .expect("init is not failed by an earlier, unrelated error");
    let k = d.test_kernel(TestKernel::FillU32).expect("kernel");
    let va = 0x4000_0000u64;
    let mut writes: Vec<PteWrite> = (2..=4)
        .rev()
        .map(|level| PteWrite {
            table: TablePage(4 - level),
            index: level_index(va, level) as u16,
            pte: Pte::table(TablePage(5 - level)),
        })
        .collect();
    let leaf = PteLoc {
        table: TablePage(3),
        index: level_index(va, 1) as u16,
    };
    writes.push(PteWrite {
        table: leaf.table,
        index: leaf.index,
        pte: Pte::leaf(PoolSlot(2), true),
    });
    d.write_ptes(&writes).expect("write_ptes");
    let mut read = Vec::new();
    d.read_ptes(&[leaf], &mut read).expect("read_ptes");
    assert_eq!(read, vec![Pte::leaf(PoolSlot(2), true)], "written");
    // ...the next launch returns it as a typed error, submitting nothing...
    match d.launch(&k, Invocations::All(1024), &[va, 5]) {
        Err(BackendError::Other(m)) => {
            assert!(
                m.contains("Vulkan validation") && m.contains("outside any call"),
                "{m}"
            )
        }
        other => panic!("expected the validation error, got {other:?}"),
    }
    // ...once: the launch after it runs through the entries written
    // after the error.
    let id = d
        .launch(&k, Invocations::All(1024), &[va, 5])
        .expect("launch after the error was reported");
    assert!(d.wait(id, None).expect("wait"));
    assert!(d.take_outcome(id).expect("outcome").incomplete.is_empty());
    let mut page = vec![0u8; 4096];
    // SAFETY: `page` is 4096 writable, unaliased bytes; nothing in flight.
    unsafe {
        d.copy_to_host(&[DeviceToHost {
            slot: PoolSlot(2),
            dst: page.as_mut_ptr(),
        }])
    }
    .expect("copy out");
    for (i, w) in page.chunks_exact(4).enumerate() {
        let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        assert_eq!(w, 5 + i as u32, "word {i}");
    }
}

#[test]
fn another_threads_validation_errors_never_reach_this_threads_calls() {
    let Some(d) = validated_device() else { return };
    d.init(CFG).expect("init");
    let d = Arc::new(d);
    let leaf = PteLoc {
        table: TablePage(1),
        index: 7,
    };
    // Thread B: errors outside any call, one after another.
    let noisy = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            for _ in 0..200 {
                d.provoke_validation_error();
            }
        })
    };
    // This thread: page-table traffic, none of which may fail or be
    // skipped.
    for round in 0..200u32 {
        let pte = if round % 2 == 0 {
            Pte::leaf(PoolSlot(round % 64), true)
        } else {
            Pte::EMPTY
        };
        d.write_ptes(&[PteWrite {
            table: leaf.table,
            index: leaf.index,
            pte,
        }])
        .expect("write_ptes");
        let mut read = Vec::new();
        d.read_ptes(&[leaf], &mut read).expect("read_ptes");
        assert_eq!(read, vec![pte], "round {round}");
        let mut old = Vec::new();
        d.clear_pte_bits(&[leaf], hmm_core::mirror::format::DEVICE_BITS, &mut old)
            .expect("clear_pte_bits");
    }
    noisy.join().expect("thread B");
    assert!(d.validation_errors().len() >= 200);
    // The next launch returns them all, once (so the drop is clean).
    let k = d.test_kernel(TestKernel::FillU32).expect("kernel");
    assert!(matches!(
        d.launch(&k, Invocations::All(1), &[0x10000, 0]),
        Err(BackendError::Other(_))
    ));
    let id = d
        .launch(&k, Invocations::All(1), &[0x10000, 0])
        .expect("launch");
    assert!(d.wait(id, None).expect("wait"));
    d.take_outcome(id).expect("outcome");
}

#[test]
fn mirror_scenarios_are_validation_clean() {
    let Some(d) = validated_device() else { return };
    let host = Arc::new(HostSpace::new().expect("host space"));
    let m = Mirror::new(
        Arc::clone(&host),
        d,
        MirrorConfig {
            pool_slots: 512,
            table_pages: 64,
            ..MirrorConfig::default()
        },
    )
    .expect("mirror");
    let pages = 96;
    let src = TestMap::anon(pages, libc::PROT_READ | libc::PROT_WRITE);
    let out = TestMap::anon(pages, libc::PROT_READ | libc::PROT_WRITE);
    src.fill(|i| i as u32 * 3);
    let copy = m.backend().test_kernel(TestKernel::CopyU32).expect("copy");
    let inc = m
        .backend()
        .test_kernel(TestKernel::IncrementU32)
        .expect("inc");
    let words = pages * 1024;
    m.launch(&copy, words as u32, [src.addr(), out.addr()])
        .expect("copy launch");
    m.launch(&inc, words as u32, [out.addr()])
        .expect("increment");
    for i in (0..words).step_by(517) {
        assert_eq!(out.read_word(i), i as u32 * 3 + 1, "word {i}");
    }
    let errs = m.backend().validation_errors();
    assert!(errs.is_empty(), "validation errors: {errs:?}");
}

#[test]
fn zero_copy_mode_needs_the_unsafe_opt_in() {
    let Some(copy) = test_device() else { return };
    let e = VulkanDevice::open_with(&OpenOptions {
        mode: Some(Mode::ZeroCopy),
        ..Default::default()
    })
    .expect_err("zero-copy without the opt-in must be refused");
    assert!(matches!(e, OpenError::ZeroCopyNotOptedIn), "{e}");
    assert!(e.to_string().contains("unsafe opt-in"), "{e}");
    // With it: opens where the extension is, names the extension where not.
    // SAFETY: the device is dropped at once; no launch runs on it.
    match VulkanDevice::open_with(&unsafe { OpenOptions::default().zero_copy() }) {
        Ok(z) => {
            assert_eq!(z.mode(), Mode::ZeroCopy);
            assert!(copy.host_import_alignment().is_some());
        }
        Err(e) => {
            assert!(copy.host_import_alignment().is_none(), "{e}");
            assert!(matches!(e, OpenError::Unsupported { .. }), "{e}");
            assert!(e.to_string().contains("VK_EXT_external_memory_host"), "{e}");
        }
    }
}
