//! Crash and hang diagnostics: which case was running when a signal
//! arrived, and (`HMM_FUZZ_TRACE_MONITOR_ALLOC=1`) who allocates on the
//! userfaultfd monitor thread.

use super::*;

// ---- `HMM_FUZZ_TRACE_MONITOR_ALLOC=1`: who allocates on the uffd monitor ----

/// A thread that `free()`s can hold a malloc arena lock while glibc trims a
/// watched heap (`brk`), waiting for the userfaultfd monitor to read the
/// event; if the monitor thread allocates meanwhile, both wait forever (see
/// `hmm_core::cpu::monitor`, "Rules for sinks"). With the variable set,
/// the first allocations made on the monitor thread print a backtrace.
pub(crate) struct TracingAlloc;

/// The monitor thread's id (0: not tracing).
pub(crate) static MONITOR_TID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
pub(crate) static TRACED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(crate) fn trace_alloc(size: usize) {
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
pub(crate) static ALLOC: TracingAlloc = TracingAlloc;

/// Starts tracing the monitor thread (found by name) if asked to.
pub(crate) fn trace_monitor_if_asked() {
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

pub(crate) const CASE_CAP: usize = 2048;
pub(crate) static CASE_BUF: [AtomicU8; CASE_CAP] = [const { AtomicU8::new(0) }; CASE_CAP];
pub(crate) static CASE_LEN: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds since the start at which the running case began (0: none).
pub(crate) static CASE_T0: AtomicU64 = AtomicU64::new(0);

pub(crate) fn set_case(s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(CASE_CAP);
    CASE_LEN.store(0, Ordering::Release);
    for (slot, &v) in CASE_BUF.iter().zip(&b[..n]) {
        slot.store(v, Ordering::Relaxed);
    }
    CASE_LEN.store(n, Ordering::Release);
}

/// The case text, as the signal handler and the watchdog see it.
pub(crate) fn case_bytes(out: &mut [u8; CASE_CAP]) -> usize {
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

pub(crate) fn install_signal_handlers() {
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
