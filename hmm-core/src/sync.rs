//! The synchronisation primitives the crate uses, swapped for `loom`'s
//! model-checked versions when built with `RUSTFLAGS="--cfg hmm_loom"`.
//!
//! Every concurrent structure in `hmm-core` imports its locks and atomics
//! from here and nowhere else, so the loom tests explore exactly the code
//! that ships.

#[cfg(hmm_loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

#[cfg(not(hmm_loom))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

/// Reference counting is not part of any protocol loom needs to explore,
/// and loom's `Arc` cannot hold trait objects, so both builds use std's.
pub(crate) use std::sync::Arc;

#[cfg(hmm_loom)]
pub(crate) use loom::thread_local;
#[cfg(not(hmm_loom))]
pub(crate) use std::thread_local;

/// Locks a mutex, ignoring poisoning.
///
/// A panic in user code never runs while one of the registry's own locks
/// is held (callbacks run with the state lock released), so a poisoned
/// lock can only come from a bug in the registry itself; the state it
/// protects is still consistent at every unlock point, and refusing all
/// further service would turn one panic into a hang of every device.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
