//! One test (or more) per rule of the allocator, on a simulated stage 2, each run on
//! `BuddyAllocator` (`buddy::`), on a `Zone` with one CPU (`zone1::`) and on a `Zone` with
//! four CPUs and the operations spread over them (`zone4::`). Where per-CPU caches change
//! an incidental detail (which pfn comes back, how many pages sit in caches), the test says
//! so and asserts the rule itself.

mod common;

use allocator::sim::CallKind;
use allocator::*;
use common::*;

const PB: u64 = PAGEBLOCK_PAGES;

crate::on_every_allocator! {
    zero_size_range_has_nothing_free,
    arbitrary_ranges_hand_out_every_page_once,
    blocks_are_naturally_aligned_in_absolute_pfns,
    invalid_requests_fail_typed_and_change_nothing,
    free_rejects_bad_input_and_leaves_state_unchanged,
    allocation_containing_is_exact,
    every_allocation_has_its_freetype_and_block_mappedness,
    context_and_gfp_shapes_agree,
    first_unmovable_request_claims_a_movable_block,
    steal_leaves_the_block_and_freed_page_returns_to_its_block,
    claim_of_a_mostly_free_pageblock_moves_its_free_pages,
    buddies_of_different_mappedness_never_merge,
    mapped_pageblocks_of_different_migratetypes_merge_at_pageblock_order,
    flip_to_unmapped_is_one_call_per_pageblock,
    order10_flip_is_one_call_for_two_adjacent_pageblocks,
    flip_back_zeroes_before_mapping,
    atomic_requests_never_flip,
    no_whole_free_pageblock_fails_with_the_free_count,
    out_of_memory_when_nothing_is_free,
    failed_unmap_rolls_back,
    failed_zero_or_map_on_flip_back_rolls_back_and_never_maps_unzeroed,
    free_never_maps_or_flushes_and_init_on_free_zeroes_unmapped,
    failed_init_on_free_keeps_the_allocation,
    gfp_zero_zeroes_every_freetype_through_stage2,
    failed_zero_on_alloc_returns_the_pages,
    counters_count_allocs_and_frees_per_order_and_freetype,
    caches_hold_at_most_their_capacity_and_drain_on_demand,
}

fn zero_size_range_has_nothing_free<A: Subject>() {
    let mut a = A::sim(1024, 0, Config::default());
    a.check_invariants().unwrap();
    assert_eq!(a.free_pages_count(), 0);
    assert!(matches!(
        a.alloc_pages(Gfp::empty(), 0),
        Err(AllocError::OutOfMemory { .. })
    ));
    assert!(matches!(
        a.alloc_pages(Gfp::UNMAPPED, 0),
        Err(AllocError::OutOfMemory { .. })
    ));
    assert_eq!(a.free_pages(1024, 0), Err(FreeError::OutOfRange));
    assert_eq!(a.allocation_containing(1024), None);
    assert_eq!(a.pageblock_freetype(1024), None);
}

#[test]
fn try_new_rejects_ranges_links_cannot_index() {
    assert_eq!(
        BuddyAllocator::try_new(0, 1 << 33, NullStage2, Config::default()).err(),
        Some(InitError::TooManyPages(1 << 33))
    );
    assert_eq!(
        BuddyAllocator::try_new(u64::MAX - 3, 10, NullStage2, Config::default()).err(),
        Some(InitError::Overflow)
    );
}

/// Arbitrary ranges (unaligned base, partial blocks at both ends): every page can be
/// allocated exactly once, at order 0, and everything merges back.
fn arbitrary_ranges_hand_out_every_page_once<A: Subject>() {
    for (base, n) in [
        (512 * 3, 1000),
        (512 * 2 + 7, 2000),
        (5, 3),
        (1024, 1),
        (2048, 1024 + 513),
    ] {
        let mut a = A::sim(base, n, no_pcp());
        let before = a.snapshot().free_per_order;
        let mut got = std::vec![false; n as usize];
        for _ in 0..n {
            let x = a.alloc_pages(Gfp::empty(), 0).unwrap();
            let i = (x.pfn - base) as usize;
            assert!(!got[i], "page handed out twice");
            got[i] = true;
        }
        assert!(a.alloc_pages(Gfp::empty(), 0).is_err());
        a.check_invariants().unwrap();
        for pfn in base..base + n {
            a.free_pages(pfn, 0).unwrap();
        }
        a.check_invariants().unwrap();
        assert_eq!(a.free_pages_count(), n);
        let after = a.snapshot().free_per_order;
        let sum = |f: [[u64; Freetype::COUNT]; 11]| -> Vec<u64> {
            f.iter().map(|r| r.iter().sum()).collect()
        };
        assert_eq!(sum(before), sum(after), "range {base:#x}+{n}");
    }
}

fn blocks_are_naturally_aligned_in_absolute_pfns<A: Subject>() {
    // Base is 2 MiB- but not 4 MiB-aligned: order-10 blocks must still be 4 MiB-aligned.
    let base = 512 * 5;
    let mut a = A::sim(base, 8 * PB, no_pcp());
    for order in 0..=MAX_ORDER {
        let x = a.alloc_pages(Gfp::empty(), order).unwrap();
        assert_eq!(x.pfn % (1 << order), 0, "order {order}");
        assert!(x.pfn >= base && x.pfn + (1 << order) <= base + 8 * PB);
        a.free_pages(x.pfn, order).unwrap();
    }
    a.check_invariants().unwrap();
}

