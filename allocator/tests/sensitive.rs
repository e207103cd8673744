//! The SENSITIVE freetypes (ASI): one test (or more) per rule, each run on `BuddyAllocator`,
//! a one-CPU `Zone` and a four-CPU `Zone` (`common::on_every_allocator!`), plus a backend
//! without views and the zone's sensitive cache bank.
//!
//! Rules: a sensitive request flips a nonsensitive block with one `make_sensitive` call and
//! no zeroing; a flip to nonsensitive (declassify) or out of unmapped zeroes first; a flip to
//! unmapped never zeroes; blocks of different visibility never merge; fallback stays within
//! one visibility; `ATOMIC` never flips; a failed stage-2 call rolls back; a backend without
//! two views refuses sensitive pages with `Stage2Error::Unsupported`.

mod common;

use allocator::sim::CallKind;
use allocator::*;
use common::*;

const PB: u64 = PAGEBLOCK_PAGES;
/// Content a user (sensitive) owner writes.
const USER_DATA: u64 = 0x05e7_5e75;

crate::on_every_allocator! {
    sensitive_request_flips_a_nonsensitive_block_without_zeroing,
    fallback_stays_within_sensitive_blocks,
    declassify_zeroes_the_block_before_mapping_it,
    unmapped_to_sensitive_zeroes_first,
    sensitive_to_unmapped_does_not_zero,
    blocks_of_different_sensitivity_never_merge,
    sensitive_pageblocks_merge_with_each_other,
    atomic_sensitive_requests_never_flip,
    failed_make_sensitive_rolls_back,
    both_api_shapes_give_the_same_sensitive_freetypes,
    three_kinds_side_by_side,
    gfp_zero_zeroes_sensitive_pages,
}

fn sensitive_request_flips_a_nonsensitive_block_without_zeroing<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, no_pcp());
    let x = a.alloc_pages(Gfp::USER, 0).unwrap();
    assert_eq!(x.freetype, Freetype::UNMOVABLE_SENSITIVE);
    let c = a.stage2().calls().to_vec();
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0].kind, CallKind::MakeSensitive);
    assert_eq!((c[0].pfn % PB, c[0].count), (0, PB));
    assert!(x.pfn >= c[0].pfn && x.pfn < c[0].pfn + PB);
    assert_eq!(
        a.pageblock_freetype(x.pfn),
        Some(Freetype::UNMOVABLE_SENSITIVE)
    );
    assert_eq!(a.stage2().visibility(x.pfn), Some(Visibility::Sensitive));
    a.stage2_mut().guest_write(x.pfn, USER_DATA);
    assert_eq!(a.stage2().guest_read_restricted(x.pfn), None);
    assert_eq!(a.stage2().guest_read(x.pfn), Some(USER_DATA));
    let s = a.snapshot();
    assert_eq!(s.flips_to_sensitive, 1);
    assert_eq!(s.flip_calls_to_sensitive, 1);
    assert_eq!(s.flip_matrix[0][1], 1);
    assert_eq!(s.stage2_sensitive_calls, 1);
    assert_eq!(s.stage2_pages_sensitive, PB);
    assert_eq!(s.pages_zeroed, 0);
    assert_eq!(
        s.pageblocks_per_freetype[Freetype::UNMOVABLE_SENSITIVE.index()],
        1
    );
    // The next sensitive request is served from the same block, no stage-2 call.
    let y = a.alloc_pages(Gfp::USER, 0).unwrap();
    assert_eq!(y.pfn / PB, x.pfn / PB);
    assert_eq!(a.stage2().calls().len(), 1);
    a.check_invariants().unwrap();
    assert_stage2_agrees(&mut a);
}

/// A movable sensitive request falls back to the unmovable sensitive block (Linux's
/// steal), never to a nonsensitive one, and needs no flip.
fn fallback_stays_within_sensitive_blocks<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, no_pcp());
    let x = a.alloc_pages(Gfp::USER, 0).unwrap();
    let k = a.alloc_pages(Gfp::KERNEL, 0).unwrap();
    let calls = a.stage2().calls().len();
    let m = a.alloc_pages(Gfp::HIGHUSER_MOVABLE, 0).unwrap();
    assert_eq!(m.freetype, Freetype::MOVABLE_SENSITIVE);
    assert_eq!(m.pfn / PB, x.pfn / PB, "stolen from the sensitive block");
    assert_ne!(m.pfn / PB, k.pfn / PB);
    assert_eq!(a.stage2().calls().len(), calls);
    assert_eq!(a.stage2().visibility(m.pfn), Some(Visibility::Sensitive));
    a.check_invariants().unwrap();
    assert_stage2_agrees(&mut a);
}

