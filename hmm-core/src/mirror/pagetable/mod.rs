//! The host's shadow of a device page table.
//!
//! The device walks its page table on its own; the host never reads it back
//! to decide anything (except the `ACCESSED`/`DIRTY` bits the device sets).
//! Instead the host keeps [`ShadowTable`], an exact copy, changes the copy,
//! and for every entry it changes appends a [`PteWrite`] the backend must
//! apply with [`Backend::write_ptes`](super::backend::Backend::write_ptes).
//! Replaying every emitted write, in order, onto a zeroed device table
//! yields the shadow, entry for entry.
//!
//! # Structure
//!
//! Table pages live in an arena indexed by [`TablePage`] number — the same
//! number the device uses, so an entry's index field is the arena index.
//! Each page has 512 entries plus a little metadata: its level (4 = root
//! … 1 = leaf; 0 marks a free page), the location of the directory entry
//! that points at it, a 512-bit occupancy bitmap of its valid entries and
//! the count of them. Freed pages go on a free list and are reused before
//! the arena grows; the arena grows lazily, so a large budget costs nothing
//! until it is used. The budget (`DeviceConfig::table_pages`) is a hard cap
//! on allocated pages, root included.
//!
//! A page that loses its last valid entry is freed at once and its
//! directory entry cleared, so the table never holds empty directory pages
//! (apart from the root) and a freed page is all zero both here and on the
//! device: reusing it needs no clearing writes.
//!
//! # Costs
//!
//! - [`ShadowTable::lookup`], [`ShadowTable::leaf_loc`],
//!   [`ShadowTable::update_leaf`]: a walk of four entries, O(1).
//! - [`ShadowTable::map`]: the same walk twice (once to count the pages it
//!   needs, so it fails before changing anything), plus at most three
//!   page allocations.
//! - [`ShadowTable::unmap_range`], [`ShadowTable::mapped_in`]: visit only
//!   valid entries, found through the occupancy bitmaps a 64-bit word at a
//!   time, so the cost is proportional to the mapped pages in the range
//!   (plus a word scan per visited table page), never to the range size:
//!   zapping all of a 47-bit space that maps three pages touches a dozen
//!   entries.
//! - Memory: 4 KiB of entries plus 80 bytes of bookkeeping per table page
//!   (the arena keeps its high-water mark; freed pages wait on the free list).
//!
//! # Write ordering
//!
//! Every write targets a table page that is reachable from the root on the
//! device at the moment the write is applied. [`ShadowTable::map`] emits
//! new directory entries top-down and the leaf last, so the device never
//! finds a leaf under a missing directory; [`ShadowTable::unmap_range`]
//! clears a page's entries before clearing the directory entry that
//! leads to it, so a freed page is zero on the device before it can be
//! reused.

use core::fmt;

use thiserror::Error;

use super::backend::{PteLoc, PteWrite};
use super::format::{level_index, Pte, TablePage, ENTRIES, INDEX_SHIFT, LEVELS, VALID, VA_BITS};
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};

/// First virtual address the table cannot translate.
const VA_LIMIT: u64 = 1 << VA_BITS;
/// 64-bit words in an occupancy bitmap.
const WORDS: usize = ENTRIES / 64;

/// Errors of [`ShadowTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TableError {
    /// A table needs at least its root page.
    #[error("a page table needs at least one table page (the root)")]
    NoRoot,
    /// Mapping needed more table pages than the budget has left; nothing
    /// was changed.
    #[error("out of table pages: mapping needs {needed}, {free} free")]
    OutOfTablePages {
        /// Pages the mapping needed.
        needed: u32,
        /// Pages still free.
        free: u32,
    },
    /// The address is not page aligned.
    #[error("address {0:#x} is not page aligned")]
    Unaligned(u64),
    /// The address lies at or above `1 << VA_BITS`, outside what the
    /// table translates.
    #[error("address {0:#x} is above the {VA_BITS}-bit space the table translates")]
    AboveVaBits(u64),
    /// The entry to map is not a valid leaf (its `VALID` bit is clear).
    #[error("entry {0:?} is not a valid leaf")]
    InvalidLeaf(Pte),
}

