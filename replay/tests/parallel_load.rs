//! The parallel loader (`trace::load_parallel`, what `veil replay` uses) against the sequential
//! reference (`trace::load_with_progress`): the same `Trace` (events, gfp table, cpus,
//! free_cpus, every statistic, malformed examples), the same error, and the same progress
//! calls, on the shared trace and on random, corrupted and hostile inputs.

use std::io::{self, Read};
use std::sync::Arc;

use proptest::prelude::*;
use replay::reader::{decoding, MAX_LINE};
use replay::trace::{
    load_parallel, load_parallel_scoped, load_with_progress, LoadOptions, Trace, TraceStats,
    GIVE_UP_BYTES, GIVE_UP_LINES,
};

/// What a load gave: the trace or the error's text, and the `lines` count at each progress call.
type Outcome = (Result<Trace, String>, Vec<(u64, u64, u64)>);

fn seen(s: &TraceStats) -> (u64, u64, u64) {
    (s.lines, s.alloc_events + s.free_events, s.malformed_lines)
}

fn reference<R: Read>(r: R, opts: LoadOptions) -> Outcome {
    let mut calls = Vec::new();
    let t = load_with_progress(io::BufReader::new(r), opts, &mut |s| calls.push(seen(s)));
    (t.map_err(|e| format!("{e:?} / {e}")), calls)
}

fn parallel<R: Read + Send + 'static>(r: R, opts: LoadOptions) -> Outcome {
    let mut calls = Vec::new();
    let t = load_parallel(r, opts, &mut |s| calls.push(seen(s)));
    (t.map_err(|e| format!("{e:?} / {e}")), calls)
}

fn parallel_scoped<R: Read + Send>(r: R, opts: LoadOptions) -> Outcome {
    let mut calls = Vec::new();
    let t = load_parallel_scoped(r, opts, &mut |s| calls.push(seen(s)));
    (t.map_err(|e| format!("{e:?} / {e}")), calls)
}

/// Both loaders on the same bytes, read through `reader` (made twice).
fn same<R: Read + Send + 'static>(mk: impl Fn() -> R, opts: LoadOptions) -> Outcome {
    let want = reference(mk(), opts);
    let got = parallel(mk(), opts);
    assert_outcome(&want, &got);
    want
}

fn assert_outcome(want: &Outcome, got: &Outcome) {
    match (&want.0, &got.0) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.stats, b.stats);
            assert_eq!(a.events, b.events);
            assert_eq!(a.cpus, b.cpus);
            assert_eq!(a.free_cpus, b.free_cpus);
            assert!(a.gfp == b.gfp, "gfp tables differ");
            assert!(a == b);
        }
        (a, b) => assert_eq!(
            a.as_ref().map(|t| t.stats.clone()),
            b.as_ref().map(|t| t.stats.clone())
        ),
    }
    assert_eq!(want.1, got.1, "progress calls differ");
}

/// A reader handing out at most `max` bytes per read, the sizes cycling through a pattern, and
/// failing after `fail_at` bytes if set.
struct Uneven {
    data: Arc<[u8]>,
    pos: usize,
    sizes: Vec<usize>,
    k: usize,
    fail_at: Option<usize>,
}

impl Read for Uneven {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.fail_at.is_some_and(|f| self.pos >= f) {
            return Err(io::Error::other("injected read error"));
        }
        let step = self.sizes[self.k % self.sizes.len()].max(1);
        self.k += 1;
        let mut n = step.min(buf.len()).min(self.data.len() - self.pos);
        if let Some(f) = self.fail_at {
            n = n.min(f - self.pos);
        }
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn shared_trace() -> Arc<[u8]> {
    let gz = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/kmem-trace-cargo-small.txt.gz"
    ))
    .expect("the shared trace");
    gz.into()
}

