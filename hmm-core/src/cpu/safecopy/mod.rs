//! Fault-recoverable copies between the application's memory and ours.
//!
//! The mirror copies pages the application may unmap (or truncate, or
//! poison) at any moment: a page `range_fault` saw present a microsecond ago
//! can be gone when the copy reaches it, because the kernel reports an
//! unmap to userspace only *after* it happened. A plain `memcpy` would take
//! SIGSEGV (or SIGBUS for a truncated file) and kill the process. The old
//! answer was to copy inside the kernel with `process_vm_readv` /
//! `process_vm_writev` on our own pid, which turns a missing page into
//! `EFAULT`; it costs a fixed ~1 µs per call plus pinning every page, about
//! 30 % of `memcpy` throughput (`/work/shared/perf-lab`, gap A).
//!
//! # The technique: an exception table
//!
//! This is what Linux itself does for `copy_from_user` / `copy_to_user`
//! (`arch/x86/lib/copy_user_64.S`, `arch/x86/mm/extable.c`): the copy is one
//! `rep movsb` whose address is listed in an *exception table* together
//! with a *fixup* address. When the instruction faults, the fault handler
//! finds the faulting instruction pointer in the table, rewrites it to the
//! fixup, and returns; the fixup turns the registers `rep movsb` left behind
//! (`rcx` = bytes not copied) into the return value. Wasmtime does the same
//! in userspace for WebAssembly's trapping loads (a SIGSEGV handler that
//! looks the PC up in the compiled module's trap table and redirects it),
//! as does HotSpot for implicit null checks.
//!
//! Here:
//!
//! - the copy routines are written in assembly (`global_asm!`) so that the
//!   only instruction that touches memory is the `rep movsb` and nothing
//!   else is live across it: no stack frame, no spilled registers, no
//!   lock. Resuming at the fixup is therefore always sound. There is one
//!   routine per direction: [`Recoverable::copy_in`] (the application's
//!   memory is the source, `rsi`) and [`Recoverable::copy_out`] (it is the
//!   destination, `rdi`). Each returns `(bytes not copied, code)` in
//!   `rax:rdx`. Reads of 256 KiB and more into populated memory take a
//!   *streaming* variant of `copy_in` (memory the copy itself faults in
//!   keeps `rep movsb`: the kernel zeroed it moments ago, so its lines are
//!   in cache): a loop of four 16-byte loads and four non-temporal
//!   `movntdq` stores per 64 bytes, as glibc's `memcpy` does for long
//!   copies (`rep movsb` ran at 61–72 % of `memcpy` at 256 MiB on this
//!   project's VM; with the streaming loop a 1 GiB prefetch went from
//!   53–57 % to 73–74 % of `memcpy`, README "Issue 15"). Only its loads
//!   touch the application's memory, and at each of them `rsi` is the
//!   start of the 64-byte block being loaded and `rcx` the bytes not yet
//!   stored, the same contract as `rep movsb`'s registers, so the recovery
//!   rule below covers it unchanged; a fault inside a block is then
//!   narrowed to the exact byte by the byte-exact retry described at
//!   `x86_64::copy`.
//! - **Reads copy every aligned word whole.** Other reads whose length is a
//!   multiple of 128 with both operands 16-byte aligned (every page the
//!   mirror copies in) take a third variant of `copy_in`: eight aligned
//!   16-byte `movdqa` loads and stores per 128 bytes, each load one access
//!   that never splits an aligned 8-byte word. A page the application
//!   stores to, or discards, while it is copied then arrives with each
//!   aligned 4- or 8-byte word as it was before or after the change — what
//!   a device reading the page itself would see. `rep movsb` promises no
//!   such thing (its elements are bytes). `hmm-stress` with a small arena
//!   read words torn between old bytes and zeros on the GPU drivers (about
//!   1 run in 10 on wgpu even after the mirror learnt to wait for pending
//!   invalidations before each submission; 0 of 40 with this routine);
//!   a direct test (`tests/safecopy.rs`) could not make `rep movsb` tear
//!   on this project's VM, so which access tore is not pinned down — the
//!   routine is chosen for what it guarantees. Cost, same VM: a hot 4 KiB
//!   page at about 50 GB/s against 65–77 with `rep movsb` (about 0.03 µs
//!   more per page), equal from 64 KiB. The streaming variant's 16-byte
//!   loads never split an aligned word of a 4-byte aligned source either.
//!   The `process_vm_readv` fallback gives no such guarantee (the kernel's
//!   copy is its own).
//! - a `SIGSEGV`/`SIGBUS` handler (`sigaction`, `SA_SIGINFO | SA_ONSTACK`)
//!   recovers a fault **only** when all of these hold (the *recovery
//!   rule*):
//!   1. `si_code > 0`: the kernel raised it for a real fault (not `kill`,
//!      `tgkill` or `sigqueue`, whose codes are ≤ 0);
//!   2. the interrupted instruction pointer (`uc_mcontext.gregs[REG_RIP]`)
//!      lies in `[begin, end)` of an exception-table entry, i.e. *is* one of
//!      our `rep movsb`;
//!   3. the faulting address `si_addr` lies in what is left of the
//!      application-side range of that copy: with `cur` = `rsi` (for
//!      `copy_in`) or `rdi` (for `copy_out`) and `left` = `rcx` as the
//!      ucontext holds them at the fault, `cur <= si_addr < cur + left`.
//!      `rep movsb` updates `rsi`, `rdi` and `rcx` as it goes, so the
//!      registers are the copy's exact progress and no per-thread state is
//!      needed. For a hardware memory error (`BUS_MCEERR_AR`/`AO`) the
//!      kernel reports the poisoned unit `[si_addr, si_addr + 2^si_addr_lsb)`
//!      instead of a byte; it must overlap `[cur, cur + left)`.
//!
//!   A fault on the *other* side of the copy (our own staging buffer or
//!   pool slot) fails rule 3 and is not recovered: that would be a bug in
//!   this crate, and it crashes like any wild access. A recovered fault
//!   sets `rip` to the entry's fixup and `rdx` to 1 (an ordinary fault:
//!   [`CopyError::Fault`]) or 2 (a machine check on the application's page:
//!   [`CopyError::HardwareMemoryError`]). `sigreturn` restores the signal
//!   mask. No `longjmp`, no unwinding, no allocation, no lock, no
//!   thread-local: the handler is async-signal-safe.
//! - every other fault is *chained*: the previous action (saved when ours
//!   was installed) is called as it asked to be (`sa_sigaction` with
//!   `SA_SIGINFO`, else `sa_handler`). A previous `SIG_DFL` (or `SIG_IGN`,
//!   which the kernel does not honour for a real fault either) is
//!   reinstated and the handler returns: the faulting instruction runs
//!   again and the default action kills the process with the right signal
//!   and a core dump; a signal that was *sent* (`si_code <= 0`) is raised
//!   again, and is delivered with the default action once the handler
//!   returns. (The previous action's `sa_mask`, `SA_NODEFER` and
//!   `SA_RESETHAND` are not re-enacted: it runs inside our handler, with
//!   the faulting signal blocked.) Rust's own stack-overflow handler (installed by `std` at
//!   startup on `SIGSEGV`/`SIGBUS`, running on the thread's `sigaltstack`)
//!   is such a previous handler: a guard-page hit still prints "thread …
//!   has overflowed its stack" and aborts, because ours forwards it (ours
//!   asks for `SA_ONSTACK` too, so it runs on that alternate stack).
//!
//! # When the recoverable copy is not used
//!
//! [`Recoverable::check`], called before each batch of copies, answers
//! with a [`SyscallReason`] and the caller uses `process_vm_*` instead:
//!
//! - not x86-64 ([`SyscallReason::Unsupported`], decided at compile time);
//! - `HMM_SAFE_COPY=syscall` in the environment, read once
//!   ([`SyscallReason::Environment`]; any value other than `recoverable`
//!   or empty also selects the syscall path), or [`force_syscall`]
//!   ([`SyscallReason::Requested`]). Processes whose runtimes own
//!   `SIGSEGV` (a JVM, Go, sanitizers) should use one of these;
//! - our handler is no longer the installed one
//!   ([`SyscallReason::Displaced`]): checked with `sigaction(sig, NULL,
//!   &cur)` for both signals before each batch;
//! - this thread blocks `SIGSEGV` or `SIGBUS` ([`SyscallReason::SignalsBlocked`]):
//!   the kernel kills a process that faults with the signal blocked, so the
//!   handler would never run;
//! - installation failed ([`SyscallReason::InstallFailed`]).
//!
//! **Once per round, not once per page.** The check costs three system
//! calls (about 1 µs), as much as copying a 4 KiB page; a sparse fault
//! round copies one page per call. Inside a [`CheckScope`] (the mirror
//! opens one per fault-service round and per prefetch, on the servicing
//! thread) the first successful check is reused by the later ones on the
//! same thread. No user code runs on that thread inside the scope, so
//! nothing there can block the signals; a handler installed by another
//! thread meanwhile is the race below, whose window grows from one batch
//! to one round. A failed check is not reused: each batch checks again.
//!
//! **The race, stated honestly.** The check is a snapshot: another thread
//! calling `sigaction(SIGSEGV, …)` between the check and a fault in the
//! batch replaces our handler under us, and the fault then goes to theirs
//! (or kills the process). No userspace protocol can close this — a
//! handler installation is not something one can lock against — so code
//! that installs fault handlers while mirrors copy must select the syscall
//! path. A handler installed *before* ours is always fine (we chain to it);
//! one installed after ours that chains back to us is detected as
//! `Displaced` and costs only speed. The same applies to the saved previous
//! action: it is read, published, and only then is ours installed; a
//! handler installed by another thread in between is lost from the chain.
//!
//! # What may be copied this way
//!
//! `rep movsb` touches the memory itself, so it must never be pointed at a
//! mapping where a load has side effects or is forbidden: I/O and PFN maps
//! (`VM_IO`, `VM_PFNMAP`: device registers, `[vvar]`), and `memfd_secret`
//! memory, which the kernel keeps out of reach of everyone else
//! (`process_vm_readv` fails there and the mirror reports the page as
//! unmirrorable). Callers route those mappings to the syscall path; see
//! [`crate::cpu::maps::Mapping::plain_copy_ok`].
//!
//! # Why hand-written
//!
//! No maintained crate offers a recoverable copy with progress reporting:
//! the ones that catch SIGSEGV do it with `sigsetjmp`/`siglongjmp`, which
//! Rust cannot express soundly (a function that returns twice) and which
//! cannot say how far the copy got. The code is small: two five-instruction
//! routines, a streaming loop, a table, a handler and its installation.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod x86_64;

