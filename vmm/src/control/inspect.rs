//! `veil inspect PATH dump|stats|violations|vcpus`: asks a running `veil run --control PATH`
//! and prints the reply, for people (default) or as the raw reply line (`--json`).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::Value;

use super::client::{self, ClientError};
use super::protocol::Request;
use crate::cli::Failure;
use crate::dump::DumpFormat;
use crate::report::exit_code;

/// What `veil inspect` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// The stage-2 dump now (--format text|json|svg).
    Dump,
    /// The report's counters so far.
    Stats,
    /// The violation records so far.
    Violations,
    /// Each vCPU's state, exits and last RIP.
    Vcpus,
}

/// `veil inspect` options.
#[derive(Debug, Args, Clone)]
pub struct InspectArgs {
    /// The socket a `veil run --control PATH` listens on.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,

    /// What to ask for: `dump` (the stage-2 dump as the exit dump renders it), `stats` (tests,
    /// violations, stage-2 and allocator counters so far), `violations` (the records so far,
    /// at most 10,000), `vcpus` (each vCPU's state, exits by kind, last RIP).
    #[arg(
        value_enum,
        value_name = "dump|stats|violations|vcpus",
        hide_possible_values = true
    )]
    pub what: What,

    /// The dump's format (dump only; default text).
    #[arg(
        long,
        value_enum,
        value_name = "text|json|svg",
        hide_possible_values = true
    )]
    pub format: Option<DumpFormat>,

    /// Print the reply as the run sent it: one JSON object on one line.
    #[arg(long)]
    pub json: bool,
}

