//! Typed addresses: guest physical addresses ([`Gpa`]), guest page frame numbers ([`Pfn`]) and
//! host virtual addresses ([`HostAddr`]), so a page frame number or a host pointer cannot pass
//! for a GPA. Raw `u64`s are for the ABI boundaries only (hypercall registers, KVM exits, the
//! allocator crate's `allocator::Pfn`) and serialized output.

use serde::Serialize;

/// Size of a guest page.
const PAGE_SIZE: u64 = 4096;

/// A guest physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The first byte of the allocator's page frame `pfn`, or None when it does not fit 64 bits.
    pub fn from_pfn(pfn: allocator::Pfn) -> Option<Gpa> {
        Pfn::new(pfn).map(Pfn::gpa)
    }

    /// The page frame containing this address.
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 / PAGE_SIZE)
    }

    /// The first byte of the page holding this address.
    pub const fn page_start(self) -> Gpa {
        Gpa(self.0 & !(PAGE_SIZE - 1))
    }

    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// This address plus `len` bytes, or None on overflow.
    pub fn checked_add(self, len: u64) -> Option<Gpa> {
        self.0.checked_add(len).map(Gpa)
    }

    /// Whether the address is 4 KiB aligned.
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }
}

impl std::fmt::LowerHex for Gpa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// A guest page frame number (GPA >> 12); always one whose first byte fits a [`Gpa`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Pfn(u64);

impl Pfn {
    /// Page frame `raw` (an `allocator::Pfn`), or None when its first byte does not fit 64 bits.
    pub const fn new(raw: u64) -> Option<Pfn> {
        if raw <= u64::MAX / PAGE_SIZE {
            Some(Pfn(raw))
        } else {
            None
        }
    }

    /// The first byte of the frame.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 * PAGE_SIZE)
    }

    /// The raw frame number (what the allocator crate takes).
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The frame `pages` further on, or None when it would not be a frame.
    pub fn checked_add(self, pages: u64) -> Option<Pfn> {
        self.0.checked_add(pages).and_then(Pfn::new)
    }
}

/// A host virtual address in the VMM's address space (where a guest page is mapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct HostAddr(pub u64);

impl HostAddr {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl std::fmt::LowerHex for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pfn_round_trip_and_overflow() {
        assert_eq!(Gpa::from_pfn(3), Some(Gpa(3 * 4096)));
        assert_eq!(Gpa(3 * 4096 + 7).pfn().raw(), 3);
        assert_eq!(Gpa(3 * 4096 + 7).pfn().gpa(), Gpa(3 * 4096));
        assert_eq!(Gpa(3 * 4096 + 7).page_start(), Gpa(3 * 4096));
        assert_eq!(Gpa(u64::MAX).pfn().gpa(), Gpa(!0xfff));
        assert_eq!(Gpa::from_pfn(u64::MAX / 2), None);
        assert_eq!(Pfn::new(u64::MAX >> 12).map(Pfn::gpa), Some(Gpa(!0xfff)));
        assert_eq!(Pfn::new((u64::MAX >> 12) + 1), None);
        assert_eq!(Pfn::new(u64::MAX >> 12).unwrap().checked_add(1), None);
        assert_eq!(Pfn::new(5).unwrap().checked_add(2), Pfn::new(7));
        assert_eq!(Gpa(u64::MAX).checked_add(1), None);
        assert!(Gpa(8192).is_page_aligned() && !Gpa(8193).is_page_aligned());
    }
}
