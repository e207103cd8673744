//! What a run produced: test results, violations, counters, timing and how the VM stopped; the
//! table `veil run` prints and the JSON document `veil run --json` prints.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stage2::Stage2Counters;

/// Kind of a stray access (serialised as "read", "write", "fetch").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    /// A load.
    Read,
    /// A store.
    Write,
    /// An instruction fetch.
    Fetch,
}

impl AccessKind {
    /// The ABI value ([`veil_abi::Access`]).
    pub fn abi(self) -> veil_abi::Access {
        match self {
            AccessKind::Read => veil_abi::Access::Read,
            AccessKind::Write => veil_abi::Access::Write,
            AccessKind::Fetch => veil_abi::Access::Fetch,
        }
    }

    /// From the ABI value, if valid.
    pub fn from_u64(v: u64) -> Option<AccessKind> {
        match v {
            1 => Some(AccessKind::Read),
            2 => Some(AccessKind::Write),
            3 => Some(AccessKind::Fetch),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
            AccessKind::Fetch => "fetch",
        }
    }
}

/// What the VMM did about a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationAction {
    /// A load got [`veil_abi::POISON_BYTE`] bytes; the guest ran on.
    Poisoned,
    /// A store was dropped; the guest ran on.
    Dropped,
    /// A fetch resumed the guest at its recovery point.
    Recovered,
    /// A fetch with no recovery point stopped the VM.
    Stopped,
    /// `--on-violation kill` stopped the VM.
    Killed,
}

impl ViolationAction {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ViolationAction::Poisoned => "poisoned",
            ViolationAction::Dropped => "dropped",
            ViolationAction::Recovered => "recovered",
            ViolationAction::Stopped => "stopped",
            ViolationAction::Killed => "killed",
        }
    }
}

/// A run of consecutive violations from one instruction over contiguous bytes (e.g. the byte
/// exits of one `rep movsb`, or the two halves of a 16-byte load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationRun {
    /// Index of the first violation of the run.
    pub first: usize,
    /// Number of exits.
    pub exits: u64,
    /// Bytes covered.
    pub bytes: u64,
}

/// Groups `v` into runs for display.
pub fn group_violations(v: &[Violation]) -> Vec<ViolationRun> {
    let mut runs: Vec<ViolationRun> = Vec::new();
    for (i, x) in v.iter().enumerate() {
        if let Some(r) = runs.last_mut() {
            let f = &v[r.first];
            if f.rip == x.rip
                && f.access == x.access
                && f.test == x.test
                && f.gpa.checked_add(r.bytes) == Some(x.gpa)
            {
                r.exits += 1;
                r.bytes += u64::from(x.size);
                continue;
            }
        }
        runs.push(ViolationRun {
            first: i,
            exits: 1,
            bytes: u64::from(x.size),
        });
    }
    runs
}

/// One access to RAM that stage 2 does not expose (one KVM exit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Guest-physical address of the access.
    pub gpa: u64,
    /// Load, store or fetch.
    pub access: AccessKind,
    /// Bytes accessed by this exit.
    pub size: u32,
    /// Guest RIP as KVM reports it at the exit: the faulting instruction for loads and fetches;
    /// for stores KVM's instruction emulator has already retired the instruction before the
    /// MMIO exit, so it is the address of the *next* instruction (except inside an unfinished
    /// `rep` string instruction, which stays at the instruction).
    pub rip: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// Name of the page's pageblock freetype ("unmovable|unmapped"...), if the page is managed.
    pub freetype: Option<String>,
    /// Dense freetype index (0xff if none), as in [`veil_abi::ViolationRecord`].
    pub freetype_index: u8,
    /// Whether the page was allocated to the guest at the time ("allocated") or free ("free").
    pub owner: &'static str,
    /// Test running at the time.
    pub test: Option<String>,
    /// What the VMM did.
    pub action: ViolationAction,
}

impl Violation {
    /// The record [`veil_abi::Hc::QueryViolations`] writes.
    pub fn record(&self) -> veil_abi::ViolationRecord {
        veil_abi::ViolationRecord {
            gpa: self.gpa,
            rip: self.rip,
            size: self.size,
            access: self.access.abi() as u8,
            freetype: self.freetype_index,
            vcpu: self.vcpu as u16,
        }
    }
}

/// An access to a GPA that is not RAM at all (not an isolation violation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NotRamAccess {
    /// Guest-physical address.
    pub gpa: u64,
    /// Load or store.
    pub access: AccessKind,
    /// Bytes.
    pub size: u32,
    /// Guest RIP.
    pub rip: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// Test running at the time.
    pub test: Option<String>,
}

