//! [`WgpuDevice`]: device memory, copies, launches and their outcomes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use hmm_core::mirror::backend::{
    Backend, BackendError, BackendInfo, DeviceConfig, DeviceToHost, HostToDevice, Invocations,
    LaunchOutcome, PteLoc, PteWrite, SubmissionId, READ_BACK_WITH_LAUNCH,
};
use hmm_core::mirror::format::{PoolSlot, Pte, ENTRIES, TABLE_PAGE_BYTES};
use hmm_shaders::{binding, ControlLayout, MemoryPlan, Params, POOL_BINDINGS};

use crate::errors::Shared;
use crate::kernel::WgpuKernel;
use crate::other;
use crate::ptops::PtOps;
use crate::unfilled::{poison, poison_table};

pub(crate) const PAGE: u64 = TABLE_PAGE_BYTES;
/// Fault records one launch can report (later faults still mark their
/// invocations incomplete, so they are replayed and fault again).
pub(crate) const FAULT_CAP: u32 = 1024;
/// Pages copied back per submission at most (bounds the read-back buffer).
const WRITEBACK_CHUNK: usize = 4096;

/// Memory allocated by `init`.
pub(crate) struct Memory {
    pub(crate) table: wgpu::Buffer,
    pool: Vec<wgpu::Buffer>,
    /// Some pool binding was made by wgpu, which zero-fills it on its
    /// first use (see [`WgpuDevice::unfilled_buffer`]).
    pool_filled: bool,
    /// Table pages known zero on the device, one bit each; `None` when
    /// wgpu made (and zero-fills) the whole table. A table made through
    /// `wgpu-hal` is zeroed a page at a time, by the first `write_ptes`
    /// that writes into the page ([`Memory::zero_new_table_pages`]).
    pub(crate) table_zeroed: Option<Mutex<Vec<u64>>>,
    chunk_slots: u32,
    pool_slots: u32,
    table_pages: u32,
}

/// Per-launch buffers, reused once the launch's outcome is taken.
struct LaunchRes {
    params: wgpu::Buffer,
    control: wgpu::Buffer,
    replay: wgpu::Buffer,
    readback: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    /// Invocation ids the control bitmap covers.
    bitmap_bits: u32,
    /// Entries the replay buffer holds.
    replay_cap: u32,
}

/// Read-back of the control buffer: 0 pending, 1 mapped, 2 failed.
type MapState = Arc<AtomicU8>;

struct Submission {
    index: wgpu::SubmissionIndex,
    res: LaunchRes,
    layout: ControlLayout,
    mapped: MapState,
    /// Pool slots copied into the read-back buffer after the dispatch, at
    /// `stage_offset(&layout)` ([`Backend::read_back_with_next_launch`]).
    staged: Vec<PoolSlot>,
    /// [`Staged::work`] as this submission left it: its staged pages are
    /// current only while no later device work was issued.
    work: u64,
}

/// Where the pages a launch brings back with it start in its read-back
/// buffer: after the control words, on a 256-byte boundary.
fn stage_offset(layout: &ControlLayout) -> u64 {
    layout.bytes().next_multiple_of(256)
}

/// Pages brought back with a launch
/// ([`Backend::read_back_with_next_launch`]): current until the next device
/// work that may write a slot (a launch or a `copy_to_device`).
///
/// Launches from several threads overlap: a launch may complete (and hand
/// over its staged pages) after a later launch or copy was issued, whose
/// writes its copy does not show. So every piece of device work counts
/// itself in `work`, a submission remembers the count it left, and its
/// pages are served only if that is still the count — not merely "no work
/// since the pages were handed over", which let an earlier launch's pages
/// stand in for a later launch's writes (`hmm-stress` on wgpu read stale
/// words that way).
#[derive(Default)]
struct Staged {
    /// Device work issued so far (launches and copies into slots).
    work: u64,
    /// The `work` count at which `slots`/`data` were current.
    current_at: Option<u64>,
    slots: Vec<PoolSlot>,
    /// `slots.len()` pages, in order.
    data: Vec<u8>,
}

#[derive(Default)]
struct Launches {
    next_id: u64,
    in_flight: HashMap<u64, Submission>,
    free: Vec<LaunchRes>,
}

