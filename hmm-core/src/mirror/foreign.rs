//! Writers write tracking cannot see, caught by hashing
//! ([`ForeignWriters::Check`](super::ForeignWriters::Check)).
//!
//! `WP_ASYNC` write tracking reports writes made through this process's
//! page tables. A page of a shared mapping (another process, `pwrite()` to
//! the file or memfd) or a not-yet-copied page of a private file mapping
//! can change without one ([`Mapping::may_change_unseen`]). For such pages
//! copy mode records, at copy-in, a 64-bit hash of the bytes it copied to
//! the device (not of the CPU page read again: a write racing the copy
//! then shows as a difference, never as a match), keeps it per pool slot,
//! and at the start-of-launch sync point re-reads and re-hashes the CPU
//! pages of every slot that has one; pages whose hash changed are
//! invalidated as CPU writes (`EventKind::CpuWrite`, the same path
//! write tracking uses). After a write-back the hash becomes that of the
//! page written (which the write-back's read-back verified equal to the
//! CPU's page), so the device's own writes never look foreign.
//!
//! **What is guaranteed, and when.** The device never reads data older
//! than the CPU page *as of the check* at the start of the launch. A store
//! by this process racing the check is caught by write tracking, as
//! always; a foreign write after the check is the next sync point's
//! business — the same "valid as of the last sync point" rule as the rest
//! of the mirror. DMA into long-held pins (io_uring fixed buffers, RDMA)
//! changes nothing any userspace check could be told about in time, and is
//! caught only if it happened before the check.
//!
//! **Why xxh3, and what it costs.** The check reads every resident page of
//! such mappings once per launch, so the hash must keep up with memory on
//! 4 KiB inputs and catch any change with overwhelming probability (a
//! 64-bit hash with full avalanche: a random change goes unnoticed with
//! probability 2⁻⁶⁴; no adversary picks the data). xxh3-64
//! (`xxhash-rust`: pure Rust, no dependencies, SMHasher-clean, a stable
//! output) does. Measured (`cargo bench -p hmm-driver-cpu --bench
//! foreign_check`, 1 GiB `MAP_SHARED`, 2-core VM): the whole check costs
//! 220 ms per GiB of resident pages, against 490 ms per GiB for re-copying
//! them on the cpu driver (0.5–1.3 s on the GPU drivers). It is
//! memory-bound: xxh3 and foldhash over the same pages straight from DRAM
//! both take ≈ 165 ms/GiB; from cache xxh3 takes 46 ms/GiB and foldhash
//! 32 — foldhash's edge is under 7 % of the check, and it is a hash-table
//! hash whose output may change between versions, not a checksum. A byte
//! compare against a kept copy would read twice the memory and keep a
//! second host copy of every page; the hash keeps 8 bytes per slot. The
//! pages are read through the fault-proof copy (a truncated file must not
//! kill the process) in batches of 64 and hashed while in cache.
//!
//! Memory: the vectors grow only on the installing thread and are never
//! shrunk; [`PageHashes::forget`] (called from `retire`, which may run on
//! the event monitor's thread) writes in place and allocates or frees
//! nothing (`twins` module docs say why that matters).

#[cfg(doc)]
use crate::cpu::maps::Mapping;
use crate::mirror::format::PoolSlot;

/// The hash of one 4 KiB page (see the module docs for the choice).
#[inline]
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Per pool slot: the hash of the page as the device holds it, for slots
/// that back pages of mappings that may change unseen.
#[derive(Default)]
pub(crate) struct PageHashes {
    on: bool,
    hash: Vec<u64>,
    tracked: Vec<bool>,
    count: usize,
}

impl PageHashes {
    /// Hashes kept only if `on` ([`ForeignWriters::Check`](super::ForeignWriters::Check)).
    pub fn new(on: bool) -> Self {
        PageHashes {
            on,
            ..PageHashes::default()
        }
    }

    /// Whether hashes are kept at all.
    pub fn enabled(&self) -> bool {
        self.on
    }

    /// Records that `slot` now holds `page` (4 KiB). A no-op when off.
    pub fn set(&mut self, slot: PoolSlot, page: &[u8]) {
        if !self.on {
            return;
        }
        let i = slot.0 as usize;
        if self.hash.len() <= i {
            self.hash.resize(i + 1, 0);
            self.tracked.resize(i + 1, false);
        }
        self.hash[i] = page_hash(page);
        if !self.tracked[i] {
            self.tracked[i] = true;
            self.count += 1;
        }
    }

    /// `slot` no longer holds a checked page. Allocates and frees nothing.
    pub fn forget(&mut self, slot: PoolSlot) {
        if let Some(t) = self.tracked.get_mut(slot.0 as usize) {
            if *t {
                *t = false;
                self.count -= 1;
            }
        }
    }

    /// The recorded hash of `slot`, if it holds a checked page.
    pub fn get(&self, slot: PoolSlot) -> Option<u64> {
        let i = slot.0 as usize;
        (*self.tracked.get(i)?).then(|| self.hash[i])
    }

    /// Whether no slot holds a checked page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The slots that hold checked pages.
    pub fn slots(&self) -> impl Iterator<Item = PoolSlot> + '_ {
        self.tracked
            .iter()
            .enumerate()
            .filter(|(_, t)| **t)
            .map(|(i, _)| PoolSlot(i as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_changed_word_changes_the_hash() {
        let mut page = vec![0u8; 4096];
        let h0 = page_hash(&page);
        for i in (0..4096).step_by(512) {
            page[i] ^= 1;
            assert_ne!(page_hash(&page), h0, "flip at {i}");
            page[i] ^= 1;
        }
        // Swapping two words (a plain sum would miss it) is seen too.
        page[..8].copy_from_slice(&1u64.to_ne_bytes());
        let h1 = page_hash(&page);
        page[..8].copy_from_slice(&0u64.to_ne_bytes());
        page[8..16].copy_from_slice(&1u64.to_ne_bytes());
        assert_ne!(page_hash(&page), h1);
    }

    #[test]
    fn set_forget_and_off() {
        let mut h = PageHashes::new(true);
        let page = vec![7u8; 4096];
        h.set(PoolSlot(3), &page);
        assert_eq!(h.get(PoolSlot(3)), Some(page_hash(&page)));
        assert_eq!(h.slots().collect::<Vec<_>>(), vec![PoolSlot(3)]);
        h.set(PoolSlot(3), &page);
        h.forget(PoolSlot(3));
        h.forget(PoolSlot(9));
        assert!(h.is_empty());
        assert_eq!(h.get(PoolSlot(3)), None);
        let mut off = PageHashes::new(false);
        off.set(PoolSlot(0), &page);
        assert!(off.is_empty() && off.get(PoolSlot(0)).is_none());
    }
}
