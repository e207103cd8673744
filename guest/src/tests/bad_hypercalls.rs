//! `bad_hypercalls`: every malformed call gets its own error code, changes nothing, and the
//! allocator's invariants still hold afterwards.

use crate::boot;
use crate::hc;
use crate::outcome::{Ctx, Fail, Outcome};
use crate::pages::PageList;
use crate::{ensure, fail};
use veil_abi::{gfp, Hc, Status, PAGE_SIZE};

/// One malformed call and the answers it may get.
struct Case {
    what: &'static str,
    nr: u32,
    args: [u64; 4],
    want: &'static [Status],
}

const fn case(what: &'static str, nr: u32, args: [u64; 4], want: &'static [Status]) -> Case {
    Case {
        what,
        nr,
        args,
        want,
    }
}

use Status::{
    BadAddress, BadArgument, BadFlags, BadOrder, Misaligned, NotAllocated, UnknownCall,
    Unreachable, WrongOrder,
};

/// Runs one case; a call that unexpectedly succeeded allocating is undone.
fn check(c: &Case) -> Result<(), Fail> {
    // SAFETY: every pointer argument in the table is either outside the reserved memory (the
    // VMM must refuse it) or points at `SCRATCH`, which nothing else uses.
    let r = unsafe { hc::raw(c.nr, c.args[0], c.args[1], c.args[2], c.args[3]) };
    let got = Status::from_u64(r.status);
    if got == Some(Status::Ok) && (c.nr == Hc::Alloc as u32 || c.nr == Hc::AllocSpecial as u32) {
        let order = if c.nr == Hc::Alloc as u32 {
            c.args[0]
        } else {
            c.args[2]
        };
        let _ = hc::free(r.r0, order as u8);
    }
    match got {
        Some(s) if c.want.contains(&s) => Ok(()),
        Some(s) => fail!("{}: got {s:?}, expected {:?}", c.what, c.want[0]),
        None => fail!("{}: unknown status code {}", c.what, r.status),
    }
}

/// A buffer in reserved memory the VMM may legitimately write (for the bad-length cases).
static mut SCRATCH: [u8; 256] = [0; 256];

