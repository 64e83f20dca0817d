//! `CpuDevice` driven directly through the `Backend` trait, no mirror core.

#![allow(missing_docs)]

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hmm_core::mirror::backend::{
    Backend, BackendError, DeviceConfig, DeviceToHost, HostToDevice, InvocationSet, Invocations,
    LaunchOutcome, PteLoc, PteWrite, SubmissionId, FAULT_ATOMIC, FAULT_MISALIGNED, FAULT_WRITE,
};
use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage, ACCESSED, DIRTY};
use hmm_driver_cpu::{CpuDevice, CpuKernel, FaultKind, Lane, LaneFault};

const VA: u64 = 0x1000_0000;
const PAGE: usize = 4096;

/// Builds page-table chains by hand, allocating table pages from 1 up.
struct Mapper {
    next: u32,
    dirs: HashMap<(u32, usize), u32>,
}

impl Mapper {
    fn new() -> Self {
        Mapper {
            next: 1,
            dirs: HashMap::new(),
        }
    }

    /// Maps `va` → `slot`; returns the leaf's location.
    fn map(&mut self, dev: &CpuDevice, va: u64, slot: u32, writable: bool) -> PteLoc {
        let mut writes = Vec::new();
        let mut table = 0u32;
        for level in (2..=4).rev() {
            let idx = level_index(va, level);
            let next = &mut self.next;
            table = *self.dirs.entry((table, idx)).or_insert_with(|| {
                let t = *next;
                *next += 1;
                writes.push(PteWrite {
                    table: TablePage(table),
                    index: idx as u16,
                    pte: Pte::table(TablePage(t)),
                });
                t
            });
        }
        let loc = PteLoc {
            table: TablePage(table),
            index: level_index(va, 1) as u16,
        };
        writes.push(PteWrite {
            table: loc.table,
            index: loc.index,
            pte: Pte::leaf(PoolSlot(slot), writable),
        });
        dev.write_ptes(&writes).expect("write ptes");
        loc
    }
}

fn device(threads: usize, pool_slots: u32) -> CpuDevice {
    let dev = CpuDevice::with_threads(threads);
    dev.init(DeviceConfig {
        pool_slots,
        table_pages: 64,
    })
    .expect("init");
    dev
}

fn run(dev: &CpuDevice, k: &CpuKernel, inv: Invocations<'_>, args: &[u64]) -> LaunchOutcome {
    let id = dev.launch(k, inv, args).expect("launch");
    assert!(dev.wait(id, Some(Duration::from_secs(60))).expect("wait"));
    assert!(dev.is_complete(id));
    dev.take_outcome(id).expect("outcome")
}

fn copy_in(dev: &CpuDevice, slot: u32, page: &[u8]) {
    assert_eq!(page.len(), PAGE);
    // SAFETY: `page` is 4096 readable bytes for the call; no device work
    // is in flight.
    unsafe {
        dev.copy_to_device(&[HostToDevice {
            slot: PoolSlot(slot),
            src: page.as_ptr(),
        }])
    }
    .expect("copy in");
}

fn copy_out(dev: &CpuDevice, slot: u32) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    // SAFETY: `page` is 4096 writable, unaliased bytes; no device work is in
    // flight.
    unsafe {
        dev.copy_to_host(&[DeviceToHost {
            slot: PoolSlot(slot),
            dst: page.as_mut_ptr(),
        }])
    }
    .expect("copy out");
    page
}

