//! Error attribution (the `Backend` trait's `# Errors` rules): a wgpu
//! error is returned by the call that raised it, and never fails — or
//! skips — a later page-table write. Without an adapter each test prints a
//! skip line; `HMM_REQUIRE_GPU=1` makes that a failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hmm_conformance::{TestKernel, TestKernels};
use hmm_core::mirror::backend::{
    Backend, BackendError, DeviceConfig, Invocations, PteLoc, PteWrite,
};
use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage};
use hmm_driver_wgpu::{test_device, WgpuDevice, WgpuKernel};

mod common;

const CFG: DeviceConfig = DeviceConfig {
    pool_slots: 16,
    table_pages: 8,
};
/// Table pages 1..=3 hold the directory chain for `VA`; page 3 is its leaf
/// table.
const VA: u64 = 0x4000_0000;
const SLOT: PoolSlot = PoolSlot(5);
const WORDS: u32 = 1024;

fn chain() -> Vec<PteWrite> {
    (2..=4)
        .rev()
        .map(|level| PteWrite {
            table: TablePage(4 - level),
            index: level_index(VA, level) as u16,
            pte: Pte::table(TablePage(5 - level)),
        })
        .collect()
}

fn leaf_loc() -> PteLoc {
    PteLoc {
        table: TablePage(3),
        index: level_index(VA, 1) as u16,
    }
}

/// The page-table writes mapping `VA` to `SLOT`, writable.
fn mapping() -> Vec<PteWrite> {
    let mut w = chain();
    w.push(PteWrite {
        table: leaf_loc().table,
        index: leaf_loc().index,
        pte: Pte::leaf(SLOT, true),
    });
    w
}

fn device() -> Option<(WgpuDevice, Box<WgpuKernel>)> {
    let d = test_device()?;
    d.init(CFG).expect("init");
    let k = d.test_kernel(TestKernel::FillU32).expect("kernel");
    Some((d, k))
}

/// Runs FillU32 over the page at `VA` (`word i = base + i`) and returns
/// the launch's incomplete invocations.
fn fill(d: &WgpuDevice, k: &WgpuKernel, base: u32) -> Result<Vec<u32>, BackendError> {
    let id = d.launch(k, Invocations::All(WORDS), &[VA, u64::from(base)])?;
    assert!(d.wait(id, None)?);
    Ok(d.take_outcome(id)?.incomplete.iter().collect())
}

fn expect_filled(d: &WgpuDevice, base: u32) {
    let words = common::slot_words(d, SLOT);
    for (i, w) in words.iter().enumerate() {
        assert_eq!(*w, base + i as u32, "word {i}");
    }
}

#[test]
fn an_error_outside_any_call_fails_no_page_table_write() {
    let Some((d, k)) = device() else { return };
    // Nothing mapped yet: every invocation faults.
    assert_eq!(fill(&d, &k, 0).expect("launch").len(), WORDS as usize);

    // An error no call owns (wgpu's uncaptured-error path).
    d.provoke_validation_error();
    // The page-table write neither fails nor is skipped...
    d.write_ptes(&mapping())
        .expect("write_ptes is not failed by an earlier, unrelated error");
    let mut read = Vec::new();
    d.read_ptes(&[leaf_loc()], &mut read).expect("read_ptes");
    assert_eq!(read, vec![Pte::leaf(SLOT, true)], "the entry was written");
    // Copies are not failed either. (The slot was never written: the
    // pool is not zero-filled, so compare with what it holds now.)
    let before = common::slot_words(&d, SLOT);
    // ...the next launch reports the error and submits nothing...
    match fill(&d, &k, 100) {
        Err(BackendError::Kernel(m)) => assert!(m.contains("outside any call"), "{m}"),
        other => panic!("expected the unattributed error, got {other:?}"),
    }
    assert_eq!(common::slot_words(&d, SLOT), before, "nothing ran");
    // ...once: the launch after it runs through the written entries.
    assert!(fill(&d, &k, 100).expect("launch").is_empty());
    expect_filled(&d, 100);
}

#[test]
fn a_failed_launch_is_its_own_error_and_later_writes_reach_the_next_launch() {
    let Some((d, k)) = device() else { return };
    // The entries are staged; the failing launch's submission must
    // neither lose them nor fail because of them.
    d.write_ptes(&mapping()).expect("write_ptes");
    d.provoke_launch_error();
    match fill(&d, &k, 7) {
        Err(BackendError::Kernel(m)) => assert!(m.contains("launch: wgpu"), "{m}"),
        other => panic!("expected the launch's own validation error, got {other:?}"),
    }
    // The error was that launch's: the next calls succeed, and the next
    // launch sees the entries written before the failed one.
    d.write_ptes(&mapping()[3..])
        .expect("write_ptes after the error");
    assert!(fill(&d, &k, 7).expect("launch").is_empty());
    expect_filled(&d, 7);
    // An entry cleared after the error is cleared for the next launch.
    let mut clear = mapping()[3];
    clear.pte = Pte::EMPTY;
    d.provoke_launch_error();
    assert!(fill(&d, &k, 9).is_err());
    d.write_ptes(&[clear]).expect("clear after the error");
    assert_eq!(fill(&d, &k, 9).expect("launch").len(), WORDS as usize);
    expect_filled(&d, 7);
}

#[test]
fn another_threads_errors_never_reach_this_threads_calls() {
    let Some((d, k)) = device() else { return };
    d.write_ptes(&mapping()).expect("map");
    let d = Arc::new(d);
    let stop = Arc::new(AtomicBool::new(false));
    // Thread B: launches whose submissions fail validation, one after
    // another.
    let failing = {
        let (d, stop) = (Arc::clone(&d), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut failed = 0u32;
            while !stop.load(Ordering::Relaxed) || failed < 5 {
                d.provoke_launch_error();
                match fill(&d, &k, 1) {
                    Err(BackendError::Kernel(_)) => failed += 1,
                    other => panic!("expected the launch's own error, got {other:?}"),
                }
            }
            failed
        })
    };
    // This thread: page-table traffic, none of which may fail.
    let leaf = mapping()[3];
    for round in 0..200u32 {
        let mut w = leaf;
        if round % 2 == 1 {
            w.pte = Pte::EMPTY;
        }
        d.write_ptes(&[w]).expect("write_ptes");
        let mut read = Vec::new();
        d.read_ptes(&[leaf_loc()], &mut read).expect("read_ptes");
        assert_eq!(read, vec![w.pte], "round {round}");
        let mut old = Vec::new();
        d.clear_pte_bits(
            &[leaf_loc()],
            hmm_core::mirror::format::DEVICE_BITS,
            &mut old,
        )
        .expect("clear_pte_bits");
    }
    stop.store(true, Ordering::Relaxed);
    let failed = failing.join().expect("thread B");
    assert!(failed >= 5, "{failed}");
}
