//! The shadow page table and the page pool against naive models.
//!
//! Table: random map / unmap_range / update_leaf / range-query sequences on
//! a small page budget, against a `BTreeMap<va, Pte>`. After every step the
//! lookups, `leaf_loc`, `mapped_in`, the page counts (predicted from the
//! model: one page per distinct 512 GiB / 1 GiB / 2 MiB prefix, plus the
//! root) and `check_invariants` must agree; and the emitted `PteWrite`s,
//! replayed onto a simulated device table, must produce exactly the model's
//! mappings when walked from the root with `level_index`, leave no stale
//! entry in freed pages, and each land in a page reachable from the root at
//! the moment it is applied (so the device never sees a leaf under a
//! missing directory).
//!
//! Pool: random alloc / free / pick_victim / touch sequences against a
//! `HashMap<slot, va>` with per-slot accessed bits.
//!
//! Both together, as the mirror drives them: faults that take a slot
//! (evicting by CLOCK when the pool is full) and map it, upgrades,
//! accessed bits, range zaps that free slots — one slot per mapped page
//! and one mapped page per used slot after every step.
//!
//! Long runs: `PROPTEST_CASES=100000 cargo test -p hmm-core --release
//! --test mirror_structures_model`.

mod common;

use std::collections::{BTreeMap, HashMap};

use hmm_core::internal::pagetable::ShadowTable;
use hmm_core::internal::pool::PagePool;
use hmm_core::mirror::backend::{PteLoc, PteWrite};
use hmm_core::mirror::format::{
    level_index, PoolSlot, Pte, TablePage, ACCESSED, DIRTY, LEVELS, VALID, WRITABLE,
};
use hmm_core::mirror::TableError;
use hmm_core::{VaRange, VirtAddr};
use proptest::prelude::*;

// ---------------------------------------------------------------- table

/// Index choices per level (root first), picked to make paths share
/// prefixes and to reach both ends of every table page.
const L4: [u64; 4] = [0, 1, 255, 511];
const L3: [u64; 3] = [0, 1, 511];
const L2: [u64; 2] = [0, 511];
const L1: [u64; 4] = [0, 1, 2, 511];
const NVA: usize = L4.len() * L3.len() * L2.len() * L1.len();

fn va_of(sel: usize) -> u64 {
    let sel = sel % NVA;
    let (a, r) = (sel / 24, sel % 24);
    let (b, r) = (r / 8, r % 8);
    let (c, d) = (r / 4, r % 4);
    (L4[a] << 39) | (L3[b] << 30) | (L2[c] << 21) | (L1[d] << 12)
}

#[derive(Clone, Debug)]
enum TOp {
    Map {
        sel: usize,
        slot: u32,
        w: bool,
    },
    /// 0: unaligned, 1: at 2^48, 2: near u64::MAX, 3: invalid entry.
    MapBad(u8, usize),
    Unmap {
        sel: usize,
        off: u16,
        len: u8,
    },
    Update {
        sel: usize,
        how: u8,
    },
    Query {
        sel: usize,
        len: u8,
    },
}

fn top() -> impl Strategy<Value = TOp> {
    prop_oneof![
        6 => (0..NVA, 0u32..1 << 22, any::<bool>()).prop_map(|(sel, slot, w)| TOp::Map { sel, slot, w }),
        1 => (0u8..4, 0..NVA).prop_map(|(k, s)| TOp::MapBad(k, s)),
        3 => (0..NVA, 0u16..4096, any::<u8>()).prop_map(|(sel, off, len)| TOp::Unmap { sel, off, len }),
        2 => (0..NVA, 0u8..5).prop_map(|(sel, how)| TOp::Update { sel, how }),
        1 => (0..NVA, any::<u8>()).prop_map(|(sel, len)| TOp::Query { sel, len }),
    ]
}

