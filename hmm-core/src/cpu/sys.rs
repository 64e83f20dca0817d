//! Raw kernel ABI for the few interfaces `libc` does not define:
//! userfaultfd (`linux/userfaultfd.h`) and `PAGEMAP_SCAN` (`linux/fs.h`).
//!
//! Why by hand: the `userfaultfd` crate's `-sys` half regenerates its
//! bindings with bindgen on every build (libclang on every build machine)
//! and its feature flags cannot express `UFFD_FEATURE_WP_ASYNC` or
//! `UFFD_FEATURE_MOVE`, so the API handshake would have to be ours anyway;
//! `PAGEMAP_SCAN` is in no crate. The layouts below are checked against the
//! kernel's by size assertions, and the ioctl numbers are computed with the
//! kernel's own `_IOC` encoding rather than copied as magic numbers.
//!
//! Only plain-data `#[repr(C)]` types and constants live here; the safe
//! wrappers that issue the syscalls are in the modules that use them.

#![allow(missing_docs)] // the names are the kernel's; its headers document them

// ---- _IOC encoding (asm-generic, used by x86-64 and AArch64) ----
const IOC_NRBITS: u64 = 8;
const IOC_TYPEBITS: u64 = 8;
const IOC_SIZEBITS: u64 = 14;
const IOC_NRSHIFT: u64 = 0;
const IOC_TYPESHIFT: u64 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u64 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u64 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << IOC_DIRSHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u64) << IOC_SIZESHIFT)
}

// ---- userfaultfd ----
pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

/// `userfaultfd(2)` flag: handle user-mode faults only (allowed to
/// unprivileged users even when `vm.unprivileged_userfaultfd = 0`).
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

/// `struct uffd_msg`: 8 bytes of header, 24 bytes of event-specific
/// payload kept as raw words and decoded by the reader according to
/// `event`:
/// - PAGEFAULT: `[flags, address, ptid]`
/// - FORK: `[ufd as u32, ..]`
/// - REMAP: `[from, to, len]`
/// - REMOVE / UNMAP: `[start, end, _]`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

pub const UFFDIO_API: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x3F,
    core::mem::size_of::<uffdio_api>(),
);
pub const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    core::mem::size_of::<uffdio_register>(),
);
pub const UFFDIO_UNREGISTER: u64 =
    ioc(IOC_READ, UFFDIO, 0x01, core::mem::size_of::<uffdio_range>());
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, core::mem::size_of::<uffdio_range>());
pub const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    core::mem::size_of::<uffdio_writeprotect>(),
);
/// `struct uffdio_copy`: install `len` bytes from `src` (our memory) at
/// the missing pages `dst`; `copy` returns the bytes copied or `-errno`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}
/// Install the pages write-protected (needs a range registered in WP mode
/// too).
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x03,
    core::mem::size_of::<uffdio_copy>(),
);
/// `struct uffdio_poison` (Linux 6.6+, `UFFD_FEATURE_POISON`): install
/// poison markers at the missing pages of `range`, so a CPU access there
/// gets `SIGBUS`; `updated` returns the bytes marked or `-errno`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    pub updated: i64,
}
pub const UFFDIO_POISON: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x0A,
    core::mem::size_of::<uffdio_poison>(),
);
/// `/dev/userfaultfd` ioctl that creates a userfaultfd; the argument is the
/// `userfaultfd(2)` flags.
pub const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, UFFDIO, 0x00, 0);

// ---- PAGEMAP_SCAN (Linux 6.7+) ----
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// A run of pages with equal categories, as `PAGEMAP_SCAN` reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct page_region {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `PAGE_IS_*` bits, masked by the scan's `return_mask`.
    pub categories: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pm_scan_arg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

pub const PAGEMAP_SCAN: u64 = ioc(
    IOC_READ | IOC_WRITE,
    b'f' as u64,
    16,
    core::mem::size_of::<pm_scan_arg>(),
);

// ---- /proc/self/pagemap entry bits ----
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
pub const PM_FILE_OR_SHARED_ANON: u64 = 1 << 61;
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;

// ---- madvise ----
pub const MADV_POPULATE_READ: libc::c_int = 22;
pub const MADV_POPULATE_WRITE: libc::c_int = 23;

const _: () = {
    assert!(core::mem::size_of::<uffdio_api>() == 24);
    assert!(core::mem::size_of::<uffdio_register>() == 32);
    assert!(core::mem::size_of::<uffdio_writeprotect>() == 24);
    assert!(core::mem::size_of::<uffd_msg>() == 32);
    assert!(core::mem::size_of::<page_region>() == 24);
    assert!(core::mem::size_of::<pm_scan_arg>() == 96);
    // Well-known values, as a check on the encoder.
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
    assert!(PAGEMAP_SCAN == 0xc060_6610);
};
