//! What the foreign-writer check costs at the sync point
//! (`ForeignWriters::Check`), against re-copying the same pages.
//!
//! ```sh
//! cargo bench -p hmm-driver-cpu --bench foreign_check
//! HMM_FOREIGN_BENCH_MIB=512 HMM_FOREIGN_BENCH_REPS=9 cargo bench -p hmm-driver-cpu --bench foreign_check
//! ```
//!
//! A `MAP_SHARED` anonymous buffer (default 256 MiB) is made fully
//! device-resident on the cpu driver (one read per page) by a mirror in
//! each mode in turn, in the same run:
//!
//! - **sync point**: a launch of one invocation that touches nothing
//!   resident, so the launch is the sync points plus one submission —
//!   `Check` re-reads and re-hashes every resident page, `Trust` does not;
//!   the difference is the check;
//! - **re-copy**: an explicit `Clear` of the whole buffer and a launch that
//!   reads every page again (fault service + copy), i.e. what refreshing
//!   without a check costs;
//! - **hash only**: xxh3-64 and foldhash over the buffer's pages in place
//!   (the hash's share of the check; the rest is the fault-proof copy),
//!   and over one 256 KiB batch again and again (from the L2 cache: the
//!   hash's own speed).
//!
//! Medians over repetitions, in ms per GiB.

#![allow(missing_docs)]

use std::hash::BuildHasher;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{ForeignWriters, Mirror, MirrorConfig};
use hmm_core::notifier::EventKind;
use hmm_core::{VaRange, VirtAddr};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

const PAGE: usize = 4096;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}

fn main() {
    let mib = env("HMM_FOREIGN_BENCH_MIB", 256);
    let reps = env("HMM_FOREIGN_BENCH_REPS", 7).max(1);
    let len = mib << 20;
    let pages = len / PAGE;
    let per_gib = 1024.0 / mib as f64;
    // SAFETY: a fresh shared anonymous mapping at a kernel-chosen address.
    let buf = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(buf, libc::MAP_FAILED);
    let base = buf as u64;
    for p in 0..pages {
        // SAFETY: inside the live mapping.
        unsafe { (buf as *mut u8).add(p * PAGE).write_volatile(p as u8) };
    }
    let range = VaRange::from_start_len(VirtAddr(base), len as u64).expect("range");
    let touch = CpuKernel::new(|lane, i| {
        let b = lane.args()[0];
        lane.load_u32(b + u64::from(i) * PAGE as u64).map(|_| ())
    });
    let nothing = CpuKernel::new(|_, _| Ok(()));
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64() * 1e3
    };
    // One mirror at a time, each on its own host space: two mirrors of one
    // space take each other's copies (coherence), and two host spaces
    // cannot both register the buffer with userfaultfd.
    let mirror = |mode| {
        let host = Arc::new(HostSpace::new().expect("host"));
        let cfg = MirrorConfig {
            pool_slots: pages as u32 + 1024,
            table_pages: (pages / 512) as u32 + 64,
            foreign_writers: mode,
            ..MirrorConfig::default()
        };
        let m = Mirror::new(Arc::clone(&host), CpuDevice::new(), cfg).expect("mirror");
        let r = m.launch(&touch, pages as u32, [base]).expect("launch");
        assert_eq!(r.pages_in, pages as u64);
        (host, m)
    };
    let (mut sc, mut st, mut rc) = (vec![], vec![], vec![]);
    {
        let (_host, check) = mirror(ForeignWriters::Check);
        for _ in 0..reps {
            sc.push(time(&mut || {
                let r = check.launch(&nothing, 1, [base]).expect("launch");
                assert_eq!(r.foreign_changed_pages, 0);
            }));
        }
        let s = check.stats();
        assert!(s.foreign_checked_pages >= (reps * pages) as u64, "{s:?}");
    }
    {
        let (host, trust) = mirror(ForeignWriters::Trust);
        for _ in 0..reps {
            st.push(time(&mut || {
                trust.launch(&nothing, 1, [base]).expect("launch");
            }));
        }
        for _ in 0..reps {
            rc.push(time(&mut || {
                host.space().invalidate(range, EventKind::Clear);
                let r = trust.launch(&touch, pages as u32, [base]).expect("launch");
                assert_eq!(r.pages_in, pages as u64);
            }));
        }
        assert_eq!(trust.stats().foreign_checked_pages, 0);
    }
    let (mut hx, mut hf, mut hxh, mut hfh) = (vec![], vec![], vec![], vec![]);
    let fold = foldhash::quality::FixedState::default();
    // SAFETY: the buffer is live, readable and `len` bytes long; nothing
    // writes it any more.
    let bytes = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
    // 64 pages (256 KiB, the check's batch): hashed again and again, from
    // the L2 cache — the hash's own speed, not memory's.
    let hot = &bytes[..64 * PAGE];
    for _ in 0..reps {
        hx.push(time(&mut || {
            for p in bytes.chunks_exact(PAGE) {
                black_box(xxhash_rust::xxh3::xxh3_64(p));
            }
        }));
        hf.push(time(&mut || {
            for p in bytes.chunks_exact(PAGE) {
                black_box(fold.hash_one(p));
            }
        }));
        hxh.push(time(&mut || {
            for _ in 0..pages / 64 {
                for p in black_box(hot).chunks_exact(PAGE) {
                    black_box(xxhash_rust::xxh3::xxh3_64(p));
                }
            }
        }));
        hfh.push(time(&mut || {
            for _ in 0..pages / 64 {
                for p in black_box(hot).chunks_exact(PAGE) {
                    black_box(fold.hash_one(p));
                }
            }
        }));
    }
    let (sc, st, rc) = (median(sc), median(st), median(rc));
    let (hx, hf, hxh, hfh) = (median(hx), median(hf), median(hxh), median(hfh));
    println!("foreign_check: {mib} MiB MAP_SHARED resident on the cpu driver, medians of {reps}");
    println!(
        "  sync point, Check        {:>8.1} ms/GiB   ({sc:.2} ms)",
        sc * per_gib
    );
    println!(
        "  sync point, Trust        {:>8.1} ms/GiB   ({st:.2} ms)",
        st * per_gib
    );
    println!(
        "  check = Check - Trust    {:>8.1} ms/GiB",
        (sc - st) * per_gib
    );
    println!(
        "  re-copy (Clear + faults) {:>8.1} ms/GiB   ({rc:.2} ms)",
        rc * per_gib
    );
    println!(
        "  hash only, xxh3-64       {:>8.1} ms/GiB   (hot, 256 KiB in L2: {:.1} ms/GiB)",
        hx * per_gib,
        hxh * per_gib
    );
    println!(
        "  hash only, foldhash      {:>8.1} ms/GiB   (hot, 256 KiB in L2: {:.1} ms/GiB)",
        hf * per_gib,
        hfh * per_gib
    );
    // SAFETY: our own mapping, no longer mirrored.
    unsafe { libc::munmap(buf, len) };
}
