//! Fault injection and device-table inspection, for tests (cargo feature
//! `fault-injection`, off by default).
//!
//! [`FaultInjector`] makes chosen [`Backend`](hmm_core::mirror::backend::Backend)
//! calls fail on demand — the next *n* calls, every call, or a seeded random
//! fraction of them — and chooses what a failing call applies before it
//! reports the error: nothing, a prefix of its batch, or all of it. The
//! trait's `# Errors` rules say an `Err` is "unknown: maybe none, some or all
//! applied"; these hooks produce each of those cases, so the core's recovery
//! (slots quarantined until the entries naming them are known cleared,
//! batches retried) can be tested on a device that otherwise behaves.
//!
//! [`CpuDevice::device_leaf_entries`](crate::CpuDevice::device_leaf_entries)
//! and [`CpuDevice::entries_naming`](crate::CpuDevice::entries_naming) read
//! the *device's* page table (not the core's shadow of it), so a test can
//! prove that no entry the device can reach names a freed slot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hmm_core::mirror::backend::{BackendError, PteLoc};
use hmm_core::mirror::format::{level_index, Pte, TablePage, ENTRIES, INDEX_SHIFT, LEVELS};

use crate::exec::lock;
use crate::memory::Memory;

/// A [`Backend`](hmm_core::mirror::backend::Backend) call a
/// [`FaultInjector`] can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// `copy_to_device`: pages applied in batch order.
    CopyToDevice,
    /// `copy_to_host`: pages applied in batch order.
    CopyToHost,
    /// `write_ptes`: entries applied in batch order.
    WritePtes,
    /// `read_ptes`: values appended for the applied prefix.
    ReadPtes,
    /// `clear_pte_bits`: bits cleared (and old values appended) for the
    /// applied prefix.
    ClearPteBits,
    /// `launch`: a failing launch submits nothing, whatever [`Applied`] says.
    Launch,
    /// `bind_window`: a failing bind binds nothing, whatever [`Applied`]
    /// says (the trait: an `Err` leaves the window unbound).
    BindWindow,
    /// `unbind_window`: the window is made unreachable whatever [`Applied`]
    /// says (the trait's safety contract); with [`Applied::Nothing`] it
    /// stays *held*, so `bind_window` of it fails until an unbind succeeds
    /// (a driver that could not release an import); otherwise it is
    /// released and only the result is an error.
    UnbindWindow,
}

impl Call {
    /// Every call kind.
    pub const ALL: [Call; 8] = [
        Call::CopyToDevice,
        Call::CopyToHost,
        Call::WritePtes,
        Call::ReadPtes,
        Call::ClearPteBits,
        Call::Launch,
        Call::BindWindow,
        Call::UnbindWindow,
    ];

    fn idx(self) -> usize {
        self as usize
    }
}

/// What a call that fails by injection applies before returning its error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Applied {
    /// Nothing (the default).
    #[default]
    Nothing,
    /// The first `n` items of the batch (all of it if shorter).
    Prefix(usize),
    /// A prefix of random length `0..=len`, drawn from the call kind's
    /// seeded generator (see [`FaultInjector::fail_rate`]).
    RandomPrefix,
    /// The whole batch: the call did its work and still reports an error.
    All,
}

/// How one call kind fails.
#[derive(Clone, Copy, Debug, Default)]
struct Rule {
    /// The next this-many calls fail.
    next: u64,
    /// Every call fails.
    always: bool,
    /// Probability that a call fails (0: never).
    rate: f64,
    /// xorshift64* state for `rate` and [`Applied::RandomPrefix`].
    rng: u64,
    applied: Applied,
    /// Calls failed by injection.
    injected: u64,
}

