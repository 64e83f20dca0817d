//! The CPU side of device-private migration (issue 17): moving a range's
//! pages out of the process, serving CPU faults on them, giving them back.
//!
//! `docs/MIGRATION.md` has the kernel facts this stands on (each checked
//! by `tests/migration_facts.rs`) and the whole design; the mirror's half
//! (which pages are migrated, where their data is) is in
//! `mirror::migrate`.
//!
//! # Moving pages out ([`HostSpace::detach_for_migration`](super::host::HostSpace::detach_for_migration))
//!
//! 1. The range is *armed* ([`EventMonitor::arm_missing`](super::monitor::EventMonitor::arm_missing)): registered
//!    `MISSING | WP` on the monitor's userfaultfd, so a CPU access to a
//!    page that is not there waits for us instead of getting a zero page.
//! 2. Its owner (the mirror) is recorded, so faults there reach it.
//! 3. The monitor is told to expect our own `REMAP` event
//!    ([`EventMonitor::expect_own_remap`](super::monitor::EventMonitor::expect_own_remap)): the destructive invalidation it
//!    would otherwise run frees the device slots that are about to hold the
//!    only copy.
//! 4. `mremap(MREMAP_MAYMOVE | MREMAP_DONTUNMAP | MREMAP_FIXED)` moves the
//!    pages to a scratch mapping reserved beforehand, atomically: a CPU
//!    write lands before the move (and travels with the page) or after it
//!    (and faults). The old range stays mapped, registered and empty.
//! 5. The scratch is unregistered (no event) and handed to the caller,
//!    which copies it to the device — the CPU's bytes as of the move — and
//!    drops it.
//!
//! # Serving faults
//!
//! Three threads may serve a fault, the first that can without waiting:
//!
//! 1. **The monitor's reader, as it reads the fault**
//!    ([`InvalidationSink::missing_fault_now`](super::monitor::InvalidationSink::missing_fault_now),
//!    `Migration::serve_now`, [`FaultBack::fault_back_now`]), when
//!    every event it read before the fault has been handled (so the fault
//!    cannot overtake a discard or an unmap of its page; loom model
//!    `reader_serves_only_after_earlier_events`), the owner's device does
//!    its copies in host code on the calling thread
//!    ([`Backend::host_synchronous`](crate::mirror::backend::Backend::host_synchronous):
//!    the `cpu` driver), and every lock on the way is free. This is the
//!    fewest wake-ups a userfaultfd design can have — the faulting thread
//!    wakes the reader, whose `UFFDIO_COPY` wakes it back — and on a VM
//!    each wake-up that crosses vCPUs costs tens of microseconds.
//! 2. **The handler**, in the fault's place in the event order.
//! 3. **The fault-back server**, which may wait.
//!
//! The monitor's handler thread must never wait; it hands a missing-page
//! fault to [`InvalidationSink::missing_fault`](super::monitor::InvalidationSink::missing_fault), in the fault's place in
//! the event order. That first asks the owners whose ranges contain the
//! page to serve it *without waiting* ([`FaultBack::try_fault_back`]: the
//! mirror try-locks its driver lock and answers only if no submission of
//! its runs), on the handler thread; where one would have to wait, the
//! fault is queued for this module's server thread (`hmm-fault-back`),
//! which asks again, waiting ([`FaultBack::fault_back`]). Served on the
//! handler, a fault costs one thread wake-up less: on a VM a wake-up that
//! crosses vCPUs is tens of microseconds (the `iterate` scenario of
//! `hmm-bench` prints the round trips it is judged against).
//!
//! An owner that holds the page gives it back itself
//! ([`HostSpace::give_back`](super::host::HostSpace::give_back), `UFFDIO_COPY`, which also wakes the waiting
//! thread): the faulting page alone first, so the thread resumes while the
//! rest of its neighbourhood is read back and installed. A page nobody
//! holds (a hole of an armed range: never populated, or discarded since)
//! gets a zero page, what the CPU would have read. A page whose owner
//! cannot give it back (the device is lost) is poisoned: the access gets
//! `SIGBUS`, never a zero page.
//!
//! # Deadlock argument
//!
//! - The monitor's reader reads every event other threads wait on, so it
//!   must never wait for anything at all. It serves a fault only through
//!   try-locks (the owner list, the monitor's armed set, the driver lock
//!   with no submission running); the copies it makes are loads and
//!   stores on its own thread (a host-synchronous device: no queue, no
//!   worker that could wait for an event); a `UFFDIO_COPY` the kernel
//!   refuses for now (`EAGAIN`: a layout event is pending, which only the
//!   reader can read) is not retried but reported
//!   ([`GiveBack::Busy`](super::host::GiveBack::Busy)): the page stays
//!   held, and the fault goes on to the handler untouched. The only plain
//!   lock it takes is a mirror's `pending` list, whose holders hold it for
//!   a list edit or under the driver lock (which the reader then holds).
//!   It does not serve where `FORK` events are on: serving allocates, and a
//!   forking thread holds the allocator's locks while it waits for the
//!   reader (`monitor`, "Fork").
//! - The monitor's handler never waits for the server or for a mirror's driver lock on
//!   a fault's behalf: it serves a fault only through a *try*-lock with
//!   no submission running, else a fault is a channel send. Serving, it
//!   waits only for the device's copies and for `UFFDIO_COPY`, which the
//!   kernel refuses (`EAGAIN`, retried) only until the *reader* has read
//!   a pending layout event — never on the handler. A thread that waits
//!   for the handler (a sync point's `settle`) while holding the driver
//!   lock makes the try-lock fail; one that holds another mirror's lock
//!   is not in the way.
//! - The server waits for a mirror's driver lock (and for its running
//!   submission) and holds nothing anyone else waits for.
//! - No holder of a driver lock touches a migrated page's CPU side: the
//!   mirror gives pages back with `UFFDIO_COPY` (an ioctl, which cannot
//!   fault), and its write-back, foreign-writer check and verification
//!   skip migrated pages. The `mremap` of step 4 waits only for the
//!   monitor's *reader* to read its event.
//! - Devices that run on this process's threads (the cpu driver's
//!   closures, lavapipe) read pool slots in copy mode, never CPU memory.
//!
//! A thread that touches a migrated page while a launch of its owner runs
//! waits until the launch ends (as a CPU touch of a device-private page
//! waits for the device in Linux HMM).
//!
//! # Limits and corner cases (issue 17, stated)
//!
//! - `fork()` through a raw system call: the child reads zeros where
//!   pages are migrated (the fact in `migration_facts.rs`). A libc
//!   `fork()` runs the prepare-fork handler of [`fork_prep`](super::fork_prep), which gives
//!   every migrated page back first.
//! - A *kernel-mode* access — `read(2)` into a migrated buffer, or any
//!   system call that writes or reads it — faults to the monitor and is
//!   served like any other on a full userfaultfd (what `Userfaultfd::open`
//!   gets first where the process may and `WP_ASYNC` exists). On a
//!   user-mode-only one (an unprivileged process) it fails with `EFAULT`
//!   instead; [`HostSpace::migration_support`](super::host::HostSpace::migration_support)
//!   says so. Kernel-mode faults do not change the deadlock argument: the
//!   mirror's own kernel-mode copies (`process_vm_*`, populates) skip
//!   migrated pages as its user-mode copies do, and fill holes nobody
//!   holds with `UFFDIO_COPY` first.
//! - A store from under the driver lock into a hole of an armed range —
//!   a launch's write-back into a page the program discarded during the
//!   launch — is a missing-page fault whose server must not wait for that
//!   lock: the discard's zap is queued (the lock was held), and
//!   [`FaultBack::fault_back`] answers a page a queued zap covers at once
//!   (a zero page), before taking the lock.

