//! Regions: registered on demand when the device faults where no region
//! is, released by the deferred-release worker when they die.
//!
//! # Registration ([`Mirror::region_for`])
//!
//! A fault at an address no live region covers finds the CPU mapping (read
//! during this fault-service round: outside watched ranges nothing tells us
//! it changed), asks the residency for the region around it (copy mode:
//! the largest of 2 MiB / 64 KiB / 4 KiB that is aligned, inside the
//! mapping and overlaps no region — `drm_gpusvm`'s rule; zero-copy: the
//! window-sized block), subscribes an interval notifier and watches the
//! range for kernel events. A watch that fails because the memory changed
//! under us is retried; if the memory changed shape, the region is released
//! and chosen again (`RegionReleased`, bounded by the caller).
//!
//! # Deferred release ([`release_worker`])
//!
//! An unmapped (or remapped) region is dead: the invalidation marks it and
//! sends its start over a channel to the `hmm-release` thread, which takes
//! it out of the region map, zaps what the unmap left (the kernel merges
//! neighbouring mappings into one VMA, so only part of a region may be
//! gone) with write-back, ends its watch and removes its notifier with the
//! blocking `remove` — never allowed inside a callback — once no walker can
//! see it (amdkfd's deferred list; Xe's garbage collector). A fault that
//! meets a dead region before the worker does finishes the job itself.

use std::sync::Weak;

