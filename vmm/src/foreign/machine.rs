//! The machine a foreign kernel runs on: KVM VM with the in-kernel irqchip and PIT, RAM
//! through the stage-2 engine (with the `--secret` ranges removed), COM1, fw_cfg and the
//! isa-debug-exit port; one thread per vCPU, vCPU 0 entered by the kernel's boot protocol and
//! the others left uninitialised in `KVM_RUN` until the guest's INIT/SIPI starts them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_regs, kvm_segment, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use veil_abi::POISON_BYTE;

use crate::addr::Gpa;
use crate::console::Console;
use crate::dump::{DumpInput, DumpSource, OwnedSpan, OWNER_SECRET};
use crate::foreign::fw_cfg::{self, FwCfg};
use crate::foreign::multiboot::{self, MapEntry};
use crate::foreign::secret_ranges::{self, SecretRange};
use crate::foreign::{
    cpuid_mask, detect, linux, result_of, ForeignConfig, ForeignError, ForeignExit, ForeignReport,
    ForeignViolation, KernelKind, DEBUG_EXIT_PORT, MAX_VIOLATIONS,
};
use crate::memory::{Backing, GuestRam};
use crate::run_types::{GuestBackend, ViolationPolicy};
use crate::signals;
use crate::stage2::{BackendKind, KvmSlots, Mprotect, Slots, Stage2Engine};
use crate::vm::regs_dump;
use crate::watchdog::{self, Kick, Watchdog};

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ForeignError {
    move |source| ForeignError::Kvm { what, source }
}

