//! `cross_vcpu_isolation`, `concurrent_alloc`, `flip_under_reader`, `smp_wake`: the suite's
//! cross-vCPU tests (skipped with one vCPU). A page vCPU 0 allocated unmapped is unreachable
//! from vCPU 1 too, and the violation is vCPU 1's; every vCPU allocating and freeing at once
//! never gets a page another holds; a vCPU reading a mapped page never sees it vanish while
//! another flips; a vCPU parked in `hlt` runs a posted job at once (its doorbell), not after
//! the VMM's idle timeout.

use core::sync::atomic::{AtomicU64, Ordering};

use super::{expect_secret, the_only_violation, violations, MAX_RECORDS, POISON64};
use crate::dm;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use crate::smp::{self, Barrier};
use crate::tests::timing::rdtsc;
use crate::{ensure, fail, skip};
use veil_abi::{gfp, Access, ViolationRecord, MAX_VCPUS, PAGE_SIZE};

/// Offset of the stray load inside the page.
const OFFSET: u64 = 0x80;
/// Pages each vCPU holds per round of `concurrent_alloc`.
const HELD: usize = 16;
/// Rounds of `concurrent_alloc`.
const ROUNDS: usize = 6;

/// On the calling vCPU: an 8-byte load through the direct map at GPA `gpa`.
fn load_on_this_cpu(gpa: u64) -> u64 {
    // SAFETY: an expected stray load: the VMM answers it with poison.
    unsafe { dm::load64(dm::va(gpa)) }.0
}

/// vCPU 1 loads from a page vCPU 0 allocated unmapped: poison, one violation, vCPU 1's.
pub fn cross_vcpu_isolation() -> Outcome {
    if smp::cpus() < 2 {
        skip!("needs --vcpus 2 or more");
    }
    let mut pages = PageList::new(1);
    let gpa = pages.alloc(0, gfp::UNMAPPED).ctx("alloc UNMAPPED")?;
    hc::plant_secret(gpa, PAGE_SIZE).ctx("PlantSecret")?;
    hc::expect_violation(gpa + OFFSET, Access::Read, 1).ctx("ExpectViolation")?;
    let v = match smp::run_on(1, load_on_this_cpu, gpa + OFFSET) {
        Ok(v) => v,
        Err(e) => fail!("vCPU 1 did not run the load: {e:?}"),
    };
    ensure!(v == POISON64, "vCPU 1 loaded {v:#x}, expected poison");
    let r = the_only_violation()?;
    ensure!(
        r.gpa == gpa + OFFSET && r.vcpu == 1,
        "violation at {:#x} by vCPU {}, expected {:#x} by vCPU 1",
        r.gpa,
        r.vcpu,
        gpa + OFFSET
    );
    expect_secret(gpa, PAGE_SIZE)?;
    pages.free_all().ctx("free")?;
    Ok(())
}

/// The pages each vCPU holds in the current round (0: none).
static HOLDING: [[AtomicU64; HELD]; MAX_VCPUS as usize] =
    [const { [const { AtomicU64::new(0) }; HELD] }; MAX_VCPUS as usize];
/// Pages found held by two vCPUs at once.
static DOUBLES: AtomicU64 = AtomicU64::new(0);
static ROUND: Barrier = Barrier::new();

/// One vCPU's part of `concurrent_alloc`: ROUNDS times, allocate HELD pages (mapped and
/// unmapped alternately), meet, let vCPU 0 look for a page held twice, meet, free them, meet.
/// Returns the number of failed calls.
fn alloc_worker(_: u64) -> u64 {
    let (cpu, n) = (smp::this_cpu() as usize, smp::cpus());
    let mine = &HOLDING[cpu];
    let mut errors = 0;
    for _ in 0..ROUNDS {
        for (i, slot) in mine.iter().enumerate() {
            let flags = if i % 2 == 0 { 0 } else { gfp::UNMAPPED };
            let g = hc::alloc(0, flags).unwrap_or_else(|_| {
                errors += 1;
                0
            });
            slot.store(g, Ordering::Relaxed);
        }
        errors += u64::from(ROUND.wait(n).is_err());
        if cpu == 0 {
            DOUBLES.fetch_add(doubles(n as usize), Ordering::Relaxed);
        }
        errors += u64::from(ROUND.wait(n).is_err());
        for slot in mine {
            let g = slot.swap(0, Ordering::Relaxed);
            if g != 0 && hc::free(g, 0).is_err() {
                errors += 1;
            }
        }
        errors += u64::from(ROUND.wait(n).is_err());
    }
    errors
}

