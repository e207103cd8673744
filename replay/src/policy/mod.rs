//! The direct-map policies and the loop that replays a trace through one of them.
//!
//! Every policy replays the same events, drives stage 2 only through [`allocator::Stage2`]
//! (wrapped in a [`Tracker`]) and is generic over the backend, so the same code runs on the pure
//! model and, from the `vmm` crate, on a real VM's memslots.
//!
//! | policy | allocator | unmapped allocation | free of an unmapped allocation |
//! |---|---|---|---|
//! | `freetype` | Veil's buddy allocator with `Gfp::UNMAPPED` | from unmapped pageblocks; flips a whole free pageblock when none is left (one call) | zeroed (init_on_free), stays unmapped |
//! | `per-page` | the same allocator, mapped freetypes only | allocated normally, its range unmapped (one call per allocation) | zero + map back (memfd_secret style) |
//! | `per-page-batched` | as `per-page` | as `per-page`, but removals share one shootdown per `--flush-batch` pages (lazy flush); a page whose removal still waits is flushed before it is reused | as `per-page` |
//! | `unmapped-cache` | the same allocator plus a cache | from a buddy cache of unmapped pages, refilled by unmapping an order-9 (2 MiB) block taken from the allocator (one call) | zeroed, back to the cache; the cache never returns chunks |
//! | `linux-placement` | none: the trace's own PFNs | the kernel's real pages, unmapped (one call per allocation) | zero + map back |

mod cache;
pub mod compaction;
mod freetype;
pub mod latency;
mod linux;
mod pcp;
mod per_page;
pub mod placement;

use std::time::Instant;

use allocator::{AllocError, Snapshot, Stage2, Stage2Error, PAGEBLOCK_PAGES};
use serde::Serialize;

use crate::flush::{Arch, FlushStats};
use crate::trace::{Event, Trace, FLAG_ATOMIC, FLAG_UNMAPPED};
use crate::tracker::{Stage2Stats, Stage2Timing, Tracker, TrackerConfig};

pub use cache::UnmappedCache;
use compaction::{CompactionReport, CompactionStats};
use placement::{Placement, StrandedReport};

/// Default `--flush-batch`: pages whose removals share one shootdown in `per-page-batched`.
pub const DEFAULT_FLUSH_BATCH: u64 = 32;

/// Pages below the managed range: the reserved, always-mapped low memory of a Veil VM (2 MiB).
pub const RESERVED_PAGES: u64 = PAGEBLOCK_PAGES;

/// Most managed pages a policy may model (64 GiB, the VMM's RAM limit): bounds memory use on
/// traces with outlying PFNs.
pub const MAX_MANAGED_PAGES: u64 = (64 << 30) / 4096;

/// Default headroom over the trace's peak live pages, in percent.
pub const DEFAULT_HEADROOM_PCT: u32 = 25;

/// Which policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Veil's freetype allocator: pageblock flips, free never remaps.
    Freetype,
    /// Normal allocation, each unmapped allocation removed on its own, restored on free.
    PerPage,
    /// As per-page, with removals batched into one shootdown (lazy flush).
    PerPageBatched,
    /// A separate cache of unmapped pages refilled in 2 MiB chunks (2023 proposal).
    UnmappedCache,
    /// The kernel's real placement (trace PFNs), per-allocation removal.
    LinuxPlacement,
    /// Freetype on the allocator for several CPUs: per-CPU caches by the trace's CPU (`--pcp`).
    FreetypePcp,
}

impl PolicyKind {
    /// All policies in report order.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Freetype,
        PolicyKind::PerPage,
        PolicyKind::PerPageBatched,
        PolicyKind::UnmappedCache,
        PolicyKind::LinuxPlacement,
    ];

    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Freetype => "freetype",
            PolicyKind::PerPage => "per-page",
            PolicyKind::PerPageBatched => "per-page-batched",
            PolicyKind::UnmappedCache => "unmapped-cache",
            PolicyKind::LinuxPlacement => "linux-placement",
            PolicyKind::FreetypePcp => "freetype-pcp",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a policy's managed memory lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// First managed pfn ([`RESERVED_PAGES`]: the reserved low 2 MiB sits below).
    pub base_pfn: u64,
    /// Managed pages.
    pub nr_pages: u64,
    /// `linux-placement` only: the trace pfn that lands on `base_pfn`.
    pub trace_base_pfn: u64,
}

