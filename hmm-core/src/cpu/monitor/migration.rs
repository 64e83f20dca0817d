//! The monitor's part in device-private migration (`cpu::migration`):
//! arming ranges for missing-page faults, expecting the migration's own
//! `REMAP` event, and the userfaultfd calls the fault-back server and the
//! mirror's give-backs use.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{EventMonitor, MonitorError};
use crate::addr::{VaRange, VirtAddr};
use crate::cpu::uffd::{RegisterMode, UffdError, Userfaultfd};

impl EventMonitor {
    /// Arms `range` (page aligned, mapped, private anonymous, inside a
    /// watched range) for device-private migration: registers it
    /// `MISSING | WP`, so a CPU access to a page moved out of it waits for
    /// the sink's [`InvalidationSink::missing_fault`](super::InvalidationSink::missing_fault) instead of finding a
    /// zero page. Re-registering a range with the same userfaultfd keeps
    /// its events and its write protection. Armed ranges stay armed until
    /// [`EventMonitor::disarm_missing`], an unwatch or an unmap.
    pub fn arm_missing(&self, range: VaRange) -> Result<(), MonitorError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(MonitorError::Stopped);
        }
        let _w = self.shared.watched();
        let both = RegisterMode(RegisterMode::MISSING.0 | RegisterMode::WP.0);
        self.shared.uffd.register(range, both)?;
        let mut m = self.shared.missing();
        m.insert(range);
        m.reserve_spare();
        Ok(())
    }

    /// Ends [`EventMonitor::arm_missing`] of `range`: back to write-protect
    /// mode only (a CPU access to a hole there is an ordinary fault
    /// again). The caller makes sure no page of it is held elsewhere.
    /// Returns the parts it disarmed: those of `range` still armed. A part
    /// unmapped since (its `UNMAP` event took it out of the armed set) is
    /// left alone — its addresses may hold another mapping now, another
    /// armed range's or another userfaultfd's, and unregistering it would
    /// take that one's registration (conformance `exclusive_cow` failed
    /// with `EBUSY`, about one run in fifteen, after a mirror's teardown
    /// re-registered a range its test had unmapped and another test had
    /// mapped again).
    ///
    /// The kernel keeps a mode when asked to register a subset of it (a
    /// `WP` registration of a `MISSING | WP` range changes nothing), so
    /// this unregisters each part and registers it `WP` again. That drops
    /// its write protection: the caller re-arms write tracking and treats
    /// the part as written by the CPU
    /// ([`HostSpace::disarm`](crate::cpu::host::HostSpace::disarm) does both).
    pub fn disarm_missing(&self, range: VaRange) -> Result<Vec<VaRange>, MonitorError> {
        let _w = self.shared.watched();
        let armed = self.shared.missing().overlapping(range);
        for &a in &armed {
            self.shared.missing().remove(a);
            self.shared.uffd.unregister(a)?;
            self.shared.register_wp(a)?;
        }
        Ok(armed)
    }

    /// Whether some page of `range` is armed for migration.
    pub fn is_armed(&self, range: VaRange) -> bool {
        !self.shared.missing().overlapping(range).is_empty()
    }

    /// The next `REMAP` event `from → to` over `len` bytes is this
    /// process's own migration moving pages out (`mremap` with
    /// `MREMAP_DONTUNMAP`): the handler drops it without an invalidation
    /// or a watch-set shift. Call before the `mremap`; call
    /// [`EventMonitor::forget_own_remap`] if it fails.
    ///
    /// The destination counts as armed until [`EventMonitor::unregister_scratch`]
    /// or [`EventMonitor::forget_scratch`]: the move carries the source's
    /// registration there, and a dead region's late `unwatch` over those
    /// addresses (a mapping that lived there before the scratch) must not
    /// unregister it — the move would then look like it took a mapping
    /// that replaced the armed one (conformance `migrate_partial_unmap_fault`
    /// on the GPU drivers, 2 runs in 10).
    pub fn expect_own_remap(&self, from: VirtAddr, to: VirtAddr, len: u64) {
        if let Ok(dest) = VaRange::from_start_len(to, len) {
            let _w = self.shared.watched();
            let mut m = self.shared.missing();
            m.insert(dest);
            m.reserve_spare();
        }
        self.shared
            .own_remaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((from.get(), to.get(), len));
    }

    /// Withdraws an [`EventMonitor::expect_own_remap`] whose `mremap`
    /// failed (no event will come).
    pub fn forget_own_remap(&self, from: VirtAddr, to: VirtAddr, len: u64) {
        {
            let mut own = self
                .shared
                .own_remaps
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(i) = own.iter().position(|o| *o == (from.get(), to.get(), len)) {
                own.swap_remove(i);
            }
        }
        if let Ok(dest) = VaRange::from_start_len(to, len) {
            self.forget_scratch(dest);
        }
    }

    /// A scratch destination is done with (moved back, or given up): it
    /// no longer counts as armed.
    pub fn forget_scratch(&self, range: VaRange) {
        let _w = self.shared.watched();
        self.shared.missing().remove(range);
    }

    /// Whether every page of `range` lies in a mapping registered in
    /// write-protect mode on a userfaultfd (this process has one: ours,
    /// unless another library opened its own). Asked by un-protecting
    /// the range, which changes nothing on pages nobody protected (a
    /// migration's scratch) and fails with `ENOENT` on an unregistered
    /// mapping; retried while a layout change makes it `EAGAIN`.
    pub fn is_registered(&self, range: VaRange) -> bool {
        let t0 = std::time::Instant::now();
        loop {
            match self.shared.uffd.write_protect(range, false) {
                Ok(()) => return true,
                Err(UffdError::Ioctl { ref source, .. })
                    if source.raw_os_error() == Some(libc::EAGAIN)
                        && t0.elapsed() < std::time::Duration::from_secs(1) =>
                {
                    std::thread::yield_now();
                }
                Err(_) => return false,
            }
        }
    }

    /// Unregisters `range` (a scratch mapping the migration moved pages
    /// into, never watched): no event, nothing else changes.
    pub fn unregister_scratch(&self, range: VaRange) -> Result<(), MonitorError> {
        let _w = self.shared.watched();
        self.shared.missing().remove(range);
        self.shared.uffd.unregister(range)?;
        Ok(())
    }

    /// Resolves missing-page faults at `dst` with `data` (whole pages),
    /// installed write-protected so write tracking sees the next CPU
    /// write ([`Userfaultfd::copy_in`]).
    ///
    /// # Safety
    ///
    /// As [`Userfaultfd::copy_in`]: no Rust reference of this process
    /// covers the pages at `dst`.
    pub unsafe fn copy_in(&self, dst: VirtAddr, data: &[u8]) -> Result<u64, MonitorError> {
        // SAFETY: the caller's contract is `copy_in`'s.
        Ok(unsafe { self.shared.uffd.copy_in(dst, data, true) }?)
    }

    /// The userfaultfd, for the migration server (`cpu::migration`), which
    /// resolves the faults the sink hands it.
    pub(crate) fn uffd(&self) -> Arc<Userfaultfd> {
        Arc::clone(&self.shared.uffd)
    }

    /// Wakes threads waiting on faults in `range` (they fault again).
    pub fn wake(&self, range: VaRange) {
        let _ = self.shared.uffd.wake(range);
    }

    /// Poisons the missing pages of `range` ([`Userfaultfd::poison`]): a CPU
    /// access there gets `SIGBUS`.
    pub fn poison(&self, range: VaRange) -> Result<(), MonitorError> {
        Ok(self.shared.uffd.poison(range)?)
    }
}
