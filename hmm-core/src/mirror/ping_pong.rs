//! Ping-pong detection: pages the CPU and the device take turns on, and
//! the refresh that spares them a fault round ([`PingPong`]).
//!
//! # The pattern
//!
//! An iterative program often rewrites the same few pages on the CPU
//! between launches (a parameter block, a boundary strip, a solver's
//! residual) that every launch then reads. In copy mode each CPU write
//! drops the device's copy at the next sync point, and the launch faults
//! the page back in: one more fault round per launch, hundreds of
//! microseconds on a GPU before any copy, to learn what the last launch
//! already showed. This is the mirror's form of what NVIDIA UVM calls
//! thrashing — a page moving back and forth between processors — which
//! UVM detects by counting a page's migrations within a time window and
//! mitigates by pinning or throttling (`uvm_perf_thrashing.c`). A mirror
//! keeps the CPU's copy anyway, so its mitigation is simpler: bring the
//! fresh copy in *before* the device asks.
//!
//! # The rule
//!
//! A page's **streak** counts consecutive launches in which (1) a CPU
//! write dropped its device copy since the previous launch ended and
//! (2) the device needed it again — it faulted on it, or it was refreshed
//! and the device accessed it (its entry's `ACCESSED` bit, read once when
//! the launch ends). When a launch begins and a page whose streak has
//! reached the threshold ([`Adaptive::ping_pong_launches`], 2 by
//! default) was dropped by a CPU write again, it is fetched with the
//! launch's will-need fetches (writable if the device last wrote it),
//! within the pool's free slots: a refresh never evicts. A dropped page
//! the device did not need ends its streak; so does a refreshed page the
//! device did not access (the refresh cost one page copy, and stops).
//!
//! What bounds it: at most [`MAX_TRACKED`] pages have a streak (new ones
//! are not tracked beyond that; a page's streak is forgotten after
//! [`FORGET_AFTER`] launches without a CPU drop), and a launch refreshes at
//! most the pool's free slots. It is part of the adaptive fetch policy:
//! [`FetchPolicy::Exact`](super::FetchPolicy::Exact) never refreshes.
//!
//! [`Adaptive::ping_pong_launches`]: super::policy::Adaptive::ping_pong_launches

use std::collections::{HashMap, HashSet};

use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};

/// Most pages with a streak at once.
pub(crate) const MAX_TRACKED: usize = 1 << 16;
/// Launches without a CPU drop after which a page's streak is forgotten.
pub(crate) const FORGET_AFTER: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Streak {
    /// Consecutive launches the page ping-ponged in.
    n: u32,
    /// The device's last need of it was a write.
    write: bool,
    /// The launch number of its last CPU drop.
    last_drop: u64,
}

/// Per-mirror ping-pong state (driver lock held for every call).
#[derive(Debug, Default)]
pub(crate) struct PingPong {
    /// Launches begun so far.
    launch: u64,
    /// Pages whose device copy a CPU write dropped since the last launch
    /// ended.
    dropped: HashSet<VirtAddr>,
    /// Of `dropped`, the pages the device faulted on in this launch, and
    /// whether for a write.
    needed: HashMap<VirtAddr, bool>,
    /// Pages refreshed when this launch began.
    refreshed: Vec<VirtAddr>,
    streaks: HashMap<VirtAddr, Streak>,
}

impl PingPong {
    /// A CPU write dropped the device's copies of `pages`.
    pub fn cpu_dropped(&mut self, pages: impl IntoIterator<Item = VirtAddr>) {
        self.dropped.extend(pages);
    }

    /// The device faulted on `page` (for a write or not) in this launch.
    pub fn faulted(&mut self, page: VirtAddr, write: bool) {
        if self.dropped.contains(&page) {
            let w = self.needed.entry(page).or_insert(false);
            *w |= write;
        }
    }

