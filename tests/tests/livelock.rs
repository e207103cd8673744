//! Livelocks on real guests: one tiny guest per livelock kind this host shows (fault loops and
//! silent spins), each stopped by the detector long before the timeout with a record naming the
//! RIP and the GPA in the hole; and the look-alikes that must not be called livelocks.

use std::time::{Duration, Instant};

use veil_tests::*;
use vmm::console::ConsoleSink;
use vmm::report::{AccessKind, ExitInfo, LivelockShape};
use vmm::{run, RunReport, VmConfig};

/// `Exit(0)`.
const EXIT0: &[u8] = &[0xbf, 0, 0, 0, 0, 0xb8, 20, 0, 0, 0, 0xef, 0xeb, 0xfe];

/// Generous: every livelock must be stopped by the detector, not by this.
const TIMEOUT: Duration = Duration::from_secs(30);

fn run_code(payload: &[u8], timeout: Duration) -> (RunReport, Duration) {
    run_guest(payload, false, timeout)
}

/// `SetRecovery(rip = the Exit(0) after `payload_len` bytes of payload, rsp = rsp)`.
fn set_recovery(payload_len: usize) -> Vec<u8> {
    // lea rdi, [rip + d]: d counts from the end of the lea to the end of the payload.
    let tail = 3 + 5 + 1 + payload_len; // mov rsi, rsp; mov eax, 11; out dx, eax; payload
    let mut v = vec![0x48, 0x8d, 0x3d];
    v.extend_from_slice(&(tail as u32).to_le_bytes());
    v.extend_from_slice(&[
        0x48, 0x89, 0xe6, // mov rsi, rsp
        0xb8, 11, 0, 0, 0,    // mov eax, 11 (Hc::SetRecovery)
        0xef, // out dx, eax
    ]);
    v
}

fn run_guest(payload: &[u8], recovery: bool, timeout: Duration) -> (RunReport, Duration) {
    let mut code = ALLOC_UNMAPPED.to_vec();
    if recovery {
        code.extend_from_slice(&set_recovery(payload.len()));
    }
    code.extend_from_slice(payload);
    code.extend_from_slice(EXIT0);
    let mut c = VmConfig::new(guest(&code));
    c.console = ConsoleSink::Null;
    c.echo_logs = false;
    c.timeout = Some(timeout);
    let t = Instant::now();
    let r = run(c).expect("boot");
    (r, t.elapsed())
}

/// The GPA of the unmapped page `ALLOC_UNMAPPED` got: the first one the allocator hands out.
fn first_unmapped_page(r: &RunReport) -> u64 {
    r.violations
        .first()
        .map(|v| v.page())
        .expect("a violation record")
}

fn expect_livelock(name: &str, payload: &[u8], shape: LivelockShape, access: Option<AccessKind>) {
    let (r, took) = run_code(payload, TIMEOUT);
    eprintln!("{name}: stopped after {took:?}: {}", r.exit.summary());
    let ExitInfo::Livelock {
        gpa,
        access: a,
        shape: s,
        instruction,
        rip,
        ..
    } = &r.exit
    else {
        panic!("{name}: expected a livelock, got {}", r.exit.summary());
    };
    assert_eq!(*s, shape, "{name}");
    assert_eq!(*a, access, "{name}");
    assert!(instruction.is_some(), "{name}: the instruction is named");
    assert!(
        took < TIMEOUT / 2,
        "{name}: the timeout stopped it, not the detector"
    );
    match access {
        Some(_) => {
            let gpa = gpa.expect("a GPA");
            assert!(
                gpa >= r.reserved_end && gpa < r.ram_size,
                "{name}: {gpa:#x}"
            );
            // The blocked access is a violation record at the same RIP and page.
            let page = first_unmapped_page(&r);
            assert_eq!(gpa & !0xfff, page, "{name}");
            assert!(
                r.violations
                    .iter()
                    .any(|v| v.rip == *rip && v.page() == page),
                "{name}: no violation record at the livelock's RIP"
            );
        }
        None => assert_eq!(*gpa, None, "{name}"),
    }
    assert_eq!(r.exit_code(), vmm::exit_code::CRASH, "{name}");
}

/// GDTR = {limit 0xffff, base rbx} built on the stack, then `mov ds, 0x10`: the descriptor read
/// at base + 0x10 is in the hole.
const MOV_DS_GDT_IN_HOLE: &[u8] = &[
    0x48, 0x83, 0xec, 0x10, // sub rsp, 16
    0x66, 0xc7, 0x04, 0x24, 0xff, 0xff, // mov word [rsp], 0xffff
    0x48, 0x89, 0x5c, 0x24, 0x02, // mov [rsp+2], rbx
    0x0f, 0x01, 0x14, 0x24, // lgdt [rsp]
    0xb8, 0x10, 0, 0, 0, // mov eax, 0x10
    0x8e, 0xd8, // mov ds, eax
];

