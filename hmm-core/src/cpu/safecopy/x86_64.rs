//! The x86-64 recoverable copy: the routines, their exception table, and
//! the `SIGSEGV`/`SIGBUS` handler (see the parent module for the rules).

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use super::{CopyError, SyscallReason, HW_ERRORS, RECOVERED, STREAMED, STREAM_MIN};

// The routines. System V ABI: rdi = dst, rsi = src, rdx = n; they return a
// 16-byte `Outcome` in rax:rdx. The direction flag is clear on entry (the
// ABI guarantees it), so `rep movsb` copies forward and leaves rsi/rdi at
// the next byte to move and rcx at the count still to move. Nothing but
// rcx, rsi, rdi (and, in the fixup, rax/rdx) is touched and nothing is
// pushed, so jumping from the faulting `rep movsb` to the fixup leaves a
// consistent frame: the fixup's `ret` returns to our caller.
//
// Symbol names carry the crate name and a version so that two copies of
// this crate linked into one binary do not clash; `.hidden` keeps them out
// of a shared object's dynamic symbol table.
std::arch::global_asm!(
    ".pushsection .text.__hmm_core_safecopy_v1,\"ax\",@progbits",
    ".p2align 4",
    ".globl __hmm_core_safecopy_v1_in",
    ".hidden __hmm_core_safecopy_v1_in",
    ".type __hmm_core_safecopy_v1_in,@function",
    "__hmm_core_safecopy_v1_in:",
    "    mov rcx, rdx",
    ".Lhmm_sc_in_begin:",
    "    rep movsb",
    ".Lhmm_sc_in_end:",
    "    xor eax, eax",
    "    xor edx, edx",
    "    ret",
    ".Lhmm_sc_in_fixup:",
    // The handler put the error code in rdx.
    "    mov rax, rcx",
    "    ret",
    ".size __hmm_core_safecopy_v1_in, .-__hmm_core_safecopy_v1_in",
    "",
    ".p2align 4",
    ".globl __hmm_core_safecopy_v1_out",
    ".hidden __hmm_core_safecopy_v1_out",
    ".type __hmm_core_safecopy_v1_out,@function",
    "__hmm_core_safecopy_v1_out:",
    "    mov rcx, rdx",
    ".Lhmm_sc_out_begin:",
    "    rep movsb",
    ".Lhmm_sc_out_end:",
    "    xor eax, eax",
    "    xor edx, edx",
    "    ret",
    ".Lhmm_sc_out_fixup:",
    "    mov rax, rcx",
    "    ret",
    ".size __hmm_core_safecopy_v1_out, .-__hmm_core_safecopy_v1_out",
    "",
    // The streaming variant of `_in`, for long copies into our own memory:
    // 64 bytes per iteration, loaded into xmm0-3 (caller-saved, SSE2 is
    // baseline x86-64) and stored with `movntdq`, which bypasses the cache
    // as glibc's `memcpy` does past its non-temporal threshold. The caller
    // guarantees n > 0, n % 64 == 0 and a 16-byte aligned destination.
    // Only the loads can fault on the application's side; at any of them
    // rsi is the start of the block being loaded and rcx the bytes not yet
    // stored (this block included), the same register contract as
    // `rep movsb`, so the handler's rule needs no change. Both exits fence
    // the weakly ordered stores before returning.
    ".p2align 4",
    ".globl __hmm_core_safecopy_v1_in_nt",
    ".hidden __hmm_core_safecopy_v1_in_nt",
    ".type __hmm_core_safecopy_v1_in_nt,@function",
    "__hmm_core_safecopy_v1_in_nt:",
    "    mov rcx, rdx",
    ".Lhmm_sc_nt_begin:",
    "    prefetcht0 [rsi + 512]",
    "    movdqu xmm0, [rsi]",
    "    movdqu xmm1, [rsi + 16]",
    "    movdqu xmm2, [rsi + 32]",
    "    movdqu xmm3, [rsi + 48]",
    "    movntdq [rdi], xmm0",
    "    movntdq [rdi + 16], xmm1",
    "    movntdq [rdi + 32], xmm2",
    "    movntdq [rdi + 48], xmm3",
    "    add rsi, 64",
    "    add rdi, 64",
    "    sub rcx, 64",
    "    jnz .Lhmm_sc_nt_begin",
    ".Lhmm_sc_nt_end:",
    "    sfence",
    "    xor eax, eax",
    "    xor edx, edx",
    "    ret",
    ".Lhmm_sc_nt_fixup:",
    "    sfence",
    "    mov rax, rcx",
    "    ret",
    ".size __hmm_core_safecopy_v1_in_nt, .-__hmm_core_safecopy_v1_in_nt",
    "",
    // The word-atomic variant of `_in`: 128 bytes per iteration through
    // eight aligned 16-byte `movdqa` loads (into xmm0-7, caller-saved) and
    // stores. An aligned 16-byte load is one access that does not cross a
    // cache line — atomic as a whole on every processor with AVX (Intel
    // SDM vol. 3, "Guaranteed Atomic Operations"; AMD APM vol. 2 likewise)
    // and made of aligned 8-byte atomic accesses on any other — so every
    // aligned 4- or 8-byte word of the source is copied whole, as it was
    // before or after a concurrent store or discard, never half of each.
    // `rep movsb` promises no such thing: its elements are bytes. The
    // caller guarantees n > 0, n % 128 == 0 and both operands 16-byte
    // aligned (`movdqa` faults otherwise). At any faulting load rsi is the
    // start of the block being loaded and rcx the bytes not yet stored
    // (this block included): the register contract of `rep movsb`.
    ".p2align 4",
    ".globl __hmm_core_safecopy_v1_in_words",
    ".hidden __hmm_core_safecopy_v1_in_words",
    ".type __hmm_core_safecopy_v1_in_words,@function",
    "__hmm_core_safecopy_v1_in_words:",
    "    mov rcx, rdx",
    ".Lhmm_sc_w_begin:",
    "    movdqa xmm0, [rsi]",
    "    movdqa xmm1, [rsi + 16]",
    "    movdqa xmm2, [rsi + 32]",
    "    movdqa xmm3, [rsi + 48]",
    "    movdqa xmm4, [rsi + 64]",
    "    movdqa xmm5, [rsi + 80]",
    "    movdqa xmm6, [rsi + 96]",
    "    movdqa xmm7, [rsi + 112]",
    "    movdqa [rdi], xmm0",
    "    movdqa [rdi + 16], xmm1",
    "    movdqa [rdi + 32], xmm2",
    "    movdqa [rdi + 48], xmm3",
    "    movdqa [rdi + 64], xmm4",
    "    movdqa [rdi + 80], xmm5",
    "    movdqa [rdi + 96], xmm6",
    "    movdqa [rdi + 112], xmm7",
    "    add rsi, 128",
    "    add rdi, 128",
    "    sub rcx, 128",
    "    jnz .Lhmm_sc_w_begin",
    ".Lhmm_sc_w_end:",
    "    xor eax, eax",
    "    xor edx, edx",
    "    ret",
    ".Lhmm_sc_w_fixup:",
    "    mov rax, rcx",
    "    ret",
    ".size __hmm_core_safecopy_v1_in_words, .-__hmm_core_safecopy_v1_in_words",
    ".popsection",
    "",
    // The exception table: {begin, end, fixup, side}; side 0: the
    // application's memory is the source (rsi), 1: the destination (rdi).
    ".pushsection .data.rel.ro.__hmm_core_safecopy_v1,\"aw\",@progbits",
    ".p2align 3",
    ".globl __hmm_core_safecopy_v1_extable",
    ".hidden __hmm_core_safecopy_v1_extable",
    "__hmm_core_safecopy_v1_extable:",
    "    .quad .Lhmm_sc_in_begin, .Lhmm_sc_in_end, .Lhmm_sc_in_fixup, 0",
    "    .quad .Lhmm_sc_out_begin, .Lhmm_sc_out_end, .Lhmm_sc_out_fixup, 1",
    "    .quad .Lhmm_sc_nt_begin, .Lhmm_sc_nt_end, .Lhmm_sc_nt_fixup, 0",
    "    .quad .Lhmm_sc_w_begin, .Lhmm_sc_w_end, .Lhmm_sc_w_fixup, 0",
    ".popsection",
);

