//! Typed errors of the allocator and of its stage-2 backends.

use crate::freetype::Freetype;
use core::fmt;

/// Error from a stage-2 backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage2Error {
    /// The backend ran out of memslots (or a similar fixed resource).
    OutOfSlots,
    /// The backend failed with this (errno-style) code.
    Backend(i32),
    /// The backend has no such operation (a backend without two views refuses
    /// [`crate::Stage2::make_sensitive`] this way, so sensitive pages are never silently
    /// treated as nonsensitive).
    Unsupported,
}

impl fmt::Display for Stage2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage2Error::OutOfSlots => f.write_str("stage 2: out of memslots"),
            Stage2Error::Backend(c) => write!(f, "stage 2: backend error {c}"),
            Stage2Error::Unsupported => {
                f.write_str("stage 2: operation not supported by the backend")
            }
        }
    }
}

impl core::error::Error for Stage2Error {}

/// Why an allocation failed.
///
/// After any error the allocator holds the same allocations and free pages as before and
/// `check_invariants` holds. Invalid requests change nothing at all. A request that reached
/// the slow path may have drained the small-block caches (Linux's `drain_all_pages`) and, for
/// [`AllocError::Stage2`], may keep side effects of steps that succeeded before the failing
/// stage-2 call (a migratetype claim, a completed flip whose block is now free on its new
/// lists, a zeroing); the block that was being prepared is back on the free lists, and a
/// block is never left mapped without having been zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocError {
    /// The order is above [`crate::MAX_ORDER`].
    InvalidOrder(u8),
    /// The flags name no freetype (e.g. `MOVABLE|RECLAIMABLE`, `UNMAPPED|MOVABLE`) or unknown
    /// bits are set.
    InvalidFlags,
    /// No free memory at all could satisfy the request.
    OutOfMemory {
        /// Requested order.
        order: u8,
        /// Requested freetype.
        freetype: Freetype,
    },
    /// A flip was needed but no free block of at least `max(order, PAGEBLOCK_ORDER)` of the
    /// other mapped-ness exists (although `free_pages` pages are free).
    NoFreePageblock {
        /// Requested order.
        order: u8,
        /// Requested freetype.
        freetype: Freetype,
        /// Free pages at the time of the failure.
        free_pages: u64,
    },
    /// A flip was needed but the request may not block (`ATOMIC`).
    WouldBlock {
        /// Requested order.
        order: u8,
        /// Requested freetype.
        freetype: Freetype,
    },
    /// The stage-2 backend failed during a flip or a zeroing; the allocator rolled back.
    Stage2(Stage2Error),
    /// The CPU id names no per-CPU cache of this [`crate::Zone`].
    BadCpu(BadCpu),
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AllocError::InvalidOrder(o) => write!(f, "invalid order {o}"),
            AllocError::InvalidFlags => f.write_str("invalid allocation flags"),
            AllocError::OutOfMemory { order, freetype } => {
                write!(f, "out of memory: order {order} {freetype}")
            }
            AllocError::NoFreePageblock {
                order,
                freetype,
                free_pages,
            } => write!(
                f,
                "no whole free pageblock to flip for order {order} {freetype} \
                 ({free_pages} pages free)"
            ),
            AllocError::WouldBlock { order, freetype } => write!(
                f,
                "order {order} {freetype} needs a pageblock flip but may not block"
            ),
            AllocError::Stage2(e) => write!(f, "{e}"),
            AllocError::BadCpu(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for AllocError {}

/// Why a free was refused. The allocator is unchanged after every error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeError {
    /// The pfn is outside the managed range.
    OutOfRange,
    /// The pfn is not aligned to the order.
    Misaligned,
    /// The order is above [`crate::MAX_ORDER`].
    InvalidOrder,
    /// No live allocation starts at this pfn (never allocated, or already freed).
    NotAllocated,
    /// An allocation starts here but with another order.
    WrongOrder {
        /// The order the allocation really has.
        allocated: u8,
    },
    /// `init_on_free` zeroing failed; the pages stay allocated.
    Stage2(Stage2Error),
    /// The CPU id names no per-CPU cache of this [`crate::Zone`].
    BadCpu(BadCpu),
}

impl fmt::Display for FreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FreeError::OutOfRange => f.write_str("pfn outside the managed range"),
            FreeError::Misaligned => f.write_str("pfn not aligned to the order"),
            FreeError::InvalidOrder => f.write_str("invalid order"),
            FreeError::NotAllocated => f.write_str("no live allocation starts at this pfn"),
            FreeError::WrongOrder { allocated } => {
                write!(f, "wrong order: the allocation has order {allocated}")
            }
            FreeError::Stage2(e) => write!(f, "zeroing on free failed: {e}"),
            FreeError::BadCpu(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for FreeError {}

/// Why an allocator could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitError {
    /// More pages than the 32-bit metadata links can index (`u32::MAX - 1`).
    TooManyPages(u64),
    /// `base_pfn + nr_pages` overflows.
    Overflow,
    /// A [`crate::Zone`] needs at least one CPU.
    NoCpus,
    /// More CPUs than a [`crate::Zone`] can have ([`crate::zone::MAX_CPUS`]).
    TooManyCpus(usize),
    /// [`crate::Config::sensitive_by_default`]: the backend refused to make the range
    /// sensitive (e.g. [`Stage2Error::Unsupported`]: it has no views).
    Stage2(Stage2Error),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InitError::TooManyPages(n) => write!(f, "{n} pages: too many for 32-bit links"),
            InitError::Overflow => f.write_str("pfn range overflows"),
            InitError::NoCpus => f.write_str("a zone needs at least one CPU"),
            InitError::TooManyCpus(n) => write!(f, "{n} CPUs: a zone has at most 65536"),
            InitError::Stage2(e) => write!(f, "cannot make the range sensitive: {e}"),
        }
    }
}

impl core::error::Error for InitError {}

/// A CPU id outside `0..nr_cpus` was passed to a [`crate::Zone`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadCpu {
    /// The id passed.
    pub cpu: usize,
    /// CPUs the zone has caches for.
    pub nr_cpus: usize,
}

impl fmt::Display for BadCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {} out of range (the zone has {} cpus)",
            self.cpu, self.nr_cpus
        )
    }
}

impl core::error::Error for BadCpu {}
