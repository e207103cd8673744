//! The buddy allocator: construction, the allocation and free paths, and queries.

use crate::error::{AllocError, FreeError, InitError, Stage2Error};
use crate::freelist::FreeLists;
use crate::freetype::Freetype;
use crate::gfp::{AllocRequest, BuddyContext, Gfp};
use crate::meta::{Links, PageMeta, NIL, ST_ALLOC, ST_CACHED, ST_FREE, ST_NONE, ST_ORDER};
use crate::pcp::{is_cached_order, Pcp, CACHED_ORDERS};
use crate::stage2::Stage2;
use crate::stats::Counters;
use crate::{Pfn, MAX_ORDER, PAGEBLOCK_ORDER};
use alloc::vec;
use alloc::vec::Vec;

/// Freetype every pageblock starts with (Linux marks all pageblocks movable at boot).
pub const INITIAL_FREETYPE: Freetype = Freetype::MOVABLE;
/// Freetype every pageblock starts with under [`Config::sensitive_by_default`].
pub const SENSITIVE_INITIAL_FREETYPE: Freetype = Freetype::MOVABLE_SENSITIVE;

/// Bit `i` set iff the freetype with index `i` is unmapped.
const UNMAPPED_INDEX_MASK: u32 = {
    let mut m = 0u32;
    let mut i = 0;
    while i < Freetype::COUNT {
        if Freetype::ALL[i].is_unmapped() {
            m |= 1 << i;
        }
        i += 1;
    }
    m
};

/// Whether the freetype with dense index `i` is unmapped (one shift, no table lookup).
#[inline]
pub(crate) const fn is_unmapped_index(i: usize) -> bool {
    (UNMAPPED_INDEX_MASK >> i) & 1 != 0
}

/// Visibility index ([`crate::Visibility::index`]) of the freetype with dense index `i`:
/// two bits per freetype in one constant (one shift, no table lookup).
const VISIBILITY_BITS: u32 = {
    let mut m = 0u32;
    let mut i = 0;
    while i < Freetype::COUNT {
        m |= (Freetype::ALL[i].visibility().index() as u32) << (2 * i);
        i += 1;
    }
    m
};

/// The visibility (as its index) of the freetype with dense index `i`.
#[inline]
pub(crate) const fn visibility_index(i: usize) -> u32 {
    (VISIBILITY_BITS >> (2 * i)) & 3
}

/// The first checks of a free, in their order: `pfn` in `[base, base + nr)`, `order` valid,
/// `pfn` aligned to it. Gives the page offset.
#[inline]
pub(crate) fn check_free_range(base: u64, nr: u64, pfn: Pfn, order: u8) -> Result<u32, FreeError> {
    let off = pfn.wrapping_sub(base);
    if off >= nr {
        return Err(FreeError::OutOfRange);
    }
    if order > MAX_ORDER {
        return Err(FreeError::InvalidOrder);
    }
    if pfn & ((1u64 << order) - 1) != 0 {
        return Err(FreeError::Misaligned);
    }
    Ok(off as u32)
}

/// Allocator options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Zero freed pages of unmapped freetypes (through [`Stage2::zero`]) before they become
    /// free, so no secret outlives its owner. Default: on.
    pub init_on_free_unmapped: bool,
    /// Blocks in each per-(order, freetype) cache of small free blocks ([`crate::pcp`],
    /// orders 0..=3); 0 disables the caches. Default: 64.
    pub pcp_capacity: u32,
    /// Start every pageblock sensitive ([`SENSITIVE_INITIAL_FREETYPE`], ASI's default: its
    /// `PB_nonsensitive` bit is clear) instead of [`INITIAL_FREETYPE`]: construction makes
    /// the whole range sensitive with one [`Stage2::make_sensitive`] call, and every
    /// nonsensitive pageblock is then a flip (zeroed first). Default: off (the VMM boots its
    /// guest with all memory visible in both views).
    pub sensitive_by_default: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            init_on_free_unmapped: true,
            pcp_capacity: 64,
            sensitive_by_default: false,
        }
    }
}

