//! Writers write tracking cannot see (issue 19, finding 5): memory that
//! changes without a store through this process's page tables — a shared
//! mapping written by a forked child, a shared file mapping or a memfd
//! written with `pwrite()`, a private file mapping whose file changes
//! under pages this process never wrote. With the default
//! [`ForeignWriters::Check`] the next launch reads every word of the new
//! data; with [`ForeignWriters::Trust`] the mirror checks nothing (the
//! stale read is the documented price), and says so in its counters.
//!
//! A zero-copy device reads the CPU's own pages: it sees the new data in
//! both modes and hashes nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;

use hmm_core::mirror::{ForeignWriters, LaunchReport, Mirror, MirrorConfig};
use hmm_core::notifier::EventKind;

use crate::support::{device_copy, launch, setup, small_cfg, zero_copy, TestMap, WPP};
use crate::{TestKernel, TestKernels};

/// Pages per scenario: more than one, not a power of two.
const PAGES: usize = 6;
const WORDS: usize = PAGES * WPP;

fn old(i: usize) -> u32 {
    0x1000_0000 | i as u32
}

fn new(i: usize) -> u32 {
    0xA000_0000 ^ (i as u32).wrapping_mul(2_654_435_761)
}

fn bytes(f: fn(usize) -> u32) -> Vec<u8> {
    (0..WORDS).flat_map(|i| f(i).to_ne_bytes()).collect()
}