/// A range starting at `start` whose length `len` picks from 1 byte up to
/// the rest of the 64-bit space.
fn range_of(start: u64, len: u8) -> VaRange {
    let l = match len % 8 {
        0 => 1,
        1 => 4096,
        2 => 3 * 4096,
        3 => 2 << 20,
        4 => 1 << 30,
        5 => 1 << 39,
        6 => 1 << 40,
        _ => u64::MAX,
    };
    VaRange::from_start_len(VirtAddr(start), l)
        .unwrap_or_else(|_| VaRange::new(VirtAddr(start), VirtAddr(u64::MAX)).unwrap())
}

/// Model keys of pages overlapping `r`.
fn model_in(m: &BTreeMap<u64, Pte>, r: VaRange) -> Vec<(VirtAddr, Pte)> {
    let s = r.start().get() & !0xfff;
    m.range(s..r.end().get())
        .map(|(&k, &p)| (VirtAddr(k), p))
        .collect()
}

/// Pages the model's mappings need: root + one per distinct prefix.
fn pages_needed(m: &BTreeMap<u64, Pte>) -> u32 {
    let mut n = 1;
    for shift in [39u32, 30, 21] {
        let mut prev = None;
        for &k in m.keys() {
            let p = k >> shift;
            if prev != Some(p) {
                n += 1;
                prev = Some(p);
            }
        }
    }
    n
}

/// Directory pages a new mapping at `va` would need.
fn new_pages_for(m: &BTreeMap<u64, Pte>, va: u64) -> u32 {
    let shares = |shift: u32| m.keys().any(|&k| k >> shift == va >> shift);
    if !shares(39) {
        3
    } else if !shares(30) {
        2
    } else if !shares(21) {
        1
    } else {
        0
    }
}

/// The simulated device table: entries as last written.
#[derive(Default)]
struct Device {
    mem: BTreeMap<(u32, u16), Pte>,
}

