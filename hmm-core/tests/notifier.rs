//! One test per rule of the interval-notifier protocol (see
//! `hmm_core::notifier`), the awkward cases included.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use hmm_core::notifier::{
    retry_loop, AddressSpace, Attempt, EventKind, Interval, IntervalNotifier, NotifierRange,
    OwnerTag, RetryError, Seq, SpaceNotifier, Subscription,
};
use hmm_core::{NotifierError, VaRange, VirtAddr};

fn r(start: u64, end: u64) -> VaRange {
    VaRange::new(VirtAddr(start), VirtAddr(end)).unwrap()
}

/// Records every callback; optionally refuses (non-blockable) or runs a
/// hook inside the callback.
/// (range, event, owner, cur_seq) of one callback.
type Call = (VaRange, EventKind, Option<OwnerTag>, u64);

#[derive(Default)]
struct Rec {
    calls: Mutex<Vec<Call>>,
    releases: AtomicUsize,
    refuse: AtomicBool,
    driver_lock: Mutex<()>,
    #[allow(clippy::type_complexity)]
    hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

impl Rec {
    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn releases(&self) -> usize {
        self.releases.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Default)]
struct Ops(Arc<Rec>);

impl IntervalNotifier for Ops {
    fn invalidate(&self, interval: &Interval, range: &NotifierRange, cur_seq: Seq) -> bool {
        if !range.blockable && self.0.refuse.load(Ordering::SeqCst) {
            return false;
        }
        let _g = self.0.driver_lock.lock().unwrap();
        interval.set_seq(cur_seq);
        let seq = format!("{cur_seq:?}");
        let n: u64 = seq
            .trim_start_matches("Seq(")
            .trim_end_matches(')')
            .parse()
            .unwrap();
        self.0
            .calls
            .lock()
            .unwrap()
            .push((range.range, range.event, range.owner, n));
        drop(_g);
        let hook = self.0.hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
        }
        true
    }
    fn release(&self) {
        self.0.releases.fetch_add(1, Ordering::SeqCst);
    }
}

fn sub(space: &AddressSpace, range: VaRange) -> (Subscription<Ops>, Arc<Rec>) {
    let ops = Ops::default();
    let rec = Arc::clone(&ops.0);
    (space.insert(range, ops).unwrap(), rec)
}

#[test]
fn invalidate_reaches_overlapping_subscriptions_only() {
    let space = AddressSpace::new();
    let (_a, ra) = sub(&space, r(0x1000, 0x3000));
    let (_b, rb) = sub(&space, r(0x3000, 0x5000));
    let (_c, rc) = sub(&space, r(0x2000, 0x4000));
    let before = space.current_seq();
    assert_eq!(before % 2, 0);
    space.invalidate(r(0x2fff, 0x3001), EventKind::Unmap);
    assert_eq!((ra.calls(), rb.calls(), rc.calls()), (1, 1, 1));
    space.invalidate(r(0x1000, 0x2000), EventKind::Remove);
    assert_eq!((ra.calls(), rb.calls(), rc.calls()), (2, 1, 1));
    // Touching the end is not overlapping.
    space.invalidate(r(0x5000, 0x6000), EventKind::Remove);
    assert_eq!((ra.calls(), rb.calls(), rc.calls()), (2, 1, 1));
    // The callback saw an odd sequence; the space is even again after.
    let seen = ra.calls.lock().unwrap()[0].3;
    assert_eq!(seen % 2, 1);
    assert_eq!(space.current_seq() % 2, 0);
    assert!(space.current_seq() > before);
    assert_eq!(ra.calls.lock().unwrap()[1].1, EventKind::Remove);
}

#[test]
fn invalidation_missing_every_subscription_leaves_sequence_alone() {
    let space = AddressSpace::new();
    let (_a, ra) = sub(&space, r(0x1000, 0x2000));
    let s0 = space.current_seq();
    let g = space
        .invalidate_start(NotifierRange::new(r(0x8000, 0x9000), EventKind::Clear))
        .unwrap();
    assert_eq!(space.current_seq(), s0, "no overlap: sequence stays even");
    drop(g);
    assert_eq!(space.current_seq(), s0);
    assert_eq!(ra.calls(), 0);
}

