//! Violations: stray guest accesses to unmapped RAM (loads, stores, fetches) and accesses to
//! GPAs that are not RAM, recorded and answered according to the policy.

use super::Session;
use crate::report::{AccessKind, ExitInfo, NotRamAccess, Violation, ViolationAction, MAX_RECORDS};
use crate::stage2::RangeState;
use crate::vm::{mmio_action, FetchOutcome, ViolationPolicy};

impl Session {
    pub(super) fn record_violation(
        &mut self,
        gpa: u64,
        access: AccessKind,
        size: u32,
        rip: u64,
        action: ViolationAction,
    ) -> Violation {
        let pfn = gpa >> 12;
        let ft = self.alloc.pageblock_freetype(pfn);
        let owner = if self.alloc.allocation_containing(pfn).is_some() {
            "allocated"
        } else {
            "free"
        };
        let v = Violation {
            gpa,
            access,
            size,
            rip,
            vcpu: 0,
            freetype: ft.map(|f| f.name().to_string()),
            freetype_index: ft.map(|f| f.index() as u8).unwrap_or(0xff),
            owner,
            test: self.current_name(),
            action,
        };
        self.violations_total += 1;
        match &mut self.current {
            Some(c) => {
                c.violations += 1;
                // Inside an open route the route's judgement covers it, not ExpectViolation.
                if !self.routes.is_open() {
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

    /// An MMIO exit at `gpa`: returns the byte a load gets and, if the VM must stop, why.
    pub fn mmio(
        &mut self,
        gpa: u64,
        access: AccessKind,
        size: u32,
        rip: u64,
    ) -> (u8, Option<ExitInfo>) {
        match self.state_at(gpa) {
            Some(RangeState::Unmapped) => {
                let action = mmio_action(self.policy, access);
                let v = self.record_violation(gpa, access, size, rip, action);
                let stop = (self.policy == ViolationPolicy::Kill)
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
                        gpa,
                        access,
                        size,
                        rip,
                        vcpu: 0,
                        test: self.current_name(),
                    });
                }
                (0xff, None)
            }
        }
    }

    /// An instruction fetch from unmapped RAM at `gpa`.
    pub(crate) fn fetch_violation(&mut self, gpa: u64, rip: u64) -> FetchOutcome {
        let (action, resume) = match (self.policy, self.recovery.take()) {
            (ViolationPolicy::Kill, _) => (ViolationAction::Killed, None),
            (_, Some(r)) => (ViolationAction::Recovered, Some(r)),
            (_, None) => (ViolationAction::Stopped, None),
        };
        let v = self.record_violation(gpa, AccessKind::Fetch, 1, rip, action);
        match (action, resume) {
            (ViolationAction::Recovered, Some((rip, rsp))) => FetchOutcome::Resume { rip, rsp },
            (ViolationAction::Killed, _) => {
                FetchOutcome::Stop(Box::new(ExitInfo::ViolationKill { violation: v }))
            }
            _ => FetchOutcome::Stop(Box::new(ExitInfo::FetchWithoutRecovery { violation: v })),
        }
    }
}
