//! Veil's allocator against `buddy-slab-allocator` 0.6 (its page-level `BuddyAllocator`) and
//! `buddy_system_allocator` 0.13 (`FrameAllocator<11>`, max order 10 like ours), in the same
//! run, on the same frame count, in three passes:
//!
//! 1. Criterion, **inlined** adapters, fresh allocators (the historical setup: Veil's fast
//!    path is inlined into the loop, and buddy-slab-allocator starts with all frames as one
//!    order-17 block, which it splits 17 levels on every hot pair);
//! 2. the **fair** interleaved pass: every contender (Veil's `BuddyAllocator`, Veil's `Zone`
//!    on CPU 0 and both peers) called through the same out-of-line adapter ([`Fair`]), each
//!    started warm (one page allocated first and kept), one sample of each in turn with the
//!    order of the contenders rotated every round;
//! 3. **threads**: Veil's `Zone` with 1 and 2 threads (one CPU id each), throughput of hot
//!    order-0 pairs and of random-order frees, then hot pairs in paired rounds each judged
//!    by its own control (for a shared host); and the unmapped free path against a mapped
//!    free.
//!
//! Run: `cargo bench -p allocator` (add `-- --quick` for a faster, noisier run;
//! `cargo bench -p allocator -- none` skips pass 1).

#[path = "common/control.rs"]
mod control;
use allocator::{BuddyAllocator, Config, Gfp, NullStage2, Zone};
use control::control_throughput;
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

/// No allocator at all: hands out consecutive frames and forgets frees, through the same
/// adapter. Its time is the harness's own share of every contender's (the loop, the
/// permutation, `frames[i]`, the call), reported beside the others so a ratio can be read
/// with and without it.
struct Harness(usize);
impl PageAlloc for Harness {
    const NAME: &'static str = "harness alone";
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> Option<usize> {
        let f = self.0;
        self.0 = self.0.wrapping_add(1 << order);
        Some(black_box(f))
    }
    #[inline(always)]
    fn free(&mut self, frame: usize, order: u8) {
        black_box((frame, order));
    }
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

/// Veil's allocator for several CPUs, used on CPU 0.
struct VeilZone(Zone<NullStage2>);
impl VeilZone {
    fn new() -> Self {
        VeilZone(Zone::new(1 << 18, FRAMES as u64, NullStage2, Config::default(), 2).unwrap())
    }
}
impl PageAlloc for VeilZone {
    const NAME: &'static str = "veil-zone";
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> Option<usize> {
        self.0
            .alloc_pages(0, Gfp::empty(), order)
            .ok()
            .map(|a| a.pfn as usize)
    }
    #[inline(always)]
    fn free(&mut self, frame: usize, order: u8) {
        self.0.free_pages(0, frame as u64, order).unwrap();
    }
    fn settle(&mut self) {
        self.0.drain_all();
    }
}

/// The fair adapter: the same out-of-line call layer around every contender's alloc and
/// free (one `#[inline(never)]` function per operation and contender), so no contender's
/// fast path is inlined into the workload loop. Created warm: one page is allocated first
/// and kept, so no allocator pays a first-split from one huge block on every hot pair.
struct Fair<A>(A);
impl<A: PageAlloc> Fair<A> {
    fn warm(mut a: A) -> Self {
        black_box(a.alloc(0).unwrap());
        Fair(a)
    }
}
#[inline(never)]
fn fair_alloc<A: PageAlloc>(a: &mut A, order: u8) -> Option<usize> {
    a.alloc(order)
}
#[inline(never)]
fn fair_free<A: PageAlloc>(a: &mut A, frame: usize, order: u8) {
    a.free(frame, order)
}
impl<A: PageAlloc> PageAlloc for Fair<A> {
    const NAME: &'static str = A::NAME;
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> Option<usize> {
        fair_alloc(&mut self.0, order)
    }
    #[inline(always)]
    fn free(&mut self, frame: usize, order: u8) {
        fair_free(&mut self.0, frame, order)
    }
    fn settle(&mut self) {
        self.0.settle()
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
#[inline(never)]
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
    free_phase(a, perm, frames);
    t.elapsed()
}

/// The timed part of [`random_free_sample`] (its own function so that
/// `callgrind --toggle-collect='*free_phase*'` counts only it).
#[inline(never)]
fn free_phase<A: PageAlloc>(a: &mut A, perm: &[usize], frames: &[usize]) {
    for &i in perm {
        a.free(black_box(frames[i]), 0);
    }
    a.settle();
}

/// One round of the aging mix, ending with everything freed.
#[inline(never)]
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

/// Workloads of the fair pass.
const WORKLOADS: [&str; 4] = [
    "hot_order0_pair",
    "random_free_1e5",
    "order9_pair",
    "aging_mix_2e4",
];
/// Hot pairs per sample.
const HOT: u64 = 200_000;
/// Hot pairs per thread in the threads pass (long enough, ≈ 50 ms, that thread start-up
/// skew on a busy host does not serialise the threads).
const THREAD_HOT: u64 = 2_000_000;
/// Aging rounds per sample.
const AGING_K: u32 = 4;

/// Inputs shared by every sample.
struct Inputs {
    perm: Vec<usize>,
    ops: Vec<(usize, u8)>,
}

/// One contender of the fair pass, behind a `dyn` boundary per *sample* (not per operation).
trait Contender {
    fn name(&self) -> &'static str;
    /// ns per iteration of workload `w` (an index into [`WORKLOADS`]).
    fn sample(&mut self, w: usize, inp: &Inputs) -> f64;
}

struct Slot<A> {
    a: Fair<A>,
    frames: Vec<usize>,
    slots: Vec<Option<(usize, u8)>>,
}
impl<A: PageAlloc> Contender for Slot<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }
    fn sample(&mut self, w: usize, inp: &Inputs) -> f64 {
        match w {
            0 => hot_sample(&mut self.a, 0, HOT).as_nanos() as f64 / HOT as f64,
            1 => random_free_sample(&mut self.a, &inp.perm, &mut self.frames).as_nanos() as f64,
            2 => hot_sample(&mut self.a, 9, HOT).as_nanos() as f64 / HOT as f64,
            _ => {
                let d: Duration = (0..AGING_K)
                    .map(|_| aging_sample(&mut self.a, &inp.ops, &mut self.slots))
                    .sum();
                d.as_nanos() as f64 / AGING_K as f64
            }
        }
    }
}
/// Operations per timed chunk in [`chunked_pass`].
const CHUNK: usize = 1000;

