//! Choosing the region a device fault creates (`drm_gpusvm`-style chunks).
//!
//! When a device faults on an address no mirrored region covers yet, the
//! DRM GPU SVM helpers (`drm_gpusvm_range_chunk_size` in
//! `drivers/gpu/drm/drm_gpusvm.c`) do not mirror just the one page: they
//! try a list of chunk sizes, largest first (Xe uses 2 MiB, 64 KiB, 4 KiB),
//! and take the first chunk that
//!
//! - is aligned to its own size (so a 2 MiB chunk can become one huge
//!   device PTE and the device page-table walk stays shallow),
//! - contains the faulting address,
//! - lies inside the CPU mapping (one VMA: one set of permissions, one
//!   backing object, and no holes to fault on), and
//! - overlaps no region that already exists (regions never overlap, so one
//!   device PTE has exactly one owner to invalidate).
//!
//! Larger chunks amortise the per-fault cost (one `range_fault`, one
//! device page-table update, one notifier) over more pages; the fallback
//! to smaller sizes keeps small or oddly aligned mappings usable. The
//! kernel skips the overlap check for the smallest size because its caller
//! only gets here when no region contains the address; this function
//! checks every size, so a caller that gets the overlap predicate wrong
//! receives an error instead of an overlapping region.
//!
//! [`choose_chunk`] is a pure function: the caller supplies the mapping's
//! range (intersected with any further bound it has, such as a notifier's
//! range) and a predicate that answers "does this candidate overlap an
//! existing region?".

use thiserror::Error;

use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};

/// 4 KiB.
pub const SZ_4K: u64 = 4 << 10;
/// 64 KiB.
pub const SZ_64K: u64 = 64 << 10;
/// 2 MiB.
pub const SZ_2M: u64 = 2 << 20;
/// The chunk sizes Xe uses, largest first.
pub const DEFAULT_CHUNK_SIZES: [u64; 3] = [SZ_2M, SZ_64K, SZ_4K];

/// Why no chunk could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The faulting address is not inside the given mapping range.
    #[error("fault address {addr} is outside the mapping {mapping}")]
    OutsideMapping {
        /// The faulting address.
        addr: VirtAddr,
        /// The mapping range given.
        mapping: VaRange,
    },
    /// A chunk size is zero, not a power of two, or smaller than a page.
    #[error("chunk size {size:#x} is not a power of two of at least one page")]
    BadChunkSize {
        /// The offending size.
        size: u64,
    },
    /// The list of chunk sizes is empty.
    #[error("no chunk sizes given")]
    NoChunkSizes,
    /// Even the smallest chunk around `addr` overlaps an existing region
    /// or leaves the mapping.
    #[error("no chunk around {addr} fits: every candidate overlaps an existing region")]
    NoFit {
        /// The faulting address.
        addr: VirtAddr,
    },
}

