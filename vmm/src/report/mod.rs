//! What a run produced: test results, violations, counters, timing and how the VM stopped; the
//! table `veil run` prints and the JSON document `veil run --json` prints.

mod aggregate;
pub mod asi;
pub mod ci;
mod exit;
pub mod junit;
pub mod matrix;
mod render;
pub mod repeat;
pub mod stage2_checks;
mod symbolize;
mod violations;

pub use aggregate::{Aggregator, ViolationAggregate, ViolationSummary, MAX_AGGREGATES};
pub use exit::{
    symbol_suffix, vector_name, ExitInfo, InsnAccess, InsnAtRip, LivelockShape, RegsDump, GPR_NAMES,
};
pub use violations::{
    group_violations, AccessKind, NotRamAccess, Violation, ViolationAction, ViolationRun,
};

use serde::Serialize;

use crate::stage2::{LockStats, Stage2Counters};

/// Outcome of one test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TestOutcome {
    /// Guest said pass and the VMM agrees.
    Pass,
    /// Guest said fail, or the VMM disagrees with a pass.
    Fail,
    /// Guest skipped it.
    Skip,
    /// Selected but never started, or started and never ended.
    NotRun,
}

impl TestOutcome {
    /// Short name for the table.
    pub fn name(self) -> &'static str {
        match self {
            TestOutcome::Pass => "pass",
            TestOutcome::Fail => "FAIL",
            TestOutcome::Skip => "skip",
            TestOutcome::NotRun => "NOT RUN",
        }
    }
}

/// Result of one test.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TestReport {
    /// Test name.
    pub name: String,
    /// Whether it passed (guest said pass and the VMM's checks agree).
    pub passed: bool,
    /// Final outcome.
    pub result: TestOutcome,
    /// What the guest said, if it ended the test ("pass", "fail", "skip").
    pub guest_result: Option<&'static str>,
    /// The guest's message, plus the VMM's reasons when it overrides the guest.
    pub message: String,
    /// Violations recorded while the test ran.
    pub violations: u64,
    /// Violations the test declared with ExpectViolation.
    pub expected_violations: u64,
    /// Wall time from TestBegin to TestEnd.
    pub time_ms: f64,
}

/// The guest's round-trip measurement ([`veil_abi::Hc::ReportTiming`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundTrip {
    /// TSC cycles the guest measured for its bare exits (total).
    pub bare_cycles: u64,
    /// TSC cycles for its hypercalls (total).
    pub hypercall_cycles: u64,
    /// Iterations of each.
    pub iterations: u64,
    /// Cycles per bare exit.
    pub bare_cycles_per_exit: f64,
    /// Cycles per hypercall.
    pub hypercall_cycles_per_call: f64,
    /// Guest TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Nanoseconds per bare exit (if the TSC frequency is known).
    pub bare_ns: Option<f64>,
    /// Nanoseconds per hypercall (if the TSC frequency is known).
    pub hypercall_ns: Option<f64>,
    /// hypercall / bare (goal: at most 1.2).
    pub ratio: f64,
}

/// The revocation meter's figures ([`veil_abi::Hc::ReportRevocation`]): one revoke of a page
/// another vCPU is reading.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Revocation {
    /// Guest TSC cycles from the revoke call until it returned.
    pub revoke_cycles: u64,
    /// Guest TSC cycles from the revoke call until the reader's first violation was answered.
    pub first_violation_cycles: u64,
    /// The reader's successful reads.
    pub reads: u64,
    /// Successful reads after the reader saw the revoke return (the stale window: must be 0).
    pub stale_reads: u64,
    /// Microseconds from the call until it returned (if the TSC frequency is known).
    pub revoke_us: Option<f64>,
    /// Microseconds from the call until the reader's first violation (if known).
    pub first_violation_us: Option<f64>,
}

