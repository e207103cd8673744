//! Snapshot tests of what a person reads: every `--help` text (each subcommand's, found from
//! the clap definition, so a new subcommand needs a snapshot too) and the main error messages,
//! each compared with a committed file in `vmm/tests/snapshots/` (stdout, stderr and the exit
//! code of one `veil` invocation).
//!
//! After an intended change, regenerate them all (and delete stale ones) with
//!
//! ```text
//! UPDATE_SNAPSHOTS=1 cargo test --release -p vmm --test snapshots
//! ```
//!
//! and review the change with `git diff vmm/tests/snapshots/`. On a mismatch the test prints a
//! line diff (`-` snapshot, `+` now) for every case that differs.
//!
//! The output does not depend on the terminal: clap is built without `wrap_help`, so help is
//! wrapped at its fixed 100 columns whatever the terminal says; the commands also run with
//! `COLUMNS=100`, `NO_COLOR=1`, no `RUST_LOG` and stdin/stdout/stderr not terminals, in an empty
//! scratch directory (so relative paths in messages are the same everywhere).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::CommandFactory;

/// The snapshot directory.
fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
}

/// One invocation's output as the snapshot file holds it.
fn capture(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("RUST_LOG_STYLE")
        .env_remove("VEIL_LOG_TIME")
        .env_remove("CLICOLOR_FORCE")
        .env("NO_COLOR", "1")
        .env("COLUMNS", "100")
        .env("LINES", "50")
        .env("TERM", "dumb")
        .stdin(Stdio::null())
        .output()
        .expect("run veil");
    let code = out
        .status
        .code()
        .map_or_else(|| format!("{:?}", out.status), |c| c.to_string());
    format!(
        "$ veil {}\nexit code: {code}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `veil [SUB ...] --help` for the top level and every subcommand, nested ones included.
fn help_cases() -> Vec<(String, Vec<String>)> {
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<(String, Vec<String>)>) {
        let name = if path.is_empty() {
            "help".to_string()
        } else {
            format!("help-{}", path.join("-"))
        };
        let mut args = path.clone();
        args.push("--help".into());
        out.push((name, args));
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            path.push(sub.get_name().to_string());
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(&vmm::cli::Cli::command(), &mut Vec::new(), &mut out);
    // Short help too, for the top level and `run` (the one a new user types first).
    out.push(("help-short".into(), vec!["-h".into()]));
    out.push(("help-run-short".into(), vec!["run".into(), "-h".into()]));
    out
}

/// The main error messages: bad sizes, unknown options and values, missing files and names.
/// Only `--tests nope` boots a guest (the embedded one lists its tests; the list of names in
/// the message is the suite's, so a new guest test changes that snapshot).
const ERROR_CASES: &[(&str, &[&str])] = &[
    ("err-no-command", &[]),
    ("err-unknown-command", &["frobnicate"]),
    ("err-unknown-option", &["run", "--bogus"]),
    ("err-mem-bare-number", &["run", "--mem", "3"]),
    ("err-mem-too-small", &["run", "--mem", "3M"]),
    ("err-mem-too-large", &["run", "--mem", "100T"]),
    ("err-mem-misaligned", &["run", "--mem", "7M"]),
    ("err-mem-syntax", &["run", "--mem", "12X"]),
    (
        "err-replay-mem-too-small",
        &["replay", "--mem", "1M", "t.txt"],
    ),
    (
        "err-replay-mem-bare-number",
        &["replay", "--mem", "3", "t.txt"],
    ),
    ("err-stage2-unknown", &["run", "--stage2", "ept"]),
    ("err-replay-missing-trace", &["replay", "no-such-trace.txt"]),
    ("err-replay-no-trace-arg", &["replay"]),
    ("err-tests-bad-name", &["run", "--tests", "Mapped-RW"]),
    (
        "err-tests-empty-name",
        &["run", "--tests", "mapped_rw,,oom"],
    ),
    ("err-tests-unknown", &["run", "--tests", "nope"]),
    ("err-vcpus-zero", &["run", "--vcpus", "0"]),
    ("err-vcpus-not-a-number", &["run", "--vcpus", "many"]),
    ("err-vcpus-too-many", &["run", "--vcpus", "99"]),
    ("err-timeout-negative", &["run", "--timeout", "-1"]),
    (
        "err-on-violation-unknown",
        &["run", "--on-violation", "explode"],
    ),
];

/// A line diff of `old` and `new` (longest common subsequence), with 2 lines of context.
fn diff(old: &str, new: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let (n, m) = (a.len(), b.len());
    // lcs[i][j]: common lines of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops = Vec::new(); // (' ' | '-' | '+', line)
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    let near: Vec<bool> = (0..ops.len())
        .map(|k| {
            let lo = k.saturating_sub(2);
            let hi = (k + 3).min(ops.len());
            ops[lo..hi].iter().any(|o| o.0 != ' ')
        })
        .collect();
    let mut out = String::new();
    let mut skipped = false;
    for (k, (op, line)) in ops.iter().enumerate() {
        if near[k] {
            if skipped {
                out.push_str("   ...\n");
                skipped = false;
            }
            out.push_str(&format!(" {op} {line}\n"));
        } else {
            skipped = true;
        }
    }
    out
}

#[test]
fn help_and_error_messages_match_their_snapshots() {
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| !v.is_empty() && v != "0");
    let scratch = std::env::temp_dir().join(format!("veil-snapshots-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cases: Vec<(String, Vec<String>)> = help_cases();
    cases.extend(ERROR_CASES.iter().map(|(name, args)| {
        (
            name.to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        )
    }));
    std::fs::create_dir_all(dir()).unwrap();
    let mut failures = Vec::new();
    let mut names = BTreeSet::new();
    for (name, args) in &cases {
        assert!(
            names.insert(format!("{name}.txt")),
            "two cases named {name}"
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let now = capture(&args, &scratch);
        let path = dir().join(format!("{name}.txt"));
        if update {
            std::fs::write(&path, &now).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(old) if old == now => {}
            Ok(old) => failures.push(format!(
                "{name} (`veil {}`) differs from {}:\n{}",
                args.join(" "),
                path.display(),
                diff(&old, &now)
            )),
            Err(_) => failures.push(format!(
                "{name} (`veil {}`): no snapshot {}; it would be:\n{now}",
                args.join(" "),
                path.display()
            )),
        }
    }
    // Snapshots no case produces any more (a subcommand removed or renamed).
    for e in std::fs::read_dir(dir()).unwrap() {
        let file = e.unwrap().file_name().to_string_lossy().into_owned();
        if file.ends_with(".txt") && !names.contains(&file) {
            if update {
                std::fs::remove_file(dir().join(&file)).unwrap();
            } else {
                failures.push(format!("{file}: a snapshot no case produces"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        failures.is_empty(),
        "{} snapshot(s) differ; if the change is intended, regenerate them with\n  \
         UPDATE_SNAPSHOTS=1 cargo test --release -p vmm --test snapshots\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The snapshots say what this issue asked of the messages, so a regeneration cannot quietly
/// lose it: the `veil:` prefix on usage errors with clap's usage and tip kept, exit codes 0 for
/// help and 2 for errors, the size wording, terminal-independent help.
#[test]
fn snapshots_keep_the_promised_wording() {
    let read = |n: &str| std::fs::read_to_string(dir().join(format!("{n}.txt"))).unwrap();
    for (name, _) in help_cases() {
        let s = read(&name);
        assert!(s.contains("exit code: 0\n"), "{name}: {s}");
        assert!(
            s.contains("--- stderr\n") && s.ends_with("--- stderr\n"),
            "{name}: stderr not empty"
        );
    }
    for (name, _) in ERROR_CASES {
        let s = read(name);
        assert!(s.contains("exit code: 2\n"), "{name}: {s}");
        assert!(!s.contains("panicked"), "{name}: {s}");
        let err = &s[s.find("--- stderr\n").unwrap() + 11..];
        if *name != "err-no-command" {
            assert!(
                err.lines().any(|l| l.starts_with("veil: error: ")),
                "{name}: {err}"
            );
            assert!(err
                .lines()
                .all(|l| l.starts_with("veil: ") || !l.contains("error:")));
        }
    }
    assert!(read("err-unknown-option").contains("Usage: veil run [OPTIONS]"));
    assert!(read("err-unknown-option").contains("For more information, try '--help'."));
    assert!(read("err-mem-too-large").contains("veil: error: --mem 100T: at most 64G\n"));
    assert!(read("err-mem-too-small").contains("veil: error: --mem 3M: at least 6M\n"));
    assert!(read("err-mem-bare-number")
        .contains("--mem 3: 3 bytes is not a multiple of 2 MiB; did you mean 3G?\n"));
    assert!(read("err-replay-mem-too-small").contains("veil: error: --mem 1M: at least 4M\n"));
}

/// Help does not follow the terminal's width: the same text at 40 and at 250 columns.
#[test]
fn help_does_not_depend_on_the_terminal_width() {
    let help = |cols: &str| {
        Command::new(env!("CARGO_BIN_EXE_veil"))
            .args(["run", "--help"])
            .env("COLUMNS", cols)
            .output()
            .expect("run veil")
            .stdout
    };
    let narrow = help("40");
    assert!(narrow.len() > 1000);
    assert_eq!(narrow, help("250"));
}

#[test]
fn the_diff_shows_changed_lines_with_context() {
    let old = "a\nb\nc\nd\ne\nf\ng\nh\n";
    let new = "a\nb\nc\nD\ne\nf\ng\nh\ni\n";
    assert_eq!(
        diff(old, new),
        "   ...\n   b\n   c\n - d\n + D\n   e\n   f\n   g\n   h\n + i\n"
    );
    let long: String = (0..20).map(|i| format!("<{i}>\n")).collect();
    let changed = long.replace("<3>", "three").replace("<17>", "seventeen");
    assert_eq!(
        diff(&long, &changed),
        "   ...\n   <1>\n   <2>\n - <3>\n + three\n   <4>\n   <5>\n   ...\n   <15>\n   <16>\n - <17>\n + seventeen\n   <18>\n   <19>\n"
    );
}
