//! The IDT: every CPU exception (vectors 0..32) is reported to the VMM and stops the VM, unless
//! a protected route is running (`route.rs`): then it is reported to the VMM (which attributes
//! it to the route and answers without stopping) and unwinds to the route's frame.
//!
//! Each stub pushes a dummy error code where the CPU pushes none, then the vector, and jumps to a
//! common path that calls `Hc::Exception(vector, error_code, rip, cr2)` and `Hc::Exit(3)`. The
//! VMM prints the registers. Interrupts stay off, so no other vector is ever delivered.
//!
//! The one exception: #VE (vector 20), which the VMM injects under `--on-violation inject`
//! after a load or store violation has completed (the VMM's [`veil_abi::VeInfo`] is in the
//! vCPU's mailbox). Its handler only counts it ([`VE_COUNT`]) and returns past the access.

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;
use veil_abi::{Hc, CODE_SELECTOR, HYPERCALL_PORT};

/// Exit code of a guest that took an exception.
const EXCEPTION_EXIT_CODE: u32 = 3;

global_asm!(
    ".section .text.isr, \"ax\"",
    // Vectors for which the CPU pushes no error code: push a zero so all frames look alike.
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "veil_isr_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp veil_isr_common",
    ".endr",
    // Vectors with a CPU-pushed error code.
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "veil_isr_\\v:",
    "    push \\v",
    "    jmp veil_isr_common",
    ".endr",
    "veil_isr_common:",
    // Report the exception. Inside a protected route (route.rs) the VMM attributes it to the
    // route and answers without stopping; then unwind to the route's frame.
    "    mov rdi, [rsp]",
    "    mov rsi, [rsp + 8]",
    "    mov rcx, [rsp + 16]",
    "    mov r8, cr2",
    "    mov dx, {port}",
    "    mov eax, {exception}",
    "    out dx, eax",
    "    mov rax, [rip + {route_rsp}]",
    "    test rax, rax",
    "    jz 4f",
    "    mov rdi, [rsp]",
    "    mov qword ptr [rip + {route_rsp}], 0",
    "    mov rsp, rax",
    "    lea rax, [rdi + 0x100]",
    "    jmp veil_route_fault",
    "4:  mov edi, {code}",
    "    mov eax, {exit}",
    "    out dx, eax",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    ".section .rodata.isr_table, \"a\"",
    ".balign 8",
    ".global veil_isr_table",
    "veil_isr_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad veil_isr_\\v",
    ".endr",
    port = const HYPERCALL_PORT,
    exception = const Hc::Exception as u32,
    exit = const Hc::Exit as u32,
    code = const EXCEPTION_EXIT_CODE,
    route_rsp = sym crate::route::VEIL_ROUTE_RSP,
);

extern "C" {
    /// Addresses of the 32 exception stubs (defined in the assembly above).
    static veil_isr_table: [u64; 32];
    /// The #VE handler (below).
    fn veil_ve_handler();
}

/// #VEs taken (all vCPUs).
pub static VE_COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

global_asm!(
    ".section .text.isr, \"ax\"",
    ".global veil_ve_handler",
    "veil_ve_handler:",
    "    lock inc qword ptr [rip + {count}]",
    "    iretq",
    count = sym VE_COUNT,
);

/// One 64-bit interrupt gate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    zero: u32,
}

/// The operand of `lidt`.
#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

/// Present, DPL 0, 64-bit interrupt gate.
const GATE_INTERRUPT: u8 = 0x8e;

const EMPTY: Gate = Gate {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    attr: 0,
    offset_mid: 0,
    offset_hi: 0,
    zero: 0,
};

static mut IDT: [Gate; 32] = [EMPTY; 32];

/// Fills the IDT with the exception stubs and loads it (vCPU 0, at boot).
pub fn init() {
    // SAFETY: runs once at boot on vCPU 0 with interrupts off, before anything else
    // touches IDT; the table and the stubs are static, so the IDTR stays valid forever.
    unsafe {
        let idt = &mut *addr_of_mut!(IDT);
        let table = &*core::ptr::addr_of!(veil_isr_table);
        let ve = veil_ve_handler as *const () as u64;
        let handlers = table.iter().enumerate().map(|(v, &h)| {
            if v == usize::from(veil_abi::VE_VECTOR) {
                ve
            } else {
                h
            }
        });
        for (gate, handler) in idt.iter_mut().zip(handlers) {
            *gate = Gate {
                offset_lo: handler as u16,
                selector: CODE_SELECTOR,
                ist: 0,
                attr: GATE_INTERRUPT,
                offset_mid: (handler >> 16) as u16,
                offset_hi: (handler >> 32) as u32,
                zero: 0,
            };
        }
    }
    load();
}

/// Loads the IDT on the calling vCPU (vCPU 0 fills it in [`init`]; the others only load it:
/// an exception before vCPU 0 filled it would be a triple fault, and they take none while
/// parked).
pub fn load() {
    let idtr = Idtr {
        limit: (core::mem::size_of::<[Gate; 32]>() - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is static, so the IDTR stays valid forever; lidt only reads `idtr`.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
}
