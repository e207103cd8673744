//! `veil dump diff A.json B.json`: what changed between two JSON stage-2 dumps.
//!
//! Each file is read as a typed view of the JSON dump ([`DumpView`]: the ranges and memslots
//! as the dump's own [`DumpRange`] / [`DumpSlot`] types, the counter sections as numbers by
//! name). The diff ([`diff`]) lists the GPA ranges whose state, freetype, owner or permission
//! in either ASI view changed (memslot ids are left out: the `slots` backend renumbers them on
//! every split), the memslots added and removed (by GPA, length and read-only flag), and every
//! counter whose value changed (allocator, stage-2 engine, totals, KVM statistics).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::text::{human, perm_name};
use super::{DumpRange, DumpSlot, Managed, Totals, FORMAT_VERSION};
use crate::stage2::{AsiView, Perm, RangeState};

/// Largest dump file read (a 64 GiB guest's JSON dump with every pageblock split is ~20 MB).
pub const MAX_DUMP_FILE: u64 = 512 << 20;

/// Why a dump cannot be compared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiffError {
    /// The file cannot be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error (in the message, not a source: printed once).
        error: std::io::Error,
    },
    /// The file is not a regular file or is too large.
    #[error("{path} is {what}")]
    NotAFile {
        /// The file.
        path: String,
        /// What it is instead.
        what: String,
    },
    /// The file is not JSON at all.
    #[error("{path} is not JSON ({error}); `veil dump diff` compares JSON dumps: write them with --dump-ept FILE.json")]
    NotJson {
        /// The file.
        path: String,
        /// The parser's error (with line and column).
        error: serde_json::Error,
    },
    /// JSON, but not a stage-2 dump.
    #[error("{path} is JSON but not a Veil stage-2 dump: {why}")]
    NotADump {
        /// The file.
        path: String,
        /// What is missing or wrong.
        why: String,
    },
    /// A dump of a schema version this veil does not read.
    #[error("{path} has dump schema version {found}; this veil reads version {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Its `format_version`.
        found: u64,
    },
    /// The two dumps describe different machines.
    #[error("the dumps are of different guests: {what} {a} in {path_a}, {b} in {path_b}")]
    Mismatch {
        /// What differs ("RAM size", "page size", ...).
        what: &'static str,
        /// First file.
        path_a: String,
        /// Its value.
        a: String,
        /// Second file.
        path_b: String,
        /// Its value.
        b: String,
    },
}

/// The parts of a JSON dump the diff reads (field names as [`super::DumpData`] documents).
#[derive(Debug, Clone, Deserialize)]
pub struct DumpView {
    /// Schema version.
    pub format_version: u32,
    /// Why the dump was taken.
    pub reason: String,
    /// Backend name.
    pub stage2_backend: String,
    /// ASI view at the time.
    pub asi_view: AsiView,
    /// RAM size in bytes.
    pub ram_size: u64,
    /// End of reserved memory.
    pub reserved_end: u64,
    /// Page size.
    pub page_size: u64,
    /// Pageblock size.
    pub pageblock_size: u64,
    /// The allocator's managed range (absent for a foreign kernel).
    #[serde(default)]
    pub managed: Option<Managed>,
    /// Totals.
    pub totals: Totals,
    /// Every range, in GPA order.
    pub ranges: Vec<DumpRange>,
    /// The memslot table.
    pub memslots: Vec<DumpSlot>,
    /// The allocator's counters (absent for a foreign kernel), by name.
    #[serde(default)]
    pub allocator: Option<serde_json::Map<String, serde_json::Value>>,
    /// The engine's counters, by name.
    pub stage2: serde_json::Map<String, serde_json::Value>,
    /// KVM's statistics.
    #[serde(default)]
    pub kvm_stats: Option<Vec<StatView>>,
}

/// One KVM statistic of a dump.
#[derive(Debug, Clone, Deserialize)]
pub struct StatView {
    /// KVM's name.
    pub name: String,
    /// Its value.
    pub value: u64,
}

