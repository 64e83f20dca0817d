//! [`CpuDevice`]: the [`Backend`] implementation.

use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use core::time::Duration;
use std::sync::{Arc, Mutex, OnceLock};

use hmm_core::mirror::backend::{
    Backend, BackendError, BackendInfo, DeviceConfig, DeviceToHost, HostToDevice, HostWindows,
    Invocations, LaunchOutcome, PteLoc, PteWrite, RawFaultRecord, SubmissionId,
};
use hmm_core::mirror::format::{PoolSlot, Pte, DEVICE_BITS};

use crate::exec::{lock, CpuKernel, Hooks, Job, LaunchSpec, Submissions, Workers};
use crate::faults::Call;
#[cfg(feature = "fault-injection")]
use crate::faults::{DeviceLeaf, FaultInjector};
use crate::memory::Memory;

/// Largest pool the entry format lets [`CpuDevice`] address: 2^32 − 2
/// slots (16 TiB; a slot is a `u32` and `u32::MAX` stays free as a
/// sentinel). The emulated MMU reads whole 64-bit entries, so nothing ties
/// a slot to the low word. What a device reports
/// ([`BackendInfo::max_pool_slots`]) is the smaller of this and the host's
/// physical memory ([`host_pool_slots`]): the pool is host memory, and a
/// pool larger than the host only swaps. Asking for more than the host
/// can allocate is a typed `BackendError::OutOfMemory`, never an abort.
pub const MAX_POOL_SLOTS: u32 = u32::MAX - 1;

/// The largest pool this host can hold: its physical memory in 4 KiB
/// slots (`sysconf(_SC_PHYS_PAGES)` scaled to 4 KiB), at most
/// [`MAX_POOL_SLOTS`].
pub fn host_pool_slots() -> u32 {
    // SAFETY: sysconf reads a system constant; no memory is touched.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || size <= 0 {
        return MAX_POOL_SLOTS;
    }
    let slots = (pages as u64).saturating_mul(size as u64) / 4096;
    slots.min(u64::from(MAX_POOL_SLOTS)) as u32
}

/// The software device: pool and page table in host memory, kernels run
/// on a pool of worker threads through an emulated MMU.
pub struct CpuDevice {
    threads: usize,
    mem: OnceLock<Arc<Memory>>,
    init_lock: Mutex<()>,
    workers: Mutex<Option<Workers>>,
    subs: Arc<Submissions>,
    hooks: Mutex<Hooks>,
    cancel: Arc<AtomicBool>,
    resident: bool,
    /// What `rounds_are_costly` says (`with_costly_rounds`).
    costly: bool,
    /// Zero-copy mode: the number of host windows.
    windows: Option<u32>,
    /// Test hooks that fail calls on demand.
    #[cfg(feature = "fault-injection")]
    faults: FaultInjector,
}

/// Host windows a zero-copy [`CpuDevice`] offers.
pub const ZERO_COPY_WINDOWS: u32 = 64;
/// Pages per host window (32 MiB: a zero-copy region is the mapping clipped to one such aligned block).
pub const WINDOW_PAGES: u32 = 8192;

impl Default for CpuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CpuDevice")
            .field("threads", &self.threads)
            .field("initialised", &self.mem.get().is_some())
            .finish_non_exhaustive()
    }
}

