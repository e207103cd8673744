//! Untrusted input never panics the replay: random and mutated trace text goes through the whole
//! pipeline (reader, parser, loader, classification, every policy), malformed lines are counted
//! with their line numbers, `--strict` makes them fatal, and truncated or corrupt gzip input is
//! an error, never a silent success.

use std::error::Error;
use std::io::Write;

mod common;

use common::assert_accounted;
use flate2::write::GzEncoder;
use proptest::prelude::*;
use replay::classify::{classify, Rules};
use replay::cli::{run_model, Loaded, ReplayArgs};
use replay::reader::from_reader;
use replay::trace::{load, LoadOptions, Trace, TraceError};
use replay::PolicyKind;

/// Interesting pfn values: small, around pageblock edges, huge, and the kernel's "no page".
fn pfn() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4096,
        Just(511),
        Just(512),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(u64::MAX - 1024),
        Just(1 << 40),
        Just((64 << 30) / 4096),
        any::<u64>(),
    ]
}

fn gfp() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("GFP_KERNEL"),
        Just("GFP_KERNEL_ACCOUNT"),
        Just("GFP_HIGHUSER_MOVABLE|__GFP_COMP"),
        Just("GFP_NOWAIT|__GFP_ACCOUNT"),
        Just("GFP_ATOMIC"),
        Just("__GFP_UNKNOWN_FLAG|GFP_KERNEL"),
        Just("0x400dc0"),
        Just(""),
    ]
}

/// One trace line: mostly well formed events, plus comments, lost markers and junk.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (pfn(), 0u8..12, 0u8..6, gfp(), 0u32..4).prop_map(|(p, o, mt, g, cpu)| format!(
            "  task-1 [{cpu:03}] ..... 1.{cpu}: mm_page_alloc: page=x pfn={p:#x} order={o} migratetype={mt} gfp_flags={g}"
        )),
        5 => (pfn(), 0u8..12, 0u32..4).prop_map(|(p, o, cpu)| format!(
            "  task-1 [{cpu:03}] ..... 2.0: mm_page_free: page=x pfn={p:#x} order={o}"
        )),
        2 => pfn().prop_map(|p| format!(
            "  task-1 [000] ...2. 3.0: mm_page_free_batched: page=x pfn={p}"
        )),
        1 => Just("CPU:1 [LOST 99999999999999999999 EVENTS]".to_string()),
        1 => Just("CPU:1 [LOST 18446744073709551615 EVENTS]".to_string()),
        1 => Just("# tracer: nop".to_string()),
        1 => Just("x-1 [000] ..... 1.0: mm_page_alloc: page=(null) pfn=-1 order=0 migratetype=0 gfp_flags=GFP_KERNEL".to_string()),
        1 => proptest::collection::vec(any::<u8>(), 0..80)
            .prop_map(|b| String::from_utf8_lossy(&b).replace('\n', " ")),
    ]
}

