//! The ASI part of the run report: transitions (ASI exits and enters), view switches with the
//! ranges each toggled, and the exposure windows: how long the VM was in the full view and
//! which vCPUs were exposed meanwhile, ASI-entered but able to reach sensitive pages because
//! the view is per VM on this host.

use std::fmt::Write;

use serde::Serialize;

use super::AccessKind;

/// Most transitions kept as full records (later ones are counted only).
pub const MAX_TRANSITIONS: usize = 10_000;
/// Most exposure windows kept as full records.
pub const MAX_WINDOWS: usize = 1_000;

/// How an ASI exit reached the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AsiVia {
    /// An MMIO exit (a load or store), completed from the VMM's view.
    Mmio,
    /// An emulation failure (a fetch, or an instruction KVM cannot emulate on a hole),
    /// completed by re-entering the guest in the full view.
    InternalError,
    /// `KVM_RUN` failing with `EFAULT` (a ring-3 access under `mprotect`), completed by
    /// re-entry.
    Efault,
    /// `KVM_EXIT_MEMORY_FAULT`, completed by re-entry.
    MemoryFault,
}

/// What one transition was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AsiTransitionKind {
    /// A restricted vCPU touched a sensitive page: it is exited now.
    Exit,
    /// `Hc::AsiEnter`: the vCPU is restricted again.
    Enter,
}

/// One ASI transition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AsiTransition {
    /// Exit or enter.
    pub kind: AsiTransitionKind,
    /// The vCPU.
    pub vcpu: u32,
    /// The sensitive GPA touched (exits only).
    pub gpa: Option<u64>,
    /// Guest RIP of the access (exits; 0 for an enter: the session does not see the
    /// hypercall's RIP).
    pub rip: u64,
    /// The access (exits only).
    pub access: Option<AccessKind>,
    /// How the exit reached the VMM (exits only).
    pub via: Option<AsiVia>,
    /// Microseconds since the run started.
    pub at_us: f64,
    /// Whether this transition switched the VM's view (an exit while another vCPU is exited,
    /// or an enter while one still is, does not).
    pub switched_view: bool,
    /// Ranges the switch toggled (0 without a switch).
    pub ranges_toggled: u64,
    /// Microseconds the switch took in the backend.
    pub switch_us: f64,
    /// The test running.
    pub test: Option<String>,
}

/// One vCPU's exposure inside a window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Exposed {
    /// The vCPU.
    pub vcpu: u32,
    /// Microseconds it was ASI-entered while the VM was in the full view.
    pub us: f64,
}

/// One interval with the VM in the full view.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExposureWindow {
    /// Microseconds since the run started.
    pub start_us: f64,
    /// Length in microseconds.
    pub duration_us: f64,
    /// The vCPU whose exit opened it.
    pub opened_by: u32,
    /// Most vCPUs exited at once during it.
    pub max_exited: u32,
    /// The vCPUs exposed in it (ASI-entered for part of it), with how long.
    pub exposed: Vec<Exposed>,
}

/// Per-vCPU ASI totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct AsiVcpu {
    /// The vCPU.
    pub vcpu: u32,
    /// Its ASI exits.
    pub exits: u64,
    /// Its enters that returned it to restricted.
    pub enters: u64,
    /// Its `AsiEnter` calls while already entered.
    pub noop_enters: u64,
    /// Whether it is exited at the end.
    pub exited_at_end: bool,
    /// Microseconds it was exposed (entered while the VM was full).
    pub exposed_us: f64,
    /// Windows it was exposed in.
    pub exposed_windows: u64,
}

/// The report's `asi` object.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AsiReport {
    /// Always "per_vm" here: the host has no second address space
    /// (`KVM_CAP_MULTI_ADDRESS_SPACE` < 2), so the VM is in the full view while any vCPU is
    /// ASI-exited.
    pub view_scope: &'static str,
    /// ASI exits (every vCPU).
    pub exits: u64,
    /// Enters that returned a vCPU to restricted.
    pub enters: u64,
    /// `AsiEnter` calls by a vCPU already entered.
    pub noop_enters: u64,
    /// Accesses to sensitive pages the VMM completed (loads and stores from its view; one per
    /// MMIO exit, including those of an instruction already exited).
    pub completed_accesses: u64,
    /// Switches of the VM's view.
    pub view_switches: u64,
    /// Ranges toggled over all switches.
    pub ranges_toggled: u64,
    /// Most ranges one switch toggled.
    pub max_ranges_toggled: u64,
    /// Mean microseconds per switch (backend work only).
    pub mean_switch_us: f64,
    /// Longest switch in microseconds.
    pub max_switch_us: f64,
    /// Time the VM spent in the full view, in milliseconds.
    pub full_view_ms: f64,
    /// Windows of the full view.
    pub windows: u64,
    /// Longest window in microseconds.
    pub longest_window_us: f64,
    /// vCPU-milliseconds of exposure (sum over vCPUs of time entered while the VM was full).
    pub exposed_vcpu_ms: f64,
    /// Per-vCPU totals.
    pub vcpus: Vec<AsiVcpu>,
    /// Transitions, oldest first (at most [`MAX_TRANSITIONS`]).
    pub transitions: Vec<AsiTransition>,
    /// Transitions recorded, including those not kept.
    pub transitions_total: u64,
    /// Exposure windows, oldest first (at most [`MAX_WINDOWS`]).
    pub exposure_windows: Vec<ExposureWindow>,
}

impl AsiReport {
    /// Whether anything ASI happened in the run (the table prints the section only then).
    pub fn is_active(&self) -> bool {
        self.exits + self.enters + self.noop_enters + self.view_switches > 0
    }

    /// The report table's ASI lines.
    pub fn lines(&self) -> String {
        let mut s = String::new();
        if !self.is_active() {
            return s;
        }
        let _ = writeln!(
            s,
            "ASI (view per VM: no second address space here): {} exits, {} enters, {} no-op enters; \
             {} view switches toggled {} ranges (at most {} per switch, mean {:.1} us, max {:.1} us)",
            self.exits,
            self.enters,
            self.noop_enters,
            self.view_switches,
            self.ranges_toggled,
            self.max_ranges_toggled,
            self.mean_switch_us,
            self.max_switch_us
        );
        let _ = writeln!(
            s,
            "ASI exposure: full view {:.3} ms over {} windows (longest {:.1} us); {:.3} vCPU-ms exposed",
            self.full_view_ms, self.windows, self.longest_window_us, self.exposed_vcpu_ms
        );
        for v in self.vcpus.iter().filter(|v| v.exposed_windows > 0) {
            let _ = writeln!(
                s,
                "  vCPU {} exposed {:.1} us in {} windows while ASI-entered (another vCPU was exited)",
                v.vcpu, v.exposed_us, v.exposed_windows
            );
        }
        s
    }
}
