//! `range_fault` under the notifier's sequence: the full
//! `hmm_range_fault` protocol a device fault handler runs.
//!
//! The kernel's `hmm_range_fault` returns `-EBUSY` when the notifier
//! sequence moved during the walk, and its callers loop (bounded by
//! `HMM_RANGE_DEFAULT_TIMEOUT`). Here:
//!
//! - [`range_fault_checked`] is one snapshot of `range` taken after
//!   `read_begin` returned `seq`: it reports [`MirrorFaultError::Busy`] if an
//!   invalidation reached the subscription meanwhile (the lock-free
//!   [`Interval::check_retry`] hint: a cheap early-out, not the final word).
//! - [`fault_and_commit`] is the whole loop: `read_begin` → snapshot →
//!   caller's `commit(seq, pages)`, which must take the driver lock, return
//!   [`Attempt::Retry`] if [`Interval::read_retry`] says so, and otherwise
//!   install device PTEs. Busy snapshots and refused commits start over,
//!   until the timeout.
//!
//! Error pages (`PROT_NONE`, holes, writes to read-only memory) end the loop
//! at once with the typed [`FaultError`]: retrying cannot fix them.

use core::time::Duration;
use std::time::Instant;

use super::range_fault::{FaultError, FaultFlags, PageState, RangeFaulter};
use crate::addr::VaRange;
use crate::notifier::{Attempt, Interval, Seq};

/// Failure of a sequence-checked fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorFaultError<E> {
    /// The snapshot itself failed (bad address, protection, …).
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// An invalidation reached the subscription during the snapshot; the
    /// caller must begin again (the kernel's `-EBUSY`).
    #[error("the range was invalidated during the snapshot")]
    Busy,
    /// The bounded retry loop ran out of time.
    #[error("gave up after {attempts} attempts in {elapsed:?}: the range kept being invalidated")]
    Timeout {
        /// Snapshots taken.
        attempts: u64,
        /// Time spent.
        elapsed: Duration,
    },
    /// The caller's commit failed.
    #[error("commit failed: {0}")]
    Commit(E),
}

/// One snapshot of `range` (which must lie inside `interval`'s range) for a
/// fault that began with `seq`. [`MirrorFaultError::Busy`] if the sequence
/// moved meanwhile.
pub fn range_fault_checked(
    faulter: &RangeFaulter,
    interval: &Interval,
    seq: Seq,
    range: VaRange,
    flags: FaultFlags,
    out: &mut Vec<PageState>,
) -> Result<(), MirrorFaultError<core::convert::Infallible>> {
    out.clear();
    faulter.range_fault_into(range, flags, out)?;
    if interval.check_retry(seq) {
        return Err(MirrorFaultError::Busy);
    }
    Ok(())
}

/// Outcome counters of [`fault_and_commit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultLoopStats {
    /// Snapshots taken.
    pub attempts: u64,
    /// Snapshots discarded because the sequence moved before the commit.
    pub busy: u64,
    /// Commits that found the sequence moved under the driver lock.
    pub refused: u64,
}

/// The whole bounded fault loop: `read_begin` → `range_fault` → `commit`.
///
/// `commit(seq, pages)` runs after a snapshot the hint found clean; it must
/// take the driver lock, return [`Attempt::Retry`] if
/// `interval.read_retry(seq)`, else install device PTEs for `pages` and
/// return [`Attempt::Done`]. At least one attempt is made; after `timeout`
/// the loop gives up with [`MirrorFaultError::Timeout`].
pub fn fault_and_commit<R, E>(
    faulter: &RangeFaulter,
    interval: &Interval,
    range: VaRange,
    flags: FaultFlags,
    timeout: Duration,
    stats: &mut FaultLoopStats,
    commit: impl FnMut(Seq, &[PageState]) -> Result<Attempt<R>, E>,
) -> Result<R, MirrorFaultError<E>> {
    fault_and_commit_with(
        |r, f, out| faulter.range_fault_into(r, f, out),
        interval,
        range,
        flags,
        timeout,
        stats,
        commit,
    )
}

/// [`fault_and_commit`] with the snapshot taken by `snapshot(range, flags,
/// out)` instead of a [`RangeFaulter`] (the mirror's
/// [`HostSide`](crate::mirror::HostSide), or a fake under loom).
pub fn fault_and_commit_with<R, E>(
    mut snapshot: impl FnMut(VaRange, FaultFlags, &mut Vec<PageState>) -> Result<(), FaultError>,
    interval: &Interval,
    range: VaRange,
    flags: FaultFlags,
    timeout: Duration,
    stats: &mut FaultLoopStats,
    mut commit: impl FnMut(Seq, &[PageState]) -> Result<Attempt<R>, E>,
) -> Result<R, MirrorFaultError<E>> {
    let t0 = Instant::now();
    let mut pages = Vec::new();
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        let seq = interval
            .read_begin_timeout(left)
            .map_err(|_| MirrorFaultError::Timeout {
                attempts: stats.attempts,
                elapsed: t0.elapsed(),
            })?;
        stats.attempts += 1;
        pages.clear();
        let snap: Result<(), MirrorFaultError<core::convert::Infallible>> =
            match snapshot(range, flags, &mut pages) {
                Err(e) => Err(MirrorFaultError::Fault(e)),
                Ok(()) if interval.check_retry(seq) => Err(MirrorFaultError::Busy),
                Ok(()) => Ok(()),
            };
        match snap {
            Ok(()) => match commit(seq, &pages).map_err(MirrorFaultError::Commit)? {
                Attempt::Done(r) => return Ok(r),
                Attempt::Retry => stats.refused += 1,
            },
            Err(MirrorFaultError::Busy) => stats.busy += 1,
            Err(MirrorFaultError::Fault(e)) => return Err(MirrorFaultError::Fault(e)),
            Err(MirrorFaultError::Timeout { attempts, elapsed }) => {
                return Err(MirrorFaultError::Timeout { attempts, elapsed })
            }
            Err(MirrorFaultError::Commit(never)) => match never {},
        }
        if t0.elapsed() >= timeout {
            return Err(MirrorFaultError::Timeout {
                attempts: stats.attempts,
                elapsed: t0.elapsed(),
            });
        }
    }
}
