//! The allocator for several CPUs (`Zone`): threaded property tests with a shared
//! double-allocation detector, the cache-less zone against the single-CPU allocator step by
//! step, caches drained on flips, and typed errors for bad CPU ids.

mod common;

use allocator::sim::SimStage2;
use allocator::*;
use common::*;
use proptest::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

const PB: u64 = PAGEBLOCK_PAGES;
/// Content bit of a page written by the owner of an unmapped allocation (a secret).
const SECRET: u64 = 1 << 63;
/// Content bit of a page written by the owner of a sensitive allocation (user data): it may
/// reach the next sensitive or unmapped owner (no view gains it), never a nonsensitive one
/// (the flip to nonsensitive zeroes).
const USER_DATA: u64 = 1 << 62;

fn zone(base: Pfn, n: u64, cfg: Config, cpus: usize) -> Zone<SimStage2> {
    Zone::new(base, n, SimStage2::new(base, n), cfg, cpus).unwrap()
}

/// Every pageblock's visibility agrees with the simulated stage 2, page by page.
fn assert_zone_stage2_agrees(z: &Zone<SimStage2>) {
    let (base, n) = (z.base_pfn(), z.nr_pages());
    let types: Vec<Visibility> = (base..base + n)
        .map(|p| z.pageblock_freetype(p).unwrap().visibility())
        .collect();
    z.with_stage2(|s| {
        for (i, &u) in types.iter().enumerate() {
            assert_eq!(
                s.visibility(base + i as u64),
                Some(u),
                "pfn {:#x}",
                base + i as u64
            );
        }
        assert!(s.violations().is_empty(), "{:?}", s.violations());
    });
}

