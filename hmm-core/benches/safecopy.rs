//! Copy efficiency of the recoverable copy against `memcpy` and
//! `process_vm_readv`, measured in the same run.
//!
//! ```sh
//! cargo bench -p hmm-core --bench safecopy            # 7 repetitions
//! HMM_SAFECOPY_BENCH_REPS=15 cargo bench -p hmm-core --bench safecopy
//! ```
//!
//! Page-aligned chunks of 4 KiB, 64 KiB, 2 MiB and 256 MiB are copied from
//! resident source pages into resident destination pages. "hot": the same
//! chunk again and again (cache resident); "cold": chunk after chunk
//! through 256 MiB (DRAM). Every repetition runs every method once, in
//! rotating order; the ratio to `memcpy` is taken within a repetition and
//! the median over repetitions is reported, with the range. GB/s = 1e9 B/s.
//!
//! Methods:
//! - `memcpy`: `std::ptr::copy_nonoverlapping` (the libc `memcpy`);
//! - `safecopy`: `Recoverable::copy_in`, the permission checked once;
//! - `safecopy+check`: `Recoverable::check()` (three system calls) before
//!   every chunk, as `hostcopy` pays once per batch;
//! - `process_vm_readv`: one iovec per side (`hostcopy` merges consecutive
//!   pages the same way), the syscall path.
//!
//! Then the write-back shape: 1024 runs of 16 or 64 bytes, 256 bytes
//! apart (what a twin diff of a partly rewritten page produces), written
//! with one `Recoverable::check` and a `copy_out` per run (the recoverable
//! `write_runs`) against one `process_vm_writev` with an iovec per run
//! (the syscall `write_runs`), in ns per run.

use std::hint::black_box;
use std::time::Instant;

use hmm_core::cpu::safecopy::{self, CopyPath, Recoverable};

const MIB: usize = 1 << 20;
const AREA: usize = 256 * MIB;

fn map(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // No transparent huge pages: the mirror copies 4 KiB pages of ordinary
    // application memory, and THP would flatter process_vm_readv's pinning.
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
    let p = p.cast::<u8>();
    for i in (0..len).step_by(4096) {
        // SAFETY: inside the mapping; populates every page.
        unsafe { p.add(i).write(i as u8 | 1) };
    }
    p
}

#[derive(Clone, Copy)]
enum Method {
    Memcpy,
    Safe,
    SafeChecked,
    Pvr,
}

const METHODS: [(Method, &str); 4] = [
    (Method::Memcpy, "memcpy"),
    (Method::Safe, "safecopy"),
    (Method::SafeChecked, "safecopy+check"),
    (Method::Pvr, "process_vm_readv"),
];

