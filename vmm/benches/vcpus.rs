//! What several vCPUs cost (issue 13): the hypercall/bare-exit ratio with one and with two vCPUs
//! running, and the revocation meter with two, on both stage-2 backends.
//!
//! `cargo bench -p vmm --bench vcpus` boots the embedded guest on real `/dev/kvm` with only the
//! `hypercall_timing` and `revocation_latency` tests (the latter skips with one vCPU),
//! `VEIL_ROUNDS` times (default 7) per configuration,
//! alternating the order of the configurations from round to round. Each run's test times
//! 2,000 bare port exits and 2,000 `Nop` hypercalls in 20 alternating rounds (the median round
//! of each); with two vCPUs, vCPU 1 makes `Nop` hypercalls all the while, so the hypercall path
//! shares the VMM's VM state with a second thread. Printed per configuration: the median, min
//! and max over the runs of the ratio and of both per-exit costs (ns from the guest's TSC at the
//! frequency KVM reports). Goal: with two vCPUs, ratio ≤ 1.2. Then, per backend with two vCPUs,
//! the revocation meter: how long the revoke (`Hc::Protect` no-access of a page vCPU 1 reads in
//! a loop) took, how long after the call vCPU 1's first violation came, and the reads that
//! succeeded after the revoke returned (the stale window; every run must show 0).

mod harness;

use harness::stats;
use std::time::Duration;

use vmm::console::ConsoleSink;
use vmm::guest_image::DEFAULT_GUEST;
use vmm::report::{Revocation, RoundTrip};
use vmm::stage2::BackendKind;
use vmm::vm::{self, VmConfig};

/// One boot with `vcpus` vCPUs running only `hypercall_timing` and `revocation_latency`.
fn one_run(vcpus: u32, backend: BackendKind) -> (RoundTrip, Option<Revocation>) {
    let mut cfg = VmConfig::new(DEFAULT_GUEST.to_vec());
    cfg.selection = vec!["hypercall_timing".into(), "revocation_latency".into()];
    cfg.console = ConsoleSink::Null;
    cfg.echo_logs = false;
    cfg.vcpus = vcpus;
    cfg.stage2 = backend;
    cfg.timeout = Some(Duration::from_secs(60));
    let report = vm::run(cfg).unwrap_or_else(|e| panic!("veil run --vcpus {vcpus}: {e}"));
    assert_eq!(report.counts.failed, 0, "a test failed with {vcpus} vCPUs");
    let rt = report
        .timing
        .round_trip
        .unwrap_or_else(|| panic!("no round trip reported with {vcpus} vCPUs"));
    let rev = report.timing.revocation;
    assert_eq!(
        rev.is_some(),
        vcpus >= 2,
        "revocation figure with {vcpus} vCPUs"
    );
    (rt, rev)
}

fn main() {
    let Some(rounds) = harness::start("vcpus", 7) else {
        return;
    };
    let configs: [(u32, BackendKind); 4] = [
        (1, BackendKind::Mprotect),
        (2, BackendKind::Mprotect),
        (1, BackendKind::Slots),
        (2, BackendKind::Slots),
    ];
    let mut results: Vec<Vec<RoundTrip>> = vec![Vec::new(); configs.len()];
    let mut revocations: Vec<Vec<Revocation>> = vec![Vec::new(); configs.len()];
    for r in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + r) % configs.len();
            let (vcpus, backend) = configs[i];
            let (rt, rev) = one_run(vcpus, backend);
            results[i].push(rt);
            revocations[i].extend(rev);
        }
        eprintln!("vcpus: round {}/{rounds} done", r + 1);
    }
    println!("hypercall/bare-exit ratio, {rounds} runs per configuration (median [min-max])");
    println!(
        "{:<10} {:>5} {:>22} {:>24} {:>24}",
        "backend", "vCPUs", "ratio", "bare ns/exit", "Nop hypercall ns/call"
    );
    for (i, (vcpus, backend)) in configs.iter().enumerate() {
        let rt = &results[i];
        let pick = |f: &dyn Fn(&RoundTrip) -> Option<f64>| {
            let mut v: Vec<f64> = rt.iter().filter_map(f).collect();
            if v.is_empty() {
                "n/a".to_string()
            } else {
                let (m, lo, hi) = stats(&mut v);
                format!("{m:.3} [{lo:.3}-{hi:.3}]")
            }
        };
        let ns = |f: &dyn Fn(&RoundTrip) -> Option<f64>| {
            let mut v: Vec<f64> = rt.iter().filter_map(f).collect();
            if v.is_empty() {
                "n/a (no TSC frequency)".to_string()
            } else {
                let (m, lo, hi) = stats(&mut v);
                format!("{m:.0} [{lo:.0}-{hi:.0}]")
            }
        };
        println!(
            "{:<10} {:>5} {:>22} {:>24} {:>24}",
            format!("{backend:?}").to_lowercase(),
            vcpus,
            pick(&|t| Some(t.ratio)),
            ns(&|t| t.bare_ns),
            ns(&|t| t.hypercall_ns),
        );
    }
    println!();
    println!("revocation with 2 vCPUs, {rounds} runs per backend (median [min-max])");
    println!(
        "{:<10} {:>26} {:>34} {:>12} {:>12}",
        "backend", "revoke µs", "revoke call -> first violation µs", "reads", "stale reads"
    );
    for (i, (vcpus, backend)) in configs.iter().enumerate() {
        if *vcpus < 2 {
            continue;
        }
        let r = &revocations[i];
        let col = |f: &dyn Fn(&Revocation) -> Option<f64>, digits: usize| {
            let mut v: Vec<f64> = r.iter().filter_map(f).collect();
            if v.is_empty() {
                return "n/a".to_string();
            }
            let (m, lo, hi) = stats(&mut v);
            format!("{m:.digits$} [{lo:.digits$}-{hi:.digits$}]")
        };
        let stale_max = r.iter().map(|x| x.stale_reads).max().unwrap_or(0);
        println!(
            "{:<10} {:>26} {:>34} {:>12} {:>12}",
            format!("{backend:?}").to_lowercase(),
            col(&|x| x.revoke_us, 1),
            col(&|x| x.first_violation_us, 1),
            col(&|x| Some(x.reads as f64), 0),
            format!("max {stale_max}"),
        );
    }
}
