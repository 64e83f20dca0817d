//! The Vulkan driver: a [`Backend`](hmm_core::mirror::backend::Backend) on
//! `ash`, for any Vulkan 1.2 device with a compute queue and timeline
//! semaphores (a discrete or integrated GPU, or Mesa's lavapipe on a CPU).
//! Structured like the wgpu driver (`drivers/wgpu`), one level closer to
//! the metal.
//!
//! # Opening
//!
//! [`VulkanDevice::open_with`] loads the system loader, creates a Vulkan
//! 1.2 instance and picks a physical device with a compute queue family
//! and `timelineSemaphore` (preferring discrete, then integrated, virtual,
//! CPU; `HMM_VK_DEVICE=<name part>` or [`OpenOptions::device_name`]
//! chooses). Every device without what is needed is named in the
//! [`OpenError::NoDevice`] message with why it was passed over.
//!
//! # Kernels: the same source as the wgpu driver
//!
//! [`VulkanDevice::kernel`] composes the kernel with the shader library
//! (`hmm_shaders::compose`), parses and validates it with naga
//! (`hmm_shaders::build`, so errors name the kernel's own lines) and
//! writes SPIR-V with naga's `spv-out` backend; the page-table operation
//! shader (`pt_ops.wgsl`) goes the same way. There is no second copy of
//! any shader. Bindings are the library's (`hmm_shaders::binding`: group 0
//! becomes descriptor set 0, numbers unchanged); buffer indexing is
//! clamped (`Restrict`), so a garbage entry cannot make a kernel read
//! outside its bindings.
//!
//! # How the mirror's state lives on the device
//!
//! - **Page table**: one storage buffer of `table_pages × 4 KiB` in the
//!   shared format (`shaders/PAGE_TABLE.md`).
//! - **Pool**: up to [`hmm_shaders::POOL_BINDINGS`] storage buffers of at
//!   most `maxStorageBufferRange` each; slot `s` lives in binding
//!   `s / chunk_slots` (as in the wgpu driver).
//! - **Per launch** (reused from a free list once the outcome is taken): a
//!   uniform params buffer, the control buffer (fault records, dedup table,
//!   incomplete bitmap; zeroed by the host before submission, read by the
//!   host after completion), the replay list, a descriptor set in its own
//!   small descriptor pool, and a command buffer.
//!
//! # Memory: a stated, simple allocator
//!
//! One `VkDeviceMemory` per buffer, no sub-allocation (a handful of
//! long-lived buffers; see `mem.rs` for the reasoning). Pool and table
//! prefer `DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT` memory, mapped
//! once: uploads, page-table stores and write-backs are `memcpy`s
//! (lavapipe, integrated GPUs, resizable BAR). Where that memory is
//! missing or exhausted they live in plain `DEVICE_LOCAL` memory, and
//! copies go through one growable host-visible staging buffer with
//! `vkCmdCopyBuffer` in a submission the call waits for.
//! [`OpenOptions::force_staging`] selects that path on any device, which
//! is how the conformance suite also runs it on lavapipe.
//!
//! # Synchronisation: a timeline semaphore is the fence of everything
//!
//! One timeline semaphore per device. Every submission (launch,
//! page-table operation, staging copy) signals the next value, assigned
//! under the queue lock so values are submitted in increasing order; a
//! launch's [`SubmissionId`](hmm_core::mirror::backend::SubmissionId)
//! *is* its value. [`Backend::wait`](hmm_core::mirror::backend::Backend::wait)
//! is `vkWaitSemaphores` on exactly that value, and `is_complete` compares
//! `vkGetSemaphoreCounterValue` with it: an invalidation waits for the
//! submission that may hold its translations, never for work queued after
//! it (no `vkQueueWaitIdle`, no per-submission `VkFence`). Because
//! submissions on one queue may overlap, every command buffer starts with
//! a global barrier ordering it after all earlier writes, and ends with a
//! `→ HOST` barrier so the host sees the device's writes once it has
//! waited on the value. Host writes to coherent memory are visible to the
//! device at the next `vkQueueSubmit`.
//!
//! Accessed/dirty bits are read and cleared by a `pt_ops.wgsl` compute
//! pass on the same queue (atomic with respect to kernels setting them),
//! not by host atomics on the mapped table: Vulkan does not promise that
//! host and shader atomics on the same memory are atomic with respect to
//! each other, and the table may be unmapped.
//!
//! # Errors and validation
//!
//! Vulkan failures are typed ([`BackendError::DeviceLost`] for
//! `ERROR_DEVICE_LOST`, `OutOfMemory` for the out-of-memory results,
//! `Kernel` for shader errors); bad input (slots outside the pool, entries
//! outside the table, too many arguments) is an error, never a panic.
//! With `HMM_VK_VALIDATION=1` (or [`OpenOptions::validation`]) the device
//! enables `VK_LAYER_KHRONOS_validation` and a debug-utils messenger that
//! records every error ([`VulkanDevice::validation_errors`]); each recorded
//! error becomes a [`BackendError::Other`] of the next call (so a
//! conformance run with validation fails on it), and one still unreported
//! when the device is dropped panics there. CI runs the driver's tests
//! with `HMM_VK_VALIDATION=1`.
//!
//! # Zero-copy mode
//!
//! **Not implemented.** [`Mode::ZeroCopy`] is probed (the device's
//! `VK_EXT_external_memory_host` and `minImportedHostPointerAlignment` are
//! reported by [`VulkanDevice::host_import_alignment`]) and opening in it
//! fails with [`OpenError::Unsupported`] saying so. Why it is not a
//! weekend's work with the shared library:
//!
//! - Kernels reach mirrored data through the pool bindings, indexed by the
//!   slot in the page-table entry. A true mirror needs an entry to point at
//!   the CPU's own page, i.e. one imported `VkDeviceMemory` per page (or
//!   per region), each needing its own buffer binding. A `VkBuffer` is
//!   bound to one memory object; swapping pages inside it needs sparse
//!   binding (`vkQueueBindSparse`, absent on lavapipe).
//! - One binding per import needs descriptor indexing (lavapipe here:
//!   `runtimeDescriptorArray` and non-uniform indexing absent,
//!   `maxPerStageDescriptorStorageBuffers` = 32), or raw device addresses
//!   (`VK_KHR_buffer_device_address`, present on lavapipe), which WGSL —
//!   and so naga's WGSL front end — cannot express.
//! - The core's `Backend` contract has the core pick pool slots and copy
//!   pages; a zero-copy backend needs the backend to pick the entry's
//!   target for a host range, no twins and no write-back, and the import
//!   released from the invalidate callback after waiting for the range's
//!   last submission. That is a core change, not done here.
//! - Userspace learns of `munmap` only after it happened
//!   (userfaultfd), so the imported pages can be gone before the callback
//!   releases the import; the Vulkan spec requires the host range to stay
//!   valid for the import's lifetime. On drivers that pin imported pages
//!   (the kernel GPU drivers) this is benign; on lavapipe, a kernel in
//!   flight across another thread's `munmap` would fault the process.
//!
//! The feasible path: a SPIR-V variant of the library's pool accessors
//! using `PhysicalStorageBuffer` pointers (device address of each import
//! kept in a slot table), generated from the same WGSL by rewriting naga's
//! IR or by a naga extension, plus the core hook above.
//!
//! # Sparse residency
//!
//! `sparseBinding` and `sparseResidencyBuffer` are probed and reported
//! ([`VulkanDevice::sparse_support`] and `info()`), not used: the page
//! table stays the shared software format. Lavapipe has no sparse
//! support, so nothing sparse is tested here.
//!
//! # Benchmarks
//!
//! [`VulkanDevice`] is a plain `Backend + TestKernels`: a harness opens it
//! with [`VulkanDevice::open`] (or [`test_device`]) and hands it to
//! `Mirror::new` like the cpu and wgpu devices; `Mirror::pin` gives the
//! pinning baseline on the same device. Copy mode with mapped memory vs
//! [`OpenOptions::force_staging`] are the two configurations there are to
//! compare.

mod device;
mod kernel;
mod mem;
mod open;
mod ptops;
mod test_kernels;

pub use device::VulkanDevice;
pub use kernel::VulkanKernel;
pub use open::{test_device, test_device_with, Mode, OpenError, OpenOptions, VALIDATION_LAYER};

#[cfg(doc)]
use hmm_core::mirror::backend::BackendError;
