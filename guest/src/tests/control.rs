//! `control_wait`: something for `veil run --control` to look at. Named explicitly
//! (`veil run --tests control_wait`), it makes [`LOADS`] declared stray loads from one
//! unmapped page, then stays alive for [`WAIT_CYCLES`] TSC cycles (about 8 s at this host's
//! 2.45 GHz) with a `Nop` hypercall every [`PACE_CYCLES`], so the VMM keeps seeing exits
//! while a client inspects it; then it frees the page and passes. In the whole suite (not
//! named) it passes at once, doing nothing.

use super::timing::rdtsc;
use super::POISON64;
use crate::boot;
use crate::dm;
use crate::ensure;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use veil_abi::{gfp, Access};

/// Stray loads made before the wait.
pub const LOADS: u64 = 3;
/// How long the test stays alive when named, in TSC cycles.
pub const WAIT_CYCLES: u64 = 20_000_000_000;
/// Cycles between two `Nop` hypercalls while waiting.
pub const PACE_CYCLES: u64 = 250_000;

/// See the module comment.
pub fn control_wait() -> Outcome {
    if !boot::named("control_wait") {
        return Ok(());
    }
    let mut pages = PageList::new(1);
    let gpa = pages.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    hc::expect_violation(gpa, Access::Read, LOADS).ctx("ExpectViolation")?;
    for i in 0..LOADS {
        // SAFETY: a declared stray load: the VMM answers it with poison.
        let (v, _) = unsafe { dm::load64(dm::va(gpa + 8 * i)) };
        ensure!(v == POISON64, "load {i} read {v:#x}, expected poison");
    }
    let _ = hc::log("control_wait: loads done, waiting");
    let start = rdtsc();
    let mut last = start;
    while rdtsc().wrapping_sub(start) < WAIT_CYCLES {
        if rdtsc().wrapping_sub(last) >= PACE_CYCLES {
            hc::nop().ctx("Nop")?;
            last = rdtsc();
        }
        core::hint::spin_loop();
    }
    pages.free_all().ctx("free")?;
    Ok(())
}
