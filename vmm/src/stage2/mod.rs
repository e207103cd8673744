//! The stage-2 engine: the single source of truth for what the guest can reach.
//!
//! Three layers (docs/ARCHITECTURE.md, "Stage 2: states, views, backends"):
//! - **states**: every page of guest RAM `[0, ram_size)` has an intended [`RangeState`], kept by
//!   [`Stage2Engine`] as maximal runs in a `BTreeMap` ([`plan::RangeMap`]);
//! - **a view** ([`View`]) maps each state to the [`Perm`] the guest gets (none, read,
//!   read-write);
//! - **a backend** ([`Stage2Backend`]) realises the view: the engine only tells it "make this
//!   GPA range this permission".
//!
//! Updates arrive through [`allocator::Stage2`] (pfn based) or the engine's typed range calls.
//!
//! Backends: [`Slots`], minimal KVM memslots over a [`MemslotTable`] — every maximal run of
//! pages with equal permission is one memslot (`Read` runs as `KVM_MEM_READONLY` slots), `None`
//! pages are holes. Tables: [`KvmSlots`] (real `KVM_SET_USER_MEMORY_REGION`, zeroing through
//! `madvise(MADV_DONTNEED)`) and [`ModelSlots`] (a checked simulation of KVM's slot table for
//! tests and models).

mod asi_view;
mod engine;
pub mod host_maps;
mod kvm;
mod model;
mod mprotect;
pub mod plan;
pub mod secretmem;
mod slots;
pub mod verify;

pub use asi_view::{AsiView, ViewSwitch};
pub use engine::Stage2Engine;
pub use kvm::{KvmSlots, LockStats, SlotTiming};
pub use model::{ModelSlots, SlotCall};
pub use mprotect::{Mprotect, MprotectError};
pub use slots::Slots;

use serde::Serialize;

use crate::addr::Gpa;

/// Which backend realises the guest's view (`veil run --stage2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Minimal KVM memslots: unmapped pages are holes, read-only pages `KVM_MEM_READONLY`
    /// slots ([`Slots`]).
    Slots,
    /// One memslot over a second mapping of memfd-backed RAM whose 4 KiB pages are
    /// `mprotect`ed ([`Mprotect`]): the default, for its lower per-update cost and suite time
    /// in the cost table (README).
    #[default]
    Mprotect,
}

impl BackendKind {
    /// The name `--stage2` takes.
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Slots => "slots",
            BackendKind::Mprotect => "mprotect",
        }
    }
}

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// State of a range of guest RAM at stage 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RangeState {
    /// VMM-owned low memory (page tables, GDT, image, mailboxes): always exposed, never managed.
    Reserved,
    /// Managed memory the guest's direct map can reach.
    Mapped,
    /// Managed memory the guest may read but not write (locked by `Hc::Protect`, never back):
    /// a store is a violation.
    ReadOnly,
    /// Managed memory the guest locked against every access (`Hc::Protect`, never back).
    NoAccess,
    /// Managed memory removed from stage 2: any access is a violation.
    Unmapped,
    /// Managed memory holding sensitive data (ASI): read-write in the full view, absent from
    /// the restricted one. A restricted vCPU's touch is an ASI exit, not a violation.
    Sensitive,
}

impl RangeState {
    /// Whether the guest locked pages in this state for the rest of the run.
    pub const fn is_locked(self) -> bool {
        matches!(self, RangeState::ReadOnly | RangeState::NoAccess)
    }

    /// Whether pages in this state are reachable by the guest at all in the restricted view
    /// (the guest's default; a sensitive page is not: the VMM acting for the guest treats it
    /// as unreachable whatever the VM's view).
    pub const fn is_exposed(self) -> bool {
        !matches!(View::GUEST.perm(self), Perm::None)
    }

    /// Lower-case name used in dumps ("reserved", "mapped", "read_only", "unmapped",
    /// "sensitive").
    pub const fn name(self) -> &'static str {
        match self {
            RangeState::Reserved => "reserved",
            RangeState::Mapped => "mapped",
            RangeState::ReadOnly => "read_only",
            RangeState::NoAccess => "no_access",
            RangeState::Unmapped => "unmapped",
            RangeState::Sensitive => "sensitive",
        }
    }
}

