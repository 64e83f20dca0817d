//! Helpers shared by the benchmarks.

/// A fresh private anonymous read-write mapping of `len` bytes; returns its
/// address. Benchmarks unmap it themselves (or by `munmap`, which is what
/// they measure).
pub fn map(len: usize) -> usize {
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as usize
}
