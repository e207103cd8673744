//! `inject`: under `--on-violation inject`, a stray load, a stray store and a 16-byte load (two
//! exits, one instruction) each get their usual answer (poison, dropped) and one #VE, whose
//! handler counts it; the mailbox names the GPA, kind and RIP, and the guest runs on past each
//! access. Under any other policy the same load and store raise no #VE.
//! `violation_latency` (any policy): the cycles one violating load costs under the policy in
//! force, logged for the benchmark (report against inject).

use core::sync::atomic::Ordering;

use super::timing::rdtsc;
use super::{expect_secret, POISON64};
use crate::dm;
use crate::ensure;
use crate::hc;
use crate::idt::VE_COUNT;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use veil_abi::{gfp, Access, VeInfo, PAGE_SIZE, VE_INFO_OFFSET};

/// Violating loads timed by `violation_latency`.
const LOADS: u64 = 200;

/// The [`VeInfo`] the VMM wrote into this vCPU's mailbox.
fn ve_info() -> VeInfo {
    let at = crate::boot::info().mailbox_gpa + VE_INFO_OFFSET;
    // SAFETY: the mailbox page is reserved memory, identity-mapped; the VMM writes it only
    // while this vCPU is stopped in an exit.
    unsafe { core::ptr::read_volatile(at as *const VeInfo) }
}

/// A stray load and a stray store under `inject`: one #VE each, the mailbox describes each,
/// and execution continues after the access.
pub fn inject() -> Outcome {
    let mut pages = PageList::new(1);
    let p = pages.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    hc::plant_secret(p, PAGE_SIZE).ctx("PlantSecret")?;
    hc::expect_violation(p, Access::Read, 1).ctx("ExpectViolation")?;
    hc::expect_violation(p, Access::Write, 1).ctx("ExpectViolation")?;
    let n0 = VE_COUNT.load(Ordering::Relaxed);
    if hc::violation_policy().ctx("ViolationPolicy")? != 1 {
        // Under report (or kill, which answers declared violations as report): no #VE.
        // SAFETY: expected stray accesses: poison, a dropped store.
        let (v, _) = unsafe { dm::load64(dm::va(p) + 0x10) };
        // SAFETY: as above.
        unsafe { dm::store64(dm::va(p) + 0x20, 0x4242) };
        let n = VE_COUNT.load(Ordering::Relaxed) - n0;
        ensure!(
            v == POISON64 && n == 0,
            "without inject: read {v:#x}, {n} #VE"
        );
        expect_secret(p, PAGE_SIZE)?;
        pages.free_all().ctx("free")?;
        return Ok(());
    }
    let c0 = ve_info().count;

    // SAFETY: an expected stray load: poison, then a #VE.
    let (v, load) = unsafe { dm::load64(dm::va(p) + 0x10) };
    let after_load = VE_COUNT.load(Ordering::Relaxed);
    let i = ve_info();
    ensure!(v == POISON64, "the load read {v:#x}, expected poison");
    ensure!(
        after_load == n0 + 1,
        "{} #VE after the load, expected 1",
        after_load - n0
    );
    ensure!(
        i.count == c0 + 1
            && i.gpa == p + 0x10
            && i.access == Access::Read as u64
            && load.matches(i.rip),
        "mailbox after the load: {i:?}, expected gpa {:#x}, read, rip {:#x}",
        p + 0x10,
        load.start
    );

    // SAFETY: an expected stray store: dropped, then a #VE.
    let store = unsafe { dm::store64(dm::va(p) + 0x20, 0x4242) };
    let after_store = VE_COUNT.load(Ordering::Relaxed);
    let i = ve_info();
    ensure!(
        after_store == n0 + 2,
        "{} #VE after both, expected 2",
        after_store - n0
    );
    ensure!(
        i.count == c0 + 2
            && i.gpa == p + 0x20
            && i.access == Access::Write as u64
            && store.matches(i.rip),
        "mailbox after the store: {i:?}, expected gpa {:#x}, write, rip {:#x}",
        p + 0x20,
        store.end
    );
    // A 16-byte load is two 8-byte exits but one instruction: one #VE, after both halves.
    hc::expect_violation(p, Access::Read, 2).ctx("ExpectViolation")?;
    // SAFETY: an expected stray load: poison in both halves, then a #VE.
    let (v2, wide) = unsafe { dm::load128(dm::va(p) + 0x40) };
    let after_wide = VE_COUNT.load(Ordering::Relaxed);
    let i = ve_info();
    ensure!(
        v2 == [POISON64; 2],
        "the 16-byte load read {v2:x?}, expected poison"
    );
    ensure!(
        after_wide == n0 + 3,
        "{} #VE after the 16-byte load, expected 3 in all",
        after_wide - n0
    );
    ensure!(
        i.count == c0 + 3 && i.gpa == p + 0x40 && wide.matches(i.rip),
        "mailbox after the 16-byte load: {i:?}"
    );
    expect_secret(p, PAGE_SIZE)?;
    hc::logf(format_args!(
        "inject: 4 violation exits, 3 #VE counted by the handler, mailbox count {}",
        i.count
    ));
    pages.free_all().ctx("free")?;
    Ok(())
}

/// The cost of one violating load under the policy in force (logged; no verdict on speed).
pub fn violation_latency() -> Outcome {
    // Under kill the declared loads are answered as under report.
    let policy = hc::violation_policy().ctx("ViolationPolicy")?;
    let mut pages = PageList::new(1);
    let p = pages.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    hc::expect_violation(p, Access::Read, LOADS).ctx("ExpectViolation")?;
    let n0 = VE_COUNT.load(Ordering::Relaxed);
    let t0 = rdtsc();
    for i in 0..LOADS {
        // SAFETY: expected stray loads.
        let (v, _) = unsafe { dm::load64(dm::va(p) + (i % 512) * 8) };
        ensure!(v == POISON64, "load {i} read {v:#x}");
    }
    let cycles = rdtsc().wrapping_sub(t0) / LOADS;
    let ves = VE_COUNT.load(Ordering::Relaxed) - n0;
    let want = if policy == 1 { LOADS } else { 0 };
    ensure!(ves == want, "{ves} #VE for {LOADS} loads, expected {want}");
    let name = ["report", "inject", "kill"][policy.min(2) as usize];
    hc::logf(format_args!(
        "violation latency ({name}): {cycles} cycles per violating load over {LOADS}"
    ));
    pages.free_all().ctx("free")?;
    Ok(())
}