/// A successful allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// First page frame.
    pub pfn: Pfn,
    /// Order: the allocation covers `1 << order` pages.
    pub order: u8,
    /// The freetype the pages were allocated as.
    pub freetype: Freetype,
}

/// The buddy allocator over `[base_pfn, base_pfn + nr_pages)`.
///
/// Blocks are naturally aligned in *absolute* pfns (an order-9 block is 2 MiB-aligned in
/// guest-physical memory); ranges that are not multiples of a block are carved into the
/// largest aligned blocks that fit, so partial pageblocks at the ends work (they can never be
/// flipped, since a flip needs a whole free pageblock).
pub struct BuddyAllocator<S: Stage2> {
    pub(crate) s2: S,
    pub(crate) cfg: Config,
    pub(crate) base: u64,
    pub(crate) nr: u64,
    /// `base >> PAGEBLOCK_ORDER`.
    pub(crate) pb_base: u64,
    /// Per-page head records (state, freetype), indexed by page offset from `base`.
    pub(crate) meta: Vec<PageMeta>,
    /// Per-page free-list links, indexed like `meta`.
    pub(crate) links: Vec<Links>,
    /// Freetype index of each pageblock, indexed by `(pfn >> 9) - (base >> 9)`.
    pub(crate) pb: Vec<u8>,
    pub(crate) lists: FreeLists,
    pub(crate) pcp: Pcp,
    /// Free pages on the buddy lists (not in caches: a cache hit or push leaves it alone).
    pub(crate) free: u64,
    pub(crate) ctr: Counters,
}

impl<S: Stage2> BuddyAllocator<S> {
    /// All pages start free and mapped (freetype [`INITIAL_FREETYPE`]), or free and sensitive
    /// with [`Config::sensitive_by_default`].
    ///
    /// A zero-size range gives an allocator with nothing free. Panics only if the range
    /// overflows or holds `u32::MAX` pages or more (16 TiB); [`Self::try_new`] reports that.
    pub fn new(base_pfn: Pfn, nr_pages: u64, s2: S, cfg: Config) -> Self {
        match Self::try_new(base_pfn, nr_pages, s2, cfg) {
            Ok(a) => a,
            Err(e) => panic!("BuddyAllocator::new: {e}"),
        }
    }

    /// As [`Self::new`], but returns an error for ranges the metadata cannot index, and
    /// [`InitError::Stage2`] if [`Config::sensitive_by_default`] is set and the backend
    /// refuses to make the range sensitive.
    pub fn try_new(base_pfn: Pfn, nr_pages: u64, s2: S, cfg: Config) -> Result<Self, InitError> {
        if nr_pages >= NIL as u64 {
            return Err(InitError::TooManyPages(nr_pages));
        }
        let end = base_pfn.checked_add(nr_pages).ok_or(InitError::Overflow)?;
        let nr_pb = if nr_pages == 0 {
            0
        } else {
            ((end - 1) >> PAGEBLOCK_ORDER) - (base_pfn >> PAGEBLOCK_ORDER) + 1
        };
        let initial = if cfg.sensitive_by_default {
            SENSITIVE_INITIAL_FREETYPE
        } else {
            INITIAL_FREETYPE
        };
        let mut s2 = s2;
        let mut ctr = Counters::default();
        if cfg.sensitive_by_default && nr_pages > 0 {
            s2.make_sensitive(base_pfn, nr_pages)
                .map_err(InitError::Stage2)?;
            ctr.stage2_sensitive_calls = 1;
            ctr.stage2_pages_sensitive = nr_pages;
        }
        let mut a = BuddyAllocator {
            s2,
            cfg,
            base: base_pfn,
            nr: nr_pages,
            pb_base: base_pfn >> PAGEBLOCK_ORDER,
            meta: vec![PageMeta::EMPTY; nr_pages as usize],
            links: vec![Links::EMPTY; nr_pages as usize],
            pb: vec![initial.index() as u8; nr_pb as usize],
            lists: FreeLists::new(),
            pcp: Pcp::new(cfg.pcp_capacity),
            free: 0,
            ctr,
        };
        let ft = initial.index();
        let mut pfn = base_pfn;
        while pfn < end {
            let mut o = (pfn.trailing_zeros() as u8).min(MAX_ORDER);
            while pfn + (1u64 << o) > end {
                o -= 1;
            }
            let off = (pfn - base_pfn) as u32;
            a.set_free_head(off, o, ft);
            a.lists.push(&mut a.links, off, o as usize, ft);
            pfn += 1 << o;
        }
        a.free = nr_pages;
        Ok(a)
    }

