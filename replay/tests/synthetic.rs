//! A small synthetic trace replayed through every policy, with the expected numbers worked out
//! by hand in the comments.

use replay::classify::{classify, Rules};
use replay::policy::{self, Layout, PolicyKind, PolicyResult, RunOptions, RESERVED_PAGES};
use replay::trace::{load, LoadOptions, Trace};
use replay::tracker::PureModel;

const U: &str = "GFP_KERNEL_ACCOUNT|__GFP_ZERO|__GFP_COMP"; // unmapped by the default rule
const M: &str = "GFP_HIGHUSER_MOVABLE|__GFP_COMP"; // mapped, movable

fn a(ts: u32, pfn: u64, order: u8, gfp: &str) -> String {
    let mt = if gfp == M { 1 } else { 0 };
    format!("  task-1 [000] ..... 1.{ts:06}: mm_page_alloc: page=x pfn={pfn:#x} order={order} migratetype={mt} gfp_flags={gfp}\n")
}
fn f(ts: u32, pfn: u64, order: u8) -> String {
    format!("  task-1 [000] ..... 1.{ts:06}: mm_page_free: page=x pfn={pfn:#x} order={order}\n")
}
fn fb(ts: u32, pfn: u64) -> String {
    format!("  task-1 [000] ..... 1.{ts:06}: mm_page_free_batched: page=x pfn={pfn:#x} order=0\n")
}

/// The trace (U = unmapped, M = mapped):
///
/// ```text
///  1. alloc U o0 @0x10000     6. free_batched 0x10001 (duplicate of 5)
///  2. alloc U o0 @0x10001     7. free 0x10002 (M)
///  3. alloc M o0 @0x10002     8. free 0x99999 (allocated before the capture)
///  4. alloc U o1 @0x10200     9. alloc U o0 @0x10001 (re-used)
///  5. free 0x10001 (U)       10. free 0x10000 (U)
/// ```
///
/// 5 allocations, 4 unmapped (1+1+2+1 = 5 pages); 3 frees replayed, 2 of them unmapped.
/// Live at the end: 0x10200 (2 pages) and 0x10001 (1 page), both unmapped.
fn trace() -> Trace {
    let s = a(1, 0x10000, 0, U)
        + &a(2, 0x10001, 0, U)
        + &a(3, 0x10002, 0, M)
        + &a(4, 0x10200, 1, U)
        + &f(5, 0x10001, 0)
        + &fb(6, 0x10001)
        + &f(7, 0x10002, 0)
        + &f(8, 0x99999, 0)
        + &a(9, 0x10001, 0, U)
        + &f(10, 0x10000, 0);
    let mut t = load(s.as_bytes(), LoadOptions::default()).unwrap();
    let c = classify(&mut t, &Rules::default()).unwrap();
    assert_eq!(
        (t.stats.allocs, c.unmapped_allocs, c.unmapped_pages),
        (5, 4, 5)
    );
    assert_eq!(
        (
            t.stats.batched_duplicates,
            t.stats.unmatched_frees,
            t.events.len()
        ),
        (1, 1, 8)
    );
    // Peak live: after event 4, 1 + 1 + 1 + 2 = 5 pages.
    assert_eq!(t.stats.peak_live_pages, 5);
    t
}

/// Four 2 MiB blocks above the reserved 2 MiB.
const MANAGED: Layout = Layout {
    base_pfn: RESERVED_PAGES,
    nr_pages: 2048,
    trace_base_pfn: 0,
};

fn run(kind: PolicyKind, t: &Trace, l: Layout) -> PolicyResult {
    let (r, _) = policy::run(kind, t, l, PureModel, &RunOptions::default());
    assert_eq!(r.failures.total(), 0, "{kind}: {:?}", r.failures);
    assert_eq!(r.free_errors, 0, "{kind}");
    assert_eq!((r.allocs, r.unmapped_allocs, r.frees), (5, 4, 3));
    r
}

