//! `range_fault`: the userspace analogue of the kernel's `hmm_range_fault`.
//!
//! # What the kernel does
//!
//! `hmm_range_fault()` (`mm/hmm.c`) walks the CPU page tables of a range
//! and fills one entry per page: `HMM_PFN_VALID` plus `HMM_PFN_WRITE` when
//! the PTE is writable, 0 for a page that is not present, `HMM_PFN_ERROR`
//! for a page the device must not touch. When the caller asked for a fault
//! (`HMM_PFN_REQ_FAULT`, optionally `HMM_PFN_REQ_WRITE`) the walk calls
//! `handle_mm_fault()` for each page that does not satisfy the request and
//! walks again. Errors are whole-call errors only when faulting was asked
//! for: a hole (no VMA) or an unreadable VMA (`PROT_NONE`, or `VM_IO` /
//! `VM_PFNMAP`) gives `-EFAULT`, a write request on a VMA without
//! `VM_WRITE` gives `-EPERM`. Without a fault request the same pages are
//! simply marked `HMM_PFN_ERROR` and the call succeeds. This module does
//! the same: [`FaultError`] for the fault case, [`PageState::Error`] for
//! the snapshot case. `REQ_WRITE` without `REQ_FAULT` has no effect in the
//! kernel, and `FaultFlags { fault: false, write: true }` is likewise a
//! plain snapshot.
//!
//! The kernel also checks an `mmu_interval_notifier` sequence around the
//! walk; that glue lives with the notifier, not here.
//!
//! # How it is done from userspace
//!
//! - **Permissions** come from the VMA list ([`MappingCache`]); the range
//!   is split into one piece per mapping (and per hole).
//! - **Faulting** is `madvise(MADV_POPULATE_WRITE / _READ)` (Linux 5.14):
//!   the kernel runs the same GUP fault path a CPU access would (breaking
//!   copy-on-write, calling `page_mkwrite` for shared files) but returns an
//!   error instead of raising SIGSEGV/SIGBUS. A write request populates each
//!   piece with one call, always: only the kernel knows whether a present
//!   PTE is writable (copy-on-write after fork, clean shared-file pages), and
//!   `MADV_POPULATE_WRITE` on already-writable pages is a cheap walk. A read
//!   request snapshots first and populates only the span of pages that are
//!   not present, again with one call per piece.
//! - **Scattered pages** (a batch of device faults) can be populated
//!   together first with [`RangeFaulter::populate_runs`]: one
//!   `process_madvise(pidfd, iovecs, MADV_POPULATE_*)` call for up to 1024
//!   runs where the kernel allows it on this process (Linux 6.13+, probed
//!   once when the faulter is made), one `madvise` per run otherwise and
//!   for whatever a batch call left undone.
//! - **State** is read with one `PAGEMAP_SCAN` per piece ([`Pagemap`]),
//!   which returns runs of equal pages, so a populated gigabyte costs a few
//!   regions rather than 262144 entries.
//!
//! Page states follow from the scan and the mapping:
//!
//! | PTE                                   | state |
//! |---|---|
//! | present, zero pfn                     | [`PageState::Zero`] |
//! | present, anonymous page (or shared mapping) | [`PageState::Valid`], writable if the mapping is |
//! | present, file page in a private mapping | `Valid { writable: false }` (a write would copy) |
//! | swapped / migrating                   | [`PageState::NotPresent`] |
//! | none, private anonymous mapping       | [`PageState::Zero`] (first touch yields zeros) |
//! | none, file or shared mapping          | [`PageState::NotPresent`] (contents live elsewhere) |
//!
//! A page present but not writable in a writable *private anonymous*
//! mapping is still reported writable in a snapshot (PAGEMAP_SCAN does
//! not expose the PTE write bit): that happens after `fork` (copy-on-write)
//! and for KSM pages; a write fault request always resolves it.
//!
//! # When `MADV_POPULATE_*` is missing (Linux < 5.14)
//!
//! Detected once (EINVAL on a probe). Read faults then use
//! `process_vm_readv` on this very process, one byte per page: the kernel
//! faults the pages in on our behalf and reports `EFAULT` instead of
//! killing us, and no memory is written. Write faults need a real write
//! access: after re-reading the VMA list (so a stale cache cannot send us
//! into a read-only page) and a `process_vm_readv` pass, every page gets an
//! atomic write of the value it holds on one byte ([`touch_write`]: a
//! locked `or` of 0 on x86-64, which the optimiser cannot drop as it
//! drops an unused `fetch_add(0)` in release builds). That changes no
//! value even with concurrent writers, but it is a genuine write: it dirties file pages
//! (they will be written back, `mtime` changes), sets soft-dirty, and if
//! another thread unmaps or write-protects the range between the check and
//! the touch the process gets SIGSEGV. [`RangeFaulter::populate_method`]
//! reports which path is in use.

