//! `unmapped_widths`: stray accesses of every width and form, plus one that straddles a mapped
//! and an unmapped page.
//!
//! Each access gets a page of its own in an order-4 unmapped block, so the violations it causes
//! can be told apart by GPA whatever order the VMM reports them in. The per-access counts given
//! to `ExpectViolation` follow how KVM delivers them on this host (a 16-byte access is two
//! 8-byte exits, `rep movsb`/`rep stosb` one exit per byte, a straddling access one exit for its
//! unmapped part only), but the guest-side checks do not depend on the split: for every access
//! they require that the records lie inside the bytes it touched, have its kind, and cover
//! exactly its unmapped bytes; and that no record falls anywhere else.

use super::{violations, MAX_RECORDS, POISON64};
use crate::dm::{self, Site};
use crate::hc;
use crate::outcome::{Ctx, Fail, Outcome};
use crate::pages::PageList;
use crate::{ensure, fail, skip};
use veil_abi::{gfp, Access, Status, ViolationRecord, PAGEBLOCK_SIZE, PAGE_SIZE};

/// Offset of each access inside its page.
const OFFSET: u64 = 0x40;
/// Bytes moved by the string instructions.
const REP_BYTES: usize = 8;
/// Value stored by the store cases.
const STORED: u64 = 0x7777_7777_7777_7777;

/// One access of the suite.
#[derive(Clone, Copy)]
struct Case {
    what: &'static str,
    access: Access,
    bytes: u64,
    /// Exits KVM is expected to deliver for it on this host.
    exits: u64,
}

const fn case(what: &'static str, access: Access, bytes: u64, exits: u64) -> Case {
    Case {
        what,
        access,
        bytes,
        exits,
    }
}

/// The accesses, in page order.
const CASES: [Case; 12] = [
    case("load 1", Access::Read, 1, 1),
    case("load 2", Access::Read, 2, 1),
    case("load 4", Access::Read, 4, 1),
    case("load 8", Access::Read, 8, 1),
    case("load 16 (movdqu)", Access::Read, 16, 2),
    case("store 1", Access::Write, 1, 1),
    case("store 2", Access::Write, 2, 1),
    case("store 4", Access::Write, 4, 1),
    case("store 8", Access::Write, 8, 1),
    case("store 16 (movdqu)", Access::Write, 16, 2),
    case(
        "rep movsb",
        Access::Read,
        REP_BYTES as u64,
        REP_BYTES as u64,
    ),
    case(
        "rep stosb",
        Access::Write,
        REP_BYTES as u64,
        REP_BYTES as u64,
    ),
];

/// Performs case `i` at `va`; checks a load's value (poison of the right width). Returns where
/// the accessing instruction is.
fn run_case(i: usize, va: u64) -> Result<Site, Fail> {
    let c = CASES[i];
    // SAFETY (all arms): `va` is in an unmapped page this test owns and expects violations on;
    // the VMM returns poison for loads and drops stores.
    let (loaded, site): (Option<u64>, Site) = unsafe {
        match i {
            0 => with_value(dm::load8(va)),
            1 => with_value(dm::load16(va)),
            2 => with_value(dm::load32(va)),
            3 => with_value(dm::load64(va)),
            4 => {
                let (v, site) = dm::load128(va);
                let (lo, hi) = (v[0], v[1]);
                ensure!(v == [POISON64; 2], "load 16 returned {lo:#x} {hi:#x}");
                (None, site)
            }
            5 => (None, dm::store8(va, STORED)),
            6 => (None, dm::store16(va, STORED)),
            7 => (None, dm::store32(va, STORED)),
            8 => (None, dm::store64(va, STORED)),
            9 => (None, dm::store128(va, [STORED; 2])),
            10 => {
                let mut buf = [0u8; REP_BYTES];
                let site = dm::rep_movsb_from(va, &mut buf);
                let want = [veil_abi::POISON_BYTE; REP_BYTES];
                ensure!(buf == want, "rep movsb copied {buf:02x?}");
                (None, site)
            }
            _ => (None, dm::rep_stosb(va, STORED as u8, REP_BYTES)),
        }
    };
    if let Some(v) = loaded {
        let want = POISON64 >> (64 - 8 * c.bytes);
        ensure!(v == want, "{} returned {v:#x}, expected {want:#x}", c.what);
    }
    Ok(site)
}

