//! Where the replay's live allocations sit, per 2 MiB block: pages in use, allocations that
//! cannot move, the allocation at each head page (for compaction), and the free memory
//! *stranded* in partly used blocks of each kind.
//!
//! A block's kind is what stage 2 says: fully unmapped (an unmapped pageblock or cache chunk)
//! or not. Free pages of a partly used unmapped block cannot serve a mapped request, and
//! those of a partly used mapped block cannot serve an unmapped one, until the block is empty
//! and flips: that is the memory stranded for the other kind (Vlastimil Babka's
//! no-free-pageblock problem). A block changes kind only while empty (a flip needs a whole
//! free pageblock), so each block's share is recomputed only when its pages in use change.

use allocator::{Stage2, PAGEBLOCK_PAGES};
use serde::Serialize;

use crate::tracker::Tracker;

/// No allocation at this head page.
pub(crate) const NO_ID: u32 = u32::MAX;

/// Stranded free memory, in pages.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stranded {
    /// Free pages in partly used unmapped blocks (unusable by mapped requests).
    pub for_mapped: u64,
    /// Free pages in partly used mapped blocks (unusable by unmapped requests).
    pub for_unmapped: u64,
}

/// Stranded memory over the replay.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct StrandedReport {
    /// At the end.
    pub end: Stranded,
    /// The most pages stranded for mapped requests at any moment, and when (1-based event).
    pub worst_for_mapped: u64,
    /// Event at which `worst_for_mapped` was first reached.
    pub worst_for_mapped_at: u64,
    /// The most pages stranded for unmapped requests at any moment.
    pub worst_for_unmapped: u64,
    /// Event at which `worst_for_unmapped` was first reached.
    pub worst_for_unmapped_at: u64,
    /// Sampled: (event, for mapped, for unmapped).
    pub over_time: Vec<(u64, u64, u64)>,
}

/// Per-block bookkeeping of the live allocations.
pub(crate) struct Placement {
    base: u64,
    nr: u64,
    used: Vec<u32>,
    immovable: Vec<u32>,
    /// Stranded pages each block contributes now and to which kind (true: unmapped block).
    contrib: Vec<(bool, u32)>,
    /// Allocation id at each head page (only kept for compaction).
    owner: Option<Vec<u32>>,
    now: Stranded,
    pub(crate) report: StrandedReport,
}

impl Placement {
    /// Bookkeeping for `[base, base + nr)`; `owners` keeps the head-page table.
    pub(crate) fn new(base: u64, nr: u64, owners: bool) -> Self {
        let blocks = nr.div_ceil(PAGEBLOCK_PAGES) as usize;
        Placement {
            base,
            nr,
            used: vec![0; blocks],
            immovable: vec![0; blocks],
            contrib: vec![(false, 0); blocks],
            owner: owners.then(|| vec![NO_ID; nr as usize]),
            now: Stranded::default(),
            report: StrandedReport::default(),
        }
    }

    /// Blocks.
    pub(crate) fn blocks(&self) -> usize {
        self.used.len()
    }

    /// Pages in use in block `b`.
    pub(crate) fn used(&self, b: usize) -> u32 {
        self.used[b]
    }

    /// Live allocations that cannot move touching block `b`.
    pub(crate) fn immovable(&self, b: usize) -> u32 {
        self.immovable[b]
    }

    /// The allocation ids with a head in block `b` (compaction only).
    pub(crate) fn heads_in(&self, b: usize) -> Vec<u32> {
        let Some(o) = &self.owner else {
            return Vec::new();
        };
        let start = b * PAGEBLOCK_PAGES as usize;
        let end = (start + PAGEBLOCK_PAGES as usize).min(o.len());
        o[start..end]
            .iter()
            .copied()
            .filter(|&i| i != NO_ID)
            .collect()
    }

    /// Stranded memory now.
    pub(crate) fn stranded(&self) -> Stranded {
        self.now
    }

    /// An allocation (`add`) or free of `2^order` pages at `pfn` by allocation `id`.
    pub(crate) fn note<S: Stage2>(
        &mut self,
        t: &Tracker<S>,
        id: u32,
        pfn: u64,
        order: u8,
        movable: bool,
        add: bool,
    ) {
        let Some(off) = pfn.checked_sub(self.base).filter(|&o| o < self.nr) else {
            return;
        };
        if let Some(o) = &mut self.owner {
            o[off as usize] = if add { id } else { NO_ID };
        }
        let end = (off + (1u64 << order)).min(self.nr);
        let mut p = off;
        while p < end {
            let b = (p / PAGEBLOCK_PAGES) as usize;
            let bend = ((b as u64 + 1) * PAGEBLOCK_PAGES).min(end);
            let n = (bend - p) as u32;
            if add {
                self.used[b] += n;
                self.immovable[b] += u32::from(!movable);
            } else {
                self.used[b] -= n;
                self.immovable[b] -= u32::from(!movable);
            }
            self.recompute(t, b);
            p = bend;
        }
    }

    fn recompute<S: Stage2>(&mut self, t: &Tracker<S>, b: usize) {
        let size = t.block_pages(b);
        let unmapped_kind = size > 0 && t.block_unmapped_pages(b) == size;
        let used = self.used[b];
        let free = if used > 0 && used < size {
            size - used
        } else {
            0
        };
        let (k, old) = self.contrib[b];
        fn field(s: &mut Stranded, unm: bool) -> &mut u64 {
            if unm {
                &mut s.for_mapped
            } else {
                &mut s.for_unmapped
            }
        }
        *field(&mut self.now, k) -= u64::from(old);
        *field(&mut self.now, unmapped_kind) += u64::from(free);
        self.contrib[b] = (unmapped_kind, free);
    }

    /// Note the stranded memory after event `i` (1-based): worst values, and a sample if asked.
    pub(crate) fn observe(&mut self, i: u64, sample: bool) {
        let r = &mut self.report;
        if self.now.for_mapped > r.worst_for_mapped {
            r.worst_for_mapped = self.now.for_mapped;
            r.worst_for_mapped_at = i;
        }
        if self.now.for_unmapped > r.worst_for_unmapped {
            r.worst_for_unmapped = self.now.for_unmapped;
            r.worst_for_unmapped_at = i;
        }
        if sample {
            r.over_time
                .push((i, self.now.for_mapped, self.now.for_unmapped));
        }
    }
}
