//! SVG plot: share of intact 2 MiB blocks over the replay, one polyline per policy.

use std::fmt::Write;

use crate::policy::{PolicyKind, PolicyResult};

const W: f64 = 960.0;
const H: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 330.0;
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

/// Colour of a policy's line.
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
    // One polyline per policy, then the legend.
    for r in results {
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
    }
    let lx = LEFT + pw + 20.0;
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="white" stroke="#999"/>"##,
        lx - 10.0,
        RIGHT - 20.0,
        22.0 * results.len() as f64 + 58.0
    );
    for (i, r) in results.iter().enumerate() {
        let ly = TOP + 20.0 + 22.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3" stroke-dasharray="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{}: {:.1}% ({:.1}% never split), {} blocks</text>"#,
            lx + 24.0,
            colour(r.policy),
            dash(r.policy),
            lx + 30.0,
            ly + 4.0,
            r.policy,
            r.intact_share_end * 100.0,
            r.never_split_share * 100.0,
            r.blocks
        );
    }
    let ly = TOP + 20.0 + 22.0 * results.len() as f64;
    let _ = writeln!(
        s,
        r#"<text x="{lx:.1}" y="{ly:.1}" font-size="10">solid: intact now (assumes re-merging)</text><text x="{lx:.1}" y="{:.1}" font-size="10">dotted: never split (no re-merge, as Linux)</text>"#,
        ly + 14.0
    );
    if results
        .iter()
        .any(|r| r.policy == PolicyKind::LinuxPlacement)
    {
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{:.1}" font-size="10">linux-placement spans every PFN the trace</text><text x="{lx:.1}" y="{:.1}" font-size="10">touched (more blocks): compare counts too</text>"#,
            ly + 28.0,
            ly + 42.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
