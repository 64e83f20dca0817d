//! `Userfaultfd::layout_changing`: true exactly while an `munmap` of a
//! registered range waits for its event to be read — the window in which
//! a sync point's scan can miss CPU writes to pages being discarded (the
//! sync point waits it out; `HostSpace::sync_point`). Prints a `SKIP` line
//! and passes where userfaultfd is unavailable, unless
//! `HMM_REQUIRE_UFFD=1`.

use std::time::{Duration, Instant};

use hmm_core::cpu::probe::{Capabilities, UffdAvailability};
use hmm_core::cpu::uffd::{Features, RegisterMode, UffdEvent, Userfaultfd};
use hmm_core::{VaRange, VirtAddr, PAGE_SIZE};

const PS: usize = PAGE_SIZE as usize;

fn map(pages: usize, prot: i32) -> usize {
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PS,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as usize
}

#[test]
fn layout_changing_spans_an_munmap_until_its_event_is_read() {
    if let UffdAvailability::Absent { detail, .. } = &Capabilities::get().uffd {
        if std::env::var("HMM_REQUIRE_UFFD").as_deref() == Ok("1") {
            panic!("HMM_REQUIRE_UFFD=1 but userfaultfd is unavailable: {detail}");
        }
        eprintln!("SKIP layout_changing_spans_an_munmap_until_its_event_is_read: {detail}");
        return;
    }
    let (uffd, _) =
        Userfaultfd::open(Features::EVENTS.difference(Features(1 << 1))).expect("open userfaultfd");
    let a = map(4, libc::PROT_READ | libc::PROT_WRITE);
    let range = VaRange::user_pages(VirtAddr(a as u64), (4 * PS) as u64).unwrap();
    uffd.register(range, RegisterMode::MISSING)
        .expect("register");
    // The probe page: mapped, never registered.
    let probe_at = map(1, libc::PROT_NONE);
    let probe = VaRange::user_pages(VirtAddr(probe_at as u64), PAGE_SIZE).unwrap();
    assert!(!uffd.layout_changing(probe), "nothing in flight yet");
    // The munmap sleeps until its UNMAP event is read; nobody reads yet.
    let t = std::thread::spawn(move || {
        // SAFETY: our own mapping, unmapped once, no reference into it.
        unsafe { libc::munmap(a as *mut libc::c_void, 4 * PS) }
    });
    let t0 = Instant::now();
    while !uffd.layout_changing(probe) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the munmap never showed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Still in flight until the event is read.
    std::thread::sleep(Duration::from_millis(20));
    assert!(uffd.layout_changing(probe));
    assert!(!t.is_finished(), "munmap waits for its event to be read");
    let mut evs = Vec::new();
    let t0 = Instant::now();
    while evs.is_empty() {
        uffd.read_events(&mut evs).expect("read");
        assert!(t0.elapsed() < Duration::from_secs(5), "no event");
    }
    assert!(
        matches!(evs[0], Ok(UffdEvent::Unmap { .. })),
        "{:?}",
        evs[0]
    );
    assert_eq!(t.join().expect("munmap thread"), 0);
    assert!(!uffd.layout_changing(probe), "the event was read");
    // SAFETY: our own probe page, no longer used.
    unsafe { libc::munmap(probe_at as *mut libc::c_void, PS) };
}