fn invalid_requests_fail_typed_and_change_nothing<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, Config::default());
    let s = snap_no_failures(&a);
    assert_eq!(
        a.alloc_pages(Gfp::empty(), 11),
        Err(AllocError::InvalidOrder(11))
    );
    assert_eq!(
        a.alloc_pages(Gfp::MOVABLE | Gfp::RECLAIMABLE, 0),
        Err(AllocError::InvalidFlags)
    );
    assert_eq!(
        a.alloc_pages(Gfp::UNMAPPED | Gfp::MOVABLE, 0),
        Err(AllocError::InvalidFlags)
    );
    assert_eq!(
        a.alloc_pages_special(BuddyContext::Unmapped, Gfp::RECLAIMABLE, 0),
        Err(AllocError::InvalidFlags)
    );
    assert_eq!(a.snapshot().alloc_failures, 4);
    assert_eq!(snap_no_failures(&a), s);
    assert!(a.stage2().calls().is_empty());
}

fn free_rejects_bad_input_and_leaves_state_unchanged<A: Subject>() {
    let base = 4 * PB;
    let mut a = A::sim(base, 4 * PB, Config::default());
    let x = a.alloc_pages(Gfp::empty(), 3).unwrap();
    let y = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let z = a.alloc_pages(Gfp::empty(), 0).unwrap();
    a.free_pages(z.pfn, 0).unwrap(); // z is now cached (free)
    let s = snap_no_failures(&a);
    let ncalls = a.stage2().calls().len();
    let never = (base..base + 4 * PB)
        .rev()
        .find(|&p| a.allocation_containing(p).is_none() && p != z.pfn)
        .unwrap();
    let cases = [
        (base - 1, 0, FreeError::OutOfRange),
        (base + 4 * PB, 0, FreeError::OutOfRange),
        (u64::MAX, 0, FreeError::OutOfRange),
        (x.pfn, 11, FreeError::InvalidOrder),
        (x.pfn, 255, FreeError::InvalidOrder),
        (x.pfn + 1, 3, FreeError::Misaligned),
        (x.pfn + 4, 3, FreeError::Misaligned),
        (x.pfn + 1, 0, FreeError::NotAllocated), // a tail page
        (x.pfn, 2, FreeError::WrongOrder { allocated: 3 }),
        (y.pfn + 1, 0, FreeError::NotAllocated),
        (z.pfn, 0, FreeError::NotAllocated), // double free of a cached page
        (never, 0, FreeError::NotAllocated), // never allocated
    ];
    for (pfn, order, want) in cases {
        assert_eq!(
            a.free_pages(pfn, order),
            Err(want),
            "free({pfn:#x}, {order})"
        );
        assert_eq!(snap_no_failures(&a), s);
        a.check_invariants().unwrap();
    }
    assert_eq!(a.snapshot().free_failures, cases.len() as u64);
    assert_eq!(a.stage2().calls().len(), ncalls);
    a.free_pages(x.pfn, 3).unwrap();
    assert_eq!(a.free_pages(x.pfn, 3), Err(FreeError::NotAllocated)); // double free
    a.free_pages(y.pfn, 0).unwrap();
    assert_eq!(a.free_pages(y.pfn, 0), Err(FreeError::NotAllocated));
    a.check_invariants().unwrap();
}

fn allocation_containing_is_exact<A: Subject>() {
    let base = 2 * PB;
    let mut a = A::sim(base, 8 * PB, Config::default());
    let mut live = Vec::new();
    for (gfp, order) in [
        (Gfp::empty(), 0),
        (Gfp::UNMAPPED, 2),
        (Gfp::MOVABLE, 10),
        (Gfp::RECLAIMABLE, 5),
        (Gfp::empty(), 9),
        (Gfp::UNMAPPED, 0),
    ] {
        live.push(a.alloc_pages(gfp, order).unwrap());
    }
    let cached = a.alloc_pages(Gfp::empty(), 0).unwrap();
    a.free_pages(cached.pfn, 0).unwrap();
    for pfn in base - 3..base + 8 * PB + 3 {
        let want = live
            .iter()
            .find(|x| pfn >= x.pfn && pfn < x.pfn + (1 << x.order))
            .copied();
        assert_eq!(a.allocation_containing(pfn), want, "pfn {pfn:#x}");
    }
    assert_eq!(a.allocation_containing(cached.pfn), None);
}

fn every_allocation_has_its_freetype_and_block_mappedness<A: Subject>() {
    let mut a = A::sim(0, 8 * PB, Config::default());
    for (gfp, ft) in [
        (Gfp::empty(), Freetype::UNMOVABLE),
        (Gfp::MOVABLE, Freetype::MOVABLE),
        (Gfp::RECLAIMABLE, Freetype::RECLAIMABLE),
        (Gfp::UNMAPPED, Freetype::UNMOVABLE_UNMAPPED),
    ] {
        for order in [0, 1, 4, 9] {
            let x = a.alloc_pages(gfp, order).unwrap();
            assert_eq!(x.freetype, ft);
            let pb = a.pageblock_freetype(x.pfn).unwrap();
            assert_eq!(pb.is_unmapped(), ft.is_unmapped());
            a.free_pages(x.pfn, order).unwrap();
        }
    }
    a.check_invariants().unwrap();
    assert_stage2_agrees(&mut a);
}