use super::backend::Backend;
use super::error::{AccessError, MirrorError};
use super::handle::Mirror;
use super::host_side::HostSide;
use super::invalidate::Region;
use super::state::{Dev, Inner, RegionKey, RegionSlot, ReleaseMsg};
use super::stats::Counters;
use crate::addr::{VaRange, VirtAddr};
use crate::cpu::host::HostError;
use crate::cpu::maps::{Mapping, MappingKind};
use crate::cpu::monitor::MonitorError;
use crate::cpu::uffd::UffdError;
use crate::notifier::SubscriptionRef;
use crate::sync::channel::Receiver;
use crate::sync::{thread::yield_now, Arc};

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// The region containing `at`, registering one (with its interval
    /// notifier and event watch) if none does.
    pub(super) fn region_for(
        &self,
        at: VirtAddr,
        write: bool,
        epoch: u64,
    ) -> Result<(VaRange, SubscriptionRef<Region<B, H>>), MirrorError> {
        let inner = &*self.inner;
        {
            let dev = inner.lock();
            if let Some((_, slot)) = dev.regions.range(..=at.0).next_back() {
                if slot.range.contains(at) && !slot.dead {
                    if let Some(sub) = &slot.sub {
                        return Ok((slot.range, sub.ops_arc()));
                    }
                }
            }
        }
        // A dead region still covering `at` is waiting for the release
        // worker; finish its job here (we are not inside a callback, so the
        // blocking remove is allowed) rather than fail the fault.
        self.reap_dead_at(at);
        let unmapped = MirrorError::DeviceFault {
            addr: at,
            write,
            reason: AccessError::Unmapped,
        };
        let mapping = inner.host.lookup_in_epoch(at, epoch)?.ok_or(unmapped)?;
        if !mapping.read {
            return Err(MirrorError::DeviceFault {
                addr: at,
                write,
                reason: AccessError::NoAccess,
            });
        }
        if write && !mapping.write {
            return Err(MirrorError::DeviceFault {
                addr: at,
                write,
                reason: AccessError::ReadOnly,
            });
        }
        let mut dev = inner.lock();
        // Dead regions overlapping the mapping are still in the map (their
        // notifier is live): the choice treats them as present.
        let chosen = dev
            .res
            .choose_region(at, mapping.range, &dev.regions, &inner.cfg);
        let range = chosen.ok_or(MirrorError::DeviceFault {
            addr: at,
            write,
            reason: AccessError::BadPage,
        })?;
        let key = RegionKey {
            start: range.start().0,
            id: dev.next_region_id,
        };
        dev.next_region_id += 1;
        let sub = inner
            .host
            .space()
            .insert(
                range,
                Region {
                    owner: Arc::downgrade(&self.inner),
                    key,
                },
            )
            .map_err(|_| MirrorError::TornDown)?;
        let sref = sub.ops_arc();
        dev.regions.insert(
            range.start().0,
            RegionSlot {
                id: key.id,
                range,
                sub: Some(sub),
                dead: false,
                written: false,
                watched: false,
            },
        );
        drop(dev);
        Counters::add(&inner.counters.regions_created, 1);
        // A watch can fail because the memory changed under us: a
        // concurrent munmap + mmap left a hole at the moment of
        // registering. The region has no pages yet, so trying again is
        // sound; giving up at once would leave it mirrored with no events
        // and no write tracking while its memory is ordinary (stale reads
        // found by `hmm-stress`).
        let mut watched = inner.host.watch(range, inner.writes);
        for _ in 0..3 {
            if watched.is_ok() {
                break;
            }
            inner.host.forget_mappings(range);
            match inner.host.lookup(at)? {
                Some(m) if m.range.start() <= range.start() && range.end() <= m.range.end() => {
                    yield_now();
                    watched = inner.host.watch(range, inner.writes);
                }
                _ => break,
            }
        }
        if watched.is_ok() {
            let recorded = {
                let mut dev = inner.lock();
                let slot = dev.regions.get_mut(&key.start).filter(|r| r.id == key.id);
                slot.map(|s| s.watched = true).is_some()
            };
            if !recorded {
                // Released meanwhile (its release found no watch to end).
                // Not under the driver lock: ending a watch may wait for
                // the event monitor. A failure leaves a watch the host's
                // teardown ends.
                let _ = inner.host.unwatch(range, inner.writes);
            }
        }
        if let Err(e) = watched {
            // The mapping may have gone in the meantime (then the fault is
            // an access to unmapped memory), or the kernel may refuse to
            // register this kind of mapping (then it stays mirrored, seen
            // only through explicit invalidation — said once).
            inner.host.forget_mappings(range);
            let now = inner.host.lookup(at)?;
            let covered = now
                .as_ref()
                .is_some_and(|m| m.range.start() <= range.start() && range.end() <= m.range.end());
            // Only a registration the kernel refuses makes an unwatched
            // region. A failure caused by the memory changing under us
            // (another thread unmapping and mapping it again between our
            // look at the maps and the ioctls) must not: keeping the region
            // would mirror memory whose CPU writes and unmaps go unseen
            // (stale reads under `hmm-stress`, about one vulkan run in
            // fifteen, every one with `unwatched 1`). Choose again instead
            // (bounded by the caller).
            let transient = churned(&e, now.as_ref());
            if !covered || transient {
                // Gone (an access to unmapped memory), or reshaped since
                // the region was chosen (choose again: the caller retries
                // on RegionReleased, bounded).
                let mut dev = inner.lock();
                if let Some(slot) = dev.regions.get_mut(&key.start).filter(|r| r.id == key.id) {
                    slot.dead = true;
                }
                drop(dev);
                // Fails only at teardown, which releases every region.
                let _ = inner.release_tx.send(ReleaseMsg::Region(key));
                return Err(match now {
                    Some(_) if transient => MirrorError::RegionReleased { addr: at },
                    None => MirrorError::DeviceFault {
                        addr: at,
                        write,
                        reason: AccessError::Unmapped,
                    },
                    Some(_) => MirrorError::RegionReleased { addr: at },
                });
            }
            Counters::add(&inner.counters.unwatched_regions, 1);
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    target: "hmm_rs",
                    "cannot watch {range:?} for kernel events ({e}); such regions follow explicit invalidation only (counted in MirrorStats::unwatched_regions)"
                )
            });
        }
        Ok((range, sref))
    }

    /// Releases a dead region containing `at`, as the worker would.
    fn reap_dead_at(&self, at: VirtAddr) {
        let inner = &*self.inner;
        let slot = {
            let mut dev = inner.lock();
            let start = dev
                .regions
                .range(..=at.0)
                .next_back()
                .filter(|(_, r)| r.dead && r.range.contains(at))
                .map(|(k, _)| *k);
            start.and_then(|k| take_dead(&mut dev, k, None))
        };
        if let Some(slot) = slot {
            release_taken(inner, slot);
        }
    }
}

/// Takes the dead region at `start` (instance `id`, if given) out of the
/// map for release, counting it in [`Dev::releasing`] until
/// [`release_taken`] is done with it.
fn take_dead<B: Backend, H: HostSide>(
    dev: &mut Dev<B, H>,
    start: u64,
    id: Option<u64>,
) -> Option<RegionSlot<B, H>> {
    match dev.regions.get(&start) {
        Some(r) if r.dead && id.is_none_or(|id| r.id == id) => {
            dev.releasing += 1;
            dev.regions.remove(&start)
        }
        _ => None,
    }
}

/// Releases a region [`take_dead`] handed over, then ends its count.
fn release_taken<B: Backend, H: HostSide>(inner: &Inner<B, H>, slot: RegionSlot<B, H>) {
    release_slot(inner, slot);
    inner.lock().releasing -= 1;
}

