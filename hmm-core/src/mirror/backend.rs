//! The backend trait: everything a device driver implements.
//!
//! The policy — which pages to map, when to copy, what to evict, when an
//! invalidation must wait — lives in the mirror core; a backend only
//! executes what the core decided, trusting its input (wgpu-hal's charter:
//! validation is the caller's job). What it must get right is stated on
//! each method, and the memory-safety part of that as `# Safety`.
//!
//! A driver developer implements [`Backend`], then runs the generic
//! conformance suite (the `hmm-conformance` crate) against it; the
//! `cpu` driver in `drivers/cpu` is the reference to copy from.

pub use super::invocations::{InvocationSet, Iter as InvocationIter};
use core::fmt;
use core::time::Duration;

use super::format::{PoolSlot, Pte, TablePage};

/// One submission of work to the device. Ids increase monotonically per
/// backend, so "submitted after X" is a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubmissionId(pub u64);

/// Copy one 4 KiB page from host memory into a pool slot.
#[derive(Clone, Copy, Debug)]
pub struct HostToDevice {
    /// Destination slot.
    pub slot: PoolSlot,
    /// Source: 4096 bytes of host memory.
    pub src: *const u8,
}

/// Copy one pool slot back to 4 KiB of host memory.
#[derive(Clone, Copy, Debug)]
pub struct DeviceToHost {
    /// Source slot.
    pub slot: PoolSlot,
    /// Destination: 4096 bytes of host memory.
    pub dst: *mut u8,
}

/// Store one page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PteWrite {
    /// Table page holding the entry.
    pub table: TablePage,
    /// Entry index within the page (0..512).
    pub index: u16,
    /// The new value.
    pub pte: Pte,
}

/// Location of one page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PteLoc {
    /// Table page holding the entry.
    pub table: TablePage,
    /// Entry index within the page (0..512).
    pub index: u16,
}

/// Which invocations of a kernel a launch runs.
#[derive(Clone, Copy, Debug)]
pub enum Invocations<'a> {
    /// Invocations `0..n`.
    All(u32),
    /// Exactly these (a replay of the ones that faulted).
    Only(&'a InvocationSet),
}

impl Invocations<'_> {
    /// How many invocations run.
    pub fn len(&self) -> usize {
        match self {
            Invocations::All(n) => *n as usize,
            Invocations::Only(v) => v.len(),
        }
    }
    /// Whether none run.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Fault-record flag: the access was a write.
pub const FAULT_WRITE: u32 = 1 << 0;
/// Fault-record flag: the access was an atomic read-modify-write.
pub const FAULT_ATOMIC: u32 = 1 << 1;
/// Fault-record flag: the access was not naturally aligned (4 bytes for
/// 32-bit values, 8 for 64-bit ones). Not a page fault: the launch ends
/// with [`MirrorError::DeviceFault`](super::MirrorError::DeviceFault)
/// `{ reason: AccessError::Misaligned, .. }` naming the address, on every
/// driver alike.
pub const FAULT_MISALIGNED: u32 = 1 << 2;
/// Fault-record flags a device may set; records with others are garbage.
pub const FAULT_KNOWN_FLAGS: u32 = FAULT_WRITE | FAULT_ATOMIC | FAULT_MISALIGNED;

/// A fault exactly as the device wrote it into its fault buffer. The core
/// validates every field before acting on it: a device may write garbage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawFaultRecord {
    /// The invocation that faulted.
    pub invocation: u32,
    /// `FAULT_*` flags.
    pub flags: u32,
    /// Faulting CPU virtual address, low word.
    pub addr_lo: u32,
    /// Faulting CPU virtual address, high word.
    pub addr_hi: u32,
}

impl RawFaultRecord {
    /// The faulting address.
    pub fn addr(&self) -> u64 {
        (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo)
    }
}

/// What a finished submission reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchOutcome {
    /// Fault records (possibly fewer than `incomplete` if the device's
    /// fault buffer overflowed; possibly garbage).
    pub faults: Vec<RawFaultRecord>,
    /// Invocations that stopped at a fault and must be replayed. Build it
    /// with the launch's universe (`n` of [`Invocations::All`], the
    /// replayed set's [`InvocationSet::universe`] for
    /// [`Invocations::Only`]), inserting ascending: its memory is then at
    /// most `n / 8` bytes whatever faulted.
    pub incomplete: InvocationSet,
}

/// The most slots [`Backend::read_back_with_next_launch`] names (the
/// write-back's compare-everything limit).
pub const READ_BACK_WITH_LAUNCH: usize = 32;