#[test]
fn linux_placement_by_hand() {
    let t = trace();
    // PFN span: 0x10000 (2 MiB aligned) .. 0x10202 -> rounded out to 0x10400: 1024 pages, 2
    // blocks. Trace pfn p lands on 512 + (p - 0x10000).
    let l = policy::layout_for(PolicyKind::LinuxPlacement, &t, None, 25);
    assert_eq!(
        l,
        Layout {
            base_pfn: 512,
            nr_pages: 1024,
            trace_base_pfn: 0x10000
        }
    );
    let r = run(PolicyKind::LinuxPlacement, &t, l);
    // unmap: events 1, 2, 4 (2 pages), 9 = 4 calls, 5 pages; free of U (5, 10): zero + map,
    // 2 calls of 1 page each.
    let s = r.stage2;
    assert_eq!(
        (s.unmap_calls, s.pages_unmapped, s.map_calls, s.pages_mapped),
        (4, 5, 2, 2)
    );
    assert_eq!((s.zero_calls, s.pages_zeroed), (2, 2));
    // 6 updates per 5 allocations = 1200 per 1,000; 7 pages -> 1400 per 1,000.
    assert_eq!(r.updates_per_1k_allocs, 1200.0);
    assert_eq!(r.pages_per_1k_allocs, 1400.0);
    // Blocks: [512,1024) holds model pfns 512, 513; [1024,1536) holds 1024-1025. Event 1 splits
    // block 0 (1 intact), event 4 splits block 1 (0 intact, the worst, first reached at event
    // index 4); at the end 513 and 1024-1025 are unmapped: both blocks split.
    assert_eq!(
        (
            r.blocks,
            r.intact_blocks_end,
            r.intact_blocks_worst,
            r.worst_at_event
        ),
        (2, 0, 0, 4)
    );
    // Memslots (reserved [0,512) merges with mapped neighbours):
    //  after 1: [0,512) hole@512 [513,1536)            -> 2
    //  after 4: [0,512) hole [514,1024) hole [1026,..)  -> 3 (peak)
    //  after 10: [0,513) hole@513 [514,1024) hole [1026,..) -> 3
    assert_eq!((r.memslots_end, r.peak_memslots), (3, 3));
    assert_eq!(r.unmapped_pages_end, 3);
    assert_eq!((r.flips_to_unmapped, r.flips_to_mapped), (0, 0));
}

#[test]
fn per_page_by_hand() {
    let t = trace();
    let r = run(PolicyKind::PerPage, &t, MANAGED);
    // Same stage-2 calls as linux-placement (one unmap per unmapped allocation, zero + map per
    // unmapped free), wherever the allocator puts the pages.
    let s = r.stage2;
    assert_eq!(
        (s.unmap_calls, s.pages_unmapped, s.map_calls, s.pages_mapped),
        (4, 5, 2, 2)
    );
    assert_eq!((s.zero_calls, s.pages_zeroed), (2, 2));
    assert_eq!(r.updates_per_1k_allocs, 1200.0);
    // 3 pages stay unmapped; they split at least one and at most three of the four blocks, and
    // each of their maximal runs adds at most one memslot.
    assert_eq!(r.unmapped_pages_end, 3);
    assert!(
        (1..=3).contains(&r.intact_blocks_end),
        "{}",
        r.intact_blocks_end
    );
    assert!(r.intact_blocks_worst <= 3);
    assert!((2..=4).contains(&r.peak_memslots), "{}", r.peak_memslots);
}

#[test]
fn freetype_by_hand() {
    let t = trace();
    let r = run(PolicyKind::Freetype, &t, MANAGED);
    // Event 1 finds no unmapped page: one flip of a whole free pageblock (1 unmap call, 512
    // pages). Events 2, 4, 9 are served from that block: no call. The two unmapped frees are
    // zeroed (init_on_free, 1 page each) and stay unmapped: no map call.
    let s = r.stage2;
    assert_eq!(
        (s.unmap_calls, s.pages_unmapped, s.map_calls, s.pages_mapped),
        (1, 512, 0, 0)
    );
    assert_eq!((s.zero_calls, s.pages_zeroed), (2, 2));
    assert_eq!((r.flips_to_unmapped, r.flips_to_mapped), (1, 0));
    // 1 update per 5 allocations = 200 per 1,000; 512 pages -> 102,400 per 1,000.
    assert_eq!(r.updates_per_1k_allocs, 200.0);
    assert_eq!(r.pages_per_1k_allocs, 102_400.0);
    // A whole block is unmapped: every block stays intact, always.
    assert_eq!(
        (r.blocks, r.intact_blocks_end, r.intact_blocks_worst),
        (4, 4, 4)
    );
    assert_eq!(r.unmapped_pages_end, 512);
    // One hole: 1 memslot if it is the last block, else 2.
    assert!((1..=2).contains(&r.peak_memslots));
}