/// Outcome of one test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TestOutcome {
    /// Guest said pass and the VMM agrees.
    Pass,
    /// Guest said fail, or the VMM disagrees with a pass.
    Fail,
    /// Guest skipped it.
    Skip,
    /// Selected but never started, or started and never ended.
    NotRun,
}

impl TestOutcome {
    /// Short name for the table.
    pub fn name(self) -> &'static str {
        match self {
            TestOutcome::Pass => "pass",
            TestOutcome::Fail => "FAIL",
            TestOutcome::Skip => "skip",
            TestOutcome::NotRun => "NOT RUN",
        }
    }
}

/// Result of one test.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TestReport {
    /// Test name.
    pub name: String,
    /// Whether it passed (guest said pass and the VMM's checks agree).
    pub passed: bool,
    /// Final outcome.
    pub result: TestOutcome,
    /// What the guest said, if it ended the test ("pass", "fail", "skip").
    pub guest_result: Option<&'static str>,
    /// The guest's message, plus the VMM's reasons when it overrides the guest.
    pub message: String,
    /// Violations recorded while the test ran.
    pub violations: u64,
    /// Violations the test declared with ExpectViolation.
    pub expected_violations: u64,
    /// Wall time from TestBegin to TestEnd.
    pub time_ms: f64,
}

/// The guest's round-trip measurement ([`veil_abi::Hc::ReportTiming`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundTrip {
    /// TSC cycles the guest measured for its bare exits (total).
    pub bare_cycles: u64,
    /// TSC cycles for its hypercalls (total).
    pub hypercall_cycles: u64,
    /// Iterations of each.
    pub iterations: u64,
    /// Cycles per bare exit.
    pub bare_cycles_per_exit: f64,
    /// Cycles per hypercall.
    pub hypercall_cycles_per_call: f64,
    /// Guest TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Nanoseconds per bare exit (if the TSC frequency is known).
    pub bare_ns: Option<f64>,
    /// Nanoseconds per hypercall (if the TSC frequency is known).
    pub hypercall_ns: Option<f64>,
    /// hypercall / bare (goal: at most 1.2).
    pub ratio: f64,
}

/// Exit counts by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    /// Every return from KVM_RUN.
    pub total: u64,
    /// Hypercalls.
    pub hypercalls: u64,
    /// Bare exits on [`veil_abi::BARE_PORT`].
    pub bare: u64,
    /// Serial and other port I/O.
    pub pio: u64,
    /// MMIO exits (violations and not-RAM accesses).
    pub mmio: u64,
}

/// Timing of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timing {
    /// From process start (or the caller's start instant) to the guest's first hypercall.
    pub first_hypercall_ms: Option<f64>,
    /// From process start to the first KVM_RUN.
    pub boot_ms: f64,
    /// From the first TestBegin to the last TestEnd.
    pub suite_ms: Option<f64>,
    /// From the first KVM_RUN until the VM stopped.
    pub run_ms: f64,
    /// From process start until the VM stopped.
    pub total_ms: f64,
    /// The guest's hypercall vs bare exit measurement, if it reported one.
    pub round_trip: Option<RoundTrip>,
    /// Exit counts.
    pub exits: ExitCounts,
}

/// General and control registers at a crash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RegsDump {
    /// rip.
    pub rip: u64,
    /// rsp.
    pub rsp: u64,
    /// rflags.
    pub rflags: u64,
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, r8..r15.
    pub gprs: [u64; 15],
    /// cr0.
    pub cr0: u64,
    /// cr2.
    pub cr2: u64,
    /// cr3.
    pub cr3: u64,
    /// cr4.
    pub cr4: u64,
    /// efer.
    pub efer: u64,
    /// cs selector.
    pub cs: u16,
}

impl std::fmt::Display for RegsDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const N: [&str; 15] = [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
            "r13", "r14", "r15",
        ];
        writeln!(
            f,
            "  rip={:#018x} rsp={:#018x} rflags={:#x} cs={:#x}",
            self.rip, self.rsp, self.rflags, self.cs
        )?;
        for (i, chunk) in N.chunks(4).enumerate() {
            write!(f, " ")?;
            for (j, n) in chunk.iter().enumerate() {
                write!(f, " {n:>3}={:#018x}", self.gprs[i * 4 + j])?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )
    }
}

