//! The address space: subscription tree, space-wide sequence, active
//! invalidation count, deferred list and whole-space notifiers.

use core::fmt;
use core::time::Duration;

use super::event::{EventKind, NotifierRange};
use super::interval_tree::IntervalTree;
use super::reentrancy::{self, CallbackFrame};
use super::subscription::{
    Interval, IntervalNotifier, Membership, Seq, SubEntry, SubInner, Subscription,
};
use crate::addr::VaRange;
use crate::error::NotifierError;
use crate::sync::{
    lock, Arc, AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, MutexGuard, Ordering, RwLock,
    RwLockReadGuard, RwLockWriteGuard,
};

type Tree = IntervalTree<Arc<dyn SubEntry>>;

/// Whole-space notifier: hears about every invalidation of the space and
/// its teardown, and answers accessed-bit queries (the kernel's
/// `struct mmu_notifier`).
///
/// All methods have defaults, so a notifier implements only what it needs.
pub trait SpaceNotifier: Send + Sync + 'static {
    /// An invalidation of `range` starts (after the interval callbacks ran).
    /// In a non-blockable invalidation, return `false` if this would have to
    /// sleep; the invalidation then fails with
    /// [`NotifierError::WouldBlock`] and the notifiers whose start already
    /// succeeded get their [`SpaceNotifier::invalidate_range_end`].
    fn invalidate_range_start(&self, _range: &NotifierRange) -> bool {
        true
    }
    /// The invalidation of `range` ended.
    fn invalidate_range_end(&self, _range: &NotifierRange) {}
    /// The address space is going away ([`AddressSpace::teardown`], or the
    /// last [`AddressSpace`] handle dropped), or this notifier is being
    /// unregistered — whichever comes first; it runs exactly once.
    ///
    /// The registry calls it without allocating and without holding any of
    /// its locks except the notifier list's; it must not register or
    /// unregister notifiers of the same space.
    fn release(&self) {}
    /// Clears the device's accessed bits in `range`; returns whether any
    /// was set (the seed thread's `age_page`, named by what it returns).
    fn clear_young(&self, _range: VaRange) -> bool {
        false
    }
    /// Whether any device accessed bit in `range` is set (no clearing).
    fn test_young(&self, _range: VaRange) -> bool {
        false
    }
}

/// Counters of one address space. Monotonic; read with
/// [`AddressSpace::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// Invalidations started (including failed non-blockable ones).
    pub invalidations: u64,
    /// Invalidations that reached at least one subscription.
    pub invalidations_hit: u64,
    /// Interval callbacks run.
    pub callbacks: u64,
    /// Non-blockable invalidations that reported would-block.
    pub would_block: u64,
    /// Inserts deferred because an invalidation was running.
    pub deferred_inserts: u64,
    /// Removals deferred because an invalidation was running.
    pub deferred_removes: u64,
    /// Blockable invalidations whose callback returned `false`.
    pub contract_violations: u64,
    /// Subscriptions currently in the tree.
    pub subscriptions: u64,
}

#[derive(Default)]
struct Counters {
    invalidations: AtomicU64,
    invalidations_hit: AtomicU64,
    callbacks: AtomicU64,
    would_block: AtomicU64,
    deferred_inserts: AtomicU64,
    deferred_removes: AtomicU64,
    contract_violations: AtomicU64,
}

/// State guarded by [`SpaceShared::state`].
struct State {
    /// Invalidations between start and end, whether or not they hit.
    active: usize,
    /// Subscriptions whose insertion or removal waits for `active` to drop
    /// to zero. Their [`Membership`] says which.
    deferred: Vec<Arc<dyn SubEntry>>,
    /// `release` callbacks owed by the thread that applies the deferred
    /// list; capacity is reserved when a `put` is deferred, so applying
    /// never allocates.
    owed_releases: Vec<Arc<dyn SubEntry>>,
    /// Deferred `put`s waiting on the list; `owed_releases` has at least
    /// this much capacity.
    pending_puts: usize,
    torn_down: bool,
}

