//! SVG plot: share of intact 2 MiB blocks over the replay, one polyline per policy.
//!
//! Lines that coincide (freetype and unmapped-cache often do) stay told apart: each policy has
//! its own dash pattern and marker shape, markers sit at a per-policy phase along the x axis,
//! every line is named at its right end (labels pushed apart so none covers another, with a
//! leader to the line's end), and the legend says which curves are identical. A y axis that
//! does not start at 0 carries a break mark and says so; linux-placement's larger block count
//! (the trace's own PFN span) is explained under the legend.

use std::fmt::Write;

use crate::policy::{PolicyKind, PolicyResult};

const W: f64 = 1160.0;
const H: f64 = 540.0;
const LEFT: f64 = 80.0;
/// Right margin: the end-label column ([`END_COL`] wide), then the legend.
const RIGHT: f64 = 530.0;
/// Width of the column of end-of-line labels right of the plot area.
const END_COL: f64 = 120.0;
/// Least vertical distance between two end labels.
const LABEL_GAP: f64 = 13.0;
/// Markers per line.
const MARKERS: usize = 6;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;

/// Dash pattern of a policy's line (so identical curves stay visible on top of each other).
fn dash(p: PolicyKind) -> &'static str {
    match p {
        PolicyKind::Freetype => "none",
        PolicyKind::PerPage => "none",
        PolicyKind::PerPageBatched => "3 4",
        PolicyKind::FreetypePcp => "6 3",
        PolicyKind::UnmappedCache => "8 5",
        PolicyKind::LinuxPlacement => "none",
    }
}

/// A policy's marker: an SVG path drawn around (0, 0), about 8 px across.
fn marker(p: PolicyKind) -> &'static str {
    match p {
        // circle
        PolicyKind::Freetype => "M -4 0 a 4 4 0 1 0 8 0 a 4 4 0 1 0 -8 0 Z",
        // cross
        PolicyKind::PerPage => "M -4 -4 L 4 4 M -4 4 L 4 -4",
        // triangle down
        PolicyKind::PerPageBatched => "M -4 -3 L 4 -3 L 0 4 Z",
        // diamond
        PolicyKind::FreetypePcp => "M 0 -5 L 5 0 L 0 5 L -5 0 Z",
        // square
        PolicyKind::UnmappedCache => "M -4 -4 L 4 -4 L 4 4 L -4 4 Z",
        // triangle up
        PolicyKind::LinuxPlacement => "M -4 3 L 4 3 L 0 -4 Z",
    }
}

/// A policy's line colour (the intact plot and the sweep plot share it).
pub(crate) fn colour(p: PolicyKind) -> &'static str {
    match p {
        PolicyKind::Freetype => "#1b7837",
        PolicyKind::PerPage => "#d6604d",
        PolicyKind::PerPageBatched => "#f4a582",
        PolicyKind::FreetypePcp => "#5aae61",
        PolicyKind::UnmappedCache => "#2166ac",
        PolicyKind::LinuxPlacement => "#762a83",
    }
}

/// Escape text for XML.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `n` ticks over `span`.
pub fn nice_step(span: f64, n: u32) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / f64::from(n.max(1));
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Format a tick value compactly (`0`, `50k`, `1.2M`).
fn fmt_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `s` cut to at most `n` characters (with an ellipsis).
fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut o: String = s.chars().take(n.saturating_sub(1)).collect();
        o.push('…');
        o
    }
}