/// Exit counts by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    /// Every return from KVM_RUN.
    pub total: u64,
    /// Hypercalls.
    pub hypercalls: u64,
    /// Bare exits on [`veil_abi::BARE_PORT`].
    pub bare: u64,
    /// Serial and other port I/O.
    pub pio: u64,
    /// MMIO exits (violations and not-RAM accesses).
    pub mmio: u64,
    /// Stage-2 faults without an MMIO exit: `KVM_RUN` failing with `EFAULT` (a guest ring-3
    /// access under `mprotect` here), or `KVM_EXIT_MEMORY_FAULT`.
    pub memory_faults: u64,
}

/// Timing of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timing {
    /// From `main()` (`VmConfig::start`, or the library caller's instant) to the guest's first hypercall.
    pub first_hypercall_ms: Option<f64>,
    /// From `main()` to the first KVM_RUN.
    pub boot_ms: f64,
    /// From the first TestBegin to the last TestEnd.
    pub suite_ms: Option<f64>,
    /// From the first KVM_RUN until the VM stopped.
    pub run_ms: f64,
    /// From `main()` until the VM stopped.
    pub total_ms: f64,
    /// The guest's hypercall vs bare exit measurement, if it reported one.
    pub round_trip: Option<RoundTrip>,
    /// The guest's revocation meter, if it reported one (it needs two vCPUs).
    pub revocation: Option<Revocation>,
    /// Exit counts.
    pub exits: ExitCounts,
}

/// Tests by outcome (the summary line; a test that never ran is not a failure).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TestCounts {
    /// Passed.
    pub passed: usize,
    /// Failed.
    pub failed: usize,
    /// Skipped by the guest.
    pub skipped: usize,
    /// Selected but never run or never ended (a kill, an interrupt, a crash, an early exit).
    pub not_run: usize,
}

impl TestCounts {
    /// Counts `tests` by outcome (the report's counts, and the control socket's `stats`).
    pub fn of<'a>(tests: impl IntoIterator<Item = &'a TestReport>) -> TestCounts {
        let mut c = TestCounts::default();
        for t in tests {
            match t.result {
                TestOutcome::Pass => c.passed += 1,
                TestOutcome::Fail => c.failed += 1,
                TestOutcome::Skip => c.skipped += 1,
                TestOutcome::NotRun => c.not_run += 1,
            }
        }
        c
    }
}

/// Everything one run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The tests, in the order the guest announced them (selected ones only).
    pub tests: Vec<TestReport>,
    /// The tests by outcome.
    pub counts: TestCounts,
    /// Every test the guest announced.
    pub announced: Vec<String>,
    /// Every violation (one per KVM exit), oldest first (at most [`MAX_RECORDS`] kept).
    pub violations: Vec<Violation>,
    /// Violations past the [`MAX_RECORDS`] full records, grouped by (test, page, kind, RIP)
    /// with counts (at most [`MAX_AGGREGATES`] groups).
    pub violations_aggregated: Vec<ViolationAggregate>,
    /// How the violations were kept: full records, aggregated, counted only.
    pub violations_summary: ViolationSummary,
    /// Violations recorded, including any not kept.
    pub violations_total: u64,
    /// Violations outside any test.
    pub violations_outside_tests: u64,
    /// Accesses to GPAs that are not RAM (at most [`MAX_RECORDS`] kept).
    pub not_ram: Vec<NotRamAccess>,
    /// Not-RAM accesses recorded, including any not kept.
    pub not_ram_total: u64,
    /// The stage-2 backend that realised the view ("slots" or "mprotect").
    pub stage2_backend: String,
    /// Stage-2 engine counters.
    pub stage2: Stage2Counters,
    /// Whether the unmapped pages were locked against swap (`mlock`, within `RLIMIT_MEMLOCK`).
    pub memory_lock: LockStats,
    /// Bytes of unmapped RAM that were resident at the end and were overwritten with zeroes
    /// before being released (every unmapped page is released at the end of the run).
    pub wiped_bytes: u64,
    /// Whether guest RAM was left in core dumps (`--dump-guest-core`).
    pub guest_core_dump: bool,
    /// Allocator counters and free lists.
    pub allocator: allocator::Snapshot,
    /// Timing.
    pub timing: Timing,
    /// How the VM stopped.
    pub exit: ExitInfo,
    /// Dumps written (paths, or "-" for stdout).
    pub dumps: Vec<String>,
    /// Dumps that could not be written (path and reason): the run's output is incomplete.
    pub dump_errors: Vec<String>,
    /// Guest memory size.
    pub ram_size: u64,
    /// End of reserved memory.
    pub reserved_end: u64,
    /// The exit-time stage-2 dump as JSON (ranges, memslots, counters, KVM stats).
    pub stage2_dump: serde_json::Value,
    /// The reachability matrix: one cell per route the guest ran (empty if none).
    pub reachability: matrix::Matrix,
    /// Secret memory, reconciliation, sweeps and refused stage-2 updates.
    pub stage2_checks: stage2_checks::Stage2Checks,
    /// The vCPUs and the parks of their stage-2 updates.
    pub vcpus: VcpuSummary,
    /// ASI: transitions, view switches and the exposure windows.
    pub asi: asi::AsiReport,
    /// `veil run --repeat N` (N > 1): every timing figure as median/min/max over the runs and
    /// each test's outcome per run; the rest of the report is the last run's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat: Option<repeat::RepeatSummary>,
}

