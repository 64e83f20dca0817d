//! `hmm-fuzz`: an API fuzzer for the `hmm` facade (issue #19).
//!
//! One mirror, one kernel, used the way an application uses them: every
//! case makes a few random host operations and then one launch, from a
//! seeded RNG (the seed is printed first; `--seed S --cases K` replays a
//! run up to its case `K - 1`, and `--verbose` prints each case before it
//! runs).
//!
//! # The kernel and the oracle
//!
//! `out[i] = mix(key, i, in[i])` for `i < n` (one aligned load and one
//! aligned store per invocation; `mix` is an integer hash, the same in WGSL
//! and in the cpu driver's Rust). The fuzzer keeps a *shadow* of every
//! buffer it owns — what the CPU must hold — and after every launch:
//!
//! - `Ok` — every output word the CPU can read equals `mix(..)` of the
//!   input's shadow, every other word of the buffers involved (the input
//!   included) and of one other random buffer equals its shadow;
//! - `Err` — it must be one the case allows: a `DeviceFault` whose reason
//!   fits a bad argument (never mapped / freed / null / kernel-half:
//!   `Unmapped`; `PROT_NONE`: `NoAccess`; read-only: `ReadOnly`;
//!   misaligned: `Misaligned`) and whose address lies inside that
//!   argument's `n * 4` bytes, or `WriteBackRefused` naming the output
//!   buffer after an `mprotect` the mirror was not told about. Output words
//!   may then hold the old or the new value (invocations that completed
//!   before the fault), nothing else; the next case is an all-valid launch,
//!   which must succeed (the mirror stays usable after a typed error).
//! - `n` past [`Mirror::max_invocations`] (one case in 32: `max + 1`,
//!   `u32::MAX` or between) must be exactly `TooManyInvocations { n, max }`
//!   with nothing changed; `n = 0` must be `Ok`.
//! - A refused write-back leaves the device holding the data: while the
//!   memory stays read-only every launch must report the refusal again
//!   (before running anything), and once it is writable again (told or
//!   not) the CPU must get the kept data (each word the device's value or
//!   the old one — the launch may have ended early — and something of it if
//!   the refusal was reported); once it is unmapped the data must be
//!   dropped (a fresh mapping at the same address keeps its own contents).
//!
//! A run is replayed exactly by its seed only where nothing depends on
//! timing (the deferred-release worker and the event thread run beside
//! the fuzzer's one thread).
//! - Anything else — another error variant, a panic (caught per case), an
//!   abort or a fatal signal (the handler prints the case), a case running
//!   past `--hang` seconds (a watchdog thread), RSS growth past the bound,
//!   or pool slots / page-table entries left once everything is freed — is
//!   a failure: the case is printed and the exit status is non-zero.
//!
//! # Host operations between launches
//!
//! Anonymous mappings (in an arena of address space the fuzzer places them
//! in with `MAP_FIXED_NOREPLACE`, so a freed range is not reused behind its
//! back) and `Vec`s; `munmap`; fresh mappings at freed addresses;
//! `mremap(MREMAP_MAYMOVE)` (growing, in place or moved, and to a chosen
//! address with `MREMAP_FIXED`); CPU writes; `mprotect` to read-only,
//! `PROT_NONE` and back, mostly followed by `Mirror::protection_changed`
//! and sometimes not (never in `--zero-copy` mode, whose contract forbids
//! it).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hmm::{
    AccessError, Device, Driver, EventKind, Mirror, MirrorConfig, MirrorError, Ptr, PtrMut,
    VaRange, VirtAddr,
};
use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;

const PAGE: u64 = 4096;
/// The fuzzer's own mappings go here (user space, far from where the
/// kernel places mappings without a hint: the heap sits near the binary,
/// libraries and threads' stacks near the top).
const ARENA: u64 = 0x2000_0000_0000;
/// Pages of address space in the arena.
const ARENA_PAGES: u64 = 1 << 22; // 16 GiB
/// Addresses nothing maps: the "never mapped" arguments point here.
const NEVER: u64 = 0x3000_0000_0000;
/// Live buffers at most (more are freed first).
const MAX_BUFS: usize = 24;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "hmm-fuzz",
    about = "hmm-rs API fuzzer: random n, pointer arguments and mprotect/munmap/mremap between launches, checked against a shadow of the CPU's memory"
)]
struct Opts {
    /// Backend: `cpu`, `wgpu` or `vulkan` (any adapter; lavapipe counts).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// How long to run, in seconds (default 10 unless `--cases` is given).
    #[arg(long)]
    duration: Option<u64>,
    /// How many cases to run (with `--duration`, whichever ends first).
    #[arg(long)]
    cases: Option<u64>,
    /// Seed of every random choice (default: random, printed at start).
    #[arg(long)]
    seed: Option<u64>,
    /// Run the device in zero-copy mode (cpu, vulkan). Protection changes
    /// are then always told to the mirror (that mode's contract).
    #[arg(long)]
    zero_copy: bool,
    /// Device pool slots (4 KiB pages).
    #[arg(long, default_value_t = 4096)]
    pool: u32,
    /// Largest `n` of a launch (default: 2^18 on the cpu driver, 2^15 on
    /// the GPU drivers, which run on lavapipe here).
    #[arg(long)]
    max_n: Option<u32>,
    /// Seconds one case may take before the watchdog calls it a hang.
    #[arg(long, default_value_t = 60)]
    hang: u64,
    /// Print every case before running it.
    #[arg(long)]
    verbose: bool,
}

hmm::kernel! {
    /// `out[i] = mix(key, i, in[i])`. The fuzzer launches it with raw words
    /// (`Mirror::launch`: any address, valid or not), so the declared types only
    /// name the WGSL parameters.
    const FUZZ: fuzz_mix(inp: Ptr<u32>, out: PtrMut<u32>, key: u32)
.wgsl(
    r#"
fn hmm_kernel(i: u32) {
    let v = hmm_load_u32(hmm_index(args.inp, i, 4u));
    hmm_store_u32(hmm_index(args.out, i, 4u), (v ^ args.key) * 2654435761u + i);
}"#,
)
.cpu(|lane, i, (inp, out, key)| {
    let v = lane.load_u32(inp.at(i))?;
    lane.store_u32(out.at(i), mix(key, i, v))
});
}

fn mix(key: u32, i: u32, v: u32) -> u32 {
    (v ^ key).wrapping_mul(2_654_435_761).wrapping_add(i)
}