use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::monitor::FaultNow;
use super::scratch::ScratchMap;
use super::uffd::{OpenMode, Userfaultfd};
use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};

/// What a fault-back request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultBackOutcome {
    /// The owner gave the page back (the waiting thread is woken).
    Served,
    /// The owner does not hold the page (not migrated, or already back).
    NotHeld,
    /// The owner holds the page's only copy and cannot give it back (its
    /// device is lost): the page must be poisoned.
    Lost,
}

/// Something that holds the only copy of migrated pages (a mirror).
pub trait FaultBack: Send + Sync {
    /// A CPU thread waits on `page`: give it back (and whatever
    /// neighbourhood the owner chooses) if it is held here.
    fn fault_back(&self, page: VirtAddr) -> FaultBackOutcome;

    /// [`FaultBack::fault_back`] if it can be done without waiting for a
    /// lock or for running device work; `None` if it cannot (the request
    /// then goes to the server thread, which waits). Called on the event
    /// monitor's handler thread, in the fault's place in the event order:
    /// must never wait for another thread that may wait for the handler
    /// (see "Deadlock argument" in the module docs). Default: `None`.
    fn try_fault_back(&self, page: VirtAddr) -> Option<FaultBackOutcome> {
        let _ = page;
        None
    }

    /// [`FaultBack::try_fault_back`] on the event monitor's *reader*, the
    /// moment the fault is read: only if it needs no waiting of any kind
    /// and no allocator call — every lock try-locked, no device work (a
    /// device whose copies are plain host code on the calling thread), a
    /// `UFFDIO_COPY` the kernel refuses for now
    /// ([`GiveBack::Busy`](super::host::GiveBack::Busy)) not retried, no
    /// `malloc`/`free` (a thread trimming the heap holds the allocator's
    /// lock while it waits for the reader). `None` leaves the page as it
    /// was (held, the fault unresolved) and the fault goes on to the
    /// handler. `Some((outcome, more))`: `more` asks for the fault to
    /// reach the handler as well (the owner has more to do, without
    /// hurry). Default: `None`.
    fn fault_back_now(&self, page: VirtAddr) -> Option<(FaultBackOutcome, bool)> {
        let _ = page;
        None
    }

