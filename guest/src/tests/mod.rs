//! The isolation suite, one file per test group, plus helpers they share.

pub mod asi;
pub mod bad_hypercalls;
pub mod control;
pub mod flips;
pub mod hc_fuzz;
pub mod inject;
pub mod mapped;
pub mod mermap;
pub mod oom;
pub mod protect;
pub mod reachability;
pub mod revocation;
pub mod smp;
pub mod stage2_checks;
pub mod timing;
pub mod unmapped;
pub mod widths;
pub mod zeroing;

use crate::hc;
use crate::outcome::{Ctx, Fail, Outcome};
use veil_abi::{ViolationRecord, HOST_EXPECT_SECRET, POISON_BYTE};

/// A host assertion that every byte of `[gpa, gpa+len)` still holds the VMM's planted secret
/// (judged by the VMM into the test's verdict).
pub fn expect_secret(gpa: u64, len: u64) -> Outcome {
    hc::host_expect(gpa, len, HOST_EXPECT_SECRET, len).ctx("HostExpect secret")
}

/// A host assertion that exactly `count` bytes of `[gpa, gpa+len)` equal `byte`.
pub fn expect_bytes(gpa: u64, len: u64, byte: u8, count: u64) -> Outcome {
    hc::host_expect(gpa, len, u64::from(byte), count).ctx("HostExpect")
}

/// `POISON_BYTE` repeated in a u64: what a load from unmapped memory returns.
pub const POISON64: u64 = u64::from_ne_bytes([POISON_BYTE; 8]);

/// Room for the violations one test reads back.
pub const MAX_RECORDS: usize = 64;

/// The one violation of the current test (a failure if there were none or more).
pub fn the_only_violation() -> Result<ViolationRecord, Fail> {
    let mut buf = [ViolationRecord::default(); MAX_RECORDS];
    let (total, recs) = violations(&mut buf)?;
    if total != 1 {
        crate::fail!("{total} violations recorded, expected exactly 1");
    }
    Ok(recs[0])
}

/// The violations of the current test: (total count, the records copied back).
pub fn violations(
    buf: &mut [ViolationRecord; MAX_RECORDS],
) -> Result<(u64, &[ViolationRecord]), Fail> {
    let total = hc::query_violations(buf).ctx("QueryViolations")?;
    let n = (total as usize).min(MAX_RECORDS);
    Ok((total, &buf[..n]))
}
