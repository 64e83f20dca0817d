//! What is mapped where: a parser for `/proc/self/maps` and a cache of it.
//!
//! # What the kernel gives us
//!
//! Every virtual memory area (VMA) of the process is one line of
//! `/proc/self/maps`:
//!
//! ```text
//! 7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0
//! 7f1c2b400000-7f1c2b428000 r--p 00000000 fd:01 1835041    /usr/lib/libc.so.6
//! 7ffd4c2f0000-7ffd4c311000 rw-p 00000000 00:00 0          [stack]
//! ```
//!
//! range, permissions (`r`, `w`, `x`, then `p`rivate or `s`hared), file
//! offset (hex), device `major:minor` (hex), inode (decimal) and a name.
//! The kernel pads the fixed part to a column (72 characters on 64-bit
//! kernels) and then writes one space and the name, so a file name may itself
//! start with or contain spaces; only `\n` is escaped (as `\012`). A file
//! unlinked while mapped gets ` (deleted)` appended. Names in brackets are
//! the kernel's own (`[heap]`, `[stack]`, `[vdso]`, `[vvar]`, `[anon:name]`
//! for `prctl(PR_SET_VMA_ANON_NAME)`); an empty name is plain anonymous
//! memory.
//!
//! # Why a cache, and when it is wrong
//!
//! Reading and parsing the file costs tens to hundreds of microseconds
//! (it grows with the number of VMAs), far too much for every device fault.
//! [`MappingCache`] therefore keeps the last parse and answers lookups from
//! it. It re-reads the file only when a lookup misses (an address no cached
//! mapping covers: a new `mmap` creates no event anyone could see, so a miss
//! must never be trusted) or after [`MappingCache::invalidate`] dropped the
//! covering entry. The event monitor calls `invalidate` for userfaultfd
//! `UNMAP`/`REMOVE` events and [`MappingCache::remap`] for `REMAP`.
//!
//! There is no userspace event for `mprotect`, nor for `munmap` of a range
//! nobody registered with userfaultfd. Cached permissions are therefore
//! "valid as of the last read", like the rest of the mirror (see the design
//! brief). Callers that learn otherwise (a populate that fails with
//! `EFAULT`) call [`MappingCache::invalidate`] and look again; `range_fault`
//! does exactly that before it reports an error.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use thiserror::Error;

use crate::addr::{VaRange, VirtAddr};
use crate::sync::{lock, AtomicU64, Mutex, Ordering};

/// Errors from reading or parsing the process's memory map.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MapsError {
    /// `/proc/self/maps` (or the configured source) could not be read.
    #[error("cannot read the memory map: {0}")]
    Read(#[source] io::Error),
    /// A line did not have the documented shape.
    #[error("malformed memory-map line {line}: {reason}: {text:?}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// The offending line (lossily decoded).
        text: String,
        /// What was wrong with it.
        reason: &'static str,
    },
}

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingKind {
    /// Plain anonymous memory (no name).
    Anonymous,
    /// A file mapping (also shared memory objects such as memfd or SysV shm,
    /// which the kernel shows as files).
    File {
        /// Path as the kernel printed it, without the ` (deleted)` suffix.
        /// A `\n` in the real name appears as the four characters `\012`.
        path: PathBuf,
        /// Offset into the file of the mapping's first byte.
        offset: u64,
        /// Device as `(major, minor)`.
        dev: (u32, u32),
        /// Inode number.
        inode: u64,
        /// The file was unlinked while mapped (` (deleted)` suffix).
        deleted: bool,
    },
    /// A kernel-named area, brackets included: `[heap]`, `[stack]`,
    /// `[vdso]`, `[vvar]`, `[vsyscall]`, `[anon:name]`, …
    Special(String),
}

/// One VMA as read from `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The addresses it covers.
    pub range: VaRange,
    /// `PROT_READ`.
    pub read: bool,
    /// `PROT_WRITE`.
    pub write: bool,
    /// `PROT_EXEC`.
    pub exec: bool,
    /// `MAP_SHARED` (the `s` flag) rather than private copy-on-write.
    pub shared: bool,
    /// What backs it.
    pub kind: MappingKind,
}

