//! `unmapped_read_direct`, `unmapped_write_direct`, `unmapped_fetch`: one stray access through
//! the guest's direct map to a page removed from stage 2 is exactly one violation of the right
//! kind at the right GPA; no secret byte reaches the guest and no store lands.

use super::{expect_bytes, expect_secret, the_only_violation, POISON64};
use crate::dm::{self, Site};
use crate::ensure;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use core::arch::asm;
use veil_abi::{context, gfp, Access, Hc, HYPERCALL_PORT, PAGE_SIZE};

/// Offset inside the page of the stray load/store.
const OFFSET: u64 = 0x80;

/// Allocates one unmapped page (through `Alloc` or `AllocSpecial`) and has the VMM plant its
/// secret in it.
fn secret_page(pages: &mut PageList, special: bool) -> Result<u64, crate::outcome::Fail> {
    let gpa = if special {
        let g = hc::alloc_special(context::UNMAPPED, 0, 0).ctx("AllocSpecial UNMAPPED")?;
        pages.push(g, 0);
        g
    } else {
        pages.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?
    };
    hc::plant_secret(gpa, PAGE_SIZE).ctx("PlantSecret")?;
    Ok(gpa)
}

/// Checks that the test saw exactly one violation: `access` at `gpa`, `size` bytes (if given),
/// from the instruction at `site`, with a freetype recorded.
fn expect_one(gpa: u64, access: Access, size: Option<u32>, site: Site) -> Outcome {
    let r = the_only_violation()?;
    ensure!(r.gpa == gpa, "violation at {:#x}, expected {gpa:#x}", r.gpa);
    ensure!(
        r.access == access as u8,
        "violation kind {}, expected {access:?}",
        r.access
    );
    if let Some(size) = size {
        ensure!(r.size == size, "violation size {}, expected {size}", r.size);
    }
    ensure!(
        site.matches(r.rip),
        "violation rip {:#x}, the instruction is at {:#x}..{:#x}",
        r.rip,
        site.start,
        site.end
    );
    ensure!(r.freetype != 0xff, "violation has no freetype");
    let vcpu = crate::boot::info().vcpu;
    ensure!(
        r.vcpu as u32 == vcpu,
        "violation on vCPU {}, we are {vcpu}",
        r.vcpu
    );
    Ok(())
}

/// A host assertion that the whole page still holds the secret (no store landed).
fn secret_intact(gpa: u64) -> Outcome {
    expect_secret(gpa, PAGE_SIZE)
}

/// An 8-byte load through the direct map returns poison, never the secret.
pub fn unmapped_read_direct() -> Outcome {
    let mut pages = PageList::new(1);
    let gpa = secret_page(&mut pages, true)?;
    let target = gpa + OFFSET;
    hc::expect_violation(gpa, Access::Read, 1).ctx("ExpectViolation")?;
    // SAFETY: an expected stray load: the VMM answers it with poison.
    let (v, site) = unsafe { dm::load64(dm::va(target)) };
    ensure!(
        v == POISON64,
        "loaded {v:#x}, expected poison {POISON64:#x}"
    );
    expect_one(target, Access::Read, Some(8), site)?;
    secret_intact(gpa)?;
    pages.free_all().ctx("free")?;
    Ok(())
}

/// An 8-byte store through the direct map is dropped.
pub fn unmapped_write_direct() -> Outcome {
    // Outside the secret's byte range, so a landed store always shows.
    const STORED: u8 = 0xc7;
    let mut pages = PageList::new(1);
    let gpa = secret_page(&mut pages, false)?;
    let target = gpa + OFFSET;
    hc::expect_violation(gpa, Access::Write, 1).ctx("ExpectViolation")?;
    // SAFETY: an expected stray store: the VMM drops it.
    let site = unsafe { dm::store64(dm::va(target), u64::from_ne_bytes([STORED; 8])) };
    expect_one(target, Access::Write, Some(8), site)?;
    secret_intact(gpa)?;
    expect_bytes(gpa, PAGE_SIZE, STORED, 0)?;
    pages.free_all().ctx("free")?;
    Ok(())
}

/// `call`s into the unmapped page through the direct map after registering a recovery point at
/// the instruction after the call (with the current rsp). The VMM records a fetch violation and
/// resumes there; returns the status of `SetRecovery`.
///
/// # Safety
/// `target` must be an address whose fetch stage 2 refuses, so the call never executes anything.
unsafe fn call_with_recovery(target: u64) -> u64 {
    let status: u64;
    // SAFETY: caller's contract; rsp at the recovery point equals rsp before the call (the
    // pushed return address is abandoned below rsp, which is fine without a red zone). Every
    // register the hypercall or the resumption may change is declared.
    unsafe {
        asm!(
            "lea rdi, [rip + 2f]",
            "mov rsi, rsp",
            "mov eax, {set}",
            "out dx, eax",
            "mov {st}, rax",
            "test rax, rax",
            "jnz 2f",
            "call {t}",
            "2:",
            set = const Hc::SetRecovery as u32,
            t = in(reg) target,
            st = out(reg) status,
            in("dx") HYPERCALL_PORT,
            out("rax") _, out("rdi") _, out("rsi") _, out("rcx") _, out("r8") _,
        );
    }
    status
}

/// An instruction fetch from the unmapped page is a Fetch violation; the test resumes at its
/// recovery point.
pub fn unmapped_fetch() -> Outcome {
    let mut pages = PageList::new(1);
    let gpa = secret_page(&mut pages, false)?;
    hc::expect_violation(gpa, Access::Fetch, 1).ctx("ExpectViolation")?;
    let target = dm::va(gpa);
    // SAFETY: `gpa` is unmapped at stage 2: the fetch never executes the secret bytes.
    let st = unsafe { call_with_recovery(target) };
    hc::status(st).ctx("SetRecovery")?;
    // The recovery point is one-shot; clearing it again must not hurt.
    let _ = hc::clear_recovery();
    // A fetch is reported with RIP at the faulting address itself.
    let site = Site {
        start: target,
        end: target,
    };
    expect_one(gpa, Access::Fetch, None, site)?;
    secret_intact(gpa)?;
    pages.free_all().ctx("free")?;
    Ok(())
}
