//! `zeroing`: `__GFP_ZERO` works on pages the guest cannot touch, and `init_on_free` (on by
//! default for unmapped pages) wipes them when they are freed.

use crate::ensure;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use veil_abi::{gfp, PAGE_SIZE};

/// Byte planted before the free.
const DIRT: u8 = 0x77;
/// Order of the block used.
const ORDER: u8 = 3;

/// An unmapped `ZERO` allocation arrives zeroed (judged by host assertions, since the guest
/// cannot reach it); freeing it after planting data zeroes it again (`init_on_free`), counted
/// by the allocator.
pub fn zeroing() -> Outcome {
    let pages = 1u64 << ORDER;
    let len = pages * PAGE_SIZE;
    let mut held = PageList::new(1);
    let s0 = hc::stats().ctx("Stats")?;
    let a = held
        .alloc(ORDER, gfp::UNMAPPED | gfp::ZERO)
        .ctx("alloc UNMAPPED|ZERO")?;
    let s1 = hc::stats().ctx("Stats")?;
    let zeroed = s1.pages_zeroed.wrapping_sub(s0.pages_zeroed);
    ensure!(
        zeroed >= pages,
        "UNMAPPED|ZERO order {ORDER}: {zeroed} pages zeroed"
    );
    super::expect_bytes(a, len, 0, len)?;

    hc::host_fill(a, len, DIRT).ctx("HostFill")?;
    held.free_all().ctx("free")?;
    let s2 = hc::stats().ctx("Stats")?;
    let wiped = s2.pages_zeroed.wrapping_sub(s1.pages_zeroed);
    ensure!(
        wiped >= pages,
        "freeing {pages} unmapped pages zeroed {wiped} (init_on_free)"
    );

    // Whatever comes back at that address next holds none of the data.
    let b = held.alloc(ORDER, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    if b == a {
        super::expect_bytes(b, len, DIRT, 0)?;
    }
    held.free_all().ctx("free")?;
    Ok(())
}
