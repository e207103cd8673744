//! `flip_amortised` and `scrub_on_reuse`: pageblock flips are amortised, and a block that
//! comes back to the direct map never brings its old contents with it.

use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use crate::{ensure, fail, println, skip};
use veil_abi::{gfp, Status, PAGE_SIZE};

/// Order-0 unmapped allocations in `flip_amortised`.
const FLIP_PAGES: usize = 4096;
/// Most stage-2 unmap updates 4096 unmapped pages may cost: 8 pageblocks, plus one if the
/// first block was already partly used.
const MAX_UNMAP_CALLS: u64 = 9;

/// 4096 order-0 unmapped allocations cost at most 9 stage-2 unmap updates; freeing them none.
pub fn flip_amortised() -> Outcome {
    let s0 = hc::stats().ctx("Stats")?;
    if s0.free_pages < FLIP_PAGES as u64 {
        let free = s0.free_pages;
        skip!("needs {FLIP_PAGES} free pages, the VM has {free} (run with more --mem)");
    }
    let mut pages = PageList::new(FLIP_PAGES);
    if let Err(s) = pages.alloc_many(FLIP_PAGES, 0, gfp::UNMAPPED) {
        let i = pages.len();
        fail!("unmapped allocation {i} of {FLIP_PAGES} failed: {s:?}");
    }
    let s1 = hc::stats().ctx("Stats")?;
    let unmaps = s1.stage2_unmap_calls.wrapping_sub(s0.stage2_unmap_calls);
    let flips = s1.flips_to_unmapped.wrapping_sub(s0.flips_to_unmapped);
    let slots = s1.memslot_updates.wrapping_sub(s0.memslot_updates);
    println!("veil-guest: {FLIP_PAGES} unmapped pages: {unmaps} stage-2 unmaps, {flips} flips, {slots} memslot updates");
    ensure!(
        unmaps <= MAX_UNMAP_CALLS,
        "{FLIP_PAGES} unmapped pages cost {unmaps} stage-2 unmap calls (at most {MAX_UNMAP_CALLS})"
    );
    let taken = s0.free_pages.wrapping_sub(s1.free_pages);
    ensure!(
        taken == FLIP_PAGES as u64,
        "free pages dropped by {taken}, allocated {FLIP_PAGES}"
    );

    pages.free_all().ctx("free")?;
    let s2 = hc::stats().ctx("Stats")?;
    let (unmaps, maps) = (
        s2.stage2_unmap_calls.wrapping_sub(s1.stage2_unmap_calls),
        s2.stage2_map_calls.wrapping_sub(s1.stage2_map_calls),
    );
    ensure!(
        unmaps == 0 && maps == 0,
        "freeing made {unmaps} unmap and {maps} map calls"
    );
    let slots = s2.memslot_updates.wrapping_sub(s1.memslot_updates);
    ensure!(slots == 0, "freeing made {slots} memslot updates");
    ensure!(
        s2.free_pages == s0.free_pages,
        "free pages {} after, {} before",
        s2.free_pages,
        s0.free_pages
    );
    hc::check_invariants().ctx("CheckInvariants")?;
    Ok(())
}

/// Unmapped pages filled with a pattern in `scrub_on_reuse`.
const SCRUB_PAGES: usize = 8;
/// The pattern.
const PATTERN: u8 = 0x3c;
/// Mapped allocations `scrub_on_reuse` may hold while waiting for the flip back.
const MAX_HELD: usize = 16 * 1024;

