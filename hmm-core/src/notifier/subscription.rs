//! One interval subscription: its range, its sequence number and the
//! driver's callbacks.

use core::fmt;
use core::ops::Deref;
use core::time::Duration;

use super::event::NotifierRange;
use super::space::SpaceShared;
use crate::addr::VaRange;
use crate::error::NotifierError;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering};

/// A sequence number handed out by [`Interval::read_begin`] and checked by
/// [`Interval::read_retry`]. Opaque: only equality means anything.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Seq(pub(crate) u64);

impl Seq {
    /// The raw value, for diagnostics and tests (odd values are the
    /// sequences of running invalidations).
    pub fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seq({})", self.0)
    }
}

/// The driver's side of an interval subscription.
///
/// Implemented by whatever a driver keeps per mirrored region (a device
/// mirror's region object, a test's recorder).
pub trait IntervalNotifier: Send + Sync + 'static {
    /// The CPU range `range.range` (which overlaps this subscription) is
    /// about to change; stop every device use of it.
    ///
    /// Contract, in this order:
    /// 1. take the driver lock that also guards [`Interval::read_retry`]
    ///    on the fault path;
    /// 2. call `interval.set_seq(cur_seq)` under it, so every fault that
    ///    started earlier sees the collision and retries;
    /// 3. zap the device page-table entries covering the range **and** wait
    ///    for in-flight device work that may still hold translations;
    /// 4. return `true`.
    ///
    /// If `range.blockable` is false and step 1 or 3 would have to sleep,
    /// return `false` without doing anything; the whole invalidation then
    /// reports [`NotifierError::WouldBlock`]. Returning `false` from a
    /// blockable invalidation is a contract violation: the registry counts
    /// it ([`super::SpaceStats::contract_violations`]) and carries on.
    ///
    /// The callback may call [`super::AddressSpace::insert`], `put`
    /// (dropping a [`Subscription`]) and nested invalidations; those are
    /// deferred or safe. A blocking [`Subscription::remove`] on the same
    /// space is refused with [`NotifierError::RemoveInCallback`].
    fn invalidate(&self, interval: &Interval, range: &NotifierRange, cur_seq: Seq) -> bool;

    /// Runs exactly once, after the subscription has left the tree and no
    /// invalidate callback for it can run any more — whether it left by
    /// [`Subscription::remove`] or by `put`/drop. The default does nothing.
    fn release(&self) {}
}

/// Where a subscription stands with respect to the interval tree. Read and
/// written only while holding the space's state lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Membership {
    /// Inserted during an invalidation; waiting on the deferred list.
    PendingInsert,
    /// In the tree.
    InTree(super::interval_tree::EntryId),
    /// In the tree; a removal waits on the deferred list. `ender_releases`
    /// says whether the thread that applies it runs `release` (a `put`) or
    /// the waiting remover does.
    PendingRemove {
        id: super::interval_tree::EntryId,
        ender_releases: bool,
    },
    /// Gone from the tree (or never reached it).
    Removed,
}

/// The non-generic part of a subscription: what the fault path and the
/// callbacks use.
pub struct Interval {
    range: VaRange,
    /// This subscription's `invalidate_seq`: the space sequence of the last
    /// invalidation whose callback reached it (odd), or an old odd value
    /// when none has (see the protocol in the module docs).
    seq: AtomicU64,
    pub(crate) membership: Mutex<Membership>,
    pub(crate) space: Arc<SpaceShared>,
}

impl fmt::Debug for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interval")
            .field("range", &self.range)
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl Interval {
    pub(crate) fn new(
        range: VaRange,
        seq: u64,
        membership: Membership,
        space: Arc<SpaceShared>,
    ) -> Self {
        Interval {
            range,
            seq: AtomicU64::new(seq),
            membership: Mutex::new(membership),
            space,
        }
    }

    /// The subscribed range.
    pub fn range(&self) -> VaRange {
        self.range
    }

    /// Starts a read-side critical section (a device fault's snapshot).
    ///
    /// Waits while an invalidation whose callback already reached this
    /// subscription is running (a deferred insert counts as reached), then
    /// returns the sequence to hand to [`Interval::read_retry`].
    pub fn read_begin(&self) -> Seq {
        // Acquire pairs with the Release in `set_seq`: if we see the value a
        // callback stored, we also see the space sequence that callback's
        // invalidation made odd (it was stored earlier on that thread), so
        // the comparison in `space.read_begin` cannot miss a running
        // invalidation that already reached us.
        let seq = self.seq.load(Ordering::Acquire);
        self.space.read_begin_wait(seq, None);
        Seq(seq)
    }

    /// [`Interval::read_begin`] that gives up after `timeout` with
    /// [`NotifierError::RetryTimeout`].
    pub fn read_begin_timeout(&self, timeout: Duration) -> Result<Seq, NotifierError> {
        // Acquire: as in `read_begin`.
        let seq = self.seq.load(Ordering::Acquire);
        if self.space.read_begin_wait(seq, Some(timeout)) {
            Ok(Seq(seq))
        } else {
            Err(NotifierError::RetryTimeout {
                attempts: 0,
                elapsed: timeout,
            })
        }
    }

    /// Whether the fault that began with `seq` must start over. Call it
    /// under the driver lock the invalidate callback takes; `false` then
    /// guarantees no invalidation has reached this subscription since
    /// `read_begin`, and none can until the lock is dropped, so committing
    /// device PTEs under the same lock is safe.
    pub fn read_retry(&self, seq: Seq) -> bool {
        // Relaxed: the driver lock orders this load after any `set_seq`
        // made under that lock, which is the only store that matters.
        self.seq.load(Ordering::Relaxed) != seq.0
    }

    /// Lock-free hint that the fault begun with `seq` will have to retry,
    /// to give up on expensive work early. `false` proves nothing; only
    /// [`Interval::read_retry`] under the driver lock is authoritative.
    pub fn check_retry(&self, seq: Seq) -> bool {
        // Relaxed: a hint; a stale `false` is caught by `read_retry`.
        self.seq.load(Ordering::Relaxed) != seq.0
    }

    /// Records that the invalidation with sequence `cur_seq` reached this
    /// subscription. Called by [`IntervalNotifier::invalidate`] under the
    /// driver lock.
    pub fn set_seq(&self, cur_seq: Seq) {
        // Release: see `read_begin` — a reader that sees this value must
        // also see the odd space sequence stored before the callback ran.
        self.seq.store(cur_seq.0, Ordering::Release);
    }
}

