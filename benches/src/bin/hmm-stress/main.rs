//! `hmm-stress`: the stress / soak harness (issue #8).
//!
//! Everything at once, on one mirror over one arena of anonymous memory:
//!
//! - **launchers** run the `CopyU32` test kernel over random page ranges of
//!   the arena into private output buffers and check every word the device
//!   read;
//! - **writers** rewrite whole arena pages on the CPU, each write stamping
//!   a new version;
//! - a **remapper** unmaps chunks of the arena (by mapping an inaccessible
//!   placeholder over them with `MAP_FIXED`, which unmaps the old pages as
//!   `munmap` would, without leaving a hole another thread's `mmap` could
//!   take) and `mmap`s fresh memory at the same addresses, or
//!   `madvise(MADV_DONTNEED)`s them (the CPU then holds zeros), and
//!   re-stamps them;
//! - a **prefetcher** prefetches random ranges;
//! - a **watchdog** ends the run (exit 2) if no operation completes for
//!   `--stall` seconds (a deadlock).
//!
//! # The invariant (checked on every word every device launch read)
//!
//! Each arena word holds its page's *stamp*, a per-page `u32` that only
//! grows: a CPU write stores `stamp + 1` in every word of the page, then
//! publishes it; an unmap/remap or `DONTNEED` first publishes a *floor* —
//! the start of a new generation, above every stamp the old memory held —
//! and then fills the new memory with it. Before a launch, the launcher
//! records per page `floor = max(stamp, generation floor)`, which the CPU
//! held (fully written) before the launch's sync point; after the launch it
//! reads the stamps again. A device read `v` of a page is correct iff
//!
//! - `floor ≤ v ≤ stamp after the launch` — a value the CPU held at or
//!   after the sync point, never one from before a rewrite, unmap, remap or
//!   `DONTNEED` that completed before the launch; or
//! - `v == 0` while that page was being remapped / `DONTNEED`ed during the
//!   launch (fresh memory reads as zeros before it is re-stamped).
//!
//! A launch may also end with a typed `DeviceFault` if part of its range was
//! unmapped while it ran; any other error is reported (and fails the run
//! unless it is a bounded retry timeout under contention).
//!
//! At the end the arena and the outputs are unmapped, and the harness
//! checks: every pool slot free, every page-table entry gone, every region
//! released, every subscription gone once the mirror is dropped, and the
//! process back to the threads it had before. Exit status 0 only if there
//! were no violations and every check held.
//!
//! The inner function is generic over [`TestKernels`], so a GPU driver is
//! one more arm in `main`'s match on `--backend`.
//!
//! # `--inject-faults` (cpu driver)
//!
//! An injector thread makes the device fail, one failure at a time, on the
//! calls the mirror's state depends on — page-table writes (with a random
//! part of the failed batch applied: a failed call is "unknown", not
//! "nothing happened"), entry reads and bit clears, launches, and in
//! zero-copy mode window binds and unbinds — waiting for each to be hit
//! before arming the next. Launches and prefetches may then end with the
//! injected error (typed, counted); everything else must hold as without
//! injection: no stale read, no other error, nothing left at the end. A
//! run that injected nothing fails.
//!
//! # `--hash-writes`
//!
//! Copy mode with `CpuWrites::Hash`: nothing is write-protected, and CPU
//! writes are found by re-hashing every device-resident page at each
//! sync point. The invariant is unchanged.
//!
//! # `--migrate`
//!
//! A **migrator** thread migrates random ranges of the arena to the device
//! (`Mirror::migrate_to_device`, or a third of the time
//! `Mirror::make_exclusive`: the device then holds the only copy) and
//! now and then brings one back (`Mirror::migrate_to_host`). Everything
//! else goes on as before: writers touch migrated pages (each touch waits
//! while the mirror gives the page back), the remapper unmaps and discards
//! them (their data is gone, as on the CPU), launches read them. The
//! invariant is unchanged — a page whose only copy was lost would read as
//! zeros outside a remap, a violation. The migrator holds the chunk locks
//! of what it migrates, so the remapper does not unmap memory while it is
//! being migrated (the README's migration section says why that race is
//! the program's); a migration of memory already remapped ends with a
//! typed error (counted). The end-of-run checks are those of every run:
//! nothing is left on the device.
//!
//! # `--zero-copy`
//!
//! # `--shared`
//!
//! The arena is a memfd mapped `MAP_SHARED`, and a CPU write goes, at
//! random, through the arena or through a second mapping of the same memfd
//! (an *alias*, which the mirror does not watch: such a write is what
//! another process writing shared memory, or `pwrite()` to a file, looks
//! like — no write-tracking event). The mirror's foreign-writer check
//! (`ForeignWriters::Check`, the default) must make the device see them at
//! the next launch: the invariant is unchanged. Remaps of a shared arena
//! punch a hole in the memfd (`MADV_REMOVE` for the in-place variant;
//! unmap, `fallocate(PUNCH_HOLE)`, `mmap` again for the other), so the
//! new memory reads as zeros, as fresh anonymous memory does.
//!
//! Runs the same on a zero-copy device (`cpu`, `vulkan`), whose kernels
//! read the arena's own pages, within that mode's contract: the remapper
//! unmaps only while it holds the *unmap gate* exclusively and every
//! launch holds it shared (an unmap during a launch would fault the
//! process on a device that runs on the CPU); `MADV_DONTNEED` needs no
//! gate (the memory stays mapped and reads as zeros); CPU writers store
//! with atomics (the cpu driver's device reads words atomically, so there
//! is no data race). The invariant is unchanged.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hmm_conformance::{TestKernel, TestKernels, TestMap};
use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::{Mirror, MirrorConfig, MirrorError};
use hmm_core::{VaRange, VirtAddr};
use hmm_driver_cpu::{Applied, Call, FaultInjector};

