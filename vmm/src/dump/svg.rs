//! The SVG dump: a picture of guest physical memory a person can read at any RAM size.
//!
//! Layout, top to bottom: the title and totals, the legend (which says how many pageblocks
//! one cell stands for), a GPA axis (offsets within a row), then rows of cells, each row
//! labelled with the GPA it starts at. Memslot boundaries are dark vertical bars at their
//! exact GPA. Up to [`MAX_CELLS`] cells: a larger RAM aggregates N pageblocks per cell (N a
//! power of two), and a cell takes the colour of the worst state among its pages (unmapped >
//! sensitive > locked > mapped > reserved), so one unmapped pageblock in 64 GiB is still one
//! red cell; a cell holding more than one state gets an amber bar along its bottom.

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

    /// How much a cell of several classes shows this one: the highest wins.
    pub const fn severity(self) -> u8 {
        match self {
            CellClass::Reserved => 0,
            CellClass::Mapped => 1,
            CellClass::Mixed => 2,
            CellClass::Locked => 3,
            CellClass::Sensitive => 4,
            CellClass::Unmapped => 5,
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

/// The class of a page in `state`.
const fn state_class(state: RangeState) -> CellClass {
    match state {
        RangeState::Reserved => CellClass::Reserved,
        RangeState::Mapped => CellClass::Mapped,
        RangeState::Unmapped => CellClass::Unmapped,
        RangeState::ReadOnly | RangeState::NoAccess => CellClass::Locked,
        RangeState::Sensitive => CellClass::Sensitive,
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
    /// The most severe state among its pieces (never [`CellClass::Mixed`]).
    pub worst: CellClass,
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
        let worst = pieces
            .iter()
            .map(|p| state_class(p.0))
            .max_by_key(|c| c.severity())
            .unwrap_or(CellClass::Reserved);
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
            worst,
            detail,
        });
        start = end;
    }
    out
}

/// Most cells drawn: beyond it, pageblocks are aggregated N (a power of two) per cell. 4,096
/// cells keep a 64 GiB dump (32 k pageblocks, 8 per cell) under 1 MB and one screen.
pub const MAX_CELLS: u64 = 4096;
/// Cell side and gap, in px.
const CELL: u64 = 10;
const GAP: u64 = 1;
const PITCH: u64 = CELL + GAP;
/// Cells per row: 64, or 128 once there are more than 1,024 cells.
const COLS_SMALL: u64 = 64;
const COLS_LARGE: u64 = 128;
const MARGIN: u64 = 10;
/// Room for the row labels (GPA of the row's first cell).
const LABEL_W: u64 = 140;
/// Where the legend's swatches sit, the axis labels, and the first row.
const LEGEND_Y: u64 = 46;
const AXIS_Y: u64 = 100;
const GRID_Y: u64 = 108;
/// Horizontal room of one legend entry.
const LEGEND_STEP: u64 = 170;
/// Most memslot boundaries drawn (the rest are counted in the legend).
const MAX_BOUNDARIES: usize = 4096;
/// The amber of a cell holding more than one state.
const MIXED_MARK: &str = "#ffb300";
/// Colour of a memslot boundary.
const BOUNDARY: &str = "#000000";

/// One drawn cell: `blocks` consecutive pageblocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tile {
    /// First GPA.
    pub start: u64,
    /// End (clipped to RAM).
    pub end: u64,
    /// Index of its first pageblock.
    pub first_block: u64,
    /// Pageblocks in it.
    pub blocks: u64,
    /// Its fill: the worst class of its pages.
    pub worst: CellClass,
    /// Whether it holds more than one class.
    pub mixed: bool,
    /// The tooltip.
    pub detail: String,
}

/// Pageblocks per cell for `blocks` pageblocks: the smallest power of two that keeps the
/// cells at or under [`MAX_CELLS`].
pub fn blocks_per_cell(blocks: u64) -> u64 {
    blocks.div_ceil(MAX_CELLS).max(1).next_power_of_two()
}

/// Groups the pageblock cells `per` at a time.
pub fn tiles(cells: &[Cell], per: u64) -> Vec<Tile> {
    cells
        .chunks(per.max(1) as usize)
        .enumerate()
        .map(|(i, chunk)| {
            let worst = chunk
                .iter()
                .map(|c| c.worst)
                .max_by_key(|c| c.severity())
                .unwrap_or(CellClass::Reserved);
            let mixed = chunk.iter().any(|c| c.class == CellClass::Mixed)
                || chunk.iter().any(|c| c.class != chunk[0].class);
            let first_block = i as u64 * per;
            let (start, end) = (chunk[0].start, chunk[chunk.len() - 1].end);
            let detail = if chunk.len() == 1 {
                format!(
                    "pageblock {first_block} [{start:#x}, {end:#x}): {}",
                    chunk[0].detail
                )
            } else {
                let counts: Vec<String> = CellClass::ALL
                    .iter()
                    .filter_map(|k| {
                        let n = chunk.iter().filter(|c| c.class == *k).count();
                        (n > 0).then(|| format!("{n} {}", k.name()))
                    })
                    .collect();
                format!(
                    "pageblocks {first_block}-{} [{start:#x}, {end:#x}): {}",
                    first_block + chunk.len() as u64 - 1,
                    counts.join(", ")
                )
            };
            Tile {
                start,
                end,
                first_block,
                blocks: chunk.len() as u64,
                worst,
                mixed,
                detail,
            }
        })
        .collect()
}

