//! The CPU side of the mirror: what is mapped, page-state snapshots, and
//! invalidation events learned from the kernel.

pub mod monitor;
pub mod probe;
pub mod sys;
pub mod uffd;
pub mod write_track;
