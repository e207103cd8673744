//! Benchmark: parse + replay of the shared trace. A small harness (no criterion): each case runs
//! `RUNS` times after a warm-up and prints the median, min and max, with events per second.
//!
//! `cargo bench -p replay` (or `-- TRACE` for another trace; `BENCH_RUNS=N` to change the count).

use std::hint::black_box;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use replay::classify::{classify, Rules};
use replay::policy::{self, PolicyKind, RunOptions};
use replay::trace::{load, load_parallel, load_parallel_scoped, LoadOptions};
use replay::tracker::PureModel;

const DEFAULT_TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/data/kmem-trace-cargo-small.txt.gz"
);

/// A reader that adds the wall time spent in its reads to a counter (nanoseconds): what the
/// decoder costs inside a load, on the reader thread.
struct Timed<R> {
    inner: R,
    ns: Arc<AtomicU64>,
}

impl<R: Read> Read for Timed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let t = Instant::now();
        let r = self.inner.read(buf);
        self.ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

/// The gzip trace as `veil replay FILE.gz` reads it: a reader of the file's bytes through
/// `reader::decoding`, loaded by `trace::load_parallel`; the decoder's time is added to
/// `decoder_ns`.
fn load_gz_parallel(gz: &Arc<[u8]>, decoder_ns: &Arc<AtomicU64>) -> replay::Trace {
    let raw: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(Arc::clone(gz)));
    let r = Timed {
        inner: replay::reader::decoding(raw).unwrap(),
        ns: Arc::clone(decoder_ns),
    };
    load_parallel(r, LoadOptions::default(), &mut |_| {}).unwrap()
}

/// The bound for compressed input: the same gzip decoder alone, decompressing to a sink.
fn decode_to_sink(gz: &[u8]) {
    let mut d = flate2::read::MultiGzDecoder::new(gz);
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0usize;
    loop {
        match d.read(&mut buf).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    black_box(n);
}

/// The decoder alone to a sink while another thread runs sequential loads of the plain text
/// (the same parsing and pairing a load must do) from before the decode starts until after
/// it ends: the decoder's time when the other core does the load's other work.
fn decode_beside_parsing(gz: &[u8], plain: &[u8]) -> f64 {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                started.fetch_add(1, Ordering::Relaxed);
                black_box(load(plain, LoadOptions::default()).unwrap());
            }
        });
        while started.load(Ordering::Relaxed) == 0 {
            std::hint::spin_loop();
        }
        let t = Instant::now();
        decode_to_sink(gz);
        let d = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        d
    })
}

