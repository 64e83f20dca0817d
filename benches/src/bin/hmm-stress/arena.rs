//! The shared arena of one `hmm-stress` run: the pages the CPU threads
//! stamp, remap and discard, the per-page bookkeeping the launchers check
//! device reads against, and the run's counters.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{GEN, PAGE, WPP};

/// xorshift64*: small, seedable, good enough to pick ranges.
pub(crate) struct Rng(u64);
impl Rng {
    pub(crate) fn new(seed: u64, stream: u64) -> Rng {
        Rng((seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Shared state of one run.
pub(crate) struct Arena {
    pub(crate) base: u64,
    pub(crate) pages: usize,
    pub(crate) chunk: usize,
    /// CPU writes and remaps of a chunk exclude each other (a CPU write
    /// into a hole would be a SIGSEGV); device launches take no lock.
    pub(crate) locks: Vec<Mutex<()>>,
    /// Per page: the last stamp fully written (Release after the words).
    pub(crate) stamp: Vec<AtomicU32>,
    /// Per page: the stamp being written now (published before the first
    /// word). A writer preempted between its words and `stamp` has already
    /// put the new value in memory, where a concurrent launch may read it:
    /// that is the CPU's data, not a stale read, so the check's upper bound
    /// is this, read after the launch.
    pub(crate) writing: Vec<AtomicU32>,
    /// Per page: the generation floor, published right after the old
    /// memory went away (before the new memory is stamped).
    pub(crate) floor: Vec<AtomicU32>,
    /// Per page: odd while a remap / DONTNEED is in progress.
    pub(crate) remaps: Vec<AtomicU32>,
    /// `--zero-copy`: launches hold it shared, an unmap exclusively.
    pub(crate) unmap_gate: std::sync::RwLock<()>,
    /// `--shared`: the memfd behind the arena and the address of its alias
    /// mapping.
    pub(crate) shared: Option<(i32, u64)>,
    pub(crate) zero_copy: bool,
    /// Device failures are being injected (`--inject-faults`).
    pub(crate) injecting: bool,
    /// `--poison-out`.
    pub(crate) poison_out: bool,
    pub(crate) stop: AtomicBool,
    pub(crate) c: Counts,
}

#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) ops: AtomicU64,
    pub(crate) launches: AtomicU64,
    pub(crate) launch_faults: AtomicU64,
    pub(crate) launch_timeouts: AtomicU64,
    pub(crate) unexpected: AtomicU64,
    pub(crate) words_checked: AtomicU64,
    pub(crate) zeros_accepted: AtomicU64,
    pub(crate) violations: AtomicU64,
    pub(crate) cpu_writes: AtomicU64,
    pub(crate) remaps: AtomicU64,
    pub(crate) dontneeds: AtomicU64,
    pub(crate) prefetches: AtomicU64,
    pub(crate) prefetch_errors: AtomicU64,
    /// Launches and prefetches ended by an injected device failure.
    pub(crate) injected_errors: AtomicU64,
    /// `--migrate`: ranges migrated to the device, brought back
    /// explicitly, and migrations ended by a typed error (memory being
    /// remapped meanwhile).
    pub(crate) migrations: AtomicU64,
    pub(crate) migrations_back: AtomicU64,
    pub(crate) migration_errors: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    // Relaxed: statistics only; read after the threads are joined or for
    // a progress line.
    c.fetch_add(n, Ordering::Relaxed);
}

impl Arena {
    pub(crate) fn page_ptr(&self, p: usize) -> *mut u32 {
        (self.base + (p * PAGE) as u64) as *mut u32
    }

    /// Stores `v` in every word of page `p`, then publishes it.
    pub(crate) fn stamp_page(&self, p: usize, v: u32) {
        self.stamp_page_at(p, v, self.page_ptr(p));
    }

    /// [`Arena::stamp_page`] through `w`: page `p` of the arena, or of its
    /// alias mapping (`--shared`).
    pub(crate) fn stamp_page_at(&self, p: usize, v: u32, w: *mut u32) {
        // SeqCst: ordered before the words, and against the launcher's
        // load after its launch.
        self.writing[p].store(v, Ordering::SeqCst);
        for i in 0..WPP {
            // SAFETY: page `p` of the arena (or of its alias, which stays
            // mapped until the end) is mapped and writable: the
            // caller holds its chunk lock, and only holders of that lock
            // unmap it; the word is 4-byte aligned, and every access to
            // arena words from this process is atomic (a zero-copy cpu
            // device reads them with atomic loads), so this is no data race.
            let word = unsafe { &*w.add(i).cast::<AtomicU32>() };
            // Relaxed: ordered by the `stamp` Release store below.
            word.store(v, Ordering::Relaxed);
        }
        // Release: whoever reads this stamp (Acquire) sees the words above.
        self.stamp[p].store(v, Ordering::Release);
    }

    pub(crate) fn cpu_write(&self, rng: &mut Rng) {
        let p = rng.below(self.pages);
        let _g = self.locks[p / self.chunk]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let s = self.stamp[p].load(Ordering::Acquire);
        if s == u32::MAX {
            return;
        }
        // Only holders of this lock write the page, and they leave every
        // word equal to the stamp: any other value was written by someone
        // else (the mirror writes back only what a kernel wrote, and no
        // kernel writes the arena).
        let base = self.page_ptr(p);
        let wrong = (0..WPP)
            .map(|i| {
                // SAFETY: as in `stamp_page_at`: page `p` is mapped while its
                // chunk lock is held (we hold it), the word is aligned, and
                // every access to arena words is atomic.
                let word = unsafe { &*base.add(i).cast::<AtomicU32>() };
                (i, word.load(Ordering::Relaxed))
            })
            .filter(|&(_, v)| v != s)
            .collect::<Vec<_>>();
        if let Some(&(i, v)) = wrong.first() {
            let n = self
                .c
                .violations
                .fetch_add(wrong.len() as u64, Ordering::Relaxed);
            if n < 10 {
                println!(
                    "VIOLATION: arena page {p}: {} words changed behind the program (first: word {i} holds {v:#x}, the program wrote {s:#x})",
                    wrong.len()
                );
            }
        }
        match self.shared {
            // Half the writes through the alias: unseen by write tracking.
            Some((_, alias)) if rng.below(2) == 0 => {
                self.stamp_page_at(p, s + 1, (alias + (p * PAGE) as u64) as *mut u32)
            }
            _ => self.stamp_page(p, s + 1),
        }
        add(&self.c.cpu_writes, 1);
    }

    /// Unmaps and maps again (or `DONTNEED`s) one chunk, then re-stamps it
    /// with a new generation.
    pub(crate) fn remap(&self, rng: &mut Rng) -> Result<(), String> {
        let c = rng.below(self.pages / self.chunk);
        let _g = self.locks[c].lock().unwrap_or_else(|e| e.into_inner());
        let first = c * self.chunk;
        let pages = first..first + self.chunk;
        for p in pages.clone() {
            // SeqCst with the launchers' loads of `remaps`: a launch that
            // saw an even count before and the same count after cannot
            // overlap this remap.
            self.remaps[p].fetch_add(1, Ordering::SeqCst);
        }
        let addr = self.page_ptr(first).cast::<libc::c_void>();
        let len = self.chunk * PAGE;
        let dontneed = rng.below(3) == 0;
        // A shared arena: `MADV_REMOVE` punches the hole (`DONTNEED` would
        // keep the memfd's data).
        let advice = if self.shared.is_some() {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        if dontneed {
            // SAFETY: our own arena chunk, locked against CPU writers; no
            // Rust reference into it exists. Private anonymous memory (or a
            // memfd hole) then reads as zeros.
            if unsafe { libc::madvise(addr, len, advice) } != 0 {
                return Err(format!("madvise: {}", std::io::Error::last_os_error()));
            }
        }
        // Zero-copy: no launch may run while memory is unmapped (the
        // mode's contract); held until the chunk is mapped again.
        let _gate = (!dontneed && self.zero_copy)
            .then(|| self.unmap_gate.write().unwrap_or_else(|e| e.into_inner()));
        if !dontneed {
            // Not `munmap`: between an `munmap` and the `mmap` below, any
            // other thread's `mmap` (lavapipe's JIT code, wgpu's staging
            // memory, a malloc arena) may be placed in the hole, and the
            // `MAP_FIXED` below would then silently replace that mapping —
            // one CI run crashed executing JIT code replaced that way. A
            // `MAP_FIXED` placeholder unmaps the chunk just the same (the
            // kernel reports it with the same userfaultfd `UNMAP` event)
            // while keeping the addresses ours; a launch that meets it sees
            // a mapping it may not read (`NoAccess`) instead of a hole.
            // SAFETY: as above; the chunk is mapped again at once below.
            let p = unsafe {
                libc::mmap(
                    addr,
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != addr {
                return Err(format!(
                    "mmap (placeholder): {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        // The old contents are gone: publish the floor before the new
        // memory is stamped.
        let mut next = Vec::with_capacity(self.chunk);
        for p in pages.clone() {
            let s = self.stamp[p].load(Ordering::Acquire);
            let n = (s / GEN).saturating_add(1).saturating_mul(GEN).max(1);
            self.floor[p].store(n, Ordering::SeqCst);
            next.push(n);
        }
        if !dontneed {
            let (flags, fd, off) = match self.shared {
                Some((fd, _)) => {
                    let off = (first * PAGE) as libc::off_t;
                    // SAFETY: our own memfd; punching a hole only zeroes
                    // its pages (the alias sees zeros too, as the arena
                    // will).
                    let r = unsafe {
                        libc::fallocate(
                            fd,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            off,
                            len as libc::off_t,
                        )
                    };
                    if r != 0 {
                        return Err(format!("fallocate: {}", std::io::Error::last_os_error()));
                    }
                    (libc::MAP_SHARED, fd, off)
                }
                None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
            };
            // SAFETY: MAP_FIXED over the placeholder we just put in our
            // own arena (the guard pages around the arena stay ours).
            let p = unsafe {
                libc::mmap(
                    addr,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_FIXED,
                    fd,
                    off,
                )
            };
            if p != addr {
                return Err(format!("mmap: {}", std::io::Error::last_os_error()));
            }
        }
        for (p, n) in pages.clone().zip(next) {
            self.stamp_page(p, n);
        }
        for p in pages {
            self.remaps[p].fetch_add(1, Ordering::SeqCst);
        }
        add(
            if dontneed {
                &self.c.dontneeds
            } else {
                &self.c.remaps
            },
            1,
        );
        Ok(())
    }
}