impl Layout {
    /// Guest RAM a VM needs for this layout, in bytes (reserved + managed).
    pub fn ram_bytes(&self) -> u64 {
        (self.base_pfn + self.nr_pages) * 4096
    }
}

/// Round `n` up to a whole number of 2 MiB blocks (saturating at `u64::MAX` for pfns near the
/// top of the range, which a trace may carry: callers compare the result against
/// [`MAX_MANAGED_PAGES`]).
pub fn round_up_blocks(n: u64) -> u64 {
    n.div_ceil(PAGEBLOCK_PAGES).saturating_mul(PAGEBLOCK_PAGES)
}

/// The memory a policy replays on: `mem_pages` if given, else the trace's peak live pages plus
/// `headroom_pct`, rounded up to 2 MiB (at least two blocks). `linux-placement` always covers
/// the trace's own PFN span, rounded out to 2 MiB blocks (at least two).
pub fn layout_for(
    kind: PolicyKind,
    trace: &Trace,
    mem_pages: Option<u64>,
    headroom_pct: u32,
) -> Layout {
    let s = &trace.stats;
    if kind == PolicyKind::LinuxPlacement {
        let start = s.min_pfn / PAGEBLOCK_PAGES * PAGEBLOCK_PAGES;
        let end = round_up_blocks(s.end_pfn.max(start + 1));
        return Layout {
            base_pfn: RESERVED_PAGES,
            nr_pages: (end - start).max(2 * PAGEBLOCK_PAGES),
            trace_base_pfn: start,
        };
    }
    let nr = mem_pages.unwrap_or_else(|| {
        let want = s
            .peak_live_pages
            .saturating_mul(100 + u64::from(headroom_pct))
            / 100;
        round_up_blocks(want).max(2 * PAGEBLOCK_PAGES)
    });
    Layout {
        base_pfn: RESERVED_PAGES,
        nr_pages: nr,
        trace_base_pfn: 0,
    }
}

/// How to run a policy.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Memslot limit the layout is compared against.
    pub max_slots: u64,
    /// Points of the intact-blocks curve to keep (for the plot).
    pub samples: usize,
    /// Measure the time of every stage-2 call.
    pub timed: bool,
    /// `freetype`: allocations that cannot sleep (no `__GFP_DIRECT_RECLAIM`) pass
    /// `Gfp::ATOMIC` and so may not flip.
    pub honour_atomic: bool,
    /// Whose flush rules count shootdowns.
    pub arch: Arch,
    /// `per-page-batched`: pages whose removals share one shootdown.
    pub flush_batch: u64,
    /// CPUs a shootdown reaches (each costs `cpus - 1` IPIs).
    pub cpus: u32,
    /// `freetype`: compact (migrate movable allocations out of a block) when no whole free
    /// pageblock can be flipped.
    pub compaction: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_slots: crate::tracker::DEFAULT_MAX_MEMSLOTS,
            samples: 1000,
            timed: false,
            honour_atomic: false,
            arch: Arch::X86,
            flush_batch: DEFAULT_FLUSH_BATCH,
            cpus: 1,
            compaction: false,
        }
    }
}

/// Allocation failures by cause.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Failures {
    /// No memory at all.
    pub out_of_memory: u64,
    /// A flip was needed but no whole free pageblock existed.
    pub no_free_pageblock: u64,
    /// A flip was needed in a context that cannot sleep.
    pub would_block: u64,
    /// Stage 2 refused (e.g. out of memslots).
    pub stage2: u64,
    /// Anything else (invalid flags or order).
    pub other: u64,
}

impl Failures {
    /// All failures.
    pub fn total(&self) -> u64 {
        self.out_of_memory + self.no_free_pageblock + self.would_block + self.stage2 + self.other
    }

    pub(crate) fn count(&mut self, e: Failure) {
        match e {
            Failure::OutOfMemory => self.out_of_memory += 1,
            Failure::NoFreePageblock => self.no_free_pageblock += 1,
            Failure::WouldBlock => self.would_block += 1,
            Failure::Stage2 => self.stage2 += 1,
            Failure::Other => self.other += 1,
        }
    }
}

/// Failures split by the request's kind and order (index = order, 0..=10).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct FailuresByKind {
    /// Mapped requests, by order.
    pub mapped: [u64; 11],
    /// Unmapped requests, by order.
    pub unmapped: [u64; 11],
    /// Mapped requests by cause.
    pub mapped_causes: Failures,
    /// Unmapped requests by cause.
    pub unmapped_causes: Failures,
}

