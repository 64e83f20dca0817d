//! One invocation's view of the device: the emulated MMU and the store
//! buffer that makes replay exactly-once.

use core::fmt;
use core::hash::{BuildHasherDefault, Hasher};
use core::sync::atomic::AtomicU32;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::collections::HashMap;

use hmm_core::mirror::format::{
    level_index, ACCESSED, DIRTY, ENTRIES, INDEX_SHIFT, LEVELS, VALID, VA_BITS, WRITABLE,
};

use crate::memory::{Memory, PAGE, WORDS_PER_PAGE};

/// Why a device access stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// No valid entry on the walk (directory or leaf), or an address at or
    /// above `1 << 48`. A page fault: reported in the fault buffer, the
    /// invocation is replayed once the core has serviced it.
    NotPresent,
    /// The leaf is valid but not `WRITABLE` and the access writes. A page
    /// fault, handled like [`FaultKind::NotPresent`].
    ReadOnly,
    /// A 32-bit load, store or atomic at an address that is not 4-byte
    /// aligned, or a 64-bit one not 8-byte aligned. A kernel bug, not a
    /// page fault: reported with `FAULT_MISALIGNED`, the launch ends with
    /// `MirrorError::DeviceFault { reason: AccessError::Misaligned, .. }`
    /// — as on the GPU drivers, whose shader library checks the same rule.
    Misaligned,
    /// A table entry points past the allocated table pages or pool slots.
    /// A corrupt page table (a core bug): the launch ends with
    /// `BackendError::Other`.
    BadEntry,
}

/// One lane's device access that could not complete. Kernels propagate it
/// with `?`; the invocation stops there, and the driver turns it into a
/// fault record the core services (a page fault) or reports. Not to be
/// confused with — and named apart from — `MirrorError::DeviceFault`, the
/// typed error a whole launch ends with when a fault cannot be serviced
/// (issue #19: both used to be called `DeviceFault`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaneFault {
    /// The faulting CPU virtual address (for an access spanning pages, the
    /// first byte of the access on the faulting page).
    pub addr: u64,
    /// The access writes (plain store or atomic).
    pub write: bool,
    /// The access is an atomic read-modify-write.
    pub atomic: bool,
    /// Why it stopped.
    pub kind: FaultKind,
}

impl LaneFault {
    /// Whether this is a page fault the core can service and replay
    /// ([`FaultKind::NotPresent`] or [`FaultKind::ReadOnly`]).
    pub fn is_page_fault(&self) -> bool {
        matches!(self.kind, FaultKind::NotPresent | FaultKind::ReadOnly)
    }
}

impl fmt::Display for LaneFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.atomic, self.write) {
            (true, _) => "atomic",
            (false, true) => "write",
            (false, false) => "read",
        };
        let why = match self.kind {
            FaultKind::NotPresent => "not present",
            FaultKind::ReadOnly => "read-only page",
            FaultKind::Misaligned => "misaligned access",
            FaultKind::BadEntry => "corrupt page-table entry",
        };
        write!(f, "device {what} fault at {:#x}: {why}", self.addr)
    }
}

impl std::error::Error for LaneFault {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Atomic,
}

impl Access {
    fn fault(self, addr: u64, kind: FaultKind) -> LaneFault {
        LaneFault {
            addr,
            write: self != Access::Read,
            atomic: self == Access::Atomic,
            kind,
        }
    }
}

/// TLB entries per lane (direct-mapped by virtual page number).
const TLB_ENTRIES: usize = 16;

/// A cached translation: which leaf entry maps the page and the slot it
/// mapped at walk time. `tag` is `vpn + 1`; 0 means empty.
#[derive(Clone, Copy, Default)]
struct TlbEntry {
    tag: u64,
    leaf: usize,
    slot: u32,
}

/// A page written by buffered stores, remembered for commit.
#[derive(Clone, Copy)]
struct WrittenPage {
    /// Page-aligned virtual address.
    va: u64,
    /// Global index of the leaf entry.
    leaf: usize,
    /// Slot the leaf mapped when the store translated.
    slot: u32,
}

