//! The state of one guest run and the hypercall handlers: tests, expectations, violations,
//! recovery point, timing and dumps. Everything the guest passes in is validated here and
//! answered with a [`Status`]; nothing the guest does can make the VMM panic.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use allocator::{AllocError, Allocation, BuddyContext, FreeError, Gfp, MAX_ORDER};
use veil_abi::{
    AllocStats, BootMode, Hc, Status, TestResult, ViolationRecord, ABI_VERSION, PAGE_SIZE,
};
use vm_memory::ByteValued;

use crate::console::Console;
use crate::dump::DumpFormat;
use crate::expect::{self, Expectation, Tally, MAX_EXPECTATIONS};
use crate::memory::GuestRam;
use crate::report::{
    AccessKind, ExitCounts, ExitInfo, NotRamAccess, RegsDump, RoundTrip, RunReport, TestOutcome,
    TestReport, Timing, Violation, ViolationAction, MAX_RECORDS,
};
use crate::stage2::RangeState;
use crate::vm::{mmio_action, Allocator, FetchOutcome, SharedVm, ViolationPolicy};

/// Longest text a Log / TestEnd message may carry.
pub const MAX_TEXT: u64 = 4096;
/// Most records one QueryViolations call may ask for.
pub const MAX_QUERY: u64 = 4096;
/// Most bytes one HostFill / HostCount may name (bounds the host work one exit can cause).
pub const MAX_HOST_RANGE: u64 = 64 << 20;
/// Most dumps a guest may request in one run.
pub const MAX_GUEST_DUMPS: u32 = 1000;
/// Most guest log lines kept in the report.
pub const MAX_LOGS: usize = 1000;

/// Where stage-2 dumps go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DumpTarget {
    /// Standard output.
    Stdout,
    /// This file for the exit dump; guest-requested dump N goes to `<stem>.<N>.<ext>` beside it.
    File(PathBuf),
}

/// `--dump-ept` / `--dump-format`.
#[derive(Clone, Debug)]
pub struct DumpConfig {
    /// Where.
    pub target: DumpTarget,
    /// Text, JSON or SVG.
    pub format: DumpFormat,
}

impl DumpConfig {
    /// The path of guest-requested dump `n` (1-based), or None for stdout.
    pub fn numbered_path(&self, n: u32) -> Option<PathBuf> {
        match &self.target {
            DumpTarget::Stdout => None,
            DumpTarget::File(p) => {
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "veil-dump".into());
                let name = match p.extension() {
                    Some(ext) => format!("{stem}.{n}.{}", ext.to_string_lossy()),
                    None => format!("{stem}.{n}"),
                };
                Some(p.with_file_name(name))
            }
        }
    }
}

/// What a hypercall answers.
pub struct HcOut {
    /// Status in rax.
    pub status: Status,
    /// r0 in rdi.
    pub r0: u64,
    /// r1 in rsi.
    pub r1: u64,
    /// Stop the VM after answering.
    pub stop: Option<ExitInfo>,
}

impl HcOut {
    fn ok(r0: u64) -> HcOut {
        HcOut {
            status: Status::Ok,
            r0,
            r1: 0,
            stop: None,
        }
    }
    fn err(status: Status) -> HcOut {
        HcOut {
            status,
            r0: 0,
            r1: 0,
            stop: None,
        }
    }
    fn stop(stop: ExitInfo) -> HcOut {
        HcOut {
            status: Status::Ok,
            r0: 0,
            r1: 0,
            stop: Some(stop),
        }
    }
}

impl From<Result<u64, Status>> for HcOut {
    fn from(r: Result<u64, Status>) -> HcOut {
        match r {
            Ok(v) => HcOut::ok(v),
            Err(s) => HcOut::err(s),
        }
    }
}

/// The test that is running.
struct Current {
    name: String,
    start: Instant,
    expectations: Vec<Expectation>,
    tally: Tally,
    violations: u64,
    first_record: usize,
}

