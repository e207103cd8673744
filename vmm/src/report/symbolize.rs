//! Fills the report's `rip_symbol` fields from the guest ELF's symbol table
//! ([`crate::symbols`]): every kept violation, every aggregated group, and the RIPs of the exit.

use super::{ExitInfo, RunReport};
use crate::symbols::Symbols;

impl RunReport {
    /// Resolves every violation and crash RIP through `syms` (a stripped guest: an empty
    /// table, every `rip_symbol` stays None).
    pub fn resolve_symbols(&mut self, syms: &Symbols) {
        if syms.is_empty() {
            return;
        }
        for v in &mut self.violations {
            v.rip_symbol = syms.name(v.rip);
        }
        for g in &mut self.violations_aggregated {
            g.rip_symbol = syms.name(g.rip);
        }
        self.exit.resolve_symbols(syms);
    }
}

impl ExitInfo {
    /// Resolves the exit's RIPs (its violation's, its own, its registers') through `syms`.
    pub fn resolve_symbols(&mut self, syms: &Symbols) {
        match self {
            ExitInfo::ViolationKill { violation }
            | ExitInfo::FetchWithoutRecovery { violation } => {
                violation.rip_symbol = syms.name(violation.rip);
            }
            ExitInfo::GuestException {
                rip, rip_symbol, ..
            }
            | ExitInfo::Livelock {
                rip, rip_symbol, ..
            } => *rip_symbol = syms.name(*rip),
            _ => {}
        }
        if let Some(regs) = self.regs_mut() {
            regs.rip_symbol = syms.name(regs.rip);
        }
    }

    fn regs_mut(&mut self) -> Option<&mut super::RegsDump> {
        match self {
            ExitInfo::GuestException { regs, .. }
            | ExitInfo::TripleFault { regs }
            | ExitInfo::InternalError { regs, .. }
            | ExitInfo::Halted { regs }
            | ExitInfo::UnexpectedExit { regs, .. }
            | ExitInfo::Timeout { regs, .. }
            | ExitInfo::Interrupted { regs, .. }
            | ExitInfo::Livelock { regs, .. } => Some(regs),
            _ => None,
        }
    }
}
