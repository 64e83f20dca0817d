//! Device memory: the page pool and the page-table buffer.
//!
//! # Memory model
//!
//! Both buffers are arrays of atomics, so every access made by device work
//! (kernel loads, committed stores, atomics, `ACCESSED`/`DIRTY` updates) is
//! an atomic access and two invocations racing on the same bytes — which
//! a buggy or merely racy kernel may do, as on a GPU — is never a data race
//! in the Rust sense. Pool words are `AtomicU32` (the granularity of GPU
//! atomics): sub-word stores touch only their own bytes via `fetch_and` /
//! `fetch_or`, 64-bit accesses are two word accesses (not single-copy
//! atomic, as on a GPU without 64-bit atomics). Only one access size is
//! ever used on the pool, so there are no mixed-size atomic accesses.
//!
//! The host copies ([`Memory::copy_in`], [`Memory::copy_out`]) are plain
//! `memcpy`s over the same bytes (`AtomicU32` has the layout of `u32` and
//! is an `UnsafeCell`, so writing through a pointer derived from a shared
//! reference is allowed). They are non-atomic, which is sound only because
//! [`hmm_core::mirror::backend::Backend`]'s contract serialises them
//! against device work on those slots: a copy into a slot never overlaps
//! device work using it, and a copy out of a slot never overlaps device
//! work writing it (concurrent device *reads* are fine: two reads are never
//! a data race). The happens-before edges come from the worker queue
//! (launch → invocation: channel send/receive) and from the submission
//! table (invocation → `wait`/`take_outcome`: a mutex).

use core::ptr;
use core::sync::atomic::Ordering::{Acquire, Relaxed};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::alloc::{self, Layout};

use hmm_core::mirror::backend::{BackendError, DeviceConfig};
use hmm_core::mirror::format::{PoolSlot, ENTRIES, TABLE_PAGE_BYTES};

/// Pool words (`u32`) per 4 KiB page.
pub(crate) const WORDS_PER_PAGE: usize = (TABLE_PAGE_BYTES / 4) as usize;
/// Bytes per page, as `usize`.
pub(crate) const PAGE: usize = TABLE_PAGE_BYTES as usize;

/// Types for which the all-zero bit pattern is a valid value.
///
/// # Safety
///
/// Implementers must be valid when every byte is zero and have no drop glue.
unsafe trait ZeroValid {}
// SAFETY: `AtomicU32` has the layout of `u32`; zero is `AtomicU32::new(0)`.
unsafe impl ZeroValid for AtomicU32 {}
// SAFETY: `AtomicU64` has the layout of `u64`; zero is `AtomicU64::new(0)`.
unsafe impl ZeroValid for AtomicU64 {}

/// Allocates `len` zeroed `T`s, reporting allocation failure as
/// [`BackendError::OutOfMemory`] instead of aborting. Large allocations
/// come from `calloc`/`mmap`, so untouched pages cost no memory.
fn zeroed_slice<T: ZeroValid>(len: usize, what: &str) -> Result<Box<[T]>, BackendError> {
    if len == 0 {
        return Ok(Vec::new().into_boxed_slice());
    }
    let layout = Layout::array::<T>(len)
        .map_err(|_| BackendError::OutOfMemory(format!("{what}: {len} elements overflow")))?;
    // SAFETY: `layout` has non-zero size: `len > 0` and `T` (an atomic
    // integer) is not zero-sized.
    let p = unsafe { alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        return Err(BackendError::OutOfMemory(format!(
            "{what}: {} bytes",
            layout.size()
        )));
    }
    // SAFETY: `p` was allocated by the global allocator with
    // `Layout::array::<T>(len)`, exactly the layout `Box<[T]>` of length
    // `len` deallocates with; all `len` elements are initialised because
    // all-zero bytes are a valid `T` (`ZeroValid`); we own the allocation.
    Ok(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, len)) })
}

/// The page pool: `len` words starting on a 2 MiB boundary inside a
/// zeroed allocation 2 MiB longer than they need.
///
/// Slot `s` is then page `s % 512` of huge page `s / 512`: a batch of
/// slots handed out in order fills whole huge pages, and a copy of up to
/// 512 slots into a fresh pool touches one untouched huge page rather than
/// straddling a half-used one (the recoverable copy picks its store kind
/// by whether the destination is populated: `hmm_core::cpu::safecopy`).
pub(crate) struct Pool {
    /// The allocation (zeroed by `calloc`/`mmap`: untouched pages cost no
    /// memory).
    words: Box<[AtomicU32]>,
    /// Index of the first pool word in `words` (the 2 MiB boundary).
    start: usize,
    /// Pool words.
    len: usize,
}

