//! End-to-end tests of `veil run`'s CI-facing output on real guests: `--junit`, `--quiet`,
//! `--repeat`, `--fail-on-skip`, RIPs resolved to guest symbols, named registers in JSON.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

use kvm_gate::kvm_available;
mod common;
use common::{scratch, text, veil};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

/// Where the data of a [`Guest`] starts (its code comes first, below it).
const DATA: usize = 0x800;
const BASE: u32 = veil_abi::IMAGE_MIN_GPA as u32;

/// A hand-assembled guest: code that makes hypercalls, strings after it at `DATA`.
#[derive(Default)]
struct Guest {
    code: Vec<u8>,
    data: Vec<u8>,
}

impl Guest {
    fn new() -> Guest {
        let mut g = Guest::default();
        g.doorbell();
        g
    }
    /// mov dx, 0x5e0 (the hypercall port).
    fn doorbell(&mut self) {
        self.code.extend_from_slice(&[0x66, 0xba, 0xe0, 0x05]);
    }
    /// A string in the data area: (GPA, length).
    fn str(&mut self, s: &str) -> (u32, u32) {
        let at = BASE + (DATA + self.data.len()) as u32;
        self.data.extend_from_slice(s.as_bytes());
        (at, s.len() as u32)
    }
    fn mov(&mut self, opcode: u8, v: u32) {
        self.code.push(opcode);
        self.code.extend_from_slice(&v.to_le_bytes());
    }
    /// Hypercall `nr` with rdi, rsi, rcx = `a` (rdi left alone when `a[0]` is None).
    fn hc(&mut self, nr: u32, a: [Option<u32>; 3]) {
        for (op, v) in [(0xbf, a[0]), (0xbe, a[1]), (0xb9, a[2])] {
            if let Some(v) = v {
                self.mov(op, v);
            }
        }
        self.mov(0xb8, nr);
        self.code.push(0xef); // out dx, eax
    }
    fn announce(&mut self, name: &str) -> (u32, u32) {
        let n = self.str(name);
        self.hc(6, [Some(n.0), Some(n.1), None]);
        n
    }
    fn begin(&mut self, n: (u32, u32)) {
        self.hc(7, [Some(n.0), Some(n.1), None]);
    }
    /// TestEnd with `result` (None: the one already in rdi).
    fn end(&mut self, result: Option<u32>, msg: &str) {
        let m = self.str(msg);
        self.hc(8, [result, Some(m.0), Some(m.1)]);
    }
    fn exit(mut self) -> Vec<u8> {
        self.hc(20, [Some(0), None, None]);
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        assert!(self.code.len() <= DATA);
        self.code.resize(DATA, 0x90);
        self.code.extend_from_slice(&self.data);
        vmm::elf::build_elf(veil_abi::IMAGE_MIN_GPA, &self.code, 0)
    }
}

/// Four tests: `good` passes, `bad` fails ("boom"), `later` skips, `never` is announced and
/// never run.
fn mixed_guest() -> Vec<u8> {
    let mut g = Guest::new();
    let good = g.announce("good");
    let bad = g.announce("bad");
    let later = g.announce("later");
    g.announce("never");
    g.begin(good);
    g.end(Some(0), "ok");
    g.begin(bad);
    g.end(Some(1), "boom: expected 1, found 2");
    g.begin(later);
    g.end(Some(2), "needs more vCPUs");
    g.exit()
}

/// One test, `coin`, that passes or fails by a bit of the TSC: flaky over repeated runs.
fn coin_guest() -> Vec<u8> {
    let mut g = Guest::new();
    let coin = g.announce("coin");
    g.begin(coin);
    // rdtsc; shr eax, 8; and eax, 1; mov edi, eax (rdtsc clobbers edx: the doorbell again)
    g.code
        .extend_from_slice(&[0x0f, 0x31, 0xc1, 0xe8, 0x08, 0x83, 0xe0, 0x01, 0x89, 0xc7]);
    g.doorbell();
    g.end(None, "tossed");
    g.exit()
}

/// What a JUnit document says about one testcase.
#[derive(Debug, Default)]
struct Case {
    /// "pass", or the child element: "failure", "error", "skipped".
    status: String,
    message: Option<String>,
    ty: Option<String>,
    time: f64,
    system_out: String,
}

