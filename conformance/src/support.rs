//! What every scenario shares: test mappings, the mirror set-up, the
//! userfaultfd check, and the one launch helper every scenario launches
//! through ([`LaunchMode`]). [`TestMap`], [`events_available`] and
//! [`with_launch_mode`] are public for drivers' own tests.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hmm_core::cpu::host::{EventSource, HostSpace};
use hmm_core::mirror::args::KernelArgs;
use hmm_core::mirror::backend::Backend;
use hmm_core::mirror::{FetchPolicy, HostSide, LaunchReport, Mirror, MirrorConfig, MirrorError};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

use crate::{TestKernel, TestKernels};

/// Fails a test with a clear line when userfaultfd is missing and
/// `HMM_REQUIRE_UFFD=1`; otherwise returns whether events are available.
pub fn events_available(host: &HostSpace) -> bool {
    let ok = matches!(host.event_source(), EventSource::Userfaultfd);
    if !ok {
        assert!(
            std::env::var("HMM_REQUIRE_UFFD").as_deref() != Ok("1"),
            "HMM_REQUIRE_UFFD=1 but userfaultfd is unavailable: {:?}",
            host.event_source()
        );
        eprintln!(
            "skip: userfaultfd unavailable ({:?}); event-driven checks skipped",
            host.event_source()
        );
    }
    ok
}

/// An `mmap`ed region for tests; unmapped on drop unless already gone.
#[derive(Debug)]
pub struct TestMap {
    ptr: *mut u8,
    pub(crate) len: usize,
    live: bool,
}

// SAFETY: the mapping is plain memory owned by this value; moving the
// owner between threads is fine (accesses are the tests' business).
unsafe impl Send for TestMap {}
// SAFETY: as above; shared access only hands out addresses.
unsafe impl Sync for TestMap {}

impl TestMap {
    /// A private anonymous mapping of `pages` pages with `prot`.
    pub fn anon(pages: usize, prot: i32) -> TestMap {
        Self::map(pages, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }
    /// A shared anonymous mapping.
    pub fn shared_anon(pages: usize) -> TestMap {
        Self::map(
            pages,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
        )
    }
    /// A mapping of `file` (`flags` = `MAP_SHARED` or `MAP_PRIVATE`).
    pub fn file(file: &std::fs::File, pages: usize, prot: i32, flags: i32) -> TestMap {
        use std::os::fd::AsRawFd;
        Self::map(pages, prot, flags, file.as_raw_fd())
    }
    /// Maps `pages` between two `PROT_NONE` guard pages, so the kernel
    /// cannot merge the mapping with a neighbour's into one VMA (tests run
    /// in parallel threads of one process; merged neighbours would see each
    /// other's unmaps).
    fn map(pages: usize, prot: i32, flags: i32, fd: i32) -> TestMap {
        let len = pages * PAGE_SIZE as usize;
        let pg = PAGE_SIZE as usize;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: reserves fresh address space at a kernel-chosen address;
        // nothing else refers to it.
        let guard = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + 2 * pg,
                libc::PROT_NONE,
                anon,
                -1,
                0,
            )
        };
        assert_ne!(
            guard,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let want = (guard as usize + pg) as *mut libc::c_void;
        // SAFETY: MAP_FIXED over the middle of our own reservation only.
        let p = unsafe { libc::mmap(want, len, prot, flags | libc::MAP_FIXED, fd, 0) };
        assert_eq!(p, want, "mmap: {}", std::io::Error::last_os_error());
        TestMap {
            ptr: p.cast(),
            len,
            live: true,
        }
    }
    /// First address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    /// The range.
    pub fn range(&self) -> VaRange {
        VaRange::from_start_len(VirtAddr(self.addr()), self.len as u64).expect("mapping range")
    }
    /// Writes word `i` (the mapping must be writable).
    pub fn write_word(&self, i: usize, v: u32) {
        assert!(i < self.len / 4);
        // SAFETY: in bounds of the live mapping, which tests only write
        // while it is writable; volatile so the store is not elided or
        // cached across device launches. No Rust reference to the memory
        // exists.
        unsafe { self.ptr.cast::<u32>().add(i).write_volatile(v) }
    }
    /// Writes every word: word `i` becomes `f(i)`.
    pub fn fill(&self, f: impl Fn(usize) -> u32) {
        for i in 0..self.len / 4 {
            self.write_word(i, f(i));
        }
    }
    /// Reads word `i` without needing write permission.
    pub fn read_word(&self, i: usize) -> u32 {
        assert!(i < self.len / 4);
        // SAFETY: in bounds of the live mapping; volatile so the compiler
        // cannot cache it across device launches.
        unsafe { self.ptr.cast::<u32>().add(i).read_volatile() }
    }
    /// `mprotect` the whole mapping.
    pub fn protect(&self, prot: i32) {
        // SAFETY: changes protection of our own mapping only; no Rust
        // reference into it exists.
        let r = unsafe { libc::mprotect(self.ptr.cast(), self.len, prot) };
        assert_eq!(r, 0);
    }
    /// `munmap` it now.
    pub fn unmap(&mut self) {
        if self.live {
            let pg = PAGE_SIZE as usize;
            // SAFETY: our own mapping and its two guard pages, unmapped once.
            unsafe { libc::munmap(self.ptr.sub(pg).cast(), self.len + 2 * pg) };
            self.live = false;
        }
    }
}

