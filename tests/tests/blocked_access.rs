//! Blocked accesses KVM reports without a GPA, each ending as a violation record: an
//! instruction fetch running into a hole, instructions this host's emulator cannot emulate
//! touching a hole (decoded with iced-x86), and an exception frame pushed onto a stack in a
//! hole. Tiny hand-assembled guests, real KVM.

use std::time::Duration;

use veil_abi::IMAGE_MIN_GPA;
use veil_tests::kvm_available;
use vmm::console::ConsoleSink;
use vmm::report::{AccessKind, ExitInfo, RunReport, ViolationAction};
use vmm::stage2::BackendKind;
use vmm::{exit_code, run, ViolationPolicy, VmConfig};

/// Exit code of the guest's recovery point.
const RECOVERED: u64 = 0x42;
/// Image bytes: code at 0, a GDT with user segments at 0xe00 (pseudo-descriptor at 0xf10),
/// the IDT/GDT pseudo-descriptor at 0xf00, the IDT at 0x1000, a page
/// table at 0x2000, a scratch page at 0x3000.
const IMAGE_LEN: usize = 0x4000;

/// `mov dx, 0x5e0; Alloc(0, UNMAPPED)`; r12 = GPA of the hole, rbx = its direct-map address.
const ALLOC_HOLE: &[u8] = &[
    0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
    0x31, 0xff, // xor edi, edi
    0xbe, 2, 0, 0, 0, // mov esi, 2 (UNMAPPED)
    0xb8, 3, 0, 0, 0,    // mov eax, 3 (Hc::Alloc)
    0xef, // out dx, eax
    0x49, 0x89, 0xfc, // mov r12, rdi
    0x48, 0xbb, 0, 0, 0, 0, 0x80, 0x88, 0xff, 0xff, // movabs rbx, DIRECT_MAP_BASE
    0x4c, 0x01, 0xe3, // add rbx, r12
];

/// `Exit(code)` then `jmp $`.
fn exit(code: u8) -> Vec<u8> {
    vec![
        0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
        0xbf, code, 0, 0, 0, // mov edi, code
        0xb8, 20, 0, 0, 0,    // mov eax, 20 (Hc::Exit)
        0xef, // out dx, eax
        0xeb, 0xfe, // jmp $
    ]
}

/// Bytes of the `SetRecovery` call in [`hole_guest`].
const SET_RECOVERY_LEN: usize = 14;

/// GPA of [`hole_guest`]'s recovery point (with `recovery`).
fn recovery_point(setup: &[u8], insn: &[u8]) -> u64 {
    let len = ALLOC_HOLE.len() + SET_RECOVERY_LEN + setup.len() + insn.len() + exit(1).len();
    IMAGE_MIN_GPA + len as u64
}

