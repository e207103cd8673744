//! `hc_fuzz`: random hypercalls through real exits, biased to boundary values (0, 1, page
//! edges, `reserved_end` and `ram_size` ± 1, `u64::MAX`, pages the guest owns mapped or
//! unmapped, free pages, lengths around the host-range cap). Every answer must be a known
//! status; the allocator's invariants hold throughout; after freeing what the fuzz allocated
//! the free count is back where it started.
//!
//! 1,000 calls when the whole suite runs; 100,000 when named (`veil run --tests hc_fuzz`).
//! Calls that would end the run or the test (`Exit`, `Exception`, `TestBegin`, `TestEnd`,
//! `TestAnnounce`), print (`Log`), write files (`Dump`, under `--dump-ept`), change the
//! report's timing (`ReportTiming`, `ReportRevocation`) or belong to the reachability routes (`RouteBegin`,
//! `RouteEnd`) are left out; `ExpectViolation` is sent with count 0 and `HostExpect` only true
//! or malformed, so that the VMM's verdict stays predictable. Pointers the VMM writes through are the fuzz's scratch buffer or addresses
//! it must refuse.

use crate::boot;
use crate::hc;
use crate::outcome::{Ctx, Outcome};
use crate::{ensure, fail, println};
use veil_abi::{Hc, Status, ViolationRecord, HOST_EXPECT_SECRET, PAGE_SIZE};

/// Calls when the whole suite runs.
const SUITE_CALLS: u32 = 1_000;
/// Calls when the test is named.
const NAMED_CALLS: u32 = 100_000;
/// Fixed seed: a failure reproduces.
const SEED: u64 = 0x8a5e_ed00_f022_1234;
/// Allocations tracked at once (small: every lookup is emulated ring-0 code).
const TRACKED: usize = 16;
/// `MAX_HOST_RANGE` of the VMM (bytes one host call may name).
const MAX_HOST_RANGE: u64 = 64 << 20;
/// Calls between two invariant checks.
const CHECK_EVERY: u32 = 997;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// What the fuzz allocated: `(gpa, order)`.
struct Held {
    list: [(u64, u64); TRACKED],
    len: usize,
}

impl Held {
    fn any(&self, rng: &mut Rng) -> Option<(u64, u64)> {
        (self.len > 0).then(|| self.list[rng.below(self.len as u64) as usize])
    }

    fn position(&self, gpa: u64, order: u64) -> Option<usize> {
        self.list[..self.len]
            .iter()
            .position(|&e| e == (gpa, order))
    }

    fn remove(&mut self, i: usize) {
        self.len -= 1;
        self.list[i] = self.list[self.len];
    }

    fn owns(&self, page: u64) -> bool {
        self.list[..self.len]
            .iter()
            .any(|&(g, o)| g <= page && page < g + (PAGE_SIZE << o))
    }
}

/// Room for what Stats and QueryViolations write (the only pointer the VMM may write).
static mut SCRATCH: [ViolationRecord; 16] = [ViolationRecord {
    gpa: 0,
    rip: 0,
    size: 0,
    access: 0,
    freetype: 0,
    vcpu: 0,
}; 16];

/// The calls the fuzz makes, weighted by repetition.
const CALLS: &[Hc] = &[
    Hc::Version,
    Hc::Nop,
    Hc::Wake,
    Hc::Alloc,
    Hc::Alloc,
    Hc::Alloc,
    Hc::AllocSpecial,
    Hc::Free,
    Hc::Free,
    Hc::Free,
    Hc::ExpectViolation,
    Hc::QueryViolations,
    Hc::SetRecovery,
    Hc::ClearRecovery,
    Hc::CheckInvariants,
    Hc::Stats,
    Hc::HostFill,
    Hc::HostFill,
    Hc::HostCount,
    Hc::HostCount,
    Hc::HostExpect,
    Hc::HostExpect,
    Hc::PlantSecret,
    Hc::AsiEnter,
    Hc::AsiStats,
];

/// The fuzz's view of memory.
struct Layout {
    ram: u64,
    reserved_end: u64,
    managed_end: u64,
    scratch: u64,
}

