//! Ring 3 for the reachability routes: user segments in the boot GDT, RSP0 in the boot TSS,
//! and [`enter`], which `iretq`s to a user-mode stub. The way back is an exception: each stub
//! ends with `ud2`, whose #UD is delivered on RSP0 to the IDT, which unwinds to the route's
//! recovery frame (`route.rs`). The stubs are position-independent, so they run from a user
//! alias of the image (the caller maps it with the U bit).

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

/// User data selector (GDT slot 5, RPL 3).
pub const USER_DATA: u64 = 0x28 | 3;
/// User 64-bit code selector (GDT slot 6, RPL 3).
pub const USER_CODE: u64 = 0x30 | 3;
/// Kernel data selector of the boot GDT.
const KERNEL_DATA: u16 = veil_abi::DATA_SELECTOR;
/// Selector of the boot TSS.
const TSS: usize = 0x18;

global_asm!(
    ".section .text.ring3, \"ax\"",
    ".global veil_ring3_load8",
    ".global veil_ring3_store8",
    ".global veil_ring3_paddd",
    // r8 = target (user VA), r9 = sink (user VA).
    "veil_ring3_load8:",
    "    mov rax, qword ptr [r8]",
    "    mov qword ptr [r9], rax",
    "    ud2",
    "veil_ring3_store8:",
    "    mov rax, 0x7777777777777777",
    "    mov qword ptr [r8], rax",
    "    ud2",
    // SSE integer op from ring 3: runs natively here, then KVM cannot emulate it on the hole.
    "veil_ring3_paddd:",
    "    paddd xmm0, xmmword ptr [r8]",
    "    ud2",
);

extern "C" {
    /// Ring-3 stub: 8-byte load from r8 into [r9].
    pub fn veil_ring3_load8();
    /// Ring-3 stub: 8-byte store to r8.
    pub fn veil_ring3_store8();
    /// Ring-3 stub: `paddd xmm0, [r8]`.
    pub fn veil_ring3_paddd();
}

/// Stack the CPU switches to when an exception arrives from ring 3 (the IDT's common path then
/// leaves it for the route's frame at once).
#[repr(C, align(16))]
struct Stack([u8; 4096]);
static mut RSP0_STACK: Stack = Stack([0; 4096]);

/// The operand of `sgdt`/`lgdt`.
#[repr(C, packed)]
struct Gdtr {
    limit: u16,
    base: u64,
}

/// Adds the user segments to the boot GDT and points the boot TSS's RSP0 at [`RSP0_STACK`].
pub fn init() {
    let mut gdtr = Gdtr { limit: 0, base: 0 };
    // SAFETY: single vCPU, interrupts off. The boot GDT (GPA 0x1000, identity-mapped) has room
    // for slots 5 and 6 in its page; its TSS descriptor (slot 3, 16 bytes) gives the TSS base,
    // a 104-byte TSS in identity-mapped reserved memory whose RSP0 (offset 4) we set.
    unsafe {
        asm!("sgdt [{}]", in(reg) &mut gdtr, options(nostack));
        let gdt = gdtr.base as *mut u64;
        *gdt.add(5) = 0x00cf_f300_0000_ffff; // data, DPL 3
        *gdt.add(6) = 0x00af_fb00_0000_ffff; // 64-bit code, DPL 3
        let lo = *gdt.add(TSS / 8);
        let hi = *gdt.add(TSS / 8 + 1);
        let tss = ((lo >> 16) & 0xff_ffff) | ((lo >> 56) << 24) | (hi << 32);
        let top = addr_of_mut!(RSP0_STACK) as u64 + 4096;
        core::ptr::write_unaligned((tss + 4) as *mut u64, top);
        gdtr.limit = gdtr.limit.max(7 * 8 - 1);
        asm!("lgdt [{}]", in(reg) &gdtr, options(readonly, nostack));
    }
}

/// `iretq`s to ring 3 at `rip` with r8 = `target`, r9 = `sink` and interrupts off; never
/// returns (the stub's exception unwinds the caller's recovery frame).
///
/// # Safety
/// Must run inside `route::protected`; `rip`, `target` and `sink` must be user-accessible.
pub unsafe fn enter(rip: u64, target: u64, sink: u64) -> ! {
    // SAFETY: the frame is SS, RSP, RFLAGS (IF off, reserved bit 1), CS, RIP for a return to
    // ring 3; the stub needs no user stack (it pushes nothing), so RSP is its own sink.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp3}",
            "push 2",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) USER_DATA,
            rsp3 = in(reg) sink,
            cs = in(reg) USER_CODE,
            rip = in(reg) rip,
            in("r8") target,
            in("r9") sink,
            options(noreturn),
        )
    }
}

/// Reloads the kernel data selector into DS, ES and SS (an exception from ring 3 leaves SS
/// null and the return to ring 3 nulled DS and ES).
pub fn restore_kernel_segments() {
    // SAFETY: KERNEL_DATA is the boot GDT's flat data segment.
    unsafe {
        asm!("mov ds, {0:x}", "mov es, {0:x}", "mov ss, {0:x}", in(reg) KERNEL_DATA,
             options(nostack, preserves_flags));
    }
}
