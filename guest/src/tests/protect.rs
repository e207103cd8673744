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
    expect_status(
        hc::protect(gpa, 1, protect::READ_WRITE),
        Status::BadState,
        "unlock",
    )?;
    expect_status(
        hc::protect(gpa, 1, protect::READ_ONLY),
        Status::BadState,
        "lock again",
    )?;
    expect_status(hc::free(gpa, 0), Status::BadState, "free of a locked page")?;
    expect_status(
        hc::host_fill(gpa, PAGE_SIZE, 0),
        Status::BadState,
        "HostFill",
    )?;
    // SAFETY: as above: the lock survived the refused unlock.
    unsafe { dm::store64(dm::va(target), u64::from_ne_bytes([STORED; 8])) };
    expect_bytes(gpa, PAGE_SIZE, BYTE, PAGE_SIZE)?;
    // Tighten to no access: a load is now a violation and reads poison.
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
    let mut buf = [ViolationRecord::default(); MAX_RECORDS];
    let (total, recs) = violations(&mut buf)?;
    ensure!(
        total == 3,
        "{total} violations, expected 2 stores and 1 load"
    );
    let kinds = [recs[0].access, recs[1].access, recs[2].access];
    ensure!(
        kinds == [Access::Write as u8, Access::Write as u8, Access::Read as u8],
        "violation kinds {kinds:?}"
    );
    ensure!(
        recs.iter().all(|r| r.gpa == target),
        "violations not at {target:#x}"
    );
    expect_bytes(gpa, PAGE_SIZE, STORED, 0)?;
    Ok(())
}