    /// An `mremap` moved `old` to `to`: pages held for `old` now belong
    /// at `to`. Called on the event monitor's handler thread: must not
    /// wait. Default: nothing.
    fn moved(&self, old: VaRange, to: VirtAddr) {
        let _ = (old, to);
    }

    /// The process is about to fork (`fork_prep`): give back every page
    /// held here, so the child is made from memory that holds the data.
    /// Called in the forking thread, before the child exists. Default:
    /// nothing.
    fn before_fork(&self) {}
}

/// The pages a migration moved out of the process: a private scratch
/// mapping, unmapped on drop (or, from a host other than [`HostSpace`](super::host::HostSpace), a
/// copy of them).
pub struct Detached {
    pages: Pages,
    /// Where the pages came from.
    from: VaRange,
}

enum Pages {
    Moved(ScratchMap),
    Copied(Vec<u8>),
}

impl Detached {
    /// The pages of `from`, moved out by a host other than [`HostSpace`](super::host::HostSpace)
    /// (an in-memory fake under test): `bytes` holds them in order,
    /// `from.len()` bytes.
    pub fn from_bytes(from: VaRange, bytes: Vec<u8>) -> Detached {
        Detached {
            pages: Pages::Copied(bytes),
            from,
        }
    }

    /// The range the pages were moved out of.
    pub fn from(&self) -> VaRange {
        self.from
    }

    /// The pages' bytes as of the move, in address order.
    pub fn bytes(&self) -> &[u8] {
        match &self.pages {
            // SAFETY: the scratch is a private read-write mapping of `len`
            // bytes that only this value knows about (its address never
            // left `detach_for_migration`, and it is unregistered from the
            // userfaultfd, so a hole reads as zeros instead of faulting to
            // us); it lives as long as `self`.
            Pages::Moved(map) => unsafe {
                std::slice::from_raw_parts(map.ptr().cast::<u8>(), map.len())
            },
            Pages::Copied(v) => v,
        }
    }
}

