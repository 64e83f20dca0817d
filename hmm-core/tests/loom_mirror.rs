//! Model-checked interleavings of the mirror's destructive path, against an
//! in-memory host and device (`loom_fakes`).
//!
//! Run with
//! `RUSTFLAGS="--cfg hmm_loom" cargo test -p hmm-core --release --test loom_mirror`.
//! The fake device checks every read a launch makes against the fake CPU
//! memory (a stale read fails the model), and every copy and entry write
//! against its own table (a slot reused while an entry names it fails it).
#![cfg(hmm_loom)]

mod loom_fakes;

use std::sync::Arc;
use std::time::Duration;

use loom::thread;

use hmm_core::mirror::{Mirror, MirrorConfig, MirrorError};
use loom_fakes::{pages, FakeDevice, FakeHost, Held};

/// The page the models fault on.
const P: u64 = 0x10_0000;

fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(3, f)
}

/// A model whose interleavings are explored up to `bound` preemptions
/// (unless `LOOM_MAX_PREEMPTIONS` says otherwise).
fn model_bounded(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(bound);
    }
    b.check(f);
}

fn cfg(chunk_sizes: Vec<u64>) -> MirrorConfig {
    MirrorConfig {
        pool_slots: 4,
        table_pages: 8,
        chunk_sizes,
        fault_batch: 256,
        max_replays: 8,
        // Wall time: never reached by a model's execution.
        retry_timeout: Duration::from_secs(60),
        foreign_writers: hmm_core::mirror::ForeignWriters::Check,
        cpu_writes: hmm_core::mirror::CpuWrites::Protect,
        // The models' faults are single pages in a 4-slot pool: nothing to
        // speculate on, and speculation adds no protocol (it goes through
        // the same `service_run` as a fault).
        fetch: hmm_core::mirror::FetchPolicy::Exact,
    }
}

type M = Mirror<FakeDevice, FakeHost>;

/// A mirror over `n` pages at `P` holding values 1, 2, ….
fn setup(n: u64, chunk_sizes: Vec<u64>) -> (Arc<FakeHost>, Arc<M>) {
    let host = FakeHost::new(pages(P, n), 1);
    let dev = FakeDevice::new(&host, pages(P, n));
    let m = Mirror::new(Arc::clone(&host), dev, cfg(chunk_sizes)).unwrap();
    (host, Arc::new(m))
}

/// A launch reading the page at `va` once; `Ok(())` or the error.
fn read(m: &M, va: u64) -> Result<(), MirrorError> {
    m.launch(&[va][..], 1, ()).map(|_| ())
}

/// (1) A destructive event (`MADV_DONTNEED`: the page reads as zeros) races
/// a launch and its fault-service round. Whoever holds the driver lock
/// when the callback runs gets the zap queued and drains it; a later
/// launch must read the zeros, and the launch itself never reads the old
/// value after the event ended (the device checks both).
#[test]
fn remove_racing_fault_service_and_launch() {
    model(|| {
        let (host, m) = setup(1, vec![0x1000]);
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || read(&m2, P));
        host.remove(pages(P, 1));
        t.join().unwrap().unwrap();
        m.backend().strict();
        read(&m, P).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 0)));
    });
}

/// (1, bug a) A remap racing the fault that registers the first region
/// there: the invalidation hits no subscription when it starts, so the
/// region's notifier is inserted while it is active. Its sequence must
/// make the fault retry (wait for the end), or the fault commits the old
/// page and the next launch reads it.
#[test]
fn remap_racing_first_fault_registration() {
    model(|| {
        let (host, m) = setup(1, vec![0x1000]);
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || read(&m2, P));
        host.remap(pages(P, 1), 7);
        t.join().unwrap().unwrap();
        m.backend().strict();
        read(&m, P).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 7)));
        assert!(m.flush_releases());
    });
}

/// (2) A destructive event while the driver lock is held by a thread
/// waiting for the device (the install's entry write is held at the gate).
/// The invalidation must not wait for the lock — it would deadlock, since
/// the device "completes" only after it — and the zap it queues must be
/// applied before any later device use.
#[test]
fn remove_while_lock_holder_waits_for_the_device() {
    model(|| {
        let (host, m) = setup(1, vec![0x1000]);
        let gate = m.backend().gate();
        gate.arm(Held::InstallWrite);
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || read(&m2, P));
        gate.wait_entered();
        host.remove(pages(P, 1));
        gate.open();
        t.join().unwrap().unwrap();
        m.backend().strict();
        // The launch above read the old page before the event, or the new
        // one after; whichever, the zap queued while it held the lock is
        // gone from the device now.
        read(&m, P).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 0)));
    });
}

