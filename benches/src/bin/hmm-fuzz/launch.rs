//! One fuzzed launch against the oracle: oversized launches, launches
//! with valid and invalid arguments, the checks of what they changed, and
//! refused write-backs still pending on the device.

use super::*;

impl Fuzz {
    /// A launch past the device's invocation limit (`max + 1`,
    /// `u32::MAX`, or between): exactly `TooManyInvocations { n, max }`
    /// whatever the arguments (checked before anything else, a pending
    /// refusal included), and nothing changes.
    pub(crate) fn oversized(&mut self) -> Result<(), Fail> {
        let max = self.mirror.max_invocations();
        let Some(first) = max.checked_add(1) else {
            return Ok(());
        };
        let n = match self.rng.random_range(0..3) {
            0 => first,
            1 => u32::MAX,
            _ => self.rng.random_range(first..=u32::MAX),
        };
        let out = self.pick_arg(64, false, None);
        let inp = self.pick_arg(64, false, Some(&out));
        let key: u32 = self.rng.random();
        let d = format!(
            "launch n={n} (max_invocations {max}) key={key:#x} in=[{}] out=[{}]",
            self.arg_desc(&inp),
            self.arg_desc(&out)
        );
        self.note(d);
        if self.verbose {
            println!("{}", self.desc);
        }
        self.c.launches += 1;
        let words = [inp.addr(), out.addr(), u64::from(key)];
        let (mirror, kernel) = (&self.mirror, &self.kernel);
        let res = catch_unwind(AssertUnwindSafe(|| mirror.launch(kernel, n, words)))
            .map_err(|_| "launch panicked (message above)".to_string())?;
        match res {
            Err(MirrorError::TooManyInvocations { n: got, max: m }) if (got, m) == (n, max) => {
                *self.c.errors.entry("TooManyInvocations".into()).or_default() += 1;
            }
            r => {
                return Err(format!(
                    "a launch of {n} invocations (limit {max}) must be TooManyInvocations {{ n: {n}, max: {max} }}, got {r:?}"
                ))
            }
        }
        self.check_unchanged(&inp)?;
        self.check_unchanged(&out)
    }

