//! Twin pages for the twin/diff write-back, kept outside the C heap.
//!
//! Invalidation callbacks run on the userfaultfd monitor thread, and some
//! of the events they handle come from a thread that is inside `free()`
//! holding a malloc arena lock while the kernel makes it wait for the
//! monitor (a heap trim of a mirrored range: `brk` shrink → `UNMAP`, or
//! `MADV_DONTNEED` → `REMOVE`). If the callback then freed heap memory
//! that another thread had allocated, it could need that very lock: a
//! deadlock. Twins are created on one thread and dropped on another, so
//! they live here instead: one `mmap`'d slab of 4 KiB twin pages, as many
//! as there are pool slots, reserved without backing (`MAP_NORESERVE`) and
//! touched only where a twin is kept. No allocation or free happens after
//! creation: the slot → twin index and the free list are sized then.
//!
//! **Where a twin goes.** Twins are handed out densely, lowest free twin
//! page first, not at the pool slot's own offset: a launch that writes a
//! few pages scattered over the pool (one output page per fault round,
//! say) touches one corner of the slab instead of one 2 MiB block per
//! page. The slab's first 2 MiB stay on 4 KiB pages (`MADV_NOHUGEPAGE`),
//! so such a launch pays a 4 KiB fault per twin, not the kernel zeroing a
//! 2 MiB huge page for each; the rest asks for huge pages
//! (`MADV_HUGEPAGE`, best effort), where a dense writer's twins then fault
//! in 512 at a time — per page, a 4 KiB first touch costs more than the
//! twin's copy itself.

use crate::mirror::format::PoolSlot;

const PAGE: usize = 4096;
/// Twin pages in the slab's first 2 MiB, kept on small pages.
const SMALL: usize = (2 << 20) / PAGE;
/// `index` entry of a slot without a twin.
const NONE: u32 = u32::MAX;

