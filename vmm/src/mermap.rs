//! The mermap: a small per-vCPU window of GPAs above RAM in which a vCPU maps unmapped pages
//! it owns ephemerally (to zero them, to copy into them), as Brendan Jackman's `mm/mermap.c`
//! does with a per-CPU virtual window and preallocated page tables.
//!
//! Each vCPU's window is [`WINDOW_PAGES`] pages: [`BUMP_PAGES`] handed out by a bump pointer
//! and one reserved slot ([`Mermap::get_reserved`], which succeeds whenever that slot is not
//! live). A put mapping keeps its stale stage-2 mapping (the stale TLB entry of the kernel
//! version); when a get does not fit before the end, the pointer **wraps**: one flush removes
//! every stale mapping of the window in one batch of stage-2 changes and the pointer restarts
//! at 0. A get that still overlaps a live mapping after the wrap fails (`Busy`): the mermap
//! tries hard to be fast, not hard to succeed. Only the vCPU that allocated a page may map it;
//! freeing a page with a live mapping is refused, and a stale mapping of a page being freed
//! is torn down first (the kernel's "the caller flushes before the pages are freed").
//!
//! This module is the window's bookkeeping; [`crate::mermap_window`] realises it at stage 2
//! (an alias mapping of the memfd under `mprotect`, memslots under `slots`).

use std::collections::BTreeMap;

use veil_abi::PAGE_SIZE;

use crate::addr::Gpa;
use crate::mermap_window::{WindowBackend, WindowError};
use crate::run_types::VcpuIndex;

pub use veil_abi::mermap::{BUMP_PAGES, RESERVED_PAGES, WINDOW_PAGES};

/// GPA of vCPU 0's window for a VM with `ram_size` bytes of RAM: the first pageblock
/// boundary at or above the end of RAM.
pub fn window_base(ram_size: u64) -> Gpa {
    Gpa(ram_size.div_ceil(veil_abi::PAGEBLOCK_SIZE) * veil_abi::PAGEBLOCK_SIZE)
}

/// The windows of a VM with `vcpus` vCPUs on the stage-2 backend `kind`: memslot ids from
/// `first_slot` (`ids` of them) are the windows'.
pub fn create(
    vm: &std::sync::Arc<kvm_ioctls::VmFd>,
    ram: &std::sync::Arc<crate::memory::GuestRam>,
    kind: crate::stage2::BackendKind,
    vcpus: usize,
    first_slot: u32,
    ids: u32,
) -> Result<Mermap, WindowError> {
    use crate::mermap_window::{AliasWindow, SlotWindow};
    let base = window_base(ram.size());
    let span = Mermap::span(vcpus);
    let backend: Box<dyn WindowBackend + Send> = match kind {
        crate::stage2::BackendKind::Mprotect => Box::new(AliasWindow::new(
            vm.clone(),
            ram.clone(),
            base,
            span,
            first_slot,
        )?),
        crate::stage2::BackendKind::Slots => {
            if ids < SlotWindow::ids_needed(span) {
                return Err(WindowError::Range);
            }
            Box::new(SlotWindow::new(
                vm.clone(),
                ram.clone(),
                base,
                span,
                first_slot,
            ))
        }
    };
    Ok(Mermap::new(base, vcpus, backend))
}

/// Why a get or put was refused (the session maps each to a `Status`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MermapError {
    /// `pages` is 0.
    #[error("a mermap get of 0 pages")]
    Empty,
    /// More pages than the bump area holds.
    #[error("{0} pages do not fit in the {BUMP_PAGES}-page window")]
    TooBig(u64),
    /// No room without overlapping a live mapping (or the reserved slot is live).
    #[error("the window has no room next to its live mappings")]
    Busy,
    /// The GPA is not in the caller's window.
    #[error("{0:#x} is not in this vCPU's window")]
    NotInWindow(u64),
    /// No live mapping starts there.
    #[error("no live mapping starts at {0:#x}")]
    NotLive(u64),
    /// The stage-2 realisation failed.
    #[error("window backend: {0}")]
    Backend(#[from] WindowError),
}

/// One mapping of the window: `pages` pages from window page `first` show RAM from `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mapping {
    /// First window page (0..[`WINDOW_PAGES`]) of this vCPU's window.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// GPA of the RAM the mapping shows.
    pub target: u64,
}