/// Per-page bookkeeping.
#[derive(Clone, Copy)]
struct Meta {
    /// Bit `i` is set iff entry `i` is valid.
    occupied: [u64; WORDS],
    /// Number of valid entries (the bitmap's population count).
    live: u16,
    /// 4 = root … 1 = leaf; 0 = free.
    level: u8,
    /// The directory entry pointing at this page (meaningless for the root
    /// and for free pages).
    parent: PteLoc,
}

impl Meta {
    const FREE: Meta = Meta {
        occupied: [0; WORDS],
        live: 0,
        level: 0,
        parent: PteLoc {
            table: TablePage::ROOT,
            index: 0,
        },
    };

    /// First valid entry at or after `from`, if any.
    fn next_set(&self, from: usize) -> Option<usize> {
        let mut w = from / 64;
        if w >= WORDS {
            return None;
        }
        let mut bits = self.occupied[w] & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            if w == WORDS {
                return None;
            }
            bits = self.occupied[w];
        }
    }
}

/// Bit position of the index a table page at `level` uses.
const fn shift(level: u32) -> u32 {
    INDEX_SHIFT + 9 * (level - 1)
}

/// First and last entry of a page at `level` whose VA span starts at
/// `base` that overlap `[s, e)`. The caller guarantees the overlap is
/// non-empty.
fn index_span(level: u32, base: u64, s: u64, e: u64) -> (usize, usize) {
    let sh = shift(level);
    let first = (s.saturating_sub(base) >> sh) as usize;
    let last = (((e - 1).saturating_sub(base) >> sh) as usize).min(ENTRIES - 1);
    (first, last)
}

/// The page-aligned part of `range` the table can translate, as `[s, e)`,
/// or `None` if empty. Pages only partly inside `range` count as inside.
fn clip(range: VaRange) -> Option<(u64, u64)> {
    let s = range.start().page_down().get();
    let e = range
        .end()
        .page_up()
        .map_or(VA_LIMIT, |e| e.get().min(VA_LIMIT));
    (s < e).then_some((s, e))
}

/// Host copy of a device page table; see the module docs
/// (`hmm-core/src/mirror/pagetable.rs`).
#[derive(Clone)]
pub struct ShadowTable {
    /// Entries of every page ever allocated, indexed by table page number.
    entries: Vec<[Pte; ENTRIES]>,
    /// Bookkeeping, parallel to `entries`.
    meta: Vec<Meta>,
    /// Free page numbers (all-zero pages below `entries.len()`).
    free: Vec<u32>,
    /// Most pages that may be allocated at once.
    budget: u32,
    /// Valid leaf entries.
    mapped: u64,
}

impl fmt::Debug for ShadowTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowTable")
            .field("mapped_pages", &self.mapped)
            .field("table_pages_used", &self.table_pages_used())
            .field("budget", &self.budget)
            .finish()
    }
}

impl ShadowTable {
    /// An empty table with a budget of `table_pages` pages; the root is
    /// allocated at once. Errors: [`TableError::NoRoot`] for 0 pages.
    pub fn new(table_pages: u32) -> Result<Self, TableError> {
        if table_pages == 0 {
            return Err(TableError::NoRoot);
        }
        let mut root = Meta::FREE;
        root.level = LEVELS as u8;
        Ok(ShadowTable {
            entries: vec![[Pte::EMPTY; ENTRIES]],
            meta: vec![root],
            free: Vec::new(),
            budget: table_pages,
            mapped: 0,
        })
    }

    /// Table page and entry index of the leaf entry for `va` if its leaf
    /// table page exists (the entry itself may be empty).
    fn leaf_slot(&self, va: u64) -> Option<(usize, usize)> {
        if va >= VA_LIMIT {
            return None;
        }
        let mut page = 0usize;
        for level in (2..=LEVELS).rev() {
            let e = self.entries[page][level_index(va, level)];
            if !e.valid() {
                return None;
            }
            page = e.next_table().0 as usize;
        }
        Some((page, level_index(va, 1)))
    }

    /// The leaf entry for the page containing `va`, if mapped.
    pub fn lookup(&self, va: VirtAddr) -> Option<Pte> {
        let (p, i) = self.leaf_slot(va.get())?;
        let e = self.entries[p][i];
        e.valid().then_some(e)
    }