/// Fill unmapped pages with a pattern, free them, allocate mapped memory until their blocks
/// come back mapped, and scan them from the host: no pattern, all zero, and no violation when
/// the guest reads them.
pub fn scrub_on_reuse() -> Outcome {
    let s0 = hc::stats().ctx("Stats")?;
    let mut dirty = [0u64; SCRUB_PAGES];
    {
        let mut secret = PageList::new(SCRUB_PAGES);
        for slot in dirty.iter_mut() {
            *slot = secret.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
            hc::host_fill(*slot, PAGE_SIZE, PATTERN).ctx("HostFill")?;
            super::expect_bytes(*slot, PAGE_SIZE, PATTERN, PAGE_SIZE)?;
        }
        secret.free_all().ctx("free unmapped")?;
    }

    // Take mapped memory, large blocks first, until every dirty page is inside one of ours.
    let mut held = PageList::new(MAX_HELD);
    let mut covered = [false; SCRUB_PAGES];
    let mut order = 10u8;
    while covered.iter().any(|c| !c) {
        ensure!(
            !held.is_full(),
            "held {MAX_HELD} blocks and the dirty pages did not come back"
        );
        match held.alloc(order, 0) {
            Ok(gpa) => {
                let end = gpa + (PAGE_SIZE << order);
                for (c, &p) in covered.iter_mut().zip(dirty.iter()) {
                    *c |= (gpa..end).contains(&p);
                }
            }
            Err(Status::NoMemory | Status::NoFreePageblock) if order > 0 => order -= 1,
            Err(s) => fail!("memory ran out ({s:?}) before the dirty blocks came back mapped"),
        }
    }
    let s1 = hc::stats().ctx("Stats")?;
    ensure!(
        s1.flips_to_mapped > s0.flips_to_mapped,
        "dirty pages came back without a flip to mapped"
    );

    let mut buf = [veil_abi::ViolationRecord::default(); super::MAX_RECORDS];
    for &p in &dirty {
        let left = hc::host_count(p, PAGE_SIZE, PATTERN).ctx("HostCount pattern")?;
        ensure!(left == 0, "{left} pattern bytes survived in {p:#x}");
        let zero = hc::host_count(p, PAGE_SIZE, 0).ctx("HostCount zero")?;
        ensure!(
            zero == PAGE_SIZE,
            "{p:#x} came back with {} non-zero bytes",
            PAGE_SIZE - zero
        );
        // SAFETY: `p` is inside a mapped block this test holds.
        let (v, _) = unsafe { crate::dm::load64(crate::dm::va(p)) };
        ensure!(v == 0, "guest reads {v:#x} at {p:#x}");
    }
    let (total, _) = super::violations(&mut buf)?;
    ensure!(
        total == 0,
        "{total} violations reading pages that should be mapped again"
    );
    held.free_all().ctx("free mapped")?;
    let s2 = hc::stats().ctx("Stats")?;
    ensure!(
        s2.free_pages == s0.free_pages,
        "free pages {} after, {} before",
        s2.free_pages,
        s0.free_pages
    );
    Ok(())
}

/// Most unmapped allocations `atomic_no_flip` may need to use up the free unmapped pages.
const MAX_ATOMIC: usize = 4096;

/// Requests that may not block never flip: `UNMAPPED | ATOMIC` allocations take the free
/// unmapped pages there are, then fail with `WouldBlock` while mapped memory is still free,
/// without a single stage-2 update.
pub fn atomic_no_flip() -> Outcome {
    let s0 = hc::stats().ctx("Stats")?;
    let mut held = PageList::new(MAX_ATOMIC);
    let mut order = 10u8;
    let failure = loop {
        ensure!(
            !held.is_full(),
            "more than {MAX_ATOMIC} free unmapped blocks"
        );
        match held.alloc(order, gfp::UNMAPPED | gfp::ATOMIC) {
            Ok(_) => {}
            Err(_) if order > 0 => order -= 1,
            Err(s) => break s,
        }
    };
    let s1 = hc::stats().ctx("Stats")?;
    let flips = s1.flips_to_unmapped.wrapping_sub(s0.flips_to_unmapped);
    let unmaps = s1.stage2_unmap_calls.wrapping_sub(s0.stage2_unmap_calls);
    let slots = s1.memslot_updates.wrapping_sub(s0.memslot_updates);
    ensure!(
        flips == 0 && unmaps == 0 && slots == 0,
        "atomic requests made {flips} flips, {unmaps} unmap calls, {slots} memslot updates"
    );
    let free = s1.free_pages;
    if free >= 512 {
        ensure!(
            failure == Status::WouldBlock,
            "atomic order-0 unmapped request failed with {failure:?} while {free} pages were free: \
             expected WouldBlock"
        );
    }
    // Without ATOMIC the same request may flip, and succeeds.
    if free >= 512 {
        held.alloc(0, gfp::UNMAPPED)
            .ctx("non-atomic UNMAPPED after WouldBlock")?;
    }
    held.free_all().ctx("free")?;
    hc::check_invariants().ctx("CheckInvariants")?;
    Ok(())
}