/// What [`Session::new`] needs.
pub struct SessionConfig {
    /// The VM (for KVM stats in dumps).
    pub vm: SharedVm,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The allocator over the managed range.
    pub alloc: Allocator,
    /// The UART.
    pub console: Console,
    /// End of reserved memory.
    pub reserved_end: u64,
    /// Run or list.
    pub mode: BootMode,
    /// Selected tests (empty = all).
    pub selection: Vec<String>,
    /// Violation policy.
    pub policy: ViolationPolicy,
    /// Dumps.
    pub dump: Option<DumpConfig>,
    /// Process start.
    pub start: Instant,
    /// Echo guest logs on stderr.
    pub echo_logs: bool,
    /// Guest TSC kHz.
    pub tsc_khz: Option<u32>,
}

/// One guest run's state.
pub struct Session {
    vm: SharedVm,
    alloc: Allocator,
    pub(crate) console: Console,
    reserved_end: u64,
    mode: BootMode,
    selection: Vec<String>,
    policy: ViolationPolicy,
    dump: Option<DumpConfig>,
    start: Instant,
    echo_logs: bool,
    tsc_khz: Option<u32>,
    announced: Vec<String>,
    selection_checked: bool,
    current: Option<Current>,
    results: BTreeMap<String, TestReport>,
    ran_order: Vec<String>,
    violations: Vec<Violation>,
    violations_total: u64,
    violations_outside: u64,
    not_ram: Vec<NotRamAccess>,
    not_ram_total: u64,
    recovery: Option<(u64, u64)>,
    first_hypercall: Option<Duration>,
    run_start: Option<Instant>,
    suite_start: Option<Instant>,
    suite_end: Option<Instant>,
    round_trip: Option<RoundTrip>,
    dumps: Vec<String>,
    dump_errors: Vec<String>,
    guest_dumps: u32,
    /// Guest Log lines.
    pub logs: Vec<String>,
    /// Exit counters (updated by the run loop).
    pub exits: ExitCounts,
    // Last: RAM must outlive the memslots that point into it.
    ram: GuestRam,
}

fn alloc_status(e: AllocError) -> Status {
    match e {
        AllocError::InvalidOrder(_) => Status::BadOrder,
        AllocError::InvalidFlags => Status::BadFlags,
        AllocError::OutOfMemory { .. } => Status::NoMemory,
        AllocError::NoFreePageblock { .. } => Status::NoFreePageblock,
        AllocError::WouldBlock { .. } => Status::WouldBlock,
        AllocError::Stage2(_) => Status::Stage2Failed,
        _ => Status::NoMemory,
    }
}

fn free_status(e: FreeError) -> Status {
    match e {
        FreeError::OutOfRange => Status::BadAddress,
        FreeError::Misaligned => Status::Misaligned,
        FreeError::InvalidOrder => Status::BadOrder,
        FreeError::NotAllocated => Status::NotAllocated,
        FreeError::WrongOrder { .. } => Status::WrongOrder,
        _ => Status::BadArgument,
    }
}

fn order_arg(v: u64) -> Result<u8, Status> {
    if v > u64::from(MAX_ORDER) {
        Err(Status::BadOrder)
    } else {
        Ok(v as u8)
    }
}

fn gfp_arg(v: u64) -> Result<Gfp, Status> {
    u32::try_from(v)
        .ok()
        .and_then(Gfp::from_bits)
        .ok_or(Status::BadFlags)
}

fn vmm_line(msg: &str) {
    eprintln!("veil: {msg}");
}