/// The context API and the GFP API give identical results on identical allocators.
fn context_and_gfp_shapes_agree<A: Subject>() {
    let mut a = A::sim(0, 8 * PB, Config::default());
    let mut b = A::sim(0, 8 * PB, Config::default());
    for i in 0..200u32 {
        let g = Gfp::from_bits(i % 32).unwrap().without(Gfp::UNMAPPED);
        let order = (i % 5) as u8;
        let ra = a.alloc_pages_special(BuddyContext::Unmapped, g, order);
        let rb = b.alloc_pages(g | Gfp::UNMAPPED, order);
        assert_eq!(ra, rb);
        let ra = a.alloc_pages_special(BuddyContext::Default, g, order);
        let rb = b.alloc_pages(g, order);
        assert_eq!(ra, rb);
    }
    assert_eq!(a.snapshot(), b.snapshot());
}

fn first_unmovable_request_claims_a_movable_block<A: Subject>() {
    // Pageblocks start movable, as in Linux; an unmovable request claims the largest block.
    let mut a = A::sim(0, 2 * PB, no_pcp());
    assert_eq!(a.pageblock_freetype(0), Some(INITIAL_FREETYPE));
    let x = a.alloc_pages(Gfp::empty(), 0).unwrap();
    let s = a.snapshot();
    assert_eq!(s.fallbacks_claim, 1);
    assert_eq!(s.fallbacks_steal, 0);
    assert_eq!(a.pageblock_freetype(x.pfn), Some(Freetype::UNMOVABLE));
    // The order-10 block was claimed whole: both pageblocks are unmovable now.
    assert_eq!(a.pageblock_freetype(PB), Some(Freetype::UNMOVABLE));
    a.check_invariants().unwrap();
}

/// A small movable request in a memory whose only free pages are in unmovable blocks steals
/// without claiming; the page returns to the block's (unmovable) lists when freed.
fn steal_leaves_the_block_and_freed_page_returns_to_its_block<A: Subject>() {
    let mut a = A::sim(0, 2 * PB, no_pcp());
    // Make both pageblocks unmovable and fill them except for a few pages per block.
    let mut live = Vec::new();
    while let Ok(x) = a.alloc_pages(Gfp::empty(), 0) {
        live.push(x);
    }
    assert_eq!(a.pageblock_freetype(0), Some(Freetype::UNMOVABLE));
    // Free 8 scattered pages of pageblock 0 (not buddies of each other).
    for x in live.iter().filter(|x| x.pfn < PB && x.pfn % 64 == 0) {
        a.free_pages(x.pfn, 0).unwrap();
    }
    let before = a.snapshot();
    let m = a.alloc_pages(Gfp::MOVABLE, 0).unwrap();
    let s = a.snapshot();
    assert_eq!(m.freetype, Freetype::MOVABLE);
    assert_eq!(s.fallbacks_steal, before.fallbacks_steal + 1);
    assert_eq!(s.fallbacks_claim, before.fallbacks_claim);
    assert_eq!(a.pageblock_freetype(m.pfn), Some(Freetype::UNMOVABLE));
    assert_eq!(s.mixed_pageblocks, 1);
    a.free_pages(m.pfn, 0).unwrap();
    let s2 = a.snapshot();
    assert_eq!(
        s2.free_per_order[0][Freetype::UNMOVABLE.index()],
        before.free_per_order[0][Freetype::UNMOVABLE.index()]
    );
    assert_eq!(s2.free_per_order[0][Freetype::MOVABLE.index()], 0);
    assert_eq!(s2.mixed_pageblocks, 0);
    a.check_invariants().unwrap();
}

/// A reclaimable request that finds a movable pageblock mostly free claims it.
fn claim_of_a_mostly_free_pageblock_moves_its_free_pages<A: Subject>() {
    let mut a = A::sim(0, 2 * PB, no_pcp());
    // Movable allocation splits the order-10 block: both pageblocks stay movable.
    let m = a.alloc_pages(Gfp::MOVABLE, 0).unwrap();
    // Make pageblock 1 unavailable to claim at order >= 9 by allocating from it.
    let m2 = a.alloc_pages(Gfp::MOVABLE, 8).unwrap();
    assert_eq!(a.pageblock_freetype(m.pfn), Some(Freetype::MOVABLE));
    let before = a.snapshot();
    let r = a.alloc_pages(Gfp::RECLAIMABLE, 0).unwrap();
    let s = a.snapshot();
    assert_eq!(s.fallbacks_claim, before.fallbacks_claim + 1);
    assert_eq!(a.pageblock_freetype(r.pfn), Some(Freetype::RECLAIMABLE));
    assert_eq!(
        s.free_per_order[0][Freetype::MOVABLE.index()]
            + s.free_per_order[1][Freetype::MOVABLE.index()],
        {
            // whatever free pages remain movable are in the other pageblock
            let other = if r.pfn < PB { PB } else { 0 };
            (0..=MAX_ORDER as usize)
                .filter(|&o| o <= 1)
                .map(|o| s.free_per_order[o][Freetype::MOVABLE.index()])
                .sum::<u64>()
                * (a.pageblock_freetype(other) == Some(Freetype::MOVABLE)) as u64
        }
    );
    a.check_invariants().unwrap();
    a.free_pages(m.pfn, 0).unwrap();
    a.free_pages(m2.pfn, 8).unwrap();
    a.free_pages(r.pfn, 0).unwrap();
    a.check_invariants().unwrap();
}

