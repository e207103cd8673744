//! `linux-placement`: the kernel's own placement (the trace's PFNs), each unmapped allocation
//! removed from the direct map on its own and restored (zero, then map) on free.
//!
//! No allocator runs: the pages are where Linux put them, so this measures how much of the
//! real kernel's direct map per-page removal would have split. Trace pfn `p` lands on model pfn
//! `base_pfn + (p - trace_base_pfn)`.

use allocator::{Snapshot, Stage2};

use super::{is_unmapped, Engine, Failure, Layout};
use crate::tracker::Tracker;

/// The linux-placement policy.
pub(crate) struct LinuxPlacement<S: Stage2> {
    t: Tracker<S>,
    l: Layout,
}

impl<S: Stage2> LinuxPlacement<S> {
    pub(crate) fn new(l: Layout, t: Tracker<S>) -> Self {
        LinuxPlacement { t, l }
    }
}

impl<S: Stage2> Engine<S> for LinuxPlacement<S> {
    fn alloc(&mut self, order: u8, _mt: u8, flags: u8, trace_pfn: u64) -> Result<u64, Failure> {
        let pfn = trace_pfn
            .checked_sub(self.l.trace_base_pfn)
            .and_then(|o| o.checked_add(self.l.base_pfn))
            .ok_or(Failure::Other)?;
        if is_unmapped(flags) {
            self.t.unmap(pfn, 1 << order)?;
        }
        Ok(pfn)
    }

    fn free(&mut self, pfn: u64, order: u8, flags: u8) -> bool {
        if is_unmapped(flags) {
            return self.t.zero(pfn, 1 << order).is_ok() && self.t.map(pfn, 1 << order).is_ok();
        }
        true
    }

    fn tracker_mut(&mut self) -> &mut Tracker<S> {
        &mut self.t
    }

    fn flips(&self) -> (u64, u64) {
        (0, 0)
    }

    fn snapshot(&self) -> Option<Snapshot> {
        None
    }

    fn into_tracker(self) -> Tracker<S> {
        self.t
    }
}
