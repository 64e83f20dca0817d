//! The cpu driver's fault-injection hooks (feature `fault-injection`,
//! enabled for this crate's tests through its dev-dependency on itself):
//! each hook fails the call it names, the number of times it says, after
//! applying what it says; the device-table inspection reads the device's
//! own entries.

#![allow(missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use hmm_core::mirror::backend::{
    Backend, BackendError, DeviceConfig, DeviceToHost, HostToDevice, Invocations, PteLoc, PteWrite,
};
use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage, ACCESSED, DIRTY};
use hmm_driver_cpu::{Applied, Call, CpuDevice, CpuKernel, DeviceLeaf, FaultInjector};

const PAGE: usize = 4096;
/// Table pages 1..=3 hold the directory chain for `VA`; page 3 is the leaf
/// table, so `VA + p * 4096` is entry `leaf_index(p)` of page 3.
const VA: u64 = 0x4000_0000;
const LEAF_TABLE: u32 = 3;

fn device(pool_slots: u32) -> CpuDevice {
    let dev = CpuDevice::with_threads(2);
    dev.init(DeviceConfig {
        pool_slots,
        table_pages: 8,
    })
    .expect("init");
    dev
}

/// Directory entries from the root to `LEAF_TABLE` for `VA`.
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

/// The leaf write mapping page `p` of `VA` to `slot`.
fn leaf(p: u64, pte: Pte) -> PteWrite {
    PteWrite {
        table: TablePage(LEAF_TABLE),
        index: level_index(VA + p * PAGE as u64, 1) as u16,
        pte,
    }
}

fn loc(p: u64) -> PteLoc {
    let w = leaf(p, Pte::EMPTY);
    PteLoc {
        table: w.table,
        index: w.index,
    }
}

fn read(dev: &CpuDevice, locs: &[PteLoc]) -> Vec<Pte> {
    let mut out = Vec::new();
    dev.read_ptes(locs, &mut out).expect("read ptes");
    out
}

/// Maps pages `0..n` of `VA` to slots `0..n`, writable.
fn map(dev: &CpuDevice, n: u64) {
    let mut w = chain();
    w.extend((0..n).map(|p| leaf(p, Pte::leaf(PoolSlot(p as u32), true))));
    dev.write_ptes(&w).expect("map");
}

fn assert_injected<T: core::fmt::Debug>(r: Result<T, BackendError>) -> BackendError {
    let e = r.expect_err("an injected failure");
    assert!(FaultInjector::is_injected(&e), "{e}");
    e
}

/// One call of kind `call`, on a device whose pages `0..4` are mapped.
fn call_once(dev: &CpuDevice, call: Call, host: &mut [u8]) -> Result<(), BackendError> {
    match call {
        Call::CopyToDevice => {
            // SAFETY: `host` is a live 4096-byte buffer; no device work.
            unsafe {
                dev.copy_to_device(&[HostToDevice {
                    slot: PoolSlot(0),
                    src: host.as_ptr(),
                }])
            }
        }
        Call::CopyToHost => {
            // SAFETY: `host` is a live, unaliased 4096-byte buffer.
            unsafe {
                dev.copy_to_host(&[DeviceToHost {
                    slot: PoolSlot(0),
                    dst: host.as_mut_ptr(),
                }])
            }
        }
        Call::WritePtes => dev.write_ptes(&[leaf(0, Pte::leaf(PoolSlot(0), true))]),
        Call::ReadPtes => dev.read_ptes(&[loc(0)], &mut Vec::new()),
        Call::ClearPteBits => dev.clear_pte_bits(&[loc(0)], ACCESSED, &mut Vec::new()),
        Call::Launch => {
            let k = CpuKernel::new(|_, _| Ok(()));
            let id = dev.launch(&k, Invocations::All(1), &[])?;
            assert!(dev.wait(id, Some(Duration::from_secs(60)))?);
            dev.take_outcome(id).map(|_| ())
        }
        // Copy mode: bind refuses, unbind is a no-op; both reach the
        // injector only on a zero-copy device (tested below).
        Call::BindWindow | Call::UnbindWindow => Ok(()),
    }
}

