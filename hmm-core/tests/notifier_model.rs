//! The registry against a naive model: random insert / put / remove /
//! invalidate sequences, some of them issued while an invalidation is held
//! open (so insertions and removals are deferred), must call the same
//! callbacks, release the same subscriptions exactly once, and leave the
//! same tree; half the cases then tear the space down, which must send
//! exactly the live subscriptions one `Release` each and refuse inserts.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hmm_core::error::NotifierError;
use hmm_core::notifier::{
    AddressSpace, EventKind, Interval, IntervalNotifier, NotifierRange, Seq, SpaceNotifier,
    Subscription,
};
use hmm_core::{VaRange, VirtAddr};
use proptest::prelude::*;

#[derive(Default)]
struct Log {
    /// (invalidation number, subscription id)
    calls: Vec<(u32, u32)>,
    releases: Vec<u32>,
    inv_no: u32,
}

struct Rec {
    id: u32,
    log: Arc<Mutex<Log>>,
}

impl IntervalNotifier for Rec {
    fn invalidate(&self, i: &Interval, _r: &NotifierRange, s: Seq) -> bool {
        i.set_seq(s);
        let mut l = self.log.lock().unwrap();
        let n = l.inv_no;
        l.calls.push((n, self.id));
        true
    }
    fn release(&self) {
        self.log.lock().unwrap().releases.push(self.id);
    }
}

struct SpaceRel(AtomicUsize);
impl SpaceNotifier for SpaceRel {
    fn release(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u8, u8),
    Put(u8),
    Remove(u8),
    Invalidate(u8, u8),
    /// Hold an invalidation of the range open while running the inner ops
    /// (inner ops never block: no Remove inside).
    Held(u8, u8, Vec<Inner>),
}

#[derive(Clone, Debug)]
enum Inner {
    Insert(u8, u8),
    Put(u8),
    Invalidate(u8, u8),
}

fn range(a: u8, len: u8) -> VaRange {
    let start = u64::from(a % 64) * 0x1000;
    VaRange::from_start_len(VirtAddr(start), (u64::from(len % 16) + 1) * 0x1000).unwrap()
}

fn inner_op() -> impl Strategy<Value = Inner> {
    prop_oneof![
        (any::<u8>(), any::<u8>()).prop_map(|(a, l)| Inner::Insert(a, l)),
        any::<u8>().prop_map(Inner::Put),
        (any::<u8>(), any::<u8>()).prop_map(|(a, l)| Inner::Invalidate(a, l)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<u8>(), any::<u8>()).prop_map(|(a, l)| Op::Insert(a, l)),
        1 => any::<u8>().prop_map(Op::Put),
        1 => any::<u8>().prop_map(Op::Remove),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, l)| Op::Invalidate(a, l)),
        2 => (any::<u8>(), any::<u8>(), prop::collection::vec(inner_op(), 0..8))
            .prop_map(|(a, l, v)| Op::Held(a, l, v)),
    ]
}

/// The naive model: a map of live subscriptions and, while an invalidation
/// that hit something (or saw an insert) is open, lists of deferred inserts
/// and removals.
#[derive(Default)]
struct Model {
    in_tree: BTreeMap<u32, VaRange>,
    pending_insert: BTreeMap<u32, VaRange>,
    pending_remove: Vec<u32>,
    calls: Vec<(u32, u32)>,
    releases: Vec<u32>,
    deferring: bool,
    /// An invalidation is open (hit or not): an insert then makes the
    /// sequence odd and is deferred, as one hit would.
    open: bool,
}

impl Model {
    fn insert(&mut self, id: u32, r: VaRange) {
        self.deferring |= self.open;
        if self.deferring {
            self.pending_insert.insert(id, r);
        } else {
            self.in_tree.insert(id, r);
        }
    }
    fn put(&mut self, id: u32) {
        if self.pending_insert.remove(&id).is_some() {
            self.releases.push(id);
        } else if self.deferring {
            self.pending_remove.push(id);
        } else {
            self.in_tree.remove(&id);
            self.releases.push(id);
        }
    }
    fn invalidate(&mut self, n: u32, r: VaRange) -> bool {
        let hits: Vec<u32> = self
            .in_tree
            .iter()
            .filter(|(_, s)| s.overlaps(r))
            .map(|(id, _)| *id)
            .collect();
        for id in &hits {
            self.calls.push((n, *id));
        }
        !hits.is_empty()
    }
    fn end(&mut self) {
        self.deferring = false;
        self.open = false;
        let ins = std::mem::take(&mut self.pending_insert);
        self.in_tree.extend(ins);
        for id in std::mem::take(&mut self.pending_remove) {
            self.in_tree.remove(&id);
            self.releases.push(id);
        }
    }
}

struct Real {
    space: AddressSpace,
    log: Arc<Mutex<Log>>,
    live: Vec<(u32, Subscription<Rec>)>,
    next_id: u32,
    next_inv: u32,
}

