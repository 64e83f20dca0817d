//! The mirror's counters.

// Statistics are not part of any protocol: std atomics even under loom,
// so a model does not explore the interleavings of counter updates.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::config::LaunchPhases;

/// A snapshot of a mirror's counters ([`super::Mirror::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Launches (user calls to `launch`).
    pub launches: u64,
    /// Device submissions, replays included.
    pub submissions: u64,
    /// Replay submissions.
    pub replays: u64,
    /// Valid fault records received.
    pub faults: u64,
    /// Fault records rejected as garbage.
    pub garbage_faults: u64,
    /// Fault batches serviced.
    pub fault_batches: u64,
    /// Runs serviced (after sort/dedupe/coalesce).
    pub fault_runs: u64,
    /// Fault-service attempts that had to start over (sequence moved).
    pub retries: u64,
    /// Regions registered on device faults.
    pub regions_created: u64,
    /// Regions the kernel would not register for events (they follow
    /// explicit invalidation only).
    pub unwatched_regions: u64,
    /// Regions released by the deferred-release worker.
    pub deferred_releases: u64,
    /// Pages copied CPU → device (a zero-copy device: pages mapped, nothing
    /// copied).
    pub pages_in: u64,
    /// Pages copied device → CPU.
    pub pages_out: u64,
    /// Pages evicted from a full pool.
    pub evictions: u64,
    /// Invalidations that reached this mirror, by event kind: unmap,
    /// remove, remap, protection, cpu-write, coherence, release, clear.
    pub invalidations: [u64; 8],
    /// Pages mapped by `prefetch`.
    pub prefetched: u64,
    /// Pages the fetch policy brought in beyond the faulted ones
    /// ([`FetchPolicy`](super::FetchPolicy)).
    pub speculated: u64,
    /// Of [`speculated`](Self::speculated), the pages the device accessed
    /// before the launch that fetched them ended: their entries'
    /// `ACCESSED` bits, read once when the launch ends. A page evicted or
    /// invalidated before then, or whose bit an eviction sweep cleared,
    /// counts as unused, so this is a lower bound; `speculated_used /
    /// speculated` is the policy's accuracy.
    pub speculated_used: u64,
    /// Pages refreshed when a launch began because the CPU rewrote them
    /// and the device had needed them again in the launches before
    /// (ping-pong detection, part of the adaptive
    /// [`FetchPolicy`](super::FetchPolicy)): each spared a fault.
    pub refreshed: u64,
    /// Of [`refreshed`](Self::refreshed), the pages the device accessed
    /// in the launch (read as for
    /// [`speculated_used`](Self::speculated_used)); a refreshed page it
    /// did not access is not refreshed again until it ping-pongs anew.
    pub refreshed_used: u64,
    /// Device calls that failed where the mirror's state depends on them
    /// (entry writes and clears, window unbinds, write-back reads); a
    /// failed clear is retried, and repeated failures declare the device
    /// lost.
    pub device_errors: u64,
    /// Pages currently mapped on the device.
    pub mapped_pages: u64,
    /// Pool slots in use.
    pub pool_used: u64,
    /// Pool slots in all.
    pub pool_capacity: u64,
    /// Table pages in use.
    pub table_pages_used: u64,
    /// Device-resident pages of shared or file-backed mappings re-hashed at
    /// sync points ([`ForeignWriters::Check`](super::ForeignWriters::Check)).
    pub foreign_checked_pages: u64,
    /// Of those, pages found changed by a writer write tracking cannot see
    /// (another process, a syscall), and invalidated.
    pub foreign_changed_pages: u64,
    /// Pages migrated to the device
    /// ([`Mirror::migrate_to_device`](super::Mirror::migrate_to_device)):
    /// the device held the only copy.
    pub migrated_out: u64,
    /// Migrated pages given back to the CPU (a CPU touch, an explicit
    /// [`Mirror::migrate_to_host`](super::Mirror::migrate_to_host),
    /// eviction, teardown).
    pub migrated_in: u64,
    /// CPU faults on migrated pages served (each gives back the page and
    /// its migrated neighbours).
    pub fault_backs: u64,
    /// Of those, faults served on the event monitor's reader the moment
    /// they were read (no thread hand-off; a driver whose copies are host
    /// code, [`Backend::host_synchronous`](super::backend::Backend::host_synchronous)).
    pub fault_backs_on_reader: u64,
    /// Exclusive pages ([`Mirror::make_exclusive`](super::Mirror::make_exclusive))
    /// whose device access a CPU touch revoked.
    pub exclusive_revoked: u64,
    /// Pages in the neighbourhoods those fault-backs chose (a page, or 64 KiB to
    /// 2 MiB each, by density: `mirror::migrate`); only migrated pages in
    /// them are given back, so `migrated_in` from faults is at most this.
    pub fault_back_span: u64,
    /// Runs of pages advised [`Advice::PreferDevice`](super::Advice::PreferDevice)
    /// that a launch touched and that could not migrate (a `tracing`
    /// warning says why).
    pub preferred_refused: u64,
    /// Time spent serving fault-backs, from the server's pick-up to the
    /// install (waiting for a running launch included).
    pub fault_back_time: Duration,
    /// Launch time by phase, summed over launches
    /// ([`LaunchReport::phases`](super::LaunchReport::phases)); `copy_in`
    /// and `page_table` count every copy and entry write of this mirror,
    /// prefetches and pins included.
    pub phases: LaunchPhases,
}

