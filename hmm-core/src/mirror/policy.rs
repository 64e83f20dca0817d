//! What a fault-service round fetches beyond the pages that faulted
//! ([`FetchPolicy`], chosen per mirror in
//! [`MirrorConfig::fetch`](super::MirrorConfig::fetch)).
//!
//! Every round costs the device a submission, a wait and a read-back (and
//! re-runs the invocations that faulted); on a GPU that is hundreds of
//! microseconds before any copy. A kernel that sweeps its data dense
//! reveals it a fault buffer at a time (1,024 records on the GPU drivers),
//! so fetching exactly what faulted takes one round per ~4 MiB. The
//! adaptive policy fetches what the round's faults predict, in the manner
//! of NVIDIA UVM's prefetcher (`uvm_perf_prefetch.c`; the design below is
//! ours):
//!
//! 1. **Occupancy** (UVM's bitmap tree). For each 2 MiB block the round
//!    faulted in, count the pages that are resident or faulting in each
//!    aligned node of 16, 32, …, 512 pages around each faulting page; the
//!    largest node whose occupancy passes the threshold (51 %, UVM's
//!    default) is fetched whole.
//! 2. **Streams.** A run of at least 16 consecutive faulting pages is read
//!    as a sweep: the pages after it are fetched too, `len × 8^(round+1)`
//!    of them (the look-ahead grows each round of the launch the sweep
//!    continues), at most [`Adaptive::max_ahead_pages`] and never more
//!    than the pool's free slots.
//!
//! What bounds it: speculation never evicts (it takes at most the pool's
//! free slots, after the round's own pages are in); it stays inside the CPU mapping of
//! the faulting page and only in anonymous memory the process can read
//! (no file I/O, no stack or kernel-named areas); a speculative fetch
//! that fails is dropped, never an error of the launch. The pages come in
//! exactly as [`Mirror::prefetch`](super::Mirror::prefetch) brings them:
//! watched, write-tracked and invalidated like any other.
//!
//! Not done yet (issue 16): thrashing detection, advice-driven policy,
//! chunk-granular eviction, speculation for zero-copy windows.

use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};

use super::faults::Run;

/// What a round fetches beyond the faulted pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FetchPolicy {
    /// Exactly the pages that faulted (the mirror before issue 16).
    Exact,
    /// Occupancy and stream prefetch (the module docs).
    #[default]
    Adaptive,
    /// [`FetchPolicy::Adaptive`] with other parameters.
    AdaptiveWith(Adaptive),
}

impl FetchPolicy {
    /// The adaptive parameters, if adaptive.
    pub fn adaptive(self) -> Option<Adaptive> {
        match self {
            FetchPolicy::Exact => None,
            FetchPolicy::Adaptive => Some(Adaptive::default()),
            FetchPolicy::AdaptiveWith(a) => Some(a),
        }
    }
}

/// The adaptive policy's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adaptive {
    /// A node is fetched whole when more than this percentage of its
    /// pages are resident or faulting (UVM: 51).
    pub threshold_percent: u32,
    /// The smallest node considered, in pages (16 = 64 KiB).
    pub min_node_pages: u64,
    /// The block the occupancy tree covers, in pages (512 = 2 MiB).
    pub block_pages: u64,
    /// A faulting run at least this long is a stream (16 = 64 KiB).
    pub min_stream_pages: u64,
    /// The most pages one stream fetches ahead in one round (131,072 =
    /// 512 MiB; the pool's free slots bound it first).
    pub max_ahead_pages: u64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            threshold_percent: 51,
            min_node_pages: 16,
            block_pages: 512,
            min_stream_pages: 16,
            max_ahead_pages: 131_072,
        }
    }
}

