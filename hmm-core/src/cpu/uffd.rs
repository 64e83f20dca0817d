//! A safe wrapper around one userfaultfd, issuing the ioctls by hand.
//!
//! # What a userfaultfd is
//!
//! A userfaultfd is a file descriptor through which the kernel reports
//! memory-management events about the ranges *registered* on it. Two kinds
//! of traffic flow through it:
//!
//! - **page faults** (`UFFD_EVENT_PAGEFAULT`): a thread touched a page the
//!   registration mode claims (a missing page in `MISSING` mode, a
//!   write-protected page in `WP` mode, …). The faulting thread sleeps
//!   until someone resolves the fault through the fd.
//! - **non-cooperative events** (`FORK`, `REMAP`, `REMOVE`, `UNMAP`),
//!   enabled by feature bits: the kernel tells the reader that the layout
//!   of a registered range changed. The thread that caused the change
//!   sleeps until the event has been *read* from the fd (not until the
//!   reader has acted on it).
//!
//! # How one is opened
//!
//! Three ways exist:
//!
//! 1. `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`: the fd only handles
//!    faults raised by user-mode accesses, and it is allowed to
//!    unprivileged users whatever `vm.unprivileged_userfaultfd` says
//!    (unless a seccomp filter forbids the syscall).
//! 2. `/dev/userfaultfd` with `USERFAULTFD_IOC_NEW`: access is governed by
//!    the device node's file permissions (Linux 6.1+).
//! 3. `userfaultfd(2)` without the flag: needs `CAP_SYS_PTRACE` when
//!    `vm.unprivileged_userfaultfd = 0`.
//!
//! Write tracking needs user-mode faults only. Device-private migration
//! needs kernel-mode ones too: a system call that reads or writes a
//! migrated page (`read(2)` into it) faults in kernel mode, and on a
//! user-mode-only fd it fails with `EFAULT` instead of waiting for the
//! page to come back. So [`Userfaultfd::open`] tries the full modes first
//! (3, then 2, then 1) where the kernel offers `WP_ASYNC` and the caller
//! wants it — write-protect faults then never reach the fd, in user or
//! kernel mode, so a kernel-mode write by a thread holding a mirror's lock
//! (a write-back through `process_vm_writev`) cannot wait on the monitor
//! — and the user-mode-only one first otherwise.
//! `HMM_UFFD_USER_MODE_ONLY=1` makes it open (1) only: what an
//! unprivileged process gets, for testing that path as root.
//!
//! # The API handshake
//!
//! Before anything else, `UFFDIO_API` must be issued once on the fd with
//! the features wanted; it fails with `EINVAL` if any is not offered, and
//! it can succeed only once per fd. To learn what the kernel offers, we
//! handshake a throwaway fd with `features = 0` (the kernel answers with
//! every feature it knows), close it, and then handshake the real fd with
//! `wanted ∩ offered`. One feature is offered but refused at handshake
//! time to callers without `CAP_SYS_PTRACE`: `EVENT_FORK` (`EPERM`); a
//! failed handshake leaves the fd un-initialised, so [`Userfaultfd::open`]
//! retries once without it and reports the features actually granted
//! ([`Userfaultfd::features`]). Asking for `WP_ASYNC` implies
//! `WP_UNPOPULATED` (the kernel turns it on).
//!
//! # Reading
//!
//! The fd is opened `O_NONBLOCK`: [`Userfaultfd::read_events`] returns `0`
//! when nothing is pending, and the caller `poll`s for readiness. Each
//! message is a 32-byte `uffd_msg`; decoding is checked — an unknown event
//! code, an inverted range or an implausible fd number becomes a
//! [`DecodeError`], never a panic. A `FORK` message carries a *new* fd,
//! installed into our fd table by the kernel during the read, which the
//! decoded [`UffdEvent::Fork`] owns (dropping it closes it).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

use super::sys;
use crate::addr::{VaRange, VirtAddr};

