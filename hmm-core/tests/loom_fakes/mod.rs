//! In-memory fakes for the loom models of the mirror (`tests/loom_mirror.rs`).
//!
//! [`FakeHost`] is a [`HostSide`] with a few pages of fake CPU memory (one
//! `u64` value per 4 KiB page, keyed by address), fake mappings and a real
//! [`AddressSpace`]; [`FakeHost::remap`], [`FakeHost::remove`] and
//! [`FakeHost::unmap`] change it the way the kernel does — between
//! `invalidate_start` and its end.
//!
//! [`FakeDevice`] is a [`Backend`] whose page table and pool are plain
//! memory behind loom mutexes. Its "device" runs a launch synchronously:
//! invocation `i` reads the page at `kernel[i]` through the table, and every
//! read is checked against the fake memory — a value that differs from the
//! CPU's while no invalidation of that page is in progress is a stale read,
//! and the model fails. Copies into a slot an entry still names, and two
//! entries naming one slot, fail it too. A [`Gate`] makes a chosen backend
//! call wait for "the device" (the test) while its caller holds the
//! driver lock.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicUsize as StdAtomicUsize;
use std::sync::{Arc, Weak};
use std::time::Duration;

use loom::sync::{Condvar, Mutex};

loom::thread_local! {
    /// Set while the fake CPU load asks as the event monitor's reader
    /// would (`fault_back_now`).
    static ON_READER: std::cell::Cell<bool> = std::cell::Cell::new(false);
}

use hmm_core::cpu::host::{GiveBack, HostError};
use hmm_core::cpu::maps::{Mapping, MappingKind};
use hmm_core::cpu::migration::{Detached, FaultBack, FaultBackOutcome};
use hmm_core::cpu::range_fault::{FaultError, FaultFlags, PageState};
use hmm_core::mirror::backend::{
    Backend, BackendError, BackendInfo, DeviceConfig, DeviceToHost, HostToDevice, InvocationSet,
    Invocations, LaunchOutcome, PteLoc, PteWrite, RawFaultRecord, SubmissionId,
};
use hmm_core::mirror::format::{level_index, PoolSlot, Pte};
use hmm_core::mirror::{HostSide, WriteTracking};
use hmm_core::notifier::{AddressSpace, EventKind, NotifierRange};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;

/// The range `[start, start + pages * 4 KiB)`.
pub fn pages(start: u64, pages: u64) -> VaRange {
    VaRange::from_start_len(VirtAddr(start), pages * PAGE_SIZE).unwrap()
}

#[derive(Default)]
struct Mem {
    /// Mappings (disjoint).
    maps: Vec<VaRange>,
    /// The value of every mapped page.
    vals: BTreeMap<u64, u64>,
    /// Pages an invalidation is changing (from the change to the end of
    /// the invalidation): either value may be read there.
    flux: BTreeSet<u64>,
    /// Pages migrated out (device-private migration): the CPU side is a
    /// hole that traps; `vals` keeps the value the page logically holds.
    holes: BTreeSet<u64>,
    /// Pages an event is under way for (from before its callbacks to the
    /// end of its invalidation).
    in_event: BTreeSet<u64>,
}

impl Mem {
    fn mapping(&self, addr: u64) -> Option<VaRange> {
        self.maps
            .iter()
            .copied()
            .find(|m| m.contains(VirtAddr(addr)))
    }
}

/// The fake CPU side.
pub struct FakeHost {
    space: AddressSpace,
    mem: Mutex<Mem>,
    mirrors: StdAtomicUsize,
    /// The owner of migrated pages (`detach_for_migration`).
    owner: Mutex<Option<Weak<dyn FaultBack>>>,
}

impl FakeHost {
    /// One mapping over `range`, page `k` holding value `first + k`.
    pub fn new(range: VaRange, first: u64) -> Arc<Self> {
        let mut mem = Mem::default();
        mem.maps.push(range);
        for (k, p) in range.page_addrs().enumerate() {
            mem.vals.insert(p.0, first + k as u64);
        }
        Arc::new(FakeHost {
            space: AddressSpace::new(),
            mem: Mutex::new(mem),
            mirrors: StdAtomicUsize::new(0),
            owner: Mutex::new(None),
        })
    }