/// A guest: allocate a hole, optionally `SetRecovery`, run `setup` then `insn`, exit 1 if the
/// instruction completed; the recovery point (also every IDT vector) exits [`RECOVERED`].
fn hole_guest(setup: &[u8], insn: &[u8], recovery: bool) -> Vec<u8> {
    let mut code = ALLOC_HOLE.to_vec();
    let set_recovery_at = code.len();
    if recovery {
        code.extend_from_slice(&[0xbf, 0, 0, 0, 0]); // mov edi, recover (patched below)
        code.extend_from_slice(&[0x48, 0x89, 0xe6]); // mov rsi, rsp
        code.extend_from_slice(&[0xb8, 11, 0, 0, 0, 0xef]); // SetRecovery
    }
    code.extend_from_slice(setup);
    code.extend_from_slice(insn);
    code.extend_from_slice(&exit(1));
    let recover = IMAGE_MIN_GPA as u32 + code.len() as u32;
    code.extend_from_slice(&exit(RECOVERED as u8));
    if recovery {
        debug_assert_eq!(u64::from(recover), recovery_point(setup, insn));
        code[set_recovery_at + 1..set_recovery_at + 5].copy_from_slice(&recover.to_le_bytes());
    }
    let mut image = code;
    image.resize(IMAGE_LEN, 0xcc);
    // IDT: every vector an interrupt gate to the recovery point (selector 0x08).
    for v in 0..256 {
        let off = 0x1000 + v * 16;
        let r = u64::from(recover);
        image[off..off + 2].copy_from_slice(&(r as u16).to_le_bytes());
        image[off + 2..off + 4].copy_from_slice(&0x08u16.to_le_bytes());
        image[off + 4] = 0;
        image[off + 5] = 0x8e;
        image[off + 6..off + 8].copy_from_slice(&((r >> 16) as u16).to_le_bytes());
        image[off + 8..off + 16].fill(0);
    }
    // A GDT with user segments at 0xe00 (user data 0x18, 64-bit user code 0x20), its
    // pseudo-descriptor at 0xf10.
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        image[0xe00 + i * 8..0xe08 + i * 8].copy_from_slice(&e.to_le_bytes());
    }
    image[0xf10..0xf12].copy_from_slice(&0x27u16.to_le_bytes());
    image[0xf12..0xf1a].copy_from_slice(&(IMAGE_MIN_GPA + 0xe00).to_le_bytes());
    image[0xf00..0xf02].copy_from_slice(&0x0fffu16.to_le_bytes());
    image[0xf02..0xf0a].copy_from_slice(&(IMAGE_MIN_GPA + 0x1000).to_le_bytes());
    // Scratch page: the first 3 bytes of `movabs rax, imm64` at its last 3 bytes.
    image[0x3ffd..0x4000].copy_from_slice(&[0x48, 0xb8, 0x88]);
    veil_tests::guest(&image)
}

fn run_guest(image: Vec<u8>, policy: ViolationPolicy) -> RunReport {
    run_on(image, policy, BackendKind::default())
}

fn run_on(image: Vec<u8>, policy: ViolationPolicy, stage2: BackendKind) -> RunReport {
    let mut c = VmConfig::new(image);
    c.console = ConsoleSink::Null;
    c.echo_logs = false;
    c.on_violation = policy;
    c.timeout = Some(Duration::from_secs(20));
    c.stage2 = stage2;
    run(c).expect("boot")
}

/// Runs a 10-byte `movabs` at VA 0x600ffd: 3 bytes in the scratch page, 7 in the hole
/// (a guest page table at image offset 0x2000 maps VA 0x600000 to the scratch page and
/// 0x601000 to the hole).
const STRADDLE_SETUP: &[u8] = &[
    0x4c, 0x89, 0xe0, // mov rax, r12
    0x48, 0x83, 0xc8, 0x03, // or rax, 3
    0x48, 0x89, 0x04, 0x25, 0x08, 0x20, 0x20, 0x00, // mov [0x202008], rax (PT[1] = hole)
    0x48, 0xc7, 0x04, 0x25, 0x00, 0x20, 0x20, 0x00, 0x03, 0x30, 0x20,
    0x00, // mov qword [0x202000], 0x203003
    0x48, 0xc7, 0x04, 0x25, 0x18, 0x20, 0x10, 0x00, 0x03, 0x20, 0x20,
    0x00, // mov qword [0x102018], 0x202003 (PD[3])
    0x0f, 0x01, 0x3c, 0x25, 0x00, 0x00, 0x60, 0x00, // invlpg [0x600000]
    0x0f, 0x01, 0x3c, 0x25, 0x00, 0x10, 0x60, 0x00, // invlpg [0x601000]
];
/// `mov eax, 0x600ffd; jmp rax`.
const STRADDLE_JMP: &[u8] = &[0xb8, 0xfd, 0x0f, 0x60, 0x00, 0xff, 0xe0];

/// `lidt [0x200f00]` (every vector to the recovery point), then RSP = top of the hole.
const STACK_IN_HOLE: &[u8] = &[
    0x0f, 0x01, 0x1c, 0x25, 0x00, 0x0f, 0x20, 0x00, // lidt [0x200f00]
    0x48, 0x89, 0xdc, // mov rsp, rbx
    0x48, 0x81, 0xc4, 0x00, 0x10, 0x00, 0x00, // add rsp, 0x1000
];

