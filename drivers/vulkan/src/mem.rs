//! The allocator: deliberately simple, and stated.
//!
//! **One `VkDeviceMemory` per `VkBuffer`**, no sub-allocation. The driver
//! allocates a handful of long-lived buffers (page table, up to
//! [`hmm_shaders::POOL_BINDINGS`] pool chunks — or, in zero-copy mode, one
//! import of host memory per bound window — per-launch params/control/
//! replay buffers reused from a free list, the page-table-operation
//! buffers, one growable staging buffer), so allocation count stays far
//! below `maxMemoryAllocationCount` (4096 on common GPUs) and a
//! sub-allocator (`gpu-allocator`) would buy nothing but a dependency.
//!
//! Memory type choice, by [`Placement`]:
//! - [`Placement::Host`] (small buffers the host reads or writes every
//!   launch): `HOST_VISIBLE | HOST_COHERENT`, preferring `DEVICE_LOCAL`
//!   too; persistently mapped. Every Vulkan device has such a type.
//! - [`Placement::Device`] (pool and page table): `DEVICE_LOCAL |
//!   HOST_VISIBLE | HOST_COHERENT` when the device has it and the
//!   allocation succeeds (lavapipe, integrated GPUs, resizable BAR):
//!   mapped, so uploads are a `memcpy`. Otherwise plain `DEVICE_LOCAL`,
//!   unmapped: copies go through the staging buffer and
//!   `vkCmdCopyBuffer` (`OpenOptions::force_staging` forces this path).
//!
//! Coherent memory only: no `vkFlushMappedMemoryRanges` is ever needed.
//! Host writes become visible to the device at the next `vkQueueSubmit`
//! (host-write ordering guarantee); device writes become visible to the
//! host through the `→ HOST` barrier every submission ends with, once the
//! host has waited on that submission's timeline value.

use std::ptr::NonNull;
use std::sync::Arc;

use ash::vk;
use hmm_core::mirror::backend::BackendError;

use crate::open::Ctx;

/// Where a buffer's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Host-visible, coherent, mapped.
    Host,
    /// Device-local; mapped only if that memory is also host-visible.
    Device,
}

/// A Vulkan result as a backend error.
pub(crate) fn vk_err(what: &str) -> impl Fn(vk::Result) -> BackendError + '_ {
    move |r| match r {
        vk::Result::ERROR_DEVICE_LOST => BackendError::DeviceLost(format!("{what}: {r}")),
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
            BackendError::OutOfMemory(format!("{what}: {r}"))
        }
        _ => BackendError::Other(format!("{what}: {r}")),
    }
}

/// A buffer with its own memory.
pub(crate) struct Buffer {
    ctx: Arc<Ctx>,
    pub(crate) buf: vk::Buffer,
    mem: vk::DeviceMemory,
    pub(crate) size: u64,
    ptr: Option<NonNull<u8>>,
}

// SAFETY: the handles are plain values usable from any thread; the mapped
// pointer is only dereferenced through methods whose callers synchronise
// access (the device's locks and the in-flight rules of the backend
// contract).
unsafe impl Send for Buffer {}
// SAFETY: as above.
unsafe impl Sync for Buffer {}

fn find_type(
    props: &vk::PhysicalDeviceMemoryProperties,
    bits: u32,
    want: vk::MemoryPropertyFlags,
) -> Option<u32> {
    (0..props.memory_type_count).find(|&i| {
        bits & (1 << i) != 0 && props.memory_types[i as usize].property_flags.contains(want)
    })
}

