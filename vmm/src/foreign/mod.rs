//! Foreign kernels (`veil run --kernel FILE`): guests nobody here wrote, booted by the contract
//! they expect instead of Veil's. Multiboot v1 kernels (kvm-unit-tests) are entered in 32-bit
//! protected mode; Linux bzImage / vmlinux images are loaded by `linux-loader` and entered by
//! the 64-bit boot protocol. The machine has the in-kernel irqchip and PIT, COM1, a minimal
//! fw_cfg and QEMU's isa-debug-exit port; its APs are started by the guest with INIT/SIPI.
//! There is no Veil allocator: `--secret` ranges are removed from stage 2 through the engine
//! once, before the first instruction, and every access to them is a violation.
//!
//! The Veil-guest path (`--guest`, the embedded suite) does not go through here.

pub mod cli;
pub mod cpuid_mask;
pub mod fw_cfg;
pub mod linux;
pub mod machine;
pub mod multiboot;
pub mod secret_ranges;

use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::console::ConsoleSink;
use crate::memory::{CoreDump, MemSize, MemoryError};
use crate::report::exit_code;
use crate::report::RegsDump;
use crate::run_types::ViolationPolicy;
use crate::stage2::{BackendKind, EngineError, MprotectError};

pub use cpuid_mask::Feature;
pub use multiboot::Module;
pub use secret_ranges::SecretRange;

/// The I/O port of QEMU's isa-debug-exit device (kvm-unit-tests' `exit()`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The value kvm-unit-tests writes for "skipped": 77 >> 1, so that QEMU's status
/// (`value << 1 | 1`) is 77, autotools' "skipped".
pub const SKIP_VALUE: u32 = 77 >> 1;

/// Everything needed to boot one foreign kernel.
#[derive(Clone, Debug)]
pub struct ForeignConfig {
    /// The kernel file's bytes.
    pub kernel: Vec<u8>,
    /// The kernel's name (the first word of a multiboot command line, as GRUB and QEMU pass it).
    pub kernel_name: String,
    /// The command line given with `--cmdline`.
    pub cmdline: String,
    /// Multiboot modules (`--module`).
    pub modules: Vec<Module>,
    /// A Linux initrd (`--initrd`).
    pub initrd: Option<Vec<u8>>,
    /// RAM size.
    pub mem: MemSize,
    /// vCPUs.
    pub vcpus: u32,
    /// Wall-time limit.
    pub timeout: Option<Duration>,
    /// Where COM1's output goes.
    pub console: ConsoleSink,
    /// CPUID features hidden from the guest.
    pub cpuid_mask: Vec<Feature>,
    /// GPA ranges removed from stage 2.
    pub secrets: Vec<SecretRange>,
    /// The byte planted in the secret ranges host-side (`None`: left as they are, zero).
    pub secret_fill: Option<u8>,
    /// What a violation does.
    pub on_violation: ViolationPolicy,
    /// The stage-2 backend.
    pub stage2: BackendKind,
    /// Whether guest RAM may appear in core dumps.
    pub core_dump: CoreDump,
    /// The exit-time stage-2 dump (`--dump-ept`), written before the VM goes away.
    pub dump: Option<crate::session::DumpConfig>,
}

impl ForeignConfig {
    /// A configuration with Veil's defaults for `kernel`.
    pub fn new(kernel: Vec<u8>, kernel_name: &str) -> ForeignConfig {
        ForeignConfig {
            kernel,
            kernel_name: kernel_name.to_string(),
            cmdline: String::new(),
            modules: Vec::new(),
            initrd: None,
            mem: MemSize(256 << 20),
            vcpus: 1,
            timeout: Some(Duration::from_secs(60)),
            console: ConsoleSink::Stdout,
            cpuid_mask: Vec::new(),
            secrets: Vec::new(),
            secret_fill: None,
            on_violation: ViolationPolicy::Report,
            stage2: BackendKind::default(),
            core_dump: CoreDump::Exclude,
            dump: None,
        }
    }
}

