//! Reconciliation (`veil run --verify-stage2`, `Hc::VerifyStage2`): the state the host realises
//! ([`Stage2Backend::realised`]: the kernel's mappings for `mprotect`, the record of KVM's slot
//! table for `slots`) against the engine's intended state seen through its view. Every
//! difference is a [`Mismatch`] naming the range and both sides.

use serde::Serialize;

use super::{HostBacking, Perm, RangeState, Realised, Stage2Backend, Stage2Engine};
use crate::addr::Gpa;

/// One range where the host does not realise what the engine intends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// First GPA.
    pub start: Gpa,
    /// GPA one past the range.
    pub end: Gpa,
    /// The engine's state of the range.
    pub state: RangeState,
    /// The permission the view gives that state.
    pub intended_perm: Perm,
    /// The backing the engine intends (secret memory for unmapped pages under
    /// `--host-secretmem`).
    pub intended_backing: HostBacking,
    /// The permission in force.
    pub realised_perm: Perm,
    /// The backing in force.
    pub realised_backing: HostBacking,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) is {}: intended {:?} on {:?} memory, realised {:?} on {:?} memory",
            self.start.0,
            self.end.0,
            self.state,
            self.intended_perm,
            self.intended_backing,
            self.realised_perm,
            self.realised_backing
        )
    }
}

/// Appends `r` to `runs`, merging it into the last run when it continues it with equal
/// permission and backing.
pub(crate) fn push_run(runs: &mut Vec<Realised>, r: Realised) {
    match runs.last_mut() {
        Some(last) if last.end == r.start && last.perm == r.perm && last.backing == r.backing => {
            last.end = r.end
        }
        _ => runs.push(r),
    }
}

/// Compares what `engine`'s backend realises with what the engine intends, over all of RAM.
/// `Err` when the realised state cannot be read (or does not cover RAM).
pub fn reconcile<B: Stage2Backend>(engine: &Stage2Engine<B>) -> Result<Vec<Mismatch>, String> {
    let realised = engine.backend().realised()?;
    let secret = engine.backend().secret_unmapped();
    let view = engine.view();
    let mut out: Vec<Mismatch> = Vec::new();
    let mut i = 0;
    for want in engine.ranges() {
        let intended_perm = view.perm(want.state);
        let intended_backing = if secret && want.state == RangeState::Unmapped {
            HostBacking::Secret
        } else {
            HostBacking::Memory
        };
        let mut at = want.start.0;
        while at < want.end.0 {
            while i < realised.len() && realised[i].end.0 <= at {
                i += 1;
            }
            let Some(got) = realised.get(i).filter(|r| r.start.0 <= at) else {
                return Err(format!("the realised state does not cover GPA {at:#x}"));
            };
            let end = got.end.0.min(want.end.0);
            if got.perm != intended_perm || got.backing != intended_backing {
                let m = Mismatch {
                    start: Gpa(at),
                    end: Gpa(end),
                    state: want.state,
                    intended_perm,
                    intended_backing,
                    realised_perm: got.perm,
                    realised_backing: got.backing,
                };
                match out.last_mut() {
                    Some(l)
                        if l.end == m.start
                            && (l.state, l.realised_perm, l.realised_backing)
                                == (m.state, m.realised_perm, m.realised_backing) =>
                    {
                        l.end = m.end
                    }
                    _ => out.push(m),
                }
            }
            at = end;
        }
    }
    Ok(out)
}
