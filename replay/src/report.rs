//! The replay report: a text table for people, JSON for tools.

use std::fmt::Write;

use serde::Serialize;

use crate::classify::Classification;
use crate::policy::PolicyResult;
use crate::trace::TraceStats;

/// Everything one `veil replay` run found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The input (path or `-`).
    pub input: String,
    /// Trace counters.
    pub trace: TraceStats,
    /// Classification outcome.
    pub classification: Classification,
    /// How the memory was sized (the text report's "memory:" line is [`Sizing::sentence`]).
    pub sizing: Sizing,
    /// Whether stage 2 was a real VM's memslots.
    pub kvm: bool,
    /// One entry per policy.
    pub policies: Vec<PolicyResult>,
    /// A signal stopped the replay early: the trace may be cut short (interrupted while
    /// loading: no policy replayed), the last policy's `events` says how far it got, later
    /// policies are missing.
    pub interrupted: Option<crate::stop::Interrupted>,
    /// With `--sensitive`: the ranges an ASI view switch would toggle, per policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitive: Option<crate::sensitive::SensitiveReport>,
}

/// How much memory the policies replayed on, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sizing {
    /// The managed memory of every policy but linux-placement (None if only it ran).
    pub managed: Option<ManagedSizing>,
    /// linux-placement's memory: the trace's PFN span (None if it did not run).
    pub linux_placement: Option<PfnSpanSizing>,
}

/// The managed memory of the freetype-style policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ManagedSizing {
    /// Pages of 4 KiB.
    pub pages: u64,
    /// Bytes.
    pub bytes: u64,
    /// `"mem"` (given with --mem) or `"peak_live_headroom"` (the trace's peak live pages plus
    /// `headroom_percent`, rounded up to 2 MiB).
    pub source: &'static str,
    /// The trace's peak live pages.
    pub peak_live_pages: u64,
    /// --headroom, in percent (used when `source` is `"peak_live_headroom"`).
    pub headroom_percent: u32,
}

/// linux-placement's memory: the trace's PFN span rounded out to 2 MiB.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PfnSpanSizing {
    /// Pages of 4 KiB.
    pub pages: u64,
    /// Bytes.
    pub bytes: u64,
    /// The trace's lowest PFN.
    pub min_pfn: u64,
    /// One past the trace's highest PFN.
    pub end_pfn: u64,
}

impl Sizing {
    /// The text report's sentence, e.g. "256.0 MiB managed (peak live 200.0 MiB + 25%
    /// headroom, rounded up to 2 MiB); linux-placement 1024.0 MiB (the trace's PFN span
    /// 0x0..0x40000, rounded out to 2 MiB)".
    pub fn sentence(&self) -> String {
        let mib = |pages: u64| format!("{:.1} MiB", pages as f64 / 256.0);
        let mut parts = Vec::new();
        if let Some(m) = &self.managed {
            let how = if m.source == "mem" {
                "--mem".to_string()
            } else {
                format!(
                    "peak live {} + {}% headroom, rounded up to 2 MiB",
                    mib(m.peak_live_pages),
                    m.headroom_percent
                )
            };
            parts.push(format!("{} managed ({how})", mib(m.pages)));
        }
        if let Some(l) = &self.linux_placement {
            parts.push(format!(
                "linux-placement {} (the trace's PFN span 0x{:x}..0x{:x}, rounded out to 2 MiB)",
                mib(l.pages),
                l.min_pfn,
                l.end_pfn
            ));
        }
        parts.join("; ")
    }
}

impl Report {
    /// The process exit code: 0, or 128 + the signal that interrupted the replay.
    pub fn exit_code(&self) -> i32 {
        self.interrupted.map_or(0, |i| i.exit_code())
    }
}

