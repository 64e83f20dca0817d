//! Migrated pages: pool slots that hold the only copy of a page
//! (device-private migration, `mirror::migrate`).
//!
//! A migrated page is an ordinary mapped page of the pool plus a mark
//! (`CopyPool::migrated`): its CPU side is a hole that traps. The mark
//! changes what the shared paths do with it:
//!
//! - the end-of-launch write-back skips it (there is no CPU copy to
//!   update, and touching the hole from under the driver lock would wait
//!   on the fault-back server, which needs that lock);
//! - a zap that writes back (eviction, a protection change, a region's
//!   release, teardown) gives it back first ([`CopyPool::give_back_pages`],
//!   `UFFDIO_COPY`), and keeps its entry if that fails — nothing is lost;
//! - a destructive event discards it (`munmap`, `MADV_DONTNEED`: the data
//!   is gone, as it would be on the CPU), except an `mremap`, after which
//!   its slot is kept as an *orphan* (`CopyPool::orphans`), re-keyed to the
//!   new address, and given back from there when the CPU touches it.

use super::*;

impl CopyPool {
    /// [`Residency::adopt_migrated`]: `bytes` into the slots of `range`'s
    /// pages, then the marks.
    pub(super) fn adopt<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        range: VaRange,
        bytes: &[u8],
    ) -> Result<u64, MirrorError> {
        let mut pages = Vec::new();
        let mut marks = Vec::with_capacity(range.pages() as usize);
        for (k, va) in range.page_addrs().enumerate() {
            if self.migrated.contains(&va) {
                // Already the only copy: the move found a hole there, and
                // its zeros must not overwrite the device's data.
                continue;
            }
            match cx.table.lookup(va) {
                Some(p) if p.writable() => {
                    // The slot holds what the twin says (written back at
                    // every launch's end): only a page the CPU wrote since
                    // is copied again, into its own (idle) slot.
                    let same = self
                        .twins
                        .get(p.slot())
                        .is_some_and(|t| t == &bytes[k * PAGE..(k + 1) * PAGE]);
                    if !same {
                        pages.push((va, p.slot(), k));
                    }
                    marks.push(va);
                }
                _ => {
                    return Err(MirrorError::MigrationUnsupported(format!(
                        "page {va} is not resident writable on the device (pool too small for the range?)"
                    )))
                }
            }
        }
        for chunk in pages.chunks(STAGE_PAGES) {
            let batch: Vec<HostToDevice> = chunk
                .iter()
                .map(|(_, s, k)| HostToDevice {
                    slot: *s,
                    src: bytes[k * PAGE..].as_ptr(),
                })
                .collect();
            let t = std::time::Instant::now();
            // SAFETY: each `src` is a 4 KiB chunk of `bytes`, alive and
            // unmodified for the call; the caller holds the launch lock
            // and waited for the device (`lock_idle`), so no device work
            // uses the slots.
            let r = unsafe { cx.backend.copy_to_device(&batch) };
            Counters::add_since(&cx.counters.copy_in_ns, t);
            r?;
        }
        for (_, s, k) in &pages {
            if self.twins.get(*s).is_some() {
                self.twins.set(*s, &bytes[k * PAGE..(k + 1) * PAGE]);
            }
        }
        for va in &marks {
            self.migrated.insert(*va);
        }
        Ok(marks.len() as u64)
    }

    /// [`Residency::give_back`]: reads the migrated pages among `pages`
    /// (mapped or orphaned) out of their slots and installs them in CPU
    /// memory, in runs of consecutive pages.
    pub(super) fn give_back_pages<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        pages: &[VirtAddr],
    ) -> Result<u64, MirrorError> {
        // (page, slot, orphaned)
        let todo: Vec<(VirtAddr, PoolSlot, bool)> = pages
            .iter()
            .filter_map(|va| {
                if self.migrated.contains(va) {
                    cx.table.lookup(*va).map(|p| (*va, p.slot(), false))
                } else {
                    self.orphans.get(va).map(|s| (*va, *s, true))
                }
            })
            .collect();
        let mut given = 0;
        for chunk in todo.chunks(STAGE_PAGES) {
            let batch: Vec<DeviceToHost> = chunk
                .iter()
                .enumerate()
                .map(|(i, (_, slot, _))| DeviceToHost {
                    slot: *slot,
                    dst: self.staging[i * PAGE..].as_mut_ptr(),
                })
                .collect();
            // SAFETY: each `dst` is a distinct 4 KiB chunk of `staging`,
            // held mutably and alive for the call; the device is idle for
            // these slots (callers hold the driver lock with no submission
            // in flight).
            let r = unsafe { cx.backend.copy_to_host(&batch) }.or_else(|_| unsafe {
                // SAFETY: as above; one retry.
                cx.backend.copy_to_host(&batch)
            });
            if let Err(e) = r {
                Counters::add(&cx.counters.device_errors, 1);
                return Err(cx.health.lose(format!(
                    "reading migrated pages back failed twice ({e}); their only copy is on the device"
                )));
            }
            // Runs of consecutive pages: one `UFFDIO_COPY` each, page by
            // page where a run is refused as a whole.
            let mut i = 0;
            while i < chunk.len() {
                let mut j = i + 1;
                while j < chunk.len() && chunk[j].0 .0 == chunk[j - 1].0 .0 + PAGE_SIZE {
                    j += 1;
                }
                let data = &self.staging[i * PAGE..j * PAGE];
                // Held across the installs: a destructive event (the
                // program discarding or unmapping the memory) that finds
                // the driver lock held queues its zap here before the
                // kernel zaps the pages. A page it covers is not given
                // back (the zap, applied by the next holder, drops it), and
                // one given back before it is zapped after it: either way
                // the program never sees the old data in memory it
                // discarded. A queued move covers the old addresses of
                // moved pages: they wait to be re-keyed.
                let queued = crate::sync::lock(cx.pending);
                let run = VaRange::new(chunk[i].0, VirtAddr(chunk[j - 1].0 .0 + PAGE_SIZE))?;
                let covered = |va: VirtAddr| queued.iter().any(|z| z.range.contains(va));
                let mut skipped = Vec::new();
                if queued.iter().any(|z| z.range.overlaps(run)) {
                    for (k, (va, _, _)) in chunk.iter().enumerate().take(j).skip(i) {
                        if covered(*va)
                            || cx
                                .host
                                .give_back(*va, &self.staging[k * PAGE..(k + 1) * PAGE])
                                == GiveBack::Busy
                        {
                            skipped.push(*va);
                        }
                    }
                } else {
                    match cx.host.give_back(chunk[i].0, data) {
                        GiveBack::Installed => {}
                        GiveBack::Busy if j - i == 1 => skipped.push(chunk[i].0),
                        _ if j - i > 1 => {
                            for (k, (va, _, _)) in chunk.iter().enumerate().take(j).skip(i) {
                                if cx
                                    .host
                                    .give_back(*va, &self.staging[k * PAGE..(k + 1) * PAGE])
                                    == GiveBack::Busy
                                {
                                    skipped.push(*va);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                drop(queued);
                // Installed, already present or gone: the CPU side no
                // longer needs the device's copy to be the only one. (A
                // skipped page stays marked until its queued zap drops it;
                // one refused for now, `Busy` — on the event monitor's
                // reader, which may not wait — stays held for a later
                // fault.)
                for (k, &(va, slot, orphaned)) in chunk.iter().enumerate().take(j).skip(i) {
                    if skipped.contains(&va) {
                        continue;
                    }
                    if orphaned {
                        self.orphans.remove(&va);
                        self.orphan_slots.remove(&slot);
                        self.quarantine.insert(slot);
                    } else {
                        self.migrated.remove(&va);
                        if self.twins.get(slot).is_some() {
                            self.twins
                                .set(slot, &self.staging[k * PAGE..(k + 1) * PAGE]);
                        }
                    }
                    given += 1;
                }
                i = j;
            }
        }
        Counters::add(&cx.counters.migrated_in, given);
        Ok(given)
    }

    /// [`Residency::settle_given`]: `va`, given back by the event
    /// monitor's reader, loses its migrated mark and its twin (if any)
    /// takes the slot's data — what the reader installed. `false` if it
    /// is not marked (discarded or moved since).
    pub(super) fn settle_given_page<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        va: VirtAddr,
    ) -> Result<bool, MirrorError> {
        if !self.migrated.contains(&va) {
            return Ok(false);
        }
        let Some(slot) = cx.table.lookup(va).map(|p| p.slot()) else {
            return Ok(false);
        };
        if self.twins.get(slot).is_some() {
            let batch = [DeviceToHost {
                slot,
                dst: self.staging.as_mut_ptr(),
            }];
            // SAFETY: `dst` is the first 4 KiB of `staging`, held mutably
            // and alive for the call; the device is idle for the slot
            // (callers hold the driver lock with no submission in flight).
            unsafe { cx.backend.copy_to_host(&batch) }?;
            self.twins.set(slot, &self.staging[..PAGE]);
        }
        self.migrated.remove(&va);
        Counters::add(&cx.counters.migrated_in, 1);
        Ok(true)
    }

    /// [`Residency::migrated_in`].
    pub(super) fn migrated_pages(&self, r: VaRange) -> Vec<VirtAddr> {
        let mut v: Vec<VirtAddr> = self
            .migrated
            .range(r.start()..r.end())
            .copied()
            .chain(self.orphans.range(r.start()..r.end()).map(|(va, _)| *va))
            .collect();
        v.sort_unstable();
        v
    }

    /// [`Residency::discarded`].
    pub(super) fn discard(&mut self, table: &ShadowTable, range: VaRange, moved: bool) {
        let hit: Vec<VirtAddr> = self
            .migrated
            .range(range.start()..range.end())
            .copied()
            .collect();
        for va in hit {
            self.migrated.remove(&va);
            if moved {
                if let Some(p) = table.lookup(va) {
                    self.orphans.insert(va, p.slot());
                    self.orphan_slots.insert(p.slot());
                }
            }
        }
        if !moved {
            // Orphans whose memory is now gone too.
            let gone: Vec<(VirtAddr, PoolSlot)> = self
                .orphans
                .range(range.start()..range.end())
                .map(|(a, s)| (*a, *s))
                .collect();
            for (va, s) in gone {
                self.orphans.remove(&va);
                self.orphan_slots.remove(&s);
                self.quarantine.insert(s);
            }
        }
    }

    /// [`Residency::moved`]: orphans of `old` are re-keyed to `to`.
    pub(super) fn move_orphans(&mut self, old: VaRange, to: VirtAddr) {
        let hit: Vec<(VirtAddr, PoolSlot)> = self
            .orphans
            .range(old.start()..old.end())
            .map(|(a, s)| (*a, *s))
            .collect();
        for (va, _) in &hit {
            self.orphans.remove(va);
        }
        for (va, s) in hit {
            let off = va.0 - old.start().0;
            self.orphans.insert(VirtAddr(to.0.wrapping_add(off)), s);
        }
    }
}
