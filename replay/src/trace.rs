//! Loading a trace: stream the lines, pair frees with allocations, and keep a compact event list.
//!
//! The replay keeps one [`Event`] per allocation or matched free (eight bytes, in [`Events`]),
//! never the text.
//! [`load_with_progress`] reads, parses and pairs on the calling thread (the reference);
//! [`load_parallel`] gives the same result reading and parsing on a second thread (`pipeline`).
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
//!   allocation first, also when the new allocation overlaps it at another pfn than its head.
//! - **Frees in pieces** (`split_page`: an order-`n` allocation later freed as smaller pieces,
//!   head first or not) free one piece each; the allocation is replayed as freed when its last
//!   page is, and no piece counts as a free of a page allocated before the capture.

use std::collections::HashMap;
use std::io::{self, BufRead};

use serde::Serialize;
use thiserror::Error;

use crate::gfp::GfpTable;
use crate::parse::{parse_line, EventKind, Line, ParseError};
use crate::pfn_table::PfnTable;
use crate::reader::{LineReader, NextLine};

mod events;
mod pipeline;
pub use events::Events;
pub use pipeline::{load_parallel, load_parallel_scoped, IN_FLIGHT};

/// Flag bit on events: the allocation is unmapped (set by classification).
pub const FLAG_UNMAPPED: u8 = 1;
/// Flag bit on events: the allocation's context cannot sleep (no `__GFP_DIRECT_RECLAIM`).
pub const FLAG_ATOMIC: u8 = 2;

/// One replayable event (kept in [`Events`], eight bytes each).
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
    /// Frees of another order than their allocation's that are not pieces of it (a larger
    /// order, or an allocation not aligned to its order): the allocation is freed whole.
    pub order_mismatches: u64,
    /// Allocations freed in pieces (`split_page`: a smaller free at the head or inside; the
    /// replay frees the allocation when its last page is freed).
    pub split_allocations: u64,
    /// Frees of pieces that did not end their allocation (the last piece is counted as the
    /// allocation's free in `frees_matched` / `batched_matched`).
    pub split_piece_frees: u64,
    /// Events whose timestamp is earlier than the previous line's.
    pub out_of_order_timestamps: u64,
    /// Distinct CPUs seen.
    pub cpus: u32,
    /// Highest CPU number seen.
    pub max_cpu: u32,
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
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// Allocations and matched frees in file order.
    pub events: Events,
    /// Distinct `gfp_flags` strings.
    pub gfp: GfpTable,
    /// The CPU of each allocation, by allocation id (saturated at `u16::MAX`).
    pub cpus: Vec<u16>,
    /// The CPU that freed each allocation, by allocation id (its allocating CPU if it was never
    /// freed or freed implicitly).
    pub free_cpus: Vec<u16>,
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
    /// [`GIVE_UP_LINES`] lines or [`GIVE_UP_BYTES`] bytes in a row without a page-allocator
    /// event (random bytes, `/dev/zero`, the wrong file): the load gives up instead of reading on.
    #[error("gave up in line {line}: {run_lines} lines ({run_mib} MiB) in a row without an mm_page_alloc, mm_page_free or mm_page_free_batched event ({malformed} malformed lines in all{}): not a kmem trace (the limit is {} lines or {} MiB; see `veil replay --help`)", first.as_ref().map(|m| format!("; line {}: {}", m.line, m.reason)).unwrap_or_default(), GIVE_UP_LINES, GIVE_UP_BYTES >> 20)]
    NotATrace {
        /// The line (1-based) the load stopped in.
        line: u64,
        /// Lines since the last event (or the start).
        run_lines: u64,
        /// MiB of input since then.
        run_mib: u64,
        /// Malformed lines read in all.
        malformed: u64,
        /// The first malformed line.
        first: Option<Malformed>,
    },
}

/// Consecutive lines without a page-allocator event after which a load gives up
/// ([`TraceError::NotATrace`]): 2^20. A real kmem trace has one on nearly every line.
pub const GIVE_UP_LINES: u64 = 1 << 20;

/// Consecutive bytes of input without a page-allocator event after which a load gives up
/// (256 MiB, counted to within the reader's 256 KiB buffer), also inside overlong lines.
pub const GIVE_UP_BYTES: u64 = 256 << 20;

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

