//! Veil's allocator against `buddy-slab-allocator` 0.6 (its page-level `BuddyAllocator`) and
//! `buddy_system_allocator` 0.13 (`FrameAllocator<11>`, max order 10 like ours), in the same
//! run, on the same frame count, with Criterion's measurement loop. After Criterion's own
//! report, an interleaved pass (one sample of each allocator in turn, 21 rounds, so that
//! load changes on a shared machine hit all three alike) prints each workload's median time
//! per iteration and the ratios.
//!
//! Run: `cargo bench -p allocator` (add `-- --quick` for a faster, noisier run).

use allocator::{BuddyAllocator, Config, Gfp, NullStage2};
use criterion::{BenchmarkId, Criterion, SamplingMode};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Frames every allocator manages (512 MiB of 4 KiB frames).
const FRAMES: usize = 1 << 17;
/// Allocations in the random-order free workload.
const BATCH: usize = 100_000;
/// Live slots and operations per iteration of the aging mix.
const AGING_SLOTS: usize = 4096;
const AGING_OPS: usize = 20_000;
const PAGE: usize = 4096;

/// The operations every peer must offer: frame numbers (or addresses) in, frames out.
///
/// Every implementation is a thin adapter marked `#[inline(always)]`, so each workload loop
/// calls the peer's own API exactly as a direct caller would. (With a plain `#[inline]` hint
/// rustc kept `<Veil as PageAlloc>::free` out of line, a call layer around Veil's inlined
/// fast path that only the harness had: +28 instructions per aging operation under
/// callgrind and 10-15% of Veil's time on the aging mix and on random-order frees, while the
/// other peers' counts did not change.)
trait PageAlloc {
    const NAME: &'static str;
    fn alloc(&mut self, order: u8) -> Option<usize>;
    fn free(&mut self, frame: usize, order: u8);
    /// Bring the allocator to its fully merged state (Veil drains its order-0 caches).
    fn settle(&mut self) {}
}

struct Veil(BuddyAllocator<NullStage2>);
impl Veil {
    fn new() -> Self {
        Veil(BuddyAllocator::new(
            1 << 18,
            FRAMES as u64,
            NullStage2,
            Config::default(),
        ))
    }
}
impl PageAlloc for Veil {
    const NAME: &'static str = "veil";
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> Option<usize> {
        self.0
            .alloc_pages(Gfp::empty(), order)
            .ok()
            .map(|a| a.pfn as usize)
    }
    #[inline(always)]
    fn free(&mut self, frame: usize, order: u8) {
        self.0.free_pages(frame as u64, order).unwrap();
    }
    fn settle(&mut self) {
        self.0.drain_pcp();
    }
}

/// buddy-slab-allocator's page allocator. It keeps its metadata in the prefix of the region
/// it is given, so it gets real (lazily committed) memory sized so that it manages exactly
/// `FRAMES` frames; it never touches the frames it hands out.
struct Bsa(buddy_slab_allocator::BuddyAllocator<PAGE>);
impl Bsa {
    fn new() -> Self {
        let max = FRAMES * PAGE + (16 << 20);
        let layout = std::alloc::Layout::from_size_align(max, PAGE).unwrap();
        // SAFETY: non-zero size. The buffer is leaked: it outlives every allocator using it.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null());
        let mut size = FRAMES * PAGE
            + buddy_slab_allocator::BuddyAllocator::<PAGE>::required_meta_size(FRAMES * PAGE);
        loop {
            // SAFETY: `p` has `max >= size` writable bytes, leaked, used by this allocator only.
            let region = unsafe { std::slice::from_raw_parts_mut(p, size) };
            let mut a = buddy_slab_allocator::BuddyAllocator::<PAGE>::new();
            // SAFETY: the region stays valid (leaked) and nothing else uses it.
            unsafe { a.init(region).unwrap() };
            let got = a.total_pages();
            if got == FRAMES {
                return Bsa(a);
            }
            assert!(got < FRAMES, "overshoot: {got}");
            size += (FRAMES - got) * PAGE;
            assert!(size <= max);
        }
    }
}
impl PageAlloc for Bsa {
    const NAME: &'static str = "buddy-slab-allocator";
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> Option<usize> {
        self.0.alloc_pages(1 << order, PAGE).ok()
    }
    #[inline(always)]
    fn free(&mut self, frame: usize, order: u8) {
        self.0.dealloc_pages(frame, 1 << order);
    }
}

struct Bsys(buddy_system_allocator::FrameAllocator<11>);
impl Bsys {
    fn new() -> Self {
        let mut a = buddy_system_allocator::FrameAllocator::<11>::new();
        a.add_frame(1 << 18, (1 << 18) + FRAMES);
        Bsys(a)
    }
}
impl PageAlloc for Bsys {
    const NAME: &'static str = "buddy_system_allocator";
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> Option<usize> {
        self.0.alloc(1 << order)
    }
    #[inline(always)]
    fn free(&mut self, frame: usize, order: u8) {
        self.0.dealloc(frame, 1 << order);
    }
}

