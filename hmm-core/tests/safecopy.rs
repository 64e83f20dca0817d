//! The recoverable copy (`hmm_core::cpu::safecopy`): recovery from real
//! faults raised under a copy by another thread, exact progress, and the
//! signal-handler chain left intact for every fault that is not ours.
//!
//! Each test re-executes this test binary with only itself selected and
//! `HMM_SAFECOPY_CHILD` naming it: the child runs the body (which installs
//! signal handlers, crashes on purpose, or unmaps memory that parallel
//! tests could otherwise map again), the parent checks how it ended.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use hmm_core::cpu::safecopy::{self, CopyError, CopyPath, Recoverable, SyscallReason};

const PAGE: usize = 4096;
const CHILD: &str = "HMM_SAFECOPY_CHILD";

/// In the child (`CHILD` = `name`): runs `body`, then exits 0. In the
/// parent: runs this test alone in a child process and returns its output.
fn in_child(name: &str, body: impl FnOnce()) -> Output {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        // No core files from the crashes some bodies cause on purpose.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit with a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
        body();
        std::process::exit(0);
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env_remove("HMM_SAFE_COPY")
        .output()
        .expect("spawn the child");
    eprintln!(
        "child {name}: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_has(out: &Output, what: &str) -> bool {
    String::from_utf8_lossy(&out.stdout).contains(what)
}

fn mmap(len: usize, flags: libc::c_int, fd: libc::c_int) -> *mut u8 {
    // SAFETY: a fresh mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p.cast()
}

fn anon(len: usize) -> *mut u8 {
    mmap(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
}

fn unmap(p: *mut u8, len: usize) {
    // SAFETY: callers unmap what they mapped, holding no reference into it.
    assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
}

/// Word `w` of round `round`'s test pattern.
fn word(w: usize, round: usize) -> u64 {
    (w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (round as u64).wrapping_mul(0xd6e8_feb8_6659_fd93)
}

/// Byte `i` of round `round`'s test pattern.
fn pattern(i: usize, round: usize) -> u8 {
    word(i / 8, round).to_le_bytes()[i % 8]
}

/// Writes round `round`'s pattern over `len` bytes (a multiple of 8) at the
/// page-aligned `p`.
fn fill(p: *mut u8, len: usize, round: usize) {
    for w in 0..len / 8 {
        // SAFETY: `p` is a live, aligned mapping of at least `len` bytes.
        unsafe { p.cast::<u64>().add(w).write(word(w, round).to_le()) };
    }
}

/// Deterministic xorshift for offsets and delays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Waits (boundedly) until the copy has written the word at `at` (the
/// last word before page `k` of the destination), so that the destruction
/// lands while the copy is running around page `k`.
fn await_progress(at: usize) {
    for _ in 0..50_000_000 {
        // SAFETY: the destination is mapped up to page `k` during the
        // round; a volatile read of a word another thread may be writing
        // (a torn value only ends the wait).
        if unsafe { std::ptr::read_volatile(at as *const u64) } != 0 {
            return;
        }
        std::hint::spin_loop();
    }
}

/// Bytes of the `n` at the page-aligned `p` that differ from round
/// `round`'s pattern.
fn wrong(p: *const u8, n: usize, round: usize) -> usize {
    let mut bad = 0;
    for w in 0..n / 8 {
        // SAFETY: callers pass a live, aligned mapping of at least `n`
        // bytes.
        let got = unsafe { p.cast::<u64>().add(w).read() };
        let x = got ^ word(w, round).to_le();
        bad += x.to_le_bytes().iter().filter(|b| **b != 0).count();
    }
    bad + wrong_from(
        // SAFETY: the tail of the same range.
        unsafe { p.add(n / 8 * 8) },
        n / 8 * 8,
        n % 8,
        round,
    )
}

/// Bytes of the `n` at `p` that differ from round `round`'s pattern taken
/// from offset `from` on.
fn wrong_from(p: *const u8, from: usize, n: usize, round: usize) -> usize {
    // SAFETY: callers pass a live mapping of at least `n` bytes.
    let d = unsafe { std::slice::from_raw_parts(p, n) };
    d.iter()
        .enumerate()
        .filter(|(i, b)| **b != pattern(from + *i, round))
        .count()
}

/// How a race round ended.
#[derive(Default, Debug)]
struct Tally {
    complete: usize,
    faulted: usize,
    /// Faults after the copy had passed page `k`: the destruction came
    /// mid-copy.
    past_k: usize,
    wrong_bytes: usize,
}

/// Runs `rounds` copies of `pages` pages while another thread destroys
/// everything from page `k` (random, in the first quarter) on, mid-copy: `destroy(k)` is
/// that thread's action (the tests' versions first wait until the copy
/// has written the destination up to page `k`, see [`await_progress`],
/// and a short random delay follows the start signal), `copy` the copy,
/// `check(n, k, round)` counts wrong bytes among the first `n` copied and
/// may free the round's memory. Each copy must either complete or fail
/// with exact progress: at least `k` pages (the pages before `k` stay; the
/// copy may have passed `k` when the destruction came, and then stops
/// where it found the memory gone — mid-page when the page vanished under
/// the copy), every byte reported copied correct.
fn race(
    rounds: usize,
    pages: usize,
    mut setup: impl FnMut(usize),
    destroy: &(dyn Fn(usize) + Sync),
    mut copy: impl FnMut() -> Result<(), CopyError>,
    mut check: impl FnMut(usize, usize, usize) -> usize,
) -> Tally {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut t = Tally::default();
    for round in 0..rounds {
        setup(round);
        // Early in the copy, so that most of it is still to come when the
        // destruction lands.
        let k = 1 + (rng.next() as usize) % (pages / 4);
        let delay = (rng.next() % 64) as usize;
        let ready = AtomicBool::new(false);
        let go = AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                ready.store(true, Ordering::Release);
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                for _ in 0..delay {
                    std::hint::spin_loop();
                }
                destroy(k);
            });
            while !ready.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            go.store(true, Ordering::Release);
            copy()
        });
        match r {
            Ok(()) => {
                t.complete += 1;
                t.wrong_bytes += check(pages * PAGE, k, round);
            }
            Err(CopyError::Fault { copied }) => {
                t.faulted += 1;
                assert!(
                    copied >= k * PAGE && copied < pages * PAGE,
                    "round {round}: {copied} bytes copied, {k} pages kept"
                );
                t.past_k += usize::from(copied > k * PAGE);
                t.wrong_bytes += check(copied, k, round);
            }
            Err(e) => panic!("round {round}: {e:?}"),
        }
    }
    t
}

