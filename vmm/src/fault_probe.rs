//! What this host's KVM actually delivers when guest ring-3 code touches a page the `mprotect`
//! backend closed (`veil caps`): a tiny VM on the real backend — the boot page tables and GDT,
//! one code page and one protected page — whose vCPU starts in 64-bit ring 3 and loads from
//! the protected page once. `KVM_CAP_MEMORY_FAULT_INFO` only says a host *may* annotate the
//! fault with `KVM_EXIT_MEMORY_FAULT`; this probe says whether it did.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;
use veil_abi::{IMAGE_MIN_GPA, PAGE_SIZE};

use crate::addr::Gpa;
use crate::boot;
use crate::memory::{Backing, CoreDump, GuestRam, MemSize, MIN_RAM};
use crate::stage2::{Mprotect, Perm, Stage2Backend};
use crate::watchdog::{self, Watchdog};

/// GPA of the probe's code page (ring 3, identity-mapped).
const CODE_GPA: u64 = IMAGE_MIN_GPA;
/// GPA of the page the guest view closes.
const TARGET_GPA: u64 = IMAGE_MIN_GPA + PAGE_SIZE;
/// The probe gives up (and says so) if the vCPU makes no exit within this.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// What KVM delivered for the probe's access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum FaultProbe {
    /// `KVM_EXIT_MEMORY_FAULT` with the range it names.
    MemoryFaultExit {
        /// GPA KVM reported.
        gpa: u64,
        /// Bytes of the range.
        size: u64,
        /// The exit's flags.
        flags: u64,
    },
    /// `KVM_RUN` failed with `EFAULT` and no exit (no GPA).
    EfaultNoExit,
    /// An ordinary `KVM_EXIT_MMIO` (as guest ring 0 gets here).
    Mmio {
        /// GPA of the MMIO exit.
        gpa: u64,
    },
    /// The probe could not run or ended otherwise.
    NotProbed {
        /// Why.
        why: String,
    },
}

impl FaultProbe {
    /// Whether `KVM_EXIT_MEMORY_FAULT` was observed.
    pub fn observed(&self) -> bool {
        matches!(self, FaultProbe::MemoryFaultExit { .. })
    }

    /// Short text: "KVM_EXIT_MEMORY_FAULT at GPA 0x201000", "KVM_RUN EFAULT, no exit", ...
    pub fn describe(&self) -> String {
        match self {
            FaultProbe::MemoryFaultExit { gpa, size, .. } => {
                format!("KVM_EXIT_MEMORY_FAULT at GPA {gpa:#x}, {size} bytes")
            }
            FaultProbe::EfaultNoExit => "KVM_RUN EFAULT, no exit".into(),
            FaultProbe::Mmio { gpa } => format!("KVM_EXIT_MMIO at GPA {gpa:#x}"),
            FaultProbe::NotProbed { why } => format!("not probed: {why}"),
        }
    }
}

/// Runs the probe; any failure on the way is [`FaultProbe::NotProbed`] with the reason.
pub fn probe(kvm: &Kvm) -> FaultProbe {
    run(kvm).unwrap_or_else(|why| FaultProbe::NotProbed { why })
}

/// `mov al, [TARGET_GPA]; ud2` (the `ud2` only runs if the load was let through).
fn code() -> Vec<u8> {
    let mut c = vec![0x8a, 0x04, 0x25];
    c.extend_from_slice(&(TARGET_GPA as u32).to_le_bytes());
    c.extend_from_slice(&[0x0f, 0x0b]);
    c
}

