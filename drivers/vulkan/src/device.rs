//! [`VulkanDevice`]: memory, submissions, launches and their outcomes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ash::vk;
use hmm_core::mirror::backend::{
    Backend, BackendError, BackendInfo, DeviceConfig, DeviceToHost, HostToDevice, Invocations,
    LaunchOutcome, PteLoc, PteWrite, SubmissionId,
};
use hmm_core::mirror::format::{Pte, ENTRIES, TABLE_PAGE_BYTES};
use hmm_shaders::{binding, ControlLayout, MemoryPlan, Params, POOL_BINDINGS};

use crate::kernel::{Layouts, Pipeline, VulkanKernel};
use crate::mem::{vk_err, Buffer, Placement};
use crate::open::{Ctx, Mode};
use crate::ptops::PtOps;

pub(crate) const PAGE: u64 = TABLE_PAGE_BYTES;
/// Fault records one launch can report (later faults still mark their
/// invocations incomplete, so they are replayed and fault again).
pub(crate) const FAULT_CAP: u32 = 1024;
/// Pages per staging submission at most (bounds the staging buffer).
const STAGING_PAGES: usize = 4096;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Memory allocated by `init`.
pub(crate) struct Memory {
    pub(crate) table: Buffer,
    pub(crate) pool: Vec<Buffer>,
    pub(crate) chunk_slots: u32,
    pub(crate) pool_slots: u32,
    pub(crate) table_pages: u32,
}

/// The queue, the command pool and the timeline's last signalled value:
/// all three need external synchronisation, and values must be submitted
/// in increasing order, so one lock covers them.
pub(crate) struct Queue {
    queue: vk::Queue,
    cmd_pool: vk::CommandPool,
    /// The last value a submission was asked to signal.
    last: u64,
}

/// Per-launch resources, reused once the launch's outcome is taken.
struct LaunchRes {
    params: Buffer,
    control: Buffer,
    replay: Buffer,
    dpool: vk::DescriptorPool,
    set: vk::DescriptorSet,
    cb: vk::CommandBuffer,
    bitmap_bits: u32,
    replay_cap: u32,
}

struct Submission {
    res: LaunchRes,
    layout: ControlLayout,
    /// Keeps the pipeline alive while the device may run it.
    _pipeline: Arc<Pipeline>,
}

#[derive(Default)]
struct Launches {
    in_flight: HashMap<u64, Submission>,
    free: Vec<LaunchRes>,
}

/// The staging buffer and the command buffer its copies are recorded in.
#[derive(Default)]
pub(crate) struct Staging {
    buf: Option<Buffer>,
    cb: Option<vk::CommandBuffer>,
}

/// A device opened through Vulkan (`ash`). See the [crate docs](crate).
pub struct VulkanDevice {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) kernel_layouts: Arc<Layouts>,
    timeline: vk::Semaphore,
    q: Mutex<Queue>,
    pub(crate) mem: OnceLock<Memory>,
    launches: Mutex<Launches>,
    pub(crate) pt_ops: Mutex<Option<PtOps>>,
    staging: Mutex<Staging>,
}

impl core::fmt::Debug for VulkanDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VulkanDevice")
            .field("device", &self.ctx.name)
            .field("mode", &self.ctx.mode)
            .finish_non_exhaustive()
    }
}

/// Records a global memory barrier.
pub(crate) fn barrier(
    d: &ash::Device,
    cb: vk::CommandBuffer,
    src: (vk::PipelineStageFlags, vk::AccessFlags),
    dst: (vk::PipelineStageFlags, vk::AccessFlags),
) {
    let mb = [vk::MemoryBarrier::default()
        .src_access_mask(src.1)
        .dst_access_mask(dst.1)];
    // SAFETY: `cb` is in the recording state (callers record between
    // begin and end under the queue lock).
    unsafe {
        d.cmd_pipeline_barrier(
            cb,
            src.0,
            dst.0,
            vk::DependencyFlags::empty(),
            &mb,
            &[],
            &[],
        )
    };
}