impl Buffer {
    /// Allocates `size` bytes (at least 16) for `usage`, zeroed if
    /// `Placement::Host` or mapped; unmapped device memory is left for the
    /// caller to clear (`vkCmdFillBuffer`).
    pub(crate) fn new(
        ctx: &Arc<Ctx>,
        size: u64,
        usage: vk::BufferUsageFlags,
        placement: Placement,
    ) -> Result<Buffer, BackendError> {
        let size = size.max(16).next_multiple_of(4);
        let d = &ctx.device;
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(usage)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid create info; the buffer is destroyed in Drop or on
        // the error paths below.
        let buf = unsafe { d.create_buffer(&info, None) }.map_err(vk_err("vkCreateBuffer"))?;
        // SAFETY: `buf` is a live buffer of this device.
        let req = unsafe { d.get_buffer_memory_requirements(buf) };
        use vk::MemoryPropertyFlags as F;
        let coherent = F::HOST_VISIBLE | F::HOST_COHERENT;
        let mut tries: Vec<(u32, bool)> = Vec::new();
        match placement {
            Placement::Host => {
                for want in [coherent | F::DEVICE_LOCAL, coherent] {
                    if let Some(t) = find_type(&ctx.mem_props, req.memory_type_bits, want) {
                        tries.push((t, true));
                    }
                }
            }
            Placement::Device => {
                if !ctx.force_staging {
                    if let Some(t) = find_type(
                        &ctx.mem_props,
                        req.memory_type_bits,
                        coherent | F::DEVICE_LOCAL,
                    ) {
                        tries.push((t, true));
                    }
                }
                for want in [F::DEVICE_LOCAL, F::empty()] {
                    if let Some(t) = find_type(&ctx.mem_props, req.memory_type_bits, want) {
                        tries.push((t, false));
                    }
                }
            }
        }
        let mut last = vk::Result::ERROR_OUT_OF_DEVICE_MEMORY;
        for (ty, map) in tries {
            let alloc = vk::MemoryAllocateInfo::default()
                .allocation_size(req.size)
                .memory_type_index(ty);
            // SAFETY: valid allocate info for a type the buffer accepts.
            let mem = match unsafe { d.allocate_memory(&alloc, None) } {
                Ok(m) => m,
                Err(r) => {
                    last = r;
                    continue;
                }
            };
            // SAFETY: fresh memory of a compatible type, offset 0 meets
            // every alignment; bound once.
            if let Err(r) = unsafe { d.bind_buffer_memory(buf, mem, 0) } {
                // SAFETY: `mem` is unused.
                unsafe { d.free_memory(mem, None) };
                last = r;
                continue;
            }
            let ptr = if map {
                // SAFETY: host-visible memory, mapped once for its lifetime.
                match unsafe { d.map_memory(mem, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) } {
                    Ok(p) => NonNull::new(p.cast::<u8>()),
                    Err(r) => {
                        // SAFETY: `buf` and `mem` are unused by any work.
                        unsafe {
                            d.destroy_buffer(buf, None);
                            d.free_memory(mem, None);
                        }
                        return Err(vk_err("vkMapMemory")(r));
                    }
                }
            } else {
                None
            };
            if let Some(p) = ptr {
                // SAFETY: the mapping covers `req.size >= size` bytes and
                // nothing else refers to it yet.
                unsafe { core::ptr::write_bytes(p.as_ptr(), 0, size as usize) };
            }
            return Ok(Buffer {
                ctx: Arc::clone(ctx),
                buf,
                mem,
                size,
                ptr,
            });
        }
        // SAFETY: `buf` has no memory and no users.
        unsafe { d.destroy_buffer(buf, None) };
        Err(vk_err("vkAllocateMemory")(last))
    }

    /// The mapped pointer, if the memory is host-visible.
    pub(crate) fn mapped(&self) -> Option<NonNull<u8>> {
        self.ptr
    }

    /// Copies `src` into the mapping at `off`.
    ///
    /// # Safety
    ///
    /// The buffer is mapped, `off + src.len() <= size`, and no device work
    /// in flight accesses those bytes.
    pub(crate) unsafe fn write(&self, off: u64, src: &[u8]) {
        debug_assert!(off + src.len() as u64 <= self.size);
        if let Some(p) = self.ptr {
            // SAFETY: in bounds of the mapping per the caller; the source
            // is a distinct Rust slice.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    p.as_ptr().add(off as usize),
                    src.len(),
                )
            };
        }
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping.
    ///
    /// # Safety
    ///
    /// The buffer is mapped, `off + dst.len() <= size`, and every device
    /// write to those bytes completed and was made visible to the host (a
    /// waited-for submission ending in a `→ HOST` barrier), with no device
    /// work in flight writing them.
    pub(crate) unsafe fn read(&self, off: u64, dst: &mut [u8]) {
        debug_assert!(off + dst.len() as u64 <= self.size);
        if let Some(p) = self.ptr {
            // SAFETY: in bounds of the mapping per the caller.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    p.as_ptr().add(off as usize),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            };
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: owners drop buffers only when no submission using them
        // is in flight (the device waits idle before dropping its memory;
        // per-launch buffers are dropped from the free list only); the
        // handles belong to this device and are destroyed once.
        unsafe {
            self.ctx.device.destroy_buffer(self.buf, None);
            self.ctx.device.free_memory(self.mem, None);
        }
    }
}