impl Rule {
    fn active(&self) -> bool {
        self.next > 0 || self.always || self.rate > 0.0
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: a fixed, dependency-free generator, so a seed
        // reproduces a stress run.
        let mut x = self.rng.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct State {
    rules: [Rule; Call::ALL.len()],
    lost: Option<String>,
}

struct Inner {
    /// Whether any rule is active or the device is lost (a fast path: an
    /// unarmed injector costs one atomic load per call).
    armed: AtomicBool,
    state: Mutex<State>,
    /// The device's cancel flag: set when the device is lost, so queued
    /// invocations are skipped.
    cancel: Arc<AtomicBool>,
    /// Calls received, by kind ([`FaultInjector::calls`]).
    calls: [AtomicU64; Call::ALL.len()],
}

/// A failure decided by the injector for one call.
pub(crate) struct Injected {
    /// Items of the batch to apply before failing.
    pub(crate) apply: usize,
    /// The error to return.
    pub(crate) error: BackendError,
}

/// Makes a [`CpuDevice`](crate::CpuDevice)'s calls fail on demand, for
/// tests (feature `fault-injection`). Obtained from
/// [`CpuDevice::faults`](crate::CpuDevice::faults); cheap to clone (an
/// `Arc`), usable from any thread, and shared by every clone: settings
/// apply to calls that start after they are made.
///
/// A call failed by injection returns
/// `BackendError::Other("injected fault: …")` ([`FaultInjector::is_injected`]
/// recognises it) after applying what its [`Applied`] setting says. Bad
/// input is still reported as such, before injection, applying nothing.
///
/// ```
/// # #[cfg(feature = "fault-injection")] {
/// use hmm_core::mirror::backend::{Backend, DeviceConfig, PteWrite};
/// use hmm_core::mirror::format::{PoolSlot, Pte, TablePage};
/// use hmm_driver_cpu::{Applied, Call, CpuDevice, FaultInjector};
///
/// let dev = CpuDevice::with_threads(1);
/// dev.init(DeviceConfig { pool_slots: 4, table_pages: 2 }).unwrap();
/// let faults = dev.faults();
/// faults.fail_next(Call::WritePtes, 1).set_applied(Call::WritePtes, Applied::Prefix(1));
/// let w = |i| PteWrite { table: TablePage(1), index: i, pte: Pte::leaf(PoolSlot(1), true) };
/// let e = dev.write_ptes(&[w(0), w(1)]).unwrap_err();
/// assert!(FaultInjector::is_injected(&e));
/// dev.write_ptes(&[w(0), w(1)]).unwrap(); // only the next call failed
/// assert_eq!(faults.injected(Call::WritePtes), 1);
/// # }
/// ```
#[derive(Clone)]
pub struct FaultInjector {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FaultInjector").finish_non_exhaustive()
    }
}

/// The prefix of every injected error's message.
const PREFIX: &str = "injected fault: ";

impl FaultInjector {
    pub(crate) fn new(cancel: Arc<AtomicBool>) -> Self {
        FaultInjector {
            inner: Arc::new(Inner {
                armed: AtomicBool::new(false),
                state: Mutex::new(State {
                    rules: [Rule::default(); Call::ALL.len()],
                    lost: None,
                }),
                cancel,
                calls: Default::default(),
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) -> &Self {
        let mut st = lock(&self.inner.state);
        f(&mut st);
        let armed = st.lost.is_some() || st.rules.iter().any(Rule::active);
        // Relaxed: the flag only lets calls skip the mutex; a call racing
        // with a settings change may see either the old or the new settings
        // ("apply to calls that start after they are made").
        self.inner.armed.store(armed, Ordering::Relaxed);
        self
    }

    /// The next `n` calls of kind `call` fail (added to any still pending).
    pub fn fail_next(&self, call: Call, n: u64) -> &Self {
        self.update(|st| {
            let r = &mut st.rules[call.idx()];
            r.next = r.next.saturating_add(n);
        })
    }

    /// Every call of kind `call` fails until [`FaultInjector::clear`].
    pub fn fail_always(&self, call: Call) -> &Self {
        self.update(|st| st.rules[call.idx()].always = true)
    }

    /// Each call of kind `call` fails with probability `p` (clamped to
    /// `0..=1`; 0 turns the random mode off), drawn from a generator seeded
    /// with `seed` — the same seed and the same sequence of calls fail the
    /// same calls. [`Applied::RandomPrefix`] draws from the same generator.
    pub fn fail_rate(&self, call: Call, p: f64, seed: u64) -> &Self {
        self.update(|st| {
            let r = &mut st.rules[call.idx()];
            r.rate = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
            // Never zero (xorshift's fixed point); distinct per call kind.
            r.rng = seed ^ 0x9e37_79b9_7f4a_7c15 ^ (call.idx() as u64 + 1);
        })
    }

    /// What a failing call of kind `call` applies first (default
    /// [`Applied::Nothing`]).
    pub fn set_applied(&self, call: Call, how: Applied) -> &Self {
        self.update(|st| st.rules[call.idx()].applied = how)
    }

    /// Stops failing calls of kind `call` (pending, always and random) and
    /// resets its [`Applied`] setting; counters are kept.
    pub fn clear(&self, call: Call) -> &Self {
        self.update(|st| {
            let r = &mut st.rules[call.idx()];
            *r = Rule {
                injected: r.injected,
                ..Rule::default()
            };
        })
    }

    /// [`FaultInjector::clear`] for every call kind. A lost device stays
    /// lost.
    pub fn clear_all(&self) -> &Self {
        for c in Call::ALL {
            self.clear(c);
        }
        self
    }

    /// Calls of kind `call` the device has received so far, failed or not:
    /// what a test counts to show the core batches its device calls (a
    /// bulk eviction clears many entries in one `write_ptes`).
    pub fn calls(&self, call: Call) -> u64 {
        // Relaxed: a statistics counter.
        self.inner.calls[call.idx()].load(Ordering::Relaxed)
    }

    /// How many calls of kind `call` failed by injection so far.
    pub fn injected(&self, call: Call) -> u64 {
        lock(&self.inner.state).rules[call.idx()].injected
    }

    /// Loses the device, for good: from now on every call that can fail
    /// returns `BackendError::DeviceLost(why)` and applies nothing, except
    /// `unbind_window`, which still makes its window unreachable (and
    /// releases it) first. Queued invocations of launches in flight are
    /// skipped; `wait` and `take_outcome` wait for the ones running, so
    /// once they returned `DeviceLost` for a submission none of its work
    /// runs. (The trait's rule: a lost device stays lost.)
    pub fn lose_device(&self, why: &str) {
        self.update(|st| {
            st.lost.get_or_insert_with(|| why.to_owned());
        });
        // Relaxed: a best-effort stop hint, as in `Drop for CpuDevice`.
        self.inner.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether `e` is an error this injector made up (rather than one the
    /// device reported for a real reason).
    pub fn is_injected(e: &BackendError) -> bool {
        matches!(e, BackendError::Other(m) if m.starts_with(PREFIX))
    }

    /// Shorthand: the next `n` `write_ptes` calls fail.
    pub fn fail_write_ptes(&self, n: u64) -> &Self {
        self.fail_next(Call::WritePtes, n)
    }
    /// Shorthand: every `write_ptes` call fails.
    pub fn fail_write_ptes_always(&self) -> &Self {
        self.fail_always(Call::WritePtes)
    }
    /// Shorthand: the next `n` `unbind_window` calls fail.
    pub fn fail_unbind_window(&self, n: u64) -> &Self {
        self.fail_next(Call::UnbindWindow, n)
    }
    /// Shorthand: the next `n` `clear_pte_bits` calls fail.
    pub fn fail_clear_pte_bits(&self, n: u64) -> &Self {
        self.fail_next(Call::ClearPteBits, n)
    }
    /// Shorthand: the next `n` `copy_to_host` calls fail.
    pub fn fail_copy_to_host(&self, n: u64) -> &Self {
        self.fail_next(Call::CopyToHost, n)
    }
    /// Shorthand: the next `n` `copy_to_device` calls fail.
    pub fn fail_copy_to_device(&self, n: u64) -> &Self {
        self.fail_next(Call::CopyToDevice, n)
    }
    /// Shorthand: the next `n` `read_ptes` calls fail.
    pub fn fail_read_ptes(&self, n: u64) -> &Self {
        self.fail_next(Call::ReadPtes, n)
    }

    /// The reason the device was lost, if it was.
    pub(crate) fn lost(&self) -> Option<String> {
        // Relaxed: see `update`; the mutex orders the reason itself.
        if !self.inner.armed.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.inner.state).lost.clone()
    }

    /// Whether this call (of a batch of `len` items) fails, and how much
    /// of it is applied first.
    pub(crate) fn decide(&self, call: Call, len: usize) -> Option<Injected> {
        // Relaxed: a statistics counter.
        self.inner.calls[call.idx()].fetch_add(1, Ordering::Relaxed);
        // Relaxed: see `update`.
        if !self.inner.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut st = lock(&self.inner.state);
        if let Some(why) = &st.lost {
            return Some(Injected {
                apply: 0,
                error: BackendError::DeviceLost(why.clone()),
            });
        }
        let r = &mut st.rules[call.idx()];
        let fail = if r.next > 0 {
            r.next -= 1;
            true
        } else if r.always {
            true
        } else if r.rate > 0.0 {
            // 53 random bits as a uniform value in [0, 1).
            ((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < r.rate
        } else {
            false
        };
        if !st.rules.iter().any(Rule::active) {
            // The last pending failure was used up: back to the fast path
            // (Relaxed: see `update`; `lost` is `None` here).
            self.inner.armed.store(false, Ordering::Relaxed);
        }
        if !fail {
            return None;
        }
        let r = &mut st.rules[call.idx()];
        r.injected += 1;
        let apply = match r.applied {
            Applied::Nothing => 0,
            Applied::Prefix(n) => n.min(len),
            Applied::RandomPrefix => (r.next_u64() % (len as u64 + 1)) as usize,
            Applied::All => len,
        };
        Some(Injected {
            apply,
            error: BackendError::Other(format!(
                "{PREFIX}{call:?} #{} ({apply} of {len} applied)",
                r.injected
            )),
        })
    }
}

/// A valid leaf entry of the device's page table, reachable by the
/// device's walk from the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLeaf {
    /// The (page-aligned) virtual address the entry translates.
    pub va: u64,
    /// Where the entry lives.
    pub loc: PteLoc,
    /// The entry as the device holds it now (with its `ACCESSED`/`DIRTY`
    /// bits).
    pub pte: Pte,
}

/// Every valid leaf the device's walk reaches from table page 0 (the same
/// rules as the emulated MMU: a directory entry naming a table page
/// outside the table leads nowhere). A table page linked from several
/// directory entries is listed once per virtual address it maps.
pub(crate) fn leaf_entries(mem: &Memory) -> Vec<DeviceLeaf> {
    let mut out = Vec::new();
    walk(mem, 0, LEVELS, 0, &mut out);
    out
}

fn walk(mem: &Memory, table: u32, level: u32, va: u64, out: &mut Vec<DeviceLeaf>) {
    for i in 0..ENTRIES {
        let e = Pte(mem.tables[table as usize * ENTRIES + i].load(Ordering::Acquire));
        if !e.valid() {
            continue;
        }
        let va = va | ((i as u64) << (INDEX_SHIFT + 9 * (level - 1)));
        debug_assert_eq!(level_index(va, level), i);
        if level == 1 {
            out.push(DeviceLeaf {
                va,
                loc: PteLoc {
                    table: TablePage(table),
                    index: i as u16,
                },
                pte: e,
            });
        } else if e.index() < u64::from(mem.table_pages) {
            walk(mem, e.next_table().0, level - 1, va, out);
        }
    }
}
