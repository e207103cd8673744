//! `veil run --junit FILE`: the run as JUnit XML (through `quick-junit`), for CI. One
//! `<testsuite name="veil">` for the run, one `<testcase>` per selected guest test:
//! passed (no child), failed (`<failure>` with the message; `type="flaky"` when its outcome
//! differed between `--repeat` runs), skipped (`<skipped>` with the guest's message), not run
//! (`<error type="not_run">`); its duration; the violations it made in its `<system-out>`.

use std::time::Duration;

use quick_junit::{NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestSuite};

use super::{group_violations, RunReport, TestOutcome, TestReport};

/// Most violation runs listed in one test's `<system-out>` (the rest are counted).
pub const MAX_LISTED: usize = 100;

fn ms(v: f64) -> Duration {
    Duration::try_from_secs_f64(v.max(0.0) / 1e3).unwrap_or_default()
}

/// The violations `test` made, one line per run of exits (at most [`MAX_LISTED`]), plus the
/// aggregated and uncounted ones.
fn violations_of(r: &RunReport, t: &TestReport) -> String {
    let mut out = String::new();
    let mine: Vec<_> = r
        .violations
        .iter()
        .filter(|v| v.test.as_deref() == Some(t.name.as_str()))
        .cloned()
        .collect();
    let runs = group_violations(&mine);
    for g in runs.iter().take(MAX_LISTED) {
        out.push_str(&mine[g.first].line(g));
        out.push('\n');
    }
    if runs.len() > MAX_LISTED {
        out.push_str(&format!(
            "... and {} more runs of exits\n",
            runs.len() - MAX_LISTED
        ));
    }
    let agg: u64 = r
        .violations_aggregated
        .iter()
        .filter(|g| g.test.as_deref() == Some(t.name.as_str()))
        .map(|g| g.count)
        .sum();
    if agg > 0 {
        out.push_str(&format!(
            "{agg} more violations aggregated (violations_aggregated in --json)\n"
        ));
    }
    if t.violations > 0 || t.expected_violations > 0 {
        out.push_str(&format!(
            "{} violations, {} declared (ExpectViolation)\n",
            t.violations, t.expected_violations
        ));
    }
    out
}

fn case(r: &RunReport, t: &TestReport) -> TestCase {
    let flaky = r.repeat.as_ref().and_then(|rep| {
        rep.tests
            .iter()
            .find(|x| x.name == t.name && x.flaky)
            .map(|x| {
                let o: Vec<&str> = x.results.iter().map(|o| o.name()).collect();
                format!("flaky: outcomes over {} runs: {}", o.len(), o.join(", "))
            })
    });
    let mut status = match (t.result, &flaky) {
        (_, Some(why)) => {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
            s.set_type("flaky").set_message(why.as_str());
            if !t.message.is_empty() {
                s.set_description(format!("last run: {}: {}", t.result.name(), t.message));
            }
            s
        }
        (TestOutcome::Pass, None) => TestCaseStatus::success(),
        (TestOutcome::Fail, None) => {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
            s.set_type("fail").set_message(t.message.as_str());
            s
        }
        (TestOutcome::Skip, None) => {
            let mut s = TestCaseStatus::skipped();
            s.set_message(t.message.as_str());
            s
        }
        (TestOutcome::NotRun, None) => {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
            s.set_type("not_run").set_message(t.message.as_str());
            s
        }
    };
    if let TestCaseStatus::NonSuccess { message, .. } | TestCaseStatus::Skipped { message, .. } =
        &mut status
    {
        if message.as_ref().is_some_and(|m| m.as_str().is_empty()) {
            *message = None;
        }
    }
    let mut c = TestCase::new(t.name.as_str(), status);
    c.set_classname("veil").set_time(ms(t.time_ms));
    let out = violations_of(r, t);
    if !out.is_empty() {
        c.set_system_out(out);
    }
    c
}

/// The report as a JUnit document.
pub fn report(r: &RunReport) -> Report {
    let mut suite = TestSuite::new("veil");
    suite.set_time(ms(r.timing.suite_ms.unwrap_or(r.timing.run_ms)));
    suite.add_property(Property::new("stage2_backend", r.stage2_backend.as_str()));
    suite.add_property(Property::new("vcpus", r.vcpus.count.to_string()));
    suite.add_property(Property::new("ram_size", r.ram_size.to_string()));
    suite.add_property(Property::new("exit", r.exit.summary()));
    if let Some(rep) = &r.repeat {
        suite.add_property(Property::new("runs", rep.runs.to_string()));
    }
    suite.add_test_cases(r.tests.iter().map(|t| case(r, t)));
    let mut out = r.summary();
    if let Some(rep) = &r.repeat {
        out.push_str(&rep.lines());
    }
    suite.set_system_out(out);
    let mut doc = Report::new("veil run");
    doc.set_time(ms(r.timing.total_ms));
    doc.add_test_suite(suite);
    doc
}

/// The report as JUnit XML text.
pub fn to_xml(r: &RunReport) -> Result<String, quick_junit::SerializeError> {
    report(r).to_string()
}