/// The parallel gzip load against the decoder alone in rounds of one each, back to back, the
/// order rotating: one ratio per round, so a host that speeds up or slows down between the
/// separate rows above (this one does, by up to a third) cannot move the ratio. Also the
/// decoder's own time inside each load against the decoder alone: with the other thread busy
/// parsing and pairing, the decoder itself runs slower, and the load can be no faster than
/// its reader thread. And the decoder beside a parsing core ([`decode_beside_parsing`])
/// against the decoder alone: a floor for any two-core load on this host, since a load's
/// parsing (more CPU than its decoding) keeps the other core busy while the decoder runs.
/// Dropping the loaded trace counts in the load's time (a caller pays it too) and is also shown
/// alone.
fn paired_ratio(runs: usize, gz: &[u8], gz_shared: &Arc<[u8]>, plain: &[u8]) {
    let decoder_ns = Arc::new(AtomicU64::new(0));
    let mut inside = Vec::with_capacity(runs);
    let mut beside = Vec::with_capacity(runs);
    let time = |f: &mut dyn FnMut()| {
        let s = Instant::now();
        f();
        s.elapsed().as_secs_f64()
    };
    let mut ratios = Vec::with_capacity(runs);
    let mut drops = Vec::with_capacity(runs);
    let (mut best_load, mut best_decode) = (f64::MAX, f64::MAX);
    for round in 0..=runs {
        let (mut l, mut d, mut r, mut b, mut dropped) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for step in 0..3 {
            match (round + step) % 3 {
                0 => {
                    decoder_ns.store(0, Ordering::Relaxed);
                    let mut kept = None;
                    l = time(&mut || {
                        kept = Some(black_box(load_gz_parallel(gz_shared, &decoder_ns)));
                    });
                    // The trace's memory goes back inside the load's time, as it would
                    // in a caller, but is also shown alone.
                    dropped = time(&mut || drop(kept.take()));
                    l += dropped;
                    r = decoder_ns.load(Ordering::Relaxed) as f64 * 1e-9;
                }
                1 => d = time(&mut || decode_to_sink(gz)),
                _ => b = decode_beside_parsing(gz, plain),
            }
        }
        if round > 0 {
            // Round 0 is the warm-up.
            ratios.push(l / d);
            drops.push(dropped);
            inside.push(r / d);
            beside.push(b / d);
            best_load = best_load.min(l);
            best_decode = best_decode.min(d);
        }
    }
    ratios.sort_by(f64::total_cmp);
    drops.sort_by(f64::total_cmp);
    inside.sort_by(f64::total_cmp);
    beside.sort_by(f64::total_cmp);
    println!(
        "compressed input / decoder alone, paired rounds: median {:.2}x (min {:.2}, max {:.2}, n={runs}); best load / best decode {:.2}x ({:.2} / {:.2} ms)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        best_load / best_decode,
        best_load * 1e3,
        best_decode * 1e3
    );
    println!(
        "  of which the decoder inside the load (reader thread's time in read) / decoder alone: median {:.2}x (min {:.2}, max {:.2})",
        inside[inside.len() / 2],
        inside[0],
        inside[inside.len() - 1]
    );
    println!(
        "  of which dropping the loaded trace (returning its memory): median {:.3} ms (min {:.3}, max {:.3})",
        drops[drops.len() / 2] * 1e3,
        drops[0] * 1e3,
        drops[drops.len() - 1] * 1e3
    );
    println!(
        "  decoder while the other core parses (a floor for any two-core load here) / decoder alone: median {:.2}x (min {:.2}, max {:.2})",
        beside[beside.len() / 2],
        beside[0],
        beside[beside.len() - 1]
    );
}

/// CPU time (user + system) of the whole process so far, all threads, in seconds.
fn cpu_time() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage it is given; RUSAGE_SELF is always valid.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Runs `f` `runs` times after a warm-up and prints the median, min and max wall time, the
/// rate, and the median CPU time of all threads (for the two-thread loads: what they cost
/// however loaded the machine is); returns the median wall time.
fn measure(name: &str, runs: usize, units: u64, unit: &str, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut t = Vec::with_capacity(runs);
    let mut cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (s, c) = (Instant::now(), cpu_time());
        f();
        t.push(s.elapsed().as_secs_f64());
        cpu.push(cpu_time() - c);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    cpu.sort_by(|a, b| a.total_cmp(b));
    let med = t[t.len() / 2];
    println!(
        "{name:<44} median {:>8.2} ms  (min {:>7.2}, max {:>7.2}, n={runs})  {:>7.2} M {unit}/s  cpu {:>6.2} ms",
        med * 1e3,
        t[0] * 1e3,
        t[t.len() - 1] * 1e3,
        units as f64 / med / 1e6,
        cpu[cpu.len() / 2] * 1e3
    );
    med
}