/// The largest chunk of one of `chunk_sizes` (any order) that is aligned to
/// its size, contains `addr`, lies inside `mapping` and for which
/// `overlaps_existing` returns false. The predicate is called for
/// candidates largest first and not after the first acceptable one.
pub fn choose_chunk<F>(
    addr: VirtAddr,
    mapping: VaRange,
    chunk_sizes: &[u64],
    mut overlaps_existing: F,
) -> Result<VaRange, ChunkError>
where
    F: FnMut(VaRange) -> bool,
{
    if !mapping.contains(addr) {
        return Err(ChunkError::OutsideMapping { addr, mapping });
    }
    if chunk_sizes.is_empty() {
        return Err(ChunkError::NoChunkSizes);
    }
    let mut sizes = chunk_sizes.to_vec();
    for &s in &sizes {
        if !s.is_power_of_two() || s < PAGE_SIZE {
            return Err(ChunkError::BadChunkSize { size: s });
        }
    }
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.dedup();
    for size in sizes {
        let start = addr.0 & !(size - 1);
        // `start + size` cannot overflow past a mapping end that fits in
        // u64 when the chunk lies inside it; a chunk that would overflow
        // cannot be inside, so skip it.
        let Ok(cand) = VaRange::from_start_len(VirtAddr(start), size) else {
            continue;
        };
        if !mapping.covers(cand) {
            continue;
        }
        if overlaps_existing(cand) {
            continue;
        }
        return Ok(cand);
    }
    Err(ChunkError::NoFit { addr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: u64, e: u64) -> VaRange {
        VaRange::new(VirtAddr(s), VirtAddr(e)).unwrap()
    }

    #[test]
    fn big_mapping_gets_2m() {
        let c = choose_chunk(
            VirtAddr(0x20_1234),
            r(0, 0x100_0000),
            &DEFAULT_CHUNK_SIZES,
            |_| false,
        )
        .unwrap();
        assert_eq!(c, r(0x20_0000, 0x40_0000));
    }

    #[test]
    fn small_mapping_falls_back() {
        // 128 KiB mapping not 2 MiB aligned: 64 KiB chunk.
        let m = r(0x7000_0000, 0x7002_0000);
        let c = choose_chunk(VirtAddr(0x7001_8000), m, &DEFAULT_CHUNK_SIZES, |_| false).unwrap();
        assert_eq!(c, r(0x7001_0000, 0x7002_0000));
        // 16 KiB mapping: 4 KiB chunk.
        let m = r(0x7000_1000, 0x7000_5000);
        let c = choose_chunk(VirtAddr(0x7000_2fff), m, &DEFAULT_CHUNK_SIZES, |_| false).unwrap();
        assert_eq!(c, r(0x7000_2000, 0x7000_3000));
    }

    #[test]
    fn existing_region_forces_smaller_chunk() {
        let existing = r(0x20_0000, 0x20_1000);
        let c = choose_chunk(
            VirtAddr(0x21_0000),
            r(0, 0x100_0000),
            &DEFAULT_CHUNK_SIZES,
            |c| c.overlaps(existing),
        )
        .unwrap();
        assert_eq!(c, r(0x21_0000, 0x22_0000));
        let err = choose_chunk(
            VirtAddr(0x20_0000),
            r(0, 0x100_0000),
            &DEFAULT_CHUNK_SIZES,
            |c| c.overlaps(existing),
        );
        assert_eq!(
            err,
            Err(ChunkError::NoFit {
                addr: VirtAddr(0x20_0000)
            })
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = r(0x1000, 0x2000);
        assert!(matches!(
            choose_chunk(VirtAddr(0x3000), m, &DEFAULT_CHUNK_SIZES, |_| false),
            Err(ChunkError::OutsideMapping { .. })
        ));
        assert_eq!(
            choose_chunk(VirtAddr(0x1000), m, &[], |_| false),
            Err(ChunkError::NoChunkSizes)
        );
        for bad in [0, 3, 2048, 0x3000] {
            assert_eq!(
                choose_chunk(VirtAddr(0x1000), m, &[SZ_4K, bad], |_| false),
                Err(ChunkError::BadChunkSize { size: bad })
            );
        }
        // Unsorted sizes work; a mapping at the top of the space does not overflow.
        let top = r(u64::MAX - SZ_2M * 2 + 1, u64::MAX);
        let c = choose_chunk(VirtAddr(u64::MAX - 0x10_0000), top, &[SZ_4K, SZ_2M], |_| {
            false
        })
        .unwrap();
        assert_eq!(c.len(), SZ_4K);
    }

    proptest! {
        #[test]
        fn chosen_chunk_is_valid_and_maximal(
            mstart in 0u64..(1 << 30),
            mlen in 1u64..(1 << 26),
            off in any::<u64>(),
            regions in proptest::collection::vec((0u64..(1 << 30), 1u64..(1 << 22)), 0..6),
        ) {
            let mstart = mstart & !(PAGE_SIZE - 1);
            let mlen = mlen.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            let m = r(mstart, mstart + mlen);
            let addr = VirtAddr(mstart + off % mlen);
            let existing: Vec<VaRange> = regions
                .iter()
                .map(|&(s, l)| r(s & !(PAGE_SIZE - 1), (s & !(PAGE_SIZE - 1)) + l.div_ceil(PAGE_SIZE) * PAGE_SIZE))
                .filter(|e| !e.contains(addr))
                .collect();
            let overlaps = |c: VaRange| existing.iter().any(|e| e.overlaps(c));
            let got = choose_chunk(addr, m, &DEFAULT_CHUNK_SIZES, overlaps);
            // The 4 KiB page around addr never overlaps (filtered above) and is inside.
            let c = got.unwrap();
            prop_assert!(DEFAULT_CHUNK_SIZES.contains(&c.len()));
            prop_assert_eq!(c.start().0 % c.len(), 0);
            prop_assert!(c.contains(addr));
            prop_assert!(m.covers(c));
            prop_assert!(!overlaps(c));
            for &bigger in DEFAULT_CHUNK_SIZES.iter().filter(|&&s| s > c.len()) {
                let s = addr.0 & !(bigger - 1);
                let cand = r(s, s + bigger);
                prop_assert!(!m.covers(cand) || overlaps(cand), "a larger chunk {cand} also fits");
            }
        }
    }
}