/// What a range is, as the diff compares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RangeAttrs {
    /// Stage-2 state.
    pub state: RangeState,
    /// Pageblock freetype.
    pub freetype: String,
    /// Owner label, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Permission in the restricted view.
    pub restricted: Perm,
    /// Permission in the full view.
    pub full: Perm,
}

impl RangeAttrs {
    fn of(r: &DumpRange) -> RangeAttrs {
        RangeAttrs {
            state: r.state,
            freetype: r.freetype.clone(),
            owner: r.owner.clone(),
            restricted: r.restricted,
            full: r.full,
        }
    }

    /// "unmapped unmovable|unmapped (restricted none, full none)".
    fn describe(&self) -> String {
        let owner = self
            .owner
            .as_deref()
            .map_or(String::new(), |o| format!(" owner {o}"));
        format!(
            "{} {}{owner} ({}/{})",
            self.state,
            self.freetype,
            perm_name(self.restricted),
            perm_name(self.full)
        )
    }
}

/// A GPA range whose attributes differ between the dumps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangedRange {
    /// First GPA.
    pub start: u64,
    /// GPA one past it.
    pub end: u64,
    /// Pages.
    pub pages: u64,
    /// In the first dump (None: no range covered it).
    pub old: Option<RangeAttrs>,
    /// In the second dump.
    pub new: Option<RangeAttrs>,
}

/// A counter whose value changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CounterDelta {
    /// "allocator", "stage2", "totals", "managed" or "kvm".
    pub section: &'static str,
    /// The counter's name (array elements as `name[i][j]`).
    pub name: String,
    /// In the first dump (None: absent there).
    pub old: Option<f64>,
    /// In the second dump.
    pub new: Option<f64>,
    /// new - old (absent counts as 0).
    pub delta: f64,
}

/// Which file and dump one side is.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// The path given.
    pub path: String,
    /// The dump's reason ("exit", "guest request #1", ...).
    pub reason: String,
    /// Its stage-2 backend.
    pub stage2_backend: String,
    /// Its ASI view.
    pub asi_view: AsiView,
}

/// The difference of two dumps (`veil dump diff --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct DumpDiff {
    /// The first dump.
    pub a: Side,
    /// The second dump.
    pub b: Side,
    /// Schema version of both.
    pub format_version: u32,
    /// RAM size of both.
    pub ram_size: u64,
    /// Ranges whose state, freetype, owner or permission changed, in GPA order.
    pub changed: Vec<ChangedRange>,
    /// Pages in `changed`.
    pub changed_pages: u64,
    /// Memslots of B that A does not have (same GPA, length and read-only flag).
    pub memslots_added: Vec<DumpSlot>,
    /// Memslots of A that B does not have.
    pub memslots_removed: Vec<DumpSlot>,
    /// Counters whose value changed, by section and name.
    pub counters: Vec<CounterDelta>,
}

