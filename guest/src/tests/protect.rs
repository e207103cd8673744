//! `protect_readonly`: a page the guest locks with `Hc::Protect` stays readable, a store to it
//! is one write violation and is dropped, unlocking (or freeing, or host-filling) it is refused,
//! and a no-access lock on top makes loads violations that read poison. Bad ranges, pages the
//! guest does not own and unknown permissions are errors.

use super::{expect_bytes, violations, MAX_RECORDS, POISON64};
use crate::dm;
use crate::ensure;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use veil_abi::{protect, Access, Status, ViolationRecord, PAGE_SIZE};

/// What the locked page holds.
const BYTE: u8 = 0x3c;
/// What the refused stores try to write.
const STORED: u8 = 0xc7;

fn expect_status(r: Result<(), Status>, want: Status, what: &str) -> Outcome {
    ensure!(r == Err(want), "{what}: got {r:?}, expected {want:?}");
    Ok(())
}

/// The locked page, its stores and loads (the page is never freed: a lock is for the run).
pub fn protect_readonly() -> Outcome {
    let gpa = hc::alloc(0, 0).ctx("alloc")?;
    hc::host_fill(gpa, PAGE_SIZE, BYTE).ctx("HostFill")?;
    let freed = hc::alloc(0, 0).ctx("alloc")?;
    hc::free(freed, 0).ctx("free")?;
    for (r, want, what) in [
        (hc::protect(gpa, 1, 7), Status::BadArgument, "unknown perm"),
        (
            hc::protect(gpa, 0, protect::READ_ONLY),
            Status::BadArgument,
            "0 pages",
        ),
        (
            hc::protect(gpa, u64::MAX, protect::READ_ONLY),
            Status::BadArgument,
            "too many pages",
        ),
        (
            hc::protect(gpa + 8, 1, protect::READ_ONLY),
            Status::BadAddress,
            "misaligned",
        ),
        (
            hc::protect(0x1000, 1, protect::READ_ONLY),
            Status::BadAddress,
            "reserved page",
        ),
        (
            hc::protect(freed, 1, protect::READ_ONLY),
            Status::NotAllocated,
            "free page",
        ),
        (
            hc::protect(gpa, 2, protect::READ_ONLY),
            Status::NotAllocated,
            "page past ours",
        ),
    ] {
        expect_status(r, want, what)?;
    }
    hc::protect(gpa, 1, protect::READ_ONLY).ctx("Protect READ_ONLY")?;
    let target = gpa + 0x80;
    // SAFETY: a load of a page we own, readable under the lock.
    let (v, _) = unsafe { dm::load64(dm::va(target)) };
    ensure!(
        v == u64::from_ne_bytes([BYTE; 8]),
        "locked page reads {v:#x}"
    );
    hc::expect_violation(gpa, Access::Write, 2).ctx("ExpectViolation write")?;
    // SAFETY: an expected store to a read-only page: the VMM drops it.
    unsafe { dm::store64(dm::va(target), u64::from_ne_bytes([STORED; 8])) };
    // Unlocking, locking again, freeing and a host fill are all refused.
    expect_locked(gpa)?;
    expect_status(hc::free(gpa, 0), Status::BadState, "free of a locked page")?;
    expect_status(
        hc::host_fill(gpa, PAGE_SIZE, 0),
        Status::BadState,
        "HostFill",
    )?;
    // SAFETY: as above: the lock survived the refused unlock.
    unsafe { dm::store64(dm::va(target), u64::from_ne_bytes([STORED; 8])) };
    expect_bytes(gpa, PAGE_SIZE, BYTE, PAGE_SIZE)?;
    tighten_to_no_access(gpa, target)?;
    expect_records(target, &[Access::Write, Access::Write, Access::Read])?;
    expect_bytes(gpa, PAGE_SIZE, STORED, 0)?;
    Ok(())
}