    /// Where the leaf entry for the page containing `va` lives on the
    /// device (to read or clear its `ACCESSED`/`DIRTY` bits), if mapped.
    pub fn leaf_loc(&self, va: VirtAddr) -> Option<PteLoc> {
        let (p, i) = self.leaf_slot(va.get())?;
        self.entries[p][i].valid().then_some(PteLoc {
            table: TablePage(p as u32),
            index: i as u16,
        })
    }

    /// Stores `pte` at entry `idx` of `page`, keeping the bitmap and count
    /// right; returns the old entry.
    fn set(&mut self, page: usize, idx: usize, pte: Pte) -> Pte {
        let old = core::mem::replace(&mut self.entries[page][idx], pte);
        let m = &mut self.meta[page];
        let bit = 1u64 << (idx % 64);
        match (old.valid(), pte.valid()) {
            (false, true) => {
                m.occupied[idx / 64] |= bit;
                m.live += 1;
            }
            (true, false) => {
                m.occupied[idx / 64] &= !bit;
                m.live -= 1;
            }
            _ => {}
        }
        old
    }

    /// Allocates a zeroed page at `level` linked from `parent`. The caller
    /// checked the budget.
    fn alloc_page(&mut self, level: u32, parent: PteLoc) -> usize {
        let meta = Meta {
            occupied: [0; WORDS],
            live: 0,
            level: level as u8,
            parent,
        };
        match self.free.pop() {
            Some(p) => {
                self.meta[p as usize] = meta;
                p as usize
            }
            None => {
                self.entries.push([Pte::EMPTY; ENTRIES]);
                self.meta.push(meta);
                self.entries.len() - 1
            }
        }
    }

    /// Maps the page at `va` (page aligned) to the leaf `pte`, allocating
    /// directory pages as needed, and appends the device writes: new
    /// directory entries top-down, then the leaf. Returns the leaf it
    /// replaced, if any.
    ///
    /// Errors (nothing changed, nothing appended):
    /// [`TableError::Unaligned`], [`TableError::AboveVaBits`],
    /// [`TableError::InvalidLeaf`], [`TableError::OutOfTablePages`].
    pub fn map(
        &mut self,
        va: VirtAddr,
        pte: Pte,
        writes: &mut Vec<PteWrite>,
    ) -> Result<Option<Pte>, TableError> {
        let v = va.get();
        if !va.is_page_aligned() {
            return Err(TableError::Unaligned(v));
        }
        if v >= VA_LIMIT {
            return Err(TableError::AboveVaBits(v));
        }
        if !pte.valid() {
            return Err(TableError::InvalidLeaf(pte));
        }
        // Count the directory pages the walk lacks before touching anything.
        let mut page = 0usize;
        let mut needed = 0u32;
        for level in (2..=LEVELS).rev() {
            let e = self.entries[page][level_index(v, level)];
            if !e.valid() {
                needed = level - 1;
                break;
            }
            page = e.next_table().0 as usize;
        }
        let free = self.table_pages_free();
        if needed > free {
            return Err(TableError::OutOfTablePages { needed, free });
        }
        let mut page = 0usize;
        for level in (2..=LEVELS).rev() {
            let idx = level_index(v, level);
            let e = self.entries[page][idx];
            if e.valid() {
                page = e.next_table().0 as usize;
                continue;
            }
            let loc = PteLoc {
                table: TablePage(page as u32),
                index: idx as u16,
            };
            let child = self.alloc_page(level - 1, loc);
            let dir = Pte::table(TablePage(child as u32));
            self.set(page, idx, dir);
            writes.push(PteWrite {
                table: loc.table,
                index: loc.index,
                pte: dir,
            });
            page = child;
        }
        let idx = level_index(v, 1);
        let old = self.set(page, idx, pte);
        writes.push(PteWrite {
            table: TablePage(page as u32),
            index: idx as u16,
            pte,
        });
        if old.valid() {
            Ok(Some(old))
        } else {
            self.mapped += 1;
            Ok(None)
        }
    }

    /// Zaps every leaf for a page overlapping `range` (normally page
    /// aligned; parts at or above `1 << VA_BITS` hold nothing), appending
    /// `(va, old entry)` to `removed` in ascending order and the device
    /// writes to `writes`. Table pages left empty are freed and the
    /// directory entries pointing at them cleared (after the page's own
    /// entries). Cost: proportional to the mapped pages in the range.
    pub fn unmap_range(
        &mut self,
        range: VaRange,
        writes: &mut Vec<PteWrite>,
        removed: &mut Vec<(VirtAddr, Pte)>,
    ) {
        if let Some((s, e)) = clip(range) {
            self.zap(0, LEVELS, 0, s, e, writes, removed);
        }
    }