fn words(page: &[u8]) -> Vec<u32> {
    page.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn pte(dev: &CpuDevice, loc: PteLoc) -> Pte {
    let mut out = Vec::new();
    dev.read_ptes(&[loc], &mut out).expect("read ptes");
    out[0]
}

#[test]
fn read_write_through_the_mmu_and_accessed_dirty_bits() {
    let dev = device(2, 8);
    let info = dev.info();
    assert_eq!(info.driver, "cpu");
    assert!(info.device.contains("2 host threads"));
    let mut m = Mapper::new();
    let leaf = m.map(&dev, VA, 3, true);
    let host: Vec<u8> = (0..1024u32).flat_map(|i| (i * 3).to_le_bytes()).collect();
    copy_in(&dev, 3, &host);
    assert_eq!(pte(&dev, leaf).0 & (ACCESSED | DIRTY), 0);

    let k = CpuKernel::new(|lane, i| {
        let a = lane.args()[0] + 4 * u64::from(i);
        let v = lane.load_u32(a)?;
        lane.store_u32(a, v + lane.args()[1] as u32)
    });
    let o = run(&dev, &k, Invocations::All(1024), &[VA, 7]);
    assert_eq!(o, LaunchOutcome::default());
    let back = words(&copy_out(&dev, 3));
    assert!(back.iter().enumerate().all(|(i, &v)| v == i as u32 * 3 + 7));

    let p = pte(&dev, leaf);
    assert!(p.valid() && p.writable() && p.accessed() && p.dirty());
    assert_eq!(p.slot(), PoolSlot(3));
    let mut old = Vec::new();
    dev.clear_pte_bits(&[leaf], ACCESSED | DIRTY, &mut old)
        .expect("clear");
    assert_eq!(old, vec![p]);
    let p2 = pte(&dev, leaf);
    assert!(p2.valid() && p2.writable() && !p2.accessed() && !p2.dirty());

    // Loads only: ACCESSED, not DIRTY.
    let reader = CpuKernel::new(|lane, i| {
        let v = lane.load_u32(lane.args()[0] + 4 * u64::from(i))?;
        assert_eq!(v, i * 3 + 7);
        Ok(())
    });
    assert!(run(&dev, &reader, Invocations::All(1024), &[VA])
        .incomplete
        .is_empty());
    let p3 = pte(&dev, leaf);
    assert!(p3.accessed() && !p3.dirty());

    // Bad input is an error, not a panic.
    assert!(dev.clear_pte_bits(&[leaf], 1, &mut old).is_err());
    let bad = PteLoc {
        table: TablePage(64),
        index: 0,
    };
    assert!(dev.read_ptes(&[bad], &mut old).is_err());
    // SAFETY: the batch is rejected before any copy (slot out of range).
    let r = unsafe {
        dev.copy_to_device(&[HostToDevice {
            slot: PoolSlot(8),
            src: host.as_ptr(),
        }])
    };
    assert!(r.is_err());
}

#[test]
fn init_rules() {
    let dev = CpuDevice::with_threads(1);
    let k = CpuKernel::new(|_, _| Ok(()));
    assert!(matches!(
        dev.launch(&k, Invocations::All(1), &[]),
        Err(BackendError::NotInitialised(_))
    ));
    assert!(dev.write_ptes(&[]).is_err());
    let cfg = DeviceConfig {
        pool_slots: 1,
        table_pages: 1,
    };
    dev.init(cfg).expect("init");
    assert!(matches!(
        dev.init(cfg),
        Err(BackendError::NotInitialised(_))
    ));
    let too_big = CpuDevice::with_threads(1).init(DeviceConfig {
        pool_slots: u32::MAX,
        table_pages: 1,
    });
    assert!(matches!(too_big, Err(BackendError::OutOfMemory(_))));
    // Empty launches complete at once.
    let o = run(&dev, &k, Invocations::All(0), &[]);
    assert_eq!(o, LaunchOutcome::default());
}

#[test]
fn copy_mode_has_no_host_windows() {
    let dev = device(1, 4);
    assert_eq!(dev.host_windows(), None);
    let mut page = vec![0u8; 4096];
    // SAFETY: a copy-mode device refuses before it touches the memory.
    let r = unsafe { dev.bind_window(0, page.as_mut_ptr(), page.len()) };
    assert!(matches!(r, Err(BackendError::Unsupported(_))), "{r:?}");
    assert_eq!(page, vec![0u8; 4096]);
}

#[test]
fn unmapped_reads_and_writes_fault_with_records() {
    let dev = device(2, 8);
    let mut m = Mapper::new();
    m.map(&dev, VA, 0, true);
    let unmapped = VA + 0x10_0000;
    // Odd invocations touch an unmapped page (reads if i % 4 == 1, writes
    // if i % 4 == 3); even ones stay on the mapped page.
    let k = CpuKernel::new(move |lane, i| {
        let a = if i % 2 == 1 {
            unmapped + 8 * u64::from(i)
        } else {
            VA + 4 * u64::from(i)
        };
        if i % 4 == 3 {
            lane.store_u32(a, i)
        } else {
            lane.load_u32(a).map(drop)
        }
    });
    let o = run(&dev, &k, Invocations::All(64), &[]);
    let odd: Vec<u32> = (0..64).filter(|i| i % 2 == 1).collect();
    assert_eq!(o.incomplete, odd);
    assert_eq!(o.faults.len(), odd.len());
    for (r, &i) in o.faults.iter().zip(&odd) {
        assert_eq!(r.invocation, i);
        assert_eq!(r.addr(), unmapped + 8 * u64::from(i));
        let want = if i % 4 == 3 { FAULT_WRITE } else { 0 };
        assert_eq!(r.flags, want, "invocation {i}");
    }
}

#[test]
fn read_only_pages_fault_on_store_and_atomic() {
    let dev = device(1, 8);
    let mut m = Mapper::new();
    let leaf = m.map(&dev, VA, 1, false);
    let k = CpuKernel::new(|lane, i| {
        let v = lane.load_u32(VA)?;
        match i {
            0 => Ok(()),
            1 => lane.store_u32(VA + 4, v),
            _ => lane.atomic_add_u32(VA + 8, 1).map(drop),
        }
    });
    let o = run(&dev, &k, Invocations::All(3), &[]);
    assert_eq!(o.incomplete, vec![1, 2]);
    assert_eq!(o.faults[0].flags, FAULT_WRITE);
    assert_eq!(o.faults[0].addr(), VA + 4);
    assert_eq!(o.faults[1].flags, FAULT_WRITE | FAULT_ATOMIC);
    assert_eq!(o.faults[1].addr(), VA + 8);
    let p = pte(&dev, leaf);
    assert!(p.accessed() && !p.dirty());
}

#[test]
fn faulting_invocations_apply_nothing_and_replay_exactly_once() {
    let dev = device(2, 8);
    let mut m = Mapper::new();
    let out_leaf = m.map(&dev, VA, 0, true); // output: one u32 per invocation
    m.map(&dev, VA + 0x1000, 1, true); // counter page
    let input = VA + 0x20_0000; // unmapped at first
    let n = 256u32;
    // Each invocation stores its index (buffered), reads it back
    // (read-your-writes), loads from the input page (faults for i % 3 == 0
    // until mapped) and only then bumps a counter atomically.
    let k = CpuKernel::new(move |lane: &mut Lane<'_>, i| {
        let out = VA + 4 * u64::from(i);
        lane.store_u32(out, i + 1)?;
        assert_eq!(lane.load_u32(out)?, i + 1, "read-your-writes");
        lane.store_u8(out + 3, 0x80)?;
        assert_eq!(lane.load_u32(out)?, (i + 1) | 0x8000_0000);
        let src = if i % 3 == 0 { input } else { VA + 0x1000 + 64 };
        let extra = lane.load_u32(src)?;
        lane.store_u32(out, i + 1 + extra)?;
        lane.atomic_add_u32(VA + 0x1000, 1)?;
        Ok(())
    });
    let o = run(&dev, &k, Invocations::All(n), &[]);
    let faulted: Vec<u32> = (0..n).filter(|i| i % 3 == 0).collect();
    assert_eq!(o.incomplete, faulted);
    assert!(o.faults.iter().all(|r| r.addr() == input && r.flags == 0));
    let out = words(&copy_out(&dev, 0));
    for i in 0..n {
        let want = if i % 3 == 0 { 0 } else { i + 1 };
        assert_eq!(out[i as usize], want, "invocation {i} before replay");
    }
    assert_eq!(words(&copy_out(&dev, 1))[0], n - faulted.len() as u32);

    // The faulting invocations' pages were never written by them: clear
    // DIRTY and check a failing-only replay leaves it clear.
    let mut old = Vec::new();
    dev.clear_pte_bits(&[out_leaf], DIRTY, &mut old)
        .expect("clear");
    assert!(old[0].dirty());
    let o2 = run(&dev, &k, Invocations::Only(&o.incomplete), &[]);
    assert_eq!(o2.incomplete, faulted);
    assert!(!pte(&dev, out_leaf).dirty(), "discarded stores set DIRTY");

    // Service the fault, replay only the faulted ones.
    m.map(&dev, input, 2, false);
    let mut input_page = vec![0u8; PAGE];
    input_page[..4].copy_from_slice(&1000u32.to_le_bytes());
    copy_in(&dev, 2, &input_page);
    let o3 = run(&dev, &k, Invocations::Only(&o2.incomplete), &[]);
    assert_eq!(o3, LaunchOutcome::default());
    let out = words(&copy_out(&dev, 0));
    for i in 0..n {
        let want = if i % 3 == 0 { i + 1 + 1000 } else { i + 1 };
        assert_eq!(out[i as usize], want, "invocation {i}");
    }
    assert_eq!(words(&copy_out(&dev, 1))[0], n, "each atomic exactly once");
    assert!(pte(&dev, out_leaf).dirty());
}