/// Runs of consecutive items: `(start, len)` pairs over `0..n` where
/// `joins(i)` says item `i` continues item `i - 1`'s run.
pub(crate) fn runs(
    n: usize,
    joins: impl Fn(usize) -> bool,
) -> impl Iterator<Item = (usize, usize)> {
    let mut start = 0;
    (1..=n).filter_map(move |i| {
        if i < n && joins(i) {
            return None;
        }
        let r = (start, i - start);
        start = i;
        Some(r)
    })
}

impl VulkanDevice {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Result<VulkanDevice, BackendError> {
        let d = &ctx.device;
        let mut ty = vk::SemaphoreTypeCreateInfo::default()
            .semaphore_type(vk::SemaphoreType::TIMELINE)
            .initial_value(0);
        // SAFETY: valid create info (timeline semaphores were enabled at
        // device creation); destroyed in Drop.
        let timeline = unsafe {
            d.create_semaphore(&vk::SemaphoreCreateInfo::default().push_next(&mut ty), None)
        }
        .map_err(vk_err("vkCreateSemaphore"))?;
        // SAFETY: valid create info for the device's compute family;
        // destroyed in Drop.
        let cmd_pool = unsafe {
            d.create_command_pool(
                &vk::CommandPoolCreateInfo::default()
                    .queue_family_index(ctx.queue_family)
                    .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                None,
            )
        };
        let cmd_pool = match cmd_pool {
            Ok(p) => p,
            Err(r) => {
                // SAFETY: the semaphore has no users yet.
                unsafe { d.destroy_semaphore(timeline, None) };
                return Err(vk_err("vkCreateCommandPool")(r));
            }
        };
        // SAFETY: queue 0 of the family was requested at device creation.
        let queue = unsafe { d.get_device_queue(ctx.queue_family, 0) };
        let q = Mutex::new(Queue {
            queue,
            cmd_pool,
            last: 0,
        });
        // From here, Drop cleans up.
        let layouts = Layouts::new(&ctx, binding::POOL0 + POOL_BINDINGS);
        let dev = VulkanDevice {
            kernel_layouts: match layouts {
                Ok(l) => Arc::new(l),
                Err(e) => {
                    // SAFETY: neither object has users yet.
                    unsafe {
                        d.destroy_command_pool(cmd_pool, None);
                        d.destroy_semaphore(timeline, None);
                    }
                    return Err(e);
                }
            },
            ctx: Arc::clone(&ctx),
            timeline,
            q,
            mem: OnceLock::new(),
            launches: Mutex::new(Launches::default()),
            pt_ops: Mutex::new(None),
            staging: Mutex::new(Staging::default()),
        };
        Ok(dev)
    }

    /// The device, in words.
    pub fn device_name(&self) -> &str {
        &self.ctx.name
    }

    /// The mirroring mode this device was opened in.
    pub fn mode(&self) -> Mode {
        self.ctx.mode
    }

    /// Whether the device supports `sparseBinding` and
    /// `sparseResidencyBuffer` (reported only: the driver does not use
    /// sparse residency yet, and lavapipe has none, so no sparse path is
    /// tested).
    pub fn sparse_support(&self) -> (bool, bool) {
        self.ctx.sparse
    }

    /// `minImportedHostPointerAlignment` of `VK_EXT_external_memory_host`
    /// when the device supports the extension (probed, whatever the mode;
    /// what zero-copy mirroring would import at).
    pub fn host_import_alignment(&self) -> Option<u64> {
        self.ctx.host_import
    }

    /// Whether the pool and page table are host-mapped (uploads are a
    /// `memcpy`) rather than reached through the staging buffer.
    pub fn pool_is_mapped(&self) -> Option<bool> {
        self.mem.get().map(|m| m.table.mapped().is_some())
    }

    /// Whether validation layers are enabled on this device.
    pub fn validation_enabled(&self) -> bool {
        self.ctx.validation.is_some()
    }

    /// Every validation-layer error recorded so far (empty without
    /// validation).
    pub fn validation_errors(&self) -> Vec<String> {
        self.ctx
            .validation
            .as_ref()
            .map(|v| lock(&v.errors).clone())
            .unwrap_or_default()
    }

