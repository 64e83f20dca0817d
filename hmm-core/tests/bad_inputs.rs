//! Misuses that need no device (the catalog is `docs/BAD_INPUTS.md`; the
//! mirror-level ones are in the `hmm-conformance` crate, run by every
//! driver): each gets a typed error, nothing panics that the caller did
//! not cause, nothing is lost, nothing hangs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hmm_core::addr::USER_VA_END;
use hmm_core::error::{NotifierError, RangeError};
use hmm_core::notifier::{
    AddressSpace, EventKind, Interval, IntervalNotifier, NotifierRange, Seq, SpaceNotifier,
};
use hmm_core::{VaRange, VirtAddr};

#[test]
fn range_constructors_reject_bad_ranges() {
    let a = VirtAddr(0x10_0000);
    assert_eq!(
        VaRange::from_start_len(a, 0),
        Err(RangeError::Empty {
            start: a.0,
            end: a.0
        })
    );
    assert_eq!(
        VaRange::new(a, a),
        Err(RangeError::Empty {
            start: a.0,
            end: a.0
        })
    );
    assert!(matches!(
        VaRange::new(VirtAddr(0x2000), VirtAddr(0x1000)),
        Err(RangeError::Empty { .. })
    ));
    assert_eq!(
        VaRange::from_start_len(VirtAddr(u64::MAX - 4095), 8192),
        Err(RangeError::Overflow {
            start: u64::MAX - 4095,
            len: 8192
        })
    );
    assert!(matches!(
        VaRange::user_pages(VirtAddr(0x1001), 4096),
        Err(RangeError::Unaligned { .. })
    ));
    assert!(matches!(
        VaRange::user_pages(a, 100),
        Err(RangeError::Unaligned { .. })
    ));
    assert!(matches!(
        VaRange::user_pages(VirtAddr(USER_VA_END - 4096), 8192),
        Err(RangeError::KernelHalf { .. })
    ));
    assert!(matches!(
        VaRange::user_pages(VirtAddr(0xffff_8000_0000_0000), 4096),
        Err(RangeError::KernelHalf { .. })
    ));
    // The last byte of the space cannot be rounded up to a page end.
    let top = VaRange::new(VirtAddr(u64::MAX - 1), VirtAddr(u64::MAX)).unwrap();
    assert!(matches!(top.page_cover(), Err(RangeError::Overflow { .. })));
    // And the good ones still work.
    let ok = VaRange::user_pages(a, 8192).unwrap();
    assert_eq!((ok.start(), ok.pages()), (a, 2));
}

struct Counted(Arc<AtomicUsize>, bool);
impl IntervalNotifier for Counted {
    fn invalidate(&self, i: &Interval, _r: &NotifierRange, s: Seq) -> bool {
        i.set_seq(s);
        self.0.fetch_add(1, Ordering::SeqCst);
        assert!(!self.1, "a driver bug in an invalidate callback");
        true
    }
}

struct Rel(Arc<AtomicUsize>, bool);
impl SpaceNotifier for Rel {
    fn release(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        assert!(!self.1, "a driver bug in release");
    }
}

/// Teardown with a panicking invalidate callback and a panicking
/// `release` among healthy ones: every callback and every `release` still
/// runs exactly once (nothing is lost), then the first panic reaches the
/// caller; the space is torn down and says so with a typed error.
#[test]
fn teardown_runs_every_release_despite_panics() {
    let space = AddressSpace::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let rels = Arc::new(AtomicUsize::new(0));
    let subs: Vec<_> = (0..6u64)
        .map(|i| {
            let r = VaRange::from_start_len(VirtAddr(0x10_0000 + i * 0x1000), 0x1000).unwrap();
            space
                .insert(r, Counted(Arc::clone(&calls), i == 2))
                .unwrap()
        })
        .collect();
    for i in 0..6 {
        space
            .register_notifier(Arc::new(Rel(Arc::clone(&rels), i == 1 || i == 4)))
            .unwrap();
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // the panics below are expected
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| space.teardown()));
    std::panic::set_hook(hook);
    assert!(r.is_err(), "the first panic reaches the caller");
    assert_eq!(calls.load(Ordering::SeqCst), 6, "every subscription told");
    assert_eq!(rels.load(Ordering::SeqCst), 6, "every release ran once");
    assert_eq!(space.current_seq() % 2, 0, "no invalidation left open");
    assert!(space.is_torn_down());
    space.teardown(); // idempotent: nothing runs twice
    assert_eq!(rels.load(Ordering::SeqCst), 6);
    let r = VaRange::from_start_len(VirtAddr(0x20_0000), 0x1000).unwrap();
    assert_eq!(
        space
            .insert(r, Counted(Arc::new(AtomicUsize::new(0)), false))
            .err(),
        Some(NotifierError::TornDown)
    );
    assert_eq!(
        space
            .register_notifier(Arc::new(Rel(Arc::new(AtomicUsize::new(0)), false)))
            .err(),
        Some(NotifierError::TornDown)
    );
    for s in subs {
        s.remove().unwrap();
    }
    assert!(space.subscribed_ranges().is_empty());
    space.invalidate(r, EventKind::Clear); // still callable, hits nothing
}
