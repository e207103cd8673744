//! `hypercall_timing`: a hypercall round trip against a bare port-I/O exit, same guest.

use crate::hc;
use crate::outcome::{Ctx, Outcome};
use core::arch::asm;
use veil_abi::{Hc, BARE_PORT, HYPERCALL_PORT};

/// Exits timed per kind.
const ITERATIONS: u64 = 2000;
/// The two kinds alternate in this many rounds, so that a change in host load during the
/// measurement hits both alike.
const ROUNDS: u64 = 10;

/// Reads the time-stamp counter.
fn rdtsc() -> u64 {
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

/// Times `ITERATIONS` bare exits and `ITERATIONS` `Nop` hypercalls and reports both.
pub fn hypercall_timing() -> Outcome {
    hc::nop().ctx("Nop")?;
    let (mut bare, mut nop) = (0, 0);
    for _ in 0..ROUNDS {
        bare += time_exits(BARE_PORT, 0, ITERATIONS / ROUNDS);
        nop += time_exits(HYPERCALL_PORT, Hc::Nop as u32, ITERATIONS / ROUNDS);
    }
    crate::println!(
        "veil-guest: {ITERATIONS} exits: bare {} cycles/exit, Nop hypercall {} cycles/exit",
        bare / ITERATIONS,
        nop / ITERATIONS
    );
    hc::report_timing(bare, nop, ITERATIONS).ctx("ReportTiming")?;
    Ok(())
}
