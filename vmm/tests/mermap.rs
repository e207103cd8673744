//! Issue 15 through the binary: the guest's mermap tests on both stage-2 backends and under
//! `--host-secretmem` with two vCPUs (every one passes; the exit dump shows both windows, with
//! one flush per wrap and the batch's host operations per backend), and `--on-violation
//! inject` (the guest's handler counts the #VEs, the report counts them too; none under
//! `report`).

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

use kvm_gate::kvm_available;
mod common;
use common::{text, veil};

const MERMAP_TESTS: &str = "mermap_basic,mermap_size_edges,mermap_exhaustion,\
                            mermap_stale_until_wrap,mermap_flush_per_wrap,mermap_vcpu_isolation";

/// Runs `args` with `--json` and an exit-time JSON dump; returns (report, dump, stderr).
fn run_json(name: &str, args: &[&str]) -> (Value, Value, String) {
    let dir = std::env::temp_dir().join(format!("veil-mermap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("ept.json");
    let mut all = vec!["run", "--json", "--dump-ept", dump.to_str().unwrap()];
    all.extend_from_slice(&["--dump-format", "json"]);
    all.extend_from_slice(args);
    let out = veil(&all);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let d: Value = serde_json::from_slice(&std::fs::read(&dump).expect("dump")).expect("JSON dump");
    let _ = std::fs::remove_dir_all(&dir);
    (doc, d, stderr)
}

fn results(doc: &Value) -> Vec<(String, String)> {
    doc["tests"]
        .as_array()
        .expect("tests[]")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The mermap suite passes on `slots`, `mprotect` and `mprotect --host-secretmem` with two
/// vCPUs; the dump's windows account for every flush (one per wrap) and name the backend.
#[test]
fn mermap_tests_pass_on_both_backends_and_with_secret_memory() {
    if !kvm_available() {
        return;
    }
    let configs: [(&str, &[&str], &str, bool); 3] = [
        ("slots", &["--stage2", "slots"], "memslots", false),
        ("mprotect", &["--stage2", "mprotect"], "alias", false),
        ("secretmem", &["--host-secretmem"], "alias", true),
    ];
    for (name, extra, backend, secret) in configs {
        let mut args = vec!["--vcpus", "2", "--tests", MERMAP_TESTS];
        args.extend_from_slice(extra);
        let (doc, d, stderr) = run_json(name, &args);
        let r = results(&doc);
        assert_eq!(r.len(), 6, "{name}: {r:?}");
        for (t, res) in &r {
            assert_eq!(res, "pass", "{name}: {t} {res}: {stderr}");
        }
        if secret {
            assert_eq!(
                doc["stage2_checks"]["host_secretmem"], true,
                "{name}: {}",
                doc["stage2_checks"]
            );
        }
        let m = &d["mermap"];
        assert_eq!(m["backend"], backend, "{name}: {m}");
        assert_eq!(m["window_pages"], 65);
        let w = m["windows"].as_array().expect("windows[]");
        assert_eq!(w.len(), 2, "{name}: one window per vCPU");
        let ram = d["ram_size"].as_u64().unwrap();
        let base0 = w[0]["base"].as_u64().unwrap();
        assert!(base0 >= ram, "{name}: the window lies above RAM");
        assert_eq!(w[1]["base"].as_u64().unwrap(), base0 + 65 * 4096);
        let c = &w[0]["counters"];
        let wraps = c["wraps"].as_u64().unwrap();
        assert!(wraps >= 100_000 / 64, "{name}: {c}");
        assert_eq!(c["flushes"], c["wraps"], "{name}: one flush per wrap: {c}");
        assert!(
            w[0]["live"].as_array().unwrap().is_empty(),
            "{name}: all put back"
        );
        let last = c["last_flush_ops"].as_u64().unwrap();
        match backend {
            // One mmap over the window per flush.
            "alias" => assert_eq!(last, 1, "{name}: {c}"),
            // One KVM_SET_USER_MEMORY_REGION per stale one-page slot.
            _ => assert!(last > 1, "{name}: {c}"),
        }
        // vCPU 1 mapped and put back one page of its own, and never reached vCPU 0's.
        assert_eq!(w[1]["counters"]["gets"], 1, "{name}: {}", w[1]);
        assert!(
            stderr.contains("mermap: 100000 get/put pairs"),
            "{name}: the cost line is logged"
        );
    }
}

/// `--on-violation inject`: the guest's #VE handler counts one #VE per violating instruction
/// (the `inject` test checks count and mailbox), the report counts them, the guest runs on;
/// under `report` the same tests inject nothing (and `inject` checks so).
#[test]
fn inject_policy_tells_the_guest_and_report_does_not() {
    if !kvm_available() {
        return;
    }
    let tests = "unmapped_read_direct,unmapped_widths,inject,violation_latency";
    for backend in ["mprotect", "slots"] {
        let (doc, _, stderr) = run_json(
            &format!("inject-{backend}"),
            &[
                "--on-violation",
                "inject",
                "--stage2",
                backend,
                "--tests",
                tests,
            ],
        );
        for (t, res) in results(&doc) {
            assert_eq!(res, "pass", "{backend}: {t} {res}: {stderr}");
        }
        let n = doc["vcpus"]["ve_injected"].as_u64().unwrap();
        // unmapped_read_direct 1, unmapped_widths one per instruction, inject 3, 200 loads.
        assert!(n > 204, "{backend}: {n} #VE injected");
        let exits = doc["violations"].as_array().unwrap().len() as u64;
        assert!(n < exits, "{backend}: {n} #VE for {exits} violation exits");
        assert!(stderr.contains("violation latency (inject)"), "{stderr}");
    }
    let (doc, _, _) = run_json("report", &["--tests", tests]);
    let r = results(&doc);
    // `inject` checks that no #VE arrives under report.
    assert!(r.contains(&("inject".into(), "pass".into())), "{r:?}");
    assert_eq!(doc["vcpus"]["ve_injected"], 0);
    // The text dump shows the windows and their slots.
    let path = std::env::temp_dir().join(format!("veil-mermap-{}-dump.txt", std::process::id()));
    let out = veil(&[
        "run",
        "--tests",
        "mermap_basic",
        "--dump-ept",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let s = std::fs::read_to_string(&path).expect("text dump");
    let _ = std::fs::remove_file(&path);
    assert!(s.contains("Mermap windows (65 pages per vCPU"), "{s}");
    assert!(s.contains("vCPU 0: ["), "{s}");
}
