//! The VM: KVM setup, guest image and boot structures, the allocator over the managed range, and
//! the vCPU run loop that dispatches port I/O (hypercalls, bare exits, the UART), MMIO exits
//! (violations, not-RAM accesses) and everything else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, SyncReg, VcpuFd};
use veil_abi::{BootMode, PAGEBLOCK_SIZE, POISON_BYTE};

use crate::addr::Gpa;
use crate::boot::{self, BootParams};
use crate::console::{Console, ConsoleSink};
use crate::control::{ControlSocket, VcpuBoard, VcpuRunState};
use crate::doorbell::{self, Doorbells};
use crate::elf::{self, ElfError};
use crate::livelock::{FaultRepeat, StallSampler};
use crate::memory::Backing;
use crate::memory::{reserved_end_for, CoreDump, GuestRam, MemSize, MemoryError};
use crate::report::{AccessKind, ExitCounts, ExitInfo, RegsDump, RunReport, VcpuSummary};
use crate::session::{DumpConfig, Session, SessionConfig, VcpuState};
use crate::shootdown::Vcpus;
use crate::signals;
use crate::stage2::{
    BackendKind, EngineError, KvmSlots, Mprotect, MprotectError, Slots, Stage2Engine,
};
use crate::watchdog::{self, Watchdog};
use dispatch::{dispatch, Action, Progress};

mod dispatch;
mod fault;
mod inject;
mod kvm_run;
mod stall;

pub(crate) use crate::run_types::FetchOutcome;
use crate::run_types::BOOT_VCPU;
pub use crate::run_types::{valid_test_name, Allocator, GuestBackend, ViolationPolicy};

/// Everything needed to boot and run one guest.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM size.
    pub mem: MemSize,
    /// The guest ELF image.
    pub guest: Vec<u8>,
    /// Run or list the tests.
    pub mode: BootMode,
    /// Test names to run (empty = all).
    pub selection: Vec<String>,
    /// Violation policy.
    pub on_violation: ViolationPolicy,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Where the guest console goes.
    pub console: ConsoleSink,
    /// Stage-2 dumps, if wanted.
    pub dump: Option<DumpConfig>,
    /// "Process start" for the timing figures.
    pub start: Instant,
    /// Echo the guest's Hc::Log lines, and the VMM's informational lines (the sweep summary),
    /// on stderr (off for `veil run --quiet` and `list-tests`).
    pub echo_logs: bool,
    /// Whether guest RAM may appear in a core dump of the VMM (`--dump-guest-core`).
    pub core_dump: CoreDump,
    /// The test-harness capability: `Hc::PlantSecret` and host writes into pages the guest
    /// cannot reach are allowed (on for the embedded suite; `veil run --test-harness` for a
    /// `--guest` ELF). Denied calls get `Status::HarnessOnly`.
    pub test_harness: bool,
    /// The stage-2 backend (`--stage2`).
    pub stage2: BackendKind,
    /// Back unmapped pageblocks with `memfd_secret` memory (`--host-secretmem`; `mprotect` only).
    pub host_secretmem: bool,
    /// Reconcile stage 2 after every hypercall that changed it (`--verify-stage2`).
    pub verify_stage2: bool,
    /// vCPUs (`--vcpus`): one thread each; vCPU 0 runs the suite.
    pub vcpus: u32,
    /// The control socket (`--control PATH`), bound before the boot, served while the guest
    /// runs (see [`crate::control`]).
    pub control: Option<Arc<ControlSocket>>,
}