#[test]
fn each_hook_fails_its_own_call_the_given_number_of_times() {
    let kinds = [
        Call::CopyToDevice,
        Call::CopyToHost,
        Call::WritePtes,
        Call::ReadPtes,
        Call::ClearPteBits,
        Call::Launch,
    ];
    for armed in kinds {
        let dev = device(4);
        map(&dev, 4);
        let f = dev.faults();
        f.fail_next(armed, 2);
        let mut host = vec![7u8; PAGE];
        for round in 0..4 {
            for kind in kinds {
                let r = call_once(&dev, kind, &mut host);
                if kind == armed && round < 2 {
                    assert_injected(r);
                } else {
                    r.unwrap_or_else(|e| panic!("{kind:?} (armed {armed:?}, round {round}): {e}"));
                }
            }
        }
        for kind in kinds {
            let want = if kind == armed { 2 } else { 0 };
            assert_eq!(f.injected(kind), want, "{kind:?} with {armed:?} armed");
        }
    }
}

#[test]
fn shorthands_always_and_clear() {
    let dev = device(4);
    map(&dev, 4);
    let f = dev.faults();
    let mut host = vec![0u8; PAGE];
    f.fail_write_ptes(1)
        .fail_copy_to_host(1)
        .fail_copy_to_device(1)
        .fail_read_ptes(1)
        .fail_clear_pte_bits(1);
    for kind in [
        Call::WritePtes,
        Call::CopyToHost,
        Call::CopyToDevice,
        Call::ReadPtes,
        Call::ClearPteBits,
    ] {
        assert_injected(call_once(&dev, kind, &mut host));
        call_once(&dev, kind, &mut host).expect("only one failure was asked for");
    }
    f.fail_write_ptes_always();
    for _ in 0..5 {
        assert_injected(call_once(&dev, Call::WritePtes, &mut host));
    }
    f.clear(Call::WritePtes);
    call_once(&dev, Call::WritePtes, &mut host).expect("cleared");
    assert_eq!(f.injected(Call::WritePtes), 6);
    f.fail_always(Call::ReadPtes).fail_always(Call::Launch);
    f.clear_all();
    call_once(&dev, Call::ReadPtes, &mut host).expect("cleared");
    call_once(&dev, Call::Launch, &mut host).expect("cleared");
}

#[test]
fn a_failed_write_applies_nothing_a_prefix_or_all_as_configured() {
    let dev = device(8);
    dev.write_ptes(&chain()).expect("chain");
    let f = dev.faults();
    let locs: Vec<PteLoc> = (0..4).map(loc).collect();
    let batch = |slot_base: u32| -> Vec<PteWrite> {
        (0..4)
            .map(|p| leaf(p, Pte::leaf(PoolSlot(slot_base + p as u32), true)))
            .collect()
    };
    // Nothing (the default).
    f.fail_write_ptes(1);
    assert_injected(dev.write_ptes(&batch(0)));
    assert_eq!(read(&dev, &locs), vec![Pte::EMPTY; 4]);
    assert!(dev.device_leaf_entries().is_empty());
    // A prefix of two.
    f.set_applied(Call::WritePtes, Applied::Prefix(2))
        .fail_write_ptes(1);
    let e = assert_injected(dev.write_ptes(&batch(0)));
    assert!(e.to_string().contains("2 of 4 applied"), "{e}");
    assert_eq!(
        read(&dev, &locs),
        vec![
            Pte::leaf(PoolSlot(0), true),
            Pte::leaf(PoolSlot(1), true),
            Pte::EMPTY,
            Pte::EMPTY
        ]
    );
    // A prefix longer than the batch is the whole batch.
    f.set_applied(Call::WritePtes, Applied::Prefix(99))
        .fail_write_ptes(1);
    assert_injected(dev.write_ptes(&batch(4)));
    assert_eq!(
        read(&dev, &locs),
        (4..8)
            .map(|s| Pte::leaf(PoolSlot(s), true))
            .collect::<Vec<_>>()
    );
    // All, and still an error.
    f.set_applied(Call::WritePtes, Applied::All)
        .fail_write_ptes(1);
    assert_injected(dev.write_ptes(&batch(0)));
    assert_eq!(
        read(&dev, &locs),
        (0..4)
            .map(|s| Pte::leaf(PoolSlot(s), true))
            .collect::<Vec<_>>()
    );
    // Bad input is reported as such, before injection, writing nothing.
    f.fail_write_ptes(1);
    let bad = PteWrite {
        table: TablePage(99),
        index: 0,
        pte: Pte::EMPTY,
    };
    let e = dev
        .write_ptes(&[leaf(0, Pte::EMPTY), bad])
        .expect_err("out of range");
    assert!(!FaultInjector::is_injected(&e), "{e}");
    assert_eq!(read(&dev, &locs[..1]), vec![Pte::leaf(PoolSlot(0), true)]);
    assert_injected(dev.write_ptes(&[]));
}