    /// Allocate `1 << order` pages described by GFP-style flags.
    ///
    /// Same as `alloc_pages_special(BuddyContext::Default, gfp, order)`.
    #[inline]
    pub fn alloc_pages(&mut self, gfp: Gfp, order: u8) -> Result<Allocation, AllocError> {
        self.alloc_pages_special(BuddyContext::Default, gfp, order)
    }

    /// Allocate `1 << order` pages for a context plus GFP-style flags (the extensible entry
    /// point; see the module docs of [`crate::gfp`] for the trade-off).
    ///
    /// The fast path (no zeroing; a page in the freetype's cache or a block on its own free
    /// lists) is inlined; fallback, flips, zeroing and errors go to the out-of-line slow path.
    #[inline(always)]
    pub fn alloc_pages_special(
        &mut self,
        ctx: BuddyContext,
        gfp: Gfp,
        order: u8,
    ) -> Result<Allocation, AllocError> {
        if let Ok(req) = AllocRequest::from_gfp(ctx, gfp) {
            if !req.zero {
                let ft = req.freetype.index();
                if order <= MAX_ORDER {
                    // `free` counts listed pages only: a cache hit leaves it alone.
                    let hit = match self.pcp_pop(order, ft) {
                        Some(off) => Some(off),
                        None => self.rmqueue_smallest_outlined(ft, order),
                    };
                    if let Some(off) = hit {
                        let m = &mut self.meta[off as usize];
                        m.state = ST_ALLOC | order;
                        m.ft = ft as u8;
                        self.ctr.allocs[order as usize * Freetype::COUNT + ft] += 1;
                        return Ok(Allocation {
                            pfn: self.base + off as u64,
                            order,
                            freetype: req.freetype,
                        });
                    }
                }
            }
        }
        self.alloc_slow(ctx, gfp, order)
    }

    /// Everything but the inlined fast path: errors, zeroing, fallback, drains and flips.
    #[inline(never)]
    fn alloc_slow(
        &mut self,
        ctx: BuddyContext,
        gfp: Gfp,
        order: u8,
    ) -> Result<Allocation, AllocError> {
        let r = if order > MAX_ORDER {
            Err(AllocError::InvalidOrder(order))
        } else {
            match AllocRequest::from_gfp(ctx, gfp) {
                Ok(req) => self.alloc_request(req, order),
                Err(e) => Err(e),
            }
        };
        if r.is_err() {
            self.ctr.alloc_failures += 1;
        }
        r
    }

    /// Allocate for an already translated request.
    #[inline]
    fn alloc_request(&mut self, req: AllocRequest, order: u8) -> Result<Allocation, AllocError> {
        let ft = req.freetype.index();
        let (off, cached) = self.take_block(req, order)?;
        let m = &mut self.meta[off as usize];
        m.state = ST_ALLOC | order;
        m.ft = ft as u8;
        if !cached {
            self.free -= 1 << order;
        }
        let pfn = self.base + off as u64;
        if req.zero {
            let n = 1u64 << order;
            if let Err(e) = self.s2.zero(pfn, n) {
                self.ctr.stage2_failures += 1;
                // Put the block back where it came from (no init_on_free: the pages were
                // never handed out), so the allocator is as before the call.
                let bft = self.pb[self.pb_index(off)] as usize;
                if cached && self.pcp.push(order, ft, off) {
                    let m = &mut self.meta[off as usize];
                    m.state = ST_CACHED | order;
                    m.ft = ft as u8;
                } else {
                    self.free += n;
                    self.meta[off as usize].state = ST_NONE;
                    self.free_to_buddy(off, order, bft);
                }
                return Err(AllocError::Stage2(e));
            }
            self.ctr.stage2_zero_calls += 1;
            self.ctr.pages_zeroed += n;
            self.ctr.pages_zeroed_on_alloc += n;
        }
        self.ctr.allocs[order as usize * Freetype::COUNT + ft] += 1;
        Ok(Allocation {
            pfn,
            order,
            freetype: req.freetype,
        })
    }

