//! Counters and the snapshot the VMM prints and serializes.

use crate::freelist::{NR_LISTS, NR_ORDERS};
use crate::freetype::Freetype;
use crate::{MAX_ORDER, PAGEBLOCK_ORDER};

/// Event counters kept by the allocator (all monotonic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Counters {
    pub flips_to_unmapped: u64,
    pub flips_to_mapped: u64,
    pub flip_calls_to_unmapped: u64,
    pub flip_calls_to_mapped: u64,
    pub stage2_unmap_calls: u64,
    pub stage2_map_calls: u64,
    pub stage2_zero_calls: u64,
    pub stage2_pages_unmapped: u64,
    pub stage2_pages_mapped: u64,
    pub stage2_failures: u64,
    pub pages_zeroed: u64,
    pub pages_zeroed_on_alloc: u64,
    pub pages_zeroed_on_free: u64,
    pub pages_zeroed_on_flip: u64,
    /// Successful allocations, flat: `order * Freetype::COUNT + ft`.
    pub allocs: [u64; NR_LISTS],
    pub fallbacks_claim: u64,
    pub fallbacks_steal: u64,
    pub alloc_failures: u64,
    pub free_failures: u64,
    pub pcp_drains: u64,
    pub flips_to_sensitive: u64,
    pub flip_calls_to_sensitive: u64,
    pub stage2_sensitive_calls: u64,
    pub stage2_pages_sensitive: u64,
    /// Pageblocks flipped, `[from][to]` by [`crate::Visibility::index`].
    pub flip_matrix: [[u64; 3]; 3],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            flips_to_unmapped: 0,
            flips_to_mapped: 0,
            flip_calls_to_unmapped: 0,
            flip_calls_to_mapped: 0,
            stage2_unmap_calls: 0,
            stage2_map_calls: 0,
            stage2_zero_calls: 0,
            stage2_pages_unmapped: 0,
            stage2_pages_mapped: 0,
            stage2_failures: 0,
            pages_zeroed: 0,
            pages_zeroed_on_alloc: 0,
            pages_zeroed_on_free: 0,
            pages_zeroed_on_flip: 0,
            allocs: [0; NR_LISTS],
            fallbacks_claim: 0,
            fallbacks_steal: 0,
            alloc_failures: 0,
            free_failures: 0,
            pcp_drains: 0,
            flips_to_sensitive: 0,
            flip_calls_to_sensitive: 0,
            stage2_sensitive_calls: 0,
            stage2_pages_sensitive: 0,
            flip_matrix: [[0; 3]; 3],
        }
    }
}

/// A flat `order * COUNT + ft` table as `[order][ft]`.
pub(crate) fn unflatten(t: &[u64; NR_LISTS]) -> [[u64; Freetype::COUNT]; NR_ORDERS] {
    let mut out = [[0u64; Freetype::COUNT]; NR_ORDERS];
    for (o, row) in out.iter_mut().enumerate() {
        row.copy_from_slice(&t[o * Freetype::COUNT..(o + 1) * Freetype::COUNT]);
    }
    out
}

