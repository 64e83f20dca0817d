//! Transparent huge pages under mirroring (issue 19, finding 8).
//!
//! Write tracking write-protects (`UFFD_FEATURE_WP_ASYNC`) what the device
//! holds, and the kernel splits an armed huge page at the CPU's first
//! write to it. What the mirror can promise: arming covers whole 2 MiB
//! blocks, so a block the device read stays huge until the CPU writes it;
//! 2 MiB blocks the device never faulted on are never armed and stay huge; with
//! [`CpuWrites::Hash`](hmm_core::mirror::CpuWrites::Hash) nothing is armed
//! and every block stays huge, while CPU writes still reach the device
//! (found by hashing at the sync point).

use hmm_core::mirror::{CpuWrites, MirrorConfig};

use crate::support::{launch, setup, small_cfg, TestMap};
use crate::{TestKernel, TestKernels};

const HUGE: usize = 2 << 20;
const BLOCKS: usize = 32;

/// `AnonHugePages` (bytes) of the mappings overlapping `[start, end)`,
/// from `/proc/self/smaps` (whole mappings: uffd registration may have
/// split the buffer's mapping into several, all inside it).
fn anon_huge_bytes(start: u64, end: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = a < end && b > start;
                continue;
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix("AnonHugePages:") {
                let kib: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                total += kib * 1024;
            }
        }
    }
    total
}

#[repr(C)]
struct Node {
    next: u64,
    value: u64,
}

/// A 64 MiB, 2 MiB-aligned `MADV_HUGEPAGE` buffer, written through so
/// the kernel backs it with huge pages; `None` (with a skip line) where
/// it did not.
fn huge_buffer() -> Option<(TestMap, u64)> {
    let map = TestMap::anon(
        (BLOCKS + 1) * HUGE / 4096,
        libc::PROT_READ | libc::PROT_WRITE,
    );
    let start = (map.addr() + HUGE as u64 - 1) & !(HUGE as u64 - 1);
    // SAFETY: advice on our own mapping; it changes no contents.
    unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            BLOCKS * HUGE,
            libc::MADV_HUGEPAGE,
        )
    };
    for b in 0..BLOCKS {
        // SAFETY: inside the mapping, which is readable and writable.
        unsafe { std::ptr::write_volatile((start + (b * HUGE) as u64) as *mut u64, 0) };
    }
    let huge = anon_huge_bytes(start, start + (BLOCKS * HUGE) as u64);
    if huge < ((BLOCKS - 2) * HUGE) as u64 {
        println!(
            "skip: the kernel gave this buffer {} KiB of huge pages, not {} (THP off or fragmented)",
            huge / 1024,
            BLOCKS * HUGE / 1024
        );
        return None;
    }
    Some((map, start))
}

/// Builds a list with one node at the start of each of the first `blocks`
/// blocks; returns its head and the sum of its values.
fn list_over(start: u64, blocks: usize, base: u64) -> (u64, u64) {
    let mut head = 0;
    let mut sum = 0;
    for b in 0..blocks {
        let node = (start + (b * HUGE) as u64) as *mut Node;
        let value = base + b as u64;
        // SAFETY: a 16-byte node at the start of a block of our buffer.
        unsafe { node.write_volatile(Node { next: head, value }) };
        head = node as u64;
        sum += value;
    }
    (head, sum)
}

fn run<B: TestKernels>(b: B, cpu_writes: CpuWrites, device_blocks: usize) {
    let Some((_map, start)) = huge_buffer() else {
        return;
    };
    let end = start + (BLOCKS * HUGE) as u64;
    let initial = anon_huge_bytes(start, end);
    let cfg = MirrorConfig {
        cpu_writes,
        ..small_cfg()
    };
    let (_h, m) = setup(b, cfg);
    let k = m
        .backend()
        .test_kernel(TestKernel::ListSum)
        .expect("kernel");
    let out = Box::new(0u64);
    let outp = &*out as *const u64 as u64;
    let read_out = || {
        // SAFETY: `out` is live; volatile so the write-back is read.
        unsafe { std::ptr::read_volatile(outp as *const u64) }
    };
    let (head, sum) = list_over(start, device_blocks, 1);
    launch(&m, &k, 1, [head, outp]).expect("launch");
    assert_eq!(read_out(), sum);
    let before = anon_huge_bytes(start, end);
    // Arming covers whole 2 MiB blocks (a watched region is one block), so
    // the blocks the device read, armed now, are still huge: arming part of
    // a huge page splits it (issue 15). One block of slack for the kernel.
    assert!(
        before + HUGE as u64 >= initial,
        "{cpu_writes:?}: {} of {} KiB of huge pages left after the device read {device_blocks} blocks",
        before / 1024,
        initial / 1024
    );
    // The CPU writes every block: new values in the nodes the device
    // read, and a word in every other block.
    let (head, sum) = list_over(start, device_blocks, 1000);
    for blk in device_blocks..BLOCKS {
        // SAFETY: inside our buffer.
        unsafe { std::ptr::write_volatile((start + (blk * HUGE + 64) as u64) as *mut u64, 7) };
    }
    let after = anon_huge_bytes(start, end);
    println!(
        "{} {cpu_writes:?}: device read {device_blocks} of {BLOCKS} blocks; AnonHugePages {} -> {} KiB after CPU writes to every block",
        m.backend().info().driver,
        before / 1024,
        after / 1024
    );
    // The CPU's writes reach the device whatever the mode.
    launch(&m, &k, 1, [head, outp]).expect("launch");
    assert_eq!(read_out(), sum, "the device read the CPU's new values");
    let untouched = ((BLOCKS - device_blocks) * HUGE) as u64;
    match cpu_writes {
        // Blocks the device never faulted on were never armed.
        CpuWrites::Protect => assert!(
            after >= untouched.saturating_sub(2 * HUGE as u64),
            "{} KiB of huge pages left; the {} blocks the device never touched hold {} KiB",
            after / 1024,
            BLOCKS - device_blocks,
            untouched / 1024
        ),
        // Nothing armed: every block stays huge.
        _ => assert!(
            after >= before.min(((BLOCKS - 2) * HUGE) as u64),
            "hash mode kept {} of {} KiB of huge pages",
            after / 1024,
            before / 1024
        ),
    }
}

/// Default tracking: the device reads one page in each of 16 of 32
/// THP-backed blocks; after CPU writes to every block the 16 it never
/// touched are still huge, and the device sees the CPU's new values.
pub fn huge_pages_the_device_never_touched_stay_huge<B: TestKernels>(b: B) {
    run(b, CpuWrites::Protect, BLOCKS / 2);
}

/// [`CpuWrites::Hash`]: the device reads all 32 blocks, the CPU writes
/// all of them, every block stays huge and the device sees the new values.
pub fn hash_tracking_keeps_huge_pages<B: TestKernels>(b: B) {
    run(b, CpuWrites::Hash, BLOCKS);
}