/// Reads one dump file into its typed view.
pub fn read(path: &Path) -> Result<DumpView, DiffError> {
    use std::io::Read;
    let p = path.display().to_string();
    let io = |error| DiffError::Read {
        path: p.clone(),
        error,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(DiffError::NotAFile {
            path: p,
            what: "not a regular file (a directory, device or pipe)".into(),
        });
    }
    if meta.len() > MAX_DUMP_FILE {
        return Err(DiffError::NotAFile {
            path: p,
            what: format!(
                "{} bytes, more than a dump may have ({MAX_DUMP_FILE})",
                meta.len()
            ),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_DUMP_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    parse(&p, &bytes)
}

/// Parses the bytes of one dump (`path` names it in errors).
pub fn parse(path: &str, bytes: &[u8]) -> Result<DumpView, DiffError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|error| DiffError::NotJson {
            path: path.into(),
            error,
        })?;
    let not_a_dump = |why: String| DiffError::NotADump {
        path: path.into(),
        why,
    };
    let obj = value
        .as_object()
        .ok_or_else(|| not_a_dump("the document is not an object".into()))?;
    let version = match obj.get("format_version") {
        None => {
            let hint = if obj.contains_key("tests") && obj.contains_key("dump") {
                " (this looks like a `veil run --json` report: its \"dump\" member is a dump)"
            } else {
                ""
            };
            return Err(not_a_dump(format!("no \"format_version\" field{hint}")));
        }
        Some(v) => v
            .as_u64()
            .ok_or_else(|| not_a_dump(format!("\"format_version\" is {v}, not a number")))?,
    };
    if version != u64::from(FORMAT_VERSION) {
        return Err(DiffError::Version {
            path: path.into(),
            found: version,
        });
    }
    let view: DumpView = serde_json::from_value(value).map_err(|e| not_a_dump(e.to_string()))?;
    check_ranges(&view).map_err(not_a_dump)?;
    Ok(view)
}

/// Ranges must be non-empty, in GPA order, non-overlapping and inside RAM.
fn check_ranges(v: &DumpView) -> Result<(), String> {
    let mut prev_end = 0;
    for r in &v.ranges {
        if r.start >= r.end || r.end > v.ram_size {
            return Err(format!(
                "range [{:#x}, {:#x}) is empty or outside RAM ({:#x})",
                r.start, r.end, v.ram_size
            ));
        }
        if r.start < prev_end {
            return Err(format!(
                "range [{:#x}, {:#x}) overlaps or precedes the one before it",
                r.start, r.end
            ));
        }
        prev_end = r.end;
    }
    Ok(())
}

fn side(path: &str, v: &DumpView) -> Side {
    Side {
        path: path.into(),
        reason: v.reason.clone(),
        stage2_backend: v.stage2_backend.clone(),
        asi_view: v.asi_view,
    }
}

/// Compares two dumps (`path_a`, `path_b` name them in the result and errors).
pub fn diff(path_a: &str, a: &DumpView, path_b: &str, b: &DumpView) -> Result<DumpDiff, DiffError> {
    let mismatch = |what, x: String, y: String| DiffError::Mismatch {
        what,
        path_a: path_a.into(),
        a: x,
        path_b: path_b.into(),
        b: y,
    };
    if a.format_version != b.format_version {
        return Err(mismatch(
            "dump schema version",
            a.format_version.to_string(),
            b.format_version.to_string(),
        ));
    }
    if a.ram_size != b.ram_size {
        return Err(mismatch("RAM size", human(a.ram_size), human(b.ram_size)));
    }
    if a.page_size != b.page_size || a.pageblock_size != b.pageblock_size {
        return Err(mismatch(
            "page / pageblock size",
            format!("{}/{}", a.page_size, a.pageblock_size),
            format!("{}/{}", b.page_size, b.pageblock_size),
        ));
    }
    let changed = changed_ranges(&a.ranges, &b.ranges, a.page_size.max(1));
    let changed_pages = changed.iter().map(|c| c.pages).sum();
    let key = |s: &DumpSlot| (s.gpa, s.len, s.readonly);
    let memslots_added = b
        .memslots
        .iter()
        .filter(|s| !a.memslots.iter().any(|t| key(t) == key(s)))
        .copied()
        .collect();
    let memslots_removed = a
        .memslots
        .iter()
        .filter(|s| !b.memslots.iter().any(|t| key(t) == key(s)))
        .copied()
        .collect();
    Ok(DumpDiff {
        a: side(path_a, a),
        b: side(path_b, b),
        format_version: a.format_version,
        ram_size: a.ram_size,
        changed,
        changed_pages,
        memslots_added,
        memslots_removed,
        counters: counter_deltas(a, b),
    })
}

/// The range of `ranges` covering `gpa`, starting the search at `*i` (ranges are sorted).
fn covering<'a>(ranges: &'a [DumpRange], i: &mut usize, gpa: u64) -> Option<&'a DumpRange> {
    while *i < ranges.len() && ranges[*i].end <= gpa {
        *i += 1;
    }
    ranges.get(*i).filter(|r| r.start <= gpa)
}

