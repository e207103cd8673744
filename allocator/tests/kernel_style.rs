//! The kernel series' own test ideas (page_alloc_kunit.c), on a simulated stage 2, each run
//! on `BuddyAllocator`, a one-CPU `Zone` and a four-CPU `Zone` (see `rules.rs`).

mod common;

use allocator::sim::CallKind;
use allocator::*;
use common::*;

const PB: u64 = PAGEBLOCK_PAGES;

crate::on_every_allocator! {
    more_than_half_unmapped_then_mapped_back_with_zeroing,
    flush_amortisation,
    no_flip_from_atomic_context,
    order0_unmapped_fails_without_a_whole_free_pageblock,
}

/// Allocate more than half of memory as unmapped (forces flips), check every page's block
/// is unmapped, free all, allocate the same amount mapped (forces flips back) and check that
/// zeroing happened before any page became reachable.
fn more_than_half_unmapped_then_mapped_back_with_zeroing<A: Subject>() {
    for (cfg, order) in [
        (
            Config {
                init_on_free_unmapped: false,
                pcp_capacity: 64,
                ..Config::default()
            },
            0u8,
        ),
        (
            Config {
                init_on_free_unmapped: false,
                pcp_capacity: 0,
                ..Config::default()
            },
            2,
        ),
        (Config::default(), 0),
    ] {
        let n = 32 * PB; // 64 MiB
        let base = 64 * PB;
        let mut a = A::sim(base, n, cfg);
        let target = n * 5 / 8;
        let mut live = Vec::new();
        let mut pages = 0;
        while pages < target {
            let x = a.alloc_pages(Gfp::UNMAPPED, order).unwrap();
            // Plant a secret the guest must never see again.
            for p in x.pfn..x.pfn + (1 << order) {
                a.stage2_mut().host_write(p, 0x005e_c2e7_0000 + p);
            }
            live.push(x);
            pages += 1 << order;
        }
        for x in &live {
            for p in x.pfn..x.pfn + (1 << order) {
                assert!(a.pageblock_freetype(p).unwrap().is_unmapped());
                assert_eq!(a.stage2().is_mapped(p), Some(false));
                assert_eq!(a.stage2().guest_read(p), None);
            }
        }
        let s = a.snapshot();
        assert!(s.flips_to_unmapped * PB >= target);
        assert_eq!(
            s.flips_to_unmapped,
            target.div_ceil(PB),
            "minimal number of flips"
        );
        for x in live.drain(..) {
            a.free_pages(x.pfn, x.order).unwrap();
        }
        a.check_invariants().unwrap();
        assert_eq!(a.stage2().count(CallKind::Map), 0, "free never maps");
        a.stage2_mut().clear_calls();
        // Now the same amount mapped: the mapped side cannot hold it, so blocks flip back.
        let mut pages = 0;
        while pages < target {
            let x = a.alloc_pages(Gfp::empty(), order).unwrap();
            for p in x.pfn..x.pfn + (1 << order) {
                assert_eq!(
                    a.stage2().guest_read(p),
                    Some(0),
                    "secret visible at {p:#x}"
                );
            }
            live.push(x);
            pages += 1 << order;
        }
        let s = a.snapshot();
        assert!(s.flips_to_mapped > 0);
        // Every map call was immediately preceded by a zero of the same range.
        let c = a.stage2().calls();
        let maps: Vec<_> = c
            .iter()
            .enumerate()
            .filter(|(_, x)| x.kind == CallKind::Map)
            .collect();
        assert_eq!(maps.len() as u64, s.flips_to_mapped);
        for (i, m) in maps {
            let z = c[i - 1];
            assert_eq!((z.kind, z.pfn, z.count), (CallKind::Zero, m.pfn, m.count));
        }
        assert!(
            a.stage2().violations().is_empty(),
            "{:?}",
            a.stage2().violations()
        );
        for x in live.drain(..) {
            a.free_pages(x.pfn, x.order).unwrap();
        }
        a.check_invariants().unwrap();
        assert_stage2_agrees(&mut a);
    }
}