impl<A: PageAlloc> Slot<A> {
    /// One round of random-order frees (1) or aging (3) in chunks of [`CHUNK`] operations,
    /// each chunk timed on its own; `mins[k]` keeps chunk `k`'s fastest time so far.
    fn chunked(&mut self, w: usize, inp: &Inputs, mins: &mut Vec<f64>) {
        let mut k = 0;
        let mut keep = |k: &mut usize, t: Instant| {
            let ns = t.elapsed().as_nanos() as f64;
            if mins.len() <= *k {
                mins.push(f64::INFINITY);
            }
            mins[*k] = mins[*k].min(ns);
            *k += 1;
        };
        let a = &mut self.a;
        if w == 1 {
            for f in self.frames.iter_mut() {
                *f = a.alloc(0).unwrap();
            }
            for c in inp.perm.chunks(CHUNK) {
                let t = Instant::now();
                for &i in c {
                    a.free(black_box(self.frames[i]), 0);
                }
                keep(&mut k, t);
            }
            let t = Instant::now();
            a.settle();
            keep(&mut k, t);
        } else {
            for c in inp.ops.chunks(CHUNK) {
                let t = Instant::now();
                for &(slot, order) in c {
                    if let Some((f, o)) = self.slots[slot].take() {
                        a.free(f, o);
                    }
                    self.slots[slot] = a.alloc(order).map(|f| (f, order));
                }
                keep(&mut k, t);
            }
            let t = Instant::now();
            for s in self.slots.iter_mut() {
                if let Some((f, o)) = s.take() {
                    a.free(f, o);
                }
            }
            keep(&mut k, t);
        }
    }
}

