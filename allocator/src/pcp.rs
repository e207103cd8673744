//! Per-(order, freetype) caches of small free blocks and pageblocks, like Linux's per-CPU
//! page lists (which cache orders up to `PAGE_ALLOC_COSTLY_ORDER` = 3 and, since 5.13,
//! `pageblock_order`).
//!
//! A freed block of a cached order ([`is_cached_order`]: `<= PCP_MAX_ORDER`, or
//! [`PAGEBLOCK_ORDER`] for [`crate::BuddyAllocator`]; [`crate::Zone`] caches only the small
//! orders) is parked here instead of being merged, and the
//! next request of the same order and freetype takes it back without touching the buddy
//! lists: the hot alloc+free pair costs about a hundred instructions instead of a split and a
//! merge per order. When a cache is full, the freed block goes straight to the buddy lists
//! (merging), so a burst of frees pays no push and pop per block. Before any flip and before
//! an allocation fails, every cache is drained so cached blocks never hide a whole free
//! pageblock. Cached pages count as free everywhere
//! (`free_pages_count`, `Snapshot::pcp_pages`) and are *not* allocations
//! (`allocation_containing` says None, freeing one again is `NotAllocated`).

use crate::error::Stage2Error;
use crate::freetype::Freetype;
use crate::lines::Lines;
use crate::stage2::Stage2;
use crate::PAGEBLOCK_ORDER;

/// Most ranges passed to one [`Stage2::zero_batch`] call.
pub(crate) const ZERO_BATCH: usize = 64;

/// What [`Pcp::zero_dirty`] did: successful calls, the pages they zeroed, and the result
/// (on error the list stays dirty; calls before the failing one may have succeeded).
pub(crate) struct Zeroed {
    pub calls: u64,
    pub pages: u64,
    pub result: Result<(), Stage2Error>,
}

/// Highest small order the caches hold (Linux's `PAGE_ALLOC_COSTLY_ORDER`).
pub const PCP_MAX_ORDER: u8 = 3;
/// Every order a cache exists for: the small ones and the pageblock order.
pub const CACHED_ORDERS: [u8; PCP_ORDERS] = [0, 1, 2, 3, PAGEBLOCK_ORDER];
/// Number of cached orders.
const PCP_ORDERS: usize = PCP_MAX_ORDER as usize + 2;
/// Number of caches.
const NR_PCP: usize = PCP_ORDERS * Freetype::COUNT;

/// Whether `order` has caches (`<= PCP_MAX_ORDER` or [`PAGEBLOCK_ORDER`]).
#[inline(always)]
pub const fn is_cached_order(order: u8) -> bool {
    order <= PCP_MAX_ORDER || order == PAGEBLOCK_ORDER
}

/// Index of the cache for (order, ft), `order` a cached order (the pageblock order's
/// caches come after the small orders').
#[inline(always)]
const fn ci(order: u8, ft: usize) -> usize {
    let o = if order <= PCP_MAX_ORDER {
        order
    } else {
        PCP_MAX_ORDER + 1
    };
    o as usize * Freetype::COUNT + ft
}

/// The caches: one LIFO stack of block offsets per (order, freetype).
#[derive(Clone, Debug)]
pub(crate) struct Pcp {
    /// The stacks, `cap` slots each, one after another; 128-byte aligned so that two CPUs'
    /// caches (separate heap allocations) never share a line.
    slots: Lines<u32>,
    len: [u32; NR_PCP],
    /// Entries `clean..len` of each stack are dirty: freed unmapped blocks not zeroed yet
    /// (only [`crate::Zone`] pushes dirty blocks); entries below are clean.
    clean: [u32; NR_PCP],
    pub(crate) cap: u32,
}

impl Pcp {
    /// Caches of `cap` blocks each (0 disables them).
    pub fn new(cap: u32) -> Pcp {
        Pcp {
            slots: Lines::new(cap as usize * NR_PCP, || 0),
            len: [0; NR_PCP],
            clean: [0; NR_PCP],
            cap,
        }
    }

