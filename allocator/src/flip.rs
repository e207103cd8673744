//! Flips: turning a whole free pageblock (or a larger free block) of one mapped-ness into the
//! other, with one stage-2 call per contiguous range.
//!
//! To unmapped: `Stage2::unmap` once for the range. To mapped: `Stage2::zero` then
//! `Stage2::map`, so a block never becomes reachable before it has been zeroed. If the
//! stage-2 call fails the block goes back, merged, onto the lists it came from and the
//! request fails with [`AllocError::Stage2`]. Requests that may not block never flip.

use crate::buddy::BuddyAllocator;
use crate::error::AllocError;
use crate::freetype::Freetype;
use crate::gfp::AllocRequest;
use crate::stage2::Stage2;
use crate::{MAX_ORDER, PAGEBLOCK_ORDER};

impl<S: Stage2> BuddyAllocator<S> {
    /// The smallest free block of order `>= min_order` on the lists of a freetype whose
    /// mapped-ness differs from `target`'s: `(order, freetype index)`.
    pub(crate) fn flip_candidate(&self, target: Freetype, min_order: u8) -> Option<(u8, usize)> {
        (min_order..=MAX_ORDER).find_map(|o| {
            Freetype::ALL
                .iter()
                .filter(|f| f.is_unmapped() != target.is_unmapped())
                .map(|f| f.index())
                .find(|&f| self.lists.nonempty[f] & (1 << o) != 0)
                .map(|f| (o, f))
        })
    }

    /// Flip a whole free pageblock (or order-10 block) to the request's mapped-ness and
    /// allocate `order` from it.
    pub(crate) fn flip_alloc(&mut self, req: AllocRequest, order: u8) -> Result<u32, AllocError> {
        let target = req.freetype;
        let flip_order = order.max(PAGEBLOCK_ORDER);
        let Some((cur, src)) = self.flip_candidate(target, flip_order) else {
            return Err(if self.free == 0 {
                AllocError::OutOfMemory {
                    order,
                    freetype: target,
                }
            } else {
                AllocError::NoFreePageblock {
                    order,
                    freetype: target,
                    free_pages: self.free,
                }
            });
        };
        if !req.may_flip {
            return Err(AllocError::WouldBlock {
                order,
                freetype: target,
            });
        }
        let off = self
            .lists
            .pop(&mut self.links, cur as usize, src)
            .expect("candidate list is non-empty");
        self.meta[off as usize].state = 0;
        // Keep the part we do not flip on its own lists: the upper halves of the split.
        self.expand(off, flip_order, cur, src);

        let pfn = self.base + off as u64;
        let n = 1u64 << flip_order;
        let res = if target.is_unmapped() {
            let r = self.s2.unmap(pfn, n);
            if r.is_ok() {
                self.ctr.stage2_unmap_calls += 1;
                self.ctr.stage2_pages_unmapped += n;
            }
            r
        } else {
            match self.s2.zero(pfn, n) {
                Ok(()) => {
                    self.ctr.stage2_zero_calls += 1;
                    self.ctr.pages_zeroed += n;
                    self.ctr.pages_zeroed_on_flip += n;
                    let r = self.s2.map(pfn, n);
                    if r.is_ok() {
                        self.ctr.stage2_map_calls += 1;
                        self.ctr.stage2_pages_mapped += n;
                    }
                    r
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = res {
            self.ctr.stage2_failures += 1;
            // Roll back: the block is still of the source mapped-ness; merge it back.
            self.free_to_buddy(off, flip_order, src);
            return Err(AllocError::Stage2(e));
        }
        let t = target.index();
        self.set_pageblocks(off, flip_order, t);
        let blocks = n >> PAGEBLOCK_ORDER;
        if target.is_unmapped() {
            self.ctr.flips_to_unmapped += blocks;
            self.ctr.flip_calls_to_unmapped += 1;
        } else {
            self.ctr.flips_to_mapped += blocks;
            self.ctr.flip_calls_to_mapped += 1;
        }
        self.expand(off, order, flip_order, t);
        Ok(off)
    }
}
