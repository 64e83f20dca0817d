//! [`VulkanDevice`]: memory, submissions, launches and their outcomes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ash::vk;
use hmm_core::mirror::backend::{
    Backend, BackendError, BackendInfo, DeviceConfig, DeviceToHost, HostToDevice, HostWindows,
    Invocations, LaunchOutcome, PteLoc, PteWrite, SubmissionId,
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

mod sets;
mod submit;
mod windows;

use sets::pool_bindings;
pub(crate) use sets::{one_set, write_set, write_set_from};

use windows::Windows;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Memory allocated by `init`.
pub(crate) struct Memory {
    pub(crate) table: Buffer,
    /// Copy mode: the pool's bindings. Zero-copy mode: empty.
    pub(crate) pool: Vec<Buffer>,
    /// Zero-copy mode: what an unbound window's binding points at (one
    /// page, never reached: no entry names an unbound window).
    pub(crate) dummy: Option<Buffer>,
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
    /// Zero-copy mode's host windows (empty in copy mode). Lock order:
    /// `launches`, then `windows`, then the queue.
    windows: Mutex<Windows>,
    /// Why the device was lost, once a call saw `ERROR_DEVICE_LOST` (or
    /// a wait that never ends): every later call fails with it.
    pub(crate) lost: Mutex<Option<String>>,
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
        let pool_bindings = pool_bindings(&ctx);
        let layouts = Layouts::new(&ctx, binding::POOL0 + pool_bindings);
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
            windows: Mutex::new(Windows::default()),
            lost: Mutex::new(None),
        };
        if let Some(zc) = &dev.ctx.zero_copy {
            let mut w = lock(&dev.windows);
            w.bound = (0..zc.windows.count).map(|_| None).collect();
            w.last_use = vec![0; zc.windows.count as usize];
        }
        Ok(dev)
    }

    /// Pool bindings of this device's kernels: [`POOL_BINDINGS`] in copy
    /// mode, one per host window in zero-copy mode.
    pub fn pool_bindings(&self) -> u32 {
        pool_bindings(&self.ctx)
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
    /// when the device supports the extension (probed, whatever the mode):
    /// in zero-copy mode, the alignment a window's address and length
    /// need ([`Backend::bind_window`]).
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
    /// which drivers ignore) outside every `Backend` call, so a test can
    /// check that the messenger records errors and that an error no call
    /// owns is returned by the next `launch` only. Not part of the API.
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

    /// Zero-copy mode has no pool to copy to or from.
    fn refuse_copy_in_zero_copy(&self, what: &str) -> Result<(), BackendError> {
        if self.ctx.zero_copy.is_some() {
            return Err(BackendError::Unsupported(format!(
                "{what}: zero-copy mode has no pool (the device reads the host's own pages)"
            )));
        }
        Ok(())
    }
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
        {
            // The device is idle: no submission names any window's buffer.
            let mut w = lock(&self.windows);
            w.retired.clear();
            w.bound.clear();
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
            let errs = v.take_uncaptured();
            if !errs.is_empty() && !std::thread::panicking() {
                panic!(
                    "Vulkan validation reported {} unreturned error(s): {}",
                    errs.len(),
                    errs.join("; ")
                );
            }
        }
    }
}

// SAFETY: copy_to_device reads exactly the 4096 bytes at each `src`, with
// a memcpy into mapped or staging memory before it returns; copy_to_host
// writes exactly the 4096 bytes at each `dst`, before it returns; no other
// method touches host memory it was not handed; in copy mode kernels only
// reach device buffers. In zero-copy mode a kernel reaches host memory
// only through window bindings: binding `w` is window `w`'s import (exactly
// the range bind_window was handed) or a device-side dummy, selected by an
// entry's slot / chunk_slots (the window size in pages), with indices clamped (`Restrict`) to the binding;
// an unbound window's import stays alive only until the submissions whose
// descriptor sets still name it complete, and those do not reach it (the
// core unbinds only windows no submitted work reaches through an entry).
// The library (hmm.wgsl) sets only ACCESSED/DIRTY, with atomicOr on an
// entry's low word (pt_ops.wgsl clears them for the host with atomicAnd).
unsafe impl Backend for VulkanDevice {
    type Kernel = VulkanKernel;