/// What the tree stores: a type-erased subscription.
pub(crate) trait SubEntry: Send + Sync {
    fn interval(&self) -> &Interval;
    fn invalidate(&self, range: &NotifierRange, cur_seq: Seq) -> bool;
    fn release(&self);
}

pub(crate) struct SubInner<T> {
    pub(crate) interval: Interval,
    pub(crate) ops: T,
}

impl<T: IntervalNotifier> SubEntry for SubInner<T> {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, range: &NotifierRange, cur_seq: Seq) -> bool {
        self.ops.invalidate(&self.interval, range, cur_seq)
    }
    fn release(&self) {
        self.ops.release()
    }
}

/// The owner's handle of an interval subscription.
///
/// Dropping it is [`Subscription::put`]: the non-blocking removal.
/// [`Subscription::remove`] is the blocking one.
pub struct Subscription<T: IntervalNotifier> {
    pub(crate) inner: Option<Arc<SubInner<T>>>,
}

impl<T: IntervalNotifier> Subscription<T> {
    fn entry(&self) -> &Arc<SubInner<T>> {
        // The Option is only emptied by `remove`/`put`/drop, all of which
        // consume or end the handle, so it is always Some here.
        self.inner
            .as_ref()
            .unwrap_or_else(|| unreachable!("subscription handle used after it was consumed"))
    }

    /// The sequence/range half, for the fault path.
    pub fn interval(&self) -> &Interval {
        &self.entry().interval
    }

    /// The driver's object.
    pub fn ops(&self) -> &T {
        &self.entry().ops
    }

    /// A shared reference to the driver's object that outlives the handle
    /// (for a deferred-release worker that must reach the region later).
    pub fn ops_arc(&self) -> SubscriptionRef<T> {
        SubscriptionRef(Arc::clone(self.entry()))
    }

    /// Blocking removal: returns once the subscription has left the tree and
    /// no invalidate callback for it is running or can start; its
    /// [`IntervalNotifier::release`] has run by then.
    ///
    /// Called from inside an invalidate callback of the same address space,
    /// waiting would deadlock: the subscription is then handed to
    /// [`Subscription::put`] instead and
    /// [`NotifierError::RemoveInCallback`] is returned.
    pub fn remove(mut self) -> Result<(), NotifierError> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        let entry: Arc<dyn SubEntry> = inner;
        SpaceShared::remove(entry)
    }

    /// Non-blocking removal (what drop does): if no invalidation is walking
    /// the tree the subscription leaves it now; otherwise it leaves when the
    /// last running invalidation ends. Its
    /// [`IntervalNotifier::release`] runs at that moment, on whichever
    /// thread performs the removal.
    pub fn put(mut self) {
        if let Some(inner) = self.inner.take() {
            let entry: Arc<dyn SubEntry> = inner;
            SpaceShared::put(entry);
        }
    }
}

impl<T: IntervalNotifier> Deref for Subscription<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.ops()
    }
}

impl<T: IntervalNotifier> Drop for Subscription<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let entry: Arc<dyn SubEntry> = inner;
            SpaceShared::put(entry);
        }
    }
}

impl<T: IntervalNotifier + fmt::Debug> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Some(i) => f
                .debug_struct("Subscription")
                .field("interval", &i.interval)
                .field("ops", &i.ops)
                .finish(),
            None => f.write_str("Subscription(<consumed>)"),
        }
    }
}

/// A counted reference to a subscription's driver object and interval that
/// does not own the subscription (dropping it removes nothing).
pub struct SubscriptionRef<T: IntervalNotifier>(Arc<SubInner<T>>);

impl<T: IntervalNotifier> SubscriptionRef<T> {
    /// The sequence/range half.
    pub fn interval(&self) -> &Interval {
        &self.0.interval
    }
}

impl<T: IntervalNotifier> Clone for SubscriptionRef<T> {
    fn clone(&self) -> Self {
        SubscriptionRef(Arc::clone(&self.0))
    }
}

impl<T: IntervalNotifier> Deref for SubscriptionRef<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0.ops
    }
}