// ---- `HMM_FUZZ_TRACE_MONITOR_ALLOC=1`: who allocates on the uffd monitor ----

/// A thread that `free()`s can hold a malloc arena lock while glibc trims a
/// watched heap (`brk`), waiting for the userfaultfd monitor to read the
/// event; if the monitor thread allocates meanwhile, both wait forever (see
/// `hmm_core::cpu::monitor`, "Rules for sinks"). With the variable set,
/// the first allocations made on the monitor thread print a backtrace.
struct TracingAlloc;

/// The monitor thread's id (0: not tracing).
static MONITOR_TID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static TRACED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn trace_alloc(size: usize) {
    let tid = MONITOR_TID.load(Ordering::Relaxed);
    // SAFETY: gettid has no preconditions.
    if tid == 0 || unsafe { libc::gettid() } != tid {
        return;
    }
    let _ = TRACING.try_with(|g| {
        if !g.get() && TRACED.fetch_add(1, Ordering::Relaxed) < 8 {
            g.set(true);
            let bt = std::backtrace::Backtrace::force_capture();
            eprintln!("hmm-fuzz: the uffd monitor thread allocates {size} bytes:\n{bt}");
            g.set(false);
        }
    });
}

// SAFETY: every call is passed on to `System` unchanged; the tracing
// around it does not touch the memory.
unsafe impl std::alloc::GlobalAlloc for TracingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        trace_alloc(l.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        trace_alloc(l.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        trace_alloc(new);
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: TracingAlloc = TracingAlloc;

/// Starts tracing the monitor thread (found by name) if asked to.
fn trace_monitor_if_asked() {
    if std::env::var_os("HMM_FUZZ_TRACE_MONITOR_ALLOC").is_none() {
        return;
    }
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "hmm-uffd-monito" {
            if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
                println!("tracing allocations on the uffd monitor thread {tid}");
                MONITOR_TID.store(tid, Ordering::Relaxed);
            }
        }
    }
}

// ---- the case being run, for the signal handler and the watchdog ----

const CASE_CAP: usize = 2048;
static CASE_BUF: [AtomicU8; CASE_CAP] = [const { AtomicU8::new(0) }; CASE_CAP];
static CASE_LEN: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds since the start at which the running case began (0: none).
static CASE_T0: AtomicU64 = AtomicU64::new(0);

fn set_case(s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(CASE_CAP);
    CASE_LEN.store(0, Ordering::Release);
    for (slot, &v) in CASE_BUF.iter().zip(&b[..n]) {
        slot.store(v, Ordering::Relaxed);
    }
    CASE_LEN.store(n, Ordering::Release);
}

