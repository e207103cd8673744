//! ASI at the hypervisor layer: sensitive pages (`gfp::SENSITIVE`) are absent from the
//! restricted view and read-write in the full one. A restricted vCPU's touch is an ASI exit
//! (the VMM switches the VM to the full view and completes the access), `Hc::AsiEnter` goes
//! back (the flush point). The VMM judges each test's ASI exits (`ExpectAsiExit`), its
//! violations (`ExpectViolation`) and its host assertions; stage-2 reconciliation
//! (`VerifyStage2`) checks from the host's own mappings that a sensitive page is really
//! absent while restricted.

use super::{expect_bytes, expect_secret, POISON64};
use crate::dm;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use crate::smp;
use crate::{ensure, fail, skip};
use veil_abi::{gfp, Access, AsiStats, Status, PAGEBLOCK_SIZE, PAGE_SIZE};

/// The byte the VMM fills sensitive pages with before the guest reads them.
const FILL: u8 = 0x5a;
/// [`FILL`] repeated in a u64.
const FILL64: u64 = u64::from_ne_bytes([FILL; 8]);

/// An 8-byte load through the direct map at GPA `gpa`.
fn load(gpa: u64) -> u64 {
    // SAFETY: a load the VMM answers: an ASI exit (real content) or a violation (poison).
    unsafe { dm::load64(dm::va(gpa)) }.0
}

/// An 8-byte store through the direct map at GPA `gpa`.
fn store(gpa: u64, v: u64) {
    // SAFETY: a store the VMM completes (ASI exit) or drops (violation).
    unsafe { dm::store64(dm::va(gpa), v) };
}

/// ASI-enters this vCPU whatever its state (a test starts restricted).
fn restrict() -> Outcome {
    match hc::asi_enter() {
        Ok(_) | Err(Status::AlreadyRestricted) => Ok(()),
        Err(s) => fail!("AsiEnter: {s:?}"),
    }
}

fn stats() -> Result<AsiStats, crate::outcome::Fail> {
    hc::asi_stats().ctx("AsiStats")
}

/// A sensitive page is absent while restricted (the host's mappings say so); the first
/// touch makes exactly one ASI exit and reads its real content; `AsiEnter` makes it absent
/// again; `AsiEnter` while restricted is a counted no-op; a store is an exit too and lands.
pub fn asi_restricted() -> Outcome {
    restrict()?;
    let mut pages = PageList::new(1);
    let g = pages.alloc(0, gfp::SENSITIVE).ctx("alloc SENSITIVE")?;
    hc::host_fill(g, PAGE_SIZE, FILL).ctx("HostFill")?;
    let s0 = stats()?;
    ensure!(
        s0.vm_full == 0 && s0.vcpu_exited == 0 && s0.sensitive_runs >= 1,
        "not restricted at the start: {s0:?}"
    );
    // The host's own mappings agree with the engine: the page is absent now.
    hc::verify_stage2().ctx("VerifyStage2 restricted")?;

    hc::expect_asi_exit(g, 1).ctx("ExpectAsiExit")?;
    for off in (0..PAGE_SIZE).step_by(8) {
        let v = load(g + off);
        ensure!(
            v == FILL64,
            "read {v:#x} at +{off:#x}, expected {FILL64:#x}"
        );
    }
    let s1 = stats()?;
    ensure!(
        s1.exits == s0.exits + 1,
        "{} ASI exits for 512 loads of one page, expected 1",
        s1.exits - s0.exits
    );
    ensure!(
        s1.vm_full == 1 && s1.vcpu_exited == 1,
        "after the exit: {s1:?}"
    );
    hc::verify_stage2().ctx("VerifyStage2 full")?;

    let toggled = hc::asi_enter().ctx("AsiEnter")?;
    ensure!(toggled >= 1, "AsiEnter toggled {toggled} ranges");
    let s2 = stats()?;
    ensure!(
        s2.vm_full == 0 && s2.vcpu_exited == 0,
        "after AsiEnter: {s2:?}"
    );
    match hc::asi_enter() {
        Err(Status::AlreadyRestricted) => {}
        r => fail!("AsiEnter while restricted returned {r:?}, expected AlreadyRestricted"),
    }
    let s3 = stats()?;
    ensure!(
        s3.noop_enters == s2.noop_enters + 1 && s3.enters == s2.enters,
        "the no-op enter was not counted apart: {s2:?} -> {s3:?}"
    );
    hc::verify_stage2().ctx("VerifyStage2 restricted again")?;

    // A store is an exit as well, and it lands: the next restricted load reads it back.
    hc::expect_asi_exit(g, 2).ctx("ExpectAsiExit")?;
    store(g + 0x40, 0x1122_3344_5566_7788);
    hc::asi_enter().ctx("AsiEnter")?;
    let v = load(g + 0x40);
    ensure!(
        v == 0x1122_3344_5566_7788,
        "stored value read back as {v:#x}"
    );
    hc::asi_enter().ctx("AsiEnter")?;
    let s4 = stats()?;
    ensure!(
        s4.exits == s0.exits + 3,
        "{} exits in all, expected 3",
        s4.exits - s0.exits
    );
    expect_bytes(g, PAGE_SIZE, FILL, PAGE_SIZE - 8)?;
    pages.free_all().ctx("free")?;
    Ok(())
}

