//! Stage-2 checks during a run: reconciliation of the realised state against the engine's
//! (after every hypercall that changed stage 2 under `--verify-stage2`, at every test's end,
//! at the run's end, on `Hc::VerifyStage2`), the test-harness tamper hook, sweeps, and the
//! record of refused stage-2 updates.
//!
//! Nothing here gives the guest more than a status: a sweep's verdict goes into the test's
//! result, never back to the guest, so no page's contents (or even which free pages are
//! unreachable) reach it by this route.

use std::collections::BTreeSet;

use veil_abi::{Status, PAGE_SIZE};

use super::Session;
use crate::addr::Gpa;
use crate::report::stage2_checks::{Stage2Checks, SweepResult, MAX_KEPT};
use crate::report::AccessKind;
use crate::stage2::{verify, Perm, RangeState};

/// Pages named in a sweep's failure message.
const NAMED: usize = 8;

/// The stage-2 check state of one run.
#[derive(Default)]
pub(super) struct Checks {
    report: Stage2Checks,
    /// The engine's work counters at the last look (a change means stage 2 was updated).
    last_work: u64,
    /// Refused updates at the last look.
    last_refused: u64,
    sweep: Option<OpenSweep>,
    tamper: Option<Tamper>,
    /// Why the running test fails on the stage-2 side.
    problems: Vec<String>,
}

struct OpenSweep {
    /// Managed pages whose loads were violations.
    pages: BTreeSet<u64>,
}

struct Tamper {
    page: Gpa,
    intended: Perm,
}

impl Checks {
    /// Checks for a run: `verify` after every update (`--verify-stage2`), `secret` when the
    /// backend backs unmapped pages with secret memory.
    pub(super) fn new(verify: bool, secret: bool) -> Checks {
        Checks {
            report: Stage2Checks {
                verify_stage2: verify,
                host_secretmem: secret,
                ..Stage2Checks::default()
            },
            ..Checks::default()
        }
    }

    /// Whether a sweep is open: its loads are judged by the sweep, not by `ExpectViolation`.
    pub(super) fn sweep_open(&self) -> bool {
        self.sweep.is_some()
    }

    /// Notes a violation for an open sweep; true when the sweep takes it.
    pub(super) fn sweep_note(&mut self, gpa: u64, access: AccessKind) -> bool {
        match &mut self.sweep {
            Some(s) => {
                if access == AccessKind::Read {
                    s.pages.insert(gpa & !(PAGE_SIZE - 1));
                }
                true
            }
            None => false,
        }
    }
}

/// Why a sweep of `managed` bytes of guest RAM cannot be backed by a host with `available`
/// bytes free (more than 90 % of it), if so. Loading a never-written page of guest RAM makes
/// the host back it (a memfd allocates on a read fault, too).
fn sweep_exceeds_host(managed: u64, available: Option<u64>) -> Option<String> {
    let available = available?;
    (managed > available / 10 * 9).then(|| {
        format!(
            "the sweep would load every one of the {} MiB of managed guest RAM, which the host must then back, and it has {} MiB available: refused (the test is skipped); run it with a smaller --mem",
            managed >> 20,
            available >> 20
        )
    })
}

impl Session {
    /// After every hypercall: a refused stage-2 update is recorded; under `--verify-stage2` a
    /// change of stage 2 is reconciled at once.
    pub(super) fn after_hypercall(&mut self) {
        let c = self.engine(|e| e.counters());
        let work = c.unmap_calls
            + c.map_calls
            + c.protect_calls
            + c.rejected_updates
            + c.memslot_updates
            + c.mprotect_calls;
        if work == self.checks.last_work {
            return;
        }
        self.checks.last_work = work;
        if c.rejected_updates > self.checks.last_refused {
            let r = &mut self.checks.report;
            r.refused_updates_total += c.rejected_updates - self.checks.last_refused;
            self.checks.last_refused = c.rejected_updates;
            let last = self
                .alloc
                .with_stage2(|e| e.last_error().map(|e| e.to_string()));
            let r = &mut self.checks.report;
            if let Some(e) = last {
                if r.refused_updates.len() < MAX_KEPT {
                    r.refused_updates.push(e);
                }
            }
        }
        if self.checks.report.verify_stage2 {
            self.reconcile_now();
        }
    }