    /// Blocks in the cache of (order, ft).
    #[inline]
    pub fn len(&self, order: u8, ft: usize) -> u32 {
        self.len[ci(order, ft)]
    }

    /// Pages in all caches of `ft`.
    pub fn pages_of(&self, ft: usize) -> u64 {
        CACHED_ORDERS
            .iter()
            .map(|&o| (self.len(o, ft) as u64) << o)
            .sum()
    }

    /// Pages in all caches.
    pub fn pages(&self) -> u64 {
        (0..Freetype::COUNT).map(|ft| self.pages_of(ft)).sum()
    }

    /// Whether any cache holds a block.
    pub fn is_empty(&self) -> bool {
        self.len.iter().all(|&l| l == 0)
    }

    /// Take the most recently cached block of (order, ft).
    #[inline]
    pub fn pop(&mut self, order: u8, ft: usize) -> Option<u32> {
        let c = ci(order, ft);
        let l = self.len[c];
        if l == 0 {
            return None;
        }
        self.len[c] = l - 1;
        Some(self.slots[c * self.cap as usize + (l - 1) as usize])
    }

    /// Cache block `off` for (order, ft); false if that cache is full.
    #[inline]
    pub fn push(&mut self, order: u8, ft: usize, off: u32) -> bool {
        let c = ci(order, ft);
        let l = self.len[c];
        if l >= self.cap {
            return false;
        }
        self.slots[c * self.cap as usize + l as usize] = off;
        self.len[c] = l + 1;
        true
    }

    /// [`Self::pop`] keeping the dirty marks ([`crate::Zone`]'s caches; the single-CPU
    /// allocator never has dirty blocks and uses the plain calls).
    #[inline]
    pub fn pop_tracked(&mut self, order: u8, ft: usize) -> Option<u32> {
        let c = ci(order, ft);
        let off = self.pop(order, ft)?;
        self.clean[c] = self.clean[c].min(self.len[c]);
        Some(off)
    }

    /// The most recently cached block of (order, ft) if no dirty block is cached there
    /// ([`crate::Zone`]'s fast path; otherwise the dirty ones must be zeroed first).
    #[inline(always)]
    pub fn pop_clean(&mut self, order: u8, ft: usize) -> Option<u32> {
        let c = ci(order, ft);
        let l = self.len[c];
        if l == 0 || self.clean[c] != l {
            return None;
        }
        self.len[c] = l - 1;
        self.clean[c] = l - 1;
        Some(self.slots[c * self.cap as usize + (l - 1) as usize])
    }

    /// Whether the cache of (order, ft) has room for one more block.
    #[inline(always)]
    pub fn has_room(&self, order: u8, ft: usize) -> bool {
        self.len[ci(order, ft)] < self.cap
    }

    /// Cache block `off` for (order, ft), `dirty` if it has not been zeroed yet; false if
    /// that cache is full. A clean block pushed above dirty ones counts as dirty.
    #[inline(always)]
    pub fn push_tracked(&mut self, order: u8, ft: usize, off: u32, dirty: bool) -> bool {
        let c = ci(order, ft);
        let l = self.len[c];
        if !self.push(order, ft, off) {
            return false;
        }
        if !dirty && self.clean[c] == l {
            self.clean[c] = l + 1;
        }
        true
    }

    /// The dirty blocks of (order, ft) (not zeroed yet), oldest first.
    #[inline]
    pub fn dirty(&self, order: u8, ft: usize) -> &[u32] {
        let c = ci(order, ft);
        let s = c * self.cap as usize;
        &self.slots[s + self.clean[c] as usize..s + self.len[c] as usize]
    }

    /// Record that every block of (order, ft) has been zeroed.
    #[inline]
    pub fn mark_clean(&mut self, order: u8, ft: usize) {
        let c = ci(order, ft);
        self.clean[c] = self.len[c];
    }

