//! ASI in the session, driven directly on a real VM with two vCPUs (no guest code runs): an
//! MMIO load of a sensitive page by a restricted vCPU is an ASI exit completed from the VMM's
//! view, a store by an exited vCPU is completed too, the other vCPU is exposed (entered while
//! the VM is full) for as long as the first stays exited, `AsiEnter` by an entered vCPU is a
//! counted no-op, and an unmapped page is a violation in the full view.

use std::time::Duration;

use veil_abi::{gfp, AsiStats, Hc, Status};
use veil_tests::*;
use vmm::addr::Gpa;
use vmm::report::AccessKind;
use vmm::session::{Session, VcpuState};

/// A result buffer in reserved memory (above BootInfo, below the mailboxes).
const BUF: u64 = 0x3000;

fn asi_stats(s: &mut Session) -> AsiStats {
    assert_eq!(
        s.hypercall(Hc::AsiStats as u32, [BUF, 0, 0, 0]).status,
        Status::Ok
    );
    let mut b = [0u8; std::mem::size_of::<AsiStats>()];
    s.ram().read(BUF, &mut b).unwrap();
    let w: Vec<u64> = b
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    AsiStats {
        exits: w[0],
        enters: w[1],
        noop_enters: w[2],
        view_switches: w[3],
        last_ranges_toggled: w[4],
        sensitive_runs: w[5],
        vm_full: w[6],
        vcpu_exited: w[7],
        vcpu_exposed_ns: w[8],
        vcpu_exposed_windows: w[9],
    }
}

#[test]
fn asi_exit_completion_exposure_and_enter_through_the_session() {
    if !kvm_available() {
        return;
    }
    let mut vm = session_vm(2);
    let s = vm.session_mut();
    let out = s.hypercall(Hc::Alloc as u32, [0, gfp::SENSITIVE, 0, 0]);
    assert_eq!(out.status, Status::Ok);
    let g = out.r0;
    s.ram().write(g, &[0x42; 16]).unwrap();
    let s0 = asi_stats(s);
    assert_eq!((s0.vm_full, s0.vcpu_exited, s0.sensitive_runs), (0, 0, 1));

    // vCPU 0 loads: an ASI exit, answered with the page's real bytes, not poison.
    let mut d = [0u8; 8];
    assert!(s
        .mmio_access(Gpa(g), AccessKind::Read, &mut d, 0x1234)
        .is_none());
    assert_eq!(d, [0x42; 8]);
    // Its store (it is exited now) is completed through the VMM's view.
    let mut w = [7u8; 8];
    assert!(s
        .mmio_access(Gpa(g + 8), AccessKind::Write, &mut w, 0x1238)
        .is_none());
    let mut back = [0u8; 8];
    s.ram().read(g + 8, &mut back).unwrap();
    assert_eq!(back, [7; 8]);
    let s1 = asi_stats(s);
    assert_eq!((s1.exits, s1.vm_full, s1.vcpu_exited), (1, 1, 1));

    // vCPU 1 is still entered: AsiEnter is a no-op, and it is exposed while vCPU 0 is out.
    let mut cpu1 = VcpuState::new(1);
    s.lend(&mut cpu1);
    assert_eq!(
        s.hypercall(Hc::AsiEnter as u32, [0; 4]).status,
        Status::AlreadyRestricted
    );
    std::thread::sleep(Duration::from_millis(20));
    let e1 = asi_stats(s);
    assert_eq!((e1.vm_full, e1.vcpu_exited, e1.noop_enters), (1, 0, 1));
    assert!(
        e1.vcpu_exposed_ns >= 20_000_000 && e1.vcpu_exposed_windows == 1,
        "{e1:?}"
    );
    s.lend(&mut cpu1);

    // An unmapped page is a violation in the full view: poison.
    let u = s.hypercall(Hc::Alloc as u32, [0, gfp::UNMAPPED, 0, 0]).r0;
    let mut p = [0u8; 8];
    assert!(s
        .mmio_access(Gpa(u), AccessKind::Read, &mut p, 0x1240)
        .is_none());
    assert_eq!(p, [veil_abi::POISON_BYTE; 8]);

    // vCPU 0's enter is the flush point: one range toggled, the VM restricted again.
    let out = s.hypercall(Hc::AsiEnter as u32, [0; 4]);
    assert_eq!((out.status, out.r0), (Status::Ok, 1));
    let s2 = asi_stats(s);
    assert_eq!(
        (s2.vm_full, s2.vcpu_exited, s2.enters, s2.view_switches),
        (0, 0, 1, 2)
    );
    // vCPU 1's exposure stopped growing with the window.
    s.lend(&mut cpu1);
    let e2 = asi_stats(s);
    std::thread::sleep(Duration::from_millis(5));
    let e3 = asi_stats(s);
    assert_eq!(e2.vcpu_exposed_ns, e3.vcpu_exposed_ns);
    assert_eq!(e3.vcpu_exposed_windows, 1);
    s.lend(&mut cpu1);
}
