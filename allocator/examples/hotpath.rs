//! The hot path for instruction counting: `N` order-0 alloc+free pairs on a warm allocator.
//!
//! ```text
//! cargo build --release -p allocator --example hotpath
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/hotpath 0
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/hotpath 1000000
//! ```
//! Instructions per pair = (Ir(1000000) - Ir(0)) / 1000000 (the "Collected" line). The same
//! binary prints the figure for other peers' hot paths with a second argument: `bsa` for
//! buddy-slab-allocator, `bsys` for buddy_system_allocator.

use allocator::{BuddyAllocator, Config, Gfp, NullStage2};
use std::hint::black_box;

const FRAMES: u64 = 1 << 17;

#[inline(never)]
fn veil(n: u64) {
    let mut a = BuddyAllocator::new(1 << 18, FRAMES, NullStage2, Config::default());
    // Warm up: one pair, so the cache holds the page like in steady state.
    let x = a.alloc_pages(Gfp::empty(), 0).unwrap();
    a.free_pages(x.pfn, 0).unwrap();
    for _ in 0..n {
        let x = a
            .alloc_pages(black_box(Gfp::empty()), black_box(0))
            .unwrap();
        a.free_pages(black_box(x.pfn), black_box(0)).unwrap();
    }
    black_box(a.free_pages_count());
}

#[inline(never)]
fn bsys(n: u64) {
    let mut a = buddy_system_allocator::FrameAllocator::<11>::new();
    a.add_frame(1 << 18, (1 << 18) + FRAMES as usize);
    for _ in 0..n {
        let x = a.alloc(black_box(1)).unwrap();
        a.dealloc(black_box(x), black_box(1));
    }
}

#[inline(never)]
fn bsa(n: u64) {
    let bytes = FRAMES as usize * 4096 + (8 << 20);
    let layout = std::alloc::Layout::from_size_align(bytes, 4096).unwrap();
    // SAFETY: non-zero size; the region is only handed to the allocator, which writes its
    // metadata into its prefix and never reads pages it hands out.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!p.is_null());
    // SAFETY: `p` points to `bytes` writable bytes that outlive the allocator (leaked).
    let region = unsafe { std::slice::from_raw_parts_mut(p, bytes) };
    let mut a = buddy_slab_allocator::BuddyAllocator::<4096>::new();
    // SAFETY: the region is valid for the allocator's whole life and not used elsewhere.
    unsafe { a.init(region).unwrap() };
    for _ in 0..n {
        let x = a.alloc_pages(black_box(1), 4096).unwrap();
        a.dealloc_pages(black_box(x), black_box(1));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    match args.next().as_deref() {
        None | Some("veil") => veil(n),
        Some("bsa") => bsa(n),
        Some("bsys") => bsys(n),
        Some(o) => eprintln!("unknown allocator {o}: veil, bsa or bsys"),
    }
}