#[test]
fn failed_clears_reads_and_copies_apply_their_prefix() {
    let dev = device(4);
    map(&dev, 4);
    let locs: Vec<PteLoc> = (0..4).map(loc).collect();
    let ad = ACCESSED | DIRTY;
    // Give every leaf A|D (the host may set them too: same bits).
    let marked: Vec<PteWrite> = (0..4)
        .map(|p| leaf(p, Pte(Pte::leaf(PoolSlot(p as u32), true).0 | ad)))
        .collect();
    dev.write_ptes(&marked).expect("mark");
    let f = dev.faults();

    f.set_applied(Call::ClearPteBits, Applied::Prefix(3))
        .fail_clear_pte_bits(1);
    let mut old = Vec::new();
    assert_injected(dev.clear_pte_bits(&locs, DIRTY, &mut old));
    assert_eq!(old.len(), 3, "old values of the applied prefix");
    assert!(old.iter().all(|p| p.dirty()));
    let now = read(&dev, &locs);
    assert!(
        now[..3].iter().all(|p| !p.dirty() && p.accessed()),
        "{now:?}"
    );
    assert!(now[3].dirty(), "the fourth was not applied");

    f.set_applied(Call::ReadPtes, Applied::Prefix(1))
        .fail_read_ptes(1);
    let mut out = Vec::new();
    assert_injected(dev.read_ptes(&locs, &mut out));
    assert_eq!(out, now[..1]);

    let src: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8 + 1; PAGE]).collect();
    f.set_applied(Call::CopyToDevice, Applied::Prefix(2))
        .fail_copy_to_device(1);
    let ins: Vec<HostToDevice> = (0..4)
        .map(|i| HostToDevice {
            slot: PoolSlot(i),
            src: src[i as usize].as_ptr(),
        })
        .collect();
    // SAFETY: every `src` is a live 4096-byte buffer; no device work.
    assert_injected(unsafe { dev.copy_to_device(&ins) });
    let mut dst: Vec<Vec<u8>> = (0..4).map(|_| vec![0xeeu8; PAGE]).collect();
    let outs: Vec<DeviceToHost> = dst
        .iter_mut()
        .enumerate()
        .map(|(i, d)| DeviceToHost {
            slot: PoolSlot(i as u32),
            dst: d.as_mut_ptr(),
        })
        .collect();
    f.set_applied(Call::CopyToHost, Applied::Prefix(3))
        .fail_copy_to_host(1);
    // SAFETY: every `dst` is a live, unaliased, disjoint 4096-byte buffer
    // (the pointers were taken from distinct vectors); no device work.
    assert_injected(unsafe { dev.copy_to_host(&outs) });
    let firsts: Vec<u8> = dst.iter().map(|d| d[0]).collect();
    // Slots 0 and 1 got the copy in; 2 is still zero; the copy out reached
    // the first three destinations only.
    assert_eq!(firsts, vec![1, 2, 0, 0xee]);
}

#[test]
fn random_mode_is_seeded_and_follows_the_rate() {
    let pattern = |p: f64, seed: u64| -> Vec<bool> {
        let dev = device(4);
        dev.write_ptes(&chain()).expect("chain");
        let f = dev.faults();
        f.fail_rate(Call::WritePtes, p, seed)
            .set_applied(Call::WritePtes, Applied::RandomPrefix);
        (0..1000)
            .map(|_| {
                dev.write_ptes(&[leaf(0, Pte::leaf(PoolSlot(1), true))])
                    .is_err()
            })
            .collect()
    };
    let a = pattern(0.3, 42);
    assert_eq!(a, pattern(0.3, 42), "the same seed fails the same calls");
    assert_ne!(a, pattern(0.3, 43), "another seed, another pattern");
    let failed = a.iter().filter(|&&x| x).count();
    assert!((200..400).contains(&failed), "{failed} of 1000 at p = 0.3");
    assert!(pattern(0.0, 1).iter().all(|&x| !x));
    assert!(pattern(1.0, 1).iter().all(|&x| x));

    // Random prefixes: every length 0..=len shows up, and exactly that many
    // entries are written.
    let dev = device(8);
    dev.write_ptes(&chain()).expect("chain");
    let f = dev.faults();
    let locs: Vec<PteLoc> = (0..4).map(loc).collect();
    let mut seen = [false; 5];
    let empty: Vec<PteWrite> = (0..4).map(|p| leaf(p, Pte::EMPTY)).collect();
    let batch: Vec<PteWrite> = (0..4)
        .map(|p| leaf(p, Pte::leaf(PoolSlot(1), true)))
        .collect();
    for round in 0..200 {
        f.clear(Call::WritePtes);
        dev.write_ptes(&empty).expect("reset");
        f.fail_rate(Call::WritePtes, 1.0, round)
            .set_applied(Call::WritePtes, Applied::RandomPrefix);
        let e = assert_injected(dev.write_ptes(&batch));
        let now = read(&dev, &locs);
        let n = now.iter().take_while(|p| p.valid()).count();
        assert!(now[n..].iter().all(|p| !p.valid()), "a prefix: {now:?}");
        assert!(e.to_string().contains(&format!("{n} of 4 applied")), "{e}");
        seen[n] = true;
    }
    assert_eq!(seen, [true; 5], "every prefix length occurs");
}

