//! Per-test violation expectations ([`veil_abi::Hc::ExpectViolation`]) and the VMM's own verdict:
//! at TestEnd the recorded violations must match the declared ones exactly, whatever the guest
//! says.

use std::collections::BTreeMap;

use crate::report::{AccessKind, Violation};

/// Most expectations one test may declare.
pub const MAX_EXPECTATIONS: usize = 4096;

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

/// Violations counted per (page, access kind).
pub type Tally = BTreeMap<(u64, AccessKind), u64>;

/// Adds one violation to a tally.
pub fn count(t: &mut Tally, v: &Violation) {
    *t.entry((v.gpa & !0xfff, v.access)).or_default() += 1;
}

/// Whether one more violation of `access` on `page` is still covered by `expected`: the declared
/// total for that (page, access) exceeds what `got` already counted.
pub fn declared(expected: &[Expectation], got: &Tally, page: u64, access: AccessKind) -> bool {
    let want: u64 = expected
        .iter()
        .filter(|e| e.page == page && e.access == access)
        .map(|e| e.count)
        .sum();
    want > got.get(&(page, access)).copied().unwrap_or(0)
}

/// Compares declared expectations with the violations a test produced (`got`). `Ok` if, for
/// every (page, access), the recorded number equals the declared total; otherwise a message
/// naming each difference.
pub fn check(expected: &[Expectation], got: &Tally) -> Result<(), String> {
    let mut want: Tally = BTreeMap::new();
    for e in expected {
        *want.entry((e.page, e.access)).or_default() += e.count;
    }
    let mut problems = Vec::new();
    for (&(page, access), &n) in &want {
        let g = got.get(&(page, access)).copied().unwrap_or(0);
        if g != n {
            problems.push(format!(
                "expected {n} {} violation(s) on page {page:#x}, recorded {g}",
                access.name()
            ));
        }
    }
    for (&(page, access), &g) in got {
        if !want.contains_key(&(page, access)) {
            problems.push(format!(
                "{g} unexpected {} violation(s) on page {page:#x}",
                access.name()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ViolationAction;

    fn tally(vs: &[&Violation]) -> Tally {
        let mut t = Tally::new();
        for v in vs {
            count(&mut t, v);
        }
        t
    }

    fn v(gpa: u64, access: AccessKind) -> Violation {
        Violation {
            gpa,
            access,
            size: 8,
            rip: 0,
            vcpu: 0,
            freetype: None,
            freetype_index: 0xff,
            owner: "allocated",
            test: None,
            action: ViolationAction::Poisoned,
        }
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
}
