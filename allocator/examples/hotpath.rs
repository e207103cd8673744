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

/// 10^5 order-0 allocations freed in a random order, `n` times (profiling aid).
#[inline(never)]
fn veil_random(n: u64) {
    let cfg = Config {
        pcp_capacity: std::env::var("PCP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        ..Config::default()
    };
    let mut a = BuddyAllocator::new(1 << 18, FRAMES, NullStage2, cfg);
    let mut perm: Vec<usize> = (0..100_000).collect();
    let mut r = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..perm.len()).rev() {
        r ^= r >> 12;
        r ^= r << 25;
        r ^= r >> 27;
        perm.swap(
            i,
            (r.wrapping_mul(0x2545_f491_4f6c_dd1d) % (i as u64 + 1)) as usize,
        );
    }
    let mut frames = vec![0u64; perm.len()];
    let mut times = Vec::new();
    for _ in 0..n {
        for f in frames.iter_mut() {
            *f = a.alloc_pages(Gfp::empty(), 0).unwrap().pfn;
        }
        let t = std::time::Instant::now();
        veil_free_phase(&mut a, &frames, &perm);
        times.push(t.elapsed());
    }
    report("veil: free phase", &mut times);
}

/// Print the median and minimum of per-round times.
fn report(what: &str, times: &mut [std::time::Duration]) {
    times.sort();
    if let (Some(min), Some(med)) = (times.first(), times.get(times.len() / 2)) {
        eprintln!("{what}: median {med:?}, min {min:?} per round");
    }
}

/// The timed part of [`veil_random`]: free in `perm` order, then drain the caches (a
/// separate function so `callgrind --toggle-collect=*veil_free_phase*` isolates it).
#[inline(never)]
fn veil_free_phase(a: &mut BuddyAllocator<NullStage2>, frames: &[u64], perm: &[usize]) {
    for &i in perm {
        a.free_pages(frames[i], 0).unwrap();
    }
    a.drain_pcp();
}

/// The timed part of [`bsa_random`].
#[inline(never)]
fn bsa_free_phase(
    a: &mut buddy_slab_allocator::BuddyAllocator<4096>,
    frames: &[usize],
    perm: &[usize],
) {
    for &i in perm {
        a.dealloc_pages(frames[i], 1);
    }
}

/// As [`veil_random`] for buddy-slab-allocator.
#[inline(never)]
fn bsa_random(n: u64) {
    let bytes = FRAMES as usize * 4096 + (8 << 20);
    let layout = std::alloc::Layout::from_size_align(bytes, 4096).unwrap();
    // SAFETY: non-zero size; see `bsa`.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!p.is_null());
    // SAFETY: `p` points to `bytes` writable bytes that outlive the allocator (leaked).
    let region = unsafe { std::slice::from_raw_parts_mut(p, bytes) };
    let mut a = buddy_slab_allocator::BuddyAllocator::<4096>::new();
    // SAFETY: the region is valid for the allocator's whole life and not used elsewhere.
    unsafe { a.init(region).unwrap() };
    let mut perm: Vec<usize> = (0..100_000).collect();
    let mut r = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..perm.len()).rev() {
        r ^= r >> 12;
        r ^= r << 25;
        r ^= r >> 27;
        perm.swap(
            i,
            (r.wrapping_mul(0x2545_f491_4f6c_dd1d) % (i as u64 + 1)) as usize,
        );
    }
    let mut frames = vec![0usize; perm.len()];
    let mut times = Vec::new();
    for _ in 0..n {
        for f in frames.iter_mut() {
            *f = a.alloc_pages(1, 4096).unwrap();
        }
        let t = std::time::Instant::now();
        bsa_free_phase(&mut a, &frames, &perm);
        times.push(t.elapsed());
    }
    report("bsa: free phase", &mut times);
}