    /// Zero every dirty block of (order, ft), and `extra` with them, with one
    /// [`Stage2::zero_batch`] call per up to [`ZERO_BATCH`] blocks (`base`: the pfn of page
    /// offset 0), then mark the list clean; on error it stays dirty. [`crate::Zone`]'s
    /// zeroing of freed unmapped blocks, kept with the clean watermark it maintains
    /// ([`crate::BuddyAllocator`] still zeroes such blocks on free).
    pub(crate) fn zero_dirty<S: Stage2>(
        &mut self,
        order: u8,
        ft: usize,
        extra: Option<u32>,
        base: u64,
        s2: &mut S,
    ) -> Zeroed {
        let n = 1u64 << order;
        let mut z = Zeroed {
            calls: 0,
            pages: 0,
            result: Ok(()),
        };
        let mut ranges = [(0u64, 0u64); ZERO_BATCH];
        let mut k = 0;
        let mut flush = |ranges: &[(u64, u64)], z: &mut Zeroed| {
            z.result = s2.zero_batch(ranges);
            if z.result.is_ok() {
                z.calls += 1;
                z.pages += n * ranges.len() as u64;
            }
            z.result.is_ok()
        };
        for &off in self.dirty(order, ft).iter().chain(extra.as_ref()) {
            ranges[k] = (base + off as u64, n);
            k += 1;
            if k == ZERO_BATCH {
                if !flush(&ranges, &mut z) {
                    return z;
                }
                k = 0;
            }
        }
        if k != 0 && !flush(&ranges[..k], &mut z) {
            return z;
        }
        self.mark_clean(order, ft);
        z
    }

    /// The cached blocks of (order, ft), oldest first.
    pub fn blocks(&self, order: u8, ft: usize) -> &[u32] {
        let c = ci(order, ft);
        let s = c * self.cap as usize;
        &self.slots[s..s + self.len[c] as usize]
    }

    /// Where the slots start (128-byte aligned).
    #[cfg(test)]
    pub fn slots_ptr(&self) -> *const u32 {
        self.slots.as_ptr()
    }

    /// Bytes of cache storage.
    pub fn bytes(&self) -> usize {
        self.slots.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifo_per_order_and_freetype_with_capacity() {
        let mut p = Pcp::new(2);
        assert!(p.push(0, 0, 7));
        assert!(p.push(0, 0, 8));
        assert!(!p.push(0, 0, 9));
        assert!(p.push(0, 3, 1));
        assert!(p.push(2, 3, 4));
        assert_eq!(p.pages_of(0), 2);
        assert_eq!(p.pages_of(3), 5);
        assert_eq!(p.blocks(0, 0), &[7, 8]);
        assert_eq!(p.pop(0, 0), Some(8));
        assert_eq!(p.pop(0, 3), Some(1));
        assert_eq!(p.pop(0, 3), None);
        assert_eq!(p.pop(2, 3), Some(4));
        assert!(!p.is_empty());
        assert!(p.push_tracked(1, 3, 10, true));
        assert!(p.push_tracked(1, 3, 12, true));
        assert_eq!(p.dirty(1, 3), &[10, 12]);
        assert_eq!(p.pop_tracked(1, 3), Some(12));
        assert_eq!(p.dirty(1, 3), &[10]);
        p.mark_clean(1, 3);
        assert!(p.dirty(1, 3).is_empty());
        assert_eq!(p.pop_tracked(1, 3), Some(10));
        assert!(p.push_tracked(1, 3, 14, false));
        assert!(p.dirty(1, 3).is_empty());
        assert!(p.push_tracked(1, 3, 16, true));
        assert_eq!(p.dirty(1, 3), &[16]);
        assert!(!p.push_tracked(1, 3, 18, false));
        assert!(!p.has_room(1, 3));
        assert_eq!(p.pop_clean(1, 3), None, "a dirty block on top");
        p.mark_clean(1, 3);
        assert_eq!(p.pop_clean(1, 3), Some(16));
        assert!(p.has_room(1, 3));
        assert!(p.dirty(1, 3).is_empty());
        assert_eq!(p.pop_clean(1, 3), Some(14));
        assert_eq!(p.pop_clean(1, 3), None);
        let mut z = Pcp::new(0);
        assert!(!z.push(0, 0, 1));
        assert_eq!(z.pop(0, 0), None);
        assert!(z.is_empty());
    }
}