/// Pending bytes of one pool word: `mask` has 0xff in each written byte lane.
#[derive(Clone, Copy)]
struct Pending {
    value: u32,
    mask: u32,
}

/// Multiplicative hash for integer keys (FxHash's constant); keys are
/// word and page numbers chosen by the kernel, not by an adversary.
#[derive(Default)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// The lane's buffered plain stores.
#[derive(Default)]
struct StoreBuffer {
    /// Pool word index → pending bytes.
    words: IntMap<usize, Pending>,
    /// Virtual page number → page, for every page a buffered store hit.
    pages: IntMap<u64, WrittenPage>,
    /// The last page noted (skips the map for runs of stores to one page).
    last_vpn: Option<u64>,
}

impl StoreBuffer {
    fn clear(&mut self) {
        self.words.clear();
        self.pages.clear();
        self.last_vpn = None;
    }

    fn note_page(&mut self, va: u64, leaf: usize, base_word: usize) {
        let vpn = va >> INDEX_SHIFT;
        if self.last_vpn == Some(vpn) {
            return;
        }
        self.last_vpn = Some(vpn);
        self.pages.entry(vpn).or_insert(WrittenPage {
            va: vpn << INDEX_SHIFT,
            leaf,
            slot: (base_word / WORDS_PER_PAGE) as u32,
        });
    }

    fn put(&mut self, word: usize, mask: u32, value: u32) {
        let p = self
            .words
            .entry(word)
            .or_insert(Pending { value: 0, mask: 0 });
        p.value = (p.value & !mask) | (value & mask);
        p.mask |= mask;
    }

    fn overlay(&self, word: usize, memory: u32) -> u32 {
        match self.words.get(&word) {
            Some(p) => (memory & !p.mask) | p.value,
            None => memory,
        }
    }
}

/// Byte-lane mask for `len` bytes (1..=4) starting at byte `shift` of a word.
fn byte_mask(shift: usize, len: usize) -> u32 {
    let bits = ((1u64 << (8 * len)) - 1) as u32;
    bits << (8 * shift)
}

/// An invocation's view of the device, handed to the kernel.
///
/// Every access translates its address through the device page table (a
/// per-lane TLB caches the walk, but the leaf entry is re-read on every
/// access so a zapped or downgraded entry is seen at once). Plain stores
/// are buffered in the lane and applied when the invocation returns `Ok`;
/// plain loads see the lane's own buffered stores. Atomics apply at once.
/// See the crate documentation for the replay contract.
pub struct Lane<'a> {
    mem: &'a Memory,
    args: &'a [u64],
    invocation: u32,
    tlb: [TlbEntry; TLB_ENTRIES],
    buf: StoreBuffer,
}

impl<'a> Lane<'a> {
    /// A lane over `mem` with launch arguments `args`.
    pub(crate) fn new(mem: &'a Memory, args: &'a [u64]) -> Self {
        Lane {
            mem,
            args,
            invocation: 0,
            tlb: [TlbEntry::default(); TLB_ENTRIES],
            buf: StoreBuffer::default(),
        }
    }

    /// Prepares the lane to run `invocation` (drops anything buffered).
    pub(crate) fn begin(&mut self, invocation: u32) {
        self.invocation = invocation;
        self.buf.clear();
    }

    /// Drops the buffered stores of a faulted or panicked invocation.
    pub(crate) fn discard(&mut self) {
        self.buf.clear();
    }

