//! End-to-end tests of live inspection as a person uses it: `veil run --control PATH` with a
//! guest that stays alive (`--tests control_wait`), `veil inspect` against it, malformed
//! requests on the raw socket, SIGUSR1 dumps, and `veil inspect` with nothing listening.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

use kvm_gate::kvm_available;
mod common;
use common::{scratch, text, veil};

/// `veil run --tests control_wait --control SOCK` plus `extra`, stdout and stderr piped.
fn start_waiting_guest(sock: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_veil"))
        .args([
            "run",
            "--tests",
            "control_wait",
            "--timeout",
            "120",
            "--control",
        ])
        .arg(sock)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start veil run")
}

/// `veil inspect SOCK args... --json`: the exit code and the reply object.
fn inspect_json(sock: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .arg("inspect")
        .arg(sock)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let v = serde_json::from_str(text(&out.stdout).trim()).unwrap_or(Value::Null);
    (out.status.code(), v, text(&out.stderr))
}

/// Waits until the guest is inside control_wait with its three violations made.
fn wait_until_waiting(child: &mut Child, sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("veil run ended before the test could inspect it: {status}");
        }
        if sock.exists() {
            let (code, v, _) = inspect_json(sock, &["stats"]);
            if code == Some(0) && v["running_test"] == "control_wait" && v["violations_total"] == 3
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the guest never reached control_wait"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `bytes` on a fresh connection and reads until the server closes it or a reply line
/// comes (`want_close`: read to EOF).
fn raw(sock: &Path, bytes: &[u8], want_close: bool) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if !want_close && got.contains(&b'\n') {
                    break;
                }
            }
            Err(e) => panic!(
                "reading the reply to {:?}: {e}",
                text(&bytes[..bytes.len().min(40)])
            ),
        }
    }
    text(&got)
}

fn error_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line.lines().next().unwrap_or("")).unwrap_or(Value::Null);
    assert_eq!(v["ok"], false, "{line}");
    v["error"].as_str().unwrap().to_string()
}