/// What a routine returns: bytes not copied, and 0 (done), [`FAULT`] or
/// [`HW_ERROR`].
#[repr(C)]
struct Outcome {
    left: usize,
    code: usize,
}

/// `Outcome::code` of a recovered ordinary fault.
const FAULT: i64 = 1;
/// `Outcome::code` of a recovered hardware memory error.
const HW_ERROR: i64 = 2;

/// One exception-table entry (layout of the `.quad` lines above).
#[repr(C)]
struct ExEntry {
    begin: usize,
    end: usize,
    fixup: usize,
    side: usize,
}

const EXTABLE_LEN: usize = 4;

extern "C" {
    fn __hmm_core_safecopy_v1_in(dst: *mut u8, src: *const u8, n: usize) -> Outcome;
    fn __hmm_core_safecopy_v1_out(dst: *mut u8, src: *const u8, n: usize) -> Outcome;
    fn __hmm_core_safecopy_v1_in_nt(dst: *mut u8, src: *const u8, n: usize) -> Outcome;
    fn __hmm_core_safecopy_v1_in_words(dst: *mut u8, src: *const u8, n: usize) -> Outcome;
    static __hmm_core_safecopy_v1_extable: [ExEntry; EXTABLE_LEN];
}

/// Which operand of the copy is the application's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// The source (`copy_in`).
    Source,
    /// The destination (`copy_out`).
    Destination,
}

