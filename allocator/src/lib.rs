//! API SKELETON written by the integrator so vmm/ and replay can compile against it.
//! The allocator helper replaces every `todo!()` and may split this into modules, but keeps
//! these public names and signatures (additions are fine).
#![no_std]
extern crate alloc;

/// A page frame number (GPA >> 12).
pub type Pfn = u64;
/// Highest buddy order (order 10 = 4 MiB).
pub const MAX_ORDER: u8 = 10;
/// Order of a pageblock (2 MiB).
pub const PAGEBLOCK_ORDER: u8 = 9;
/// Pages in a pageblock.
pub const PAGEBLOCK_PAGES: u64 = 1 << PAGEBLOCK_ORDER;

/// Linux's migratetypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Migratetype { Unmovable, Movable, Reclaimable }

/// Migratetype plus orthogonal flag bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Freetype { /* private */ _mt: Migratetype, _flags: u8 }

impl Freetype {
    /// Number of freetypes that have free lists (dense index range).
    pub const COUNT: usize = 4;
    pub const fn new(_mt: Migratetype, _unmapped: bool) -> Option<Freetype> { todo!() }
    pub const fn migratetype(self) -> Migratetype { todo!() }
    pub const fn is_unmapped(self) -> bool { todo!() }
    /// Dense index in 0..COUNT.
    pub const fn index(self) -> usize { todo!() }
    pub const fn from_index(_i: usize) -> Option<Freetype> { todo!() }
    /// Short name, e.g. "unmovable", "unmovable|unmapped".
    pub fn name(self) -> &'static str { todo!() }
}

/// GFP-style allocation flags (bit values equal veil_abi::gfp).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Gfp(u32);
impl Gfp {
    pub const ZERO: Gfp = Gfp(1 << 0);
    pub const UNMAPPED: Gfp = Gfp(1 << 1);
    pub const MOVABLE: Gfp = Gfp(1 << 2);
    pub const RECLAIMABLE: Gfp = Gfp(1 << 3);
    pub const ATOMIC: Gfp = Gfp(1 << 4);
    pub const fn empty() -> Gfp { Gfp(0) }
    /// None if unknown bits are set.
    pub const fn from_bits(_b: u32) -> Option<Gfp> { todo!() }
    pub const fn bits(self) -> u32 { self.0 }
    pub const fn contains(self, o: Gfp) -> bool { self.0 & o.0 == o.0 }
}
impl core::ops::BitOr for Gfp { type Output = Gfp; fn bitor(self, o: Gfp) -> Gfp { Gfp(self.0 | o.0) } }

/// Context for alloc_pages_special (extensible; values equal veil_abi::context).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuddyContext { Default, Unmapped }
impl BuddyContext { pub const fn from_u64(_v: u64) -> Option<BuddyContext> { todo!() } }

/// Error from a stage-2 backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage2Error { OutOfSlots, Backend(i32) }

/// How the allocator changes what the guest can reach. Ranges are whole pages.
pub trait Stage2 {
    /// Remove [pfn, pfn+count) from the direct map (one flush for the range).
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Expose [pfn, pfn+count) again (the allocator has zeroed it first).
    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
    /// Zero [pfn, pfn+count) (mapped or not).
    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error>;
}

/// A successful allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation { pub pfn: Pfn, pub order: u8, pub freetype: Freetype }

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocError {
    InvalidOrder(u8),
    InvalidFlags,
    OutOfMemory { order: u8, freetype: Freetype },
    /// A flip was needed but no whole free pageblock of the other mapped-ness exists.
    NoFreePageblock { order: u8, freetype: Freetype, free_pages: u64 },
    /// A flip was needed but the request may not block.
    WouldBlock { order: u8, freetype: Freetype },
    Stage2(Stage2Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeError { OutOfRange, Misaligned, InvalidOrder, NotAllocated, WrongOrder { allocated: u8 } }

/// Allocator options.
#[derive(Clone, Copy, Debug)]
pub struct Config { pub init_on_free_unmapped: bool }
impl Default for Config { fn default() -> Self { Config { init_on_free_unmapped: true } } }

/// Counters and free-list state at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Snapshot {
    pub managed_pages: u64,
    pub free_pages: u64,
    pub flips_to_unmapped: u64,
    pub flips_to_mapped: u64,
    pub stage2_unmap_calls: u64,
    pub stage2_map_calls: u64,
    pub stage2_zero_calls: u64,
    pub stage2_pages_unmapped: u64,
    pub stage2_pages_mapped: u64,
    pub pages_zeroed: u64,
    /// [order][freetype index]
    pub free_per_order: [[u64; Freetype::COUNT]; MAX_ORDER as usize + 1],
    pub allocs: [[u64; Freetype::COUNT]; MAX_ORDER as usize + 1],
    pub frees: [[u64; Freetype::COUNT]; MAX_ORDER as usize + 1],
    pub free_pageblocks_mapped: u64,
    pub free_pageblocks_unmapped: u64,
    pub mixed_pageblocks: u64,
    pub fallbacks_claim: u64,
    pub fallbacks_steal: u64,
    pub alloc_failures: u64,
}

/// The buddy allocator over [base_pfn, base_pfn + nr_pages).
pub struct BuddyAllocator<S: Stage2> { s2: S }

impl<S: Stage2> BuddyAllocator<S> {
    /// All pages start free and mapped.
    pub fn new(_base_pfn: Pfn, _nr_pages: u64, s2: S, _cfg: Config) -> Self { let _ = s2; todo!() }
    pub fn alloc_pages(&mut self, _gfp: Gfp, _order: u8) -> Result<Allocation, AllocError> { todo!() }
    pub fn alloc_pages_special(&mut self, _ctx: BuddyContext, _gfp: Gfp, _order: u8) -> Result<Allocation, AllocError> { todo!() }
    pub fn free_pages(&mut self, _pfn: Pfn, _order: u8) -> Result<(), FreeError> { todo!() }
    /// Order and freetype of the live allocation that starts at or contains pfn.
    pub fn allocation_containing(&self, _pfn: Pfn) -> Option<Allocation> { todo!() }
    /// Freetype recorded for pfn's pageblock.
    pub fn pageblock_freetype(&self, _pfn: Pfn) -> Option<Freetype> { todo!() }
    pub fn check_invariants(&self) -> Result<(), &'static str> { todo!() }
    pub fn snapshot(&self) -> Snapshot { todo!() }
    pub fn base_pfn(&self) -> Pfn { todo!() }
    pub fn nr_pages(&self) -> u64 { todo!() }
    pub fn free_pages_count(&self) -> u64 { todo!() }
    pub fn stage2(&self) -> &S { &self.s2 }
    pub fn stage2_mut(&mut self) -> &mut S { &mut self.s2 }
}
