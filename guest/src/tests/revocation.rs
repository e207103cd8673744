//! `revocation_latency`: the revocation-latency meter (skipped with one vCPU). vCPU 1 reads a
//! mapped page in a tight loop while vCPU 0 makes it unreachable (`Hc::Protect` no-access):
//! the time from the revoke call to vCPU 1's first violation, and the reads that succeeded
//! after vCPU 1 saw that the revoke had returned (the stale window: must be 0). The loop reads
//! successfully, with a moving counter, until the revoke, so the livelock detector leaves it
//! alone.

use core::sync::atomic::{AtomicU64, Ordering};

use super::timing::rdtsc;
use super::POISON64;
use crate::dm;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::smp;
use crate::{ensure, fail, skip};
use veil_abi::{protect, Access};

/// What the page holds before the revoke.
const PATTERN: u64 = 0x1122_3344_5566_7788;
/// Reads after which the reader gives up (seconds of emulated ring 0 here).
const MAX_READS: u64 = 4_000_000;
/// Spins vCPU 0 lets the reader run before it revokes.
const WARMUP_SPINS: u64 = 2_000;

/// Set by vCPU 0 as soon as the revoke hypercall returned.
static REVOKED: AtomicU64 = AtomicU64::new(0);
/// Set by the reader when it starts reading.
static READING: AtomicU64 = AtomicU64::new(0);
/// TSC at the reader's first poisoned read (0: none).
static FAULT_TSC: AtomicU64 = AtomicU64::new(0);
/// Successful reads by the reader, in all and after it saw `REVOKED`.
static READS: AtomicU64 = AtomicU64::new(0);
static STALE: AtomicU64 = AtomicU64::new(0);

/// The reader (on vCPU 1): loads the word at `va` until a load returns poison.
fn reader(va: u64) -> u64 {
    let (mut reads, mut stale) = (0, 0);
    READING.store(1, Ordering::Release);
    while reads < MAX_READS {
        let revoked = REVOKED.load(Ordering::Acquire);
        // SAFETY: a load of a page vCPU 0 owns; once revoked the VMM answers it with poison.
        let v = unsafe { dm::load64(va) }.0;
        if v == POISON64 {
            FAULT_TSC.store(rdtsc(), Ordering::Relaxed);
            break;
        }
        reads += 1;
        stale += u64::from(revoked != 0);
    }
    READS.store(reads, Ordering::Relaxed);
    STALE.store(stale, Ordering::Relaxed);
    0
}

/// The meter: one revoke under a reader on vCPU 1.
pub fn revocation_latency() -> Outcome {
    if smp::cpus() < 2 {
        skip!("needs --vcpus 2 or more");
    }
    let gpa = hc::alloc(0, 0).ctx("alloc")?;
    let va = dm::va(gpa);
    // SAFETY: a mapped page this test owns.
    unsafe { core::ptr::write_volatile(va as *mut u64, PATTERN) };
    hc::expect_violation(gpa, Access::Read, 1).ctx("ExpectViolation")?;
    for s in [&REVOKED, &READING, &FAULT_TSC, &READS, &STALE] {
        s.store(0, Ordering::Relaxed);
    }
    if let Err(e) = smp::post(1, reader, va) {
        fail!("vCPU 1 did not take the reader: {e:?}");
    }
    let mut spins = 0;
    while READING.load(Ordering::Acquire) == 0 || spins < WARMUP_SPINS {
        spins += 1;
        core::hint::spin_loop();
    }
    let t0 = rdtsc();
    hc::protect(gpa, 1, protect::NO_ACCESS).ctx("Protect no-access")?;
    let t1 = rdtsc();
    REVOKED.store(1, Ordering::Release);
    if let Err(e) = smp::wait(1) {
        fail!("the reader did not finish: {e:?}");
    }
    let (fault, reads, stale) = (
        FAULT_TSC.load(Ordering::Relaxed),
        READS.load(Ordering::Relaxed),
        STALE.load(Ordering::Relaxed),
    );
    ensure!(
        fault != 0,
        "vCPU 1 read the page {reads} times and never faulted"
    );
    hc::logf(format_args!(
        "revocation: revoke {} cycles, to vCPU 1 first violation {} cycles, {} reads, {} stale after return",
        t1.wrapping_sub(t0),
        fault.wrapping_sub(t0),
        reads,
        stale
    ));
    hc::report_revocation(t1.wrapping_sub(t0), fault.wrapping_sub(t0), reads, stale)
        .ctx("ReportRevocation")?;
    ensure!(
        stale == 0,
        "{stale} reads succeeded after the revoke returned"
    );
    Ok(())
}
