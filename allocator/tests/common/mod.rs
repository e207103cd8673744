//! Helpers shared by the allocator's integration tests.
#![allow(dead_code)]

use allocator::sim::{CallKind, SimStage2};
use allocator::*;

/// What the rule tests run on: `BuddyAllocator` itself, or a `Zone` with one CPU or with
/// several, every operation of the test spread over the CPUs (see [`OnCpus`]). The method
/// names and shapes are `BuddyAllocator`'s, so a rule test reads the same on all three.
pub trait Subject: Sized {
    /// The allocator over `[base, base + n)` on a simulated stage 2.
    fn sim(base: Pfn, n: u64, cfg: Config) -> Self;
    /// `alloc_pages`, on the next CPU for a zone.
    fn alloc_pages(&mut self, gfp: Gfp, order: u8) -> Result<Allocation, AllocError>;
    /// `alloc_pages_special`, on the next CPU for a zone.
    fn alloc_pages_special(
        &mut self,
        ctx: BuddyContext,
        gfp: Gfp,
        order: u8,
    ) -> Result<Allocation, AllocError>;
    /// `free_pages`, on the next CPU for a zone.
    fn free_pages(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError>;
    /// Give every cached block back to the buddy lists (`drain_all` for a zone).
    fn drain_pcp(&mut self);
    /// Counters and free lists now.
    fn snapshot(&self) -> Snapshot;
    /// Every invariant of the allocator (and of a zone's caches).
    fn check_invariants(&self) -> Result<(), &'static str>;
    /// The live allocation that starts at or contains `pfn`.
    fn allocation_containing(&self, pfn: Pfn) -> Option<Allocation>;
    /// Freetype of `pfn`'s pageblock.
    fn pageblock_freetype(&self, pfn: Pfn) -> Option<Freetype>;
    /// Free pages, caches included.
    fn free_pages_count(&self) -> u64;
    /// First managed pfn.
    fn base_pfn(&self) -> Pfn;
    /// Number of managed pages.
    fn nr_pages(&self) -> u64;
    /// The simulated stage 2 (exclusive access: a zone's is behind its lock).
    fn stage2(&mut self) -> &SimStage2;
    /// The simulated stage 2, to plant contents or failures.
    fn stage2_mut(&mut self) -> &mut SimStage2;
    /// Most pages any one CPU's cache holds now (the whole cache for `BuddyAllocator`).
    fn max_cached_on_one_cpu(&self) -> u64;
    /// Whether a freed unmapped block of a cached order is zeroed when it leaves its cache
    /// or is allocated again (`Zone`), not on free (`BuddyAllocator`).
    const LAZY_ZEROING: bool;
    /// Whether a cache miss takes a batch of blocks from the lists into the cache (`Zone`)
    /// rather than one (`BuddyAllocator`).
    const REFILLS_IN_BATCHES: bool;
}

impl Subject for BuddyAllocator<SimStage2> {
    const LAZY_ZEROING: bool = false;
    const REFILLS_IN_BATCHES: bool = false;
    fn sim(base: Pfn, n: u64, cfg: Config) -> Self {
        sim(base, n, cfg)
    }
    fn alloc_pages(&mut self, gfp: Gfp, order: u8) -> Result<Allocation, AllocError> {
        BuddyAllocator::alloc_pages(self, gfp, order)
    }
    fn alloc_pages_special(
        &mut self,
        ctx: BuddyContext,
        gfp: Gfp,
        order: u8,
    ) -> Result<Allocation, AllocError> {
        BuddyAllocator::alloc_pages_special(self, ctx, gfp, order)
    }
    fn free_pages(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        BuddyAllocator::free_pages(self, pfn, order)
    }
    fn drain_pcp(&mut self) {
        BuddyAllocator::drain_pcp(self)
    }
    fn snapshot(&self) -> Snapshot {
        BuddyAllocator::snapshot(self)
    }
    fn check_invariants(&self) -> Result<(), &'static str> {
        BuddyAllocator::check_invariants(self)
    }
    fn allocation_containing(&self, pfn: Pfn) -> Option<Allocation> {
        BuddyAllocator::allocation_containing(self, pfn)
    }
    fn pageblock_freetype(&self, pfn: Pfn) -> Option<Freetype> {
        BuddyAllocator::pageblock_freetype(self, pfn)
    }
    fn free_pages_count(&self) -> u64 {
        BuddyAllocator::free_pages_count(self)
    }
    fn base_pfn(&self) -> Pfn {
        BuddyAllocator::base_pfn(self)
    }
    fn nr_pages(&self) -> u64 {
        BuddyAllocator::nr_pages(self)
    }
    fn stage2(&mut self) -> &SimStage2 {
        BuddyAllocator::stage2(self)
    }
    fn stage2_mut(&mut self) -> &mut SimStage2 {
        BuddyAllocator::stage2_mut(self)
    }
    fn max_cached_on_one_cpu(&self) -> u64 {
        self.snapshot().pcp_pages.iter().sum()
    }
}

/// A `Zone` with `N` CPUs whose every operation runs on the next CPU in turn (allocations
/// and frees alike), so with `N > 1` a block is usually freed on another CPU than the one
/// that allocated it and lands in that CPU's cache.
pub struct OnCpus<const N: usize> {
    /// The zone under test.
    pub zone: Zone<SimStage2>,
    next: usize,
}

impl<const N: usize> OnCpus<N> {
    fn cpu(&mut self) -> usize {
        let c = self.next;
        self.next = (c + 1) % N;
        c
    }
}