    /// A launch begins: the pages to refresh now, as sorted runs of
    /// (range, writable), at most `budget` pages, where a streak of at
    /// least `threshold` meets a CPU drop (`threshold` 0: none). The
    /// pages are remembered for [`PingPong::launch_end`].
    pub fn launch_start(&mut self, threshold: u32, budget: u64) -> Vec<(VaRange, bool)> {
        self.launch += 1;
        self.refreshed.clear();
        self.needed.clear();
        if threshold == 0 || budget == 0 {
            return Vec::new();
        }
        let mut pages: Vec<(VirtAddr, bool)> = self
            .dropped
            .iter()
            .filter_map(|p| {
                let s = self.streaks.get(p)?;
                (s.n >= threshold).then_some((*p, s.write))
            })
            .collect();
        pages.sort_unstable();
        pages.truncate(usize::try_from(budget).unwrap_or(usize::MAX));
        self.refreshed = pages.iter().map(|&(p, _)| p).collect();
        let mut runs: Vec<(VaRange, bool)> = Vec::new();
        for (p, w) in pages {
            let Ok(r) = VaRange::from_start_len(p, PAGE_SIZE) else {
                continue;
            };
            match runs.last_mut() {
                Some((last, lw)) if last.end() == p && *lw == w => {
                    *last = VaRange::new(last.start(), r.end()).unwrap_or(*last);
                }
                _ => runs.push((r, w)),
            }
        }
        runs
    }

    /// The pages refreshed when this launch began.
    pub fn refreshed(&self) -> &[VirtAddr] {
        &self.refreshed
    }

    /// The launch ends: `used` says, for each page of
    /// [`PingPong::refreshed`] in order, whether the device accessed it.
    /// Streaks grow, end or are forgotten (module docs); the drops are
    /// consumed. Returns the refreshed pages the device used.
    pub fn launch_end(&mut self, used: &[bool]) -> u64 {
        let launch = self.launch;
        let mut n_used = 0;
        let refreshed: HashMap<VirtAddr, bool> = self
            .refreshed
            .iter()
            .zip(used.iter().copied().chain(std::iter::repeat(false)))
            .map(|(&p, u)| (p, u))
            .collect();
        for p in self.dropped.drain() {
            let need = match (self.needed.get(&p), refreshed.get(&p)) {
                (Some(&w), _) => Some(w),
                (None, Some(true)) => {
                    n_used += 1;
                    Some(self.streaks.get(&p).is_some_and(|s| s.write))
                }
                _ => None,
            };
            match need {
                Some(write) => {
                    if let Some(s) = self.streaks.get_mut(&p) {
                        s.n = s.n.saturating_add(1);
                        s.write = write;
                        s.last_drop = launch;
                    } else if self.streaks.len() < MAX_TRACKED {
                        self.streaks.insert(
                            p,
                            Streak {
                                n: 1,
                                write,
                                last_drop: launch,
                            },
                        );
                    }
                }
                None => {
                    self.streaks.remove(&p);
                }
            }
        }
        if launch.is_multiple_of(FORGET_AFTER) {
            self.streaks
                .retain(|_, s| launch.saturating_sub(s.last_drop) < FORGET_AFTER);
        }
        self.needed.clear();
        self.refreshed.clear();
        n_used
    }