fn mib(pages: u64) -> String {
    let m = pages as f64 * 4096.0 / (1024.0 * 1024.0);
    if m.fract() == 0.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

/// The flush, split-history, failure, stranded-memory and compaction sections.
fn render_details(s: &mut String, r: &Report) {
    let Some(first) = r.policies.first() else {
        return;
    };
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "flushes ({}; {} CPUs: each shootdown interrupts {} others)",
        first.flush.arch.rule(),
        first.flush.cpus,
        first.flush.cpus.saturating_sub(1)
    );
    let _ = writeln!(
        s,
        "{:<16} {:>10} {:>10} {:>10} {:>11} {:>11} {:>10} {:>10} {:>12}",
        "policy",
        "s2 updates",
        "removals",
        "additions",
        "shootdowns",
        "shootdn/1k",
        "IPIs",
        "IPIs/1k",
        "batch/forced"
    );
    for p in &r.policies {
        let f = &p.flush;
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>10} {:>10} {:>11} {:>11.2} {:>10} {:>10.2} {:>12}",
            p.policy.name(),
            p.stage2.updates(),
            f.removals,
            f.additions,
            f.shootdowns,
            f.shootdowns_per_1k_allocs,
            f.ipis,
            f.ipis_per_1k_allocs,
            if f.batch_pages > 0 {
                format!("{}/{}", f.batch_pages, f.forced_by_reuse)
            } else {
                "-".into()
            }
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "split history (a split direct-map block is never re-merged by Linux; intact now assumes it is)"
    );
    let _ = writeln!(
        s,
        "{:<16} {:>14} {:>14} {:>12} {:>14} {:>14}",
        "policy", "2M intact now", "2M ever split", "1G regions", "1G intact now", "1G ever split"
    );
    for p in &r.policies {
        let _ = writeln!(
            s,
            "{:<16} {:>14} {:>14} {:>12} {:>14} {:>14}",
            p.policy.name(),
            format!("{}/{}", p.intact_blocks_end, p.blocks),
            format!("{}/{}", p.ever_split_blocks, p.blocks),
            p.gib_regions,
            format!("{}/{}", p.gib_intact_end, p.gib_regions),
            format!("{}/{}", p.gib_ever_split, p.gib_regions)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "failures by request kind and order (order:count), stranded free memory (free pages in partly used blocks of the other kind)"
    );
    let _ = writeln!(
        s,
        "{:<16} {:>8} {:>18} {:>8} {:>18} {:>22} {:>22}",
        "policy",
        "mapped",
        "mapped orders",
        "unmapped",
        "unmapped orders",
        "stranded end m/u MiB",
        "stranded max m/u MiB"
    );
    for p in &r.policies {
        let k = &p.failures_by_kind;
        let (end, worst) = match &p.stranded {
            Some(st) => (
                format!(
                    "{:.1}/{:.1}",
                    st.end.for_mapped as f64 / 256.0,
                    st.end.for_unmapped as f64 / 256.0
                ),
                format!(
                    "{:.1}/{:.1}",
                    st.worst_for_mapped as f64 / 256.0,
                    st.worst_for_unmapped as f64 / 256.0
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>18} {:>8} {:>18} {:>22} {:>22}",
            p.policy.name(),
            k.mapped_total(),
            crate::policy::FailuresByKind::orders(&k.mapped),
            k.unmapped_total(),
            crate::policy::FailuresByKind::orders(&k.unmapped),
            end,
            worst
        );
    }
    let _ = writeln!(
        s,
        "stranded m/u: free MiB unusable by mapped requests (in partly used unmapped blocks) / by unmapped ones (in partly used mapped blocks)"
    );
    let lat: Vec<_> = r
        .policies
        .iter()
        .filter_map(|p| p.latency.map(|l| (p, l)))
        .collect();
    if !lat.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "allocation latency per path, p50/p99/max (n = samples): model cost units (1 + stage-2 calls + pages/64){}",
            if lat.iter().any(|(_, l)| l.fast.ns.is_some()) {
                "; measured on KVM in us"
            } else {
                ""
            }
        );
        let cell = |p: &crate::policy::latency::Percentiles, scale: f64| {
            if p.samples == 0 {
                "-".to_string()
            } else {
                format!(
                    "{}/{}/{} n={}",
                    p.p50 as f64 / scale,
                    p.p99 as f64 / scale,
                    p.max as f64 / scale,
                    p.samples
                )
            }
        };
        for (p, l) in &lat {
            let _ = writeln!(
                s,
                "{:<16} units: fast {:<20} flip {:<24} failure {:<20}",
                p.policy.name(),
                cell(&l.fast.units, 1.0),
                cell(&l.flip.units, 1.0),
                cell(&l.failure.units, 1.0)
            );
            if let (Some(f), Some(fl), Some(fa)) = (l.fast.ns, l.flip.ns, l.failure.ns) {
                let _ = writeln!(
                    s,
                    "{:<16} us:    fast {:<20} flip {:<24} failure {:<20}",
                    "",
                    cell(&f, 1e3),
                    cell(&fl, 1e3),
                    cell(&fa, 1e3)
                );
            }
        }
    }
    for p in &r.policies {
        if let Some(c) = &p.compaction {
            let st = &c.stats;
            let _ = writeln!(
                s,
                "{:<16} --compaction: failures {} without -> {} with ({} mapped, {} unmapped); {} attempts, {} blocks emptied, {} without a candidate, {} abandoned; {} allocations / {} pages migrated ({:.2} pages/1k allocations), {} stage-2 updates by migrations",
                p.policy.name(),
                c.failures_without.total(),
                p.failures.total(),
                p.failures_by_kind.mapped_total(),
                p.failures_by_kind.unmapped_total(),
                st.attempts,
                st.blocks_emptied,
                st.no_candidate,
                st.migrations_failed,
                st.allocations_migrated,
                st.pages_migrated,
                st.pages_migrated_per_1k_allocs,
                st.stage2_updates
            );
        }
    }
    let _ = writeln!(s);
}