/// GDT base = the hole (`mov [0x200f02], rbx; lgdt [0x200f00]`), selector 0x10 in ecx.
const GDT_IN_HOLE: &[u8] = &[
    0x48, 0x89, 0x1c, 0x25, 0x02, 0x0f, 0x20, 0x00, // mov [0x200f02], rbx
    0x0f, 0x01, 0x14, 0x25, 0x00, 0x0f, 0x20, 0x00, // lgdt [0x200f00]
    0xb9, 0x10, 0, 0, 0, // mov ecx, 0x10
];

/// Enters ring 3 (`lgdt` of the image's GDT with user segments; `iretq` to CS 0x23, SS 0x1b,
/// RFLAGS with IOPL 3, which this host does not keep for user code) and goes on with the next
/// instruction.
const RING3: &[u8] = &[
    0x0f, 0x01, 0x14, 0x25, 0x10, 0x0f, 0x20, 0x00, // lgdt [0x200f10]
    0x48, 0x89, 0xe0, // mov rax, rsp
    0x48, 0x8d, 0x0d, 0x0d, 0x00, 0x00, 0x00, // lea rcx, [rip + 13] (after iretq)
    0x6a, 0x1b, // push 0x1b (SS)
    0x50, // push rax (RSP)
    0x68, 0x02, 0x30, 0x00, 0x00, // push 0x3002 (RFLAGS, IOPL 3)
    0x6a, 0x23, // push 0x23 (CS)
    0x51, // push rcx (RIP)
    0x48, 0xcf, // iretq
];

/// PD entry 3 (VA 6 MiB) points at a page table in the hole.
const PT_IN_HOLE: &[u8] = &[
    0x4c, 0x89, 0xe0, // mov rax, r12
    0x48, 0x83, 0xc8, 0x03, // or rax, 3
    0x48, 0x89, 0x04, 0x25, 0x18, 0x20, 0x10, 0x00, // mov [0x102018], rax
    0x0f, 0x01, 0x3c, 0x25, 0x00, 0x00, 0x60, 0x00, // invlpg [0x600000]
];

/// The records with `action` (those the VMM made from decoding, for `Recovered`).
fn decoded(r: &RunReport, action: ViolationAction) -> Vec<&vmm::report::Violation> {
    r.violations.iter().filter(|v| v.action == action).collect()
}

/// The violation is on the hole the guest allocated (an allocated page of an unmapped
/// pageblock) at page offset `off`.
fn on_hole(v: &vmm::report::Violation, off: u64) {
    assert_eq!(v.gpa.map(|g| g & 0xfff), Some(off), "{v:?}");
    assert_eq!(v.owner, "allocated", "{v:?}");
    assert!(
        v.freetype.as_deref().unwrap_or("").contains("unmapped"),
        "{v:?}"
    );
}

/// Runs `setup; insn` with a recovery point: the guest must come back through it, with exactly
/// one record (returned) made with action `Recovered`.
fn recovered_once(setup: &[u8], insn: &[u8]) -> vmm::report::Violation {
    let r = run_guest(hole_guest(setup, insn, true), ViolationPolicy::Report);
    assert_eq!(
        r.exit,
        ExitInfo::GuestExit { code: RECOVERED },
        "{}",
        r.exit.summary()
    );
    let v = decoded(&r, ViolationAction::Recovered);
    assert_eq!(v.len(), 1, "{:?}", r.violations);
    v[0].clone()
}

#[test]
fn fetch_running_into_a_hole_is_recorded_and_honours_the_recovery_point() {
    if !kvm_available() {
        return;
    }
    let v = recovered_once(STRADDLE_SETUP, STRADDLE_JMP);
    on_hole(&v, 0);
    assert_eq!((v.access, v.rip), (AccessKind::Fetch, 0x60_0ffd));

    let r = run_guest(
        hole_guest(STRADDLE_SETUP, STRADDLE_JMP, false),
        ViolationPolicy::Report,
    );
    match &r.exit {
        ExitInfo::FetchWithoutRecovery { violation } => {
            on_hole(violation, 0);
            assert_eq!(violation.access, AccessKind::Fetch);
            assert_eq!(violation.action, ViolationAction::Stopped);
        }
        e => panic!("expected a stop with the record, got {e:?}"),
    }
    assert_eq!(r.exit_code(), exit_code::CRASH);
}

