//! `veil run --kernel FILE` and its options: the command-line side of foreign kernels.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cli::{check_output_path, dump_config, read_guest_file, say, timeout, Failure, RunArgs};
use crate::console::ConsoleSink;
use crate::foreign::{self, Feature, ForeignConfig, ForeignExit, Module, SecretRange};
use crate::report::exit_code;

/// Largest `--module` / `--initrd` file read.
pub const MAX_MODULE_FILE: u64 = 1 << 30;

/// Options of `veil run` for foreign kernels (`--kernel`).
#[derive(Debug, Args, Clone, Default)]
pub struct ForeignArgs {
    /// Boot a kernel nobody here wrote instead of a Veil guest: a multiboot v1 kernel (ELF32
    /// or ELF64, e.g. kvm-unit-tests' x86/*.flat and *.elf; the header's address fields are
    /// honoured when present), entered in 32-bit protected mode with paging off, flat
    /// segments, EAX=0x2BADB002 and EBX = the multiboot info block (mem_lower/mem_upper,
    /// command line, modules, memory map); or a Linux bzImage or ELF vmlinux (loaded by
    /// linux-loader, entered by the 64-bit boot protocol with boot_params and an e820 map).
    /// The machine has the in-kernel irqchip and PIT, COM1, a minimal fw_cfg and QEMU's
    /// isa-debug-exit port 0xf4: a write of V ends the run (QEMU's status V<<1|1); V=0 is
    /// PASS (exit code 0), V=38 SKIP (QEMU status 77; exit code 0), anything else FAIL (exit code 1); a triple
    /// fault, emulation failure or timeout is exit code 3. `--vcpus N`: the APs wait in
    /// KVM_RUN for the guest's INIT/SIPI. Conflicts with --guest and --tests.
    #[arg(long, value_name = "FILE", conflicts_with = "guest")]
    pub kernel: Option<PathBuf>,

    /// The kernel's command line (with --kernel). A multiboot kernel gets "FILE STR" (its own
    /// name first, as GRUB and QEMU pass it); Linux gets STR as it is. At most 4095 bytes.
    #[arg(
        long,
        value_name = "STR",
        requires = "kernel",
        allow_hyphen_values = true
    )]
    pub cmdline: Option<String>,

    /// A multiboot module (repeatable, in order; with a multiboot --kernel): the file is
    /// loaded page-aligned after the kernel, its module string is its path. kvm-unit-tests
    /// reads its first module as its environment, e.g. a file holding `NR_CPUS=2`.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub module: Vec<PathBuf>,

    /// An initramfs for a Linux --kernel, loaded page-aligned at the top of the RAM below the
    /// kernel's initrd_addr_max.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// Hide CPUID features from a --kernel (comma-separated), for instructions this host's
    /// KVM cannot run: on a nested host without EPT (kvm_pvm), ring-0 code is emulated and the
    /// emulator lacks cmpxchg16b (cx16), xgetbv (xsave; hide avx,avx2,avx512f with it), clac
    /// (smap), clwb, SSE integer instructions (sse4_1, sse4_2, aes). Known: cx16, xsave, avx,
    /// sse4_1, sse4_2, popcnt, aes, x2apic, tsc_deadline_timer, rdrand, pcid, avx2, smep,
    /// smap, avx512f, clflushopt, clwb, pku, la57, spec_ctrl, flush_l1d, arch_capabilities,
    /// ssbd, pdpe1gb, rdtscp (docs/ARCHITECTURE.md says why each). Veil clears the bits in
    /// the CPUID table it gives KVM; a KVM may still report some (kvm_pvm here keeps XSAVE,
    /// AVX and the SSE4 bits, and hides only cx16 and x2apic of those).
    #[arg(
        long,
        value_name = "FEATURE,...",
        value_delimiter = ',',
        requires = "kernel"
    )]
    pub cpuid_mask: Vec<Feature>,

    /// Remove GPA range [START, START+SIZE) from stage 2 for a --kernel (repeatable): a
    /// hypervisor-level memfd_secret. START in bytes (decimal or 0x hex), SIZE with an
    /// optional K/M/G suffix; both multiples of 4 KiB, inside RAM above the first MiB, ranges
    /// not overlapping (else a usage error). The memory map (multiboot, e820) marks them
    /// reserved; any guest access is a violation (loads read 0xa5, stores are dropped, or
    /// --on-violation kill stops the run), listed in the report, and fails the run.
    #[arg(long, value_name = "START,SIZE", requires = "kernel")]
    pub secret: Vec<SecretRange>,

    /// Fill every --secret range with BYTE host-side before the guest starts (decimal or 0x
    /// hex); the report then says whether every byte still held it at the end.
    #[arg(long, value_name = "BYTE", requires = "secret", value_parser = parse_byte)]
    pub secret_fill: Option<u8>,
}

fn parse_byte(s: &str) -> std::result::Result<u8, String> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u8::from_str_radix(h, 16),
        None => t.parse::<u8>(),
    };
    v.map_err(|_| format!("{s:?} is not a byte (0-255 or 0x00-0xff)"))
}

