//! `per-page`: allocate normally, remove each unmapped allocation from the direct map on its own
//! and restore it (zero, then map) on free, as `memfd_secret` does.
//!
//! One stage-2 call covers one allocation (all its pages, one flush), which is what
//! `secretmem` does for its order-0 folios and slightly favours this policy for larger orders.

use allocator::{BuddyAllocator, Config, Snapshot, Stage2};

use super::{is_unmapped, mapped_gfp, Engine, Failure, Layout};
use crate::tracker::Tracker;

/// The per-page policy.
pub(crate) struct PerPage<S: Stage2> {
    a: BuddyAllocator<Tracker<S>>,
    /// `per-page-batched`: a page whose removal still waits for its shootdown is flushed
    /// before it is reused.
    batched: bool,
}

impl<S: Stage2> PerPage<S> {
    pub(crate) fn new(l: Layout, t: Tracker<S>, batched: bool) -> Self {
        PerPage {
            a: BuddyAllocator::new(l.base_pfn, l.nr_pages, t, Config::default()),
            batched,
        }
    }
}

impl<S: Stage2> Engine<S> for PerPage<S> {
    fn alloc(&mut self, order: u8, mt: u8, flags: u8, _trace_pfn: u64) -> Result<u64, Failure> {
        let pfn = self.a.alloc_pages(mapped_gfp(mt), order)?.pfn;
        if is_unmapped(flags) {
            if let Err(e) = self.a.stage2_mut().unmap(pfn, 1 << order) {
                // Could not remove it: the allocation fails and the page goes back.
                let _ = self.a.free_pages(pfn, order);
                return Err(e.into());
            }
        }
        Ok(pfn)
    }

    fn free(&mut self, pfn: u64, order: u8, flags: u8) -> bool {
        if is_unmapped(flags) {
            let s2 = self.a.stage2_mut();
            if self.batched {
                s2.flush_before_reuse(pfn, 1 << order);
            }
            if s2.zero(pfn, 1 << order).is_err() || s2.map(pfn, 1 << order).is_err() {
                // Still unmapped (or not zeroed): it must not be handed out again; leak it.
                return false;
            }
        }
        self.a.free_pages(pfn, order).is_ok()
    }

    fn tracker_mut(&mut self) -> &mut Tracker<S> {
        self.a.stage2_mut()
    }

    fn flips(&self) -> (u64, u64) {
        (0, 0)
    }

    fn snapshot(&self) -> Option<Snapshot> {
        Some(self.a.snapshot())
    }

    fn into_tracker(self) -> Tracker<S> {
        self.a.into_stage2()
    }
}
