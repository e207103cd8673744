//! Hostile hypercalls: random numbers and arguments, biased towards edge values and addresses
//! that matter, straight into a real VM's hypercall handler. The VMM must answer every call with
//! a status and never panic, the guest may never free, reach or lock memory it does not own
//! (locks: its allocations and its own image only), and the allocator's invariants must hold
//! throughout.

use veil_abi::{Hc, Status};
use veil_tests::*;
use vmm::vm::Vm;

/// Whether `[ptr, ptr + len)` overlaps the TSS/GDT/BootInfo pages or the page-table area.
fn over_vmm_structures(ptr: u64, len: u64) -> bool {
    let end = ptr.saturating_add(len);
    len > 0 && (ptr < 0x3000 || (ptr < veil_abi::IMAGE_MIN_GPA && end > veil_abi::PAGE_TABLES_GPA))
}

#[test]
fn random_hypercalls_never_panic_and_keep_invariants() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::new(quiet_config(EXIT0, 32 << 20)).expect("boot");
    let s = vm.session_mut();
    let ram = s.ram().size();
    let managed_pages = s.allocator().nr_pages();
    let free0 = s.allocator().free_pages_count();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    let mut host_ok = 0u32;
    let mut unreachable = 0u32;
    // Pages `Protect` locked (for good: never freed again).
    let mut locked: std::collections::BTreeSet<u64> = Default::default();
    // Window GPAs `MermapGet` handed out (a page shown live in a window cannot be freed).
    let mut windows: Vec<u64> = Vec::new();
    let image = veil_abi::IMAGE_MIN_GPA..veil_abi::IMAGE_MIN_GPA + 4096;
    for i in 0..20_000u32 {
        let nr = match rng.below(10) {
            0 => rng.next_u64() as u32,
            1..=3 => Hc::Alloc as u32,
            4 => Hc::AllocSpecial as u32,
            5 | 6 => Hc::Free as u32,
            // Every call this ABI defines, plus a few unknown numbers.
            _ => rng.below(u64::from(Hc::FIRST_UNUSED) + 3) as u32,
        };
        if nr == Hc::Exit as u32 || nr == Hc::Exception as u32 {
            continue; // these stop the VM; covered elsewhere
        }
        let arg = |rng: &mut Rng| -> u64 {
            match rng.below(9) {
                0 => 0,
                1 => u64::MAX - rng.below(4),
                2 => rng.below(16),
                3 => rng.below(ram),
                4 => rng.below(ram) & !0xfff,
                5 => ram + rng.below(1 << 20),
                6 => live
                    .get(rng.below(live.len().max(1) as u64) as usize)
                    .map(|l| l.0)
                    .unwrap_or(0),
                7 => 0x3000 + rng.below(0x1000),
                _ => rng.next_u64(),
            }
        };
        let mut a = [arg(&mut rng), arg(&mut rng), arg(&mut rng), arg(&mut rng)];
        // Half the time, well-formed enough to get past the first checks: small orders and
        // valid GFP bits for allocations, a live allocation for the host calls.
        if rng.below(2) == 0 {
            match Hc::from_u32(nr) {
                Some(Hc::Alloc) => a[1] = rng.below(veil_abi::gfp::ALL + 1),
                Some(Hc::HostFill | Hc::HostCount | Hc::HostExpect | Hc::PlantSecret)
                    if !live.is_empty() =>
                {
                    let (g, o) = live[rng.below(live.len() as u64) as usize];
                    let size = 4096u64 << o.min(20);
                    let off = [0, 1, 4095, 4096]
                        .get(rng.below(4) as usize)
                        .copied()
                        .unwrap_or(0);
                    a[0] = g + off.min(size - 1);
                    a[1] = [1, 16, 4096, size, size + 1][rng.below(5) as usize];
                    a[2] = rng.below(0x102);
                    a[3] = rng.below(a[1] + 2);
                }
                Some(Hc::Protect) => {
                    a[0] = match live.get(rng.below(live.len() as u64 + 1) as usize) {
                        Some(&(g, _)) => g,
                        None => image.start,
                    };
                    a[1] = rng.below(3);
                    a[2] = rng.below(4);
                }
                _ => {}
            }
        }
        let out = s.hypercall(nr, a);
        *statuses.entry(out.status as u64).or_insert(0u64) += 1;
        match Hc::from_u32(nr) {
            None => assert_eq!(out.status, Status::UnknownCall),
            Some(Hc::Alloc) if out.status == Status::Ok => {
                assert!(
                    out.r0.is_multiple_of(4096) && out.r0 < ram,
                    "alloc returned {:#x}",
                    out.r0
                );
                live.push((out.r0, a[0]));
            }
            Some(Hc::AllocSpecial) if out.status == Status::Ok => {
                assert!(
                    out.r0.is_multiple_of(4096) && out.r0 < ram,
                    "alloc returned {:#x}",
                    out.r0
                );
                live.push((out.r0, a[2]));
            }
            Some(Hc::Free) if out.status == Status::Ok => {
                let pos = live.iter().position(|l| *l == (a[0], a[1]));
                assert!(
                    pos.is_some(),
                    "freed {:#x} order {} that was not ours",
                    a[0],
                    a[1]
                );
                live.swap_remove(pos.unwrap());
            }
            Some(Hc::MermapGet | Hc::MermapGetReserved) if out.status == Status::Ok => {
                // Only pages of live allocations may be shown in a window.
                let pages = if nr == Hc::MermapGet as u32 { a[1] } else { 1 };
                for page in (0..pages).map(|i| a[0] + i * 4096) {
                    assert!(
                        live.iter()
                            .any(|&(g, o)| g <= page && page < g + (4096 << o)),
                        "MermapGet windowed {page:#x}, which is not the guest's"
                    );
                }
                windows.push(out.r0);
            }
            Some(Hc::HostCount) if out.status == Status::Unreachable => unreachable += 1,
            Some(Hc::HostExpect) => assert_eq!(
                (out.r0, out.r1),
                (0, 0),
                "HostExpect returned something besides its status"
            ),
            Some(Hc::Protect) if out.status == Status::Ok => {
                // Only pages of live allocations or of the image may be locked.
                for page in (0..a[1]).map(|i| a[0] + i * 4096) {
                    assert!(
                        image.contains(&page)
                            || live
                                .iter()
                                .any(|&(g, o)| g <= page && page < g + (4096 << o)),
                        "Protect locked {page:#x}, which is not the guest's"
                    );
                    locked.insert(page);
                }
            }
            Some(Hc::Stats) if out.status == Status::Ok => {
                assert!(!over_vmm_structures(a[0], 88), "Stats wrote at {:#x}", a[0]);
            }
            Some(Hc::QueryViolations) if out.status == Status::Ok => {
                assert!(
                    !over_vmm_structures(a[0], a[1] * 24),
                    "QueryViolations may write at {:#x}",
                    a[0]
                );
            }
            _ => {}
        }
        if matches!(
            Hc::from_u32(nr),
            Some(Hc::HostFill | Hc::HostCount | Hc::HostExpect | Hc::PlantSecret)
        ) && out.status == Status::Ok
        {
            host_ok += 1;
            // Only pages of live allocations may be named; HostCount only reachable ones.
            let (gpa, len) = (a[0], a[1]);
            let mut page = gpa & !0xfff;
            while page < gpa + len {
                assert!(
                    live.iter()
                        .any(|&(g, o)| g <= page && page < g + (4096 << o)),
                    "{nr}: page {page:#x} of [{gpa:#x}, +{len:#x}) is not the guest's"
                );
                assert!(
                    nr != Hc::HostCount as u32
                        || s.state_at(vmm::addr::Gpa(page))
                            .is_some_and(|st| st.is_exposed()),
                    "HostCount answered over unreachable page {page:#x}"
                );
                page += 4096;
            }
        }
        assert!(
            out.stop.is_none() || nr == Hc::TestBegin as u32,
            "call {nr} stopped the VM"
        );
        if i % 1000 == 0 {
            s.allocator().check_invariants().expect("invariants");
        }
    }
    s.allocator().check_invariants().expect("invariants");
    // Put every window mapping back (those already put or wrapped answer an error), then give
    // everything back but what is locked (a lock is for the run): the free count returns to
    // its start less the locked allocations.
    for w in windows {
        let _ = s.hypercall(Hc::MermapPut as u32, [w, 0, 0, 0]);
    }
    let mut kept = 0u64;
    for (gpa, order) in live.drain(..) {
        let pages = 1u64 << order;
        let is_locked = (0..pages).any(|i| locked.contains(&(gpa + i * 4096)));
        let want = if is_locked {
            kept += pages;
            Status::BadState
        } else {
            Status::Ok
        };
        assert_eq!(
            s.hypercall(Hc::Free as u32, [gpa, order, 0, 0]).status,
            want,
            "free of {gpa:#x} order {order}"
        );
    }
    assert!(
        !locked.is_empty(),
        "no Protect succeeded: the lock rules went untested"
    );
    assert_eq!(s.allocator().free_pages_count(), free0 - kept);
    assert!(free0 <= managed_pages);
    assert!(
        host_ok > 0,
        "no host call succeeded: the ownership check went untested"
    );
    assert!(
        unreachable > 0,
        "no HostCount over an unmapped page: the stage-2 check went untested"
    );
    assert!(
        statuses.len() >= 5,
        "too few distinct answers: {statuses:?}"
    );
}
