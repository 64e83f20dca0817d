use super::*;

fn ids<V>(it: impl Iterator<Item = (EntryId, u64, u64, V)>) -> Vec<(u64, u64)> {
    it.map(|(_, s, e, _)| (s, e)).collect()
}

#[test]
fn empty_tree() {
    let t: IntervalTree<u32> = IntervalTree::default();
    assert!(t.is_empty());
    assert_eq!(t.len(), 0);
    assert_eq!(t.iter().count(), 0);
    assert_eq!(t.overlapping(0, u64::MAX).count(), 0);
    assert!(!t.any_overlap(0, u64::MAX));
    assert_eq!(t.get(EntryId(0)), None);
    t.check_invariants();
}

#[test]
fn touching_intervals_do_not_overlap() {
    let mut t = IntervalTree::new();
    t.insert(10, 20, 'a');
    t.insert(20, 30, 'b');
    assert_eq!(ids(t.overlapping(0, 10)), []);
    assert_eq!(ids(t.overlapping(30, 40)), []);
    assert_eq!(ids(t.overlapping(19, 20)), [(10, 20)]);
    assert_eq!(ids(t.overlapping(20, 21)), [(20, 30)]);
    assert_eq!(ids(t.overlapping(19, 21)), [(10, 20), (20, 30)]);
    assert!(!t.any_overlap(0, 10));
    assert!(!t.any_overlap(30, 31));
    assert!(t.any_overlap(29, 30));
    t.check_invariants();
}

#[test]
fn empty_or_inverted_query_matches_nothing() {
    let mut t = IntervalTree::new();
    t.insert(0, 100, ());
    assert_eq!(t.overlapping(50, 50).count(), 0);
    assert_eq!(t.overlapping(60, 40).count(), 0);
    assert!(!t.any_overlap(50, 50));
    assert!(!t.any_overlap(60, 40));
}

#[test]
fn duplicates_are_kept_and_ordered_by_id() {
    let mut t = IntervalTree::new();
    let a = t.insert(5, 15, 1);
    let b = t.insert(5, 15, 2);
    let c = t.insert(5, 15, 3);
    assert!(a < b && b < c);
    assert_eq!(t.len(), 3);
    let got: Vec<_> = t.overlapping(0, 6).map(|(id, _, _, v)| (id, *v)).collect();
    assert_eq!(got, [(a, 1), (b, 2), (c, 3)]);
    assert_eq!(t.remove(b), Some(2));
    let got: Vec<_> = t.iter().map(|(id, _, _, v)| (id, *v)).collect();
    assert_eq!(got, [(a, 1), (c, 3)]);
    t.check_invariants();
}

#[test]
fn end_at_u64_max() {
    let mut t = IntervalTree::new();
    let top = t.insert(u64::MAX - 1, u64::MAX, "top");
    let all = t.insert(0, u64::MAX, "all");
    t.insert(100, 200, "low");
    assert_eq!(
        ids(t.overlapping(u64::MAX - 1, u64::MAX)),
        [(0, u64::MAX), (u64::MAX - 1, u64::MAX)]
    );
    assert_eq!(t.overlapping(u64::MAX - 2, u64::MAX - 1).count(), 1);
    assert_eq!(t.iter().count(), 3);
    assert_eq!(t.remove(all), Some("all"));
    assert_eq!(
        ids(t.overlapping(300, u64::MAX)),
        [(u64::MAX - 1, u64::MAX)]
    );
    assert_eq!(t.get(top), Some(&"top"));
    t.check_invariants();
}

#[test]
fn unknown_and_stale_ids() {
    let mut t = IntervalTree::new();
    let a = t.insert(1, 2, 'a');
    assert_eq!(t.remove(a), Some('a'));
    assert_eq!(t.remove(a), None);
    assert_eq!(t.get(a), None);
    // `b` reuses a's slot; a's id must not reach it.
    let b = t.insert(1, 2, 'b');
    assert_ne!(a, b);
    assert_eq!(t.get(a), None);
    assert_eq!(t.remove(a), None);
    assert_eq!(t.get(b), Some(&'b'));
    // Never issued here.
    assert_eq!(t.get(EntryId(12345)), None);
    assert_eq!(t.remove(EntryId(u64::MAX)), None);
    assert_eq!(t.len(), 1);
    t.check_invariants();
}

#[test]
fn ids_never_reused() {
    let mut t = IntervalTree::new();
    let mut seen = std::collections::HashSet::new();
    let mut live = Vec::new();
    for round in 0..50u64 {
        for k in 0..8 {
            let id = t.insert(k, k + round + 1, round);
            assert!(seen.insert(id), "id {id:?} issued twice");
            live.push(id);
        }
        // Free most slots so later rounds reuse them.
        for id in live.drain(..7) {
            assert!(t.remove(id).is_some());
        }
        t.check_invariants();
    }
    assert_eq!(t.len(), 50);
}

#[test]
fn exhausted_slot_is_retired() {
    let mut t = IntervalTree::new();
    let a = t.insert(1, 2, ());
    // Pretend the slot has been reused 2^32 - 1 times.
    t.nodes[a.slot() as usize].generation = u32::MAX;
    let a = EntryId::new(a.slot(), u32::MAX);
    assert_eq!(t.remove(a), Some(()));
    t.check_invariants();
    let b = t.insert(1, 2, ());
    assert_ne!(b.slot(), a.slot(), "retired slot was reused");
    assert_eq!(t.get(a), None);
    t.check_invariants();
}

#[test]
fn stays_balanced_on_sorted_input() {
    let mut t = IntervalTree::new();
    let ids: Vec<_> = (0..1000u64).map(|i| t.insert(i, i + 1, i)).collect();
    t.check_invariants();
    // AVL bound: height < 1.44 log2(n + 2).
    assert!(t.height(t.root) <= 14, "height {}", t.height(t.root));
    for id in ids.iter().step_by(2) {
        assert!(t.remove(*id).is_some());
    }
    t.check_invariants();
    assert_eq!(t.len(), 500);
    assert_eq!(ids_of(&t, 100, 110), [101, 103, 105, 107, 109]);
}

fn ids_of(t: &IntervalTree<u64>, s: u64, e: u64) -> Vec<u64> {
    t.overlapping(s, e).map(|(_, _, _, v)| *v).collect()
}

#[test]
fn nested_and_long_intervals_found_past_pruning() {
    // A long interval deep on the left must still be found for a query
    // far to the right (max_end augmentation).
    let mut t = IntervalTree::new();
    t.insert(0, 1_000_000, 0u64);
    for i in 1..200u64 {
        t.insert(i * 10, i * 10 + 5, i);
    }
    assert_eq!(ids_of(&t, 999_000, 999_001), [0]);
    assert_eq!(ids_of(&t, 994, 1002), [0, 99, 100]);
    t.check_invariants();
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "empty interval")]
fn empty_interval_is_a_caller_bug_in_debug() {
    IntervalTree::new().insert(5, 5, ());
}