impl Mapping {
    /// Whether the contents of this mapping can change without a write
    /// through this process's page tables — writes that `WP_ASYNC` write
    /// tracking cannot see. True for every mapping but private anonymous
    /// memory ([`Mapping::is_private_anonymous`]):
    ///
    /// - shared mappings (`s`): `MAP_SHARED` anonymous memory (another
    ///   process after `fork`), shared file mappings (`pwrite()` to the
    ///   file, other processes' mappings of it), memfd and SysV shm (which
    ///   the kernel shows as files);
    /// - private file mappings (`p` with a path): a page this process never
    ///   wrote still shows the file's page cache, so `pwrite()` to the file
    ///   changes it. A page this process already copied on write no longer
    ///   follows the file, but nothing cheap tells the two apart, so every
    ///   page of such a mapping counts: hashing a copied page is merely
    ///   extra cost;
    /// - the kernel's own private specials other than heap and stacks
    ///   (`[vvar]`, `[vdso]`): conservative as well.
    pub fn may_change_unseen(&self) -> bool {
        !self.is_private_anonymous()
    }

    /// Whether this is private anonymous memory: a page that was never
    /// populated reads as zeros when first touched (absent a userfaultfd
    /// missing-mode handler). Anonymous, `[heap]`, `[stack]`, `[stack:tid]`
    /// and `[anon:name]` mappings qualify when private. Shared anonymous
    /// memory does not: its pages live in a shmem object and an absent page
    /// table entry says nothing about their contents (they may be swapped
    /// out, or written by another process).
    pub fn is_private_anonymous(&self) -> bool {
        if self.shared {
            return false;
        }
        match &self.kind {
            MappingKind::Anonymous => true,
            MappingKind::File { .. } => false,
            MappingKind::Special(s) => {
                s == "[heap]"
                    || s == "[stack]"
                    || s.starts_with("[stack:")
                    || s.starts_with("[anon:")
            }
        }
    }
}

impl Mapping {
    /// Whether a plain CPU copy (the recoverable `rep movsb` of
    /// [`crate::cpu::safecopy`]) may read or write this mapping's pages.
    /// `false` for mappings where a load may have side effects or must not
    /// happen: I/O and PFN maps (`VM_IO`, `VM_PFNMAP`: device registers,
    /// GPU apertures, `[vvar]`) and `memfd_secret` memory, which the kernel
    /// keeps from everyone else (`process_vm_readv` refuses it, and the
    /// mirror reports it as unmirrorable; a copy of our own would leak it).
    /// Those pages keep going through `process_vm_*`.
    ///
    /// Decided from the maps line alone, never from `/proc/self/smaps`
    /// (whose `VmFlags` would say `io`/`pf` exactly, but which costs a
    /// whole page walk per mapping to read). The kernel gives `VM_IO` and
    /// `VM_PFNMAP` only to mappings a driver sets up through a *device*
    /// file's `mmap` (under `/dev`, or an anonymous-inode / dma-buf file a
    /// driver handed out) and to its own special areas; all of those are
    /// recognisable by name:
    ///
    /// - allowed: plain anonymous memory, `[heap]`, `[stack]`,
    ///   `[stack:tid]`, `[anon:name]`, `[anon_shmem:name]`, `[vdso]`
    ///   (ordinary kernel text pages); files that are not under `/dev`,
    ///   plus `/dev/zero` (shared anonymous memory), `/dev/shm/...` (tmpfs)
    ///   and memfds;
    /// - refused: every other bracketed name (`[vvar]`, `[vvar_vclock]`,
    ///   `[vsyscall]`, `[uprobes]`, ...), every other path under `/dev/`
    ///   (`/dev/mem`, `/dev/dri/*`, `/dev/nvidia*`, ...), `anon_inode:`
    ///   files (io_uring rings, perf buffers, KVM), `/dmabuf:` buffers and
    ///   `/secretmem`.
    ///
    /// Over-refusing costs only speed: those pages take the syscall path,
    /// which is what every page took before the recoverable copy existed.
    pub fn plain_copy_ok(&self) -> bool {
        match &self.kind {
            MappingKind::Anonymous => true,
            MappingKind::Special(s) => {
                s == "[heap]"
                    || s == "[stack]"
                    || s == "[vdso]"
                    || s.starts_with("[stack:")
                    || s.starts_with("[anon:")
                    || s.starts_with("[anon_shmem:")
            }
            MappingKind::File { path, .. } => {
                let p = path.as_os_str().as_bytes();
                if p.starts_with(b"/dev/") {
                    p == b"/dev/zero" || p.starts_with(b"/dev/shm/")
                } else {
                    !(p.starts_with(b"anon_inode:")
                        || p.starts_with(b"/dmabuf:")
                        || p == b"/secretmem")
                }
            }
        }
    }
}

