//! The allocator for several CPUs: the buddy lists under one lock (the zone lock), per-CPU
//! caches of small blocks split by freetype, and flips whose stage-2 change runs outside the
//! zone lock.
//!
//! # Protocol
//!
//! - **Zone lock** ([`SpinLock`] around a cache-less [`BuddyAllocator`]): every change to
//!   the buddy lists, the pageblock types and the core's per-page records.
//! - **Per-CPU caches**: one [`SpinLock`] per CPU (so the lock is uncontended except when
//!   another CPU drains it) around LIFOs per (order `<= PCP_MAX_ORDER`, freetype). The caller
//!   passes the CPU id; a bad id is [`BadCpu`]. A miss refills up to `batch` blocks under one
//!   zone-lock acquisition, a full cache spills `batch` blocks under one (Linux's
//!   `rmqueue_bulk` / `free_pcppages_bulk`). Lock order: a CPU's lock, then the zone lock;
//!   the stage-2 lock is never held together with the zone lock.
//! - **Ownership word per page** (`heads`, one `AtomicU32`: the zone-level state and
//!   freetype of a block head, and for a live allocation its *guard*, the CPU it was
//!   allocated on): every change of a live allocation's word happens under its guard's
//!   cache lock, so a free takes that lock, checks the word is unchanged and moves it out of
//!   "allocated" — straight to "cached" on the fast path (freed on its own CPU), to "being
//!   freed" on the slow one — and of two CPUs freeing the same block exactly one succeeds
//!   (the loser gets [`FreeError::NotAllocated`]). Words of blocks that are no allocation
//!   (cached, on the lists, being allocated) are written only by whoever holds the block.
//!   All accesses are `Relaxed`: the word carries only itself, and the locks order the
//!   rest. For the core, a block in a CPU cache is still allocated; only a drain gives it
//!   back to the buddy lists.
//! - **Flips**: caches are drained first (every CPU's: `drain_all`), then under the zone lock
//!   the block is chosen and taken off the lists (no CPU can see or take it); the lock is
//!   dropped around the stage-2 call (`unmap`, or `zero` then `map`), as the kernel series
//!   drops it around `set_direct_map_*`; then, under the lock again, the block is retyped and
//!   allocated from, or on failure merged back onto its old lists. A flip needs a wholly free
//!   block on the buddy lists, so no page of a flipped block is in any CPU's cache.
//! - **A page is zero before anyone else can be handed it**: with `init_on_free_unmapped`, a
//!   freed block of an unmapped freetype and order `<= PCP_MAX_ORDER` enters its CPU's
//!   cache *dirty* (not zeroed yet); the dirty blocks of a list are zeroed together, one
//!   [`Stage2::zero_batch`] call per up to 64 blocks, before any of them leaves the cache:
//!   before the first is allocated again (on that CPU: no other CPU takes from it), before a
//!   drain or spill returns them to the buddy lists (so before any flip, which drains
//!   first), and when the cache is full (with the block being freed). Larger blocks are
//!   zeroed on free. Until then the old contents stay in the unmapped page, which nobody can
//!   reach: the guest lost it at stage 2 and the allocator hands it to no one. A failed
//!   zeroing fails the allocation (or the free that found the cache full) with
//!   `Stage2`, and the blocks stay cached and dirty.

use crate::buddy::{check_free_range, is_unmapped_index, visibility_index, BuddyAllocator, Config};
use crate::error::{AllocError, BadCpu, FreeError, InitError, Stage2Error};
use crate::flip::flip_stage2;
use crate::freelist::NR_LISTS;
use crate::freetype::Freetype;
use crate::gfp::{AllocRequest, BuddyContext, Gfp};
use crate::lines::{Lines, PER_LINE};
use crate::lock::{SpinGuard, SpinLock};
use crate::meta::{ST_ALLOC, ST_CACHED, ST_NONE, ST_ORDER};
use crate::pcp::{Pcp, PCP_MAX_ORDER};
use crate::stage2::{NullStage2, Stage2};
use crate::stats::{unflatten, Snapshot};
use crate::{Allocation, Pfn, MAX_ORDER};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// One CPU's caches and counters.
struct CpuCache {
    pcp: Pcp,
    allocs: [u64; NR_LISTS],
    frees: [u64; NR_LISTS],
    drains: u64,
}

/// A CPU's lock on its own cache line(s), so CPUs do not share lines.
#[repr(align(128))]
struct CpuSlot(SpinLock<CpuCache>);

/// `T` on 128-byte line pairs of its own: the zone lock and the core it guards, written by
/// every CPU's refills and spills, do not share a line with the fields every fast path reads.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> core::ops::Deref for Padded<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The stage-2 backend and the counters of the zeroing the zone does itself.
struct Backend<S> {
    s2: S,
    zero_calls: u64,
    zeroed_on_alloc: u64,
    zeroed_on_free: u64,
    failures: u64,
}