    pub(crate) fn launch(&mut self, n: u32, inp: Arg, out: Arg, key: u32) -> Result<(), Fail> {
        let bytes = u64::from(n) * 4;
        // What the case allows.
        let mut ok_allowed = true;
        // (reason, write, start, len): a DeviceFault that fits.
        let mut faults: Vec<(AccessError, bool, u64, u64)> = Vec::new();
        let mut refusable: Option<u64> = None;
        for (arg, write) in [(&inp, false), (&out, true)] {
            let p = arg.addr();
            let mut f = |r: AccessError| faults.push((r, write, p, bytes));
            match arg {
                Arg::Buf { id, off, .. } => {
                    let b = self.buf(*id);
                    if off % 4 != 0 {
                        ok_allowed = false;
                        f(AccessError::Misaligned);
                    }
                    // Whether it may succeed: by the protection the CPU
                    // has now (untold, the device may still read its copy
                    // of `PROT_NONE` memory, and its writes to memory that
                    // refuses them are refused at write-back).
                    match (b.prot, write) {
                        (Prot::Rw, _) | (Prot::Ro, false) => {}
                        (Prot::None, false) => ok_allowed &= !b.told,
                        (Prot::Ro | Prot::None, true) => {
                            ok_allowed = false;
                            if !b.told {
                                refusable = Some(*id);
                            }
                        }
                    }
                    // How it may fail: by any protection the mirror may
                    // believe (widened untold, it may keep the narrower
                    // access it had).
                    for &p in &b.history {
                        match (p, write) {
                            (Prot::Rw, _) | (Prot::Ro, false) => {}
                            (Prot::Ro, true) => f(AccessError::ReadOnly),
                            (Prot::None, false) => f(AccessError::NoAccess),
                            (Prot::None, true) => {
                                f(AccessError::NoAccess);
                                f(AccessError::ReadOnly);
                            }
                        }
                    }
                }
                Arg::Freed(_) | Arg::Never(_) | Arg::Kernel(_) | Arg::Null(_) => {
                    ok_allowed = false;
                    f(AccessError::Unmapped);
                }
            }
        }
        if n == 0 {
            ok_allowed = true;
            faults.clear();
            refusable = None;
        }
        // A refusal pending on memory that still refuses: reported again,
        // before anything runs.
        let refusing = self.pending.as_ref().and_then(|p| {
            let b = self.buf(p.id);
            (b.prot != Prot::Rw).then(|| b.range())
        });
        let pending_ready = self.pending.is_some() && refusing.is_none();
        let pend_certain = self.pending.as_ref().is_some_and(|p| p.certain);

        // The values the kernel would write, if both arguments are aligned
        // buffers.
        let new: Option<Vec<u32>> = match (&inp, &out) {
            (Arg::Buf { id, off, .. }, Arg::Buf { off: ooff, .. })
                if off % 4 == 0 && ooff % 4 == 0 =>
            {
                let b = self.buf(*id);
                let w0 = (off / 4) as usize;
                Some(
                    (0..n)
                        .map(|i| mix(key, i, b.shadow[w0 + i as usize]))
                        .collect(),
                )
            }
            _ => None,
        };

        self.c.launches += 1;
        self.c.n_max = self.c.n_max.max(n);
        let words = [inp.addr(), out.addr(), u64::from(key)];
        let (mirror, kernel) = (&self.mirror, &self.kernel);
        let res =
            catch_unwind(AssertUnwindSafe(|| mirror.launch(kernel, n, words))).map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                format!("launch panicked: {msg}")
            })?;

        let inside = |a: u64, s: u64, l: u64| a.wrapping_sub(s) < l;
        let fail = |why: String| -> Result<(), Fail> { Err(why) };
        let mut refused_now = false;
        let mut refused_pending = false;
        match (&res, refusing) {
            (Err(MirrorError::WriteBackRefused { addr }), Some((s, l)))
                if pend_certain && inside(addr.0, s, l) =>
            {
                // Nothing ran: everything must be unchanged.
                self.check_unchanged(&inp)?;
                self.check_unchanged(&out)?;
                *self.c.errors.entry("WriteBackRefused (pending)".into()).or_default() += 1;
                return Ok(());
            }
            (Err(MirrorError::WriteBackRefused { addr }), Some((s, l))) if inside(addr.0, s, l) => {
                // The refusal that may have been kept is reported now.
                refused_pending = true;
            }
            (r, Some(_)) if pend_certain => {
                return fail(format!(
                    "a refused write-back is pending on read-only memory; expected WriteBackRefused naming it, got {r:?}"
                ))
            }
            (Ok(_), _) if !ok_allowed => {
                return fail(format!(
                    "Ok, but the case allows only {faults:?}{}",
                    if refusable.is_some() { " or WriteBackRefused" } else { "" }
                ))
            }
            (Ok(_), _) => {}
            (Err(MirrorError::DeviceFault { addr, write, reason }), _)
                if faults
                    .iter()
                    .any(|&(r, w, s, l)| r == *reason && w == *write && inside(addr.0, s, l)) => {}
            (Err(MirrorError::WriteBackRefused { addr }), _)
                if refusable.is_some_and(|id| {
                    let (s, l) = self.buf(id).range();
                    inside(addr.0, s, l)
                }) =>
            {
                refused_now = true;
            }
            (Err(e), _) => {
                return fail(format!(
                    "unexpected error {e:?} ({e}); the case allows {}{faults:?}{}",
                    if ok_allowed { "Ok, " } else { "" },
                    if refusable.is_some() { " or WriteBackRefused" } else { "" }
                ))
            }
        }
        if refusing.is_some() && !pend_certain {
            if refused_pending {
                self.pending.as_mut().expect("pending").certain = true;
            } else {
                // Not reported: the device kept nothing.
                self.pending = None;
            }
        }
        match &res {
            Ok(_) => self.c.ok += 1,
            Err(e) => *self.c.errors.entry(err_name(e)).or_default() += 1,
        }
        let ok = res.is_ok();

        // The output: new values where the launch succeeded; old or new
        // where it failed (completed invocations' writes may have landed).
        if let Arg::Buf { id, off, .. } = &out {
            let (id, w0) = (*id, (*off / 4) as usize);
            let aligned = off % 4 == 0;
            let b = self.buf(id);
            let writable = b.prot == Prot::Rw;
            if b.prot != Prot::None {
                for j in 0..b.words {
                    let got = b.read(j);
                    let old = b.shadow[j];
                    let in_out = aligned && n > 0 && (w0..w0 + n as usize).contains(&j);
                    let want = new.as_ref().filter(|_| in_out).map(|v| v[j - w0]);
                    let good = if ok && in_out {
                        Some(got) == want
                    } else if in_out && writable {
                        got == old || Some(got) == want
                    } else {
                        got == old
                    };
                    if !good {
                        return fail(format!(
                            "{} output word {j} ({:#x}) of {}: CPU holds {got:#x}, expected {}{}",
                            if ok { "Ok, but" } else { "after the error," },
                            b.addr + j as u64 * 4,
                            b.describe(),
                            match want {
                                Some(w) if ok => format!("{w:#x}"),
                                Some(w) => format!("{old:#x} or {w:#x}"),
                                None => format!("{old:#x} (unchanged)"),
                            },
                            if let Err(e) = &res {
                                format!(" ({e})")
                            } else {
                                String::new()
                            }
                        ));
                    }
                }
                let b = self.buf_mut(id);
                for j in 0..b.words {
                    b.shadow[j] = b.read(j);
                }
            }
            let fault = matches!(res, Err(MirrorError::DeviceFault { .. }));
            if refused_now || (fault && refusable == Some(id) && aligned) {
                let old = self.buf(id).shadow[w0..w0 + n as usize].to_vec();
                self.pending = Some(Pending {
                    id,
                    certain: refused_now,
                    w0,
                    old,
                    new: new.clone().filter(|_| aligned),
                });
            }
        }
        // The input, unless it is the output.
        if !matches!((&inp, &out), (Arg::Buf { id: a, .. }, Arg::Buf { id: b, .. }) if a == b) {
            self.check_unchanged(&inp)?;
        }
        // One other buffer.
        if !self.bufs.is_empty() {
            let i = self.rng.random_range(0..self.bufs.len());
            let id = self.bufs[i].id;
            let involved = [&inp, &out]
                .iter()
                .any(|a| matches!(a, Arg::Buf { id: x, .. } if *x == id));
            if !involved && self.pending.as_ref().is_none_or(|p| p.id != id) {
                self.check_unchanged(&Arg::Buf {
                    id,
                    addr: 0,
                    off: 0,
                })?;
            }
        }
        if pending_ready {
            self.settle_pending("the next launch after widening")?;
        }
        self.recover = !ok;
        Ok(())
    }

    /// Every readable word of the buffer `a` names equals its shadow.
    pub(crate) fn check_unchanged(&self, a: &Arg) -> Result<(), Fail> {
        let Arg::Buf { id, .. } = a else {
            return Ok(());
        };
        if self.pending.as_ref().is_some_and(|p| p.id == *id) {
            // Checked when it settles.
            return Ok(());
        }
        let b = self.buf(*id);
        if b.prot == Prot::None {
            return Ok(());
        }
        match b.first_changed(|_| true) {
            Some((j, got)) => Err(format!(
                "word {j} ({:#x}) of {} changed: CPU holds {got:#x}, expected {:#x} (the launch did not write it)",
                b.addr + j as u64 * 4,
                b.describe(),
                b.shadow[j]
            )),
            None => Ok(()),
        }
    }

    /// The pending buffer is writable again and the mirror has had its
    /// chance to write the kept data: the CPU must hold it.
    pub(crate) fn settle_pending(&mut self, when: &str) -> Result<(), Fail> {
        let p = self.pending.take().expect("pending");
        let b = self.buf(p.id);
        let range = p.w0..p.w0 + p.old.len();
        if let Some((j, got)) = b.first_changed(|j| !range.contains(&j)) {
            return Err(format!(
                "after {when}: word {j} ({:#x}) of {} holds {got:#x}, expected {:#x} (outside the refused write)",
                b.addr + j as u64 * 4,
                b.describe(),
                b.shadow[j]
            ));
        }
        // Each word of the refused output: the device's write (kept and
        // now delivered) or the old value (an invocation that had not run
        // when the launch ended) — nothing else.
        let mut delivered = false;
        for j in range.clone() {
            let (got, old) = (b.read(j), p.old[j - p.w0]);
            let new = p.new.as_ref().map(|v| v[j - p.w0]);
            delivered |= Some(got) == new && got != old;
            if got != old && Some(got) != new {
                return Err(format!(
                    "after {when}: word {j} ({:#x}) of the refused write to {} holds {got:#x}: neither the old {old:#x} nor the device's {:?}; the mirror {} the refusal",
                    b.addr + j as u64 * 4,
                    b.describe(),
                    new.map(|v| format!("{v:#x}")),
                    if p.certain { "reported" } else { "had not reported" }
                ));
            }
        }
        if p.certain && p.new.is_some() && !delivered {
            // Reported as kept: some page of it must have arrived.
            return Err(format!(
                "after {when}: the write-back refused (and reported as kept) to {} never arrived: the CPU holds the old values",
                b.describe()
            ));
        }
        let b = self.buf_mut(p.id);
        for j in 0..b.words {
            b.shadow[j] = b.read(j);
        }
        Ok(())
    }
}
