//! The device side: a device's mirror of a process address space.
//!
//! A [`Mirror`] joins a [`crate::cpu::host::HostSpace`] (the CPU side:
//! notifier registry, mappings, kernel events) to a [`backend::Backend`]
//! (a device: pool memory, a page table in the [`format`](mod@format) layout, kernel
//! launches). The user never registers memory: kernels take plain CPU
//! pointers, and the mirror maps what they touch when they touch it.
//!
//! # A launch, step by step ([`Mirror::launch`])
//!
//! 1. **Sync point (start).** CPU writes to mirrored pages since the last
//!    sync point (`WP_ASYNC` + `PAGEMAP_SCAN`, see `cpu::write_track`)
//!    become `CpuWrite` invalidations of exactly those pages, so the device
//!    never reads a copy older than the CPU's data at launch.
//! 2. **Submit** every invocation. An invocation that touches an address
//!    whose device page-table entry is missing (or read-only, for a write)
//!    stops and leaves a fault record.
//! 3. **Fault service.** Records are validated ([`faults`]: a device may
//!    write garbage), deduplicated per page, capped at half the evictable
//!    pool per round (lowest pages first; the rest fault again on replay,
//!    so an oversubscribed launch cannot evict its own round's pages and
//!    livelock), taken in batches of 256, sorted and coalesced into runs. For each run: find the region covering it or
//!    register one around the first page — the largest of 2 MiB / 64 KiB /
//!    4 KiB that is aligned, inside the CPU mapping and overlaps no region
//!    (`drm_gpusvm`'s rule) — with an interval notifier and a kernel-event
//!    watch; then `read_begin` → `range_fault` → take the driver lock →
//!    `read_retry` → copy the pages into pool slots (evicting by CLOCK over
//!    accessed bits when the pool is full, dirty pages written back first)
//!    → write the entries. A bad address ends the launch with
//!    [`MirrorError::DeviceFault`] naming the address, the access and why.
//! 4. **Replay** only the invocations that faulted, until none does.
//! 5. **Sync point (end).** Device-dirty pages are written back, so when
//!    `launch` returns the CPU sees every device write.
//!
//! Launches on one mirror are serialised; several mirrors (devices) may
//! share one host space.
//!
//! # The replay contract for kernel authors
//!
//! An invocation that faults is run again from its start after the fault
//! is serviced, so it may run several times; only its last, fault-free run
//! may have effects. Portable kernels therefore perform every access that
//! may fault before any effect that must not be repeated — or keep their
//! effects idempotent (plain stores of values computed from inputs the
//! invocation does not itself modify). Atomics on mirrored memory belong
//! after the last access that can fault — except an atomic add of 0, which
//! has no effect and is the idiom for touching a word for writing first:
//! its page then faults in (writable) before the invocation does work
//! that a later fault would throw away. Read faults map read-only until
//! their region has been written (below), so a kernel that loads a
//! buffer before storing to it saves a round per page by touching it for
//! writing first. (The `cpu` driver is stricter than
//! required: it buffers an invocation's plain stores and applies them only
//! when the invocation completes.)
//!
//! # Invalidation (the region's notifier callback)
//!
//! Take the driver lock (a non-blockable invalidation gives up instead of
//! waiting), wait for the in-flight submission (it may hold translations;
//! the wait drops the lock),
//! record the sequence, then for the invalidated part: write device-dirty
//! pages back if the CPU range still exists (not for unmap, remap or
//! `MADV_DONTNEED`-style removal), zap the entries, free the slots. On
//! unmap or remap the region is dead: its still-mapped remainder (the
//! kernel merges neighbouring mappings into one VMA, so only part of a
//! region may be gone) is written back and zapped too, and the region goes
//! to the **deferred-release worker**, a thread fed by a
//! `crossbeam-channel`, which removes the notifier with the blocking
//! `remove` (never allowed inside a callback) once no walker can see it.
//! Invalidations this mirror caused itself (owner tag) are skipped.
//!
//! **Destructive events never wait.** Unmap, remap and remove arrive on the
//! event monitor, the only reader of the userfaultfd; a device whose work
//! runs on this process's own threads (lavapipe, the cpu driver) can
//! itself `munmap` memory a region covers (neighbouring anonymous mappings
//! merge into one VMA, so a region may span a driver's private pages), and
//! that thread sleeps until the monitor reads its event. A callback that
//! waited for the device — or for the driver lock, held by a thread that
//! waits for a staging copy queued behind that work — deadlocked
//! (`anon_teardown` on lavapipe). So these callbacks only advance the
//! sequence and forget the pages in the shadow table (freeing their slots),
//! or, if the driver lock is busy, queue that for the next holder (every
//! acquisition drains the queue first); the device's entries are cleared
//! before the next submission and before any slot is reused, and the
//! release worker writes back the rest of a dead region once the device is
//! idle. Nothing is lost by not waiting: the kernel does not wait for us
//! either (an unmap has already happened, a remove proceeds once the event
//! is read), and the device's copies of that memory are discarded anyway.
//! A running submission may still use the old slots until it ends; nothing
//! reuses them before (slots are allocated only under the launch lock,
//! after the running submission was waited for).
//!
//! # Zero-copy devices
//!
//! A backend whose [`host_windows`](backend::Backend::host_windows) is
//! `Some` maps the CPU's own pages instead of copies (HMM's true mirror;
//! `VK_EXT_external_memory_host` on a GPU, `CpuDevice::zero_copy` in the
//! reference driver). Everything above holds — regions, notifiers, the
//! sequence protocol, replay — with these differences:
//!
//! - **Regions are window-sized:** the CPU mapping clipped to the
//!   window-sized aligned block (32 MiB on the cpu and vulkan drivers by
//!   default) around the fault and to the
//!   neighbouring regions — not the aligned power-of-two chunk copy mode
//!   uses, which would cut an unaligned buffer into many regions, each
//!   costing a window.
//! - **Fault service** binds the region's whole range to a free *host
//!   window* (an import) the first time the region faults, then writes
//!   leaf entries naming that window's pages. No copy, no twin, no
//!   write-protection re-arming; read faults map writable wherever the CPU
//!   page is (there is no twin to save).
//! - **Windows are few** (each is a shader binding on a GPU: at most 29
//!   on lavapipe, 8 by default). When all are bound,
//!   the one least recently used by an *earlier* fault-service round is
//!   evicted whole: its region's entries are zapped and it is unbound
//!   (the device is idle during fault service). A round never evicts its
//!   own windows — a round that runs out stops and the rest fault again
//!   on replay — so one invocation may use as many regions as there are
//!   windows; more is the typed `NoProgress` (as an invocation touching
//!   more pages than a copy-mode pool).
//! - **Invalidations:** a CPU write needs none (`CpuWrite` only advances
//!   the sequence). Protection, coherence and clear events zap entries and
//!   keep the window. Destructive events (unmap, remap, remove) zap the
//!   whole region's entries and *detach* its window without waiting, like
//!   every destructive event; the window is unbound at the next flush
//!   point (no submission running), so an import never outlives the
//!   device's last use of it, and the next fault binds a fresh window to
//!   whatever memory is there then. A remove detaches too: a GPU driver's
//!   import pins the old pages, which the CPU no longer has.
//! - **No write-back, no pool, no pinning** ([`Mirror::pin`] is
//!   [`MirrorError::Unsupported`]: pinning copies).
//! - **The contract moves to the user.** A device that dereferences host
//!   pointers itself (lavapipe, the cpu driver) faults the process if a
//!   kernel touches memory another thread unmapped during the launch —
//!   userfaultfd reports an unmap only after it happened. Zero-copy
//!   backends are therefore created through `unsafe` constructors whose
//!   contract is CUDA's `cudaHostRegister` rule: memory a launch may touch
//!   is not unmapped while it runs — and, because `mprotect` produces no
//!   event, narrowing its protection between launches needs an explicit
//!   `Protection` invalidation before the next one. (A GPU driver pins imported pages, so
//!   there an unmap merely leaves the device reading pages the CPU no
//!   longer has until the window is unbound.)
//!
//! The conformance suite runs in this mode too
//! (`hmm_conformance::conformance_tests!(zero_copy …)`).
//!
//! # Write-back never overwrites CPU data it did not change
//!
//! Copies are page-granular, but the CPU may write other bytes of a page
//! while the device holds a writable copy (heap pages share cache lines
//! with allocator metadata and other objects). Every page mapped writable
//! keeps a *twin* — the bytes as the device received them — and write-back
//! stores only the byte runs where the device copy differs from the twin
//! (the twin/diff technique of software distributed shared memory,
//! TreadMarks). Writes go through `process_vm_writev`, so a page the
//! kernel already unmapped is skipped rather than faulted on, and each runs
//! under the driver lock with the region's entries still present, i.e.
//! before any invalidation callback for those pages has run.
//!
//! **Residual window, stated honestly:** userfaultfd reports an unmap only
//! after it happened, and the unmapping thread resumes when the event is
//! read. Between the kernel's unmap and our reading of the event, another
//! thread could map new memory at the same address; a write-back in that
//! window (which needs a launch that is still writing memory the
//! application is freeing — a use-after-free in the application) could
//! land there. The unmapping thread itself cannot: it is blocked until the
//! event is read, and the invalidation starts immediately after.
//!
//! # Coherence between devices
//!
//! With one mirror, read faults map writable when the CPU page is and the
//! region has already taken a write fault, saving upgrade faults; in a
//! region the device has only read, they map read-only, so pages a kernel
//! merely reads cost one copy and no twin. With several, read faults map read-only and a write
//! fault first invalidates the range in every other mirror (`Coherence`,
//! owner-tagged so the writer skips its own callback; the others write
//! dirty data back first): one writer or many readers per page.
//! [`Advice::ReadMostly`] keeps read faults read-only even for one mirror.
//! A new mirror collapses the writable copies of those already attached.
//!
//! # Guarantees
//!
//! - The device never commits a translation from a snapshot an invalidation
//!   overtook (sequence protocol; model-checked in `tests/loom.rs`).
//! - A mirrored page is valid as of the last sync point; `mprotect`, swap
//!   and KSM produce no event (invalidate explicitly after `mprotect`).
//! - [`Mirror::pin`] is the baseline to compare against: no notifier at
//!   all — the device keeps the pinned copy whatever the CPU does until
//!   [`Mirror::unpin`] (`hmm_conformance::pinning_hazard_is_real` shows it).
//!
//! The generic conformance suite, including the port of the kernel's HMM
//! selftests, is what every backend runs: the `hmm-conformance` crate
//! (`conformance/`): test code, outside this library.

pub mod args;
pub mod backend;
mod core;
pub mod error;
pub mod faults;
pub mod format;
mod hostcopy;
pub(crate) mod pagetable;
pub(crate) mod pool;
pub mod stats;
mod twins;

pub use self::core::{Advice, LaunchReport, Mirror, MirrorConfig, PinHandle};
pub use error::{AccessError, MirrorError, TableError};
pub use stats::MirrorStats;