fn send_signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn inspect_a_running_guest_and_its_report_agree() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("live");
    let sock = dir.join("veil.sock");
    let dump = dir.join("d.json");
    let mut child = start_waiting_guest(&sock, &["--json", "--dump-ept", dump.to_str().unwrap()]);
    // A client that connects and never writes, held for the whole run.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut idle = UnixStream::connect(&sock).unwrap();
    wait_until_waiting(&mut child, &sock);

    // SIGUSR1 first, while the guest surely still runs: the next numbered dump beside
    // --dump-ept.
    send_signal(&child, libc::SIGUSR1);
    let numbered = dir.join("d.1.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !numbered.exists() {
        assert!(Instant::now() < deadline, "SIGUSR1 wrote no d.1.json");
        std::thread::sleep(Duration::from_millis(20));
    }

    // stats, violations, vcpus, dump in each format, through `veil inspect --json`.
    let (code, stats, err) = inspect_json(&sock, &["stats"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(stats["ok"], true);
    assert_eq!(stats["running_test"], "control_wait");
    assert_eq!(stats["violations_total"], 3);
    assert_eq!(stats["stage2_backend"], "mprotect");
    assert!(stats["allocator"]["managed_pages"].as_u64().unwrap() > 0);
    let (code, viol, err) = inspect_json(&sock, &["violations"]);
    assert_eq!(code, Some(0), "{err}");
    let live_records = viol["records"].as_array().unwrap().clone();
    assert_eq!(live_records.len(), 3, "{viol}");
    assert_eq!(viol["total"], 3);
    assert!(live_records
        .iter()
        .all(|r| r["test"] == "control_wait" && r["access"] == "read"));
    let (code, vc, err) = inspect_json(&sock, &["vcpus"]);
    assert_eq!(code, Some(0), "{err}");
    let cpus = vc["vcpus"].as_array().unwrap();
    assert_eq!(cpus.len(), 1, "{vc}");
    assert_eq!(cpus[0]["index"], 0);
    assert_eq!(cpus[0]["state"], "running", "{vc}");
    assert!(cpus[0]["exits"]["mmio"].as_u64().unwrap() >= 3, "{vc}");
    assert!(cpus[0]["exits"]["hypercalls"].as_u64().unwrap() > 0, "{vc}");
    assert!(cpus[0]["last_rip"].as_u64().unwrap() >= 0x200000, "{vc}");
    // The Nop loop keeps exiting: a second snapshot has more exits.
    std::thread::sleep(Duration::from_millis(200));
    let (_, vc2, _) = inspect_json(&sock, &["vcpus"]);
    assert!(
        vc2["vcpus"][0]["exits"]["total"].as_u64() > cpus[0]["exits"]["total"].as_u64(),
        "{vc} then {vc2}"
    );
    let (code, dj, err) = inspect_json(&sock, &["dump", "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let ranges = dj["dump"]["ranges"].as_array().expect("dump ranges");
    for r in &live_records {
        let gpa = r["gpa"].as_u64().unwrap();
        assert!(
            ranges.iter().any(|x| x["state"] == "unmapped"
                && x["start"].as_u64().unwrap() <= gpa
                && gpa < x["end"].as_u64().unwrap()),
            "violation at {gpa:#x} not in an unmapped range of the live dump"
        );
    }
    let out = veil(&["inspect", sock.to_str().unwrap(), "dump"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("Veil stage-2 dump (reason: control socket request)"),
        "{}",
        text(&out.stdout)
    );
    let out = veil(&["inspect", sock.to_str().unwrap(), "dump", "--format", "svg"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("<svg"), "not SVG");
    // The text forms for people.
    let out = veil(&["inspect", sock.to_str().unwrap(), "stats"]);
    assert!(
        text(&out.stdout).contains("running test:      control_wait"),
        "{}",
        text(&out.stdout)
    );
    let out = veil(&["inspect", sock.to_str().unwrap(), "violations"]);
    assert!(text(&out.stdout).starts_with("violations: 3 (3 kept"));
    let out = veil(&["inspect", sock.to_str().unwrap(), "vcpus"]);
    assert!(text(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .contains("running"));

    // Malformed requests: an error reply each, or a clean close; the run goes on.
    assert!(error_of(&raw(&sock, b"not json\n", false)).contains("not JSON"));
    assert!(error_of(&raw(&sock, b"{\"cmd\":\"reboot\"}\n", false)).contains("unknown cmd"));
    assert!(error_of(&raw(&sock, b"\xff\xfe\x00\x01garbage\n", false)).contains("UTF-8"));
    assert!(error_of(&raw(&sock, b"[]\n", false)).contains("JSON object"));
    assert!(error_of(&raw(
        &sock,
        b"{\"cmd\":\"dump\",\"format\":\"pdf\"}\n",
        false
    ))
    .contains("format"));
    let huge = vec![b'x'; 100_000];
    let reply = raw(&sock, &huge, true);
    assert!(error_of(&reply).contains("longer than 4096"), "{reply}");
    {
        let mut half = UnixStream::connect(&sock).unwrap();
        half.write_all(b"{\"cmd\":\"sta").unwrap();
    } // dropped: half a line, then gone
      // Several requests on one connection, in turn, answered in order.
    let two = raw(
        &sock,
        b"{\"cmd\":\"vcpus\"}\n\n{\"cmd\":\"stats\"}\n",
        false,
    );
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"cmd\":\"vcpus\"}\n{\"cmd\":\"stats\"}\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 65536];
    while got.matches('\n').count() < 2 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {got:?}");
        got.push_str(&text(&buf[..n]));
    }
    let lines: Vec<Value> = got
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines[0]["vcpus"].is_array() && lines[1]["violations_total"] == 3);
    assert!(two.contains("\"vcpus\""));
    drop(s);
    // Still serving after all that, and to several clients at once.
    let at_once: Vec<_> = (0..4)
        .map(|i| {
            let sock = sock.clone();
            let what = ["stats", "vcpus", "violations", "dump"][i];
            std::thread::spawn(move || inspect_json(&sock, &[what]))
        })
        .collect();
    for t in at_once {
        let (code, v, err) = t.join().unwrap();
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(v["ok"], true);
    }

    // The run finishes on its own despite the idle client, and its report agrees.
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // One line for the request, naming the file, its format and size (the writer's own
    // "wrote stage-2 dump" line used to follow it).
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("d.1.json")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("veil: SIGUSR1: wrote stage-2 dump 1 to ")
            && lines[0].ends_with(" KB)")
            && lines[0].contains("(json, "),
        "{stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["violations_total"], 3);
    let final_records = report["violations"].as_array().unwrap();
    for (live, fin) in live_records.iter().zip(final_records) {
        for k in ["gpa", "rip", "access", "size", "vcpu", "test", "action"] {
            assert_eq!(live[k], fin[k], "{k}");
        }
    }
    let dumps: Vec<&str> = report["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(dumps.len(), 2, "{dumps:?}");
    assert!(dumps[0].ends_with("d.1.json") && dumps[1].ends_with("d.json"));
    let d1: Value = serde_json::from_str(&std::fs::read_to_string(&numbered).unwrap()).unwrap();
    assert!(
        d1.to_string().contains("SIGUSR1 #1"),
        "reason not in the dump"
    );
    assert!(!sock.exists(), "the socket is removed at exit");
    // The idle client was closed, not left hanging.
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(idle.read(&mut b).unwrap(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr1_without_dump_ept_says_so_and_sigterm_removes_the_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("usr1");
    let sock = dir.join("veil.sock");
    let mut child = start_waiting_guest(&sock, &[]);
    wait_until_waiting(&mut child, &sock);
    send_signal(&child, libc::SIGUSR1);
    // The run loop writes the notice within a watchdog tick; then stop the run.
    std::thread::sleep(Duration::from_millis(500));
    send_signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("SIGUSR1: no stage-2 dump written: this run has no --dump-ept"),
        "{stderr}"
    );
    assert!(!sock.exists(), "the socket is removed on SIGTERM");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_with_nothing_listening() {
    let dir = scratch("none");
    let missing = dir.join("missing.sock");
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for p in [&missing, &stale] {
        let out = veil(&["inspect", p.to_str().unwrap(), "stats"]);
        assert_eq!(out.status.code(), Some(2));
        let want = format!(
            "veil: error: no veil run is listening on {0}: start one with --control {0}",
            p.display()
        );
        assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
    }
    // A file of another kind is named as such (a directory too).
    for p in [&file, &dir] {
        let out = veil(&["inspect", p.to_str().unwrap(), "stats"]);
        assert_eq!(out.status.code(), Some(2));
        let want = format!("veil: error: {} is not a socket", p.display());
        assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
    }
    // --format belongs to dump; an unknown command is clap's usage error.
    let out = veil(&[
        "inspect",
        missing.to_str().unwrap(),
        "stats",
        "--format",
        "svg",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--format applies to"));
    let out = veil(&["inspect", missing.to_str().unwrap(), "reboot"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn control_path_is_checked_before_the_guest_boots() {
    let dir = scratch("path");
    let file = dir.join("keep.txt");
    std::fs::write(&file, "keep").unwrap();
    let t = Instant::now();
    let out = veil(&["run", "--control", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("the path exists and is not a socket"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "refused before booting"
    );
    let out = veil(&["run", "--control", dir.join("no/dir/s").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let out = veil(&[
        "run",
        "--kernel",
        file.to_str().unwrap(),
        "--control",
        dir.join("s").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--control serves Veil guests only"));
    let _ = std::fs::remove_dir_all(&dir);
}