impl Mapping {
    fn overlaps_pages(&self, first: u64, pages: u64) -> bool {
        self.first < first + pages && first < self.first + self.pages
    }

    fn covers_ram(&self, start: Gpa, end: Gpa) -> bool {
        let t = self.target;
        t < end.raw() && start.raw() < t + self.pages * PAGE_SIZE
    }
}

/// Counters of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WindowCounters {
    /// Successful gets (bump and reserved).
    pub gets: u64,
    /// Successful puts.
    pub puts: u64,
    /// Gets refused with `Busy`.
    pub busy: u64,
    /// Times the bump pointer wrapped.
    pub wraps: u64,
    /// Flushes: one per wrap, each one batch of stage-2 changes.
    pub flushes: u64,
    /// Stage-2 operations (syscalls or ioctls) all flushes made.
    pub flush_ops: u64,
    /// Stage-2 operations of the last flush.
    pub last_flush_ops: u64,
    /// Stage-2 operations all gets made.
    pub map_ops: u64,
    /// Stale mappings torn down because their page was being freed.
    pub free_teardowns: u64,
}

/// One vCPU's window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    /// vCPU index.
    pub vcpu: VcpuIndex,
    /// GPA of window page 0.
    pub base: u64,
    /// The bump pointer (next window page to hand out).
    pub next: u64,
    /// Live mappings, by first page.
    pub live: Vec<Mapping>,
    /// Put mappings whose stage-2 mapping is still in force (until the next flush).
    pub stale: Vec<Mapping>,
    /// Counters.
    pub counters: WindowCounters,
}

impl Window {
    fn new(vcpu: VcpuIndex, base: Gpa) -> Window {
        Window {
            vcpu,
            base: base.raw(),
            next: 0,
            live: Vec::new(),
            stale: Vec::new(),
            counters: WindowCounters::default(),
        }
    }

    /// GPA of window page `page`.
    pub fn gpa_of(&self, page: u64) -> Gpa {
        Gpa(self.base + page * PAGE_SIZE)
    }

    /// GPA of the reserved slot.
    pub fn reserved_gpa(&self) -> Gpa {
        self.gpa_of(BUMP_PAGES)
    }

    fn page_of(&self, gpa: Gpa) -> Option<u64> {
        let off = gpa.raw().checked_sub(self.base)?;
        (off < WINDOW_PAGES * PAGE_SIZE).then_some(off / PAGE_SIZE)
    }

    fn live_overlaps(&self, first: u64, pages: u64) -> bool {
        self.live.iter().any(|m| m.overlaps_pages(first, pages))
    }
}

/// Every vCPU's window, the owner of each allocation the guest made, and the stage-2
/// realisation.
pub struct Mermap {
    base: Gpa,
    windows: Vec<Window>,
    /// Allocation (first GPA) -> (order, the vCPU that allocated it).
    owners: BTreeMap<u64, (u8, VcpuIndex)>,
    backend: Box<dyn WindowBackend + Send>,
}

impl Mermap {
    /// Windows for `vcpus` vCPUs from `base` (vCPU n's at `base + n * WINDOW_PAGES` pages),
    /// realised by `backend`.
    pub fn new(base: Gpa, vcpus: usize, backend: Box<dyn WindowBackend + Send>) -> Mermap {
        let windows = (0..vcpus)
            .map(|v| Window::new(v, Gpa(base.raw() + v as u64 * WINDOW_PAGES * PAGE_SIZE)))
            .collect();
        Mermap {
            base,
            windows,
            owners: BTreeMap::new(),
            backend,
        }
    }

    /// Bytes of GPA all windows span, from [`Mermap::base`].
    pub fn span(vcpus: usize) -> u64 {
        vcpus as u64 * WINDOW_PAGES * PAGE_SIZE
    }

    /// GPA of the first window.
    pub fn base(&self) -> Gpa {
        self.base
    }

    /// The windows, by vCPU.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The backend's name (`alias` or `memslots`).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Whether `gpa` lies in some vCPU's window.
    pub fn contains(&self, gpa: Gpa) -> bool {
        gpa >= self.base && gpa.raw() - self.base.raw() < Mermap::span(self.windows.len())
    }

