//! Execution: kernels, jobs split into chunks, the worker pool and the
//! submission table.

use core::fmt;
use core::sync::atomic::Ordering::{AcqRel, Relaxed};
use core::sync::atomic::{AtomicBool, AtomicUsize};
use core::time::Duration;
use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use hmm_core::mirror::backend::{
    BackendError, InvocationSet, LaunchOutcome, RawFaultRecord, SubmissionId, FAULT_ATOMIC,
    FAULT_MISALIGNED, FAULT_WRITE,
};

use crate::lane::{FaultKind, Lane, LaneFault};
use crate::memory::Memory;

/// The closure type of a kernel: called once per invocation with the
/// lane and the invocation index.
pub type KernelFn = dyn Fn(&mut Lane<'_>, u32) -> Result<(), LaneFault> + Send + Sync;

/// A kernel for [`crate::CpuDevice`]: a shared Rust closure.
///
/// `Backend::launch` borrows the kernel only for the call, yet the work
/// runs after it returns, so the device needs its own handle: launching
/// clones the `Arc` (cheap), never the closure.
#[derive(Clone)]
pub struct CpuKernel(Arc<KernelFn>);

impl CpuKernel {
    /// Wraps a closure as a kernel.
    pub fn new<F>(f: F) -> Self
    where
        F: Fn(&mut Lane<'_>, u32) -> Result<(), LaneFault> + Send + Sync + 'static,
    {
        CpuKernel(Arc::new(f))
    }
}

impl fmt::Debug for CpuKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CpuKernel(..)")
    }
}

/// A test hook that rewrites fault records before they are reported.
pub type FaultMangler = dyn Fn(&mut RawFaultRecord) + Send + Sync;

/// Fault-injection settings, snapshotted by each launch.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    /// Fault-buffer capacity in records (`None`: unbounded).
    pub(crate) capacity: Option<usize>,
    /// Rewrites each reported record.
    pub(crate) mangler: Option<Arc<FaultMangler>>,
}

/// Locks a mutex, ignoring poisoning (no code panics while holding ours,
/// and the protected data stays consistent at every unlock).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fault records a launch keeps when no capacity was set
/// ([`crate::CpuDevice::set_fault_buffer_capacity`]): about 3 MiB of
/// records. Invocations whose record did not fit are still incomplete
/// and fault again on replay, as on the GPU drivers, so host memory per
/// launch does not grow with the number of faulting invocations.
pub(crate) const DEFAULT_FAULT_RECORDS: usize = 1 << 16;

/// The invocations a launch runs: all of `0..n`, or a replayed set (held
/// as the set itself: at most `n / 8` bytes, never a list of every id).
enum Ids {
    All(u32),
    Only(InvocationSet),
}

impl Ids {
    /// Ids are below this (the outcome's `incomplete` universe).
    fn universe(&self) -> u32 {
        match self {
            Ids::All(n) => *n,
            Ids::Only(set) => set.universe(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Ids::All(n) => *n as usize,
            Ids::Only(set) => set.len(),
        }
    }
    /// Calls `f` with each id in `lo..hi`, ascending.
    fn each_in(&self, lo: u64, hi: u64, mut f: impl FnMut(u32)) {
        match self {
            Ids::All(_) => (lo..hi).for_each(|i| f(i as u32)),
            Ids::Only(set) => {
                let Ok(lo) = u32::try_from(lo) else { return };
                set.iter_from(lo)
                    .take_while(|&id| u64::from(id) < hi)
                    .for_each(f)
            }
        }
    }
}

/// Why an invocation ended the launch.
enum Failure {
    Panic(String),
    Fault(LaneFault),
}

/// What a chunk (and, merged, the job) produced, in memory bounded by the
/// launch size whatever the number of faulting invocations: every
/// faulting id is a bit (`incomplete`), at most `cap` of them also carry a
/// fault record (the lowest ids), and of the failures only the lowest and
/// a count are kept.
struct Results {
    /// Faulting ids not yet merged into the job's set (a chunk's own,
    /// ascending; at most a chunk's length).
    faulted: Vec<u32>,
    /// Fault records, ascending by id, at most `cap`.
    faults: Vec<(u32, LaneFault)>,
    cap: usize,
    /// The lowest-numbered failure and how many there were.
    failure: Option<(u32, Failure)>,
    failures: u64,
    lost: Option<String>,
}

impl Results {
    fn new(cap: usize) -> Results {
        Results {
            faulted: Vec::new(),
            faults: Vec::new(),
            cap,
            failure: None,
            failures: 0,
            lost: None,
        }
    }