fn declassify_zeroes_the_block_before_mapping_it<A: Subject>() {
    let mut a = A::sim(0, PB, no_pcp());
    let x = a.alloc_pages(Gfp::USER, 9).unwrap();
    for p in x.pfn..x.pfn + PB {
        assert!(a.stage2_mut().guest_write(p, USER_DATA));
    }
    a.free_pages(x.pfn, 9).unwrap();
    assert_eq!(
        a.stage2().content(x.pfn),
        Some(USER_DATA),
        "free does not zero sensitive pages"
    );
    a.stage2_mut().clear_calls();
    let k = a.alloc_pages(Gfp::KERNEL, 0).unwrap();
    let c = a.stage2().calls().to_vec();
    assert_eq!(
        c.iter().map(|c| c.kind).collect::<Vec<_>>(),
        [CallKind::Zero, CallKind::Map]
    );
    assert!(c.iter().all(|c| (c.pfn, c.count) == (0, PB)));
    for p in 0..PB {
        assert_eq!(a.stage2().guest_read_restricted(p), Some(0), "pfn {p}");
    }
    assert_eq!(k.freetype, Freetype::UNMOVABLE);
    let s = a.snapshot();
    assert_eq!(s.flip_matrix[1][0], 1);
    assert_eq!(s.flips_to_mapped, 1);
    assert_eq!(s.pages_zeroed_on_flip, PB);
    assert_stage2_agrees(&mut a);
}

fn unmapped_to_sensitive_zeroes_first<A: Subject>() {
    let cfg = Config {
        init_on_free_unmapped: false,
        pcp_capacity: 0,
        ..Config::default()
    };
    let mut a = A::sim(0, PB, cfg);
    let x = a.alloc_pages(Gfp::UNMAPPED, 9).unwrap();
    a.stage2_mut().host_write(x.pfn + 3, 0x5ec2e7);
    a.free_pages(x.pfn, 9).unwrap();
    a.stage2_mut().clear_calls();
    let u = a.alloc_pages(Gfp::USER, 0).unwrap();
    let kinds: Vec<_> = a.stage2().calls().iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [CallKind::Zero, CallKind::MakeSensitive]);
    assert_eq!(a.stage2().guest_read(x.pfn + 3), Some(0));
    assert_eq!(a.stage2().visibility(u.pfn), Some(Visibility::Sensitive));
    let s = a.snapshot();
    assert_eq!(s.flip_matrix[2][1], 1);
    assert_eq!(s.pages_zeroed_on_flip, PB);
    assert_stage2_agrees(&mut a);
}

fn sensitive_to_unmapped_does_not_zero<A: Subject>() {
    let mut a = A::sim(0, PB, no_pcp());
    let x = a.alloc_pages(Gfp::USER, 9).unwrap();
    a.stage2_mut().guest_write(x.pfn + 5, USER_DATA);
    a.free_pages(x.pfn, 9).unwrap();
    a.stage2_mut().clear_calls();
    a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    let kinds: Vec<_> = a.stage2().calls().iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [CallKind::Unmap], "no view gains the block");
    assert_eq!(a.stage2().content(x.pfn + 5), Some(USER_DATA));
    assert_eq!(a.snapshot().flip_matrix[1][2], 1);
    assert_stage2_agrees(&mut a);
}

fn blocks_of_different_sensitivity_never_merge<A: Subject>() {
    // Two buddy pageblocks, one sensitive and one nonsensitive; then one sensitive and one
    // unmapped.
    for other in [Gfp::KERNEL, Gfp::UNMAPPED] {
        let mut a = A::sim(0, 2 * PB, no_pcp());
        let s = a.alloc_pages(Gfp::USER, 0).unwrap();
        let o = a.alloc_pages(other, 0).unwrap();
        assert_ne!(s.pfn / PB, o.pfn / PB);
        a.free_pages(s.pfn, 0).unwrap();
        a.free_pages(o.pfn, 0).unwrap();
        a.drain_pcp();
        a.check_invariants().unwrap();
        let snap = a.snapshot();
        assert_eq!(snap.free_per_order[10].iter().sum::<u64>(), 0, "{other:?}");
        assert_eq!(
            snap.free_per_order[9][Freetype::UNMOVABLE_SENSITIVE.index()],
            1
        );
        assert_eq!(snap.free_pageblocks_sensitive, 1);
        assert_eq!(
            snap.free_pageblocks_mapped + snap.free_pageblocks_unmapped,
            1
        );
        assert_stage2_agrees(&mut a);
    }
}

