//! CPU-write tracking with `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN`.
//!
//! # The mechanism
//!
//! A range registered on a userfaultfd in write-protect mode, on an fd
//! whose handshake enabled `WP_ASYNC`, behaves like a dirty-bit tracker
//! the kernel maintains for us:
//!
//! - *protecting* a page sets its uffd-wp bit (with `WP_UNPOPULATED`, even
//!   a never-touched page gets a protected marker, so its first write is
//!   seen too);
//! - a CPU write to a protected page is resolved **by the kernel itself**
//!   (no message, nobody sleeps): it clears the bit and lets the write
//!   through. A page whose bit is clear is reported by `PAGEMAP_SCAN` in
//!   the category `PAGE_IS_WRITTEN`;
//! - `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` re-protects every page it
//!   reports, in the same page-table walk under the page-table lock, so
//!   "read the written set and re-arm" is atomic per page: a write that
//!   lands after a page was reported faults again and shows up in the next
//!   scan. `PM_SCAN_CHECK_WPASYNC` makes the scan fail (`EPERM`) instead of
//!   silently reporting nothing on a range that is not registered with
//!   `WP_ASYNC`.
//!
//! # Arming: `PAGEMAP_SCAN`, not `UFFDIO_WRITEPROTECT`
//!
//! [`WriteTracker::arm`] protects a range with one `PAGEMAP_SCAN` carrying
//! `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, no output vector and all
//! category masks 0. The kernel takes a fast path for that ("exclusive
//! WP": every PTE not yet protected is protected, no per-page folio lookup,
//! nothing reported), which costs 19–21 µs per populated 2 MiB where
//! `UFFDIO_WRITEPROTECT` (`change_protection`, a folio lookup per PTE)
//! costs 48–55 µs, and re-arms an armed 2 MiB in about 1 µs (protected
//! PTEs are skipped) where the ioctl costs the full 50 µs again
//! (`perf-lab/uffdwp.c`; `examples/track_perf.rs` prints ours).
//!
//! Page-table holes get markers too: with all masks 0 a hole matches, and
//! the walk's hole callback write-protects it (`uffd_wp_range`, which with
//! `WP_UNPOPULATED` installs markers) — whether the hole is a missing PTE,
//! a missing PTE table or a missing PMD table. The test
//! `write_tracking_covers_page_table_holes` (tests/cpu_events.rs) settles
//! it on the running kernel: it arms fresh ranges with no PMD table at
//! all, with a PMD table but no PTE table, and with a PTE table but an
//! empty entry, writes one never-touched page of each, and requires the
//! collect to report exactly it, and reads of other never-touched pages
//! there must not be reported: a hole left unprotected would map the zero
//! page on a read with no uffd-wp bit, which reads as written. On 6.18
//! even a `PAGE_IS_WRITTEN`-masked scan protects holes. (An earlier
//! version of this module believed holes were skipped and armed with the
//! ioctl.) The ioctl stays
//! for disarming (a scan cannot un-protect), as [`ArmMethod::Ioctl`] for
//! comparisons, and as the fallback where a scan makes no progress (a
//! partial hugetlb page, which the scan refuses to protect).
//!
//! # Only armed pages are collected
//!
//! `PAGE_IS_WRITTEN` means "not write-protected": a page that was never
//! armed reads as written, so a `WP_MATCHING` collect over it would report
//! it and arm it. The tracker therefore remembers what it armed (the
//! *armed set*, sorted disjoint runs) and [`WriteTracker::collect`] scans
//! only the armed runs of the range asked about: it returns exactly the
//! armed pages written since they were last armed or collected.
//! [`WriteTracker::track`] arms only what is not armed yet, so a second
//! watch of the same pages does not swallow writes pending there, while
//! [`WriteTracker::arm`] re-arms everything it is given (the mirror's own
//! writes are not CPU writes). [`WriteTracker::disarm`] and
//! [`WriteTracker::forget`] (after an unregister, which clears protection
//! itself) take runs out of the set. A range moved by `mremap` keeps its
//! protection in the kernel but not in the set: it is collected again once
//! armed at its new address (a mirror invalidates the old addresses, so it
//! holds no copy of the new ones before a fault there arms them).