    fn info(&self) -> BackendInfo {
        let (sb, srb) = self.ctx.sparse;
        let (mode, max_pool_slots) = match &self.ctx.zero_copy {
            Some(zc) => (
                format!(
                    "ZeroCopy mode ({} host windows of {} pages, import alignment {} bytes)",
                    zc.windows.count, zc.windows.pages, zc.align
                ),
                zc.windows.count.saturating_mul(zc.windows.pages),
            ),
            None => (
                format!("{:?} mode", self.ctx.mode),
                self.slots_per_binding().saturating_mul(POOL_BINDINGS),
            ),
        };
        BackendInfo {
            driver: "vulkan".into(),
            device: format!(
                "{}; {mode}; sparse binding {}, sparse residency buffer {} (unused)",
                self.ctx.name,
                if sb { "yes" } else { "no" },
                if srb { "yes" } else { "no" }
            ),
            max_pool_slots,
        }
    }

    fn host_windows(&self) -> Option<HostWindows> {
        self.ctx.zero_copy.as_ref().map(|z| z.windows)
    }

    fn init(&self, config: DeviceConfig) -> Result<(), BackendError> {
        self.scoped(|| {
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
            let mut dummy = None;
            let mut chunk_slots = plan.chunk_slots;
            if let Some(zc) = &self.ctx.zero_copy {
                // No pool: leaf entries name window pages. Only the dummy
                // that unbound windows' bindings point at.
                if config.pool_slots != 0 {
                    return Err(BackendError::Unsupported(format!(
                        "zero-copy mode has no pool (init with pool_slots 0, not {})",
                        config.pool_slots
                    )));
                }
                let b = Buffer::new(&self.ctx, PAGE, usage, Placement::Device)?;
                self.clear_unmapped(&b)?;
                dummy = Some(b);
                chunk_slots = zc.windows.pages;
            } else {
                for slots in plan.binding_slots {
                    let b =
                        Buffer::new(&self.ctx, u64::from(slots) * PAGE, usage, Placement::Device)?;
                    self.clear_unmapped(&b)?;
                    pool.push(b);
                }
            }
            let mem = Memory {
                table,
                pool,
                dummy,
                chunk_slots,
                pool_slots: config.pool_slots,
                table_pages: config.table_pages,
            };
            self.mem
                .set(mem)
                .map_err(|_| BackendError::NotInitialised("init ran twice"))?;
            *lock(&self.pt_ops) = Some(PtOps::new(self)?);
            Ok(())
        })
    }

    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError> {
        self.scoped(|| {
            self.refuse_copy_in_zero_copy("copy_to_device")?;
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
            Ok(())
        })
    }

    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError> {
        self.scoped(|| {
            self.refuse_copy_in_zero_copy("copy_to_host")?;
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
                return Ok(());
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
            Ok(())
        })
    }

    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError> {
        self.scoped(|| {
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
            Ok(())
        })
    }

    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError> {
        self.scoped(|| self.pt_and(locs, u32::MAX, out))
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
        self.scoped(|| self.pt_and(locs, !(bits as u32), old))
    }