impl Drop for TestMap {
    fn drop(&mut self) {
        self.unmap();
    }
}

pub(crate) fn setup<B: TestKernels>(backend: B, cfg: MirrorConfig) -> (Arc<HostSpace>, Mirror<B>) {
    let host = Arc::new(HostSpace::new().expect("host space"));
    let cfg = MirrorConfig {
        fetch: suite_fetch_policy().unwrap_or(cfg.fetch),
        ..cfg
    };
    let m = Mirror::new(Arc::clone(&host), backend, cfg).expect("mirror");
    (host, m)
}

pub(crate) fn small_cfg() -> MirrorConfig {
    MirrorConfig {
        pool_slots: 4096,
        table_pages: 512,
        fetch: suite_fetch_policy().unwrap_or_default(),
        ..MirrorConfig::default()
    }
}

/// The fetch policy `HMM_TEST_FETCH` asks the suite's mirrors to use
/// (`exact` or `adaptive`; unset or `auto`: the scenario's own, which is
/// [`FetchPolicy::Auto`] — exact on the cpu driver, adaptive on the GPU
/// drivers). CI runs each driver's suite a second time under the policy
/// `Auto` does not pick there, so both policies pass the whole suite on
/// every driver. Any other value panics: a mistyped name must not run the
/// default silently.
pub fn suite_fetch_policy() -> Option<FetchPolicy> {
    match std::env::var("HMM_TEST_FETCH").as_deref() {
        Err(_) | Ok("" | "auto") => None,
        Ok("exact") => Some(FetchPolicy::Exact),
        Ok("adaptive") => Some(FetchPolicy::Adaptive),
        Ok(other) => panic!("HMM_TEST_FETCH={other:?}: expected auto, exact or adaptive"),
    }
}

/// Words per page.
pub(crate) const WPP: usize = PAGE_SIZE as usize / 4;

/// Device reads of `pages` pages of `src` into `out`; returns the report.
pub(crate) fn device_copy<B: TestKernels>(
    m: &Mirror<B>,
    src: u64,
    out: &TestMap,
    words: usize,
) -> Result<LaunchReport, MirrorError> {
    let k = m
        .backend()
        .test_kernel(TestKernel::CopyU32)
        .expect("kernel");
    launch(m, &k, words as u32, [src, out.addr()])
}

/// Whether the mirror's device is a zero-copy one.
pub(crate) fn zero_copy<B: Backend>(m: &Mirror<B>) -> bool {
    m.backend().host_windows().is_some()
}

/// How the suite's scenarios launch: every launch of every scenario goes
/// through one helper, which calls [`Mirror::launch`] or submits the launch
/// in a [`Mirror::scope`] and waits for it
/// ([`conformance_tests!`](crate::conformance_tests) runs each launching
/// scenario both ways).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LaunchMode {
    /// [`Mirror::launch`]: returns when the launch is done.
    #[default]
    Blocking,
    /// [`Mirror::scope`], [`Scope::launch`](hmm_core::mirror::Scope::launch)
    /// and [`Pending::wait`](hmm_core::mirror::Pending::wait): the launch
    /// runs on a thread of the scope.
    NonBlocking,
}