use std::io;
use std::sync::Arc;

use thiserror::Error;

mod populate;
pub(crate) use populate::probe_populate_batch;
pub use populate::touch_write;
use populate::{probe_madvise_populate, BatchPopulate};

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT};
use crate::cpu::maps::{Mapping, MappingCache, MapsError, Segment};
use crate::cpu::pagemap::{Pagemap, PagemapError, ScanArgs};
use crate::cpu::sys::{
    page_region, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED,
};
use crate::error::RangeError;
use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// What the caller wants done with the pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultFlags {
    /// Fault pages in so that every page is readable (kernel
    /// `HMM_PFN_REQ_FAULT`). Without it the call only takes a snapshot.
    pub fault: bool,
    /// With `fault`: make every page writable (`HMM_PFN_REQ_WRITE`).
    /// Ignored without `fault`, as in the kernel.
    pub write: bool,
}

impl FaultFlags {
    /// Snapshot only.
    pub const SNAPSHOT: Self = FaultFlags {
        fault: false,
        write: false,
    };
    /// Fault for reading.
    pub const READ: Self = FaultFlags {
        fault: true,
        write: false,
    };
    /// Fault for writing.
    pub const WRITE: Self = FaultFlags {
        fault: true,
        write: true,
    };
}

/// State of one page as seen by the CPU page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Present in the CPU page tables with real contents. `writable`: the
    /// mapping allows writes and a write would not have to copy the page
    /// first (see the module docs for the one approximation).
    Valid {
        /// Whether the device may write it.
        writable: bool,
    },
    /// Reads as zeros: the shared zero page is mapped (after a read fault),
    /// or a private anonymous page was never populated. Not writable.
    Zero,
    /// Not in the page tables but has contents elsewhere (file or shmem
    /// page not mapped, swapped-out page): needs a fault before use.
    NotPresent,
    /// The device must not access it: a hole, an unreadable mapping, or an
    /// area the page-table walk cannot see (`VM_PFNMAP`). Only reported
    /// when no fault was requested; with a fault request these are errors.
    Error,
}

impl PageState {
    /// Whether the device may read the page as it is (contents known).
    pub const fn is_readable(self) -> bool {
        matches!(self, PageState::Valid { .. } | PageState::Zero)
    }
    /// Whether the device may write the page as it is.
    pub const fn is_writable(self) -> bool {
        matches!(self, PageState::Valid { writable: true })
    }
}

/// Errors of [`RangeFaulter::range_fault`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FaultError {
    /// The range is empty, unaligned, overflowing or reaches the kernel half.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A fault was requested on a page no mapping covers (kernel `-EFAULT`).
    #[error("no mapping at {addr}")]
    Unmapped {
        /// First unmapped address.
        addr: VirtAddr,
    },
    /// A fault was requested on an unreadable mapping, e.g. `PROT_NONE`
    /// (kernel `-EFAULT`).
    #[error("mapping at {addr} is not readable")]
    NoAccess {
        /// First address of the unreadable piece.
        addr: VirtAddr,
    },
    /// A write fault was requested on a mapping without write permission
    /// (kernel `-EPERM`).
    #[error("mapping at {addr} is read-only")]
    ReadOnly {
        /// First address of the read-only piece.
        addr: VirtAddr,
    },
    /// A fault was requested on pages the page-table walk cannot see or the
    /// kernel refuses to populate (`VM_IO` / `VM_PFNMAP`; kernel `-EFAULT`).
    #[error("page at {addr} cannot be faulted (I/O or PFN mapping)")]
    BadPage {
        /// First such address.
        addr: VirtAddr,
    },
    /// Populating failed although the mapping allows the access (SIGBUS
    /// conditions such as a file mapping past end of file, out of memory,
    /// hardware poison).
    #[error("populating {range} failed: {source}")]
    Populate {
        /// The piece being populated.
        range: VaRange,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Pages kept disappearing between populate and snapshot (reclaim or
    /// concurrent `MADV_DONTNEED` racing every retry).
    #[error("pages of {range} did not stay populated after {attempts} attempts")]
    Unstable {
        /// The pages that were not satisfied.
        range: VaRange,
        /// Populate attempts made.
        attempts: u32,
    },
    /// The per-page result would not fit in memory.
    #[error("range of {pages} pages is too large for a per-page result")]
    TooLarge {
        /// Pages asked for.
        pages: u64,
    },
    /// Reading the memory map failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// Reading page state failed.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
}

/// How pages are faulted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopulateMethod {
    /// `madvise(MADV_POPULATE_READ / MADV_POPULATE_WRITE)` (Linux 5.14+).
    Madvise,
    /// `process_vm_readv` for reads, an atomic no-op write per page for
    /// writes (see the module docs for the caveats).
    Touch,
}