pub(crate) struct Twins {
    base: *mut u8,
    slots: usize,
    /// Pool slot → twin page, or `NONE`.
    index: Vec<u32>,
    /// Free twin pages, lowest last (popped first). Its capacity is
    /// `slots` from creation, and it never holds more, so a push never
    /// allocates.
    free: Vec<u32>,
    /// The slots that have a twin, in no order ([`Twins::twinned`]); same
    /// capacity rule as `free`.
    live: Vec<u32>,
    /// Slot → its position in `live`, or `NONE`.
    live_at: Vec<u32>,
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
    /// not be reserved (or `slots` twin pages do not fit a `u32` index).
    pub(crate) fn new(slots: u32) -> Option<Self> {
        let slots = slots as usize;
        if slots == 0 {
            return Some(Twins {
                base: std::ptr::null_mut(),
                slots: 0,
                index: Vec::new(),
                free: Vec::new(),
                live: Vec::new(),
                live_at: Vec::new(),
            });
        }
        if slots >= NONE as usize {
            return None;
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
        // Page sizes as the module docs say; best effort, the advice
        // changes no contents. The kernel aligns huge pages to 2 MiB in
        // the address space, so a small-page head that ends off a 2 MiB
        // boundary only keeps the block it ends in from being huge.
        let small = len.min(SMALL * PAGE);
        // SAFETY: advice on our own fresh mapping, inside its length.
        let _ = unsafe { libc::madvise(p, small, libc::MADV_NOHUGEPAGE) };
        if len > small {
            // SAFETY: as above; `p + small .. p + len` lies in the mapping.
            let _ = unsafe {
                libc::madvise(
                    p.cast::<u8>().add(small).cast(),
                    len - small,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        Some(Twins {
            base: p.cast(),
            slots,
            index: vec![NONE; slots],
            free: (0..slots as u32).rev().collect(),
            live: Vec::with_capacity(slots),
            live_at: vec![NONE; slots],
        })
    }

    /// The twin page `t` (`t < slots`).
    fn page(&self, t: u32) -> &[u8] {
        let i = t as usize;
        assert!(i < self.slots, "twin page {i} outside the slab");
        // SAFETY: `i < slots`, so the 4 KiB at `base + i*4096` lie inside
        // our mapping, which lives as long as `self`; the shared borrow of
        // `self` rules out writers.
        unsafe { std::slice::from_raw_parts(self.base.add(i * PAGE), PAGE) }
    }

    /// Records `data` (4 KiB) as the twin of `slot`. A slot outside the
    /// pool keeps no twin (the write-back then writes the page whole).
    pub(crate) fn set(&mut self, slot: PoolSlot, data: &[u8]) {
        let Some(&t) = self.index.get(slot.0 as usize) else {
            return;
        };
        let t = if t != NONE {
            t
        } else {
            // Never empty: at most `slots` twins, one per slot.
            let Some(t) = self.free.pop() else { return };
            self.index[slot.0 as usize] = t;
            self.live_at[slot.0 as usize] = self.live.len() as u32;
            // Within capacity: at most `slots` slots have twins.
            self.live.push(slot.0);
            t
        };
        let i = t as usize;
        assert!(i < self.slots, "twin page {i} outside the slab");
        // SAFETY: `i < slots`, so the 4 KiB at `base + i*4096` lie inside
        // our mapping; the exclusive borrow of `self` makes this the only
        // reference into it.
        let p = unsafe { std::slice::from_raw_parts_mut(self.base.add(i * PAGE), PAGE) };
        p.copy_from_slice(&data[..PAGE]);
    }

    /// The twin of `slot`, if it has one.
    pub(crate) fn get(&self, slot: PoolSlot) -> Option<&[u8]> {
        match *self.index.get(slot.0 as usize)? {
            NONE => None,
            t => Some(self.page(t)),
        }
    }

    /// Drops the twin of `slot`; its page goes back to the free list (the
    /// memory stays reserved for reuse).
    pub(crate) fn remove(&mut self, slot: PoolSlot) {
        if let Some(t) = self.index.get_mut(slot.0 as usize) {
            if *t != NONE {
                // Within capacity: every twin page in use came off `free`.
                self.free.push(*t);
                *t = NONE;
                let at = self.live_at[slot.0 as usize] as usize;
                self.live.swap_remove(at);
                if let Some(&moved) = self.live.get(at) {
                    self.live_at[moved as usize] = at as u32;
                }
                self.live_at[slot.0 as usize] = NONE;
            }
        }
    }

    /// The slots that have a twin, in no particular order.
    pub(crate) fn twinned(&self) -> &[u32] {
        &self.live
    }

    /// Twin pages in use.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.slots - self.free.len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn page_of(v: u8) -> Vec<u8> {
        vec![v; PAGE]
    }

    #[test]
    fn twins_are_packed_low_whatever_their_slots() {
        let mut t = Twins::new(4096).unwrap();
        for s in [0u32, 1025, 2050, 3075] {
            t.set(PoolSlot(s), &page_of(s as u8));
        }
        // Four twins occupy the slab's first four pages, not four blocks.
        assert_eq!(t.in_use(), 4);
        assert_eq!(t.index[3075], 3);
        assert_eq!(t.get(PoolSlot(2050)).unwrap()[0], 2050u32 as u8);
        assert!(t.get(PoolSlot(7)).is_none());
        assert!(t.get(PoolSlot(4096)).is_none(), "outside the pool");
        t.set(PoolSlot(4096), &page_of(1));
        assert_eq!(t.in_use(), 4, "a slot outside the pool keeps no twin");
        // And only their four small pages are backed: the head of the slab
        // is not on huge pages (each twin in its own 2 MiB block, as
        // before, backed 8 MiB for these four).
        let mut v = vec![0u8; SMALL];
        // SAFETY: the slab's first `SMALL` pages lie in its mapping (4096
        // slots), page aligned; `v` has a byte per page.
        let rc = unsafe { libc::mincore(t.base.cast(), SMALL * PAGE, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let backed = v.iter().filter(|&&b| b & 1 == 1).count();
        assert_eq!(backed, 4, "pages backed in the slab's first 2 MiB");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u32, u8),
        Remove(u32),
    }

    fn op(slots: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..slots + 2, any::<u8>()).prop_map(|(s, v)| Op::Set(s, v)),
            (0..slots + 2).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Against a map from slot to contents: every `get` agrees, twin
        /// pages in use equal the model's size, and no two slots share a
        /// twin page (a shared page would show as a wrong `get`).
        #[test]
        fn twins_match_a_map_of_slot_to_contents(
            ops in proptest::collection::vec(op(16), 1..200)
        ) {
            let slots = 16u32;
            let mut t = Twins::new(slots).unwrap();
            let mut model: HashMap<u32, u8> = HashMap::new();
            for o in ops {
                match o {
                    Op::Set(s, v) => {
                        t.set(PoolSlot(s), &page_of(v));
                        if s < slots {
                            model.insert(s, v);
                        }
                    }
                    Op::Remove(s) => {
                        t.remove(PoolSlot(s));
                        model.remove(&s);
                    }
                }
                prop_assert_eq!(t.in_use(), model.len());
                let mut live = t.twinned().to_vec();
                live.sort_unstable();
                let mut want: Vec<u32> = model.keys().copied().collect();
                want.sort_unstable();
                prop_assert_eq!(live, want, "the twinned slots");
                prop_assert!(t.free.capacity() == slots as usize);
                for s in 0..slots + 2 {
                    let got = t.get(PoolSlot(s)).map(|p| {
                        assert!(p.iter().all(|&b| b == p[0]));
                        p[0]
                    });
                    prop_assert_eq!(got, model.get(&s).copied(), "slot {}", s);
                }
            }
        }
    }
}