/// A small deterministic generator (each thread's sequence comes from a proptest seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One thread's random work on `z`: allocations of every order and flag combination on a
/// random CPU (bad ids included), frees of its own allocations (sometimes on another CPU),
/// wrong-order frees, drains, and phases that push the nonsensitive, unmapped and sensitive
/// shares up and down in turn so pageblocks flip between all three kinds. `owner` is the shared double-allocation detector.
fn worker(
    z: &Zone<SimStage2>,
    owner: &[AtomicU8],
    id: u8,
    seed: u64,
    ops: usize,
    check_each: bool,
) {
    let mut r = Rng(seed | 1);
    let nr_cpus = z.nr_cpus();
    let base = z.base_pfn();
    let mut live: Vec<Allocation> = Vec::new();
    for i in 0..ops {
        if check_each {
            z.check_invariants().unwrap();
        }
        let phase = (i / 500) % 3;
        let cpu = if r.below(50) == 0 {
            nr_cpus + r.below(3) as usize
        } else {
            r.below(nr_cpus as u64) as usize
        };
        match r.below(20) {
            0..=9 => {
                let order = match r.below(10) {
                    0..=6 => r.below(4) as u8,
                    7 | 8 => 4 + r.below(7) as u8,
                    _ => 11,
                };
                let mut gfp = Gfp::from_bits(r.below(64) as u32).unwrap();
                if r.below(2) == 0 {
                    gfp = match phase {
                        0 => Gfp::MOVABLE,
                        1 => Gfp::UNMAPPED,
                        _ if r.below(2) == 0 => Gfp::USER,
                        _ => Gfp::HIGHUSER_MOVABLE,
                    };
                }
                match z.alloc_pages(cpu, gfp, order) {
                    Ok(a) => {
                        assert!(cpu < nr_cpus && order <= MAX_ORDER);
                        assert_eq!(a.order, order);
                        assert_eq!(a.pfn % (1 << order), 0);
                        assert_eq!(
                            a.freetype,
                            AllocRequest::from_gfp(BuddyContext::Default, gfp)
                                .unwrap()
                                .freetype
                        );
                        for p in a.pfn..a.pfn + (1 << order) {
                            let prev = owner[(p - base) as usize].swap(id, Ordering::AcqRel);
                            assert_eq!(prev, 0, "page {p:#x} handed to {id} while {prev} owns it");
                        }
                        z.with_stage2(|s| {
                            for p in a.pfn..a.pfn + (1 << order) {
                                let c = s.content(p).unwrap();
                                assert_eq!(c & SECRET, 0, "page {p:#x} handed out with a secret");
                                // (Sensitive -> unmapped does not zero: neither view gains.)
                                if a.freetype.visibility() == Visibility::Nonsensitive {
                                    assert_eq!(
                                        c & USER_DATA,
                                        0,
                                        "page {p:#x} handed to {} with user data",
                                        a.freetype
                                    );
                                }
                                if gfp.contains(Gfp::ZERO) {
                                    assert_eq!(c, 0);
                                }
                                assert_eq!(s.is_mapped(p), Some(!a.freetype.is_unmapped()));
                                assert_eq!(s.visibility(p), Some(a.freetype.visibility()));
                                let v = match a.freetype.visibility() {
                                    Visibility::Unmapped => SECRET | p,
                                    Visibility::Sensitive => USER_DATA | p,
                                    Visibility::Nonsensitive => p,
                                };
                                s.host_write(p, v);
                            }
                        });
                        live.push(a);
                    }
                    Err(AllocError::BadCpu(b)) => {
                        assert_eq!((b.cpu, b.nr_cpus), (cpu, nr_cpus));
                        assert!(cpu >= nr_cpus);
                    }
                    Err(AllocError::InvalidOrder(o)) => assert_eq!(o, 11),
                    Err(AllocError::InvalidFlags) => {
                        assert!(AllocRequest::from_gfp(BuddyContext::Default, gfp).is_err())
                    }
                    Err(AllocError::WouldBlock { .. }) => assert!(gfp.contains(Gfp::ATOMIC)),
                    Err(AllocError::NoFreePageblock { .. } | AllocError::OutOfMemory { .. }) => {}
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            10..=17 if !live.is_empty() => {
                let a = live.swap_remove(r.below(live.len() as u64) as usize);
                // Release ownership first: once freed, another thread may get the pages.
                for p in a.pfn..a.pfn + (1 << a.order) {
                    assert_eq!(owner[(p - base) as usize].swap(0, Ordering::AcqRel), id);
                }
                match z.free_pages(cpu, a.pfn, a.order) {
                    Ok(()) => assert!(cpu < nr_cpus),
                    Err(FreeError::BadCpu(_)) => {
                        assert!(cpu >= nr_cpus);
                        for p in a.pfn..a.pfn + (1 << a.order) {
                            owner[(p - base) as usize].store(id, Ordering::Release);
                        }
                        live.push(a);
                    }
                    Err(e) => panic!("free of a live allocation failed: {e:?}"),
                }
            }
            18 if !live.is_empty() => {
                let a = live[r.below(live.len() as u64) as usize];
                let wrong = if a.order == 0 { 1 } else { a.order - 1 };
                let e = z.free_pages(cpu % nr_cpus, a.pfn, wrong).unwrap_err();
                assert!(
                    matches!(e, FreeError::WrongOrder { allocated } if allocated == a.order)
                        || (wrong > a.order && e == FreeError::Misaligned),
                    "{e:?}"
                );
            }
            _ => {
                if r.below(2) == 0 {
                    z.drain_all();
                } else {
                    assert_eq!(z.drain_cpu(cpu).is_ok(), cpu < nr_cpus);
                }
            }
        }
    }
    for a in live {
        for p in a.pfn..a.pfn + (1 << a.order) {
            owner[(p - base) as usize].store(0, Ordering::Release);
        }
        z.free_pages(id as usize % nr_cpus, a.pfn, a.order).unwrap();
    }
}

/// Run `threads` workers on one zone, then check everything after joining.
fn threaded(base: Pfn, n: u64, cpus: usize, threads: usize, seeds: &[u64], ops: usize) {
    let check_each = threads == 1;
    let z = zone(base, n, Config::default(), cpus);
    let owner: Vec<AtomicU8> = (0..n).map(|_| AtomicU8::new(0)).collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (z, owner) = (&z, &owner[..]);
            let seed = seeds[t % seeds.len()].wrapping_add(t as u64 * 0x9e37_79b9);
            s.spawn(move || worker(z, owner, t as u8 + 1, seed, ops, check_each));
        }
    });
    z.check_invariants().unwrap();
    assert_zone_stage2_agrees(&z);
    let snap = z.snapshot();
    assert_eq!(snap.free_pages, n);
    assert_eq!(snap.total_allocs(), snap.total_frees());
    assert_eq!(z.quick_stats(), QuickStats::of(&snap));
    z.drain_all();
    z.check_invariants().unwrap();
    assert_eq!(z.snapshot().pcp_pages, [0; Freetype::COUNT]);
    assert_eq!(z.free_pages_count(), n);
    // No secret survives: every page that ever held one was zeroed on free. No user data
    // is left in a nonsensitive pageblock: flips from sensitive zeroed it.
    let vis: Vec<Visibility> = (base..base + n)
        .map(|p| z.pageblock_freetype(p).unwrap().visibility())
        .collect();
    z.with_stage2(|s| {
        for p in base..base + n {
            let c = s.content(p).unwrap();
            assert_eq!(c & SECRET, 0, "page {p:#x} keeps a secret");
            if vis[(p - base) as usize] == Visibility::Nonsensitive {
                assert_eq!(c & USER_DATA, 0, "nonsensitive page {p:#x} keeps user data");
            }
        }
    });
    // All three kinds were exercised: flips reached sensitive and left it again.
    let snap = z.snapshot();
    assert!(snap.flips_to_sensitive > 0, "{:?}", snap.flip_matrix);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// 2-4 threads on 1-4 CPUs (fewer CPUs than threads too: CPUs are shared), an unaligned
    /// base with partial pageblocks, 3,000 operations per thread.
    #[test]
    fn threads_against_the_detector(
        seeds in proptest::collection::vec(any::<u64>(), 4),
        cpus in 1usize..=4,
        threads in 2usize..=4,
        skew in 0u64..PB,
    ) {
        threaded(0x40000 + skew, 8 * PB + 37, cpus, threads, &seeds, 3000);
    }

    /// One thread on 1-3 CPUs, `check_invariants()` before every operation.
    #[test]
    fn one_thread_invariants_after_every_operation(
        seed in any::<u64>(),
        cpus in 1usize..=3,
        skew in 0u64..PB,
    ) {
        threaded(0x40000 + skew, 4 * PB + 5, cpus, 1, &[seed], 1500);
    }
}

