//! Loads a trace with the loader `veil replay` uses, `N` times, and prints each load's time: a
//! target for profilers (`valgrind --tool=callgrind`, `perf record`) without the replay.
//!
//! `cargo run -p replay --release --example load -- TRACE [N] [--sequential]`

use std::time::Instant;

use replay::trace::{load_parallel, load_with_progress, LoadOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().expect("usage: load TRACE [N] [--sequential]");
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let sequential = args.iter().any(|a| a == "--sequential");
    let mut times = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let t = if sequential {
            let r = replay::reader::open_input(path.as_ref()).expect("open");
            load_with_progress(r, LoadOptions::default(), &mut |_| {})
        } else {
            let r = replay::reader::open_input_parallel(path.as_ref()).expect("open");
            load_parallel(r, LoadOptions::default(), &mut |_| {})
        }
        .expect("load");
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(t);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{} loads: median {:.2} ms, min {:.2} ms",
        n,
        times[n / 2],
        times[0]
    );
}