/// xorshift64*: the same pseudo-random sequence for every allocator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A permutation of `0..n`.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut r = Rng(seed);
    for i in (1..n).rev() {
        v.swap(i, (r.next() % (i as u64 + 1)) as usize);
    }
    v
}

/// The aging mix: (slot, order) pairs; orders 60% 0, 20% 1-2, 15% 3-5, 5% 6-9.
fn aging_ops() -> Vec<(usize, u8)> {
    let mut r = Rng(0x5eed);
    (0..AGING_OPS)
        .map(|_| {
            let slot = (r.next() % AGING_SLOTS as u64) as usize;
            let p = r.next() % 100;
            let x = r.next();
            let order = match p {
                0..60 => 0,
                60..80 => 1 + (x % 2) as u8,
                80..95 => 3 + (x % 3) as u8,
                _ => 6 + (x % 4) as u8,
            };
            (slot, order)
        })
        .collect()
}

/// One sample of `n` hot alloc+free pairs of `order`; returns the elapsed time.
fn hot_sample<A: PageAlloc>(a: &mut A, order: u8, n: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        let x = a.alloc(black_box(order)).unwrap();
        a.free(black_box(x), order);
    }
    t.elapsed()
}

/// One round of the random-order free workload: allocate `BATCH` order-0 frames (not timed),
/// then free them in the order of `perm` and settle (timed).
fn random_free_sample<A: PageAlloc>(a: &mut A, perm: &[usize], frames: &mut [usize]) -> Duration {
    for f in frames.iter_mut() {
        *f = a.alloc(0).unwrap();
    }
    let t = Instant::now();
    for &i in perm {
        a.free(black_box(frames[i]), 0);
    }
    a.settle();
    t.elapsed()
}

/// One round of the aging mix, ending with everything freed.
fn aging_sample<A: PageAlloc>(
    a: &mut A,
    ops: &[(usize, u8)],
    slots: &mut [Option<(usize, u8)>],
) -> Duration {
    let t = Instant::now();
    for &(slot, order) in ops {
        if let Some((f, o)) = slots[slot].take() {
            a.free(f, o);
        }
        slots[slot] = a.alloc(order).map(|f| (f, order));
    }
    for s in slots.iter_mut() {
        if let Some((f, o)) = s.take() {
            a.free(f, o);
        }
    }
    t.elapsed()
}

fn hot_order<A: PageAlloc>(c: &mut Criterion, a: &mut A, workload: &str, order: u8) {
    let mut g = c.benchmark_group(workload);
    g.bench_function(BenchmarkId::from_parameter(A::NAME), |b| {
        b.iter_custom(|iters| hot_sample(a, order, iters))
    });
    g.finish();
}

fn random_free<A: PageAlloc>(c: &mut Criterion, a: &mut A, perm: &[usize]) {
    let mut g = c.benchmark_group("random_free_1e5");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    let mut frames = vec![0usize; BATCH];
    g.bench_function(BenchmarkId::from_parameter(A::NAME), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| random_free_sample(a, perm, &mut frames))
                .sum()
        })
    });
    g.finish();
}

fn aging<A: PageAlloc>(c: &mut Criterion, a: &mut A, ops: &[(usize, u8)]) {
    let mut g = c.benchmark_group("aging_mix_2e4");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    let mut slots: Vec<Option<(usize, u8)>> = vec![None; AGING_SLOTS];
    g.bench_function(BenchmarkId::from_parameter(A::NAME), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| aging_sample(a, ops, &mut slots)).sum())
    });
    g.finish();
}

/// Interleaved measurement for the summary: `ROUNDS` rounds (or `PEERS_ROUNDS`), each timing
/// one sample of every allocator back to back, so load changes on a shared machine hit all
/// three alike. `PEERS_ONLY=<substring>` restricts the pass to matching workloads (for quick
/// A/B runs: `cargo bench -p allocator -- none` skips Criterion and runs only this pass;
/// `PEERS_MIN=1` reports the minimum instead of the median).
const ROUNDS: usize = 21;