/// Copies `n` bytes, recovering a fault on `side`; on a fault, the bytes
/// reported copied are exactly those before the first inaccessible byte.
///
/// A fast-string `rep movsb` may stop a little *before* the byte that
/// faulted (Linux retries the tail byte by byte for this reason, see
/// `copy_user_handle_tail` in older kernels): after a fault, the rest of the
/// application-side page where it stopped is tried again on its own. If
/// that copies nothing, the stopping point is the first bad byte; if it
/// makes progress, the copy simply goes on from there.
///
/// # Safety
///
/// The handler is installed ([`ready`] succeeded on this thread for the
/// current batch); the non-application operand is valid for `n` bytes
/// (reads for the source, writes for the destination) and unused by
/// anything else meanwhile; the operands do not overlap; the
/// application-side operand is ordinary memory or unmapped (see
/// `Recoverable::copy_in`).
pub(super) unsafe fn copy(
    dst: *mut u8,
    src: *const u8,
    n: usize,
    side: Side,
) -> Result<(), CopyError> {
    let user = match side {
        Side::Source => src as usize,
        Side::Destination => dst as usize,
    };
    let page = crate::addr::PAGE_SIZE as usize;
    let mut done = 0;
    let mut probing = false;
    while done < n {
        let len = if probing {
            (n - done).min(page - (user + done) % page)
        } else {
            n - done
        };
        // `done < n`: both operands advanced by `done` stay in the ranges
        // the caller vouches for (wrapping_add: no reference is formed).
        let (d, s) = (dst.wrapping_add(done), src.wrapping_add(done));
        let out = if !probing && streams(d, len, side) {
            // SAFETY: as for `raw` (the streaming routine touches the same
            // bytes, only its loads on the application's side); `streams`
            // checked what it requires: len > 0 and a multiple of 64, the
            // destination 16-byte aligned.
            let out = unsafe { __hmm_core_safecopy_v1_in_nt(d, s, len) };
            // Relaxed: a statistics counter.
            STREAMED.fetch_add(len as u64, Ordering::Relaxed);
            out
        } else {
            // SAFETY: see `raw`, for the ranges above.
            unsafe { raw(d, s, len, side) }
        };
        let moved = len - out.left.min(len);
        done += moved;
        match out.code as i64 {
            0 => probing = false,
            HW_ERROR => return Err(CopyError::HardwareMemoryError { copied: done }),
            _ if probing && moved == 0 => return Err(CopyError::Fault { copied: done }),
            _ => probing = true,
        }
    }
    Ok(())
}

/// Whether a copy of `n` bytes to `dst` on `side` takes the streaming
/// routine: into our memory (`copy_in`), long, whole 64-byte blocks, a
/// 16-byte aligned destination, and a destination whose lines are not in
/// cache already ([`cold_destination`]).
fn streams(dst: *mut u8, n: usize, side: Side) -> bool {
    side == Side::Source
        && n >= STREAM_MIN
        && n.is_multiple_of(64)
        && (dst as usize).is_multiple_of(16)
        && cold_destination(dst as usize, n)
}