impl CpuDevice {
    /// A device with one worker per available hardware thread.
    pub fn new() -> Self {
        Self::with_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// A device with `n` worker threads (at least 1). Threads start in
    /// [`Backend::init`].
    pub fn with_threads(n: usize) -> Self {
        let cancel = Arc::new(AtomicBool::new(false));
        CpuDevice {
            threads: n.max(1),
            mem: OnceLock::new(),
            init_lock: Mutex::new(()),
            workers: Mutex::new(None),
            subs: Arc::new(Submissions::new()),
            hooks: Mutex::new(Hooks::default()),
            #[cfg(feature = "fault-injection")]
            faults: FaultInjector::new(Arc::clone(&cancel)),
            cancel,
            resident: false,
            costly: false,
            windows: None,
        }
    }

    /// Zero-copy mode: the device has no pool, and its kernels read and
    /// write the CPU's own pages through [`ZERO_COPY_WINDOWS`] host windows
    /// of [`WINDOW_PAGES`] pages
    /// ([`Backend::host_windows`]) — HMM's true mirror, as a GPU importing
    /// host memory (`VK_EXT_external_memory_host`) does it. The mirror
    /// then copies nothing and writes nothing back.
    ///
    /// # Safety
    ///
    /// Kernels dereference host memory directly, on this process's worker
    /// threads. While a launch runs, the caller must ensure that memory
    /// the launch may touch is **not unmapped** (an unmap is reported to
    /// the mirror only after it happened; the next access would fault the
    /// process) and **not accessed non-atomically by other threads** (the
    /// device's word accesses are atomic; a plain concurrent access to the
    /// same bytes would be a data race). This is CUDA's `cudaHostRegister`
    /// rule. Between launches, unmaps, remaps, `MADV_DONTNEED` and writes
    /// are fine (invalidated as in copy mode); narrowing the protection
    /// of mirrored memory (`mprotect`) produces no kernel event, so it
    /// needs an explicit `EventKind::Protection` invalidation of the range
    /// before the next launch, or that launch's accesses fault the
    /// process.
    pub unsafe fn zero_copy(mut self) -> Self {
        self.windows = Some(ZERO_COPY_WINDOWS);
        self
    }

    /// Whether the device is in zero-copy mode.
    pub fn is_zero_copy(&self) -> bool {
        self.windows.is_some()
    }

    /// Makes [`Backend::init`] touch every pool page, so the pool is
    /// resident from the start, like a GPU's device memory. By default the
    /// pool comes from `calloc`/`mmap` and each slot's first use costs a
    /// host page fault — which a benchmark would otherwise charge to
    /// whichever strategy copies more pages (`hmm-bench` asks for this).
    pub fn with_resident_pool(mut self) -> Self {
        self.resident = true;
        self
    }

    /// Makes [`Backend::rounds_are_costly`] say `true`, as a GPU driver
    /// does, so the core takes the paths it takes for a device whose
    /// rounds cost a submission and a read-back (the adaptive fetch policy
    /// under `FetchPolicy::Auto`; small write-backs compared with their
    /// twins rather than asking for dirty bits). For tests and for
    /// comparing those paths on the host; by default the cpu driver's
    /// rounds are function calls and it says `false`.
    pub fn with_costly_rounds(mut self) -> Self {
        self.costly = true;
        self
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The device's fault buffer holds at most `records` records per
    /// launch (`None`: the default, 65,536). Invocations whose record did
    /// not fit are still listed in [`LaunchOutcome::incomplete`] and fault
    /// again on replay; the records kept are those of the lowest
    /// invocations, ascending. Applies to later launches.
    pub fn set_fault_buffer_capacity(&self, records: Option<usize>) {
        lock(&self.hooks).capacity = records;
    }

    /// Fault injection: every reported fault record passes through `f`
    /// first, so a test can make the device "write garbage" (unknown flags,
    /// wrong invocation, wild address). Applies to later launches. A
    /// mangler that panics makes `take_outcome` fail with
    /// [`BackendError::Other`].
    pub fn set_fault_record_mangler<F>(&self, f: F)
    where
        F: Fn(&mut RawFaultRecord) + Send + Sync + 'static,
    {
        lock(&self.hooks).mangler = Some(Arc::new(f));
    }

    /// Removes the fault-record mangler.
    pub fn clear_fault_record_mangler(&self) {
        lock(&self.hooks).mangler = None;
    }

    fn memory(&self) -> Result<&Arc<Memory>, BackendError> {
        self.mem
            .get()
            .ok_or(BackendError::NotInitialised("init has not run"))
    }

    /// Testing only (feature `fault-injection`): the handle that makes
    /// this device's calls fail on demand ([`FaultInjector`]). Every call
    /// returns a handle to the same settings.
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> FaultInjector {
        self.faults.clone()
    }

    /// Testing only (feature `fault-injection`): every valid leaf entry of
    /// the *device's* page table that its MMU can reach from the root, in
    /// table order — what device work can translate now, read from the
    /// device-side table rather than the core's shadow. Empty before
    /// [`Backend::init`].
    #[cfg(feature = "fault-injection")]
    pub fn device_leaf_entries(&self) -> Vec<DeviceLeaf> {
        self.mem
            .get()
            .map(|m| crate::faults::leaf_entries(m))
            .unwrap_or_default()
    }

    /// Testing only (feature `fault-injection`): the reachable leaf entries
    /// of the device's page table that name `slot`
    /// ([`CpuDevice::device_leaf_entries`] filtered), so a test can prove
    /// that no entry names a slot the core freed.
    #[cfg(feature = "fault-injection")]
    pub fn entries_naming(&self, slot: PoolSlot) -> Vec<DeviceLeaf> {
        let mut v = self.device_leaf_entries();
        v.retain(|l| l.pte.index() == u64::from(slot.0));
        v
    }

    /// Fault injection: fails with `DeviceLost` once the device was lost.
    #[cfg(feature = "fault-injection")]
    fn alive(&self) -> Result<(), BackendError> {
        match self.faults.lost() {
            Some(why) => Err(BackendError::DeviceLost(why)),
            None => Ok(()),
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    #[inline(always)]
    fn alive(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Fault injection: how many of the `len` items of this `call` to
    /// apply, and the error to return after applying them. Without the
    /// feature: all of them, and none.
    #[cfg(feature = "fault-injection")]
    fn inject(&self, call: Call, len: usize) -> (usize, Option<BackendError>) {
        match self.faults.decide(call, len) {
            Some(i) => (i.apply, Some(i.error)),
            None => (len, None),
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    #[inline(always)]
    fn inject(&self, _call: Call, len: usize) -> (usize, Option<BackendError>) {
        (len, None)
    }
}

/// `Ok(())`, or the injected error.
fn result(injected: Option<BackendError>) -> Result<(), BackendError> {
    injected.map_or(Ok(()), Err)
}

impl Drop for CpuDevice {
    fn drop(&mut self) {
        // Queued invocations are skipped (their launches end with
        // `DeviceLost`); running invocations finish; then the workers exit
        // and are joined.
        self.cancel.store(true, Relaxed);
        if let Some(mut w) = lock(&self.workers).take() {
            w.shutdown();
        }
    }
}

// SAFETY: the `Backend` promises hold:
// - `copy_to_host` writes host memory only through `DeviceToHost::dst`, 4096
//   bytes each, before returning (`Memory::copy_out`);
// - `copy_to_device` reads host memory only through `HostToDevice::src`,
//   4096 bytes each, before returning (`Memory::copy_in`);
// - no other method touches host memory it was not handed, and device work
//   (kernels through `Lane`) only reaches the pool and page-table buffers
//   owned by this device: the `Lane` API has no way to reach host memory
//   (a kernel closure may of course touch what it captured — that is the
//   kernel author's Rust code, checked by the Rust compiler, not the device);
// - device work changes entries only with `fetch_or(ACCESSED)` and
//   `fetch_or(ACCESSED | DIRTY)` (`Lane::check_leaf`, `Lane::commit`,
//   `Lane::rmw`); `ACCESSED`/`DIRTY` live in the low word, and a 64-bit OR of
//   low-word bits is an OR on the low word;
// - `host_slot` points into the pool, allocated once by `init` and freed
//   only when the device drops, 4096 bytes per in-range slot, writable
//   through the atomics' `UnsafeCell`s; nothing but the core (under the
//   copy contracts) and device work touches the pool;
// - zero-copy mode: device work reaches host memory only through a bound
//   window (`Memory::word` after `Memory::slot_valid`), within the pages it
//   was bound to, through entries naming its slots; `unbind_window` clears
//   the length, so no launch queued afterwards passes `slot_valid` for it.
unsafe impl Backend for CpuDevice {
    type Kernel = CpuKernel;

    fn info(&self) -> BackendInfo {
        BackendInfo {
            driver: "cpu".into(),
            device: format!(
                "software MMU on {} host threads{}",
                self.threads,
                if self.windows.is_some() {
                    ", zero-copy"
                } else {
                    ""
                }
            ),
            max_pool_slots: host_pool_slots(),
        }
    }

    fn host_windows(&self) -> Option<HostWindows> {
        self.windows.map(|count| HostWindows {
            count,
            pages: WINDOW_PAGES,
        })
    }

    unsafe fn bind_window(
        &self,
        window: u32,
        addr: *mut u8,
        len: usize,
    ) -> Result<(), BackendError> {
        self.alive()?;
        let mem = self.memory()?;
        let Some(win) = &mem.windows else {
            return Err(BackendError::Unsupported(
                "bind_window on a copy-mode device".into(),
            ));
        };
        let page = crate::memory::PAGE;
        let pages = len / page;
        if window as usize >= win.base.len()
            || !(addr as usize).is_multiple_of(page)
            || !len.is_multiple_of(page)
            || pages == 0
            || pages > WINDOW_PAGES as usize
        {
            return Err(BackendError::Other(format!(
                "bad window binding: window {window} of {}, {len} bytes at {addr:p}",
                win.base.len()
            )));
        }
        // Acquire: pairs with the Release store below of an earlier bind.
        if win.len_pages[window as usize].load(Acquire) != 0
            || win.held[window as usize].load(Acquire)
        {
            return Err(BackendError::Other(format!("window {window} is bound")));
        }
        // A failed bind binds nothing (the trait's rule), whatever the
        // injector's `Applied` says.
        if let (_, Some(e)) = self.inject(Call::BindWindow, 1) {
            return Err(e);
        }
        // Relaxed: published by the Release store of the length below.
        win.base[window as usize].store(addr as usize, Relaxed);
        // Release: a lane that sees the length (Acquire in `slot_valid`) sees the base.
        win.len_pages[window as usize].store(pages as u32, Release);
        Ok(())
    }

    fn unbind_window(&self, window: u32) -> Result<(), BackendError> {
        let mem = self.memory()?;
        // The window becomes unreachable first, whatever else happens (the
        // trait's safety contract), lost device and injected failure
        // included.
        let Some(win) = mem.windows.as_ref() else {
            return self.alive();
        };
        let Some(n) = win.len_pages.get(window as usize) else {
            return self.alive();
        };
        // Release: no device work runs (the core's contract); orders the
        // unbind before the next launch's jobs are queued.
        n.store(0, Release);
        self.alive()?;
        let (released, injected) = self.inject(Call::UnbindWindow, 1);
        // Release: pairs with the Acquire load in `bind_window`. An
        // injected failure that applies nothing leaves the window held
        // (unreachable, but not bindable until an unbind succeeds).
        win.held[window as usize].store(released == 0, Release);
        result(injected)
    }

    fn init(&self, config: DeviceConfig) -> Result<(), BackendError> {
        self.alive()?;
        let _guard = lock(&self.init_lock);
        if self.mem.get().is_some() {
            return Err(BackendError::NotInitialised("init ran twice"));
        }
        let mut mem = Memory::new(config, host_pool_slots())?;
        if let Some(count) = self.windows {
            mem.windows = Some(crate::memory::Windows::new(count, WINDOW_PAGES));
        }
        if self.resident {
            mem.touch_pool();
        }
        let workers = Workers::spawn(self.threads)?;
        *lock(&self.workers) = Some(workers);
        // Cannot fail: `init_lock` is held and `mem` was checked empty.
        let _ = self.mem.set(Arc::new(mem));
        Ok(())
    }

    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError> {
        self.alive()?;
        let mem = self.memory()?;
        for c in batch {
            mem.slot_word(c.slot)?;
        }
        let (n, injected) = self.inject(Call::CopyToDevice, batch.len());
        for c in &batch[..n] {
            let w = mem.slot_word(c.slot)?;
            // SAFETY: `w` comes from `slot_word`; the caller guarantees `src`
            // is readable for 4096 bytes for the call and that no in-flight
            // device work uses the slot; `src` is host memory the caller
            // owns, never the pool (the pool is private to this device).
            unsafe { mem.copy_in(w, c.src) };
        }
        result(injected)
    }

    fn host_slot(&self, slot: PoolSlot) -> Option<core::ptr::NonNull<u8>> {
        let mem = self.memory().ok()?;
        let w = mem.slot_word(slot).ok()?;
        core::ptr::NonNull::new(mem.slot_ptr(w))
    }

    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError> {
        self.alive()?;
        let mem = self.memory()?;
        for c in batch {
            mem.slot_word(c.slot)?;
        }
        let (n, injected) = self.inject(Call::CopyToHost, batch.len());
        for c in &batch[..n] {
            let w = mem.slot_word(c.slot)?;
            // SAFETY: `w` comes from `slot_word`; the caller guarantees `dst`
            // is writable for 4096 bytes, unaliased and not overlapping other
            // destinations, and that no in-flight device work writes the
            // slot; `dst` is not in the private pool.
            unsafe { mem.copy_out(w, c.dst) };
        }
        result(injected)
    }

    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError> {
        self.alive()?;
        let mem = self.memory()?;
        for w in batch {
            mem.entry(w.table.0, w.index)?;
        }
        let (n, injected) = self.inject(Call::WritePtes, batch.len());
        for w in &batch[..n] {
            mem.entry(w.table.0, w.index)?.store(w.pte.0, Release);
        }
        result(injected)
    }

    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError> {
        self.alive()?;
        let mem = self.memory()?;
        for l in locs {
            mem.entry(l.table.0, l.index)?;
        }
        let (n, injected) = self.inject(Call::ReadPtes, locs.len());
        out.reserve(n);
        for l in &locs[..n] {
            out.push(Pte(mem.entry(l.table.0, l.index)?.load(Acquire)));
        }
        result(injected)
    }

    fn clear_pte_bits(
        &self,
        locs: &[PteLoc],
        bits: u64,
        old: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        if bits & !DEVICE_BITS != 0 {
            return Err(BackendError::Other(format!(
                "clear_pte_bits: {bits:#x} is not a subset of ACCESSED | DIRTY"
            )));
        }
        self.alive()?;
        let mem = self.memory()?;
        for l in locs {
            mem.entry(l.table.0, l.index)?;
        }
        let (n, injected) = self.inject(Call::ClearPteBits, locs.len());
        old.reserve(n);
        for l in &locs[..n] {
            old.push(Pte(mem.entry(l.table.0, l.index)?.fetch_and(!bits, AcqRel)));
        }
        result(injected)
    }

    fn launch(
        &self,
        kernel: &CpuKernel,
        invocations: Invocations<'_>,
        args: &[u64],
    ) -> Result<SubmissionId, BackendError> {
        self.alive()?;
        let mem = Arc::clone(self.memory()?);
        // A failed launch submits nothing (the trait's rule).
        if let (_, Some(e)) = self.inject(Call::Launch, 1) {
            return Err(e);
        }
        let id = self.subs.begin();
        if invocations.is_empty() {
            self.subs.complete(id, Ok(LaunchOutcome::default()));
            return Ok(id);
        }
        let (all, only) = match invocations {
            Invocations::All(n) => (Some(n), None),
            Invocations::Only(v) => (None, Some(v)),
        };
        let chunks = Job::chunks(
            LaunchSpec {
                id,
                kernel: kernel.clone(),
                all,
                only,
                args,
                mem,
                hooks: lock(&self.hooks).clone(),
                subs: Arc::clone(&self.subs),
                cancel: Arc::clone(&self.cancel),
            },
            self.threads,
        );
        match &*lock(&self.workers) {
            Some(w) => w.submit(chunks),
            None => chunks.into_iter().for_each(|c| c.abandon("no workers")),
        }
        Ok(id)
    }

    fn wait(&self, id: SubmissionId, timeout: Option<Duration>) -> Result<bool, BackendError> {
        if let Err(lost) = self.alive() {
            // Lost: queued invocations are skipped (the cancel flag); wait
            // for the running ones, so no work of `id` runs once this
            // returns.
            let _ = self.subs.wait(id, None);
            return Err(lost);
        }
        self.subs.wait(id, timeout)
    }

    fn is_complete(&self, id: SubmissionId) -> bool {
        self.subs.is_complete(id)
    }

    fn host_synchronous(&self) -> bool {
        // Copies and entry writes are loads and stores on this thread;
        // `is_complete` reads a flag under a lock no worker holds while it
        // waits for anything.
        true
    }

    fn rounds_are_costly(&self) -> bool {
        // A round is a few function calls on the host: the adaptive fetch
        // policy buys nothing here (`FetchPolicy::Auto` is exact), unless
        // asked to behave like a GPU (`with_costly_rounds`).
        self.costly
    }

    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        if let Err(lost) = self.alive() {
            // As in `wait`; the outcome is dropped.
            let _ = self.subs.wait(id, None);
            let _ = self.subs.take(id);
            return Err(lost);
        }
        self.subs.take(id)
    }
}
