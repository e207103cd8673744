//! The run loop's livelock and timeout checks (`crate::livelock` has the detectors and the
//! thresholds): a fault loop is judged at each violation exit, a silent spin at each watchdog
//! sample of a vCPU that made no exit, and a timeout reports how long the vCPU went without
//! one and which instruction it sat on.

use std::sync::atomic::Ordering;

use iced_x86::Mnemonic;
use kvm_ioctls::{SyncReg, VcpuExit};
use veil_abi::POISON_BYTE;

use super::Vcpu;
use crate::addr::Gpa;
use crate::decode;
use crate::livelock;
use crate::report::{AccessKind, ExitInfo, LivelockShape, ViolationAction};
use crate::run_types::BlockedAccess;
use crate::stage2::RangeState;

/// What a stalled vCPU's instruction is judged to be (see [`Vm::stall_sample`]).
struct StallVerdict {
    /// The first page piece it touches in a hole: GPA, access, bytes.
    hole: Option<BlockedAccess>,
    /// The instruction in Intel syntax.
    text: String,
}

impl Vcpu {
    /// The `--timeout` stop, with how long the vCPU had gone without an exit.
    pub(super) fn timeout_exit(&mut self) -> ExitInfo {
        let regs = self.regs_dump();
        ExitInfo::Timeout {
            seconds: self.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0),
            no_exit_ms: self.last_exit.elapsed().as_secs_f64() * 1e3,
            instruction: self.instruction_text(),
            regs,
        }
    }

    /// A violation exit just handled: if it is the [`livelock::FAULT_REPEATS`]th identical one
    /// in a row (same RIP, GPA, access, registers), the guest resumes at its recovery point
    /// (under `report`, if it set one) or the VM stops with the livelock.
    pub(super) fn fault_loop(&mut self, gpa: u64, access: AccessKind) -> Option<ExitInfo> {
        if self.vm().state_at(Gpa(gpa)) != Some(RangeState::Unmapped) {
            self.faults.progress();
            return None;
        }
        let regs = livelock::fingerprint(&self.vcpu.sync_regs().regs);
        let repeats = self.faults.fault(gpa, access as u8, regs)?;
        self.faults.progress();
        let recovery = self.s().livelock_recovery(Some((Gpa(gpa), access)));
        if let Some((rip, rsp)) = recovery {
            // KVM holds the half-done instruction: let it finish this MMIO (the data is
            // already poison) before RIP moves under it.
            if self.settle_pending_mmio() {
                self.resume_at(rip, rsp);
                return None;
            }
        }
        let regs = self.regs_dump();
        Some(ExitInfo::Livelock {
            rip: regs.rip,
            rip_symbol: None,
            gpa: Some(gpa),
            access: Some(access),
            shape: LivelockShape::FaultLoop,
            repeats: u64::from(repeats),
            instruction: self.instruction_text(),
            regs,
        })
    }

    /// A stage-2 fault without an MMIO exit (`EFAULT`, `KVM_EXIT_MEMORY_FAULT`) on `gpa`
    /// ([`veil_abi::ADDRESS_UNKNOWN`] if unknown) with registers `regs`: the
    /// [`livelock::FAULT_REPEATS`]th identical one in a row stops the VM with the livelock.
    /// (The policy's answer moves RIP to a recovery point that is used up, or stops, so a
    /// repeat needs a guest that loops back without an exit; this bounds it all the same.)
    pub(super) fn fault_repeats(
        &mut self,
        gpa: u64,
        access: AccessKind,
        regs: &kvm_bindings::kvm_regs,
    ) -> Option<ExitInfo> {
        let repeats = self
            .faults
            .fault(gpa, access as u8, livelock::fingerprint(regs))?;
        self.faults.progress();
        let regs = self.regs_dump();
        Some(ExitInfo::Livelock {
            rip: regs.rip,
            rip_symbol: None,
            gpa: (gpa != veil_abi::ADDRESS_UNKNOWN).then_some(gpa),
            access: Some(access),
            shape: LivelockShape::FaultLoop,
            repeats: u64::from(repeats),
            instruction: self.instruction_text(),
            regs,
        })
    }

    /// A watchdog sample of a vCPU that made no exit for a whole sample period: a livelock if
    /// the registers did not move for [`livelock::STALL_SAMPLES`] samples and the instruction
    /// at RIP touches a hole (or never completes on this host).
    pub(super) fn stall_sample(&mut self) -> Option<ExitInfo> {
        let r = self.vcpu.get_regs().ok()?;
        let progress = self.progress.load(Ordering::Relaxed);
        let samples = self.stalls.sample(progress, livelock::fingerprint(&r))?;
        self.stalls.reset();
        let verdict = self.stalled_instruction(&r)?;
        let resume = self.s().livelock_recovery(verdict.hole.map(|h| (h.0, h.1)));
        let action = match resume {
            Some(_) => ViolationAction::Recovered,
            None => ViolationAction::Stopped,
        };
        if let Some((gpa, access, size)) = verdict.hole {
            self.s()
                .livelock_violation(gpa, access, size, r.rip, action);
        }
        if let Some((rip, rsp)) = resume {
            // Out of KVM_RUN by a signal: nothing is pending, RIP may move.
            self.resume_at(rip, rsp);
            return None;
        }
        let regs = self.regs_dump();
        Some(ExitInfo::Livelock {
            rip: regs.rip,
            rip_symbol: None,
            gpa: verdict.hole.map(|h| h.0.raw()),
            access: verdict.hole.map(|h| h.1),
            shape: LivelockShape::SilentSpin,
            repeats: u64::from(samples),
            instruction: Some(verdict.text),
            regs,
        })
    }

    /// Lets KVM complete the MMIO access it is waiting on without entering the guest
    /// (`immediate_exit`): true once `KVM_RUN` returns `EINTR` with nothing pending; loads that
    /// are still asked for on the way get poison. False if the instruction will not settle.
    fn settle_pending_mmio(&mut self) -> bool {
        let mut settled = false;
        let threads = self.stop.threads.clone();
        let _in_guest = threads.enter();
        for _ in 0..8 {
            crate::watchdog::set_immediate_exit(&mut self.vcpu, 1);
            match self.vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => {
                    settled = true;
                    break;
                }
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(POISON_BYTE),
                Ok(VcpuExit::MmioWrite(..)) => {}
                _ => break,
            }
        }
        crate::watchdog::set_immediate_exit(&mut self.vcpu, 0);
        settled
    }

    /// Moves the vCPU to `rip`/`rsp` for its next entry.
    fn resume_at(&mut self, rip: u64, rsp: u64) {
        let m = self.vcpu.sync_regs_mut();
        m.regs.rip = rip;
        m.regs.rsp = rsp;
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
    }

    /// The instruction at RIP of a stalled vCPU, decoded: a livelock verdict if it touches a
    /// hole (its first blocked piece, as the emulation-failure path attributes it) or is
    /// `vmcall` (which this host never completes); None for anything else (`jmp $` is a hang
    /// for the timeout, not a livelock).
    fn stalled_instruction(&mut self, r: &kvm_bindings::kvm_regs) -> Option<StallVerdict> {
        let sregs = self.vcpu.get_sregs().ok()?;
        let (bytes, _) = self.fetch_insn(sregs.cr3, r.rip);
        let insn = decode::decode(&bytes, r.rip, decode::bitness(&sregs)).ok()?;
        let hole = self.attribute_insn(r, &sregs).0.first().copied();
        if hole.is_none() && insn.mnemonic() != Mnemonic::Vmcall {
            return None;
        }
        Some(StallVerdict {
            hole,
            text: decode::format(&insn),
        })
    }

    /// The instruction at the vCPU's RIP in Intel syntax, if it can be read and decoded.
    fn instruction_text(&mut self) -> Option<String> {
        let r = self.vcpu.get_regs().ok()?;
        let sregs = self.vcpu.get_sregs().ok()?;
        let (bytes, _) = self.fetch_insn(sregs.cr3, r.rip);
        decode::decode(&bytes, r.rip, decode::bitness(&sregs))
            .ok()
            .map(|i| decode::format(&i))
    }
}
