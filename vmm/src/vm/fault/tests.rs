//! The EFAULT decision as pure functions (attribution in, record out), and the session's
//! handling of a record at an unknown address: declared, undeclared, under both policies.

use veil_abi::{Hc, Status, ViolationRecord, ADDRESS_UNKNOWN, IMAGE_MIN_GPA};

use super::*;
use crate::console::ConsoleSink;
use crate::memory::MemSize;
use crate::report::{TestOutcome, ViolationAction};
use crate::session::Session;
use crate::vm::{ViolationPolicy, Vm, VmConfig};

fn access(gpa: Option<u64>, access: AccessKind, size: u32) -> InsnAccess {
    InsnAccess {
        gva: Some(0x60_0000),
        gpa,
        access,
        size,
        state: None,
    }
}

fn seen(bytes: &str, accesses: Vec<InsnAccess>) -> InsnAtRip {
    InsnAtRip {
        bytes: bytes.into(),
        decoded: "x".into(),
        accesses,
    }
}

#[test]
fn located_accesses_are_recorded_as_they_are() {
    let hits = vec![
        (Gpa(0x40_0018), AccessKind::Read, 8),
        (Gpa(0x40_1000), AccessKind::Write, 4),
    ];
    let s = seen(
        "48 8b 43 18",
        vec![access(Some(0x40_0018), AccessKind::Read, 8)],
    );
    assert_eq!(efault_record(hits.clone(), &s), EfaultRecord::Located(hits));
}

#[test]
fn an_unlocated_fault_is_charged_to_the_access_decoding_could_not_place() {
    // A gather: its vector-indexed element load has no address; the mapped store beside it
    // is not what faulted.
    let s = seen(
        "c4 e2 6d 90 04 8b",
        vec![
            access(Some(0x30_0000), AccessKind::Write, 8),
            access(None, AccessKind::Read, 4),
        ],
    );
    assert_eq!(
        efault_record(Vec::new(), &s),
        EfaultRecord::Unknown {
            access: AccessKind::Read,
            size: 4
        }
    );
    // Every access located (and none blocked): the first one.
    let s = seen("89 03", vec![access(Some(0x30_0000), AccessKind::Write, 4)]);
    assert_eq!(
        efault_record(Vec::new(), &s),
        EfaultRecord::Unknown {
            access: AccessKind::Write,
            size: 4
        }
    );
    // No memory access, or nothing decoded: a fetch of the bytes read at RIP.
    let s = seen("0f 0b", Vec::new());
    assert_eq!(
        efault_record(Vec::new(), &s),
        EfaultRecord::Unknown {
            access: AccessKind::Fetch,
            size: 2
        }
    );
    assert_eq!(
        efault_record(Vec::new(), &seen("", Vec::new())),
        EfaultRecord::Unknown {
            access: AccessKind::Fetch,
            size: 1
        }
    );
}

#[test]
fn a_memory_fault_exit_takes_its_kind_from_the_access_inside_its_range() {
    let acc = [
        access(Some(0x30_0010), AccessKind::Read, 8),
        access(Some(0x40_0020), AccessKind::Write, 8),
    ];
    assert_eq!(
        memory_fault_kind(0x40_0000, 0x1000, &acc, false),
        AccessKind::Write
    );
    assert_eq!(
        memory_fault_kind(0x30_0000, 0x1000, &acc, false),
        AccessKind::Read
    );
    // Nothing decoded inside the range: a store if the page is readable, else a load.
    assert_eq!(
        memory_fault_kind(0x50_0000, 0x1000, &acc, true),
        AccessKind::Write
    );
    assert_eq!(
        memory_fault_kind(0x50_0000, 0x1000, &[], false),
        AccessKind::Read
    );
    // A zero-sized range still covers its first byte.
    assert_eq!(
        memory_fault_kind(0x40_0020, 0, &acc, false),
        AccessKind::Write
    );
}

/// Reserved scratch for names and the query buffer.
const NAMES: u64 = 0x8000;
const QUERY: u64 = 0x9000;

