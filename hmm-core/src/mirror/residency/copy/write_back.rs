//! Write-back of device-dirty pages: the twin/diff runs of one staging
//! batch ([`CopyPool::write_back_chunk`]), retried once, the device
//! declared lost when it cannot give its data back.

use super::*;

impl CopyPool {
    /// [`Residency::write_back`] for at most `STAGE_PAGES` pages.
    pub(super) fn write_back_chunk<B: Backend, H: HostSide>(
        &mut self,
        cx: &mut Cx<'_, B, H>,
        pages: &[(VirtAddr, Pte)],
    ) -> Result<u64, MirrorError> {
        let cand: Vec<(VirtAddr, PteLoc, PoolSlot)> = pages
            .iter()
            .filter(|(_, p)| p.writable())
            .filter_map(|(va, p)| cx.table.leaf_loc(*va).map(|l| (*va, l, p.slot())))
            .collect();
        if cand.is_empty() {
            return Ok(0);
        }
        // A few pages, each with a twin, on a device where asking costs a
        // round trip (`rounds_are_costly`: the GPU drivers): no need to ask
        // which pages the device wrote. Every one is read back and
        // compared with its twin, and a page the device did not write
        // equals it and writes nothing — while reading DIRTY costs a GPU
        // driver a device round trip, about what the whole floor launch
        // costs on lavapipe. Their DIRTY bits stay as they are: a bit left
        // set only means the page is compared again next time. A page
        // without a twin (pinned) must not be written back unless the
        // device wrote it. Where reading DIRTY is a memory read (the cpu
        // driver), comparing 32 pages would cost more than it saves.
        let compare_all = cand.len() <= COMPARE_ALL_PAGES
            && cx.backend.rounds_are_costly()
            && cand.iter().all(|c| self.twins.get(c.2).is_some());
        let (dirty, dirty_ptes): (Vec<(VirtAddr, PteLoc, PoolSlot)>, Vec<Pte>) = if compare_all {
            (cand, Vec::new())
        } else {
            let locs: Vec<PteLoc> = cand.iter().map(|c| c.1).collect();
            // Read DIRTY, copy, and only then clear it: a failed copy must
            // not leave the pages marked clean. (The device is idle here,
            // so no write can land between the copy and the clear.) Both
            // device calls are retried once; a device that cannot give
            // back the data it holds is lost, and the loss is reported,
            // never skipped.
            let mut old = Vec::with_capacity(locs.len());
            if let Err(e) = retry_once(|| {
                old.clear();
                cx.backend.read_ptes(&locs, &mut old)
            }) {
                return Err(lost(cx, "reading dirty bits for write-back", e));
            }
            cand.iter()
                .zip(&old)
                .filter(|(_, p)| p.dirty())
                .map(|((va, loc, _), p)| ((*va, *loc, p.slot()), *p))
                .unzip()
        };
        if dirty.is_empty() {
            return Ok(0);
        }
        // A host-addressable pool is read in place; otherwise the pages
        // come out through the staging buffer.
        let direct: Option<Vec<*const u8>> = dirty
            .iter()
            .map(|(_, _, s)| cx.backend.host_slot(*s).map(|p| p.as_ptr().cast_const()))
            .collect();
        if direct.is_none() {
            let staging = &mut self.staging;
            let batch: Vec<DeviceToHost> = dirty
                .iter()
                .enumerate()
                .map(|(i, (_, _, slot))| DeviceToHost {
                    slot: *slot,
                    dst: staging[i * PAGE..].as_mut_ptr(),
                })
                .collect();
            // SAFETY: each `dst` is a distinct 4 KiB chunk of `staging`,
            // which we hold mutably and which outlives the call; launches
            // are serialised and the device is idle for these slots
            // (callers waited for the in-flight submission or run between
            // submissions).
            if let Err(e) = retry_once(|| unsafe { cx.backend.copy_to_host(&batch) }) {
                return Err(lost(cx, "copying dirty pages back", e));
            }
        }
        let staging = &self.staging;
        let pages: Vec<&[u8]> = match &direct {
            Some(ptrs) => ptrs
                .iter()
                // SAFETY: 4 KiB per slot vouched for by the backend
                // (`host_slot`); the device is idle for these slots (as for
                // `copy_to_host` above), so nothing writes them while these
                // borrows live, which end before this function returns.
                .map(|p| unsafe { std::slice::from_raw_parts(*p, PAGE) })
                .collect(),
            None => staging.chunks_exact(PAGE).take(dirty.len()).collect(),
        };
        // Only the bytes the device changed go back, in batches of at most
        // `RUN_BATCH` runs: a byte-exact diff of a page of small integers
        // written over zeros is ~2,000 runs, and holding a whole chunk's
        // (512 pages) would cost ~50 MB of run lists.
        // Per page: no runs (equal to its twin), all written, some gone
        // (its memory went away: nothing to keep), or some refused (its
        // memory is there but not writable: the data must stay).
        #[derive(Clone, Copy, PartialEq)]
        enum Fate {
            Same,
            Written,
            Gone,
            Refused(VirtAddr),
        }
        let mut fate = vec![Fate::Same; dirty.len()];
        let mut runs: Vec<(VirtAddr, &[u8])> = Vec::new();
        let mut run_page: Vec<usize> = Vec::new();
        let mut fates = Vec::new();
        let mut flush = |runs: &mut Vec<(VirtAddr, &[u8])>, run_page: &mut Vec<usize>| {
            fates.clear();
            cx.host.write_runs_checked(runs, &mut fates);
            for (k, f) in fates.iter().enumerate() {
                let p = &mut fate[run_page[k]];
                *p = match (*p, *f) {
                    (Fate::Refused(a), _) => Fate::Refused(a),
                    (_, RunFate::Refused(a)) => Fate::Refused(a),
                    (Fate::Gone, _) | (_, RunFate::Gone) => Fate::Gone,
                    _ => Fate::Written,
                };
            }
            runs.clear();
            run_page.clear();
        };
        let mut diff = Vec::new();
        for (i, (va, _, slot)) in dirty.iter().enumerate() {
            let page = pages[i];
            diff.clear();
            match self.twins.get(*slot) {
                Some(t) => hostcopy::diff_runs(t, page, &mut diff),
                // No twin (pinned pages): the whole page.
                None => diff.push((0, PAGE)),
            }
            for (off, len) in &diff {
                runs.push((VirtAddr(va.0 + *off as u64), &page[*off..*off + *len]));
                run_page.push(i);
            }
            if runs.len() >= RUN_BATCH {
                flush(&mut runs, &mut run_page);
            }
        }
        if !runs.is_empty() {
            flush(&mut runs, &mut run_page);
        }
        // The data is out where it could go: clear DIRTY on those pages
        // (not on refused ones, which must be written again). A DIRTY bit
        // left set only means the page is compared with its twin again
        // next time (an equal page writes nothing), so a failure here
        // costs time, not data. The device is idle, so no write can land
        // between the copy and the clear, and no access can change an
        // entry since it was read: the clear is a plain entry write of the
        // value read, less DIRTY — which a driver may stage for its next
        // submission (wgpu does) — rather than an atomic read-and-clear,
        // which costs a GPU driver a device round trip of its own.
        let clears: Vec<PteWrite> = dirty
            .iter()
            .zip(&dirty_ptes)
            .zip(&fate)
            .filter(|(_, f)| !matches!(f, Fate::Refused(_)))
            .map(|((d, p), _)| PteWrite {
                table: d.1.table,
                index: d.1.index,
                pte: Pte(p.0 & !DIRTY),
            })
            .collect();
        // Not a reason to fail the write-back (see above), but counted: a
        // device error is never dropped unseen.
        if !clears.is_empty() {
            let cleared = Counters::timed(&cx.counters.page_table_ns, || {
                cx.backend.write_ptes(&clears)
            });
            if cleared.is_err() {
                Counters::add(&cx.counters.device_errors, 1);
            }
        }
        let mut first_refusal = None;
        for (i, (va, _, slot)) in dirty.iter().enumerate() {
            match fate[i] {
                Fate::Refused(a) => {
                    // Keep the twin as it was: the next try diffs against
                    // what the CPU last got.
                    self.refused.insert(*va);
                    first_refusal.get_or_insert(a);
                }
                _ => {
                    if self.refused.remove(va) {
                        // It was refused before and is written now: the
                        // mapping's permissions changed since the fresh
                        // look that saw the refusal, so that look must not
                        // be trusted any more.
                        if let Ok(page) = VaRange::from_start_len(*va, PAGE_SIZE) {
                            cx.host.forget_mappings(page);
                        }
                    }
                    if self.twins.get(*slot).is_some() {
                        self.twins.set(*slot, pages[i]);
                    }
                }
            }
        }
        // Our own write is not a CPU write: re-protect the pages so the next
        // sync point does not drop the copies it just made equal. Protect
        // first, then read the pages back: a CPU write after the protection
        // is reported by the next sync point anyway, and one that landed
        // between our write and the protection (the CPU wrote other bytes of
        // the page during the launch) shows as a difference — those device
        // copies are stale and are dropped right here. (Verifying before
        // protecting, as this code once did, lost a CPU write landing
        // between the two.) A failed re-arm leaves the pages reported as
        // written: their copies are dropped at the next sync point, which
        // is merely conservative. Pages whose memory went away read back
        // as failed and are dropped too; refused ones are left alone.
        let touched: Vec<usize> = (0..dirty.len())
            .filter(|&i| matches!(fate[i], Fate::Written | Fate::Gone))
            .collect();
        let check: Vec<VirtAddr> = touched.iter().map(|&i| dirty[i].0).collect();
        if !self.hash_all {
            let _ = cx.host.rearm(&check);
        }
        let mut vok = Vec::new();
        cx.host.read_pages(&check, &mut self.verify, &mut vok);
        let is_stale: Vec<bool> = touched
            .iter()
            .enumerate()
            .map(|(k, &i)| !vok[k] || self.verify[k * PAGE..(k + 1) * PAGE] != *pages[i])
            .collect();
        let stale: Vec<VirtAddr> = touched
            .iter()
            .zip(&is_stale)
            .filter(|(_, s)| **s)
            .map(|(&i, _)| dirty[i].0)
            .collect();
        // A checked page read back equal to the device's copy: the CPU page
        // is now what the device holds, so that is what the next sync
        // point's hash check compares against (the device's own write is
        // not a foreign one). Stale pages are dropped below, hash and all.
        for (&i, _) in touched.iter().zip(&is_stale).filter(|(_, s)| !**s) {
            let slot = dirty[i].2;
            if self.hashes.get(slot).is_some() {
                self.hashes.set(slot, pages[i]);
            }
        }
        // Only pages that reached the CPU count as written back.
        let n = fate.iter().filter(|f| **f == Fate::Written).count() as u64;
        Counters::add(&cx.counters.pages_out, n);
        for va in stale {
            let page = VaRange::from_start_len(va, PAGE_SIZE)?;
            // Already written back: drop without writing again.
            zap(cx, self, page, false)?;
        }
        match first_refusal {
            Some(addr) => Err(MirrorError::WriteBackRefused { addr }),
            None => Ok(n),
        }
    }
}

/// Runs a device call, and once more if it fails.
fn retry_once(mut f: impl FnMut() -> Result<(), BackendError>) -> Result<(), BackendError> {
    f().or_else(|_| f())
}

/// Declares the device lost: it holds data it cannot give back.
fn lost<B: Backend, H: HostSide>(
    cx: &mut Cx<'_, B, H>,
    what: &str,
    e: BackendError,
) -> MirrorError {
    Counters::add(&cx.counters.device_errors, 1);
    cx.health.lose(format!(
        "{what} failed twice ({e}); device-written data not yet on the CPU is lost"
    ))
}