    /// Test hook: makes one call the validation layer rejects (a buffer
    /// with no usage flags, `VUID-VkBufferCreateInfo-usage-requiredbitmask`,
    /// which drivers ignore) so a test can check that the messenger
    /// records errors. Not part of the API.
    #[doc(hidden)]
    pub fn provoke_validation_error(&self) {
        let info = vk::BufferCreateInfo::default()
            .size(16)
            .usage(vk::BufferUsageFlags::empty())
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: invalid on purpose in one field drivers do not read for
        // allocation (usage); the buffer is never bound or used and is
        // destroyed at once.
        if let Ok(b) = unsafe { self.ctx.device.create_buffer(&info, None) } {
            // SAFETY: created above, unused, destroyed once.
            unsafe { self.ctx.device.destroy_buffer(b, None) };
        }
    }

    /// Fails with validation errors not yet reported, if any: they become
    /// a typed error of the next call, like wgpu's uncaptured errors.
    pub(crate) fn check(&self) -> Result<(), BackendError> {
        let Some(v) = &self.ctx.validation else {
            return Ok(());
        };
        let errs = lock(&v.errors);
        let mut seen = lock(&v.reported);
        if errs.len() > *seen {
            let msg = errs[*seen..].join("; ");
            *seen = errs.len();
            return Err(BackendError::Other(format!("Vulkan validation: {msg}")));
        }
        Ok(())
    }

    pub(crate) fn memory(&self) -> Result<&Memory, BackendError> {
        self.mem
            .get()
            .ok_or(BackendError::NotInitialised("init has not run"))
    }

    /// Largest storage-buffer binding, in pool slots.
    fn slots_per_binding(&self) -> u32 {
        let bytes = u64::from(self.ctx.limits.max_storage_buffer_range);
        (bytes / PAGE).min(u64::from(u32::MAX)) as u32
    }

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