/// Parses JUnit XML with quick-xml: the `<testsuite>` attributes and each testcase. Panics on
/// XML that is not well formed.
fn parse_junit(xml: &str) -> (BTreeMap<String, String>, BTreeMap<String, Case>) {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut suite = BTreeMap::new();
    let mut cases: BTreeMap<String, Case> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_out = false;
    let attrs = |e: &quick_xml::events::BytesStart| -> BTreeMap<String, String> {
        e.attributes()
            .map(|a| {
                let a = a.expect("attribute");
                (
                    String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                    a.unescape_value().expect("value").into_owned(),
                )
            })
            .collect()
    };
    loop {
        let ev = r.read_event().expect("well-formed XML");
        let (start, empty_case) = match &ev {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            _ => (None, false),
        };
        match ev {
            Event::Eof => break,
            Event::Start(_) | Event::Empty(_) => {
                let e = start.unwrap();
                let a = attrs(&e);
                match e.name().as_ref() {
                    b"testsuite" => suite = a,
                    b"testcase" => {
                        let name = a["name"].clone();
                        cases.insert(
                            name.clone(),
                            Case {
                                status: "pass".into(),
                                time: a["time"].parse().unwrap(),
                                ..Default::default()
                            },
                        );
                        current = (!empty_case).then_some(name);
                    }
                    k @ (b"failure" | b"error" | b"skipped") => {
                        let c = cases.get_mut(current.as_ref().unwrap()).unwrap();
                        c.status = String::from_utf8(k.to_vec()).unwrap();
                        c.message = a.get("message").cloned();
                        c.ty = a.get("type").cloned();
                    }
                    b"system-out" => in_out = true,
                    _ => {}
                }
            }
            Event::Text(t) if in_out => {
                if let Some(c) = current.as_ref().and_then(|n| cases.get_mut(n)) {
                    c.system_out.push_str(&t.unescape().unwrap());
                }
            }
            Event::End(e) => match e.name().as_ref() {
                b"system-out" => in_out = false,
                b"testcase" => current = None,
                _ => {}
            },
            _ => {}
        }
    }
    (suite, cases)
}