#[test]
fn many_invocations_across_threads() {
    let n = 100_000u32;
    let pages = (n as usize * 4).div_ceil(PAGE) as u32; // 98
    let dev = device(4, pages + 1);
    let mut m = Mapper::new();
    for p in 0..pages {
        m.map(&dev, VA + u64::from(p) * PAGE as u64, p, true);
    }
    let counter = VA + 0x100_0000;
    m.map(&dev, counter, pages, true);
    let k = CpuKernel::new(move |lane, i| {
        lane.store_u32(lane.args()[0] + 4 * u64::from(i), i ^ 0x5a5a_5a5a)?;
        lane.atomic_add_u32(counter, 1)?;
        Ok(())
    });
    let o = run(&dev, &k, Invocations::All(n), &[VA]);
    assert_eq!(o, LaunchOutcome::default());
    let mut all = Vec::new();
    for p in 0..pages {
        all.extend(words(&copy_out(&dev, p)));
    }
    for i in 0..n {
        assert_eq!(all[i as usize], i ^ 0x5a5a_5a5a, "invocation {i}");
    }
    assert_eq!(words(&copy_out(&dev, pages))[0], n);
}

#[test]
fn panicking_kernel_is_reported_and_device_survives() {
    let dev = device(2, 4);
    let mut m = Mapper::new();
    m.map(&dev, VA, 0, true);
    let k = CpuKernel::new(|lane, i| {
        lane.store_u32(VA + 4 * u64::from(i), 1)?;
        if i == 37 || i == 900 {
            panic!("boom {i}");
        }
        Ok(())
    });
    let id = dev.launch(&k, Invocations::All(1000), &[]).expect("launch");
    assert!(dev.wait(id, Some(Duration::from_secs(60))).expect("wait"));
    match dev.take_outcome(id) {
        Err(BackendError::Kernel(msg)) => {
            assert!(msg.contains("invocation 37 panicked: boom 37"), "{msg}");
            assert!(msg.contains("1 more"), "{msg}");
        }
        other => panic!("expected a kernel error, got {other:?}"),
    }
    let out = words(&copy_out(&dev, 0));
    assert_eq!(out[37], 0, "a panicked invocation's stores are discarded");
    assert_eq!(out[36], 1);
    // Still usable, all workers alive.
    let ok = CpuKernel::new(|lane, i| lane.store_u32(VA + 4 * u64::from(i), 2));
    assert!(run(&dev, &ok, Invocations::All(1000), &[])
        .incomplete
        .is_empty());
    assert!(words(&copy_out(&dev, 0))[..1000].iter().all(|&v| v == 2));
}

