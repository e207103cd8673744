//! `--on-violation inject`: after a load or store violation has been answered as under
//! `report`, the guest is told. The VMM lets KVM complete the instruction it is waiting on
//! (`KVM_RUN` with `immediate_exit`, so the exception frame's RIP is the instruction after the
//! access; the instruction's further MMIO exits on the way, such as a 16-byte load's second
//! half or a `rep movsb`'s next byte, are answered and recorded as ordinary violations), writes a [`VeInfo`] (count, GPA, RIP, access kind) at [`VE_INFO_OFFSET`] of the
//! vCPU's mailbox page, and injects #VE ([`VE_VECTOR`], no error code) with
//! `KVM_SET_VCPU_EVENTS`.
//!
//! An access KVM does not complete that way (a locked read-modify-write on a hole, which it
//! restarts: RIP still at the instruction after a load's exit) gets no #VE: it is answered as
//! under `report`, where the fault-loop detector ends it.

use kvm_ioctls::VcpuExit;
use veil_abi::{VeInfo, MAILBOX_GPA, PAGE_SIZE, VE_INFO_OFFSET, VE_VECTOR};
use vm_memory::ByteValued;

use super::Vcpu;
use crate::addr::Gpa;
use crate::report::{AccessKind, ExitInfo};

/// Most further MMIO exits one instruction may make while it completes (a `rep movsb` over a
/// page of a hole makes 4096).
const MAX_SETTLE_EXITS: u32 = 8192;

/// A [`VeInfo`] as plain bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct VeBytes(VeInfo);
// SAFETY: VeInfo is repr(C) and made of four u64: no padding, any bit pattern valid.
unsafe impl ByteValued for VeBytes {}

const _: () = assert!(std::mem::size_of::<VeInfo>() == 32);

/// GPA of vCPU `index`'s [`VeInfo`].
pub(crate) fn ve_info_gpa(index: usize) -> u64 {
    MAILBOX_GPA + index as u64 * PAGE_SIZE + VE_INFO_OFFSET
}

impl Vcpu {
    /// Tells the guest about the violation `ve` (see the module docs): true if a #VE was
    /// injected, false if the access did not complete (no #VE); `Err` if the VM must stop
    /// because KVM refused.
    pub(super) fn inject_ve(&mut self, ve: VeInfo) -> Result<bool, Box<ExitInfo>> {
        if !self.complete_instruction() {
            return Ok(false);
        }
        let load = ve.access == veil_abi::Access::Read as u64;
        if load && self.vcpu.sync_regs_mut().regs.rip == ve.rip {
            return Ok(false);
        }
        let at = ve_info_gpa(self.cpu.index());
        if let Err(e) = self.vm().ram().write(at, VeBytes(ve).as_slice()) {
            log::warn!("cannot write the #VE info at {at:#x}: {e}");
        }
        let mut events = self.vcpu.get_vcpu_events().map_err(|e| {
            Box::new(ExitInfo::KvmError {
                error: format!("KVM_GET_VCPU_EVENTS before #VE: {e}"),
            })
        })?;
        events.exception.injected = 1;
        events.exception.nr = VE_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.vcpu.set_vcpu_events(&events).map_err(|e| {
            Box::new(ExitInfo::KvmError {
                error: format!("KVM_SET_VCPU_EVENTS (#VE): {e}"),
            })
        })?;
        self.cpu.count_ve();
        Ok(true)
    }

    /// Runs KVM with `immediate_exit` until it returns `EINTR` (the pending instruction is
    /// done, or KVM would enter the guest again), answering and recording each MMIO exit on
    /// the way through the session. False if it does not settle.
    fn complete_instruction(&mut self) -> bool {
        let threads = self.stop.threads.clone();
        let mut settled = false;
        for _ in 0..MAX_SETTLE_EXITS {
            crate::watchdog::set_immediate_exit(&mut self.vcpu, 1);
            let exit = {
                let _in_guest = threads.enter();
                match self.vcpu.run() {
                    Err(e) if e.errno() == libc::EINTR => None,
                    Ok(VcpuExit::MmioRead(gpa, data)) => {
                        Some(Some((gpa, AccessKind::Read, data.len())))
                    }
                    Ok(VcpuExit::MmioWrite(gpa, data)) => {
                        Some(Some((gpa, AccessKind::Write, data.len())))
                    }
                    _ => Some(None),
                }
            };
            match exit {
                None => {
                    settled = true;
                    break;
                }
                Some(None) => break,
                Some(Some((gpa, access, len))) => {
                    let rip = self.sync_rip();
                    let (byte, _) = self.s().mmio(Gpa(gpa), access, len as u32, rip);
                    // One #VE per instruction: the first exit's.
                    let _ = self.cpu.take_ve();
                    if access == AccessKind::Read {
                        self.mmio_data_mut(len).fill(byte);
                    }
                }
            }
        }
        crate::watchdog::set_immediate_exit(&mut self.vcpu, 0);
        settled
    }
}