#[test]
fn unmapped_cache_by_hand() {
    let t = trace();
    let r = run(PolicyKind::UnmappedCache, &t, MANAGED);
    // Event 1: the cache is empty, one order-9 chunk is taken and unmapped (1 call, 512 pages);
    // everything else comes from and returns to the cache (frees zeroed: 2 calls of 1 page).
    let s = r.stage2;
    assert_eq!(
        (s.unmap_calls, s.pages_unmapped, s.map_calls, s.pages_mapped),
        (1, 512, 0, 0)
    );
    assert_eq!((s.zero_calls, s.pages_zeroed), (2, 2));
    assert_eq!((r.flips_to_unmapped, r.flips_to_mapped), (1, 0));
    assert_eq!((r.intact_blocks_end, r.intact_blocks_worst), (4, 4));
    assert_eq!(r.unmapped_pages_end, 512);
}

#[test]
fn freetype_flips_back_when_mapped_memory_runs_out() {
    // Two blocks. 1: alloc U o0 flips block A (unmap 512). 2: its free zeroes 1 page. 3: alloc
    // M o9 takes block B. 4: alloc M o9 needs A back: zero 512 pages, map 512 (flip to mapped).
    let s = a(1, 0x10, 0, U) + &f(2, 0x10, 0) + &a(3, 0x200, 9, M) + &a(4, 0x400, 9, M);
    let mut t = load(s.as_bytes(), LoadOptions::default()).unwrap();
    classify(&mut t, &Rules::default()).unwrap();
    let l = Layout {
        base_pfn: RESERVED_PAGES,
        nr_pages: 1024,
        trace_base_pfn: 0,
    };
    let (r, _) = policy::run(
        PolicyKind::Freetype,
        &t,
        l,
        PureModel,
        &RunOptions::default(),
    );
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    let st = r.stage2;
    assert_eq!(
        (
            st.unmap_calls,
            st.pages_unmapped,
            st.map_calls,
            st.pages_mapped
        ),
        (1, 512, 1, 512)
    );
    assert_eq!((st.zero_calls, st.pages_zeroed), (2, 513));
    assert_eq!((r.flips_to_unmapped, r.flips_to_mapped), (1, 1));
    assert_eq!(
        (r.intact_blocks_worst, r.unmapped_pages_end, r.memslots_end),
        (2, 0, 1)
    );
    // The other policies cannot do this: the unmapped cache keeps its chunk, so the second
    // order-9 allocation fails.
    let (c, _) = policy::run(
        PolicyKind::UnmappedCache,
        &t,
        l,
        PureModel,
        &RunOptions::default(),
    );
    assert_eq!(c.failures.total(), 1);
}

#[test]
fn atomic_unmapped_requests_cannot_flip_when_honoured() {
    // One GFP_NOWAIT allocation (no __GFP_DIRECT_RECLAIM), classified unmapped. No unmapped
    // page exists, so it needs a flip: refused (WouldBlock) with --honour-atomic, one flip without.
    let s = a(1, 0x10, 0, "GFP_NOWAIT");
    let mut t = load(s.as_bytes(), LoadOptions::default()).unwrap();
    let rules = Rules {
        any_of: vec!["GFP_NOWAIT".into()],
        ..Rules::default()
    };
    let c = classify(&mut t, &rules).unwrap();
    assert_eq!((c.unmapped_allocs, c.atomic_allocs), (1, 1));
    let honour = RunOptions {
        honour_atomic: true,
        ..RunOptions::default()
    };
    let (r, _) = policy::run(PolicyKind::Freetype, &t, MANAGED, PureModel, &honour);
    assert_eq!((r.failures.would_block, r.stage2.unmap_calls), (1, 0));
    let (r, _) = policy::run(
        PolicyKind::Freetype,
        &t,
        MANAGED,
        PureModel,
        &RunOptions::default(),
    );
    assert_eq!((r.failures.total(), r.flips_to_unmapped), (0, 1));
}