#[test]
fn owner_and_event_reach_the_callback() {
    let space = AddressSpace::new();
    let (_a, ra) = sub(&space, r(0x1000, 0x2000));
    let g = space
        .invalidate_start(
            NotifierRange::new(r(0x1000, 0x2000), EventKind::Coherence).with_owner(OwnerTag(7)),
        )
        .unwrap();
    assert_eq!(g.range().owner, Some(OwnerTag(7)));
    drop(g);
    let c = ra.calls.lock().unwrap()[0];
    assert_eq!((c.1, c.2), (EventKind::Coherence, Some(OwnerTag(7))));
}

#[test]
fn read_retry_detects_an_invalidation_between_begin_and_commit() {
    let space = AddressSpace::new();
    let (s, _) = sub(&space, r(0x1000, 0x2000));
    let seq = s.interval().read_begin();
    assert!(!s.interval().read_retry(seq));
    assert!(!s.interval().check_retry(seq));
    space.invalidate(r(0x1000, 0x1001), EventKind::CpuWrite);
    assert!(s.interval().read_retry(seq));
    assert!(s.interval().check_retry(seq));
    let seq2 = s.interval().read_begin();
    assert_ne!(seq, seq2);
    assert!(!s.interval().read_retry(seq2));
    // An invalidation elsewhere does not disturb it.
    space.invalidate(r(0x9000, 0xa000), EventKind::CpuWrite);
    assert!(!s.interval().read_retry(seq2));
}

#[test]
fn read_begin_waits_while_an_invalidation_that_reached_it_runs() {
    let space = AddressSpace::new();
    let (s, _) = sub(&space, r(0x1000, 0x2000));
    let (other, _) = sub(&space, r(0x8000, 0x9000));
    let g = space
        .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Unmap))
        .unwrap();
    // Deterministic: the invalidation cannot end while we hold the guard.
    let e = s
        .interval()
        .read_begin_timeout(Duration::from_millis(30))
        .unwrap_err();
    assert!(matches!(e, NotifierError::RetryTimeout { .. }));
    // A subscription the invalidation did not reach is not held up.
    assert!(other
        .interval()
        .read_begin_timeout(Duration::from_millis(30))
        .is_ok());
    // From another thread: returns once the guard drops.
    let sub_ref = s.ops_arc();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let seq = sub_ref.interval().read_begin();
        tx.send(seq).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "read_begin returned during invalidation"
    );
    drop(g);
    let seq = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("read_begin woke");
    t.join().unwrap();
    assert!(!s.interval().read_retry(seq));
}

#[test]
fn insert_during_invalidation_is_deferred_and_its_first_read_begin_waits() {
    let space = AddressSpace::new();
    let (_a, _) = sub(&space, r(0x1000, 0x2000));
    let g = space
        .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Unmap))
        .unwrap();
    let (late, rl) = sub(&space, r(0x1000, 0x3000));
    assert_eq!(space.stats().deferred_inserts, 1);
    assert_eq!(space.subscribed_ranges(), vec![r(0x1000, 0x2000)]);
    // A nested invalidation does not see the pending insert.
    space.invalidate(r(0x1000, 0x3000), EventKind::Clear);
    assert_eq!(rl.calls(), 0);
    assert!(late
        .interval()
        .read_begin_timeout(Duration::from_millis(20))
        .is_err());
    drop(g);
    assert_eq!(
        space.subscribed_ranges(),
        vec![r(0x1000, 0x2000), r(0x1000, 0x3000)]
    );
    let seq = late
        .interval()
        .read_begin_timeout(Duration::from_secs(1))
        .unwrap();
    space.invalidate(r(0x2000, 0x2001), EventKind::Clear);
    assert_eq!(rl.calls(), 1);
    assert!(late.interval().read_retry(seq));
}

