//! How the VM stopped, with the registers at the time.

use serde::Serialize;

use super::{AccessKind, Violation};

/// General and control registers at a crash. In JSON every register is a named field
/// (`rip`, `rip_symbol`, `rsp`, `rflags`, `rax` ... `r15`, `cr0` ... `efer`, `cs`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegsDump {
    /// rip.
    pub rip: u64,
    /// `rip` as `function+0xoff` from the guest ELF's symbol table (None without symbols).
    pub rip_symbol: Option<String>,
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

/// The names of [`RegsDump::gprs`], in order.
pub const GPR_NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

impl Serialize for RegsDump {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = ser.serialize_map(Some(4 + GPR_NAMES.len() + 6))?;
        m.serialize_entry("rip", &self.rip)?;
        m.serialize_entry("rip_symbol", &self.rip_symbol)?;
        m.serialize_entry("rsp", &self.rsp)?;
        m.serialize_entry("rflags", &self.rflags)?;
        for (name, v) in GPR_NAMES.iter().zip(self.gprs) {
            m.serialize_entry(name, &v)?;
        }
        m.serialize_entry("cr0", &self.cr0)?;
        m.serialize_entry("cr2", &self.cr2)?;
        m.serialize_entry("cr3", &self.cr3)?;
        m.serialize_entry("cr4", &self.cr4)?;
        m.serialize_entry("efer", &self.efer)?;
        m.serialize_entry("cs", &self.cs)?;
        m.end()
    }
}

/// ` (name+0xoff)` for text after a RIP, or nothing without a symbol.
pub fn symbol_suffix(sym: &Option<String>) -> String {
    sym.as_ref().map(|s| format!(" ({s})")).unwrap_or_default()
}

impl std::fmt::Display for RegsDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const N: [&str; 15] = GPR_NAMES;
        writeln!(
            f,
            "  rip={:#018x}{} rsp={:#018x} rflags={:#x} cs={:#x}",
            self.rip,
            symbol_suffix(&self.rip_symbol),
            self.rsp,
            self.rflags,
            self.cs
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

/// The instruction at RIP as the VMM read and decoded it (through the stage-2-checked view,
/// with iced-x86) for an exit KVM could not explain, when no access of it hit a hole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InsnAtRip {
    /// The bytes read at RIP, hex (fewer than 15 where the next page could not be read).
    pub bytes: String,
    /// The lower-case iced-x86 mnemonic, or why there is none: "unreadable" (no bytes),
    /// "truncated", "invalid".
    pub decoded: String,
    /// Its memory accesses, page by page.
    pub accesses: Vec<InsnAccess>,
}

/// One page piece of a memory access of [`InsnAtRip`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InsnAccess {
    /// Guest-virtual address (null: could not be computed).
    pub gva: Option<u64>,
    /// Guest-physical address (null: address unknown, no translation).
    pub gpa: Option<u64>,
    /// Load or store.
    pub access: AccessKind,
    /// Bytes.
    pub size: u32,
    /// Stage-2 state of the GPA ("reserved", "mapped", "unmapped", "not RAM"; null if unknown).
    pub state: Option<&'static str>,
}

