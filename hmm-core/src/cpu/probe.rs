//! What this kernel and this process are allowed to do, probed once.
//!
//! hmm-rs leans on interfaces that differ by kernel version, build options
//! and privilege: userfaultfd (and which way of opening it is permitted),
//! its feature bits, `PAGEMAP_SCAN` (6.7+), `MADV_POPULATE_*` (5.14+).
//! [`Capabilities::probe`] tries each one *for real* on a small private
//! mapping instead of guessing from version numbers, and
//! [`Capabilities::degradations`] turns every gap into one sentence saying
//! what hmm-rs does instead — the framework degrades loudly, never
//! silently. [`Capabilities::get`] caches the first probe for the life of
//! the process.

use std::fmt;
use std::io;
use std::sync::OnceLock;

use super::safecopy::{CopyPath, SyscallReason};
use super::scratch::ScratchMap;
use super::sys;
use super::uffd::{Features, OpenAttempt, OpenMode, UffdError, Userfaultfd};
use super::write_track::{open_pagemap, pagemap_scan_once, ScanQuery};
use crate::addr::PAGE_SIZE;

/// Whether a userfaultfd could be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UffdAvailability {
    /// Opened; the API handshake offered `offered`.
    Available {
        /// The way that worked.
        mode: OpenMode,
        /// Features the kernel offered.
        offered: Features,
        /// Whether `EVENT_FORK` is granted (it needs `CAP_SYS_PTRACE`).
        fork_event: bool,
    },
    /// No way worked.
    Absent {
        /// Every attempt with its errno (empty when the failure came later,
        /// see `detail`).
        attempts: Vec<OpenAttempt>,
        /// A readable reason.
        detail: String,
    },
}

/// The outcome of one feature probe: supported, or the errno / reason.
pub type ProbeResult = Result<(), String>;

/// The probed capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `uname -r`.
    pub kernel: String,
    /// userfaultfd.
    pub uffd: UffdAvailability,
    /// `PAGEMAP_SCAN` on `/proc/self/pagemap`.
    pub pagemap_scan: ProbeResult,
    /// `MADV_POPULATE_READ`.
    pub populate_read: ProbeResult,
    /// `MADV_POPULATE_WRITE`.
    pub populate_write: ProbeResult,
    /// `process_madvise(pidfd, iovecs, MADV_POPULATE_*)` on this process
    /// (Linux 6.13+): scattered pages populated in one call.
    pub populate_batch: ProbeResult,
    /// `sysconf(_SC_PAGESIZE)`.
    pub page_size: u64,
    /// How copies to and from application memory are made, as of the
    /// probe ([`super::safecopy::active_path`] on the probing thread;
    /// probing installs the fault handler, as the first copy would).
    pub copy_path: CopyPath,
}

fn errno_string(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOTTY) => format!("{e} (ioctl unknown to this kernel)"),
        Some(libc::EINVAL) => format!("{e} (not supported by this kernel)"),
        _ => e.to_string(),
    }
}

fn probe_madvise(advice: libc::c_int) -> ProbeResult {
    let m = ScratchMap::new(2).map_err(|e| format!("mmap failed: {e}"))?;
    // SAFETY: madvise on our own scratch mapping; POPULATE only faults pages
    // in and never changes contents.
    let r = unsafe { libc::madvise(m.ptr(), m.len(), advice) };
    if r == 0 {
        Ok(())
    } else {
        Err(errno_string(&io::Error::last_os_error()))
    }
}

fn probe_pagemap_scan() -> ProbeResult {
    let m = ScratchMap::new(4).map_err(|e| format!("mmap failed: {e}"))?;
    // Populate page 1 only, then ask for present pages: exactly one region.
    // SAFETY: page 1 of our own 4-page read-write mapping.
    unsafe {
        m.ptr()
            .cast::<u8>()
            .add(PAGE_SIZE as usize)
            .write_volatile(1);
    }
    let pagemap = open_pagemap().map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut vec = [sys::page_region::default(); 4];
    let (n, walk_end) = pagemap_scan_once(
        &pagemap,
        m.base(),
        m.base() + m.len() as u64,
        ScanQuery {
            flags: 0,
            category_mask: 0,
            category_anyof_mask: sys::PAGE_IS_PRESENT,
            return_mask: sys::PAGE_IS_PRESENT,
        },
        &mut vec,
    )
    .map_err(|e| errno_string(&e))?;
    let page1 = m.base() + PAGE_SIZE;
    if n == 1
        && vec[0].start == page1
        && vec[0].end == page1 + PAGE_SIZE
        && walk_end == m.base() + m.len() as u64
    {
        Ok(())
    } else {
        Err(format!(
            "PAGEMAP_SCAN answered unexpectedly ({n} regions, first {:?})",
            vec[0]
        ))
    }
}