thread_local! {
    /// The 2 MiB block holding the end of this thread's last copy that ran
    /// into never-touched memory (0: none yet). See [`cold_destination`].
    static FRESH_BLOCK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether the destination `[dst, dst + n)` is populated memory whose
/// lines are likely out of cache, the case non-temporal stores are for.
///
/// Memory never touched before (a fresh device pool: the cpu driver's, by
/// default) is faulted in as the copy runs, and the kernel zeroes each new
/// page (or 2 MiB huge page) first, which leaves its lines in cache:
/// temporal stores then hit them, while non-temporal ones evict them
/// (writing the zeroes back) and miss again when the data is read next.
/// Measured with `fault_service cpu 4096` on this project's VM, host µs per
/// faulted page, medians of 100 mirrors: a fresh pool 1.9 streaming
/// against 1.4–1.6 with `rep movsb`; a resident pool 1.2–1.3 streaming
/// against 1.4 (it saves reading each destination line before writing it).
///
/// So a copy streams only when its first and last pages are populated
/// (`mincore`, one system call each, about 0.3 µs against the ≥ 256 KiB
/// copy they decide) and it does not start in the huge-page block where
/// this thread's previous copy met never-touched memory: that block was
/// zeroed moments ago. A failed query counts as populated.
fn cold_destination(dst: usize, n: usize) -> bool {
    const BLOCK: usize = 2 << 20;
    let last = dst + (n - 1);
    if !populated(last) {
        FRESH_BLOCK.with(|b| b.set(last & !(BLOCK - 1)));
        return false;
    }
    if FRESH_BLOCK.with(|b| b.get()) == dst & !(BLOCK - 1) {
        return false;
    }
    populated(dst)
}

/// Whether the page holding address `a` is populated (`mincore`).
fn populated(a: usize) -> bool {
    let page = crate::addr::PAGE_SIZE as usize;
    let mut vec = 0u8;
    // SAFETY: `mincore` writes one byte to `vec` (one page asked about)
    // and reads no memory of ours; the address is page aligned. An
    // address that is not mapped is an error return (ENOMEM), not a fault.
    let rc = unsafe { libc::mincore((a & !(page - 1)) as *mut libc::c_void, page, &mut vec) };
    rc != 0 || vec & 1 == 1
}

/// Whether a copy of `n` bytes from `src` to `dst` on `side` can take the
/// word-atomic routine: from the application's memory, whole 128-byte
/// blocks, both operands 16-byte aligned.
fn by_words(dst: *mut u8, src: *const u8, n: usize, side: Side) -> bool {
    side == Side::Source
        && n > 0
        && n.is_multiple_of(128)
        && (dst as usize).is_multiple_of(16)
        && (src as usize).is_multiple_of(16)
}

/// One call of the routine for `side`: from the application's memory the
/// word-atomic one wherever [`by_words`] allows (every aligned word copied
/// whole, however the application changes the page meanwhile), else
/// `rep movsb`.
///
/// # Safety
///
/// As for [`copy`], for `n` bytes at `dst` and `src`.
unsafe fn raw(dst: *mut u8, src: *const u8, n: usize, side: Side) -> Outcome {
    // SAFETY: the routines only load and store the operands' bytes, whose
    // validity the caller vouches for; a fault on the application side is
    // turned into a return by the installed handler (caller). `by_words`
    // checked what the word routine requires.
    unsafe {
        match side {
            Side::Source if by_words(dst, src, n, side) => {
                __hmm_core_safecopy_v1_in_words(dst, src, n)
            }
            Side::Source => __hmm_core_safecopy_v1_in(dst, src, n),
            Side::Destination => __hmm_core_safecopy_v1_out(dst, src, n),
        }
    }
}

/// The action that was installed before ours, for one signal. Written
/// once, before ours is installed, then only read (by the handler).
struct Saved {
    valid: AtomicBool,
    act: UnsafeCell<MaybeUninit<libc::sigaction>>,
}

// SAFETY: `act` is written only by `install` (inside a `OnceLock`
// initialiser, so once, by one thread) before `valid` is set with Release;
// readers load `valid` with Acquire first and never write.
unsafe impl Sync for Saved {}

static SAVED_SEGV: Saved = Saved {
    valid: AtomicBool::new(false),
    act: UnsafeCell::new(MaybeUninit::uninit()),
};
static SAVED_BUS: Saved = Saved {
    valid: AtomicBool::new(false),
    act: UnsafeCell::new(MaybeUninit::uninit()),
};

fn saved(sig: libc::c_int) -> &'static Saved {
    if sig == libc::SIGBUS {
        &SAVED_BUS
    } else {
        &SAVED_SEGV
    }
}