/// A load's result with its value marked as present.
fn with_value((v, site): (u64, Site)) -> (Option<u64>, Site) {
    (Some(v), site)
}

/// Checks the records of kind `access` inside `[page, page + 4096)`: each within
/// `[lo, lo + bytes)` and from the instruction at `site`, sizes adding up to `bytes`. Returns
/// how many there were.
fn check_records(
    recs: &[ViolationRecord],
    what: &str,
    page: u64,
    access: Access,
    (lo, bytes): (u64, u64),
    site: Site,
) -> Result<u64, Fail> {
    let (mut n, mut covered) = (0u64, 0u64);
    for r in recs
        .iter()
        .filter(|r| r.gpa & !(PAGE_SIZE - 1) == page && r.access == access as u8)
    {
        let end = r.gpa + r.size as u64;
        ensure!(
            r.gpa >= lo && end <= lo + bytes,
            "{what}: record {:#x}+{} outside the accessed bytes {lo:#x}+{bytes}",
            r.gpa,
            r.size
        );
        ensure!(
            site.matches(r.rip),
            "{what}: record rip {:#x}, the instruction is at {:#x}..{:#x}",
            r.rip,
            site.start,
            site.end
        );
        n += 1;
        covered += r.size as u64;
    }
    ensure!(n > 0, "{what}: no violation recorded");
    ensure!(
        covered == bytes,
        "{what}: records cover {covered} bytes, accessed {bytes} unmapped"
    );
    Ok(n)
}

/// 1/2/4/8/16-byte loads and stores, `rep movsb`, `rep stosb` and a straddling access.
pub fn unmapped_widths() -> Outcome {
    let mut block = PageList::new(1);
    let base = block
        .alloc(4, gfp::UNMAPPED)
        .ctx("alloc order-4 UNMAPPED")?;
    let len = 16 * PAGE_SIZE;
    hc::plant_secret(base, len).ctx("PlantSecret")?;

    let mut sites = [Site { start: 0, end: 0 }; CASES.len()];
    for (i, c) in CASES.iter().enumerate() {
        let page = base + i as u64 * PAGE_SIZE;
        hc::expect_violation(page, c.access, c.exits).ctx("ExpectViolation")?;
        sites[i] = run_case(i, dm::va(page + OFFSET))?;
    }
    let straddle = straddle()?;

    let mut buf = [ViolationRecord::default(); MAX_RECORDS];
    let (total, recs) = violations(&mut buf)?;
    ensure!(
        total as usize <= MAX_RECORDS,
        "{total} violations, more than expected"
    );
    let mut seen = 0;
    for (i, c) in CASES.iter().enumerate() {
        let page = base + i as u64 * PAGE_SIZE;
        let range = (page + OFFSET, c.bytes);
        seen += check_records(recs, c.what, page, c.access, range, sites[i])?;
    }
    let (page, range) = (straddle.unmapped_page, (straddle.unmapped_lo, 4));
    let (load, store) = (straddle.load, straddle.store);
    seen += check_records(recs, "straddling load", page, Access::Read, range, load)?;
    seen += check_records(recs, "straddling store", page, Access::Write, range, store)?;
    ensure!(
        seen == total,
        "{} violations outside the accessed bytes",
        total.abs_diff(seen)
    );

    super::expect_secret(base, len)?;
    block.free_all().ctx("free")?;
    Ok(())
}

/// Where the straddling accesses hit unmapped memory.
struct Straddle {
    unmapped_page: u64,
    unmapped_lo: u64,
    load: Site,
    store: Site,
}

/// Blocks held while looking for an unmapped pageblock next to a mapped one.
const MAX_BLOCKS: usize = 4096;
/// Held mapped blocks considered for giving one back.
const CANDIDATES: usize = 64;

