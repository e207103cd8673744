//! Running one access that may not come back: [`protected`] calls a route body inside a
//! recovery frame. An exception (through the IDT, see `idt.rs`) or a blocked instruction fetch
//! (through the VMM's recovery point, `Hc::SetRecovery`) unwinds straight back to it, so a
//! route that faults ends that route and not the run.
//!
//! The unwinding skips every frame of the body: bodies hold nothing that needs dropping.

use core::arch::global_asm;
use core::ptr::addr_of_mut;
use veil_abi::{Hc, HYPERCALL_PORT};

/// Saved stack pointer of the open recovery frame (0: none). Read by the IDT's common path.
#[no_mangle]
pub static mut VEIL_ROUTE_RSP: u64 = 0;

global_asm!(
    ".section .text.route, \"ax\"",
    ".global veil_route_call",
    ".global veil_route_fault",
    // rdi = body, rsi = its argument. Returns 0 if the body returned, 0x100 + vector if it took
    // an exception, 0x200 if the VMM resumed at the recovery point (blocked fetch).
    "veil_route_call:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    sub rsp, 8",
    "    mov r12, rdi",
    "    mov r13, rsi",
    "    mov [rip + {slot}], rsp",
    "    lea rdi, [rip + 4f]",
    "    mov rsi, rsp",
    "    mov eax, {set_recovery}",
    "    mov dx, {port}",
    "    out dx, eax",
    "    mov rdi, r13",
    "    call r12",
    "    xor eax, eax",
    "3:  mov qword ptr [rip + {slot}], 0",
    "    add rsp, 8",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    // The VMM's recovery point: rsp is the frame's. The VMM sets only rip and rsp, so after a
    // ring-3 access it resumes here in ring 3: `ud2` then comes back to ring 0 through the IDT
    // (which unwinds to this same frame).
    "4:  mov ax, cs",
    "    test al, 3",
    "    jz 5f",
    "    ud2",
    "5:  mov eax, 0x200",
    "    jmp 3b",
    // From the IDT: rsp is the frame's, rax = 0x100 + vector.
    "veil_route_fault:",
    "    jmp 3b",
    slot = sym VEIL_ROUTE_RSP,
    set_recovery = const Hc::SetRecovery as u32,
    port = const HYPERCALL_PORT,
);

/// What a route body works on; `out` is the route's sink.
#[repr(C)]
pub struct Ctx {
    /// Guest-virtual address the body accesses (or the value it writes to an MSR).
    pub va: u64,
    /// GPA of the target.
    pub gpa: u64,
    /// Route-specific extra operand (an MSR index).
    pub aux: u64,
    /// The sink: what the body obtained.
    pub out: [u64; 4],
}

/// A route body.
pub type Body = unsafe extern "C" fn(*mut Ctx);

extern "C" {
    fn veil_route_call(body: Body, arg: *mut Ctx) -> u64;
}

/// How a protected body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It returned.
    Returned,
    /// It took exception `vector`.
    Exception(u64),
    /// The VMM resumed at the recovery point after a blocked fetch.
    Recovered,
}

/// Runs `body(arg)` inside a recovery frame; clears the VMM's recovery point afterwards.
///
/// # Safety
/// `body` may be unwound at any instruction: it must own nothing that needs dropping and leave
/// no state half-changed that the caller relies on. `arg` must be valid for `body`.
pub unsafe fn protected(body: Body, arg: *mut Ctx) -> Ended {
    // SAFETY: the trampoline saves and restores every callee-saved register and rsp itself and
    // calls `body` with the System V alignment; the caller vouches for `body` and `arg`.
    let r = unsafe { veil_route_call(body, arg) };
    // SAFETY: single vCPU, interrupts off: nothing else touches the slot.
    unsafe { *addr_of_mut!(VEIL_ROUTE_RSP) = 0 };
    let _ = crate::hc::clear_recovery();
    match r {
        0 => Ended::Returned,
        0x200 => Ended::Recovered,
        v => Ended::Exception(v.wrapping_sub(0x100)),
    }
}