/// How the VM stopped.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitInfo {
    /// The guest called Hc::Exit.
    GuestExit {
        /// Its exit code.
        code: u64,
    },
    /// `--on-violation kill` stopped the VM at a violation.
    ViolationKill {
        /// The violation.
        violation: Violation,
    },
    /// A fetch from unmapped memory with no recovery point.
    FetchWithoutRecovery {
        /// The violation.
        violation: Violation,
    },
    /// The guest reported an exception it could not handle (Hc::Exception).
    GuestException {
        /// Exception vector.
        vector: u64,
        /// Error code.
        error_code: u64,
        /// Faulting RIP.
        rip: u64,
        /// CR2 (page faults).
        cr2: u64,
        /// Registers at the report.
        regs: RegsDump,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault {
        /// Registers at the shutdown.
        regs: RegsDump,
    },
    /// KVM could not emulate an instruction (and it was not a fetch violation).
    InternalError {
        /// KVM's suberror.
        suberror: u32,
        /// KVM's extra data words.
        data: Vec<u64>,
        /// Registers.
        regs: RegsDump,
    },
    /// The guest executed `hlt` with nothing to wake it.
    Halted {
        /// Registers.
        regs: RegsDump,
    },
    /// An exit the VMM does not handle.
    UnexpectedExit {
        /// KVM's exit.
        what: String,
        /// Registers.
        regs: RegsDump,
    },
    /// KVM_RUN failed.
    KvmError {
        /// The error.
        error: String,
    },
    /// `--timeout` expired.
    Timeout {
        /// The timeout in seconds.
        seconds: f64,
        /// Registers when stopped.
        regs: RegsDump,
    },
    /// `--tests` named tests the guest does not have.
    UnknownTests {
        /// Names not announced by the guest.
        unknown: Vec<String>,
        /// Names the guest announced.
        available: Vec<String>,
    },
}

impl ExitInfo {
    /// Whether the guest stopped by itself with code 0.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitInfo::GuestExit { code: 0 })
    }

    /// Whether the VM crashed, was killed or timed out (as opposed to exiting by itself).
    pub fn is_crash(&self) -> bool {
        !matches!(
            self,
            ExitInfo::GuestExit { .. } | ExitInfo::UnknownTests { .. }
        )
    }

    /// One-line description.
    pub fn summary(&self) -> String {
        match self {
            ExitInfo::GuestExit { code } => format!("guest exited with code {code}"),
            ExitInfo::ViolationKill { violation: v } => format!(
                "killed (--on-violation kill): {} of {} bytes at GPA {:#x}, rip {:#x}",
                v.access.name(),
                v.size,
                v.gpa,
                v.rip
            ),
            ExitInfo::FetchWithoutRecovery { violation: v } => format!(
                "stopped: instruction fetch from unmapped GPA {:#x} (rip {:#x}) and no recovery point",
                v.gpa, v.rip
            ),
            ExitInfo::GuestException {
                vector,
                error_code,
                rip,
                cr2,
                ..
            } => format!(
                "guest exception: vector {vector} ({}), error code {error_code:#x}, rip {rip:#x}, cr2 {cr2:#x}",
                vector_name(*vector)
            ),
            ExitInfo::TripleFault { regs } => {
                format!("triple fault (KVM_EXIT_SHUTDOWN) at rip {:#x}", regs.rip)
            }
            ExitInfo::InternalError {
                suberror, regs, ..
            } => format!(
                "KVM internal error (suberror {suberror}{}) at rip {:#x}",
                if *suberror == 1 { ": emulation failure" } else { "" },
                regs.rip
            ),
            ExitInfo::Halted { regs } => format!("guest halted at rip {:#x}", regs.rip),
            ExitInfo::UnexpectedExit { what, regs } => {
                format!("unexpected exit {what} at rip {:#x}", regs.rip)
            }
            ExitInfo::KvmError { error } => format!("KVM_RUN failed: {error}"),
            ExitInfo::Timeout { seconds, regs } => {
                format!("timed out after {seconds} s (rip {:#x})", regs.rip)
            }
            ExitInfo::UnknownTests { unknown, available } => format!(
                "unknown test(s): {}; available: {}",
                unknown.join(", "),
                available.join(", ")
            ),
        }
    }

    /// Registers, when the exit carries them.
    pub fn regs(&self) -> Option<&RegsDump> {
        match self {
            ExitInfo::GuestException { regs, .. }
            | ExitInfo::TripleFault { regs }
            | ExitInfo::InternalError { regs, .. }
            | ExitInfo::Halted { regs }
            | ExitInfo::UnexpectedExit { regs, .. }
            | ExitInfo::Timeout { regs, .. } => Some(regs),
            _ => None,
        }
    }
}

/// Name of an x86 exception vector.
pub fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        20 => "#VE virtualization exception",
        21 => "#CP control protection",
        _ => "other",
    }
}