impl Real {
    fn insert(&mut self, m: &mut Model, r: VaRange) {
        let id = self.next_id;
        self.next_id += 1;
        let s = self
            .space
            .insert(
                r,
                Rec {
                    id,
                    log: Arc::clone(&self.log),
                },
            )
            .unwrap();
        self.live.push((id, s));
        m.insert(id, r);
    }
    fn take(&mut self, k: u8) -> Option<(u32, Subscription<Rec>)> {
        if self.live.is_empty() {
            return None;
        }
        let i = usize::from(k) % self.live.len();
        Some(self.live.swap_remove(i))
    }
    fn inv_no(&mut self) -> u32 {
        self.next_inv += 1;
        self.log.lock().unwrap().inv_no = self.next_inv;
        self.next_inv
    }
}

proptest! {
    #![proptest_config(common::cases(400))]
    #[test]
    fn registry_matches_naive_model(ops in prop::collection::vec(op(), 1..60), teardown in any::<bool>()) {
        let mut m = Model::default();
        let mut real = Real {
            space: AddressSpace::new(),
            log: Arc::default(),
            live: Vec::new(),
            next_id: 0,
            next_inv: 0,
        };
        for op in ops {
            match op {
                Op::Insert(a, l) => real.insert(&mut m, range(a, l)),
                Op::Put(k) => {
                    if let Some((id, s)) = real.take(k) {
                        s.put();
                        m.put(id);
                    }
                }
                Op::Remove(k) => {
                    if let Some((id, s)) = real.take(k) {
                        s.remove().unwrap();
                        m.put(id);
                    }
                }
                Op::Invalidate(a, l) => {
                    let n = real.inv_no();
                    real.space.invalidate(range(a, l), EventKind::Clear);
                    m.invalidate(n, range(a, l));
                }
                Op::Held(a, l, inner) => {
                    let n = real.inv_no();
                    let space = real.space.clone();
                    let g = space.invalidate_start(NotifierRange::new(range(a, l), EventKind::Unmap)).unwrap();
                    let hit = m.invalidate(n, range(a, l));
                    m.deferring = hit;
                    m.open = true;
                    prop_assert_eq!(space.current_seq() % 2 == 1, hit);
                    for i in inner {
                        match i {
                            Inner::Insert(a, l) => real.insert(&mut m, range(a, l)),
                            Inner::Put(k) => {
                                if let Some((id, s)) = real.take(k) {
                                    drop(s);
                                    m.put(id);
                                }
                            }
                            Inner::Invalidate(a, l) => {
                                let n = real.inv_no();
                                space.invalidate(range(a, l), EventKind::Clear);
                                // A nested hit keeps the sequence odd until the
                                // outermost invalidation ends: defer from now on.
                                if m.invalidate(n, range(a, l)) {
                                    m.deferring = true;
                                }
                                prop_assert_eq!(space.current_seq() % 2 == 1, m.deferring);
                            }
                        }
                    }
                    drop(g);
                    m.end();
                }
            }
            prop_assert_eq!(real.space.current_seq() % 2, 0);
        }
        let log = real.log.lock().unwrap();
        let mut got_calls = log.calls.clone();
        let mut want_calls = m.calls.clone();
        got_calls.sort_unstable();
        want_calls.sort_unstable();
        prop_assert_eq!(got_calls, want_calls);
        let mut got_rel = log.releases.clone();
        let mut want_rel = m.releases.clone();
        got_rel.sort_unstable();
        want_rel.sort_unstable();
        prop_assert_eq!(&got_rel, &want_rel);
        let mut dedup = got_rel.clone();
        dedup.dedup();
        prop_assert_eq!(dedup.len(), got_rel.len(), "a release ran twice");
        drop(log);
        let mut want_tree: Vec<VaRange> = m.in_tree.values().copied().collect();
        want_tree.sort();
        let mut got_tree = real.space.subscribed_ranges();
        got_tree.sort();
        prop_assert_eq!(got_tree, want_tree);
        if teardown {
            // Process exit: every subscription in the tree gets exactly one
            // Release invalidation, every whole-space notifier one release,
            // and nothing can be added afterwards.
            let rel = Arc::new(SpaceRel(AtomicUsize::new(0)));
            real.space.register_notifier(rel.clone()).unwrap();
            let n = real.inv_no();
            let before = real.log.lock().unwrap().calls.len();
            real.space.teardown();
            let log = real.log.lock().unwrap();
            prop_assert!(log.calls[before..].iter().all(|c| c.0 == n));
            let mut got: Vec<u32> = log.calls[before..].iter().map(|c| c.1).collect();
            drop(log);
            got.sort_unstable();
            let want: Vec<u32> = m.in_tree.keys().copied().collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(rel.0.load(Ordering::SeqCst), 1);
            let refused = real.space.insert(range(0, 0), Rec { id: u32::MAX, log: Arc::clone(&real.log) });
            prop_assert_eq!(refused.err(), Some(NotifierError::TornDown));
        }
    }
}
