//! A [`Stage2`] wrapper that counts what a policy asks of stage 2 and measures the layout.
//!
//! It forwards every call to the real backend (a pure model or a VM's memslots) and keeps, for
//! the managed range, one bit per page (unmapped or not), the number of unmapped pages per
//! 2 MiB block, how many blocks are *intact* (fully mapped or fully unmapped: they could keep a
//! huge mapping) now and at the worst moment, and how many memslots the layout needs (one per
//! maximal run of exposed pages, the reserved low memory below the managed range included) now
//! and at its peak. Updates cost O(pages in the call). A call outside the managed range fails
//! with [`Stage2Error::Backend`]`(-22)` instead of panicking.

use std::time::Instant;

use allocator::{Pfn, Stage2, Stage2Error, PAGEBLOCK_PAGES};
use serde::Serialize;

use crate::flush::{Arch, FlushStats, PendingFlush};

/// Pages in a 1 GiB region of the direct map.
pub const GIB_PAGES: u64 = 1 << 18;

/// KVM's default memslot limit on x86-64 (`KVM_USER_MEM_SLOTS`).
pub const DEFAULT_MAX_MEMSLOTS: u64 = 32764;

/// What the policy asked of stage 2.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stage2Stats {
    /// `unmap` calls (each one flush).
    pub unmap_calls: u64,
    /// `map` calls.
    pub map_calls: u64,
    /// `zero` calls.
    pub zero_calls: u64,
    /// Pages named by `unmap` calls.
    pub pages_unmapped: u64,
    /// Pages named by `map` calls.
    pub pages_mapped: u64,
    /// Pages named by `zero` calls.
    pub pages_zeroed: u64,
    /// Calls the backend refused (e.g. out of memslots) or that fell outside the range.
    pub failed_calls: u64,
    /// Of those, refused because the backend ran out of memslots.
    pub out_of_slots: u64,
}

impl Stage2Stats {
    /// Mapping updates (the flush analogue): unmap + map calls.
    pub fn updates(&self) -> u64 {
        self.unmap_calls + self.map_calls
    }
}

/// Wall-clock time spent in the backend (measured only when asked for).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stage2Timing {
    /// Nanoseconds in `unmap` calls.
    pub unmap_ns: u64,
    /// Nanoseconds in `map` calls.
    pub map_ns: u64,
    /// Nanoseconds in `zero` calls.
    pub zero_ns: u64,
    /// Slowest single call.
    pub max_call_ns: u64,
    /// Median time of one map/unmap call.
    pub median_update_ns: u64,
}

/// Configuration of a [`Tracker`].
#[derive(Clone, Copy, Debug)]
pub struct TrackerConfig {
    /// First managed pfn (must be 2 MiB aligned).
    pub base_pfn: Pfn,
    /// Managed pages.
    pub nr_pages: u64,
    /// Whether exposed reserved memory lies directly below `base_pfn` (it shares a memslot).
    pub reserved_below: bool,
    /// Memslot limit to compare the layout against.
    pub max_slots: u64,
    /// Measure the time of every backend call.
    pub timed: bool,
    /// Whose flush rules count shootdowns.
    pub arch: Arch,
    /// Batch removals into one shootdown per this many pages (0: every removal flushes).
    pub flush_batch: u64,
}

/// Counting and measuring wrapper around a stage-2 backend.
pub struct Tracker<S: Stage2> {
    inner: S,
    cfg: TrackerConfig,
    unmapped: Vec<u64>,
    block_unmapped: Vec<u32>,
    intact: u64,
    worst_intact: u64,
    runs: u64,
    peak_runs: u64,
    unmapped_pages: u64,
    stats: Stage2Stats,
    timing: Stage2Timing,
    update_ns: Vec<u32>,
    /// Event index the owner sets so the worst moment can be located.
    pub now: u64,
    worst_at: u64,
    flush: FlushStats,
    pending: PendingFlush,
    /// Per 2 MiB block: ever split (Linux's change-page-attribute code never re-merges).
    ever_split: Vec<bool>,
    ever_split_blocks: u64,
    /// Per 1 GiB region of `[0, base + nr)` (absolute pfns, reserved memory included):
    /// unmapped pages, size, ever split.
    gib_unmapped: Vec<u32>,
    gib_size: Vec<u32>,
    gib_ever_split: Vec<bool>,
    gib_ever_split_count: u64,
    gib_intact: u64,
}

/// errno-style code for a call outside the managed range.
const EINVAL: i32 = -22;

