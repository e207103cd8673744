//! The state of one guest run and the hypercall handlers: tests, expectations, violations,
//! recovery point, timing and dumps. Everything the guest passes in is validated here and
//! answered with a [`Status`]; nothing the guest does can make the VMM panic.
//!
//! This module holds the state and the dispatch; the handlers live by topic:
//! `guest_args` (pointers into guest memory), `memory_calls` (alloc, free, stats),
//! `host_calls` (host fills, counts and assertions, the planted secret), `test_calls` (the
//! suite's protocol and the VMM's verdict), `routes` (the reachability matrix), `violations`,
//! `dumps`, `finish` (the report), `live` (the control socket's answers, SIGUSR1 dumps) and
//! `mermap_calls` (the mermap windows, the policy query).

mod asi;
mod dumps;
mod finish;
mod guest_args;
mod host_calls;
mod live;
mod memory_calls;
mod mermap_calls;
mod routes;
mod stage2_checks;
mod test_calls;
mod violations;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use veil_abi::{BootMode, Hc, Status, ABI_VERSION};

pub use dumps::{announce_dump, exit_path, render_and_write, write_out, DumpConfig, DumpTarget};
pub use live::MAX_REPLY_RECORDS;

use crate::addr::Gpa;
use crate::console::Console;
use crate::doorbell::Doorbells;
use crate::expect::{Expectation, Tally};
use crate::guest_view::GuestView;
use crate::memory::GuestRam;
use crate::report::{
    Aggregator, ExitInfo, NotRamAccess, RegsDump, Revocation, RoundTrip, TestOutcome, TestReport,
    Violation,
};
use crate::run_types::{Allocator, GuestBackend, SharedVm, VcpuIndex, ViolationPolicy, BOOT_VCPU};
use crate::secret::Secret;
use crate::stage2::{RangeState, Stage2Engine};

/// Longest text a Log / TestEnd message may carry.
pub const MAX_TEXT: u64 = 4096;
/// Most records one QueryViolations call may ask for.
pub const MAX_QUERY: u64 = 4096;
/// Most bytes one HostFill / HostCount / HostExpect / PlantSecret may name (bounds the host
/// work one exit can cause).
pub const MAX_HOST_RANGE: u64 = 64 << 20;
/// Most dumps a guest may request in one run.
pub const MAX_GUEST_DUMPS: u32 = 1000;
/// Most guest log lines kept in the report.
pub const MAX_LOGS: usize = 1000;

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
    pub(crate) fn ok(r0: u64) -> HcOut {
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
    host: host_calls::HostVerdict,
    asi: asi::TestAsi,
}

/// What [`Session::new`] needs.
pub struct SessionConfig {
    /// The VM (for KVM stats in dumps).
    pub vm: SharedVm,
    /// Guest RAM (shared with the stage-2 backend, which keeps it alive as long as the VM).
    pub ram: Arc<GuestRam>,
    /// The allocator over the managed range.
    pub alloc: Allocator,
    /// The UART.
    pub console: Console,
    /// End of reserved memory.
    pub reserved_end: Gpa,
    /// The guest's image in reserved memory ([`crate::elf::ElfImage::pages`]): the only
    /// reserved pages `Hc::Protect` may lock.
    pub image: Vec<(Gpa, Gpa)>,
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
    /// The test-harness capability ([`Hc::PlantSecret`], host writes into unreachable pages).
    pub test_harness: bool,
    /// Reconcile stage 2 after every hypercall that changed it (`--verify-stage2`).
    pub verify_stage2: bool,
}

/// The state one vCPU owns: its index (the CPU id of its allocator calls and the `vcpu` of
/// its violation records) and its recovery point. Its thread lends it to the [`Session`] for
/// each exit it hands over ([`Session::lend`]); its exit counters stay with the run loop.
#[derive(Debug)]
pub struct VcpuState {
    index: VcpuIndex,
    recovery: Option<(u64, u64)>,
    /// A #VE to inject before the vCPU runs again (`--on-violation inject`).
    pending_ve: Option<veil_abi::VeInfo>,
    /// #VEs injected into this vCPU.
    ve_count: u64,
}

impl VcpuState {
    /// The state of vCPU `index` before it runs.
    pub fn new(index: VcpuIndex) -> VcpuState {
        VcpuState {
            index,
            recovery: None,
            pending_ve: None,
            ve_count: 0,
        }
    }

    /// The #VE to inject now, if a violation under `--on-violation inject` asked for one
    /// (its `count` already includes it).
    pub fn take_ve(&mut self) -> Option<veil_abi::VeInfo> {
        self.pending_ve.take()
    }

    /// #VEs this vCPU was given.
    pub fn ve_count(&self) -> u64 {
        self.ve_count
    }

    /// Counts a #VE delivered to this vCPU.
    pub fn count_ve(&mut self) {
        self.ve_count += 1;
    }

    /// The vCPU's index.
    pub fn index(&self) -> VcpuIndex {
        self.index
    }
}