    fn fault(&mut self, inv: u32, f: LaneFault) {
        self.faulted.push(inv);
        if self.faults.len() < self.cap {
            self.faults.push((inv, f));
        }
    }

    fn fail(&mut self, inv: u32, f: Failure) {
        self.failures += 1;
        if self.failure.as_ref().is_none_or(|(first, _)| inv < *first) {
            self.failure = Some((inv, f));
        }
    }

    /// Takes in a chunk's results, keeping the `cap` lowest records.
    fn merge(&mut self, other: Results, incomplete: &mut InvocationSet) {
        for id in other.faulted {
            incomplete.insert(id);
        }
        // Chunks mostly finish in ascending order: a chunk whose lowest
        // record lies above a full buffer's highest adds nothing.
        let full_above = self.faults.len() >= self.cap
            && match (self.faults.last(), other.faults.first()) {
                (Some((top, _)), Some((low, _))) => low > top,
                _ => true,
            };
        if !full_above && !other.faults.is_empty() {
            self.faults.extend(other.faults);
            self.faults.sort_by_key(|(inv, _)| *inv);
            self.faults.truncate(self.cap);
        }
        self.failures += other.failures;
        if let Some((inv, f)) = other.failure {
            if self.failure.as_ref().is_none_or(|(first, _)| inv < *first) {
                self.failure = Some((inv, f));
            }
        }
        if self.lost.is_none() {
            self.lost = other.lost;
        }
    }
}

/// The job's merged results and its set of incomplete invocations.
struct Merged {
    results: Results,
    incomplete: InvocationSet,
}

/// One launch.
pub(crate) struct Job {
    id: SubmissionId,
    kernel: CpuKernel,
    args: Box<[u64]>,
    ids: Ids,
    mem: Arc<Memory>,
    hooks: Hooks,
    subs: Arc<Submissions>,
    cancel: Arc<AtomicBool>,
    remaining: AtomicUsize,
    /// Fault records kept at most (the fault-buffer capacity).
    cap: usize,
    merged: Mutex<Merged>,
}

/// The job's invocations whose ids lie in `start..end`.
pub(crate) struct Chunk {
    job: Arc<Job>,
    start: u64,
    end: u64,
}

/// Everything `launch` needs to build a job.
pub(crate) struct LaunchSpec<'a> {
    pub(crate) id: SubmissionId,
    pub(crate) kernel: CpuKernel,
    pub(crate) all: Option<u32>,
    pub(crate) only: Option<&'a InvocationSet>,
    pub(crate) args: &'a [u64],
    pub(crate) mem: Arc<Memory>,
    pub(crate) hooks: Hooks,
    pub(crate) subs: Arc<Submissions>,
    pub(crate) cancel: Arc<AtomicBool>,
}

impl Job {
    /// Builds the job and splits it into chunks (at least one).
    pub(crate) fn chunks(spec: LaunchSpec<'_>, threads: usize) -> Vec<Chunk> {
        let ids = match (spec.all, spec.only) {
            (Some(n), _) => Ids::All(n),
            (None, Some(set)) => Ids::Only(set.clone()),
            (None, None) => Ids::All(0),
        };
        let n = ids.len() as u64;
        let universe = u64::from(ids.universe());
        // About four chunks per thread for balance, at most 4096
        // invocations each (on average, for a replayed set) so a chunk's
        // own results stay small.
        let per = n.div_ceil(threads.max(1) as u64 * 4).clamp(1, 4096);
        let count = n.div_ceil(per).max(1);
        // Chunks split the id space evenly: `count` pieces of `0..universe`.
        let span = universe.div_ceil(count).max(1);
        let cap = spec.hooks.capacity.unwrap_or(DEFAULT_FAULT_RECORDS);
        let job = Arc::new(Job {
            id: spec.id,
            kernel: spec.kernel,
            args: spec.args.into(),
            ids,
            mem: spec.mem,
            hooks: spec.hooks,
            subs: spec.subs,
            cancel: spec.cancel,
            remaining: AtomicUsize::new(count as usize),
            cap,
            merged: Mutex::new(Merged {
                results: Results::new(cap),
                incomplete: InvocationSet::new(universe as u32),
            }),
        });
        (0..count)
            .map(|c| Chunk {
                job: Arc::clone(&job),
                start: c * span,
                end: ((c + 1) * span).min(universe),
            })
            .collect()
    }

