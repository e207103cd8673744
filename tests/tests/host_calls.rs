//! The hypercalls where the VMM touches guest pages on the guest's behalf obey the rule: no
//! answer derived from a page the guest cannot reach at stage 2, no write into one except for
//! the test harness. Driven through a real VM's hypercall handler.

use veil_abi::{gfp, Hc, Status, HOST_EXPECT_SECRET, PAGE_SIZE};
use veil_tests::*;
use vmm::addr::Gpa;
use vmm::report::TestOutcome;
use vmm::session::Session;
use vmm::vm::Vm;

/// Where the test names go (reserved memory, not a VMM structure).
const NAME_GPA: u64 = 0x3000;

fn vm(harness: bool) -> Vm {
    let mut c = quiet_config(EXIT0, 32 << 20);
    c.test_harness = harness;
    Vm::new(c).expect("boot")
}

fn call(s: &mut Session, hc: Hc, a: [u64; 4]) -> Status {
    let out = s.hypercall(hc as u32, a);
    assert_eq!((out.r0, out.r1), (0, 0), "{hc:?} returned data");
    out.status
}

fn alloc(s: &mut Session, gfp: u64) -> u64 {
    let out = s.hypercall(Hc::Alloc as u32, [0, gfp, 0, 0]);
    assert_eq!(out.status, Status::Ok);
    out.r0
}

/// Announces and begins the test `name`.
fn begin(s: &mut Session, name: &str) {
    s.ram().write(NAME_GPA, name.as_bytes()).unwrap();
    let a = [NAME_GPA, name.len() as u64, 0, 0];
    assert_eq!(s.hypercall(Hc::TestAnnounce as u32, a).status, Status::Ok);
    assert_eq!(s.hypercall(Hc::TestBegin as u32, a).status, Status::Ok);
}

/// Ends the running test with the guest saying "pass".
fn end_pass(s: &mut Session) {
    let out = s.hypercall(Hc::TestEnd as u32, [0, NAME_GPA, 0, 0]);
    assert_eq!(out.status, Status::Ok);
}

#[test]
fn host_count_is_no_oracle_and_host_expect_is_judged_by_the_vmm() {
    if !kvm_available() {
        return;
    }
    let mut vm = vm(true);
    let s = vm.session_mut();
    let u = alloc(s, gfp::UNMAPPED);
    let m = alloc(s, 0);

    // Outside a test a host assertion has no verdict to go to.
    let expect = [u, PAGE_SIZE, HOST_EXPECT_SECRET, PAGE_SIZE];
    assert_eq!(call(s, Hc::HostExpect, expect), Status::BadState);

    assert_eq!(call(s, Hc::PlantSecret, [u, PAGE_SIZE, 0, 0]), Status::Ok);
    assert!(s.secret_intact(Gpa(u), PAGE_SIZE));
    let mut page = vec![0u8; PAGE_SIZE as usize];
    s.ram().read(u, &mut page).unwrap();
    assert!(page.iter().all(|&b| Session::is_secret_byte(b)));
    assert_eq!(page[17], s.secret_byte(Gpa(u + 17)));

    // The old attack: count bytes equal to a guess over the unmapped page. Refused, for every
    // guess, so the answer says nothing about the contents.
    for guess in [0u64, 0x5a, u64::from(page[0]), 0xa5, 0xff] {
        let out = s.hypercall(Hc::HostCount as u32, [u, 1, guess, 0]);
        assert_eq!(
            (out.status, out.r0),
            (Status::Unreachable, 0),
            "guess {guess:#x}"
        );
    }
    // Mapped pages still count.
    let out = s.hypercall(Hc::HostCount as u32, [m, PAGE_SIZE, 0, 0]);
    assert_eq!((out.status, out.r0), (Status::Ok, PAGE_SIZE));

    // A true and a false assertion: both answer only Ok; the VMM fails the test that made the
    // false one, whatever the guest says.
    begin(s, "holds");
    assert_eq!(call(s, Hc::HostExpect, expect), Status::Ok);
    let zeros = [m, PAGE_SIZE, 0, PAGE_SIZE];
    assert_eq!(call(s, Hc::HostExpect, zeros), Status::Ok);
    end_pass(s);
    begin(s, "broken");
    let wrong = [u, PAGE_SIZE, HOST_EXPECT_SECRET, PAGE_SIZE - 1];
    assert_eq!(call(s, Hc::HostExpect, wrong), Status::Ok);
    let wrong_byte = [u, 16, u64::from(page[0]), 0];
    assert_eq!(call(s, Hc::HostExpect, wrong_byte), Status::Ok);
    end_pass(s);

    let r = vm.run().expect("run");
    let holds = r.tests.iter().find(|t| t.name == "holds").unwrap();
    assert_eq!(holds.result, TestOutcome::Pass, "{}", holds.message);
    let broken = r.tests.iter().find(|t| t.name == "broken").unwrap();
    assert_eq!(broken.result, TestOutcome::Fail);
    assert_eq!(broken.guest_result, Some("pass"));
    let msg = &broken.message;
    assert!(msg.contains("2 of 2 host assertion(s) failed"), "{msg}");
    assert!(
        msg.contains(&format!("[{u:#x}, {:#x})", u + PAGE_SIZE)),
        "{msg}"
    );
    assert!(msg.contains("equal to the planted secret"), "{msg}");
}

