//! Non-blocking launches: submit now, wait later ([`Mirror::scope`]).
//!
//! ```
//! # use hmm_core::mirror::{Mirror, MirrorError};
//! # fn demo<B: hmm_core::mirror::backend::Backend>(
//! #     m: &Mirror<B>, kernel: &B::Kernel, x: &[f32], y: &mut [f32], other: &mut [u64],
//! # ) -> Result<(), MirrorError> {
//! let report = m.scope(|s| {
//!     let p = s.launch(kernel, y.len() as u32, (x.as_ptr(), y.as_mut_ptr(), 2.0f32));
//!     // The device runs; the CPU works on memory the kernel does not use.
//!     other.iter_mut().for_each(|v| *v += 1);
//!     p.wait() // the kernel's writes to `y` are visible from here on
//! })?;
//! # let _ = report;
//! # Ok(())
//! # }
//! ```
//!
//! # Why a scope
//!
//! A launch in flight uses its kernel (`&B::Kernel`) and, for a typed
//! wrapper built on [`Scope::launch_with`], arguments that may borrow
//! (`&[T]`, `&mut [T]`). A handle that joined on `Drop` would not keep
//! those borrows alive: `mem::forget` skips `Drop`, and the borrows would
//! end while the device still used them. [`Mirror::scope`] is built on
//! [`std::thread::scope`] instead: every launch submitted in it has
//! finished — device done, writes written back — before `scope` returns,
//! whatever the closure did with its [`Pending`] handles (waited, dropped,
//! forgotten), so anything a launch borrows needs only to outlive the
//! scope, which the borrow checker enforces. No `unsafe` is involved: a
//! launch runs [`Mirror::launch`] on a scoped thread, so the scope adds no
//! hazard that a thread calling `Mirror::launch` would not have.
//!
//! A handle cannot leave its scope:
//!
//! ```compile_fail
//! # use hmm_core::mirror::{backend::Backend, Mirror};
//! # fn demo<B: Backend>(m: &Mirror<B>, k: &B::Kernel) {
//! let p = m.scope(|s| Ok(s.launch(k, 1, ()))).unwrap(); // error: `'scope` escapes
//! let _ = p.wait();
//! # }
//! ```
//!
//! and what a [`Scope::launch_with`] closure borrows stays borrowed until
//! the scope ends, so the CPU cannot write it meanwhile:
//!
//! ```compile_fail
//! # use hmm_core::mirror::{backend::Backend, Mirror};
//! # fn demo<B: Backend>(m: &Mirror<B>, k: &B::Kernel) {
//! let mut out = vec![0u32; 4];
//! m.scope(|s| {
//!     let dst: &mut [u32] = &mut out;
//!     let p = s.launch_with(move |m| m.launch(k, 4, (dst.as_mut_ptr(),)));
//!     out[0] = 1; // error: `out` is borrowed by the launch
//!     p.wait()
//! })
//! .unwrap();
//! # }
//! ```
//!
//! [`Scope::run`], the typed launch, takes its slices (`In<T>`: `&[T]`,
//! `InOut<T>`: `&mut [T]`) borrowed until the scope ends, so the
//! compiler keeps the CPU from writing what the kernel reads or touching
//! what it writes while the launch may be in flight.
//!
//! [`Scope::launch`] takes the same arguments as [`Mirror::launch`]
//! (turned into words before it returns): raw pointers, or references
//! taken as addresses, which borrow nothing once it has returned. As with `Mirror::launch` called on another thread, memory the
//! kernel uses must stay allocated until the launch is done — memory freed
//! and reused meanwhile would be read or written back by the launch; the
//! compiler checks this only for what [`Scope::run`] and a `launch_with`
//! closure borrow.
//!
//! # Order
//!
//! Launches submitted to one scope run one after another, in submission
//! order (each waits for the one before it to finish, write-back
//! included), so a launch may read what an earlier one wrote. Launches on
//! one mirror are serialised anyway; one from outside the scope (another
//! thread's [`Mirror::launch`], another scope) may run between two of a
//! scope's launches.
//!
//! # Results nobody waited for
//!
//! The end of the scope waits for every launch. [`Scope::launch`]'s handle
//! is `#[must_use]`; a launch whose [`Pending`] was dropped or forgotten
//! without [`Pending::wait`] is not lost: `scope` returns the closure's own
//! result if it is an error, else the error of the first launch (in
//! submission order) that failed and was not waited for, else the
//! closure's value. Errors that cannot be returned that way (a second
//! failed launch nobody waited for, or one behind the closure's own error)
//! are logged (`tracing`, level `warn`). A launch that panicked (a panic in
//! a [`Scope::launch_with`] closure) resumes its panic in `wait`, or at the
//! end of the scope if nobody waited for it.
//!
//! # Sync points: what the CPU may touch while a launch is in flight
//!
//! A launch has the two sync points of [`Mirror::launch`], both on the
//! launch's own thread: the **start** — CPU writes to mirrored pages made
//! since the previous sync point are invalidated (the device drops its
//! copies of those pages and reads the CPU's data again), and shared or
//! file-backed pages another writer changed are found by hash — happens
//! at an unspecified moment after the launch is submitted ([`Scope::launch`],
//! [`Scope::run`] or [`Scope::launch_with`] is called; after the
//! scope's earlier launches finished, once the mirror's launch lock is
//! free); the **end** — device-dirty pages written back — happens before
//! [`Pending::is_done`] turns true and [`Pending::wait`] returns.
//!
//! From the submitting call until `wait` returns (or the scope ends):
//!
//! - **Memory the kernel does not use**: anything — read, write, allocate,
//!   free. That is the point of the API.
//! - **Memory the kernel only reads**: CPU *reads* are fine and see the
//!   CPU's own data (the mirror writes back only bytes the device changed,
//!   so nothing is written there). Data written *before* the submitting
//!   call is what the kernel reads.
//! - **CPU writes to memory the kernel reads or writes** race with the
//!   launch: the start sync point may come before or after the write, and
//!   in copy mode a page copied to the device during the write may hold
//!   the old or the new bytes of it; a zero-copy device reads the CPU's
//!   page whenever it gets there. So the kernel may read the old value,
//!   the new one, or a mix of their bytes; for words the device also
//!   writes, the final value after `wait` is the CPU's or the device's (or
//!   a mix). The write itself is not lost otherwise: copy mode's
//!   write-back stores only the byte runs the device changed (twin/diff),
//!   so CPU writes to other bytes of the same page survive, and write
//!   tracking reports the write at the next launch's start sync point,
//!   which drops the device's now stale copy. This is a data race with
//!   unspecified results for those words — never memory-unsafe: the
//!   mirror copies with fault-proof copies, never forms references to
//!   user memory, and changes no byte the device did not write.
//! - **CPU reads of memory the kernel writes** before `wait` returns see
//!   old, new or mixed values: device writes may reach the CPU early
//!   (eviction from a full pool and invalidations write dirty pages back
//!   mid-launch; a zero-copy device writes the CPU's pages directly).
//!
//! **Device writes become visible** when [`Pending::wait`] returns `Ok`
//! (or [`Pending::is_done`] has returned true, or the scope has ended):
//! the end-of-launch write-back is complete. A launch that ends in an
//! error returns it from `wait`; writes of invocations that completed
//! before the error may have reached the CPU, exactly as with
//! [`Mirror::launch`] (a [`MirrorError::WriteBackRefused`] keeps the
//! refused data on the device until a later write-back succeeds).
//!
//! # Invalidations while a launch is in flight
//!
//! Nothing changes from a blocking launch; the launch merely runs on
//! another thread.
//!
//! - **`munmap`, `mremap`, `MADV_DONTNEED`/`MADV_REMOVE`** (destructive
//!   events) never wait for the device: the mirror drops its entries for
//!   the range at once (or queues the drop for the holder of its driver
//!   lock) and discards the device copies without writing them back — the
//!   memory is gone; the device memory behind them is quarantined until
//!   the device confirms the entries cleared, so a submission still
//!   running reads stale but valid device memory, never the CPU's. (That
//!   is copy mode; a zero-copy device's `unsafe` constructor has the
//!   caller promise not to unmap memory a running launch may touch, and a
//!   non-blocking launch runs until it is done.) An invocation that
//!   touches the range afterwards faults; with no CPU
//!   mapping there the launch ends with [`MirrorError::DeviceFault`]
//!   (`reason: Unmapped`) from `wait`, and if new memory was mapped there
//!   meanwhile the invocation replays on it.
//! - **`mprotect`** produces no kernel event: call
//!   [`Mirror::protection_changed`], whose invalidation *waits for the
//!   submission in flight* to finish (without holding the driver lock),
//!   writes the range's device-dirty pages back and drops its entries;
//!   invocations that touch it later fault and replay under the new
//!   protection (a device write to memory now read-only is a
//!   `DeviceFault` from `wait`). Without the call, a write-back to memory
//!   made read-only is refused: `wait` returns
//!   [`MirrorError::WriteBackRefused`] and nothing is dropped.
//! - Other non-destructive invalidations (an explicit `Clear`, another
//!   mirror's write to the same pages) do the same as `protection_changed`:
//!   wait for the submission, write back, drop the entries; faulting
//!   invocations replay with fresh copies.
//! - **`fork`**: the launch goes on in the parent, unaffected. The child
//!   has no mirror ([`MirrorError::WrongProcess`]) and none of the
//!   parent's threads — the launch threads included — so a child must not
//!   wait for a launch nor leave the scope (it would wait forever, as it
//!   would for any scoped thread): `exec` or `_exit` instead.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::thread;

