//! The mermap window at stage 2: how a window page comes to show a page of guest RAM.
//!
//! - [`AliasWindow`] (the `mprotect` backend): one host range of the windows' size, one KVM
//!   memslot over it at the windows' GPA. A mapping is an alias of the VMM view's pages made
//!   with `mremap(old_size = 0)`, which maps the same shared pages a second time, whatever
//!   backs them (the RAM memfd, or the `memfd_secret` file of a `--host-secretmem` block); KVM's
//!   MMU notifier sees every change. A flush is one `mmap(PROT_NONE, MAP_FIXED)` over the window
//!   (one per run of pages between live mappings).
//! - [`SlotWindow`] (the `slots` backend): one KVM memslot per mapping, pointing at the host
//!   address of the RAM page (KVM allows two slots over one host range). A flush deletes
//!   every stale slot of the window: several ioctls, one batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use veil_abi::{PAGEBLOCK_SIZE, PAGE_SIZE};

use crate::addr::Gpa;
use crate::memory::{CoreDump, GuestRam};
use crate::mermap::{Mapping, WINDOW_PAGES};

/// Why the window could not be changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// A host call failed.
    #[error("{what}: errno {errno}")]
    Host {
        /// What we were doing.
        what: &'static str,
        /// The errno.
        errno: i32,
    },
    /// The range is not inside RAM or the window.
    #[error("range outside RAM or the window")]
    Range,
}

fn last_errno(what: &'static str) -> WindowError {
    WindowError::Host {
        what,
        errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
    }
}

/// What a mermap window needs from stage 2. Every call returns the number of host
/// operations (syscalls or ioctls) it made.
pub trait WindowBackend {
    /// The backend's name for dumps and reports.
    fn name(&self) -> &'static str;
    /// Makes `pages` window pages from `window` show the RAM pages from `target`.
    fn map(&mut self, window: Gpa, target: Gpa, pages: u64) -> Result<u64, WindowError>;
    /// Removes whatever the mapping(s) starting in `[window, window + pages)` show.
    fn unmap(&mut self, window: Gpa, pages: u64) -> Result<u64, WindowError>;
    /// One flush of the window at `base`: every page not under a `live` mapping stops showing
    /// anything (`stale` lists the mappings that go).
    fn flush(&mut self, base: Gpa, live: &[Mapping], stale: &[Mapping])
        -> Result<u64, WindowError>;
}

/// Runs of window pages `[0, WINDOW_PAGES)` that no live mapping covers.
fn gaps(live: &[Mapping]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut sorted: Vec<&Mapping> = live.iter().collect();
    sorted.sort_by_key(|m| m.first);
    for m in sorted {
        if m.first > at {
            out.push((at, m.first - at));
        }
        at = at.max(m.first + m.pages);
    }
    if at < WINDOW_PAGES {
        out.push((at, WINDOW_PAGES - at));
    }
    out
}

/// The `mprotect` backend's window: aliases of the VMM view in one host range under one slot.
pub struct AliasWindow {
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    base: Gpa,
    host: u64,
    len: u64,
    slot: u32,
}