#[test]
fn misaligned_accesses_are_flagged_records_and_corrupt_table_a_typed_error() {
    let dev = device(1, 4);
    let mut m = Mapper::new();
    let leaf = m.map(&dev, VA, 0, true);
    // Every misaligned 32/64-bit access: a record flagged FAULT_MISALIGNED
    // (the core turns it into MirrorError::DeviceFault), never a plain
    // page fault and never a silent access.
    let cases: [(u64, u32); 5] = [
        (VA + 2, FAULT_WRITE | FAULT_ATOMIC), // atomic
        (VA + 1, 0),                          // u32 load
        (VA + 3, FAULT_WRITE),                // u32 store
        (VA + 4, 0),                          // u64 load, 4- not 8-aligned
        (VA + 12, FAULT_WRITE),               // u64 store
    ];
    for (i, &(addr, flags)) in cases.iter().enumerate() {
        let k = CpuKernel::new(move |lane, _| match i {
            0 => lane.atomic_add_u32(addr, 1).map(drop),
            1 => lane.load_u32(addr).map(drop),
            2 => lane.store_u32(addr, 1),
            3 => lane.load_u64(addr).map(drop),
            _ => lane.store_u64(addr, 1),
        });
        let id = dev.launch(&k, Invocations::All(1), &[]).expect("launch");
        dev.wait(id, None).expect("wait");
        let o = dev.take_outcome(id).expect("outcome");
        assert_eq!(o.incomplete, vec![0u32], "case {i}");
        assert_eq!(o.faults.len(), 1, "case {i}");
        assert_eq!(o.faults[0].addr(), addr, "case {i}");
        assert_eq!(o.faults[0].flags, flags | FAULT_MISALIGNED, "case {i}");
    }
    dev.write_ptes(&[PteWrite {
        table: leaf.table,
        index: leaf.index,
        pte: Pte::leaf(PoolSlot(1000), true),
    }])
    .expect("write");
    let k = CpuKernel::new(|lane, _| lane.load_u32(VA).map(drop));
    let id = dev.launch(&k, Invocations::All(1), &[]).expect("launch");
    dev.wait(id, None).expect("wait");
    assert!(matches!(dev.take_outcome(id), Err(BackendError::Other(m)) if m.contains("corrupt")));
}

