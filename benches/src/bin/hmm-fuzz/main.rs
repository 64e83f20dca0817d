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

mod crash;
mod host;
mod launch;

use crash::*;
use host::*;

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