/// Column at which the kernel starts the name (`seq_setwidth(m, 25 +
/// sizeof(void *) * 6 - 1)` in `fs/proc/task_mmu.c`, then one space).
const NAME_PAD: usize = 25 + core::mem::size_of::<usize>() * 6 - 1;

fn hex(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 16 {
        return None;
    }
    u64::from_str_radix(core::str::from_utf8(field).ok()?, 16).ok()
}

fn dec(field: &[u8]) -> Option<u64> {
    if field.is_empty() {
        return None;
    }
    core::str::from_utf8(field).ok()?.parse().ok()
}

/// Splits off the next space-separated field starting at `pos`.
fn field(line: &[u8], pos: &mut usize) -> Option<(usize, usize)> {
    while *pos < line.len() && line[*pos] == b' ' {
        *pos += 1;
    }
    let s = *pos;
    while *pos < line.len() && line[*pos] != b' ' {
        *pos += 1;
    }
    (*pos > s).then_some((s, *pos))
}

/// Parses one line of `/proc/<pid>/maps`. `lineno` is used in errors only.
pub fn parse_line(line: &[u8], lineno: usize) -> Result<Mapping, MapsError> {
    let err = |reason| MapsError::Parse {
        line: lineno,
        text: String::from_utf8_lossy(line).into_owned(),
        reason,
    };
    let mut pos = 0;
    let mut next = |what| {
        field(line, &mut pos)
            .map(|(s, e)| &line[s..e])
            .ok_or_else(|| err(what))
    };
    let range_f = next("missing address range")?;
    let perms = next("missing permissions")?;
    let off = next("missing offset")?;
    let dev = next("missing device")?;
    let ino = next("missing inode")?;

    let dash = range_f
        .iter()
        .position(|&b| b == b'-')
        .ok_or_else(|| err("address range without '-'"))?;
    let start = hex(&range_f[..dash]).ok_or_else(|| err("bad start address"))?;
    let end = hex(&range_f[dash + 1..]).ok_or_else(|| err("bad end address"))?;
    let range =
        VaRange::new(VirtAddr(start), VirtAddr(end)).map_err(|_| err("empty or inverted range"))?;

    if perms.len() != 4 {
        return Err(err("permissions are not 4 characters"));
    }
    let flag = |i: usize, c: u8| -> Result<bool, MapsError> {
        match perms[i] {
            b'-' => Ok(false),
            x if x == c => Ok(true),
            _ => Err(err("bad permission character")),
        }
    };
    let read = flag(0, b'r')?;
    let write = flag(1, b'w')?;
    let exec = flag(2, b'x')?;
    let shared = match perms[3] {
        b's' => true,
        b'p' => false,
        _ => return Err(err("sharing flag is neither 'p' nor 's'")),
    };
    let offset = hex(off).ok_or_else(|| err("bad offset"))?;
    let colon = dev
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| err("device without ':'"))?;
    let major = hex(&dev[..colon])
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| err("bad device major"))?;
    let minor = hex(&dev[colon + 1..])
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| err("bad device minor"))?;
    let inode = dec(ino).ok_or_else(|| err("bad inode"))?;

    // The name: after the padding, exactly one space, then the name
    // verbatim (it may start with spaces). If the fixed part was already
    // longer than the pad, the name follows after a single space. When the
    // layout does not look like that, fall back to trimming leading spaces.
    let prefix_end = pos;
    let name: &[u8] = if prefix_end >= line.len() {
        &[]
    } else {
        let start = prefix_end.max(NAME_PAD) + 1;
        if start <= line.len() && line[prefix_end..start].iter().all(|&b| b == b' ') {
            &line[start..]
        } else {
            let rest = &line[prefix_end..];
            let skip = rest.iter().take_while(|&&b| b == b' ').count();
            &rest[skip..]
        }
    };

    let kind = if name.is_empty() {
        MappingKind::Anonymous
    } else if name.first() == Some(&b'[') && name.last() == Some(&b']') {
        MappingKind::Special(String::from_utf8_lossy(name).into_owned())
    } else {
        const DELETED: &[u8] = b" (deleted)";
        let (path, deleted) = match name.strip_suffix(DELETED) {
            Some(p) => (p, true),
            None => (name, false),
        };
        MappingKind::File {
            path: PathBuf::from(OsStr::from_bytes(path)),
            offset,
            dev: (major, minor),
            inode,
            deleted,
        }
    };
    Ok(Mapping {
        range,
        read,
        write,
        exec,
        shared,
        kind,
    })
}

