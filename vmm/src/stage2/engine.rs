//! [`Stage2Engine`]: the intended state of every page of guest RAM, realised through a view by
//! a [`Stage2Backend`].

use allocator::{Pfn, Stage2, Stage2Error};

use super::plan::{RangeMap, Run};
use super::{
    AsiView, EngineError, Perm, RangeInfo, RangeState, SlotInfo, Stage2Backend, Stage2Counters,
    View, PAGE_SHIFT, PAGE_SIZE,
};
use crate::addr::Gpa;

/// The stage-2 engine over a backend.
///
/// Invariant (checked by [`Stage2Engine::check_invariants`]): the state map covers RAM in
/// maximal runs, and the backend realises `view.perm(state)` for every page.
pub struct Stage2Engine<B: Stage2Backend> {
    pub(super) backend: B,
    pub(super) map: RangeMap<RangeState>,
    /// The VM's ASI view (per VM on this host: memslots and host protections are per VM).
    pub(super) asi: AsiView,
    pub(super) counters: Stage2Counters,
    ram_size: u64,
    reserved_end: Gpa,
    pub(super) last_error: Option<EngineError>,
}

impl<B: Stage2Backend> Stage2Engine<B> {
    /// RAM [0, ram_size); [0, reserved_end) is Reserved, the rest Mapped; realises the guest
    /// view of that layout through `backend` (which starts with every page unreachable).
    pub fn new(backend: B, ram_size: u64, reserved_end: Gpa) -> Result<Self, EngineError> {
        if ram_size == 0 || !ram_size.is_multiple_of(PAGE_SIZE) {
            return Err(EngineError::BadRamSize(ram_size));
        }
        if reserved_end.raw() > ram_size || !reserved_end.is_page_aligned() {
            return Err(EngineError::BadReservedEnd {
                reserved_end,
                ram_size,
            });
        }
        let map = RangeMap::new(
            ram_size,
            &[
                Run {
                    start: 0,
                    end: reserved_end.raw(),
                    state: RangeState::Reserved,
                },
                Run {
                    start: reserved_end.raw(),
                    end: ram_size,
                    state: RangeState::Mapped,
                },
            ],
        );
        let mut engine = Stage2Engine {
            backend,
            map,
            asi: AsiView::Restricted,
            counters: Stage2Counters::default(),
            ram_size,
            reserved_end,
            last_error: None,
        };
        // One backend call per run of equal permission (reserved and mapped coalesce).
        let mut perm_runs: Vec<Run<Perm>> = Vec::new();
        for r in engine.map.iter() {
            let perm = engine.view().perm(r.state);
            match perm_runs.last_mut() {
                Some(last) if last.state == perm && last.end == r.start => last.end = r.end,
                _ => perm_runs.push(Run {
                    start: r.start,
                    end: r.end,
                    state: perm,
                }),
            }
        }
        for r in perm_runs {
            engine
                .backend
                .set_perm(Gpa(r.start), r.end - r.start, r.state)?;
        }
        Ok(engine)
    }

    /// State of the page at gpa; None when gpa is not RAM.
    pub fn state_at(&self, gpa: Gpa) -> Option<RangeState> {
        self.map.run_at(gpa.0).map(|r| r.state)
    }

    /// The view the guest runs in now (the VM's ASI view: restricted or full).
    pub fn view(&self) -> View {
        self.asi.view()
    }

    /// Which ASI view the VM is in.
    pub fn asi_view(&self) -> AsiView {
        self.asi
    }

    /// Every maximal range of equal state, in GPA order, with its memslot.
    pub fn ranges(&self) -> Vec<RangeInfo> {
        self.map.iter().map(|r| self.range_info(r)).collect()
    }

    /// The ranges overlapping [start, end), clipped to it (O(log n + k)).
    pub fn ranges_in(&self, start: Gpa, end: Gpa) -> Vec<RangeInfo> {
        self.map
            .overlapping(start.0, end.0)
            .map(|r| self.range_info(r))
            .collect()
    }

    /// A run with the memslot that exposes it (none for holes).
    fn range_info(&self, r: Run<RangeState>) -> RangeInfo {
        RangeInfo {
            start: Gpa(r.start),
            end: Gpa(r.end),
            state: r.state,
            slot: if self.view().perm(r.state).readable() {
                self.backend.slot_containing(Gpa(r.start)).map(|s| s.slot)
            } else {
                None
            },
        }
    }

    /// The memslots in use now, in GPA order.
    pub fn memslots(&self) -> Vec<SlotInfo> {
        self.backend.memslots()
    }