fn sensitive_pageblocks_merge_with_each_other<A: Subject>() {
    let mut a = A::sim(0, 2 * PB, no_pcp());
    let x = a.alloc_pages(Gfp::USER, 9).unwrap();
    let y = a.alloc_pages(Gfp::HIGHUSER_MOVABLE, 9).unwrap();
    a.free_pages(x.pfn, 9).unwrap();
    a.free_pages(y.pfn, 9).unwrap();
    a.drain_pcp();
    a.check_invariants().unwrap();
    let s = a.snapshot();
    let sensitive10: u64 = Freetype::ALL
        .iter()
        .filter(|f| f.is_sensitive())
        .map(|f| s.free_per_order[10][f.index()])
        .sum();
    assert_eq!(sensitive10, 1, "{:?}", s.free_per_order[10]);
    assert_eq!(s.free_pageblocks_sensitive, 2);
    // And an order-10 sensitive request is then served without a stage-2 call.
    a.stage2_mut().clear_calls();
    a.alloc_pages(Gfp::USER, 10).unwrap();
    assert!(a.stage2().calls().is_empty());
}

/// No-block contexts never flip: sensitive `ATOMIC` requests (both shapes) fail with
/// `WouldBlock` until a sensitive block exists, then are served from it.
fn atomic_sensitive_requests_never_flip<A: Subject>() {
    let mut a = A::sim(0, 4 * PB, Config::default());
    let before = snap_no_failures(&a);
    let want = Err(AllocError::WouldBlock {
        order: 0,
        freetype: Freetype::UNMOVABLE_SENSITIVE,
    });
    assert_eq!(a.alloc_pages(Gfp::USER | Gfp::ATOMIC, 0), want);
    assert_eq!(
        a.alloc_pages_special(BuddyContext::Sensitive, Gfp::ATOMIC, 0),
        want
    );
    assert!(a.stage2().calls().is_empty());
    assert_eq!(snap_no_failures(&a), before);
    let x = a.alloc_pages(Gfp::USER, 0).unwrap();
    let y = a.alloc_pages(Gfp::USER | Gfp::ATOMIC, 0).unwrap();
    assert_eq!(x.pfn / PB, y.pfn / PB);
    assert_eq!(a.stage2().calls().len(), 1);
    a.check_invariants().unwrap();
}

fn failed_make_sensitive_rolls_back<A: Subject>() {
    // From nonsensitive (make_sensitive fails) and from unmapped (zero succeeds, then
    // make_sensitive fails: the block stays unmapped, zeroed).
    for from_unmapped in [false, true] {
        let cfg = Config {
            init_on_free_unmapped: false,
            pcp_capacity: 0,
            ..Config::default()
        };
        let mut a = A::sim(0, PB, cfg);
        if from_unmapped {
            let x = a.alloc_pages(Gfp::UNMAPPED, 9).unwrap();
            a.stage2_mut().host_write(7, 42);
            a.free_pages(x.pfn, 9).unwrap();
        }
        let s = snap_no_failures(&a);
        let pb = a.pageblock_freetype(0);
        a.stage2_mut()
            .fail_nth(CallKind::MakeSensitive, 0, Stage2Error::Backend(-5));
        assert_eq!(
            a.alloc_pages(Gfp::USER, 0),
            Err(AllocError::Stage2(Stage2Error::Backend(-5)))
        );
        a.check_invariants().unwrap();
        let mut s2 = snap_no_failures(&a);
        s2.stage2_zero_calls = s.stage2_zero_calls;
        s2.pages_zeroed = s.pages_zeroed;
        s2.pages_zeroed_on_flip = s.pages_zeroed_on_flip;
        assert_eq!(s2, s, "from_unmapped {from_unmapped}");
        assert_eq!(a.pageblock_freetype(0), pb);
        assert_stage2_agrees(&mut a);
        // The retry succeeds and the old secret is gone.
        let u = a.alloc_pages(Gfp::USER, 0).unwrap();
        assert_eq!(u.freetype, Freetype::UNMOVABLE_SENSITIVE);
        assert_eq!(a.stage2().content(7), Some(0));
        assert_stage2_agrees(&mut a);
    }
}

