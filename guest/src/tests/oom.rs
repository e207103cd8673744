//! `oom`: exhausting memory fails cleanly, and freeing everything restores the free count.
//!
//! One unmapped page is taken first, so its pageblock is unmapped and partly used: once mapped
//! memory runs out, the rest of that block is free but cannot be flipped, and the failing mapped
//! request must say so (`NoFreePageblock`, the case the kernel reviewers worried about: a
//! request failing while memory is free), not claim that memory is exhausted.

use crate::hc;
use crate::outcome::{Ctx, Fail, Outcome};
use crate::pages::PageList;
use crate::{ensure, fail, println, skip};
use veil_abi::{gfp, Status};

/// Most allocations held at once (order 10 first, so 64 GiB of RAM fits).
const MAX_HELD: usize = 20 * 1024;

/// Whether `s` is an acceptable "out of memory" answer.
fn is_exhausted(s: Status) -> bool {
    matches!(s, Status::NoMemory | Status::NoFreePageblock)
}

/// Allocates with `gfp` from order 10 down to 0 until even order 0 fails; returns that failure.
fn drain(held: &mut PageList, gfp: u64) -> Result<Status, Fail> {
    let mut order = 10u8;
    loop {
        if held.is_full() {
            skip!("more than {MAX_HELD} allocations needed to exhaust RAM");
        }
        match held.alloc(order, gfp) {
            Ok(_) => {}
            Err(s) if is_exhausted(s) && order > 0 => order -= 1,
            Err(s) if is_exhausted(s) => return Ok(s),
            Err(s) => fail!("order-{order} allocation (gfp {gfp:#x}) failed with {s:?}"),
        }
    }
}

/// Allocate everything (mapped, then unmapped), check the failures, free all, compare counts.
pub fn oom() -> Outcome {
    let s0 = hc::stats().ctx("Stats")?;
    let mut held = PageList::new(MAX_HELD);
    held.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    let mapped_failure = drain(&mut held, 0)?;
    let stranded = hc::stats().ctx("Stats")?.free_pages;
    if stranded > 0 {
        ensure!(
            mapped_failure == Status::NoFreePageblock,
            "order-0 mapped request failed with {mapped_failure:?} while {stranded} unmapped pages \
             were free: expected NoFreePageblock"
        );
    }
    drain(&mut held, gfp::UNMAPPED)?;
    let s1 = hc::stats().ctx("Stats")?;
    println!(
        "veil-guest: oom after {} allocations ({} unmapped pages stranded by mapped exhaustion), {} pages free",
        held.len(),
        stranded,
        s1.free_pages
    );
    ensure!(
        s1.free_pages == 0,
        "{} pages still free after exhaustion",
        s1.free_pages
    );
    for (what, gfp, order) in [
        ("mapped order 0", 0, 0),
        ("unmapped order 0", gfp::UNMAPPED, 0),
        ("atomic order 0", gfp::ATOMIC, 0),
        ("mapped order 10", 0, 10),
    ] {
        match hc::alloc(order, gfp) {
            Ok(g) => {
                let _ = hc::free(g, order);
                fail!("{what} allocation succeeded at {g:#x} with no free page");
            }
            Err(s) if is_exhausted(s) || s == Status::WouldBlock => {}
            Err(s) => fail!("{what} allocation failed with {s:?}, expected NoMemory"),
        }
    }
    hc::check_invariants().ctx("CheckInvariants when exhausted")?;
    held.free_all().ctx("free")?;
    let s2 = hc::stats().ctx("Stats")?;
    ensure!(
        s2.free_pages == s0.free_pages,
        "{} pages free after freeing everything, {} before",
        s2.free_pages,
        s0.free_pages
    );
    hc::check_invariants().ctx("CheckInvariants")?;
    Ok(())
}