/// How a userfaultfd was obtained (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpenMode {
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`.
    UserModeOnly,
    /// `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW`.
    DevNode,
    /// `userfaultfd(2)` without `UFFD_USER_MODE_ONLY` (privileged).
    Privileged,
}

impl fmt::Display for OpenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenMode::UserModeOnly => "userfaultfd(UFFD_USER_MODE_ONLY)",
            OpenMode::DevNode => "/dev/userfaultfd",
            OpenMode::Privileged => "userfaultfd() (privileged)",
        })
    }
}

/// One failed way of opening a userfaultfd, with its `errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenAttempt {
    /// The way tried.
    pub mode: OpenMode,
    /// The `errno` it failed with.
    pub errno: i32,
}

impl OpenAttempt {
    /// A short human explanation of the failure.
    pub fn reason(&self) -> String {
        let why = match (self.mode, self.errno) {
            (_, libc::ENOSYS) => "kernel built without CONFIG_USERFAULTFD (or syscall filtered)",
            (OpenMode::DevNode, libc::ENOENT) => "no /dev/userfaultfd node",
            (OpenMode::DevNode, libc::EACCES) | (OpenMode::DevNode, libc::EPERM) => {
                "no permission on /dev/userfaultfd"
            }
            (OpenMode::Privileged, libc::EPERM) => {
                "vm.unprivileged_userfaultfd = 0 and no CAP_SYS_PTRACE"
            }
            (OpenMode::UserModeOnly, libc::EINVAL) => {
                "kernel too old for UFFD_USER_MODE_ONLY (< 5.11)"
            }
            (OpenMode::UserModeOnly, libc::EPERM) => "refused (seccomp or LSM policy)",
            _ => "",
        };
        let err = io::Error::from_raw_os_error(self.errno);
        if why.is_empty() {
            format!("{}: {err}", self.mode)
        } else {
            format!("{}: {err} ({why})", self.mode)
        }
    }
}

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(pub u64);

impl Features {
    /// No feature.
    pub const NONE: Features = Features(0);
    /// `EVENT_UNMAP | EVENT_REMOVE | EVENT_REMAP | EVENT_FORK`: the
    /// non-cooperative events the monitor wants.
    pub const EVENTS: Features = Features(
        sys::UFFD_FEATURE_EVENT_UNMAP
            | sys::UFFD_FEATURE_EVENT_REMOVE
            | sys::UFFD_FEATURE_EVENT_REMAP
            | sys::UFFD_FEATURE_EVENT_FORK,
    );
    /// `WP_ASYNC | WP_UNPOPULATED`: kernel-resolved write protection, the
    /// basis of write tracking.
    pub const WP_TRACKING: Features =
        Features(sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED);

