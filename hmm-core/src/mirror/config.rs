//! How a mirror is sized ([`MirrorConfig`]), what a launch reports
//! ([`LaunchReport`]) and the advice users give ([`Advice`]).

use std::time::Duration;

use crate::cpu::chunk::DEFAULT_CHUNK_SIZES;

use super::policy::FetchPolicy;

/// How a mirror is sized and behaves.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// Device pool size in 4 KiB slots (default 65536 = 256 MiB).
    pub pool_slots: u32,
    /// Device page-table budget in 4 KiB table pages (default 4096).
    pub table_pages: u32,
    /// Region sizes tried on a device fault, largest first (default
    /// 2 MiB, 64 KiB, 4 KiB).
    pub chunk_sizes: Vec<u64>,
    /// Faults serviced per batch (default 256, UVM's).
    pub fault_batch: usize,
    /// Replays of one launch before giving up (default 1000).
    pub max_replays: u32,
    /// Bound on one run's fault-retry loop (default 1 s).
    pub retry_timeout: Duration,
    /// Whether device copies of memory that another process or a syscall
    /// can change are re-checked at every sync point (default
    /// [`ForeignWriters::Check`]).
    pub foreign_writers: ForeignWriters,
    /// How copy mode learns of this process's own CPU writes to mirrored
    /// memory (default [`CpuWrites::Protect`]).
    pub cpu_writes: CpuWrites,
    /// What a fault-service round fetches beyond the faulted pages
    /// (default [`FetchPolicy::Auto`]: adaptive where rounds are costly;
    /// `Exact` fetches only those, `Adaptive` always speculates).
    pub fetch: FetchPolicy,
}

/// How copy mode learns that the CPU wrote a page the device holds a copy
/// of ([`MirrorConfig::cpu_writes`]). Zero-copy devices read the CPU's own
/// pages and ignore this.
///
/// **The trade-off is transparent huge pages.** Write tracking
/// write-protects (`UFFD_FEATURE_WP_ASYNC`) the pages the device holds;
/// the kernel splits an armed 2 MiB huge page at the CPU's first write to
/// it (and `MADV_COLLAPSE` refuses write-protected pages), so a
/// THP-backed buffer the device mirrored loses its huge pages — and the
/// CPU its TLB reach over them — for the rest of the run. Huge pages in
/// 2 MiB blocks the device never faulted on are never armed and stay
/// huge. The figures (`AnonHugePages` before and after, a dense CPU pass
/// over split and whole pages, the per-launch cost of hashing) are in the
/// README, measured by `cargo run --release -p hmm --example thp_cost`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuWrites {
    /// Write-protect the device's pages and collect the written ones at
    /// each sync point (`PAGEMAP_SCAN`): the sync point costs a scan of
    /// the watched ranges, independent of how much is resident. Splits
    /// the huge pages of 2 MiB blocks the device holds, once the CPU
    /// writes them.
    #[default]
    Protect,
    /// Arm nothing: keep a 64-bit hash (xxh3) of every page copied to the
    /// device and re-hash the CPU pages of all of them at each sync point;
    /// pages whose hash changed are dropped, exactly as written pages are
    /// under [`CpuWrites::Protect`] (the same check
    /// [`ForeignWriters::Check`] runs for shared mappings, applied to every
    /// page). Huge pages stay huge. Cost: one read and hash of every
    /// device-resident page per launch — about 220 ms per GiB resident on
    /// a 2-core VM (README), where `Protect` costs a page-table scan.
    /// Worth it for THP-backed buffers the CPU works on densely between
    /// launches, with little of them resident on the device; kernel
    /// events (unmap, remap, remove) are still followed.
    Hash,
}