/// Instructions this host's emulator cannot emulate, each on the hole: (name, setup, bytes,
/// kind and size of the decoded access, page offset).
#[allow(clippy::type_complexity)]
fn unemulatable() -> Vec<(
    &'static str,
    &'static [u8],
    &'static [u8],
    AccessKind,
    u32,
    u64,
)> {
    use AccessKind::{Read, Write};
    vec![
        (
            "cmpxchg16b",
            &[],
            &[0xf0, 0x48, 0x0f, 0xc7, 0x0b],
            Write,
            16,
            0,
        ),
        ("fxsave", &[], &[0x0f, 0xae, 0x03], Write, 512, 0),
        ("fxrstor", &[], &[0x0f, 0xae, 0x0b], Read, 512, 0),
        ("fnstenv", &[], &[0xd9, 0x33], Write, 28, 0),
        (
            "popcnt m64",
            &[],
            &[0xf3, 0x48, 0x0f, 0xb8, 0x03],
            Read,
            8,
            0,
        ),
        (
            "crc32 m32",
            &[],
            &[0xf2, 0x0f, 0x38, 0xf1, 0x03],
            Read,
            4,
            0,
        ),
        ("fld m80", &[], &[0xdb, 0x2b], Read, 10, 0),
        ("fld m64", &[], &[0xdd, 0x03], Read, 8, 0),
        (
            "movntdqa",
            &[],
            &[0x66, 0x0f, 0x38, 0x2a, 0x03],
            Read,
            16,
            0,
        ),
        ("clwb", &[], &[0x66, 0x0f, 0xae, 0x33], Read, 1, 0),
        ("far call m16:64", &[], &[0x48, 0xff, 0x1b], Read, 10, 0),
        (
            "paddd (SSE integer, ring 0)",
            &[],
            &[0x66, 0x0f, 0xfe, 0x03],
            Read,
            16,
            0,
        ),
        (
            "paddd (SSE integer, ring 3)",
            RING3,
            &[0x66, 0x0f, 0xfe, 0x03],
            Read,
            16,
            0,
        ),
        (
            "lar, GDT in the hole",
            GDT_IN_HOLE,
            &[0x0f, 0x02, 0xc1],
            Read,
            8,
            0x10,
        ),
        (
            "verr, GDT in the hole",
            GDT_IN_HOLE,
            &[0x0f, 0x00, 0xe1],
            Read,
            8,
            0x10,
        ),
    ]
}

#[test]
fn unemulatable_instructions_touching_a_hole_are_decoded_and_recorded() {
    if !kvm_available() {
        return;
    }
    for (name, setup, insn, kind, size, off) in unemulatable() {
        let r = run_guest(hole_guest(setup, insn, true), ViolationPolicy::Report);
        match &r.exit {
            ExitInfo::GuestExit { code: RECOVERED } => {}
            // Ring 3 resumes at the recovery point still in ring 3, where this host runs user
            // code with IOPL 0: the recovery code's hypercall `out` faults (no IDT: a triple
            // fault) with CS still the user selector.
            ExitInfo::TripleFault { regs } if setup == RING3 => assert_eq!(regs.cs, 0x23),
            e => panic!("{name}: {}", e.summary()),
        }
        let v = decoded(&r, ViolationAction::Recovered);
        assert!(
            v.iter().any(|v| v.access == kind && v.size == size),
            "{name}: no {kind:?} of {size} bytes in {:?}",
            r.violations
        );
        for x in &v {
            on_hole(x, off);
        }
    }
}

#[test]
fn without_a_recovery_point_or_under_kill_the_vm_stops_with_the_record() {
    if !kvm_available() {
        return;
    }
    let fxsave: &[u8] = &[0x0f, 0xae, 0x03];
    let r = run_guest(hole_guest(&[], fxsave, false), ViolationPolicy::Report);
    match &r.exit {
        ExitInfo::FetchWithoutRecovery { violation } => {
            on_hole(violation, 0);
            assert_eq!((violation.access, violation.size), (AccessKind::Write, 512));
            assert_eq!(violation.action, ViolationAction::Stopped);
        }
        e => panic!("expected a stop with the record, got {e:?}"),
    }
    assert_eq!(r.exit_code(), exit_code::CRASH);
    let r = run_guest(hole_guest(&[], fxsave, true), ViolationPolicy::Kill);
    match &r.exit {
        ExitInfo::ViolationKill { violation } => {
            assert_eq!((violation.access, violation.size), (AccessKind::Write, 512));
            assert_eq!(violation.action, ViolationAction::Killed);
        }
        e => panic!("expected a kill, got {e:?}"),
    }
    assert_eq!(r.exit_code(), exit_code::CRASH);
}

