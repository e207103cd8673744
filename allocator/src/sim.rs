//! A simulating, recording [`Stage2`] backend for tests and host-only replays.
//!
//! It models each managed page as a mapped/unmapped bit plus a 64-bit content word standing
//! for the page's 4 KiB (0 = all zero), records every call, can fail a chosen call, and flags
//! protocol violations: mapping a page that is not zero (a secret would leak), unmapping an
//! unmapped page, mapping a mapped page, and ranges outside the memory.

use crate::error::Stage2Error;
use crate::stage2::Stage2;
use crate::Pfn;
use alloc::vec;
use alloc::vec::Vec;

/// Kind of a stage-2 call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// `Stage2::unmap`.
    Unmap,
    /// `Stage2::map`.
    Map,
    /// `Stage2::zero`.
    Zero,
}

/// One recorded stage-2 call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Which operation.
    pub kind: CallKind,
    /// First pfn.
    pub pfn: Pfn,
    /// Pages.
    pub count: u64,
    /// Whether the backend reported success.
    pub ok: bool,
}

/// A protocol violation seen by the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimViolation {
    /// What went wrong.
    pub what: &'static str,
    /// The first page concerned.
    pub pfn: Pfn,
}

/// Simulated stage 2 over `[base, base + nr)`: all pages start mapped and zero.
#[derive(Clone, Debug)]
pub struct SimStage2 {
    base: Pfn,
    mapped: Vec<bool>,
    content: Vec<u64>,
    calls: Vec<Call>,
    record: bool,
    counts: [u64; 3],
    fail: Option<(CallKind, u64, Stage2Error)>,
    violations: Vec<SimViolation>,
}

impl SimStage2 {
    /// Simulate `nr` pages starting at `base`, all mapped and zero.
    pub fn new(base: Pfn, nr: u64) -> SimStage2 {
        SimStage2 {
            base,
            mapped: vec![true; nr as usize],
            content: vec![0; nr as usize],
            calls: Vec::new(),
            record: true,
            counts: [0; 3],
            fail: None,
            violations: Vec::new(),
        }
    }

    /// Stop (or resume) keeping the call log (counts are always kept).
    pub fn set_recording(&mut self, on: bool) {
        self.record = on;
    }

    /// Fail the `nth` (0 = next) future call of `kind` with `err`.
    pub fn fail_nth(&mut self, kind: CallKind, nth: u64, err: Stage2Error) {
        self.fail = Some((kind, self.counts[kind as usize] + nth, err));
    }

    /// Recorded calls, oldest first.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// Forget recorded calls (counts stay).
    pub fn clear_calls(&mut self) {
        self.calls.clear();
    }

    /// Number of calls of `kind` so far (successful or not).
    pub fn count(&self, kind: CallKind) -> u64 {
        self.counts[kind as usize]
    }

    /// Violations seen so far.
    pub fn violations(&self) -> &[SimViolation] {
        &self.violations
    }

    fn idx(&self, pfn: Pfn) -> Option<usize> {
        let i = pfn.checked_sub(self.base)?;
        (i < self.mapped.len() as u64).then_some(i as usize)
    }

    /// Whether `pfn` is reachable by the guest (None outside the memory).
    pub fn is_mapped(&self, pfn: Pfn) -> Option<bool> {
        self.idx(pfn).map(|i| self.mapped[i])
    }

    /// The content word of `pfn` as the host sees it (None outside the memory).
    pub fn content(&self, pfn: Pfn) -> Option<u64> {
        self.idx(pfn).map(|i| self.content[i])
    }

    /// The host writes `v` into `pfn` (mapped or not), e.g. to plant a secret.
    pub fn host_write(&mut self, pfn: Pfn, v: u64) -> bool {
        match self.idx(pfn) {
            Some(i) => {
                self.content[i] = v;
                true
            }
            None => false,
        }
    }

    /// The guest reads `pfn` through the direct map: None if unmapped or outside.
    pub fn guest_read(&self, pfn: Pfn) -> Option<u64> {
        let i = self.idx(pfn)?;
        self.mapped[i].then_some(self.content[i])
    }

    /// The guest writes `pfn` through the direct map: false if unmapped or outside.
    pub fn guest_write(&mut self, pfn: Pfn, v: u64) -> bool {
        match self.idx(pfn) {
            Some(i) if self.mapped[i] => {
                self.content[i] = v;
                true
            }
            _ => false,
        }
    }

    fn enter(
        &mut self,
        kind: CallKind,
        pfn: Pfn,
        count: u64,
    ) -> Result<(usize, usize), Stage2Error> {
        let nth = self.counts[kind as usize];
        self.counts[kind as usize] += 1;
        let mut res = Ok(());
        if let Some((k, n, e)) = self.fail {
            if k == kind && n == nth {
                self.fail = None;
                res = Err(e);
            }
        }
        let range = match (
            self.idx(pfn),
            count.checked_sub(1).and_then(|c| self.idx(pfn + c)),
        ) {
            (Some(a), Some(b)) => Ok((a, b + 1)),
            _ => {
                self.violations.push(SimViolation {
                    what: "range outside the memory",
                    pfn,
                });
                Err(Stage2Error::Backend(-22))
            }
        };
        let res = res.and(range);
        if self.record {
            self.calls.push(Call {
                kind,
                pfn,
                count,
                ok: res.is_ok(),
            });
        }
        res
    }
}

impl Stage2 for SimStage2 {
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (a, b) = self.enter(CallKind::Unmap, pfn, count)?;
        if self.mapped[a..b].iter().any(|&m| !m) {
            self.violations.push(SimViolation {
                what: "unmap of an unmapped page",
                pfn,
            });
        }
        self.mapped[a..b].fill(false);
        Ok(())
    }

    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (a, b) = self.enter(CallKind::Map, pfn, count)?;
        if self.mapped[a..b].iter().any(|&m| m) {
            self.violations.push(SimViolation {
                what: "map of a mapped page",
                pfn,
            });
        }
        if self.content[a..b].iter().any(|&c| c != 0) {
            self.violations.push(SimViolation {
                what: "page mapped before it was zeroed",
                pfn,
            });
        }
        self.mapped[a..b].fill(true);
        Ok(())
    }

    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (a, b) = self.enter(CallKind::Zero, pfn, count)?;
        self.content[a..b].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulates_mapping_content_and_failures() {
        let mut s = SimStage2::new(100, 8);
        assert!(s.guest_write(101, 7));
        s.unmap(100, 4).unwrap();
        assert_eq!(s.guest_read(101), None);
        assert_eq!(s.content(101), Some(7));
        s.map(100, 4).unwrap();
        assert_eq!(s.violations().len(), 1, "mapped with a secret inside");
        s.unmap(100, 4).unwrap();
        s.zero(100, 4).unwrap();
        s.map(100, 4).unwrap();
        assert_eq!(s.violations().len(), 1);
        assert_eq!(s.guest_read(101), Some(0));
        s.fail_nth(CallKind::Unmap, 0, Stage2Error::OutOfSlots);
        assert_eq!(s.unmap(104, 1), Err(Stage2Error::OutOfSlots));
        assert_eq!(s.is_mapped(104), Some(true));
        assert!(s.unmap(107, 2).is_err());
        assert_eq!(s.count(CallKind::Unmap), 4);
        assert_eq!(s.calls().len(), 7);
    }
}