mod arena;
mod launcher;

use arena::{add, Arena, Counts, Rng};
use launcher::launcher;

const PAGE: usize = 4096;
const WPP: usize = PAGE / 4;
/// Stamps per generation: a remap moves a page's stamp to the next multiple.
const GEN: u32 = 1 << 12;
/// What `--poison-out` fills output words with (above any stamp a run
/// reaches).
const SENTINEL: u32 = 0xFFFF_FFFE;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "hmm-stress",
    about = "hmm-rs stress/soak harness: launches, CPU writes, unmap/remap/DONTNEED and prefetch at once"
)]
struct Opts {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Launcher threads (writers: the same number; plus one remapper and
    /// one prefetcher).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the random choices (each thread derives its own).
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Arena size in 4 KiB pages.
    #[arg(long, default_value_t = 256)]
    pages: usize,
    /// Pages per remap chunk.
    #[arg(long, default_value_t = 4)]
    chunk: usize,
    /// Device pool slots (smaller than the working set forces eviction).
    #[arg(long, default_value_t = 192)]
    pool: u32,
    /// Most arena pages one launch reads (each also writes as many output
    /// pages); default a quarter of the pool, at most 64. More than a
    /// quarter of the pool oversubscribes it within one launch, so
    /// fault-service rounds evict pages of the same launch (and leave
    /// invocations for later rounds) while the other threads write, remap
    /// and discard.
    #[arg(long)]
    launch_pages: Option<usize>,
    /// Seconds without any completed operation before the watchdog calls
    /// it a deadlock.
    #[arg(long, default_value_t = 20)]
    stall: u64,
    /// Backend: `cpu`, `wgpu` or `vulkan` (any adapter; lavapipe counts).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Run the device in zero-copy mode (cpu, vulkan; see the module docs
    /// for how the harness keeps that mode's contract).
    #[arg(long)]
    zero_copy: bool,
    /// cpu driver only: inject device failures, one at a time (see the
    /// module docs).
    #[arg(long)]
    inject_faults: bool,
    /// The arena is a memfd mapped `MAP_SHARED`, and half the CPU writes go
    /// through a second mapping of it — writes write tracking cannot see,
    /// which the mirror's foreign-writer hash check must catch (see the
    /// module docs).
    #[arg(long)]
    shared: bool,
    /// Fetch policy: `adaptive` (the default here, on every driver:
    /// speculated and refreshed pages are mirrored, tracked and invalidated
    /// like any other, and this is where that is checked),
    /// `adaptive-no-refresh` (speculation without the ping-pong refresh) or
    /// `exact` (only the pages that faulted).
    #[arg(long, default_value = "adaptive", value_parser = ["adaptive", "adaptive-no-refresh", "exact"])]
    policy: String,
    /// Copy mode learns of CPU writes by hashing every resident page at
    /// sync points (`CpuWrites::Hash`, the THP-preserving opt-out) instead
    /// of write-protecting them.
    #[arg(long)]
    hash_writes: bool,
    /// Before each launch, the launcher fills the output words it is about
    /// to use with a sentinel (`0xFFFF_FFFE`): a word the launch did not
    /// bring back to the CPU then reads as the sentinel instead of an
    /// earlier launch's value (a diagnostic: it tells a lost write-back
    /// from a wrong device read; the output pages then fault every launch).
    #[arg(long)]
    poison_out: bool,
    /// A migrator thread migrates random arena ranges to the device and
    /// back (see the module docs).
    #[arg(long)]
    migrate: bool,
}

fn main() -> ExitCode {
    let o = Opts::parse();
    if o.pages == 0 || o.chunk == 0 || o.pages % o.chunk != 0 || o.threads == 0 {
        eprintln!("error: --pages must be a positive multiple of --chunk, --threads positive");
        return ExitCode::FAILURE;
    }
    if o.inject_faults && o.backend != "cpu" {
        eprintln!("error: --inject-faults needs --backend cpu (the driver with injection hooks)");
        return ExitCode::FAILURE;
    }
    let threads_before = thread_count();
    let cpu = |zero_copy: bool| {
        let dev = hmm_driver_cpu::CpuDevice::with_threads(2);
        let dev = if zero_copy {
            // SAFETY: the harness keeps zero-copy mode's contract — it
            // unmaps only under the exclusive unmap gate that every launch
            // holds shared, writes with atomic stores, never `mprotect`s
            // (see the module docs).
            unsafe { dev.zero_copy() }
        } else {
            dev
        };
        let inj = o.inject_faults.then(|| dev.faults());
        (dev, inj)
    };
    let res = match (o.backend.as_str(), o.zero_copy) {
        ("cpu", zc) => {
            let (dev, inj) = cpu(zc);
            stress_injected(&o, || Ok(dev), inj)
        }
        ("vulkan", true) => stress(&o, || {
            // SAFETY: as for the cpu arm.
            unsafe { hmm_driver_vulkan::VulkanDevice::open_zero_copy() }
                .map_err(|e| format!("no zero-copy vulkan device: {e}"))
        }),
        (other, true) => {
            eprintln!("error: --zero-copy needs --backend cpu or vulkan, not {other:?}");
            return ExitCode::FAILURE;
        }
        ("wgpu", false) => stress(&o, || {
            hmm_driver_wgpu::WgpuDevice::open().map_err(|e| format!("no wgpu device: {e}"))
        }),
        ("vulkan", false) => stress(&o, || {
            hmm_driver_vulkan::VulkanDevice::open().map_err(|e| format!("no vulkan device: {e}"))
        }),
        (other, false) => {
            eprintln!("error: unknown backend {other:?} (built: cpu, wgpu, vulkan)");
            return ExitCode::FAILURE;
        }
    };
    let threads_after = thread_count();
    println!("threads: {threads_before} before, {threads_after} after");
    match res {
        Ok(()) if threads_after <= threads_before => {
            println!("hmm-stress: PASS");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            println!("hmm-stress: FAIL: threads left behind");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("hmm-stress: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Threads of this process (`/proc/self/task`).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Counts a worker thread out when it ends (normally or by panic).
struct Live<'a>(&'a AtomicUsize);
impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn stress<B: TestKernels>(
    o: &Opts,
    make: impl FnOnce() -> Result<B, String>,
) -> Result<(), String> {
    stress_injected(o, make, None)
}

/// The calls the injector fails, one at a time.
fn injected_calls(zero_copy: bool) -> &'static [Call] {
    if zero_copy {
        &[
            Call::WritePtes,
            Call::Launch,
            Call::BindWindow,
            Call::UnbindWindow,
        ]
    } else {
        &[
            Call::WritePtes,
            Call::ReadPtes,
            Call::ClearPteBits,
            Call::Launch,
        ]
    }
}

/// The injector thread: arms one failure, waits until a call hit it,
/// pauses, arms the next.
fn injector(a: &Arena, inj: &FaultInjector, seed: u64) {
    let mut rng = Rng::new(seed, 5);
    let calls = injected_calls(a.zero_copy);
    inj.set_applied(Call::WritePtes, Applied::RandomPrefix);
    while !a.stop.load(Ordering::Relaxed) {
        let call = calls[rng.below(calls.len())];
        let before = inj.injected(call);
        inj.fail_next(call, 1);
        while inj.injected(call) == before && !a.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(200));
        }
        add(&a.c.ops, 1);
        std::thread::sleep(Duration::from_millis(2));
    }
    // Nothing armed is left for the end-of-run checks.
    inj.clear_all();
}

fn stress_injected<B: TestKernels>(
    o: &Opts,
    make: impl FnOnce() -> Result<B, String>,
    inject: Option<FaultInjector>,
) -> Result<(), String> {
    let host = Arc::new(HostSpace::new().map_err(|e| e.to_string())?);
    let uffd = matches!(
        host.event_source(),
        hmm_core::cpu::host::EventSource::Userfaultfd
    );
    if !uffd {
        // Without kernel events nothing tells the mirror about unmaps or CPU
        // writes; the invariant only holds with userfaultfd.
        return Err(format!(
            "userfaultfd unavailable ({:?}): the stress invariant needs kernel events",
            host.event_source()
        ));
    }
    let cfg = MirrorConfig {
        pool_slots: o.pool,
        table_pages: 256,
        cpu_writes: if o.hash_writes {
            hmm_core::mirror::CpuWrites::Hash
        } else {
            hmm_core::mirror::CpuWrites::Protect
        },
        // Adaptive on every driver unless asked (`Auto` would leave the cpu
        // driver exact).
        fetch: match o.policy.as_str() {
            "exact" => hmm_core::mirror::FetchPolicy::Exact,
            "adaptive-no-refresh" => {
                hmm_core::mirror::FetchPolicy::AdaptiveWith(hmm_core::mirror::Adaptive {
                    ping_pong_launches: 0,
                    ..hmm_core::mirror::Adaptive::default()
                })
            }
            _ => hmm_core::mirror::FetchPolicy::Adaptive,
        },
        ..MirrorConfig::default()
    };
    let m = Mirror::new(Arc::clone(&host), make()?, cfg).map_err(|e| e.to_string())?;
    println!(
        "hmm-stress: backend {}, {} s, {} launcher + {} writer threads, 1 remapper, 1 prefetcher, arena {} pages ({} per chunk), pool {} slots, {} policy, seed {:#x}",
        m.backend().info(),
        o.duration,
        o.threads,
        o.threads,
        o.pages,
        o.chunk,
        o.pool,
        o.policy,
        o.seed
    );
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let memfd = o.shared.then(|| {
        use std::os::fd::FromRawFd;
        // SAFETY: a NUL-terminated name; the descriptor is checked, then
        // owned by the `File`.
        let fd = unsafe { libc::memfd_create(c"hmm-stress".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len((o.pages * PAGE) as u64).expect("memfd size");
        f
    });
    let mut map = match &memfd {
        Some(f) => TestMap::file(f, o.pages, rw, libc::MAP_SHARED),
        None => TestMap::anon(o.pages, rw),
    };
    let alias = memfd
        .as_ref()
        .map(|f| TestMap::file(f, o.pages, rw, libc::MAP_SHARED));
    let arena = Arena {
        base: map.addr(),
        pages: o.pages,
        chunk: o.chunk,
        locks: (0..o.pages / o.chunk).map(|_| Mutex::new(())).collect(),
        stamp: (0..o.pages).map(|_| AtomicU32::new(0)).collect(),
        writing: (0..o.pages).map(|_| AtomicU32::new(0)).collect(),
        floor: (0..o.pages).map(|_| AtomicU32::new(0)).collect(),
        remaps: (0..o.pages).map(|_| AtomicU32::new(0)).collect(),
        unmap_gate: std::sync::RwLock::new(()),
        shared: memfd
            .as_ref()
            .zip(alias.as_ref())
            .map(|(f, a)| (std::os::fd::AsRawFd::as_raw_fd(f), a.addr())),
        zero_copy: o.zero_copy,
        injecting: inject.is_some(),
        poison_out: o.poison_out,
        stop: AtomicBool::new(false),
        c: Counts::default(),
    };
    for p in 0..o.pages {
        arena.stamp_page(p, GEN);
    }
    let kernel = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .map_err(|e| e.to_string())?;
    let max_pages = o
        .launch_pages
        .unwrap_or((o.pool as usize / 4).clamp(1, 64))
        .clamp(1, o.pages.max(1));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(o.duration);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    // Workers still running; the watchdog keeps watching until none is, so
    // a hang at shutdown is caught too.
    let live = AtomicUsize::new(
        2 * o.threads + 2 + usize::from(inject.is_some()) + usize::from(o.migrate),
    );
    std::thread::scope(|s| {
        let live = &live;

        let (a, m, k) = (&arena, &m, &*kernel);
        if let Some(inj) = &inject {
            let seed = o.seed;
            s.spawn(move || {
                let _live = Live(live);
                injector(a, inj, seed);
            });
        }
        for t in 0..o.threads {
            let seed = o.seed.wrapping_add(t as u64 * 7919);
            s.spawn(move || {
                let _live = Live(live);
                launcher(a, m, k, max_pages, seed)
            });
            s.spawn(move || {
                let _live = Live(live);
                let mut rng = Rng::new(seed, 2);
                while !a.stop.load(Ordering::Relaxed) {
                    a.cpu_write(&mut rng);
                    add(&a.c.ops, 1);
                    if rng.below(8) == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
        let failure = &failure;
        s.spawn(move || {
            let _live = Live(live);
            let mut rng = Rng::new(o.seed, 3);
            while !a.stop.load(Ordering::Relaxed) {
                if let Err(e) = a.remap(&mut rng) {
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    a.stop.store(true, Ordering::Relaxed);
                }
                add(&a.c.ops, 1);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        s.spawn(move || {
            let _live = Live(live);
            let mut rng = Rng::new(o.seed, 4);
            while !a.stop.load(Ordering::Relaxed) {
                let n = 1 + rng.below(8);
                let first = rng.below(a.pages - n.min(a.pages) + 1);
                let r = VaRange::from_start_len(
                    VirtAddr(a.base + (first * PAGE) as u64),
                    (n * PAGE) as u64,
                )
                .expect("arena range");
                match m.prefetch(r, false) {
                    Ok(_) => add(&a.c.prefetches, 1),
                    // Prefetching memory that is being remapped: typed.
                    Err(
                        MirrorError::DeviceFault { .. }
                        | MirrorError::RetryTimeout { .. }
                        | MirrorError::RegionReleased { .. },
                    ) => add(&a.c.prefetch_errors, 1),
                    Err(MirrorError::Backend(ref e))
                        if a.injecting && FaultInjector::is_injected(e) =>
                    {
                        add(&a.c.injected_errors, 1)
                    }
                    Err(e) => {
                        println!("UNEXPECTED prefetch error: {e}");
                        add(&a.c.unexpected, 1);
                    }
                }
                add(&a.c.ops, 1);
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        if o.migrate {
            s.spawn(move || {
                let _live = Live(live);
                let mut rng = Rng::new(o.seed, 6);
                while !a.stop.load(Ordering::Relaxed) {
                    // Whole chunks, their locks held (in ascending order,
                    // as nobody else holds more than one): a program does
                    // not unmap memory while it migrates it (the race is
                    // the program's, like a use after free; the README's
                    // migration section says what it can do).
                    let chunks = a.pages / a.chunk;
                    let nc = 1 + rng.below(4.min(chunks));
                    let c0 = rng.below(chunks - nc + 1);
                    let _held: Vec<_> = (c0..c0 + nc)
                        .map(|c| a.locks[c].lock().unwrap_or_else(|e| e.into_inner()))
                        .collect();
                    let r = VaRange::from_start_len(
                        VirtAddr(a.base + (c0 * a.chunk * PAGE) as u64),
                        (nc * a.chunk * PAGE) as u64,
                    )
                    .expect("arena range");
                    let back = rng.below(4) == 0;
                    let res = if back {
                        m.migrate_to_host(r)
                    } else if rng.below(3) == 0 {
                        // Exclusive: a CPU touch also revokes the page's
                        // device entry.
                        m.make_exclusive(r)
                    } else {
                        m.migrate_to_device(r)
                    };
                    match res {
                        Ok(_) if back => add(&a.c.migrations_back, 1),
                        Ok(_) => add(&a.c.migrations, 1),
                        // Memory being unmapped, discarded or replaced
                        // meanwhile, or a pool too busy: typed.
                        Err(
                            MirrorError::MigrationUnsupported(_)
                            | MirrorError::DeviceFault { .. }
                            | MirrorError::RetryTimeout { .. }
                            | MirrorError::RegionReleased { .. }
                            | MirrorError::PoolExhausted { .. }
                            | MirrorError::Host(_),
                        ) => add(&a.c.migration_errors, 1),
                        Err(MirrorError::Backend(ref e))
                            if a.injecting && FaultInjector::is_injected(e) =>
                        {
                            add(&a.c.injected_errors, 1)
                        }
                        Err(e) => {
                            println!("UNEXPECTED migration error: {e}");
                            add(&a.c.unexpected, 1);
                        }
                    }
                    add(&a.c.ops, 1);
                    std::thread::sleep(Duration::from_micros(300));
                }
            });
        }
        // Progress line every second + watchdog.
        s.spawn(move || {
            let mut last_ops = 0;
            let mut last_progress = Instant::now();
            let mut next = t0 + Duration::from_secs(1);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                if live.load(Ordering::SeqCst) == 0 {
                    return;
                }
                let now = Instant::now();
                if now >= deadline {
                    a.stop.store(true, Ordering::Relaxed);
                }
                let ops = a.c.ops.load(Ordering::Relaxed);
                if ops != last_ops {
                    last_ops = ops;
                    last_progress = now;
                } else if now.duration_since(last_progress) > Duration::from_secs(o.stall) {
                    println!(
                        "WATCHDOG: no operation completed for {} s — deadlock; stats: {}\nkernel events: {:?}",
                        o.stall,
                        m.stats(),
                        m.host().event_counts()
                    );
                    std::process::exit(2);
                }
                if now >= next {
                    next += Duration::from_secs(1);
                    let st = m.stats();
                    println!(
                        "[{:>4.0} s] ops {:>8}  launches {:>6}  cpu writes {:>8}  remaps {:>5}  dontneeds {:>5}  invalidations {:>7}  retries {:>5}  violations {}",
                        now.duration_since(t0).as_secs_f64(),
                        ops,
                        a.c.launches.load(Ordering::Relaxed),
                        a.c.cpu_writes.load(Ordering::Relaxed),
                        a.c.remaps.load(Ordering::Relaxed),
                        a.c.dontneeds.load(Ordering::Relaxed),
                        st.invalidations_total(),
                        st.retries,
                        a.c.violations.load(Ordering::Relaxed)
                    );
                }
            }
        });
    });
    let elapsed = t0.elapsed();
    // Teardown checks.
    drop(kernel);
    map.unmap();
    // The unmaps' invalidations run on the event thread; give them a moment.
    let settle = Instant::now();
    // (Not just the pool: a zero-copy device has none.)
    let busy = |st: hmm_core::mirror::MirrorStats| st.pool_used != 0 || st.mapped_pages != 0;
    while (busy(m.stats()) || !m.regions().is_empty()) && settle.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let released = m.flush_releases();
    let st = m.stats();
    let c = &arena.c;
    let mut problems_pre: Vec<String> = Vec::new();
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    println!(
        "---- hmm-stress results ({:.1} s) ----",
        elapsed.as_secs_f64()
    );
    println!(
        "operations: {} (launches {}, cpu page writes {}, remaps {}, dontneeds {}, prefetches {} + {} typed errors)",
        g(&c.ops),
        g(&c.launches),
        g(&c.cpu_writes),
        g(&c.remaps),
        g(&c.dontneeds),
        g(&c.prefetches),
        g(&c.prefetch_errors)
    );
    println!(
        "launches ended by a typed unmapped fault: {}, by a bounded retry under churn: {}; unexpected errors: {}",
        g(&c.launch_faults),
        g(&c.launch_timeouts),
        g(&c.unexpected)
    );
    println!(
        "invalidations: {} (unmap {}, remove {}, cpu-write {}); fault retries: {}; replays: {}; evictions: {}; speculated pages: {}; refreshed (ping-pong): {}; regions created {}, released {}, unwatched {}",
        st.invalidations_total(),
        st.invalidations[0],
        st.invalidations[1],
        st.invalidations[4],
        st.retries,
        st.replays,
        st.evictions,
        st.speculated,
        st.refreshed,
        st.regions_created,
        st.deferred_releases,
        st.unwatched_regions
    );
    if o.migrate {
        println!(
            "migration: ranges migrated {} (+ {} typed errors; a third of them exclusive), brought back explicitly {}; pages out {}, back {}, CPU fault-backs {} ({:?} in all, {} exclusive pages revoked)",
            g(&c.migrations),
            g(&c.migration_errors),
            g(&c.migrations_back),
            st.migrated_out,
            st.migrated_in,
            st.fault_backs,
            st.fault_back_time,
            st.exclusive_revoked
        );
        if g(&c.migrations) == 0 || st.fault_backs == 0 {
            problems_pre.push("--migrate: no migration, or no CPU fault-back, happened".into());
        }
    }
    if o.shared {
        println!(
            "shared arena: pages hash-checked at sync points {}, found changed by the alias writers {}",
            st.foreign_checked_pages, st.foreign_changed_pages
        );
        // In copy mode the alias writes must have been caught by the hash
        // check at least once (a run that never exercised it proves
        // nothing).
        if !o.zero_copy && g(&c.launches) > 0 && st.foreign_changed_pages == 0 {
            problems_pre.push("--shared: the foreign-writer check never found a change".into());
        }
    }
    println!(
        "words checked: {} ({} zeros accepted during a remap); violations: {}",
        g(&c.words_checked),
        g(&c.zeros_accepted),
        g(&c.violations)
    );
    if let Some(inj) = &inject {
        let per: Vec<String> = injected_calls(o.zero_copy)
            .iter()
            .map(|c| format!("{c:?} {}", inj.injected(*c)))
            .collect();
        let total: u64 = injected_calls(o.zero_copy)
            .iter()
            .map(|c| inj.injected(*c))
            .sum();
        println!(
            "injected device failures: {total} ({}); typed errors they caused: {}; device errors the mirror counted: {}",
            per.join(", "),
            g(&c.injected_errors),
            st.device_errors
        );
        if total == 0 {
            problems_pre.push("no device failure was injected".into());
        }
    }
    let mut problems = std::mem::take(&mut problems_pre);
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        problems.push(e);
    }
    if g(&c.violations) > 0 {
        problems.push(format!("{} stale reads", g(&c.violations)));
    }
    if g(&c.unexpected) > 0 {
        problems.push(format!("{} unexpected errors", g(&c.unexpected)));
    }
    if g(&c.launches) == 0 {
        problems.push("no launch ran".into());
    }
    println!(
        "at the end: pool slots used {}, page-table entries {}, live regions {}, dead regions released: {released}",
        st.pool_used,
        st.mapped_pages,
        m.regions().len()
    );
    if st.pool_used != 0 || st.mapped_pages != 0 || !m.regions().is_empty() || !released {
        problems.push("device memory or regions left after everything was unmapped".into());
    }
    drop(m);
    let subs = host.space().subscribed_ranges().len();
    println!("subscriptions after the mirror was dropped: {subs}");
    if subs != 0 {
        problems.push(format!("{subs} subscriptions left"));
    }
    drop(host);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
