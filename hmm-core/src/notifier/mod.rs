//! Interval notifiers (the protocol lands here; see the issue).

mod event;
pub mod interval_tree;

pub use event::{EventKind, NotifierRange, OwnerTag};