fn buddies_of_different_mappedness_never_merge<A: Subject>() {
    let mut a = A::sim(0, 2 * PB, no_pcp());
    let u = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let m = a.alloc_pages(Gfp::empty(), 0).unwrap();
    assert_ne!(u.pfn / PB, m.pfn / PB);
    a.free_pages(u.pfn, 0).unwrap();
    a.free_pages(m.pfn, 0).unwrap();
    a.check_invariants().unwrap();
    let s = a.snapshot();
    assert_eq!(s.free_per_order[10].iter().sum::<u64>(), 0);
    assert_eq!(s.free_per_order[9][Freetype::UNMOVABLE_UNMAPPED.index()], 1);
    assert_eq!(s.free_pageblocks_unmapped, 1);
    assert_eq!(s.free_pageblocks_mapped, 1);
    assert_stage2_agrees(&mut a);
}

fn mapped_pageblocks_of_different_migratetypes_merge_at_pageblock_order<A: Subject>() {
    let mut a = A::sim(0, 2 * PB, no_pcp());
    let x = a.alloc_pages(Gfp::MOVABLE, 9).unwrap();
    let y = a.alloc_pages(Gfp::RECLAIMABLE, 9).unwrap();
    assert_ne!(a.pageblock_freetype(x.pfn), a.pageblock_freetype(y.pfn));
    a.free_pages(x.pfn, 9).unwrap();
    a.free_pages(y.pfn, 9).unwrap();
    a.check_invariants().unwrap();
    assert_eq!(a.snapshot().free_per_order[10].iter().sum::<u64>(), 1);
}

fn flip_to_unmapped_is_one_call_per_pageblock<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, no_pcp());
    let x = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let c = a.stage2().calls().to_vec();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].kind, CallKind::Unmap);
    assert_eq!(c[0].count, PB);
    assert_eq!(c[0].pfn % PB, 0);
    assert!(x.pfn >= c[0].pfn && x.pfn < c[0].pfn + PB);
    let s = a.snapshot();
    assert_eq!(s.flips_to_unmapped, 1);
    assert_eq!(s.stage2_pages_unmapped, PB);
    assert_eq!(
        s.free_pages_per_freetype[Freetype::UNMOVABLE_UNMAPPED.index()],
        PB - 1
    );
    assert_stage2_agrees(&mut a);
}

fn order10_flip_is_one_call_for_two_adjacent_pageblocks<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, no_pcp());
    let x = a.alloc_pages(Gfp::UNMAPPED, 10).unwrap();
    let c = a.stage2().calls();
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].kind, c[0].pfn, c[0].count),
        (CallKind::Unmap, x.pfn, 1024)
    );
    assert_eq!(a.snapshot().flips_to_unmapped, 2);
    assert_eq!(a.snapshot().flip_calls_to_unmapped, 1);
    assert_stage2_agrees(&mut a);
}

fn flip_back_zeroes_before_mapping<A: Subject>() {
    let cfg = Config {
        init_on_free_unmapped: false,
        pcp_capacity: 0,
        ..Config::default()
    };
    let mut a = A::sim(0, 2 * PB, cfg);
    // Everything unmapped, with a secret in every page.
    let x = a.alloc_pages(Gfp::UNMAPPED, 10).unwrap();
    for p in x.pfn..x.pfn + 1024 {
        assert!(a.stage2_mut().host_write(p, 0x5ec2e7));
    }
    a.free_pages(x.pfn, 10).unwrap();
    assert_eq!(
        a.stage2().content(x.pfn),
        Some(0x5ec2e7),
        "free must not zero here"
    );
    a.stage2_mut().clear_calls();
    let m = a.alloc_pages(Gfp::empty(), 0).unwrap();
    let c = a.stage2().calls().to_vec();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].kind, CallKind::Zero);
    assert_eq!(c[1].kind, CallKind::Map);
    assert_eq!((c[0].pfn, c[0].count), (c[1].pfn, c[1].count));
    assert_eq!(c[0].count, PB);
    for p in c[0].pfn..c[0].pfn + PB {
        assert_eq!(a.stage2().guest_read(p), Some(0));
    }
    assert!(m.pfn >= c[0].pfn && m.pfn < c[0].pfn + PB);
    let s = a.snapshot();
    assert_eq!(s.flips_to_mapped, 1);
    assert_eq!(s.pages_zeroed_on_flip, PB);
    assert_stage2_agrees(&mut a);
}

