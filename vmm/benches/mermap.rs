//! Issue 15's figures: a mermap get/put pair against a plain hypercall, window updates
//! (flushes) per 10^5 pairs, and the latency of a violating load under `inject` against
//! `report`.
//!
//! `cargo bench -p vmm --bench mermap` runs, `VEIL_ROUNDS` times (default 5) per backend
//! (`mprotect`, `slots`), alternating the order from round to round:
//!
//! - **guest side** (the `veil` binary on real `/dev/kvm`): one run of `hypercall_timing`,
//!   `mermap_flush_per_wrap` and `violation_latency` under `--on-violation report`, and one of
//!   `hypercall_timing` and `violation_latency` under `inject`. The guest times 10^5 get/put
//!   pairs of one page and 10^4 pairs of `Nop` hypercalls with its TSC (full round trips:
//!   exits included) and 200 violating loads; the flush count and the host operations of the
//!   last flush come from the exit dump's window counters. Cycles become ns at the TSC
//!   frequency KVM reports (the report's `round_trip.tsc_khz`).
//! - **host side** (the library, no guest running): the session's handlers alone, 10^5
//!   `MermapGet`/`MermapPut` pairs against 2 x 10^5 `Nop`s through `Session::hypercall`.
//!
//! Printed: median [min-max] over the rounds.

mod harness;

use harness::stats;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use veil_abi::{gfp, Hc, Status};
use vmm::guest_image::DEFAULT_GUEST;
use vmm::stage2::BackendKind;
use vmm::vm::{Vm, VmConfig};

fn fmt(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    let mut v = v.to_vec();
    let (m, lo, hi) = stats(&mut v);
    format!("{m:.digits$} [{lo:.digits$}-{hi:.digits$}]")
}

/// The number after `key` in the first stderr line containing `line` (e.g. "123 cycles").
fn number_before(s: &str, line: &str, unit: &str) -> Option<f64> {
    let l = s.lines().find(|l| l.contains(line))?;
    let i = l.find(unit)?;
    l[..i].split_whitespace().last()?.parse().ok()
}

/// One guest run: (tsc_khz, pair cycles, nop pair cycles, flushes, last flush ops,
/// violating load cycles).
#[derive(Default, Clone, Copy)]
struct GuestRun {
    tsc_khz: f64,
    pair_cycles: Option<f64>,
    nop_pair_cycles: Option<f64>,
    flushes: Option<f64>,
    last_flush_ops: Option<f64>,
    load_cycles: f64,
}