/// A buddy allocator shared by several CPUs (see the module docs for the protocol).
pub struct Zone<S: Stage2> {
    core: Padded<SpinLock<BuddyAllocator<NullStage2>>>,
    cpus: Box<[CpuSlot]>,
    /// Per page offset: the ownership word `state | ft << 8 | guard << 16` of a block head
    /// as the zone sees it (`ST_ALLOC` for a live allocation, whose `guard` is the CPU it
    /// was allocated on; `ST_CACHED` for a block in a CPU cache; `ST_NONE` otherwise).
    ///
    /// The word of page offset `off` is `heads[skew + off]`, `skew = base_pfn % 32`, and
    /// `heads` starts on a 128-byte boundary ([`Lines`]): the words of 32 pages aligned in
    /// absolute pfns (a refill batch of order-0 blocks split from one free block, as the
    /// buddy lists hand them out) fill exactly one 128-byte line pair, so two CPUs' batches
    /// never share a line (false sharing on every hot alloc and free otherwise).
    heads: Lines<AtomicU32>,
    /// `base % 32`: see `heads`.
    skew: usize,
    s2: SpinLock<Backend<S>>,
    cfg: Config,
    batch: u32,
    base: u64,
    nr: u64,
    alloc_failures: AtomicU64,
    free_failures: AtomicU64,
}

/// What an allocation gives.
type AllocResult = Result<Allocation, AllocError>;

