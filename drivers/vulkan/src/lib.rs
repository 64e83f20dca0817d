//! The Vulkan driver: a [`Backend`] on `ash`, for any Vulkan 1.2 device
//! with a compute queue and timeline semaphores (a discrete or integrated
//! GPU, or Mesa's lavapipe on a CPU).
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
//! - **Pool** (copy mode): [`hmm_shaders::POOL_BINDINGS`] storage buffers
//!   of at most `maxStorageBufferRange` each; slot `s` lives in binding
//!   `s / chunk_slots` (as in the wgpu driver). Zero-copy mode has host
//!   windows in those bindings instead (below).
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
//! One timeline semaphore per device. Every submission (launch, page-table
//! operation, staging copy) signals the next value, assigned under the
//! queue lock so values are submitted in increasing order; a launch's
//! [`SubmissionId`](hmm_core::mirror::backend::SubmissionId) *is* its
//! value. [`Backend::wait`] is `vkWaitSemaphores` on exactly that value,
//! and `is_complete` compares `vkGetSemaphoreCounterValue` with it: an
//! invalidation waits for the submission that may hold its translations,
//! never for work queued after it (no `vkQueueWaitIdle`, no per-submission
//! `VkFence`). Because submissions on one queue may overlap, every command
//! buffer starts with a global barrier ordering it after all earlier
//! writes, and ends with a `→ HOST` barrier so the host sees the device's
//! writes once it has waited on the value. Host writes to coherent memory
//! are visible to the device at the next `vkQueueSubmit`.
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
//! records every error ([`VulkanDevice::validation_errors`]). Each call
//! captures the messages its own Vulkan calls raise, on its own thread, and
//! fails with them as a [`BackendError::Other`] (so a conformance run with
//! validation fails on it): a message never fails a later call or another
//! thread's call, and no call skips its work because of one (the `Backend`
//! trait's `# Errors` rules). A message raised outside every call (set-up,
//! teardown) is returned once, by the next `launch`, which then submits
//! nothing; one still unreturned when the device is dropped panics there.
//! A call that saw `ERROR_DEVICE_LOST` makes every later call fail with
//! [`BackendError::DeviceLost`], except that `unbind_window` still unbinds
//! first. CI runs the driver's tests with `HMM_VK_VALIDATION=1`.
//!
//! # Zero-copy mode
//!
//! The device reads and writes the CPU's own pages: no pool, no copies, no
//! twins, no write-back. Built on `VK_EXT_external_memory_host`; tested on
//! Mesa lavapipe only (see the limits below).
//!
//! **Opening is an explicit `unsafe` opt-in**: [`OpenOptions::zero_copy`],
//! [`VulkanDevice::open_zero_copy`], or [`OpenOptions::zero_copy_opt_in`]
//! set to a [`ZeroCopyOptIn`] (whose `unsafe fn new` carries the
//! contract). The contract is CUDA's `cudaHostRegister` rule: memory a
//! launch may touch must not be unmapped while the launch may run. A
//! [`Mode::ZeroCopy`] without the opt-in — including
//! `HMM_VK_MODE=zero-copy` through [`Mode::from_env`] on a plain
//! [`VulkanDevice::open`] or [`test_device`] — is
//! [`OpenError::ZeroCopyNotOptedIn`]. A harness that wants the variable to
//! choose sets `zero_copy_opt_in` (with a `// SAFETY:` comment stating
//! that it keeps its memory mapped while launches run) and leaves `mode`
//! at `None`; tests use [`test_device_zero_copy`] (an `unsafe fn` with the
//! same contract) which skips with a line where the device lacks the
//! extension (a failure under `HMM_REQUIRE_ZERO_COPY=1`) and where there
//! is no device (a failure under `HMM_REQUIRE_GPU=1`). A device without
//! the extension is [`OpenError::Unsupported`] naming it.
//!
//! How it works:
//!
//! - **Host windows** ([`Backend::host_windows`]): `count` windows of
//!   `pages` pages. `count` is [`OpenOptions::zero_copy_windows`] (default
//!   [`DEFAULT_WINDOWS`] = 8) capped at `min(`[`hmm_shaders::MAX_POOL_BINDINGS`]`,
//!   maxPerStageDescriptorStorageBuffers − 3,
//!   maxDescriptorSetStorageBuffers − 3, maxPerStageResources − 4)` (29
//!   on lavapipe); `pages` is [`OpenOptions::zero_copy_window_pages`]
//!   (default [`DEFAULT_WINDOW_PAGES`] = 8192, 32 MiB) rounded down to a
//!   power of two one storage binding holds. Few, large windows because a
//!   kernel picks a window's binding with a `switch` over all of them on
//!   every access, which lavapipe executes arm by arm: measured with the
//!   harness on lavapipe (quick mode), dense saxpy ran at 1.24× the speed
//!   of copy mode with 4 windows of 32 MiB, 1.20× with 8, 0.87× with 16,
//!   and 0.63× with 29 (0.69× with 29 windows of 2 MiB).
//!   Every pool binding of a zero-copy device's kernels is a
//!   window: kernels (user kernels, the conformance kernels) are composed
//!   with `count` pool bindings ([`hmm_shaders::compose_with`],
//!   [`VulkanDevice::pool_bindings`]), and `chunk_slots` is `pages`, so
//!   the library's unchanged translation (`slot / chunk_slots` picks the
//!   binding, `slot % chunk_slots` the page) takes the core's leaf slot
//!   `w * pages + p` to page `p` of window `w`.
//! - **Binding** ([`Backend::bind_window`]): `addr` and `len` must be
//!   multiples of `minImportedHostPointerAlignment`
//!   ([`VulkanDevice::host_import_alignment`]; 4 KiB on lavapipe and on
//!   the common desktop drivers), else a typed [`BackendError::Other`];
//!   `vkGetMemoryHostPointerPropertiesEXT` gives the memory types, and a
//!   `HOST_VISIBLE | HOST_COHERENT` one that the buffer accepts is
//!   imported (`VkImportMemoryHostPointerInfoEXT`, `HOST_ALLOCATION_EXT`)
//!   under a storage buffer created for that handle type. Coherent memory
//!   and the `→ HOST` barrier every submission ends with make device
//!   writes visible to the CPU once the launch was waited for; CPU writes
//!   are visible to launches submitted afterwards.
//! - **Descriptors**: an unbound window's binding points at a one-page
//!   device buffer. Each launch rewrites the window bindings of its
//!   (reused) descriptor set from the window table of that moment, under
//!   the table's lock, so no set keeps naming a destroyed buffer; each
//!   window remembers the last submission whose set named it.
//! - **Unbinding** ([`Backend::unbind_window`]; a no-op for an unbound
//!   window): releases the import at once, unless a submission not yet
//!   complete still names the buffer in its descriptor set (without
//!   reaching it: the core unbinds only windows no submitted work uses);
//!   then the buffer and import are destroyed once that submission's
//!   timeline value is reached (checked at the next bind, unbind or
//!   launch, and when the device is dropped). Freeing an import never
//!   touches the host pages.
//! - `init` takes `pool_slots: 0` (anything else is an error) and
//!   allocates the page table and the one-page dummy; `copy_to_device`
//!   and `copy_to_host` are typed errors; `info()` names the mode, the
//!   window count and the import alignment, and reports `count × pages` as
//!   `max_pool_slots` (the slot space entries can name).
//!
//! Limits, honestly:
//!
//! - **Lavapipe dereferences the pointer.** A CPU "device" reads the
//!   imported memory through the host pointer itself, so a kernel still
//!   running when another thread unmaps its memory faults the whole
//!   process — hence the `unsafe` opt-in. The conformance scenario that
//!   unmaps during a launch (`anon_teardown`) is therefore not part of
//!   the zero-copy suite (`hmm_conformance::conformance_tests!(zero_copy …)`).
//! - **Real GPUs pin the imported pages** (the import holds them until
//!   it is freed), so there an unmap leaves the device reading pages the
//!   CPU no longer has rather than faulting; memory the device writes must
//!   be writable, and some drivers refuse to import read-only or
//!   file-backed mappings (a typed error from `vkAllocateMemory` or
//!   `vkGetMemoryHostPointerPropertiesEXT`).
//! - **Import alignment** above 4 KiB (not seen on current drivers: RADV,
//!   ANV, NVIDIA and lavapipe report 4096) is refused when opening
//!   ([`OpenError::Unsupported`]): the mirror's regions are page-aligned,
//!   and rounding an import out could reach pages that are not mapped.
//! - **Tested on lavapipe only** (Mesa 22.3, LLVM 15: the extension with
//!   4 KiB alignment, up to 29 windows), through the `Backend` calls the core
//!   makes (`tests/zero_copy.rs`) and through the mirror: the conformance
//!   suite's zero-copy flavour with the ported kernel selftests
//!   (`tests/conformance_zero_copy.rs`, 34 scenarios), with and without
//!   validation layers. No GPU has run it.
//!
//! Also probed on lavapipe: `bufferDeviceAddress`; 32 storage buffers per
//! stage, with `runtimeDescriptorArray`, `descriptorBindingPartiallyBound`
//! and non-uniform storage-buffer indexing all **absent** (so no WGSL
//! `binding_array` of imports: the pool bindings are generated instead).
//! A raw-pointer variant (each import's device address in a slot table,
//! `PhysicalStorageBuffer` access) would lift the binding limit but needs
//! SPIR-V the WGSL front end cannot express.
//!
//! # Sparse residency
//!
//! **Not built.** `sparseBinding` and `sparseResidencyBuffer` are probed
//! and reported ([`VulkanDevice::sparse_support`] and `info()`), not
//! used: the page table stays the shared software format. Lavapipe has no
//! sparse support and no GPU was in reach, so any sparse code would have
//! been untested; none was written. Where it would go: the copy-mode pool
//! as one sparse buffer as large as the slot space, with memory bound
//! (`vkQueueBindSparse`, on the same timeline semaphore) only to the
//! sparse blocks that hold allocated slots — device memory then follows
//! the working set instead of the configured pool size.
//!
//! # Benchmarks
//!
//! [`VulkanDevice`] is a plain `Backend + TestKernels`: a harness opens it
//! with [`VulkanDevice::open`] (or [`test_device`]) and hands it to
//! `Mirror::new` like the cpu and wgpu devices; `Mirror::pin` gives the
//! pinning baseline on the same device. `hmm-bench --backend vulkan`
//! runs copy mode, zero-copy mode ([`VulkanDevice::open_zero_copy`]) and
//! pinning side by side on the same workloads and ends with a
//! `zero-copy-vs-copy/pin:` line; the README has the figures.
//! [`OpenOptions::force_staging`] is the other copy configuration.

mod device;
mod errors;
mod kernel;
mod mem;
mod open;
mod ptops;
mod test_kernels;
mod validation;

pub use device::VulkanDevice;
pub use kernel::VulkanKernel;
pub use open::{
    test_device, test_device_with, test_device_zero_copy, Mode, OpenError, OpenOptions,
    ZeroCopyOptIn, DEFAULT_WINDOWS, DEFAULT_WINDOW_PAGES, VALIDATION_LAYER,
};

#[cfg(doc)]
use hmm_core::mirror::backend::{Backend, BackendError};