/// `veil inspect`'s long help.
pub const INSPECT_ABOUT: &str = "\
Ask a running `veil run --control PATH` what its guest is doing, without stopping it: the
stage-2 dump now (as the exit dump renders it), the report's counters so far, the violation
records so far, or each vCPU's state, exits and last RIP. The run answers on its Unix socket in
a JSON-lines protocol (one request object per line, one reply object per line; see the README):
  {\"cmd\":\"dump\",\"format\":\"text|json|svg\"}  {\"cmd\":\"stats\"}  {\"cmd\":\"violations\"}  {\"cmd\":\"vcpus\"}
replies {\"ok\":true,...} or {\"ok\":false,\"error\":\"...\"}. Requests longer than 4096 bytes are
refused and the connection closed; a connection idle for 30 s is closed. `--json` prints the
reply line itself; without it the reply is printed for people (a text or SVG dump as is).";

/// `veil inspect`'s exit codes and examples.
pub const INSPECT_AFTER: &str = "\
Exit codes: 0 the reply was printed; 1 the run answered with an error (\"ok\":false, printed on
stderr); 2 usage error, nothing listening at PATH (\"no veil run is listening on PATH\"), PATH
a file that is not a socket, the connection failed or closed without a reply, no reply within
30 s, or a reply that is not the protocol's.

Examples:
  veil run --tests reachability --control /tmp/veil.sock &
  veil inspect /tmp/veil.sock stats
  veil inspect /tmp/veil.sock dump --format svg > now.svg
  veil inspect /tmp/veil.sock vcpus --json";

/// `veil inspect`.
pub fn cmd_inspect(args: &InspectArgs) -> Result<i32, Failure> {
    let req = match (args.what, args.format) {
        (What::Dump, f) => Request::Dump(f.unwrap_or(DumpFormat::Text)),
        (_, Some(_)) => {
            return Err(anyhow::anyhow!("--format applies to `veil inspect PATH dump` only").into())
        }
        (What::Stats, None) => Request::Stats,
        (What::Violations, None) => Request::Violations,
        (What::Vcpus, None) => Request::Vcpus,
    };
    let reply = client::request(&args.path, req).map_err(|e: ClientError| Failure {
        code: exit_code::USAGE,
        error: e.into(),
    })?;
    if !reply.ok() {
        if args.json {
            println!("{}", reply.raw);
        }
        let msg = reply.value["error"].as_str().unwrap_or("(no message)");
        crate::cli::say(&format!("error: the run refused the request: {msg}"));
        return Ok(exit_code::TEST_FAILURE);
    }
    if args.json {
        println!("{}", reply.raw);
    } else {
        print!("{}", pretty(req, &reply.value));
    }
    Ok(exit_code::OK)
}

/// The reply to `req` for people.
pub fn pretty(req: Request, v: &Value) -> String {
    match req {
        Request::Dump(_) => match &v["dump"] {
            Value::String(s) if s.ends_with('\n') => s.clone(),
            Value::String(s) => format!("{s}\n"),
            other => format!(
                "{}\n",
                serde_json::to_string_pretty(other).unwrap_or_default()
            ),
        },
        Request::Stats => stats(v),
        Request::Violations => violations(v),
        Request::Vcpus => vcpus(v),
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn stats(v: &Value) -> String {
    let mut o = String::new();
    let t = &v["tests"];
    let _ = writeln!(
        o,
        "running test:      {}",
        v["running_test"].as_str().unwrap_or("(none)")
    );
    let _ = writeln!(
        o,
        "tests:             {} passed, {} failed, {} skipped, {} not run ({} announced)",
        n(&t["passed"]),
        n(&t["failed"]),
        n(&t["skipped"]),
        n(&t["not_run"]),
        n(&v["tests_announced"])
    );
    let _ = writeln!(
        o,
        "violations:        {} ({} kept, {} outside tests)",
        n(&v["violations_total"]),
        n(&v["violations_kept"]),
        n(&v["violations_outside_tests"])
    );
    let _ = writeln!(o, "not-RAM accesses:  {}", n(&v["not_ram_total"]));
    if let Some(ms) = v["run_ms"].as_f64() {
        let _ = writeln!(o, "running for:       {:.1} s", ms / 1e3);
    }
    if let Some(d) = v["dumps"].as_array().filter(|d| !d.is_empty()) {
        let names: Vec<&str> = d.iter().filter_map(Value::as_str).collect();
        let _ = writeln!(o, "dumps written:     {}", names.join(", "));
    }
    let _ = writeln!(
        o,
        "stage 2 ({}):",
        v["stage2_backend"].as_str().unwrap_or("?")
    );
    fields(&mut o, &v["stage2"]);
    let _ = writeln!(o, "allocator (per-order tables: --json):");
    fields(&mut o, &v["allocator"]);
    o
}

/// One `  key  value` line per member of `obj` (lists compact JSON; tables, lists of lists,
/// are left to `--json`).
fn fields(o: &mut String, obj: &Value) {
    if let Value::Object(m) = obj {
        for (k, v) in m {
            if v.as_array().is_some_and(|a| a.iter().any(Value::is_array)) {
                continue;
            }
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(o, "  {k:<28} {text}");
        }
    }
}

fn violations(v: &Value) -> String {
    let mut o = String::new();
    let records = v["records"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        o,
        "violations: {} ({} kept, {} outside tests){}",
        n(&v["total"]),
        n(&v["kept"]),
        n(&v["outside_tests"]),
        if v["truncated"] == Value::Bool(true) {
            format!(", the first {} shown", records.len())
        } else {
            String::new()
        }
    );
    for r in &records {
        let gpa = match r["gpa"].as_u64() {
            Some(g) => format!("GPA {g:#011x}"),
            None => "address unknown".into(),
        };
        let _ = writeln!(
            o,
            "  {:<5} {:>2} bytes at {:<15}  rip {:#x}  vcpu {}  {}  {}  test {}  -> {}",
            r["access"].as_str().unwrap_or("?"),
            n(&r["size"]),
            gpa,
            n(&r["rip"]),
            n(&r["vcpu"]),
            r["freetype"].as_str().unwrap_or("-"),
            r["owner"].as_str().unwrap_or("-"),
            r["test"].as_str().unwrap_or("-"),
            r["action"].as_str().unwrap_or("?"),
        );
    }
    o
}

fn vcpus(v: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<5} {:<8} {:>10} {:>10} {:>8} {:>8} {:>6} {:>7}  last RIP",
        "vCPU", "state", "exits", "hypercalls", "mmio", "pio", "bare", "faults"
    );
    for c in v["vcpus"].as_array().into_iter().flatten() {
        let e = &c["exits"];
        let rip = match c["last_rip"].as_u64() {
            Some(r) => format!("{r:#x}"),
            None => "-".into(),
        };
        let _ = writeln!(
            o,
            "{:<5} {:<8} {:>10} {:>10} {:>8} {:>8} {:>6} {:>7}  {rip}",
            n(&c["index"]),
            c["state"].as_str().unwrap_or("?"),
            n(&e["total"]),
            n(&e["hypercalls"]),
            n(&e["mmio"]),
            n(&e["pio"]),
            n(&e["bare"]),
            n(&e["memory_faults"]),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pretty_replies() {
        let v = json!({"ok": true, "vcpus": [{"index": 0, "state": "running",
            "exits": {"total": 9, "hypercalls": 7, "bare": 0, "pio": 1, "mmio": 1, "memory_faults": 0},
            "last_rip": 0x20_1000}, {"index": 1, "state": "halted", "exits": {}, "last_rip": null}]});
        let t = pretty(Request::Vcpus, &v);
        assert!(t.lines().nth(1).unwrap().contains("running"), "{t}");
        assert!(t.contains("0x201000"), "{t}");
        assert!(t.lines().nth(2).unwrap().ends_with('-'), "{t}");
        let v = json!({"ok": true, "total": 2, "kept": 1, "outside_tests": 0, "truncated": true,
            "records": [{"gpa": 0x40_0080, "access": "read", "size": 8, "rip": 0x20_2000, "vcpu": 0,
                         "freetype": "unmovable|unmapped", "owner": "allocated", "test": "t",
                         "action": "poisoned"}]});
        let t = pretty(Request::Violations, &v);
        assert!(
            t.starts_with("violations: 2 (1 kept, 0 outside tests), the first 1 shown"),
            "{t}"
        );
        assert!(t.contains("GPA 0x000400080"), "{t}");
        let t = pretty(Request::Dump(DumpFormat::Text), &json!({"dump": "a"}));
        assert_eq!(t, "a\n");
        let t = pretty(
            Request::Stats,
            &json!({"tests": {"passed": 3}, "stage2": {"flips": 2}}),
        );
        assert!(t.contains("3 passed"), "{t}");
        assert!(t.contains("flips"), "{t}");
    }
}