fn both_api_shapes_give_the_same_sensitive_freetypes<A: Subject>() {
    let mut a = A::sim(0, 6 * PB, no_pcp());
    let x = a
        .alloc_pages_special(BuddyContext::Sensitive, Gfp::MOVABLE, 0)
        .unwrap();
    assert_eq!(x.freetype, Freetype::MOVABLE_SENSITIVE);
    let y = a.alloc_pages(Gfp::HIGHUSER_MOVABLE, 0).unwrap();
    assert_eq!(y.freetype, x.freetype);
    let z = a
        .alloc_pages_special(BuddyContext::Sensitive, Gfp::UNMAPPED, 0)
        .unwrap();
    assert_eq!(z.freetype, Freetype::UNMOVABLE_UNMAPPED);
    assert_eq!(
        a.alloc_pages_special(BuddyContext::Sensitive, Gfp::MOVABLE | Gfp::UNMAPPED, 0),
        Err(AllocError::InvalidFlags)
    );
    a.check_invariants().unwrap();
    assert_stage2_agrees(&mut a);
}

/// Nonsensitive, sensitive and unmapped pages at once: each in its own pageblocks, each
/// visible exactly where its kind says, and everything merges back when freed.
fn three_kinds_side_by_side<A: Subject>() {
    let n = 8 * PB;
    let mut a = A::sim(0, n, Config::default());
    let mut live = Vec::new();
    for round in 0..200u64 {
        for g in [Gfp::KERNEL, Gfp::USER, Gfp::UNMAPPED, Gfp::HIGHUSER_MOVABLE] {
            let x = a.alloc_pages(g, (round % 3) as u8).unwrap();
            let want = AllocRequest::from_gfp(BuddyContext::Default, g)
                .unwrap()
                .freetype;
            assert_eq!(x.freetype, want);
            for p in x.pfn..x.pfn + (1 << x.order) {
                assert_eq!(
                    a.stage2().visibility(p),
                    Some(want.visibility()),
                    "{want} pfn {p:#x}"
                );
                assert_eq!(
                    a.pageblock_freetype(p).unwrap().visibility(),
                    want.visibility()
                );
            }
            live.push(x);
        }
    }
    a.check_invariants().unwrap();
    assert_stage2_agrees(&mut a);
    for x in live {
        a.free_pages(x.pfn, x.order).unwrap();
    }
    a.drain_pcp();
    a.check_invariants().unwrap();
    let s = a.snapshot();
    assert_eq!(s.free_pages, n);
    assert_eq!(s.allocs, s.frees);
    assert!(s.free_pageblocks_sensitive >= 1 && s.free_pageblocks_unmapped >= 1);
    assert_eq!(
        s.free_pageblocks_mapped + s.free_pageblocks_sensitive + s.free_pageblocks_unmapped,
        8
    );
    assert_stage2_agrees(&mut a);
}

fn gfp_zero_zeroes_sensitive_pages<A: Subject>() {
    let mut a = A::sim(0, 2 * PB, no_pcp());
    let x = a.alloc_pages(Gfp::USER, 0).unwrap();
    a.stage2_mut().guest_write(x.pfn, USER_DATA);
    a.free_pages(x.pfn, 0).unwrap();
    let y = a.alloc_pages(Gfp::USER | Gfp::ZERO, 0).unwrap();
    assert_eq!(y.pfn, x.pfn, "the same page comes back");
    assert_eq!(a.stage2().guest_read(y.pfn), Some(0));
}

/// A backend with one view: the simulator minus its `make_sensitive`.
struct OneView(allocator::sim::SimStage2);

impl Stage2 for OneView {
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.0.unmap(pfn, count)
    }
    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.0.map(pfn, count)
    }
    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.0.zero(pfn, count)
    }
}

fn one_view(n: u64) -> OneView {
    OneView(allocator::sim::SimStage2::new(0, n))
}

/// A backend without two views refuses sensitive pages loudly (`Unsupported`), rolls back,
/// and keeps serving the other kinds.
#[test]
fn backend_without_views_refuses_sensitive_pages() {
    let n = 4 * PB;
    let mut a = BuddyAllocator::new(0, n, one_view(n), Config::default());
    let s = a.snapshot();
    assert_eq!(
        a.alloc_pages(Gfp::USER, 0),
        Err(AllocError::Stage2(Stage2Error::Unsupported))
    );
    assert_eq!(a.snapshot().stage2_failures, 1);
    assert_eq!(a.snapshot().free_per_order, s.free_per_order);
    a.check_invariants().unwrap();
    a.alloc_pages(Gfp::KERNEL, 0).unwrap();
    a.alloc_pages(Gfp::UNMAPPED, 0).unwrap();
    assert!(a.stage2().0.violations().is_empty());

    let z = Zone::new(0, n, one_view(n), Config::default(), 2).unwrap();
    assert_eq!(
        z.alloc_pages(1, Gfp::HIGHUSER_MOVABLE, 0),
        Err(AllocError::Stage2(Stage2Error::Unsupported))
    );
    z.check_invariants().unwrap();
    assert_eq!(z.free_pages_count(), n);
    z.alloc_pages(0, Gfp::UNMAPPED, 0).unwrap();
}

