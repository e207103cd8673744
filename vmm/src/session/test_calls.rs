//! Hypercalls that drive the suite: log lines, test announce/begin/end with the VMM's own
//! verdict, violation expectations and queries, and the timing report.

use std::time::Instant;

use veil_abi::{BootMode, Status, TestResult, ViolationRecord};
use vm_memory::ByteValued;

use super::{vmm_line, Current, HcOut, Session, MAX_LOGS, MAX_QUERY};
use crate::addr::Gpa;
use crate::expect::{self, Expectation, Tally, MAX_EXPECTATIONS};
use crate::report::{AccessKind, ExitInfo, Revocation, RoundTrip, TestOutcome, TestReport};

impl Session {
    pub(super) fn hc_log(&mut self, ptr: Gpa, len: u64) -> Result<u64, Status> {
        let text = self.read_text(ptr, len)?;
        if self.echo_logs {
            vmm_line(&format!("guest: {text}"));
        }
        if self.logs.len() < MAX_LOGS {
            self.logs.push(text);
        }
        Ok(0)
    }

    pub(super) fn hc_announce(&mut self, ptr: Gpa, len: u64) -> Result<u64, Status> {
        let name = self.read_name(ptr, len)?;
        if self.announced.contains(&name) || self.announced.len() >= 4096 {
            return Err(Status::BadArgument);
        }
        self.announced.push(name);
        Ok(0)
    }

    /// In run mode, the first TestBegin or Exit checks `--tests` against the announced names.
    pub(super) fn check_selection(&mut self) -> Option<ExitInfo> {
        if self.selection_checked || self.mode != BootMode::Run {
            return None;
        }
        self.selection_checked = true;
        let unknown: Vec<String> = self
            .selection
            .iter()
            .filter(|s| !self.announced.contains(s))
            .cloned()
            .collect();
        if unknown.is_empty() {
            None
        } else {
            Some(ExitInfo::UnknownTests {
                unknown,
                available: self.announced.clone(),
            })
        }
    }

    pub(super) fn hc_test_begin(&mut self, ptr: Gpa, len: u64) -> HcOut {
        if let Some(stop) = self.check_selection() {
            return HcOut::stop(stop);
        }
        let name = match self.read_name(ptr, len) {
            Ok(n) => n,
            Err(s) => return HcOut::err(s),
        };
        if self.current.is_some() || self.results.contains_key(&name) {
            return HcOut::err(Status::BadState);
        }
        if !self.announced.contains(&name) {
            return HcOut::err(Status::BadArgument);
        }
        let now = Instant::now();
        self.suite_start.get_or_insert(now);
        self.cpu.recovery = None;
        self.ran_order.push(name.clone());
        self.current = Some(Current {
            name,
            start: now,
            expectations: Vec::new(),
            tally: Tally::new(),
            violations: 0,
            first_record: self.violations.len(),
            host: Default::default(),
            asi: Default::default(),
        });
        HcOut::ok(0)
    }

    pub(super) fn hc_test_end(&mut self, result: u64, ptr: Gpa, len: u64) -> Result<u64, Status> {
        let guest = match result {
            0 => TestResult::Pass,
            1 => TestResult::Fail,
            2 => TestResult::Skip,
            _ => return Err(Status::BadArgument),
        };
        let msg = self.read_text(ptr, len)?;
        if self.current.is_none() {
            return Err(Status::BadState);
        }
        let (outcome, guest_name) = match guest {
            TestResult::Pass => (TestOutcome::Pass, "pass"),
            TestResult::Fail => (TestOutcome::Fail, "fail"),
            TestResult::Skip => (TestOutcome::Skip, "skip"),
        };
        self.end_current(outcome, Some(guest_name), msg);
        Ok(0)
    }

