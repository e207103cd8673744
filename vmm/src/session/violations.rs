//! Violations: stray guest accesses to unmapped RAM (loads, stores, fetches) and accesses to
//! GPAs that are not RAM, recorded and answered according to the policy.

use super::Session;
use crate::addr::Gpa;
use crate::expect;
use crate::report::{AccessKind, ExitInfo, NotRamAccess, Violation, ViolationAction, MAX_RECORDS};
use crate::run_types::{mmio_action, BlockedAccess, FetchOutcome, ViolationPolicy};

impl Session {
    /// The policy for a violation of `access` at `gpa`: `kill` only fires on violations no test
    /// declared; one the running test still expects (`ExpectViolation`, not yet used up), or
    /// one inside an open reachability route (a route declares that it tries the access), is
    /// answered as under `report`.
    fn policy_for(&self, gpa: Gpa, access: AccessKind) -> ViolationPolicy {
        if self.policy == ViolationPolicy::Kill {
            if self.routes.is_open() || self.checks.sweep_open() {
                return ViolationPolicy::Report;
            }
            if let Some(c) = &self.current {
                let page = gpa.page_start().raw();
                if expect::declared(&c.expectations, &c.tally, page, access) {
                    return ViolationPolicy::Report;
                }
            }
        }
        self.policy
    }

    pub(super) fn record_violation(
        &mut self,
        gpa: Gpa,
        access: AccessKind,
        size: u32,
        rip: u64,
        action: ViolationAction,
    ) -> Violation {
        self.record(Some(gpa), access, size, rip, action)
    }

    /// Records one violation; `gpa` None: the address is unknown (no freetype, owner
    /// "unknown", tallied under [`veil_abi::ADDRESS_UNKNOWN`]'s page).
    fn record(
        &mut self,
        gpa: Option<Gpa>,
        access: AccessKind,
        size: u32,
        rip: u64,
        action: ViolationAction,
    ) -> Violation {
        let pfn = gpa.map(|g| g.pfn().raw());
        let ft = pfn.and_then(|p| self.alloc.pageblock_freetype(p));
        let reserved = gpa.is_some_and(|g| g < self.reserved_end);
        let owner = match pfn {
            Some(_) if reserved => "reserved",
            Some(_) if gpa.is_some_and(|g| self.in_mermap(g)) => "mermap",
            Some(p) if self.alloc.allocation_containing(p).is_some() => "allocated",
            Some(_) => "free",
            None => "unknown",
        };
        let v = Violation {
            gpa: gpa.map(Gpa::raw),
            access,
            size,
            rip,
            rip_symbol: None,
            vcpu: self.cpu.index as u32,
            freetype: match ft {
                Some(f) => Some(f.name().to_string()),
                None if reserved => Some(crate::dump::FREETYPE_RESERVED.to_string()),
                None if gpa.is_some_and(|g| self.in_mermap(g)) => Some("mermap".to_string()),
                None => None,
            },
            freetype_index: ft.map(|f| f.index() as u8).unwrap_or(0xff),
            owner,
            test: self.current_name(),
            action,
        };
        self.violations_total += 1;
        match &mut self.current {
            Some(c) => {
                c.violations += 1;
                // Inside an open route (or sweep) its judgement covers it, not ExpectViolation.
                if !self.routes.is_open()
                    && !gpa.is_some_and(|g| self.checks.sweep_note(g.raw(), access))
                {
                    c.tally.count(&v);
                }
            }
            None => self.violations_outside += 1,
        }
        if self.violations.len() < MAX_RECORDS {
            self.violations.push(v.clone());
        } else {
            let test = match self.current {
                Some(_) => self.ran_order.len().saturating_sub(1) as u32,
                None => u32::MAX,
            };
            self.aggregated.add(test, &v);
        }
        v
    }

