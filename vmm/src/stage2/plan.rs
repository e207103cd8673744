//! Pure stage-2 bookkeeping: range maps and the memslot planner.
//!
//! Nothing here talks to a backend. [`RangeMap`] holds maximal runs of equal value (page states
//! in the engine, permissions in the slots backend); the planner ([`slot_runs`], [`diff`])
//! computes which memslots an update must delete and create so that the memslots are again
//! exactly the maximal runs of pages with equal, non-`None` permission.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::{Perm, SlotInfo};

/// One run of the range map: [start, end) in `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run<S> {
    /// First GPA.
    pub start: u64,
    /// GPA one past the run.
    pub end: u64,
    /// State of every page.
    pub state: S,
}

/// Maximal runs of equal value covering [0, size): adjacent runs always differ.
#[derive(Clone, Debug)]
pub struct RangeMap<S> {
    /// start -> (end, state)
    runs: BTreeMap<u64, (u64, S)>,
    size: u64,
}

impl<S: Copy + Eq> RangeMap<S> {
    /// A map of [0, size) where every run is given by `init` (must cover [0, size) in order).
    pub fn new(size: u64, init: &[Run<S>]) -> RangeMap<S> {
        let mut m = RangeMap {
            runs: BTreeMap::new(),
            size,
        };
        for r in init.iter().filter(|r| r.start < r.end) {
            m.runs.insert(r.start, (r.end, r.state));
        }
        m.coalesce_all();
        m
    }

    fn coalesce_all(&mut self) {
        let runs: Vec<Run<S>> = self.iter().collect();
        self.runs.clear();
        let mut cur: Option<Run<S>> = None;
        for r in runs {
            match cur {
                Some(ref mut c) if c.state == r.state && c.end == r.start => c.end = r.end,
                Some(c) => {
                    self.runs.insert(c.start, (c.end, c.state));
                    cur = Some(r);
                }
                None => cur = Some(r),
            }
        }
        if let Some(c) = cur {
            self.runs.insert(c.start, (c.end, c.state));
        }
    }

    /// Size of the covered space.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether the map has no runs (size 0).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// All runs in order.
    pub fn iter(&self) -> impl Iterator<Item = Run<S>> + '_ {
        self.runs
            .iter()
            .map(|(&start, &(end, state))| Run { start, end, state })
    }

    /// The run containing `addr`.
    pub fn run_at(&self, addr: u64) -> Option<Run<S>> {
        let (&start, &(end, state)) = self.runs.range(..=addr).next_back()?;
        (addr < end).then_some(Run { start, end, state })
    }

    /// The runs overlapping [start, end), clipped to it, in order. O(log n + k).
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = Run<S>> + '_ {
        // An empty or inverted query yields nothing (BTreeMap::range would panic on start > end).
        let end = end.max(start);
        let first = self.run_at(start).map(|r| r.start).unwrap_or(start);
        self.runs
            .range((Bound::Included(first), Bound::Excluded(end)))
            .map(move |(&s, &(e, state))| Run {
                start: s.max(start),
                end: e.min(end),
                state,
            })
            .filter(|r| r.start < r.end)
    }

    /// Splits the run containing `addr` so that a run starts at `addr`.
    fn split_at(&mut self, addr: u64) {
        if let Some(r) = self.run_at(addr) {
            if r.start < addr {
                self.runs.insert(r.start, (addr, r.state));
                self.runs.insert(addr, (r.end, r.state));
            }
        }
    }

    /// Sets [start, end) to `state`, keeping runs maximal. The range must lie inside [0, size).
    /// O(log n + runs replaced).
    pub fn set(&mut self, start: u64, end: u64, state: S) {
        debug_assert!(start < end && end <= self.size);
        self.split_at(start);
        self.split_at(end);
        let inner: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for s in inner {
            self.runs.remove(&s);
        }
        let mut new_start = start;
        let mut new_end = end;
        if let Some((&ls, &(le, lstate))) = self.runs.range(..start).next_back() {
            if le == start && lstate == state {
                self.runs.remove(&ls);
                new_start = ls;
            }
        }
        if let Some(&(re, rstate)) = self.runs.get(&end) {
            if rstate == state {
                self.runs.remove(&end);
                new_end = re;
            }
        }
        self.runs.insert(new_start, (new_end, state));
    }
}

/// The maximal runs of pages with equal, non-`None` permission inside the window [ws, we) of
/// `map`, as if [start, end) (inside the window) had permission `new_perm`: the memslots of the
/// window, as `(start, end, readonly)`.
///
/// The window must be bounded by permission changes (or the ends of RAM) on both sides, so the
/// runs returned are maximal in the whole map too.
pub fn slot_runs(
    map: &RangeMap<Perm>,
    ws: u64,
    we: u64,
    start: u64,
    end: u64,
    new_perm: Perm,
) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, Perm)> = Vec::new();
    let mut push = |s: u64, e: u64, perm: Perm| {
        if s >= e || perm == Perm::None {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == s && last.2 == perm => last.1 = e,
            _ => out.push((s, e, perm)),
        }
    };
    for r in map.overlapping(ws, start) {
        push(r.start, r.end, r.state);
    }
    push(start, end, new_perm);
    for r in map.overlapping(end, we) {
        push(r.start, r.end, r.state);
    }
    out.into_iter()
        .map(|(s, e, p)| (s, e, p == Perm::Read))
        .collect()
}