    /// Reconciles now; true when the realised state is what the engine intends (a tampered
    /// page that is caught is put back and does not count against it).
    pub(super) fn reconcile_now(&mut self) -> bool {
        self.checks.report.reconciliations += 1;
        let t = std::time::Instant::now();
        let result = self.engine(verify::reconcile);
        self.checks.report.reconcile_ms += t.elapsed().as_secs_f64() * 1e3;
        let found = match result {
            Ok(m) => m,
            Err(e) => {
                let why = format!("stage-2 reconciliation could not run: {e}");
                if !self.checks.report.reconcile_errors.contains(&why)
                    && self.checks.report.reconcile_errors.len() < MAX_KEPT
                {
                    self.checks.report.reconcile_errors.push(why.clone());
                }
                if self.current.is_some() {
                    self.checks.problems.push(why);
                }
                return false;
            }
        };
        let mut ok = true;
        for m in found {
            let tampered = self
                .checks
                .tamper
                .as_ref()
                .is_some_and(|t| m.start == t.page && m.end.0 == t.page.0 + PAGE_SIZE);
            if tampered {
                let page = m.start;
                if let Err(e) = self.alloc.stage2_mut().backend_mut().untamper(page) {
                    self.checks
                        .problems
                        .push(format!("cannot undo the tamper of {:#x}: {e}", page.0));
                }
                self.checks.tamper = None;
                self.checks.report.tampers_caught.push(m);
                continue;
            }
            ok = false;
            let r = &mut self.checks.report;
            if r.mismatches.contains(&m) {
                continue;
            }
            r.mismatches_total += 1;
            let why = format!("stage-2 reconciliation: {m}");
            super::vmm_line(&why);
            if r.mismatches.len() < MAX_KEPT {
                r.mismatches.push(m);
            }
            if self.current.is_some() {
                self.checks.problems.push(why);
            }
        }
        ok
    }

    /// `Hc::VerifyStage2`.
    pub(super) fn hc_verify_stage2(&mut self) -> Result<u64, Status> {
        if self.reconcile_now() {
            Ok(0)
        } else {
            Err(Status::InvariantBroken)
        }
    }

    /// `Hc::Stage2Tamper`: closes a mapped page the guest owns behind the engine's back.
    pub(super) fn hc_stage2_tamper(&mut self, page: Gpa) -> Result<u64, Status> {
        if !self.test_harness {
            return Err(Status::HarnessOnly);
        }
        if self.current.is_none() || self.checks.tamper.is_some() {
            return Err(Status::BadState);
        }
        if !page.is_page_aligned() {
            return Err(Status::Misaligned);
        }
        self.check_owned(page, PAGE_SIZE)?;
        let (state, intended) =
            self.engine(|e| (e.state_at(page), e.view().perm(RangeState::Mapped)));
        if state != Some(RangeState::Mapped) {
            return Err(Status::BadState);
        }
        // Only ever closes a page (mapped -> none): the hook cannot open anything.
        match self.alloc.stage2_mut().backend_mut().tamper(page) {
            Ok(Perm::None) => {
                self.checks.tamper = Some(Tamper { page, intended });
                Ok(0)
            }
            Ok(_) => {
                let _ = self.alloc.stage2_mut().backend_mut().untamper(page);
                Err(Status::BadState)
            }
            Err(_) => Err(Status::BadState),
        }
    }

