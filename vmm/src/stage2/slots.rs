//! [`Slots`]: the `slots` backend, a view realised as the minimal set of KVM memslots.
//!
//! Every maximal run of pages with equal, non-`None` permission is exactly one memslot
//! (`Read` runs are `KVM_MEM_READONLY` slots) and `None` pages are holes: the minimal number of
//! memslots for a layout. A permission change inside a slot deletes the slot and re-creates the
//! pieces around it (KVM cannot shrink a slot or change its flags in place); a change that
//! meets neighbours of equal permission merges them into one slot. The planner ([`plan`])
//! computes the slots to delete and create from the slots around the change, so a change costs
//! O(log n + ranges touched).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use allocator::Stage2Error;

use super::plan::{self, RangeMap, Run};
use super::{
    BackendUsage, EngineError, HostBacking, LockStats, MemslotTable, Perm, Realised, SlotInfo,
    Stage2Backend, PAGE_SIZE,
};
use crate::addr::Gpa;
use crate::shootdown::Vcpus;

/// The `slots` backend over a memslot table `T` (real KVM or the model).
///
/// Invariant (checked by [`Stage2Backend::check`]): the memslots are exactly the maximal runs
/// of equal non-`None` permission, each in a distinct id below `table.max_slots()`.
pub struct Slots<T: MemslotTable> {
    table: T,
    perms: RangeMap<Perm>,
    /// gpa -> (end, slot id, readonly), mirrors the table.
    slots: BTreeMap<u64, (u64, u32, bool)>,
    /// Ids that were used and are free again (lowest reused first).
    free_ids: BTreeSet<u32>,
    /// Ids >= this were never used.
    next_fresh_id: u32,
    usage: BackendUsage,
    /// The slot (gpa, end, readonly) a tamper split around one page, until it is undone.
    tampered: Option<(u64, u64, bool)>,
    /// The VM's vCPUs, parked around every memslot update (a sibling running through one
    /// would see pages that stay mapped vanish between the deletes and the creates).
    park: Option<Arc<Vcpus>>,
    /// The other vCPUs are parked already for a whole batch ([`Stage2Backend::set_perms`]).
    parked_for_batch: bool,
}

impl<T: MemslotTable> Slots<T> {
    /// RAM [0, ram_size), every page unreachable and no memslot yet.
    pub fn new(table: T, ram_size: u64) -> Slots<T> {
        Slots {
            table,
            perms: RangeMap::new(
                ram_size,
                &[Run {
                    start: 0,
                    end: ram_size,
                    state: Perm::None,
                }],
            ),
            slots: BTreeMap::new(),
            free_ids: BTreeSet::new(),
            next_fresh_id: 0,
            usage: BackendUsage::default(),
            tampered: None,
            park: None,
            parked_for_batch: false,
        }
    }

    /// The memslot table.
    pub fn table(&self) -> &T {
        &self.table
    }

    /// The memslot table, mutably (do not change slots behind the backend's back).
    pub fn table_mut(&mut self) -> &mut T {
        &mut self.table
    }