impl MirrorStats {
    /// Sum of `invalidations`.
    pub fn invalidations_total(&self) -> u64 {
        self.invalidations.iter().sum()
    }
    /// Device memory in use, bytes: pool slots and table pages in use.
    pub fn device_bytes_used(&self) -> u64 {
        (self.pool_used + self.table_pages_used) * 4096
    }
}

impl core::fmt::Display for MirrorStats {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        writeln!(
            f,
            "launches {:>10}   submissions {:>8}   replays {:>8}",
            self.launches, self.submissions, self.replays
        )?;
        writeln!(
            f,
            "faults   {:>10}   batches     {:>8}   runs    {:>8}   retries {}   garbage {}",
            self.faults, self.fault_batches, self.fault_runs, self.retries, self.garbage_faults
        )?;
        writeln!(
            f,
            "pages in {:>10}   pages out   {:>8}   evictions {:>6}   prefetched {}   speculated {} (used {})   refreshed {} (used {})",
            self.pages_in,
            self.pages_out,
            self.evictions,
            self.prefetched,
            self.speculated,
            self.speculated_used,
            self.refreshed,
            self.refreshed_used
        )?;
        let k = &self.invalidations;
        writeln!(
            f,
            "invalidations: unmap {} remove {} remap {} protection {} cpu-write {} coherence {} release {} clear {}",
            k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]
        )?;
        writeln!(
            f,
            "foreign-writer check: pages hashed {}   changed {}",
            self.foreign_checked_pages, self.foreign_changed_pages
        )?;
        if self.migrated_out + self.migrated_in > 0 {
            writeln!(
                f,
                "migration: pages out {}   pages back {}   fault-backs {} ({} on the reader, {:?})   exclusive revoked {}",
                self.migrated_out,
                self.migrated_in,
                self.fault_backs,
                self.fault_backs_on_reader,
                self.fault_back_time,
                self.exclusive_revoked
            )?;
        }
        writeln!(
            f,
            "regions created {}  released {}   mapped pages {}   pool {}/{}   table pages {}",
            self.regions_created,
            self.deferred_releases,
            self.mapped_pages,
            self.pool_used,
            self.pool_capacity,
            self.table_pages_used
        )?;
        write!(f, "time: {}", self.phases)
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub launches: AtomicU64,
    pub submissions: AtomicU64,
    pub replays: AtomicU64,
    pub faults: AtomicU64,
    pub garbage_faults: AtomicU64,
    pub fault_batches: AtomicU64,
    pub fault_runs: AtomicU64,
    pub retries: AtomicU64,
    pub regions_created: AtomicU64,
    pub unwatched_regions: AtomicU64,
    pub deferred_releases: AtomicU64,
    pub pages_in: AtomicU64,
    pub pages_out: AtomicU64,
    pub evictions: AtomicU64,
    pub invalidations: [AtomicU64; 8],
    pub prefetched: AtomicU64,
    pub speculated: AtomicU64,
    pub speculated_used: AtomicU64,
    pub refreshed: AtomicU64,
    pub refreshed_used: AtomicU64,
    pub device_errors: AtomicU64,
    pub foreign_checked_pages: AtomicU64,
    pub foreign_changed_pages: AtomicU64,
    pub migrated_out: AtomicU64,
    pub migrated_in: AtomicU64,
    pub fault_backs: AtomicU64,
    pub fault_backs_on_reader: AtomicU64,
    pub exclusive_revoked: AtomicU64,
    pub fault_back_span: AtomicU64,
    pub preferred_refused: AtomicU64,
    pub fault_back_ns: AtomicU64,
    /// Nanoseconds copying pages into device memory (`LaunchPhases::copy_in`).
    pub copy_in_ns: AtomicU64,
    /// Nanoseconds in the backend's `write_ptes` (`LaunchPhases::page_table`).
    pub page_table_ns: AtomicU64,
    /// Nanoseconds in the top-level launch phases, in `LaunchPhases`'
    /// order: sync point, will-need, submit, wait, read-back, service,
    /// write-back.
    pub phase_ns: [AtomicU64; 7],
}

impl Counters {
    /// Adds the time since `t` to `c`, in nanoseconds.
    pub(crate) fn add_since(c: &AtomicU64, t: std::time::Instant) {
        Self::add(c, u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    /// Runs `f`, adding the time it took to `c` (nanoseconds).
    pub(crate) fn timed<T>(c: &AtomicU64, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let r = f();
        Self::add_since(c, t);
        r
    }
    /// Adds a launch's top-level phases to the running sums.
    pub(crate) fn add_phases(&self, p: &LaunchPhases) {
        let top = [
            p.sync_point,
            p.will_need,
            p.submit,
            p.wait,
            p.read_back,
            p.service,
            p.write_back,
        ];
        for (c, d) in self.phase_ns.iter().zip(top) {
            Self::add(c, u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    /// The running sums as phases.
    pub(crate) fn phases(&self) -> LaunchPhases {
        let d = |i: usize| Self::duration(&self.phase_ns[i]);
        LaunchPhases {
            sync_point: d(0),
            will_need: d(1),
            submit: d(2),
            wait: d(3),
            read_back: d(4),
            service: d(5),
            copy_in: Self::duration(&self.copy_in_ns),
            page_table: Self::duration(&self.page_table_ns),
            write_back: d(6),
        }
    }
    /// A nanosecond counter as a duration.
    pub(crate) fn duration(c: &AtomicU64) -> Duration {
        Duration::from_nanos(Self::get(c))
    }
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        // Relaxed: statistics; nothing is published through them.
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn get(c: &AtomicU64) -> u64 {
        // Relaxed: statistics.
        c.load(Ordering::Relaxed)
    }
}
