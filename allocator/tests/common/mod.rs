//! Helpers shared by the allocator's integration tests.
#![allow(dead_code)]

use allocator::sim::{CallKind, SimStage2};
use allocator::*;

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
pub fn snap_no_failures(a: &BuddyAllocator<SimStage2>) -> Snapshot {
    let mut s = a.snapshot();
    s.alloc_failures = 0;
    s.free_failures = 0;
    s.stage2_failures = 0;
    s
}

/// Every pageblock's freetype mapped-ness agrees with the simulated stage 2, page by page.
pub fn assert_stage2_agrees(a: &BuddyAllocator<SimStage2>) {
    let (base, n) = (a.base_pfn(), a.nr_pages());
    for pfn in base..base + n {
        let ft = a.pageblock_freetype(pfn).unwrap();
        assert_eq!(
            a.stage2().is_mapped(pfn),
            Some(!ft.is_unmapped()),
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
pub fn calls(a: &BuddyAllocator<SimStage2>, kind: CallKind) -> u64 {
    a.stage2().count(kind)
}