/// The benchmark's aging mix, `n` rounds, with the allocator's counters at the end.
#[inline(never)]
fn veil_aging(n: u64) {
    let cfg = Config {
        pcp_capacity: std::env::var("PCP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        ..Config::default()
    };
    let mut a = BuddyAllocator::new(1 << 18, FRAMES, NullStage2, cfg);
    let mut r = 0x5eedu64;
    let mut next = move || {
        r ^= r >> 12;
        r ^= r << 25;
        r ^= r >> 27;
        r.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let ops: Vec<(usize, u8)> = (0..20_000)
        .map(|_| {
            let slot = (next() % 4096) as usize;
            let p = next() % 100;
            let x = next();
            let order = match p {
                0..60 => 0,
                60..80 => 1 + (x % 2) as u8,
                80..95 => 3 + (x % 3) as u8,
                _ => 6 + (x % 4) as u8,
            };
            (slot, order)
        })
        .collect();
    let mut slots: Vec<Option<(u64, u8)>> = vec![None; 4096];
    let mut fails = 0u64;
    let t = std::time::Instant::now();
    for _ in 0..n {
        for &(slot, order) in &ops {
            if let Some((f, o)) = slots[slot].take() {
                a.free_pages(f, o).unwrap();
            }
            match a.alloc_pages(Gfp::empty(), order) {
                Ok(x) => slots[slot] = Some((x.pfn, order)),
                Err(_) => fails += 1,
            }
        }
        for s in slots.iter_mut() {
            if let Some((f, o)) = s.take() {
                a.free_pages(f, o).unwrap();
            }
        }
    }
    let s = a.snapshot();
    eprintln!(
        "veil aging: {:?} per round, {fails} failures, claims {}, steals {}, drains {}",
        t.elapsed() / n.max(1) as u32,
        s.fallbacks_claim,
        s.fallbacks_steal,
        s.pcp_drains
    );
}

/// The aging mix for buddy-slab-allocator.
#[inline(never)]
fn bsa_aging(n: u64) {
    let bytes = FRAMES as usize * 4096 + (8 << 20);
    let layout = std::alloc::Layout::from_size_align(bytes, 4096).unwrap();
    // SAFETY: non-zero size; see `bsa`.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!p.is_null());
    // SAFETY: `p` points to `bytes` writable bytes that outlive the allocator (leaked).
    let region = unsafe { std::slice::from_raw_parts_mut(p, bytes) };
    let mut a = buddy_slab_allocator::BuddyAllocator::<4096>::new();
    // SAFETY: the region is valid for the allocator's whole life and not used elsewhere.
    unsafe { a.init(region).unwrap() };
    let mut r = 0x5eedu64;
    let mut next = move || {
        r ^= r >> 12;
        r ^= r << 25;
        r ^= r >> 27;
        r.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let ops: Vec<(usize, u8)> = (0..20_000)
        .map(|_| {
            let slot = (next() % 4096) as usize;
            let p = next() % 100;
            let x = next();
            let order = match p {
                0..60 => 0,
                60..80 => 1 + (x % 2) as u8,
                80..95 => 3 + (x % 3) as u8,
                _ => 6 + (x % 4) as u8,
            };
            (slot, order)
        })
        .collect();
    let mut slots: Vec<Option<(usize, u8)>> = vec![None; 4096];
    let t = std::time::Instant::now();
    for _ in 0..n {
        for &(slot, order) in &ops {
            if let Some((f, o)) = slots[slot].take() {
                a.dealloc_pages(f, 1 << o);
            }
            if let Ok(x) = a.alloc_pages(1 << order, 4096) {
                slots[slot] = Some((x, order));
            }
        }
        for s in slots.iter_mut() {
            if let Some((f, o)) = s.take() {
                a.dealloc_pages(f, 1 << o);
            }
        }
    }
    eprintln!("bsa aging: {:?} per round", t.elapsed() / n.max(1) as u32);
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
        Some("veil-random") => veil_random(n),
        Some("veil-aging") => veil_aging(n),
        Some("bsa-aging") => bsa_aging(n),
        Some("bsa-random") => bsa_random(n),
        Some(o) => eprintln!("unknown allocator {o}: veil, bsa or bsys"),
    }
}
