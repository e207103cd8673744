//! [`ModelSlots`]: a checked simulation of KVM's memslot table, without KVM.
//!
//! It enforces KVM's rules (a slot is created only in a free id below the limit, slots never
//! overlap, only existing slots are deleted, a slot's GPA or size never changes in place) and
//! answers a violation with the errno KVM would return. It counts every call and can record
//! them, so tests can check what an engine did and models can replay policies without KVM.

use std::collections::BTreeMap;

use allocator::Stage2Error;

use super::{MemslotTable, SlotInfo, PAGE_SIZE};

/// One recorded backend call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotCall {
    /// `set_slot(slot, gpa, len, readonly)`; `len == 0` is a delete.
    SetSlot {
        /// Slot id.
        slot: u32,
        /// GPA.
        gpa: u64,
        /// Length (0 = delete).
        len: u64,
        /// `KVM_MEM_READONLY`.
        readonly: bool,
    },
    /// `zero(gpa, len)`.
    Zero {
        /// GPA.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// A simulated slot table (see the module docs).
#[derive(Clone, Debug)]
pub struct ModelSlots {
    max_slots: u32,
    /// id -> (gpa, len)
    by_id: BTreeMap<u32, (u64, u64)>,
    /// gpa -> (end, id, readonly)
    by_gpa: BTreeMap<u64, (u64, u32, bool)>,
    record: bool,
    calls: Vec<SlotCall>,
    set_slot_calls: u64,
    creates: u64,
    deletes: u64,
    zero_calls: u64,
    bytes_zeroed: u64,
    refused_calls: u64,
    fail_after: Option<u64>,
}

impl ModelSlots {
    /// A model with `max_slots` slot ids that keeps counters only.
    pub fn new(max_slots: u32) -> ModelSlots {
        ModelSlots {
            max_slots,
            by_id: BTreeMap::new(),
            by_gpa: BTreeMap::new(),
            record: false,
            calls: Vec::new(),
            set_slot_calls: 0,
            creates: 0,
            deletes: 0,
            zero_calls: 0,
            bytes_zeroed: 0,
            refused_calls: 0,
            fail_after: None,
        }
    }

    /// A model that also records every call (see [`ModelSlots::calls`]).
    pub fn recording(max_slots: u32) -> ModelSlots {
        ModelSlots {
            record: true,
            ..ModelSlots::new(max_slots)
        }
    }

    /// Makes the call after `n` more successful `set_slot` calls fail with `-EIO` (fault
    /// injection for tests); `None` disables it.
    pub fn fail_after(&mut self, n: Option<u64>) {
        self.fail_after = n;
    }

    /// Recorded calls (empty unless built with [`ModelSlots::recording`]).
    pub fn calls(&self) -> &[SlotCall] {
        &self.calls
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&mut self) {
        self.calls.clear();
    }

    /// The slot table, in GPA order.
    pub fn slots(&self) -> Vec<SlotInfo> {
        SlotInfo::table(&self.by_gpa)
    }

    /// Whether guest physical address `gpa` is inside some slot.
    pub fn is_exposed(&self, gpa: u64) -> bool {
        self.by_gpa
            .range(..=gpa)
            .next_back()
            .is_some_and(|(_, &(end, _, _))| gpa < end)
    }

    /// `set_slot` calls made (including refused ones).
    pub fn set_slot_calls(&self) -> u64 {
        self.set_slot_calls
    }

    /// Successful creates.
    pub fn creates(&self) -> u64 {
        self.creates
    }

    /// Successful deletes.
    pub fn deletes(&self) -> u64 {
        self.deletes
    }

    /// `zero` calls.
    pub fn zero_calls(&self) -> u64 {
        self.zero_calls
    }

    /// Bytes zeroed.
    pub fn bytes_zeroed(&self) -> u64 {
        self.bytes_zeroed
    }

    /// Whether `gpa` is inside a `KVM_MEM_READONLY` slot.
    pub fn is_readonly(&self, gpa: u64) -> bool {
        self.by_gpa
            .range(..=gpa)
            .next_back()
            .is_some_and(|(_, &(end, _, ro))| gpa < end && ro)
    }

    /// Calls refused because they broke KVM's rules (an engine bug if non-zero).
    pub fn refused_calls(&self) -> u64 {
        self.refused_calls
    }

    fn refuse(&mut self, errno: i32) -> Result<(), Stage2Error> {
        self.refused_calls += 1;
        Err(Stage2Error::Backend(-errno))
    }
}

impl MemslotTable for ModelSlots {
    fn set_slot(
        &mut self,
        slot: u32,
        gpa: u64,
        len: u64,
        readonly: bool,
    ) -> Result<(), Stage2Error> {
        self.set_slot_calls += 1;
        if self.record {
            self.calls.push(SlotCall::SetSlot {
                slot,
                gpa,
                len,
                readonly,
            });
        }
        if let Some(n) = self.fail_after.as_mut() {
            if *n == 0 {
                self.fail_after = None;
                return Err(Stage2Error::Backend(-libc::EIO));
            }
            *n -= 1;
        }
        if slot >= self.max_slots
            || !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
        {
            return self.refuse(libc::EINVAL);
        }
        if len == 0 {
            let Some((old_gpa, _)) = self.by_id.remove(&slot) else {
                return self.refuse(libc::EINVAL);
            };
            self.by_gpa.remove(&old_gpa);
            self.deletes += 1;
            return Ok(());
        }
        if self.by_id.contains_key(&slot) {
            // KVM only allows flag changes or moves of an existing slot, never a resize.
            return self.refuse(libc::EINVAL);
        }
        let Some(end) = gpa.checked_add(len) else {
            return self.refuse(libc::EINVAL);
        };
        let overlaps_prev = self
            .by_gpa
            .range(..end)
            .next_back()
            .is_some_and(|(_, &(e, _, _))| e > gpa);
        if overlaps_prev {
            return self.refuse(libc::EEXIST);
        }
        self.by_id.insert(slot, (gpa, len));
        self.by_gpa.insert(gpa, (end, slot, readonly));
        self.creates += 1;
        Ok(())
    }

    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), Stage2Error> {
        if self.record {
            self.calls.push(SlotCall::Zero { gpa, len });
        }
        self.zero_calls += 1;
        self.bytes_zeroed += len;
        Ok(())
    }

    fn max_slots(&self) -> u32 {
        self.max_slots
    }
}