/// Writers the mirror's write tracking cannot see, and what to do about
/// them ([`MirrorConfig::foreign_writers`]).
///
/// CPU write tracking (`UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`) sees
/// writes made through *this process's* page tables only. Memory that
/// changes without such a write — a `MAP_SHARED` mapping (anonymous, file,
/// memfd, SysV shm) written by another process or by `pwrite()`/`write()`
/// to its file, or a private file mapping whose pages this process never
/// wrote (until copied on write they show the file, so `pwrite()` to the
/// file changes them) — would otherwise be served stale by the device at
/// the next launch.
///
/// Private anonymous memory (`malloc`, `Vec`, stacks) cannot change that
/// way and never pays for this check.
///
/// **Not seen by any setting:** DMA into long-held pins (io_uring fixed
/// buffers, RDMA registrations, `vmsplice` gifts): the device writes the
/// physical page while the CPU-side page tables change nothing, and no
/// userspace check can tell when. The guarantee is "as of the sync
/// point": a foreign write after the check is seen at the next launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForeignWriters {
    /// Correct by default: when copy mode copies a page of such a mapping
    /// to the device it records a 64-bit hash (xxh3) of the bytes copied;
    /// at each launch's start-of-launch sync point it re-hashes the CPU
    /// pages of every device-resident page of such mappings and
    /// invalidates (as a CPU write) exactly those whose hash changed.
    /// Cost: one fault-proof read and hash per resident page of such
    /// mappings per launch — about 220 ms per GiB of resident pages on a
    /// 2-core VM (README), against 0.5–1.3 s per GiB for re-copying them.
    /// Private anonymous memory costs nothing. Zero-copy devices read the
    /// CPU's own pages and never check.
    #[default]
    Check,
    /// Trust that nothing but this process's own stores changes mirrored
    /// memory: no hashing at copy-in, no check at sync points (saves the
    /// per-launch re-hash of resident shared and file-backed pages). Safe
    /// only when no other process, no syscall writing the backing file or
    /// memfd (`pwrite`, `write`, `copy_file_range`, `fallocate`/truncate
    /// that changes contents) and no DMA writes the mirrored memory between
    /// launches; otherwise the device reads the old data, without an error,
    /// until an explicit `Clear` invalidation of the range.
    Trust,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            pool_slots: 65536,
            table_pages: 4096,
            chunk_sizes: DEFAULT_CHUNK_SIZES.to_vec(),
            fault_batch: 256,
            max_replays: 1000,
            retry_timeout: Duration::from_secs(1),
            foreign_writers: ForeignWriters::Check,
            cpu_writes: CpuWrites::Protect,
            fetch: FetchPolicy::Auto,
        }
    }
}

/// What one launch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchReport {
    /// Device submissions (1 + replays).
    pub submissions: u32,
    /// Valid faults serviced.
    pub faults: u64,
    /// Pages copied in while servicing them (a zero-copy device: pages
    /// mapped, nothing copied).
    pub pages_in: u64,
    /// Dirty pages written back at the end.
    pub pages_out: u64,
    /// CPU-written pages invalidated at the start (sync point).
    pub cpu_written_pages: u64,
    /// Pages of shared or file-backed mappings found changed by another
    /// writer at the start (the hash check of [`ForeignWriters::Check`])
    /// and invalidated.
    pub foreign_changed_pages: u64,
    /// Where the launch's time went.
    pub phases: LaunchPhases,
}

/// Where one launch's time went ([`LaunchReport::phases`]): wall-clock
/// time on the launching thread, phase by phase, so that what separates a
/// launch from its floor (or a mirror from pinning) is measured rather
/// than guessed.
///
/// The top-level phases follow a launch in order and do not overlap; their
/// sum ([`LaunchPhases::total`]) is at most the launch's wall time (the
/// rest is bookkeeping between them: validating fault records, planning
/// replays, taking locks). [`copy_in`](Self::copy_in) and
/// [`page_table`](Self::page_table) are parts of those phases, not phases
/// of their own: they are read from mirror-wide counters around the
/// launch, so they also include copies and entry writes that other
/// threads made for this mirror meanwhile (an invalidation clearing
/// entries, say).
///
/// ```
/// # use hmm_core::mirror::LaunchPhases;
/// # use std::time::Duration;
/// let mut sum = LaunchPhases::default();
/// sum += LaunchPhases { wait: Duration::from_micros(5), ..LaunchPhases::default() };
/// sum += LaunchPhases { service: Duration::from_micros(7), ..LaunchPhases::default() };
/// assert_eq!(sum.total(), Duration::from_micros(12));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchPhases {
    /// The start-of-launch sync point: collecting CPU writes, the
    /// foreign-writer check, and retrying write-backs refused earlier.
    pub sync_point: Duration,
    /// [`Advice::WillNeed`] fetches before the first round.
    pub will_need: Duration,
    /// Each round's submission: writing queued entry clears, then the
    /// backend's `launch` (recording and submitting the work).
    pub submit: Duration,
    /// The backend's `wait` for each round's work.
    pub wait: Duration,
    /// The backend's `take_outcome` for each round: fault records and
    /// incomplete invocations read back.
    pub read_back: Duration,
    /// Host fault service between rounds: planning, CPU faults and
    /// snapshots, eviction, copies, entry writes.
    pub service: Duration,
    /// Part of the phases above: copying pages into device memory
    /// (straight into host-addressable slots, or staged and uploaded).
    pub copy_in: Duration,
    /// Part of the phases above: the backend's `write_ptes` calls.
    pub page_table: Duration,
    /// The end-of-launch write-back of device-dirty pages.
    pub write_back: Duration,
}

