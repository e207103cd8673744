//! The TLB-flush model: which stage-2 changes cost a shootdown, on which architecture.
//!
//! On x86 adding a direct-map entry needs no TLB shootdown (no CPU can hold a stale entry for
//! a translation that did not exist), only removals do; arm64's break-before-make rule makes
//! every change of a live mapping flush, additions included. A shootdown on a machine with N
//! CPUs interrupts the other N - 1 ([`FlushStats::ipis`]).

use serde::Serialize;

/// The architecture whose flush rules apply (`--arch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Removals flush, additions do not.
    #[default]
    X86,
    /// Break-before-make: removals and additions both flush.
    Arm64,
}

impl Arch {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86 => "x86",
            Arch::Arm64 => "arm64",
        }
    }

    /// Whether adding entries (a map) flushes.
    pub fn additions_flush(self) -> bool {
        self == Arch::Arm64
    }

    /// The rule in words.
    pub fn rule(self) -> &'static str {
        match self {
            Arch::X86 => "x86: removals flush, additions do not",
            Arch::Arm64 => "arm64 break-before-make: removals and additions flush",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a policy's stage-2 changes turn into shootdowns.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct FlushStats {
    /// The rules applied.
    pub arch: Arch,
    /// Removals (unmap calls) that succeeded.
    pub removals: u64,
    /// Additions (map calls) that succeeded.
    pub additions: u64,
    /// TLB shootdowns issued.
    pub shootdowns: u64,
    /// Removals batched: a shootdown covers up to this many pages (`per-page-batched`), else 0.
    pub batch_pages: u64,
    /// Of the shootdowns, those forced early because a page with a pending removal was reused.
    pub forced_by_reuse: u64,
    /// Shootdowns per 1,000 allocations.
    pub shootdowns_per_1k_allocs: f64,
    /// CPUs each shootdown reaches (`--cpus`; default: the trace's CPUs).
    pub cpus: u32,
    /// Inter-processor interrupts: each shootdown interrupts the other `cpus - 1` CPUs.
    pub ipis: u64,
    /// IPIs per 1,000 allocations.
    pub ipis_per_1k_allocs: f64,
}

impl FlushStats {
    /// Fill the derived figures for `allocs` allocations and `cpus` CPUs.
    pub fn finish(&mut self, allocs: u64, cpus: u32) {
        let per_1k = |x: u64| {
            if allocs == 0 {
                0.0
            } else {
                x as f64 * 1000.0 / allocs as f64
            }
        };
        self.cpus = cpus;
        self.ipis = self.shootdowns * u64::from(cpus.saturating_sub(1));
        self.shootdowns_per_1k_allocs = per_1k(self.shootdowns);
        self.ipis_per_1k_allocs = per_1k(self.ipis);
    }
}

/// Removals waiting for one batched shootdown.
#[derive(Clone, Debug, Default)]
pub struct PendingFlush {
    /// Pages per shootdown (0: no batching, every removal flushes at once).
    pub batch_pages: u64,
    ranges: Vec<(u64, u64)>,
    pages: u64,
}

impl PendingFlush {
    /// A batch of up to `batch_pages` pages (0: none).
    pub fn new(batch_pages: u64) -> Self {
        PendingFlush {
            batch_pages,
            ..Default::default()
        }
    }

    /// Note a removal of `[pfn, pfn + count)`; true if a shootdown is due now.
    pub fn add(&mut self, pfn: u64, count: u64) -> bool {
        if self.batch_pages == 0 {
            return true;
        }
        self.ranges.push((pfn, count));
        self.pages += count;
        if self.pages >= self.batch_pages {
            self.clear();
            return true;
        }
        false
    }

    /// Whether a removal of a page in `[pfn, pfn + count)` is still waiting for its shootdown.
    pub fn overlaps(&self, pfn: u64, count: u64) -> bool {
        let end = pfn.saturating_add(count);
        self.ranges
            .iter()
            .any(|&(p, c)| p < end && pfn < p.saturating_add(c))
    }

    /// Whether anything waits.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Drop the waiting removals (their shootdown was issued).
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.pages = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_reuse() {
        let mut p = PendingFlush::new(4);
        assert!(!p.add(10, 1));
        assert!(!p.add(20, 2));
        assert!(p.overlaps(21, 1) && !p.overlaps(22, 5) && !p.overlaps(0, 10));
        assert!(p.add(30, 1), "the fourth page fills the batch");
        assert!(p.is_empty());
        assert!(
            PendingFlush::new(0).add(1, 1),
            "unbatched: every removal flushes"
        );
        let mut f = FlushStats {
            shootdowns: 10,
            ..Default::default()
        };
        f.finish(2000, 4);
        assert_eq!(
            (f.ipis, f.shootdowns_per_1k_allocs, f.ipis_per_1k_allocs),
            (30, 5.0, 15.0)
        );
    }
}
