//! Per-freetype caches of free order-0 pages, like Linux's per-CPU page lists.
//!
//! A freed order-0 page is parked here instead of being merged, and the next order-0 request
//! of the same freetype takes it back without touching the buddy lists: the hot alloc+free
//! pair costs a few dozen instructions instead of a split and a merge per order. When a cache
//! is full, half of it is returned to the buddy lists (merging). Before any flip and before an
//! allocation fails, every cache is drained so cached pages never hide a whole free pageblock.
//! Cached pages count as free everywhere (`free_pages_count`, `Snapshot::pcp_pages`) and are
//! *not* allocations (`allocation_containing` says None, freeing one again is `NotAllocated`).

use crate::freetype::Freetype;
use alloc::vec::Vec;

/// The caches: one LIFO stack of page offsets per freetype.
#[derive(Clone, Debug)]
pub(crate) struct Pcp {
    slots: Vec<u32>,
    len: [u32; Freetype::COUNT],
    cap: u32,
}

impl Pcp {
    /// Caches of `cap` pages each (0 disables them).
    pub fn new(cap: u32) -> Pcp {
        Pcp {
            slots: alloc::vec![0; cap as usize * Freetype::COUNT],
            len: [0; Freetype::COUNT],
            cap,
        }
    }

    /// Capacity of each cache.
    #[inline]
    pub fn cap(&self) -> u32 {
        self.cap
    }

    /// Pages in the cache of `ft`.
    #[inline]
    pub fn len(&self, ft: usize) -> u32 {
        self.len[ft]
    }

    /// Pages in all caches.
    pub fn total(&self) -> u64 {
        self.len.iter().map(|&l| l as u64).sum()
    }

    /// Take the most recently cached page of `ft`.
    #[inline]
    pub fn pop(&mut self, ft: usize) -> Option<u32> {
        let l = self.len[ft];
        if l == 0 {
            return None;
        }
        self.len[ft] = l - 1;
        Some(self.slots[ft * self.cap as usize + (l - 1) as usize])
    }

    /// Cache page `off` for `ft`; false if that cache is full.
    #[inline]
    pub fn push(&mut self, ft: usize, off: u32) -> bool {
        let l = self.len[ft];
        if l >= self.cap {
            return false;
        }
        self.slots[ft * self.cap as usize + l as usize] = off;
        self.len[ft] = l + 1;
        true
    }

    /// The cached pages of `ft`, oldest first.
    pub fn pages(&self, ft: usize) -> &[u32] {
        let s = ft * self.cap as usize;
        &self.slots[s..s + self.len[ft] as usize]
    }

    /// Bytes of cache storage.
    pub fn bytes(&self) -> usize {
        self.slots.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifo_per_freetype_and_capacity() {
        let mut p = Pcp::new(2);
        assert!(p.push(0, 7));
        assert!(p.push(0, 8));
        assert!(!p.push(0, 9));
        assert!(p.push(3, 1));
        assert_eq!(p.total(), 3);
        assert_eq!(p.pages(0), &[7, 8]);
        assert_eq!(p.pop(0), Some(8));
        assert_eq!(p.pop(3), Some(1));
        assert_eq!(p.pop(3), None);
        let mut z = Pcp::new(0);
        assert!(!z.push(0, 1));
        assert_eq!(z.pop(0), None);
    }
}