fn atomic_requests_never_flip<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, Config::default());
    let s = snap_no_failures(&a);
    let e = a.alloc_pages(Gfp::UNMAPPED | Gfp::ATOMIC, 0);
    assert_eq!(
        e,
        Err(AllocError::WouldBlock {
            order: 0,
            freetype: Freetype::UNMOVABLE_UNMAPPED
        })
    );
    assert!(a.stage2().calls().is_empty());
    assert_eq!(snap_no_failures(&a), s);
    // Once a block is unmapped, atomic unmapped requests are served from it.
    let x = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let y = a.alloc_pages(Gfp::UNMAPPED | Gfp::ATOMIC, 0).unwrap();
    assert_eq!(x.pfn / PB, y.pfn / PB);
    assert_eq!(a.stage2().calls().len(), 1);
    a.check_invariants().unwrap();
}

fn no_whole_free_pageblock_fails_with_the_free_count<A: Subject>() {
    let n = 4 * PB;
    let mut a = A::sim(0, n, Config::default());
    let mut live = Vec::new();
    while let Ok(x) = a.alloc_pages(Gfp::empty(), 0) {
        live.push(x);
    }
    for x in live.iter().filter(|x| x.pfn % 2 == 0) {
        a.free_pages(x.pfn, 0).unwrap();
    }
    let s = snap_no_failures(&a);
    let e = a.alloc_pages(Gfp::UNMAPPED, 0);
    assert_eq!(
        e,
        Err(AllocError::NoFreePageblock {
            order: 0,
            freetype: Freetype::UNMOVABLE_UNMAPPED,
            free_pages: n / 2
        })
    );
    assert_eq!(s.free_pages, n / 2);
    assert_eq!(snap_no_failures(&a).free_per_order, {
        let mut t = s.free_per_order;
        // The caches were drained into the buddy lists; the pages are the same.
        let tot: u64 = t[0].iter().sum::<u64>() + s.pcp_pages.iter().sum::<u64>();
        t[0] = [0; Freetype::COUNT];
        t[0][Freetype::UNMOVABLE.index()] = tot;
        t
    });
    a.check_invariants().unwrap();
    assert!(a.stage2().calls().is_empty());
}

fn out_of_memory_when_nothing_is_free<A: Subject>() {
    let mut a = A::sim(0, PB, Config::default());
    let x = a.alloc_pages(Gfp::empty(), 9).unwrap();
    assert_eq!(
        a.alloc_pages(Gfp::UNMAPPED, 0),
        Err(AllocError::OutOfMemory {
            order: 0,
            freetype: Freetype::UNMOVABLE_UNMAPPED
        })
    );
    a.free_pages(x.pfn, 9).unwrap();
}

fn failed_unmap_rolls_back<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, no_pcp());
    let keep = a.alloc_pages(Gfp::empty(), 3).unwrap();
    let s = snap_no_failures(&a);
    let pbs: Vec<_> = (0..4).map(|i| a.pageblock_freetype(i * PB)).collect();
    a.stage2_mut()
        .fail_nth(CallKind::Unmap, 0, Stage2Error::OutOfSlots);
    assert_eq!(
        a.alloc_pages(Gfp::UNMAPPED, 0),
        Err(AllocError::Stage2(Stage2Error::OutOfSlots))
    );
    a.check_invariants().unwrap();
    assert_eq!(snap_no_failures(&a), s);
    assert_eq!(a.snapshot().stage2_failures, 1);
    let pbs2: Vec<_> = (0..4).map(|i| a.pageblock_freetype(i * PB)).collect();
    assert_eq!(pbs, pbs2);
    assert_stage2_agrees(&mut a);
    // And it works on the next try.
    a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    a.free_pages(keep.pfn, 3).unwrap();
    assert_stage2_agrees(&mut a);
}

fn failed_zero_or_map_on_flip_back_rolls_back_and_never_maps_unzeroed<A: Subject>() {
    for kind in [CallKind::Zero, CallKind::Map] {
        let cfg = Config {
            init_on_free_unmapped: false,
            pcp_capacity: 0,
            ..Config::default()
        };
        let mut a = A::sim(0, PB, cfg);
        let x = a.alloc_pages(Gfp::UNMAPPED, 9).unwrap();
        a.stage2_mut().host_write(x.pfn + 7, 42);
        a.free_pages(x.pfn, 9).unwrap();
        let s = snap_no_failures(&a);
        a.stage2_mut().fail_nth(kind, 0, Stage2Error::Backend(-5));
        assert_eq!(
            a.alloc_pages(Gfp::empty(), 0),
            Err(AllocError::Stage2(Stage2Error::Backend(-5)))
        );
        a.check_invariants().unwrap();
        let mut s2 = snap_no_failures(&a);
        // A zero that succeeded before a failed map is counted; nothing else changed.
        s2.stage2_zero_calls = s.stage2_zero_calls;
        s2.pages_zeroed = s.pages_zeroed;
        s2.pages_zeroed_on_flip = s.pages_zeroed_on_flip;
        assert_eq!(s2, s);
        assert_eq!(a.pageblock_freetype(0), Some(Freetype::UNMOVABLE_UNMAPPED));
        assert_eq!(a.stage2().is_mapped(x.pfn), Some(false));
        assert_stage2_agrees(&mut a);
        // Retry succeeds, and the secret is gone before the page becomes reachable.
        let m = a.alloc_pages(Gfp::empty(), 0).unwrap();
        assert_eq!(a.stage2().guest_read(x.pfn + 7), Some(0));
        a.free_pages(m.pfn, 0).unwrap();
        assert_stage2_agrees(&mut a);
    }
}

