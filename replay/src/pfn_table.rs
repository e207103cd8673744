//! A flat table indexed by pfn: the loader's per-page state without a hash map.
//!
//! Pfns below [`FLAT_LIMIT`] live in 4,096-entry chunks allocated on first touch, found through
//! a directory that grows with the highest chunk seen; a real trace's pfns (its machine's RAM)
//! fall there, so a lookup is two array reads that stay in cache for nearby pages. Pfns at or
//! above the limit (a corrupt or synthetic trace) go to a hash map, so memory stays bounded by
//! the pages the trace names, never by the value of a pfn.

use std::collections::HashMap;

/// Pfns per chunk (2^12: 32 KiB of 8-byte entries).
const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

/// Pfns below this are kept flat (2^34 pages = 64 TiB of RAM; the directory is then at most
/// 16 MiB).
pub const FLAT_LIMIT: u64 = 1 << 34;

/// No chunk for this directory entry.
const NONE: u32 = u32::MAX;

/// A map from pfn to `T` with `T::default()` for pfns never written.
pub struct PfnTable<T: Copy + Default> {
    dir: Vec<u32>,
    chunks: Vec<Box<[T]>>,
    far: HashMap<u64, T>,
}

impl<T: Copy + Default> Default for PfnTable<T> {
    fn default() -> Self {
        PfnTable {
            dir: Vec::new(),
            chunks: Vec::new(),
            far: HashMap::new(),
        }
    }
}

impl<T: Copy + Default> PfnTable<T> {
    /// The entry of `pfn` (the default if never written).
    #[inline(always)]
    pub fn get(&self, pfn: u64) -> T {
        if pfn < FLAT_LIMIT {
            let d = (pfn >> CHUNK_BITS) as usize;
            match self.dir.get(d) {
                Some(&c) if c != NONE => self.chunks[c as usize][pfn as usize & (CHUNK - 1)],
                _ => T::default(),
            }
        } else {
            self.far.get(&pfn).copied().unwrap_or_default()
        }
    }

    /// The entry of `pfn`, mutably (its chunk allocated if needed).
    #[inline(always)]
    pub fn get_mut(&mut self, pfn: u64) -> &mut T {
        if pfn >= FLAT_LIMIT {
            return self.far.entry(pfn).or_default();
        }
        let d = (pfn >> CHUNK_BITS) as usize;
        if d >= self.dir.len() {
            self.dir.resize(d + 1, NONE);
        }
        if self.dir[d] == NONE {
            self.dir[d] = self.chunks.len() as u32;
            self.chunks
                .push(vec![T::default(); CHUNK].into_boxed_slice());
        }
        let c = self.dir[d] as usize;
        &mut self.chunks[c][pfn as usize & (CHUNK - 1)]
    }

    /// Set the entry of `pfn`.
    #[inline(always)]
    pub fn set(&mut self, pfn: u64, v: T) {
        *self.get_mut(pfn) = v;
    }

    /// How many entries ever touched (including ones set back to the default) satisfy `f`.
    pub fn count(&self, f: impl Fn(&T) -> bool) -> usize {
        let mut n = 0;
        for c in &self.chunks {
            for v in c.iter() {
                n += usize::from(f(v));
            }
        }
        n + self.far.values().filter(|v| f(v)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_and_far_pfns() {
        let mut t: PfnTable<u32> = PfnTable::default();
        assert_eq!(t.get(5), 0);
        t.set(5, 7);
        t.set(1 << 20, 9);
        t.set(FLAT_LIMIT, 11);
        t.set(u64::MAX, 13);
        assert_eq!(
            (t.get(5), t.get(1 << 20), t.get(FLAT_LIMIT), t.get(u64::MAX)),
            (7, 9, 11, 13)
        );
        assert_eq!(t.get(6), 0);
        // Two chunks and two far entries: memory follows the pages named, not their values.
        assert_eq!(t.chunks.len(), 2);
        assert_eq!(t.count(|&v| v != 0), 4);
        assert_eq!(t.count(|&v| v == 0), 2 * CHUNK - 2);
    }
}