/// Sizes the core asks a backend to allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Pool slots (4 KiB device pages holding mirrored data).
    pub pool_slots: u32,
    /// Table pages (4 KiB each) for the device page table; page 0 is the root.
    pub table_pages: u32,
}

/// A zero-copy device's windows onto host memory
/// ([`Backend::host_windows`]).
///
/// Window `w` can be bound to up to `pages` consecutive pages of the
/// process's own memory ([`Backend::bind_window`]); a leaf entry naming
/// slot `w * pages + p` then reaches page `p` of that range — the CPU's own
/// page, not a copy. This is HMM's true mirror: same pages, no copies, no
/// write-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostWindows {
    /// Windows that can be bound at once (at least 1).
    pub count: u32,
    /// Pages per window: the largest region the core maps through one
    /// (a power of two; 512 = 2 MiB covers the default region sizes).
    pub pages: u32,
}

impl HostWindows {
    /// The slot naming page `page` of window `window`.
    pub fn slot(&self, window: u32, page: u32) -> PoolSlot {
        PoolSlot(window * self.pages + page)
    }
    /// The window a slot falls in.
    pub fn window_of(&self, slot: PoolSlot) -> u32 {
        slot.0 / self.pages
    }
}

/// The most invocations one launch may have, on every driver: `2^31`.
/// [`Mirror::launch`](super::Mirror::launch) with more is
/// [`MirrorError::TooManyInvocations`](super::MirrorError::TooManyInvocations)
/// before anything is allocated; a driver may allow fewer
/// ([`Backend::max_invocations`]). Why this bound: per-launch state is
/// `n / 8` bytes (a bitmap of incomplete invocations) on every driver, and
/// GPU dispatch grids number their threads in a `u32`.
pub const MAX_INVOCATIONS: u32 = 1 << 31;

/// What a backend says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Short driver name (`cpu`, `wgpu`, `vulkan`).
    pub driver: String,
    /// The device, in words.
    pub device: String,
    /// Largest pool the device can hold, in slots.
    pub max_pool_slots: u32,
}

/// Errors a backend reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// Device memory could not be allocated.
    #[error("device out of memory: {0}")]
    OutOfMemory(String),
    /// The device was lost (GPU reset, driver crash).
    #[error("device lost: {0}")]
    DeviceLost(String),
    /// A kernel could not be built or run.
    #[error("kernel error: {0}")]
    Kernel(String),
    /// An id the backend does not know (never issued, or its outcome was
    /// already taken).
    #[error("unknown submission {0:?}")]
    UnknownSubmission(SubmissionId),
    /// [`Backend::init`] has not run, or ran twice.
    #[error("backend not initialised as required: {0}")]
    NotInitialised(&'static str),
    /// The device cannot do this at all, or not in its mode: host windows
    /// on a copy-mode device, a pool (or copies to and from one) on a
    /// zero-copy device.
    #[error("not supported by this device: {0}")]
    Unsupported(String),
    /// Anything else the driver wants to say.
    #[error("{0}")]
    Other(String),
}

