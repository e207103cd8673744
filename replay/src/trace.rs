//! Loading a trace: stream the lines, pair frees with allocations, and keep a compact event list.
//!
//! The replay keeps one 16-byte [`Event`] per allocation or matched free, never the text.
//!
//! Decisions, all counted in [`TraceStats`]:
//! - **Order.** Events are replayed in file order. `trace_pipe` merges the per-CPU ring buffers
//!   as it reads them, so timestamps are not globally sorted, but the events of one CPU are in
//!   order, and a page's free can only be recorded after its allocation became visible (the
//!   page went through the allocator's locks in between). Sorting by timestamp would reorder
//!   events whose timestamps come from unsynchronised per-CPU clocks and gain nothing; file
//!   order is what the reader saw. Out-of-order timestamps are counted.
//! - **Batched frees.** A page freed in a batch produces `mm_page_free` (from
//!   `free_pages_prepare()`) *and* `mm_page_free_batched`: in the shared trace every batched
//!   event follows the page's `mm_page_free`. The first of the two events frees the page; the
//!   other is recognised as its duplicate, whichever order they come in.
//! - **Pre-capture pages.** A free of a page not allocated during the capture is counted and
//!   skipped; pages still allocated at the end are counted.
//! - **Failed allocations** (`pfn=-1`), other tracepoints, `# ...` comments and
//!   `CPU:N [LOST M EVENTS]` markers are counted and skipped.
//! - **Re-allocation of a live pfn** (only possible after lost events) frees the old
//!   allocation first.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufRead};

use serde::Serialize;
use thiserror::Error;

use crate::gfp::GfpTable;
use crate::parse::{parse_line, EventKind, Line, ParseError};
use crate::reader::{LineReader, NextLine};

/// Flag bit on events: the allocation is unmapped (set by classification).
pub const FLAG_UNMAPPED: u8 = 1;
/// Flag bit on events: the allocation's context cannot sleep (no `__GFP_DIRECT_RECLAIM`).
pub const FLAG_ATOMIC: u8 = 2;

/// One replayable event (16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An allocation; its id is its index among the trace's allocations.
    Alloc {
        /// PFN the real kernel returned.
        pfn: u64,
        /// Interned `gfp_flags` id (see [`GfpTable`]).
        gfp: u32,
        /// Buddy order.
        order: u8,
        /// Trace migratetype (0 unmovable, 1 movable, 2 reclaimable, others as printed).
        migratetype: u8,
        /// [`FLAG_UNMAPPED`] | [`FLAG_ATOMIC`].
        flags: u8,
    },
    /// The free of allocation `alloc` (an allocation id).
    Free {
        /// Allocation id.
        alloc: u32,
        /// Order of that allocation.
        order: u8,
        /// Flags of that allocation.
        flags: u8,
    },
}

/// A malformed line kept for the report.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Malformed {
    /// 1-based line number.
    pub line: u64,
    /// What was wrong.
    pub reason: String,
    /// The start of the line (at most 160 bytes, lossy UTF-8).
    pub text: String,
}

/// Everything counted while loading.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TraceStats {
    /// Lines read.
    pub lines: u64,
    /// Empty lines.
    pub blank_lines: u64,
    /// `#` lines.
    pub comment_lines: u64,
    /// Lines of other tracepoints.
    pub other_events: u64,
    /// `CPU:N [LOST M EVENTS]` markers.
    pub lost_markers: u64,
    /// Sum of M over those markers.
    pub lost_events: u64,
    /// Lines that could not be parsed.
    pub malformed_lines: u64,
    /// The first few malformed lines.
    pub malformed_examples: Vec<Malformed>,
    /// `mm_page_alloc` lines.
    pub alloc_events: u64,
    /// `mm_page_free` lines.
    pub free_events: u64,
    /// `mm_page_free_batched` lines.
    pub batched_events: u64,
    /// Allocations traced as failed (`pfn=-1`).
    pub failed_allocs_in_trace: u64,
    /// Allocations kept for the replay.
    pub allocs: u64,
    /// Pages of those allocations.
    pub alloc_pages: u64,
    /// `mm_page_free` events that freed a live allocation.
    pub frees_matched: u64,
    /// `mm_page_free_batched` events that freed a live allocation (came before their free).
    pub batched_matched: u64,
    /// `mm_page_free_batched` events that repeat an `mm_page_free` of the same page.
    pub batched_duplicates: u64,
    /// `mm_page_free` events that repeat an earlier `mm_page_free_batched`.
    pub free_duplicates: u64,
    /// Frees of pages not allocated during the capture (skipped).
    pub unmatched_frees: u64,
    /// Allocations of a pfn that was still live (the old one is freed first).
    pub implicit_frees: u64,
    /// Frees whose order differs from their allocation's (the allocation is freed whole).
    pub order_mismatches: u64,
    /// Events whose timestamp is earlier than the previous line's.
    pub out_of_order_timestamps: u64,
    /// Distinct CPUs seen.
    pub cpus: u32,
    /// Allocations still live at the end.
    pub live_at_end: u64,
    /// Pages still live at the end.
    pub live_pages_at_end: u64,
    /// Most pages live at once.
    pub peak_live_pages: u64,
    /// Lowest allocated pfn.
    pub min_pfn: u64,
    /// One past the highest allocated page.
    pub end_pfn: u64,
}