    /// The CPU's value of the page at `addr` now (`None`: unmapped).
    pub fn value(&self, addr: u64) -> Option<u64> {
        self.mem.lock().unwrap().vals.get(&addr).copied()
    }

    /// A CPU load of the page at `addr` (`None`: unmapped). A migrated
    /// page traps: its owner gives it back — as the monitor's handler asks
    /// it to first, without waiting (`try_fault_back`), and, where that
    /// would wait, the fault-back server (`fault_back`) — and the load
    /// proceeds; a hole nobody holds reads as a zero
    /// page — and must logically be one (a non-zero value there is data
    /// the mirror lost: the model fails).
    pub fn cpu_read(&self, addr: u64) -> Option<u64> {
        loop {
            {
                let m = self.mem.lock().unwrap();
                let v = *m.vals.get(&addr)?;
                if !m.holes.contains(&addr) {
                    return Some(v);
                }
            }
            let owner = self.owner.lock().unwrap().clone().and_then(|w| w.upgrade());
            // The event monitor's reader answers first where it may: no
            // event in progress (none read and unhandled before the fault),
            // and its install refused (`Busy`, as `EAGAIN`) if one starts
            // meanwhile.
            let quiet = self.mem.lock().unwrap().in_event.is_empty();
            let now = match (&owner, quiet) {
                (Some(o), true) => {
                    ON_READER.with(|r| r.set(true));
                    let now = o.fault_back_now(VirtAddr(addr));
                    ON_READER.with(|r| r.set(false));
                    now
                }
                _ => None,
            };
            if let Some((FaultBackOutcome::Served, _)) = now {
                continue;
            }
            let outcome = owner.map_or(FaultBackOutcome::NotHeld, |o| {
                o.try_fault_back(VirtAddr(addr))
                    .unwrap_or_else(|| o.fault_back(VirtAddr(addr)))
            });
            match outcome {
                FaultBackOutcome::Served => {}
                FaultBackOutcome::NotHeld => {
                    let mut m = self.mem.lock().unwrap();
                    if m.holes.remove(&addr) {
                        let v = m.vals.get(&addr).copied();
                        // A discard in progress (its callback ran, the
                        // kernel's zap is coming): a zero page is what the
                        // CPU reads either way.
                        if m.flux.contains(&addr) || m.in_event.contains(&addr) {
                            return Some(0);
                        }
                        assert!(
                            v == Some(0) || v.is_none(),
                            "page {addr:#x} zero-filled while it held {v:?}: migrated data lost"
                        );
                    }
                }
                FaultBackOutcome::Lost => panic!("page {addr:#x} lost"),
            }
        }
    }

    /// What device work submitted now may read: per page of `addrs`, the
    /// CPU's value, or `None` (anything) while an invalidation of the page
    /// is in progress.
    fn snapshot(&self, addrs: &[u64]) -> HashMap<u64, Option<Option<u64>>> {
        let m = self.mem.lock().unwrap();
        addrs
            .iter()
            .map(|a| {
                let v = m.vals.get(a).copied();
                (*a, (!m.flux.contains(a)).then_some(v))
            })
            .collect()
    }

    /// Runs `change` on the memory of `range` inside an invalidation of
    /// kind `event`, as the kernel does.
    fn event(&self, range: VaRange, event: EventKind, change: impl FnOnce(&mut Mem)) {
        // From before the callbacks: the kernel's REMOVE reaches them
        // before it zaps, and a fault served meanwhile may read zeros.
        self.mem
            .lock()
            .unwrap()
            .in_event
            .extend(range.page_addrs().map(|p| p.0));
        let g = self
            .space
            .invalidate_start(NotifierRange::new(range, event))
            .unwrap();
        {
            let mut m = self.mem.lock().unwrap();
            change(&mut m);
            m.flux.extend(range.page_addrs().map(|p| p.0));
        }
        drop(g);
        let mut m = self.mem.lock().unwrap();
        for p in range.page_addrs() {
            m.flux.remove(&p.0);
            m.in_event.remove(&p.0);
        }
    }

    /// A new page with value `val` replaces each page of `range` (a
    /// `mremap`/`mmap MAP_FIXED` over it): `Remap`, the regions die.
    pub fn remap(&self, range: VaRange, val: u64) {
        self.event(range, EventKind::Remap, |m| {
            for p in range.page_addrs() {
                m.vals.insert(p.0, val);
            }
        });
    }