/// Copies from the application of at least this many bytes may use the
/// streaming routine. Below it `rep movsb` (temporal stores) is as fast as
/// `memcpy` and leaves the data in cache for whoever reads the copy next
/// (the cpu driver's kernel, a GPU upload); above it, into memory whose
/// lines are out of cache, non-temporal stores save the read-for-ownership
/// of every destination line. Into memory the copy itself faults in, whose
/// lines the kernel's zeroing has just brought into cache, `rep movsb`
/// stays (see [`streamed_bytes`] for the whole rule). Measured by
/// `benches/safecopy.rs`, the main job's `setup` scenario and
/// `examples/fault_service` (README, issue 15).
pub const STREAM_MIN: usize = 256 << 10;

/// Which mechanism copies between the application's memory and ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPath {
    /// The exception-table `rep movsb` copy with the fault handler.
    Recoverable,
    /// `process_vm_readv` / `process_vm_writev` on our own pid.
    Syscall(SyscallReason),
}

impl fmt::Display for CopyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyPath::Recoverable => write!(
                f,
                "recoverable rep movsb, non-temporal from {} KiB (exception table)",
                STREAM_MIN >> 10
            ),
            CopyPath::Syscall(why) => write!(f, "process_vm_readv/writev ({why})"),
        }
    }
}

