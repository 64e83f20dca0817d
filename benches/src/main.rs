//! `hmm-bench`: the project's main binary (placeholder).
fn main() {}