/// How many vCPUs ran and what parking them for stage-2 updates cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuSummary {
    /// vCPUs (`--vcpus`).
    pub count: u32,
    /// Parks and kicks of stage-2 updates ([`crate::shootdown`]).
    #[serde(flatten)]
    pub parks: crate::shootdown::ParkCounts,
    /// #VEs injected into the guest, all vCPUs (`--on-violation inject`).
    pub ve_injected: u64,
}

/// Most violations / not-RAM records kept in memory.
pub const MAX_RECORDS: usize = 100_000;

/// Process exit codes of `veil` (documented in `--help`).
pub mod exit_code {
    /// Every selected test passed (or `list-tests`/`caps` succeeded).
    pub const OK: i32 = 0;
    /// At least one test failed or did not run, or the guest exited non-zero.
    pub const TEST_FAILURE: i32 = 1;
    /// Bad command line or configuration: bad size, bad ELF, unknown test name, no /dev/kvm,
    /// an output file that cannot be written (also when a dump fails at exit after every test
    /// passed: the run's output is incomplete).
    pub const USAGE: i32 = 2;
    /// The guest crashed, was killed by `--on-violation kill`, or timed out.
    pub const CRASH: i32 = 3;
    /// SIGINT stopped the run (128 + 2); the report was still written.
    pub const SIGINT: i32 = 130;
    /// SIGTERM stopped the run (128 + 15).
    pub const SIGTERM: i32 = 143;
    /// SIGHUP stopped the run (128 + 1).
    pub const SIGHUP: i32 = 129;
}

impl RunReport {
    /// Counts the tests by outcome.
    pub fn counts(&self) -> TestCounts {
        TestCounts::of(&self.tests)
    }

    /// Whether every selected test passed (skips allowed) and the guest exited cleanly.
    pub fn all_passed(&self) -> bool {
        self.exit.is_clean()
            && self.violations_outside_tests == 0
            && self
                .tests
                .iter()
                .all(|t| matches!(t.result, TestOutcome::Pass | TestOutcome::Skip))
    }

    /// Whether a test was skipped (in any run, with `--repeat`).
    pub fn any_skipped(&self) -> bool {
        self.counts().skipped > 0
            || self.repeat.as_ref().is_some_and(|r| {
                r.tests
                    .iter()
                    .any(|t| t.results.contains(&TestOutcome::Skip))
            })
    }

