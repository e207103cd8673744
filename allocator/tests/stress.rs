//! The kernel series' stress: 10^7 interleaved mapped/unmapped allocations of orders 0-3 with
//! 65,536 live at a time and a double-allocation detector. Ignored by default (it takes a few
//! seconds in release mode); run it with
//! `cargo test -p allocator --release --test stress -- --ignored --nocapture`.

use allocator::*;
use std::time::Instant;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
#[ignore = "10^7 operations: run in release mode"]
fn stress_1e7_interleaved_with_65536_live() {
    const OPS: u64 = 10_000_000;
    const LIVE: usize = 65_536;
    let nr: u64 = 1 << 20; // 4 GiB of simulated frames, 12 MiB of metadata
    let base: u64 = 1 << 18;
    let mut a = BuddyAllocator::new(base, nr, NullStage2, Config::default());
    let mut owned = vec![0u64; (nr / 64) as usize];
    let mut slots: Vec<Option<Allocation>> = vec![None; LIVE];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut failures = 0u64;
    let t = Instant::now();
    for i in 0..OPS {
        let slot = (rng.next() % LIVE as u64) as usize;
        if let Some(x) = slots[slot].take() {
            for p in x.pfn..x.pfn + (1 << x.order) {
                let b = p - base;
                owned[(b / 64) as usize] &= !(1 << (b % 64));
            }
            a.free_pages(x.pfn, x.order).unwrap();
        }
        let r = rng.next();
        let order = (r & 3) as u8;
        let gfp = if r & 4 != 0 {
            Gfp::UNMAPPED
        } else {
            Gfp::empty()
        };
        match a.alloc_pages(gfp, order) {
            Ok(x) => {
                assert_eq!(x.freetype.is_unmapped(), gfp.contains(Gfp::UNMAPPED));
                for p in x.pfn..x.pfn + (1 << order) {
                    let b = p - base;
                    let w = &mut owned[(b / 64) as usize];
                    assert!(
                        *w & (1 << (b % 64)) == 0,
                        "double allocation of pfn {p:#x} at op {i}"
                    );
                    *w |= 1 << (b % 64);
                }
                slots[slot] = Some(x);
            }
            Err(_) => failures += 1,
        }
        if i % 2_000_000 == 0 {
            a.check_invariants().unwrap();
        }
    }
    let elapsed = t.elapsed();
    a.check_invariants().unwrap();
    let s = a.snapshot();
    println!(
        "stress: {OPS} alloc+free iterations, {LIVE} live, {:.2?} ({:.0} ns/iteration); \
         {failures} failed allocations; flips {} to unmapped, {} to mapped; \
         unmap calls {}, map calls {}; claims {}, steals {}",
        elapsed,
        elapsed.as_nanos() as f64 / OPS as f64,
        s.flips_to_unmapped,
        s.flips_to_mapped,
        s.stage2_unmap_calls,
        s.stage2_map_calls,
        s.fallbacks_claim,
        s.fallbacks_steal
    );
    assert_eq!(failures, 0, "memory is 4x the live set: nothing may fail");
    for x in slots.into_iter().flatten() {
        a.free_pages(x.pfn, x.order).unwrap();
    }
    a.drain_pcp();
    a.check_invariants().unwrap();
    assert_eq!(a.free_pages_count(), nr);
}
