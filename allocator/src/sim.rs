//! A simulating, recording [`Stage2`] backend for tests and host-only replays.
//!
//! It models each managed page as one of the three states of [`Stage2`] (mapped in both
//! views, sensitive = full view only, unmapped) plus a 64-bit content word standing for the
//! page's 4 KiB (0 = all zero), records every call, can fail a chosen call, and flags
//! protocol violations: making a page visible where it was not while it is not zero (a
//! secret or user data would leak: unmapped → mapped/sensitive, sensitive → mapped),
//! unmapping an unmapped page, mapping a mapped page, making a sensitive page sensitive, and
//! ranges outside the memory.

use crate::error::Stage2Error;
use crate::freetype::Visibility;
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
    /// `Stage2::make_sensitive`.
    MakeSensitive,
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
    state: Vec<Visibility>,
    content: Vec<u64>,
    calls: Vec<Call>,
    record: bool,
    counts: [u64; 4],
    fail: Option<(CallKind, u64, Stage2Error)>,
    violations: Vec<SimViolation>,
}

impl SimStage2 {
    /// Simulate `nr` pages starting at `base`, all mapped and zero.
    pub fn new(base: Pfn, nr: u64) -> SimStage2 {
        SimStage2 {
            base,
            state: vec![Visibility::Nonsensitive; nr as usize],
            content: vec![0; nr as usize],
            calls: Vec::new(),
            record: true,
            counts: [0; 4],
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
        (i < self.state.len() as u64).then_some(i as usize)
    }

    /// Whether `pfn` is reachable by the guest in the full view, i.e. not unmapped (None
    /// outside the memory).
    pub fn is_mapped(&self, pfn: Pfn) -> Option<bool> {
        self.idx(pfn).map(|i| self.state[i] != Visibility::Unmapped)
    }

    /// The state of `pfn`: nonsensitive (both views), sensitive (full view only) or unmapped
    /// (None outside the memory).
    pub fn visibility(&self, pfn: Pfn) -> Option<Visibility> {
        self.idx(pfn).map(|i| self.state[i])
    }

    /// The guest reads `pfn` in the restricted view: None if sensitive, unmapped or outside.
    pub fn guest_read_restricted(&self, pfn: Pfn) -> Option<u64> {
        let i = self.idx(pfn)?;
        (self.state[i] == Visibility::Nonsensitive).then_some(self.content[i])
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

    /// The guest reads `pfn` through the direct map in the full view: None if unmapped or
    /// outside.
    pub fn guest_read(&self, pfn: Pfn) -> Option<u64> {
        let i = self.idx(pfn)?;
        (self.state[i] != Visibility::Unmapped).then_some(self.content[i])
    }

    /// The guest writes `pfn` through the direct map in the full view: false if unmapped or
    /// outside.
    pub fn guest_write(&mut self, pfn: Pfn, v: u64) -> bool {
        match self.idx(pfn) {
            Some(i) if self.state[i] != Visibility::Unmapped => {
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

impl SimStage2 {
    /// Move `[a, b)` to state `to`, flagging a page that gains visibility while not zero and
    /// a page already in `to` (`same`: the violation's text).
    fn set_state(&mut self, pfn: Pfn, a: usize, b: usize, to: Visibility, same: &'static str) {
        if self.state[a..b].contains(&to) {
            self.violations.push(SimViolation { what: same, pfn });
        }
        if (a..b).any(|i| self.state[i].gains_visibility(to) && self.content[i] != 0) {
            self.violations.push(SimViolation {
                what: "page made visible before it was zeroed",
                pfn,
            });
        }
        self.state[a..b].fill(to);
    }
}

impl Stage2 for SimStage2 {
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (a, b) = self.enter(CallKind::Unmap, pfn, count)?;
        self.set_state(pfn, a, b, Visibility::Unmapped, "unmap of an unmapped page");
        Ok(())
    }

    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (a, b) = self.enter(CallKind::Map, pfn, count)?;
        self.set_state(pfn, a, b, Visibility::Nonsensitive, "map of a mapped page");
        Ok(())
    }

    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (a, b) = self.enter(CallKind::Zero, pfn, count)?;
        self.content[a..b].fill(0);
        Ok(())
    }

    fn make_sensitive(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (a, b) = self.enter(CallKind::MakeSensitive, pfn, count)?;
        self.set_state(
            pfn,
            a,
            b,
            Visibility::Sensitive,
            "make_sensitive of a sensitive page",
        );
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

    #[test]
    fn three_states_and_the_zeroing_rule() {
        let mut s = SimStage2::new(0, 8);
        assert!(s.guest_write(1, 9));
        // mapped -> sensitive: no zeroing needed, gone from the restricted view only.
        s.make_sensitive(0, 4).unwrap();
        assert!(s.violations().is_empty());
        assert_eq!(s.visibility(1), Some(Visibility::Sensitive));
        assert_eq!(s.guest_read_restricted(1), None);
        assert_eq!(s.guest_read(1), Some(9));
        // sensitive -> mapped with data inside: a leak.
        s.map(0, 4).unwrap();
        assert_eq!(
            s.violations()[0].what,
            "page made visible before it was zeroed"
        );
        s.make_sensitive(0, 4).unwrap();
        s.make_sensitive(0, 1).unwrap();
        assert_eq!(s.violations()[1].what, "make_sensitive of a sensitive page");
        // sensitive -> unmapped -> (zero) -> sensitive: clean.
        s.unmap(0, 4).unwrap();
        assert_eq!(s.guest_read(1), None);
        s.zero(0, 4).unwrap();
        s.make_sensitive(0, 4).unwrap();
        assert_eq!(s.violations().len(), 2);
        // unmapped -> sensitive with a secret inside: a leak.
        s.host_write(5, 3);
        s.unmap(4, 4).unwrap();
        s.make_sensitive(4, 4).unwrap();
        assert_eq!(s.violations().len(), 3);
        assert_eq!(s.count(CallKind::MakeSensitive), 5);
    }
}