impl Session {
    /// A fresh session.
    pub fn new(c: SessionConfig) -> Session {
        Session {
            vm: c.vm,
            alloc: c.alloc,
            console: c.console,
            reserved_end: c.reserved_end,
            mode: c.mode,
            selection: c.selection,
            policy: c.policy,
            dump: c.dump,
            start: c.start,
            echo_logs: c.echo_logs,
            tsc_khz: c.tsc_khz,
            announced: Vec::new(),
            selection_checked: false,
            current: None,
            results: BTreeMap::new(),
            ran_order: Vec::new(),
            violations: Vec::new(),
            violations_total: 0,
            violations_outside: 0,
            not_ram: Vec::new(),
            not_ram_total: 0,
            recovery: None,
            first_hypercall: None,
            run_start: None,
            suite_start: None,
            suite_end: None,
            round_trip: None,
            dumps: Vec::new(),
            dump_errors: Vec::new(),
            guest_dumps: 0,
            logs: Vec::new(),
            exits: ExitCounts::default(),
            ram: c.ram,
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The allocator.
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// Stage-2 state of the page at `gpa` (None: not RAM).
    pub fn state_at(&self, gpa: u64) -> Option<RangeState> {
        self.alloc.stage2().state_at(gpa)
    }

    pub(crate) fn mark_run_start(&mut self, t: Instant) {
        self.run_start = Some(t);
    }

    fn current_name(&self) -> Option<String> {
        self.current.as_ref().map(|c| c.name.clone())
    }

    // ----- guest memory arguments -----

    /// Checks that `[ptr, ptr + len)` lies in reserved memory (where guest buffers live).
    fn check_buf(&self, ptr: u64, len: u64) -> Result<(), Status> {
        match ptr.checked_add(len) {
            Some(end) if end <= self.reserved_end => Ok(()),
            _ => Err(Status::BadAddress),
        }
    }

    /// Reads a guest buffer of at most `max` bytes from reserved memory.
    fn read_buf(&self, ptr: u64, len: u64, max: u64) -> Result<Vec<u8>, Status> {
        if len > max {
            return Err(Status::BadArgument);
        }
        self.check_buf(ptr, len)?;
        let mut b = vec![0u8; len as usize];
        self.ram.read(ptr, &mut b).map_err(|_| Status::BadAddress)?;
        Ok(b)
    }

    fn read_text(&self, ptr: u64, len: u64) -> Result<String, Status> {
        let b = self.read_buf(ptr, len, MAX_TEXT)?;
        Ok(String::from_utf8_lossy(&b)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect())
    }

    fn read_name(&self, ptr: u64, len: u64) -> Result<String, Status> {
        if len == 0 || len > 64 {
            return Err(Status::BadArgument);
        }
        let b = self.read_buf(ptr, len, 64)?;
        let s = String::from_utf8(b).map_err(|_| Status::BadArgument)?;
        if crate::vm::valid_test_name(&s) {
            Ok(s)
        } else {
            Err(Status::BadArgument)
        }
    }

    fn write_buf(&self, ptr: u64, bytes: &[u8]) -> Result<(), Status> {
        self.check_buf(ptr, bytes.len() as u64)?;
        self.ram.write(ptr, bytes).map_err(|_| Status::BadAddress)
    }

    /// Checks that every page of `[gpa, gpa + len)` is allocated to the guest.
    fn check_owned(&self, gpa: u64, len: u64) -> Result<(), Status> {
        let managed = self.ram.size() - self.reserved_end;
        if len == 0 || len > managed.min(MAX_HOST_RANGE) {
            return Err(Status::BadArgument);
        }
        let end = gpa.checked_add(len).ok_or(Status::BadAddress)?;
        if gpa < self.reserved_end || end > self.ram.size() {
            return Err(Status::BadAddress);
        }
        let mut pfn = gpa >> 12;
        let last = (end - 1) >> 12;
        while pfn <= last {
            match self.alloc.allocation_containing(pfn) {
                Some(a) => pfn = a.pfn + (1u64 << a.order),
                None => return Err(Status::NotAllocated),
            }
        }
        Ok(())
    }

    // ----- hypercalls -----

    /// Handles hypercall `nr` with arguments a0..a3.
    pub fn hypercall(&mut self, nr: u32, a: [u64; 4]) -> HcOut {
        if self.first_hypercall.is_none() {
            self.first_hypercall = Some(self.start.elapsed());
        }
        let Some(hc) = Hc::from_u32(nr) else {
            return HcOut::err(Status::UnknownCall);
        };
        match hc {
            Hc::Version => HcOut::ok(ABI_VERSION),
            Hc::Nop => HcOut::ok(0),
            Hc::Log => self.hc_log(a[0], a[1]).into(),
            Hc::Alloc => self.hc_alloc(None, a[1], a[0]).into(),
            Hc::AllocSpecial => self.hc_alloc(Some(a[0]), a[1], a[2]).into(),
            Hc::Free => self.hc_free(a[0], a[1]).into(),
            Hc::TestAnnounce => self.hc_announce(a[0], a[1]).into(),
            Hc::TestBegin => self.hc_test_begin(a[0], a[1]),
            Hc::TestEnd => self.hc_test_end(a[0], a[1], a[2]).into(),
            Hc::ExpectViolation => self.hc_expect(a[0], a[1], a[2]).into(),
            Hc::QueryViolations => self.hc_query(a[0], a[1]).into(),
            Hc::SetRecovery => {
                self.recovery = Some((a[0], a[1]));
                HcOut::ok(0)
            }
            Hc::ClearRecovery => {
                self.recovery = None;
                HcOut::ok(0)
            }
            Hc::Dump => self.guest_dump().into(),
            Hc::CheckInvariants => match self.alloc.check_invariants() {
                Ok(()) => HcOut::ok(0),
                Err(msg) => {
                    vmm_line(&format!("allocator invariant broken: {msg}"));
                    HcOut::err(Status::InvariantBroken)
                }
            },
            Hc::Stats => self.hc_stats(a[0]).into(),
            Hc::HostFill => self.hc_host_fill(a[0], a[1], a[2]).into(),
            Hc::HostCount => self.hc_host_count(a[0], a[1], a[2]).into(),
            Hc::Exception => {
                if self.current.is_some() {
                    self.end_current(
                        TestOutcome::Fail,
                        None,
                        format!(
                            "guest exception {} ({}) at rip {:#x}",
                            a[0],
                            crate::report::vector_name(a[0]),
                            a[2]
                        ),
                    );
                }
                HcOut::stop(ExitInfo::GuestException {
                    vector: a[0],
                    error_code: a[1],
                    rip: a[2],
                    cr2: a[3],
                    regs: RegsDump::default(),
                })
            }
            Hc::ReportTiming => self.hc_timing(a[0], a[1], a[2]).into(),
            Hc::Exit => {
                if let Some(stop) = self.check_selection() {
                    return HcOut::stop(stop);
                }
                HcOut::stop(ExitInfo::GuestExit { code: a[0] })
            }
        }
    }

    fn hc_log(&mut self, ptr: u64, len: u64) -> Result<u64, Status> {
        let text = self.read_text(ptr, len)?;
        if self.echo_logs {
            vmm_line(&format!("guest: {text}"));
        }
        if self.logs.len() < MAX_LOGS {
            self.logs.push(text);
        }
        Ok(0)
    }

    fn hc_alloc(&mut self, ctx: Option<u64>, gfp: u64, order: u64) -> Result<u64, Status> {
        let order = order_arg(order)?;
        let gfp = gfp_arg(gfp)?;
        let r: Result<Allocation, AllocError> = match ctx {
            None => self.alloc.alloc_pages(gfp, order),
            Some(c) => {
                let ctx = BuddyContext::from_u64(c).ok_or(Status::BadFlags)?;
                self.alloc.alloc_pages_special(ctx, gfp, order)
            }
        };
        r.map(|a| a.pfn << 12).map_err(alloc_status)
    }

    fn hc_free(&mut self, gpa: u64, order: u64) -> Result<u64, Status> {
        let order = order_arg(order)?;
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(Status::Misaligned);
        }
        if gpa < self.reserved_end || gpa >= self.ram.size() {
            return Err(Status::BadAddress);
        }
        self.alloc
            .free_pages(gpa >> 12, order)
            .map_err(free_status)?;
        Ok(0)
    }

    fn hc_announce(&mut self, ptr: u64, len: u64) -> Result<u64, Status> {
        let name = self.read_name(ptr, len)?;
        if self.announced.contains(&name) || self.announced.len() >= 4096 {
            return Err(Status::BadArgument);
        }
        self.announced.push(name);
        Ok(0)
    }

    /// In run mode, the first TestBegin or Exit checks `--tests` against the announced names.
    fn check_selection(&mut self) -> Option<ExitInfo> {
        if self.selection_checked || self.mode != BootMode::Run {
            return None;
        }
        self.selection_checked = true;
        let unknown: Vec<String> = self
            .selection
            .iter()
            .filter(|s| !self.announced.contains(s))
            .cloned()
            .collect();
        if unknown.is_empty() {
            None
        } else {
            Some(ExitInfo::UnknownTests {
                unknown,
                available: self.announced.clone(),
            })
        }
    }

    fn hc_test_begin(&mut self, ptr: u64, len: u64) -> HcOut {
        if let Some(stop) = self.check_selection() {
            return HcOut::stop(stop);
        }
        let name = match self.read_name(ptr, len) {
            Ok(n) => n,
            Err(s) => return HcOut::err(s),
        };
        if self.current.is_some() || self.results.contains_key(&name) {
            return HcOut::err(Status::BadState);
        }
        if !self.announced.contains(&name) {
            return HcOut::err(Status::BadArgument);
        }
        let now = Instant::now();
        self.suite_start.get_or_insert(now);
        self.recovery = None;
        self.ran_order.push(name.clone());
        self.current = Some(Current {
            name,
            start: now,
            expectations: Vec::new(),
            tally: Tally::new(),
            violations: 0,
            first_record: self.violations.len(),
        });
        HcOut::ok(0)
    }

    fn hc_test_end(&mut self, result: u64, ptr: u64, len: u64) -> Result<u64, Status> {
        let guest = match result {
            0 => TestResult::Pass,
            1 => TestResult::Fail,
            2 => TestResult::Skip,
            _ => return Err(Status::BadArgument),
        };
        let msg = self.read_text(ptr, len)?;
        if self.current.is_none() {
            return Err(Status::BadState);
        }
        let (outcome, guest_name) = match guest {
            TestResult::Pass => (TestOutcome::Pass, "pass"),
            TestResult::Fail => (TestOutcome::Fail, "fail"),
            TestResult::Skip => (TestOutcome::Skip, "skip"),
        };
        self.end_current(outcome, Some(guest_name), msg);
        Ok(0)
    }

    /// Ends the running test with the guest's verdict, overridden by the VMM's checks.
    fn end_current(&mut self, outcome: TestOutcome, guest: Option<&'static str>, msg: String) {
        let Some(c) = self.current.take() else {
            return;
        };
        let now = Instant::now();
        self.suite_end = Some(now);
        self.recovery = None;
        let mut outcome = outcome;
        let mut message = msg;
        if outcome != TestOutcome::Skip {
            if let Err(why) = expect::check(&c.expectations, &c.tally) {
                if outcome == TestOutcome::Pass {
                    outcome = TestOutcome::Fail;
                }
                if !message.is_empty() {
                    message.push_str("; ");
                }
                message.push_str("VMM: ");
                message.push_str(&why);
            }
        }
        let expected = c.expectations.iter().map(|e| e.count).sum();
        self.results.insert(
            c.name.clone(),
            TestReport {
                name: c.name,
                passed: outcome == TestOutcome::Pass,
                result: outcome,
                guest_result: guest,
                message,
                violations: c.violations,
                expected_violations: expected,
                time_ms: (now - c.start).as_secs_f64() * 1e3,
            },
        );
    }

    fn hc_expect(&mut self, gpa: u64, access: u64, count: u64) -> Result<u64, Status> {
        let access = AccessKind::from_u64(access).ok_or(Status::BadArgument)?;
        if gpa >= self.ram.size() {
            return Err(Status::BadAddress);
        }
        if count > 1 << 24 {
            return Err(Status::BadArgument);
        }
        let c = self.current.as_mut().ok_or(Status::BadState)?;
        if c.expectations.len() >= MAX_EXPECTATIONS {
            return Err(Status::BadArgument);
        }
        c.expectations.push(Expectation {
            page: gpa & !(PAGE_SIZE - 1),
            access,
            count,
        });
        Ok(0)
    }

    fn hc_query(&mut self, ptr: u64, max: u64) -> Result<u64, Status> {
        if max > MAX_QUERY {
            return Err(Status::BadArgument);
        }
        let size = std::mem::size_of::<ViolationRecord>() as u64;
        self.check_buf(ptr, max * size)?;
        let (count, first) = match &self.current {
            Some(c) => (c.violations, c.first_record),
            None => (self.violations_total, 0),
        };
        let kept = &self.violations[first.min(self.violations.len())..];
        let take = kept.len().min(max as usize);
        let mut bytes = Vec::with_capacity(take * size as usize);
        for v in &kept[kept.len() - take..] {
            bytes.extend_from_slice(RecordBytes(v.record()).as_slice());
        }
        self.write_buf(ptr, &bytes)?;
        Ok(count)
    }

    fn hc_stats(&mut self, ptr: u64) -> Result<u64, Status> {
        let snap = self.alloc.snapshot();
        let c = self.alloc.stage2().counters();
        let stats = AllocStats {
            free_pages: snap.free_pages,
            managed_pages: snap.managed_pages,
            flips_to_unmapped: snap.flips_to_unmapped,
            flips_to_mapped: snap.flips_to_mapped,
            stage2_unmap_calls: snap.stage2_unmap_calls,
            stage2_map_calls: snap.stage2_map_calls,
            stage2_zero_calls: snap.stage2_zero_calls,
            pages_zeroed: snap.pages_zeroed,
            memslot_updates: c.memslot_updates,
            memslots_in_use: c.memslots_in_use,
            violations: self.violations_total,
        };
        self.write_buf(ptr, StatsBytes(stats).as_slice())?;
        Ok(0)
    }

    fn hc_host_fill(&mut self, gpa: u64, len: u64, byte: u64) -> Result<u64, Status> {
        let byte = u8::try_from(byte).map_err(|_| Status::BadArgument)?;
        self.check_owned(gpa, len)?;
        self.ram
            .fill(gpa, len, byte)
            .map_err(|_| Status::BadAddress)?;
        Ok(0)
    }

    fn hc_host_count(&mut self, gpa: u64, len: u64, byte: u64) -> Result<u64, Status> {
        let byte = u8::try_from(byte).map_err(|_| Status::BadArgument)?;
        self.check_owned(gpa, len)?;
        self.ram
            .count(gpa, len, byte)
            .map_err(|_| Status::BadAddress)
    }

    fn hc_timing(&mut self, bare: u64, hc: u64, iters: u64) -> Result<u64, Status> {
        if iters == 0 || bare == 0 {
            return Err(Status::BadArgument);
        }
        let per_bare = bare as f64 / iters as f64;
        let per_hc = hc as f64 / iters as f64;
        let ns = |c: f64| self.tsc_khz.map(|k| c * 1e6 / f64::from(k.max(1)));
        self.round_trip = Some(RoundTrip {
            bare_cycles: bare,
            hypercall_cycles: hc,
            iterations: iters,
            bare_cycles_per_exit: per_bare,
            hypercall_cycles_per_call: per_hc,
            tsc_khz: self.tsc_khz,
            bare_ns: ns(per_bare),
            hypercall_ns: ns(per_hc),
            ratio: hc as f64 / bare as f64,
        });
        Ok(0)
    }

    // ----- violations -----

    fn record_violation(
        &mut self,
        gpa: u64,
        access: AccessKind,
        size: u32,
        rip: u64,
        action: ViolationAction,
    ) -> Violation {
        let pfn = gpa >> 12;
        let ft = self.alloc.pageblock_freetype(pfn);
        let owner = if self.alloc.allocation_containing(pfn).is_some() {
            "allocated"
        } else {
            "free"
        };
        let v = Violation {
            gpa,
            access,
            size,
            rip,
            vcpu: 0,
            freetype: ft.map(|f| f.name().to_string()),
            freetype_index: ft.map(|f| f.index() as u8).unwrap_or(0xff),
            owner,
            test: self.current_name(),
            action,
        };
        self.violations_total += 1;
        match &mut self.current {
            Some(c) => {
                c.violations += 1;
                expect::count(&mut c.tally, &v);
            }
            None => self.violations_outside += 1,
        }
        if self.violations.len() < MAX_RECORDS {
            self.violations.push(v.clone());
        }
        v
    }

    /// An MMIO exit at `gpa`: returns the byte a load gets and, if the VM must stop, why.
    pub fn mmio(
        &mut self,
        gpa: u64,
        access: AccessKind,
        size: u32,
        rip: u64,
    ) -> (u8, Option<ExitInfo>) {
        match self.state_at(gpa) {
            Some(RangeState::Unmapped) => {
                let action = mmio_action(self.policy, access);
                let v = self.record_violation(gpa, access, size, rip, action);
                let stop = (self.policy == ViolationPolicy::Kill)
                    .then_some(ExitInfo::ViolationKill { violation: v });
                (veil_abi::POISON_BYTE, stop)
            }
            state => {
                if state.is_some() {
                    log::warn!(
                        "MMIO exit at exposed RAM GPA {gpa:#x} ({state:?}): treated as not-RAM"
                    );
                }
                self.not_ram_total += 1;
                if self.not_ram.len() < MAX_RECORDS {
                    self.not_ram.push(NotRamAccess {
                        gpa,
                        access,
                        size,
                        rip,
                        vcpu: 0,
                        test: self.current_name(),
                    });
                }
                (0xff, None)
            }
        }
    }

    /// An instruction fetch from unmapped RAM at `gpa`.
    pub(crate) fn fetch_violation(&mut self, gpa: u64, rip: u64) -> FetchOutcome {
        let (action, resume) = match (self.policy, self.recovery.take()) {
            (ViolationPolicy::Kill, _) => (ViolationAction::Killed, None),
            (_, Some(r)) => (ViolationAction::Recovered, Some(r)),
            (_, None) => (ViolationAction::Stopped, None),
        };
        let v = self.record_violation(gpa, AccessKind::Fetch, 1, rip, action);
        match (action, resume) {
            (ViolationAction::Recovered, Some((rip, rsp))) => FetchOutcome::Resume { rip, rsp },
            (ViolationAction::Killed, _) => {
                FetchOutcome::Stop(Box::new(ExitInfo::ViolationKill { violation: v }))
            }
            _ => FetchOutcome::Stop(Box::new(ExitInfo::FetchWithoutRecovery { violation: v })),
        }
    }

    // ----- dumps -----

    fn render_dump(&self, reason: &str, format: DumpFormat) -> String {
        let stats = crate::kvm_stats::read_vm_stats(&self.vm).ok();
        let base = self.ram.host_base();
        let host_addr = move |gpa: u64| base + gpa;
        let input = crate::dump::DumpInput {
            alloc: &self.alloc,
            kvm_stats: stats.as_deref(),
            reason,
            host_addr: &host_addr,
        };
        crate::dump::render(&input, format)
    }

    /// The exit-time dump as JSON.
    fn dump_json(&self) -> serde_json::Value {
        let stats = crate::kvm_stats::read_vm_stats(&self.vm).ok();
        let base = self.ram.host_base();
        let host_addr = move |gpa: u64| base + gpa;
        let input = crate::dump::DumpInput {
            alloc: &self.alloc,
            kvm_stats: stats.as_deref(),
            reason: "exit",
            host_addr: &host_addr,
        };
        crate::dump::to_json_value(&input)
    }

    fn write_dump(&mut self, reason: &str, path: Option<PathBuf>) {
        let Some(cfg) = self.dump.clone() else {
            return;
        };
        let text = self.render_dump(reason, cfg.format);
        match path {
            None => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                if !text.ends_with('\n') {
                    let _ = out.write_all(b"\n");
                }
                self.dumps.push("-".into());
            }
            Some(p) => match std::fs::write(&p, text) {
                Ok(()) => self.dumps.push(p.display().to_string()),
                Err(e) => {
                    let msg = format!("cannot write dump {}: {e}", p.display());
                    vmm_line(&msg);
                    self.dump_errors.push(msg);
                }
            },
        }
    }