#[test]
fn outcomes_are_taken_once() {
    let dev = device(1, 1);
    let k = CpuKernel::new(|_, _| Ok(()));
    let id = dev.launch(&k, Invocations::All(10), &[]).expect("launch");
    assert!(dev.wait(id, None).expect("wait"));
    assert_eq!(
        dev.take_outcome(id).expect("first"),
        LaunchOutcome::default()
    );
    assert!(matches!(
        dev.take_outcome(id),
        Err(BackendError::UnknownSubmission(x)) if x == id
    ));
    // A taken submission is still complete; never-issued ids are unknown.
    assert!(dev.wait(id, Some(Duration::ZERO)).expect("wait again"));
    assert!(dev.is_complete(id));
    let never = SubmissionId(id.0 + 100);
    assert!(!dev.is_complete(never));
    assert!(dev.wait(never, None).is_err());
    assert!(dev.take_outcome(never).is_err());
    assert!(dev.take_outcome(SubmissionId(0)).is_err());
    let id2 = dev.launch(&k, Invocations::All(1), &[]).expect("launch");
    assert!(id2 > id, "ids increase");
}

#[test]
fn wait_times_out_and_take_before_completion_is_an_error() {
    let dev = device(1, 1);
    let (tx, rx) = mpsc::channel::<()>();
    let rx = Arc::new(Mutex::new(rx));
    let k = CpuKernel::new(move |_, _| {
        // Block until the test releases us (bounded).
        let _ = rx.lock().map(|r| r.recv_timeout(Duration::from_secs(30)));
        Ok(())
    });
    let id = dev.launch(&k, Invocations::All(1), &[]).expect("launch");
    assert!(!dev.wait(id, Some(Duration::from_millis(20))).expect("wait"));
    assert!(!dev.is_complete(id));
    assert!(matches!(dev.take_outcome(id), Err(BackendError::Other(_))));
    tx.send(()).expect("release");
    assert!(dev.wait(id, None).expect("wait"));
    assert!(dev.take_outcome(id).is_ok());
}

