//! The stage-2 engine: the single source of truth for what the guest can reach.
//!
//! Every page of guest RAM `[0, ram_size)` has a [`RangeState`]. The engine keeps the states as
//! maximal runs in a `BTreeMap` ([`plan::RangeMap`]) and realises them with KVM memslots through a
//! [`SlotBackend`]: every maximal run of *exposed* pages (reserved or mapped) is exactly one
//! memslot, and unmapped pages are holes. That is the minimal number of memslots for a layout.
//!
//! Updates arrive through [`allocator::Stage2`] (pfn based): an unmap inside a slot deletes the
//! slot and re-creates the pieces that stay exposed (KVM cannot shrink a slot in place: the GPA
//! and size of a slot only change by deleting it), a map merges the new range with its exposed
//! neighbours into one slot. The planner ([`plan`]) computes the slots that must be deleted and
//! created for an update from the slots around it, so an update costs O(log n + ranges touched).
//!
//! Backends: [`KvmSlots`] (real `KVM_SET_USER_MEMORY_REGION`, zeroing through
//! `madvise(MADV_DONTNEED)`) and [`ModelSlots`] (a checked simulation of KVM's slot table for
//! tests and models).

mod engine;
mod kvm;
mod model;
pub mod plan;

pub use engine::Stage2Engine;
pub use kvm::{KvmSlots, LockStats, SlotTiming};
pub use model::{ModelSlots, SlotCall};

use serde::Serialize;

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// State of a range of guest RAM at stage 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RangeState {
    /// VMM-owned low memory (page tables, GDT, image, mailboxes): always exposed, never managed.
    Reserved,
    /// Managed memory the guest's direct map can reach: exposed through a memslot.
    Mapped,
    /// Managed memory removed from stage 2: a memslot hole; any access is a violation.
    Unmapped,
}

impl RangeState {
    /// Whether pages in this state are backed by a memslot (reachable by the guest).
    pub const fn is_exposed(self) -> bool {
        match self {
            RangeState::Reserved | RangeState::Mapped => true,
            RangeState::Unmapped => false,
        }
    }

    /// Lower-case name used in dumps ("reserved", "mapped", "unmapped").
    pub const fn name(self) -> &'static str {
        match self {
            RangeState::Reserved => "reserved",
            RangeState::Mapped => "mapped",
            RangeState::Unmapped => "unmapped",
        }
    }
}

impl std::fmt::Display for RangeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// One maximal range of equal state, with the memslot that exposes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RangeInfo {
    /// First GPA of the range.
    pub start: u64,
    /// GPA one past the range.
    pub end: u64,
    /// State of every page in the range.
    pub state: RangeState,
    /// Memslot that contains the range (None for holes).
    pub slot: Option<u32>,
}

impl RangeInfo {
    /// Number of 4 KiB pages in the range.
    pub const fn pages(&self) -> u64 {
        (self.end - self.start) >> PAGE_SHIFT
    }
}

/// One memslot as KVM holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SlotInfo {
    /// Slot id.
    pub slot: u32,
    /// First GPA the slot covers.
    pub gpa: u64,
    /// Length of the slot in bytes.
    pub len: u64,
}

impl SlotInfo {
    /// The slots of a table keyed by start GPA with `(end, slot id)` values, in GPA order.
    pub(crate) fn table(by_gpa: &std::collections::BTreeMap<u64, (u64, u32)>) -> Vec<SlotInfo> {
        by_gpa
            .iter()
            .map(|(&gpa, &(end, slot))| SlotInfo {
                slot,
                gpa,
                len: end - gpa,
            })
            .collect()
    }

