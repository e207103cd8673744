//! `hypercall_timing`: a hypercall round trip against a bare port-I/O exit, same guest.

use crate::hc;
use crate::outcome::{Ctx, Outcome};
use core::arch::asm;
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

/// Times `ITERATIONS` bare exits and `ITERATIONS` `Nop` hypercalls in alternating rounds and
/// reports the median round of each, scaled to `ITERATIONS`.
pub fn hypercall_timing() -> Outcome {
    hc::nop().ctx("Nop")?;
    let (mut bare, mut nop) = ([0u64; ROUNDS], [0u64; ROUNDS]);
    for r in 0..ROUNDS {
        bare[r] = time_exits(BARE_PORT, 0, PER_ROUND);
        nop[r] = time_exits(HYPERCALL_PORT, Hc::Nop as u32, PER_ROUND);
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
