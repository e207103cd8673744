//! `hypercall_timing`: a hypercall round trip against a bare port-I/O exit, same guest (with
//! vCPU 1 busy making hypercalls when there is one).

use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::smp;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use veil_abi::{Hc, BARE_PORT, HYPERCALL_PORT};

/// Exits timed per kind.
const ITERATIONS: u64 = 2000;
/// The two kinds alternate in this many rounds of `ITERATIONS / ROUNDS` exits each. Other work
/// on the host (this host is shared and itself virtual) slows some rounds down a lot; the
/// median round of each kind is what gets reported, scaled to `ITERATIONS`.
const ROUNDS: usize = 20;
/// Exits per round.
const PER_ROUND: u64 = ITERATIONS / ROUNDS as u64;

/// Reads the time-stamp counter.
pub(crate) fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the TSC.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

/// Cycles for `n` exits on `port` with `eax = nr`; both loops run the same instructions.
fn time_exits(port: u16, nr: u32, n: u64) -> u64 {
    let t0 = rdtsc();
    // SAFETY: `out` to the bare port is a counted no-op; to the hypercall port with Nop it
    // changes only the declared registers.
    unsafe {
        asm!(
            "2:",
            "mov eax, {nr:e}",
            "out dx, eax",
            "dec {i}",
            "jnz 2b",
            nr = in(reg) nr,
            i = inout(reg) n => _,
            in("dx") port,
            out("rax") _, out("rdi") _, out("rsi") _, out("rcx") _, out("r8") _,
            options(nostack),
        );
    }
    rdtsc().wrapping_sub(t0)
}

/// Median of `v` (sorts it; insertion sort, `v` is tiny).
fn median(v: &mut [u64]) -> u64 {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && v[j - 1] > v[j] {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
    v[v.len() / 2]
}

/// Raised to end [`busy`].
static BUSY_STOP: AtomicU64 = AtomicU64::new(0);

/// On vCPU 1 while vCPU 0 measures: `Nop` hypercalls until told to stop; returns how many.
fn busy(_: u64) -> u64 {
    let mut n = 0;
    while BUSY_STOP.load(Ordering::Acquire) == 0 {
        let _ = hc::nop();
        n += 1;
    }
    n
}

/// Times `ITERATIONS` bare exits and `ITERATIONS` `Nop` hypercalls in alternating rounds and
/// reports the median round of each, scaled to `ITERATIONS`. With two vCPUs or more, vCPU 1
/// makes `Nop` hypercalls all the while, so the ratio includes sharing the VMM's VM state.
pub fn hypercall_timing() -> Outcome {
    hc::nop().ctx("Nop")?;
    BUSY_STOP.store(0, Ordering::Relaxed);
    let sibling = smp::cpus() >= 2;
    if sibling {
        if let Err(e) = smp::post(1, busy, 0) {
            crate::fail!("vCPU 1 did not take the busy loop: {e:?}");
        }
    }
    let (mut bare, mut nop) = ([0u64; ROUNDS], [0u64; ROUNDS]);
    for r in 0..ROUNDS {
        bare[r] = time_exits(BARE_PORT, 0, PER_ROUND);
        nop[r] = time_exits(HYPERCALL_PORT, Hc::Nop as u32, PER_ROUND);
    }
    BUSY_STOP.store(1, Ordering::Release);
    let busy_calls = match sibling {
        true => match smp::wait(1) {
            Ok(n) => n,
            Err(e) => crate::fail!("vCPU 1's busy loop did not end: {e:?}"),
        },
        false => 0,
    };
    if sibling {
        crate::println!("veil-guest: vCPU 1 made {busy_calls} Nop hypercalls meanwhile");
    }
    let bare = median(&mut bare) * ROUNDS as u64;
    let nop = median(&mut nop) * ROUNDS as u64;
    crate::println!(
        "veil-guest: {ITERATIONS} exits (median of {ROUNDS} rounds): bare {} cycles/exit, Nop hypercall {} cycles/exit",
        bare / ITERATIONS,
        nop / ITERATIONS
    );
    hc::report_timing(bare, nop, ITERATIONS).ctx("ReportTiming")?;
    Ok(())
}
