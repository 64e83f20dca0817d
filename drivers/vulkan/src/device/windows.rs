//! Zero-copy mode's host windows: host memory imported with
//! `VK_EXT_external_memory_host`, the table of bound windows, and the
//! retirement of a window's buffer once no pending submission names it.

use std::sync::Arc;

use ash::vk;
use hmm_core::mirror::backend::BackendError;

use super::VulkanDevice;
use crate::mem::vk_err;
use crate::open::Ctx;

/// A bound host window: host memory imported with
/// `VK_EXT_external_memory_host` and the storage buffer over it.
pub(super) struct Window {
    pub(super) ctx: Arc<Ctx>,
    pub(super) buf: vk::Buffer,
    pub(super) mem: vk::DeviceMemory,
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: a window is dropped only when no pending submission's
        // descriptor set names its buffer (`Windows::retired` holds it
        // until the last such submission's timeline value is reached; the
        // device waits idle before dropping the rest); destroyed once.
        // Freeing an import releases the driver's hold on the host pages
        // and never touches them.
        unsafe {
            self.ctx.device.destroy_buffer(self.buf, None);
            self.ctx.device.free_memory(self.mem, None);
        }
    }
}

/// Zero-copy mode's window table.
#[derive(Default)]
pub(super) struct Windows {
    /// Per window: its import while bound.
    pub(super) bound: Vec<Option<Window>>,
    /// Per window: the timeline value of the last submission whose
    /// descriptor set named the window's current buffer.
    pub(super) last_use: Vec<u64>,
    /// Unbound windows whose buffer a submission not yet complete still
    /// names in its descriptor set (not used by it: the core unbinds a
    /// window only when no submitted work reaches it through an entry),
    /// with that submission's value; destroyed once it is reached.
    pub(super) retired: Vec<(u64, Window)>,
}

impl VulkanDevice {
    /// Destroys retired windows whose last submission completed.
    pub(super) fn reap(&self, w: &mut Windows) {
        if w.retired.is_empty() {
            return;
        }
        let done = self.counter();
        w.retired.retain(|(v, _)| *v > done);
    }

    /// The window table's buffers, one per pool binding: each bound
    /// window's import, the dummy buffer for the others.
    pub(super) fn window_buffers(w: &Windows, dummy: vk::Buffer) -> Vec<vk::Buffer> {
        w.bound
            .iter()
            .map(|b| b.as_ref().map_or(dummy, |b| b.buf))
            .collect()
    }

    /// Imports `len` bytes of host memory at `addr` as a storage buffer.
    pub(super) fn import(
        &self,
        zc: &crate::open::ZeroCopyCtx,
        addr: *mut u8,
        len: u64,
    ) -> Result<Window, BackendError> {
        let d = &self.ctx.device;
        let handle = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut hp = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: the extension is enabled on this device (zero-copy mode);
        // `addr` is aligned to minImportedHostPointerAlignment (checked by
        // the caller) and `hp` is a valid output structure. The query
        // reads no host memory.
        let r = unsafe {
            (zc.ext.fp().get_memory_host_pointer_properties_ext)(
                zc.ext.device(),
                handle,
                addr.cast_const().cast(),
                &mut hp,
            )
        };
        if r != vk::Result::SUCCESS {
            return Err(vk_err("vkGetMemoryHostPointerPropertiesEXT")(r));
        }
        let mut ext_info = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let info = vk::BufferCreateInfo::default()
            .size(len)
            .usage(vk::BufferUsageFlags::STORAGE_BUFFER)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut ext_info);
        // SAFETY: valid create info (host-allocation handle type of the
        // enabled extension); destroyed on the error paths or by `Window`.
        let buf = unsafe { d.create_buffer(&info, None) }.map_err(vk_err("vkCreateBuffer"))?;
        // SAFETY: `buf` is a live buffer of this device.
        let req = unsafe { d.get_buffer_memory_requirements(buf) };
        let bits = req.memory_type_bits & hp.memory_type_bits;
        use vk::MemoryPropertyFlags as F;
        let ty = (0..self.ctx.mem_props.memory_type_count).find(|&i| {
            bits & (1 << i) != 0
                && self.ctx.mem_props.memory_types[i as usize]
                    .property_flags
                    .contains(F::HOST_VISIBLE | F::HOST_COHERENT)
        });
        let fail = |msg: String| {
            // SAFETY: `buf` has no memory and no users.
            unsafe { d.destroy_buffer(buf, None) };
            Err(BackendError::Other(msg))
        };
        let Some(ty) = ty else {
            return fail(format!(
                "host window at {addr:p}: no host-coherent memory type can import it \
                 (pointer types {:#x}, buffer types {:#x})",
                hp.memory_type_bits, req.memory_type_bits
            ));
        };
        if req.size > len {
            return fail(format!(
                "host window at {addr:p}: a {len}-byte buffer needs {} bytes of memory",
                req.size
            ));
        }
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(handle)
            .host_pointer(addr.cast());
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(len)
            .memory_type_index(ty)
            .push_next(&mut import);
        // SAFETY: `addr` and `len` are multiples of the import alignment
        // (checked by the caller) and the range is, per the caller's
        // promise (`bind_window`), part of one mapping of this process;
        // the type is one the pointer and the buffer both accept.
        let mem = match unsafe { d.allocate_memory(&alloc, None) } {
            Ok(m) => m,
            Err(r) => {
                // SAFETY: `buf` has no memory and no users.
                unsafe { d.destroy_buffer(buf, None) };
                return Err(vk_err("vkAllocateMemory (host pointer import)")(r));
            }
        };
        // SAFETY: fresh memory of a compatible type and at least
        // `req.size` bytes; offset 0; bound once.
        if let Err(r) = unsafe { d.bind_buffer_memory(buf, mem, 0) } {
            // SAFETY: neither object has users.
            unsafe {
                d.destroy_buffer(buf, None);
                d.free_memory(mem, None);
            }
            return Err(vk_err("vkBindBufferMemory")(r));
        }
        Ok(Window {
            ctx: Arc::clone(&self.ctx),
            buf,
            mem,
        })
    }
}