fn tally_line(t: &Tally) -> String {
    format!(
        "complete={} faulted={} (mid-copy past page k: {}) wrong_bytes={}",
        t.complete, t.faulted, t.past_k, t.wrong_bytes
    )
}

fn assert_race_child(out: &Output) {
    assert!(out.status.success(), "{:?}", out.status);
    assert!(stdout_has(out, "wrong_bytes=0"), "no wrong bytes");
}

const ROUNDS: usize = 300;
const PAGES: usize = 512;

#[test]
fn read_recovers_when_the_source_is_unmapped_mid_copy() {
    let out = in_child("read_recovers_when_the_source_is_unmapped_mid_copy", || {
        let len = PAGES * PAGE;
        let dst = anon(len);
        let dst_addr = dst as usize;
        let src = AtomicUsize::new(0);
        let t = race(
            ROUNDS,
            PAGES,
            |round| {
                let p = anon(len);
                fill(p, len, round);
                src.store(p as usize, Ordering::Relaxed);
                // SAFETY: our own mapping.
                unsafe { std::ptr::write_bytes(dst, 0, len) };
            },
            &|k| {
                await_progress(dst_addr + k * PAGE - 8);
                let p = src.load(Ordering::Relaxed) as *mut u8;
                // SAFETY: the tail of this round's source mapping.
                unmap(unsafe { p.add(k * PAGE) }, (PAGES - k) * PAGE);
            },
            || {
                let rc = Recoverable::check().expect("recoverable path");
                // SAFETY: `dst` is ours and disjoint from the source, which
                // is ordinary anonymous memory (or unmapped).
                unsafe { rc.copy_in(dst, src.load(Ordering::Relaxed) as *const u8, len) }
            },
            |n, k, round| {
                // The part of the source still mapped goes.
                unmap(src.load(Ordering::Relaxed) as *mut u8, k * PAGE);
                wrong(dst, n, round)
            },
        );
        let (rec, hw) = safecopy::recovered_faults();
        println!("{} recovered={rec} hw={hw}", tally_line(&t));
        assert_eq!(t.complete + t.faulted, ROUNDS);
        // A fault is usually met twice: once by the copy, once by the probe
        // that confirms where the bad memory starts.
        assert!(
            rec as usize >= t.faulted,
            "every fault went through the handler"
        );
        assert_eq!(hw, 0);
    });
    assert_race_child(&out);
}