#[test]
fn without_the_harness_capability_planting_and_unreachable_fills_are_refused() {
    if !kvm_available() {
        return;
    }
    let mut vm = vm(false);
    let s = vm.session_mut();
    let u = alloc(s, gfp::UNMAPPED);
    let m = alloc(s, 0);
    assert_eq!(
        call(s, Hc::PlantSecret, [u, PAGE_SIZE, 0, 0]),
        Status::HarnessOnly
    );
    assert_eq!(
        call(s, Hc::PlantSecret, [m, PAGE_SIZE, 0, 0]),
        Status::HarnessOnly
    );
    assert_eq!(
        call(s, Hc::HostFill, [u, PAGE_SIZE, 0x5a, 0]),
        Status::HarnessOnly
    );
    // Reachable pages: the guest could write them itself, so the VMM may too.
    assert_eq!(call(s, Hc::HostFill, [m, PAGE_SIZE, 0x5a, 0]), Status::Ok);
    let out = s.hypercall(Hc::HostCount as u32, [m, PAGE_SIZE, 0x5a, 0]);
    assert_eq!((out.status, out.r0), (Status::Ok, PAGE_SIZE));
    // Host assertions need no capability.
    begin(s, "asserts");
    assert_eq!(
        call(s, Hc::HostExpect, [u, PAGE_SIZE, 0, PAGE_SIZE]),
        Status::Ok
    );
    end_pass(s);
    let r = vm.run().expect("run");
    assert_eq!(
        r.tests[0].result,
        TestOutcome::Pass,
        "{}",
        r.tests[0].message
    );
}

#[test]
fn result_buffers_never_land_on_vmm_built_structures() {
    if !kvm_available() {
        return;
    }
    let mut vm = vm(true);
    let s = vm.session_mut();
    let mut before = vec![0u8; 0x3000];
    s.ram().read(0, &mut before).unwrap();
    let mut tables = vec![0u8; 0x1000];
    s.ram()
        .read(veil_abi::PAGE_TABLES_GPA, &mut tables)
        .unwrap();
    for ptr in [
        0,
        0x1000,
        0x1ff8,
        0x2000,
        0x2fa8,
        veil_abi::PAGE_TABLES_GPA - 8,
    ] {
        let out = s.hypercall(Hc::Stats as u32, [ptr, 0, 0, 0]);
        assert_eq!(out.status, Status::BadAddress, "Stats at {ptr:#x}");
        let out = s.hypercall(Hc::QueryViolations as u32, [ptr, 4, 0, 0]);
        assert_eq!(
            out.status,
            Status::BadAddress,
            "QueryViolations at {ptr:#x}"
        );
    }
    let mut after = vec![0u8; 0x3000];
    s.ram().read(0, &mut after).unwrap();
    assert_eq!(before, after, "TSS, GDT or BootInfo changed");
    let mut tables_after = vec![0u8; 0x1000];
    s.ram()
        .read(veil_abi::PAGE_TABLES_GPA, &mut tables_after)
        .unwrap();
    assert_eq!(tables, tables_after, "the PML4 changed");
    // Just outside: the guest's own memory.
    let out = s.hypercall(Hc::Stats as u32, [0x3000, 0, 0, 0]);
    assert_eq!(out.status, Status::Ok);
    let out = s.hypercall(Hc::Stats as u32, [veil_abi::PAGE_TABLES_GPA - 88, 0, 0, 0]);
    assert_eq!(out.status, Status::Ok);
}