/// Cells per row for `tiles` cells.
pub fn columns(tiles: u64) -> u64 {
    if tiles > 1024 { COLS_LARGE } else { COLS_SMALL }.min(tiles.max(1))
}

/// Top-left corner (px) of cell `index` of `tiles` cells.
pub fn tile_origin(tiles: u64, index: u64) -> (u64, u64) {
    let cols = columns(tiles);
    (
        LABEL_W + (index % cols) * PITCH,
        GRID_Y + (index / cols) * PITCH,
    )
}

/// Top-left corner (px) of the legend swatch of `class`.
pub fn legend_swatch(class: CellClass) -> (u64, u64) {
    let k = CellClass::ALL.iter().position(|c| *c == class).unwrap_or(0) as u64;
    (MARGIN + k * LEGEND_STEP, LEGEND_Y)
}

/// The layout of a dump's grid.
struct Grid {
    cols: u64,
    rows: u64,
    /// GPA bytes one cell covers.
    cell_bytes: u64,
}

impl Grid {
    /// x of a GPA inside its row, and its row.
    fn place(&self, gpa: u64) -> (f64, u64) {
        let cell = gpa / self.cell_bytes;
        let frac = (gpa % self.cell_bytes) as f64 / self.cell_bytes as f64;
        let x = (LABEL_W + (cell % self.cols) * PITCH) as f64 + frac * PITCH as f64;
        (x, cell / self.cols)
    }

    fn row_y(&self, row: u64) -> u64 {
        GRID_Y + row * PITCH
    }
}

/// A GPA as the row labels show it: hex with `_` every 4 digits.
fn gpa_label(gpa: u64) -> String {
    let hex = format!("{gpa:09x}");
    let mut out = String::from("0x");
    let n = hex.len();
    for (i, ch) in hex.chars().enumerate() {
        if i > 0 && (n - i) % 4 == 0 {
            out.push('_');
        }
        out.push(ch);
    }
    out
}

/// The memslot boundaries strictly inside RAM, sorted, each once.
fn boundaries(d: &DumpData) -> Vec<u64> {
    let mut b: Vec<u64> = d
        .memslots
        .iter()
        .flat_map(|s| [s.gpa, s.gpa.saturating_add(s.len)])
        .filter(|&g| g > 0 && g < d.ram_size)
        .collect();
    b.sort_unstable();
    b.dedup();
    b
}

