//! The conformance suite every backend runs, including the port of the
//! Linux kernel's HMM selftests (`tools/testing/selftests/mm/hmm-tests.c`,
//! run there against the `dmirror` test device of `lib/test_hmm.c`).
//!
//! A driver implements [`TestKernels`] (a handful of tiny kernels in its
//! own kernel language) and instantiates the suite in one line:
//!
//! ```text
//! hmm_conformance::conformance_tests!(hmm_driver_cpu::CpuDevice::new());
//! ```
//!
//! which expands to one `#[test]` per scenario, named after the kernel
//! test it ports (`anon_read`, `anon_write_prot`, …). This is test code —
//! it asserts and panics, forks and maps memory — and no part of
//! `hmm-core`'s API. A driver depends on it for [`TestKernels`] (its
//! implementation of the suite's kernels, which benchmarks and stress
//! tests reuse too) and instantiates the suite in its tests.
//!
//! The scenarios are also public functions, one per test, generic over
//! the backend, for a harness that runs a few by hand
//! (`examples/custom_backend.rs`). By theme:
//!
//! - the port of the kernel's selftests (`open_close` … `double_map`);
//! - the mirror beyond them: eviction and the pool, pointer chasing, the
//!   pinning baseline, teardown, concurrency, accessed bits, prefetch,
//!   read-mostly duplication;
//! - bad inputs (`docs/BAD_INPUTS.md`): every misuse involving a mirror is
//!   a typed error;
//! - writers write tracking cannot see (`foreign_*`): shared memory written
//!   by a forked child, files and memfds written with `pwrite()`, private
//!   file pages following their file; and the `Trust` opt-out;
//! - zero-copy devices (`zero_copy_*`).
//!
//! # What carries over from the kernel tests, and what does not
//!
//! `dmirror` reads and writes through ioctls that fault pages into the
//! device; here the same accesses come from device kernels whose faults the
//! mirror services, and the kernel's `cpages`/`faults` counters become the
//! mirror's `pages_in`/`fault_batches`. `mixedmap` maps the dmirror device
//! file itself (`VM_MIXEDMAP`); no such file exists in userspace, so the
//! port reads one kernel launch across mappings of different kinds (private
//! anonymous, shared file, read-only) instead. The fork tests check that
//! the child, which has no mirror (documented), cannot disturb the parent's
//! device view. The `migrate*` tests are ported (`migration`: the device
//! holds the only copy, and a CPU touch brings it back) except the huge-page
//! ones; `exclusive*` are not (exclusive access is not built).

use hmm_core::mirror::backend::{Backend, BackendError};

mod bad_inputs;
mod exclusive;
mod foreign;
pub mod heap;
mod migration;
mod migration_huge;
mod mirroring;
pub mod quiet;
mod selftests;
pub mod skip;
mod support;
mod thp;
mod zero_copy;

pub use bad_inputs::{
    bad_ranges_are_typed_errors, device_faults_name_the_kernels_address,
    forked_child_gets_a_typed_error, freed_memory_is_an_unmapped_fault,
    kernel_outliving_its_mirror, misaligned_accesses_are_typed_faults, mremap_of_a_mirrored_buffer,
    oversized_launches_are_typed_errors, prefetch_respects_protection,
    reused_backend_and_bad_configs_are_refused, two_userfaultfd_owners_of_one_range,
    unmirrorable_mappings_are_typed, wild_device_pointers_are_typed_faults,
};
pub use exclusive::{exclusive, exclusive_cow, exclusive_mprotect};
pub use foreign::{
    foreign_device_writes_are_not_foreign, foreign_memfd_pwrite, foreign_private_file_pwrite,
    foreign_shared_anon_child_write, foreign_shared_file_pwrite, foreign_trust_checks_nothing,
};
pub use migration::{
    migrate, migrate_cpu_read_during_launch, migrate_device_writes_stay_until_touched,
    migrate_discarded_then_device_read, migrate_drop_gives_back,
    migrate_evicted_under_pool_pressure, migrate_fault, migrate_fork, migrate_mremap,
    migrate_multiple, migrate_preferred_location, migrate_release, migrate_shared,
    migrate_syscall_access, migrate_typed_errors, migrate_zero_copy_is_unsupported,
};
pub use migration_huge::{
    migrate_anon_huge_empty, migrate_anon_huge_fault, migrate_anon_huge_free,
    migrate_anon_huge_zero, migrate_fault_back_neighbourhood, migrate_fault_back_then_launch,
    migrate_partial_unmap_fault, migrate_remap_fault,
};
pub use mirroring::{
    accessed_bits_feed_young, concurrent_launches_and_invalidations, dirty_pages_survive_eviction,
    eviction_under_a_small_pool, linked_list, oversubscribed_load_then_store_2x,
    oversubscribed_load_then_store_4x, oversubscribed_load_then_store_8x, pinning_hazard_is_real,
    prefetch_replaces_faults, read_mostly_duplication, teardown_with_live_regions, zero_page_pool,
};
pub use selftests::{
    anon_read, anon_read_multiple, anon_read_prot, anon_teardown, anon_write, anon_write_child,
    anon_write_child_shared, anon_write_huge, anon_write_prot, double_map, file_read, file_write,
    mixedmap, open_close, snapshot,
};
pub use support::{
    events_available, launch_mode, suite_fetch_policy, with_launch_mode, LaunchMode, TestMap,
};
pub use thp::{hash_tracking_keeps_huge_pages, huge_pages_the_device_never_touched_stay_huge};
pub use zero_copy::{
    zero_copy_one_launch_fills_every_window, zero_copy_pin_is_unsupported,
    zero_copy_shares_the_cpu_pages, zero_copy_unmaps_beside_a_launch, zero_copy_window_eviction,
};