impl AliasWindow {
    /// Reserves the host range for `span` bytes of windows at `base` and gives it to KVM as
    /// memslot `slot`.
    pub fn new(
        vm: Arc<VmFd>,
        ram: Arc<GuestRam>,
        base: Gpa,
        span: u64,
        slot: u32,
    ) -> Result<AliasWindow, WindowError> {
        let len = usize::try_from(span).map_err(|_| WindowError::Range)?;
        // SAFETY: a new private anonymous mapping at an address the kernel chooses: it
        // overlaps nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno("mmap of the mermap window"));
        }
        let host = p as u64;
        let w = AliasWindow {
            vm,
            ram,
            base,
            host,
            len: span,
            slot,
        };
        w.dontdump(host, span);
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: base.raw(),
            memory_size: span,
            userspace_addr: host,
        };
        // SAFETY: the region is the mapping made above, which this value owns and unmaps only
        // after deleting the slot (Drop); KVM reaches through it only pages the window maps.
        unsafe { w.vm.set_user_memory_region(region) }.map_err(|e| WindowError::Host {
            what: "KVM_SET_USER_MEMORY_REGION (mermap window)",
            errno: e.errno(),
        })?;
        Ok(w)
    }

    fn dontdump(&self, addr: u64, len: u64) {
        if self.ram.core_dump() == CoreDump::Exclude {
            // SAFETY: [addr, addr + len) lies inside the window mapping this value owns;
            // MADV_DONTDUMP only changes what a core dump includes.
            unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTDUMP) };
        }
    }

    fn host_of(&self, window: Gpa, pages: u64) -> Result<u64, WindowError> {
        let off = window
            .raw()
            .checked_sub(self.base.raw())
            .ok_or(WindowError::Range)?;
        if off + pages * PAGE_SIZE > self.len {
            return Err(WindowError::Range);
        }
        Ok(self.host + off)
    }

    fn close(&mut self, window: Gpa, pages: u64) -> Result<u64, WindowError> {
        let at = self.host_of(window, pages)?;
        // SAFETY: [at, at + pages pages) lies inside the window mapping this value owns
        // (checked by host_of); MAP_FIXED replaces only that part with fresh PROT_NONE memory.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                (pages * PAGE_SIZE) as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno("mmap(PROT_NONE) over the mermap window"));
        }
        self.dontdump(at, pages * PAGE_SIZE);
        Ok(1)
    }
}

impl WindowBackend for AliasWindow {
    fn name(&self) -> &'static str {
        "alias"
    }

    fn map(&mut self, window: Gpa, target: Gpa, pages: u64) -> Result<u64, WindowError> {
        let dest = self.host_of(window, pages)?;
        let len = pages * PAGE_SIZE;
        if !self.ram.contains(target.raw(), len) {
            return Err(WindowError::Range);
        }
        // One alias per pageblock: each `--host-secretmem` block is its own secret file (its
        // own VMA), and an alias takes its pages from the VMA it starts in.
        let mut ops = 0;
        let mut done = 0;
        while done < len {
            let src = target.raw() + done;
            let n = (PAGEBLOCK_SIZE - src % PAGEBLOCK_SIZE).min(len - done);
            // SAFETY: the source lies inside the VMM view of RAM (checked above), a shared
            // mapping, so old_size 0 maps the same pages again without touching the source;
            // the destination lies inside the window mapping this value owns (host_of), which
            // MREMAP_FIXED replaces there; KVM's MMU notifier drops what it mapped before.
            let p = unsafe {
                libc::mremap(
                    (self.ram.host_base() + src) as *mut libc::c_void,
                    0,
                    n as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    (dest + done) as *mut libc::c_void,
                )
            };
            ops += 1;
            if p == libc::MAP_FAILED {
                let e = last_errno("mremap alias into the mermap window");
                let _ = self.close(window, pages);
                return Err(e);
            }
            done += n;
        }
        self.dontdump(dest, len);
        Ok(ops)
    }

    fn unmap(&mut self, window: Gpa, pages: u64) -> Result<u64, WindowError> {
        self.close(window, pages)
    }

    fn flush(
        &mut self,
        base: Gpa,
        live: &[Mapping],
        stale: &[Mapping],
    ) -> Result<u64, WindowError> {
        if stale.is_empty() {
            return Ok(0);
        }
        let mut ops = 0;
        for (first, pages) in gaps(live) {
            ops += self.close(Gpa(base.raw() + first * PAGE_SIZE), pages)?;
        }
        Ok(ops)
    }
}

impl Drop for AliasWindow {
    fn drop(&mut self) {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: self.base.raw(),
            memory_size: 0,
            userspace_addr: self.host,
        };
        // SAFETY: deleting the slot this value created; KVM stops using the range first.
        let _ = unsafe { self.vm.set_user_memory_region(region) };
        // SAFETY: the window mapping this value owns; KVM no longer uses it.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.len as usize) };
    }
}

/// The `slots` backend's window: one KVM memslot per mapping.
pub struct SlotWindow {
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    base: Gpa,
    span: u64,
    first_slot: u32,
    /// Slot id -> (window GPA, pages) of every slot in force.
    slots: BTreeMap<u32, (u64, u64)>,
}

