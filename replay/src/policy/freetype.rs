//! `freetype`: Veil's allocator does everything (pageblock flips; free never remaps).

use allocator::{BuddyAllocator, Config, Gfp, Snapshot, Stage2};

use super::{is_atomic, is_unmapped, mapped_gfp, Engine, Failure, Layout};
use crate::tracker::Tracker;

/// The freetype policy.
pub(crate) struct Freetype<S: Stage2> {
    a: BuddyAllocator<Tracker<S>>,
    honour_atomic: bool,
}

impl<S: Stage2> Freetype<S> {
    pub(crate) fn new(l: Layout, t: Tracker<S>, honour_atomic: bool) -> Self {
        Freetype {
            a: BuddyAllocator::new(l.base_pfn, l.nr_pages, t, Config::default()),
            honour_atomic,
        }
    }
}

/// The allocator request for a trace allocation of migratetype `mt` with the replay's `flags`
/// (shared by `freetype` and `freetype-pcp`). Only unmovable|unmapped has free lists (as in
/// the kernel): unmapped requests drop their migratetype.
pub(super) fn request_gfp(mt: u8, flags: u8, honour_atomic: bool) -> Gfp {
    let gfp = if is_unmapped(flags) {
        Gfp::UNMAPPED
    } else {
        mapped_gfp(mt)
    };
    if honour_atomic && is_atomic(flags) {
        Gfp::ATOMIC | gfp
    } else {
        gfp
    }
}

impl<S: Stage2> Engine<S> for Freetype<S> {
    fn alloc(&mut self, order: u8, mt: u8, flags: u8, _trace_pfn: u64) -> Result<u64, Failure> {
        Ok(self
            .a
            .alloc_pages(request_gfp(mt, flags, self.honour_atomic), order)?
            .pfn)
    }

    fn free(&mut self, pfn: u64, order: u8, _flags: u8) -> bool {
        self.a.free_pages(pfn, order).is_ok()
    }

    fn tracker_mut(&mut self) -> &mut Tracker<S> {
        self.a.stage2_mut()
    }

    fn flips(&self) -> (u64, u64) {
        let s = self.a.snapshot();
        (s.flips_to_unmapped, s.flips_to_mapped)
    }

    fn snapshot(&self) -> Option<Snapshot> {
        Some(self.a.snapshot())
    }

    fn into_tracker(self) -> Tracker<S> {
        self.a.into_stage2()
    }

    fn has_kinds(&self) -> bool {
        true
    }

    fn compactable(&self) -> bool {
        true
    }

    fn drain(&mut self) {
        self.a.drain_pcp();
    }
}
