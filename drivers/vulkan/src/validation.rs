//! Validation-layer messages, and which call each belongs to.
//!
//! `VK_LAYER_KHRONOS_validation` reports a message from inside the Vulkan
//! call that broke a rule, on the thread that made it. Each `Backend`
//! method therefore *captures* the messages raised on its thread while it
//! runs ([`Validation::capture`], through `VulkanDevice::scoped`) and
//! returns them as its own error: a message never fails a later call or
//! another thread's call, and no call skips its work because of one. A
//! message raised outside every capture (while the device is set up,
//! destroyed, or by a test hook) belongs to no call: it is kept as
//! *uncaptured* and returned once, by the next `launch`, which then submits
//! nothing (see the `Backend` trait's `# Errors`); one still unreturned
//! when the device is dropped panics there.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard};

use ash::vk;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Validation messages recorded by the debug-utils messenger.
#[derive(Debug, Default)]
pub(crate) struct Validation {
    /// Every error-severity message, in order.
    pub(crate) errors: Mutex<Vec<String>>,
    /// Messages raised outside every capture, not yet returned.
    pub(crate) uncaptured: Mutex<Vec<String>>,
}

thread_local! {
    /// The captures open on this thread, innermost last: the address of
    /// their [`Validation`] (several devices may be open) and the
    /// messages caught so far.
    static CAPTURES: RefCell<Vec<(usize, Vec<String>)>> = const { RefCell::new(Vec::new()) };
}

/// Messages raised on this thread while it lives
/// ([`Validation::capture`]).
#[must_use = "a capture's messages are returned by `finish`"]
pub(crate) struct Capture<'a> {
    v: &'a Validation,
    /// Position on this thread's capture stack.
    depth: usize,
    finished: bool,
}

impl Validation {
    fn key(&self) -> usize {
        self as *const Validation as usize
    }

    /// Starts catching the messages this thread raises on this device,
    /// until [`Capture::finish`]. Captures nest; a message goes to the
    /// innermost.
    pub(crate) fn capture(&self) -> Capture<'_> {
        let depth = CAPTURES.with(|c| {
            let mut c = c.borrow_mut();
            c.push((self.key(), Vec::new()));
            c.len() - 1
        });
        Capture {
            v: self,
            depth,
            finished: false,
        }
    }

    /// Records one message: into the innermost capture of this device on
    /// this thread, else as uncaptured.
    fn record(&self, msg: String) {
        lock(&self.errors).push(msg.clone());
        let key = self.key();
        let mut msg = Some(msg);
        // `try_with`/`try_borrow_mut`: a message raised while the thread's
        // locals are torn down, or (never, in this crate) from inside a
        // capture's own bookkeeping, is simply uncaptured.
        let _ = CAPTURES.try_with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                if let Some((_, v)) = c.iter_mut().rev().find(|(k, _)| *k == key) {
                    v.extend(msg.take());
                }
            }
        });
        if let Some(m) = msg {
            lock(&self.uncaptured).push(m);
        }
    }

    /// Returns, once, the messages raised outside every capture.
    pub(crate) fn take_uncaptured(&self) -> Vec<String> {
        core::mem::take(&mut *lock(&self.uncaptured))
    }
}

impl Capture<'_> {
    fn pop(&mut self) -> Vec<String> {
        self.finished = true;
        CAPTURES.with(|c| {
            let mut c = c.borrow_mut();
            // Captures end innermost first (they are scoped to calls);
            // `truncate` keeps the stack sound even if one did not.
            let msgs = c
                .get_mut(self.depth)
                .map(|(_, v)| core::mem::take(v))
                .unwrap_or_default();
            c.truncate(self.depth);
            msgs
        })
    }

    /// Ends the capture and returns its messages.
    pub(crate) fn finish(mut self) -> Vec<String> {
        self.pop()
    }
}

impl Drop for Capture<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Not finished (a panic unwound through the call): its
            // messages must not vanish.
            let msgs = self.pop();
            lock(&self.v.uncaptured).extend(msgs);
        }
    }
}

/// Called by the validation layer for every message.
///
/// # Safety
///
/// Called by the Vulkan loader with a valid callback-data pointer and the
/// `user_data` registered at messenger creation: a `*const Validation` that
/// outlives the messenger (it is boxed in `Ctx`, which destroys the
/// messenger before dropping the box).
pub(crate) unsafe extern "system" fn on_message(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _types: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user: *mut c_void,
) -> vk::Bool32 {
    if !severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::ERROR) || user.is_null() {
        return vk::FALSE;
    }
    // SAFETY: the loader passes valid callback data for the call's duration.
    let msg = unsafe { data.as_ref() }
        // SAFETY: `p_message` is a NUL-terminated string valid for the call.
        .and_then(|d| unsafe { d.message_as_c_str() })
        .map_or_else(
            || "(no message)".into(),
            |m| m.to_string_lossy().into_owned(),
        );
    // SAFETY: `user` is the `Validation` registered with the messenger,
    // alive as long as the messenger (see the function's safety section).
    let v = unsafe { &*(user as *const Validation) };
    v.record(msg);
    vk::FALSE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_goes_to_the_innermost_capture_of_its_device_on_its_thread() {
        let (a, b) = (Validation::default(), Validation::default());
        a.record("before".into());
        let outer = a.capture();
        a.record("outer 1".into());
        let inner = a.capture();
        let other_device = b.capture();
        a.record("inner".into());
        b.record("device b".into());
        assert_eq!(other_device.finish(), vec!["device b".to_owned()]);
        assert_eq!(inner.finish(), vec!["inner".to_owned()]);
        a.record("outer 2".into());
        // Another thread's message is not this thread's capture's.
        std::thread::scope(|s| {
            s.spawn(|| a.record("other thread".into()));
        });
        assert_eq!(outer.finish(), vec!["outer 1".to_owned(), "outer 2".into()]);
        a.record("after".into());
        assert_eq!(
            a.take_uncaptured(),
            vec!["before".to_owned(), "other thread".into(), "after".into()]
        );
        assert!(a.take_uncaptured().is_empty(), "returned once");
        assert_eq!(lock(&a.errors).len(), 6, "every message is recorded");
        assert!(b.take_uncaptured().is_empty());
    }

    #[test]
    fn an_unfinished_capture_keeps_its_messages() {
        let v = Validation::default();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _cap = v.capture();
            v.record("raised by a call that panicked".into());
            panic!("unwinding through the call");
        }));
        assert!(r.is_err());
        assert_eq!(
            v.take_uncaptured(),
            vec!["raised by a call that panicked".to_owned()]
        );
        // The stack is empty again: a new message is uncaptured.
        v.record("later".into());
        assert_eq!(v.take_uncaptured(), vec!["later".to_owned()]);
    }
}