/// Our handler's address as `sigaction` stores it.
fn handler_addr() -> libc::sighandler_t {
    on_fault as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t
}

/// `si_addr_lsb` of a `BUS_MCEERR_*` siginfo: the log2 of the poisoned
/// unit's size. The libc crate has no accessor; in the kernel's x86-64
/// layout (`include/uapi/asm-generic/siginfo.h`) it is the `short` after
/// `si_addr` in the fault member of the union, which starts at offset 16.
///
/// # Safety
///
/// `info` points to a siginfo the kernel delivered for a `SIGBUS` fault.
unsafe fn addr_lsb(info: *const libc::siginfo_t) -> u32 {
    // SAFETY: offset 24 lies inside the 128-byte siginfo; the kernel
    // filled it for BUS_MCEERR_* (caller).
    let lsb = unsafe { info.cast::<u8>().add(24).cast::<i16>().read_unaligned() };
    (lsb.clamp(0, 63)) as u32
}

/// The `SIGSEGV`/`SIGBUS` handler: the recovery rule of the module docs,
/// else the previous action.
extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !info.is_null() && !ctx.is_null() {
        // SAFETY: the kernel passes a valid siginfo and ucontext to an
        // SA_SIGINFO handler; we are the only code looking at them now.
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        let hw =
            sig == libc::SIGBUS && (code == libc::BUS_MCEERR_AR || code == libc::BUS_MCEERR_AO);
        // SAFETY: a SIGBUS BUS_MCEERR_* siginfo from the kernel.
        let lsb = if hw { unsafe { addr_lsb(info) } } else { 0 };
        // SAFETY: as above; the ucontext is ours to edit until we return,
        // and sigreturn resumes from what we leave in it.
        let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
        let fault = Fault {
            code,
            addr,
            hw,
            lsb,
        };
        if recover(&fault, &mut uc.uc_mcontext.gregs) {
            // Relaxed: statistics; lock-free atomics are async-signal-safe.
            RECOVERED.fetch_add(1, Ordering::Relaxed);
            if hw {
                HW_ERRORS.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    }
    // SAFETY: forwarding the kernel's own arguments for this signal.
    unsafe { chain(sig, info, ctx) }
}

/// What the handler needs to know about a fault.
struct Fault {
    /// `si_code`.
    code: libc::c_int,
    /// `si_addr`.
    addr: usize,
    /// A hardware memory error (`SIGBUS` with `BUS_MCEERR_AR`/`AO`).
    hw: bool,
    /// For `hw`: `si_addr_lsb`, log2 of the poisoned unit's size.
    lsb: u32,
}

/// The recovery rule (module docs): whether the fault described by `f`,
/// taken with registers `g`, is one of ours; if so, `g` is redirected to
/// the entry's fixup with the error code in `rdx`.
fn recover(f: &Fault, g: &mut [libc::greg_t; 23]) -> bool {
    if f.code <= 0 {
        return false;
    }
    let rip = g[libc::REG_RIP as usize] as usize;
    // SAFETY: the table is immutable data defined by the global_asm above,
    // with EXTABLE_LEN entries of ExEntry's layout.
    let table = unsafe { &*std::ptr::addr_of!(__hmm_core_safecopy_v1_extable) };
    let Some(e) = table.iter().find(|e| e.begin <= rip && rip < e.end) else {
        return false;
    };
    let cur = if e.side == 0 {
        g[libc::REG_RSI as usize]
    } else {
        g[libc::REG_RDI as usize]
    } as usize;
    let left = g[libc::REG_RCX as usize] as usize;
    let ours = if f.hw {
        let unit = 1usize.checked_shl(f.lsb).unwrap_or(usize::MAX);
        let lo = f.addr & !(unit - 1);
        let hi = lo.saturating_add(unit);
        lo < cur.saturating_add(left) && cur < hi
    } else {
        f.addr >= cur && f.addr - cur < left
    };
    if ours {
        g[libc::REG_RDX as usize] = if f.hw { HW_ERROR } else { FAULT };
        g[libc::REG_RIP as usize] = e.fixup as libc::greg_t;
    }
    ours
}

/// Hands a fault that is not ours to the previous action.
///
/// # Safety
///
/// Called from `on_fault` with the kernel's arguments for `sig`.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: `info` is the kernel's siginfo (or null, which we allow for).
    let sent = info.is_null() || unsafe { (*info).si_code } <= 0;
    let slot = saved(sig);
    if slot.valid.load(Ordering::Acquire) {
        // SAFETY: `valid` (Acquire) says `act` was fully written (Release)
        // and will not be written again.
        let old = unsafe { (*slot.act.get()).assume_init_ref() };
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO the stored value is a
                // three-argument handler (that is how it was installed);
                // we pass it the kernel's arguments unchanged.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO it is a one-argument handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
        if h == libc::SIG_IGN && sent {
            // An ignored signal that someone sent: ignore it.
            return;
        }
    }
    // Default action: reinstate it. A real fault re-executes on return and
    // kills the process with this signal (and a core dump); a sent signal is
    // raised again, stays pending while this handler runs (it is blocked
    // here) and is delivered with the default action afterwards.
    // SAFETY: plain-data struct; all-zero is a valid value.
    let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    // SAFETY: sigaction and raise are async-signal-safe; `dfl` is valid.
    unsafe {
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        if sent {
            libc::raise(sig);
        }
    }
}