impl FailuresByKind {
    fn count(&mut self, unmapped: bool, order: u8, f: Failure) {
        let o = usize::from(order.min(10));
        if unmapped {
            self.unmapped[o] += 1;
            self.unmapped_causes.count(f);
        } else {
            self.mapped[o] += 1;
            self.mapped_causes.count(f);
        }
    }

    /// Failed mapped requests.
    pub fn mapped_total(&self) -> u64 {
        self.mapped.iter().sum()
    }

    /// Failed unmapped requests.
    pub fn unmapped_total(&self) -> u64 {
        self.unmapped.iter().sum()
    }

    /// `order:count` for every order with failures, e.g. `0:118 3:3`, or `-`.
    pub fn orders(v: &[u64; 11]) -> String {
        let parts: Vec<String> = v
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(o, n)| format!("{o}:{n}"))
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(" ")
        }
    }
}

/// Why one allocation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    OutOfMemory,
    NoFreePageblock,
    WouldBlock,
    Stage2,
    Other,
}

impl From<AllocError> for Failure {
    fn from(e: AllocError) -> Self {
        match e {
            AllocError::OutOfMemory { .. } => Failure::OutOfMemory,
            AllocError::NoFreePageblock { .. } => Failure::NoFreePageblock,
            AllocError::WouldBlock { .. } => Failure::WouldBlock,
            AllocError::Stage2(_) => Failure::Stage2,
            _ => Failure::Other,
        }
    }
}

impl From<Stage2Error> for Failure {
    fn from(_: Stage2Error) -> Self {
        Failure::Stage2
    }
}

/// Median, least and largest of repeated measurements.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct MedMinMax {
    /// Median.
    pub median: u64,
    /// Least.
    pub min: u64,
    /// Largest.
    pub max: u64,
}

impl MedMinMax {
    /// Of `v` (sorted here; all zero if empty).
    pub fn of(v: &mut [u64]) -> MedMinMax {
        v.sort_unstable();
        match (v.first(), v.last()) {
            (Some(&min), Some(&max)) => MedMinMax {
                median: v[v.len() / 2],
                min,
                max,
            },
            _ => MedMinMax::default(),
        }
    }
}

/// `veil replay --kvm --repeat N`: the measured part (the policy's replay on a fresh VM) run
/// N times.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KvmRepeat {
    /// Runs (samples behind each figure).
    pub runs: u32,
    /// Stage-2 time of the whole replay (updates + zeroing), ns.
    pub s2_total_ns: MedMinMax,
    /// Median time of one update, ns.
    pub median_update_ns: MedMinMax,
    /// Median time of one memslot ioctl, ns (`slots`).
    pub median_ioctl_ns: MedMinMax,
    /// Slowest single call, ns.
    pub max_call_ns: MedMinMax,
}

/// Measured cost of the stage-2 work on a real VM (filled by `veil replay --kvm`).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct KvmCost {
    /// The stage-2 backend the updates went through ("slots" or "mprotect").
    pub backend: &'static str,
    /// `mprotect` calls made (the `mprotect` backend).
    pub mprotect_calls: u64,
    /// Most protection ranges (VMAs) of the guest view at once (the `mprotect` backend).
    pub peak_vmas: u64,
    /// KVM's memslot limit on this host.
    pub max_memslots: u64,
    /// `KVM_SET_USER_MEMORY_REGION` calls made.
    pub memslot_updates: u64,
    /// Most memslots in use at once (engine's count).
    pub peak_memslots: u64,
    /// Nanoseconds spent in map/unmap calls.
    pub update_ns: u64,
    /// Nanoseconds spent zeroing.
    pub zero_ns: u64,
    /// Mean nanoseconds per map/unmap call.
    pub ns_per_update: f64,
    /// Median nanoseconds per map/unmap call.
    pub median_update_ns: u64,
    /// Mean nanoseconds per memslot ioctl.
    pub ns_per_memslot_ioctl: f64,
    /// Median nanoseconds per memslot ioctl.
    pub median_memslot_ioctl_ns: u64,
    /// Slowest single stage-2 call.
    pub max_call_ns: u64,
    /// Wall time of the whole replay on KVM.
    pub replay_ns: u64,
    /// The figures over `--repeat` runs (the other fields are the median run's, by stage-2
    /// time).
    pub repeat: KvmRepeat,
}

