//! The fuzzer's buffers (their protection, backing and the words the
//! oracle expects in them) and the host operations it runs between
//! launches: allocate, free, `mprotect`, remap, and picking arguments.

use super::*;

// ---- buffers ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prot {
    Rw,
    Ro,
    None,
}

impl Prot {
    pub(crate) fn bits(self) -> i32 {
        match self {
            Prot::Rw => libc::PROT_READ | libc::PROT_WRITE,
            Prot::Ro => libc::PROT_READ,
            Prot::None => libc::PROT_NONE,
        }
    }
}

pub(crate) enum Backing {
    /// An anonymous mapping of `len` bytes.
    Mmap { len: u64 },
    /// A `Vec` (malloc'd; never `mprotect`ed: it shares pages with the heap).
    Vec(#[allow(dead_code)] Vec<u32>),
}

pub(crate) struct Buf {
    pub(crate) id: u64,
    pub(crate) addr: u64,
    pub(crate) words: usize,
    pub(crate) backing: Backing,
    pub(crate) prot: Prot,
    /// Whether `protection_changed` followed the last `mprotect`.
    pub(crate) told: bool,
    /// Every protection the buffer had since the mirror was last told
    /// (the current one included): untold, the mirror may act on any of
    /// them (its cached view of the mappings is as old as that).
    pub(crate) history: Vec<Prot>,
    /// What the CPU must hold.
    pub(crate) shadow: Vec<u32>,
}

impl Buf {
    pub(crate) fn is_mmap(&self) -> bool {
        matches!(self.backing, Backing::Mmap { .. })
    }
    pub(crate) fn map_len(&self) -> u64 {
        match self.backing {
            Backing::Mmap { len } => len,
            Backing::Vec(_) => self.words as u64 * 4,
        }
    }
    pub(crate) fn read(&self, i: usize) -> u32 {
        assert!(i < self.words && self.prot != Prot::None);
        // SAFETY: inside the buffer, which is mapped and readable.
        unsafe { (self.addr as *const u32).add(i).read_volatile() }
    }
    /// The first word `j` for which `check(j)` holds whose CPU value
    /// differs from the shadow, as `(j, what the CPU holds)`.
    pub(crate) fn first_changed(&self, check: impl Fn(usize) -> bool) -> Option<(usize, u32)> {
        (0..self.words)
            .filter(|&j| check(j))
            .map(|j| (j, self.read(j)))
            .find(|&(j, got)| got != self.shadow[j])
    }
    pub(crate) fn write(&mut self, i: usize, v: u32) {
        assert!(i < self.words && self.prot == Prot::Rw);
        // SAFETY: inside the buffer, which is mapped and writable.
        unsafe { (self.addr as *mut u32).add(i).write_volatile(v) };
        self.shadow[i] = v;
    }
    pub(crate) fn range(&self) -> (u64, u64) {
        (self.addr, self.map_len())
    }
    pub(crate) fn describe(&self) -> String {
        format!(
            "#{} {} {:#x}+{:#x} {:?}{}",
            self.id,
            if self.is_mmap() { "mmap" } else { "vec" },
            self.addr,
            self.map_len(),
            self.prot,
            if self.told {
                String::new()
            } else {
                format!(" (untold; since told: {:?})", self.history)
            }
        )
    }
}

/// A launch argument.
#[derive(Clone, Debug)]
pub(crate) enum Arg {
    /// A buffer of ours at byte offset `off` (misaligned if `off % 4 != 0`).
    Buf { id: u64, addr: u64, off: u64 },
    /// Inside memory we unmapped.
    Freed(u64),
    /// Inside address space nothing maps.
    Never(u64),
    /// Kernel half, non-canonical, or the top of user space.
    Kernel(u64),
    /// Null (or a small address).
    Null(u64),
}

impl Arg {
    pub(crate) fn addr(&self) -> u64 {
        match *self {
            Arg::Buf { addr, off, .. } => addr + off,
            Arg::Freed(a) | Arg::Never(a) | Arg::Kernel(a) | Arg::Null(a) => a,
        }
    }
}

impl Fuzz {
    /// Maps `len` bytes read-write at `at`, or at a random arena address.
    pub(crate) fn arena_map(&mut self, at: Option<u64>, len: u64) -> Option<u64> {
        for _ in 0..32 {
            let a = at.unwrap_or_else(|| {
                ARENA + self.rng.random_range(0..ARENA_PAGES - len / PAGE - 1) * PAGE
            });
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing
            // mapping; the new one is ours.
            let p = unsafe {
                libc::mmap(
                    a as *mut libc::c_void,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                if p as u64 == a {
                    // Freed ranges it overlaps are no longer free.
                    self.freed.retain(|&(s, l)| s + l <= a || a + len <= s);
                    return Some(a);
                }
                // A kernel without MAP_FIXED_NOREPLACE placed it elsewhere.
                // SAFETY: the mapping just made, ours.
                unsafe { libc::munmap(p, len as usize) };
            }
            if at.is_some() {
                return None;
            }
        }
        None
    }

    pub(crate) fn fill(&mut self, words: usize) -> Vec<u32> {
        let s: u32 = self.rng.random();
        (0..words as u32)
            .map(|i| mix(s, i, i.wrapping_mul(0x9e37_79b9)))
            .collect()
    }

    /// A new read-write buffer of at least `words` words.
    pub(crate) fn alloc(&mut self, words: usize, at: Option<u64>) -> Option<u64> {
        let words = words.max(1);
        let id = self.next_id;
        self.next_id += 1;
        let use_vec = at.is_none() && self.rng.random_ratio(1, 4);
        let data = self.fill(words);
        let b = if use_vec {
            let v = data.clone();
            Buf {
                id,
                addr: v.as_ptr() as u64,
                words,
                backing: Backing::Vec(v),
                prot: Prot::Rw,
                told: true,
                history: vec![Prot::Rw],
                shadow: data,
            }
        } else {
            let len = (words as u64 * 4).div_ceil(PAGE).max(1) * PAGE;
            let addr = self.arena_map(at, len)?;
            let words = (len / 4) as usize;
            let mut data = data;
            data.resize(words, 0);
            let mut b = Buf {
                id,
                addr,
                words,
                backing: Backing::Mmap { len },
                prot: Prot::Rw,
                told: true,
                history: vec![Prot::Rw],
                shadow: vec![0; words],
            };
            for (i, v) in data.into_iter().enumerate() {
                b.write(i, v);
            }
            b
        };
        self.bufs.push(b);
        Some(id)
    }

    pub(crate) fn free(&mut self, idx: usize) {
        let b = self.bufs.swap_remove(idx);
        if let Backing::Mmap { len } = b.backing {
            // SAFETY: our own mapping, unmapped once.
            let rc = unsafe { libc::munmap(b.addr as *mut libc::c_void, len as usize) };
            assert_eq!(rc, 0, "munmap");
            if (ARENA..ARENA + ARENA_PAGES * PAGE).contains(&b.addr) {
                self.freed.push((b.addr, len));
                if self.freed.len() > 64 {
                    self.freed.remove(0);
                }
            }
        }
        if self.pending.as_ref().is_some_and(|p| p.id == b.id) {
            // Memory that is gone: the device's kept data is dropped.
            self.pending = None;
        }
    }

    pub(crate) fn total_words(&self) -> usize {
        self.bufs.iter().map(|b| b.words).sum()
    }

    // ---- host operations ----

    pub(crate) fn host_op(&mut self) -> Result<(), Fail> {
        let k = self.rng.random_range(0..100u32);
        let live = self.bufs.len();
        if live >= MAX_BUFS || self.total_words() > 16 << 20 {
            let i = self.rng.random_range(0..live);
            self.note(format!("free {}", self.bufs[i].describe()));
            self.count_op("free");
            self.free(i);
            return Ok(());
        }
        match k {
            0..15 => {
                let w = self.rand_words();
                let id = self.alloc(w, None);
                if let Some(id) = id {
                    let d = self.buf(id).describe();
                    self.note(format!("alloc {d}"));
                    self.count_op("alloc");
                }
            }
            15..25 if !self.freed.is_empty() => {
                let i = self.rng.random_range(0..self.freed.len());
                let (a, l) = self.freed[i];
                let w = self.rng.random_range(1..=l / 4) as usize;
                if let Some(id) = self.alloc(w, Some(a)) {
                    let d = self.buf(id).describe();
                    self.note(format!("alloc at freed address {d}"));
                    self.count_op("alloc at freed");
                }
            }
            25..40 if live > 0 => {
                let i = self.rng.random_range(0..live);
                self.note(format!("free {}", self.bufs[i].describe()));
                self.count_op("free");
                self.free(i);
            }
            40..65 if live > 0 => {
                let i = self.rng.random_range(0..live);
                if self.bufs[i].prot == Prot::Rw && !self.is_pending(self.bufs[i].id) {
                    let words = self.bufs[i].words;
                    let start = self.rng.random_range(0..words);
                    let len = self.rng.random_range(1..=(words - start).min(8192));
                    let s: u32 = self.rng.random();
                    self.note(format!(
                        "cpu write {} words {start}..{}",
                        self.bufs[i].describe(),
                        start + len
                    ));
                    self.count_op("cpu write");
                    let b = &mut self.bufs[i];
                    for j in start..start + len {
                        b.write(j, mix(s, j as u32, 7));
                    }
                }
            }
            65..88 if live > 0 => {
                let i = self.rng.random_range(0..live);
                if self.bufs[i].is_mmap() {
                    self.protect(i)?;
                }
            }
            88..100 if live > 0 => {
                let i = self.rng.random_range(0..live);
                if self.bufs[i].is_mmap()
                    && self.bufs[i].prot == Prot::Rw
                    && !self.is_pending(self.bufs[i].id)
                {
                    self.remap(i);
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn rand_words(&mut self) -> usize {
        match self.rng.random_range(0..10) {
            0..7 => self.rng.random_range(1..=4096),
            7..9 => self.rng.random_range(1..=16384),
            _ => self.rng.random_range(1..=self.max_n as usize + 1),
        }
    }

    pub(crate) fn protect(&mut self, i: usize) -> Result<(), Fail> {
        let prot = [Prot::Rw, Prot::Ro, Prot::None][self.rng.random_range(0..3)];
        self.protect_to(i, prot)
    }

    pub(crate) fn protect_to(&mut self, i: usize, prot: Prot) -> Result<(), Fail> {
        let tell = self.zero_copy || self.rng.random_ratio(4, 5);
        let (addr, len) = self.bufs[i].range();
        // SAFETY: our own mapping, whole.
        let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot.bits()) };
        assert_eq!(rc, 0, "mprotect");
        let id = self.bufs[i].id;
        {
            let b = &mut self.bufs[i];
            b.prot = prot;
            // Untold only matters while the device may hold stale access;
            // a told change stays told until the next one.
            b.told = tell;
            if tell {
                b.history = vec![prot];
            } else if !b.history.contains(&prot) {
                b.history.push(prot);
            }
        }
        self.note(format!(
            "mprotect {} {}",
            self.bufs[i].describe(),
            if tell { "+ protection_changed" } else { "" }
        ));
        self.count_op(if tell {
            "mprotect told"
        } else {
            "mprotect untold"
        });
        if tell {
            let range = VaRange::from_start_len(VirtAddr(addr), len).expect("range");
            self.mirror
                .protection_changed(range)
                .map_err(|e| format!("protection_changed: {e}"))?;
            if prot == Prot::Rw && self.pending.as_ref().is_some_and(|p| p.id == id) {
                // The kept data is written by the call.
                self.settle_pending("protection_changed after widening")?;
            }
        }
        Ok(())
    }

    pub(crate) fn remap(&mut self, i: usize) {
        let (old, old_len) = self.bufs[i].range();
        let new_len = old_len + PAGE * self.rng.random_range(0..4u64);
        let fixed = self.rng.random_bool(0.5);
        let target = if fixed {
            match self.arena_map(None, new_len) {
                Some(t) => Some(t),
                None => return,
            }
        } else {
            None
        };
        let flags = libc::MREMAP_MAYMOVE | if fixed { libc::MREMAP_FIXED } else { 0 };
        // SAFETY: moves our own mapping (onto our own reservation with
        // MREMAP_FIXED); the buffer's address is updated below.
        let p = unsafe {
            libc::mremap(
                old as *mut libc::c_void,
                old_len as usize,
                new_len as usize,
                flags,
                target.unwrap_or(0) as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            if let Some(t) = target {
                // SAFETY: our own reservation, unused.
                unsafe { libc::munmap(t as *mut libc::c_void, new_len as usize) };
            }
            self.note(format!(
                "mremap {old:#x}+{old_len:#x} -> +{new_len:#x} failed: {e}"
            ));
            self.count_op("mremap failed");
            return;
        }
        let new = p as u64;
        let b = &mut self.bufs[i];
        b.addr = new;
        b.backing = Backing::Mmap { len: new_len };
        b.words = (new_len / 4) as usize;
        b.shadow.resize(b.words, 0);
        if new != old && (ARENA..ARENA + ARENA_PAGES * PAGE).contains(&old) {
            self.freed.push((old, old_len));
        } else if new == old {
            // Grown in place: the tail is no longer free.
            self.freed
                .retain(|&(s, l)| s + l <= old || old + new_len <= s);
        }
        self.note(format!(
            "mremap {:#x}+{:#x} -> {}{}",
            old,
            old_len,
            self.bufs[i].describe(),
            if fixed { " (MREMAP_FIXED)" } else { "" }
        ));
        self.count_op("mremap");
    }

    // ---- launches ----

    /// A buffer (live, not the pending one) with room for `need` words,
    /// read-write unless `any`; allocates one if there is none.
    pub(crate) fn pick_buf(&mut self, need: usize, any: bool) -> u64 {
        let pend = self.pending.as_ref().map(|p| p.id);
        let fit: Vec<u64> = self
            .bufs
            .iter()
            .filter(|b| {
                b.words >= need && Some(b.id) != pend && (any || (b.prot == Prot::Rw && b.told))
            })
            .map(|b| b.id)
            .collect();
        if !fit.is_empty() && self.rng.random_ratio(7, 8) {
            return fit[self.rng.random_range(0..fit.len())];
        }
        let extra = self.rng.random_range(0..1024);
        loop {
            if let Some(id) = self.alloc(need + extra, None) {
                let d = self.buf(id).describe();
                self.note(format!("alloc {d}"));
                return id;
            }
        }
    }

    pub(crate) fn pick_arg(&mut self, n: u32, valid: bool, other: Option<&Arg>) -> Arg {
        let bytes = u64::from(n) * 4;
        let k = if valid {
            0
        } else {
            self.rng.random_range(0..100u32)
        };
        match k {
            // The same argument as the other one (in place), when it is an
            // aligned buffer.
            0..10 if matches!(other, Some(Arg::Buf { off, .. }) if off % 4 == 0) => {
                other.cloned().expect("other")
            }
            0..62 => {
                let any = !valid && self.rng.random_ratio(1, 2);
                let word_off = if self.rng.random_ratio(1, 4) {
                    self.rng.random_range(0..64usize)
                } else {
                    0
                };
                let id = self.pick_buf(word_off + n as usize, any);
                let mut off = word_off as u64 * 4;
                // Disjoint from the other argument, or the same: never a
                // partial overlap (invocation j would read what
                // invocation k wrote).
                if let Some(Arg::Buf {
                    id: oid, off: ooff, ..
                }) = other
                {
                    if *oid == id && off.abs_diff(*ooff) < bytes {
                        off = *ooff;
                    }
                }
                Arg::Buf {
                    id,
                    addr: self.buf(id).addr,
                    off,
                }
            }
            62..68 => {
                let id = self.pick_buf(n as usize + 1, true);
                Arg::Buf {
                    id,
                    addr: self.buf(id).addr,
                    off: self.rng.random_range(1..4),
                }
            }
            68..78 => {
                let fit: Vec<(u64, u64)> = self
                    .freed
                    .iter()
                    .copied()
                    .filter(|&(_, l)| l >= bytes)
                    .collect();
                if fit.is_empty() {
                    return self.pick_arg(n, valid, other);
                }
                let (a, l) = fit[self.rng.random_range(0..fit.len())];
                Arg::Freed(a + self.rng.random_range(0..=(l - bytes) / 4) * 4)
            }
            78..86 => Arg::Never(NEVER + self.rng.random_range(0..1u64 << 24) * PAGE),
            86..94 => Arg::Kernel(
                [
                    0xffff_8000_0000_0000 + self.rng.random_range(0..1u64 << 18) * PAGE,
                    0xffff_ffff_ffff_f000,
                    0x0000_8000_0000_0000,
                    0x0000_7fff_ffff_f000,
                ][self.rng.random_range(0..4)],
            ),
            _ => Arg::Null([0, 4, 0x100][self.rng.random_range(0..3)]),
        }
    }

    pub(crate) fn rand_n(&mut self) -> u32 {
        match self.rng.random_range(0..100u32) {
            0..5 => 0,
            5..15 => self.rng.random_range(1..=64),
            15..75 => self.rng.random_range(1..=4096),
            75..95 => self.rng.random_range(4096..=self.max_n.clamp(4096, 16384)),
            _ => self.rng.random_range(1..=self.max_n),
        }
    }

    pub(crate) fn arg_desc(&self, a: &Arg) -> String {
        match a {
            Arg::Buf { id, off, .. } => format!("{} +{off}", self.buf(*id).describe()),
            other => format!("{other:?}"),
        }
    }
}