/// The same sequential operations on a cache-less zone with several CPUs (a random CPU per
/// call) and on the single-CPU allocator give the same results, stage-2 calls and counters:
/// every rule of the single-CPU allocator holds for the zone's buddy paths.
fn differential(base: Pfn, n: u64, cpus: usize, seed: u64, ops: usize) {
    let cfg = no_pcp();
    let z = zone(base, n, cfg, cpus);
    let mut a = sim(base, n, cfg);
    let mut r = Rng(seed | 1);
    let mut live: Vec<Allocation> = Vec::new();
    for i in 0..ops {
        let cpu = r.below(cpus as u64) as usize;
        if r.below(9) < 5 || live.is_empty() {
            let order = if r.below(4) == 0 {
                r.below(12) as u8
            } else {
                r.below(4) as u8
            };
            let gfp = Gfp::from_bits(r.below(64) as u32).unwrap();
            let (x, y) = (z.alloc_pages(cpu, gfp, order), a.alloc_pages(gfp, order));
            assert_eq!(x, y, "op {i}");
            if let Ok(x) = x {
                live.push(x);
            }
        } else if r.below(8) == 0 {
            let pfn = base + r.below(n + 8);
            let order = r.below(12) as u8;
            assert_eq!(
                z.free_pages(cpu, pfn, order),
                a.free_pages(pfn, order),
                "op {i}"
            );
        } else {
            let x = live.swap_remove(r.below(live.len() as u64) as usize);
            assert_eq!(
                z.free_pages(cpu, x.pfn, x.order),
                a.free_pages(x.pfn, x.order)
            );
        }
    }
    let (mut sz, mut sa) = (z.snapshot(), a.snapshot());
    sz.metadata_bytes = 0;
    sa.metadata_bytes = 0;
    assert_eq!(sz, sa);
    // The O(CPUs) counters agree with the full snapshot's.
    assert_eq!(z.quick_stats(), QuickStats::of(&sz));
    assert_eq!(a.quick_stats(), QuickStats::of(&sa));
    let za = z.into_stage2();
    assert_eq!(za.calls(), a.stage2().calls());
    z_check(&za, &a);
}

