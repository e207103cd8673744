//! Helpers for Veil's end-to-end tests (in `tests/tests/`): the `/dev/kvm` gate and tiny
//! hand-assembled guests built as raw ELF bytes (no extra toolchain needed).
//!
//! Tests that run the `veil` binary live in `vmm/tests/cli.rs`, where Cargo provides
//! `CARGO_BIN_EXE_veil`; the tests here drive the VMM through its library API.

mod kvm_gate;
mod rng;

pub use kvm_gate::kvm_available;
pub use rng::Rng;
use veil_abi::IMAGE_MIN_GPA;
use vmm::console::ConsoleSink;
use vmm::memory::MemSize;
use vmm::VmConfig;

/// A configuration for the tiny guest `code` with `mem` bytes of RAM, console and guest log
/// lines discarded.
pub fn quiet_config(code: &[u8], mem: u64) -> VmConfig {
    let mut c = VmConfig::new(guest(code));
    c.mem = MemSize(mem);
    c.console = ConsoleSink::Null;
    c.echo_logs = false;
    c
}

/// A booted (not running) VM of the tiny guest [`EXIT0`] with 32 MiB of RAM and `vcpus`
/// vCPUs, for tests that drive its session's hypercalls directly.
pub fn session_vm(vcpus: u32) -> vmm::vm::Vm {
    let mut cfg = quiet_config(EXIT0, 32 << 20);
    cfg.vcpus = vcpus;
    vmm::vm::Vm::new(cfg).expect("boot")
}

/// A field of this process's /proc/self/status in kB (`"VmHWM:"`, `"VmRSS:"`).
pub fn proc_status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// A guest ELF whose code is `code`, loaded and entered at `IMAGE_MIN_GPA`.
pub fn guest(code: &[u8]) -> Vec<u8> {
    vmm::elf::build_elf(IMAGE_MIN_GPA, code, 0)
}

/// `jmp $`: spins forever in ring 0.
pub const SPIN: &[u8] = &[0xeb, 0xfe];

/// `ud2` with no IDT: #UD, then #DF, then a triple fault.
pub const UD2: &[u8] = &[0x0f, 0x0b];

/// `hlt` with interrupts off.
pub const HLT: &[u8] = &[0xf4];

/// `Exit(0)`: `mov edi, 0; mov eax, 20; mov dx, 0x5e0; out dx, eax; jmp $`.
pub const EXIT0: &[u8] = &[
    0xbf, 0, 0, 0, 0, // mov edi, 0
    0xb8, 20, 0, 0, 0, // mov eax, 20 (Hc::Exit)
    0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
    0xef, // out dx, eax
    0xeb, 0xfe, // jmp $
];

/// Reports a #GP through `Hc::Exception(13, 0, 0x1234, 0)`.
pub const EXCEPTION: &[u8] = &[
    0xbf, 13, 0, 0, 0, // mov edi, 13
    0xbe, 0, 0, 0, 0, // mov esi, 0
    0xb9, 0x34, 0x12, 0, 0, // mov ecx, 0x1234
    0x45, 0x31, 0xc0, // xor r8d, r8d
    0xb8, 18, 0, 0, 0, // mov eax, 18 (Hc::Exception)
    0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
    0xef, // out dx, eax
    0xeb, 0xfe, // jmp $
];

/// Maps VA 6 MiB to GPA 1 GiB (not RAM with `--mem` below 1 GiB) in the boot page tables,
/// loads 8 bytes from it and exits with the low byte (0xff if the VMM answers as for not-RAM).
pub const NOT_RAM: &[u8] = &[
    0x48, 0xc7, 0xc0, 0xe3, 0x00, 0x00, 0x40, // mov rax, 0x400000e3 (2 MiB page at 1 GiB)
    0x48, 0x89, 0x04, 0x25, 0x18, 0x20, 0x10, 0x00, // mov [0x102018], rax (PD entry 3)
    0x0f, 0x01, 0x3c, 0x25, 0x00, 0x00, 0x60, 0x00, // invlpg [0x600000]
    0x48, 0x8b, 0x1c, 0x25, 0x00, 0x00, 0x60, 0x00, // mov rbx, [0x600000]
    0x0f, 0xb6, 0xfb, // movzx edi, bl
    0xb8, 20, 0, 0, 0, // mov eax, 20 (Hc::Exit)
    0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
    0xef, // out dx, eax
    0xeb, 0xfe, // jmp $
];

/// The GPA [`NOT_RAM`] reads.
pub const NOT_RAM_GPA: u64 = 0x4000_0000;