    /// Find a free block for the request and take it off the free structures: cache, same
    /// freetype, fallback within the same mapped-ness, drain the caches and retry, flip.
    /// Also says whether the block came from a cache.
    #[inline]
    fn take_block(&mut self, req: AllocRequest, order: u8) -> Result<(u32, bool), AllocError> {
        let ft = req.freetype.index();
        if let Some(off) = self.pcp_pop(order, ft) {
            return Ok((off, true));
        }
        if let Some(off) = self.rmqueue(req.freetype, order) {
            return Ok((off, false));
        }
        if !self.pcp.is_empty() {
            self.drain_pcp();
            if let Some(off) = self.rmqueue(req.freetype, order) {
                return Ok((off, false));
            }
        }
        self.flip_alloc(req, order).map(|off| (off, false))
    }

    /// For [`crate::Zone`] (whose core has no caches and never zeroes): a block of `order`
    /// for freetype `ft` from the buddy lists, same freetype or fallback, marked allocated;
    /// None when only a flip could help.
    pub(crate) fn take_allocated(&mut self, ft: Freetype, order: u8) -> Option<u32> {
        let off = self.rmqueue(ft, order)?;
        self.mark_allocated(off, order, ft.index());
        Some(off)
    }

    /// Record block `off` (just taken off the free structures) as an allocation.
    pub(crate) fn mark_allocated(&mut self, off: u32, order: u8, ft: usize) {
        let m = &mut self.meta[off as usize];
        m.state = ST_ALLOC | order;
        m.ft = ft as u8;
        self.free -= 1 << order;
        self.ctr.allocs[order as usize * Freetype::COUNT + ft] += 1;
    }

    /// Same freetype first, then Linux's claim/steal fallback within the same mapped-ness.
    #[inline]
    fn rmqueue(&mut self, ft: Freetype, order: u8) -> Option<u32> {
        if let Some(off) = self.rmqueue_smallest(ft.index(), order) {
            return Some(off);
        }
        self.rmqueue_fallback(ft, order)
    }

    /// The smallest free block of freetype `ft` with order `>= order`, split down to `order`.
    #[inline]
    pub(crate) fn rmqueue_smallest(&mut self, ft: usize, order: u8) -> Option<u32> {
        let cur = self.lists.first_nonempty(order as usize, ft)?;
        let off = self.lists.pop(&mut self.links, cur, ft)?;
        self.meta[off as usize].state = ST_NONE;
        self.expand(off, order, cur as u8, ft);
        Some(off)
    }

    /// [`Self::rmqueue_smallest`] for the inlined fast path (kept out of line), counting
    /// the pages it takes off the lists.
    #[inline(never)]
    fn rmqueue_smallest_outlined(&mut self, ft: usize, order: u8) -> Option<u32> {
        let off = self.rmqueue_smallest(ft, order)?;
        self.free -= 1 << order;
        Some(off)
    }

    /// Split block `off` of order `high` down to `low`, freeing the upper halves onto `ft`.
    #[inline(always)]
    pub(crate) fn expand(&mut self, off: u32, low: u8, mut high: u8, ft: usize) {
        while high > low {
            high -= 1;
            let b = off + (1u32 << high);
            self.set_free_head(b, high, ft);
            self.lists.push(&mut self.links, b, high as usize, ft);
        }
    }

    /// Mark `off` as the head of a free block of `order` on freetype `ft`'s lists.
    #[inline]
    pub(crate) fn set_free_head(&mut self, off: u32, order: u8, ft: usize) {
        let m = &mut self.meta[off as usize];
        m.state = ST_FREE | order;
        m.ft = ft as u8;
    }