/// State of one pfn while pairing frees with allocations (8 bytes).
#[derive(Clone, Copy, Debug, Default)]
enum Slot {
    /// Nothing known.
    #[default]
    Empty,
    /// The head of an allocation made during the capture and not freed yet.
    Live { id: u32, order: u8, flags: u8 },
    /// A page of allocation `id`, being freed in pieces (`split_page`: a higher-order
    /// allocation freed as order-0 pages).
    Tail { id: u32 },
    /// Freed by `mm_page_free`; an `mm_page_free_batched` may repeat it.
    FreedAwaitBatched,
    /// Freed by `mm_page_free_batched`; an `mm_page_free` may repeat it.
    FreedAwaitFree,
    /// Freed and its duplicate seen.
    Done,
}

/// An allocation being freed in pieces, kept by its id (its freed pages may be allocated
/// again, so its head pfn is no key).
#[derive(Clone, Copy, Debug)]
struct Split {
    head: u64,
    order: u8,
    flags: u8,
    /// Pages not freed yet.
    remaining: u64,
}

/// log2 of the pages in a region of [`Loader`]'s `multi_live` counts: the largest allocation
/// (order [`crate::parse::MAX_TRACE_ORDER`]), so any head covering a pfn is in its region.
const REGION_BITS: u32 = crate::parse::MAX_TRACE_ORDER as u32;

/// Address space reserved up front for each of the loader's growing vectors (the events and
/// the two CPU columns): 32 MiB, glibc's largest mmap threshold, so each is a mapping of its
/// own whose pages are faulted in only as they are written, and growing one past it is a
/// `mremap`, not a copy. On a heap that earlier loads (or anything else) have used, a vector
/// grown by doubling is copied at every step and faulted in again: in a process loading the
/// shared trace over and over, 1,200 of each load's 2,000 page faults, at 2-4 µs each in a
/// guest with shadow paging (see the README, Performance). A first load in a fresh process
/// grows in place either way.
const RESERVE_BYTES: usize = 32 << 20;

/// Incremental loader: feed lines, then [`Loader::finish`].
pub struct Loader {
    opts: LoadOptions,
    trace: Trace,
    slots: PfnTable<Slot>,
    splits: HashMap<u32, Split>,
    /// Live (whole) allocations per order: the covering-head probes stop at the highest.
    live_orders: [u32; 11],
    /// Live whole allocations of order 1 or more per 1,024-page region (`pfn >> 10`) of their
    /// head: a head covering a pfn lies in the pfn's region, so where this is 0 the
    /// covering-head probes are skipped.
    multi_live: PfnTable<u32>,
    /// CPU of the free event being accounted.
    free_cpu: u16,
    /// Page-allocator event lines accepted so far.
    page_events: u64,
    live_pages: u64,
    last_ts: Option<u64>,
    cpu_seen: Vec<bool>,
    cpus_overflow: std::collections::BTreeSet<u32>,
}

impl Loader {
    /// A fresh loader.
    pub fn new(opts: LoadOptions) -> Self {
        let mut trace = Trace {
            events: Events::with_capacity(RESERVE_BYTES / std::mem::size_of::<u64>()),
            cpus: Vec::with_capacity(RESERVE_BYTES / std::mem::size_of::<u16>()),
            free_cpus: Vec::with_capacity(RESERVE_BYTES / std::mem::size_of::<u16>()),
            ..Trace::default()
        };
        trace.stats.min_pfn = u64::MAX;
        Loader {
            opts,
            trace,
            slots: PfnTable::default(),
            splits: HashMap::new(),
            live_orders: [0; 11],
            multi_live: PfnTable::default(),
            free_cpu: 0,
            page_events: 0,
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
        self.event(ev.kind, ev.cpu, ev.pfn, ev.order, ev.migratetype, |t| {
            t.intern(ev.gfp)
        })
    }

    /// Account a page-allocator event (after its timestamp): `gfp` interns its flag string,
    /// called only for an allocation that is kept.
    #[inline(always)]
    fn event(
        &mut self,
        kind: EventKind,
        cpu: u32,
        pfn: Option<u64>,
        order: Option<u8>,
        migratetype: u8,
        gfp: impl FnOnce(&mut GfpTable) -> u32,
    ) -> Result<(), TraceError> {
        self.page_events += 1;
        self.note_cpu(cpu);
        match kind {
            EventKind::Alloc => {
                self.trace.stats.alloc_events += 1;
                let Some(pfn) = pfn else {
                    self.trace.stats.failed_allocs_in_trace += 1;
                    return Ok(());
                };
                // The parser guarantees order and gfp for allocations.
                let order = order.unwrap_or(0);
                let gfp = gfp(&mut self.trace.gfp);
                self.alloc(pfn, order, migratetype, gfp, cpu)
            }
            EventKind::Free => {
                self.trace.stats.free_events += 1;
                self.free_cpu = u16::try_from(cpu).unwrap_or(u16::MAX);
                if let Some(pfn) = pfn {
                    self.free(pfn, order, false);
                } else {
                    self.trace.stats.unmatched_frees += 1;
                }
                Ok(())
            }
            EventKind::FreeBatched => {
                self.trace.stats.batched_events += 1;
                self.free_cpu = u16::try_from(cpu).unwrap_or(u16::MAX);
                if let Some(pfn) = pfn {
                    self.free(pfn, order, true);
                } else {
                    self.trace.stats.unmatched_frees += 1;
                }
                Ok(())
            }
        }
    }

    #[inline]
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
        self.trace.stats.max_cpu = self.trace.stats.max_cpu.max(cpu);
    }

