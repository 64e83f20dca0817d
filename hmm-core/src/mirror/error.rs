//! The mirror's typed errors.

use super::backend::BackendError;
pub use super::pagetable::TableError;
use crate::addr::VirtAddr;
use crate::cpu::host::HostError;
use crate::cpu::range_fault::FaultError;
use crate::error::RangeError;

/// Why a device access could not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessError {
    /// No CPU mapping at the address (never mapped, or freed/unmapped).
    Unmapped,
    /// The mapping forbids reading (`PROT_NONE`).
    NoAccess,
    /// A write to a read-only mapping.
    ReadOnly,
    /// The page cannot be mirrored (I/O or PFN mapping, or it kept
    /// vanishing).
    BadPage,
    /// The kernel accessed a 32-bit value at an address that is not a
    /// multiple of 4, or a 64-bit value at one not a multiple of 8. A
    /// kernel bug, reported the same way on every driver (GPUs ignore the
    /// low address bits of such an access; the library refuses it).
    Misaligned,
}

impl core::fmt::Display for AccessError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            AccessError::Unmapped => "no CPU mapping",
            AccessError::NoAccess => "mapping is not readable",
            AccessError::ReadOnly => "mapping is read-only",
            AccessError::BadPage => "page cannot be mirrored",
            AccessError::Misaligned => {
                "misaligned access (4-byte values need 4-byte alignment, 8-byte values 8)"
            }
        })
    }
}

/// Errors of a device mirror.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// A device access that no CPU mapping allows; the launch ended.
    #[error("device {access} at {addr}: {reason}", access = if *write { "write" } else { "read" })]
    DeviceFault {
        /// The faulting address, as the kernel used it.
        addr: VirtAddr,
        /// Whether it was a write (or atomic).
        write: bool,
        /// Why it cannot be served.
        reason: AccessError,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The CPU side failed (event monitor, write tracking, maps).
    #[error(transparent)]
    Host(#[from] HostError),
    /// Snapshotting CPU pages failed for a reason other than an access error.
    #[error(transparent)]
    Fault(FaultError),
    /// A bad range argument.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The device page table ran out of table pages.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The pool cannot hold what must be resident at once (every slot is
    /// pinned, or the pool has no slots).
    #[error(
        "device pool exhausted: {needed} more slot(s) needed, none evictable (capacity {capacity})"
    )]
    PoolExhausted {
        /// Slots still needed.
        needed: u64,
        /// Pool capacity.
        capacity: u32,
    },
    /// Invocations stopped at faults but the device reported no usable
    /// fault record for them (all garbage, or its fault buffer overflowed
    /// with nothing recorded).
    #[error("{incomplete} invocation(s) stopped without a usable fault record ({garbage} garbage record(s))")]
    UnusableFaults {
        /// Invocations left incomplete.
        incomplete: usize,
        /// Records rejected.
        garbage: u64,
    },
    /// A launch of more invocations than the device allows
    /// ([`Mirror::max_invocations`](super::Mirror::max_invocations), at
    /// most [`MAX_INVOCATIONS`](super::backend::MAX_INVOCATIONS)); nothing
    /// was allocated or run.
    #[error("a launch of {n} invocations exceeds this device's limit of {max}")]
    TooManyInvocations {
        /// Invocations asked for.
        n: u32,
        /// The limit.
        max: u32,
    },
    /// The launch kept faulting past the replay bound.
    #[error("gave up after {replays} replays: invocations kept faulting")]
    NoProgress {
        /// Replays made.
        replays: u32,
    },
    /// A fault kept racing invalidations past the retry timeout.
    #[error("fault service at {addr} timed out after {attempts} attempts")]
    RetryTimeout {
        /// Start of the run being serviced.
        addr: VirtAddr,
        /// Attempts made.
        attempts: u64,
    },
    /// The region being serviced died (unmapped) and was released while
    /// the fault was in flight. The fault service retries with a fresh
    /// region; users see it only if that keeps happening.
    #[error("the region at {addr} kept being released during fault service")]
    RegionReleased {
        /// Address being serviced.
        addr: VirtAddr,
    },
    /// The mirror was used in a process other than the one that created
    /// it: a forked child, which inherits the memory but none of the
    /// threads and kernel registrations a mirror runs on (the child has no
    /// mirror; see `hmm_conformance::forked_child_gets_a_typed_error`).
    #[error("mirror created in process {created_in} used in process {used_in} (a forked child has no mirror)")]
    WrongProcess {
        /// The creating process.
        created_in: u32,
        /// The process that tried to use it.
        used_in: u32,
    },
    /// The host address space was torn down
    /// ([`AddressSpace::teardown`](crate::notifier::AddressSpace::teardown)):
    /// a launch or prefetch that needed a new region cannot register one.
    #[error("the address space was torn down: no new region can be registered")]
    TornDown,
    /// The device cannot do what was asked (e.g. pinning on a zero-copy
    /// device).
    #[error("not supported by this device: {0}")]
    Unsupported(&'static str),
    /// Device-private migration cannot be done here
    /// ([`Mirror::migrate_to_device`](super::Mirror::migrate_to_device)):
    /// the kernel, the memory or the residency lacks what it needs; the
    /// text says which. Nothing was moved.
    #[error("device-private migration unavailable: {0}")]
    MigrationUnsupported(String),
    /// The device was declared lost: it could not clear page-table entries
    /// naming memory the mirror had to free (three times in a row, or it
    /// reported itself lost), or it could not give back data it held.
    /// Every later call that uses the device returns this; the reason names
    /// the first failure.
    #[error("device lost: {0}")]
    DeviceLost(String),
    /// Device-written data could not be written back: the CPU memory at
    /// `addr` exists but refuses the write (made read-only, or
    /// `PROT_NONE`, e.g. by `mprotect` without
    /// [`Mirror::protection_changed`](super::Mirror::protection_changed)).
    /// Nothing was dropped: the device keeps the data, and the next launch
    /// (which first tries the write again and returns this error while it
    /// is still refused) or a `protection_changed` call after the memory
    /// is writable again writes it. A refusal met where no caller could be
    /// told (an invalidation callback, an eviction) is reported by the
    /// next launch.
    #[error("write-back to {addr} refused: the CPU memory is there but not writable; the device keeps the data until it can be written")]
    WriteBackRefused {
        /// The first address that refused the write.
        addr: VirtAddr,
    },
    /// The mirror's configuration is unusable.
    #[error("bad mirror configuration: {0}")]
    Config(String),
}

impl MirrorError {
    pub(crate) fn from_fault(e: FaultError, addr: VirtAddr, write: bool) -> MirrorError {
        let reason = match &e {
            FaultError::Unmapped { addr } => Some((AccessError::Unmapped, *addr)),
            FaultError::NoAccess { addr } => Some((AccessError::NoAccess, *addr)),
            FaultError::ReadOnly { addr } => Some((AccessError::ReadOnly, *addr)),
            FaultError::BadPage { addr } => Some((AccessError::BadPage, *addr)),
            FaultError::Unstable { .. } | FaultError::Populate { .. } => {
                Some((AccessError::BadPage, addr))
            }
            _ => None,
        };
        match reason {
            Some((reason, at)) => MirrorError::DeviceFault {
                addr: if at.page_down() == addr.page_down() {
                    addr
                } else {
                    at
                },
                write,
                reason,
            },
            None => MirrorError::Fault(e),
        }
    }
}