    /// Clears the valid entries of `page` (at `level`, spanning VAs from
    /// `base`) that overlap `[s, e)`, recursing into directories and
    /// freeing children left empty.
    #[allow(clippy::too_many_arguments)]
    fn zap(
        &mut self,
        page: usize,
        level: u32,
        base: u64,
        s: u64,
        e: u64,
        writes: &mut Vec<PteWrite>,
        removed: &mut Vec<(VirtAddr, Pte)>,
    ) {
        let sh = shift(level);
        let (first, last) = index_span(level, base, s, e);
        let mut next = self.meta[page].next_set(first);
        while let Some(idx) = next.filter(|&i| i <= last) {
            let va = base + ((idx as u64) << sh);
            if level == 1 {
                let old = self.set(page, idx, Pte::EMPTY);
                self.mapped -= 1;
                removed.push((VirtAddr(va), old));
                writes.push(PteWrite {
                    table: TablePage(page as u32),
                    index: idx as u16,
                    pte: Pte::EMPTY,
                });
            } else {
                let child = self.entries[page][idx].next_table().0 as usize;
                self.zap(child, level - 1, va, s, e, writes, removed);
                if self.meta[child].live == 0 {
                    self.meta[child] = Meta::FREE;
                    self.free.push(child as u32);
                    self.set(page, idx, Pte::EMPTY);
                    writes.push(PteWrite {
                        table: TablePage(page as u32),
                        index: idx as u16,
                        pte: Pte::EMPTY,
                    });
                }
            }
            next = self.meta[page].next_set(idx + 1);
        }
    }

    /// Replaces the leaf for the page containing `va` by `f(old)` and
    /// appends the write if the value changed; returns the old entry, or
    /// `None` (and does nothing) if no leaf is mapped there. Meant for flag
    /// changes (clear `WRITABLE` for a read-only downgrade; record
    /// `ACCESSED`/`DIRTY` read back from the device). The new entry always
    /// keeps `VALID` set: a leaf is removed only by
    /// [`ShadowTable::unmap_range`].
    pub fn update_leaf(
        &mut self,
        va: VirtAddr,
        f: impl FnOnce(Pte) -> Pte,
        writes: &mut Vec<PteWrite>,
    ) -> Option<Pte> {
        let (p, i) = self.leaf_slot(va.get())?;
        let old = self.entries[p][i];
        if !old.valid() {
            return None;
        }
        let new = Pte(f(old).0 | VALID);
        if new != old {
            self.entries[p][i] = new;
            writes.push(PteWrite {
                table: TablePage(p as u32),
                index: i as u16,
                pte: new,
            });
        }
        Some(old)
    }