fn z_check(zs: &SimStage2, a: &BuddyAllocator<SimStage2>) {
    for p in a.base_pfn()..a.base_pfn() + a.nr_pages() {
        assert_eq!(zs.content(p), a.stage2().content(p));
        assert_eq!(zs.visibility(p), a.stage2().visibility(p));
    }
}

#[test]
fn cacheless_zone_equals_the_single_cpu_allocator() {
    for (cpus, seed) in [(1, 1), (2, 7), (4, 99), (3, 12345)] {
        differential(0x80000 + 3, 6 * PB + 100, cpus, seed, 20_000);
    }
}

/// A flip drains every CPU's caches: after one pageblock flipped, pages of the only other one
/// sit in CPU 1's cache;
/// the second unmapped pageblock request can only be met by flipping that block, which needs
/// the drain; afterwards no page of either flipped block is in any cache.
#[test]
fn flip_drains_every_cpu_cache() {
    let base = 0x100000;
    let z = zone(base, 2 * PB, Config::default(), 3);
    let u1 = z.alloc_pages(0, Gfp::UNMAPPED, 9).unwrap();
    let small: Vec<_> = (0..8)
        .map(|_| z.alloc_pages(1, Gfp::MOVABLE, 0).unwrap())
        .collect();
    for a in &small {
        z.free_pages(1, a.pfn, 0).unwrap();
    }
    let hot_block = small[0].pfn & !(PB - 1);
    assert_ne!(u1.pfn, hot_block);
    assert!(z.cached_pages(1).unwrap() >= 8);
    assert!(z.any_cached_in(hot_block, PB));
    let drains = z.snapshot().pcp_drains;
    let u2 = z.alloc_pages(2, Gfp::UNMAPPED, 9).unwrap();
    assert_eq!(u2.pfn, hot_block);
    assert_eq!(z.cached_pages(1).unwrap(), 0);
    assert!(!z.any_cached_in(base, 2 * PB));
    let s = z.snapshot();
    assert!(s.pcp_drains > drains);
    assert_eq!(s.flips_to_unmapped, 2);
    assert_zone_stage2_agrees(&z);
    z.check_invariants().unwrap();
}