    /// Notes that `vcpu` allocated `1 << order` pages at `gpa`.
    pub fn note_alloc(&mut self, gpa: Gpa, order: u8, vcpu: VcpuIndex) {
        self.owners.insert(gpa.raw(), (order, vcpu));
    }

    /// The vCPU that allocated the live allocation containing the page at `gpa`, as noted.
    pub fn owner_of(&self, gpa: Gpa) -> Option<VcpuIndex> {
        let (&start, &(order, vcpu)) = self.owners.range(..=gpa.raw()).next_back()?;
        (gpa.raw() < start + (PAGE_SIZE << order)).then_some(vcpu)
    }

    /// Before `[start, end)` is freed: refuses (false) if a live mapping of any window shows
    /// it; otherwise tears down every stale mapping that does and forgets the owner.
    pub fn before_free(&mut self, start: Gpa, end: Gpa) -> Result<bool, MermapError> {
        if self
            .windows
            .iter()
            .any(|w| w.live.iter().any(|m| m.covers_ram(start, end)))
        {
            return Ok(false);
        }
        // Every Free hypercall comes here: no allocation unless a stale mapping shows the range.
        for w in &mut self.windows {
            let mut i = 0;
            while i < w.stale.len() {
                let m = w.stale[i];
                if m.covers_ram(start, end) {
                    self.backend.unmap(w.gpa_of(m.first), m.pages)?;
                    w.stale.remove(i);
                    w.counters.free_teardowns += 1;
                } else {
                    i += 1;
                }
            }
        }
        Ok(true)
    }

    /// Forgets the allocation at `gpa` (it was freed).
    pub fn note_free(&mut self, gpa: Gpa) {
        self.owners.remove(&gpa.raw());
    }

    fn window_mut(&mut self, vcpu: VcpuIndex) -> Result<&mut Window, MermapError> {
        self.windows
            .get_mut(vcpu)
            .ok_or(MermapError::NotInWindow(0))
    }

    /// Maps `pages` pages of RAM from `target` into `vcpu`'s window (bump allocation; the
    /// caller has checked ownership and state). Returns the window GPA.
    pub fn get(&mut self, vcpu: VcpuIndex, target: Gpa, pages: u64) -> Result<Gpa, MermapError> {
        if pages == 0 {
            return Err(MermapError::Empty);
        }
        if pages > BUMP_PAGES {
            return Err(MermapError::TooBig(pages));
        }
        let w = self
            .windows
            .get_mut(vcpu)
            .ok_or(MermapError::NotInWindow(0))?;
        if w.next + pages > BUMP_PAGES {
            // The wrap: one flush of every stale mapping (the reserved slot's too, unless
            // it is live), then the pointer restarts.
            let ops = self.backend.flush(Gpa(w.base), &w.live, &w.stale)?;
            w.stale.clear();
            w.counters.wraps += 1;
            w.counters.flushes += 1;
            w.counters.flush_ops += ops;
            w.counters.last_flush_ops = ops;
            w.next = 0;
        }
        if w.live_overlaps(w.next, pages) {
            w.counters.busy += 1;
            return Err(MermapError::Busy);
        }
        let first = w.next;
        Self::install(self.backend.as_mut(), w, first, target, pages)?;
        w.next += pages;
        Ok(w.gpa_of(first))
    }

    /// Maps one page of RAM at `target` into `vcpu`'s reserved slot.
    pub fn get_reserved(&mut self, vcpu: VcpuIndex, target: Gpa) -> Result<Gpa, MermapError> {
        let backend = self.backend.as_mut();
        let w = self
            .windows
            .get_mut(vcpu)
            .ok_or(MermapError::NotInWindow(0))?;
        if w.live_overlaps(BUMP_PAGES, RESERVED_PAGES) {
            w.counters.busy += 1;
            return Err(MermapError::Busy);
        }
        // A stale mapping of the slot is replaced by the new one (remapping a slot drops it).
        w.stale.retain(|m| m.first != BUMP_PAGES);
        Self::install(backend, w, BUMP_PAGES, target, RESERVED_PAGES)?;
        Ok(w.reserved_gpa())
    }

