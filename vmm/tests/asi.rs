//! Issue 14 through the `veil` binary: the ASI suite on both stage-2 backends with two vCPUs
//! (every test passes, ASI exits are not violations, the report's `asi` object counts the
//! transitions and shows vCPU 1's exposure window while vCPU 0 was exited), and the exit
//! dump's sensitive ranges with both views.

use std::process::Command;

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

use kvm_gate::kvm_available;

const ASI_TESTS: &str = "asi_restricted,asi_unmapped_both,asi_nonsensitive,\
                         asi_declassify_zeroes,asi_transitions,asi_smp";

fn asi_run(backend: &str, vcpus: &str) -> (Value, Value) {
    let dir =
        std::env::temp_dir().join(format!("veil-asi-{}-{backend}-{vcpus}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("dump.json");
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args([
            "run",
            "--json",
            "--stage2",
            backend,
            "--vcpus",
            vcpus,
            "--tests",
            ASI_TESTS,
            "--dump-ept",
            dump.to_str().unwrap(),
            "--dump-format",
            "json",
        ])
        .output()
        .expect("run veil");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{backend}: {stdout}");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (doc, d)
}

#[test]
fn asi_suite_on_both_backends_with_two_vcpus() {
    if !kvm_available() {
        return;
    }
    for backend in ["mprotect", "slots"] {
        let (doc, dump) = asi_run(backend, "2");
        for t in doc["tests"].as_array().unwrap() {
            assert_eq!(t["result"], "pass", "{backend}: {t}");
        }
        // ASI exits are transitions, not violations: only asi_unmapped_both's unmapped page.
        let violations = doc["violations"].as_array().unwrap();
        assert_eq!(violations.len(), 3, "{backend}");
        assert!(violations
            .iter()
            .all(|v| v["test"] == "asi_unmapped_both" && v["freetype"] == "unmovable|unmapped"));
        let asi = &doc["asi"];
        assert_eq!(asi["view_scope"], "per_vm");
        let exits = asi["exits"].as_u64().unwrap();
        // 3 + 1 + 16 + 2 (asi_smp: one per vCPU).
        assert_eq!(exits, 22, "{backend}: {asi}");
        assert_eq!(asi["enters"].as_u64().unwrap(), exits, "{backend}");
        assert!(asi["noop_enters"].as_u64().unwrap() >= 2, "{backend}");
        assert_eq!(
            asi["view_switches"].as_u64().unwrap(),
            2 * exits,
            "{backend}"
        );
        let trans = asi["transitions"].as_array().unwrap();
        let first = trans.iter().find(|t| t["kind"] == "exit").unwrap();
        for k in ["vcpu", "gpa", "rip", "access", "via", "ranges_toggled"] {
            assert!(
                !first[k].is_null(),
                "{backend}: transition lacks {k}: {first}"
            );
        }
        // vCPU 1's own exit in asi_smp.
        assert!(trans
            .iter()
            .any(|t| t["kind"] == "exit" && t["vcpu"] == 1 && t["test"] == "asi_smp"));
        // vCPU 1 was exposed while vCPU 0 was exited: a window names it with a duration.
        let windows = asi["exposure_windows"].as_array().unwrap();
        assert!(
            windows.iter().any(|w| w["opened_by"] == 0
                && w["exposed"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["vcpu"] == 1 && e["us"].as_f64().unwrap() > 0.0)),
            "{backend}: no window shows vCPU 1 exposed: {windows:?}"
        );
        let v1 = &asi["vcpus"][1];
        assert!(
            v1["exposed_us"].as_f64().unwrap() > 0.0 && v1["exposed_windows"].as_u64() > Some(0)
        );
        // The exit dump: sensitive blocks (freed sensitive pageblocks stay sensitive) with both
        // views, the VM back in the restricted view.
        assert_eq!(dump["asi_view"], "restricted");
        let sensitive: Vec<&Value> = dump["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "sensitive")
            .collect();
        assert!(
            !sensitive.is_empty(),
            "{backend}: no sensitive range in the dump"
        );
        for r in &sensitive {
            assert_eq!(
                (&r["restricted"], &r["full"]),
                (&Value::from("none"), &Value::from("read_write"))
            );
            assert!(
                r["slot"].is_null(),
                "{backend}: a sensitive range has a slot while restricted"
            );
        }
        assert_eq!(
            dump["totals"]["sensitive_runs"].as_u64().unwrap(),
            sensitive.len() as u64
        );
    }
}

#[test]
fn asi_smp_skips_with_one_vcpu_and_the_rest_passes() {
    if !kvm_available() {
        return;
    }
    let (doc, _) = asi_run("mprotect", "1");
    for t in doc["tests"].as_array().unwrap() {
        let want = if t["name"] == "asi_smp" {
            "skip"
        } else {
            "pass"
        };
        assert_eq!(t["result"], want, "{t}");
    }
    // One vCPU: nobody is exposed.
    assert_eq!(doc["asi"]["exposed_vcpu_ms"].as_f64(), Some(0.0));
}

#[test]
fn caps_reports_the_address_spaces_an_asi_view_could_use() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["caps"])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        t.contains("address spaces (KVM_CAP_MULTI_ADDRESS_SPACE)"),
        "{t}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["caps", "--json"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = doc["multi_address_space"]
        .as_u64()
        .expect("multi_address_space");
    // With fewer than two address spaces the view is per VM, and the row says so.
    if n < 2 {
        assert!(t.contains("ASI view per VM"), "{t}");
    }
}
