//! `mprotect` of mirrored memory, followed both ways (narrowing and
//! widening) by one explicit call (issue #19, finding 3): the device sees
//! the protection the CPU has after the call, never the cached one.

use hmm::{AccessError, Device, Driver, MirrorConfig, MirrorError, VaRange};

mod common;
use common::ADD_ONE;

const PAGE: usize = 4096;

struct Page(*mut u32);

impl Page {
    fn new() -> Page {
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Page(p.cast())
    }
    fn protect(&self, prot: i32) {
        // SAFETY: changes the protection of our own mapping, whole.
        assert_eq!(unsafe { libc::mprotect(self.0.cast(), PAGE, prot) }, 0);
    }
    fn word(&self, i: usize) -> u32 {
        assert!(i < PAGE / 4);
        // SAFETY: in bounds of the mapping, which stays readable.
        unsafe { self.0.add(i).read_volatile() }
    }
    fn range(&self) -> VaRange {
        VaRange::from_start_len(hmm::VirtAddr::from_ptr(self.0), PAGE as u64).unwrap()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.0.cast(), PAGE) };
    }
}

/// How a test tells the mirror about the `mprotect`.
#[derive(Clone, Copy, Debug)]
enum Tell {
    /// `Mirror::protection_changed` (the facade's one call).
    Mirror,
    /// The primitive under it: an explicit `Protection` invalidation of
    /// the address space.
    Space,
}

#[test]
fn protection_changes_are_followed_both_ways() {
    for tell in [Tell::Mirror, Tell::Space] {
        follow(tell);
    }
}

fn follow(tell: Tell) {
    for driver in [Driver::Cpu, Driver::Wgpu, Driver::Vulkan] {
        if !driver.is_built() {
            continue;
        }
        let opened = match Device::open(Some(driver)) {
            Ok(o) => o,
            Err(e) if std::env::var_os("HMM_REQUIRE_GPU").is_none() => {
                println!("skip: no {} device: {e}", driver.name());
                continue;
            }
            Err(e) => panic!("{}: {e} (HMM_REQUIRE_GPU is set)", driver.name()),
        };
        let mirror = hmm::mirror(opened.device, MirrorConfig::default()).unwrap();
        let kernel = mirror.backend().kernel(&ADD_ONE).unwrap();
        let page = Page::new();
        let n = (PAGE / 4) as u32;
        mirror.run(&kernel, n, (page.0,)).unwrap();
        assert!(
            (0..PAGE / 4).all(|i| page.word(i) == 1),
            "{}",
            driver.name()
        );

        // Narrowing: the device's write is refused, typed, nothing written.
        page.protect(libc::PROT_READ);
        changed(&mirror, tell, page.range());
        match mirror.run(&kernel, n, (page.0,)) {
            Err(MirrorError::DeviceFault {
                write: true,
                reason: AccessError::ReadOnly,
                ..
            }) => {}
            r => panic!(
                "{} {tell:?}: write to a read-only page: {r:?}",
                driver.name()
            ),
        }
        assert!(
            (0..PAGE / 4).all(|i| page.word(i) == 1),
            "{}",
            driver.name()
        );

        // Widening: the same call makes the page writable for the device.
        page.protect(libc::PROT_READ | libc::PROT_WRITE);
        changed(&mirror, tell, page.range());
        mirror
            .run(&kernel, n, (page.0,))
            .unwrap_or_else(|e| panic!("{} {tell:?}: after widening: {e}", driver.name()));
        assert!(
            (0..PAGE / 4).all(|i| page.word(i) == 2),
            "{}",
            driver.name()
        );
    }
}

fn changed(mirror: &hmm::Mirror<Device>, tell: Tell, range: VaRange) {
    match tell {
        Tell::Mirror => mirror.protection_changed(range).unwrap(),
        Tell::Space => mirror
            .host()
            .space()
            .invalidate(range, hmm::EventKind::Protection),
    }
}

