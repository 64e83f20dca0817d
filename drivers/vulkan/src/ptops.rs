//! Host requests on page-table entries that must be atomic with respect to
//! running kernels (read, clear accessed/dirty), run as a compute pass on
//! the device's queue (`pt_ops.wgsl`, the same shader the wgpu driver
//! runs).
//!
//! Why not a host `AtomicU32::fetch_and` on the mapped table? On lavapipe
//! that would work (host and device share one coherent mapping), but
//! Vulkan gives no guarantee that host atomics and shader atomics on the
//! same coherent memory are atomic with respect to each other, and the
//! table may not be mapped at all (staging path). The compute pass is
//! correct on every device.

use std::sync::Arc;

use ash::vk;
use hmm_core::mirror::backend::{BackendError, PteLoc};
use hmm_core::mirror::format::Pte;
use hmm_shaders::{pt_binding, PtBatch, PtParams};

use crate::device::{lock, one_set, write_set, VulkanDevice};
use crate::kernel::{pipeline, spirv, Layouts, Pipeline};
use crate::mem::{Buffer, Placement};

/// The pipeline, its descriptor set and buffers, grown on demand.
pub(crate) struct PtOps {
    pipeline: Pipeline,
    params: Buffer,
    dpool: vk::DescriptorPool,
    set: vk::DescriptorSet,
    cb: vk::CommandBuffer,
    bufs: Option<PtBufs>,
}

struct PtBufs {
    cap: u32,
    list: Buffer,
    out: Buffer,
}

impl PtOps {
    pub(crate) fn new(dev: &VulkanDevice) -> Result<PtOps, BackendError> {
        let layouts = Arc::new(Layouts::new(&dev.ctx, pt_binding::OUT + 1)?);
        let module = naga::front::wgsl::parse_str(hmm_shaders::PT_OPS)
            .map_err(|e| BackendError::Kernel(e.to_string()))?;
        let info = hmm_shaders::validate_module(&module)
            .map_err(|e| BackendError::Kernel(e.to_string()))?;
        let words = spirv(&module, &info, hmm_shaders::PT_AND_ENTRY)?;
        let entry = std::ffi::CString::new(hmm_shaders::PT_AND_ENTRY)
            .map_err(|e| BackendError::Kernel(e.to_string()))?;
        let pipeline = pipeline(&layouts, &words, &entry)?;
        let params = Buffer::new(
            &dev.ctx,
            core::mem::size_of::<PtParams>() as u64,
            vk::BufferUsageFlags::UNIFORM_BUFFER,
            Placement::Host,
        )?;
        let d = &dev.ctx.device;
        let (dpool, set) = one_set(d, layouts.set, 3)?;
        let cb = match dev.alloc_cb() {
            Ok(cb) => cb,
            Err(e) => {
                // SAFETY: the pool has no users.
                unsafe { d.destroy_descriptor_pool(dpool, None) };
                return Err(e);
            }
        };
        Ok(PtOps {
            pipeline,
            params,
            dpool,
            set,
            cb,
            bufs: None,
        })
    }

    /// Destroys the descriptor pool (the device is idle).
    pub(crate) fn destroy(self, d: &ash::Device) {
        // SAFETY: called from the device's Drop after waiting idle; once.
        unsafe { d.destroy_descriptor_pool(self.dpool, None) };
    }

    fn grow(&mut self, dev: &VulkanDevice, need: u32) -> Result<(), BackendError> {
        if self.bufs.as_ref().is_some_and(|b| b.cap >= need) {
            return Ok(());
        }
        let cap = need.next_power_of_two().max(256);
        let table = dev.memory()?.table.buf;
        let list = Buffer::new(
            &dev.ctx,
            u64::from(cap) * 4,
            vk::BufferUsageFlags::STORAGE_BUFFER,
            Placement::Host,
        )?;
        let out = Buffer::new(
            &dev.ctx,
            u64::from(cap) * 8,
            vk::BufferUsageFlags::STORAGE_BUFFER,
            Placement::Host,
        )?;
        // The set is idle: every operation waits for its submission.
        write_set(
            &dev.ctx.device,
            self.set,
            &[self.params.buf, table, list.buf, out.buf],
        );
        self.bufs = Some(PtBufs { cap, list, out });
        Ok(())
    }
}

impl VulkanDevice {
    /// ANDs `keep` into the low word of each entry (`u32::MAX`: read only)
    /// and appends the previous values to `out`.
    pub(crate) fn pt_and(
        &self,
        locs: &[PteLoc],
        keep: u32,
        out: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        let mem = self.memory()?;
        if locs.is_empty() {
            return Ok(());
        }
        PtBatch::check(locs, mem.table_pages)?;
        let mut guard = lock(&self.pt_ops);
        let ops = guard
            .as_mut()
            .ok_or(BackendError::NotInitialised("init has not run"))?;
        for piece in locs.chunks(PtBatch::MAX) {
            let PtBatch {
                words,
                params,
                groups_x: gx,
                groups_y: gy,
            } = PtBatch::plan(piece, keep);
            let n = params.count;
            ops.grow(self, n)?;
            let b = ops
                .bufs
                .as_ref()
                .ok_or(BackendError::NotInitialised("pt buffers"))?;
            // SAFETY: mapped, in bounds (grown to `n`), and idle: the
            // previous operation was waited for under this lock.
            unsafe {
                ops.params.write(0, bytemuck::bytes_of(&params));
                b.list.write(0, bytemuck::cast_slice(&words));
            }
            let (pipe, layout, set) = (
                ops.pipeline.pipeline,
                ops.pipeline.layouts.pipeline,
                ops.set,
            );
            let v = self.submit(ops.cb, |d, cb| {
                // SAFETY: recording; live, compatible pipeline, layout, set.
                unsafe {
                    d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, pipe);
                    d.cmd_bind_descriptor_sets(
                        cb,
                        vk::PipelineBindPoint::COMPUTE,
                        layout,
                        0,
                        &[set],
                        &[],
                    );
                    d.cmd_dispatch(cb, gx, gy, 1);
                }
            })?;
            if !self.wait_value(v, None)? {
                return Err(BackendError::DeviceLost(
                    "page-table operation never completed".into(),
                ));
            }
            let mut pairs = vec![0u32; 2 * n as usize];
            // SAFETY: mapped, in bounds; the submission completed and ended
            // with a HOST barrier.
            unsafe { b.out.read(0, bytemuck::cast_slice_mut(&mut pairs)) };
            out.extend(PtBatch::ptes(&pairs));
        }
        Ok(())
    }
}