/// What the vCPU threads share.
struct Shared {
    console: Mutex<Console>,
    fw_cfg: Mutex<FwCfg>,
    secrets: Vec<SecretRange>,
    policy: ViolationPolicy,
    ram_size: u64,
    stop: AtomicBool,
    end: Mutex<Option<ForeignExit>>,
    kicks: Mutex<Vec<Option<Kick>>>,
    violations: Mutex<(Vec<ForeignViolation>, u64)>,
    not_ram: AtomicU64,
    exits: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Records how the run ends (the first stop wins) and kicks every vCPU.
    fn finish(&self, exit: ForeignExit) {
        {
            let mut end = lock(&self.end);
            if end.is_none() {
                *end = Some(exit);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        for k in lock(&self.kicks).iter().flatten() {
            k.kick();
        }
    }

    fn secret_at(&self, gpa: u64) -> Option<usize> {
        self.secrets.iter().position(|r| r.contains(gpa))
    }

    fn record(&self, v: ForeignViolation) {
        let mut g = lock(&self.violations);
        g.1 += 1;
        if g.0.len() < MAX_VIOLATIONS {
            g.0.push(v);
        }
    }
}

/// Checks that `[start, end)` (a loaded piece) keeps off the secret ranges.
fn keep_off(secrets: &[SecretRange], what: &str, start: u64, end: u64) -> Result<(), ForeignError> {
    if secrets.iter().any(|s| s.meets(start, end)) {
        return Err(ForeignError::SecretOverlapsImage {
            what: what.to_string(),
            start,
            end,
        });
    }
    Ok(())
}

/// How vCPU 0 is entered.
enum Entry {
    /// 32-bit protected mode, paging off.
    Multiboot { eip: u32, info: u32 },
    /// 64-bit Linux boot protocol.
    Linux { rip: u64 },
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn enter(vcpu: &VcpuFd, entry: &Entry) -> Result<(), ForeignError> {
    let s = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS failed"))?;
    let (sregs, regs) = match *entry {
        Entry::Multiboot { eip, info } => {
            let mut s = s;
            s.cs = flat(0x08, 0xb);
            let data = flat(0x10, 0x3);
            s.ds = data;
            s.es = data;
            s.fs = data;
            s.gs = data;
            s.ss = data;
            s.cr0 = 0x11; // PE | ET, paging off
            s.cr4 = 0;
            s.cr3 = 0;
            s.efer = 0;
            let r = kvm_regs {
                rip: u64::from(eip),
                rax: u64::from(multiboot::BOOTLOADER_MAGIC),
                rbx: u64::from(info),
                rflags: 0x2,
                ..Default::default()
            };
            (s, r)
        }
        Entry::Linux { rip } => (linux::entry_sregs(s), linux::entry_regs(rip)),
    };
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err("KVM_SET_SREGS failed"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS failed"))
}

/// Loads the kernel by its kind; returns how to enter it.
fn load_kernel(
    cfg: &ForeignConfig,
    kind: KernelKind,
    ram: &GuestRam,
    secrets: &[SecretRange],
    map: &[MapEntry],
) -> Result<Entry, ForeignError> {
    match kind {
        KernelKind::Multiboot => {
            if cfg.initrd.is_some() {
                return Err(ForeignError::Option(
                    "--initrd is for Linux kernels: give a multiboot kernel its files with --module"
                        .into(),
                ));
            }
            let header = multiboot::find_header(&cfg.kernel).ok_or(ForeignError::UnknownKind)?;
            let lay = multiboot::layout(&cfg.kernel, &header, ram.size())?;
            for s in &lay.segments {
                keep_off(secrets, "a kernel segment", s.gpa, s.gpa + s.mem_len)?;
            }
            let mods_len: u64 = cfg
                .modules
                .iter()
                .map(|m| (m.bytes.len() as u64).next_multiple_of(4096))
                .sum();
            keep_off(
                secrets,
                "the modules",
                lay.end(),
                lay.end().next_multiple_of(4096) + mods_len,
            )?;
            multiboot::load(ram, &cfg.kernel, &lay)?;
            let cmdline = if cfg.cmdline.is_empty() {
                cfg.kernel_name.clone()
            } else {
                format!("{} {}", cfg.kernel_name, cfg.cmdline)
            };
            let info = multiboot::write_info(ram, &cmdline, &cfg.modules, lay.end(), map)?;
            Ok(Entry::Multiboot {
                eip: lay.entry,
                info,
            })
        }
        KernelKind::Bzimage | KernelKind::Vmlinux => {
            if !cfg.modules.is_empty() {
                return Err(ForeignError::Option(
                    "--module is for multiboot kernels: give Linux its initramfs with --initrd"
                        .into(),
                ));
            }
            let l = linux::load(
                ram,
                kind,
                &cfg.kernel,
                &cfg.cmdline,
                cfg.initrd.as_deref(),
                map,
            )?;
            keep_off(secrets, "the kernel", l.kernel.0, l.kernel.1)?;
            if let Some((a, b)) = l.initrd {
                keep_off(secrets, "the initrd", a, b)?;
            }
            if l.pvh_note {
                log::info!("the ELF has a PVH entry note; Veil boots it by the 64-bit protocol");
            }
            Ok(Entry::Linux { rip: l.entry })
        }
    }
}

/// Boots and runs `cfg` (see the module docs).
pub fn run(cfg: ForeignConfig) -> Result<ForeignReport, ForeignError> {
    let t0 = Instant::now();
    let kind = detect(&cfg.kernel).ok_or(ForeignError::UnknownKind)?;
    let ram_size = cfg.mem.0;
    let secrets = secret_ranges::check(&cfg.secrets, ram_size)?;
    let map = secret_ranges::memory_map(ram_size, &secrets);

    let kvm = Kvm::new().map_err(kvm_err(
        "cannot open /dev/kvm (is KVM available and accessible?)",
    ))?;
    let max = crate::vm::vcpu_limit(&kvm);
    if cfg.vcpus == 0 || cfg.vcpus > max {
        return Err(ForeignError::BadVcpus {
            asked: cfg.vcpus,
            max,
        });
    }
    let vm: Arc<VmFd> = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM failed"))?);
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("KVM_SET_TSS_ADDR failed"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP failed"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2 failed"))?;

    let backing = match cfg.stage2 {
        BackendKind::Slots => Backing::Anonymous,
        BackendKind::Mprotect => Backing::Memfd,
    };
    let ram = Arc::new(GuestRam::create(cfg.mem, cfg.core_dump, backing)?);
    let entry = load_kernel(&cfg, kind, &ram, &secrets, &map)?;
    if let Some(b) = cfg.secret_fill {
        for s in &secrets {
            ram.fill(s.start.raw(), s.size, b).map_err(|_| {
                ForeignError::Option(format!("cannot fill --secret at {:#x}", s.start.raw()))
            })?;
        }
    }

    let max_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(32);
    let backend: GuestBackend = match cfg.stage2 {
        BackendKind::Slots => Box::new(Slots::new(
            KvmSlots::new(vm.clone(), ram.clone(), max_slots),
            ram_size,
        )),
        BackendKind::Mprotect => Box::new(Mprotect::new(vm.clone(), ram.clone())?),
    };
    // The first MiB is "reserved" (always mapped); everything else starts mapped and each
    // secret range is removed once, for the whole run.
    let mut engine = Stage2Engine::new(backend, ram_size, Gpa(secret_ranges::LOW_HOLE_END))?;
    for s in &secrets {
        engine.unmap_range(s.start, s.size)?;
    }

    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID failed"))?;
    cpuid_mask::apply(&mut cpuid, &cfg.cpuid_mask);
    let mut vcpus = Vec::new();
    for index in 0..cfg.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU failed"))?;
        vcpu.set_cpuid2(&crate::boot::vcpu_cpuid(&cpuid, index))
            .map_err(kvm_err("KVM_SET_CPUID2 failed"))?;
        if index == 0 {
            enter(&vcpu, &entry)?;
        }
        vcpus.push(vcpu);
    }
    watchdog::install_handler().map_err(|source| ForeignError::Io {
        what: "cannot install the kick signal handler",
        source,
    })?;
    let console = Console::new(&cfg.console).map_err(|source| ForeignError::Io {
        what: "cannot open the console output",
        source,
    })?;
    let shared = Shared {
        console: Mutex::new(console),
        fw_cfg: Mutex::new(FwCfg::new(ram_size, cfg.vcpus as u16)),
        secrets: secrets.clone(),
        policy: cfg.on_violation,
        ram_size,
        stop: AtomicBool::new(false),
        end: Mutex::new(None),
        kicks: Mutex::new(vec![None; cfg.vcpus as usize]),
        violations: Mutex::new((Vec::new(), 0)),
        not_ram: AtomicU64::new(0),
        exits: AtomicU64::new(0),
    };
    let timeout = cfg.timeout;
    std::thread::scope(|scope| {
        let mut rest = vcpus.iter_mut();
        let first = rest.next();
        for (i, v) in rest.enumerate() {
            let sh = &shared;
            let idx = i as u32 + 1;
            let spawned = std::thread::Builder::new()
                .name(format!("veil-vcpu{idx}"))
                .spawn_scoped(scope, move || vcpu_thread(idx, v, sh, None));
            if let Err(e) = spawned {
                shared.finish(ForeignExit::Crash {
                    vcpu: idx,
                    reason: format!("cannot start the vCPU thread: {e}"),
                    regs: None,
                });
            }
        }
        if let Some(v) = first {
            vcpu_thread(0, v, &shared, Some(timeout));
        }
        shared.finish(ForeignExit::Halted {
            vcpu: 0,
            what: "run loop ended".into(),
        });
    });
    lock(&shared.console).flush();
    let exit = lock(&shared.end).take().unwrap_or(ForeignExit::Halted {
        vcpu: 0,
        what: "no stop recorded".into(),
    });
    let secrets_intact = cfg.secret_fill.map(|b| {
        secrets
            .iter()
            .all(|s| ram.count(s.start.raw(), s.size, b).ok() == Some(s.size))
    });
    let (dumps, dump_errors) = exit_dump(&cfg, &vm, &ram, &engine, &secrets);
    for s in &secrets {
        let _ = ram.wipe(s.start.raw(), s.size);
    }
    let stage2_ranges = engine.ranges();
    drop(engine);
    let (violations, violations_total) = std::mem::take(&mut *lock(&shared.violations));
    Ok(ForeignReport {
        kernel: kind,
        result: result_of(&exit),
        exit,
        secrets: secrets.iter().map(|s| (s.start.raw(), s.size)).collect(),
        secrets_intact,
        violations,
        violations_total,
        not_ram: shared.not_ram.load(Ordering::Relaxed),
        exits: shared.exits.load(Ordering::Relaxed),
        vcpus: cfg.vcpus,
        stage2: cfg.stage2,
        stage2_ranges,
        wall_ms: t0.elapsed().as_secs_f64() * 1e3,
        dumps,
        dump_errors,
    })
}

/// The exit-time `--dump-ept` of a foreign kernel: gathered from the stage-2 engine alone (no
/// allocator), the `--secret` ranges labelled "secret", rendered and written as a Veil
/// guest's exit dump is. Returns the dumps written and the errors.
fn exit_dump(
    cfg: &ForeignConfig,
    vm: &VmFd,
    ram: &GuestRam,
    engine: &Stage2Engine<GuestBackend>,
    secrets: &[SecretRange],
) -> (Vec<String>, Vec<String>) {
    let Some(dcfg) = &cfg.dump else {
        return (Vec::new(), Vec::new());
    };
    let stats = crate::kvm_stats::read_vm_stats(vm).ok();
    let base = ram.host_base();
    let host_addr = move |gpa: u64| base + gpa;
    let owners: Vec<OwnedSpan<'_>> = secrets
        .iter()
        .map(|s| OwnedSpan {
            start: s.start.raw(),
            end: s.start.raw() + s.size,
            owner: OWNER_SECRET,
        })
        .collect();
    let input = DumpInput {
        source: DumpSource::Engine(engine),
        owners: &owners,
        kvm_stats: stats.as_deref(),
        reason: "exit",
        host_addr: &host_addr,
        mermap: None,
    };
    let path = crate::session::exit_path(&dcfg.target);
    match crate::session::render_and_write(&input, dcfg.format, path.as_deref(), true) {
        Ok((name, _)) => (vec![name], Vec::new()),
        Err(msg) => (Vec::new(), vec![msg]),
    }
}

/// One vCPU's thread: registers its kick (and, for vCPU 0, the watchdog), runs, unregisters.
fn vcpu_thread(
    idx: u32,
    vcpu: &mut VcpuFd,
    sh: &Shared,
    timeout: Option<Option<std::time::Duration>>,
) {
    let _signals = signals::VcpuRegistration::new();
    // SAFETY: this thread runs `vcpu`; the kick is removed from `sh.kicks` (under its lock)
    // before this function returns, and the watchdog holding a copy is dropped before too.
    let kick = unsafe { Kick::new(vcpu) };
    lock(&sh.kicks)[idx as usize] = Some(kick);
    let exits = Arc::new(AtomicU64::new(0));
    let dog = match timeout {
        Some(t) => match Watchdog::start(t, exits.clone(), kick) {
            Ok(d) => Some((d, t)),
            Err(e) => {
                sh.finish(ForeignExit::Crash {
                    vcpu: idx,
                    reason: format!("cannot start the watchdog: {e}"),
                    regs: None,
                });
                None
            }
        },
        None => None,
    };
    if let Some(end) = run_loop(idx, vcpu, sh, dog.as_ref(), &exits) {
        sh.finish(end);
    }
    drop(dog);
    lock(&sh.kicks)[idx as usize] = None;
}

fn crash(idx: u32, vcpu: &VcpuFd, reason: String) -> Option<ForeignExit> {
    Some(ForeignExit::Crash {
        vcpu: idx,
        reason,
        regs: Some(regs_dump(vcpu)),
    })
}

/// Runs until a stop; returns this vCPU's reason to stop (`None`: another vCPU's).
fn run_loop(
    idx: u32,
    vcpu: &mut VcpuFd,
    sh: &Shared,
    dog: Option<&(Watchdog, Option<std::time::Duration>)>,
    exits: &AtomicU64,
) -> Option<ForeignExit> {
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return None;
        }
        if let Some(sig) = signals::pending() {
            return Some(ForeignExit::Interrupted { signal: sig });
        }
        if let Some((d, t)) = dog {
            if d.fired() {
                return Some(ForeignExit::Timeout {
                    secs: t.map(|t| t.as_secs_f64()).unwrap_or(0.0),
                    regs: Some(regs_dump(vcpu)),
                });
            }
            let _ = d.take_sample();
        }
        let r = vcpu.run();
        exits.fetch_add(1, Ordering::Relaxed);
        sh.exits.fetch_add(1, Ordering::Relaxed);
        let v = match r {
            Ok(VcpuExit::IoOut(port, data)) => {
                let (port, data) = (port, data.to_vec());
                io_out(idx, port, &data, sh)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                io_in(port, data, sh);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let len = data.len();
                match sh.secret_at(addr) {
                    Some(range) => {
                        data.fill(POISON_BYTE);
                        violation(idx, vcpu, sh, Some(addr), "read", len, Some(range))
                    }
                    None => {
                        data.fill(0xff);
                        sh.not_ram.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let len = data.len();
                match sh.secret_at(addr) {
                    Some(range) => violation(idx, vcpu, sh, Some(addr), "write", len, Some(range)),
                    None => {
                        sh.not_ram.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
            Ok(VcpuExit::Hlt) => Some(ForeignExit::Halted {
                vcpu: idx,
                what: "hlt".into(),
            }),
            Ok(VcpuExit::Shutdown) => Some(ForeignExit::Shutdown {
                vcpu: idx,
                regs: Some(regs_dump(vcpu)),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(ForeignExit::Halted {
                vcpu: idx,
                what: format!("system event {kind} (power off or reset)"),
            }),
            Ok(VcpuExit::InternalError) => {
                crash(idx, vcpu, "KVM internal error (emulation failure: an instruction this host's KVM cannot emulate?)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                crash(idx, vcpu, format!("KVM entry failed (hardware reason {reason:#x}, CPU {cpu})"))
            }
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                crash(idx, vcpu, what)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                watchdog::set_immediate_exit(vcpu, 0);
                None
            }
            Err(e) if e.errno() == libc::EFAULT && !sh.secrets.is_empty() => {
                // The mprotect backend: a closed page KVM names no GPA for.
                let v = ForeignViolation {
                    gpa: None,
                    access: "unknown",
                    size: 0,
                    rip: regs_dump(vcpu).rip,
                    rip_symbol: None,
                    vcpu: idx,
                    range: None,
                    action: "stopped",
                };
                sh.record(v.clone());
                Some(ForeignExit::Killed { violation: v })
            }
            Err(e) => crash(idx, vcpu, format!("KVM_RUN failed: {e}")),
        };
        if v.is_some() {
            return v;
        }
    }
}

fn violation(
    idx: u32,
    vcpu: &VcpuFd,
    sh: &Shared,
    gpa: Option<u64>,
    access: &'static str,
    size: usize,
    range: Option<usize>,
) -> Option<ForeignExit> {
    let kill = sh.policy == ViolationPolicy::Kill;
    let action = match (kill, access) {
        (true, _) => "stopped",
        (false, "read") => "poisoned",
        _ => "dropped",
    };
    let v = ForeignViolation {
        gpa,
        access,
        size: size as u32,
        rip: vcpu.get_regs().map(|r| r.rip).unwrap_or(0),
        rip_symbol: None,
        vcpu: idx,
        range,
        action,
    };
    sh.record(v.clone());
    kill.then_some(ForeignExit::Killed { violation: v })
}

fn io_out(idx: u32, port: u16, data: &[u8], sh: &Shared) -> Option<ForeignExit> {
    let _ = idx;
    if Console::owns(port) {
        let mut c = lock(&sh.console);
        for b in data {
            c.write(port, *b);
        }
        return None;
    }
    match port {
        DEBUG_EXIT_PORT => {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            let value = u32::from_le_bytes(v);
            Some(ForeignExit::DebugExit {
                value,
                qemu_status: ((value << 1) | 1) & 0xff,
            })
        }
        fw_cfg::SELECTOR_PORT if data.len() >= 2 => {
            lock(&sh.fw_cfg).select(u16::from_le_bytes([data[0], data[1]]));
            None
        }
        _ => None,
    }
}

fn io_in(port: u16, data: &mut [u8], sh: &Shared) {
    if Console::owns(port) {
        let mut c = lock(&sh.console);
        for b in data.iter_mut() {
            *b = c.read(port);
        }
        return;
    }
    match port {
        fw_cfg::DATA_PORT => {
            let mut f = lock(&sh.fw_cfg);
            for b in data.iter_mut() {
                *b = f.read();
            }
        }
        _ => data.fill(0xff),
    }
    let _ = sh.ram_size;
}