/// One guest run's VM-wide state (shared by its vCPUs under one lock, see
/// `docs/ARCHITECTURE.md`), and the state of the vCPU whose exit is being handled.
pub struct Session {
    vm: SharedVm,
    alloc: Allocator,
    /// The vCPU whose exit is being handled (lent by its thread; [`BOOT_VCPU`]'s when the
    /// session is driven directly).
    cpu: VcpuState,
    pub(crate) console: Console,
    reserved_end: Gpa,
    image: Vec<(Gpa, Gpa)>,
    mode: BootMode,
    selection: Vec<String>,
    policy: ViolationPolicy,
    dump: Option<DumpConfig>,
    start: Instant,
    echo_logs: bool,
    tsc_khz: Option<u32>,
    test_harness: bool,
    secret: Secret,
    announced: Vec<String>,
    selection_checked: bool,
    current: Option<Current>,
    results: BTreeMap<String, TestReport>,
    ran_order: Vec<String>,
    violations: Vec<Violation>,
    aggregated: Aggregator,
    violations_total: u64,
    violations_outside: u64,
    not_ram: Vec<NotRamAccess>,
    not_ram_total: u64,
    first_hypercall: Option<Duration>,
    run_start: Option<Instant>,
    suite_start: Option<Instant>,
    suite_end: Option<Instant>,
    round_trip: Option<RoundTrip>,
    /// The guest's revocation meter (`Hc::ReportRevocation`).
    revocation: Option<Revocation>,
    dumps: Vec<String>,
    dump_errors: Vec<String>,
    guest_dumps: u32,
    numbered_refused: bool,
    routes: routes::Routes,
    checks: stage2_checks::Checks,
    asi: asi::Asi,
    /// The parked vCPUs' bells (`Hc::Wake`); the run loop waits on them.
    doorbells: Arc<Doorbells>,
    /// The per-vCPU mermap windows (`Hc::MermapGet`), when the VM set them up.
    mermap: Option<crate::mermap::Mermap>,
    /// `memfd_secret` pages cannot be windowed on this host (`Status::SecretNeedsGup`).
    mermap_secret_needs_gup: bool,
    /// Guest Log lines.
    pub logs: Vec<String>,
    // Last: RAM must outlive the memslots that point into it.
    ram: Arc<GuestRam>,
}
fn vmm_line(msg: &str) {
    eprintln!("veil: {msg}");
}

impl Session {
    /// A fresh session.
    pub fn new(c: SessionConfig) -> Session {
        let secret = c.alloc.with_stage2(|e| e.backend().secret_unmapped());
        let nr_cpus = c.alloc.nr_cpus();
        Session {
            vm: c.vm,
            alloc: c.alloc,
            cpu: VcpuState::new(BOOT_VCPU),
            console: c.console,
            reserved_end: c.reserved_end,
            image: c.image,
            mode: c.mode,
            selection: c.selection,
            policy: c.policy,
            dump: c.dump,
            start: c.start,
            echo_logs: c.echo_logs,
            tsc_khz: c.tsc_khz,
            test_harness: c.test_harness,
            secret: Secret::random(),
            announced: Vec::new(),
            selection_checked: false,
            current: None,
            results: BTreeMap::new(),
            ran_order: Vec::new(),
            violations: Vec::new(),
            aggregated: Aggregator::default(),
            violations_total: 0,
            violations_outside: 0,
            not_ram: Vec::new(),
            not_ram_total: 0,
            first_hypercall: None,
            run_start: None,
            suite_start: None,
            suite_end: None,
            round_trip: None,
            revocation: None,
            dumps: Vec::new(),
            dump_errors: Vec::new(),
            guest_dumps: 0,
            numbered_refused: false,
            routes: routes::Routes::default(),
            checks: stage2_checks::Checks::new(c.verify_stage2, secret),
            asi: asi::Asi::new(nr_cpus),
            doorbells: Arc::new(Doorbells::new(nr_cpus)),
            mermap: None,
            mermap_secret_needs_gup: false,
            logs: Vec::new(),
            ram: c.ram,
        }
    }

    /// The vCPUs' doorbells (`Hc::Wake` rings them; a parked vCPU's run loop waits on its own).
    pub fn doorbells(&self) -> Arc<Doorbells> {
        self.doorbells.clone()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// RAM as the guest can reach it (stage-2 checked): for every access made for the guest.
    pub fn view(&self) -> GuestView<'_> {
        GuestView::new(&self.ram, &self.alloc)
    }

    /// `f` on the stage-2 engine, under the allocator's stage-2 lock (so `f` must not call
    /// the allocator).
    fn engine<R>(&self, f: impl FnOnce(&Stage2Engine<GuestBackend>) -> R) -> R {
        self.alloc.with_stage2(|e| f(e))
    }

    /// The allocator.
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// Stage-2 state of the page at `gpa` (None: not RAM).
    pub fn state_at(&self, gpa: Gpa) -> Option<RangeState> {
        self.engine(|e| e.state_at(gpa))
    }

