//! Stage-2 ("EPT") dumps: what the guest can reach, gathered at one moment and rendered as text,
//! JSON, SVG or PNG.
//!
//! [`gather`] collects a [`DumpData`] from the allocator, its stage-2 engine and KVM's binary
//! statistics (or, for a foreign kernel, from the stage-2 engine alone: [`DumpSource`]);
//! [`text`], [`json`] and [`svg`] render it, PNG is the SVG rasterised
//! ([`replay::output::svg_to_png`]). The JSON schema is documented on [`DumpData`]; [`diff`]
//! compares two JSON dumps (`veil dump diff`); [`format`] picks a format from a file name.

pub mod cli;
pub mod diff;
pub mod format;
pub mod json;
pub mod svg;
pub mod text;

use allocator::{Freetype, Snapshot, Zone, MAX_ORDER, PAGEBLOCK_PAGES};
use serde::Serialize;

use crate::kvm_stats::Stat;
use crate::stage2::{
    AsiView, Perm, RangeInfo, RangeState, SlotInfo, Stage2Backend, Stage2Counters, Stage2Engine,
    View, PAGE_SHIFT, PAGE_SIZE,
};

/// Output format of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DumpFormat {
    /// Tables for people.
    Text,
    /// One JSON document for tools (schema: [`DumpData`]).
    Json,
    /// A picture of memory: cells of pageblocks on a GPA grid, with a legend.
    Svg,
    /// The SVG picture rendered to PNG.
    Png,
}

impl DumpFormat {
    /// Lower-case name ("text", "json", "svg", "png").
    pub const fn name(self) -> &'static str {
        match self {
            DumpFormat::Text => "text",
            DumpFormat::Json => "json",
            DumpFormat::Svg => "svg",
            DumpFormat::Png => "png",
        }
    }

    /// The extension of a file in this format ("txt", "json", "svg", "png").
    pub const fn extension(self) -> &'static str {
        match self {
            DumpFormat::Text => "txt",
            DumpFormat::Json => "json",
            DumpFormat::Svg => "svg",
            DumpFormat::Png => "png",
        }
    }
}

/// Where a dump's stage 2 comes from.
pub enum DumpSource<'a, B: Stage2Backend> {
    /// A Veil guest: the allocator (its stage-2 engine is reached through `with_stage2`).
    Allocator(&'a Zone<Stage2Engine<B>>),
    /// A foreign kernel (`--kernel`): the stage-2 engine alone, no allocator. Freetypes are
    /// "reserved" / "unmanaged" and the allocator's sections are absent.
    Engine(&'a Stage2Engine<B>),
}

/// A GPA span a dump labels with its owner (e.g. a `--secret` range: [`OWNER_SECRET`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnedSpan<'a> {
    /// First GPA.
    pub start: u64,
    /// GPA one past the span.
    pub end: u64,
    /// The label (`owner` of the ranges inside).
    pub owner: &'a str,
}

/// Owner label of a `--secret` range of a foreign kernel.
pub const OWNER_SECRET: &str = "secret";

/// Everything a dump shows, gathered at one moment.
pub struct DumpInput<'a, B: Stage2Backend> {
    /// The allocator, or the engine alone.
    pub source: DumpSource<'a, B>,
    /// Spans whose ranges carry an owner label (empty for Veil guests).
    pub owners: &'a [OwnedSpan<'a>],
    /// KVM's binary statistics of the VM, if available.
    pub kvm_stats: Option<&'a [Stat]>,
    /// Why the dump is taken ("exit", "guest request", ...).
    pub reason: &'a str,
    /// Host address of a GPA.
    pub host_addr: &'a dyn Fn(u64) -> u64,
    /// The mermap windows, if the VM has them.
    pub mermap: Option<&'a crate::mermap::Mermap>,
}

/// The mermap windows in a dump (`mermap` in JSON).
#[derive(Clone, Debug, Serialize)]
pub struct MermapDump {
    /// GPA of vCPU 0's window.
    pub base: u64,
    /// Pages per vCPU window (bump pages plus the reserved slot).
    pub window_pages: u64,
    /// How the windows are realised (`alias`: the mprotect backend's memfd aliases;
    /// `memslots`: one KVM memslot per mapping).
    pub backend: String,
    /// Each vCPU's window: bump pointer, live and stale mappings (window page, pages, target
    /// GPA) and counters.
    pub windows: Vec<crate::mermap::Window>,
}

/// Freetype label of reserved memory.
pub const FREETYPE_RESERVED: &str = "reserved";
/// Freetype label of RAM that is neither reserved nor managed by the allocator.
pub const FREETYPE_UNMANAGED: &str = "unmanaged";
/// Version of the JSON layout ([`DumpData::format_version`]).
pub const FORMAT_VERSION: u32 = 1;

