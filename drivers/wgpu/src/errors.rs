//! Which call an error belongs to.
//!
//! wgpu reports validation, out-of-memory and internal errors through an
//! error sink: to the innermost matching *error scope* of the thread that
//! made the failing wgpu call, or, outside every scope, to the device's
//! uncaptured-error handler. A lost device is reported once, through the
//! device-lost callback, and later wgpu calls then fail silently.
//!
//! The driver therefore runs every `Backend` method's wgpu calls inside
//! that method's own scopes ([`WgpuDevice::scoped`]): an error is returned
//! by the call whose commands raised it — on its own thread, so another
//! thread's call never sees it — and never by a later, unrelated call.
//! Two states outlive a call:
//!
//! - **lost** (sticky): set by the device-lost callback, or by the driver
//!   when the device stops answering (a read-back that never maps); every
//!   later call returns [`BackendError::DeviceLost`].
//! - **uncaptured** errors: raised outside every `Backend` method (with
//!   every method scoped, only by the driver's own set-up or a test hook),
//!   so no call owns them. They are returned once, by the next
//!   [`launch`](hmm_core::mirror::backend::Backend::launch), which then
//!   submits nothing — the call where the core already expects submission
//!   errors — and never by a page-table, copy or window call, whose result
//!   decides whether memory may be reused.

use std::sync::{Arc, Mutex, MutexGuard};

use hmm_core::mirror::backend::BackendError;

use crate::device::WgpuDevice;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State shared with wgpu's callbacks.
#[derive(Default)]
pub(crate) struct Shared {
    /// Why the device was lost, once it was (first reason wins).
    lost: Mutex<Option<String>>,
    /// Errors wgpu reported outside every error scope, not yet returned.
    uncaptured: Mutex<Vec<String>>,
}

impl Shared {
    /// Registers the device-lost callback and the uncaptured-error handler.
    pub(crate) fn attach(device: &wgpu::Device) -> Arc<Shared> {
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        device.set_device_lost_callback(move |reason, msg| {
            s.set_lost(format!("{reason:?}: {msg}"));
        });
        let s = Arc::clone(&shared);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&s.uncaptured).push(e.to_string());
        }));
        shared
    }

    fn set_lost(&self, why: String) {
        lock(&self.lost).get_or_insert(why);
    }
}

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

impl WgpuDevice {
    /// Fails with [`BackendError::DeviceLost`] once the device was lost.
    pub(crate) fn alive(&self) -> Result<(), BackendError> {
        match lock(&self.shared.lost).clone() {
            Some(why) => Err(BackendError::DeviceLost(why)),
            None => Ok(()),
        }
    }

    /// Declares the device lost (for good) and returns the error to report.
    pub(crate) fn lose(&self, why: impl Into<String>) -> BackendError {
        self.shared.set_lost(why.into());
        match self.alive() {
            Err(e) => e,
            Ok(()) => BackendError::DeviceLost("device lost".into()),
        }
    }

    /// Returns, once, the errors wgpu reported outside every call. Only
    /// `launch` calls this (see the [module docs](self)).
    pub(crate) fn take_uncaptured(&self) -> Result<(), BackendError> {
        let mut errs = lock(&self.shared.uncaptured);
        if errs.is_empty() {
            return Ok(());
        }
        let msg = errs.join("; ");
        errs.clear();
        Err(BackendError::Kernel(format!(
            "wgpu reported an error outside any call (this launch submitted nothing): {msg}"
        )))
    }

    /// Runs one call's work, `f`, inside its own error scopes: the call
    /// fails with the errors its own wgpu calls raised, on this thread,
    /// during `f` — an out-of-memory error as
    /// [`BackendError::OutOfMemory`], any other as `kind(message)` — and
    /// with [`BackendError::DeviceLost`] if the device is or becomes lost.
    /// An error `f` returns itself wins (with wgpu's messages appended). A
    /// `DeviceLost` from `f` marks the device lost.
    pub(crate) fn scoped<T>(
        &self,
        what: &str,
        kind: fn(String) -> BackendError,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.alive()?;
        let scopes = [
            wgpu::ErrorFilter::Validation,
            wgpu::ErrorFilter::OutOfMemory,
            wgpu::ErrorFilter::Internal,
        ]
        .map(|filter| self.device.push_error_scope(filter));
        let r = f();
        let mut errs = Vec::new();
        // Popped innermost first, as wgpu requires. The futures are ready
        // at once on native wgpu (errors are routed synchronously).
        for scope in scopes.into_iter().rev() {
            if let Some(e) = pollster::block_on(scope.pop()) {
                errs.push(e);
            }
        }
        let r = match r {
            Err(BackendError::DeviceLost(why)) => Err(self.lose(why)),
            r => r,
        };
        self.alive()?;
        if errs.is_empty() {
            return r;
        }
        let oom = errs
            .iter()
            .any(|e| matches!(e, wgpu::Error::OutOfMemory { .. }));
        let msg = errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let msg = format!("{what}: wgpu: {msg}");
        Err(match r {
            Ok(_) if oom => BackendError::OutOfMemory(msg),
            Ok(_) => kind(msg),
            Err(e) => with_note(e, &msg),
        })
    }

    /// Test hook: makes one wgpu call that fails validation (a buffer
    /// both `MAP_READ` and `STORAGE`, which needs a feature the device
    /// does not enable) outside every call, so it reaches the
    /// uncaptured-error path: no call owns it, and the next `launch`
    /// reports it. Not part of the API.
    #[doc(hidden)]
    pub fn provoke_validation_error(&self) {
        let _buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hmm invalid on purpose"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
    }

    /// Test hook: the next `launch` records one command that fails
    /// validation (a copy past the end of its control buffer), so its own
    /// submission fails inside its own error scopes — a real wgpu error
    /// raised by that call. Not part of the API.
    #[doc(hidden)]
    pub fn provoke_launch_error(&self) {
        self.break_next_launch
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
