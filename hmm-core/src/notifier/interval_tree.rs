//! PLACEHOLDER (naive O(n)) — being replaced by the augmented tree.

/// Handle of one entry, unique for the tree's lifetime.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct EntryId(u64);

/// Intervals `[start, end)` with values; overlaps and duplicates allowed.
pub struct IntervalTree<V> {
    items: Vec<(u64, u64, EntryId, V)>,
    next: u64,
}

impl<V> Default for IntervalTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> IntervalTree<V> {
    /// Empty tree.
    pub fn new() -> Self {
        IntervalTree {
            items: Vec::new(),
            next: 0,
        }
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// Inserts `[start, end)`; requires `start < end`.
    pub fn insert(&mut self, start: u64, end: u64, value: V) -> EntryId {
        assert!(start < end);
        let id = EntryId(self.next);
        self.next += 1;
        self.items.push((start, end, id, value));
        id
    }
    /// Removes an entry.
    pub fn remove(&mut self, id: EntryId) -> Option<V> {
        let i = self.items.iter().position(|e| e.2 == id)?;
        Some(self.items.swap_remove(i).3)
    }
    /// Looks an entry up.
    pub fn get(&self, id: EntryId) -> Option<&V> {
        self.items.iter().find(|e| e.2 == id).map(|e| &e.3)
    }
    /// Entries overlapping `[start, end)`, ordered by (start, id).
    pub fn overlapping(
        &self,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = (EntryId, u64, u64, &V)> + '_ {
        let mut v: Vec<_> = self
            .items
            .iter()
            .filter(move |e| e.0 < end && start < e.1)
            .map(|e| (e.2, e.0, e.1, &e.3))
            .collect();
        v.sort_by_key(|e| (e.1, e.0));
        v.into_iter()
    }
    /// Whether anything overlaps `[start, end)`.
    pub fn any_overlap(&self, start: u64, end: u64) -> bool {
        self.items.iter().any(|e| e.0 < end && start < e.1)
    }
    /// All entries ordered by (start, id).
    pub fn iter(&self) -> impl Iterator<Item = (EntryId, u64, u64, &V)> + '_ {
        self.overlapping(0, u64::MAX)
    }
}