/// Removes a dead region's notifier (waiting out running callbacks) and
/// drops whatever it still maps. Not to be called from a callback.
pub(crate) fn release_slot<B: Backend, H: HostSide>(
    inner: &Inner<B, H>,
    mut slot: RegionSlot<B, H>,
) {
    // Zap first, while the region is still watched and subscribed: a dead
    // region keeps the pages an unmap did not take, and until they are
    // dropped, CPU writes and unmaps there must still reach them.
    // Unwatching first left a window in which a launch read those pages
    // with nothing tracking the CPU's writes to them (stale reads found by
    // `hmm-stress`). Nothing can map pages into the region after this: it
    // is out of `regions`, so faults there make a new one.
    {
        let mut dev = inner.lock_idle();
        // A failed write-back or clear is latched (`Health`): the next
        // launch reports it.
        inner.zap_quietly(&mut dev, slot.range, true);
        dev.res.region_released(slot.key());
        inner.flush_quietly(&mut dev);
    }
    if slot.watched {
        // A watch that cannot be ended is ended by the host's teardown.
        let _ = inner.host.unwatch(slot.range, inner.writes);
    }
    if let Some(sub) = slot.sub.take() {
        // Not inside a callback: this waits until no invalidation can reach
        // the region any more. It fails only if the space is torn down.
        let _ = sub.remove();
    }
    Counters::add(&inner.counters.deferred_releases, 1);
}

/// The deferred-release worker's loop (thread `hmm-release`).
pub(crate) fn release_worker<B: Backend, H: HostSide>(
    owner: Weak<Inner<B, H>>,
    rx: Receiver<ReleaseMsg>,
) {
    while let Ok(msg) = rx.recv() {
        let ReleaseMsg::Region(key) = msg else {
            return;
        };
        let Some(inner) = owner.upgrade() else { return };
        let slot = take_dead(&mut inner.lock(), key.start, Some(key.id));
        if let Some(slot) = slot {
            release_taken(&inner, slot);
        }
    }
}

/// Whether a failed watch was churn (the memory changed under us) rather
/// than the kernel refusing this kind of mapping: a registration that
/// succeeded and could not then be armed, or a registration refused with
/// `EINVAL` (what a hole at that instant gives) of memory that is now
/// anonymous, which userfaultfd always accepts. `EBUSY` (another
/// userfaultfd owns it), `EPERM` (no `VM_MAYWRITE`) and `EINVAL` of
/// special mappings (`[vdso]`, I/O) are refusals.
fn churned(e: &HostError, now: Option<&Mapping>) -> bool {
    match e {
        HostError::Track(_) => true,
        HostError::Monitor(MonitorError::Uffd(UffdError::Ioctl { source, .. })) => {
            source.raw_os_error() == Some(libc::EINVAL)
                && now.is_some_and(|m| match &m.kind {
                    MappingKind::Anonymous => true,
                    MappingKind::Special(s) => {
                        s == "[heap]" || s == "[stack]" || s.starts_with("[anon:")
                    }
                    MappingKind::File { .. } => false,
                })
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::write_track::TrackError;

    fn mapping(kind: MappingKind) -> Mapping {
        Mapping {
            range: VaRange::new(VirtAddr(0x10000), VirtAddr(0x20000)).unwrap(),
            read: true,
            write: true,
            exec: false,
            shared: false,
            kind,
        }
    }

    fn register_failed(errno: i32) -> HostError {
        HostError::Monitor(MonitorError::Uffd(UffdError::Ioctl {
            op: "UFFDIO_REGISTER",
            range: VaRange::new(VirtAddr(0x10000), VirtAddr(0x11000)).unwrap(),
            source: std::io::Error::from_raw_os_error(errno),
        }))
    }

    #[test]
    fn churn_is_told_from_a_refusal() {
        let anon = mapping(MappingKind::Anonymous);
        let heap = mapping(MappingKind::Special("[heap]".into()));
        let vdso = mapping(MappingKind::Special("[vdso]".into()));
        // Registered, then the arm found other memory: churn.
        assert!(churned(
            &HostError::Track(TrackError::MonitorGone),
            Some(&anon)
        ));
        // A hole at the instant of the ioctl, anonymous memory now: churn.
        assert!(churned(&register_failed(libc::EINVAL), Some(&anon)));
        assert!(churned(&register_failed(libc::EINVAL), Some(&heap)));
        // Refusals: a special mapping, another owner, no VM_MAYWRITE, gone.
        assert!(!churned(&register_failed(libc::EINVAL), Some(&vdso)));
        assert!(!churned(&register_failed(libc::EBUSY), Some(&anon)));
        assert!(!churned(&register_failed(libc::EPERM), Some(&anon)));
        assert!(!churned(&register_failed(libc::EINVAL), None));
    }
}