impl std::fmt::Display for InsnAtRip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.decoded, self.bytes)?;
        for a in &self.accesses {
            write!(f, ", {} of {} bytes at ", a.access.name(), a.size)?;
            match a.gpa {
                Some(g) => write!(f, "GPA {g:#x} ({})", a.state.unwrap_or("?"))?,
                None => write!(f, "address unknown")?,
            }
        }
        Ok(())
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
    /// An access to unmapped memory the guest cannot run on past (an instruction fetch, an
    /// instruction KVM could not emulate, an exception frame pushed into a hole, a page walk
    /// through a hole) with no recovery point.
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
        /// `rip` as `function+0xoff` (null without symbols).
        rip_symbol: Option<String>,
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
    /// KVM could not emulate an instruction, and none of its accesses was found in a hole.
    InternalError {
        /// KVM's suberror.
        suberror: u32,
        /// KVM's extra data words.
        data: Vec<u64>,
        /// The instruction at RIP and its accesses, as the VMM decoded them.
        insn: Option<InsnAtRip>,
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
        /// How long the vCPU had gone without an exit (other than the watchdog's own kicks)
        /// when it was stopped: a long stretch means it sat in one instruction or in a ring-0
        /// loop (emulated here, so no exits), a short one that it was still exiting.
        no_exit_ms: f64,
        /// The instruction at RIP when stopped, in Intel syntax, if readable.
        instruction: Option<String>,
        /// Registers when stopped.
        regs: RegsDump,
    },
    /// A livelock: one instruction repeating a blocked access without progress
    /// (`crate::livelock`). The VM stops at once.
    Livelock {
        /// The instruction's RIP.
        rip: u64,
        /// `rip` as `function+0xoff` (null without symbols).
        rip_symbol: Option<String>,
        /// The GPA in a hole it keeps touching (None for one that never completes without
        /// touching a hole, such as `vmcall` on this host).
        gpa: Option<u64>,
        /// The access it keeps making there.
        access: Option<AccessKind>,
        /// Fault loop (MMIO exits) or silent spin (no exits).
        shape: LivelockShape,
        /// Identical exits in a row (fault loop) or identical watchdog samples (silent spin).
        repeats: u64,
        /// The instruction in Intel syntax, if readable.
        instruction: Option<String>,
        /// Registers when stopped.
        regs: RegsDump,
    },
    /// SIGINT, SIGTERM or SIGHUP stopped the run (see [`crate::signals`]).
    Interrupted {
        /// The signal number.
        signal: i32,
        /// Its name ("SIGINT", ...).
        name: &'static str,
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
                "killed (--on-violation kill): {} of {} bytes at {}, rip {:#x}{}",
                v.access.name(),
                v.size,
                v.location(),
                v.rip,
                symbol_suffix(&v.rip_symbol)
            ),
            ExitInfo::FetchWithoutRecovery { violation: v } => format!(
                "stopped: {} of {} bytes at {} (rip {:#x}{}) and no recovery point",
                match v.access {
                    AccessKind::Fetch => "instruction fetch",
                    AccessKind::Read => "blocked read",
                    AccessKind::Write => "blocked write",
                },
                v.size,
                match v.gpa {
                    Some(g) => format!("unmapped GPA {g:#x}"),
                    None => "an unknown address (a stage-2 fault KVM and decoding did not locate)".into(),
                },
                v.rip,
                symbol_suffix(&v.rip_symbol)
            ),
            ExitInfo::GuestException {
                vector,
                error_code,
                rip,
                rip_symbol,
                cr2,
                ..
            } => format!(
                "guest exception: vector {vector} ({}), error code {error_code:#x}, rip {rip:#x}{}, cr2 {cr2:#x}",
                vector_name(*vector),
                symbol_suffix(rip_symbol)
            ),
            ExitInfo::TripleFault { regs } => {
                format!("triple fault (KVM_EXIT_SHUTDOWN) at {}", regs.at())
            }
            ExitInfo::InternalError {
                suberror,
                regs,
                insn,
                ..
            } => format!(
                "KVM internal error (suberror {suberror}{}) at {}{}",
                if *suberror == 1 { ": emulation failure" } else { "" },
                regs.at(),
                insn.as_ref().map(|i| format!(": {i}")).unwrap_or_default()
            ),
            ExitInfo::Halted { regs } => format!("guest halted at {}", regs.at()),
            ExitInfo::UnexpectedExit { what, regs } => {
                format!("unexpected exit {what} at {}", regs.at())
            }
            ExitInfo::KvmError { error } => format!("KVM_RUN failed: {error}"),
            ExitInfo::Timeout {
                seconds,
                no_exit_ms,
                instruction,
                regs,
            } => format!(
                "timed out after {seconds} s at {}{}; no exit for the last {:.1} s{}",
                regs.at(),
                instruction
                    .as_ref()
                    .map(|i| format!(" (`{i}`)"))
                    .unwrap_or_default(),
                no_exit_ms / 1e3,
                if *no_exit_ms >= 1e3 {
                    " (one instruction or a ring-0 loop: ring 0 is emulated here and makes no exits)"
                } else {
                    ""
                }
            ),
            ExitInfo::Livelock {
                rip,
                rip_symbol,
                gpa,
                access,
                shape,
                repeats,
                instruction,
                ..
            } => format!(
                "livelock at rip {rip:#x}{}{} on {}: {} ({repeats} {} in a row)",
                symbol_suffix(rip_symbol),
                instruction
                    .as_ref()
                    .map(|i| format!(" (`{i}`)"))
                    .unwrap_or_default(),
                match (gpa, access) {
                    (Some(g), Some(a)) => format!("GPA {g:#x} ({} in a hole)", a.name()),
                    _ => "no GPA (an instruction this host never completes)".to_string(),
                },
                shape.describe(),
                match shape {
                    LivelockShape::FaultLoop => "identical violation exits",
                    LivelockShape::SilentSpin => "identical samples without an exit",
                }
            ),
            ExitInfo::Interrupted { name, regs, .. } => {
                format!("interrupted by {name} ({})", regs.at())
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
            | ExitInfo::Timeout { regs, .. }
            | ExitInfo::Interrupted { regs, .. }
            | ExitInfo::Livelock { regs, .. } => Some(regs),
            _ => None,
        }
    }
}

impl RegsDump {
    /// `rip 0x...` with ` (name+0xoff)` when the symbol is known, for text.
    pub fn at(&self) -> String {
        format!("rip {:#x}{}", self.rip, symbol_suffix(&self.rip_symbol))
    }
}

/// How a livelock shows itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LivelockShape {
    /// The same violation exit again and again (`lgdt`/`lidt` from a hole).
    FaultLoop,
    /// No exits at all, the vCPU stuck on one instruction (`sgdt`/`sidt` into a hole, a segment
    /// load with the GDT in a hole, `vmcall`).
    SilentSpin,
}

impl LivelockShape {
    /// What the shape means, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            LivelockShape::FaultLoop => "the instruction restarts on every violation exit",
            LivelockShape::SilentSpin => {
                "the vCPU sits on the instruction inside KVM without exits"
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unattributed_emulation_failure_names_the_instruction_and_unknown_addresses() {
        let e = ExitInfo::InternalError {
            suberror: 1,
            data: vec![],
            insn: Some(InsnAtRip {
                bytes: "0f ae 03".into(),
                decoded: "fxsave".into(),
                accesses: vec![
                    InsnAccess {
                        gva: Some(0x1000),
                        gpa: Some(0x30_0000),
                        access: AccessKind::Write,
                        size: 256,
                        state: Some("reserved"),
                    },
                    InsnAccess {
                        gva: Some(0x2000),
                        gpa: None,
                        access: AccessKind::Write,
                        size: 256,
                        state: None,
                    },
                ],
            }),
            regs: RegsDump {
                rip: 0x20_0000,
                ..Default::default()
            },
        };
        assert_eq!(
            e.summary(),
            "KVM internal error (suberror 1: emulation failure) at rip 0x200000: fxsave \
             (0f ae 03), write of 256 bytes at GPA 0x300000 (reserved), write of 256 bytes at \
             address unknown"
        );
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["insn"]["accesses"][1]["gpa"], serde_json::Value::Null);
        assert_eq!(j["insn"]["decoded"], "fxsave");
    }
}