/// A dump's content. Serialized as the JSON dump, with these stable field names:
///
/// - `format_version` (1), `reason` (string), `stage2_backend` ("slots"), `ram_size`,
///   `reserved_end`, `page_size`, `pageblock_size` (bytes, numbers);
/// - `managed`: `{ base_pfn, nr_pages, free_pages }` of the allocator (absent for a foreign
///   kernel, which has no allocator; so are `allocator` and `free_by_freetype`);
/// - `asi_view`: the VM's ASI view now, "restricted" | "full";
/// - `totals`: `{ reserved_pages, mapped_pages, locked_pages, unmapped_pages,
///   sensitive_pages, sensitive_runs, pageblocks, memslots }` (`sensitive_runs`: the ranges a
///   view switch toggles);
/// - `ranges[]`: `{ start, end, state, freetype, slot, host_addr, pages, restricted, full }`,
///   in GPA order, covering RAM; `state` is "reserved" | "mapped" | "read_only" | "no_access" |
///   "unmapped" | "sensitive"; `restricted` and `full` are the range's permission in each ASI
///   view ("none" | "read" | "read_write"); `freetype` is the pageblock's
///   freetype name (e.g. "unmovable", "unmovable|unmapped"), "reserved" or "unmanaged"; ranges
///   split wherever state, freetype or owner changes; `slot` is null for holes; `start`, `end`,
///   `host_addr` are numbers (bytes); `owner` is present only on labelled ranges: "secret"
///   for a foreign kernel's `--secret` ranges (state "unmapped": unreachable in both views);
/// - `memslots[]`: `{ slot, gpa, len, readonly, host_addr }`, in GPA order;
/// - `allocator`: the allocator's `Snapshot` (free_per_order counts free blocks,
///   `[order][freetype index]`);
/// - `free_by_freetype[]`: `{ freetype, blocks_per_order[11], cached_pages, pages }`, one row per freetype index;
/// - `stage2`: the engine's `Stage2Counters`;
/// - `kvm_stats`: `[{ name, value, unit, kind, exponent, base2, values }]` or null.
#[derive(Clone, Debug, Serialize)]
pub struct DumpData {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Why the dump was taken.
    pub reason: String,
    /// The stage-2 backend in use (`veil run --stage2`).
    pub stage2_backend: String,
    /// The VM's ASI view when the dump was taken.
    pub asi_view: AsiView,
    /// RAM size in bytes.
    pub ram_size: u64,
    /// End of reserved low memory.
    pub reserved_end: u64,
    /// Page size.
    pub page_size: u64,
    /// Pageblock size.
    pub pageblock_size: u64,
    /// The allocator's managed range (None: no allocator, a foreign kernel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed: Option<Managed>,
    /// Page and slot totals.
    pub totals: Totals,
    /// Every GPA range.
    pub ranges: Vec<DumpRange>,
    /// The memslot table.
    pub memslots: Vec<DumpSlot>,
    /// Allocator counters (None: no allocator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocator: Option<Snapshot>,
    /// Free blocks per order for each freetype (None: no allocator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_by_freetype: Option<Vec<FreeRow>>,
    /// Engine counters.
    pub stage2: Stage2Counters,
    /// KVM's binary statistics.
    pub kvm_stats: Option<Vec<Stat>>,
    /// The mermap windows (absent when the VM has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mermap: Option<MermapDump>,
}

/// The allocator's managed range.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, serde::Deserialize)]
pub struct Managed {
    /// First managed pfn.
    pub base_pfn: u64,
    /// Managed pages.
    pub nr_pages: u64,
    /// Free pages now.
    pub free_pages: u64,
}

/// Page and slot totals.
#[derive(Clone, Copy, Debug, Serialize, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Totals {
    /// Pages in reserved ranges.
    pub reserved_pages: u64,
    /// Pages in mapped ranges.
    pub mapped_pages: u64,
    /// Pages the guest locked (`Hc::Protect`: read-only or no-access ranges).
    pub locked_pages: u64,
    /// Pages in unmapped ranges.
    pub unmapped_pages: u64,
    /// Pages in sensitive ranges (mapped in the full view only).
    pub sensitive_pages: u64,
    /// Maximal sensitive runs: the ranges one view switch toggles.
    pub sensitive_runs: u64,
    /// Pageblocks of RAM (the last one may be partial).
    pub pageblocks: u64,
    /// Memslots in use.
    pub memslots: u64,
}