    /// Give back pages `[off, off + 2^order)`.
    ///
    /// A block of a cached order goes to its pageblock's cache unless that cache is full;
    /// everything else goes straight to the buddy lists with merging.
    #[inline]
    fn release(&mut self, off: u32, order: u8) {
        let bft = self.pb[self.pb_index(off)] as usize;
        if is_cached_order(order) && self.pcp.push(order, bft, off) {
            let m = &mut self.meta[off as usize];
            m.state = ST_CACHED | order;
            m.ft = bft as u8;
            return;
        }
        self.free += 1 << order;
        self.meta[off as usize].state = ST_NONE;
        self.free_to_buddy(off, order, bft);
    }

    /// Put `[off, off + 2^order)` on the buddy lists of `ft`, merging with free buddies.
    ///
    /// Below pageblock order a buddy lies in the same pageblock, so it has the same freetype.
    /// At pageblock order and above, buddies of the same visibility merge and the buddy's
    /// pageblocks take `ft` (as Linux's `__free_one_page` does for mergeable migratetypes);
    /// buddies of different visibility (nonsensitive, sensitive, unmapped) never merge. The caller has cleared `off`'s state.
    #[inline(always)]
    pub(crate) fn free_to_buddy(&mut self, off: u32, mut order: u8, ft: usize) {
        let base = self.base;
        // Absolute pfn of the growing block's head: buddies are aligned in absolute pfns.
        let mut pfn = base + off as u64;
        while order < MAX_ORDER {
            let bit = 1u64 << order;
            // The buddy's offset; below `base` wraps to a huge value and fails the range check.
            let boff = (pfn ^ bit).wrapping_sub(base);
            // `meta` has exactly `nr` entries: `get_mut` is the range check.
            let Some(bm) = self.meta.get_mut(boff as usize) else {
                break;
            };
            if bm.state != ST_FREE | order {
                break;
            }
            let bft = bm.ft as usize;
            if bft == ft {
                bm.state = ST_NONE;
            } else if !self.merge_across_pageblocks(boff as u32, order, bft, ft) {
                break;
            }
            self.lists
                .remove(&mut self.links, boff as u32, order as usize, bft);
            pfn &= !bit;
            order += 1;
        }
        let off = (pfn - base) as u32;
        self.set_free_head(off, order, ft);
        self.lists.push(&mut self.links, off, order as usize, ft);
    }

    /// The rare merge step of [`Self::free_to_buddy`] with a free buddy `boff` of another
    /// freetype (only at pageblock order and above): refuse across visibility (nonsensitive,
    /// sensitive, unmapped never merge), otherwise retype the buddy's pageblocks to `ft` and
    /// clear its head state.
    #[cold]
    #[inline(never)]
    fn merge_across_pageblocks(&mut self, boff: u32, order: u8, bft: usize, ft: usize) -> bool {
        debug_assert!(order >= PAGEBLOCK_ORDER);
        if visibility_index(bft) != visibility_index(ft) {
            return false;
        }
        self.set_pageblocks(boff, order, ft);
        self.meta[boff as usize].state = ST_NONE;
        true
    }

    /// Set the freetype of every pageblock overlapping `[off, off + 2^order)`.
    pub(crate) fn set_pageblocks(&mut self, off: u32, order: u8, ft: usize) {
        let first = self.pb_index(off);
        let last = self.pb_index(off + (1u32 << order) - 1);
        for e in &mut self.pb[first..=last] {
            *e = ft as u8;
        }
    }

    /// Index in the pageblock table of the page at offset `off`.
    #[inline]
    pub(crate) fn pb_index(&self, off: u32) -> usize {
        (((self.base + off as u64) >> PAGEBLOCK_ORDER) - self.pb_base) as usize
    }

    /// Return every cached block to the buddy lists (Linux's `drain_all_pages`).
    pub fn drain_pcp(&mut self) {
        for order in CACHED_ORDERS {
            for ft in 0..Freetype::COUNT {
                let n = self.pcp.len(order, ft);
                if n != 0 {
                    self.drain_pcp_list(order, ft, n);
                }
            }
        }
    }

    /// Take a cached block of (order, ft), if the order is cached at all.
    #[inline(always)]
    fn pcp_pop(&mut self, order: u8, ft: usize) -> Option<u32> {
        if is_cached_order(order) {
            self.pcp.pop(order, ft)
        } else {
            None
        }
    }