/// The kernels the suite needs, which each backend writes in its own
/// kernel language. Arguments are 64-bit words; pointers are CPU
/// addresses; every access goes through the device page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKernel {
    /// `out[i] = src[i]` as `u32`; args `[src, out]`.
    CopyU32,
    /// `dst[i] = base + i` as `u32`; args `[dst, base]`.
    FillU32,
    /// `p[i] = p[i] + 1` as `u32` (plain load then store); args `[p]`.
    IncrementU32,
    /// Sums a linked list on the device: each node is
    /// `{ next: u64, value: u64 }`; invocation 0 walks from `head` and
    /// stores the sum at `out`; args `[head, out]`.
    ListSum,
    /// Load-then-store over a spread: invocation `i` sums the 64 words
    /// `src[(i / 128) * 8192 + i % 128 + 128 * j]` for `j` in `0..64`
    /// (64 loads 512 bytes apart: 8 pages, shared by 128 invocations) and
    /// stores the wrapping sum at `out[i]`; args `[src, out]`. No touch for
    /// writing first: the store comes after every load (the replay
    /// contract allows it).
    GatherSum,
}

/// A backend that can build the suite's kernels.
pub trait TestKernels: Backend {
    /// Builds one of the suite's kernels.
    fn test_kernel(&self, k: TestKernel) -> Result<Box<Self::Kernel>, BackendError>;
}

