//! Interval notifiers: the kernel's `mmu_interval_notifier` protocol for
//! one process (PROTOCOL DOCS TO COME).

mod event;
pub mod interval_tree;
mod reentrancy;
mod retry;
mod space;
mod subscription;

pub use event::{EventKind, NotifierRange, OwnerTag};
pub use space::{AddressSpace, InvalidateGuard, NotifierHandle, SpaceNotifier, SpaceStats};
pub use retry::{retry_loop, Attempt, RetryError, DEFAULT_RETRY_TIMEOUT};
pub use subscription::{Interval, IntervalNotifier, Seq, Subscription, SubscriptionRef};