/// Parses a whole `/proc/<pid>/maps` text. Empty lines are skipped; any
/// other malformed line is an error (silently dropping a line would turn a
/// mapped range into an apparent hole).
pub fn parse_maps(text: &[u8]) -> Result<Vec<Mapping>, MapsError> {
    text.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| parse_line(l, i + 1))
        .collect()
}

/// Reads and parses `/proc/self/maps`.
pub fn read_self_maps() -> Result<Vec<Mapping>, MapsError> {
    let text = std::fs::read("/proc/self/maps").map_err(MapsError::Read)?;
    parse_maps(&text)
}

/// A piece of a queried range: either inside one mapping or in a hole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The part of the queried range this segment covers.
    pub range: VaRange,
    /// The mapping covering it, or `None` for a hole.
    pub mapping: Option<Mapping>,
}

/// Counters of a [`MappingCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Times the map source was read and parsed.
    pub rereads: u64,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that missed and caused a re-read.
    pub misses: u64,
    /// Calls to `invalidate` / `remap` that dropped or moved something.
    pub invalidations: u64,
}

type Source = Box<dyn Fn() -> io::Result<Vec<u8>> + Send + Sync>;

#[derive(Default)]
struct State {
    /// Cached mappings keyed by start address; never overlapping.
    map: std::collections::BTreeMap<u64, Mapping>,
    /// When set, a cached entry is served only inside `trusted`: ranges
    /// whose changes are reported by events (the host's watched ranges).
    /// Anywhere else a mapping may have been unmapped and mapped again
    /// without anyone telling the cache, so lookups there re-read.
    require_trust: bool,
    trusted: super::trusted::Trusted,
    /// The epoch ([`MappingCache::new_epoch`]) of the last re-read.
    refreshed_in: u64,
}

impl State {
    fn is_trusted(&self, a: u64) -> bool {
        !self.require_trust || self.trusted.contains(a)
    }

    fn find(&self, a: u64) -> Option<&Mapping> {
        self.map
            .range(..=a)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.range.contains(VirtAddr(a)))
    }
    /// First cached mapping starting after `a`.
    fn next_start_after(&self, a: u64) -> Option<u64> {
        self.map.range(a + 1..).next().map(|(&s, _)| s)
    }
    fn remove_overlapping(&mut self, r: VaRange) -> Vec<Mapping> {
        let keys: Vec<u64> = self
            .map
            .range(..r.end().0)
            .rev()
            .take_while(|(_, m)| m.range.end() > r.start())
            .map(|(&k, _)| k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.map.remove(&k))
            .collect()
    }
}

/// Clips `m` to `r` (adjusting the file offset); `None` if disjoint.
fn clip(m: &Mapping, r: VaRange) -> Option<Mapping> {
    let part = m.range.intersect(r)?;
    let mut c = m.clone();
    if let MappingKind::File { offset, .. } = &mut c.kind {
        *offset = offset.wrapping_add(part.start().0 - m.range.start().0);
    }
    c.range = part;
    Some(c)
}

/// A thread-safe cache of the process's mappings; see the module docs for
/// the invalidation policy.
pub struct MappingCache {
    state: Mutex<State>,
    source: Source,
    generation: AtomicU64,
    rereads: AtomicU64,
    epoch: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
}