#[test]
fn read_recovers_from_sigbus_when_the_file_is_truncated_mid_copy() {
    let out = in_child(
        "read_recovers_from_sigbus_when_the_file_is_truncated_mid_copy",
        || {
            let len = PAGES * PAGE;
            // SAFETY: a new memfd owned by this test.
            let fd = unsafe { libc::memfd_create(c"safecopy".as_ptr(), 0) };
            assert!(fd >= 0);
            // SAFETY: sizing our own memfd.
            assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
            let src = mmap(len, libc::MAP_SHARED, fd);
            let dst = anon(len);
            let dst_addr = dst as usize;
            let t = race(
                ROUNDS,
                PAGES,
                |round| {
                    // SAFETY: restoring our own memfd's size (the new pages
                    // read as zeros until filled).
                    assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
                    fill(src, len, round);
                    // SAFETY: our own mapping.
                    unsafe { std::ptr::write_bytes(dst, 0, len) };
                },
                &|k| {
                    await_progress(dst_addr + k * PAGE - 8);
                    // SAFETY: shrinking our own memfd: pages from k on
                    // now raise SIGBUS.
                    assert_eq!(unsafe { libc::ftruncate(fd, (k * PAGE) as libc::off_t) }, 0);
                },
                || {
                    let rc = Recoverable::check().expect("recoverable path");
                    // SAFETY: `dst` is ours and disjoint from the shared
                    // memfd mapping (ordinary shmem pages).
                    unsafe { rc.copy_in(dst, src, len) }
                },
                |n, _, round| wrong(dst, n, round),
            );
            let (rec, _) = safecopy::recovered_faults();
            println!("{} recovered={rec}", tally_line(&t));
            assert!(rec as usize >= t.faulted);
        },
    );
    assert_race_child(&out);
}

#[test]
fn write_recovers_when_the_destination_is_unmapped_mid_copy() {
    let out = in_child(
        "write_recovers_when_the_destination_is_unmapped_mid_copy",
        || {
            let len = PAGES * PAGE;
            let src = anon(len);
            let dst = AtomicUsize::new(0);
            let t = race(
                ROUNDS,
                PAGES,
                |round| {
                    fill(src, len, round);
                    let p = anon(len);
                    dst.store(p as usize, Ordering::Relaxed);
                },
                &|k| {
                    let p = dst.load(Ordering::Relaxed) as *mut u8;
                    await_progress(p as usize + k * PAGE - 8);
                    // SAFETY: the tail of this round's destination mapping.
                    unmap(unsafe { p.add(k * PAGE) }, (PAGES - k) * PAGE);
                },
                || {
                    let rc = Recoverable::check().expect("recoverable path");
                    // SAFETY: `src` is ours and disjoint from the
                    // destination, ordinary anonymous memory (or unmapped)
                    // that nothing references.
                    unsafe { rc.copy_out(dst.load(Ordering::Relaxed) as *mut u8, src, len) }
                },
                |n, k, round| {
                    // Only what is still mapped can be checked: the pages
                    // before `k` (all a fault leaves copied, and part of
                    // a complete copy).
                    let p = dst.load(Ordering::Relaxed);
                    let bad = wrong(p as *const u8, n.min(k * PAGE), round);
                    unmap(p as *mut u8, k * PAGE);
                    bad
                },
            );
            let (rec, hw) = safecopy::recovered_faults();
            println!("{} recovered={rec} hw={hw}", tally_line(&t));
            assert!(rec as usize >= t.faulted);
        },
    );
    assert_race_child(&out);
}

/// A copy over a half-unmapped range stops exactly at the hole, in both
/// directions, and a zero-length copy of nothing succeeds.
#[test]
fn half_unmapped_copies_report_exact_progress() {
    let out = in_child("half_unmapped_copies_report_exact_progress", || {
        let len = 8 * PAGE;
        let a = anon(len);
        let b = anon(len);
        fill(a, len, 3);
        // SAFETY: pages 5.. of our own mapping `a`.
        unmap(unsafe { a.add(5 * PAGE) }, 3 * PAGE);
        let rc = Recoverable::check().expect("recoverable path");
        // SAFETY: `b` is ours; `a` is ordinary memory, partly unmapped.
        let r = unsafe { rc.copy_in(b, a.add(100), len - 100) };
        assert_eq!(
            r,
            Err(CopyError::Fault {
                copied: 5 * PAGE - 100
            })
        );
        // SAFETY: `b` is a live mapping.
        let got = unsafe { std::slice::from_raw_parts(b, 5 * PAGE - 100) };
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, x)| *x == pattern(i + 100, 3)));
        // SAFETY: `b` is ours; `a`'s hole is the destination side now.
        let w = unsafe { rc.copy_out(a.add(7), b, len - 7) };
        assert_eq!(
            w,
            Err(CopyError::Fault {
                copied: 5 * PAGE - 7
            })
        );
        // SAFETY: nothing is copied.
        assert_eq!(unsafe { rc.copy_in(b, std::ptr::null(), 0) }, Ok(()));
        // A protection fault is recovered like an unmapped page.
        // SAFETY: our own mapping's first page.
        let r = unsafe { libc::mprotect(a.cast(), PAGE, libc::PROT_NONE) };
        assert_eq!(r, 0);
        // SAFETY: as above.
        let p = unsafe { rc.copy_in(b, a, 2 * PAGE) };
        assert_eq!(p, Err(CopyError::Fault { copied: 0 }));
        let (rec, hw) = safecopy::recovered_faults();
        assert!(rec >= 3 && hw == 0, "{rec} {hw}");
        println!("exact");
    });
    assert!(out.status.success() && stdout_has(&out, "exact"));
}