/// Everything one run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The tests, in the order the guest announced them (selected ones only).
    pub tests: Vec<TestReport>,
    /// Every test the guest announced.
    pub announced: Vec<String>,
    /// Every violation (one per KVM exit), oldest first (at most [`MAX_RECORDS`] kept).
    pub violations: Vec<Violation>,
    /// Violations recorded, including any not kept.
    pub violations_total: u64,
    /// Violations outside any test.
    pub violations_outside_tests: u64,
    /// Accesses to GPAs that are not RAM (at most [`MAX_RECORDS`] kept).
    pub not_ram: Vec<NotRamAccess>,
    /// Not-RAM accesses recorded, including any not kept.
    pub not_ram_total: u64,
    /// Stage-2 engine counters.
    pub stage2: Stage2Counters,
    /// Allocator counters and free lists.
    pub allocator: allocator::Snapshot,
    /// Timing.
    pub timing: Timing,
    /// How the VM stopped.
    pub exit: ExitInfo,
    /// Dumps written (paths, or "-" for stdout).
    pub dumps: Vec<String>,
    /// Dumps that could not be written (path and reason): the run's output is incomplete.
    pub dump_errors: Vec<String>,
    /// Guest memory size.
    pub ram_size: u64,
    /// End of reserved memory.
    pub reserved_end: u64,
    /// The exit-time stage-2 dump as JSON (ranges, memslots, counters, KVM stats).
    pub stage2_dump: serde_json::Value,
}

/// Most violations / not-RAM records kept in memory.
pub const MAX_RECORDS: usize = 100_000;

/// Process exit codes of `veil` (documented in `--help`).
pub mod exit_code {
    /// Every selected test passed (or `list-tests`/`caps` succeeded).
    pub const OK: i32 = 0;
    /// At least one test failed or did not run, or the guest exited non-zero.
    pub const TEST_FAILURE: i32 = 1;
    /// Bad command line or configuration: bad size, bad ELF, unknown test name, no /dev/kvm,
    /// an output file that cannot be written (also when a dump fails at exit after every test
    /// passed: the run's output is incomplete).
    pub const USAGE: i32 = 2;
    /// The guest crashed, was killed by `--on-violation kill`, or timed out.
    pub const CRASH: i32 = 3;
}

impl RunReport {
    /// Whether every selected test passed (skips allowed) and the guest exited cleanly.
    pub fn all_passed(&self) -> bool {
        self.exit.is_clean()
            && self.violations_outside_tests == 0
            && self
                .tests
                .iter()
                .all(|t| matches!(t.result, TestOutcome::Pass | TestOutcome::Skip))
    }

    /// The process exit code for this report (see [`exit_code`]).
    pub fn exit_code(&self) -> i32 {
        if matches!(self.exit, ExitInfo::UnknownTests { .. }) {
            exit_code::USAGE
        } else if self.exit.is_crash() {
            exit_code::CRASH
        } else if !self.all_passed() {
            exit_code::TEST_FAILURE
        } else if !self.dump_errors.is_empty() {
            exit_code::USAGE
        } else {
            exit_code::OK
        }
    }