/// What an update does to the slot table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// Existing slots to delete (first).
    pub delete: Vec<SlotInfo>,
    /// New slots to create, as (gpa, len, readonly) (after the deletes).
    pub create: Vec<(u64, u64, bool)>,
}

/// The plan that turns the slots `old` of a window into the exposed runs `new` of that window:
/// slots that already match a run stay untouched, every other old slot is deleted and every other
/// run created.
pub fn diff(old: &[SlotInfo], new: &[(u64, u64, bool)]) -> SlotPlan {
    let mut plan = SlotPlan::default();
    for s in old {
        if !new
            .iter()
            .any(|&(g, e, ro)| g == s.gpa && e == s.end() && ro == s.readonly)
        {
            plan.delete.push(*s);
        }
    }
    for &(g, e, ro) in new {
        if !old
            .iter()
            .any(|s| s.gpa == g && s.end() == e && s.readonly == ro)
        {
            plan.create.push((g, e - g, ro));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::super::RangeState::{self, *};
    use super::*;

    /// 100 pages: 10 reserved, then 90 mapped.
    fn reserved_then_mapped() -> RangeMap<RangeState> {
        RangeMap::new(
            100,
            &[
                Run {
                    start: 0,
                    end: 10,
                    state: Reserved,
                },
                Run {
                    start: 10,
                    end: 100,
                    state: Mapped,
                },
            ],
        )
    }

    fn runs(m: &RangeMap<RangeState>) -> Vec<(u64, u64, RangeState)> {
        m.iter().map(|r| (r.start, r.end, r.state)).collect()
    }

    #[test]
    fn set_splits_and_merges() {
        let mut m = reserved_then_mapped();
        m.set(40, 50, Unmapped);
        assert_eq!(
            runs(&m),
            vec![
                (0, 10, Reserved),
                (10, 40, Mapped),
                (40, 50, Unmapped),
                (50, 100, Mapped)
            ]
        );
        m.set(50, 60, Unmapped);
        assert_eq!(
            runs(&m),
            vec![
                (0, 10, Reserved),
                (10, 40, Mapped),
                (40, 60, Unmapped),
                (60, 100, Mapped)
            ]
        );
        m.set(40, 60, Mapped);
        assert_eq!(runs(&m), vec![(0, 10, Reserved), (10, 100, Mapped)]);
        m.set(90, 100, Unmapped);
        assert_eq!(
            m.run_at(95),
            Some(Run {
                start: 90,
                end: 100,
                state: Unmapped
            })
        );
        assert_eq!(m.run_at(100), None);
        let o: Vec<_> = m
            .overlapping(5, 95)
            .map(|r| (r.start, r.end, r.state))
            .collect();
        assert_eq!(
            o,
            vec![(5, 10, Reserved), (10, 90, Mapped), (90, 95, Unmapped)]
        );
    }

    #[test]
    fn slot_runs_and_diff() {
        let m = RangeMap::new(
            100,
            &[Run {
                start: 0,
                end: 100,
                state: Perm::ReadWrite,
            }],
        );
        let new = slot_runs(&m, 0, 100, 40, 50, Perm::None);
        assert_eq!(new, vec![(0, 40, false), (50, 100, false)]);
        let old = [SlotInfo {
            slot: 0,
            gpa: 0,
            len: 100,
            readonly: false,
        }];
        let p = diff(&old, &new);
        assert_eq!(p.delete, old.to_vec());
        assert_eq!(p.create, vec![(0, 40, false), (50, 50, false)]);
        // A read-only range is a slot of its own, even between read-write neighbours.
        let new = slot_runs(&m, 0, 100, 40, 50, Perm::Read);
        assert_eq!(new, vec![(0, 40, false), (40, 50, true), (50, 100, false)]);
        // A slot that matches a new run is kept; one that differs only in its flag is not.
        let old = [
            SlotInfo {
                slot: 3,
                gpa: 0,
                len: 40,
                readonly: false,
            },
            SlotInfo {
                slot: 4,
                gpa: 50,
                len: 50,
                readonly: false,
            },
        ];
        let p = diff(&old, &[(0, 40, false), (50, 60, false)]);
        assert_eq!(p.delete, vec![old[1]]);
        assert_eq!(p.create, vec![(50, 10, false)]);
        let p = diff(&old, &[(0, 40, true), (50, 100, false)]);
        assert_eq!(p.delete, vec![old[0]]);
        assert_eq!(p.create, vec![(0, 40, true)]);
    }
}
