//! The isolation suite, one file per test group, plus helpers they share.

pub mod bad_hypercalls;
pub mod flips;
pub mod mapped;
pub mod oom;
pub mod reachability;
pub mod timing;
pub mod unmapped;
pub mod widths;
pub mod zeroing;

use crate::hc;
use crate::outcome::{Ctx, Fail};
use veil_abi::{ViolationRecord, POISON_BYTE};

/// Byte the VMM plants in unmapped pages: it must never reach the guest.
pub const SECRET: u8 = 0x5e;

/// `POISON_BYTE` repeated in a u64: what a load from unmapped memory returns.
pub const POISON64: u64 = u64::from_ne_bytes([POISON_BYTE; 8]);

/// Room for the violations one test reads back.
pub const MAX_RECORDS: usize = 64;

/// The violations of the current test: (total count, the records copied back).
pub fn violations(
    buf: &mut [ViolationRecord; MAX_RECORDS],
) -> Result<(u64, &[ViolationRecord]), Fail> {
    let total = hc::query_violations(buf).ctx("QueryViolations")?;
    let n = (total as usize).min(MAX_RECORDS);
    Ok((total, &buf[..n]))
}