/// One GPA range of a dump.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, serde::Deserialize)]
pub struct DumpRange {
    /// First GPA.
    pub start: u64,
    /// GPA one past the range.
    pub end: u64,
    /// Stage-2 state.
    pub state: RangeState,
    /// Freetype of the range's pageblocks ("reserved" / "unmanaged" outside the allocator).
    pub freetype: String,
    /// Memslot exposing it (None for holes).
    pub slot: Option<u32>,
    /// Host address of `start`.
    pub host_addr: u64,
    /// Pages in the range.
    pub pages: u64,
    /// Its permission in the restricted view.
    pub restricted: Perm,
    /// Its permission in the full view.
    pub full: Perm,
    /// Who the range belongs to, when the dump labels it ("secret": a `--secret` range).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// One memslot of a dump.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, serde::Deserialize)]
pub struct DumpSlot {
    /// Slot id.
    pub slot: u32,
    /// First GPA.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether the slot is `KVM_MEM_READONLY`.
    pub readonly: bool,
    /// Host address of `gpa`.
    pub host_addr: u64,
}

/// Free blocks per order of one freetype.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FreeRow {
    /// Freetype name.
    pub freetype: String,
    /// Free blocks of each order 0..=MAX_ORDER.
    pub blocks_per_order: Vec<u64>,
    /// Pages parked in the per-order caches (orders 0-3), not on the lists above.
    pub cached_pages: u64,
    /// All free pages of this freetype: the lists plus the caches.
    pub pages: u64,
}

/// Freetype label of the page at `pfn` (unmanaged without an allocator).
fn freetype_label<S: allocator::Stage2>(alloc: Option<&Zone<S>>, pfn: u64) -> &'static str {
    alloc
        .and_then(|a| a.pageblock_freetype(pfn))
        .map_or(FREETYPE_UNMANAGED, Freetype::name)
}

/// The owner label of `gpa`, if a span covers it.
fn owner_at<'a>(owners: &[OwnedSpan<'a>], gpa: u64) -> Option<&'a str> {
    owners
        .iter()
        .find(|o| o.start <= gpa && gpa < o.end)
        .map(|o| o.owner)
}

