//! A scratch mapping for capability probes: a few private anonymous
//! pages, unmapped on drop. Probes try a syscall on memory nobody else
//! uses, so their side effects (populating, scanning) touch nothing real.

use std::io;

use crate::addr::PAGE_SIZE;

/// A private anonymous read-write mapping, unmapped on drop.
pub(crate) struct ScratchMap {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: a `ScratchMap` owns its mapping exclusively and hands out only
// raw addresses, used for syscalls; nothing dereferences them through a
// shared `ScratchMap`, so moving or sharing the owner across threads moves
// no aliasing with it. The mapping is unmapped once, on drop.
unsafe impl Send for ScratchMap {}
// SAFETY: as above: `&ScratchMap` only yields the address and length.
unsafe impl Sync for ScratchMap {}

impl ScratchMap {
    /// Maps `pages` fresh pages at a kernel-chosen address.
    pub(crate) fn new(pages: usize) -> io::Result<Self> {
        let len = pages * PAGE_SIZE as usize;
        // SAFETY: a fresh anonymous private mapping at an address the kernel
        // chooses; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ScratchMap { addr, len })
    }

    /// First address.
    pub(crate) fn base(&self) -> u64 {
        self.addr as usize as u64
    }

    /// The mapping as a raw pointer, for syscalls.
    pub(crate) fn ptr(&self) -> *mut libc::c_void {
        self.addr
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ScratchMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which no
        // reference outlives (only raw addresses were handed out).
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}