/// What kind of kernel a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelKind {
    /// A multiboot v1 kernel (header in the first 8 KiB).
    Multiboot,
    /// A Linux bzImage (`HdrS` at 0x202).
    Bzimage,
    /// An ELF without a multiboot header: Linux vmlinux (PVH note or 64-bit entry).
    Vmlinux,
}

/// Tells the kind of `image` (`None`: none of them).
pub fn detect(image: &[u8]) -> Option<KernelKind> {
    if image.get(0x202..0x206) == Some(b"HdrS") && image.get(0x1fe..0x200) == Some(&[0x55, 0xaa]) {
        return Some(KernelKind::Bzimage);
    }
    if multiboot::find_header(image).is_some() {
        return Some(KernelKind::Multiboot);
    }
    if image.starts_with(b"\x7fELF") {
        return Some(KernelKind::Vmlinux);
    }
    None
}

/// Why a foreign kernel cannot be booted (all usage errors: exit code 2).
#[derive(Debug, Error)]
pub enum ForeignError {
    /// Not a kernel Veil knows how to boot.
    #[error("not a multiboot v1 kernel (no header in the first 8 KiB), a Linux bzImage (no HdrS at 0x202) or an ELF vmlinux")]
    UnknownKind,
    /// A multiboot kernel that cannot be loaded.
    #[error("multiboot: {0}")]
    Multiboot(#[from] multiboot::MultibootError),
    /// A Linux kernel that cannot be loaded.
    #[error("linux: {0}")]
    Linux(#[from] linux::LinuxError),
    /// Modules given to a Linux kernel or an initrd to a multiboot one.
    #[error("{0}")]
    Option(String),
    /// A bad `--secret`.
    #[error(transparent)]
    Secret(#[from] secret_ranges::SecretError),
    /// A loaded piece (kernel, module, initrd, boot data) falls in a `--secret` range.
    #[error("{what} [{start:#x}, {end:#x}) overlaps a --secret range: move the range")]
    SecretOverlapsImage {
        /// What.
        what: String,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// Bad vCPU count.
    #[error("--vcpus {asked}: this host's KVM allows 1 to {max}")]
    BadVcpus {
        /// Asked.
        asked: u32,
        /// Maximum.
        max: u32,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The stage-2 engine refused.
    #[error("stage 2: {0}")]
    Engine(#[from] EngineError),
    /// The mprotect backend.
    #[error("stage 2: {0}")]
    Mprotect(#[from] MprotectError),
    /// Console or thread setup.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// One guest access to a `--secret` range.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ForeignViolation {
    /// Guest physical address (`None`: KVM named none, an `EFAULT` from the mprotect backend).
    pub gpa: Option<u64>,
    /// `read` or `write`.
    pub access: &'static str,
    /// Bytes.
    pub size: u32,
    /// Guest RIP.
    pub rip: u64,
    /// `function+0xoff` of `rip` from the kernel ELF's symbol table (None: no symbols).
    pub rip_symbol: Option<String>,
    /// vCPU index.
    pub vcpu: u32,
    /// Index of the `--secret` range (in `secrets[]`, sorted by start).
    pub range: Option<usize>,
    /// What the VMM did: `poisoned` (the load read 0xa5), `dropped` (the store), `stopped`.
    pub action: &'static str,
}

/// How a foreign run ended.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ForeignExit {
    /// The guest wrote `value` to port 0xf4 (QEMU's exit status: `(value << 1 | 1) & 0xff`).
    DebugExit {
        /// The value written.
        value: u32,
        /// What QEMU would exit with (a process status: 8 bits).
        qemu_status: u32,
    },
    /// A `hlt` reached userspace (no in-kernel irqchip would do that) or a system event.
    Halted {
        /// vCPU.
        vcpu: u32,
        /// Why.
        what: String,
    },
    /// A triple fault.
    Shutdown {
        /// vCPU.
        vcpu: u32,
        /// Registers.
        regs: Option<RegsDump>,
    },
    /// KVM could not run the guest on (emulation failure, failed entry, unexpected exit).
    Crash {
        /// vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
        /// Registers.
        regs: Option<RegsDump>,
    },
    /// `--on-violation kill` at the first violation.
    Killed {
        /// The violation.
        violation: ForeignViolation,
    },
    /// `--timeout` expired.
    Timeout {
        /// Seconds.
        secs: f64,
        /// vCPU 0's registers.
        regs: Option<RegsDump>,
    },
    /// SIGINT/SIGTERM/SIGHUP.
    Interrupted {
        /// Signal number.
        signal: i32,
    },
}

/// The result of one foreign run.
#[derive(Clone, Debug, Serialize)]
pub struct ForeignReport {
    /// What was booted.
    pub kernel: KernelKind,
    /// How it ended.
    pub exit: ForeignExit,
    /// Result for a kvm-unit-tests style exit: `pass`, `skip`, `fail` or `error`.
    pub result: &'static str,
    /// The `--secret` ranges, sorted (start, size).
    pub secrets: Vec<(u64, u64)>,
    /// Whether every secret byte still held the `--secret-fill` pattern at the end (`None`: no
    /// fill given).
    pub secrets_intact: Option<bool>,
    /// Violations kept (at most [`MAX_VIOLATIONS`]).
    pub violations: Vec<ForeignViolation>,
    /// All violations, kept or not.
    pub violations_total: u64,
    /// MMIO accesses outside RAM (answered with 0xff / ignored).
    pub not_ram: u64,
    /// Exits to userspace, all vCPUs.
    pub exits: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The stage-2 backend.
    pub stage2: BackendKind,
    /// Stage 2 at the end of the run, as the engine holds it: every range with its state
    /// (the secret ranges `unmapped`) and memslot.
    pub stage2_ranges: Vec<crate::stage2::RangeInfo>,
    /// Wall time from VM creation to the stop, milliseconds.
    pub wall_ms: f64,
    /// Dumps written (`--dump-ept`: the path, or "-" for stdout).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dumps: Vec<String>,
    /// Dumps that could not be written (path and reason): exit code 2 unless the run failed
    /// otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dump_errors: Vec<String>,
}

/// Violation records kept per run (the rest are counted).
pub const MAX_VIOLATIONS: usize = 10_000;

impl ForeignReport {
    /// Names every violation's RIP and the exit's registers' from `syms` (the kernel file's
    /// symbol table; empty for a flat binary or a stripped ELF).
    pub fn resolve_symbols(&mut self, syms: &crate::symbols::Symbols) {
        if syms.is_empty() {
            return;
        }
        for v in &mut self.violations {
            v.rip_symbol = syms.name(v.rip);
        }
        match &mut self.exit {
            ForeignExit::Killed { violation } => violation.rip_symbol = syms.name(violation.rip),
            ForeignExit::Shutdown { regs, .. }
            | ForeignExit::Crash { regs, .. }
            | ForeignExit::Timeout { regs, .. } => {
                if let Some(r) = regs {
                    r.rip_symbol = syms.name(r.rip);
                }
            }
            _ => {}
        }
    }

    /// Veil's exit code: 0 for a debug-exit value of 0 (pass) or 38 (skip) with no violation;
    /// 1 for any other value or any violation; 2 for a pass whose `--dump-ept` could not be
    /// written; 3 for a crash, triple fault, kill, halt or timeout; 128 + signal when
    /// interrupted.
    pub fn exit_code(&self) -> i32 {
        match &self.exit {
            ForeignExit::DebugExit { value, .. } => {
                if self.violations_total > 0 || self.secrets_intact == Some(false) {
                    exit_code::TEST_FAILURE
                } else if *value == 0 || *value == SKIP_VALUE {
                    if self.dump_errors.is_empty() {
                        exit_code::OK
                    } else {
                        exit_code::USAGE
                    }
                } else {
                    exit_code::TEST_FAILURE
                }
            }
            ForeignExit::Interrupted { signal } => crate::signals::exit_code(*signal),
            _ => exit_code::CRASH,
        }
    }

    /// One line saying how the run ended.
    pub fn summary(&self) -> String {
        let v = if self.violations_total > 0 {
            format!(
                ", {} violation(s) of --secret ranges",
                self.violations_total
            )
        } else {
            String::new()
        };
        let s = match &self.exit {
            ForeignExit::DebugExit { value, qemu_status } => format!(
                "guest wrote {value} to the exit port {DEBUG_EXIT_PORT:#x} (QEMU's status {qemu_status}): {}",
                self.result.to_uppercase()
            ),
            ForeignExit::Halted { vcpu, what } => format!("vCPU {vcpu} stopped: {what}"),
            ForeignExit::Shutdown { vcpu, regs } => format!(
                "vCPU {vcpu} triple-faulted (shutdown){}",
                regs.as_ref().map(|r| format!(" at rip {:#x}{}", r.rip, crate::report::symbol_suffix(&r.rip_symbol))).unwrap_or_default()
            ),
            ForeignExit::Crash { vcpu, reason, regs } => format!(
                "vCPU {vcpu} crashed: {reason}{}",
                regs.as_ref().map(|r| format!(" at rip {:#x}{}", r.rip, crate::report::symbol_suffix(&r.rip_symbol))).unwrap_or_default()
            ),
            ForeignExit::Killed { violation } => format!(
                "stopped by --on-violation kill: {} of {} bytes at {} (rip {:#x}{}, vCPU {})",
                violation.access,
                violation.size,
                violation
                    .gpa
                    .map(|g| format!("{g:#x}"))
                    .unwrap_or_else(|| "an unknown address".into()),
                violation.rip,
                crate::report::symbol_suffix(&violation.rip_symbol),
                violation.vcpu
            ),
            ForeignExit::Timeout { secs, regs } => format!(
                "timed out after {secs} s{}",
                regs.as_ref().map(|r| format!(" (vCPU 0 at rip {:#x}{})", r.rip, crate::report::symbol_suffix(&r.rip_symbol))).unwrap_or_default()
            ),
            ForeignExit::Interrupted { signal } => {
                format!("interrupted by {}", crate::signals::name(*signal))
            }
        };
        format!("{s}{v}; {} exits, {:.0} ms", self.exits, self.wall_ms)
    }
}

/// The kvm-unit-tests verdict of an exit.
pub fn result_of(exit: &ForeignExit) -> &'static str {
    match exit {
        ForeignExit::DebugExit { value: 0, .. } => "pass",
        ForeignExit::DebugExit {
            value: SKIP_VALUE, ..
        } => "skip",
        ForeignExit::DebugExit { .. } => "fail",
        _ => "error",
    }
}

/// Boots `cfg`'s kernel and runs it to its end.
pub fn run(cfg: ForeignConfig) -> Result<ForeignReport, ForeignError> {
    machine::run(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_apart() {
        assert_eq!(detect(b"nothing"), None);
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&bz), Some(KernelKind::Bzimage));
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(64, 0);
        assert_eq!(detect(&elf), Some(KernelKind::Vmlinux));
        let mut mb = vec![0u8; 16];
        mb[0..4].copy_from_slice(&multiboot::HEADER_MAGIC.to_le_bytes());
        mb[8..12].copy_from_slice(&0u32.wrapping_sub(multiboot::HEADER_MAGIC).to_le_bytes());
        elf.extend_from_slice(&mb);
        assert_eq!(detect(&elf), Some(KernelKind::Multiboot));
    }

    #[test]
    fn exit_values_map_to_results() {
        let e = |value| ForeignExit::DebugExit {
            value,
            qemu_status: value << 1 | 1,
        };
        assert_eq!(result_of(&e(0)), "pass");
        assert_eq!(result_of(&e(38)), "skip");
        assert_eq!(result_of(&e(77)), "fail");
        assert_eq!(result_of(&e(1)), "fail");
        assert_eq!(result_of(&ForeignExit::Interrupted { signal: 2 }), "error");
    }
}
