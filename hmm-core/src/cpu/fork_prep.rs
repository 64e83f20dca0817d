//! `fork()` with migrated pages: a prepare-fork handler gives them back.
//!
//! A child made by `fork()` gets no userfaultfd context of ours on its copy
//! of an armed range, so its missing pages are fresh zero pages: without a
//! prepare step it reads zeros wherever the parent's pages are migrated
//! (`tests/migration_facts.rs` checks that fact). `pthread_atfork` runs a
//! *prepare* handler in the forking thread before the child is made; ours
//! asks every owner of migrated pages ([`FaultBack::before_fork`]) to give
//! them all back, so the child is made from memory that holds the data.
//!
//! # The protocol
//!
//! 1. `watch` records an owner when it first migrates, installing the
//!    handlers once per process.
//! 2. A migration holds a `NoFork` from before its pages move out until
//!    they are marked migrated, so no fork falls between the two (the
//!    child would read zeros the owner does not know it must give back).
//! 3. `prepare` raises the fork count, waits until no migration holds a
//!    `NoFork` (new ones wait for the count to fall), then calls every
//!    live owner's [`FaultBack::before_fork`], which waits for the owner's
//!    running launch and gives back every migrated page (an exclusive
//!    page loses its exclusivity, as the kernel's `fork` restores a
//!    device-exclusive entry).
//! 4. `parent` lowers the count; `child` resets both counters (the child
//!    has one thread, and no migration runs in it).
//!
//! Steps 2–4 are [`ForkGate`], model-checked by `tests/loom.rs`
//! (`fork_gate_*`): a fork never proceeds while a migration is between
//! its move and its marks, and neither side waits forever.
//!
//! The pages stay on the device as ordinary copies, so the parent's next
//! launch does not fetch them again; they are no longer migrated (migrate
//! them again to go on iterating without write-backs).
//!
//! # Cost and limits
//!
//! - Every `fork()` in the process pays a copy of every migrated page
//!   (about 6 µs per page on the cpu driver: the "iterate" figures in the
//!   README), and waits for running launches of the owners.
//!   `std::process::Command` spawns through `posix_spawn` where it can,
//!   which runs no fork handlers (its child only calls `exec`).
//! - A raw `clone`/`fork` system call runs no handlers: its child reads
//!   zeros where pages are migrated.
//! - A fork from a thread that holds a mirror's lock (inside a cpu-driver
//!   kernel closure, say) would wait for itself: don't.
//! - A page the device cannot give back (a lost device) is poisoned: the
//!   child and the parent get `SIGBUS` there, never zeros.

#[cfg(not(hmm_loom))]
use std::sync::Arc;
use std::sync::{Mutex, Once, Weak};

use super::migration::FaultBack;
use crate::sync::{AtomicU64, Ordering};

/// Steps 2–4 of the module docs: migrations and forks keep out of each
/// other's way. One per process (`NoFork::hold` and the handlers use
/// it); public so the loom model can check it.
///
/// Both counts live in one atomic word (forks in the high half,
/// migrations in the low half), so every change to either is in one
/// modification order: a migration's compare-exchange succeeds only where
/// no fork has counted itself, and a fork that counted itself first sees
/// every migration that got in before it until that migration leaves. (Two
/// separate counters would need sequentially consistent loads to rule out
/// both sides missing each other.)
#[derive(Debug)]
pub struct ForkGate {
    state: AtomicU64,
}

const FORK: u64 = 1 << 32;
const MIGRATIONS: u64 = FORK - 1;

impl ForkGate {
    /// A gate with nothing under way.
    #[cfg(not(hmm_loom))]
    pub const fn new() -> ForkGate {
        ForkGate {
            state: AtomicU64::new(0),
        }
    }

    /// A gate with nothing under way.
    #[cfg(hmm_loom)]
    pub fn new() -> ForkGate {
        ForkGate {
            state: AtomicU64::new(0),
        }
    }

