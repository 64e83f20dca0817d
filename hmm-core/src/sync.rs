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

/// Takes a mutex if it is free (ignoring poisoning, as [`lock`] does);
/// `None` if another thread holds it.
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Threads: loom's under `--cfg hmm_loom` (so a model explores the
/// deferred-release worker too), std's otherwise.
pub(crate) mod thread {
    #[cfg(hmm_loom)]
    pub(crate) use loom::thread::{yield_now, JoinHandle};
    #[cfg(not(hmm_loom))]
    pub(crate) use std::thread::{yield_now, JoinHandle};

    /// Starts a named thread (the name is dropped under loom).
    pub(crate) fn spawn_named<F>(name: &str, f: F) -> std::io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        #[cfg(hmm_loom)]
        {
            let _ = name;
            Ok(loom::thread::spawn(f))
        }
        #[cfg(not(hmm_loom))]
        {
            std::thread::Builder::new().name(name.into()).spawn(f)
        }
    }
}

/// An unbounded multi-producer channel: `crossbeam-channel` normally; under
/// loom a queue behind the shim's `Mutex` and `Condvar`, which loom can
/// model (crossbeam's parking is invisible to it).
pub(crate) mod channel {
    #[cfg(not(hmm_loom))]
    pub(crate) use crossbeam_channel::{unbounded, Receiver, Sender};

    #[cfg(hmm_loom)]
    pub(crate) use self::modelled::{unbounded, Receiver, Sender};

    #[cfg(hmm_loom)]
    mod modelled {
        use std::collections::VecDeque;
        use std::sync::Arc;

        use super::super::{lock, Condvar, Mutex};

        struct Chan<T> {
            q: Mutex<(VecDeque<T>, usize)>,
            cv: Condvar,
        }

        /// The sending half.
        pub(crate) struct Sender<T>(Arc<Chan<T>>);
        /// The receiving half.
        pub(crate) struct Receiver<T>(Arc<Chan<T>>);

        /// A new channel.
        pub(crate) fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
            let c = Arc::new(Chan {
                q: Mutex::new((VecDeque::new(), 1)),
                cv: Condvar::new(),
            });
            (Sender(Arc::clone(&c)), Receiver(c))
        }

        impl<T> Sender<T> {
            /// Queues `v`; never blocks.
            pub(crate) fn send(&self, v: T) -> Result<(), T> {
                lock(&self.0.q).0.push_back(v);
                self.0.cv.notify_one();
                Ok(())
            }
        }

        impl<T> Drop for Sender<T> {
            fn drop(&mut self) {
                lock(&self.0.q).1 -= 1;
                self.0.cv.notify_all();
            }
        }

        impl<T> Receiver<T> {
            /// The next value; `Err` once it is empty and no sender is left.
            pub(crate) fn recv(&self) -> Result<T, ()> {
                let mut g = lock(&self.0.q);
                loop {
                    if let Some(v) = g.0.pop_front() {
                        return Ok(v);
                    }
                    if g.1 == 0 {
                        return Err(());
                    }
                    g = self.0.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}
