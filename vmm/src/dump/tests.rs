//! Tests of the dump renderers over an allocator on `Stage2Engine<Slots<ModelSlots>>`.

use super::svg::{cells, CellClass};
use super::*;
use crate::kvm_stats::{StatKind, StatUnit};
use crate::stage2::{ModelSlots, RangeState, Slots};
use allocator::{Allocation, Config, Gfp, Zone};

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const RESERVED: u64 = 4 * MIB;

fn host(gpa: u64) -> u64 {
    0x7f00_0000_0000 + gpa
}

/// A two-CPU zone over 60 MiB of managed memory with some unmapped allocations live (made on
/// CPU 0; the order-3 ones on CPU 1).
fn setup() -> (Zone<Stage2Engine<Slots<ModelSlots>>>, Vec<Allocation>) {
    let engine = Stage2Engine::new(
        Slots::new(ModelSlots::new(64), RAM),
        RAM,
        crate::addr::Gpa(RESERVED),
    )
    .unwrap();
    let a = Zone::new(
        RESERVED / PAGE_SIZE,
        (RAM - RESERVED) / PAGE_SIZE,
        engine,
        Config::default(),
        2,
    )
    .unwrap();
    let mut live = Vec::new();
    for _ in 0..10 {
        live.push(a.alloc_pages(0, Gfp::UNMAPPED, 0).unwrap());
    }
    for _ in 0..5 {
        live.push(a.alloc_pages(1, Gfp::empty(), 3).unwrap());
    }
    live.push(a.alloc_pages(0, Gfp::UNMAPPED, 9).unwrap());
    (a, live)
}

fn stats() -> Vec<Stat> {
    vec![Stat {
        name: "remote_tlb_flush_requests".into(),
        value: 42,
        unit: StatUnit::None,
        kind: StatKind::Cumulative,
        exponent: 0,
        base2: false,
        values: 1,
    }]
}

#[test]
fn json_dump_covers_ram_and_matches_the_engine() {
    let (a, mut live) = setup();
    // Two order-0 frees park their pages in a cache, not on the buddy lists.
    for al in live.drain(..2) {
        a.free_pages(0, al.pfn, al.order).unwrap();
    }
    let st = stats();
    let input = DumpInput {
        mermap: None,
        source: DumpSource::Allocator(&a),
        owners: &[],
        kvm_stats: Some(&st),
        reason: "test",
        host_addr: &host,
    };
    let v = to_json_value(&input);
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["reason"], "test");
    let ranges = v["ranges"].as_array().unwrap();
    let mut cursor = 0;
    let mut pages = 0;
    for r in ranges {
        for f in [
            "start",
            "end",
            "state",
            "freetype",
            "slot",
            "host_addr",
            "pages",
        ] {
            assert!(r.get(f).is_some(), "range lacks {f}: {r}");
        }
        let (s, e) = (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap());
        assert_eq!(s, cursor, "ranges must be contiguous");
        assert_eq!(r["pages"].as_u64().unwrap(), (e - s) / PAGE_SIZE);
        assert_eq!(r["host_addr"].as_u64().unwrap(), host(s));
        assert_eq!(r["slot"].is_null(), r["state"] == "unmapped");
        if r["state"] == "reserved" {
            assert_eq!(r["freetype"], "reserved");
        } else {
            let ft = a.pageblock_freetype(s / PAGE_SIZE).unwrap();
            assert_eq!(r["freetype"], ft.name());
            assert_eq!(ft.is_unmapped(), r["state"] == "unmapped", "{r}");
        }
        cursor = e;
        pages += r["pages"].as_u64().unwrap();
    }
    assert_eq!(cursor, RAM);
    assert_eq!(pages, RAM / PAGE_SIZE);
    // Every unmapped allocation lies in a range the dump shows as unmapped.
    let mut unmapped_seen = 0;
    for al in live.iter().filter(|al| al.freetype.is_unmapped()) {
        let gpa = al.pfn * PAGE_SIZE;
        let r = ranges
            .iter()
            .find(|r| r["start"].as_u64().unwrap() <= gpa && gpa < r["end"].as_u64().unwrap())
            .unwrap();
        assert_eq!(r["state"], "unmapped", "allocation at {gpa:#x}");
        unmapped_seen += 1;
    }
    assert_eq!(unmapped_seen, 9); // 8 order-0 and the order-9 block still live
    let (memslots, counters) = a.with_stage2(|e| (e.memslots(), e.counters()));
    let slots = v["memslots"].as_array().unwrap();
    assert_eq!(slots.len(), memslots.len());
    assert_eq!(
        v["totals"]["memslots"].as_u64().unwrap(),
        slots.len() as u64
    );
    assert_eq!(v["totals"]["pageblocks"].as_u64().unwrap(), RAM / (2 * MIB));
    assert_eq!(
        v["stage2"]["unmap_calls"].as_u64().unwrap(),
        counters.unmap_calls
    );
    assert!(counters.unmap_calls >= 1);
    assert_eq!(
        v["allocator"]["managed_pages"].as_u64().unwrap(),
        (RAM - RESERVED) / PAGE_SIZE
    );
    assert_eq!(v["kvm_stats"][0]["name"], "remote_tlb_flush_requests");
    assert_eq!(v["kvm_stats"][0]["value"], 42);
    // Every free page is counted once: on a buddy list or in a cache.
    let rows = v["free_by_freetype"].as_array().unwrap();
    let free: u64 = rows.iter().map(|r| r["pages"].as_u64().unwrap()).sum();
    assert_eq!(free, a.free_pages_count());
    let cached: u64 = rows
        .iter()
        .map(|r| r["cached_pages"].as_u64().unwrap())
        .sum();
    assert!(
        cached > 0,
        "the setup leaves pages in the order-0..3 caches"
    );
    for r in rows {
        let on_lists: u64 = r["blocks_per_order"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(o, b)| b.as_u64().unwrap() << o)
            .sum();
        assert_eq!(on_lists + r["cached_pages"].as_u64().unwrap(), r["pages"]);
    }
    // The text form of the same document parses to the same value.
    let text = render(&input, DumpFormat::Json);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
}

