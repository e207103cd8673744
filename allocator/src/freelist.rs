//! Intrusive doubly linked free lists, one per (order, freetype), threaded through the
//! per-page metadata with 32-bit links: push, pop and remove are O(1).

use crate::freetype::Freetype;
use crate::meta::{Links, NIL};
use crate::MAX_ORDER;

/// Number of orders.
pub(crate) const NR_ORDERS: usize = MAX_ORDER as usize + 1;

/// Number of free lists.
pub(crate) const NR_LISTS: usize = NR_ORDERS * Freetype::COUNT;

/// Head of one free list. It keeps no length: a push or a remove then writes only the
/// links and the head (lengths are counted by walking, for snapshots and invariants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListHead {
    /// First block, or NIL.
    pub first: u32,
}

/// The heads of every free list (one flat array indexed by `order * COUNT + ft`, so one
/// index computation and one bounds check per operation) plus a per-freetype non-empty mask.
#[derive(Clone, Debug)]
pub(crate) struct FreeLists {
    lists: [ListHead; NR_LISTS],
    /// Bit `o` set iff list (o, ft) is non-empty.
    pub nonempty: [u16; Freetype::COUNT],
}

/// Index of list (order, ft).
#[inline(always)]
const fn li(order: usize, ft: usize) -> usize {
    order * Freetype::COUNT + ft
}

impl FreeLists {
    /// All lists empty.
    pub const fn new() -> FreeLists {
        FreeLists {
            lists: [ListHead { first: NIL }; NR_LISTS],
            nonempty: [0; Freetype::COUNT],
        }
    }

    /// First block of list (order, ft), or NIL.
    #[inline]
    pub fn head(&self, order: usize, ft: usize) -> u32 {
        self.lists[li(order, ft)].first
    }

    /// Blocks on list (order, ft), counted by walking it: O(its length). The walk stops
    /// after `links.len()` steps, so even a corrupted (cyclic) list gives an answer.
    pub fn count(&self, links: &[Links], order: usize, ft: usize) -> u64 {
        let mut cur = self.head(order, ft);
        let mut k = 0u64;
        while cur != NIL && k < links.len() as u64 {
            k += 1;
            cur = links.get(cur as usize).map_or(NIL, |l| l.next);
        }
        k
    }

    /// Blocks on every list, `[order][ft]`: O(free blocks).
    pub fn counts(&self, links: &[Links]) -> [[u64; Freetype::COUNT]; NR_ORDERS] {
        let mut c = [[0u64; Freetype::COUNT]; NR_ORDERS];
        for (o, row) in c.iter_mut().enumerate() {
            for (ft, v) in row.iter_mut().enumerate() {
                *v = self.count(links, o, ft);
            }
        }
        c
    }

    /// Push block `off` on list (order, ft).
    #[inline(always)]
    pub fn push(&mut self, links: &mut [Links], off: u32, order: usize, ft: usize) {
        let l = &mut self.lists[li(order, ft)];
        let h = l.first;
        l.first = off;
        links[off as usize] = Links { next: h, prev: NIL };
        if h != NIL {
            links[h as usize].prev = off;
        } else {
            // Only an empty list changes the mask.
            self.nonempty[ft] |= 1 << order;
        }
    }

    /// Remove block `off` from list (order, ft); it must be on it. Its own links are left
    /// stale (they are rewritten whenever it is pushed again).
    #[inline(always)]
    pub fn remove(&mut self, links: &mut [Links], off: u32, order: usize, ft: usize) {
        let Links { next, prev } = links[off as usize];
        let l = &mut self.lists[li(order, ft)];
        if prev == NIL {
            l.first = next;
            // Only removing the last block empties a list.
            if next == NIL {
                self.nonempty[ft] &= !(1 << order);
            }
        } else {
            links[prev as usize].next = next;
        }
        if next != NIL {
            links[next as usize].prev = prev;
        }
    }

    /// Pop the first block of list (order, ft), if any.
    #[inline]
    pub fn pop(&mut self, links: &mut [Links], order: usize, ft: usize) -> Option<u32> {
        let h = self.head(order, ft);
        if h == NIL {
            return None;
        }
        self.remove(links, h, order, ft);
        Some(h)
    }

    /// Lowest order `>= order` whose list for `ft` is non-empty.
    #[inline]
    pub fn first_nonempty(&self, order: usize, ft: usize) -> Option<usize> {
        let m = self.nonempty[ft] >> order;
        if m == 0 {
            None
        } else {
            Some(order + m.trailing_zeros() as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn push_remove_pop_keep_links() {
        let mut meta = vec![Links::EMPTY; 8];
        let mut l = FreeLists::new();
        for off in [1u32, 3, 5] {
            l.push(&mut meta, off, 0, 2);
        }
        assert_eq!(l.count(&meta, 0, 2), 3);
        assert_eq!(l.first_nonempty(0, 2), Some(0));
        l.remove(&mut meta, 3, 0, 2);
        assert_eq!(meta[5].next, 1);
        assert_eq!(meta[1].prev, 5);
        assert_eq!(l.pop(&mut meta, 0, 2), Some(5));
        assert_eq!(l.pop(&mut meta, 0, 2), Some(1));
        assert_eq!(l.pop(&mut meta, 0, 2), None);
        assert_eq!(l.nonempty[2], 0);
        assert_eq!(l.first_nonempty(0, 2), None);
        l.push(&mut meta, 4, 3, 1);
        assert_eq!(l.first_nonempty(0, 1), Some(3));
        assert_eq!(l.first_nonempty(4, 1), None);
    }
}
