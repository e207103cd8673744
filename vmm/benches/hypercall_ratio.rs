//! The hypercall/bare-exit ratio with one and with two vCPUs running (issue 13, item 5).
//!
//! `cargo bench -p vmm --bench hypercall_ratio` boots the embedded guest on real `/dev/kvm`
//! with only the `hypercall_timing` test, `VEIL_ROUNDS` times (default 7) per configuration,
//! alternating the order of the configurations from round to round. Each run's test times
//! 2,000 bare port exits and 2,000 `Nop` hypercalls in 20 alternating rounds (the median round
//! of each); with two vCPUs, vCPU 1 makes `Nop` hypercalls all the while, so the hypercall path
//! shares the VMM's VM state with a second thread. Printed per configuration: the median, min
//! and max over the runs of the ratio and of both per-exit costs (ns from the guest's TSC at the
//! frequency KVM reports). Goal: with two vCPUs, ratio ≤ 1.2.

use std::time::Duration;

use vmm::console::ConsoleSink;
use vmm::guest_image::DEFAULT_GUEST;
use vmm::report::RoundTrip;
use vmm::stage2::BackendKind;
use vmm::vm::{self, VmConfig};

/// One boot with `vcpus` vCPUs running only `hypercall_timing`.
fn one_run(vcpus: u32, backend: BackendKind) -> RoundTrip {
    let mut cfg = VmConfig::new(DEFAULT_GUEST.to_vec());
    cfg.selection = vec!["hypercall_timing".into()];
    cfg.console = ConsoleSink::Null;
    cfg.echo_logs = false;
    cfg.vcpus = vcpus;
    cfg.stage2 = backend;
    cfg.timeout = Some(Duration::from_secs(60));
    let report = vm::run(cfg).unwrap_or_else(|e| panic!("veil run --vcpus {vcpus}: {e}"));
    assert_eq!(report.counts.failed, 0, "hypercall_timing failed");
    report
        .timing
        .round_trip
        .unwrap_or_else(|| panic!("no round trip reported with {vcpus} vCPUs"))
}

/// (median, min, max) of `v`.
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list: there are no Criterion tests here.
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("hypercall_ratio: /dev/kvm is not usable ({e}): benchmark SKIPPED");
        if std::env::var("CI").as_deref() == Ok("true") {
            std::process::exit(1);
        }
        return;
    }
    let rounds: usize = std::env::var("VEIL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(7);
    let configs: [(u32, BackendKind); 4] = [
        (1, BackendKind::Mprotect),
        (2, BackendKind::Mprotect),
        (1, BackendKind::Slots),
        (2, BackendKind::Slots),
    ];
    let mut results: Vec<Vec<RoundTrip>> = vec![Vec::new(); configs.len()];
    for r in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + r) % configs.len();
            let (vcpus, backend) = configs[i];
            results[i].push(one_run(vcpus, backend));
        }
        eprintln!("hypercall_ratio: round {}/{rounds} done", r + 1);
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
}