#[test]
fn an_unemulatable_instruction_on_reachable_memory_is_not_a_violation() {
    if !kvm_available() {
        return;
    }
    // cmpxchg16b on reserved memory (0x300000): the same emulation failure, no hole touched.
    let setup: &[u8] = &[0xbb, 0x00, 0x00, 0x30, 0x00]; // mov ebx, 0x300000
    let r = run_guest(
        hole_guest(setup, &[0xf0, 0x48, 0x0f, 0xc7, 0x0b], true),
        ViolationPolicy::Report,
    );
    match &r.exit {
        // This host emulates ring-0 code and cannot emulate cmpxchg16b: the report says what
        // the instruction touched.
        ExitInfo::InternalError { insn, .. } => {
            let insn = insn.as_ref().expect("decoded instruction");
            assert_eq!(insn.decoded, "cmpxchg16b");
            assert!(
                insn.accesses
                    .iter()
                    .all(|a| a.gpa == Some(0x30_0000) && a.state == Some("reserved")),
                "{insn:?}"
            );
            let text = r.exit.summary();
            assert!(text.contains("cmpxchg16b (f0 48 0f c7 0b"), "{text}");
            assert!(text.contains("GPA 0x300000 (reserved)"), "{text}");
        }
        // A host that runs it natively completes it.
        ExitInfo::GuestExit { code: 1 } => {}
        e => panic!("expected KVM's internal error or completion, got {e:?}"),
    }
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}

#[test]
fn an_exception_frame_pushed_onto_a_stack_in_a_hole_is_recorded() {
    if !kvm_available() {
        return;
    }
    // int 0x20: KVM fails to emulate the delivery; the frame push is charged, the recovery
    // point is honoured.
    let v = recovered_once(STACK_IN_HOLE, &[0xcd, 0x20]);
    assert_eq!((v.access, v.size), (AccessKind::Write, 40));
    on_hole(&v, 0x1000 - 40);
    // ud2: the #UD frame cannot be pushed, KVM shuts the vCPU down; the push is recorded and
    // the VM stops (a shut-down vCPU is not resumed, recovery point or not).
    let r = run_guest(
        hole_guest(STACK_IN_HOLE, &[0x0f, 0x0b], true),
        ViolationPolicy::Report,
    );
    match &r.exit {
        ExitInfo::FetchWithoutRecovery { violation } => {
            // The vector is not known at a shutdown: the largest frame is charged.
            assert_eq!((violation.access, violation.size), (AccessKind::Write, 48));
            on_hole(violation, 0x1000 - 48);
        }
        e => panic!("expected a stop with the record, got {e:?}"),
    }
    assert_eq!(r.exit_code(), exit_code::CRASH);
}

#[test]
fn a_page_walk_through_a_table_in_a_hole_is_recorded() {
    if !kvm_available() {
        return;
    }
    // jmp to VA 6 MiB whose page table is the hole: KVM's walk fails (a #PF with no IDT: a
    // triple fault); the VMM's checked walker records the table read and computes nothing.
    let jmp: &[u8] = &[0xb8, 0x00, 0x00, 0x60, 0x00, 0xff, 0xe0];
    let r = run_guest(hole_guest(PT_IN_HOLE, jmp, false), ViolationPolicy::Report);
    match &r.exit {
        ExitInfo::FetchWithoutRecovery { violation } => {
            assert_eq!((violation.access, violation.size), (AccessKind::Read, 8));
            assert_eq!(violation.rip, 0x60_0000);
            on_hole(violation, 0);
        }
        e => panic!("expected a stop with the record, got {e:?}"),
    }
}