    /// `Hc::Sweep(op, pages)`.
    pub(super) fn hc_sweep(&mut self, op: u64, pages: u64) -> Result<u64, Status> {
        let Some(test) = self.current_name() else {
            return Err(Status::BadState);
        };
        match op {
            0 if self.checks.sweep.is_none() => {
                let managed = self.ram.size().saturating_sub(self.reserved_end.0);
                if let Some(why) = sweep_exceeds_host(managed, crate::caps::mem_available()) {
                    // Loading every page would make the host back all of guest RAM; past
                    // what it has, the OOM killer would end the run and lose its report.
                    super::vmm_line(&format!("warning: {test}: {why}"));
                    return Err(Status::NoMemory);
                }
                self.checks.sweep = Some(OpenSweep {
                    pages: BTreeSet::new(),
                });
                Ok(0)
            }
            1 => {
                let s = self.checks.sweep.take().ok_or(Status::BadState)?;
                let result = self.judge_sweep(test, pages, &s.pages);
                // An informational line: off with the guest's log lines (`veil run --quiet`).
                if self.echo_logs {
                    super::vmm_line(&format!(
                    "sweep on {}: {} managed pages, {} unreachable, {} violations, {} missing, {} extra",
                    self.engine(|e| e.backend().name()),
                    result.managed_pages,
                    result.unreachable_pages,
                    result.violation_pages,
                    result.missing_total,
                    result.extra_total
                    ));
                }
                if let Some(why) = result.problem() {
                    self.checks.problems.push(why);
                }
                if self.checks.report.sweeps.len() < MAX_KEPT {
                    self.checks.report.sweeps.push(result);
                }
                Ok(0)
            }
            0 => Err(Status::BadState),
            _ => Err(Status::BadArgument),
        }
    }

    fn judge_sweep(&self, test: String, loaded: u64, hit: &BTreeSet<u64>) -> SweepResult {
        let (start, end) = (self.reserved_end, Gpa(self.ram.size()));
        let (view, ranges) = self.engine(|e| (e.view(), e.ranges_in(start, end)));
        let mut r = SweepResult {
            test,
            pages_loaded: loaded,
            managed_pages: (end.0 - start.0) / PAGE_SIZE,
            violation_pages: hit.len() as u64,
            ..SweepResult::default()
        };
        let mut matched = 0;
        for range in ranges {
            if view.perm(range.state).readable() {
                continue;
            }
            let n = range.pages();
            r.unreachable_pages += n;
            let present = hit.range(range.start.0..range.end.0).count() as u64;
            matched += present;
            r.missing_total += n - present;
            let mut g = range.start.0;
            while present < n && r.missing.len() < NAMED && g < range.end.0 {
                if !hit.contains(&g) {
                    r.missing.push(Gpa(g));
                }
                g += PAGE_SIZE;
            }
        }
        r.extra_total = r.violation_pages - matched;
        r.extra = hit
            .iter()
            .filter(|&&g| {
                self.state_at(Gpa(g))
                    .is_none_or(|s| view.perm(s).readable())
            })
            .take(NAMED)
            .map(|&g| Gpa(g))
            .collect();
        r
    }

    /// At the end of every test: reconcile, then why the test fails on the stage-2 side (a
    /// mismatch found while it ran, a tamper not caught, a sweep left open), if it does.
    pub(super) fn stage2_test_end(&mut self) -> Option<String> {
        self.reconcile_now();
        if let Some(t) = self.checks.tamper.take() {
            let _ = self.alloc.stage2_mut().backend_mut().untamper(t.page);
            self.checks.problems.push(format!(
                "reconciliation did not catch page {:#x} tampered from {:?}",
                t.page.0, t.intended
            ));
        }
        if self.checks.sweep.take().is_some() {
            self.checks
                .problems
                .push("sweep begun but never ended".into());
        }
        let p = std::mem::take(&mut self.checks.problems);
        (!p.is_empty()).then(|| p.join("; "))
    }

