//! ASI's two stage-2 views and the switch between them.
//!
//! A sensitive page is read-write in the full view and absent from the restricted one; every
//! other state has the same permission in both. KVM memslots and host protections are per
//! VM on a host without a second address space (`KVM_CAP_MULTI_ADDRESS_SPACE` < 2, as here),
//! so the view is the VM's: switching it toggles every sensitive range, one backend call per
//! maximal run ([`Stage2Engine::switch_view`]). The cost of a transition is therefore the
//! number of sensitive runs, which pageblock grouping keeps small.

use serde::Serialize;

use super::engine::Stage2Engine;
use super::{EngineError, Perm, RangeState, Stage2Backend, View};
use crate::addr::Gpa;

/// The VM's ASI view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AsiView {
    /// Sensitive pages absent (the view the guest boots in and returns to at `Hc::AsiEnter`).
    #[default]
    Restricted,
    /// Sensitive pages read-write (after an ASI exit, while any vCPU is exited).
    Full,
}

impl AsiView {
    /// The permissions of this view.
    pub const fn view(self) -> View {
        match self {
            AsiView::Restricted => View::RESTRICTED,
            AsiView::Full => View::FULL,
        }
    }

    /// Lower-case name ("restricted", "full").
    pub const fn name(self) -> &'static str {
        match self {
            AsiView::Restricted => "restricted",
            AsiView::Full => "full",
        }
    }
}

/// What one view switch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ViewSwitch {
    /// Ranges whose permission changed (one backend call each; 0 when the view did not
    /// change or no page is sensitive).
    pub ranges: u64,
    /// Pages in them.
    pub pages: u64,
}

impl<B: Stage2Backend> Stage2Engine<B> {
    /// Maximal runs of sensitive pages now: the ranges a view switch toggles.
    pub fn sensitive_runs(&self) -> u64 {
        self.map
            .iter()
            .filter(|r| r.state == RangeState::Sensitive)
            .count() as u64
    }

    /// Moves the VM to view `to`: every range whose permission differs between the current
    /// view and `to` (the sensitive runs) gets the new one, in one batch
    /// ([`Stage2Backend::set_perms`]). All or nothing: on a backend failure the ranges already
    /// toggled are put back and the view stays as it was. Switching to the current view does
    /// nothing.
    pub fn switch_view(&mut self, to: AsiView) -> Result<ViewSwitch, EngineError> {
        if to == self.asi {
            return Ok(ViewSwitch::default());
        }
        let (old, new) = (self.asi.view(), to.view());
        let mut batch: Vec<(Gpa, u64, Perm)> = Vec::new();
        let mut undo: Vec<(Gpa, u64, Perm)> = Vec::new();
        let mut pages = 0;
        for r in self.map.iter() {
            let (was, now) = (old.perm(r.state), new.perm(r.state));
            if was != now {
                batch.push((Gpa(r.start), r.end - r.start, now));
                undo.push((Gpa(r.start), r.end - r.start, was));
                pages += (r.end - r.start) >> super::PAGE_SHIFT;
            }
        }
        if let Err((done, e)) = self.backend.set_perms(&batch) {
            // Best effort: what was toggled goes back (it only ever restores an earlier
            // layout, so it needs no more slots or VMAs than there were).
            let _ = self.backend.set_perms(&undo[..done]);
            let _ = self.note(Err(e.clone()));
            return Err(e);
        }
        self.asi = to;
        let ranges = batch.len() as u64;
        self.counters.view_switches += 1;
        self.counters.ranges_toggled += ranges;
        self.counters.max_ranges_toggled = self.counters.max_ranges_toggled.max(ranges);
        Ok(ViewSwitch { ranges, pages })
    }
}