impl LaunchPhases {
    /// The sum of the top-level phases (all but `copy_in` and
    /// `page_table`, which lie inside them).
    pub fn total(&self) -> Duration {
        self.sync_point
            + self.will_need
            + self.submit
            + self.wait
            + self.read_back
            + self.service
            + self.write_back
    }
}

impl LaunchPhases {
    /// Each phase of `self` minus the same phase of `earlier` (zero where
    /// that would be negative): what a run added to cumulative phases
    /// ([`MirrorStats::phases`](super::MirrorStats::phases)).
    pub fn saturating_sub(&self, earlier: &LaunchPhases) -> LaunchPhases {
        LaunchPhases {
            sync_point: self.sync_point.saturating_sub(earlier.sync_point),
            will_need: self.will_need.saturating_sub(earlier.will_need),
            submit: self.submit.saturating_sub(earlier.submit),
            wait: self.wait.saturating_sub(earlier.wait),
            read_back: self.read_back.saturating_sub(earlier.read_back),
            service: self.service.saturating_sub(earlier.service),
            copy_in: self.copy_in.saturating_sub(earlier.copy_in),
            page_table: self.page_table.saturating_sub(earlier.page_table),
            write_back: self.write_back.saturating_sub(earlier.write_back),
        }
    }
}

impl core::ops::AddAssign for LaunchPhases {
    fn add_assign(&mut self, o: LaunchPhases) {
        self.sync_point += o.sync_point;
        self.will_need += o.will_need;
        self.submit += o.submit;
        self.wait += o.wait;
        self.read_back += o.read_back;
        self.service += o.service;
        self.copy_in += o.copy_in;
        self.page_table += o.page_table;
        self.write_back += o.write_back;
    }
}

impl core::fmt::Display for LaunchPhases {
    /// One line, microseconds: `sync 12 · submit 30 · wait 80 · …`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        write!(
            f,
            "sync {:.0} · will-need {:.0} · submit {:.0} · wait {:.0} · read-back {:.0} · service {:.0} (copies {:.0}, entries {:.0}) · write-back {:.0} µs",
            us(self.sync_point),
            us(self.will_need),
            us(self.submit),
            us(self.wait),
            us(self.read_back),
            us(self.service),
            us(self.copy_in),
            us(self.page_table),
            us(self.write_back)
        )
    }
}

/// Advice on how a range is used ([`Mirror::advise`](super::Mirror::advise)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Mostly read, by several devices: read faults map read-only copies on
    /// every mirror that wants one; a write collapses them.
    ReadMostly,
    /// Accessed in order (`MADV_SEQUENTIAL`): the adaptive fetch policy
    /// reads ahead of any fault in the range, not only of runs long
    /// enough to look like a sweep.
    Sequential,
    /// Accessed in no order (`MADV_RANDOM`): the adaptive fetch policy
    /// fetches nothing speculatively into the range, nor for faults in it.
    Random,
    /// Needed soon (`MADV_WILLNEED`, CUDA's `cudaMemPrefetchAsync` at the
    /// next kernel): the next launch makes the range resident for reading
    /// before its first round, one bulk fetch instead of faults, and the
    /// advice is spent. Pages that cannot be read by then (unmapped,
    /// protected) are skipped, as `madvise` would; a device error ends
    /// that launch as a fault would. Counted in
    /// [`MirrorStats::prefetched`](super::MirrorStats::prefetched) and the
    /// launch's [`LaunchReport::pages_in`].
    WillNeed,
    /// Prefer the device's memory (CUDA's
    /// `cudaMemAdviseSetPreferredLocation` with the device): pages of the
    /// range resident on the device when a launch ends (those it touched,
    /// and copies earlier launches left there) are migrated to the device
    /// ([`Mirror::migrate_to_device`](super::Mirror::migrate_to_device)),
    /// so later launches neither scan nor write them back; a CPU access
    /// brings them back as usual, and the next launch that touches them
    /// migrates them again. Memory that cannot migrate (shared or file
    /// memory, a zero-copy device, several mirrors) stays where it is: the
    /// advice is a hint, and each refusal is counted in
    /// [`MirrorStats::preferred_refused`](super::MirrorStats::preferred_refused)
    /// with a `tracing` warning naming why. Pages migrated this way are
    /// counted in [`MirrorStats::migrated_out`](super::MirrorStats::migrated_out).
    PreferDevice,
    /// Forget earlier advice for the range (every kind).
    Default,
}