fn probe_uffd() -> UffdAvailability {
    match Userfaultfd::offered() {
        Ok((offered, probe_mode)) => {
            // The mode a monitor gets: a full one first where WP_ASYNC is
            // offered (`uffd`'s module docs).
            let wp_async = Features(sys::UFFD_FEATURE_WP_ASYNC).intersection(offered);
            let mode = Userfaultfd::open(wp_async)
                .map(|(_, m)| m)
                .unwrap_or(probe_mode);
            let fork_event = offered.contains(Features(sys::UFFD_FEATURE_EVENT_FORK))
                && Userfaultfd::open(Features(sys::UFFD_FEATURE_EVENT_FORK))
                    .map(|(u, _)| {
                        u.features()
                            .contains(Features(sys::UFFD_FEATURE_EVENT_FORK))
                    })
                    .unwrap_or(false);
            UffdAvailability::Available {
                mode,
                offered,
                fork_event,
            }
        }
        Err(UffdError::Unavailable { attempts }) => {
            let detail = attempts
                .iter()
                .map(|a| a.reason())
                .collect::<Vec<_>>()
                .join("; ");
            UffdAvailability::Absent { attempts, detail }
        }
        Err(e) => UffdAvailability::Absent {
            attempts: Vec::new(),
            detail: e.to_string(),
        },
    }
}

fn kernel_release() -> String {
    // SAFETY: `utsname` is plain data; uname fills it completely on success.
    let mut u: libc::utsname = unsafe { core::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Capabilities {
    /// Probes everything now (a few syscalls and two small mappings).
    pub fn probe() -> Capabilities {
        // SAFETY: sysconf has no memory arguments.
        let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Capabilities {
            kernel: kernel_release(),
            uffd: probe_uffd(),
            pagemap_scan: probe_pagemap_scan(),
            populate_read: probe_madvise(sys::MADV_POPULATE_READ),
            populate_write: probe_madvise(sys::MADV_POPULATE_WRITE),
            populate_batch: super::range_fault::probe_populate_batch(),
            page_size: u64::try_from(ps).unwrap_or(0),
            copy_path: super::safecopy::active_path(),
        }
    }

    /// The process-wide probe, run on first use.
    pub fn get() -> &'static Capabilities {
        static CAPS: OnceLock<Capabilities> = OnceLock::new();
        CAPS.get_or_init(Capabilities::probe)
    }

    /// Whether a userfaultfd can be opened.
    pub fn uffd_available(&self) -> bool {
        matches!(self.uffd, UffdAvailability::Available { .. })
    }

    /// Features offered (none when userfaultfd is absent).
    pub fn offered(&self) -> Features {
        match self.uffd {
            UffdAvailability::Available { offered, .. } => offered,
            UffdAvailability::Absent { .. } => Features::NONE,
        }
    }

    /// Whether precise CPU-write tracking works: `WP_ASYNC` offered and
    /// `PAGEMAP_SCAN` present.
    pub fn wp_async_usable(&self) -> bool {
        self.offered()
            .contains(Features(sys::UFFD_FEATURE_WP_ASYNC))
            && self.pagemap_scan.is_ok()
    }

    /// Whether the kernel's page size is the framework's 4 KiB.
    pub fn page_size_ok(&self) -> bool {
        self.page_size == PAGE_SIZE
    }

    /// One line per missing capability saying how hmm-rs degrades. Empty
    /// when everything is there.
    pub fn degradations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.page_size_ok() {
            out.push(format!(
                "page size is {} bytes, not 4096: hmm-rs refuses to mirror memory on this machine",
                self.page_size
            ));
        }
        match &self.uffd {
            UffdAvailability::Absent { detail, .. } => out.push(format!(
                "no userfaultfd ({detail}): munmap/madvise/mremap are not seen; only explicit \
                 invalidate() keeps device copies coherent"
            )),
            UffdAvailability::Available {
                offered,
                fork_event,
                ..
            } => {
                for (bit, what) in [
                    (sys::UFFD_FEATURE_EVENT_UNMAP, "munmap"),
                    (
                        sys::UFFD_FEATURE_EVENT_REMOVE,
                        "madvise(DONTNEED/REMOVE/FREE)",
                    ),
                    (sys::UFFD_FEATURE_EVENT_REMAP, "mremap"),
                ] {
                    if !offered.contains(Features(bit)) {
                        out.push(format!(
                            "userfaultfd lacks {}: {what} is not seen; call invalidate() \
                             explicitly around it",
                            Features(bit)
                        ));
                    }
                }
                if !fork_event {
                    out.push(
                        "userfaultfd EVENT_FORK not granted (needs CAP_SYS_PTRACE): forks are \
                         not reported; the child never has a mirror either way"
                            .into(),
                    );
                }
            }
        }
        if !self.wp_async_usable() {
            let why = match (&self.pagemap_scan, self.uffd_available()) {
                (Err(e), _) => format!("no PAGEMAP_SCAN ({e})"),
                (Ok(()), false) => "no userfaultfd".to_string(),
                (Ok(()), true) => "userfaultfd lacks WP_ASYNC".to_string(),
            };
            out.push(format!(
                "{why}: CPU writes are not tracked; every mirrored range is invalidated at each \
                 sync point"
            ));
        }
        if let Err(e) = &self.populate_write {
            out.push(format!(
                "no MADV_POPULATE_WRITE ({e}): range_fault populates by touching each page"
            ));
        }
        if let Err(e) = &self.populate_read {
            out.push(format!(
                "no MADV_POPULATE_READ ({e}): range_fault populates by reading each page"
            ));
        }
        match self.copy_path {
            CopyPath::Recoverable => {}
            // Asked for: not a degradation of this machine.
            CopyPath::Syscall(SyscallReason::Environment | SyscallReason::Requested) => {}
            CopyPath::Syscall(why) => out.push(format!(
                "no recoverable copy ({why}): pages are copied with process_vm_readv/writev \
                 (about a third of memcpy's throughput)"
            )),
        }
        if let Err(e) = &self.populate_batch {
            out.push(format!(
                "no batched populate ({e}): scattered runs are populated with one call each"
            ));
        }
        out
    }
}