fn rounds() -> usize {
    std::env::var("PEERS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS)
}

fn selected(name: &str) -> bool {
    std::env::var("PEERS_ONLY").map_or(true, |f| name.contains(f.as_str()))
}

/// Bytes written before every interleaved sample: more than the host's last-level cache
/// (32 MiB L3 here), so every allocator starts each sample from the same cold caches instead
/// of inheriting what the allocator before it left (Veil always follows
/// buddy_system_allocator, buddy-slab-allocator always follows Veil). Measured on this host,
/// the ratios are the same with and without it; it only removes the question.
const FLUSH_BYTES: usize = 64 << 20;

/// Whether to flush between samples (default on; `PEERS_FLUSH=0` turns it off).
fn flush_enabled() -> bool {
    std::env::var("PEERS_FLUSH").map_or(true, |v| v != "0")
}

/// Evict the caches by writing every line of `buf`.
fn flush_caches(buf: &mut [u8]) {
    for line in buf.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    black_box(&buf[..]);
}

/// Median ns per iteration of each allocator (veil, bsa, bsys) for each workload.
fn interleaved(perm: &[usize], ops: &[(usize, u8)]) -> Vec<(&'static str, [f64; 3])> {
    let (mut v, mut b, mut y) = (Veil::new(), Bsa::new(), Bsys::new());
    let mut flush = vec![0u8; FLUSH_BYTES];
    let mut out = Vec::new();
    let mut run = |name: &'static str, f: &mut dyn FnMut(usize) -> f64| {
        if !selected(name) {
            return;
        }
        let mut t = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds() {
            for (who, samples) in t.iter_mut().enumerate() {
                if flush_enabled() {
                    flush_caches(&mut flush);
                }
                samples.push(f(who));
            }
        }
        let stat: fn(&mut [f64]) -> f64 = if std::env::var_os("PEERS_MIN").is_some() {
            minimum
        } else {
            median
        };
        out.push((name, t.map(|mut s| stat(&mut s))));
    };
    const HOT: u64 = 200_000;
    run("hot_order0_pair", &mut |who| {
        let d = match who {
            0 => hot_sample(&mut v, 0, HOT),
            1 => hot_sample(&mut b, 0, HOT),
            _ => hot_sample(&mut y, 0, HOT),
        };
        d.as_nanos() as f64 / HOT as f64
    });
    let mut frames = vec![0usize; BATCH];
    run("random_free_1e5", &mut |who| {
        let d = match who {
            0 => random_free_sample(&mut v, perm, &mut frames),
            1 => random_free_sample(&mut b, perm, &mut frames),
            _ => random_free_sample(&mut y, perm, &mut frames),
        };
        d.as_nanos() as f64
    });
    run("order9_pair", &mut |who| {
        let d = match who {
            0 => hot_sample(&mut v, 9, HOT),
            1 => hot_sample(&mut b, 9, HOT),
            _ => hot_sample(&mut y, 9, HOT),
        };
        d.as_nanos() as f64 / HOT as f64
    });
    let mut slots: Vec<Option<(usize, u8)>> = vec![None; AGING_SLOTS];
    run("aging_mix_2e4", &mut |who| {
        const K: u32 = 4;
        let d: Duration = (0..K)
            .map(|_| match who {
                0 => aging_sample(&mut v, ops, &mut slots),
                1 => aging_sample(&mut b, ops, &mut slots),
                _ => aging_sample(&mut y, ops, &mut slots),
            })
            .sum();
        d.as_nanos() as f64 / K as f64
    });
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The smallest sample (`PEERS_MIN=1`: robust to preemption on a busy machine, for A/B runs).
fn minimum(v: &mut [f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

fn print_summary(rows: &[(&'static str, [f64; 3])]) {
    println!();
    println!(
        "== allocator peers: median time per iteration, {FRAMES} frames each, \
         {} interleaved rounds ==",
        rounds()
    );
    println!(
        "{:<17} {:>12} {:>22} {:>24} {:>10} {:>10}",
        "workload",
        "veil",
        "buddy-slab-allocator",
        "buddy_system_allocator",
        "veil/bsa",
        "bsys/veil"
    );
    for (w, [v, b, y]) in rows {
        println!(
            "{:<17} {:>12} {:>22} {:>24} {:>9.3}x {:>9.1}x",
            w,
            fmt_ns(*v),
            fmt_ns(*b),
            fmt_ns(*y),
            v / b,
            y / v
        );
    }
    println!("veil/bsa: Veil's time as a multiple of buddy-slab-allocator's (goal <= 1.0)");
    println!(
        "bsys/veil: how many times faster Veil is than buddy_system_allocator \
         (goal >= 5 on random_free)"
    );
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let perm = shuffled(BATCH, 42);
    let ops = aging_ops();
    // Workload by workload, the three allocators back to back, so that load changes on a
    // shared machine hit them alike.
    hot_order(&mut c, &mut Veil::new(), "hot_order0_pair", 0);
    hot_order(&mut c, &mut Bsa::new(), "hot_order0_pair", 0);
    hot_order(&mut c, &mut Bsys::new(), "hot_order0_pair", 0);
    random_free(&mut c, &mut Veil::new(), &perm);
    random_free(&mut c, &mut Bsa::new(), &perm);
    random_free(&mut c, &mut Bsys::new(), &perm);
    hot_order(&mut c, &mut Veil::new(), "order9_pair", 9);
    hot_order(&mut c, &mut Bsa::new(), "order9_pair", 9);
    hot_order(&mut c, &mut Bsys::new(), "order9_pair", 9);
    aging(&mut c, &mut Veil::new(), &ops);
    aging(&mut c, &mut Bsa::new(), &ops);
    aging(&mut c, &mut Bsys::new(), &ops);
    c.final_summary();
    let rows = interleaved(&perm, &ops);
    print_summary(&rows);
}