/// A loaded trace: compact events, flag strings and statistics.
#[derive(Debug, Default)]
pub struct Trace {
    /// Allocations and matched frees in file order.
    pub events: Vec<Event>,
    /// Distinct `gfp_flags` strings.
    pub gfp: GfpTable,
    /// Counters.
    pub stats: TraceStats,
}

/// Why loading failed.
#[derive(Debug, Error)]
pub enum TraceError {
    /// Reading the input failed (after `line` complete lines).
    #[error("cannot read the trace after line {line}")]
    Io {
        /// Lines read before the failure.
        line: u64,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// `--strict` and a malformed line.
    #[error("line {line}: {reason}: {text:?}")]
    Malformed {
        /// 1-based line number.
        line: u64,
        /// What was wrong.
        reason: String,
        /// The start of the line.
        text: String,
    },
    /// More than 2^32 - 1 allocations.
    #[error("too many allocations in one trace (max {})", u32::MAX)]
    TooManyAllocations,
}

/// How to load.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Fail on the first malformed line.
    pub strict: bool,
    /// Malformed lines kept verbatim for the report.
    pub keep_malformed: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: false,
            keep_malformed: 5,
        }
    }
}

/// State of one pfn while pairing frees with allocations.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// Allocated during the capture and not freed yet.
    Live { id: u32, order: u8, flags: u8 },
    /// Freed by `mm_page_free`; an `mm_page_free_batched` may repeat it.
    FreedAwaitBatched,
    /// Freed by `mm_page_free_batched`; an `mm_page_free` may repeat it.
    FreedAwaitFree,
    /// Freed and its duplicate seen.
    Done,
}

/// A fast hasher for pfns (multiplicative; the keys are not attacker-chosen hash-flooding input
/// in any way that matters for a one-shot offline tool, and the table stays correct regardless).
#[derive(Default, Clone, Copy)]
pub struct PfnHasher(u64);

impl Hasher for PfnHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PfnMap<V> = HashMap<u64, V, BuildHasherDefault<PfnHasher>>;

/// Incremental loader: feed lines, then [`Loader::finish`].
pub struct Loader {
    opts: LoadOptions,
    trace: Trace,
    slots: PfnMap<Slot>,
    live_pages: u64,
    last_ts: Option<u64>,
    cpu_seen: Vec<bool>,
    cpus_overflow: std::collections::BTreeSet<u32>,
}

impl Loader {
    /// A fresh loader.
    pub fn new(opts: LoadOptions) -> Self {
        let mut trace = Trace::default();
        trace.stats.min_pfn = u64::MAX;
        Loader {
            opts,
            trace,
            slots: PfnMap::default(),
            live_pages: 0,
            last_ts: None,
            cpu_seen: vec![false; 1024],
            cpus_overflow: Default::default(),
        }
    }

    /// Account one line (1-based number `lineno`).
    pub fn feed(&mut self, lineno: u64, line: &[u8]) -> Result<(), TraceError> {
        self.trace.stats.lines += 1;
        match parse_line(line) {
            Ok(l) => self.accept(l),
            Err(e) => self.malformed(lineno, e, line),
        }
    }