/// What the guest may do with a page: the permission a backend realises.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Perm {
    /// No access: any load, store or fetch is a violation.
    None,
    /// Loads and fetches; a store is a violation.
    Read,
    /// Every access.
    ReadWrite,
}

impl Perm {
    /// Whether a store is allowed.
    pub const fn writable(self) -> bool {
        matches!(self, Perm::ReadWrite)
    }

    /// Whether a load or fetch is allowed.
    pub const fn readable(self) -> bool {
        !matches!(self, Perm::None)
    }
}

/// A view: the permission every page state gets. The two ASI views differ only for
/// sensitive pages: [`View::RESTRICTED`] (the guest boots in it, [`View::GUEST`]) makes them
/// unreachable, [`View::FULL`] read-write; unmapped pages are unreachable in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    reserved: Perm,
    mapped: Perm,
    read_only: Perm,
    no_access: Perm,
    unmapped: Perm,
    sensitive: Perm,
}

impl View {
    /// ASI's restricted (nonsensitive) address space: reserved and mapped pages read-write,
    /// read-only pages readable, unmapped and sensitive pages unreachable.
    pub const RESTRICTED: View = View {
        reserved: Perm::ReadWrite,
        mapped: Perm::ReadWrite,
        read_only: Perm::Read,
        no_access: Perm::None,
        unmapped: Perm::None,
        sensitive: Perm::None,
    };

    /// ASI's full (sensitive) address space: as [`View::RESTRICTED`], with sensitive pages
    /// read-write.
    pub const FULL: View = View {
        sensitive: Perm::ReadWrite,
        ..View::RESTRICTED
    };

    /// The view the guest boots in and the strictest one: [`View::RESTRICTED`].
    pub const GUEST: View = View::RESTRICTED;

