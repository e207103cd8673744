//! Reachability routes (`Hc::RouteBegin` / `Hc::RouteEnd`): the guest brackets each attempt to
//! reach a planted secret, and at the end the VMM judges it from its own records and its own
//! view of memory (see [`crate::report::matrix`] for the three results).
//!
//! Protocol, per route: `PlantSecret` the target page(s) (the ranges planted since the last
//! `RouteBegin` belong to the next route), zero the sink, `RouteBegin(name, sink)`, perform the
//! access(es), copy whatever they obtained into the sink, `RouteEnd()`. While a route is open
//! the VMM counts the violations it records and the hypercalls it refuses with `BadAddress`,
//! `NotAllocated`, `Unreachable` or `HarnessOnly` (a refusal is the record of a blocked
//! hypercall route). Violations inside an open route are not matched against the test's
//! `ExpectViolation`s: the route's cell judges them. A test with any cell other than "blocked and recorded", or with a route
//! still open at `TestEnd`, fails on the VMM side whatever the guest says.

use std::collections::HashSet;

use veil_abi::{Hc, Status};

use super::{HcOut, Session};
use crate::addr::Gpa;
use crate::report::matrix::{judge, Matrix, RouteCell, RouteEvidence, RouteResult};
use crate::report::{AccessKind, ViolationAction};

/// Most bytes a route's sink may have.
pub const MAX_SINK: u64 = 64 << 10;
/// Most planted ranges one route is judged against (the most recent ones).
pub const MAX_PLANTED: usize = 1024;
/// Most secret windows a route's reserved-memory scan looks for (8 pages' worth).
pub const MAX_WINDOWS: usize = 8 * 4096;
/// Most routes in one run.
pub const MAX_ROUTES: usize = 4096;

/// The open route.
struct OpenRoute {
    name: String,
    sink: (Gpa, u64),
    planted: Vec<(Gpa, u64)>,
    violations_at_begin: u64,
    refused: u64,
}

/// Route bookkeeping of a session.
#[derive(Default)]
pub(super) struct Routes {
    open: Option<OpenRoute>,
    planted: Vec<(Gpa, u64)>,
    /// Every judged route.
    pub(super) matrix: Matrix,
    /// Buffer for the reserved-memory scan.
    scratch: Vec<u8>,
}

impl Routes {
    /// Whether a route is open.
    pub(super) fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

impl Session {
    /// Remembers a planted range for the next route (the last [`MAX_PLANTED`] are kept).
    /// Whether a reachability route is open.
    pub(crate) fn route_is_open(&self) -> bool {
        self.routes.is_open()
    }

    /// Records the read of a page-table entry in a hole that KVM's own walk made for the
    /// route's access at `rip` (the guest took #PF; no exit carried it), answered by the
    /// guest's route frame.
    pub(crate) fn route_fault_violation(&mut self, entry_gpa: Gpa, rip: u64) {
        self.record_violation(
            entry_gpa,
            AccessKind::Read,
            8,
            rip,
            ViolationAction::Recovered,
        );
    }

    pub(super) fn note_planted(&mut self, gpa: Gpa, len: u64) {
        if self.routes.planted.len() >= MAX_PLANTED {
            self.routes.planted.remove(0);
        }
        self.routes.planted.push((gpa, len));
    }

    /// Counts a refused hypercall against the open route.
    pub(super) fn note_refusal(&mut self, hc: Hc, out: &HcOut) {
        let refused = matches!(
            out.status,
            Status::BadAddress | Status::NotAllocated | Status::Unreachable | Status::HarnessOnly
        );
        if let (true, false, Some(r)) = (
            refused,
            matches!(hc, Hc::RouteBegin | Hc::RouteEnd),
            self.routes.open.as_mut(),
        ) {
            r.refused += 1;
        }
    }

    pub(super) fn hc_route_begin(
        &mut self,
        name_ptr: Gpa,
        name_len: u64,
        sink: Gpa,
        sink_len: u64,
    ) -> Result<u64, Status> {
        if self.current.is_none() || self.routes.open.is_some() {
            return Err(Status::BadState);
        }
        let name = self.read_name(name_ptr, name_len)?;
        if sink_len == 0 || sink_len > MAX_SINK {
            return Err(Status::BadArgument);
        }
        self.check_buf(sink, sink_len)?;
        if self.routes.matrix.routes.len() >= MAX_ROUTES {
            return Err(Status::BadArgument);
        }
        self.routes.open = Some(OpenRoute {
            name,
            sink: (sink, sink_len),
            planted: std::mem::take(&mut self.routes.planted),
            violations_at_begin: self.violations_total,
            refused: 0,
        });
        Ok(0)
    }

    pub(super) fn hc_route_end(&mut self) -> Result<u64, Status> {
        if self.routes.open.is_none() {
            return Err(Status::BadState);
        }
        let test = self.current_name();
        if let Some(cell) = self.judge_open_route(test) {
            self.routes.matrix.push(cell);
        }
        Ok(0)
    }