    /// [`Pcp::push`] with one branch per freetype, so the cache's address depends on a
    /// predicted branch rather than on the load that gave `ft`: otherwise the next pop of
    /// the same cache waits for that load (the pageblock table) through store forwarding,
    /// which made the hot pair one long chain of dependent loads.
    #[inline(always)]
    fn pcp_push_branchy(&mut self, order: u8, ft: usize, off: u32) -> bool {
        match ft {
            0 => self.pcp.push(order, 0, off),
            1 => self.pcp.push(order, 1, off),
            2 => self.pcp.push(order, 2, off),
            3 => self.pcp.push(order, 3, off),
            4 => self.pcp.push(order, 4, off),
            5 => self.pcp.push(order, 5, off),
            6 => self.pcp.push(order, 6, off),
            _ => self.pcp.push(order, ft, off),
        }
    }

    /// Return the `n` most recently cached blocks of (order, ft) to the buddy lists.
    fn drain_pcp_list(&mut self, order: u8, ft: usize, n: u32) {
        self.ctr.pcp_drains += 1;
        for _ in 0..n {
            let Some(off) = self.pcp.pop(order, ft) else {
                break;
            };
            self.meta[off as usize].state = ST_NONE;
            self.free += 1 << order;
            // The block's freetype may have been re-claimed since; its visibility cannot
            // have changed (a flip needs a whole free pageblock, a cached block prevents it).
            let bft = self.pb[self.pb_index(off)] as usize;
            self.free_to_buddy(off, order, bft);
        }
    }

    /// Free an allocation made by `alloc_pages*` (`pfn` and `order` as returned).
    ///
    /// Refuses out-of-range, misaligned, never-allocated or already-freed pfns and wrong
    /// orders with a typed error, leaving the allocator unchanged. Never maps and never
    /// flushes: freed unmapped pages stay unmapped. With `init_on_free_unmapped`, pages of
    /// unmapped blocks are zeroed through [`Stage2::zero`] first; if that fails the pages
    /// stay allocated and [`FreeError::Stage2`] is returned.
    ///
    /// The fast path (a valid head, no zeroing needed) is inlined.
    #[inline(always)]
    pub fn free_pages(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let off = pfn.wrapping_sub(self.base);
        if off < self.nr && order <= MAX_ORDER {
            let m = self.meta[off as usize];
            // A head with exactly this order is naturally aligned, so this one comparison
            // also proves the alignment; anything else takes the checked slow path.
            if m.state == ST_ALLOC | order {
                if self.cfg.init_on_free_unmapped && is_unmapped_index(m.ft as usize) {
                    // init_on_free: zeroed before it is free, with one stage-2 call (the
                    // call itself is out of line in any real backend); only a failure
                    // leaves the fast path.
                    let n = 1u64 << order;
                    if let Err(e) = self.s2.zero(pfn, n) {
                        return self.free_zero_failed(e);
                    }
                    self.count_zeroed_on_free(n);
                }
                let off = off as u32;
                let bft = self.pb[self.pb_index(off)];
                if is_cached_order(order) && self.pcp_push_branchy(order, bft as usize, off) {
                    let e = &mut self.meta[off as usize];
                    e.state = ST_CACHED | order;
                    e.ft = bft;
                    return Ok(());
                }
                self.free_block_to_buddy(off, order, bft as usize);
                return Ok(());
            }
        }
        self.free_slow(pfn, order)
    }

    /// Give a validated block back to the buddy lists, merging (its cache is full, or its
    /// order is not cached). Inlined into the fast path on purpose: a call here costs
    /// 10-15 % on random-order frees (measured; register saves and reloads per free).
    #[inline(always)]
    fn free_block_to_buddy(&mut self, off: u32, order: u8, bft: usize) {
        self.free += 1 << order;
        self.meta[off as usize].state = ST_NONE;
        self.free_to_buddy(off, order, bft);
    }