/// A VM of the tiny guest `Exit(0)`, not yet running, under `policy`.
fn exit0_vm(test: &str, policy: ViolationPolicy) -> Option<Vm> {
    crate::stage2::tests::kvm_or_skip(test)?;
    let code = [
        0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
        0xbf, 0, 0, 0, 0, // mov edi, 0
        0xb8, 20, 0, 0, 0,    // mov eax, 20 (Hc::Exit)
        0xef, // out dx, eax
        0xeb, 0xfe, // jmp $
    ];
    let mut c = VmConfig::new(crate::elf::build_elf(IMAGE_MIN_GPA, &code, 0));
    c.mem = MemSize(32 << 20);
    c.console = ConsoleSink::Null;
    c.echo_logs = false;
    c.on_violation = policy;
    Some(Vm::new(c).expect("boot"))
}

fn ok(s: &mut Session, hc: Hc, a: [u64; 4]) -> u64 {
    let out = s.hypercall(hc as u32, a);
    assert_eq!(out.status, Status::Ok, "{hc:?}{a:x?}");
    out.r0
}

/// Announces and begins test `name` (slot `slot` of the name scratch).
fn begin(s: &mut Session, slot: u64, name: &str) -> (u64, u64) {
    let ptr = NAMES + slot * 64;
    s.ram().write(ptr, name.as_bytes()).unwrap();
    let n = (ptr, name.len() as u64);
    ok(s, Hc::TestAnnounce, [n.0, n.1, 0, 0]);
    ok(s, Hc::TestBegin, [n.0, n.1, 0, 0]);
    n
}

fn end_pass(s: &mut Session, name: (u64, u64)) {
    ok(s, Hc::TestEnd, [0, name.0, 0, 0]);
}

fn stop_of(o: FetchOutcome) -> ExitInfo {
    match o {
        FetchOutcome::Stop(e) => *e,
        FetchOutcome::Resume { rip, rsp } => panic!("resumed at {rip:#x}/{rsp:#x}"),
    }
}

#[test]
fn an_unknown_address_record_is_declared_counted_and_judged_like_any_other() {
    let Some(mut vm) = exit0_vm("unknown-address records", ViolationPolicy::Report) else {
        return;
    };
    let s = vm.session_mut();
    // Declared (ExpectViolation at ADDRESS_UNKNOWN), with a recovery point: resumes there.
    let t = begin(s, 0, "declared");
    // Only the exact marker declares an unknown address; other GPAs past RAM stay refused.
    let out = s.hypercall(Hc::ExpectViolation as u32, [ADDRESS_UNKNOWN - 1, 1, 1, 0]);
    assert_eq!(out.status, Status::BadAddress);
    ok(s, Hc::ExpectViolation, [ADDRESS_UNKNOWN, 1, 1, 0]);
    ok(s, Hc::SetRecovery, [0x1234, 0x5678, 0, 0]);
    match s.unattributed(AccessKind::Read, 4, 0x20_0040) {
        FetchOutcome::Resume { rip, rsp } => assert_eq!((rip, rsp), (0x1234, 0x5678)),
        FetchOutcome::Stop(e) => panic!("stopped: {}", e.summary()),
    }
    // The guest's query sees it at ADDRESS_UNKNOWN.
    assert_eq!(ok(s, Hc::QueryViolations, [QUERY, 4, 0, 0]), 1);
    // ViolationRecord is repr(C): gpa at 0, rip at 8, size at 16.
    let mut rec = [0u8; std::mem::size_of::<ViolationRecord>()];
    s.ram().read(QUERY, &mut rec).unwrap();
    let word = |o: usize| u64::from_le_bytes(rec[o..o + 8].try_into().unwrap());
    assert_eq!((word(0), word(8), rec[16]), (ADDRESS_UNKNOWN, 0x20_0040, 4));
    end_pass(s, t);
    // Undeclared, no recovery point: a violation stop naming the unknown address.
    let t = begin(s, 1, "undeclared");
    let stop = stop_of(s.unattributed(AccessKind::Write, 8, 0x20_0080));
    match &stop {
        ExitInfo::FetchWithoutRecovery { violation } => {
            assert_eq!(violation.gpa, None);
            assert_eq!(violation.action, ViolationAction::Stopped);
            assert_eq!(violation.test.as_deref(), Some("undeclared"));
        }
        e => panic!("{e:?}"),
    }
    assert!(
        stop.summary().contains("unknown address"),
        "{}",
        stop.summary()
    );
    end_pass(s, t);

    let r = vm.run().expect("run");
    assert_eq!(r.violations_total, 2);
    assert!(r
        .violations
        .iter()
        .all(|v| v.gpa.is_none() && v.owner == "unknown"));
    let (declared, undeclared) = (&r.tests[0], &r.tests[1]);
    assert!(declared.passed, "{declared:?}");
    assert_eq!(declared.violations, 1);
    assert_eq!(undeclared.result, TestOutcome::Fail);
    assert!(
        undeclared
            .message
            .contains("1 unexpected write violation(s) at an unknown address"),
        "{}",
        undeclared.message
    );
}