fn main() {
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| DEFAULT_TRACE.to_string());
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let gz = std::fs::read(&path).expect("read trace");
    let mut plain = Vec::new();
    replay::reader::from_reader(Box::new(&gz[..]))
        .expect("open")
        .read_to_end(&mut plain)
        .expect("decompress");
    let mut trace = load(&plain[..], LoadOptions::default()).expect("parse");
    classify(&mut trace, &Rules::default()).expect("classify");
    let lines = trace.stats.lines;
    let events = trace.events.len() as u64;
    println!(
        "trace {path}: {lines} lines ({} MB text), {events} replay events; gzip backend: {}",
        plain.len() / 1_000_000,
        if cfg!(feature = "zlib-rs") {
            "zlib-rs"
        } else {
            "miniz_oxide (flate2's default)"
        }
    );

    // The bound for compressed input: the same decoder alone, in this process, to a sink.
    let decode = measure(
        "gzip decoder alone (to a sink)",
        runs,
        lines,
        "lines",
        || decode_to_sink(&gz),
    );
    measure(
        "load plain, sequential (reference)",
        runs,
        lines,
        "lines",
        || {
            black_box(load(&plain[..], LoadOptions::default()).unwrap());
        },
    );
    let same = measure(
        "load gzip, sequential, same thread",
        runs,
        lines,
        "lines",
        || {
            let r = replay::reader::from_reader(Box::new(&gz[..])).unwrap();
            black_box(load(r, LoadOptions::default()).unwrap());
        },
    );
    let threaded = measure(
        "load gzip, sequential, decoder thread",
        runs,
        lines,
        "lines",
        || {
            let r =
                replay::reader::from_reader_threaded(Box::new(std::io::Cursor::new(gz.clone())))
                    .unwrap();
            black_box(load(r, LoadOptions::default()).unwrap());
        },
    );
    measure(
        "load plain, parallel (2 threads)",
        runs,
        lines,
        "lines",
        || {
            black_box(
                load_parallel_scoped(&plain[..], LoadOptions::default(), &mut |_| {}).unwrap(),
            );
        },
    );
    let gz_shared: Arc<[u8]> = gz.clone().into();
    let unused_ns = Arc::new(AtomicU64::new(0));
    let par = measure(
        "load gzip, parallel (veil replay)",
        runs,
        lines,
        "lines",
        || {
            black_box(load_gz_parallel(&gz_shared, &unused_ns));
        },
    );
    println!(
        "compressed input / decoder alone: parallel loader {:.2}x (goal <= 1.2x); sequential loader {:.2}x on one thread, {:.2}x with the decoder on its own thread",
        par / decode,
        same / decode,
        threaded / decode
    );
    paired_ratio(runs, &gz, &gz_shared, &plain);
    let opts = RunOptions::default();
    for kind in PolicyKind::ALL {
        let lay = policy::layout_for(kind, &trace, None, policy::DEFAULT_HEADROOM_PCT);
        measure(&format!("replay {kind}"), runs, events, "events", || {
            black_box(policy::run(kind, &trace, lay, PureModel, &opts));
        });
    }
    for (label, gzip, parallel) in [
        ("plain, sequential", false, false),
        ("gzip, sequential", true, false),
        ("plain, parallel", false, true),
        ("gzip, parallel", true, true),
    ] {
        measure(
            &format!("parse+classify+replay freetype ({label})"),
            runs,
            lines,
            "trace events",
            || {
                let mut t = if parallel && gzip {
                    load_gz_parallel(&gz_shared, &unused_ns)
                } else if parallel {
                    load_parallel_scoped(&plain[..], LoadOptions::default(), &mut |_| {}).unwrap()
                } else if gzip {
                    load(
                        replay::reader::from_reader(Box::new(&gz[..])).unwrap(),
                        LoadOptions::default(),
                    )
                    .unwrap()
                } else {
                    load(&plain[..], LoadOptions::default()).unwrap()
                };
                classify(&mut t, &Rules::default()).unwrap();
                let lay = policy::layout_for(
                    PolicyKind::Freetype,
                    &t,
                    None,
                    policy::DEFAULT_HEADROOM_PCT,
                );
                black_box(policy::run(PolicyKind::Freetype, &t, lay, PureModel, &opts));
            },
        );
    }
    // Last, since it changes this process's allocator for good: the paired rounds again with
    // glibc keeping every freed page (no trimming, no mapping of its own per large block), so
    // a load writes into pages an earlier load faulted in, as the decoder's reused sink does
    // in every round. The difference to the rounds above is what first touches of fresh
    // memory cost the load on this host.
    if keep_freed_memory() {
        println!("with the allocator keeping freed memory (each load reuses pages earlier loads faulted in):");
        paired_ratio(runs, &gz, &gz_shared, &plain);
    }
}

/// Makes glibc's malloc serve everything from its heap and never give memory back; whether
/// it took both settings (not on other C libraries).
fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds, under its own lock; no
    // allocation is invalidated by it.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