/// `PEERS_CHUNKED=1`: for a busy host, where whole samples of milliseconds are rarely
/// left alone by the scheduler. The random-order free (workload 1) and the aging mix (3)
/// are timed in chunks of [`CHUNK`] operations (tens of microseconds each) through the
/// fair adapter, rounds rotated as in the fair pass; each chunk's minimum over the rounds is
/// kept and the minima are summed, per contender (veil, bsa; the other two are slower by
/// far). A robust A/B figure, lower than a median of whole samples.
fn chunked_pass(inp: &Inputs) {
    let mut veil = Slot {
        a: Fair::warm(Veil::new()),
        frames: vec![0; BATCH],
        slots: vec![None; AGING_SLOTS],
    };
    let mut bsa = Slot {
        a: Fair::warm(Bsa::new()),
        frames: vec![0; BATCH],
        slots: vec![None; AGING_SLOTS],
    };
    let mut flush = vec![0u8; FLUSH_BYTES];
    for w in [1usize, 3] {
        if !selected(WORKLOADS[w]) {
            continue;
        }
        let (mut mv, mut mb) = (Vec::new(), Vec::new());
        for round in 0..rounds() {
            flush_caches(&mut flush);
            if round % 2 == 0 {
                veil.chunked(w, inp, &mut mv);
                bsa.chunked(w, inp, &mut mb);
            } else {
                bsa.chunked(w, inp, &mut mb);
                veil.chunked(w, inp, &mut mv);
            }
        }
        let (tv, tb): (f64, f64) = (mv.iter().sum(), mb.iter().sum());
        println!(
            "chunked {:<17} veil {:>12} bsa {:>12} veil/bsa {:.3}x ({} chunks, {} rounds)",
            WORKLOADS[w],
            fmt_ns(tv),
            fmt_ns(tb),
            tv / tb,
            mv.len(),
            rounds()
        );
    }
}

fn slot<A: PageAlloc + 'static>(a: A) -> Box<dyn Contender> {
    Box::new(Slot {
        a: Fair::warm(a),
        frames: vec![0; BATCH],
        slots: vec![None; AGING_SLOTS],
    })
}

/// The contenders of the fair pass, fresh and warm: veil, veil-zone, bsa, bsys, and the
/// harness alone.
fn contenders() -> Vec<Box<dyn Contender>> {
    vec![
        slot(Veil::new()),
        slot(VeilZone::new()),
        slot(Bsa::new()),
        slot(Bsys::new()),
        slot(Harness(1 << 18)),
    ]
}

/// Index of [`Harness`] in [`contenders`].
const HARNESS: usize = 4;

/// One workload of the fair pass: the median (or minimum) ns per iteration of each contender,
/// and the median over rounds of each round's own veil / bsa and veil-zone / bsa ratios (robust
/// to a host that speeds up or slows down between rounds).
struct FairRow {
    name: &'static str,
    ns: Vec<f64>,
    paired: [f64; 2],
}

/// The fair pass: per workload, `rounds()` rounds of one sample of every contender, the
/// starting contender rotated each round.
fn fair_pass(inp: &Inputs) -> Vec<FairRow> {
    let mut cs = contenders();
    let mut flush = vec![0u8; FLUSH_BYTES];
    let mut out = Vec::new();
    for (w, name) in WORKLOADS.iter().enumerate() {
        if !selected(name) {
            continue;
        }
        let mut t: Vec<Vec<f64>> = vec![Vec::new(); cs.len()];
        for round in 0..rounds() {
            for k in 0..cs.len() {
                let who = (round + k) % cs.len();
                if flush_enabled() {
                    flush_caches(&mut flush);
                }
                t[who].push(cs[who].sample(w, inp));
            }
        }
        let ratio = |c: usize| -> f64 {
            let mut r: Vec<f64> = t[c].iter().zip(&t[2]).map(|(a, b)| a / b).collect();
            median(&mut r)
        };
        let paired = [ratio(0), ratio(1)];
        out.push(FairRow {
            name,
            ns: t.iter_mut().map(|s| stat(s)).collect(),
            paired,
        });
    }
    out
}

/// `PEERS_IR=<workload index>:<contender index>`: run only that workload on that contender,
/// `rounds()` samples (workload 4: the free-path comparison, contender 0 mapped, 1 unmapped), for `valgrind --tool=callgrind --toggle-collect=...` (see the README).
fn ir_mode(inp: &Inputs) -> bool {
    let Ok(v) = std::env::var("PEERS_IR") else {
        return false;
    };
    let (w, c) = v.split_once(':').expect("PEERS_IR=<workload>:<contender>");
    let (w, c): (usize, usize) = (w.parse().unwrap(), c.parse().unwrap());
    if w == 4 {
        // The free-path comparison: BuddyAllocator mapped (0), unmapped (1); Zone mapped
        // (2), unmapped (3).
        for _ in 0..rounds() {
            black_box(match c {
                0 | 1 => free_cost(c == 1, &inp.perm),
                _ => zone_free_cost(c == 3, &inp.perm),
            });
        }
        eprintln!("PEERS_IR: {} x free of {BATCH} pages, case {c}", rounds());
        return true;
    }
    let mut cs = contenders();
    for _ in 0..rounds() {
        black_box(cs[c].sample(w, inp));
    }
    eprintln!(
        "PEERS_IR: {} x {} on {}",
        rounds(),
        WORKLOADS[w],
        cs[c].name()
    );
    true
}