/// Shared part of an address space; every [`AddressSpace`] handle and every
/// subscription holds it.
pub(crate) struct SpaceShared {
    id: u64,
    /// The space-wide sequence. Even: no invalidation is walking the tree.
    /// Odd: at least one running invalidation overlapped a subscription.
    /// Only written while holding `state`; read anywhere.
    seq: AtomicU64,
    state: Mutex<State>,
    /// Waiters for `seq` to move on (read_begin, remove).
    wq: Condvar,
    /// The subscriptions. Walkers (invalidations whose start made or found
    /// `seq` odd) hold it for reading; it is written only while `seq` is
    /// even and `state` is held, when no walker can exist — so the write
    /// lock is never contended and readers never wait.
    tree: RwLock<Tree>,
    notifiers: RwLock<Vec<(u64, Arc<dyn SpaceNotifier>)>>,
    next_notifier: AtomicU64,
    /// Live [`AddressSpace`] handles; teardown runs when it drops to zero.
    handles: AtomicUsize,
    released: AtomicBool,
    counters: Counters,
}

static NEXT_SPACE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn count(c: &AtomicU64) {
    // Relaxed: a statistics counter; nothing is published through it.
    c.fetch_add(1, Ordering::Relaxed);
}

impl SpaceShared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn tree_read(&self) -> RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|e| e.into_inner())
    }

    fn tree_write(&self) -> RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|e| e.into_inner())
    }

    fn seq_now(&self) -> u64 {
        // Acquire, pairing with the Release in `set_seq`: a fault whose
        // read_begin takes the lock-free path and sees the even sequence an
        // ending invalidation stored must also see every CPU-side change
        // made before that end, or its snapshot could predate them while
        // read_retry later finds nothing to object to. (The kernel gets
        // this from the spinlock its read_begin takes. Loom found the
        // Relaxed version of this load committing a stale page.)
        self.seq.load(Ordering::Acquire)
    }

    fn set_seq(&self, _held: &MutexGuard<'_, State>, v: u64) {
        // Release: publishes what happened before an invalidation's end to
        // lock-free readers (see `seq_now`). Writers are serialised by
        // `state`.
        self.seq.store(v, Ordering::Release);
    }

    /// Waits while `sub_seq` equals the running invalidation's sequence.
    /// Returns false on timeout.
    pub(crate) fn read_begin_wait(&self, sub_seq: u64, timeout: Option<Duration>) -> bool {
        // Fast path, no lock: the subscription's sequence differs from the
        // space's, so no invalidation that reached it is running. (See
        // Interval::read_begin for why this load cannot be too old.)
        if sub_seq != self.seq_now() {
            return true;
        }
        let mut st = self.state();
        let deadline = timeout.map(|t| (std::time::Instant::now(), t));
        while self.seq_now() == sub_seq {
            st = match deadline {
                None => self.wq.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some((t0, t)) => {
                    let left = t.saturating_sub(t0.elapsed());
                    if left.is_zero() {
                        return false;
                    }
                    self.wq
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        drop(st);
        true
    }

    /// Step 1 of an invalidation. Returns the sequence callbacks must record
    /// and, if any subscription overlaps, the tree to walk.
    fn start_walk(&self, range: VaRange) -> (u64, Option<RwLockReadGuard<'_, Tree>>) {
        let mut st = self.state();
        st.active += 1;
        let tree = self.tree_read();
        let hit = tree.any_overlap(range.start().get(), range.end().get());
        let mut cur = self.seq_now();
        if hit && cur & 1 == 0 {
            cur |= 1;
            self.set_seq(&st, cur);
        }
        drop(st);
        (cur, hit.then_some(tree))
    }

    /// Last step of an invalidation (also run when a non-blockable one
    /// fails): drops the active count; the last one out makes the sequence
    /// even, applies the deferred list and wakes the waiters.
    fn end_walk(&self) {
        let mut st = self.state();
        st.active -= 1;
        let cur = self.seq_now();
        if st.active > 0 || cur & 1 == 0 {
            return;
        }
        self.set_seq(&st, cur.wrapping_add(1));
        let mut owed = Vec::new();
        if !st.deferred.is_empty() {
            let mut tree = self.tree_write();
            let st = &mut *st;
            for entry in st.deferred.drain(..) {
                let itv = entry.interval();
                let mut m = lock(&itv.membership);
                match *m {
                    Membership::PendingInsert => {
                        let r = itv.range();
                        let id = tree.insert(r.start().get(), r.end().get(), Arc::clone(&entry));
                        *m = Membership::InTree(id);
                    }
                    Membership::PendingRemove { id, ender_releases } => {
                        tree.remove(id);
                        *m = Membership::Removed;
                        if ender_releases {
                            // Capacity was reserved by `put`: no allocation.
                            st.owed_releases.push(Arc::clone(&entry));
                        }
                    }
                    // Removed while still pending: nothing to apply.
                    Membership::Removed | Membership::InTree(_) => {}
                }
            }
            owed = core::mem::take(&mut st.owed_releases);
            st.pending_puts = 0;
        }
        drop(st);
        self.wq.notify_all();
        for e in owed.drain(..) {
            e.release();
        }
    }

    fn insert_entry(
        self: &Arc<Self>,
        make: impl FnOnce(u64, Membership) -> Arc<dyn SubEntry>,
    ) -> Result<Arc<dyn SubEntry>, NotifierError> {
        let mut st = self.state();
        if st.torn_down {
            return Err(NotifierError::TornDown);
        }
        let mut cur = self.seq_now();
        if cur & 1 == 0 && st.active > 0 {
            // An invalidation is running that hit nothing when it started
            // (so it left the sequence even): it cannot tell the new
            // subscription about its range either. Make the sequence odd,
            // so the insertion is deferred like any other and the first
            // read_begin waits for the end; the last `end_walk` makes it
            // even again. Without this a fault that registers its region
            // during an unmap of that very range commits the old page
            // (`tests/loom_mirror.rs`, remap_racing_first_fault_registration).
            cur |= 1;
            self.set_seq(&st, cur);
        }
        if cur & 1 == 1 {
            // An invalidation is walking the tree: defer. Recording the
            // running sequence makes the first read_begin wait for its end,
            // because the walk cannot have told this subscription about the
            // range it is invalidating.
            let e = make(cur, Membership::PendingInsert);
            st.deferred.push(Arc::clone(&e));
            count(&self.counters.deferred_inserts);
            Ok(e)
        } else {
            // Idle: insert now with an old odd sequence, which no running
            // invalidation can carry.
            let e = make(cur.wrapping_sub(1), Membership::Removed);
            let r = e.interval().range();
            let id = self
                .tree_write()
                .insert(r.start().get(), r.end().get(), Arc::clone(&e));
            *lock(&e.interval().membership) = Membership::InTree(id);
            Ok(e)
        }
    }

    pub(crate) fn put(entry: Arc<dyn SubEntry>) {
        let space = Arc::clone(&entry.interval().space);
        let mut st = space.state();
        let mut m = lock(&entry.interval().membership);
        let release_now = match *m {
            Membership::PendingInsert => {
                *m = Membership::Removed;
                true
            }
            Membership::InTree(id) => {
                if space.seq_now() & 1 == 1 {
                    *m = Membership::PendingRemove {
                        id,
                        ender_releases: true,
                    };
                    drop(m);
                    st.pending_puts += 1;
                    let want = st.pending_puts;
                    // `owed_releases` is empty between applies, so this makes room for
                    // every pending put.
                    st.owed_releases.reserve(want);
                    st.deferred.push(Arc::clone(&entry));
                    count(&space.counters.deferred_removes);
                    false
                } else {
                    drop(m);
                    space.tree_write().remove(id);
                    *lock(&entry.interval().membership) = Membership::Removed;
                    true
                }
            }
            Membership::PendingRemove { .. } | Membership::Removed => false,
        };
        drop(st);
        if release_now {
            entry.release();
        }
    }

    pub(crate) fn remove(entry: Arc<dyn SubEntry>) -> Result<(), NotifierError> {
        let space = Arc::clone(&entry.interval().space);
        if reentrancy::inside(space.id) {
            Self::put(entry);
            return Err(NotifierError::RemoveInCallback);
        }
        let mut st = space.state();
        let mut m = lock(&entry.interval().membership);
        let wait_for = match *m {
            Membership::PendingInsert => {
                *m = Membership::Removed;
                None
            }
            Membership::InTree(id) => {
                let cur = space.seq_now();
                if cur & 1 == 1 {
                    *m = Membership::PendingRemove {
                        id,
                        ender_releases: false,
                    };
                    st.deferred.push(Arc::clone(&entry));
                    count(&space.counters.deferred_removes);
                    Some(cur)
                } else {
                    drop(m);
                    space.tree_write().remove(id);
                    m = lock(&entry.interval().membership);
                    *m = Membership::Removed;
                    None
                }
            }
            // Unreachable through the public API (a handle is consumed by
            // its first removal); nothing to do.
            Membership::PendingRemove { .. } | Membership::Removed => return Ok(()),
        };
        drop(m);
        if let Some(s) = wait_for {
            // The invalidation that made `s` odd must end; its ender applies
            // our removal before making the sequence even.
            while space.seq_now() == s {
                st = space.wq.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        drop(st);
        entry.release();
        Ok(())
    }

    fn tree_len(&self) -> usize {
        let _st = self.state();
        self.tree_read().len()
    }

    /// Calls `f` on each whole-space notifier under the list's read lock.
    fn each_notifier(&self, mut f: impl FnMut(&dyn SpaceNotifier) -> bool) -> Option<usize> {
        let list = self.notifiers.read().unwrap_or_else(|e| e.into_inner());
        for (i, (_, n)) in list.iter().enumerate() {
            if !f(&**n) {
                return Some(i);
            }
        }
        None
    }
}

/// A process address space's notifier registry (the kernel's
/// `mmu_notifier_subscriptions`, one per `mm`).
///
/// Cheap to clone; clones are handles to the same space. When the last
/// handle is dropped the space is torn down ([`AddressSpace::teardown`]).
pub struct AddressSpace {
    shared: Arc<SpaceShared>,
}

impl fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressSpace")
            .field("id", &self.shared.id)
            .field("seq", &self.shared.seq_now())
            .finish()
    }
}

impl Default for AddressSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for AddressSpace {
    fn clone(&self) -> Self {
        // Relaxed: a plain count of handles; the Arc clone beside it is what
        // keeps memory alive.
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        AddressSpace {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        // AcqRel: the last handle's teardown must see everything the other
        // handles did before they dropped (as Arc's own drop does).
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.teardown();
        }
    }
}

/// Pairs an invalidation's start with its end. Dropping it ends the
/// invalidation (the last one out re-opens the tree and wakes waiters).
#[must_use = "dropping the guard ends the invalidation at once"]
pub struct InvalidateGuard<'a> {
    space: &'a SpaceShared,
    range: NotifierRange,
    /// Whole-space notifiers whose start succeeded (all of them once the
    /// guard is handed out).
    ended: bool,
}

impl InvalidateGuard<'_> {
    /// The invalidation this guard belongs to.
    pub fn range(&self) -> &NotifierRange {
        &self.range
    }
}

