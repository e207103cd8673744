//! `--sensitive RULE`: what ASI's view switches would cost a real workload under each
//! placement.
//!
//! ASI keeps *sensitive* pages (user data: `GFP_USER` implies `__GFP_SENSITIVE`) out of the
//! restricted address space. Where views are realised by toggling stage-2 ranges (this host:
//! one view per VM, see `docs/ARCHITECTURE.md`), every switch between the restricted and the
//! full view toggles each maximal run of sensitive pages once: the number of *ranges* is the
//! transition cost. This module replays the trace with a third kind of allocation, sensitive
//! (rule: `--sensitive RULE`, default `GFP_USER`; an allocation the `--unmapped` rules also
//! select stays unmapped, as `UNMAPPED` wins in the allocator), through each placement and
//! reports, per policy, the ranges a switch would toggle at the end, at the worst moment and
//! over time (the mean over the replayed events, and a sampled curve in JSON).
//!
//! | policy | sensitive allocation | its free |
//! |---|---|---|
//! | `freetype` | Veil's allocator with `Gfp::SENSITIVE` (sensitive pageblocks; a nonsensitive free pageblock flips with one `make_sensitive`) | stays in its sensitive pageblock; a flip back zeroes |
//! | `per-page` | the same allocator, nonsensitive freetypes only; the allocation's range is made sensitive on its own | zero + map back |
//! | `linux-placement` | the kernel's own pfns, made sensitive one allocation at a time | zero + map back |
//!
//! `unmapped-cache` has no sensitive counterpart (the 2023 proposal is about unmapped pages
//! only) and is skipped here. Unmapped allocations are handled as each policy handles them in
//! the main replay. The stage 2 is the pure model ([`ViewModel`]); with `--kvm` this analysis
//! still runs on the model.

use std::fmt::Write;

use allocator::{BuddyAllocator, Config, Gfp, Pfn, Stage2, Stage2Error};
use serde::Serialize;

use crate::classify::ClassifyError;
use crate::gfp::GfpMask;
use crate::policy::{self, Failures, Layout, PolicyKind};
use crate::trace::{Event, Trace, FLAG_ATOMIC, FLAG_UNMAPPED};

/// The default rule: `--sensitive GFP_USER` (and every composite built on it, such as
/// `GFP_HIGHUSER_MOVABLE`, since names are compared by their bits).
pub const DEFAULT_SENSITIVE: &str = "GFP_USER";

/// Which allocations are sensitive, decided once per trace.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SensitiveClass {
    /// The rule in words.
    pub rule: String,
    /// Allocations classified sensitive (not unmapped).
    pub sensitive_allocs: u64,
    /// Their pages.
    pub sensitive_pages: u64,
    /// Most sensitive pages live at once.
    pub peak_live_sensitive_pages: u64,
    /// Allocations both rules select: they stay unmapped.
    pub also_unmapped: u64,
    /// Per allocation id: sensitive (and not unmapped).
    #[serde(skip)]
    pub by_alloc: Vec<bool>,
}

/// Classify `trace` (already classified for unmapped) by the all-of rule `names` (empty:
/// [`DEFAULT_SENSITIVE`]).
pub fn classify(trace: &Trace, names: &[String]) -> Result<SensitiveClass, ClassifyError> {
    let names: Vec<String> = if names.is_empty() {
        vec![DEFAULT_SENSITIVE.to_string()]
    } else {
        names.to_vec()
    };
    let mut mask: GfpMask = 0;
    for n in &names {
        mask |= trace
            .gfp
            .lookup(n)
            .ok_or_else(|| ClassifyError::UnknownName(n.clone()))?;
    }
    let mut c = SensitiveClass {
        rule: format!("gfp has all of {}", names.join("|")),
        sensitive_allocs: 0,
        sensitive_pages: 0,
        peak_live_sensitive_pages: 0,
        also_unmapped: 0,
        by_alloc: Vec::with_capacity(trace.stats.allocs as usize),
    };
    let mut live = 0u64;
    for ev in &trace.events {
        match ev {
            Event::Alloc {
                gfp, order, flags, ..
            } => {
                let matches = trace.gfp.mask(gfp) & mask == mask;
                let unmapped = flags & FLAG_UNMAPPED != 0;
                c.also_unmapped += u64::from(matches && unmapped);
                let s = matches && !unmapped;
                if s {
                    c.sensitive_allocs += 1;
                    c.sensitive_pages += 1 << order;
                    live += 1 << order;
                    c.peak_live_sensitive_pages = c.peak_live_sensitive_pages.max(live);
                }
                c.by_alloc.push(s);
            }
            Event::Free { alloc, order, .. } => {
                if c.by_alloc.get(alloc as usize).copied().unwrap_or(false) {
                    live -= 1 << order;
                }
            }
        }
    }
    Ok(c)
}