//! # Without support
//!
//! Kernels before 6.7 lack both pieces. The tracker then reports
//! [`TrackMode::Degraded`] and `collect` returns the whole range asked
//! about: every mirrored range is treated as written at every sync point.
//!
//! The tracker shares the [`super::monitor::EventMonitor`]'s userfaultfd
//! (a mapping can be registered on one userfaultfd only) and holds it
//! weakly, so dropping the monitor closes the fd even while trackers exist.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use thiserror::Error;

use super::sys;
use super::uffd::{Features, UffdError, Userfaultfd};
use crate::addr::{VaRange, VirtAddr};

/// Whether writes are tracked page by page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackMode {
    /// `WP_ASYNC` + `PAGEMAP_SCAN`: `collect` is exact.
    Precise,
    /// No tracking: `collect` returns the whole range. The string says why.
    Degraded(String),
}

/// Errors of the write tracker.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TrackError {
    /// The range is not page aligned.
    #[error("{0} is not page aligned")]
    Unaligned(VaRange),
    /// The monitor that owns the userfaultfd was dropped.
    #[error("the event monitor owning the userfaultfd is gone")]
    MonitorGone,
    /// Protecting the range failed (typically: it is not watched).
    #[error("arming write tracking failed: {0}")]
    Protect(#[source] UffdError),
    /// `PAGEMAP_SCAN` failed (`EPERM`: the range is not watched with
    /// `WP_ASYNC`; `ENOENT`-like errors: it is not mapped).
    #[error("PAGEMAP_SCAN over {range} failed: {source}")]
    Scan {
        /// The range scanned.
        range: VaRange,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What a `PAGEMAP_SCAN` selects and reports.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanQuery {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Categories that must all be set.
    pub category_mask: u64,
    /// Categories of which one must be set.
    pub category_anyof_mask: u64,
    /// Categories reported.
    pub return_mask: u64,
}

/// Issues one `PAGEMAP_SCAN` over `[start, end)` and returns the regions
/// filled and the address where the walk stopped.
pub(crate) fn pagemap_scan_once(
    pagemap: &File,
    start: u64,
    end: u64,
    q: ScanQuery,
    vec: &mut [sys::page_region],
) -> io::Result<(usize, u64)> {
    let mut arg = sys::pm_scan_arg {
        size: core::mem::size_of::<sys::pm_scan_arg>() as u64,
        flags: q.flags,
        start,
        end,
        walk_end: 0,
        // No output: a null vector (the kernel refuses a pointer with
        // length 0).
        vec: if vec.is_empty() {
            0
        } else {
            vec.as_mut_ptr() as usize as u64
        },
        vec_len: vec.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: q.category_mask,
        category_anyof_mask: q.category_anyof_mask,
        return_mask: q.return_mask,
    };
    loop {
        // SAFETY: PAGEMAP_SCAN reads one `pm_scan_arg` (layout checked in
        // `sys`) and writes at most `vec_len` `page_region`s to `vec`,
        // which points at `vec.len()` writable elements borrowed
        // exclusively for the call; it then writes `walk_end` back into
        // `arg`. It only changes page-table uffd-wp bits of the scanned
        // range (when WP_MATCHING), never memory contents.
        let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), sys::PAGEMAP_SCAN as _, &mut arg) };
        if r >= 0 {
            return Ok((r as usize, arg.walk_end));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Opens `/proc/self/pagemap` for `PAGEMAP_SCAN`.
pub(crate) fn open_pagemap() -> io::Result<File> {
    File::open("/proc/self/pagemap")
}

/// How [`WriteTracker::arm`] protects pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArmMethod {
    /// `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`, no output (the default).
    Scan,
    /// `UFFDIO_WRITEPROTECT` (for comparisons; what earlier versions did).
    Ioctl,
}

/// Tracks CPU writes to watched ranges (see the module docs).
#[derive(Debug)]
pub struct WriteTracker {
    uffd: Weak<Userfaultfd>,
    pagemap: Option<File>,
    mode: TrackMode,
    /// Armed runs, shared with the event sink that moves them.
    armed: Arc<ArmedRuns>,
    /// Arm with the ioctl instead of the scan.
    ioctl_arm: AtomicBool,
}

fn check_aligned(range: VaRange) -> Result<(), TrackError> {
    if range.start().is_page_aligned() && range.end().is_page_aligned() {
        Ok(())
    } else {
        Err(TrackError::Unaligned(range))
    }
}

/// Adds `r` to the sorted, disjoint, coalesced `set`.
fn set_add(set: &mut Vec<VaRange>, r: VaRange) {
    let (mut s, mut e) = (r.start(), r.end());
    // Runs that overlap or touch `r` are merged into it.
    let first = set.partition_point(|x| x.end() < s);
    let mut last = first;
    while last < set.len() && set[last].start() <= e {
        s = s.min(set[last].start());
        e = e.max(set[last].end());
        last += 1;
    }
    if let Ok(m) = VaRange::new(s, e) {
        set.splice(first..last, [m]);
    }
}

/// [`set_add`], then keeps spare capacity for the sink's in-place edits
/// (see [`ArmedRuns`]).
fn add_keeping_room(set: &mut Vec<VaRange>, r: VaRange) {
    set_add(set, r);
    if set.capacity() - set.len() < 4 {
        set.reserve(16);
    }
}

/// Removes `r` from `set`.
fn set_remove(set: &mut Vec<VaRange>, r: VaRange) {
    let first = set.partition_point(|x| x.end() <= r.start());
    let mut last = first;
    while last < set.len() && set[last].start() < r.end() {
        last += 1;
    }
    if first == last {
        return;
    }
    // No heap allocation here beyond growing `set` by one (the sink edits
    // the set; see `ArmedRuns`).
    let before = if set[first].start() < r.start() {
        VaRange::new(set[first].start(), r.start()).ok()
    } else {
        None
    };
    let after = if set[last - 1].end() > r.end() {
        VaRange::new(r.end(), set[last - 1].end()).ok()
    } else {
        None
    };
    set.splice(first..last, before.into_iter().chain(after));
}

/// The runs a [`WriteTracker`] armed (sorted, disjoint, not adjacent),
/// shareable with the event sink so they follow the memory: an unmapped
/// range leaves the set, a range moved by `mremap` moves with it (the
/// kernel carries its protection along).
///
/// The sink edits in place: it allocates only when a split needs one more
/// slot than the spare capacity the tracker keeps (see the allocation rule
/// in [`super::monitor`]).
#[derive(Debug, Default)]
pub struct ArmedRuns(Mutex<Vec<VaRange>>);

impl ArmedRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<VaRange>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `range` was unmapped: nothing there is armed any more.
    pub fn unmapped(&self, range: VaRange) {
        set_remove(&mut self.lock(), range);
    }

    /// `from` moved to `to` (`mremap`): its armed runs move along.
    pub fn moved(&self, from: VaRange, to: VirtAddr) {
        let mut set = self.lock();
        // One run at a time, no temporary list: source and destination of
        // a move never overlap, so a moved run is never found again.
        loop {
            let i = set.partition_point(|x| x.end() <= from.start());
            let Some(piece) = set.get(i).and_then(|x| x.intersect(from)) else {
                break;
            };
            set_remove(&mut set, piece);
            let off = piece.start().get() - from.start().get();
            if let Ok(dst) = VaRange::from_start_len(VirtAddr(to.get() + off), piece.len()) {
                set_add(&mut set, dst);
            }
        }
    }
}

