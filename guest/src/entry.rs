//! The ELF entry point: the VMM jumps here in long mode with a stack, `rdi` = boot info and
//! `rsi` = the vCPU's index, on every vCPU.

use core::arch::global_asm;

// The VMM sets RSP = ap_stack_top(vcpu) (16-byte aligned), RDI = BOOT_INFO_GPA and RSI = the
// vCPU index (kmain's second argument); the `call` keeps
// the System V alignment (rsp = 8 mod 16 at kmain's first instruction). kmain never returns.
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    xor ebp, ebp",
    "    cld",
    "    call kmain",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
);