/// An unmapped page stays a violation in the full view: poison, a dropped store, the secret
/// intact, before and after an ASI exit.
pub fn asi_unmapped_both() -> Outcome {
    restrict()?;
    let mut pages = PageList::new(2);
    let s = pages.alloc(0, gfp::SENSITIVE).ctx("alloc SENSITIVE")?;
    let u = pages.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    hc::plant_secret(u, PAGE_SIZE).ctx("PlantSecret")?;

    hc::expect_violation(u + 0x80, Access::Read, 2).ctx("ExpectViolation read")?;
    hc::expect_violation(u + 0x80, Access::Write, 1).ctx("ExpectViolation write")?;
    let v = load(u + 0x80);
    ensure!(
        v == POISON64,
        "restricted load of an unmapped page read {v:#x}"
    );

    hc::expect_asi_exit(s, 1).ctx("ExpectAsiExit")?;
    let _ = load(s);
    ensure!(
        stats()?.vm_full == 1,
        "no full view after touching a sensitive page"
    );
    let v = load(u + 0x80);
    ensure!(
        v == POISON64,
        "full-view load of an unmapped page read {v:#x}"
    );
    store(u + 0x80, 0);
    hc::asi_enter().ctx("AsiEnter")?;
    expect_secret(u, PAGE_SIZE)?;
    pages.free_all().ctx("free")?;
    Ok(())
}

/// Nonsensitive pages never cause a transition, with sensitive pages present.
pub fn asi_nonsensitive() -> Outcome {
    restrict()?;
    let mut pages = PageList::new(20);
    // A sensitive page exists (so the restricted view really differs) but is never touched.
    pages.alloc(0, gfp::SENSITIVE).ctx("alloc SENSITIVE")?;
    let s0 = stats()?;
    for flags in [0, gfp::MOVABLE, gfp::RECLAIMABLE, gfp::ZERO] {
        for _ in 0..4 {
            let g = pages.alloc(0, flags).ctx("alloc nonsensitive")?;
            store(g + 8, 0xabcd);
            ensure!(load(g + 8) == 0xabcd, "nonsensitive page lost a store");
        }
    }
    let big = pages.alloc(9, 0).ctx("alloc order 9")?;
    for off in (0..PAGEBLOCK_SIZE).step_by(PAGE_SIZE as usize) {
        let _ = load(big + off);
    }
    let s1 = stats()?;
    ensure!(
        s1.exits == s0.exits && s1.view_switches == s0.view_switches && s1.vm_full == 0,
        "nonsensitive accesses made ASI transitions: {s0:?} -> {s1:?}"
    );
    match hc::asi_enter() {
        Err(Status::AlreadyRestricted) => {}
        r => fail!("AsiEnter after nonsensitive work returned {r:?}"),
    }
    pages.free_all().ctx("free")?;
    Ok(())
}