/// The case text, as the signal handler and the watchdog see it.
fn case_bytes(out: &mut [u8; CASE_CAP]) -> usize {
    let n = CASE_LEN.load(Ordering::Acquire);
    for (o, slot) in out.iter_mut().zip(&CASE_BUF[..n]) {
        *o = slot.load(Ordering::Relaxed);
    }
    n
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    // Async-signal-safe: atomics, a stack buffer and write(2) only.
    let mut buf = [0u8; CASE_CAP];
    let n = case_bytes(&mut buf);
    let head: &[u8] = b"\nhmm-fuzz: FAIL: fatal signal during: ";
    // SAFETY: writes of valid buffers to stderr; nothing else.
    unsafe {
        libc::write(2, head.as_ptr().cast(), head.len());
        libc::write(2, buf.as_ptr().cast(), n);
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
    // SA_RESETHAND restored the default action: returning re-runs the
    // faulting instruction (or `abort` raises again) and the process dies
    // with the signal, which CI sees.
    let _ = sig;
}

fn install_signal_handlers() {
    for sig in [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGABRT,
        libc::SIGILL,
        libc::SIGFPE,
    ] {
        // SAFETY: a zeroed sigaction with a handler that is
        // async-signal-safe (see `on_fatal_signal`).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESETHAND | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

// ---- buffers ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prot {
    Rw,
    Ro,
    None,
}

impl Prot {
    fn bits(self) -> i32 {
        match self {
            Prot::Rw => libc::PROT_READ | libc::PROT_WRITE,
            Prot::Ro => libc::PROT_READ,
            Prot::None => libc::PROT_NONE,
        }
    }
}

enum Backing {
    /// An anonymous mapping of `len` bytes.
    Mmap { len: u64 },
    /// A `Vec` (malloc'd; never `mprotect`ed: it shares pages with the heap).
    Vec(#[allow(dead_code)] Vec<u32>),
}

struct Buf {
    id: u64,
    addr: u64,
    words: usize,
    backing: Backing,
    prot: Prot,
    /// Whether `protection_changed` followed the last `mprotect`.
    told: bool,
    /// Every protection the buffer had since the mirror was last told
    /// (the current one included): untold, the mirror may act on any of
    /// them (its cached view of the mappings is as old as that).
    history: Vec<Prot>,
    /// What the CPU must hold.
    shadow: Vec<u32>,
}

impl Buf {
    fn is_mmap(&self) -> bool {
        matches!(self.backing, Backing::Mmap { .. })
    }
    fn map_len(&self) -> u64 {
        match self.backing {
            Backing::Mmap { len } => len,
            Backing::Vec(_) => self.words as u64 * 4,
        }
    }
    fn read(&self, i: usize) -> u32 {
        assert!(i < self.words && self.prot != Prot::None);
        // SAFETY: inside the buffer, which is mapped and readable.
        unsafe { (self.addr as *const u32).add(i).read_volatile() }
    }
    fn write(&mut self, i: usize, v: u32) {
        assert!(i < self.words && self.prot == Prot::Rw);
        // SAFETY: inside the buffer, which is mapped and writable.
        unsafe { (self.addr as *mut u32).add(i).write_volatile(v) };
        self.shadow[i] = v;
    }
    fn range(&self) -> (u64, u64) {
        (self.addr, self.map_len())
    }
    fn describe(&self) -> String {
        format!(
            "#{} {} {:#x}+{:#x} {:?}{}",
            self.id,
            if self.is_mmap() { "mmap" } else { "vec" },
            self.addr,
            self.map_len(),
            self.prot,
            if self.told {
                String::new()
            } else {
                format!(" (untold; since told: {:?})", self.history)
            }
        )
    }
}

/// A launch argument.
#[derive(Clone, Debug)]
enum Arg {
    /// A buffer of ours at byte offset `off` (misaligned if `off % 4 != 0`).
    Buf { id: u64, addr: u64, off: u64 },
    /// Inside memory we unmapped.
    Freed(u64),
    /// Inside address space nothing maps.
    Never(u64),
    /// Kernel half, non-canonical, or the top of user space.
    Kernel(u64),
    /// Null (or a small address).
    Null(u64),
}

impl Arg {
    fn addr(&self) -> u64 {
        match *self {
            Arg::Buf { addr, off, .. } => addr + off,
            Arg::Freed(a) | Arg::Never(a) | Arg::Kernel(a) | Arg::Null(a) => a,
        }
    }
}

/// A refused write-back the device must still hold (`certain`: the
/// mirror reported it), or may hold (`!certain`: the launch that wrote the
/// read-only memory ended with a device fault; a refusal met in a callback
/// is reported by the next launch).
struct Pending {
    id: u64,
    certain: bool,
    /// Output words `[w0, w0 + old.len())`.
    w0: usize,
    old: Vec<u32>,
    new: Option<Vec<u32>>,
}

#[derive(Default)]
struct Counts {
    cases: u64,
    launches: u64,
    ok: u64,
    errors: std::collections::BTreeMap<String, u64>,
    ops: std::collections::BTreeMap<&'static str, u64>,
    n_max: u32,
}

struct Fuzz {
    rng: XorShiftRng,
    mirror: Mirror<Device>,
    kernel: hmm::Kernel,
    zero_copy: bool,
    max_n: u32,
    bufs: Vec<Buf>,
    next_id: u64,
    /// Arena ranges we unmapped (start, len).
    freed: Vec<(u64, u64)>,
    pending: Option<Pending>,
    /// The last launch failed: the next must be all-valid and succeed.
    recover: bool,
    desc: String,
    c: Counts,
    verbose: bool,
}

type Fail = String;

fn err_name(e: &MirrorError) -> String {
    match e {
        MirrorError::DeviceFault { write, reason, .. } => {
            format!(
                "DeviceFault({reason:?}, {})",
                if *write { "w" } else { "r" }
            )
        }
        MirrorError::WriteBackRefused { .. } => "WriteBackRefused".into(),
        other => format!("{other}"),
    }
}

impl Fuzz {
    fn note(&mut self, s: String) {
        if !self.desc.is_empty() {
            self.desc.push_str("; ");
        }
        self.desc.push_str(&s);
        set_case(&self.desc);
    }

    fn count_op(&mut self, op: &'static str) {
        *self.c.ops.entry(op).or_default() += 1;
    }

    fn is_pending(&self, id: u64) -> bool {
        self.pending.as_ref().is_some_and(|p| p.id == id)
    }

    fn buf(&self, id: u64) -> &Buf {
        self.bufs.iter().find(|b| b.id == id).expect("live buffer")
    }

    fn buf_mut(&mut self, id: u64) -> &mut Buf {
        self.bufs
            .iter_mut()
            .find(|b| b.id == id)
            .expect("live buffer")
    }

    /// Maps `len` bytes read-write at `at`, or at a random arena address.
    fn arena_map(&mut self, at: Option<u64>, len: u64) -> Option<u64> {
        for _ in 0..32 {
            let a = at.unwrap_or_else(|| {
                ARENA + self.rng.random_range(0..ARENA_PAGES - len / PAGE - 1) * PAGE
            });
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing
            // mapping; the new one is ours.
            let p = unsafe {
                libc::mmap(
                    a as *mut libc::c_void,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                if p as u64 == a {
                    // Freed ranges it overlaps are no longer free.
                    self.freed.retain(|&(s, l)| s + l <= a || a + len <= s);
                    return Some(a);
                }
                // A kernel without MAP_FIXED_NOREPLACE placed it elsewhere.
                // SAFETY: the mapping just made, ours.
                unsafe { libc::munmap(p, len as usize) };
            }
            if at.is_some() {
                return None;
            }
        }
        None
    }

    fn fill(&mut self, words: usize) -> Vec<u32> {
        let s: u32 = self.rng.random();
        (0..words as u32)
            .map(|i| mix(s, i, i.wrapping_mul(0x9e37_79b9)))
            .collect()
    }

    /// A new read-write buffer of at least `words` words.
    fn alloc(&mut self, words: usize, at: Option<u64>) -> Option<u64> {
        let words = words.max(1);
        let id = self.next_id;
        self.next_id += 1;
        let use_vec = at.is_none() && self.rng.random_ratio(1, 4);
        let data = self.fill(words);
        let b = if use_vec {
            let v = data.clone();
            Buf {
                id,
                addr: v.as_ptr() as u64,
                words,
                backing: Backing::Vec(v),
                prot: Prot::Rw,
                told: true,
                history: vec![Prot::Rw],
                shadow: data,
            }
        } else {
            let len = (words as u64 * 4).div_ceil(PAGE).max(1) * PAGE;
            let addr = self.arena_map(at, len)?;
            let words = (len / 4) as usize;
            let mut data = data;
            data.resize(words, 0);
            let mut b = Buf {
                id,
                addr,
                words,
                backing: Backing::Mmap { len },
                prot: Prot::Rw,
                told: true,
                history: vec![Prot::Rw],
                shadow: vec![0; words],
            };
            for (i, v) in data.into_iter().enumerate() {
                b.write(i, v);
            }
            b
        };
        self.bufs.push(b);
        Some(id)
    }

    fn free(&mut self, idx: usize) {
        let b = self.bufs.swap_remove(idx);
        if let Backing::Mmap { len } = b.backing {
            // SAFETY: our own mapping, unmapped once.
            let rc = unsafe { libc::munmap(b.addr as *mut libc::c_void, len as usize) };
            assert_eq!(rc, 0, "munmap");
            if (ARENA..ARENA + ARENA_PAGES * PAGE).contains(&b.addr) {
                self.freed.push((b.addr, len));
                if self.freed.len() > 64 {
                    self.freed.remove(0);
                }
            }
        }
        if self.pending.as_ref().is_some_and(|p| p.id == b.id) {
            // Memory that is gone: the device's kept data is dropped.
            self.pending = None;
        }
    }

    fn total_words(&self) -> usize {
        self.bufs.iter().map(|b| b.words).sum()
    }

    // ---- host operations ----

    fn host_op(&mut self) -> Result<(), Fail> {
        let k = self.rng.random_range(0..100u32);
        let live = self.bufs.len();
        if live >= MAX_BUFS || self.total_words() > 16 << 20 {
            let i = self.rng.random_range(0..live);
            self.note(format!("free {}", self.bufs[i].describe()));
            self.count_op("free");
            self.free(i);
            return Ok(());
        }
        match k {
            0..15 => {
                let w = self.rand_words();
                let id = self.alloc(w, None);
                if let Some(id) = id {
                    let d = self.buf(id).describe();
                    self.note(format!("alloc {d}"));
                    self.count_op("alloc");
                }
            }
            15..25 if !self.freed.is_empty() => {
                let i = self.rng.random_range(0..self.freed.len());
                let (a, l) = self.freed[i];
                let w = self.rng.random_range(1..=l / 4) as usize;
                if let Some(id) = self.alloc(w, Some(a)) {
                    let d = self.buf(id).describe();
                    self.note(format!("alloc at freed address {d}"));
                    self.count_op("alloc at freed");
                }
            }
            25..40 if live > 0 => {
                let i = self.rng.random_range(0..live);
                self.note(format!("free {}", self.bufs[i].describe()));
                self.count_op("free");
                self.free(i);
            }
            40..65 if live > 0 => {
                let i = self.rng.random_range(0..live);
                if self.bufs[i].prot == Prot::Rw && !self.is_pending(self.bufs[i].id) {
                    let words = self.bufs[i].words;
                    let start = self.rng.random_range(0..words);
                    let len = self.rng.random_range(1..=(words - start).min(8192));
                    let s: u32 = self.rng.random();
                    self.note(format!(
                        "cpu write {} words {start}..{}",
                        self.bufs[i].describe(),
                        start + len
                    ));
                    self.count_op("cpu write");
                    let b = &mut self.bufs[i];
                    for j in start..start + len {
                        b.write(j, mix(s, j as u32, 7));
                    }
                }
            }
            65..88 if live > 0 => {
                let i = self.rng.random_range(0..live);
                if self.bufs[i].is_mmap() {
                    self.protect(i)?;
                }
            }
            88..100 if live > 0 => {
                let i = self.rng.random_range(0..live);
                if self.bufs[i].is_mmap()
                    && self.bufs[i].prot == Prot::Rw
                    && !self.is_pending(self.bufs[i].id)
                {
                    self.remap(i);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn rand_words(&mut self) -> usize {
        match self.rng.random_range(0..10) {
            0..7 => self.rng.random_range(1..=4096),
            7..9 => self.rng.random_range(1..=16384),
            _ => self.rng.random_range(1..=self.max_n as usize + 1),
        }
    }

    fn protect(&mut self, i: usize) -> Result<(), Fail> {
        let prot = [Prot::Rw, Prot::Ro, Prot::None][self.rng.random_range(0..3)];
        self.protect_to(i, prot)
    }

    fn protect_to(&mut self, i: usize, prot: Prot) -> Result<(), Fail> {
        let tell = self.zero_copy || self.rng.random_ratio(4, 5);
        let (addr, len) = self.bufs[i].range();
        // SAFETY: our own mapping, whole.
        let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot.bits()) };
        assert_eq!(rc, 0, "mprotect");
        let id = self.bufs[i].id;
        {
            let b = &mut self.bufs[i];
            b.prot = prot;
            // Untold only matters while the device may hold stale access;
            // a told change stays told until the next one.
            b.told = tell;
            if tell {
                b.history = vec![prot];
            } else if !b.history.contains(&prot) {
                b.history.push(prot);
            }
        }
        self.note(format!(
            "mprotect {} {}",
            self.bufs[i].describe(),
            if tell { "+ protection_changed" } else { "" }
        ));
        self.count_op(if tell {
            "mprotect told"
        } else {
            "mprotect untold"
        });
        if tell {
            let range = VaRange::from_start_len(VirtAddr(addr), len).expect("range");
            self.mirror
                .protection_changed(range)
                .map_err(|e| format!("protection_changed: {e}"))?;
            if prot == Prot::Rw && self.pending.as_ref().is_some_and(|p| p.id == id) {
                // The kept data is written by the call.
                self.settle_pending("protection_changed after widening")?;
            }
        }
        Ok(())
    }

    fn remap(&mut self, i: usize) {
        let (old, old_len) = self.bufs[i].range();
        let new_len = old_len + PAGE * self.rng.random_range(0..4u64);
        let fixed = self.rng.random_bool(0.5);
        let target = if fixed {
            match self.arena_map(None, new_len) {
                Some(t) => Some(t),
                None => return,
            }
        } else {
            None
        };
        let flags = libc::MREMAP_MAYMOVE | if fixed { libc::MREMAP_FIXED } else { 0 };
        // SAFETY: moves our own mapping (onto our own reservation with
        // MREMAP_FIXED); the buffer's address is updated below.
        let p = unsafe {
            libc::mremap(
                old as *mut libc::c_void,
                old_len as usize,
                new_len as usize,
                flags,
                target.unwrap_or(0) as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            if let Some(t) = target {
                // SAFETY: our own reservation, unused.
                unsafe { libc::munmap(t as *mut libc::c_void, new_len as usize) };
            }
            self.note(format!(
                "mremap {old:#x}+{old_len:#x} -> +{new_len:#x} failed: {e}"
            ));
            self.count_op("mremap failed");
            return;
        }
        let new = p as u64;
        let b = &mut self.bufs[i];
        b.addr = new;
        b.backing = Backing::Mmap { len: new_len };
        b.words = (new_len / 4) as usize;
        b.shadow.resize(b.words, 0);
        if new != old && (ARENA..ARENA + ARENA_PAGES * PAGE).contains(&old) {
            self.freed.push((old, old_len));
        } else if new == old {
            // Grown in place: the tail is no longer free.
            self.freed
                .retain(|&(s, l)| s + l <= old || old + new_len <= s);
        }
        self.note(format!(
            "mremap {:#x}+{:#x} -> {}{}",
            old,
            old_len,
            self.bufs[i].describe(),
            if fixed { " (MREMAP_FIXED)" } else { "" }
        ));
        self.count_op("mremap");
    }

    // ---- launches ----

    /// A buffer (live, not the pending one) with room for `need` words,
    /// read-write unless `any`; allocates one if there is none.
    fn pick_buf(&mut self, need: usize, any: bool) -> u64 {
        let pend = self.pending.as_ref().map(|p| p.id);
        let fit: Vec<u64> = self
            .bufs
            .iter()
            .filter(|b| {
                b.words >= need && Some(b.id) != pend && (any || (b.prot == Prot::Rw && b.told))
            })
            .map(|b| b.id)
            .collect();
        if !fit.is_empty() && self.rng.random_ratio(7, 8) {
            return fit[self.rng.random_range(0..fit.len())];
        }
        let extra = self.rng.random_range(0..1024);
        loop {
            if let Some(id) = self.alloc(need + extra, None) {
                let d = self.buf(id).describe();
                self.note(format!("alloc {d}"));
                return id;
            }
        }
    }

    fn pick_arg(&mut self, n: u32, valid: bool, other: Option<&Arg>) -> Arg {
        let bytes = u64::from(n) * 4;
        let k = if valid {
            0
        } else {
            self.rng.random_range(0..100u32)
        };
        match k {
            // The same argument as the other one (in place), when it is an
            // aligned buffer.
            0..10 if matches!(other, Some(Arg::Buf { off, .. }) if off % 4 == 0) => {
                other.cloned().expect("other")
            }
            0..62 => {
                let any = !valid && self.rng.random_ratio(1, 2);
                let word_off = if self.rng.random_ratio(1, 4) {
                    self.rng.random_range(0..64usize)
                } else {
                    0
                };
                let id = self.pick_buf(word_off + n as usize, any);
                let mut off = word_off as u64 * 4;
                // Disjoint from the other argument, or the same: never a
                // partial overlap (invocation j would read what
                // invocation k wrote).
                if let Some(Arg::Buf {
                    id: oid, off: ooff, ..
                }) = other
                {
                    if *oid == id && off.abs_diff(*ooff) < bytes {
                        off = *ooff;
                    }
                }
                Arg::Buf {
                    id,
                    addr: self.buf(id).addr,
                    off,
                }
            }
            62..68 => {
                let id = self.pick_buf(n as usize + 1, true);
                Arg::Buf {
                    id,
                    addr: self.buf(id).addr,
                    off: self.rng.random_range(1..4),
                }
            }
            68..78 => {
                let fit: Vec<(u64, u64)> = self
                    .freed
                    .iter()
                    .copied()
                    .filter(|&(_, l)| l >= bytes)
                    .collect();
                if fit.is_empty() {
                    return self.pick_arg(n, valid, other);
                }
                let (a, l) = fit[self.rng.random_range(0..fit.len())];
                Arg::Freed(a + self.rng.random_range(0..=(l - bytes) / 4) * 4)
            }
            78..86 => Arg::Never(NEVER + self.rng.random_range(0..1u64 << 24) * PAGE),
            86..94 => Arg::Kernel(
                [
                    0xffff_8000_0000_0000 + self.rng.random_range(0..1u64 << 18) * PAGE,
                    0xffff_ffff_ffff_f000,
                    0x0000_8000_0000_0000,
                    0x0000_7fff_ffff_f000,
                ][self.rng.random_range(0..4)],
            ),
            _ => Arg::Null([0, 4, 0x100][self.rng.random_range(0..3)]),
        }
    }

    fn rand_n(&mut self) -> u32 {
        match self.rng.random_range(0..100u32) {
            0..5 => 0,
            5..15 => self.rng.random_range(1..=64),
            15..75 => self.rng.random_range(1..=4096),
            75..95 => self.rng.random_range(4096..=self.max_n.clamp(4096, 16384)),
            _ => self.rng.random_range(1..=self.max_n),
        }
    }

    fn arg_desc(&self, a: &Arg) -> String {
        match a {
            Arg::Buf { id, off, .. } => format!("{} +{off}", self.buf(*id).describe()),
            other => format!("{other:?}"),
        }
    }

    /// One case: host operations, then a launch, checked.
    fn case(&mut self, k: u64) -> Result<(), Fail> {
        self.desc.clear();
        self.note(format!("case {k}"));
        let valid = self.recover;
        if let Some(id) = self.pending.as_ref().map(|p| p.id) {
            // Settle a refused write-back soon, most of the time: make the
            // memory writable (told or not), or unmap it.
            if self.rng.random_ratio(3, 4) {
                let i = self.bufs.iter().position(|b| b.id == id).expect("live");
                if self.rng.random_ratio(1, 4) {
                    self.note(format!("free {}", self.bufs[i].describe()));
                    self.count_op("free");
                    self.free(i);
                } else {
                    self.protect_to(i, Prot::Rw)?;
                }
            }
        }
        if !valid {
            for _ in 0..self.rng.random_range(0..=3) {
                self.host_op()?;
            }
        }
        if !valid && self.rng.random_ratio(1, 32) {
            return self.oversized();
        }
        let n = if valid {
            self.rng.random_range(1..=1024)
        } else {
            self.rand_n()
        };
        let out = self.pick_arg(n, valid, None);
        let inp = self.pick_arg(n, valid, Some(&out));
        let key: u32 = self.rng.random();
        let d = format!(
            "launch n={n} key={key:#x} in=[{}] out=[{}]{}",
            self.arg_desc(&inp),
            self.arg_desc(&out),
            if valid {
                " (recovery: must succeed)"
            } else {
                ""
            }
        );
        self.note(d);
        if self.verbose {
            println!("{}", self.desc);
        }
        self.launch(n, inp, out, key)
    }

    /// A launch past the device's invocation limit (`max + 1`,
    /// `u32::MAX`, or between): exactly `TooManyInvocations { n, max }`
    /// whatever the arguments (checked before anything else, a pending
    /// refusal included), and nothing changes.
    fn oversized(&mut self) -> Result<(), Fail> {
        let max = self.mirror.max_invocations();
        let Some(first) = max.checked_add(1) else {
            return Ok(());
        };
        let n = match self.rng.random_range(0..3) {
            0 => first,
            1 => u32::MAX,
            _ => self.rng.random_range(first..=u32::MAX),
        };
        let out = self.pick_arg(64, false, None);
        let inp = self.pick_arg(64, false, Some(&out));
        let key: u32 = self.rng.random();
        let d = format!(
            "launch n={n} (max_invocations {max}) key={key:#x} in=[{}] out=[{}]",
            self.arg_desc(&inp),
            self.arg_desc(&out)
        );
        self.note(d);
        if self.verbose {
            println!("{}", self.desc);
        }
        self.c.launches += 1;
        let words = [inp.addr(), out.addr(), u64::from(key)];
        let (mirror, kernel) = (&self.mirror, &self.kernel);
        let res = catch_unwind(AssertUnwindSafe(|| mirror.launch(kernel, n, words)))
            .map_err(|_| "launch panicked (message above)".to_string())?;
        match res {
            Err(MirrorError::TooManyInvocations { n: got, max: m }) if (got, m) == (n, max) => {
                *self.c.errors.entry("TooManyInvocations".into()).or_default() += 1;
            }
            r => {
                return Err(format!(
                    "a launch of {n} invocations (limit {max}) must be TooManyInvocations {{ n: {n}, max: {max} }}, got {r:?}"
                ))
            }
        }
        self.check_unchanged(&inp)?;
        self.check_unchanged(&out)
    }

    fn launch(&mut self, n: u32, inp: Arg, out: Arg, key: u32) -> Result<(), Fail> {
        let bytes = u64::from(n) * 4;
        // What the case allows.
        let mut ok_allowed = true;
        // (reason, write, start, len): a DeviceFault that fits.
        let mut faults: Vec<(AccessError, bool, u64, u64)> = Vec::new();
        let mut refusable: Option<u64> = None;
        for (arg, write) in [(&inp, false), (&out, true)] {
            let p = arg.addr();
            let mut f = |r: AccessError| faults.push((r, write, p, bytes));
            match arg {
                Arg::Buf { id, off, .. } => {
                    let b = self.buf(*id);
                    if off % 4 != 0 {
                        ok_allowed = false;
                        f(AccessError::Misaligned);
                    }
                    // Whether it may succeed: by the protection the CPU
                    // has now (untold, the device may still read its copy
                    // of `PROT_NONE` memory, and its writes to memory that
                    // refuses them are refused at write-back).
                    match (b.prot, write) {
                        (Prot::Rw, _) | (Prot::Ro, false) => {}
                        (Prot::None, false) => ok_allowed &= !b.told,
                        (Prot::Ro | Prot::None, true) => {
                            ok_allowed = false;
                            if !b.told {
                                refusable = Some(*id);
                            }
                        }
                    }
                    // How it may fail: by any protection the mirror may
                    // believe (widened untold, it may keep the narrower
                    // access it had).
                    for &p in &b.history {
                        match (p, write) {
                            (Prot::Rw, _) | (Prot::Ro, false) => {}
                            (Prot::Ro, true) => f(AccessError::ReadOnly),
                            (Prot::None, false) => f(AccessError::NoAccess),
                            (Prot::None, true) => {
                                f(AccessError::NoAccess);
                                f(AccessError::ReadOnly);
                            }
                        }
                    }
                }
                Arg::Freed(_) | Arg::Never(_) | Arg::Kernel(_) | Arg::Null(_) => {
                    ok_allowed = false;
                    f(AccessError::Unmapped);
                }
            }
        }
        if n == 0 {
            ok_allowed = true;
            faults.clear();
            refusable = None;
        }
        // A refusal pending on memory that still refuses: reported again,
        // before anything runs.
        let refusing = self.pending.as_ref().and_then(|p| {
            let b = self.buf(p.id);
            (b.prot != Prot::Rw).then(|| b.range())
        });
        let pending_ready = self.pending.is_some() && refusing.is_none();
        let pend_certain = self.pending.as_ref().is_some_and(|p| p.certain);

        // The values the kernel would write, if both arguments are aligned
        // buffers.
        let new: Option<Vec<u32>> = match (&inp, &out) {
            (Arg::Buf { id, off, .. }, Arg::Buf { off: ooff, .. })
                if off % 4 == 0 && ooff % 4 == 0 =>
            {
                let b = self.buf(*id);
                let w0 = (off / 4) as usize;
                Some(
                    (0..n)
                        .map(|i| mix(key, i, b.shadow[w0 + i as usize]))
                        .collect(),
                )
            }
            _ => None,
        };

        self.c.launches += 1;
        self.c.n_max = self.c.n_max.max(n);
        let words = [inp.addr(), out.addr(), u64::from(key)];
        let (mirror, kernel) = (&self.mirror, &self.kernel);
        let res =
            catch_unwind(AssertUnwindSafe(|| mirror.launch(kernel, n, words))).map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                format!("launch panicked: {msg}")
            })?;

        let inside = |a: u64, s: u64, l: u64| a.wrapping_sub(s) < l;
        let fail = |why: String| -> Result<(), Fail> { Err(why) };
        let mut refused_now = false;
        let mut refused_pending = false;
        match (&res, refusing) {
            (Err(MirrorError::WriteBackRefused { addr }), Some((s, l)))
                if pend_certain && inside(addr.0, s, l) =>
            {
                // Nothing ran: everything must be unchanged.
                self.check_unchanged(&inp)?;
                self.check_unchanged(&out)?;
                *self.c.errors.entry("WriteBackRefused (pending)".into()).or_default() += 1;
                return Ok(());
            }
            (Err(MirrorError::WriteBackRefused { addr }), Some((s, l))) if inside(addr.0, s, l) => {
                // The refusal that may have been kept is reported now.
                refused_pending = true;
            }
            (r, Some(_)) if pend_certain => {
                return fail(format!(
                    "a refused write-back is pending on read-only memory; expected WriteBackRefused naming it, got {r:?}"
                ))
            }
            (Ok(_), _) if !ok_allowed => {
                return fail(format!(
                    "Ok, but the case allows only {faults:?}{}",
                    if refusable.is_some() { " or WriteBackRefused" } else { "" }
                ))
            }
            (Ok(_), _) => {}
            (Err(MirrorError::DeviceFault { addr, write, reason }), _)
                if faults
                    .iter()
                    .any(|&(r, w, s, l)| r == *reason && w == *write && inside(addr.0, s, l)) => {}
            (Err(MirrorError::WriteBackRefused { addr }), _)
                if refusable.is_some_and(|id| {
                    let (s, l) = self.buf(id).range();
                    inside(addr.0, s, l)
                }) =>
            {
                refused_now = true;
            }
            (Err(e), _) => {
                return fail(format!(
                    "unexpected error {e:?} ({e}); the case allows {}{faults:?}{}",
                    if ok_allowed { "Ok, " } else { "" },
                    if refusable.is_some() { " or WriteBackRefused" } else { "" }
                ))
            }
        }
        if refusing.is_some() && !pend_certain {
            if refused_pending {
                self.pending.as_mut().expect("pending").certain = true;
            } else {
                // Not reported: the device kept nothing.
                self.pending = None;
            }
        }
        match &res {
            Ok(_) => self.c.ok += 1,
            Err(e) => *self.c.errors.entry(err_name(e)).or_default() += 1,
        }
        let ok = res.is_ok();

        // The output: new values where the launch succeeded; old or new
        // where it failed (completed invocations' writes may have landed).
        if let Arg::Buf { id, off, .. } = &out {
            let (id, w0) = (*id, (*off / 4) as usize);
            let aligned = off % 4 == 0;
            let b = self.buf(id);
            let writable = b.prot == Prot::Rw;
            if b.prot != Prot::None {
                for j in 0..b.words {
                    let got = b.read(j);
                    let old = b.shadow[j];
                    let in_out = aligned && n > 0 && (w0..w0 + n as usize).contains(&j);
                    let want = new.as_ref().filter(|_| in_out).map(|v| v[j - w0]);
                    let good = if ok && in_out {
                        Some(got) == want
                    } else if in_out && writable {
                        got == old || Some(got) == want
                    } else {
                        got == old
                    };
                    if !good {
                        return fail(format!(
                            "{} output word {j} ({:#x}) of {}: CPU holds {got:#x}, expected {}{}",
                            if ok { "Ok, but" } else { "after the error," },
                            b.addr + j as u64 * 4,
                            b.describe(),
                            match want {
                                Some(w) if ok => format!("{w:#x}"),
                                Some(w) => format!("{old:#x} or {w:#x}"),
                                None => format!("{old:#x} (unchanged)"),
                            },
                            if let Err(e) = &res {
                                format!(" ({e})")
                            } else {
                                String::new()
                            }
                        ));
                    }
                }
                let b = self.buf_mut(id);
                for j in 0..b.words {
                    b.shadow[j] = b.read(j);
                }
            }
            let fault = matches!(res, Err(MirrorError::DeviceFault { .. }));
            if refused_now || (fault && refusable == Some(id) && aligned) {
                let old = self.buf(id).shadow[w0..w0 + n as usize].to_vec();
                self.pending = Some(Pending {
                    id,
                    certain: refused_now,
                    w0,
                    old,
                    new: new.clone().filter(|_| aligned),
                });
            }
        }
        // The input, unless it is the output.
        if !matches!((&inp, &out), (Arg::Buf { id: a, .. }, Arg::Buf { id: b, .. }) if a == b) {
            self.check_unchanged(&inp)?;
        }
        // One other buffer.
        if !self.bufs.is_empty() {
            let i = self.rng.random_range(0..self.bufs.len());
            let id = self.bufs[i].id;
            let involved = [&inp, &out]
                .iter()
                .any(|a| matches!(a, Arg::Buf { id: x, .. } if *x == id));
            if !involved && self.pending.as_ref().is_none_or(|p| p.id != id) {
                self.check_unchanged(&Arg::Buf {
                    id,
                    addr: 0,
                    off: 0,
                })?;
            }
        }
        if pending_ready {
            self.settle_pending("the next launch after widening")?;
        }
        self.recover = !ok;
        Ok(())
    }

    /// Every readable word of the buffer `a` names equals its shadow.
    fn check_unchanged(&self, a: &Arg) -> Result<(), Fail> {
        let Arg::Buf { id, .. } = a else {
            return Ok(());
        };
        if self.pending.as_ref().is_some_and(|p| p.id == *id) {
            // Checked when it settles.
            return Ok(());
        }
        let b = self.buf(*id);
        if b.prot == Prot::None {
            return Ok(());
        }
        for j in 0..b.words {
            let got = b.read(j);
            if got != b.shadow[j] {
                return Err(format!(
                    "word {j} ({:#x}) of {} changed: CPU holds {got:#x}, expected {:#x} (the launch did not write it)",
                    b.addr + j as u64 * 4,
                    b.describe(),
                    b.shadow[j]
                ));
            }
        }
        Ok(())
    }

    /// The pending buffer is writable again and the mirror has had its
    /// chance to write the kept data: the CPU must hold it.
    fn settle_pending(&mut self, when: &str) -> Result<(), Fail> {
        let p = self.pending.take().expect("pending");
        let b = self.buf(p.id);
        let range = p.w0..p.w0 + p.old.len();
        for j in (0..b.words).filter(|j| !range.contains(j)) {
            let got = b.read(j);
            if got != b.shadow[j] {
                return Err(format!(
                    "after {when}: word {j} ({:#x}) of {} holds {got:#x}, expected {:#x} (outside the refused write)",
                    b.addr + j as u64 * 4,
                    b.describe(),
                    b.shadow[j]
                ));
            }
        }
        // Each word of the refused output: the device's write (kept and
        // now delivered) or the old value (an invocation that had not run
        // when the launch ended) — nothing else.
        let mut delivered = false;
        for j in range.clone() {
            let (got, old) = (b.read(j), p.old[j - p.w0]);
            let new = p.new.as_ref().map(|v| v[j - p.w0]);
            delivered |= Some(got) == new && got != old;
            if got != old && Some(got) != new {
                return Err(format!(
                    "after {when}: word {j} ({:#x}) of the refused write to {} holds {got:#x}: neither the old {old:#x} nor the device's {:?}; the mirror {} the refusal",
                    b.addr + j as u64 * 4,
                    b.describe(),
                    new.map(|v| format!("{v:#x}")),
                    if p.certain { "reported" } else { "had not reported" }
                ));
            }
        }
        if p.certain && p.new.is_some() && !delivered {
            // Reported as kept: some page of it must have arrived.
            return Err(format!(
                "after {when}: the write-back refused (and reported as kept) to {} never arrived: the CPU holds the old values",
                b.describe()
            ));
        }
        let b = self.buf_mut(p.id);
        for j in 0..b.words {
            b.shadow[j] = b.read(j);
        }
        Ok(())
    }

    /// Frees everything and checks that the mirror let go of it all.
    fn teardown(&mut self) -> Result<(), Fail> {
        while !self.bufs.is_empty() {
            self.free(self.bufs.len() - 1);
        }
        // Vec memory went back to malloc, still mapped: drop what the
        // device holds of it explicitly.
        for r in self.mirror.regions() {
            self.mirror.host().space().invalidate(r, EventKind::Clear);
        }
        let t0 = Instant::now();
        let busy = |st: hmm::MirrorStats| st.pool_used != 0 || st.mapped_pages != 0;
        while busy(self.mirror.stats()) && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let released = self.mirror.flush_releases();
        let st = self.mirror.stats();
        println!(
            "teardown: pool slots used {} of {}, device page-table entries {}, regions left {}, releases flushed {released}",
            st.pool_used,
            st.pool_capacity,
            st.mapped_pages,
            self.mirror.regions().len()
        );
        if st.pool_used != 0 || st.mapped_pages != 0 || !released {
            return Err("pool slots or page-table entries left after everything was freed".into());
        }
        Ok(())
    }
}

/// Resident set size in bytes (`/proc/self/statm`).
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * PAGE
}

fn main() -> ExitCode {
    let o = Opts::parse();
    let seed = o.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ u64::from(std::process::id()).rotate_left(32)
    });
    let driver: Driver = match o.backend.parse() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let duration = match (o.duration, o.cases) {
        (None, None) => Some(10),
        (d, _) => d,
    };
    let flags = format!(
        "--backend {}{}",
        o.backend,
        if o.zero_copy { " --zero-copy" } else { "" },
    );
    println!("hmm-fuzz: seed {seed} (replay: --seed {seed} {flags})");
    install_signal_handlers();
    let opened = if o.zero_copy {
        // SAFETY: zero-copy mode's contract: the fuzzer is one thread, so
        // nothing is unmapped or written while a launch runs, and every
        // `mprotect` is followed by `protection_changed` before the next
        // launch (`Fuzz::protect`).
        unsafe { Device::open_zero_copy(Some(driver)) }
    } else {
        Device::open(Some(driver))
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            println!("hmm-fuzz: FAIL: cannot open {}: {e}", o.backend);
            return ExitCode::FAILURE;
        }
    };
    println!("{}", opened.note);
    let cfg = MirrorConfig {
        pool_slots: o.pool,
        ..MirrorConfig::default()
    };
    let mirror = match hmm::mirror(opened.device, cfg) {
        Ok(m) => m,
        Err(e) => {
            println!("hmm-fuzz: FAIL: mirror: {e}");
            return ExitCode::FAILURE;
        }
    };
    trace_monitor_if_asked();
    println!("max_invocations: {}", mirror.max_invocations());
    let kernel = match mirror.backend().kernel(&FUZZ) {
        Ok(k) => k.into_kernel(),
        Err(e) => {
            println!("hmm-fuzz: FAIL: kernel: {e}");
            return ExitCode::FAILURE;
        }
    };
    let max_n = o
        .max_n
        .unwrap_or(if driver == Driver::Cpu {
            1 << 18
        } else {
            1 << 15
        })
        .max(1);
    let mut f = Fuzz {
        rng: XorShiftRng::seed_from_u64(seed),
        mirror,
        kernel,
        zero_copy: o.zero_copy,
        max_n,
        bufs: Vec::new(),
        next_id: 0,
        freed: Vec::new(),
        pending: None,
        recover: false,
        desc: String::new(),
        c: Counts::default(),
        verbose: o.verbose,
    };

    // Watchdog: a case running past --hang seconds is a hang.
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let hang = Duration::from_secs(o.hang);
    {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let start = CASE_T0.load(Ordering::Acquire);
                let now = t0.elapsed().as_millis() as u64;
                if start != 0 && now.saturating_sub(start) > hang.as_millis() as u64 {
                    let mut buf = [0u8; CASE_CAP];
                    let n = case_bytes(&mut buf);
                    println!(
                        "hmm-fuzz: FAIL: hang: a case ran past {} s: {}\nhmm-fuzz: seed {seed}",
                        hang.as_secs(),
                        String::from_utf8_lossy(&buf[..n])
                    );
                    std::process::exit(3);
                }
            }
        });
    }

    let end = duration.map(|d| t0 + Duration::from_secs(d));
    let warm_at = duration.map_or(Duration::from_secs(1), |d| Duration::from_secs(d) / 10);
    let mut rss_warm: Option<u64> = None;
    let mut last_print = Instant::now();
    let mut result: Result<(), Fail> = Ok(());
    let mut k = 0u64;
    while end.is_none_or(|e| Instant::now() < e) && o.cases.is_none_or(|c| k < c) {
        CASE_T0.store(t0.elapsed().as_millis().max(1) as u64, Ordering::Release);
        let r = catch_unwind(AssertUnwindSafe(|| f.case(k)))
            .unwrap_or_else(|_| Err("panicked (message above)".into()));
        CASE_T0.store(0, Ordering::Release);
        f.c.cases += 1;
        k += 1;
        if let Err(e) = r {
            result = Err(format!("{e}\n  in {}", f.desc));
            break;
        }
        if rss_warm.is_none() && t0.elapsed() >= warm_at {
            rss_warm = Some(rss());
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "[{:>4.0} s] cases {:>7}  launches ok {:>7} err {:>6}  buffers {:>3}  rss {} MiB",
                t0.elapsed().as_secs_f64(),
                f.c.cases,
                f.c.ok,
                f.c.launches - f.c.ok,
                f.bufs.len(),
                rss() >> 20
            );
        }
    }
    let elapsed = t0.elapsed();
    // Leak: RSS growth since the warm-up, with every buffer still live
    // counted in the bound.
    let rss_end = rss();
    let live_bytes: u64 = f.bufs.iter().map(|b| b.map_len()).sum();
    let bound = (64 << 20) + u64::from(o.pool) * PAGE + live_bytes;
    if result.is_ok() {
        result = f.teardown();
    }
    done.store(true, Ordering::Relaxed);
    println!(
        "---- hmm-fuzz results ({:.1} s) ----",
        elapsed.as_secs_f64()
    );
    println!(
        "cases {}  launches {}  ok {}  largest n {}",
        f.c.cases, f.c.launches, f.c.ok, f.c.n_max
    );
    println!("typed errors: {:?}", f.c.errors);
    println!("host operations: {:?}", f.c.ops);
    if let Some(w) = rss_warm {
        let grew = rss_end.saturating_sub(w);
        println!(
            "rss: {} MiB after warm-up, {} MiB at the end (growth {} MiB, bound {} MiB)",
            w >> 20,
            rss_end >> 20,
            grew >> 20,
            bound >> 20
        );
        if grew > bound && result.is_ok() {
            result = Err(format!("rss grew {} MiB, past the bound", grew >> 20));
        }
    }
    match result {
        Ok(()) => {
            println!("hmm-fuzz: PASS (seed {seed})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "hmm-fuzz: FAIL: {e}\nhmm-fuzz: seed {seed}, case {} (replay: --seed {seed} --cases {} {flags} --verbose)",
                f.c.cases - 1,
                f.c.cases,
            );
            ExitCode::FAILURE
        }
    }
}