impl<S: Stage2> Tracker<S> {
    /// Wrap `inner`; every managed page starts mapped.
    pub fn new(inner: S, cfg: TrackerConfig) -> Self {
        let words = cfg.nr_pages.div_ceil(64) as usize;
        let blocks = cfg.nr_pages.div_ceil(PAGEBLOCK_PAGES);
        let end = cfg.base_pfn + cfg.nr_pages;
        let regions = end.div_ceil(GIB_PAGES);
        Tracker {
            inner,
            cfg,
            unmapped: vec![0; words],
            block_unmapped: vec![0; blocks as usize],
            intact: blocks,
            worst_intact: blocks,
            runs: u64::from(cfg.nr_pages > 0 || cfg.reserved_below),
            peak_runs: u64::from(cfg.nr_pages > 0 || cfg.reserved_below),
            unmapped_pages: 0,
            stats: Stage2Stats::default(),
            timing: Stage2Timing::default(),
            update_ns: Vec::new(),
            now: 0,
            worst_at: 0,
            flush: FlushStats {
                arch: cfg.arch,
                batch_pages: cfg.flush_batch,
                ..FlushStats::default()
            },
            pending: PendingFlush::new(cfg.flush_batch),
            ever_split: vec![false; blocks as usize],
            ever_split_blocks: 0,
            gib_unmapped: vec![0; regions as usize],
            gib_size: (0..regions)
                .map(|r| (((r + 1) * GIB_PAGES).min(end) - r * GIB_PAGES) as u32)
                .collect(),
            gib_ever_split: vec![false; regions as usize],
            gib_ever_split_count: 0,
            gib_intact: regions,
        }
    }

    /// Shootdowns and the changes behind them so far (the derived figures are filled by the
    /// caller, see [`FlushStats::finish`]).
    pub fn flush_stats(&self) -> FlushStats {
        self.flush
    }

    /// A page in `[pfn, pfn + count)` is about to be reused: a removal of it still waiting in
    /// the batch is flushed first.
    pub fn flush_before_reuse(&mut self, pfn: Pfn, count: u64) {
        if self.pending.overlaps(pfn, count) {
            self.flush.shootdowns += 1;
            self.flush.forced_by_reuse += 1;
            self.pending.clear();
        }
    }