    fn alloc(
        &mut self,
        pfn: u64,
        order: u8,
        migratetype: u8,
        gfp: u32,
        cpu: u32,
    ) -> Result<(), TraceError> {
        let id =
            u32::try_from(self.trace.stats.allocs).map_err(|_| TraceError::TooManyAllocations)?;
        if id == u32::MAX {
            return Err(TraceError::TooManyAllocations);
        }
        // After lost events a live allocation may overlap this one (at its head or not): the
        // kernel freed it unseen, so it is freed here first.
        self.free_overlapping(pfn, order);
        let s = &mut self.trace.stats;
        s.allocs += 1;
        s.alloc_pages += 1 << order;
        s.min_pfn = s.min_pfn.min(pfn);
        s.end_pfn = s.end_pfn.max(pfn.saturating_add(1 << order));
        self.live_pages += 1 << order;
        s.peak_live_pages = s.peak_live_pages.max(self.live_pages);
        self.slots.set(
            pfn,
            Slot::Live {
                id,
                order,
                flags: 0,
            },
        );
        self.live_orders[usize::from(order.min(10))] += 1;
        if order > 0 {
            *self.multi_live.get_mut(pfn >> REGION_BITS) += 1;
        }
        self.trace.events.push(Event::Alloc {
            pfn,
            gfp,
            order,
            migratetype,
            flags: 0,
        });
        let cpu = u16::try_from(cpu).unwrap_or(u16::MAX);
        self.trace.cpus.push(cpu);
        self.trace.free_cpus.push(cpu);
        Ok(())
    }

    /// The live allocation whose head lies below `pfn` and covers it (heads are aligned to
    /// their order, as the buddy allocator places them): (head, id, order, flags).
    fn covering_live(&self, pfn: u64) -> Option<(u64, u32, u8, u8)> {
        if self.multi_live.get(pfn >> REGION_BITS) == 0 {
            return None;
        }
        let top = self.live_orders.iter().rposition(|&n| n > 0)? as u8;
        let mut prev = pfn;
        for o in 1..=top {
            let head = pfn & !((1u64 << o) - 1);
            if head == prev {
                continue;
            }
            prev = head;
            if let Slot::Live { id, order, flags } = self.slots.get(head) {
                if head.saturating_add(1 << order) > pfn && head & ((1u64 << order) - 1) == 0 {
                    return Some((head, id, order, flags));
                }
            }
        }
        None
    }

    /// Implicit frees: every live allocation (whole or being freed in pieces) that overlaps
    /// `[pfn, pfn + 2^order)`.
    fn free_overlapping(&mut self, pfn: u64, order: u8) {
        if let Some((head, id, o, flags)) = self.covering_live(pfn) {
            self.unlive(head, o);
            self.implicit_free(id, o, flags);
            self.slots.set(head, Slot::Done);
        }
        for p in pfn..pfn.saturating_add(1 << order) {
            match self.slots.get(p) {
                Slot::Live { id, order, flags } => {
                    self.unlive(p, order);
                    self.implicit_free(id, order, flags);
                    self.slots.set(p, Slot::Done);
                }
                Slot::Tail { id } => {
                    if let Some(sp) = self.splits.remove(&id) {
                        self.implicit_free(id, sp.order, sp.flags);
                    }
                    self.slots.set(p, Slot::Done);
                }
                _ => {}
            }
        }
    }

    /// The whole live allocation of `order` at `head` is no more (freed, or split into tails).
    fn unlive(&mut self, head: u64, order: u8) {
        let n = &mut self.live_orders[usize::from(order.min(10))];
        *n = n.saturating_sub(1);
        if order > 0 {
            let r = self.multi_live.get_mut(head >> REGION_BITS);
            *r = r.saturating_sub(1);
        }
    }