impl Device {
    fn page(&self, p: u32) -> impl Iterator<Item = (u16, Pte)> + '_ {
        self.mem
            .range((p, 0)..=(p, 511))
            .filter(|(_, e)| e.valid())
            .map(|(&(_, i), &e)| (i, e))
    }

    /// Reachable pages with their levels.
    fn reachable(&self) -> HashMap<u32, u32> {
        let mut out = HashMap::from([(0u32, LEVELS)]);
        let mut stack = vec![(0u32, LEVELS)];
        while let Some((p, l)) = stack.pop() {
            if l == 1 {
                continue;
            }
            for (_, e) in self.page(p) {
                let c = e.next_table().0;
                assert!(
                    out.insert(c, l - 1).is_none(),
                    "device page {c} linked twice"
                );
                stack.push((c, l - 1));
            }
        }
        out
    }

    fn apply(&mut self, writes: &[PteWrite]) {
        for w in writes {
            let reach = self.reachable();
            assert!(
                reach.contains_key(&w.table.0),
                "write {w:?} lands in a page not linked from the root"
            );
            assert!(w.index < 512);
            self.mem.insert((w.table.0, w.index), w.pte);
        }
    }

    /// Walks from the root as the device would.
    fn walk(&self, va: u64) -> Option<(PteLoc, Pte)> {
        let mut p = 0u32;
        for l in (2..=LEVELS).rev() {
            let e = *self.mem.get(&(p, level_index(va, l) as u16))?;
            if !e.valid() {
                return None;
            }
            p = e.next_table().0;
        }
        let i = level_index(va, 1) as u16;
        let e = *self.mem.get(&(p, i))?;
        e.valid().then_some((
            PteLoc {
                table: TablePage(p),
                index: i,
            },
            e,
        ))
    }

    /// Every leaf reachable from the root.
    fn leaves(&self) -> BTreeMap<u64, Pte> {
        fn rec(d: &Device, p: u32, l: u32, base: u64, out: &mut BTreeMap<u64, Pte>) {
            for (i, e) in d.page(p) {
                let va = base | (u64::from(i) << (12 + 9 * (l - 1)));
                if l == 1 {
                    out.insert(va, e);
                } else {
                    rec(d, e.next_table().0, l - 1, va, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        rec(self, 0, LEVELS, 0, &mut out);
        out
    }
}

fn check_table(t: &ShadowTable, m: &BTreeMap<u64, Pte>, dev: &Device) {
    t.check_invariants();
    assert_eq!(t.mapped_pages(), m.len() as u64);
    let used = pages_needed(m);
    assert_eq!(t.table_pages_used(), used, "empty pages freed exactly");
    for sel in 0..NVA {
        let va = va_of(sel);
        let want = m.get(&va).copied();
        assert_eq!(t.lookup(VirtAddr(va)), want, "lookup {va:#x}");
        assert_eq!(t.lookup(VirtAddr(va + 4095)), want, "lookup end of {va:#x}");
        let d = dev.walk(va);
        assert_eq!(d.map(|x| x.1), want, "device walk {va:#x}");
        assert_eq!(t.leaf_loc(VirtAddr(va)), d.map(|x| x.0), "leaf_loc {va:#x}");
    }
    let all: Vec<_> = t.mapped_in(VaRange::everything()).collect();
    assert_eq!(all, model_in(m, VaRange::everything()));
    assert_eq!(&dev.leaves(), m, "device leaves equal the model");
    // No stale entries anywhere (freed pages are zero on the device).
    let valid = dev.mem.values().filter(|e| e.valid()).count() as u64;
    assert_eq!(valid, u64::from(used - 1) + m.len() as u64);
}

fn run_table(budget: u32, ops: Vec<TOp>) {
    let mut t = ShadowTable::new(budget).unwrap();
    let mut m: BTreeMap<u64, Pte> = BTreeMap::new();
    let mut dev = Device::default();
    let mut w = Vec::new();
    for op in ops {
        w.clear();
        match op {
            TOp::Map { sel, slot, w: wr } => {
                let va = va_of(sel);
                let pte = Pte::leaf(PoolSlot(slot), wr);
                let needed = new_pages_for(&m, va);
                let free = budget - pages_needed(&m);
                let got = t.map(VirtAddr(va), pte, &mut w);
                if needed > free {
                    assert_eq!(got, Err(TableError::OutOfTablePages { needed, free }));
                    assert!(w.is_empty());
                } else {
                    assert_eq!(got, Ok(m.insert(va, pte)));
                    assert_eq!(w.len() as u32, needed + 1);
                    assert_eq!(w.last().unwrap().pte, pte, "leaf written last");
                }
            }
            TOp::MapBad(k, sel) => {
                let va = va_of(sel);
                let (addr, pte, err) = match k {
                    0 => (
                        va + 8,
                        Pte::leaf(PoolSlot(1), true),
                        TableError::Unaligned(va + 8),
                    ),
                    1 => (
                        1 << 48,
                        Pte::leaf(PoolSlot(1), true),
                        TableError::AboveVaBits(1 << 48),
                    ),
                    2 => (
                        u64::MAX - 4095,
                        Pte::leaf(PoolSlot(1), true),
                        TableError::AboveVaBits(u64::MAX - 4095),
                    ),
                    _ => (va, Pte(WRITABLE), TableError::InvalidLeaf(Pte(WRITABLE))),
                };
                assert_eq!(t.map(VirtAddr(addr), pte, &mut w), Err(err));
                assert!(w.is_empty());
            }
            TOp::Unmap { sel, off, len } => {
                let r = range_of(va_of(sel) + u64::from(off), len);
                let want = model_in(&m, r);
                let mut removed = Vec::new();
                t.unmap_range(r, &mut w, &mut removed);
                assert_eq!(removed, want, "removed {r:?}");
                for (va, _) in want {
                    m.remove(&va.get());
                }
            }
            TOp::Update { sel, how } => {
                let va = va_of(sel);
                let f = move |p: Pte| match how {
                    0 => Pte(p.0 & !WRITABLE),
                    1 => Pte(p.0 | ACCESSED),
                    2 => Pte(p.0 | DIRTY),
                    3 => Pte(p.0 & !(ACCESSED | DIRTY)),
                    _ => Pte(p.0 & !VALID),
                };
                let got = t.update_leaf(VirtAddr(va), f, &mut w);
                assert_eq!(got, m.get(&va).copied());
                if let Some(old) = got {
                    let new = Pte(f(old).0 | VALID);
                    m.insert(va, new);
                    assert_eq!(w.len(), usize::from(new != old));
                } else {
                    assert!(w.is_empty());
                }
            }
            TOp::Query { sel, len } => {
                let r = range_of(va_of(sel), len);
                let got: Vec<_> = t.mapped_in(r).collect();
                assert_eq!(got, model_in(&m, r), "mapped_in {r:?}");
            }
        }
        dev.apply(&w);
        check_table(&t, &m, &dev);
    }
}

// ---------------------------------------------------------------- pool

#[derive(Clone, Debug)]
enum POp {
    Alloc(u16),
    Free(u8),
    /// Mark a slot accessed (as the device would).
    Touch(u8),
    /// `pinned` mask; `sticky`: accessed bits are not cleared when read
    /// (a device touching every page all the time); `evict`: free the
    /// victim afterwards, as the mirror would.
    Victim {
        pinned: u16,
        sticky: bool,
        evict: bool,
    },
    /// `pick_victims(want, batch)`, the bulk form; the rest as `Victim`.
    Victims {
        pinned: u16,
        sticky: bool,
        evict: bool,
        want: u8,
        batch: u8,
    },
}

fn pop() -> impl Strategy<Value = POp> {
    prop_oneof![
        4 => any::<u16>().prop_map(POp::Alloc),
        2 => (0u8..12).prop_map(POp::Free),
        2 => (0u8..12).prop_map(POp::Touch),
        3 => (any::<u16>(), prop::bool::weighted(0.2), any::<bool>())
            .prop_map(|(pinned, sticky, evict)| POp::Victim { pinned: pinned & pinned.rotate_left(3), sticky, evict }),
        3 => (any::<u16>(), prop::bool::weighted(0.2), any::<bool>(), 0u8..14, 0u8..6)
            .prop_map(|(pinned, sticky, evict, want, batch)| POp::Victims { pinned: pinned & pinned.rotate_left(3), sticky, evict, want, batch }),
    ]
}

fn run_pool(cap: u32, ops: Vec<POp>) {
    let mut p = PagePool::new(cap);
    let mut m: HashMap<u32, VirtAddr> = HashMap::new();
    let mut accessed = [false; 16];
    for op in ops {
        match op {
            POp::Alloc(v) => {
                let va = VirtAddr(u64::from(v) << 12);
                match p.alloc(va) {
                    None => assert_eq!(m.len() as u32, cap, "alloc failed with room"),
                    Some(s) => {
                        assert!(s.0 < cap);
                        assert!(m.insert(s.0, va).is_none(), "slot {s:?} handed out twice");
                        accessed[s.0 as usize] = false;
                    }
                }
            }
            POp::Free(s) => {
                assert_eq!(p.free(PoolSlot(u32::from(s))), m.remove(&u32::from(s)));
            }
            POp::Touch(s) => accessed[usize::from(s)] = true,
            POp::Victims {
                pinned,
                sticky,
                evict,
                want,
                batch,
            } => {
                let is_pinned = |s: PoolSlot| pinned >> s.0 & 1 == 1;
                let old_at_start: Vec<u32> = m
                    .keys()
                    .copied()
                    .filter(|&s| !is_pinned(PoolSlot(s)) && !accessed[s as usize])
                    .collect();
                let v = p.pick_victims(
                    usize::from(want),
                    usize::from(batch),
                    |cands| {
                        assert!(!cands.is_empty() && cands.len() <= usize::from(batch.max(1)));
                        cands
                            .iter()
                            .map(|&(s, va)| {
                                assert_eq!(m.get(&s.0), Some(&va), "young() on a wrong slot/va");
                                assert!(!is_pinned(s), "young() on a pinned slot");
                                let y = accessed[s.0 as usize];
                                if !sticky {
                                    accessed[s.0 as usize] = false;
                                }
                                y
                            })
                            .collect()
                    },
                    |s, _| is_pinned(s),
                );
                let candidates = m.keys().filter(|&&s| !is_pinned(PoolSlot(s))).count();
                assert_eq!(
                    v.len(),
                    usize::from(want).min(candidates),
                    "how many victims"
                );
                let mut seen = std::collections::HashSet::new();
                for s in &v {
                    assert!(seen.insert(s.0), "victim {s:?} chosen twice");
                    assert!(
                        m.contains_key(&s.0) && !is_pinned(*s),
                        "victim {s:?} not evictable"
                    );
                }
                if old_at_start.len() >= usize::from(want) {
                    for s in &v {
                        assert!(
                            old_at_start.contains(&s.0),
                            "young {s:?} evicted while enough old slots were left"
                        );
                    }
                }
                if evict {
                    for s in v {
                        assert_eq!(p.free(s), m.remove(&s.0));
                    }
                }
            }
            POp::Victim {
                pinned,
                sticky,
                evict,
            } => {
                let is_pinned = |s: PoolSlot| pinned >> s.0 & 1 == 1;
                let mut calls: Vec<(u32, bool)> = Vec::new();
                let v = p.pick_victim(
                    |s, va| {
                        assert_eq!(m.get(&s.0), Some(&va), "young() on a wrong slot/va");
                        assert!(!is_pinned(s), "young() on a pinned slot");
                        let y = accessed[s.0 as usize];
                        if !sticky {
                            accessed[s.0 as usize] = false;
                        }
                        calls.push((s.0, y));
                        y
                    },
                    |s, _| is_pinned(s),
                );
                let candidates = m.keys().filter(|&&s| !is_pinned(PoolSlot(s))).count();
                assert!(calls.len() <= 2 * candidates, "more than two sweeps");
                match v {
                    None => assert_eq!(candidates, 0, "no victim though some unpinned"),
                    Some(v) => {
                        assert!(m.contains_key(&v.0) && !is_pinned(v));
                        let last = *calls.last().unwrap();
                        if calls.iter().all(|c| c.1) {
                            // Everyone young twice: the first one met.
                            assert_eq!(calls.len(), 2 * candidates);
                            assert_eq!(v.0, calls[0].0);
                        } else {
                            assert_eq!(last, (v.0, false), "victim is the first old slot");
                        }
                        if !sticky {
                            assert!(calls.len() <= candidates + 1, "clearing bits: one sweep");
                        }
                        if evict {
                            assert_eq!(p.free(v), m.remove(&v.0));
                        }
                    }
                }
            }
        }
        assert_eq!(p.used(), m.len() as u32);
        assert_eq!(p.capacity(), cap);
        for s in 0..16 {
            assert_eq!(p.owner(PoolSlot(s)), m.get(&s).copied(), "owner of {s}");
        }
    }
}

// ------------------------------------------------ table and pool together

/// What the mirror does with both structures, as one state machine.
#[derive(Clone, Debug)]
enum MOp {
    /// A device fault on page `sel` (a write if `w`): map it, taking a
    /// slot and evicting a victim by CLOCK when the pool is full.
    Fault { sel: usize, w: bool },
    /// The device touched page `sel` (sets its accessed bit).
    Touch(usize),
    /// An invalidation of a range: unmap it and free its slots.
    Zap { sel: usize, off: u16, len: u8 },
}

fn mop() -> impl Strategy<Value = MOp> {
    prop_oneof![
        5 => (0..NVA, any::<bool>()).prop_map(|(sel, w)| MOp::Fault { sel, w }),
        2 => (0..NVA).prop_map(MOp::Touch),
        2 => (0..NVA, 0u16..4096, any::<u8>()).prop_map(|(sel, off, len)| MOp::Zap { sel, off, len }),
    ]
}

/// Model: page → (slot, writable); accessed bits by page. After every
/// step: one slot per mapped page and one mapped page per used slot, the
/// slot's owner is the page mapping it, no slot is handed out twice, a
/// failed map leaves nothing behind, eviction only when the pool is full.
fn run_mirror(cap: u32, budget: u32, ops: Vec<MOp>) {
    let mut t = ShadowTable::new(budget).unwrap();
    let mut p = PagePool::new(cap);
    let mut m: BTreeMap<u64, (u32, bool)> = BTreeMap::new();
    let mut accessed: HashMap<u64, bool> = HashMap::new();
    let mut w = Vec::new();
    for op in ops {
        w.clear();
        match op {
            MOp::Fault { sel, w: write } => {
                let va = va_of(sel);
                match m.get(&va).copied() {
                    Some((_, wr)) if wr || !write => {}
                    Some((slot, _)) => {
                        // Upgrade in place: same slot, now writable.
                        let got = t.map(VirtAddr(va), Pte::leaf(PoolSlot(slot), true), &mut w);
                        assert!(got.unwrap().is_some(), "upgrade of a mapped page");
                        m.insert(va, (slot, true));
                    }
                    None => {
                        let slot = match p.alloc(VirtAddr(va)) {
                            Some(s) => Some(s),
                            None => {
                                assert_eq!(p.used(), cap, "alloc failed with room");
                                let v = p.pick_victim(
                                    |_, owner| {
                                        let a = accessed.entry(owner.get()).or_default();
                                        std::mem::replace(a, false)
                                    },
                                    |_, _| false,
                                );
                                match v {
                                    None => {
                                        assert_eq!(cap, 0, "no victim in a full pool");
                                        None
                                    }
                                    Some(v) => {
                                        let owner = p.owner(v).expect("victim has an owner");
                                        assert_eq!(m.get(&owner.get()).map(|e| e.0), Some(v.0));
                                        let mut removed = Vec::new();
                                        t.unmap_range(
                                            VaRange::from_start_len(owner, 4096).unwrap(),
                                            &mut w,
                                            &mut removed,
                                        );
                                        assert_eq!(removed.len(), 1);
                                        assert_eq!(p.free(v), Some(owner));
                                        m.remove(&owner.get());
                                        Some(p.alloc(VirtAddr(va)).expect("a slot after eviction"))
                                    }
                                }
                            }
                        };
                        if let Some(s) = slot {
                            match t.map(VirtAddr(va), Pte::leaf(s, write), &mut w) {
                                Ok(prev) => {
                                    assert_eq!(prev, None);
                                    m.insert(va, (s.0, write));
                                    accessed.insert(va, false);
                                }
                                Err(TableError::OutOfTablePages { .. }) => {
                                    // The mirror's undo: give the slot back.
                                    assert_eq!(p.free(s), Some(VirtAddr(va)));
                                }
                                Err(e) => panic!("unexpected {e:?}"),
                            }
                        }
                    }
                }
            }
            MOp::Touch(sel) => {
                let va = va_of(sel);
                if m.contains_key(&va) {
                    accessed.insert(va, true);
                }
            }
            MOp::Zap { sel, off, len } => {
                let r = range_of(va_of(sel) + u64::from(off), len);
                let mut removed = Vec::new();
                t.unmap_range(r, &mut w, &mut removed);
                for (va, pte) in removed {
                    assert_eq!(m.remove(&va.get()).map(|e| e.0), Some(pte.slot().0));
                    assert_eq!(p.free(pte.slot()), Some(va));
                }
            }
        }
        t.check_invariants();
        assert_eq!(t.mapped_pages(), m.len() as u64);
        assert_eq!(p.used() as usize, m.len(), "one slot per mapped page");
        let mut slots = std::collections::HashSet::new();
        for (va, pte) in t.mapped_in(VaRange::everything()) {
            let (slot, wr) = m[&va.get()];
            assert_eq!((pte.slot().0, pte.writable()), (slot, wr));
            assert!(slots.insert(slot), "slot {slot} mapped twice");
            assert_eq!(p.owner(PoolSlot(slot)), Some(va), "slot owner");
        }
    }
}

proptest! {
    #![proptest_config(common::cases(1000))]

    #[test]
    fn table_matches_model(budget in 1u32..16, ops in prop::collection::vec(top(), 1..60)) {
        run_table(budget, ops);
    }

    #[test]
    fn pool_matches_model(cap in 0u32..12, ops in prop::collection::vec(pop(), 1..80)) {
        run_pool(cap, ops);
    }

    #[test]
    fn table_and_pool_together_match_model(
        cap in 0u32..10,
        budget in 1u32..12,
        ops in prop::collection::vec(mop(), 1..100),
    ) {
        run_mirror(cap, budget, ops);
    }
}