/// The next boundary after `gpa` in `ranges` from `i` (None: past the last range).
fn next_edge(ranges: &[DumpRange], i: usize, gpa: u64) -> Option<u64> {
    ranges
        .get(i)
        .map(|r| if r.start > gpa { r.start } else { r.end })
}

/// One sweep over both sorted range lists: the pieces whose attributes differ, adjacent
/// pieces with the same old and new attributes merged.
fn changed_ranges(a: &[DumpRange], b: &[DumpRange], page: u64) -> Vec<ChangedRange> {
    let mut out: Vec<ChangedRange> = Vec::new();
    let (mut i, mut j) = (0, 0);
    let mut gpa = match (a.first(), b.first()) {
        (Some(x), Some(y)) => x.start.min(y.start),
        (Some(x), None) => x.start,
        (None, Some(y)) => y.start,
        (None, None) => return out,
    };
    loop {
        let ra = covering(a, &mut i, gpa);
        let rb = covering(b, &mut j, gpa);
        let end = match (next_edge(a, i, gpa), next_edge(b, j, gpa)) {
            (Some(x), Some(y)) => x.min(y),
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => break,
        };
        let old = ra.map(RangeAttrs::of);
        let new = rb.map(RangeAttrs::of);
        if old != new {
            match out.last_mut() {
                Some(last) if last.end == gpa && last.old == old && last.new == new => {
                    last.end = end;
                    last.pages = (last.end - last.start) / page;
                }
                _ => out.push(ChangedRange {
                    start: gpa,
                    end,
                    pages: (end - gpa) / page,
                    old,
                    new,
                }),
            }
        }
        gpa = end;
    }
    out
}

/// Numeric leaves of a JSON value by path (`name`, `name[i]`, `name.field`).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(prefix.to_string(), x);
            }
        }
        serde_json::Value::Bool(b) => {
            out.insert(prefix.to_string(), f64::from(u8::from(*b)));
        }
        serde_json::Value::Array(items) => {
            for (k, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{k}]"), item, out);
            }
        }
        serde_json::Value::Object(m) => {
            for (k, item) in m {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, item, out);
            }
        }
        _ => {}
    }
}

fn section_values(section: &str, v: &DumpView) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    match section {
        "allocator" => {
            if let Some(m) = &v.allocator {
                flatten("", &serde_json::Value::Object(m.clone()), &mut out);
            }
        }
        "stage2" => flatten("", &serde_json::Value::Object(v.stage2.clone()), &mut out),
        "totals" => {
            // A struct of numbers always serialises.
            let t = serde_json::to_value(v.totals).unwrap_or(serde_json::Value::Null);
            flatten("", &t, &mut out);
        }
        "managed" => {
            if let Some(m) = &v.managed {
                out.insert("free_pages".into(), m.free_pages as f64);
            }
        }
        "kvm" => {
            for s in v.kvm_stats.iter().flatten() {
                out.insert(s.name.clone(), s.value as f64);
            }
        }
        _ => {}
    }
    out
}

/// Every counter whose value differs, section by section.
fn counter_deltas(a: &DumpView, b: &DumpView) -> Vec<CounterDelta> {
    let mut out = Vec::new();
    for section in ["allocator", "stage2", "totals", "managed", "kvm"] {
        let (va, vb) = (section_values(section, a), section_values(section, b));
        let mut names: Vec<&String> = va.keys().chain(vb.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let (old, new) = (va.get(name).copied(), vb.get(name).copied());
            if old != new {
                out.push(CounterDelta {
                    section,
                    name: name.clone(),
                    old,
                    new,
                    delta: new.unwrap_or(0.0) - old.unwrap_or(0.0),
                });
            }
        }
    }
    out
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x}"),
    }
}

/// Counters shown per section in the text diff before "... and N more".
const TEXT_COUNTERS: usize = 40;