#[test]
fn insert_and_put_from_inside_a_callback() {
    let space = AddressSpace::new();
    let (a, ra) = sub(&space, r(0x1000, 0x2000));
    let (victim, rv) = sub(&space, r(0x1000, 0x2000));
    let victim = Arc::new(Mutex::new(Some(victim)));
    let inserted: Arc<Mutex<Option<Subscription<Ops>>>> = Arc::default();
    {
        let space2 = space.clone();
        let victim = Arc::clone(&victim);
        let inserted = Arc::clone(&inserted);
        *ra.hook.lock().unwrap() = Some(Box::new(move || {
            // put: deferred, the walk may still be visiting it.
            victim.lock().unwrap().take().unwrap().put();
            // insert: deferred.
            let s = space2.insert(r(0x1000, 0x2000), Ops::default()).unwrap();
            *inserted.lock().unwrap() = Some(s);
        }));
    }
    space.invalidate(r(0x1000, 0x2000), EventKind::Unmap);
    let st = space.stats();
    assert_eq!((st.deferred_inserts, st.deferred_removes), (1, 1));
    // The walk still reached the put-pending victim (it was in the tree
    // when the walk started), and it was released exactly once, after.
    assert_eq!(rv.calls(), 1);
    assert_eq!(rv.releases(), 1);
    assert_eq!(space.subscribed_ranges().len(), 2, "a + the inserted one");
    drop(a);
    assert_eq!(ra.releases(), 1);
    assert!(inserted.lock().unwrap().is_some());
}

#[test]
fn remove_from_inside_a_callback_fails_loudly_and_becomes_put() {
    let space = AddressSpace::new();
    let (a, ra) = sub(&space, r(0x1000, 0x2000));
    let (victim, rv) = sub(&space, r(0x5000, 0x6000));
    let victim = Arc::new(Mutex::new(Some(victim)));
    let result = Arc::new(Mutex::new(None));
    {
        let victim = Arc::clone(&victim);
        let result = Arc::clone(&result);
        *ra.hook.lock().unwrap() = Some(Box::new(move || {
            let v = victim.lock().unwrap().take().unwrap();
            *result.lock().unwrap() = Some(v.remove());
        }));
    }
    space.invalidate(r(0x1000, 0x2000), EventKind::Unmap);
    assert_eq!(
        *result.lock().unwrap(),
        Some(Err(NotifierError::RemoveInCallback))
    );
    // Demoted to put: gone once the invalidation ended, released once.
    assert_eq!(rv.releases(), 1);
    assert_eq!(space.subscribed_ranges(), vec![r(0x1000, 0x2000)]);
    drop(a);
    assert_eq!(space.subscribed_ranges(), vec![]);
}

#[test]
fn remove_waits_for_the_running_invalidation() {
    let space = AddressSpace::new();
    let (s, rs) = sub(&space, r(0x1000, 0x2000));
    let g = space
        .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Unmap))
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let res = s.remove();
        tx.send(res).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "remove returned while a callback could still run"
    );
    assert_eq!(rs.releases(), 0);
    drop(g);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(()));
    t.join().unwrap();
    assert_eq!(rs.releases(), 1);
    assert!(space.subscribed_ranges().is_empty());
}

#[test]
fn remove_of_a_pending_insert_never_reaches_the_tree() {
    let space = AddressSpace::new();
    let (_a, _) = sub(&space, r(0x1000, 0x2000));
    let g = space
        .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Unmap))
        .unwrap();
    let (late, rl) = sub(&space, r(0x1000, 0x2000));
    late.remove().unwrap();
    assert_eq!(rl.releases(), 1);
    drop(g);
    assert_eq!(space.subscribed_ranges(), vec![r(0x1000, 0x2000)]);
}

#[test]
fn nested_and_overlapping_invalidations() {
    let space = AddressSpace::new();
    let (_a, ra) = sub(&space, r(0x1000, 0x3000));
    let g1 = space
        .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Unmap))
        .unwrap();
    let odd = space.current_seq();
    assert_eq!(odd % 2, 1);
    let g2 = space
        .invalidate_start(NotifierRange::new(r(0x1800, 0x2800), EventKind::Remove))
        .unwrap();
    assert_eq!(space.current_seq(), odd, "both share one odd sequence");
    let (late, _) = sub(&space, r(0x1000, 0x2000));
    drop(g1);
    assert_eq!(space.current_seq(), odd, "still odd while g2 runs");
    assert_eq!(
        space.subscribed_ranges().len(),
        1,
        "deferred until the last one ends"
    );
    drop(g2);
    assert_eq!(space.current_seq(), odd + 1);
    assert_eq!(space.subscribed_ranges().len(), 2);
    assert_eq!(ra.calls(), 2);
    let calls = ra.calls.lock().unwrap();
    assert_eq!(
        calls[0].3, calls[1].3,
        "same cur_seq for concurrent invalidations"
    );
    drop(late);
}

