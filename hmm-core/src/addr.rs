//! Address newtypes.
//!
//! CPU virtual addresses and device-side quantities live in different
//! address spaces; giving each its own type means the compiler rejects a
//! device pool offset passed where a CPU pointer was meant (the idea of
//! `vm-memory`'s `GuestAddress`). Everything here is plain data: no
//! pointer is ever dereferenced through these types.

use core::fmt;

use crate::error::RangeError;

/// Size of a CPU base page assumed by the framework's page-granular
/// structures. The CPU side checks at run time that the kernel agrees
/// (`sysconf(_SC_PAGESIZE)`) and refuses to run otherwise.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// Highest user-space address on x86-64 / AArch64 with 4-level page
/// tables (47-bit user half), exclusive. Addresses at or above it belong
/// to the kernel half (or to 5-level user space, which this framework does
/// not map) and are rejected by [`VaRange::user`].
pub const USER_VA_END: u64 = 1 << 47;

/// A CPU virtual address in this process.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct VirtAddr(pub u64);

impl VirtAddr {
    /// The address of a pointer.
    pub fn from_ptr<T: ?Sized>(p: *const T) -> Self {
        VirtAddr(p.cast::<u8>() as usize as u64)
    }
    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// Rounds down to a page boundary.
    pub const fn page_down(self) -> Self {
        VirtAddr(self.0 & !(PAGE_SIZE - 1))
    }
    /// Rounds up to a page boundary, or `None` on overflow.
    pub const fn page_up(self) -> Option<Self> {
        match self.0.checked_add(PAGE_SIZE - 1) {
            Some(v) => Some(VirtAddr(v & !(PAGE_SIZE - 1))),
            None => None,
        }
    }
    /// Whether the address is page aligned.
    pub const fn is_page_aligned(self) -> bool {
        self.0 & (PAGE_SIZE - 1) == 0
    }
    /// Page frame number in the virtual space (`addr >> PAGE_SHIFT`).
    pub const fn vpn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
    /// `self + off`, or `None` on overflow.
    pub const fn checked_add(self, off: u64) -> Option<Self> {
        match self.0.checked_add(off) {
            Some(v) => Some(VirtAddr(v)),
            None => None,
        }
    }
    /// The address as a raw pointer (for syscalls; never dereferenced here).
    pub fn as_mut_ptr(self) -> *mut libc::c_void {
        self.0 as usize as *mut libc::c_void
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtAddr({:#x})", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A half-open, non-empty range `[start, end)` of CPU virtual addresses.
///
/// Constructed only through checked constructors, so `start < end` always
/// holds and `end` never overflowed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VaRange {
    start: VirtAddr,
    end: VirtAddr,
}

impl VaRange {
    /// `[start, end)`. Errors: empty or inverted range.
    pub fn new(start: VirtAddr, end: VirtAddr) -> Result<Self, RangeError> {
        if start >= end {
            return Err(RangeError::Empty {
                start: start.0,
                end: end.0,
            });
        }
        Ok(VaRange { start, end })
    }

    /// `[start, start + len)`. Errors: zero length or overflow.
    pub fn from_start_len(start: VirtAddr, len: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty {
                start: start.0,
                end: start.0,
            });
        }
        let end = start.0.checked_add(len).ok_or(RangeError::Overflow {
            start: start.0,
            len,
        })?;
        Ok(VaRange {
            start,
            end: VirtAddr(end),
        })
    }

    /// The bytes of a slice.
    pub fn of_slice<T>(s: &[T]) -> Result<Self, RangeError> {
        Self::from_start_len(
            VirtAddr::from_ptr(s.as_ptr()),
            core::mem::size_of_val(s) as u64,
        )
    }

    /// The whole 64-bit space `[0, u64::MAX)` (used for teardown).
    pub const fn everything() -> Self {
        VaRange {
            start: VirtAddr(0),
            end: VirtAddr(u64::MAX),
        }
    }

    /// Like [`VaRange::from_start_len`] but also requires page alignment of
    /// both ends and that the range lies wholly in the user half.
    pub fn user_pages(start: VirtAddr, len: u64) -> Result<Self, RangeError> {
        let r = Self::from_start_len(start, len)?;
        if !r.start.is_page_aligned() || !r.end.is_page_aligned() {
            return Err(RangeError::Unaligned {
                start: r.start.0,
                end: r.end.0,
            });
        }
        r.user()
    }

    /// Returns `self` if it lies wholly below [`USER_VA_END`].
    pub fn user(self) -> Result<Self, RangeError> {
        if self.end.0 > USER_VA_END {
            return Err(RangeError::KernelHalf {
                start: self.start.0,
                end: self.end.0,
            });
        }
        Ok(self)
    }

    /// Smallest page-aligned range covering `self`.
    pub fn page_cover(self) -> Result<Self, RangeError> {
        let end = self.end.page_up().ok_or(RangeError::Overflow {
            start: self.start.0,
            len: self.len(),
        })?;
        Ok(VaRange {
            start: self.start.page_down(),
            end,
        })
    }

    /// First address.
    pub const fn start(self) -> VirtAddr {
        self.start
    }
    /// One past the last address.
    pub const fn end(self) -> VirtAddr {
        self.end
    }
    /// Length in bytes (never zero).
    pub const fn len(self) -> u64 {
        self.end.0 - self.start.0
    }
    /// Always false: a `VaRange` is never empty. Present for clippy's
    /// `len_without_is_empty` and for symmetry with slices.
    pub const fn is_empty(self) -> bool {
        false
    }
    /// Number of pages when page aligned (rounded up otherwise).
    pub const fn pages(self) -> u64 {
        self.len().div_ceil(PAGE_SIZE)
    }
    /// Whether `a` lies inside.
    pub const fn contains(self, a: VirtAddr) -> bool {
        self.start.0 <= a.0 && a.0 < self.end.0
    }
    /// Whether `other` lies wholly inside.
    pub const fn covers(self, other: VaRange) -> bool {
        self.start.0 <= other.start.0 && other.end.0 <= self.end.0
    }
    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(self, other: VaRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }
    /// The common part, if any.
    pub fn intersect(self, other: VaRange) -> Option<VaRange> {
        let s = self.start.max(other.start);
        let e = self.end.min(other.end);
        (s < e).then_some(VaRange { start: s, end: e })
    }
    /// Iterates over the page-aligned addresses of the pages the range touches.
    pub fn page_addrs(self) -> impl Iterator<Item = VirtAddr> {
        let first = self.start.page_down().0;
        let last = self.end.0 - 1;
        (first..=last).step_by(PAGE_SIZE as usize).map(VirtAddr)
    }
}

impl fmt::Debug for VaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

impl fmt::Display for VaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ranges_are_typed_errors() {
        assert!(matches!(
            VaRange::from_start_len(VirtAddr(4096), 0),
            Err(RangeError::Empty { .. })
        ));
        assert!(matches!(
            VaRange::from_start_len(VirtAddr(u64::MAX - 10), 4096),
            Err(RangeError::Overflow { .. })
        ));
        assert!(matches!(
            VaRange::user_pages(VirtAddr(4097), 4096),
            Err(RangeError::Unaligned { .. })
        ));
        assert!(matches!(
            VaRange::user_pages(VirtAddr(0xffff_8000_0000_0000), 4096),
            Err(RangeError::KernelHalf { .. })
        ));
        assert!(matches!(
            VaRange::new(VirtAddr(10), VirtAddr(10)),
            Err(RangeError::Empty { .. })
        ));
    }

    #[test]
    fn geometry() {
        let r = VaRange::new(VirtAddr(0x1001), VirtAddr(0x3001)).unwrap();
        assert_eq!(r.len(), 0x2000);
        assert_eq!(r.page_addrs().count(), 3);
        let c = r.page_cover().unwrap();
        assert_eq!((c.start().0, c.end().0), (0x1000, 0x4000));
        let o = VaRange::new(VirtAddr(0x3000), VirtAddr(0x5000)).unwrap();
        assert!(r.overlaps(o));
        assert_eq!(r.intersect(o).unwrap().len(), 1);
        let d = VaRange::new(VirtAddr(0x3001), VirtAddr(0x5000)).unwrap();
        assert!(!r.overlaps(d));
        assert!(r.intersect(d).is_none());
    }
}