    /// Hc::Dump: writes dump number N; returns N (0 if dumps are off).
    fn guest_dump(&mut self) -> Result<u64, Status> {
        let Some(cfg) = self.dump.clone() else {
            return Ok(0);
        };
        if self.guest_dumps >= MAX_GUEST_DUMPS {
            return Err(Status::BadState);
        }
        self.guest_dumps += 1;
        let n = self.guest_dumps;
        let reason = format!("guest request #{n}");
        self.write_dump(&reason, cfg.numbered_path(n));
        Ok(u64::from(n))
    }

    // ----- the end -----

    /// Builds the report after the VM stopped with `exit`.
    pub fn finish(mut self, exit: ExitInfo, run_time: Duration) -> RunReport {
        self.console.flush();
        if self.current.is_some() {
            let why = format!("test did not end: {}", exit.summary());
            self.end_current(TestOutcome::Fail, None, why);
        }
        if let Some(cfg) = self.dump.clone() {
            let path = match cfg.target {
                DumpTarget::Stdout => None,
                DumpTarget::File(p) => Some(p),
            };
            self.write_dump("exit", path);
        }
        let selected: Vec<String> = if self.selection.is_empty() {
            self.announced.clone()
        } else {
            self.selection.clone()
        };
        let mut tests = Vec::new();
        if self.mode == BootMode::Run && !matches!(exit, ExitInfo::UnknownTests { .. }) {
            let mut order: Vec<String> = self
                .announced
                .iter()
                .filter(|n| selected.contains(n) || self.results.contains_key(*n))
                .cloned()
                .collect();
            for n in &self.ran_order {
                if !order.contains(n) {
                    order.push(n.clone());
                }
            }
            for n in &selected {
                if !order.contains(n) {
                    order.push(n.clone());
                }
            }
            for name in order {
                let r = self.results.remove(&name).unwrap_or(TestReport {
                    name: name.clone(),
                    passed: false,
                    result: TestOutcome::NotRun,
                    guest_result: None,
                    message: format!("selected but never run ({})", exit.summary()),
                    violations: 0,
                    expected_violations: 0,
                    time_ms: 0.0,
                });
                tests.push(r);
            }
        }
        let end = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let timing = Timing {
            first_hypercall_ms: self.first_hypercall.map(ms),
            boot_ms: self
                .run_start
                .map(|r| ms(r.saturating_duration_since(self.start)))
                .unwrap_or(0.0),
            suite_ms: match (self.suite_start, self.suite_end) {
                (Some(a), Some(b)) => Some(ms(b.saturating_duration_since(a))),
                _ => None,
            },
            run_ms: ms(run_time),
            total_ms: ms(end.saturating_duration_since(self.start)),
            round_trip: self.round_trip.clone(),
            exits: self.exits.clone(),
        };
        let stage2_dump = self.dump_json();
        RunReport {
            tests,
            announced: self.announced.clone(),
            violations: std::mem::take(&mut self.violations),
            violations_total: self.violations_total,
            violations_outside_tests: self.violations_outside,
            not_ram: std::mem::take(&mut self.not_ram),
            not_ram_total: self.not_ram_total,
            stage2: self.alloc.stage2().counters(),
            allocator: self.alloc.snapshot(),
            timing,
            exit,
            dumps: std::mem::take(&mut self.dumps),
            dump_errors: std::mem::take(&mut self.dump_errors),
            ram_size: self.ram.size(),
            reserved_end: self.reserved_end,
            stage2_dump,
        }
    }
}

/// A [`ViolationRecord`] as plain bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct RecordBytes(ViolationRecord);
// SAFETY: ViolationRecord is repr(C) with u64, u64, u32, u8, u8, u16: 24 bytes, no padding.
unsafe impl ByteValued for RecordBytes {}

/// An [`AllocStats`] as plain bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct StatsBytes(AllocStats);
// SAFETY: AllocStats is repr(C) and made of eleven u64: no padding, any bit pattern valid.
unsafe impl ByteValued for StatsBytes {}

const _: () = assert!(std::mem::size_of::<ViolationRecord>() == 24);
const _: () = assert!(std::mem::size_of::<AllocStats>() == 88);