/// Reads copy every aligned word whole: while another thread keeps
/// discarding a page (`madvise(MADV_DONTNEED)`: it then reads as zeros)
/// and storing to its words values that differ from zero in every byte,
/// each word of every copy is zero or one of the values stored, never
/// part of each — what a device reading the page itself would see. (The
/// guarantee the word-atomic routine was chosen for; `hmm-stress` found
/// the mirror's copies of pages being discarded holding old bytes over
/// zeros. This test did not make `rep movsb` tear on this project's VM
/// either, so it guards the property rather than reproducing that bug.)
#[test]
fn reads_copy_every_aligned_word_whole_while_the_page_changes() {
    let out = in_child(
        "reads_copy_every_aligned_word_whole_while_the_page_changes",
        || {
            use std::sync::atomic::AtomicU32;
            const A: u32 = 0x1122_3344;
            const B: u32 = 0x5566_7788;
            let src = anon(PAGE);
            let dst = anon(PAGE);
            let words = PAGE / 4;
            let rc = Recoverable::check().expect("recoverable path");
            let stop = AtomicBool::new(false);
            let src_at = src as usize;
            let (copies, torn) = std::thread::scope(|s| {
                s.spawn(|| {
                    let w = src_at as *const AtomicU32;
                    let mut v = A;
                    while !stop.load(Ordering::Relaxed) {
                        // SAFETY: our own page, which stays mapped; no
                        // reference into it exists (the copy reads it
                        // through raw pointers, this thread atomically).
                        let r = unsafe {
                            libc::madvise(src_at as *mut libc::c_void, PAGE, libc::MADV_DONTNEED)
                        };
                        assert_eq!(r, 0);
                        v = if v == A { B } else { A };
                        for i in 0..words {
                            // SAFETY: word `i` of our page `src`, mapped
                            // for the whole scope, aligned.
                            unsafe { &*w.add(i) }.store(v, Ordering::Relaxed);
                        }
                    }
                });
                let mut torn = 0usize;
                let mut copies = 0usize;
                let t0 = std::time::Instant::now();
                while t0.elapsed() < std::time::Duration::from_millis(1500) {
                    // SAFETY: `dst` is ours and untouched by the writer;
                    // `src` is ordinary memory that stays mapped.
                    unsafe { rc.copy_in(dst, src, PAGE) }.expect("copy");
                    copies += 1;
                    for i in 0..words {
                        // SAFETY: word `i` of our page `dst`.
                        let v = unsafe { std::ptr::read(dst.cast::<u32>().add(i)) };
                        torn += usize::from(v != 0 && v != A && v != B);
                    }
                }
                stop.store(true, Ordering::Relaxed);
                (copies, torn)
            });
            println!("{copies} copies, {torn} torn words");
            assert!(copies > 100, "too few copies to mean anything: {copies}");
            assert_eq!(torn, 0, "{torn} words torn in {copies} copies");
            println!("whole words");
        },
    );
    assert!(out.status.success() && stdout_has(&out, "whole words"));
}