/// A policy's results.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyResult {
    /// Policy.
    pub policy: PolicyKind,
    /// Memory it replayed on.
    pub layout: Layout,
    /// Events replayed.
    pub events: u64,
    /// Allocations attempted.
    pub allocs: u64,
    /// Unmapped allocations attempted.
    pub unmapped_allocs: u64,
    /// Frees replayed (frees of failed allocations are skipped).
    pub frees: u64,
    /// Stage-2 calls and pages.
    pub stage2: Stage2Stats,
    /// Stage-2 mapping updates (unmap + map calls) per 1,000 allocations.
    pub updates_per_1k_allocs: f64,
    /// Pages unmapped + mapped per 1,000 allocations.
    pub pages_per_1k_allocs: f64,
    /// Pageblocks (or cache chunks) turned unmapped.
    pub flips_to_unmapped: u64,
    /// Pageblocks turned back to mapped.
    pub flips_to_mapped: u64,
    /// 2 MiB blocks in the layout.
    pub blocks: u64,
    /// Blocks fully mapped or fully unmapped at the end.
    pub intact_blocks_end: u64,
    /// Blocks ever split, re-merged since or not (Linux's change-page-attribute code never
    /// re-merges a split direct-map block: this is the honest figure next to "intact now").
    pub ever_split_blocks: u64,
    /// `1 - ever_split_blocks / blocks`.
    pub never_split_share: f64,
    /// 1 GiB regions of the direct map over the layout (reserved memory included).
    pub gib_regions: u64,
    /// 1 GiB regions fully mapped or fully unmapped at the end.
    pub gib_intact_end: u64,
    /// 1 GiB regions ever split.
    pub gib_ever_split: u64,
    /// Fewest intact blocks at any moment.
    pub intact_blocks_worst: u64,
    /// Number (1-based) of the replayed event at which the worst was first reached.
    pub worst_at_event: u64,
    /// `intact_blocks_end / blocks`.
    pub intact_share_end: f64,
    /// `intact_blocks_worst / blocks`.
    pub intact_share_worst: f64,
    /// Memslots the final layout needs.
    pub memslots_end: u64,
    /// Most memslots needed at any moment.
    pub peak_memslots: u64,
    /// Limit compared against.
    pub max_memslots: u64,
    /// `peak_memslots > max_memslots`, or (on KVM) a stage-2 update refused for lack of slots.
    pub exceeds_memslot_limit: bool,
    /// Pages unmapped at the end.
    pub unmapped_pages_end: u64,
    /// Allocation failures by cause.
    pub failures: Failures,
    /// Allocation failures by mapped/unmapped request and order.
    pub failures_by_kind: FailuresByKind,
    /// TLB shootdowns (`--arch`'s rules) and IPIs (`--cpus`).
    pub flush: FlushStats,
    /// Free memory stranded in partly used blocks of the other kind (pageblock policies:
    /// `freetype`, `unmapped-cache`).
    pub stranded: Option<StrandedReport>,
    /// `--compaction` (`freetype`): what it did and the failures without it.
    pub compaction: Option<CompactionReport>,
    /// Allocation latency per path (pageblock policies): model cost units, and measured
    /// nanoseconds with `--kvm`.
    pub latency: Option<latency::LatencyReport>,
    /// Frees the policy rejected (would indicate a replay bug).
    pub free_errors: u64,
    /// Replay wall time (excluding parsing).
    pub replay_ns: u64,
    /// Events per second.
    pub events_per_sec: f64,
    /// Allocator counters at the end (policies built on the allocator).
    pub allocator: Option<Snapshot>,
    /// The intact share over time: (event index, share).
    pub intact_over_time: Vec<(u64, f64)>,
    /// The share of blocks never split over time: (event index, share).
    pub never_split_over_time: Vec<(u64, f64)>,
    /// Stage-2 time (only with timing).
    pub timing: Option<Stage2Timing>,
    /// Real-KVM cost (only with `--kvm`).
    pub kvm: Option<KvmCost>,
}

