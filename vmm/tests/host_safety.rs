//! What happens around the guest (issue 9), through the `veil` binary: core dumps without guest
//! RAM, signals that keep the report, outputs that would block, a huge `.bss` that costs no
//! RSS, and the kill policy on the default suite.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use serde_json::Value;

// The tiny hand-assembled guests and the /dev/kvm gate of the `veil-tests` crate.
#[path = "../../tests/src/lib.rs"]
#[allow(dead_code, unused_imports)]
mod guests;

#[path = "../../tests/src/memlock.rs"]
mod memlock;

use guests::kvm_available;

mod common;
use common::scratch;

const VEIL: &str = env!("CARGO_BIN_EXE_veil");
/// The byte the secret guest plants in its unmapped page (4096 of them).
const SECRET: u8 = 0x5a;

/// A guest that allocates one unmapped page, has the host fill it with [`SECRET`]
/// (`HostFill`, a test-harness call: run it with `--test-harness`), prints "R" on the UART and spins until stopped.
fn secret_guest(dir: &Path) -> String {
    #[rustfmt::skip]
    let code = [
        0xbf, 0, 0, 0, 0, // mov edi, 0 (order)
        0xbe, 2, 0, 0, 0, // mov esi, 2 (UNMAPPED)
        0xb8, 3, 0, 0, 0, // mov eax, 3 (Hc::Alloc)
        0x66, 0xba, 0xe0, 0x05, // mov dx, 0x5e0
        0xef, // out dx, eax          -> rdi = GPA
        0xbe, 0x00, 0x10, 0, 0, // mov esi, 4096
        0xb9, SECRET, 0, 0, 0, // mov ecx, SECRET
        0xb8, 16, 0, 0, 0, // mov eax, 16 (Hc::HostFill)
        0xef, // out dx, eax
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'R', 0xee, // mov al, 'R'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0xeb, 0xfe, // jmp $
    ];
    let p = dir.join("secret.elf");
    std::fs::write(&p, vmm::elf::build_elf(veil_abi::IMAGE_MIN_GPA, &code, 0)).unwrap();
    p.display().to_string()
}

/// Sends each line of `r` to the returned channel.
fn lines_of(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (at most 60 s) for a line equal to `want`; returns the lines seen.
fn wait_for(rx: &Receiver<String>, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => {
                let hit = l.trim() == want;
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(_) => panic!("no line {want:?} within 60 s; saw {seen:?}"),
        }
    }
}

fn kill(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Waits (at most 60 s) until `child` catches SIGINT, SIGTERM and SIGHUP (`SigCgt` in its
/// /proc status), so a signal sent next meets veil's handler, not the default action.
fn wait_for_handlers(child: &Child) {
    let want =
        (1u64 << (libc::SIGINT - 1)) | (1 << (libc::SIGTERM - 1)) | (1 << (libc::SIGHUP - 1));
    for _ in 0..6000 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .unwrap_or(0);
        if caught & want == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("veil did not install its signal handlers within 60 s");
}

/// Sends `sig` to `child`, reads the rest of its stdout and waits: (exit code, stdout).
fn signal_and_collect(mut child: Child, sig: i32) -> (Option<i32>, String) {
    kill(&child, sig);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (child.wait().unwrap().code(), out)
}

/// Whether `hay` holds a run of at least 4096 bytes equal to `b`.
fn has_run(hay: &[u8], b: u8) -> bool {
    let mut run = 0usize;
    for &x in hay {
        run = if x == b { run + 1 } else { 0 };
        if run >= 4096 {
            return true;
        }
    }
    false
}

/// Boots the secret guest with `extra` options in `dir`, aborts it (SIGABRT) once the secret
/// is planted, and returns the core file it left, or None if the kernel wrote none there.
fn core_of_aborted_veil(dir: &Path, extra: &[&str]) -> Option<Vec<u8>> {
    let guest = secret_guest(dir);
    let mut cmd = Command::new(VEIL);
    cmd.args([
        "run",
        "--mem",
        "16M",
        "--timeout",
        "60",
        "--test-harness",
        "--guest",
        &guest,
    ])
    .args(extra)
    .current_dir(dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal safe and touches no state of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn veil");
    let rx = lines_of(child.stdout.take().unwrap());
    wait_for(&rx, "R");
    kill(&child, libc::SIGABRT);
    let st = child.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGABRT), "{st:?}");
    if !st.core_dumped() {
        return None;
    }
    let core = std::fs::read_dir(dir)
        .unwrap()
        .map_while(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("core"))?;
    Some(std::fs::read(core.path()).unwrap())
}

fn cores_unavailable(why: &str) {
    eprintln!("################################################################");
    eprintln!("# no core dump could be written ({why}): core-dump test SKIPPED");
    eprintln!("################################################################");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("core dumps are required in CI (CI=true): {why}");
    }
}

