//! `InvocationSet` against a naive model (`BTreeSet<u32>`): every sequence
//! of inserts and retains gives the same ids, in the same order, whichever
//! representation the set chose, and memory stays within the bound.

use std::collections::BTreeSet;

use hmm_core::mirror::backend::InvocationSet;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Insert(u32),
    InsertRun(u32, u32),
    RetainEvery(u32),
}

fn ops(universe: u32) -> impl Strategy<Value = Vec<Op>> {
    let id = 0..universe.saturating_add(8);
    prop::collection::vec(
        prop_oneof![
            id.clone().prop_map(Op::Insert),
            (id, 1u32..600).prop_map(|(a, n)| Op::InsertRun(a, n)),
            (2u32..5).prop_map(Op::RetainEvery),
        ],
        0..40,
    )
}

proptest! {
    #[test]
    fn matches_a_btreeset(universe in prop_oneof![0u32..64, 1000u32..5000], seq in ops(5000)) {
        let mut s = InvocationSet::new(universe);
        let mut m = BTreeSet::new();
        let mut out = 0u64;
        for op in seq {
            match op {
                Op::Insert(id) => {
                    let fresh = id < universe && m.insert(id);
                    out += u64::from(id >= universe);
                    prop_assert_eq!(s.insert(id), fresh);
                }
                Op::InsertRun(a, n) => {
                    for id in a..a.saturating_add(n) {
                        out += u64::from(id >= universe);
                        if id < universe { m.insert(id); }
                        s.insert(id);
                    }
                }
                Op::RetainEvery(k) => {
                    m.retain(|id| id % k != 0);
                    s.retain(|id| id % k != 0);
                }
            }
            prop_assert_eq!(s.len(), m.len());
            let bound = if universe < 1024 { 4096 } else { u64::from(universe) / 8 + 8 };
            prop_assert!(s.heap_bytes() as u64 <= bound,
                "{} bytes for universe {}", s.heap_bytes(), universe);
        }
        prop_assert_eq!(s.iter().collect::<Vec<_>>(), m.iter().copied().collect::<Vec<_>>());
        prop_assert_eq!(s.out_of_range(), out);
        // iter_from at every word edge and around it, and past the end.
        for lo in (0..universe.saturating_add(130)).step_by(13).chain([63, 64, 65, 127, 128]) {
            prop_assert_eq!(
                s.iter_from(lo).collect::<Vec<_>>(),
                m.range(lo..).copied().collect::<Vec<_>>(),
                "iter_from({})", lo
            );
        }
        for id in 0..universe.min(6000) {
            prop_assert_eq!(s.contains(id), m.contains(&id));
        }
    }
}
