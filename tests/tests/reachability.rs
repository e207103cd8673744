//! The reachability judgement end to end through the library: a real VM, routes driven through
//! `Session::hypercall` with the evidence each outcome needs (a secret byte copied into the
//! sink, a store landed in a planted page, nothing, a refused hypercall), then the run's report:
//! the matrix holds the VMM's cells and its verdict fails the test whatever the guest said.

use veil_abi::{gfp, Hc, Status, PAGE_SIZE};
use veil_tests::*;
use vmm::report::matrix::RouteResult;
use vmm::session::Session;
use vmm::vm::Vm;

/// Scratch in reserved memory (below the image, above the mailbox): names and the sink.
const NAMES: u64 = 0x8000;
const SINK: u64 = 0x9000;
const SINK_LEN: u64 = 64;

fn ok(s: &mut Session, hc: Hc, a: [u64; 4]) -> u64 {
    let out = s.hypercall(hc as u32, a);
    assert_eq!(out.status, Status::Ok, "{hc:?}{a:x?}");
    out.r0
}

/// Writes `name` into reserved memory; returns (ptr, len).
fn name(s: &mut Session, slot: u64, name: &str) -> (u64, u64) {
    let ptr = NAMES + slot * 64;
    s.ram().write(ptr, name.as_bytes()).unwrap();
    (ptr, name.len() as u64)
}

/// Plants a fresh unmapped page, opens route `route`, lets `evidence` act, closes it.
fn route(s: &mut Session, slot: u64, route: &str, evidence: impl FnOnce(&mut Session, u64)) {
    let page = ok(s, Hc::Alloc, [0, gfp::UNMAPPED, 0, 0]);
    ok(s, Hc::PlantSecret, [page, PAGE_SIZE, 0, 0]);
    s.ram().write(SINK, &[0u8; SINK_LEN as usize]).unwrap();
    let (p, l) = name(s, slot, route);
    ok(s, Hc::RouteBegin, [p, l, SINK, SINK_LEN]);
    evidence(s, page);
    ok(s, Hc::RouteEnd, [0; 4]);
}

#[test]
fn each_outcome_is_judged_by_the_vmm_and_fails_the_test() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::new(quiet_config(EXIT0, 32 << 20)).expect("boot");
    let s = vm.session_mut();
    let (p, l) = name(s, 0, "routes");
    ok(s, Hc::TestAnnounce, [p, l, 0, 0]);
    // No route outside a test.
    let (rp, rl) = name(s, 1, "early");
    let out = s.hypercall(Hc::RouteBegin as u32, [rp, rl, SINK, SINK_LEN]);
    assert_eq!(out.status, Status::BadState);
    ok(s, Hc::TestBegin, [p, l, 0, 0]);

    route(s, 2, "sink_leak", |s, page| {
        let b = s.secret_byte(vmm::addr::Gpa(page + 5));
        assert!(Session::is_secret_byte(b));
        s.ram().write(SINK + 3, &[b]).unwrap();
    });
    route(s, 3, "store_landed", |s, page| {
        s.ram().write(page + 100, &[0u8; 4]).unwrap();
    });
    route(s, 4, "silent", |_, _| {});
    route(s, 5, "refused", |s, page| {
        let out = s.hypercall(Hc::Log as u32, [page, 8, 0, 0]);
        assert_eq!(out.status, Status::BadAddress);
    });
    route(s, 6, "poisoned_load", |s, page| {
        let rip = 0x20_0000;
        let (byte, stop) = s.mmio(
            vmm::addr::Gpa(page + 8),
            vmm::report::AccessKind::Read,
            8,
            rip,
        );
        assert!(stop.is_none() && !Session::is_secret_byte(byte));
        s.ram().write(SINK, &[byte; 8]).unwrap();
    });
    // The guest says pass; the VMM disagrees.
    let msg = name(s, 7, "ok");
    ok(s, Hc::TestEnd, [0, msg.0, msg.1, 0]);

    let report = vm.run().expect("run");
    let m = &report.reachability;
    let cell = |n: &str| {
        m.routes
            .iter()
            .find(|c| c.route == n)
            .unwrap_or_else(|| panic!("{n} in {:?}", m.routes))
    };
    assert_eq!(cell("sink_leak").result, RouteResult::Leaked);
    assert_eq!(cell("sink_leak").evidence.sink_secret_bytes, 1);
    assert_eq!(cell("store_landed").result, RouteResult::Leaked);
    assert_eq!(cell("store_landed").evidence.planted_bytes_changed, 4);
    assert_eq!(cell("silent").result, RouteResult::BlockedButUnrecorded);
    assert_eq!(cell("refused").result, RouteResult::BlockedAndRecorded);
    assert_eq!(cell("refused").evidence.refused_hypercalls, 1);
    assert_eq!(
        cell("poisoned_load").result,
        RouteResult::BlockedAndRecorded
    );
    assert_eq!(cell("poisoned_load").evidence.violations, 1);
    assert_eq!(m.routes.len(), 5);
    assert_eq!(
        (
            m.counts.blocked_and_recorded,
            m.counts.blocked_but_unrecorded,
            m.counts.leaked
        ),
        (2, 1, 2)
    );
    let t = &report.tests[0];
    assert!(!t.passed, "{t:?}");
    for want in [
        "sink_leak leaked",
        "store_landed leaked",
        "silent blocked but unrecorded",
    ] {
        assert!(t.message.contains(want), "{want:?} in {:?}", t.message);
    }
    assert!(!t.message.contains("refused"), "{:?}", t.message);
    let j = serde_json::to_value(&report).unwrap();
    assert_eq!(j["reachability"]["routes"][0]["result"], "leaked");
    assert_eq!(j["reachability"]["counts"]["leaked"], 2);
}