/// What every policy implements.
pub(crate) trait Engine<S: Stage2> {
    /// Serve an allocation; returns the pfn it got.
    fn alloc(
        &mut self,
        order: u8,
        migratetype: u8,
        flags: u8,
        trace_pfn: u64,
    ) -> Result<u64, Failure>;
    /// Free an allocation this engine served.
    fn free(&mut self, pfn: u64, order: u8, flags: u8) -> bool;
    /// The stage-2 tracker, mutably.
    fn tracker_mut(&mut self) -> &mut Tracker<S>;
    /// (flips to unmapped, flips to mapped).
    fn flips(&self) -> (u64, u64);
    /// Allocator counters, if any.
    fn snapshot(&self) -> Option<Snapshot>;
    /// Give the tracker back.
    fn into_tracker(self) -> Tracker<S>;
    /// Whether blocks have a kind (mapped or unmapped pageblocks): stranded memory applies.
    fn has_kinds(&self) -> bool {
        false
    }
    /// Whether `--compaction` applies.
    fn compactable(&self) -> bool {
        false
    }
    /// Return cached free blocks to the buddy lists.
    fn drain(&mut self) {}
    /// The trace CPU of the next allocation or free (`freetype-pcp`).
    fn set_cpu(&mut self, _cpu: u16) {}
}

/// A live allocation of the replay, by allocation id.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Live {
    /// Where the policy put it ([`NO_PFN`]: failed or freed).
    pub(crate) pfn: u64,
    pub(crate) order: u8,
    pub(crate) migratetype: u8,
    pub(crate) flags: u8,
}

/// Whether the trace says an allocation may move (movable migratetype, within one block).
pub(crate) fn movable(migratetype: u8, order: u8) -> bool {
    migratetype == 1 && order <= allocator::PAGEBLOCK_ORDER
}

/// The allocator's gfp for a trace migratetype (mapped allocations).
pub(crate) fn mapped_gfp(migratetype: u8) -> allocator::Gfp {
    match migratetype {
        1 => allocator::Gfp::MOVABLE,
        2 => allocator::Gfp::RECLAIMABLE,
        _ => allocator::Gfp::empty(),
    }
}

/// Whether an event's flags say unmapped.
pub(crate) fn is_unmapped(flags: u8) -> bool {
    flags & FLAG_UNMAPPED != 0
}

/// Whether an event's flags say the context cannot sleep.
pub(crate) fn is_atomic(flags: u8) -> bool {
    flags & FLAG_ATOMIC != 0
}

/// Replay `trace` through `kind` on `layout`, with `s2` as the stage-2 backend.
///
/// Returns the results and the backend (so a VM's engine can be inspected afterwards).
pub fn run<S: Stage2>(
    kind: PolicyKind,
    trace: &Trace,
    layout: Layout,
    s2: S,
    opts: &RunOptions,
) -> (PolicyResult, S) {
    let tracker = Tracker::new(
        s2,
        TrackerConfig {
            base_pfn: layout.base_pfn,
            nr_pages: layout.nr_pages,
            reserved_below: layout.base_pfn > 0,
            max_slots: opts.max_slots,
            timed: opts.timed,
            arch: opts.arch,
            flush_batch: if kind == PolicyKind::PerPageBatched {
                opts.flush_batch
            } else {
                0
            },
        },
    );
    match kind {
        PolicyKind::Freetype => drive(
            kind,
            trace,
            layout,
            opts,
            freetype::Freetype::new(layout, tracker, opts.honour_atomic),
        ),
        PolicyKind::PerPage | PolicyKind::PerPageBatched => drive(
            kind,
            trace,
            layout,
            opts,
            per_page::PerPage::new(layout, tracker, kind == PolicyKind::PerPageBatched),
        ),
        PolicyKind::UnmappedCache => drive(
            kind,
            trace,
            layout,
            opts,
            cache::CachePolicy::new(layout, tracker),
        ),
        PolicyKind::LinuxPlacement => drive(
            kind,
            trace,
            layout,
            opts,
            linux::LinuxPlacement::new(layout, tracker),
        ),
        PolicyKind::FreetypePcp => drive(
            kind,
            trace,
            layout,
            opts,
            pcp::FreetypePcp::new(
                layout,
                tracker,
                opts.honour_atomic,
                trace.stats.max_cpu as usize + 1,
            ),
        ),
    }
}

/// Marker for a failed allocation in the id → pfn table.
const NO_PFN: u64 = u64::MAX;