#[test]
fn failed_launch_submits_nothing() {
    let dev = device(4);
    map(&dev, 1);
    let ran = Arc::new(AtomicU32::new(0));
    let r = Arc::clone(&ran);
    let k = CpuKernel::new(move |_, _| {
        r.fetch_add(1, SeqCst);
        Ok(())
    });
    dev.faults()
        .set_applied(Call::Launch, Applied::All)
        .fail_next(Call::Launch, 1);
    assert_injected(dev.launch(&k, Invocations::All(64), &[]));
    let id = dev.launch(&k, Invocations::All(64), &[]).expect("launch");
    assert!(dev.wait(id, None).expect("wait"));
    dev.take_outcome(id).expect("outcome");
    assert_eq!(ran.load(SeqCst), 64, "only the second launch ran");
}

#[test]
fn leaf_entries_are_read_from_the_device_table() {
    let dev = device(8);
    map(&dev, 3);
    let leaves = dev.device_leaf_entries();
    let want: Vec<DeviceLeaf> = (0..3)
        .map(|p| DeviceLeaf {
            va: VA + p * PAGE as u64,
            loc: loc(p),
            pte: Pte::leaf(PoolSlot(p as u32), true),
        })
        .collect();
    assert_eq!(leaves, want);
    assert_eq!(dev.entries_naming(PoolSlot(1)), want[1..2]);
    assert!(dev.entries_naming(PoolSlot(5)).is_empty());

    // The device's own A/D bits show: a kernel writing page 2 dirties it
    // on the device (the core's shadow would not know yet).
    let k = CpuKernel::new(|lane, _| lane.store_u32(lane.args()[0], 9));
    let id = dev
        .launch(&k, Invocations::All(1), &[VA + 2 * PAGE as u64])
        .expect("launch");
    assert!(dev.wait(id, None).expect("wait"));
    assert!(dev.take_outcome(id).expect("outcome").incomplete.is_empty());
    let named = dev.entries_naming(PoolSlot(2));
    assert_eq!(named.len(), 1);
    assert!(named[0].pte.dirty() && named[0].pte.accessed(), "{named:?}");

    // A second virtual address reaching slot 1 through another leaf
    // table: both are listed.
    let va2 = 0x7f00_0000_0000u64;
    let mut w: Vec<PteWrite> = (2..=4)
        .rev()
        .map(|level| PteWrite {
            table: TablePage(if level == 4 { 0 } else { 7 - level }),
            index: level_index(va2, level) as u16,
            pte: Pte::table(TablePage(8 - level)),
        })
        .collect();
    w.push(PteWrite {
        table: TablePage(6),
        index: level_index(va2, 1) as u16,
        pte: Pte::leaf(PoolSlot(1), false),
    });
    dev.write_ptes(&w).expect("second mapping");
    let named = dev.entries_naming(PoolSlot(1));
    let vas: Vec<u64> = named.iter().map(|l| l.va).collect();
    assert_eq!(vas, vec![VA + PAGE as u64, va2], "{named:?}");

    // Clearing a leaf removes it; unlinking a directory removes what it
    // led to; a directory naming a table page outside the table leads
    // nowhere.
    dev.write_ptes(&[leaf(1, Pte::EMPTY)]).expect("clear");
    assert_eq!(dev.entries_naming(PoolSlot(1)).len(), 1);
    let root_va2 = PteWrite {
        table: TablePage(0),
        index: level_index(va2, 4) as u16,
        pte: Pte::table(TablePage(1000)),
    };
    dev.write_ptes(&[root_va2]).expect("bad directory");
    assert!(dev.entries_naming(PoolSlot(1)).is_empty());
    assert_eq!(dev.device_leaf_entries().len(), 2, "pages 0 and 2 remain");
}

/// One page-aligned page of host memory.
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