    /// Issue the shootdown for any removals still waiting in the batch (end of the replay).
    pub fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            self.flush.shootdowns += 1;
            self.pending.clear();
        }
    }

    /// 2 MiB blocks that were ever split (fully mapped or unmapped no longer), re-merged or not.
    pub fn ever_split_blocks(&self) -> u64 {
        self.ever_split_blocks
    }

    /// 1 GiB regions of the direct map over `[0, base + nr)`, reserved memory included.
    pub fn gib_regions(&self) -> u64 {
        self.gib_size.len() as u64
    }

    /// 1 GiB regions fully mapped or fully unmapped now.
    pub fn gib_intact(&self) -> u64 {
        self.gib_intact
    }

    /// 1 GiB regions ever split.
    pub fn gib_ever_split(&self) -> u64 {
        self.gib_ever_split_count
    }

    /// Unmapped pages in the 2 MiB block at index `blk` (from the managed base).
    pub fn block_unmapped_pages(&self, blk: usize) -> u32 {
        self.block_unmapped.get(blk).copied().unwrap_or(0)
    }

    /// Pages in the 2 MiB block at index `blk` (the last one may be partial).
    pub fn block_pages(&self, blk: usize) -> u32 {
        if blk < self.block_unmapped.len() {
            self.block_size(blk)
        } else {
            0
        }
    }

    /// First managed pfn.
    pub fn base_pfn(&self) -> Pfn {
        self.cfg.base_pfn
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped backend, mutably.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwrap.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Counters so far.
    pub fn stats(&self) -> Stage2Stats {
        self.stats
    }

    /// Backend time so far (zero unless `timed`), with the median map/unmap time.
    pub fn timing(&self) -> Stage2Timing {
        let mut t = self.timing;
        let mut d = self.update_ns.clone();
        d.sort_unstable();
        t.median_update_ns = d.get(d.len() / 2).map_or(0, |&x| u64::from(x));
        t
    }

    /// 2 MiB blocks in the managed range (the last one may be partial).
    pub fn blocks(&self) -> u64 {
        self.block_unmapped.len() as u64
    }

    /// Blocks fully mapped or fully unmapped now.
    pub fn intact_blocks(&self) -> u64 {
        self.intact
    }

    /// Fewest intact blocks at any moment, and the event index when it was first reached.
    pub fn worst_intact_blocks(&self) -> (u64, u64) {
        (self.worst_intact, self.worst_at)
    }

    /// Memslots the layout needs now (maximal exposed runs).
    pub fn memslots(&self) -> u64 {
        self.runs
    }

    /// Most memslots needed at any moment.
    pub fn peak_memslots(&self) -> u64 {
        self.peak_runs
    }

    /// Pages unmapped now.
    pub fn unmapped_pages(&self) -> u64 {
        self.unmapped_pages
    }

    /// Whether the managed page at index `i` is unmapped.
    pub fn is_unmapped(&self, pfn: Pfn) -> bool {
        pfn.checked_sub(self.cfg.base_pfn)
            .filter(|&i| i < self.cfg.nr_pages)
            .is_some_and(|i| self.bit(i))
    }

    fn bit(&self, i: u64) -> bool {
        self.unmapped[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    fn mapped_at(&self, i: i64) -> bool {
        if i < 0 {
            self.cfg.reserved_below
        } else {
            (i as u64) < self.cfg.nr_pages && !self.bit(i as u64)
        }
    }

    /// Run starts among indices [a, b].
    fn run_starts(&self, a: u64, b: u64) -> u64 {
        let b = b.min(self.cfg.nr_pages.saturating_sub(1));
        let mut n = 0;
        let mut prev = self.mapped_at(a as i64 - 1);
        for i in a..=b {
            let cur = self.mapped_at(i as i64);
            n += u64::from(cur && !prev);
            prev = cur;
        }
        n
    }

    fn block_size(&self, blk: usize) -> u32 {
        let start = blk as u64 * PAGEBLOCK_PAGES;
        (self.cfg.nr_pages - start).min(PAGEBLOCK_PAGES) as u32
    }

    /// Index range of [pfn, pfn+count) inside the managed range.
    fn range(&self, pfn: Pfn, count: u64) -> Result<(u64, u64), Stage2Error> {
        let a = pfn
            .checked_sub(self.cfg.base_pfn)
            .ok_or(Stage2Error::Backend(EINVAL))?;
        let b = a.checked_add(count).ok_or(Stage2Error::Backend(EINVAL))?;
        if b > self.cfg.nr_pages || count == 0 {
            return Err(Stage2Error::Backend(EINVAL));
        }
        Ok((a, b))
    }

    /// Set pages [a, b) to `unmapped` and update blocks and runs.
    fn apply(&mut self, a: u64, b: u64, unmapped: bool) {
        let before = self.run_starts(a, b);
        let mut i = a;
        while i < b {
            let blk = (i / PAGEBLOCK_PAGES) as usize;
            let blk_end = ((blk as u64 + 1) * PAGEBLOCK_PAGES).min(b);
            let mut changed = 0u32;
            for j in i..blk_end {
                let (w, m) = ((j / 64) as usize, 1u64 << (j % 64));
                let was = self.unmapped[w] & m != 0;
                if was != unmapped {
                    self.unmapped[w] ^= m;
                    changed += 1;
                }
            }
            if changed > 0 {
                let size = self.block_size(blk);
                let c = &mut self.block_unmapped[blk];
                let was_intact = *c == 0 || *c == size;
                if unmapped {
                    *c += changed;
                    self.unmapped_pages += u64::from(changed);
                } else {
                    *c -= changed;
                    self.unmapped_pages -= u64::from(changed);
                }
                let is_intact = *c == 0 || *c == size;
                match (was_intact, is_intact) {
                    (true, false) => {
                        self.intact -= 1;
                        if !self.ever_split[blk] {
                            self.ever_split[blk] = true;
                            self.ever_split_blocks += 1;
                        }
                    }
                    (false, true) => self.intact += 1,
                    _ => {}
                }
                // The block lies inside one 1 GiB region (both are aligned).
                let g = ((self.cfg.base_pfn + blk as u64 * PAGEBLOCK_PAGES) / GIB_PAGES) as usize;
                let (gu, gs) = (&mut self.gib_unmapped[g], self.gib_size[g]);
                let was = *gu == 0 || *gu == gs;
                if unmapped {
                    *gu += changed;
                } else {
                    *gu -= changed;
                }
                let now = *gu == 0 || *gu == gs;
                match (was, now) {
                    (true, false) => {
                        self.gib_intact -= 1;
                        if !self.gib_ever_split[g] {
                            self.gib_ever_split[g] = true;
                            self.gib_ever_split_count += 1;
                        }
                    }
                    (false, true) => self.gib_intact += 1,
                    _ => {}
                }
            }
            i = blk_end;
        }
        let after = self.run_starts(a, b);
        self.runs = self.runs + after - before;
        self.peak_runs = self.peak_runs.max(self.runs);
        if self.intact < self.worst_intact {
            self.worst_intact = self.intact;
            self.worst_at = self.now;
        }
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut S) -> T) -> (T, u64) {
        if !self.cfg.timed {
            return (f(&mut self.inner), 0);
        }
        let t = Instant::now();
        let r = f(&mut self.inner);
        let ns = t.elapsed().as_nanos() as u64;
        self.timing.max_call_ns = self.timing.max_call_ns.max(ns);
        (r, ns)
    }

    fn note_update(&mut self, ns: u64) {
        if self.cfg.timed {
            self.update_ns.push(u32::try_from(ns).unwrap_or(u32::MAX));
        }
    }

    /// Recount runs and blocks from scratch (test oracle for the incremental counts).
    pub fn recount(&self) -> (u64, u64) {
        let n = self.cfg.nr_pages;
        let runs =
            u64::from(self.cfg.reserved_below) + if n == 0 { 0 } else { self.run_starts(0, n - 1) };
        let intact = (0..self.block_unmapped.len())
            .filter(|&b| {
                let start = b as u64 * PAGEBLOCK_PAGES;
                let end = (start + PAGEBLOCK_PAGES).min(n);
                let c = (start..end).filter(|&i| self.bit(i)).count() as u64;
                c == 0 || c == end - start
            })
            .count() as u64;
        (runs, intact)
    }
}

impl<S: Stage2> Tracker<S> {
    /// An `unmap` (`unmapped`) or `map` of [pfn, pfn+count): timed, counted, and applied to the
    /// layout when the backend accepts it.
    fn update(&mut self, pfn: Pfn, count: u64, unmapped: bool) -> Result<(), Stage2Error> {
        let r = self.range(pfn, count).and_then(|(a, b)| {
            let (res, ns) = self.timed(|s| {
                if unmapped {
                    s.unmap(pfn, count)
                } else {
                    s.map(pfn, count)
                }
            });
            if unmapped {
                self.timing.unmap_ns += ns;
            } else {
                self.timing.map_ns += ns;
            }
            self.note_update(ns);
            res.map(|()| (a, b))
        });
        let (a, b) = self.count_failure(r)?;
        if unmapped {
            self.stats.unmap_calls += 1;
            self.stats.pages_unmapped += count;
            self.flush.removals += 1;
            if self.pending.add(pfn, count) {
                self.flush.shootdowns += 1;
            }
        } else {
            self.stats.map_calls += 1;
            self.stats.pages_mapped += count;
            self.flush.additions += 1;
            if self.cfg.arch.additions_flush() {
                self.flush.shootdowns += 1;
            }
        }
        self.apply(a, b, unmapped);
        Ok(())
    }

    /// Counts a refused call (and whether it ran out of memslots), passing the result on.
    fn count_failure<T>(&mut self, r: Result<T, Stage2Error>) -> Result<T, Stage2Error> {
        r.inspect_err(|&e| {
            self.stats.failed_calls += 1;
            if e == Stage2Error::OutOfSlots {
                self.stats.out_of_slots += 1;
            }
        })
    }
}

impl<S: Stage2> Stage2 for Tracker<S> {
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.update(pfn, count, true)
    }

    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.update(pfn, count, false)
    }

    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let r = self.range(pfn, count).and_then(|_| {
            let (res, ns) = self.timed(|s| s.zero(pfn, count));
            self.timing.zero_ns += ns;
            res
        });
        self.count_failure(r)?;
        self.stats.zero_calls += 1;
        self.stats.pages_zeroed += count;
        Ok(())
    }
}

