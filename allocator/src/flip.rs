//! Flips: turning a whole free pageblock (or a larger free block) of one visibility
//! (nonsensitive, sensitive, unmapped) into another, with one stage-2 call per contiguous
//! range (two when it must be zeroed first).
//!
//! | from → to | stage-2 calls |
//! |---|---|
//! | nonsensitive → unmapped, sensitive → unmapped | `unmap` |
//! | nonsensitive → sensitive | `make_sensitive` (leaves the restricted view; no zeroing) |
//! | unmapped → sensitive | `zero`, `make_sensitive` |
//! | sensitive → nonsensitive, unmapped → nonsensitive | `zero`, `map` |
//!
//! So a block never becomes visible anywhere it was not before it has been zeroed
//! ([`crate::Visibility::gains_visibility`]): a sensitive block may hold user data, an
//! unmapped one secrets. If a stage-2 call fails the block goes back, merged, onto the lists
//! it came from and the request fails with [`AllocError::Stage2`]. Requests that may not
//! block never flip.
//!
//! The source is the smallest free block of order `>= max(order, pageblock order)` of another
//! visibility; at equal order the preferred sources are, for a nonsensitive target, unmapped
//! then sensitive blocks; for a sensitive target, nonsensitive (no zeroing) then unmapped;
//! for an unmapped target, nonsensitive then sensitive.

use crate::buddy::BuddyAllocator;
use crate::error::{AllocError, Stage2Error};
use crate::freetype::{Freetype, Visibility};
use crate::gfp::AllocRequest;
use crate::stage2::Stage2;
use crate::{MAX_ORDER, PAGEBLOCK_ORDER};

impl<S: Stage2> BuddyAllocator<S> {
    /// The smallest free block of order `>= min_order` on the lists of a freetype whose
    /// visibility differs from `target`'s, preferred sources first at equal order (see the
    /// module docs): `(order, freetype index)`.
    pub(crate) fn flip_candidate(&self, target: Freetype, min_order: u8) -> Option<(u8, usize)> {
        let sources = flip_sources(target.visibility());
        (min_order..=MAX_ORDER).find_map(|o| {
            sources
                .iter()
                .flat_map(|&v| Freetype::ALL.iter().filter(move |f| f.visibility() == v))
                .map(|f| f.index())
                .find(|&f| self.lists.nonempty[f] & (1 << o) != 0)
                .map(|f| (o, f))
        })
    }

    /// Flip a whole free pageblock (or order-10 block) to the request's visibility and
    /// allocate `order` from it.
    pub(crate) fn flip_alloc(&mut self, req: AllocRequest, order: u8) -> Result<u32, AllocError> {
        let t = self.flip_begin(req, order)?;
        let res = flip_stage2(&mut self.s2, &t);
        self.flip_end(t, res, order)
    }