#[test]
fn drop_with_work_in_flight_does_not_hang() {
    let (done_tx, done_rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let dev = device(2, 1);
        let k = CpuKernel::new(|_, _| {
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        });
        // ~100 s of work if it all ran.
        let id = dev
            .launch(&k, Invocations::All(200_000), &[])
            .expect("launch");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!dev.is_complete(id));
        drop(dev);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("drop hung with work in flight");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn fault_buffer_overflow_and_garbage_records() {
    let dev = device(2, 1);
    let k = CpuKernel::new(|lane, i| lane.load_u32(VA + 4096 * u64::from(i)).map(drop));
    dev.set_fault_buffer_capacity(Some(5));
    let o = run(&dev, &k, Invocations::All(20), &[]);
    assert_eq!(o.incomplete, (0..20).collect::<Vec<_>>());
    assert_eq!(o.faults.len(), 5);
    assert_eq!(o.faults[4].invocation, 4);
    dev.set_fault_buffer_capacity(None);
    dev.set_fault_record_mangler(|r| {
        r.flags |= 0x80;
        r.invocation = r.invocation.wrapping_add(1000);
    });
    let o = run(
        &dev,
        &k,
        Invocations::Only(&InvocationSet::from_ids(u32::MAX, [3, 7])),
        &[],
    );
    assert_eq!(o.incomplete, vec![3, 7]);
    assert_eq!(o.faults[0].invocation, 1003);
    assert_eq!(o.faults[1].flags, 0x80);
    dev.clear_fault_record_mangler();
    let o = run(
        &dev,
        &k,
        Invocations::Only(&InvocationSet::from_ids(u32::MAX, [3])),
        &[],
    );
    assert_eq!(o.faults[0].invocation, 3);
    assert_eq!(o.faults[0].flags, 0);
}

/// (page index, stamp before the DIRTY-setting step, stamp after it).
type WriteEvent = (usize, u64, Option<u64>);

/// Stamps on one global sequence, shared by host and kernel.
static SEQ: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The (page, start stamp) of the previous invocation on this worker:
    /// its commit happened before the next invocation on the thread starts.
    static PREV: Cell<Option<(usize, u64)>> = const { Cell::new(None) };
}

