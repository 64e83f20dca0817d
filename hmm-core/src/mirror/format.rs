//! The device page-table format, shared by every driver and by the shader
//! library (`shaders/PAGE_TABLE.md` describes the same layout for kernel
//! authors; the WGSL library of issue #5 is to be checked against these
//! constants by a test).
//!
//! # Layout
//!
//! An x86-64-style radix tree of **4 KiB table pages**, each holding 512
//! entries of 8 bytes, four levels deep, translating 48-bit CPU virtual
//! addresses (the user half is 47 bits) at 4 KiB granularity:
//!
//! | level | VA bits indexed | covers per entry |
//! |---|---|---|
//! | 4 (root) | 47..39 | 512 GiB |
//! | 3 | 38..30 | 1 GiB |
//! | 2 | 29..21 | 2 MiB |
//! | 1 (leaf) | 20..12 | 4 KiB |
//!
//! Table pages live in one device buffer, numbered from 0; page *n* is at
//! byte offset `n * 4096`. Table page 0 is the root.
//!
//! # Entry
//!
//! 64 bits, little-endian, so shaders without 64-bit integers read it as
//! two `u32` words `lo` (bits 0..31) and `hi` (bits 32..63):
//!
//! | bits | name | meaning |
//! |---|---|---|
//! | 0 | `VALID` | the entry maps something |
//! | 1 | `WRITABLE` | leaf: the device may write the page |
//! | 2 | `ACCESSED` | leaf: set by the device (atomic OR on `lo`) on any access |
//! | 3 | `DIRTY` | leaf: set by the device (atomic OR on `lo`) on a write |
//! | 4..11 | — | reserved, zero |
//! | 12..63 | `INDEX` | directory: next-level table page; leaf: pool slot |
//!
//! The device sets only `ACCESSED` and `DIRTY`, only with atomic OR on the
//! low word; the host owns every other bit and clears A/D with atomic AND.

/// Bytes per table page and per pool page.
pub const TABLE_PAGE_BYTES: u64 = 4096;
/// Entries per table page.
pub const ENTRIES: usize = 512;
/// Levels of the radix tree.
pub const LEVELS: u32 = 4;
/// Bits of VA translated (exclusive upper bound `1 << VA_BITS`).
pub const VA_BITS: u32 = 48;

/// Entry bit: maps something.
pub const VALID: u64 = 1 << 0;
/// Entry bit: the device may write (leaf).
pub const WRITABLE: u64 = 1 << 1;
/// Entry bit: device accessed (leaf; set by the device).
pub const ACCESSED: u64 = 1 << 2;
/// Entry bit: device wrote (leaf; set by the device).
pub const DIRTY: u64 = 1 << 3;
/// Shift of the index field.
pub const INDEX_SHIFT: u32 = 12;
/// Largest encodable index.
pub const MAX_INDEX: u64 = (1 << (64 - INDEX_SHIFT)) - 1;
/// Flag bits the device may set.
pub const DEVICE_BITS: u64 = ACCESSED | DIRTY;

/// A pool slot (a 4 KiB device page).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolSlot(pub u32);

impl PoolSlot {
    /// Byte offset in the pool.
    pub const fn offset(self) -> u64 {
        self.0 as u64 * TABLE_PAGE_BYTES
    }
}

/// A table page of the device page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TablePage(pub u32);

impl TablePage {
    /// The root table page.
    pub const ROOT: TablePage = TablePage(0);
    /// Byte offset in the table buffer.
    pub const fn offset(self) -> u64 {
        self.0 as u64 * TABLE_PAGE_BYTES
    }
}

/// Index into a table page at `level` (4 = root … 1 = leaf) for `va`.
pub const fn level_index(va: u64, level: u32) -> usize {
    ((va >> (INDEX_SHIFT + 9 * (level - 1))) & 511) as usize
}

/// A page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pte(pub u64);

impl Pte {
    /// The empty (invalid) entry.
    pub const EMPTY: Pte = Pte(0);

    /// A directory entry pointing at `next`.
    pub const fn table(next: TablePage) -> Pte {
        Pte(((next.0 as u64) << INDEX_SHIFT) | VALID)
    }

    /// A leaf entry mapping `slot`.
    pub const fn leaf(slot: PoolSlot, writable: bool) -> Pte {
        let w = if writable { WRITABLE } else { 0 };
        Pte(((slot.0 as u64) << INDEX_SHIFT) | VALID | w)
    }

    /// Whether the entry maps something.
    pub const fn valid(self) -> bool {
        self.0 & VALID != 0
    }
    /// Whether a leaf is writable.
    pub const fn writable(self) -> bool {
        self.0 & WRITABLE != 0
    }
    /// Whether the device accessed the page.
    pub const fn accessed(self) -> bool {
        self.0 & ACCESSED != 0
    }
    /// Whether the device wrote the page.
    pub const fn dirty(self) -> bool {
        self.0 & DIRTY != 0
    }
    /// The index field.
    pub const fn index(self) -> u64 {
        self.0 >> INDEX_SHIFT
    }
    /// The index as a pool slot (leaf).
    pub const fn slot(self) -> PoolSlot {
        PoolSlot(self.index() as u32)
    }
    /// The index as a table page (directory).
    pub const fn next_table(self) -> TablePage {
        TablePage(self.index() as u32)
    }
    /// Low 32-bit word (what shaders update atomically).
    pub const fn lo(self) -> u32 {
        self.0 as u32
    }
    /// High 32-bit word.
    pub const fn hi(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl core::fmt::Debug for Pte {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if !self.valid() {
            return f.write_str("Pte(-)");
        }
        write!(
            f,
            "Pte(#{} {}{}{})",
            self.index(),
            if self.writable() { "W" } else { "r" },
            if self.accessed() { "A" } else { "-" },
            if self.dirty() { "D" } else { "-" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_follow_x86_64() {
        let va = 0x0000_7fff_dead_b000u64;
        assert_eq!(level_index(va, 4), ((va >> 39) & 511) as usize);
        assert_eq!(level_index(va, 3), ((va >> 30) & 511) as usize);
        assert_eq!(level_index(va, 2), ((va >> 21) & 511) as usize);
        assert_eq!(level_index(va, 1), ((va >> 12) & 511) as usize);
    }

    #[test]
    fn entry_round_trip() {
        let p = Pte::leaf(PoolSlot(123_456), true);
        assert!(p.valid() && p.writable() && !p.accessed() && !p.dirty());
        assert_eq!(p.slot(), PoolSlot(123_456));
        let p = Pte(p.0 | ACCESSED | DIRTY);
        assert!(p.accessed() && p.dirty());
        assert_eq!(p.slot(), PoolSlot(123_456));
        let t = Pte::table(TablePage(7));
        assert!(t.valid() && !t.writable());
        assert_eq!(t.next_table(), TablePage(7));
        assert_eq!(
            Pte::leaf(PoolSlot(u32::MAX), false).hi(),
            0xfff,
            "slots above 2^20 spill into hi"
        );
        assert!(!Pte::EMPTY.valid());
    }
}