/// An unlinked temp file holding `old` words.
fn temp_file(tag: &str) -> File {
    let path = std::env::temp_dir().join(format!(
        "hmm-foreign-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    let _ = std::fs::remove_file(&path);
    f.write_all_at(&bytes(old), 0).expect("write");
    f
}

/// A memfd holding `old` words.
fn memfd() -> File {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the returned descriptor is checked
    // and then owned by the `File`.
    let fd = unsafe { libc::memfd_create(c"hmm-foreign".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.write_all_at(&bytes(old), 0).expect("write");
    f
}

/// A forked child writes `new` words into `map` (shared with us) and
/// exits; returns once it has.
fn child_writes_new(map: &TestMap) {
    let _gate = crate::support::forking();
    // SAFETY: the child only stores to memory and calls `_exit`, both
    // async-signal-safe, so forking a multi-threaded process is fine.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let p = map.addr() as *mut u32;
        for i in 0..WORDS {
            // SAFETY: the child's view of the live, writable shared
            // mapping of `WORDS` words.
            unsafe { p.add(i).write_volatile(new(i)) };
        }
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}

fn cfg(foreign_writers: ForeignWriters) -> MirrorConfig {
    MirrorConfig {
        foreign_writers,
        ..small_cfg()
    }
}

/// Launches a device copy of `src` and checks every word against `want`.
fn read_all<B: TestKernels>(
    m: &Mirror<B>,
    src: &TestMap,
    out: &TestMap,
    want: fn(usize) -> u32,
    what: &str,
) -> LaunchReport {
    let r = device_copy(m, src.addr(), out, WORDS).expect("launch");
    let bad: Vec<usize> = (0..WORDS)
        .filter(|&i| out.read_word(i) != want(i))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: the device read {} of {WORDS} words stale (first: word {} = {:#x}, want {:#x})",
        bad.len(),
        bad[0],
        out.read_word(bad[0]),
        want(bad[0])
    );
    r
}

/// The shared steps: the device reads `src` (holding `old`), `change`
/// makes it `new` behind write tracking's back, the CPU sees it, and the
/// next launch must read every new word. In copy mode the check must have
/// hashed and found the pages; a launch with no change after it finds
/// nothing.
fn scenario<B: TestKernels>(b: B, src: &TestMap, change: impl FnOnce()) {
    let (_h, m) = setup(b, cfg(ForeignWriters::Check));
    let out = TestMap::anon(PAGES, libc::PROT_READ | libc::PROT_WRITE);
    read_all(&m, src, &out, old, "first launch");
    change();
    assert!(
        (0..WORDS).all(|i| src.read_word(i) == new(i)),
        "the CPU sees the new data"
    );
    let r = read_all(&m, src, &out, new, "after the foreign write");
    if !zero_copy(&m) {
        assert_eq!(r.foreign_changed_pages, PAGES as u64, "{r:?}");
        let s = m.stats();
        assert!(s.foreign_checked_pages >= PAGES as u64, "{s:?}");
        let r = read_all(&m, src, &out, new, "again, unchanged");
        assert_eq!(r.foreign_changed_pages, 0, "{r:?}");
    } else {
        assert_eq!(
            m.stats().foreign_checked_pages,
            0,
            "zero-copy hashes nothing"
        );
    }
}

/// A `MAP_SHARED` anonymous mapping written by a forked child between
/// launches: the parent's next launch reads the child's data.
pub fn foreign_shared_anon_child_write<B: TestKernels>(b: B) {
    let src = TestMap::shared_anon(PAGES);
    src.fill(old);
    scenario(b, &src, || child_writes_new(&src));
}

/// A `MAP_SHARED` file mapping whose file is changed with `pwrite()`.
pub fn foreign_shared_file_pwrite<B: TestKernels>(b: B) {
    let f = temp_file("shared");
    let src = TestMap::file(&f, PAGES, libc::PROT_READ, libc::MAP_SHARED);
    scenario(b, &src, || f.write_all_at(&bytes(new), 0).expect("pwrite"));
}

/// A memfd mapping changed with `pwrite()` on the memfd.
pub fn foreign_memfd_pwrite<B: TestKernels>(b: B) {
    let f = memfd();
    let src = TestMap::file(&f, PAGES, libc::PROT_READ, libc::MAP_SHARED);
    scenario(b, &src, || f.write_all_at(&bytes(new), 0).expect("pwrite"));
}

/// A private file mapping this process never wrote: its pages follow the
/// file until copied on write, so `pwrite()` to the file changes them.
pub fn foreign_private_file_pwrite<B: TestKernels>(b: B) {
    let f = temp_file("private");
    let src = TestMap::file(&f, PAGES, libc::PROT_READ, libc::MAP_PRIVATE);
    scenario(b, &src, || f.write_all_at(&bytes(new), 0).expect("pwrite"));
}

/// The device's own writes to a shared file mapping are not foreign: after
/// their write-back the next launch finds nothing changed, and reads back
/// what the device wrote.
pub fn foreign_device_writes_are_not_foreign<B: TestKernels>(b: B) {
    let f = temp_file("devwrite");
    let dst = TestMap::file(
        &f,
        PAGES,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    );
    let (_h, m) = setup(b, cfg(ForeignWriters::Check));
    let fill = m
        .backend()
        .test_kernel(TestKernel::FillU32)
        .expect("kernel");
    launch(&m, &fill, WORDS as u32, [dst.addr(), 7]).expect("launch");
    let out = TestMap::anon(PAGES, libc::PROT_READ | libc::PROT_WRITE);
    fn filled(i: usize) -> u32 {
        7 + i as u32
    }
    let r = read_all(&m, &dst, &out, filled, "after the device's write");
    assert_eq!(r.foreign_changed_pages, 0, "{r:?}");
    assert_eq!(r.cpu_written_pages, 0, "{r:?}");
    // And a later foreign change to the written pages is still caught.
    f.write_all_at(&bytes(new), 0).expect("pwrite");
    read_all(&m, &dst, &out, new, "after a pwrite over the device's data");
}

/// [`ForeignWriters::Trust`] is honoured: nothing is hashed, and in copy
/// mode the launch after a forked child's write reads the old data — the
/// documented price of the opt-out — until an explicit `Clear`.
pub fn foreign_trust_checks_nothing<B: TestKernels>(b: B) {
    let (h, m) = setup(b, cfg(ForeignWriters::Trust));
    let src = TestMap::shared_anon(PAGES);
    src.fill(old);
    let out = TestMap::anon(PAGES, libc::PROT_READ | libc::PROT_WRITE);
    read_all(&m, &src, &out, old, "first launch");
    child_writes_new(&src);
    if zero_copy(&m) {
        read_all(&m, &src, &out, new, "zero-copy reads the CPU's pages");
    } else {
        let r = read_all(&m, &src, &out, old, "Trust: the documented stale read");
        assert_eq!(r.foreign_changed_pages, 0, "{r:?}");
        h.space().invalidate(src.range(), EventKind::Clear);
        read_all(&m, &src, &out, new, "after an explicit Clear");
    }
    assert_eq!(m.stats().foreign_checked_pages, 0, "Trust hashes nothing");
}
