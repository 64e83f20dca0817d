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
//! Advice ([`Mirror::advise`](super::Mirror::advise)) steers it:
//! faults in an [`Advice::Random`](super::Advice::Random) range predict
//! nothing and nothing speculative lands there; faults in an
//! [`Advice::Sequential`](super::Advice::Sequential) range are streams
//! whatever their length.
//!
//! 3. **Ping-pong** (UVM's thrashing detection, in a mirror's terms): a
//!    page the CPU rewrites between launches and the device needs again
//!    each time is refreshed when a launch begins instead of faulting
//!    (the `ping_pong` module).
//!
//! Not done yet (issue 16): thrashing under pool pressure (pages evicted
//! and faulted back within a launch), chunk-granular eviction,
//! speculation for zero-copy windows.

use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};

use super::faults::Run;

/// What a round fetches beyond the faulted pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FetchPolicy {
    /// [`FetchPolicy::Adaptive`] where the device's rounds are costly
    /// ([`Backend::rounds_are_costly`](super::backend::Backend::rounds_are_costly):
    /// the GPU drivers), else [`FetchPolicy::Exact`] (the cpu driver,
    /// whose rounds are function calls: measured there, speculation
    /// bought nothing and cost dense saxpy at 1 GiB 2.3 → 2.7 s, cause
    /// not yet attributed).
    #[default]
    Auto,
    /// Exactly the pages that faulted (the mirror before issue 16).
    Exact,
    /// Occupancy and stream prefetch (the module docs).
    Adaptive,
    /// [`FetchPolicy::Adaptive`] with other parameters.
    AdaptiveWith(Adaptive),
}

impl FetchPolicy {
    /// The adaptive parameters, if adaptive on a device whose rounds are
    /// `costly` or not.
    pub fn adaptive(self, costly: bool) -> Option<Adaptive> {
        match self {
            FetchPolicy::Exact => None,
            FetchPolicy::Auto if !costly => None,
            FetchPolicy::Auto | FetchPolicy::Adaptive => Some(Adaptive::default()),
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
    /// Ping-pong detection (the `ping_pong` module): a page the CPU
    /// rewrote and the device needed again in this many consecutive
    /// launches is refreshed when the next launch begins, if the CPU wrote
    /// it again, instead of faulting (0: never; 2 by default).
    pub ping_pong_launches: u32,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            threshold_percent: 51,
            min_node_pages: 16,
            block_pages: 512,
            min_stream_pages: 16,
            max_ahead_pages: 131_072,
            ping_pong_launches: 2,
        }
    }
}

