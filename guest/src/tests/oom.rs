//! `oom`: exhausting memory fails cleanly, and freeing everything restores the free count.

use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use crate::{ensure, fail, println, skip};
use veil_abi::{gfp, Status};

/// Most allocations held at once (order 10 first, so 64 GiB of RAM fits).
const MAX_HELD: usize = 20 * 1024;

/// Whether `s` is an acceptable "out of memory" answer.
fn is_exhausted(s: Status) -> bool {
    matches!(s, Status::NoMemory | Status::NoFreePageblock)
}

/// Allocates with `gfp` from order 10 down to 0 until even order 0 fails.
fn drain(held: &mut PageList, gfp: u64) -> Outcome {
    let mut order = 10u8;
    loop {
        if held.is_full() {
            skip!("more than {MAX_HELD} allocations needed to exhaust RAM");
        }
        match held.alloc(order, gfp) {
            Ok(_) => {}
            Err(s) if is_exhausted(s) && order > 0 => order -= 1,
            Err(s) if is_exhausted(s) => return Ok(()),
            Err(s) => fail!("order-{order} allocation (gfp {gfp:#x}) failed with {s:?}"),
        }
    }
}

/// Allocate everything (mapped, then unmapped), check the failures, free all, compare counts.
pub fn oom() -> Outcome {
    let s0 = hc::stats().ctx("Stats")?;
    let mut held = PageList::new(MAX_HELD);
    drain(&mut held, 0)?;
    drain(&mut held, gfp::UNMAPPED)?;
    let s1 = hc::stats().ctx("Stats")?;
    println!(
        "veil-guest: oom after {} allocations, {} pages free",
        held.len(),
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