/// Render the plot.
pub fn render_svg(results: &[PolicyResult], title: &str) -> String {
    let xmax = results
        .iter()
        .flat_map(|r| r.intact_over_time.last().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let lowest = results
        .iter()
        .flat_map(|r| {
            r.intact_over_time
                .iter()
                .chain(r.never_split_over_time.iter())
                .map(|p| p.1)
        })
        .fold(1.0f64, f64::min);
    // Y axis in percent: from a round value below the lowest point up to 100.
    let ystep = nice_step((100.0 - lowest * 100.0).max(1.0), 5);
    let ymin = ((lowest * 100.0 / ystep).floor() * ystep).clamp(0.0, 100.0 - ystep);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |v: f64| LEFT + v / xmax * pw;
    let y = |pct: f64| TOP + (100.0 - pct) / (100.0 - ymin) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>
<text x="{}" y="28" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        xml_escape(&shorten(title, 110))
    );
    // Grid and ticks.
    let xstep = nice_step(xmax, 6);
    let mut v = 0.0;
    while v <= xmax + 1e-9 {
        let px = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e0e0e0"/><line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="black"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 20.0,
            fmt_count(v)
        );
        v += xstep;
    }
    let mut p = ymin;
    while p <= 100.0 + 1e-9 {
        let py = y(p);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e0e0e0"/><line x1="{:.1}" y1="{py:.1}" x2="{LEFT}" y2="{py:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}%</text>"##,
            LEFT + pw,
            LEFT - 5.0,
            LEFT - 8.0,
            py + 4.0,
            trim(p)
        );
        p += ystep;
    }
    // Axes and labels.
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b:.1}" stroke="black"/><line x1="{LEFT}" y1="{b:.1}" x2="{r:.1}" y2="{b:.1}" stroke="black"/>
<text x="{cx:.1}" y="{xl:.1}" text-anchor="middle">trace events replayed</text>
<text x="20" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 20 {cy:.1})">intact 2 MiB blocks (fully mapped or fully unmapped)</text>"#,
        b = TOP + ph,
        r = LEFT + pw,
        cx = LEFT + pw / 2.0,
        xl = TOP + ph + 45.0,
        cy = TOP + ph / 2.0
    );
    // A y axis that does not start at 0 is marked as cut, with a break on the axis.
    if ymin > 0.0 {
        let b = TOP + ph;
        let _ = writeln!(
            s,
            r##"<path d="M {:.1} {:.1} l 10 -4 l -10 -4 l 10 -4" fill="none" stroke="black" stroke-width="1.5"/><text x="{LEFT}" y="{:.1}" font-size="11" fill="#b2182b">y axis cut: starts at {}%, not 0</text>"##,
            LEFT - 5.0,
            b - 2.0,
            TOP - 8.0,
            trim(ymin)
        );
    }
    // Blocks never split (Linux never re-merges a split block): thin dotted lines.
    for r in results {
        let pts: Vec<String> = r
            .never_split_over_time
            .iter()
            .map(|&(e, share)| format!("{:.1},{:.1}", x(e as f64), y(share * 100.0)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.2" stroke-opacity="0.7" stroke-dasharray="1 3" points="{}"><title>{} never split</title></polyline>"#,
            colour(r.policy),
            pts.join(" "),
            r.policy
        );
    }
    // One polyline per policy, its markers, then the end labels and the legend.
    let same = same_curves(results);
    for (i, r) in results.iter().enumerate() {
        let pts: Vec<String> = r
            .intact_over_time
            .iter()
            .map(|&(e, share)| format!("{:.1},{:.1}", x(e as f64), y(share * 100.0)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="{}" stroke-dasharray="{}" points="{}"><title>{}</title></polyline>"#,
            colour(r.policy),
            if r.policy == PolicyKind::Freetype {
                4
            } else {
                2
            },
            dash(r.policy),
            pts.join(" "),
            r.policy
        );
        // Markers at a phase of their own, so identical curves show both shapes.
        let phase = (i as f64 + 0.5) / results.len().max(1) as f64;
        for k in 0..MARKERS {
            let at = (k as f64 + phase) / MARKERS as f64 * xmax;
            if let Some((e, share)) = sample(&r.intact_over_time, at) {
                let _ = writeln!(
                    s,
                    r#"<path class="marker" data-policy="{}" transform="translate({:.1} {:.1})" d="{}" fill="white" stroke="{}" stroke-width="1.5"/>"#,
                    r.policy,
                    x(e),
                    y(share * 100.0),
                    marker(r.policy),
                    colour(r.policy)
                );
            }
        }
    }
    // End labels: at each line's last point, pushed apart to LABEL_GAP, with a leader.
    let ends: Vec<f64> = results
        .iter()
        .map(|r| y(r.intact_over_time.last().map_or(1.0, |p| p.1) * 100.0))
        .collect();
    let placed = spread(&ends, LABEL_GAP, TOP + 4.0, TOP + ph + 4.0);
    let ex = LEFT + pw;
    for ((r, &ly), &ey) in results.iter().zip(&placed).zip(&ends) {
        let _ = writeln!(
            s,
            r#"<line x1="{ex:.1}" y1="{ey:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="1"/><text class="end-label" data-policy="{p}" x="{:.1}" y="{:.1}" font-size="11" fill="{c}">{p}</text>"#,
            ex + 8.0,
            ex + 10.0,
            ly + 4.0,
            c = colour(r.policy),
            p = r.policy,
        );
    }
    let lx = LEFT + pw + END_COL + 20.0;
    let notes = legend_notes(results);
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="white" stroke="#999"/>"##,
        lx - 10.0,
        RIGHT - END_COL - 30.0,
        22.0 * results.len() as f64
            + 14.0 * (same.iter().flatten().count() + notes.len()) as f64
            + 58.0
    );
    let mut ly = TOP + 20.0;
    for (r, twin) in results.iter().zip(&same) {
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3" stroke-dasharray="{}"/><path transform="translate({:.1} {ly:.1})" d="{}" fill="white" stroke="{}" stroke-width="1.5"/><text x="{:.1}" y="{:.1}" font-size="11">{}: {:.1}% ({:.1}% never split), {} blocks</text>"#,
            lx + 24.0,
            colour(r.policy),
            dash(r.policy),
            lx + 12.0,
            marker(r.policy),
            colour(r.policy),
            lx + 30.0,
            ly + 4.0,
            r.policy,
            r.intact_share_end * 100.0,
            r.never_split_share * 100.0,
            r.blocks
        );
        ly += 22.0;
        if let Some(t) = twin {
            let _ = writeln!(
                s,
                r#"<text class="same-curve" x="{:.1}" y="{:.1}" font-size="10">  (the same curve as {t}: drawn on top of it)</text>"#,
                lx + 30.0,
                ly - 8.0
            );
            ly += 14.0;
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{lx:.1}" y="{ly:.1}" font-size="10">solid: intact now (assumes re-merging)</text><text x="{lx:.1}" y="{:.1}" font-size="10">dotted: never split (no re-merge, as Linux)</text>"#,
        ly + 14.0
    );
    ly += 28.0;
    for n in &notes {
        let _ = writeln!(
            s,
            r#"<text class="note" x="{lx:.1}" y="{ly:.1}" font-size="10">{}</text>"#,
            xml_escape(n)
        );
        ly += 14.0;
    }
    s.push_str("</svg>\n");
    s
}