#[test]
fn bad_cpu_ids_are_typed_errors_and_change_nothing() {
    let z = zone(0, 4 * PB, Config::default(), 2);
    assert!(matches!(
        Zone::new(0, 8, SimStage2::new(0, 8), Config::default(), 0),
        Err(InitError::NoCpus)
    ));
    assert!(matches!(
        Zone::new(0, 8, NullStage2, Config::default(), allocator::zone::MAX_CPUS + 1),
        Err(InitError::TooManyCpus(n)) if n == allocator::zone::MAX_CPUS + 1
    ));
    let a = z.alloc_pages(1, Gfp::empty(), 0).unwrap();
    let before = z.snapshot();
    let bad = BadCpu { cpu: 2, nr_cpus: 2 };
    assert_eq!(
        z.alloc_pages(2, Gfp::empty(), 0),
        Err(AllocError::BadCpu(bad))
    );
    assert_eq!(
        z.alloc_pages(usize::MAX, Gfp::empty(), 0),
        Err(AllocError::BadCpu(BadCpu {
            cpu: usize::MAX,
            nr_cpus: 2
        }))
    );
    assert_eq!(z.free_pages(2, a.pfn, 0), Err(FreeError::BadCpu(bad)));
    assert_eq!(z.drain_cpu(2), Err(bad));
    assert_eq!(z.cached_pages(7), Err(BadCpu { cpu: 7, nr_cpus: 2 }));
    let mut after = z.snapshot();
    assert_eq!((after.alloc_failures, after.free_failures), (2, 1));
    after.alloc_failures = 0;
    after.free_failures = 0;
    assert_eq!(after, before);
    assert_eq!(z.allocation_containing(a.pfn), Some(a));
    // Freeing on another CPU than the allocating one is fine; a second free is refused.
    z.free_pages(0, a.pfn, 0).unwrap();
    assert_eq!(z.free_pages(1, a.pfn, 0), Err(FreeError::NotAllocated));
    assert_eq!(z.allocation_containing(a.pfn), None);
    z.check_invariants().unwrap();
}

/// Init-on-free through the zone: freed unmapped pages wait dirty in their CPU's cache and
/// are zeroed, all of them in one batch call, before the first is handed out again; a
/// failed zeroing fails that allocation and keeps the pages cached; a drain zeroes too;
/// `ZERO` zeroes on allocation.
#[test]
fn unmapped_frees_are_zeroed_in_one_batch_before_reuse() {
    use allocator::sim::CallKind;
    let base = 0x200000;
    let z = zone(base, 4 * PB, Config::default(), 2);
    let live: Vec<_> = (0..5)
        .map(|_| z.alloc_pages(0, Gfp::UNMAPPED, 0).unwrap())
        .collect();
    for (i, a) in live.iter().enumerate() {
        z.with_stage2(|s| s.host_write(a.pfn, SECRET | i as u64));
    }
    let zeros = z.with_stage2(|s| s.count(CallKind::Zero));
    for a in &live {
        z.free_pages(1, a.pfn, 0).unwrap();
        assert_eq!(z.allocation_containing(a.pfn), None);
    }
    assert_eq!(
        z.with_stage2(|s| s.count(CallKind::Zero)),
        zeros,
        "zeroing deferred"
    );
    z.with_stage2(|s| s.fail_nth(CallKind::Zero, 0, Stage2Error::Backend(-5)));
    assert_eq!(
        z.alloc_pages(1, Gfp::UNMAPPED, 0),
        Err(AllocError::Stage2(Stage2Error::Backend(-5)))
    );
    assert_eq!(
        z.cached_pages(1).unwrap(),
        5,
        "nothing handed out, nothing lost"
    );
    let b = z.alloc_pages(1, Gfp::UNMAPPED, 0).unwrap();
    assert_eq!(
        b.pfn, live[4].pfn,
        "CPU 1's cache hands the last freed page back"
    );
    z.with_stage2(|s| {
        assert_eq!(
            s.count(CallKind::Zero),
            zeros + 6,
            "one failed call, then 5 pages"
        );
        for a in &live {
            assert_eq!(s.content(a.pfn), Some(0));
        }
    });
    let s = z.snapshot();
    assert_eq!(s.pages_zeroed_on_free, 5);
    // A drain zeroes what is dirty before the buddy lists get it.
    z.with_stage2(|s| s.host_write(b.pfn, SECRET));
    z.free_pages(0, b.pfn, 0).unwrap();
    z.drain_all();
    assert_eq!(z.with_stage2(|s| s.content(b.pfn)), Some(0));
    let c = z.alloc_pages(0, Gfp::ZERO | Gfp::MOVABLE, 2).unwrap();
    z.with_stage2(|s| (c.pfn..c.pfn + 4).for_each(|p| assert_eq!(s.content(p), Some(0))));
    let s = z.snapshot();
    assert_eq!((s.pages_zeroed_on_free, s.pages_zeroed_on_alloc), (6, 4));
    z.check_invariants().unwrap();
}