fn drive<S: Stage2, E: Engine<S>>(
    kind: PolicyKind,
    trace: &Trace,
    layout: Layout,
    opts: &RunOptions,
    mut eng: E,
) -> (PolicyResult, S) {
    let events = &trace.events;
    let n = events.len() as u64;
    let stride = (n / opts.samples.max(1) as u64).max(1);
    let blocks = eng.tracker_mut().blocks().max(1);
    let share = |x: u64| x as f64 / blocks as f64;
    let mut curve = Vec::with_capacity(opts.samples + 2);
    let mut never_split = Vec::with_capacity(opts.samples + 2);
    curve.push((0, share(eng.tracker_mut().intact_blocks())));
    never_split.push((0, 1.0));
    let kinds = eng.has_kinds();
    let compaction = opts.compaction && eng.compactable();
    let mut pl = Placement::new(layout.base_pfn, layout.nr_pages, compaction);
    let mut cst = CompactionStats::default();
    let mut lat = latency::Recorder::new(kinds, opts.timed);
    let mut live: Vec<Live> = Vec::with_capacity(trace.stats.allocs as usize);
    let mut failures = Failures::default();
    let mut by_kind = FailuresByKind::default();
    let (mut allocs, mut unmapped_allocs, mut frees, mut free_errors) = (0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut n_done = n;
    for (i, ev) in events.iter().enumerate() {
        if i % 4096 == 0 && i > 0 && crate::stop::requested().is_some() {
            n_done = i as u64;
            break;
        }
        // 1-based number of the event being replayed (where the worst moment is located).
        eng.tracker_mut().now = i as u64 + 1;
        match ev {
            Event::Alloc {
                pfn,
                order,
                migratetype,
                flags,
                ..
            } => {
                allocs += 1;
                let unmapped = is_unmapped(flags);
                unmapped_allocs += u64::from(unmapped);
                let id = live.len();
                eng.set_cpu(trace.cpus.get(id).copied().unwrap_or(0));
                let before = lat.start(eng.tracker_mut());
                let mut got = eng.alloc(order, migratetype, flags, pfn);
                if compaction && got == Err(Failure::NoFreePageblock) {
                    // No whole free pageblock of the other kind: empty one and retry.
                    if compaction::compact(&mut eng, &mut pl, &mut live, unmapped, &mut cst) {
                        got = eng.alloc(order, migratetype, flags, pfn);
                        cst.rescued += u64::from(got.is_ok());
                    }
                }
                lat.finish(eng.tracker_mut(), before, got.is_ok());
                let id = id as u32;
                match got {
                    Ok(p) => {
                        if kinds || compaction {
                            pl.note(
                                eng.tracker_mut(),
                                id,
                                p,
                                order,
                                movable(migratetype, order),
                                true,
                            );
                        }
                        live.push(Live {
                            pfn: p,
                            order,
                            migratetype,
                            flags,
                        });
                    }
                    Err(f) => {
                        failures.count(f);
                        by_kind.count(unmapped, order, f);
                        live.push(Live {
                            pfn: NO_PFN,
                            order,
                            migratetype,
                            flags,
                        });
                    }
                }
            }
            Event::Free {
                alloc,
                order,
                flags,
            } => {
                if let Some(a) = live.get_mut(alloc as usize) {
                    let p = a.pfn;
                    if p != NO_PFN {
                        a.pfn = NO_PFN;
                        let mt = a.migratetype;
                        frees += 1;
                        eng.set_cpu(trace.free_cpus.get(alloc as usize).copied().unwrap_or(0));
                        if !eng.free(p, order, flags) {
                            free_errors += 1;
                        }
                        if kinds || compaction {
                            pl.note(
                                eng.tracker_mut(),
                                alloc,
                                p,
                                order,
                                movable(mt, order),
                                false,
                            );
                        }
                    }
                }
            }
        }
        let i = i as u64 + 1;
        let sample = i.is_multiple_of(stride);
        if kinds {
            pl.observe(i, sample);
        }
        if sample {
            let t = eng.tracker_mut();
            curve.push((i, share(t.intact_blocks())));
            never_split.push((i, 1.0 - share(t.ever_split_blocks())));
        }
    }
    let n = n_done;
    eng.tracker_mut().flush_pending();
    let replay_ns = start.elapsed().as_nanos().max(1) as u64;
    if curve.last().map(|c| c.0) != Some(n) {
        let t = eng.tracker_mut();
        curve.push((n, share(t.intact_blocks())));
        never_split.push((n, 1.0 - share(t.ever_split_blocks())));
        if kinds {
            pl.observe(n, true);
        }
    }
    let (flips_u, flips_m) = eng.flips();
    let snapshot = eng.snapshot();
    let t = eng.tracker_mut();
    let st = t.stats();
    let per_1k = |x: u64| {
        if allocs == 0 {
            0.0
        } else {
            x as f64 * 1000.0 / allocs as f64
        }
    };
    let mut flush = t.flush_stats();
    flush.finish(allocs, opts.cpus);
    cst.pages_migrated_per_1k_allocs = per_1k(cst.pages_migrated);
    let stranded = kinds.then(|| {
        let mut r = std::mem::take(&mut pl.report);
        r.end = pl.stranded();
        r
    });
    let (worst, worst_at) = t.worst_intact_blocks();
    let result = PolicyResult {
        policy: kind,
        layout,
        events: n,
        allocs,
        unmapped_allocs,
        frees,
        stage2: st,
        updates_per_1k_allocs: per_1k(st.updates()),
        pages_per_1k_allocs: per_1k(st.pages_unmapped + st.pages_mapped),
        flips_to_unmapped: flips_u,
        flips_to_mapped: flips_m,
        blocks: t.blocks(),
        intact_blocks_end: t.intact_blocks(),
        ever_split_blocks: t.ever_split_blocks(),
        never_split_share: 1.0 - share(t.ever_split_blocks()),
        gib_regions: t.gib_regions(),
        gib_intact_end: t.gib_intact(),
        gib_ever_split: t.gib_ever_split(),
        intact_blocks_worst: worst,
        worst_at_event: worst_at,
        intact_share_end: share(t.intact_blocks()),
        intact_share_worst: share(worst),
        memslots_end: t.memslots(),
        peak_memslots: t.peak_memslots(),
        max_memslots: opts.max_slots,
        exceeds_memslot_limit: t.peak_memslots() > opts.max_slots || st.out_of_slots > 0,
        unmapped_pages_end: t.unmapped_pages(),
        failures,
        failures_by_kind: by_kind,
        flush,
        stranded,
        latency: lat.report(),
        compaction: compaction.then(|| CompactionReport {
            stats: cst,
            ..CompactionReport::default()
        }),
        free_errors,
        replay_ns,
        events_per_sec: n as f64 * 1e9 / replay_ns as f64,
        allocator: snapshot,
        intact_over_time: curve,
        never_split_over_time: never_split,
        timing: opts.timed.then(|| t.timing()),
        kvm: None,
    };
    (result, eng.into_tracker().into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_up_blocks_saturates_instead_of_wrapping() {
        assert_eq!(round_up_blocks(0), 0);
        assert_eq!(round_up_blocks(1), PAGEBLOCK_PAGES);
        assert_eq!(round_up_blocks(PAGEBLOCK_PAGES), PAGEBLOCK_PAGES);
        // Wrapped to 0 before (and then `end - start` gave a tiny layout in release builds).
        assert_eq!(round_up_blocks(u64::MAX), u64::MAX);
        assert_eq!(round_up_blocks(u64::MAX - 1), u64::MAX);
    }

    #[test]
    fn linux_layout_spanning_to_the_top_of_the_pfn_range_is_too_large_not_tiny() {
        let line = |pfn: &str| {
            format!("t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn={pfn} order=0 migratetype=0 gfp_flags=GFP_KERNEL\n")
        };
        // A low and a top-of-range pfn: the span is the whole u64 range. Before, the rounded
        // end wrapped to 0 in release builds and the layout came out as two blocks.
        let text = line("0x10") + &line("0xfffffffffffffffe");
        let t = crate::trace::load(text.as_bytes(), Default::default()).unwrap();
        let l = layout_for(PolicyKind::LinuxPlacement, &t, None, DEFAULT_HEADROOM_PCT);
        assert!(l.nr_pages > MAX_MANAGED_PAGES, "{l:?}");
        // A lone top-of-range page is one block of span, placed correctly.
        let t =
            crate::trace::load(line("0xfffffffffffffffe").as_bytes(), Default::default()).unwrap();
        let l = layout_for(PolicyKind::LinuxPlacement, &t, None, DEFAULT_HEADROOM_PCT);
        assert_eq!(l.trace_base_pfn, u64::MAX - (PAGEBLOCK_PAGES - 1));
        assert_eq!(l.nr_pages, 2 * PAGEBLOCK_PAGES);
    }
}