/// The VMM's allocator zeroes a freed unmapped order-0 page when it leaves the vCPU's cache,
/// not at the free: until then the page is nobody's, so no hypercall reaches its bytes, and
/// the allocation that gets it back finds it zero.
#[test]
fn a_freed_secret_is_out_of_reach_until_it_comes_back_zeroed() {
    if !kvm_available() {
        return;
    }
    let mut vm = vm(true);
    let s = vm.session_mut();
    let u = alloc(s, gfp::UNMAPPED);
    assert_eq!(call(s, Hc::PlantSecret, [u, PAGE_SIZE, 0, 0]), Status::Ok);
    assert_eq!(call(s, Hc::Free, [u, 0, 0, 0]), Status::Ok);
    assert!(
        s.secret_intact(Gpa(u), PAGE_SIZE),
        "the page is expected to wait dirty in the cache (else this test proves nothing)"
    );
    begin(s, "freed");
    for (hc, a) in [
        (Hc::HostCount, [u, PAGE_SIZE, 0, 0]),
        (Hc::HostCount, [u, PAGE_SIZE, 0x10, 0]),
        (
            Hc::HostExpect,
            [u, PAGE_SIZE, HOST_EXPECT_SECRET, PAGE_SIZE],
        ),
        (Hc::HostExpect, [u, PAGE_SIZE, 0, 0]),
        (Hc::HostFill, [u, PAGE_SIZE, 0, 0]),
        (Hc::PlantSecret, [u, PAGE_SIZE, 0, 0]),
        (Hc::Protect, [u, 1, veil_abi::protect::NO_ACCESS, 0]),
        (Hc::Free, [u, 0, 0, 0]),
    ] {
        assert_eq!(call(s, hc, a), Status::NotAllocated, "{hc:?} {a:x?}");
    }
    end_pass(s);
    // The cache is LIFO: the next unmapped order-0 allocation is this page, zeroed first.
    assert_eq!(alloc(s, gfp::UNMAPPED), u);
    assert_eq!(s.secret_matches(Gpa(u), PAGE_SIZE).unwrap(), 0);
    assert_eq!(s.ram().count(u, PAGE_SIZE, 0).unwrap(), PAGE_SIZE);
}

/// `Hc::Protect` locks the guest's own image pages (here the tiny guest's one page of code,
/// read-only: it still runs from it) and refuses every other reserved page (the VMM's
/// structures, the mailbox, the stack, the padding after the image), on both backends.
#[test]
fn protect_locks_the_image_and_refuses_other_reserved_pages() {
    use veil_abi::protect::{NO_ACCESS, READ_ONLY, READ_WRITE};
    use vmm::stage2::{BackendKind, RangeState};
    if !kvm_available() {
        return;
    }
    for backend in [BackendKind::Slots, BackendKind::Mprotect] {
        let mut c = quiet_config(EXIT0, 32 << 20);
        c.stage2 = backend;
        let mut vm = Vm::new(c).expect("boot");
        let s = vm.session_mut();
        let image = veil_abi::IMAGE_MIN_GPA;
        for (gpa, pages, perm) in [
            (0, 1, READ_ONLY),
            (veil_abi::GDT_GPA, 1, READ_ONLY),
            (veil_abi::BOOT_INFO_GPA, 1, NO_ACCESS),
            (0x3000, 1, READ_ONLY),
            (veil_abi::MAILBOX_GPA, 1, READ_ONLY),
            (veil_abi::STACK_TOP_GPA - PAGE_SIZE, 1, READ_ONLY),
            (veil_abi::PAGE_TABLES_GPA, 1, READ_ONLY),
            (image - PAGE_SIZE, 2, READ_ONLY),
            // The image is one page: the next is padding, as is a range running into it.
            (image + PAGE_SIZE, 1, READ_ONLY),
            (image, 2, READ_ONLY),
        ] {
            let st = call(s, Hc::Protect, [gpa, pages, perm, 0]);
            assert_eq!(st, Status::BadAddress, "{backend:?} {gpa:#x} +{pages}");
            assert_eq!(s.state_at(Gpa(gpa)), Some(RangeState::Reserved));
        }
        assert_eq!(call(s, Hc::Protect, [image, 1, 7, 0]), Status::BadArgument);
        assert_eq!(
            call(s, Hc::Protect, [image, 1, READ_WRITE, 0]),
            Status::BadState
        );
        assert_eq!(call(s, Hc::Protect, [image, 1, READ_ONLY, 0]), Status::Ok);
        assert_eq!(s.state_at(Gpa(image)), Some(RangeState::ReadOnly));
        for (perm, want) in [
            (READ_WRITE, Status::BadState),
            (READ_ONLY, Status::BadState),
        ] {
            assert_eq!(
                call(s, Hc::Protect, [image, 1, perm, 0]),
                want,
                "{backend:?}"
            );
        }
        // A result buffer over the locked page is refused; so is a free of it (not managed).
        let out = s.hypercall(Hc::Stats as u32, [image, 0, 0, 0]);
        assert_eq!(out.status, Status::BadAddress);
        assert_eq!(call(s, Hc::Free, [image, 0, 0, 0]), Status::BadAddress);
        // The guest runs from its read-only code page and exits.
        let r = vm.run().expect("run");
        assert_eq!(
            r.exit,
            vmm::report::ExitInfo::GuestExit { code: 0 },
            "{backend:?}"
        );
        assert_eq!(r.violations_total, 0, "{backend:?}");
        assert_eq!(r.stage2.protect_calls, 1, "{backend:?}");
    }
}