/// Copies `n` bytes with `m`.
///
/// # Safety
///
/// `dst` and `src` are valid, disjoint, resident ranges of `n` bytes.
unsafe fn copy(m: Method, rc: &Recoverable, dst: *mut u8, src: *const u8, n: usize) {
    match m {
        // SAFETY: the caller's ranges.
        Method::Memcpy => unsafe { std::ptr::copy_nonoverlapping(src, dst, n) },
        Method::Safe => {
            // SAFETY: the caller's ranges (ordinary anonymous memory).
            let r = unsafe { rc.copy_in(dst, src, n) };
            assert!(r.is_ok());
        }
        Method::SafeChecked => {
            let rc = Recoverable::check().expect("recoverable path");
            // SAFETY: as above.
            let r = unsafe { rc.copy_in(dst, src, n) };
            assert!(r.is_ok());
        }
        Method::Pvr => {
            let l = libc::iovec {
                iov_base: dst.cast(),
                iov_len: n,
            };
            let r = libc::iovec {
                iov_base: src.cast_mut().cast(),
                iov_len: n,
            };
            // SAFETY: one writable local iovec (the caller's `dst`), the
            // remote side in our own process.
            let got = unsafe { libc::process_vm_readv(libc::getpid(), &l, 1, &r, 1, 0) };
            assert_eq!(got, n as isize);
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ns per run of writing 1024 runs of `len` bytes (stride 256) into
/// `dst` from `src`, recoverable (`safe`) or with `process_vm_writev`.
fn runs_ns(dst: *mut u8, src: *const u8, len: usize, safe: bool) -> f64 {
    const RUNS: usize = 1024;
    const ROUNDS: usize = 200;
    let t0 = Instant::now();
    for _ in 0..ROUNDS {
        if safe {
            let rc = Recoverable::check().expect("recoverable path");
            for k in 0..RUNS {
                // SAFETY: run `k` lies inside both populated 256 KiB
                // prefixes, which are disjoint.
                let r = unsafe { rc.copy_out(dst.add(k * 256), src.add(k * 256), len) };
                assert!(r.is_ok());
            }
        } else {
            let iov = |base: *const u8| -> Vec<libc::iovec> {
                (0..RUNS)
                    .map(|k| libc::iovec {
                        // SAFETY: inside the same mapping (see above).
                        iov_base: unsafe { base.add(k * 256) }.cast_mut().cast(),
                        iov_len: len,
                    })
                    .collect()
            };
            let (l, r) = (iov(src), iov(dst));
            // SAFETY: local iovecs read our source runs; the remote side is
            // our own process.
            let put = unsafe {
                libc::process_vm_writev(
                    libc::getpid(),
                    l.as_ptr(),
                    RUNS as _,
                    r.as_ptr(),
                    RUNS as _,
                    0,
                )
            };
            assert_eq!(put, (RUNS * len) as isize);
        }
    }
    t0.elapsed().as_secs_f64() * 1e9 / (RUNS * ROUNDS) as f64
}

fn main() {
    let reps: usize = std::env::var("HMM_SAFECOPY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let path = safecopy::active_path();
    println!("copy path: {path}");
    if path != CopyPath::Recoverable {
        println!("the recoverable copy is not available here; nothing to compare");
        return;
    }
    let rc = Recoverable::check().expect("recoverable path");
    let src = map(AREA);
    let dst = map(AREA);
    println!(
        "{:>8} {:>5} {:<18} {:>22} {:>24}",
        "size", "mode", "method", "GB/s median [min-max]", "% of memcpy median [range]"
    );
    for n in [4 << 10, 64 << 10, 2 * MIB, AREA] {
        for cold in [false, true] {
            if n == AREA && cold {
                continue;
            }
            // Enough chunks for ~64 MiB (hot) or the whole area (cold),
            // at least one.
            let chunks = if cold {
                AREA / n
            } else {
                (64 * MIB / n).max(1)
            };
            let mut gbs = vec![Vec::new(); METHODS.len()];
            let mut pct = vec![Vec::new(); METHODS.len()];
            for rep in 0..reps {
                let mut secs = [0f64; METHODS.len()];
                for k in 0..METHODS.len() {
                    let which = (k + rep) % METHODS.len();
                    let m = METHODS[which].0;
                    let t0 = Instant::now();
                    for c in 0..chunks {
                        let off = if cold { c * n } else { 0 };
                        // SAFETY: `off + n <= AREA` in both mappings, which
                        // are disjoint and populated.
                        unsafe { copy(m, &rc, dst.add(off), src.add(off), n) };
                    }
                    black_box(dst);
                    secs[which] = t0.elapsed().as_secs_f64();
                }
                for k in 0..METHODS.len() {
                    gbs[k].push((n * chunks) as f64 / secs[k] / 1e9);
                    pct[k].push(100.0 * secs[0] / secs[k]);
                }
            }
            for k in 0..METHODS.len() {
                let (lo, hi) = (
                    gbs[k].iter().copied().fold(f64::INFINITY, f64::min),
                    gbs[k].iter().copied().fold(0.0, f64::max),
                );
                let (plo, phi) = (
                    pct[k].iter().copied().fold(f64::INFINITY, f64::min),
                    pct[k].iter().copied().fold(0.0, f64::max),
                );
                println!(
                    "{:>8} {:>5} {:<18} {:>7.2} [{:>5.2}-{:>5.2}] {:>7.0} % [{:>3.0}-{:>3.0}]",
                    if n >= MIB {
                        format!("{} MiB", n / MIB)
                    } else {
                        format!("{} KiB", n >> 10)
                    },
                    if cold { "cold" } else { "hot" },
                    METHODS[k].1,
                    median(&mut gbs[k]),
                    lo,
                    hi,
                    median(&mut pct[k]),
                    plo,
                    phi
                );
            }
        }
    }
    println!();
    println!(
        "{:>9} {:<28} {:>24}",
        "run", "method", "ns per run median [min-max]"
    );
    for len in [16, 64] {
        for safe in [true, false] {
            let mut v: Vec<f64> = (0..reps).map(|_| runs_ns(dst, src, len, safe)).collect();
            let (lo, hi) = (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            );
            println!(
                "{:>7} B {:<28} {:>8.1} [{:.1}-{:.1}]",
                len,
                if safe {
                    "check + copy_out per run"
                } else {
                    "process_vm_writev, iovec/run"
                },
                median(&mut v),
                lo,
                hi
            );
        }
    }
}
