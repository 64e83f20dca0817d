//! The bounded fault-retry loop.
//!
//! A device fault handler runs `read_begin → snapshot → lock →
//! read_retry → commit` until `read_retry` says the snapshot is still
//! good. Under a storm of invalidations that loop could spin forever; the
//! kernel bounds it (`HMM_RANGE_DEFAULT_TIMEOUT`, 1 s) and so does
//! [`retry_loop`].

use core::time::Duration;
use std::time::Instant;

use super::subscription::{Interval, Seq};
use crate::error::NotifierError;

/// The kernel's default bound on a fault's retry loop.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(1);

/// What one pass of a [`retry_loop`] body decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt<R> {
    /// Committed (under the driver lock, after `read_retry` said no).
    Done(R),
    /// The sequence moved (or the snapshot reported busy): start over.
    Retry,
}

/// Failure of a [`retry_loop`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError<E> {
    /// Timed out ([`NotifierError::RetryTimeout`]).
    #[error(transparent)]
    Notifier(#[from] NotifierError),
    /// The body failed for a reason of its own (a bad address, say).
    #[error("{0}")]
    Body(E),
}

/// Runs `body` with a fresh [`Interval::read_begin`] sequence until it
/// returns [`Attempt::Done`], an error, or `timeout` has passed (at least
/// one attempt is always made).
///
/// The body is expected to: snapshot the CPU pages, take the driver lock,
/// return [`Attempt::Retry`] if [`Interval::read_retry`] says so, otherwise
/// commit and return [`Attempt::Done`].
pub fn retry_loop<R, E>(
    interval: &Interval,
    timeout: Duration,
    mut body: impl FnMut(Seq) -> Result<Attempt<R>, E>,
) -> Result<R, RetryError<E>> {
    let t0 = Instant::now();
    let mut attempts = 0u64;
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        let seq = interval
            .read_begin_timeout(left)
            .map_err(|_| NotifierError::RetryTimeout {
                attempts,
                elapsed: t0.elapsed(),
            })?;
        attempts += 1;
        match body(seq).map_err(RetryError::Body)? {
            Attempt::Done(r) => return Ok(r),
            Attempt::Retry => {
                if t0.elapsed() >= timeout {
                    return Err(NotifierError::RetryTimeout {
                        attempts,
                        elapsed: t0.elapsed(),
                    }
                    .into());
                }
            }
        }
    }
}
