//! [`Mprotect`]: the `mprotect` backend, a view realised as 4 KiB host page protections.
//!
//! Guest RAM is a memfd ([`Backing::Memfd`]) mapped twice: the VMM view (the [`GuestRam`]
//! mapping every VMM access uses: host fills and assertions, zeroing, dumps, hypercall buffers,
//! ELF loading) and the guest view, a second shared mapping of the same pages that this backend
//! owns. KVM's one memslot points at the guest view, and a permission change is one `mprotect`
//! of the guest view's pages (`PROT_NONE`, `PROT_READ`, `PROT_READ | PROT_WRITE`); KVM's MMU
//! notifier drops its stage-2 entries for them. The VMM never touches the guest view, so it never
//! faults on its own accesses and never opens a page to do its work.
//!
//! Limits: one memslot for any layout; every run of distinct protection is a VMA, bounded by
//! `vm.max_map_count` (an `ENOMEM` from `mprotect` is reported as out of slots, nothing changed).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use allocator::Stage2Error;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use super::plan::{RangeMap, Run};
use super::{BackendUsage, EngineError, LockStats, Perm, SlotInfo, Stage2Backend, PAGE_SIZE};
use crate::addr::{Gpa, HostAddr};
use crate::memory::{Backing, CoreDump, GuestRam};

/// The memslot id of the guest view.
const SLOT: u32 = 0;

/// The `mprotect` backend (see the module docs).
pub struct Mprotect {
    // Declared first: dropped (after the memslot is deleted in `Drop`) before the RAM.
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    /// Host address of the guest view (GPA 0).
    guest_base: u64,
    size: u64,
    perms: RangeMap<Perm>,
    usage: BackendUsage,
    lock: LockStats,
    lock_unmapped: bool,
}

/// Why the `mprotect` backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum MprotectError {
    /// The RAM is not a memfd, so it cannot be mapped a second time.
    #[error("the mprotect backend needs memfd-backed guest RAM")]
    NotMemfd,
    /// The second mapping or the memslot failed.
    #[error("cannot set up the guest view: {0}")]
    Setup(std::io::Error),
}