impl SlotWindow {
    /// Windows of `span` bytes at `base`, using memslot ids from `first_slot` (one per window
    /// page: `span / 4 KiB` ids).
    pub fn new(vm: Arc<VmFd>, ram: Arc<GuestRam>, base: Gpa, span: u64, first_slot: u32) -> Self {
        SlotWindow {
            vm,
            ram,
            base,
            span,
            first_slot,
            slots: BTreeMap::new(),
        }
    }

    /// Memslot ids a window of `span` bytes needs.
    pub fn ids_needed(span: u64) -> u32 {
        u32::try_from(span / PAGE_SIZE).unwrap_or(u32::MAX)
    }

    fn id_of(&self, window: Gpa, pages: u64) -> Result<u32, WindowError> {
        let off = window
            .raw()
            .checked_sub(self.base.raw())
            .ok_or(WindowError::Range)?;
        if off + pages * PAGE_SIZE > self.span {
            return Err(WindowError::Range);
        }
        Ok(self.first_slot + (off / PAGE_SIZE) as u32)
    }

    fn set(&self, slot: u32, gpa: u64, len: u64, host: u64) -> Result<(), WindowError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: a non-empty region lies inside the RAM mapping of `self.ram` (checked by the
        // caller), which this value keeps alive and deletes its slots from before it goes
        // (Drop); its GPA is in the window, above RAM, so it overlaps no RAM slot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| WindowError::Host {
            what: "KVM_SET_USER_MEMORY_REGION (mermap slot)",
            errno: e.errno(),
        })
    }

    fn delete(&mut self, slot: u32) -> Result<u64, WindowError> {
        if let Some((gpa, _)) = self.slots.remove(&slot) {
            self.set(slot, gpa, 0, 0)?;
            return Ok(1);
        }
        Ok(0)
    }
}

impl WindowBackend for SlotWindow {
    fn name(&self) -> &'static str {
        "memslots"
    }

    fn map(&mut self, window: Gpa, target: Gpa, pages: u64) -> Result<u64, WindowError> {
        let id = self.id_of(window, pages)?;
        let len = pages * PAGE_SIZE;
        if !self.ram.contains(target.raw(), len) {
            return Err(WindowError::Range);
        }
        let mut ops = self.delete(id)?;
        self.set(id, window.raw(), len, self.ram.host_base() + target.raw())?;
        self.slots.insert(id, (window.raw(), pages));
        ops += 1;
        Ok(ops)
    }

    fn unmap(&mut self, window: Gpa, pages: u64) -> Result<u64, WindowError> {
        let lo = self.id_of(window, pages)?;
        let ids: Vec<u32> = self
            .slots
            .range(lo..lo + pages as u32)
            .map(|(&id, _)| id)
            .collect();
        let mut ops = 0;
        for id in ids {
            ops += self.delete(id)?;
        }
        Ok(ops)
    }

    fn flush(
        &mut self,
        base: Gpa,
        live: &[Mapping],
        _stale: &[Mapping],
    ) -> Result<u64, WindowError> {
        let lo = self.id_of(base, WINDOW_PAGES)?;
        let keep: Vec<u32> = live.iter().map(|m| lo + m.first as u32).collect();
        let ids: Vec<u32> = self
            .slots
            .range(lo..lo + WINDOW_PAGES as u32)
            .map(|(&id, _)| id)
            .filter(|id| !keep.contains(id))
            .collect();
        let mut ops = 0;
        for id in ids {
            ops += self.delete(id)?;
        }
        Ok(ops)
    }
}

impl Drop for SlotWindow {
    fn drop(&mut self) {
        let ids: Vec<u32> = self.slots.keys().copied().collect();
        for id in ids {
            let _ = self.delete(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_between_live_mappings() {
        let m = |first, pages| Mapping {
            first,
            pages,
            target: 0,
        };
        assert_eq!(gaps(&[]), vec![(0, WINDOW_PAGES)]);
        assert_eq!(gaps(&[m(3, 2), m(0, 1), m(64, 1)]), vec![(1, 2), (5, 59)]);
    }
}