impl Layout {
    /// A GPA-like value: boundaries, pages we hold, random managed pages, wild values.
    fn gpa(&self, rng: &mut Rng, held: &Held) -> u64 {
        match rng.below(12) {
            0 => rng.pick(&[0, 1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1]),
            1 => self.reserved_end + rng.pick(&[0, 1, u64::MAX]),
            2 => self
                .ram
                .wrapping_add(rng.pick(&[0, 1, u64::MAX, PAGE_SIZE])),
            3 => u64::MAX - rng.below(PAGE_SIZE + 1),
            4..=7 => match held.any(rng) {
                Some((g, o)) => g + rng.pick(&[0, 1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE << o]),
                None => self.reserved_end,
            },
            8 | 9 => {
                let pages = (self.managed_end - self.reserved_end) / PAGE_SIZE;
                self.reserved_end + rng.below(pages) * PAGE_SIZE
            }
            10 => rng.pick(&[
                veil_abi::GDT_GPA,
                veil_abi::BOOT_INFO_GPA,
                veil_abi::PAGE_TABLES_GPA,
            ]),
            _ => rng.next(),
        }
    }

    /// A length: tiny, page-sized, around the host-range cap, wild.
    fn len(&self, rng: &mut Rng) -> u64 {
        match rng.below(6) {
            0 => rng.pick(&[0, 1, 2, 7, 8, 16]),
            1 | 2 => rng.pick(&[PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 2 * PAGE_SIZE]),
            3 => MAX_HOST_RANGE.wrapping_add(rng.pick(&[0, 1, u64::MAX])),
            4 => rng.pick(&[self.ram, self.ram - self.reserved_end, u64::MAX]),
            _ => rng.below(8 * PAGE_SIZE),
        }
    }

    /// A pointer the VMM writes through: our scratch buffer, or one it must refuse.
    fn out_ptr(&self, rng: &mut Rng) -> u64 {
        match rng.below(3) {
            0 | 1 => self.scratch,
            _ => rng.pick(&[
                0,
                veil_abi::GDT_GPA,
                veil_abi::BOOT_INFO_GPA,
                veil_abi::PAGE_TABLES_GPA,
                self.reserved_end,
                self.ram,
                u64::MAX,
            ]),
        }
    }
}

