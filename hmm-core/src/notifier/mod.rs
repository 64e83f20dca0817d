//! Interval notifiers (placeholder while the protocol lands).

pub mod interval_tree;
