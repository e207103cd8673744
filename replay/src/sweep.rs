//! `--sweep KEY=V1,V2,...`: one replay per value of `headroom` or `unmapped-fraction`, sharing
//! the parsed trace, summarised in one table and one plot.

use std::fmt::Write;

use serde::Serialize;

use crate::plot::{colour, nice_step, xml_escape};
use crate::policy::{PolicyKind, PolicyResult};

/// What a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SweepKey {
    /// `--headroom` (percent over the peak live pages).
    Headroom,
    /// `--unmapped-fraction` (0 to 1).
    UnmappedFraction,
}

impl SweepKey {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            SweepKey::Headroom => "headroom",
            SweepKey::UnmappedFraction => "unmapped-fraction",
        }
    }
}

/// A parsed `--sweep`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sweep {
    /// The option varied.
    pub key: SweepKey,
    /// Its values, in the order given.
    pub values: Vec<f64>,
}

/// Most values one sweep may have.
pub const MAX_SWEEP_VALUES: usize = 64;

/// Parse `headroom=0,5,10` or `unmapped-fraction=0.1,0.5` (a clap value parser: errors are
/// usage errors).
pub fn parse_sweep(s: &str) -> Result<Sweep, String> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected KEY=V1,V2,... (KEY: headroom or unmapped-fraction)")
    })?;
    let key = match k.trim() {
        "headroom" => SweepKey::Headroom,
        "unmapped-fraction" => SweepKey::UnmappedFraction,
        other => {
            return Err(format!(
                "unknown sweep key {other:?} (use headroom or unmapped-fraction)"
            ))
        }
    };
    let mut values = Vec::new();
    for part in v.split(',') {
        let t = part.trim();
        let x: f64 = match key {
            SweepKey::Headroom => t
                .parse::<u32>()
                .map_err(|_| format!("headroom value {t:?} is not a whole percentage (0 to 1000)"))
                .and_then(|n| {
                    if n <= 1000 {
                        Ok(f64::from(n))
                    } else {
                        Err(format!("headroom value {n} above 1000 %"))
                    }
                })?,
            SweepKey::UnmappedFraction => t
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| format!("unmapped-fraction value {t:?} is not between 0 and 1"))?,
        };
        if values.contains(&x) {
            return Err(format!("sweep value {t} given twice"));
        }
        values.push(x);
    }
    if values.len() > MAX_SWEEP_VALUES {
        return Err(format!("at most {MAX_SWEEP_VALUES} sweep values"));
    }
    Ok(Sweep { key, values })
}

/// One value's replays.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// The value.
    pub value: f64,
    /// Unmapped allocations under it.
    pub unmapped_allocs: u64,
    /// One result per policy.
    pub policies: Vec<PolicyResult>,
}

/// A whole sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    /// What was varied.
    pub sweep: Sweep,
    /// One row per value.
    pub rows: Vec<SweepRow>,
}

fn fmt_value(key: SweepKey, v: f64) -> String {
    match key {
        SweepKey::Headroom => format!("{v:.0}%"),
        SweepKey::UnmappedFraction => format!("{v}"),
    }
}

/// The sweep as a text table.
pub fn render_text(r: &SweepReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sweep over {} ({} values, one replay per value and policy, one parse of the trace)",
        r.sweep.key.name(),
        r.rows.len()
    );
    let _ = writeln!(
        s,
        "{:>8} {:<16} {:>9} {:>10} {:>10} {:>11} {:>10} {:>9} {:>9} {:>13} {:>12}",
        r.sweep.key.name().split('-').next().unwrap_or(""),
        "policy",
        "memory",
        "s2 upd/1k",
        "shootdn/1k",
        "intact min",
        "ever split",
        "fail map",
        "fail unm",
        "stranded max",
        "compacted"
    );
    for row in &r.rows {
        for p in &row.policies {
            let stranded = p.stranded.as_ref().map_or("-".to_string(), |st| {
                format!(
                    "{:.1}/{:.1}M",
                    st.worst_for_mapped as f64 / 256.0,
                    st.worst_for_unmapped as f64 / 256.0
                )
            });
            let compacted = p.compaction.as_ref().map_or("-".to_string(), |c| {
                format!("{}<-{}", p.failures.total(), c.failures_without.total())
            });
            let _ = writeln!(
                s,
                "{:>8} {:<16} {:>9} {:>10.2} {:>10.2} {:>10.1}% {:>10} {:>9} {:>9} {:>13} {:>12}",
                fmt_value(r.sweep.key, row.value),
                p.policy.name(),
                format!("{:.0} MiB", p.layout.nr_pages as f64 / 256.0),
                p.updates_per_1k_allocs,
                p.flush.shootdowns_per_1k_allocs,
                p.intact_share_worst * 100.0,
                format!("{}/{}", p.ever_split_blocks, p.blocks),
                p.failures_by_kind.mapped_total(),
                p.failures_by_kind.unmapped_total(),
                stranded,
                compacted
            );
        }
    }
    let _ = writeln!(
        s,
        "fail map / fail unm: failed mapped / unmapped requests; stranded max: most free MiB in partly used blocks of the other kind\n(unusable by mapped / by unmapped requests without compaction); compacted: failures with <- without --compaction."
    );
    s
}