    /// Applies the buffered stores of a finished invocation: first checks
    /// that every written page is still mapped writable to the same slot
    /// (if not, nothing is applied and the invocation faults, to be
    /// replayed), then stores the bytes, then sets `ACCESSED | DIRTY` on
    /// each written page's leaf (after the data, so a host that clears
    /// `DIRTY` concurrently either sees it in the old value or finds it set
    /// again).
    pub(crate) fn commit(&mut self) -> Result<(), LaneFault> {
        if self.buf.pages.is_empty() {
            return Ok(());
        }
        let mut fault: Option<LaneFault> = None;
        for p in self.buf.pages.values() {
            // Acquire: pairs with the Release stores of `write_ptes`, so a mapped slot's copied-in data is visible.
            let pte = self.mem.tables[p.leaf].load(Acquire);
            let same = pte & VALID != 0 && pte >> INDEX_SHIFT == u64::from(p.slot);
            if same && pte & WRITABLE != 0 {
                continue;
            }
            let kind = if same {
                FaultKind::ReadOnly
            } else {
                FaultKind::NotPresent
            };
            if fault.is_none_or(|f| p.va < f.addr) {
                fault = Some(Access::Write.fault(p.va, kind));
            }
        }
        if let Some(f) = fault {
            self.buf.clear();
            return Err(f);
        }
        for (&w, p) in &self.buf.words {
            let word = self.mem.word(w);
            if p.mask == u32::MAX {
                // Relaxed: pool words are only ever accessed atomically (no data race); ordering with the host comes from the launch channel and the submission mutex.
                word.store(p.value, Relaxed);
            } else {
                // Clear the written byte lanes' zero bits, then set their one
                // bits: other byte lanes are never touched, so concurrent
                // stores by other invocations to neighbouring bytes survive.
                if p.value != p.mask {
                    word.fetch_and(!p.mask | p.value, Relaxed);
                }
                if p.value != 0 {
                    // Relaxed: pool words are only ever accessed atomically (no data race); ordering with the host comes from the launch channel and the submission mutex.
                    word.fetch_or(p.value, Relaxed);
                }
            }
        }
        for p in self.buf.pages.values() {
            // Release: a host that sees DIRTY (AcqRel in clear_pte_bits) also sees the data stored before it.
            self.mem.tables[p.leaf].fetch_or(ACCESSED | DIRTY, Release);
        }
        self.buf.clear();
        Ok(())
    }

    /// The launch's arguments.
    pub fn args(&self) -> &[u64] {
        self.args
    }

    /// The running invocation's index (the kernel's second argument).
    pub fn invocation(&self) -> u32 {
        self.invocation
    }

    /// Translates `va`; returns the first pool word of its slot and the
    /// global index of its leaf entry.
    #[inline]
    fn translate(&mut self, va: u64, access: Access) -> Result<(usize, usize), LaneFault> {
        let vpn = va >> INDEX_SHIFT;
        let t = self.tlb[vpn as usize % TLB_ENTRIES];
        if t.tag == vpn.wrapping_add(1) {
            // Acquire: pairs with the Release stores of `write_ptes`, so a mapped slot's copied-in data is visible.
            let pte = self.mem.tables[t.leaf].load(Acquire);
            if pte & VALID != 0 && pte >> INDEX_SHIFT == u64::from(t.slot) {
                return self.check_leaf(va, pte, t.leaf, t.slot, access);
            }
        }
        self.walk(va, access)
    }

    /// Walks the table from the root.
    fn walk(&mut self, va: u64, access: Access) -> Result<(usize, usize), LaneFault> {
        if va >> VA_BITS != 0 {
            return Err(access.fault(va, FaultKind::NotPresent));
        }
        let mut table = 0usize;
        for level in (2..=LEVELS).rev() {
            // Acquire: pairs with the Release stores of `write_ptes`, so a mapped slot's copied-in data is visible.
            let e = self.mem.tables[table * ENTRIES + level_index(va, level)].load(Acquire);
            if e & VALID == 0 {
                return Err(access.fault(va, FaultKind::NotPresent));
            }
            let next = e >> INDEX_SHIFT;
            if next >= u64::from(self.mem.table_pages) {
                return Err(access.fault(va, FaultKind::BadEntry));
            }
            table = next as usize;
        }
        let leaf = table * ENTRIES + level_index(va, 1);
        // Acquire: pairs with the Release stores of `write_ptes`, so a mapped slot's copied-in data is visible.
        let pte = self.mem.tables[leaf].load(Acquire);
        if pte & VALID == 0 {
            return Err(access.fault(va, FaultKind::NotPresent));
        }
        let slot = pte >> INDEX_SHIFT;
        if !self.mem.slot_valid(slot) {
            return Err(access.fault(va, FaultKind::BadEntry));
        }
        let vpn = va >> INDEX_SHIFT;
        self.tlb[vpn as usize % TLB_ENTRIES] = TlbEntry {
            tag: vpn + 1,
            leaf,
            slot: slot as u32,
        };
        self.check_leaf(va, pte, leaf, slot as u32, access)
    }

