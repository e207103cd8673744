//! Hypercalls on the guest's memory: allocate, free and allocator statistics.

use allocator::{AllocError, Allocation, BuddyContext, FreeError, Gfp, MAX_ORDER};
use veil_abi::{protect, AllocStats, Status, PAGE_SIZE};
use vm_memory::ByteValued;

use super::Session;
use crate::addr::{Gpa, Pfn};
use crate::stage2::{EngineError, RangeState};

fn alloc_status(e: AllocError) -> Status {
    match e {
        AllocError::InvalidOrder(_) => Status::BadOrder,
        AllocError::InvalidFlags => Status::BadFlags,
        AllocError::OutOfMemory { .. } => Status::NoMemory,
        AllocError::NoFreePageblock { .. } => Status::NoFreePageblock,
        AllocError::WouldBlock { .. } => Status::WouldBlock,
        AllocError::Stage2(_) => Status::Stage2Failed,
        _ => Status::NoMemory,
    }
}

fn free_status(e: FreeError) -> Status {
    match e {
        FreeError::OutOfRange => Status::BadAddress,
        FreeError::Misaligned => Status::Misaligned,
        FreeError::InvalidOrder => Status::BadOrder,
        FreeError::NotAllocated => Status::NotAllocated,
        FreeError::WrongOrder { .. } => Status::WrongOrder,
        _ => Status::BadArgument,
    }
}

fn order_arg(v: u64) -> Result<u8, Status> {
    if v > u64::from(MAX_ORDER) {
        Err(Status::BadOrder)
    } else {
        Ok(v as u8)
    }
}

fn gfp_arg(v: u64) -> Result<Gfp, Status> {
    u32::try_from(v)
        .ok()
        .and_then(Gfp::from_bits)
        .ok_or(Status::BadFlags)
}

impl Session {
    pub(super) fn hc_alloc(
        &mut self,
        ctx: Option<u64>,
        gfp: u64,
        order: u64,
    ) -> Result<u64, Status> {
        let order = order_arg(order)?;
        let gfp = gfp_arg(gfp)?;
        let r: Result<Allocation, AllocError> = match ctx {
            None => self.alloc.alloc_pages(self.cpu.index, gfp, order),
            Some(c) => {
                let ctx = BuddyContext::from_u64(c).ok_or(Status::BadFlags)?;
                self.alloc
                    .alloc_pages_special(self.cpu.index, ctx, gfp, order)
            }
        };
        let a = r.map_err(alloc_status)?;
        // The ABI answers a raw GPA; managed frames always have one.
        let gpa = Pfn::new(a.pfn).ok_or(Status::BadAddress)?.gpa();
        self.mermap_note_alloc(gpa, a.order);
        Ok(gpa.raw())
    }

    pub(super) fn hc_free(&mut self, gpa: Gpa, order: u64) -> Result<u64, Status> {
        let order = order_arg(order)?;
        if !gpa.is_page_aligned() {
            return Err(Status::Misaligned);
        }
        if gpa < self.reserved_end || gpa.raw() >= self.ram.size() {
            return Err(Status::BadAddress);
        }
        // Locked pages stay allocated for the rest of the run (a lock has no way back).
        let end = Gpa(gpa
            .raw()
            .saturating_add(PAGE_SIZE << order)
            .min(self.ram.size()));
        if self.engine(|e| e.ranges_in(gpa, end).iter().any(|r| r.state.is_locked())) {
            return Err(Status::BadState);
        }
        // A page a mermap window shows live stays allocated; stale window mappings go first.
        self.mermap_before_free(gpa, end)?;
        self.alloc
            .free_pages(self.cpu.index, gpa.pfn().raw(), order)
            .map_err(free_status)?;
        self.mermap_note_free(gpa);
        Ok(0)
    }

    /// `Hc::Protect`: locks pages the guest owns, or pages of its own image, read-only or
    /// no-access, for good (a range is wholly one or the other).
    pub(super) fn hc_protect(&mut self, gpa: Gpa, pages: u64, perm: u64) -> Result<u64, Status> {
        let to = match perm {
            protect::READ_ONLY => RangeState::ReadOnly,
            protect::NO_ACCESS => RangeState::NoAccess,
            protect::READ_WRITE => return Err(Status::BadState),
            _ => return Err(Status::BadArgument),
        };
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or(Status::BadArgument)?;
        if !gpa.is_page_aligned() {
            return Err(Status::BadAddress);
        }
        if gpa < self.reserved_end {
            self.check_image(gpa, len)?;
        } else {
            self.check_owned(gpa, len)?;
        }
        match self.alloc.with_stage2(|e| e.lock_range(gpa, len, to)) {
            Ok(()) => Ok(0),
            Err(EngineError::WrongState { .. }) => Err(Status::BadState),
            Err(EngineError::OutOfRam { .. }) => Err(Status::BadAddress),
            Err(_) => Err(Status::Stage2Failed),
        }
    }

    pub(super) fn hc_stats(&mut self, ptr: Gpa) -> Result<u64, Status> {
        // O(CPUs), not the snapshot's walk over every page: a guest may call this often.
        let snap = self.alloc.quick_stats();
        let c = self.engine(|e| e.counters());
        let stats = AllocStats {
            free_pages: snap.free_pages,
            managed_pages: snap.managed_pages,
            flips_to_unmapped: snap.flips_to_unmapped,
            flips_to_mapped: snap.flips_to_mapped,
            stage2_unmap_calls: snap.stage2_unmap_calls,
            stage2_map_calls: snap.stage2_map_calls,
            stage2_zero_calls: snap.stage2_zero_calls,
            pages_zeroed: snap.pages_zeroed,
            memslot_updates: c.memslot_updates,
            memslots_in_use: c.memslots_in_use,
            violations: self.violations_total,
        };
        self.write_buf(ptr, StatsBytes(stats).as_slice())?;
        Ok(0)
    }
}

/// An [`AllocStats`] as plain bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct StatsBytes(AllocStats);
// SAFETY: AllocStats is repr(C) and made of eleven u64: no padding, any bit pattern valid.
unsafe impl ByteValued for StatsBytes {}

const _: () = assert!(std::mem::size_of::<AllocStats>() == 88);
