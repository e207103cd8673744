//! Linux's migratetype fallback within one visibility (nonsensitive, sensitive, unmapped): claim a whole pageblock when the
//! request is large or the block is mostly free/compatible, otherwise steal the smallest
//! block (`__rmqueue_claim` / `__rmqueue_steal` in mm/page_alloc.c).

use crate::buddy::BuddyAllocator;
use crate::freetype::{Freetype, Migratetype};
use crate::meta::{ST_ALLOC, ST_FREE, ST_ORDER};
use crate::stage2::Stage2;
use crate::{MAX_ORDER, PAGEBLOCK_ORDER, PAGEBLOCK_PAGES};

/// Linux's `should_try_claim_block`: large requests and unmovable/reclaimable requests try
/// to claim the whole block.
pub(crate) const fn should_try_claim(order: u8, start: Migratetype) -> bool {
    order >= PAGEBLOCK_ORDER
        || order >= PAGEBLOCK_ORDER / 2
        || matches!(start, Migratetype::Reclaimable | Migratetype::Unmovable)
}

impl<S: Stage2> BuddyAllocator<S> {
    /// The fallback freetypes of `ft` with the same visibility, in Linux's order.
    fn fallback_types(ft: Freetype) -> [Option<Freetype>; 2] {
        let [a, b] = ft.migratetype().fallbacks();
        let v = ft.visibility();
        [
            Freetype::with_visibility(a, v),
            Freetype::with_visibility(b, v),
        ]
    }

    /// The first fallback freetype with a free block of exactly `order`.
    fn find_suitable_fallback(&self, order: u8, ft: Freetype) -> Option<usize> {
        Self::fallback_types(ft)
            .into_iter()
            .flatten()
            .map(|f| f.index())
            .find(|&f| self.lists.nonempty[f] & (1 << order) != 0)
    }

    /// Claim, then steal. Returns the offset of a block of `order` taken off the lists.
    pub(crate) fn rmqueue_fallback(&mut self, ft: Freetype, order: u8) -> Option<u32> {
        // Claim: largest blocks first.
        let mut cur = MAX_ORDER;
        loop {
            if let Some(fb) = self.find_suitable_fallback(cur, ft) {
                if !should_try_claim(cur, ft.migratetype()) {
                    break;
                }
                let off = self.lists.head(cur as usize, fb);
                if let Some(p) = self.try_claim(off, cur, order, ft, fb) {
                    self.ctr.fallbacks_claim += 1;
                    return Some(p);
                }
            }
            if cur == order {
                break;
            }
            cur -= 1;
        }
        // Steal: smallest block first; the remainder stays on the block's own lists.
        for cur in order..=MAX_ORDER {
            if let Some(fb) = self.find_suitable_fallback(cur, ft) {
                let off = self.lists.pop(&mut self.links, cur as usize, fb)?;
                self.meta[off as usize].state = 0;
                self.expand(off, order, cur, fb);
                self.ctr.fallbacks_steal += 1;
                return Some(off);
            }
        }
        None
    }

    /// Linux's `try_to_claim_block` for the free block `off` of order `cur` on list `fb`.
    fn try_claim(&mut self, off: u32, cur: u8, order: u8, ft: Freetype, fb: usize) -> Option<u32> {
        let start = ft.index();
        if cur >= PAGEBLOCK_ORDER {
            self.lists.remove(&mut self.links, off, cur as usize, fb);
            self.meta[off as usize].state = 0;
            self.set_pageblocks(off, cur, start);
            self.expand(off, order, cur, start);
            return Some(off);
        }
        // The whole pageblock must lie inside the managed range.
        let pfn = self.base + off as u64;
        let pb_pfn = pfn & !(PAGEBLOCK_PAGES - 1);
        if pb_pfn < self.base || pb_pfn + PAGEBLOCK_PAGES > self.base + self.nr {
            return None;
        }
        let pb_off = (pb_pfn - self.base) as u32;
        let (free, movable) = self.count_pageblock(pb_off);
        let block_mt = Freetype::ALL[fb].migratetype();
        let alike = if ft.migratetype() == Migratetype::Movable {
            movable
        } else if block_mt == Migratetype::Movable {
            PAGEBLOCK_PAGES - (free + movable)
        } else {
            0
        };
        if free + alike < PAGEBLOCK_PAGES / 2 {
            return None;
        }
        self.move_freepages_block(pb_off, fb, start);
        let pbi = self.pb_index(pb_off);
        self.pb[pbi] = start as u8;
        self.rmqueue_smallest(start, order)
    }

    /// Free pages on the buddy lists and pages of movable allocations in the pageblock at
    /// `pb_off` (a walk over its block heads: at most 512 steps).
    fn count_pageblock(&self, pb_off: u32) -> (u64, u64) {
        let (mut free, mut movable) = (0u64, 0u64);
        let mut i = pb_off;
        let end = pb_off + PAGEBLOCK_PAGES as u32;
        while i < end {
            let m = self.meta[i as usize];
            let n = 1u32 << (m.state & ST_ORDER);
            if m.state & ST_FREE != 0 {
                free += n as u64;
                i += n;
            } else if m.state & ST_ALLOC != 0 {
                if Freetype::ALL[m.ft as usize].migratetype() == Migratetype::Movable {
                    movable += n as u64;
                }
                i += n;
            } else {
                i += 1;
            }
        }
        (free, movable)
    }

    /// Move every free buddy block of the pageblock at `pb_off` from `from`'s lists to `to`'s.
    fn move_freepages_block(&mut self, pb_off: u32, from: usize, to: usize) {
        let mut i = pb_off;
        let end = pb_off + PAGEBLOCK_PAGES as u32;
        while i < end {
            let m = self.meta[i as usize];
            if m.state & ST_FREE != 0 {
                let o = m.state & ST_ORDER;
                if m.ft as usize == from {
                    self.lists.remove(&mut self.links, i, o as usize, from);
                    self.set_free_head(i, o, to);
                    self.lists.push(&mut self.links, i, o as usize, to);
                }
                i += 1 << o;
            } else if m.state & ST_ALLOC != 0 {
                i += 1 << (m.state & ST_ORDER);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_policy_matches_linux() {
        assert!(should_try_claim(0, Migratetype::Unmovable));
        assert!(should_try_claim(0, Migratetype::Reclaimable));
        assert!(!should_try_claim(0, Migratetype::Movable));
        assert!(!should_try_claim(3, Migratetype::Movable));
        assert!(should_try_claim(4, Migratetype::Movable));
        assert!(should_try_claim(9, Migratetype::Movable));
    }
}