/// Long reads take the streaming (non-temporal) routine; a hole stops it
/// exactly there too, whether the hole falls on one of its 64-byte blocks'
/// boundaries or inside a block (the block's earlier bytes are then copied
/// by the byte-exact retry), and what it copied is right.
#[test]
fn streaming_copies_report_exact_progress() {
    let out = in_child("streaming_copies_report_exact_progress", || {
        const N: usize = 128; // 512 KiB: above the streaming threshold
        let len = N * PAGE;
        let rc = Recoverable::check().expect("recoverable path");
        for (off, round) in [(64usize, 4usize), (8, 5), (0, 6)] {
            let a = anon(len);
            let b = anon(len);
            fill(a, len, round);
            // Populated, so the copies below stream (fresh memory would
            // keep `rep movsb`).
            // SAFETY: `b` is a live mapping of `len` bytes.
            unsafe { std::ptr::write_bytes(b, 0, len) };
            let streamed = safecopy::streamed_bytes();
            // Whole: copied exactly.
            // SAFETY: `b` is ours and `a` is ordinary memory, both live.
            let whole = unsafe { rc.copy_in(b, a.add(off), len - off - (64 - off % 64) % 64) };
            assert_eq!(whole, Ok(()), "offset {off}");
            let n = len - off - (64 - off % 64) % 64;
            assert_eq!(
                safecopy::streamed_bytes() - streamed,
                n as u64,
                "offset {off}: the streaming routine copied it"
            );
            assert_eq!(wrong_from(b, off, n, round), 0, "offset {off}");
            // SAFETY: pages 70.. of our own mapping `a`.
            unmap(unsafe { a.add(70 * PAGE) }, (N - 70) * PAGE);
            // SAFETY: `b` is a live mapping of `len` bytes.
            unsafe { std::ptr::write_bytes(b, 0, len) };
            // SAFETY: as above; `a` is partly unmapped now.
            let r = unsafe { rc.copy_in(b, a.add(off), n) };
            assert_eq!(
                r,
                Err(CopyError::Fault {
                    copied: 70 * PAGE - off
                }),
                "offset {off}"
            );
            assert_eq!(
                wrong_from(b, off, 70 * PAGE - off, round),
                0,
                "offset {off}"
            );
            unmap(a, 70 * PAGE);
            unmap(b, len);
        }
        println!("exact");
    });
    assert!(out.status.success() && stdout_has(&out, "exact"), "{out:?}");
}

/// Which store kind a long copy takes: non-temporal into populated memory,
/// `rep movsb` into memory the copy itself faults in (the kernel zeroes
/// each new page first, so its lines are in cache) and into the huge-page
/// block where such a copy ended, populated by then. Contents are right
/// every time.
#[test]
fn long_copies_stream_only_into_memory_already_populated() {
    let out = in_child(
        "long_copies_stream_only_into_memory_already_populated",
        || {
            const HUGE: usize = 2 << 20;
            let n = safecopy::STREAM_MIN * 2;
            let rc = Recoverable::check().expect("recoverable path");
            let a = anon(n);
            fill(a, n, 9);
            // Two 2 MiB-aligned blocks of our own: `hot` populated now,
            // `fresh` never touched.
            let map = anon(3 * HUGE);
            let hot = map.wrapping_add(map.align_offset(HUGE));
            let fresh = hot.wrapping_add(HUGE);
            // SAFETY: the first block of `[hot, hot + 2 MiB)`, inside `map`.
            unsafe { std::ptr::write_bytes(hot, 0, n) };
            let copy = |dst: *mut u8| {
                let before = safecopy::streamed_bytes();
                // SAFETY: `dst` has `n` bytes inside `map`; `a` is live.
                assert_eq!(unsafe { rc.copy_in(dst, a, n) }, Ok(()));
                assert_eq!(wrong_from(dst, 0, n, 9), 0);
                safecopy::streamed_bytes() - before
            };
            assert_eq!(copy(hot), n as u64, "populated: streamed");
            assert_eq!(copy(fresh), 0, "faulted in by the copy: rep movsb");
            assert_eq!(
                copy(fresh),
                0,
                "the block the last fresh copy ended in: rep movsb"
            );
            assert_eq!(copy(hot), n as u64, "another populated block: streamed");
            unmap(map, 3 * HUGE);
            unmap(a, n);
            println!("kinds");
        },
    );
    assert!(out.status.success() && stdout_has(&out, "kinds"), "{out:?}");
}

/// A fault on *our* side of a copy (here: an unmapped destination of
/// `copy_in`) is a bug, not something to recover: the process dies of
/// SIGSEGV.
#[test]
fn a_fault_on_our_side_of_the_copy_kills() {
    let out = in_child("a_fault_on_our_side_of_the_copy_kills", || {
        let a = anon(2 * PAGE);
        let b = anon(2 * PAGE);
        unmap(b, 2 * PAGE);
        let rc = Recoverable::check().expect("recoverable path");
        println!("copying");
        // SAFETY: deliberately broken (`b` is unmapped): the child must
        // die here.
        let _ = unsafe { rc.copy_in(b, a, 2 * PAGE) };
    });
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
    assert!(stdout_has(&out, "copying"));
}

