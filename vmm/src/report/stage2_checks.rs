//! What the run learned about stage 2 beyond violations: `--host-secretmem`, reconciliation
//! (`--verify-stage2`, `Hc::VerifyStage2`), sweeps (`Hc::Sweep`) and refused stage-2 updates.

use serde::Serialize;

use crate::addr::Gpa;
use crate::stage2::verify::Mismatch;

/// Most mismatches, refused updates and sweeps kept in the report (the rest are counted).
pub const MAX_KEPT: usize = 64;

/// The stage-2 checks of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stage2Checks {
    /// Unmapped ranges were backed by `memfd_secret` memory (`--host-secretmem`).
    pub host_secretmem: bool,
    /// Reconciliation ran after every hypercall that changed stage 2 (`--verify-stage2`).
    pub verify_stage2: bool,
    /// Reconciliations done (after updates, at every test's end, at the end of the run, and
    /// on `Hc::VerifyStage2`).
    pub reconciliations: u64,
    /// Wall time spent reconciling, in milliseconds.
    pub reconcile_ms: f64,
    /// Ranges where the realised state differed from the engine's (first [`MAX_KEPT`]): each
    /// fails the run.
    pub mismatches: Vec<Mismatch>,
    /// Mismatches found, including any not kept.
    pub mismatches_total: u64,
    /// Reconciliations that could not read the realised state (they fail the run too).
    pub reconcile_errors: Vec<String>,
    /// Pages changed on purpose by `Hc::Stage2Tamper` that reconciliation caught (and put
    /// back): not failures.
    pub tampers_caught: Vec<Mismatch>,
    /// Stage-2 updates the engine refused, with the reason (first [`MAX_KEPT`]): a wrong state
    /// (a refused `Hc::Protect`), out of memslots or VMAs, a backend failure such as secret
    /// memory over the memlock limit. A refused flip reaches the guest as an allocation
    /// failure (`Status::Stage2Failed`).
    pub refused_updates: Vec<String>,
    /// Refused updates, including any not kept.
    pub refused_updates_total: u64,
    /// Sweeps the guest ran (`Hc::Sweep`).
    pub sweeps: Vec<SweepResult>,
}

impl Stage2Checks {
    /// Whether reconciliation found something wrong (the run fails).
    pub fn failed(&self) -> bool {
        self.mismatches_total > 0 || !self.reconcile_errors.is_empty()
    }

    /// The summary lines: reconciliation, secret memory, refused updates, each mismatch and
    /// sweep.
    pub fn lines(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "stage-2 checks: {} reconciliations ({}, {:.1} ms), {} mismatches, {} tampered pages caught; unmapped pages {}; {} stage-2 updates refused",
            self.reconciliations,
            if self.verify_stage2 {
                "after every update, --verify-stage2"
            } else {
                "at test ends and on request"
            },
            self.reconcile_ms,
            self.mismatches_total,
            self.tampers_caught.len(),
            if self.host_secretmem {
                "in memfd_secret memory (--host-secretmem)"
            } else {
                "in ordinary host memory"
            },
            self.refused_updates_total
        );
        for m in &self.mismatches {
            let _ = writeln!(s, "  MISMATCH {m}");
        }
        for e in &self.reconcile_errors {
            let _ = writeln!(s, "  ERROR {e}");
        }
        for e in self.refused_updates.iter().take(4) {
            let _ = writeln!(s, "  refused: {e}");
        }
        for w in &self.sweeps {
            let _ = writeln!(
                s,
                "  sweep ({}): {} managed pages loaded, {} unreachable, {} with a violation, {} missing, {} extra",
                w.test, w.pages_loaded, w.unreachable_pages, w.violation_pages, w.missing_total, w.extra_total
            );
        }
        s
    }
}

/// One sweep: the pages whose loads were violations against the pages the engine makes
/// unreachable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepResult {
    /// The test that swept.
    pub test: String,
    /// Managed pages the guest says it loaded one byte of.
    pub pages_loaded: u64,
    /// Managed pages.
    pub managed_pages: u64,
    /// Managed pages the engine makes unreachable (no read in the guest's view) at the end.
    pub unreachable_pages: u64,
    /// Pages whose loads were violations during the sweep.
    pub violation_pages: u64,
    /// Unreachable pages with no violation (first few).
    pub missing: Vec<Gpa>,
    /// Unreachable pages with no violation, all of them counted.
    pub missing_total: u64,
    /// Pages with a violation the engine calls reachable (first few).
    pub extra: Vec<Gpa>,
    /// Such pages, all counted.
    pub extra_total: u64,
}

impl SweepResult {
    /// Why the sweep fails its test, if it does.
    pub fn problem(&self) -> Option<String> {
        if self.missing_total == 0
            && self.extra_total == 0
            && self.pages_loaded == self.managed_pages
        {
            return None;
        }
        Some(format!(
            "sweep: {} of {} managed pages loaded, {} unreachable, {} violations: {} unreachable \
             pages without a violation {:x?}, {} violations on reachable pages {:x?}",
            self.pages_loaded,
            self.managed_pages,
            self.unreachable_pages,
            self.violation_pages,
            self.missing_total,
            self.missing.iter().map(|g| g.0).collect::<Vec<_>>(),
            self.extra_total,
            self.extra.iter().map(|g| g.0).collect::<Vec<_>>(),
        ))
    }
}
