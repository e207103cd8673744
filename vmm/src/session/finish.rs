//! The end of a run: the last test, the exit dump, and the report.

use std::time::{Duration, Instant};

use veil_abi::BootMode;

use super::{vmm_line, Session};
use crate::memory::CoreDump;
use crate::report::{
    ExitCounts, ExitInfo, RunReport, TestOutcome, TestReport, Timing, VcpuSummary, MAX_RECORDS,
};
use crate::stage2::RangeState;

impl Session {
    /// Wipes every unmapped and sensitive range of guest RAM (resident pages overwritten with
    /// zeroes, then all released): called at the end of every run, whatever stopped it.
    /// Returns the bytes overwritten. The stage-2 layout is left as it is (the guest no longer
    /// runs).
    pub fn wipe_unmapped(&mut self) -> u64 {
        let mut wiped = 0;
        for r in self.engine(|e| e.ranges()) {
            if matches!(r.state, RangeState::Unmapped | RangeState::Sensitive) {
                match self.ram.wipe(r.start.0, r.end.0 - r.start.0) {
                    Ok(n) => wiped += n,
                    Err(e) => vmm_line(&format!(
                        "cannot wipe unmapped GPA {:#x}..{:#x}: {e}",
                        r.start, r.end
                    )),
                }
            }
        }
        wiped
    }

    /// Builds the report after the VM stopped with `exit`.
    pub fn finish(
        mut self,
        exit: ExitInfo,
        run_time: Duration,
        exits: ExitCounts,
        vcpus: VcpuSummary,
    ) -> RunReport {
        self.console.flush();
        if self.current.is_some() {
            let why = format!("test did not end: {}", exit.summary());
            // Interrupted from outside: the test did not get to finish, it did not fail.
            let outcome = match exit {
                ExitInfo::Interrupted { .. } => TestOutcome::NotRun,
                _ => TestOutcome::Fail,
            };
            self.end_current(outcome, None, why);
        }
        if let Some(cfg) = self.dump.clone() {
            self.write_dump("exit", super::exit_path(&cfg.target), true);
        }
        let selected: Vec<String> = if self.selection.is_empty() {
            self.announced.clone()
        } else {
            self.selection.clone()
        };
        let mut tests = Vec::new();
        if self.mode == BootMode::Run && !matches!(exit, ExitInfo::UnknownTests { .. }) {
            let mut order: Vec<String> = self
                .announced
                .iter()
                .filter(|n| selected.contains(n) || self.results.contains_key(*n))
                .cloned()
                .collect();
            for n in &self.ran_order {
                if !order.contains(n) {
                    order.push(n.clone());
                }
            }
            for n in &selected {
                if !order.contains(n) {
                    order.push(n.clone());
                }
            }
            for name in order {
                let r = self.results.remove(&name).unwrap_or(TestReport {
                    name: name.clone(),
                    passed: false,
                    result: TestOutcome::NotRun,
                    guest_result: None,
                    message: format!("selected but never run ({})", exit.summary()),
                    violations: 0,
                    expected_violations: 0,
                    time_ms: 0.0,
                });
                tests.push(r);
            }
        }
        let end = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let timing = Timing {
            first_hypercall_ms: self.first_hypercall.map(ms),
            boot_ms: self
                .run_start
                .map(|r| ms(r.saturating_duration_since(self.start)))
                .unwrap_or(0.0),
            suite_ms: match (self.suite_start, self.suite_end) {
                (Some(a), Some(b)) => Some(ms(b.saturating_duration_since(a))),
                _ => None,
            },
            run_ms: ms(run_time),
            total_ms: ms(end.saturating_duration_since(self.start)),
            round_trip: self.round_trip.clone(),
            revocation: self.revocation.clone(),
            exits,
        };
        let stage2_checks = self.stage2_finish();
        let asi = self.asi_report();
        let stage2_dump = self.dump_json();
        let memory_lock = self.engine(|e| e.backend().lock_stats());
        let wiped_bytes = self.wipe_unmapped();
        let kept = self.violations.len() as u64;
        let (violations_aggregated, violations_summary) =
            std::mem::take(&mut self.aggregated).finish(&self.ran_order, kept, MAX_RECORDS);
        let mut report = RunReport {
            vcpus,
            tests,
            counts: Default::default(),
            guest_core_dump: self.ram.core_dump() == CoreDump::Include,
            announced: self.announced.clone(),
            violations: std::mem::take(&mut self.violations),
            violations_aggregated,
            violations_summary,
            violations_total: self.violations_total,
            violations_outside_tests: self.violations_outside,
            not_ram: std::mem::take(&mut self.not_ram),
            not_ram_total: self.not_ram_total,
            stage2_backend: self.engine(|e| e.backend().name().into()),
            stage2: self.engine(|e| e.counters()),
            memory_lock,
            wiped_bytes,
            allocator: self.alloc.snapshot(),
            timing,
            exit,
            dumps: std::mem::take(&mut self.dumps),
            dump_errors: std::mem::take(&mut self.dump_errors),
            ram_size: self.ram.size(),
            reserved_end: self.reserved_end.raw(),
            stage2_dump,
            reachability: std::mem::take(&mut self.routes.matrix),
            stage2_checks,
            asi,
            repeat: None,
        };
        report.counts = report.counts();
        report
    }
}