/// Pages held by more than one slot of the first `n` vCPUs.
fn doubles(n: usize) -> u64 {
    let mut found = 0;
    let all = || {
        HOLDING[..n]
            .iter()
            .flatten()
            .map(|s| s.load(Ordering::Relaxed))
    };
    for (i, a) in all().enumerate() {
        found += all().skip(i + 1).filter(|&b| a != 0 && a == b).count() as u64;
    }
    found
}

/// Every vCPU allocates and frees at once, each from its own per-CPU cache: no page is ever
/// held by two vCPUs, every call succeeds, and the allocator's invariants hold after.
pub fn concurrent_alloc() -> Outcome {
    let n = smp::cpus();
    if n < 2 {
        skip!("needs --vcpus 2 or more");
    }
    DOUBLES.store(0, Ordering::Relaxed);
    for cpu in 1..n {
        if let Err(e) = smp::post(cpu, alloc_worker, 0) {
            fail!("vCPU {cpu} did not take the job: {e:?}");
        }
    }
    let mut errors = alloc_worker(0);
    for cpu in 1..n {
        match smp::wait(cpu) {
            Ok(e) => errors += e,
            Err(e) => fail!("vCPU {cpu} did not finish: {e:?}"),
        }
    }
    let doubles = DOUBLES.load(Ordering::Relaxed);
    ensure!(doubles == 0, "{doubles} pages held by two vCPUs at once");
    ensure!(errors == 0, "{errors} allocator calls or barriers failed");
    hc::check_invariants().ctx("CheckInvariants")?;
    Ok(())
}

/// Pageblocks (order-9 blocks) allocated per round of `flip_under_reader`.
const FLIP_BLOCKS: usize = 24;
/// Rounds (unmapped, mapped, ...) of `flip_under_reader`.
const FLIP_ROUNDS: usize = 4;

/// Set to end [`mapped_reader`].
static READER_STOP: AtomicU64 = AtomicU64::new(0);
/// What [`mapped_reader`] saw other than the pattern (0: nothing).
static READER_BAD: AtomicU64 = AtomicU64::new(0);

/// What the page [`mapped_reader`] reads holds.
const READ_PATTERN: u64 = 0x0bad_cafe_f00d_0001;

/// On vCPU 1: reads the word at `va` until told to stop; returns how many reads it made.
fn mapped_reader(va: u64) -> u64 {
    let mut reads = 0;
    while READER_STOP.load(Ordering::Acquire) == 0 {
        // SAFETY: a load of a mapped page vCPU 0 owns for the whole test.
        let v = unsafe { core::ptr::read_volatile(va as *const u64) };
        if v != READ_PATTERN {
            READER_BAD.store(v | 1, Ordering::Relaxed);
        }
        reads += 1;
    }
    reads
}