/// `f()`, counting an error in `failures`.
#[inline(always)]
fn counted<T, E>(failures: &AtomicU64, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let r = f();
    if r.is_err() {
        failures.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// The ownership word of a block that is not allocated (`state` is not `ST_ALLOC`).
const fn head(state: u8, ft: usize) -> u32 {
    state as u32 | (ft as u32) << 8
}

/// The ownership word of a live allocation of `order` and freetype `ft` allocated on CPU
/// `cpu`, whose lock guards every change of the word until the allocation is freed.
const fn allocated(order: u8, ft: usize, cpu: usize) -> u32 {
    head(ST_ALLOC | order, ft) | (cpu as u32) << 16
}

/// The freetype index in an ownership word.
const fn word_ft(w: u32) -> usize {
    (w >> 8) as u8 as usize
}

/// The guard CPU of a live allocation's ownership word.
const fn word_guard(w: u32) -> usize {
    (w >> 16) as usize
}

/// Most CPUs a zone can have (the guard field of an ownership word is 16 bits).
pub const MAX_CPUS: usize = 1 << 16;

impl<S: Stage2> Zone<S> {
    /// A zone over `[base_pfn, base_pfn + nr_pages)` with caches for CPUs `0..nr_cpus`
    /// (`cfg.pcp_capacity` blocks per CPU, order and freetype). All pages start free and
    /// mapped (or sensitive), as for [`BuddyAllocator::try_new`].
    pub fn new(
        base_pfn: Pfn,
        nr_pages: u64,
        s2: S,
        cfg: Config,
        nr_cpus: usize,
    ) -> Result<Self, InitError> {
        if nr_cpus == 0 {
            return Err(InitError::NoCpus);
        }
        if nr_cpus > MAX_CPUS {
            return Err(InitError::TooManyCpus(nr_cpus));
        }
        let core_cfg = Config {
            init_on_free_unmapped: false,
            pcp_capacity: 0,
            sensitive_by_default: cfg.sensitive_by_default,
        };
        // The core counts the initial make_sensitive call; the zone's backend makes it.
        let core = BuddyAllocator::try_new(base_pfn, nr_pages, NullStage2, core_cfg)?;
        let mut s2 = s2;
        if cfg.sensitive_by_default && nr_pages > 0 {
            s2.make_sensitive(base_pfn, nr_pages)
                .map_err(InitError::Stage2)?;
        }
        let skew = (base_pfn % PER_LINE as u64) as usize;
        let cpus = (0..nr_cpus)
            .map(|_| {
                CpuSlot(SpinLock::new(CpuCache {
                    pcp: Pcp::new(cfg.pcp_capacity),
                    allocs: [0; NR_LISTS],
                    frees: [0; NR_LISTS],
                    drains: 0,
                }))
            })
            .collect();
        Ok(Zone {
            core: Padded(SpinLock::new(core)),
            cpus,
            heads: Lines::new(skew + nr_pages as usize, || AtomicU32::new(0)),
            skew,
            s2: SpinLock::new(Backend {
                s2,
                zero_calls: 0,
                zeroed_on_alloc: 0,
                zeroed_on_free: 0,
                failures: 0,
            }),
            cfg,
            // Half a cache: 32 order-0 blocks, whose words are one aligned 128-byte line pair
            // of `heads` when they come from one split (always from a fresh or merged zone).
            batch: (cfg.pcp_capacity / 2).max(1),
            base: base_pfn,
            nr: nr_pages,
            alloc_failures: AtomicU64::new(0),
            free_failures: AtomicU64::new(0),
        })
    }

    /// The ownership word of page offset `off`.
    #[inline(always)]
    fn word(&self, off: usize) -> &AtomicU32 {
        &self.heads[self.skew + off]
    }

    /// Number of CPUs.
    pub fn nr_cpus(&self) -> usize {
        self.cpus.len()
    }

    fn slot(&self, cpu: usize) -> Result<&SpinLock<CpuCache>, BadCpu> {
        self.cpus.get(cpu).map(|s| &s.0).ok_or(BadCpu {
            cpu,
            nr_cpus: self.cpus.len(),
        })
    }

    /// Allocate `1 << order` pages on CPU `cpu` (same as
    /// `alloc_pages_special(cpu, BuddyContext::Default, gfp, order)`).
    #[inline(always)]
    pub fn alloc_pages(&self, cpu: usize, gfp: Gfp, order: u8) -> Result<Allocation, AllocError> {
        self.alloc_pages_special(cpu, BuddyContext::Default, gfp, order)
    }

    /// Allocate `1 << order` pages on CPU `cpu` for a context plus flags (the rules of
    /// [`BuddyAllocator::alloc_pages_special`]).
    ///
    /// The fast path (a valid CPU, no zeroing, a clean block in the CPU's cache) is inlined:
    /// one lock of the CPU's cache and one plain store of the ownership word; everything
    /// else goes to the out-of-line slow path, which starts over.
    #[inline(always)]
    pub fn alloc_pages_special(
        &self,
        cpu: usize,
        ctx: BuddyContext,
        gfp: Gfp,
        order: u8,
    ) -> Result<Allocation, AllocError> {
        if let (Some(slot), Ok(req)) = (self.cpus.get(cpu), AllocRequest::from_gfp(ctx, gfp)) {
            if !req.zero && order <= PCP_MAX_ORDER {
                let ft = req.freetype.index();
                let mut c = slot.0.lock();
                if let Some(off) = c.pcp.pop_clean(order, ft) {
                    // Relaxed: see `free_pages`.
                    self.word(off as usize)
                        .store(allocated(order, ft, cpu), Ordering::Relaxed);
                    c.allocs[order as usize * Freetype::COUNT + ft] += 1;
                    return Ok(Allocation {
                        pfn: self.base + off as u64,
                        order,
                        freetype: req.freetype,
                    });
                }
            }
        }
        self.alloc_slow(cpu, ctx, gfp, order)
    }

    /// Everything but the inlined fast path: errors, zeroing, dirty blocks, refills, the
    /// buddy lists, drains and flips.
    #[inline(never)]
    fn alloc_slow(&self, cpu: usize, ctx: BuddyContext, gfp: Gfp, order: u8) -> AllocResult {
        counted(&self.alloc_failures, || {
            self.alloc_inner(cpu, ctx, gfp, order)
        })
    }

    fn alloc_inner(&self, cpu: usize, ctx: BuddyContext, gfp: Gfp, order: u8) -> AllocResult {
        let slot = self.slot(cpu).map_err(AllocError::BadCpu)?;
        if order > MAX_ORDER {
            return Err(AllocError::InvalidOrder(order));
        }
        let req = AllocRequest::from_gfp(ctx, gfp)?;
        let ft = req.freetype.index();
        let count = order as usize * Freetype::COUNT + ft;
        let (off, cached) = match self.alloc_cached(slot, req, order, count)? {
            Some(off) => (off, true),
            None => {
                let off = self.alloc_uncached(req, order)?;
                slot.lock().allocs[count] += 1;
                (off, false)
            }
        };
        let pfn = self.base + off as u64;
        // The block is no allocation until it is zeroed: its ownership word still says
        // "cached" or "none", so a free of its pfn meanwhile (from any CPU) is NotAllocated.
        if req.zero {
            let n = 1u64 << order;
            let mut b = self.s2.lock();
            if let Err(e) = b.s2.zero(pfn, n) {
                b.failures += 1;
                drop(b);
                // Never handed out: back without zeroing, as it came.
                slot.lock().allocs[count] -= 1;
                self.give_back(slot, off, order, ft, cached);
                return Err(AllocError::Stage2(e));
            }
            b.zero_calls += 1;
            b.zeroed_on_alloc += n;
        }
        self.word(off as usize)
            .store(allocated(order, ft, cpu), Ordering::Relaxed);
        Ok(Allocation {
            pfn,
            order,
            freetype: req.freetype,
        })
    }

    /// A block from `slot`'s cache, refilled from the buddy lists under one zone-lock
    /// acquisition on a miss, counted (`count`: the flat counter index) under the CPU's
    /// lock, not yet marked allocated (the caller does that once it is ready to hand out); None if the order is not cached or the lists have
    /// nothing without a flip. Dirty blocks (freed unmapped, not zeroed yet) are zeroed,
    /// all of the list's in one batch, before the first of them is handed out.
    #[inline]
    fn alloc_cached(
        &self,
        slot: &SpinLock<CpuCache>,
        req: AllocRequest,
        order: u8,
        count: usize,
    ) -> Result<Option<u32>, AllocError> {
        if order > PCP_MAX_ORDER {
            return Ok(None);
        }
        let ft = req.freetype.index();
        let mut c = slot.lock();
        if !c.pcp.dirty(order, ft).is_empty() {
            self.zero_dirty(&mut c, order, ft)
                .map_err(AllocError::Stage2)?;
        }
        let off = match c.pcp.pop_tracked(order, ft) {
            Some(off) => off,
            None => match self.refill(&mut c, req, order) {
                Some(off) => off,
                None => return Ok(None),
            },
        };
        c.allocs[count] += 1;
        Ok(Some(off))
    }

    /// Zero every dirty block of (order, ft) in `c` with one [`Stage2::zero_batch`] call
    /// per up to 64 blocks ([`Pcp::zero_dirty`]), then mark them clean (under the CPU's lock, never
    /// the zone lock). `extra` is zeroed in the same call.
    #[cold]
    #[inline(never)]
    fn zero_dirty_with(
        &self,
        c: &mut CpuCache,
        order: u8,
        ft: usize,
        extra: Option<u32>,
    ) -> Result<(), Stage2Error> {
        let mut b = self.s2.lock();
        let z = c.pcp.zero_dirty(order, ft, extra, self.base, &mut b.s2);
        b.zero_calls += z.calls;
        b.zeroed_on_free += z.pages;
        if z.result.is_err() {
            b.failures += 1;
        }
        z.result
    }

    fn zero_dirty(&self, c: &mut CpuCache, order: u8, ft: usize) -> Result<(), Stage2Error> {
        self.zero_dirty_with(c, order, ft, None)
    }

    /// Take up to `batch` blocks of (order, freetype) from the buddy lists under one
    /// zone-lock acquisition: the first for the caller, the rest into `c`.
    #[inline(never)]
    fn refill(&self, c: &mut CpuCache, req: AllocRequest, order: u8) -> Option<u32> {
        let ft = req.freetype.index();
        let mut core = self.core.lock();
        let first = core.take_allocated(req.freetype, order)?;
        for _ in 1..self.batch {
            let Some(off) = core.take_allocated(req.freetype, order) else {
                break;
            };
            if !c.pcp.push_tracked(order, ft, off, false) {
                core.free_pages(self.base + off as u64, order)
                    .expect("a block the core just allocated");
                break;
            }
            self.word(off as usize)
                .store(head(ST_CACHED | order, ft), Ordering::Relaxed);
        }
        Some(first)
    }

    /// The slow path: the buddy lists (fallback included), then every cache drained and the
    /// lists again, then a flip with stage 2 changed outside the zone lock. The block is
    /// allocated in the core, not yet marked allocated in its ownership word.
    fn alloc_uncached(&self, req: AllocRequest, order: u8) -> Result<u32, AllocError> {
        if let Some(off) = self.core.lock().take_allocated(req.freetype, order) {
            return Ok(off);
        }
        self.drain_all();
        let ticket = {
            let mut core = self.core.lock();
            if let Some(off) = core.take_allocated(req.freetype, order) {
                return Ok(off);
            }
            core.flip_begin(req, order)?
        };
        let res = flip_stage2(&mut self.s2.lock().s2, &ticket);
        let mut core = self.core.lock();
        let off = core.flip_end(ticket, res, order)?;
        core.mark_allocated(off, order, req.freetype.index());
        Ok(off)
    }

    /// Return block `off` (taken by an allocation that failed before marking it allocated)
    /// to where it came from.
    fn give_back(&self, slot: &SpinLock<CpuCache>, off: u32, order: u8, ft: usize, cached: bool) {
        if cached {
            let mut c = slot.lock();
            if c.pcp.push_tracked(order, ft, off, false) {
                self.word(off as usize)
                    .store(head(ST_CACHED | order, ft), Ordering::Relaxed);
                return;
            }
        }
        self.word(off as usize).store(0, Ordering::Relaxed);
        self.core
            .lock()
            .free_pages(self.base + off as u64, order)
            .expect("a block the core holds as allocated");
    }

    /// Free an allocation (`pfn` and `order` as returned) on CPU `cpu`.
    ///
    /// The errors and their order are those of [`BuddyAllocator::free_pages`], plus
    /// [`FreeError::BadCpu`]; on error nothing changes. Any CPU may free any allocation.
    ///
    /// Every change of a live allocation's ownership word happens under the lock of its
    /// *guard*, the CPU it was allocated on (recorded in the word): a free takes that lock,
    /// checks the word is unchanged and moves it out of "allocated" with a plain store, so of
    /// two CPUs freeing the same block exactly one succeeds. Words of blocks that are not
    /// allocations (cached, on the lists, being allocated) are written only by whoever
    /// holds the block (under its cache's lock or the zone lock), never by a free.
    ///
    /// The fast path (a block of a cached order freed on the CPU it was allocated on, room
    /// in that CPU's cache) is inlined: one lock of the CPU's cache, the check, a store of
    /// "cached" and a push (dirty if it must be zeroed). Everything else goes to the
    /// out-of-line slow path, which starts over.
    ///
    /// The ownership word's loads and stores are `Relaxed`: the word hands over nothing but
    /// itself, and the guard's lock orders every change of a live allocation's word (and of
    /// the cache it goes to) before the next holder's check.
    #[inline(always)]
    pub fn free_pages(&self, cpu: usize, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let off = pfn.wrapping_sub(self.base);
        if let Some(slot) = self.cpus.get(cpu) {
            if off < self.nr && order <= PCP_MAX_ORDER {
                let h = self.word(off as usize);
                let w = h.load(Ordering::Relaxed);
                // Only a block head carries "allocated, this order", and a head of that
                // order is naturally aligned, so this also proves the alignment.
                if w & 0xff == (ST_ALLOC | order) as u32 && word_guard(w) == cpu {
                    let ft = word_ft(w);
                    let mut c = slot.0.lock();
                    if c.pcp.has_room(order, ft) && h.load(Ordering::Relaxed) == w {
                        h.store(head(ST_CACHED | order, ft), Ordering::Relaxed);
                        let dirty = self.cfg.init_on_free_unmapped && is_unmapped_index(ft);
                        c.pcp.push_tracked(order, ft, off as u32, dirty);
                        c.frees[order as usize * Freetype::COUNT + ft] += 1;
                        return Ok(());
                    }
                }
            }
        }
        self.free_slow(cpu, pfn, order)
    }

    /// The fully checked free (errors, full caches, larger blocks, lost races).
    #[inline(never)]
    fn free_slow(&self, cpu: usize, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        counted(&self.free_failures, || self.free_inner(cpu, pfn, order))
    }

    fn free_inner(&self, cpu: usize, pfn: Pfn, order: u8) -> Result<(), FreeError> {
        let slot = self.slot(cpu).map_err(FreeError::BadCpu)?;
        let off = check_free_range(self.base, self.nr, pfn, order)?;
        let h = self.word(off as usize);
        // Claim the allocation under its guard's lock: only one free of it can move it out
        // of "allocated" (to "none" while it is being freed). Freed on its guard, the block
        // keeps the lock for the rest of the free, unless it is zeroed through stage 2 on
        // free (a large unmapped one), which a CPU's lock is not held around.
        let (word, held) = loop {
            let w = h.load(Ordering::Relaxed);
            let st = w as u8;
            if st & ST_ALLOC == 0 {
                return Err(FreeError::NotAllocated);
            }
            if st & ST_ORDER != order {
                return Err(FreeError::WrongOrder {
                    allocated: st & ST_ORDER,
                });
            }
            let guard = word_guard(w);
            let held = self.cpus[guard].0.lock();
            if h.load(Ordering::Relaxed) == w {
                h.store(0, Ordering::Relaxed);
                let zeroed_now = order > PCP_MAX_ORDER
                    && self.cfg.init_on_free_unmapped
                    && is_unmapped_index(word_ft(w));
                break (w, (guard == cpu && !zeroed_now).then_some(held));
            }
        };
        let ft = word_ft(word);
        let dirty = self.cfg.init_on_free_unmapped && is_unmapped_index(ft);
        if dirty && order > PCP_MAX_ORDER {
            let n = 1u64 << order;
            let mut b = self.s2.lock();
            if let Err(e) = b.s2.zero(pfn, n) {
                b.failures += 1;
                h.store(word, Ordering::Relaxed);
                return Err(FreeError::Stage2(e));
            }
            b.zero_calls += 1;
            b.zeroed_on_free += n;
        }
        let mut c = held.unwrap_or_else(|| slot.lock());
        if order <= PCP_MAX_ORDER {
            let pushed = c.pcp.push_tracked(order, ft, off, dirty);
            if pushed {
                h.store(head(ST_CACHED | order, ft), Ordering::Relaxed);
                c.frees[order as usize * Freetype::COUNT + ft] += 1;
                return Ok(());
            }
            // Full: zero this block with the cache's dirty ones in one call, then it and a
            // batch of the cached ones go back under one zone-lock acquisition.
            if dirty {
                if let Err(e) = self.zero_dirty_with(&mut c, order, ft, Some(off)) {
                    h.store(word, Ordering::Relaxed);
                    return Err(FreeError::Stage2(e));
                }
            }
            c.frees[order as usize * Freetype::COUNT + ft] += 1;
            let mut core = self.core.lock();
            self.spill(&mut c, &mut core, order, ft, self.batch);
            core.free_pages(pfn, order).expect("validated above");
            return Ok(());
        }
        c.frees[order as usize * Freetype::COUNT + ft] += 1;
        drop(c);
        self.core
            .lock()
            .free_pages(pfn, order)
            .expect("validated above");
        Ok(())
    }

    /// Give up to `n` of the most recently cached blocks of (order, ft) back to the buddy
    /// lists. The caller has zeroed the list's dirty blocks.
    fn spill(
        &self,
        c: &mut CpuCache,
        core: &mut BuddyAllocator<NullStage2>,
        order: u8,
        ft: usize,
        n: u32,
    ) {
        debug_assert!(c.pcp.dirty(order, ft).is_empty());
        for _ in 0..n {
            let Some(off) = c.pcp.pop_tracked(order, ft) else {
                break;
            };
            self.word(off as usize).store(0, Ordering::Relaxed);
            core.free_pages(self.base + off as u64, order)
                .expect("cached blocks are allocated in the core");
        }
    }

    /// Give every block in CPU `cpu`'s caches back to the buddy lists.
    pub fn drain_cpu(&self, cpu: usize) -> Result<(), BadCpu> {
        let slot = self.slot(cpu)?;
        let mut c = slot.lock();
        if c.pcp.is_empty() {
            return Ok(());
        }
        // Zero dirty blocks first (stage 2 is never called under the zone lock); a list
        // whose zeroing fails stays cached, dirty, until a later drain or allocation.
        let lists = || (0..=PCP_MAX_ORDER).flat_map(|o| (0..Freetype::COUNT).map(move |f| (o, f)));
        // Bit i: list i of `lists()` could not be zeroed.
        let mut failed = 0u32;
        for (i, (order, ft)) in lists().enumerate() {
            if !c.pcp.dirty(order, ft).is_empty() && self.zero_dirty(&mut c, order, ft).is_err() {
                failed |= 1 << i;
            }
        }
        let mut core = self.core.lock();
        c.drains += 1;
        for (i, (order, ft)) in lists().enumerate() {
            if failed & (1 << i) == 0 {
                let n = c.pcp.len(order, ft);
                self.spill(&mut c, &mut core, order, ft, n);
            }
        }
        Ok(())
    }

    /// Give every cached block of every CPU back to the buddy lists (Linux's
    /// `drain_all_pages`); runs before every flip.
    pub fn drain_all(&self) {
        for cpu in 0..self.cpus.len() {
            self.drain_cpu(cpu).expect("cpu in range");
        }
    }

    /// Every CPU's cache lock (in CPU order) and the zone lock: a consistent view.
    fn lock_all(
        &self,
    ) -> (
        Vec<SpinGuard<'_, CpuCache>>,
        SpinGuard<'_, BuddyAllocator<NullStage2>>,
    ) {
        let cs = self.cpus.iter().map(|s| s.0.lock()).collect();
        (cs, self.core.lock())
    }

    /// Counters and free-list state now, across all CPUs (see [`Snapshot`]); cached pages
    /// count as free, in `pcp_pages`.
    pub fn snapshot(&self) -> Snapshot {
        let (cs, core) = self.lock_all();
        let mut s = core.snapshot();
        drop(core);
        let mut allocs = [0u64; NR_LISTS];
        let mut frees = [0u64; NR_LISTS];
        s.pcp_drains = 0;
        for c in &cs {
            for i in 0..NR_LISTS {
                allocs[i] += c.allocs[i];
                frees[i] += c.frees[i];
            }
            s.pcp_drains += c.drains;
            for ft in 0..Freetype::COUNT {
                let p = c.pcp.pages_of(ft);
                s.pcp_pages[ft] += p;
                s.free_pages_per_freetype[ft] += p;
                s.free_pages += p;
            }
            s.metadata_bytes += c.pcp.bytes() as u64;
        }
        drop(cs);
        s.allocs = unflatten(&allocs);
        s.frees = unflatten(&frees);
        s.alloc_failures = self.alloc_failures.load(Ordering::Relaxed);
        s.free_failures = self.free_failures.load(Ordering::Relaxed);
        let b = self.s2.lock();
        s.stage2_zero_calls += b.zero_calls;
        s.pages_zeroed += b.zeroed_on_alloc + b.zeroed_on_free;
        s.pages_zeroed_on_alloc = b.zeroed_on_alloc;
        s.pages_zeroed_on_free = b.zeroed_on_free;
        s.stage2_failures += b.failures;
        s.metadata_bytes += self.heads.bytes() as u64;
        s
    }

    /// [`crate::QuickStats`] now, in O(CPUs): the same figures as those fields of
    /// [`Zone::snapshot`], without its walk over every page.
    pub fn quick_stats(&self) -> crate::QuickStats {
        let (cs, core) = self.lock_all();
        let mut q = core.quick_stats();
        drop(core);
        for c in &cs {
            q.free_pages += (0..Freetype::COUNT).map(|f| c.pcp.pages_of(f)).sum::<u64>();
        }
        drop(cs);
        let b = self.s2.lock();
        q.stage2_zero_calls += b.zero_calls;
        q.pages_zeroed += b.zeroed_on_alloc + b.zeroed_on_free;
        q
    }

    /// Free pages (buddy lists plus every CPU's caches).
    pub fn free_pages_count(&self) -> u64 {
        let (cs, core) = self.lock_all();
        core.free_pages_count()
            + cs.iter()
                .map(|c| (0..Freetype::COUNT).map(|f| c.pcp.pages_of(f)).sum::<u64>())
                .sum::<u64>()
    }

    /// The live allocation that starts at or contains `pfn` (blocks in caches are not
    /// allocations).
    pub fn allocation_containing(&self, pfn: Pfn) -> Option<Allocation> {
        let a = self.core.lock().allocation_containing(pfn)?;
        let w = self
            .word((a.pfn - self.base) as usize)
            .load(Ordering::Relaxed);
        (w as u8 == ST_ALLOC | a.order).then(|| Allocation {
            freetype: Freetype::ALL[word_ft(w)],
            ..a
        })
    }

    /// Freetype recorded for `pfn`'s pageblock.
    pub fn pageblock_freetype(&self, pfn: Pfn) -> Option<Freetype> {
        self.core.lock().pageblock_freetype(pfn)
    }

    /// First managed pfn.
    pub fn base_pfn(&self) -> Pfn {
        self.base
    }

    /// Number of managed pages.
    pub fn nr_pages(&self) -> u64 {
        self.nr
    }

    /// The configuration.
    pub fn config(&self) -> Config {
        self.cfg
    }

    /// Run `f` on the stage-2 backend (under its lock).
    pub fn with_stage2<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut self.s2.lock().s2)
    }

    /// The stage-2 backend, through exclusive access to the zone (no locking needed).
    pub fn stage2_mut(&mut self) -> &mut S {
        &mut self.s2.get_mut().s2
    }

    /// Give up the zone and keep its stage-2 backend.
    pub fn into_stage2(self) -> S {
        self.s2.into_inner().s2
    }

    /// Check every invariant of the core ([`BuddyAllocator::check_invariants`]) and of the
    /// caches: every cached block is allocated in the core with its order and marked cached
    /// here under its list's order and freetype; every block marked allocated here is
    /// allocated in the core; nothing else is marked. Call it with no operation in flight.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let (cs, core) = self.lock_all();
        core.check_invariants()?;
        let mut marked = 0u64;
        for (off, h) in self.heads[self.skew..].iter().enumerate() {
            let w = h.load(Ordering::Relaxed);
            let st = w as u8;
            if st == ST_NONE {
                continue;
            }
            let m = core.meta[off];
            if m.state != ST_ALLOC | (st & ST_ORDER) {
                return Err("zone head not allocated in the core with the same order");
            }
            if st & ST_CACHED != 0 {
                marked += 1;
            } else if st & ST_ALLOC == 0 {
                return Err("zone head with an unknown state");
            } else if word_guard(w) >= self.cpus.len() {
                return Err("allocation guarded by a CPU the zone does not have");
            }
        }
        let mut listed = 0u64;
        for c in &cs {
            for order in 0..=PCP_MAX_ORDER {
                for ft in 0..Freetype::COUNT {
                    for &off in c.pcp.blocks(order, ft) {
                        listed += 1;
                        let w = self.word(off as usize).load(Ordering::Relaxed);
                        if w != head(ST_CACHED | order, ft) {
                            return Err(
                                "cached block not marked cached with its order and freetype",
                            );
                        }
                        if visibility_index(ft)
                            != visibility_index(core.pb[core.pb_index(off)] as usize)
                        {
                            return Err("cached block's visibility differs from its pageblock's");
                        }
                    }
                }
            }
        }
        if listed != marked {
            return Err("blocks marked cached differ from the blocks in the caches");
        }
        Ok(())
    }

    /// Pages cached on CPU `cpu` (all orders and freetypes).
    pub fn cached_pages(&self, cpu: usize) -> Result<u64, BadCpu> {
        let c = self.slot(cpu)?.lock();
        Ok((0..Freetype::COUNT).map(|f| c.pcp.pages_of(f)).sum())
    }

    /// Whether any CPU's cache holds a page of `[pfn, pfn + count)`.
    pub fn any_cached_in(&self, pfn: Pfn, count: u64) -> bool {
        self.cpus.iter().any(|s| {
            let c = s.0.lock();
            (0..=PCP_MAX_ORDER).any(|o| {
                (0..Freetype::COUNT).any(|f| {
                    c.pcp.blocks(o, f).iter().any(|&off| {
                        let p = self.base + off as u64;
                        p < pfn + count && pfn < p + (1 << o)
                    })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// A free of a live allocation from another CPU waits for the lock of the allocation's
    /// guard and checks the word again under it: while the guard's lock is held it cannot
    /// succeed, and a claim made meanwhile by the lock's holder makes it `NotAllocated`.
    #[test]
    fn a_free_claims_under_the_guards_lock() {
        // From another CPU (the slow path) and from the guard itself (the fast path).
        for cpu in [0, 2] {
            let z = Zone::new(0, 1024, NullStage2, Config::default(), 3).unwrap();
            let x = z.alloc_pages(2, Gfp::MOVABLE, 0).unwrap();
            let off = (x.pfn - z.base_pfn()) as usize;
            let w = z.word(off).load(Ordering::Relaxed);
            assert_eq!(word_guard(w), 2);
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                let held = z.cpus[2].0.lock();
                let t = s.spawn(|| {
                    let r = z.free_pages(cpu, x.pfn, 0);
                    done.store(true, Ordering::SeqCst);
                    r
                });
                std::thread::sleep(Duration::from_millis(50));
                assert!(
                    !done.load(Ordering::SeqCst),
                    "cpu {cpu}: freed without the lock"
                );
                // Another free's claim, made under the guard's lock, wins.
                z.word(off).store(0, Ordering::Relaxed);
                drop(held);
                assert_eq!(t.join().unwrap(), Err(FreeError::NotAllocated), "cpu {cpu}");
            });
            // Put it back as the allocation it was, and free it for real from CPU 1.
            z.word(off).store(w, Ordering::Relaxed);
            z.free_pages(1, x.pfn, 0).unwrap();
            z.check_invariants().unwrap();
        }
    }

    /// The pattern of the threads benchmark: CPU 0's hot block is the last of its refill
    /// batch and CPU 1's the first of the next one, adjacent pages. Their ownership words
    /// and the two CPUs' cache slots must lie in different 128-byte line pairs (false sharing
    /// on every hot pair otherwise), whatever the base pfn's offset in a batch.
    #[test]
    fn two_cpus_hot_words_do_not_share_a_line_pair() {
        let pair = |p: *const u8| p as usize / 128;
        for base in [0u64, 1 << 18, (1 << 18) + 5, 1000] {
            let z = Zone::new(base, 1 << 14, NullStage2, Config::default(), 2).unwrap();
            let kept = z.alloc_pages(0, Gfp::empty(), 0).unwrap();
            let a = z.alloc_pages(0, Gfp::empty(), 0).unwrap();
            let b = z.alloc_pages(1, Gfp::empty(), 0).unwrap();
            let word = |pfn: u64| z.word((pfn - base) as usize) as *const AtomicU32 as *const u8;
            // Each batch is 32 pages of one aligned order-5 block.
            assert_eq!(kept.pfn % 32, 0, "base {base}");
            assert_eq!(b.pfn / 32, kept.pfn / 32 + 1, "base {base}");
            assert_eq!(pair(word(kept.pfn)), pair(word(a.pfn)), "base {base}");
            assert_ne!(pair(word(a.pfn)), pair(word(b.pfn)), "base {base}");
            assert_eq!(z.heads.as_ptr() as usize % 128, 0);
            for cpu in 0..2 {
                let c = z.cpus[cpu].0.lock();
                assert_eq!(c.pcp.slots_ptr() as usize % 128, 0);
                assert_eq!(&z.cpus[cpu] as *const CpuSlot as usize % 128, 0);
            }
            z.free_pages(0, a.pfn, 0).unwrap();
            z.free_pages(1, b.pfn, 0).unwrap();
            z.free_pages(1, kept.pfn, 0).unwrap();
            z.check_invariants().unwrap();
        }
    }
}