/// A NULL write anywhere else still kills the process with SIGSEGV once
/// our handler is installed, and so does a SIGSEGV sent with `raise`.
#[test]
fn a_foreign_null_write_still_kills() {
    let out = in_child("a_foreign_null_write_still_kills", || {
        assert_eq!(safecopy::active_path(), CopyPath::Recoverable);
        println!("installed");
        // SAFETY: deliberately invalid: the child must die here.
        unsafe { std::ptr::null_mut::<u64>().write_volatile(1) };
    });
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
    assert!(stdout_has(&out, "installed"));
}

#[test]
fn a_sent_sigsegv_still_kills() {
    let out = in_child("a_sent_sigsegv_still_kills", || {
        // Without std's handler in between (it survives one sent SIGSEGV
        // by design: it restores the default and returns, expecting a
        // fault to re-execute), ours is the one that must re-raise.
        install(libc::SIGSEGV, libc::SIG_DFL, false);
        assert_eq!(safecopy::active_path(), CopyPath::Recoverable);
        println!("installed");
        // SAFETY: raise has no memory arguments; the child must die of it.
        unsafe { libc::raise(libc::SIGSEGV) };
        // Default action: never reached.
        std::thread::sleep(std::time::Duration::from_secs(5));
    });
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
    assert!(stdout_has(&out, "installed"));
}

extern "C" fn earlier_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo for this SIGSEGV.
    let addr = unsafe { (*info).si_addr() } as usize;
    let msg: &[u8] = if addr == 8 {
        b"earlier handler: SIGSEGV at 0x8\n"
    } else {
        b"earlier handler: SIGSEGV elsewhere\n"
    };
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(42);
    }
}

extern "C" fn earlier_bus(_sig: libc::c_int) {
    let msg = b"earlier handler: SIGBUS\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(43);
    }
}

fn install(sig: libc::c_int, handler: libc::sighandler_t, siginfo: bool) {
    // SAFETY: plain-data struct; zero is valid.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = if siginfo { libc::SA_SIGINFO } else { 0 };
    // SAFETY: a valid action for a valid signal.
    let r = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
    assert_eq!(r, 0);
}

/// A handler installed before ours still gets the faults that are not
/// ours, with its own calling convention (`SA_SIGINFO` for SIGSEGV, a
/// plain handler for SIGBUS), after ours recovered one of its own.
fn earlier_handler_child(name: &str, bus: bool) -> Output {
    in_child(name, || {
        if bus {
            install(
                libc::SIGBUS,
                earlier_bus as *const () as libc::sighandler_t,
                false,
            );
        } else {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                earlier_segv;
            install(libc::SIGSEGV, f as *const () as libc::sighandler_t, true);
        }
        let a = anon(2 * PAGE);
        let b = anon(2 * PAGE);
        // SAFETY: page 1 of our own mapping.
        unmap(unsafe { a.add(PAGE) }, PAGE);
        let rc = Recoverable::check().expect("recoverable path");
        // SAFETY: `b` is ours, `a` ordinary memory with a hole.
        let r = unsafe { rc.copy_in(b, a, 2 * PAGE) };
        assert_eq!(r, Err(CopyError::Fault { copied: PAGE }));
        println!("recovered ours");
        if bus {
            // SAFETY: a fresh memfd of size 0, so its mapping's first page
            // lies beyond the end of the file: SIGBUS.
            unsafe {
                let fd = libc::memfd_create(c"bus".as_ptr(), 0);
                assert!(fd >= 0);
                let p = mmap(PAGE, libc::MAP_SHARED, fd);
                p.write_volatile(1);
            }
        } else {
            // SAFETY: deliberately invalid: handled by `earlier_segv`.
            unsafe { std::ptr::dangling_mut::<u64>().write_volatile(1) };
        }
    })
}

