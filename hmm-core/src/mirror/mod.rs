//! The device side: a device's mirror of an address space.

pub mod backend;
pub mod format;
pub mod pagetable;
pub mod pool;