/// Free never maps; an unmapped page is zero before anyone else can be handed it.
/// `BuddyAllocator` zeroes on free; `Zone` zeroes a cache's freed unmapped blocks of order
/// <= 3 together before any of them leaves the cache ([`Subject::LAZY_ZEROING`]), so right
/// after the free the secret may still sit in the page nobody can reach.
fn free_never_maps_or_flushes_and_init_on_free_zeroes_unmapped<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, Config::default());
    let x = a.alloc_pages(Gfp::UNMAPPED, 2).unwrap();
    a.stage2_mut().host_write(x.pfn + 1, 99);
    let m = a.alloc_pages(Gfp::empty(), 2).unwrap();
    a.stage2_mut().guest_write(m.pfn, 98);
    a.stage2_mut().clear_calls();
    a.free_pages(x.pfn, 2).unwrap();
    a.free_pages(m.pfn, 2).unwrap();
    let c = a.stage2().calls().to_vec();
    if A::LAZY_ZEROING {
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(a.stage2().content(x.pfn + 1), Some(99));
        // Whatever the next unmapped allocation gets (x again on the CPU that cached it, a
        // block refilled from the lists on another), it is zero.
        let y = a.alloc_pages(Gfp::UNMAPPED, 2).unwrap();
        for p in y.pfn..y.pfn + 4 {
            assert_eq!(
                a.stage2().content(p),
                Some(0),
                "pfn {p:#x} handed out dirty"
            );
        }
        a.free_pages(y.pfn, 2).unwrap();
        a.drain_pcp();
    } else {
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            (c[0].kind, c[0].pfn, c[0].count),
            (CallKind::Zero, x.pfn, 4)
        );
    }
    let c = a.stage2().calls().to_vec();
    assert!(c.iter().all(|c| c.kind == CallKind::Zero), "{c:?}");
    assert_eq!(a.stage2().content(x.pfn + 1), Some(0));
    assert_eq!(
        a.stage2().is_mapped(x.pfn),
        Some(false),
        "free must not map"
    );
    assert_eq!(
        a.stage2().content(m.pfn),
        Some(98),
        "mapped pages are not zeroed on free"
    );
    // x (and, on a zone, y too: freed and drained above).
    let freed_unmapped = if A::LAZY_ZEROING { 8 } else { 4 };
    assert_eq!(a.snapshot().pages_zeroed_on_free, freed_unmapped);
    // With init_on_free off, freeing unmapped pages makes no stage-2 call at all.
    let cfg = Config {
        init_on_free_unmapped: false,
        ..Config::default()
    };
    let mut b = A::sim(0, 4 * PB, cfg);
    let y = b.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    b.stage2_mut().clear_calls();
    b.free_pages(y.pfn, 0).unwrap();
    assert!(b.stage2().calls().is_empty());
    assert_eq!(b.snapshot().pages_zeroed_on_free, 0);
}

/// A free whose zeroing fails keeps the allocation. On `Zone` that is the free of a block
/// above the cached orders; a cached unmapped block is zeroed later
/// ([`Subject::LAZY_ZEROING`]), and a failure then keeps it cached and dirty (never on the
/// buddy lists, never handed out) until a zeroing succeeds.
fn failed_init_on_free_keeps_the_allocation<A: Subject>() {
    for order in [1u8, 4] {
        let mut a = A::sim(0, 4 * PB, Config::default());
        let x = a.alloc_pages(Gfp::UNMAPPED, order).unwrap();
        a.stage2_mut().host_write(x.pfn, 77);
        let s = snap_no_failures(&a);
        a.stage2_mut()
            .fail_nth(CallKind::Zero, 0, Stage2Error::Backend(-1));
        if A::LAZY_ZEROING && order <= 3 {
            a.free_pages(x.pfn, order).unwrap();
            let cached = |a: &A| a.snapshot().pcp_pages[Freetype::UNMOVABLE_UNMAPPED.index()];
            let before = cached(&a);
            assert!(before >= 1 << order);
            a.drain_pcp(); // its zeroing fails
            assert_eq!(a.snapshot().stage2_failures, 1);
            assert_eq!(cached(&a), before, "a dirty block left its cache");
            assert_eq!(a.stage2().content(x.pfn), Some(77));
            a.check_invariants().unwrap();
            a.drain_pcp();
            assert_eq!(cached(&a), 0);
            assert_eq!(a.stage2().content(x.pfn), Some(0));
        } else {
            assert_eq!(
                a.free_pages(x.pfn, order),
                Err(FreeError::Stage2(Stage2Error::Backend(-1)))
            );
            assert_eq!(snap_no_failures(&a), s);
            assert_eq!(a.allocation_containing(x.pfn), Some(x));
            assert_eq!(a.stage2().content(x.pfn), Some(77));
            a.free_pages(x.pfn, order).unwrap();
            assert_eq!(a.stage2().content(x.pfn), Some(0));
        }
        a.check_invariants().unwrap();
    }
}

