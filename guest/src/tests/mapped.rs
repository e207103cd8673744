//! `mapped_rw`: ordinary pages work through the direct map, with zero violations.

use super::{violations, MAX_RECORDS};
use crate::dm;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::pages::PageList;
use crate::{ensure, fail};
use veil_abi::{gfp, ViolationRecord, PAGE_SIZE};

/// Byte the guest stores and the host must see.
const GUEST_BYTE: u8 = 0x5a;
/// Byte the host stores and the guest must see.
const HOST_BYTE: u8 = 0xc3;

/// Guest stores reach the host, host stores reach the guest, `__GFP_ZERO` zeroes, no violation.
pub fn mapped_rw() -> Outcome {
    let mut pages = PageList::new(2);
    let a = pages.alloc(0, 0).ctx("alloc order 0")?;
    let b = pages.alloc(3, gfp::ZERO).ctx("alloc order 3 ZERO")?;
    let b_len = 8 * PAGE_SIZE;

    let zeros = hc::host_count(b, b_len, 0).ctx("HostCount zero")?;
    ensure!(
        zeros == b_len,
        "GFP_ZERO block has {zeros} zero bytes of {b_len}"
    );

    // Guest writes every qword of `a` through the direct map; the host must see all of them.
    let word = u64::from_ne_bytes([GUEST_BYTE; 8]);
    let base = dm::va(a);
    for off in (0..PAGE_SIZE).step_by(8) {
        // SAFETY: `a` is a mapped page this test owns.
        unsafe { dm::store64(base + off, word) };
    }
    let seen = hc::host_count(a, PAGE_SIZE, GUEST_BYTE).ctx("HostCount guest bytes")?;
    ensure!(
        seen == PAGE_SIZE,
        "host sees {seen} of {PAGE_SIZE} guest-written bytes"
    );
    for off in [0, 8, 0x7f8, 0xff8] {
        // SAFETY: as above.
        let (v, _) = unsafe { dm::load64(base + off) };
        ensure!(v == word, "read back {v:#x} at +{off:#x}, wrote {word:#x}");
    }

    // The host writes `b`; the guest must read it at every page, first and last qword.
    hc::host_fill(b, b_len, HOST_BYTE).ctx("HostFill")?;
    let host_word = u64::from_ne_bytes([HOST_BYTE; 8]);
    for page in 0..8 {
        for off in [0, PAGE_SIZE - 8] {
            let gpa = b + page * PAGE_SIZE + off;
            // SAFETY: `b` is an order-3 mapped block this test owns.
            let (v, _) = unsafe { dm::load64(dm::va(gpa)) };
            ensure!(
                v == host_word,
                "guest reads {v:#x} at {gpa:#x}, host wrote {host_word:#x}"
            );
        }
    }

    let mut buf = [ViolationRecord::default(); MAX_RECORDS];
    let (total, recs) = violations(&mut buf)?;
    if total != 0 {
        let r = recs.first().copied().unwrap_or_default();
        fail!("{total} violations on mapped pages (first at {:#x})", r.gpa);
    }
    pages.free_all().ctx("free")?;
    Ok(())
}