/// The pure model: a stage-2 backend that does nothing (the [`Tracker`] does the bookkeeping).
pub use allocator::NullStage2 as PureModel;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tracker(nr: u64) -> Tracker<PureModel> {
        Tracker::new(
            PureModel,
            TrackerConfig {
                base_pfn: 512,
                nr_pages: nr,
                reserved_below: true,
                max_slots: DEFAULT_MAX_MEMSLOTS,
                timed: false,
                arch: Arch::X86,
                flush_batch: 0,
            },
        )
    }

    #[test]
    fn split_history_never_re_merges() {
        let mut t = tracker(1536);
        assert_eq!(
            (t.gib_regions(), t.gib_intact(), t.gib_ever_split()),
            (1, 1, 0)
        );
        t.unmap(512 + 10, 1).unwrap();
        t.map(512 + 10, 1).unwrap();
        // Block 0 is intact again now, but it was split once.
        assert_eq!((t.intact_blocks(), t.ever_split_blocks()), (3, 1));
        assert_eq!((t.gib_intact(), t.gib_ever_split()), (1, 1));
        // A whole block unmapped never splits it, but splits its 1 GiB region.
        t.unmap(512 + 1024, 512).unwrap();
        assert_eq!((t.ever_split_blocks(), t.gib_intact()), (1, 0));
        // x86: the two removals flushed, the addition did not.
        let f = t.flush_stats();
        assert_eq!((f.removals, f.additions, f.shootdowns), (2, 1, 2));
    }

    #[test]
    fn arm64_additions_flush_and_batches_wait_for_reuse() {
        let mut t = tracker(1536);
        t.cfg.arch = Arch::Arm64;
        t.unmap(512, 1).unwrap();
        t.map(512, 1).unwrap();
        assert_eq!(t.flush_stats().shootdowns, 2);
        let mut t = tracker(1536);
        t.pending = PendingFlush::new(3);
        t.unmap(512, 1).unwrap();
        t.unmap(513, 1).unwrap();
        assert_eq!(t.flush_stats().shootdowns, 0, "two pages wait");
        t.flush_before_reuse(600, 1);
        assert_eq!(t.flush_stats().shootdowns, 0, "another page: no flush");
        t.flush_before_reuse(513, 1);
        let f = t.flush_stats();
        assert_eq!((f.shootdowns, f.forced_by_reuse), (1, 1));
        t.unmap(514, 3).unwrap();
        t.flush_pending();
        assert_eq!(t.flush_stats().shootdowns, 2, "a full batch, nothing left");
    }

    #[test]
    fn runs_and_blocks_by_hand() {
        // 3 blocks (1536 pages) above 512 reserved pages: one slot, all intact.
        let mut t = tracker(1536);
        assert_eq!((t.memslots(), t.intact_blocks(), t.blocks()), (1, 3, 3));
        // A hole of one page in block 0 splits the slot in two and breaks block 0.
        t.unmap(512 + 10, 1).unwrap();
        assert_eq!((t.memslots(), t.intact_blocks()), (2, 2));
        // Unmapping all of block 2: still two slots (the hole is at the end), block 2 intact.
        t.unmap(512 + 1024, 512).unwrap();
        assert_eq!((t.memslots(), t.intact_blocks()), (2, 2));
        // Another hole in block 1: three slots, block 1 broken.
        t.unmap(512 + 600, 2).unwrap();
        assert_eq!((t.memslots(), t.intact_blocks()), (3, 1));
        assert_eq!(t.worst_intact_blocks().0, 1);
        // Mapping the first hole back: two slots, block 0 intact again; worst stays 1.
        t.map(512 + 10, 1).unwrap();
        assert_eq!((t.memslots(), t.intact_blocks()), (2, 2));
        assert_eq!(t.worst_intact_blocks().0, 1);
        assert_eq!(t.peak_memslots(), 3);
        // The very first managed page unmapped: the reserved run ends before it.
        t.unmap(512, 1).unwrap();
        assert_eq!(t.memslots(), 3);
        assert_eq!(t.recount(), (t.memslots(), t.intact_blocks()));
        // Out of range calls fail cleanly.
        assert!(t.unmap(0, 1).is_err());
        assert!(t.map(512 + 1536, 1).is_err());
        assert!(t.zero(u64::MAX, 2).is_err());
        assert_eq!(t.stats().failed_calls, 3);
        assert_eq!(t.stats().unmap_calls, 4);
        assert_eq!(t.unmapped_pages(), 1 + 512 + 2 - 1 + 1);
    }

    proptest! {
        #[test]
        fn incremental_counts_match_a_recount(ops in proptest::collection::vec((any::<bool>(), 0u64..1300, 1u64..300), 1..60)) {
            let mut t = tracker(1300);
            for (unmap, start, len) in ops {
                let pfn = 512 + start;
                let len = len.min(1300 - start);
                if unmap { t.unmap(pfn, len).unwrap() } else { t.map(pfn, len).unwrap() }
                prop_assert_eq!(t.recount(), (t.memslots(), t.intact_blocks()));
            }
        }
    }
}
