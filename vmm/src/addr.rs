//! Typed addresses: guest physical addresses ([`Gpa`]) and host virtual addresses
//! ([`HostAddr`]), so a page frame number or a host pointer cannot pass for a GPA.

use serde::Serialize;

/// Size of a guest page.
const PAGE_SIZE: u64 = 4096;

/// A guest physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The first byte of page frame `pfn`, or None when it does not fit 64 bits.
    pub fn from_pfn(pfn: allocator::Pfn) -> Option<Gpa> {
        pfn.checked_mul(PAGE_SIZE).map(Gpa)
    }

    /// The page frame number containing this address.
    pub const fn pfn(self) -> allocator::Pfn {
        self.0 / PAGE_SIZE
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
        assert_eq!(Gpa(3 * 4096 + 7).pfn(), 3);
        assert_eq!(Gpa::from_pfn(u64::MAX / 2), None);
        assert_eq!(Gpa(u64::MAX).checked_add(1), None);
        assert!(Gpa(8192).is_page_aligned() && !Gpa(8193).is_page_aligned());
    }
}