    fn counter(&self) -> u64 {
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
    fn staging_buf<'a>(&self, st: &'a mut Staging, bytes: u64) -> Result<&'a Buffer, BackendError> {
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
    fn upload_staged(&self, dst: &Buffer, pieces: &[(u64, &[u8])]) -> Result<(), BackendError> {
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

    fn new_launch_res(
        &self,
        mem: &Memory,
        bitmap_bits: u32,
        replay_cap: u32,
    ) -> Result<LaunchRes, BackendError> {
        let layout = ControlLayout {
            fault_cap: FAULT_CAP,
            bitmap_bits,
        };
        use vk::BufferUsageFlags as U;
        let params = Buffer::new(
            &self.ctx,
            core::mem::size_of::<Params>() as u64,
            U::UNIFORM_BUFFER,
            Placement::Host,
        )?;
        let control = Buffer::new(
            &self.ctx,
            layout.bytes(),
            U::STORAGE_BUFFER,
            Placement::Host,
        )?;
        let replay = Buffer::new(
            &self.ctx,
            u64::from(replay_cap.max(1)) * 4,
            U::STORAGE_BUFFER,
            Placement::Host,
        )?;
        let d = &self.ctx.device;
        let sizes = [
            vk::DescriptorPoolSize {
                ty: vk::DescriptorType::UNIFORM_BUFFER,
                descriptor_count: 1,
            },
            vk::DescriptorPoolSize {
                ty: vk::DescriptorType::STORAGE_BUFFER,
                descriptor_count: binding::POOL0 - 1 + POOL_BINDINGS,
            },
        ];
        // SAFETY: valid create info; destroyed when the resources are.
        let dpool = unsafe {
            d.create_descriptor_pool(
                &vk::DescriptorPoolCreateInfo::default()
                    .max_sets(1)
                    .pool_sizes(&sizes),
                None,
            )
        }
        .map_err(vk_err("vkCreateDescriptorPool"))?;
        let layouts = [self.kernel_layouts.set];
        // SAFETY: one set from a pool sized for it, over a live layout.
        let set = match unsafe {
            d.allocate_descriptor_sets(
                &vk::DescriptorSetAllocateInfo::default()
                    .descriptor_pool(dpool)
                    .set_layouts(&layouts),
            )
        } {
            Ok(v) => v[0],
            Err(r) => {
                // SAFETY: the pool has no users.
                unsafe { d.destroy_descriptor_pool(dpool, None) };
                return Err(vk_err("vkAllocateDescriptorSets")(r));
            }
        };
        let mut bufs: Vec<vk::Buffer> = vec![params.buf, mem.table.buf, control.buf, replay.buf];
        bufs.extend(mem.pool.iter().map(|b| b.buf));
        write_set(d, set, &bufs);
        let cb = match self.alloc_cb() {
            Ok(cb) => cb,
            Err(e) => {
                // SAFETY: the pool has no users.
                unsafe { d.destroy_descriptor_pool(dpool, None) };
                return Err(e);
            }
        };
        Ok(LaunchRes {
            params,
            control,
            replay,
            dpool,
            set,
            cb,
            bitmap_bits,
            replay_cap,
        })
    }

    /// Zeroes an unmapped buffer on the device.
    fn clear_unmapped(&self, b: &Buffer) -> Result<(), BackendError> {
        if b.mapped().is_some() {
            return Ok(()); // mapped buffers are zeroed at allocation
        }
        let mut st = lock(&self.staging);
        let buf = b.buf;
        self.run_staging(&mut st, |d, cb| {
            // SAFETY: recording; the whole buffer, a multiple of 4 bytes.
            unsafe { d.cmd_fill_buffer(cb, buf, 0, vk::WHOLE_SIZE, 0) }
        })
    }
}

/// Points binding `i` of `set` at `bufs[i]` (whole buffer; binding 0 is
/// the uniform block).
pub(crate) fn write_set(d: &ash::Device, set: vk::DescriptorSet, bufs: &[vk::Buffer]) {
    let infos: Vec<[vk::DescriptorBufferInfo; 1]> = bufs
        .iter()
        .map(|&b| {
            [vk::DescriptorBufferInfo::default()
                .buffer(b)
                .range(vk::WHOLE_SIZE)]
        })
        .collect();
    let writes: Vec<vk::WriteDescriptorSet> = infos
        .iter()
        .enumerate()
        .map(|(i, info)| {
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(i as u32)
                .descriptor_type(if i == 0 {
                    vk::DescriptorType::UNIFORM_BUFFER
                } else {
                    vk::DescriptorType::STORAGE_BUFFER
                })
                .buffer_info(info)
        })
        .collect();
    // SAFETY: the set is not in use by any pending command buffer (callers
    // update sets only of idle resources); every buffer is live.
    unsafe { d.update_descriptor_sets(&writes, &[]) };
}

impl Drop for VulkanDevice {
    fn drop(&mut self) {
        let d = &self.ctx.device;
        // SAFETY: waiting idle makes every submission complete, so what
        // follows destroys only idle objects, each once.
        unsafe {
            let _ = d.device_wait_idle();
        }
        let mut l = lock(&self.launches);
        let mut all: Vec<LaunchRes> = l.free.drain(..).collect();
        all.extend(l.in_flight.drain().map(|(_, s)| s.res));
        for r in all {
            // SAFETY: the device is idle; the pool (and its set) is
            // destroyed once.
            unsafe { d.destroy_descriptor_pool(r.dpool, None) };
        }
        if let Some(p) = lock(&self.pt_ops).take() {
            p.destroy(d);
        }
        let q = lock(&self.q);
        // SAFETY: idle device; command buffers die with their pool; the
        // semaphore has no pending signal.
        unsafe {
            d.destroy_command_pool(q.cmd_pool, None);
            d.destroy_semaphore(self.timeline, None);
        }
        drop(q);
        if let Some(v) = &self.ctx.validation {
            let errs = lock(&v.errors);
            let seen = *lock(&v.reported);
            if errs.len() > seen && !std::thread::panicking() {
                panic!(
                    "Vulkan validation reported {} unreturned error(s): {}",
                    errs.len() - seen,
                    errs[seen..].join("; ")
                );
            }
        }
    }
}

// SAFETY: copy_to_device reads exactly the 4096 bytes at each `src`, with
// a memcpy into mapped or staging memory before it returns; copy_to_host
// writes exactly the 4096 bytes at each `dst`, before it returns; no other
// method touches host memory it was not handed; in copy mode kernels only
// reach device buffers, and the library (hmm.wgsl) sets only
// ACCESSED/DIRTY, with atomicOr on an entry's low word (pt_ops.wgsl
// clears them for the host with atomicAnd).
unsafe impl Backend for VulkanDevice {
    type Kernel = VulkanKernel;