/// A full cache takes the block being freed and the dirty ones into one zeroing call; if
/// it fails, the free fails and the allocation stays.
#[test]
fn full_unmapped_cache_zeroes_in_one_call_and_a_failure_keeps_the_allocation() {
    use allocator::sim::CallKind;
    let cfg = Config {
        pcp_capacity: 4,
        ..Config::default()
    };
    let z = zone(0, 4 * PB, cfg, 1);
    let live: Vec<_> = (0..6)
        .map(|_| z.alloc_pages(0, Gfp::UNMAPPED, 0).unwrap())
        .collect();
    z.drain_all();
    assert_eq!(z.cached_pages(0).unwrap(), 0);
    let zeros = z.with_stage2(|s| s.count(CallKind::Zero));
    for a in &live[..4] {
        z.free_pages(0, a.pfn, 0).unwrap();
    }
    z.with_stage2(|s| s.fail_nth(CallKind::Zero, 0, Stage2Error::Backend(-7)));
    assert_eq!(
        z.free_pages(0, live[4].pfn, 0),
        Err(FreeError::Stage2(Stage2Error::Backend(-7)))
    );
    assert_eq!(z.allocation_containing(live[4].pfn), Some(live[4]));
    z.free_pages(0, live[4].pfn, 0).unwrap();
    z.with_stage2(|s| {
        // The failed batch stopped at its first range; the retry zeroed all five pages.
        assert_eq!(s.count(CallKind::Zero), zeros + 1 + 5);
        for a in &live[..5] {
            assert_eq!(s.content(a.pfn), Some(0));
        }
    });
    assert_eq!(
        z.snapshot().stage2_zero_calls - zeros,
        1,
        "one batch call counted"
    );
    z.free_pages(0, live[5].pfn, 0).unwrap();
    z.drain_all();
    z.check_invariants().unwrap();
    assert_eq!(z.free_pages_count(), 4 * PB);
}

