//! A page the adaptive policy fetches speculatively is fetched for write
//! only when the faults before it *in its own mapping* were writes: an
//! output buffer's write faults at lower addresses say nothing about an
//! input buffer above it (cpu driver, the adaptive policy forced on).
//!
//! Before the fix, a speculated input page took its write flag from the
//! nearest demanded run by address — in the output buffer — and came in
//! writable, with a twin the write-back then compared every launch.

#![allow(missing_docs)]

use std::sync::Arc;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{FetchPolicy, Mirror, MirrorConfig};
use hmm_core::{VaRange, VirtAddr};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

const PAGE: u64 = 4096;
/// Pages of the reservation: output at 0..16, a `PROT_NONE` gap at 16..32
/// (so the two buffers are separate mappings), input at 32..64.
const PAGES: u64 = 64;
const OUT: u64 = 0;
const IN: u64 = 32;

/// A 2 MiB-aligned reservation laid out as above (`IN` then starts a
/// 16-page node of the policy's occupancy tree).
struct Buffers {
    base: u64,
    raw: *mut libc::c_void,
    raw_len: usize,
}

impl Buffers {
    fn new() -> Buffers {
        let raw_len = (4 << 20) as usize;
        // SAFETY: a fresh private anonymous reservation; nothing else
        // refers to it.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        let base = (raw as u64).next_multiple_of(2 << 20);
        // SAFETY: the gap lies inside the reservation just made.
        let r = unsafe {
            libc::mprotect(
                (base + 16 * PAGE) as *mut libc::c_void,
                (16 * PAGE) as usize,
                libc::PROT_NONE,
            )
        };
        assert_eq!(r, 0);
        Buffers { base, raw, raw_len }
    }

    fn page(&self, p: u64) -> u64 {
        self.base + p * PAGE
    }

    fn word(&self, p: u64) -> u32 {
        // SAFETY: word 0 of a readable page of the reservation.
        unsafe { std::ptr::read_volatile(self.page(p) as *const u32) }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: our own reservation, no longer used.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}

#[test]
fn an_input_page_fetched_speculatively_after_output_write_faults_is_read_only() {
    let b = Buffers::new();
    assert!(b.base + PAGES * PAGE <= b.raw as u64 + b.raw_len as u64);
    for p in IN..IN + 32 {
        // SAFETY: word 0 of a writable input page.
        unsafe { std::ptr::write_volatile(b.page(p) as *mut u32, 1000 + p as u32) };
    }
    let host = Arc::new(HostSpace::new().expect("host space"));
    let m = Mirror::new(
        host,
        CpuDevice::with_threads(2),
        MirrorConfig {
            fetch: FetchPolicy::Adaptive,
            ..MirrorConfig::default()
        },
    )
    .expect("mirror");
    // Input pages 12..16 of the node resident beforehand, so that one
    // round faults on output pages (writes, by invocations whose input is
    // resident) and on input pages 4..12 (reads) together.
    let resident = VaRange::new(VirtAddr(b.page(IN + 12)), VirtAddr(b.page(IN + 16))).unwrap();
    m.prefetch(resident, false).expect("prefetch");
    // Invocation i reads input page 4 + i and writes it to output page i.
    let copy = CpuKernel::new(|lane, i| {
        let (src, dst) = (lane.args()[0], lane.args()[1]);
        let v = lane.load_u32(src + u64::from(i) * PAGE)?;
        lane.store_u32(dst + u64::from(i) * PAGE, v)
    });
    m.launch(&copy, 12, [b.page(IN + 4), b.page(OUT)])
        .expect("copy launch");
    for i in 0..12 {
        assert_eq!(
            b.word(OUT + i),
            1000 + (IN + 4 + i) as u32,
            "output page {i}"
        );
    }
    // Demanded 8 and resident 4 of the node's 16 pages (75 % > 51 %): its
    // other 4 pages, input 0..4, came in speculatively — before any
    // demanded input page, after the output's write faults.
    assert!(m.stats().speculated >= 4, "{:?}", m.stats());
    let read = CpuKernel::new(|lane, _| {
        let v = lane.load_u32(lane.args()[0])?;
        lane.store_u32(lane.args()[1], v)
    });
    let r = m
        .launch(&read, 1, [b.page(IN), b.page(OUT + 15)])
        .expect("read launch");
    assert_eq!(b.word(OUT + 15), 1000 + IN as u32);
    assert!(
        r.pages_in <= 1,
        "input page 0 was speculated resident (only the output page comes in): {r:?}"
    );
    // Input page 0 was fetched for read: a store to it is an upgrade
    // fault, one more round. Fetched writable (the old rule), the store
    // would go through in one round.
    let write = CpuKernel::new(|lane, _| lane.store_u32(lane.args()[0], 7));
    let r = m.launch(&write, 1, [b.page(IN)]).expect("write launch");
    assert_eq!(b.word(IN), 7, "the store reached the CPU");
    assert_eq!(
        r.submissions, 2,
        "a speculated input page must come in read-only: {r:?}"
    );
}
