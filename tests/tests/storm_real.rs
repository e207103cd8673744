//! A real guest's violation storm: one load in a loop over an unmapped page (a different offset
//! each time), 10^6 times, each an MMIO exit (about 12 s on this nested host). The VMM's peak
//! RSS (VmHWM of this process, one test in its own binary) grows by at most 64 MB and every
//! violation is accounted for.

use veil_tests::*;
use vmm::report::{ExitInfo, MAX_RECORDS};
use vmm::{run, VmConfig};

/// Violations in the storm.
const STORM: u32 = 1_000_000;

#[test]
fn a_real_guest_storm_of_a_million_violations_stays_within_64_mb() {
    if !kvm_available() {
        return;
    }
    let mut c = VmConfig::new(storm_guest(STORM));
    c.console = vmm::console::ConsoleSink::Null;
    c.echo_logs = false;
    c.timeout = Some(std::time::Duration::from_secs(300));
    let rss0 = proc_status_kb("VmRSS:");
    let t = std::time::Instant::now();
    let r = run(c).expect("boot");
    let hwm = proc_status_kb("VmHWM:");
    let growth = hwm.saturating_sub(rss0);
    eprintln!(
        "real storm: {} violations in {:.1} s, VmRSS before {rss0} kB, VmHWM after {hwm} kB (growth {growth} kB)",
        r.violations_total,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(r.exit, ExitInfo::GuestExit { code: 0 }, "{}", r.summary());
    assert_eq!(r.violations_total, u64::from(STORM));
    let s = &r.violations_summary;
    assert_eq!(s.kept, MAX_RECORDS as u64);
    assert_eq!(s.aggregated, u64::from(STORM) - MAX_RECORDS as u64);
    assert_eq!((s.groups, s.counted_only), (1, 0));
    assert!(growth <= 64 << 10, "peak RSS grew by {growth} kB");
}