/// A guest looping 2,000 times over `SetRecovery(top); body; Nop; jmp top`: with `fxsave
/// [rbx]` on the hole each pass is one hypercall and one attributed emulation failure; with
/// three `nop`s, two hypercalls.
fn loop_guest(body: &[u8; 3]) -> Vec<u8> {
    let mut code = ALLOC_HOLE.to_vec();
    code.extend_from_slice(&[0x41, 0xbd, 0xd0, 0x07, 0, 0]); // mov r13d, 2000
    let top = IMAGE_MIN_GPA as u32 + code.len() as u32;
    code.push(0xbf); // mov edi, top
    code.extend_from_slice(&top.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x89, 0xe6, 0xb8, 11, 0, 0, 0, 0xef]); // SetRecovery
    code.extend_from_slice(&[0x41, 0xff, 0xcd, 0x74, 0x0b]); // dec r13d; jz done
    code.extend_from_slice(body);
    code.extend_from_slice(&[0xb8, 1, 0, 0, 0, 0xef, 0xeb, 0xe2]); // Nop; jmp top
    code.extend_from_slice(&exit(0));
    veil_tests::guest(&code)
}

/// Measurement, not a test: the time per attributed emulation-failure exit on this host
/// (`cargo test --release -p veil-tests --test blocked_access -- --ignored --nocapture`).
#[test]
#[ignore]
fn measure_attribution_per_exit() {
    let time = |body: &[u8; 3]| {
        let r = run_guest(loop_guest(body), ViolationPolicy::Report);
        assert_eq!(
            r.exit,
            ExitInfo::GuestExit { code: 0 },
            "{}",
            r.exit.summary()
        );
        (r.timing.run_ms, r.violations_total)
    };
    let (hole_ms, v) = time(&[0x0f, 0xae, 0x03]);
    let (base_ms, _) = time(&[0x90, 0x90, 0x90]);
    assert_eq!(v, 1999);
    println!(
        "2000 passes: fxsave on a hole {hole_ms:.1} ms, nops {base_ms:.1} ms: \
         {:.2} us per attributed exit more than a Nop hypercall",
        (hole_ms - base_ms) * 1000.0 / 1999.0
    );
}

/// The exit of a ring-3 guest resumed at its recovery point: still in ring 3 (this host keeps
/// IOPL 0 for user code), the recovery code's hypercall `out` faults with no way to deliver
/// it, so the vCPU shuts down at that `out`, 14 bytes into the recovery point.
fn resumed_in_ring3(r: &RunReport, setup: &[u8], insn: &[u8]) {
    match &r.exit {
        ExitInfo::TripleFault { regs } => {
            assert_eq!(regs.cs, 0x23, "{regs:?}");
            assert_eq!(regs.rip, recovery_point(setup, insn) + 14, "{regs:?}");
        }
        e => panic!(
            "expected the recovery point's shutdown, got {}",
            e.summary()
        ),
    }
}

/// `mov rax, [rbx + 0x18]`: an 8-byte load 0x18 bytes into the hole.
const LOAD_18: &[u8] = &[0x48, 0x8b, 0x43, 0x18];

#[test]
fn ring3_load_under_mprotect_is_a_violation_at_its_gpa_and_resumes_at_the_recovery_point() {
    if !kvm_available() {
        return;
    }
    // Under mprotect a ring-3 access to a closed page arrives as KVM_RUN failing with EFAULT
    // (no GPA, no exit): the VMM decodes the load and locates it.
    let r = run_on(
        hole_guest(RING3, LOAD_18, true),
        ViolationPolicy::Report,
        BackendKind::Mprotect,
    );
    resumed_in_ring3(&r, RING3, LOAD_18);
    assert_eq!(
        (r.timing.exits.memory_faults, r.timing.exits.mmio),
        (1, 0),
        "one EFAULT, no MMIO exit"
    );
    assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
    let v = &r.violations[0];
    on_hole(v, 0x18);
    assert_eq!((v.access, v.size), (AccessKind::Read, 8), "{v:?}");
    assert_eq!(v.action, ViolationAction::Recovered);
    assert_eq!(v.rip, recovery_point(RING3, LOAD_18) - 17 - 4, "{v:?}");
}