    fn implicit_free(&mut self, id: u32, order: u8, flags: u8) {
        self.trace.stats.implicit_frees += 1;
        self.live_pages -= 1 << order;
        self.trace.events.push(Event::Free {
            alloc: id,
            order,
            flags,
        });
    }

    fn freed_state(batched: bool) -> Slot {
        if batched {
            Slot::FreedAwaitFree
        } else {
            Slot::FreedAwaitBatched
        }
    }

    fn count_matched(&mut self, batched: bool) {
        if batched {
            self.trace.stats.batched_matched += 1;
        } else {
            self.trace.stats.frees_matched += 1;
        }
    }

    /// Start freeing the allocation at `head` in pieces: every page of it becomes a tail.
    fn split(&mut self, head: u64, id: u32, order: u8, flags: u8) {
        self.trace.stats.split_allocations += 1;
        self.unlive(head, order);
        self.splits.insert(
            id,
            Split {
                head,
                order,
                flags,
                remaining: head.saturating_add(1 << order) - head,
            },
        );
        for p in head..head.saturating_add(1 << order) {
            self.slots.set(p, Slot::Tail { id });
        }
    }

    /// A free of `2^k` pages at `pfn`, a page of allocation `id` being freed in pieces. The
    /// allocation is freed when its last page is.
    fn free_piece(&mut self, pfn: u64, k: u8, id: u32, batched: bool) {
        let end = self.splits.get(&id).map_or(pfn, |sp| {
            sp.head
                .saturating_add(1 << sp.order)
                .min(pfn.saturating_add(1 << k))
        });
        let mut pages = 0;
        for p in pfn..end {
            if matches!(self.slots.get(p), Slot::Tail { id: t } if t == id) {
                pages += 1;
                self.slots.set(p, Slot::Done);
            }
        }
        self.slots.set(pfn, Self::freed_state(batched));
        let Some(sp) = self.splits.get_mut(&id) else {
            // Its allocation was freed implicitly: nothing live here any more.
            self.trace.stats.unmatched_frees += 1;
            return;
        };
        sp.remaining = sp.remaining.saturating_sub(pages);
        if sp.remaining > 0 {
            self.trace.stats.split_piece_frees += 1;
            return;
        }
        let sp = *sp;
        self.splits.remove(&id);
        self.trace.free_cpus[id as usize] = self.free_cpu;
        self.count_matched(batched);
        self.live_pages -= 1 << sp.order;
        self.trace.events.push(Event::Free {
            alloc: id,
            order: sp.order,
            flags: sp.flags,
        });
    }

    fn free(&mut self, pfn: u64, order: Option<u8>, batched: bool) {
        match (self.slots.get(pfn), batched) {
            (
                Slot::Live {
                    id,
                    order: o,
                    flags,
                },
                _,
            ) => match order {
                // `split_page`: a smaller free at the head frees one piece of the allocation
                // (the kernel's allocations are aligned to their order; others are freed whole).
                Some(k) if k < o && pfn & ((1u64 << o) - 1) == 0 => {
                    self.split(pfn, id, o, flags);
                    self.free_piece(pfn, k, id, batched);
                }
                _ => {
                    if order.is_some_and(|x| x != o) {
                        self.trace.stats.order_mismatches += 1;
                    }
                    self.count_matched(batched);
                    self.trace.free_cpus[id as usize] = self.free_cpu;
                    self.unlive(pfn, o);
                    self.live_pages -= 1 << o;
                    self.trace.events.push(Event::Free {
                        alloc: id,
                        order: o,
                        flags,
                    });
                    self.slots.set(pfn, Self::freed_state(batched));
                }
            },
            (Slot::Tail { id }, _) => self.free_piece(pfn, order.unwrap_or(0), id, batched),
            (Slot::FreedAwaitBatched, true) => {
                self.trace.stats.batched_duplicates += 1;
                self.slots.set(pfn, Slot::Done);
            }
            (Slot::FreedAwaitFree, false) => {
                self.trace.stats.free_duplicates += 1;
                self.slots.set(pfn, Slot::Done);
            }
            _ => {
                // A piece of a live allocation freed before its head (`split_page`, tail first)?
                if let Some((head, id, o, flags)) = self.covering_live(pfn) {
                    self.split(head, id, o, flags);
                    self.free_piece(pfn, order.unwrap_or(0), id, batched);
                    return;
                }
                self.trace.stats.unmatched_frees += 1;
                self.slots.set(pfn, Self::freed_state(batched));
            }
        }
    }