fn gfp_zero_zeroes_every_freetype_through_stage2<A: Subject>() {
    let mut a = A::sim(0, 8 * PB, Config::default());
    for gfp in [Gfp::empty(), Gfp::MOVABLE, Gfp::RECLAIMABLE, Gfp::UNMAPPED] {
        for order in [0u8, 3] {
            let x = a.alloc_pages(gfp, order).unwrap();
            for p in x.pfn..x.pfn + (1 << order) {
                a.stage2_mut().host_write(p, 0xdead);
            }
            a.free_pages(x.pfn, order).unwrap();
            // Mapped pages are not zeroed on free; the next ZERO request must zero them.
            let before = a.snapshot().pages_zeroed_on_alloc;
            let y = a.alloc_pages(gfp | Gfp::ZERO, order).unwrap();
            assert_eq!(a.snapshot().pages_zeroed_on_alloc, before + (1 << order));
            for p in y.pfn..y.pfn + (1 << order) {
                assert_eq!(a.stage2().content(p), Some(0), "{gfp:?} order {order}");
            }
            a.free_pages(y.pfn, order).unwrap();
        }
    }
    a.check_invariants().unwrap();
}

fn failed_zero_on_alloc_returns_the_pages<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, Config::default());
    let warm = a.alloc_pages(Gfp::empty(), 0).unwrap();
    let s = snap_no_failures(&a);
    a.stage2_mut()
        .fail_nth(CallKind::Zero, 0, Stage2Error::Backend(-12));
    assert_eq!(
        a.alloc_pages(Gfp::empty() | Gfp::ZERO, 2),
        Err(AllocError::Stage2(Stage2Error::Backend(-12)))
    );
    a.check_invariants().unwrap();
    // A zone's miss refills its CPU's cache from the lists before the zeroing fails; the
    // pages stay free, only their place (cache or lists) differs.
    let (s, after) = if A::REFILLS_IN_BATCHES {
        (mask_caches(s), mask_caches(snap_no_failures(&a)))
    } else {
        (s, snap_no_failures(&a))
    };
    assert_eq!(after, s);
    a.free_pages(warm.pfn, 0).unwrap();
}

fn counters_count_allocs_and_frees_per_order_and_freetype<A: Subject>() {
    let mut a = A::sim(0, 8 * PB, Config::default());
    let x = a.alloc_pages(Gfp::MOVABLE, 3).unwrap();
    let y = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let z = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let s = a.snapshot();
    assert_eq!(s.allocs[3][Freetype::MOVABLE.index()], 1);
    assert_eq!(s.allocs[0][Freetype::UNMOVABLE_UNMAPPED.index()], 2);
    assert_eq!(s.total_allocs(), 3);
    a.free_pages(y.pfn, 0).unwrap();
    a.free_pages(z.pfn, 0).unwrap();
    a.free_pages(x.pfn, 3).unwrap();
    let s = a.snapshot();
    assert_eq!(s.frees[0][Freetype::UNMOVABLE_UNMAPPED.index()], 2);
    assert_eq!(s.frees[3][Freetype::MOVABLE.index()], 1);
    assert_eq!(s.total_frees(), 3);
    assert_eq!(s.free_pages, 8 * PB);
    // The two freed pages are cached; a zone's first miss also refilled a batch.
    let cached = s.pcp_pages[Freetype::UNMOVABLE_UNMAPPED.index()];
    if A::REFILLS_IN_BATCHES {
        assert!(cached >= 2, "{cached}");
    } else {
        assert_eq!(cached, 2);
    }
    a.drain_pcp();
    a.check_invariants().unwrap();
    let s = a.snapshot();
    // A zone zeroes freed unmapped pages when they leave its caches.
    assert_eq!(s.pages_zeroed_on_free, 2);
    assert_eq!(s.pcp_pages, [0; Freetype::COUNT]);
    assert_eq!(s.free_pageblocks_unmapped + s.free_pageblocks_mapped, 8);
    assert_eq!(s.pageblocks, 8);
    assert_eq!(s.pageblocks_per_freetype.iter().sum::<u64>(), 8);
}

#[test]
fn metadata_is_at_most_16_bytes_per_page() {
    assert_eq!(METADATA_BYTES_PER_PAGE, 10);
    assert_eq!(METADATA_BYTES_PER_PAGEBLOCK, 1);
    for n in [65_536u64, 1 << 20] {
        let a = BuddyAllocator::new(0, n, NullStage2, Config::default());
        let bytes = a.metadata_bytes();
        assert!(bytes >= n * 10 + n / 512);
        assert!(bytes <= n * 16, "{bytes} bytes for {n} pages");
        assert_eq!(a.snapshot().metadata_bytes, bytes);
    }
}