    /// Ends the running test with the guest's verdict, overridden by the VMM's checks.
    pub(super) fn end_current(
        &mut self,
        outcome: TestOutcome,
        guest: Option<&'static str>,
        msg: String,
    ) {
        if self.current.is_none() {
            return;
        }
        let stage2 = self.stage2_test_end();
        let Some(c) = self.current.take() else {
            return;
        };
        let now = Instant::now();
        self.suite_end = Some(now);
        self.cpu.recovery = None;
        let mut outcome = outcome;
        let mut message = msg;
        if outcome != TestOutcome::Skip {
            let problems: Vec<String> = [
                expect::check(&c.expectations, &c.tally),
                c.host.check(),
                c.asi.check(),
            ]
            .into_iter()
            .filter_map(Result::err)
            .chain(stage2)
            .collect();
            if !problems.is_empty() {
                let why = problems.join("; ");
                if outcome == TestOutcome::Pass {
                    outcome = TestOutcome::Fail;
                }
                if !message.is_empty() {
                    message.push_str("; ");
                }
                message.push_str("VMM: ");
                message.push_str(&why);
            }
        }
        if let Some(why) = self.route_verdict(&c.name, outcome == TestOutcome::NotRun) {
            // A leak or an unrecorded route fails the test even if the guest skipped it.
            outcome = TestOutcome::Fail;
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str("VMM: ");
            message.push_str(&why);
        }
        let expected = c.expectations.iter().map(|e| e.count).sum();
        self.results.insert(
            c.name.clone(),
            TestReport {
                name: c.name,
                passed: outcome == TestOutcome::Pass,
                result: outcome,
                guest_result: guest,
                message,
                violations: c.violations,
                expected_violations: expected,
                time_ms: (now - c.start).as_secs_f64() * 1e3,
            },
        );
    }

    pub(super) fn hc_expect(&mut self, gpa: Gpa, access: u64, count: u64) -> Result<u64, Status> {
        let access = AccessKind::from_u64(access).ok_or(Status::BadArgument)?;
        if gpa.raw() >= self.ram.size()
            && gpa.raw() != veil_abi::ADDRESS_UNKNOWN
            && !self.in_mermap(gpa)
        {
            return Err(Status::BadAddress);
        }
        if count > 1 << 24 {
            return Err(Status::BadArgument);
        }
        let c = self.current.as_mut().ok_or(Status::BadState)?;
        if c.expectations.len() >= MAX_EXPECTATIONS {
            return Err(Status::BadArgument);
        }
        c.expectations.push(Expectation {
            page: gpa.page_start().raw(),
            access,
            count,
        });
        Ok(0)
    }

    pub(super) fn hc_query(&mut self, ptr: Gpa, max: u64) -> Result<u64, Status> {
        if max > MAX_QUERY {
            return Err(Status::BadArgument);
        }
        let size = std::mem::size_of::<ViolationRecord>() as u64;
        self.check_out_buf(ptr, max * size)?;
        let (count, first) = match &self.current {
            Some(c) => (c.violations, c.first_record),
            None => (self.violations_total, 0),
        };
        let kept = &self.violations[first.min(self.violations.len())..];
        let take = kept.len().min(max as usize);
        let mut bytes = Vec::with_capacity(take * size as usize);
        for v in &kept[kept.len() - take..] {
            bytes.extend_from_slice(RecordBytes(v.record()).as_slice());
        }
        self.write_buf(ptr, &bytes)?;
        Ok(count)
    }

    pub(super) fn hc_timing(&mut self, bare: u64, hc: u64, iters: u64) -> Result<u64, Status> {
        if iters == 0 || bare == 0 {
            return Err(Status::BadArgument);
        }
        let per_bare = bare as f64 / iters as f64;
        let per_hc = hc as f64 / iters as f64;
        let ns = |c: f64| self.tsc_khz.map(|k| c * 1e6 / f64::from(k.max(1)));
        self.round_trip = Some(RoundTrip {
            bare_cycles: bare,
            hypercall_cycles: hc,
            iterations: iters,
            bare_cycles_per_exit: per_bare,
            hypercall_cycles_per_call: per_hc,
            tsc_khz: self.tsc_khz,
            bare_ns: ns(per_bare),
            hypercall_ns: ns(per_hc),
            ratio: hc as f64 / bare as f64,
        });
        Ok(0)
    }

    /// `Hc::ReportRevocation`: keeps the revocation meter's figures for the report.
    pub(super) fn hc_revocation(
        &mut self,
        revoke: u64,
        first_violation: u64,
        reads: u64,
        stale: u64,
    ) -> Result<u64, Status> {
        if stale > reads {
            return Err(Status::BadArgument);
        }
        let us = |c: u64| self.tsc_khz.map(|k| c as f64 * 1e3 / f64::from(k.max(1)));
        self.revocation = Some(Revocation {
            revoke_cycles: revoke,
            first_violation_cycles: first_violation,
            reads,
            stale_reads: stale,
            revoke_us: us(revoke),
            first_violation_us: us(first_violation),
        });
        Ok(0)
    }
}

/// A [`ViolationRecord`] as plain bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct RecordBytes(ViolationRecord);
// SAFETY: ViolationRecord is repr(C) with u64, u64, u32, u8, u8, u16: 24 bytes, no padding.
unsafe impl ByteValued for RecordBytes {}

const _: () = assert!(std::mem::size_of::<ViolationRecord>() == 24);