#[test]
fn a_core_of_a_killed_veil_holds_no_guest_ram_unless_asked() {
    if !kvm_available() {
        return;
    }
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let pattern = pattern.trim();
    if pattern.starts_with('|') || pattern.contains('/') || pattern.is_empty() {
        return cores_unavailable(&format!(
            "core_pattern {pattern:?} does not write into the working directory"
        ));
    }
    let dir = scratch("core-default");
    let Some(core) = core_of_aborted_veil(&dir, &[]) else {
        return cores_unavailable("the kernel wrote no core for SIGABRT");
    };
    assert!(core.len() > 4096, "a core of {} bytes", core.len());
    assert!(
        !has_run(&core, SECRET),
        "the unmapped page's secret is in the core ({} bytes)",
        core.len()
    );
    let dir2 = scratch("core-included");
    let core2 = core_of_aborted_veil(&dir2, &["--dump-guest-core"]).expect("a core");
    assert!(
        has_run(&core2, SECRET),
        "--dump-guest-core: the secret page should be in the core ({} bytes)",
        core2.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

/// `veil run` of the secret guest, interrupted by `sig` once the secret is planted.
fn interrupted_run(sig: i32, json: bool) -> (Option<i32>, String, PathBuf) {
    let dir = scratch(&format!("int-run-{sig}-{json}"));
    let guest = secret_guest(&dir);
    let dump = dir.join("d.json");
    let mut args = vec![
        "run".to_string(),
        "--mem".into(),
        "16M".into(),
        "--test-harness".into(),
        "--guest".into(),
        guest,
        "--tests".into(),
        "spin".into(),
        "--dump-ept".into(),
        dump.display().to_string(),
    ];
    if json {
        args.push("--json".into());
    }
    let mut child = Command::new(VEIL)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The guest console goes to stdout, or to stderr with --json.
    let (rx, mut other): (Receiver<String>, Box<dyn Read + Send>) = if json {
        (
            lines_of(child.stderr.take().unwrap()),
            Box::new(child.stdout.take().unwrap()),
        )
    } else {
        (
            lines_of(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        )
    };
    let before = wait_for(&rx, "R");
    kill(&child, sig);
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = other.read_to_string(&mut s);
        s
    });
    let st = child.wait().unwrap();
    let other = reader.join().unwrap();
    // Every line up to EOF: the reader thread may still be reading after the child exited
    // (`try_iter` here raced it and sometimes saw nothing past "R").
    let rest: Vec<String> = rx.iter().collect();
    let main = if json {
        other
    } else {
        before
            .into_iter()
            .chain(rest)
            .collect::<Vec<_>>()
            .join("\n")
    };
    (st.code(), main, dump)
}

#[test]
fn an_interrupted_route_is_not_judged_unrecorded() {
    if !kvm_available() {
        return;
    }
    let mut child = Command::new(VEIL)
        .args(["run", "--tests", "reachability", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    // The guest logs some routes as it ends them: interrupt as the silent-spin livelock routes
    // run (sidt after sgdt takes ~250 ms before the detector ends it).
    wait_for(&rx, "veil: guest: route sgdt_into_hole: Recovered");
    let (rc, out) = signal_and_collect(child, libc::SIGINT);
    assert_eq!(rc, Some(130), "{out}");
    let doc: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["tests"][0]["result"], "not_run", "{}", doc["tests"][0]);
    assert_eq!(doc["counts"]["failed"], 0);
    // The route cut off by the signal is left out, not called "blocked but unrecorded".
    let m = &doc["reachability"]["counts"];
    assert_eq!(m["blocked_but_unrecorded"], 0, "{m}");
    assert_eq!(m["leaked"], 0, "{m}");
    assert!(m["blocked_and_recorded"].as_u64().unwrap() < 80, "{m}");
}

/// SIGINT kicks every vCPU thread: with four vCPUs (vCPU 0 busy in a 100,000-call `hc_fuzz`,
/// the others parked) the run still stops cleanly with the complete report.
#[test]
fn a_signal_stops_every_vcpu() {
    if !kvm_available() {
        return;
    }
    let mut child = Command::new(VEIL)
        .args(["run", "--vcpus", "4", "--tests", "hc_fuzz", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    wait_for(&rx, "veil: guest: veil-guest: kernel up, announcing tests");
    std::thread::sleep(Duration::from_millis(300));
    let (rc, out) = signal_and_collect(child, libc::SIGINT);
    assert_eq!(rc, Some(130), "{out}");
    let doc: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["exit"]["kind"], "interrupted");
    assert_eq!(doc["vcpus"]["count"], 4);
    assert_eq!(doc["tests"][0]["result"], "not_run", "{}", doc["tests"][0]);
}

#[test]
fn signals_during_run_keep_the_complete_report_and_dumps() {
    if !kvm_available() {
        return;
    }
    for (sig, name, code) in [
        (libc::SIGINT, "SIGINT", 130),
        (libc::SIGTERM, "SIGTERM", 143),
        (libc::SIGHUP, "SIGHUP", 129),
    ] {
        let (rc, out, dump) = interrupted_run(sig, true);
        assert_eq!(rc, Some(code), "{name}: {out}");
        let doc: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{name}: stdout is not one JSON document ({e}):\n{out}"));
        assert_eq!(doc["exit"]["kind"], "interrupted", "{name}");
        assert_eq!(doc["exit"]["name"], name);
        assert_eq!(doc["exit"]["signal"], sig);
        // The selected test never ran: counted as not run, not failed.
        assert_eq!(doc["counts"]["not_run"], 1, "{name}: {}", doc["counts"]);
        assert_eq!(doc["counts"]["failed"], 0);
        assert_eq!(doc["tests"][0]["result"], "not_run");
        // The planted page was resident and unmapped: wiped before exit.
        assert_eq!(doc["wiped_bytes"], 4096, "{name}");
        assert!(doc["memory_lock"]["peak_locked_bytes"].is_u64());
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&dump).unwrap())
            .unwrap_or_else(|e| panic!("{name}: the exit dump is not JSON: {e}"));
        assert!(d.is_object(), "{name}");
    }
    let (rc, out, dump) = interrupted_run(libc::SIGINT, false);
    assert_eq!(rc, Some(130), "{out}");
    assert!(out.contains("exit: interrupted by SIGINT"), "{out}");
    assert!(
        out.contains("0 passed, 0 failed, 0 skipped, 1 not run"),
        "{out}"
    );
    assert!(dump.exists());
}

/// Plain-text kmem lines (one page allocation each).
fn kmem_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn={:#x} order=0 migratetype=0 gfp_flags=GFP_KERNEL\n",
                0x10000 + i
            )
        })
        .collect()
}

