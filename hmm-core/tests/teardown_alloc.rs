//! Teardown runs every whole-space notifier's `release` once, in O(1) per
//! notifier, without allocating (seed 000: nothing may loop or allocate on
//! the exit path). A counting global allocator proves the "without
//! allocating" part; this file holds a single test so no other test's
//! allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use hmm_core::notifier::{
    AddressSpace, EventKind, Interval, IntervalNotifier, NotifierRange, Seq, SpaceNotifier,
};
use hmm_core::{VaRange, VirtAddr};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

// SAFETY: forwards every call unchanged to the system allocator; the
// counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System.alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Rel(AtomicUsize);
impl SpaceNotifier for Rel {
    fn release(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Sub(AtomicUsize);
impl IntervalNotifier for Sub {
    fn invalidate(&self, i: &Interval, r: &NotifierRange, s: Seq) -> bool {
        i.set_seq(s);
        assert_eq!(r.event, EventKind::Release);
        self.0.fetch_add(1, Ordering::SeqCst);
        true
    }
}

#[test]
fn teardown_releases_each_notifier_once_without_allocating() {
    let space = AddressSpace::new();
    let notifiers: Vec<Arc<Rel>> = (0..1000)
        .map(|_| Arc::new(Rel(AtomicUsize::new(0))))
        .collect();
    for n in &notifiers {
        space.register_notifier(n.clone()).unwrap();
    }
    let subs: Vec<_> = (0..1000u64)
        .map(|i| {
            let r = VaRange::from_start_len(VirtAddr(0x10_0000 + i * 0x1000), 0x2000).unwrap();
            space.insert(r, Sub(AtomicUsize::new(0))).unwrap()
        })
        .collect();

    COUNTING.store(true, Ordering::SeqCst);
    space.teardown();
    COUNTING.store(false, Ordering::SeqCst);

    assert_eq!(ALLOCS.load(Ordering::SeqCst), 0, "teardown allocated");
    assert!(notifiers.iter().all(|n| n.0.load(Ordering::SeqCst) == 1));
    assert!(
        subs.iter().all(|s| s.0.load(Ordering::SeqCst) == 1),
        "every subscription saw the Release invalidation"
    );
    drop(subs);
    assert!(space.subscribed_ranges().is_empty());
}
