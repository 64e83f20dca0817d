//! The floor under a CPU fault on migrated memory, measured in the same
//! run: a bare userfaultfd missing-page round trip on this machine, with
//! nothing of hmm-rs's in it but the `Userfaultfd` wrapper.
//!
//! A thread touches a page of a range registered in missing mode and
//! sleeps in the kernel; a second thread, asleep in `poll(2)` on the
//! userfaultfd, wakes, reads the fault and answers it with `UFFDIO_COPY`,
//! which wakes the first. Three variants:
//!
//! - **direct**: the reading thread answers with one page, both threads
//!   pinned to one CPU (the fewest threads and wake-ups any userfaultfd
//!   design can have: the floor);
//! - **direct, 64 KiB**: the same, answering with the 64 KiB
//!   neighbourhood a sparse fault-back brings back;
//! - **one hand-off**: unpinned, the reading thread passes the fault to a
//!   third thread, which answers with one page (hmm-rs's shape: the
//!   monitor's reader must never wait, so another thread serves the
//!   fault, `hmm_core::cpu::migration`).
//!
//! On a VM a wake-up that crosses vCPUs costs tens of microseconds; that
//! is what separates the first and the last.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm_core::cpu::uffd::{Features, RegisterMode, UffdEvent, Userfaultfd};
use hmm_core::{VaRange, VirtAddr};

/// Median round trips (the faulting thread's view).
#[derive(Clone, Copy, Debug)]
pub struct Floor {
    /// The reading thread answers with one page, on the faulting thread's
    /// CPU.
    pub direct: Duration,
    /// The same, answering with 64 KiB.
    pub direct_64k: Duration,
    /// The reading thread answers with one page; no pinning (where the
    /// scheduler puts the two threads).
    pub direct_unpinned: Duration,
    /// The reading thread hands the fault to another, which answers with
    /// one page; no pinning.
    pub handoff: Duration,
}

const PAGE: usize = 4096;
/// Pages in the 64 KiB variant's answer.
const BLOCK: usize = 16;

/// All three variants, `faults` round trips each; `Err` says why they
/// could not be measured (no userfaultfd here).
pub fn measure(faults: usize) -> Result<Floor, String> {
    Ok(Floor {
        direct: round_trips(
            faults,
            Shape::Direct {
                pages: 1,
                pinned: true,
            },
        )?,
        direct_64k: round_trips(
            faults,
            Shape::Direct {
                pages: BLOCK,
                pinned: true,
            },
        )?,
        direct_unpinned: round_trips(
            faults,
            Shape::Direct {
                pages: 1,
                pinned: false,
            },
        )?,
        handoff: round_trips(faults, Shape::HandOff)?,
    })
}

#[derive(Clone, Copy)]
enum Shape {
    Direct { pages: usize, pinned: bool },
    HandOff,
}

/// Pins the calling thread to `cpu` (`None`: to every CPU it had),
/// returning the set it had; best effort.
fn pin(cpu: Option<usize>, old: Option<libc::cpu_set_t>) -> Option<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls get its
    // address and size.
    unsafe {
        let mut had: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut had) != 0 {
            return None;
        }
        let set = match (cpu, old) {
            (Some(c), _) => {
                let mut s: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(c, &mut s);
                s
            }
            (None, Some(o)) => o,
            (None, None) => return Some(had),
        };
        libc::sched_setaffinity(0, size, &set);
        Some(had)
    }
}

/// A private anonymous mapping, unmapped on drop.
struct Map {
    base: *mut libc::c_void,
    len: usize,
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing refers to it any more.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn round_trips(faults: usize, shape: Shape) -> Result<Duration, String> {
    let faults = faults.max(1);
    let (handoff, answer_pages, pinned) = match shape {
        Shape::Direct { pages, pinned } => (false, pages, pinned),
        Shape::HandOff => (true, 1, false),
    };
    // SAFETY: no arguments; returns the CPU or -1.
    let cpu = pinned
        .then(|| unsafe { libc::sched_getcpu() })
        .and_then(|c| usize::try_from(c).ok());
    let (uffd, _) = Userfaultfd::open(Features::NONE).map_err(|e| e.to_string())?;
    let uffd = Arc::new(uffd);
    // A fault every 64 KiB: no fault lands on a page an earlier answer
    // brought in.
    let stride = BLOCK * PAGE;
    let len = faults * stride;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let map = Map { base, len };
    let range = VaRange::from_start_len(VirtAddr(map.base as u64), len as u64)
        .map_err(|e| e.to_string())?;
    uffd.register(range, RegisterMode::MISSING)
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded::<VirtAddr>();
    let answer = move |uffd: &Userfaultfd, at: VirtAddr| {
        static DATA: [u8; BLOCK * PAGE] = [7; BLOCK * PAGE];
        // SAFETY: `at` starts a missing stride of our own registered
        // mapping (faults land on the first page of a 64 KiB stride),
        // which no Rust reference covers (the toucher reads it through a
        // raw pointer). `EEXIST` cannot happen: each stride faults once.
        if unsafe { uffd.copy_in(at.page_down(), &DATA[..answer_pages * PAGE], false) }.is_err() {
            if let Ok(r) = VaRange::from_start_len(at.page_down(), PAGE as u64) {
                let _ = uffd.wake(r);
            }
        }
    };
    let server = handoff.then(|| {
        let uffd = Arc::clone(&uffd);
        std::thread::spawn(move || {
            while let Ok(at) = rx.recv() {
                answer(&uffd, at);
            }
        })
    });
    let reader = {
        let (uffd, stop) = (Arc::clone(&uffd), Arc::clone(&stop));
        std::thread::spawn(move || {
            pin(cpu, None);
            let mut buf = Vec::with_capacity(Userfaultfd::READ_BATCH);
            while !stop.load(Ordering::Relaxed) {
                let mut fd = libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the fd stays open (the Arc).
                if unsafe { libc::poll(&mut fd, 1, 20) } <= 0 {
                    continue;
                }
                buf.clear();
                if uffd.read_events(&mut buf).is_err() {
                    return;
                }
                for ev in buf.drain(..) {
                    if let Ok(UffdEvent::Pagefault { addr, .. }) = ev {
                        if handoff {
                            let _ = tx.send(addr);
                        } else {
                            answer(&uffd, addr);
                        }
                    }
                }
            }
        })
    };
    let had = cpu.and_then(|c| pin(Some(c), None));
    let mut took: Vec<Duration> = (0..faults)
        .map(|i| {
            let p = map.base.cast::<u8>().wrapping_add(i * stride);
            let t = Instant::now();
            // SAFETY: a byte of our own mapping, read through a raw
            // pointer: the read faults and waits for the answer.
            let v = unsafe { p.read_volatile() };
            let d = t.elapsed();
            std::hint::black_box(v);
            d
        })
        .collect();
    if had.is_some() {
        pin(None, had);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    if let Some(s) = server {
        let _ = s.join();
    }
    let _ = uffd.unregister(range);
    drop(map);
    took.sort();
    Ok(took[took.len() / 2])
}
