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
//! **Not implemented; refused with a typed error.** [`Mode::ZeroCopy`]
//! (or `HMM_VK_MODE=zero-copy`; [`Mode::from_env`]) is probed — the
//! device's `VK_EXT_external_memory_host` and
//! `minImportedHostPointerAlignment` are reported by
//! [`VulkanDevice::host_import_alignment`] — and opening in it fails with
//! [`OpenError::Unsupported`] naming which of the two reasons applies (no
//! extension, or not built). A value of `HMM_VK_MODE` that is neither
//! `copy` nor `zero-copy` is [`OpenError::BadMode`].
//!
//! What was probed on Mesa lavapipe 22.3 (LLVM 15): the extension with a
//! 4 KiB import alignment; `bufferDeviceAddress`; 32 storage buffers per
//! stage (`maxPerStageDescriptorStorageBuffers`), with
//! `runtimeDescriptorArray`, `descriptorBindingPartiallyBound` and
//! non-uniform storage-buffer indexing all **absent** (so no WGSL
//! `binding_array` of imports); no sparse binding.
//!
//! The design that fits the shared WGSL library unchanged, worked out but
//! not built:
//!
//! - **Core hook.** `Backend` gains a "PTE target" capability (default:
//!   pool slots, as now). A zero-copy backend offers *import windows*
//!   instead: window `w` is bound where pool binding `w` is now, and the
//!   core — which keeps all policy — writes leaf entries with index
//!   `w * slots_per_window + page-in-window`. The library's existing
//!   translation (`slot / chunk_slots` picks the binding, the rest the
//!   page; `chunk_slots` is a per-launch parameter) then reaches the CPU's
//!   own page with no shader change.
//! - **One import per region.** In zero-copy mode a region would be the
//!   CPU mapping clipped to its 2 MiB-aligned block (not the aligned
//!   power-of-two chunk copy mode uses, which splits an unaligned 256 KiB
//!   buffer into up to ~30 regions), imported whole
//!   (`VkImportMemoryHostPointerInfoEXT` on a buffer created with
//!   `HOST_ALLOCATION_EXT`) when it first faults. No copies, no twins, no
//!   write-back; `CpuWrite` invalidations are no-ops (the device reads the
//!   very pages). The import is released when the region's last entry is
//!   zapped or the region dies, by the release worker or the next flush
//!   point after waiting on the timeline value of the last submission
//!   that bound it — the same deferral destructive invalidations already
//!   use for entries (`hmm_core::mirror`, "Destructive events never
//!   wait"). Import slots are evicted whole when all are live.
//! - **What blocks it.** (1) Bindings: the library has 4 pool bindings, so
//!   4 live imports — too few for a kernel touching more than 4 regions
//!   (a heap walk, two unaligned buffers straddling 2 MiB boundaries). The
//!   fix is to generate the pool bindings and their `switch` arms from one
//!   template in `hmm_shaders::compose` with a count per driver (up to 29
//!   here: 32 minus page table, control, replay), a change to the shared
//!   library not made on this branch. (2) A device that *is* the CPU:
//!   lavapipe dereferences the imported pointer itself, so a kernel still
//!   running when another thread `munmap`s its memory faults the whole
//!   process (userfaultfd reports the unmap only after it happened; GPU
//!   drivers pin imported pages, so there the device merely reads the old
//!   pages). Zero-copy therefore needs the `cudaHostRegister` rule —
//!   memory must not be unmapped while a kernel uses it — and the
//!   conformance scenarios that unmap during a launch (`anon_teardown`)
//!   cannot run in that mode on lavapipe.
//!
//! A raw-pointer variant (each import's device address in a slot table,
//! `PhysicalStorageBuffer` access) would lift the binding limit but needs
//! SPIR-V the WGSL front end cannot express.
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
pub use open::{
    test_device, test_device_with, test_device_zero_copy, Mode, OpenError, OpenOptions,
    ZeroCopyOptIn, VALIDATION_LAYER,
};

#[cfg(doc)]
use hmm_core::mirror::backend::BackendError;