/// The parts of `r` that `set` covers (`covered`) or does not.
fn set_split(set: &[VaRange], r: VaRange, covered: bool) -> Vec<VaRange> {
    let mut out = Vec::new();
    let mut at = r.start();
    let first = set.partition_point(|x| x.end() <= r.start());
    for x in set[first..].iter().take_while(|x| x.start() < r.end()) {
        if let Some(i) = x.intersect(r) {
            if covered {
                out.push(i);
            } else if i.start() > at {
                out.extend(VaRange::new(at, i.start()));
            }
            at = i.end();
        }
    }
    if !covered && at < r.end() {
        out.extend(VaRange::new(at, r.end()));
    }
    out
}

impl WriteTracker {
    /// A tracker over `uffd` (the monitor's), given whether the kernel has
    /// `PAGEMAP_SCAN`.
    pub(crate) fn new(uffd: Weak<Userfaultfd>, features: Features, pagemap_scan: bool) -> Self {
        let mut reason = Vec::new();
        if !features.contains(Features(sys::UFFD_FEATURE_WP_ASYNC)) {
            reason.push("userfaultfd without WP_ASYNC");
        }
        if !pagemap_scan {
            reason.push("no PAGEMAP_SCAN");
        }
        let pagemap = if reason.is_empty() {
            match open_pagemap() {
                Ok(f) => Some(f),
                Err(_) => {
                    reason.push("/proc/self/pagemap cannot be opened");
                    None
                }
            }
        } else {
            None
        };
        let mode = if reason.is_empty() {
            TrackMode::Precise
        } else {
            TrackMode::Degraded(format!(
                "{}: every mirrored range counts as written at each sync point",
                reason.join(", ")
            ))
        };
        WriteTracker {
            uffd,
            pagemap,
            mode,
            armed: Arc::new(ArmedRuns::default()),
            ioctl_arm: AtomicBool::new(false),
        }
    }

