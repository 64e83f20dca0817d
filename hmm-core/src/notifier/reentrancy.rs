//! Which address spaces the current thread is inside an invalidate
//! callback of.
//!
//! A blocking `remove` (or a notifier unregister) called from such a
//! callback would wait for the very invalidation that is running it. The
//! registry asks this module first and refuses instead of deadlocking.
//!
//! The record is a fixed-size array per thread, so entering a callback
//! never allocates (teardown must not allocate). Nesting deeper than
//! [`MAX_DEPTH`] distinct frames is still tracked conservatively: once the
//! array overflows every space counts as "inside", which can only turn a
//! blocking remove into its non-blocking form, never into a deadlock.

use core::cell::Cell;

use crate::sync::thread_local;

/// Nesting depth tracked exactly.
pub(crate) const MAX_DEPTH: usize = 8;

struct Frames {
    ids: [Cell<u64>; MAX_DEPTH],
    len: Cell<usize>,
}

#[cfg(not(hmm_loom))]
thread_local! {
    static FRAMES: Frames = const {
        Frames {
            ids: [const { Cell::new(0) }; MAX_DEPTH],
            len: Cell::new(0),
        }
    };
}

// loom's `thread_local!` takes no `const` initialiser.
#[cfg(hmm_loom)]
thread_local! {
    static FRAMES: Frames = Frames {
        ids: [const { Cell::new(0) }; MAX_DEPTH],
        len: Cell::new(0),
    };
}

/// Marks the current thread as running callbacks of space `id` until
/// dropped.
pub(crate) struct CallbackFrame(());

impl CallbackFrame {
    pub(crate) fn enter(id: u64) -> Self {
        FRAMES.with(|f| {
            let n = f.len.get();
            if n < MAX_DEPTH {
                f.ids[n].set(id);
            }
            f.len.set(n + 1);
        });
        CallbackFrame(())
    }
}

impl Drop for CallbackFrame {
    fn drop(&mut self) {
        FRAMES.with(|f| f.len.set(f.len.get() - 1));
    }
}

/// Whether the current thread is inside a callback of space `id`
/// (conservatively true after an overflow).
pub(crate) fn inside(id: u64) -> bool {
    FRAMES.with(|f| {
        let n = f.len.get();
        n > MAX_DEPTH || f.ids[..n].iter().any(|c| c.get() == id)
    })
}