/// Two CPUs racing to free the same blocks: exactly one free of each block succeeds, the
/// other is `NotAllocated`, and nothing is cached or merged twice.
#[test]
fn racing_double_frees_succeed_exactly_once() {
    let n = 16 * PB;
    let z = zone(0, n, Config::default(), 2);
    for round in 0..20 {
        let order = (round % 4) as u8;
        let live: Vec<_> = (0..400)
            .map(|i| z.alloc_pages(i % 2, Gfp::MOVABLE, order).unwrap())
            .collect();
        let ok: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|cpu| {
                    let (z, live) = (&z, &live);
                    s.spawn(move || {
                        let mut won = 0;
                        for a in live {
                            match z.free_pages(cpu, a.pfn, a.order) {
                                Ok(()) => won += 1,
                                Err(FreeError::NotAllocated) => {}
                                Err(e) => panic!("{e:?}"),
                            }
                        }
                        won
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ok[0] + ok[1], live.len(), "round {round}: {ok:?}");
        z.check_invariants().unwrap();
        assert_eq!(z.free_pages_count(), n);
    }
    let s = z.snapshot();
    assert_eq!(s.total_frees(), 20 * 400);
    assert_eq!(s.free_failures, 20 * 400);
}

/// A stage 2 whose `zero` hands the range to another thread and waits until that thread is
/// done before failing: a window inside a `ZERO` allocation's zeroing.
struct ZeroHook {
    to_peer: std::sync::mpsc::Sender<Pfn>,
    from_peer: std::sync::mpsc::Receiver<()>,
}

impl Stage2 for ZeroHook {
    fn unmap(&mut self, _: Pfn, _: u64) -> Result<(), Stage2Error> {
        Ok(())
    }
    fn map(&mut self, _: Pfn, _: u64) -> Result<(), Stage2Error> {
        Ok(())
    }
    fn zero(&mut self, pfn: Pfn, _: u64) -> Result<(), Stage2Error> {
        self.to_peer.send(pfn).unwrap();
        self.from_peer.recv().unwrap();
        Err(Stage2Error::Backend(-5))
    }
}

/// A block being zeroed for a `ZERO` allocation is not an allocation yet: a free of its pfn
/// from another CPU during the zeroing (a guest guessing pfns) is `NotAllocated`, and when
/// the zeroing fails the block goes back exactly once — never into two places.
#[test]
fn a_block_being_zeroed_for_its_allocation_cannot_be_freed() {
    for (order, cached) in [(0u8, true), (0, false), (5, false)] {
        let (to_peer, peer_rx) = std::sync::mpsc::channel();
        let (peer_tx, from_peer) = std::sync::mpsc::channel();
        let cfg = Config {
            pcp_capacity: if cached { 8 } else { 0 },
            ..Config::default()
        };
        let z = Zone::new(0, 4 * PB, ZeroHook { to_peer, from_peer }, cfg, 2).unwrap();
        // Warm CPU 0's cache so the ZERO request takes its block from there.
        let warm = z.alloc_pages(0, Gfp::empty(), order).unwrap();
        z.free_pages(0, warm.pfn, order).unwrap();
        let free_before = z.free_pages_count();
        std::thread::scope(|s| {
            let z = &z;
            s.spawn(move || {
                let pfn = peer_rx.recv().unwrap();
                assert_eq!(
                    z.free_pages(1, pfn, order),
                    Err(FreeError::NotAllocated),
                    "order {order}: a block not handed out yet was freed"
                );
                peer_tx.send(()).unwrap();
            });
            assert_eq!(
                z.alloc_pages(0, Gfp::ZERO, order),
                Err(AllocError::Stage2(Stage2Error::Backend(-5)))
            );
        });
        z.check_invariants().unwrap();
        assert_eq!(z.free_pages_count(), free_before, "order {order}");
        // Every page can still be handed out exactly once.
        z.drain_all();
        let mut seen = std::collections::HashSet::new();
        while let Ok(x) = z.alloc_pages(0, Gfp::empty(), 0) {
            assert!(seen.insert(x.pfn), "pfn {:#x} handed out twice", x.pfn);
        }
        assert_eq!(seen.len() as u64, free_before);
    }
}

/// Two CPUs freeing the same blocks, none of them the CPU the blocks were allocated on (so
/// both take the slow path and meet at the allocating CPU's lock, the blocks' guard):
/// exactly one free of each block succeeds, and every page is handed out once afterwards.
#[test]
fn racing_frees_from_other_cpus_succeed_exactly_once() {
    let n = 8 * PB;
    let z = zone(0, n, Config::default(), 3);
    let go = std::sync::Barrier::new(2);
    for round in 0..300 {
        let order = (round % 5) as u8; // 4: not cached, freed straight to the lists
        let live: Vec<_> = (0..200)
            .map(|_| z.alloc_pages(2, Gfp::MOVABLE, order).unwrap())
            .collect();
        let ok: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|cpu| {
                    let (z, live, go) = (&z, &live, &go);
                    s.spawn(move || {
                        go.wait();
                        live.iter()
                            .filter(|a| match z.free_pages(cpu, a.pfn, a.order) {
                                Ok(()) => true,
                                Err(FreeError::NotAllocated) => false,
                                Err(e) => panic!("{e:?}"),
                            })
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ok[0] + ok[1], live.len(), "round {round}: {ok:?}");
        z.check_invariants().unwrap();
        assert_eq!(z.free_pages_count(), n, "round {round}");
    }
}