#[test]
fn junit_lists_passed_failed_skipped_and_not_run_tests() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("junit");
    let guest = write(&dir, "mixed.elf", &mixed_guest());
    let junit = dir.join("out.xml");
    let out = veil(&["run", "--guest", &guest, "--junit", junit.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failure and a not-run test: {stderr}"
    );
    assert!(
        stderr.contains(&format!("wrote JUnit XML to {}", junit.display())),
        "announced: {stderr}"
    );
    let xml = std::fs::read_to_string(&junit).expect("JUnit file written");
    let (suite, cases) = parse_junit(&xml);
    assert_eq!(suite["name"], "veil");
    assert_eq!(
        (
            suite["tests"].as_str(),
            suite["failures"].as_str(),
            suite["errors"].as_str(),
            suite["skipped"].as_str()
        ),
        ("4", "1", "1", "1"),
        "{xml}"
    );
    assert_eq!(cases["good"].status, "pass");
    assert_eq!(cases["bad"].status, "failure");
    assert_eq!(
        cases["bad"].message.as_deref(),
        Some("boom: expected 1, found 2")
    );
    assert_eq!(cases["later"].status, "skipped");
    assert_eq!(cases["later"].message.as_deref(), Some("needs more vCPUs"));
    assert_eq!(cases["never"].status, "error");
    assert_eq!(cases["never"].ty.as_deref(), Some("not_run"));
    assert!(cases["good"].time >= 0.0);
    // An unwritable --junit path is refused before the guest boots.
    let out = veil(&[
        "run",
        "--guest",
        &guest,
        "--junit",
        "/nonexistent/dir/x.xml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("JUnit"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn junit_of_the_default_guest_names_each_tests_violations_by_symbol() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("junit-suite");
    let junit = dir.join("suite.xml");
    let out = veil(&[
        "run",
        "--tests",
        "mapped_rw,unmapped_read_direct,cross_vcpu_isolation",
        "--junit",
        junit.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON still on stdout");
    let (suite, cases) = parse_junit(&std::fs::read_to_string(&junit).unwrap());
    assert_eq!(suite["tests"], "3");
    assert_eq!(cases["mapped_rw"].status, "pass");
    assert_eq!(cases["cross_vcpu_isolation"].status, "skipped");
    let out_text = &cases["unmapped_read_direct"].system_out;
    assert!(
        out_text.contains("(veil_guest::tests::unmapped::unmapped_read_direct+0x"),
        "the violation, resolved to the guest function that made it: {out_text}"
    );
    // The same symbol in the JSON, next to the RIP.
    let v = &doc["violations"][0];
    let sym = v["rip_symbol"].as_str().expect("rip_symbol");
    assert!(
        sym.starts_with("veil_guest::tests::unmapped::unmapped_read_direct+0x"),
        "{v}"
    );
    let off = u64::from_str_radix(sym.rsplit("+0x").next().unwrap(), 16).unwrap();
    assert!(off < v["rip"].as_u64().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn violation_rips_are_named_in_the_text_report() {
    if !kvm_available() {
        return;
    }
    let out = veil(&["run", "--tests", "unmapped_read_direct"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("read ") && l.contains("rip 0x"))
        .unwrap_or_else(|| panic!("a violation line: {stdout}"));
    assert!(
        line.contains(" (veil_guest::tests::unmapped::unmapped_read_direct+0x"),
        "{line}"
    );
}

#[test]
fn crash_rips_resolve_when_the_elf_has_symbols_and_registers_are_named() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("crash-sym");
    // nop; nop; jmp $ -- the spin is in "spinner".
    let code = [0x90, 0x90, 0xeb, 0xfe];
    let stripped = vmm::elf::build_elf(veil_abi::IMAGE_MIN_GPA, &code, 0);
    let named = vmm::symbols::add_symbols(
        stripped.clone(),
        veil_abi::IMAGE_MIN_GPA,
        code.len() as u64,
        &[("boot_entry", 0, 2), ("spinner", 2, 2)],
    );
    let named = write(&dir, "named.elf", &named);
    let stripped = write(&dir, "stripped.elf", &stripped);
    let out = veil(&["run", "--guest", &named, "--timeout", "0.5", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let regs = &doc["exit"]["regs"];
    assert_eq!(doc["exit"]["kind"], "timeout");
    assert_eq!(regs["rip"], 0x20_0002);
    assert_eq!(regs["rip_symbol"], "spinner+0x0");
    for r in [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "rsp", "rflags", "cr0", "cr3", "cr4", "efer", "cs",
    ] {
        assert!(regs[r].is_u64(), "regs.{r}: {regs}");
    }
    assert!(regs.get("gprs").is_none(), "no unnamed array: {regs}");
    // The boot info block's GPA is in rdi at entry and nothing changed it.
    assert_eq!(regs["rdi"], veil_abi::BOOT_INFO_GPA);
    let out = veil(&["run", "--guest", &named, "--timeout", "0.5"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("at rip 0x200002 (spinner+0x0)"), "{stdout}");
    // A stripped guest runs as before: no symbol, the same exit.
    let out = veil(&["run", "--guest", &stripped, "--timeout", "0.5", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(doc["exit"]["regs"]["rip_symbol"].is_null());
    assert_eq!(doc["exit"]["regs"]["rip"], 0x20_0002);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quiet_prints_one_summary_line_and_nothing_else() {
    if !kvm_available() {
        return;
    }
    let out = veil(&[
        "run",
        "--tests",
        "mapped_rw,unmapped_read_direct",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        "2 passed, 0 failed, 0 skipped, 0 not run; 1 violations; exit: guest exited with code 0\n"
    );
    assert_eq!(text(&out.stderr), "", "no console, no log lines");
    // Nor the VMM's informational lines (the sweep prints one without --quiet).
    let out = veil(&["run", "--tests", "sweep"]);
    assert!(
        text(&out.stderr).contains("veil: sweep on "),
        "{}",
        text(&out.stderr)
    );
    let out = veil(&["run", "--tests", "sweep", "--quiet"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stderr), "");
    assert!(text(&out.stdout).starts_with("1 passed, 0 failed"));
    // With --json: the document alone.
    let out = veil(&["run", "--tests", "mapped_rw", "--quiet", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("only JSON on stdout");
    assert_eq!(doc["counts"]["passed"], 1);
    assert_eq!(text(&out.stderr), "");
    // Failures are named on the line, and apart from them the tests that never ran (a crash,
    // a timeout or Ctrl-C cut them off: they did not fail).
    let dir = scratch("quiet");
    let guest = write(&dir, "mixed.elf", &mixed_guest());
    let out = veil(&["run", "--guest", &guest, "-q"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        "1 passed, 1 failed, 1 skipped, 1 not run; 0 violations; failed: bad; not run: never; \
         exit: guest exited with code 0\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fail_on_skip_fails_a_run_whose_cross_vcpu_test_skipped() {
    if !kvm_available() {
        return;
    }
    let tests = "mapped_rw,cross_vcpu_isolation";
    let out = veil(&["run", "--tests", tests, "--vcpus", "1"]);
    assert_eq!(out.status.code(), Some(0), "a skip alone does not fail");
    assert!(text(&out.stdout).contains("1 passed, 0 failed, 1 skipped"));
    let out = veil(&["run", "--tests", tests, "--vcpus", "1", "--fail-on-skip"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--fail-on-skip"),
        "says why: {}",
        text(&out.stderr)
    );
    let out = veil(&["run", "--tests", tests, "--vcpus", "2", "--fail-on-skip"]);
    assert_eq!(out.status.code(), Some(0), "nothing skips on two vCPUs");
}

#[test]
fn repeat_reports_each_timing_figure_over_the_runs() {
    if !kvm_available() {
        return;
    }
    let out = veil(&[
        "run",
        "--tests",
        "mapped_rw,hypercall_timing",
        "--repeat",
        "2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rep = &doc["repeat"];
    assert_eq!(
        (rep["runs"].as_u64(), rep["requested"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(rep["flaky"], serde_json::json!([]));
    for fig in [
        "run_ms",
        "total_ms",
        "boot_ms",
        "round_trip.ratio",
        "round_trip.hypercall_cycles_per_call",
    ] {
        let f = &rep["timing"][fig];
        let (med, min, max) = (
            f["median"].as_f64().unwrap(),
            f["min"].as_f64().unwrap(),
            f["max"].as_f64().unwrap(),
        );
        assert_eq!(f["n"], 2, "{fig}: {f}");
        assert!(min <= med && med <= max && min > 0.0, "{fig}: {f}");
    }
    for t in rep["tests"].as_array().unwrap() {
        assert_eq!(t["results"], serde_json::json!(["pass", "pass"]), "{t}");
        assert_eq!(t["time_ms"]["n"], 2);
    }
    // The text form: one line per figure.
    let out = veil(&["run", "--tests", "hypercall_timing", "--repeat", "2"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("repeat: 2 of 2 runs; verdicts agree in every run"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("round_trip.ratio")),
        "{stdout}"
    );
    // 0 runs is a usage error, as too many are.
    for bad in ["0", "1001", "x"] {
        let out = veil(&["run", "--repeat", bad]);
        assert_eq!(out.status.code(), Some(2), "--repeat {bad}");
        assert!(
            text(&out.stderr).contains("--repeat"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_test_whose_outcome_changes_between_repeats_is_flaky_and_fails_the_run() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("flaky");
    let guest = write(&dir, "coin.elf", &coin_guest());
    let junit = dir.join("coin.xml");
    // 20 tosses of a TSC bit: all alike with probability 2^-19.
    let out = veil(&[
        "run",
        "--guest",
        &guest,
        "--repeat",
        "20",
        "--json",
        "--junit",
        junit.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["repeat"]["runs"], 20);
    assert_eq!(doc["repeat"]["flaky"], serde_json::json!(["coin"]));
    let results = doc["repeat"]["tests"][0]["results"].as_array().unwrap();
    assert!(results.contains(&"pass".into()) && results.contains(&"fail".into()));
    let (_, cases) = parse_junit(&std::fs::read_to_string(&junit).unwrap());
    assert_eq!(cases["coin"].status, "failure");
    assert_eq!(cases["coin"].ty.as_deref(), Some("flaky"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ci_options_are_refused_with_kernel() {
    for opt in [
        &["--junit", "x.xml"][..],
        &["--repeat", "2"],
        &["--fail-on-skip"],
        &["--quiet"],
    ] {
        let mut args = vec!["run", "--kernel", "/nonexistent"];
        args.extend_from_slice(opt);
        let out = veil(&args);
        assert_eq!(out.status.code(), Some(2), "{opt:?}");
        assert!(
            text(&out.stderr).contains("cannot be used with"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn help_documents_the_ci_options_and_every_exit_code() {
    let out = veil(&["run", "--help"]);
    let s = text(&out.stdout);
    for k in [
        "--junit <FILE>",
        "--quiet",
        "--repeat <N>",
        "--fail-on-skip",
        "P passed, F failed, S skipped, N not run; V violations; exit: HOW",
        "guest halted",
        "KVM_RUN failing",
        "flaky",
        "130, 143, 129",
    ] {
        assert!(s.contains(k), "`veil run --help` lacks {k:?}");
    }
}
