//! Fault records → runs of pages to service.
//!
//! A device writes fault records into a buffer it shares with the host; a
//! buggy or hostile device may write anything there. Records are therefore
//! validated before anything is done with them ([`validate`]): unknown flag
//! bits, or an invocation that did not stop at a fault, make a record
//! garbage (counted, ignored). Addresses are *not* trusted to be mapped:
//! the fault service looks each one up in the CPU mappings and turns a bad
//! one into a typed error naming it.
//!
//! Valid faults are then taken in batches (UVM services 256 at a time),
//! each batch sorted by page, deduplicated (a page wanted for read and
//! write counts once, as a write), and coalesced into runs of consecutive
//! pages with the same access ([`coalesce`]), so one `range_fault` and one
//! copy batch serve many faults.

use super::backend::{
    InvocationSet, RawFaultRecord, FAULT_ATOMIC, FAULT_KNOWN_FLAGS, FAULT_MISALIGNED, FAULT_WRITE,
};
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};

/// One validated fault, at page granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageFault {
    /// Page-aligned address.
    pub page: VirtAddr,
    /// Exact faulting address (for error messages).
    pub addr: VirtAddr,
    /// Write (or atomic) access.
    pub write: bool,
    /// The invocation that faulted (as reported; checked against the
    /// launch's invocations).
    pub invocation: u32,
    /// The access was misaligned ([`FAULT_MISALIGNED`]): not serviceable,
    /// the launch ends with a typed error naming `addr`.
    pub misaligned: bool,
}

/// A run of consecutive pages to service with one access mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The pages.
    pub range: VaRange,
    /// Whether they are needed writable.
    pub write: bool,
    /// First exact faulting address in the run (for error messages).
    pub first_addr: VirtAddr,
}

/// Keeps the records that describe a real fault of an incomplete
/// invocation; returns how many were rejected as garbage.
///
pub fn validate(
    records: &[RawFaultRecord],
    incomplete: &InvocationSet,
    out: &mut Vec<PageFault>,
) -> u64 {
    let mut rejected = 0;
    for r in records {
        if r.flags & !FAULT_KNOWN_FLAGS != 0 || !incomplete.contains(r.invocation) {
            rejected += 1;
            continue;
        }
        let addr = VirtAddr(r.addr());

        out.push(PageFault {
            page: addr.page_down(),
            addr,
            write: r.flags & (FAULT_WRITE | FAULT_ATOMIC) != 0,
            invocation: r.invocation,
            misaligned: r.flags & FAULT_MISALIGNED != 0,
        });
    }
    rejected
}

/// Sorts, deduplicates and coalesces one batch of faults into runs.
pub fn coalesce(batch: &mut [PageFault], runs: &mut Vec<Run>) {
    batch.sort_unstable_by_key(|f| (f.page, !f.write));
    let mut i = 0;
    while i < batch.len() {
        // Collapse every fault on this page; any write makes it a write.
        let page = batch[i].page;
        let first_addr = batch[i].addr;
        let mut write = false;
        while i < batch.len() && batch[i].page == page {
            write |= batch[i].write;
            i += 1;
        }
        // The last page of the 64-bit space has no end address; a device
        // may report it (garbage or a wild pointer): end the run at the top.
        let end = page.0.saturating_add(PAGE_SIZE);
        match runs.last_mut() {
            Some(r) if r.range.end() == page && r.write == write => {
                // Extending a run cannot overflow: `end` was computed above
                // from a page below the 64-bit limit.
                if let Ok(ext) = VaRange::new(r.range.start(), VirtAddr(end)) {
                    r.range = ext;
                }
            }
            _ => {
                if let Ok(range) = VaRange::new(page, VirtAddr(end)) {
                    runs.push(Run {
                        range,
                        write,
                        first_addr,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(inv: u32, addr: u64, flags: u32) -> RawFaultRecord {
        RawFaultRecord {
            invocation: inv,
            flags,
            addr_lo: addr as u32,
            addr_hi: (addr >> 32) as u32,
        }
    }

    #[test]
    fn garbage_records_are_rejected() {
        let inc = InvocationSet::from_ids(8, [1, 2, 5]);
        let mut out = Vec::new();
        let bad = validate(
            &[
                rec(1, 0x1000, 0),
                rec(3, 0x2000, 0),           // invocation did not fault
                rec(2, 0x3000, 0x8000_0000), // unknown flag
                rec(5, 0x4000_0000_1234, FAULT_WRITE),
            ],
            &inc,
            &mut out,
        );
        assert_eq!(bad, 2);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].page, VirtAddr(0x4000_0000_1000));
        assert!(out[1].write);
    }

    #[test]
    fn the_top_page_does_not_overflow() {
        let inc = InvocationSet::from_ids(1, [0]);
        let mut out = Vec::new();
        validate(&[rec(0, u64::MAX - 3, FAULT_WRITE)], &inc, &mut out);
        let mut runs = Vec::new();
        coalesce(&mut out, &mut runs);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].first_addr, VirtAddr(u64::MAX - 3));
    }

    #[test]
    fn unsorted_incomplete_ids_are_kept_ascending() {
        let inc = InvocationSet::from_ids(10, [9, 3, 3, 1]);
        let mut out = Vec::new();
        assert_eq!(validate(&[rec(3, 0x1000, 0)], &inc, &mut out), 0);
        assert_eq!(inc.iter().collect::<Vec<_>>(), vec![1, 3, 9]);
    }

    #[test]
    fn coalescing_merges_neighbours_and_dedupes() {
        let f = |p: u64, w: bool| PageFault {
            misaligned: false,
            page: VirtAddr(p),
            addr: VirtAddr(p + 8),
            write: w,
            invocation: 0,
        };
        let mut batch = vec![
            f(0x3000, false),
            f(0x1000, false),
            f(0x2000, false),
            f(0x2000, true),
            f(0x1000, false),
            f(0x9000, false),
        ];
        let mut runs = Vec::new();
        coalesce(&mut batch, &mut runs);
        let got: Vec<(u64, u64, bool)> = runs
            .iter()
            .map(|r| (r.range.start().0, r.range.end().0, r.write))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x2000, false),
                (0x2000, 0x3000, true),
                (0x3000, 0x4000, false),
                (0x9000, 0xa000, false)
            ]
        );
    }
}