    /// Counters of stage-2 work (the engine's updates and the backend's memslot work).
    pub fn counters(&self) -> Stage2Counters {
        let u = self.backend.usage();
        Stage2Counters {
            memslot_updates: u.memslot_updates,
            slots_created: u.slots_created,
            slots_deleted: u.slots_deleted,
            memslots_in_use: u.memslots_in_use,
            peak_memslots: u.peak_memslots,
            mprotect_calls: u.mprotect_calls,
            vmas_in_use: u.vmas_in_use,
            peak_vmas: u.peak_vmas,
            ..self.counters
        }
    }

    /// Size of guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// End of the reserved low memory.
    pub fn reserved_end(&self) -> Gpa {
        self.reserved_end
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (do not change permissions behind the engine's back).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The detailed reason of the last refused update (the allocator only sees `Stage2Error`).
    pub fn last_error(&self) -> Option<&EngineError> {
        self.last_error.as_ref()
    }

    /// Removes [gpa, gpa+len) from stage 2 (both views). Every page must be Mapped or
    /// Sensitive.
    pub fn unmap_range(&mut self, gpa: Gpa, len: u64) -> Result<(), EngineError> {
        let r = self.update(
            "unmap",
            gpa,
            len,
            &[RangeState::Mapped, RangeState::Sensitive],
            RangeState::Unmapped,
        );
        if r.is_ok() {
            self.counters.unmap_calls += 1;
            self.counters.pages_unmapped += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    /// Exposes [gpa, gpa+len) again in both views. Every page must be Unmapped or Sensitive
    /// (the allocator has zeroed it first).
    pub fn map_range(&mut self, gpa: Gpa, len: u64) -> Result<(), EngineError> {
        let r = self.update(
            "map",
            gpa,
            len,
            &[RangeState::Unmapped, RangeState::Sensitive],
            RangeState::Mapped,
        );
        if r.is_ok() {
            self.counters.map_calls += 1;
            self.counters.pages_mapped += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    /// Makes [gpa, gpa+len) sensitive: read-write in the full view, absent from the restricted
    /// one, whatever its state before among Mapped, Unmapped and Sensitive (the allocator
    /// zeroes first where this adds visibility: unmapped to sensitive).
    pub fn make_sensitive_range(&mut self, gpa: Gpa, len: u64) -> Result<(), EngineError> {
        use RangeState::{Mapped, Sensitive, Unmapped};
        let r = self.update(
            "make sensitive",
            gpa,
            len,
            &[Mapped, Unmapped, Sensitive],
            Sensitive,
        );
        if r.is_ok() {
            self.counters.sensitive_calls += 1;
            self.counters.pages_made_sensitive += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    /// Locks [gpa, gpa+len) for the rest of the run: `to` is `ReadOnly` (every page must be
    /// Mapped or Reserved) or `NoAccess` (every page Mapped, Reserved or ReadOnly). There is
    /// no way back: locks only tighten. Which pages a guest may lock is the caller's rule
    /// (the session: pages it owns and its own image; never the VMM's structures).
    pub fn lock_range(&mut self, gpa: Gpa, len: u64, to: RangeState) -> Result<(), EngineError> {
        use RangeState::{Mapped, ReadOnly, Reserved};
        let r = match to {
            RangeState::ReadOnly => self.update("lock", gpa, len, &[Mapped, Reserved], to),
            RangeState::NoAccess => {
                self.update("lock", gpa, len, &[Mapped, Reserved, ReadOnly], to)
            }
            _ => Err(EngineError::NotALock(to)),
        };
        if r.is_ok() {
            self.counters.protect_calls += 1;
            self.counters.pages_protected += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    /// Zeroes [gpa, gpa+len) through the backend. Reserved memory (below the reserved end,
    /// whatever its state: a locked image page stays refused) is refused.
    pub fn zero_range(&mut self, gpa: Gpa, len: u64) -> Result<(), EngineError> {
        let r = self.zero_inner(gpa, len);
        if r.is_ok() {
            self.counters.zero_calls += 1;
            self.counters.pages_zeroed += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    pub(super) fn note(&mut self, r: Result<(), EngineError>) -> Result<(), EngineError> {
        if let Err(e) = &r {
            self.counters.rejected_updates += 1;
            self.last_error = Some(e.clone());
        }
        r
    }

    fn check_range(&self, gpa: Gpa, len: u64) -> Result<u64, EngineError> {
        let end = gpa.0.checked_add(len);
        match end {
            Some(end)
                if len > 0
                    && end <= self.ram_size
                    && gpa.is_page_aligned()
                    && len.is_multiple_of(PAGE_SIZE) =>
            {
                Ok(end)
            }
            _ => Err(EngineError::OutOfRam {
                start: gpa,
                end: Gpa(end.unwrap_or(u64::MAX)),
                ram_size: self.ram_size,
            }),
        }
    }

    fn zero_inner(&mut self, gpa: Gpa, len: u64) -> Result<(), EngineError> {
        let end = self.check_range(gpa, len)?;
        if let Some(r) = self
            .map
            .overlapping(gpa.0, end)
            .find(|r| r.start < self.reserved_end.raw())
        {
            return Err(EngineError::WrongState {
                op: "zero",
                start: gpa,
                end: Gpa(end),
                gpa: Gpa(r.start),
                found: r.state,
            });
        }
        self.backend.zero(gpa, len).map_err(EngineError::Backend)
    }

    /// Moves every page of [gpa, gpa+len) from one of the states `from` to `to` and has the
    /// backend realise the new permission, run by run (where the view gives them different
    /// ones).
    fn update(
        &mut self,
        op: &'static str,
        gpa: Gpa,
        len: u64,
        from: &[RangeState],
        to: RangeState,
    ) -> Result<(), EngineError> {
        let end = self.check_range(gpa, len)?;
        if let Some(r) = self
            .map
            .overlapping(gpa.0, end)
            .find(|r| !from.contains(&r.state))
        {
            return Err(EngineError::WrongState {
                op,
                start: gpa,
                end: Gpa(end),
                gpa: Gpa(r.start),
                found: r.state,
            });
        }
        let view = self.view();
        let perm = view.perm(to);
        // A range entering or leaving `Unmapped` changes its host backing under
        // `--host-secretmem` even when the view's permission stays the same (unmapped to
        // sensitive in the restricted view: `None` both).
        let backing_changes = self.backend.secret_unmapped()
            && self
                .map
                .overlapping(gpa.0, end)
                .any(|r| (r.state == RangeState::Unmapped) != (to == RangeState::Unmapped));
        if backing_changes
            || self
                .map
                .overlapping(gpa.0, end)
                .any(|r| view.perm(r.state) != perm)
        {
            self.backend.set_state(gpa, len, perm, to)?;
        }
        self.map.set(gpa.0, end, to);
        Ok(())
    }

    /// Checks that the state map covers RAM in maximal runs, that the backend realises the
    /// view of every run, and the backend's own invariants.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut prev: Option<Run<RangeState>> = None;
        let mut covered = 0;
        for r in self.map.iter() {
            if r.start != covered || prev.is_some_and(|p| p.state == r.state) {
                return Err(format!(
                    "range map not maximal/contiguous at {:#x}",
                    r.start
                ));
            }
            let want = self.view().perm(r.state);
            for g in [r.start, r.end - PAGE_SIZE] {
                let got = self.backend.perm_at(Gpa(g));
                if got != Some(want) {
                    return Err(format!(
                        "page {g:#x} is {} but the backend gives {got:?}, not {want:?}",
                        r.state
                    ));
                }
            }
            covered = r.end;
            prev = Some(r);
        }
        if covered != self.ram_size {
            return Err("range map does not cover RAM".into());
        }
        self.backend.check()
    }
}

impl<B: Stage2Backend> Stage2Engine<B> {
    /// Byte range of [pfn, pfn+count), or a counted refusal when it overflows.
    fn pfn_range(&mut self, pfn: Pfn, count: u64) -> Result<(Gpa, u64), Stage2Error> {
        match (Gpa::from_pfn(pfn), count.checked_mul(PAGE_SIZE)) {
            (Some(gpa), Some(len)) => Ok((gpa, len)),
            _ => {
                let e = EngineError::PfnOverflow { pfn, count };
                let s2 = e.to_stage2();
                let _ = self.note(Err(e));
                Err(s2)
            }
        }
    }
}

impl<B: Stage2Backend> Stage2 for Stage2Engine<B> {
    fn unmap(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (gpa, len) = self.pfn_range(pfn, count)?;
        self.unmap_range(gpa, len).map_err(|e| e.to_stage2())
    }

    fn map(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (gpa, len) = self.pfn_range(pfn, count)?;
        self.map_range(gpa, len).map_err(|e| e.to_stage2())
    }

    fn zero(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (gpa, len) = self.pfn_range(pfn, count)?;
        self.zero_range(gpa, len).map_err(|e| e.to_stage2())
    }

    fn make_sensitive(&mut self, pfn: Pfn, count: u64) -> Result<(), Stage2Error> {
        let (gpa, len) = self.pfn_range(pfn, count)?;
        self.make_sensitive_range(gpa, len)
            .map_err(|e| e.to_stage2())
    }
}
