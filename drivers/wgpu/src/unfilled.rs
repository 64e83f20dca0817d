//! Buffers wgpu does not zero-fill: the pool and the page table, made
//! through `wgpu-hal` ([`WgpuDevice::unfilled_buffer`]), the page table
//! zeroed a page at a time as the mirror first writes into it, and both
//! poisoned in debug builds so tests catch a read of never-written memory.

use hmm_core::mirror::backend::PteWrite;
use hmm_core::mirror::format::Pte;

use crate::device::{lock, Memory, WgpuDevice, PAGE};

impl WgpuDevice {
    /// A storage buffer for `desc` that wgpu will not zero-fill: made
    /// through `wgpu-hal` and handed to wgpu with
    /// [`wgpu::Device::create_buffer_from_hal`], which takes the caller's
    /// word that its contents are initialised. `None` where the device is
    /// not on the Vulkan backend or the allocation failed (the caller then
    /// lets wgpu make it, zero-filled).
    ///
    /// Only the pool is made this way. The mirror never reads a slot it
    /// has not written: a page-table entry names a slot only after the
    /// slot was written whole (`copy_to_device` of a full page), so the
    /// fill bought nothing but its cost. The page table is still made by
    /// wgpu: an entry must read as empty until written.
    pub(crate) fn unfilled_buffer(
        &self,
        desc: &wgpu::BufferDescriptor<'_>,
    ) -> Option<wgpu::Buffer> {
        use wgpu::hal::Device as _;
        let known = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        if desc.size == 0 || desc.mapped_at_creation || !known.contains(desc.usage) {
            return None;
        }
        // The uses wgpu-core itself derives from `desc.usage` for a
        // buffer it creates unmapped (`conv::map_buffer_usage`, plus
        // COPY_DST for its own zero-fill, which `desc` already asks for).
        let mut uses = wgpu::BufferUses::empty();
        for (usage, use_) in [
            (
                wgpu::BufferUsages::STORAGE,
                wgpu::BufferUses::STORAGE_READ_ONLY | wgpu::BufferUses::STORAGE_READ_WRITE,
            ),
            (wgpu::BufferUsages::COPY_SRC, wgpu::BufferUses::COPY_SRC),
            (wgpu::BufferUsages::COPY_DST, wgpu::BufferUses::COPY_DST),
        ] {
            if desc.usage.contains(usage) {
                uses |= use_;
            }
        }
        // SAFETY: the guard is used only to create one buffer below and is
        // dropped before this function returns; nothing it refers to is
        // destroyed through it.
        let hal = unsafe { self.device.as_hal::<wgpu::hal::api::Vulkan>() }?;
        let hal_desc = wgpu::hal::BufferDescriptor {
            label: desc.label,
            size: desc.size,
            usage: uses,
            memory_flags: wgpu::hal::MemoryFlags::empty(),
        };
        // SAFETY: a plain buffer creation on the device wgpu drives, with
        // a non-zero size within `max_buffer_size` (the memory plan keeps
        // every binding under it) and the uses wgpu would give it.
        let raw = unsafe { hal.create_buffer(&hal_desc) }.ok()?;
        drop(hal);
        // SAFETY: `raw` was created just above on this device's own hal
        // device, from `desc` (same size, the uses wgpu derives from
        // `desc.usage`), its size is non-zero, and it counts as
        // initialised for every read the mirror makes of it: no slot is
        // read (by a kernel through an entry, or by `copy_to_host`)
        // before `copy_to_device` wrote it whole — see the doc comment.
        // Reading never-written device memory is an unspecified value on
        // the device, not undefined behaviour in this process.
        Some(unsafe {
            self.device
                .create_buffer_from_hal::<wgpu::hal::api::Vulkan>(raw, desc)
        })
    }
}

impl Memory {
    /// Zeroes, ahead of `batch`'s writes, every table page it writes into
    /// that was never zeroed (a table made through `wgpu-hal`; nothing
    /// otherwise). Sound because a table page the device can reach always
    /// has a write into it: the shadow table links a new page and writes
    /// its first entry in the same batch of writes, all applied before the
    /// next submission, and frees a page (clearing its link) as soon as
    /// its last valid entry goes (`hmm_core::mirror::pagetable`), so no
    /// submission ever walks into a linked page that no write touched.
    /// The zeroes are staged with `write_buffer` like the entries, in call
    /// order, so they land first.
    pub(crate) fn zero_new_table_pages(&self, queue: &wgpu::Queue, batch: &[PteWrite]) {
        let Some(zeroed) = &self.table_zeroed else {
            return;
        };
        let mut bits = lock(zeroed);
        for w in batch {
            let p = w.table.0 as usize;
            let Some(word) = bits.get_mut(p / 64) else {
                continue;
            };
            if *word & (1 << (p % 64)) == 0 {
                *word |= 1 << (p % 64);
                queue.write_buffer(&self.table, p as u64 * PAGE, &[0u8; PAGE as usize]);
            }
        }
    }
}

/// In builds with debug assertions, fills (the first 32 MiB of) a buffer
/// wgpu will not zero with a non-zero pattern, so a test that reads memory
/// the mirror never wrote (a pool slot, a table page) sees garbage and
/// fails rather than passing on memory the allocator happened to hand out
/// zeroed. The conformance suite's pool and table fit in it.
pub(crate) fn poison(queue: &wgpu::Queue, buf: &wgpu::Buffer) {
    if cfg!(debug_assertions) {
        let junk = vec![0xA5u8; buf.size().min(32 << 20) as usize];
        queue.write_buffer(buf, 0, &junk);
    }
}

/// [`poison`] for the page table: every entry a valid, writable leaf of
/// slot 0 (a directory entry naming the root), so a walk through a page
/// that was never zeroed finds a mapping where it should fault and reads
/// another page's data — wrong words a test sees — instead of an
/// out-of-range index the device would treat as a fault.
pub(crate) fn poison_table(queue: &wgpu::Queue, buf: &wgpu::Buffer) {
    if cfg!(debug_assertions) {
        let entry = Pte::leaf(hmm_core::mirror::format::PoolSlot(0), true).0;
        let junk = vec![entry; (buf.size().min(32 << 20) / 8) as usize];
        queue.write_buffer(buf, 0, bytemuck::cast_slice(&junk));
    }
}