/// The diff for people.
pub fn render_text(d: &DumpDiff) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = (|| -> std::fmt::Result {
        writeln!(
            o,
            "stage-2 dump diff: {} ({}) -> {} ({})",
            d.a.path, d.a.reason, d.b.path, d.b.reason
        )?;
        let arrow = |x: &str, y: &str| {
            if x == y {
                x.to_string()
            } else {
                format!("{x} -> {y}")
            }
        };
        writeln!(
            o,
            "RAM {}, schema {}, backend {}, ASI view {}",
            human(d.ram_size),
            d.format_version,
            arrow(&d.a.stage2_backend, &d.b.stage2_backend),
            arrow(d.a.asi_view.name(), d.b.asi_view.name())
        )?;
        writeln!(o)?;
        if d.changed.is_empty() {
            writeln!(o, "Ranges: no change")?;
        } else {
            writeln!(
                o,
                "Ranges changed: {} ({} pages, {}); state freetype (restricted/full):",
                d.changed.len(),
                d.changed_pages,
                human(d.changed_pages.saturating_mul(4096))
            )?;
            for c in &d.changed {
                let side = |a: &Option<RangeAttrs>| {
                    a.as_ref()
                        .map_or("(no range)".to_string(), RangeAttrs::describe)
                };
                writeln!(
                    o,
                    "  [{:#012x}, {:#012x}) {:>9}  {} -> {}",
                    c.start,
                    c.end,
                    human(c.end - c.start),
                    side(&c.old),
                    side(&c.new)
                )?;
            }
        }
        writeln!(o)?;
        if d.memslots_added.is_empty() && d.memslots_removed.is_empty() {
            writeln!(o, "Memslots: no change")?;
        } else {
            writeln!(
                o,
                "Memslots: {} added, {} removed",
                d.memslots_added.len(),
                d.memslots_removed.len()
            )?;
            for (mark, list) in [("-", &d.memslots_removed), ("+", &d.memslots_added)] {
                for s in list {
                    writeln!(
                        o,
                        "  {mark} slot {:<4} [{:#012x}, {:#012x}) {:>9}{}",
                        s.slot,
                        s.gpa,
                        s.gpa.saturating_add(s.len),
                        human(s.len),
                        if s.readonly { "  read-only" } else { "" }
                    )?;
                }
            }
        }
        writeln!(o)?;
        if d.counters.is_empty() {
            writeln!(o, "Counters: no change")?;
        } else {
            writeln!(o, "Counters changed (old -> new, delta):")?;
            for section in ["allocator", "stage2", "totals", "managed", "kvm"] {
                let rows: Vec<&CounterDelta> =
                    d.counters.iter().filter(|c| c.section == section).collect();
                for c in rows.iter().take(TEXT_COUNTERS) {
                    let sign = if c.delta >= 0.0 { "+" } else { "" };
                    writeln!(
                        o,
                        "  {:<44} {:>14} -> {:<14} {sign}{}",
                        format!("{section}.{}", c.name),
                        num(c.old),
                        num(c.new),
                        num(Some(c.delta))
                    )?;
                }
                if rows.len() > TEXT_COUNTERS {
                    writeln!(
                        o,
                        "  ... and {} more {section} counters (--json lists all)",
                        rows.len() - TEXT_COUNTERS
                    )?;
                }
            }
        }
        Ok(())
    })();
    o
}

