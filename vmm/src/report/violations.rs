//! Violations as the report carries them: access kinds, what the VMM did, one record per
//! exit, runs of exits from one instruction, and accesses to GPAs that are not RAM.

use serde::Serialize;

/// Kind of a stray access (serialised as "read", "write", "fetch").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    /// A load.
    Read,
    /// A store.
    Write,
    /// An instruction fetch.
    Fetch,
}

impl AccessKind {
    /// The ABI value ([`veil_abi::Access`]).
    pub fn abi(self) -> veil_abi::Access {
        match self {
            AccessKind::Read => veil_abi::Access::Read,
            AccessKind::Write => veil_abi::Access::Write,
            AccessKind::Fetch => veil_abi::Access::Fetch,
        }
    }

    /// From the ABI value, if valid.
    pub fn from_u64(v: u64) -> Option<AccessKind> {
        match v {
            1 => Some(AccessKind::Read),
            2 => Some(AccessKind::Write),
            3 => Some(AccessKind::Fetch),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
            AccessKind::Fetch => "fetch",
        }
    }
}

/// What the VMM did about a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationAction {
    /// A load got [`veil_abi::POISON_BYTE`] bytes; the guest ran on.
    Poisoned,
    /// A store was dropped; the guest ran on.
    Dropped,
    /// A fetch resumed the guest at its recovery point.
    Recovered,
    /// A fetch with no recovery point stopped the VM.
    Stopped,
    /// `--on-violation kill` stopped the VM.
    Killed,
}

impl ViolationAction {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ViolationAction::Poisoned => "poisoned",
            ViolationAction::Dropped => "dropped",
            ViolationAction::Recovered => "recovered",
            ViolationAction::Stopped => "stopped",
            ViolationAction::Killed => "killed",
        }
    }
}

/// A run of consecutive violations from one instruction over contiguous bytes (e.g. the byte
/// exits of one `rep movsb`, or the two halves of a 16-byte load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationRun {
    /// Index of the first violation of the run.
    pub first: usize,
    /// Number of exits.
    pub exits: u64,
    /// Bytes covered.
    pub bytes: u64,
}

/// Groups `v` into runs for display.
pub fn group_violations(v: &[Violation]) -> Vec<ViolationRun> {
    let mut runs: Vec<ViolationRun> = Vec::new();
    for (i, x) in v.iter().enumerate() {
        if let Some(r) = runs.last_mut() {
            let f = &v[r.first];
            if f.rip == x.rip
                && f.access == x.access
                && f.test == x.test
                && f.gpa.and_then(|g| g.checked_add(r.bytes)) == x.gpa
                && x.gpa.is_some()
            {
                r.exits += 1;
                r.bytes += u64::from(x.size);
                continue;
            }
        }
        runs.push(ViolationRun {
            first: i,
            exits: 1,
            bytes: u64::from(x.size),
        });
    }
    runs
}

/// One access to RAM that stage 2 does not expose (one KVM exit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Guest-physical address of the access (null: address unknown, a stage-2 fault neither
    /// KVM nor the decoded instruction located).
    pub gpa: Option<u64>,
    /// Load, store or fetch.
    pub access: AccessKind,
    /// Bytes accessed by this exit.
    pub size: u32,
    /// Guest RIP as KVM reports it at the exit: the faulting instruction for loads and fetches;
    /// for stores KVM's instruction emulator has already retired the instruction before the
    /// MMIO exit, so it is the address of the *next* instruction (except inside an unfinished
    /// `rep` string instruction, which stays at the instruction).
    pub rip: u64,
    /// `rip` as `function+0xoff` from the guest ELF's symbol table (null without symbols).
    pub rip_symbol: Option<String>,
    /// vCPU index.
    pub vcpu: u32,
    /// Name of the page's pageblock freetype ("unmovable|unmapped"...) if the page is managed,
    /// "reserved" for reserved memory (a locked page of the guest's image).
    pub freetype: Option<String>,
    /// Dense freetype index (0xff if none), as in [`veil_abi::ViolationRecord`].
    pub freetype_index: u8,
    /// Whether the page was allocated to the guest at the time ("allocated"), free ("free"),
    /// reserved memory (a locked page of the guest's image: "reserved"), or "unknown" when the
    /// address is.
    pub owner: &'static str,
    /// Test running at the time.
    pub test: Option<String>,
    /// What the VMM did.
    pub action: ViolationAction,
}

