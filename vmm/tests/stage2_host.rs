//! Issue 12 through the `veil` binary: `--host-secretmem` (the whole suite on secret memory,
//! flips refused past the memlock limit with a typed error, never a crash), `--verify-stage2`
//! and the guest's `stage2_verify` and `sweep` tests on both stage-2 backends.

use std::process::{Command, Output};

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

#[path = "../../tests/src/memlock.rs"]
mod memlock;

use kvm_gate::kvm_available;
mod common;
use common::veil;

const VEIL: &str = env!("CARGO_BIN_EXE_veil");

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `veil` under an 8 MiB `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK` (which would ignore it).
fn limited(args: &[&str]) -> Output {
    memlock::limit_memlock(Command::new(VEIL).args(args), 8 << 20)
        .output()
        .unwrap()
}

fn test_result<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no test {name}"))
}

/// The sweep's verdict: exactly the unreachable managed pages made violations.
fn assert_exact_sweep(doc: &Value, what: &str) -> (u64, u64) {
    let sweeps = doc["stage2_checks"]["sweeps"].as_array().unwrap();
    assert_eq!(sweeps.len(), 1, "{what}: {sweeps:?}");
    let w = &sweeps[0];
    assert_eq!(w["pages_loaded"], w["managed_pages"], "{what}: {w}");
    assert_eq!(w["missing_total"], 0, "{what}: {w}");
    assert_eq!(w["extra_total"], 0, "{what}: {w}");
    let unreachable = w["unreachable_pages"].as_u64().unwrap();
    // The sweep's own unmapped allocations flip at least one whole pageblock.
    assert!(unreachable >= 512, "{what}: {w}");
    assert_eq!(
        w["violation_pages"].as_u64().unwrap(),
        unreachable,
        "{what}"
    );
    (w["managed_pages"].as_u64().unwrap(), unreachable)
}

#[test]
fn the_suite_passes_on_secret_memory_with_every_update_reconciled() {
    if !kvm_available() {
        return;
    }
    let out = veil(&["run", "--host-secretmem", "--verify-stage2", "--json"]);
    let doc = json(&out);
    assert_eq!(out.status.code(), Some(0), "{}", doc["exit"]);
    let c = &doc["stage2_checks"];
    assert_eq!(c["host_secretmem"], true);
    assert_eq!(c["verify_stage2"], true);
    assert_eq!(c["mismatches_total"], 0, "{c}");
    assert!(c["reconcile_errors"].as_array().unwrap().is_empty(), "{c}");
    // Every update, every test end and the run's end: more than one per test.
    let tests = doc["tests"].as_array().unwrap().len() as u64;
    assert!(c["reconciliations"].as_u64().unwrap() > tests, "{c}");
    assert_eq!(c["tampers_caught"].as_array().unwrap().len(), 1, "{c}");
    assert_exact_sweep(&doc, "mprotect + secretmem");
    // Unmapped pageblocks are secret memory, not mlocked memfd pages.
    assert_eq!(doc["memory_lock"]["failed_bytes"], 0);
}

#[test]
fn sweep_and_reconciliation_on_both_backends() {
    if !kvm_available() {
        return;
    }
    let mut seen = Vec::new();
    for backend in ["slots", "mprotect"] {
        let out = veil(&[
            "run",
            "--stage2",
            backend,
            "--verify-stage2",
            "--tests",
            "protect_readonly,stage2_verify,sweep",
            "--json",
        ]);
        let doc = json(&out);
        assert_eq!(out.status.code(), Some(0), "{backend}: {}", doc["exit"]);
        for t in ["protect_readonly", "stage2_verify", "sweep"] {
            assert_eq!(test_result(&doc, t)["result"], "pass", "{backend}: {t}");
        }
        let c = &doc["stage2_checks"];
        assert_eq!(c["mismatches_total"], 0, "{backend}: {c}");
        let caught = c["tampers_caught"].as_array().unwrap();
        assert_eq!(caught.len(), 1, "{backend}: {c}");
        assert_eq!(caught[0]["intended_perm"], "read_write");
        assert_eq!(caught[0]["realised_perm"], "none");
        assert_eq!(
            caught[0]["end"].as_u64().unwrap() - caught[0]["start"].as_u64().unwrap(),
            4096
        );
        // protect_readonly leaves one no-access page: the sweep counts it as unreachable.
        let (managed, unreachable) = assert_exact_sweep(&doc, backend);
        assert_eq!(
            unreachable % 512,
            1,
            "{backend}: the locked page and whole blocks"
        );
        seen.push((managed, unreachable));
    }
    assert_eq!(seen[0], seen[1], "both backends sweep the same layout");
}

#[test]
fn secret_memory_past_the_memlock_limit_fails_flips_with_a_reported_error() {
    if !kvm_available() {
        return;
    }
    let caps = json(&limited(&["caps", "--json"]));
    let d = &caps["direct_map_removal"];
    if d["memfd_secret"] != true {
        eprintln!(
            "memfd_secret unavailable here ({}): test SKIPPED",
            d["memfd_secret_error"]
        );
        return;
    }
    assert_eq!(d["mechanism"], "memfd_secret");
    // 8 MiB of memlock, two mappings per unmapped byte: two pageblocks.
    assert_eq!(d["secret_bytes_allowed"], 4 << 20, "{d}");
    let out = limited(&[
        "run",
        "--host-secretmem",
        "--verify-stage2",
        "--tests",
        "mapped_rw,flip_amortised",
        "--json",
    ]);
    let doc = json(&out);
    // A test failure (1), not a crash (3): the guest saw an allocation failure.
    assert_eq!(out.status.code(), Some(1), "{}", doc["exit"]);
    assert_eq!(doc["exit"]["kind"], "guest_exit", "{}", doc["exit"]);
    assert_eq!(test_result(&doc, "mapped_rw")["result"], "pass");
    let f = test_result(&doc, "flip_amortised");
    assert_eq!(f["result"], "fail");
    assert!(
        f["message"].as_str().unwrap().contains("Stage2Failed"),
        "{f}"
    );
    let c = &doc["stage2_checks"];
    let refused = c["refused_updates"].as_array().unwrap();
    assert!(
        refused.iter().any(|r| {
            let r = r.as_str().unwrap();
            r.contains("memfd_secret") && r.contains("os error 11")
        }),
        "{c}"
    );
    // The refused flips changed nothing: the host still realises what the engine intends.
    assert_eq!(c["mismatches_total"], 0, "{c}");
    assert!(c["reconcile_errors"].as_array().unwrap().is_empty(), "{c}");
}

#[test]
fn host_secretmem_needs_the_mprotect_backend() {
    let out = veil(&["run", "--stage2", "slots", "--host-secretmem"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--host-secretmem needs --stage2 mprotect"),
        "{err}"
    );
    let help = String::from_utf8_lossy(&veil(&["run", "--help"]).stdout).to_string();
    assert!(help.contains("--host-secretmem") && help.contains("--verify-stage2"));
}