#[test]
fn shared_trace_plain_and_gzip() {
    let gz = shared_trace();
    let mut plain = Vec::new();
    replay::reader::from_reader(Box::new(&gz[..]))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let plain: Arc<[u8]> = plain.into();
    let p = Arc::clone(&plain);
    let (t, calls) = same(
        move || io::Cursor::new(Arc::clone(&p)),
        LoadOptions::default(),
    );
    let t = t.unwrap();
    assert!(
        t.stats.lines > 200_000 && calls.len() >= 3,
        "{}",
        t.stats.lines
    );
    // The scoped variant on the slice.
    let got = parallel_scoped(&plain[..], LoadOptions::default());
    assert_outcome(&(Ok(t), calls.clone()), &got);
    // gzip through the decoder, as `veil replay FILE.gz` reads it.
    let g = Arc::clone(&gz);
    let dec = move || decoding(Box::new(io::Cursor::new(Arc::clone(&g)))).unwrap();
    let want = reference(dec(), LoadOptions::default());
    assert_outcome(&want, &parallel(dec(), LoadOptions::default()));
    assert_eq!(want.0.unwrap().stats.lines, got.0.unwrap().stats.lines);
    // A truncated gzip file: the same gzip error at the same line.
    let cut: Arc<[u8]> = gz[..gz.len() / 2].into();
    let dec = move || decoding(Box::new(io::Cursor::new(Arc::clone(&cut)))).unwrap();
    let (e, _) = same(dec, LoadOptions::default());
    assert!(e.unwrap_err().contains("GzipError"));
}

const LINES: &[&str] = &[
    "           <...>-6607    [001] .....   408.542370: mm_page_alloc: page=000000006f764635 pfn=0x104e3c order=0 migratetype=0 gfp_flags=GFP_KERNEL_ACCOUNT|__GFP_ZERO|__GFP_COMP",
    "           <...>-6607    [001] .....   408.542371: mm_page_alloc: page=000000006f764635 pfn=0x104e40 order=2 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_COMP",
    "           <...>-6607    [001] .....   408.542447: mm_page_free: page=00000000d39cce89 pfn=0x104e3c order=0",
    "           <...>-6607    [003] ...2.   408.542447: mm_page_free_batched: page=00000000d39cce89 pfn=0x104e3c order=0",
    "           <...>-6607    [002] .....   408.542448: mm_page_free: page=00000000d39cce89 pfn=0x104e41 order=0",
    "  kworker/0:1-9 [000] ..... 5.0: sched_switch: prev_comm=a b: c",
    "t-1 [000] ..... 1.0: mm_page_alloc: page=(null) pfn=0xffffffffffffffff order=3 migratetype=0 gfp_flags=GFP_NOWAIT",
    "t-1 [1100] ..... 1.0: mm_page_alloc: page=x pfn=0x2000 order=1 migratetype=2 gfp_flags=__GFP_FUTURE|GFP_KERNEL",
    "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0xzz order=0",
    "CPU:1 [LOST 42 EVENTS]",
    "# tracer: nop",
    "",
    "   \r",
    "garbage",
    "t-1 [000] ..... 0.5: mm_page_free: page=x pfn=0x104e42 order=1",
];