/// Allocates one unmapped page (`Alloc(0, UNMAPPED)`), plants 0x5a in it with `HostFill` (a
/// harness call), loads 8 bytes through the direct map, stores 8 bytes at +8, asks `HostCount`
/// for the 0x5a bytes (the old byte-equality oracle) and exits with
/// `loaded_low_byte | (status == Unreachable) << 8`: 0x1a5 means the load got poison and the
/// VMM refused to count bytes of a page the guest cannot reach.
pub const UNMAPPED_RW: &[u8] = &[
    0xbf, 0, 0, 0, 0, // mov edi, 0 (order)
    0xbe, 2, 0, 0, 0, // mov esi, 2 (gfp UNMAPPED)
    0xb8, 3, 0, 0, 0, // mov eax, 3 (Hc::Alloc)
    0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
    0xef, // out dx, eax
    0x49, 0x89, 0xfc, // mov r12, rdi (GPA)
    0xbe, 0x00, 0x10, 0, 0, // mov esi, 4096
    0xb9, 0x5a, 0, 0, 0, // mov ecx, 0x5a
    0xb8, 16, 0, 0, 0,    // mov eax, 16 (Hc::HostFill)
    0xef, // out dx, eax
    0x48, 0xbb, 0, 0, 0, 0, 0x80, 0x88, 0xff, 0xff, // movabs rbx, DIRECT_MAP_BASE
    0x4c, 0x01, 0xe3, // add rbx, r12
    0x4c, 0x8b, 0x2b, // mov r13, [rbx]
    0x48, 0xc7, 0x43, 0x08, 0x77, 0, 0, 0, // mov qword [rbx+8], 0x77
    0x4c, 0x89, 0xe7, // mov rdi, r12
    0xbe, 0x00, 0x10, 0, 0, // mov esi, 4096
    0xb9, 0x5a, 0, 0, 0, // mov ecx, 0x5a
    0xb8, 17, 0, 0, 0,    // mov eax, 17 (Hc::HostCount)
    0xef, // out dx, eax
    0x4d, 0x31, 0xf6, // xor r14, r14
    0x48, 0x83, 0xf8, 0x10, // cmp rax, 16 (Status::Unreachable)
    0x41, 0x0f, 0x94, 0xc6, // sete r14b
    0x49, 0xc1, 0xe6, 0x08, // shl r14, 8
    0x41, 0x0f, 0xb6, 0xfd, // movzx edi, r13b
    0x4c, 0x09, 0xf7, // or rdi, r14
    0xb8, 20, 0, 0, 0,    // mov eax, 20 (Hc::Exit)
    0xef, // out dx, eax
    0xeb, 0xfe, // jmp $
];

/// Allocates one unmapped page and `call`s into it through the direct map with no recovery
/// point registered: a fetch violation that must stop the VM.
pub const FETCH_NO_RECOVERY: &[u8] = &[
    0xbf, 0, 0, 0, 0, // mov edi, 0
    0xbe, 2, 0, 0, 0, // mov esi, 2 (UNMAPPED)
    0xb8, 3, 0, 0, 0, // mov eax, 3 (Hc::Alloc)
    0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
    0xef, // out dx, eax
    0x48, 0xbb, 0, 0, 0, 0, 0x80, 0x88, 0xff, 0xff, // movabs rbx, DIRECT_MAP_BASE
    0x48, 0x01, 0xfb, // add rbx, rdi
    0xff, 0xd3, // call rbx
    0xeb, 0xfe, // jmp $
];

