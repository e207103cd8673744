//! Intrusive doubly linked free lists, one per (order, freetype), threaded through the
//! per-page metadata with 32-bit links: push, pop and remove are O(1).

use crate::freetype::Freetype;
use crate::meta::{PageMeta, NIL};
use crate::MAX_ORDER;

/// Number of orders.
pub(crate) const NR_ORDERS: usize = MAX_ORDER as usize + 1;

/// The heads of every free list plus per-list counts and a per-freetype non-empty mask.
#[derive(Clone, Debug)]
pub(crate) struct FreeLists {
    /// First block of each list, or NIL.
    pub head: [[u32; Freetype::COUNT]; NR_ORDERS],
    /// Blocks on each list.
    pub count: [[u64; Freetype::COUNT]; NR_ORDERS],
    /// Bit `o` set iff list (o, ft) is non-empty.
    pub nonempty: [u16; Freetype::COUNT],
}

impl FreeLists {
    /// All lists empty.
    pub const fn new() -> FreeLists {
        FreeLists {
            head: [[NIL; Freetype::COUNT]; NR_ORDERS],
            count: [[0; Freetype::COUNT]; NR_ORDERS],
            nonempty: [0; Freetype::COUNT],
        }
    }

    /// Push block `off` on list (order, ft).
    #[inline(always)]
    pub fn push(&mut self, meta: &mut [PageMeta], off: u32, order: usize, ft: usize) {
        let h = self.head[order][ft];
        let m = &mut meta[off as usize];
        m.next = h;
        m.prev = NIL;
        if h != NIL {
            meta[h as usize].prev = off;
        }
        self.head[order][ft] = off;
        self.count[order][ft] += 1;
        self.nonempty[ft] |= 1 << order;
    }

    /// Remove block `off` from list (order, ft); it must be on it.
    #[inline(always)]
    pub fn remove(&mut self, meta: &mut [PageMeta], off: u32, order: usize, ft: usize) {
        let m = meta[off as usize];
        if m.prev == NIL {
            self.head[order][ft] = m.next;
        } else {
            meta[m.prev as usize].next = m.next;
        }
        if m.next != NIL {
            meta[m.next as usize].prev = m.prev;
        }
        let e = &mut meta[off as usize];
        e.next = NIL;
        e.prev = NIL;
        self.count[order][ft] -= 1;
        if self.head[order][ft] == NIL {
            self.nonempty[ft] &= !(1 << order);
        }
    }

    /// Pop the first block of list (order, ft), if any.
    #[inline]
    pub fn pop(&mut self, meta: &mut [PageMeta], order: usize, ft: usize) -> Option<u32> {
        let h = self.head[order][ft];
        if h == NIL {
            return None;
        }
        self.remove(meta, h, order, ft);
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
        let mut meta = vec![PageMeta::EMPTY; 8];
        let mut l = FreeLists::new();
        for off in [1u32, 3, 5] {
            l.push(&mut meta, off, 0, 2);
        }
        assert_eq!(l.count[0][2], 3);
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