impl std::str::FromStr for SecretRange {
    type Err = foreign::secret_ranges::SecretError;
    fn from_str(s: &str) -> std::result::Result<SecretRange, Self::Err> {
        foreign::secret_ranges::parse(s)
    }
}

impl std::str::FromStr for Feature {
    type Err = foreign::cpuid_mask::UnknownFeature;
    fn from_str(s: &str) -> std::result::Result<Feature, Self::Err> {
        foreign::cpuid_mask::parse(s)
    }
}

fn read_small(p: &Path, what: &str) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(p).with_context(|| format!("cannot read {what} {}", p.display()))?;
    if !meta.is_file() {
        bail!("{what} {} is not a regular file", p.display());
    }
    if meta.len() > MAX_MODULE_FILE {
        bail!(
            "{what} {} is larger than {MAX_MODULE_FILE} bytes",
            p.display()
        );
    }
    std::fs::read(p).with_context(|| format!("cannot read {what} {}", p.display()))
}

/// `veil run --kernel FILE`.
pub fn cmd_run_kernel(args: &RunArgs, kernel: &Path, start: Instant) -> Result<i32, Failure> {
    let _ = start;
    if !args.tests.is_empty() {
        return Err(anyhow::anyhow!(
            "--tests selects tests of a Veil guest; a --kernel runs as it is (give it its own command line with --cmdline)"
        )
        .into());
    }
    if args.host_secretmem {
        return Err(anyhow::anyhow!("--host-secretmem is not available with --kernel").into());
    }
    let f = &args.foreign;
    let bytes = read_guest_file(kernel).context("cannot read the --kernel")?;
    let name = kernel.display().to_string();
    let syms = crate::symbols::Symbols::from_elf(&bytes);
    let mut cfg = ForeignConfig::new(bytes, &name);
    cfg.cmdline = f.cmdline.clone().unwrap_or_default();
    for m in &f.module {
        cfg.modules.push(Module {
            cmdline: m.display().to_string(),
            bytes: read_small(m, "the --module")?,
        });
    }
    if let Some(p) = &f.initrd {
        cfg.initrd = Some(read_small(p, "the --initrd")?);
    }
    cfg.mem = args.guest.mem;
    cfg.vcpus = args.vcpus;
    cfg.timeout = timeout(args.guest.timeout)?;
    cfg.cpuid_mask = f.cpuid_mask.clone();
    cfg.secrets = f.secret.clone();
    cfg.secret_fill = f.secret_fill;
    cfg.on_violation = args.on_violation;
    cfg.stage2 = args.stage2;
    cfg.dump = dump_config(args)?;
    if args.dump_guest_core {
        cfg.core_dump = crate::memory::CoreDump::Include;
    }
    if let Some(p) = &args.guest.console {
        check_output_path(p, "the console file")?;
        cfg.console = ConsoleSink::File(p.clone());
    } else if args.json {
        cfg.console = ConsoleSink::Stderr;
    }
    let mut report = foreign::run(cfg).map_err(|e| Failure {
        code: exit_code::USAGE,
        error: anyhow::Error::new(e).context(format!("cannot boot {name}")),
    })?;
    report.resolve_symbols(&syms);
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report).context("cannot write the report")?;
        writeln!(out).context("cannot write the report")?;
    } else {
        for v in report.violations.iter().take(20) {
            say(&format!(
                "violation: {} of {} bytes at {} (rip {:#x}{}, vCPU {}): {}",
                v.access,
                v.size,
                v.gpa
                    .map(|g| format!("{g:#x}"))
                    .unwrap_or_else(|| "an unknown address".into()),
                v.rip,
                crate::report::symbol_suffix(&v.rip_symbol),
                v.vcpu,
                v.action
            ));
        }
        for r in &report.stage2_ranges {
            if r.state != crate::stage2::RangeState::Mapped {
                say(&format!(
                    "stage 2: [{:#x}, {:#x}) {}{}",
                    r.start.raw(),
                    r.end.raw(),
                    r.state.name(),
                    if r.state == crate::stage2::RangeState::Unmapped {
                        " (--secret)"
                    } else {
                        ""
                    }
                ));
            }
        }
        if let Some(intact) = report.secrets_intact {
            say(&format!(
                "--secret ranges {}",
                if intact {
                    "intact (every byte still holds --secret-fill)"
                } else {
                    "CHANGED: a store reached a secret range"
                }
            ));
        }
    }
    say(&report.summary());
    for e in &report.dump_errors {
        say(&format!("error: {e}"));
    }
    if let ForeignExit::Shutdown { regs: Some(r), .. } | ForeignExit::Crash { regs: Some(r), .. } =
        &report.exit
    {
        say(&format!(
            "registers: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            r.rip, r.rsp, r.rflags, r.cr0, r.cr3, r.cr4, r.efer
        ));
    }
    Ok(report.exit_code())
}
