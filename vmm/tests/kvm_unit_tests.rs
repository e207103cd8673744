//! kvm-unit-tests (x86_64) through `veil run --kernel`: builds the suite from the shared
//! tarball with `.ci/kvm-unit-tests.sh` (a loud skip without gcc/make, a failure under
//! `CI=true`), runs every test in `kvm-unit-tests/list.txt` and checks its result against
//! `kvm-unit-tests/expected.txt` (PASS / SKIP / FAIL with its reason): a new failure or an
//! unexpected pass fails the test. Prints a table (test, expected, result, seconds).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

/// One line of `list.txt`.
#[derive(Debug)]
struct Entry {
    name: String,
    file: String,
    vcpus: u32,
    timeout: f64,
    mask: Option<String>,
    cmdline: String,
}

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kvm-unit-tests")
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn list() -> Vec<Entry> {
    lines(&here().join("list.txt"))
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 5, "list.txt: bad line {l:?}");
            Entry {
                name: f[0].into(),
                file: f[1].into(),
                vcpus: f[2].parse().expect("vcpus"),
                timeout: f[3].parse().expect("timeout"),
                mask: (f[4] != "-").then(|| f[4].to_string()),
                cmdline: f[5..].join(" "),
            }
        })
        .collect()
}

/// `name -> (PASS|SKIP|FAIL, reason)`; a verdict may list alternatives (`PASS|FAIL`) for a test
/// whose result depends on the hardware under the nested host.
fn expected() -> BTreeMap<String, (String, String)> {
    lines(&here().join("expected.txt"))
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 2, "expected.txt: bad line {l:?}");
            let want = f[1].to_string();
            assert!(
                want.split('|')
                    .all(|w| ["PASS", "SKIP", "FAIL"].contains(&w)),
                "expected.txt: {l:?}: PASS, SKIP or FAIL, or alternatives such as PASS|FAIL"
            );
            let reason = f[2..].join(" ");
            assert!(
                want == "PASS" || !reason.is_empty(),
                "expected.txt: {l:?}: a SKIP or FAIL needs its reason"
            );
            (f[0].to_string(), (want, reason))
        })
        .collect()
}

/// Builds the suite; `None` when skipped (said loudly by the script).
fn build() -> Option<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dest = repo.join("target/kvm-unit-tests");
    let st = Command::new("bash")
        .arg(repo.join(".ci/kvm-unit-tests.sh"))
        .arg(&dest)
        .status()
        .expect("run .ci/kvm-unit-tests.sh");
    match st.code() {
        Some(0) => Some(dest.join("kvm-unit-tests/x86")),
        Some(77) => None,
        _ => panic!("building kvm-unit-tests failed ({st})"),
    }
}

#[test]
fn kvm_unit_tests_match_expectations() {
    let entries = list();
    let want = expected();
    for e in &entries {
        assert!(
            want.contains_key(&e.name),
            "{}: no line in expected.txt",
            e.name
        );
    }
    for k in want.keys() {
        assert!(
            entries.iter().any(|e| &e.name == k),
            "expected.txt: {k} is not in list.txt"
        );
    }
    if !kvm_gate::kvm_available() {
        return;
    }
    let Some(x86) = build() else { return };
    let scratch = std::env::temp_dir().join(format!("veil-kut-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut table = Vec::new();
    let mut wrong = Vec::new();
    for e in &entries {
        let env = scratch.join(format!("{}.env", e.name));
        std::fs::write(&env, format!("NR_CPUS={}\n", e.vcpus)).unwrap();
        let kernel = x86.join(&e.file);
        let t0 = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil"));
        cmd.args(["run", "--json", "--mem", "256M", "--kernel"])
            .arg(&kernel)
            .arg("--module")
            .arg(&env)
            .args(["--vcpus", &e.vcpus.to_string()])
            .args(["--timeout", &e.timeout.to_string()])
            .args(["--console", "/dev/null"]);
        if let Some(m) = &e.mask {
            cmd.args(["--cpuid-mask", m]);
        }
        if !e.cmdline.is_empty() {
            cmd.args(["--cmdline", &e.cmdline]);
        }
        let out = cmd.output().expect("run veil");
        let secs = t0.elapsed().as_secs_f64();
        let got = match serde_json::from_slice::<Value>(&out.stdout) {
            Ok(j) => {
                let r = j["result"].as_str().unwrap_or("?").to_string();
                let how = match j["exit"]["kind"].as_str() {
                    Some("debug_exit") => format!("value {}", j["exit"]["value"]),
                    Some(k) => k.to_string(),
                    None => "?".into(),
                };
                (r, how)
            }
            // Veil itself failed to report: no expectation covers that (a FAIL is the
            // guest's failure, crash or timeout as Veil reports it).
            Err(_) => (
                "no-report".to_string(),
                format!(
                    "no report (exit {:?}): {}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ),
        };
        let (w, reason) = &want[&e.name];
        let ok = w.split('|').any(|w| match w {
            "PASS" => got.0 == "pass",
            "SKIP" => got.0 == "skip",
            _ => got.0 == "fail" || got.0 == "error",
        });
        table.push(format!(
            "{:<24} {:<5} {:<6} {:<16} {:>6.1} s  {}",
            e.name,
            w,
            got.0.to_uppercase(),
            got.1,
            secs,
            if ok {
                String::new()
            } else {
                format!("<-- expected {w}: {reason}")
            }
        ));
        if !ok {
            wrong.push(format!(
                "{}: expected {w} ({reason}), got {} ({})",
                e.name,
                got.0.to_uppercase(),
                got.1
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!("kvm-unit-tests through veil run --kernel:");
    eprintln!(
        "{:<24} {:<5} {:<6} {:<16} {:>8}",
        "test", "want", "got", "how", "time"
    );
    for l in &table {
        eprintln!("{l}");
    }
    assert!(
        wrong.is_empty(),
        "kvm-unit-tests differ from expected.txt:\n{}",
        wrong.join("\n")
    );
}
