//! Unit tests of the shadow table.
use super::*;
use crate::mirror::format::{PoolSlot, ACCESSED, DIRTY, WRITABLE};

fn leaf(n: u32) -> Pte {
    Pte::leaf(PoolSlot(n), true)
}

fn range(start: u64, len: u64) -> VaRange {
    VaRange::from_start_len(VirtAddr(start), len).unwrap()
}

#[test]
fn zero_budget_is_an_error() {
    assert_eq!(ShadowTable::new(0).unwrap_err(), TableError::NoRoot);
}

#[test]
fn one_page_budget_changes_nothing_on_failure() {
    let mut t = ShadowTable::new(1).unwrap();
    let mut w = Vec::new();
    assert_eq!(
        t.map(VirtAddr(0x1000), leaf(1), &mut w),
        Err(TableError::OutOfTablePages { needed: 3, free: 0 })
    );
    assert!(w.is_empty());
    assert_eq!(t.table_pages_used(), 1);
    assert_eq!(t.mapped_pages(), 0);
    assert_eq!(t.lookup(VirtAddr(0x1000)), None);
    t.check_invariants();
}

#[test]
fn partial_budget_fails_whole_then_fits_a_neighbour() {
    // 4 pages: root + one path. A second page in another 1 GiB needs 2 more.
    let mut t = ShadowTable::new(4).unwrap();
    let mut w = Vec::new();
    t.map(VirtAddr(0x1000), leaf(1), &mut w).unwrap();
    assert_eq!(w.len(), 4, "three directory entries then the leaf");
    // Top-down: each write lands in the page the previous one linked.
    assert_eq!(w[0].table, TablePage::ROOT);
    for k in 1..4 {
        assert_eq!(w[k - 1].pte, Pte::table(w[k].table));
    }
    assert_eq!(w[3].pte, leaf(1));
    w.clear();
    assert_eq!(
        t.map(VirtAddr(1 << 30), leaf(2), &mut w),
        Err(TableError::OutOfTablePages { needed: 2, free: 0 })
    );
    assert!(w.is_empty());
    // Same leaf page: no new pages needed.
    assert_eq!(t.map(VirtAddr(0x2000), leaf(2), &mut w), Ok(None));
    assert_eq!(w.len(), 1);
    t.check_invariants();
}

#[test]
fn bad_addresses_are_typed_errors() {
    let mut t = ShadowTable::new(8).unwrap();
    let mut w = Vec::new();
    assert_eq!(
        t.map(VirtAddr(0x1001), leaf(1), &mut w),
        Err(TableError::Unaligned(0x1001))
    );
    assert_eq!(
        t.map(VirtAddr(1 << 48), leaf(1), &mut w),
        Err(TableError::AboveVaBits(1 << 48))
    );
    assert_eq!(
        t.map(VirtAddr(!0xfffu64), leaf(1), &mut w),
        Err(TableError::AboveVaBits(!0xfffu64))
    );
    assert_eq!(
        t.map(VirtAddr(0x1000), Pte::EMPTY, &mut w),
        Err(TableError::InvalidLeaf(Pte::EMPTY))
    );
    assert!(w.is_empty());
    assert_eq!(t.lookup(VirtAddr(1 << 48)), None);
    assert_eq!(t.lookup(VirtAddr(u64::MAX)), None);
    t.check_invariants();
}

#[test]
fn top_of_47_and_48_bit_spaces() {
    let mut t = ShadowTable::new(16).unwrap();
    let mut w = Vec::new();
    let top47 = (1u64 << 47) - 4096;
    let top48 = (1u64 << 48) - 4096;
    t.map(VirtAddr(top47), leaf(7), &mut w).unwrap();
    t.map(VirtAddr(top48), leaf(8), &mut w).unwrap();
    assert_eq!(t.lookup(VirtAddr(top47 + 123)), Some(leaf(7)));
    assert_eq!(t.lookup(VirtAddr(top48 + 4095)), Some(leaf(8)));
    let loc = t.leaf_loc(VirtAddr(top48)).unwrap();
    assert_eq!(loc.index, 511);
    let all: Vec<_> = t.mapped_in(VaRange::everything()).collect();
    assert_eq!(
        all,
        vec![(VirtAddr(top47), leaf(7)), (VirtAddr(top48), leaf(8))]
    );
    let mut removed = Vec::new();
    t.unmap_range(VaRange::everything(), &mut w, &mut removed);
    assert_eq!(removed.len(), 2);
    assert_eq!(t.table_pages_used(), 1);
    t.check_invariants();
}

#[test]
fn replacing_returns_old_leaf() {
    let mut t = ShadowTable::new(8).unwrap();
    let mut w = Vec::new();
    assert_eq!(t.map(VirtAddr(0x5000), leaf(1), &mut w), Ok(None));
    assert_eq!(t.map(VirtAddr(0x5000), leaf(2), &mut w), Ok(Some(leaf(1))));
    assert_eq!(t.mapped_pages(), 1);
    assert_eq!(t.lookup(VirtAddr(0x5000)), Some(leaf(2)));
    t.check_invariants();
}