/// An 8-byte load and store across the boundary between a mapped and an unmapped page.
///
/// Both pages must be ours. Alloc cannot ask for an address, so: take every whole free mapped
/// pageblock without flipping (order 9, `ATOMIC`), then take unmapped pageblocks until one is
/// adjacent to a mapped block we hold. If the unmapped ones run out first, give back one held
/// mapped block that has a held neighbour: it is then the only whole free pageblock, so the
/// next unmapped order-9 request must flip exactly it, next to its neighbour.
fn straddle() -> Result<Straddle, Fail> {
    let mut mapped = PageList::new(MAX_BLOCKS);
    let mut unmapped = PageList::new(MAX_BLOCKS);
    while !mapped.is_full() {
        match hc::alloc(9, gfp::ATOMIC) {
            Ok(g) => mapped.push(g, 9),
            Err(_) => break,
        }
    }
    let neighbour = |list: &PageList, u: u64| -> Option<u64> {
        (0..list.len())
            .map(|i| list.get(i).0)
            .find(|&m| m + PAGEBLOCK_SIZE == u || m == u + PAGEBLOCK_SIZE)
    };
    let mut gave_back = false;
    let (u, m) = loop {
        if unmapped.is_full() {
            skip!("no unmapped pageblock next to a mapped one within {MAX_BLOCKS} blocks");
        }
        match hc::alloc(9, gfp::UNMAPPED) {
            Ok(u) => {
                unmapped.push(u, 9);
                if let Some(m) = neighbour(&mapped, u) {
                    break (u, m);
                }
            }
            Err(Status::NoMemory | Status::NoFreePageblock) if !gave_back => {
                // Blocks handed out one after the other are usually adjacent: looking at the
                // first few keeps this O(n) in emulated instructions.
                let Some(i) = (0..mapped.len().min(CANDIDATES)).find(|&i| {
                    let g = mapped.get(i).0;
                    neighbour(&mapped, g).is_some()
                }) else {
                    skip!("no two adjacent mapped pageblocks to flip one of");
                };
                mapped.free_at(i).ctx("free mapped pageblock")?;
                gave_back = true;
            }
            Err(s) => fail!("alloc order-9 UNMAPPED: {s:?}"),
        }
    };
    // b: the boundary; the 8 bytes at b-4 are half mapped, half unmapped.
    let mapped_below = m + PAGEBLOCK_SIZE == u;
    let side = if mapped_below { "below" } else { "above" };
    let how = if gave_back {
        "after giving one back"
    } else {
        "directly"
    };
    hc::logf(format_args!(
        "straddle: unmapped {u:#x}, mapped {m:#x} {side}, found {how}"
    ));
    let b = if mapped_below { u } else { m };
    let (unmapped_page, unmapped_lo, mapped_lo) = if mapped_below {
        (b, b, b - 4)
    } else {
        (b - PAGE_SIZE, b - 4, b)
    };
    hc::plant_secret(unmapped_page, PAGE_SIZE).ctx("PlantSecret straddle")?;
    // SAFETY: [mapped_lo, +4) is in a mapped pageblock this test holds.
    unsafe { dm::store32(dm::va(mapped_lo), 0x1122_3344) };
    hc::expect_violation(unmapped_page, Access::Read, 1).ctx("ExpectViolation")?;
    hc::expect_violation(unmapped_page, Access::Write, 1).ctx("ExpectViolation")?;

    // SAFETY: half of the access is ours and mapped, the other half ours and unmapped
    // (an expected violation: poison for the load, dropped store).
    let (v, load) = unsafe { dm::load64(dm::va(b - 4)) };
    let want = if mapped_below {
        0xa5a5_a5a5_1122_3344
    } else {
        0x1122_3344_a5a5_a5a5
    };
    ensure!(
        v == want,
        "straddling load returned {v:#x}, expected {want:#x}"
    );

    // SAFETY: as above.
    let store = unsafe { dm::store64(dm::va(b - 4), 0x99aa_bbcc_5566_7788) };
    // SAFETY: mapped and ours.
    let (half, _) = unsafe { dm::load32(dm::va(mapped_lo)) };
    let want = if mapped_below {
        0x5566_7788
    } else {
        0x99aa_bbcc
    };
    ensure!(
        half == want,
        "mapped half holds {half:#x} after the straddling store, expected {want:#x}"
    );
    super::expect_secret(unmapped_page, PAGE_SIZE)?;
    unmapped.free_all().ctx("free unmapped")?;
    mapped.free_all().ctx("free mapped")?;
    Ok(Straddle {
        unmapped_page,
        unmapped_lo,
        load,
        store,
    })
}
