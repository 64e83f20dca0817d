//! The kernel behaviour device-private migration (issue 17) will rest on,
//! checked on the machine that runs the tests (`docs/MIGRATION.md` says
//! how each fact shapes the design):
//!
//! 1. `mremap(MREMAP_MAYMOVE | MREMAP_DONTUNMAP)` of a range registered
//!    `MISSING | WP` moves its pages out atomically, reports one `REMAP`
//!    event (a self-inflicted event the monitor will have to recognise),
//!    and leaves the old range registered and empty: the next CPU read
//!    there is a missing-page fault on the userfaultfd.
//! 2. `UFFDIO_COPY` with `MODE_WP` resolves it with the data, and the page
//!    arrives write-protected: write tracking sees the next CPU write.
//! 3. With a `UFFD_USER_MODE_ONLY` userfaultfd (the first way
//!    `Userfaultfd::open` tries), a *kernel-mode* access to such a page —
//!    `read(2)` into it — fails with `EFAULT` instead of faulting to us.
//! 4. `fork` without a prepare step hands the child zeros where the pages
//!    were moved out (the child's copy of the range is not registered).
//!
//! Each test prints a `SKIP` line and passes where userfaultfd is
//! unavailable, unless `HMM_REQUIRE_UFFD=1`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmm_core::cpu::probe::{Capabilities, UffdAvailability};
use hmm_core::cpu::uffd::{Features, OpenMode, RegisterMode, UffdEvent, Userfaultfd};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

const PS: usize = PAGE_SIZE as usize;
const FILL: u8 = 0x5a;

fn require_uffd(test: &str) -> bool {
    if let UffdAvailability::Absent { detail, .. } = &Capabilities::get().uffd {
        if std::env::var("HMM_REQUIRE_UFFD").as_deref() == Ok("1") {
            panic!("{test}: HMM_REQUIRE_UFFD=1 but userfaultfd is unavailable: {detail}");
        }
        eprintln!("SKIP {test}: userfaultfd unavailable: {detail}");
        return false;
    }
    true
}