/// Expands to one `#[test]` per conformance scenario for the backend
/// built by `$make` (an expression evaluated once per test).
///
/// `conformance_tests!(optional $make)` takes an `Option` instead: a test
/// whose backend is `None` returns at once (the maker prints the skip line
/// naming why, and fails the test itself when the environment requires
/// the device, e.g. `HMM_REQUIRE_GPU=1`).
///
/// `conformance_tests!(zero_copy optional $make)` is the suite for a
/// zero-copy device ([`host_windows`](hmm_core::mirror::backend::Backend::host_windows)): every scenario except the
/// four that cannot apply — `anon_teardown` unmaps memory while a launch
/// reads it, which the zero-copy contract forbids (a device that
/// dereferences host pointers would fault the process);
/// `pinning_hazard_is_real`, `eviction_under_a_small_pool` and
/// `zero_page_pool` are about the pool a zero-copy device does not have —
/// plus the zero-copy scenarios (`zero_copy_*`): pinning is a typed
/// error, the device shares the CPU's pages, windows are evicted and
/// reused, one invocation can use every window at once (one more is
/// `NoProgress`), and memory is unmapped and removed beside running
/// launches.
///
/// Every flavour runs the suite twice: once launching with
/// [`Mirror::launch`](hmm_core::mirror::Mirror::launch), and once more in
/// a `nonblocking` module (`nonblocking::anon_read`, …) where every launch
/// of every scenario is submitted in a
/// [`Mirror::scope`](hmm_core::mirror::Mirror::scope) and waited for
/// ([`LaunchMode::NonBlocking`]): all scenarios launch through one helper
/// that follows the [`LaunchMode`] [`with_launch_mode`] sets (a source
/// check, `tests/launch_paths.rs`, keeps it that way). The scenarios that
/// never launch run twice too; they are cheap.
#[macro_export]
macro_rules! conformance_tests {
    (optional $make:expr) => {
        $crate::conformance_tests!(@copy [Blocking] $make);
        /// The suite again, every launch through the non-blocking path
        /// (`Mirror::scope`, `Scope::launch`, `Pending::wait`).
        mod nonblocking {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_tests!(@copy [NonBlocking] $make);
        }
    };
    (zero_copy optional $make:expr) => {
        $crate::conformance_tests!(@zero_copy [Blocking] $make);
        /// The suite again, every launch through the non-blocking path
        /// (`Mirror::scope`, `Scope::launch`, `Pending::wait`).
        mod nonblocking {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_tests!(@zero_copy [NonBlocking] $make);
        }
    };
    ($make:expr) => {
        $crate::conformance_tests!(optional Some($make));
    };
    (@copy [$mode:ident] $make:expr) => {
        $crate::conformance_tests!(@optional [$mode] $make;
            open_close, anon_read, anon_read_prot, anon_write, anon_write_prot,
            anon_write_child, anon_write_child_shared, anon_write_huge, file_read,
            file_write, anon_read_multiple, anon_teardown, mixedmap, snapshot,
            eviction_under_a_small_pool, zero_page_pool, dirty_pages_survive_eviction,
            linked_list, pinning_hazard_is_real, teardown_with_live_regions,
            concurrent_launches_and_invalidations, accessed_bits_feed_young,
            prefetch_replaces_faults, bad_ranges_are_typed_errors,
            wild_device_pointers_are_typed_faults, prefetch_respects_protection,
            unmirrorable_mappings_are_typed, freed_memory_is_an_unmapped_fault,
            device_faults_name_the_kernels_address,
            forked_child_gets_a_typed_error, misaligned_accesses_are_typed_faults,
            oversized_launches_are_typed_errors, mremap_of_a_mirrored_buffer,
            oversubscribed_load_then_store_2x,
            oversubscribed_load_then_store_4x,
            oversubscribed_load_then_store_8x,
            migrate, migrate_fault, migrate_release, migrate_shared, migrate_multiple,
            migrate_device_writes_stay_until_touched, migrate_evicted_under_pool_pressure,
            migrate_cpu_read_during_launch, migrate_drop_gives_back, migrate_mremap,
            migrate_typed_errors, migrate_discarded_then_device_read, migrate_fork,
            migrate_preferred_location, migrate_anon_huge_empty, migrate_anon_huge_zero,
            migrate_anon_huge_free, migrate_anon_huge_fault, migrate_partial_unmap_fault,
            migrate_remap_fault, migrate_fault_back_neighbourhood, migrate_syscall_access,
            migrate_fault_back_then_launch, exclusive, exclusive_mprotect, exclusive_cow);
        $crate::conformance_tests!(@foreign [$mode] $make);
        $crate::conformance_tests!(@common [$mode] $make);
    };
    (@zero_copy [$mode:ident] $make:expr) => {
        $crate::conformance_tests!(@optional [$mode] $make;
            open_close, anon_read, anon_read_prot, anon_write, anon_write_prot,
            anon_write_child, anon_write_child_shared, anon_write_huge, file_read,
            file_write, anon_read_multiple, mixedmap, snapshot,
            dirty_pages_survive_eviction,
            linked_list, teardown_with_live_regions,
            concurrent_launches_and_invalidations, accessed_bits_feed_young,
            prefetch_replaces_faults, bad_ranges_are_typed_errors,
            wild_device_pointers_are_typed_faults, prefetch_respects_protection,
            unmirrorable_mappings_are_typed, freed_memory_is_an_unmapped_fault,
            device_faults_name_the_kernels_address,
            forked_child_gets_a_typed_error, misaligned_accesses_are_typed_faults,
            oversized_launches_are_typed_errors, mremap_of_a_mirrored_buffer,
            zero_copy_pin_is_unsupported,
            zero_copy_shares_the_cpu_pages,
            zero_copy_window_eviction, zero_copy_one_launch_fills_every_window,
            zero_copy_unmaps_beside_a_launch, migrate_zero_copy_is_unsupported);
        $crate::conformance_tests!(@foreign [$mode] $make);
        $crate::conformance_tests!(@common [$mode] $make);
    };
    // Writers write tracking cannot see (`foreign`): both flavours.
    (@foreign [$mode:ident] $make:expr) => {
        $crate::conformance_tests!(@optional [$mode] $make;
            foreign_shared_anon_child_write, foreign_shared_file_pwrite,
            foreign_memfd_pwrite, foreign_private_file_pwrite,
            foreign_device_writes_are_not_foreign, foreign_trust_checks_nothing,
            huge_pages_the_device_never_touched_stay_huge, hash_tracking_keeps_huge_pages);
    };
    // The scenarios both flavours share beyond the one-device list: those
    // on two devices, and the reused-backend check.
    (@common [$mode:ident] $make:expr) => {
        $crate::conformance_tests!(@optional2 [$mode] $make;
            kernel_outliving_its_mirror, two_userfaultfd_owners_of_one_range,
            double_map, read_mostly_duplication);
        #[test]
        fn reused_backend_and_bad_configs_are_refused() {
            if $make.is_none() {
                return;
            }
            $crate::with_launch_mode($crate::LaunchMode::$mode, || {
                $crate::reused_backend_and_bad_configs_are_refused(|| {
                    $make.expect("the device opened a moment ago")
                })
            });
        }
    };
    (@optional [$mode:ident] $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let Some(b) = $make else { return };
                $crate::with_launch_mode($crate::LaunchMode::$mode, || $crate::$name(b));
            }
        )*
    };
    (@optional2 [$mode:ident] $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let (Some(a), Some(b)) = ($make, $make) else { return };
                $crate::with_launch_mode($crate::LaunchMode::$mode, || $crate::$name(a, b));
            }
        )*
    };
}