impl VmConfig {
    /// Defaults: 256 MiB, the embedded guest, run all tests, report policy, 60 s timeout,
    /// console to stdout, no dumps, guest RAM out of core dumps, test-harness capability on.
    pub fn new(guest: Vec<u8>) -> VmConfig {
        VmConfig {
            mem: MemSize::default(),
            guest,
            mode: BootMode::Run,
            selection: Vec::new(),
            on_violation: ViolationPolicy::Report,
            timeout: Some(Duration::from_secs(60)),
            console: ConsoleSink::Stdout,
            dump: None,
            start: Instant::now(),
            echo_logs: true,
            core_dump: CoreDump::Exclude,
            test_harness: true,
            stage2: BackendKind::default(),
            host_secretmem: false,
            verify_stage2: false,
            vcpus: 1,
            control: None,
        }
    }
}

/// Why a VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Bad RAM size or mapping failure.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest ELF was rejected.
    #[error("invalid guest image")]
    Elf(#[from] ElfError),
    /// The image leaves no managed memory.
    #[error("guest image ends at {image_end:#x}: {ram_size} bytes of RAM leave no managed pageblock above the reserved {reserved_end:#x} bytes; use a larger --mem")]
    RamTooSmall {
        /// End of the loaded image.
        image_end: u64,
        /// Reserved end.
        reserved_end: u64,
        /// RAM size.
        ram_size: u64,
    },
    /// A test name is malformed.
    #[error("invalid test name {0:?}: names are 1-64 characters of [a-z0-9_]")]
    BadTestName(String),
    /// The selection does not fit in the boot block.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A KVM call failed.
    #[error("{what}")]
    Kvm {
        /// What we were doing.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The mermap window could not be set up.
    #[error("mermap window: {0}")]
    Mermap(#[from] crate::mermap_window::WindowError),
    /// The stage-2 engine refused the layout.
    #[error("the stage-2 engine refused the memory layout")]
    Engine(#[from] EngineError),
    /// The stage-2 backend could not be set up.
    #[error("stage-2 backend: {0}")]
    Backend(#[from] MprotectError),
    /// The allocator refused the managed range or the vCPU count.
    #[error("allocator: {0}")]
    Allocator(#[from] allocator::InitError),
    /// `--host-secretmem` with a backend that cannot back pages with secret memory.
    #[error("--host-secretmem needs --stage2 mprotect: the slots backend removes pages as memslot holes and has no second mapping to back with memfd_secret memory")]
    SecretMemNeedsMprotect,
    /// `--vcpus` outside 1..=the limit.
    #[error("--vcpus {asked}: this host and guest ABI run 1 to {max} vCPUs (KVM's maximum, at most veil_abi::MAX_VCPUS)")]
    BadVcpus {
        /// The count asked for.
        asked: u32,
        /// The largest count allowed here.
        max: u32,
    },
    /// Console or watchdog setup failed.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl VmError {
    /// Whether this is a configuration/usage problem (exit code 2) rather than a host failure.
    pub fn is_usage(&self) -> bool {
        !matches!(
            self,
            VmError::Kvm { .. } | VmError::Io { .. } | VmError::Backend(_) | VmError::Mermap(_)
        )
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// vCPU `index`, ready to enter the guest at `entry` in 64-bit mode on its own stack, with its
/// own APIC ids in CPUID.
fn new_vcpu(
    vm: &kvm_ioctls::VmFd,
    cpuid: &kvm_bindings::CpuId,
    index: u32,
    cr3: u64,
    entry: u64,
) -> Result<VcpuFd, VmError> {
    let mut vcpu = vm
        .create_vcpu(u64::from(index))
        .map_err(kvm_err("KVM_CREATE_VCPU failed"))?;
    vcpu.set_cpuid2(&boot::vcpu_cpuid(cpuid, index))
        .map_err(kvm_err("KVM_SET_CPUID2 failed"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS failed"))?;
    vcpu.set_sregs(&boot::long_mode_sregs(sregs, cr3))
        .map_err(kvm_err("KVM_SET_SREGS failed"))?;
    vcpu.set_fpu(&boot::entry_fpu())
        .map_err(kvm_err("KVM_SET_FPU failed"))?;
    vcpu.set_regs(&boot::entry_regs(
        entry,
        veil_abi::ap_stack_top(index),
        index,
    ))
    .map_err(kvm_err("KVM_SET_REGS failed"))?;
    vcpu.set_sync_valid_reg(SyncReg::Register);
    Ok(vcpu)
}

/// A booted (not yet running) VM.
pub struct Vm {
    s: Session,
    vcpus: Vec<VcpuFd>,
    threads: Arc<Vcpus>,
    timeout: Option<Duration>,
    control: Option<Arc<ControlSocket>>,
}

/// One vCPU's run loop: its KVM fd, the state it owns ([`VcpuState`], exit counters, the
/// livelock detectors' memory) and the VM-wide [`Session`] it shares with the other vCPUs.
struct Vcpu {
    vcpu: VcpuFd,
    cpu: VcpuState,
    exits: ExitCounts,
    s: Arc<Mutex<Session>>,
    stop: Arc<RunStop>,
    timeout: Option<Duration>,
    /// Exits that were not watchdog kicks, published for the watchdog's stall check.
    progress: Arc<AtomicU64>,
    /// When the last such exit happened.
    last_exit: Instant,
    faults: FaultRepeat,
    stalls: StallSampler,
    /// Where this vCPU publishes its state and exits for the control socket.
    board: Arc<VcpuBoard>,
    /// Rings of this vCPU's doorbell it has already woken for.
    rung: u64,
}

/// The session locked for one vCPU, with that vCPU's [`VcpuState`] lent to it until dropped.
struct Lent<'a> {
    guard: MutexGuard<'a, Session>,
    cpu: &'a mut VcpuState,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.guard.lend(self.cpu);
    }
}

impl std::ops::Deref for Lent<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.guard
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.guard
    }
}

/// Locks `s`, whether or not a panicking vCPU thread poisoned it (the session's state stays
/// consistent between its calls; the report says what the panicking thread's exit was).
fn lock(s: &Mutex<Session>) -> MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vm {
    /// Validates the configuration, maps RAM, loads the guest, builds the boot structures, the
    /// stage-2 engine, the allocator and vCPU 0.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        for name in &cfg.selection {
            if !valid_test_name(name) {
                return Err(VmError::BadTestName(name.clone()));
            }
        }
        let ram_size = cfg.mem.0;
        let image = elf::parse(&cfg.guest, ram_size)?;
        let reserved_end = reserved_end_for(image.end());
        if reserved_end + PAGEBLOCK_SIZE > ram_size {
            return Err(VmError::RamTooSmall {
                image_end: image.end(),
                reserved_end,
                ram_size,
            });
        }
        let params = BootParams {
            mode: cfg.mode,
            selection: cfg.selection.join(","),
            ram_size,
            reserved_end,
            vcpus: cfg.vcpus,
            direct_map_size: crate::mermap::window_base(ram_size).raw()
                + crate::mermap::Mermap::span(cfg.vcpus as usize),
        };
        boot::boot_info(&params)?;

        let t0 = Instant::now();
        let lap = |what: &str| log::debug!("boot: {what} done at {:?}", t0.elapsed());
        let kvm = Kvm::new().map_err(kvm_err(
            "cannot open /dev/kvm (is KVM available and accessible?)",
        ))?;
        let max = vcpu_limit(&kvm);
        if cfg.vcpus == 0 || cfg.vcpus > max {
            return Err(VmError::BadVcpus {
                asked: cfg.vcpus,
                max,
            });
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM failed"))?);
        match crate::pv_msrs::install(&kvm, &vm) {
            Ok(true) => {}
            Ok(false) => log::warn!("KVM cannot filter MSRs here: PV MSR writes go to KVM unseen"),
            Err(e) => {
                log::warn!("PV MSR filter not installed ({e}): PV MSR writes go to KVM unseen")
            }
        }
        if cfg.host_secretmem && cfg.stage2 != BackendKind::Mprotect {
            return Err(VmError::SecretMemNeedsMprotect);
        }
        let backing = match cfg.stage2 {
            BackendKind::Slots => Backing::Anonymous,
            BackendKind::Mprotect => Backing::Memfd,
        };
        let ram = Arc::new(GuestRam::create(cfg.mem, cfg.core_dump, backing)?);
        elf::load(&image, &cfg.guest, &ram)?;
        let cr3 = boot::write_boot_structures(&ram, &params)?;
        lap("VM, RAM, image and boot structures");

        let max_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(32);
        // The mermap windows take the top memslot ids (one per window page under `slots`, one
        // under `mprotect`); the RAM backend gets the rest.
        let mermap_span = crate::mermap::Mermap::span(cfg.vcpus as usize);
        let mermap_ids = match cfg.stage2 {
            BackendKind::Slots => crate::mermap_window::SlotWindow::ids_needed(mermap_span),
            BackendKind::Mprotect => 1,
        }
        .min(max_slots / 2);
        let ram_slots = max_slots - mermap_ids;
        let threads = Arc::new(Vcpus::default());
        let backend: GuestBackend = match cfg.stage2 {
            BackendKind::Slots => {
                let mut b = Slots::new(KvmSlots::new(vm.clone(), ram.clone(), ram_slots), ram_size);
                b.park_vcpus(threads.clone());
                Box::new(b)
            }
            BackendKind::Mprotect => {
                let mut b = Mprotect::new(vm.clone(), ram.clone())?;
                if cfg.host_secretmem {
                    b.use_secretmem()?;
                }
                Box::new(b)
            }
        };
        let engine = Stage2Engine::new(backend, ram_size, Gpa(reserved_end))?;
        lap("stage-2 engine (initial memslot)");
        let alloc = Allocator::new(
            reserved_end >> 12,
            (ram_size - reserved_end) >> 12,
            engine,
            allocator::Config::default(),
            cfg.vcpus as usize,
        )?;
        lap("allocator");

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID failed"))?;
        let mut vcpus = Vec::new();
        for index in 0..cfg.vcpus {
            vcpus.push(new_vcpu(&vm, &cpuid, index, cr3, image.entry)?);
        }
        let tsc_khz = vcpus[0].get_tsc_khz().ok();
        lap("vCPU");

        let mermap = crate::mermap::create(
            &vm,
            &ram,
            cfg.stage2,
            cfg.vcpus as usize,
            ram_slots,
            mermap_ids,
        )?;
        let console = Console::new(&cfg.console).map_err(|source| VmError::Io {
            what: "cannot open the console output",
            source,
        })?;
        let s = Session::new(SessionConfig {
            vm,
            ram,
            alloc,
            console,
            reserved_end: Gpa(reserved_end),
            image: image.pages(),
            mode: cfg.mode,
            selection: cfg.selection,
            policy: cfg.on_violation,
            dump: cfg.dump,
            start: cfg.start,
            echo_logs: cfg.echo_logs,
            tsc_khz,
            test_harness: cfg.test_harness,
            verify_stage2: cfg.verify_stage2,
        });
        let mut s = s;
        // KVM reaches a `memfd_secret` page only where it reads guest memory through the
        // VMM's mapping (this host emulates guest ring 0); where it needs GUP it cannot.
        let needs_gup = cfg.host_secretmem
            && !crate::caps::probe_host()
                .kvm_modules
                .iter()
                .any(|m| m == "kvm_pvm");
        s.set_mermap(mermap, needs_gup);
        Ok(Vm {
            s,
            vcpus,
            threads,
            timeout: cfg.timeout,
            control: cfg.control,
        })
    }

    /// The run state (hypercall handlers, violations, allocator) before the guest runs: lets
    /// tests and embedders drive hypercalls directly.
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.s
    }

    /// Runs the guest until it exits, crashes, is killed or times out: vCPU 0 on the calling
    /// thread, every other vCPU on a thread of its own; the first vCPU to stop stops them all.
    pub fn run(self) -> Result<RunReport, VmError> {
        let count = self.vcpus.len() as u32;
        let control = self.control.clone();
        let board = Arc::new(VcpuBoard::new(count as usize));
        let (s, stop, cpus) = self.into_parts(&board);
        let run_start = Instant::now();
        lock(&s).mark_run_start(run_start);
        let mut cpus = cpus.into_iter();
        let Some(mut boot) = cpus.next() else {
            unreachable!("Vm::new creates at least one vCPU");
        };
        let server_stop = AtomicBool::new(false);
        let mut exits = std::thread::scope(|scope| {
            // Raised however this closure ends (a panicking vCPU 0 included), so the scope
            // never waits for a server that was not told to stop.
            let _stop_server = RaiseOnDrop(&server_stop);
            if let Some(sock) = control.as_deref() {
                let live = crate::control::server::Live {
                    session: &s,
                    board: &board,
                };
                let server_stop = &server_stop;
                let spawned = std::thread::Builder::new()
                    .name("veil-control".into())
                    .spawn_scoped(scope, move || {
                        crate::control::server::serve(sock, &live, server_stop)
                    });
                if let Err(e) = spawned {
                    log::warn!("control socket not served: cannot start its thread: {e}");
                }
            }
            let aps: Vec<_> = cpus
                .map(|mut cpu| {
                    scope.spawn(move || {
                        let end = cpu.run();
                        cpu.stop.stop(end);
                        (cpu.exits, cpu.cpu.ve_count())
                    })
                })
                .collect();
            let end = boot.run();
            boot.stop.stop(end);
            let mut exits = Vec::new();
            for ap in aps {
                // A vCPU thread that panicked has stopped the VM by unwinding: its counts are lost.
                exits.extend(ap.join().ok());
            }
            exits
        });
        exits.push((boot.exits.clone(), boot.cpu.ve_count()));
        let ve_injected = exits.iter().map(|e| e.1).sum();
        let exits: Vec<ExitCounts> = exits.into_iter().map(|e| e.0).collect();
        drop(boot);
        let end = stop.take().unwrap_or(ExitInfo::KvmError {
            error: "no vCPU reported why it stopped".into(),
        });
        let s = match Arc::try_unwrap(s) {
            Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
            Err(_) => unreachable!("every vCPU's handle on the session is dropped"),
        };
        let vcpus = VcpuSummary {
            count,
            parks: stop.threads.counts(),
            ve_injected,
        };
        Ok(s.finish(end, run_start.elapsed(), sum(&exits), vcpus))
    }

    /// The session behind its lock, the run's stop, and one run loop per vCPU sharing them
    /// (publishing on `board`).
    fn into_parts(self, board: &Arc<VcpuBoard>) -> (Arc<Mutex<Session>>, Arc<RunStop>, Vec<Vcpu>) {
        let doorbells = self.s.doorbells();
        let s = Arc::new(Mutex::new(self.s));
        let stop = Arc::new(RunStop {
            stopping: AtomicBool::new(false),
            first: Mutex::new(None),
            threads: self.threads.clone(),
            doorbells,
        });
        let cpus = self
            .vcpus
            .into_iter()
            .enumerate()
            .map(|(index, vcpu)| Vcpu {
                vcpu,
                cpu: VcpuState::new(index),
                exits: ExitCounts::default(),
                s: s.clone(),
                stop: stop.clone(),
                timeout: self.timeout,
                progress: Arc::new(AtomicU64::new(0)),
                last_exit: Instant::now(),
                faults: FaultRepeat::default(),
                stalls: StallSampler::default(),
                board: board.clone(),
                rung: 0,
            })
            .collect();
        (s, stop, cpus)
    }
}

/// Raises its flag when dropped.
struct RaiseOnDrop<'a>(&'a AtomicBool);

impl Drop for RaiseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The exit counters of all vCPUs added up.
fn sum(all: &[ExitCounts]) -> ExitCounts {
    let mut t = ExitCounts::default();
    for c in all {
        t.total += c.total;
        t.hypercalls += c.hypercalls;
        t.bare += c.bare;
        t.pio += c.pio;
        t.mmio += c.mmio;
        t.memory_faults += c.memory_faults;
    }
    t
}

/// How the vCPU threads of one run stop together: the first stop is kept, a flag every run
/// loop checks before `KVM_RUN` is raised, and every other vCPU thread is kicked
/// ([`crate::shootdown`] has the kick scheme).
struct RunStop {
    stopping: AtomicBool,
    first: Mutex<Option<ExitInfo>>,
    threads: Arc<Vcpus>,
    /// The session's doorbells: every one is rung on a stop.
    doorbells: Arc<Doorbells>,
}

impl RunStop {
    /// Records `end` if it is the first stop, and stops every vCPU.
    fn stop(&self, end: Result<ExitInfo, VmError>) {
        let end = end.unwrap_or_else(|e| ExitInfo::KvmError {
            error: e.to_string(),
        });
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(end);
        drop(first);
        self.stopping.store(true, Ordering::SeqCst);
        self.threads.kick_others();
        self.doorbells.ring_all();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn take(&self) -> Option<ExitInfo> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Vcpu {
    /// The session, locked, with this vCPU's state lent to it. Borrows `self` whole, so the
    /// compiler rejects a second lock while one is held.
    fn s(&mut self) -> Lent<'_> {
        let mut guard = lock(&self.s);
        guard.lend(&mut self.cpu);
        Lent {
            guard,
            cpu: &mut self.cpu,
        }
    }

    /// The VM-wide session state, locked, for read-only questions that need no vCPU state
    /// (stage-2 state, the checked view). Do not call it while holding [`Vcpu::s`].
    fn vm(&self) -> MutexGuard<'_, Session> {
        lock(&self.s)
    }

    /// Runs this vCPU on the calling thread until the VM stops, under a watchdog.
    fn run(&mut self) -> Result<ExitInfo, VmError> {
        watchdog::install_handler().map_err(|source| VmError::Io {
            what: "cannot install the vCPU kick handler",
            source,
        })?;
        // SAFETY: this thread runs `self.vcpu`; the watchdog is dropped and the kick
        // unregistered below, before this function returns and the VcpuFd can go.
        let kick = unsafe { watchdog::Kick::new(&mut self.vcpu) };
        let dog = Watchdog::start(self.timeout, self.progress.clone(), kick).map_err(|source| {
            VmError::Io {
                what: "cannot start the watchdog",
                source,
            }
        })?;
        let kick_me = signals::VcpuRegistration::new();
        self.stop.threads.register(Some(kick));
        self.last_exit = Instant::now();
        let stop = self.run_loop(&dog);
        self.board.set_state(self.cpu.index(), VcpuRunState::Exited);
        self.stop.threads.register(None);
        drop(kick_me);
        drop(dog);
        Ok(stop)
    }

    fn regs_dump(&self) -> RegsDump {
        regs_dump(&self.vcpu)
    }

    fn run_loop(&mut self, dog: &Watchdog) -> ExitInfo {
        loop {
            if self.stop.stopping() {
                // Another vCPU stopped the VM: its stop is the one reported.
                return ExitInfo::Halted {
                    regs: self.regs_dump(),
                };
            }
            if dog.fired() {
                return self.timeout_exit();
            }
            if let Some(signal) = signals::pending() {
                return ExitInfo::Interrupted {
                    signal,
                    name: signals::name(signal),
                    regs: self.regs_dump(),
                };
            }
            if signals::take_dump_request() {
                self.s().signal_dump();
            }
            let index = self.cpu.index();
            if self.stop.threads.parking() {
                self.board.set_state(index, VcpuRunState::Parked);
            }
            let (action, progress) = {
                let _in_guest = self.stop.threads.enter();
                dispatch(self.vcpu.run(), &mut self.exits)
            };
            match action {
                Action::Halted => self.board.set_state(index, VcpuRunState::Halted),
                // A kick says nothing about what the guest is doing.
                Action::Kicked => {}
                _ => self.board.set_state(index, VcpuRunState::Running),
            }
            let rip = self.vcpu.sync_regs().regs.rip;
            self.board.publish(index, &self.exits, rip);
            if progress != Progress::None {
                self.last_exit = Instant::now();
                self.progress.store(self.exits.total, Ordering::Relaxed);
                if progress == Progress::Exit {
                    self.faults.progress();
                }
            }
            if let Some(stop) = self.act(action, dog) {
                return stop;
            }
        }
    }

    /// Carries out one [`Action`] of [`dispatch`]; `Some` stops the VM.
    fn act(&mut self, action: Action, dog: &Watchdog) -> Option<ExitInfo> {
        match action {
            Action::Resume => None,
            Action::Hypercall => {
                let r = self.vcpu.sync_regs_mut().regs;
                let args = [r.rdi, r.rsi, r.rcx, r.r8];
                let out = match self.route_exception(r.rax as u32, args) {
                    Some(out) => out,
                    None => self.s().hypercall(r.rax as u32, args),
                };
                let m = self.vcpu.sync_regs_mut();
                m.regs.rax = out.status as u64;
                m.regs.rdi = out.r0;
                m.regs.rsi = out.r1;
                self.vcpu.set_sync_dirty_reg(SyncReg::Register);
                out.stop.map(|stop| self.fill_regs(stop))
            }
            Action::ConsoleOut { port, data } => {
                // String or wide I/O: one UART write per element (its low byte).
                let size = if data.len() <= 1 { 1 } else { self.pio_size() };
                let mut s = self.s();
                for chunk in data.chunks(size) {
                    s.console.write(port, chunk[0]);
                }
                None
            }
            Action::ConsoleIn { port, len } => {
                // String or wide I/O: one UART read per element, zero-extended.
                let size = if len <= 1 { 1 } else { self.pio_size() };
                let mut bytes = vec![0u8; len];
                let mut s = self.s();
                for chunk in bytes.chunks_mut(size) {
                    chunk[0] = s.console.read(port);
                }
                drop(s);
                // SAFETY: handling this KVM_EXIT_IO exit; `len` is its data length.
                unsafe { self.pio_data_mut(len) }.copy_from_slice(&bytes);
                None
            }
            Action::Mmio { gpa, access, len } => {
                let rip = self.sync_rip();
                let mut buf = [0u8; 8];
                let data = self.mmio_data_mut(len);
                let n = data.len();
                buf[..n].copy_from_slice(data);
                let stop = self.s().mmio_access(Gpa(gpa), access, &mut buf[..n], rip);
                if access == AccessKind::Read {
                    self.mmio_data_mut(len).copy_from_slice(&buf[..n]);
                }
                if let Some(ve) = self.cpu.take_ve() {
                    if stop.is_none() {
                        match self.inject_ve(ve) {
                            Ok(true) => return None,
                            Ok(false) => {}
                            Err(stop) => return Some(*stop),
                        }
                    }
                }
                stop.or_else(|| self.fault_loop(gpa, access))
            }
            Action::InternalError => self.internal_error(),
            Action::MemoryFault { gpa, size } => self.memory_fault_exit(gpa, size),
            Action::Efault(e) => self.memory_fault(&e),
            Action::Shutdown => Some(self.shutdown()),
            Action::Halted if self.cpu.index() != BOOT_VCPU => {
                // A parked vCPU idles in `hlt` (there is no interrupt to wake it): it looks
                // at its mailbox again when its bell rings, or after `IDLE_MAX`.
                let index = self.cpu.index();
                self.stop
                    .doorbells
                    .wait(index, &mut self.rung, doorbell::IDLE_MAX);
                None
            }
            Action::Halted => Some(ExitInfo::Halted {
                regs: self.regs_dump(),
            }),
            Action::Wrmsr { index, value } => {
                let rip = self.vcpu.sync_regs_mut().regs.rip;
                let mut s = lock(&self.s);
                s.lend(&mut self.cpu);
                let (error, stop) = crate::pv_msrs::on_write(&mut s, &self.vcpu, index, value, rip);
                s.lend(&mut self.cpu);
                drop(s);
                self.set_msr_error(error);
                stop
            }
            Action::Unexpected(what) => Some(ExitInfo::UnexpectedExit {
                what,
                regs: self.regs_dump(),
            }),
            Action::Kicked => {
                watchdog::set_immediate_exit(&mut self.vcpu, 0);
                match dog.take_sample() {
                    true => self.stall_sample(),
                    false => None,
                }
            }
            Action::KvmError(error) => Some(ExitInfo::KvmError { error }),
        }
    }

    /// Replaces the placeholder registers of an exit built inside a hypercall by the real ones.
    fn fill_regs(&self, mut stop: ExitInfo) -> ExitInfo {
        if let ExitInfo::GuestException { regs, .. } = &mut stop {
            *regs = self.regs_dump();
        }
        stop
    }

    fn sync_rip(&mut self) -> u64 {
        self.vcpu.sync_regs_mut().regs.rip
    }

    /// Element size of the port I/O exit being handled (1, 2 or 4).
    fn pio_size(&mut self) -> usize {
        kvm_run::io_size(&mut self.vcpu)
    }

    /// The data of the port I/O exit being handled (`len` = count * size bytes).
    ///
    /// # Safety
    /// As [`kvm_run::io_data`]: while handling a `KVM_EXIT_IO` exit, with its data length.
    unsafe fn pio_data_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: forwarded contract.
        unsafe { kvm_run::io_data(&mut self.vcpu, len) }
    }

    /// Sets the `error` byte of the `KVM_EXIT_X86_WRMSR` exit being handled (1 injects #GP).
    fn set_msr_error(&mut self, error: u8) {
        kvm_run::set_msr_error(&mut self.vcpu, error)
    }

    fn mmio_data_mut(&mut self, len: usize) -> &mut [u8] {
        kvm_run::mmio_data(&mut self.vcpu, len)
    }
}

fn regs_from(r: &kvm_bindings::kvm_regs) -> RegsDump {
    RegsDump {
        rip: r.rip,
        rsp: r.rsp,
        rflags: r.rflags,
        gprs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15,
        ],
        ..Default::default()
    }
}

