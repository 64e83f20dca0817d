//! The device side: a device's mirror of an address space.

pub mod backend;
pub mod conformance;
mod core;
pub mod error;
pub mod faults;
pub mod format;
mod hostcopy;
pub mod pagetable;
pub mod pool;
pub mod stats;

pub use self::core::{Advice, LaunchReport, Mirror, MirrorConfig, PinHandle};
pub use error::{AccessError, MirrorError};
pub use stats::MirrorStats;
