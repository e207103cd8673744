//! The registry of guest tests, in the order they run.
//!
//! Adding a test: write `pub fn my_test() -> Outcome` in a file under `tests/`, then add one
//! line `Test { name: "my_test", run: tests::file::my_test },` below. The VMM learns the name
//! through `TestAnnounce` at boot, so `veil list-tests` and `veil run --tests my_test` see it.

use crate::outcome::Outcome;
use crate::tests;

/// A named guest test.
pub struct Test {
    /// Name (`[a-z0-9_]+`, at most 64 bytes), as selected by `veil run --tests`.
    pub name: &'static str,
    /// The test body: `Ok(())` passes; `fail!`/`skip!` end it with a message.
    pub run: fn() -> Outcome,
}

/// Every test the guest offers, in run order.
pub static TESTS: &[Test] = &[
    Test {
        name: "mapped_rw",
        run: tests::mapped::mapped_rw,
    },
    Test {
        name: "unmapped_read_direct",
        run: tests::unmapped::unmapped_read_direct,
    },
    Test {
        name: "unmapped_write_direct",
        run: tests::unmapped::unmapped_write_direct,
    },
    Test {
        name: "unmapped_fetch",
        run: tests::unmapped::unmapped_fetch,
    },
    Test {
        name: "unmapped_widths",
        run: tests::widths::unmapped_widths,
    },
    Test {
        name: "flip_amortised",
        run: tests::flips::flip_amortised,
    },
    Test {
        name: "scrub_on_reuse",
        run: tests::flips::scrub_on_reuse,
    },
    Test {
        name: "bad_hypercalls",
        run: tests::bad_hypercalls::bad_hypercalls,
    },
    Test {
        name: "oom",
        run: tests::oom::oom,
    },
    Test {
        name: "hypercall_timing",
        run: tests::timing::hypercall_timing,
    },
];