    /// The table `veil run` prints.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if self.tests.is_empty() {
            let _ = writeln!(
                s,
                "no tests ran; {} violations, {} not-RAM accesses",
                self.violations_total, self.not_ram_total
            );
            return s;
        }
        let w = self
            .tests
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            s,
            "{:<w$}  {:<7}  {:>10}  {:>10}  message",
            "test", "result", "violations", "time"
        );
        for t in &self.tests {
            let _ = writeln!(
                s,
                "{:<w$}  {:<7}  {:>10}  {:>8.1}ms  {}",
                t.name,
                t.result.name(),
                t.violations,
                t.time_ms,
                t.message
            );
        }
        let passed = self.tests.iter().filter(|t| t.passed).count();
        let failed = self
            .tests
            .iter()
            .filter(|t| matches!(t.result, TestOutcome::Fail | TestOutcome::NotRun))
            .count();
        let skipped = self.tests.len() - passed - failed;
        let _ = writeln!(
            s,
            "{passed} passed, {failed} failed, {skipped} skipped; {} violations ({} outside tests), {} not-RAM accesses",
            self.violations_total, self.violations_outside_tests, self.not_ram_total
        );
        s
    }

    /// The summary lines (timing, counters, exit).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let t = &self.timing;
        let _ = write!(s, "timing: first hypercall at ");
        match t.first_hypercall_ms {
            Some(ms) => {
                let _ = write!(s, "{ms:.1} ms");
            }
            None => {
                let _ = write!(s, "- (none)");
            }
        }
        let _ = write!(s, " after process start, suite ");
        match t.suite_ms {
            Some(ms) => {
                let _ = write!(s, "{ms:.1} ms");
            }
            None => {
                let _ = write!(s, "-");
            }
        }
        let _ = writeln!(
            s,
            ", guest run {:.1} ms, total {:.1} ms, {} exits ({} hypercalls, {} bare, {} mmio, {} pio)",
            t.run_ms,
            t.total_ms,
            t.exits.total,
            t.exits.hypercalls,
            t.exits.bare,
            t.exits.mmio,
            t.exits.pio
        );
        if let Some(rt) = &t.round_trip {
            let ns = match (rt.bare_ns, rt.hypercall_ns) {
                (Some(b), Some(h)) => format!(" ({h:.0} ns vs {b:.0} ns)"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "round trip: hypercall {:.0} cycles vs bare exit {:.0} cycles{ns} over {} iterations: ratio {:.3} (goal <= 1.2)",
                rt.hypercall_cycles_per_call, rt.bare_cycles_per_exit, rt.iterations, rt.ratio
            );
        }
        let c = &self.stage2;
        let a = &self.allocator;
        let _ = writeln!(
            s,
            "stage 2: {} unmaps, {} maps, {} memslot updates, {} memslots in use (peak {}); allocator: {} flips to unmapped, {} to mapped, {}/{} pages free",
            c.unmap_calls,
            c.map_calls,
            c.memslot_updates,
            c.memslots_in_use,
            c.peak_memslots,
            a.flips_to_unmapped,
            a.flips_to_mapped,
            a.free_pages,
            a.managed_pages
        );
        let _ = writeln!(s, "exit: {}", self.exit.summary());
        if let Some(r) = self.exit.regs() {
            let _ = writeln!(s, "{r}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(gpa: u64, size: u32, rip: u64) -> Violation {
        Violation {
            gpa,
            access: AccessKind::Read,
            size,
            rip,
            vcpu: 0,
            freetype: None,
            freetype_index: 0xff,
            owner: "allocated",
            test: Some("t".into()),
            action: ViolationAction::Poisoned,
        }
    }

    #[test]
    fn groups_runs_of_one_instruction() {
        let xs = [
            v(0x1000, 8, 1),
            v(0x1008, 8, 1), // second half of a 16-byte load
            v(0x1010, 1, 2),
            v(0x1011, 1, 2),
            v(0x1012, 1, 2), // rep movsb
            v(0x1012, 1, 2), // same byte again: a new run
            v(0x2000, 8, 3),
        ];
        let g = group_violations(&xs);
        let shape: Vec<(usize, u64, u64)> = g.iter().map(|r| (r.first, r.exits, r.bytes)).collect();
        assert_eq!(shape, [(0, 2, 16), (2, 3, 3), (5, 1, 1), (6, 1, 8)]);
    }

    #[test]
    fn exit_codes_follow_the_outcome() {
        let mut r = RunReport {
            tests: vec![],
            announced: vec![],
            violations: vec![],
            violations_total: 0,
            violations_outside_tests: 0,
            not_ram: vec![],
            not_ram_total: 0,
            stage2: Stage2Counters::default(),
            allocator: allocator::Snapshot::default(),
            timing: Timing::default(),
            exit: ExitInfo::GuestExit { code: 0 },
            dumps: vec![],
            dump_errors: vec![],
            ram_size: 0,
            reserved_end: 0,
            stage2_dump: serde_json::Value::Null,
        };
        assert_eq!(r.exit_code(), exit_code::OK);
        r.tests.push(TestReport {
            name: "a".into(),
            passed: false,
            result: TestOutcome::Skip,
            guest_result: Some("skip"),
            message: String::new(),
            violations: 0,
            expected_violations: 0,
            time_ms: 0.0,
        });
        assert_eq!(r.exit_code(), exit_code::OK);
        // A dump lost at exit makes an otherwise clean run a failure to report.
        r.dump_errors.push("d.json: disk full".into());
        assert_eq!(r.exit_code(), exit_code::USAGE);
        r.tests[0].result = TestOutcome::NotRun;
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.dump_errors.clear();
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.tests[0].result = TestOutcome::Pass;
        r.violations_outside_tests = 1;
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.violations_outside_tests = 0;
        r.exit = ExitInfo::GuestExit { code: 3 };
        assert_eq!(r.exit_code(), exit_code::TEST_FAILURE);
        r.exit = ExitInfo::KvmError { error: "x".into() };
        assert_eq!(r.exit_code(), exit_code::CRASH);
        r.exit = ExitInfo::UnknownTests {
            unknown: vec!["x".into()],
            available: vec![],
        };
        assert_eq!(r.exit_code(), exit_code::USAGE);
    }
}
