//! The CPU side of the mirror: what is mapped, page-state snapshots, and
//! invalidation events learned from the kernel.
//!
//! - [`maps`]: `/proc/self/maps` parsed and cached; events keep the cache
//!   valid. [`chunk`]: the region a device fault registers.
//! - [`pagemap`], [`range_fault`]: page-state snapshots (`PAGEMAP_SCAN`,
//!   with a `/proc/self/pagemap` fallback), the `hmm_range_fault`
//!   analogue; [`mirror_fault`]: the same under the notifier sequence.
//! - [`uffd`], [`monitor`], [`write_track`]: userfaultfd events (unmap,
//!   remove, remap, fork) and CPU-write tracking (`WP_ASYNC` +
//!   `PAGEMAP_SCAN`); [`probe`]: what this kernel offers.
//! - [`safecopy`]: copies to and from application memory that survive the
//!   memory vanishing (an exception-table `rep movsb`, or `process_vm_*`).
//! - [`host`]: all of it wired to an [`crate::notifier::AddressSpace`].
//! - `sys` (crate-private): the raw kernel ABI the above need; what of it
//!   a public signature uses is re-exported where it is used
//!   ([`pagemap`]: the scan's region type, category bits and flags).

pub mod chunk;
pub mod fork_prep;
pub mod handoff;
pub mod host;
pub mod maps;
pub mod migration;
pub mod mirror_fault;
pub mod monitor;
pub mod pagemap;
pub mod probe;
pub mod range_fault;
pub mod safecopy;
mod scratch;
pub(crate) mod sys;
mod trusted;
pub mod uffd;
pub mod write_track;
