//! Model test: random sequences of operations on `IntervalTree` compared with
//! a naive `Vec` model, plus the tree's structural invariant check after
//! every step; and a check that queries never touch the heap.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;

use hmm_core::notifier::interval_tree::{EntryId, IntervalTree};
use proptest::prelude::*;

/// Counts allocations made by the current thread (tests run in parallel).
struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: the slot may be gone while the thread is being torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the thread-local counter neither allocates nor touches memory
// handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as our caller's (non-zero size layout).
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: `ptr`/`layout` came from this allocator, i.e. `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    (r, ALLOCS.with(Cell::get) - before)
}

#[test]
fn queries_do_not_allocate() {
    let mut t = IntervalTree::new();
    let mut ids = Vec::new();
    for i in 0..5_000u64 {
        ids.push(t.insert(i * 16, i * 16 + 40, i));
    }
    let id = ids[1234];
    let (hits, n) = allocations_during(|| {
        let mut sum = 0u64;
        let mut hits = 0usize;
        for (_, _, _, v) in t.overlapping(1000 * 16, 1100 * 16) {
            sum += *v;
            hits += 1;
        }
        for (_, _, _, v) in t.iter() {
            sum += *v;
        }
        assert!(t.any_overlap(7, 8));
        assert!(!t.any_overlap(5_000 * 16 + 40, u64::MAX));
        assert_eq!(t.get(id), Some(&1234));
        std::hint::black_box(sum);
        hits
    });
    // Intervals 998..1099 reach into [16000, 17600): 40-long at stride 16.
    assert_eq!(hits, 102);
    assert_eq!(n, 0, "queries allocated {n} times");
    // Removal reuses the arena and does not allocate either.
    let ((), n) = allocations_during(|| {
        for id in &ids[..100] {
            assert!(t.remove(*id).is_some());
        }
    });
    assert_eq!(n, 0, "remove allocated {n} times");
    // Sanity: the counter does see allocations.
    let (v, n) = allocations_during(|| vec![1u8; 10]);
    assert_eq!(v.len(), 10);
    assert!(n >= 1);
}

/// Naive model: unsorted entries, linear scans.
#[derive(Default)]
struct Model {
    items: Vec<(EntryId, u64, u64, u32)>,
}

impl Model {
    fn overlapping(&self, start: u64, end: u64) -> Vec<(EntryId, u64, u64, u32)> {
        let mut v: Vec<_> = self
            .items
            .iter()
            .copied()
            .filter(|&(_, s, e, _)| start < end && s < end && start < e)
            .collect();
        v.sort_by_key(|&(id, s, _, _)| (s, id));
        v
    }

    fn remove(&mut self, id: EntryId) -> Option<u32> {
        let i = self.items.iter().position(|e| e.0 == id)?;
        Some(self.items.swap_remove(i).3)
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Insert `[start, start + len)`.
    Insert { start: u64, len: u64 },
    /// Remove the live entry at this index (modulo), if any.
    RemoveLive(usize),
    /// Remove an id that was removed before (must fail).
    RemoveStale(usize),
    /// Query `[start, end)` (may be empty or inverted).
    Query { start: u64, end: u64 },
}

/// Coordinates cluster in a small window so overlaps, touching intervals
/// and exact duplicates are common; some sit at the top of the `u64` range.
fn coord() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..64,
        1 => (0u64..64).prop_map(|x| u64::MAX - x),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (coord(), prop_oneof![3 => 1u64..12, 1 => Just(u64::MAX)]).prop_map(|(start, len)| {
            // Clamp so that start < end <= u64::MAX.
            let start = start.min(u64::MAX - 1);
            let len = len.min(u64::MAX - start);
            Op::Insert { start, len }
        }),
        3 => any::<usize>().prop_map(Op::RemoveLive),
        1 => any::<usize>().prop_map(Op::RemoveStale),
        3 => (coord(), coord()).prop_map(|(start, end)| Op::Query { start, end }),
        1 => Just(Op::Query { start: 0, end: u64::MAX }),
    ]
}

fn tree_overlapping(t: &IntervalTree<u32>, start: u64, end: u64) -> Vec<(EntryId, u64, u64, u32)> {
    t.overlapping(start, end)
        .map(|(id, s, e, v)| (id, s, e, *v))
        .collect()
}

proptest! {
    #![proptest_config(common::cases(3000))]

    #[test]
    fn matches_naive_model(ops in prop::collection::vec(op(), 1..200)) {
        let mut tree = IntervalTree::new();
        let mut model = Model::default();
        let mut issued = HashSet::new();
        let mut removed: Vec<EntryId> = Vec::new();
        let mut next_value = 0u32;

        for op in ops {
            match op {
                Op::Insert { start, len } => {
                    let end = start + len;
                    let id = tree.insert(start, end, next_value);
                    prop_assert!(issued.insert(id), "id {:?} reused", id);
                    model.items.push((id, start, end, next_value));
                    next_value += 1;
                }
                Op::RemoveLive(i) => {
                    if !model.items.is_empty() {
                        let id = model.items[i % model.items.len()].0;
                        let expected = model.remove(id);
                        prop_assert_eq!(tree.remove(id), expected);
                        prop_assert_eq!(tree.get(id), None);
                        removed.push(id);
                    }
                }
                Op::RemoveStale(i) => {
                    if !removed.is_empty() {
                        let id = removed[i % removed.len()];
                        prop_assert_eq!(tree.remove(id), None);
                        prop_assert_eq!(tree.get(id), None);
                    }
                }
                Op::Query { start, end } => {
                    let expected = model.overlapping(start, end);
                    prop_assert_eq!(tree.any_overlap(start, end), !expected.is_empty());
                    prop_assert_eq!(tree_overlapping(&tree, start, end), expected);
                }
            }
            tree.check_invariants();
            prop_assert_eq!(tree.len(), model.items.len());
            prop_assert_eq!(tree.is_empty(), model.items.is_empty());
        }

        // Final full comparison: iteration order and every lookup.
        let mut all = model.items.clone();
        all.sort_by_key(|&(id, s, _, _)| (s, id));
        let got: Vec<_> = tree.iter().map(|(id, s, e, v)| (id, s, e, *v)).collect();
        prop_assert_eq!(got, all.clone());
        for &(id, _, _, v) in &all {
            prop_assert_eq!(tree.get(id), Some(&v));
        }
        // Every point query in the window agrees too.
        for p in 0..80u64 {
            prop_assert_eq!(tree_overlapping(&tree, p, p + 1), model.overlapping(p, p + 1));
        }
    }
}