    /// Whether the guest's view refuses `access` to the RAM page at `gpa`: a load or fetch of a
    /// page it makes unreachable, a store to one it makes unwritable.
    pub fn blocks(&self, gpa: Gpa, access: AccessKind) -> bool {
        let view = self.engine(|e| e.view());
        self.state_at(gpa).is_some_and(|s| {
            let p = view.perm(s);
            !p.readable() || (access == AccessKind::Write && !p.writable())
        })
    }

    /// An MMIO exit at `gpa` with the exit's `data` (a store's bytes; a load's answer is
    /// written into it): a sensitive page's access is an ASI exit, completed from the VMM's
    /// view; anything else as [`Session::mmio`]. Returns why the VM must stop, if it must.
    pub fn mmio_access(
        &mut self,
        gpa: Gpa,
        access: AccessKind,
        data: &mut [u8],
        rip: u64,
    ) -> Option<ExitInfo> {
        if self.is_sensitive(gpa) {
            match self.asi_mmio(gpa, access, data, rip) {
                Ok(()) => return None,
                Err(e) => log::warn!("ASI exit at {gpa:#x} failed ({e}): a violation"),
            }
        }
        let (byte, stop) = self.mmio(gpa, access, data.len() as u32, rip);
        if access == AccessKind::Read {
            data.fill(byte);
        }
        stop
    }

    /// An MMIO exit at `gpa`: returns the byte a load gets and, if the VM must stop, why.
    pub fn mmio(
        &mut self,
        gpa: Gpa,
        access: AccessKind,
        size: u32,
        rip: u64,
    ) -> (u8, Option<ExitInfo>) {
        let window = self.in_mermap(gpa);
        match self.state_at(gpa) {
            // A window page that shows nothing (never mapped, or flushed) is blocked too.
            _ if window || self.blocks(gpa, access) => {
                let policy = self.policy_for(gpa, access);
                let action = mmio_action(policy, access);
                let v = self.record_violation(gpa, access, size, rip, action);
                if policy == ViolationPolicy::Inject {
                    self.cpu.pending_ve = Some(veil_abi::VeInfo {
                        count: self.cpu.ve_count + 1,
                        gpa: gpa.raw(),
                        rip,
                        access: access.abi() as u64,
                    });
                }
                let stop = (policy == ViolationPolicy::Kill)
                    .then_some(ExitInfo::ViolationKill { violation: v });
                (veil_abi::POISON_BYTE, stop)
            }
            state => {
                if state.is_some() {
                    log::warn!(
                        "MMIO exit at exposed RAM GPA {gpa:#x} ({state:?}): treated as not-RAM"
                    );
                }
                self.not_ram_total += 1;
                if self.not_ram.len() < MAX_RECORDS {
                    self.not_ram.push(NotRamAccess {
                        gpa: gpa.raw(),
                        access,
                        size,
                        rip,
                        vcpu: self.cpu.index as u32,
                        test: self.current_name(),
                    });
                }
                (0xff, None)
            }
        }
    }

    /// Where a livelocked vCPU resumes, if anywhere: under `report` (or `kill` on an access
    /// declared or inside a route, as for any violation), the test's recovery point (used up),
    /// as for a fetch; under `kill` otherwise, nowhere.
    pub(crate) fn livelock_recovery(
        &mut self,
        hole: Option<(Gpa, AccessKind)>,
    ) -> Option<(u64, u64)> {
        let policy = match hole {
            Some((gpa, access)) => self.policy_for(gpa, access),
            None if self.routes.is_open() => ViolationPolicy::Report,
            None => self.policy,
        };
        match policy {
            ViolationPolicy::Kill => None,
            ViolationPolicy::Report | ViolationPolicy::Inject => self.cpu.recovery.take(),
        }
    }

    /// The blocked access of a silent-spin livelock (no exit carried it, so the VMM records it
    /// from the decoded instruction), with what happened next (`recovered` or `stopped`).
    pub(crate) fn livelock_violation(
        &mut self,
        gpa: Gpa,
        access: AccessKind,
        size: u32,
        rip: u64,
        action: ViolationAction,
    ) {
        self.record_violation(gpa, access, size, rip, action);
    }