/// Sensitive pages the test fills before it frees their block.
const DECLASSIFY_FILL: u8 = 0x77;
/// Blocks `asi_declassify_zeroes` may hold while waiting for the sensitive block.
const MAX_HELD: usize = 16 * 1024;

/// A sensitive block that becomes nonsensitive is zeroed first (it may hold user data): fill a
/// sensitive pageblock, free it, allocate nonsensitive memory until it comes back, and find it
/// all zero from the host and from the guest, with no ASI exit.
pub fn asi_declassify_zeroes() -> Outcome {
    restrict()?;
    let block = {
        let mut s = PageList::new(1);
        let b = s.alloc(9, gfp::SENSITIVE).ctx("alloc SENSITIVE order 9")?;
        hc::host_fill(b, PAGEBLOCK_SIZE, DECLASSIFY_FILL).ctx("HostFill")?;
        expect_bytes(b, PAGEBLOCK_SIZE, DECLASSIFY_FILL, PAGEBLOCK_SIZE)?;
        s.free_all().ctx("free sensitive")?;
        b
    };
    let s0 = stats()?;
    let mut held = PageList::new(MAX_HELD);
    let mut order = 10u8;
    loop {
        ensure!(
            !held.is_full(),
            "held {MAX_HELD} blocks, the sensitive block never came back"
        );
        match held.alloc(order, 0) {
            Ok(g) if (g..g + (PAGE_SIZE << order)).contains(&block) => break,
            Ok(_) => {}
            Err(Status::NoMemory | Status::NoFreePageblock) if order > 0 => order -= 1,
            Err(s) => fail!("memory ran out ({s:?}) before the sensitive block came back"),
        }
    }
    let left = hc::host_count(block, PAGEBLOCK_SIZE, DECLASSIFY_FILL).ctx("HostCount")?;
    ensure!(
        left == 0,
        "{left} bytes of the sensitive data survived the flip"
    );
    expect_bytes(block, PAGEBLOCK_SIZE, 0, PAGEBLOCK_SIZE)?;
    for off in (0..PAGEBLOCK_SIZE).step_by(PAGE_SIZE as usize) {
        let v = load(block + off);
        ensure!(v == 0, "guest reads {v:#x} at {:#x}", block + off);
    }
    let s1 = stats()?;
    ensure!(
        s1.exits == s0.exits,
        "the declassified block still made ASI exits"
    );
    held.free_all().ctx("free")?;
    hc::check_invariants().ctx("CheckInvariants")?;
    Ok(())
}

/// Sensitive pages a "system call" of `asi_transitions` touches.
const K: usize = 8;
/// System calls.
const CALLS: u64 = 16;

/// A system-call loop: enter (return to user), touch K sensitive pages (the kernel reads
/// user memory), return. Each call makes exactly one ASI exit (the first touch: the VM is
/// full after it), each enter toggles every sensitive run, and the counts match.
pub fn asi_transitions() -> Outcome {
    restrict()?;
    let mut pages = PageList::new(K);
    let mut user = [0u64; K];
    for p in user.iter_mut() {
        *p = pages.alloc(0, gfp::USER).ctx("alloc USER")?;
    }
    let s0 = stats()?;
    for call in 0..CALLS {
        let first = user[call as usize % K];
        hc::expect_asi_exit(first, 1).ctx("ExpectAsiExit")?;
        // The kernel side: touch the K user pages, the declared one first.
        let _ = load(first);
        for &p in &user {
            let _ = load(p + 8);
        }
        let toggled = hc::asi_enter().ctx("AsiEnter")?;
        ensure!(
            toggled == s0.sensitive_runs,
            "AsiEnter toggled {toggled} ranges, {} sensitive runs",
            s0.sensitive_runs
        );
    }
    let s1 = stats()?;
    ensure!(
        s1.exits - s0.exits == CALLS
            && s1.enters - s0.enters == CALLS
            && s1.view_switches - s0.view_switches == 2 * CALLS,
        "{CALLS} calls made {} exits, {} enters, {} view switches",
        s1.exits - s0.exits,
        s1.enters - s0.enters,
        s1.view_switches - s0.view_switches
    );
    hc::logf(format_args!(
        "asi_transitions: {CALLS} calls over {K} sensitive pages in {} runs: {} ranges toggled per switch",
        s1.sensitive_runs, s1.last_ranges_toggled
    ));
    pages.free_all().ctx("free")?;
    Ok(())
}