    /// The stage-2 checks for the report, after a last reconciliation.
    pub(super) fn stage2_finish(&mut self) -> Stage2Checks {
        self.after_hypercall();
        self.reconcile_now();
        std::mem::take(&mut self.checks.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_beyond_the_host_memory_is_refused_with_the_figures() {
        let g = 1u64 << 30;
        assert_eq!(
            sweep_exceeds_host(64 * g, None),
            None,
            "unknown: not refused"
        );
        assert_eq!(sweep_exceeds_host(g, Some(24 * g)), None);
        assert_eq!(
            sweep_exceeds_host(9 * g, Some(10 * g)),
            None,
            "90 % is the limit"
        );
        let why = sweep_exceeds_host(64 * g, Some(24 * g)).expect("refused");
        assert!(
            why.contains("65536 MiB") && why.contains("24576 MiB"),
            "{why}"
        );
    }
    use crate::console::ConsoleSink;
    use crate::memory::MemSize;
    use crate::stage2::{BackendKind, HostBacking};
    use crate::vm::{Vm, VmConfig};

    /// A page changed behind the engine with no `Hc::Stage2Tamper` to expect it: reconciliation
    /// reports the range and both states, and the run's checks fail, on both backends.
    #[test]
    fn an_unexpected_mismatch_is_reported_with_both_states_and_fails_the_run() {
        if crate::stage2::tests::kvm_or_skip("an_unexpected_mismatch_is_reported").is_none() {
            return;
        }
        for kind in [BackendKind::Slots, BackendKind::Mprotect] {
            let mut cfg = VmConfig::new(crate::guest_image::DEFAULT_GUEST.to_vec());
            cfg.mem = MemSize(32 << 20);
            cfg.console = ConsoleSink::Null;
            cfg.echo_logs = false;
            cfg.stage2 = kind;
            let mut vm = Vm::new(cfg).expect("boot");
            let s = vm.session_mut();
            assert!(s.reconcile_now(), "{kind:?}: a fresh VM reconciles");
            let page = Gpa(s.reserved_end.raw() + 16 * PAGE_SIZE);
            let now = s.alloc.stage2_mut().backend_mut().tamper(page).unwrap();
            assert_eq!(now, Perm::None);
            assert!(!s.reconcile_now(), "{kind:?}: the closed page is found");
            // Found again later: one mismatch, not one per reconciliation.
            assert!(!s.reconcile_now());
            let c = s.stage2_finish();
            assert!(c.failed());
            assert_eq!(c.mismatches_total, 1);
            let m = &c.mismatches[0];
            assert_eq!((m.start, m.end.0), (page, page.0 + PAGE_SIZE), "{kind:?}");
            assert_eq!(m.state, RangeState::Mapped);
            assert_eq!(
                (m.intended_perm, m.realised_perm),
                (Perm::ReadWrite, Perm::None)
            );
            assert_eq!(m.intended_backing, HostBacking::Memory);
            assert!(c.tampers_caught.is_empty());
        }
    }

    /// The sweep's judge: an unreachable block nobody loaded is "missing", a violation on a
    /// reachable page "extra", and only the exact set passes.
    #[test]
    fn the_sweep_judge_names_missing_and_extra_pages() {
        if crate::stage2::tests::kvm_or_skip("the_sweep_judge_names_missing_and_extra_pages")
            .is_none()
        {
            return;
        }
        let mut cfg = VmConfig::new(crate::guest_image::DEFAULT_GUEST.to_vec());
        cfg.mem = MemSize(32 << 20);
        cfg.console = ConsoleSink::Null;
        cfg.echo_logs = false;
        let mut vm = Vm::new(cfg).expect("boot");
        let s = vm.session_mut();
        let managed = (s.ram.size() - s.reserved_end.raw()) / PAGE_SIZE;
        let block = Gpa(s.reserved_end.raw() + (2 << 20));
        s.alloc.stage2_mut().unmap_range(block, 2 << 20).unwrap();
        let all: BTreeSet<u64> = (0..512).map(|i| block.0 + i * PAGE_SIZE).collect();
        let exact = s.judge_sweep("t".into(), managed, &all);
        assert_eq!((exact.unreachable_pages, exact.violation_pages), (512, 512));
        assert_eq!(exact.problem(), None);

        let mut wrong = all.clone();
        wrong.remove(&(block.0 + 7 * PAGE_SIZE));
        wrong.insert(s.reserved_end.raw());
        let w = s.judge_sweep("t".into(), managed, &wrong);
        assert_eq!((w.missing_total, w.extra_total), (1, 1));
        assert_eq!(w.missing, vec![Gpa(block.0 + 7 * PAGE_SIZE)]);
        assert_eq!(w.extra, vec![s.reserved_end]);
        assert!(w
            .problem()
            .unwrap()
            .contains("1 unreachable pages without a violation"));
        // A sweep that did not cover every managed page fails too.
        assert!(s
            .judge_sweep("t".into(), managed - 1, &all)
            .problem()
            .is_some());
    }
}