fn yes(r: &ProbeResult) -> String {
    match r {
        Ok(()) => "yes".into(),
        Err(e) => format!("no: {e}"),
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "CPU-side capabilities (Linux {})", self.kernel)?;
        writeln!(
            f,
            "  page size            {}{}",
            self.page_size,
            if self.page_size_ok() {
                ""
            } else {
                " (unsupported)"
            }
        )?;
        match &self.uffd {
            UffdAvailability::Available {
                mode,
                offered,
                fork_event,
            } => {
                writeln!(f, "  userfaultfd          yes, via {mode}")?;
                writeln!(f, "  uffd features        {:#x}: {offered}", offered.0)?;
                writeln!(
                    f,
                    "  EVENT_FORK granted   {}",
                    if *fork_event { "yes" } else { "no" }
                )?;
            }
            UffdAvailability::Absent { detail, .. } => {
                writeln!(f, "  userfaultfd          no: {detail}")?;
            }
        }
        writeln!(f, "  PAGEMAP_SCAN         {}", yes(&self.pagemap_scan))?;
        writeln!(
            f,
            "  write tracking       {}",
            if self.wp_async_usable() {
                "precise (WP_ASYNC + PAGEMAP_SCAN)"
            } else {
                "degraded (whole ranges)"
            }
        )?;
        writeln!(f, "  MADV_POPULATE_READ   {}", yes(&self.populate_read))?;
        writeln!(f, "  MADV_POPULATE_WRITE  {}", yes(&self.populate_write))?;
        writeln!(f, "  copy path            {}", self.copy_path)?;
        writeln!(f, "  batched populate     {}", yes(&self.populate_batch))?;
        let d = self.degradations();
        if d.is_empty() {
            write!(f, "  degradations         none")
        } else {
            write!(f, "  degradations:")?;
            for line in d {
                write!(f, "\n    - {line}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degradations_name_each_gap() {
        let caps = Capabilities {
            kernel: "x".into(),
            uffd: UffdAvailability::Absent {
                attempts: vec![OpenAttempt {
                    mode: OpenMode::UserModeOnly,
                    errno: libc::ENOSYS,
                }],
                detail: "ENOSYS".into(),
            },
            pagemap_scan: Err("ENOTTY".into()),
            populate_read: Ok(()),
            populate_write: Err("EINVAL".into()),
            populate_batch: Err("EINVAL".into()),
            page_size: 16384,
            copy_path: CopyPath::Syscall(SyscallReason::Displaced),
        };
        let d = caps.degradations();
        assert_eq!(d.len(), 6, "{d:#?}");
        assert!(d[0].contains("page size"));
        assert!(d[1].starts_with("no userfaultfd"));
        assert!(d[2].contains("no PAGEMAP_SCAN"));
        assert!(d[3].contains("MADV_POPULATE_WRITE"));
        assert!(d[4].starts_with("no recoverable copy (another SIGSEGV"));
        assert!(d[5].contains("batched populate"));
        let text = caps.to_string();
        assert!(text.contains("batched populate     no"));
        assert!(text.contains("userfaultfd          no"));
        assert!(text.contains("copy path            process_vm_readv/writev"));
        assert!(!caps.wp_async_usable());
    }
}