/// Why the syscall path is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallReason {
    /// No recoverable copy for this target (only x86-64 has one).
    Unsupported,
    /// `HMM_SAFE_COPY` is set to something other than `recoverable`.
    Environment,
    /// [`force_syscall`] asked for it.
    Requested,
    /// Installing the fault handler failed.
    InstallFailed,
    /// Someone replaced our `SIGSEGV` or `SIGBUS` handler.
    Displaced,
    /// The calling thread blocks `SIGSEGV` or `SIGBUS`.
    SignalsBlocked,
}

impl fmt::Display for SyscallReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyscallReason::Unsupported => "only x86-64 has one",
            SyscallReason::Environment => "HMM_SAFE_COPY selects it",
            SyscallReason::Requested => "selected by the program",
            SyscallReason::InstallFailed => "installing the fault handler failed",
            SyscallReason::Displaced => "another SIGSEGV/SIGBUS handler replaced ours",
            SyscallReason::SignalsBlocked => "this thread blocks SIGSEGV or SIGBUS",
        })
    }
}

/// A copy that stopped at the application's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The application-side memory faulted (unmapped, protected, a file
    /// truncated under a shared mapping) after `copied` bytes.
    #[error("application memory faulted after {copied} bytes")]
    Fault {
        /// Bytes copied before the fault (all of them correct).
        copied: usize,
    },
    /// A hardware memory error (machine check, `BUS_MCEERR_AR`/`AO`) in the
    /// application-side memory after `copied` bytes.
    #[error("hardware memory error in application memory after {copied} bytes")]
    HardwareMemoryError {
        /// Bytes copied before the error.
        copied: usize,
    },
}