#[test]
fn an_earlier_siginfo_handler_still_gets_a_foreign_sigsegv() {
    let out = earlier_handler_child(
        "an_earlier_siginfo_handler_still_gets_a_foreign_sigsegv",
        false,
    );
    assert_eq!(out.status.code(), Some(42), "{:?}", out.status);
    assert!(stdout_has(&out, "recovered ours"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("earlier handler: SIGSEGV at 0x8"));
}

#[test]
fn an_earlier_plain_handler_still_gets_a_foreign_sigbus() {
    let out = earlier_handler_child("an_earlier_plain_handler_still_gets_a_foreign_sigbus", true);
    assert_eq!(out.status.code(), Some(43), "{:?}", out.status);
    assert!(stdout_has(&out, "recovered ours"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("earlier handler: SIGBUS"));
}

/// Rust's stack-overflow handler (installed by `std` before ours) still
/// reports a thread that overflows its stack: ours forwards the guard-page
/// fault, std prints its message and aborts.
#[test]
fn a_stack_overflow_still_aborts_with_rusts_message() {
    let out = in_child("a_stack_overflow_still_aborts_with_rusts_message", || {
        assert_eq!(safecopy::active_path(), CopyPath::Recoverable);
        println!("installed");
        #[allow(unconditional_recursion)]
        fn recurse(n: u64) -> u64 {
            let mut pad = [n; 64];
            std::hint::black_box(&mut pad);
            recurse(pad[3].wrapping_add(1)).wrapping_add(pad[5])
        }
        let t = std::thread::Builder::new()
            .name("overflower".into())
            .stack_size(256 * 1024)
            .spawn(|| recurse(0))
            .unwrap();
        let _ = t.join();
    });
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
    assert!(stdout_has(&out, "installed"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("thread 'overflower'") && err.contains("has overflowed its stack"),
        "{err}"
    );
}

/// Which path is reported, and why: recoverable by default; the syscall
/// path when the program asks, when this thread blocks SIGSEGV or SIGBUS,
/// and when another handler replaced ours (and recoverable again once ours
/// is back).
#[test]
fn the_path_falls_back_and_says_why() {
    let out = in_child("the_path_falls_back_and_says_why", || {
        assert_eq!(safecopy::active_path(), CopyPath::Recoverable);
        safecopy::force_syscall(true);
        assert_eq!(
            safecopy::active_path(),
            CopyPath::Syscall(SyscallReason::Requested)
        );
        safecopy::force_syscall(false);
        let blocked = std::thread::spawn(|| {
            // SAFETY: plain-data set, filled by sigemptyset/sigaddset;
            // blocks SIGBUS in this short-lived thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGBUS);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            safecopy::active_path()
        })
        .join()
        .unwrap();
        assert_eq!(blocked, CopyPath::Syscall(SyscallReason::SignalsBlocked));
        assert_eq!(safecopy::active_path(), CopyPath::Recoverable);
        // SAFETY: plain-data struct; zero is valid.
        let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: replacing the SIGSEGV action, keeping ours to restore.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = earlier_bus as *const () as libc::sighandler_t;
            assert_eq!(libc::sigaction(libc::SIGSEGV, &sa, &mut ours), 0);
        }
        assert_eq!(
            safecopy::active_path(),
            CopyPath::Syscall(SyscallReason::Displaced)
        );
        assert!(Recoverable::check().is_err());
        // SAFETY: putting ours back.
        let r = unsafe { libc::sigaction(libc::SIGSEGV, &ours, std::ptr::null_mut()) };
        assert_eq!(r, 0);
        assert_eq!(safecopy::active_path(), CopyPath::Recoverable);
        println!("paths ok");
    });
    assert!(out.status.success() && stdout_has(&out, "paths ok"));
}

/// `HMM_SAFE_COPY=syscall` selects the syscall path (and the handler is
/// never installed).
#[test]
fn the_environment_selects_the_syscall_path() {
    const NAME: &str = "the_environment_selects_the_syscall_path";
    if std::env::var(CHILD).as_deref() == Ok(NAME) {
        let current = || {
            // SAFETY: plain-data struct; zero is valid.
            let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a query.
            unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut cur) };
            cur.sa_sigaction
        };
        let before = current();
        assert_eq!(
            safecopy::active_path(),
            CopyPath::Syscall(SyscallReason::Environment)
        );
        assert_eq!(current(), before, "nothing installed");
        println!("env ok");
        std::process::exit(0);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, NAME)
        .env("HMM_SAFE_COPY", "syscall")
        .output()
        .unwrap();
    assert!(
        out.status.success() && stdout_has(&out, "env ok"),
        "{out:?}"
    );
}