    fn take_fresh_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_ids.pop_first() {
            return Some(id);
        }
        (self.next_fresh_id < self.table.max_slots()).then(|| {
            self.next_fresh_id += 1;
            self.next_fresh_id - 1
        })
    }

    fn release_id(&mut self, id: u32) {
        self.free_ids.insert(id);
    }

    fn call(&mut self, slot: u32, gpa: u64, len: u64, ro: bool) -> Result<(), Stage2Error> {
        self.usage.memslot_updates += 1;
        let r = self.table.set_slot(slot, gpa, len, ro);
        if r.is_ok() {
            if len == 0 {
                self.usage.slots_deleted += 1;
                self.slots.remove(&gpa);
                self.release_id(slot);
            } else {
                self.usage.slots_created += 1;
                self.slots.insert(gpa, (gpa + len, slot, ro));
            }
            self.usage.memslots_in_use = self.slots.len() as u64;
            self.usage.peak_memslots = self.usage.peak_memslots.max(self.usage.memslots_in_use);
        }
        r
    }

    /// Parks every other vCPU of `vcpus` around each memslot update from now on.
    pub fn park_vcpus(&mut self, vcpus: Arc<Vcpus>) {
        self.park = Some(vcpus);
    }

    /// Runs a plan: deletes first, then creates in freed or fresh ids, with the other vCPUs
    /// parked. On a table failure it undoes what it did (best effort) and returns the failure.
    fn execute(&mut self, plan: &plan::SlotPlan) -> Result<(), Stage2Error> {
        let park = self.park.clone();
        let _parked = park
            .as_ref()
            .filter(|_| !self.parked_for_batch)
            .filter(|_| !plan.delete.is_empty() || !plan.create.is_empty())
            .map(|v| v.park_others());
        let mut deleted: Vec<SlotInfo> = Vec::with_capacity(plan.delete.len());
        let mut created: Vec<SlotInfo> = Vec::with_capacity(plan.create.len());
        let mut failure = None;
        for d in &plan.delete {
            match self.call(d.slot, d.gpa, 0, d.readonly) {
                Ok(()) => deleted.push(*d),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            for &(gpa, len, readonly) in &plan.create {
                let Some(id) = self.take_fresh_id() else {
                    failure = Some(Stage2Error::OutOfSlots);
                    break;
                };
                match self.call(id, gpa, len, readonly) {
                    Ok(()) => created.push(SlotInfo {
                        slot: id,
                        gpa,
                        len,
                        readonly,
                    }),
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
            let _ = self.call(c.slot, c.gpa, 0, c.readonly);
        }
        for d in deleted.iter().rev() {
            if self.free_ids.remove(&d.slot) && self.call(d.slot, d.gpa, d.len, d.readonly).is_err()
            {
                self.release_id(d.slot);
            }
        }
        Err(err)
    }

    /// Locks what becomes unreachable, unlocks what becomes reachable again.
    fn relock(&mut self, old: &[Run<Perm>], perm: Perm) {
        for r in old {
            match (r.state == Perm::None, perm == Perm::None) {
                (false, true) => self.table.set_locked(r.start, r.end - r.start, true),
                (true, false) => self.table.set_locked(r.start, r.end - r.start, false),
                _ => {}
            }
        }
    }
}

impl<T: MemslotTable> Stage2Backend for Slots<T> {
    fn name(&self) -> &'static str {
        "slots"
    }

    fn set_perms(&mut self, ranges: &[(Gpa, u64, Perm)]) -> Result<(), (usize, EngineError)> {
        let park = self.park.clone();
        let _parked = park
            .as_ref()
            .filter(|_| !ranges.is_empty())
            .map(|v| v.park_others());
        self.parked_for_batch = true;
        let mut r = Ok(());
        for (i, &(gpa, len, perm)) in ranges.iter().enumerate() {
            if let Err(e) = self.set_perm(gpa, len, perm) {
                r = Err((i, e));
                break;
            }
        }
        self.parked_for_batch = false;
        r
    }

    fn set_perm(&mut self, gpa: Gpa, len: u64, perm: Perm) -> Result<(), EngineError> {
        let (gpa, end) = match gpa.0.checked_add(len) {
            Some(end)
                if len > 0
                    && end <= self.perms.size()
                    && gpa.is_page_aligned()
                    && len.is_multiple_of(PAGE_SIZE) =>
            {
                (gpa.0, end)
            }
            e => {
                return Err(EngineError::OutOfRam {
                    start: gpa,
                    end: Gpa(e.unwrap_or(u64::MAX)),
                    ram_size: self.perms.size(),
                })
            }
        };
        // The window: the change plus the slots touching it. Its edges are permission changes
        // or RAM ends, so the slot runs computed inside it are maximal globally.
        let mut ws = gpa;
        let mut we = end;
        for probe in [gpa.checked_sub(1), Some(gpa), Some(end - 1), Some(end)]
            .into_iter()
            .flatten()
        {
            if let Some(s) = self.slot_containing(Gpa(probe)) {
                ws = ws.min(s.gpa);
                we = we.max(s.end());
            }
        }
        let old: Vec<SlotInfo> = self
            .slots
            .range(ws..we)
            .map(|(&g, &(e, slot, readonly))| SlotInfo {
                slot,
                gpa: g,
                len: e - g,
                readonly,
            })
            .collect();
        let new = plan::slot_runs(&self.perms, ws, we, gpa, end, perm);
        let plan = plan::diff(&old, &new);
        let needed = self.slots.len() as u64 - plan.delete.len() as u64 + plan.create.len() as u64;
        let max = self.table.max_slots();
        if needed > u64::from(max) {
            return Err(EngineError::OutOfSlots { needed, max });
        }
        self.execute(&plan).map_err(EngineError::Backend)?;
        let before: Vec<Run<Perm>> = self.perms.overlapping(gpa, end).collect();
        self.perms.set(gpa, end, perm);
        self.relock(&before, perm);
        Ok(())
    }

    fn zero(&mut self, gpa: Gpa, len: u64) -> Result<(), Stage2Error> {
        self.table.zero(gpa.0, len)
    }

    fn perm_at(&self, gpa: Gpa) -> Option<Perm> {
        self.perms.run_at(gpa.0).map(|r| r.state)
    }

    fn memslots(&self) -> Vec<SlotInfo> {
        SlotInfo::table(&self.slots)
    }

    fn slot_containing(&self, gpa: Gpa) -> Option<SlotInfo> {
        let (&s, &(end, slot, readonly)) = self.slots.range(..=gpa.0).next_back()?;
        (gpa.0 < end).then_some(SlotInfo {
            slot,
            gpa: s,
            len: end - s,
            readonly,
        })
    }

    fn usage(&self) -> BackendUsage {
        self.usage
    }

    fn lock_stats(&self) -> LockStats {
        self.table.lock_stats()
    }

    fn check(&self) -> Result<(), String> {
        let size = self.perms.size();
        let runs = plan::slot_runs(&self.perms, 0, size, 0, 0, Perm::None);
        let slots = self.memslots();
        let got: Vec<(u64, u64, bool)> =
            slots.iter().map(|s| (s.gpa, s.end(), s.readonly)).collect();
        if got != runs {
            return Err(format!("memslots {got:x?} != permission runs {runs:x?}"));
        }
        let mut ids = BTreeSet::new();
        for s in &slots {
            if s.slot >= self.table.max_slots()
                || !ids.insert(s.slot)
                || self.free_ids.contains(&s.slot)
            {
                return Err(format!("bad or duplicate slot id {}", s.slot));
            }
        }
        if self.usage.memslots_in_use != slots.len() as u64 {
            return Err("memslots_in_use disagrees with the table".into());
        }
        Ok(())
    }

    /// Punches a hole for the page into the slot that holds it (a real KVM change, recorded in
    /// the slot table's record, not in the permission map).
    fn tamper(&mut self, gpa: Gpa) -> Result<Perm, String> {
        let page = gpa.0 & !(PAGE_SIZE - 1);
        let slot = self
            .slot_containing(Gpa(page))
            .filter(|_| self.tampered.is_none())
            .ok_or("no slot holds the page (or a tamper is pending)")?;
        let create = [(slot.gpa, page), (page + PAGE_SIZE, slot.end())]
            .into_iter()
            .filter(|(a, b)| a < b)
            .map(|(a, b)| (a, b - a, slot.readonly))
            .collect();
        self.execute(&plan::SlotPlan {
            delete: vec![slot],
            create,
        })
        .map_err(|e| e.to_string())?;
        self.tampered = Some((slot.gpa, slot.end(), slot.readonly));
        Ok(Perm::None)
    }

    fn untamper(&mut self, _gpa: Gpa) -> Result<(), String> {
        let (start, end, readonly) = self.tampered.take().ok_or("no tamper pending")?;
        let delete = self
            .slots
            .range(start..end)
            .map(|(&gpa, &(e, slot, ro))| SlotInfo {
                slot,
                gpa,
                len: e - gpa,
                readonly: ro,
            })
            .collect();
        self.execute(&plan::SlotPlan {
            delete,
            create: vec![(start, end - start, readonly)],
        })
        .map_err(|e| e.to_string())
    }

    /// From the record of KVM's slot table (every slot created and not deleted), not from the
    /// permission map: a page in a slot is readable, writable unless the slot is read-only;
    /// a page in no slot is a hole.
    fn realised(&self) -> Result<Vec<Realised>, String> {
        let mut runs = Vec::new();
        let mut at = 0;
        let mut push = |start: u64, end: u64, perm: Perm| {
            super::verify::push_run(
                &mut runs,
                Realised {
                    start: Gpa(start),
                    end: Gpa(end),
                    perm,
                    backing: HostBacking::Memory,
                },
            )
        };
        for (&gpa, &(end, _, readonly)) in &self.slots {
            if gpa < at {
                return Err(format!("memslots overlap at {gpa:#x}"));
            }
            if gpa > at {
                push(at, gpa, Perm::None);
            }
            push(
                gpa,
                end,
                if readonly {
                    Perm::Read
                } else {
                    Perm::ReadWrite
                },
            );
            at = end;
        }
        let size = self.perms.size();
        if at < size {
            push(at, size, Perm::None);
        }
        Ok(runs)
    }
}