impl Pool {
    /// `len` zeroed words, 2 MiB aligned, with huge pages advised.
    fn new(len: usize) -> Result<Self, BackendError> {
        if len == 0 {
            return Ok(Pool {
                words: Box::new([]),
                start: 0,
                len: 0,
            });
        }
        const HUGE: usize = 2 << 20;
        let pad = HUGE / core::mem::size_of::<AtomicU32>();
        let total = len
            .checked_add(pad)
            .ok_or_else(|| BackendError::OutOfMemory("pool size overflows".into()))?;
        let words: Box<[AtomicU32]> = zeroed_slice(total, "page pool")?;
        let base = words.as_ptr() as usize;
        // The allocation is 4-byte aligned, so the distance to the next
        // 2 MiB boundary is a whole number of words, and at most `pad`.
        let start = (base.next_multiple_of(HUGE) - base) / core::mem::size_of::<AtomicU32>();
        let pool = Pool { words, start, len };
        advise_huge(&pool);
        Ok(pool)
    }
}

impl core::ops::Deref for Pool {
    type Target = [AtomicU32];
    fn deref(&self) -> &[AtomicU32] {
        &self.words[self.start..self.start + self.len]
    }
}

/// Asks for transparent huge pages under the pool (best effort): a
/// slot's first copy then faults in 2 MiB (512 slots) at once instead of
/// taking one page fault and one zeroed 4 KiB page per slot — per slot,
/// the fault cost more than the copy (`perf` of `examples/fault_service`:
/// `do_anonymous_page` under the copy in). Slots are handed out low first,
/// so the huge pages fill up. Only pool memory is advised (the aligned
/// interior of its allocation).
fn advise_huge(pool: &[AtomicU32]) {
    const HUGE: usize = 2 << 20;
    let start = pool.as_ptr() as usize;
    let end = start + core::mem::size_of_val(pool);
    let a = start.next_multiple_of(HUGE);
    let b = end & !(HUGE - 1);
    if a < b {
        // SAFETY: advice on `[a, b)`, 2 MiB aligned and inside the pool's
        // allocation, which we own; it changes no contents.
        let _ = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
    }
}

/// The device's memory, shared (by `Arc`) between the device and jobs.
pub(crate) struct Memory {
    /// `pool_slots * 1024` words.
    pub(crate) pool: Pool,
    /// `table_pages * 512` entries; entry `t * 512 + i` is index `i` of
    /// table page `t`.
    pub(crate) tables: Box<[AtomicU64]>,
    /// Number of pool slots.
    pub(crate) pool_slots: u32,
    /// Number of table pages.
    pub(crate) table_pages: u32,
    /// Zero-copy mode: the host windows (`CpuDevice::zero_copy`).
    pub(crate) windows: Option<Windows>,
}

/// Host windows of a zero-copy device: window `w` reaches `len_pages[w]`
/// pages of host memory at `base[w]`; slot `w * pages + p` is its page
/// `p`. Changed only by `bind_window`/`unbind_window`, which the core calls
/// only while no device work may use the window.
pub(crate) struct Windows {
    /// Pages per window (the slot stride).
    pub(crate) pages: u32,
    /// Host address of each window's first page (0: unbound).
    pub(crate) base: Box<[AtomicUsize]>,
    /// Pages bound in each window (0: unbound).
    pub(crate) len_pages: Box<[AtomicU32]>,
    /// Windows unreachable but not released (an injected `unbind_window`
    /// failure): not bindable until an unbind succeeds.
    pub(crate) held: Box<[AtomicBool]>,
}