/// A device opened through wgpu. See the [crate docs](crate).
pub struct WgpuDevice {
    /// Unique per opened device in this process.
    pub(crate) id: u64,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    name: String,
    limits: wgpu::Limits,
    pub(crate) shared: Arc<Shared>,
    /// Test hook: the next launch's submission fails validation
    /// (`provoke_launch_error`).
    pub(crate) break_next_launch: AtomicBool,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) pipeline_layout: wgpu::PipelineLayout,
    pub(crate) mem: OnceLock<Memory>,
    launches: Mutex<Launches>,
    pub(crate) pt_ops: Mutex<Option<PtOps>>,
    readback: Mutex<Option<wgpu::Buffer>>,
    /// Slots the next launch copies out with its completion.
    read_back_next: Mutex<Vec<PoolSlot>>,
    staged: Mutex<Staged>,
    /// Queue submissions made so far (launches, read-backs, entry
    /// operations): [`WgpuDevice::submissions`].
    submits: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

pub(crate) fn uniform_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl WgpuDevice {
    pub(crate) fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        name: String,
        limits: wgpu::Limits,
        shared: Arc<Shared>,
    ) -> WgpuDevice {
        let mut entries = vec![
            uniform_entry(binding::PARAMS),
            storage_entry(binding::PAGE_TABLE, false),
            storage_entry(binding::CONTROL, false),
            storage_entry(binding::REPLAY, true),
        ];
        for p in 0..POOL_BINDINGS {
            entries.push(storage_entry(binding::POOL0 + p, false));
        }
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("hmm kernel"),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("hmm kernel"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        // Relaxed: only uniqueness matters, no other memory is published.
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        WgpuDevice {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            device,
            queue,
            name,
            limits,
            shared,
            break_next_launch: AtomicBool::new(false),
            layout,
            pipeline_layout,
            mem: OnceLock::new(),
            launches: Mutex::new(Launches::default()),
            pt_ops: Mutex::new(None),
            readback: Mutex::new(None),
            read_back_next: Mutex::new(Vec::new()),
            staged: Mutex::new(Staged::default()),
            submits: AtomicU64::new(0),
        }
    }

    /// Queue submissions this device has made (launches and their
    /// replays, read-backs, page-table operations): each is a device round
    /// trip, what issue 16's per-round budget counts.
    pub fn submissions(&self) -> u64 {
        // Relaxed: a statistic.
        self.submits.load(Ordering::Relaxed)
    }

    /// Counts one queue submission.
    pub(crate) fn count_submit(&self) {
        // Relaxed: a statistic.
        self.submits.fetch_add(1, Ordering::Relaxed);
    }

    /// The adapter, in words.
    pub fn adapter_name(&self) -> &str {
        &self.name
    }

    /// Largest storage-buffer binding, in pool slots.
    fn slots_per_binding(&self) -> u32 {
        let bytes = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        (bytes / PAGE).min(u64::from(u32::MAX)) as u32
    }

    /// Whether `init` had to let wgpu make a pool binding, which wgpu
    /// zero-fills on the first submission that binds it (a cost that grows
    /// with the pool, 118 ms for 256 MiB on lavapipe); `false` when every
    /// binding came from `WgpuDevice::unfilled_buffer`. `None` before
    /// `init`.
    pub fn pool_zero_filled(&self) -> Option<bool> {
        self.mem.get().map(|m| m.pool_filled)
    }

    /// Whether `init` made the page table through `wgpu-hal`, zeroing its
    /// pages one at a time as the mirror first writes into them, instead
    /// of letting wgpu fill all of it on the first submission (16 MiB at
    /// the default 4,096 table pages, ≈ 7 ms on lavapipe). `None` before
    /// `init`.
    pub fn table_zeroed_lazily(&self) -> Option<bool> {
        self.mem.get().map(|m| m.table_zeroed.is_some())
    }

    pub(crate) fn memory(&self) -> Result<&Memory, BackendError> {
        self.mem
            .get()
            .ok_or(BackendError::NotInitialised("init has not run"))
    }

    /// Blocks until submission `index` completed (or `timeout`).
    pub(crate) fn poll_until(
        &self,
        index: Option<wgpu::SubmissionIndex>,
        timeout: Option<Duration>,
    ) -> Result<bool, BackendError> {
        match self.device.poll(wgpu::PollType::Wait {
            submission_index: index,
            timeout,
        }) {
            Ok(_) => Ok(true),
            Err(wgpu::PollError::Timeout) => Ok(false),
            Err(e) => Err(self.lose(e.to_string())),
        }
    }

    /// Maps `buf[..bytes]` for reading after `index` and waits for it.
    pub(crate) fn map_after(
        &self,
        buf: &wgpu::Buffer,
        bytes: u64,
        index: wgpu::SubmissionIndex,
    ) -> Result<(), BackendError> {
        let state: MapState = Arc::new(AtomicU8::new(0));
        let s = Arc::clone(&state);
        buf.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            // Release: pairs with the Acquire load below; the mapping is
            // usable once the flag is seen.
            s.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release);
        });
        self.poll_until(Some(index), None)?;
        // The callback runs inside poll once the submission is done; poll
        // again (without blocking) until it has.
        for _ in 0..1_000_000 {
            // Acquire: see the mapping the callback published.
            match state.load(Ordering::Acquire) {
                1 => return Ok(()),
                2 => return Err(other("mapping a read-back buffer failed")),
                _ => {
                    let _ = self.device.poll(wgpu::PollType::Poll);
                    std::thread::yield_now();
                }
            }
        }
        Err(self.lose("read-back never mapped"))
    }

    fn new_launch_res(&self, mem: &Memory, bitmap_bits: u32, replay_cap: u32) -> LaunchRes {
        let layout = ControlLayout {
            fault_cap: FAULT_CAP,
            bitmap_bits,
        };
        let params = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hmm params"),
            size: core::mem::size_of::<Params>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let control = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hmm control"),
            size: layout.bytes(),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let replay = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hmm replay"),
            size: u64::from(replay_cap.max(1)) * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hmm control read-back"),
            // The control words, then room for the pages a launch may
            // bring back with it (`read_back_with_next_launch`).
            size: stage_offset(&layout) + READ_BACK_WITH_LAUNCH as u64 * PAGE,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut entries = vec![
            wgpu::BindGroupEntry {
                binding: binding::PARAMS,
                resource: params.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: binding::PAGE_TABLE,
                resource: mem.table.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: binding::CONTROL,
                resource: control.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: binding::REPLAY,
                resource: replay.as_entire_binding(),
            },
        ];
        for (p, buf) in mem.pool.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: binding::POOL0 + p as u32,
                resource: buf.as_entire_binding(),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("hmm kernel"),
            layout: &self.layout,
            entries: &entries,
        });
        LaunchRes {
            params,
            control,
            replay,
            readback,
            bind_group,
            bitmap_bits,
            replay_cap,
        }
    }
}