    /// Account a line that was too long to buffer.
    pub fn feed_too_long(&mut self, lineno: u64) -> Result<(), TraceError> {
        self.trace.stats.lines += 1;
        self.malformed(lineno, ParseError::TooLong, b"")
    }

    fn malformed(&mut self, lineno: u64, e: ParseError, line: &[u8]) -> Result<(), TraceError> {
        let text = String::from_utf8_lossy(&line[..line.len().min(160)]).into_owned();
        if self.opts.strict {
            return Err(TraceError::Malformed {
                line: lineno,
                reason: e.to_string(),
                text,
            });
        }
        let s = &mut self.trace.stats;
        s.malformed_lines += 1;
        if s.malformed_examples.len() < self.opts.keep_malformed {
            s.malformed_examples.push(Malformed {
                line: lineno,
                reason: e.to_string(),
                text,
            });
        }
        Ok(())
    }

    fn accept(&mut self, l: Line<'_>) -> Result<(), TraceError> {
        let s = &mut self.trace.stats;
        let ev = match l {
            Line::Blank => {
                s.blank_lines += 1;
                return Ok(());
            }
            Line::Comment => {
                s.comment_lines += 1;
                return Ok(());
            }
            Line::Other => {
                s.other_events += 1;
                return Ok(());
            }
            Line::Lost { count, .. } => {
                s.lost_markers += 1;
                s.lost_events = s.lost_events.saturating_add(count);
                return Ok(());
            }
            Line::Event(ev) => ev,
        };
        if let Some(last) = self.last_ts {
            if ev.ts_ns < last {
                s.out_of_order_timestamps += 1;
            }
        }
        self.last_ts = Some(ev.ts_ns);
        self.note_cpu(ev.cpu);
        match ev.kind {
            EventKind::Alloc => {
                self.trace.stats.alloc_events += 1;
                let Some(pfn) = ev.pfn else {
                    self.trace.stats.failed_allocs_in_trace += 1;
                    return Ok(());
                };
                // The parser guarantees order and gfp for allocations.
                let order = ev.order.unwrap_or(0);
                let gfp = self.trace.gfp.intern(ev.gfp);
                self.alloc(pfn, order, ev.migratetype, gfp)
            }
            EventKind::Free => {
                self.trace.stats.free_events += 1;
                if let Some(pfn) = ev.pfn {
                    self.free(pfn, ev.order, false);
                } else {
                    self.trace.stats.unmatched_frees += 1;
                }
                Ok(())
            }
            EventKind::FreeBatched => {
                self.trace.stats.batched_events += 1;
                if let Some(pfn) = ev.pfn {
                    self.free(pfn, ev.order, true);
                } else {
                    self.trace.stats.unmatched_frees += 1;
                }
                Ok(())
            }
        }
    }

    fn note_cpu(&mut self, cpu: u32) {
        match self.cpu_seen.get_mut(cpu as usize) {
            Some(seen) if !*seen => {
                *seen = true;
                self.trace.stats.cpus += 1;
            }
            Some(_) => {}
            None => {
                if self.cpus_overflow.insert(cpu) {
                    self.trace.stats.cpus += 1;
                }
            }
        }
    }

    fn alloc(&mut self, pfn: u64, order: u8, migratetype: u8, gfp: u32) -> Result<(), TraceError> {
        let s = &mut self.trace.stats;
        let id = u32::try_from(s.allocs).map_err(|_| TraceError::TooManyAllocations)?;
        if id == u32::MAX {
            return Err(TraceError::TooManyAllocations);
        }
        if let Some(Slot::Live {
            id: old,
            order: o,
            flags,
        }) = self.slots.get(&pfn).copied()
        {
            s.implicit_frees += 1;
            self.live_pages -= 1 << o;
            self.trace.events.push(Event::Free {
                alloc: old,
                order: o,
                flags,
            });
        }
        s.allocs += 1;
        s.alloc_pages += 1 << order;
        s.min_pfn = s.min_pfn.min(pfn);
        s.end_pfn = s.end_pfn.max(pfn.saturating_add(1 << order));
        self.live_pages += 1 << order;
        s.peak_live_pages = s.peak_live_pages.max(self.live_pages);
        self.slots.insert(
            pfn,
            Slot::Live {
                id,
                order,
                flags: 0,
            },
        );
        self.trace.events.push(Event::Alloc {
            pfn,
            gfp,
            order,
            migratetype,
            flags: 0,
        });
        Ok(())
    }

