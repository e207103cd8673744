//! A freetype-aware buddy page allocator with pageblock flips, modelled on the Linux page
//! allocator with the `__GFP_UNMAPPED` / `ALLOC_UNMAPPED` series applied, and ASI's sensitive
//! memory (`__GFP_SENSITIVE`: mapped in the full view only) as a third kind.
//!
//! It manages a range of 4 KiB page frames ([`BuddyAllocator`]) and never touches them: all
//! metadata lives in its own arrays ([`METADATA_BYTES_PER_PAGE`] bytes per page plus
//! [`METADATA_BYTES_PER_PAGEBLOCK`] per pageblock), and it changes what the guest can reach
//! only through the [`Stage2`] trait the VMM implements.
//!
//! - **Buddy core** ([`buddy`], [`freelist`]): orders `0..=MAX_ORDER`, naturally aligned
//!   blocks, O(1) intrusive doubly linked free lists per (order, freetype) with 32-bit links.
//! - **Freetypes** ([`freetype`]): migratetype + `UNMAPPED` / `SENSITIVE` flags, dense index
//!   over the seven combinations that have lists, three kinds ([`Visibility`]: nonsensitive,
//!   sensitive, unmapped); each pageblock records its freetype.
//! - **Fallback** ([`fallback`]): Linux's claim/steal rules within one visibility.
//! - **Flips** ([`flip`]): a whole free pageblock of another visibility changes kind with one
//!   stage-2 call (`unmap`, `make_sensitive` or `map`), zeroed first whenever a view gains
//!   it; never for `ATOMIC` requests.
//! - **Small-block caches** ([`pcp`]): Linux's per-CPU lists, one per (order <= 3 or 9, freetype).
//! - **Several CPUs** ([`zone`]): [`Zone`] puts the buddy lists under one lock (the zone
//!   lock) and gives every CPU its own caches; flips change stage 2 outside the lock.
//! - **Two API shapes, one translation** ([`gfp`]): [`Gfp`] flags and
//!   [`BuddyContext`] + flags both go through [`AllocRequest::from_gfp`]. See that module for
//!   the GFP-vs-context trade-off.
//! - **Checked input, counters** ([`BuddyAllocator::free_pages`],
//!   [`BuddyAllocator::check_invariants`], [`Snapshot`]).
#![no_std]
#![warn(missing_docs)]
extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod buddy;
pub mod error;
pub mod fallback;
pub mod flip;
pub mod freelist;
pub mod freetype;
pub mod gfp;
pub mod invariants;
mod lines;
pub mod lock;
mod meta;
pub mod pcp;
pub mod sim;
pub mod stage2;
pub mod stats;
pub mod zone;

pub use buddy::{Allocation, BuddyAllocator, Config, INITIAL_FREETYPE, SENSITIVE_INITIAL_FREETYPE};
pub use error::{AllocError, BadCpu, FreeError, InitError, Stage2Error};
pub use freetype::{Freetype, Migratetype, Visibility, FT_FLAG_SENSITIVE, FT_FLAG_UNMAPPED};
pub use gfp::{AllocRequest, BuddyContext, Gfp};
pub use sim::SimStage2;
pub use stage2::{NullStage2, Stage2};
pub use stats::{QuickStats, Snapshot};
pub use zone::Zone;

/// A page frame number (GPA >> 12).
pub type Pfn = u64;
/// Highest buddy order (order 10 = 4 MiB).
pub const MAX_ORDER: u8 = 10;
/// Order of a pageblock (2 MiB).
pub const PAGEBLOCK_ORDER: u8 = 9;
/// Pages in a pageblock.
pub const PAGEBLOCK_PAGES: u64 = 1 << PAGEBLOCK_ORDER;

/// Bytes of metadata kept for every managed page: 10, in two arrays (struct of arrays): a
/// 2-byte head record (a state byte holding free/allocated/cached + order, a freetype byte)
/// and 8 bytes of free-list links (two `u32`).
pub const METADATA_BYTES_PER_PAGE: usize = meta::PAGE_META_BYTES;
/// Bytes of metadata kept for every pageblock (its freetype index): 1, i.e. 1/512 byte per
/// page. Total per page: 10 + 1/512 ≈ 10.002 bytes, plus a fixed part per allocator
/// (8,960 bytes of caches at the default capacity and 324 bytes of list heads and masks);
/// [`BuddyAllocator::metadata_bytes`] gives the exact figure for an instance, e.g. 664,772
/// bytes (10.14 per page) for 65,536 pages.
pub const METADATA_BYTES_PER_PAGEBLOCK: usize = 1;
