//! The ELF entry point: the VMM jumps here in long mode with a stack and `rdi` = boot info.

use core::arch::global_asm;

// The VMM sets RSP = STACK_TOP_GPA (16-byte aligned) and RDI = BOOT_INFO_GPA; the `call` keeps
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