#[test]
fn non_blockable_invalidation_that_must_wait_reports_would_block() {
    struct Counting(AtomicUsize, AtomicUsize);
    impl SpaceNotifier for Counting {
        fn invalidate_range_start(&self, _r: &NotifierRange) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst);
            true
        }
        fn invalidate_range_end(&self, _r: &NotifierRange) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }
    let space = AddressSpace::new();
    let n = Arc::new(Counting(AtomicUsize::new(0), AtomicUsize::new(0)));
    let _h = space.register_notifier(n.clone()).unwrap();
    let (s, rs) = sub(&space, r(0x1000, 0x2000));
    rs.refuse.store(true, Ordering::SeqCst);
    let e = space
        .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Unmap).non_blocking())
        .err()
        .expect("must fail");
    assert_eq!(
        e,
        NotifierError::WouldBlock {
            range: r(0x1000, 0x2000)
        }
    );
    assert_eq!(space.current_seq() % 2, 0, "ended internally");
    assert_eq!(space.stats().would_block, 1);
    assert_eq!(
        (n.0.load(Ordering::SeqCst), n.1.load(Ordering::SeqCst)),
        (0, 0),
        "no start, no end"
    );
    // A blockable one goes through, and the refusing callback is not
    // consulted about blocking.
    let seq = s.interval().read_begin();
    space.invalidate(r(0x1000, 0x2000), EventKind::Unmap);
    assert!(s.interval().read_retry(seq));
    assert_eq!(
        (n.0.load(Ordering::SeqCst), n.1.load(Ordering::SeqCst)),
        (1, 1)
    );
}

#[test]
fn non_blockable_failure_in_a_space_notifier_backs_out_the_started_ones() {
    struct N(AtomicUsize, AtomicUsize, bool);
    impl SpaceNotifier for N {
        fn invalidate_range_start(&self, r: &NotifierRange) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst);
            r.blockable || !self.2
        }
        fn invalidate_range_end(&self, _r: &NotifierRange) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }
    let space = AddressSpace::new();
    let ok = Arc::new(N(AtomicUsize::new(0), AtomicUsize::new(0), false));
    let bad = Arc::new(N(AtomicUsize::new(0), AtomicUsize::new(0), true));
    space.register_notifier(ok.clone()).unwrap();
    space.register_notifier(bad.clone()).unwrap();
    let res = space
        .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::Clear).non_blocking());
    assert!(matches!(res, Err(NotifierError::WouldBlock { .. })));
    assert_eq!(ok.1.load(Ordering::SeqCst), 1, "started one was ended");
    assert_eq!(bad.1.load(Ordering::SeqCst), 0, "failed one was not");
}

#[test]
fn blockable_callback_returning_false_is_counted_and_skipped() {
    struct Liar;
    impl IntervalNotifier for Liar {
        fn invalidate(&self, _i: &Interval, _r: &NotifierRange, _s: Seq) -> bool {
            false
        }
    }
    let space = AddressSpace::new();
    let _l = space.insert(r(0x1000, 0x2000), Liar).unwrap();
    let (_a, ra) = sub(&space, r(0x1000, 0x2000));
    space.invalidate(r(0x1000, 0x2000), EventKind::Clear);
    assert_eq!(space.stats().contract_violations, 1);
    assert_eq!(ra.calls(), 1, "the walk went on");
}

