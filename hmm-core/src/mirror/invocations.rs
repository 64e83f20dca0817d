//! [`InvocationSet`]: the invocations a submission left incomplete (and the
//! next submission replays), in memory bounded by the launch size.
//!
//! A launch may have up to `u32::MAX` invocations, and any number of them
//! may fault. A `Vec<u32>` of them costs 4 bytes each — 16 GiB at the top —
//! while a bitmap over `0..n` costs `n / 8` bytes whatever faulted, and a
//! list is smaller while fewer than `n / 32` faulted. The set keeps
//! whichever form is smaller, switching from list to bitmap as soon as the
//! list's allocation outgrows the bitmap, so after every insert it holds at
//! most `n / 8` bytes (launches of fewer than 1024 invocations always use
//! the list: at most 4 KiB).
//!
//! Ids are kept ascending. Inserting in ascending order (what every driver
//! produces: it scans its fault records or its device bitmap in order) is
//! O(1) per id; an out-of-order insert into the list form shifts it.

/// Ids below which a bitmap is never chosen (its constant cost dominates).
const MIN_DENSE_UNIVERSE: u64 = 1024;

/// A set of invocation ids in `0..universe`, list or bitmap, whichever is
/// smaller (see the module docs).
#[derive(Clone)]
pub struct InvocationSet {
    universe: u32,
    repr: Repr,
    /// Ids offered that were not below `universe` (dropped; a device
    /// reporting them is reporting garbage).
    out_of_range: u64,
}

#[derive(Clone)]
enum Repr {
    /// Ascending, no duplicates.
    List(Vec<u32>),
    /// Bit `i` set = id `i` present; `len` bits are set.
    Bits { words: Vec<u64>, len: usize },
}

impl InvocationSet {
    /// An empty set of ids below `universe`.
    pub fn new(universe: u32) -> Self {
        InvocationSet {
            universe,
            repr: Repr::List(Vec::new()),
            out_of_range: 0,
        }
    }

    /// The set of the ids in `ids` (any order, duplicates allowed) below
    /// `universe`.
    pub fn from_ids(universe: u32, ids: impl IntoIterator<Item = u32>) -> Self {
        let mut s = InvocationSet::new(universe);
        for id in ids {
            s.insert(id);
        }
        s
    }

    /// The ids whose bits are set in `words` (bit `b` of word `w` is id
    /// `32 w + b`, the device bitmap layout), below `universe`.
    pub fn from_bitmap_words(universe: u32, words: &[u32]) -> Self {
        let mut s = InvocationSet::new(universe);
        for (wi, &w) in words.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let b = bits.trailing_zeros();
                let id = (wi as u64) * 32 + u64::from(b);
                match u32::try_from(id) {
                    Ok(id) => {
                        s.insert(id);
                    }
                    Err(_) => s.out_of_range += 1,
                }
                bits &= bits - 1;
            }
        }
        s
    }

    /// Ids are below this.
    pub fn universe(&self) -> u32 {
        self.universe
    }

    /// Adds `id`; returns whether it was newly added. An id not below the
    /// universe is not stored, only counted ([`InvocationSet::out_of_range`]).
    pub fn insert(&mut self, id: u32) -> bool {
        if id >= self.universe {
            self.out_of_range += 1;
            return false;
        }
        let added = match &mut self.repr {
            Repr::List(v) => match v.last() {
                Some(&last) if last < id => {
                    v.push(id);
                    true
                }
                None => {
                    v.push(id);
                    true
                }
                Some(_) => match v.binary_search(&id) {
                    Ok(_) => false,
                    Err(i) => {
                        v.insert(i, id);
                        true
                    }
                },
            },
            Repr::Bits { words, len } => {
                let (w, b) = (id as usize / 64, id % 64);
                let fresh = words[w] & (1 << b) == 0;
                words[w] |= 1 << b;
                *len += usize::from(fresh);
                fresh
            }
        };
        if added {
            self.maybe_densify();
        }
        added
    }

    /// Switches the list to a bitmap once the bitmap is the smaller.
    fn maybe_densify(&mut self) {
        let Repr::List(v) = &self.repr else { return };
        let universe = u64::from(self.universe);
        // Capacity, not length: the list's allocation is what it costs.
        if universe < MIN_DENSE_UNIVERSE || (v.capacity() as u64) * 32 <= universe {
            return;
        }
        let mut words = vec![0u64; universe.div_ceil(64) as usize];
        for &id in v {
            words[id as usize / 64] |= 1 << (id % 64);
        }
        self.repr = Repr::Bits {
            len: v.len(),
            words,
        };
    }

    /// Ids offered to [`InvocationSet::insert`] that were not below the
    /// universe.
    pub fn out_of_range(&self) -> u64 {
        self.out_of_range
    }

    /// How many ids the set holds.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::List(v) => v.len(),
            Repr::Bits { len, .. } => *len,
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u32) -> bool {
        match &self.repr {
            Repr::List(v) => v.binary_search(&id).is_ok(),
            Repr::Bits { words, .. } => words
                .get(id as usize / 64)
                .is_some_and(|w| w & (1 << (id % 64)) != 0),
        }
    }

    /// The ids, ascending.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            inner: match &self.repr {
                Repr::List(v) => IterRepr::List(v.iter()),
                Repr::Bits { words, .. } => IterRepr::Bits {
                    words,
                    word: 0,
                    bits: words.first().copied().unwrap_or(0),
                },
            },
        }
    }

    /// The ids not below `lo`, ascending (a driver splitting a replay
    /// into pieces starts each piece here instead of skipping from 0).
    pub fn iter_from(&self, lo: u32) -> Iter<'_> {
        Iter {
            inner: match &self.repr {
                Repr::List(v) => IterRepr::List(v[v.partition_point(|&id| id < lo)..].iter()),
                Repr::Bits { words, .. } => {
                    let word = lo as usize / 64;
                    IterRepr::Bits {
                        words,
                        word,
                        bits: words.get(word).map_or(0, |w| w & (!0u64 << (lo % 64))),
                    }
                }
            },
        }
    }

    /// Keeps only the ids for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        match &mut self.repr {
            Repr::List(v) => v.retain(|&id| keep(id)),
            Repr::Bits { words, len } => {
                for (wi, w) in words.iter_mut().enumerate() {
                    let mut bits = *w;
                    while bits != 0 {
                        let b = bits.trailing_zeros();
                        if !keep(wi as u32 * 64 + b) {
                            *w &= !(1 << b);
                            *len -= 1;
                        }
                        bits &= bits - 1;
                    }
                }
            }
        }
    }

    /// Host memory the set holds, in bytes (for the bound in the module
    /// docs).
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::List(v) => v.capacity() * 4,
            Repr::Bits { words, .. } => words.capacity() * 8,
        }
    }
}

