//! What an invalidation is about: its range, why it happens, who caused it,
//! and whether its callbacks may sleep.

use crate::addr::VaRange;

/// Why a range is being invalidated. Callbacks may treat kinds
/// differently: an [`EventKind::Unmap`] means the CPU range is gone for
/// good (a device mirror marks its region dead), a
/// [`EventKind::CpuWrite`] only that device copies are stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// The range was unmapped (`munmap`, or the old half of `mremap`).
    Unmap,
    /// The pages were discarded but the mapping stays
    /// (`madvise(MADV_DONTNEED / MADV_REMOVE / MADV_FREE)`).
    Remove,
    /// The range moved (`mremap`); the notifier sees the old range.
    Remap,
    /// Protection changed (only from the explicit API: the kernel sends no
    /// userspace event for `mprotect`).
    Protection,
    /// The CPU wrote to mirrored pages since the last sync point.
    CpuWrite,
    /// Multi-device coherence: a device is about to write the range, so
    /// every other device drops its copy (writing dirty data back first):
    /// one writer or many readers per page. Owner-tagged, so the writer's
    /// own mirror skips it. Nothing moves: this is not page migration.
    Coherence,
    /// The address space is being torn down.
    Release,
    /// An explicit request to drop device copies (`invalidate` from the app
    /// or an allocator that knows a range is being recycled).
    Clear,
}

/// Identifies who started an invalidation, so a driver can skip the ones it
/// caused itself (the kernel's `owner` field for migrations; here for
/// [`EventKind::Coherence`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OwnerTag(pub u64);

/// One invalidation: what the callbacks receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierRange {
    /// The CPU range whose device copies must go.
    pub range: VaRange,
    /// Why.
    pub event: EventKind,
    /// Who started it, if it says.
    pub owner: Option<OwnerTag>,
    /// Whether callbacks may sleep (wait for the device, take sleeping
    /// locks). In a non-blockable invalidation a callback that would have
    /// to wait returns `false` instead.
    pub blockable: bool,
}

impl NotifierRange {
    /// A blockable invalidation with no owner.
    pub fn new(range: VaRange, event: EventKind) -> Self {
        NotifierRange {
            range,
            event,
            owner: None,
            blockable: true,
        }
    }
    /// Sets the owner tag.
    pub fn with_owner(mut self, owner: OwnerTag) -> Self {
        self.owner = Some(owner);
        self
    }
    /// Marks the invalidation non-blockable.
    pub fn non_blocking(mut self) -> Self {
        self.blockable = false;
        self
    }
}