impl Violation {
    /// A poisoned record with no freetype or test, for unit tests.
    #[cfg(test)]
    pub(crate) fn sample(gpa: u64, access: AccessKind, size: u32, rip: u64) -> Violation {
        Violation {
            gpa: Some(gpa),
            access,
            size,
            rip,
            rip_symbol: None,
            vcpu: 0,
            freetype: None,
            freetype_index: 0xff,
            owner: "allocated",
            test: None,
            action: ViolationAction::Poisoned,
        }
    }

    /// One line for the text report and JUnit: kind, size (or exits and bytes of its run),
    /// GPA, RIP with its symbol, freetype, owner, test and action.
    pub fn line(&self, run: &ViolationRun) -> String {
        let what = if run.exits == 1 {
            format!("{} bytes", self.size)
        } else {
            format!("{} exits, {} bytes", run.exits, run.bytes)
        };
        format!(
            "{:<5} {:<20} at {:<15}  rip {:#x}{}  {}  {}  test {}  -> {}",
            self.access.name(),
            what,
            self.gpa
                .map_or("address unknown".into(), |g| format!("GPA {g:#011x}")),
            self.rip,
            super::symbol_suffix(&self.rip_symbol),
            self.freetype.as_deref().unwrap_or("-"),
            self.owner,
            self.test.as_deref().unwrap_or("-"),
            self.action.name()
        )
    }

    /// The GPA for text: hex, or "an unknown address".
    pub fn location(&self) -> String {
        match self.gpa {
            Some(g) => format!("GPA {g:#x}"),
            None => "an unknown address".into(),
        }
    }

    /// The page its tally and aggregation count it under ([`veil_abi::ADDRESS_UNKNOWN`]'s page
    /// if the address is unknown).
    pub fn page(&self) -> u64 {
        self.gpa.unwrap_or(veil_abi::ADDRESS_UNKNOWN) & !0xfff
    }

    /// The record [`veil_abi::Hc::QueryViolations`] writes.
    pub fn record(&self) -> veil_abi::ViolationRecord {
        veil_abi::ViolationRecord {
            gpa: self.gpa.unwrap_or(veil_abi::ADDRESS_UNKNOWN),
            rip: self.rip,
            size: self.size,
            access: self.access.abi() as u8,
            freetype: self.freetype_index,
            vcpu: self.vcpu as u16,
        }
    }
}

/// An access to a GPA that is not RAM at all (not an isolation violation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NotRamAccess {
    /// Guest-physical address.
    pub gpa: u64,
    /// Load or store.
    pub access: AccessKind,
    /// Bytes.
    pub size: u32,
    /// Guest RIP.
    pub rip: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// Test running at the time.
    pub test: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(gpa: u64, size: u32, rip: u64) -> Violation {
        Violation {
            test: Some("t".into()),
            ..Violation::sample(gpa, AccessKind::Read, size, rip)
        }
    }

    #[test]
    fn groups_runs_of_one_instruction() {
        let xs = [
            v(0x1000, 8, 1),
            v(0x1008, 8, 1), // second half of a 16-byte load
            v(0x1010, 1, 2),
            v(0x1011, 1, 2),
            v(0x1012, 1, 2), // rep movsb
            v(0x1012, 1, 2), // same byte again: a new run
            v(0x2000, 8, 3),
        ];
        let g = group_violations(&xs);
        let shape: Vec<(usize, u64, u64)> = g.iter().map(|r| (r.first, r.exits, r.bytes)).collect();
        assert_eq!(shape, [(0, 2, 16), (2, 3, 3), (5, 1, 1), (6, 1, 8)]);
    }
}
