//! Violation storms: past the cap on full records, violations are aggregated by (test, page,
//! kind, RIP) with counts, in a table that is itself capped; past both caps they are only
//! counted. The VMM's memory stays bounded however many violations a guest causes.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{AccessKind, Violation};

/// Most (test, page, kind, RIP) groups kept once the full records are capped.
pub const MAX_AGGREGATES: usize = 100_000;

/// Violations of one (test, page, kind, RIP) group beyond the full records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ViolationAggregate {
    /// Page-aligned GPA ([`Violation::page`]: `ADDRESS_UNKNOWN`'s page for unknown addresses).
    pub page: u64,
    /// Load, store or fetch.
    pub access: AccessKind,
    /// Guest RIP (as in [`Violation::rip`]).
    pub rip: u64,
    /// `rip` as `function+0xoff` (null without symbols).
    pub rip_symbol: Option<String>,
    /// Test running at the time.
    pub test: Option<String>,
    /// Violations in this group.
    pub count: u64,
    /// Bytes they accessed.
    pub bytes: u64,
}

/// How the report's violations were kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ViolationSummary {
    /// Violations kept as full records (`violations[]`).
    pub kept: u64,
    /// Cap on full records.
    pub record_cap: u64,
    /// Violations past the record cap, aggregated into `violations_aggregated[]`.
    pub aggregated: u64,
    /// Groups in `violations_aggregated[]`.
    pub groups: u64,
    /// Cap on groups.
    pub group_cap: u64,
    /// Violations past both caps: counted in the totals only.
    pub counted_only: u64,
}

impl ViolationSummary {
    /// One line saying what was aggregated, if anything was.
    pub fn storm_line(&self) -> Option<String> {
        (self.aggregated + self.counted_only > 0).then(|| {
            format!(
                "violation storm: {} violations kept in full (cap {}), {} more aggregated into {} \
                 (test, page, kind, rip) groups with counts (cap {}, in the JSON report's \
                 violations_aggregated[]), {} counted only",
                self.kept,
                self.record_cap,
                self.aggregated,
                self.groups,
                self.group_cap,
                self.counted_only
            )
        })
    }
}

/// The bounded (test, page, kind, RIP) table.
#[derive(Debug, Default)]
pub struct Aggregator {
    groups: BTreeMap<(u32, u64, AccessKind, u64), (u64, u64)>,
    aggregated: u64,
    counted_only: u64,
}

impl Aggregator {
    /// Adds `v`, which ran during test number `test` (`u32::MAX`: outside any test).
    pub fn add(&mut self, test: u32, v: &Violation) {
        let key = (test, v.page(), v.access, v.rip);
        let full = self.groups.len() >= MAX_AGGREGATES;
        match self.groups.get_mut(&key) {
            Some(g) => {
                g.0 += 1;
                g.1 += u64::from(v.size);
            }
            None if full => {
                self.counted_only += 1;
                return;
            }
            None => {
                self.groups.insert(key, (1, u64::from(v.size)));
            }
        }
        self.aggregated += 1;
    }

    /// The groups (test numbers resolved through `tests`) and the summary, given the number
    /// of full records kept and their cap.
    pub fn finish(
        self,
        tests: &[String],
        kept: u64,
        record_cap: usize,
    ) -> (Vec<ViolationAggregate>, ViolationSummary) {
        let summary = ViolationSummary {
            kept,
            record_cap: record_cap as u64,
            aggregated: self.aggregated,
            groups: self.groups.len() as u64,
            group_cap: MAX_AGGREGATES as u64,
            counted_only: self.counted_only,
        };
        let groups = self
            .groups
            .into_iter()
            .map(
                |((t, page, access, rip), (count, bytes))| ViolationAggregate {
                    page,
                    access,
                    rip,
                    rip_symbol: None,
                    test: tests.get(t as usize).cloned(),
                    count,
                    bytes,
                },
            )
            .collect();
        (groups, summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(gpa: u64, rip: u64) -> Violation {
        Violation::sample(gpa, AccessKind::Read, 8, rip)
    }

    #[test]
    fn groups_by_page_kind_rip_and_caps_the_table() {
        let mut a = Aggregator::default();
        a.add(0, &v(0x1008, 1));
        a.add(0, &v(0x1ff0, 1));
        a.add(0, &v(0x1000, 2));
        a.add(u32::MAX, &v(0x1000, 2));
        for i in 0..MAX_AGGREGATES as u64 {
            a.add(1, &v(0x10_0000 + i * 4096, 9));
        }
        let tests = ["t0".to_string(), "t1".to_string()];
        let (g, s) = a.finish(&tests, 5, 5);
        assert_eq!(s.groups, MAX_AGGREGATES as u64);
        assert_eq!(s.aggregated + s.counted_only, 4 + MAX_AGGREGATES as u64);
        assert_eq!(s.counted_only, 3);
        assert_eq!(g[0].count, 2);
        assert_eq!(g[0].bytes, 16);
        assert_eq!(g[0].test.as_deref(), Some("t0"));
        assert!(g.iter().any(|x| x.test.is_none()));
    }
}
