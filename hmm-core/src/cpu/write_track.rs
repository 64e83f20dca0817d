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
//! category masks 0. The kernel takes a fast path for exactly that
//! request (its "exclusive WP" case: every PTE not yet protected is
//! protected, with no per-page folio lookup and nothing reported). On this
//! project's 2-core VM that costs 19–21 µs per populated 2 MiB, where
//! `UFFDIO_WRITEPROTECT` (`change_protection`, a folio lookup per PTE)
//! costs 48–55 µs, and it re-arms an already armed 2 MiB in about 1 µs
//! (protected PTEs are skipped) where the ioctl pays the full cost again
//! (`perf-lab/uffdwp.c`; `cargo run -p hmm-core --release --example
//! track_perf` prints ours).
//!
//! Page-table holes get markers too: with all masks 0 a hole matches, and
//! the walk's hole callback write-protects it (with `WP_UNPOPULATED`,
//! which `WP_ASYNC` implies, that installs markers) — whether the hole is
//! an empty PTE, a missing PTE table or a missing PMD table. The test
//! `write_tracking_covers_page_table_holes` (`tests/cpu_events.rs`)
//! settles it on the running kernel: a hole left unprotected would map
//! the zero page on a read with no uffd-wp bit, which reads as written.
//!
//! The ioctl stays for disarming (a scan cannot un-protect), as
//! [`ArmMethod::Ioctl`] for comparisons, and as the fallback where a scan
//! makes no progress (a partial hugetlb page, which the scan will not
//! split).
//!
//! # What is collected
//!
//! `PAGE_IS_WRITTEN` means "not write-protected", so a page that was never
//! armed reads as written. Callers therefore arm a whole watched range
//! when the watch starts ([`super::host::HostSpace::watch`]) and collect
//! whole watched ranges: every page collected has been armed. (Arming only
//! the pages a mirror copies — issue 15's hybrid — would need a record of
//! the armed runs kept exactly in step with `munmap`/`mremap` events,
//! which lag the kernel; an earlier attempt lost CPU writes that way under
//! `hmm-stress`, and with the fast path whole-region arming costs about as
//! much as arming two runs one by one, so it is not done.)
//!
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
use std::sync::Weak;

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
        vec: vec.as_mut_ptr() as usize as u64,
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
    /// `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` and no output (the
    /// default: the kernel's exclusive-WP fast path).
    Scan,
    /// `UFFDIO_WRITEPROTECT` (what earlier versions did; kept for
    /// comparisons and tests).
    Ioctl,
}

/// Tracks CPU writes to watched ranges (see the module docs).
#[derive(Debug)]
pub struct WriteTracker {
    uffd: Weak<Userfaultfd>,
    pagemap: Option<File>,
    mode: TrackMode,
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
            ioctl_arm: AtomicBool::new(false),
        }
    }

    /// Precise or degraded.
    pub fn mode(&self) -> &TrackMode {
        &self.mode
    }

    /// How [`WriteTracker::arm`] protects pages.
    pub fn arm_method(&self) -> ArmMethod {
        // Relaxed: a standalone switch; no other memory is published with it.
        if self.ioctl_arm.load(Ordering::Relaxed) {
            ArmMethod::Ioctl
        } else {
            ArmMethod::Scan
        }
    }

    /// Chooses how [`WriteTracker::arm`] protects pages (for comparisons
    /// and tests; both protect the same pages).
    pub fn set_arm_method(&self, m: ArmMethod) {
        // Relaxed: see `arm_method`.
        self.ioctl_arm
            .store(m == ArmMethod::Ioctl, Ordering::Relaxed);
    }

    /// Write-protects all of `range` (which must be watched by the
    /// monitor), so that the next [`WriteTracker::collect`] reports only
    /// pages written from now on: writes to it since the last collect are
    /// dropped. Callers arm *before* they copy the pages: a CPU write
    /// racing the copy is then in the copy or reported later, never lost.
    /// A no-op when degraded.
    pub fn arm(&self, range: VaRange) -> Result<(), TrackError> {
        check_aligned(range)?;
        let Some(pagemap) = self.precise() else {
            return Ok(());
        };
        let uffd = self.uffd.upgrade().ok_or(TrackError::MonitorGone)?;
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

    /// The pagemap descriptor when tracking is precise.
    fn precise(&self) -> Option<&File> {
        self.pagemap
            .as_ref()
            .filter(|_| self.mode == TrackMode::Precise)
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
        let mut vec = [sys::page_region::default(); 256];
        let end = range.end().get();
        let mut start = range.start().get();
        let first_new = out.len();
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
        if self.mode != TrackMode::Precise {
            return Ok(());
        }
        let uffd = self.uffd.upgrade().ok_or(TrackError::MonitorGone)?;
        uffd.write_protect(range, false)
            .map_err(TrackError::Protect)
    }
}