    /// Accesses to unmapped RAM (`(gpa, kind, size)`: `first`, then `more`) by an
    /// instruction the guest cannot simply run on past: a fetch, an instruction KVM could not
    /// emulate, a page walk through a hole. All are recorded with one action: under `report`
    /// the guest resumes at its recovery point if it set one (the point is used up), else the
    /// VM stops with the first record; under `kill` it stops.
    pub(crate) fn unresumable(
        &mut self,
        first: BlockedAccess,
        more: &[BlockedAccess],
        rip: u64,
    ) -> FetchOutcome {
        let (action, resume) = self.unresumable_action(first.0, first.1);
        let v = self.record_all(first, more, rip, action);
        outcome(v, resume)
    }

    /// A stage-2 fault at an unknown address: neither KVM nor the decoded instruction at `rip`
    /// located it; `access` and `size` are what decoding tells. One record with no GPA,
    /// counted, tallied and declared (`ExpectViolation` at [`veil_abi::ADDRESS_UNKNOWN`]) like
    /// any other, and answered as [`Session::unresumable`]: the recovery point if one is set,
    /// else a violation stop; under `kill`, undeclared, a kill.
    pub(crate) fn unattributed(&mut self, access: AccessKind, size: u32, rip: u64) -> FetchOutcome {
        let (action, resume) = self.unresumable_action(Gpa(veil_abi::ADDRESS_UNKNOWN), access);
        let v = self.record(None, access, size, rip, action);
        outcome(v, resume)
    }

    /// The action for an access the guest cannot run on past, and where it resumes: the
    /// recovery point (used up) unless the policy kills.
    fn unresumable_action(
        &mut self,
        gpa: Gpa,
        access: AccessKind,
    ) -> (ViolationAction, Option<(u64, u64)>) {
        match (self.policy_for(gpa, access), self.cpu.recovery.take()) {
            (ViolationPolicy::Kill, _) => (ViolationAction::Killed, None),
            (_, Some(r)) => (ViolationAction::Recovered, Some(r)),
            (_, None) => (ViolationAction::Stopped, None),
        }
    }

    /// Like [`Session::unresumable`] for a vCPU that cannot be resumed at all (a shutdown):
    /// records the accesses and returns the stop.
    pub(crate) fn fatal(
        &mut self,
        first: BlockedAccess,
        more: &[BlockedAccess],
        rip: u64,
    ) -> ExitInfo {
        let action = match self.policy {
            ViolationPolicy::Kill => ViolationAction::Killed,
            ViolationPolicy::Report | ViolationPolicy::Inject => ViolationAction::Stopped,
        };
        stop_exit(self.record_all(first, more, rip, action))
    }

    fn record_all(
        &mut self,
        first: BlockedAccess,
        more: &[BlockedAccess],
        rip: u64,
        action: ViolationAction,
    ) -> Violation {
        let v = self.record_violation(first.0, first.1, first.2, rip, action);
        for &(gpa, access, size) in more {
            self.record_violation(gpa, access, size, rip, action);
        }
        v
    }
}

/// Resume at `resume` if set, else stop at `v`.
fn outcome(v: Violation, resume: Option<(u64, u64)>) -> FetchOutcome {
    match resume {
        Some((rip, rsp)) => FetchOutcome::Resume { rip, rsp },
        None => FetchOutcome::Stop(Box::new(stop_exit(v))),
    }
}

/// The exit that stops the VM at violation `v`.
fn stop_exit(v: Violation) -> ExitInfo {
    match v.action {
        ViolationAction::Killed => ExitInfo::ViolationKill { violation: v },
        _ => ExitInfo::FetchWithoutRecovery { violation: v },
    }
}
