//! The shared real trace end to end: every policy runs and the results are sane.

use std::path::PathBuf;

mod common;

use clap::Parser;
use common::assert_accounted;
use replay::cli::{self, ReplayArgs};
use replay::policy::PolicyKind;
use replay::trace::Event;

fn trace_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/kmem-trace-cargo-small.txt.gz");
    assert!(
        p.exists(),
        "the shared trace {} is missing: these tests replay it (see ../shared/data/README.md)",
        p.display()
    );
    p
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ReplayArgs,
}

fn args(extra: &[&str]) -> ReplayArgs {
    let p = trace_path();
    let mut v = vec!["replay", p.to_str().unwrap(), "--quiet"];
    v.extend_from_slice(extra);
    Cli::try_parse_from(v).unwrap().args
}

#[test]
fn all_policies_on_the_shared_trace() {
    let a = args(&[]);
    let l = cli::load(&a).unwrap();
    let s = &l.trace.stats;
    // The file's own counts (see ../shared/data/README.md): 234,488 lines.
    assert_eq!(s.lines, 234_488);
    assert_eq!(
        (s.alloc_events, s.free_events, s.batched_events),
        (87_432, 75_137, 71_919)
    );
    assert_eq!(s.malformed_lines, 0);
    // Every event accounted for: each batched free duplicates an mm_page_free, the rest of the
    // frees either free a capture allocation or a page allocated before the capture.
    assert_accounted(&l.trace);
    assert_eq!(s.batched_duplicates, s.batched_events);
    assert!(
        s.unmatched_frees > 0,
        "the capture starts mid-run: some frees are of older pages"
    );
    assert!(s.live_at_end > 0);
    let frees = l
        .trace
        .events
        .iter()
        .filter(|e| matches!(e, Event::Free { .. }))
        .count() as u64;
    assert_eq!(s.allocs, s.live_at_end + frees);
    assert!(s.peak_live_pages > s.live_pages_at_end);
    let c = &l.classification;
    assert!(
        c.unmapped_allocs > 0 && c.unmapped_allocs < s.allocs / 10,
        "{}",
        c.unmapped_allocs
    );

    // Live unmapped pages at the end, from the events themselves.
    let mut live = vec![None; s.allocs as usize];
    let mut id = 0;
    for e in &l.trace.events {
        match e {
            Event::Alloc { order, flags, .. } => {
                live[id] = Some((order, flags & replay::trace::FLAG_UNMAPPED != 0));
                id += 1;
            }
            Event::Free { alloc, .. } => live[alloc as usize] = None,
        }
    }
    let unmapped_live: u64 = live
        .iter()
        .flatten()
        .filter(|x| x.1)
        .map(|x| 1u64 << x.0)
        .sum();
    let unmapped_frees = c.unmapped_allocs - live.iter().flatten().filter(|x| x.1).count() as u64;

    let results = cli::run_model(&a, &l).unwrap();
    assert_eq!(results.len(), 5);
    let by = |k: PolicyKind| results.iter().find(|r| r.policy == k).unwrap();
    for r in &results {
        assert_eq!(r.failures.total(), 0, "{}: {:?}", r.policy, r.failures);
        assert_eq!(r.free_errors, 0, "{}", r.policy);
        assert_eq!(r.allocs, s.allocs);
        assert_eq!(r.events, l.trace.events.len() as u64);
        assert!(!r.exceeds_memslot_limit);
        assert!(r.intact_blocks_worst <= r.intact_blocks_end);
        assert!(r.peak_memslots >= r.memslots_end && r.memslots_end >= 1);
        assert!(r.events_per_sec > 0.0);
    }
    // Per-allocation policies: one unmap per unmapped allocation, one map per unmapped free.
    for k in [
        PolicyKind::PerPage,
        PolicyKind::PerPageBatched,
        PolicyKind::LinuxPlacement,
    ] {
        let r = by(k);
        assert_eq!(r.stage2.unmap_calls, c.unmapped_allocs, "{k}");
        assert_eq!(r.stage2.map_calls, unmapped_frees, "{k}");
        assert_eq!(r.unmapped_pages_end, unmapped_live, "{k}");
        // x86: the removals flush, the map-backs do not.
        assert_eq!(r.flush.removals, r.stage2.unmap_calls, "{k}");
        assert_eq!(r.flush.additions, r.stage2.map_calls, "{k}");
        // Split history: a block split once counts even if it is whole again now.
        assert!(r.ever_split_blocks >= r.blocks - r.intact_blocks_end, "{k}");
        assert!(
            r.ever_split_blocks >= r.blocks - r.intact_blocks_worst,
            "{k}"
        );
    }
    let pp = by(PolicyKind::PerPage);
    assert_eq!(pp.flush.shootdowns, pp.stage2.unmap_calls);
    assert!(pp.flush.shootdowns < pp.stage2.updates());
    // Two CPUs in the trace: one IPI per shootdown.
    assert_eq!((pp.flush.cpus, pp.flush.ipis), (2, pp.flush.shootdowns));
    // Lazy flush: removals share shootdowns, but no fewer than the batches need.
    let pb = by(PolicyKind::PerPageBatched);
    assert!(
        pb.flush.shootdowns * 4 < pp.flush.shootdowns,
        "{:?}",
        pb.flush
    );
    assert!(pb.flush.shootdowns >= pp.flush.removals / 32);
    assert!(pb.flush.forced_by_reuse > 0);
    // The freetype allocator amortises: far fewer stage-2 updates, and it never splits a block.
    let ft = by(PolicyKind::Freetype);
    assert_eq!(ft.ever_split_blocks, 0);
    assert!(ft.stranded.is_some() && pp.stranded.is_none());
    assert!(
        ft.stage2.updates() * 100 <= pp.stage2.updates(),
        "{} vs {}",
        ft.stage2.updates(),
        pp.stage2.updates()
    );
    assert!(ft.flips_to_unmapped >= 1);
    assert_eq!(ft.intact_blocks_worst, ft.blocks);
    assert_eq!(ft.unmapped_pages_end % 512, 0);
    assert_eq!(
        by(PolicyKind::UnmappedCache).intact_blocks_worst,
        by(PolicyKind::UnmappedCache).blocks
    );
    // Linux's real placement scatters the unmapped pages: some 2 MiB blocks get split.
    let lp = by(PolicyKind::LinuxPlacement);
    assert!(lp.intact_blocks_worst < lp.blocks);

    // The report renders as text and JSON, and the plot is well-formed XML with one polyline
    // per policy.
    let rep = cli::report(&a, &l, results, false);
    let text = replay::report::render_text(&rep);
    for k in PolicyKind::ALL {
        assert!(text.contains(k.name()), "{text}");
    }
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["policies"].as_array().unwrap().len(), 5);
    assert_eq!(json["trace"]["lines"], 234_488);
    let svg = replay::plot::render_svg(&rep.policies, "t <&> \"q\"");
    let mut r = quick_xml::Reader::from_str(&svg);
    let (mut polylines, mut texts) = (0, 0);
    loop {
        match r.read_event().expect("valid XML") {
            quick_xml::events::Event::Eof => break,
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                match e.name().as_ref() {
                    b"polyline" => polylines += 1,
                    b"text" => texts += 1,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    assert_eq!(polylines, 2 * 5, "intact now and never split, per policy");
    assert!(texts > 10, "axes, ticks, labels and legend");
}

#[test]
fn arm64_flushes_additions_and_cpus_scale_ipis() {
    let a = args(&["--arch", "arm64", "--cpus", "8", "-p", "per-page,freetype"]);
    let l = cli::load(&a).unwrap();
    let r = cli::run_model(&a, &l).unwrap();
    // Break-before-make: every update flushes.
    assert_eq!(r[0].flush.shootdowns, r[0].stage2.updates());
    assert_eq!(r[0].flush.ipis, 7 * r[0].flush.shootdowns);
    assert_eq!(r[1].flush.shootdowns, r[1].stage2.updates());
}

/// Headroom 0 with half of all allocations unmapped: every failure is split by kind and
/// order, stranded memory is reported, and --compaction reports both runs.
#[test]
fn failures_by_kind_stranded_memory_and_compaction() {
    let a = args(&[
        "--unmapped-fraction",
        "0.5",
        "--seed",
        "1",
        "--headroom",
        "0",
        "-p",
        "freetype",
        "--compaction",
    ]);
    let l = cli::load(&a).unwrap();
    let r = &cli::run_model(&a, &l).unwrap()[0];
    let c = r.compaction.as_ref().expect("compaction report");
    let without = &c.failures_by_kind_without;
    // Without compaction: failures, all accounted for by kind and order.
    assert!(c.failures_without.total() > 0);
    assert_eq!(
        without.mapped_total() + without.unmapped_total(),
        c.failures_without.total()
    );
    assert_eq!(
        without.mapped_causes.total() + without.unmapped_causes.total(),
        c.failures_without.total()
    );
    let k = &r.failures_by_kind;
    assert_eq!(k.mapped_total() + k.unmapped_total(), r.failures.total());
    // Compaction moved pages and did not make things worse.
    assert!(c.stats.attempts > 0);
    assert!(r.failures.total() <= c.failures_without.total(), "{:?}", c);
    assert_eq!(
        c.stats.pages_migrated > 0,
        c.stats.blocks_emptied > 0,
        "{:?}",
        c.stats
    );
    assert_eq!(r.free_errors, 0);
    let st = r.stranded.as_ref().unwrap();
    assert!(st.worst_for_mapped >= st.end.for_mapped);
    assert!(st.over_time.len() > 100);
}

/// --pcp: freetype on per-CPU caches by the trace's CPU makes the same flips for the user-page
/// rule and fails nothing; latency samples cover every allocation, flips cost more units.
#[test]
fn per_cpu_caches_and_latency_per_path() {
    let a = args(&[
        "--unmapped",
        "GFP_HIGHUSER_MOVABLE",
        "-p",
        "freetype",
        "--pcp",
    ]);
    let l = cli::load(&a).unwrap();
    let r = cli::run_model(&a, &l).unwrap();
    assert_eq!(r.len(), 2);
    let (ft, pcp) = (&r[0], &r[1]);
    assert_eq!(pcp.policy, PolicyKind::FreetypePcp);
    assert_eq!((pcp.failures.total(), pcp.free_errors), (0, 0));
    assert!(pcp.flips_to_unmapped >= ft.flips_to_unmapped);
    let s = pcp.allocator.as_ref().unwrap();
    assert!(s.total_allocs() >= pcp.allocs);
    for p in [ft, pcp] {
        let lat = p.latency.unwrap();
        assert_eq!(
            lat.fast.units.samples + lat.flip.units.samples + lat.failure.units.samples,
            p.allocs
        );
        assert_eq!(
            lat.flip.units.samples,
            p.flips_to_unmapped + p.flips_to_mapped
        );
        assert!(lat.flip.units.p50 > lat.fast.units.p50);
        assert!(lat.fast.ns.is_none(), "not timed on the model");
    }
}

/// --sweep headroom: one replay per value on one parse; less headroom never fails less.
#[test]
fn sweep_over_headroom() {
    let a = args(&[
        "--unmapped-fraction",
        "0.5",
        "--seed",
        "1",
        "-p",
        "freetype,per-page",
        "--sweep",
        "headroom=0,5,25",
    ]);
    let mut l = cli::load(&a).unwrap();
    let sw = a.sweep.clone().unwrap();
    let r = cli::run_sweep(&a, &sw, &mut l).unwrap();
    assert_eq!(r.rows.len(), 3);
    let ft: Vec<u64> = r
        .rows
        .iter()
        .map(|row| row.policies[0].failures.total())
        .collect();
    assert!(ft[0] > 0 && ft[0] >= ft[1] && ft[1] >= ft[2], "{ft:?}");
    let mem: Vec<u64> = r
        .rows
        .iter()
        .map(|row| row.policies[0].layout.nr_pages)
        .collect();
    assert!(mem[0] < mem[2]);
    let text = replay::sweep::render_text(&r);
    assert!(text.contains("per-page") && text.contains("25%"), "{text}");
    let svg = replay::sweep::render_svg(&r, "t");
    let mut x = quick_xml::Reader::from_str(&svg);
    let mut lines = 0;
    loop {
        match x.read_event().expect("valid XML") {
            quick_xml::events::Event::Eof => break,
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e)
                if e.name().as_ref() == b"polyline" =>
            {
                lines += 1
            }
            _ => {}
        }
    }
    assert_eq!(lines, 2);
    // unmapped-fraction re-classifies the same parsed trace per value.
    let sw = replay::sweep::parse_sweep("unmapped-fraction=0.1,0.9").unwrap();
    let r = cli::run_sweep(&a, &sw, &mut l).unwrap();
    assert!(r.rows[0].unmapped_allocs * 5 < r.rows[1].unmapped_allocs);
}

#[test]
fn cli_options_change_the_outcome() {
    // A heavier classification: unmap every user page too. Sizing, memslots and stage-2 work grow.
    let a = args(&[
        "--unmapped-gfp-any",
        "GFP_KERNEL_ACCOUNT,GFP_HIGHUSER_MOVABLE",
        "--policy",
        "freetype,per-page",
    ]);
    let l = cli::load(&a).unwrap();
    assert!(l.classification.unmapped_allocs > l.trace.stats.allocs / 2);
    let r = cli::run_model(&a, &l).unwrap();
    assert_eq!(r.len(), 2);
    assert!(r[0].stage2.updates() * 10 < r[1].stage2.updates());
    // --strict succeeds on a clean trace; --mem too small makes allocations fail (a result).
    let a = args(&["--strict", "--mem", "8M", "--policy", "freetype"]);
    let l = cli::load(&a).unwrap();
    let r = cli::run_model(&a, &l).unwrap();
    assert!(r[0].failures.total() > 0);
    assert_eq!(r[0].layout.nr_pages, 2048);
}
