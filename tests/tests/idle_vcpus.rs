//! A parked vCPU costs the host almost nothing: it waits on its doorbell rather than polling.
//! With two vCPUs, a run of tests that only vCPU 0 runs makes few more exits than with one
//! (the parked vCPU exits once per idle timeout, `vmm::doorbell::IDLE_MAX`; the 200 µs poll it
//! replaced made about 2,800 a second here), and the cross-vCPU tests, whose `post` rings vCPU 1's
//! doorbell, pass.

use std::time::Duration;

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