impl Adaptive {
    /// The pages to fetch speculatively after a round whose faults were
    /// `demanded` (runs sorted by address, not overlapping), in round
    /// `round` of the launch (0 for the first). `resident_in(r, out)`
    /// appends the page numbers (address / 4096) resident in `r`, in
    /// order. At most `budget` pages, none resident or demanded, returned
    /// as sorted, non-overlapping runs (the caller clips them to the CPU
    /// mapping). Cost: linear in the blocks the round faulted in and in
    /// the resident pages of the ranges considered, not in the pages a
    /// stream looks ahead over.
    pub fn speculate(
        &self,
        demanded: &[Run],
        round: u32,
        resident_in: &dyn Fn(VaRange, &mut Vec<u64>),
        budget: u64,
    ) -> Vec<VaRange> {
        let page_range = |s: u64, e: u64| {
            VaRange::new(
                VirtAddr(s.saturating_mul(PAGE_SIZE)),
                VirtAddr(e.saturating_mul(PAGE_SIZE)),
            )
            .ok()
        };
        let runs: Vec<(u64, u64)> = demanded
            .iter()
            .map(|r| (r.range.start().0 / PAGE_SIZE, r.range.end().0 / PAGE_SIZE))
            .collect();
        let mut want: Vec<(u64, u64)> = Vec::new();
        // 1. Occupancy, block by block.
        let block = self.block_pages.clamp(1, 1 << 20).next_power_of_two();
        let min_node = self.min_node_pages.clamp(1, block).next_power_of_two();
        let mut blocks: Vec<u64> = Vec::new();
        for &(s, e) in &runs {
            for b in s / block..e.div_ceil(block) {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
            }
        }
        let bl = block as usize;
        let (mut dem, mut occ) = (vec![0u64; bl + 1], vec![0u64; bl + 1]);
        let mut res = Vec::new();
        let mut mark = vec![(false, false); bl];
        for b in blocks {
            let base = b * block;
            mark.iter_mut().for_each(|m| *m = (false, false));
            // Demanded pages of the block: the runs that overlap it.
            let first = runs.partition_point(|&(_, e)| e <= base);
            for &(s, e) in runs[first..].iter().take_while(|&&(s, _)| s < base + block) {
                for p in s.max(base)..e.min(base + block) {
                    mark[(p - base) as usize].0 = true;
                }
            }
            res.clear();
            if let Some(r) = page_range(base, base + block) {
                resident_in(r, &mut res);
            }
            for &p in &res {
                if (base..base + block).contains(&p) {
                    mark[(p - base) as usize].1 = true;
                }
            }
            for k in 0..bl {
                dem[k + 1] = dem[k] + u64::from(mark[k].0);
                occ[k + 1] = occ[k] + u64::from(mark[k].0 || mark[k].1);
            }
            // The largest qualifying node around the demanded pages (nodes
            // nest, so smaller ones inside it add nothing).
            let mut node = bl;
            while node >= min_node as usize {
                for s in (0..bl).step_by(node) {
                    let (d, o) = (dem[s + node] - dem[s], occ[s + node] - occ[s]);
                    if d > 0
                        && o * 100 > u64::from(self.threshold_percent) * node as u64
                        && o < node as u64
                    {
                        want.push((base + s as u64, base + (s + node) as u64));
                    }
                }
                node /= 2;
            }
        }
        // 2. Streams.
        let shift = 3 * (round.min(6) + 1);
        for &(s, e) in &runs {
            let len = e - s;
            if len >= self.min_stream_pages {
                let ahead = len.saturating_mul(1 << shift).min(self.max_ahead_pages);
                want.push((e, e.saturating_add(ahead)));
            }
        }
        // Sorted and merged; minus what is resident or demanded; within
        // the budget.
        want.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in want {
            match merged.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut out: Vec<VaRange> = Vec::new();
        let mut left = budget;
        for (s, e) in merged {
            if left == 0 {
                break;
            }
            // The taken pages of [s, e): resident ones and demanded ones,
            // sorted; the gaps between them are fetched.
            res.clear();
            if let Some(r) = page_range(s, e) {
                resident_in(r, &mut res);
            }
            let first = runs.partition_point(|&(_, re)| re <= s);
            let mut taken: Vec<(u64, u64)> = res.iter().map(|&p| (p, p + 1)).collect();
            taken.extend(runs[first..].iter().take_while(|&&(rs, _)| rs < e).copied());
            taken.sort_unstable();
            let mut p = s;
            for (ts, te) in taken.into_iter().chain(std::iter::once((e, e))) {
                let gap_end = ts.min(e);
                if p < gap_end && left > 0 {
                    let n = (gap_end - p).min(left);
                    if let Some(r) = page_range(p, p + n) {
                        match out.last_mut() {
                            Some(last) if last.end() == r.start() => {
                                *last = VaRange::new(last.start(), r.end()).unwrap_or(*last);
                            }
                            _ => out.push(r),
                        }
                    }
                    left -= n;
                }
                p = p.max(te);
                if p >= e || left == 0 {
                    break;
                }
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

    /// Nothing resident.
    fn none(_: VaRange, _: &mut Vec<u64>) {}

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
        let got = a.speculate(&[run(base, base + 300)], 0, &none, u64::MAX);
        let p = pages(&got);
        assert_eq!(p.first(), Some(&(base + 300)));
        assert_eq!(p.len(), 2400, "the stream's look-ahead, block included");
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        // Not a stream (15 pages), but 15 + 5 resident of a 32-page node:
        // the node's other 12 come.
        let res = |r: VaRange, out: &mut Vec<u64>| {
            let (s, e) = (r.start().0 / PAGE_SIZE, r.end().0 / PAGE_SIZE);
            out.extend((base + 20..base + 25).filter(|p| (s..e).contains(p)));
        };
        let got = a.speculate(&[run(base, base + 15)], 0, &res, u64::MAX);
        let want: Vec<u64> = (base + 15..base + 20).chain(base + 25..base + 32).collect();
        assert_eq!(pages(&got), want);
        // Round 1 looks 64x further.
        let got = a.speculate(&[run(base, base + 300)], 1, &none, u64::MAX);
        assert_eq!(pages(&got).len(), 19_200);
        // At most `max_ahead_pages`.
        let got = a.speculate(&[run(base, base + 3000)], 1, &none, u64::MAX);
        assert_eq!(pages(&got).len(), 131_072);
        // The budget bounds it.
        let got = a.speculate(&[run(base, base + 300)], 1, &none, 1000);
        assert_eq!(pages(&got).len(), 1000);
    }

    #[test]
    fn scattered_faults_fetch_little() {
        let a = Adaptive::default();
        let base = 1 << 20;
        let demanded: Vec<Run> = (0..8)
            .map(|k| run(base + 64 * k, base + 64 * k + 1))
            .collect();
        assert!(a.speculate(&demanded, 0, &none, u64::MAX).is_empty());
    }

    #[test]
    fn the_exact_policy_has_no_parameters() {
        assert_eq!(FetchPolicy::Exact.adaptive(true), None);
        assert_eq!(
            FetchPolicy::default().adaptive(true),
            Some(Adaptive::default())
        );
        assert_eq!(FetchPolicy::default().adaptive(false), None);
        assert_eq!(
            FetchPolicy::Adaptive.adaptive(false),
            Some(Adaptive::default())
        );
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
            let res = |r: VaRange, out: &mut Vec<u64>| {
                out.extend(resident.range(r.start().0 / PAGE_SIZE..r.end().0 / PAGE_SIZE));
            };
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