    /// Records a chunk's results; the last chunk finishes the job.
    fn chunk_done(&self, results: Results) {
        {
            let mut m = lock(&self.merged);
            let Merged {
                results: into,
                incomplete,
            } = &mut *m;
            into.merge(results, incomplete);
        }
        if self.remaining.fetch_sub(1, AcqRel) == 1 {
            self.finish();
        }
    }

    fn finish(&self) {
        let m = core::mem::replace(
            &mut *lock(&self.merged),
            Merged {
                results: Results::new(0),
                incomplete: InvocationSet::new(0),
            },
        );
        let outcome = self.outcome(m);
        self.subs.complete(self.id, outcome);
    }

    fn outcome(&self, m: Merged) -> Result<LaunchOutcome, BackendError> {
        let Merged {
            results: r,
            incomplete,
        } = m;
        if let Some(why) = r.lost {
            return Err(BackendError::DeviceLost(why));
        }
        if let Some((inv, failure)) = &r.failure {
            let more = match r.failures - 1 {
                0 => String::new(),
                m => format!(" (and {m} more failed invocations)"),
            };
            return Err(match failure {
                Failure::Panic(msg) => {
                    BackendError::Kernel(format!("invocation {inv} panicked: {msg}{more}"))
                }
                Failure::Fault(f) if f.kind == FaultKind::BadEntry => {
                    BackendError::Other(format!("invocation {inv}: {f}{more}"))
                }
                Failure::Fault(f) => BackendError::Kernel(format!("invocation {inv}: {f}{more}")),
            });
        }
        let mut faults: Vec<RawFaultRecord> = r
            .faults
            .iter()
            .take(self.cap)
            .map(|(inv, f)| RawFaultRecord {
                invocation: *inv,
                flags: if f.write { FAULT_WRITE } else { 0 }
                    | if f.atomic { FAULT_ATOMIC } else { 0 }
                    | if f.kind == FaultKind::Misaligned {
                        FAULT_MISALIGNED
                    } else {
                        0
                    },
                addr_lo: f.addr as u32,
                addr_hi: (f.addr >> 32) as u32,
            })
            .collect();
        if let Some(m) = &self.hooks.mangler {
            let mangled =
                panic::catch_unwind(AssertUnwindSafe(|| faults.iter_mut().for_each(|f| m(f))));
            if mangled.is_err() {
                return Err(BackendError::Other("fault-record mangler panicked".into()));
            }
        }
        Ok(LaunchOutcome { faults, incomplete })
    }
}

