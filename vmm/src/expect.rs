//! Per-test violation expectations ([`veil_abi::Hc::ExpectViolation`]) and the VMM's own verdict:
//! at TestEnd the recorded violations must match the declared ones exactly, whatever the guest
//! says. Both the per-page tally and the failure message are bounded, so a violation storm
//! cannot grow them without limit.

use std::collections::BTreeMap;

use crate::report::{AccessKind, Violation};

/// Most expectations one test may declare.
pub const MAX_EXPECTATIONS: usize = 4096;
/// Most (page, kind) pairs one test's tally holds; violations on further pairs are counted
/// together (and fail the test: more pairs than any test may declare).
pub const MAX_TALLY: usize = 65_536;
/// Most differences a failure message names.
pub const MAX_PROBLEMS: usize = 16;

/// "`count` violations of kind `access` on the page at `page`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expectation {
    /// Page-aligned GPA.
    pub page: u64,
    /// Access kind.
    pub access: AccessKind,
    /// Number of violation exits.
    pub count: u64,
}

/// Violations counted per (page, access kind), at most [`MAX_TALLY`] pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pages: BTreeMap<(u64, AccessKind), u64>,
    /// Violations on pairs beyond [`MAX_TALLY`].
    untallied: u64,
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Adds one violation.
    pub fn count(&mut self, v: &Violation) {
        let key = (v.page(), v.access);
        if let Some(n) = self.pages.get_mut(&key) {
            *n += 1;
        } else if self.pages.len() < MAX_TALLY {
            self.pages.insert(key, 1);
        } else {
            self.untallied += 1;
        }
    }
}

/// Whether one more violation of `access` on `page` is still covered by `expected`: the declared
/// total for that (page, access) exceeds what `got` already counted.
pub fn declared(expected: &[Expectation], got: &Tally, page: u64, access: AccessKind) -> bool {
    let want: u64 = expected
        .iter()
        .filter(|e| e.page == page && e.access == access)
        .map(|e| e.count)
        .sum();
    want > got.pages.get(&(page, access)).copied().unwrap_or(0)
}

/// "on page 0x…", or "at an unknown address" for [`veil_abi::ADDRESS_UNKNOWN`]'s page.
fn on_page(page: u64) -> String {
    if page == veil_abi::ADDRESS_UNKNOWN & !0xfff {
        "at an unknown address".into()
    } else {
        format!("on page {page:#x}")
    }
}

/// Compares declared expectations with the violations a test produced (`got`). `Ok` if, for
/// every (page, access), the recorded number equals the declared total; otherwise a message
/// naming each difference.
///
/// At most [`MAX_PROBLEMS`] differences are named; the message says how many more there were.
pub fn check(expected: &[Expectation], got: &Tally) -> Result<(), String> {
    let mut want: BTreeMap<(u64, AccessKind), u64> = BTreeMap::new();
    for e in expected {
        *want.entry((e.page, e.access)).or_default() += e.count;
    }
    let mut problems = Vec::new();
    let mut unnamed = 0u64;
    let mut problem = |p: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        } else {
            unnamed += 1;
        }
    };
    for (&(page, access), &n) in &want {
        let g = got.pages.get(&(page, access)).copied().unwrap_or(0);
        if g != n {
            problem(format!(
                "expected {n} {} violation(s) {}, recorded {g}",
                access.name(),
                on_page(page)
            ));
        }
    }
    for (&(page, access), &g) in &got.pages {
        if !want.contains_key(&(page, access)) {
            problem(format!(
                "{g} unexpected {} violation(s) {}",
                access.name(),
                on_page(page)
            ));
        }
    }
    if got.untallied > 0 {
        problem(format!(
            "{} violation(s) on more than {MAX_TALLY} (page, kind) pairs, not tallied per page",
            got.untallied
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut m = problems.join("; ");
    if unnamed > 0 {
        m.push_str(&format!("; and {unnamed} more difference(s)"));
    }
    Err(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(vs: &[&Violation]) -> Tally {
        let mut t = Tally::new();
        for v in vs {
            t.count(v);
        }
        t
    }

    fn v(gpa: u64, access: AccessKind) -> Violation {
        Violation::sample(gpa, access, 8, 0)
    }

    #[test]
    fn exact_match_passes() {
        let a = v(0x40_0010, AccessKind::Read);
        let b = v(0x40_0ff8, AccessKind::Read);
        let e = [Expectation {
            page: 0x40_0000,
            access: AccessKind::Read,
            count: 2,
        }];
        assert_eq!(check(&e, &tally(&[&a, &b])), Ok(()));
        assert_eq!(check(&[], &tally(&[])), Ok(()));
    }

    #[test]
    fn declared_until_used_up() {
        let e = [Expectation {
            page: 0x40_0000,
            access: AccessKind::Read,
            count: 2,
        }];
        let a = v(0x40_0010, AccessKind::Read);
        assert!(declared(&e, &tally(&[]), 0x40_0000, AccessKind::Read));
        assert!(declared(&e, &tally(&[&a]), 0x40_0000, AccessKind::Read));
        assert!(!declared(
            &e,
            &tally(&[&a, &a]),
            0x40_0000,
            AccessKind::Read
        ));
        assert!(!declared(&e, &tally(&[]), 0x40_0000, AccessKind::Write));
        assert!(!declared(&e, &tally(&[]), 0x40_1000, AccessKind::Read));
    }

    #[test]
    fn differences_fail() {
        let a = v(0x40_0010, AccessKind::Read);
        let w = v(0x40_1000, AccessKind::Write);
        let e = [Expectation {
            page: 0x40_0000,
            access: AccessKind::Read,
            count: 2,
        }];
        let msg = check(&e, &tally(&[&a, &w])).unwrap_err();
        assert!(msg.contains("expected 2 read"), "{msg}");
        assert!(msg.contains("unexpected write"), "{msg}");
        assert!(check(&[], &tally(&[&a])).is_err());
        assert!(check(&e, &tally(&[])).is_err());
    }

    #[test]
    fn tally_and_message_stay_bounded() {
        let mut t = Tally::new();
        for i in 0..(MAX_TALLY as u64 + 10) {
            t.count(&v(i * 4096, AccessKind::Write));
        }
        t.count(&v(0, AccessKind::Write));
        assert_eq!(t.pages.len(), MAX_TALLY);
        assert_eq!(t.untallied, 10);
        assert_eq!(t.pages[&(0, AccessKind::Write)], 2);
        let msg = check(&[], &t).unwrap_err();
        assert!(msg.len() < 2048, "{} bytes", msg.len());
        assert!(
            msg.ends_with(&format!(
                "and {} more difference(s)",
                MAX_TALLY + 1 - MAX_PROBLEMS
            )),
            "{msg}"
        );
    }
}