    /// Judges the open route, if any (closing it): its cell, for the caller to add to the matrix.
    fn judge_open_route(&mut self, test: Option<String>) -> Option<RouteCell> {
        let r = self.routes.open.take()?;
        let read = |gpa: Gpa, len: u64| {
            let mut b = vec![0u8; len as usize];
            self.ram.read(gpa.raw(), &mut b).ok().map(|()| b)
        };
        let sink = read(r.sink.0, r.sink.1);
        // The reserved memory goes through one buffer kept across routes: a fresh 4 MiB
        // allocation per route costs more in page faults than the scan.
        let mut scratch = std::mem::take(&mut self.routes.scratch);
        scratch.resize(self.reserved_end.raw() as usize, 0);
        let reserved = self.ram.read(0, &mut scratch).ok().map(|()| &scratch);
        let windows = self.secret_windows(&r.planted);
        let evidence = RouteEvidence {
            // An unreadable sink or reserved memory cannot be shown clean: count it as leaked.
            sink_secret_bytes: sink.map_or(r.sink.1, |b| {
                b.iter().filter(|&&b| Session::is_secret_byte(b)).count() as u64
            }),
            reserved_secret_words: reserved.map_or(1, |b| count_windows(b, &windows)),
            planted_bytes_changed: r
                .planted
                .iter()
                .map(|&(gpa, len)| len - self.secret_matches(gpa, len).unwrap_or(0).min(len))
                .sum(),
            violations: self.violations_total - r.violations_at_begin,
            refused_hypercalls: r.refused,
        };
        self.routes.scratch = scratch;
        Some(RouteCell {
            route: r.name,
            test,
            result: judge(&evidence),
            evidence,
        })
    }

    /// Every 8-byte window of the secret planted over `planted` (as little-endian u64), at
    /// most [`MAX_WINDOWS`]: what an 8-byte or wider load of a planted page would copy out.
    fn secret_windows(&self, planted: &[(Gpa, u64)]) -> HashSet<u64> {
        let mut set = HashSet::new();
        for &(gpa, len) in planted {
            let len = len.min(MAX_WINDOWS as u64 - set.len().min(MAX_WINDOWS) as u64);
            let mut b = vec![0u8; len as usize + 7];
            for (i, x) in b.iter_mut().enumerate() {
                *x = self.secret_byte(Gpa(gpa.raw() + i as u64));
            }
            set.extend(
                b.windows(8)
                    .take(len.saturating_sub(7) as usize)
                    .map(le_u64),
            );
        }
        set
    }

    /// The VMM's objection to the current test's routes, if any: a route left open (judged
    /// now) or a cell other than "blocked and recorded".
    ///
    /// When the run was `interrupted` from outside, a route still open was cut off, not
    /// finished: it is judged for a leak only (a leak is a fact however the route ended) and
    /// otherwise left out of the matrix, since "unrecorded" says nothing about a route that was
    /// stopped before it could be recorded.
    pub(super) fn route_verdict(&mut self, test: &str, interrupted: bool) -> Option<String> {
        let mut open = self.routes.open.as_ref().map(|r| r.name.clone());
        if let Some(cell) = self.judge_open_route(Some(test.to_string())) {
            if interrupted {
                open = None;
            }
            if !interrupted || cell.result == RouteResult::Leaked {
                self.routes.matrix.push(cell);
            }
        }
        let mut problems: Vec<String> = self
            .routes
            .matrix
            .routes
            .iter()
            .filter(|c| c.test.as_deref() == Some(test))
            .filter(|c| c.result != RouteResult::BlockedAndRecorded)
            .map(|c| format!("route {} {}", c.route, c.result.name()))
            .collect();
        if let Some(name) = open {
            problems.insert(0, format!("route {name} did not end"));
        }
        self.routes.planted.clear();
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

fn le_u64(w: &[u8]) -> u64 {
    u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))
}

/// Places in `bytes` where 8 consecutive bytes are one of `windows` (only runs of 8 bytes that
/// each could be secret are looked up, so the scan costs one compare per byte).
fn count_windows(bytes: &[u8], windows: &HashSet<u64>) -> u64 {
    let (mut run, mut found) = (0usize, 0u64);
    for (c, chunk) in bytes.chunks(8).enumerate() {
        // Most reserved memory is zero or small values: 8 bytes all below 0x10 hold no secret
        // byte (every secret byte is >= 0x10), so they are passed over in one test.
        if chunk.len() == 8 && le_u64(chunk) & 0xf0f0_f0f0_f0f0_f0f0 == 0 {
            run = 0;
            continue;
        }
        for (j, &b) in chunk.iter().enumerate() {
            run = if Session::is_secret_byte(b) {
                run + 1
            } else {
                0
            };
            let i = c * 8 + j;
            if run >= 8 && windows.contains(&le_u64(&bytes[i + 1 - 8..=i])) {
                found += 1;
                run = 0;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_found_wherever_they_were_copied() {
        let secret: Vec<u8> = (0..32u8).map(|i| 0x10 + i * 3).collect();
        let set: HashSet<u64> = secret.windows(8).map(le_u64).collect();
        let mut mem = vec![0u8; 100];
        mem[41..49].copy_from_slice(&secret[5..13]);
        assert_eq!(count_windows(&mem, &set), 1);
        // Seven bytes are not a window; secret-range bytes in another order are not either.
        mem[48] = 0;
        assert_eq!(count_windows(&mem, &set), 0);
        let mut shuffled = secret[..8].to_vec();
        shuffled.swap(0, 1);
        mem[60..68].copy_from_slice(&shuffled);
        assert_eq!(count_windows(&mem, &set), 0);
    }
}