/// Pageblock flips while another vCPU runs: vCPU 1 reads a mapped page in a loop while vCPU 0
/// flips pageblocks (allocating and freeing 24 unmapped order-9 blocks, then 24 mapped ones,
/// twice). No violation, and vCPU 1 only ever reads the pattern:
/// no page that stays mapped vanishes during a stage-2 update (the slots backend parks vCPU 1
/// around each memslot update).
pub fn flip_under_reader() -> Outcome {
    if smp::cpus() < 2 {
        skip!("needs --vcpus 2 or more");
    }
    let page = hc::alloc(0, 0).ctx("alloc")?;
    let va = dm::va(page);
    // SAFETY: a mapped page this test owns.
    unsafe { core::ptr::write_volatile(va as *mut u64, READ_PATTERN) };
    READER_STOP.store(0, Ordering::Relaxed);
    READER_BAD.store(0, Ordering::Relaxed);
    if let Err(e) = smp::post(1, mapped_reader, va) {
        fail!("vCPU 1 did not take the reader: {e:?}");
    }
    let before = hc::stats().ctx("Stats")?;
    let mut held = PageList::new(FLIP_BLOCKS);
    let mut failed = None;
    for round in 0..FLIP_ROUNDS {
        let flags = if round % 2 == 0 { gfp::UNMAPPED } else { 0 };
        while !held.is_full() {
            if let Err(s) = held.alloc(9, flags) {
                failed = Some(s);
                break;
            }
        }
        if let Err(s) = held.free_all() {
            failed = failed.or(Some(s));
        }
    }
    READER_STOP.store(1, Ordering::Release);
    let reads = match smp::wait(1) {
        Ok(n) => n,
        Err(e) => fail!("the reader did not finish: {e:?}"),
    };
    if let Some(s) = failed {
        fail!("alloc/free failed: {s:?}");
    }
    let after = hc::stats().ctx("Stats")?;
    let flips = (after.flips_to_unmapped - before.flips_to_unmapped)
        + (after.flips_to_mapped - before.flips_to_mapped);
    let bad = READER_BAD.load(Ordering::Relaxed);
    ensure!(bad == 0, "vCPU 1 read {bad:#x}, not the pattern");
    let mut buf = [ViolationRecord::default(); MAX_RECORDS];
    let (total, _) = violations(&mut buf)?;
    ensure!(
        total == 0,
        "{total} violations while vCPU 1 read a mapped page"
    );
    ensure!(flips > 0, "no pageblock flipped ({reads} reads)");
    hc::logf(format_args!(
        "flip_under_reader: {flips} flips, {reads} reads by vCPU 1, none saw a hole"
    ));
    hc::free(page, 0).ctx("free")?;
    Ok(())
}

/// Round trips timed by [`smp_wake`].
const WAKE_ROUNDS: usize = 21;
/// `Nop` hypercalls timed for [`smp_wake`]'s unit, and made before each round so vCPU 1 is
/// parked in the VMM by then.
const WAKE_NOPS: u64 = 50;
/// The most `Nop` round trips the median round trip to a parked vCPU may cost. Ringing its
/// doorbell costs a hypercall, a host thread's wakeup and vCPU 1's exits (6 `Nop`s on the
/// nested development host, where a `Nop` takes about 25 µs); without the doorbell it waits
/// for the VMM's 20 ms idle timeout (783 `Nop`s there, thousands where exits are cheaper).
const WAKE_MAX_NOPS: u64 = 150;

/// [`smp_wake`]'s job.
fn next(x: u64) -> u64 {
    x + 1
}

/// vCPU 1, parked in `hlt`, runs a job posted to it at once: the median `run_on` round trip
/// costs at most [`WAKE_MAX_NOPS`] `Nop` hypercalls.
pub fn smp_wake() -> Outcome {
    if smp::cpus() < 2 {
        skip!("needs --vcpus 2 or more");
    }
    let nops = || -> Result<u64, crate::outcome::Fail> {
        let t0 = rdtsc();
        for _ in 0..WAKE_NOPS {
            hc::nop().ctx("Nop")?;
        }
        Ok(rdtsc().wrapping_sub(t0) / WAKE_NOPS)
    };
    let nop = nops()?.max(1);
    let mut trips = [0u64; WAKE_ROUNDS];
    for (i, trip) in trips.iter_mut().enumerate() {
        // Give vCPU 1 time to halt and wait on its doorbell.
        nops()?;
        let t0 = rdtsc();
        let v = match smp::run_on(1, next, i as u64) {
            Ok(v) => v,
            Err(e) => fail!("vCPU 1 did not run round {i}: {e:?}"),
        };
        *trip = rdtsc().wrapping_sub(t0);
        ensure!(v == i as u64 + 1, "round {i}: vCPU 1 returned {v}");
    }
    trips.sort_unstable();
    let median = trips[WAKE_ROUNDS / 2];
    crate::println!(
        "veil-guest: smp_wake: median round trip to a parked vCPU {median} cycles = {} Nop hypercalls (max {}, bound {WAKE_MAX_NOPS})",
        median / nop,
        trips[WAKE_ROUNDS - 1] / nop
    );
    ensure!(
        median / nop <= WAKE_MAX_NOPS,
        "the median round trip to a parked vCPU cost {} Nop hypercalls (bound {WAKE_MAX_NOPS}): its doorbell did not wake it",
        median / nop
    );
    Ok(())
}