    /// Swaps `cpu` with the session's vCPU state: a vCPU thread lends its state for the exit
    /// it hands over and takes it back after (the same call again).
    pub fn lend(&mut self, cpu: &mut VcpuState) {
        std::mem::swap(&mut self.cpu, cpu);
    }

    pub(crate) fn mark_run_start(&mut self, t: Instant) {
        self.run_start = Some(t);
    }

    fn current_name(&self) -> Option<String> {
        self.current.as_ref().map(|c| c.name.clone())
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
        let out = self.dispatch(hc, a);
        self.note_refusal(hc, &out);
        self.after_hypercall();
        out
    }

    /// Decodes the registers of call `hc` (the ABI boundary: addresses become [`Gpa`]s here)
    /// and runs its handler.
    fn dispatch(&mut self, hc: Hc, a: [u64; 4]) -> HcOut {
        let gpa = |i: usize| Gpa(a[i]);
        match hc {
            Hc::Version => HcOut::ok(ABI_VERSION),
            Hc::Nop => HcOut::ok(0),
            Hc::Log => self.hc_log(gpa(0), a[1]).into(),
            Hc::Alloc => self.hc_alloc(None, a[1], a[0]).into(),
            Hc::AllocSpecial => self.hc_alloc(Some(a[0]), a[1], a[2]).into(),
            Hc::Free => self.hc_free(gpa(0), a[1]).into(),
            Hc::TestAnnounce => self.hc_announce(gpa(0), a[1]).into(),
            Hc::TestBegin => self.hc_test_begin(gpa(0), a[1]),
            Hc::TestEnd => self.hc_test_end(a[0], gpa(1), a[2]).into(),
            Hc::ExpectViolation => self.hc_expect(gpa(0), a[1], a[2]).into(),
            Hc::QueryViolations => self.hc_query(gpa(0), a[1]).into(),
            Hc::SetRecovery => {
                self.cpu.recovery = Some((a[0], a[1]));
                HcOut::ok(0)
            }
            Hc::ClearRecovery => {
                self.cpu.recovery = None;
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
            Hc::Stats => self.hc_stats(gpa(0)).into(),
            Hc::HostFill => self.hc_host_fill(gpa(0), a[1], a[2]).into(),
            Hc::Protect => self.hc_protect(gpa(0), a[1], a[2]).into(),
            Hc::VerifyStage2 => self.hc_verify_stage2().into(),
            Hc::Sweep => self.hc_sweep(a[0], a[1]).into(),
            Hc::Stage2Tamper => self.hc_stage2_tamper(gpa(0)).into(),
            Hc::AsiEnter => self.hc_asi_enter().into(),
            Hc::AsiStats => self.hc_asi_stats(gpa(0)).into(),
            Hc::ExpectAsiExit => self.hc_expect_asi_exit(gpa(0), a[1]).into(),
            Hc::HostCount => self.hc_host_count(gpa(0), a[1], a[2]).into(),
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
                    rip_symbol: None,
                    cr2: a[3],
                    regs: RegsDump::default(),
                })
            }
            Hc::ReportTiming => self.hc_timing(a[0], a[1], a[2]).into(),
            Hc::ReportRevocation => self.hc_revocation(a[0], a[1], a[2], a[3]).into(),
            Hc::HostExpect => self.hc_host_expect(gpa(0), a[1], a[2], a[3]).into(),
            Hc::PlantSecret => self.hc_plant_secret(gpa(0), a[1]).into(),
            Hc::RouteBegin => self.hc_route_begin(gpa(0), a[1], gpa(2), a[3]).into(),
            Hc::RouteEnd => self.hc_route_end().into(),
            Hc::MermapGet => self.hc_mermap_get(gpa(0), a[1]).into(),
            Hc::MermapGetReserved => self.hc_mermap_get_reserved(gpa(0)).into(),
            Hc::MermapPut => self.hc_mermap_put(gpa(0)).into(),
            Hc::MermapInfo => match self.hc_mermap_info(a[0]) {
                Ok((r0, r1)) => HcOut {
                    status: Status::Ok,
                    r0,
                    r1,
                    stop: None,
                },
                Err(s) => HcOut::err(s),
            },
            Hc::ExpectSecretCopy => self.hc_expect_secret_copy(gpa(0), gpa(1), a[2]).into(),
            Hc::ViolationPolicy => HcOut::ok(self.hc_violation_policy()),
            // A ring nobody waits for (the caller's own bell, vCPU 0's, or any bell of a
            // session driven without vCPU threads) is harmless.
            Hc::Wake => match self.doorbells.ring(a[0]) {
                true => HcOut::ok(0),
                false => HcOut::err(Status::BadArgument),
            },
            Hc::Exit => {
                if let Some(stop) = self.check_selection() {
                    return HcOut::stop(stop);
                }
                HcOut::stop(ExitInfo::GuestExit { code: a[0] })
            }
        }
    }
}
