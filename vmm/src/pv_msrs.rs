//! KVM's paravirtual MSRs that name a guest page KVM itself writes to (kvmclock, wall clock,
//! steal time, async PF, PV EOI). A guest may aim them at a page removed from stage 2; KVM
//! would then write there (or fail silently) without the VMM ever knowing. So their writes are
//! filtered to user space (`KVM_X86_SET_MSR_FILTER` + `KVM_CAP_X86_USER_SPACE_MSR`): the VMM
//! records a write violation when the named range touches a page the guest's view does not let
//! it write (unmapped, or locked by `Hc::Protect`: KVM's write would otherwise get round the
//! lock) and drops the write
//! (KVM never learns the GPA); otherwise it hands the value to KVM with `KVM_SET_MSRS`, which
//! the filter does not apply to.

use kvm_bindings::KVM_MSR_EXIT_REASON_FILTER;
use kvm_bindings::{kvm_enable_cap, kvm_msr_entry, Msrs, KVM_CAP_X86_USER_SPACE_MSR};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::addr::Gpa;
use crate::report::{AccessKind, ExitInfo};
use crate::session::Session;

/// One paravirtual MSR whose value carries a GPA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvMsr {
    /// MSR index.
    pub index: u32,
    /// Linux's name for it.
    pub name: &'static str,
    /// Bits of the value that are flags, not address.
    pub flag_mask: u64,
    /// Bytes KVM writes at the GPA.
    pub size: u64,
    /// Whether bit 0 must be set for KVM to use the GPA (otherwise any value names it).
    pub needs_enable: bool,
}

/// Every PV MSR that names a page KVM writes.
pub const PV_MSRS: [PvMsr; 7] = [
    pv(0x11, "MSR_KVM_WALL_CLOCK", 0, 12, false),
    pv(0x12, "MSR_KVM_SYSTEM_TIME", 1, 32, true),
    pv(0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW", 0, 12, false),
    pv(0x4b56_4d01, "MSR_KVM_SYSTEM_TIME_NEW", 1, 32, true),
    pv(0x4b56_4d02, "MSR_KVM_ASYNC_PF_EN", 0x3f, 64, true),
    pv(0x4b56_4d03, "MSR_KVM_STEAL_TIME", 0x3f, 64, true),
    pv(0x4b56_4d04, "MSR_KVM_PV_EOI_EN", 3, 4, true),
];

const fn pv(index: u32, name: &'static str, flag_mask: u64, size: u64, en: bool) -> PvMsr {
    PvMsr {
        index,
        name,
        flag_mask,
        size,
        needs_enable: en,
    }
}

impl PvMsr {
    /// The range `[gpa, gpa + size)` a write of `value` asks KVM to write to, if any.
    pub fn target(&self, value: u64) -> Option<(u64, u64)> {
        if self.needs_enable && value & 1 == 0 {
            return None;
        }
        Some((value & !self.flag_mask, self.size))
    }
}

/// Sends the PV MSRs' writes to user space. `Ok(false)`: KVM cannot filter MSRs here (the
/// writes then go to KVM unseen; the reachability matrix shows it).
pub fn install(kvm: &Kvm, vm: &VmFd) -> Result<bool, kvm_ioctls::Error> {
    if !kvm.check_extension(Cap::X86UserSpaceMsr) {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap)?;
    // A 0 bit denies: every write in both ranges is denied to KVM, i.e. exits to us.
    let deny = [0u8; 1];
    let ranges = [
        MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: 0x11,
            msr_count: 2,
            bitmap: &deny,
        },
        MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: 0x4b56_4d00,
            msr_count: 5,
            bitmap: &deny,
        },
    ];
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)?;
    Ok(true)
}

/// Handles a filtered `wrmsr` of `index` with `value` at `rip`: returns the `error` byte for
/// KVM (1 injects #GP) and, under `--on-violation kill`, why the VM stops.
pub fn on_write(
    s: &mut Session,
    vcpu: &VcpuFd,
    index: u32,
    value: u64,
    rip: u64,
) -> (u8, Option<ExitInfo>) {
    let msr = PV_MSRS.iter().find(|m| m.index == index);
    if let Some((gpa, size)) = msr.and_then(|m| m.target(value)) {
        let first = gpa >> 12;
        let last = gpa.saturating_add(size - 1) >> 12;
        let hole = (first..=last)
            .map(|pfn| Gpa((pfn << 12).max(gpa)))
            .find(|&g| s.blocks(g, AccessKind::Write));
        if let Some(g) = hole {
            // Dropped: KVM never learns a GPA in a hole or a locked page.
            let (_, stop) = s.mmio(g, AccessKind::Write, size as u32, rip);
            return (0, stop);
        }
    }
    let entry = kvm_msr_entry {
        index,
        data: value,
        ..Default::default()
    };
    match Msrs::from_entries(&[entry]).map(|m| vcpu.set_msrs(&m)) {
        Ok(Ok(1)) => (0, None),
        _ => (1, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_each_msrs_layout() {
        let by = |n: &str| *PV_MSRS.iter().find(|m| m.name == n).unwrap();
        assert_eq!(
            by("MSR_KVM_SYSTEM_TIME_NEW").target(0x40_0001),
            Some((0x40_0000, 32))
        );
        assert_eq!(by("MSR_KVM_SYSTEM_TIME_NEW").target(0x40_0000), None);
        assert_eq!(
            by("MSR_KVM_WALL_CLOCK_NEW").target(0x40_0ff8),
            Some((0x40_0ff8, 12))
        );
        assert_eq!(
            by("MSR_KVM_STEAL_TIME").target(0x40_0041),
            Some((0x40_0040, 64))
        );
        assert_eq!(
            by("MSR_KVM_PV_EOI_EN").target(0x40_0005),
            Some((0x40_0004, 4))
        );
    }
}