/// A hardware memory error (SIGBUS `BUS_MCEERR_AR`) in the source of a
/// copy is its own error. The error is made with `MADV_HWPOISON` (root
/// only, `CONFIG_MEMORY_FAILURE`), like the kernel's own hwpoison tests:
/// it costs one 4 KiB page frame, poisoned until reboot. The poisoning is
/// done by a forked helper process that shares the page (a memfd), so
/// that the kernel's immediate SIGBUS goes to the helper; this process
/// meets the poison when its copy reaches the page.
#[test]
fn a_hardware_memory_error_is_its_own_error() {
    let out = in_child("a_hardware_memory_error_is_its_own_error", || {
        let len = 16 * PAGE;
        // SAFETY: a new memfd owned by this test.
        let fd = unsafe { libc::memfd_create(c"hwpoison".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
        let src = mmap(len, libc::MAP_SHARED, fd);
        let dst = anon(len);
        fill(src, len, 5);
        // SAFETY: page 9 of our own mapping.
        let bad = unsafe { src.add(9 * PAGE) };
        // SAFETY: the child only calls madvise and _exit
        // (async-signal-safe) and never returns into Rust code.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: poisoning one page of the shared memfd, then leaving.
            unsafe {
                let r = libc::madvise(bad.cast(), PAGE, libc::MADV_HWPOISON);
                let e = *libc::__errno_location();
                libc::_exit(if r == 0 { 0 } else { 100 + e.min(100) });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) >= 100 {
            println!(
                "MADV_HWPOISON unavailable (errno {}): hardware errors not checked",
                libc::WEXITSTATUS(status) - 100
            );
            return;
        }
        let rc = Recoverable::check().expect("recoverable path");
        // SAFETY: `dst` is ours, the memfd pages ordinary shmem.
        let r = unsafe { rc.copy_in(dst, src.add(100), len - 100) };
        assert_eq!(
            r,
            Err(CopyError::HardwareMemoryError {
                copied: 9 * PAGE - 100
            })
        );
        assert_eq!(wrong_from(dst, 100, 9 * PAGE - 100, 5), 0);
        let (rec, hw) = safecopy::recovered_faults();
        assert!(rec >= 1 && hw == 1, "{rec} {hw}");
        println!("hardware error after the 9 good pages");
    });
    assert!(out.status.success(), "{:?}", out.status);
    assert!(
        stdout_has(&out, "hardware error after") || stdout_has(&out, "MADV_HWPOISON unavailable")
    );
}

/// Our handler, as read back from `sigaction` (for the forwarding test).
static OURS: AtomicUsize = AtomicUsize::new(0);

/// Re-labels a SIGSEGV as the SIGBUS a machine check in the same page
/// would raise (`BUS_MCEERR_AR`, `si_addr_lsb` 12) and hands it to ours.
extern "C" fn as_machine_check(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel's siginfo for this fault, ours to edit: signo and
    // code fields, si_addr at offset 16 (kept), si_addr_lsb at 24.
    unsafe {
        (*info).si_signo = libc::SIGBUS;
        (*info).si_code = libc::BUS_MCEERR_AR;
        info.cast::<u8>().add(24).cast::<i16>().write_unaligned(12);
    }
    // SAFETY: OURS holds an SA_SIGINFO handler's address (read back from
    // sigaction before this one replaced it).
    let ours: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
        unsafe { std::mem::transmute(OURS.load(Ordering::Relaxed)) };
    ours(libc::SIGBUS, info, ctx);
}

/// The hardware-error path end to end on any kernel: a handler put in
/// front of ours presents a copy's real page fault as a machine check in
/// that page; the copy must return `HardwareMemoryError` with the exact
/// progress, without probing the poisoned page again.
#[test]
fn a_machine_check_under_a_copy_is_its_own_error() {
    let out = in_child("a_machine_check_under_a_copy_is_its_own_error", || {
        let len = 8 * PAGE;
        let a = anon(len);
        let b = anon(len);
        fill(a, len, 2);
        // SAFETY: pages 5.. of our own mapping.
        unmap(unsafe { a.add(5 * PAGE) }, 3 * PAGE);
        // The permission is taken while ours is installed; the front
        // handler goes in afterwards (the race the module docs describe,
        // made on purpose).
        let rc = Recoverable::check().expect("recoverable path");
        // SAFETY: plain-data struct, zero is valid; query, then install.
        unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            assert_eq!(
                libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut cur),
                0
            );
            OURS.store(cur.sa_sigaction, Ordering::Relaxed);
        }
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            as_machine_check;
        install(libc::SIGSEGV, f as *const () as libc::sighandler_t, true);
        // SAFETY: `b` is ours; `a` ordinary memory with a hole.
        let r = unsafe { rc.copy_in(b, a.add(100), len - 100) };
        assert_eq!(
            r,
            Err(CopyError::HardwareMemoryError {
                copied: 5 * PAGE - 100
            })
        );
        assert_eq!(wrong_from(b, 100, 5 * PAGE - 100, 2), 0);
        assert_eq!(safecopy::recovered_faults(), (1, 1), "no second touch");
        println!("machine check typed");
    });
    assert!(out.status.success() && stdout_has(&out, "machine check typed"));
}