/// The owners of migrated ranges, and the fault-back server.
pub(crate) struct Migration {
    /// Weak: the monitor owns the userfaultfd, and closing it when the
    /// monitor stops is what unregisters every range. A server thread
    /// holding it open would leave ranges registered with nobody reading
    /// events, and the next `munmap` there — the server's own exit
    /// unmaps its signal stack — would wait forever (seen in CI).
    uffd: Weak<Userfaultfd>,
    owners: Mutex<Vec<(VaRange, Weak<dyn FaultBack>)>>,
    server: Mutex<Option<(Sender<VirtAddr>, JoinHandle<()>)>>,
}

impl Migration {
    pub(crate) fn new(uffd: &Arc<Userfaultfd>) -> Self {
        Migration {
            uffd: Arc::downgrade(uffd),
            owners: Mutex::new(Vec::new()),
            server: Mutex::new(None),
        }
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, Vec<(VaRange, Weak<dyn FaultBack>)>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `owner` for faults in `range`, starting the server if this
    /// is the first migration.
    pub(crate) fn add_owner(
        self: &Arc<Self>,
        range: VaRange,
        owner: Weak<dyn FaultBack>,
    ) -> std::io::Result<()> {
        {
            let mut s = self.server.lock().unwrap_or_else(|p| p.into_inner());
            if s.is_none() {
                let (tx, rx) = crossbeam_channel::unbounded();
                let me = Arc::downgrade(self);
                let uffd = Weak::clone(&self.uffd);
                let h = std::thread::Builder::new()
                    .name("hmm-fault-back".into())
                    .spawn(move || serve(me, uffd, rx))?;
                *s = Some((tx, h));
            }
        }
        let mut o = self.owners();
        o.retain(|(_, w)| w.strong_count() > 0);
        if !o.iter().any(|(r, w)| *r == range && w.ptr_eq(&owner)) {
            o.push((range, owner));
        }
        Ok(())
    }

    /// A `mremap` moved `old` to `to`: faults at the new addresses reach
    /// the owners of the old ones (who re-key their pages themselves).
    pub(crate) fn remapped(&self, old: VaRange, to: VirtAddr) {
        let told: Vec<Arc<dyn FaultBack>> = {
            let mut o = self.owners();
            let mut add = Vec::new();
            let mut told = Vec::new();
            for (r, w) in o.iter() {
                if let Some(inside) = r.intersect(old) {
                    let off = inside.start().get() - old.start().get();
                    if let Ok(moved) =
                        VaRange::from_start_len(VirtAddr(to.get().wrapping_add(off)), inside.len())
                    {
                        add.push((moved, w.clone()));
                    }
                    told.extend(w.upgrade());
                }
            }
            o.extend(add);
            told
        };
        for t in told {
            t.moved(old, to);
        }
    }

    /// A missing-page fault, on the monitor's handler thread: served here
    /// if every owner of the page can answer without waiting
    /// ([`FaultBack::try_fault_back`]), else queued for the server. `false`
    /// if no server runs (nothing was ever migrated: the monitor
    /// zero-fills).
    ///
    /// Served here, a fault costs one thread wake-up less (the server's;
    /// README, "iterate", and `drivers/cpu/examples/fault_back.rs`).
    pub(crate) fn serve_or_queue(&self, page: VirtAddr) -> bool {
        // A sender of our own: the server's lock is not held while the
        // owners serve.
        let tx = match self
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some((tx, _)) => tx.clone(),
            None => return false,
        };
        let Ok(range) = VaRange::from_start_len(page.page_down(), PAGE_SIZE) else {
            return tx.send(page).is_ok();
        };
        let mut outcome = FaultBackOutcome::NotHeld;
        for o in self.owners_of(range.start()) {
            match o.try_fault_back(range.start()) {
                Some(FaultBackOutcome::NotHeld) => {}
                Some(done) => {
                    outcome = done;
                    break;
                }
                None => return tx.send(page).is_ok(),
            }
        }
        if let Some(uffd) = self.uffd.upgrade() {
            resolve(&uffd, range, outcome);
        }
        true
    }

