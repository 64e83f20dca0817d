//! The device side: a device's mirror of a process address space.
//!
//! A [`Mirror`] joins a host (the CPU side, [`HostSide`]; in a real process
//! [`crate::cpu::host::HostSpace`]: notifier registry, mappings, kernel
//! events) to a [`backend::Backend`] (a device: memory, a page table in the
//! [`format`](mod@format) layout, kernel launches). The user never
//! registers memory: kernels take plain CPU pointers, and the mirror maps
//! what they touch when they touch it.
//!
//! # Where things are
//!
//! | module | what it holds |
//! |---|---|
//! | `handle` | [`Mirror`]: creation, advice, statistics, teardown |
//! | `launch` | a launch step by step: sync points, submit, replay |
//! | [`pending`] | non-blocking launches ([`Mirror::scope`]): submit now, wait later; what the CPU may touch meanwhile |
//! | `fault_service` | fault records → rounds, batches, runs, the sequence-checked commit |
//! | `regions` | on-demand region registration and the deferred-release worker |
//! | `invalidate` | the notifier callback, the destructive path that never waits |
//! | `state` | the driver lock, entry-write ordering, device health |
//! | `residency` | where a mirrored page lives: `copy` (pool, twins, write-back) and `windows` (zero-copy) |
//! | `migrate` | device-private migration: `migrate_to_device` / `migrate_to_host`, CPU faults on migrated pages |
//! | `pin` | the pinning baseline |
//! | [`host_side`] | what the mirror needs from the CPU side ([`HostSide`]) |
//! | [`backend`] | what the mirror needs from a device ([`backend::Backend`]) |
//!
//! Shared code never branches on the residency: it asks the
//! `Residency` chosen at [`Mirror::new`] (the `residency`
//! module docs say how to add a third).
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
//! their region has been written, so a kernel that loads a buffer before
//! storing to it saves a round per page by touching it for writing first.
//! (The `cpu` driver is stricter than required: it buffers an invocation's
//! plain stores and applies them only when the invocation completes.)
//!
//! # Coherence between devices
//!
//! With one mirror, read faults map writable when the CPU page is and the
//! region has already taken a write fault, saving upgrade faults; in a
//! region the device has only read, they map read-only, so pages a kernel
//! merely reads cost one copy and no twin. With several, read faults map
//! read-only and a write fault first invalidates the range in every other
//! mirror (a coherence event, owner-tagged so the writer skips its own
//! callback; the others write dirty data back first): one writer or many
//! readers per page. [`Advice::ReadMostly`] keeps read faults read-only
//! even for one mirror. A new mirror collapses the writable copies of those
//! already attached.
//!
//! # Guarantees
//!
//! - The device never commits a translation from a snapshot an invalidation
//!   overtook (sequence protocol; model-checked in `tests/loom.rs`, and the
//!   mirror's own paths in `tests/loom_mirror.rs`).
//! - Device memory an entry named is reused only after the device confirmed
//!   the entry cleared; a device that cannot clear entries, or cannot give
//!   back data it holds, is declared lost: every later call returns
//!   [`MirrorError::DeviceLost`] (`state` module docs).
//! - A mirrored page is valid as of the last sync point; `mprotect`, swap
//!   and KSM produce no event (after `mprotect`, narrowing or widening,
//!   call [`Mirror::protection_changed`]: it drops the cached
//!   permissions and invalidates the range). Without the call, device
//!   writes to memory made read-only are never dropped silently: the
//!   write-back is refused, the launch returns
//!   [`MirrorError::WriteBackRefused`], and the device keeps the data until
//!   a write-back gets through (memory that is gone is skipped).
//! - Writers write tracking cannot see — another process writing a shared
//!   mapping, `pwrite()` to a mapped file or memfd, a file changing under
//!   a private file mapping's not-yet-copied pages — are caught at the
//!   start-of-launch sync point by default: copy mode hashes each page of
//!   such mappings at copy-in and re-hashes it there
//!   ([`ForeignWriters`], `mirror::foreign`). DMA into long-held pins
//!   (io_uring fixed buffers, RDMA) is seen only if it landed before the
//!   check; no userspace check can do better.
//! - Oversubscription makes progress for every kernel that follows the
//!   replay contract, whenever the pool can hold one invocation's pages:
//!   fault service serves the lowest invocations first and keeps the pages
//!   it brought in for them from eviction until they complete
//!   (`residency::copy`), so a round cannot evict the pages of the
//!   invocations it serves. Touching outputs for writing first saves
//!   rounds; it is not required.
//! - [`Mirror::pin`] is the baseline to compare against: no notifier at
//!   all — the device keeps the pinned copy whatever the CPU does until
//!   [`Mirror::unpin`] (`hmm_conformance::pinning_hazard_is_real` shows it).
//!
//! The generic conformance suite, including the port of the kernel's HMM
//! selftests, is what every backend runs: the `hmm-conformance` crate
//! (`conformance/`): test code, outside this library.

pub mod args;
pub mod backend;
mod config;
pub mod error;
mod fault_service;
pub mod faults;
mod foreign;
pub mod format;
mod handle;
pub mod host_side;
mod hostcopy;
mod invalidate;
mod invocations;
mod launch;
mod migrate;
pub(crate) mod pagetable;
pub mod params;
pub mod pending;
mod pin;
mod ping_pong;
pub mod policy;
pub(crate) mod pool;
mod regions;
mod residency;
mod state;
pub mod stats;
mod twins;

pub use config::{Advice, CpuWrites, ForeignWriters, LaunchPhases, LaunchReport, MirrorConfig};
pub use error::{AccessError, MirrorError, TableError};
pub use handle::Mirror;
pub use host_side::{HostSide, RunFate, WriteTracking};
pub use pending::{Pending, Scope};
pub use pin::PinHandle;
pub use policy::{Adaptive, FetchPolicy};
pub use stats::MirrorStats;
