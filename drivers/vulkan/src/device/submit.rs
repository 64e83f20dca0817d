//! Submissions on the device's one queue, signalled on its timeline
//! semaphore, and the staging buffer that uploads and read-backs go
//! through.

use std::time::Duration;

use ash::vk;
use hmm_core::mirror::backend::BackendError;

use super::{barrier, lock, Staging, VulkanDevice, PAGE};
use crate::mem::{vk_err, Buffer, Placement};

impl VulkanDevice {
    /// Allocates a primary command buffer from the shared pool.
    pub(crate) fn alloc_cb(&self) -> Result<vk::CommandBuffer, BackendError> {
        let q = lock(&self.q);
        let info = vk::CommandBufferAllocateInfo::default()
            .command_pool(q.cmd_pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is externally synchronised by the queue lock.
        let v = unsafe { self.ctx.device.allocate_command_buffers(&info) }
            .map_err(vk_err("vkAllocateCommandBuffers"))?;
        v.into_iter()
            .next()
            .ok_or_else(|| BackendError::Other("no command buffer".into()))
    }

    /// Records `cb` (between a barrier ordering it after every earlier
    /// submission and one making its writes visible to the host) and
    /// submits it, signalling the next timeline value, which it returns.
    ///
    /// `cb` must not be pending (its previous submission completed).
    pub(crate) fn submit(
        &self,
        cb: vk::CommandBuffer,
        record: impl FnOnce(&ash::Device, vk::CommandBuffer),
    ) -> Result<u64, BackendError> {
        let d = &self.ctx.device;
        let mut q = lock(&self.q);
        // SAFETY: `cb` comes from the pool this lock guards and is not
        // pending (caller's promise); reset, record, end in order.
        unsafe {
            d.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty())
                .map_err(vk_err("vkResetCommandBuffer"))?;
            d.begin_command_buffer(
                cb,
                &vk::CommandBufferBeginInfo::default()
                    .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(vk_err("vkBeginCommandBuffer"))?;
        }
        // Submissions on one queue may overlap: order this one's accesses
        // after every earlier submission's writes.
        barrier(
            d,
            cb,
            (
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::AccessFlags::MEMORY_WRITE,
            ),
            (
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE,
            ),
        );
        record(d, cb);
        barrier(
            d,
            cb,
            (
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::AccessFlags::MEMORY_WRITE,
            ),
            (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
        );
        // SAFETY: `cb` is recording.
        unsafe { d.end_command_buffer(cb) }.map_err(vk_err("vkEndCommandBuffer"))?;
        let value = q.last + 1;
        let values = [value];
        let sems = [self.timeline];
        let cbs = [cb];
        let mut tl = vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&values);
        let submit = vk::SubmitInfo::default()
            .command_buffers(&cbs)
            .signal_semaphores(&sems)
            .push_next(&mut tl);
        // SAFETY: the queue is externally synchronised by this lock; the
        // value is greater than every value signalled or pending; `cb` is
        // executable and everything it references is alive until the
        // value is reached (owners keep it).
        unsafe { d.queue_submit(q.queue, &[submit], vk::Fence::null()) }
            .map_err(vk_err("vkQueueSubmit"))?;
        q.last = value;
        Ok(value)
    }

    /// Waits for timeline `value`; `Ok(false)` on timeout.
    pub(crate) fn wait_value(
        &self,
        value: u64,
        timeout: Option<Duration>,
    ) -> Result<bool, BackendError> {
        let ns = timeout.map_or(u64::MAX, |t| t.as_nanos().min(u128::from(u64::MAX)) as u64);
        let sems = [self.timeline];
        let values = [value];
        let info = vk::SemaphoreWaitInfo::default()
            .semaphores(&sems)
            .values(&values);
        // SAFETY: a live timeline semaphore; waiting is thread-safe.
        match unsafe { self.ctx.device.wait_semaphores(&info, ns) } {
            Ok(()) => Ok(true),
            Err(vk::Result::TIMEOUT) => Ok(false),
            Err(r) => Err(vk_err("vkWaitSemaphores")(r)),
        }
    }

    pub(super) fn counter(&self) -> u64 {
        // SAFETY: a live timeline semaphore; the query is thread-safe.
        unsafe { self.ctx.device.get_semaphore_counter_value(self.timeline) }.unwrap_or(0)
    }

    /// Submits `record` on the staging command buffer and waits for it.
    pub(crate) fn run_staging(
        &self,
        st: &mut Staging,
        record: impl FnOnce(&ash::Device, vk::CommandBuffer),
    ) -> Result<(), BackendError> {
        let cb = match st.cb {
            Some(cb) => cb,
            None => {
                let cb = self.alloc_cb()?;
                st.cb = Some(cb);
                cb
            }
        };
        let v = self.submit(cb, record)?;
        if !self.wait_value(v, None)? {
            return Err(BackendError::DeviceLost(
                "staging copy never completed".into(),
            ));
        }
        Ok(())
    }

    /// The staging buffer, grown to at least `bytes`.
    pub(super) fn staging_buf<'a>(
        &self,
        st: &'a mut Staging,
        bytes: u64,
    ) -> Result<&'a Buffer, BackendError> {
        if st.buf.as_ref().is_none_or(|b| b.size < bytes) {
            st.buf = None;
            st.buf = Some(Buffer::new(
                &self.ctx,
                bytes.max(64 * PAGE),
                vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST,
                Placement::Host,
            )?);
        }
        st.buf
            .as_ref()
            .ok_or_else(|| BackendError::Other("no staging buffer".into()))
    }

    /// Copies `(offset in src, bytes)` pieces into `dst` at given offsets
    /// through the staging buffer: `pieces` are `(dst_off, src)` pairs.
    pub(super) fn upload_staged(
        &self,
        dst: &Buffer,
        pieces: &[(u64, &[u8])],
    ) -> Result<(), BackendError> {
        let mut st = lock(&self.staging);
        let total: u64 = pieces.iter().map(|p| p.1.len() as u64).sum();
        let buf = self.staging_buf(&mut st, total)?.buf;
        let sb = st
            .buf
            .as_ref()
            .ok_or_else(|| BackendError::Other("staging".into()))?;
        let mut regions = Vec::with_capacity(pieces.len());
        let mut off = 0u64;
        for (dst_off, src) in pieces {
            // SAFETY: the staging buffer is mapped, large enough, and not
            // in flight (it is only used under this lock, waited for).
            unsafe { sb.write(off, src) };
            regions.push(vk::BufferCopy {
                src_offset: off,
                dst_offset: *dst_off,
                size: src.len() as u64,
            });
            off += src.len() as u64;
        }
        let dbuf = dst.buf;
        self.run_staging(&mut st, |d, cb| {
            // SAFETY: recording; regions lie within both buffers.
            unsafe { d.cmd_copy_buffer(cb, buf, dbuf, &regions) }
        })
    }
}