fn args(extra: &[&str]) -> ReplayArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }
    let mut v = vec!["x", "-", "-q"];
    v.extend_from_slice(extra);
    Cli::try_parse_from(v).unwrap().args
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// A random trace goes through loading, classification and every policy without a panic;
    /// a policy whose memory would be too large is an error, not a crash.
    #[test]
    fn random_traces_replay_without_panic(
        lines in proptest::collection::vec(line(), 0..60),
        fraction in prop_oneof![Just(None), (0.0f64..=1.0).prop_map(Some)],
        mem in prop_oneof![Just(None), Just(Some("4M")), Just(Some("8M"))],
    ) {
        let text = lines.join("\n");
        let mut trace = load(text.as_bytes(), LoadOptions::default()).unwrap();
        assert_accounted(&trace);
        for m in &trace.stats.malformed_examples {
            prop_assert!(m.line >= 1 && m.line <= lines.len() as u64);
        }
        let rules = Rules { fraction, seed: 3, ..Rules::default() };
        let classification = classify(&mut trace, &rules).unwrap();
        let mut extra = vec![];
        if let Some(m) = mem {
            extra.extend(["--mem", m]);
        }
        let a = args(&extra);
        let l = Loaded { trace, classification };
        for kind in PolicyKind::ALL {
            let mut a = a.clone();
            a.policy = vec![kind];
            match run_model(&a, &l) {
                Ok(r) => {
                    prop_assert_eq!(r.len(), 1);
                    let r = &r[0];
                    prop_assert!(r.allocs <= l.trace.stats.allocs);
                    prop_assert!(r.intact_blocks_end <= r.blocks);
                    prop_assert!(r.layout.nr_pages <= replay::policy::MAX_MANAGED_PAGES);
                    prop_assert_eq!(r.free_errors, 0);
                }
                Err(replay::cli::ReplayError::TooLarge { .. }) => {
                    prop_assert_eq!(kind, PolicyKind::LinuxPlacement);
                }
                Err(e) => prop_assert!(false, "{kind}: {e}"),
            }
        }
    }

    /// Under --strict the first malformed line is fatal and names its line number; otherwise
    /// it is counted with the same number.
    #[test]
    fn strict_names_the_first_malformed_line(lines in proptest::collection::vec(line(), 1..40)) {
        let text = lines.join("\n");
        let lax = load(text.as_bytes(), LoadOptions::default()).unwrap();
        let strict = load(text.as_bytes(), LoadOptions { strict: true, ..LoadOptions::default() });
        match (lax.stats.malformed_examples.first(), strict) {
            (None, Ok(t)) => prop_assert_eq!(t.stats, lax.stats),
            (Some(m), Err(TraceError::Malformed { line, .. })) => prop_assert_eq!(line, m.line),
            (m, s) => prop_assert!(false, "lax {m:?} vs strict {s:?}"),
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn load_bytes(b: Vec<u8>, strict: bool) -> Result<Trace, TraceError> {
    let r = from_reader(Box::new(std::io::Cursor::new(b))).unwrap();
    load(
        r,
        LoadOptions {
            strict,
            ..LoadOptions::default()
        },
    )
}

fn sample_text() -> String {
    let mut s = String::new();
    for i in 0..2000u64 {
        s.push_str(&format!(
            "  task-1 [000] ..... 1.{i:06}: mm_page_alloc: page=x pfn={:#x} order=0 migratetype=0 gfp_flags=GFP_KERNEL_ACCOUNT\n",
            0x1000 + i
        ));
    }
    s
}

/// A gzip file cut anywhere (after its header) is an error that says the input is truncated or
/// corrupt gzip, never a silent success with fewer events.
#[test]
fn truncated_gzip_is_an_error() {
    let gz = gzip(sample_text().as_bytes());
    assert_eq!(load_bytes(gz.clone(), false).unwrap().stats.allocs, 2000);
    for cut in (2..gz.len()).step_by(gz.len() / 40).chain([gz.len() - 1]) {
        let e = load_bytes(gz[..cut].to_vec(), false)
            .expect_err(&format!("cut at {cut} of {}", gz.len()));
        let msg = chain(&e);
        assert!(msg.contains("gzip"), "cut at {cut}: {msg}");
    }
}

/// Flipped bytes inside the compressed data or the checksum are an error.
#[test]
fn corrupt_gzip_is_an_error() {
    let gz = gzip(sample_text().as_bytes());
    for pos in [gz.len() / 2, gz.len() - 8, gz.len() - 3] {
        let mut bad = gz.clone();
        bad[pos] ^= 0x55;
        let e = load_bytes(bad, false).expect_err(&format!("flip at {pos}"));
        assert!(chain(&e).contains("gzip"), "{}", chain(&e));
    }
    // Garbage after the last gzip member.
    let mut trailing = gz.clone();
    trailing.extend_from_slice(b"garbage\n");
    let e = load_bytes(trailing, false).unwrap_err();
    assert!(chain(&e).contains("gzip"), "{}", chain(&e));
}

/// The error and its causes, as `{:#}` would print them through anyhow.
fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// No error prints its cause twice when the chain is printed (the message must not embed the
/// source that `source()` also returns).
#[test]
fn errors_print_each_cause_once() {
    let gz = gzip(sample_text().as_bytes());
    let e = load_bytes(gz[..gz.len() / 2].to_vec(), false).unwrap_err();
    let msg = chain(&e);
    let cause = e.source().expect("io cause").to_string();
    assert_eq!(msg.matches(&cause).count(), 1, "{msg}");

    let missing = std::path::Path::new("/nonexistent/trace.txt");
    let mut a = args(&[]);
    a.trace = missing.to_path_buf();
    let e = replay::cli::load(&a).unwrap_err();
    let msg = chain(&e);
    assert_eq!(msg.matches("No such file").count(), 1, "{msg}");
    assert!(msg.contains("/nonexistent/trace.txt"), "{msg}");
}

/// The `--strict` error quotes the offending line with control characters escaped, so a trace
/// cannot write terminal escape sequences into the error message.
#[test]
fn strict_error_escapes_the_line() {
    let e = load(
        &b"ok\x1b[31m\x07\n"[..],
        LoadOptions {
            strict: true,
            ..LoadOptions::default()
        },
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("line 1: "), "{msg}");
    assert!(!msg.contains('\x1b') && !msg.contains('\x07'), "{msg:?}");
    assert!(msg.contains("\\u{1b}[31m"), "{msg}");
}