    /// The permission of pages in `state`.
    pub const fn perm(&self, state: RangeState) -> Perm {
        match state {
            RangeState::Reserved => self.reserved,
            RangeState::Mapped => self.mapped,
            RangeState::ReadOnly => self.read_only,
            RangeState::NoAccess => self.no_access,
            RangeState::Unmapped => self.unmapped,
            RangeState::Sensitive => self.sensitive,
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
    pub start: Gpa,
    /// GPA one past the range.
    pub end: Gpa,
    /// State of every page in the range.
    pub state: RangeState,
    /// Memslot that contains the range (None for holes).
    pub slot: Option<u32>,
}

impl RangeInfo {
    /// Number of 4 KiB pages in the range.
    pub const fn pages(&self) -> u64 {
        (self.end.0 - self.start.0) >> PAGE_SHIFT
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
    /// Whether the slot is `KVM_MEM_READONLY` (stores exit as MMIO).
    pub readonly: bool,
}

impl SlotInfo {
    /// The slots of a table keyed by start GPA with `(end, slot id, readonly)` values, in GPA
    /// order.
    pub(crate) fn table(
        by_gpa: &std::collections::BTreeMap<u64, (u64, u32, bool)>,
    ) -> Vec<SlotInfo> {
        by_gpa
            .iter()
            .map(|(&gpa, &(end, slot, readonly))| SlotInfo {
                slot,
                gpa,
                len: end - gpa,
                readonly,
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
    /// Successful locks (mapped pages locked read-only or no-access, `Hc::Protect`).
    pub protect_calls: u64,
    /// Pages locked.
    pub pages_protected: u64,
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
    /// `mprotect` calls on the guest view (the `mprotect` backend; 0 under `slots`), plus the
    /// `mmap`s of `--host-secretmem` (two per move to or from secret memory).
    pub mprotect_calls: u64,
    /// Ranges of distinct protection on the guest view now, each one VMA (`mprotect` backend);
    /// under `--host-secretmem` plus one per secret range (its VMA in the VMM view): a lower
    /// bound, as secret ranges unmapped apart stay apart.
    pub vmas_in_use: u64,
    /// Most such ranges at once.
    pub peak_vmas: u64,
    /// Updates refused (out of RAM, wrong state, out of slots, backend failure).
    pub rejected_updates: u64,
    /// Successful moves of ranges to `Sensitive` (the allocator's `make_sensitive`).
    pub sensitive_calls: u64,
    /// Pages made sensitive.
    pub pages_made_sensitive: u64,
    /// Switches of the VM's view between restricted and full (ASI exits and enters that
    /// changed it).
    pub view_switches: u64,
    /// Ranges toggled by all view switches (one backend call each).
    pub ranges_toggled: u64,
    /// Most ranges one view switch toggled.
    pub max_ranges_toggled: u64,
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
        reserved_end: Gpa,
        /// RAM size.
        ram_size: u64,
    },
    /// The range is empty, wraps or leaves RAM.
    #[error(
        "range [{start:#x}, {end:#x}) is empty, unaligned or not inside RAM [0, {ram_size:#x})"
    )]
    OutOfRam {
        /// First GPA asked for.
        start: Gpa,
        /// End GPA asked for (saturated on overflow).
        end: Gpa,
        /// RAM size.
        ram_size: u64,
    },
    /// A pfn range whose byte addresses do not fit 64 bits.
    #[error("pfn range {pfn:#x} + {count:#x} pages overflows the address space")]
    PfnOverflow {
        /// First pfn asked for.
        pfn: allocator::Pfn,
        /// Pages asked for.
        count: u64,
    },
    /// A page of the range is in a state the update does not accept.
    #[error("cannot {op} [{start:#x}, {end:#x}): page {gpa:#x} is {found}")]
    WrongState {
        /// The update ("unmap", "map", "lock", "zero").
        op: &'static str,
        /// First GPA asked for.
        start: Gpa,
        /// End GPA asked for.
        end: Gpa,
        /// First page in the wrong state.
        gpa: Gpa,
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
    /// `lock_range` was asked for a state that is not a lock.
    #[error("{0} is not a lock (read_only or no_access)")]
    NotALock(RangeState),
    /// The backend failed (KVM errno as a negative number in `Stage2Error::Backend`).
    #[error("stage-2 backend failed: {0:?}")]
    Backend(allocator::Stage2Error),
    /// `--host-secretmem`: the range could not be moved to or from secret memory; nothing
    /// changed. `EAGAIN` from `mmap` is the memlock limit (each view counts).
    #[error("cannot {op} [{start:#x}, {end:#x}): {}", std::io::Error::from_raw_os_error(*errno))]
    SecretMemory {
        /// What failed ("back with memfd_secret", "return to the memfd").
        op: &'static str,
        /// First GPA of the range.
        start: Gpa,
        /// End GPA of the range.
        end: Gpa,
        /// The host's errno.
        errno: i32,
    },
}

impl EngineError {
    /// The allocator-facing error for this failure.
    pub fn to_stage2(&self) -> allocator::Stage2Error {
        match self {
            EngineError::OutOfSlots { .. } => allocator::Stage2Error::OutOfSlots,
            EngineError::Backend(e) => *e,
            EngineError::SecretMemory { errno, .. } => allocator::Stage2Error::Backend(-errno),
            EngineError::OutOfRam { .. } | EngineError::PfnOverflow { .. } => {
                allocator::Stage2Error::Backend(-libc::ERANGE)
            }
            _ => allocator::Stage2Error::Backend(-libc::EINVAL),
        }
    }
}

/// Zeroes guest RAM [gpa, gpa + len) through the VMM's mapping (partial pages written, whole
/// pages released: `MADV_DONTNEED` or a memfd hole), as a stage-2 result.
pub(crate) fn zero_ram(
    ram: &crate::memory::GuestRam,
    gpa: Gpa,
    len: u64,
) -> Result<(), allocator::Stage2Error> {
    ram.zero(gpa.0, len).map_err(|e| match e {
        vm_memory::GuestMemoryError::IOError(io) => {
            allocator::Stage2Error::Backend(-io.raw_os_error().unwrap_or(libc::EIO))
        }
        _ => allocator::Stage2Error::Backend(-libc::ERANGE),
    })
}

/// What a backend has in use (memslots, protected ranges) and the work it did.
#[derive(Serialize, Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BackendUsage {
    /// Calls into the host mechanism (memslot ioctls, including rollbacks after a failure).
    pub memslot_updates: u64,
    /// Memslots created.
    pub slots_created: u64,
    /// Memslots deleted.
    pub slots_deleted: u64,
    /// Memslots that exist now.
    pub memslots_in_use: u64,
    /// Most memslots that existed at once.
    pub peak_memslots: u64,
    /// `mprotect` calls on the guest view (the `mprotect` backend), plus the `mmap`s of
    /// `--host-secretmem`.
    pub mprotect_calls: u64,
    /// Ranges of distinct protection on the guest view now (each is one VMA), plus one per
    /// secret range under `--host-secretmem`.
    pub vmas_in_use: u64,
    /// Most such ranges at once.
    pub peak_vmas: u64,
}

/// Realises a view: makes GPA ranges of guest RAM reachable with a permission.
///
/// A backend starts with every page at [`Perm::None`]; the engine sets the permission of every
/// page before the guest runs. Every call is all-or-nothing: on an error nothing changed.
pub trait Stage2Backend {
    /// The backend's name as `veil run --stage2` spells it ("slots").
    fn name(&self) -> &'static str;
    /// Makes every page of [gpa, gpa + len) (page aligned, inside RAM) reachable with `perm`.
    fn set_perm(&mut self, gpa: Gpa, len: u64, perm: Perm) -> Result<(), EngineError>;
    /// [`Stage2Backend::set_perm`] for several ranges in order, as one update (an ASI view
    /// switch): stops at the first failure and returns how many ranges were applied before it
    /// with the error (the caller puts those back). The `slots` backend parks the other vCPUs
    /// once for the whole batch.
    fn set_perms(&mut self, ranges: &[(Gpa, u64, Perm)]) -> Result<(), (usize, EngineError)> {
        for (i, &(gpa, len, perm)) in ranges.iter().enumerate() {
            self.set_perm(gpa, len, perm).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// Zeroes guest RAM [gpa, gpa + len) without opening it to the guest.
    fn zero(&mut self, gpa: Gpa, len: u64) -> Result<(), allocator::Stage2Error>;
    /// The permission the backend realises at `gpa` now (None outside RAM).
    fn perm_at(&self, gpa: Gpa) -> Option<Perm>;
    /// The memslots in use, in GPA order.
    fn memslots(&self) -> Vec<SlotInfo>;
    /// The memslot that contains `gpa`, if any.
    fn slot_containing(&self, gpa: Gpa) -> Option<SlotInfo>;
    /// Counters of the backend's work.
    fn usage(&self) -> BackendUsage;
    /// Whether the unmapped pages are locked against swap.
    fn lock_stats(&self) -> LockStats {
        LockStats::default()
    }
    /// Checks the backend's own invariants (for tests).
    fn check(&self) -> Result<(), String>;
    /// Like [`Stage2Backend::set_perm`] for a range whose pages all move to state `to`. The
    /// default ignores `to`; the `mprotect` backend under `--host-secretmem` backs `Unmapped`
    /// ranges with secret memory (their old contents are released: they read zero).
    fn set_state(
        &mut self,
        gpa: Gpa,
        len: u64,
        perm: Perm,
        to: RangeState,
    ) -> Result<(), EngineError> {
        let _ = to;
        self.set_perm(gpa, len, perm)
    }
    /// What is in force now over all of RAM, in GPA order, read from the host mechanism (the
    /// kernel's mappings, the record of KVM's slot table), not from the backend's own record of
    /// the permissions it asked for: what reconciliation (`--verify-stage2`) checks.
    fn realised(&self) -> Result<Vec<Realised>, String>;
    /// Whether `Unmapped` pages are backed by secret memory (`--host-secretmem`).
    fn secret_unmapped(&self) -> bool {
        false
    }
    /// Test hook (`Hc::Stage2Tamper`, test harness only): changes the realised permission of
    /// the page at `gpa` behind the engine's back (none becomes read, anything else none) and
    /// returns the permission now in force; [`Stage2Backend::untamper`] puts it back.
    fn tamper(&mut self, gpa: Gpa) -> Result<Perm, String> {
        let _ = gpa;
        Err(format!("the {} backend has no tamper hook", self.name()))
    }
    /// Undoes [`Stage2Backend::tamper`] for the page at `gpa`.
    fn untamper(&mut self, gpa: Gpa) -> Result<(), String> {
        let _ = gpa;
        Err(format!("the {} backend has no tamper hook", self.name()))
    }
}

/// What backs a realised range on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostBacking {
    /// Ordinary memory (the memfd or anonymous RAM) in every view.
    Memory,
    /// `memfd_secret` memory in both views: out of the host kernel's direct map.
    Secret,
    /// The guest view and the VMM view disagree (one secret, one not), or the VMM view is not
    /// read-write.
    Split,
}

/// One range as the host realises it ([`Stage2Backend::realised`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Realised {
    /// First GPA.
    pub start: Gpa,
    /// GPA one past the range.
    pub end: Gpa,
    /// The permission the guest gets.
    pub perm: Perm,
    /// What backs it.
    pub backing: HostBacking,
}

impl<B: Stage2Backend + ?Sized> Stage2Backend for Box<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn set_perm(&mut self, gpa: Gpa, len: u64, perm: Perm) -> Result<(), EngineError> {
        (**self).set_perm(gpa, len, perm)
    }
    fn set_perms(&mut self, ranges: &[(Gpa, u64, Perm)]) -> Result<(), (usize, EngineError)> {
        (**self).set_perms(ranges)
    }
    fn zero(&mut self, gpa: Gpa, len: u64) -> Result<(), allocator::Stage2Error> {
        (**self).zero(gpa, len)
    }
    fn perm_at(&self, gpa: Gpa) -> Option<Perm> {
        (**self).perm_at(gpa)
    }
    fn memslots(&self) -> Vec<SlotInfo> {
        (**self).memslots()
    }
    fn slot_containing(&self, gpa: Gpa) -> Option<SlotInfo> {
        (**self).slot_containing(gpa)
    }
    fn usage(&self) -> BackendUsage {
        (**self).usage()
    }
    fn lock_stats(&self) -> LockStats {
        (**self).lock_stats()
    }
    fn check(&self) -> Result<(), String> {
        (**self).check()
    }
    fn set_state(
        &mut self,
        gpa: Gpa,
        len: u64,
        perm: Perm,
        to: RangeState,
    ) -> Result<(), EngineError> {
        (**self).set_state(gpa, len, perm, to)
    }
    fn realised(&self) -> Result<Vec<Realised>, String> {
        (**self).realised()
    }
    fn secret_unmapped(&self) -> bool {
        (**self).secret_unmapped()
    }
    fn tamper(&mut self, gpa: Gpa) -> Result<Perm, String> {
        (**self).tamper(gpa)
    }
    fn untamper(&mut self, gpa: Gpa) -> Result<(), String> {
        (**self).untamper(gpa)
    }
}

/// A KVM memslot table (the host mechanism under [`Slots`]).
pub trait MemslotTable {
    /// Create memslot `slot` = [gpa, gpa+len) backed at host offset `gpa` of RAM (RAM is one
    /// host mapping; GPA x lives at host_base + x), `KVM_MEM_READONLY` when `readonly`.
    /// len == 0 deletes the slot.
    ///
    /// The caller only creates slots in ids that are free and only deletes existing slots.
    fn set_slot(
        &mut self,
        slot: u32,
        gpa: u64,
        len: u64,
        readonly: bool,
    ) -> Result<(), allocator::Stage2Error>;
    /// Zero guest RAM [gpa, gpa+len) through the host mapping (madvise(MADV_DONTNEED) for
    /// whole pages on the KVM table).
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), allocator::Stage2Error>;
    /// Most memslots this table offers (KVM_CAP_NR_MEMSLOTS for KVM); slot ids are
    /// `0..max_slots()`.
    fn max_slots(&self) -> u32;
    /// Locks [gpa, gpa+len) against swap when it becomes unreachable (`locked`), unlocks it
    /// when it is reachable again. Best effort: the KVM table counts failures (memlock limit);
    /// the default does nothing.
    fn set_locked(&mut self, _gpa: u64, _len: u64, _locked: bool) {}
    /// Whether the unmapped pages are locked against swap.
    fn lock_stats(&self) -> LockStats {
        LockStats::default()
    }
}

#[cfg(test)]
mod asi_tests;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod verify_tests;