impl CopyError {
    /// Bytes copied before the copy stopped.
    pub fn copied(&self) -> usize {
        match *self {
            CopyError::Fault { copied } | CopyError::HardwareMemoryError { copied } => copied,
        }
    }
}

/// Set by [`force_syscall`].
static FORCED: AtomicBool = AtomicBool::new(false);

/// Faults the handler recovered (both kinds).
static RECOVERED: AtomicU64 = AtomicU64::new(0);
/// Hardware memory errors among them.
static HW_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Bytes the streaming routine was asked to copy.
static STREAMED: AtomicU64 = AtomicU64::new(0);

/// Whether `HMM_SAFE_COPY` asks for the syscall path (read once).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn env_wants_syscall() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    *ENV.get_or_init(|| match std::env::var_os("HMM_SAFE_COPY") {
        None => false,
        Some(v) => !(v.is_empty() || v == "recoverable"),
    })
}

/// Forces the syscall path (`true`) for every later batch, or returns to
/// the default (`false`: recoverable where available, unless
/// `HMM_SAFE_COPY` says otherwise). The programmatic twin of
/// `HMM_SAFE_COPY=syscall`, for programs that install their own fault
/// handlers while mirrors copy. Affects batches that start after the call.
pub fn force_syscall(yes: bool) {
    // Relaxed: a preference read at the start of each batch; nothing else
    // is published through it.
    FORCED.store(yes, Ordering::Relaxed);
}

/// The path the next batch of copies on this thread would take. Installs
/// the fault handler if the recoverable path is selected and it is not
/// installed yet (as the first copy would).
pub fn active_path() -> CopyPath {
    match Recoverable::check() {
        Ok(_) => CopyPath::Recoverable,
        Err(why) => CopyPath::Syscall(why),
    }
}

/// How many faults the handler has recovered in this process, and how
/// many of them were hardware memory errors. Counted per signal: an
/// ordinary fault usually counts twice (the copy meets it, then the probe
/// that confirms where the bad memory starts meets it again); a hardware
/// error once (the poisoned memory is not touched again).
pub fn recovered_faults() -> (u64, u64) {
    // Relaxed: statistics counters.
    (
        RECOVERED.load(Ordering::Relaxed),
        HW_ERRORS.load(Ordering::Relaxed),
    )
}

/// Bytes this process asked of the streaming (non-temporal) routine: copies
/// of [`STREAM_MIN`] bytes and more into populated memory not zeroed
/// moments ago (the rule is at the routine's caller, `x86_64::streams`).
pub fn streamed_bytes() -> u64 {
    // Relaxed: a statistics counter.
    STREAMED.load(Ordering::Relaxed)
}

/// Permission, for one batch on the thread that obtained it, to use the
/// recoverable copy: [`Recoverable::check`] found our handler installed
/// for both signals and neither signal blocked in this thread. Not `Send`:
/// the signal-mask check is per thread. Get a fresh one per batch (see the
/// module docs for why the check is only a snapshot).
#[derive(Debug)]
pub struct Recoverable {
    _thread: std::marker::PhantomData<*const ()>,
    /// Uninhabited where there is no recoverable copy.
    #[cfg(not(target_arch = "x86_64"))]
    never: std::convert::Infallible,
}

thread_local! {
    /// This thread's [`CheckScope`]s: how many are open, and whether a
    /// check inside them succeeded (then reused until the last closes).
    static SCOPE: std::cell::Cell<(u32, bool)> = const { std::cell::Cell::new((0, false)) };
}

