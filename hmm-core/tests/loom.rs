//! Model-checked interleavings of the notifier protocol.
//!
//! Run with `RUSTFLAGS="--cfg hmm_loom" cargo test -p hmm-core --release --test loom`.
//! Built with that cfg, `hmm-core` takes its locks and atomics from loom
//! (the crate-local `sync` shim), so loom explores the shipped code.
#![cfg(hmm_loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use loom::sync::Mutex;
use loom::thread;
use std::sync::Arc;

use hmm_core::notifier::{
    AddressSpace, EventKind, Interval, IntervalNotifier, NotifierRange, Seq, SpaceNotifier,
    Subscription,
};
use hmm_core::{NotifierError, VaRange, VirtAddr};

fn r(start: u64, end: u64) -> VaRange {
    VaRange::new(VirtAddr(start), VirtAddr(end)).unwrap()
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// One mirrored page: the driver lock guards the device PTE, which holds
/// the page version it was filled from.
struct Mirror {
    pte: Mutex<Option<u64>>,
    page: Arc<AtomicU64>,
    called_after_remove: Arc<AtomicBool>,
    removed: Arc<AtomicBool>,
    releases: Arc<AtomicUsize>,
}

impl Mirror {
    fn new(page: &Arc<AtomicU64>) -> Self {
        Mirror {
            pte: Mutex::new(None),
            page: Arc::clone(page),
            called_after_remove: Arc::new(AtomicBool::new(false)),
            removed: Arc::new(AtomicBool::new(false)),
            releases: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl IntervalNotifier for Mirror {
    fn invalidate(&self, i: &Interval, _r: &NotifierRange, s: Seq) -> bool {
        if self.removed.load(Ordering::SeqCst) {
            self.called_after_remove.store(true, Ordering::SeqCst);
        }
        let mut pte = self.pte.lock().unwrap();
        i.set_seq(s);
        *pte = None;
        true
    }
    fn release(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
    }
}

/// The device fault path: read_begin → snapshot → lock → read_retry → commit.
fn fault(sub: &Subscription<Mirror>) {
    loop {
        let seq = sub.interval().read_begin();
        let snap = sub.page.load(Ordering::SeqCst);
        let mut pte = sub.pte.lock().unwrap();
        if sub.interval().read_retry(seq) {
            continue;
        }
        *pte = Some(snap);
        return;
    }
}

/// The CPU changes the page between invalidate start and end.
fn cpu_rewrite(space: &AddressSpace, page: &AtomicU64, range: VaRange) {
    let g = space
        .invalidate_start(NotifierRange::new(range, EventKind::CpuWrite))
        .unwrap();
    page.store(1, Ordering::SeqCst);
    drop(g);
}

#[test]
fn fault_vs_invalidate_never_commits_a_stale_snapshot() {
    model(|| {
        let page = Arc::new(AtomicU64::new(0));
        let space = AddressSpace::new();
        let sub = Arc::new(space.insert(r(0x1000, 0x2000), Mirror::new(&page)).unwrap());
        let s2 = Arc::clone(&sub);
        let t = thread::spawn(move || fault(&s2));
        cpu_rewrite(&space, &page, r(0x1000, 0x2000));
        t.join().unwrap();
        let pte = *sub.pte.lock().unwrap();
        assert!(pte.is_none() || pte == Some(1), "stale device PTE {pte:?}");
    });
}

#[test]
fn insert_during_invalidation_is_deferred_and_first_fault_sees_new_data() {
    model(|| {
        let page = Arc::new(AtomicU64::new(0));
        let space = AddressSpace::new();
        // Makes the invalidation hit, so inserts during it are deferred.
        let _anchor = space.insert(r(0x1000, 0x2000), Mirror::new(&page)).unwrap();
        let sp2 = space.clone();
        let p2 = Arc::clone(&page);
        let t = thread::spawn(move || {
            let s = sp2.insert(r(0x1000, 0x2000), Mirror::new(&p2)).unwrap();
            fault(&s);
            s
        });
        cpu_rewrite(&space, &page, r(0x1000, 0x2000));
        let s = t.join().unwrap();
        // Inserted before the walk: the callback zapped any early commit.
        // Inserted during it: deferred, and read_begin waited for the end.
        // Either way a surviving PTE holds the rewritten page.
        let pte = *s.pte.lock().unwrap();
        assert!(pte.is_none() || pte == Some(1), "stale device PTE {pte:?}");
    });
}

#[test]
fn deferred_insert_waits_for_the_running_invalidation() {
    model(|| {
        let page = Arc::new(AtomicU64::new(0));
        let space = AddressSpace::new();
        let anchor = space.insert(r(0x1000, 0x2000), Mirror::new(&page)).unwrap();
        let g = space
            .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Unmap))
            .unwrap();
        let sp2 = space.clone();
        let p2 = Arc::clone(&page);
        // Inserted while the invalidation runs: the walk never told it about
        // the range, so its first fault must wait for the end.
        let late = Arc::new(sp2.insert(r(0x1000, 0x2000), Mirror::new(&p2)).unwrap());
        let l2 = Arc::clone(&late);
        let t = thread::spawn(move || {
            fault(&l2);
        });
        page.store(1, Ordering::SeqCst);
        drop(g);
        t.join().unwrap();
        assert_eq!(*late.pte.lock().unwrap(), Some(1));
        drop(anchor);
    });
}

#[test]
fn remove_racing_invalidation_no_callback_after_remove_returns() {
    model(|| {
        let page = Arc::new(AtomicU64::new(0));
        let space = AddressSpace::new();
        let sub = space.insert(r(0x1000, 0x2000), Mirror::new(&page)).unwrap();
        let removed = Arc::clone(&sub.removed);
        let late_call = Arc::clone(&sub.called_after_remove);
        let releases = Arc::clone(&sub.releases);
        let t = thread::spawn(move || {
            sub.remove().unwrap();
            removed.store(true, Ordering::SeqCst);
        });
        space.invalidate(r(0x1000, 0x2000), EventKind::Unmap);
        t.join().unwrap();
        assert!(
            !late_call.load(Ordering::SeqCst),
            "callback ran after remove returned"
        );
        assert_eq!(releases.load(Ordering::SeqCst), 1);
        assert!(space.subscribed_ranges().is_empty());
    });
}

struct Putter {
    victim: Mutex<Option<Subscription<Mirror>>>,
}
impl IntervalNotifier for Putter {
    fn invalidate(&self, _i: &Interval, _r: &NotifierRange, _s: Seq) -> bool {
        drop(self.victim.lock().unwrap().take());
        true
    }
}

#[test]
fn put_from_a_callback_releases_once_after_the_walk() {
    model(|| {
        let page = Arc::new(AtomicU64::new(0));
        let space = AddressSpace::new();
        let victim = space.insert(r(0x1000, 0x2000), Mirror::new(&page)).unwrap();
        let releases = Arc::clone(&victim.releases);
        let released_flag = Arc::clone(&victim.removed);
        let late_call = Arc::clone(&victim.called_after_remove);
        let putter = space
            .insert(
                r(0x1000, 0x2000),
                Putter {
                    victim: Mutex::new(Some(victim)),
                },
            )
            .unwrap();
        let sp2 = space.clone();
        let t = thread::spawn(move || sp2.invalidate(r(0x1000, 0x2000), EventKind::Remove));
        space.invalidate(r(0x1000, 0x2000), EventKind::Unmap);
        t.join().unwrap();
        assert_eq!(releases.load(Ordering::SeqCst), 1);
        // After release nothing may call it: mark and invalidate again.
        released_flag.store(true, Ordering::SeqCst);
        space.invalidate(r(0x1000, 0x2000), EventKind::Clear);
        assert!(!late_call.load(Ordering::SeqCst));
        assert_eq!(space.subscribed_ranges(), vec![r(0x1000, 0x2000)]);
        drop(putter);
    });
}

#[derive(Default)]
struct Rel(loom::sync::atomic::AtomicUsize);
impl SpaceNotifier for Rel {
    fn release(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn release_runs_once_at_teardown_racing_registration() {
    model(|| {
        let space = AddressSpace::new();
        let first = Arc::new(Rel::default());
        space.register_notifier(first.clone()).unwrap();
        let second = Arc::new(Rel::default());
        let sp2 = space.clone();
        let s2 = Arc::clone(&second);
        let t = thread::spawn(move || sp2.register_notifier(s2).is_ok());
        space.teardown();
        let registered = t.join().unwrap();
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        assert_eq!(second.0.load(Ordering::SeqCst), usize::from(registered));
        assert!(matches!(
            space.register_notifier(Arc::new(Rel::default())),
            Err(NotifierError::TornDown)
        ));
    });
}

/// The monitor's reading thread for one event (7, about page 7): reads it
/// from the kernel's queue (`kernel`: 1 while unread), sets `read` — the
/// moment the thread that caused it resumes — queues it, then stops the
/// queue.
fn spawn_reader(
    q: &Arc<hmm_core::cpu::handoff::EventQueue<u32>>,
    kernel: &Arc<AtomicUsize>,
    read: &Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    let (q, kernel, read) = (Arc::clone(q), Arc::clone(kernel), Arc::clone(read));
    thread::spawn(move || {
        q.begin_read();
        if kernel.swap(0, Ordering::SeqCst) == 1 {
            read.store(true, Ordering::SeqCst);
            q.push(7);
        }
        q.end_read();
        q.stop();
    })
}

/// The event monitor's hand-off from its reading thread to its handling
/// thread (`hmm_core::cpu::handoff`): the thread that caused an event
/// resumes once the event is read (here: once `read` is set, which the
/// reader does even before queueing it); if it then sees `quiet`, its
/// event has been handled — the guarantee a launch's sync point rests on.
#[test]
fn monitor_handoff_quiet_means_handled() {
    use hmm_core::cpu::handoff::EventQueue;
    model(|| {
        let q = Arc::new(EventQueue::<u32>::new(1));
        // One event in the kernel's queue, not read yet.
        let kernel = Arc::new(AtomicUsize::new(1));
        let read = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(AtomicUsize::new(0));
        let reader = spawn_reader(&q, &kernel, &read);
        let handler = {
            let (q, handled) = (Arc::clone(&q), Arc::clone(&handled));
            thread::spawn(move || {
                while let Some(ev) = q.pop() {
                    assert_eq!(ev, 7);
                    handled.fetch_add(1, Ordering::SeqCst);
                    q.done();
                }
            })
        };
        // The unmapper: its event was read, then a sync point.
        while !read.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        while !q.quiet(|| kernel.load(Ordering::SeqCst) > 0) {
            thread::yield_now();
        }
        assert_eq!(
            handled.load(Ordering::SeqCst),
            1,
            "quiet before the event was handled"
        );
        reader.join().unwrap();
        handler.join().unwrap();
    });
}

/// Shutdown of the event monitor (`EventMonitor`'s reader, `run`): the
/// reader reads on until the handler has handled everything queued, and
/// only then stops the queue and waits for the handler. Here the handler,
/// handling event 1, waits until event 2 has been *read* — a device whose
/// worker thread caused event 2 (lavapipe freeing memory in a watched
/// range) and runs the copy the handler waits for. A reader that stopped
/// and joined the handler first would never read event 2 (CI hung so).
#[test]
fn monitor_shutdown_reads_on_until_handled() {
    use hmm_core::cpu::handoff::EventQueue;
    use loom::sync::Condvar;
    /// Events in the kernel's queue not read yet; whether event 2 was read.
    struct Kernel {
        unread: usize,
        second_read: bool,
    }
    model(|| {
        let q = Arc::new(EventQueue::<u32>::new(4));
        // One lock and condvar for the kernel side; the reader's `poll`
        // (with its timeout) is a wait that an event or the handler's
        // progress ends.
        let k = Arc::new((
            Mutex::new(Kernel {
                unread: 0,
                second_read: false,
            }),
            Condvar::new(),
        ));
        let handler = {
            let (q, k) = (Arc::clone(&q), Arc::clone(&k));
            thread::spawn(move || {
                while let Some(ev) = q.pop() {
                    if ev == 1 {
                        let mut g = k.0.lock().unwrap();
                        while !g.second_read {
                            g = k.1.wait(g).unwrap();
                        }
                    }
                    q.done();
                    let _g = k.0.lock().unwrap();
                    k.1.notify_all();
                }
            })
        };
        // The device's worker: causes event 2 and waits for it to be read.
        let worker = {
            let k = Arc::clone(&k);
            thread::spawn(move || {
                let mut g = k.0.lock().unwrap();
                g.unread += 1;
                k.1.notify_all();
                while !g.second_read {
                    g = k.1.wait(g).unwrap();
                }
            })
        };
        // The reader: event 1 was read before the shutdown request.
        q.begin_read();
        q.push(1);
        q.end_read();
        // Shutdown: read on until everything queued is handled.
        loop {
            if q.handled_all() {
                break;
            }
            let mut g = k.0.lock().unwrap();
            if g.unread > 0 {
                g.unread -= 1;
                q.begin_read();
                g.second_read = true;
                k.1.notify_all();
                drop(g);
                q.push(2);
                q.end_read();
                continue;
            }
            if q.handled_all() {
                break;
            }
            drop(k.1.wait(g).unwrap());
        }
        q.stop();
        handler.join().unwrap();
        worker.join().unwrap();
        assert!(k.0.lock().unwrap().second_read);
    });
}

/// The monitor's reader serves a missing-page fault itself only when
/// every event it read before it has been handled
/// (`Shared::resolved_now`): a discard read first (event 1) is applied by
/// the handler's sink before the fault (event 2) is served, on whichever
/// thread serves it. The sink's effect is a plain cell — the mirror's
/// state, reached under its locks in the real code — so loom reports a
/// data race if `done`/`handled_all` did not order the discard's write
/// before the reader's read.
#[test]
fn reader_serves_only_after_earlier_events() {
    use hmm_core::cpu::handoff::EventQueue;
    use loom::cell::UnsafeCell;
    struct Page(UnsafeCell<u64>);
    // SAFETY (test): accesses are ordered by the protocol under test, which
    // loom checks.
    unsafe impl Sync for Page {}
    model(|| {
        let q = Arc::new(EventQueue::<u32>::new(4));
        // 7: the migrated data; 0: discarded (the CPU reads zeros).
        let page = Arc::new(Page(UnsafeCell::new(7)));
        let served = Arc::new(AtomicUsize::new(0));
        let serve = |page: &Page, served: &AtomicUsize| {
            // SAFETY (test): see `Page`.
            let v = page.0.with(|p| unsafe { *p });
            assert_eq!(v, 0, "a fault overtook the discard read before it");
            served.fetch_add(1, Ordering::SeqCst);
        };
        let handler = {
            let (q, page, served) = (Arc::clone(&q), Arc::clone(&page), Arc::clone(&served));
            thread::spawn(move || {
                while let Some(ev) = q.pop() {
                    if ev == 1 {
                        // SAFETY (test): see `Page`.
                        page.0.with_mut(|p| unsafe { *p = 0 });
                    } else {
                        serve(&page, &served);
                    }
                    q.done();
                }
            })
        };
        // The reader: the discard in one read, the fault in the next.
        q.begin_read();
        q.push(1);
        q.end_read();
        q.begin_read();
        if q.handled_all() {
            serve(&page, &served);
        } else {
            q.push(2);
        }
        q.end_read();
        while !q.handled_all() {
            thread::yield_now();
        }
        q.stop();
        handler.join().unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 1);
    });
}

/// A replay round submitted after a discard returned never reads through
/// the discarded page's entry (`HostSpace::settle` before every
/// submission, then the driver lock, whose acquisition applies queued
/// zaps). The handler zaps the entry itself when the driver lock is free
/// and queues the zap for the lock's next holder when it is not — here
/// the launcher's fault service, which may hold the lock while the event
/// is read and handled. Without the wait, the launcher could take the
/// lock before the handler ran and submit with the old entry.
#[test]
fn monitor_settle_then_lock_drops_a_discarded_entry() {
    use hmm_core::cpu::handoff::EventQueue;
    model(|| {
        let q = Arc::new(EventQueue::<u32>::new(1));
        let kernel = Arc::new(AtomicUsize::new(1));
        let read = Arc::new(AtomicBool::new(false));
        // The driver lock and the entry it guards (Some: mapped).
        let dev = Arc::new(Mutex::new(Some(7u32)));
        let pending = Arc::new(Mutex::new(Vec::<u32>::new()));
        let reader = spawn_reader(&q, &kernel, &read);
        let handler = {
            let (q, dev, pending) = (Arc::clone(&q), Arc::clone(&dev), Arc::clone(&pending));
            thread::spawn(move || {
                while let Some(page) = q.pop() {
                    match dev.try_lock() {
                        Ok(mut entry) => {
                            if *entry == Some(page) {
                                *entry = None;
                            }
                        }
                        Err(_) => pending.lock().unwrap().push(page),
                    }
                    q.done();
                }
            })
        };
        // Fault service of the launch holds the driver lock a while.
        {
            let _install = dev.lock().unwrap();
            thread::yield_now();
        }
        // The discard returned (its event was read); the next round:
        while !read.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        while !q.quiet(|| kernel.load(Ordering::SeqCst) > 0) {
            thread::yield_now();
        }
        let mut entry = dev.lock().unwrap();
        for page in pending.lock().unwrap().drain(..) {
            if *entry == Some(page) {
                *entry = None;
            }
        }
        assert_eq!(
            *entry, None,
            "a round was submitted with the discarded entry"
        );
        drop(entry);
        reader.join().unwrap();
        handler.join().unwrap();
    });
}

/// The ring is bounded: a reader that finds it full waits for the handler,
/// nothing is lost or reordered, and stopping ends the handler only once
/// the ring is empty.
#[test]
fn monitor_handoff_full_ring_waits_and_keeps_order() {
    use hmm_core::cpu::handoff::EventQueue;
    model(|| {
        let q = Arc::new(EventQueue::<u32>::new(1));
        let got = Arc::new(Mutex::new(Vec::new()));
        let handler = {
            let (q, got) = (Arc::clone(&q), Arc::clone(&got));
            thread::spawn(move || {
                while let Some(ev) = q.pop() {
                    got.lock().unwrap().push(ev);
                    q.done();
                }
            })
        };
        q.begin_read();
        q.push(1);
        q.push(2);
        q.end_read();
        q.stop();
        handler.join().unwrap();
        assert_eq!(*got.lock().unwrap(), vec![1, 2]);
        assert!(q.quiet(|| false));
    });
}

/// The prepare-fork gate (`cpu::fork_prep::ForkGate`): a fork is never made
/// while a migration is between moving its pages out and marking them (the
/// child would read zeros nobody gives back), a migration never runs inside
/// a fork, and neither side waits forever. One migration races one fork
/// (both sides wait by spinning, yielding; with a second migration the
/// model exceeds loom's branch budget).
#[test]
fn fork_gate_keeps_forks_and_migrations_apart() {
    use hmm_core::cpu::fork_prep::ForkGate;
    model(|| {
        let gate = Arc::new(ForkGate::new());
        let forking = Arc::new(AtomicBool::new(false));
        // Per migration: moved out, then marked.
        let steps: Arc<[(AtomicBool, AtomicBool); 1]> =
            Arc::new([(AtomicBool::new(false), AtomicBool::new(false))]);
        let migrations: Vec<_> = (0..1)
            .map(|k| {
                let (gate, forking, steps) = (gate.clone(), forking.clone(), steps.clone());
                thread::spawn(move || {
                    let _held = gate.hold();
                    assert!(!forking.load(Ordering::SeqCst), "a migration inside a fork");
                    steps[k].0.store(true, Ordering::SeqCst);
                    steps[k].1.store(true, Ordering::SeqCst);
                })
            })
            .collect();
        gate.begin_fork();
        forking.store(true, Ordering::SeqCst);
        for (moved, marked) in steps.iter() {
            assert_eq!(
                moved.load(Ordering::SeqCst),
                marked.load(Ordering::SeqCst),
                "a fork between a move and its marks"
            );
        }
        forking.store(false, Ordering::SeqCst);
        gate.end_fork();
        for m in migrations {
            m.join().unwrap();
        }
        assert!(steps
            .iter()
            .all(|(_, marked)| marked.load(Ordering::SeqCst)));
    });
}