    /// `MADV_DONTNEED`: the pages read as zeros from now on; `Remove`, the
    /// regions live on.
    pub fn remove(&self, range: VaRange) {
        self.event(range, EventKind::Remove, |m| {
            for p in range.page_addrs() {
                m.vals.insert(p.0, 0);
            }
        });
    }

    /// `munmap`: `Unmap`, the pages and that part of the mappings go.
    pub fn unmap(&self, range: VaRange) {
        self.event(range, EventKind::Unmap, |m| {
            for p in range.page_addrs() {
                m.vals.remove(&p.0);
                m.holes.remove(&p.0);
            }
            let mut left = Vec::new();
            for r in m.maps.drain(..) {
                if !r.overlaps(range) {
                    left.push(r);
                    continue;
                }
                if r.start() < range.start() {
                    left.push(VaRange::new(r.start(), range.start()).unwrap());
                }
                if range.end() < r.end() {
                    left.push(VaRange::new(range.end(), r.end()).unwrap());
                }
            }
            m.maps = left;
        });
    }

    fn covered(m: &Mem, range: VaRange) -> bool {
        m.maps.iter().any(|r| r.covers(range))
    }
}

fn unmapped(addr: u64) -> HostError {
    HostError::Fault(FaultError::Unmapped {
        addr: VirtAddr(addr),
    })
}

/// The mirror must never read or write a migrated page's CPU side (a real
/// one would wait on the fault-back server, which needs the driver lock
/// the caller holds).
fn not_a_hole(m: &Mem, addr: u64) {
    assert!(
        !m.holes.contains(&(addr & !(PAGE_SIZE - 1))),
        "the mirror touched the CPU side of migrated page {addr:#x}"
    );
}

impl HostSide for FakeHost {
    fn space(&self) -> &AddressSpace {
        &self.space
    }

