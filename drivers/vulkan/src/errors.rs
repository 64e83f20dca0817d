//! Which call an error belongs to: each call's own validation messages
//! (`validation.rs`), and the sticky lost state.

use hmm_core::mirror::backend::BackendError;

use crate::device::{lock, VulkanDevice};

/// Appends `note` to the message of `e`, keeping its kind.
fn with_note(e: BackendError, note: &str) -> BackendError {
    use BackendError as E;
    match e {
        E::OutOfMemory(m) => E::OutOfMemory(format!("{m}; {note}")),
        E::DeviceLost(m) => E::DeviceLost(format!("{m}; {note}")),
        E::Kernel(m) => E::Kernel(format!("{m}; {note}")),
        E::Other(m) => E::Other(format!("{m}; {note}")),
        other => other,
    }
}

/// Validation messages as one error message.
pub(crate) fn validation_message(msgs: &[String]) -> String {
    format!("Vulkan validation: {}", msgs.join("; "))
}

impl VulkanDevice {
    /// Fails with [`BackendError::DeviceLost`] once the device was lost.
    pub(crate) fn alive(&self) -> Result<(), BackendError> {
        match lock(&self.lost).clone() {
            Some(why) => Err(BackendError::DeviceLost(why)),
            None => Ok(()),
        }
    }

    /// Marks the device lost, for good, if `e` says it is; returns `e`.
    pub(crate) fn latch(&self, e: BackendError) -> BackendError {
        if let BackendError::DeviceLost(why) = &e {
            lock(&self.lost).get_or_insert_with(|| why.clone());
        }
        e
    }

    /// Runs `f` and returns, with its result, the validation messages this
    /// thread raised on this device meanwhile (none without validation).
    pub(crate) fn captured<T>(&self, f: impl FnOnce() -> T) -> (T, Vec<String>) {
        match self.ctx.validation.as_deref() {
            None => (f(), Vec::new()),
            Some(v) => {
                let cap = v.capture();
                let r = f();
                (r, cap.finish())
            }
        }
    }

    /// Runs one call's work, `f`: fails with `DeviceLost` on a lost device
    /// (without running `f`), with `f`'s own error, or with the validation
    /// messages `f`'s Vulkan calls raised (as [`BackendError::Other`]; an
    /// error of `f` keeps its kind and gets them appended) — never with a
    /// message of another call.
    pub(crate) fn scoped<T>(
        &self,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.alive()?;
        let (r, msgs) = self.captured(f);
        self.conclude(r, &msgs)
    }

    /// A call's result given the validation messages it raised.
    pub(crate) fn conclude<T>(
        &self,
        r: Result<T, BackendError>,
        msgs: &[String],
    ) -> Result<T, BackendError> {
        let r = r.map_err(|e| self.latch(e));
        if msgs.is_empty() {
            return r;
        }
        let note = validation_message(msgs);
        Err(match r {
            Ok(_) => BackendError::Other(note),
            Err(e) => with_note(e, &note),
        })
    }

    /// Returns, once, the validation messages raised outside every call.
    /// Only `launch` calls this (see `validation.rs`).
    pub(crate) fn take_uncaptured(&self) -> Result<(), BackendError> {
        let msgs = self
            .ctx
            .validation
            .as_deref()
            .map(|v| v.take_uncaptured())
            .unwrap_or_default();
        if msgs.is_empty() {
            return Ok(());
        }
        Err(BackendError::Other(format!(
            "{} (raised outside any call; this launch submitted nothing)",
            validation_message(&msgs)
        )))
    }
}
