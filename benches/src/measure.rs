//! Taking one sample: wall time, setup time, CPU time, counter deltas,
//! device memory.

use std::time::{Duration, Instant};

use hmm_core::mirror::backend::Backend;
use hmm_core::mirror::{Mirror, MirrorStats};

/// Process CPU time (user + system, every thread) from `getrusage`.
pub fn cpu_time() -> Duration {
    // SAFETY: `rusage` is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What one run of one strategy measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// End to end, setup included.
    pub total: Duration,
    /// Making the memory usable (pinning, prefetching); zero on demand.
    pub setup: Duration,
    /// Process CPU time spent (all threads).
    pub cpu: Duration,
    /// Counters accumulated during the run (gauges: at the peak).
    pub stats: MirrorStats,
    /// Peak device memory seen at the measuring points, bytes.
    pub device_bytes: u64,
}

/// A run in progress.
pub struct Meter {
    t0: Instant,
    cpu0: Duration,
    s0: MirrorStats,
    setup: Option<Duration>,
    peak: u64,
    peak_stats: MirrorStats,
    excluded: Duration,
    excluded_cpu: Duration,
}

impl Meter {
    /// Starts timing `m`'s run now.
    pub fn start<B: Backend>(m: &Mirror<B>) -> Meter {
        let s0 = m.stats();
        Meter {
            cpu0: cpu_time(),
            t0: Instant::now(),
            peak: 0,
            peak_stats: s0,
            s0,
            setup: None,
            excluded: Duration::ZERO,
            excluded_cpu: Duration::ZERO,
        }
    }

    /// Runs `f` off the clock (result verification inside a timed loop).
    pub fn off_clock<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (t, c) = (Instant::now(), cpu_time());
        let r = f();
        self.excluded += t.elapsed();
        self.excluded_cpu += cpu_time().saturating_sub(c);
        r
    }

    /// Runs `f` (pinning, prefetching) as setup: its time counts in the
    /// total and is also summed into the sample's setup time.
    pub fn setup<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.setup = Some(self.setup.unwrap_or(Duration::ZERO) + t.elapsed());
        r
    }

    /// Notes device memory now (call where it peaks: after launches,
    /// before unpinning). Costs a stats snapshot (one lock).
    pub fn note<B: Backend>(&mut self, m: &Mirror<B>) {
        let s = m.stats();
        let b = s.device_bytes_used();
        if b >= self.peak {
            self.peak = b;
            self.peak_stats = s;
        }
    }

    /// Ends the run.
    pub fn finish<B: Backend>(mut self, m: &Mirror<B>) -> Sample {
        let total = self.t0.elapsed().saturating_sub(self.excluded);
        let cpu = cpu_time()
            .saturating_sub(self.cpu0)
            .saturating_sub(self.excluded_cpu);
        self.note(m);
        let end = m.stats();
        Sample {
            total,
            setup: self.setup.unwrap_or(Duration::ZERO),
            cpu,
            stats: delta(&self.s0, &end, &self.peak_stats),
            device_bytes: self.peak,
        }
    }
}

/// Counters of `b` minus those of `a`; gauges from `peak`.
fn delta(a: &MirrorStats, b: &MirrorStats, peak: &MirrorStats) -> MirrorStats {
    MirrorStats {
        launches: b.launches - a.launches,
        submissions: b.submissions - a.submissions,
        replays: b.replays - a.replays,
        faults: b.faults - a.faults,
        garbage_faults: b.garbage_faults - a.garbage_faults,
        fault_batches: b.fault_batches - a.fault_batches,
        fault_runs: b.fault_runs - a.fault_runs,
        retries: b.retries - a.retries,
        regions_created: b.regions_created - a.regions_created,
        unwatched_regions: b.unwatched_regions - a.unwatched_regions,
        deferred_releases: b.deferred_releases - a.deferred_releases,
        pages_in: b.pages_in - a.pages_in,
        pages_out: b.pages_out - a.pages_out,
        evictions: b.evictions - a.evictions,
        invalidations: core::array::from_fn(|i| b.invalidations[i] - a.invalidations[i]),
        prefetched: b.prefetched - a.prefetched,
        speculated: b.speculated - a.speculated,
        speculated_used: b.speculated_used - a.speculated_used,
        refreshed: b.refreshed - a.refreshed,
        refreshed_used: b.refreshed_used - a.refreshed_used,
        device_errors: b.device_errors - a.device_errors,
        mapped_pages: peak.mapped_pages,
        pool_used: peak.pool_used,
        pool_capacity: peak.pool_capacity,
        table_pages_used: peak.table_pages_used,
        foreign_checked_pages: b.foreign_checked_pages - a.foreign_checked_pages,
        foreign_changed_pages: b.foreign_changed_pages - a.foreign_changed_pages,
        migrated_out: b.migrated_out - a.migrated_out,
        migrated_in: b.migrated_in - a.migrated_in,
        fault_backs: b.fault_backs - a.fault_backs,
        fault_backs_on_reader: b.fault_backs_on_reader - a.fault_backs_on_reader,
        exclusive_revoked: b.exclusive_revoked - a.exclusive_revoked,
        fault_back_span: b.fault_back_span - a.fault_back_span,
        preferred_refused: b.preferred_refused - a.preferred_refused,
        fault_back_time: b.fault_back_time.saturating_sub(a.fault_back_time),
        phases: b.phases.saturating_sub(&a.phases),
    }
}

/// The sample with the median total time (lower middle for even counts).
pub fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by_key(|s| s.total);
    v[(v.len() - 1) / 2]
}