/// Ring 0 turns on AVX (CR4.OSXSAVE, XCR0 = x87|SSE|AVX), then enters ring 3, which sets
/// ymm2 = all ones (the gather mask) and ymm1 = 0 (the indices).
const AVX_RING3: &[u8] = &[
    0x0f, 0x20, 0xe0, // mov rax, cr4
    0x48, 0x0d, 0x00, 0x00, 0x04, 0x00, // or rax, 0x40000 (OSXSAVE)
    0x0f, 0x22, 0xe0, // mov cr4, rax
    0x31, 0xc9, 0x31, 0xd2, // xor ecx, ecx; xor edx, edx
    0xb8, 0x07, 0, 0, 0, // mov eax, 7
    0x0f, 0x01, 0xd1, // xsetbv
];
/// After [`AVX_RING3`] and [`RING3`]: `vpcmpeqd ymm2, ymm2, ymm2; vpxor ymm1, ymm1, ymm1`.
const GATHER_REGS: &[u8] = &[0xc5, 0xed, 0x76, 0xd2, 0xc5, 0xf5, 0xef, 0xc9];
/// `vpgatherdd ymm0, [rbx + ymm1*4], ymm2`: eight 4-byte loads from the hole, addressed
/// through a vector index the decoder does not read (an address it cannot compute).
const GATHER: &[u8] = &[0xc4, 0xe2, 0x6d, 0x90, 0x04, 0x8b];

fn gather_setup() -> Vec<u8> {
    [AVX_RING3, RING3, GATHER_REGS].concat()
}

#[test]
fn an_unattributable_ring3_efault_is_a_violation_at_an_unknown_address() {
    if !kvm_available() {
        return;
    }
    let setup = gather_setup();
    let gather_rip = recovery_point(&setup, GATHER) - 17 - GATHER.len() as u64;
    // With a recovery point: one record, no GPA, the kind and size decoding tells (a 4-byte
    // element load), and the guest resumes there.
    let r = run_on(
        hole_guest(&setup, GATHER, true),
        ViolationPolicy::Report,
        BackendKind::Mprotect,
    );
    resumed_in_ring3(&r, &setup, GATHER);
    assert_eq!(r.timing.exits.memory_faults, 1);
    assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
    let v = &r.violations[0];
    assert_eq!(v.gpa, None, "{v:?}");
    assert_eq!((v.access, v.size, v.rip), (AccessKind::Read, 4, gather_rip));
    assert_eq!((v.owner, v.freetype.as_deref()), ("unknown", None));
    assert_eq!(v.action, ViolationAction::Recovered);
    assert_eq!(r.violations_total, 1);
    let j = serde_json::to_value(&r).unwrap();
    assert!(
        j["violations"][0]["gpa"].is_null(),
        "{}",
        j["violations"][0]
    );

    // Without one: a violation stop (not a KVM error) naming the unknown address.
    let r = run_on(
        hole_guest(&setup, GATHER, false),
        ViolationPolicy::Report,
        BackendKind::Mprotect,
    );
    match &r.exit {
        ExitInfo::FetchWithoutRecovery { violation } => {
            // No SetRecovery call before the gather this time.
            let rip = gather_rip - SET_RECOVERY_LEN as u64;
            assert_eq!((violation.gpa, violation.rip), (None, rip));
            assert_eq!(violation.action, ViolationAction::Stopped);
        }
        e => panic!("expected a violation stop, got {e:?}"),
    }
    assert!(
        r.exit.summary().contains("unknown address"),
        "{}",
        r.exit.summary()
    );
    assert_eq!(r.exit_code(), exit_code::CRASH);

    // Under kill (undeclared): the kill, with the record.
    let r = run_on(
        hole_guest(&setup, GATHER, true),
        ViolationPolicy::Kill,
        BackendKind::Mprotect,
    );
    match &r.exit {
        ExitInfo::ViolationKill { violation } => {
            assert_eq!((violation.gpa, violation.access), (None, AccessKind::Read));
            assert_eq!(violation.action, ViolationAction::Killed);
        }
        e => panic!("expected the kill, got {e:?}"),
    }
    assert_eq!(r.violations.len(), 1);
}