/// Counters of a [`RangeFaulter`] (for tests and tuning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Page-state scans issued (one per mapping piece, plus re-scans).
    pub scans: u64,
    /// Populate calls issued (one `madvise`, or one fallback pass).
    pub populates: u64,
    /// `process_madvise` calls issued by [`RangeFaulter::populate_runs`].
    pub batch_calls: u64,
}

/// Populate attempts per piece before giving up with
/// [`FaultError::Unstable`].
const MAX_ATTEMPTS: u32 = 4;

/// Categories `range_fault` asks the scan for, at most.
const RETURN_MASK: u64 = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE | PAGE_IS_PFNZERO;

/// The categories worth asking the scan for over mapping `m`:
/// `PAGE_IS_FILE` only where [`classify`] reads it — a writable private
/// mapping that is not anonymous (a present page there is either still
/// the file's, read-only until copied on write, or this process's copy).
/// Asking for it costs: the kernel looks up each present page's folio to
/// answer, which made long scans 4–5× slower (perf-lab `scanmask`).
fn return_mask(m: &Mapping) -> u64 {
    if m.write && !m.shared && !m.is_private_anonymous() {
        RETURN_MASK
    } else {
        RETURN_MASK & !PAGE_IS_FILE
    }
}

/// The `hmm_range_fault` analogue for this process.
#[derive(Debug)]
pub struct RangeFaulter {
    maps: Arc<MappingCache>,
    pagemap: Pagemap,
    madvise: AtomicBool,
    /// `process_madvise(MADV_POPULATE_*)` on this process, probed at
    /// creation ([`RangeFaulter::populate_runs`]).
    batch: Option<BatchPopulate>,
    batch_on: AtomicBool,
    scans: AtomicU64,
    populates: AtomicU64,
    batch_calls: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Read,
    Write,
}

/// Outcome of snapshotting one piece.
struct Snap {
    /// Index span `[a, b)` of pages not satisfying the request.
    unsatisfied: Option<(usize, usize)>,
    /// First page the scan did not cover (`VM_PFNMAP` and friends).
    uncovered: Option<usize>,
}

fn classify(cats: u64, m: &Mapping) -> (PageState, bool) {
    if cats & PAGE_IS_PRESENT != 0 {
        if cats & PAGE_IS_PFNZERO != 0 {
            (PageState::Zero, true)
        } else {
            let writable = m.write && (m.shared || cats & PAGE_IS_FILE == 0);
            (PageState::Valid { writable }, true)
        }
    } else if cats & PAGE_IS_SWAPPED != 0 {
        (PageState::NotPresent, false)
    } else if m.is_private_anonymous() {
        (PageState::Zero, false)
    } else {
        (PageState::NotPresent, false)
    }
}

fn page_range(start: VirtAddr, pages: usize) -> Result<VaRange, RangeError> {
    VaRange::from_start_len(start, (pages as u64) << PAGE_SHIFT)
}

