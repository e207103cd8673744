//! `veil run --repeat N`: the selection booted and run N times, each on a fresh VM; every
//! timing figure as median/min/max over the runs, and the verdicts compared (a test whose
//! outcome differs between runs is flaky and fails the run).

use std::fmt::Write as _;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::{RunReport, TestOutcome};

/// Most runs `--repeat` takes (as `veil replay --kvm --repeat`).
pub const MAX_REPEAT: u32 = 1000;

/// Median, least and largest of one figure, with how many runs had it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Least.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Runs that reported the figure.
    pub n: usize,
}

impl Spread {
    /// The spread of `v`; None if it is empty. NaNs sort last.
    pub fn of(v: &[f64]) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        })
    }
}

/// Named figures in a fixed order, serialised as a JSON object (name -> [`Spread`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures(pub Vec<(&'static str, Spread)>);

impl Serialize for Figures {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Figures {
    /// The spread of `name`, if any run had it.
    pub fn get(&self, name: &str) -> Option<&Spread> {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// One test over the runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TestRepeat {
    /// Test name.
    pub name: String,
    /// Its outcome in each run, in order (`not_run` where a run did not list it).
    pub results: Vec<TestOutcome>,
    /// Whether the outcomes differ.
    pub flaky: bool,
    /// Its wall time (`time_ms`) over the runs that ran it.
    pub time_ms: Option<Spread>,
}

/// What `--repeat N` adds to the report (`repeat` in JSON): the report itself is the last
/// run's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RepeatSummary {
    /// Runs asked for.
    pub requested: u32,
    /// Runs made (fewer when a signal stopped the repeats).
    pub runs: u32,
    /// Each timing figure (`timing` of the report): median, min, max and n.
    pub timing: Figures,
    /// Each test's outcome per run and time.
    pub tests: Vec<TestRepeat>,
    /// Tests whose outcomes differ between runs: they fail the run.
    pub flaky: Vec<String>,
    /// Each run's exit code, in order.
    pub exit_codes: Vec<i32>,
}

/// The timing figures of one report, by name (None: that run did not report it).
fn figures(r: &RunReport) -> Vec<(&'static str, Option<f64>)> {
    let t = &r.timing;
    let rt = t.round_trip.as_ref();
    let rv = t.revocation.as_ref();
    vec![
        ("first_hypercall_ms", t.first_hypercall_ms),
        ("boot_ms", Some(t.boot_ms)),
        ("suite_ms", t.suite_ms),
        ("run_ms", Some(t.run_ms)),
        ("total_ms", Some(t.total_ms)),
        (
            "round_trip.hypercall_cycles_per_call",
            rt.map(|x| x.hypercall_cycles_per_call),
        ),
        (
            "round_trip.bare_cycles_per_exit",
            rt.map(|x| x.bare_cycles_per_exit),
        ),
        ("round_trip.hypercall_ns", rt.and_then(|x| x.hypercall_ns)),
        ("round_trip.bare_ns", rt.and_then(|x| x.bare_ns)),
        ("round_trip.ratio", rt.map(|x| x.ratio)),
        ("revocation.revoke_us", rv.and_then(|x| x.revoke_us)),
        (
            "revocation.first_violation_us",
            rv.and_then(|x| x.first_violation_us),
        ),
        (
            "revocation.revoke_cycles",
            rv.map(|x| x.revoke_cycles as f64),
        ),
        (
            "revocation.first_violation_cycles",
            rv.map(|x| x.first_violation_cycles as f64),
        ),
        ("exits.total", Some(t.exits.total as f64)),
        ("exits.hypercalls", Some(t.exits.hypercalls as f64)),
        ("exits.mmio", Some(t.exits.mmio as f64)),
    ]
}

impl RepeatSummary {
    /// The summary of `runs` (oldest first, at least one) of `requested`.
    pub fn of(runs: &[RunReport], requested: u32) -> RepeatSummary {
        // A run a signal cut short (only ever the last) says nothing of the tests it did not
        // reach, and its times are partial: it counts for neither when a complete run exists.
        let complete: Vec<bool> = runs
            .iter()
            .map(|r| !matches!(r.exit, super::ExitInfo::Interrupted { .. }))
            .collect();
        let timed: Vec<&RunReport> = if complete.contains(&true) {
            runs.iter()
                .zip(&complete)
                .filter(|(_, c)| **c)
                .map(|(r, _)| r)
                .collect()
        } else {
            runs.iter().collect()
        };
        let mut timing = Vec::new();
        if let Some(first) = timed.first() {
            for (i, (name, _)) in figures(first).into_iter().enumerate() {
                let vals: Vec<f64> = timed.iter().filter_map(|r| figures(r)[i].1).collect();
                if let Some(s) = Spread::of(&vals) {
                    timing.push((name, s));
                }
            }
        }
        let mut names: Vec<String> = Vec::new();
        for r in runs {
            for t in &r.tests {
                if !names.contains(&t.name) {
                    names.push(t.name.clone());
                }
            }
        }
        let tests: Vec<TestRepeat> = names
            .into_iter()
            .map(|name| {
                let per: Vec<Option<&super::TestReport>> = runs
                    .iter()
                    .map(|r| r.tests.iter().find(|t| t.name == name))
                    .collect();
                let results: Vec<TestOutcome> = per
                    .iter()
                    .map(|t| t.map_or(TestOutcome::NotRun, |t| t.result))
                    .collect();
                let times: Vec<f64> = per
                    .iter()
                    .flatten()
                    .filter(|t| t.result != TestOutcome::NotRun)
                    .map(|t| t.time_ms)
                    .collect();
                TestRepeat {
                    flaky: flaky(&results, &complete),
                    name,
                    results,
                    time_ms: Spread::of(&times),
                }
            })
            .collect();
        RepeatSummary {
            requested,
            runs: runs.len() as u32,
            timing: Figures(timing),
            flaky: tests
                .iter()
                .filter(|t| t.flaky)
                .map(|t| t.name.clone())
                .collect(),
            tests,
            exit_codes: runs.iter().map(|r| r.exit_code()).collect(),
        }
    }