/// A zero-copy device with window 0 bound to `page`.
fn zero_copy_device(page: &mut Page) -> CpuDevice {
    // SAFETY: the tests below keep `page` alive and unaccessed while any
    // launch on the device runs.
    let dev = unsafe { CpuDevice::with_threads(1).zero_copy() };
    dev.init(DeviceConfig {
        pool_slots: 0,
        table_pages: 8,
    })
    .expect("init");
    // SAFETY: window 0 is unbound; the page is 4096 bytes, page-aligned
    // (`Page`'s alignment), and outlives the device's use of it.
    unsafe { dev.bind_window(0, page.0.as_mut_ptr(), PAGE) }.expect("bind");
    dev
}

#[test]
fn failed_unbind_still_makes_the_window_unreachable() {
    let mut page = Box::new(Page([0; PAGE]));
    let dev = zero_copy_device(&mut page);
    let mut w = chain();
    w.push(leaf(0, Pte::leaf(PoolSlot(0), true)));
    dev.write_ptes(&w).expect("map");
    let k = CpuKernel::new(|lane, _| lane.store_u32(lane.args()[0], 0xabcd));
    let run = || {
        let id = dev.launch(&k, Invocations::All(1), &[VA])?;
        assert!(dev.wait(id, None)?);
        dev.take_outcome(id)
    };
    assert!(run().expect("bound").incomplete.is_empty());
    assert_eq!(page.0[0], 0xcd);
    page.0[0] = 0;

    // Nothing applied: unreachable, but held (not bindable).
    let f = dev.faults();
    f.fail_unbind_window(1);
    assert_injected(dev.unbind_window(0));
    assert!(
        run().is_err(),
        "an entry naming an unbound window is a bad entry"
    );
    assert_eq!(page.0[0], 0, "the device did not reach the page");
    // SAFETY: as in `zero_copy_device`.
    let e = unsafe { dev.bind_window(0, page.0.as_mut_ptr(), PAGE) }.expect_err("still held");
    assert!(e.to_string().contains("bound"), "{e}");
    dev.unbind_window(0).expect("the retry releases it");
    // SAFETY: as in `zero_copy_device`.
    unsafe { dev.bind_window(0, page.0.as_mut_ptr(), PAGE) }.expect("bindable again");

    // Applied: released, only the result is an error.
    f.set_applied(Call::UnbindWindow, Applied::All)
        .fail_unbind_window(1);
    assert_injected(dev.unbind_window(0));
    assert!(run().is_err());
    assert_eq!(page.0[0], 0);
    // A failed bind binds nothing.
    f.fail_next(Call::BindWindow, 1);
    // SAFETY: as in `zero_copy_device`.
    assert_injected(unsafe { dev.bind_window(0, page.0.as_mut_ptr(), PAGE) });
    assert!(run().is_err(), "still unbound");
    // SAFETY: as in `zero_copy_device`.
    unsafe { dev.bind_window(0, page.0.as_mut_ptr(), PAGE) }.expect("bind");
    assert!(run().expect("bound").incomplete.is_empty());
    assert_eq!(page.0[0], 0xcd);
    dev.unbind_window(0).expect("unbind");
}

#[test]
fn a_lost_device_stays_lost_and_stops_its_work() {
    let dev = device(4);
    map(&dev, 1);
    let ran = Arc::new(AtomicU32::new(0));
    let r = Arc::clone(&ran);
    let k = CpuKernel::new(move |_, _| {
        r.fetch_add(1, SeqCst);
        std::thread::sleep(Duration::from_micros(50));
        Ok(())
    });
    let id = dev
        .launch(&k, Invocations::All(200_000), &[])
        .expect("launch");
    let f = dev.faults();
    f.lose_device("injected loss");
    let lost = |r: Result<(), BackendError>| match r {
        Err(BackendError::DeviceLost(m)) => assert_eq!(m, "injected loss"),
        other => panic!("expected DeviceLost, got {other:?}"),
    };
    lost(dev.wait(id, Some(Duration::from_millis(1))).map(|_| ()));
    let after = ran.load(SeqCst);
    assert!(after < 200_000, "queued invocations were skipped");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(ran.load(SeqCst), after, "no work runs after DeviceLost");
    lost(dev.take_outcome(id).map(|_| ()));
    let mut host = vec![0u8; PAGE];
    for kind in Call::ALL {
        if !matches!(kind, Call::BindWindow | Call::UnbindWindow) {
            lost(call_once(&dev, kind, &mut host));
        }
    }
    f.clear_all();
    lost(dev.write_ptes(&[leaf(0, Pte::EMPTY)]));
    assert_eq!(
        dev.entries_naming(PoolSlot(0)).len(),
        1,
        "nothing was applied"
    );
}