#[test]
fn every_livelock_kind_resumes_at_the_recovery_point_under_report() {
    if !kvm_available() {
        return;
    }
    for (name, payload, hole) in [
        ("lgdt", &[0x0f, 0x01, 0x13][..], true),
        ("lidt", &[0x0f, 0x01, 0x1b][..], true),
        ("sgdt", &[0x0f, 0x01, 0x03][..], true),
        ("sidt", &[0x0f, 0x01, 0x0b][..], true),
        ("mov ds", MOV_DS_GDT_IN_HOLE, true),
        ("vmcall", &[0x0f, 0x01, 0xc1][..], false),
    ] {
        let (r, took) = run_guest(payload, true, TIMEOUT);
        eprintln!(
            "{name} with a recovery point: {took:?}: {}",
            r.exit.summary()
        );
        assert_eq!(r.exit, ExitInfo::GuestExit { code: 0 }, "{name}");
        assert!(took < TIMEOUT / 2, "{name}");
        if hole {
            assert!(
                r.violations_total >= 1,
                "{name}: the blocked access is recorded"
            );
            assert!(
                r.violations.iter().all(|v| v.gpa >= Some(r.reserved_end)),
                "{name}"
            );
        }
    }
}

#[test]
fn lgdt_and_lidt_from_a_hole_are_fault_loops() {
    if !kvm_available() {
        return;
    }
    for (name, insn) in [("lgdt", [0x0f, 0x01, 0x13]), ("lidt", [0x0f, 0x01, 0x1b])] {
        expect_livelock(
            name,
            &insn,
            LivelockShape::FaultLoop,
            Some(AccessKind::Read),
        );
    }
}

#[test]
fn sgdt_and_sidt_into_a_hole_are_silent_spins() {
    if !kvm_available() {
        return;
    }
    for (name, insn) in [("sgdt", [0x0f, 0x01, 0x03]), ("sidt", [0x0f, 0x01, 0x0b])] {
        expect_livelock(
            name,
            &insn,
            LivelockShape::SilentSpin,
            Some(AccessKind::Write),
        );
    }
}

#[test]
fn segment_load_with_the_gdt_in_a_hole_is_a_silent_spin() {
    if !kvm_available() {
        return;
    }
    expect_livelock(
        "mov ds",
        MOV_DS_GDT_IN_HOLE,
        LivelockShape::SilentSpin,
        Some(AccessKind::Read),
    );
}

#[test]
fn vmcall_is_a_silent_spin_without_a_gpa() {
    if !kvm_available() {
        return;
    }
    expect_livelock(
        "vmcall",
        &[0x0f, 0x01, 0xc1],
        LivelockShape::SilentSpin,
        None,
    );
}

#[test]
fn look_alikes_are_not_livelocks() {
    if !kvm_available() {
        return;
    }
    // 3000 loads of the same unmapped address in a counted loop: same RIP, same GPA, but the
    // counter moves between exits.
    let same_page_loop = [
        0xb9, 0xb8, 0x0b, 0, 0, // mov ecx, 3000
        0x48, 0x8b, 0x03, // 1: mov rax, [rbx]
        0xff, 0xc9, // dec ecx
        0x75, 0xf9, // jnz 1b
    ];
    // rep lodsb over the whole page: one exit per byte, each on a new GPA.
    let rep_lods = [
        0x48, 0x89, 0xde, // mov rsi, rbx
        0xb9, 0x00, 0x10, 0, 0, // mov ecx, 4096
        0xf3, 0xac, // rep lodsb
    ];
    // The same page read again and again with identical registers at every violation exit
    // (the counter lives in memory), but with another exit in between (a Nop hypercall).
    let with_progress = [
        0xc7, 0x44, 0x24, 0xf8, 0xb8, 0x0b, 0, 0, // mov dword [rsp-8], 3000
        0x48, 0x8b, 0x03, // 1: mov rax, [rbx]
        0xb8, 1, 0, 0, 0,    // mov eax, 1 (Hc::Nop)
        0xef, // out dx, eax
        0xff, 0x4c, 0x24, 0xf8, // dec dword [rsp-8]
        0x75, 0xf1, // jnz 1b
    ];
    // A ring-0 compute loop: emulated here, so no exits for a long while, but the registers move.
    let compute = [
        0xb9, 0x20, 0xa1, 0x07, 0, // mov ecx, 500,000
        0xff, 0xc9, // 1: dec ecx
        0x75, 0xfc, // jnz 1b
    ];
    for (name, payload, violations) in [
        ("same-page loop", &same_page_loop[..], 3000),
        ("rep lodsb", &rep_lods[..], 4096),
        ("same page after a hypercall", &with_progress[..], 3000),
        ("compute loop", &compute[..], 0),
    ] {
        let (r, took) = run_code(payload, TIMEOUT);
        eprintln!("{name}: {took:?}: {}", r.exit.summary());
        assert_eq!(r.exit, ExitInfo::GuestExit { code: 0 }, "{name}");
        assert_eq!(r.violations_total, violations, "{name}");
    }
}

#[test]
fn a_timeout_says_how_long_the_vcpu_went_without_an_exit_and_where() {
    if !kvm_available() {
        return;
    }
    // `jmp $`: a hang, not a livelock (it touches no hole): the timeout ends it.
    let (r, _) = run_code(&[0xeb, 0xfe], Duration::from_millis(1500));
    let ExitInfo::Timeout {
        no_exit_ms,
        instruction,
        regs,
        ..
    } = &r.exit
    else {
        panic!("expected a timeout, got {}", r.exit.summary());
    };
    assert!(*no_exit_ms > 1000.0, "{no_exit_ms}");
    assert!(
        instruction.as_deref().unwrap_or("").starts_with("jmp"),
        "{instruction:?}"
    );
    assert_eq!(
        regs.rip,
        veil_abi::IMAGE_MIN_GPA + ALLOC_UNMAPPED.len() as u64
    );
    assert!(
        r.exit.summary().contains("no exit for the last"),
        "{}",
        r.exit.summary()
    );
}