impl Mprotect {
    /// Maps the guest view of `ram` (a memfd) with no access and gives it to `vm` as memslot 0
    /// covering all of RAM.
    pub fn new(vm: Arc<VmFd>, ram: Arc<GuestRam>) -> Result<Mprotect, MprotectError> {
        let fd = match (ram.backing(), ram.memfd()) {
            (Backing::Memfd, Some(f)) => f.as_raw_fd(),
            _ => return Err(MprotectError::NotMemfd),
        };
        let size = ram.size();
        let len = usize::try_from(size).map_err(|_| MprotectError::NotMemfd)?;
        // SAFETY: a new shared mapping of the memfd at an address the kernel chooses; no
        // existing memory is affected. It starts PROT_NONE: nothing is reachable until the
        // engine sets permissions.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MprotectError::Setup(std::io::Error::last_os_error()));
        }
        let mut me = Mprotect {
            vm,
            ram,
            guest_base: p as u64,
            size,
            perms: RangeMap::new(
                size,
                &[Run {
                    start: 0,
                    end: size,
                    state: Perm::None,
                }],
            ),
            usage: BackendUsage {
                vmas_in_use: 1,
                peak_vmas: 1,
                ..BackendUsage::default()
            },
            lock: LockStats::default(),
            lock_unmapped: true,
        };
        if me.ram.core_dump() == CoreDump::Exclude {
            // SAFETY: the guest view just mapped; MADV_DONTDUMP only changes what a core holds.
            if unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) } != 0 {
                return Err(MprotectError::Setup(std::io::Error::last_os_error()));
            }
        }
        me.set_slot(size).map_err(MprotectError::Setup)?;
        Ok(me)
    }

    /// Whether unreachable ranges are locked against swap (default on; off for replays).
    pub fn lock_unmapped(&mut self, on: bool) {
        self.lock_unmapped = on;
    }

    /// Host address of `gpa` in the guest view.
    pub fn guest_view_addr(&self, gpa: Gpa) -> HostAddr {
        HostAddr(self.guest_base + gpa.0)
    }

    fn set_slot(&mut self, len: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: len,
            userspace_addr: self.guest_base,
        };
        self.usage.memslot_updates += 1;
        // SAFETY: the region is the guest view, a mapping of `size` bytes this backend owns and
        // unmaps only after deleting the slot (Drop); KVM reaches the memfd pages through it,
        // never VMM-owned Rust memory.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if len == 0 {
            self.usage.slots_deleted += 1;
            self.usage.memslots_in_use = 0;
        } else {
            self.usage.slots_created += 1;
            self.usage.memslots_in_use = 1;
            self.usage.peak_memslots = 1;
        }
        Ok(())
    }

    fn protect(&mut self, gpa: u64, len: u64, perm: Perm) -> std::io::Result<()> {
        let prot = match perm {
            Perm::None => libc::PROT_NONE,
            Perm::Read => libc::PROT_READ,
            Perm::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        self.usage.mprotect_calls += 1;
        // SAFETY: [gpa, gpa + len) lies inside the guest view (checked by the caller), a mapping
        // no Rust reference points into; changing its protection affects only the guest.
        let r = unsafe {
            libc::mprotect(
                (self.guest_base + gpa) as *mut libc::c_void,
                len as usize,
                prot,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mprotect {
    fn drop(&mut self) {
        // The slot goes first so KVM holds no reference to the guest view once it is unmapped.
        let _ = self.set_slot(0);
        // SAFETY: unmaps exactly the guest view mapped in `new`, whose memslot is gone.
        unsafe { libc::munmap(self.guest_base as *mut libc::c_void, self.size as usize) };
    }
}

impl Stage2Backend for Mprotect {
    fn name(&self) -> &'static str {
        "mprotect"
    }

    fn set_perm(&mut self, gpa: Gpa, len: u64, perm: Perm) -> Result<(), EngineError> {
        let end = match gpa.0.checked_add(len) {
            Some(end)
                if len > 0
                    && end <= self.size
                    && gpa.is_page_aligned()
                    && len.is_multiple_of(PAGE_SIZE) =>
            {
                end
            }
            e => {
                return Err(EngineError::OutOfRam {
                    start: gpa,
                    end: Gpa(e.unwrap_or(u64::MAX)),
                    ram_size: self.size,
                })
            }
        };
        let before: Vec<Run<Perm>> = self.perms.overlapping(gpa.0, end).collect();
        if let Err(e) = self.protect(gpa.0, len, perm) {
            // mprotect may have changed part of the range: put every piece back.
            for r in &before {
                let _ = self.protect(r.start, r.end - r.start, r.state);
            }
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            return Err(EngineError::Backend(if errno == libc::ENOMEM {
                Stage2Error::OutOfSlots
            } else {
                Stage2Error::Backend(-errno)
            }));
        }
        self.perms.set(gpa.0, end, perm);
        self.usage.vmas_in_use = self.perms.len() as u64;
        self.usage.peak_vmas = self.usage.peak_vmas.max(self.usage.vmas_in_use);
        if self.lock_unmapped {
            for r in &before {
                let (base, n) = (self.guest_base + r.start, r.end - r.start);
                let change = match (r.state == Perm::None, perm == Perm::None) {
                    (false, true) => Some(true),
                    (true, false) => Some(false),
                    _ => None,
                };
                if let Some(locked) = change {
                    // SAFETY: the run lies inside the guest view, a live mapping of this backend.
                    unsafe { crate::memory::set_locked(base, n, locked, &mut self.lock) };
                }
            }
        }
        Ok(())
    }

    fn zero(&mut self, gpa: Gpa, len: u64) -> Result<(), Stage2Error> {
        super::zero_ram(&self.ram, gpa, len)
    }

    fn perm_at(&self, gpa: Gpa) -> Option<Perm> {
        self.perms.run_at(gpa.0).map(|r| r.state)
    }

    fn memslots(&self) -> Vec<SlotInfo> {
        vec![SlotInfo {
            slot: SLOT,
            gpa: 0,
            len: self.size,
            readonly: false,
        }]
    }

    fn slot_containing(&self, gpa: Gpa) -> Option<SlotInfo> {
        (gpa.0 < self.size).then(|| self.memslots()[0])
    }

    fn usage(&self) -> BackendUsage {
        self.usage
    }

    fn lock_stats(&self) -> LockStats {
        self.lock
    }

    fn check(&self) -> Result<(), String> {
        if self.usage.memslots_in_use != 1 {
            return Err(format!(
                "{} memslots in use, not 1",
                self.usage.memslots_in_use
            ));
        }
        if self.usage.vmas_in_use != self.perms.len() as u64 {
            return Err("vmas_in_use disagrees with the protection map".into());
        }
        Ok(())
    }
}
