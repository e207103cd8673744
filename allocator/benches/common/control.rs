//! The shared-nothing control of the threads figures, shared by `benches/peers.rs` and
//! `examples/zone_threads.rs`.

use std::hint::black_box;
use std::time::Instant;

/// Iterations per second (all threads together) of `threads` threads each running a
/// dependent multiply-add loop: what 2 threads can get on this host at this moment.
pub fn control_throughput(threads: usize) -> f64 {
    const N: u64 = 20_000_000;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut x = 1u64;
                for i in 0..N {
                    x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
                }
                black_box(x)
            });
        }
    });
    (threads as u64 * N) as f64 / t.elapsed().as_secs_f64()
}
