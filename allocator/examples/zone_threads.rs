//! `Zone` hot-pair scaling round by round, for a host shared with other work.
//!
//! ```text
//! cargo build --release -p allocator --example zone_threads
//! target/release/examples/zone_threads 20
//! ```
//! Each round builds a fresh two-CPU zone (so the heap places its arrays anew), takes one
//! page on CPU 0 first (as the benchmark does), times 2,000,000 hot order-0 pairs on one
//! thread, then on two threads (CPU ids 0 and 1), then a shared-nothing compute loop on one
//! and on two threads: the round's own control, saying whether both cores were free just
//! then. The last line is the median 2-thread/1-thread ratio of the rounds whose control
//! reached 1.9x. The first round also prints each thread's hot pfn (adjacent pages, the
//! last of CPU 0's refill batch and the first of CPU 1's).

#[path = "../benches/common/control.rs"]
mod control;
use allocator::{Config, Gfp, NullStage2, Zone};
use control::control_throughput as control;
use std::hint::black_box;
use std::time::Instant;

const PAIRS: u64 = 2_000_000;

/// Hot pairs per second on `threads` threads of a fresh zone; the hot pfn of each thread.
fn hot(threads: usize) -> (f64, Vec<u64>) {
    let z = Zone::new(1 << 18, 1 << 17, NullStage2, Config::default(), 2).unwrap();
    black_box(z.alloc_pages(0, Gfp::empty(), 0).unwrap());
    let b = std::sync::Barrier::new(threads + 1);
    let (t, pfns) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|cpu| {
                let (z, b) = (&z, &b);
                s.spawn(move || {
                    b.wait();
                    let mut last = 0;
                    for _ in 0..PAIRS {
                        let a = z.alloc_pages(cpu, Gfp::empty(), black_box(0)).unwrap();
                        last = a.pfn;
                        z.free_pages(cpu, black_box(a.pfn), 0).unwrap();
                    }
                    last
                })
            })
            .collect();
        b.wait();
        let t0 = Instant::now();
        let pfns: Vec<u64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        (t0.elapsed(), pfns)
    });
    (threads as f64 * PAIRS as f64 / t.as_secs_f64(), pfns)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(10, |s| s.parse().expect("rounds"));
    let mut judged = Vec::new();
    for r in 0..rounds {
        let (one, _) = hot(1);
        let (two, pfns) = hot(2);
        let c = control(2) / control(1);
        if r == 0 {
            println!("hot pfns of CPU 0 and CPU 1: {pfns:x?}");
        }
        println!(
            "round {r}: 1 thread {:.1} Mop/s, 2 threads {:.1} Mop/s = {:.2}x; control {c:.2}x",
            one / 1e6,
            two / 1e6,
            two / one
        );
        if c >= 1.9 {
            judged.push(two / one);
        }
    }
    judged.sort_by(|a, b| a.partial_cmp(b).unwrap());
    match judged.len() {
        0 => println!("no round had its control >= 1.9x: not judged"),
        n => println!(
            "{n} of {rounds} rounds with control >= 1.9x: median {:.2}x, min {:.2}x, max {:.2}x",
            (judged[(n - 1) / 2] + judged[n / 2]) / 2.0,
            judged[0],
            judged[n - 1]
        ),
    }
}