/// The three states of a page in the model (as [`allocator::Visibility`]).
const NONSENSITIVE: u8 = 0;
const SENSITIVE: u8 = 1;
const UNMAPPED: u8 = 2;

/// A pure stage 2 with two views: per page nonsensitive, sensitive or unmapped; it keeps the
/// number of maximal runs of sensitive pages (the ranges a view switch toggles) up to date
/// and counts calls. Calls outside the managed range fail with `Backend(-22)`.
#[derive(Clone, Debug)]
pub struct ViewModel {
    base: Pfn,
    state: Vec<u8>,
    runs: u64,
    sensitive_pages: u64,
    calls: ViewCalls,
}

/// Stage-2 calls made to a [`ViewModel`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ViewCalls {
    /// `make_sensitive` calls.
    pub make_sensitive: u64,
    /// `map` calls.
    pub map: u64,
    /// `unmap` calls.
    pub unmap: u64,
    /// `zero` calls.
    pub zero: u64,
    /// Refused calls (outside the range).
    pub failed: u64,
}

impl ViewModel {
    /// `nr` pages from `base`, all nonsensitive.
    pub fn new(base: Pfn, nr: u64) -> ViewModel {
        ViewModel {
            base,
            state: vec![NONSENSITIVE; nr as usize],
            runs: 0,
            sensitive_pages: 0,
            calls: ViewCalls::default(),
        }
    }

    /// Maximal runs of sensitive pages now: the ranges one view switch toggles.
    pub fn sensitive_ranges(&self) -> u64 {
        self.runs
    }

    /// Pages in the sensitive state now (allocated or free in a sensitive pageblock).
    pub fn sensitive_pages(&self) -> u64 {
        self.sensitive_pages
    }

    /// The calls so far.
    pub fn calls(&self) -> ViewCalls {
        self.calls
    }

    /// Runs of sensitive pages starting in `[a, b)`.
    fn starts(&self, a: usize, b: usize) -> u64 {
        (a..b)
            .filter(|&i| self.state[i] == SENSITIVE && (i == 0 || self.state[i - 1] != SENSITIVE))
            .count() as u64
    }

    fn set(&mut self, pfn: Pfn, count: u64, to: u8) -> Result<(), Stage2Error> {
        let a = pfn
            .checked_sub(self.base)
            .filter(|&o| o < self.state.len() as u64);
        let b = a.and_then(|a| a.checked_add(count));
        let (Some(a), Some(b)) = (a, b) else {
            self.calls.failed += 1;
            return Err(Stage2Error::Backend(-22));
        };
        if b > self.state.len() as u64 {
            self.calls.failed += 1;
            return Err(Stage2Error::Backend(-22));
        }
        let (a, b) = (a as usize, b as usize);
        let hi = (b + 1).min(self.state.len());
        let before = self.starts(a, hi);
        let was = self.state[a..b].iter().filter(|&&s| s == SENSITIVE).count() as u64;
        self.state[a..b].fill(to);
        let now = if to == SENSITIVE { (b - a) as u64 } else { 0 };
        self.sensitive_pages = self.sensitive_pages + now - was;
        self.runs = self.runs + self.starts(a, hi) - before;
        Ok(())
    }
}

impl Stage2 for ViewModel {
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.calls.unmap += 1;
        self.set(pfn, count, UNMAPPED)
    }
    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.calls.map += 1;
        self.set(pfn, count, NONSENSITIVE)
    }
    fn zero(&mut self, _pfn: Pfn, _count: u64) -> Result<(), Stage2Error> {
        self.calls.zero += 1;
        Ok(())
    }
    fn make_sensitive(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        self.calls.make_sensitive += 1;
        self.set(pfn, count, SENSITIVE)
    }
}

