//! `unmapped-cache`: a separate cache of unmapped pages, as in the 2023 `__GFP_UNMAPPED` RFC.
//!
//! The cache is a small buddy allocator over 2 MiB chunks. When it has no block of the
//! requested order it takes an order-9 (2 MiB) block from the normal allocator (unmovable),
//! unmaps it with one stage-2 call and adds it as a new chunk. Frees are zeroed (init_on_free,
//! as the freetype policy does) and go back to the cache, where buddies merge. Decision: the
//! cache **never returns chunks** to the normal allocator, even fully free ones (no shrinker):
//! that keeps stage-2 work minimal and shows the cost of the design, memory stranded as
//! unmapped. Requests above order 9 bypass the cache: allocated normally, unmapped, and zeroed +
//! mapped back on free.

use std::collections::BTreeSet;

use allocator::{BuddyAllocator, Config, Gfp, Snapshot, Stage2, PAGEBLOCK_ORDER, PAGEBLOCK_PAGES};

use super::{is_unmapped, mapped_gfp, Engine, Failure, Layout};
use crate::tracker::Tracker;

/// A buddy allocator over chunks of `2^PAGEBLOCK_ORDER` pages (free lists only; callers track
/// what they allocated).
#[derive(Debug, Default)]
pub struct UnmappedCache {
    free: [BTreeSet<u64>; PAGEBLOCK_ORDER as usize + 1],
    free_pages: u64,
    chunks: u64,
}

impl UnmappedCache {
    /// Add a free, 2 MiB-aligned chunk.
    pub fn add_chunk(&mut self, pfn: u64) {
        self.free[PAGEBLOCK_ORDER as usize].insert(pfn);
        self.free_pages += PAGEBLOCK_PAGES;
        self.chunks += 1;
    }

    /// Take a block of `order` (≤ 9), splitting a larger one if needed.
    pub fn alloc(&mut self, order: u8) -> Option<u64> {
        let k = (order..=PAGEBLOCK_ORDER).find(|&k| !self.free[k as usize].is_empty())?;
        let pfn = self.free[k as usize].pop_first()?;
        for j in (order..k).rev() {
            self.free[j as usize].insert(pfn + (1 << j));
        }
        self.free_pages -= 1 << order;
        Some(pfn)
    }

    /// Return a block of `order`, merging with free buddies up to a whole chunk.
    pub fn free(&mut self, mut pfn: u64, order: u8) {
        self.free_pages += 1 << order;
        let mut o = order;
        while o < PAGEBLOCK_ORDER {
            let buddy = pfn ^ (1 << o);
            if !self.free[o as usize].remove(&buddy) {
                break;
            }
            pfn = pfn.min(buddy);
            o += 1;
        }
        self.free[o as usize].insert(pfn);
    }

    /// Free pages in the cache.
    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// Chunks ever added.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Whole chunks that are entirely free (a shrinker could return them).
    pub fn free_chunks(&self) -> u64 {
        self.free[PAGEBLOCK_ORDER as usize].len() as u64
    }
}

/// The unmapped-cache policy.
pub(crate) struct CachePolicy<S: Stage2> {
    a: BuddyAllocator<Tracker<S>>,
    cache: UnmappedCache,
}

impl<S: Stage2> CachePolicy<S> {
    pub(crate) fn new(l: Layout, t: Tracker<S>) -> Self {
        CachePolicy {
            a: BuddyAllocator::new(l.base_pfn, l.nr_pages, t, Config::default()),
            cache: UnmappedCache::default(),
        }
    }

    fn refill(&mut self) -> Result<(), Failure> {
        let chunk = self.a.alloc_pages(Gfp::empty(), PAGEBLOCK_ORDER)?.pfn;
        if let Err(e) = self.a.stage2_mut().unmap(chunk, PAGEBLOCK_PAGES) {
            let _ = self.a.free_pages(chunk, PAGEBLOCK_ORDER);
            return Err(e.into());
        }
        self.cache.add_chunk(chunk);
        Ok(())
    }
}

impl<S: Stage2> Engine<S> for CachePolicy<S> {
    fn alloc(&mut self, order: u8, mt: u8, flags: u8, _trace_pfn: u64) -> Result<u64, Failure> {
        if !is_unmapped(flags) {
            return Ok(self.a.alloc_pages(mapped_gfp(mt), order)?.pfn);
        }
        if order > PAGEBLOCK_ORDER {
            let pfn = self.a.alloc_pages(Gfp::empty(), order)?.pfn;
            if let Err(e) = self.a.stage2_mut().unmap(pfn, 1 << order) {
                let _ = self.a.free_pages(pfn, order);
                return Err(e.into());
            }
            return Ok(pfn);
        }
        if let Some(p) = self.cache.alloc(order) {
            return Ok(p);
        }
        self.refill()?;
        self.cache.alloc(order).ok_or(Failure::Other)
    }

    fn free(&mut self, pfn: u64, order: u8, flags: u8) -> bool {
        if !is_unmapped(flags) {
            return self.a.free_pages(pfn, order).is_ok();
        }
        let n = 1u64 << order;
        if self.a.stage2_mut().zero(pfn, n).is_err() {
            return false;
        }
        if order > PAGEBLOCK_ORDER {
            return self.a.stage2_mut().map(pfn, n).is_ok()
                && self.a.free_pages(pfn, order).is_ok();
        }
        self.cache.free(pfn, order);
        true
    }

    fn tracker_mut(&mut self) -> &mut Tracker<S> {
        self.a.stage2_mut()
    }

    fn flips(&self) -> (u64, u64) {
        (self.cache.chunks(), 0)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_splits_and_merges() {
        let mut c = UnmappedCache::default();
        assert_eq!(c.alloc(0), None);
        c.add_chunk(1024);
        let a = c.alloc(0).unwrap();
        let b = c.alloc(0).unwrap();
        let d = c.alloc(3).unwrap();
        assert_eq!((a, b, d), (1024, 1025, 1032));
        assert_eq!(c.free_pages(), 512 - 10);
        assert_eq!(c.free_chunks(), 0);
        c.free(b, 0);
        c.free(a, 0);
        c.free(d, 3);
        assert_eq!(c.free_pages(), 512);
        assert_eq!(c.free_chunks(), 1, "everything merged back into one chunk");
    }
}