    #[inline]
    fn check_leaf(
        &self,
        va: u64,
        pte: u64,
        leaf: usize,
        slot: u32,
        access: Access,
    ) -> Result<(usize, usize), LaneFault> {
        if access != Access::Read && pte & WRITABLE == 0 {
            return Err(access.fault(va, FaultKind::ReadOnly));
        }
        // Atomics set ACCESSED | DIRTY after the operation instead.
        if access != Access::Atomic && pte & ACCESSED == 0 {
            self.mem.tables[leaf].fetch_or(ACCESSED, Relaxed);
        }
        Ok((slot as usize * WORDS_PER_PAGE, leaf))
    }

    #[inline]
    fn load_word(&self, w: usize) -> u32 {
        // Relaxed: pool words are only ever accessed atomically (no data race); ordering with the host comes from the launch channel and the submission mutex.
        let v = self.mem.word(w).load(Relaxed);
        if self.buf.words.is_empty() {
            v
        } else {
            self.buf.overlay(w, v)
        }
    }

    /// Reads `out.len()` bytes at `va` (any alignment, may cross pages).
    pub fn load_bytes(&mut self, va: u64, out: &mut [u8]) -> Result<(), LaneFault> {
        let mut done = 0usize;
        while done < out.len() {
            let a = va
                .checked_add(done as u64)
                .ok_or(Access::Read.fault(va, FaultKind::NotPresent))?;
            let off = (a as usize) % PAGE;
            let n = (PAGE - off).min(out.len() - done);
            let (base, _) = self.translate(a, Access::Read)?;
            let chunk = &mut out[done..done + n];
            let mut i = 0;
            while i < n {
                let byte = off + i;
                let shift = byte % 4;
                let take = (4 - shift).min(n - i);
                let bytes = self.load_word(base + byte / 4).to_le_bytes();
                chunk[i..i + take].copy_from_slice(&bytes[shift..shift + take]);
                i += take;
            }
            done += n;
        }
        Ok(())
    }

    /// Buffers a store of `data` at `va` (any alignment, may cross pages).
    /// Every page is translated (and must be writable) before anything is
    /// buffered for it; a fault on a later page leaves earlier pages
    /// buffered, which does not matter since the invocation stops and its
    /// buffer is discarded.
    pub fn store_bytes(&mut self, va: u64, data: &[u8]) -> Result<(), LaneFault> {
        let mut done = 0usize;
        while done < data.len() {
            let a = va
                .checked_add(done as u64)
                .ok_or(Access::Write.fault(va, FaultKind::NotPresent))?;
            let off = (a as usize) % PAGE;
            let n = (PAGE - off).min(data.len() - done);
            let (base, leaf) = self.translate(a, Access::Write)?;
            self.buf.note_page(a, leaf, base);
            let chunk = &data[done..done + n];
            let mut i = 0;
            while i < n {
                let byte = off + i;
                let shift = byte % 4;
                let take = (4 - shift).min(n - i);
                let mut bytes = [0u8; 4];
                bytes[shift..shift + take].copy_from_slice(&chunk[i..i + take]);
                self.buf.put(
                    base + byte / 4,
                    byte_mask(shift, take),
                    u32::from_le_bytes(bytes),
                );
                i += take;
            }
            done += n;
        }
        Ok(())
    }

    /// Loads a byte.
    pub fn load_u8(&mut self, va: u64) -> Result<u8, LaneFault> {
        let mut b = [0u8; 1];
        self.load_bytes(va, &mut b)?;
        Ok(b[0])
    }

    /// Loads a little-endian `u32` (one atomic word access). `va` must be
    /// 4-byte aligned: otherwise a [`FaultKind::Misaligned`] fault, as on
    /// the GPU drivers. Byte access at any alignment:
    /// [`Lane::load_bytes`].
    #[inline]
    pub fn load_u32(&mut self, va: u64) -> Result<u32, LaneFault> {
        if !va.is_multiple_of(4) {
            return Err(Access::Read.fault(va, FaultKind::Misaligned));
        }
        let (base, _) = self.translate(va, Access::Read)?;
        Ok(self.load_word(base + (va as usize % PAGE) / 4))
    }