fn guest_run(backend: &str, policy: &str) -> GuestRun {
    let dir = std::env::temp_dir().join(format!("veil-bench-mermap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("ept.json");
    let tests = match policy {
        "report" => "hypercall_timing,mermap_flush_per_wrap,violation_latency",
        _ => "hypercall_timing,violation_latency",
    };
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args([
            "run",
            "--json",
            "--stage2",
            backend,
            "--on-violation",
            policy,
        ])
        .args(["--tests", tests, "--dump-format", "json", "--dump-ept"])
        .arg(&dump)
        .output()
        .expect("run veil");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{backend}/{policy}: {err}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let d: Value = serde_json::from_slice(&std::fs::read(&dump).unwrap()).expect("JSON dump");
    let _ = std::fs::remove_dir_all(&dir);
    let c = &d["mermap"]["windows"][0]["counters"];
    let mermap = policy == "report";
    GuestRun {
        tsc_khz: doc["timing"]["round_trip"]["tsc_khz"]
            .as_f64()
            .unwrap_or(0.0),
        pair_cycles: mermap
            .then(|| number_before(&err, "get/put pairs", "cycles per pair"))
            .flatten(),
        nop_pair_cycles: mermap
            .then(|| number_before(&err, "get/put pairs", "per Nop pair"))
            .flatten(),
        flushes: mermap.then(|| c["flushes"].as_f64()).flatten(),
        last_flush_ops: mermap.then(|| c["last_flush_ops"].as_f64()).flatten(),
        load_cycles: number_before(&err, "violation latency", "cycles per violating load")
            .unwrap_or_else(|| panic!("no latency line: {err}")),
    }
}

/// Host side: ns per get/put pair and per pair of Nops through `Session::hypercall` (no
/// exits).
fn host_run(backend: BackendKind) -> (f64, f64) {
    let mut cfg = VmConfig::new(DEFAULT_GUEST.to_vec());
    cfg.stage2 = backend;
    let mut vm = Vm::new(cfg).expect("VM");
    let s = vm.session_mut();
    let page = s.hypercall(Hc::Alloc as u32, [0, gfp::UNMAPPED, 0, 0]);
    assert_eq!(page.status, Status::Ok);
    const N: u32 = 100_000;
    let t0 = Instant::now();
    for _ in 0..N {
        let g = s.hypercall(Hc::MermapGet as u32, [page.r0, 1, 0, 0]);
        assert_eq!(g.status, Status::Ok);
        let p = s.hypercall(Hc::MermapPut as u32, [g.r0, 0, 0, 0]);
        assert_eq!(p.status, Status::Ok);
    }
    let pair = t0.elapsed().as_nanos() as f64 / f64::from(N);
    let t1 = Instant::now();
    for _ in 0..2 * N {
        let _ = s.hypercall(Hc::Nop as u32, [0; 4]);
    }
    let nop = t1.elapsed().as_nanos() as f64 / f64::from(N);
    (pair, nop)
}

fn main() {
    let Some(rounds) = harness::start("mermap", 5) else {
        return;
    };
    let backends = ["mprotect", "slots"];
    let mut report: Vec<Vec<GuestRun>> = vec![Vec::new(); 2];
    let mut inject: Vec<Vec<GuestRun>> = vec![Vec::new(); 2];
    let mut host: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2];
    for r in 0..rounds {
        for k in 0..2 {
            let i = (k + r) % 2;
            report[i].push(guest_run(backends[i], "report"));
            inject[i].push(guest_run(backends[i], "inject"));
            let kind = [BackendKind::Mprotect, BackendKind::Slots][i];
            host[i].push(host_run(kind));
        }
        eprintln!("mermap: round {}/{rounds} done", r + 1);
    }
    println!("mermap and inject figures, {rounds} runs per backend (median [min-max])");
    for (i, b) in backends.iter().enumerate() {
        let rep = &report[i];
        let inj = &inject[i];
        // Cycles at `khz` kHz, in ns.
        let us = |cycles: f64, khz: f64| {
            if khz > 0.0 {
                cycles / khz * 1e6
            } else {
                f64::NAN
            }
        };
        let col = |v: &[GuestRun], f: &dyn Fn(&GuestRun) -> Option<f64>| -> Vec<f64> {
            v.iter().filter_map(f).collect()
        };
        println!("\n{b}:");
        println!(
            "  guest get/put pair        {} ns",
            fmt(&col(rep, &|g| g.pair_cycles.map(|c| us(c, g.tsc_khz))), 0)
        );
        println!(
            "  guest Nop pair            {} ns",
            fmt(
                &col(rep, &|g| g.nop_pair_cycles.map(|c| us(c, g.tsc_khz))),
                0
            )
        );
        println!(
            "  pair / Nop pair           {}",
            fmt(&col(rep, &|g| Some(g.pair_cycles? / g.nop_pair_cycles?)), 2)
        );
        println!(
            "  flushes per 1e5 pairs     {}   (host ops in a flush: {})",
            fmt(&col(rep, &|g| g.flushes), 0),
            fmt(&col(rep, &|g| g.last_flush_ops), 0)
        );
        let h = &host[i];
        println!(
            "  host get/put pair         {} ns (handlers only; Nop pair {} ns, ratio {})",
            fmt(&h.iter().map(|x| x.0).collect::<Vec<_>>(), 0),
            fmt(&h.iter().map(|x| x.1).collect::<Vec<_>>(), 0),
            fmt(&h.iter().map(|x| x.0 / x.1).collect::<Vec<_>>(), 1)
        );
        let lr = col(rep, &|g| Some(us(g.load_cycles, g.tsc_khz)));
        let li = col(inj, &|g| Some(us(g.load_cycles, g.tsc_khz)));
        println!("  violating load, report    {} ns", fmt(&lr, 0));
        println!("  violating load, inject    {} ns", fmt(&li, 0));
        let ratio: Vec<f64> = inj
            .iter()
            .zip(rep)
            .map(|(a, b)| a.load_cycles / b.load_cycles)
            .collect();
        println!("  inject / report           {}", fmt(&ratio, 2));
    }
}