/// The launch mode of this thread and the launches made in it (shared with
/// the threads a scenario starts through [`spawn`]).
#[derive(Clone, Default)]
struct ModeCx {
    mode: LaunchMode,
    launches: Arc<AtomicU64>,
}

thread_local! {
    static MODE: RefCell<ModeCx> = RefCell::new(ModeCx::default());
}

/// Runs `f` with every suite launch made by this thread (and the threads
/// the scenario starts) in `mode`; returns `f`'s value and how many
/// launches went through the suite's launch helper.
pub fn with_launch_mode<R>(mode: LaunchMode, f: impl FnOnce() -> R) -> (R, u64) {
    let cx = ModeCx {
        mode,
        launches: Arc::new(AtomicU64::new(0)),
    };
    let counter = Arc::clone(&cx.launches);
    let old = MODE.with(|m| m.replace(cx));
    /// Puts the previous mode back, also when `f` panics.
    struct Restore(Option<ModeCx>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(old) = self.0.take() {
                MODE.with(|m| m.replace(old));
            }
        }
    }
    let restore = Restore(Some(old));
    let r = f();
    drop(restore);
    (r, counter.load(Ordering::Relaxed))
}

/// The launch mode of this thread.
pub fn launch_mode() -> LaunchMode {
    MODE.with(|m| m.borrow().mode)
}

/// `std::thread::spawn`, with this thread's launch mode carried over.
pub(crate) fn spawn<T, F>(f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let cx = MODE.with(|m| m.borrow().clone());
    std::thread::spawn(move || {
        MODE.with(|m| m.replace(cx));
        f()
    })
}

/// The suite's only way to launch: blocking or non-blocking as this
/// thread's [`LaunchMode`] says, with the same result either way.
pub(crate) fn launch<B: Backend, H: HostSide>(
    m: &Mirror<B, H>,
    kernel: &B::Kernel,
    n: u32,
    args: impl KernelArgs,
) -> Result<LaunchReport, MirrorError> {
    let cx = MODE.with(|m| m.borrow().clone());
    cx.launches.fetch_add(1, Ordering::Relaxed);
    match cx.mode {
        LaunchMode::Blocking => m.launch(kernel, n, args),
        LaunchMode::NonBlocking => m.scope(|s| {
            let p = s.launch(kernel, n, args);
            // Not asserted either way (the launch may be quick); exercises
            // the check beside a launch in flight.
            let _ = p.is_done();
            p.wait()
        }),
    }
}

/// Forks and migrations in one test process. A `fork()` gives every
/// migrated page of the process back (the prepare-fork handler,
/// `hmm_core::cpu::fork_prep`), which would change what a migration test
/// running beside it sees: migration tests hold this shared
/// ([`migrating`]), tests that fork hold it alone ([`forking`]).
static FORK_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by a migration test (shared).
pub(crate) fn migrating() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK_GATE.read().unwrap_or_else(|p| p.into_inner())
}

/// Held by a test that forks (alone).
pub(crate) fn forking() -> std::sync::RwLockWriteGuard<'static, ()> {
    FORK_GATE.write().unwrap_or_else(|p| p.into_inner())
}

/// Forks a child that runs `child` (only async-signal-safe work: memory
/// reads and writes) and exits with what it returns; returns that exit
/// status. The caller holds [`forking`]. A child that has not exited after
/// 20 s is killed and the test fails.
pub(crate) fn fork_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `child` (memory accesses, by this
    // function's contract) and `_exit`, all async-signal-safe, so forking
    // a multi-threaded test process is fine.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let t0 = std::time::Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: polling our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if t0.elapsed() > std::time::Duration::from_secs(20) {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the forked child hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        libc::WIFEXITED(status),
        "the child died: status {status:#x}"
    );
    libc::WEXITSTATUS(status)
}
