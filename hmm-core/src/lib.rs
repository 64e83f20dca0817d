//! # hmm-core
//!
//! The policy half of hmm-rs, a userspace heterogeneous-memory framework:
//! it mirrors CPU address ranges into device page tables so a compute
//! kernel can dereference plain `malloc`/`Vec`/`Box` pointers.
//!
//! Layers, bottom up:
//!
//! - [`addr`]: address newtypes ([`VirtAddr`], [`VaRange`]) so CPU and
//!   device address spaces cannot be mixed.
//! - [`notifier`]: the `mmu_interval_notifier` protocol for one process —
//!   subscriptions in an interval tree, the sequence-count fault/invalidate
//!   handshake, deferred insert/remove, `put`, and whole-space notifiers.
//! - [`cpu`]: the CPU side — what is mapped, page-state snapshots
//!   (`range_fault`), and invalidation events learned from the kernel
//!   (userfaultfd, `PAGEMAP_SCAN`).
//!
//! `hmm-core` has no GPU dependency; drivers live in `drivers/`.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod addr;
pub mod cpu;
pub mod error;
pub mod mirror;
pub mod notifier;
pub(crate) mod sync;

/// **Not API.** Internal data structures of the mirror, public only so that
/// this workspace's own property tests (`hmm-core/tests/mirror_structures_model.rs`)
/// and benchmarks (`benches/benches/pagetable.rs`) can drive them directly.
/// Nothing here is covered by semver: it may change or disappear in any
/// release. Use [`mirror::Mirror`] instead.
#[doc(hidden)]
pub mod internal {
    /// The host's shadow of a device page table (`ShadowTable`).
    pub mod pagetable {
        pub use crate::mirror::pagetable::*;
    }
    /// The device page pool with CLOCK eviction (`PagePool`).
    pub mod pool {
        pub use crate::mirror::pool::*;
    }
}

pub use addr::{VaRange, VirtAddr, PAGE_SIZE};
pub use error::{NotifierError, RangeError};