/// The statistic reported: the median, or with `PEERS_MIN=1` the minimum.
fn stat(v: &mut [f64]) -> f64 {
    if std::env::var_os("PEERS_MIN").is_some() {
        minimum(v)
    } else {
        median(v)
    }
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

fn print_fair(rows: &[FairRow]) {
    let names: Vec<&str> = contenders().iter().map(|c| c.name()).collect();
    println!();
    println!(
        "== fair setup: same out-of-line adapter, warm start, rotated order; {} time per \
         iteration, {FRAMES} frames each, {} rounds ==",
        if std::env::var_os("PEERS_MIN").is_some() {
            "minimum"
        } else {
            "median"
        },
        rounds()
    );
    print!("{:<17}", "workload");
    for n in &names {
        print!(" {n:>22}");
    }
    println!(
        " {:>10} {:>10} {:>14} {:>14}",
        "veil/bsa", "zone/bsa", "veil/bsa pair", "zone/bsa pair"
    );
    for row in rows {
        let t = &row.ns;
        print!("{:<17}", row.name);
        for x in t {
            print!(" {:>22}", fmt_ns(*x));
        }
        println!(
            " {:>9.3}x {:>9.3}x {:>13.3}x {:>13.3}x",
            t[0] / t[2],
            t[1] / t[2],
            row.paired[0],
            row.paired[1]
        );
    }
    println!(
        "veil/bsa, zone/bsa: Veil's time as a multiple of buddy-slab-allocator's (goal <= 0.8), \
         from the two medians; 'pair': the median of each round's own ratio"
    );
    for row in rows {
        let t = &row.ns;
        let h = t[HARNESS];
        println!(
            "{:<17} harness alone {} = {:.0}% of bsa's time; without it veil/bsa {:.3}x",
            row.name,
            fmt_ns(h),
            100.0 * h / t[2],
            (t[0] - h) / (t[2] - h)
        );
    }
}

/// Throughput (operations per second, all threads together) of `threads` threads on one
/// zone, each on its own CPU id: `hot` pairs each (`random` false) or the random-order free
/// of `BATCH / 2` pages each, allocated untimed (`random` true).
fn zone_throughput(threads: usize, random: bool, perm: &[usize]) -> f64 {
    let z = Zone::new(1 << 18, FRAMES as u64, NullStage2, Config::default(), 2).unwrap();
    black_box(z.alloc_pages(0, Gfp::empty(), 0).unwrap());
    let half = BATCH / 2;
    let frames: Vec<Vec<u64>> = (0..threads)
        .map(|cpu| {
            if !random {
                return Vec::new();
            }
            (0..half)
                .map(|_| z.alloc_pages(cpu, Gfp::empty(), 0).unwrap().pfn)
                .collect()
        })
        .collect();
    let start = std::sync::Barrier::new(threads + 1);
    let ops = if random { half as u64 } else { THREAD_HOT };
    // Each thread times itself from the barrier; the span is first start to last end.
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let hs: Vec<_> = frames
            .iter()
            .enumerate()
            .map(|(cpu, mine)| {
                let (z, start) = (&z, &start);
                s.spawn(move || {
                    start.wait();
                    let t0 = Instant::now();
                    if random {
                        for &i in perm.iter().filter(|&&i| i < half) {
                            z.free_pages(cpu, black_box(mine[i]), 0).unwrap();
                        }
                    } else {
                        for _ in 0..THREAD_HOT {
                            let a = z.alloc_pages(cpu, Gfp::empty(), black_box(0)).unwrap();
                            z.free_pages(cpu, black_box(a.pfn), 0).unwrap();
                        }
                    }
                    (t0, Instant::now())
                })
            })
            .collect();
        start.wait();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    let elapsed = last - first;
    (threads as u64 * ops) as f64 / elapsed.as_secs_f64()
}

/// A stage 2 whose `zero` is a real, out-of-line call (as in the VMM) that only counts.
struct CallStage2(u64);
impl allocator::Stage2 for CallStage2 {
    fn unmap(&mut self, _: u64, _: u64) -> Result<(), allocator::Stage2Error> {
        Ok(())
    }
    fn map(&mut self, _: u64, _: u64) -> Result<(), allocator::Stage2Error> {
        Ok(())
    }
    #[inline(never)]
    fn zero(&mut self, _: u64, n: u64) -> Result<(), allocator::Stage2Error> {
        self.0 = black_box(self.0 + n);
        Ok(())
    }
}

/// ns per free of `BATCH` order-0 pages in random order (then a drain), mapped or unmapped
/// (init_on_free on), through `BuddyAllocator` with an out-of-line zeroing stage 2 whose
/// `zero_batch` is the default (one `zero` per range).
fn free_cost(unmapped: bool, perm: &[usize]) -> f64 {
    let mut a = BuddyAllocator::new(1 << 18, FRAMES as u64, CallStage2(0), Config::default());
    let gfp = if unmapped {
        Gfp::UNMAPPED
    } else {
        Gfp::empty()
    };
    black_box(a.alloc_pages(gfp, 0).unwrap());
    let frames: Vec<u64> = (0..BATCH)
        .map(|_| a.alloc_pages(gfp, 0).unwrap().pfn)
        .collect();
    let t = Instant::now();
    free_cost_phase(&mut a, perm, &frames);
    t.elapsed().as_nanos() as f64 / BATCH as f64
}
/// The timed part of [`free_cost`] (`--toggle-collect='*free_cost_phase*'`).
#[inline(never)]
fn free_cost_phase(a: &mut BuddyAllocator<CallStage2>, perm: &[usize], frames: &[u64]) {
    for &i in perm {
        fair_free_call(a, frames[i]);
    }
    a.drain_pcp();
}
/// [`free_cost`] through a one-CPU [`Zone`] (freed unmapped pages zeroed in batches).
fn zone_free_cost(unmapped: bool, perm: &[usize]) -> f64 {
    let z = Zone::new(1 << 18, FRAMES as u64, CallStage2(0), Config::default(), 1).unwrap();
    let gfp = if unmapped {
        Gfp::UNMAPPED
    } else {
        Gfp::empty()
    };
    black_box(z.alloc_pages(0, gfp, 0).unwrap());
    let frames: Vec<u64> = (0..BATCH)
        .map(|_| z.alloc_pages(0, gfp, 0).unwrap().pfn)
        .collect();
    let t = Instant::now();
    zone_free_cost_phase(&z, perm, &frames);
    t.elapsed().as_nanos() as f64 / BATCH as f64
}
/// The timed part of [`zone_free_cost`] (`--toggle-collect='*free_cost_phase*'`).
#[inline(never)]
fn zone_free_cost_phase(z: &Zone<CallStage2>, perm: &[usize], frames: &[u64]) {
    for &i in perm {
        zone_free_call(z, frames[i]);
    }
    z.drain_all();
}
#[inline(never)]
fn zone_free_call(z: &Zone<CallStage2>, pfn: u64) {
    z.free_pages(0, pfn, 0).unwrap();
}

/// The same out-of-line call layer as [`fair_free`].
#[inline(never)]
fn fair_free_call(a: &mut BuddyAllocator<CallStage2>, pfn: u64) {
    a.free_pages(pfn, 0).unwrap();
}

/// Least same-round control ratio for a round of [`paired_hot_rounds`] to be judged.
const JUDGED_CONTROL: f64 = 1.9;

/// The hot-pair scaling on a shared host: `3 * rounds()` rounds, each timing 1 thread,
/// 2 threads and the shared-nothing control (1 and 2 threads) back to back, so every
/// round has its own control. Only rounds whose control reached [`JUDGED_CONTROL`]× (both
/// cores free for the round's control, so likely for the round) are judged; their median
/// 2-thread/1-thread ratio, the spread, and how many rounds qualified are printed.
fn paired_hot_rounds(perm: &[usize]) {
    let n = 3 * rounds();
    let mut judged: Vec<f64> = Vec::new();
    for _ in 0..n {
        let one = zone_throughput(1, false, perm);
        let two = zone_throughput(2, false, perm);
        let control = control_throughput(2) / control_throughput(1);
        if control >= JUDGED_CONTROL {
            judged.push(two / one);
        }
    }
    if judged.is_empty() {
        println!(
            "hot_order0_pair paired: no round of {n} had its control >= {JUDGED_CONTROL}x \
             (the host is busy): not judged"
        );
        return;
    }
    judged.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let below = judged.iter().filter(|&&r| r < 1.8).count();
    println!(
        "hot_order0_pair paired: {} of {n} rounds with their own control >= {JUDGED_CONTROL}x: \
         2 threads / 1 thread median {:.2}x, min {:.2}x, max {:.2}x, {below} below 1.8x",
        judged.len(),
        median(&mut judged.clone()),
        judged[0],
        judged[judged.len() - 1]
    );
}

/// Pass 3: 1 vs 2 threads, and the unmapped free path.
fn threads_pass(perm: &[usize]) {
    if !selected("threads") {
        return;
    }
    println!();
    println!(
        "== Zone, 1 vs 2 threads (one CPU id each), {} rounds; goal: 2 threads >= 1.8x on hot pairs; \
         the control shows what 2 threads get on this host right now ==",
        rounds()
    );
    for (name, w) in [
        ("hot_order0_pair", 0),
        ("random_free_5e4_each", 1),
        ("control (no sharing)", 2),
    ] {
        let f = |threads| match w {
            2 => control_throughput(threads),
            _ => zone_throughput(threads, w == 1, perm),
        };
        let mut one: Vec<f64> = (0..rounds()).map(|_| f(1)).collect();
        let mut two: Vec<f64> = (0..rounds()).map(|_| f(2)).collect();
        let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (b1, b2) = (best(&one), best(&two));
        let (o, t) = (median(&mut one), median(&mut two));
        println!(
            "{name:<22} median: 1 thread {:>7.2} Mop/s, 2 threads {:>7.2} Mop/s = {:.2}x; \
             best: {:>7.2} / {:>7.2} Mop/s = {:.2}x",
            o / 1e6,
            t / 1e6,
            t / o,
            b1 / 1e6,
            b2 / 1e6,
            b2 / b1
        );
    }
    paired_hot_rounds(perm);
    for (name, f) in [
        ("BuddyAllocator", free_cost as fn(bool, &[usize]) -> f64),
        ("Zone (1 cpu)", zone_free_cost),
    ] {
        let mut m: Vec<f64> = Vec::new();
        let mut u: Vec<f64> = Vec::new();
        for _ in 0..rounds() {
            m.push(f(false, perm));
            u.push(f(true, perm));
        }
        let (m, u) = (stat(&mut m), stat(&mut u));
        println!(
            "{name:<15} random-order free of {BATCH} pages: unmapped (init_on_free) {u:.1} ns vs \
             mapped {m:.1} ns per page: {:.2}x (goal <= 1.1)",
            u / m
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let inp = Inputs {
        perm: shuffled(BATCH, 42),
        ops: aging_ops(),
    };
    if ir_mode(&inp) {
        return;
    }
    if std::env::var_os("PEERS_CHUNKED").is_some() {
        chunked_pass(&inp);
        return;
    }
    let (perm, ops) = (&inp.perm, &inp.ops);
    // Workload by workload, the three allocators back to back, so that load changes on a
    // shared machine hit them alike.
    hot_order(&mut c, &mut Veil::new(), "hot_order0_pair", 0);
    hot_order(&mut c, &mut Bsa::new(), "hot_order0_pair", 0);
    hot_order(&mut c, &mut Bsys::new(), "hot_order0_pair", 0);
    random_free(&mut c, &mut Veil::new(), perm);
    random_free(&mut c, &mut Bsa::new(), perm);
    random_free(&mut c, &mut Bsys::new(), perm);
    hot_order(&mut c, &mut Veil::new(), "order9_pair", 9);
    hot_order(&mut c, &mut Bsa::new(), "order9_pair", 9);
    hot_order(&mut c, &mut Bsys::new(), "order9_pair", 9);
    aging(&mut c, &mut Veil::new(), ops);
    aging(&mut c, &mut Bsa::new(), ops);
    aging(&mut c, &mut Bsys::new(), ops);
    c.final_summary();
    let rows = fair_pass(&inp);
    print_fair(&rows);
    threads_pass(&inp.perm);
}
