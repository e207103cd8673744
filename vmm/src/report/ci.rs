//! CI-facing output of `veil run`: the `--quiet` summary line and the `--junit` file.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use super::{RunReport, TestOutcome};

/// The one line `veil run --quiet` prints: `P passed, F failed, S skipped, N not run; V
/// violations[; failed: NAMES][; not run: NAMES][; flaky: NAMES]; exit: HOW` (`; runs: N` after the violations
/// with `--repeat`).
pub fn quiet_line(r: &RunReport) -> String {
    let c = r.counts();
    let mut s = format!(
        "{} passed, {} failed, {} skipped, {} not run; {} violations",
        c.passed, c.failed, c.skipped, c.not_run, r.violations_total
    );
    if let Some(rep) = &r.repeat {
        s.push_str(&format!("; runs: {}", rep.runs));
    }
    // A test cut off by a crash, a timeout or Ctrl-C did not fail: it is listed apart.
    for (label, outcome) in [
        ("failed", TestOutcome::Fail),
        ("not run", TestOutcome::NotRun),
    ] {
        let names: Vec<&str> = r
            .tests
            .iter()
            .filter(|t| t.result == outcome)
            .map(|t| t.name.as_str())
            .collect();
        if !names.is_empty() {
            s.push_str(&format!("; {label}: {}", names.join(", ")));
        }
    }
    if let Some(rep) = r.repeat.as_ref().filter(|rep| !rep.flaky.is_empty()) {
        s.push_str(&format!("; flaky: {}", rep.flaky.join(", ")));
    }
    s.push_str(&format!("; exit: {}", r.exit.summary()));
    s
}

/// Writes the report as JUnit XML to `path` (a FIFO with a reader or /dev/null included).
pub fn write_junit(r: &RunReport, path: &Path) -> anyhow::Result<()> {
    let xml = super::junit::to_xml(r).context("cannot build the JUnit XML")?;
    let what = || format!("cannot write the JUnit report {}", path.display());
    let mut f = replay::cli::create_output(path).with_context(what)?;
    f.write_all(xml.as_bytes()).with_context(what)?;
    f.flush().with_context(what)?;
    Ok(())
}