#[test]
fn clearing_dirty_while_kernels_write_never_loses_it() {
    const PAGES: u32 = 8;
    let dev = device(2, PAGES * 2);
    let mut m = Mapper::new();
    // Pages 0..8: plain stores (commit path); 8..16: atomics.
    let leaves: Vec<PteLoc> = (0..PAGES * 2)
        .map(|p| m.map(&dev, VA + u64::from(p) * PAGE as u64, p, true))
        .collect();
    // Write events: (page index, stamp before the DIRTY-setting step,
    // stamp after it or None if unknown).
    let writes: Arc<Mutex<Vec<WriteEvent>>> = Arc::default();
    let w2 = Arc::clone(&writes);
    let k = CpuKernel::new(move |lane, i| {
        let start = SEQ.fetch_add(1, SeqCst);
        if let Some((page, a)) = PREV.with(|p| p.replace(None)) {
            w2.lock().expect("lock").push((page, a, Some(start)));
        }
        let p = (i % PAGES) as usize;
        lane.store_u32(VA + (p * PAGE) as u64 + 4 * u64::from(i % 1024), i)?;
        let q = p + PAGES as usize;
        let a = SEQ.fetch_add(1, SeqCst);
        lane.atomic_add_u32(VA + (q * PAGE) as u64, 1)?;
        let b = SEQ.fetch_add(1, SeqCst);
        let mut w = w2.lock().expect("lock");
        w.push((q, a, Some(b)));
        PREV.with(|c| c.set(Some((p, start))));
        Ok(())
    });
    let id = dev
        .launch(&k, Invocations::All(200_000), &[])
        .expect("launch");
    // Host: clear DIRTY on every page in a bounded loop while it runs.
    let mut clears: Vec<(u64, u64, Vec<Pte>)> = Vec::new();
    for _ in 0..1_000_000 {
        if dev.is_complete(id) {
            break;
        }
        let p = SEQ.fetch_add(1, SeqCst);
        let mut old = Vec::new();
        dev.clear_pte_bits(&leaves, DIRTY, &mut old).expect("clear");
        let q = SEQ.fetch_add(1, SeqCst);
        clears.push((p, q, old));
    }
    assert!(dev.wait(id, Some(Duration::from_secs(120))).expect("wait"));
    assert_eq!(
        dev.take_outcome(id).expect("outcome"),
        LaunchOutcome::default()
    );
    let mut writes = std::mem::take(&mut *writes.lock().expect("lock"));
    let mut final_ptes = Vec::new();
    dev.read_ptes(&leaves, &mut final_ptes).expect("read");
    assert!(clears.len() > 1, "the host loop raced the kernel");
    // Each worker's last plain-store invocation has no recorded bound (its
    // PREV is never flushed) and is not checked; every other write must
    // have been seen DIRTY by a clear that may follow its DIRTY step, or
    // by the final read.
    writes.sort_by_key(|w| w.1);
    let mut checked = 0usize;
    for &(page, a, b) in &writes {
        // Clears that may have run after the write's DIRTY step: those
        // ending after `a`, up to the first starting after `b`.
        let from = clears.partition_point(|c| c.1 < a);
        let to = match b {
            Some(b) => clears.partition_point(|c| c.0 < b),
            None => clears.len(),
        };
        let seen = clears[from..clears.len().min(to + 1)]
            .iter()
            .any(|c| c.2[page].dirty());
        let seen = seen || (to >= clears.len() && final_ptes[page].dirty());
        assert!(
            seen,
            "DIRTY lost for a write to page {page} at stamps {a}..{b:?}"
        );
        checked += 1;
    }
    assert!(checked >= 200_000, "checked {checked} writes");
}

/// The kernel signature is usable with named helper functions too.
fn helper_kernel(lane: &mut Lane<'_>, i: u32) -> Result<(), LaneFault> {
    let v = lane.load_f64(VA + 8 * u64::from(i))?;
    lane.store_f64(VA + 8 * u64::from(i), v * 2.0)?;
    let f = lane.load_f32(VA + 2048)?;
    lane.store_f32(VA + 2048 + 4 * u64::from(i) + 4, f + 1.5)
}

#[test]
fn float_accessors_and_fn_items() {
    let dev = device(1, 2);
    let mut m = Mapper::new();
    m.map(&dev, VA, 1, true);
    let mut host = vec![0u8; PAGE];
    for i in 0..8 {
        host[8 * i..8 * i + 8].copy_from_slice(&(i as f64 + 0.25).to_le_bytes());
    }
    host[2048..2052].copy_from_slice(&1.0f32.to_le_bytes());
    copy_in(&dev, 1, &host);
    let o = run(
        &dev,
        &CpuKernel::new(helper_kernel),
        Invocations::All(8),
        &[],
    );
    assert_eq!(o, LaunchOutcome::default());
    let back = copy_out(&dev, 1);
    for i in 0..8 {
        let v = f64::from_le_bytes(back[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        assert_eq!(v, (i as f64 + 0.25) * 2.0);
        let off = 2048 + 4 * i + 4;
        let f = f32::from_le_bytes(back[off..off + 4].try_into().expect("4 bytes"));
        assert_eq!(f, 2.5);
    }
    let e = LaneFault {
        addr: 0x1234,
        write: true,
        atomic: false,
        kind: FaultKind::ReadOnly,
    };
    assert_eq!(
        e.to_string(),
        "device write fault at 0x1234: read-only page"
    );
}
