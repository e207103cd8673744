//! Smoke test: the core paths work together on simulated stage 2.

use allocator::*;

#[test]
fn alloc_free_flip_round_trip() {
    let base = 512 * 4;
    let n = 4096 + 100;
    let mut a = BuddyAllocator::new(base, n, SimStage2::new(base, n), Config::default());
    a.check_invariants().unwrap();
    assert_eq!(a.free_pages_count(), n);
    let x = a.alloc_pages(Gfp::empty(), 0).unwrap();
    let y = a.alloc_pages(Gfp::UNMAPPED, 3).unwrap();
    let z = a
        .alloc_pages_special(BuddyContext::Unmapped, Gfp::ZERO, 9)
        .unwrap();
    a.check_invariants().unwrap();
    assert_eq!(y.freetype, Freetype::UNMOVABLE_UNMAPPED);
    assert_eq!(a.allocation_containing(y.pfn + 5), Some(y));
    assert_eq!(a.allocation_containing(z.pfn + 511), Some(z));
    assert_eq!(a.stage2().is_mapped(y.pfn), Some(false));
    assert_eq!(a.stage2().is_mapped(x.pfn), Some(true));
    a.free_pages(x.pfn, 0).unwrap();
    a.free_pages(y.pfn, 3).unwrap();
    assert_eq!(a.free_pages(y.pfn, 3), Err(FreeError::NotAllocated));
    a.free_pages(z.pfn, 9).unwrap();
    a.check_invariants().unwrap();
    assert_eq!(a.free_pages_count(), n);
    assert!(a.stage2().violations().is_empty());
}