impl PartialEq for InvocationSet {
    /// Same ids (the universe and representation do not matter).
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for InvocationSet {}

impl PartialEq<Vec<u32>> for InvocationSet {
    /// The same ids as `other`, in the same (ascending) order.
    fn eq(&self, other: &Vec<u32>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter().copied())
    }
}

impl core::fmt::Debug for InvocationSet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const SHOWN: usize = 64;
        let mut l = f.debug_list();
        l.entries(self.iter().take(SHOWN));
        if self.len() > SHOWN {
            l.entry(&format_args!("… {} more", self.len() - SHOWN));
        }
        l.finish()
    }
}

impl Default for InvocationSet {
    /// An empty set with an empty universe.
    fn default() -> Self {
        InvocationSet::new(0)
    }
}

impl<'a> IntoIterator for &'a InvocationSet {
    type Item = u32;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The ids of an [`InvocationSet`], ascending.
pub struct Iter<'a> {
    inner: IterRepr<'a>,
}

enum IterRepr<'a> {
    List(core::slice::Iter<'a, u32>),
    Bits {
        words: &'a [u64],
        word: usize,
        bits: u64,
    },
}

impl Iterator for Iter<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        match &mut self.inner {
            IterRepr::List(it) => it.next().copied(),
            IterRepr::Bits { words, word, bits } => loop {
                if *bits != 0 {
                    let b = bits.trailing_zeros();
                    *bits &= *bits - 1;
                    return Some(*word as u32 * 64 + b);
                }
                *word += 1;
                *bits = *words.get(*word)?;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densifies_when_the_bitmap_is_smaller_and_stays_equal() {
        let mut s = InvocationSet::new(4096);
        for id in (0..4096).step_by(2) {
            assert!(s.insert(id));
        }
        assert!(matches!(s.repr, Repr::Bits { .. }));
        assert!(s.heap_bytes() <= 4096 / 8);
        assert_eq!(s.len(), 2048);
        assert!(s.contains(4094) && !s.contains(4095));
        assert_eq!(s, InvocationSet::from_ids(5000, (0..4096).step_by(2)));
        assert!(!s.insert(10_000));
        assert_eq!(s.out_of_range(), 1);
    }

    #[test]
    fn bitmap_words_decode_in_device_layout() {
        let s = InvocationSet::from_bitmap_words(100, &[0b1000, 0b10]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 33]);
        let s = InvocationSet::from_bitmap_words(10, &[0, 1]);
        assert!(s.is_empty());
        assert_eq!(s.out_of_range(), 1);
    }
}
