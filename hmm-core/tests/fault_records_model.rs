//! The fault-record parser against garbage: a device may write anything
//! into its fault buffer. Arbitrary records (any invocation, any flags,
//! any address — including the kernel half and the last page of the 64-bit
//! space) and arbitrary, unsorted, duplicated `incomplete` lists go
//! through `faults::validate` and `faults::coalesce`, which must never
//! panic, must reject exactly the records a naive model calls garbage, and
//! must produce runs that cover exactly the faulting pages, each once,
//! with the right access, maximally merged.
//!
//! Long runs: `PROPTEST_CASES=200000 cargo test -p hmm-core --release
//! --test fault_records_model`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use hmm_core::mirror::backend::{
    InvocationSet, RawFaultRecord, FAULT_ATOMIC, FAULT_KNOWN_FLAGS, FAULT_WRITE,
};
use hmm_core::mirror::faults::{coalesce, validate};
use hmm_core::VirtAddr;
use proptest::prelude::*;

/// Addresses clustered so that pages repeat and neighbour each other,
/// plus wild ones.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..24, 0u64..4096).prop_map(|(p, o)| 0x7f00_0000_0000 + p * 4096 + o),
        1 => (0u64..4, 0u64..4096).prop_map(|(p, o)| u64::MAX - p * 4096 - o),
        1 => any::<u64>(),
        1 => Just(0u64),
    ]
}

fn flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 0u32..=FAULT_KNOWN_FLAGS,
        1 => any::<u32>(),
    ]
}

fn record() -> impl Strategy<Value = RawFaultRecord> {
    (0u32..40, flags(), addr()).prop_map(|(invocation, flags, a)| RawFaultRecord {
        invocation,
        flags,
        addr_lo: a as u32,
        addr_hi: (a >> 32) as u32,
    })
}

proptest! {
    #![proptest_config(common::cases(2000))]

    #[test]
    fn validate_and_coalesce_match_a_naive_model(
        records in prop::collection::vec(record(), 0..80),
        incomplete in prop::collection::vec(0u32..48, 0..40),
        batch in 1usize..64,
    ) {
        // Model: a record is valid iff its flags are known and its
        // invocation is one of the incomplete ones.
        let inc_set: BTreeSet<u32> = incomplete.iter().copied().collect();
        let want_valid: Vec<&RawFaultRecord> = records
            .iter()
            .filter(|r| r.flags & !FAULT_KNOWN_FLAGS == 0 && inc_set.contains(&r.invocation))
            .collect();
        let inc = InvocationSet::from_ids(48, incomplete.iter().copied());
        let mut out = Vec::new();
        let rejected = validate(&records, &inc, &mut out);
        prop_assert_eq!(rejected as usize, records.len() - want_valid.len());
        prop_assert_eq!(out.len(), want_valid.len());
        prop_assert_eq!(inc.iter().collect::<Vec<_>>(), inc_set.iter().copied().collect::<Vec<_>>(),
            "incomplete sorted and deduplicated");
        for (f, r) in out.iter().zip(&want_valid) {
            prop_assert_eq!(f.addr, VirtAddr(r.addr()));
            prop_assert_eq!(f.page, VirtAddr(r.addr() & !0xfff));
            prop_assert_eq!(f.write, r.flags & (FAULT_WRITE | FAULT_ATOMIC) != 0);
        }
        // Coalesce in batches, as the fault service does.
        for chunk in out.chunks_mut(batch) {
            let mut model: BTreeMap<u64, bool> = BTreeMap::new();
            for f in chunk.iter() {
                *model.entry(f.page.0).or_default() |= f.write;
            }
            // The exact addresses that faulted on each page.
            let mut addrs: BTreeMap<u64, BTreeSet<VirtAddr>> = BTreeMap::new();
            for f in chunk.iter() {
                addrs.entry(f.page.0).or_default().insert(f.addr);
            }
            let mut runs = Vec::new();
            coalesce(chunk, &mut runs);
            // Every page of every run is a faulting page with the run's
            // access; every faulting page is in exactly one run.
            let mut seen: BTreeMap<u64, bool> = BTreeMap::new();
            for r in &runs {
                prop_assert!(r.range.start().0 & 0xfff == 0);
                // Error messages name a real faulting address of the run's
                // first page.
                prop_assert!(addrs[&r.range.start().0].contains(&r.first_addr));
                let mut p = r.range.start().0;
                while p < r.range.end().0 {
                    prop_assert!(seen.insert(p, r.write).is_none(), "page {:#x} in two runs", p);
                    match p.checked_add(4096) { Some(n) => p = n, None => break }
                }
            }
            prop_assert_eq!(&seen, &model);
            // Sorted, disjoint, and maximally merged.
            for w in runs.windows(2) {
                prop_assert!(w[0].range.end() <= w[1].range.start());
                prop_assert!(
                    !(w[0].range.end() == w[1].range.start() && w[0].write == w[1].write),
                    "adjacent runs with the same access not merged"
                );
            }
        }
    }
}