/// The zone's per-CPU caches are split by freetype: a freed sensitive page waits in the
/// CPU's sensitive bank and comes back only to a sensitive request.
#[test]
fn zone_caches_have_a_sensitive_bank() {
    let n = 4 * PB;
    let z = Zone::new(
        0,
        n,
        allocator::sim::SimStage2::new(0, n),
        Config::default(),
        2,
    )
    .unwrap();
    let x = z.alloc_pages(0, Gfp::USER, 0).unwrap();
    z.free_pages(0, x.pfn, 0).unwrap();
    let s = z.snapshot();
    assert!(s.pcp_pages[Freetype::UNMOVABLE_SENSITIVE.index()] >= 1);
    let k = z.alloc_pages(0, Gfp::KERNEL, 0).unwrap();
    assert_ne!(
        k.pfn / PB,
        x.pfn / PB,
        "a nonsensitive request never gets it"
    );
    let y = z.alloc_pages(0, Gfp::USER, 0).unwrap();
    assert_eq!(y.pfn, x.pfn, "LIFO: the sensitive bank gives it back");
    // CPU 1 has its own bank: refilled from the same sensitive block, no new flip.
    let w = z.alloc_pages(1, Gfp::USER, 0).unwrap();
    assert_eq!(w.pfn / PB, x.pfn / PB);
    assert_eq!(z.snapshot().flips_to_sensitive, 1);
    z.check_invariants().unwrap();
}

/// `sensitive_by_default` (ASI's inverted `PB_nonsensitive`: sensitive unless marked): every
/// pageblock starts movable|sensitive, made so with one call; sensitive requests need no
/// flip, nonsensitive ones flip with zeroing; a backend without views fails construction.
#[test]
fn sensitive_by_default_starts_every_pageblock_sensitive() {
    let n = 4 * PB;
    let cfg = Config {
        sensitive_by_default: true,
        ..no_pcp()
    };
    let mut a = sim(0, n, cfg);
    assert_eq!(a.stage2().count(CallKind::MakeSensitive), 1);
    assert!((0..n).all(|p| a.stage2().visibility(p) == Some(Visibility::Sensitive)));
    assert_eq!(a.pageblock_freetype(0), Some(SENSITIVE_INITIAL_FREETYPE));
    let s = a.snapshot();
    assert_eq!(s.free_pageblocks_sensitive, 4);
    assert_eq!(s.stage2_pages_sensitive, n);
    a.stage2_mut().clear_calls();
    let u = a.alloc_pages(Gfp::HIGHUSER_MOVABLE, 0).unwrap();
    assert!(a.stage2().calls().is_empty(), "already sensitive");
    a.stage2_mut().guest_write(u.pfn + 1, USER_DATA);
    let k = a.alloc_pages(Gfp::KERNEL, 0).unwrap();
    let kinds: Vec<_> = a.stage2().calls().iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [CallKind::Zero, CallKind::Map]);
    assert_eq!(a.stage2().guest_read_restricted(k.pfn), Some(0));
    assert_eq!(a.snapshot().flip_matrix[1][0], 1);
    a.check_invariants().unwrap();
    assert_stage2_agrees(&mut a);

    let z = Zone::new(0, n, allocator::sim::SimStage2::new(0, n), cfg, 2).unwrap();
    assert_eq!(z.with_stage2(|s| s.count(CallKind::MakeSensitive)), 1);
    assert_eq!(z.pageblock_freetype(PB), Some(SENSITIVE_INITIAL_FREETYPE));
    z.alloc_pages(1, Gfp::USER, 0).unwrap();
    assert_eq!(z.snapshot().flips_to_sensitive, 0);
    z.check_invariants().unwrap();

    assert_eq!(
        BuddyAllocator::try_new(0, n, one_view(n), cfg).err(),
        Some(InitError::Stage2(Stage2Error::Unsupported))
    );
    assert_eq!(
        Zone::new(0, n, one_view(n), cfg, 1).err(),
        Some(InitError::Stage2(Stage2Error::Unsupported))
    );
    // A zero-size range makes no call.
    let e = sim(0, 0, cfg);
    assert_eq!(e.stage2().count(CallKind::MakeSensitive), 0);
}