    /// A missing-page fault, on the monitor's *reader* as it reads it (no
    /// event before it unhandled): resolved here if the owner that holds
    /// the page can give it back without waiting or allocating
    /// ([`FaultBack::fault_back_now`]); [`FaultNow::Left`] leaves it to
    /// the handler ([`Migration::serve_or_queue`]). One thread wake-up
    /// fewer again than serving on the handler.
    pub(crate) fn serve_now(&self, page: VirtAddr) -> FaultNow {
        let page = page.page_down();
        // Walked under a try-lock, collecting nothing: no allocation.
        let Ok(owners) = self.owners.try_lock() else {
            return FaultNow::Left;
        };
        for (r, w) in owners.iter() {
            if !r.contains(page) {
                continue;
            }
            let Some(o) = w.upgrade() else {
                continue;
            };
            match o.fault_back_now(page) {
                Some((FaultBackOutcome::NotHeld, _)) => {}
                Some((FaultBackOutcome::Served, false)) => return FaultNow::Resolved,
                Some((FaultBackOutcome::Served, true)) => return FaultNow::ResolvedTellHandler,
                // A zero page or poison is the handler's to install (it
                // retries a refusal; this thread must not).
                Some((FaultBackOutcome::Lost, _)) | None => return FaultNow::Left,
            }
        }
        FaultNow::Left
    }

    /// The live owners whose ranges contain `page`.
    fn owners_of(&self, page: VirtAddr) -> Vec<Arc<dyn FaultBack>> {
        self.owners()
            .iter()
            .filter(|(r, _)| r.contains(page))
            .filter_map(|(_, w)| w.upgrade())
            .collect()
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        let s = self
            .server
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((tx, h)) = s {
            drop(tx);
            let _ = h.join();
        }
    }
}

/// The server thread: resolves every fault it is handed, one way or
/// another (a thread left waiting would hang forever).
fn serve(me: Weak<Migration>, uffd: Weak<Userfaultfd>, rx: Receiver<VirtAddr>) {
    while let Ok(page) = rx.recv() {
        let Ok(range) = VaRange::from_start_len(page.page_down(), PAGE_SIZE) else {
            continue;
        };
        let owners = me
            .upgrade()
            .map(|m| m.owners_of(range.start()))
            .unwrap_or_default();
        let mut outcome = FaultBackOutcome::NotHeld;
        for o in owners {
            outcome = o.fault_back(range.start());
            if outcome != FaultBackOutcome::NotHeld {
                break;
            }
        }
        // The monitor is gone: its userfaultfd is closed, every range is
        // unregistered, and the waiting thread was woken by the kernel.
        if let Some(uffd) = uffd.upgrade() {
            resolve(&uffd, range, outcome);
        }
    }
}

/// Ends the wait of a thread faulting on `range` (one page) after its
/// owners answered `outcome`: nothing more if the page was given back, a
/// zero page if nobody holds it, poison if its only copy is lost.
fn resolve(uffd: &Userfaultfd, range: VaRange, outcome: FaultBackOutcome) {
    static ZERO: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    match outcome {
        FaultBackOutcome::Served => {}
        FaultBackOutcome::NotHeld => {
            // SAFETY: the page is missing (a thread waits on it) and no
            // Rust reference of ours covers it; a zero page is what the
            // kernel would install without us. `EEXIST` (given back
            // meanwhile) or a range gone: wake the thread, which faults
            // again or finds its page.
            if unsafe { uffd.copy_in(range.start(), &ZERO, true) }.is_err() {
                let _ = uffd.wake(range);
            }
        }
        FaultBackOutcome::Lost => {
            if uffd.poison(range).is_err() {
                // No poison (Linux < 6.6): the thread is woken and faults
                // again, and each time the owner says the data is lost.
                // It spins rather than reading a zero page.
                tracing::error!(
                    target: "hmm_rs",
                    "page {} was lost with its device and cannot be poisoned on this kernel",
                    range.start()
                );
                let _ = uffd.wake(range);
            }
        }
    }
}