impl Adaptive {
    /// The pages to fetch speculatively after a round whose faults were
    /// `demanded` (runs sorted by address, not overlapping), in round
    /// `round` of the launch (0 for the first), given which pages are
    /// `resident`. At most `budget` pages, none resident or demanded,
    /// returned as sorted, non-overlapping runs (read access; the caller
    /// clips them to the CPU mapping).
    pub fn speculate(
        &self,
        demanded: &[Run],
        round: u32,
        resident: &dyn Fn(VirtAddr) -> bool,
        budget: u64,
    ) -> Vec<VaRange> {
        let mut want: Vec<(u64, u64)> = Vec::new(); // page-number ranges
        let demanded_pages = |p: u64| {
            demanded
                .binary_search_by(|r| {
                    if r.range.end().0 <= p * PAGE_SIZE {
                        core::cmp::Ordering::Less
                    } else if r.range.start().0 > p * PAGE_SIZE {
                        core::cmp::Ordering::Greater
                    } else {
                        core::cmp::Ordering::Equal
                    }
                })
                .is_ok()
        };
        let occupied = |p: u64| demanded_pages(p) || resident(VirtAddr(p * PAGE_SIZE));
        // 1. Occupancy, block by block.
        let block = self.block_pages.max(1).next_power_of_two();
        let min_node = self.min_node_pages.clamp(1, block).next_power_of_two();
        let mut blocks: Vec<u64> = Vec::new();
        for r in demanded {
            let (s, e) = (r.range.start().0 / PAGE_SIZE, r.range.end().0 / PAGE_SIZE);
            let mut b = s / block;
            while b * block < e {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
                b += 1;
            }
        }
        for b in blocks {
            let base = b * block;
            let occ: Vec<bool> = (0..block).map(|k| occupied(base + k)).collect();
            let mut prefix = vec![0u64; block as usize + 1];
            for k in 0..block as usize {
                prefix[k + 1] = prefix[k] + u64::from(occ[k]);
            }
            let count = |s: u64, n: u64| prefix[(s + n) as usize] - prefix[s as usize];
            // The largest qualifying node around each demanded page of the
            // block (nodes nest, so marking the largest is enough).
            let mut node = block;
            while node >= min_node {
                for s in (0..block).step_by(node as usize) {
                    let has_demand = (s..s + node).any(|k| demanded_pages(base + k));
                    if has_demand
                        && count(s, node) * 100 > u64::from(self.threshold_percent) * node
                        && count(s, node) < node
                    {
                        want.push((base + s, base + s + node));
                    }
                }
                node /= 2;
            }
        }
        // 2. Streams.
        let shift = 3 * (round.min(6) + 1);
        for r in demanded {
            let len = r.range.len() / PAGE_SIZE;
            if len < self.min_stream_pages {
                continue;
            }
            let ahead = len.saturating_mul(1 << shift).min(self.max_ahead_pages);
            let e = r.range.end().0 / PAGE_SIZE;
            want.push((e, e.saturating_add(ahead)));
        }
        // Sorted, merged, minus what is there already, within the budget.
        want.sort_unstable();
        let mut out: Vec<VaRange> = Vec::new();
        let mut left = budget;
        let mut cursor = 0u64;
        for (s, e) in want {
            let mut p = s.max(cursor);
            while p < e && left > 0 {
                if occupied(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < e && left > 0 && !occupied(p) {
                    p += 1;
                    left -= 1;
                }
                let r = VaRange::new(VirtAddr(start * PAGE_SIZE), VirtAddr(p * PAGE_SIZE));
                if let Ok(r) = r {
                    match out.last_mut() {
                        Some(last) if last.end() == r.start() => {
                            *last = VaRange::new(last.start(), r.end()).unwrap_or(*last);
                        }
                        _ => out.push(r),
                    }
                }
            }
            cursor = cursor.max(e);
            if left == 0 {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn run(s: u64, e: u64) -> Run {
        let range = VaRange::new(VirtAddr(s * PAGE_SIZE), VirtAddr(e * PAGE_SIZE)).unwrap();
        Run {
            range,
            write: false,
            first_addr: range.start(),
        }
    }

    fn pages(rs: &[VaRange]) -> Vec<u64> {
        rs.iter()
            .flat_map(|r| r.start().0 / PAGE_SIZE..r.end().0 / PAGE_SIZE)
            .collect()
    }

    #[test]
    fn a_mostly_faulted_block_is_fetched_whole_and_a_sweep_ahead() {
        let a = Adaptive::default();
        // 300 of a block's 512 pages fault: > 51 %, the block comes whole.
        // The run is also a stream, whose look-ahead (300 * 8 pages)
        // covers the block's rest.
        let base = 1 << 20;
        let got = a.speculate(&[run(base, base + 300)], 0, &|_| false, u64::MAX);
        let p = pages(&got);
        assert_eq!(p.first(), Some(&(base + 300)));
        assert_eq!(p.len(), 2400, "the stream's look-ahead, block included");
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        // Not a stream (15 pages), but 15 + 5 resident of a 32-page node:
        // the node's other 12 come.
        let res = |va: VirtAddr| (base + 20..base + 25).contains(&(va.0 / PAGE_SIZE));
        let got = a.speculate(&[run(base, base + 15)], 0, &res, u64::MAX);
        let want: Vec<u64> = (base + 15..base + 20).chain(base + 25..base + 32).collect();
        assert_eq!(pages(&got), want);
        // Round 1 looks 64x further.
        let got = a.speculate(&[run(base, base + 300)], 1, &|_| false, u64::MAX);
        assert_eq!(pages(&got).len(), 19_200);
        // At most `max_ahead_pages`.
        let got = a.speculate(&[run(base, base + 3000)], 1, &|_| false, u64::MAX);
        assert_eq!(pages(&got).len(), 131_072);
        // The budget bounds it.
        let got = a.speculate(&[run(base, base + 300)], 1, &|_| false, 1000);
        assert_eq!(pages(&got).len(), 1000);
    }

    #[test]
    fn scattered_faults_fetch_little() {
        let a = Adaptive::default();
        let base = 1 << 20;
        let demanded: Vec<Run> = (0..8)
            .map(|k| run(base + 64 * k, base + 64 * k + 1))
            .collect();
        assert!(a.speculate(&demanded, 0, &|_| false, u64::MAX).is_empty());
    }

    #[test]
    fn the_exact_policy_has_no_parameters() {
        assert_eq!(FetchPolicy::Exact.adaptive(), None);
        assert_eq!(FetchPolicy::default().adaptive(), Some(Adaptive::default()));
    }

    proptest! {
        /// Against a naive model: the speculation never names a resident or
        /// demanded page, never exceeds the budget, and returns sorted,
        /// disjoint runs; every page it names is in the occupancy tree's
        /// qualifying nodes or in some stream's look-ahead.
        #[test]
        fn speculation_respects_its_bounds(
            runs in proptest::collection::vec((0u64..2048, 1u64..64), 0..12),
            resident in proptest::collection::btree_set(0u64..4096, 0..600),
            round in 0u32..4,
            budget in 0u64..5000,
        ) {
            let a = Adaptive::default();
            // Demanded: sorted, disjoint runs from the generated ones.
            let mut d: BTreeSet<u64> = BTreeSet::new();
            for (s, n) in &runs {
                d.extend(*s..s + n);
            }
            let mut demanded = Vec::new();
            let mut it = d.iter().copied().peekable();
            while let Some(s) = it.next() {
                let mut e = s + 1;
                while it.peek() == Some(&e) {
                    it.next();
                    e += 1;
                }
                demanded.push(run(s, e));
            }
            let res = |va: VirtAddr| resident.contains(&(va.0 / PAGE_SIZE));
            let got = a.speculate(&demanded, round, &res, budget);
            let p = pages(&got);
            prop_assert!(p.len() as u64 <= budget);
            prop_assert!(p.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(got.windows(2).all(|w| w[0].end() < w[1].start()), "merged runs");
            for page in &p {
                prop_assert!(!d.contains(page) && !resident.contains(page), "page {page}");
                let in_block = demanded.iter().any(|r| {
                    let s = r.range.start().0 / PAGE_SIZE;
                    s / 512 == page / 512 || (r.range.end().0 / PAGE_SIZE - 1) / 512 == page / 512
                        || (s / 512..=(r.range.end().0 / PAGE_SIZE - 1) / 512).contains(&(page / 512))
                });
                let in_stream = demanded.iter().any(|r| {
                    let (s, e) = (r.range.start().0 / PAGE_SIZE, r.range.end().0 / PAGE_SIZE);
                    e - s >= 16 && *page >= e && *page < e + ((e - s) << (3 * (round + 1))).min(131_072)
                });
                prop_assert!(in_block || in_stream, "page {page} explained by nothing");
            }
        }
    }
}