/// Render the report as text.
pub fn render_text(r: &Report) -> String {
    let t = &r.trace;
    let c = &r.classification;
    let mut s = String::new();
    if let Some(i) = r.interrupted {
        let _ = writeln!(
            s,
            "INTERRUPTED by {}: partial report (the trace as read so far; the policy running stopped early, later ones skipped)",
            i.name
        );
    }
    let _ = writeln!(s, "trace: {}", r.input);
    let _ = writeln!(
        s,
        "  {} lines: {} mm_page_alloc, {} mm_page_free, {} mm_page_free_batched; {} CPUs",
        t.lines, t.alloc_events, t.free_events, t.batched_events, t.cpus
    );
    let _ = writeln!(
        s,
        "  frees paired: {} by mm_page_free, {} by mm_page_free_batched first; duplicates skipped: {} batched, {} free",
        t.frees_matched, t.batched_matched, t.batched_duplicates, t.free_duplicates
    );
    let _ = writeln!(
        s,
        "  skipped: {} frees of pages allocated before the capture, {} failed allocations, {} other events, {} comments, {} blank",
        t.unmatched_frees, t.failed_allocs_in_trace, t.other_events, t.comment_lines, t.blank_lines
    );
    let _ = writeln!(
        s,
        "  lost-event markers: {} ({} events lost); out-of-order timestamps: {} (replayed in file order); implicit frees: {}; order mismatches: {}",
        t.lost_markers, t.lost_events, t.out_of_order_timestamps, t.implicit_frees, t.order_mismatches
    );
    let _ = writeln!(
        s,
        "  freed in pieces (split_page): {} allocations, {} piece frees before their last",
        t.split_allocations, t.split_piece_frees
    );
    let _ = writeln!(s, "  malformed lines: {}", t.malformed_lines);
    for m in &t.malformed_examples {
        let _ = writeln!(s, "    line {}: {}: {:?}", m.line, m.reason, m.text);
    }
    let _ = writeln!(
        s,
        "  allocations replayed: {} ({} pages); peak live {} pages ({}); live at end {} ({} pages)",
        t.allocs,
        t.alloc_pages,
        t.peak_live_pages,
        mib(t.peak_live_pages),
        t.live_at_end,
        t.live_pages_at_end
    );
    let _ = writeln!(
        s,
        "unmapped: {} -> {} allocations ({:.2}%), {} pages, peak live {} pages; {} allocations cannot sleep",
        c.rule,
        c.unmapped_allocs,
        pct(c.unmapped_allocs, t.allocs),
        c.unmapped_pages,
        c.peak_live_unmapped_pages,
        c.atomic_allocs
    );
    for (flags, n) in c.by_flags.iter().take(4) {
        let _ = writeln!(s, "    {n:>8}  {flags}");
    }
    let _ = writeln!(
        s,
        "memory: {}{}",
        r.sizing.sentence(),
        if r.kvm {
            "; stage 2 = real KVM memslots"
        } else {
            ""
        }
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<16} {:>9} {:>10} {:>10} {:>9} {:>9} {:>11} {:>11} {:>12} {:>12} {:>10} {:>8} {:>9}",
        "policy",
        "memory",
        "s2 upd/1k",
        "shootdn/1k",
        "pages/1k",
        "flips u/m",
        "intact end",
        "intact min",
        "split max",
        "ever split",
        "peak slots",
        "failures",
        "Mevents/s"
    );
    for p in &r.policies {
        let _ =
            writeln!(
            s,
            "{:<16} {:>9} {:>10.2} {:>10.2} {:>9.2} {:>9} {:>10.1}% {:>10.1}% {:>12} {:>12} {:>10} {:>8} {:>9.2}",
            p.policy.name(),
            mib(p.layout.nr_pages),
            p.updates_per_1k_allocs,
            p.flush.shootdowns_per_1k_allocs,
            p.pages_per_1k_allocs,
            format!("{}/{}", p.flips_to_unmapped, p.flips_to_mapped),
            p.intact_share_end * 100.0,
            p.intact_share_worst * 100.0,
            format!("{}/{}", p.blocks - p.intact_blocks_worst, p.blocks),
            format!("{}/{}", p.ever_split_blocks, p.blocks),
            format!("{}{}", p.peak_memslots, if p.exceeds_memslot_limit { "!" } else { "" }),
            p.failures.total(),
            p.events_per_sec / 1e6
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "s2 upd/1k: stage-2 unmap+map calls per 1,000 allocations (each one memslot update); shootdn/1k: TLB shootdowns per 1,000 ({});",
        r.policies.first().map_or("x86", |p| p.flush.arch.rule())
    );
    let _ = writeln!(
        s,
        "pages/1k: pages the updates named; ever split: 2 MiB blocks split at least once (Linux never re-merges a split direct-map block);"
    );
    let _ = writeln!(
        s,
        "intact: 2 MiB blocks fully mapped or fully unmapped (could keep a huge mapping), at the end and at the worst moment;"
    );
    let _ = writeln!(
        s,
        "split max: most blocks split at once; peak slots: memslots the layout needed (one per exposed run), '!' = over the limit of {}.",
        r.policies.first().map_or(0, |p| p.max_memslots)
    );
    render_details(&mut s, r);
    for p in &r.policies {
        let st = &p.stage2;
        let _ = write!(
            s,
            "{:<16} unmap {} calls/{} pages, map {}/{}, zero {}/{}",
            p.policy.name(),
            st.unmap_calls,
            st.pages_unmapped,
            st.map_calls,
            st.pages_mapped,
            st.zero_calls,
            st.pages_zeroed
        );
        if st.failed_calls > 0 {
            let _ = write!(s, ", {} refused", st.failed_calls);
        }
        let f = &p.failures;
        if f.total() > 0 {
            let _ = write!(
                s,
                "; failures: {} oom, {} no free pageblock, {} would block, {} stage 2, {} other",
                f.out_of_memory, f.no_free_pageblock, f.would_block, f.stage2, f.other
            );
        }
        if p.exceeds_memslot_limit {
            let _ = write!(
                s,
                "; EXCEEDS KVM's memslot limit ({} > {})",
                p.peak_memslots, p.max_memslots
            );
        }
        let _ = writeln!(s, "; unmapped at end {} pages", p.unmapped_pages_end);
    }
    if r.policies.iter().any(|p| p.kvm.is_some()) {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<16} {:>9} {:>10} {:>11} {:>12} {:>10} {:>12} {:>10} {:>12} {:>11} {:>10} {:>10} {:>5} {:>22}",
            "on KVM",
            "backend",
            "s2 updates",
            "slot ioctls",
            "upd med us",
            "upd avg us",
            "ioctl med us",
            "ioctl avg",
            "s2 total ms",
            "max call us",
            "peak slots",
            "peak VMAs",
            "runs",
            "s2 total med/min/max ms"
        );
        for p in &r.policies {
            if let Some(k) = &p.kvm {
                let _ = writeln!(
                    s,
                    "{:<16} {:>9} {:>10} {:>11} {:>12.1} {:>10.1} {:>12.1} {:>10.1} {:>12.1} {:>11.0} {:>10} {:>10} {:>5} {:>22}",
                    p.policy.name(),
                    k.backend,
                    p.stage2.updates(),
                    k.memslot_updates,
                    k.median_update_ns as f64 / 1e3,
                    k.ns_per_update / 1e3,
                    k.median_memslot_ioctl_ns as f64 / 1e3,
                    k.ns_per_memslot_ioctl / 1e3,
                    (k.update_ns + k.zero_ns) as f64 / 1e6,
                    k.max_call_ns as f64 / 1e3,
                    k.peak_memslots,
                    k.peak_vmas,
                    k.repeat.runs,
                    format!(
                        "{:.1}/{:.1}/{:.1}",
                        k.repeat.s2_total_ns.median as f64 / 1e6,
                        k.repeat.s2_total_ns.min as f64 / 1e6,
                        k.repeat.s2_total_ns.max as f64 / 1e6
                    )
                );
                if k.repeat.runs > 1 {
                    let r = &k.repeat;
                    let _ = writeln!(
                        s,
                        "{:<16} over {} runs: upd med {:.1}/{:.1}/{:.1} us, ioctl med {:.1}/{:.1}/{:.1} us, max call {:.0}/{:.0}/{:.0} us (median/min/max)",
                        "",
                        r.runs,
                        r.median_update_ns.median as f64 / 1e3,
                        r.median_update_ns.min as f64 / 1e3,
                        r.median_update_ns.max as f64 / 1e3,
                        r.median_ioctl_ns.median as f64 / 1e3,
                        r.median_ioctl_ns.min as f64 / 1e3,
                        r.median_ioctl_ns.max as f64 / 1e3,
                        r.max_call_ns.median as f64 / 1e3,
                        r.max_call_ns.min as f64 / 1e3,
                        r.max_call_ns.max as f64 / 1e3
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "upd: one unmap/map through the stage-2 engine (planning + KVM_SET_USER_MEMORY_REGION ioctls under slots, one mprotect under mprotect), median and mean;\nioctl: one memslot ioctl; s2 total: all updates + zeroing (madvise or a memfd hole). KVM memslot limit on this host: {}",
            r.policies
                .iter()
                .find_map(|p| p.kvm.map(|k| k.max_memslots))
                .unwrap_or(0)
        );
    }
    if let Some(v) = &r.sensitive {
        s += &crate::sensitive::render_text(v);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_is_structured_in_json_and_a_sentence_in_text() {
        let s = Sizing {
            managed: Some(ManagedSizing {
                pages: 65536,
                bytes: 65536 * 4096,
                source: "peak_live_headroom",
                peak_live_pages: 51200,
                headroom_percent: 25,
            }),
            linux_placement: Some(PfnSpanSizing {
                pages: 262144,
                bytes: 262144 * 4096,
                min_pfn: 0x100,
                end_pfn: 0x40000,
            }),
        };
        assert_eq!(
            s.sentence(),
            "256.0 MiB managed (peak live 200.0 MiB + 25% headroom, rounded up to 2 MiB); \
             linux-placement 1024.0 MiB (the trace's PFN span 0x100..0x40000, rounded out to 2 MiB)"
        );
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["managed"]["pages"], 65536);
        assert_eq!(j["managed"]["source"], "peak_live_headroom");
        assert_eq!(j["linux_placement"]["end_pfn"], 0x40000);
        let only_mem = Sizing {
            managed: Some(ManagedSizing {
                source: "mem",
                pages: 512,
                ..Default::default()
            }),
            linux_placement: None,
        };
        assert_eq!(only_mem.sentence(), "2.0 MiB managed (--mem)");
        assert!(serde_json::to_value(&only_mem).unwrap()["linux_placement"].is_null());
    }
}