    /// Precise or degraded.
    pub fn mode(&self) -> &TrackMode {
        &self.mode
    }

    /// How [`WriteTracker::arm`] protects pages.
    pub fn arm_method(&self) -> ArmMethod {
        // Relaxed: a setting read on its own; no other memory hangs on it.
        if self.ioctl_arm.load(Ordering::Relaxed) {
            ArmMethod::Ioctl
        } else {
            ArmMethod::Scan
        }
    }

    /// Chooses how [`WriteTracker::arm`] protects pages (for comparisons;
    /// both give the same results).
    pub fn set_arm_method(&self, m: ArmMethod) {
        // Relaxed: see `arm_method`.
        self.ioctl_arm
            .store(m == ArmMethod::Ioctl, Ordering::Relaxed);
    }

    fn armed_set(&self) -> std::sync::MutexGuard<'_, Vec<VaRange>> {
        self.armed.lock()
    }

    /// Adds `r` to the armed set and keeps spare capacity for the sink's
    /// in-place edits.
    fn add_armed(&self, r: VaRange) {
        add_keeping_room(&mut self.armed_set(), r);
    }

    /// The armed set, for an event sink to keep in step with the memory.
    pub fn armed_runs(&self) -> Arc<ArmedRuns> {
        Arc::clone(&self.armed)
    }

    /// The armed runs, sorted (degraded: none).
    pub fn armed(&self) -> Vec<VaRange> {
        self.armed_set().clone()
    }

    /// Write-protects all of `range` (which must be watched by the
    /// monitor), armed before or not, so that the next
    /// [`WriteTracker::collect`] reports only pages written from now on:
    /// writes to it since the last collect are dropped. Callers arm
    /// *before* they copy the pages: a CPU write racing the copy is then
    /// in the copy or reported later, never lost. A no-op when degraded.
    pub fn arm(&self, range: VaRange) -> Result<(), TrackError> {
        check_aligned(range)?;
        let Some(pagemap) = self.precise() else {
            return Ok(());
        };
        let uffd = self.uffd.upgrade().ok_or(TrackError::MonitorGone)?;
        self.protect(pagemap, &uffd, range)?;
        self.add_armed(range);
        Ok(())
    }

    /// Starts tracking `range`: arms the parts of it not armed yet and
    /// leaves the armed parts alone, so writes pending there are still
    /// reported by the next collect (another watch of the same pages). A
    /// no-op when degraded.
    pub fn track(&self, range: VaRange) -> Result<(), TrackError> {
        check_aligned(range)?;
        let Some(pagemap) = self.precise() else {
            return Ok(());
        };
        let uffd = self.uffd.upgrade().ok_or(TrackError::MonitorGone)?;
        // The set stays locked while the missing parts are protected: two
        // callers tracking the same unarmed page (two mirrors copying it)
        // must not both protect it, or a CPU write between the two
        // protections — after the first caller's copy — would be dropped.
        // (The scan does not wait for the monitor, whose sink also takes
        // this lock.)
        let mut set = self.armed_set();
        for r in set_split(&set, range, false) {
            self.protect(pagemap, &uffd, r)?;
            add_keeping_room(&mut set, r);
        }
        Ok(())
    }

    /// The pagemap descriptor when tracking is precise.
    fn precise(&self) -> Option<&File> {
        self.pagemap
            .as_ref()
            .filter(|_| self.mode == TrackMode::Precise)
    }

    /// Write-protects `range`: the scan's exclusive-WP fast path, or the
    /// ioctl (chosen, or where the scan makes no progress).
    fn protect(
        &self,
        pagemap: &File,
        uffd: &Userfaultfd,
        range: VaRange,
    ) -> Result<(), TrackError> {
        let end = range.end().get();
        let mut start = range.start().get();
        if self.arm_method() == ArmMethod::Scan {
            while start < end {
                let (_, walk_end) = pagemap_scan_once(
                    pagemap,
                    start,
                    end,
                    ScanQuery {
                        flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                        category_mask: 0,
                        category_anyof_mask: 0,
                        return_mask: 0,
                    },
                    &mut [],
                )
                .map_err(|source| TrackError::Scan { range, source })?;
                if walk_end <= start || walk_end > end {
                    // No progress (a partial hugetlb page): the ioctl
                    // protects the rest.
                    break;
                }
                start = walk_end;
            }
        }
        if start < end {
            let rest = VaRange::new(VirtAddr(start), VirtAddr(end)).unwrap_or(range);
            uffd.write_protect(rest, true)
                .map_err(TrackError::Protect)?;
        }
        Ok(())
    }

    /// The runs of pages of `range` written since the last collect or arm,
    /// sorted and coalesced; they are re-protected atomically. When
    /// degraded: `[range]`.
    pub fn collect(&self, range: VaRange) -> Result<Vec<VaRange>, TrackError> {
        let mut out = Vec::new();
        self.collect_into(range, &mut out)?;
        Ok(out)
    }

    /// [`WriteTracker::collect`] appending to `out` (reuses its allocation).
    pub fn collect_into(&self, range: VaRange, out: &mut Vec<VaRange>) -> Result<(), TrackError> {
        check_aligned(range)?;
        let Some(pagemap) = self.precise() else {
            out.push(range);
            return Ok(());
        };
        // Keep the fd alive (and the registration meaningful) during the scan.
        let _uffd = self.uffd.upgrade().ok_or(TrackError::MonitorGone)?;
        let first_new = out.len();
        // Only armed runs: a never-armed page reads as written.
        let runs = set_split(&self.armed_set(), range, true);
        for run in runs {
            self.collect_run(pagemap, range, run, out, first_new)?;
        }
        Ok(())
    }

    /// Collects one armed run (see `collect_into`).
    fn collect_run(
        &self,
        pagemap: &File,
        range: VaRange,
        run: VaRange,
        out: &mut Vec<VaRange>,
        first_new: usize,
    ) -> Result<(), TrackError> {
        // At most 512 regions per call: a larger vector meets the kernel's
        // stale `walk_end` (see `pagemap`).
        let mut vec = [sys::page_region::default(); 256];
        let end = run.end().get();
        let mut start = run.start().get();
        while start < end {
            let (n, walk_end) = pagemap_scan_once(
                pagemap,
                start,
                end,
                ScanQuery {
                    flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                    category_mask: sys::PAGE_IS_WRITTEN,
                    category_anyof_mask: 0,
                    return_mask: sys::PAGE_IS_WRITTEN,
                },
                &mut vec,
            )
            .map_err(|source| TrackError::Scan { range, source })?;
            for r in &vec[..n.min(vec.len())] {
                let Ok(run) = VaRange::new(VirtAddr(r.start), VirtAddr(r.end)) else {
                    continue;
                };
                match out[first_new..].last_mut() {
                    Some(last) if last.end() == run.start() => {
                        if let Ok(m) = VaRange::new(last.start(), run.end()) {
                            *last = m;
                        }
                    }
                    _ => out.push(run),
                }
            }
            if walk_end <= start {
                // No progress: the kernel stopped without filling the
                // buffer. Never loop forever on a kernel quirk.
                return Err(TrackError::Scan {
                    range,
                    source: io::Error::other(format!(
                        "PAGEMAP_SCAN made no progress at {start:#x}"
                    )),
                });
            }
            start = walk_end;
        }
        Ok(())
    }

    /// Removes write protection from `range` (tracking stops until the
    /// next [`WriteTracker::arm`]). A no-op when degraded.
    pub fn disarm(&self, range: VaRange) -> Result<(), TrackError> {
        check_aligned(range)?;
        if self.precise().is_none() {
            return Ok(());
        }
        let uffd = self.uffd.upgrade().ok_or(TrackError::MonitorGone)?;
        set_remove(&mut self.armed_set(), range);
        uffd.write_protect(range, false)
            .map_err(TrackError::Protect)
    }

    /// Pages of `range` in the armed set.
    pub fn armed_pages(&self, range: VaRange) -> u64 {
        set_split(&self.armed_set(), range, true)
            .iter()
            .map(|r| r.pages())
            .sum()
    }

    /// Puts `range` in the armed set without protecting it (arming it
    /// failed): the collect then reports its pages as written (a
    /// never-armed page reads as written) or fails for it, which is
    /// conservative, and re-protects what it reports.
    pub(crate) fn mark_armed(&self, range: VaRange) {
        if self.precise().is_some() {
            self.add_armed(range);
        }
    }

    /// Takes `range` out of the armed set without a syscall: its
    /// registration was dropped (which clears protection) or it is gone.
    pub fn forget(&self, range: VaRange) {
        set_remove(&mut self.armed_set(), range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> VaRange {
        VaRange::new(VirtAddr(a << 12), VirtAddr(b << 12)).unwrap()
    }

    #[test]
    fn armed_set_edits() {
        let mut s = Vec::new();
        set_add(&mut s, r(10, 20));
        set_add(&mut s, r(30, 40));
        set_add(&mut s, r(20, 25)); // touches: merged
        assert_eq!(s, vec![r(10, 25), r(30, 40)]);
        set_add(&mut s, r(5, 35)); // spans both
        assert_eq!(s, vec![r(5, 40)]);
        set_remove(&mut s, r(10, 12)); // splits
        assert_eq!(s, vec![r(5, 10), r(12, 40)]);
        set_remove(&mut s, r(0, 6));
        set_remove(&mut s, r(39, 50));
        assert_eq!(s, vec![r(6, 10), r(12, 39)]);
        set_remove(&mut s, r(100, 200)); // outside: nothing
        assert_eq!(s, vec![r(6, 10), r(12, 39)]);
        assert_eq!(set_split(&s, r(0, 50), true), vec![r(6, 10), r(12, 39)]);
        assert_eq!(
            set_split(&s, r(0, 50), false),
            vec![r(0, 6), r(10, 12), r(39, 50)]
        );
        assert_eq!(set_split(&s, r(8, 13), true), vec![r(8, 10), r(12, 13)]);
        assert_eq!(set_split(&s, r(8, 13), false), vec![r(10, 12)]);
        assert_eq!(set_split(&s, r(13, 20), false), vec![]);
        assert_eq!(set_split(&s, r(40, 41), true), vec![]);
    }

    #[test]
    fn armed_runs_follow_moves_and_unmaps() {
        let a = ArmedRuns::default();
        for x in [r(10, 20), r(22, 30), r(50, 60)] {
            set_add(&mut a.lock(), x);
        }
        // Move 15..25 to 100..110: the armed parts 15..20 and 22..25 go
        // to 100..105 and 107..110.
        a.moved(r(15, 25), VirtAddr(100 << 12));
        assert_eq!(
            *a.lock(),
            vec![r(10, 15), r(25, 30), r(50, 60), r(100, 105), r(107, 110)]
        );
        // Moved next to an armed run: merged.
        a.moved(r(50, 60), VirtAddr(30 << 12));
        assert_eq!(
            *a.lock(),
            vec![r(10, 15), r(25, 40), r(100, 105), r(107, 110)]
        );
        a.unmapped(r(0, 104));
        assert_eq!(*a.lock(), vec![r(104, 105), r(107, 110)]);
    }
}
