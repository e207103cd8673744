//! The only way the allocator changes what the guest can reach.

use crate::error::Stage2Error;
use crate::Pfn;

/// How the allocator changes what the guest can reach. Ranges are whole pages.
///
/// The allocator calls it only on the slow path: `unmap` once per flip to unmapped (a whole
/// pageblock or more), `zero` then `map` once each per flip back to mapped, and `zero` for
/// `Gfp::ZERO` allocations and for `init_on_free`. It never calls `map` or `unmap` on free.
pub trait Stage2 {
    /// Remove [pfn, pfn+count) from the direct map (one flush for the range).
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Expose [pfn, pfn+count) again (the allocator has zeroed it first).
    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Zero [pfn, pfn+count) (mapped or not).
    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Zero several ranges `(pfn, count)` in one call ([`crate::Zone`] zeroes a CPU's freed
    /// unmapped blocks this way). The default zeroes them one by one with [`Stage2::zero`],
    /// stopping at the first error; a backend that can batch overrides it.
    fn zero_batch(&mut self, ranges: &[(Pfn, u64)]) -> Result<(), Stage2Error> {
        ranges.iter().try_for_each(|&(pfn, n)| self.zero(pfn, n))
    }
}

impl<T: Stage2 + ?Sized> Stage2 for &mut T {
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        (**self).unmap(pfn, count)
    }
    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        (**self).map(pfn, count)
    }
    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        (**self).zero(pfn, count)
    }
    fn zero_batch(&mut self, ranges: &[(Pfn, u64)]) -> Result<(), Stage2Error> {
        (**self).zero_batch(ranges)
    }
}

/// A backend that does nothing and never fails (benchmarks, pure allocator studies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NullStage2;

impl Stage2 for NullStage2 {
    fn unmap(&mut self, _pfn: Pfn, _count: u64) -> Result<(), Stage2Error> {
        Ok(())
    }
    fn map(&mut self, _pfn: Pfn, _count: u64) -> Result<(), Stage2Error> {
        Ok(())
    }
    fn zero(&mut self, _pfn: Pfn, _count: u64) -> Result<(), Stage2Error> {
        Ok(())
    }
}
