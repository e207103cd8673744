//! `check_invariants`: a full walk over all metadata proving the free lists, block types,
//! caches and counters consistent.

#![allow(clippy::needless_range_loop)] // (order, freetype) tables are indexed in step

use crate::buddy::BuddyAllocator;
use crate::freelist::NR_ORDERS;
use crate::freetype::Freetype;
use crate::meta::{NIL, ST_ALLOC, ST_CACHED, ST_FREE, ST_NONE, ST_ORDER};
use crate::pcp::{is_cached_order, CACHED_ORDERS};
use crate::stage2::Stage2;
use crate::MAX_ORDER;
use alloc::vec;

impl<S: Stage2> BuddyAllocator<S> {
    /// Walk all metadata and check that it is consistent. O(number of pages).
    ///
    /// Checks: every page belongs to exactly one naturally aligned block (free, cached or
    /// allocated) inside the range and only heads carry a state; free blocks have their
    /// pageblocks' freetype and are fully merged (no free buddy of the same order and
    /// visibility); allocations and cached pages have their pageblocks' visibility; every
    /// free list is a well-formed doubly linked list of exactly the free heads of its
    /// (order, freetype) with the right non-empty bit; the caches hold exactly the
    /// cached pages; the free page count matches; no (order, freetype) has more live
    /// allocations than allocations counted (frees are derived from the two).
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        if self.meta.len() as u64 != self.nr || self.links.len() as u64 != self.nr {
            return Err("metadata array length differs from the page count");
        }
        let mut free_blocks = [[0u64; Freetype::COUNT]; NR_ORDERS];
        let mut live = [[0u64; Freetype::COUNT]; NR_ORDERS];
        let mut cached = [[0u64; Freetype::COUNT]; NR_ORDERS];
        let mut free_pages = 0u64;
        let mut off = 0u64;
        while off < self.nr {
            let m = self.meta[off as usize];
            let pfn = self.base + off;
            let o = if m.state & ST_CACHED != 0 {
                if m.state & (ST_FREE | ST_ALLOC) != 0 || !is_cached_order(m.state & ST_ORDER) {
                    return Err("cached block with extra state bits or an uncached order");
                }
                m.state & ST_ORDER
            } else if m.state & (ST_FREE | ST_ALLOC) != 0 {
                if m.state & ST_FREE != 0 && m.state & ST_ALLOC != 0 {
                    return Err("page both free and allocated");
                }
                m.state & ST_ORDER
            } else {
                return Err("page covered by no block (no head state)");
            };
            if o > MAX_ORDER {
                return Err("block order above MAX_ORDER");
            }
            let n = 1u64 << o;
            if pfn & (n - 1) != 0 {
                return Err("block not naturally aligned");
            }
            if off + n > self.nr {
                return Err("block extends past the range");
            }
            for t in off + 1..off + n {
                if self.meta[t as usize].state != ST_NONE {
                    return Err("tail page carries a head state");
                }
            }
            let ft = m.ft as usize;
            if ft >= Freetype::COUNT {
                return Err("freetype index out of range");
            }
            let first = self.pb_index(off as u32);
            let last = self.pb_index((off + n - 1) as u32);
            let blocks = &self.pb[first..=last];
            if blocks.iter().any(|&b| b as usize >= Freetype::COUNT) {
                return Err("pageblock freetype index out of range");
            }
            let vis = Freetype::ALL[ft].visibility();
            if blocks
                .iter()
                .any(|&b| Freetype::ALL[b as usize].visibility() != vis)
            {
                return Err("block visibility differs from its pageblock's");
            }
            if m.state & ST_FREE != 0 {
                if blocks.iter().any(|&b| b as usize != ft) {
                    return Err("free block not on its pageblock's freetype lists");
                }
                free_blocks[o as usize][ft] += 1;
                free_pages += n;
                if o < MAX_ORDER {
                    let bpfn = pfn ^ n;
                    if bpfn >= self.base && bpfn < self.base + self.nr {
                        let bm = self.meta[(bpfn - self.base) as usize];
                        if bm.state == ST_FREE | o
                            && Freetype::ALL[bm.ft as usize].flags() == Freetype::ALL[ft].flags()
                        {
                            return Err("two free buddies of the same visibility not merged");
                        }
                    }
                }
            } else if m.state & ST_ALLOC != 0 {
                live[o as usize][ft] += 1;
            } else {
                cached[o as usize][ft] += 1;
                free_pages += n;
            }
            off += n;
        }
        // Free lists.
        for o in 0..NR_ORDERS {
            for ft in 0..Freetype::COUNT {
                let mut cur = self.lists.head(o, ft);
                let mut prev = NIL;
                let mut k = 0u64;
                while cur != NIL {
                    if cur as u64 >= self.nr {
                        return Err("free list link out of range");
                    }
                    let m = self.meta[cur as usize];
                    if m.state != ST_FREE | o as u8 || m.ft as usize != ft {
                        return Err("free list holds a block of another order or freetype");
                    }
                    let l = self.links[cur as usize];
                    if l.prev != prev {
                        return Err("free list prev link broken");
                    }
                    k += 1;
                    if k > free_blocks[o][ft] {
                        return Err("free list longer than its free blocks (cycle or stray)");
                    }
                    prev = cur;
                    cur = l.next;
                }
                if k != free_blocks[o][ft] {
                    return Err("free list count differs from the free blocks");
                }
                if (self.lists.nonempty[ft] >> o & 1 != 0) != (k != 0) {
                    return Err("non-empty mask differs from the lists");
                }
            }
        }
        // Caches.
        let mut seen = vec![
            false;
            if self.pcp.is_empty() {
                0
            } else {
                self.nr as usize
            }
        ];
        for o in CACHED_ORDERS {
            for (ft, &want) in cached[o as usize].iter().enumerate() {
                if self.pcp.len(o, ft) as u64 != want {
                    return Err("cache length differs from the cached blocks");
                }
                for &p in self.pcp.blocks(o, ft) {
                    let m = self
                        .meta
                        .get(p as usize)
                        .ok_or("cached block out of range")?;
                    if m.state != ST_CACHED | o || m.ft as usize != ft {
                        return Err("cache holds a block that is not cached for it");
                    }
                    if core::mem::replace(&mut seen[p as usize], true) {
                        return Err("block cached twice");
                    }
                }
            }
        }
        if free_pages != self.free_pages_count() {
            return Err("free page counter differs from the free blocks");
        }
        for o in 0..NR_ORDERS {
            for ft in 0..Freetype::COUNT {
                let i = o * Freetype::COUNT + ft;
                // Frees are derived (`allocs - live`, see `snapshot`): no allocation may
                // be live that was never counted.
                if self.ctr.allocs[i] < live[o][ft] {
                    return Err("more live allocations than allocs");
                }
            }
        }
        Ok(())
    }
}
