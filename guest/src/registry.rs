//! The registry of guest tests, in the order they run.
//!
//! Adding a test: write `pub fn my_test() -> Outcome` in a file under `tests/`, then add one
//! line `Test::new("my_test", tests::file::my_test),` below. The VMM learns the name
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

impl Test {
    /// A registry entry.
    const fn new(name: &'static str, run: fn() -> Outcome) -> Test {
        Test { name, run }
    }
}

/// Every test the guest offers, in run order (one line each, hence no rustfmt).
#[rustfmt::skip]
pub static TESTS: &[Test] = &[
    Test::new("mapped_rw", tests::mapped::mapped_rw),
    Test::new("unmapped_read_direct", tests::unmapped::unmapped_read_direct),
    Test::new("unmapped_write_direct", tests::unmapped::unmapped_write_direct),
    Test::new("unmapped_fetch", tests::unmapped::unmapped_fetch),
    Test::new("unmapped_widths", tests::widths::unmapped_widths),
    Test::new("flip_amortised", tests::flips::flip_amortised),
    Test::new("atomic_no_flip", tests::flips::atomic_no_flip),
    Test::new("scrub_on_reuse", tests::flips::scrub_on_reuse),
    Test::new("zeroing", tests::zeroing::zeroing),
    Test::new("bad_hypercalls", tests::bad_hypercalls::bad_hypercalls),
    Test::new("hc_fuzz", tests::hc_fuzz::hc_fuzz),
    Test::new("oom", tests::oom::oom),
    Test::new("protect_readonly", tests::protect::protect_readonly),
    Test::new("protect_image", tests::protect::protect_image),
    Test::new("hypercall_timing", tests::timing::hypercall_timing),
    Test::new("reachability", tests::reachability::reachability),
    Test::new("stage2_verify", tests::stage2_checks::stage2_verify),
    Test::new("sweep", tests::stage2_checks::sweep),
    Test::new("cross_vcpu_isolation", tests::smp::cross_vcpu_isolation),
    Test::new("concurrent_alloc", tests::smp::concurrent_alloc),
    Test::new("flip_under_reader", tests::smp::flip_under_reader),
    Test::new("smp_wake", tests::smp::smp_wake),
    Test::new("revocation_latency", tests::revocation::revocation_latency),
    Test::new("asi_restricted", tests::asi::asi_restricted),
    Test::new("asi_unmapped_both", tests::asi::asi_unmapped_both),
    Test::new("asi_nonsensitive", tests::asi::asi_nonsensitive),
    Test::new("asi_declassify_zeroes", tests::asi::asi_declassify_zeroes),
    Test::new("asi_transitions", tests::asi::asi_transitions),
    Test::new("asi_smp", tests::asi::asi_smp),
    Test::new("mermap_basic", tests::mermap::mermap_basic),
    Test::new("mermap_size_edges", tests::mermap::mermap_size_edges),
    Test::new("mermap_exhaustion", tests::mermap::mermap_exhaustion),
    Test::new("mermap_stale_until_wrap", tests::mermap::mermap_stale_until_wrap),
    Test::new("mermap_flush_per_wrap", tests::mermap::mermap_flush_per_wrap),
    Test::new("mermap_vcpu_isolation", tests::mermap::mermap_vcpu_isolation),
    Test::new("inject", tests::inject::inject),
    Test::new("violation_latency", tests::inject::violation_latency),
    Test::new("control_wait", tests::control::control_wait),
];