#[test]
fn text_dump_has_every_section() {
    let (a, _) = setup();
    let input = DumpInput {
        mermap: None,
        source: DumpSource::Allocator(&a),
        owners: &[],
        kvm_stats: None,
        reason: "exit",
        host_addr: &host,
    };
    let t = render(&input, DumpFormat::Text);
    for s in [
        "reason: exit",
        "GPA ranges",
        "Memslots",
        "Allocator",
        "free blocks per order",
        "Stage-2 engine",
        "KVM statistics",
        "(not available)",
        "unmapped",
        "reserved",
    ] {
        assert!(t.contains(s), "text dump lacks {s:?}:\n{t}");
    }
    let data = gather(&input);
    // One line per range and per memslot.
    let range_lines = t
        .lines()
        .filter(|l| l.starts_with("  0x") && l.split_whitespace().count() == 9)
        .count();
    assert_eq!(range_lines, data.ranges.len(), "{t}");
    for r in &data.ranges {
        assert!(t.contains(&format!("{:#018x}  {:#018x}", r.start, r.end)));
    }
}

fn count_cells(svg: &str) -> (usize, std::collections::HashMap<String, usize>) {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(svg);
    let mut total = 0;
    let mut by_class = std::collections::HashMap::new();
    loop {
        match reader.read_event().expect("SVG must be well-formed XML") {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"rect" => {
                if let Some(c) = e.try_get_attribute("class").unwrap() {
                    let c = String::from_utf8(c.value.to_vec()).unwrap();
                    if let Some(k) = c.strip_prefix("cell ") {
                        total += 1;
                        *by_class.entry(k.to_string()).or_insert(0) += 1;
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    (total, by_class)
}

#[test]
fn svg_dump_is_xml_with_one_cell_per_pageblock() {
    let (a, _) = setup();
    let input = DumpInput {
        mermap: None,
        source: DumpSource::Allocator(&a),
        owners: &[],
        kvm_stats: None,
        reason: "guest <request> & more",
        host_addr: &host,
    };
    let svg = render(&input, DumpFormat::Svg);
    let (total, by_class) = count_cells(&svg);
    assert_eq!(total as u64, RAM / (2 * MIB));
    let unmapped_blocks = (0..RAM / (2 * MIB))
        .filter(|b| {
            a.with_stage2(|e| e.state_at(crate::addr::Gpa(b * 2 * MIB)))
                == Some(RangeState::Unmapped)
        })
        .count();
    assert!(
        unmapped_blocks >= 2,
        "a 2 MiB unmapped allocation plus order-0 ones"
    );
    assert_eq!(
        by_class.get("unmapped").copied().unwrap_or(0),
        unmapped_blocks
    );
    assert_eq!(by_class.get("reserved").copied().unwrap_or(0), 2);
    assert!(svg.contains("guest &lt;request&gt; &amp; more"));
    assert!(svg.contains("legend"));
}

#[test]
fn cells_classify_partial_and_mixed_blocks() {
    let r = |start: u64, end: u64, state, ft: &str| DumpRange {
        start,
        end,
        state,
        freetype: ft.into(),
        slot: None,
        host_addr: 0,
        pages: (end - start) / PAGE_SIZE,
        restricted: View::RESTRICTED.perm(state),
        full: View::FULL.perm(state),
        owner: None,
    };
    let d = DumpData {
        format_version: 1,
        reason: "x".into(),
        stage2_backend: "slots".into(),
        asi_view: AsiView::Restricted,
        ram_size: 11 * MIB,
        reserved_end: 3 * MIB,
        page_size: PAGE_SIZE,
        pageblock_size: 2 * MIB,
        managed: Some(Managed {
            base_pfn: 768,
            nr_pages: 1536,
            free_pages: 0,
        }),
        totals: Totals {
            pageblocks: 6,
            ..Totals::default()
        },
        ranges: vec![
            r(0, 3 * MIB, RangeState::Reserved, "reserved"),
            r(3 * MIB, 4 * MIB, RangeState::Mapped, "unmovable"),
            r(4 * MIB, 6 * MIB, RangeState::Unmapped, "unmovable|unmapped"),
            r(6 * MIB, 8 * MIB, RangeState::ReadOnly, "unmovable"),
            r(
                8 * MIB,
                10 * MIB,
                RangeState::Sensitive,
                "unmovable|sensitive",
            ),
            r(10 * MIB, 11 * MIB, RangeState::Mapped, "movable"),
        ],
        memslots: vec![],
        allocator: Some(Default::default()),
        free_by_freetype: Some(vec![]),
        stage2: Default::default(),
        kvm_stats: None,
        mermap: None,
    };
    let c: Vec<CellClass> = cells(&d).iter().map(|c| c.class).collect();
    assert_eq!(
        c,
        vec![
            CellClass::Reserved,
            CellClass::Mixed,
            CellClass::Unmapped,
            CellClass::Locked,
            CellClass::Sensitive,
            CellClass::Mapped
        ]
    );
    assert_eq!(cells(&d)[5].end, 11 * MIB);
    let svg = svg::render(&d);
    assert_eq!(count_cells(&svg).0, 6);
    assert!(svg.contains("locked"), "the legend names the locked class");
    assert!(
        svg.contains(CellClass::Sensitive.colour()) && svg.contains("sensitive (1)"),
        "sensitive blocks have a colour and a legend entry"
    );
    // Both views of every range are in the text dump.
    let text = text::render(&d);
    assert!(text.contains("restricted") && text.contains("ASI view: restricted"));
}

/// A foreign kernel's dump: the engine alone, a secret span labelled and split at its edges,
/// no allocator sections in any format.
#[test]
fn engine_only_dump_labels_owned_spans() {
    let mut engine = Stage2Engine::new(
        Slots::new(ModelSlots::new(64), RAM),
        RAM,
        crate::addr::Gpa(MIB),
    )
    .unwrap();
    let (start, size) = (16 * MIB + 0x3000, 0x5000);
    engine.unmap_range(crate::addr::Gpa(start), size).unwrap();
    let owners = [OwnedSpan {
        start,
        end: start + size,
        owner: OWNER_SECRET,
    }];
    let input = DumpInput {
        mermap: None,
        source: DumpSource::Engine(&engine),
        owners: &owners,
        kvm_stats: None,
        reason: "exit",
        host_addr: &host,
    };
    let d = gather(&input);
    assert!(d.managed.is_none() && d.allocator.is_none() && d.free_by_freetype.is_none());
    let owned: Vec<&DumpRange> = d.ranges.iter().filter(|r| r.owner.is_some()).collect();
    assert_eq!(owned.len(), 1, "{:?}", d.ranges);
    assert_eq!((owned[0].start, owned[0].end), (start, start + size));
    assert_eq!(owned[0].state, RangeState::Unmapped);
    assert_eq!(
        (owned[0].restricted, owned[0].full),
        (Perm::None, Perm::None)
    );
    assert!(d
        .ranges
        .iter()
        .all(|r| r.freetype == FREETYPE_UNMANAGED || r.freetype == FREETYPE_RESERVED));
    assert_eq!(d.ranges.last().unwrap().end, RAM);
    let v = to_json_value(&input);
    for key in ["managed", "allocator", "free_by_freetype"] {
        assert!(v.get(key).is_none(), "{key}");
    }
    let t = render(&input, DumpFormat::Text);
    assert!(
        t.contains("no allocator") && !t.contains("\nAllocator\n"),
        "{t}"
    );
    assert!(t.contains("secret (--secret"), "{t}");
    let svg = render(&input, DumpFormat::Svg);
    assert!(
        svg.contains("owner secret") && svg.contains("no allocator"),
        "{svg}"
    );
}

/// A dump of `ram` bytes: reserved [0, 4 MiB), mapped elsewhere, unmapped over `unmapped`,
/// with the given memslots.
fn synthetic(ram: u64, unmapped: &[(u64, u64)], memslots: &[(u64, u64)]) -> DumpData {
    let r = |start: u64, end: u64, state, ft: &str| DumpRange {
        start,
        end,
        state,
        freetype: ft.into(),
        slot: None,
        host_addr: 0,
        pages: (end - start) / PAGE_SIZE,
        restricted: View::RESTRICTED.perm(state),
        full: View::FULL.perm(state),
        owner: None,
    };
    let mut ranges = vec![r(0, RESERVED, RangeState::Reserved, "reserved")];
    let mut at = RESERVED;
    for &(s, e) in unmapped {
        if at < s {
            ranges.push(r(at, s, RangeState::Mapped, "unmovable"));
        }
        ranges.push(r(s, e, RangeState::Unmapped, "unmovable|unmapped"));
        at = e;
    }
    if at < ram {
        ranges.push(r(at, ram, RangeState::Mapped, "unmovable"));
    }
    DumpData {
        format_version: 1,
        reason: "exit".into(),
        stage2_backend: "slots".into(),
        asi_view: AsiView::Restricted,
        ram_size: ram,
        reserved_end: RESERVED,
        page_size: PAGE_SIZE,
        pageblock_size: 2 * MIB,
        managed: None,
        totals: Totals {
            pageblocks: ram / (2 * MIB),
            memslots: memslots.len() as u64,
            ..Totals::default()
        },
        ranges,
        memslots: memslots
            .iter()
            .enumerate()
            .map(|(i, &(gpa, len))| DumpSlot {
                slot: i as u32,
                gpa,
                len,
                readonly: false,
                host_addr: 0,
            })
            .collect(),
        allocator: None,
        free_by_freetype: None,
        stage2: Default::default(),
        kvm_stats: None,
        mermap: None,
    }
}

/// The attribute `name` of every element `tag` whose `class` attribute starts with `class`.
fn attrs(svg: &str, tag: &str, class: &str, name: &str) -> Vec<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(svg);
    let mut out = Vec::new();
    loop {
        match reader.read_event().expect("SVG must be well-formed XML") {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == tag.as_bytes() => {
                let get = |k: &str| {
                    e.try_get_attribute(k)
                        .unwrap()
                        .map(|a| String::from_utf8(a.value.to_vec()).unwrap())
                };
                if get("class").is_some_and(|c| c.starts_with(class)) {
                    if let Some(v) = get(name) {
                        out.push(v);
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    out
}

/// 64 GiB (32 k pageblocks) with one unmapped pageblock: 4,096 cells of 8 pageblocks, the one
/// red cell kept, the legend at the top saying N, under 1 MB and one screen wide.
#[test]
fn a_64_gib_svg_aggregates_and_keeps_the_one_red_cell() {
    const GIB: u64 = 1 << 30;
    let hole = (40 * GIB + 6 * MIB, 40 * GIB + 8 * MIB);
    let d = synthetic(
        64 * GIB,
        &[hole],
        &[(0, hole.0), (hole.1, 64 * GIB - hole.1)],
    );
    assert_eq!(svg::blocks_per_cell(32768), 8);
    let s = svg::render(&d);
    assert!(s.len() < 1_000_000, "{} bytes", s.len());
    let (total, by_class) = count_cells(&s);
    assert_eq!(total, 4096);
    assert_eq!(by_class.get("unmapped"), Some(&1), "{by_class:?}");
    assert_eq!(
        attrs(&s, "rect", "cell unmapped", "fill"),
        [CellClass::Unmapped.colour()]
    );
    let head = &s[..s.find("<g id=\"pageblocks\"").unwrap()];
    assert!(
        head.contains("one cell = N = 8 pageblocks (16 MiB)"),
        "{head}"
    );
    assert!(
        head.contains("unmapped (1)"),
        "the legend counts pageblocks"
    );
    assert!(head.contains("memslot boundary (2)"), "{head}");
    // The svg element's size: one screen wide, a few hundred px tall.
    let tag = &s[s.find("<svg").unwrap()..];
    let num = |k: &str| -> u64 {
        let at = tag.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
        tag[at..at + tag[at..].find('"').unwrap()].parse().unwrap()
    };
    assert!(num("width") <= 1600, "width {}", num("width"));
    assert!(num("height") <= 600, "height {}", num("height"));
    // Row labels: the row at 40 GiB exists (a row is 2 GiB here).
    assert!(s.contains("0xa_0000_0000 40 GiB"), "row labels");
    // The red cell is where its GPA says: cell 40 GiB / 16 MiB = 2560.
    let (x, y) = svg::tile_origin(4096, 2560);
    assert!(
        s.contains(&format!(r#"class="cell unmapped" x="{x}" y="{y}""#)),
        "red cell at {x},{y}"
    );
    // Both memslot boundaries drawn, at the cell of their GPA.
    let bars = s.matches("<title>memslot boundary").count();
    assert_eq!(bars, 2);
}

/// The dump renders to a PNG whose pixels show the unmapped cell red, the mapped ones green,
/// and the legend's swatches at the top.
#[test]
fn the_svg_renders_to_a_png_with_the_colours_where_the_cells_are() {
    let d = synthetic(256 * MIB, &[(100 * MIB, 102 * MIB)], &[(0, 100 * MIB)]);
    let svg_text = svg::render(&d);
    let png = replay::output::svg_to_png(&svg_text).unwrap();
    let img = resvg_pixmap(&png);
    let tag = &svg_text[svg_text.find("<svg").unwrap()..];
    let w: u32 = tag[tag.find("width=\"").unwrap() + 7..]
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(img.0, w * 2, "twice the SVG's width");
    let px = |x: u64, y: u64| img.2[(y * img.0 as u64 + x) as usize];
    let hex = |c: &str| {
        let v = u32::from_str_radix(&c[1..], 16).unwrap();
        [(v >> 16) as u8, (v >> 8) as u8, v as u8]
    };
    // The centre of a cell (top half: the mixed bar is at the bottom), at scale 2.
    let centre = |(x, y): (u64, u64)| px(2 * x + 10, 2 * y + 6);
    let (cells_n, block) = (128, 50); // 256 MiB: 128 pageblocks; 100 MiB is pageblock 50
    assert_eq!(
        centre(svg::tile_origin(cells_n, block)),
        hex(CellClass::Unmapped.colour())
    );
    assert_eq!(
        centre(svg::tile_origin(cells_n, 60)),
        hex(CellClass::Mapped.colour())
    );
    assert_eq!(
        centre(svg::tile_origin(cells_n, 0)),
        hex(CellClass::Reserved.colour())
    );
    let (lx, ly) = svg::legend_swatch(CellClass::Unmapped);
    assert!(
        ly < svg::tile_origin(cells_n, 0).1,
        "the legend is above the grid"
    );
    assert_eq!(centre((lx, ly)), hex(CellClass::Unmapped.colour()));
    // Text was drawn (some dark pixels in the title line).
    let dark = (0..img.0 as u64)
        .filter(|&x| px(x, 2 * 12).iter().all(|&c| c < 80))
        .count();
    assert!(dark > 50, "title text rendered ({dark} dark pixels)");
}

/// Decodes a PNG: (width, height, RGB pixels).
fn resvg_pixmap(png: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    replay::output::decode_png(png).expect("a PNG")
}