#[test]
fn signals_during_replay_keep_the_complete_report() {
    for kvm in [false, true] {
        if kvm && !kvm_available() {
            return;
        }
        for (sig, name, code) in [
            (libc::SIGINT, "SIGINT", 130),
            (libc::SIGTERM, "SIGTERM", 143),
            (libc::SIGHUP, "SIGHUP", 129),
        ] {
            // Standard input stays open: the replay is waiting for more of the trace.
            let mut args = vec!["replay", "-", "--json"];
            if kvm {
                args.push("--kvm");
            }
            let mut child = Command::new(VEIL)
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(kmem_lines(2000).as_bytes()).unwrap();
            stdin.flush().unwrap();
            wait_for_handlers(&child);
            std::thread::sleep(Duration::from_millis(200));
            let (rc, out) = signal_and_collect(child, sig);
            drop(stdin);
            assert_eq!(rc, Some(code), "{name} kvm={kvm}: {out}");
            let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
                panic!("{name} kvm={kvm}: not one JSON document ({e}):\n{out}")
            });
            assert_eq!(doc["interrupted"]["name"], name);
            assert_eq!(doc["kvm"], kvm);
            assert!(doc["trace"]["lines"].as_u64().unwrap() <= 2000);
            assert!(doc["policies"].is_array());
        }
    }
}