/// The first span boundary inside `(gpa, end)`, or `end`.
fn next_owner_edge(owners: &[OwnedSpan<'_>], gpa: u64, end: u64) -> u64 {
    owners
        .iter()
        .flat_map(|o| [o.start, o.end])
        .filter(|&e| gpa < e && e < end)
        .min()
        .unwrap_or(end)
}

/// What a dump takes from the stage-2 engine, read in one go under the allocator's stage-2
/// lock (the allocator's own queries take its other locks, so they run after).
struct EngineView {
    ranges: Vec<RangeInfo>,
    memslots: Vec<SlotInfo>,
    backend: &'static str,
    ram_size: u64,
    reserved_end: u64,
    counters: Stage2Counters,
    asi_view: AsiView,
}

impl EngineView {
    fn of<B: Stage2Backend>(e: &Stage2Engine<B>) -> EngineView {
        EngineView {
            ranges: e.ranges(),
            memslots: e.memslots(),
            backend: e.backend().name(),
            ram_size: e.ram_size(),
            reserved_end: e.reserved_end().raw(),
            counters: e.counters(),
            asi_view: e.asi_view(),
        }
    }
}

/// Collects everything a dump shows.
pub fn gather<B: Stage2Backend>(input: &DumpInput<'_, B>) -> DumpData {
    let (alloc, engine) = match input.source {
        DumpSource::Allocator(a) => (Some(a), a.with_stage2(|e| EngineView::of(e))),
        DumpSource::Engine(e) => (None, EngineView::of(e)),
    };
    let pb_size = PAGEBLOCK_PAGES * PAGE_SIZE;
    let mut ranges: Vec<DumpRange> = Vec::new();
    let mut totals = Totals::default();
    for r in &engine.ranges {
        let pages = r.pages();
        match r.state {
            RangeState::Reserved => totals.reserved_pages += pages,
            RangeState::Mapped => totals.mapped_pages += pages,
            RangeState::ReadOnly | RangeState::NoAccess => totals.locked_pages += pages,
            RangeState::Unmapped => totals.unmapped_pages += pages,
            RangeState::Sensitive => {
                totals.sensitive_pages += pages;
                totals.sensitive_runs += 1;
            }
        }
        let (start, end) = (r.start.0, r.end.0);
        let mut cursor = start;
        while cursor < end {
            // Reserved memory keeps its label when the guest locked part of its image.
            let reserved = cursor < engine.reserved_end;
            let piece_end = if reserved {
                end
            } else {
                ((cursor / pb_size + 1) * pb_size).min(end)
            };
            let piece_end = next_owner_edge(input.owners, cursor, piece_end);
            let owner = owner_at(input.owners, cursor);
            let label = if reserved {
                FREETYPE_RESERVED
            } else {
                freetype_label(alloc, cursor >> PAGE_SHIFT)
            };
            match ranges.last_mut() {
                Some(last)
                    if last.end == cursor
                        && last.state == r.state
                        && last.freetype == label
                        && last.owner.as_deref() == owner =>
                {
                    last.end = piece_end;
                    last.pages = (last.end - last.start) >> PAGE_SHIFT;
                }
                _ => ranges.push(DumpRange {
                    start: cursor,
                    end: piece_end,
                    state: r.state,
                    freetype: label.to_string(),
                    slot: r.slot,
                    host_addr: (input.host_addr)(cursor),
                    pages: (piece_end - cursor) >> PAGE_SHIFT,
                    restricted: View::RESTRICTED.perm(r.state),
                    full: View::FULL.perm(r.state),
                    owner: owner.map(str::to_string),
                }),
            }
            cursor = piece_end;
        }
    }
    let memslots: Vec<DumpSlot> = engine
        .memslots
        .iter()
        .map(|s| DumpSlot {
            slot: s.slot,
            gpa: s.gpa,
            len: s.len,
            readonly: s.readonly,
            host_addr: (input.host_addr)(s.gpa),
        })
        .collect();
    totals.pageblocks = engine.ram_size.div_ceil(pb_size);
    totals.memslots = memslots.len() as u64;
    let snap = alloc.map(|a| a.snapshot());
    let free_by_freetype = snap.as_ref().map(free_rows);
    DumpData {
        format_version: FORMAT_VERSION,
        reason: input.reason.to_string(),
        stage2_backend: engine.backend.to_string(),
        asi_view: engine.asi_view,
        ram_size: engine.ram_size,
        reserved_end: engine.reserved_end,
        page_size: PAGE_SIZE,
        pageblock_size: pb_size,
        managed: alloc.map(|a| Managed {
            base_pfn: a.base_pfn(),
            nr_pages: a.nr_pages(),
            free_pages: a.free_pages_count(),
        }),
        totals,
        ranges,
        memslots,
        allocator: snap,
        free_by_freetype,
        stage2: engine.counters,
        kvm_stats: input.kvm_stats.map(<[Stat]>::to_vec),
        mermap: input.mermap.map(|m| MermapDump {
            base: m.base().raw(),
            window_pages: crate::mermap::WINDOW_PAGES,
            backend: m.backend_name().to_string(),
            windows: m.windows().to_vec(),
        }),
    }
}

/// Free blocks per order of each freetype, from the allocator's snapshot.
fn free_rows(snap: &Snapshot) -> Vec<FreeRow> {
    (0..Freetype::COUNT)
        .map(|i| {
            let blocks: Vec<u64> = (0..=MAX_ORDER as usize)
                .map(|o| snap.free_per_order[o][i])
                .collect();
            FreeRow {
                freetype: Freetype::from_index(i)
                    .map_or("?", Freetype::name)
                    .to_string(),
                blocks_per_order: blocks,
                cached_pages: snap.pcp_pages[i],
                pages: snap.free_pages_per_freetype[i],
            }
        })
        .collect()
}

/// Renders a dump in `format` as text (PNG: the SVG it is rasterised from; [`render_bytes`]
/// gives the PNG itself).
pub fn render<B: Stage2Backend>(input: &DumpInput<'_, B>, format: DumpFormat) -> String {
    render_data(&gather(input), format)
}

/// Renders gathered dump data as text (PNG: its SVG).
pub fn render_data(data: &DumpData, format: DumpFormat) -> String {
    match format {
        DumpFormat::Text => text::render(data),
        DumpFormat::Json => json::render(data),
        DumpFormat::Svg | DumpFormat::Png => svg::render(data),
    }
}

/// Renders a dump in `format` as the bytes of its file.
pub fn render_bytes<B: Stage2Backend>(
    input: &DumpInput<'_, B>,
    format: DumpFormat,
) -> Result<Vec<u8>, replay::output::OutputError> {
    let text = render(input, format);
    match format {
        DumpFormat::Png => replay::output::svg_to_png(&text),
        _ => Ok(text.into_bytes()),
    }
}

/// The JSON dump as a value (reused by `veil run --json`); schema: [`DumpData`].
pub fn to_json_value<B: Stage2Backend>(input: &DumpInput<'_, B>) -> serde_json::Value {
    json::to_value(&gather(input))
}

#[cfg(test)]
mod tests;