/// One policy's view-switch figures.
#[derive(Clone, Debug, Serialize)]
pub struct SensitivePolicyResult {
    /// Policy.
    pub policy: PolicyKind,
    /// Memory it replayed on.
    pub layout: Layout,
    /// Sensitive allocations attempted.
    pub sensitive_allocs: u64,
    /// Ranges a view switch toggles at the end.
    pub ranges_end: u64,
    /// Most ranges at any moment.
    pub ranges_worst: u64,
    /// Number (1-based) of the event at which the worst was first reached.
    pub worst_at_event: u64,
    /// Mean ranges over the replayed events (a switch after every event).
    pub ranges_mean: f64,
    /// Pages in the sensitive state at the end.
    pub sensitive_pages_end: u64,
    /// Most pages in the sensitive state at any moment.
    pub sensitive_pages_peak: u64,
    /// Pageblocks flipped to sensitive / from sensitive (`freetype` only).
    pub flips_to_sensitive: u64,
    /// Pageblocks flipped from sensitive to another kind.
    pub flips_from_sensitive: u64,
    /// Stage-2 calls.
    pub calls: ViewCalls,
    /// Allocation failures by cause.
    pub failures: Failures,
    /// Ranges over time: (event number, ranges), sampled.
    pub ranges_over_time: Vec<(u64, u64)>,
}

/// The `--sensitive` part of the report.
#[derive(Clone, Debug, Serialize)]
pub struct SensitiveReport {
    /// The classification.
    pub classification: SensitiveClass,
    /// One entry per policy that has a sensitive counterpart.
    pub policies: Vec<SensitivePolicyResult>,
}

/// How a placement handles one allocation.
trait Placement {
    fn alloc(
        &mut self,
        order: u8,
        mt: u8,
        kind: u8,
        atomic: bool,
        trace_pfn: u64,
    ) -> Result<u64, policy::Failure>;
    fn free(&mut self, pfn: u64, order: u8, kind: u8);
    fn model(&self) -> &ViewModel;
    fn flips(&self) -> (u64, u64);
}

/// `freetype`: Veil's allocator does everything.
struct FreetypeP {
    a: BuddyAllocator<ViewModel>,
    honour_atomic: bool,
}

impl Placement for FreetypeP {
    fn alloc(
        &mut self,
        order: u8,
        mt: u8,
        kind: u8,
        atomic: bool,
        _: u64,
    ) -> Result<u64, policy::Failure> {
        let mut gfp = match kind {
            UNMAPPED => Gfp::UNMAPPED,
            SENSITIVE => Gfp::SENSITIVE | policy::mapped_gfp(mt),
            _ => policy::mapped_gfp(mt),
        };
        if self.honour_atomic && atomic {
            gfp |= Gfp::ATOMIC;
        }
        Ok(self.a.alloc_pages(gfp, order)?.pfn)
    }
    fn free(&mut self, pfn: u64, order: u8, _: u8) {
        let _ = self.a.free_pages(pfn, order);
    }
    fn model(&self) -> &ViewModel {
        self.a.stage2()
    }
    fn flips(&self) -> (u64, u64) {
        let s = self.a.snapshot();
        let from: u64 = s.flip_matrix[1].iter().sum();
        (s.flips_to_sensitive, from)
    }
}

/// `per-page`: nonsensitive allocator; each special allocation changed on its own.
struct PerPageP {
    a: BuddyAllocator<ViewModel>,
}