    fn info(&self) -> BackendInfo {
        let (sb, srb) = self.ctx.sparse;
        BackendInfo {
            driver: "vulkan".into(),
            device: format!(
                "{}; {:?} mode; sparse binding {}, sparse residency buffer {} (unused)",
                self.ctx.name,
                self.ctx.mode,
                if sb { "yes" } else { "no" },
                if srb { "yes" } else { "no" }
            ),
            max_pool_slots: self.slots_per_binding().saturating_mul(POOL_BINDINGS),
        }
    }

    fn init(&self, config: DeviceConfig) -> Result<(), BackendError> {
        self.check()?;
        if self.mem.get().is_some() {
            return Err(BackendError::NotInitialised("init ran twice"));
        }
        let plan = MemoryPlan::new(
            config,
            self.slots_per_binding(),
            u64::from(self.ctx.limits.max_storage_buffer_range),
        )?;
        use vk::BufferUsageFlags as U;
        let usage = U::STORAGE_BUFFER | U::TRANSFER_SRC | U::TRANSFER_DST;
        let table = Buffer::new(&self.ctx, plan.table_bytes, usage, Placement::Device)?;
        self.clear_unmapped(&table)?;
        let mut pool = Vec::new();
        for slots in plan.binding_slots {
            let b = Buffer::new(&self.ctx, u64::from(slots) * PAGE, usage, Placement::Device)?;
            self.clear_unmapped(&b)?;
            pool.push(b);
        }
        let mem = Memory {
            table,
            pool,
            chunk_slots: plan.chunk_slots,
            pool_slots: config.pool_slots,
            table_pages: config.table_pages,
        };
        self.mem
            .set(mem)
            .map_err(|_| BackendError::NotInitialised("init ran twice"))?;
        *lock(&self.pt_ops) = Some(PtOps::new(self)?);
        self.check()
    }

    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError> {
        self.check()?;
        let mem = self.memory()?;
        if let Some(bad) = batch.iter().find(|c| c.slot.0 >= mem.pool_slots) {
            return Err(BackendError::Other(format!(
                "slot {} outside the pool",
                bad.slot.0
            )));
        }
        let joins = |i: usize| {
            let (a, b) = (&batch[i - 1], &batch[i]);
            b.slot.0 == a.slot.0 + 1
                && b.slot.0 % mem.chunk_slots != 0
                && b.src as usize == (a.src as usize).wrapping_add(PAGE as usize)
        };
        let mut staged: Vec<Vec<(u64, &[u8])>> = vec![Vec::new(); mem.pool.len()];
        let mut staged_pages = 0usize;
        for (start, len) in runs(batch.len(), joins) {
            let first = &batch[start];
            // SAFETY: the caller guarantees each `src` is readable for 4096
            // bytes during this call; a run's sources are consecutive
            // pages (checked by `joins`), so the run is one readable range.
            let bytes = unsafe { core::slice::from_raw_parts(first.src, len * PAGE as usize) };
            let chunk = (first.slot.0 / mem.chunk_slots) as usize;
            let off = u64::from(first.slot.0 % mem.chunk_slots) * PAGE;
            let dst = &mem.pool[chunk];
            if dst.mapped().is_some() {
                // SAFETY: mapped, in bounds (slot checked above), and no
                // in-flight work uses the destination slots (caller's
                // promise).
                unsafe { dst.write(off, bytes) };
            } else {
                staged[chunk].push((off, bytes));
                staged_pages += len;
                if staged_pages >= STAGING_PAGES {
                    for (c, pieces) in staged.iter_mut().enumerate() {
                        if !pieces.is_empty() {
                            self.upload_staged(&mem.pool[c], pieces)?;
                            pieces.clear();
                        }
                    }
                    staged_pages = 0;
                }
            }
        }
        for (c, pieces) in staged.iter().enumerate() {
            if !pieces.is_empty() {
                self.upload_staged(&mem.pool[c], pieces)?;
            }
        }
        self.check()
    }

    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError> {
        self.check()?;
        let mem = self.memory()?;
        if let Some(bad) = batch.iter().find(|c| c.slot.0 >= mem.pool_slots) {
            return Err(BackendError::Other(format!(
                "slot {} outside the pool",
                bad.slot.0
            )));
        }
        let locate = |s: u32| {
            (
                (s / mem.chunk_slots) as usize,
                u64::from(s % mem.chunk_slots) * PAGE,
            )
        };
        if mem.pool.iter().all(|b| b.mapped().is_some()) {
            for c in batch {
                let (chunk, off) = locate(c.slot.0);
                // SAFETY: the caller guarantees `dst` is valid for writes of
                // 4096 bytes, unaliased and disjoint from other
                // destinations; the slot's device writes completed (no
                // in-flight work writes it, and every waited submission
                // ended with a HOST barrier).
                unsafe {
                    let dst = core::slice::from_raw_parts_mut(c.dst, PAGE as usize);
                    mem.pool[chunk].read(off, dst);
                }
            }
            return self.check();
        }
        let mut st = lock(&self.staging);
        for piece in batch.chunks(STAGING_PAGES) {
            let bytes = piece.len() as u64 * PAGE;
            let sbuf = self.staging_buf(&mut st, bytes)?.buf;
            let mut per_chunk: Vec<Vec<vk::BufferCopy>> = vec![Vec::new(); mem.pool.len()];
            for (i, c) in piece.iter().enumerate() {
                let (chunk, off) = locate(c.slot.0);
                per_chunk[chunk].push(vk::BufferCopy {
                    src_offset: off,
                    dst_offset: i as u64 * PAGE,
                    size: PAGE,
                });
            }
            let pool: Vec<vk::Buffer> = mem.pool.iter().map(|b| b.buf).collect();
            self.run_staging(&mut st, |d, cb| {
                for (chunk, regions) in per_chunk.iter().enumerate() {
                    if !regions.is_empty() {
                        // SAFETY: recording; regions lie within both buffers.
                        unsafe { d.cmd_copy_buffer(cb, pool[chunk], sbuf, regions) };
                    }
                }
            })?;
            let sb = st
                .buf
                .as_ref()
                .ok_or_else(|| BackendError::Other("staging".into()))?;
            for (i, c) in piece.iter().enumerate() {
                // SAFETY: as in the mapped path for `dst`; the staging copy
                // completed and was made host-visible (waited, HOST
                // barrier).
                unsafe {
                    let dst = core::slice::from_raw_parts_mut(c.dst, PAGE as usize);
                    sb.read(i as u64 * PAGE, dst);
                }
            }
        }
        self.check()
    }

    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError> {
        self.check()?;
        let mem = self.memory()?;
        if let Some(bad) = batch
            .iter()
            .find(|w| w.table.0 >= mem.table_pages || usize::from(w.index) >= ENTRIES)
        {
            return Err(BackendError::Other(format!(
                "entry {:?}/{} outside the table",
                bad.table, bad.index
            )));
        }
        let pos = |w: &PteWrite| u64::from(w.table.0) * ENTRIES as u64 + u64::from(w.index);
        let joins = |i: usize| pos(&batch[i]) == pos(&batch[i - 1]) + 1;
        let words: Vec<u64> = batch.iter().map(|w| w.pte.0).collect();
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let mut pieces = Vec::new();
        for (start, len) in runs(batch.len(), joins) {
            let src = &bytes[start * 8..(start + len) * 8];
            let off = pos(&batch[start]) * 8;
            if mem.table.mapped().is_some() {
                // SAFETY: mapped and in bounds (checked above); the core
                // changes entries the device may be using only after
                // waiting for that work (the trait's contract).
                unsafe { mem.table.write(off, src) };
            } else {
                pieces.push((off, src));
            }
        }
        if !pieces.is_empty() {
            self.upload_staged(&mem.table, &pieces)?;
        }
        self.check()
    }

    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError> {
        self.pt_and(locs, u32::MAX, out)
    }

