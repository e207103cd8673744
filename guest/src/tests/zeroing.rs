//! `zeroing`: `__GFP_ZERO` works on pages the guest cannot touch, and `init_on_free` (on by
//! default for unmapped pages) makes a freed unmapped page zero before anyone is handed it
//! again. The VMM's allocator is a `Zone`: a freed unmapped block of order <= 3 waits in the
//! CPU's cache *dirty* and is zeroed when it leaves the cache (here: the next allocation of its
//! order and freetype); until then it belongs to no one, so no hypercall reaches it.

use crate::ensure;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use veil_abi::{gfp, Status, PAGE_SIZE};

/// Byte planted before the free.
const DIRT: u8 = 0x77;
/// Order of the block used (cached by the zone: orders 0..=3).
const ORDER: u8 = 3;

/// An unmapped `ZERO` allocation arrives zeroed (judged by host assertions, since the guest
/// cannot reach it); after planting data and freeing it, the host calls refuse the free
/// block, and the allocation that gets it back finds it zeroed (counted by the allocator).
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
    // Freed (perhaps still dirty in the cache): no host call reads or writes it for the guest.
    ensure!(
        hc::host_count(a, len, DIRT) == Err(Status::NotAllocated),
        "HostCount over the freed block was not refused"
    );
    ensure!(
        hc::host_expect(a, len, u64::from(DIRT), 0) == Err(Status::NotAllocated),
        "HostExpect over the freed block was not refused"
    );

    // The cache is LIFO: the next allocation of this order and freetype gets the block back,
    // zeroed on its way out of the cache (or at the free), and none of the data.
    let b = held.alloc(ORDER, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    let s2 = hc::stats().ctx("Stats")?;
    ensure!(b == a, "got {b:#x} back, not the freed block {a:#x}");
    let wiped = s2.pages_zeroed.wrapping_sub(s1.pages_zeroed);
    ensure!(
        wiped >= pages,
        "freeing {pages} unmapped pages and taking them back zeroed {wiped} (init_on_free)"
    );
    super::expect_bytes(b, len, 0, len)?;
    held.free_all().ctx("free")?;
    Ok(())
}