/// N order-0 unmapped allocations cause at most ceil(N/512) unmap calls; frees cause none.
fn flush_amortisation<A: Subject>() {
    for n_alloc in [1u64, 511, 512, 513, 5000] {
        let mut a = A::sim(0, 16 * PB, Config::default());
        let xs: Vec<_> = (0..n_alloc)
            .map(|_| a.alloc_pages(Gfp::UNMAPPED, 0).unwrap())
            .collect();
        let unmaps = a.stage2().count(CallKind::Unmap);
        assert!(
            unmaps <= n_alloc.div_ceil(512),
            "{unmaps} unmaps for {n_alloc}"
        );
        assert_eq!(a.snapshot().stage2_unmap_calls, unmaps);
        for x in xs {
            a.free_pages(x.pfn, 0).unwrap();
        }
        assert_eq!(
            a.stage2().count(CallKind::Unmap),
            unmaps,
            "frees must not unmap"
        );
        assert_eq!(a.stage2().count(CallKind::Map), 0, "frees must not map");
        // Reallocating the same amount needs no new flip.
        let _again: Vec<_> = (0..n_alloc)
            .map(|_| a.alloc_pages(Gfp::UNMAPPED, 0).unwrap())
            .collect();
        assert_eq!(a.stage2().count(CallKind::Unmap), unmaps);
        a.check_invariants().unwrap();
    }
}

/// A no-block (ATOMIC) context never flips, in either direction.
fn no_flip_from_atomic_context<A: Subject>() {
    let mut a = A::sim(0, 2 * PB, Config::default());
    assert!(matches!(
        a.alloc_pages(Gfp::UNMAPPED | Gfp::ATOMIC, 0),
        Err(AllocError::WouldBlock { .. })
    ));
    assert!(matches!(
        a.alloc_pages_special(BuddyContext::Unmapped, Gfp::ATOMIC | Gfp::ZERO, 3),
        Err(AllocError::WouldBlock { .. })
    ));
    // Make all memory unmapped, free it, and ask for mapped memory atomically.
    let x = a.alloc_pages(Gfp::UNMAPPED, 10).unwrap();
    a.free_pages(x.pfn, 10).unwrap();
    let calls = a.stage2().calls().len();
    assert!(matches!(
        a.alloc_pages(Gfp::ATOMIC, 0),
        Err(AllocError::WouldBlock { .. })
    ));
    assert!(matches!(
        a.alloc_pages(Gfp::ATOMIC | Gfp::MOVABLE, 9),
        Err(AllocError::WouldBlock { .. })
    ));
    assert_eq!(a.stage2().calls().len(), calls);
    assert_eq!(a.snapshot().flips_to_mapped, 0);
    a.check_invariants().unwrap();
}

/// The case Linux reviewers worried about: plenty of memory free, none of it a whole free
/// pageblock, and an order-0 unmapped request fails (with a typed error that says so).
fn order0_unmapped_fails_without_a_whole_free_pageblock<A: Subject>() {
    let n = 8 * PB;
    let mut a = A::sim(0, n, Config::default());
    // One order-0 allocation pinned in every pageblock, everything else free.
    let mut pins = Vec::new();
    let mut rest = Vec::new();
    while let Ok(x) = a.alloc_pages(Gfp::empty(), 0) {
        if x.pfn % PB == 100 {
            pins.push(x);
        } else {
            rest.push(x);
        }
    }
    assert_eq!(pins.len() as u64, n / PB);
    for x in rest {
        a.free_pages(x.pfn, 0).unwrap();
    }
    let free = a.free_pages_count();
    assert_eq!(free, n - n / PB);
    match a.alloc_pages(Gfp::UNMAPPED, 0) {
        Err(AllocError::NoFreePageblock {
            order: 0,
            free_pages,
            ..
        }) => assert_eq!(free_pages, free),
        r => panic!("expected NoFreePageblock, got {r:?}"),
    }
    assert_eq!(a.stage2().count(CallKind::Unmap), 0);
    // Freeing one pin makes a whole pageblock free and the request succeeds with one flip.
    a.free_pages(pins[3].pfn, 0).unwrap();
    let u = a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    assert_eq!(u.pfn / PB, pins[3].pfn / PB);
    assert_eq!(a.stage2().count(CallKind::Unmap), 1);
    a.check_invariants().unwrap();
}
