//! Types the run loop ([`crate::vm`]) and the hypercall session ([`crate::session`]) share, in a
//! module of their own so that the session never imports the run loop (`vm` uses `session`,
//! not the other way round).

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::addr::Gpa;
use crate::report::{AccessKind, ExitInfo, ViolationAction};
use crate::stage2::{Stage2Backend, Stage2Engine};

/// The allocator type the VMM runs: a [`allocator::Zone`] (buddy lists under the zone lock,
/// per-CPU caches indexed by vCPU) over the KVM-backed stage-2 engine.
pub type Allocator = allocator::Zone<Stage2Engine<GuestBackend>>;

/// The index of a vCPU (`KVM_CREATE_VCPU`'s id): the CPU id the allocator's caches are
/// indexed by.
pub type VcpuIndex = usize;

/// The vCPU that boots the guest and runs its suite; the others park in the guest's SMP
/// runtime until a test hands them work.
pub const BOOT_VCPU: VcpuIndex = 0;

/// The stage-2 backend a run uses (chosen at start; the session is not tied to one type).
pub type GuestBackend = Box<dyn Stage2Backend + Send>;

/// What to do at a violation (`--on-violation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ViolationPolicy {
    /// Loads get poison bytes, stores are dropped, the guest runs on; a fetch or another access
    /// the guest cannot run on past resumes at the test's recovery point (or stops the VM if
    /// there is none).
    #[default]
    Report,
    /// As `report`, and the guest is told: after a load or store violation the VMM writes the
    /// GPA, access kind and RIP into the vCPU's mailbox (`veil_abi::VeInfo`) and injects a
    /// virtualization exception (#VE, vector 20) once the access has completed, so the guest's
    /// handler can count it and return past the access. Other violations (fetches, accesses
    /// the guest cannot run on past) are answered as under `report`.
    Inject,
    /// Stop the VM at the first violation, print the report, exit non-zero.
    Kill,
}

/// Whether `name` is a valid test name.
pub fn valid_test_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// What to do after a fetch violation.
pub(crate) enum FetchOutcome {
    /// Resume at the recovery point.
    Resume {
        /// New RIP.
        rip: u64,
        /// New RSP.
        rsp: u64,
    },
    /// Stop the VM.
    Stop(Box<ExitInfo>),
}

/// The action taken for a load or store violation under `policy`.
pub(crate) fn mmio_action(policy: ViolationPolicy, access: AccessKind) -> ViolationAction {
    match (policy, access) {
        (ViolationPolicy::Kill, _) => ViolationAction::Killed,
        (_, AccessKind::Read) => ViolationAction::Poisoned,
        (_, AccessKind::Write) => ViolationAction::Dropped,
        (_, AccessKind::Fetch) => ViolationAction::Recovered,
    }
}

/// A blocked access the VMM attributes: its GPA, kind and size in bytes.
pub type BlockedAccess = (Gpa, AccessKind, u32);

/// Borrow of the VM file descriptor (for dumps and stats).
pub(crate) type SharedVm = Arc<VmFd>;