#[test]
fn a_signal_between_kvm_policies_keeps_the_finished_ones() {
    if !kvm_available() {
        return;
    }
    let trace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/kmem-trace-cargo-small.txt.gz");
    if !trace.exists() {
        eprintln!("# {} missing: test SKIPPED", trace.display());
        return;
    }
    let mut child = Command::new(VEIL)
        .args(["replay", trace.to_str().unwrap(), "--kvm", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    // The first policy's progress line names it; interrupt right after.
    let mut seen = Vec::new();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no policy line; saw {seen:?}"));
        let done = l.contains("freetype");
        seen.push(l);
        if done {
            break;
        }
    }
    let (rc, out) = signal_and_collect(child, libc::SIGTERM);
    assert_eq!(rc, Some(143), "{out}");
    let doc: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["interrupted"]["name"], "SIGTERM");
    let n = doc["policies"].as_array().unwrap().len();
    assert!((1..4).contains(&n), "{n} policies");
    assert_eq!(doc["policies"][0]["policy"], "freetype");
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn outputs_that_would_block_are_refused_before_boot() {
    let dir = scratch("fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let trace = dir.join("t.txt");
    std::fs::write(&trace, kmem_lines(10)).unwrap();
    for args in [
        vec!["run", "--console", f],
        vec!["run", "--dump-ept", f],
        vec!["replay", trace.to_str().unwrap(), "--plot", f],
    ] {
        let out = Command::new(VEIL)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("FIFO with no reader"), "{args:?}: {err}");
    }
    // `-` and /dev/null stay fine.
    if kvm_available() {
        let out = Command::new(VEIL)
            .args([
                "run",
                "--tests",
                "mapped_rw",
                "--console",
                "/dev/null",
                "--dump-ept",
                "-",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn numbered_dumps_only_beside_a_regular_file() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("devnull-link");
    let link = dir.join("d.json");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    // The default suite asks for dumps (Hc::Dump) in some tests.
    let out = Command::new(VEIL)
        .args(["run", "--dump-ept", link.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["d.json"], "files beside a link to /dev/null");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `cmd` and returns (exit code, peak RSS in KiB) from wait4's rusage.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives its rusage
fn run_with_rusage(cmd: &mut Command) -> (i32, i64) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; wait4 on our own child's pid (not waited for elsewhere).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid);
    (libc::WEXITSTATUS(status), ru.ru_maxrss)
}

#[test]
fn a_one_gib_bss_costs_no_rss() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("bss");
    // hlt after a 1 GiB - 16 bytes .bss: loads, boots, halts (exit 3).
    let elf = vmm::elf::build_elf(veil_abi::IMAGE_MIN_GPA, &[0xf4], (1 << 30) - 16);
    let p = dir.join("bss.elf");
    std::fs::write(&p, elf).unwrap();
    let (code, rss_kib) = run_with_rusage(Command::new(VEIL).args([
        "run",
        "--mem",
        "2G",
        "--guest",
        p.to_str().unwrap(),
    ]));
    assert_eq!(code, 3, "the guest halts");
    assert!(
        rss_kib < 256 * 1024,
        "peak RSS {rss_kib} KiB for a 1 GiB .bss"
    );
    eprintln!("1 GiB .bss: peak RSS {rss_kib} KiB");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_default_suite_passes_under_kill() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(VEIL)
        .args(["run", "--on-violation", "kill", "--json"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(out.status.code(), Some(0), "{}", doc["exit"]);
    assert_eq!(doc["counts"]["failed"], 0);
    assert_eq!(doc["counts"]["not_run"], 0);
    // Its declared violations were answered as under `report`, none killed.
    let v = doc["violations"].as_array().unwrap();
    assert!(!v.is_empty());
    assert!(v.iter().all(|v| v["action"] != "killed"), "{v:?}");
}

#[test]
fn unmapped_pages_are_locked_within_the_memlock_limit_and_the_report_says_so() {
    if !kvm_available() {
        return;
    }
    let limited = |args: &[&str]| {
        memlock::limit_memlock(Command::new(VEIL).args(args), 8 << 20)
            .output()
            .unwrap()
    };
    let caps: Value = serde_json::from_slice(&limited(&["caps", "--json"]).stdout).unwrap();
    assert_eq!(caps["memlock_bytes"], 8 << 20);
    // flip_amortised unmaps 16 MiB: more than the limit. The suite still passes (zeroing works
    // on locked and unlocked pages) and the report says locking did not hold.
    let out = limited(&["run", "--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(out.status.code(), Some(0), "{}", doc["exit"]);
    let l = &doc["memory_lock"];
    assert!(l["failed_bytes"].as_u64().unwrap() > 0, "{l}");
    assert_eq!(l["peak_locked_bytes"], 8 << 20, "{l}");
    // Without the limit (root here, or a large limit) every unmapped range is locked.
    let out = Command::new(VEIL).args(["run", "--json"]).output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let caps: Value = serde_json::from_slice(
        &Command::new(VEIL)
            .args(["caps", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    if caps["memlock_bytes"].is_null() {
        assert_eq!(
            doc["memory_lock"]["failed_bytes"], 0,
            "{}",
            doc["memory_lock"]
        );
        assert!(doc["memory_lock"]["peak_locked_bytes"].as_u64().unwrap() >= 16 << 20);
    }
}

#[test]
fn kill_policy_exits_3_with_the_report_at_an_undeclared_violation() {
    if !kvm_available() {
        return;
    }
    // No test declared the guest's load from its unmapped page: killed there.
    let dir = scratch("kill");
    let g = dir.join("kill.elf");
    std::fs::write(&g, guests::guest(guests::UNMAPPED_RW)).unwrap();
    let out = Command::new(VEIL)
        .args([
            "run",
            "--guest",
            g.to_str().unwrap(),
            "--on-violation",
            "kill",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("killed (--on-violation kill): read"), "{s}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_signal_ends_veil_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("second");
    let guest = secret_guest(&dir);
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two descriptors, which are handed to OwnedFd at once; the write
    // end's buffer is shrunk to one page (F_SETPIPE_SZ) so the JSON report cannot fit.
    let (r, w) = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096);
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let mut child = Command::new(VEIL)
        .args([
            "run",
            "--json",
            "--mem",
            "16M",
            "--test-harness",
            "--guest",
            &guest,
        ])
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    wait_for(&rx, "R");
    kill(&child, libc::SIGINT);
    // The first signal stops the guest; the report then blocks on the full pipe nobody reads.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "blocked writing the report"
    );
    kill(&child, libc::SIGINT);
    let st = child.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGINT), "{st:?}");
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
}