/// A device driver.
///
/// # Safety
///
/// Implementers promise, for memory safety of the host process:
/// - [`Backend::copy_to_host`] writes host memory only at the 4096 bytes
///   named by each [`DeviceToHost::dst`], and only before it returns;
/// - [`Backend::copy_to_device`] reads host memory only at the 4096 bytes
///   named by each [`HostToDevice::src`], and only before it returns;
/// - no other method reads or writes host memory the caller did not hand
///   it, and device work never touches host memory except through a bound
///   host window ([`Backend::bind_window`]): only the pages of the range
///   the window is bound to, only through entries naming that window's
///   slots, and never after [`Backend::unbind_window`] returned;
/// - the device sets only the `ACCESSED` and `DIRTY` bits of page-table
///   entries, and only with atomic OR on the entry's low word.
///
/// # Errors
///
/// The core's recovery from a failed call (which pool slot may be reused,
/// which entries must be written again, which pages must be written back)
/// rests on these rules, which every method returning a `Result` follows:
///
/// - **`Ok` is complete.** Everything the call was asked to do is done and
///   visible: for [`write_ptes`](Backend::write_ptes) every entry of the
///   batch is stored and every submission made after the call returned
///   (launches, [`read_ptes`](Backend::read_ptes),
///   [`clear_pte_bits`](Backend::clear_pte_bits)) sees it; for
///   `clear_pte_bits` and `read_ptes` every location is done and its value
///   appended; for the copies every page is copied; for
///   [`unbind_window`](Backend::unbind_window) the window is released.
/// - **`Err` is unknown.** A driver may report an error after applying
///   none, some (a prefix, or any subset, in any order) or all of a batch:
///   the core must assume nothing about which items took effect, and
///   retries the whole batch (or a later batch superseding it) until a call
///   returns `Ok`. Batches are idempotent, so a retry over a partly applied
///   batch is correct: storing an entry twice, copying a page twice or
///   clearing bits twice is the same as once (for `clear_pte_bits` the *old
///   values* are not: see there). What an `Err` leaves appended to an
///   output vector is unspecified; the caller truncates it. Bad input (a
///   slot outside the pool, an entry outside the table) is reported before
///   anything is applied; the core never sends it.
/// - **An error belongs to the call that caused it.** A call never returns
///   an error left over from an earlier call or raised by another thread's
///   call, and never skips its own work because such an error is pending.
///   A driver whose API reports errors asynchronously must attribute them
///   to the call that caused them (wgpu: error scopes around the call's own
///   commands; Vulkan: validation messages captured per thread while the
///   call runs). An error the driver cannot attribute to any call (raised
///   outside every `Backend` method) is returned by the next
///   [`launch`](Backend::launch), which then submits nothing — never by a
///   page-table, copy or window call, whose results the core uses to decide
///   whether memory may be reused.
/// - **A lost device stays lost.** Once a call returned
///   [`BackendError::DeviceLost`], every later call that can fail returns
///   `DeviceLost` too ([`unbind_window`](Backend::unbind_window) still
///   makes its window unreachable first; a call with nothing to do, such
///   as the default `unbind_window` of a copy-mode backend, may return
///   `Ok`). After
///   [`wait`](Backend::wait) or [`take_outcome`](Backend::take_outcome)
///   returned `DeviceLost` for a submission, that submission's work no
///   longer runs.
/// - **A failed [`launch`](Backend::launch) leaves nothing running**:
///   nothing was submitted, or the driver waited for what it submitted
///   before returning the error.
pub unsafe trait Backend: Send + Sync + 'static {
    /// What [`Backend::launch`] runs (a closure for `cpu`, a shader module
    /// for GPU drivers).
    type Kernel: ?Sized + Send + Sync;

    /// Describes the driver and device.
    fn info(&self) -> BackendInfo;

    /// Allocates the pool and page-table memory, zeroed (an all-zero table
    /// maps nothing). Called once, before anything else.
    fn init(&self, config: DeviceConfig) -> Result<(), BackendError>;

    /// Copies each `src` page into its slot.
    ///
    /// On `Err` any slot of the batch may hold its new page, its old
    /// contents, or a mix (see the trait's `# Errors`); the caller copies
    /// again before device work reads the slots.
    ///
    /// # Safety
    ///
    /// Every `src` must be valid for reads of 4096 bytes for the duration of
    /// the call, and no in-flight device work may use the destination slots.
    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError>;

    /// Copies each slot to its `dst` page.
    ///
    /// On `Err` any destination page may hold the slot's data, its old
    /// contents, or a mix (see the trait's `# Errors`); the slots are
    /// unchanged, so the caller may copy again.
    ///
    /// # Safety
    ///
    /// Every `dst` must be valid for writes of 4096 bytes for the duration
    /// of the call, not aliased by any Rust reference, and the batch's
    /// destinations must not overlap. No in-flight device work may write the
    /// source slots.
    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError>;

    /// Stores page-table entries, in order. Visible to device work launched
    /// afterwards. Entries the device may be using concurrently are only
    /// ever changed by the core after it waited for that work.
    ///
    /// `Ok`: every entry of the batch is stored, and every submission made
    /// after the call returned sees it. `Err`: any subset of the batch may
    /// be stored (see the trait's `# Errors`); in particular an entry the
    /// batch clears may still name its old slot, so the core keeps that
    /// slot out of reuse and writes the batch again. The error is this
    /// call's own: a driver never fails a page-table write, or skips it,
    /// because of an earlier call's error.
    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError>;

    /// Reads entries (appends to `out`, one per location), e.g. to collect
    /// accessed and dirty bits.
    ///
    /// Changes nothing on the device, so a retry after `Err` is always
    /// correct; what an `Err` left appended to `out` is unspecified.
    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError>;

    /// Atomically clears `bits` (a subset of `ACCESSED | DIRTY`) in each
    /// entry and appends the previous values to `old`, so no bit the device
    /// sets concurrently is lost.
    ///
    /// On `Err` the bits of any subset of the entries may have been cleared
    /// and their old values are unspecified (see the trait's `# Errors`): a
    /// retry would report the already-cleared entries as clean. The caller
    /// must therefore treat every entry of a failed batch as if all of
    /// `bits` had been set in its old value (a page as dirty, so it is
    /// written back).
    fn clear_pte_bits(
        &self,
        locs: &[PteLoc],
        bits: u64,
        old: &mut Vec<Pte>,
    ) -> Result<(), BackendError>;

    /// Starts `kernel` over `invocations` with `args` (CPU pointers and
    /// scalars, as 64-bit words). Returns at once; the work runs
    /// asynchronously. Submission and completion are separate calls
    /// ([`launch`](Backend::launch), then [`wait`](Backend::wait) or
    /// [`is_complete`](Backend::is_complete), then
    /// [`take_outcome`](Backend::take_outcome)), from any threads: a
    /// non-blocking launch on the mirror is built on exactly that, so a
    /// driver must not assume the submitting thread waits. An invocation that touches an address whose entry is
    /// missing or lacks `WRITABLE` for a write stops, is listed in
    /// [`LaunchOutcome::incomplete`], and (buffer space permitting) writes a
    /// [`RawFaultRecord`].
    ///
    /// On `Err` no work of this launch runs (nothing was submitted, or what
    /// was submitted completed before the call returned). This is also
    /// where a driver reports an error it could not attribute to any call
    /// (see the trait's `# Errors`).
    fn launch(
        &self,
        kernel: &Self::Kernel,
        invocations: Invocations<'_>,
        args: &[u64],
    ) -> Result<SubmissionId, BackendError>;

    /// Waits until `id` has completed, or until `timeout`; returns whether it
    /// completed. Callable from any thread, any number of times.
    fn wait(&self, id: SubmissionId, timeout: Option<Duration>) -> Result<bool, BackendError>;

    /// Whether `id` has completed (never blocks).
    fn is_complete(&self, id: SubmissionId) -> bool;

    /// The outcome of a completed submission; taken once.
    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError>;

    /// The most invocations one [`launch`](Backend::launch) may have on
    /// this device (e.g. what its largest storage binding can hold the
    /// incomplete bitmap of). The mirror never asks for more than this or
    /// [`MAX_INVOCATIONS`], whichever is smaller; default
    /// [`MAX_INVOCATIONS`].
    fn max_invocations(&self) -> u32 {
        MAX_INVOCATIONS
    }

    /// What [`FetchPolicy::Auto`](super::FetchPolicy::Auto) means on this
    /// device: whether a fault-service round costs enough (a submission,
    /// a wait, a read-back on a GPU queue) that fetching beyond the
    /// faulted pages pays. Default `true`; a device whose rounds are
    /// function calls on the host may say `false`.
    fn rounds_are_costly(&self) -> bool {
        true
    }

    /// Whether, with no submission in flight, [`copy_to_host`](Backend::copy_to_host),
    /// [`copy_to_device`](Backend::copy_to_device), [`write_ptes`](Backend::write_ptes),
    /// [`read_ptes`](Backend::read_ptes), [`clear_pte_bits`](Backend::clear_pte_bits)
    /// and [`is_complete`](Backend::is_complete) run to completion on the
    /// calling thread without waiting for any other thread (host code over
    /// host memory: the `cpu` driver), and `copy_to_host` and `is_complete`
    /// call neither `malloc` nor `free` when they succeed. The core then serves a CPU fault on
    /// migrated memory on the event monitor's reader thread the moment it
    /// is read — a thread that must never wait, since it is the one that
    /// reads the events other threads wait on — which saves the thread
    /// wake-ups of a hand-off (`cpu::migration`, "Serving faults").
    /// Default `false`: a GPU driver's copies wait for its queue, whose
    /// worker may itself wait for an event to be read (lavapipe frees
    /// memory).
    fn host_synchronous(&self) -> bool {
        false
    }

    /// Advice before a [`launch`](Backend::launch): the pool slots `slots`
    /// (at most [`READ_BACK_WITH_LAUNCH`]) are likely to be read back with
    /// [`copy_to_host`](Backend::copy_to_host) right after it completes —
    /// they hold the few writable pages a small launch's write-back
    /// compares with their twins. A driver for which a read-back is a
    /// device round trip of its own may copy them out as part of the
    /// launch's completion and serve a later `copy_to_host` of exactly
    /// those slots from that copy, as long as no device work
    /// (`launch`, `copy_to_device`) ran since; anything else still takes
    /// the normal path. Applies to the next `launch` only. Default:
    /// nothing (every read-back is a copy).
    fn read_back_with_next_launch(&self, slots: &[PoolSlot]) {
        let _ = slots;
    }

    /// Where the 4 KiB of pool slot `slot` are addressable by the host, if
    /// the pool is host memory (the `cpu` driver; a device with
    /// host-visible coherent memory could say the same). With `Some`, the
    /// core reads CPU pages straight into the slot and diffs write-backs
    /// straight out of it — one copy instead of two through a staging
    /// buffer. Default `None`: every copy goes through
    /// [`copy_to_device`](Backend::copy_to_device) and
    /// [`copy_to_host`](Backend::copy_to_host).
    ///
    /// Part of the trait's safety contract: a returned pointer is valid for
    /// reads and writes of 4096 bytes while the backend lives, and the
    /// memory is not otherwise accessed by the host. The core writes
    /// through it only where `copy_to_device` would be allowed to write the
    /// slot and reads only where `copy_to_host` would be allowed to read
    /// it (no device work on the slot; none writing it, respectively).
    fn host_slot(&self, slot: PoolSlot) -> Option<core::ptr::NonNull<u8>> {
        let _ = slot;
        None
    }

    /// `Some` for a zero-copy device: leaf entries then name pages of host
    /// windows ([`HostWindows`]) instead of pool slots, and the core copies
    /// nothing — no copy in, no twin, no write-back; CPU writes need no
    /// invalidation (the device reads the very pages). Default `None`: a
    /// copy-mode device with a pool.
    ///
    /// A zero-copy backend gets `pool_slots: 0` in [`Backend::init`] and
    /// never sees [`copy_to_device`](Backend::copy_to_device) or
    /// [`copy_to_host`](Backend::copy_to_host).
    fn host_windows(&self) -> Option<HostWindows> {
        None
    }

    /// Binds window `window` to the `len` bytes of host memory at `addr`
    /// (for example by importing them, `VK_EXT_external_memory_host`), so
    /// device work launched afterwards reaches them through entries naming
    /// the window's slots.
    ///
    /// On `Err` the window is left unbound (no device work reaches the
    /// range through it), so the caller may bind it again later; a driver
    /// that cannot guarantee that reports [`BackendError::DeviceLost`].
    ///
    /// # Safety
    ///
    /// The caller (the core) promises: `window < count`; the window is not
    /// bound; `addr` is page-aligned, `len` is a non-zero multiple of 4096
    /// of at most `pages` pages, and the range was, when the caller last
    /// looked, part of one readable mapping of this process. The caller
    /// writes entries naming the window only while it is bound.
    ///
    /// The caller cannot promise that the range stays mapped: another
    /// thread may unmap it at any time (the mirror learns of it only
    /// afterwards). A device that dereferences the host pointer itself (a
    /// device emulated on the CPU) then faults the process if its work
    /// touches the range after the unmap; a device that pins the pages (a
    /// GPU driver's import) merely reads pages the CPU no longer has. Such
    /// a backend must therefore be created through an `unsafe` constructor
    /// whose contract forbids unmapping memory while a launch may use it
    /// (CUDA's `cudaHostRegister` rule).
    unsafe fn bind_window(
        &self,
        window: u32,
        addr: *mut u8,
        len: usize,
    ) -> Result<(), BackendError> {
        let _ = (window, addr, len);
        Err(BackendError::Unsupported(
            "this backend has no host windows (copy mode)".into(),
        ))
    }

    /// Unbinds window `window` (a no-op if it is not bound), releasing
    /// whatever held the host memory (an import, a pin). The caller calls
    /// it only when no submitted device work may still use the window.
    ///
    /// Whatever it returns, device work submitted afterwards never reaches
    /// the window's host memory (the trait's safety contract): a driver
    /// makes the window unreachable before anything that can fail, and
    /// never skips that because of an earlier call's error. `Err` means
    /// the release may be incomplete (the driver may still hold the
    /// import or pin, and [`bind_window`](Backend::bind_window) of the
    /// window may fail until it is released); the caller retries, and a
    /// retry on a released window is a no-op `Ok`.
    fn unbind_window(&self, window: u32) -> Result<(), BackendError> {
        let _ = window;
        Ok(())
    }
}

impl fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}; pool up to {} slots)",
            self.driver, self.device, self.max_pool_slots
        )
    }
}