/// A guest with two tests, `t1` and `t2`, that both read an unmapped page once and both tell
/// the VMM they passed; only `t2` declared the violation with `ExpectViolation`. The VMM must
/// fail `t1` on its own. Names and message live at image offset 0x100 ("t1t2ok").
pub fn two_tests_guest() -> Vec<u8> {
    const CODE: &[u8] = &[
        0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
        0xbf, 0x00, 0x01, 0x20, 0x00, // mov edi, 0x200100 ("t1")
        0xbe, 2, 0, 0, 0, // mov esi, 2
        0xb8, 6, 0, 0, 0, 0xef, // TestAnnounce
        0xbf, 0x02, 0x01, 0x20, 0x00, // mov edi, 0x200102 ("t2")
        0xbe, 2, 0, 0, 0, // mov esi, 2
        0xb8, 6, 0, 0, 0, 0xef, // TestAnnounce
        0xbf, 0, 0, 0, 0, // mov edi, 0
        0xbe, 2, 0, 0, 0, // mov esi, 2 (UNMAPPED)
        0xb8, 3, 0, 0, 0, 0xef, // Alloc
        0x49, 0x89, 0xfc, // mov r12, rdi
        0x48, 0xbb, 0, 0, 0, 0, 0x80, 0x88, 0xff, 0xff, // movabs rbx, DIRECT_MAP_BASE
        0x4c, 0x01, 0xe3, // add rbx, r12
        0xbf, 0x00, 0x01, 0x20, 0x00, // mov edi, 0x200100
        0xbe, 2, 0, 0, 0, // mov esi, 2
        0xb8, 7, 0, 0, 0, 0xef, // TestBegin t1
        0x48, 0x8b, 0x03, // mov rax, [rbx]   (undeclared violation)
        0xbf, 0, 0, 0, 0, // mov edi, 0 (Pass)
        0xbe, 0x04, 0x01, 0x20, 0x00, // mov esi, 0x200104 ("ok")
        0xb9, 2, 0, 0, 0, // mov ecx, 2
        0xb8, 8, 0, 0, 0, 0xef, // TestEnd
        0xbf, 0x02, 0x01, 0x20, 0x00, // mov edi, 0x200102
        0xbe, 2, 0, 0, 0, // mov esi, 2
        0xb8, 7, 0, 0, 0, 0xef, // TestBegin t2
        0x4c, 0x89, 0xe7, // mov rdi, r12
        0xbe, 1, 0, 0, 0, // mov esi, 1 (Read)
        0xb9, 1, 0, 0, 0, // mov ecx, 1
        0xb8, 9, 0, 0, 0, 0xef, // ExpectViolation
        0x48, 0x8b, 0x03, // mov rax, [rbx]   (declared violation)
        0xbf, 0, 0, 0, 0, // mov edi, 0 (Pass)
        0xbe, 0x04, 0x01, 0x20, 0x00, // mov esi, 0x200104
        0xb9, 2, 0, 0, 0, // mov ecx, 2
        0xb8, 8, 0, 0, 0, 0xef, // TestEnd
        0xbf, 0, 0, 0, 0, // mov edi, 0
        0xb8, 20, 0, 0, 0, 0xef, // Exit(0)
        0xeb, 0xfe, // jmp $
    ];
    let mut image = CODE.to_vec();
    image.resize(0x100, 0xcc);
    image.extend_from_slice(b"t1t2ok");
    guest(&image)
}

/// `Alloc(0, UNMAPPED)`, then `rbx` = the page's direct-map address (`rdi` its GPA; `dx`
/// stays the hypercall doorbell): the prologue of the tiny guests that attack an unmapped page.
pub const ALLOC_UNMAPPED: &[u8] = &[
    0xbf, 0, 0, 0, 0, // mov edi, 0 (order)
    0xbe, 2, 0, 0, 0, // mov esi, 2 (UNMAPPED)
    0xb8, 3, 0, 0, 0, // mov eax, 3 (Hc::Alloc)
    0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
    0xef, // out dx, eax
    0x48, 0xbb, 0, 0, 0, 0, 0x80, 0x88, 0xff, 0xff, // movabs rbx, DIRECT_MAP_BASE
    0x48, 0x01, 0xfb, // add rbx, rdi
];

/// GPA of the load in [`storm_guest`]'s loop.
pub const STORM_LOAD_RIP: u64 = IMAGE_MIN_GPA + 53;

/// Allocates one unmapped page and loads 8 bytes from it through the direct map `n` times in
/// a loop, at offset `(8 * i) & 0xff8` for i = n..1 (so two consecutive loads never hit the same
/// GPA: a storm, not a livelock), then `Exit(0)`: `n` read violations from one instruction on
/// one page.
pub fn storm_guest(n: u32) -> Vec<u8> {
    let mut code = ALLOC_UNMAPPED.to_vec();
    code.push(0xb9); // mov ecx, n
    code.extend_from_slice(&n.to_le_bytes());
    code.extend_from_slice(&[
        0x44, 0x8d, 0x04, 0xcd, 0, 0, 0, 0, // 1: lea r8d, [rcx * 8]
        0x41, 0x81, 0xe0, 0xf8, 0x0f, 0, 0, // and r8d, 0xff8
        0x4a, 0x8b, 0x04, 0x03, // mov rax, [rbx + r8]   (STORM_LOAD_RIP)
        0xff, 0xc9, // dec ecx
        0x75, 0xe9, // jnz 1b
        0xbf, 0, 0, 0, 0, // mov edi, 0
        0xb8, 20, 0, 0, 0,    // mov eax, 20 (Hc::Exit)
        0xef, // out dx, eax
        0xeb, 0xfe, // jmp $
    ]);
    guest(&code)
}