/// For each result, the earlier policy whose intact curve it repeats exactly, if any.
fn same_curves(results: &[PolicyResult]) -> Vec<Option<PolicyKind>> {
    results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            results[..i]
                .iter()
                .find(|o| o.intact_over_time == r.intact_over_time)
                .map(|o| o.policy)
        })
        .collect()
}

/// `curve` (sorted by event) at event `at`, interpolated between its points (its first or last
/// point outside them).
fn sample(curve: &[(u64, f64)], at: f64) -> Option<(f64, f64)> {
    let i = curve.partition_point(|p| (p.0 as f64) < at);
    let (a, b) = match (i.checked_sub(1).and_then(|j| curve.get(j)), curve.get(i)) {
        (Some(a), Some(b)) => (a, b),
        (None, Some(p)) | (Some(p), None) => return Some((p.0 as f64, p.1)),
        (None, None) => return None,
    };
    let t = (at - a.0 as f64) / (b.0 as f64 - a.0 as f64).max(1e-12);
    Some((at, a.1 + (b.1 - a.1) * t.clamp(0.0, 1.0)))
}

/// Label positions for wanted positions `want`: each as near its own as it can be, no two
/// closer than `gap`, all within `[lo, hi]` (closer only if they cannot fit). Keeps the order.
fn spread(want: &[f64], gap: f64, lo: f64, hi: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..want.len()).collect();
    order.sort_by(|&a, &b| want[a].total_cmp(&want[b]).then(a.cmp(&b)));
    let mut at: Vec<f64> = order.iter().map(|&i| want[i].clamp(lo, hi)).collect();
    // Push down, then pull back up from the bottom edge.
    for k in 1..at.len() {
        at[k] = at[k].max(at[k - 1] + gap);
    }
    if let Some(last) = at.last_mut() {
        *last = last.min(hi);
    }
    for k in (0..at.len().saturating_sub(1)).rev() {
        at[k] = at[k].min(at[k + 1] - gap);
    }
    let mut out = vec![0.0; want.len()];
    for (k, &i) in order.iter().enumerate() {
        out[i] = at[k];
    }
    out
}