    fn install(
        backend: &mut (dyn WindowBackend + Send),
        w: &mut Window,
        first: u64,
        target: Gpa,
        pages: u64,
    ) -> Result<(), MermapError> {
        // Slots being reused after a flush hold nothing; a stale mapping there (only the
        // reserved slot's, handled by the caller) would be replaced.
        let ops = backend.map(w.gpa_of(first), target, pages)?;
        w.counters.map_ops += ops;
        w.counters.gets += 1;
        let m = Mapping {
            first,
            pages,
            target: target.raw(),
        };
        let at = w.live.partition_point(|l| l.first < first);
        w.live.insert(at, m);
        Ok(())
    }

    /// Puts back the live mapping of `vcpu` that starts at `window_gpa`: it goes stale.
    pub fn put(&mut self, vcpu: VcpuIndex, window_gpa: Gpa) -> Result<(), MermapError> {
        let w = self.window_mut(vcpu)?;
        let Some(page) = w
            .page_of(window_gpa)
            .filter(|_| window_gpa.is_page_aligned())
        else {
            return Err(MermapError::NotInWindow(window_gpa.raw()));
        };
        let Some(i) = w.live.iter().position(|m| m.first == page) else {
            return Err(MermapError::NotLive(window_gpa.raw()));
        };
        let m = w.live.remove(i);
        w.stale.push(m);
        w.counters.puts += 1;
        Ok(())
    }

    /// The window of `vcpu`.
    pub fn window(&self, vcpu: VcpuIndex) -> Option<&Window> {
        self.windows.get(vcpu)
    }

    /// The window page and mapping (live or stale) that `gpa` falls in, if any, with whether
    /// it is live, and the owning vCPU.
    pub fn lookup(&self, gpa: Gpa) -> Option<(VcpuIndex, Option<(Mapping, bool)>)> {
        let w = self.windows.iter().find(|w| w.page_of(gpa).is_some())?;
        let page = w.page_of(gpa)?;
        let hit = |ms: &[Mapping]| ms.iter().copied().find(|m| m.overlaps_pages(page, 1));
        let found = hit(&w.live)
            .map(|m| (m, true))
            .or_else(|| hit(&w.stale).map(|m| (m, false)));
        Some((w.vcpu, found))
    }

