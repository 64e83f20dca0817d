//! Host memory per launch is bounded by the launch size, not by how many
//! invocations fault (issue #19, finding 7: the replay list cost 4 bytes
//! per replayed invocation, several times over). A counting global
//! allocator tracks the live heap bytes and their peak; this file holds a
//! single test so no other test's allocations are counted.

#![allow(missing_docs)]

use hmm_conformance::heap::{launch_heap_is_bounded, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn launch_memory_does_not_grow_with_faulting_invocations() {
    let Some(d) = hmm_driver_wgpu::test_device() else {
        return;
    };
    launch_heap_is_bounded(d, 1 << 22, 8 << 20);
}