const W: f64 = 960.0;
const H: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;

/// The sweep plot: failed allocations per 1,000 against the swept value, one line per policy
/// (the y axis starts at 0; nothing is cut off).
pub fn render_svg(r: &SweepReport, title: &str) -> String {
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let xs: Vec<f64> = r.rows.iter().map(|row| row.value).collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (xmin, xmax) = if xmin < xmax {
        (xmin, xmax)
    } else {
        (xmin - 1.0, xmin + 1.0)
    };
    let fail_per_1k = |p: &PolicyResult| {
        if p.allocs == 0 {
            0.0
        } else {
            p.failures.total() as f64 * 1000.0 / p.allocs as f64
        }
    };
    let ymax_raw = r
        .rows
        .iter()
        .flat_map(|row| row.policies.iter().map(fail_per_1k))
        .fold(0.0f64, f64::max);
    let ystep = nice_step(ymax_raw.max(1.0), 5);
    let ymax = (ymax_raw / ystep).ceil().max(1.0) * ystep;
    let x = |v: f64| LEFT + (v - xmin) / (xmax - xmin) * pw;
    let y = |v: f64| TOP + (1.0 - v / ymax) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>
<text x="{}" y="28" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let py = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 8.0,
            py + 4.0,
            (v * 100.0).round() / 100.0
        );
        v += ystep;
    }
    for &xv in &xs {
        let px = x(xv);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e0e0e0"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 20.0,
            xml_escape(&fmt_value(r.sweep.key, xv))
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b:.1}" stroke="black"/><line x1="{LEFT}" y1="{b:.1}" x2="{r:.1}" y2="{b:.1}" stroke="black"/>
<text x="{cx:.1}" y="{xl:.1}" text-anchor="middle">{key}</text>
<text x="20" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 20 {cy:.1})">failed allocations per 1,000 (axis from 0)</text>"#,
        b = TOP + ph,
        r = LEFT + pw,
        cx = LEFT + pw / 2.0,
        xl = TOP + ph + 45.0,
        cy = TOP + ph / 2.0,
        key = r.sweep.key.name()
    );
    let kinds: Vec<PolicyKind> = r
        .rows
        .first()
        .map(|row| row.policies.iter().map(|p| p.policy).collect())
        .unwrap_or_default();
    for (i, &k) in kinds.iter().enumerate() {
        let pts: Vec<String> = r
            .rows
            .iter()
            .filter_map(|row| {
                row.policies
                    .iter()
                    .find(|p| p.policy == k)
                    .map(|p| (row.value, p))
            })
            .map(|(v, p)| format!("{:.1},{:.1}", x(v), y(fail_per_1k(p))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"><title>{k}</title></polyline>"#,
            pts.join(" "),
            c = colour(k)
        );
        let ly = TOP + 20.0 + 22.0 * i as f64;
        let lx = LEFT + pw + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{k}</text>"#,
            lx + 24.0,
            colour(k),
            lx + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_spellings() {
        let s = parse_sweep("headroom=0,5,10,25,50").unwrap();
        assert_eq!(
            (s.key, s.values),
            (SweepKey::Headroom, vec![0.0, 5.0, 10.0, 25.0, 50.0])
        );
        let s = parse_sweep("unmapped-fraction=0.1,0.5,1").unwrap();
        assert_eq!(s.values, vec![0.1, 0.5, 1.0]);
        for bad in [
            "headroom",
            "headroom=",
            "headroom=1,,2",
            "headroom=-5",
            "headroom=2.5",
            "headroom=5,5",
            "unmapped-fraction=1.5",
            "unmapped-fraction=NaN",
            "mem=1G",
            "=1",
        ] {
            assert!(parse_sweep(bad).is_err(), "{bad}");
        }
    }
}