fn caches_hold_at_most_their_capacity_and_drain_on_demand<A: Subject>() {
    let cfg = Config {
        pcp_capacity: 8,
        ..Config::default()
    };
    let mut a = A::sim(0, 2 * PB, cfg);
    let xs: Vec<_> = (0..100)
        .map(|_| a.alloc_pages(Gfp::empty(), 0).unwrap())
        .collect();
    for x in &xs {
        a.free_pages(x.pfn, 0).unwrap();
        // The capacity is per CPU (a zone with several holds up to 8 on each).
        assert!(a.max_cached_on_one_cpu() <= 8);
        a.check_invariants().unwrap();
    }
    // An order-10 request can only be met after the caches are drained.
    let big = a.alloc_pages(Gfp::empty(), 10).unwrap();
    assert_eq!(a.snapshot().pcp_pages, [0; Freetype::COUNT]);
    a.free_pages(big.pfn, 10).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn metadata_bytes_exact_figure_for_65536_pages() {
    let a = BuddyAllocator::new(0, 65_536, NullStage2, Config::default());
    // 10 bytes/page (2-byte head record + 8 bytes of links) + 1 byte/pageblock + 64 slots x
    // 35 caches (orders 0-3 and 9, 7 freetypes) x 4 bytes + 77 list heads x 4 bytes (no
    // lengths) + 7 non-empty masks x 2 bytes + 2 bytes of padding.
    assert_eq!(
        a.metadata_bytes(),
        65_536 * 10 + 128 + 35 * 64 * 4 + 77 * 4 + 14 + 2
    );
}

/// `BuddyAllocator` caches pageblocks (order 9) too, as Linux's pcp lists do since 5.13: a
/// freed pageblock comes back to the next order-9 request of its freetype without a merge,
/// counts as free, and is drained before a flip, so it never hides a whole free pageblock.
#[test]
fn a_freed_pageblock_is_cached_and_drained_before_a_flip() {
    let mut a = BuddyAllocator::new(0, 2 * PB, SimStage2::new(0, 2 * PB), Config::default());
    let x = a.alloc_pages(Gfp::MOVABLE, 9).unwrap();
    let y = a.alloc_pages(Gfp::MOVABLE, 9).unwrap();
    a.free_pages(x.pfn, 9).unwrap();
    let s = a.snapshot();
    assert_eq!(s.pcp_pages[Freetype::MOVABLE.index()], PB);
    assert_eq!(
        s.free_per_order[9].iter().sum::<u64>(),
        0,
        "cached, not listed"
    );
    assert_eq!(a.free_pages_count(), PB);
    assert_eq!(a.allocation_containing(x.pfn + 7), None);
    assert_eq!(a.free_pages(x.pfn, 9), Err(FreeError::NotAllocated));
    a.check_invariants().unwrap();
    assert_eq!(a.alloc_pages(Gfp::MOVABLE, 9).unwrap().pfn, x.pfn);
    a.free_pages(x.pfn, 9).unwrap();
    // The only free pageblock is cached: an unmapped request must drain it and flip it.
    let u = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    assert_eq!(u.pfn / PB, x.pfn / PB);
    assert_eq!(a.snapshot().pcp_pages, [0; Freetype::COUNT]);
    assert_eq!(a.snapshot().flips_to_unmapped, 1);
    a.check_invariants().unwrap();
    a.free_pages(u.pfn, 0).unwrap();
    a.free_pages(y.pfn, 9).unwrap();
    a.drain_pcp();
    a.check_invariants().unwrap();
    assert_eq!(a.snapshot().free_per_order[9].iter().sum::<u64>(), 2);
}

/// `BuddyAllocator` derives `Snapshot::frees` as allocs − live allocations (its free path
/// keeps no counter): refused frees (double, wrong order, never allocated) do not count,
/// blocks parked in the caches or merged on the lists both count, per (order, freetype),
/// and list lengths counted by walking agree with the free blocks.
#[test]
fn derived_frees_count_exactly_the_successful_frees() {
    let mut a = BuddyAllocator::new(0, 8 * 512, NullStage2, Config::default());
    let mut xs = Vec::new();
    for i in 0..200u32 {
        let order = [0u8, 0, 1, 3, 5][i as usize % 5];
        xs.push(a.alloc_pages(Gfp::MOVABLE, order).unwrap());
    }
    let u = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let mut freed = [[0u64; Freetype::COUNT]; 11];
    for (i, x) in xs.iter().enumerate() {
        if i % 3 == 0 {
            continue;
        }
        a.free_pages(x.pfn, x.order).unwrap();
        freed[x.order as usize][x.freetype.index()] += 1;
        assert_eq!(a.free_pages(x.pfn, x.order), Err(FreeError::NotAllocated));
    }
    assert!(matches!(
        a.free_pages(xs[0].pfn, xs[0].order + 1),
        Err(FreeError::WrongOrder { .. })
    ));
    a.free_pages(u.pfn, 0).unwrap();
    freed[0][Freetype::UNMOVABLE_UNMAPPED.index()] += 1;
    let s = a.snapshot();
    assert_eq!(s.frees, freed);
    assert_eq!(s.free_failures, 134);
    a.check_invariants().unwrap();
    // Everything back and merged: frees equal allocs, and the lists hold three order-10
    // blocks and two order-9 ones (the unmapped pageblock and its mapped buddy never merge).
    for (i, x) in xs.iter().enumerate() {
        if i % 3 == 0 {
            a.free_pages(x.pfn, x.order).unwrap();
        }
    }
    a.drain_pcp();
    let s = a.snapshot();
    assert_eq!(s.frees, s.allocs);
    let blocks: u64 = s.free_per_order.iter().flatten().sum();
    assert_eq!(s.free_per_order[10].iter().sum::<u64>(), 3);
    assert_eq!(s.free_per_order[9][Freetype::UNMOVABLE_UNMAPPED.index()], 1);
    assert_eq!(blocks, 5);
    a.check_invariants().unwrap();
}
