//! The guest's direct map of RAM, and accesses of exact widths through it.
//!
//! Every access is one hand-written instruction (inline asm), so the test knows precisely what
//! the CPU did: its width, its kind and the RIP reported in a violation record. Each function
//! returns the RIP of the accessing instruction along with the value.
//!
//! # Safety
//! The accessors are `unsafe`: the caller must own the memory (or expect a stage-2 violation,
//! which the VMM answers with poison on loads and drops stores).

use core::arch::asm;

/// Guest-virtual address of GPA `gpa` in the direct map.
pub fn va(gpa: u64) -> u64 {
    crate::boot::info().direct_map_base + gpa
}

/// Loads 1 byte; returns (value, rip).
pub unsafe fn load8(va: u64) -> (u64, u64) {
    let (v, rip): (u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+1).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "movzx {v:e}, byte ptr [{a}]",
             a = in(reg) va, v = out(reg) v, r = out(reg) rip, options(nostack, readonly));
    }
    (v, rip)
}

/// Loads 2 bytes; returns (value, rip).
pub unsafe fn load16(va: u64) -> (u64, u64) {
    let (v, rip): (u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+2).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "movzx {v:e}, word ptr [{a}]",
             a = in(reg) va, v = out(reg) v, r = out(reg) rip, options(nostack, readonly));
    }
    (v, rip)
}

/// Loads 4 bytes; returns (value, rip).
pub unsafe fn load32(va: u64) -> (u64, u64) {
    let (v, rip): (u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+4).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "mov {v:e}, dword ptr [{a}]",
             a = in(reg) va, v = out(reg) v, r = out(reg) rip, options(nostack, readonly));
    }
    (v, rip)
}

/// Loads 8 bytes; returns (value, rip).
pub unsafe fn load64(va: u64) -> (u64, u64) {
    let (v, rip): (u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+8).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "mov {v}, qword ptr [{a}]",
             a = in(reg) va, v = out(reg) v, r = out(reg) rip, options(nostack, readonly));
    }
    (v, rip)
}

/// Loads 16 bytes with one `movdqu`; returns (value as two little-endian u64, rip).
///
/// This target is soft-float, so the compiler never keeps anything in `xmm0`; the asm uses it as
/// scratch without declaring it (the register class cannot be named without the SSE feature).
pub unsafe fn load128(va: u64) -> ([u64; 2], u64) {
    let mut out = [0u64; 2];
    let rip: u64;
    // SAFETY: see the module docs; the load touches only [va, va+16) and the store writes the
    // 16-byte local `out`.
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "movdqu xmm0, xmmword ptr [{a}]",
             "movdqu xmmword ptr [{o}], xmm0",
             a = in(reg) va, o = in(reg) out.as_mut_ptr(), r = out(reg) rip, options(nostack));
    }
    (out, rip)
}

/// Stores the low byte of `v`; returns the rip.
pub unsafe fn store8(va: u64, v: u64) -> u64 {
    let rip: u64;
    // SAFETY: see the module docs; the store touches only [va, va+1).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "mov byte ptr [{a}], {v:l}",
             a = in(reg) va, v = in(reg) v, r = out(reg) rip, options(nostack));
    }
    rip
}

/// Stores the low 2 bytes of `v`; returns the rip.
pub unsafe fn store16(va: u64, v: u64) -> u64 {
    let rip: u64;
    // SAFETY: see the module docs; the store touches only [va, va+2).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "mov word ptr [{a}], {v:x}",
             a = in(reg) va, v = in(reg) v, r = out(reg) rip, options(nostack));
    }
    rip
}

/// Stores the low 4 bytes of `v`; returns the rip.
pub unsafe fn store32(va: u64, v: u64) -> u64 {
    let rip: u64;
    // SAFETY: see the module docs; the store touches only [va, va+4).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "mov dword ptr [{a}], {v:e}",
             a = in(reg) va, v = in(reg) v, r = out(reg) rip, options(nostack));
    }
    rip
}

/// Stores 8 bytes; returns the rip.
pub unsafe fn store64(va: u64, v: u64) -> u64 {
    let rip: u64;
    // SAFETY: see the module docs; the store touches only [va, va+8).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "mov qword ptr [{a}], {v}",
             a = in(reg) va, v = in(reg) v, r = out(reg) rip, options(nostack));
    }
    rip
}

/// Stores 16 bytes with one `movdqu` (xmm0 as scratch, see [`load128`]); returns the rip.
pub unsafe fn store128(va: u64, v: [u64; 2]) -> u64 {
    let rip: u64;
    // SAFETY: see the module docs; the store touches only [va, va+16); `v` is a live local.
    unsafe {
        asm!("movdqu xmm0, xmmword ptr [{s}]", "lea {r}, [rip + 2f]", "2:",
             "movdqu xmmword ptr [{a}], xmm0",
             a = in(reg) va, s = in(reg) v.as_ptr(), r = out(reg) rip, options(nostack));
    }
    rip
}

/// Copies `dst.len()` bytes from `src_va` with one `rep movsb`; returns the rip.
pub unsafe fn rep_movsb_from(src_va: u64, dst: &mut [u8]) -> u64 {
    let rip: u64;
    // SAFETY: see the module docs; reads [src_va, +len) and writes the caller's buffer.
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "rep movsb",
             inout("rdi") dst.as_mut_ptr() => _, inout("rsi") src_va => _,
             inout("rcx") dst.len() => _, r = out(reg) rip, options(nostack));
    }
    rip
}

/// Fills `len` bytes at `va` with `byte` using one `rep stosb`; returns the rip.
pub unsafe fn rep_stosb(va: u64, byte: u8, len: usize) -> u64 {
    let rip: u64;
    // SAFETY: see the module docs; writes only [va, va+len).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "2:", "rep stosb",
             inout("rdi") va => _, in("al") byte, inout("rcx") len => _,
             r = out(reg) rip, options(nostack));
    }
    rip
}