impl Default for MappingCache {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for MappingCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MappingCache")
            .field("generation", &self.generation())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl MappingCache {
    /// A cache of `/proc/self/maps`. Nothing is read until the first lookup.
    pub fn new() -> Self {
        Self::with_source(|| std::fs::read("/proc/self/maps"))
    }

    /// A cache over another source of maps text (another process's
    /// `/proc/<pid>/maps`, or canned text in tests).
    pub fn with_source(source: impl Fn() -> io::Result<Vec<u8>> + Send + Sync + 'static) -> Self {
        MappingCache {
            state: Mutex::new(State::default()),
            source: Box::new(source),
            generation: AtomicU64::new(0),
            rereads: AtomicU64::new(0),
            epoch: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    /// Replaces the cached knowledge with a fresh read. Runs with the lock
    /// held, so an `invalidate` that races with the read is applied after
    /// it and cannot be lost.
    fn reread(&self, st: &mut State) -> Result<(), MapsError> {
        // Relaxed: the epoch is only compared under the state lock.
        st.refreshed_in = self.epoch.load(Ordering::Relaxed);
        let text = (self.source)().map_err(MapsError::Read)?;
        let maps = parse_maps(&text)?;
        self.rereads.fetch_add(1, Ordering::Relaxed);
        st.map = maps.into_iter().map(|m| (m.range.start().0, m)).collect();
        // Release: a reader that sees the new generation (Acquire) also sees the cache change made under the lock before it.
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The mapping containing `addr`, from the cache if it knows one, else
    /// after re-reading the source. `Ok(None)`: `addr` is in a hole.
    pub fn lookup(&self, addr: VirtAddr) -> Result<Option<Mapping>, MapsError> {
        let mut st = lock(&self.state);
        if st.is_trusted(addr.0) {
            if let Some(m) = st.find(addr.0) {
                // Relaxed: a statistics counter; nothing is published through it.
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(m.clone()));
            }
        }
        // Relaxed: a statistics counter; nothing is published through it.
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.reread(&mut st)?;
        Ok(st.find(addr.0).cloned())
    }

    /// Splits `range` into pieces that each lie in one mapping or in a hole,
    /// in address order. Cached mappings are used where they cover the
    /// range; the first uncovered address causes one re-read, after which
    /// the cache is complete and holes can be measured exactly.
    pub fn segments(&self, range: VaRange) -> Result<Vec<Segment>, MapsError> {
        let mut st = lock(&self.state);
        let mut fresh = false;
        let mut out = Vec::new();
        let mut cur = range.start().0;
        let end = range.end().0;
        while cur < end {
            if !fresh && !st.is_trusted(cur) {
                // Relaxed: a statistics counter; nothing is published through it.
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.reread(&mut st)?;
                fresh = true;
            }
            if let Some(m) = st.find(cur) {
                let piece_end = m.range.end().0.min(end);
                let piece = VaRange::new(VirtAddr(cur), VirtAddr(piece_end)).map_err(|_| {
                    MapsError::Parse {
                        line: 0,
                        text: String::new(),
                        reason: "inconsistent cache",
                    }
                })?;
                out.push(Segment {
                    range: piece,
                    mapping: clip(m, piece),
                });
                if !fresh {
                    // Relaxed: a statistics counter; nothing is published through it.
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
                cur = piece_end;
                continue;
            }
            if !fresh {
                // Relaxed: a statistics counter; nothing is published through it.
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.reread(&mut st)?;
                fresh = true;
                continue;
            }
            let hole_end = st.next_start_after(cur).unwrap_or(end).min(end);
            // `hole_end > cur`: no cached mapping contains `cur`, and the
            // next one starts strictly after it.
            if let Ok(piece) = VaRange::new(VirtAddr(cur), VirtAddr(hole_end)) {
                out.push(Segment {
                    range: piece,
                    mapping: None,
                });
            }
            cur = hole_end.max(cur + 1);
        }
        Ok(out)
    }

    /// Forgets every cached mapping that overlaps `range` (unmap, remove,
    /// protection change). The next lookup there re-reads the source.
    pub fn invalidate(&self, range: VaRange) {
        let mut st = lock(&self.state);
        if !st.remove_overlapping(range).is_empty() {
            self.invalidations.fetch_add(1, Ordering::Relaxed);
            // Release: a reader that sees the new generation (Acquire) also sees the cache change made under the lock before it.
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Starts a new epoch: the first [`MappingCache::lookup_in_epoch`] of
    /// it re-reads the source, later ones in the same epoch may use that
    /// read. A caller doing a burst of lookups at one moment (a fault
    /// batch) gets one consistent, fresh snapshot for one read.
    pub fn new_epoch(&self) -> u64 {
        // Relaxed: a counter compared under the state lock only.
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The epoch [`MappingCache::new_epoch`] last started (no new one is
    /// started): lookups in it are as fresh as the latest fault round.
    pub fn current_epoch(&self) -> u64 {
        // Relaxed: a counter compared under the state lock only.
        self.epoch.load(Ordering::Relaxed)
    }

    /// Like [`MappingCache::lookup`], but outside trusted ranges a hit is
    /// served if the cache was re-read during `epoch` (otherwise it
    /// re-reads first). Misses always re-read.
    pub fn lookup_in_epoch(
        &self,
        addr: VirtAddr,
        epoch: u64,
    ) -> Result<Option<Mapping>, MapsError> {
        let mut st = lock(&self.state);
        // The epoch first: it is one comparison, the trust check a walk
        // over every trusted range (one per watched region).
        if st.refreshed_in == epoch || st.is_trusted(addr.0) {
            if let Some(m) = st.find(addr.0) {
                // Relaxed: a statistics counter.
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(m.clone()));
            }
        }
        // Relaxed: a statistics counter.
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.reread(&mut st)?;
        st.refreshed_in = epoch;
        Ok(st.find(addr.0).cloned())
    }

    /// From now on serve cached entries only inside ranges passed to
    /// [`MappingCache::trust`] (ranges whose changes events report);
    /// everywhere else lookups re-read. The host space turns this on.
    pub fn require_trust(&self) {
        lock(&self.state).require_trust = true;
    }

    /// Marks `range` as kept current by events.
    pub fn trust(&self, range: VaRange) {
        let mut st = lock(&self.state);
        st.trusted.add(range);
    }

    /// Stops trusting any part of `range` (whole trusted ranges that
    /// overlap it are dropped: conservative).
    pub fn untrust(&self, range: VaRange) {
        lock(&self.state).trusted.drop_overlapping(range);
    }

    /// Drops all cached knowledge.
    pub fn invalidate_all(&self) {
        let mut st = lock(&self.state);
        st.map.clear();
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        // Release: a reader that sees the new generation (Acquire) also sees the cache change made under the lock before it.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Records that the pages of `old` now live at `new_start` (an
    /// `mremap` move, as reported by a userfaultfd `REMAP` event). Cached
    /// mappings overlapping `old` keep their parts outside `old` (the kernel
    /// split the VMA there); the parts inside move by the same distance,
    /// replacing whatever was cached at the destination. Knowledge that
    /// cannot be moved exactly is dropped, which is always safe: a later
    /// lookup re-reads.
    pub fn remap(&self, old: VaRange, new_start: VirtAddr) {
        let mut st = lock(&self.state);
        let Ok(new) = VaRange::from_start_len(new_start, old.len()) else {
            st.remove_overlapping(old);
            // Relaxed: a statistics counter; nothing is published through it.
            self.invalidations.fetch_add(1, Ordering::Relaxed);
            // Release: a reader that sees the new generation (Acquire) also sees the cache change made under the lock before it.
            self.generation.fetch_add(1, Ordering::Release);
            return;
        };
        let delta_pos = new.start().0.wrapping_sub(old.start().0);
        let shifted: Vec<Mapping> = st
            .remove_overlapping(old)
            .iter()
            .filter_map(|m| {
                // Parts outside `old` stay where they are (the kernel split
                // the VMA at the edges of the moved range).
                for side in [
                    VaRange::new(m.range.start(), old.start()),
                    VaRange::new(old.end(), m.range.end()),
                ]
                .into_iter()
                .flatten()
                {
                    if let Some(keep) = clip(m, side) {
                        st.map.insert(keep.range.start().0, keep);
                    }
                }
                let mut inside = clip(m, old)?;
                let s = inside.range.start().0.wrapping_add(delta_pos);
                inside.range = VaRange::from_start_len(VirtAddr(s), inside.range.len()).ok()?;
                Some(inside)
            })
            .collect();
        // Whatever was mapped at the destination was unmapped there
        // (MREMAP_FIXED); its parts outside `new` remain.
        for m in st.remove_overlapping(new) {
            for side in [
                VaRange::new(m.range.start(), new.start()),
                VaRange::new(new.end(), m.range.end()),
            ]
            .into_iter()
            .flatten()
            {
                if let Some(keep) = clip(&m, side) {
                    st.map.insert(keep.range.start().0, keep);
                }
            }
        }
        for m in shifted {
            st.map.insert(m.range.start().0, m);
        }
        // Relaxed: a statistics counter; nothing is published through it.
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        // Release: a reader that sees the new generation (Acquire) also sees the cache change made under the lock before it.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Increments whenever the cached knowledge changes (re-read,
    /// invalidation, remap).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Number of times the source was read.
    pub fn rereads(&self) -> u64 {
        self.rereads.load(Ordering::Relaxed)
    }

    /// All counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            rereads: self.rereads.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            // Relaxed: a statistics counter; nothing is published through it.
            misses: self.misses.load(Ordering::Relaxed),
            // Relaxed: a statistics counter; nothing is published through it.
            invalidations: self.invalidations.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