    /// The exit code of `veil run`: [`RunReport::exit_code`], or with `--repeat` the worst
    /// run's and 1 for a flaky test ([`repeat::RepeatSummary::exit_code`]); with
    /// `fail_on_skip` (`--fail-on-skip`) a run that would exit 0 exits 1 when a test skipped.
    pub fn run_exit_code(&self, fail_on_skip: bool) -> i32 {
        let code = match &self.repeat {
            Some(r) => r.exit_code(),
            None => self.exit_code(),
        };
        if code == exit_code::OK && fail_on_skip && self.any_skipped() {
            exit_code::TEST_FAILURE
        } else {
            code
        }
    }

    /// The process exit code for this report (see [`exit_code`]).
    pub fn exit_code(&self) -> i32 {
        if let ExitInfo::Interrupted { signal, .. } = self.exit {
            crate::signals::exit_code(signal)
        } else if matches!(self.exit, ExitInfo::UnknownTests { .. }) {
            exit_code::USAGE
        } else if self.exit.is_crash() {
            exit_code::CRASH
        } else if !self.all_passed() || self.stage2_checks.failed() {
            exit_code::TEST_FAILURE
        } else if !self.dump_errors.is_empty() {
            exit_code::USAGE
        } else {
            exit_code::OK
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage2::Stage2Counters;

    #[test]
    fn exit_codes_follow_the_outcome() {
        let mut r = RunReport {
            asi: Default::default(),
            vcpus: VcpuSummary::default(),
            tests: vec![],
            counts: TestCounts::default(),
            guest_core_dump: false,
            announced: vec![],
            violations: vec![],
            violations_aggregated: vec![],
            violations_summary: ViolationSummary::default(),
            violations_total: 0,
            violations_outside_tests: 0,
            not_ram: vec![],
            not_ram_total: 0,
            stage2_backend: "slots".into(),
            stage2: Stage2Counters::default(),
            memory_lock: Default::default(),
            wiped_bytes: 0,
            allocator: allocator::Snapshot::default(),
            timing: Timing::default(),
            exit: ExitInfo::GuestExit { code: 0 },
            dumps: vec![],
            dump_errors: vec![],
            ram_size: 0,
            reserved_end: 0,
            stage2_dump: serde_json::Value::Null,
            reachability: matrix::Matrix::default(),
            stage2_checks: Default::default(),
            repeat: None,
        };
        assert_eq!(r.exit_code(), exit_code::OK);
        // A stage-2 reconciliation mismatch fails the run even when every test passed.
        r.stage2_checks.mismatches_total = 1;
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.stage2_checks.mismatches_total = 0;
        r.tests.push(TestReport {
            name: "a".into(),
            passed: false,
            result: TestOutcome::Skip,
            guest_result: Some("skip"),
            message: String::new(),
            violations: 0,
            expected_violations: 0,
            time_ms: 0.0,
        });
        assert_eq!(r.exit_code(), exit_code::OK);
        // --fail-on-skip turns a clean run with a skip into a failure, and nothing else.
        assert_eq!(r.run_exit_code(false), exit_code::OK);
        assert_eq!(r.run_exit_code(true), exit_code::TEST_FAILURE);
        // A dump lost at exit makes an otherwise clean run a failure to report.
        r.dump_errors.push("d.json: disk full".into());
        assert_eq!(r.exit_code(), exit_code::USAGE);
        r.tests[0].result = TestOutcome::NotRun;
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.dump_errors.clear();
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.tests[0].result = TestOutcome::Pass;
        r.violations_outside_tests = 1;
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.violations_outside_tests = 0;
        r.exit = ExitInfo::GuestExit { code: 3 };
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.exit = ExitInfo::KvmError { error: "x".into() };
        assert_eq!(r.exit_code(), exit_code::CRASH);
        r.exit = ExitInfo::UnknownTests {
            unknown: vec!["x".into()],
            available: vec![],
        };
        assert_eq!(r.exit_code(), exit_code::USAGE);
    }
}