impl Windows {
    /// `count` unbound windows of `pages` pages.
    pub(crate) fn new(count: u32, pages: u32) -> Self {
        Windows {
            pages,
            base: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            len_pages: (0..count).map(|_| AtomicU32::new(0)).collect(),
            held: (0..count).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Whether `slot` names a page of a bound window.
    fn slot_valid(&self, slot: u64) -> bool {
        let w = slot / u64::from(self.pages);
        let page = slot % u64::from(self.pages);
        self.len_pages
            .get(w as usize)
            // Acquire: pairs with the Release store of `bind_window`, so the base is seen too.
            .is_some_and(|n| page < u64::from(n.load(Acquire)))
    }
}

impl Memory {
    /// Allocates zeroed pool and table memory.
    pub(crate) fn new(config: DeviceConfig, max_pool_slots: u32) -> Result<Self, BackendError> {
        if config.table_pages == 0 {
            return Err(BackendError::Other(
                "table_pages must be at least 1 (page 0 is the root)".into(),
            ));
        }
        if config.pool_slots > max_pool_slots {
            return Err(BackendError::OutOfMemory(format!(
                "{} pool slots requested, at most {max_pool_slots}",
                config.pool_slots
            )));
        }
        let words = (config.pool_slots as usize)
            .checked_mul(WORDS_PER_PAGE)
            .ok_or_else(|| BackendError::OutOfMemory("pool size overflows".into()))?;
        let entries = (config.table_pages as usize)
            .checked_mul(ENTRIES)
            .ok_or_else(|| BackendError::OutOfMemory("table size overflows".into()))?;
        Ok(Memory {
            pool: Pool::new(words)?,
            tables: zeroed_slice(entries, "page table")?,
            pool_slots: config.pool_slots,
            table_pages: config.table_pages,
            windows: None,
        })
    }

    /// Whether a leaf entry's `slot` may be accessed: a pool slot, or in
    /// zero-copy mode a page of a bound window.
    #[inline]
    pub(crate) fn slot_valid(&self, slot: u64) -> bool {
        match &self.windows {
            None => slot < u64::from(self.pool_slots),
            Some(w) => w.slot_valid(slot),
        }
    }

    /// The device word `w` (`slot * 1024 + word in page`) of a slot that
    /// passed [`Memory::slot_valid`] during the current launch.
    #[inline]
    pub(crate) fn word(&self, w: usize) -> &AtomicU32 {
        let Some(win) = &self.windows else {
            return &self.pool[w];
        };
        let slot = w / WORDS_PER_PAGE;
        let (window, page) = (slot / win.pages as usize, slot % win.pages as usize);
        // Relaxed: `slot_valid` (Acquire on the length) already ordered this after the bind.
        let base = win.base[window].load(Relaxed);
        let addr = base + page * PAGE + (w % WORDS_PER_PAGE) * 4;
        // SAFETY: the slot passed `slot_valid` in this launch, so the window
        // is bound to at least `page + 1` pages at `base` (page-aligned host
        // memory), and it stays bound while device work may use it (the
        // core unbinds only when none is in flight). That the memory is
        // still mapped, and not accessed non-atomically by other threads
        // meanwhile, is the contract of the `unsafe` constructor
        // `CpuDevice::zero_copy`. `addr` is 4-byte aligned (page-aligned base
        // plus a word offset); `AtomicU32` has the layout of `u32`.
        unsafe { &*(addr as *const AtomicU32) }
    }

    /// Writes one word of every pool page, so the host backs the whole
    /// pool now rather than on each slot's first copy: one
    /// `MADV_POPULATE_WRITE` (Linux 5.14+), else a store per page.
    pub(crate) fn touch_pool(&self) {
        let bytes = core::mem::size_of_val(&*self.pool);
        let start = self.pool.as_ptr() as usize;
        let (a, b) = (start.next_multiple_of(PAGE), (start + bytes) & !(PAGE - 1));
        if a < b {
            // SAFETY: `[a, b)` lies inside the pool's allocation, which we
            // own; populating for write faults its pages in as a write of
            // the bytes they already hold would, changing no contents.
            let rc =
                unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_POPULATE_WRITE) };
            if rc == 0 {
                // The partial pages at either end, if the allocation is not
                // page aligned, were outside the advice.
                for w in [self.pool.first(), self.pool.last()].into_iter().flatten() {
                    // Relaxed: as below.
                    w.store(0, core::sync::atomic::Ordering::Relaxed);
                }
                return;
            }
        }
        for w in self.pool.iter().step_by(WORDS_PER_PAGE) {
            // Relaxed: no device work exists yet (called from `init`), and
            // zero is the value the word already holds.
            w.store(0, core::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Index of the first pool word of `slot`, if the slot exists.
    pub(crate) fn slot_word(&self, slot: PoolSlot) -> Result<usize, BackendError> {
        if slot.0 >= self.pool_slots {
            return Err(BackendError::Other(format!(
                "pool slot {} out of range (pool has {} slots)",
                slot.0, self.pool_slots
            )));
        }
        Ok(slot.0 as usize * WORDS_PER_PAGE)
    }

    /// Byte pointer to the first pool word of a slot (from
    /// [`Memory::slot_word`]). Derived from the whole slice, so it may be
    /// used for all 4096 bytes of the slot; writing through it is allowed
    /// because every byte is inside an `UnsafeCell` (`AtomicU32`).
    pub(crate) fn slot_ptr(&self, first_word: usize) -> *mut u8 {
        // `wrapping_add` keeps this safe code; `first_word + 1024 <=
        // pool.len()` holds for results of `slot_word`, so it stays in bounds.
        self.pool
            .as_ptr()
            .wrapping_add(first_word)
            .cast::<u8>()
            .cast_mut()
    }

    /// Copies 4096 bytes from `src` into the slot starting at word `first_word`.
    ///
    /// # Safety
    ///
    /// `first_word` comes from [`Memory::slot_word`]; `src` is valid for
    /// reads of 4096 bytes and does not overlap the pool; no device work
    /// accesses the slot concurrently (and the caller's synchronisation
    /// orders this copy before any later device work on it).
    pub(crate) unsafe fn copy_in(&self, first_word: usize, src: *const u8) {
        let dst = self.slot_ptr(first_word);
        // SAFETY: `dst` points at 4096 bytes of the pool (the slot is in
        // range, see `slot_word`), writable through the `UnsafeCell`s of the
        // atomics; `src` is readable for 4096 bytes and disjoint from the
        // pool (caller); no concurrent access to the slot (caller), so the
        // non-atomic write is not a data race.
        unsafe { ptr::copy_nonoverlapping(src, dst, PAGE) };
    }

    /// Copies the slot starting at word `first_word` to 4096 bytes at `dst`.
    ///
    /// # Safety
    ///
    /// `first_word` comes from [`Memory::slot_word`]; `dst` is valid for
    /// writes of 4096 bytes, not aliased by a Rust reference, and disjoint
    /// from the pool; no device work writes the slot concurrently.
    pub(crate) unsafe fn copy_out(&self, first_word: usize, dst: *mut u8) {
        let src = self.slot_ptr(first_word).cast_const();
        // SAFETY: `src` is 4096 readable pool bytes (slot in range); device
        // work may at most read them concurrently (caller), and concurrent
        // reads are not a data race; `dst` is writable, unaliased and
        // disjoint (caller).
        unsafe { ptr::copy_nonoverlapping(src, dst, PAGE) };
    }

    /// The entry at `index` of table page `table`, if it exists.
    pub(crate) fn entry(&self, table: u32, index: u16) -> Result<&AtomicU64, BackendError> {
        if table >= self.table_pages || usize::from(index) >= ENTRIES {
            return Err(BackendError::Other(format!(
                "page-table entry {table}:{index} out of range ({} table pages of {ENTRIES} entries)",
                self.table_pages
            )));
        }
        Ok(&self.tables[table as usize * ENTRIES + usize::from(index)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::Ordering;

    #[test]
    fn allocation_is_zeroed_and_sized() {
        let m = Memory::new(
            DeviceConfig {
                pool_slots: 3,
                table_pages: 2,
            },
            16,
        )
        .expect("alloc");
        assert_eq!(m.pool.len(), 3 * WORDS_PER_PAGE);
        assert_eq!(m.tables.len(), 2 * ENTRIES);
        assert!(m.pool.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        assert!(m.tables.iter().all(|e| e.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn bad_configs_are_errors() {
        let no_root = DeviceConfig {
            pool_slots: 1,
            table_pages: 0,
        };
        assert!(matches!(
            Memory::new(no_root, 16),
            Err(BackendError::Other(_))
        ));
        let too_big = DeviceConfig {
            pool_slots: 17,
            table_pages: 1,
        };
        assert!(matches!(
            Memory::new(too_big, 16),
            Err(BackendError::OutOfMemory(_))
        ));
    }

    #[test]
    fn copies_round_trip_and_bounds_are_checked() {
        let m = Memory::new(
            DeviceConfig {
                pool_slots: 2,
                table_pages: 1,
            },
            16,
        )
        .expect("alloc");
        let src: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        let w = m.slot_word(PoolSlot(1)).expect("slot 1");
        // SAFETY: `src` is 4096 readable bytes outside the pool; nothing else
        // uses the memory.
        unsafe { m.copy_in(w, src.as_ptr()) };
        assert_eq!(
            m.pool[w + 1].load(Ordering::Relaxed),
            u32::from_le_bytes([28, 35, 42, 49])
        );
        let mut dst = vec![0u8; PAGE];
        // SAFETY: `dst` is 4096 writable unaliased bytes outside the pool.
        unsafe { m.copy_out(w, dst.as_mut_ptr()) };
        assert_eq!(src, dst);
        assert!(m.slot_word(PoolSlot(2)).is_err());
        assert!(m.entry(1, 0).is_err());
        assert!(m.entry(0, 512).is_err());
        assert!(m.entry(0, 511).is_ok());
    }
}