impl core::fmt::Debug for WgpuDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WgpuDevice")
            .field("adapter", &self.name)
            .finish_non_exhaustive()
    }
}

/// Runs of consecutive items: `(start, len)` pairs over `0..n` where
/// `joins(i)` says item `i` continues item `i - 1`'s run.
fn runs(n: usize, joins: impl Fn(usize) -> bool) -> impl Iterator<Item = (usize, usize)> {
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

// SAFETY: copy_to_device reads exactly the 4096 bytes at each `src` during
// the call (write_buffer copies into wgpu's staging memory before it
// returns); copy_to_host writes exactly the 4096 bytes at each `dst`,
// before it returns; no other method touches host memory it was not
// handed; kernels only reach device buffers, and the library
// (hmm.wgsl) sets only ACCESSED/DIRTY, with atomicOr on an entry's low
// word (pt_ops.wgsl clears them for the host with atomicAnd).
unsafe impl Backend for WgpuDevice {
    type Kernel = WgpuKernel;

    fn info(&self) -> BackendInfo {
        BackendInfo {
            driver: "wgpu".into(),
            device: self.name.clone(),
            max_pool_slots: self.slots_per_binding().saturating_mul(POOL_BINDINGS),
        }
    }

    fn init(&self, config: DeviceConfig) -> Result<(), BackendError> {
        self.scoped("init", other, || {
            if self.mem.get().is_some() {
                return Err(BackendError::NotInitialised("init ran twice"));
            }
            let plan = MemoryPlan::new(
                config,
                self.slots_per_binding(),
                self.limits.max_storage_buffer_binding_size,
            )?;
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST;
            let table_desc = wgpu::BufferDescriptor {
                label: Some("hmm page table"),
                size: plan.table_bytes,
                usage,
                mapped_at_creation: false,
            };
            // wgpu zero-fills a buffer it makes on its first use; one made
            // through wgpu-hal starts with the root alone zeroed, and
            // each other page is zeroed when first written (`write_ptes`).
            let (table, table_zeroed) = match self.unfilled_buffer(&table_desc) {
                Some(t) => {
                    poison_table(&self.queue, &t);
                    self.queue.write_buffer(&t, 0, &[0u8; PAGE as usize]);
                    let mut bits = vec![0u64; (config.table_pages as usize).div_ceil(64)];
                    bits[0] = 1;
                    (t, Some(Mutex::new(bits)))
                }
                None => (self.device.create_buffer(&table_desc), None),
            };
            let mut pool = Vec::new();
            let mut pool_filled = false;
            for slots in plan.binding_slots {
                let desc = wgpu::BufferDescriptor {
                    label: Some("hmm pool"),
                    size: u64::from(slots) * PAGE,
                    usage,
                    mapped_at_creation: false,
                };
                pool.push(match self.unfilled_buffer(&desc) {
                    Some(b) => {
                        poison(&self.queue, &b);
                        b
                    }
                    None => {
                        pool_filled = true;
                        self.device.create_buffer(&desc)
                    }
                });
            }
            Ok(Memory {
                table,
                pool,
                pool_filled,
                table_zeroed,
                chunk_slots: plan.chunk_slots,
                pool_slots: config.pool_slots,
                table_pages: config.table_pages,
            })
        })
        .and_then(|mem| {
            // Only memory whose creation raised no error is kept, so a
            // failed init can be retried.
            *lock(&self.pt_ops) = Some(self.scoped("init", other, || Ok(PtOps::new(self)))?);
            self.mem
                .set(mem)
                .map_err(|_| BackendError::NotInitialised("init ran twice"))
        })
    }

    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError> {
        let r = self.scoped("copy_to_device", other, || {
            let mem = self.memory()?;
            if let Some(bad) = batch.iter().find(|c| c.slot.0 >= mem.pool_slots) {
                return Err(other(format!("slot {} outside the pool", bad.slot.0)));
            }
            let joins = |i: usize| {
                let (a, b) = (&batch[i - 1], &batch[i]);
                b.slot.0 == a.slot.0 + 1
                    && b.slot.0 % mem.chunk_slots != 0
                    && b.src as usize == (a.src as usize).wrapping_add(PAGE as usize)
            };
            for (start, len) in runs(batch.len(), joins) {
                let first = &batch[start];
                // SAFETY: the caller guarantees each `src` is readable for
                // 4096 bytes during this call; a run's sources are
                // consecutive pages (checked by `joins`), so the run is one
                // readable range of `len` pages. write_buffer copies it
                // before returning.
                let bytes = unsafe { core::slice::from_raw_parts(first.src, len * PAGE as usize) };
                let chunk = (first.slot.0 / mem.chunk_slots) as usize;
                let off = u64::from(first.slot.0 % mem.chunk_slots) * PAGE;
                self.queue.write_buffer(&mem.pool[chunk], off, bytes);
            }
            Ok(())
        });
        // Device work on slots: the pages staged with a launch are stale
        // from here on. Counted after the writes are queued (they run at the
        // next submission): a launch counted before this count saw them
        // queued, or is not current any more.
        lock(&self.staged).work += 1;
        r
    }

    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError> {
        self.scoped("copy_to_host", other, || {
            let mem = self.memory()?;
            if let Some(bad) = batch.iter().find(|c| c.slot.0 >= mem.pool_slots) {
                return Err(other(format!("slot {} outside the pool", bad.slot.0)));
            }
            {
                let st = lock(&self.staged);
                let at = |s: PoolSlot| st.slots.iter().position(|&x| x == s);
                let current = st.current_at == Some(st.work);
                if current && batch.iter().all(|c| at(c.slot).is_some()) {
                    for c in batch {
                        let i = at(c.slot).unwrap_or(0) * PAGE as usize;
                        let src = &st.data[i..i + PAGE as usize];
                        // SAFETY: as below: the caller guarantees `dst` is
                        // valid for writes of 4096 bytes and unaliased;
                        // `src` is 4096 bytes of the staged copy, which
                        // holds the slot's data as the last launch left it
                        // (no device work issued since: `current`).
                        unsafe {
                            core::ptr::copy_nonoverlapping(src.as_ptr(), c.dst, PAGE as usize)
                        };
                    }
                    return Ok(());
                }
            }
            let mut rb = lock(&self.readback);
            for piece in batch.chunks(WRITEBACK_CHUNK) {
                let bytes = piece.len() as u64 * PAGE;
                if rb.as_ref().is_none_or(|b| b.size() < bytes) {
                    *rb = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("hmm write-back"),
                        size: bytes.max(64 * PAGE),
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    }));
                }
                let buf = rb.as_ref().ok_or_else(|| other("no read-back buffer"))?;
                let mut enc = self.device.create_command_encoder(&Default::default());
                let joins = |i: usize| {
                    piece[i].slot.0 == piece[i - 1].slot.0 + 1
                        && piece[i].slot.0 % mem.chunk_slots != 0
                };
                for (start, len) in runs(piece.len(), joins) {
                    let s = piece[start].slot.0;
                    enc.copy_buffer_to_buffer(
                        &mem.pool[(s / mem.chunk_slots) as usize],
                        u64::from(s % mem.chunk_slots) * PAGE,
                        buf,
                        start as u64 * PAGE,
                        len as u64 * PAGE,
                    );
                }
                let index = self.queue.submit([enc.finish()]);
                self.count_submit();
                self.map_after(buf, bytes, index)?;
                {
                    let view = buf.slice(..bytes).get_mapped_range().map_err(other)?;
                    for (i, c) in piece.iter().enumerate() {
                        let src = &view[i * PAGE as usize..(i + 1) * PAGE as usize];
                        // SAFETY: the caller guarantees `dst` is valid for
                        // writes of 4096 bytes, unaliased, and not
                        // overlapping another destination; `src` is 4096
                        // bytes of mapped device memory, disjoint from host
                        // pages.
                        unsafe {
                            core::ptr::copy_nonoverlapping(src.as_ptr(), c.dst, PAGE as usize)
                        };
                    }
                }
                buf.unmap();
            }
            Ok(())
        })
    }

    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError> {
        // Only this call's own errors: an error another call raised (on
        // this thread or another) neither fails it nor skips its writes.
        self.scoped("write_ptes", other, || {
            let mem = self.memory()?;
            if let Some(bad) = batch
                .iter()
                .find(|w| w.table.0 >= mem.table_pages || usize::from(w.index) >= ENTRIES)
            {
                return Err(other(format!(
                    "entry {:?}/{} outside the table",
                    bad.table, bad.index
                )));
            }
            mem.zero_new_table_pages(&self.queue, batch);
            let pos = |w: &PteWrite| u64::from(w.table.0) * ENTRIES as u64 + u64::from(w.index);
            let joins = |i: usize| pos(&batch[i]) == pos(&batch[i - 1]) + 1;
            let mut words: Vec<u64> = Vec::new();
            for (start, len) in runs(batch.len(), joins) {
                words.clear();
                words.extend(batch[start..start + len].iter().map(|w| w.pte.0));
                // Staged now, executed before the next submission's work
                // (a submission that fails validation executes nothing and
                // leaves them staged for the next one).
                self.queue.write_buffer(
                    &mem.table,
                    pos(&batch[start]) * 8,
                    bytemuck::cast_slice(&words),
                );
            }
            Ok(())
        })
    }

    fn read_back_with_next_launch(&self, slots: &[PoolSlot]) {
        // Copied out after the next dispatch, mapped with its control
        // words: the write-back's read of these pages then costs no
        // submission of its own (issue 16: 91 of the floor's 260 µs).
        let mut next = lock(&self.read_back_next);
        next.clear();
        next.extend(slots.iter().take(READ_BACK_WITH_LAUNCH));
    }

    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError> {
        self.scoped("read_ptes", other, || self.pt_and(locs, u32::MAX, out))
    }

    fn clear_pte_bits(
        &self,
        locs: &[PteLoc],
        bits: u64,
        old: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        if bits & !hmm_core::mirror::format::DEVICE_BITS != 0 {
            return Err(other(format!(
                "clear_pte_bits: {bits:#x} is not a subset of A|D"
            )));
        }
        self.scoped("clear_pte_bits", other, || {
            self.pt_and(locs, !(bits as u32), old)
        })
    }

    fn launch(
        &self,
        kernel: &WgpuKernel,
        invocations: Invocations<'_>,
        args: &[u64],
    ) -> Result<SubmissionId, BackendError> {
        self.alive()?;
        // An error no call owns is reported here, before anything is
        // submitted (see `errors.rs`).
        self.take_uncaptured()?;
        let mem = self.memory()?;
        if kernel.device_id != self.id {
            return Err(BackendError::Kernel(
                "kernel was built for another wgpu device".into(),
            ));
        }
        let plan = hmm_shaders::Dispatch::plan(invocations, args, FAULT_CAP, mem.chunk_slots)?;
        let mut stage: Vec<PoolSlot> = std::mem::take(&mut *lock(&self.read_back_next));
        stage.retain(|s| s.0 < mem.pool_slots);
        stage.truncate(READ_BACK_WITH_LAUNCH);
        let mut l = lock(&self.launches);
        // New device work: whatever was staged with an earlier launch may
        // be stale; this launch stages what was asked for it. Counted with
        // the launch lock held, which is held until the submission: launches
        // count in the order they execute.
        let work = {
            let mut st = lock(&self.staged);
            st.work += 1;
            st.work
        };
        // Phase 1, in its own scopes: upload the parameters and record the
        // commands. An error here submits nothing.
        let (res, layout, commands, doomed) =
            self.scoped("launch", BackendError::Kernel, || {
                let pos = l
                    .free
                    .iter()
                    .position(|r| plan.fits(r.bitmap_bits, r.replay_cap));
                let res = match pos {
                    Some(p) => l.free.swap_remove(p),
                    None => {
                        let (bits, cap) = plan.capacity();
                        self.new_launch_res(mem, bits, cap)
                    }
                };
                let hmm_shaders::Dispatch {
                    params,
                    layout,
                    replay: list,
                    groups_x: gx,
                    groups_y: gy,
                } = &plan;
                self.queue
                    .write_buffer(&res.params, 0, bytemuck::bytes_of(params));
                if !list.is_empty() {
                    self.queue
                        .write_buffer(&res.replay, 0, bytemuck::cast_slice(list));
                }
                let mut enc = self.device.create_command_encoder(&Default::default());
                enc.clear_buffer(&res.control, 0, Some(layout.bytes()));
                if params.n > 0 {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&kernel.pipeline);
                    pass.set_bind_group(0, &res.bind_group, &[]);
                    pass.dispatch_workgroups(*gx, *gy, 1);
                }
                enc.copy_buffer_to_buffer(&res.control, 0, &res.readback, 0, layout.bytes());
                let off = stage_offset(layout);
                for (i, s) in stage.iter().enumerate() {
                    enc.copy_buffer_to_buffer(
                        &mem.pool[(s.0 / mem.chunk_slots) as usize],
                        u64::from(s.0 % mem.chunk_slots) * PAGE,
                        &res.readback,
                        off + i as u64 * PAGE,
                        PAGE,
                    );
                }
                // Relaxed: a test hook's flag, no data published with it.
                let doomed = self
                    .break_next_launch
                    .swap(false, Ordering::Relaxed)
                    .then(|| {
                        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some("hmm destroyed before submission (test hook)"),
                            size: 256,
                            usage: wgpu::BufferUsages::COPY_DST,
                            mapped_at_creation: false,
                        });
                        enc.clear_buffer(&b, 0, None);
                        b
                    });
                Ok((res, *layout, enc.finish(), doomed))
            })?;
        if let Some(b) = doomed {
            // Test hook: the submission below now fails validation.
            b.destroy();
        }
        // Phase 2, in its own scopes: submit and map the read-back.
        let mut submitted = None;
        let mapped: MapState = Arc::new(AtomicU8::new(0));
        let queued = self.scoped("launch", BackendError::Kernel, || {
            let index = self.queue.submit([commands]);
            self.count_submit();
            submitted = Some(index.clone());
            let m = Arc::clone(&mapped);
            let mapped_len = if stage.is_empty() {
                layout.bytes()
            } else {
                stage_offset(&layout) + stage.len() as u64 * PAGE
            };
            res.readback
                .slice(..mapped_len)
                .map_async(wgpu::MapMode::Read, move |r| {
                    // Release: pairs with the Acquire loads in `done`.
                    m.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release);
                });
            Ok(index)
        });
        let index = match queued {
            Ok(index) => index,
            Err(e) => {
                // A failed launch leaves nothing running: whatever of it
                // was queued completes before the error is returned. Its
                // resources are dropped (their read-back may be mapped).
                if let (Some(index), Ok(())) = (submitted, self.alive()) {
                    // A submission that failed validation executed nothing
                    // and its index is not waitable (`WrongSubmissionIndex`);
                    // that is not a lost device.
                    let _ = self.device.poll(wgpu::PollType::Wait {
                        submission_index: Some(index),
                        timeout: None,
                    });
                }
                return Err(e);
            }
        };
        l.next_id += 1;
        let id = l.next_id;
        l.in_flight.insert(
            id,
            Submission {
                index,
                res,
                layout,
                mapped,
                staged: stage,
                work,
            },
        );
        Ok(SubmissionId(id))
    }

    fn wait(&self, id: SubmissionId, timeout: Option<Duration>) -> Result<bool, BackendError> {
        self.alive()?;
        let (index, mapped) = {
            let l = lock(&self.launches);
            match l.in_flight.get(&id.0) {
                Some(s) => (s.index.clone(), Arc::clone(&s.mapped)),
                None if id.0 <= l.next_id => return Ok(true), // outcome already taken
                None => return Err(BackendError::UnknownSubmission(id)),
            }
        };
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        if !self.poll_until(Some(index), timeout)? {
            return Ok(false);
        }
        // The read-back callback fires from a poll after completion.
        // Acquire: pairs with the callback's Release store.
        while mapped.load(Ordering::Acquire) == 0 {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(false);
            }
            let _ = self.device.poll(wgpu::PollType::Poll);
            std::thread::yield_now();
        }
        self.alive()?;
        Ok(true)
    }

    fn is_complete(&self, id: SubmissionId) -> bool {
        let _ = self.device.poll(wgpu::PollType::Poll);
        let l = lock(&self.launches);
        match l.in_flight.get(&id.0) {
            // Acquire: pairs with the callback's Release store.
            Some(s) => s.mapped.load(Ordering::Acquire) != 0,
            None => id.0 <= l.next_id,
        }
    }

    fn max_invocations(&self) -> u32 {
        // The incomplete bitmap (after the fault records) is one storage
        // binding of the control buffer.
        hmm_shaders::max_invocations(
            FAULT_CAP,
            self.limits
                .max_storage_buffer_binding_size
                .min(self.limits.max_buffer_size),
        )
    }

    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        if !self.wait(id, None)? {
            return Err(self.lose("launch never completed"));
        }
        self.scoped("take_outcome", other, || {
            let sub = lock(&self.launches)
                .in_flight
                .remove(&id.0)
                .ok_or(BackendError::UnknownSubmission(id))?;
            // Acquire: pairs with the callback's Release store.
            if sub.mapped.load(Ordering::Acquire) != 1 {
                return Err(self.lose("control read-back failed"));
            }
            let outcome = {
                let view = sub
                    .res
                    .readback
                    .slice(..sub.layout.bytes())
                    .get_mapped_range()
                    .map_err(other)?;
                let words: &[u32] = bytemuck::cast_slice(&view);
                (sub.layout.parse(words), sub.layout.loop_limit_hits(words))
            };
            if !sub.staged.is_empty() {
                let off = stage_offset(&sub.layout);
                let end = off + sub.staged.len() as u64 * PAGE;
                let view = sub
                    .res
                    .readback
                    .slice(off..end)
                    .get_mapped_range()
                    .map_err(other)?;
                let mut st = lock(&self.staged);
                // Only if nothing was issued after this launch: later work
                // may have written the pages since they were copied out.
                if st.work == sub.work {
                    st.data.clear();
                    st.data.extend_from_slice(&view);
                    st.slots.clone_from(&sub.staged);
                    st.current_at = Some(sub.work);
                }
            }
            sub.res.readback.unmap();
            lock(&self.launches).free.push(sub.res);
            let (outcome, cut_short) = outcome;
            if cut_short > 0 {
                return Err(BackendError::Kernel(hmm_shaders::loop_limit_message(
                    cut_short, &self.name,
                )));
            }
            Ok(outcome)
        })
    }
}