#[test]
fn kill_stops_at_an_undeclared_unknown_address_and_spares_a_declared_one() {
    let Some(mut vm) = exit0_vm("unknown-address kill", ViolationPolicy::Kill) else {
        return;
    };
    let s = vm.session_mut();
    begin(s, 0, "killed");
    ok(s, Hc::ExpectViolation, [ADDRESS_UNKNOWN, 2, 1, 0]);
    ok(s, Hc::SetRecovery, [0x1234, 0x5678, 0, 0]);
    // A read is not what the test declared (a write): killed, recovery point or not.
    match stop_of(s.unattributed(AccessKind::Read, 4, 0x20_0040)) {
        ExitInfo::ViolationKill { violation } => {
            assert_eq!(
                (violation.gpa, violation.action),
                (None, ViolationAction::Killed)
            )
        }
        e => panic!("{e:?}"),
    }
    // The declared write is answered as under report.
    ok(s, Hc::SetRecovery, [0x1234, 0x5678, 0, 0]);
    assert!(matches!(
        s.unattributed(AccessKind::Write, 4, 0x20_0040),
        FetchOutcome::Resume { rip: 0x1234, .. }
    ));
}

#[test]
fn the_same_unlocated_fault_again_and_again_is_a_fault_loop_livelock() {
    let Some(vm) = exit0_vm("unknown-address fault loop", ViolationPolicy::Report) else {
        return;
    };
    let board = std::sync::Arc::new(crate::control::VcpuBoard::new(1));
    let (_session, _stop, mut cpus) = vm.into_parts(&board);
    let vm = &mut cpus[0];
    let mut regs = vm.vcpu.get_regs().unwrap();
    for _ in 1..crate::livelock::FAULT_REPEATS {
        assert!(vm
            .fault_repeats(ADDRESS_UNKNOWN, AccessKind::Read, &regs)
            .is_none());
    }
    match vm.fault_repeats(ADDRESS_UNKNOWN, AccessKind::Read, &regs) {
        Some(ExitInfo::Livelock {
            gpa, access, shape, ..
        }) => {
            assert_eq!((gpa, access), (None, Some(AccessKind::Read)));
            assert_eq!(shape, crate::report::LivelockShape::FaultLoop);
        }
        other => panic!("{other:?}"),
    }
    // A guest that moves between faults (another register value) is not looping.
    for i in 0..2 * u64::from(crate::livelock::FAULT_REPEATS) {
        regs.rcx = i;
        assert!(vm
            .fault_repeats(ADDRESS_UNKNOWN, AccessKind::Read, &regs)
            .is_none());
    }
}

#[test]
fn recovery_points_and_records_belong_to_the_vcpu_whose_state_is_lent() {
    let Some(mut vm) = exit0_vm("per-vCPU session state", ViolationPolicy::Report) else {
        return;
    };
    let s = vm.session_mut();
    let t = begin(s, 0, "lent");
    // vCPU 0 (the session's own state) sets a recovery point; vCPU 1 has none.
    ok(s, Hc::SetRecovery, [0x1234, 0x5678, 0, 0]);
    let mut other = crate::session::VcpuState::new(1);
    s.lend(&mut other);
    match stop_of(s.unattributed(AccessKind::Read, 4, 0x20_0040)) {
        ExitInfo::FetchWithoutRecovery { violation } => assert_eq!(violation.vcpu, 1),
        e => panic!("vCPU 1 resumed at vCPU 0's recovery point: {e:?}"),
    }
    s.lend(&mut other);
    assert_eq!(other.index(), 1, "vCPU 1's state is back with its thread");
    match s.unattributed(AccessKind::Read, 4, 0x20_0080) {
        FetchOutcome::Resume { rip, rsp } => assert_eq!((rip, rsp), (0x1234, 0x5678)),
        FetchOutcome::Stop(e) => panic!("vCPU 0 lost its recovery point: {}", e.summary()),
    }
    end_pass(s, t);
    let r = vm.run().expect("run");
    let vcpus: Vec<u32> = r.violations.iter().map(|v| v.vcpu).collect();
    assert_eq!(vcpus, [1, 0]);
}
