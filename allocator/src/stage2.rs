//! The only way the allocator changes what the guest can reach.

use crate::error::Stage2Error;
use crate::Pfn;

/// How the allocator changes what the guest can reach. Ranges are whole pages.
///
/// # Two views, three states
///
/// A backend may keep two views of guest memory, ASI's *restricted* (nonsensitive) and
/// *full* (sensitive) address spaces. Every page is in one of three states:
///
/// | state | restricted view | full view | set by |
/// |---|---|---|---|
/// | mapped (nonsensitive) | read-write | read-write | [`Stage2::map`] |
/// | sensitive | absent | read-write | [`Stage2::make_sensitive`] |
/// | unmapped | absent | absent | [`Stage2::unmap`] |
///
/// Each call sets its state whatever the range's state before. A backend with one view
/// (no ASI) treats "sensitive" as unsupported: the default [`Stage2::make_sensitive`] fails
/// with [`Stage2Error::Unsupported`], so an allocator asked for sensitive pages fails
/// loudly instead of handing out pages the restricted view can see.
///
/// # Zeroing rule
///
/// The allocator zeroes a range (with [`Stage2::zero`]) before every transition that makes
/// it visible where it was not: unmapped → sensitive, unmapped → mapped and sensitive →
/// mapped. Transitions that only take visibility away (mapped → sensitive, anything →
/// unmapped) do not zero.
///
/// The allocator calls it only on the slow path: once per flip of a whole pageblock or more
/// (`unmap`, `make_sensitive`, or `zero` then `map` / `make_sensitive`), and `zero` for
/// `Gfp::ZERO` allocations and for `init_on_free`. It never calls `map`, `unmap` or
/// `make_sensitive` on free.
pub trait Stage2 {
    /// Remove [pfn, pfn+count) from both views (one flush for the range).
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Expose [pfn, pfn+count) in both views (the allocator has zeroed it first unless it was
    /// already visible in both).
    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Zero [pfn, pfn+count) (whatever its state).
    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Make [pfn, pfn+count) sensitive: mapped read-write in the full view only, absent from
    /// the restricted view, whatever its state before (the allocator has zeroed it first if
    /// it was unmapped). The default refuses with [`Stage2Error::Unsupported`]: a backend
    /// without two views cannot hold sensitive pages.
    fn make_sensitive(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let _ = (pfn, count);
        Err(Stage2Error::Unsupported)
    }
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
    fn make_sensitive(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        (**self).make_sensitive(pfn, count)
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
    fn make_sensitive(&mut self, _pfn: Pfn, _count: u64) -> Result<(), Stage2Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend with one view only.
    struct OneView;
    impl Stage2 for OneView {
        fn unmap(&mut self, _: Pfn, _: u64) -> Result<(), Stage2Error> {
            Ok(())
        }
        fn map(&mut self, _: Pfn, _: u64) -> Result<(), Stage2Error> {
            Ok(())
        }
        fn zero(&mut self, _: Pfn, _: u64) -> Result<(), Stage2Error> {
            Ok(())
        }
    }

    #[test]
    fn sensitive_is_refused_by_default_and_forwarded() {
        assert_eq!(OneView.make_sensitive(0, 1), Err(Stage2Error::Unsupported));
        let mut v = OneView;
        let mut r: &mut OneView = &mut v;
        assert_eq!(
            <&mut OneView as Stage2>::make_sensitive(&mut r, 0, 1),
            Err(Stage2Error::Unsupported)
        );
        assert_eq!(NullStage2.make_sensitive(0, 512), Ok(()));
        let mut n = NullStage2;
        let mut rn: &mut NullStage2 = &mut n;
        assert_eq!(
            <&mut NullStage2 as Stage2>::make_sensitive(&mut rn, 0, 512),
            Ok(())
        );
    }
}