use super::args::KernelArgs;
use super::backend::Backend;
use super::config::LaunchReport;
use super::error::MirrorError;
use super::handle::Mirror;
use super::host_side::HostSide;
use super::params::{Params, Typed, MAX_PARAMS};
use crate::cpu::host::HostSpace;
use crate::sync::{lock, Arc, Condvar, Mutex};

/// How a launch ended: its result, or the panic of its closure.
enum Outcome<T> {
    Done(Result<T, MirrorError>),
    Panicked(Box<dyn Any + Send>),
}

enum State<T> {
    Running,
    Done(Outcome<T>),
    /// Taken by [`Pending::wait`] (or by the end of the scope).
    Taken,
}

/// One launch's result, set once by its thread.
struct Slot<T> {
    state: Mutex<State<T>>,
    done: Condvar,
}

impl<T> Slot<T> {
    fn new() -> Self {
        Slot {
            state: Mutex::new(State::Running),
            done: Condvar::new(),
        }
    }

    fn put(&self, o: Outcome<T>) {
        *lock(&self.state) = State::Done(o);
        self.done.notify_all();
    }

    fn is_done(&self) -> bool {
        !matches!(*lock(&self.state), State::Running)
    }

    /// Waits until the launch has finished, then takes its outcome (`None`
    /// if it was taken before).
    fn take(&self) -> Option<Outcome<T>> {
        let mut g = lock(&self.state);
        while matches!(*g, State::Running) {
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        match std::mem::replace(&mut *g, State::Taken) {
            State::Done(o) => Some(o),
            State::Running | State::Taken => None,
        }
    }

    fn wait_done(&self) {
        let mut g = lock(&self.state);
        while matches!(*g, State::Running) {
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What the end of a scope finds of a launch nobody waited for.
enum Leftover {
    /// Waited for, or succeeded (its value is dropped).
    Nothing,
    Failed(MirrorError),
    Panicked(Box<dyn Any + Send>),
}

/// A scope's view of one launch, whatever its result type.
trait Submitted: Send + Sync {
    /// Blocks until the launch finished (write-back included).
    fn wait_done(&self);
    /// Waits for it and takes what nobody waited for.
    fn leftover(&self) -> Leftover;
}

impl<T: Send> Submitted for Slot<T> {
    fn wait_done(&self) {
        Slot::wait_done(self);
    }
    fn leftover(&self) -> Leftover {
        match self.take() {
            None | Some(Outcome::Done(Ok(_))) => Leftover::Nothing,
            Some(Outcome::Done(Err(e))) => Leftover::Failed(e),
            Some(Outcome::Panicked(p)) => Leftover::Panicked(p),
        }
    }
}

/// A scope for non-blocking launches on one mirror ([`Mirror::scope`]).
///
/// Launches submitted here ([`Scope::launch`], [`Scope::launch_with`])
/// run on threads of the scope, one after another in submission order;
/// each returns a [`Pending`] at once. See the [module docs](self) for
/// what the CPU may touch meanwhile.
pub struct Scope<'scope, 'env: 'scope, B: Backend, H: HostSide = HostSpace> {
    mirror: &'env Mirror<B, H>,
    threads: &'scope thread::Scope<'scope, 'env>,
    /// Every launch submitted, in order; the last is the one a new launch
    /// waits for.
    launches: Mutex<Vec<Arc<dyn Submitted + 'scope>>>,
}

impl<B: Backend, H: HostSide> std::fmt::Debug for Scope<'_, '_, B, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("mirror", self.mirror)
            .field("launches", &lock(&self.launches).len())
            .finish()
    }
}

/// A launch in flight, from [`Scope::launch`] or [`Scope::launch_with`].
///
/// It cannot leave its scope, and the scope's end waits for the launch
/// whatever happens to this handle (see [`Mirror::scope`] for where the
/// result of a launch nobody waited for goes).
#[must_use = "a launch's result comes from `wait` (the scope's end returns only the first error of those not waited for)"]
pub struct Pending<'scope, T = LaunchReport> {
    slot: Arc<Slot<T>>,
    /// Invariant in `'scope`, as `std::thread::ScopedJoinHandle` is: the
    /// handle cannot be made to outlive its scope.
    _scope: PhantomData<&'scope mut &'scope ()>,
}