/// Issue #19, finding 2: `mprotect(PROT_READ)` *without* telling the
/// mirror, then a launch that writes the page. The write-back is refused:
/// the launch is a typed error naming the page (not `Ok` with the writes
/// lost), the CPU page is unchanged, and the device keeps its data — a
/// launch while the page is still read-only reports the refusal again
/// without running (so does one after `protection_changed` while it is
/// still read-only: the callback's refusal is remembered), and once the
/// page is writable again the kept data is written: by the next launch
/// (`Retry::Launch`, which then runs on top of it) or by
/// `protection_changed` (`Retry::Tell`).
#[test]
fn untold_mprotect_keeps_device_writes_and_reports_them() {
    for retry in [Retry::Launch, Retry::Tell] {
        refused(retry);
    }
}

#[derive(Clone, Copy, Debug)]
enum Retry {
    Launch,
    Tell,
}

fn refused(retry: Retry) {
    for driver in [Driver::Cpu, Driver::Wgpu, Driver::Vulkan] {
        if !driver.is_built() {
            continue;
        }
        let opened = match Device::open(Some(driver)) {
            Ok(o) => o,
            Err(e) if std::env::var_os("HMM_REQUIRE_GPU").is_none() => {
                println!("skip: no {} device: {e}", driver.name());
                continue;
            }
            Err(e) => panic!("{}: {e} (HMM_REQUIRE_GPU is set)", driver.name()),
        };
        let name = driver.name();
        let mirror = hmm::mirror(opened.device, MirrorConfig::default()).unwrap();
        let kernel = mirror.backend().kernel(&ADD_ONE).unwrap();
        let page = Page::new();
        let n = (PAGE / 4) as u32;
        let r = mirror.run(&kernel, n, (page.0,)).unwrap();
        assert_eq!(r.pages_out, 1, "{name}");
        assert!((0..PAGE / 4).all(|i| page.word(i) == 1), "{name}");

        // Read-only behind the mirror's back: the device still holds a
        // writable copy, so the kernel runs — and its writes cannot go back.
        page.protect(libc::PROT_READ);
        let base = page.0 as u64;
        match mirror.run(&kernel, n, (page.0,)) {
            Err(MirrorError::WriteBackRefused { addr })
                if (base..base + PAGE as u64).contains(&addr.0) => {}
            r => panic!("{name} {retry:?}: write-back to a read-only page: {r:?}"),
        }
        assert!(
            (0..PAGE / 4).all(|i| page.word(i) == 1),
            "{name}: nothing written"
        );
        // Still read-only: the next launch reports it again, before running.
        match mirror.run(&kernel, n, (page.0,)) {
            Err(MirrorError::WriteBackRefused { .. }) => {}
            r => panic!("{name} {retry:?}: launch with a refusal pending: {r:?}"),
        }
        assert!((0..PAGE / 4).all(|i| page.word(i) == 1), "{name}");
        // Told while still read-only: the invalidation callback's
        // write-back is refused too, where no caller can be told; the data
        // stays, and the next launch reports it.
        mirror.protection_changed(page.range()).unwrap();
        assert!((0..PAGE / 4).all(|i| page.word(i) == 1), "{name}");
        match mirror.run(&kernel, n, (page.0,)) {
            Err(MirrorError::WriteBackRefused { .. }) => {}
            r => panic!("{name} {retry:?}: launch after a refused callback: {r:?}"),
        }

        page.protect(libc::PROT_READ | libc::PROT_WRITE);
        match retry {
            Retry::Launch => {
                // The kept data (2) is written first, then the kernel runs
                // on it once (3).
                let r = mirror
                    .run(&kernel, n, (page.0,))
                    .unwrap_or_else(|e| panic!("{name}: after widening: {e}"));
                assert_eq!(r.pages_out, 1, "{name}");
                assert!(
                    (0..PAGE / 4).all(|i| page.word(i) == 3),
                    "{name}: {}",
                    page.word(0)
                );
            }
            Retry::Tell => {
                mirror.protection_changed(page.range()).unwrap();
                assert!(
                    (0..PAGE / 4).all(|i| page.word(i) == 2),
                    "{name}: {}",
                    page.word(0)
                );
                mirror.run(&kernel, n, (page.0,)).unwrap();
                assert!((0..PAGE / 4).all(|i| page.word(i) == 3), "{name}");
            }
        }
    }
}