    /// A migration's side: waits for forks under way, then holds forks
    /// off until the guard drops.
    pub fn hold(&self) -> GateGuard<'_> {
        // Relaxed first read: only a hint; the exchange decides.
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s >= FORK {
                pause();
                s = self.state.load(Ordering::Relaxed);
                continue;
            }
            // Acquire on success: the migration's work comes after it (and
            // a fork made before it finished giving pages back first).
            match self
                .state
                .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return GateGuard(self),
                Err(now) => s = now,
            }
        }
    }

    /// A fork's prepare side: holds new migrations off and waits until
    /// none is between its move and its marks.
    pub fn begin_fork(&self) {
        // Relaxed increment: the waiting load below synchronises.
        self.state.fetch_add(FORK, Ordering::Relaxed);
        // Acquire: a migration's marks (released by its guard's drop) are
        // visible once its count is gone.
        while self.state.load(Ordering::Acquire) & MIGRATIONS != 0 {
            pause();
        }
    }

    /// The fork is made (the parent's side): migrations may go on.
    pub fn end_fork(&self) {
        // Release: what the prepare step did happens before the next
        // migration's (acquiring) entry.
        self.state.fetch_sub(FORK, Ordering::Release);
    }

    /// In the child: one thread, nothing under way.
    pub fn reset(&self) {
        // Relaxed: the child has one thread.
        self.state.store(0, Ordering::Relaxed);
    }
}

#[cfg(not(hmm_loom))]
impl Default for ForkGate {
    fn default() -> Self {
        Self::new()
    }
}

/// A migration holding forks off ([`ForkGate::hold`]).
#[derive(Debug)]
pub struct GateGuard<'a>(&'a ForkGate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        // Release: what the migration did (its marks) is visible to the
        // `begin_fork` that sees the count fall.
        self.0.state.fetch_sub(1, Ordering::Release);
    }
}

/// Waiting in a gate: a short sleep (forks and migrations take far
/// longer), or a yield loom can schedule around.
fn pause() {
    #[cfg(hmm_loom)]
    crate::sync::thread::yield_now();
    #[cfg(not(hmm_loom))]
    std::thread::sleep(std::time::Duration::from_micros(200));
}

/// The process's gate. Under loom (whose atomics cannot live in a static)
/// migrations do not take it; the model checks [`ForkGate`] alone.
#[cfg(not(hmm_loom))]
static GATE: ForkGate = ForkGate::new();
/// Everything that ever migrated pages (dead ones pruned as new ones come).
static OWNERS: Mutex<Vec<Weak<dyn FaultBack>>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Records `owner` for the prepare-fork handler, installing the handlers
/// the first time. Returns whether they are installed (`pthread_atfork`
/// can fail only for lack of memory).
pub(crate) fn watch(owner: &Weak<dyn FaultBack>) -> bool {
    // Under loom no handler is installed, and `ok` stays true.
    #[cfg_attr(hmm_loom, allow(unused_mut))]
    let mut ok = true;
    #[cfg(not(hmm_loom))]
    INSTALL.call_once(|| {
        // SAFETY: the three handlers are `extern "C"` functions without
        // arguments, as `pthread_atfork` calls them; they stay valid for
        // the life of the process (plain functions of this crate).
        let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        ok = r == 0;
        if !ok {
            tracing::error!(
                target: "hmm_rs",
                "pthread_atfork failed ({r}): a forked child reads zeros where pages are migrated"
            );
        }
    });
    #[cfg(hmm_loom)]
    let _ = &INSTALL;
    let mut o = OWNERS.lock().unwrap_or_else(|p| p.into_inner());
    o.retain(|w| w.strong_count() > 0);
    if !o.iter().any(|w| w.ptr_eq(owner)) {
        o.push(Weak::clone(owner));
    }
    ok
}

/// Held by a migration from before its pages move out until they are
/// marked migrated (step 2 of the module docs).
pub(crate) struct NoFork {
    #[cfg(not(hmm_loom))]
    _held: GateGuard<'static>,
}

impl NoFork {
    /// Waits for forks under way, then holds forks off until dropped.
    pub(crate) fn hold() -> NoFork {
        NoFork {
            #[cfg(not(hmm_loom))]
            _held: GATE.hold(),
        }
    }
}

#[cfg(not(hmm_loom))]
extern "C" fn prepare() {
    GATE.begin_fork();
    let owners: Vec<Arc<dyn FaultBack>> = OWNERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for o in &owners {
        o.before_fork();
    }
}

#[cfg(not(hmm_loom))]
extern "C" fn parent() {
    GATE.end_fork();
}

#[cfg(not(hmm_loom))]
extern "C" fn child() {
    // One thread here: no migration and no other fork runs in the child.
    GATE.reset();
}
