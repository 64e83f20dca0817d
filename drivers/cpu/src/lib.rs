//! # hmm-driver-cpu
//!
//! The reference [`Backend`](hmm_core::mirror::backend::Backend): a
//! software device whose "device memory" is host memory, whose kernels are
//! Rust closures run on worker threads, and whose MMU is emulated over the
//! shared page-table format ([`hmm_core::mirror::format`]). Deterministic
//! (fault records and `incomplete` come back sorted), dependency-free, the
//! default where no GPU exists — and the crate to copy when starting a new
//! backend.
//!
//! ```
//! use hmm_core::mirror::backend::{Backend, DeviceConfig, Invocations, PteWrite};
//! use hmm_core::mirror::format::{level_index, PoolSlot, Pte, TablePage};
//! use hmm_driver_cpu::{CpuDevice, CpuKernel};
//!
//! let dev = CpuDevice::with_threads(2);
//! dev.init(DeviceConfig { pool_slots: 8, table_pages: 4 })?;
//! let va = 0x1000_0000u64;
//! let w = |t, l, pte| PteWrite { table: TablePage(t), index: level_index(va, l) as u16, pte };
//! dev.write_ptes(&[
//!     w(0, 4, Pte::table(TablePage(1))),
//!     w(1, 3, Pte::table(TablePage(2))),
//!     w(2, 2, Pte::table(TablePage(3))),
//!     w(3, 1, Pte::leaf(PoolSlot(3), true)),
//! ])?;
//! let k = CpuKernel::new(|lane, i| {
//!     let base = lane.args()[0];
//!     lane.store_u32(base + 4 * u64::from(i), i * i)
//! });
//! let id = dev.launch(&k, Invocations::All(1024), &[va])?;
//! dev.wait(id, None)?;
//! assert!(dev.take_outcome(id)?.incomplete.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## The emulated MMU
//!
//! A kernel sees the device through its [`Lane`]. Every access
//! (`load_*`, `store_*`, `atomic_*`) translates its CPU virtual address:
//!
//! 1. addresses at or above `1 << 48` fault ([`FaultKind::NotPresent`]);
//! 2. a per-lane, direct-mapped 16-entry TLB remembers which leaf entry
//!    maps a page; on a hit the leaf entry is *re-read* (one atomic load)
//!    and must still be `VALID` with the same slot, otherwise the lane
//!    walks again — so a PTE the host zaps during a launch is seen by the
//!    very next access;
//! 3. the walk starts at table page 0 and descends four levels with
//!    [`level_index`](hmm_core::mirror::format::level_index); a missing
//!    `VALID` bit is a page fault; an index beyond the allocated table
//!    pages or pool slots is [`FaultKind::BadEntry`] (a corrupt table,
//!    never a panic);
//! 4. the leaf must be `WRITABLE` for stores and atomics
//!    ([`FaultKind::ReadOnly`] otherwise);
//! 5. the device sets `ACCESSED` (`fetch_or`) when a load or store
//!    translates, and `ACCESSED | DIRTY` when written data reaches the pool
//!    (see below) — never any other bit;
//! 6. the data lives at `slot * 4096 + offset` in the pool.
//!
//! Alignment, the same rule as the GPU drivers' shader library: `u32`,
//! `i32`, `f32` values and atomics must be 4-byte aligned, `u64`/`f64` 8-byte
//! aligned. A misaligned one returns [`FaultKind::Misaligned`], reported
//! as a fault record flagged `FAULT_MISALIGNED`, and the core ends the
//! launch with `MirrorError::DeviceFault { reason: AccessError::Misaligned,
//! .. }` naming the address (a kernel bug, not something a replay fixes).
//! Byte access (`load_u8`, `load_bytes`, `store_bytes`) takes any address
//! and may cross pages (each page is translated; the fault address is the
//! first byte on the faulting page). Aligned `u32` accesses are single
//! atomic word accesses; `u64`/`f64` are two word accesses (not single-copy
//! atomic, as on GPUs without 64-bit atomics).
//!
//! ## Faults, replay, and the contract for kernel authors
//!
//! A kernel returns `Err(LaneFault)` by propagating a lane access with
//! `?`; the invocation stops. Page faults ([`LaneFault::is_page_fault`])
//! are listed in `LaunchOutcome::incomplete` (ascending) with one
//! `RawFaultRecord` each (`FAULT_WRITE` for stores and atomics,
//! `FAULT_ATOMIC` for atomics). The core maps the pages and launches again
//! with `Invocations::Only(incomplete)`: the faulted invocations run **from
//! the start**. To make each invocation's effects happen exactly once:
//!
//! - **Plain stores are buffered in the lane** and reach the pool only
//!   when the invocation returns `Ok`. A faulted (or panicked) invocation's
//!   stores are discarded. Loads see the lane's own buffered stores
//!   (read-your-writes), byte-exact. At commit the lane re-checks that each
//!   written page is still mapped writable to the same slot; if the host
//!   zapped or downgraded it meanwhile, nothing is applied and the
//!   invocation is reported as faulted (so it is replayed after the core
//!   re-maps it). Then the bytes are stored and `ACCESSED | DIRTY` is set
//!   on each written page's leaf — after the data, so a host clearing
//!   `DIRTY` concurrently either gets it back in the old value or finds it
//!   set again: a committed store always leaves its page `DIRTY`.
//! - **Atomics apply immediately** (they return a value, so they cannot
//!   wait for commit) and set `ACCESSED | DIRTY` right after. An atomic
//!   executed before a later fault *will run again* on replay. Kernel
//!   authors must **do atomics after the last access that can fault**
//!   (e.g. load everything first, then update counters), **or make them
//!   idempotent** (`atomic_max`, `atomic_or` of a fixed bit, a CAS from a
//!   known value). Atomics operate on the pool, not on the lane's buffer:
//!   do not mix a plain store and an atomic on the same word in one
//!   invocation (the buffered store would overwrite the atomic's result at
//!   commit).
//! - **Loads and stores of different invocations are unordered**, as on a
//!   GPU: another invocation's stores become visible when it commits, in
//!   no particular order; use atomics for cross-invocation communication.
//!   Racing plain accesses are well-defined (they are atomic word accesses
//!   underneath) but give unspecified values, not undefined behaviour.
//! - A kernel may capture anything (it is Rust), but effects outside the
//!   lane are the author's business and are *not* undone on replay.
//!
//! A kernel that **panics** does not kill its worker: the panic is caught,
//! the invocation's buffered stores are discarded, the rest of the launch
//! runs, and `take_outcome` returns `BackendError::Kernel("invocation N
//! panicked: …")` naming the lowest panicking invocation (other failures
//! are counted in the message). The device stays usable.
//!
//! ## Execution
//!
//! `launch` copies the invocation list and arguments, splits the list into
//! chunks (about four per worker, at most 4096 invocations each) and queues
//! them on a crossbeam channel served by [`CpuDevice::threads`] workers
//! (default: `available_parallelism`). It returns at once. The last chunk
//! to finish builds the outcome and wakes `wait`ers (mutex + condvar).
//! Each worker runs a chunk's invocations in order on one [`Lane`], whose
//! TLB lives for the chunk. Because `Backend::launch` borrows the kernel
//! only for the call, the kernel type is [`CpuKernel`] (an `Arc` around the
//! closure), cloned into the job.
//!
//! Dropping the device sets a cancel flag (invocations not yet started are
//! skipped; their launch would report `DeviceLost`), closes the queue and
//! joins every worker — no thread outlives the device. An invocation that
//! never returns would block that join, as it would block any thread pool.
//!
//! ## Memory model: why the `unsafe` is sound
//!
//! Pool and table memory are arrays of atomics (`AtomicU32` words,
//! `AtomicU64` entries; see `memory.rs`). All device-side accesses are
//! atomic, so invocations racing on the same bytes — through plain or
//! atomic lane accesses — are never a Rust data race, and only one access
//! size is ever used on each buffer (no mixed-size atomics). The only
//! non-atomic accesses are the `memcpy`s of `copy_to_device` and
//! `copy_to_host`, which the `Backend` contract serialises against device
//! work on the same slots (a copy in never overlaps device work using the
//! slot; a copy out never overlaps device work *writing* it, and
//! concurrent reads are not a data race). The three `unsafe` blocks are
//! the zeroed allocation, and the two `copy_nonoverlapping`s, each with a
//! `SAFETY` comment; the `unsafe impl Backend` states how each promise of
//! the trait is met.
//!
//! ## Fault injection
//!
//! [`CpuDevice::set_fault_buffer_capacity`] bounds the fault records per
//! launch (overflow: records dropped, `incomplete` still complete) and
//! [`CpuDevice::set_fault_record_mangler`] rewrites every record before it
//! is reported, so the core's validation of device-written garbage can be
//! tested.
//!
//! With the cargo feature **`fault-injection`** (off by default; tests and
//! `hmm-stress` enable it) the device also fails `Backend` calls on demand
//! and lets a test read its page table:
//! `CpuDevice::faults()` returns a `FaultInjector` (an `Arc` handle) that
//! fails the next *n* calls of a kind, every call, or a seeded random
//! fraction, after applying nothing, a prefix of the batch or all of it
//! (`Applied`), and can lose the device for good; and
//! `CpuDevice::device_leaf_entries()` / `CpuDevice::entries_naming(slot)`
//! list the leaf entries the device's MMU can reach, so a test can prove
//! that no entry names a freed slot. None of it exists without the
//! feature.
//!
//! ## Starting a new backend
//!
//! Copy this crate. Keep `device.rs`'s structure (validate the whole batch
//! before touching anything, return `BackendError` rather than panic, one
//! `SAFETY` comment per promise of the trait), replace `memory.rs` with
//! device buffers, `lane.rs` with the shader library's translation, and
//! `exec.rs` with command submission + a fence per `SubmissionId`; then run
//! the same tests against it.

mod device;
mod exec;
// Without the feature only `Call` is used (the no-op injection points).
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
mod faults;
mod lane;
mod memory;
mod test_kernels;

pub use device::{host_pool_slots, CpuDevice, MAX_POOL_SLOTS, WINDOW_PAGES, ZERO_COPY_WINDOWS};
pub use exec::{CpuKernel, FaultMangler, KernelFn};
#[cfg(feature = "fault-injection")]
pub use faults::{Applied, Call, DeviceLeaf, FaultInjector};
pub use lane::{FaultKind, Lane, LaneFault};