    /// First half of a flip, under the zone lock: choose the block, take it off the free
    /// lists and split off what is not flipped, so no one else can see or take it while its
    /// stage 2 changes. Fails like an allocation that found no block.
    pub(crate) fn flip_begin(
        &mut self,
        req: AllocRequest,
        order: u8,
    ) -> Result<FlipTicket, AllocError> {
        let target = req.freetype;
        let flip_order = order.max(PAGEBLOCK_ORDER);
        let Some((cur, src)) = self.flip_candidate(target, flip_order) else {
            return Err(if self.free_pages_count() == 0 {
                AllocError::OutOfMemory {
                    order,
                    freetype: target,
                }
            } else {
                AllocError::NoFreePageblock {
                    order,
                    freetype: target,
                    free_pages: self.free_pages_count(),
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
        // The block is off the lists but still counted free until the flip ends.
        Ok(FlipTicket {
            pfn: self.base + off as u64,
            off,
            flip_order,
            src,
            target,
        })
    }

    /// Second half of a flip, under the zone lock again: count the stage-2 calls of `res`
    /// (from [`flip_stage2`]), then retype the block and split `order` off it, or on a
    /// stage-2 error merge it back onto the lists it came from.
    pub(crate) fn flip_end(
        &mut self,
        t: FlipTicket,
        res: FlipResult,
        order: u8,
    ) -> Result<u32, AllocError> {
        let n = 1u64 << t.flip_order;
        if res.unmapped {
            self.ctr.stage2_unmap_calls += 1;
            self.ctr.stage2_pages_unmapped += n;
        }
        if res.zeroed {
            self.ctr.stage2_zero_calls += 1;
            self.ctr.pages_zeroed += n;
            self.ctr.pages_zeroed_on_flip += n;
        }
        if res.mapped {
            self.ctr.stage2_map_calls += 1;
            self.ctr.stage2_pages_mapped += n;
        }
        if res.made_sensitive {
            self.ctr.stage2_sensitive_calls += 1;
            self.ctr.stage2_pages_sensitive += n;
        }
        if let Err(e) = res.result {
            self.ctr.stage2_failures += 1;
            // Roll back: the block is still of the source visibility; merge it back.
            self.free_to_buddy(t.off, t.flip_order, t.src);
            return Err(AllocError::Stage2(e));
        }
        let ft = t.target.index();
        self.set_pageblocks(t.off, t.flip_order, ft);
        let blocks = n >> PAGEBLOCK_ORDER;
        let from = Freetype::ALL[t.src].visibility();
        self.ctr.flip_matrix[from.index()][t.target.visibility().index()] += blocks;
        match t.target.visibility() {
            Visibility::Unmapped => {
                self.ctr.flips_to_unmapped += blocks;
                self.ctr.flip_calls_to_unmapped += 1;
            }
            Visibility::Nonsensitive => {
                self.ctr.flips_to_mapped += blocks;
                self.ctr.flip_calls_to_mapped += 1;
            }
            Visibility::Sensitive => {
                self.ctr.flips_to_sensitive += blocks;
                self.ctr.flip_calls_to_sensitive += 1;
            }
        }
        self.expand(t.off, order, t.flip_order, ft);
        Ok(t.off)
    }
}

/// A block taken off the lists by [`BuddyAllocator::flip_begin`], waiting for its stage-2
/// change.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlipTicket {
    /// First pfn of the block.
    pub pfn: u64,
    off: u32,
    flip_order: u8,
    src: usize,
    target: Freetype,
}

impl FlipTicket {
    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        1 << self.flip_order
    }
}

/// The source visibilities a flip to `target` may take a block from, preferred first.
const fn flip_sources(target: Visibility) -> [Visibility; 2] {
    match target {
        Visibility::Nonsensitive => [Visibility::Unmapped, Visibility::Sensitive],
        Visibility::Sensitive => [Visibility::Nonsensitive, Visibility::Unmapped],
        Visibility::Unmapped => [Visibility::Nonsensitive, Visibility::Sensitive],
    }
}

/// What the stage-2 half of a flip did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlipResult {
    unmapped: bool,
    zeroed: bool,
    mapped: bool,
    made_sensitive: bool,
    result: Result<(), Stage2Error>,
}

/// The stage-2 half of a flip (no allocator state touched, so it may run outside the zone
/// lock): the calls of the module docs' table, zeroing first exactly when the block gains
/// visibility.
pub(crate) fn flip_stage2<S: Stage2>(s2: &mut S, t: &FlipTicket) -> FlipResult {
    let n = t.pages();
    let mut r = FlipResult {
        unmapped: false,
        zeroed: false,
        mapped: false,
        made_sensitive: false,
        result: Ok(()),
    };
    let from = Freetype::ALL[t.src].visibility();
    let to = t.target.visibility();
    r.result = (|| {
        if from.gains_visibility(to) {
            s2.zero(t.pfn, n)?;
            r.zeroed = true;
        }
        match to {
            Visibility::Unmapped => s2.unmap(t.pfn, n).map(|()| r.unmapped = true),
            Visibility::Nonsensitive => s2.map(t.pfn, n).map(|()| r.mapped = true),
            Visibility::Sensitive => s2
                .make_sensitive(t.pfn, n)
                .map(|()| r.made_sensitive = true),
        }
    })();
    r
}