    fn migration_support(&self) -> Result<Option<&'static str>, String> {
        Ok(None)
    }

    fn detach_for_migration(
        &self,
        range: VaRange,
        owner: Weak<dyn FaultBack>,
    ) -> Result<Detached, HostError> {
        *self.owner.lock().unwrap() = Some(owner);
        let mut m = self.mem.lock().unwrap();
        let mut bytes = vec![0u8; range.len() as usize];
        for (k, p) in range.page_addrs().enumerate() {
            let Some(v) = m.vals.get(&p.0).copied() else {
                return Err(unmapped(p.0));
            };
            // A page already migrated moves as a hole: zeros.
            if !m.holes.contains(&p.0) {
                bytes[k * PAGE..k * PAGE + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        for p in range.page_addrs() {
            m.holes.insert(p.0);
        }
        Ok(Detached::from_bytes(range, bytes))
    }

    fn give_back(&self, at: VirtAddr, data: &[u8]) -> GiveBack {
        let mut m = self.mem.lock().unwrap();
        if ON_READER.with(|r| r.get()) && !m.in_event.is_empty() {
            return GiveBack::Busy;
        }
        let mut out = GiveBack::Installed;
        for (k, chunk) in data.chunks(PAGE).enumerate() {
            let p = at.0 + (k * PAGE) as u64;
            let Some(v) = m.vals.get(&p).copied() else {
                return GiveBack::Gone;
            };
            if !m.holes.remove(&p) {
                out = GiveBack::Present;
                continue;
            }
            let given = u64::from_le_bytes(chunk[..8].try_into().unwrap());
            assert_eq!(
                given, v,
                "page {p:#x} given back with a value it never held"
            );
        }
        out
    }

    fn sync_point(&self) -> Result<u64, HostError> {
        // The models change memory only through invalidations.
        Ok(0)
    }

    fn settle(&self) -> bool {
        // Invalidations run synchronously in the thread that changes
        // memory: nothing is ever read and unhandled.
        true
    }

    fn watch(&self, range: VaRange, _writes: WriteTracking) -> Result<(), HostError> {
        // Like userfaultfd registration: refused where the range is not
        // wholly mapped.
        let m = self.mem.lock().unwrap();
        if Self::covered(&m, range) {
            Ok(())
        } else {
            Err(unmapped(range.start().0))
        }
    }

    fn unwatch(&self, _range: VaRange, _writes: WriteTracking) -> Result<(), HostError> {
        Ok(())
    }

    fn rearm(&self, _pages: &[VirtAddr]) -> Result<(), HostError> {
        Ok(())
    }

    fn lookup(&self, addr: VirtAddr) -> Result<Option<Mapping>, HostError> {
        let m = self.mem.lock().unwrap();
        Ok(m.mapping(addr.0).map(|range| Mapping {
            range,
            read: true,
            write: true,
            exec: false,
            shared: false,
            kind: MappingKind::Anonymous,
        }))
    }

    fn new_epoch(&self) -> u64 {
        0
    }

    fn lookup_in_epoch(&self, addr: VirtAddr, _epoch: u64) -> Result<Option<Mapping>, HostError> {
        self.lookup(addr)
    }

    fn forget_mappings(&self, _range: VaRange) {}

    fn range_fault_into(
        &self,
        range: VaRange,
        _flags: FaultFlags,
        out: &mut Vec<PageState>,
    ) -> Result<(), FaultError> {
        out.clear();
        let m = self.mem.lock().unwrap();
        for p in range.page_addrs() {
            if !m.vals.contains_key(&p.0) {
                return Err(FaultError::Unmapped { addr: p });
            }
            out.push(PageState::Valid { writable: true });
        }
        Ok(())
    }

    fn mirrors_attached(&self) -> usize {
        self.mirrors.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn attach_mirror(&self) {
        self.mirrors
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn detach_mirror(&self) {
        self.mirrors
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn read_pages(&self, srcs: &[VirtAddr], staging: &mut [u8], ok: &mut Vec<bool>) {
        ok.clear();
        let m = self.mem.lock().unwrap();
        for (k, src) in srcs.iter().enumerate() {
            not_a_hole(&m, src.0);
            let chunk = &mut staging[k * PAGE..(k + 1) * PAGE];
            chunk.fill(0);
            match m.vals.get(&src.0) {
                Some(v) => {
                    chunk[..8].copy_from_slice(&v.to_le_bytes());
                    ok.push(true);
                }
                None => ok.push(false),
            }
        }
    }

    unsafe fn read_pages_to(&self, srcs: &[VirtAddr], dsts: &[*mut u8], ok: &mut Vec<bool>) {
        ok.clear();
        let m = self.mem.lock().unwrap();
        for (src, dst) in srcs.iter().zip(dsts) {
            not_a_hole(&m, src.0);
            let v = m.vals.get(&src.0).copied();
            // SAFETY: the caller promises each `dst` is valid for writes of
            // 4096 bytes and touched by nothing else during the call.
            let page = unsafe { std::slice::from_raw_parts_mut(*dst, PAGE) };
            page.fill(0);
            if let Some(v) = v {
                page[..8].copy_from_slice(&v.to_le_bytes());
            }
            ok.push(v.is_some());
        }
    }

    fn write_runs(&self, runs: &[(VirtAddr, &[u8])]) -> usize {
        let mut m = self.mem.lock().unwrap();
        let mut n = 0;
        for (dst, bytes) in runs {
            not_a_hole(&m, dst.0);
            let page = dst.0 & !(PAGE_SIZE - 1);
            let Some(v) = m.vals.get_mut(&page) else {
                continue;
            };
            // Only the page's first word is modelled.
            let mut word = v.to_le_bytes();
            let off = (dst.0 - page) as usize;
            for (i, b) in bytes.iter().enumerate() {
                if let Some(w) = word.get_mut(off + i) {
                    *w = *b;
                }
            }
            *v = u64::from_le_bytes(word);
            n += 1;
        }
        n
    }
}

/// Which backend call a [`Gate`] holds up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// The first `write_ptes` that installs a leaf entry.
    InstallWrite,
}

#[derive(Default)]
struct GateSt {
    armed: Option<Held>,
    entered: bool,
    open: bool,
}

/// Makes one backend call wait for "the device" (the test thread).
#[derive(Default)]
pub struct Gate {
    st: Mutex<GateSt>,
    cv: Condvar,
}

impl Gate {
    fn pass(&self, which: Held) {
        let mut g = self.st.lock().unwrap();
        if g.armed != Some(which) || g.entered {
            return;
        }
        g.entered = true;
        self.cv.notify_all();
        while !g.open {
            g = self.cv.wait(g).unwrap();
        }
    }
}

struct DevState {
    table: HashMap<(u32, u16), Pte>,
    pool: Vec<u64>,
    next_id: u64,
    outcomes: HashMap<u64, LaunchOutcome>,
    /// Every device read: (address, value).
    reads: Vec<(u64, u64)>,
}

impl DevState {
    fn translate(&self, va: u64) -> Option<Pte> {
        let mut page = 0u32;
        for level in (2..=4).rev() {
            let e = *self.table.get(&(page, level_index(va, level) as u16))?;
            if !e.valid() {
                return None;
            }
            page = e.next_table().0;
        }
        let e = *self.table.get(&(page, level_index(va, 1) as u16))?;
        e.valid().then_some(e)
    }
}

/// The fake device.
pub struct FakeDevice {
    host: Arc<FakeHost>,
    /// The pages the models use: the ones every check walks.
    watched: Vec<u64>,
    st: Mutex<DevState>,
    gate: Arc<Gate>,
    /// Check every read (set once no launch is concurrent with an event).
    strict: std::sync::atomic::AtomicBool,
}

impl FakeDevice {
    /// A device checking its reads against `host`'s memory at `watched`.
    pub fn new(host: &Arc<FakeHost>, watched: VaRange) -> Self {
        FakeDevice {
            host: Arc::clone(host),
            watched: watched.page_addrs().map(|p| p.0).collect(),
            st: Mutex::new(DevState {
                table: HashMap::new(),
                pool: Vec::new(),
                next_id: 1,
                outcomes: HashMap::new(),
                reads: Vec::new(),
            }),
            gate: Arc::default(),
            strict: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The gate, for the test to arm, wait on and open.
    pub fn gate(&self) -> Arc<Gate> {
        Arc::clone(&self.gate)
    }

    /// From now on every read must be fresh. A launch that runs while an
    /// event is delivered may see the old page (the mirror never makes
    /// the CPU side wait for the device); one that starts after the event
    /// returned may not.
    pub fn strict(&self) {
        self.strict.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every device read so far: (address, value).
    pub fn reads(&self) -> Vec<(u64, u64)> {
        self.st.lock().unwrap().reads.clone()
    }

    /// The slot the device's table maps `va` to, if any.
    pub fn mapped(&self, va: u64) -> Option<PoolSlot> {
        self.st.lock().unwrap().translate(va).map(|p| p.slot())
    }

    /// No two entries name one slot.
    fn check_unique(&self, st: &DevState) {
        let mut seen = HashMap::new();
        for va in &self.watched {
            if let Some(p) = st.translate(*va) {
                if let Some(other) = seen.insert(p.slot(), *va) {
                    panic!("slot {:?} named by {other:#x} and {va:#x}", p.slot());
                }
            }
        }
    }
}

impl Gate {
    /// Holds up the next `which` call until [`Gate::open`].
    pub fn arm(&self, which: Held) {
        self.st.lock().unwrap().armed = Some(which);
    }

    /// Waits until a call is held at the gate.
    pub fn wait_entered(&self) {
        let mut g = self.st.lock().unwrap();
        while !g.entered {
            g = self.cv.wait(g).unwrap();
        }
    }

    /// Lets the held call (and every later one) through.
    pub fn open(&self) {
        self.st.lock().unwrap().open = true;
        self.cv.notify_all();
    }
}

// SAFETY: the fake touches host memory only at the 4096 bytes of each
// copy's `src` (it reads the first word) or `dst`, during the call; it has
// no host windows, and its "device" sets no entry bits.
unsafe impl Backend for FakeDevice {
    /// Invocation `i` reads the page at `kernel[i]`.
    type Kernel = [u64];

    fn host_synchronous(&self) -> bool {
        true
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            driver: "loom-fake".into(),
            device: "plain memory".into(),
            max_pool_slots: 64,
        }
    }

    fn init(&self, config: DeviceConfig) -> Result<(), BackendError> {
        self.st.lock().unwrap().pool = vec![0; config.pool_slots as usize];
        Ok(())
    }

    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError> {
        let mut st = self.st.lock().unwrap();
        for c in batch {
            for va in &self.watched {
                assert!(
                    st.translate(*va).map(|p| p.slot()) != Some(c.slot),
                    "slot {:?} reused while the entry of {va:#x} names it",
                    c.slot
                );
            }
            let mut w = [0u8; 8];
            // SAFETY: `src` is valid for reads of 4096 bytes during the call
            // (the method's contract); we read its first 8.
            unsafe { std::ptr::copy_nonoverlapping(c.src, w.as_mut_ptr(), 8) };
            st.pool[c.slot.0 as usize] = u64::from_le_bytes(w);
        }
        Ok(())
    }

    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError> {
        let st = self.st.lock().unwrap();
        for c in batch {
            let mut page = [0u8; PAGE];
            page[..8].copy_from_slice(&st.pool[c.slot.0 as usize].to_le_bytes());
            // SAFETY: `dst` is valid for writes of 4096 bytes and aliased by
            // nothing during the call (the method's contract).
            unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), c.dst, PAGE) };
        }
        Ok(())
    }

    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError> {
        if batch.iter().any(|w| w.pte.valid()) {
            // Directory entries come first in a batch, so "installs a
            // leaf" is close enough: any batch writing valid entries.
            self.gate.pass(Held::InstallWrite);
        }
        let mut st = self.st.lock().unwrap();
        for w in batch {
            st.table.insert((w.table.0, w.index), w.pte);
        }
        self.check_unique(&st);
        Ok(())
    }

    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError> {
        let st = self.st.lock().unwrap();
        for l in locs {
            out.push(
                st.table
                    .get(&(l.table.0, l.index))
                    .copied()
                    .unwrap_or_default(),
            );
        }
        Ok(())
    }

    fn clear_pte_bits(
        &self,
        locs: &[PteLoc],
        bits: u64,
        old: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        let mut st = self.st.lock().unwrap();
        for l in locs {
            let e = st.table.entry((l.table.0, l.index)).or_default();
            old.push(*e);
            e.0 &= !bits;
        }
        Ok(())
    }

    fn launch(
        &self,
        kernel: &[u64],
        invocations: Invocations<'_>,
        _args: &[u64],
    ) -> Result<SubmissionId, BackendError> {
        let ids: Vec<u32> = match invocations {
            Invocations::All(n) => (0..n).collect(),
            Invocations::Only(s) => s.iter().collect(),
        };
        let universe = match invocations {
            Invocations::All(n) => n,
            Invocations::Only(s) => s.universe(),
        };
        let mut st = self.st.lock().unwrap();
        self.check_unique(&st);
        // The work runs "now", but the CPU side may move on while it does
        // (nothing waits for it): a read is checked against the memory as
        // it was at submission. An invalidation that ended before then
        // must be seen; one still running may not be yet.
        let expect = self.host.snapshot(kernel);
        let mut out = LaunchOutcome {
            faults: Vec::new(),
            incomplete: InvocationSet::new(universe),
        };
        for i in ids {
            let va = kernel[i as usize];
            match st.translate(va) {
                Some(p) => {
                    let v = st.pool[p.slot().0 as usize];
                    let strict = self.strict.load(std::sync::atomic::Ordering::SeqCst);
                    let ok = !strict
                        || match expect[&va] {
                            None => true,
                            Some(cpu) => cpu == Some(v),
                        };
                    assert!(
                        ok,
                        "stale device read at {va:#x}: {v} (CPU at submission: {:?})",
                        expect[&va]
                    );
                    st.reads.push((va, v));
                }
                None => {
                    out.incomplete.insert(i);
                    out.faults.push(RawFaultRecord {
                        invocation: i,
                        flags: 0,
                        addr_lo: va as u32,
                        addr_hi: (va >> 32) as u32,
                    });
                }
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.outcomes.insert(id, out);
        Ok(SubmissionId(id))
    }

    fn wait(&self, _id: SubmissionId, _timeout: Option<Duration>) -> Result<bool, BackendError> {
        Ok(true)
    }

    fn is_complete(&self, _id: SubmissionId) -> bool {
        true
    }

    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        self.st
            .lock()
            .unwrap()
            .outcomes
            .remove(&id.0)
            .ok_or(BackendError::UnknownSubmission(id))
    }
}
