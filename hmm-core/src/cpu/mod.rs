//! The CPU side of the mirror: what is mapped, page-state snapshots, and
//! invalidation events learned from the kernel.

pub mod sys;