impl Drop for InvalidateGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.ended = true;
            let r = self.range;
            let _frame = CallbackFrame::enter(self.space.id);
            self.space.each_notifier(|n| {
                n.invalidate_range_end(&r);
                true
            });
            self.space.end_walk();
        }
    }
}

/// Ends a walk if the invalidation unwinds (a callback panicked) or fails
/// before the guard exists.
struct WalkEnd<'a>(&'a SpaceShared, bool);

impl Drop for WalkEnd<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.end_walk();
        }
    }
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new() -> Self {
        AddressSpace {
            shared: Arc::new(SpaceShared {
                // Relaxed: a unique-id dispenser.
                id: NEXT_SPACE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                // The kernel starts at 2 too: even, and `2 - 1` is a valid
                // "old" odd value for the first inserts.
                seq: AtomicU64::new(2),
                state: Mutex::new(State {
                    active: 0,
                    deferred: Vec::new(),
                    owed_releases: Vec::new(),
                    pending_puts: 0,
                    torn_down: false,
                }),
                wq: Condvar::new(),
                tree: RwLock::new(IntervalTree::new()),
                notifiers: RwLock::new(Vec::new()),
                next_notifier: AtomicU64::new(1),
                handles: AtomicUsize::new(1),
                released: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        }
    }

    /// Subscribes `ops` to invalidations of `range`.
    ///
    /// During a running invalidation the insertion is deferred until the
    /// last running invalidation ends, and the subscription's first
    /// [`Interval::read_begin`] waits for that (the kernel's rule: never
    /// retry an insert, that livelocks). Errors:
    /// [`NotifierError::TornDown`] after teardown.
    pub fn insert<T: IntervalNotifier>(
        &self,
        range: VaRange,
        ops: T,
    ) -> Result<Subscription<T>, NotifierError> {
        let mut made: Option<Arc<SubInner<T>>> = None;
        let space = Arc::clone(&self.shared);
        self.shared.insert_entry(|seq, m| {
            let inner = Arc::new(SubInner {
                interval: Interval::new(range, seq, m, space),
                ops,
            });
            made = Some(Arc::clone(&inner));
            inner
        })?;
        Ok(Subscription { inner: made })
    }

    /// Starts an invalidation: makes the space sequence odd if any
    /// subscription overlaps, runs every overlapping subscription's
    /// callback, then every whole-space notifier's `invalidate_range_start`.
    /// The returned guard ends it when dropped.
    ///
    /// A non-blockable invalidation whose callback returns `false` reports
    /// [`NotifierError::WouldBlock`]; it has then been ended already and no
    /// `invalidate_range_end` runs for the notifiers that did not start.
    pub fn invalidate_start(
        &self,
        range: NotifierRange,
    ) -> Result<InvalidateGuard<'_>, NotifierError> {
        let sh = &*self.shared;
        count(&sh.counters.invalidations);
        let (cur, tree) = sh.start_walk(range.range);
        let mut walk_end = WalkEnd(sh, true);
        if let Some(tree) = tree {
            count(&sh.counters.invalidations_hit);
            let _frame = CallbackFrame::enter(sh.id);
            let mut panicked = None;
            for (_, _, _, sub) in
                tree.overlapping(range.range.start().get(), range.range.end().get())
            {
                count(&sh.counters.callbacks);
                // A panicking callback must not keep the others from being
                // told (their devices would keep stale copies): finish the
                // walk, then re-raise the first panic; `walk_end` ends the
                // walk as it unwinds.
                let call = std::panic::AssertUnwindSafe(|| sub.invalidate(&range, Seq(cur)));
                let ok = match std::panic::catch_unwind(call) {
                    Ok(ok) => ok,
                    Err(p) => {
                        panicked.get_or_insert(p);
                        true
                    }
                };
                if !ok {
                    if range.blockable {
                        count(&sh.counters.contract_violations);
                        continue;
                    }
                    count(&sh.counters.would_block);
                    // `tree` and `_frame` drop before `walk_end` ends the walk.
                    return Err(NotifierError::WouldBlock { range: range.range });
                }
            }
            if let Some(p) = panicked {
                drop(tree);
                std::panic::resume_unwind(p);
            }
        }
        let failed_at = {
            let _frame = CallbackFrame::enter(sh.id);
            sh.each_notifier(|n| n.invalidate_range_start(&range) || range.blockable)
        };
        if let Some(k) = failed_at {
            // Back out the notifiers whose start succeeded.
            let mut i = 0;
            sh.each_notifier(|n| {
                if i < k {
                    n.invalidate_range_end(&range);
                }
                i += 1;
                true
            });
            count(&sh.counters.would_block);
            return Err(NotifierError::WouldBlock { range: range.range });
        }
        walk_end.1 = false;
        Ok(InvalidateGuard {
            space: sh,
            range,
            ended: false,
        })
    }

    /// A whole blockable invalidation, start to end: when it returns, every
    /// overlapping subscription's callback has returned. For allocators and
    /// apps that know a range changed (exact and synchronous).
    pub fn invalidate(&self, range: VaRange, event: EventKind) {
        // Blockable invalidations cannot fail.
        if let Ok(g) = self.invalidate_start(NotifierRange::new(range, event)) {
            drop(g);
        }
    }

    /// Registers a whole-space notifier. Errors:
    /// [`NotifierError::TornDown`] after teardown.
    pub fn register_notifier(
        &self,
        n: Arc<dyn SpaceNotifier>,
    ) -> Result<NotifierHandle, NotifierError> {
        let sh = &self.shared;
        let st = sh.state();
        if st.torn_down {
            return Err(NotifierError::TornDown);
        }
        // Relaxed: an id dispenser, serialised by `state` anyway.
        let id = sh.next_notifier.fetch_add(1, Ordering::Relaxed);
        sh.notifiers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, n));
        drop(st);
        Ok(NotifierHandle {
            space: Arc::clone(sh),
            id,
        })
    }

    /// OR of every whole-space notifier's [`SpaceNotifier::clear_young`]
    /// (all are called: each must clear its bits).
    pub fn clear_young(&self, range: VaRange) -> bool {
        let mut young = false;
        self.shared.each_notifier(|n| {
            young |= n.clear_young(range);
            true
        });
        young
    }

    /// OR of every whole-space notifier's [`SpaceNotifier::test_young`];
    /// stops at the first `true`.
    pub fn test_young(&self, range: VaRange) -> bool {
        self.shared
            .each_notifier(|n| !n.test_young(range))
            .is_some()
    }

    /// Tears the space down, as process exit does: every subscription gets
    /// a blockable [`EventKind::Release`] invalidation of the whole space,
    /// then every whole-space notifier's [`SpaceNotifier::release`] runs,
    /// once each, in O(1) per notifier and without allocating.
    /// Afterwards inserts and registrations fail with
    /// [`NotifierError::TornDown`]; existing subscriptions can still be
    /// removed or put. Idempotent.
    ///
    /// A callback or `release` that panics does not stop the others: every
    /// one still runs, then the first panic is re-raised.
    pub fn teardown(&self) {
        let sh = &*self.shared;
        {
            let mut st = sh.state();
            if st.torn_down {
                return;
            }
            st.torn_down = true;
        }
        // A panicking callback or `release` must not keep the others from
        // running (nothing may be lost at teardown): catch each, re-raise
        // the first at the end. `catch_unwind` allocates nothing unless a
        // panic happens.
        let mut panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.invalidate(VaRange::everything(), EventKind::Release)
        }))
        .err();
        let mut list = sh.notifiers.write().unwrap_or_else(|e| e.into_inner());
        // Swap the list out rather than iterating in place so a notifier
        // dropped by a release cannot observe a half-drained list; taking a
        // Vec leaves an empty one behind and allocates nothing.
        let taken = core::mem::take(&mut *list);
        drop(list);
        // Relaxed: informational flag, written once, after the list was
        // emptied under its lock.
        sh.released.store(true, Ordering::Relaxed);
        for (_, n) in &taken {
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| n.release())) {
                panicked.get_or_insert(p);
            }
        }
        drop(taken);
        if let Some(p) = panicked {
            std::panic::resume_unwind(p);
        }
    }

    /// Whether [`AddressSpace::teardown`] has run.
    pub fn is_torn_down(&self) -> bool {
        self.shared.state().torn_down
    }

    /// A snapshot of the space's counters.
    pub fn stats(&self) -> SpaceStats {
        let c = &self.shared.counters;
        // Relaxed: statistics.
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SpaceStats {
            invalidations: r(&c.invalidations),
            invalidations_hit: r(&c.invalidations_hit),
            callbacks: r(&c.callbacks),
            would_block: r(&c.would_block),
            deferred_inserts: r(&c.deferred_inserts),
            deferred_removes: r(&c.deferred_removes),
            contract_violations: r(&c.contract_violations),
            subscriptions: self.shared.tree_len() as u64,
        }
    }

    /// The current space-wide sequence (odd while an invalidation walks).
    /// For tests and diagnostics.
    pub fn current_seq(&self) -> u64 {
        self.shared.seq_now()
    }

    /// Subscribed ranges, in start order. For tests and diagnostics.
    pub fn subscribed_ranges(&self) -> Vec<VaRange> {
        let _st = self.shared.state();
        self.shared
            .tree_read()
            .iter()
            .map(|(_, _, _, e)| e.interval().range())
            .collect()
    }
}

/// A registered whole-space notifier. Dropping the handle leaves the
/// notifier registered until teardown; [`NotifierHandle::unregister`]
/// removes it early.
pub struct NotifierHandle {
    space: Arc<SpaceShared>,
    id: u64,
}

impl fmt::Debug for NotifierHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifierHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl NotifierHandle {
    /// Removes the notifier; returns once none of its callbacks is running.
    /// Its [`SpaceNotifier::release`] runs now unless teardown already ran
    /// it (the kernel's rule: release runs exactly once). Errors:
    /// [`NotifierError::RemoveInCallback`] from inside a callback of the
    /// same space (the notifier stays registered).
    pub fn unregister(self) -> Result<(), NotifierError> {
        if reentrancy::inside(self.space.id) {
            return Err(NotifierError::RemoveInCallback);
        }
        let mut list = self
            .space
            .notifiers
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let pos = list.iter().position(|(id, _)| *id == self.id);
        let n = pos.map(|p| list.remove(p).1);
        drop(list);
        if let Some(n) = n {
            n.release();
        }
        Ok(())
    }
}
