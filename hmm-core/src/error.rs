//! Typed errors. Every misuse of a public API ends in one of these; none
//! panics.

use thiserror::Error;

/// A range argument was unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RangeError {
    /// `start >= end`, or a zero length.
    #[error("empty range [{start:#x}, {end:#x})")]
    Empty {
        /// First address given.
        start: u64,
        /// End given.
        end: u64,
    },
    /// `start + len` overflows 64 bits.
    #[error("range at {start:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// First address given.
        start: u64,
        /// Length given.
        len: u64,
    },
    /// A page-granular operation got an unaligned range.
    #[error("range [{start:#x}, {end:#x}) is not page aligned")]
    Unaligned {
        /// First address given.
        start: u64,
        /// End given.
        end: u64,
    },
    /// The range reaches into the kernel half of the address space.
    #[error("range [{start:#x}, {end:#x}) reaches into the kernel half")]
    KernelHalf {
        /// First address given.
        start: u64,
        /// End given.
        end: u64,
    },
}

/// Errors of the interval-notifier registry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NotifierError {
    /// The address space was torn down ([`crate::notifier::AddressSpace::teardown`]);
    /// no new subscription or whole-space notifier can be added.
    #[error("the address space has been torn down")]
    TornDown,
    /// A blocking removal was asked for from inside an invalidate callback
    /// of the same address space, where waiting would deadlock. The
    /// subscription was turned into a deferred `put` instead: it leaves the
    /// tree when the running invalidation ends, and its `release` runs then.
    #[error("remove() called from inside an invalidate callback; demoted to put()")]
    RemoveInCallback,
    /// A non-blockable invalidation met a callback that would have had to
    /// sleep. Nothing was ended; the caller must retry in a blockable context.
    #[error("a non-blockable invalidation of {range:?} would have to block")]
    WouldBlock {
        /// The range that was being invalidated.
        range: crate::addr::VaRange,
    },
    /// A bounded retry loop ran out of time (the kernel's default is 1 s).
    #[error("gave up after {attempts} attempts in {elapsed:?}: the range kept being invalidated")]
    RetryTimeout {
        /// How many times the body ran.
        attempts: u64,
        /// How long the loop ran.
        elapsed: core::time::Duration,
    },
}