/// vCPU 1: loads the page at `gpa` and returns it (no exit expected: the VM is full).
fn exposed_load(gpa: u64) -> u64 {
    load(gpa)
}

/// vCPU 1: its exited flag and exposure windows, packed (exited << 63 | windows).
fn exposure(_: u64) -> u64 {
    match hc::asi_stats() {
        Ok(s) => (s.vcpu_exited << 63) | (s.vcpu_exposed_windows << 32) | s.vm_full,
        Err(_) => u64::MAX,
    }
}

/// vCPU 1: its own ASI exit on `gpa` and its enter; returns the value loaded.
fn exit_and_enter(gpa: u64) -> u64 {
    let v = load(gpa);
    match hc::asi_enter() {
        Ok(_) => v,
        Err(_) => u64::MAX,
    }
}

/// vCPU 1: ASI-enters (if it is exited).
fn enter_job(_: u64) -> u64 {
    match hc::asi_enter() {
        Ok(_) | Err(Status::AlreadyRestricted) => 0,
        Err(_) => 1,
    }
}

/// With two vCPUs: vCPU 0 exits ASI; vCPU 1, still ASI-entered, reads the sensitive page
/// without an exit (the view is per VM here): it is exposed, and the report shows its
/// window. After vCPU 0's enter, vCPU 1's own touch is an exit of its own.
pub fn asi_smp() -> Outcome {
    if smp::cpus() < 2 {
        skip!("needs --vcpus 2 or more");
    }
    restrict()?;
    ensure!(
        smp::run_on(1, enter_job, 0) == Ok(0),
        "vCPU 1 could not ASI-enter"
    );
    let mut pages = PageList::new(1);
    let g = pages.alloc(0, gfp::SENSITIVE).ctx("alloc SENSITIVE")?;
    hc::host_fill(g, PAGE_SIZE, FILL).ctx("HostFill")?;

    hc::expect_asi_exit(g, 2).ctx("ExpectAsiExit")?;
    let _ = load(g);
    let s = stats()?;
    ensure!(
        s.vm_full == 1 && s.vcpu_exited == 1,
        "vCPU 0 not exited: {s:?}"
    );
    let v = match smp::run_on(1, exposed_load, g + 0x10) {
        Ok(v) => v,
        Err(e) => fail!("vCPU 1 did not run: {e:?}"),
    };
    ensure!(
        v == FILL64,
        "exposed vCPU 1 read {v:#x}, expected the content"
    );
    let e = smp::run_on(1, exposure, 0).unwrap_or(u64::MAX);
    ensure!(
        e >> 63 == 0 && e & 1 == 1,
        "vCPU 1 should be ASI-entered in a full VM: {e:#x}"
    );
    hc::asi_enter().ctx("AsiEnter vCPU 0")?;
    let e = smp::run_on(1, exposure, 0).unwrap_or(u64::MAX);
    ensure!(
        (e >> 32) & 0x7fff_ffff >= 1 && e & 1 == 0,
        "vCPU 1's exposure window was not counted: {e:#x}"
    );
    // Restricted again: vCPU 1's own touch is an ASI exit (its own, on the same page).
    let v = smp::run_on(1, exit_and_enter, g + 0x18).unwrap_or(0);
    ensure!(v == FILL64, "vCPU 1's own exit read {v:#x}");
    ensure!(stats()?.vm_full == 0, "VM still full after both enters");
    pages.free_all().ctx("free")?;
    Ok(())
}