    fn free(&mut self, pfn: u64, order: Option<u8>, batched: bool) {
        let s = &mut self.trace.stats;
        let entry = self.slots.entry(pfn);
        let slot = match &entry {
            std::collections::hash_map::Entry::Occupied(o) => Some(*o.get()),
            std::collections::hash_map::Entry::Vacant(_) => None,
        };
        let next = match (slot, batched) {
            (
                Some(Slot::Live {
                    id,
                    order: o,
                    flags,
                }),
                _,
            ) => {
                if order.is_some_and(|x| x != o) {
                    s.order_mismatches += 1;
                }
                if batched {
                    s.batched_matched += 1;
                } else {
                    s.frees_matched += 1;
                }
                self.live_pages -= 1 << o;
                self.trace.events.push(Event::Free {
                    alloc: id,
                    order: o,
                    flags,
                });
                if batched {
                    Slot::FreedAwaitFree
                } else {
                    Slot::FreedAwaitBatched
                }
            }
            (Some(Slot::FreedAwaitBatched), true) => {
                s.batched_duplicates += 1;
                Slot::Done
            }
            (Some(Slot::FreedAwaitFree), false) => {
                s.free_duplicates += 1;
                Slot::Done
            }
            (_, b) => {
                s.unmatched_frees += 1;
                if b {
                    Slot::FreedAwaitFree
                } else {
                    Slot::FreedAwaitBatched
                }
            }
        };
        match entry {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                o.insert(next);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(next);
            }
        }
    }

    /// Finish: final counters.
    pub fn finish(mut self) -> Trace {
        let s = &mut self.trace.stats;
        s.live_at_end = self
            .slots
            .values()
            .filter(|v| matches!(v, Slot::Live { .. }))
            .count() as u64;
        s.live_pages_at_end = self.live_pages;
        if s.min_pfn == u64::MAX {
            s.min_pfn = 0;
        }
        self.trace.events.shrink_to_fit();
        self.trace
    }
}

/// Load a whole trace from a buffered reader (see [`crate::reader::open_input`]).
pub fn load<R: BufRead>(r: R, opts: LoadOptions) -> Result<Trace, TraceError> {
    load_with_progress(r, opts, &mut |_| {})
}

/// Lines between calls of the progress callback of [`load_with_progress`].
pub const PROGRESS_LINES: u64 = 1 << 20;

/// [`load`], calling `progress(lines read so far)` every [`PROGRESS_LINES`] lines.
pub fn load_with_progress<R: BufRead>(
    r: R,
    opts: LoadOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Trace, TraceError> {
    let mut lr = LineReader::new(r);
    let mut loader = Loader::new(opts);
    let mut lineno = 0u64;
    loop {
        if lineno > 0 && lineno.is_multiple_of(PROGRESS_LINES) {
            progress(lineno);
        }
        lineno += 1;
        let next = lr.next_line().map_err(|source| TraceError::Io {
            line: lineno - 1,
            source,
        })?;
        match next {
            NextLine::Eof => break,
            NextLine::TooLong => loader.feed_too_long(lineno)?,
            NextLine::Line(l) => loader.feed(lineno, l)?,
        }
    }
    Ok(loader.finish())
}

impl Trace {
    /// Number of allocation events.
    pub fn allocs(&self) -> u64 {
        self.stats.allocs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_compact() {
        assert!(std::mem::size_of::<Event>() <= 16);
    }

    #[test]
    fn crlf_and_unicode_task_names() {
        let s = "  tâche-ü-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x10 order=0 migratetype=0 gfp_flags=GFP_KERNEL\r\n\
                 x-1 [000] ..... 1.1: mm_page_free: page=x pfn=0x10 order=0\r\n";
        let t = load(s.as_bytes(), LoadOptions::default()).unwrap();
        assert_eq!(
            (
                t.stats.allocs,
                t.stats.frees_matched,
                t.stats.malformed_lines
            ),
            (1, 1, 0)
        );
    }
}