fn panic_message(payload: &(dyn core::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl Chunk {
    /// Runs the chunk's invocations on this thread.
    fn run(self) {
        let job = &*self.job;
        let mut out = Results::new(job.cap);
        let mut lane = Lane::new(&job.mem, &job.args);
        job.ids.each_in(self.start, self.end, |inv| {
            // Relaxed: a best-effort stop hint; the outcome is reported through the submission mutex.
            if out.lost.is_some() || job.cancel.load(Relaxed) {
                out.lost = Some("device dropped with the launch in flight".into());
                return;
            }
            lane.begin(inv);
            let ran = panic::catch_unwind(AssertUnwindSafe(|| (job.kernel.0)(&mut lane, inv)));
            let result = match ran {
                Ok(Ok(())) => lane.commit(),
                Ok(Err(f)) => {
                    lane.discard();
                    Err(f)
                }
                Err(payload) => {
                    lane.discard();
                    out.fail(inv, Failure::Panic(panic_message(&*payload)));
                    return;
                }
            };
            if let Err(f) = result {
                // Misaligned accesses are reported like page faults, with
                // their flag: the core ends the launch with the typed error
                // every driver gives.
                if f.is_page_fault() || f.kind == FaultKind::Misaligned {
                    out.fault(inv, f);
                } else {
                    out.fail(inv, Failure::Fault(f));
                }
            }
        });
        drop(lane);
        job.chunk_done(out);
    }

    /// Accounts for a chunk that never ran (no worker could take it).
    pub(crate) fn abandon(self, why: &str) {
        let mut r = Results::new(0);
        r.lost = Some(why.to_owned());
        self.job.chunk_done(r);
    }
}

/// The worker threads and the queue feeding them.
pub(crate) struct Workers {
    tx: Option<Sender<Chunk>>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers.
    pub(crate) fn spawn(n: usize) -> Result<Self, BackendError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Chunk>();
        let mut w = Workers {
            tx: Some(tx),
            handles: Vec::with_capacity(n),
        };
        for i in 0..n {
            let rx: Receiver<Chunk> = rx.clone();
            let spawned = thread::Builder::new()
                .name(format!("hmm-cpu-{i}"))
                .spawn(move || {
                    while let Ok(chunk) = rx.recv() {
                        chunk.run();
                    }
                });
            match spawned {
                Ok(h) => w.handles.push(h),
                Err(e) => {
                    w.shutdown();
                    return Err(BackendError::Other(format!("spawning worker {i}: {e}")));
                }
            }
        }
        Ok(w)
    }

    /// Queues chunks; chunks that cannot be queued are abandoned.
    pub(crate) fn submit(&self, chunks: Vec<Chunk>) {
        let mut it = chunks.into_iter();
        for c in it.by_ref() {
            let Some(tx) = &self.tx else {
                c.abandon("device shut down");
                break;
            };
            if let Err(e) = tx.send(c) {
                e.into_inner().abandon("all device workers exited");
                break;
            }
        }
        for c in it {
            c.abandon("all device workers exited");
        }
    }

    /// Closes the queue and joins the workers; they drain what is queued
    /// (skipping invocations once the device's cancel flag is set).
    pub(crate) fn shutdown(&mut self) {
        self.tx = None;
        for h in self.handles.drain(..) {
            // A worker only ends by a panic outside the kernel (a bug);
            // nothing to report from a destructor.
            let _ = h.join();
        }
    }
}

enum Slot {
    Running,
    Done(Result<LaunchOutcome, BackendError>),
}

enum Status {
    Unknown,
    Running,
    Complete,
}

struct SubState {
    next: u64,
    slots: HashMap<u64, Slot>,
}

/// Submission ids and outcomes. Ids start at 1; an id below `next` that
/// has no slot was taken (complete).
pub(crate) struct Submissions {
    state: Mutex<SubState>,
    done: Condvar,
}

impl Submissions {
    pub(crate) fn new() -> Self {
        Submissions {
            state: Mutex::new(SubState {
                next: 1,
                slots: HashMap::new(),
            }),
            done: Condvar::new(),
        }
    }

    fn status(st: &SubState, id: SubmissionId) -> Status {
        if id.0 == 0 || id.0 >= st.next {
            return Status::Unknown;
        }
        match st.slots.get(&id.0) {
            Some(Slot::Running) => Status::Running,
            _ => Status::Complete,
        }
    }

    /// Issues a new id, running.
    pub(crate) fn begin(&self) -> SubmissionId {
        let mut st = lock(&self.state);
        let id = st.next;
        st.next += 1;
        st.slots.insert(id, Slot::Running);
        SubmissionId(id)
    }

    /// Records an outcome and wakes waiters.
    pub(crate) fn complete(&self, id: SubmissionId, outcome: Result<LaunchOutcome, BackendError>) {
        lock(&self.state).slots.insert(id.0, Slot::Done(outcome));
        self.done.notify_all();
    }

    pub(crate) fn wait(
        &self,
        id: SubmissionId,
        timeout: Option<Duration>,
    ) -> Result<bool, BackendError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = lock(&self.state);
        loop {
            match Self::status(&st, id) {
                Status::Unknown => return Err(BackendError::UnknownSubmission(id)),
                Status::Complete => return Ok(true),
                Status::Running => {}
            }
            st = match (timeout, deadline) {
                (None, _) | (Some(_), None) => {
                    self.done.wait(st).unwrap_or_else(PoisonError::into_inner)
                }
                (Some(_), Some(d)) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    self.done
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    pub(crate) fn is_complete(&self, id: SubmissionId) -> bool {
        matches!(Self::status(&lock(&self.state), id), Status::Complete)
    }

    pub(crate) fn take(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        let mut st = lock(&self.state);
        match Self::status(&st, id) {
            Status::Unknown => Err(BackendError::UnknownSubmission(id)),
            Status::Running => Err(BackendError::Other(format!(
                "submission {} has not completed; wait for it first",
                id.0
            ))),
            Status::Complete => match st.slots.remove(&id.0) {
                Some(Slot::Done(outcome)) => outcome,
                // Already taken (no slot left).
                Some(Slot::Running) | None => Err(BackendError::UnknownSubmission(id)),
            },
        }
    }
}