    /// Pages with a streak (a test hook).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.streaks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn va(p: u64) -> VirtAddr {
        VirtAddr((1 << 30) + p * PAGE_SIZE)
    }

    fn pages(runs: &[(VaRange, bool)]) -> Vec<(u64, bool)> {
        runs.iter()
            .flat_map(|(r, w)| {
                (r.start().0..r.end().0)
                    .step_by(PAGE_SIZE as usize)
                    .map(move |a| ((a - (1 << 30)) / PAGE_SIZE, *w))
            })
            .collect()
    }

    #[test]
    fn two_launches_of_ping_pong_make_the_third_a_refresh() {
        let mut pp = PingPong::default();
        for launch in 0..5 {
            pp.cpu_dropped([va(3), va(4), va(9)]);
            let runs = pp.launch_start(2, u64::MAX);
            if launch < 2 {
                assert!(runs.is_empty(), "launch {launch}: no streak yet");
                // The device faults on 3 and 4 (4 for a write), not on 9.
                pp.faulted(va(3), false);
                pp.faulted(va(4), true);
                pp.faulted(va(20), false); // not dropped: no streak
                assert_eq!(pp.launch_end(&[]), 0);
            } else {
                assert_eq!(pages(&runs), vec![(3, false), (4, true)], "launch {launch}");
                assert_eq!(pp.refreshed(), &[va(3), va(4)]);
                assert_eq!(pp.launch_end(&[true, true]), 2);
            }
        }
        assert_eq!(pp.tracked(), 2);
        // A refreshed page the device did not access ends its streak.
        pp.cpu_dropped([va(3), va(4)]);
        assert_eq!(pages(&pp.launch_start(2, u64::MAX)).len(), 2);
        assert_eq!(pp.launch_end(&[false, true]), 1);
        assert_eq!(pp.tracked(), 1);
        pp.cpu_dropped([va(3), va(4)]);
        assert_eq!(pages(&pp.launch_start(2, u64::MAX)), vec![(4, true)]);
        // The budget bounds a refresh; threshold 0 switches it off.
        pp.launch_end(&[true]);
        pp.cpu_dropped([va(4)]);
        assert!(pp.launch_start(2, 0).is_empty());
        pp.launch_end(&[]);
        pp.cpu_dropped([va(4)]);
        assert!(pp.launch_start(0, 10).is_empty());
    }

    #[test]
    fn streaks_without_drops_are_forgotten() {
        let mut pp = PingPong::default();
        for _ in 0..2 {
            pp.cpu_dropped([va(1)]);
            pp.launch_start(2, 8);
            pp.faulted(va(1), false);
            pp.launch_end(&[]);
        }
        assert_eq!(pp.tracked(), 1);
        for _ in 0..(2 * FORGET_AFTER) {
            pp.launch_start(2, 8);
            pp.launch_end(&[]);
        }
        assert_eq!(pp.tracked(), 0);
    }

    /// One launch of the model: drops, faults (page, write), and which
    /// refreshed pages the device used.
    #[derive(Clone, Debug)]
    struct Step {
        dropped: Vec<u64>,
        faulted: Vec<(u64, bool)>,
        used: Vec<u64>,
        budget: u64,
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            proptest::collection::vec(0u64..24, 0..10),
            proptest::collection::vec((0u64..24, any::<bool>()), 0..10),
            proptest::collection::vec(0u64..24, 0..10),
            0u64..12,
        )
            .prop_map(|(dropped, faulted, used, budget)| Step {
                dropped,
                faulted,
                used,
                budget,
            })
    }

    proptest! {
        /// Against a naive model (a map page → (streak, write) updated by
        /// the rule as the module docs state it): every launch refreshes
        /// exactly the lowest `budget` dropped pages whose streak reached
        /// the threshold, writable as last needed.
        #[test]
        fn refreshes_follow_the_naive_model(
            steps in proptest::collection::vec(step(), 1..24),
            threshold in 1u32..4,
        ) {
            let mut pp = PingPong::default();
            let mut model: HashMap<u64, (u32, bool)> = HashMap::new();
            for s in steps {
                pp.cpu_dropped(s.dropped.iter().map(|&p| va(p)));
                let dropped: std::collections::BTreeSet<u64> = s.dropped.iter().copied().collect();
                let mut want: Vec<(u64, bool)> = dropped
                    .iter()
                    .filter_map(|p| model.get(p).filter(|m| m.0 >= threshold).map(|m| (*p, m.1)))
                    .collect();
                want.truncate(s.budget as usize);
                let got = pages(&pp.launch_start(threshold, s.budget));
                prop_assert_eq!(&got, &want);
                for &(p, w) in &s.faulted {
                    pp.faulted(va(p), w);
                }
                let used: Vec<bool> = got.iter().map(|(p, _)| s.used.contains(p)).collect();
                pp.launch_end(&used);
                // The model's update.
                let refreshed: HashMap<u64, bool> =
                    got.iter().map(|&(p, _)| (p, s.used.contains(&p))).collect();
                for p in dropped {
                    let faulted: Vec<bool> =
                        s.faulted.iter().filter(|f| f.0 == p).map(|f| f.1).collect();
                    let need = if !faulted.is_empty() {
                        Some(faulted.iter().any(|&w| w))
                    } else if refreshed.get(&p) == Some(&true) {
                        Some(model.get(&p).is_some_and(|m| m.1))
                    } else {
                        None
                    };
                    match need {
                        Some(w) => {
                            let e = model.entry(p).or_insert((0, w));
                            e.0 += 1;
                            e.1 = w;
                        }
                        None => {
                            model.remove(&p);
                        }
                    }
                }
                prop_assert_eq!(pp.tracked(), model.len());
            }
        }
    }
}
