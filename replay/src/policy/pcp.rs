//! `freetype-pcp` (`--pcp`): the freetype policy on the allocator for several CPUs
//! ([`allocator::Zone`]): one per-CPU cache set per trace CPU, each allocation served on the
//! CPU the trace recorded it on and each free on the CPU that freed it, so the caches hold
//! what Linux's per-CPU lists held and drain (every one of them) before a flip.

use allocator::{Config, Snapshot, Stage2, Zone};

use super::{Engine, Failure, Layout};
use crate::tracker::Tracker;

/// Most per-CPU cache sets modelled; trace CPU `c` uses set `c % MAX_PCP_CPUS`.
pub const MAX_PCP_CPUS: usize = 256;

/// The freetype policy with per-CPU caches.
pub(crate) struct FreetypePcp<S: Stage2> {
    z: Zone<Tracker<S>>,
    honour_atomic: bool,
    cpu: usize,
}

impl<S: Stage2> FreetypePcp<S> {
    pub(crate) fn new(l: Layout, t: Tracker<S>, honour_atomic: bool, cpus: usize) -> Self {
        let n = cpus.clamp(1, MAX_PCP_CPUS);
        let z = match Zone::new(l.base_pfn, l.nr_pages, t, Config::default(), n) {
            Ok(z) => z,
            // The layout is checked against MAX_MANAGED_PAGES and n is in range: unreachable.
            Err(e) => panic!("freetype-pcp: zone over a checked layout refused: {e}"),
        };
        FreetypePcp {
            z,
            honour_atomic,
            cpu: 0,
        }
    }
}

impl<S: Stage2> Engine<S> for FreetypePcp<S> {
    fn alloc(&mut self, order: u8, mt: u8, flags: u8, _trace_pfn: u64) -> Result<u64, Failure> {
        let gfp = super::freetype::request_gfp(mt, flags, self.honour_atomic);
        Ok(self.z.alloc_pages(self.cpu, gfp, order)?.pfn)
    }

    fn free(&mut self, pfn: u64, order: u8, _flags: u8) -> bool {
        self.z.free_pages(self.cpu, pfn, order).is_ok()
    }

    fn set_cpu(&mut self, cpu: u16) {
        self.cpu = usize::from(cpu) % self.z.nr_cpus();
    }

    fn tracker_mut(&mut self) -> &mut Tracker<S> {
        self.z.stage2_mut()
    }

    fn flips(&self) -> (u64, u64) {
        let s = self.z.snapshot();
        (s.flips_to_unmapped, s.flips_to_mapped)
    }

    fn snapshot(&self) -> Option<Snapshot> {
        Some(self.z.snapshot())
    }

    fn into_tracker(self) -> Tracker<S> {
        self.z.into_stage2()
    }

    fn has_kinds(&self) -> bool {
        true
    }

    fn drain(&mut self) {
        self.z.drain_all();
    }
}