#[test]
fn huge_sparse_unmap_is_cheap_and_frees_pages() {
    let mut t = ShadowTable::new(64).unwrap();
    let mut w = Vec::new();
    // The last two share a 512 GiB entry (root index 255), not a 1 GiB one.
    let vas = [0x1000u64, 0x7f80_0000_0000, 0x7fff_ffff_f000];
    for (i, &va) in vas.iter().enumerate() {
        t.map(VirtAddr(va), leaf(i as u32), &mut w).unwrap();
    }
    assert_eq!(t.table_pages_used(), 1 + 3 * 3 - 1);
    w.clear();
    let mut removed = Vec::new();
    // A 1 TiB range (2^28 pages) holding two mapped pages.
    t.unmap_range(range(0x7f80_0000_0000, 1 << 40), &mut w, &mut removed);
    let got: Vec<u64> = removed.iter().map(|r| r.0.get()).collect();
    assert_eq!(got, vec![0x7f80_0000_0000, 0x7fff_ffff_f000]);
    // 2 leaf clears, then one directory clear per freed page: 2 leaf
    // pages, 2 level-2 pages, the shared level-3 page.
    assert_eq!(w.len(), 2 + 2 + 2 + 1);
    assert_eq!(t.table_pages_used(), 4);
    assert_eq!(t.lookup(VirtAddr(0x1000)), Some(leaf(0)));
    t.check_invariants();
}

#[test]
fn freeing_a_page_clears_its_directory_entry() {
    let mut t = ShadowTable::new(8).unwrap();
    let mut w = Vec::new();
    t.map(VirtAddr(0x20_0000), leaf(1), &mut w).unwrap();
    let leaf_page = t.leaf_loc(VirtAddr(0x20_0000)).unwrap().table;
    let dirs: Vec<PteWrite> = w[..3].to_vec();
    w.clear();
    let mut removed = Vec::new();
    t.unmap_range(range(0x20_0000, 4096), &mut w, &mut removed);
    assert_eq!(removed, vec![(VirtAddr(0x20_0000), leaf(1))]);
    // Leaf clear first, then the directory entries bottom-up.
    assert_eq!(w[0].table, leaf_page);
    assert_eq!(w[0].pte, Pte::EMPTY);
    let cleared: Vec<(TablePage, u16)> = w[1..].iter().map(|x| (x.table, x.index)).collect();
    let expect: Vec<(TablePage, u16)> = dirs.iter().rev().map(|x| (x.table, x.index)).collect();
    assert_eq!(cleared, expect);
    assert!(w.iter().all(|x| x.pte == Pte::EMPTY));
    assert_eq!(t.table_pages_used(), 1);
    assert_eq!(t.table_pages_free(), 7);
    t.check_invariants();
    // Freed pages are reused.
    w.clear();
    t.map(VirtAddr(0x40_0000), leaf(2), &mut w).unwrap();
    assert_eq!(t.table_pages_used(), 4);
    t.check_invariants();
}

#[test]
fn unaligned_unmap_covers_touched_pages() {
    let mut t = ShadowTable::new(8).unwrap();
    let mut w = Vec::new();
    for p in 1..=3u64 {
        t.map(VirtAddr(p * 4096), leaf(p as u32), &mut w).unwrap();
    }
    let mut removed = Vec::new();
    t.unmap_range(range(4096 + 10, 4096), &mut w, &mut removed);
    assert_eq!(removed.len(), 2);
    assert_eq!(t.lookup(VirtAddr(3 * 4096)), Some(leaf(3)));
    t.check_invariants();
}

#[test]
fn update_leaf_changes_flags_only_when_present() {
    let mut t = ShadowTable::new(8).unwrap();
    let mut w = Vec::new();
    assert_eq!(t.update_leaf(VirtAddr(0x1000), |p| p, &mut w), None);
    t.map(VirtAddr(0x1000), leaf(9), &mut w).unwrap();
    w.clear();
    let old = t.update_leaf(VirtAddr(0x1000), |p| Pte(p.0 & !WRITABLE), &mut w);
    assert_eq!(old, Some(leaf(9)));
    assert_eq!(
        t.lookup(VirtAddr(0x1000)),
        Some(Pte::leaf(PoolSlot(9), false))
    );
    assert_eq!(w.len(), 1);
    // Clearing VALID is not allowed: the leaf stays.
    t.update_leaf(VirtAddr(0x1000), |_| Pte(ACCESSED | DIRTY), &mut w);
    assert!(t.lookup(VirtAddr(0x1000)).unwrap().valid());
    // An unchanged value emits nothing.
    w.clear();
    t.update_leaf(VirtAddr(0x1000), |p| p, &mut w);
    assert!(w.is_empty());
    assert_eq!(t.mapped_pages(), 1);
    t.check_invariants();
}

#[test]
fn mapped_in_respects_bounds() {
    let mut t = ShadowTable::new(32).unwrap();
    let mut w = Vec::new();
    for p in [0u64, 511, 512, 1 << 18, 1 << 27] {
        t.map(VirtAddr(p << 12), leaf(p as u32), &mut w).unwrap();
    }
    let got: Vec<u64> = t
        .mapped_in(range(511 << 12, (1 << 30) + 4096 - (511 << 12)))
        .map(|(va, _)| va.vpn())
        .collect();
    assert_eq!(got, vec![511, 512, 1 << 18], "2^27 lies past the end");
    assert_eq!(t.mapped_in(range(1 << 48, 4096)).count(), 0);
    assert_eq!(t.mapped_in(range(4096, 4096)).count(), 0);
}