/// Counters and free-list state at one moment.
///
/// Orders index the outer array, [`Freetype::index`] the inner one. `free_per_order` counts
/// free *blocks* on the buddy lists (like `/proc/pagetypeinfo`; pages = blocks << order);
/// pages parked in the small-block caches are in `pcp_pages` instead. A "flip" counts pageblocks
/// (an order-10 flip is 2 flips but one stage-2 call).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Snapshot {
    /// Pages the allocator manages.
    pub managed_pages: u64,
    /// Free pages (buddy lists plus caches).
    pub free_pages: u64,
    /// Pageblocks flipped from mapped to unmapped.
    pub flips_to_unmapped: u64,
    /// Pageblocks flipped to nonsensitive (mapped in both views) from unmapped or sensitive
    /// (zeroed first).
    pub flips_to_mapped: u64,
    /// Pageblocks flipped to sensitive (full view only) from nonsensitive (not zeroed) or
    /// unmapped (zeroed first).
    pub flips_to_sensitive: u64,
    /// Pageblocks flipped, `[from][to]` by [`crate::Visibility::index`] (nonsensitive,
    /// sensitive, unmapped); the diagonal stays 0.
    pub flip_matrix: [[u64; 3]; 3],
    /// `Stage2::unmap` calls.
    pub stage2_unmap_calls: u64,
    /// `Stage2::map` calls.
    pub stage2_map_calls: u64,
    /// `Stage2::zero` calls (flips back, `ZERO` allocations, init_on_free).
    pub stage2_zero_calls: u64,
    /// Pages passed to `Stage2::unmap`.
    pub stage2_pages_unmapped: u64,
    /// Pages passed to `Stage2::map`.
    pub stage2_pages_mapped: u64,
    /// `Stage2::make_sensitive` calls.
    pub stage2_sensitive_calls: u64,
    /// Pages passed to `Stage2::make_sensitive`.
    pub stage2_pages_sensitive: u64,
    /// Pages zeroed through `Stage2::zero` (all reasons).
    pub pages_zeroed: u64,
    /// Free blocks on the buddy lists: `[order][freetype index]`.
    pub free_per_order: [[u64; Freetype::COUNT]; MAX_ORDER as usize + 1],
    /// Successful allocations: `[order][freetype index]`.
    pub allocs: [[u64; Freetype::COUNT]; MAX_ORDER as usize + 1],
    /// Successful frees, by the allocation's order and freetype.
    pub frees: [[u64; Freetype::COUNT]; MAX_ORDER as usize + 1],
    /// Wholly free pageblocks whose freetype is nonsensitive (mapped in both views).
    pub free_pageblocks_mapped: u64,
    /// Wholly free pageblocks whose freetype is unmapped.
    pub free_pageblocks_unmapped: u64,
    /// Wholly free pageblocks whose freetype is sensitive.
    pub free_pageblocks_sensitive: u64,
    /// Pageblocks holding a live allocation whose migratetype differs from the block's.
    pub mixed_pageblocks: u64,
    /// Fallbacks that claimed a whole pageblock for the requested migratetype.
    pub fallbacks_claim: u64,
    /// Fallbacks that took pages from another migratetype's block without claiming it.
    pub fallbacks_steal: u64,
    /// Failed allocations (every error kind).
    pub alloc_failures: u64,
    /// Refused frees (every error kind).
    pub free_failures: u64,
    /// Stage-2 calls that failed (the allocator rolled back).
    pub stage2_failures: u64,
    /// Stage-2 calls made by flips to unmapped (one per contiguous range).
    pub flip_calls_to_unmapped: u64,
    /// Zero+map call pairs made by flips to mapped.
    pub flip_calls_to_mapped: u64,
    /// Flips to sensitive (one `make_sensitive` call each, after a `zero` from unmapped).
    pub flip_calls_to_sensitive: u64,
    /// Pages zeroed for `Gfp::ZERO`.
    pub pages_zeroed_on_alloc: u64,
    /// Pages zeroed by init_on_free.
    pub pages_zeroed_on_free: u64,
    /// Pages zeroed before a flip back to mapped.
    pub pages_zeroed_on_flip: u64,
    /// Free pages per freetype (buddy lists plus caches).
    pub free_pages_per_freetype: [u64; Freetype::COUNT],
    /// Pages parked in the per-(order, freetype) caches of blocks of order <= 3.
    pub pcp_pages: [u64; Freetype::COUNT],
    /// Times a cache was drained (by [`crate::BuddyAllocator::drain_pcp`], which also runs
    /// before a flip or a failure).
    pub pcp_drains: u64,
    /// Pageblocks (including partial ones at the ends of the range).
    pub pageblocks: u64,
    /// Pageblocks per freetype.
    pub pageblocks_per_freetype: [u64; Freetype::COUNT],
    /// Bytes of allocator metadata (per-page array, pageblock table, caches, lists).
    pub metadata_bytes: u64,
}

impl Snapshot {
    /// Total successful allocations.
    pub fn total_allocs(&self) -> u64 {
        self.allocs.iter().flatten().sum()
    }

    /// Total successful frees.
    pub fn total_frees(&self) -> u64 {
        self.frees.iter().flatten().sum()
    }

    /// Pages free on the buddy lists for `ft` (excluding caches).
    pub fn buddy_free_pages(&self, ft: Freetype) -> u64 {
        (0..=MAX_ORDER as usize)
            .map(|o| self.free_per_order[o][ft.index()] << o)
            .sum()
    }
}

/// The counters of a [`Snapshot`] that cost O(1) to read (O(CPUs) for a [`crate::Zone`]):
/// what a caller that polls often needs, without the snapshot's walk over every page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuickStats {
    /// Pages managed.
    pub managed_pages: u64,
    /// Pages free (buddy lists and caches).
    pub free_pages: u64,
    /// Pageblocks flipped to an unmapped freetype.
    pub flips_to_unmapped: u64,
    /// Pageblocks flipped back to a mapped freetype.
    pub flips_to_mapped: u64,
    /// Stage-2 unmap calls.
    pub stage2_unmap_calls: u64,
    /// Stage-2 map calls.
    pub stage2_map_calls: u64,
    /// Stage-2 zeroing calls.
    pub stage2_zero_calls: u64,
    /// Pages zeroed.
    pub pages_zeroed: u64,
}

impl QuickStats {
    /// The same fields of a full snapshot.
    pub fn of(s: &Snapshot) -> QuickStats {
        QuickStats {
            managed_pages: s.managed_pages,
            free_pages: s.free_pages,
            flips_to_unmapped: s.flips_to_unmapped,
            flips_to_mapped: s.flips_to_mapped,
            stage2_unmap_calls: s.stage2_unmap_calls,
            stage2_map_calls: s.stage2_map_calls,
            stage2_zero_calls: s.stage2_zero_calls,
            pages_zeroed: s.pages_zeroed,
        }
    }
}

