//! The SVG dump: one cell per pageblock, coloured by state, with a legend and a title.

use std::fmt::Write;

use replay::plot::xml_escape;

use super::{text::human, DumpData};
use crate::stage2::RangeState;

/// Class of a pageblock cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellClass {
    /// Every page reserved.
    Reserved,
    /// Every page mapped, one freetype.
    Mapped,
    /// Every page unmapped, one freetype.
    Unmapped,
    /// Every page locked by the guest the same way (`Hc::Protect`: read-only, or no-access).
    Locked,
    /// Every page sensitive (ASI: mapped in the full view only).
    Sensitive,
    /// More than one state or freetype inside the block.
    Mixed,
}

impl CellClass {
    /// All classes, in legend order.
    pub const ALL: [CellClass; 6] = [
        CellClass::Reserved,
        CellClass::Mapped,
        CellClass::Unmapped,
        CellClass::Locked,
        CellClass::Sensitive,
        CellClass::Mixed,
    ];

    /// CSS class / legend name.
    pub const fn name(self) -> &'static str {
        match self {
            CellClass::Reserved => "reserved",
            CellClass::Mapped => "mapped",
            CellClass::Unmapped => "unmapped",
            CellClass::Locked => "locked",
            CellClass::Sensitive => "sensitive",
            CellClass::Mixed => "mixed",
        }
    }

    /// Fill colour.
    pub const fn colour(self) -> &'static str {
        match self {
            CellClass::Reserved => "#9e9e9e",
            CellClass::Mapped => "#4caf50",
            CellClass::Unmapped => "#d32f2f",
            CellClass::Locked => "#1e88e5",
            CellClass::Sensitive => "#8e24aa",
            CellClass::Mixed => "#ffb300",
        }
    }
}

/// One pageblock cell: its GPA range, class and a description for the tooltip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// First GPA of the block.
    pub start: u64,
    /// End of the block (clipped to RAM).
    pub end: u64,
    /// Class.
    pub class: CellClass,
    /// "state freetype slot" of each piece, joined by "; ".
    pub detail: String,
}