/// Renders the SVG dump.
pub fn render(d: &DumpData) -> String {
    let cells = cells(d);
    let n_blocks = cells.len() as u64;
    let per = blocks_per_cell(n_blocks);
    let tiles = tiles(&cells, per);
    let n = tiles.len() as u64;
    let cols = columns(n);
    let grid = Grid {
        cols,
        rows: n.div_ceil(cols).max(1),
        cell_bytes: per * d.pageblock_size.max(1),
    };
    let grid_w = cols * PITCH;
    let legend_w = (CellClass::ALL.len() as u64 + 1) * LEGEND_STEP;
    // Room on the right for the last axis label.
    let width = (LABEL_W + grid_w + 5 * MARGIN).max(2 * MARGIN + legend_w);
    let height = GRID_Y + grid.rows * PITCH + MARGIN;
    let mut counts = [0u64; CellClass::ALL.len()];
    for c in &cells {
        if let Some(i) = CellClass::ALL.iter().position(|k| *k == c.class) {
            counts[i] += 1;
        }
    }
    let mixed_cells = tiles.iter().filter(|t| t.mixed).count();
    let bounds = boundaries(d);
    let t = &d.totals;
    let mut o = String::with_capacity(256 * tiles.len() + 4096);
    // Writing to a String cannot fail.
    let _ = (|| -> std::fmt::Result {
        writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
        writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans Mono, monospace" font-size="11">"#
        )?;
        writeln!(
            o,
            r#"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"#
        )?;
        writeln!(
            o,
            r#"<text x="{MARGIN}" y="16" font-size="13" font-weight="bold">Veil stage 2 — {} — RAM {}, {} pageblocks of {}, backend {}</text>"#,
            xml_escape(&d.reason),
            human(d.ram_size),
            n_blocks,
            human(d.pageblock_size),
            xml_escape(&d.stage2_backend),
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
            r#"<text x="{MARGIN}" y="32">pages: {} reserved, {} mapped, {} unmapped{secret}, {} sensitive; ASI view {}; {} memslots; {flips}</text>"#,
            t.reserved_pages,
            t.mapped_pages,
            t.unmapped_pages,
            t.sensitive_pages,
            d.asi_view.name(),
            t.memslots,
        )?;
        // The legend, at the top: one swatch per class with its pageblock count, then the
        // marks, then what one cell stands for.
        writeln!(o, r#"<g id="legend">"#)?;
        for (k, class) in CellClass::ALL.iter().enumerate() {
            let (x, _) = legend_swatch(*class);
            let (fill, mark) = if *class == CellClass::Mixed {
                ("white", true)
            } else {
                (class.colour(), false)
            };
            writeln!(
                o,
                r#"<rect class="swatch {}" x="{x}" y="{LEGEND_Y}" width="{CELL}" height="{CELL}" fill="{fill}" stroke="black" stroke-width="0.3"/>"#,
                class.name()
            )?;
            if mark {
                writeln!(
                    o,
                    r#"<rect x="{x}" y="{}" width="{CELL}" height="3" fill="{MIXED_MARK}"/>"#,
                    LEGEND_Y + CELL - 3
                )?;
            }
            let label = if mark {
                format!("mixed ({mixed_cells} cells)")
            } else {
                format!("{} ({})", class.name(), counts[k])
            };
            writeln!(
                o,
                r#"<text x="{}" y="{}">{label}</text>"#,
                x + CELL + 5,
                LEGEND_Y + CELL - 1,
            )?;
        }
        let bx = MARGIN + CellClass::ALL.len() as u64 * LEGEND_STEP;
        writeln!(
            o,
            r#"<rect x="{}" y="{}" width="2" height="{}" fill="{BOUNDARY}"/><text x="{}" y="{}">memslot boundary ({})</text>"#,
            bx + 4,
            LEGEND_Y - 1,
            CELL + 2,
            bx + CELL + 5,
            LEGEND_Y + CELL - 1,
            bounds.len()
        )?;
        let cell_what = if per == 1 {
            format!("one cell = one pageblock ({})", human(d.pageblock_size))
        } else {
            format!(
                "one cell = N = {per} pageblocks ({}), coloured by its worst page: unmapped > sensitive > locked > mapped > reserved",
                human(grid.cell_bytes)
            )
        };
        writeln!(
            o,
            r#"<text id="scale" x="{MARGIN}" y="{}">{cell_what}; one row = {}; counts in pageblocks</text>"#,
            LEGEND_Y + CELL + 16,
            human(grid.cell_bytes * cols),
        )?;
        writeln!(o, "</g>")?;
        // The GPA axis: offsets within a row, every 16 cells.
        writeln!(o, r#"<g id="axis" font-size="10">"#)?;
        writeln!(
            o,
            r#"<text x="{MARGIN}" y="{AXIS_Y}">row start (GPA)</text>"#
        )?;
        for c in (0..=cols).step_by(16) {
            let x = LABEL_W + c * PITCH;
            writeln!(
                o,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#666" stroke-width="1"/><text x="{}" y="{AXIS_Y}">+{}</text>"##,
                AXIS_Y + 2,
                GRID_Y - 1,
                x + 2,
                human(c * grid.cell_bytes)
            )?;
        }
        writeln!(o, "</g>")?;
        writeln!(o, r#"<g id="rows" font-size="10">"#)?;
        for row in 0..grid.rows {
            writeln!(
                o,
                r#"<text x="{MARGIN}" y="{}">{} {}</text>"#,
                grid.row_y(row) + CELL - 1,
                gpa_label(row * cols * grid.cell_bytes),
                human(row * cols * grid.cell_bytes)
            )?;
        }
        writeln!(o, "</g>")?;
        writeln!(o, r#"<g id="pageblocks">"#)?;
        for (i, c) in tiles.iter().enumerate() {
            let (x, y) = tile_origin(n, i as u64);
            // Width follows the GPA span: a partial last pageblock is a narrower cell.
            let w = (CELL as f64 * (c.end - c.start) as f64 / grid.cell_bytes as f64).max(1.0);
            writeln!(
                o,
                r#"<rect class="cell {}" x="{x}" y="{y}" width="{}" height="{CELL}" fill="{}"><title>{}</title></rect>"#,
                c.worst.name(),
                trim(w),
                c.worst.colour(),
                xml_escape(&c.detail)
            )?;
            if c.mixed {
                writeln!(
                    o,
                    r#"<rect class="mixed" x="{x}" y="{}" width="{}" height="3" fill="{MIXED_MARK}"/>"#,
                    y + CELL - 3,
                    trim(w)
                )?;
            }
        }
        writeln!(o, "</g>")?;
        writeln!(o, r#"<g id="memslot-boundaries">"#)?;
        for &g in bounds.iter().take(MAX_BOUNDARIES) {
            let (x, row) = grid.place(g);
            writeln!(
                o,
                r#"<rect x="{}" y="{}" width="2" height="{}" fill="{BOUNDARY}"><title>memslot boundary {g:#x}</title></rect>"#,
                trim(x - 1.0),
                grid.row_y(row) - 1,
                CELL + 2
            )?;
        }
        writeln!(o, "</g>")?;
        writeln!(o, "</svg>")
    })();
    o
}

/// A coordinate with at most one decimal.
fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}