#[test]
fn concurrent_faults_and_invalidations_never_commit_stale_snapshots() {
    // A device PTE for one page, committed by fault threads and zapped by
    // the callback; the CPU page's version changes only between an
    // invalidation's start and end. At every invalidation start (under the
    // driver lock) a present PTE must carry the current version.
    struct Mirror {
        lock: Mutex<Option<u64>>,
        stale: AtomicUsize,
        page: Arc<AtomicU64>,
    }
    impl IntervalNotifier for Mirror {
        fn invalidate(&self, i: &Interval, _r: &NotifierRange, s: Seq) -> bool {
            let mut pte = self.lock.lock().unwrap();
            i.set_seq(s);
            if let Some(v) = *pte {
                if v != self.page.load(Ordering::SeqCst) {
                    self.stale.fetch_add(1, Ordering::SeqCst);
                }
            }
            *pte = None;
            true
        }
    }
    let page = Arc::new(AtomicU64::new(0));
    let space = AddressSpace::new();
    let s = Arc::new(
        space
            .insert(
                r(0x1000, 0x2000),
                Mirror {
                    lock: Mutex::new(None),
                    stale: AtomicUsize::new(0),
                    page: Arc::clone(&page),
                },
            )
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut faulters = Vec::new();
    let commits = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let (s, page, stop, commits) = (
            Arc::clone(&s),
            Arc::clone(&page),
            Arc::clone(&stop),
            Arc::clone(&commits),
        );
        faulters.push(thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let res: Result<(), RetryError<()>> =
                    retry_loop(s.interval(), Duration::from_secs(5), |seq| {
                        let snap = page.load(Ordering::SeqCst);
                        // A real fault copies the page here; give the
                        // invalidator room to run in that window.
                        thread::yield_now();
                        let mut pte = s.lock.lock().unwrap();
                        if s.interval().read_retry(seq) {
                            return Ok(Attempt::Retry);
                        }
                        *pte = Some(snap);
                        Ok(Attempt::Done(()))
                    });
                res.unwrap();
                commits.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Run until the faulters have raced at least 20k invalidations and
    // committed many times (bounded in time so a bug cannot hang CI).
    let t0 = std::time::Instant::now();
    let mut rounds = 0;
    while (rounds < 20_000 || commits.load(Ordering::SeqCst) < 5_000)
        && t0.elapsed() < Duration::from_secs(20)
    {
        rounds += 1;
        let g = space
            .invalidate_start(NotifierRange::new(r(0x1000, 0x2000), EventKind::CpuWrite))
            .unwrap();
        page.fetch_add(1, Ordering::SeqCst);
        drop(g);
    }
    // One more check point for the last commit.
    space.invalidate(r(0x1000, 0x2000), EventKind::Clear);
    stop.store(true, Ordering::SeqCst);
    for f in faulters {
        f.join().unwrap();
    }
    assert_eq!(s.stale.load(Ordering::SeqCst), 0);
    assert!(commits.load(Ordering::SeqCst) > 0);
}

#[test]
fn retry_loop_gives_up_after_its_timeout() {
    let space = AddressSpace::new();
    let (s, _) = sub(&space, r(0x1000, 0x2000));
    let res: Result<(), RetryError<()>> =
        retry_loop(s.interval(), Duration::from_millis(20), |_| {
            Ok(Attempt::Retry)
        });
    match res {
        Err(RetryError::Notifier(NotifierError::RetryTimeout { attempts, elapsed })) => {
            assert!(attempts >= 1);
            assert!(elapsed >= Duration::from_millis(20));
        }
        other => panic!("expected timeout, got {other:?}"),
    }
    let res: Result<u32, RetryError<&str>> =
        retry_loop(s.interval(), Duration::from_secs(1), |_| Err("bad address"));
    assert_eq!(res, Err(RetryError::Body("bad address")));
}

#[derive(Default)]
struct Whole {
    starts: AtomicUsize,
    ends: AtomicUsize,
    releases: AtomicUsize,
    young: AtomicBool,
    cleared: AtomicUsize,
}
impl SpaceNotifier for Whole {
    fn invalidate_range_start(&self, _r: &NotifierRange) -> bool {
        self.starts.fetch_add(1, Ordering::SeqCst);
        true
    }
    fn invalidate_range_end(&self, _r: &NotifierRange) {
        self.ends.fetch_add(1, Ordering::SeqCst);
    }
    fn release(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
    }
    fn clear_young(&self, _r: VaRange) -> bool {
        self.cleared.fetch_add(1, Ordering::SeqCst);
        self.young.swap(false, Ordering::SeqCst)
    }
    fn test_young(&self, _r: VaRange) -> bool {
        self.young.load(Ordering::SeqCst)
    }
}

#[test]
fn whole_space_notifiers_hear_every_invalidation_and_aggregate_young() {
    let space = AddressSpace::new();
    let a = Arc::new(Whole::default());
    let b = Arc::new(Whole::default());
    space.register_notifier(a.clone()).unwrap();
    space.register_notifier(b.clone()).unwrap();
    space.invalidate(r(0x1000, 0x2000), EventKind::Clear);
    assert_eq!(
        (
            a.starts.load(Ordering::SeqCst),
            a.ends.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert!(!space.test_young(r(0, 0x1000)));
    b.young.store(true, Ordering::SeqCst);
    assert!(space.test_young(r(0, 0x1000)));
    assert!(space.clear_young(r(0, 0x1000)), "OR of the answers");
    assert_eq!(
        a.cleared.load(Ordering::SeqCst),
        1,
        "every notifier is asked to clear"
    );
    assert_eq!(b.cleared.load(Ordering::SeqCst), 1);
    assert!(!space.test_young(r(0, 0x1000)));
    assert!(!space.clear_young(r(0, 0x1000)));
}

#[test]
fn teardown_with_live_subscriptions_releases_once() {
    let space = AddressSpace::new();
    let w = Arc::new(Whole::default());
    let h = space.register_notifier(w.clone()).unwrap();
    let (s, rs) = sub(&space, r(0x1000, 0x2000));
    space.teardown();
    assert!(space.is_torn_down());
    assert_eq!(w.releases.load(Ordering::SeqCst), 1);
    let c = rs.calls.lock().unwrap().clone();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].1, EventKind::Release);
    space.teardown();
    assert_eq!(w.releases.load(Ordering::SeqCst), 1, "idempotent");
    assert!(matches!(
        space.insert(r(0x1000, 0x2000), Ops::default()),
        Err(NotifierError::TornDown)
    ));
    assert!(matches!(
        space.register_notifier(Arc::new(Whole::default())),
        Err(NotifierError::TornDown)
    ));
    // Unregistering after teardown does not release again.
    h.unregister().unwrap();
    assert_eq!(w.releases.load(Ordering::SeqCst), 1);
    // Live subscriptions can still go.
    s.remove().unwrap();
    assert_eq!(rs.releases(), 1);
}

#[test]
fn unregister_releases_once_and_last_handle_drop_tears_down() {
    let space = AddressSpace::new();
    let w = Arc::new(Whole::default());
    let w2 = Arc::new(Whole::default());
    let h = space.register_notifier(w.clone()).unwrap();
    space.register_notifier(w2.clone()).unwrap();
    h.unregister().unwrap();
    assert_eq!(w.releases.load(Ordering::SeqCst), 1);
    let clone = space.clone();
    drop(space);
    assert_eq!(
        w2.releases.load(Ordering::SeqCst),
        0,
        "a handle is still alive"
    );
    drop(clone);
    assert_eq!(
        w2.releases.load(Ordering::SeqCst),
        1,
        "last handle tore it down"
    );
    assert_eq!(w.releases.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_callback_leaves_the_space_usable() {
    struct Boom;
    impl IntervalNotifier for Boom {
        fn invalidate(&self, _i: &Interval, _r: &NotifierRange, _s: Seq) -> bool {
            panic!("driver bug");
        }
    }
    let space = AddressSpace::new();
    let boom = space.insert(r(0x1000, 0x2000), Boom).unwrap();
    let (neighbour, rn) = sub(&space, r(0x1000, 0x3000));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        space.invalidate(r(0x1000, 0x2000), EventKind::Clear);
    }));
    assert!(res.is_err(), "the panic reaches the invalidating thread");
    assert_eq!(
        rn.calls(),
        1,
        "the other overlapping subscription was still told"
    );
    drop(neighbour);
    assert_eq!(space.current_seq() % 2, 0, "the walk was ended on unwind");
    boom.remove().unwrap();
    let (_a, ra) = sub(&space, r(0x1000, 0x2000));
    space.invalidate(r(0x1000, 0x2000), EventKind::Clear);
    assert_eq!(ra.calls(), 1);
}

#[test]
fn put_of_an_idle_subscription_releases_immediately() {
    let space = AddressSpace::new();
    let (s, rs) = sub(&space, r(0x1000, 0x2000));
    drop(s);
    assert_eq!(rs.releases(), 1);
    assert!(space.subscribed_ranges().is_empty());
    space.invalidate(r(0x1000, 0x2000), EventKind::Clear);
    assert_eq!(rs.calls(), 0);
}