    /// Removes every window mapping from stage 2 (the end of the run).
    pub fn teardown(&mut self) {
        for w in &mut self.windows {
            let _ = self.backend.unmap(Gpa(w.base), WINDOW_PAGES);
            w.live.clear();
            w.stale.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A window backend that records what is mapped per window page.
    #[derive(Default)]
    struct Fake {
        pages: Arc<Mutex<BTreeMap<u64, u64>>>,
        flushes: Arc<Mutex<u64>>,
    }

    impl WindowBackend for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn map(&mut self, window: Gpa, target: Gpa, pages: u64) -> Result<u64, WindowError> {
            let mut p = self.pages.lock().unwrap();
            for i in 0..pages {
                p.insert(window.raw() + i * PAGE_SIZE, target.raw() + i * PAGE_SIZE);
            }
            Ok(1)
        }
        fn unmap(&mut self, window: Gpa, pages: u64) -> Result<u64, WindowError> {
            let mut p = self.pages.lock().unwrap();
            for i in 0..pages {
                p.remove(&(window.raw() + i * PAGE_SIZE));
            }
            Ok(1)
        }
        fn flush(
            &mut self,
            base: Gpa,
            live: &[Mapping],
            _stale: &[Mapping],
        ) -> Result<u64, WindowError> {
            *self.flushes.lock().unwrap() += 1;
            let mut p = self.pages.lock().unwrap();
            for page in 0..WINDOW_PAGES {
                if !live.iter().any(|m| m.overlaps_pages(page, 1)) {
                    p.remove(&(base.raw() + page * PAGE_SIZE));
                }
            }
            Ok(1)
        }
    }

    /// Window page -> RAM page the fake shows.
    type Shown = Arc<Mutex<BTreeMap<u64, u64>>>;

    fn mermap(vcpus: usize) -> (Mermap, Shown, Arc<Mutex<u64>>) {
        let f = Fake::default();
        let (p, n) = (f.pages.clone(), f.flushes.clone());
        (Mermap::new(Gpa(1 << 30), vcpus, Box::new(f)), p, n)
    }

    const T: Gpa = Gpa(0x40_0000);

    #[test]
    fn one_flush_per_wrap_over_a_million_pairs() {
        let (mut m, pages, flushes) = mermap(1);
        for i in 0..1_000_000u64 {
            let g = m.get(0, Gpa(T.raw() + (i % 7) * PAGE_SIZE), 1).unwrap();
            m.put(0, g).unwrap();
        }
        let c = m.window(0).unwrap().counters;
        assert_eq!(c.wraps, (1_000_000 - 1) / BUMP_PAGES);
        assert_eq!(c.flushes, c.wraps);
        assert_eq!(*flushes.lock().unwrap(), c.wraps);
        // Stale mappings stay until the next wrap: as many as gets since the last one.
        assert_eq!(
            pages.lock().unwrap().len() as u64,
            m.window(0).unwrap().next
        );
    }

    #[test]
    fn size_edges_and_exhaustion() {
        let (mut m, _, _) = mermap(1);
        assert_eq!(m.get(0, T, 0), Err(MermapError::Empty));
        assert_eq!(m.get(0, T, BUMP_PAGES + 1), Err(MermapError::TooBig(65)));
        let g = m.get(0, T, BUMP_PAGES).unwrap();
        assert_eq!(g, Gpa(1 << 30));
        assert_eq!(m.get(0, T, 1), Err(MermapError::Busy));
        // The reserved slot still works while the bump area is exhausted.
        let r = m.get_reserved(0, T).unwrap();
        assert_eq!(r, Gpa((1 << 30) + BUMP_PAGES * PAGE_SIZE));
        assert_eq!(m.get_reserved(0, T), Err(MermapError::Busy));
        m.put(0, r).unwrap();
        assert_eq!(m.put(0, r), Err(MermapError::NotLive(r.raw())));
        m.put(0, g).unwrap();
        // Tiptoe to the edge: 63 + 1 pages fit with no wrap; one more page wraps once.
        let w0 = m.window(0).unwrap().counters.wraps;
        let a = m.get(0, T, BUMP_PAGES - 1).unwrap();
        let b = m.get(0, T, 1).unwrap();
        assert_eq!(m.window(0).unwrap().counters.wraps, w0);
        m.put(0, a).unwrap();
        m.put(0, b).unwrap();
        m.get(0, T, 1).unwrap();
        assert_eq!(m.window(0).unwrap().counters.wraps, w0 + 1);
    }

    #[test]
    fn stale_until_wrap_and_free_rules() {
        let (mut m, pages, _) = mermap(2);
        let g = m.get(0, T, 2).unwrap();
        assert!(!m.before_free(T, Gpa(T.raw() + PAGE_SIZE)).unwrap());
        m.put(0, g).unwrap();
        assert_eq!(pages.lock().unwrap().get(&g.raw()), Some(&T.raw()));
        assert_eq!(
            m.lookup(g),
            Some((0, Some((m.window(0).unwrap().stale[0], false))))
        );
        // Freeing the page tears the stale mapping down.
        assert!(m.before_free(T, Gpa(T.raw() + 2 * PAGE_SIZE)).unwrap());
        assert!(pages.lock().unwrap().is_empty());
        assert_eq!(m.window(0).unwrap().counters.free_teardowns, 1);
        // vCPU 1's window is its own: a put of vCPU 0's slot is outside it.
        let g = m.get(0, T, 1).unwrap();
        assert_eq!(m.put(1, g), Err(MermapError::NotInWindow(g.raw())));
        let h = m.get(1, T, 1).unwrap();
        assert_ne!(g, h);
        assert_eq!(m.lookup(h).map(|l| l.0), Some(1));
    }

    #[test]
    fn owners() {
        let (mut m, _, _) = mermap(2);
        m.note_alloc(T, 2, 1);
        assert_eq!(m.owner_of(Gpa(T.raw() + 3 * PAGE_SIZE)), Some(1));
        assert_eq!(m.owner_of(Gpa(T.raw() + 4 * PAGE_SIZE)), None);
        m.note_free(T);
        assert_eq!(m.owner_of(T), None);
    }
}