/// The kernel's per-mapping checks for a fault request, in address order.
fn check_access(segs: &[Segment], flags: FaultFlags) -> Result<(), FaultError> {
    if !flags.fault {
        return Ok(());
    }
    for s in segs {
        let addr = s.range.start();
        match &s.mapping {
            None => return Err(FaultError::Unmapped { addr }),
            Some(m) if !m.read => return Err(FaultError::NoAccess { addr }),
            Some(m) if flags.write && !m.write => return Err(FaultError::ReadOnly { addr }),
            Some(_) => {}
        }
    }
    Ok(())
}

impl RangeFaulter {
    /// A faulter with its own mapping cache and pagemap descriptor.
    pub fn new() -> Result<Self, FaultError> {
        Ok(Self::with_parts(
            Arc::new(MappingCache::new()),
            Pagemap::open()?,
        ))
    }

    /// A faulter over a shared mapping cache (the one the event monitor
    /// invalidates) and a given pagemap reader.
    pub fn with_parts(maps: Arc<MappingCache>, pagemap: Pagemap) -> Self {
        let madvise = probe_madvise_populate();
        let batch = if madvise {
            BatchPopulate::probe().ok()
        } else {
            None
        };
        RangeFaulter {
            maps,
            pagemap,
            madvise: AtomicBool::new(madvise),
            batch_on: AtomicBool::new(batch.is_some()),
            batch,
            scans: AtomicU64::new(0),
            populates: AtomicU64::new(0),
            batch_calls: AtomicU64::new(0),
        }
    }

    /// The mapping cache in use.
    pub fn maps(&self) -> &Arc<MappingCache> {
        &self.maps
    }

    /// The page-state reader in use.
    pub fn pagemap(&self) -> &Pagemap {
        &self.pagemap
    }

    /// How pages are faulted in.
    pub fn populate_method(&self) -> PopulateMethod {
        if self.madvise.load(Ordering::Relaxed) {
            PopulateMethod::Madvise
        } else {
            PopulateMethod::Touch
        }
    }

    /// Forces the `MADV_POPULATE_*`-less path (as on Linux < 5.14), for
    /// tests. There is no way back to `madvise` once forced.
    pub fn force_touch_populate(&self) {
        self.madvise.store(false, Ordering::Relaxed);
        self.batch_on.store(false, Ordering::Relaxed);
    }

    /// Whether [`RangeFaulter::populate_runs`] batches scattered runs into
    /// one `process_madvise` call (else one populate per run).
    pub fn batch_populate(&self) -> bool {
        // Relaxed: a capability flag, only ever cleared.
        self.batch_on.load(Ordering::Relaxed)
    }

    /// Forces [`RangeFaulter::populate_runs`] to populate run by run, as on
    /// kernels without `process_madvise(MADV_POPULATE_*)` (for tests and
    /// comparisons). There is no way back.
    pub fn force_per_range_populate(&self) {
        self.batch_on.store(false, Ordering::Relaxed);
    }

