//! Twin pages for the twin/diff write-back, kept outside the C heap.
//!
//! Invalidation callbacks run on the userfaultfd monitor thread, and some
//! of the events they handle come from a thread that is inside `free()`
//! holding a malloc arena lock while the kernel makes it wait for the
//! monitor (a heap trim of a mirrored range: `brk` shrink → `UNMAP`, or
//! `MADV_DONTNEED` → `REMOVE`). If the callback then freed heap memory
//! that another thread had allocated, it could need that very lock: a
//! deadlock. Twins are created on one thread and dropped on another, so
//! they live here instead: one `mmap`'d slab with a 4 KiB slot per pool
//! slot, reserved without backing (`MAP_NORESERVE`) and touched only for
//! slots that hold a twin. No allocation or free happens after creation.

use crate::mirror::format::PoolSlot;

const PAGE: usize = 4096;

pub(crate) struct Twins {
    base: *mut u8,
    slots: usize,
    valid: Vec<bool>,
}

// SAFETY: `Twins` owns its mapping exclusively; it is only used behind the
// mirror's driver lock, so moving or sharing the owner between threads
// moves no aliasing along with it.
unsafe impl Send for Twins {}
// SAFETY: all access goes through `&self`/`&mut self` methods that follow
// Rust's borrowing rules over the owned mapping.
unsafe impl Sync for Twins {}

impl Twins {
    /// A slab for `slots` pool slots, or `None` if the address space could
    /// not be reserved.
    pub(crate) fn new(slots: u32) -> Option<Self> {
        let slots = slots as usize;
        if slots == 0 {
            return Some(Twins {
                base: std::ptr::null_mut(),
                slots: 0,
                valid: Vec::new(),
            });
        }
        let len = slots.checked_mul(PAGE)?;
        // SAFETY: a fresh private anonymous reservation at a kernel-chosen
        // address; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // Transparent huge pages, best effort: a twin's first touch then
        // faults in 2 MiB (512 slots) at once instead of one zeroed 4 KiB
        // page per twin — per page, the first touch cost more than the
        // copy itself. Slots are handed out low first, so the huge pages
        // fill up.
        // SAFETY: advice on our own fresh mapping; it changes no contents.
        let _ = unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Some(Twins {
            base: p.cast(),
            slots,
            valid: vec![false; slots],
        })
    }

    fn page(&self, slot: PoolSlot) -> Option<&[u8]> {
        let i = slot.0 as usize;
        if i >= self.slots {
            return None;
        }
        // SAFETY: `i < slots`, so the 4 KiB at `base + i*4096` lie inside
        // our mapping, which lives as long as `self`; the shared borrow of
        // `self` rules out writers.
        Some(unsafe { std::slice::from_raw_parts(self.base.add(i * PAGE), PAGE) })
    }

    fn page_mut(&mut self, slot: PoolSlot) -> Option<&mut [u8]> {
        let i = slot.0 as usize;
        if i >= self.slots {
            return None;
        }
        // SAFETY: as in `page`; the exclusive borrow of `self` makes this
        // the only reference into the mapping.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.add(i * PAGE), PAGE) })
    }

    /// Records `data` (4 KiB) as the twin of `slot`.
    pub(crate) fn set(&mut self, slot: PoolSlot, data: &[u8]) {
        if let Some(p) = self.page_mut(slot) {
            p.copy_from_slice(&data[..PAGE]);
            self.valid[slot.0 as usize] = true;
        }
    }

    /// The twin of `slot`, if it has one.
    pub(crate) fn get(&self, slot: PoolSlot) -> Option<&[u8]> {
        if *self.valid.get(slot.0 as usize)? {
            self.page(slot)
        } else {
            None
        }
    }

    /// Drops the twin of `slot` (the memory stays reserved for reuse).
    pub(crate) fn remove(&mut self, slot: PoolSlot) {
        if let Some(v) = self.valid.get_mut(slot.0 as usize) {
            *v = false;
        }
    }
}

impl Drop for Twins {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: unmapping our own reservation once; no reference into
            // it survives `self`.
            unsafe { libc::munmap(self.base.cast(), self.slots * PAGE) };
        }
    }
}
