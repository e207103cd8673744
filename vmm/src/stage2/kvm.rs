//! [`KvmSlots`]: memslots realised with `KVM_SET_USER_MEMORY_REGION` on a real VM.

use std::sync::Arc;
use std::time::Instant;

use allocator::Stage2Error;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use serde::Serialize;

use super::MemslotTable;
use crate::addr::{Gpa, HostAddr};
use crate::memory::GuestRam;

/// Time spent in `set_slot` calls (KVM ioctls).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SlotTiming {
    /// Calls timed.
    pub calls: u64,
    /// Total nanoseconds.
    pub total_ns: u64,
    /// Slowest call in nanoseconds.
    pub max_ns: u64,
}

/// Memslots of a KVM VM whose RAM is one [`GuestRam`] mapping: GPA x lives at `host_base + x`.
///
/// The table holds the RAM (an `Arc`) for as long as it holds the VM, so the mapping every
/// memslot points into outlives the VM's slots; zeroing relies on `MADV_DONTNEED` giving that
/// private anonymous memory back as zero pages.
pub struct KvmSlots {
    // Declared before `ram` so the VM (and its memslots) is dropped before the mapping.
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    host_base: u64,
    ram_size: u64,
    max_slots: u32,
    timing: SlotTiming,
    durations_ns: Vec<u32>,
    keep_durations: bool,
    lock: LockStats,
    lock_unmapped: bool,
}

impl KvmSlots {
    /// The memslot table of `vm` over `ram` (GPA 0 at the start of the mapping), with slot
    /// ids `0..max_slots`.
    pub fn new(vm: Arc<VmFd>, ram: Arc<GuestRam>, max_slots: u32) -> Self {
        KvmSlots {
            vm,
            host_base: ram.host_base(),
            ram_size: ram.size(),
            ram,
            max_slots,
            timing: SlotTiming::default(),
            durations_ns: Vec::new(),
            keep_durations: false,
            lock: LockStats::default(),
            lock_unmapped: true,
        }
    }

    /// Host address of GPA (for dumps).
    pub fn host_addr(&self, gpa: Gpa) -> HostAddr {
        HostAddr(self.host_base + gpa.0)
    }

    /// The guest RAM the slots point into.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Size of RAM.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Time spent in memslot ioctls so far.
    pub fn timing(&self) -> SlotTiming {
        self.timing
    }

    /// Whether unmapped ranges are locked against swap (default on; `veil replay --kvm` turns
    /// it off: it holds no guest data, and the lock calls would distort its timings).
    pub fn lock_unmapped(&mut self, on: bool) {
        self.lock_unmapped = on;
    }

    /// Keeps every `set_slot` duration (for medians; see [`KvmSlots::durations_ns`]).
    pub fn keep_durations(&mut self, on: bool) {
        self.keep_durations = on;
    }

    /// Every kept `set_slot` duration in nanoseconds, in call order.
    pub fn durations_ns(&self) -> &[u32] {
        &self.durations_ns
    }

    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.ram_size)
    }
}

fn errno_of(e: kvm_ioctls::Error) -> Stage2Error {
    Stage2Error::Backend(-e.errno())
}

impl MemslotTable for KvmSlots {
    fn set_slot(
        &mut self,
        slot: u32,
        gpa: u64,
        len: u64,
        readonly: bool,
    ) -> Result<(), Stage2Error> {
        if !self.in_ram(gpa, len) {
            return Err(Stage2Error::Backend(-libc::ERANGE));
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: self.host_base + gpa,
        };
        let t0 = Instant::now();
        // SAFETY: the region lies inside [host_base, host_base + ram_size) (checked above), the
        // mapping of `self.ram`, which this table keeps alive for as long as it keeps the VM
        // (fields drop in order: `vm` first) and which Rust code only touches through
        // vm-memory's volatile accessors; the backend only creates slots in free ids and never
        // overlapping another slot (KVM rejects overlaps itself with EEXIST).
        let r = unsafe { self.vm.set_user_memory_region(region) };
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.timing.calls += 1;
        self.timing.total_ns += ns;
        self.timing.max_ns = self.timing.max_ns.max(ns);
        if self.keep_durations {
            self.durations_ns
                .push(u32::try_from(ns).unwrap_or(u32::MAX));
        }
        r.map_err(errno_of)
    }

    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), Stage2Error> {
        super::zero_ram(&self.ram, Gpa(gpa), len)
    }

    fn max_slots(&self) -> u32 {
        self.max_slots
    }

    fn lock_stats(&self) -> LockStats {
        self.lock
    }

    fn set_locked(&mut self, gpa: u64, len: u64, locked: bool) {
        if !self.lock_unmapped || !self.in_ram(gpa, len) || len == 0 {
            return;
        }
        // SAFETY: [gpa, gpa + len) lies inside the RAM mapping of `self.ram` (checked above).
        unsafe { crate::memory::set_locked(self.host_base + gpa, len, locked, &mut self.lock) };
    }
}

/// Whether the unmapped pages are locked against swap (`mlock2(MLOCK_ONFAULT)` on every range
/// as it is unmapped, `munlock` as it is mapped again).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LockStats {
    /// Bytes of unmapped RAM locked now (bytes locked minus bytes mapped again; a lower bound
    /// once some lock failed, since mapping a range whose lock failed also subtracts).
    pub locked_bytes: u64,
    /// Most bytes locked at once.
    pub peak_locked_bytes: u64,
    /// Bytes unmapped whose locking failed (over `RLIMIT_MEMLOCK`): these may be swapped.
    pub failed_bytes: u64,
    /// errno of the last failed lock (`ENOMEM`/`EPERM`: the memlock limit).
    pub errno: Option<i32>,
}

impl LockStats {
    /// Whether every unmapped range was locked.
    pub fn held(&self) -> bool {
        self.failed_bytes == 0
    }
}