    /// Counters.
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            scans: self.scans.load(Ordering::Relaxed),
            populates: self.populates.load(Ordering::Relaxed),
            batch_calls: self.batch_calls.load(Ordering::Relaxed),
        }
    }

    /// [`RangeFaulter::range_fault`] for `[start, start + len)`, checking the
    /// raw arguments (zero length and overflow are [`RangeError`]s).
    pub fn range_fault_at(
        &self,
        start: VirtAddr,
        len: u64,
        flags: FaultFlags,
    ) -> Result<Vec<PageState>, FaultError> {
        self.range_fault(VaRange::from_start_len(start, len)?, flags)
    }

    /// One [`PageState`] per page of `range` (page aligned, user half).
    ///
    /// With `flags.fault`, every returned page is readable
    /// ([`PageState::is_readable`]) and with `flags.write` also writable,
    /// or the call fails as the kernel's would (see [`FaultError`]). No
    /// page is populated when the access checks fail.
    pub fn range_fault(
        &self,
        range: VaRange,
        flags: FaultFlags,
    ) -> Result<Vec<PageState>, FaultError> {
        let mut out = Vec::new();
        self.range_fault_into(range, flags, &mut out)?;
        Ok(out)
    }

    /// Like [`RangeFaulter::range_fault`], writing into `out` (cleared
    /// first) so a caller can reuse the allocation.
    pub fn range_fault_into(
        &self,
        range: VaRange,
        flags: FaultFlags,
        out: &mut Vec<PageState>,
    ) -> Result<(), FaultError> {
        self.fault_into(range, flags, out, false)
    }

    /// [`RangeFaulter::range_fault_into`] for a range the caller has just
    /// populated for write ([`RangeFaulter::populate_runs`]): the
    /// populate a write fault starts with is skipped, and the snapshot
    /// still populates whatever it finds unsatisfied, so the result is the
    /// same.
    pub fn range_fault_populated_into(
        &self,
        range: VaRange,
        flags: FaultFlags,
        out: &mut Vec<PageState>,
    ) -> Result<(), FaultError> {
        self.fault_into(range, flags, out, true)
    }

    fn fault_into(
        &self,
        range: VaRange,
        flags: FaultFlags,
        out: &mut Vec<PageState>,
        populated: bool,
    ) -> Result<(), FaultError> {
        if !range.start().is_page_aligned() || !range.end().is_page_aligned() {
            return Err(RangeError::Unaligned {
                start: range.start().0,
                end: range.end().0,
            }
            .into());
        }
        let range = range.user()?;
        let pages = range.pages();
        out.clear();
        let n = usize::try_from(pages).map_err(|_| FaultError::TooLarge { pages })?;
        out.try_reserve_exact(n)
            .map_err(|_| FaultError::TooLarge { pages })?;
        out.resize(n, PageState::Error);

        let segs = self.maps.segments(range)?;
        check_access(&segs, flags)?;
        let need = match (flags.fault, flags.write) {
            (false, _) => Need::Nothing,
            (true, false) => Need::Read,
            (true, true) => Need::Write,
        };
        for s in &segs {
            let first = ((s.range.start().0 - range.start().0) >> PAGE_SHIFT) as usize;
            let cnt = s.range.pages() as usize;
            let slot = &mut out[first..first + cnt];
            match &s.mapping {
                Some(m) if m.read => self.fault_piece(s.range, m, need, populated, slot)?,
                // Holes and unreadable mappings: errors were raised above
                // for fault requests; a snapshot marks them.
                _ => slot.fill(PageState::Error),
            }
        }
        Ok(())
    }

    fn fault_piece(
        &self,
        piece: VaRange,
        m: &Mapping,
        need: Need,
        populated: bool,
        out: &mut [PageState],
    ) -> Result<(), FaultError> {
        if need == Need::Write && !populated {
            self.populate(piece, true)?;
        }
        let mut snap = self.snapshot(piece, m, need, out)?;
        let mut attempts = 0;
        while let Some((a, b)) = snap.unsatisfied {
            if let Some(u) = snap.uncovered {
                // The walk did not see these pages: either the cached map is
                // stale (unmapped or remapped since) or they are VM_PFNMAP.
                let addr = VirtAddr(piece.start().0 + ((u as u64) << PAGE_SHIFT));
                return Err(self
                    .recheck(piece, need == Need::Write)
                    .unwrap_or(FaultError::BadPage { addr }));
            }
            let start = VirtAddr(piece.start().0 + ((a as u64) << PAGE_SHIFT));
            let sub = page_range(start, b - a)?;
            if attempts == MAX_ATTEMPTS {
                return Err(FaultError::Unstable {
                    range: sub,
                    attempts,
                });
            }
            attempts += 1;
            self.populate(sub, need == Need::Write)?;
            let again = self.snapshot(sub, m, need, &mut out[a..b])?;
            snap = Snap {
                unsatisfied: again.unsatisfied.map(|(x, y)| (a + x, a + y)),
                uncovered: again.uncovered.map(|x| a + x),
            };
        }
        Ok(())
    }

    /// Fills `out` (one entry per page of `piece`) from one scan.
    fn snapshot(
        &self,
        piece: VaRange,
        m: &Mapping,
        need: Need,
        out: &mut [PageState],
    ) -> Result<Snap, FaultError> {
        // Pages the scan does not report stay `Error` (kernel: VM_PFNMAP
        // areas are skipped by the walk and are HMM_PFN_ERROR).
        out.fill(PageState::Error);
        let base = piece.start().0;
        let mut unsat: Option<(usize, usize)> = None;
        let mut note = |a: usize, b: usize| {
            unsat = Some(match unsat {
                None => (a, b),
                Some((x, y)) => (x.min(a), y.max(b)),
            });
        };
        // Relaxed: a statistics counter.
        self.scans.fetch_add(1, Ordering::Relaxed);
        self.pagemap.scan_with(
            piece,
            &ScanArgs::report(return_mask(m)),
            &mut |r: page_region| {
                let a = ((r.start.max(base) - base) >> PAGE_SHIFT) as usize;
                let b = (((r.end - base) >> PAGE_SHIFT) as usize).min(out.len());
                if a >= b {
                    return;
                }
                let (state, present) = classify(r.categories, m);
                out[a..b].fill(state);
                let ok = match need {
                    Need::Nothing => true,
                    Need::Read => present,
                    Need::Write => state.is_writable(),
                };
                if !ok {
                    note(a, b);
                }
            },
        )?;
        let uncovered = if need == Need::Nothing {
            None
        } else {
            out.iter().position(|s| *s == PageState::Error)
        };
        if let Some(u) = uncovered {
            note(u, u + 1);
        }
        Ok(Snap {
            unsatisfied: unsat,
            uncovered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::maps::MappingKind;

    fn anon(write: bool, shared: bool) -> Mapping {
        Mapping {
            range: VaRange::new(VirtAddr(0x1000), VirtAddr(0x9000)).unwrap(),
            read: true,
            write,
            exec: false,
            shared,
            kind: MappingKind::Anonymous,
        }
    }

    #[test]
    fn classification_table() {
        let m = anon(true, false);
        assert_eq!(classify(0, &m), (PageState::Zero, false));
        assert_eq!(
            classify(PAGE_IS_PRESENT | PAGE_IS_PFNZERO, &m),
            (PageState::Zero, true)
        );
        assert_eq!(
            classify(PAGE_IS_PRESENT, &m),
            (PageState::Valid { writable: true }, true)
        );
        assert_eq!(
            classify(PAGE_IS_SWAPPED, &m),
            (PageState::NotPresent, false)
        );
        assert_eq!(
            classify(PAGE_IS_PRESENT, &anon(false, false)),
            (PageState::Valid { writable: false }, true)
        );
        let shm = anon(true, true);
        assert_eq!(classify(0, &shm), (PageState::NotPresent, false));
        assert_eq!(
            classify(PAGE_IS_PRESENT | PAGE_IS_FILE, &shm),
            (PageState::Valid { writable: true }, true)
        );
        let mut file = anon(true, false);
        file.kind = MappingKind::File {
            path: "/x".into(),
            offset: 0,
            dev: (0, 0),
            inode: 1,
            deleted: false,
        };
        assert_eq!(classify(0, &file), (PageState::NotPresent, false));
        assert_eq!(
            classify(PAGE_IS_PRESENT | PAGE_IS_FILE, &file),
            (PageState::Valid { writable: false }, true),
            "private file page: a write would copy"
        );
        // PAGE_IS_FILE is asked for exactly where classify needs it. A
        // private anonymous mapping's pages are never file pages, so the
        // kernel would not report it there; for shared and read-only
        // mappings classify's answer is the same without it.
        assert_ne!(return_mask(&file) & PAGE_IS_FILE, 0);
        assert_eq!(return_mask(&m) & PAGE_IS_FILE, 0);
        for other in [&shm, &anon(false, false)] {
            let mask = return_mask(other);
            assert_eq!(mask & PAGE_IS_FILE, 0, "{other:?}");
            for cats in [
                0,
                PAGE_IS_PRESENT,
                PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                PAGE_IS_SWAPPED,
            ] {
                assert_eq!(
                    classify(cats | PAGE_IS_FILE, other),
                    classify(cats, other),
                    "{other:?}: PAGE_IS_FILE changes nothing"
                );
            }
        }
        assert_eq!(
            classify(PAGE_IS_PRESENT, &file),
            (PageState::Valid { writable: true }, true)
        );
    }

    #[test]
    fn madvise_populate_is_detected() {
        // MADV_POPULATE_* arrived in Linux 5.14; the probe must agree
        // with the running kernel's version.
        let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut it = rel
            .trim()
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        let ver = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        let f = RangeFaulter::new().unwrap();
        assert_eq!(
            f.populate_method() == PopulateMethod::Madvise,
            ver >= (5, 14),
            "{rel}"
        );
        f.force_touch_populate();
        assert_eq!(f.populate_method(), PopulateMethod::Touch);
    }
}