impl<T> std::fmt::Debug for Pending<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("done", &self.is_done())
            .finish()
    }
}

impl<T> Pending<'_, T> {
    /// Whether the launch has finished: the device is done and its writes
    /// are written back (or it ended with an error). Once true,
    /// [`Pending::wait`] returns without blocking, and the CPU sees the
    /// launch's writes.
    pub fn is_done(&self) -> bool {
        self.slot.is_done()
    }

    /// Waits for the launch to finish and returns its result — for
    /// [`Scope::launch`] what [`Mirror::launch`] would have returned.
    /// When it returns, the CPU sees every write of the launch (those that
    /// reached the CPU, if it failed). A panic in a
    /// [`Scope::launch_with`] closure is resumed here.
    pub fn wait(self) -> Result<T, MirrorError> {
        match self.slot.take() {
            Some(Outcome::Done(r)) => r,
            Some(Outcome::Panicked(p)) => resume_unwind(p),
            // `wait` consumes the only handle, and the scope takes the
            // outcome only after its closure returned, when no handle
            // can exist any more.
            None => unreachable!("a launch's outcome is taken once"),
        }
    }
}

impl<'scope, 'env, B: Backend, H: HostSide> Scope<'scope, 'env, B, H> {
    /// The mirror this scope launches on (for blocking calls in the
    /// scope: they wait for the launch in flight, as any launch does).
    pub fn mirror(&self) -> &'env Mirror<B, H> {
        self.mirror
    }

    /// Submits `kernel` over invocations `0..n` with `args` and returns at
    /// once; the launch runs [`Mirror::launch`] on a thread of the scope,
    /// after the launches submitted before it. `args` are turned into
    /// words before this returns. Its result, errors included
    /// ([`MirrorError::TooManyInvocations`], device faults, …), comes from
    /// [`Pending::wait`].
    ///
    /// Until the launch is done the CPU may use any memory the kernel does
    /// not; see the [module docs](self) for memory it does.
    pub fn launch(
        &self,
        kernel: &'scope B::Kernel,
        n: u32,
        args: impl KernelArgs,
    ) -> Pending<'scope, LaunchReport> {
        let words = args.with_words(<[u64]>::to_vec);
        self.launch_with(move |m| m.launch(kernel, n, &words[..]))
    }

    /// [`Mirror::run`] without waiting: a typed launch whose arguments the
    /// compiler checks against the kernel's parameters, e.g.
    /// `s.run(&saxpy, n, (&x, &mut y, 2.0))`. The slices stay borrowed
    /// until the scope ends — `x` shared, `y` exclusively — so the CPU
    /// cannot write memory the kernel reads, nor touch memory it writes,
    /// while the launch may be in flight; use them again after `scope`
    /// returns. (Raw-pointer parameters, `Ptr`/`PtrMut`, borrow nothing, as
    /// with [`Scope::launch`].) The result comes from [`Pending::wait`].
    ///
    /// ```compile_fail
    /// # use hmm_core::mirror::{backend::Backend, params::{InOut, Typed}, Mirror};
    /// # fn demo<B: Backend>(m: &Mirror<B>, k: &Typed<B::Kernel, (InOut<u32>,)>) {
    /// let mut y = vec![0u32; 4];
    /// m.scope(|s| {
    ///     let p = s.run(k, 4, (&mut y,));
    ///     y[0] = 1; // error: `y` is borrowed by the launch until the scope ends
    ///     p.wait()
    /// })
    /// .unwrap();
    /// # }
    /// ```
    pub fn run<P: Params>(
        &self,
        kernel: &'scope Typed<B::Kernel, P>,
        n: u32,
        args: P::Host<'scope>,
    ) -> Pending<'scope, LaunchReport> {
        let mut words = [0u64; MAX_PARAMS];
        let len = P::words(args, &mut words);
        let kernel = kernel.kernel();
        self.launch_with(move |m| m.launch(kernel, n, &words[..len]))
    }

    /// Submits `f`, which launches on the mirror (a typed wrapper calls
    /// [`Mirror::launch`] in it), and returns at once: `f` runs on a
    /// thread of the scope, after the launches submitted before it, and
    /// its result comes from [`Pending::wait`]. Whatever `f` borrows must
    /// outlive the scope, which therefore cannot end before `f` has
    /// returned. `f` should launch once and return: the next launch of the
    /// scope starts only when it has.
    ///
    /// If no thread can be started, `f` runs here, before this returns
    /// (after the earlier launches of the scope): correct, not overlapped.
    pub fn launch_with<T, F>(&self, f: F) -> Pending<'scope, T>
    where
        T: Send + 'scope,
        F: FnOnce(&'env Mirror<B, H>) -> Result<T, MirrorError> + Send + 'scope,
    {
        let slot = Arc::new(Slot::new());
        let prev = {
            let mut launches = lock(&self.launches);
            let prev = launches.last().cloned();
            launches.push(Arc::clone(&slot) as Arc<dyn Submitted + 'scope>);
            prev
        };
        let mirror = self.mirror;
        let done = Arc::clone(&slot);
        let job = move || {
            if let Some(p) = prev {
                p.wait_done();
            }
            let out = match catch_unwind(AssertUnwindSafe(|| f(mirror))) {
                Ok(r) => Outcome::Done(r),
                Err(p) => Outcome::Panicked(p),
            };
            done.put(out);
        };
        // The job travels in a cell: if the thread cannot start, its
        // closure is dropped unrun and the job is still here to run.
        let cell = Arc::new(Mutex::new(Some(job)));
        let theirs = Arc::clone(&cell);
        let spawned = thread::Builder::new()
            .name("hmm-launch".into())
            .spawn_scoped(self.threads, move || {
                let job = lock(&theirs).take();
                if let Some(job) = job {
                    job();
                }
            });
        if spawned.is_err() {
            let job = lock(&cell).take();
            if let Some(job) = job {
                job();
            }
        }
        Pending {
            slot,
            _scope: PhantomData,
        }
    }

    /// Waits for every launch and folds what nobody waited for into `r`
    /// (see [`Mirror::scope`]).
    fn finish<R>(self, r: Result<R, MirrorError>) -> Result<R, MirrorError> {
        let launches = std::mem::take(&mut *lock(&self.launches));
        let mut first_err = None;
        let mut panic = None;
        for l in launches {
            match l.leftover() {
                Leftover::Nothing => {}
                Leftover::Failed(e) if r.is_ok() && first_err.is_none() => first_err = Some(e),
                Leftover::Failed(e) => {
                    tracing::warn!(error = %e, "a launch nobody waited for failed");
                }
                Leftover::Panicked(p) => {
                    if panic.is_none() {
                        panic = Some(p);
                    }
                }
            }
        }
        if let Some(p) = panic {
            resume_unwind(p);
        }
        match (r, first_err) {
            (Ok(_), Some(e)) => Err(e),
            (r, _) => r,
        }
    }
}

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// Runs `f` with a [`Scope`] for non-blocking launches: in it,
    /// [`Scope::launch`] submits a launch and returns a [`Pending`] at
    /// once, the CPU works meanwhile, and [`Pending::wait`] returns the
    /// launch's result.
    ///
    /// `scope` returns after every launch submitted in it has finished
    /// (device done, writes written back), even those whose handle was
    /// dropped or forgotten. It returns `f`'s error if `f` returned one;
    /// else the error of the first launch (in submission order) that
    /// failed and was not waited for; else `f`'s value. Errors neither
    /// returned by a `wait` nor by `scope` are logged (`tracing`, `warn`);
    /// a launch that panicked and was not waited for resumes its panic
    /// here (the first such panic, after every launch has finished).
    ///
    /// What the CPU may touch while a launch is in flight, when device
    /// writes become visible, and what invalidations do meanwhile: the
    /// [module docs](super::pending).
    pub fn scope<'env, R, F>(&'env self, f: F) -> Result<R, MirrorError>
    where
        F: for<'scope> FnOnce(&Scope<'scope, 'env, B, H>) -> Result<R, MirrorError>,
    {
        thread::scope(|threads| {
            let scope = Scope {
                mirror: self,
                threads,
                launches: Mutex::new(Vec::new()),
            };
            let r = f(&scope);
            scope.finish(r)
        })
    }
}