/// A userfaultfd with a reader thread that serves every missing-page fault
/// with a page of `FILL` (write-protected) and records `REMAP` events.
struct Server {
    uffd: Arc<Userfaultfd>,
    faults: Arc<AtomicU64>,
    remaps: Arc<Mutex<Vec<(u64, u64, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        // No EVENT_FORK: a fork in one test must not wait on another
        // test's reader (the child's copy of a range then loses its
        // registration, as it would with the monitor, which closes the
        // child's fd).
        let wanted = Features::EVENTS
            .union(Features::WP_TRACKING)
            .difference(Features(1 << 1 /* UFFD_FEATURE_EVENT_FORK */));
        let (uffd, _) = Userfaultfd::open(wanted).expect("open userfaultfd");
        let uffd = Arc::new(uffd);
        let faults = Arc::new(AtomicU64::new(0));
        let remaps = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (uffd, faults, remaps, stop) =
                (uffd.clone(), faults.clone(), remaps.clone(), stop.clone());
            std::thread::spawn(move || {
                let page = vec![FILL; PS];
                let mut evs = Vec::new();
                // Relaxed: a stop flag polled in a loop; nothing is published.
                while !stop.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd: uffd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the call.
                    unsafe { libc::poll(&mut p, 1, 20) };
                    evs.clear();
                    if uffd.read_events(&mut evs).is_err() {
                        continue;
                    }
                    for ev in evs.drain(..) {
                        match ev {
                            Ok(UffdEvent::Pagefault {
                                addr, wp: false, ..
                            }) => {
                                // Counted before the copy wakes the faulting
                                // thread, which reads the count next. SeqCst:
                                // the wake-up is a syscall the memory model does
                                // not see; the strongest ordering costs nothing
                                // here.
                                faults.fetch_add(1, Ordering::SeqCst);
                                // SAFETY: the faulting page is missing and only
                                // reached through raw pointers in these tests.
                                let r = unsafe { uffd.copy_in(addr.page_down(), &page, true) };
                                r.expect("UFFDIO_COPY");
                            }
                            Ok(UffdEvent::Remap { from, to, len }) => {
                                remaps.lock().unwrap().push((from.get(), to.get(), len));
                            }
                            _ => {}
                        }
                    }
                }
            })
        };
        Server {
            uffd,
            faults,
            remaps,
            stop,
            thread: Some(thread),
        }
    }

    fn faults(&self) -> u64 {
        // SeqCst: pairs with the server's increment, made before the copy
        // that let this thread's access return.
        self.faults.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Relaxed: see the reader loop.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `pages` populated private anonymous pages (page `i` filled with `i + 1`),
/// registered `MISSING | WP` on `s`.
fn registered(s: &Server, pages: usize) -> usize {
    let len = pages * PS;
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    for i in 0..pages {
        // SAFETY: page `i` of our own mapping.
        unsafe { std::ptr::write_bytes(p.cast::<u8>().add(i * PS), i as u8 + 1, PS) };
    }
    let r = VaRange::user_pages(VirtAddr(p as u64), len as u64).unwrap();
    s.uffd
        .register(r, RegisterMode::MISSING | RegisterMode::WP)
        .expect("register MISSING | WP on populated anonymous memory");
    p as usize
}

/// Moves `pages` pages at `at` out with `MREMAP_DONTUNMAP`; returns where.
fn detach(at: usize, pages: usize) -> usize {
    // SAFETY: a range of our own mapping; the kernel picks the destination.
    let to = unsafe {
        libc::mremap(
            at as *mut libc::c_void,
            pages * PS,
            pages * PS,
            libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP,
            // glibc reads a destination hint when DONTUNMAP is set: none.
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    assert_ne!(
        to,
        libc::MAP_FAILED,
        "mremap(MREMAP_DONTUNMAP) failed: {}",
        std::io::Error::last_os_error()
    );
    to as usize
}

fn read_byte(addr: usize) -> u8 {
    // SAFETY: a byte of one of our mappings (a missing page is served by
    // the test's server before the load completes).
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// `struct pm_scan_arg` and `struct page_region` (Linux 6.7 uapi).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// Pages of `r` written since they were last write-protected (a read-only
/// scan: nothing is re-armed).
fn written_pages(r: VaRange) -> u64 {
    let f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    let mut regions = [PageRegion::default(); 16];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start: r.start().get(),
        end: r.end().get(),
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_mask: PAGE_IS_WRITTEN,
        return_mask: PAGE_IS_WRITTEN,
        ..PmScanArg::default()
    };
    // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
    // regions into `regions`, both exclusively ours for the call.
    let n = unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
    assert!(n >= 0, "PAGEMAP_SCAN: {}", std::io::Error::last_os_error());
    regions[..n as usize]
        .iter()
        .map(|g| (g.end - g.start) / PAGE_SIZE)
        .sum()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn mremap_dontunmap_moves_pages_out_and_leaves_missing_faults() {
    if !require_uffd("mremap_dontunmap_moves_pages_out_and_leaves_missing_faults") {
        return;
    }
    let s = Server::start();
    let a = registered(&s, 16);
    let mid = a + 4 * PS;
    let moved = detach(mid, 8);
    // The data moved, whole.
    for i in 0..8 {
        assert_eq!(read_byte(moved + i * PS + 7), i as u8 + 5, "moved page {i}");
    }
    wait_for("the REMAP event", || !s.remaps.lock().unwrap().is_empty());
    assert_eq!(
        s.remaps.lock().unwrap()[0],
        (mid as u64, moved as u64, (8 * PS) as u64),
        "one REMAP event, old range to new"
    );
    // The destination inherited the registration: unregistering it works.
    let dst = VaRange::user_pages(VirtAddr(moved as u64), (8 * PS) as u64).unwrap();
    s.uffd
        .unregister(dst)
        .expect("the destination was registered");
    // The old range is empty and still registered: a read faults to us.
    let f0 = s.faults();
    assert_eq!(read_byte(mid + 3 * PS + 100), FILL);
    assert_eq!(s.faults(), f0 + 1, "one missing-page fault served");
    // Pages outside the moved range never left.
    assert_eq!(read_byte(a + 3 * PS), 4);
    assert_eq!(read_byte(a + 12 * PS), 13);
    // SAFETY: our own mappings, no longer used. (The range's UNMAP event
    // is read by the server, which is still running.)
    unsafe {
        libc::munmap(moved as *mut libc::c_void, 8 * PS);
        libc::munmap(a as *mut libc::c_void, 16 * PS);
    }
}

#[test]
fn a_page_copied_in_write_protected_is_tracked() {
    if !require_uffd("a_page_copied_in_write_protected_is_tracked") {
        return;
    }
    if !Capabilities::get().wp_async_usable() {
        eprintln!("SKIP a_page_copied_in_write_protected_is_tracked: no WP_ASYNC");
        return;
    }
    let s = Server::start();
    let a = registered(&s, 4);
    let moved = detach(a, 4);
    assert_eq!(read_byte(a + 2 * PS), FILL, "served by the copy");
    let page = VaRange::user_pages(VirtAddr((a + 2 * PS) as u64), PAGE_SIZE).unwrap();
    let written = |r: VaRange| written_pages(r);
    assert_eq!(
        written(page),
        0,
        "UFFDIO_COPY_MODE_WP: the page arrives protected"
    );
    // SAFETY: a byte of our own mapping, now present.
    unsafe { std::ptr::write_volatile((a + 2 * PS + 9) as *mut u8, 1) };
    assert_eq!(written(page), 1, "the CPU write is seen");
    // SAFETY: our own mappings, no longer used.
    unsafe {
        libc::munmap(moved as *mut libc::c_void, 4 * PS);
        libc::munmap(a as *mut libc::c_void, 4 * PS);
    }
}

#[test]
fn a_kernel_access_to_a_moved_out_page_is_efault_on_a_user_mode_only_fd() {
    let test = "a_kernel_access_to_a_moved_out_page_is_efault_on_a_user_mode_only_fd";
    if !require_uffd(test) {
        return;
    }
    let s = Server::start();
    if s.uffd.open_mode() != OpenMode::UserModeOnly {
        eprintln!("SKIP {test}: the userfaultfd handles kernel faults too here");
        return;
    }
    let a = registered(&s, 2);
    let moved = detach(a, 2);
    let mut p = [0i32; 2];
    // SAFETY: `p` has room for the two fds.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: writing 5 bytes from a static string to our pipe.
    assert_eq!(unsafe { libc::write(p[1], b"hello".as_ptr().cast(), 5) }, 5);
    let f0 = s.faults();
    // SAFETY: read(2) into a page of our own mapping (missing: the kernel
    // either faults it to the userfaultfd or fails the call).
    let r = unsafe { libc::read(p[0], (a + PS) as *mut libc::c_void, 5) };
    let err = std::io::Error::last_os_error();
    assert_eq!(r, -1, "read(2) into a moved-out page");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    assert_eq!(s.faults(), f0, "no fault reached the userfaultfd");
    // SAFETY: our own fds and mappings, no longer used.
    unsafe {
        libc::close(p[0]);
        libc::close(p[1]);
        libc::munmap(moved as *mut libc::c_void, 2 * PS);
        libc::munmap(a as *mut libc::c_void, 2 * PS);
    }
}

#[test]
fn a_forked_child_reads_moved_out_pages_as_zero() {
    if !require_uffd("a_forked_child_reads_moved_out_pages_as_zero") {
        return;
    }
    let s = Server::start();
    let a = registered(&s, 2);
    let moved = detach(a, 2);
    // SAFETY: the child only reads one byte and calls `_exit`, both
    // async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let b = read_byte(a + PS + 1);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(i32::from(b)) };
    }
    assert!(pid > 0, "fork failed");
    let mut st = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    assert!(libc::WIFEXITED(st));
    assert_eq!(
        libc::WEXITSTATUS(st),
        0,
        "without a prepare-fork step the child sees zeros where the data was"
    );
    // SAFETY: our own mappings, no longer used.
    unsafe {
        libc::munmap(moved as *mut libc::c_void, 2 * PS);
        libc::munmap(a as *mut libc::c_void, 2 * PS);
    }
}
