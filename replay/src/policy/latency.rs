//! Allocation latency per path: the fast path (no stage-2 change), a flip (the request changed
//! stage 2: a pageblock flip, or the migrations of `--compaction` with it) and a failure.
//!
//! The model's cost unit: 1 per request, plus 1 per stage-2 call it made (unmap, map or zero),
//! plus 1 per 64 pages those calls named (the work of a flip grows with the pages zeroed and
//! remapped). With `--kvm` (timed runs) each request's wall time is measured too, stage-2
//! ioctls included.

use std::time::Instant;

use allocator::Stage2;
use serde::Serialize;

use crate::tracker::{Stage2Stats, Tracker};

/// Percentiles of one path.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub samples: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// Of `v` (sorted here).
    pub fn of(v: &mut [u32]) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_unstable();
        let at = |q: f64| u64::from(v[((v.len() - 1) as f64 * q).round() as usize]);
        Percentiles {
            samples: v.len() as u64,
            p50: at(0.5),
            p99: at(0.99),
            max: u64::from(v[v.len() - 1]),
        }
    }
}

/// One path in cost units and (timed runs) nanoseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct PathLatency {
    /// Model cost units.
    pub units: Percentiles,
    /// Measured nanoseconds (`--kvm` only).
    pub ns: Option<Percentiles>,
}

/// Latency per path.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct LatencyReport {
    /// Requests served without a stage-2 change.
    pub fast: PathLatency,
    /// Requests served with one.
    pub flip: PathLatency,
    /// Failed requests.
    pub failure: PathLatency,
}

/// What a request started from.
pub(crate) struct Start {
    stats: Stage2Stats,
    t: Option<Instant>,
}

/// Collects one sample per request.
pub(crate) struct Recorder {
    on: bool,
    timed: bool,
    units: [Vec<u32>; 3],
    ns: [Vec<u32>; 3],
}

impl Recorder {
    /// Record if `on`; measure time if `timed`.
    pub(crate) fn new(on: bool, timed: bool) -> Self {
        Recorder {
            on,
            timed: on && timed,
            units: Default::default(),
            ns: Default::default(),
        }
    }

    /// Before a request.
    pub(crate) fn start<S: Stage2>(&self, t: &mut Tracker<S>) -> Start {
        Start {
            stats: if self.on {
                t.stats()
            } else {
                Stage2Stats::default()
            },
            t: self.timed.then(Instant::now),
        }
    }

    /// After it.
    pub(crate) fn finish<S: Stage2>(&mut self, t: &mut Tracker<S>, s: Start, ok: bool) {
        if !self.on {
            return;
        }
        let ns = s.t.map(|t0| t0.elapsed().as_nanos());
        let a = s.stats;
        let b = t.stats();
        let calls = b.updates() + b.zero_calls - a.updates() - a.zero_calls;
        let pages = b.pages_unmapped + b.pages_mapped + b.pages_zeroed
            - a.pages_unmapped
            - a.pages_mapped
            - a.pages_zeroed;
        let path = if !ok {
            2
        } else if b.updates() > a.updates() {
            1
        } else {
            0
        };
        let units = 1 + calls + pages / 64;
        self.units[path].push(u32::try_from(units).unwrap_or(u32::MAX));
        if let Some(ns) = ns {
            self.ns[path].push(u32::try_from(ns).unwrap_or(u32::MAX));
        }
    }

    /// The percentiles (None when not recording).
    pub(crate) fn report(&mut self) -> Option<LatencyReport> {
        if !self.on {
            return None;
        }
        let timed = self.timed;
        let mut path = |i: usize| PathLatency {
            units: Percentiles::of(&mut self.units[i]),
            ns: timed.then(|| Percentiles::of(&mut self.ns[i])),
        };
        Some(LatencyReport {
            fast: path(0),
            flip: path(1),
            failure: path(2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.samples, p.p50, p.p99, p.max), (100, 51, 99, 100));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
