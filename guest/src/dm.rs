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

/// Where an accessing instruction lies: `start` is its own RIP, `end` the next instruction's.
///
/// KVM reports a load's MMIO exit with RIP at the instruction (it re-executes once the data is
/// in), but a store's with RIP already past it (the store retired before the exit): a violation
/// record's RIP is one of the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// RIP of the accessing instruction.
    pub start: u64,
    /// RIP of the instruction after it.
    pub end: u64,
}

impl Site {
    /// Whether a reported RIP designates this instruction (at it or just past it).
    pub fn matches(self, rip: u64) -> bool {
        rip == self.start || rip == self.end
    }
}

/// Guest-virtual address of GPA `gpa` in the direct map.
pub fn va(gpa: u64) -> u64 {
    crate::boot::info().direct_map_base + gpa
}

/// Loads 1 byte; returns (value, site).
pub unsafe fn load8(va: u64) -> (u64, Site) {
    let (v, start, end): (u64, u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+1).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "movzx {v:e}, byte ptr [{a}]", "3:",
             a = in(reg) va, v = out(reg) v, r = out(reg) start, e = out(reg) end, options(nostack, readonly));
    }
    (v, Site { start, end })
}

/// Loads 2 bytes; returns (value, site).
pub unsafe fn load16(va: u64) -> (u64, Site) {
    let (v, start, end): (u64, u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+2).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "movzx {v:e}, word ptr [{a}]", "3:",
             a = in(reg) va, v = out(reg) v, r = out(reg) start, e = out(reg) end, options(nostack, readonly));
    }
    (v, Site { start, end })
}

/// Loads 4 bytes; returns (value, site).
pub unsafe fn load32(va: u64) -> (u64, Site) {
    let (v, start, end): (u64, u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+4).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "mov {v:e}, dword ptr [{a}]", "3:",
             a = in(reg) va, v = out(reg) v, r = out(reg) start, e = out(reg) end, options(nostack, readonly));
    }
    (v, Site { start, end })
}

/// Loads 8 bytes; returns (value, site).
pub unsafe fn load64(va: u64) -> (u64, Site) {
    let (v, start, end): (u64, u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+8).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "mov {v}, qword ptr [{a}]", "3:",
             a = in(reg) va, v = out(reg) v, r = out(reg) start, e = out(reg) end, options(nostack, readonly));
    }
    (v, Site { start, end })
}

/// Loads 16 bytes with one `movdqu`; returns (value as two little-endian u64, site).
///
/// This target is soft-float, so the compiler never keeps anything in `xmm0`; the asm uses it as
/// scratch without declaring it (the register class cannot be named without the SSE feature).
pub unsafe fn load128(va: u64) -> ([u64; 2], Site) {
    let mut out = [0u64; 2];
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; the load touches only [va, va+16) and the store writes the
    // 16-byte local `out`.
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "movdqu xmm0, xmmword ptr [{a}]", "3:",
             "movdqu xmmword ptr [{o}], xmm0",
             a = in(reg) va, o = in(reg) out.as_mut_ptr(), r = out(reg) start, e = out(reg) end, options(nostack));
    }
    (out, Site { start, end })
}

/// Stores the low byte of `v`; returns the site.
pub unsafe fn store8(va: u64, v: u64) -> Site {
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; the store touches only [va, va+1).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "mov byte ptr [{a}], {v:l}", "3:",
             a = in(reg) va, v = in(reg) v, r = out(reg) start, e = out(reg) end, options(nostack));
    }
    Site { start, end }
}

/// Stores the low 2 bytes of `v`; returns the site.
pub unsafe fn store16(va: u64, v: u64) -> Site {
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; the store touches only [va, va+2).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "mov word ptr [{a}], {v:x}", "3:",
             a = in(reg) va, v = in(reg) v, r = out(reg) start, e = out(reg) end, options(nostack));
    }
    Site { start, end }
}

/// Stores the low 4 bytes of `v`; returns the site.
pub unsafe fn store32(va: u64, v: u64) -> Site {
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; the store touches only [va, va+4).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "mov dword ptr [{a}], {v:e}", "3:",
             a = in(reg) va, v = in(reg) v, r = out(reg) start, e = out(reg) end, options(nostack));
    }
    Site { start, end }
}

/// Stores 8 bytes; returns the site.
pub unsafe fn store64(va: u64, v: u64) -> Site {
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; the store touches only [va, va+8).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "mov qword ptr [{a}], {v}", "3:",
             a = in(reg) va, v = in(reg) v, r = out(reg) start, e = out(reg) end, options(nostack));
    }
    Site { start, end }
}

/// Stores 16 bytes with one `movdqu` (xmm0 as scratch, see [`load128`]); returns the site.
pub unsafe fn store128(va: u64, v: [u64; 2]) -> Site {
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; the store touches only [va, va+16); `v` is a live local.
    unsafe {
        asm!("movdqu xmm0, xmmword ptr [{s}]", "lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:",
             "movdqu xmmword ptr [{a}], xmm0", "3:",
             a = in(reg) va, s = in(reg) v.as_ptr(), r = out(reg) start, e = out(reg) end, options(nostack));
    }
    Site { start, end }
}

/// Copies `dst.len()` bytes from `src_va` with one `rep movsb`; returns the site.
pub unsafe fn rep_movsb_from(src_va: u64, dst: &mut [u8]) -> Site {
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; reads [src_va, +len) and writes the caller's buffer.
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "rep movsb", "3:",
             inout("rdi") dst.as_mut_ptr() => _, inout("rsi") src_va => _,
             inout("rcx") dst.len() => _, r = out(reg) start, e = out(reg) end, options(nostack));
    }
    Site { start, end }
}

/// Fills `len` bytes at `va` with `byte` using one `rep stosb`; returns the site.
pub unsafe fn rep_stosb(va: u64, byte: u8, len: usize) -> Site {
    let (start, end): (u64, u64);
    // SAFETY: see the module docs; writes only [va, va+len).
    unsafe {
        asm!("lea {r}, [rip + 2f]", "lea {e}, [rip + 3f]", "2:", "rep stosb", "3:",
             inout("rdi") va => _, in("al") byte, inout("rcx") len => _,
             r = out(reg) start, e = out(reg) end, options(nostack));
    }
    Site { start, end }
}
