//! `stage2_verify` and `sweep`: the VMM's reconciliation of stage 2 catches a page changed
//! behind its engine's back, and a load of one byte of every managed page makes violations on
//! exactly the pages the engine calls unreachable (judged by the VMM, never told to the guest).

use core::arch::asm;

use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use crate::{boot, dm, ensure, println, skip};
use veil_abi::{gfp, Hc, Status, PAGE_SIZE};

/// Reconciliation agrees after ordinary updates, catches a tampered page (and puts it back),
/// and the tamper hook refuses what it must.
pub fn stage2_verify() -> Outcome {
    let mut pages = PageList::new(4);
    let mapped = pages.alloc(0, 0).ctx("alloc")?;
    let unmapped = pages.alloc(0, gfp::UNMAPPED).ctx("alloc unmapped")?;
    hc::verify_stage2().ctx("VerifyStage2 after the updates")?;
    // SAFETY: a store to a mapped page we own.
    unsafe { dm::store64(dm::va(mapped), 0x5eed) };
    // Under --verify-stage2 the VMM catches it as soon as this call returns.
    hc::stage2_tamper(mapped).ctx("Stage2Tamper")?;
    // The VMM must find the closed page, name it and open it again: Ok means it did.
    hc::verify_stage2().ctx("VerifyStage2 with a tampered page")?;
    // SAFETY: a load of our mapped page, open again (a violation here fails the test).
    let (v, _) = unsafe { dm::load64(dm::va(mapped)) };
    ensure!(
        v == 0x5eed,
        "the tampered page reads {v:#x} after it was put back"
    );
    let info = boot::info();
    for (gpa, want, what) in [
        (unmapped, Status::BadState, "an unmapped page"),
        (mapped + 8, Status::Misaligned, "a misaligned address"),
        (
            info.managed_end - PAGE_SIZE,
            Status::NotAllocated,
            "a page not ours",
        ),
        (0x1000, Status::BadAddress, "reserved memory"),
    ] {
        let r = hc::stage2_tamper(gpa);
        ensure!(r == Err(want), "tamper of {what}: {r:?}, expected {want:?}");
    }
    hc::verify_stage2().ctx("VerifyStage2 at the end")?;
    pages.free_all().ctx("free")?;
    Ok(())
}

/// Unmapped pages the sweep allocates (one flip makes a whole pageblock unreachable).
const SWEEP_UNMAPPED: usize = 3;

/// Loads one byte of every page of [start, start + pages * 4 KiB) (a tight loop: ring-0 code is
/// emulated instruction by instruction here).
fn load_every_page(start: u64, pages: u64) {
    if pages == 0 {
        return;
    }
    // SAFETY: every page of the range is in the direct map (stage 1 maps all RAM); a load of a
    // page stage 2 blocks is answered by the VMM (poison) and recorded for the sweep. Only
    // rax, rdi and rcx change.
    unsafe {
        asm!(
            "2:",
            "movzx eax, byte ptr [rdi]",
            "add rdi, 4096",
            "dec rcx",
            "jnz 2b",
            inout("rdi") dm::va(start) => _,
            inout("rcx") pages => _,
            out("rax") _,
            options(nostack, readonly),
        );
    }
}

/// One byte of every managed page: the VMM compares the pages whose loads were violations
/// with the pages its engine makes unreachable (unmapped and locked no-access ones).
pub fn sweep() -> Outcome {
    let mut pages = PageList::new(SWEEP_UNMAPPED);
    for _ in 0..SWEEP_UNMAPPED {
        let g = pages.alloc(0, gfp::UNMAPPED).ctx("alloc unmapped")?;
        // A harness fill the sweep must never read back (its loads get poison).
        hc::host_fill(g, PAGE_SIZE, 0x3b).ctx("HostFill")?;
    }
    let info = boot::info();
    let n = (info.managed_end - info.managed_start) / PAGE_SIZE;
    let e = hc::sweep_end(n);
    ensure!(
        e == Err(Status::BadState),
        "Sweep end with none open: {e:?}"
    );
    let e = hc::aimed(Hc::Sweep, 2, 0, 0, 0);
    ensure!(e == Err(Status::BadArgument), "Sweep op 2: {e:?}");
    match hc::sweep_begin() {
        Err(Status::NoMemory) => {
            // The VMM's warning line says how much the host has.
            pages.free_all().ctx("free")?;
            skip!("loading all {n} managed pages needs more memory than the host has available");
        }
        r => r.ctx("Sweep begin")?,
    }
    let e = hc::sweep_begin();
    ensure!(e == Err(Status::BadState), "a second Sweep begin: {e:?}");
    load_every_page(info.managed_start, n);
    hc::sweep_end(n).ctx("Sweep end")?;
    println!("veil-guest: swept {n} managed pages");
    pages.free_all().ctx("free")?;
    Ok(())
}
