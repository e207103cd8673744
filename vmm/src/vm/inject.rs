//! `--on-violation inject`: after a load or store violation has been answered as under
//! `report`, the guest is told. The VMM writes a [`VeInfo`] (count, GPA, RIP, access kind) at
//! [`VE_INFO_OFFSET`] of the vCPU's mailbox page, lets KVM complete the access it is waiting on
//! (one `KVM_RUN` with `immediate_exit`, so the exception frame's RIP is the instruction after
//! the access), and injects #VE ([`VE_VECTOR`], no error code) with `KVM_SET_VCPU_EVENTS`.

use veil_abi::{VeInfo, MAILBOX_GPA, PAGE_SIZE, VE_INFO_OFFSET, VE_VECTOR};
use vm_memory::ByteValued;

use super::Vcpu;
use crate::report::ExitInfo;

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
    /// Tells the guest about the violation `ve` (see the module docs); `Some` if the VM must
    /// stop because KVM refused.
    pub(super) fn inject_ve(&mut self, ve: VeInfo) -> Option<ExitInfo> {
        let at = ve_info_gpa(self.cpu.index());
        if let Err(e) = self.vm().ram().write(at, VeBytes(ve).as_slice()) {
            log::warn!("cannot write the #VE info at {at:#x}: {e}");
        }
        if !self.settle_pending_mmio() {
            log::warn!(
                "#VE not injected at rip {:#x}: the access did not complete",
                ve.rip
            );
            return None;
        }
        let mut events = match self.vcpu.get_vcpu_events() {
            Ok(e) => e,
            Err(e) => {
                return Some(ExitInfo::KvmError {
                    error: format!("KVM_GET_VCPU_EVENTS before #VE: {e}"),
                })
            }
        };
        events.exception.injected = 1;
        events.exception.nr = VE_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        if let Err(e) = self.vcpu.set_vcpu_events(&events) {
            return Some(ExitInfo::KvmError {
                error: format!("KVM_SET_VCPU_EVENTS (#VE): {e}"),
            });
        }
        None
    }
}