fn run(kvm: &Kvm) -> Result<FaultProbe, String> {
    let err = |what: &'static str| move |e: kvm_ioctls::Error| format!("{what}: {e}");
    let vm = Arc::new(kvm.create_vm().map_err(err("KVM_CREATE_VM"))?);
    let ram = Arc::new(
        GuestRam::create(MemSize(MIN_RAM), CoreDump::Exclude, Backing::Memfd)
            .map_err(|e| format!("guest RAM: {e}"))?,
    );
    let layout = boot::write_page_tables(&ram, MIN_RAM, 0).map_err(|e| e.to_string())?;
    boot::write_gdt(&ram).map_err(|e| e.to_string())?;
    ram.write(CODE_GPA, &code())
        .map_err(|e| format!("writing the probe code: {e}"))?;
    let mut backend = Mprotect::new(vm.clone(), ram.clone()).map_err(|e| e.to_string())?;
    backend.lock_unmapped(false);
    backend
        .set_perm(Gpa(0), MIN_RAM, Perm::ReadWrite)
        .and_then(|()| backend.set_perm(Gpa(TARGET_GPA), PAGE_SIZE, Perm::None))
        .map_err(|e| format!("protecting the target page: {e}"))?;

    let mut vcpu = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    let mut sregs =
        boot::long_mode_sregs(vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?, layout.pml4);
    // Ring 3: the boot segments with DPL and RPL 3 (the page tables carry the U bit).
    for s in [&mut sregs.cs, &mut sregs.ss, &mut sregs.ds, &mut sregs.es] {
        s.dpl = 3;
        s.selector |= 3;
    }
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot::entry_regs(CODE_GPA, CODE_GPA + PAGE_SIZE / 2, 0))
        .map_err(err("KVM_SET_REGS"))?;

    watchdog::install_handler().map_err(|e| format!("kick handler: {e}"))?;
    // SAFETY: this thread runs `vcpu`; the watchdog (the kick's only user) is dropped below,
    // before `vcpu`.
    let kick = unsafe { watchdog::Kick::new(&mut vcpu) };
    let dog = Watchdog::start(Some(PROBE_TIMEOUT), Arc::new(AtomicU64::new(0)), kick)
        .map_err(|e| format!("watchdog: {e}"))?;
    let outcome = loop {
        break match vcpu.run() {
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                Ok(FaultProbe::MemoryFaultExit { gpa, size, flags })
            }
            Ok(VcpuExit::MmioRead(gpa, _)) => Ok(FaultProbe::Mmio { gpa }),
            Ok(other) => Err(format!("the load ended in {other:?}")),
            Err(e) if e.errno() == libc::EFAULT => Ok(FaultProbe::EfaultNoExit),
            // A watchdog kick: a stall sample (run on) or the timeout.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                watchdog::set_immediate_exit(&mut vcpu, 0);
                if !dog.fired() {
                    continue;
                }
                Err(format!("no exit within {} ms", PROBE_TIMEOUT.as_millis()))
            }
            Err(e) => Err(format!("KVM_RUN: {e}")),
        };
    };
    drop(dog);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_returns_one_of_its_outcomes_quickly() {
        let Some(kvm) = crate::stage2::tests::kvm_or_skip("fault probe") else {
            return;
        };
        let t0 = std::time::Instant::now();
        let p = probe(&kvm);
        let took = t0.elapsed();
        eprintln!("fault probe: {} in {took:?}", p.describe());
        match &p {
            FaultProbe::MemoryFaultExit { gpa, .. } => assert_eq!(gpa & !0xfff, TARGET_GPA),
            FaultProbe::Mmio { gpa } => assert_eq!(gpa & !0xfff, TARGET_GPA),
            FaultProbe::EfaultNoExit => {}
            FaultProbe::NotProbed { why } => panic!("the probe did not run here: {why}"),
        }
        assert!(took < Duration::from_secs(1), "{took:?}");
        let j = serde_json::to_value(&p).unwrap();
        assert!(j["outcome"].is_string(), "{j}");
    }

    #[test]
    fn outcomes_describe_themselves() {
        assert_eq!(
            FaultProbe::EfaultNoExit.describe(),
            "KVM_RUN EFAULT, no exit"
        );
        let x = FaultProbe::MemoryFaultExit {
            gpa: TARGET_GPA,
            size: 4096,
            flags: 0,
        };
        assert!(x.observed() && x.describe().contains("0x201000"));
        let n = FaultProbe::NotProbed {
            why: "no /dev/kvm".into(),
        };
        assert!(!n.observed());
        assert_eq!(n.describe(), "not probed: no /dev/kvm");
    }
}
