//! The reachability matrix: one cell per route the guest tried against unmapped pages holding a
//! host-planted secret, judged by the VMM from its own records and its own view of memory.
//!
//! A route's cell is, in this order of precedence:
//! - `leaked`: after the route, the sink (or, cheaply, the reserved memory) holds secret bytes,
//!   or a planted page no longer holds its secret (a store landed);
//! - `blocked and recorded`: nothing leaked and the VMM recorded at least one blocked access
//!   while the route ran (a violation, or a hypercall it refused);
//! - `blocked but unrecorded`: nothing leaked and the VMM recorded nothing.

use std::fmt::Write as _;

use serde::Serialize;

/// The result of one route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteResult {
    /// Nothing reached the guest or the hole, and the VMM recorded the attempt.
    BlockedAndRecorded,
    /// Nothing reached the guest or the hole, but the VMM has no record of the attempt.
    BlockedButUnrecorded,
    /// A secret byte reached the guest, or a store reached a planted page.
    Leaked,
}

impl RouteResult {
    /// The words the matrix prints.
    pub fn name(self) -> &'static str {
        match self {
            RouteResult::BlockedAndRecorded => "blocked and recorded",
            RouteResult::BlockedButUnrecorded => "blocked but unrecorded",
            RouteResult::Leaked => "leaked",
        }
    }
}

/// What the VMM found at the end of a route: the input of [`judge`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteEvidence {
    /// Bytes of the sink equal to a secret byte.
    pub sink_secret_bytes: u64,
    /// Places in the reserved memory holding 8 consecutive secret bytes.
    pub reserved_secret_words: u64,
    /// Planted bytes that no longer hold their secret.
    pub planted_bytes_changed: u64,
    /// Violations recorded while the route ran.
    pub violations: u64,
    /// Hypercalls the VMM refused while the route ran (bad address, not allocated, ...).
    pub refused_hypercalls: u64,
}

/// The cell for `e` (see the module documentation).
pub fn judge(e: &RouteEvidence) -> RouteResult {
    if e.sink_secret_bytes > 0 || e.reserved_secret_words > 0 || e.planted_bytes_changed > 0 {
        RouteResult::Leaked
    } else if e.violations + e.refused_hypercalls > 0 {
        RouteResult::BlockedAndRecorded
    } else {
        RouteResult::BlockedButUnrecorded
    }
}

/// One row of the matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteCell {
    /// Route name as the guest gave it (`[a-z0-9_]+`).
    pub route: String,
    /// The test it ran in.
    pub test: Option<String>,
    /// The VMM's judgement.
    pub result: RouteResult,
    /// What it was judged from.
    #[serde(flatten)]
    pub evidence: RouteEvidence,
}

/// Cells per result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MatrixCounts {
    /// `blocked and recorded` cells.
    pub blocked_and_recorded: u64,
    /// `blocked but unrecorded` cells.
    pub blocked_but_unrecorded: u64,
    /// `leaked` cells.
    pub leaked: u64,
}

/// Every route of the run, in the order they ended, and the counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// One cell per route.
    pub routes: Vec<RouteCell>,
    /// Cells per result.
    pub counts: MatrixCounts,
}

impl Matrix {
    /// Adds a cell and counts it.
    pub fn push(&mut self, cell: RouteCell) {
        match cell.result {
            RouteResult::BlockedAndRecorded => self.counts.blocked_and_recorded += 1,
            RouteResult::BlockedButUnrecorded => self.counts.blocked_but_unrecorded += 1,
            RouteResult::Leaked => self.counts.leaked += 1,
        }
        self.routes.push(cell);
    }

    /// The matrix as `veil run` prints it (nothing if no route ran).
    pub fn table(&self) -> String {
        let mut s = String::new();
        if self.routes.is_empty() {
            return s;
        }
        let w = self.routes.iter().map(|c| c.route.len()).max().unwrap_or(5);
        let w = w.max(5);
        let _ = writeln!(
            s,
            "\n{:<w$}  {:<22}  {:>10}  {:>7}  evidence",
            "route", "result", "violations", "refused"
        );
        for c in &self.routes {
            let e = &c.evidence;
            let _ = writeln!(
                s,
                "{:<w$}  {:<22}  {:>10}  {:>7}  sink {} secret B, planted {} B changed, reserved {} secret words",
                c.route,
                c.result.name(),
                e.violations,
                e.refused_hypercalls,
                e.sink_secret_bytes,
                e.planted_bytes_changed,
                e.reserved_secret_words
            );
        }
        let n = &self.counts;
        let _ = writeln!(
            s,
            "reachability: {} routes: {} blocked and recorded, {} blocked but unrecorded, {} leaked",
            self.routes.len(),
            n.blocked_and_recorded,
            n.blocked_but_unrecorded,
            n.leaked
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_gives_each_of_the_three_results() {
        let recorded = RouteEvidence {
            violations: 3,
            ..Default::default()
        };
        assert_eq!(judge(&recorded), RouteResult::BlockedAndRecorded);
        let refused = RouteEvidence {
            refused_hypercalls: 1,
            ..Default::default()
        };
        assert_eq!(judge(&refused), RouteResult::BlockedAndRecorded);
        assert_eq!(
            judge(&RouteEvidence::default()),
            RouteResult::BlockedButUnrecorded
        );
        // Any leak wins over any record.
        for leak in [
            RouteEvidence {
                sink_secret_bytes: 1,
                ..recorded
            },
            RouteEvidence {
                planted_bytes_changed: 8,
                ..recorded
            },
            RouteEvidence {
                reserved_secret_words: 1,
                ..Default::default()
            },
        ] {
            assert_eq!(judge(&leak), RouteResult::Leaked, "{leak:?}");
        }
    }

    #[test]
    fn matrix_counts_and_prints_every_cell() {
        let mut m = Matrix::default();
        for (i, e) in [
            RouteEvidence {
                violations: 1,
                ..Default::default()
            },
            RouteEvidence::default(),
            RouteEvidence {
                sink_secret_bytes: 2,
                ..Default::default()
            },
        ]
        .iter()
        .enumerate()
        {
            m.push(RouteCell {
                route: format!("r{i}"),
                test: None,
                result: judge(e),
                evidence: *e,
            });
        }
        assert_eq!(
            m.counts,
            MatrixCounts {
                blocked_and_recorded: 1,
                blocked_but_unrecorded: 1,
                leaked: 1
            }
        );
        let t = m.table();
        for (route, want) in [
            ("r0 ", "blocked and recorded"),
            ("r1 ", "blocked but unrecorded"),
            ("r2 ", "leaked"),
        ] {
            let line = t.lines().find(|l| l.starts_with(route)).expect(route);
            assert!(line.contains(want), "{want:?} in {line:?}");
        }
        assert!(t.contains("3 routes: 1 blocked and recorded"), "{t}");
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["routes"][2]["result"], "leaked");
        assert_eq!(j["routes"][2]["sink_secret_bytes"], 2);
        assert_eq!(j["counts"]["blocked_but_unrecorded"], 1);
    }
}