/// Random hypercalls; see the module comment.
pub fn hc_fuzz() -> Outcome {
    let info = boot::info();
    let calls = if boot::named("hc_fuzz") {
        NAMED_CALLS
    } else {
        SUITE_CALLS
    };
    let l = Layout {
        ram: info.ram_size,
        reserved_end: info.reserved_end,
        managed_end: info.managed_end,
        scratch: core::ptr::addr_of_mut!(SCRATCH) as u64,
    };
    let s0 = hc::stats().ctx("Stats")?;
    let mut rng = Rng(SEED);
    let mut held = Held {
        list: [(0, 0); TRACKED],
        len: 0,
    };
    let mut ok = 0u32;
    for i in 0..calls {
        let unknown = rng.below(40) == 0;
        let hc_nr = rng.pick(CALLS);
        let nr = if unknown {
            Hc::FIRST_UNUSED + rng.below(u64::from(u32::MAX - Hc::FIRST_UNUSED)) as u32
        } else {
            hc_nr as u32
        };
        let mut a = [l.gpa(&mut rng, &held), l.len(&mut rng), 0, 0];
        match hc_nr {
            Hc::Alloc => {
                // Big blocks are rare: zeroing and flipping them is what costs host time.
                a[0] = if rng.below(32) == 0 {
                    rng.pick(&[9, 10])
                } else {
                    rng.pick(&[0, 0, 0, 1, 2, 3, 11, u64::MAX])
                };
                a[1] = rng.pick(&[0, 0, 2, 2, 1, 3, 0x10, 0x12, 0x20, u64::MAX]);
            }
            Hc::AllocSpecial => {
                a = [
                    rng.pick(&[0, 1, 2]),
                    rng.pick(&[0, 1, 2, 0x40]),
                    rng.pick(&[0, 1, 11]),
                    0,
                ];
            }
            Hc::Free => {
                if let Some((g, o)) = held.any(&mut rng) {
                    if rng.below(2) == 0 {
                        a = [g, o, 0, 0];
                    } else {
                        a[1] = rng.pick(&[0, 1, o, o + 1, 11]);
                    }
                }
            }
            Hc::ExpectViolation => a = [a[0], rng.below(5), 0, 0],
            Hc::QueryViolations => a = [l.out_ptr(&mut rng), rng.pick(&[0, 1, 16, 4097]), 0, 0],
            Hc::Stats | Hc::AsiStats => a = [l.out_ptr(&mut rng), 0, 0, 0],
            Hc::HostFill | Hc::HostCount => a[2] = rng.pick(&[0, 0x5a, 0xa5, 0xff, 0x100]),
            // Malformed (bad `what` or count > len): nothing is recorded.
            Hc::HostExpect => {
                a[2] = rng.pick(&[0, HOST_EXPECT_SECRET + 1, u64::MAX]);
                a[3] = if a[2] == 0 { a[1].wrapping_add(1) } else { 0 };
            }
            Hc::SetRecovery => a[1] = rng.next(),
            _ => {}
        }
        if a[1] == 0 && hc_nr == Hc::HostExpect {
            a[1] = 1;
            a[3] = 2;
        }
        // SAFETY: the only pointers the VMM may write through are `SCRATCH` (big enough for
        // one AllocStats or 16 records, unused elsewhere) or addresses it must refuse; the
        // others it only reads or checks.
        let r = unsafe { hc::raw(nr, a[0], a[1], a[2], a[3]) };
        let Some(st) = Status::from_u64(r.status) else {
            fail!("call {i}: {nr} answered unknown status {}", r.status);
        };
        if unknown {
            ensure!(
                st == Status::UnknownCall,
                "call {i}: unknown {nr} got {st:?}"
            );
            continue;
        }
        if st == Status::Ok {
            ok += 1;
        }
        match (hc_nr, st) {
            (Hc::Alloc | Hc::AllocSpecial, Status::Ok) => {
                let order = if hc_nr == Hc::Alloc { a[0] } else { a[2] };
                ensure!(
                    r.r0.is_multiple_of(PAGE_SIZE)
                        && r.r0 >= l.reserved_end
                        && r.r0 < l.managed_end,
                    "call {i}: Alloc returned {:#x}",
                    r.r0
                );
                ensure!(
                    !held.owns(r.r0),
                    "call {i}: Alloc returned {:#x} twice",
                    r.r0
                );
                if held.len == TRACKED {
                    hc::free(r.r0, order as u8).ctx("free (list full)")?;
                } else {
                    held.list[held.len] = (r.r0, order);
                    held.len += 1;
                }
            }
            (Hc::Free, Status::Ok) => match held.position(a[0], a[1]) {
                Some(p) => held.remove(p),
                None => fail!(
                    "call {i}: freed {:#x} order {} that was not ours",
                    a[0],
                    a[1]
                ),
            },
            (Hc::HostFill | Hc::HostCount | Hc::PlantSecret, Status::Ok) => {
                // First and last page (a page-by-page walk is slow in emulated ring 0).
                let last = (a[0] + a[1] - 1) & !(PAGE_SIZE - 1);
                ensure!(
                    held.owns(a[0]) && held.owns(last),
                    "call {i}: {hc_nr:?} named [{:#x}, +{:#x}), not ours",
                    a[0],
                    a[1]
                );
                // A true host assertion over what the host just filled.
                if hc_nr == Hc::HostFill {
                    hc::host_expect(a[0], a[1], a[2], a[1]).ctx("HostExpect after HostFill")?;
                }
            }
            (Hc::HostExpect, Status::Ok) => fail!("call {i}: malformed HostExpect {a:?} accepted"),
            (Hc::Stats | Hc::AsiStats | Hc::QueryViolations, Status::Ok) => ensure!(
                a[0] == l.scratch || (hc_nr == Hc::QueryViolations && a[1] == 0),
                "call {i}: {hc_nr:?} wrote at {:#x}",
                a[0]
            ),
            _ => {}
        }
        if i % CHECK_EVERY == 0 {
            hc::check_invariants().ctx("CheckInvariants")?;
        }
    }
    let _ = hc::clear_recovery();
    hc::check_invariants().ctx("CheckInvariants")?;
    while held.len > 0 {
        let (g, o) = held.list[held.len - 1];
        held.len -= 1;
        hc::free(g, o as u8).ctx("free")?;
    }
    let s1 = hc::stats().ctx("Stats")?;
    ensure!(
        s1.free_pages == s0.free_pages,
        "free pages {} after, {} before",
        s1.free_pages,
        s0.free_pages
    );
    ensure!(ok > 0, "no call succeeded");
    println!("hc_fuzz: {calls} calls, {ok} answered Ok, seed {SEED:#x}");
    Ok(())
}
