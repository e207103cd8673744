//! Violation storms: 10^6 violations through the VMM's MMIO path (`Session::mmio`, what the run
//! loop calls for each MMIO exit) over 131,072 pages and 4,096 instructions keep the VMM's
//! memory, the test's verdict and the JSON report bounded. One test in its own binary, so the
//! process's peak RSS (VmHWM) is this storm's.

use veil_abi::{gfp, Hc, Status, PAGE_SIZE};
use veil_tests::*;
use vmm::report::{AccessKind, TestOutcome, MAX_AGGREGATES, MAX_RECORDS};
use vmm::vm::Vm;

/// Violations in the storm.
const STORM: u64 = 1_000_000;
/// Pages it hits.
const PAGES: u64 = 131_072;
/// Allowed growth of the peak RSS over the storm (the goal).
const MAX_GROWTH_KB: u64 = 64 << 10;

/// An `io::Write` that only counts bytes.
struct ByteCount(usize);
impl std::io::Write for ByteCount {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_million_violations_keep_memory_and_report_bounded() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::new(quiet_config(EXIT0, 1 << 30)).expect("boot");
    let s = vm.session_mut();
    // 512 MiB of unmapped blocks: 131,072 pages to spread the storm over.
    let mut pages = Vec::with_capacity(PAGES as usize);
    for _ in 0..PAGES >> 10 {
        let out = s.hypercall(Hc::Alloc as u32, [10, gfp::UNMAPPED, 0, 0]);
        assert_eq!(out.status, Status::Ok);
        pages.extend((0..1024).map(|i| out.r0 + i * PAGE_SIZE));
    }
    s.ram().write(0x3000, b"storm").unwrap();
    for hc in [Hc::TestAnnounce, Hc::TestBegin] {
        assert_eq!(s.hypercall(hc as u32, [0x3000, 5, 0, 0]).status, Status::Ok);
    }
    // Declare one page's reads exactly, so the verdict has something to get right.
    let declared = pages[7];
    let per_page = STORM / PAGES;

    let rss0 = proc_status_kb("VmRSS:");
    let mut on_declared = 0;
    for i in 0..STORM {
        let gpa = pages[(i % PAGES) as usize] + (i / PAGES % 512) * 8;
        let access = if i % 3 == 0 {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        // 4096 distinct instructions.
        let rip = 0x20_0000 + (i % 4096) * 3;
        if gpa & !(PAGE_SIZE - 1) == declared && access == AccessKind::Read {
            on_declared += 1;
        }
        let (byte, stop) = s.mmio(vmm::addr::Gpa(gpa), access, 8, rip);
        assert_eq!(byte, veil_abi::POISON_BYTE);
        assert!(stop.is_none());
    }
    assert!(on_declared > 0 && on_declared <= per_page + 1);
    let e = [declared, 1, on_declared, 0];
    assert_eq!(
        s.hypercall(Hc::ExpectViolation as u32, e).status,
        Status::Ok
    );
    assert_eq!(
        s.hypercall(Hc::TestEnd as u32, [0, 0x3000, 0, 0]).status,
        Status::Ok
    );
    let r = vm.run().expect("run");
    let hwm = proc_status_kb("VmHWM:");
    let growth = hwm.saturating_sub(rss0);
    // The JSON document's size, without holding it (the binary streams it to stdout too).
    let mut json = ByteCount(0);
    serde_json::to_writer_pretty(&mut json, &r).unwrap();
    let json = json.0;
    eprintln!(
        "storm: {STORM} violations, VmRSS before {rss0} kB, VmHWM after {hwm} kB (growth {growth} kB), JSON {json} bytes"
    );

    assert_eq!(r.violations_total, STORM);
    assert_eq!(r.violations.len(), MAX_RECORDS);
    let (agg, sum) = (&r.violations_aggregated, &r.violations_summary);
    assert_eq!(agg.len() as u64, sum.groups);
    assert_eq!(
        sum.groups, MAX_AGGREGATES as u64,
        "4096 rips x 131072 pages fill it"
    );
    assert_eq!(agg.iter().map(|a| a.count).sum::<u64>(), sum.aggregated);
    assert_eq!(
        sum.kept + sum.aggregated + sum.counted_only,
        STORM,
        "records, aggregates and the rest must account for every violation"
    );
    assert!(agg
        .iter()
        .all(|a| a.page % PAGE_SIZE == 0 && a.count > 0 && a.test.as_deref() == Some("storm")));
    let t = &r.tests[0];
    assert_eq!(t.violations, STORM);
    assert_eq!(t.result, TestOutcome::Fail, "the undeclared pages fail it");
    assert!(
        t.message.len() < 4096,
        "message of {} bytes",
        t.message.len()
    );
    assert!(t.message.contains("more"), "{}", t.message);
    assert!(
        !t.message.contains(&format!("page {declared:#x},")),
        "the declared page was counted wrong: {}",
        t.message
    );
    assert!(
        growth <= MAX_GROWTH_KB,
        "peak RSS grew by {growth} kB over {STORM} violations"
    );
    assert!(json < 64 << 20, "JSON of {json} bytes");
}
