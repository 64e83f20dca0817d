//! The wgpu driver: a [`Backend`](hmm_core::mirror::backend::Backend) on
//! any adapter wgpu's Vulkan backend finds (a discrete GPU, or Mesa's
//! lavapipe on a CPU).
//!
//! # How the mirror's state lives on the device
//!
//! - **Page table**: one storage buffer of `table_pages × 4 KiB` in the
//!   shared format (`shaders/PAGE_TABLE.md`), read by kernels with atomic
//!   loads; kernels OR in accessed/dirty bits.
//! - **Pool**: up to [`hmm_shaders::POOL_BINDINGS`] storage buffers, each
//!   at most the adapter's `max_storage_buffer_binding_size`; slot `s`
//!   lives in binding `s / chunk_slots`.
//! - **Control buffer** (one per launch in flight): fault records and the
//!   incomplete-invocation bitmap, cleared on the device before the
//!   dispatch and copied to a mapped read-back buffer after it, in the
//!   same submission.
//!
//! # Copies
//!
//! Uploads go through `Queue::write_buffer` (wgpu's staging belt), one
//! call per run of consecutive slots whose host pages are consecutive too;
//! page-table stores likewise, one call per run of consecutive entries.
//! Both land before the next submission's work. Write-backs copy the
//! slots into one read-back buffer in a single submission, wait for
//! exactly that submission, then copy out. Reading or clearing accessed
//! and dirty bits runs a small compute pass (`pt_ops.wgsl`) on the same
//! queue, so a bit a kernel sets is never lost to a host read-modify-write.
//!
//! # Waiting
//!
//! Every launch is one queue submission; [`Backend::wait`](hmm_core::mirror::backend::Backend::wait) polls for that
//! submission index only, so an invalidation waits for the work that may
//! use its range, not for everything queued after it.
//!
//! # Kernels
//!
//! [`WgpuDevice::kernel`] composes WGSL with the shader library
//! ([`hmm_shaders`]) and builds a compute pipeline. A kernel that does not
//! compile is a [`BackendError::Kernel`] with naga's message.
//!
//! # Errors
//!
//! Every call runs its wgpu commands inside its own error scopes, so a
//! validation, out-of-memory or internal error is returned by the call
//! whose commands raised it — never by a later call, never by another
//! thread's call — and no call skips its work because of another's error
//! (the `Backend` trait's `# Errors` rules). A lost device (wgpu's
//! device-lost callback, or a read-back that never maps) fails every later
//! call with [`BackendError::DeviceLost`]. An error wgpu reports outside
//! every call (through its uncaptured-error handler: only set-up code or a
//! test hook can raise one now) is returned once, by the next `launch`,
//! which then submits nothing. A launch whose submission fails waits for
//! whatever of it was queued before returning the error.
//!
//! # Lavapipe's loop budget
//!
//! Mesa's llvmpipe stops every loop of an invocation once the invocation
//! has run 65535 loop iterations, all loops together, without telling
//! anyone. The shader library therefore has no loop on its hot paths (the
//! page walk is unrolled), and every invocation ends with a two-trip probe
//! loop ([`hmm_shaders::LOOP_PROBE_ITERS`]): an invocation that completed
//! with its budget spent is counted in the control buffer, and the launch
//! fails with a [`BackendError::Kernel`] saying so rather than returning
//! results computed by cut-short loops. Kernels that need more iterations
//! per invocation should spread the work over more invocations.

mod device;
mod errors;
mod kernel;
mod open;
mod ptops;
mod test_kernels;
mod unfilled;

pub use device::WgpuDevice;
pub use kernel::WgpuKernel;
pub use open::{test_device, OpenError, OpenOptions};

use hmm_core::mirror::backend::BackendError;

/// Converts a wgpu-side failure description into a backend error.
pub(crate) fn other(what: impl core::fmt::Display) -> BackendError {
    BackendError::Other(what.to_string())
}