/// Installs the handler for `SIGSEGV` and `SIGBUS`, saving the previous
/// actions first. Runs once per process (`OnceLock`).
fn install() -> bool {
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        let slot = saved(sig);
        // SAFETY: the once-only initialiser is the only writer of `act`,
        // and nothing reads it before `valid` is set below; sigaction with
        // a null new action only queries.
        unsafe {
            let old = (*slot.act.get()).as_mut_ptr();
            if libc::sigaction(sig, std::ptr::null(), old) != 0 {
                return false;
            }
        }
        slot.valid.store(true, Ordering::Release);
        // SAFETY: plain-data struct; all-zero is a valid value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = handler_addr();
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `sa` is a valid sigaction; installing a handler that
        // chains to the saved one (see the module docs for the window in
        // which another thread's installation could slip in).
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return false;
            }
        }
    }
    true
}

/// Whether the recoverable copy may be used for a batch starting now on
/// this thread: installs the handler on first use, then checks that it is
/// still installed for both signals and that neither is blocked here.
pub(super) fn ready() -> Result<(), SyscallReason> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    if !*INSTALLED.get_or_init(install) {
        return Err(SyscallReason::InstallFailed);
    }
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: plain-data struct; all-zero is a valid value.
        let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a query (null new action) into a valid struct.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } != 0
            || cur.sa_sigaction != handler_addr()
        {
            return Err(SyscallReason::Displaced);
        }
    }
    // SAFETY: plain-data type; all-zero is a valid (empty) set.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new set) of this thread's mask into a valid set.
    let blocked = unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) != 0
            || libc::sigismember(&mask, libc::SIGSEGV) == 1
            || libc::sigismember(&mask, libc::SIGBUS) == 1
    };
    if blocked {
        return Err(SyscallReason::SignalsBlocked);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `si_code`s of SIGSEGV (`include/uapi/asm-generic/siginfo.h`; the
    /// libc crate does not name them).
    const SEGV_MAPERR: libc::c_int = 1;
    const SEGV_ACCERR: libc::c_int = 2;

    /// The extable entry for `side`.
    fn entry(side: usize) -> &'static ExEntry {
        // SAFETY: immutable table defined by the global_asm.
        let t = unsafe { &*std::ptr::addr_of!(__hmm_core_safecopy_v1_extable) };
        t.iter().find(|e| e.side == side).unwrap()
    }

    /// Registers of a copy stopped at `rip` with `cur` as the application
    /// side's next byte (in `reg`) and `left` bytes to go.
    fn regs(rip: usize, reg: libc::c_int, cur: usize, left: usize) -> [libc::greg_t; 23] {
        let mut g = [0; 23];
        g[libc::REG_RIP as usize] = rip as libc::greg_t;
        g[reg as usize] = cur as libc::greg_t;
        g[libc::REG_RCX as usize] = left as libc::greg_t;
        g[libc::REG_RDX as usize] = 77;
        g
    }

    fn fault(code: libc::c_int, addr: usize) -> Fault {
        Fault {
            code,
            addr,
            hw: false,
            lsb: 0,
        }
    }

    fn mce(addr: usize, lsb: u32) -> Fault {
        Fault {
            code: libc::BUS_MCEERR_AR,
            addr,
            hw: true,
            lsb,
        }
    }

    /// The recovery rule, case by case, on synthetic fault states (a real
    /// machine check cannot be raised on demand; the end-to-end test in
    /// `tests/safecopy.rs` uses `MADV_HWPOISON` where the kernel has it).
    #[test]
    fn the_recovery_rule() {
        let (inn, out) = (entry(0), entry(1));
        let (rsi, rdi) = (libc::REG_RSI, libc::REG_RDI);
        // An ordinary fault at the copy's next source byte: ours.
        let mut g = regs(inn.begin, rsi, 0x10000, 0x3000);
        assert!(recover(&fault(SEGV_MAPERR, 0x10000), &mut g));
        assert_eq!(g[libc::REG_RIP as usize] as usize, inn.fixup);
        assert_eq!(g[libc::REG_RDX as usize], FAULT);
        // The last byte still to copy: ours; one past it: not.
        let mut g = regs(inn.begin, rsi, 0x10000, 0x3000);
        assert!(recover(&fault(SEGV_ACCERR, 0x12fff), &mut g));
        let mut g = regs(inn.begin, rsi, 0x10000, 0x3000);
        assert!(!recover(&fault(SEGV_MAPERR, 0x13000), &mut g));
        assert_eq!(g[libc::REG_RIP as usize] as usize, inn.begin, "untouched");
        assert_eq!(g[libc::REG_RDX as usize], 77, "untouched");
        // Behind the progress (our destination side, in rdi): not ours.
        let mut g = regs(inn.begin, rsi, 0x10000, 0x3000);
        g[rdi as usize] = 0x50000;
        assert!(!recover(&fault(SEGV_MAPERR, 0x50000), &mut g));
        assert!(!recover(&fault(SEGV_MAPERR, 0xfff), &mut g));
        // copy_out: the application side is rdi.
        let mut g = regs(out.begin, rdi, 0x20000, 0x1000);
        g[rsi as usize] = 0x20000 - 0x8000;
        assert!(recover(&fault(libc::BUS_ADRERR, 0x20010), &mut g));
        assert_eq!(g[libc::REG_RIP as usize] as usize, out.fixup);
        let mut g = regs(out.begin, rdi, 0x20000, 0x1000);
        g[rsi as usize] = 0x40000;
        assert!(!recover(&fault(SEGV_MAPERR, 0x40000), &mut g));
        // Sent signals (si_code <= 0) and faults elsewhere: never ours.
        let mut g = regs(inn.begin, rsi, 0x10000, 0x3000);
        assert!(!recover(&fault(libc::SI_USER, 0x10000), &mut g));
        assert!(!recover(&fault(-6, 0x10000), &mut g));
        let mut g = regs(inn.end, rsi, 0x10000, 0x3000);
        assert!(!recover(&fault(SEGV_MAPERR, 0x10000), &mut g));
        let mut g = regs(inn.begin - 1, rsi, 0x10000, 0x3000);
        assert!(!recover(&fault(SEGV_MAPERR, 0x10000), &mut g));
    }

    #[test]
    fn a_machine_check_is_recovered_with_its_own_code() {
        let inn = entry(0);
        let rsi = libc::REG_RSI;
        // The copy stopped mid-page; the kernel names the poisoned page
        // (lsb 12) by its first byte, behind `cur`: it overlaps, ours.
        let mut g = regs(inn.begin, rsi, 0x10800, 0x2000);
        assert!(recover(&mce(0x10000, 12), &mut g));
        assert_eq!(g[libc::REG_RDX as usize], HW_ERROR);
        assert_eq!(g[libc::REG_RIP as usize] as usize, inn.fixup);
        // A poisoned 2 MiB unit containing the rest of the copy: ours.
        let mut g = regs(inn.begin, rsi, 0x2_10800, 0x2000);
        assert!(recover(&mce(0x2_00000, 21), &mut g));
        // A poisoned page wholly behind or beyond the copy: not ours.
        let mut g = regs(inn.begin, rsi, 0x10800, 0x2000);
        assert!(!recover(&mce(0xf000, 12), &mut g));
        assert!(!recover(&mce(0x13000, 12), &mut g));
        assert_eq!(g[libc::REG_RDX as usize], 77);
        // The page holding the last byte to copy: ours.
        assert!(recover(&mce(0x12000, 12), &mut g));
        assert_eq!(g[libc::REG_RDX as usize], HW_ERROR);
    }
}