/// A random trace: lines from `LINES` with random pfns, orders and timestamps, random bytes,
/// overlong lines, and random line ends.
fn arb_text() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        8 => (0..LINES.len(), 0u64..64, 0u8..4, 0u64..1000).prop_map(|(i, pfn, o, ts)| {
            LINES[i]
                .replace("0x104e", &format!("0x{:x}", 0x104e + pfn))
                .replace("order=0", &format!("order={o}"))
                .replace("408.542", &format!("{}.542", 400 + ts % 20))
                .into_bytes()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => (MAX_LINE - 2..MAX_LINE + 3, any::<u8>()).prop_map(|(n, b)| vec![if b == b'\n' { b'x' } else { b }; n]),
    ];
    (
        proptest::collection::vec((line, 0u8..4), 0..400),
        any::<bool>(),
    )
        .prop_map(|(lines, last_nl)| {
            let mut out = Vec::new();
            for (l, end) in lines {
                out.extend_from_slice(&l);
                match end {
                    0 => out.extend_from_slice(b"\r\n"),
                    _ => out.push(b'\n'),
                }
            }
            if !last_nl && out.last() == Some(&b'\n') {
                out.pop();
            }
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random traces through readers of uneven read sizes (one byte at a time up to whole
    /// buffers), strict or not, keeping 0-6 malformed examples, with and without a read error.
    #[test]
    fn random_traces_load_the_same(
        text in arb_text(),
        sizes in proptest::collection::vec(prop_oneof![1usize..64, 1usize..400_000], 1..5),
        strict in any::<bool>(),
        keep in 0usize..7,
        fail in proptest::option::of(0usize..100_000),
    ) {
        let data: Arc<[u8]> = text.into();
        let fail_at = fail.map(|f| f % (data.len() + 1));
        let opts = LoadOptions { strict, keep_malformed: keep };
        let mk = || Uneven { data: Arc::clone(&data), pos: 0, sizes: sizes.clone(), k: 0, fail_at };
        let _ = same(mk, opts);
    }
}

/// Long random traces (about 25,000 lines, several 320 KiB chunks, so both threads parse and
/// the queue fills): the same as the reference, strict or not.
#[test]
fn long_random_traces_load_the_same() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(6));
    let strategy = (
        proptest::collection::vec(
            (0..LINES.len(), 0u64..4096, 0u8..4, 0u64..1000, 0u16..400),
            20_000..30_000,
        ),
        any::<bool>(),
        1usize..5,
    );
    runner
        .run(&strategy, |(lines, strict, keep)| {
            let mut text = Vec::new();
            for (i, pfn, o, ts, junk) in lines {
                if junk == 0 {
                    text.extend_from_slice(b"\x00garbage\xff");
                }
                let l = LINES[i]
                    .replace("0x104e", &format!("0x{:x}", 0x104e + pfn))
                    .replace("order=0", &format!("order={o}"))
                    .replace("408.542", &format!("{}.542", 400 + ts % 20));
                text.extend_from_slice(l.as_bytes());
                text.push(b'\n');
            }
            let data: Arc<[u8]> = text.into();
            let opts = LoadOptions {
                strict,
                keep_malformed: keep,
            };
            let d = Arc::clone(&data);
            let _ = same(move || io::Cursor::new(Arc::clone(&d)), opts);
            Ok(())
        })
        .unwrap();
}

/// Lines of one repeated byte run longer than two buffers, in every position of a read.
#[test]
fn overlong_lines_and_no_newline_at_all() {
    for (len, tail) in [
        (MAX_LINE, "\nok\n"),
        (MAX_LINE + 1, "\nok"),
        (5 * 256 * 1024 + 17, "\n"),
        (3 * 256 * 1024, ""),
        (700_000, "x"),
    ] {
        let mut t = vec![b'y'; len];
        t.extend_from_slice(tail.as_bytes());
        t.extend_from_slice(LINES[0].as_bytes());
        let data: Arc<[u8]> = t.into();
        for sizes in [vec![1 << 20], vec![65_536, 3], vec![100_000]] {
            let d = Arc::clone(&data);
            let _ = same(
                move || Uneven {
                    data: Arc::clone(&d),
                    pos: 0,
                    sizes: sizes.clone(),
                    k: 0,
                    fail_at: None,
                },
                LoadOptions::default(),
            );
        }
    }
}

/// The give-up rule: by lines, and by bytes inside one endless line.
#[test]
fn give_up_the_same_way() {
    let mut t = Vec::new();
    t.extend_from_slice(LINES[0].as_bytes());
    t.push(b'\n');
    for _ in 0..GIVE_UP_LINES + 10 {
        t.extend_from_slice(b"x\n");
    }
    let data: Arc<[u8]> = t.into();
    let (e, calls) = same(
        move || io::Cursor::new(Arc::clone(&data)),
        LoadOptions::default(),
    );
    assert!(e.unwrap_err().contains("gave up in line"), "{calls:?}");
    let (e, calls) = same(
        || io::repeat(b'z').take(GIVE_UP_BYTES + (4 << 20)),
        LoadOptions::default(),
    );
    assert!(e.unwrap_err().contains("gave up in line 1"));
    assert!(
        calls.len() > 700,
        "a progress call per buffer skipped: {}",
        calls.len()
    );
}