    fn clear_pte_bits(
        &self,
        locs: &[PteLoc],
        bits: u64,
        old: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        if bits & !hmm_core::mirror::format::DEVICE_BITS != 0 {
            return Err(BackendError::Other(format!(
                "clear_pte_bits: {bits:#x} is not a subset of A|D"
            )));
        }
        self.pt_and(locs, !(bits as u32), old)
    }

    fn launch(
        &self,
        kernel: &VulkanKernel,
        invocations: Invocations<'_>,
        args: &[u64],
    ) -> Result<SubmissionId, BackendError> {
        self.check()?;
        let mem = self.memory()?;
        if !Arc::ptr_eq(&kernel.pipeline.layouts.ctx, &self.ctx) {
            return Err(BackendError::Kernel(
                "kernel built for another device".into(),
            ));
        }
        let plan = hmm_shaders::Dispatch::plan(invocations, args, FAULT_CAP, mem.chunk_slots)?;
        let mut l = lock(&self.launches);
        let pos = l
            .free
            .iter()
            .position(|r| plan.fits(r.bitmap_bits, r.replay_cap));
        let res = match pos {
            Some(p) => l.free.swap_remove(p),
            None => {
                let (bits, cap) = plan.capacity();
                self.new_launch_res(mem, bits, cap)?
            }
        };
        let hmm_shaders::Dispatch {
            params,
            layout,
            replay: list,
            groups_x: gx,
            groups_y: gy,
        } = plan;
        // SAFETY: (all three writes) the resources are idle (fresh, or
        // returned to the free list after their submission completed), so
        // no device work reads them; every write is in bounds (sized by
        // `bitmap_bits`/`replay_cap` above).
        unsafe {
            res.params.write(0, bytemuck::bytes_of(&params));
            res.replay.write(0, bytemuck::cast_slice(list));
            let zeros = vec![0u8; layout.bytes() as usize];
            res.control.write(0, &zeros);
        }
        let pipeline = kernel.pipeline.pipeline;
        let playout = kernel.pipeline.layouts.pipeline;
        let set = res.set;
        let submitted = self.submit(res.cb, |d, cb| {
            if params.n > 0 {
                // SAFETY: recording; pipeline, layout and set are live and
                // compatible (same layouts object).
                unsafe {
                    d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, pipeline);
                    d.cmd_bind_descriptor_sets(
                        cb,
                        vk::PipelineBindPoint::COMPUTE,
                        playout,
                        0,
                        &[set],
                        &[],
                    );
                    d.cmd_dispatch(cb, gx, gy, 1);
                }
            }
        });
        let value = match submitted {
            Ok(v) => v,
            Err(e) => {
                l.free.push(res);
                return Err(e);
            }
        };
        l.in_flight.insert(
            value,
            Submission {
                res,
                layout,
                _pipeline: Arc::clone(&kernel.pipeline),
            },
        );
        drop(l);
        self.check()?;
        Ok(SubmissionId(value))
    }