/// Moves the pages of `range` out to a fresh scratch mapping (steps 4–5 of
/// the module docs; the caller armed the range, recorded the owner and
/// told the monitor to expect the event through `expect`/`forget`).
pub(crate) fn move_out(
    range: VaRange,
    expect: impl FnOnce(VirtAddr),
    forget: impl FnOnce(VirtAddr),
    registered: impl FnOnce(VaRange) -> bool,
    unregister: impl FnOnce(VaRange) -> std::io::Result<()>,
    forget_scratch: impl FnOnce(VaRange),
) -> std::io::Result<Detached> {
    let len = range.len() as usize;
    // A reservation of the destination, so the event can be expected
    // before the move (MREMAP_FIXED replaces it).
    let map = ScratchMap::new(range.pages() as usize)?;
    let to = VirtAddr(map.base());
    expect(to);
    // SAFETY: `range` is a mapped private anonymous range of this process
    // (checked by the caller) and `map` our own reservation of `len`
    // bytes, which the move replaces; nothing holds a Rust reference into
    // either. glibc reads the fifth argument as the destination.
    let r = unsafe {
        libc::mremap(
            range.start().as_mut_ptr(),
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP | libc::MREMAP_FIXED,
            map.ptr(),
        )
    };
    if r == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        forget(to);
        return Err(e);
    }
    let dest = VaRange::from_start_len(to, len as u64)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // What moved must be the armed mapping: the move carries its
    // registration to the destination. A mapping that replaced it between
    // the arming and the move (another thread's `mmap(MAP_FIXED)`; its
    // pages are not ours to take, and nothing would trap a CPU access to
    // them) arrives unregistered, and goes straight back.
    if !registered(dest) {
        // SAFETY: moving our scratch (which holds the pages just moved)
        // back over the emptied range they came from, as they were; no
        // reference into either exists.
        let back = unsafe {
            libc::mremap(
                map.ptr(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                range.start().as_mut_ptr(),
            )
        };
        if back != libc::MAP_FAILED {
            // The scratch is gone with the move; nothing to unmap.
            std::mem::forget(map);
        }
        forget_scratch(dest);
        return Err(std::io::Error::other(
            "the memory was replaced while it was being migrated",
        ));
    }
    // Registered with the old range's context: a hole there would fault
    // to us. Unregistered, it reads as zeros.
    unregister(dest)?;
    Ok(Detached {
        pages: Pages::Moved(map),
        from: range,
    })
}

/// Why migration is unavailable with a userfaultfd opened `mode` with the
/// features of `uffd`, if it is; and the degradation it lives with.
pub(crate) fn support(uffd: &Userfaultfd) -> Result<Option<&'static str>, String> {
    let f = uffd.features();
    if !f.contains(super::uffd::Features(super::sys::UFFD_FEATURE_EVENT_REMAP)) {
        return Err("the userfaultfd lacks EVENT_REMAP".into());
    }
    if !f.contains(super::uffd::Features::WP_TRACKING) {
        return Err("the userfaultfd lacks WP_ASYNC write tracking".into());
    }
    Ok(match uffd.open_mode() {
        OpenMode::UserModeOnly => Some(
            "user-mode-only userfaultfd: a system call that reads or writes migrated memory (read(2) into it, say) fails with EFAULT instead of bringing it back",
        ),
        _ => None,
    })
}