/// The most vCPUs `--vcpus` may ask for here: KVM's maximum, at most `veil_abi::MAX_VCPUS`.
pub fn vcpu_limit(kvm: &Kvm) -> u32 {
    u32::try_from(kvm.get_max_vcpus())
        .unwrap_or(1)
        .clamp(1, veil_abi::MAX_VCPUS)
}

/// General and control registers of `vcpu`.
pub fn regs_dump(vcpu: &VcpuFd) -> RegsDump {
    let mut d = match vcpu.get_regs() {
        Ok(r) => regs_from(&r),
        Err(_) => regs_from(&vcpu.sync_regs().regs),
    };
    if let Ok(s) = vcpu.get_sregs() {
        d.cr0 = s.cr0;
        d.cr2 = s.cr2;
        d.cr3 = s.cr3;
        d.cr4 = s.cr4;
        d.efer = s.efer;
        d.cs = s.cs.selector;
    }
    d
}

/// The poison byte loads from unmapped RAM return.
pub const POISON: u8 = POISON_BYTE;

/// Boots `cfg` and runs it to the end.
pub fn run(cfg: VmConfig) -> Result<RunReport, VmError> {
    let syms = crate::symbols::Symbols::from_elf(&cfg.guest);
    let mut report = Vm::new(cfg)?.run()?;
    report.resolve_symbols(&syms);
    Ok(report)
}