    /// The run's exit code: a signal's if a run was interrupted, else the worst run's (3
    /// crash, 2 usage, 1 failure, 0), and at least 1 when a test is flaky.
    pub fn exit_code(&self) -> i32 {
        use super::exit_code::{SIGHUP, SIGINT, SIGTERM, TEST_FAILURE};
        if let Some(&sig) = self
            .exit_codes
            .iter()
            .find(|c| matches!(**c, SIGINT | SIGTERM | SIGHUP))
        {
            return sig;
        }
        let worst = self.exit_codes.iter().copied().max().unwrap_or(0);
        if self.flaky.is_empty() {
            worst
        } else {
            worst.max(TEST_FAILURE)
        }
    }

    /// The text lines after the report: runs, flaky tests, then one line per figure.
    pub fn lines(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "repeat: {} of {} runs; {}",
            self.runs,
            self.requested,
            if self.flaky.is_empty() {
                "verdicts agree in every run".to_string()
            } else {
                format!(
                    "FLAKY (outcome differs between runs): {}",
                    self.flaky.join(", ")
                )
            }
        );
        for t in self.tests.iter().filter(|t| t.flaky) {
            let r: Vec<&str> = t.results.iter().map(|o| o.name()).collect();
            let _ = writeln!(s, "  {}: {}", t.name, r.join(", "));
        }
        let _ = writeln!(
            s,
            "  {:<38} {:>12} {:>12} {:>12} {:>4}",
            "timing figure", "median", "min", "max", "n"
        );
        for (name, v) in &self.timing.0 {
            let _ = writeln!(
                s,
                "  {name:<38} {:>12.3} {:>12.3} {:>12.3} {:>4}",
                v.median, v.min, v.max, v.n
            );
        }
        for t in &self.tests {
            if let Some(v) = &t.time_ms {
                let name = format!("{} time_ms", t.name);
                let _ = writeln!(
                    s,
                    "  {name:<38} {:>12.3} {:>12.3} {:>12.3} {:>4}",
                    v.median, v.min, v.max, v.n
                );
            }
        }
        s
    }
}

/// Runs `one` `n` times (at least once; fewer when a signal was received), giving it the run's
/// Whether a test's outcomes (one per run, `complete[i]`: run i was not cut short by a
/// signal) disagree; an interrupted run's `NotRun` is no verdict.
fn flaky(results: &[TestOutcome], complete: &[bool]) -> bool {
    let mut verdicts = results
        .iter()
        .zip(complete)
        .filter(|(r, c)| **c || **r != TestOutcome::NotRun)
        .map(|(r, _)| r);
    let first = verdicts.next();
    verdicts.any(|r| Some(r) != first)
}

/// index; returns every report, oldest first, or the first error.
pub fn repeat<E>(
    n: u32,
    mut one: impl FnMut(u32) -> Result<RunReport, E>,
) -> Result<Vec<RunReport>, E> {
    let mut runs = Vec::new();
    for i in 0..n.max(1) {
        if i > 0 && crate::signals::pending().is_some() {
            break;
        }
        let r = one(i)?;
        let stop = matches!(r.exit, super::ExitInfo::Interrupted { .. });
        runs.push(r);
        if stop {
            break;
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_median_min_max() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 2));
    }

    fn summary(codes: Vec<i32>, flaky: &[&str]) -> RepeatSummary {
        RepeatSummary {
            requested: codes.len() as u32,
            runs: codes.len() as u32,
            timing: Figures::default(),
            tests: vec![],
            flaky: flaky.iter().map(|s| s.to_string()).collect(),
            exit_codes: codes,
        }
    }

    #[test]
    fn an_interrupted_run_makes_no_test_flaky_by_not_running_it() {
        use TestOutcome::{Fail, NotRun, Pass};
        // Passed, then not reached by a run a signal stopped: not flaky.
        assert!(!flaky(&[Pass, Pass, NotRun], &[true, true, false]));
        // ... but failing in that run before the signal is a different verdict.
        assert!(flaky(&[Pass, Fail], &[true, false]));
        // A complete run that did not run a test another ran is a difference.
        assert!(flaky(&[Pass, NotRun], &[true, true]));
        assert!(flaky(&[Pass, Fail, Pass], &[true; 3]));
        assert!(!flaky(&[Pass], &[true]));
        assert!(!flaky(&[NotRun], &[false]));
    }

    #[test]
    fn the_worst_run_and_flakiness_decide_the_exit_code() {
        assert_eq!(summary(vec![0, 0], &[]).exit_code(), 0);
        assert_eq!(summary(vec![0, 0], &["a"]).exit_code(), 1);
        assert_eq!(summary(vec![0, 3], &["a"]).exit_code(), 3);
        assert_eq!(summary(vec![1, 2], &[]).exit_code(), 2);
        assert_eq!(summary(vec![3, 130], &[]).exit_code(), 130);
    }
}