/// Lines under the legend that explain what the figures cannot: why linux-placement has more
/// blocks than the others.
fn legend_notes(results: &[PolicyResult]) -> Vec<String> {
    let mut n = Vec::new();
    let Some(lp) = results
        .iter()
        .find(|r| r.policy == PolicyKind::LinuxPlacement)
    else {
        return n;
    };
    let span_mib = lp.blocks * 2;
    let span = if span_mib >= 1024 && span_mib % 1024 == 0 {
        format!("{} GiB", span_mib / 1024)
    } else {
        format!("{span_mib} MiB")
    };
    n.push(format!(
        "linux-placement: {} blocks = the {span} of PFNs",
        lp.blocks
    ));
    n.push("the trace touched (Linux's own placement), holes".into());
    n.push("and all; the others on --mem or the peak live".into());
    if let Some(o) = results
        .iter()
        .find(|r| r.policy != PolicyKind::LinuxPlacement)
    {
        n.push(format!(
            "pages plus --headroom ({} blocks): compare shares.",
            o.blocks
        ));
    } else {
        n.push("pages plus --headroom: compare shares.".into());
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{classify, Rules};
    use crate::policy::{self, Layout, RunOptions, RESERVED_PAGES};
    use crate::trace::{load, LoadOptions};
    use crate::tracker::PureModel;

    /// A real result (two allocations replayed), then given `kind` and `curve`.
    fn result(kind: PolicyKind, curve: &[(u64, f64)], blocks: u64) -> PolicyResult {
        let line = |pfn: u64| {
            format!("  t-1 [000] ..... 1.000001: mm_page_alloc: page=x pfn={pfn:#x} order=0 migratetype=0 gfp_flags=GFP_KERNEL_ACCOUNT\n")
        };
        let text = line(0x10000) + &line(0x10200);
        let mut t = load(text.as_bytes(), LoadOptions::default()).unwrap();
        classify(&mut t, &Rules::default()).unwrap();
        let l = Layout {
            base_pfn: RESERVED_PAGES,
            nr_pages: 2048,
            trace_base_pfn: 0,
        };
        let (mut r, _) = policy::run(
            PolicyKind::PerPage,
            &t,
            l,
            PureModel,
            &RunOptions::default(),
        );
        r.policy = kind;
        r.intact_over_time = curve.to_vec();
        r.never_split_over_time = curve.to_vec();
        r.intact_share_end = curve.last().unwrap().1;
        r.blocks = blocks;
        r
    }

    /// The value of attribute `name` in the element that `at` points into.
    fn attr(svg: &str, at: usize, name: &str) -> String {
        let start = svg[..at].rfind('<').unwrap();
        let end = at + svg[at..].find('>').unwrap();
        let el = &svg[start..end];
        let k = el.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        el[k..k + el[k..].find('"').unwrap()].to_string()
    }

    fn end_label_y(svg: &str, p: PolicyKind) -> f64 {
        let at = svg
            .find(&format!("class=\"end-label\" data-policy=\"{p}\""))
            .unwrap_or_else(|| panic!("no end label for {p}"));
        attr(svg, at, "y").parse().unwrap()
    }

    #[test]
    fn identical_curves_stay_apart_and_are_named() {
        let curve = [(0, 1.0), (50, 0.98), (100, 0.97)];
        let rs = [
            result(PolicyKind::Freetype, &curve, 64),
            result(PolicyKind::UnmappedCache, &curve, 64),
            result(PolicyKind::PerPage, &[(0, 1.0), (100, 0.5)], 64),
        ];
        let svg = render_svg(&rs, "t");
        // Both coinciding lines are named at their end, labels at least LABEL_GAP apart.
        let (a, b) = (
            end_label_y(&svg, PolicyKind::Freetype),
            end_label_y(&svg, PolicyKind::UnmappedCache),
        );
        assert!((a - b).abs() >= LABEL_GAP - 1e-9, "{a} {b}");
        // Different dash patterns and marker shapes, markers at different x.
        assert_ne!(dash(PolicyKind::Freetype), dash(PolicyKind::UnmappedCache));
        let xs = |p: PolicyKind| -> Vec<String> {
            svg.match_indices(&format!("class=\"marker\" data-policy=\"{p}\""))
                .map(|(i, _)| attr(&svg, i, "transform"))
                .collect()
        };
        let (ft, uc) = (xs(PolicyKind::Freetype), xs(PolicyKind::UnmappedCache));
        assert_eq!((ft.len(), uc.len()), (MARKERS, MARKERS));
        assert!(ft.iter().all(|t| !uc.contains(t)), "{ft:?} {uc:?}");
        assert!(svg.contains(marker(PolicyKind::UnmappedCache)));
        assert!(svg.contains(marker(PolicyKind::Freetype)));
        // The legend says which curve is repeated, and only that one.
        assert_eq!(svg.matches("class=\"same-curve\"").count(), 1, "{svg}");
        assert!(svg.contains("the same curve as freetype"), "{svg}");
        // Well-formed XML.
        let mut r = quick_xml::Reader::from_str(&svg);
        while !matches!(r.read_event().unwrap(), quick_xml::events::Event::Eof) {}
    }

    #[test]
    fn a_cut_y_axis_is_marked_and_a_full_one_is_not() {
        let cut = render_svg(
            &[result(PolicyKind::Freetype, &[(0, 1.0), (9, 0.96)], 8)],
            "t",
        );
        assert!(cut.contains("y axis cut: starts at 96%, not 0"), "{cut}");
        assert!(cut.contains("l 10 -4 l -10 -4 l 10 -4"), "break mark");
        let full = render_svg(
            &[result(PolicyKind::PerPage, &[(0, 1.0), (9, 0.1)], 8)],
            "t",
        );
        assert!(!full.contains("y axis cut"), "{full}");
        assert!(full.contains(">0%</text>"), "{full}");
    }

    #[test]
    fn linux_placement_block_count_is_explained() {
        let c = [(0, 1.0), (9, 0.9)];
        let svg = render_svg(
            &[
                result(PolicyKind::Freetype, &c, 40),
                result(PolicyKind::LinuxPlacement, &[(0, 1.0), (9, 0.5)], 4096),
            ],
            "t",
        );
        assert!(
            svg.contains("linux-placement: 4096 blocks = the 8 GiB of PFNs"),
            "{svg}"
        );
        assert!(svg.contains("pages plus --headroom (40 blocks)"), "{svg}");
        let none = render_svg(&[result(PolicyKind::Freetype, &c, 40)], "t");
        assert!(!none.contains("class=\"note\""));
    }

    #[test]
    fn labels_spread_in_order_within_bounds() {
        assert_eq!(
            spread(&[10.0, 10.0, 10.0], 5.0, 0.0, 100.0),
            vec![10.0, 15.0, 20.0]
        );
        assert_eq!(spread(&[100.0, 99.0], 5.0, 0.0, 100.0), vec![100.0, 95.0]);
        assert_eq!(spread(&[50.0, 0.0], 5.0, 0.0, 100.0), vec![50.0, 0.0]);
        let s = spread(&[98.0, 98.0, 98.0], 5.0, 0.0, 100.0);
        assert_eq!(s, vec![90.0, 95.0, 100.0]);
        assert_eq!(sample(&[(0, 1.0), (10, 0.5)], 5.0), Some((5.0, 0.75)));
        assert_eq!(sample(&[(0, 1.0), (10, 0.5)], 50.0), Some((10.0, 0.5)));
        assert_eq!(sample(&[(3, 1.0)], 0.0), Some((3.0, 1.0)));
        assert_eq!(sample(&[], 5.0), None);
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(234_000.0, 6), 50_000.0);
        assert_eq!(nice_step(3.0, 5), 1.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
        assert_eq!(fmt_count(150_000.0), "150k");
        assert_eq!(fmt_count(1_500_000.0), "1.5M");
        assert_eq!(xml_escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