    /// The error for a run of `lines` lines or `bytes` bytes without an event, ending at line
    /// `line`.
    fn give_up(&self, line: u64, lines: u64, bytes: u64) -> TraceError {
        let s = &self.trace.stats;
        TraceError::NotATrace {
            line,
            run_lines: lines,
            run_mib: bytes >> 20,
            malformed: s.malformed_lines,
            first: s.malformed_examples.first().cloned(),
        }
    }

    /// Finish: final counters.
    pub fn finish(mut self) -> Trace {
        let s = &mut self.trace.stats;
        s.live_at_end =
            self.slots.count(|v| matches!(v, Slot::Live { .. })) as u64 + self.splits.len() as u64;
        s.live_pages_at_end = self.live_pages;
        if s.min_pfn == u64::MAX {
            s.min_pfn = 0;
        }
        self.trace.events.shrink_to_fit();
        self.trace.cpus.shrink_to_fit();
        self.trace.free_cpus.shrink_to_fit();
        self.trace
    }
}

/// Load a whole trace from a buffered reader (see [`crate::reader::open_input`]), on the calling
/// thread: the sequential reference that [`load_parallel`] (what `veil replay` uses) equals.
pub fn load<R: BufRead>(r: R, opts: LoadOptions) -> Result<Trace, TraceError> {
    load_with_progress(r, opts, &mut |_| {})
}

/// Lines between calls of the progress callback of [`load_with_progress`] (it is also called
/// inside an overlong line, once per buffer skipped).
pub const PROGRESS_LINES: u64 = 1 << 16;

/// The loader's progress line: lines read, their rate, events and malformed lines so far.
pub fn progress_line(s: &TraceStats, elapsed: std::time::Duration) -> String {
    format!(
        "read {} lines ({:.0} lines/s), {} page-allocator events, {} malformed...",
        s.lines,
        s.lines as f64 / elapsed.as_secs_f64().max(1e-9),
        s.alloc_events + s.free_events + s.batched_events,
        s.malformed_lines
    )
}

/// [`load`], calling `progress(counters so far)` every [`PROGRESS_LINES`] lines; gives up with
/// [`TraceError::NotATrace`] after [`GIVE_UP_LINES`] lines or [`GIVE_UP_BYTES`] bytes in a row
/// without a page-allocator event.
pub fn load_with_progress<R: BufRead>(
    r: R,
    opts: LoadOptions,
    progress: &mut dyn FnMut(&TraceStats),
) -> Result<Trace, TraceError> {
    let mut lr = LineReader::new(r);
    let mut loader = Loader::new(opts);
    let mut lineno = 0u64;
    // The current run without an event: the events before it, its first line and byte.
    let (mut events, mut run_line, mut run_byte) = (0u64, 0u64, 0u64);
    loop {
        if lineno > 0 && lineno.is_multiple_of(PROGRESS_LINES) {
            progress(&loader.trace.stats);
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
            NextLine::Skipping => {
                // Inside line `lineno` still (input without newlines): count no line yet, but
                // watch the bytes.
                if lr.consumed() - run_byte >= GIVE_UP_BYTES {
                    let run = lineno - 1 - run_line;
                    return Err(loader.give_up(lineno, run, lr.consumed() - run_byte));
                }
                lineno -= 1;
                progress(&loader.trace.stats);
                continue;
            }
        }
        if loader.page_events != events {
            (events, run_line, run_byte) = (loader.page_events, lineno, lr.consumed());
        } else if lineno - run_line >= GIVE_UP_LINES || lr.consumed() - run_byte >= GIVE_UP_BYTES {
            return Err(loader.give_up(lineno, lineno - run_line, lr.consumed() - run_byte));
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
        // A kernel's events all pack into one word each; a pfn of 2^40 or more does not.
        let s = "a-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x3fffffffff order=10 migratetype=5 gfp_flags=GFP_KERNEL\n\
                 a-1 [000] ..... 1.1: mm_page_free: page=x pfn=0x3fffffffff order=10\n\
                 a-1 [000] ..... 1.2: mm_page_alloc: page=x pfn=0x10000000000 order=0 migratetype=0 gfp_flags=GFP_KERNEL\n";
        let t = load(s.as_bytes(), LoadOptions::default()).unwrap();
        assert_eq!((t.events.len(), t.events.unpacked()), (3, 1));
        assert_eq!(
            t.events.get(0),
            Some(Event::Alloc {
                pfn: 0x3f_ffff_ffff,
                gfp: 0,
                order: 10,
                migratetype: 5,
                flags: 0
            })
        );
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