/// Malformed calls of every kind, each with its specific status.
pub fn bad_hypercalls() -> Outcome {
    let info = boot::info();
    let s0 = hc::stats().ctx("Stats")?;
    let mut pages = PageList::new(2);
    // An order-1 block we own, for wrong-order, misaligned and double-free cases.
    let p = pages.alloc(1, 0).ctx("alloc order 1")?;
    // An unmapped page we own: nothing may read it back for us.
    let u = pages.alloc(0, gfp::UNMAPPED).ctx("alloc unmapped")?;
    let scratch = core::ptr::addr_of_mut!(SCRATCH) as u64;
    // A managed page that is certainly not ours: the last managed page, unless it is in `p`.
    let mut not_ours = info.managed_end - PAGE_SIZE;
    if (p..p + 2 * PAGE_SIZE).contains(&not_ours) {
        not_ours = info.managed_start;
    }
    let ram = info.ram_size;
    let huge = 1u64 << 40;
    let top_page = !(PAGE_SIZE - 1);
    let (alloc, special, free) = (Hc::Alloc as u32, Hc::AllocSpecial as u32, Hc::Free as u32);
    let (log, stats, query) = (Hc::Log as u32, Hc::Stats as u32, Hc::QueryViolations as u32);
    let (fill, count) = (Hc::HostFill as u32, Hc::HostCount as u32);
    let (hexpect, plant) = (Hc::HostExpect as u32, Hc::PlantSecret as u32);
    let revocation = Hc::ReportRevocation as u32;
    let (gdt, pt) = (veil_abi::GDT_GPA, veil_abi::PAGE_TABLES_GPA);
    let secret = veil_abi::HOST_EXPECT_SECRET;
    let addr_or_len: &[Status] = &[BadAddress, BadArgument];

    let expect = Hc::ExpectViolation as u32;
    let end = Hc::TestEnd as u32;
    #[rustfmt::skip]
    let cases = [
        case("first unknown call", Hc::FIRST_UNUSED, [0; 4], &[UnknownCall]),
        case("unknown call 0xffffffff", u32::MAX, [0; 4], &[UnknownCall]),
        case("wake the first vCPU past the last", Hc::Wake as u32, [u64::from(crate::smp::cpus()), 0, 0, 0], &[BadArgument]),
        case("wake vCPU u64::MAX", Hc::Wake as u32, [u64::MAX, 0, 0, 0], &[BadArgument]),
        case("alloc order 11", alloc, [11, 0, 0, 0], &[BadOrder]),
        case("alloc order 255", alloc, [255, 0, 0, 0], &[BadOrder]),
        case("alloc order u64::MAX", alloc, [u64::MAX, 0, 0, 0], &[BadOrder]),
        case("alloc lowest unknown gfp bit", alloc, [0, gfp::ALL + 1, 0, 0], &[BadFlags]),
        case("alloc gfp all ones", alloc, [0, u64::MAX, 0, 0], &[BadFlags]),
        case("alloc_special first unknown context", special, [veil_abi::context::FIRST_UNUSED, 0, 0, 0], &[BadFlags]),
        case("alloc_special context max", special, [u64::MAX, 0, 0, 0], &[BadFlags]),
        case("alloc_special unknown gfp", special, [0, 1 << 7, 0, 0], &[BadFlags]),
        case("alloc_special order 11", special, [0, 0, 11, 0], &[BadOrder]),
        case("free never allocated", free, [not_ours, 0, 0, 0], &[NotAllocated]),
        case("free reserved (image)", free, [0x20_0000, 0, 0, 0], &[BadAddress]),
        case("free GPA 0", free, [0, 0, 0, 0], &[BadAddress]),
        case("free at end of RAM", free, [ram, 0, 0, 0], &[BadAddress]),
        case("free far above RAM", free, [ram + huge, 0, 0, 0], &[BadAddress]),
        case("free top page", free, [top_page, 0, 0, 0], &[BadAddress]),
        case("free order 11", free, [p, 11, 0, 0], &[BadOrder]),
        case("free wrong order", free, [p, 0, 0, 0], &[WrongOrder]),
        case("free misaligned byte", free, [p + 1, 1, 0, 0], &[Misaligned]),
        case("free misaligned for order", free, [p + PAGE_SIZE, 1, 0, 0], &[Misaligned]),
        case("log from managed memory", log, [not_ours, 8, 0, 0], &[BadAddress]),
        case("log from u64::MAX", log, [u64::MAX, 1, 0, 0], &[BadAddress]),
        case("log wrapping around", log, [u64::MAX - 3, 8, 0, 0], &[BadAddress]),
        case("log huge length", log, [scratch, huge, 0, 0], addr_or_len),
        case("stats into managed memory", stats, [not_ours, 0, 0, 0], &[BadAddress]),
        case("stats into u64::MAX", stats, [u64::MAX, 0, 0, 0], &[BadAddress]),
        case("query into managed memory", query, [not_ours, 4, 0, 0], &[BadAddress]),
        case("query into u64::MAX", query, [u64::MAX, 4, 0, 0], &[BadAddress]),
        case("query huge max", query, [scratch, huge, 0, 0], addr_or_len),
        case("stats over the TSS", stats, [0, 0, 0, 0], &[BadAddress]),
        case("stats over the GDT", stats, [gdt, 0, 0, 0], &[BadAddress]),
        case("stats over BootInfo", stats, [0x2000, 0, 0, 0], &[BadAddress]),
        case("stats over page tables", stats, [pt, 0, 0, 0], &[BadAddress]),
        case("stats into page tables", stats, [pt - 8, 0, 0, 0], &[BadAddress]),
        case("query over the GDT", query, [gdt, 1, 0, 0], &[BadAddress]),
        case("query into page tables", query, [pt - 24, 2, 0, 0], &[BadAddress]),
        case("host_fill not ours", fill, [not_ours, 16, 0, 0], &[NotAllocated]),
        case("host_fill reserved", fill, [0x2000, 16, 0, 0], &[BadAddress]),
        case("host_fill huge", fill, [p, huge, 0, 0], addr_or_len),
        case("host_fill byte 256", fill, [p, 16, 256, 0], &[BadArgument]),
        case("host_count not ours", count, [not_ours, 16, 0, 0], &[NotAllocated]),
        case("host_count past RAM", count, [top_page, 2 * PAGE_SIZE, 0, 0], &[BadAddress]),
        case("host_count unmapped page", count, [u, 16, 0, 0], &[Unreachable]),
        case("host_count half unmapped", count, [u, PAGE_SIZE, 0xa5, 0], &[Unreachable]),
        case("host_expect not ours", hexpect, [not_ours, 16, 0, 0], &[NotAllocated]),
        case("host_expect reserved", hexpect, [0x2000, 16, 0, 16], &[BadAddress]),
        case("host_expect huge", hexpect, [p, huge, 0, 0], addr_or_len),
        case("host_expect what 0x101", hexpect, [u, 16, secret + 1, 0], &[BadArgument]),
        case("host_expect count > len", hexpect, [u, 16, 0, 17], &[BadArgument]),
        case("host_expect length 0", hexpect, [u, 0, 0, 0], &[BadArgument]),
        case("revocation stale > reads", revocation, [1, 1, 1, 2], &[BadArgument]),
        case("plant_secret not ours", plant, [not_ours, 16, 0, 0], &[NotAllocated]),
        case("plant_secret reserved", plant, [0x2000, 16, 0, 0], &[BadAddress]),
        case("plant_secret huge", plant, [p, huge, 0, 0], addr_or_len),
        case("plant_secret past RAM", plant, [top_page, 2 * PAGE_SIZE, 0, 0], &[BadAddress]),
        case("expect_violation access 0", expect, [p, 0, 1, 0], &[BadArgument]),
        case("expect_violation access 9", expect, [p, 9, 1, 0], &[BadArgument]),
        case("test_end result 7", end, [7, scratch, 1, 0], &[BadArgument]),
    ];
    for c in &cases {
        check(c)?;
    }

    // The order-1 block is still ours after all that: free it right, then free it again.
    let s1 = hc::stats().ctx("Stats")?;
    ensure!(
        s1.free_pages == s0.free_pages.wrapping_sub(3),
        "free pages changed by the malformed calls"
    );
    ensure!(
        pages.get(0) == (p, 1) && pages.get(1) == (u, 0),
        "page list corrupted"
    );
    pages
        .free_all()
        .ctx("free order-1 block and unmapped page")?;
    match hc::free(p, 1) {
        Err(NotAllocated) => {}
        other => fail!("double free: got {other:?}, expected NotAllocated"),
    }
    // The buddy of a page we own is not ours (we hold nothing else now).
    let q = pages.alloc(0, gfp::UNMAPPED).ctx("alloc unmapped")?;
    match hc::free(q ^ PAGE_SIZE, 0) {
        Err(NotAllocated) => {}
        other => {
            fail!("free of the buddy of an allocated page: got {other:?}, expected NotAllocated")
        }
    }
    pages.free_all().ctx("free")?;

    hc::check_invariants().ctx("CheckInvariants")?;
    let s2 = hc::stats().ctx("Stats")?;
    ensure!(
        s2.free_pages == s0.free_pages,
        "free pages {} after, {} before",
        s2.free_pages,
        s0.free_pages
    );
    Ok(())
}