    fn launch(
        &self,
        kernel: &VulkanKernel,
        invocations: Invocations<'_>,
        args: &[u64],
    ) -> Result<SubmissionId, BackendError> {
        self.alive()?;
        // A validation message no call owns is reported here, before
        // anything is submitted (see `validation.rs`).
        self.take_uncaptured()?;
        let mut queued = None;
        let (r, msgs) = self.captured(|| {
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
                res.replay.write(0, bytemuck::cast_slice(&list));
                let zeros = vec![0u8; layout.bytes() as usize];
                res.control.write(0, &zeros);
            }
            let pipeline = kernel.pipeline.pipeline;
            let playout = kernel.pipeline.layouts.pipeline;
            let set = res.set;
            // Zero-copy: point the window bindings at the window table of the
            // moment, and hold it (no bind or unbind) until the submission is
            // queued and every window it names records that submission.
            let mut windows = mem.dummy.as_ref().map(|dummy| {
                let mut w = lock(&self.windows);
                self.reap(&mut w);
                let bufs = Self::window_buffers(&w, dummy.buf);
                write_set_from(&self.ctx.device, set, binding::POOL0, &bufs);
                w
            });
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
            queued = Some(value);
            if let Some(w) = windows.as_mut() {
                let Windows {
                    bound, last_use, ..
                } = &mut **w;
                for (b, last) in bound.iter().zip(last_use.iter_mut()) {
                    if b.is_some() {
                        *last = value;
                    }
                }
            }
            drop(windows);
            l.in_flight.insert(
                value,
                Submission {
                    res,
                    layout,
                    _pipeline: Arc::clone(&kernel.pipeline),
                },
            );
            drop(l);
            Ok(SubmissionId(value))
        });
        let r = self.conclude(r, &msgs);
        if let (Err(_), Some(value)) = (&r, queued) {
            // Queued, yet failed (its submission raised a validation
            // message): a failed launch leaves nothing running, so wait for
            // it, then recycle its resources.
            if let Ok(true) = self.wait_value(value, None).map_err(|e| self.latch(e)) {
                let mut l = lock(&self.launches);
                if let Some(sub) = l.in_flight.remove(&value) {
                    l.free.push(sub.res);
                }
            }
        }
        r
    }

    fn wait(&self, id: SubmissionId, timeout: Option<Duration>) -> Result<bool, BackendError> {
        self.alive()?;
        if id.0 == 0 || id.0 > lock(&self.q).last {
            return Err(BackendError::UnknownSubmission(id));
        }
        // The timeline value of exactly this submission: reached when it
        // (and, in queue order, the work submitted before it) completed —
        // never waits for later submissions.
        self.wait_value(id.0, timeout).map_err(|e| self.latch(e))
    }

    fn is_complete(&self, id: SubmissionId) -> bool {
        self.counter() >= id.0
    }

    fn max_invocations(&self) -> u32 {
        // The incomplete bitmap (after the fault records) is one storage
        // binding of the control buffer.
        hmm_shaders::max_invocations(
            FAULT_CAP,
            u64::from(self.ctx.limits.max_storage_buffer_range),
        )
    }

    unsafe fn bind_window(
        &self,
        window: u32,
        addr: *mut u8,
        len: usize,
    ) -> Result<(), BackendError> {
        self.scoped(|| {
            let Some(zc) = &self.ctx.zero_copy else {
                return Err(BackendError::Unsupported(
                    "bind_window: this device is in copy mode (no host windows)".into(),
                ));
            };
            let HostWindows { count, pages } = zc.windows;
            if window >= count {
                return Err(BackendError::Other(format!(
                    "bind_window: window {window} outside 0..{count}"
                )));
            }
            let max = u64::from(pages) * PAGE;
            if len == 0 || len as u64 > max {
                return Err(BackendError::Other(format!(
                    "bind_window: {len} bytes; a window holds 1 to {max}"
                )));
            }
            if !(addr as u64).is_multiple_of(zc.align) || !(len as u64).is_multiple_of(zc.align) {
                return Err(BackendError::Other(format!(
                    "bind_window: {addr:p} + {len:#x} is not aligned to the device's \
                 minImportedHostPointerAlignment ({} bytes)",
                    zc.align
                )));
            }
            let mut w = lock(&self.windows);
            self.reap(&mut w);
            if w.bound[window as usize].is_some() {
                return Err(BackendError::Other(format!(
                    "bind_window: window {window} is already bound"
                )));
            }
            // A validation error raised by the import: reported with the
            // window left unbound (the trait: an `Err` leaves it unbound;
            // keeping the import would make every later bind of the window
            // fail with "already bound") — `conclude` drops the import. No
            // submission has named it yet.
            let (imported, msgs) = self.captured(|| self.import(zc, addr, len as u64));
            let imported = self.conclude(imported, &msgs)?;
            w.bound[window as usize] = Some(imported);
            // Launches before this one named the dummy in this binding.
            w.last_use[window as usize] = 0;
            Ok(())
        })
    }

    fn unbind_window(&self, window: u32) -> Result<(), BackendError> {
        // The unbind happens whatever else is the case — a lost device
        // included (checked after it): a window the caller believes
        // unbound must be unreachable (the trait's safety contract).
        let (r, msgs) = self.captured(|| {
            let Some(zc) = &self.ctx.zero_copy else {
                return Ok(()); // copy mode: nothing is ever bound
            };
            if window >= zc.windows.count {
                return Err(BackendError::Other(format!(
                    "unbind_window: window {window} outside 0..{}",
                    zc.windows.count
                )));
            }
            let mut w = lock(&self.windows);
            if let Some(old) = w.bound[window as usize].take() {
                let last = w.last_use[window as usize];
                w.last_use[window as usize] = 0;
                if last > self.counter() {
                    // A submission's descriptor set still names the buffer
                    // (without reaching it: the caller's promise); destroy it
                    // once that submission completed.
                    w.retired.push((last, old));
                }
                // else: dropped here, releasing the import.
            }
            self.reap(&mut w);
            drop(w);
            Ok(())
        });
        self.alive()?;
        self.conclude(r, &msgs)
    }

    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        self.scoped(|| {
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
            if cut_short > 0 {
                return Err(BackendError::Kernel(hmm_shaders::loop_limit_message(
                    cut_short,
                    self.device_name(),
                )));
            }
            Ok(outcome)
        })
    }
}