    /// GPA one past the slot.
    pub const fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// Counters of the engine's stage-2 work.
#[derive(Serialize, Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Stage2Counters {
    /// Successful unmap updates.
    pub unmap_calls: u64,
    /// Successful map updates.
    pub map_calls: u64,
    /// Successful zero requests.
    pub zero_calls: u64,
    /// Pages removed from stage 2.
    pub pages_unmapped: u64,
    /// Pages exposed again.
    pub pages_mapped: u64,
    /// Pages zeroed.
    pub pages_zeroed: u64,
    /// `set_slot` calls made (creates + deletes, including rollbacks after a backend failure).
    pub memslot_updates: u64,
    /// Memslots created (`set_slot` with a length).
    pub slots_created: u64,
    /// Memslots deleted (`set_slot` with length 0).
    pub slots_deleted: u64,
    /// Memslots that exist now.
    pub memslots_in_use: u64,
    /// Most memslots that existed at once.
    pub peak_memslots: u64,
    /// Updates refused (out of RAM, wrong state, out of slots, backend failure).
    pub rejected_updates: u64,
}

/// Why the engine refused to start or to apply an update.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineError {
    /// RAM size is zero or not a multiple of the page size.
    #[error("RAM size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadRamSize(u64),
    /// The reserved end lies past RAM or is not page aligned.
    #[error("reserved end {reserved_end:#x} must be page aligned and at most the RAM size {ram_size:#x}")]
    BadReservedEnd {
        /// Requested end of reserved memory.
        reserved_end: u64,
        /// RAM size.
        ram_size: u64,
    },
    /// The range is empty, wraps or leaves RAM.
    #[error("range [{start:#x}, {end:#x}) is empty or not inside RAM [0, {ram_size:#x})")]
    OutOfRam {
        /// First GPA asked for.
        start: u64,
        /// End GPA asked for (saturated on overflow).
        end: u64,
        /// RAM size.
        ram_size: u64,
    },
    /// A page of the range is in a state the update does not accept.
    #[error("cannot {op} [{start:#x}, {end:#x}): page {gpa:#x} is {found}")]
    WrongState {
        /// The update ("unmap", "map", "zero").
        op: &'static str,
        /// First GPA asked for.
        start: u64,
        /// End GPA asked for.
        end: u64,
        /// First page in the wrong state.
        gpa: u64,
        /// Its state.
        found: RangeState,
    },
    /// The new layout would need more memslots than the backend offers; nothing changed.
    #[error("the update needs {needed} memslots, the backend offers {max}")]
    OutOfSlots {
        /// Memslots the new layout needs.
        needed: u64,
        /// Backend limit.
        max: u32,
    },
    /// The backend failed (KVM errno as a negative number in `Stage2Error::Backend`).
    #[error("stage-2 backend failed: {0:?}")]
    Backend(allocator::Stage2Error),
}

impl EngineError {
    /// The allocator-facing error for this failure.
    pub fn to_stage2(&self) -> allocator::Stage2Error {
        match self {
            EngineError::OutOfSlots { .. } => allocator::Stage2Error::OutOfSlots,
            EngineError::Backend(e) => *e,
            EngineError::OutOfRam { .. } => allocator::Stage2Error::Backend(-libc::ERANGE),
            _ => allocator::Stage2Error::Backend(-libc::EINVAL),
        }
    }
}

/// How memslots are realised.
pub trait SlotBackend {
    /// Create or replace memslot `slot` = [gpa, gpa+len) backed at host offset `gpa` of RAM
    /// (RAM is one host mapping; GPA x lives at host_base + x). len == 0 deletes the slot.
    ///
    /// The engine only creates slots in ids that are free and only deletes existing slots.
    fn set_slot(&mut self, slot: u32, gpa: u64, len: u64) -> Result<(), allocator::Stage2Error>;
    /// Zero guest RAM [gpa, gpa+len) through the host mapping (madvise(MADV_DONTNEED) for
    /// whole pages on the KVM backend).
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), allocator::Stage2Error>;
    /// Most memslots this backend offers (KVM_CAP_NR_MEMSLOTS for KVM); the engine uses slot
    /// ids `0..max_slots()`.
    fn max_slots(&self) -> u32;
    /// Locks [gpa, gpa+len) against swap when it becomes unmapped (`locked`), unlocks it when it
    /// is mapped again. Best effort: the KVM backend counts failures (memlock limit); the
    /// default does nothing.
    fn set_locked(&mut self, _gpa: u64, _len: u64, _locked: bool) {}
}

#[cfg(test)]
pub(crate) mod tests;