    /// Loads a little-endian `u64` (two word accesses, not one atomic
    /// access). `va` must be 8-byte aligned ([`FaultKind::Misaligned`]
    /// otherwise).
    #[inline]
    pub fn load_u64(&mut self, va: u64) -> Result<u64, LaneFault> {
        if !va.is_multiple_of(8) {
            return Err(Access::Read.fault(va, FaultKind::Misaligned));
        }
        let (base, _) = self.translate(va, Access::Read)?;
        let w = base + (va as usize % PAGE) / 4;
        let lo = self.load_word(w);
        let hi = self.load_word(w + 1);
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    /// Loads an `f32`.
    pub fn load_f32(&mut self, va: u64) -> Result<f32, LaneFault> {
        self.load_u32(va).map(f32::from_bits)
    }

    /// Loads an `f64`.
    pub fn load_f64(&mut self, va: u64) -> Result<f64, LaneFault> {
        self.load_u64(va).map(f64::from_bits)
    }

    /// Buffers a byte store.
    pub fn store_u8(&mut self, va: u64, v: u8) -> Result<(), LaneFault> {
        self.store_bytes(va, &[v])
    }

    /// Buffers a little-endian `u32` store. `va` must be 4-byte aligned
    /// ([`FaultKind::Misaligned`] otherwise; [`Lane::store_bytes`] for any
    /// alignment).
    #[inline]
    pub fn store_u32(&mut self, va: u64, v: u32) -> Result<(), LaneFault> {
        if !va.is_multiple_of(4) {
            return Err(Access::Write.fault(va, FaultKind::Misaligned));
        }
        let (base, leaf) = self.translate(va, Access::Write)?;
        self.buf.note_page(va, leaf, base);
        self.buf.put(base + (va as usize % PAGE) / 4, u32::MAX, v);
        Ok(())
    }

    /// Buffers a little-endian `u64` store. `va` must be 8-byte aligned
    /// ([`FaultKind::Misaligned`] otherwise).
    pub fn store_u64(&mut self, va: u64, v: u64) -> Result<(), LaneFault> {
        if !va.is_multiple_of(8) {
            return Err(Access::Write.fault(va, FaultKind::Misaligned));
        }
        self.store_bytes(va, &v.to_le_bytes())
    }

    /// Buffers an `f32` store.
    pub fn store_f32(&mut self, va: u64, v: f32) -> Result<(), LaneFault> {
        self.store_u32(va, v.to_bits())
    }

    /// Buffers an `f64` store.
    pub fn store_f64(&mut self, va: u64, v: f64) -> Result<(), LaneFault> {
        self.store_u64(va, v.to_bits())
    }

    /// Runs `op` on the word at `va` at once (not buffered), then sets
    /// `ACCESSED | DIRTY` on the leaf.
    fn rmw(&mut self, va: u64, op: impl FnOnce(&AtomicU32) -> u32) -> Result<u32, LaneFault> {
        if !va.is_multiple_of(4) {
            return Err(Access::Atomic.fault(va, FaultKind::Misaligned));
        }
        let (base, leaf) = self.translate(va, Access::Atomic)?;
        let old = op(self.mem.word(base + (va as usize % PAGE) / 4));
        // Release: a host that sees DIRTY (AcqRel in clear_pte_bits) also sees the data stored before it.
        self.mem.tables[leaf].fetch_or(ACCESSED | DIRTY, Release);
        Ok(old)
    }

    /// Atomic wrapping add; returns the previous value. `va` must be 4-byte
    /// aligned ([`FaultKind::Misaligned`] otherwise). Applies immediately,
    /// even if the invocation faults later.
    pub fn atomic_add_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.fetch_add(v, AcqRel))
    }

    /// Atomic wrapping subtract; returns the previous value.
    pub fn atomic_sub_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.fetch_sub(v, AcqRel))
    }

    /// Atomic bitwise AND; returns the previous value.
    pub fn atomic_and_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.fetch_and(v, AcqRel))
    }

    /// Atomic bitwise OR; returns the previous value.
    pub fn atomic_or_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.fetch_or(v, AcqRel))
    }

    /// Atomic bitwise XOR; returns the previous value.
    pub fn atomic_xor_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.fetch_xor(v, AcqRel))
    }

    /// Atomic unsigned minimum; returns the previous value.
    pub fn atomic_min_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.fetch_min(v, AcqRel))
    }

    /// Atomic unsigned maximum; returns the previous value.
    pub fn atomic_max_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.fetch_max(v, AcqRel))
    }

    /// Atomic exchange; returns the previous value.
    pub fn atomic_exchange_u32(&mut self, va: u64, v: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| w.swap(v, AcqRel))
    }

    /// Atomic compare-and-swap: stores `new` if the word equals `current`.
    /// Returns the previous value (the swap happened iff it equals
    /// `current`). Counts as a write (`DIRTY`) either way, as in WGSL.
    pub fn atomic_cas_u32(&mut self, va: u64, current: u32, new: u32) -> Result<u32, LaneFault> {
        self.rmw(va, |w| {
            match w.compare_exchange(current, new, AcqRel, Acquire) {
                Ok(v) | Err(v) => v,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmm_core::mirror::backend::DeviceConfig;
    use hmm_core::mirror::format::{PoolSlot, Pte, TablePage};

    const VA: u64 = 0x1000_0000;

    /// Memory with pages `VA` → slot 0 (writable) and `VA + 4096` → slot 1
    /// (writable); tables 1..=3 form the chain.
    fn mem() -> Memory {
        let m = Memory::new(
            DeviceConfig {
                pool_slots: 4,
                table_pages: 4,
            },
            16,
        )
        .expect("alloc");
        let set = |t: u32, i: usize, p: Pte| m.tables[t as usize * ENTRIES + i].store(p.0, Relaxed);
        set(0, level_index(VA, 4), Pte::table(TablePage(1)));
        set(1, level_index(VA, 3), Pte::table(TablePage(2)));
        set(2, level_index(VA, 2), Pte::table(TablePage(3)));
        set(3, level_index(VA, 1), Pte::leaf(PoolSlot(0), true));
        set(3, level_index(VA + 4096, 1), Pte::leaf(PoolSlot(1), true));
        m
    }

    #[test]
    fn read_your_writes_any_alignment() {
        let m = mem();
        let mut lane = Lane::new(&m, &[]);
        lane.begin(0);
        lane.store_u32(VA, 0x1122_3344).expect("store");
        assert_eq!(lane.load_u32(VA).expect("load"), 0x1122_3344);
        lane.store_u8(VA + 1, 0xaa).expect("store");
        assert_eq!(lane.load_u32(VA).expect("load"), 0x1122_aa44);
        // Unaligned bytes across the page boundary.
        let edge = VA + 4096 - 3;
        let bytes = 0x0102_0304_0506_0708u64.to_le_bytes();
        lane.store_bytes(edge, &bytes).expect("store");
        let mut back = [0u8; 8];
        lane.load_bytes(edge, &mut back).expect("load");
        assert_eq!(back, bytes);
        assert_eq!(lane.load_u8(VA + 4096).expect("load"), 0x05);
        // Nothing reached memory yet.
        assert!(m.pool.iter().all(|w| w.load(Relaxed) == 0));
        lane.commit().expect("commit");
        assert_eq!(m.pool[0].load(Relaxed), 0x1122_aa44);
        assert_eq!(m.pool[1023].load(Relaxed), 0x0607_0800);
        assert_eq!(m.pool[1024].load(Relaxed), 0x0203_0405);
        assert_eq!(m.pool[1025].load(Relaxed), 0x01);
        // Committed pages are ACCESSED | DIRTY.
        let leaf = 3 * ENTRIES + level_index(VA, 1);
        assert_eq!(
            m.tables[leaf].load(Relaxed) & (ACCESSED | DIRTY),
            ACCESSED | DIRTY
        );
    }

    #[test]
    fn partial_word_commit_keeps_neighbour_bytes() {
        let m = mem();
        m.pool[5].store(0xdead_beef, Relaxed);
        let mut lane = Lane::new(&m, &[]);
        lane.begin(0);
        lane.store_u8(VA + 21, 0x00).expect("store");
        lane.store_u8(VA + 22, 0xff).expect("store");
        // Another "invocation" changes byte 0 meanwhile.
        m.pool[5].store(0xdead_be11, Relaxed);
        lane.commit().expect("commit");
        assert_eq!(m.pool[5].load(Relaxed), 0xdeff_0011);
    }

    #[test]
    fn commit_rechecks_the_leaf() {
        let m = mem();
        let mut lane = Lane::new(&m, &[]);
        lane.begin(0);
        lane.store_u32(VA + 4096, 7).expect("store");
        lane.store_u32(VA, 7).expect("store");
        // The host zaps the first page before the invocation finishes.
        m.tables[3 * ENTRIES + level_index(VA, 1)].store(0, Relaxed);
        let f = lane.commit().expect_err("zapped page must fault");
        assert_eq!((f.addr, f.write, f.kind), (VA, true, FaultKind::NotPresent));
        assert!(
            m.pool.iter().all(|w| w.load(Relaxed) == 0),
            "nothing applied"
        );
    }

    #[test]
    fn atomics_apply_at_once_and_check_alignment() {
        let m = mem();
        let mut lane = Lane::new(&m, &[]);
        lane.begin(0);
        assert_eq!(lane.atomic_add_u32(VA + 8, 5).expect("add"), 0);
        assert_eq!(m.pool[2].load(Relaxed), 5);
        assert_eq!(lane.atomic_cas_u32(VA + 8, 5, 9).expect("cas"), 5);
        assert_eq!(lane.atomic_cas_u32(VA + 8, 5, 1).expect("cas"), 9);
        assert_eq!(lane.atomic_max_u32(VA + 8, 3).expect("max"), 9);
        let f = lane.atomic_add_u32(VA + 2, 1).expect_err("misaligned");
        assert_eq!(f.kind, FaultKind::Misaligned);
        assert!(f.atomic && f.write);
        lane.discard();
    }

    #[test]
    fn walks_fault_without_panicking() {
        let m = mem();
        // A leaf pointing past the pool and a directory past the tables.
        m.tables[3 * ENTRIES + level_index(VA + 2 * 4096, 1)]
            .store(Pte::leaf(PoolSlot(99), true).0, Relaxed);
        m.tables[level_index(0x0080_0000_0000, 4)].store(Pte::table(TablePage(77)).0, Relaxed);
        let mut lane = Lane::new(&m, &[]);
        lane.begin(0);
        let kind = |r: Result<u32, LaneFault>| r.expect_err("fault").kind;
        assert_eq!(kind(lane.load_u32(VA + 2 * 4096)), FaultKind::BadEntry);
        assert_eq!(kind(lane.load_u32(0x0080_0000_0000)), FaultKind::BadEntry);
        assert_eq!(kind(lane.load_u32(VA + 3 * 4096)), FaultKind::NotPresent);
        assert_eq!(kind(lane.load_u32(1 << 48)), FaultKind::NotPresent);
        assert_eq!(kind(lane.load_u32(u64::MAX - 3)), FaultKind::NotPresent);
        let mut big = [0u8; 16];
        let f = lane
            .load_bytes(VA + 2 * 4096 - 8, &mut big)
            .expect_err("second page is bad");
        assert_eq!(f.addr, VA + 2 * 4096);
    }

    #[test]
    fn tlb_sees_downgrade() {
        let m = mem();
        let mut lane = Lane::new(&m, &[]);
        lane.begin(0);
        lane.store_u32(VA, 1).expect("writable");
        m.tables[3 * ENTRIES + level_index(VA, 1)].store(Pte::leaf(PoolSlot(0), false).0, Relaxed);
        let f = lane.store_u32(VA, 2).expect_err("read-only now");
        assert_eq!(f.kind, FaultKind::ReadOnly);
        assert_eq!(lane.load_u32(VA).expect("still readable"), 1);
    }
}