/// While alive, [`Recoverable::check`] on this thread reuses its first
/// success (module docs: "Once per round"). Open it only around code
/// that runs no user code and changes no signal mask on this thread.
/// Scopes nest; not `Send`.
#[derive(Debug)]
#[must_use = "the scope ends when dropped"]
pub struct CheckScope {
    _thread: std::marker::PhantomData<*const ()>,
}

impl CheckScope {
    /// Opens a scope on this thread.
    pub fn open() -> CheckScope {
        SCOPE.with(|s| {
            let (depth, ok) = s.get();
            s.set((depth + 1, ok));
        });
        CheckScope {
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for CheckScope {
    fn drop(&mut self) {
        SCOPE.with(|s| {
            let (depth, ok) = s.get();
            let depth = depth.saturating_sub(1);
            s.set((depth, ok && depth > 0));
        });
    }
}

impl Recoverable {
    /// Whether the recoverable copy may be used now on this thread
    /// (installing the handler on first use), or why not. Costs three
    /// system calls (two `sigaction` queries and one `pthread_sigmask`
    /// query), except inside a [`CheckScope`] that already saw one
    /// succeed.
    pub fn check() -> Result<Recoverable, SyscallReason> {
        #[cfg(not(target_arch = "x86_64"))]
        {
            Err(SyscallReason::Unsupported)
        }
        #[cfg(target_arch = "x86_64")]
        {
            // Relaxed: see `force_syscall`.
            if FORCED.load(Ordering::Relaxed) {
                return Err(SyscallReason::Requested);
            }
            if env_wants_syscall() {
                return Err(SyscallReason::Environment);
            }
            let (depth, ok) = SCOPE.with(|s| s.get());
            if !(depth > 0 && ok) {
                x86_64::ready()?;
                if depth > 0 {
                    SCOPE.with(|s| s.set((depth, true)));
                }
            }
            Ok(Recoverable {
                _thread: std::marker::PhantomData,
            })
        }
    }

    /// Copies `n` bytes from the application's memory at `src` to `dst`.
    /// Returns the error (with the bytes copied so far) if `src` faults,
    /// instead of raising a signal.
    ///
    /// # Safety
    ///
    /// - `dst` is valid for writes of `n` bytes, and nothing else reads or
    ///   writes it during the call (a fault there is *not* recovered: it
    ///   crashes the process, as any wild write would);
    /// - `src..src + n` does not overlap `dst..dst + n`, and is ordinary
    ///   memory or unmapped: not an I/O or PFN mapping, not `memfd_secret`
    ///   (see [`crate::cpu::maps::Mapping::plain_copy_ok`]). It may be
    ///   unmapped, protected, truncated or concurrently written by other
    ///   threads at any time; the bytes read are then whatever the memory
    ///   held, as with `process_vm_readv`.
    pub unsafe fn copy_in(&self, dst: *mut u8, src: *const u8, n: usize) -> Result<(), CopyError> {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the caller's contract is `x86_64::copy`'s for the
            // source side; `self` proves the handler is in place.
            unsafe { x86_64::copy(dst, src, n, x86_64::Side::Source) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (dst, src, n);
            match self.never {}
        }
    }

    /// Copies `n` bytes from `src` to the application's memory at `dst`.
    /// Returns the error (with the bytes copied so far) if `dst` faults,
    /// instead of raising a signal. A failed copy may have written part of
    /// the range (the first `copied` bytes at least).
    ///
    /// # Safety
    ///
    /// - `src` is valid for reads of `n` bytes, and nothing writes it during
    ///   the call (a fault there is not recovered);
    /// - `dst..dst + n` does not overlap `src..src + n`, and is ordinary
    ///   memory or unmapped (as for [`Recoverable::copy_in`]'s source); it
    ///   is memory the caller may overwrite: nothing in this process holds
    ///   a Rust reference to it.
    pub unsafe fn copy_out(&self, dst: *mut u8, src: *const u8, n: usize) -> Result<(), CopyError> {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the caller's contract is `x86_64::copy`'s for the
            // destination side; `self` proves the handler is in place.
            unsafe { x86_64::copy(dst, src, n, x86_64::Side::Destination) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (dst, src, n);
            match self.never {}
        }
    }
}