    fn wait(&self, id: SubmissionId, timeout: Option<Duration>) -> Result<bool, BackendError> {
        if id.0 == 0 || id.0 > lock(&self.q).last {
            return Err(BackendError::UnknownSubmission(id));
        }
        // The timeline value of exactly this submission: reached when it
        // (and, in queue order, the work submitted before it) completed —
        // never waits for later submissions.
        self.wait_value(id.0, timeout)
    }

    fn is_complete(&self, id: SubmissionId) -> bool {
        self.counter() >= id.0
    }

    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        if !lock(&self.launches).in_flight.contains_key(&id.0) {
            return Err(BackendError::UnknownSubmission(id));
        }
        if !self.wait(id, None)? {
            return Err(BackendError::DeviceLost("launch never completed".into()));
        }
        let sub = lock(&self.launches)
            .in_flight
            .remove(&id.0)
            .ok_or(BackendError::UnknownSubmission(id))?;
        let mut words = vec![0u32; sub.layout.words() as usize];
        // SAFETY: mapped, in bounds; the submission completed (waited) and
        // ended with a HOST barrier, and nothing else writes the buffer.
        unsafe {
            sub.res
                .control
                .read(0, bytemuck::cast_slice_mut(&mut words))
        };
        let outcome = sub.layout.parse(&words);
        let cut_short = sub.layout.loop_limit_hits(&words);
        lock(&self.launches).free.push(sub.res);
        self.check()?;
        if cut_short > 0 {
            return Err(BackendError::Kernel(hmm_shaders::loop_limit_message(
                cut_short,
                self.device_name(),
            )));
        }
        Ok(outcome)
    }
}