impl Placement for PerPageP {
    fn alloc(
        &mut self,
        order: u8,
        mt: u8,
        kind: u8,
        _: bool,
        _: u64,
    ) -> Result<u64, policy::Failure> {
        let pfn = self.a.alloc_pages(policy::mapped_gfp(mt), order)?.pfn;
        let r = match kind {
            UNMAPPED => self.a.stage2_mut().unmap(pfn, 1 << order),
            SENSITIVE => self.a.stage2_mut().make_sensitive(pfn, 1 << order),
            _ => Ok(()),
        };
        if let Err(e) = r {
            let _ = self.a.free_pages(pfn, order);
            return Err(e.into());
        }
        Ok(pfn)
    }
    fn free(&mut self, pfn: u64, order: u8, kind: u8) {
        if kind != NONSENSITIVE {
            let s = self.a.stage2_mut();
            if s.zero(pfn, 1 << order).is_err() || s.map(pfn, 1 << order).is_err() {
                return;
            }
        }
        let _ = self.a.free_pages(pfn, order);
    }
    fn model(&self) -> &ViewModel {
        self.a.stage2()
    }
    fn flips(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// `linux-placement`: the trace's own pfns.
struct LinuxP {
    m: ViewModel,
    l: Layout,
}

impl Placement for LinuxP {
    fn alloc(
        &mut self,
        order: u8,
        _: u8,
        kind: u8,
        _: bool,
        trace_pfn: u64,
    ) -> Result<u64, policy::Failure> {
        let pfn = trace_pfn
            .checked_sub(self.l.trace_base_pfn)
            .and_then(|o| o.checked_add(self.l.base_pfn))
            .ok_or(policy::Failure::Other)?;
        match kind {
            UNMAPPED => self.m.unmap(pfn, 1 << order)?,
            SENSITIVE => self.m.make_sensitive(pfn, 1 << order)?,
            _ => {}
        }
        Ok(pfn)
    }
    fn free(&mut self, pfn: u64, order: u8, kind: u8) {
        if kind != NONSENSITIVE {
            let _ = self.m.zero(pfn, 1 << order);
            let _ = self.m.map(pfn, 1 << order);
        }
    }
    fn model(&self) -> &ViewModel {
        &self.m
    }
    fn flips(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Replay `trace` with the sensitive classification `c` through `kind` on `layout`; None for
/// a policy without a sensitive counterpart.
pub fn run_policy(
    kind: PolicyKind,
    trace: &Trace,
    c: &SensitiveClass,
    layout: Layout,
    honour_atomic: bool,
    samples: usize,
) -> Option<SensitivePolicyResult> {
    let m = ViewModel::new(layout.base_pfn, layout.nr_pages);
    let cfg = Config::default();
    match kind {
        PolicyKind::Freetype => Some(drive(
            kind,
            trace,
            c,
            layout,
            samples,
            FreetypeP {
                a: BuddyAllocator::new(layout.base_pfn, layout.nr_pages, m, cfg),
                honour_atomic,
            },
        )),
        PolicyKind::PerPage => Some(drive(
            kind,
            trace,
            c,
            layout,
            samples,
            PerPageP {
                a: BuddyAllocator::new(layout.base_pfn, layout.nr_pages, m, cfg),
            },
        )),
        PolicyKind::LinuxPlacement => Some(drive(
            kind,
            trace,
            c,
            layout,
            samples,
            LinuxP { m, l: layout },
        )),
        // No sensitive counterpart: unmapped-cache has none; per-page-batched places pages as
        // per-page does (only its shootdowns differ) and freetype-pcp as freetype does, so
        // their view-switch ranges would repeat those rows.
        PolicyKind::UnmappedCache | PolicyKind::PerPageBatched | PolicyKind::FreetypePcp => None,
    }
}

/// Marker for a failed allocation.
const NO_PFN: u64 = u64::MAX;

/// Count one failure by cause.
fn count_failure(f: &mut Failures, e: policy::Failure) {
    use policy::Failure::*;
    match e {
        OutOfMemory => f.out_of_memory += 1,
        NoFreePageblock => f.no_free_pageblock += 1,
        WouldBlock => f.would_block += 1,
        Stage2 => f.stage2 += 1,
        Other => f.other += 1,
    }
}

fn drive<P: Placement>(
    kind: PolicyKind,
    trace: &Trace,
    c: &SensitiveClass,
    layout: Layout,
    samples: usize,
    mut p: P,
) -> SensitivePolicyResult {
    let n = trace.events.len() as u64;
    let stride = (n / samples.max(1) as u64).max(1);
    let mut pfns: Vec<(u64, u8)> = Vec::with_capacity(c.by_alloc.len());
    let mut failures = Failures::default();
    let (mut worst, mut worst_at, mut sum, mut peak_pages) = (0u64, 0u64, 0u128, 0u64);
    let mut curve = vec![(0u64, 0u64)];
    let mut sensitive_allocs = 0u64;
    let mut done = 0u64;
    for (i, ev) in trace.events.iter().enumerate() {
        if i % 4096 == 0 && i > 0 && crate::stop::requested().is_some() {
            break;
        }
        match ev {
            Event::Alloc {
                pfn,
                order,
                migratetype,
                flags,
                ..
            } => {
                let id = pfns.len();
                let k = if flags & FLAG_UNMAPPED != 0 {
                    UNMAPPED
                } else if c.by_alloc.get(id).copied().unwrap_or(false) {
                    SENSITIVE
                } else {
                    NONSENSITIVE
                };
                sensitive_allocs += u64::from(k == SENSITIVE);
                match p.alloc(order, migratetype, k, flags & FLAG_ATOMIC != 0, pfn) {
                    Ok(got) => pfns.push((got, k)),
                    Err(f) => {
                        count_failure(&mut failures, f);
                        pfns.push((NO_PFN, k));
                    }
                }
            }
            Event::Free { alloc, order, .. } => {
                if let Some(slot) = pfns.get_mut(alloc as usize) {
                    let (got, k) = *slot;
                    if got != NO_PFN {
                        p.free(got, order, k);
                        slot.0 = NO_PFN;
                    }
                }
            }
        }
        let r = p.model().sensitive_ranges();
        let e = i as u64 + 1;
        if r > worst {
            worst = r;
            worst_at = e;
        }
        peak_pages = peak_pages.max(p.model().sensitive_pages());
        sum += u128::from(r);
        done = e;
        if e.is_multiple_of(stride) {
            curve.push((e, r));
        }
    }
    let end = p.model().sensitive_ranges();
    if curve.last().map(|c| c.0) != Some(done) {
        curve.push((done, end));
    }
    let (to, from) = p.flips();
    SensitivePolicyResult {
        policy: kind,
        layout,
        sensitive_allocs,
        ranges_end: end,
        ranges_worst: worst,
        worst_at_event: worst_at,
        ranges_mean: if done == 0 {
            0.0
        } else {
            sum as f64 / done as f64
        },
        sensitive_pages_end: p.model().sensitive_pages(),
        sensitive_pages_peak: peak_pages,
        flips_to_sensitive: to,
        flips_from_sensitive: from,
        calls: p.model().calls(),
        failures,
        ranges_over_time: curve,
    }
}

/// Render the `--sensitive` table.
pub fn render_text(r: &SensitiveReport) -> String {
    let c = &r.classification;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nASI view switches (--sensitive: {}): {} sensitive allocations, {} pages, peak {} live; {} also unmapped (unmapped wins)",
        c.rule, c.sensitive_allocs, c.sensitive_pages, c.peak_live_sensitive_pages, c.also_unmapped
    );
    let _ = writeln!(
        s,
        "  ranges = maximal runs of sensitive pages: what one switch between the restricted and the full view toggles"
    );
    let _ = writeln!(
        s,
        "{:<16} {:>10} {:>10} {:>11} {:>10} {:>14} {:>13} {:>10} {:>9}",
        "policy",
        "ranges end",
        "worst",
        "mean/event",
        "sens pages",
        "make_sens calls",
        "flips to/from",
        "map calls",
        "failures"
    );
    for p in &r.policies {
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>10} {:>11.1} {:>10} {:>14} {:>13} {:>10} {:>9}",
            p.policy.name(),
            p.ranges_end,
            p.ranges_worst,
            p.ranges_mean,
            p.sensitive_pages_end,
            p.calls.make_sensitive,
            format!("{}/{}", p.flips_to_sensitive, p.flips_from_sensitive),
            p.calls.map,
            p.failures.total()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{load, LoadOptions};

    #[test]
    fn view_model_counts_runs_of_sensitive_pages() {
        let mut m = ViewModel::new(100, 32);
        m.make_sensitive(100, 4).unwrap();
        assert_eq!((m.sensitive_ranges(), m.sensitive_pages()), (1, 4));
        m.make_sensitive(110, 2).unwrap();
        assert_eq!(m.sensitive_ranges(), 2);
        // Bridging the gap joins the runs.
        m.make_sensitive(104, 6).unwrap();
        assert_eq!((m.sensitive_ranges(), m.sensitive_pages()), (1, 12));
        // A hole in the middle splits it; unmapped pages are not sensitive.
        m.unmap(105, 1).unwrap();
        assert_eq!((m.sensitive_ranges(), m.sensitive_pages()), (2, 11));
        m.map(100, 32).unwrap();
        assert_eq!((m.sensitive_ranges(), m.sensitive_pages()), (0, 0));
        // At both ends of the range.
        m.make_sensitive(100, 1).unwrap();
        m.make_sensitive(131, 1).unwrap();
        assert_eq!(m.sensitive_ranges(), 2);
        assert_eq!(m.make_sensitive(131, 2), Err(Stage2Error::Backend(-22)));
        assert_eq!(m.make_sensitive(99, 1), Err(Stage2Error::Backend(-22)));
        assert_eq!(m.map(u64::MAX, 2), Err(Stage2Error::Backend(-22)));
        assert_eq!(m.calls().failed, 3);
        // Brute force agrees after a pseudo-random sequence.
        let mut x = 7u64;
        for _ in 0..500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = 100 + (x >> 33) % 32;
            let len = 1 + (x >> 20) % (132 - a);
            match (x >> 8) % 3 {
                0 => m.make_sensitive(a, len).unwrap(),
                1 => m.map(a, len).unwrap(),
                _ => m.unmap(a, len).unwrap(),
            }
            let brute = (0..32)
                .filter(|&i| m.state[i] == SENSITIVE && (i == 0 || m.state[i - 1] != SENSITIVE))
                .count() as u64;
            assert_eq!(m.sensitive_ranges(), brute);
            let pages = m.state.iter().filter(|&&s| s == SENSITIVE).count() as u64;
            assert_eq!(m.sensitive_pages(), pages);
        }
    }

    /// 64 user pages alternating with movable kernel pages: per-page placement toggles one
    /// range per user page (at the kernel's pfns and at the allocator's, which hands out
    /// ascending pfns here), Veil's allocator one range (one sensitive pageblock).
    fn scattered_trace() -> Trace {
        let mut t = String::new();
        for i in 0..64u64 {
            t += &format!(
                "a-1 [000] ..... 1.0: mm_page_alloc: page=x pfn={} order=0 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE\n",
                0x10000 + 2 * i
            );
            t += &format!(
                "a-1 [000] ..... 1.0: mm_page_alloc: page=x pfn={} order=0 migratetype=1 gfp_flags=GFP_KERNEL\n",
                0x10000 + 2 * i + 1
            );
        }
        // Half the user pages go away again.
        for i in 0..32u64 {
            t += &format!(
                "a-1 [000] ..... 1.0: mm_page_free: page=x pfn={} order=0\n",
                0x10000 + 4 * i
            );
        }
        load(t.as_bytes(), LoadOptions::default()).unwrap()
    }

    #[test]
    fn default_rule_is_gfp_user_by_bits() {
        let mut t = scattered_trace();
        crate::classify::classify(&mut t, &Default::default()).unwrap();
        let c = classify(&t, &[]).unwrap();
        // GFP_HIGHUSER_MOVABLE carries every bit of GFP_USER; GFP_KERNEL does not.
        assert_eq!(c.sensitive_allocs, 64);
        assert_eq!(c.peak_live_sensitive_pages, 64);
        assert!(c.rule.contains("GFP_USER"));
        assert_eq!(
            classify(&t, &["GFP_USR".into()]).unwrap_err(),
            ClassifyError::UnknownName("GFP_USR".into())
        );
        let k = classify(&t, &["GFP_KERNEL".into()]).unwrap();
        assert_eq!(k.sensitive_allocs, 128, "GFP_KERNEL bits are in both");
    }

    #[test]
    fn grouping_keeps_ranges_flat_per_page_placement_does_not() {
        let mut t = scattered_trace();
        crate::classify::classify(&mut t, &Default::default()).unwrap();
        let c = classify(&t, &[]).unwrap();
        let run = |k| {
            let l = policy::layout_for(k, &t, Some(4 * 512), 25);
            run_policy(k, &t, &c, l, false, 100).unwrap()
        };
        let f = run(PolicyKind::Freetype);
        assert_eq!((f.ranges_end, f.ranges_worst), (1, 1), "{f:?}");
        assert_eq!(f.calls.make_sensitive, 1);
        assert_eq!(f.flips_to_sensitive, 1);
        assert_eq!(f.sensitive_pages_end, 512, "the whole pageblock");
        let p = run(PolicyKind::PerPage);
        // Both kinds share the movable block and alternate: 64 runs at worst.
        assert_eq!(p.ranges_worst, 64, "{p:?}");
        assert_eq!(p.ranges_end, 32);
        assert_eq!(p.calls.make_sensitive, 64);
        assert_eq!(p.calls.map, 32);
        let l = run(PolicyKind::LinuxPlacement);
        assert_eq!((l.ranges_worst, l.ranges_end), (64, 32));
        assert!(l.ranges_mean > 1.0 && f.ranges_mean <= 1.0);
        assert!(run_policy(
            PolicyKind::UnmappedCache,
            &t,
            &c,
            policy::layout_for(PolicyKind::Freetype, &t, None, 25),
            false,
            10
        )
        .is_none());
        let text = render_text(&SensitiveReport {
            classification: c,
            policies: vec![f, p, l],
        });
        assert!(text.contains("ASI view switches"));
        assert!(text
            .lines()
            .any(|l| l.starts_with("per-page") && l.contains(" 64 ")));
    }
}