impl<const N: usize> Subject for OnCpus<N> {
    const LAZY_ZEROING: bool = true;
    const REFILLS_IN_BATCHES: bool = true;
    fn sim(base: Pfn, n: u64, cfg: Config) -> Self {
        OnCpus {
            zone: Zone::new(base, n, SimStage2::new(base, n), cfg, N).unwrap(),
            next: 0,
        }
    }
    fn alloc_pages(&mut self, gfp: Gfp, order: u8) -> Result<Allocation, AllocError> {
        let cpu = self.cpu();
        self.zone.alloc_pages(cpu, gfp, order)
    }
    fn alloc_pages_special(
        &mut self,
        ctx: BuddyContext,
        gfp: Gfp,
        order: u8,
    ) -> Result<Allocation, AllocError> {
        let cpu = self.cpu();
        self.zone.alloc_pages_special(cpu, ctx, gfp, order)
    }
    fn free_pages(&mut self, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let cpu = self.cpu();
        self.zone.free_pages(cpu, pfn, order)
    }
    fn drain_pcp(&mut self) {
        self.zone.drain_all()
    }
    fn snapshot(&self) -> Snapshot {
        self.zone.snapshot()
    }
    fn check_invariants(&self) -> Result<(), &'static str> {
        self.zone.check_invariants()
    }
    fn allocation_containing(&self, pfn: Pfn) -> Option<Allocation> {
        self.zone.allocation_containing(pfn)
    }
    fn pageblock_freetype(&self, pfn: Pfn) -> Option<Freetype> {
        self.zone.pageblock_freetype(pfn)
    }
    fn free_pages_count(&self) -> u64 {
        self.zone.free_pages_count()
    }
    fn base_pfn(&self) -> Pfn {
        self.zone.base_pfn()
    }
    fn nr_pages(&self) -> u64 {
        self.zone.nr_pages()
    }
    fn stage2(&mut self) -> &SimStage2 {
        self.zone.stage2_mut()
    }
    fn stage2_mut(&mut self) -> &mut SimStage2 {
        self.zone.stage2_mut()
    }
    fn max_cached_on_one_cpu(&self) -> u64 {
        (0..N)
            .map(|c| self.zone.cached_pages(c).unwrap())
            .max()
            .unwrap_or(0)
    }
}

/// Define each listed generic rule test (`fn name<A: Subject>()`) three times: on
/// `BuddyAllocator` (module `buddy`), on a one-CPU `Zone` (`zone1`) and on a four-CPU
/// `Zone` with the operations spread over the CPUs (`zone4`).
#[macro_export]
macro_rules! on_every_allocator {
    ($($name:ident),* $(,)?) => {
        mod buddy {
            $( #[test] fn $name() { super::$name::<allocator::BuddyAllocator<allocator::sim::SimStage2>>() } )*
        }
        mod zone1 {
            $( #[test] fn $name() { super::$name::<$crate::common::OnCpus<1>>() } )*
        }
        mod zone4 {
            $( #[test] fn $name() { super::$name::<$crate::common::OnCpus<4>>() } )*
        }
    };
}

/// An allocator over `[base, base + n)` on a simulated stage 2.
pub fn sim(base: Pfn, n: u64, cfg: Config) -> BuddyAllocator<SimStage2> {
    BuddyAllocator::new(base, n, SimStage2::new(base, n), cfg)
}

/// Default config without the order-0 caches (exact buddy behaviour).
pub fn no_pcp() -> Config {
    Config {
        pcp_capacity: 0,
        ..Config::default()
    }
}

/// Snapshot with the failure counters cleared (they change on refused calls).
pub fn snap_no_failures<A: Subject>(a: &A) -> Snapshot {
    let mut s = a.snapshot();
    s.alloc_failures = 0;
    s.free_failures = 0;
    s.stage2_failures = 0;
    s
}

/// A snapshot without what per-CPU caches change: where free pages sit (caches or lists,
/// hence the free lists and counts of free pageblocks) and the drain count.
pub fn mask_caches(mut s: Snapshot) -> Snapshot {
    s.free_per_order = [[0; Freetype::COUNT]; 11];
    s.pcp_pages = [0; Freetype::COUNT];
    s.pcp_drains = 0;
    s.free_pageblocks_mapped = 0;
    s.free_pageblocks_unmapped = 0;
    s.free_pageblocks_sensitive = 0;
    s.free_pages_per_freetype = [0; Freetype::COUNT];
    s.pageblocks_per_freetype = [0; Freetype::COUNT]; // merging at order 9 re-tags migratetypes
    s
}

/// Every pageblock's freetype visibility (nonsensitive, sensitive, unmapped) agrees with the
/// simulated stage 2, page by page.
pub fn assert_stage2_agrees<A: Subject>(a: &mut A) {
    let (base, n) = (a.base_pfn(), a.nr_pages());
    for pfn in base..base + n {
        let ft = a.pageblock_freetype(pfn).unwrap();
        assert_eq!(
            a.stage2().visibility(pfn),
            Some(ft.visibility()),
            "pfn {pfn:#x} of a {ft} pageblock"
        );
    }
    assert!(
        a.stage2().violations().is_empty(),
        "{:?}",
        a.stage2().violations()
    );
}

/// Number of recorded calls of `kind`.
pub fn calls<A: Subject>(a: &mut A, kind: CallKind) -> u64 {
    a.stage2().count(kind)
}