impl<S: crate::Stage2> crate::BuddyAllocator<S> {
    /// [`QuickStats`] now, in O(1).
    pub fn quick_stats(&self) -> QuickStats {
        let c = &self.ctr;
        QuickStats {
            managed_pages: self.nr,
            free_pages: self.free_pages_count(),
            flips_to_unmapped: c.flips_to_unmapped,
            flips_to_mapped: c.flips_to_mapped,
            stage2_unmap_calls: c.stage2_unmap_calls,
            stage2_map_calls: c.stage2_map_calls,
            stage2_zero_calls: c.stage2_zero_calls,
            pages_zeroed: c.pages_zeroed,
        }
    }

    /// Counters and free-list state now. O(number of pages) for `mixed_pageblocks` and
    /// `frees` (derived from `allocs` and the live allocations) and O(free blocks) for the
    /// free-list counts; the rest is O(1).
    pub fn snapshot(&self) -> Snapshot {
        use crate::meta::{ST_ALLOC, ST_ORDER};
        let c = &self.ctr;
        let counts = self.lists.counts(&self.links);
        let mut s = Snapshot {
            managed_pages: self.nr,
            free_pages: self.free_pages_count(),
            flips_to_unmapped: c.flips_to_unmapped,
            flips_to_mapped: c.flips_to_mapped,
            stage2_unmap_calls: c.stage2_unmap_calls,
            stage2_map_calls: c.stage2_map_calls,
            stage2_zero_calls: c.stage2_zero_calls,
            stage2_pages_unmapped: c.stage2_pages_unmapped,
            stage2_pages_mapped: c.stage2_pages_mapped,
            stage2_sensitive_calls: c.stage2_sensitive_calls,
            stage2_pages_sensitive: c.stage2_pages_sensitive,
            flips_to_sensitive: c.flips_to_sensitive,
            flip_calls_to_sensitive: c.flip_calls_to_sensitive,
            flip_matrix: c.flip_matrix,
            pages_zeroed: c.pages_zeroed,
            free_per_order: counts,
            allocs: unflatten(&c.allocs),
            fallbacks_claim: c.fallbacks_claim,
            fallbacks_steal: c.fallbacks_steal,
            alloc_failures: c.alloc_failures,
            free_failures: c.free_failures,
            stage2_failures: c.stage2_failures,
            flip_calls_to_unmapped: c.flip_calls_to_unmapped,
            flip_calls_to_mapped: c.flip_calls_to_mapped,
            pages_zeroed_on_alloc: c.pages_zeroed_on_alloc,
            pages_zeroed_on_free: c.pages_zeroed_on_free,
            pages_zeroed_on_flip: c.pages_zeroed_on_flip,
            pcp_drains: c.pcp_drains,
            pageblocks: self.pb.len() as u64,
            metadata_bytes: self.metadata_bytes(),
            ..Snapshot::default()
        };
        for ft in 0..Freetype::COUNT {
            let pcp = self.pcp.pages_of(ft);
            s.pcp_pages[ft] = pcp;
            let buddy: u64 = counts.iter().enumerate().map(|(o, r)| r[ft] << o).sum();
            s.free_pages_per_freetype[ft] = buddy + pcp;
            let whole: u64 = counts
                .iter()
                .enumerate()
                .skip(PAGEBLOCK_ORDER as usize)
                .map(|(o, r)| r[ft] << (o - PAGEBLOCK_ORDER as usize))
                .sum();
            match Freetype::ALL[ft].visibility() {
                crate::Visibility::Unmapped => s.free_pageblocks_unmapped += whole,
                crate::Visibility::Sensitive => s.free_pageblocks_sensitive += whole,
                crate::Visibility::Nonsensitive => s.free_pageblocks_mapped += whole,
            }
        }
        for &t in &self.pb {
            s.pageblocks_per_freetype[t as usize] += 1;
        }
        // Mixed pageblocks: a live allocation of another migratetype than its block's. The
        // same walk counts the live allocations, from which the frees are derived (a free
        // is the only way an allocation stops being live, so `frees = allocs - live`
        // exactly; the free fast path keeps no counter of its own).
        let mut last_mixed = usize::MAX;
        let mut live = [0u64; NR_LISTS];
        let mut off = 0u64;
        while off < self.nr {
            let m = self.meta[off as usize];
            if m.state & ST_ALLOC != 0 {
                live[(m.state & ST_ORDER) as usize * Freetype::COUNT + m.ft as usize] += 1;
                let pbi = self.pb_index(off as u32);
                let bmt = Freetype::ALL[self.pb[pbi] as usize].migratetype();
                if pbi != last_mixed && Freetype::ALL[m.ft as usize].migratetype() != bmt {
                    s.mixed_pageblocks += 1;
                    last_mixed = pbi;
                }
                off += 1 << (m.state & ST_ORDER);
            } else {
                off += 1;
            }
        }
        let mut frees = [0u64; NR_LISTS];
        for (i, f) in frees.iter_mut().enumerate() {
            *f = c.allocs[i].saturating_sub(live[i]);
        }
        s.frees = unflatten(&frees);
        s
    }
}
