//! The pinning baseline ([`Mirror::pin`]): register a whole range up
//! front, the classic alternative on-demand mirroring is compared with.

use super::backend::Backend;
use super::error::MirrorError;
use super::format::Pte;
use super::handle::Mirror;
use super::host_side::HostSide;
use super::state::PinnedRange;
use crate::addr::{VaRange, VirtAddr};
use crate::cpu::range_fault::FaultFlags;
use crate::sync::lock;

/// A range registered by [`Mirror::pin`].
#[derive(Debug)]
#[must_use = "a pin holds device memory until `Mirror::unpin`"]
pub struct PinHandle {
    range: VaRange,
}

impl PinHandle {
    /// The pinned range.
    pub fn range(&self) -> VaRange {
        self.range
    }
}

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// The pinning baseline: registers `range` up front — locks the CPU
    /// pages (`mlock`, best effort), copies every page, maps every entry,
    /// installs **no** notifier. The device keeps reading these copies
    /// whatever the CPU does until [`Mirror::unpin`]: CPU writes after the
    /// pin are not seen, and an `munmap` leaves the device reading the old
    /// data. That hazard is the point of comparison.
    pub fn pin(&self, range: VaRange) -> Result<PinHandle, MirrorError> {
        self.same_process()?;
        let range = range.page_cover()?.user()?;
        let inner = &*self.inner;
        inner.lock().res.check_pin()?;
        let _serial = lock(&inner.launch);
        // Populate and check permissions exactly as a fault would.
        // Writable if every mapping the range lies in is: a buffer can
        // span two mappings of the same permissions (the heap, split where
        // a registration ended), and pinning it read-only cost the launch
        // an upgrade fault per page (`hmm-bench`'s sparse 100 % pin arm).
        let writable = all_writable(&*inner.host, range)?;
        let flags = if writable {
            FaultFlags::WRITE
        } else {
            FaultFlags::READ
        };
        let mut states = Vec::new();
        inner
            .host
            .range_fault_into(range, flags, &mut states)
            .map_err(|e| MirrorError::from_fault(e, range.start(), false))?;
        // SAFETY: mlock only changes residency of our own pages.
        let locked = unsafe { libc::mlock(range.start().as_mut_ptr(), range.len() as usize) } == 0;
        let mut dev = inner.lock();
        let pinned = inner.flush_or_fail(&mut dev).and_then(|()| {
            let (mut cx, res) = dev.parts(inner);
            res.pin(&mut cx, range, &states, writable)
        });
        if let Err(e) = pinned {
            drop(dev);
            if locked {
                // SAFETY: undoing our own mlock.
                unsafe { libc::munlock(range.start().as_mut_ptr(), range.len() as usize) };
            }
            return Err(e);
        }
        dev.pinned
            .insert(range.start().0, PinnedRange { range, locked });
        Ok(PinHandle { range })
    }

    /// Ends a pin: writes device-dirty pages back (if the CPU range still
    /// exists), unmaps and frees everything, unlocks the CPU pages.
    pub fn unpin(&self, pin: PinHandle) -> Result<(), MirrorError> {
        self.same_process()?;
        let inner = &*self.inner;
        let _serial = lock(&inner.launch);
        let mut dev = inner.lock();
        let Some(p) = dev.pinned.remove(&pin.range.start().0) else {
            return Ok(());
        };
        let mapped: Vec<(VirtAddr, Pte)> = dev.table.mapped_in(p.range).collect();
        dev.res.unpin(&mapped);
        let zapped = {
            let (mut cx, res) = dev.parts(inner);
            super::state::zap(&mut cx, res, p.range, true)
        };
        if p.locked {
            // SAFETY: undoing our own mlock; failure (range gone) is harmless.
            unsafe { libc::munlock(p.range.start().as_mut_ptr(), p.range.len() as usize) };
        }
        zapped
    }
}

/// Whether every page of `range` lies in a writable mapping (from the
/// host's mapping cache; a hole or a failed lookup answers `false`, which
/// only makes the pin read-only).
fn all_writable<H: HostSide>(host: &H, range: VaRange) -> Result<bool, MirrorError> {
    let mut at = range.start();
    while at < range.end() {
        match host.lookup(at)? {
            Some(m) if m.write && m.range.contains(at) => at = m.range.end(),
            _ => return Ok(false),
        }
    }
    Ok(true)
}
