//! `--compaction`: when a request finds no whole free pageblock of the other kind to flip,
//! empty the cheapest candidate block by migrating its movable allocations, as v3/v4 of the
//! series direct-compact to pageblock order for unmapped requests (here for both kinds).
//!
//! A candidate is a full 2 MiB block of the other kind (mapped for an unmapped request,
//! unmapped for a mapped one) whose live allocations are all movable (the trace's migratetype
//! 1, at most order 9); the cheapest has the fewest pages in use. Each allocation is moved by
//! allocating a new block of the same order and kind elsewhere (one that lands inside the
//! candidate is held and the allocation retried, so it never moves within it) and freeing the
//! old one; then the held pages are freed and the caches drained, the block merges into one
//! free pageblock, and the request is retried (the retry's flip is the request's own stage-2
//! update). Stage-2 updates made during the migration itself are counted apart.

use allocator::{Stage2, PAGEBLOCK_ORDER, PAGEBLOCK_PAGES};
use serde::Serialize;

use super::placement::Placement;
use super::{Engine, Failures, FailuresByKind, Live};

/// What compaction did in one replay.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct CompactionStats {
    /// Requests that found no whole free pageblock and tried compaction.
    pub attempts: u64,
    /// Attempts that found no candidate block.
    pub no_candidate: u64,
    /// Blocks emptied.
    pub blocks_emptied: u64,
    /// Attempts abandoned half-way (a migration found no room).
    pub migrations_failed: u64,
    /// Requests served after compaction.
    pub rescued: u64,
    /// Allocations moved.
    pub allocations_migrated: u64,
    /// Pages moved.
    pub pages_migrated: u64,
    /// Stage-2 updates (unmap + map calls) the migrations caused.
    pub stage2_updates: u64,
    /// Pages migrated per 1,000 allocations.
    pub pages_migrated_per_1k_allocs: f64,
}

/// Compaction's effect: its counters and the same policy's failures without it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CompactionReport {
    /// Counters of the run with compaction.
    pub stats: CompactionStats,
    /// Failures of the same replay without compaction.
    pub failures_without: Failures,
    /// Those failures by kind and order.
    pub failures_by_kind_without: FailuresByKind,
}

/// The cheapest candidate block for a request of `want_unmapped` kind, if any.
fn candidate<S: Stage2, E: Engine<S>>(
    eng: &mut E,
    pl: &Placement,
    want_unmapped: bool,
) -> Option<usize> {
    let t = eng.tracker_mut();
    (0..pl.blocks())
        .filter(|&b| {
            let size = t.block_pages(b);
            let unmapped_kind = t.block_unmapped_pages(b) == size;
            u64::from(size) == PAGEBLOCK_PAGES
                && unmapped_kind != want_unmapped
                && pl.used(b) > 0
                && pl.immovable(b) == 0
        })
        .min_by_key(|&b| pl.used(b))
}

/// Try to empty one block for a request of `want_unmapped` kind; true if a block was emptied.
pub(crate) fn compact<S: Stage2, E: Engine<S>>(
    eng: &mut E,
    pl: &mut Placement,
    live: &mut [Live],
    want_unmapped: bool,
    st: &mut CompactionStats,
) -> bool {
    st.attempts += 1;
    let Some(b) = candidate(eng, pl, want_unmapped) else {
        st.no_candidate += 1;
        return false;
    };
    let base = eng.tracker_mut().base_pfn();
    let in_block = |p: u64| p.checked_sub(base).map(|o| o / PAGEBLOCK_PAGES) == Some(b as u64);
    let updates_before = eng.tracker_mut().stats().updates();
    let mut held: Vec<(u64, u8, u8)> = Vec::new();
    let mut ok = true;
    'moves: for id in pl.heads_in(b) {
        let a = live[id as usize];
        debug_assert!(a.order <= PAGEBLOCK_ORDER);
        let new = loop {
            match eng.alloc(a.order, a.migratetype, a.flags, 0) {
                Ok(p) if in_block(p) => held.push((p, a.order, a.flags)),
                Ok(p) => break p,
                Err(_) => {
                    ok = false;
                    break 'moves;
                }
            }
        };
        if !eng.free(a.pfn, a.order, a.flags) {
            // The old copy could not be freed: keep the new one out of the way, give up.
            held.push((new, a.order, a.flags));
            ok = false;
            break;
        }
        pl.note(eng.tracker_mut(), id, a.pfn, a.order, true, false);
        pl.note(eng.tracker_mut(), id, new, a.order, true, true);
        live[id as usize].pfn = new;
        st.allocations_migrated += 1;
        st.pages_migrated += 1 << a.order;
    }
    for (p, o, f) in held {
        eng.free(p, o, f);
    }
    eng.drain();
    st.stage2_updates += eng.tracker_mut().stats().updates() - updates_before;
    if ok {
        st.blocks_emptied += 1;
    } else {
        st.migrations_failed += 1;
    }
    ok
}
