//! Hypercall arguments that point into guest memory: buffers in reserved memory, text,
//! test names, and ranges of pages the guest owns. Buffers are read and written through the
//! stage-2-checked [`crate::guest_view::GuestView`].

use veil_abi::{Status, BOOT_INFO_GPA, IMAGE_MIN_GPA, PAGE_SIZE, PAGE_TABLES_GPA};

use super::{Session, MAX_HOST_RANGE, MAX_TEXT};
use crate::addr::{Gpa, Pfn};

/// Reserved memory the VMM built and relies on, which no hypercall writes into on the guest's
/// behalf: the TSS, GDT and BootInfo pages, and the page-table area. (The guest's own image,
/// stack and mailbox are the guest's business; of those, `Hc::Protect` may lock only the
/// image: see [`Session::check_image`].)
pub const VMM_STRUCTURES: [(Gpa, Gpa); 2] = [
    (Gpa(0), Gpa(BOOT_INFO_GPA + PAGE_SIZE)),
    (Gpa(PAGE_TABLES_GPA), Gpa(IMAGE_MIN_GPA)),
];

impl Session {
    /// Checks that `[ptr, ptr + len)` lies in reserved memory (where guest buffers live).
    pub(super) fn check_buf(&self, ptr: Gpa, len: u64) -> Result<(), Status> {
        match ptr.checked_add(len) {
            Some(end) if end <= self.reserved_end => Ok(()),
            _ => Err(Status::BadAddress),
        }
    }

    /// Reads a guest buffer of at most `max` bytes from reserved memory.
    pub(super) fn read_buf(&self, ptr: Gpa, len: u64, max: u64) -> Result<Vec<u8>, Status> {
        if len > max {
            return Err(Status::BadArgument);
        }
        self.check_buf(ptr, len)?;
        let mut b = vec![0u8; len as usize];
        self.view()
            .read(ptr.raw(), &mut b)
            .map_err(|_| Status::BadAddress)?;
        Ok(b)
    }

    pub(super) fn read_text(&self, ptr: Gpa, len: u64) -> Result<String, Status> {
        let b = self.read_buf(ptr, len, MAX_TEXT)?;
        Ok(String::from_utf8_lossy(&b)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect())
    }

    pub(super) fn read_name(&self, ptr: Gpa, len: u64) -> Result<String, Status> {
        if len == 0 || len > 64 {
            return Err(Status::BadArgument);
        }
        let b = self.read_buf(ptr, len, 64)?;
        let s = String::from_utf8(b).map_err(|_| Status::BadArgument)?;
        if crate::run_types::valid_test_name(&s) {
            Ok(s)
        } else {
            Err(Status::BadArgument)
        }
    }

    /// Checks that a result buffer `[ptr, ptr + len)` lies in reserved memory and does not
    /// overlap [`VMM_STRUCTURES`].
    pub(super) fn check_out_buf(&self, ptr: Gpa, len: u64) -> Result<(), Status> {
        self.check_buf(ptr, len)?;
        let end = Gpa(ptr.raw() + len);
        if len > 0 && VMM_STRUCTURES.iter().any(|&(s, e)| ptr < e && s < end) {
            return Err(Status::BadAddress);
        }
        Ok(())
    }

    /// Writes a result buffer (see [`Session::check_out_buf`]).
    pub(super) fn write_buf(&self, ptr: Gpa, bytes: &[u8]) -> Result<(), Status> {
        self.check_out_buf(ptr, bytes.len() as u64)?;
        self.view()
            .write(ptr.raw(), bytes)
            .map_err(|_| Status::BadAddress)
    }

    /// Checks that every page of `[gpa, gpa + len)` is the guest's own image: a page its ELF
    /// segments were loaded into (page-rounded, bss included, all in `[IMAGE_MIN_GPA,
    /// reserved_end)`). Every other reserved page is refused with `BadAddress`: the VMM's
    /// structures (TSS, GDT, BootInfo, page tables), the mailbox and stack (which the VMM and
    /// the exception path write), the free low pages and the padding after the image.
    pub(super) fn check_image(&self, gpa: Gpa, len: u64) -> Result<(), Status> {
        let end = gpa
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Status::BadAddress)?;
        if self.image.iter().any(|&(s, e)| s <= gpa && end <= e) {
            Ok(())
        } else {
            Err(Status::BadAddress)
        }
    }

    /// Checks that every page of `[gpa, gpa + len)` is allocated to the guest.
    pub(super) fn check_owned(&self, gpa: Gpa, len: u64) -> Result<(), Status> {
        let managed = self.ram.size() - self.reserved_end.raw();
        if len == 0 || len > managed.min(MAX_HOST_RANGE) {
            return Err(Status::BadArgument);
        }
        let end = gpa.checked_add(len).ok_or(Status::BadAddress)?;
        if gpa < self.reserved_end || end.raw() > self.ram.size() {
            return Err(Status::BadAddress);
        }
        let mut pfn = gpa.pfn();
        let last = Gpa(end.raw() - 1).pfn();
        while pfn <= last {
            match self.alloc.allocation_containing(pfn.raw()) {
                // Inside RAM (checked above), so the next frame is one too.
                Some(a) => pfn = Pfn::new(a.pfn + (1u64 << a.order)).ok_or(Status::BadAddress)?,
                None => return Err(Status::NotAllocated),
            }
        }
        Ok(())
    }
}