    /// The mapped pages overlapping `range`, ascending, with their leaf
    /// entries. Skips absent subtrees: the cost is proportional to what it
    /// yields.
    pub fn mapped_in(&self, range: VaRange) -> impl Iterator<Item = (VirtAddr, Pte)> + '_ {
        MappedIter::new(self, range)
    }

    /// Valid leaf entries.
    pub fn mapped_pages(&self) -> u64 {
        self.mapped
    }

    /// Table pages allocated, root included.
    pub fn table_pages_used(&self) -> u32 {
        (self.entries.len() - self.free.len()) as u32
    }

    /// Table pages the budget has left.
    pub fn table_pages_free(&self) -> u32 {
        self.budget - self.table_pages_used()
    }

    /// Checks every structural invariant, panicking on the first broken
    /// one: directory entries point at allocated pages one level down
    /// whose parent link points back; every allocated page is reached
    /// exactly once; bitmaps and counts match the entries; no page but the
    /// root is empty; free pages are zero and listed once; the mapped count
    /// and the budget are right. A test hook: O(allocated pages × 512).
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let n = self.entries.len();
        assert_eq!(self.meta.len(), n, "meta parallel to entries");
        assert!(self.table_pages_used() <= self.budget, "over budget");
        let mut listed = vec![false; n];
        for &p in &self.free {
            let p = p as usize;
            assert!(p != 0 && p < n, "free page {p} out of range");
            assert!(!listed[p], "page {p} on the free list twice");
            listed[p] = true;
            let m = &self.meta[p];
            assert_eq!(m.level, 0, "free page {p} has a level");
            assert!(
                m.live == 0 && m.occupied == [0; WORDS],
                "free page {p} has entries"
            );
            assert!(
                self.entries[p].iter().all(|e| *e == Pte::EMPTY),
                "free page {p} not zero"
            );
        }
        let mut reached = vec![false; n];
        reached[0] = true;
        let mut leaves = 0u64;
        let mut stack = vec![0usize];
        while let Some(p) = stack.pop() {
            let m = &self.meta[p];
            let mut count = 0u16;
            for (i, e) in self.entries[p].iter().enumerate() {
                let bit = m.occupied[i / 64] >> (i % 64) & 1 == 1;
                assert_eq!(bit, e.valid(), "bitmap of page {p} wrong at {i}");
                if !e.valid() {
                    assert_eq!(*e, Pte::EMPTY, "invalid entry {p}/{i} not zero");
                    continue;
                }
                count += 1;
                if m.level == 1 {
                    leaves += 1;
                    continue;
                }
                assert_eq!(
                    *e,
                    Pte::table(e.next_table()),
                    "directory entry {p}/{i} has flag bits"
                );
                let c = e.next_table().0 as usize;
                assert!(c < n, "directory {p}/{i} points past the arena");
                assert!(!listed[c], "directory {p}/{i} points at free page {c}");
                assert!(!reached[c], "page {c} reached twice");
                reached[c] = true;
                let cm = &self.meta[c];
                assert_eq!(u32::from(cm.level) + 1, u32::from(m.level), "level of {c}");
                assert_eq!(
                    cm.parent,
                    PteLoc {
                        table: TablePage(p as u32),
                        index: i as u16
                    },
                    "parent link of {c}"
                );
                stack.push(c);
            }
            assert_eq!(count, m.live, "live count of page {p}");
            if p != 0 {
                assert!(m.live > 0, "empty page {p} not freed");
            }
        }
        for p in 0..n {
            assert!(
                reached[p] != listed[p],
                "page {p} neither reachable nor free (or both)"
            );
        }
        assert_eq!(self.meta[0].level, LEVELS as u8, "root level");
        assert_eq!(leaves, self.mapped, "mapped count");
    }
}

/// Depth-first cursor behind [`ShadowTable::mapped_in`].
struct MappedIter<'a> {
    table: &'a ShadowTable,
    /// Clipped range `[s, e)`.
    s: u64,
    e: u64,
    /// `(page, next index to look at, base va)` per level, root first.
    stack: [(usize, usize, u64); LEVELS as usize],
    /// Frames in use (0 = exhausted).
    depth: usize,
}

impl<'a> MappedIter<'a> {
    fn new(table: &'a ShadowTable, range: VaRange) -> Self {
        let (s, e, depth) = match clip(range) {
            Some((s, e)) => (s, e, 1),
            None => (0, 0, 0),
        };
        let first = if depth == 1 {
            index_span(LEVELS, 0, s, e).0
        } else {
            0
        };
        MappedIter {
            table,
            s,
            e,
            stack: [(0, first, 0); LEVELS as usize],
            depth,
        }
    }
}

impl Iterator for MappedIter<'_> {
    type Item = (VirtAddr, Pte);

    fn next(&mut self) -> Option<Self::Item> {
        while self.depth > 0 {
            let level = LEVELS - (self.depth as u32 - 1);
            let (page, from, base) = self.stack[self.depth - 1];
            let (_, last) = index_span(level, base, self.s, self.e);
            let Some(idx) = self.table.meta[page].next_set(from).filter(|&i| i <= last) else {
                self.depth -= 1;
                continue;
            };
            self.stack[self.depth - 1].1 = idx + 1;
            let va = base + ((idx as u64) << shift(level));
            let entry = self.table.entries[page][idx];
            if level == 1 {
                return Some((VirtAddr(va), entry));
            }
            let first = index_span(level - 1, va, self.s, self.e).0;
            self.stack[self.depth] = (entry.next_table().0 as usize, first, va);
            self.depth += 1;
        }
        None
    }
}

// A leaf entry maps exactly one CPU base page.
const _: () = assert!(PAGE_SIZE == 1 << INDEX_SHIFT);

#[cfg(test)]
mod tests;