    const NAMES: [(u64, &'static str); 17] = [
        (sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (sys::UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
        (sys::UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
        (sys::UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
        (sys::UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (sys::UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
        (sys::UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
        (sys::UFFD_FEATURE_SIGBUS, "SIGBUS"),
        (sys::UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
        (sys::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (sys::UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
        (sys::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
        (sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
        (sys::UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
        (sys::UFFD_FEATURE_POISON, "POISON"),
        (sys::UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
        (sys::UFFD_FEATURE_MOVE, "MOVE"),
    ];

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// Bits set in both.
    pub const fn intersection(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }
    /// Bits set in either.
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
    /// Bits of `self` not in `other`.
    pub const fn difference(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
    /// The names of the bits set (kernel spelling without `UFFD_FEATURE_`);
    /// bits this crate does not know are reported as `0x…`.
    pub fn names(self) -> Vec<String> {
        let mut out = Vec::new();
        let mut known = 0;
        for (bit, name) in Self::NAMES {
            known |= bit;
            if self.0 & bit != 0 {
                out.push(name.to_string());
            }
        }
        let unknown = self.0 & !known;
        if unknown != 0 {
            out.push(format!("{unknown:#x}"));
        }
        out
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("(none)");
        }
        f.write_str(&self.names().join(" | "))
    }
}

/// A `UFFDIO_REGISTER` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegisterMode(pub u64);

impl RegisterMode {
    /// Faults on missing pages are delivered (the reader must resolve them).
    pub const MISSING: RegisterMode = RegisterMode(sys::UFFDIO_REGISTER_MODE_MISSING);
    /// Writes to write-protected pages are delivered (or, with `WP_ASYNC`,
    /// resolved by the kernel). Nothing is protected by registering alone.
    pub const WP: RegisterMode = RegisterMode(sys::UFFDIO_REGISTER_MODE_WP);
    /// Minor faults (shmem / hugetlbfs page-cache hits).
    pub const MINOR: RegisterMode = RegisterMode(sys::UFFDIO_REGISTER_MODE_MINOR);
}

impl core::ops::BitOr for RegisterMode {
    type Output = RegisterMode;
    fn bitor(self, rhs: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | rhs.0)
    }
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// An event code this crate does not know.
    #[error("unknown userfaultfd event code {0:#x}")]
    UnknownEvent(u8),
    /// A range with `start >= end` (or a zero length / overflow).
    #[error("malformed range in {event} message: start {start:#x}, end/len {end:#x}")]
    BadRange {
        /// Event name.
        event: &'static str,
        /// First word.
        start: u64,
        /// Second word.
        end: u64,
    },
    /// A `FORK` message whose fd number is not an open userfaultfd.
    #[error("FORK message carries fd {0}, which is not an open userfaultfd")]
    BadFd(i64),
}

/// Errors of the userfaultfd wrapper.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum UffdError {
    /// No way of opening a userfaultfd worked.
    #[error("userfaultfd unavailable: {}", attempts.iter().map(|a| a.reason()).collect::<Vec<_>>().join("; "))]
    Unavailable {
        /// Every attempt, in order, with its errno.
        attempts: Vec<OpenAttempt>,
    },
    /// `UFFDIO_API` failed.
    #[error("UFFDIO_API handshake (features {features}) failed: {source}")]
    Api {
        /// Features requested.
        features: Features,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A range ioctl failed.
    #[error("{op} on {range} failed: {source}")]
    Ioctl {
        /// `UFFDIO_REGISTER`, …
        op: &'static str,
        /// The range passed.
        range: VaRange,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A range argument is not page aligned.
    #[error("{0} is not page aligned")]
    Unaligned(VaRange),
    /// A `UFFDIO_COPY` of a length that is not a whole, non-zero number of
    /// pages (or that overflows the address space at its destination).
    #[error("a userfaultfd copy of {0} bytes is not a whole, non-zero number of pages")]
    BadLength(u64),
    /// `read(2)` failed.
    #[error("reading the userfaultfd failed: {0}")]
    Read(#[source] io::Error),
    /// `read(2)` returned a length that is not a whole number of messages.
    #[error("short read from the userfaultfd: {0} bytes")]
    ShortRead(usize),
}

/// A decoded userfaultfd message.
#[derive(Debug)]
pub enum UffdEvent {
    /// `munmap` (or the tail of a shrinking `mremap`) of `range`. The range
    /// is the one given to `munmap`, which may extend beyond the registered
    /// part. Sent after the pages are gone.
    Unmap {
        /// The unmapped range.
        range: VaRange,
    },
    /// `madvise(MADV_DONTNEED / MADV_REMOVE / MADV_FREE)` of `range`
    /// (clipped to one registered mapping). Sent before the pages are
    /// zapped.
    Remove {
        /// The discarded range.
        range: VaRange,
    },
    /// `mremap` moved `[from, from + len)` to `[to, to + len)`. Sent after
    /// the move; the destination stays registered.
    Remap {
        /// Old start.
        from: VirtAddr,
        /// New start.
        to: VirtAddr,
        /// Length of the old range.
        len: u64,
    },
    /// The process forked; `child` is a new userfaultfd for the child's
    /// copy of the registered ranges. Dropping it unregisters them in the
    /// child.
    Fork {
        /// The child's userfaultfd.
        child: OwnedFd,
    },
    /// A thread faulted on a registered page and sleeps until the fault is
    /// resolved (or the range woken / unregistered).
    Pagefault {
        /// Faulting address (page aligned unless `EXACT_ADDRESS`).
        addr: VirtAddr,
        /// The access was a write.
        write: bool,
        /// The fault is a write-protect fault.
        wp: bool,
    },
}

const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

fn range_from(event: &'static str, start: u64, end: u64) -> Result<VaRange, DecodeError> {
    VaRange::new(VirtAddr(start), VirtAddr(end)).map_err(|_| DecodeError::BadRange {
        event,
        start,
        end,
    })
}

fn is_userfaultfd(fd: RawFd) -> bool {
    // SAFETY: F_GETFD takes no pointer argument; on an invalid fd it fails
    // with EBADF and has no other effect.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return false;
    }
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(target) => target.to_string_lossy().contains("userfaultfd"),
        // No /proc: the fd exists; trust the kernel's message.
        Err(_) => true,
    }
}

impl UffdEvent {
    /// Decodes one raw message. A `FORK` message takes ownership of the fd
    /// it names, so decode each message exactly once.
    pub fn decode(msg: &sys::uffd_msg) -> Result<UffdEvent, DecodeError> {
        let [a0, a1, a2] = msg.arg;
        match msg.event {
            sys::UFFD_EVENT_UNMAP => Ok(UffdEvent::Unmap {
                range: range_from("UNMAP", a0, a1)?,
            }),
            sys::UFFD_EVENT_REMOVE => Ok(UffdEvent::Remove {
                range: range_from("REMOVE", a0, a1)?,
            }),
            sys::UFFD_EVENT_REMAP => {
                // Both ends must be valid ranges.
                range_from("REMAP", a0, a0.checked_add(a2).unwrap_or(0))?;
                range_from("REMAP", a1, a1.checked_add(a2).unwrap_or(0))?;
                Ok(UffdEvent::Remap {
                    from: VirtAddr(a0),
                    to: VirtAddr(a1),
                    len: a2,
                })
            }
            sys::UFFD_EVENT_FORK => {
                let fd = (a0 as u32) as i32;
                if fd < 0 || !is_userfaultfd(fd) {
                    return Err(DecodeError::BadFd(i64::from(fd)));
                }
                // SAFETY: the kernel installed this fd into our table while
                // servicing the read that produced `msg` and handed it to
                // us; nobody else knows its number, and we checked it is an
                // open userfaultfd. Decoding each message once (documented)
                // makes this the fd's only owner.
                let child = unsafe { OwnedFd::from_raw_fd(fd) };
                Ok(UffdEvent::Fork { child })
            }
            sys::UFFD_EVENT_PAGEFAULT => Ok(UffdEvent::Pagefault {
                addr: VirtAddr(a1),
                write: a0 & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: a0 & UFFD_PAGEFAULT_FLAG_WP != 0,
            }),
            other => Err(DecodeError::UnknownEvent(other)),
        }
    }
}

/// An open, initialised userfaultfd.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: Features,
    offered: Features,
    mode: OpenMode,
}

/// Opens a userfaultfd the first way that works, full modes first if
/// `full_first` (module docs, "How one is opened").
fn raw_open(full_first: bool) -> Result<(OwnedFd, OpenMode), UffdError> {
    let mut attempts = Vec::new();
    let only_user = std::env::var("HMM_UFFD_USER_MODE_ONLY").as_deref() == Ok("1");
    if only_user {
        return open_user_mode_only(&mut attempts).ok_or(UffdError::Unavailable { attempts });
    }
    if full_first {
        if let Some(r) = open_full(&mut attempts) {
            return Ok(r);
        }
        if let Some(r) = open_user_mode_only(&mut attempts) {
            return Ok(r);
        }
    } else {
        if let Some(r) = open_user_mode_only(&mut attempts) {
            return Ok(r);
        }
        if let Some(r) = open_full(&mut attempts) {
            return Ok(r);
        }
    }
    Err(UffdError::Unavailable { attempts })
}

const OPEN_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK;

/// Way 1 of the module docs.
fn open_user_mode_only(attempts: &mut Vec<OpenAttempt>) -> Option<(OwnedFd, OpenMode)> {
    // SAFETY: userfaultfd(2) takes an int flags argument and returns a new
    // fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS | sys::UFFD_USER_MODE_ONLY) };
    if fd >= 0 {
        // SAFETY: a fresh fd returned by the kernel; we are its only owner.
        return Some((
            unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            OpenMode::UserModeOnly,
        ));
    }
    attempts.push(OpenAttempt {
        mode: OpenMode::UserModeOnly,
        errno: io::Error::last_os_error().raw_os_error().unwrap_or(0),
    });
    None
}

/// Ways 3 and 2 of the module docs: an fd that handles kernel-mode faults
/// too.
fn open_full(attempts: &mut Vec<OpenAttempt>) -> Option<(OwnedFd, OpenMode)> {
    let flags = OPEN_FLAGS;
    // 3. privileged syscall.
    // SAFETY: as in `open_user_mode_only`.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: a fresh fd returned by the kernel; only owner.
        return Some((
            unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            OpenMode::Privileged,
        ));
    }
    attempts.push(OpenAttempt {
        mode: OpenMode::Privileged,
        errno: io::Error::last_os_error().raw_os_error().unwrap_or(0),
    });
    // 2. /dev/userfaultfd.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes the userfaultfd(2) flags as
            // its (integer) argument and returns a new fd; `dev` is open.
            let fd = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    sys::USERFAULTFD_IOC_NEW as _,
                    flags as libc::c_ulong,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh fd returned by the kernel; only owner.
                return Some((unsafe { OwnedFd::from_raw_fd(fd) }, OpenMode::DevNode));
            }
            attempts.push(OpenAttempt {
                mode: OpenMode::DevNode,
                errno: io::Error::last_os_error().raw_os_error().unwrap_or(0),
            });
        }
        Err(e) => attempts.push(OpenAttempt {
            mode: OpenMode::DevNode,
            errno: e.raw_os_error().unwrap_or(libc::ENOENT),
        }),
    }
    None
}

fn api(fd: BorrowedFd<'_>, features: Features) -> Result<sys::uffdio_api, UffdError> {
    let mut arg = sys::uffdio_api {
        api: sys::UFFD_API,
        features: features.0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `arg` is
    // (layout checked in `sys`); the pointer is valid for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut arg) };
    if r < 0 {
        return Err(UffdError::Api {
            features,
            source: io::Error::last_os_error(),
        });
    }
    Ok(arg)
}

fn check_aligned(range: VaRange) -> Result<(), UffdError> {
    if range.start().is_page_aligned() && range.end().is_page_aligned() {
        Ok(())
    } else {
        Err(UffdError::Unaligned(range))
    }
}

impl Userfaultfd {
    /// The features this kernel offers and the open mode that worked, found
    /// by handshaking a throwaway fd with `features = 0`.
    pub fn offered() -> Result<(Features, OpenMode), UffdError> {
        let (fd, mode) = raw_open(false)?;
        let a = api(fd.as_fd(), Features::NONE)?;
        Ok((Features(a.features), mode))
    }

    /// Opens a userfaultfd and initialises it with `wanted ∩ offered`
    /// (minus `EVENT_FORK` when the caller lacks `CAP_SYS_PTRACE`). Check
    /// [`Userfaultfd::features`] for what was granted.
    pub fn open(wanted: Features) -> Result<(Userfaultfd, OpenMode), UffdError> {
        let (offered, _) = Self::offered()?;
        let async_wp = Features(sys::UFFD_FEATURE_WP_ASYNC);
        let full_first = offered.contains(async_wp) && wanted.contains(async_wp);
        let (fd, mode) = raw_open(full_first)?;
        let mut req = wanted.intersection(offered);
        let granted = match api(fd.as_fd(), req) {
            Ok(_) => req,
            Err(UffdError::Api { source, .. })
                if source.raw_os_error() == Some(libc::EPERM)
                    && req.contains(Features(sys::UFFD_FEATURE_EVENT_FORK)) =>
            {
                // EVENT_FORK needs CAP_SYS_PTRACE; a failed handshake leaves
                // the fd un-initialised, so try again without it.
                req = req.difference(Features(sys::UFFD_FEATURE_EVENT_FORK));
                api(fd.as_fd(), req)?;
                req
            }
            Err(e) => return Err(e),
        };
        let mut features = granted;
        if features.contains(Features(sys::UFFD_FEATURE_WP_ASYNC)) {
            // The kernel enables WP_UNPOPULATED along with WP_ASYNC.
            features = features.union(Features(sys::UFFD_FEATURE_WP_UNPOPULATED));
        }
        Ok((
            Userfaultfd {
                fd,
                features,
                offered,
                mode,
            },
            mode,
        ))
    }

    /// Features granted by the handshake.
    pub fn features(&self) -> Features {
        self.features
    }
    /// Features the kernel offered.
    pub fn offered_features(&self) -> Features {
        self.offered
    }
    /// How the fd was opened.
    pub fn open_mode(&self) -> OpenMode {
        self.mode
    }

    fn range_ioctl<T>(
        &self,
        op: &'static str,
        req: u64,
        range: VaRange,
        arg: &mut T,
    ) -> Result<(), UffdError> {
        // SAFETY: every caller passes the ioctl number matching `T`
        // (UFFDIO_REGISTER/uffdio_register, UFFDIO_UNREGISTER/uffdio_range,
        // UFFDIO_WRITEPROTECT/uffdio_writeprotect, UFFDIO_WAKE/uffdio_range,
        // UFFDIO_POISON/uffdio_poison);
        // `arg` is a valid exclusive reference for the call. The ioctls
        // change page-table state of the range but never touch memory we
        // hold references to.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            return Err(UffdError::Ioctl {
                op,
                range,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Registers `range` (page aligned, wholly mapped) in `mode`. Returns
    /// the bitmask of ioctls the kernel allows on it.
    pub fn register(&self, range: VaRange, mode: RegisterMode) -> Result<u64, UffdError> {
        check_aligned(range)?;
        let mut arg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: range.start().get(),
                len: range.len(),
            },
            mode: mode.0,
            ioctls: 0,
        };
        self.range_ioctl("UFFDIO_REGISTER", sys::UFFDIO_REGISTER, range, &mut arg)?;
        Ok(arg.ioctls)
    }

    /// Unregisters `range` (wakes any fault waiting in it and clears
    /// write-protect bits).
    pub fn unregister(&self, range: VaRange) -> Result<(), UffdError> {
        check_aligned(range)?;
        let mut arg = sys::uffdio_range {
            start: range.start().get(),
            len: range.len(),
        };
        self.range_ioctl("UFFDIO_UNREGISTER", sys::UFFDIO_UNREGISTER, range, &mut arg)
    }

    /// Write-protects (`true`) or un-protects (`false`, also waking writers
    /// blocked on the range) `range`, which must be registered in WP mode.
    pub fn write_protect(&self, range: VaRange, protect: bool) -> Result<(), UffdError> {
        check_aligned(range)?;
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: range.start().get(),
                len: range.len(),
            },
            mode: if protect {
                sys::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        self.range_ioctl(
            "UFFDIO_WRITEPROTECT",
            sys::UFFDIO_WRITEPROTECT,
            range,
            &mut arg,
        )
    }

    /// Resolves missing-page faults: installs `data` (a whole number of
    /// pages) at `dst` (page aligned, inside a range registered in
    /// [`RegisterMode::MISSING`] mode, every page of it missing) and wakes
    /// the threads waiting there. With `write_protect` the pages arrive
    /// write-protected (the range must be registered in WP mode too), so
    /// write tracking sees the next CPU write to them. Returns the bytes
    /// installed; a page already present is `EEXIST`, and on an error the
    /// pages before it may be installed (the count is in the message).
    ///
    /// This is how a device-private page is given back to the CPU
    /// (issue 17, `docs/MIGRATION.md`).
    ///
    /// # Safety
    ///
    /// The memory at `dst` changes from "missing" to `data` under any
    /// code in this process that reads or writes it through raw pointers
    /// (which is the point); no Rust reference to it may be live.
    pub unsafe fn copy_in(
        &self,
        dst: VirtAddr,
        data: &[u8],
        write_protect: bool,
    ) -> Result<u64, UffdError> {
        let len = data.len() as u64;
        let range = VaRange::from_start_len(dst, len).map_err(|_| UffdError::BadLength(len))?;
        check_aligned(range)?;
        let mut arg = sys::uffdio_copy {
            dst: dst.get(),
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: if write_protect {
                sys::UFFDIO_COPY_MODE_WP
            } else {
                0
            },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `uffdio_copy`, valid and exclusive
        // for the call; the kernel reads `len` bytes at `src` (our slice,
        // alive for the call) and writes only the missing pages at `dst`,
        // which the caller vouches no reference covers.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_COPY as _, &mut arg) };
        if r < 0 {
            return Err(UffdError::Ioctl {
                op: "UFFDIO_COPY",
                range,
                source: io::Error::last_os_error(),
            });
        }
        Ok(u64::try_from(arg.copy).unwrap_or(0))
    }

    /// Marks the missing pages of `range` (page aligned, registered in
    /// [`RegisterMode::MISSING`] mode) poisoned: a CPU access there gets
    /// `SIGBUS` instead of waiting for us, and threads waiting there are
    /// woken to take it. Needs `UFFD_FEATURE_POISON` (Linux 6.6+). This is
    /// what a page whose only copy was on a lost device becomes: never a
    /// zero page (issue 17).
    pub fn poison(&self, range: VaRange) -> Result<(), UffdError> {
        check_aligned(range)?;
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range {
                start: range.start().get(),
                len: range.len(),
            },
            mode: 0,
            updated: 0,
        };
        self.range_ioctl("UFFDIO_POISON", sys::UFFDIO_POISON, range, &mut arg)
    }

    /// Whether an operation that changes the layout of a range registered
    /// on this userfaultfd is in flight: an `munmap`, `mremap` or `fork`
    /// counts itself on the context from before it changes page tables
    /// until its event has been read (`mmap_changing` in the kernel), and
    /// while it does every userfaultfd ioctl that would change page tables
    /// fails with `EAGAIN`. `probe` must be a page-aligned range of this
    /// process that is *not* registered on this userfaultfd: the ioctl
    /// issued (`UFFDIO_WRITEPROTECT`, un-protecting) then changes nothing —
    /// it fails with `ENOENT` when nothing is in flight.
    ///
    /// `MADV_DONTNEED` is not seen here: its event is read *before* it
    /// clears page tables.
    pub fn layout_changing(&self, probe: VaRange) -> bool {
        if check_aligned(probe).is_err() {
            return false;
        }
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: probe.start().get(),
                len: probe.len(),
            },
            mode: 0,
        };
        matches!(
            self.range_ioctl("UFFDIO_WRITEPROTECT", sys::UFFDIO_WRITEPROTECT, probe, &mut arg),
            Err(UffdError::Ioctl { ref source, .. }) if source.raw_os_error() == Some(libc::EAGAIN)
        )
    }

    /// Wakes threads sleeping on faults in `range` (they re-fault).
    pub fn wake(&self, range: VaRange) -> Result<(), UffdError> {
        check_aligned(range)?;
        let mut arg = sys::uffdio_range {
            start: range.start().get(),
            len: range.len(),
        };
        self.range_ioctl("UFFDIO_WAKE", sys::UFFDIO_WAKE, range, &mut arg)
    }

    /// Reads pending messages with one non-blocking `read(2)`, appending
    /// one decode result per message to `out`. Returns the number of
    /// messages read: 0 when none is pending; at most
    /// [`Userfaultfd::READ_BATCH`], so call again until 0. Reading is what
    /// releases a thread waiting on a non-cooperative event.
    ///
    /// Nothing is allocated when `out` has room for `READ_BATCH` more
    /// elements (see the allocation rule in [`super::monitor`]).
    pub fn read_events(
        &self,
        out: &mut Vec<Result<UffdEvent, DecodeError>>,
    ) -> Result<usize, UffdError> {
        let mut buf = [sys::uffd_msg::default(); Self::READ_BATCH];
        loop {
            // SAFETY: `buf` is a writable array of READ_BATCH plain-data
            // messages; the length passed is its size in bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    core::mem::size_of_val(&buf),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(0),
                    Some(libc::EINTR) => continue,
                    _ => Err(UffdError::Read(e)),
                };
            }
            let n = n as usize;
            let size = core::mem::size_of::<sys::uffd_msg>();
            if !n.is_multiple_of(size) {
                return Err(UffdError::ShortRead(n));
            }
            let count = n / size;
            for msg in &buf[..count] {
                out.push(UffdEvent::decode(msg));
            }
            return Ok(count);
        }
    }

    /// Most messages one [`Userfaultfd::read_events`] call reads.
    pub const READ_BATCH: usize = 16;
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_messages_are_typed_errors() {
        let msg = |event, arg| sys::uffd_msg {
            event,
            arg,
            ..Default::default()
        };
        assert_eq!(
            UffdEvent::decode(&msg(0x99, [0; 3])).unwrap_err(),
            DecodeError::UnknownEvent(0x99)
        );
        assert!(matches!(
            UffdEvent::decode(&msg(sys::UFFD_EVENT_UNMAP, [0x2000, 0x1000, 0])),
            Err(DecodeError::BadRange { .. })
        ));
        assert!(matches!(
            UffdEvent::decode(&msg(sys::UFFD_EVENT_REMOVE, [0x2000, 0x2000, 0])),
            Err(DecodeError::BadRange { .. })
        ));
        assert!(matches!(
            UffdEvent::decode(&msg(sys::UFFD_EVENT_REMAP, [u64::MAX - 1, 0, 4096])),
            Err(DecodeError::BadRange { .. })
        ));
        assert!(matches!(
            UffdEvent::decode(&msg(sys::UFFD_EVENT_REMAP, [0x1000, 0x5000, 0])),
            Err(DecodeError::BadRange { .. })
        ));
        // fd 0x7fff_fff0 is certainly not open.
        assert!(matches!(
            UffdEvent::decode(&msg(sys::UFFD_EVENT_FORK, [0x7fff_fff0, 0, 0])),
            Err(DecodeError::BadFd(_))
        ));
        assert!(matches!(
            UffdEvent::decode(&msg(sys::UFFD_EVENT_FORK, [0xffff_ffff, 0, 0])),
            Err(DecodeError::BadFd(-1))
        ));
    }

    #[test]
    fn good_messages_decode() {
        let m = sys::uffd_msg {
            event: sys::UFFD_EVENT_UNMAP,
            arg: [0x1000, 0x3000, 0],
            ..Default::default()
        };
        match UffdEvent::decode(&m) {
            Ok(UffdEvent::Unmap { range }) => assert_eq!(range.len(), 0x2000),
            other => panic!("unexpected {other:?}"),
        }
        let m = sys::uffd_msg {
            event: sys::UFFD_EVENT_PAGEFAULT,
            arg: [
                UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP,
                0x5000,
                7,
            ],
            ..Default::default()
        };
        match UffdEvent::decode(&m) {
            Ok(UffdEvent::Pagefault { addr, write, wp }) => {
                assert_eq!(addr, VirtAddr(0x5000));
                assert!(write && wp);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn feature_names() {
        let f = Features(sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_EVENT_UNMAP | (1 << 40));
        assert_eq!(f.names(), vec!["EVENT_UNMAP", "WP_ASYNC", "0x10000000000"]);
        assert_eq!(Features::NONE.to_string(), "(none)");
    }
}