/// The read-only locked page at `gpa` can be neither unlocked nor locked read-only again.
fn expect_locked(gpa: u64) -> Outcome {
    expect_status(
        hc::protect(gpa, 1, protect::READ_WRITE),
        Status::BadState,
        "unlock",
    )?;
    expect_status(
        hc::protect(gpa, 1, protect::READ_ONLY),
        Status::BadState,
        "lock again",
    )
}

/// Tightens the read-only locked page at `gpa` to no access: loosening it back is refused,
/// and a load at `target` is a declared read violation that reads poison.
fn tighten_to_no_access(gpa: u64, target: u64) -> Outcome {
    hc::protect(gpa, 1, protect::NO_ACCESS).ctx("Protect NO_ACCESS")?;
    expect_status(
        hc::protect(gpa, 1, protect::READ_ONLY),
        Status::BadState,
        "loosen",
    )?;
    hc::expect_violation(gpa, Access::Read, 1).ctx("ExpectViolation read")?;
    // SAFETY: an expected load of a no-access page: the VMM answers it with poison.
    let (v, _) = unsafe { dm::load64(dm::va(target)) };
    ensure!(
        v == POISON64,
        "no-access page reads {v:#x}, expected poison"
    );
    Ok(())
}

/// The test's violations are exactly `kinds`, in order, all at `target`.
fn expect_records(target: u64, kinds: &[Access]) -> Outcome {
    let mut buf = [ViolationRecord::default(); MAX_RECORDS];
    let (total, recs) = violations(&mut buf)?;
    ensure!(
        total == kinds.len() as u64 && recs.len() == kinds.len(),
        "{total} violations, expected {}",
        kinds.len()
    );
    for (r, &k) in recs.iter().zip(kinds) {
        ensure!(
            r.access == k as u8 && r.gpa == target,
            "violation {:?} at {:#x}, expected {k:?} at {target:#x}",
            r.access,
            r.gpa
        );
    }
    Ok(())
}

/// What the locked image page holds: not a value a planted secret byte takes (0x10..=0x9f),
/// so the reachability routes' scan of reserved memory passes over the page quickly.
const IMAGE_BYTE: u8 = 0xe1;

/// One page of the image's `.rodata` that only `protect_image` uses: page-aligned and a page
/// long, so locking its page locks nothing else.
#[repr(C, align(4096))]
struct ImagePage([u8; PAGE_SIZE as usize]);

/// The page `protect_image` locks (the image is identity-mapped: its address is its GPA).
static IMAGE_PAGE: ImagePage = ImagePage([IMAGE_BYTE; PAGE_SIZE as usize]);

extern "C" {
    /// First page after the loaded image (the linker script's `__image_end`).
    static __image_end: u8;
}

