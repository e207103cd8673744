//! [`Stage2Engine`]: page states of guest RAM realised as a minimal set of memslots.

use std::collections::{BTreeMap, BTreeSet};

use allocator::{Pfn, Stage2, Stage2Error};

use super::plan::{self, RangeMap, Run};
use super::{
    EngineError, RangeInfo, RangeState, SlotBackend, SlotInfo, Stage2Counters, PAGE_SHIFT,
    PAGE_SIZE,
};

/// The stage-2 engine over a [`SlotBackend`].
///
/// Invariant (checked by [`Stage2Engine::check_invariants`]): the memslots are exactly the
/// maximal runs of exposed pages, each in a distinct id below `backend.max_slots()`.
pub struct Stage2Engine<B: SlotBackend> {
    backend: B,
    map: RangeMap,
    /// gpa -> (end, slot id), mirrors the backend's slot table.
    slots: BTreeMap<u64, (u64, u32)>,
    /// Ids that were used and are free again (lowest reused first).
    free_ids: BTreeSet<u32>,
    /// Ids >= this were never used.
    next_fresh_id: u32,
    counters: Stage2Counters,
    ram_size: u64,
    reserved_end: u64,
    last_error: Option<EngineError>,
}

impl<B: SlotBackend> Stage2Engine<B> {
    /// RAM [0, ram_size); [0, reserved_end) is Reserved, the rest Mapped; realises the initial
    /// memslots (one slot for everything: reserved and mapped coalesce).
    pub fn new(backend: B, ram_size: u64, reserved_end: u64) -> Result<Self, EngineError> {
        if ram_size == 0 || !ram_size.is_multiple_of(PAGE_SIZE) {
            return Err(EngineError::BadRamSize(ram_size));
        }
        if reserved_end > ram_size || !reserved_end.is_multiple_of(PAGE_SIZE) {
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
                    end: reserved_end,
                    state: RangeState::Reserved,
                },
                Run {
                    start: reserved_end,
                    end: ram_size,
                    state: RangeState::Mapped,
                },
            ],
        );
        let mut engine = Stage2Engine {
            backend,
            map,
            slots: BTreeMap::new(),
            free_ids: BTreeSet::new(),
            next_fresh_id: 0,
            counters: Stage2Counters::default(),
            ram_size,
            reserved_end,
            last_error: None,
        };
        let runs = plan::exposed_runs(&engine.map, 0, ram_size, 0, 0, RangeState::Unmapped);
        let plan = plan::diff(&[], &runs);
        let needed = plan.create.len() as u64;
        if needed > u64::from(engine.backend.max_slots()) {
            return Err(EngineError::OutOfSlots {
                needed,
                max: engine.backend.max_slots(),
            });
        }
        engine.execute(&plan).map_err(EngineError::Backend)?;
        Ok(engine)
    }

    /// State of the page at gpa; None when gpa is not RAM.
    pub fn state_at(&self, gpa: u64) -> Option<RangeState> {
        self.map.run_at(gpa).map(|r| r.state)
    }

    /// Every maximal range of equal state, in GPA order, with its memslot.
    pub fn ranges(&self) -> Vec<RangeInfo> {
        self.map.iter().map(|r| self.range_info(r)).collect()
    }

    /// The ranges overlapping [start, end), clipped to it (O(log n + k)).
    pub fn ranges_in(&self, start: u64, end: u64) -> Vec<RangeInfo> {
        self.map
            .overlapping(start, end)
            .map(|r| self.range_info(r))
            .collect()
    }

    /// A run with the memslot that exposes it (none for holes).
    fn range_info(&self, r: Run) -> RangeInfo {
        RangeInfo {
            start: r.start,
            end: r.end,
            state: r.state,
            slot: if r.state.is_exposed() {
                self.slot_containing(r.start).map(|s| s.slot)
            } else {
                None
            },
        }
    }

    /// The memslot table as KVM holds it now, in GPA order.
    pub fn memslots(&self) -> Vec<SlotInfo> {
        SlotInfo::table(&self.slots)
    }

    /// The memslot containing gpa, if any.
    pub fn slot_containing(&self, gpa: u64) -> Option<SlotInfo> {
        let (&s, &(end, slot)) = self.slots.range(..=gpa).next_back()?;
        (gpa < end).then_some(SlotInfo {
            slot,
            gpa: s,
            len: end - s,
        })
    }

    /// Counters of stage-2 work.
    pub fn counters(&self) -> Stage2Counters {
        self.counters
    }

    /// Size of guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// End of the reserved low memory.
    pub fn reserved_end(&self) -> u64 {
        self.reserved_end
    }

    /// The slot backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The slot backend, mutably (do not change slots behind the engine's back).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The detailed reason of the last refused update (the allocator only sees `Stage2Error`).
    pub fn last_error(&self) -> Option<&EngineError> {
        self.last_error.as_ref()
    }

    /// Removes [gpa, gpa+len) from stage 2. Every page must be Mapped.
    pub fn unmap_range(&mut self, gpa: u64, len: u64) -> Result<(), EngineError> {
        let r = self.update("unmap", gpa, len, RangeState::Mapped, RangeState::Unmapped);
        if r.is_ok() {
            self.backend.set_locked(gpa, len, true);
            self.counters.unmap_calls += 1;
            self.counters.pages_unmapped += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    /// Exposes [gpa, gpa+len) again. Every page must be Unmapped.
    pub fn map_range(&mut self, gpa: u64, len: u64) -> Result<(), EngineError> {
        let r = self.update("map", gpa, len, RangeState::Unmapped, RangeState::Mapped);
        if r.is_ok() {
            self.backend.set_locked(gpa, len, false);
            self.counters.map_calls += 1;
            self.counters.pages_mapped += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    /// Zeroes [gpa, gpa+len) through the backend. Reserved memory is refused.
    pub fn zero_range(&mut self, gpa: u64, len: u64) -> Result<(), EngineError> {
        let r = self.zero_inner(gpa, len);
        if r.is_ok() {
            self.counters.zero_calls += 1;
            self.counters.pages_zeroed += len >> PAGE_SHIFT;
        }
        self.note(r)
    }

    fn note(&mut self, r: Result<(), EngineError>) -> Result<(), EngineError> {
        if let Err(e) = &r {
            self.counters.rejected_updates += 1;
            self.last_error = Some(e.clone());
        }
        r
    }

    fn check_range(&self, gpa: u64, len: u64) -> Result<u64, EngineError> {
        let end = gpa.checked_add(len);
        match end {
            Some(end)
                if len > 0
                    && end <= self.ram_size
                    && gpa.is_multiple_of(PAGE_SIZE)
                    && len.is_multiple_of(PAGE_SIZE) =>
            {
                Ok(end)
            }
            _ => Err(EngineError::OutOfRam {
                start: gpa,
                end: end.unwrap_or(u64::MAX),
                ram_size: self.ram_size,
            }),
        }
    }

    fn zero_inner(&mut self, gpa: u64, len: u64) -> Result<(), EngineError> {
        let end = self.check_range(gpa, len)?;
        if let Some(r) = self
            .map
            .overlapping(gpa, end)
            .find(|r| r.state == RangeState::Reserved)
        {
            return Err(EngineError::WrongState {
                op: "zero",
                start: gpa,
                end,
                gpa: r.start,
                found: r.state,
            });
        }
        self.backend.zero(gpa, len).map_err(EngineError::Backend)
    }

    /// Moves every page of [gpa, gpa+len) from `from` to `to` and reshapes the memslots around it.
    fn update(
        &mut self,
        op: &'static str,
        gpa: u64,
        len: u64,
        from: RangeState,
        to: RangeState,
    ) -> Result<(), EngineError> {
        let end = self.check_range(gpa, len)?;
        if let Some(r) = self.map.overlapping(gpa, end).find(|r| r.state != from) {
            return Err(EngineError::WrongState {
                op,
                start: gpa,
                end,
                gpa: r.start,
                found: r.state,
            });
        }
        // The window: the update plus the slots touching it. Its edges are holes or RAM ends,
        // so the exposed runs computed inside it are maximal globally.
        let mut ws = gpa;
        let mut we = end;
        for probe in [gpa.checked_sub(1), Some(gpa), Some(end - 1), Some(end)]
            .into_iter()
            .flatten()
        {
            if let Some(s) = self.slot_containing(probe) {
                ws = ws.min(s.gpa);
                we = we.max(s.end());
            }
        }
        let old: Vec<SlotInfo> = self
            .slots
            .range(ws..we)
            .map(|(&g, &(e, slot))| SlotInfo {
                slot,
                gpa: g,
                len: e - g,
            })
            .collect();
        let new = plan::exposed_runs(&self.map, ws, we, gpa, end, to);
        let plan = plan::diff(&old, &new);
        let needed = self.slots.len() as u64 - plan.delete.len() as u64 + plan.create.len() as u64;
        let max = self.backend.max_slots();
        if needed > u64::from(max) {
            return Err(EngineError::OutOfSlots { needed, max });
        }
        self.execute(&plan).map_err(EngineError::Backend)?;
        self.map.set(gpa, end, to);
        Ok(())
    }

    fn take_fresh_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_ids.pop_first() {
            return Some(id);
        }
        (self.next_fresh_id < self.backend.max_slots()).then(|| {
            self.next_fresh_id += 1;
            self.next_fresh_id - 1
        })
    }

    fn release_id(&mut self, id: u32) {
        self.free_ids.insert(id);
    }

    fn call(&mut self, slot: u32, gpa: u64, len: u64) -> Result<(), Stage2Error> {
        self.counters.memslot_updates += 1;
        let r = self.backend.set_slot(slot, gpa, len);
        if r.is_ok() {
            if len == 0 {
                self.counters.slots_deleted += 1;
                self.slots.remove(&gpa);
                self.release_id(slot);
            } else {
                self.counters.slots_created += 1;
                self.slots.insert(gpa, (gpa + len, slot));
            }
            self.counters.memslots_in_use = self.slots.len() as u64;
            self.counters.peak_memslots = self
                .counters
                .peak_memslots
                .max(self.counters.memslots_in_use);
        }
        r
    }

    /// Runs a plan: deletes first, then creates in freed or fresh ids. On a backend failure it
    /// undoes what it did (best effort) and returns the failure.
    fn execute(&mut self, plan: &plan::SlotPlan) -> Result<(), Stage2Error> {
        let mut deleted: Vec<SlotInfo> = Vec::with_capacity(plan.delete.len());
        let mut created: Vec<SlotInfo> = Vec::with_capacity(plan.create.len());
        let mut failure = None;
        for d in &plan.delete {
            match self.call(d.slot, d.gpa, 0) {
                Ok(()) => deleted.push(*d),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            for &(gpa, len) in &plan.create {
                let Some(id) = self.take_fresh_id() else {
                    failure = Some(Stage2Error::OutOfSlots);
                    break;
                };
                match self.call(id, gpa, len) {
                    Ok(()) => created.push(SlotInfo { slot: id, gpa, len }),
                    Err(e) => {
                        self.release_id(id);
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        let Some(err) = failure else { return Ok(()) };
        for c in created.iter().rev() {
            let _ = self.call(c.slot, c.gpa, 0);
        }
        for d in deleted.iter().rev() {
            if self.free_ids.remove(&d.slot) && self.call(d.slot, d.gpa, d.len).is_err() {
                self.release_id(d.slot);
            }
        }
        Err(err)
    }

    /// Checks that the memslots are exactly the maximal exposed runs, with distinct ids below the
    /// backend's limit, and that the counters agree with the table.
    pub fn check_invariants(&self) -> Result<(), String> {
        let runs = plan::exposed_runs(&self.map, 0, self.ram_size, 0, 0, RangeState::Unmapped);
        let slots = self.memslots();
        let got: Vec<(u64, u64)> = slots.iter().map(|s| (s.gpa, s.end())).collect();
        if got != runs {
            return Err(format!("memslots {got:x?} != exposed runs {runs:x?}"));
        }
        let mut ids = BTreeSet::new();
        for s in &slots {
            if s.slot >= self.backend.max_slots()
                || !ids.insert(s.slot)
                || self.free_ids.contains(&s.slot)
            {
                return Err(format!("bad or duplicate slot id {}", s.slot));
            }
        }
        if self.counters.memslots_in_use != slots.len() as u64 {
            return Err("memslots_in_use disagrees with the table".into());
        }
        let mut prev: Option<Run> = None;
        let mut covered = 0;
        for r in self.map.iter() {
            if r.start != covered || prev.is_some_and(|p| p.state == r.state) {
                return Err(format!(
                    "range map not maximal/contiguous at {:#x}",
                    r.start
                ));
            }
            covered = r.end;
            prev = Some(r);
        }
        if covered != self.ram_size {
            return Err("range map does not cover RAM".into());
        }
        Ok(())
    }
}

impl<B: SlotBackend> Stage2Engine<B> {
    /// Byte range of [pfn, pfn+count), or a counted OutOfRam refusal when it overflows.
    fn pfn_range(&mut self, pfn: Pfn, count: u64) -> Result<(u64, u64), Stage2Error> {
        match (pfn.checked_mul(PAGE_SIZE), count.checked_mul(PAGE_SIZE)) {
            (Some(gpa), Some(len)) => Ok((gpa, len)),
            _ => {
                let e = EngineError::OutOfRam {
                    start: pfn,
                    end: u64::MAX,
                    ram_size: self.ram_size,
                };
                let s2 = e.to_stage2();
                let _ = self.note(Err(e));
                Err(s2)
            }
        }
    }
}

impl<B: SlotBackend> Stage2 for Stage2Engine<B> {
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
}