/// The diff as pretty JSON (with a trailing newline).
pub fn render_json(d: &DumpDiff) -> String {
    let mut s = serde_json::to_string_pretty(d).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64, state: RangeState, freetype: &str) -> serde_json::Value {
        let (r, f) = match state {
            RangeState::Unmapped | RangeState::NoAccess => ("none", "none"),
            RangeState::Sensitive => ("none", "read_write"),
            RangeState::ReadOnly => ("read", "read"),
            _ => ("read_write", "read_write"),
        };
        serde_json::json!({
            "start": start, "end": end, "state": state, "freetype": freetype,
            "slot": 0, "host_addr": 0, "pages": (end - start) / 4096,
            "restricted": r, "full": f
        })
    }

    /// A small hand-made dump: 16 MiB, reserved [0, 4M), then the given ranges.
    fn dump(ranges: Vec<serde_json::Value>, slots: &[(u64, u64)], flips: u64) -> String {
        let mut all = vec![range(0, 4 << 20, RangeState::Reserved, "reserved")];
        all.extend(ranges);
        let memslots: Vec<serde_json::Value> = slots
            .iter()
            .enumerate()
            .map(|(i, &(gpa, len))| {
                serde_json::json!({"slot": i, "gpa": gpa, "len": len, "readonly": false, "host_addr": 0})
            })
            .collect();
        serde_json::json!({
            "format_version": 1, "reason": "hand-made", "stage2_backend": "slots",
            "asi_view": "restricted", "ram_size": 16u64 << 20, "reserved_end": 4u64 << 20,
            "page_size": 4096, "pageblock_size": 2u64 << 20,
            "totals": {"reserved_pages": 1024, "mapped_pages": 0, "locked_pages": 0,
                "unmapped_pages": 0, "sensitive_pages": 0, "sensitive_runs": 0,
                "pageblocks": 8, "memslots": slots.len()},
            "ranges": all, "memslots": memslots,
            "allocator": {"flips_to_unmapped": flips, "free_per_order": [[1, 2], [3, 4]]},
            "stage2": {"unmap_calls": flips},
            "kvm_stats": [{"name": "remote_tlb_flush", "value": flips * 2, "unit": "none",
                "kind": "cumulative", "exponent": 0, "base2": false, "values": 1}]
        })
        .to_string()
    }

    fn two() -> (DumpView, DumpView) {
        let a = dump(
            vec![range(4 << 20, 16 << 20, RangeState::Mapped, "unmovable")],
            &[(0, 16 << 20)],
            0,
        );
        let b = dump(
            vec![
                range(4 << 20, 6 << 20, RangeState::Mapped, "unmovable"),
                range(6 << 20, 8 << 20, RangeState::Unmapped, "unmovable|unmapped"),
                range(8 << 20, 16 << 20, RangeState::Mapped, "unmovable"),
            ],
            &[(0, 6 << 20), (8 << 20, 8 << 20)],
            1,
        );
        (
            parse("a", a.as_bytes()).unwrap(),
            parse("b", b.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn a_flip_is_one_changed_range_with_its_memslots_and_counters() {
        let (a, b) = two();
        let d = diff("a", &a, "b", &b).unwrap();
        assert_eq!(d.changed.len(), 1, "{:?}", d.changed);
        let c = &d.changed[0];
        assert_eq!((c.start, c.end, c.pages), (6 << 20, 8 << 20, 512));
        let (old, new) = (c.old.as_ref().unwrap(), c.new.as_ref().unwrap());
        assert_eq!(
            (old.state, new.state),
            (RangeState::Mapped, RangeState::Unmapped)
        );
        assert_eq!(new.freetype, "unmovable|unmapped");
        assert_eq!(
            (old.restricted, new.restricted),
            (Perm::ReadWrite, Perm::None)
        );
        assert_eq!(d.memslots_removed.len(), 1);
        assert_eq!(d.memslots_added.len(), 2);
        let names: Vec<String> = d
            .counters
            .iter()
            .map(|c| format!("{}.{}={}", c.section, c.name, c.delta))
            .collect();
        assert!(
            names.contains(&"allocator.flips_to_unmapped=1".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"stage2.unmap_calls=1".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"kvm.remote_tlb_flush=2".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"totals.memslots=1".to_string()),
            "{names:?}"
        );
        // Unchanged array elements are not listed.
        assert!(
            !names.iter().any(|n| n.contains("free_per_order")),
            "{names:?}"
        );
        let t = render_text(&d);
        assert!(t.contains("Ranges changed: 1 (512 pages, 2 MiB)"), "{t}");
        assert!(
            t.contains("mapped unmovable (read_write/read_write) -> unmapped unmovable|unmapped (none/none)"),
            "{t}"
        );
        assert!(t.contains("Memslots: 2 added, 1 removed"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&render_json(&d)).unwrap();
        assert_eq!(j["changed"][0]["new"]["state"], "unmapped");
        assert_eq!(j["changed_pages"], 512);
    }

    #[test]
    fn a_dump_against_itself_is_no_change() {
        let (a, _) = two();
        let d = diff("a", &a, "a", &a).unwrap();
        assert!(d.changed.is_empty() && d.counters.is_empty());
        assert!(d.memslots_added.is_empty() && d.memslots_removed.is_empty());
        let t = render_text(&d);
        assert!(
            t.contains("Ranges: no change") && t.contains("Counters: no change"),
            "{t}"
        );
    }

    #[test]
    fn adjacent_pieces_with_the_same_change_merge_and_splits_alone_are_no_change() {
        // B splits A's one mapped range in two without changing it, and unmaps two
        // neighbouring blocks that A had as two ranges of the same kind.
        let a = dump(
            vec![
                range(4 << 20, 10 << 20, RangeState::Mapped, "movable"),
                range(10 << 20, 16 << 20, RangeState::Mapped, "unmovable"),
            ],
            &[],
            0,
        );
        let b = dump(
            vec![
                range(4 << 20, 6 << 20, RangeState::Mapped, "movable"),
                range(6 << 20, 8 << 20, RangeState::Mapped, "movable"),
                range(8 << 20, 10 << 20, RangeState::Unmapped, "movable|unmapped"),
                range(10 << 20, 12 << 20, RangeState::Unmapped, "movable|unmapped"),
                range(12 << 20, 16 << 20, RangeState::Mapped, "unmovable"),
            ],
            &[],
            0,
        );
        let (a, b) = (
            parse("a", a.as_bytes()).unwrap(),
            parse("b", b.as_bytes()).unwrap(),
        );
        let d = diff("a", &a, "b", &b).unwrap();
        let spans: Vec<(u64, u64)> = d
            .changed
            .iter()
            .map(|c| (c.start >> 20, c.end >> 20))
            .collect();
        // [8, 10) changes movable -> unmapped; [10, 12) changes unmovable -> unmapped: two.
        assert_eq!(spans, [(8, 10), (10, 12)]);
        assert_eq!(d.changed_pages, 1024);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let (a, _) = two();
        assert!(matches!(
            parse("x", b"not json"),
            Err(DiffError::NotJson { .. })
        ));
        assert!(matches!(
            parse("x", b"[1, 2]"),
            Err(DiffError::NotADump { .. })
        ));
        let e = parse("x", br#"{"tests": [], "dump": {}}"#).unwrap_err();
        assert!(e.to_string().contains("veil run --json"), "{e}");
        let e = parse("x", br#"{"format_version": 7}"#).unwrap_err();
        assert!(matches!(e, DiffError::Version { found: 7, .. }), "{e}");
        assert!(e.to_string().contains("version 7"), "{e}");
        let e = parse("x", br#"{"format_version": 1, "ranges": []}"#).unwrap_err();
        assert!(matches!(e, DiffError::NotADump { .. }), "{e}");
        // A range with an unknown state is not a dump either.
        let bad = dump(
            vec![range(4 << 20, 16 << 20, RangeState::Mapped, "x")],
            &[],
            0,
        )
        .replace("\"mapped\"", "\"purple\"");
        assert!(matches!(
            parse("x", bad.as_bytes()),
            Err(DiffError::NotADump { .. })
        ));
        // Overlapping ranges.
        let bad = dump(
            vec![range(2 << 20, 16 << 20, RangeState::Mapped, "x")],
            &[],
            0,
        );
        let e = parse("x", bad.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        // Different RAM sizes.
        let mut big = a.clone();
        big.ram_size = 32 << 20;
        let e = diff("a", &a, "big", &big).unwrap_err();
        assert!(
            e.to_string()
                .contains("RAM size 16 MiB in a, 32 MiB in big"),
            "{e}"
        );
        let mut v2 = a.clone();
        v2.format_version = 2;
        assert!(matches!(
            diff("a", &a, "v2", &v2),
            Err(DiffError::Mismatch { .. })
        ));
    }
}