/// Classifies every pageblock of RAM from the dump's ranges (O(blocks + ranges)).
pub fn cells(d: &DumpData) -> Vec<Cell> {
    let mut out = Vec::with_capacity(d.totals.pageblocks as usize);
    let mut j = 0;
    let pb = d.pageblock_size;
    let mut start = 0;
    while start < d.ram_size {
        let end = (start + pb).min(d.ram_size);
        while j < d.ranges.len() && d.ranges[j].end <= start {
            j += 1;
        }
        let mut k = j;
        let mut pieces: Vec<(RangeState, &str, Option<u32>, Option<&str>)> = Vec::new();
        while k < d.ranges.len() && d.ranges[k].start < end {
            let r = &d.ranges[k];
            pieces.push((r.state, r.freetype.as_str(), r.slot, r.owner.as_deref()));
            k += 1;
        }
        let class = match pieces.as_slice() {
            [(RangeState::Reserved, ..)] => CellClass::Reserved,
            [(RangeState::Mapped, ..)] => CellClass::Mapped,
            [(RangeState::Unmapped, ..)] => CellClass::Unmapped,
            [(RangeState::ReadOnly | RangeState::NoAccess, ..)] => CellClass::Locked,
            [(RangeState::Sensitive, ..)] => CellClass::Sensitive,
            _ => CellClass::Mixed,
        };
        let detail = pieces
            .iter()
            .map(|(s, f, slot, owner)| {
                format!(
                    "{s} {f} slot {}{}",
                    slot.map_or("-".into(), |v| v.to_string()),
                    owner.map_or(String::new(), |o| format!(" owner {o}"))
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push(Cell {
            start,
            end,
            class,
            detail,
        });
        start = end;
    }
    out
}

const CELL: u64 = 12;
const GAP: u64 = 2;
const COLS: u64 = 64;
const MARGIN: u64 = 10;
const TITLE_H: u64 = 44;
const LEGEND_H: u64 = 30;
/// Horizontal room of one legend entry.
const LEGEND_STEP: u64 = 150;

/// Renders the SVG dump.
pub fn render(d: &DumpData) -> String {
    let cells = cells(d);
    let n = cells.len() as u64;
    let cols = n.clamp(1, COLS);
    let rows = n.div_ceil(cols).max(1);
    let grid_w = cols * (CELL + GAP);
    // Wide enough for the grid and for the legend (150 px per class).
    let width = (2 * MARGIN + grid_w).max(2 * MARGIN + CellClass::ALL.len() as u64 * LEGEND_STEP);
    let height = TITLE_H + rows * (CELL + GAP) + LEGEND_H + 2 * MARGIN;
    let mut counts = [0u64; CellClass::ALL.len()];
    for c in &cells {
        if let Some(i) = CellClass::ALL.iter().position(|k| *k == c.class) {
            counts[i] += 1;
        }
    }
    let t = &d.totals;
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = (|| -> std::fmt::Result {
        writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
        writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">"#
        )?;
        writeln!(o, "<style>.cell{{stroke:#333;stroke-width:0.3}}</style>")?;
        writeln!(
            o,
            r#"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"#
        )?;
        writeln!(
            o,
            r#"<text x="{MARGIN}" y="18" font-size="13" font-weight="bold">Veil stage 2 — {} — RAM {}, {} pageblocks of {}</text>"#,
            xml_escape(&d.reason),
            human(d.ram_size),
            n,
            human(d.pageblock_size)
        )?;
        let flips = match &d.allocator {
            Some(a) => format!(
                "{} flips to unmapped, {} to mapped",
                a.flips_to_unmapped, a.flips_to_mapped
            ),
            None => "no allocator".to_string(),
        };
        let secret = d
            .ranges
            .iter()
            .filter(|r| r.owner.as_deref() == Some(super::OWNER_SECRET))
            .map(|r| r.pages)
            .sum::<u64>();
        let secret = if secret > 0 {
            format!(" ({secret} of them --secret)")
        } else {
            String::new()
        };
        writeln!(
            o,
            r#"<text x="{MARGIN}" y="34">pages: {} reserved, {} mapped, {} unmapped{secret}, {} sensitive; ASI view {}; {} memslots; {flips}</text>"#,
            t.reserved_pages,
            t.mapped_pages,
            t.unmapped_pages,
            t.sensitive_pages,
            d.asi_view.name(),
            t.memslots,
        )?;
        writeln!(o, r#"<g id="pageblocks">"#)?;
        for (i, c) in cells.iter().enumerate() {
            let i = i as u64;
            let x = MARGIN + (i % cols) * (CELL + GAP);
            let y = TITLE_H + (i / cols) * (CELL + GAP);
            writeln!(
                o,
                r#"<rect class="cell {}" x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{}"><title>pageblock {i} [{:#x}, {:#x}): {}</title></rect>"#,
                c.class.name(),
                c.class.colour(),
                c.start,
                c.end,
                xml_escape(&c.detail)
            )?;
        }
        writeln!(o, "</g>")?;
        let ly = TITLE_H + rows * (CELL + GAP) + MARGIN;
        writeln!(o, r#"<g id="legend">"#)?;
        for (k, class) in CellClass::ALL.iter().enumerate() {
            let x = MARGIN + k as u64 * LEGEND_STEP;
            writeln!(
                o,
                r#"<rect x="{x}" y="{ly}" width="{CELL}" height="{CELL}" fill="{}" stroke="black" stroke-width="0.3"/><text x="{}" y="{}">{} ({})</text>"#,
                class.colour(),
                x + CELL + 5,
                ly + CELL - 2,
                class.name(),
                counts[k]
            )?;
        }
        writeln!(o, "</g>")?;
        writeln!(o, "</svg>")
    })();
    o
}
