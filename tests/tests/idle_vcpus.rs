//! A parked vCPU costs the host almost nothing: it waits on its doorbell rather than polling.
//! With two vCPUs, a run of tests that only vCPU 0 runs makes few more exits than with one
//! (the parked vCPU exits once per idle timeout, `vmm::doorbell::IDLE_MAX`; the 200 µs poll it
//! replaced made about 2,800 a second here), and the cross-vCPU tests, whose `post` rings vCPU 1's
//! doorbell, pass.

use std::time::Duration;

use veil_abi::{Hc, Status};
use veil_tests::*;
use vmm::console::ConsoleSink;
use vmm::doorbell::IDLE_MAX;
use vmm::guest_image::DEFAULT_GUEST;
use vmm::report::ExitInfo;
use vmm::{run, RunReport, VmConfig};

fn run_with(vcpus: u32, tests: &[&str]) -> RunReport {
    let mut c = VmConfig::new(DEFAULT_GUEST.to_vec());
    c.console = ConsoleSink::Null;
    c.echo_logs = false;
    c.timeout = Some(Duration::from_secs(120));
    c.vcpus = vcpus;
    c.selection = tests.iter().map(|t| t.to_string()).collect();
    let r = run(c).expect("boot");
    assert_eq!(r.exit, ExitInfo::GuestExit { code: 0 }, "{}", r.summary());
    r
}

#[test]
fn a_parked_vcpu_exits_once_per_idle_timeout_not_per_poll() {
    if !kvm_available() {
        return;
    }
    // Tests that keep vCPU 0 busy for a while and never post to vCPU 1.
    let tests = ["mapped_rw", "zeroing", "flip_amortised", "scrub_on_reuse"];
    let one = run_with(1, &tests);
    let two = run_with(2, &tests);
    assert!(two.tests.iter().all(|t| t.passed), "{}", two.summary());
    let extra = two
        .timing
        .exits
        .total
        .saturating_sub(one.timing.exits.total);
    // vCPU 1's exits: its boot, then one `hlt` per idle timeout over the run (twice that
    // for slack, and for vCPU 0's run being longer with two vCPUs).
    let timeouts = two.timing.total_ms / IDLE_MAX.as_secs_f64() / 1e3;
    let bound = 2.0 * timeouts + 100.0;
    assert!(
        (extra as f64) <= bound,
        "with 2 vCPUs the run made {extra} more exits than with 1 over {:.0} ms (bound {bound:.0}): the parked vCPU polls",
        two.timing.total_ms
    );
}

#[test]
fn the_cross_vcpu_tests_wake_the_parked_vcpu() {
    if !kvm_available() {
        return;
    }
    let tests = [
        "cross_vcpu_isolation",
        "concurrent_alloc",
        "smp_wake",
        "asi_smp",
        "mermap_vcpu_isolation",
    ];
    let r = run_with(2, &tests);
    for t in &tests {
        let got = r.tests.iter().find(|x| x.name == *t);
        assert!(got.is_some_and(|x| x.passed), "{t}: {}", r.summary());
    }
}

#[test]
fn wake_rings_the_named_vcpus_bell_and_refuses_other_indices() {
    if !kvm_available() {
        return;
    }
    let mut vm = session_vm(2);
    let s = vm.session_mut();
    let bells = s.doorbells();
    let mut seen = 0;
    assert!(
        !bells.wait(1, &mut seen, Duration::ZERO),
        "rung before any Wake"
    );
    assert_eq!(
        s.hypercall(Hc::Wake as u32, [1, 0, 0, 0]).status,
        Status::Ok
    );
    assert!(
        bells.wait(1, &mut seen, Duration::ZERO),
        "Wake(1) did not ring vCPU 1"
    );
    let mut seen0 = 0;
    assert!(
        !bells.wait(0, &mut seen0, Duration::ZERO),
        "Wake(1) rang vCPU 0"
    );
    for bad in [2, u64::MAX] {
        let out = s.hypercall(Hc::Wake as u32, [bad, 0, 0, 0]);
        assert_eq!(out.status, Status::BadArgument, "Wake({bad})");
    }
    assert!(
        !bells.wait(1, &mut seen, Duration::ZERO),
        "a refused Wake rang"
    );
}