    /// The fast path's init_on_free zeroing failed: the pages stay allocated.
    #[cold]
    #[inline(never)]
    fn free_zero_failed(&mut self, e: Stage2Error) -> Result<(), FreeError> {
        self.ctr.stage2_failures += 1;
        self.ctr.free_failures += 1;
        Err(FreeError::Stage2(e))
    }

    /// Count one successful init_on_free zeroing of `n` pages.
    #[inline(always)]
    fn count_zeroed_on_free(&mut self, n: u64) {
        self.ctr.stage2_zero_calls += 1;
        self.ctr.pages_zeroed += n;
        self.ctr.pages_zeroed_on_free += n;
    }

    /// The fully checked free (errors, init_on_free).
    #[inline(never)]
    fn free_slow(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let r = self.free_checked(pfn, order);
        if r.is_err() {
            self.ctr.free_failures += 1;
        }
        r
    }

    #[inline]
    fn free_checked(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let off = check_free_range(self.base, self.nr, pfn, order)?;
        let m = self.meta[off as usize];
        if m.state & ST_ALLOC == 0 {
            return Err(FreeError::NotAllocated);
        }
        let allocated = m.state & ST_ORDER;
        if allocated != order {
            return Err(FreeError::WrongOrder { allocated });
        }
        if self.cfg.init_on_free_unmapped && is_unmapped_index(m.ft as usize) {
            let n = 1u64 << order;
            if let Err(e) = self.s2.zero(pfn, n) {
                self.ctr.stage2_failures += 1;
                return Err(FreeError::Stage2(e));
            }
            self.count_zeroed_on_free(n);
        }
        self.release(off, order);
        Ok(())
    }

    /// Order and freetype of the live allocation that starts at or contains `pfn`.
    ///
    /// Exact and O(1): at most `MAX_ORDER + 1` probes of block heads (the head of the block
    /// of each order that contains `pfn`); no scan.
    pub fn allocation_containing(&self, pfn: Pfn) -> Option<Allocation> {
        if pfn.wrapping_sub(self.base) >= self.nr {
            return None;
        }
        for o in 0..=MAX_ORDER {
            let head = pfn & !((1u64 << o) - 1);
            if head < self.base {
                return None;
            }
            let m = self.meta[(head - self.base) as usize];
            let ho = m.state & ST_ORDER;
            if m.state & ST_ALLOC != 0 && ho >= o {
                return Some(Allocation {
                    pfn: head,
                    order: ho,
                    freetype: Freetype::ALL[m.ft as usize],
                });
            }
            if m.state & (ST_FREE | ST_CACHED) != 0 && ho >= o {
                return None;
            }
        }
        None
    }

    /// Freetype recorded for `pfn`'s pageblock.
    pub fn pageblock_freetype(&self, pfn: Pfn) -> Option<Freetype> {
        let off = pfn.wrapping_sub(self.base);
        if off >= self.nr {
            return None;
        }
        Some(Freetype::ALL[self.pb[self.pb_index(off as u32)] as usize])
    }

    /// First managed pfn.
    pub fn base_pfn(&self) -> Pfn {
        self.base
    }

    /// Number of managed pages.
    pub fn nr_pages(&self) -> u64 {
        self.nr
    }

    /// Free pages (buddy lists plus caches).
    pub fn free_pages_count(&self) -> u64 {
        self.free + self.pcp.pages()
    }

    /// The configuration.
    pub fn config(&self) -> Config {
        self.cfg
    }

    /// The stage-2 backend.
    pub fn stage2(&self) -> &S {
        &self.s2
    }

    /// The stage-2 backend, mutably.
    pub fn stage2_mut(&mut self) -> &mut S {
        &mut self.s2
    }

    /// Give up the allocator and keep its stage-2 backend.
    pub fn into_stage2(self) -> S {
        self.s2
    }

    /// Exact bytes of metadata this instance keeps (all outside the managed frames): the
    /// per-page arrays, the pageblock table, the caches and the list heads.
    pub fn metadata_bytes(&self) -> u64 {
        (self.meta.len() * core::mem::size_of::<PageMeta>()
            + self.links.len() * core::mem::size_of::<Links>()
            + self.pb.len()
            + self.pcp.bytes()
            + core::mem::size_of::<FreeLists>()) as u64
    }
}
