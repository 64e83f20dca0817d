//! The CPU side of the mirror: what is mapped, page-state snapshots, and
//! invalidation events learned from the kernel.

pub mod chunk;
pub mod maps;
pub mod mirror_fault;
pub mod pagemap;
pub mod range_fault;
pub mod sys;
