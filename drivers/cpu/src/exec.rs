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
    FAULT_WRITE,
};

use crate::lane::{DeviceFault, FaultKind, Lane};
use crate::memory::Memory;

/// The closure type of a kernel: called once per invocation with the
/// lane and the invocation index.
pub type KernelFn = dyn Fn(&mut Lane<'_>, u32) -> Result<(), DeviceFault> + Send + Sync;

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
        F: Fn(&mut Lane<'_>, u32) -> Result<(), DeviceFault> + Send + Sync + 'static,
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

enum Ids {
    All(u32),
    /// The replayed ids and their set's universe.
    Only(Box<[u32]>, u32),
}

impl Ids {
    /// Ids are below this (the outcome's `incomplete` universe).
    fn universe(&self) -> u32 {
        match self {
            Ids::All(n) => *n,
            Ids::Only(_, u) => *u,
        }
    }
    fn len(&self) -> usize {
        match self {
            Ids::All(n) => *n as usize,
            Ids::Only(v, _) => v.len(),
        }
    }
    fn get(&self, i: usize) -> u32 {
        match self {
            Ids::All(_) => i as u32,
            Ids::Only(v, _) => v.get(i).copied().unwrap_or(u32::MAX),
        }
    }
}

/// Why an invocation ended the launch.
enum Failure {
    Panic(String),
    Fault(DeviceFault),
}

#[derive(Default)]
struct Results {
    faults: Vec<(u32, DeviceFault)>,
    failures: Vec<(u32, Failure)>,
    lost: Option<String>,
}

impl Results {
    fn merge(&mut self, other: Results) {
        self.faults.extend(other.faults);
        self.failures.extend(other.failures);
        if self.lost.is_none() {
            self.lost = other.lost;
        }
    }
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
    results: Mutex<Results>,
}

/// A contiguous range of a job's invocation list.
pub(crate) struct Chunk {
    job: Arc<Job>,
    start: usize,
    end: usize,
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
            (None, Some(set)) => Ids::Only(set.iter().collect(), set.universe()),
            (None, None) => Ids::All(0),
        };
        let n = ids.len();
        // About four chunks per thread for balance, at most 4096
        // invocations each so a cancel is noticed soon.
        let per = n.div_ceil(threads.max(1) * 4).clamp(1, 4096);
        let count = n.div_ceil(per).max(1);
        let job = Arc::new(Job {
            id: spec.id,
            kernel: spec.kernel,
            args: spec.args.into(),
            ids,
            mem: spec.mem,
            hooks: spec.hooks,
            subs: spec.subs,
            cancel: spec.cancel,
            remaining: AtomicUsize::new(count),
            results: Mutex::new(Results::default()),
        });
        (0..count)
            .map(|c| Chunk {
                job: Arc::clone(&job),
                start: c * per,
                end: ((c + 1) * per).min(n),
            })
            .collect()
    }

    /// Records a chunk's results; the last chunk finishes the job.
    fn chunk_done(&self, results: Results) {
        lock(&self.results).merge(results);
        if self.remaining.fetch_sub(1, AcqRel) == 1 {
            self.finish();
        }
    }

    fn finish(&self) {
        let r = core::mem::take(&mut *lock(&self.results));
        let outcome = self.outcome(r);
        self.subs.complete(self.id, outcome);
    }

    fn outcome(&self, mut r: Results) -> Result<LaunchOutcome, BackendError> {
        if let Some(why) = r.lost {
            return Err(BackendError::DeviceLost(why));
        }
        r.failures.sort_by_key(|(inv, _)| *inv);
        if let Some((inv, failure)) = r.failures.first() {
            let more = match r.failures.len() - 1 {
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
        r.faults.sort_by_key(|(inv, _)| *inv);
        let incomplete =
            InvocationSet::from_ids(self.ids.universe(), r.faults.iter().map(|(inv, _)| *inv));
        let cap = self.hooks.capacity.unwrap_or(usize::MAX);
        let mut faults: Vec<RawFaultRecord> = r
            .faults
            .iter()
            .take(cap)
            .map(|(inv, f)| RawFaultRecord {
                invocation: *inv,
                flags: if f.write { FAULT_WRITE } else { 0 }
                    | if f.atomic { FAULT_ATOMIC } else { 0 },
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
        let mut out = Results::default();
        let mut lane = Lane::new(&job.mem, &job.args);
        for i in self.start..self.end {
            // Relaxed: a best-effort stop hint; the outcome is reported through the submission mutex.
            if job.cancel.load(Relaxed) {
                out.lost = Some("device dropped with the launch in flight".into());
                break;
            }
            let inv = job.ids.get(i);
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
                    out.failures
                        .push((inv, Failure::Panic(panic_message(&*payload))));
                    continue;
                }
            };
            if let Err(f) = result {
                if f.is_page_fault() {
                    out.faults.push((inv, f));
                } else {
                    out.failures.push((inv, Failure::Fault(f)));
                }
            }
        }
        drop(lane);
        job.chunk_done(out);
    }

    /// Accounts for a chunk that never ran (no worker could take it).
    pub(crate) fn abandon(self, why: &str) {
        self.job.chunk_done(Results {
            lost: Some(why.to_owned()),
            ..Results::default()
        });
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
