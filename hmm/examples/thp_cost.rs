//! What write tracking costs a THP-backed buffer (issue 19, finding 8),
//! and what the [`CpuWrites::Hash`] opt-out costs instead. Prints figures;
//! asserts only correctness.
//!
//! A 256 MiB, 2 MiB-aligned `MADV_HUGEPAGE` buffer is made resident on the
//! device (one read per page), then the CPU writes one word per 2 MiB
//! block. Per mode it prints `AnonHugePages` before and after, the time of
//! a CPU pass that touches every 4 KiB page in a random order (TLB-bound:
//! 4 KiB pages need 512 times the TLB entries), a sequential pass, and the
//! time of a launch whose only work is its sync point (`PAGEMAP_SCAN` for
//! `Protect`, re-hashing every resident page for `Hash`). A buffer never
//! mirrored is the control.
//!
//! `cargo run --release -p hmm --example thp_cost -- [cpu|wgpu|vulkan|auto] [MiB]`

use std::time::Instant;

use hmm::{CpuWrites, Device, MirrorConfig};

#[path = "common/touch.rs"]
mod touch;
use touch::TOUCH;

const HUGE: usize = 2 << 20;

/// An anonymous, 2 MiB-aligned, `MADV_HUGEPAGE` buffer of `len` bytes.
struct HugeBuf {
    map: *mut libc::c_void,
    map_len: usize,
    start: *mut u8,
    len: usize,
}

impl HugeBuf {
    fn new(len: usize) -> Result<HugeBuf, String> {
        let map_len = len + HUGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err("mmap failed".into());
        }
        let start = ((map as usize + HUGE - 1) & !(HUGE - 1)) as *mut u8;
        // SAFETY: advice on our own mapping; it changes no contents.
        unsafe { libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE) };
        let mut b = HugeBuf {
            map,
            map_len,
            start,
            len,
        };
        for (i, w) in b.words().iter_mut().enumerate() {
            *w = i as u32;
        }
        Ok(b)
    }

    fn words(&mut self) -> &mut [u32] {
        // SAFETY: `len` bytes at `start` lie inside our live, writable
        // mapping, borrowed through `&mut self` (the device reads it only
        // during launches, which the mirror makes the CPU wait for).
        unsafe { std::slice::from_raw_parts_mut(self.start.cast(), self.len / 4) }
    }

    fn words_ref(&self) -> &[u32] {
        // SAFETY: as in `words`, shared.
        unsafe { std::slice::from_raw_parts(self.start.cast_const().cast(), self.len / 4) }
    }

    fn anon_huge_kib(&self) -> u64 {
        let (lo, hi) = (self.start as u64, self.start as u64 + self.len as u64);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let (mut inside, mut kib) = (false, 0);
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a < hi && b > lo;
                    continue;
                }
            }
            if let Some(rest) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
                kib += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
        kib
    }

    /// The CPU writes one word in every 2 MiB block.
    fn write_every_block(&mut self) {
        let blocks = self.len / HUGE;
        let w = self.words();
        for b in 0..blocks {
            w[b * HUGE / 4 + 16] = w[b * HUGE / 4 + 16].wrapping_add(1);
        }
    }

    /// Median seconds of 5 passes touching one word per 4 KiB page in a
    /// fixed pseudo-random order, and of 5 sequential summing passes.
    fn passes(&self, order: &[usize]) -> (f64, f64) {
        let w = self.words_ref();
        let mut rand = Vec::new();
        let mut seq = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let mut s = 0u32;
            for &p in order {
                s = s.wrapping_add(w[p * 1024 + 3]);
            }
            std::hint::black_box(s);
            rand.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let s = w.iter().fold(0u32, |a, &v| a.wrapping_add(v));
            std::hint::black_box(s);
            seq.push(t.elapsed().as_secs_f64());
        }
        rand.sort_by(f64::total_cmp);
        seq.sort_by(f64::total_cmp);
        (rand[2], seq[2])
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; no borrow outlives it.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let want = hmm::parse_backend(a.first().map(String::as_str))?;
    let mib: usize = a.get(1).map_or(Ok(256), |s| s.parse())?;
    let len = mib << 20;
    let pages = len / 4096;
    // A fixed pseudo-random page order (xorshift; the same for every mode).
    let mut order: Vec<usize> = (0..pages).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..pages).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }

    println!("THP and write tracking: a {mib} MiB MADV_HUGEPAGE buffer, resident on the device, then one CPU write per 2 MiB block");
    println!("| buffer | AnonHugePages before → after (KiB) | the block writes µs | random-page CPU pass ms | sequential CPU pass ms | launch with only its sync point ms |");
    println!("|---|---|---|---|---|---|");
    let mut control = HugeBuf::new(len)?;
    let before = control.anon_huge_kib();
    let t = Instant::now();
    control.write_every_block();
    let wr = t.elapsed().as_secs_f64();
    let (r, s) = control.passes(&order);
    println!(
        "| never mirrored (control) | {before} → {} | {:.0} | {:.1} | {:.1} | — |",
        control.anon_huge_kib(),
        wr * 1e6,
        r * 1e3,
        s * 1e3
    );
    drop(control);
    let mut note = String::new();
    for mode in [CpuWrites::Protect, CpuWrites::Hash] {
        let mut buf = HugeBuf::new(len)?;
        let opened = Device::open(want)?;
        note = opened.note.clone();
        let cfg = MirrorConfig {
            pool_slots: (pages as u32 + 1024).next_power_of_two(),
            cpu_writes: mode,
            ..MirrorConfig::default()
        };
        let m = hmm::mirror(opened.device, cfg)?;
        let k = m.backend().kernel(&TOUCH)?;
        let mut out = vec![0u32; pages];
        m.run(&k, pages as u32, (buf.start.cast_const(), out.as_mut_ptr()))?;
        if out
            .iter()
            .enumerate()
            .any(|(i, &v)| v as usize != i * 1024 + 7)
        {
            return Err("wrong result after the first launch".into());
        }
        let before = buf.anon_huge_kib();
        let t = Instant::now();
        buf.write_every_block();
        let wr = t.elapsed().as_secs_f64();
        let after = buf.anon_huge_kib();
        let (r, s) = buf.passes(&order);
        // A launch of nothing: its cost is the sync point (and a
        // submission). Median of 5.
        let mut sync = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            m.run(&k, 0, (buf.start.cast_const(), out.as_mut_ptr()))?;
            sync.push(t.elapsed().as_secs_f64());
        }
        sync.sort_by(f64::total_cmp);
        // The CPU's writes must reach the device.
        buf.words()[7] = 0xdead_beef;
        m.run(&k, 1, (buf.start.cast_const(), out.as_mut_ptr()))?;
        if out[0] != 0xdead_beef {
            return Err(format!(
                "{mode:?}: the device read {:#x}, not the CPU's new 0xdeadbeef",
                out[0]
            )
            .into());
        }
        println!(
            "| mirrored, `CpuWrites::{mode:?}` | {before} → {after} | {:.0} | {:.1} | {:.1} | {:.2} |",
            wr * 1e6,
            r * 1e3,
            s * 1e3,
            sync[2] * 1e3
        );
    }
    println!("{note}");
    Ok(())
}