/// `protect_image`: the guest locks a page of its own `.rodata` (Heki's locked kernel data):
/// it stays readable, a store to it is a declared violation and is dropped, as is a PV MSR
/// that would have KVM write there, a hypercall result written there is refused, unlocking and loosening are refused, a no-access lock on
/// top makes loads violations. Reserved pages that are not the image (the VMM's structures,
/// the mailbox, the stack, the free low pages, the padding after the image) and ranges that
/// run out of the image are refused, as are unknown permissions.
pub fn protect_image() -> Outcome {
    let info = crate::boot::info();
    let gpa = core::ptr::addr_of!(IMAGE_PAGE) as u64;
    // Only the symbol's address is taken (no read).
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    ensure!(
        gpa.is_multiple_of(PAGE_SIZE) && gpa >= veil_abi::IMAGE_MIN_GPA && gpa < image_end,
        "image page at {gpa:#x} is not a page of the image"
    );
    let mut refused = [
        (hc::protect(gpa, 1, 7), Status::BadArgument, "unknown perm"),
        (
            hc::protect(gpa + 8, 1, protect::READ_ONLY),
            Status::BadAddress,
            "misaligned",
        ),
        (
            hc::protect(gpa, 1, protect::READ_WRITE),
            Status::BadState,
            "unlock",
        ),
        (
            hc::protect(
                gpa,
                (info.reserved_end - gpa) / PAGE_SIZE + 1,
                protect::READ_ONLY,
            ),
            Status::BadAddress,
            "range running out of reserved memory",
        ),
        (
            hc::protect(0, 1, protect::READ_ONLY),
            Status::BadAddress,
            "TSS",
        ),
        (
            hc::protect(veil_abi::GDT_GPA, 1, protect::NO_ACCESS),
            Status::BadAddress,
            "GDT",
        ),
        (
            hc::protect(veil_abi::BOOT_INFO_GPA, 1, protect::READ_ONLY),
            Status::BadAddress,
            "BootInfo",
        ),
        (
            hc::protect(0x3000, 1, protect::READ_ONLY),
            Status::BadAddress,
            "free low page",
        ),
        (
            hc::protect(info.mailbox_gpa, 1, protect::READ_ONLY),
            Status::BadAddress,
            "mailbox",
        ),
        (
            hc::protect(info.stack_top - PAGE_SIZE, 1, protect::READ_ONLY),
            Status::BadAddress,
            "stack",
        ),
        (
            hc::protect(veil_abi::PAGE_TABLES_GPA, 1, protect::READ_ONLY),
            Status::BadAddress,
            "page tables",
        ),
        (
            hc::protect(veil_abi::IMAGE_MIN_GPA - PAGE_SIZE, 2, protect::READ_ONLY),
            Status::BadAddress,
            "range starting in the page tables",
        ),
        // Filled in below when the image ends before reserved memory does.
        (
            Err(Status::BadAddress),
            Status::BadAddress,
            "padding after the image",
        ),
    ];
    if image_end < info.reserved_end {
        refused[12].0 = hc::protect(image_end, 1, protect::READ_ONLY);
    }
    for (r, want, what) in refused {
        expect_status(r, want, what)?;
    }

    hc::protect(gpa, 1, protect::READ_ONLY).ctx("Protect READ_ONLY on the image")?;
    let target = gpa + 0x40;
    let want = u64::from_ne_bytes([IMAGE_BYTE; 8]);
    // SAFETY: a load of our own image page, readable under the lock.
    let (v, _) = unsafe { dm::load64(dm::va(target)) };
    ensure!(v == want, "locked image page reads {v:#x}");
    hc::expect_violation(gpa, Access::Write, 2).ctx("ExpectViolation write")?;
    // SAFETY: an expected store to a page stage 2 makes read-only: the VMM drops it, so the
    // static's bytes never change.
    unsafe { dm::store64(dm::va(target), u64::from_ne_bytes([STORED; 8])) };
    // Nor can KVM be made to write there for the guest: the wall-clock MSR names the page,
    // the VMM records the write and drops it (KVM never learns the GPA).
    // SAFETY: a `wrmsr` of a PV MSR the VMM filters; no #GP (the VMM answers it).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") MSR_KVM_WALL_CLOCK_NEW, in("eax") target as u32,
                         in("edx") (target >> 32) as u32, options(nostack));
    }
    // SAFETY: as above.
    let (v, _) = unsafe { dm::load64(dm::va(target)) };
    ensure!(v == want, "the dropped store changed the page: {v:#x}");
    // The VMM writes no hypercall result there either.
    // SAFETY: the VMM must refuse to write at `gpa` (locked read-only).
    let r = unsafe { hc::raw(veil_abi::Hc::Stats as u32, gpa, 0, 0, 0) };
    expect_status(
        hc::status(r.status),
        Status::BadAddress,
        "Stats into the locked page",
    )?;
    expect_locked(gpa)?;
    tighten_to_no_access(gpa, target)?;
    expect_records(target, &[Access::Write, Access::Write, Access::Read])
}

/// KVM's wall-clock MSR (new numbering): KVM writes the wall clock at the GPA written to it.
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
