//! Interval notifiers: the kernel's `mmu_interval_notifier` protocol
//! (`mm/mmu_notifier.c`), reimplemented for one process.
//!
//! A device driver mirrors CPU pages into device page tables. Whenever the
//! CPU side of a mirrored range changes (unmap, discard, remap, a CPU
//! write, a migration, teardown) the device copy must stop being used
//! *before* the change becomes visible, and a device fault that raced with
//! the change must not install what it saw. This module provides the
//! registry and the handshake; it knows nothing about devices.
//!
//! # Objects
//!
//! - [`AddressSpace`]: one per process view (the kernel's per-`mm`
//!   subscriptions). Holds the subscriptions in an augmented interval tree
//!   ([`interval_tree`]; overlaps allowed, overlap queries in
//!   O(log n + k) for clustered hits), one space-wide sequence number, the
//!   count of running invalidations, and a deferred list.
//! - [`Subscription`]: a driver's interest in `[start, end)`, owning the
//!   driver's [`IntervalNotifier`] callbacks. [`Interval`] is its
//!   sequence/range half, used on the fault path.
//! - [`SpaceNotifier`]: whole-space listeners (the kernel's
//!   `struct mmu_notifier`): start/end of every invalidation, `release` at
//!   teardown, and accessed-bit queries.
//!
//! # The sequence protocol, step by step
//!
//! The space sequence `S` is even while no invalidation walks the tree and
//! odd while at least one does. Each subscription keeps its own sequence
//! `s`: the `S` of the last invalidation whose callback reached it.
//!
//! **Invalidation** of `[a, b)` ([`AddressSpace::invalidate_start`], ended
//! by dropping the returned [`InvalidateGuard`]):
//!
//! 1. Under the state lock: `active += 1`; if any subscription overlaps,
//!    make `S` odd (if it was not already — concurrent invalidations share
//!    one odd value). From now on inserts and removals are deferred, so the
//!    tree can be walked without the state lock.
//! 2. For each overlapping subscription, call
//!    [`IntervalNotifier::invalidate`]`(interval, range, S)`. The callback
//!    takes its driver lock, calls [`Interval::set_seq`]`(S)`, zaps device
//!    PTEs and waits for device work that may hold them.
//! 3. Call every [`SpaceNotifier::invalidate_range_start`].
//! 4. The caller changes the CPU side (unmaps, discards, rewrites…).
//! 5. End (guard drop): every [`SpaceNotifier::invalidate_range_end`];
//!    then under the state lock `active -= 1`. The last one out makes `S`
//!    even again, applies the deferred inserts/removals, and wakes waiters;
//!    `release` callbacks owed by deferred `put`s run after the lock drops.
//!
//! **Device fault** on a subscription (see [`retry_loop`]):
//!
//! 1. `seq = interval.read_begin()`: if `s == S` an invalidation that
//!    already reached this subscription is running — wait for `S` to move.
//! 2. Snapshot the CPU pages (`range_fault`), copy them to the device.
//! 3. Take the driver lock. If [`Interval::read_retry`]`(seq)` — `s`
//!    changed, so an invalidation reached us after step 1 — drop everything
//!    and go to 1 ([`retry_loop`] bounds this, 1 s by default, like the
//!    kernel's `HMM_RANGE_DEFAULT_TIMEOUT`).
//! 4. Otherwise commit the device PTEs and drop the lock. Any invalidation
//!    that starts later will take the lock in its callback and zap them.
//!
//! Why it is enough: an invalidation either reached the subscription before
//! the fault's step-3 lock (then `s` changed and the fault retries) or it
//! reaches it after (then its callback, under the same lock, removes what
//! the fault committed). And a fault that began while a reaching
//! invalidation ran waits at step 1 until the CPU change is complete.
//! [`Interval::check_retry`] is the lock-free early-out hint.
//!
//! # Insert, remove, put
//!
//! - **Insert during an invalidation is deferred**, never retried (retrying
//!   livelocks under a stream of invalidations). It enters the tree when the
//!   last running invalidation ends, and its `s` is set to the running odd
//!   `S`, so its first `read_begin` waits for that end: the running walk
//!   never told it about its range.
//! - **[`Subscription::remove`] blocks** until no callback for it can run:
//!   idle, it leaves the tree at once; during an invalidation it is put on
//!   the deferred list and waits for `S` to move. From inside a callback of
//!   the same space that wait would be on itself, so it fails loudly with
//!   [`crate::NotifierError::RemoveInCallback`] and degrades to `put`.
//! - **`put` (and `drop`) never blocks**: the subscription leaves the tree
//!   when the last walker finishes, and its [`IntervalNotifier::release`]
//!   runs then. (Seed 003: a `remove` that does not wait invites
//!   use-after-free, so the non-waiting form gets another name.)
//!   `release` runs exactly once per subscription, whichever way it left.
//!
//! # Teardown
//!
//! [`AddressSpace::teardown`] (also run when the last `AddressSpace` handle
//! drops) sends every subscription a blockable [`EventKind::Release`]
//! invalidation of the whole space, then calls each
//! [`SpaceNotifier::release`] once, in O(1) per notifier and without
//! allocating (seed 000: nothing on the exit path may loop unboundedly or
//! allocate; `tests/teardown_alloc.rs` proves it with a counting
//! allocator). A notifier unregistered earlier got its `release` then.
//!
//! # Locks and why they cannot deadlock
//!
//! - `state` (mutex): sequence writes, active count, deferred list.
//! - `tree` (rwlock): read by walkers between steps 1 and 2; written only
//!   while `S` is even and `state` is held. A walker exists only while `S`
//!   is odd, so the write lock is never contended and a read never waits
//!   for a writer — which is why callbacks may insert, put, and start
//!   nested invalidations while the walk holds the read lock.
//! - `notifiers` (rwlock): the whole-space list; written only by
//!   register/unregister/teardown, none of which may run inside a
//!   notifier's own callback (unregister checks and refuses).
//! - Per-subscription membership (mutex): only ever taken under `state`.
//!
//! Callbacks never run under `state`. A blocking wait (`read_begin`,
//! `remove`) only waits for invalidations that other threads will end; the
//! one case where it would be our own is detected and refused.
//!
//! # Memory orderings
//!
//! Each atomic says why its ordering suffices where it is used. The
//! non-obvious one: `read_begin` reads the subscription's `s` with Acquire
//! (pairing with `set_seq`'s Release) and then `S` with Acquire (pairing
//! with the Release store of every `S` change), so a lock-free
//! `read_begin` that finds no running invalidation also sees every CPU
//! change made before the last one ended. The loom model
//! `fault_vs_invalidate_never_commits_a_stale_snapshot` (tests/loom.rs)
//! found the bug a Relaxed load of `S` would be.

mod event;
pub mod interval_tree;
mod reentrancy;
mod retry;
mod space;
mod subscription;

pub use event::{EventKind, NotifierRange, OwnerTag};
pub use retry::{retry_loop, Attempt, RetryError, DEFAULT_RETRY_TIMEOUT};
pub use space::{AddressSpace, InvalidateGuard, NotifierHandle, SpaceNotifier, SpaceStats};
pub use subscription::{Interval, IntervalNotifier, Seq, Subscription, SubscriptionRef};