/// (3, bug b) A dead region (remapped) is released by the worker while a
/// new fault on the same range runs and the test flushes releases:
/// `flush_releases` returns only once the release is complete, including
/// one the worker (or the fault) has already taken out of the region map.
#[test]
fn dead_region_release_racing_new_fault_and_flush() {
    // Four threads (the worker included): 3 preemptions take a minute.
    model_bounded(2, || {
        let (host, m) = setup(1, vec![0x1000]);
        read(&m, P).unwrap();
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || read(&m2, P));
        host.remap(pages(P, 1), 9);
        assert!(m.flush_releases());
        assert_eq!(m.stats().deferred_releases, 1, "a release still running");
        t.join().unwrap().unwrap();
        m.backend().strict();
        read(&m, P).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 9)));
    });
}

/// (3, bug c) The region chosen for a fault loses part of its mapping
/// before it is watched: registration marks it dead and reports
/// `RegionReleased`, and the fault must choose again (the page it wants
/// stays mapped throughout, so the launch succeeds).
#[test]
fn region_reshaped_during_registration_is_chosen_again() {
    model(|| {
        let (host, m) = setup(2, vec![0x2000, 0x1000]);
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || read(&m2, P));
        host.unmap(pages(P + 0x1000, 1));
        t.join().unwrap().unwrap();
        m.backend().strict();
        read(&m, P).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 1)));
        assert!(m.flush_releases());
    });
}

/// Device-private migration (issue 17): a page migrated while a CPU thread
/// loads it. The load sees the page's value either before the move or by
/// the fault-back that waits for the migration to finish; never a zero
/// page (the fake host fails the model if a hole the mirror still holds is
/// zero-filled). Afterwards the device reads the same value.
#[test]
fn migration_racing_a_cpu_load() {
    model(|| {
        let (host, m) = setup(1, vec![0x1000]);
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || m2.migrate_to_device(pages(P, 1)).map(|_| ()));
        assert_eq!(host.cpu_read(P), Some(1));
        t.join().unwrap().unwrap();
        assert_eq!(host.cpu_read(P), Some(1));
        m.backend().strict();
        read(&m, P).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 1)));
    });
}

/// A CPU load faulting a migrated page back while a launch reads it: the
/// fault-back waits for the launch; both see the page's value, and the
/// mirror never touches the hole from under its lock (the fake host fails
/// the model if it does).
#[test]
fn fault_back_racing_a_launch() {
    model(|| {
        let (host, m) = setup(1, vec![0x1000]);
        m.migrate_to_device(pages(P, 1)).unwrap();
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || read(&m2, P));
        assert_eq!(host.cpu_read(P), Some(1));
        t.join().unwrap().unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 1)));
        assert_eq!(m.stats().migrated_in, 1);
    });
}

/// A fault-back racing `MADV_DONTNEED` of the migrated page: the load sees
/// the old value (given back before the discard) or zeros (after it);
/// once the discard is done, the CPU and the device both read zeros.
#[test]
fn fault_back_racing_a_discard() {
    model(|| {
        let (host, m) = setup(1, vec![0x1000]);
        m.migrate_to_device(pages(P, 1)).unwrap();
        let h2 = Arc::clone(&host);
        let t = thread::spawn(move || h2.remove(pages(P, 1)));
        let v = host.cpu_read(P);
        assert!(v == Some(1) || v == Some(0), "{v:?}");
        t.join().unwrap();
        assert_eq!(host.cpu_read(P), Some(0));
        m.backend().strict();
        read(&m, P).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P, 0)));
    });
}

/// A CPU load with nothing else going on is answered by the event
/// monitor's reader (`fault_back_now`: the page alone, the books left for
/// the next holder of the driver lock); a launch racing a second load
/// settles them before it submits, and reads the page's value.
#[test]
fn reader_answer_settled_by_the_next_lock_holder() {
    model(|| {
        let (host, m) = setup(2, vec![0x1000]);
        m.migrate_to_device(pages(P, 2)).unwrap();
        assert_eq!(host.cpu_read(P), Some(1));
        assert_eq!(m.stats().fault_backs_on_reader, 1);
        let m2 = Arc::clone(&m);
        let t = thread::spawn(move || read(&m2, P));
        assert_eq!(host.cpu_read(P + 0x1000), Some(2));
        t.join().unwrap().unwrap();
        assert_eq!(m.stats().migrated_in, 2);
        m.backend().strict();
        read(&m, P + 0x1000).unwrap();
        assert_eq!(m.backend().reads().last(), Some(&(P + 0x1000, 2)));
    });
}
